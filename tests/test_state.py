"""
Tests for L{failnozzle.state}: snapshots written and read back.
"""
import glob
import json
import os

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from failnozzle.aggregate import Batch, Entry
from failnozzle import state
from failnozzle.slots import SlotFile
from failnozzle.state import State, StateFile
from tests.common import snapshot_document


def entry(name, sources=None, first=1.0, last=2.0):
    key = ("views", "index", name, "Traceback\n" + "x" * 500)
    return Entry(key, sources or {"web1": 2, None: 1}, first, last)


class StateFileTests(SynchronousTestCase):
    """
    Saving and loading snapshots.
    """

    def setUp(self):
        self.path = self.mktemp()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)),
                    exist_ok=True)
        self.clock = Clock()

    def state_file(self):
        return StateFile(self.path, self.clock)

    def test_round_trip(self):
        """
        The buffer, the held batches and the pager window come back as
        they were saved, sources of any JSON type, levels and the count of
        other sources included.
        """
        state = State(
            Batch.of([entry("a"), entry("b", {"web2": 7, 3: 1}),
                      Entry(("gelf",), {"h": 1}, 1.0, 2.0, 3),
                      Entry(("many hosts",), {"h": 1}, 1.0, 2.0, None, 7),
                      Entry(("both",), {"h": 1}, 1.0, 2.0, 2, 1)],
                     overflow=4),
            {"digest": Batch.of([entry("c", first=0.5, last=9.25)])},
            [3, 0, 12],
        )
        self.state_file().save(lambda: state)
        self.assertEqual(self.state_file().load(), state)

    def test_retire_in_a_directory_named_like_a_set_aside_file(self):
        """
        L{StateFile.retire} removes the snapshot and its keys files, those
        set aside as unreadable left, even in a directory whose name holds
        C{.bad-} (only the files' own suffix tells).
        """
        directory = os.path.abspath(self.mktemp()) + ".bad-1"
        os.makedirs(directory)
        self.path = os.path.join(directory, "state")
        snapshots = self.state_file()
        snapshots.save(lambda: State(Batch.of([entry("a")])))
        with open(self.path + ".keys.7.bad-9", "w"):
            pass
        self.successResultOf(snapshots.retire())
        self.assertEqual(os.listdir(directory), ["state.keys.7.bad-9"])

    def test_pager_round_trip(self):
        """
        Where the pager's alert stands comes back as saved; a damaged one
        makes the file unusable, as any other damage does.
        """
        pager = {"since": 10.0, "last_paged": 70.0, "total": 500,
                 "below": 2}
        state = State(pager=pager)
        self.state_file().save(lambda: state)
        self.assertEqual(self.state_file().load().pager, pager)
        for damaged in ([], {"since": None}, {**pager, "total": -1},
                        {**pager, "last_paged": "soon"}):
            with self.subTest(pager=damaged):
                self.state_file().save(lambda: state)
                snapshot = snapshot_document(self.path)
                snapshot["pager"] = damaged
                with open(self.path, "w") as out:
                    json.dump(snapshot, out)
                self.assertIsNone(self.state_file().load())

    def test_grouping_round_trip(self):
        """
        An entry's fingerprint, its count of variants, its examples and
        its context come back as they were saved; two entries shown with
        one key but grouped apart (FINGERPRINT_FUNC looked past the key)
        both do.
        """
        key = ("views", "index", "lookup failed for user 17", None)
        state = State(Batch.of([
            Entry(key, {"web1": 5}, 1.0, 2.0, fingerprint="custom:1",
                  variants=4, more_variants=True,
                  examples=("17", "42", "\udcff")),
            Entry(key, {"web2": 1}, 1.0, 2.0, fingerprint="custom:2",
                  context=(("release", "1.2.3"), ("user", "42"))),
            Entry(("plain",), {"web1": 1}, 1.0, 2.0, fingerprint="ab12"),
        ]))
        self.state_file().save(lambda: state)
        self.assertEqual(self.state_file().load(), state)

    def test_bad_grouping_set_aside(self):
        """
        A row whose grouping is not what failnozzle writes makes the file
        unusable, as any other damage does.
        """
        for grouping in ([], {"fingerprint": 3}, {"examples": "x"},
                         {"examples": ["a", "b", "c", "d"]},
                         {"variants": -1}, {"more_variants": 1},
                         {"context": [["release"]]},
                         {"context": [["release", 3]]}):
            with self.subTest(grouping=grouping):
                state = State(Batch.of([Entry(("a",), {"h": 1}, 1.0, 2.0,
                                              fingerprint="f")]))
                self.state_file().save(lambda: state)
                snapshot = snapshot_document(self.path)
                snapshot["buffer"]["entries"][0][6] = grouping
                with open(self.path, "w") as out:
                    json.dump(snapshot, out)
                self.assertIsNone(self.state_file().load())
                self.assertFalse(os.path.exists(self.path), "set aside")

    def test_values_only_python_writes(self):
        """
        Keys and sources with what only Python's json writes (lone
        surrogates, integers past 64 bits, infinities, NaN) come back as
        they were saved.
        """
        odd = ("\udcff", 2 ** 70, float("inf"), -float("inf"), 1.5, None)
        state = State(Batch.of([
            Entry(odd, {"\udcff": 1, 2 ** 70: 2, float("-inf"): 3}, 1.0, 2.0),
            Entry(("plain", float("nan")), {"web1": 1}, 1.0, 2.0),
        ]))
        self.state_file().save(lambda: state)
        loaded = self.state_file().load().buffer.entries
        self.assertEqual(loaded[0], state.buffer.entries[0])
        self.assertEqual(loaded[1].key[0], "plain")
        self.assertNotEqual(loaded[1].key[1], loaded[1].key[1], "NaN")

    def test_nothing_saved(self):
        """
        Without a state file there is nothing to restore, and nothing is
        logged.
        """
        events = EventLoggingObserver.createWithCleanup(
            self, globalLogPublisher)
        self.assertIsNone(self.state_file().load())
        self.assertEqual(len(events), 0)

    def test_keys_written_once(self):
        """
        A key is written to the keys file once; the snapshot proper holds
        only numbers and counts, so it stays small.
        """
        states = self.state_file()
        for count in range(1, 20):
            states.save(
                lambda: State(Batch.of([entry("a", {"web1": count})])))
        [keys] = glob.glob(f"{self.path}.keys.*")
        with open(keys) as lines:
            self.assertEqual(len(lines.readlines()), 1)
        self.assertLess(len(SlotFile(self.path).read(200)), 200)
        self.assertEqual(self.state_file().load().buffer.entries[0].sources,
                         {"web1": 19})

    def test_new_generation(self):
        """
        Once the keys file holds mostly keys no longer counted, a new one
        is begun with the live keys only, and the old one removed.
        """
        states = self.state_file()
        states.save(
            lambda: State(Batch.of([entry(f"e{i}") for i in range(1100)])))
        states.save(lambda: State(Batch.of([entry("survivor")])))
        [keys] = glob.glob(f"{self.path}.keys.*")
        with open(keys) as lines:
            self.assertEqual(len(lines.readlines()), 1)
        loaded = self.state_file().load()
        self.assertEqual([e.key[2] for e in loaded.buffer.entries],
                         ["survivor"])

    def test_continues_after_load(self):
        """
        A new run that loaded a snapshot saves under a new keys file, and
        that is what the following run reads.
        """
        self.state_file().save(lambda: State(Batch.of([entry("old")])))
        second = self.state_file()
        second.load()
        second.save(lambda: State(Batch.of([entry("new")])))
        self.assertEqual(len(glob.glob(f"{self.path}.keys.*")), 1)
        self.assertEqual(
            [e.key[2] for e in self.state_file().load().buffer.entries],
            ["new"])

    def test_half_written_key_line(self):
        """
        A keys file ending in half a line, as a crash while appending
        leaves it, still loads: no snapshot refers to that key yet.
        """
        self.state_file().save(lambda: State(Batch.of([entry("a")])))
        [keys] = glob.glob(f"{self.path}.keys.*")
        with open(keys, "a") as out:
            out.write('[1, ["views", "ind')
        self.assertEqual(len(self.state_file().load().buffer.entries), 1)

    def test_corrupt(self):
        """
        A state file that is not a snapshot is moved aside with an error
        saying so, and the run starts empty.
        """
        self.state_file().save(lambda: State(Batch.of([entry("a")])))
        with open(self.path, "w") as out:
            out.write("{not json")
        self.clock.advance(1234)
        events = EventLoggingObserver.createWithCleanup(
            self, globalLogPublisher)
        self.assertIsNone(self.state_file().load())
        self.assertFalse(os.path.exists(self.path))
        self.assertTrue(os.path.exists(self.path + ".bad-1234"))
        [event] = events
        self.assertIn("unusable", event["log_format"])

    def test_missing_keys(self):
        """
        A snapshot whose keys file is gone is unusable too.
        """
        self.state_file().save(lambda: State(Batch.of([entry("a")])))
        for path in glob.glob(f"{self.path}.keys.*"):
            os.unlink(path)
        self.assertIsNone(self.state_file().load())
        self.assertTrue(glob.glob(self.path + ".bad-*"))

    def test_wrong_shape(self):
        """
        JSON of the wrong shape is unusable, not a crash.
        """
        with open(self.path, "w") as out:
            json.dump({"version": 2, "generation": "x"}, out)
        self.assertIsNone(self.state_file().load())

    def test_unwritable(self):
        """
        Saving where the state file cannot be written fails with the
        OSError; once the directory is there again, saving works.
        """
        directory = self.mktemp()
        states = StateFile(os.path.join(directory, "state.json"), self.clock)
        self.failureResultOf(
            states.save(lambda: State(Batch.of([entry("a")]))), OSError)
        os.makedirs(directory)
        self.successResultOf(
            states.save(lambda: State(Batch.of([entry("a")]))))
        self.assertEqual(
            len(StateFile(os.path.join(directory, "state.json"),
                          self.clock).load().buffer.entries), 1)


