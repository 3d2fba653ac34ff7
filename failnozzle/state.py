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

  STATE_FILE           {version, generation, fields, wall_offset, buffer,
                       held, unsettled, rate_window}, in the slots of
                       L{failnozzle.slots}: overwritten in place by turns,
                       the newest whole one read back
  STATE_FILE.keys.G    one JSON line per key: [number, key]; appended to and
                       fsynced before any snapshot refers to its numbers, and
                       begun afresh (generation G + 1) once it holds mostly
                       keys no longer counted

Keys are saved with the names of their fields, so a run whose
UNIQUE_MSG_TUPLE differs reads them by name.  Nothing in these files can
keep the daemon from starting: a file that is not what this module wrote is
set aside whole (C{.bad-<time>}) with one log line, however it is wrong.
"""
from __future__ import annotations

import glob
import hashlib
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

from failnozzle.aggregate import SCALAR_TYPES, Batch, Entry, rekeying
from failnozzle.clock import LAST_SECOND
from failnozzle.fingerprint import MAX_EXAMPLES
from failnozzle.slots import SlotFile, Unreadable
from failnozzle.spool import (BadEntry, fsync_directory, open_private,
                              open_regular)
from failnozzle.textcap import one_line

_log = Logger()

FORMAT_VERSION = 4
#: Versions L{StateFile.load} reads: 2 had no field names, 2 and 3 no
#: fingerprints.
_READABLE_VERSIONS = (2, 3, 4)

#: The largest quick snapshot put into its file from the reactor; a larger
#: one is written by the disk writer (the next snapshot waiting for it), so
#: a put costs the reactor at most that much copying.
PUT_MAX = 64 * 1024

#: Begin a new keys file once it holds this many more keys than are counted.
_COMPACT_SLACK = 1000

#: The largest state file and key line read: far above what failnozzle
#: writes, and a bound on what a damaged or hostile file can cost.
_MAX_STATE_BYTES = 256 * 1024 * 1024
_MAX_KEY_LINE_BYTES = 64 * 1024 * 1024


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
    #: Per digest kind, errors whose digest is not yet safe: handed to the
    #: outbox but not yet in the spool, or kept in memory only because the
    #: spool could not take it.  A run that finds them reports them again.
    unsettled: dict = field(default_factory=dict)
    #: Where the pager's alert stands (L{failnozzle.pager.Pager.saved});
    #: None: not over the limit.
    pager: Optional[dict] = None
    #: When the last canary came (L{failnozzle.pager.CanaryWatch.saved}).
    canary: Optional[dict] = None
    #: By route, its pager's window counts and alert: C{{"counts": [...],
    #: "alert": ...}}; None: no route pages.
    route_pagers: Optional[dict] = None
    #: When saving: for senders told "got it" once a crash of the daemon
    #: can no longer lose their errors (not of the machine): put into the
    #: file's page cache if it can be, not synced (see L{StateFile.save}).
    quick: bool = False


class _Unusable(ValueError):
    """A snapshot file is not what this module writes; the text says how."""


@dataclass
class _Snapshot:
    """What one snapshot writes, as data no one changes meanwhile."""

    generation: int
    #: Whether the keys file is begun by this snapshot: written anew, not
    #: appended to, whatever an earlier run left at that name.
    fresh_keys: bool
    fields: Optional[list]
    wall_offset: float
    new_keys: list  # [number, key] pairs for the keys file
    rows: Iterable  # the buffer's, encoded
    overflow: int
    batches: dict  # "held" and "unsettled": kind: the batch, encoded
    rate_window: list
    pager: Optional[dict]
    canary: Optional[dict]
    route_pagers: Optional[dict]


class StateFile:
    """
    The snapshots: L{save} one now and then, L{load} the last one at start.
    """

    def __init__(self, path: str, clock: IReactorTime,
                 in_thread: Callable[..., defer.Deferred] = defer.maybeDeferred,
                 fields: Optional[tuple] = None,
                 wall_offset: Callable[[], float] = lambda: 0.0) -> None:
        """
        @param in_thread: runs the blocking writes: the disk writer in the
            daemon; by default they run at once, in this thread.
        @param fields: the names of the fields of a key (UNIQUE_MSG_TUPLE),
            saved so a later run whose fields differ can read keys by name;
            None: keys are taken as they are.
        @param wall_offset: how far wall-clock time is ahead of the clock's
            time now, saved with the times so a later run shows them right.
        """
        self.path = os.path.abspath(path)
        self._clock = clock
        self._in_thread = in_thread
        self._fields = None if fields is None else tuple(fields)
        self._wall_offset = wall_offset
        self._lock = defer.DeferredLock()
        self._slots = SlotFile(self.path)
        self._generation = 0
        #: The keys of this generation's keys file, and their numbers.
        self._numbers: dict = {}
        self._needs_whole = True
        #: The generation whose keys file this object has begun.
        self._keys_begun: Optional[int] = None
        #: What the last snapshot wrote, encoded, for the next one to
        #: write again with only what changed: the buffer's rows by number,
        #: and for "held" and "unsettled" each batch by kind (with the
        #: batch, to tell it is the same).
        self._buffer_rows: dict = {}
        self._batch_rows: dict = {}

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
        live data: it is read and encoded at once, on the reactor.  It may
        hold only what changed since the last snapshot
        (L{State.changes_only}), unless L{needs_whole}.  A L{State.quick}
        one is put into the file at once, when it is small, has no new
        keys and fits; any other is written and synced with C{in_thread}
        (with its new keys first), and the next waits for it.

        @return: a Deferred firing once it is in the file (quick) or on the
            disk, or failing with the OSError that kept it from there.
        """
        return self._lock.run(lambda: self._save(current()))

    def _save(self, state: State) -> Optional[defer.Deferred]:
        if state.changes_only and self._needs_whole:
            raise ValueError("this snapshot needs the whole buffer")
        kept = {"held": state.held, "unsettled": state.unsettled}
        if not state.changes_only:
            # Keys are no longer counted once flushed, so only a whole
            # buffer tells whether most in the keys file are gone.
            live = {entry.key for batch in [
                state.buffer, *state.held.values(), *state.unsettled.values()]
                for entry in batch.entries}
            if len(self._numbers) > len(live) + _COMPACT_SLACK:
                self._begin_generation()
            self._needs_whole = False
            self._buffer_rows = {}
        new_keys = self._number(state.buffer.entries)
        for entry in state.buffer.entries:
            number = self._numbers[entry.key]
            self._buffer_rows[entry.identity] = _row(entry, number)
        batch_rows = {}
        for name, batches in kept.items():
            batch_rows[name] = {}
            for kind, batch in batches.items():
                saved, rows = self._batch_rows.get(name, {}).get(
                    kind, (None, None))
                if saved is not batch:
                    new_keys += self._number(batch.entries)
                    rows = _rows(batch, self._numbers)
                batch_rows[name][kind] = (batch, rows)
        self._batch_rows = batch_rows
        new_keys += self._number(state.bad_input)
        bad_input = [_row(entry, self._numbers[entry.key])
                     for entry in state.bad_input]
        # The rows are handed over as they are: they change only in the
        # next snapshot, which waits for this one to be written.
        fresh = self._keys_begun != self._generation
        self._keys_begun = self._generation
        snapshot = _Snapshot(
            self._generation, fresh,
            None if self._fields is None else list(self._fields),
            self._wall_offset(), new_keys,
            itertools.chain(self._buffer_rows.values(), bad_input),
            state.buffer.overflow,
            {name: {kind: rows for kind, (_, rows) in batches.items()}
             for name, batches in batch_rows.items()},
            list(state.rate_window), state.pager, state.canary,
            state.route_pagers)
        payload = "".join(_pieces(snapshot)).encode("utf-8")
        sequence = self._slots.number()
        if (state.quick and not (snapshot.new_keys or snapshot.fresh_keys)
                and len(payload) <= PUT_MAX
                and self._slots.fits(len(payload))):
            self._slots.put(payload, sequence)
            return None
        writing = self._in_thread(self._write, snapshot, payload, sequence)
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

    def _write(self, snapshot: _Snapshot, payload: bytes,
               sequence: int) -> None:
        """
        The slow part: append the new keys (encoded one by one, so the
        reactor's thread gets its turns), then write the snapshot's
        C{payload}.  Both files are readable by their owner only: they hold
        tracebacks.
        """
        keys_path = self._keys_path(snapshot.generation)
        if snapshot.new_keys or snapshot.fresh_keys:
            mode = "w" if snapshot.fresh_keys else "a"
            with open_private(keys_path, mode, encoding="utf-8") as keys:
                for number, key in snapshot.new_keys:
                    keys.write(_dumps([number, key], key) + "\n")
                keys.flush()
                os.fsync(keys.fileno())
            if snapshot.fresh_keys:
                # Its name too, before a snapshot on the disk refers to it.
                fsync_directory(os.path.dirname(keys_path))
        self._slots.write(payload, sequence)
        if snapshot.fresh_keys:
            self._remove_old_generations(snapshot.generation)

    def _write_failed(self, failure):
        # The keys file may end in half a line: number afresh in a new one,
        # from the whole buffer.
        self._begin_generation()
        return failure

    def configure(self, path: str, fields: Optional[tuple]
                  ) -> defer.Deferred:
        """
        Take a reload's STATE_FILE and fields of a key, once the snapshots
        asked for before are written: the next snapshot is whole, in a new
        keys file, at C{path} (replacing what may be there).  The snapshot
        at the old path, if it moved, is removed (see L{retire}).

        @return: a Deferred firing once done, or failing with the OSError
            that kept the old snapshot from being removed.
        """
        def change() -> defer.Deferred:
            old, self.path = self.path, os.path.abspath(path)
            old_slots = self._new_slots()
            self._fields = None if fields is None else tuple(fields)
            self._begin_generation()
            return self._in_thread(_let_go, old_slots,
                                   old if old != self.path else None)

        return self._lock.run(change)

    def retire(self) -> defer.Deferred:
        """
        Remove the snapshot and its keys files once the snapshots asked for
        before are written, for snapshots turned off: what they hold is
        this run's to deliver, and a later start restoring it would send
        it again.  Should snapshots be taken again, the next is whole.

        @return: a Deferred firing once removed, or failing with the
            OSError that kept them.
        """
        def remove() -> defer.Deferred:
            self._begin_generation()
            return self._in_thread(_let_go, self._new_slots(), self.path)

        return self._lock.run(remove)

    def _new_slots(self) -> SlotFile:
        """
        Write the next snapshot into a new file at C{path}.

        @return: the slots written so far, for L{_let_go} once the syncs
            asked for are done.
        """
        old, self._slots = self._slots, SlotFile(self.path)
        return old

    def _begin_generation(self) -> None:
        """
        Start a new keys file, holding only the keys saved from now on,
        with a snapshot of the whole buffer.
        """
        self._generation += 1
        self._numbers = {}
        self._batch_rows = {}
        self._needs_whole = True

    def _remove_old_generations(self, generation: int) -> None:
        for path in _keys_files(self.path):
            if path != self._keys_path(generation):
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def load(self) -> Optional[State]:
        """
        The last snapshot; None if there is none or it is unusable, in which
        case its files are moved aside (never deleted) and the reason logged.
        Keys saved with other fields are read by field name.  Later
        snapshots go on numbering keys after those read.
        """
        try:
            data = self._slots.read(_MAX_STATE_BYTES)
        except (OSError, BadEntry, Unreadable) as error:
            self._set_aside(error)
            return None
        if data is None:
            # No snapshot at all is no trouble; a directory that cannot
            # hold one is reported when saving fails.
            return None
        try:
            state, generation = self._parse(data)
        # Whatever is wrong with the files, the daemon must start: every
        # error here is a reason to set them aside, never to stop.
        except Exception as error:
            self._set_aside(error)
            return None
        self._generation = generation + 1
        return state

    def _parse(self, data: bytes) -> tuple:
        """
        @return: C{(state, generation)} of a snapshot's bytes.
        @raise Exception: anything; the snapshot is unusable.
        """
        snapshot = _loads(data)
        _check(type(snapshot) is dict, "not a JSON object")
        generation = _count(snapshot.get("generation"), "generation")
        state = _state_of(snapshot, self._fields, self._wall_offset(),
                          lambda wanted, length: self._read_keys(
                              generation, wanted, length))
        return state, generation

    def _read_keys(self, generation: int, wanted: set,
                   length: Optional[int]) -> dict:
        """
        Number to key, for the numbers C{wanted}; a line cut short by a
        crash is not needed.

        @param length: how many fields a key has, if known.
        """
        keys = {}
        with open_regular(self._keys_path(generation)) as lines:
            while True:
                line = lines.readline(_MAX_KEY_LINE_BYTES + 1)
                if len(line) > _MAX_KEY_LINE_BYTES:
                    raise _Unusable("a key line is too long")
                if not line.endswith(b"\n"):
                    break
                pair = _loads(line)
                _check(type(pair) is list and len(pair) == 2
                       and type(pair[0]) is int and type(pair[1]) is list,
                       "a key line is not [number, key]")
                number, key = pair
                if number in wanted:
                    keys[number] = checked_key(key, length)
        missing = wanted - keys.keys()
        _check(not missing, f"{len(missing)} keys missing from the keys file")
        return keys

    def _set_aside(self, error: Exception) -> None:
        """Move unusable snapshot files out of the way, saying why; the
        next snapshot makes a new file."""
        self._slots.close()
        self._slots = SlotFile(self.path)
        suffix = f".bad-{int(self._clock.seconds())}"
        moved = []
        for path in [self.path, *_keys_files(self.path)]:
            aside = _unused_name(path + suffix)
            try:
                os.rename(path, aside)
                moved.append(aside)
            except OSError:
                pass
        reason = str(error) or type(error).__name__
        _log.error("STATE_FILE {path} is unusable ({error}); moved to "
                   "{aside}, starting with an empty buffer",
                   path=self.path, error=one_line(reason)[:200],
                   aside=", ".join(moved) or "nowhere")


