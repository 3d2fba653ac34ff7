"""
The default settings as module names, as the original failnozzle had them
in C{failnozzle.settings}, so that a config written for it keeps working:
C{from failnozzle.settings import *} means "the defaults", and
C{settings.MONITORING_ERROR_MARKERS + [...]} extends them.

The values are those of L{failnozzle.config.Settings}, looked up when read.
A list of values (recipients, markers) comes as a new list each time, as
the original's MONITORING_ERROR_MARKERS was a list: a config that changes
one in place changes its own copy, not what the next config, or the same
one read again on a reload, starts from.
"""
from __future__ import annotations

from failnozzle.config import SETTING_NAMES, default_value

__all__ = sorted(SETTING_NAMES)


def __getattr__(name: str) -> object:
    if name not in SETTING_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = default_value(name)
    if isinstance(value, tuple) and not name.endswith("_BIND"):
        return list(value)
    return value


def __dir__() -> list:
    return sorted(set(globals()) | SETTING_NAMES)
