"""
The settings: their defaults, loading a config file, and validation.

A config file is a Python module of UPPER_CASE assignments, exactly as for the
original failnozzle, so an existing config works unchanged.  Every problem is
one line naming the setting and what is wrong: L{check_settings} finds them
all (for C{--check}), L{load_settings} raises the first as a L{ConfigError},
which the daemon prints before it stops instead of starting half-configured.
What is only worth saying (an UPPER_CASE name that is no setting, a legacy
name) is a notice, logged at start-up.
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
import reprlib
import socket
import sys
import sysconfig
import traceback
import types
from collections import namedtuple
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Mapping, Optional

from failnozzle.levels import SYSLOG_LEVELS, level_named
from failnozzle.routing import BadRule, parse_rules, unknown_fields
from failnozzle.silences import config_silences
from failnozzle.textcap import one_line

#: The fields that make two error reports "the same error", as in the original.
UniqueMessage = namedtuple(
    "UniqueMessage",
    ["module", "funcName", "filename", "message", "pathname", "lineno",
     "exc_text", "kind"],
)
DEFAULT_FIELDS = frozenset(UniqueMessage._fields)

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

    #: The status page, metrics, health and control API (None: off).
    HTTP_BIND: Optional[tuple] = ("127.0.0.1", 1550)
    HTTP_TOKEN: Optional[str] = None
    #: POST /api/errors takes it if set.
    HTTP_ERRORS_TOKEN: Optional[str] = None
    #: Sentry public keys and the kind of the errors each sends; None: the
    #: Sentry endpoints are off.
    SENTRY_KEYS: Optional[Mapping] = None
    SENTRY_EVENTS_PER_SECOND: float = 200

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

    #: Cluster mode (failnozzle.cluster): the Redis or Valkey server the
    #: nodes share; None, a single node.
    CLUSTER_URL: Optional[str] = None
    CLUSTER_NAME: str = "failnozzle"
    CLUSTER_LEASE_SECONDS: float = 15
    CLUSTER_GRACE_SECONDS: float = 30

    REPORT_FROM: Optional[str] = None
    REPORT_TO: tuple = ()
    REPLY_TO: tuple = ()
    JUST_MONITORING_REPORT_TO: tuple = ()
    MONITORING_ERROR_MARKERS: tuple = DEFAULT_MONITORING_ERROR_MARKERS
    #: Who gets which errors (failnozzle.routing); what no rule takes goes
    #: to REPORT_TO.
    ROUTES: tuple = ()
    #: Errors kept out of the mail and the pager until a time
    #: (failnozzle.silences); more can be added at run time.
    SILENCES: tuple = ()
    PAGER_FROM: Optional[str] = None
    PAGER_TO: tuple = ()
    PAGER_REPLY_TO: tuple = ()

    FLUSH_SECONDS: float = 60
    PAGER_WINDOW_SIZE: int = 5
    PAGER_LIMIT: int = 100
    #: While the rate stays over PAGER_LIMIT, a reminder this often (0:
    #: at every flush).
    PAGER_REPEAT_SECONDS: float = 3600
    #: No canary for this long (once one came): page that the pipeline
    #: may be broken (0: never).
    CANARY_MAX_SILENCE_SECONDS: float = 0
    MAX_UNIQUE_MESSAGES: int = 2000
    #: None: the built-in body template lists 100 errors in full, a custom
    #: one gets every kept error.
    DIGEST_MAX_DETAILS: Optional[int] = None
    DIGEST_MAX_BYTES: int = 2_000_000

    UNIQUE_MSG_TUPLE: Any = UniqueMessage
    SOURCE_FIELD_NAME: str = "source"
    GELF_DEFAULT_KIND: str = "gelf"
    #: The least severe level that is an error (a syslog severity: 0
    #: emergency ... 7 debug); a record without a level always is.  None:
    #: every record, as in the original.  GELF is held to GELF_MIN_LEVEL
    #: too: GELF clients ship every log line.
    MIN_LEVEL: Optional[int] = None
    GELF_MIN_LEVEL: Optional[int] = 4
    EMAIL_TEMPLATE_DIR: Optional[str] = None
    EMAIL_BODY_TEMPLATE: str = "body-template.txt"
    EMAIL_SUBJECT_TEMPLATE: str = "subject-template.txt"
    INTERNAL_ERROR_FUNC: Optional[Callable[[int, Exception], dict]] = None
    #: 'default': by fingerprints (failnozzle.fingerprint); 'exact': by
    #: byte-identical UNIQUE_MSG_TUPLE fields, as the original grouped.
    GROUPING: str = "default"
    GROUPING_RULES: tuple = ()
    FINGERPRINT_FUNC: Optional[Callable[[dict], Any]] = None
    #: The seen-memory (failnozzle.seen): errors remembered, the days after
    #: which one not seen is new again, and the days of quiet after which
    #: one is "back".
    SEEN_MAX: int = 10000
    SEEN_DAYS: float = 30
    REGRESSION_DAYS: float = 1
    #: An ongoing error listed in full this recently is only counted, and
    #: a digest of only such errors waits (0: every flush, the original's
    #: way); a rate RISE_FACTOR times the last one listed is news again.
    REPEAT_SECONDS: float = 4 * 3600
    RISE_FACTOR: float = 10
    #: After a quiet FLUSH_SECONDS, the first digest goes out this soon
    #: after its first error (0: at the next flush).
    GROUP_WAIT_SECONDS: float = 10
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

#: Settings accepted (and checked) only so that the original's configs
#: load: logging goes through twistd, at start as after a reload.
UNUSED_SETTINGS = frozenset({"LOG_LEVEL", "LOG_FORMAT"})

_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def default_value(name: str) -> Any:
    """The default of setting C{name} (for SERVER_NAME, this host's name)."""
    setting = _FIELDS[name]
    if setting.default is dataclasses.MISSING:
        return setting.default_factory()
    return setting.default


#: The largest payload of a UDP datagram over IPv4.
UDP_MAX_PAYLOAD = 65507

#: The original's INCOMING_MESSAGE_MAX_SIZE, which configs copied: a few
#: bytes over UDP_MAX_PAYLOAD, so read as it.
_ORIGINAL_MAX_SIZE = 65536

#: Recipients of one setting: an SMTP server need take no more per message
#: (RFC 5321), and many refuse more.
MAX_RECIPIENTS = 100

#: Markers of "just monitoring" errors; each is looked for in every error.
_MAX_MARKERS = 1000

_HOUR, _DAY = 3600, 24 * 3600
_WEEK, _YEAR = 7 * _DAY, 365 * _DAY

# Checkers: each takes (name, value) and returns the value to keep, or raises
# ConfigError naming the setting.

Checker = Callable[[str, object], Any]

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80


def _type_name(value: object) -> str:
    return type(value).__name__


def _a(noun: str) -> str:
    """C{noun} with its indefinite article: C{'an int'}, C{'a str'}."""
    return ("an " if noun[:1] in tuple("aeiou") else "a ") + noun


def _shown(value: object) -> str:
    """C{repr(value)}, shortened to what one line of an error can show."""
    try:
        return _REPR.repr(value)
    except Exception:
        # A config's object whose repr fails, or an int of more digits
        # than Python converts to text.
        return _a(_type_name(value))


def _string(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(
            f"{name} must be a non-empty string, not {_shown(value)}")
    return value


def _optional_string(name: str, value: object) -> Optional[str]:
    if value is None or value == "":
        return None
    return _string(name, value)


def _path(name: str, value: object) -> str:
    """A file or directory name: the system refuses one with a NUL byte."""
    path = _string(name, value)
    if "\0" in path:
        raise ConfigError(f"{name}: a path cannot hold a NUL byte, as "
                          f"{_shown(path)} does")
    return path


def _optional_path(name: str, value: object) -> Optional[str]:
    return None if _optional_string(name, value) is None else _path(
        name, value)


def _host(name: str, value: object) -> Optional[str]:
    """A host to connect to: a name DNS could hold, or an IP address."""
    host = _optional_string(name, value)
    if host is None:
        return None
    try:
        valid = (host.isprintable() and not any(c.isspace() for c in host)
                 and len(host) <= 253 and bool(host.encode("idna")))
    except UnicodeError:
        # An empty label ('bad..name') or one longer than 63 characters.
        valid = False
    if not valid:
        raise ConfigError(f"{name}: {_shown(host)} is not a host name or "
                          f"an IP address")
    return host


def _login(name: str, value: object) -> Optional[str]:
    """A user name or password for SMTP AUTH, which separates by NUL."""
    text = _optional_string(name, value)
    if text is not None and any(c in text for c in "\0\r\n"):
        raise ConfigError(f"{name} cannot hold NUL, CR or LF, as "
                          f"{_shown(text)} does")
    return text


def _token(name: str, value: object) -> Optional[str]:
    """A bearer token: long enough not to be guessed, sent in a header."""
    text = _optional_string(name, value)
    if text is not None and not (
            16 <= len(text) <= 1000 and text.isascii() and text.isprintable()
            and " " not in text):
        raise ConfigError(f"{name} must be 16 to 1,000 printable ASCII "
                          f"characters without spaces")
    return text


def _cluster_url(name: str, value: object) -> Optional[str]:
    """A Redis URL redis-py reads: redis://, rediss:// (TLS), unix://."""
    url = _optional_string(name, value)
    if url is None:
        return None
    # Imported only for a cluster: redis-py is 6.6 MB of the daemon's
    # memory.
    from redis.connection import parse_url
    try:
        if not url.isprintable():
            raise ValueError("not printable")
        parse_url(url)
    except (ValueError, TypeError):
        raise ConfigError(name) from None
    return url


def _cluster_name(name: str, value: object) -> str:
    """What the cluster's Redis keys begin with."""
    text = _string(name, value)
    if not (len(text) <= 100 and re.fullmatch(r"[A-Za-z0-9_.-]+", text)):
        raise ConfigError(f"{name} must be up to 100 letters, digits, "
                          f"'_', '.' or '-', not {_shown(text)}")
    return text


def _server_name(name: str, value: object) -> str:
    """
    This server's name, in every digest's subject: one line of printable
    ASCII, which any mail header carries as it is.
    """
    text = _string(name, value)
    if not (text.isascii() and text.isprintable() and text.strip()
            and len(text) <= 255):
        raise ConfigError(
            f"{name} must be up to 255 characters of printable ASCII "
            f"(letters, digits, punctuation, spaces), not {_shown(text)}")
    return text


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
            f"not {_a(_type_name(value))}"
        )
    addresses = []
    for item in items:
        if not isinstance(item, str) or not item.isprintable():
            raise ConfigError(
                f"{name}: {_shown(item)} is not an email address")
        pairs = email.utils.getaddresses([item])
        parts = ([email.utils.formataddr(pair) for pair in pairs]
                 if len(pairs) > 1 else [item])
        for part in parts:
            _check_address(name, part)
        addresses.extend(parts)
    if len(addresses) > MAX_RECIPIENTS:
        raise ConfigError(f"{name} names {len(addresses)} addresses; at most "
                          f"{MAX_RECIPIENTS}, as SMTP servers need take no "
                          f"more per message (use a mailing list)")
    return tuple(addresses)


def _check_address(name: str, text: str) -> None:
    """
    @raise ConfigError: C{text} is not an address Twisted's SMTP client
        can send to or from.
    """
    address = email.utils.parseaddr(text)[1]
    if "@" not in address:
        raise ConfigError(f"{name}: {_shown(text)} is not an email address")
    if not address.isascii():
        raise ConfigError(
            f"{name}: {_shown(text)}: the address must be ASCII (write "
            f"its domain as xn--...): Twisted's SMTP client cannot send "
            f"SMTPUTF8; a display name may be in any script")
    if len(address) > 254:
        raise ConfigError(f"{name}: {_shown(text)} is longer than the 254 "
                          f"characters an address may have")


def _optional_address(name: str, value: object) -> Optional[str]:
    addresses = _addresses(name, value)
    if len(addresses) > 1:
        raise ConfigError(f"{name} must be one email address, not a list")
    return addresses[0] if addresses else None


def _from_text(text: str, integer: bool) -> Any:
    """
    The number a string such as C{'465'} or C{'1.5'} writes (configs of
    the original often read them from the environment), or C{text} itself.
    """
    if not text.isascii():
        return text
    try:
        return int(text)
    except ValueError:
        pass
    if not integer:
        try:
            return float(text)
        except ValueError:
            pass
    return text


def _number(name: str, value: object, integer: bool, minimum: float,
            maximum: float = math.inf) -> Any:
    given = value
    if isinstance(value, str):
        value = _from_text(value, integer)
    kinds = (int,) if integer else (int, float)
    if (isinstance(value, bool) or not isinstance(value, kinds)
            or (isinstance(value, float) and not math.isfinite(value))):
        wanted = "a whole number" if integer else "a number"
        raise ConfigError(f"{name} must be {wanted}, not {_shown(given)}")
    if value < minimum:
        raise ConfigError(
            f"{name} must be at least {minimum}, not {_shown(given)}")
    if value > maximum:
        raise ConfigError(
            f"{name} must be at most {maximum}, not {_shown(given)}")
    return value


def _level_floor(name: str, value: object) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, str):
        named = level_named(value)
        if named is not None:
            return named
        value = _from_text(value, True)
    if (isinstance(value, int) and not isinstance(value, bool)
            and 0 <= value < len(SYSLOG_LEVELS)):
        return value
    raise ConfigError(f"{name} must be a syslog severity, 0 (emergency) to "
                      f"7 (debug), or its name such as 'warning', or None, "
                      f"not {_shown(value)}")


