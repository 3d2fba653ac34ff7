"""
Folding error records together: unique keys, counts per source, the batch a
flush hands on, and the sliding window the pager watches.

Everything here is plain data driven by an injected clock, so it can be
tested without a reactor and, later, written to disk and read back.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import (Callable, Hashable, Iterable, Mapping, NamedTuple,
                    Optional, Sequence)

from twisted.internet.interfaces import IReactorTime

from failnozzle.fingerprint import MAX_EXAMPLES, Grouping, is_custom

#: The types a value of a key or a source may have: JSON's scalars, which
#: hash and compare as a whole (a list or an object would not).
SCALAR_TYPES = frozenset((str, int, float, bool, type(None)))

#: How many distinct reports the aggregator remembers the fingerprints of
#: (by their hash) until the next flush: past them a report's fingerprint
#: is made anew each time, and variants are no longer counted.  Of them,
#: at most OVERFLOWING_MAX are of errors only counted in the overflow
#: (MAX_UNIQUE_MESSAGES): a flood of distinct errors costs a few MB.
INDEX_MAX = 65536
OVERFLOWING_MAX = 8192
#: How many distinct reports' fingerprints are remembered across flushes
#: (by the hash of the key, as the index, and the logging template, which
#: the fingerprint may be made from): a report that recurs is
#: fingerprinted once while it does, not once per buffer, which a cluster
#: node begins anew at every push, each second.  Past it, the memory
#: starts again empty.  About 100 bytes each.
FINGERPRINTS_MAX = 16384


class Report(NamedTuple):
    """One error report as an input read it, for L{Aggregator.add}."""

    #: The values of the unique fields, in UNIQUE_MSG_TUPLE order.
    key: tuple
    source: Hashable
    #: The syslog level it was sent with (0 emergency … 7 debug), if any.
    level: Optional[int] = None
    #: The C{logging} format its message was made from, if known.
    template: Optional[str] = None
    #: What FINGERPRINT_FUNC made of it, if that is configured and said.
    fingerprint: Optional[str] = None
    #: What else it said of where it happened, not compared: C{(name,
    #: text)} pairs such as a Sentry event's release, environment, user,
    #: URL and tags (see L{failnozzle.sentry}).
    context: tuple = ()


#: The original's grouping: only byte-identical keys are one error.
EXACT = Grouping((), exact=True)


@dataclass(slots=True)
class _Tally:
    """What is known about one unique error while it is being counted."""

    #: The latest report's key: what the digest shows.
    key: tuple
    fingerprint: Optional[str]
    sources: dict
    first_seen: float
    last_seen: float
    level: Optional[int] = None
    #: Instances from sources past MAX_SOURCES_PER_ERROR.
    other_sources: int = 0
    #: Distinct reports folded into it, and whether there were more.
    variants: int = 1
    more_variants: bool = False
    #: A tuple, most often the empty one: a flush makes a tally and an
    #: entry per error, and each object more is one more for the garbage
    #: collector to walk.
    examples: tuple = ()
    #: The latest report's context (see L{Report.context}).
    context: tuple = ()
    #: Whether the last snapshot holds it as it is (see L{Aggregator.changes}).
    saved: bool = False

    def copy(self) -> _Tally:
        return _Tally(self.key, self.fingerprint, dict(self.sources),
                      self.first_seen, self.last_seen, self.level,
                      self.other_sources, self.variants, self.more_variants,
                      self.examples, self.context)

    def add_examples(self, examples: Iterable[str]) -> None:
        for example in examples:
            if len(self.examples) >= MAX_EXAMPLES:
                return
            if example not in self.examples:
                self.examples += (example,)


@dataclass(slots=True)
class Entry:
    """
    One unique error in a batch; never changed once made (not frozen only
    because a frozen dataclass takes five times as long to make, and a
    flush makes one per unique error, sometimes twice).

    @ivar key: the values of the unique fields, in UNIQUE_MSG_TUPLE order,
        of the latest report: what the digest shows.
    @ivar sources: how often each source (host) sent it.
    @ivar first_seen: reactor time of the first instance.
    @ivar last_seen: reactor time of the last instance.
    @ivar level: the most severe syslog level (0 emergency … 7 debug) an
        instance came with, if any did (GELF messages carry one).
    @ivar other_sources: instances from sources not in C{sources}, which
        holds at most MAX_SOURCES_PER_ERROR of them: the total stays exact
        however many hosts send one error.
    @ivar fingerprint: what its reports are grouped by (see
        L{failnozzle.fingerprint}); None: by their keys.
    @ivar variants: how many distinct reports were folded into it, and
        C{more_variants} whether there were more than that.
    @ivar examples: a few texts of what varied between them.
    @ivar context: the latest report's C{(name, text)} pairs of where it
        happened (release, environment, ...), if it said.
    @ivar total: every instance, summed once when it is made.
    """

    key: tuple
    sources: Mapping
    first_seen: float
    last_seen: float
    level: Optional[int] = None
    other_sources: int = 0
    fingerprint: Optional[str] = None
    variants: int = 1
    more_variants: bool = False
    examples: tuple = ()
    context: tuple = ()
    total: int = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.total = sum(self.sources.values()) + self.other_sources

    def with_sources(self, sources: Mapping, other_sources: int = 0
                     ) -> Entry:
        """
        This error with only these instances: those from some of its hosts
        (a route takes them).  Made at once, not by dataclasses.replace,
        which takes ten times as long: a flush may route thousands.
        """
        return Entry(self.key, sources, self.first_seen, self.last_seen,
                     self.level, other_sources, self.fingerprint,
                     self.variants, self.more_variants, self.examples,
                     self.context)

    @property
    def identity(self) -> Hashable:
        """What makes two entries one error: the fingerprint, else the key."""
        return self.key if self.fingerprint is None else self.fingerprint


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
        its C{other_sources}.  Entries are not changed: only errors in
        both cost a new one, however many times C{other} holds them (a
        cluster's leader merges one entry per push of each error).
        """
        merged = {entry.identity: entry for entry in self.entries}
        combined: dict = {}
        overflow = self.overflow + other.overflow
        for entry in other.entries:
            identity = entry.identity
            if identity in merged:
                if identity not in combined:
                    combined[identity] = _tally_of(merged[identity])
                _merge_tally(combined, identity, entry, max_sources)
            elif len(merged) < max_unique:
                merged[identity] = _within_sources(entry, max_sources)
            else:
                overflow += entry.total
        for identity, tally in combined.items():
            merged[identity] = _entry_of(tally)
        return Batch.of(merged.values(), overflow)

    def rekeyed(self, rekey: Callable[[tuple], tuple],
                grouping: Optional[Grouping] = None,
                anew: bool = True) -> Batch:
        """
        The batch with every key replaced by C{rekey(key)} and, if a
        C{grouping} is given, fingerprints made by it from the new key:
        every one but FINGERPRINT_FUNC's if C{anew} (the rules changed),
        else only those missing (a batch saved by GROUPING = 'exact', or by
        a version without fingerprints); entries that become one are
        merged.  A fingerprint made from a key alone misses the C{logging}
        format the report had: one kept is better.
        """
        def regrouped(entry: Entry) -> Entry:
            key = rekey(entry.key)
            fingerprint = entry.fingerprint
            if grouping is not None and (
                    fingerprint is None
                    or (anew and not is_custom(fingerprint))):
                fingerprint = grouping.fingerprint(key)
            return dataclasses.replace(entry, key=key,
                                       fingerprint=fingerprint)

        entries = tuple(map(regrouped, self.entries))
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
    return _Tally(entry.key, entry.fingerprint, dict(entry.sources),
                  entry.first_seen, entry.last_seen, entry.level,
                  entry.other_sources, entry.variants, entry.more_variants,
                  entry.examples, entry.context)


