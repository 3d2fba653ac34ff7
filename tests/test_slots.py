"""
Tests for L{failnozzle.slots}: a file overwritten in place that a crash in
the middle of any write leaves readable.
"""
import os

from twisted.trial.unittest import SynchronousTestCase

from failnozzle import slots
from failnozzle.slots import MIN_CAPACITY, SlotFile, Unreadable


class FakeMonotonic:
    """A monotonic clock the test moves."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class SlotFileTests(SynchronousTestCase):

    def setUp(self):
        self.path = os.path.abspath(self.mktemp())
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.monotonic = FakeMonotonic()
        self.slots = self.slot_file()

    def slot_file(self):
        slot_file = SlotFile(self.path, self.monotonic)
        self.addCleanup(slot_file.close)
        return slot_file

    def write(self, payload, slot_file=None):
        slot_file = slot_file or self.slots
        slot_file.write(payload, slot_file.number())

    def put(self, payload, slot_file=None):
        slot_file = slot_file or self.slots
        self.assertTrue(slot_file.fits(len(payload)))
        slot_file.put(payload, slot_file.number())

    def read(self):
        return self.slot_file().read(1 << 20)

    def test_nothing(self):
        """No file: nothing to read."""
        self.assertIsNone(self.read())

    def test_write_and_put(self):
        """
        Each write and each put replaces what a later reader gets, in the
        order they were numbered; puts go on after a read.
        """
        self.write(b"first")
        self.assertEqual(self.read(), b"first")
        self.put(b"put")
        self.assertEqual(self.read(), b"put")
        self.write(b"written")
        self.put(b"put again")
        self.assertEqual(self.read(), b"put again")
        reader = self.slot_file()
        self.assertEqual(reader.read(1 << 20), b"put again")
        self.put(b"after a read", reader)
        self.write(b"and written", reader)
        self.assertEqual(self.read(), b"and written")

    def test_numbered_when_made(self):
        """
        A payload made earlier but written later (by the disk writer)
        does not win over one made after it and put first.
        """
        self.write(b"first")
        older = self.slots.number()
        newer = self.slots.number()
        self.slots.put(b"newer", newer)
        self.slots.write(b"older", older)
        self.assertEqual(self.read(), b"newer")

    def test_one_file(self):
        """Puts and writes overwrite the file in place: one inode, its
        size four slots of the smallest capacity, private."""
        self.write(b"x")
        inode = os.stat(self.path).st_ino
        for number in range(10):
            self.put(b"p%d" % number)
            self.write(b"w%d" % number)
        status = os.stat(self.path)
        self.assertEqual(status.st_ino, inode)
        self.assertEqual(status.st_size, 4 * MIN_CAPACITY)
        self.assertEqual(status.st_mode & 0o777, 0o600)

    def test_space_reserved(self):
        """The slots' blocks are reserved when the file is made, so a put
        cannot find the disk full; a file system that cannot reserve gets
        a file of the same size all the same."""
        self.write(b"x")
        self.assertGreaterEqual(os.stat(self.path).st_blocks * 512,
                                4 * MIN_CAPACITY)

        def cannot(descriptor, offset, length):
            raise OSError(95, "Operation not supported")

        self.patch(os, "posix_fallocate", cannot)
        os.unlink(self.path)
        self.monotonic.now += 1
        self.write(b"y")
        self.assertEqual(os.path.getsize(self.path), 4 * MIN_CAPACITY)
        self.put(b"z")
        self.assertEqual(self.read(), b"z")

    def torn(self, method, payload):
        """Call C{method} with C{payload}, its write stopping halfway (a
        crash in the middle of it)."""
        real = slots.write_at

        def half(descriptor, data, offset):
            real(descriptor, data[:len(data) // 2], offset)
            raise OSError("crashed")

        self.patch(slots, "write_at", half)
        self.assertRaises(OSError, method, payload, self.slots.number())
        self.patch(slots, "write_at", real)

    def test_torn_write(self):
        """
        A write cut short leaves the newest whole payload to be read: a
        synced one is never overwritten by the next write or put.
        """
        self.write(b"a" * 1000)
        self.write(b"b" * 1000)
        self.torn(self.slots.write, b"c" * 1000)
        self.assertEqual(self.read(), b"b" * 1000)

    def test_torn_put(self):
        """A put cut short leaves the one before it; the next put is
        refused (the caller writes instead), and that write works."""
        self.write(b"a" * 1000)
        self.put(b"b" * 1000)
        self.torn(self.slots.put, b"c" * 1000)
        self.assertEqual(self.read(), b"b" * 1000)
        self.assertFalse(self.slots.fits(10))
        self.write(b"d")
        self.assertEqual(self.read(), b"d")
        self.put(b"e")
        self.assertEqual(self.read(), b"e")

    def test_puts_leave_synced_slots(self):
        """
        Puts never overwrite the two synced slots (the first two), so a
        power cut losing every put still finds the last write.
        """
        self.write(b"a" * 100)
        self.write(b"b" * 100)
        with open(self.path, "rb") as stored:
            synced = stored.read(2 * MIN_CAPACITY)
        for number in range(5):
            self.put(b"put %d" % number)
        with open(self.path, "r+b") as stored:
            self.assertEqual(stored.read(2 * MIN_CAPACITY), synced)
            stored.write(b"\0" * 2 * MIN_CAPACITY)  # the puts lost
        self.assertEqual(self.read(), b"b" * 100)

    def test_torn_after_read(self):
        """
        After a read, the next write goes into the other synced slot, not
        over the one read, whichever it was.
        """
        self.write(b"a" * 1000)
        self.write(b"b" * 1000)
        self.write(b"c" * 1000)  # slot 0 again: the newest
        reader = self.slot_file()
        self.assertEqual(reader.read(1 << 20), b"c" * 1000)
        self.slots = reader
        self.torn(reader.write, b"d" * 1000)
        self.assertEqual(self.read(), b"c" * 1000)

    def test_damaged(self):
        """A slot whose bytes changed is not read; none whole is
        Unreadable."""
        self.write(b"a" * 100)
        self.write(b"b" * 100)
        with open(self.path, "r+b") as stored:
            stored.seek(MIN_CAPACITY + 40)  # slot 1: b
            stored.write(b"X")
        self.assertEqual(self.read(), b"a" * 100)
        with open(self.path, "r+b") as stored:
            stored.seek(40)
            stored.write(b"X")
        self.assertRaises(Unreadable, self.read)

    def test_larger_than_limit(self):
        """A payload larger than the reader's limit is not read into
        memory: another whole one is read, else it is Unreadable."""
        self.write(b"a" * 1000)
        self.assertRaises(Unreadable, self.slot_file().read, 999)
        self.write(b"b" * 10)
        self.write(b"c" * 2000)
        self.assertEqual(self.slot_file().read(1999), b"b" * 10)

    def test_sequence_out_of_range(self):
        """
        A slot numbered past what failnozzle can reach (a file made to
        stop it numbering) is not whole: the one before it is read, and
        writes go on.
        """
        self.write(b"a")
        self.slots.write(b"forged", 1 << 62)
        reader = self.slot_file()
        self.assertEqual(reader.read(1 << 20), b"a")
        self.write(b"b", reader)
        self.put(b"c", reader)
        self.assertEqual(self.read(), b"c")

    def test_made_private(self):
        """A file copied in by hand with a wider mode is 0600 once read:
        it holds tracebacks."""
        self.write(b"a")
        os.chmod(self.path, 0o644)
        self.assertEqual(self.read(), b"a")
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)

    def test_grows_and_shrinks(self):
        """
        A payload too large for a slot replaces the file with larger
        slots; one far smaller replaces it with smaller ones.  No put
        carries either.
        """
        self.write(b"small")
        large = b"L" * (MIN_CAPACITY * 2)
        self.assertFalse(self.slots.fits(len(large)))
        self.write(large)
        self.assertEqual(self.read(), large)
        self.assertGreater(os.path.getsize(self.path), 8 * MIN_CAPACITY)
        self.assertFalse(self.slots.fits(5))
        self.write(b"small")
        self.assertEqual(self.read(), b"small")
        self.assertEqual(os.path.getsize(self.path), 4 * MIN_CAPACITY)

    def test_removed_by_hand(self):
        """
        A file removed (or replaced) meanwhile is noticed within a second
        of the clock: no put goes into the old one, and the next write
        makes the file again.
        """
        self.write(b"a")
        os.unlink(self.path)
        self.monotonic.now += 1
        self.assertFalse(self.slots.fits(1))
        self.write(b"b")
        self.assertEqual(self.read(), b"b")
        with open(self.path + ".other", "wb") as other:
            other.write(b"\0" * 4 * MIN_CAPACITY)
        os.replace(self.path + ".other", self.path)
        self.monotonic.now += 1
        self.assertFalse(self.slots.fits(1))

    def test_symbolic_link(self):
        """A symbolic link put at the path is replaced, not written
        through."""
        self.write(b"a")
        target = os.path.abspath(self.mktemp())
        with open(target, "wb") as out:
            out.write(b"\0" * 4 * MIN_CAPACITY)
        os.unlink(self.path)
        os.symlink(target, self.path)
        self.monotonic.now += 1
        self.write(b"b")
        self.assertFalse(os.path.islink(self.path))
        with open(target, "rb") as left:
            self.assertEqual(left.read(), b"\0" * 4 * MIN_CAPACITY)
        self.assertEqual(self.read(), b"b")

    def test_before_slots(self):
        """A snapshot from before slots, one JSON document, is read whole;
        the next write replaces it with slots."""
        with open(self.path, "wb") as old:
            old.write(b'{"version": 4}')
        reader = self.slot_file()
        self.assertEqual(reader.read(1 << 20), b'{"version": 4}')
        self.assertFalse(reader.fits(1))
        self.write(b"new", reader)
        self.assertEqual(self.read(), b"new")
