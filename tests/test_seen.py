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
                               news_first, remember, seen_key, status_of,
                               statuses)
from failnozzle.seen import Seen, SeenFile, SeenMemory

DAY = 24 * 3600
RULES = NewsRules.in_days(seen_days=30, regression_days=1)


class SeenMemoryTests(SynchronousTestCase):
    """
    The memory, bounded.
    """

    def test_record(self):
        memory = SeenMemory(10)
        memory.record("a", 10.0, 20.0, 3, 25.0)
        memory.record("a", 5.0, 40.0, 2, 45.0)
        self.assertEqual(memory.get("a"), Seen(5.0, 40.0, 5, 45.0))
        self.assertIsNone(memory.get("b"))

    def test_oldest_forgotten(self):
        """Past its size, the errors seen longest ago are forgotten."""
        memory = SeenMemory(2)
        memory.record("a", 1.0, 1.0, 1, 1.0)
        memory.record("b", 2.0, 2.0, 1, 2.0)
        memory.record("a", 3.0, 3.0, 1, 3.0)
        memory.record("c", 4.0, 4.0, 1, 4.0)
        self.assertEqual((memory.get("a").total, memory.get("b")), (2, None))
        memory.resize(1)
        self.assertEqual(len(memory), 1)
        self.assertIsNotNone(memory.get("c"))

    def test_restore_keeps_newest(self):
        memory = SeenMemory(2)
        memory.restore([["old", 1, 1, 1, 1], ["new", 1, 9, 1, 9],
                        ["mid", 1, 5, 1, 5]])
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
        rows = [["a", 1.5, 2.5, 3, 4.0], ["b", 0, 1, 0, 2]]
        self.file.write(rows)
        self.assertEqual(self.file.read(10), rows)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_none(self):
        self.assertEqual(self.file.read(10), [])
        self.assertEqual(len(self.events), 0)

    def assertSetAside(self):
        """The file is read as none, moved aside, and said so in a line."""
        logged = len(self.events)
        self.assertEqual(self.file.read(10), [])
        self.assertFalse(os.path.lexists(self.path))
        self.assertEqual(len(self.events), logged + 1)
        line = formatEvent(self.events[logged])
        self.assertIn("is unusable", line)
        self.assertIn("every error is new again", line)

    def test_bad_shapes_set_aside(self):
        for saved in ([], {"version": 2, "seen": []}, {"version": 1},
                      {"version": 1, "seen": [["a", 1, 2, 3]]},
                      {"version": 1, "seen": [["", 1, 2, 3, 4]]},
                      {"version": 1, "seen": [["a", -1, 2, 3, 4]]},
                      {"version": 1, "seen": [["a", 1, 2, 1.5, 4]]},
                      {"version": 1, "seen": [[1, 1, 2, 3, 4]]}):
            with self.subTest(saved=saved):
                with open(self.path, "w") as out:
                    json.dump(saved, out)
                self.assertSetAside()

    def test_not_json(self):
        with open(self.path, "wb") as out:
            out.write(b"\xff" * 100)
        self.assertSetAside()

    def test_too_large(self):
        """A file larger than SEEN_MAX errors take is not read whole."""
        with open(self.path, "wb") as out:
            out.write(b" " * 5000)
        self.assertSetAside()

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
        memory.record("ongoing", 0.0, 90.0, 1, 90.0)
        memory.record("back", 0.0, 100.0 - 2 * DAY, 1, 0.0)
        batch = Batch.of(entries)
        told = statuses(batch, memory, 0.0, RULES)
        self.assertEqual({key: status.kind for key, status in told.items()},
                         {"ongoing": ONGOING, "back": BACK, "new": NEW})
        self.assertEqual([entry.key for entry in news_first(batch,
                                                            told).entries],
                         [("new",), ("back",), ("ongoing",)])

    def test_remember(self):
        """What a digest reported is remembered, with wall-clock times."""
        memory = SeenMemory(10)
        entry = Entry(("a",), {"h": 2, "i": 1}, 5.0, 7.0)
        remember(memory, [entry], 1000.0, 2000.0)
        self.assertEqual(memory.get(seen_key(entry)),
                         Seen(1005.0, 1007.0, 3, 2000.0))
        self.assertRegex(seen_key(entry), "^[0-9a-f]{16}$")
