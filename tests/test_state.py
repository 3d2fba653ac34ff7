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
from failnozzle.state import State, StateFile


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
        self.assertLess(os.path.getsize(self.path), 200)
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
