"""
Long work done on the reactor in short steps.

Making a digest is tens of milliseconds of pure Python for a large one.  In
a thread it would hold the GIL against the reactor, which gives it up at
every C{recvfrom}: each datagram read then waits out the interpreter's
switch interval (5 ms), so the receiver all but stops while the thread
works and the socket overflows.  Written as a generator that yields
between pieces of work instead, it runs on the reactor itself, a slice at
a time, with datagrams read in between.
"""
from __future__ import annotations

import time
from typing import Callable, Generator, TypeVar

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

from failnozzle.collector import collector_held

_R = TypeVar("_R")

#: Work as a generator: it yields (None) wherever the reactor may take a
#: turn, and returns its result.
Steps = Generator[None, None, _R]

#: How long the reactor waits for steps in one turn, in seconds, unless a
#: single step takes longer: at 70,000 datagrams a second, 140 of them
#: arrive meanwhile, a small share of a socket's buffer.
SLICE_SECONDS = 0.002


def finish(steps: Steps[_R]) -> _R:
    """Run C{steps} to the end at once, and give their result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def run_at_once(steps: Steps[_R]) -> defer.Deferred:
    """
    Run C{steps} to the end now: for tests driven by a fake clock, and
    wherever holding the caller is fine.

    @return: a Deferred that has fired with their result or failure.
    """
    return defer.maybeDeferred(finish, steps)


def in_slices(reactor: IReactorTime,
              slice_seconds: float = SLICE_SECONDS
              ) -> Callable[[Steps[_R]], defer.Deferred]:
    """
    A runner of steps on C{reactor}: each turn it is given, it runs steps
    for C{slice_seconds} at most (one step at least), then lets the
    reactor go on.

    @return: what runs steps; it returns a Deferred firing with their
        result or failure.
    """
    def slice_over() -> Callable[[], bool]:
        end = time.monotonic() + slice_seconds
        return lambda: time.monotonic() >= end

    cooperator = task.Cooperator(
        terminationPredicateFactory=slice_over,
        # A slice makes and keeps much of what it makes: see collector.
        scheduler=lambda work: reactor.callLater(0, collector_held()(work)))

    def run(steps: Steps[_R]) -> defer.Deferred:
        result: list = []

        def keeping_result() -> Steps[None]:
            result.append((yield from steps))

        done = cooperator.cooperate(keeping_result()).whenDone()
        return done.addCallback(lambda _: result[0])

    return run
