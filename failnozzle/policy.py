"""
What a digest tells of each error: new, back after a quiet time, or
ongoing, from the seen-memory and a time.  Plain data in, plain data out:
no reactor, no files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

from failnozzle.aggregate import Batch, Entry
from failnozzle.fingerprint import digest_of
from failnozzle.seen import Seen, SeenMemory

NEW, BACK, ONGOING = "new", "back", "ongoing"

_DAY = 24 * 3600


@dataclass(frozen=True)
class Status:
    """
    What is known of an error as a digest tells it (wall-clock seconds).

    @ivar kind: L{NEW}, L{BACK} or L{ONGOING}.
    @ivar since: when it was first seen (ongoing: in an earlier digest).
    @ivar total: its instances reported so far, this digest's included.
    @ivar quiet: for one back, how long it had not been seen.
    """

    kind: str
    since: float
    total: int
    quiet: float = 0.0


@dataclass(frozen=True)
class NewsRules:
    """SEEN_DAYS and REGRESSION_DAYS, in seconds."""

    #: Seen longer ago than this, an error is new again.
    forget_after: float
    #: Quiet for at least this long, an error is back.
    back_after: float

    @classmethod
    def in_days(cls, seen_days: float, regression_days: float) -> NewsRules:
        return cls(seen_days * _DAY, regression_days * _DAY)


def seen_key(entry: Entry) -> str:
    """What the seen-memory knows an error by: its fingerprint, or (with
    GROUPING = 'exact') a digest of its key."""
    return entry.fingerprint or digest_of(entry.key)


def status_of(seen: Optional[Seen], first_seen: float, count: int,
              rules: NewsRules) -> Status:
    """
    The status of an error first seen at C{first_seen} in this digest,
    C{count} times, given what the memory holds of it.
    """
    if seen is None or first_seen - seen.last_seen > rules.forget_after:
        return Status(NEW, first_seen, count)
    quiet = first_seen - seen.last_seen
    if quiet >= rules.back_after:
        return Status(BACK, seen.first_seen, seen.total + count, quiet)
    return Status(ONGOING, seen.first_seen, seen.total + count)


_ORDER = {NEW: 0, BACK: 1, ONGOING: 2}


def statuses(batch: Batch, memory: SeenMemory, wall_offset: float,
             rules: NewsRules) -> dict:
    """The status of each error of C{batch}, by L{seen_key}."""
    return {
        seen_key(entry): status_of(
            memory.get(seen_key(entry)), entry.first_seen + wall_offset,
            entry.total, rules)
        for entry in batch.entries}


def news_first(batch: Batch, by_key: Mapping[str, Status]) -> Batch:
    """The batch with its new errors first, then those back, then the
    ongoing ones, each most frequent first."""
    order = sorted(range(len(batch.entries)), key=lambda index: (
        _ORDER[by_key[seen_key(batch.entries[index])].kind], index))
    return Batch(tuple(batch.entries[index] for index in order),
                 batch.overflow)


def remember(memory: SeenMemory, entries: Iterable[Entry],
             wall_offset: float, now: float) -> None:
    """Record in the memory that these errors were reported at C{now}."""
    for entry in entries:
        memory.record(seen_key(entry), entry.first_seen + wall_offset,
                      entry.last_seen + wall_offset, entry.total, now)