class ChangesOnlyTests(SynchronousTestCase):
    """
    Snapshots given only what changed since the last one keep the rest as
    that one saved it.
    """

    def setUp(self):
        self.path = self.mktemp()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)),
                    exist_ok=True)
        self.states = StateFile(self.path, Clock())

    def loaded(self):
        state = StateFile(self.path, Clock()).load()
        return ({e.key[2]: e.sources for e in state.buffer.entries},
                state.buffer.overflow)

    def test_changes_update_the_last_snapshot(self):
        """
        Changed errors replace their counts, new ones are added, the others
        stay as saved, and the overflow is the one given last.
        """
        self.states.save(lambda: State(Batch.of([entry("a"), entry("b")])))
        self.assertFalse(self.states.needs_whole)
        self.states.save(lambda: State(
            Batch.of([entry("b", {"web1": 5}), entry("c")], overflow=3),
            changes_only=True))
        self.assertEqual(self.loaded(), ({
            "a": {"web1": 2, None: 1},
            "b": {"web1": 5},
            "c": {"web1": 2, None: 1},
        }, 3))

    def test_whole_replaces(self):
        """
        A snapshot of the whole buffer, as after a flush, drops the errors
        it does not hold.
        """
        self.states.save(lambda: State(Batch.of([entry("a"), entry("b")])))
        self.states.save(lambda: State(Batch.of([entry("c")])))
        self.states.save(lambda: State(Batch.of([entry("d")]),
                                       changes_only=True))
        self.assertEqual(set(self.loaded()[0]), {"c", "d"})

    def test_bad_input_saved_whole(self):
        """
        Bad input, whose key changes with its count, is saved as given
        each time: its earlier keys are not kept.
        """
        self.states.save(lambda: State(bad_input=(entry("bad 1"),)))
        self.states.save(lambda: State(changes_only=True,
                                       bad_input=(entry("bad 2"),)))
        self.assertEqual(set(self.loaded()[0]), {"bad 2"})

    def test_held_kept_until_replaced(self):
        """
        A held batch saved once is written again as it was while it is the
        same batch, and replaced by another.
        """
        held = Batch.of([entry("held")])
        self.states.save(lambda: State(held={"digest": held}))
        self.states.save(lambda: State(Batch.of([entry("a")]),
                                       held={"digest": held},
                                       changes_only=True))
        self.assertEqual(StateFile(self.path, Clock()).load().held,
                         {"digest": held})
        other = Batch.of([entry("other")])
        self.states.save(lambda: State(held={"digest": other},
                                       changes_only=True))
        self.assertEqual(StateFile(self.path, Clock()).load().held,
                         {"digest": other})

    def test_whole_needed_after_failure(self):
        """
        After a snapshot failed, the next one must be given the whole
        buffer; given only changes, it fails with a ValueError.
        """
        directory = self.mktemp()
        states = StateFile(os.path.join(directory, "state.json"), Clock())
        self.failureResultOf(
            states.save(lambda: State(Batch.of([entry("a")]))), OSError)
        self.assertTrue(states.needs_whole)
        os.makedirs(directory)
        self.failureResultOf(
            states.save(lambda: State(Batch.of([entry("b")]),
                                      changes_only=True)), ValueError)
        self.successResultOf(
            states.save(lambda: State(Batch.of([entry("a"), entry("b")]))))
        self.assertFalse(states.needs_whole)
        self.successResultOf(
            states.save(lambda: State(Batch.of([entry("c")]),
                                      changes_only=True)))
        state = StateFile(os.path.join(directory, "state.json"),
                          Clock()).load()
        self.assertEqual({e.key[2] for e in state.buffer.entries},
                         {"a", "b", "c"})