def _entry_of(tally: _Tally) -> Entry:
    return Entry(tally.key, tally.sources, tally.first_seen, tally.last_seen,
                 tally.level, tally.other_sources, tally.fingerprint,
                 tally.variants, tally.more_variants, tally.examples,
                 tally.context)


def _within_sources(entry: Entry, max_sources: Optional[int]) -> Entry:
    """
    C{entry}, its sources past C{max_sources} (if given) counted in its
    other_sources: one read back from a snapshot written with a larger
    cap, or by hand, would otherwise hold every host it names.
    """
    if max_sources is None or len(entry.sources) <= max_sources:
        return entry
    tally = _tally_of(entry)
    tally.sources = dict(itertools.islice(entry.sources.items(),
                                          max_sources))
    tally.other_sources += entry.total - entry.other_sources - sum(
        tally.sources.values())
    return _entry_of(tally)


def _batch_of(tallies: dict, overflow: int) -> Batch:
    return Batch.of(map(_entry_of, tallies.values()), overflow)


class Aggregator:
    """
    The buffer of counts.  Memory grows with the number of unique errors and
    sources, never with the number of instances, and both are capped: at
    most C{max_unique} errors, and C{max_sources} sources per error (bad
    input included).

    Reports are folded together by their fingerprints, which are made once
    per distinct report: an index of the reports seen since the last flush
    (their hashes, at most L{INDEX_MAX}) leads to their error at the cost
    of one lookup.
    """

    def __init__(
        self,
        max_unique: int,
        clock: IReactorTime,
        internal_error_key: Callable[[int, Exception], tuple],
        max_sources: int = 100,
        grouping: Grouping = EXACT,
        on_first: Callable[[], None] = lambda: None,
    ) -> None:
        """
        @param internal_error_key: gives the unique key under which C{count}
            pieces of bad input like C{exception} are reported.
        @param grouping: makes the fingerprint of a key; by default keys
            are grouped as they are.
        @param on_first: called when the first error of an empty buffer
            is counted (for the first digest of a storm, sooner).
        """
        self.on_first = on_first
        self._max_unique = max_unique
        self._max_sources = max_sources
        self._clock = clock
        self._internal_error_key = internal_error_key
        self._grouping = grouping
        #: Per identity (see L{Entry.identity}), what is counted.
        self._tallies: dict = {}
        #: Per hash of a report's key, its tally; and the hashes of those
        #: not counted for MAX_UNIQUE_MESSAGES.
        self._index: dict = {}
        self._overflowing: set = set()
        self._overflow = 0
        self._bad: dict = {}
        #: Whether anything was counted since the last flush or snapshot.
        self.changed = False
        #: Whether the buffer was emptied or replaced since the last
        #: L{changes}.
        self._replaced = True
        #: One copy of each short text in the buffer's keys and sources.
        self._texts: dict = {}
        #: Per hash of a report's key and its template, its fingerprint
        #: (see L{FINGERPRINTS_MAX}); forgotten when the grouping may
        #: change.
        self._fingerprints: dict = {}

    def add(self, report: Report) -> None:
        """Count one error report."""
        self.changed = True
        key, source, level, _, custom, context = report
        # FINGERPRINT_FUNC may look past the key: its reports are never
        # found by their keys.
        tally = self._index.get(hash(key)) if custom is None else None
        if tally is None:
            tally = self._tally_for(report)
            if tally is None:
                return
        else:
            tally.key = key
            tally.context = context
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

    def add_key(self, key: tuple, source: Hashable,
                level: Optional[int] = None) -> None:
        """Count one instance of the error C{key} from C{source}."""
        self.add(Report(key, source, level))

    def _tally_for(self, report: Report) -> Optional[_Tally]:
        """
        The tally of a report not in the index: found by its fingerprint,
        or begun; None if it is one more error past C{max_unique} (then
        counted in the overflow).
        """
        key, custom = report.key, report.fingerprint
        hashed = hash(key)
        if custom is None and hashed in self._overflowing:
            self._overflow += 1
            return None
        fingerprint = (custom if custom is not None
                       else self._fingerprint_of(report, hashed))
        identity = key if fingerprint is None else fingerprint
        tally = self._tallies.get(identity)
        indexing = custom is None and (
            len(self._index) + len(self._overflowing) < INDEX_MAX)
        if tally is None:
            if len(self._tallies) >= self._max_unique:
                self._overflow += 1
                if indexing and len(self._overflowing) < OVERFLOWING_MAX:
                    self._overflowing.add(hashed)
                return None
            now = self._clock.seconds()
            tally = _Tally(tuple(map(self._shared, key)), fingerprint, {},
                           now, now, context=report.context)
            if not self._tallies:
                self.on_first()
            self._tallies[identity] = tally
        else:
            tally.key = key
            tally.context = report.context
            if indexing:
                tally.variants += 1
            elif custom is None:
                tally.more_variants = True
        if len(tally.examples) < MAX_EXAMPLES and custom is None:
            tally.add_examples(self._grouping.examples(key))
        if indexing:
            self._index[hashed] = tally
        return tally

    def _fingerprint_of(self, report: Report, hashed: int) -> Optional[str]:
        """The fingerprint of C{report} (whose key's hash is C{hashed}),
        made if not remembered for that key and C{logging} template."""
        fingerprints = self._fingerprints
        known = (hashed, report.template)
        try:
            return fingerprints[known]
        except KeyError:
            pass
        fingerprint = self._grouping.fingerprint(report.key, report.template)
        if len(fingerprints) >= FINGERPRINTS_MAX:
            fingerprints.clear()
        fingerprints[known] = fingerprint
        return fingerprint

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
            tally = _Tally((), None, {}, now, now)
        if source in tally.sources or len(tally.sources) < self._max_sources:
            tally.sources[source] = tally.sources.get(source, 0) + 1
        else:
            tally.other_sources += 1
        tally.last_seen = now
        self._bad[kind] = (tally, error)

    def _bad_input_tallies(self) -> Iterable[_Tally]:
        """Bad input's tallies, each under the key it is reported with
        (which may change with every count: INTERNAL_ERROR_FUNC sees it)."""
        for tally, error in self._bad.values():
            tally = tally.copy()
            tally.key = self._internal_error_key(_count(tally), error)
            tally.fingerprint = self._grouping.fingerprint(tally.key)
            yield tally

    def flush(self) -> Batch:
        """Hand over everything counted so far and start empty again."""
        bad = list(self._bad_input_tallies())
        tallies, overflow = self._tallies, self._overflow
        self._tallies, self._overflow, self._bad = {}, 0, {}
        self._index, self._overflowing = {}, set()
        self._replaced, self._texts = True, {}
        self.changed = True
        for tally in bad:
            _merge_tally(tallies, _identity(tally), tally, self._max_sources)
        return _batch_of(tallies, overflow)

    def __bool__(self) -> bool:
        """Whether anything is counted."""
        return bool(self._tallies or self._overflow or self._bad)

    def view(self) -> Batch:
        """
        Everything counted so far, bad input included, neither copied nor
        sorted, for a look at the buffer: cheap, but valid only until the
        next count.
        """
        entries = {identity: _entry_of(tally)
                   for identity, tally in self._tallies.items()}
        for tally in self._bad_input_tallies():
            identity = _identity(tally)
            merged = {} if identity not in self._tallies else {
                identity: self._tallies[identity].copy()}
            _merge_tally(merged, identity, tally, self._max_sources)
            entries[identity] = _entry_of(merged[identity])
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
        changed = [tally for tally in self._tallies.values()
                   if whole or not tally.saved]
        for tally in changed:
            tally.saved = True
        return Batch(tuple(map(_entry_of, changed)), self._overflow), whole

    def bad_input(self) -> tuple:
        """The entries bad input is counted under so far."""
        return tuple(map(_entry_of, self._bad_input_tallies()))

    def configure(self, max_unique: int, max_sources: int,
                  internal_error_key: Callable[[int, Exception], tuple],
                  rekey: Callable[[tuple], tuple] = lambda key: key,
                  grouping: Optional[Grouping] = None,
                  regroup: bool = True) -> None:
        """
        Take new settings (a reload), keys read anew by C{rekey}, and a
        C{grouping} if given, by which what is counted is grouped anew if
        C{regroup} (its rules changed): nothing counted is lost, though
        errors past a lowered C{max_unique} are only counted from now on.
        """
        self._max_unique = max_unique
        self._max_sources = max_sources
        self._internal_error_key = internal_error_key
        if grouping is not None:
            self._grouping = grouping
        self._fingerprints = {}
        buffer = _batch_of(self._tallies, self._overflow).rekeyed(
            rekey, grouping, regroup)
        self._tallies, self._overflow, self._texts = {}, 0, {}
        self.restore(buffer)

    def restore(self, batch: Batch) -> None:
        """Count a batch in again, such as one read back from a snapshot."""
        merged = _batch_of(self._tallies, self._overflow).merge(
            batch, self._max_unique, self._max_sources)
        self._tallies = {entry.identity: _tally_of(entry)
                         for entry in merged.entries}
        self._index, self._overflowing = {}, set()
        # The reports shown are indexed again, so that one arriving is not
        # counted as one more variant.
        for tally in itertools.islice(self._tallies.values(), INDEX_MAX):
            if not is_custom(tally.fingerprint):
                self._index[hash(tally.key)] = tally
        self._overflow = merged.overflow
        self._replaced = True
        self.changed = True


def _identity(tally: _Tally) -> Hashable:
    return tally.key if tally.fingerprint is None else tally.fingerprint


def _count(tally: _Tally) -> int:
    return sum(tally.sources.values()) + tally.other_sources


def _merge_tally(tallies: dict, identity: Hashable, tally: _Tally | Entry,
                 max_sources: Optional[int] = None) -> None:
    """
    Add C{tally} (or an entry, which is only read) to the one under
    C{identity}, which may not exist yet (then it must be a tally);
    sources past C{max_sources}, if given, are counted in
    C{other_sources}.  The key shown is the latest report's.
    """
    mine = tallies.get(identity)
    if mine is None:
        tallies[identity] = tally
        return
    # Reports counted apart may be the same: of their variants only as
    # many are sure as the larger count says, or two shown apart.
    shown_apart = 2 if mine.key != tally.key else 1
    mine.more_variants = (mine.more_variants or tally.more_variants
                          or min(mine.variants, tally.variants) > 1)
    mine.variants = max(mine.variants, tally.variants, shown_apart)
    if tally.last_seen >= mine.last_seen:
        mine.key = tally.key
        mine.context = tally.context
    mine.add_examples(tally.examples)
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
