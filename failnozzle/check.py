"""
What C{twistd failnozzle --check} and C{--version} answer on the command
line, before any daemon starts (nothing logs yet, so they print): every
problem start-up would find, or the version.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Mapping, Optional

from failnozzle import __version__
from failnozzle.config import ConfigError, Settings, check_settings
from failnozzle.mailin import tls_options
from failnozzle.service import make_renderer, make_transport


def print_version() -> int:
    """Print failnozzle's version; the exit status, 0."""
    print(f"failnozzle {__version__}")
    return 0


def check_config(path: Optional[str],
                 overrides: Optional[Mapping[str, Any]] = None) -> tuple:
    """
    Find every problem start-up would find, without binding, creating or
    sending anything: each setting's, those between settings, then what
    building the service refuses (templates, TLS files).

    @return: C{(problems, notices)}, lists of lines.
    """
    checked = check_settings(path, overrides)
    problems = list(checked.problems)
    if checked.settings is not None:
        for needs, check in _startup_checks(checked.settings):
            if checked.refused.isdisjoint(needs):
                try:
                    check()
                except ConfigError as error:
                    problems.append(str(error))
    return problems, list(checked.notices)


def _startup_checks(settings: Settings) -> list:
    """
    What building the service reads and may refuse, as pairs of the
    settings it reads (not checked again if one of them is refused
    already) and a call that raises L{ConfigError}.
    """
    checks = [(("UNIQUE_MSG_TUPLE", "EMAIL_TEMPLATE_DIR",
                "EMAIL_SUBJECT_TEMPLATE", "EMAIL_BODY_TEMPLATE"),
               partial(make_renderer, settings))]
    if settings.smtp_enabled:
        # The transport keeps the reactor for later; nothing connects.
        checks.append((("SMTP_HOST", "SMTP_CA_FILE"),
                       partial(make_transport, settings, None)))
    # As the service reads them: only with SMTP_INGEST_BIND.
    if (settings.SMTP_INGEST_BIND and settings.SMTP_INGEST_TLS_CERT
            and settings.SMTP_INGEST_TLS_KEY):
        checks.append((("SMTP_INGEST_TLS_CERT", "SMTP_INGEST_TLS_KEY"),
                       partial(tls_options, settings.SMTP_INGEST_TLS_CERT,
                               settings.SMTP_INGEST_TLS_KEY)))
    return checks


def report_check(path: Optional[str],
                 overrides: Optional[Mapping[str, Any]] = None) -> int:
    """
    Print what L{check_config} finds, one line each: the problems, then
    the notices, or that all is valid.

    @return: the exit status: 1 if there is a problem, else 0.
    """
    problems, notices = check_config(path, overrides)
    for problem in problems:
        print(f"failnozzle: {problem}")
    for notice in notices:
        print(f"failnozzle: notice: {notice}")
    if problems:
        return 1
    where = f"config file {path!r}" if path is not None else "no config file"
    print(f"failnozzle: the settings are valid ({where})")
    return 0
