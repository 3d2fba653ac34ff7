"""
The settings: their defaults, loading a config file, and validation.

A config file is a Python module of UPPER_CASE assignments, exactly as for the
original failnozzle, so an existing config works unchanged.  Every problem is
reported as one L{ConfigError} whose text names the setting and what is wrong:
the daemon prints it and stops instead of starting half-configured.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import email.utils
import ipaddress
import logging
import math
import os
import re
import socket
import traceback
import types
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

#: The fields that make two error reports "the same error", as in the original.
UniqueMessage = namedtuple(
    "UniqueMessage",
    ["module", "funcName", "filename", "message", "pathname", "lineno",
     "exc_text", "kind"],
)

#: The original failnozzle's markers of "just monitoring" canary errors.
DEFAULT_MONITORING_ERROR_MARKERS = (
    "1669fe88-b0c3-439d-bc10-8a3d21493ede",
    "c84a3673-0a95-447b-810f-8107e1e38013",
)

#: Names the original failnozzle's README used for settings its code called
#: otherwise; a config written from that README still means the same thing.
LEGACY_NAMES = {
    "ERROR_RECIP": "REPORT_TO",
    "JUST_MONITORING_ERROR_RECIP": "JUST_MONITORING_REPORT_TO",
    "PAGER_WINDOW_LIMIT": "PAGER_LIMIT",
}

TLS_MODES = ("implicit", "starttls", "off")

_SETTING_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


class ConfigError(Exception):
    """
    A setting is wrong.  The message is one line naming the setting, meant
    to be shown to the person starting the daemon as it is.
    """


@dataclass(frozen=True)
class Settings:
    """
    Every setting with its default.  Addresses are tuples of strings, however
    they were written; L{load_settings} fills in what is derived (the
    sender and recipient defaults of maildir mode).  SMTP_TLS None means
    found out when sending (see L{failnozzle.transport.SMTPTransport}).
    """

    UDP_BIND: tuple = ("127.0.0.1", 1549)
    GELF_BIND: Optional[tuple] = None
    UDP_RCVBUF: int = 4 * 1024 * 1024
    INCOMING_MESSAGE_MAX_SIZE: int = 65507
    MAX_FIELD_CHARS: int = 1000
    MAX_EXC_TEXT_CHARS: int = 16384
    MAX_SOURCES_PER_ERROR: int = 100

    SMTP_INGEST_BIND: Optional[tuple] = None
    SMTP_INGEST_MAX_BYTES: int = 10 * 1024 * 1024
    SMTP_INGEST_MAX_CONNECTIONS: int = 100
    SMTP_INGEST_MAX_RECIPIENTS: int = 100
    SMTP_INGEST_USERS: Optional[Mapping] = None
    SMTP_INGEST_TLS_CERT: Optional[str] = None
    SMTP_INGEST_TLS_KEY: Optional[str] = None

    SMTP_HOST: Optional[str] = None
    SMTP_PORT: int = 25
    SMTP_USER: Optional[str] = None
    SMTP_PASSWORD: Optional[str] = None
    SMTP_TLS: Optional[str] = None
    SMTP_TLS_VERIFY: bool = True
    SMTP_CA_FILE: Optional[str] = None
    SMTP_TIMEOUT: float = 30.0
    MAILDIR: str = "failnozzle-mail"

    SPOOL_DIR: str = "failnozzle-spool"
    RETRY_MIN_SECONDS: float = 30
    RETRY_MAX_SECONDS: float = 1800
    SPOOL_LIFETIME_SECONDS: float = 5 * 24 * 3600
    STATE_FILE: str = "failnozzle-state.json"
    SNAPSHOT_SECONDS: float = 1
    SHUTDOWN_TIMEOUT_SECONDS: float = 10

    REPORT_FROM: Optional[str] = None
    REPORT_TO: tuple = ()
    REPLY_TO: tuple = ()
    JUST_MONITORING_REPORT_TO: tuple = ()
    MONITORING_ERROR_MARKERS: tuple = DEFAULT_MONITORING_ERROR_MARKERS
    PAGER_FROM: Optional[str] = None
    PAGER_TO: tuple = ()
    PAGER_REPLY_TO: tuple = ()

    FLUSH_SECONDS: float = 60
    PAGER_WINDOW_SIZE: int = 5
    PAGER_LIMIT: int = 100
    MAX_UNIQUE_MESSAGES: int = 2000
    #: None: the built-in body template lists 100 errors in full, a custom
    #: one gets every kept error.
    DIGEST_MAX_DETAILS: Optional[int] = None
    DIGEST_MAX_BYTES: int = 2_000_000

    UNIQUE_MSG_TUPLE: Any = UniqueMessage
    SOURCE_FIELD_NAME: str = "source"
    GELF_DEFAULT_KIND: str = "gelf"
    EMAIL_TEMPLATE_DIR: Optional[str] = None
    EMAIL_BODY_TEMPLATE: str = "body-template.txt"
    EMAIL_SUBJECT_TEMPLATE: str = "subject-template.txt"
    INTERNAL_ERROR_FUNC: Optional[Callable[[int, Exception], dict]] = None
    SERVER_NAME: str = field(default_factory=socket.gethostname)

    LOG_LEVEL: Any = logging.DEBUG
    LOG_FORMAT: str = "%(asctime)-15s %(levelname)-8s %(message)s"

    @property
    def smtp_enabled(self) -> bool:
        """Whether digests go to an SMTP server (else into MAILDIR)."""
        return self.SMTP_HOST is not None

    @property
    def unique_fields(self) -> tuple:
        """The record fields whose values together identify an error."""
        return tuple(self.UNIQUE_MSG_TUPLE._fields)


SETTING_NAMES = frozenset(f.name for f in dataclasses.fields(Settings))


# Checkers: each takes (name, value) and returns the value to keep, or raises
# ConfigError naming the setting.


def _type_name(value: object) -> str:
    return type(value).__name__


def _string(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a non-empty string, not {value!r}")
    return value


def _optional_string(name: str, value: object) -> Optional[str]:
    if value is None or value == "":
        return None
    return _string(name, value)


def _addresses(name: str, value: object) -> tuple:
    """
    One address or a list of them; None or empty means 'not configured'.
    A string may name several separated by commas, as a To: header does:
    sent whole, it would be one recipient the SMTP server refuses.
    """
    if value is None or value == "":
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(
            f"{name} must be an email address or a list of them, "
            f"not a {_type_name(value)}"
        )
    addresses = []
    for item in items:
        if not isinstance(item, str) or "\n" in item or "\r" in item:
            raise ConfigError(f"{name}: {item!r} is not an email address")
        pairs = email.utils.getaddresses([item])
        parts = ([email.utils.formataddr(pair) for pair in pairs]
                 if len(pairs) > 1 else [item])
        for part in parts:
            if "@" not in email.utils.parseaddr(part)[1]:
                raise ConfigError(f"{name}: {part!r} is not an email address")
        addresses.extend(parts)
    return tuple(addresses)


def _optional_address(name: str, value: object) -> Optional[str]:
    addresses = _addresses(name, value)
    if len(addresses) > 1:
        raise ConfigError(f"{name} must be one email address, not a list")
    return addresses[0] if addresses else None


def _number(name: str, value: object, integer: bool, minimum: float,
            maximum: float = math.inf) -> Any:
    kinds = (int,) if integer else (int, float)
    if (isinstance(value, bool) or not isinstance(value, kinds)
            or not math.isfinite(value)):
        wanted = "a whole number" if integer else "a number"
        raise ConfigError(f"{name} must be {wanted}, not {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, not {value!r}")
    if value > maximum:
        raise ConfigError(f"{name} must be at most {maximum}, not {value!r}")
    return value


def _positive_int(name: str, value: object) -> int:
    return _number(name, value, integer=True, minimum=1)


def _optional_positive_int(name: str, value: object) -> Optional[int]:
    return None if value is None else _positive_int(name, value)


def _buffer_size(name: str, value: object) -> int:
    """A socket buffer size: the kernel takes a C int."""
    return _number(name, value, integer=True, minimum=1, maximum=2**31 - 1)


def _positive_seconds(name: str, value: object) -> float:
    value = _number(name, value, integer=False, minimum=0)
    if value == 0:
        raise ConfigError(f"{name} must be more than 0 seconds")
    return value


def _seconds_or_off(name: str, value: object) -> float:
    """Seconds, where 0 turns the feature off."""
    return _number(name, value, integer=False, minimum=0)


def _port(name: str, value: object) -> int:
    value = _number(name, value, integer=True, minimum=0)
    if value > 65535:
        raise ConfigError(
            f"{name} must be a port number (0-65535), not {value}")
    return value


def _ipv4_address(name: str, host: str) -> str:
    """
    The address a host name stands for.  The original bound an IPv4 socket
    to UDP_BIND, so names such as 'localhost' worked, meaning IPv4.
    """
    try:
        return socket.gethostbyname(host)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{name}: {host!r} is neither an IP address nor a host name that "
            f"resolves ({error})"
        ) from None


def _bind_address(name: str, value: object) -> tuple:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not isinstance(value[0], str)):
        raise ConfigError(
            f"{name} must be a (host, port) pair such as ('127.0.0.1', 1549), "
            f"not {value!r}"
        )
    port = _port(name, value[1])
    host = value[0] or "0.0.0.0"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        host = _ipv4_address(name, host)
    return (host, port)


def _optional_bind_address(name: str, value: object) -> Optional[tuple]:
    return None if value is None else _bind_address(name, value)


def _boolean(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, not {value!r}")
    return value


def _tls_mode(name: str, value: object) -> Optional[str]:
    if value is None:
        return None
    if value not in TLS_MODES:
        choices = ", ".join(repr(mode) for mode in TLS_MODES)
        raise ConfigError(f"{name} must be one of {choices}, not {value!r}")
    return value


def _existing_file(name: str, value: object) -> Optional[str]:
    path = _optional_string(name, value)
    if path is not None and not os.path.isfile(path):
        raise ConfigError(f"{name}: no such file {path!r}")
    return path


def _existing_dir(name: str, value: object) -> Optional[str]:
    path = _optional_string(name, value)
    if path is not None and not os.path.isdir(path):
        raise ConfigError(f"{name}: no such directory {path!r}")
    return path


def _users(name: str, value: object) -> Optional[dict]:
    """User names and passwords; the values are never shown in an error."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{name} must be a dict of user names to passwords, "
                          f"such as {{'django': 'drink canada pony'}}")
    for user, password in value.items():
        if not isinstance(user, str) or not user or "\0" in user:
            raise ConfigError(f"{name}: user name {user!r} must be a "
                              f"non-empty string")
        if not isinstance(password, str) or not password:
            raise ConfigError(f"{name}: the password of {user!r} must be a "
                              f"non-empty string")
    return dict(value)


