"""
Tests for L{failnozzle.seen} and L{failnozzle.policy}: what failnozzle
remembers of the errors it reported, and what a digest tells of each.
"""
import json
import os
import stat

from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from failnozzle.aggregate import Batch, Entry
from failnozzle.policy import (BACK, NEW, ONGOING, NewsRules, Status,
                               Telling, remembering, seen_key, status_of,
                               telling)
from failnozzle.steps import finish
from failnozzle import seen
from failnozzle.seen import Seen, SeenFile, SeenMemory

DAY = 24 * 3600
RULES = NewsRules(forget_after=30 * DAY, back_after=DAY)


class SeenMemoryTests(SynchronousTestCase):
    """
    The memory, bounded.
    """

    def test_record(self):
        memory = SeenMemory(10)
        memory.record("a", 10.0, 20.0, 3, (25.0, 0.5))
        memory.record("a", 5.0, 40.0, 2, (45.0, 0.25))
        self.assertEqual(memory.get("a"), Seen(5.0, 40.0, 5, 45.0, 0.25))
        self.assertIsNone(memory.get("b"))

    def test_counted_not_listed(self):
        """Counted without being listed, it keeps when it was listed."""
        memory = SeenMemory(10)
        memory.record("a", 10.0, 20.0, 3, (25.0, 0.5))
        memory.record("a", 30.0, 40.0, 2)
        self.assertEqual(memory.get("a"), Seen(10.0, 40.0, 5, 25.0, 0.5))

    def test_oldest_forgotten(self):
        """Past its size, the errors seen longest ago are forgotten."""
        memory = SeenMemory(2)
        memory.record("a", 1.0, 1.0, 1, (1.0, 1.0))
        memory.record("b", 2.0, 2.0, 1, (2.0, 1.0))
        memory.record("a", 3.0, 3.0, 1)
        memory.record("c", 4.0, 4.0, 1, (4.0, 1.0))
        self.assertEqual((memory.get("a").total, memory.get("b")), (2, None))
        memory.resize(1)
        self.assertEqual(len(memory), 1)
        self.assertIsNotNone(memory.get("c"))

    def test_restore_keeps_newest(self):
        memory = SeenMemory(2)
        memory.restore([["old", 1, 1, 1, 1, 0], ["new", 1, 9, 1, 9, 0.5],
                        ["mid", 1, 5, 1, 5, 0]])
        self.assertEqual(sorted(row[0] for row in memory.rows()),
                         ["mid", "new"])


class SeenFileTests(SynchronousTestCase):
    """
    The memory on disk.
    """

    def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, "state.json.seen")
        self.file = SeenFile(self.path)
        self.events = EventLoggingObserver.createWithCleanup(
            self, globalLogPublisher)

    def test_round_trip(self):
        rows = [["a", 1.5, 2.5, 3, 4.0, 0.25], ["b", 0, 1, 0, 2, 0]]
        self.file.write(rows)
        self.assertEqual(self.file.read(), rows)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_none(self):
        self.assertEqual(self.file.read(), [])
        self.assertEqual(len(self.events), 0)

    def assertSetAside(self):
        """The file is read as none, moved aside, and said so in a line."""
        logged = len(self.events)
        self.assertEqual(self.file.read(), [])
        self.assertFalse(os.path.lexists(self.path))
        self.assertEqual(len(self.events), logged + 1)
        line = formatEvent(self.events[logged])
        self.assertIn("is unusable", line)
        self.assertIn("every error is new again", line)

    def test_bad_shapes_set_aside(self):
        for saved in ([], {"version": 2, "seen": []}, {"version": 1},
                      {"version": 1, "seen": [["a", 1, 2, 3, 4]]},
                      {"version": 1, "seen": [["", 1, 2, 3, 4, 0]]},
                      {"version": 1, "seen": [["a", -1, 2, 3, 4, 0]]},
                      {"version": 1, "seen": [["a", 1, 2, 1.5, 4, 0]]},
                      {"version": 1, "seen": [["a", 1, 2, 3, 4, None]]},
                      {"version": 1, "seen": [[1, 1, 2, 3, 4, 0]]}):
            with self.subTest(saved=saved):
                with open(self.path, "w") as out:
                    json.dump(saved, out)
                self.assertSetAside()

    def test_not_json(self):
        with open(self.path, "wb") as out:
            out.write(b"\xff" * 100)
        self.assertSetAside()

    def test_too_large(self):
        """A file larger than any seen-memory is not read whole."""
        self.patch(seen, "_MAX_FILE_BYTES", 1000)
        self.file.write([["a", 1, 2, 3, 4, 0]] * 100)
        self.assertSetAside()

    def test_larger_seen_max_before(self):
        """Written with a larger SEEN_MAX, the newest errors are kept."""
        self.file.write([[f"e{number}", 1, number, 1, number, 0]
                         for number in range(50)])
        memory = SeenMemory(10)
        memory.restore(self.file.read())
        self.assertEqual([row[0] for row in memory.rows()],
                         [f"e{number}" for number in range(40, 50)])

    def test_fifo(self):
        """A FIFO is set aside, not waited on."""
        os.mkfifo(self.path)
        self.assertSetAside()


