"""
The one disk writer: every blocking write failnozzle makes while running
(spooling, removing and setting aside messages, maildir deliveries,
snapshots) runs in one dedicated thread, in the order it was asked for, so
an fsync never holds the reactor and two writes never race.  (A Sentry or
HTTP answer's small snapshot is the exception: the reactor copies it into
the page cache, see L{failnozzle.slots}.)
"""
from __future__ import annotations

from typing import Callable, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.python.threadpool import ThreadPool

_R = TypeVar("_R")


class Writer(Protocol):
    """What the outbox and the state file write with."""

    def run(self, function: Callable[..., _R], *args) -> defer.Deferred:
        """
        Call C{function(*args)} after every write asked for before it.

        @return: a Deferred firing with its result, or failing with what it
            raised.
        """


class DiskWriter(Service):
    """
    Runs writes in one thread of its own, one after the other, while the
    service runs.  A write asked for before it starts waits for it; one
    asked for after it stopped runs at once in the caller's thread, so
    nothing asked for is dropped.  If it is never stopped, the thread ends
    when the reactor shuts down (it would keep the process alive otherwise).
    """

    def __init__(self, reactor: IReactorCore | IReactorFromThreads) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(1, 1, name="failnozzle-writer")
        self._stopped = False

    def startService(self) -> None:
        super().startService()
        self._pool.start()
        self._reactor.addSystemEventTrigger("during", "shutdown", self._end)

    def run(self, function: Callable[..., _R], *args) -> defer.Deferred:
        if self._stopped:
            return defer.maybeDeferred(function, *args)
        return threads.deferToThreadPool(self._reactor, self._pool,
                                         function, *args)

    def stopService(self) -> defer.Deferred:
        """
        Let the writes asked for so far finish, then end the thread.

        @return: a Deferred firing once they are done.
        """
        super().stopService()
        if not self._stopped and not self._pool.started:
            # Never started: the writes queued still have to run.
            self._pool.start()
        # Queued last, so it runs once the others are done; the thread is
        # then idle and joining it costs nothing.
        return self.run(lambda: None).addCallback(lambda _: self._end())

    def _end(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._pool.stop()


class InlineWriter(Service):
    """
    Runs each write at once, in the caller's thread: for tests driven by a
    fake clock, and wherever blocking the caller is fine.
    """

    def run(self, function: Callable[..., _R], *args) -> defer.Deferred:
        return defer.maybeDeferred(function, *args)
