"""
Turning a L{Batch} into words: the subject and body of a digest (Jinja2
templates, overridable as in the original), the pager alert, and the email
message that carries them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, make_msgid
from typing import Optional, Sequence

from jinja2 import (ChoiceLoader, Environment, FileSystemLoader, TemplateError,
                    TemplateNotFound)
from twisted.logger import Logger

from failnozzle.aggregate import Batch
from failnozzle.config import ConfigError
from failnozzle.gelf import SYSLOG_LEVELS

_log = Logger()

DEFAULT_TEMPLATE_DIR = os.path.join(os.path.dirname(__file__), "templates")


def utc(seconds: float) -> datetime:
    """A reactor timestamp as an aware UTC datetime."""
    return datetime.fromtimestamp(seconds, timezone.utc)


def _format_utc(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class Occurrences:
    """
    How often and where one unique error happened: the C{info} of the
    original's templates.
    """

    total: int
    first_seen: datetime
    last_seen: datetime
    sources_sorted: list
    #: The most severe syslog level seen (GELF sends one), or None.
    level: Optional[int] = None

    @property
    def level_name(self) -> Optional[str]:
        """The level as syslog names it ("error" for 3)."""
        return None if self.level is None else SYSLOG_LEVELS[self.level]


def _environment(loader) -> Environment:
    environment = Environment(loader=loader, autoescape=False)
    environment.filters["utc"] = _format_utc
    return environment


class DigestRenderer:
    """
    Renders digests with the configured templates, falling back to the
    built-in ones if a custom template fails on some batch, so a template
    bug costs a pretty digest, never the digest.
    """

    def __init__(
        self,
        unique_tuple: type,
        server_name: str,
        max_unique: int,
        template_dir: Optional[str] = None,
        subject_template: str = "subject-template.txt",
        body_template: str = "body-template.txt",
        max_details: int = 100,
    ) -> None:
        """
        @param max_details: how many errors the templates see in full
            (DIGEST_MAX_DETAILS); the rest are only counted, which keeps a
            digest of thousands of unique errors readable and quick to
            build.
        @raise ConfigError: a template cannot be found or does not compile.
        """
        self._unique_tuple = unique_tuple
        self._server_name = server_name
        self._max_unique = max_unique
        self._max_details = max_details
        fields = unique_tuple._fields
        self._kind_index = fields.index("kind") if "kind" in fields else None
        default_loader = FileSystemLoader(DEFAULT_TEMPLATE_DIR)
        loader = default_loader
        if template_dir is not None:
            loader = ChoiceLoader([FileSystemLoader(template_dir),
                                   default_loader])
        environment = _environment(loader)
        self._templates = (
            _load(environment, "EMAIL_SUBJECT_TEMPLATE", subject_template),
            _load(environment, "EMAIL_BODY_TEMPLATE", body_template),
        )
        builtin = _environment(default_loader)
        self._builtin_templates = (
            builtin.get_template("subject-template.txt"),
            builtin.get_template("body-template.txt"),
        )

    def context(self, batch: Batch) -> dict:
        """The names the templates see (those of the original, and more)."""
        shown = batch.entries[:self._max_details]
        hidden = batch.entries[self._max_details:]
        sorted_counts = [
            (
                self._unique_tuple._make(entry.key),
                Occurrences(
                    entry.total,
                    utc(entry.first_seen),
                    utc(entry.last_seen),
                    sorted(entry.sources.items(),
                           key=lambda item: str(item[0])),
                    entry.level,
                ),
            )
            for entry in shown
        ]
        kinds = ({entry.key[self._kind_index] for entry in batch.entries}
                 if self._kind_index is not None else set())
        return {
            "server_name": self._server_name,
            "total": batch.total,
            "total_unique": len(batch.entries),
            "sorted_counts": sorted_counts,
            "kinds": sorted(str(kind) for kind in kinds if kind is not None),
            "overflow": batch.overflow,
            "max_unique": self._max_unique,
            "not_listed_unique": len(hidden),
            "not_listed_total": sum(entry.total for entry in hidden),
            "max_details": self._max_details,
        }

    def render(self, batch: Batch) -> tuple:
        """
        @return: C{(subject, body)}; the subject is one line.
        """
        context = self.context(batch)
        try:
            subject, body = (t.render(context) for t in self._templates)
        except Exception:
            _log.failure("A custom digest template failed; this digest uses "
                         "the built-in templates")
            subject, body = (t.render(context) for t in
                             self._builtin_templates)
        if not body.endswith("\n"):
            body += "\n"
        return " ".join(subject.split()), body


def _load(environment: Environment, setting: str, name: str):
    try:
        return environment.get_template(name)
    except TemplateNotFound:
        raise ConfigError(f"{setting}: template {name!r} not found") from None
    except (OSError, UnicodeDecodeError) as error:
        # Unreadable, or not UTF-8 (a Latin-1 template of the original's
        # days): Jinja2 lets these through.
        raise ConfigError(f"{setting}: cannot read template {name!r}: "
                          f"{getattr(error, 'strerror', None) or error}"
                          ) from None
    except TemplateError as error:
        line = getattr(error, "lineno", None)
        where = f" line {line}" if line else ""
        raise ConfigError(f"{setting}: template {name!r}{where}: "
                          f"{error}") from None


def pager_alert(server_name: str, total: int, window_size: int,
                flush_seconds: float) -> tuple:
    """The subject and body of a pager alert, worded as the original's."""
    return (
        f"{server_name} error rate exceeded",
        f"Danger: received {total} errors within the alert window "
        f"(the last {window_size} flushes of {flush_seconds:g} s).\n",
    )


def build_message(
    *,
    sender: str,
    recipients: Sequence[str],
    subject: str,
    body: str,
    date: float,
    domain: str,
    reply_to: Sequence[str] = (),
    kind: str = "digest",
) -> EmailMessage:
    """
    A well-formed UTF-8 text/plain message.

    @param date: the reactor time the message is made at.
    @param domain: the right-hand side of the Message-ID (SERVER_NAME).
    @param kind: says what the message is in an X-Failnozzle header, for
        mail filters: digest, monitoring or pager.
    """
    message = EmailMessage(policy=SMTP)
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    if reply_to:
        message["Reply-To"] = ", ".join(reply_to)
    message["Subject"] = _encodable(subject)
    message["Date"] = formatdate(date, usegmt=True)
    message["Message-ID"] = make_msgid(domain=domain)
    message["X-Failnozzle"] = kind
    body = _encodable(body)
    message.set_content(body, charset="utf-8", cte=_transfer_encoding(body))
    return message


def _encodable(text: str) -> str:
    """
    The text with what UTF-8 cannot encode (lone surrogates, which JSON's
    "\\udcff" escapes give) replaced, so one odd error report cannot keep
    a whole digest from being sent.
    """
    return text.encode("utf-8", "replace").decode("utf-8")


def _transfer_encoding(body: str) -> str:
    """
    Plain text stays readable as it is (7bit) whenever SMTP allows it:
    ASCII with no line over 998 characters.
    """
    if body.isascii() and all(len(line) <= 998 for line in body.splitlines()):
        return "7bit"
    return "quoted-printable"