class ThreadedWriteTests(SynchronousTestCase):
    """
    The writing is handed to C{in_thread}; snapshots are written one at a
    time.
    """

    def test_writes_in_order(self):
        """
        A snapshot asked for while one is being written waits for it (and
        only then takes the state), and the later one is what is loaded.
        """
        path = self.mktemp()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        queued = []

        def in_thread(function, *args):
            done = defer.Deferred()
            queued.append((function, args, done))
            return done

        states = StateFile(path, Clock(), in_thread)
        taken = []

        def current(name):
            taken.append(name)
            return State(Batch.of([entry(name)]))

        first = states.save(lambda: current("a"))
        second = states.save(lambda: current("b"))
        self.assertTrue(states.busy)
        self.assertEqual(len(queued), 1)
        self.assertEqual(taken, ["a"], "the later state is taken later")
        function, args, done = queued.pop()
        function(*args)
        done.callback(None)
        self.successResultOf(first)
        self.assertEqual(len(queued), 1)
        function, args, done = queued.pop()
        function(*args)
        done.callback(None)
        self.successResultOf(second)
        self.assertFalse(states.busy)
        self.assertEqual(
            [e.key[2] for e in StateFile(path, Clock()).load().buffer.entries],
            ["b"])


class QuickSnapshotTests(SynchronousTestCase):
    """
    A quick snapshot (L{State.quick}) is put into the file on the spot
    when it can be, and written by the disk writer when not.
    """

    def setUp(self):
        path = self.mktemp()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.queued = []

        def in_thread(function, *args):
            done = defer.Deferred()
            self.queued.append((function, args, done))
            return done

        self.states = StateFile(path, Clock(), in_thread)

    def run_queued(self):
        while self.queued:
            function, args, done = self.queued.pop(0)
            done.callback(function(*args))

    def loaded(self):
        return StateFile(self.states.path, Clock()).load().buffer.entries

    def test_put(self):
        """
        With its keys written, a quick snapshot is in the file when
        C{save} returns, nothing handed to the disk writer; one that is
        not quick is handed over.
        """
        self.states.save(lambda: State(Batch.of([entry("a")])))
        self.run_queued()
        saved = self.states.save(lambda: State(
            Batch.of([entry("a", {"web1": 5})]), quick=True))
        self.successResultOf(saved)
        self.assertEqual(self.queued, [])
        self.assertEqual(self.loaded()[0].sources, {"web1": 5})
        slow = self.states.save(lambda: State(
            Batch.of([entry("a", {"web1": 6})])))
        self.assertNoResult(slow)
        self.assertEqual(len(self.queued), 1)

    def test_new_keys_written_first(self):
        """
        A quick snapshot with a key not yet in the keys file is written
        by the disk writer, keys first: a crash of the machine must not
        find a snapshot whose keys are lost.
        """
        self.states.save(lambda: State(Batch.of([entry("a")])))
        self.run_queued()
        saved = self.states.save(lambda: State(
            Batch.of([entry("a"), entry("b")]), quick=True))
        self.assertNoResult(saved)
        self.run_queued()
        self.successResultOf(saved)
        self.assertEqual([e.key[2] for e in self.loaded()], ["a", "b"])

    def test_large_written(self):
        """A quick snapshot larger than PUT_MAX is written by the disk
        writer, so a put costs the reactor little."""
        hosts = {f"web{number}": number for number in range(20)}
        many = Batch.of([entry(f"e{number}", hosts) for number in range(300)])
        self.states.save(lambda: State(many))
        self.run_queued()
        self.assertGreater(len(SlotFile(self.states.path).read(1 << 30)),
                           state.PUT_MAX)
        saved = self.states.save(lambda: State(many, quick=True))
        self.assertNoResult(saved)
        self.run_queued()
        self.successResultOf(saved)