def _routes(name: str, value: object) -> tuple:
    try:
        return parse_rules(name, value, _addresses,
                           _seconds(_YEAR, zero_is_off=True))
    except BadRule as error:
        raise ConfigError(str(error)) from None


def _silences(name: str, value: object) -> tuple:
    try:
        return config_silences(name, value)
    except BadRule as error:
        raise ConfigError(str(error)) from None


def _count(maximum: int) -> Checker:
    """A checker of whole numbers from 1 to C{maximum}."""
    return partial(_number, integer=True, minimum=1, maximum=maximum)


def _optional_count(maximum: int) -> Checker:
    def check(name: str, value: object) -> Optional[int]:
        return None if value is None else _count(maximum)(name, value)
    return check


def _buffer_size(name: str, value: object) -> int:
    """A socket buffer size: the kernel takes a C int."""
    return _number(name, value, integer=True, minimum=1, maximum=2**31 - 1)


def _datagram_size(name: str, value: object) -> int:
    """
    The largest datagram read.  Up to the original's 65536 is taken, and
    read as UDP_MAX_PAYLOAD by L{_complete}.
    """
    value = _number(name, value, integer=True, minimum=1)
    if value > _ORIGINAL_MAX_SIZE:
        raise ConfigError(
            f"{name} must be at most {UDP_MAX_PAYLOAD}, the largest payload "
            f"UDP carries, not {_shown(value)}")
    return value