def _markers(name: str, value: object) -> tuple:
    if isinstance(value, str) or not isinstance(value, (list, tuple, set)):
        raise ConfigError(f"{name} must be a list of strings, not {value!r}")
    for marker in value:
        if not isinstance(marker, str) or not marker:
            raise ConfigError(f"{name}: {marker!r} is not a non-empty string")
    return tuple(value)


def _unique_tuple(name: str, value: object) -> type:
    """A namedtuple class, as the original wanted, or a list of field names."""
    if isinstance(value, type) and issubclass(value, tuple) and hasattr(
            value, "_fields"):
        fields = value._fields
    elif isinstance(value, (list, tuple)) and all(
            isinstance(item, str) for item in value):
        fields = value
        try:
            value = namedtuple("UniqueMessage", fields)
        except ValueError as error:
            raise ConfigError(f"{name}: {error}") from None
    else:
        raise ConfigError(
            f"{name} must be a namedtuple class or a list of field names, "
            f"not {value!r}"
        )
    if not fields:
        raise ConfigError(f"{name} must name at least one field")
    return value


def _callable(name: str, value: object) -> Optional[Callable]:
    if value is not None and not callable(value):
        raise ConfigError(f"{name} must be a function, not {value!r}")
    return value


def _log_level(name: str, value: object) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and isinstance(
            logging.getLevelName(value.upper()), int):
        return value
    raise ConfigError(f"{name} must be a logging level, not {value!r}")