class NoSnapshotTests(SynchronousTestCase):
    """
    Where no snapshot can be.
    """

    def test_directory_is_a_file(self):
        """
        A STATE_FILE whose directory is a regular file has no snapshot to
        load; nothing is moved aside.
        """
        blocker = self.mktemp()
        with open(blocker, "w"):
            pass
        events = EventLoggingObserver.createWithCleanup(
            self, globalLogPublisher)
        states = StateFile(os.path.join(blocker, "state.json"), Clock())
        self.assertIsNone(states.load())
        self.assertEqual(len(events), 0)


FIELDS = ("module", "funcName", "message", "exc_text")


class DurableNamesTests(SynchronousTestCase):

    def test_new_keys_file_named_durably(self):
        """
        A new keys file's name is made durable (its directory fsynced)
        before any snapshot on the disk can refer to it: the snapshot
        itself is overwritten in place, no rename syncs the directory.
        """
        path = os.path.abspath(self.mktemp())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        synced = []
        self.patch(state, "fsync_directory", synced.append)
        states = StateFile(path, Clock())
        states.save(lambda: State(Batch.of([entry("a")])))
        self.assertEqual(synced, [os.path.dirname(path)])
        states.save(lambda: State(Batch.of([entry("a"), entry("b")])))
        self.assertEqual(len(synced), 1, "only for a new keys file")