#: The shortest duration a setting takes: a timer due more often is a
#: mistake that would keep the daemon busy doing nothing else
#: (FLUSH_SECONDS = 1e-9 queued snapshots without end, and no digest
#: went out).
SHORTEST_SECONDS = 0.1


def _seconds(maximum: float, zero_is_off: bool = False) -> Checker:
    """
    A checker of durations from L{SHORTEST_SECONDS} (or 0, which turns
    the feature off) up to C{maximum} seconds, where a longer one is a
    mistake.
    """
    def check(name: str, value: object) -> float:
        value = _number(name, value, integer=False, minimum=0,
                        maximum=maximum)
        if value == 0 and zero_is_off:
            return value
        if value < SHORTEST_SECONDS:
            raise ConfigError(
                f"{name} must be at least {SHORTEST_SECONDS:g} seconds"
                f"{' (or 0, for off)' if zero_is_off else ''}, not "
                f"{_shown(value)}")
        return value
    return check


def _port_number(lowest: int) -> Checker:
    def check(name: str, value: object) -> int:
        value = _number(name, value, integer=True, minimum=-math.inf)
        if not lowest <= value <= 65535:
            raise ConfigError(f"{name} must be a port number "
                              f"({lowest}-65535), not {_shown(value)}")
        return value
    return check