def _keys_files(path: str) -> list:
    """The keys files of the snapshot at C{path}, but those set aside as
    unreadable (C{.bad-<time>})."""
    return [name for name in glob.glob(f"{glob.escape(path)}.keys.*")
            if ".bad-" not in name[len(path):]]


def _let_go(slots: SlotFile, remove: Optional[str]) -> None:
    """
    Close C{slots}, then remove the snapshot at C{remove}, if any, and its
    keys files (not those set aside as unreadable).
    """
    slots.close()
    if remove is None:
        return
    for name in [remove, *_keys_files(remove)]:
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
    fsync_directory(os.path.dirname(remove))


def _state_of(snapshot: dict, fields: Optional[tuple], wall_offset: float,
              read_keys: Callable[[set, Optional[int]], dict]) -> State:
    """
    The state a snapshot's JSON object holds, its keys read by
    C{read_keys(wanted, length)} (what they are numbered or named by, and
    how many fields each has, if known), cut to C{fields}, its times moved
    to a clock C{wall_offset} behind the wall clock.
    """
    version = snapshot.get("version")
    _check(version in _READABLE_VERSIONS, f"unknown format {version!r}")
    saved_fields = snapshot.get("fields", fields)
    _check(saved_fields is None or (
        type(saved_fields) in (list, tuple) and saved_fields
        and all(type(name) is str for name in saved_fields)), "bad fields")
    shift = 0.0
    if "wall_offset" in snapshot:
        saved = snapshot["wall_offset"]
        _check(type(saved) in (int, float) and math.isfinite(saved),
               "bad wall_offset")
        shift = saved - wall_offset
    batches = _batches_of(snapshot)
    keys = read_keys(_wanted(batches),
                     len(saved_fields) if saved_fields else None)
    rekey = (None if saved_fields is None or fields is None
             or tuple(saved_fields) == tuple(fields)
             else rekeying(saved_fields, fields))
    read = {name: _batch(batch, keys, rekey, shift)
            for name, batch in batches.items()}
    rate_window = snapshot.get("rate_window", [])
    _check(type(rate_window) is list and len(rate_window) <= 10000,
           "bad rate_window")
    return State(
        read.pop("buffer"),
        {kind: batch for (name, kind), batch in read.items()
         if name == "held"},
        [_count(count, "a rate_window count") for count in rate_window],
        unsettled={kind: batch for (name, kind), batch in read.items()
                   if name == "unsettled"},
        bad_input=tuple(entry for (name, _), batch in read.items()
                        if name == "bad_input" for entry in batch.entries),
        pager=_pager(snapshot.get("pager"), shift),
        canary=_canary(snapshot.get("canary"), shift),
        route_pagers=_route_pagers(snapshot.get("route_pagers"), shift))