class HostileFileTests(SynchronousTestCase):
    """
    No state or keys file, whatever it holds, keeps a run from starting:
    each is loaded or set aside with one line, never raises, never hangs.
    """

    def setUp(self):
        self.path = self.mktemp()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)),
                    exist_ok=True)
        self.events = EventLoggingObserver.createWithCleanup(
            self, globalLogPublisher)

    def state_file(self, fields=FIELDS):
        return StateFile(self.path, Clock(), fields=fields)

    def save_one(self):
        self.state_file().save(lambda: State(
            Batch.of([entry("a")]), {"digest": Batch.of([entry("b")])},
            [1, 2]))

    def assertSetAside(self):
        self.assertIsNone(self.state_file().load())
        self.assertFalse(os.path.exists(self.path))
        self.assertTrue(glob.glob(self.path + ".bad-*"))
        [event] = [e for e in self.events if "unusable" in e["log_format"]]
        self.assertIn("STATE_FILE", event["log_format"])

    def write(self, text, path=None):
        with open(path or self.path, "w") as out:
            out.write(text)

    def test_set_aside_then_written_anew(self):
        """
        A file of whole slots that holds no snapshot is set aside, and the
        next snapshot goes into a new file at STATE_FILE, not into the one
        set aside.
        """
        slots = SlotFile(self.path)
        slots.write(b"[]", slots.number())
        slots.close()
        states = self.state_file()
        self.assertIsNone(states.load())
        [aside] = glob.glob(self.path + ".bad-*")
        with open(aside, "rb") as kept:
            before = kept.read()
        states.save(lambda: State(Batch.of([entry("a")])))
        self.assertEqual(self.state_file().load().buffer.total, 3)
        with open(aside, "rb") as kept:
            self.assertEqual(kept.read(), before)

    def test_deep_nesting(self):
        """
        A state file nested deeper than any JSON reader recurses is set
        aside, not a RecursionError.
        """
        self.write("[" * 200000 + "]" * 200000)
        self.assertSetAside()

    def test_deep_nesting_in_keys(self):
        """
        So is a keys file with a deeply nested key.
        """
        self.save_one()
        [keys] = glob.glob(f"{self.path}.keys.*")
        self.write("[0, " + "[" * 100000 + "]" * 100000 + "]\n", keys)
        self.assertSetAside()

    def test_infinite_times_and_counts(self):
        """
        Infinity or NaN where a time or a count belongs, or a time no date
        can show, is unusable: it would fail every flush.
        """
        for bad in ("Infinity", "NaN", "1e308", "-5", '"x"', "true"):
            for where in ("first", "count"):
                self.save_one()
                self.assertIsNotNone(self.state_file().load())
                changed = snapshot_document(self.path)
                row = changed["buffer"]["entries"][0]
                if where == "first":
                    row[2] = "PLACEHOLDER"
                else:
                    row[1][0][1] = "PLACEHOLDER"
                self.write(json.dumps(changed).replace('"PLACEHOLDER"', bad))
                self.assertIsNone(self.state_file().load(), (bad, where))
                self.assertFalse(os.path.exists(self.path))

    def test_source_pairs(self):
        """
        A row's sources are C{[source, count]} lists: a two-letter string,
        a two-key object, a repeated source with a count that is not one,
        are unusable; a source repeated with good counts is summed.
        """
        def load_with(sources):
            self.save_one()
            changed = snapshot_document(self.path)
            changed["buffer"]["entries"][0][1] = sources
            self.write(json.dumps(changed))
            return self.state_file().load()

        for bad in (["ab"], [{"a": 1, "b": 2}], [["h", -5], ["h", 9]],
                    [["h", "x"], ["h", 1]], [["h", 1.5], ["h", 1]],
                    [["h", 1, 2]]):
            self.assertIsNone(load_with(bad), bad)
        loaded = load_with([["h", 2], ["g", 1], ["h", 3]])
        [read] = loaded.buffer.entries
        self.assertEqual(dict(read.sources), {"h": 5, "g": 1})

    def test_wrong_shapes(self):
        """
        Every part of a snapshot replaced by a value of another shape
        gives a snapshot that loads or is set aside; none raises.
        """
        self.save_one()
        snapshot = snapshot_document(self.path)
        replacements = [None, 0, -1, 2 ** 80, 1.5, "x", [], {}, [[]],
                        {"entries": None}, [1, 2, 3, 4, 5, 6, 7]]

        def paths(value, prefix=()):
            yield prefix
            items = (value.items() if isinstance(value, dict) else
                     enumerate(value) if isinstance(value, list) else ())
            for name, item in items:
                yield from paths(item, prefix + (name,))

        tried = 0
        for where in list(paths(snapshot))[1:]:
            for replacement in replacements:
                changed = json.loads(json.dumps(snapshot))
                parent = changed
                for name in where[:-1]:
                    parent = parent[name]
                parent[where[-1]] = replacement
                self.write(json.dumps(changed))
                loaded = self.state_file().load()
                self.assertTrue(loaded is None or isinstance(loaded, State))
                tried += 1
                self.save_one()
        self.assertGreater(tried, 100)

    def test_wrong_key_shapes(self):
        """
        A keys file whose lines are not [number, key] of scalars, or whose
        keys have the wrong number of fields, is set aside.
        """
        for line in ('{"a": 1}', '[0]', '[0, "key"]', '[0, [[1], 2]]',
                     '[0, ["too", "few"]]', '["0", ["a", "b", "c", "d"]]'):
            self.save_one()
            [keys] = glob.glob(f"{self.path}.keys.[0-9]")
            self.write(line + "\n", keys)
            self.assertIsNone(self.state_file().load(), line)
            self.assertFalse(os.path.exists(self.path), line)

    def test_fifo(self):
        """
        A FIFO where the state file or its keys file should be is set
        aside at once: opening it for reading would wait forever for a
        writer.
        """
        os.mkfifo(self.path)
        self.assertSetAside()
        self.save_one()
        [keys] = glob.glob(f"{self.path}.keys.*")
        os.unlink(keys)
        os.mkfifo(keys)
        self.assertIsNone(self.state_file().load())
        self.assertTrue(glob.glob(keys + ".bad-*"))

    def test_too_large(self):
        """
        A state file larger than any failnozzle writes is set aside
        unread.
        """
        self.patch(state, "_MAX_STATE_BYTES", 100)
        self.write(" " * 101)
        self.assertSetAside()

    def test_directory(self):
        """
        A directory where the state file should be is set aside too.
        """
        os.mkdir(self.path)
        self.assertSetAside()

    def test_set_aside_keys_kept(self):
        """
        The keys files set aside with a snapshot are not removed by the
        snapshots written after.
        """
        self.save_one()
        self.write("{not json")
        self.assertIsNone(self.state_file().load())
        self.save_one()
        self.assertEqual(len(glob.glob(self.path + ".keys.*.bad-*")), 1)