#: A port to listen on: 0 asks the system for a free one.
_port = _port_number(0)


def _ipv4_address(name: str, host: str) -> str:
    """
    The address a host name stands for.  The original bound an IPv4 socket
    to UDP_BIND, so names such as 'localhost' worked, meaning IPv4.

    Blocking: a reload (L{failnozzle.service.FailnozzleService.reload})
    loads the settings on the reactor, which waits for the resolver.
    """
    try:
        return socket.gethostbyname(host)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{name}: {_shown(host)} is neither an IP address nor a host "
            f"name that resolves ({error})"
        ) from None


def _bind_address(name: str, value: object) -> tuple:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not isinstance(value[0], str)):
        raise ConfigError(
            f"{name} must be a (host, port) pair such as ('127.0.0.1', 1549), "
            f"not {_shown(value)}"
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
        raise ConfigError(f"{name} must be True or False, not {_shown(value)}")
    return value


def _tls_mode(name: str, value: object) -> Optional[str]:
    if value is None:
        return None
    if value not in TLS_MODES:
        choices = ", ".join(repr(mode) for mode in TLS_MODES)
        raise ConfigError(
            f"{name} must be one of {choices}, not {_shown(value)}")
    return value


def _existing_file(name: str, value: object) -> Optional[str]:
    path = _optional_path(name, value)
    if path is not None and not os.path.isfile(path):
        raise ConfigError(f"{name}: no such file {path!r}")
    return path


def _existing_dir(name: str, value: object) -> Optional[str]:
    path = _optional_path(name, value)
    if path is not None and not os.path.isdir(path):
        raise ConfigError(f"{name}: no such directory {path!r}")
    return path


def _kind(value: object) -> str:
    """What C{value} is, without what it says: C{'dict of str to int'}."""

    def kind(item: object) -> str:
        return ("empty str" if isinstance(item, str) and not item
                else _type_name(item))

    if isinstance(value, Mapping) and value:
        keys = "/".join(sorted({kind(key) for key in value}))
        values = "/".join(sorted({kind(item) for item in value.values()}))
        return f"{_type_name(value)} of {keys} to {values}"
    return kind(value)


class _Secret:
    """
    The checker of a secret setting: its error names the setting, what it
    must be and the type of the value given, never the value, so it may be
    shown and logged.
    """

    secret = True

    def __init__(self, check: Checker, wanted: str) -> None:
        self._check = check
        self._wanted = wanted

    def __call__(self, name: str, value: object) -> Any:
        try:
            return self._check(name, value)
        except ConfigError:
            raise ConfigError(
                f"{name} must be {self._wanted}; it is {_a(_kind(value))} "
                f"(its value is secret, so not shown)") from None


def _users(name: str, value: object) -> Optional[dict]:
    """User names and passwords."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value or not all(
            isinstance(text, str) and text and "\0" not in text
            for pair in value.items() for text in pair):
        raise ConfigError(name)
    return dict(value)


def _sentry_keys(name: str, value: object) -> Optional[dict]:
    """Public keys (as in a DSN) to the kind of the errors they send."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{name} must be a dict of public keys to kinds, "
                          f"such as {{'0123abcd': 'shop'}}, not "
                          f"{_shown(value)}")
    for key, kind in value.items():
        if not (isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,100}",
                                                      key)):
            raise ConfigError(f"{name}: {_shown(key)} is not a public key "
                              f"(letters and digits, as in a DSN)")
        if not isinstance(kind, str) or not kind.strip():
            raise ConfigError(f"{name}[{key!r}] must be a kind (a "
                              f"non-empty string), not {_shown(kind)}")
    return {key: one_line(kind) for key, kind in value.items()}


