"""
The service's periodic work (flush, snapshot, cluster tick) as child
services: a L{TimerService} whose first call is one step after its start
unless asked otherwise, and which says when its next call is due.

A plain TimerService calls at once when it starts: a flush at start-up
would send what the last run counted before its period was over, and a
reload changing FLUSH_SECONDS would flush at once.
"""
from __future__ import annotations

from typing import Callable, Optional

from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall


class Timer(TimerService):
    """
    Calls C{call} every C{step} seconds of C{clock}'s time while running.

    @ivar at_start: whether it calls at once when it starts.
    """

    def __init__(self, step: float, call: Callable[[], None],
                 clock: IReactorTime, at_start: bool = False) -> None:
        super().__init__(step, call)
        self.clock = clock
        self.at_start = at_start

    def startService(self, now: Optional[bool] = None) -> None:
        """
        Start calling; at once if C{now} (by default: if L{at_start}).
        """
        # TimerService's own, but for its first call.
        Service.startService(self)
        self._loop = LoopingCall(self.call[0])
        self._loop.clock = self.clock
        self._loopFinished = self._loop.start(
            self.step, now=self.at_start if now is None else now)
        self._loopFinished.addErrback(self._failed)

    def restart(self, step: float, now: bool = False) -> None:
        """Begin anew, every C{step} seconds from now (at once if
        C{now}): for a reload that changed the period, or a flush that
        cannot wait for the next."""
        if self.running:
            # The loop alone: a stop's callback, run once a call under way
            # returns, would mark the new loop not running.
            self._loop.stop()
        self.step = step
        self.startService(now)

    @property
    def due(self) -> Optional[float]:
        """When the next call is (C{clock}'s time), if running."""
        call = self._loop.call if self.running else None
        return call.getTime() if call is not None and call.active() else None
