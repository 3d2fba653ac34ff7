"""
Tests for L{failnozzle.steps}: work written as steps, run at once or a slice
at a time on a reactor.
"""
from __future__ import annotations

import gc

from twisted.trial.unittest import SynchronousTestCase

from failnozzle.steps import finish, in_slices, run_at_once
from tests.common import Turns


def counting(done: list, steps: int, result: object = "made"):
    """C{steps} steps, each noted in C{done}, then C{result}."""
    for step in range(steps):
        done.append(step)
        yield
    return result


def failing():
    yield
    raise ValueError("template exploded")


class AtOnceTests(SynchronousTestCase):
    """
    L{finish} and L{run_at_once} run every step before they return.
    """

    def test_finish(self):
        done = []
        self.assertEqual(finish(counting(done, 3)), "made")
        self.assertEqual(done, [0, 1, 2])

    def test_run_at_once(self):
        done = []
        self.assertEqual(self.successResultOf(run_at_once(counting(done, 2))),
                         "made")
        self.assertEqual(done, [0, 1])

    def test_run_at_once_fails(self):
        self.failureResultOf(run_at_once(failing()), ValueError)


class InSlicesTests(SynchronousTestCase):
    """
    L{in_slices} runs steps in the reactor's turns, as many in one as its
    slice allows, and at least one.
    """

    def test_one_step_a_turn(self):
        """
        With no time to spare, each turn of the reactor runs one step:
        the reactor gets its turns between them.
        """
        clock, done = Turns(), []
        made = in_slices(clock, slice_seconds=0)(counting(done, 3))
        self.assertEqual(done, [])
        for turn in range(3):
            clock.turn()
            self.assertEqual(done, list(range(turn + 1)))
        self.assertNoResult(made)
        clock.turn()
        self.assertEqual(self.successResultOf(made), "made")

    def test_many_steps_a_turn(self):
        """
        Steps that take less than a slice run in one turn.
        """
        clock, done = Turns(), []
        made = in_slices(clock, slice_seconds=60)(counting(done, 50))
        clock.turn()
        self.assertEqual(self.successResultOf(made), "made")
        self.assertEqual(len(done), 50)

    def test_collector_held(self):
        """
        The garbage collector is off while a slice runs, and on between
        slices and after.
        """
        self.addCleanup(gc.enable if gc.isenabled() else gc.disable)
        gc.enable()
        clock, collecting = Turns(), []

        def noting():
            for _ in range(2):
                collecting.append(gc.isenabled())
                yield

        made = in_slices(clock, slice_seconds=0)(noting())
        clock.turn()
        self.assertTrue(gc.isenabled())
        clock.turn()
        clock.turn()
        self.successResultOf(made)
        self.assertEqual((collecting, gc.isenabled()), ([False, False], True))

    def test_failure(self):
        clock = Turns()
        made = in_slices(clock, slice_seconds=0)(failing())
        clock.turn()
        clock.turn()
        self.failureResultOf(made, ValueError)

    def test_several_at_once(self):
        """
        Two runs share the turns; each gets its own result.
        """
        clock = Turns()
        run = in_slices(clock, slice_seconds=0)
        first, second = [], []
        made = [run(counting(first, 2, "first")),
                run(counting(second, 2, "second"))]
        for _ in range(6):
            clock.turn()
        self.assertEqual([self.successResultOf(d) for d in made],
                         ["first", "second"])
