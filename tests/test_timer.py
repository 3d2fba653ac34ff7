"""
Tests for L{failnozzle.timer}.
"""
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from failnozzle.timer import Timer


class TimerTests(SynchronousTestCase):
    """
    A TimerService whose first call waits a step unless asked otherwise.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.calls: list = []

    def timer(self, **kwargs) -> Timer:
        return Timer(10, lambda: self.calls.append(self.clock.seconds()),
                     self.clock, **kwargs)

    def test_first_call_a_step_after_start(self):
        """
        Started, it calls one step later, then every step; stopped, it
        calls no more and nothing is due.
        """
        timer = self.timer()
        timer.startService()
        self.assertEqual((self.calls, timer.due), ([], 10))
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual((self.calls, timer.due), ([10, 20], 30))
        self.successResultOf(timer.stopService())
        self.clock.advance(10)
        self.assertEqual((self.calls, timer.due), ([10, 20], None))

    def test_at_start(self):
        """
        With C{at_start} it calls at once when it starts.
        """
        timer = self.timer(at_start=True)
        timer.startService()
        self.assertEqual((self.calls, timer.due), ([0], 10))

    def test_restart(self):
        """
        A restart takes the new step from now, and calls at once if asked;
        one of a timer not running starts it.
        """
        timer = self.timer()
        timer.restart(5)
        self.clock.advance(3)
        timer.restart(20)
        self.assertEqual(timer.due, 23)
        timer.restart(20, now=True)
        self.assertEqual((self.calls, timer.due), ([3], 23))
        self.assertTrue(timer.running)

    def test_never_started(self):
        """
        Nothing is due from a timer never started.
        """
        self.assertIsNone(self.timer().due)

    def test_restart_during_its_call(self):
        """
        A restart asked for by the call itself leaves the timer running
        on the new step.
        """
        timer = Timer(10, lambda: timer.restart(5), self.clock)
        timer.startService()
        self.clock.advance(10)
        self.assertTrue(timer.running)
        self.assertEqual(timer.due, 15)
        self.clock.advance(5)
        self.assertEqual(timer.due, 20)