class StatusTests(SynchronousTestCase):
    """
    New, back or ongoing, from the memory and a time.
    """

    def test_never_seen(self):
        self.assertEqual(status_of(None, 100.0, 3, RULES),
                         Status(NEW, 100.0, 3))

    def test_ongoing(self):
        seen = Seen(10.0, 1000.0, 40, 1000.0)
        self.assertEqual(status_of(seen, 1060.0, 2, RULES),
                         Status(ONGOING, 10.0, 42))

    def test_back(self):
        """Quiet for REGRESSION_DAYS or more, it is back, with how long."""
        seen = Seen(10.0, 1000.0, 40, 1000.0)
        self.assertEqual(status_of(seen, 1000.0 + 3 * DAY, 1, RULES),
                         Status(BACK, 10.0, 41, 3 * DAY))

    def test_forgotten(self):
        """Not seen for longer than SEEN_DAYS, it is new again."""
        seen = Seen(10.0, 1000.0, 40, 1000.0)
        self.assertEqual(status_of(seen, 1000.0 + 31 * DAY, 1, RULES).kind,
                         NEW)

    def test_news_first(self):
        """New errors first, then those back, then the ongoing ones."""
        entries = [Entry((name,), {"h": count}, 100.0, 100.0,
                         fingerprint=name)
                   for name, count in (("ongoing", 9), ("back", 5),
                                       ("new", 1))]
        memory = SeenMemory(10)
        memory.record("ongoing", 0.0, 90.0, 1, (90.0, 1.0))
        memory.record("back", 0.0, 100.0 - 2 * DAY, 1, (0.0, 1.0))
        told = telling(Batch.of(entries), memory, 0.0, 100.0, RULES)
        self.assertEqual({key: status.kind
                          for key, status in told.statuses.items()},
                         {"ongoing": ONGOING, "back": BACK, "new": NEW})
        self.assertEqual([entry.key for entry in told.batch.entries],
                         [("new",), ("back",), ("ongoing",)])
        self.assertEqual(told.quiet, 0)

    def test_remember(self):
        """
        What a digest listed is remembered with wall-clock times and its
        rate; what it only counted, counted.
        """
        memory = SeenMemory(10)
        listed = Entry(("a",), {"h": 2, "i": 1}, 5.0, 7.0)
        quiet = Entry(("b",), {"h": 4}, 5.0, 7.0)
        memory.record(seen_key(quiet), 0.0, 1.0, 1, (1.0, 1.0))
        told = Telling(Batch((listed, quiet)), {},
                       {seen_key(listed): 0.5, seen_key(quiet): 2.0}, 1)
        finish(remembering(memory, told, 1000.0, 2000.0))
        self.assertEqual(memory.get(seen_key(listed)),
                         Seen(1005.0, 1007.0, 3, 2000.0, 0.5))
        self.assertEqual(memory.get(seen_key(quiet)),
                         Seen(0.0, 1007.0, 5, 1.0, 1.0))
        self.assertRegex(seen_key(listed), "^[0-9a-f]{16}$")


    def test_remembering_in_steps(self):
        """
        A large digest is remembered in steps, the reactor taking its
        turns between them.
        """
        memory = SeenMemory(10000)
        entries = tuple(Entry((number,), {"h": 1}, 1.0, 1.0,
                              fingerprint=f"e{number}")
                        for number in range(2500))
        told = Telling(Batch(entries), {},
                       {entry.fingerprint: 1.0 for entry in entries})
        steps = list(remembering(memory, told, 0.0, 5.0))
        self.assertEqual(len(steps), 2)
        self.assertEqual(len(memory), 2500)


class RepeatTests(SynchronousTestCase):
    """
    Quiet repeats: an ongoing error listed within REPEAT_SECONDS is only
    counted, unless its rate rose RISE_FACTOR times.
    """

    RULES = NewsRules(30 * DAY, DAY, repeat_after=4 * 3600,
                      rise_factor=10, rate_window=60)

    def told(self, count, now, listed_at=0.0, rate=1.0, repeats=True):
        memory = SeenMemory(10)
        memory.record("e", 0.0, listed_at, 100, (listed_at, rate))
        entry = Entry(("e",), {"h": count}, now - 60, now, fingerprint="e")
        return telling(Batch((entry,)), memory, 0.0, now, self.RULES,
                       repeats)

    def test_quiet(self):
        told = self.told(60, now=3600.0)
        self.assertEqual(told.quiet, 1)
        self.assertFalse(told.worth_sending)

    def test_clock_stepped_back(self):
        """Listed "in the future" (the clock stepped back), it is listed."""
        self.assertEqual(self.told(60, now=3600.0, listed_at=9999.0).quiet, 0)

    def test_due(self):
        """Listed longer than REPEAT_SECONDS ago, it is listed again."""
        told = self.told(60, now=4 * 3600.0 + 1)
        self.assertEqual(told.quiet, 0)
        self.assertTrue(told.worth_sending)

    def test_rising(self):
        """At RISE_FACTOR times its last rate, it is news."""
        told = self.told(600, now=3600.0)
        self.assertTrue(told.statuses["e"].rising)
        self.assertEqual(told.quiet, 0)
        self.assertFalse(self.told(599, now=3600.0).statuses["e"].rising)

    def test_no_repeats(self):
        """Canaries (repeats off) and REPEAT_SECONDS = 0 list everything."""
        self.assertEqual(self.told(60, now=3600.0, repeats=False).quiet, 0)
        self.RULES = NewsRules(30 * DAY, DAY, repeat_after=0)
        self.assertEqual(self.told(60, now=3600.0).quiet, 0)

    def test_news_beside_quiet(self):
        """A new error makes a digest, the quiet ones last."""
        memory = SeenMemory(10)
        memory.record("old", 0.0, 100.0, 5, (100.0, 1.0))
        entries = (Entry(("old",), {"h": 9}, 100.0, 160.0, fingerprint="old"),
                   Entry(("new",), {"h": 1}, 150.0, 150.0, fingerprint="new"))
        told = telling(Batch(entries), memory, 0.0, 160.0, self.RULES)
        self.assertTrue(told.worth_sending)
        self.assertEqual([entry.key for entry in told.batch.entries],
                         [("new",), ("old",)])
        self.assertEqual(told.quiet, 1)
