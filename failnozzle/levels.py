"""
Severities.  failnozzle keeps a record's level as a syslog severity (0
emergency ... 7 debug), whatever it was sent as: a GELF level is one, a
Sentry level or a C{logging} record's C{levelno}/C{levelname} is mapped.
MIN_LEVEL and GELF_MIN_LEVEL name the least severe level that is still an
error: a record less severe is counted as such, and neither digested nor
paged.  A record without a level is always an error, as in the original.
"""
from __future__ import annotations

from typing import Optional

#: Syslog's severities, by number.
SYSLOG_LEVELS = ("emergency", "alert", "critical", "error", "warning",
                 "notice", "informational", "debug")

#: Every name a level goes by (syslog's, their short forms, Python
#: logging's, Sentry's), lower case, as a syslog severity.
LEVEL_NAMES = {
    **{name: number for number, name in enumerate(SYSLOG_LEVELS)},
    "emerg": 0, "panic": 0, "crit": 2, "fatal": 2, "err": 3, "warn": 4,
    "info": 6, "log": 6,
}

#: Python logging's own levels as syslog severities; another number goes
#: to the nearest of them below it (a custom level 25 is informational).
_LOGGING_LEVELS = ((50, 2), (40, 3), (30, 4), (20, 6))


def level_named(name: str) -> Optional[int]:
    """The syslog severity a level name stands for, or None."""
    return LEVEL_NAMES.get(name.strip().lower())


def logging_level(record: dict) -> Optional[int]:
    """
    The syslog severity of a C{logging} record made into JSON: from its
    C{levelno}, else its C{levelname}; None if it says neither.
    """
    number = record.get("levelno")
    if type(number) is int:
        for least, severity in _LOGGING_LEVELS:
            if number >= least:
                return severity
        return 7
    name = record.get("levelname")
    return level_named(name) if type(name) is str else None


def stricter(first: Optional[int], second: Optional[int]) -> Optional[int]:
    """Of two floors (None: none), the one that lets fewer records in."""
    if first is None or second is None:
        return second if first is None else first
    return min(first, second)
