"""
What a digest tells of each error, and whether one is worth sending: new,
back after a quiet time, or ongoing, from the seen-memory and a time; an
ongoing error listed in full within REPEAT_SECONDS is only "still
happening", unless its rate rose RISE_FACTOR times, and a digest of only
such errors is not sent.  Plain data in, plain data out: no reactor, no
files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional

from failnozzle.aggregate import Batch, Entry
from failnozzle.fingerprint import digest_of
from failnozzle.seen import Seen, SeenMemory
from failnozzle.steps import Steps

NEW, BACK, ONGOING = "new", "back", "ongoing"

_DAY = 24 * 3600


class Status(NamedTuple):
    """
    What is known of an error as a digest tells it (wall-clock seconds).

    @ivar kind: L{NEW}, L{BACK} or L{ONGOING}.
    @ivar since: when it was first seen (ongoing: in an earlier digest).
    @ivar total: its instances reported so far, this digest's included.
    @ivar quiet: for one back, how long it had not been seen.
    @ivar rising: for one ongoing, whether its rate rose RISE_FACTOR times
        since it was last listed in full.
    """

    kind: str
    since: float
    total: int
    quiet: float = 0.0
    rising: bool = False


@dataclass(frozen=True)
class NewsRules:
    """SEEN_DAYS, REGRESSION_DAYS, REPEAT_SECONDS and RISE_FACTOR."""

    #: Seen longer ago than this, an error is new again (seconds).
    forget_after: float
    #: Quiet for at least this long, an error is back (seconds).
    back_after: float
    #: Listed in full this recently, an ongoing error is only counted
    #: (seconds; 0: always listed).
    repeat_after: float = 0.0
    #: A rate this many times the one when it was last listed is news.
    rise_factor: float = 10.0
    #: The shortest time a rate is measured over (FLUSH_SECONDS).
    rate_window: float = 60.0

    @classmethod
    def of(cls, settings) -> NewsRules:
        """The rules of a L{failnozzle.config.Settings}."""
        return cls(settings.SEEN_DAYS * _DAY, settings.REGRESSION_DAYS * _DAY,
                   settings.REPEAT_SECONDS, settings.RISE_FACTOR,
                   settings.FLUSH_SECONDS)


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


@dataclass(frozen=True)
class Telling:
    """
    What a digest of one batch tells.

    @ivar batch: its errors, new first, then those back, then the ongoing
        ones listed in full, each most frequent first; then the last
        C{quiet} of them, only still happening.
    @ivar statuses: by L{seen_key}, what is told of each.
    @ivar rates: by L{seen_key}, each error's instances a second.
    @ivar scope: what the memory's keys for this digest begin with: a
        route's errors are news to its team, whatever another was told.
    """

    batch: Batch
    statuses: Mapping[str, Status]
    rates: Mapping[str, float]
    quiet: int = 0
    scope: str = ""

    @property
    def worth_sending(self) -> bool:
        """Whether it has news: more than still happening errors."""
        return (len(self.batch.entries) > self.quiet
                or self.batch.overflow > 0)


def telling(batch: Batch, memory: SeenMemory, wall_offset: float,
            now: float, rules: NewsRules, repeats: bool = True,
            scope: str = "") -> Telling:
    """
    What a digest of C{batch} at C{now} (wall-clock) tells.

    @param repeats: whether ongoing errors listed within REPEAT_SECONDS
        are only counted (not for canaries, which are expected to repeat).
    @param scope: see L{Telling.scope}.
    """
    statuses, rates, listed, quiet = {}, {}, [], []
    for entry in batch.entries:
        key = seen_key(entry)
        seen = memory.get(scope + key)
        first_seen = entry.first_seen + wall_offset
        status = status_of(seen, first_seen, entry.total, rules)
        rate = entry.total / max(rules.rate_window, now - first_seen)
        if status.kind == ONGOING:
            status = status._replace(
                rising=0 < seen.rate * rules.rise_factor <= rate)
        statuses[key], rates[key] = status, rate
        # A listing "in the future" (the clock stepped back since) is no
        # reason to wait.
        if (repeats and status.kind == ONGOING and not status.rising
                and 0 <= now - seen.last_reported < rules.repeat_after):
            quiet.append(entry)
        else:
            listed.append((_ORDER[status.kind], len(listed), entry))
    listed.sort()
    return Telling(Batch(tuple(entry for *_, entry in listed) + tuple(quiet),
                         batch.overflow), statuses, rates, len(quiet), scope)


#: Errors remembered in one step (about 2 ms).
_REMEMBERED_PER_STEP = 1000


def remembering(memory: SeenMemory, told: Telling, wall_offset: float,
                now: float) -> Steps[None]:
    """
    Record in the memory, in steps (see L{failnozzle.steps}), that the
    errors of a digest were reported at C{now}: those listed in full with
    their rates, the others counted.
    """
    entries = told.batch.entries
    in_full = len(entries) - told.quiet
    for number, entry in enumerate(entries):
        if number and not number % _REMEMBERED_PER_STEP:
            yield
        key = seen_key(entry)
        listed = (now, told.rates[key]) if number < in_full else None
        memory.record(told.scope + key, entry.first_seen + wall_offset,
                      entry.last_seen + wall_offset, entry.total, listed)
