"""
Tests for L{failnozzle.clock}: timers that wall-clock steps cannot move.
"""
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import SynchronousTestCase

from failnozzle.clock import SteadyClock, steady_reactor


class FakeTime:
    """A wall clock that can be stepped and a monotonic one that cannot."""

    def __init__(self):
        self.wall_now = 1_800_000_000.0
        self.monotonic_now = 500.0

    def wall(self):
        return self.wall_now

    def monotonic(self):
        return self.monotonic_now

    def advance(self, seconds):
        self.wall_now += seconds
        self.monotonic_now += seconds


class SteadyClockTests(SynchronousTestCase):
    """
    The clock's time and its offset from the wall clock.
    """

    def test_follows_wall_until_stepped(self):
        """
        It starts at the wall-clock time and advances with the monotonic
        clock; a step of the wall clock shows only in the offset.
        """
        fake = FakeTime()
        clock = SteadyClock(fake.wall, fake.monotonic)
        self.assertEqual((clock.seconds(), clock.wall_offset()),
                         (1_800_000_000.0, 0.0))
        fake.advance(30)
        fake.wall_now -= 3600
        self.assertEqual(clock.seconds(), 1_800_000_030.0)
        self.assertEqual(clock.wall_offset(), -3600.0)


class SteadyReactorTests(SynchronousTestCase):
    """
    A real reactor's timers on the steady clock.
    """

    def setUp(self):
        self.fake = FakeTime()
        self.reactor = SelectReactor()
        self.offset = steady_reactor(
            self.reactor, SteadyClock(self.fake.wall, self.fake.monotonic))
        self.fired = []

    def test_step_back(self):
        """
        A timer fires after its interval though the wall clock was
        stepped back an hour meanwhile, and a periodic loop keeps its
        period.
        """
        loop = LoopingCall(lambda: self.fired.append(self.reactor.seconds()))
        loop.clock = self.reactor
        loop.start(10, now=False)
        self.addCleanup(loop.stop)
        self.fake.wall_now -= 3600
        for _ in range(3):
            self.fake.advance(10)
            self.reactor.runUntilCurrent()
        self.assertEqual(len(self.fired), 3)
        self.assertEqual(self.offset(), -3600.0)

    def test_step_forward(self):
        """
        Stepped forward a day, the timers do not all fire at once.
        """
        self.reactor.callLater(10, self.fired.append, "ten")
        self.reactor.callLater(20, self.fired.append, "twenty")
        self.fake.wall_now += 86400
        self.fake.advance(10)
        self.reactor.runUntilCurrent()
        self.assertEqual(self.fired, ["ten"])
        self.assertEqual(self.offset(), 86400.0)