class RekeyTests(SynchronousTestCase):
    """
    Keys saved with other UNIQUE_MSG_TUPLE fields are read by name.
    """

    def setUp(self):
        self.path = self.mktemp()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)),
                    exist_ok=True)

    def test_fields_changed(self):
        """
        A field dropped is gone from every key, one added is None, the
        order follows the new fields; entries that become one are merged,
        held batches included.
        """
        old = StateFile(self.path, Clock(), fields=FIELDS)
        old.save(lambda: State(
            Batch.of([entry("a", {"web1": 2}), entry("b", {"web2": 3})]),
            {"digest": Batch.of([entry("c", {"web1": 1}, first=0.5)])}))
        new = StateFile(self.path, Clock(),
                        fields=("exc_text", "module", "kind"))
        state = new.load()
        [merged] = state.buffer.entries
        self.assertEqual(merged.key, ("Traceback\n" + "x" * 500, "views",
                                      None))
        self.assertEqual(merged.sources, {"web1": 2, "web2": 3})
        [held] = state.held["digest"].entries
        self.assertEqual(held.key, merged.key)
        self.assertEqual(held.first_seen, 0.5)

    def test_version_2_same_fields(self):
        """
        A snapshot of the previous format, which saved no field names, is
        read when its keys have as many fields as now.
        """
        StateFile(self.path, Clock(), fields=FIELDS).save(
            lambda: State(Batch.of([entry("a")])))
        snapshot = snapshot_document(self.path)
        snapshot["version"] = 2
        del snapshot["fields"], snapshot["wall_offset"]
        with open(self.path, "w") as out:
            json.dump(snapshot, out)
        [loaded] = StateFile(self.path, Clock(),
                             fields=FIELDS).load().buffer.entries
        self.assertEqual(loaded.key, entry("a").key)
        self.assertIsNone(StateFile(self.path, Clock(),
                                    fields=("message",)).load())


