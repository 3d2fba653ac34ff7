"""
Snapshots of what has been counted, written every SNAPSHOT_SECONDS so a
crash loses at most that much, and read back at start.

A unique error's key (with its traceback, often kilobytes) is written once,
appended to a keys file, and the snapshot proper refers to it by number: the
file rewritten every second then holds only counts, so writing it costs
milliseconds even with thousands of unique errors, and the reactor keeps
reading datagrams.  The counts are kept encoded from one snapshot to the
next, so a snapshot reads and encodes only the errors counted since the
last one: its cost on the reactor grows with what changed, not with the
size of the buffer.

  STATE_FILE           {version, generation, buffer, held, rate_window}
                       replaced atomically (written beside, fsynced, renamed)
  STATE_FILE.keys.G    one JSON line per key: [number, key]; appended to and
                       fsynced before any snapshot refers to its numbers, and
                       begun afresh (generation G + 1) once it holds mostly
                       keys no longer counted
"""
from __future__ import annotations

import glob
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import orjson
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
    #: When saving: C{buffer} holds only the errors counted since the last
    #: snapshot, the others being as that one saved them (its overflow is
    #: the whole buffer's).
    changes_only: bool = False
    #: When saving: the entries bad input is counted under, saved whole
    #: each time (see L{failnozzle.aggregate.Aggregator.bad_input}); a
    #: loaded buffer holds them.
    bad_input: tuple = ()


@dataclass
class _Snapshot:
    """What one snapshot writes, as data no one changes meanwhile."""

    generation: int
    new_keys: list  # [number, key] pairs for the keys file
    rows: Iterable  # the buffer's, encoded
    overflow: int
    held: dict  # kind: the batch, encoded
    rate_window: list


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
        #: The keys of this generation's keys file, and their numbers.
        self._numbers: dict = {}
        self._needs_whole = True
        #: What the last snapshot wrote, encoded, for the next one to
        #: write again with only what changed: the buffer's rows by number,
        #: each held batch by kind (with the batch, to tell it is the same).
        self._buffer_rows: dict = {}
        self._held_rows: dict = {}

    def _keys_path(self, generation: int) -> str:
        return f"{self.path}.keys.{generation}"

    @property
    def busy(self) -> bool:
        """Whether a snapshot is being written."""
        return self._lock.locked

    @property
    def needs_whole(self) -> bool:
        """
        Whether the next snapshot must be given the whole buffer, not only
        its changes: the first one must, and the first after a failed one.
        """
        return self._needs_whole

    def save(self, current: Callable[[], State]) -> defer.Deferred:
        """
        Write a snapshot of C{current()}, called once any snapshot being
        written is done, so it is never out of date and may be a view of
        live data: it is read at once, on the reactor.  It may hold only
        what changed since the last snapshot (L{State.changes_only}),
        unless L{needs_whole}.  The encoding, writing and fsyncing is done
        with C{in_thread}.

        @return: a Deferred firing once it is on disk, or failing with the
            OSError that kept it off.
        """
        return self._lock.run(lambda: self._save(current()))

    def _save(self, state: State) -> defer.Deferred:
        if state.changes_only and self._needs_whole:
            raise ValueError("this snapshot needs the whole buffer")
        if not state.changes_only:
            # Keys are no longer counted once flushed, so only a whole
            # buffer tells whether most in the keys file are gone.
            live = {entry.key for batch in [state.buffer, *state.held.values()]
                    for entry in batch.entries}
            if len(self._numbers) > len(live) + _COMPACT_SLACK:
                self._begin_generation()
            self._needs_whole = False
            self._buffer_rows = {}
        new_keys = self._number(state.buffer.entries)
        for entry in state.buffer.entries:
            number = self._numbers[entry.key]
            self._buffer_rows[number] = _row(entry, number)
        held_rows = {}
        for kind, batch in state.held.items():
            saved, rows = self._held_rows.get(kind, (None, None))
            if saved is not batch:
                new_keys += self._number(batch.entries)
                rows = _rows(batch, self._numbers)
            held_rows[kind] = (batch, rows)
        self._held_rows = held_rows
        new_keys += self._number(state.bad_input)
        bad_input = [_row(entry, self._numbers[entry.key])
                     for entry in state.bad_input]
        # The rows are handed over as they are: they change only in the
        # next snapshot, which waits for this one to be written.
        snapshot = _Snapshot(
            self._generation, new_keys,
            itertools.chain(self._buffer_rows.values(), bad_input),
            state.buffer.overflow,
            {kind: rows for kind, (_, rows) in held_rows.items()},
            list(state.rate_window))
        writing = self._in_thread(self._write, snapshot)
        writing.addErrback(self._write_failed)
        return writing

    def _number(self, entries: Iterable[Entry]) -> list:
        """
        Number the keys not in this generation's keys file yet (at once:
        should writing them fail, the next snapshot begins a new one).

        @return: C{[number, key]} for each.
        """
        numbered = []
        for entry in entries:
            if entry.key not in self._numbers:
                self._numbers[entry.key] = len(self._numbers)
                numbered.append([self._numbers[entry.key], entry.key])
        return numbered

    def _write(self, snapshot: _Snapshot) -> None:
        """
        The slow part: append the new keys (encoded one by one, so the
        reactor's thread gets its turns), then write and replace the
        snapshot.
        """
        keys_path = self._keys_path(snapshot.generation)
        if snapshot.new_keys or not os.path.exists(keys_path):
            with open(keys_path, "a", encoding="utf-8") as keys:
                for number, key in snapshot.new_keys:
                    keys.write(_dumps([number, key], key) + "\n")
                keys.flush()
                os.fsync(keys.fileno())
        temporary = f"{self.path}.tmp"
        with open(temporary, "w", encoding="utf-8") as out:
            out.writelines(_pieces(snapshot))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.path)
        fsync_directory(os.path.dirname(self.path))
        self._remove_old_generations(snapshot.generation)

    def _write_failed(self, failure):
        # The keys file may end in half a line: number afresh in a new one,
        # from the whole buffer.
        self._begin_generation()
        return failure

    def _begin_generation(self) -> None:
        """
        Start a new keys file, holding only the keys saved from now on,
        with a snapshot of the whole buffer.
        """
        self._generation += 1
        self._numbers = {}
        self._held_rows = {}
        self._needs_whole = True

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