def _markers(name: str, value: object) -> tuple:
    if isinstance(value, str) or not isinstance(value, (list, tuple, set)):
        raise ConfigError(
            f"{name} must be a list of strings, not {_shown(value)}")
    if len(value) > _MAX_MARKERS:
        raise ConfigError(f"{name} holds {len(value)} markers; at most "
                          f"{_MAX_MARKERS}")
    for marker in value:
        if not isinstance(marker, str) or not marker:
            raise ConfigError(
                f"{name}: {_shown(marker)} is not a non-empty string")
    return tuple(value)


def _is_namedtuple_class(value: object) -> bool:
    return (isinstance(value, type) and issubclass(value, tuple)
            and hasattr(value, "_fields"))


def _unique_tuple(name: str, value: object) -> type:
    """A namedtuple class, as the original wanted, or a list of field names."""
    if _is_namedtuple_class(value):
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
            f"not {_shown(value)}"
        )
    if not fields:
        raise ConfigError(f"{name} must name at least one field")
    return value


def _callable(name: str, value: object) -> Optional[Callable]:
    if value is not None and not callable(value):
        raise ConfigError(f"{name} must be a function, not {_shown(value)}")
    return value


def _grouping(name: str, value: object) -> str:
    if value not in ("default", "exact"):
        raise ConfigError(f"{name} must be 'default' or 'exact', not "
                          f"{_shown(value)}")
    return value


#: GROUPING_RULES: more would make every new report slow to fingerprint.
_MAX_GROUPING_RULES = 100


