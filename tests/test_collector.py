"""
Tests for L{failnozzle.collector}.
"""
import gc
import weakref

from twisted.trial.unittest import SynchronousTestCase

from failnozzle.collector import collector_held, freeze_heap


class _Cycle:
    """An object that refers to itself: only the collector frees it."""

    def __init__(self) -> None:
        self.me = self


class FreezeHeapTests(SynchronousTestCase):
    """
    L{freeze_heap} puts what exists out of the collector's sight, and the
    next call lets it see again what the last one froze.
    """

    def test_frozen(self):
        self.addCleanup(gc.unfreeze)
        freeze_heap()
        self.assertGreater(gc.get_freeze_count(), 0)

    def test_frozen_cycle_collected_by_next(self):
        """
        A cycle frozen, then dropped, outlives collections until the next
        call, which collects it.
        """
        self.addCleanup(gc.unfreeze)
        cycle = _Cycle()
        alive = weakref.ref(cycle)
        freeze_heap()
        del cycle
        gc.collect()
        self.assertIsNotNone(alive())
        freeze_heap()
        self.assertIsNone(alive())


class CollectorHeldTests(SynchronousTestCase):
    """
    L{collector_held} keeps the collector off for its body and leaves it
    as it found it.
    """

    def setUp(self) -> None:
        self.addCleanup(gc.enable if gc.isenabled() else gc.disable)
        gc.enable()

    def test_off_then_on(self):
        with collector_held():
            self.assertFalse(gc.isenabled())
        self.assertTrue(gc.isenabled())

    def test_on_after_exception(self):
        with self.assertRaises(ZeroDivisionError):
            with collector_held():
                1 / 0
        self.assertTrue(gc.isenabled())

    def test_nested(self):
        """The inner one leaves it off for the outer one."""
        with collector_held():
            with collector_held():
                pass
            self.assertFalse(gc.isenabled())
        self.assertTrue(gc.isenabled())

    def test_off_stays_off(self):
        """Off before, it is not turned on."""
        gc.disable()
        with collector_held():
            pass
        self.assertFalse(gc.isenabled())

    def test_decorator(self):
        """As a decorator, each call holds it."""
        seen = []

        @collector_held()
        def work():
            seen.append(gc.isenabled())

        work()
        work()
        self.assertEqual(seen, [False, False])
        self.assertTrue(gc.isenabled())