class KeptStateTests(SynchronousTestCase):
    """
    What a snapshot keeps besides the buffer and the held errors.
    """

    def setUp(self):
        self.path = self.mktemp()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)),
                    exist_ok=True)

    def test_unsettled(self):
        """
        Errors whose digest is not yet safe in the spool are saved, and
        replaced like held batches.
        """
        states = StateFile(self.path, Clock())
        first = Batch.of([entry("unsettled")])
        states.save(lambda: State(unsettled={"digest": first}))
        self.assertEqual(StateFile(self.path, Clock()).load().unsettled,
                         {"digest": first})
        states.save(lambda: State(changes_only=True))
        self.assertEqual(StateFile(self.path, Clock()).load().unsettled, {})

    def test_wall_offset(self):
        """
        Times are saved with how far wall-clock time was ahead of the
        clock, and read back moved to the clock of the run reading them,
        so they still name the same moment.
        """
        StateFile(self.path, Clock(), wall_offset=lambda: 100.0).save(
            lambda: State(Batch.of([entry("a", first=1000.0,
                                          last=2000.0)])))
        [loaded] = StateFile(self.path, Clock(),
                             wall_offset=lambda: -500.0).load().buffer.entries
        self.assertEqual((loaded.first_seen, loaded.last_seen),
                         (1600.0, 2600.0))

    def test_private(self):
        """
        The state file and its keys file are readable by their owner only,
        whatever the umask, even if they were not before.
        """
        previous = os.umask(0)
        self.addCleanup(os.umask, previous)
        with open(self.path, "w"):
            pass
        os.chmod(self.path, 0o666)
        StateFile(self.path, Clock()).save(
            lambda: State(Batch.of([entry("a")])))
        for path in [self.path, *glob.glob(f"{self.path}.keys.*")]:
            self.assertEqual(os.stat(path).st_mode & 0o777, 0o600, path)
