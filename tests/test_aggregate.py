"""
Tests for L{failnozzle.aggregate}.
"""
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from failnozzle.aggregate import Aggregator, Batch, Entry


def internal_key(count, error):
    """Stands for INTERNAL_ERROR_FUNC: one key per kind of bad input."""
    return ("internal", type(error).__name__)


def make_aggregator(max_unique=100):
    clock = Clock()
    return Aggregator(max_unique, clock, internal_key), clock


class AggregatorTests(SynchronousTestCase):
    """
    Counting instances of unique errors per source.
    """

    def test_counts_per_key_and_source(self):
        """
        Instances with the same key are folded together and counted per
        source, as the original's MessageBuffer test.
        """
        aggregator, _ = make_aggregator()
        for key, source in [("m1", "host1"), ("m1", "host1"), ("m1", "host2"),
                            ("m2", "host2")]:
            aggregator.add_key((key,), source)
        batch = aggregator.flush()
        self.assertEqual(batch.total, 4)
        self.assertEqual([e.key for e in batch.entries], [("m1",), ("m2",)])
        self.assertEqual(batch.entries[0].sources, {"host1": 2, "host2": 1})
        self.assertEqual(batch.entries[0].total, 3)
        self.assertEqual(batch.entries[1].sources, {"host2": 1})

    def test_sources_capped(self):
        """
        An error keeps at most C{max_sources} sources one by one; the
        instances from others are counted together, so the total stays
        exact however many hosts send it.  Bad input is capped alike.
        """
        aggregator = Aggregator(10, Clock(), internal_key, max_sources=3)
        for number in range(1000):
            aggregator.add_key(("m",), f"host{number % 500}")
            aggregator.add_bad_input(ValueError("junk"), f"10.0.{number}")
        aggregator.add_key(("m",), "host0")
        bad, error = sorted(aggregator.flush().entries, key=lambda e: e.key)
        self.assertEqual(error.sources, {"host0": 3, "host1": 2, "host2": 2})
        self.assertEqual((error.other_sources, error.total), (994, 1001))
        self.assertEqual(len(bad.sources), 3)
        self.assertEqual((bad.other_sources, bad.total), (997, 1000))

    def test_first_and_last_seen(self):
        """
        First and last seen come from the injected clock.
        """
        aggregator, clock = make_aggregator()
        clock.advance(10)
        aggregator.add_key(("m",), "h")
        clock.advance(5)
        aggregator.add_key(("m",), "h")
        clock.advance(7)
        aggregator.add_key(("m",), "other")
        [entry] = aggregator.flush().entries
        self.assertEqual((entry.first_seen, entry.last_seen), (10, 22))

    def test_most_severe_level(self):
        """
        An error keeps the most severe syslog level it was sent with (the
        lowest number); one never sent with a level has none.
        """
        aggregator, _ = make_aggregator()
        for level in [None, 4, 2, 6, None]:
            aggregator.add_key(("gelf",), "h", level)
        aggregator.add_key(("json",), "h")
        levels = {e.key: e.level for e in aggregator.view().entries}
        self.assertEqual(levels, {("gelf",): 2, ("json",): None})
        self.assertEqual({e.key: e.level for e in aggregator.flush().entries},
                         levels)

    def test_sorted_by_count_then_first_seen(self):
        """
        The most frequent errors come first; equal counts keep the order in
        which the errors first appeared.
        """
        aggregator, clock = make_aggregator()
        for key in ["a", "b", "c", "c", "b", "d"]:
            clock.advance(1)
            aggregator.add_key((key,), None)
        keys = [e.key[0] for e in aggregator.flush().entries]
        self.assertEqual(keys, ["b", "c", "a", "d"])

    def test_flush_empties(self):
        """
        A flush hands everything over; the next flush starts from nothing.
        """
        aggregator, _ = make_aggregator()
        aggregator.add_key(("m",), "h")
        self.assertTrue(aggregator.flush())
        empty = aggregator.flush()
        self.assertFalse(empty)
        self.assertEqual(empty.total, 0)

    def test_batch_is_a_snapshot(self):
        """
        Counting after a flush does not change the batch already handed on.
        """
        aggregator, _ = make_aggregator()
        aggregator.add_key(("m",), "h")
        batch = aggregator.flush()
        aggregator.add_key(("m",), "h")
        self.assertEqual(batch.entries[0].sources, {"h": 1})

    def test_unique_cap(self):
        """
        Past the cap, new unique errors are only counted as overflow, while
        errors already stored keep being counted in full.
        """
        aggregator, _ = make_aggregator(max_unique=2)
        for key in ["a", "b", "c", "d", "d", "a"]:
            aggregator.add_key((key,), "h")
        batch = aggregator.flush()
        self.assertEqual([e.key for e in batch.entries], [("a",), ("b",)])
        self.assertEqual(batch.entries[0].total, 2)
        self.assertEqual(batch.overflow, 3)
        self.assertEqual(batch.total, 6)

    def test_memory_is_per_unique_error(self):
        """
        A million instances of one error from one source are one entry with
        one count.
        """
        aggregator, _ = make_aggregator()
        for _ in range(1000000):
            aggregator.add_key(("m",), "h")
        [entry] = aggregator.flush().entries
        self.assertEqual(entry.sources, {"h": 1000000})

    def test_short_texts_held_once(self):
        """
        Equal short texts of different errors (module, file and host names)
        are held once; tracebacks are kept as they came.
        """
        aggregator, _ = make_aggregator()
        for n in range(2):
            key = ("".join(["vie", "ws"]), str(n),
                   "".join(["Traceback\n", "x" * 200]))
            aggregator.add_key(key, "".join(["web", "1"]))
        first, second = aggregator.flush().entries
        self.assertIs(first.key[0], second.key[0])
        self.assertIs(*(next(iter(e.sources)) for e in (first, second)))
        self.assertIsNot(first.key[2], second.key[2])
        self.assertEqual(first.key[2], second.key[2])

    def test_bad_input_counted_by_kind(self):
        """
        Bad input is reported as one entry per kind of error, counted per
        sender, under the key the internal-error function gives.
        """
        aggregator, clock = make_aggregator()
        aggregator.add_bad_input(ValueError("x"), "10.0.0.1")
        clock.advance(3)
        aggregator.add_bad_input(ValueError("y"), "10.0.0.2")
        aggregator.add_bad_input(ValueError("z"), "10.0.0.2")
        aggregator.add_bad_input(KeyError("k"), "10.0.0.1")
        entries = {e.key: e for e in aggregator.flush().entries}
        self.assertEqual(entries[("internal", "ValueError")].sources,
                         {"10.0.0.1": 1, "10.0.0.2": 2})
        self.assertEqual(entries[("internal", "ValueError")].first_seen, 0)
        self.assertEqual(entries[("internal", "ValueError")].last_seen, 3)
        self.assertEqual(entries[("internal", "KeyError")].total, 1)

    def test_bad_input_given_count_and_last_error(self):
        """
        The internal-error function is given the number of pieces of bad
        input of a kind and the last of them, once per flush.
        """
        calls = []

        def key(count, error):
            calls.append((count, error))
            return ("internal",)

        aggregator = Aggregator(10, Clock(), key)
        first, last = ValueError("first"), ValueError("last")
        aggregator.add_bad_input(first, "h")
        aggregator.add_bad_input(last, "h")
        aggregator.flush()
        self.assertEqual(calls, [(2, last)])

    def test_bad_input_merges_with_equal_key(self):
        """
        If the internal-error key equals a real error's key, both are
        counted in one entry.
        """
        aggregator, clock = make_aggregator()
        clock.advance(5)
        aggregator.add_key(("internal", "ValueError"), "h")
        clock.advance(5)
        aggregator.add_bad_input(ValueError(), "h")
        [entry] = aggregator.flush().entries
        self.assertEqual(entry.sources, {"h": 2})
        self.assertEqual((entry.first_seen, entry.last_seen), (5, 10))


