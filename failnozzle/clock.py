"""
A reactor clock that steps of the wall clock cannot move.

Twisted schedules every timer on the wall clock (C{time.time}): stepped back
an hour, as NTP does at boot to a machine whose clock ran ahead, every
pending timer waits an hour longer (no digest, no snapshot); stepped
forward, they all fire at once.  L{SteadyClock} counts seconds at the rate
of the monotonic clock from the wall-clock time it started at, and
L{steady_reactor} makes it the reactor's time, so timers keep their
intervals whatever the wall clock does.  What people read (a digest's
times, its Date header) is moved to wall-clock time by L{wall_offset}.
"""
from __future__ import annotations

import time
from typing import Callable

#: The last second a datetime can show (9999-12-31 23:59:59 UTC), as
#: seconds since the epoch: the latest time a snapshot keeps or a digest
#: shows.
LAST_SECOND = 253402300799.0


class SteadyClock:
    """
    Wall-clock time as it was at the start, advanced by the monotonic
    clock: never stepped, and equal to the wall clock until that is.
    """

    def __init__(self, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._origin = wall() - monotonic()

    def seconds(self) -> float:
        """The steady time now."""
        return self._origin + self._monotonic()

    def wall_offset(self) -> float:
        """
        How far the wall clock is ahead of this clock now: 0 until the
        wall clock is stepped, then the step's size.
        """
        return self._wall() - self.seconds()


def steady_reactor(reactor, clock: SteadyClock) -> Callable[[], float]:
    """
    Make C{clock} the time of C{reactor}, and so of every timer scheduled
    on it from now on (timers scheduled before keep firing on time: the two
    clocks agree when this is called).

    @return: L{SteadyClock.wall_offset}, for what shows times to people.
    """
    reactor.seconds = clock.seconds
    return clock.wall_offset