def _grouping_rules(name: str, value: object) -> tuple:
    """A list of (regular expression, replacement) pairs, each compiled."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name} must be a list of (regular expression, "
                          f"replacement) pairs, not {_shown(value)}")
    if len(value) > _MAX_GROUPING_RULES:
        raise ConfigError(f"{name} holds {len(value)} rules; at most "
                          f"{_MAX_GROUPING_RULES}")
    rules = []
    for number, rule in enumerate(value, 1):
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2
                and all(isinstance(part, str) for part in rule)):
            raise ConfigError(f"{name}: rule {number}, {_shown(rule)}, is "
                              f"not a (regular expression, replacement) "
                              f"pair of strings")
        try:
            _check_replacement(re.compile(rule[0]), rule[1])
        except (re.error, IndexError) as error:
            raise ConfigError(f"{name}: rule {number}, {_shown(rule[0])}: "
                              f"{error}") from None
        rules.append(tuple(rule))
    return tuple(rules)


def _check_replacement(pattern: re.Pattern, replacement: str) -> None:
    """
    Raise re.error if C{replacement} refers to a group C{pattern} lacks,
    as re.sub would only once the pattern matches: expanded on a match of
    empty groups numbered and named as the pattern's.
    """
    names = {number: name for name, number in pattern.groupindex.items()}
    probe = "".join(f"(?P<{names[number]}>)" if number in names else "()"
                    for number in range(1, pattern.groups + 1))
    re.compile(probe).match("").expand(replacement)


def _log_level(name: str, value: object) -> Any:
    if (isinstance(value, int) and not isinstance(value, bool)
            and 0 <= value <= 1000):
        return value
    if isinstance(value, str) and isinstance(
            logging.getLevelName(value.upper()), int):
        return value
    raise ConfigError(f"{name} must be a logging level (a name such as "
                      f"'INFO', or a number from 0 to 1000), not "
                      f"{_shown(value)}")


# The maxima are far above any sensible value; past them a value is a
# mistake that would only show later (a digest no server takes, memory
# for a million sources per error, a timer of centuries).
_CHECKS: Mapping[str, Checker] = {
    "UDP_BIND": _bind_address,
    "GELF_BIND": _optional_bind_address,
    "UDP_RCVBUF": _buffer_size,
    "INCOMING_MESSAGE_MAX_SIZE": _datagram_size,
    "MAX_FIELD_CHARS": _count(100_000),
    "MAX_EXC_TEXT_CHARS": _count(1_000_000),
    "MAX_SOURCES_PER_ERROR": _count(10_000),
    "HTTP_BIND": _optional_bind_address,
    "HTTP_TOKEN": _Secret(_token, "16 to 1,000 printable ASCII characters "
                                  "without spaces"),
    "HTTP_ERRORS_TOKEN": _Secret(_token, "16 to 1,000 printable ASCII "
                                         "characters without spaces"),
    "SENTRY_KEYS": _sentry_keys,
    "SENTRY_EVENTS_PER_SECOND": partial(_number, integer=False, minimum=1,
                                        maximum=1_000_000),
    "SMTP_INGEST_BIND": _optional_bind_address,
    "SMTP_INGEST_MAX_BYTES": _count(100 * 1024 * 1024),
    "SMTP_INGEST_MAX_CONNECTIONS": _count(10_000),
    "SMTP_INGEST_MAX_RECIPIENTS": _count(10_000),
    "SMTP_INGEST_USERS": _Secret(
        _users, "a dict of user names to passwords, all non-empty strings "
                "without NUL, such as {'django': 'drink canada pony'}"),
    "SMTP_INGEST_TLS_CERT": _existing_file,
    "SMTP_INGEST_TLS_KEY": _existing_file,
    "SMTP_HOST": _host,
    "SMTP_PORT": _port_number(1),
    "SMTP_USER": _login,
    "SMTP_PASSWORD": _Secret(_login, "a string without NUL, CR or LF"),
    "SMTP_TLS": _tls_mode,
    "SMTP_TLS_VERIFY": _boolean,
    "SMTP_CA_FILE": _existing_file,
    "SMTP_TIMEOUT": _seconds(_HOUR),
    "MAILDIR": _path,
    "SPOOL_DIR": _path,
    "RETRY_MIN_SECONDS": _seconds(_DAY),
    "RETRY_MAX_SECONDS": _seconds(_WEEK),
    "SPOOL_LIFETIME_SECONDS": _seconds(_YEAR),
    "STATE_FILE": _path,
    "SNAPSHOT_SECONDS": _seconds(_DAY, zero_is_off=True),
    "SHUTDOWN_TIMEOUT_SECONDS": _seconds(_HOUR),
    "CLUSTER_URL": _Secret(_cluster_url, "a redis://, rediss:// or unix:// "
                           "URL, such as 'redis://redis.example.com:6379/0'"),
    "CLUSTER_NAME": _cluster_name,
    "CLUSTER_LEASE_SECONDS": partial(_number, integer=False, minimum=3,
                                     maximum=_HOUR),
    "CLUSTER_GRACE_SECONDS": _seconds(_DAY, zero_is_off=True),
    "REPORT_FROM": _optional_address,
    "REPORT_TO": _addresses,
    "REPLY_TO": _addresses,
    "JUST_MONITORING_REPORT_TO": _addresses,
    "MONITORING_ERROR_MARKERS": _markers,
    "ROUTES": _routes,
    "SILENCES": _silences,
    "PAGER_FROM": _optional_address,
    "PAGER_TO": _addresses,
    "PAGER_REPLY_TO": _addresses,
    "FLUSH_SECONDS": _seconds(_WEEK),
    "PAGER_WINDOW_SIZE": _count(10_000),
    # sys.maxsize is how some configs of the original turned paging off.
    "PAGER_LIMIT": _count(2**63 - 1),
    "PAGER_REPEAT_SECONDS": _seconds(_YEAR, zero_is_off=True),
    "CANARY_MAX_SILENCE_SECONDS": _seconds(_YEAR, zero_is_off=True),
    "MAX_UNIQUE_MESSAGES": _count(1_000_000),
    "DIGEST_MAX_DETAILS": _optional_count(1_000_000),
    # Below 10 kB the headers and a summary line may not fit.
    "DIGEST_MAX_BYTES": partial(_number, integer=True, minimum=10_000,
                                maximum=100_000_000),
    "UNIQUE_MSG_TUPLE": _unique_tuple,
    "SOURCE_FIELD_NAME": _string,
    "GELF_DEFAULT_KIND": _string,
    "EMAIL_TEMPLATE_DIR": _existing_dir,
    "EMAIL_BODY_TEMPLATE": _path,
    "EMAIL_SUBJECT_TEMPLATE": _path,
    "INTERNAL_ERROR_FUNC": _callable,
    "GROUPING": _grouping,
    "MIN_LEVEL": _level_floor,
    "GELF_MIN_LEVEL": _level_floor,
    "GROUPING_RULES": _grouping_rules,
    "FINGERPRINT_FUNC": _callable,
    "SEEN_MAX": _count(1_000_000),
    "SEEN_DAYS": partial(_number, integer=False, minimum=0, maximum=3650),
    "REGRESSION_DAYS": partial(_number, integer=False, minimum=0,
                               maximum=3650),
    "REPEAT_SECONDS": _seconds(_YEAR, zero_is_off=True),
    "RISE_FACTOR": partial(_number, integer=False, minimum=1,
                           maximum=1_000_000),
    "GROUP_WAIT_SECONDS": _seconds(_DAY, zero_is_off=True),
    "SERVER_NAME": _server_name,
    "LOG_LEVEL": _log_level,
    "LOG_FORMAT": _string,
}
assert set(_CHECKS) == SETTING_NAMES, "every setting needs a checker"

#: The settings whose values are never shown (their checkers say so).
SECRET_SETTINGS = frozenset(
    name for name, check in _CHECKS.items() if getattr(check, "secret", False))


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


def read_config_file(path: str) -> tuple:
    """
    Run a config file and return the settings it defines, with their
    values.  Settings it imports (C{from site_defaults import *}) count, as
    they did for the original; other UPPER_CASE names it imports (C{from
    logging import DEBUG}) are no settings, and one it assigns (C{BASE_DIR},
    a namedtuple C{MSG}) is ignored with a notice, which says which
    setting it may be a typo of.

    @return: C{(values, notices)}: a dict of setting (or legacy) names to
        values, and a list of lines worth logging.
    @raise ConfigError: the file is missing, or does not run.
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
            f"config file {path!r}{where}: {one_line(str(error.msg))}"
        ) from None
    except ValueError as error:
        # Python 3.10 and older say "source code string cannot contain
        # null bytes" this way rather than as a SyntaxError.
        raise ConfigError(f"config file {path!r}: {error}") from None

    # Any file name will do (site.py, failnozzle.conf), as with the
    # original's imp.load_source.
    module = types.ModuleType("failnozzle_config")
    module.__file__ = path
    before = set(sys.modules)
    try:
        exec(compile(tree, path, "exec"), module.__dict__)
    except (Exception, SystemExit, KeyboardInterrupt) as error:
        # SystemExit too: a config calling sys.exit() would end start-up
        # with status 0 and nothing said, and a reload with a traceback.
        lines = [frame.lineno for frame in traceback.extract_tb(
            error.__traceback__) if frame.filename == path]
        where = f" line {lines[-1]}" if lines else ""
        raise ConfigError(
            f"config file {path!r}{where}: "
            f"{type(error).__name__}: {one_line(str(error))}"
        ) from None
    finally:
        _forget_own_modules(set(sys.modules) - before)

    collector = _ModuleNames()
    collector.visit(tree)
    values = {}
    notices = []
    for name, value in module.__dict__.items():
        if not _SETTING_NAME.fullmatch(name):
            continue
        if name in SETTING_NAMES or name in LEGACY_NAMES:
            values[name] = value
        elif name in collector.names:
            notices.append(f"config file {path!r}: {name} is not a setting "
                           f"and is ignored" + _suggestion(name))
    return values, notices