def _batches_of(snapshot: dict) -> dict:
    """A snapshot's batches, checked, by C{"buffer"} or C{(name, kind)}."""
    batches = {"buffer": snapshot.get("buffer")}
    for name in ("held", "unsettled", "bad_input"):
        kept = snapshot.get(name, {})
        _check(type(kept) is dict, f"bad {name}")
        for kind, batch in kept.items():
            batches[(name, kind)] = batch
    for batch in batches.values():
        _check(type(batch) is dict and type(batch.get("entries")) is list,
               "a batch without entries")
    return batches


def _wanted(batches: dict) -> set:
    """What the rows of C{batches} name their keys by."""
    return {row[0] for batch in batches.values() for row in batch["entries"]
            if type(row) is list and row and type(row[0]) in (int, str)}


def parse_shared(document: bytes) -> dict:
    """
    A L{shared_document}'s JSON object, parsed once for both
    L{shared_key_ids} and L{read_shared}.

    @raise ValueError: it is not a JSON object.
    """
    snapshot = _loads(document)
    _check(type(snapshot) is dict, "not a JSON object")
    return snapshot


def shared_key_ids(snapshot: dict) -> set:
    """
    The key ids a parsed L{shared_document} names, to fetch their texts
    before it is read.

    @raise ValueError: it is not such a document.
    """
    try:
        return {key_id for key_id in _wanted(_batches_of(snapshot))
                if type(key_id) is str}
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"unusable ({error!r})") from None