class ChangesTests(SynchronousTestCase):
    """
    What a snapshot reads: the errors counted since the last one.
    """

    def changed(self, aggregator, everything=False):
        batch, whole = aggregator.changes(everything)
        return {e.key[0]: e.sources for e in batch.entries}, whole

    def test_only_what_changed(self):
        """
        The first call gives the whole buffer; later ones only the errors
        counted since the call before, with their counts so far, and the
        whole buffer's overflow.
        """
        aggregator, _ = make_aggregator(max_unique=3)
        for key in ["a", "b"]:
            aggregator.add_key((key,), "h")
        self.assertEqual(self.changed(aggregator),
                         ({"a": {"h": 1}, "b": {"h": 1}}, True))
        self.assertEqual(self.changed(aggregator), ({}, False))
        for key in ["b", "c", "d", "e"]:
            aggregator.add_key((key,), "h")
        batch, whole = aggregator.changes()
        self.assertEqual({e.key[0]: e.sources for e in batch.entries},
                         {"b": {"h": 2}, "c": {"h": 1}})
        self.assertEqual((batch.overflow, whole), (2, False))

    def test_everything(self):
        """
        Asked for everything, it gives the whole buffer, and counts from
        there on.
        """
        aggregator, _ = make_aggregator()
        for key in ["a", "b"]:
            aggregator.add_key((key,), "h")
        aggregator.changes()
        aggregator.add_key(("a",), "h2")
        self.assertEqual(self.changed(aggregator, everything=True),
                         ({"a": {"h": 1, "h2": 1}, "b": {"h": 1}}, True))
        self.assertEqual(self.changed(aggregator), ({}, False))

    def test_whole_after_flush_and_restore(self):
        """
        After a flush the changes are the whole (new) buffer, and so they
        are after a restore.
        """
        aggregator, _ = make_aggregator()
        aggregator.add_key(("a",), "h")
        aggregator.changes()
        batch = aggregator.flush()
        self.assertEqual(self.changed(aggregator), ({}, True))
        aggregator.add_key(("b",), "h")
        aggregator.changes()
        aggregator.restore(batch)
        self.assertEqual(self.changed(aggregator),
                         ({"a": {"h": 1}, "b": {"h": 1}}, True))

    def test_bad_input_apart(self):
        """
        Bad input is not among the changes but in L{Aggregator.bad_input},
        under the key the internal-error function gives for its count.
        """
        aggregator, _ = make_aggregator()
        aggregator.add_bad_input(ValueError("x"), "10.0.0.1")
        aggregator.add_bad_input(ValueError("y"), "10.0.0.1")
        self.assertEqual(self.changed(aggregator), ({}, True))
        [entry] = aggregator.bad_input()
        self.assertEqual((entry.key, entry.sources),
                         (("internal", "ValueError"), {"10.0.0.1": 2}))