_CHECKS: Mapping[str, Callable[[str, object], Any]] = {
    "UDP_BIND": _bind_address,
    "GELF_BIND": _optional_bind_address,
    "UDP_RCVBUF": _buffer_size,
    "INCOMING_MESSAGE_MAX_SIZE": _positive_int,
    "MAX_FIELD_CHARS": _positive_int,
    "MAX_EXC_TEXT_CHARS": _positive_int,
    "MAX_SOURCES_PER_ERROR": _positive_int,
    "SMTP_INGEST_BIND": _optional_bind_address,
    "SMTP_INGEST_MAX_BYTES": _positive_int,
    "SMTP_INGEST_MAX_CONNECTIONS": _positive_int,
    "SMTP_INGEST_MAX_RECIPIENTS": _positive_int,
    "SMTP_INGEST_USERS": _users,
    "SMTP_INGEST_TLS_CERT": _existing_file,
    "SMTP_INGEST_TLS_KEY": _existing_file,
    "SMTP_HOST": _optional_string,
    "SMTP_PORT": _port,
    "SMTP_USER": _optional_string,
    "SMTP_PASSWORD": _optional_string,
    "SMTP_TLS": _tls_mode,
    "SMTP_TLS_VERIFY": _boolean,
    "SMTP_CA_FILE": _existing_file,
    "SMTP_TIMEOUT": _positive_seconds,
    "MAILDIR": _string,
    "SPOOL_DIR": _string,
    "RETRY_MIN_SECONDS": _positive_seconds,
    "RETRY_MAX_SECONDS": _positive_seconds,
    "SPOOL_LIFETIME_SECONDS": _positive_seconds,
    "STATE_FILE": _string,
    "SNAPSHOT_SECONDS": _seconds_or_off,
    "SHUTDOWN_TIMEOUT_SECONDS": _positive_seconds,
    "REPORT_FROM": _optional_address,
    "REPORT_TO": _addresses,
    "REPLY_TO": _addresses,
    "JUST_MONITORING_REPORT_TO": _addresses,
    "MONITORING_ERROR_MARKERS": _markers,
    "PAGER_FROM": _optional_address,
    "PAGER_TO": _addresses,
    "PAGER_REPLY_TO": _addresses,
    "FLUSH_SECONDS": _positive_seconds,
    "PAGER_WINDOW_SIZE": _positive_int,
    "PAGER_LIMIT": _positive_int,
    "MAX_UNIQUE_MESSAGES": _positive_int,
    "DIGEST_MAX_DETAILS": _optional_positive_int,
    "DIGEST_MAX_BYTES": _positive_int,
    "UNIQUE_MSG_TUPLE": _unique_tuple,
    "SOURCE_FIELD_NAME": _string,
    "GELF_DEFAULT_KIND": _string,
    "EMAIL_TEMPLATE_DIR": _existing_dir,
    "EMAIL_BODY_TEMPLATE": _string,
    "EMAIL_SUBJECT_TEMPLATE": _string,
    "INTERNAL_ERROR_FUNC": _callable,
    "SERVER_NAME": _string,
    "LOG_LEVEL": _log_level,
    "LOG_FORMAT": _string,
}
assert set(_CHECKS) == SETTING_NAMES, "every setting needs a checker"


