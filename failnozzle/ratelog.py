"""
Warnings at a limited rate, so that a flood of bad input or a hostile
client costs a few log lines, not one a datagram or a command.
"""
from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger


@dataclass
class _Window:
    """The warnings of one kind held back since one was logged."""

    held_back: int
    closing: IDelayedCall


class RateLimitedLog:
    """
    Logs the first warning of a kind, then holds back the others of that
    kind for C{interval} seconds and says how many there were when it
    ends: at most two lines per kind and interval.
    """

    def __init__(self, log: Logger, clock: IReactorTime,
                 interval: float = 60.0) -> None:
        """
        @param log: where the lines go (its namespace says who warns).
        """
        self._log = log
        self._clock = clock
        self._interval = interval
        self._windows: dict = {}

    def warn(self, kind: str, text: str, **fields: object) -> None:
        """
        Log C{text} (a format of C{fields}), unless a warning of C{kind}
        was logged less than an interval ago: then only count it.

        @param kind: what the warning is about, as the line that counts
            those held back says it.
        """
        window = self._windows.get(kind)
        if window is not None:
            window.held_back += 1
            return
        self._log.warn(text, **fields)
        self._windows[kind] = _Window(
            0, self._clock.callLater(self._interval, self._close, kind))

    def _close(self, kind: str) -> None:
        window = self._windows.pop(kind)
        if window.held_back:
            self._log.warn("{held_back} more not logged in the last "
                           "{seconds:g} s: {kind}",
                           held_back=window.held_back,
                           seconds=self._interval, kind=kind)

    def stop(self) -> None:
        """Say now what is held back, and leave no timer behind."""
        for kind, window in list(self._windows.items()):
            window.closing.cancel()
            self._close(kind)