class BatchTests(SynchronousTestCase):
    """
    The immutable snapshot of a flush.
    """

    def test_merge_keeps_most_severe_level(self):
        """
        Merging batches keeps the most severe level of each error.
        """
        held = Batch.of([Entry(("a",), {"h": 1}, 0, 1, 4),
                         Entry(("b",), {"h": 1}, 0, 1)])
        later = Batch.of([Entry(("a",), {"h": 1}, 2, 3, 3),
                          Entry(("b",), {"h": 1}, 2, 3, 6)])
        merged = held.merge(later, 10)
        self.assertEqual({e.key: e.level for e in merged.entries},
                         {("a",): 3, ("b",): 6})

    def test_merge_caps_sources(self):
        """
        Merging batches keeps at most C{max_sources} sources per error, the
        rest counted in C{other_sources}, totals exact.
        """
        held = Batch.of([Entry(("a",), {"h1": 1, "h2": 2}, 0, 1, None, 5)])
        later = Batch.of([Entry(("a",), {"h2": 1, "h3": 4, "h4": 8}, 2, 3)])
        [entry] = held.merge(later, 10, max_sources=3).entries
        self.assertEqual(entry.sources, {"h1": 1, "h2": 3, "h3": 4})
        self.assertEqual((entry.other_sources, entry.total), (13, 21))
        [unbounded] = held.merge(later, 10).entries
        self.assertEqual((len(unbounded.sources), unbounded.total), (4, 21))

    def test_merge_caps_sources_of_new_errors(self):
        """
        An error only the other batch holds (such as one read back from a
        snapshot written with a larger cap, or by hand) keeps at most
        C{max_sources} sources too, totals exact.
        """
        many = Entry(("a",), {f"h{n}": 1 for n in range(500)}, 0, 1, None, 2)
        [entry] = Batch().merge(Batch.of([many]), 10, max_sources=100).entries
        self.assertEqual(len(entry.sources), 100)
        self.assertEqual((entry.other_sources, entry.total), (402, 502))
        aggregator = Aggregator(10, Clock(), internal_key, max_sources=100)
        aggregator.restore(Batch.of([many]))
        [restored] = aggregator.view().entries
        self.assertEqual((len(restored.sources), restored.total), (100, 502))

    def test_partition(self):
        """
        A batch splits into the entries matching a predicate and the rest;
        the overflow goes with the rest.
        """
        a = Entry(("a",), {"h": 1}, 0, 0)
        b = Entry(("b",), {"h": 2}, 0, 0)
        matching, rest = Batch((a, b), overflow=4).partition(
            lambda e: e.key == ("a",))
        self.assertEqual(matching, Batch((a,)))
        self.assertEqual(rest, Batch((b,), 4))
        self.assertEqual(rest.total, 6)

    def test_partition_asks_once(self):
        """
        The predicate is asked once per entry (it reads tracebacks), and
        the order of the entries is kept on both sides.
        """
        entries = tuple(Entry((name,), {"h": 1}, 0, 0) for name in "abcd")
        asked = []

        def predicate(entry):
            asked.append(entry.key)
            return entry.key in {("a",), ("c",)}

        matching, rest = Batch(entries).partition(predicate)
        self.assertEqual(asked, [("a",), ("b",), ("c",), ("d",)])
        self.assertEqual(matching.entries, entries[0::2])
        self.assertEqual(rest.entries, entries[1::2])

    def test_overflow_only_is_true(self):
        """
        A batch holding only overflow counts still has something to report.
        """
        self.assertTrue(Batch((), overflow=1))
        self.assertFalse(Batch())
