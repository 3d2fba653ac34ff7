"""
Folding error records together: unique keys, counts per source, the batch a
flush hands on, and the sliding window the pager watches.

Everything here is plain data driven by an injected clock, so it can be
tested without a reactor and, later, written to disk and read back.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Mapping, Optional, Sequence

from twisted.internet.interfaces import IReactorTime

#: The types a value of a key or a source may have: JSON's scalars, which
#: hash and compare as a whole (a list or an object would not).
SCALAR_TYPES = frozenset((str, int, float, bool, type(None)))


@dataclass(slots=True)
class _Tally:
    """What is known about one unique error while it is being counted."""

    sources: dict
    first_seen: float
    last_seen: float
    level: Optional[int] = None
    #: Instances from sources past MAX_SOURCES_PER_ERROR.
    other_sources: int = 0
    #: Whether the last snapshot holds it as it is (see L{Aggregator.changes}).
    saved: bool = False

    def copy(self) -> _Tally:
        return _Tally(dict(self.sources), self.first_seen, self.last_seen,
                      self.level, self.other_sources)


@dataclass(frozen=True)
class Entry:
    """
    One unique error in a batch.

    @ivar key: the values of the unique fields, in UNIQUE_MSG_TUPLE order.
    @ivar sources: how often each source (host) sent it.
    @ivar first_seen: reactor time of the first instance.
    @ivar last_seen: reactor time of the last instance.
    @ivar level: the most severe syslog level (0 emergency … 7 debug) an
        instance came with, if any did (GELF messages carry one).
    @ivar other_sources: instances from sources not in C{sources}, which
        holds at most MAX_SOURCES_PER_ERROR of them: the total stays exact
        however many hosts send one error.
    """

    key: tuple
    sources: Mapping
    first_seen: float
    last_seen: float
    level: Optional[int] = None
    other_sources: int = 0

    @property
    def total(self) -> int:
        return sum(self.sources.values()) + self.other_sources


@dataclass(frozen=True)
class Batch:
    """
    An immutable snapshot of one flush window, most frequent errors first.

    @ivar overflow: instances of errors that were not stored because the
        buffer already held MAX_UNIQUE_MESSAGES unique errors.
    """

    entries: tuple = ()
    overflow: int = 0

    @property
    def total(self) -> int:
        return sum(entry.total for entry in self.entries) + self.overflow

    def __bool__(self) -> bool:
        return bool(self.entries) or self.overflow > 0

    def partition(self, predicate: Callable[[Entry], bool]) -> tuple:
        """
        Split into C{(matching, rest)}; the overflow count goes with the rest,
        since nothing is known of those errors.
        """
        matching, rest = [], []
        for entry in self.entries:
            (matching if predicate(entry) else rest).append(entry)
        return Batch(tuple(matching)), Batch(tuple(rest), self.overflow)

    def merge(self, other: Batch, max_unique: int,
              max_sources: Optional[int] = None) -> Batch:
        """
        Both batches as one, as for a digest that had to wait while errors
        kept coming.  Unique errors past C{max_unique} are only counted, in
        the overflow; sources of one error past C{max_sources}, if given, in
        its C{other_sources}.
        """
        tallies = _tallies_of(self.entries)
        overflow = self.overflow + other.overflow
        for entry in other.entries:
            if entry.key not in tallies and len(tallies) >= max_unique:
                overflow += entry.total
            else:
                _merge_tally(tallies, entry.key, _tally_of(entry),
                             max_sources)
        return _batch_of(tallies, overflow)

    def rekeyed(self, rekey: Callable[[tuple], tuple]) -> Batch:
        """The batch with every key replaced by C{rekey(key)}; entries
        whose keys become one are merged."""
        entries = tuple(dataclasses.replace(entry, key=rekey(entry.key))
                        for entry in self.entries)
        return Batch().merge(Batch(entries, self.overflow), len(entries))

    @classmethod
    def of(cls, entries: Iterable[Entry], overflow: int = 0) -> Batch:
        """A batch of these entries, in digest order."""
        return cls(_sorted_entries(entries), overflow)


def rekeying(fields: Optional[Sequence[str]],
             new_fields: Optional[Sequence[str]]) -> Callable[[tuple], tuple]:
    """
    What turns a key of the fields C{fields} (UNIQUE_MSG_TUPLE's names)
    into one of C{new_fields}: by field name, a field it did not have being
    None.  Unknown fields (None) leave keys as they are.
    """
    if fields is None or new_fields is None or tuple(fields) == tuple(
            new_fields):
        return lambda key: key
    positions = {name: number for number, name in enumerate(fields)}
    picks = [positions.get(name) for name in new_fields]
    return lambda key: tuple(None if number is None else key[number]
                             for number in picks)


def _sorted_entries(entries: Iterable[Entry]) -> tuple:
    """Most instances first; ties keep the order errors first appeared in."""
    return tuple(sorted(entries, key=lambda e: (-e.total, e.first_seen)))


def _tally_of(entry: Entry) -> _Tally:
    return _Tally(dict(entry.sources), entry.first_seen, entry.last_seen,
                  entry.level, entry.other_sources)


def _tallies_of(entries: Iterable[Entry]) -> dict:
    """Fresh, mutable tallies holding what C{entries} say."""
    return {entry.key: _tally_of(entry) for entry in entries}


def _entry_of(key: tuple, tally: _Tally) -> Entry:
    return Entry(key, tally.sources, tally.first_seen, tally.last_seen,
                 tally.level, tally.other_sources)


def _batch_of(tallies: dict, overflow: int) -> Batch:
    return Batch.of((_entry_of(key, tally) for key, tally in tallies.items()),
                    overflow)


class Aggregator:
    """
    The buffer of counts.  Memory grows with the number of unique errors and
    sources, never with the number of instances, and both are capped: at
    most C{max_unique} errors, and C{max_sources} sources per error (bad
    input included).
    """

    def __init__(
        self,
        max_unique: int,
        clock: IReactorTime,
        internal_error_key: Callable[[int, Exception], tuple],
        max_sources: int = 100,
    ) -> None:
        """
        @param internal_error_key: gives the unique key under which C{count}
            pieces of bad input like C{exception} are reported.
        """
        self._max_unique = max_unique
        self._max_sources = max_sources
        self._clock = clock
        self._internal_error_key = internal_error_key
        self._tallies: dict = {}
        self._overflow = 0
        self._bad: dict = {}
        #: Whether anything was counted since the last flush or snapshot.
        self.changed = False
        #: Whether the buffer was emptied or replaced since the last
        #: L{changes}.
        self._replaced = True
        #: One copy of each short text in the buffer's keys and sources.
        self._texts: dict = {}

    def add_key(self, key: tuple, source: Hashable,
                level: Optional[int] = None) -> None:
        """
        Count one instance of the error C{key} from C{source}, sent with
        the syslog C{level}, if any.
        """
        self.changed = True
        tally = self._tallies.get(key)
        if tally is None:
            if len(self._tallies) >= self._max_unique:
                self._overflow += 1
                return
            now = self._clock.seconds()
            key = tuple(map(self._shared, key))
            self._tallies[key] = _Tally({self._shared(source): 1}, now, now,
                                        level)
            return
        sources = tally.sources
        count = sources.get(source)
        if count is not None:
            sources[source] = count + 1
        elif len(sources) < self._max_sources:
            sources[self._shared(source)] = 1
        else:
            tally.other_sources += 1
        tally.last_seen = self._clock.seconds()
        tally.saved = False
        if level is not None:
            tally.level = _most_severe(tally.level, level)

    def _shared(self, value: object) -> object:
        """
        The copy of a short text (the name of a module, file, function,
        kind or host) held already, if any: those recur from error to
        error, so a unique error costs its own texts only.  Tracebacks,
        which seldom recur, are left as they are.
        """
        if type(value) is str and len(value) < 100:
            return self._texts.setdefault(value, value)
        return value

    def add_bad_input(self, error: Exception, source: Hashable) -> None:
        """
        Count one piece of bad input.  Bad input is counted by the kind of
        error (its class), so a flood of junk takes no more memory than one.
        """
        self.changed = True
        now = self._clock.seconds()
        kind = type(error)
        tally, _ = self._bad.get(kind, (None, None))
        if tally is None:
            tally = _Tally({}, now, now)
        if source in tally.sources or len(tally.sources) < self._max_sources:
            tally.sources[source] = tally.sources.get(source, 0) + 1
        else:
            tally.other_sources += 1
        tally.last_seen = now
        self._bad[kind] = (tally, error)

    def flush(self) -> Batch:
        """Hand over everything counted so far and start empty again."""
        tallies, overflow, bad = self._tallies, self._overflow, self._bad
        self._tallies, self._overflow, self._bad = {}, 0, {}
        self._replaced, self._texts = True, {}
        self.changed = True
        for tally, error in bad.values():
            key = self._internal_error_key(_count(tally), error)
            _merge_tally(tallies, key, tally, self._max_sources)
        return _batch_of(tallies, overflow)

    def view(self) -> Batch:
        """
        Everything counted so far, bad input included, neither copied nor
        sorted, for a look at the buffer: cheap, but valid only until the
        next count.
        """
        entries = {key: _entry_of(key, tally)
                   for key, tally in self._tallies.items()}
        for tally, error in self._bad.values():
            key = self._internal_error_key(_count(tally), error)
            merged = {} if key not in self._tallies else {
                key: self._tallies[key].copy()}
            _merge_tally(merged, key, tally.copy(), self._max_sources)
            entries[key] = _entry_of(key, merged[key])
        return Batch(tuple(entries.values()), self._overflow)

    def changes(self, everything: bool = False) -> tuple:
        """
        For snapshots, which keep what they saved before: C{(batch,
        whole)}, the errors counted since the last call (all of them if
        C{everything}), and whether that is the whole buffer, as it is after
        a flush, or only what changed, the rest being as the last call gave
        it.  The overflow is the whole buffer's; bad input is left out (see
        L{bad_input}).  Like L{view}, valid only until the next count.
        """
        whole, self._replaced = everything or self._replaced, False
        # A flag per error to look at, and only the errors counted since
        # to read: about a millisecond for 10,000 errors of which none
        # changed.
        changed = [(key, tally) for key, tally in self._tallies.items()
                   if whole or not tally.saved]
        for _, tally in changed:
            tally.saved = True
        return Batch(tuple(_entry_of(key, tally) for key, tally in changed),
                     self._overflow), whole

    def bad_input(self) -> tuple:
        """
        The entries bad input is counted under so far.  Their keys may
        change with every count (INTERNAL_ERROR_FUNC sees the count).
        """
        return tuple(
            _entry_of(self._internal_error_key(_count(tally), error),
                      tally.copy())
            for tally, error in self._bad.values())

    def configure(self, max_unique: int, max_sources: int,
                  internal_error_key: Callable[[int, Exception], tuple],
                  rekey: Callable[[tuple], tuple] = lambda key: key) -> None:
        """
        Take new settings (a reload), keys read anew by C{rekey}: nothing
        counted is lost, though errors past a lowered C{max_unique} are
        only counted from now on.
        """
        self._max_unique = max_unique
        self._max_sources = max_sources
        self._internal_error_key = internal_error_key
        buffer = _batch_of(self._tallies, self._overflow).rekeyed(rekey)
        self._tallies, self._overflow, self._texts = {}, 0, {}
        self.restore(buffer)

    def restore(self, batch: Batch) -> None:
        """Count a batch in again, such as one read back from a snapshot."""
        merged = _batch_of(self._tallies, self._overflow).merge(
            batch, self._max_unique, self._max_sources)
        self._tallies = _tallies_of(merged.entries)
        self._overflow = merged.overflow
        self._replaced = True
        self.changed = True


def _count(tally: _Tally) -> int:
    return sum(tally.sources.values()) + tally.other_sources


def _merge_tally(tallies: dict, key: tuple, tally: _Tally,
                 max_sources: Optional[int] = None) -> None:
    """
    Add C{tally} to the one under C{key}, which may not exist yet; sources
    past C{max_sources}, if given, are counted in C{other_sources}.
    """
    mine = tallies.get(key)
    if mine is None:
        tallies[key] = tally
        return
    sources = mine.sources
    for source, count in tally.sources.items():
        if source in sources:
            sources[source] += count
        elif max_sources is None or len(sources) < max_sources:
            sources[source] = count
        else:
            mine.other_sources += count
    mine.other_sources += tally.other_sources
    mine.first_seen = min(mine.first_seen, tally.first_seen)
    mine.last_seen = max(mine.last_seen, tally.last_seen)
    if tally.level is not None:
        mine.level = _most_severe(mine.level, tally.level)


def _most_severe(level: Optional[int], other: int) -> int:
    """The more severe of two syslog levels (the lower number)."""
    return other if level is None or other < level else level


class RateWindow:
    """
    The number of errors in the last C{size} flushes, as the original's
    MessageRate: the pager fires when it reaches C{limit}.
    """

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        self.counts: list = []

    @property
    def total(self) -> int:
        return sum(self.counts)

    def add(self, count: int) -> bool:
        """Record one flush's count; return whether the limit is reached."""
        self.counts.append(count)
        del self.counts[:-self.size]
        return self.total >= self.limit

    def configure(self, size: int, limit: int) -> None:
        """Take a new size and limit (a reload), keeping the counts that
        still fit."""
        self.size, self.limit = size, limit
        del self.counts[:-size]

    def restore(self, counts: Sequence[int]) -> None:
        """Take the counts a snapshot kept, as many as fit."""
        self.counts = list(counts)[-self.size:]

    def reset(self) -> None:
        self.counts = []