def _pieces(snapshot: _Snapshot) -> Iterator[str]:
    """
    The snapshot as JSON, in pieces: its rows are not joined into one
    string, which would be copied again to be written.
    """
    yield (f'{{"version": {FORMAT_VERSION}, '
           f'"generation": {snapshot.generation}, "buffer": {{"entries": [')
    rows = iter(snapshot.rows)
    yield next(rows, "")
    for row in rows:
        yield ","
        yield row
    held = ", ".join(f"{json.dumps(kind)}: {rows}"
                     for kind, rows in snapshot.held.items())
    yield (f'], "overflow": {snapshot.overflow}}}, "held": {{{held}}}, '
           f'"rate_window": {json.dumps(snapshot.rate_window)}}}')


def _rows(batch: Batch, numbers: dict) -> str:
    """A batch as JSON, keys replaced by their C{numbers}."""
    rows = ",".join(_row(entry, numbers[entry.key]) for entry in batch.entries)
    return f'{{"entries": [{rows}], "overflow": {batch.overflow}}}'


def _row(entry: Entry, number: int) -> str:
    """One entry as JSON, its key replaced by its C{number}."""
    return _dumps([number, list(entry.sources.items()), entry.first_seen,
                   entry.last_seen, *_optional(entry)], entry.sources)


def _optional(entry: Entry) -> list:
    """
    The entry's level and other_sources, the optional last items of a
    row, left out when they say nothing.
    """
    if entry.other_sources:
        return [entry.level, entry.other_sources]
    return [] if entry.level is None else [entry.level]


def _dumps(value: list, scalars: Iterable) -> str:
    """
    C{value} as JSON, by orjson, ten times as fast as the standard library,
    unless one of C{scalars} (those in C{value} that may be any JSON
    value) is what it refuses (lone surrogates, integers past 64 bits) or
    writes as null (infinities, NaN): the standard library writes those as
    Python's json reads them.
    """
    if all(math.isfinite(item) for item in scalars if type(item) is float):
        try:
            return orjson.dumps(value).decode()
        except orjson.JSONEncodeError:
            pass
    return json.dumps(value)


def _batch(rows: dict, keys: dict) -> Batch:
    """A batch from the rows L{_rows} wrote."""
    return Batch.of(
        (Entry(keys[number], {source: int(count) for source, count in sources},
               float(first), float(last), *_optional_items(optional))
         for number, sources, first, last, *optional in rows["entries"]),
        int(rows["overflow"]))


def _optional_items(items: list) -> tuple:
    """The level (or None) and other_sources a row ends with, if any."""
    level = None if not items or items[0] is None else int(items[0])
    return (level, int(items[1]) if len(items) > 1 else 0)
