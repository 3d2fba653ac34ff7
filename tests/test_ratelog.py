"""
Tests for L{failnozzle.ratelog}: warnings at a limited rate.
"""
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from failnozzle.ratelog import RateLimitedLog

from tests.common import capture_log


class RateLimitedLogTests(SynchronousTestCase):
    """
    L{RateLimitedLog}: one line per kind and interval, then the count of
    those held back.
    """

    def setUp(self):
        self.clock = Clock()
        self.events = capture_log(self)
        self.log = RateLimitedLog(Logger(namespace="tests.ratelog"),
                                  self.clock, interval=10)

    def lines(self):
        return [formatEvent(event) for event in self.events
                if event.get("log_namespace") == "tests.ratelog"]

    def test_held_back_counted_when_the_interval_ends(self):
        """
        The first warning of a kind is logged with its fields; those of
        that kind in the next interval are counted in one line when it
        ends, without waiting for another warning.
        """
        for number in range(4):
            self.log.warn("bad things", "Bad thing {number}", number=number)
            self.clock.advance(2)
        self.assertEqual(self.lines(), ["Bad thing 0"])
        self.clock.advance(2)
        self.assertEqual(self.lines(), [
            "Bad thing 0",
            "3 more not logged in the last 10 s: bad things"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_next_interval_logs_again(self):
        """
        Once an interval has ended, the next warning of its kind is logged
        again, and a lone warning is not followed by a count of nothing.
        """
        self.log.warn("bad things", "Bad thing 1")
        self.clock.advance(10)
        self.log.warn("bad things", "Bad thing 2")
        self.assertEqual(self.lines(), ["Bad thing 1", "Bad thing 2"])

    def test_kinds_apart(self):
        """
        Each kind has its own interval: a flood of one hides no other.
        """
        self.log.warn("a", "A 1")
        self.log.warn("a", "A 2")
        self.log.warn("b", "B 1")
        self.assertEqual(self.lines(), ["A 1", "B 1"])

    def test_stop(self):
        """
        L{RateLimitedLog.stop} says at once what is held back, for every
        kind, and leaves no timer behind.
        """
        self.log.warn("a", "A 1")
        self.log.warn("a", "A 2")
        self.log.warn("b", "B 1")
        self.log.stop()
        self.assertEqual(self.lines(), [
            "A 1", "B 1", "1 more not logged in the last 10 s: a"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
