"""The leader's own pushes in memory: kept by their bytes, bounded."""
from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from failnozzle.aggregate import Batch, Entry
from failnozzle.ownpushes import OwnPushes
from failnozzle.state import State


def counted(errors: int) -> State:
    return State(Batch(tuple(Entry((f"e{number}",), {"h": 1}, 1.0, 1.0)
                             for number in range(errors))))


class OwnPushesTests(SynchronousTestCase):

    def test_taken_once(self):
        """A merge takes what was kept, and a later one does not again."""
        own = OwnPushes(10)
        state = counted(2)
        own.keep(b"one", state)
        self.assertEqual(own.take(), {b"one": state})
        self.assertEqual(own.take(), {})

    def test_bounded(self):
        """Past C{limit} errors in all a push is not kept (it is read back
        from Redis), bad input counted too; a take makes room again."""
        own = OwnPushes(5)
        own.keep(b"one", counted(3))
        own.keep(b"two", counted(3))
        own.keep(b"three", State(counted(1).buffer,
                                 bad_input=counted(1).buffer.entries))
        self.assertEqual(sorted(own.take()), [b"one", b"three"])
        own.keep(b"four", counted(5))
        self.assertEqual(list(own.take()), [b"four"])

    def test_same_bytes_kept_once(self):
        """The same bytes pushed twice are kept once: the second push is
        read back."""
        own = OwnPushes(10)
        first = counted(1)
        own.keep(b"same", first)
        own.keep(b"same", counted(1))
        self.assertEqual(own.take(), {b"same": first})

    def test_forget(self):
        own = OwnPushes(10)
        own.keep(b"one", counted(1))
        own.forget()
        self.assertEqual(own.take(), {})