def checked_key(key: object, length: Optional[int]) -> tuple:
    """A key as read back (a list of JSON scalars, C{length} of them if
    known), as a tuple; ValueError if it is not one."""
    _check(type(key) is list and (length is None or len(key) == length)
           and all(type(value) in SCALAR_TYPES for value in key),
           "a key of the wrong shape")
    return tuple(key)


def key_text(key: tuple) -> str:
    """A key as JSON, as the keys file and the cluster keep it."""
    return _dumps(list(key), key)


def key_of_text(text: bytes) -> tuple:
    """
    The key a L{key_text} holds, as another node stored it (its JSON may
    be what only the standard library reads: NaN, lone surrogates).

    @raise ValueError: it is not a key.
    """
    return checked_key(_loads(text), None)


def key_id(text: str) -> str:
    """
    What names a key by its content (of its L{key_text}): the same on
    every node, so a key sent by any of them is stored once.
    """
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"),
                           digest_size=12).hexdigest()


def shared_document(state: State, wall_offset: float,
                    fields: Optional[tuple]) -> tuple:
    """
    A state as one JSON document that names its keys by L{key_id} instead
    of holding them, for another process to read (see L{read_shared}).

    @return: C{(document, texts)}: its bytes, and each key's text by id.
    """
    numbers: dict = {}
    texts: dict = {}
    bad_input = Batch(state.bad_input)
    for batch in (state.buffer, *state.held.values(),
                  *state.unsettled.values(), bad_input):
        for entry in batch.entries:
            if entry.key not in numbers:
                text = key_text(entry.key)
                numbers[entry.key] = key_id(text)
                texts[numbers[entry.key]] = text
    snapshot = _Snapshot(
        0, False, None if fields is None else list(fields), wall_offset, [],
        [_row(entry, numbers[entry.key]) for entry in state.buffer.entries],
        state.buffer.overflow,
        {"held": {kind: _rows(batch, numbers)
                  for kind, batch in state.held.items()},
         "unsettled": {kind: _rows(batch, numbers)
                       for kind, batch in state.unsettled.items()},
         # Which of the buffer's errors are bad input (a push's): the
         # pager leaves them out, as a single node does.
         "bad_input": {"": _rows(bad_input, numbers)} if bad_input.entries
         else {}},
        list(state.rate_window), state.pager, state.canary,
        state.route_pagers)
    return "".join(_pieces(snapshot)).encode("utf-8", "surrogatepass"), texts