class _ModuleNames(ast.NodeVisitor):
    """
    Collects the names a config file binds in its own namespace: assigned,
    or defined by C{def} and C{class}, also inside C{if} and C{try}; not
    those it only imports, nor those local to a function or comprehension.
    """

    def __init__(self) -> None:
        self.names: set = set()

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Store):
            self.names.add(node.id)

    def visit_definition(self, node: ast.AST) -> None:
        self.names.add(node.name)

    def visit_own_scope(self, node: ast.AST) -> None:
        pass

    visit_FunctionDef = visit_AsyncFunctionDef = visit_definition
    visit_ClassDef = visit_definition
    visit_Lambda = visit_ListComp = visit_SetComp = visit_own_scope
    visit_DictComp = visit_GeneratorExp = visit_own_scope


def _one_line(text: str) -> str:
    return " ".join(text.split())


def read_config_file(path: str) -> dict:
    """
    Run a config file and return the settings it defines, with their
    values.  Settings it imports (C{from site_defaults import *}) count, as
    they did for the original; other UPPER_CASE names it imports (C{from
    logging import DEBUG}) are no settings, but one it assigns is a typo.

    @raise ConfigError: the file is missing, does not run, or assigns an
        UPPER_CASE name that is no setting.
    """
    try:
        with open(path, "rb") as config_file:
            source = config_file.read()
    except OSError as error:
        raise ConfigError(
            f"cannot read config file {path!r}: {error.strerror}"
        ) from None
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as error:
        where = f" line {error.lineno}" if error.lineno else ""
        raise ConfigError(
            f"config file {path!r}{where}: {_one_line(str(error.msg))}"
        ) from None
    except ValueError as error:
        # Python 3.10 and older say "source code string cannot contain
        # null bytes" this way rather than as a SyntaxError.
        raise ConfigError(f"config file {path!r}: {error}") from None

    # Any file name will do (site.py, failnozzle.conf), as with the
    # original's imp.load_source.
    module = types.ModuleType("failnozzle_config")
    module.__file__ = path
    try:
        exec(compile(tree, path, "exec"), module.__dict__)
    except Exception as error:
        lines = [frame.lineno for frame in traceback.extract_tb(
            error.__traceback__) if frame.filename == path]
        where = f" line {lines[-1]}" if lines else ""
        raise ConfigError(
            f"config file {path!r}{where}: "
            f"{type(error).__name__}: {_one_line(str(error))}"
        ) from None

    collector = _ModuleNames()
    collector.visit(tree)
    values = {}
    for name, value in module.__dict__.items():
        if not _SETTING_NAME.fullmatch(name):
            continue
        if name in SETTING_NAMES or name in LEGACY_NAMES:
            values[name] = value
        elif name in collector.names:
            raise ConfigError(
                f"config file {path!r}: unknown setting {name}"
                + _suggestion(name)
            )
    return values


