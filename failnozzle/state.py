"""
Snapshots of what has been counted, written every SNAPSHOT_SECONDS so a
crash loses at most that much, and read back at start.

A unique error's key (with its traceback, often kilobytes) is written once,
appended to a keys file, and the snapshot proper refers to it by number: the
file rewritten every second then holds only counts, so writing it costs
milliseconds even with thousands of unique errors, and the reactor keeps
reading datagrams.

  STATE_FILE           {version, generation, buffer, held, rate_window}
                       replaced atomically (written beside, fsynced, renamed)
  STATE_FILE.keys.G    one JSON line per key: [number, key]; appended to and
                       fsynced before any snapshot refers to its numbers, and
                       begun afresh (generation G + 1) once it holds mostly
                       keys no longer counted
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from failnozzle.aggregate import Batch, Entry
from failnozzle.spool import fsync_directory

_log = Logger()

FORMAT_VERSION = 2

#: Begin a new keys file once it holds this many more keys than are counted.
_COMPACT_SLACK = 1000


@dataclass
class State:
    """What a snapshot holds."""

    buffer: Batch = field(default_factory=Batch)
    held: dict = field(default_factory=dict)
    rate_window: list = field(default_factory=list)


class StateFile:
    """
    The snapshots: L{save} one now and then, L{load} the last one at start.
    """

    def __init__(self, path: str, clock: IReactorTime,
                 in_thread: Callable[..., defer.Deferred] = defer.maybeDeferred
                 ) -> None:
        """
        @param in_thread: runs the blocking writes: C{deferToThread} in the
            daemon; by default they run at once, in this thread.
        """
        self.path = os.path.abspath(path)
        self._clock = clock
        self._in_thread = in_thread
        self._lock = defer.DeferredLock()
        self._generation = 0
        self._numbers: dict = {}

    def _keys_path(self, generation: int) -> str:
        return f"{self.path}.keys.{generation}"

    @property
    def busy(self) -> bool:
        """Whether a snapshot is being written."""
        return self._lock.locked

    def save(self, current: Callable[[], State]) -> defer.Deferred:
        """
        Write a snapshot of C{current()}, called once any snapshot being
        written is done, so it is never out of date and may be a view of
        live data: it is read at once, on the reactor.  The encoding,
        writing and fsyncing is done with C{in_thread}.

        @return: a Deferred firing once it is on disk, or failing with the
            OSError that kept it off.
        """
        return self._lock.run(lambda: self._save(current()))

    def _save(self, state: State) -> defer.Deferred:
        batches = [state.buffer, *state.held.values()]
        live = {entry.key for batch in batches for entry in batch.entries}
        if len(self._numbers) > len(live) + _COMPACT_SLACK:
            self._begin_generation()
        numbered = {}
        for key in live:
            if key not in self._numbers:
                numbered[key] = len(self._numbers) + len(numbered)
        number = {**self._numbers, **numbered}.__getitem__
        snapshot = {
            "version": FORMAT_VERSION,
            "generation": self._generation,
            "buffer": _rows(state.buffer, number),
            "held": {kind: _rows(batch, number)
                     for kind, batch in state.held.items()},
            "rate_window": list(state.rate_window),
        }
        writing = self._in_thread(self._write, self._generation,
                                  list(numbered.items()), snapshot)
        writing.addCallbacks(lambda _: self._numbers.update(numbered),
                             self._write_failed)
        return writing

    def _write(self, generation: int, numbered: list, snapshot: dict) -> None:
        """
        The slow part, given only data no one else changes: encode and
        append the new keys (one by one, so the reactor's thread gets its
        turns), then encode and replace the snapshot.
        """
        keys_path = self._keys_path(generation)
        if numbered or not os.path.exists(keys_path):
            with open(keys_path, "a", encoding="utf-8") as keys:
                for key, n in numbered:
                    keys.write(json.dumps([n, list(key)]) + "\n")
                keys.flush()
                os.fsync(keys.fileno())
        temporary = f"{self.path}.tmp"
        with open(temporary, "w", encoding="utf-8") as out:
            out.write(_encode(snapshot))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.path)
        fsync_directory(os.path.dirname(self.path))
        self._remove_old_generations(generation)

    def _write_failed(self, failure):
        # The keys file may end in half a line: number afresh in a new one.
        self._begin_generation()
        return failure

    def _begin_generation(self) -> None:
        """Start a new keys file, holding only the keys saved from now on."""
        self._generation += 1
        self._numbers = {}

    def _remove_old_generations(self, generation: int) -> None:
        for path in glob.glob(f"{glob.escape(self.path)}.keys.*"):
            if path != self._keys_path(generation):
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def load(self) -> Optional[State]:
        """
        The last snapshot; None if there is none or it is unusable, in which
        case its files are moved aside (never deleted) and the reason logged.
        Later snapshots go on numbering keys after those read.
        """
        try:
            with open(self.path, encoding="utf-8") as saved:
                data = json.load(saved)
            if data.get("version") != FORMAT_VERSION:
                raise ValueError(f"unknown format {data.get('version')!r}")
            generation = int(data["generation"])
            keys = self._read_keys(generation)
            state = State(
                _batch(data["buffer"], keys),
                {kind: _batch(rows, keys)
                 for kind, rows in data["held"].items()},
                [int(count) for count in data["rate_window"]],
            )
        except (FileNotFoundError, NotADirectoryError) as error:
            # No snapshot at all is no trouble (and a directory that cannot
            # hold one is reported when saving fails); a snapshot without
            # its keys file is.
            if error.filename != self.path:
                self._set_aside(error)
            return None
        except (OSError, ValueError, KeyError, TypeError,
                AttributeError) as error:
            self._set_aside(error)
            return None
        self._generation = generation + 1
        return state

    def _read_keys(self, generation: int) -> dict:
        """Number to key; a line cut short by a crash is not needed."""
        keys = {}
        with open(self._keys_path(generation), encoding="utf-8") as lines:
            for line in lines:
                try:
                    number, key = json.loads(line)
                except ValueError:
                    break
                keys[number] = tuple(key)
        return keys

    def _set_aside(self, error: Exception) -> None:
        """Move unusable snapshot files out of the way, saying why."""
        suffix = f".bad-{int(self._clock.seconds())}"
        moved = []
        keys_files = glob.glob(f"{glob.escape(self.path)}.keys.*")
        for path in [self.path, *keys_files]:
            try:
                os.replace(path, path + suffix)
                moved.append(path + suffix)
            except OSError:
                pass
        _log.error("STATE_FILE {path} is unusable ({error}); moved to "
                   "{aside}, starting with an empty buffer",
                   path=self.path, error=error,
                   aside=", ".join(moved) or "nowhere")


def _rows(batch: Batch, number: Callable[[tuple], int]) -> dict:
    """A batch as plain JSON data, keys replaced by their numbers."""
    return {
        "entries": [[number(e.key), list(e.sources.items()), e.first_seen,
                     e.last_seen, *_level(e)] for e in batch.entries],
        "overflow": batch.overflow,
    }


def _level(entry: Entry) -> list:
    """The entry's level as a row's optional last item."""
    return [] if entry.level is None else [entry.level]


def _encode(value: object) -> str:
    """
    JSON, encoded a list item or a dict value at a time: one call of the
    C encoder over the whole snapshot would hold the GIL, and so keep the
    reactor from reading datagrams, for as long as it runs.
    """
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_encode(v)}"
                              for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(map(json.dumps, value)) + "]"
    return json.dumps(value)


def _batch(rows: dict, keys: dict) -> Batch:
    """A batch from the rows L{_rows} wrote."""
    return Batch.of(
        (Entry(keys[number], {source: int(count) for source, count in sources},
               float(first), float(last), *map(int, level))
         for number, sources, first, last, *level in rows["entries"]),
        int(rows["overflow"]))