def read_shared(snapshot: dict, wall_offset: float, fields: Optional[tuple],
                read_keys: Callable[[set, Optional[int]], dict]) -> State:
    """
    The state a parsed L{shared_document} holds (see L{parse_shared}), its
    keys read by C{read_keys(ids, length)}, which gives each key of C{ids}
    checked (see L{checked_key}) or raises.

    @raise ValueError: it is not such a document, or a key is missing.
    """
    try:
        return _state_of(snapshot, fields, wall_offset, read_keys)
    except (KeyError, TypeError, AttributeError, RecursionError) as error:
        raise ValueError(f"unusable ({error!r})") from None


def _unused_name(path: str) -> str:
    """C{path}, or C{path.N} for the first N that names nothing yet."""
    candidates = itertools.chain(
        [path], (f"{path}.{number}" for number in itertools.count(1)))
    return next(name for name in candidates if not os.path.lexists(name))


def _check(condition: bool, problem: str) -> None:
    if not condition:
        raise _Unusable(problem)


def _count(value: object, what: str) -> int:
    """A count as a snapshot holds one: a whole number, 0 or more."""
    _check(type(value) is int and 0 <= value < 2 ** 63, f"bad {what}")
    return value


def _time(value: object, shift: float) -> float:
    """A reactor time of a snapshot, moved to this run's clock."""
    _check(type(value) in (int, float) and 0 <= value <= LAST_SECOND,
           "bad time")
    return min(max(float(value) + shift, 0.0), LAST_SECOND)