def _suggestion(name: str) -> str:
    close = difflib.get_close_matches(name, sorted(SETTING_NAMES), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def load_settings(
    path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None
) -> tuple:
    """
    Build the settings from the defaults, an optional config file and
    command-line overrides, in that order.

    @return: C{(settings, notices)}: the checked L{Settings}, and lines worth
        logging at start-up (legacy names, risky choices).
    @raise ConfigError: anything is wrong.
    """
    raw = read_config_file(path) if path is not None else {}
    notices = []
    for legacy, current in LEGACY_NAMES.items():
        if legacy in raw:
            value = raw.pop(legacy)
            if current in raw:
                notices.append(f"{legacy} is ignored: {current} is set too")
            else:
                # Checked under the name the file uses, so an error names it.
                raw[current] = _CHECKS[current](legacy, value)
                notices.append(f"{legacy} is read as {current}; "
                               f"please rename it")
    raw.update(overrides or {})
    for name in raw:
        if name not in SETTING_NAMES:
            raise ConfigError(f"unknown setting {name}" + _suggestion(name))
    checked = {name: _CHECKS[name](name, value) for name, value in raw.items()}
    settings = Settings(**checked)
    return _complete(settings, notices), notices


def _complete(settings: Settings, notices: list) -> Settings:
    """Check settings that depend on each other; fill in derived values."""
    changes: dict = {}
    if settings.smtp_enabled:
        for name in ("REPORT_FROM", "REPORT_TO"):
            if not getattr(settings, name):
                raise ConfigError(f"{name} is required when SMTP_HOST is set")
    else:
        # Maildir mode: the digests only need well-formed headers.
        changes["REPORT_FROM"] = settings.REPORT_FROM or "failnozzle@localhost"
        changes["REPORT_TO"] = settings.REPORT_TO or ("failnozzle@localhost",)
    _both_or_neither(settings, "SMTP_USER", "SMTP_PASSWORD")
    _both_or_neither(settings, "SMTP_INGEST_TLS_CERT", "SMTP_INGEST_TLS_KEY")
    if settings.RETRY_MAX_SECONDS < settings.RETRY_MIN_SECONDS:
        raise ConfigError("RETRY_MAX_SECONDS must not be less than "
                          "RETRY_MIN_SECONDS")
    # Unset, SMTP_TLS is found out, and never falls back to clear text.
    if (settings.smtp_enabled and settings.SMTP_USER
            and settings.SMTP_TLS == "off"):
        notices.append("SMTP_USER is set with SMTP_TLS = 'off': the password "
                       "crosses the network in clear")
    if (settings.SMTP_INGEST_BIND and settings.SMTP_INGEST_USERS
            and not settings.SMTP_INGEST_TLS_CERT):
        notices.append("SMTP_INGEST_USERS is set without "
                       "SMTP_INGEST_TLS_CERT: passwords cross the network in "
                       "clear")
    return dataclasses.replace(settings, **changes)


def _both_or_neither(settings: Settings, first: str, second: str) -> None:
    """
    @raise ConfigError: one of two settings that go together is set
        without the other.
    """
    if bool(getattr(settings, first)) != bool(getattr(settings, second)):
        given, missing = (first, second)
        if not getattr(settings, first):
            given, missing = missing, given
        raise ConfigError(f"{missing} is required when {given} is set")


def parse_host_port(text: str, default_host: Optional[str] = "0.0.0.0"
                    ) -> tuple:
    """
    Read C{HOST:PORT}, C{[IPV6]:PORT} or C{:PORT}, which means
    C{default_host} (all interfaces, for listening).

    @raise ValueError: the text is not of that form, or has no host and
        C{default_host} is None.
    """
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host or default_host
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, not {text!r}")
    return (host, int(port))