def _forget_own_modules(names: set) -> None:
    """
    Forget the modules of the site's own that a config file imported
    (C{from common_settings import *}), so that reading it again, as a
    reload does, reads them again; installed packages stay imported.
    """
    installed = tuple(os.path.realpath(path) + os.sep for path in {
        sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib",
                                               "purelib", "platlib")})
    for name in names:
        if name == "failnozzle" or name.startswith("failnozzle."):
            continue
        where = getattr(sys.modules.get(name), "__file__", None)
        if where and not os.path.realpath(where).startswith(installed):
            del sys.modules[name]


def _suggestion(name: str) -> str:
    close = difflib.get_close_matches(name, sorted(SETTING_NAMES), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


@dataclass(frozen=True)
class Checked:
    """
    What checking a configuration found.

    @ivar settings: the settings, or None if the config file could not be
        read or run.  A setting in C{refused} has its default here: good
        for checking further (templates, certificates), not to run with.
    @ivar problems: one line each: the settings' own, then those between
        settings.
    @ivar notices: lines worth logging at start-up.
    @ivar refused: the settings named by C{problems}.
    """

    settings: Optional[Settings]
    problems: tuple
    notices: tuple
    refused: frozenset = frozenset()


def check_settings(path: Optional[str] = None,
                   overrides: Optional[Mapping[str, Any]] = None) -> Checked:
    """
    Check the defaults, an optional config file and command-line overrides
    (in that order of precedence), finding every problem, not only the
    first.
    """
    raw: dict = {}
    notices: list = []
    if path is not None:
        try:
            raw, notices = read_config_file(path)
        except ConfigError as error:
            return Checked(None, (str(error),), ())
    overrides = overrides or {}
    checked: dict = {}
    problems: list = []
    refused: set = set()

    def check(name: str, written: str, value: object) -> None:
        try:
            checked[name] = _CHECKS[name](written, value)
        except ConfigError as error:
            problems.append(str(error))
            refused.add(name)

    for legacy, current in LEGACY_NAMES.items():
        if legacy in raw:
            value = raw.pop(legacy)
            # Its default does not count: "from failnozzle.settings import
            # *" gives every name, the original's module did not.
            if current in raw and not _is_default(current, raw[current]):
                notices.append(f"{legacy} is ignored: {current} is set too")
            else:
                # Checked under the name the file uses, so an error names it.
                raw.pop(current, None)
                check(current, legacy, value)
                notices.append(f"{legacy} is read as {current}; "
                               f"please rename it")
    for name, value in {**raw, **overrides}.items():
        if name in SETTING_NAMES:
            check(name, name, value)
        else:
            problems.append(f"unknown setting {name}" + _suggestion(name))
    # Imported from failnozzle.settings, UDP_BIND is the default itself.
    default_bind = default_value("UDP_BIND")
    if ("UDP_BIND" not in overrides
            and raw.get("UDP_BIND", default_bind) is default_bind):
        notices.append(_udp_bind_notice(path))
    settings = _complete(Settings(**checked), notices, problems, refused)
    return Checked(settings, tuple(problems), tuple(notices),
                   frozenset(refused))


def _is_default(name: str, value: object) -> bool:
    """Whether C{value} is setting C{name}'s default, as
    L{failnozzle.settings} gives it (a list where the default is a
    tuple)."""
    default = default_value(name)
    return value == default or (type(value) is list
                                and tuple(value) == default)


def _udp_bind_notice(path: Optional[str]) -> str:
    """
    Said when UDP_BIND is the default, which differs from the original's
    (every interface): a config written for it listens on loopback only.
    """
    host, port = default_value("UDP_BIND")
    where = f" in config file {path!r}" if path is not None else ""
    return (f"UDP_BIND is not set{where}: listening on {host}:{port}, so "
            f"only this machine can send errors (the original failnozzle "
            f"listened on every interface: set UDP_BIND = ('0.0.0.0', "
            f"{port}) for that)")


def load_settings(
    path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None
) -> tuple:
    """
    Build the settings from the defaults, an optional config file and
    command-line overrides, in that order.

    @return: C{(settings, notices)}: the checked L{Settings}, and lines worth
        logging at start-up (legacy names, risky choices).
    @raise ConfigError: the first problem L{check_settings} finds.
    """
    checked = check_settings(path, overrides)
    if checked.problems:
        raise ConfigError(checked.problems[0])
    return checked.settings, list(checked.notices)


def _complete(settings: Settings, notices: list, problems: list,
              refused: set) -> Settings:
    """
    Check settings that depend on each other; fill in derived values.  A
    check involving a setting already C{refused} is skipped: its problem
    is told once.
    """
    changes: dict = {}

    def problem(text: str, *names: str) -> None:
        if refused.isdisjoint(names):
            problems.append(text)

    if settings.smtp_enabled:
        for name in ("REPORT_FROM", "REPORT_TO"):
            if not getattr(settings, name):
                problem(f"{name} is required when SMTP_HOST is set", name)
    else:
        # Maildir mode: the digests only need well-formed headers.
        changes["REPORT_FROM"] = settings.REPORT_FROM or "failnozzle@localhost"
        changes["REPORT_TO"] = settings.REPORT_TO or ("failnozzle@localhost",)
    for pair in (("SMTP_USER", "SMTP_PASSWORD"),
                 ("SMTP_INGEST_TLS_CERT", "SMTP_INGEST_TLS_KEY")):
        missing = _missing_partner(settings, *pair)
        if missing is not None:
            problem(missing, *pair)
    if (settings.HTTP_BIND is not None and settings.HTTP_TOKEN is None
            and not ipaddress.ip_address(settings.HTTP_BIND[0]).is_loopback):
        problem(f"HTTP_BIND {settings.HTTP_BIND[0]} is not a loopback "
                f"address, so HTTP_TOKEN is required (status, metrics and "
                f"control are open to loopback only)", "HTTP_BIND",
                "HTTP_TOKEN")
    for setting, rules in (("ROUTES", settings.ROUTES), ("SILENCES", [
            silence.rule for silence in settings.SILENCES])):
        for rule, field_name in unknown_fields(rules,
                                               settings.unique_fields):
            problem(f"{setting} rule {rule!r} matches on {field_name!r}, "
                    f"which is not in UNIQUE_MSG_TUPLE (nor source, level, "
                    f"fingerprint)", setting, "UNIQUE_MSG_TUPLE")
    if settings.RETRY_MAX_SECONDS < settings.RETRY_MIN_SECONDS:
        problem("RETRY_MAX_SECONDS must not be less than RETRY_MIN_SECONDS",
                "RETRY_MIN_SECONDS", "RETRY_MAX_SECONDS")
    if settings.INCOMING_MESSAGE_MAX_SIZE > UDP_MAX_PAYLOAD:
        changes["INCOMING_MESSAGE_MAX_SIZE"] = UDP_MAX_PAYLOAD
        notices.append(f"INCOMING_MESSAGE_MAX_SIZE = "
                       f"{settings.INCOMING_MESSAGE_MAX_SIZE} is read as "
                       f"{UDP_MAX_PAYLOAD}, the largest payload UDP carries")
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


def _missing_partner(settings: Settings, first: str,
                     second: str) -> Optional[str]:
    """
    The problem, if one of two settings that go together is set without
    the other.
    """
    if bool(getattr(settings, first)) == bool(getattr(settings, second)):
        return None
    given, missing = (first, second)
    if not getattr(settings, first):
        given, missing = missing, given
    return f"{missing} is required when {given} is set"


def changed_settings(old: Settings, new: Settings) -> set:
    """
    The names of the settings whose values differ, as a reload sees them:
    a namedtuple class made again with the same fields, or a function
    defined again with the same code, is no change.
    """
    return {name for name in SETTING_NAMES
            if not _same(getattr(old, name), getattr(new, name))}


def _same(old: object, new: object) -> bool:
    if _is_namedtuple_class(old) and _is_namedtuple_class(new):
        return old._fields == new._fields
    if isinstance(old, types.FunctionType) and isinstance(
            new, types.FunctionType):
        return (old.__code__ == new.__code__
                and old.__defaults__ == new.__defaults__
                and old.__kwdefaults__ == new.__kwdefaults__)
    return old is new or old == new


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