def _pager(saved: object, shift: float) -> Optional[dict]:
    """Where the pager's alert stood, its times on this run's clock."""
    if saved is None:
        return None
    _check(type(saved) is dict and saved.get("since") is not None,
           "bad pager")
    return {"since": _time(saved["since"], shift),
            "last_paged": _time(saved.get("last_paged"), shift),
            "total": _count(saved.get("total"), "a pager total"),
            "below": _count(saved.get("below"), "a pager count")}


def _route_pagers(saved: object, shift: float) -> Optional[dict]:
    """The pagers of the routes that page: window counts and alerts."""
    if saved is None:
        return None
    _check(type(saved) is dict and len(saved) <= 10000, "bad route_pagers")
    kept = {}
    for kind, pager in saved.items():
        _check(type(pager) is dict and type(pager.get("counts")) is list
               and len(pager["counts"]) <= 10000, "bad route pager")
        kept[kind] = {"counts": [_count(count, "a route pager's count")
                                 for count in pager["counts"]],
                      "alert": _pager(pager.get("alert"), shift)}
    return kept


def _canary(saved: object, shift: float) -> Optional[dict]:
    """When the last canary came, and since when they are missed."""
    if saved is None:
        return None
    _check(type(saved) is dict, "bad canary")
    missed = saved.get("missed_since")
    return {"last_seen": _time(saved.get("last_seen"), shift),
            "missed_since": None if missed is None else _time(missed, shift)}


def _loads(data: bytes) -> object:
    """
    JSON as orjson reads it, or as the standard library does what orjson
    refuses (NaN, infinities and lone surrogates, which failnozzle writes
    where datagrams held them); nesting too deep for either is unusable.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            return json.loads(data.decode("utf-8"))
        except RecursionError:
            raise _Unusable("nested too deeply") from None


def _pieces(snapshot: _Snapshot) -> Iterator[str]:
    """
    The snapshot as JSON, in pieces: its rows, encoded before, are joined
    once, into the text written.  Its own numbers and names are finite
    and valid text: orjson writes them, as it does the rows.
    """
    yield (f'{{"version": {FORMAT_VERSION}, '
           f'"generation": {snapshot.generation}, '
           f'"fields": {_dumps(snapshot.fields, ())}, '
           f'"wall_offset": {_dumps(snapshot.wall_offset, ())}, '
           f'"buffer": {{"entries": [')
    yield ",".join(snapshot.rows)
    yield f'], "overflow": {snapshot.overflow}}}'
    for name, batches in snapshot.batches.items():
        kinds = ", ".join(f"{_dumps(kind, ())}: {rows}"
                          for kind, rows in batches.items())
        yield f', "{name}": {{{kinds}}}'
    yield f', "rate_window": {_dumps(snapshot.rate_window, ())}'
    for name in ("pager", "canary", "route_pagers"):
        kept = getattr(snapshot, name)
        if kept is not None:
            yield f', "{name}": {_dumps(kept, ())}'
    yield "}"


def _rows(batch: Batch, numbers: dict) -> str:
    """A batch as JSON, keys replaced by their C{numbers}."""
    rows = ",".join(_row(entry, numbers[entry.key]) for entry in batch.entries)
    return f'{{"entries": [{rows}], "overflow": {batch.overflow}}}'


def _row(entry: Entry, number: int) -> str:
    """One entry as JSON, its key replaced by its C{number}."""
    return _dumps([number, list(entry.sources.items()), entry.first_seen,
                   entry.last_seen, *_optional(entry)],
                  itertools.chain(entry.sources, entry.examples))


def _optional(entry: Entry) -> list:
    """
    The entry's level, other_sources and grouping, the optional last items
    of a row, left out from the end when they say nothing.
    """
    grouping = {}
    if entry.fingerprint is not None:
        grouping["fingerprint"] = entry.fingerprint
    if entry.variants != 1 or entry.more_variants:
        grouping.update(variants=entry.variants,
                        more_variants=entry.more_variants)
    if entry.examples:
        grouping["examples"] = list(entry.examples)
    if entry.context:
        grouping["context"] = [list(pair) for pair in entry.context]
    if grouping:
        return [entry.level, entry.other_sources, grouping]
    if entry.other_sources:
        return [entry.level, entry.other_sources]
    return [] if entry.level is None else [entry.level]


def _dumps(value: object, scalars: Iterable) -> str:
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


def _batch(rows: dict, keys: dict,
           rekey: Optional[Callable[[tuple], tuple]], shift: float) -> Batch:
    """
    A batch from the rows L{_rows} wrote, checked, its keys re-keyed by
    C{rekey} if given; rows whose keys become one (re-keyed, or repeated)
    are merged.
    """
    entries = tuple(_entry(row, keys, shift) for row in rows["entries"])
    overflow = _count(rows.get("overflow", 0), "overflow")
    if rekey is None and len({entry.identity for entry in entries}) == len(
            entries):
        # Nothing to merge: the cost of a cluster's merge of many pushes.
        return Batch.of(entries, overflow)
    return Batch(entries, overflow).rekeyed(rekey or (lambda key: key))


def _entry(row: object, keys: dict, shift: float) -> Entry:
    _check(type(row) is list and 4 <= len(row) <= 7, "a row of the wrong "
           "shape")
    number, sources, first, last, *optional = row
    counts = _sources(sources)
    level = optional[0] if optional else None
    _check(level is None or (type(level) is int and 0 <= level <= 7),
           "bad level")
    other = _count(optional[1], "other_sources") if len(optional) > 1 else 0
    grouping = _grouping(optional[2] if len(optional) > 2 else {})
    return Entry(keys[number], counts, _time(first, shift),
                 _time(last, shift), level, other, **grouping)


def _sources(pairs: object) -> dict:
    """
    A row's C{[source, count]} pairs as a dict, checked a set at a time
    rather than a pair at a time: a cluster's leader reads every host of
    every error at each flush.  A source twice is counted once, summed.
    """
    _check(type(pairs) is list, "bad sources")
    try:
        counts = dict(pairs)
    except (TypeError, ValueError):
        raise _Unusable("bad source") from None
    # Not each pair's type: of what JSON holds, only a list of two makes a
    # pair whose count is a number (dict() takes a two-letter string, or a
    # two-key object, as a pair of texts).
    values = counts.values()
    _check({type(source) for source in counts} <= SCALAR_TYPES
           and {type(count) for count in values} <= {int}
           and (not counts or (min(values) >= 0 and max(values) < 2 ** 63)),
           "bad source")
    if len(counts) < len(pairs):
        counts = {}
        for source, count in pairs:
            _check(type(count) is int and 0 <= count < 2 ** 63,
                   "bad source")
            counts[source] = counts.get(source, 0) + count
    return counts


#: The most (name, text) pairs of context a row may hold.
_MAX_CONTEXT = 20


def _grouping(saved: object) -> dict:
    """The fingerprint, variants and examples a row saved, checked."""
    _check(type(saved) is dict, "bad grouping")
    if len(saved) == 1:
        # The common case, read at once: a fingerprint, nothing folded in.
        fingerprint = saved.get("fingerprint")
        if type(fingerprint) is str and len(fingerprint) <= 100:
            return {"fingerprint": fingerprint}
    fingerprint = saved.get("fingerprint")
    _check(fingerprint is None or (type(fingerprint) is str
                                   and len(fingerprint) <= 100),
           "bad fingerprint")
    examples = saved.get("examples", [])
    _check(type(examples) is list and len(examples) <= MAX_EXAMPLES
           and all(type(example) is str for example in examples),
           "bad examples")
    more = saved.get("more_variants", False)
    _check(type(more) is bool, "bad more_variants")
    variants = _count(saved.get("variants", 1), "variants")
    context = saved.get("context", [])
    _check(type(context) is list and len(context) <= _MAX_CONTEXT
           and all(type(pair) is list and len(pair) == 2
                   and all(type(text) is str for text in pair)
                   for pair in context), "bad context")
    return {"fingerprint": fingerprint, "variants": max(variants, 1),
            "more_variants": more, "examples": tuple(examples),
            "context": tuple(tuple(pair) for pair in context)}
