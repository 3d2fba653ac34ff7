"""
The pager's decisions, fed plain numbers and times at each flush: when the
errors of the last PAGER_WINDOW_SIZE flushes reach PAGER_LIMIT, one page;
while they stay there, a reminder every PAGER_REPEAT_SECONDS; once they
have stayed below it for a whole window, one "resolved".  A page names the
window's top errors and the hosts those came from most.  Bad input and
canaries are not errors here: the service counts neither in.  And when the
canaries stop (L{CanaryWatch}), a page that the pipeline may be broken.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Mapping, Optional

FIRING = "firing"
REMINDER = "reminder"
RESOLVED = "resolved"

#: The errors and the hosts a page names, at most.
NAMED = 5


@dataclass(frozen=True)
class Culprit:
    """One of the errors a page names."""

    headline: str
    kind: Optional[str]
    count: int
    #: Never reported before (as the digest would mark it).
    new: bool = False


@dataclass(frozen=True)
class Page:
    """
    What to page about.

    @ivar what: L{FIRING}, L{REMINDER} or L{RESOLVED}.
    @ivar window_total: the errors of the last window (at L{RESOLVED}: of
        the window that ended it).
    @ivar at: when it was decided, and C{since} when the rate reached
        the limit (the clock's seconds).
    @ivar total: the errors counted from then on.
    @ivar culprits: the window's top errors, most frequent first.
    @ivar hosts: C{(host, count)} of the window's errors, most first.
    """

    what: str
    window_total: int
    at: float
    since: float
    total: int
    culprits: tuple = ()
    hosts: tuple = ()


@dataclass
class _Flush:
    count: int
    culprits: Mapping[str, Culprit]
    hosts: Mapping[str, int]


class Pager:
    """The alert window and where the alert stands."""

    def __init__(self, size: int, limit: int, repeat_seconds: float) -> None:
        self.size, self.limit = size, limit
        self._repeat = repeat_seconds
        self._flushes: deque = deque(maxlen=size)
        #: While over the limit: since when, the last page, the errors
        #: since, and the flushes in a row below the limit since.
        self.since: Optional[float] = None
        self.last_paged: Optional[float] = None
        self.total = 0
        self.below = 0

    @property
    def counts(self) -> list:
        """The errors of each flush in the window, oldest first."""
        return [flush.count for flush in self._flushes]

    @property
    def window_total(self) -> int:
        return sum(flush.count for flush in self._flushes)

    def observe(self, now: float, count: int,
                culprits: Optional[Mapping[str, Culprit]] = None,
                hosts: Optional[Mapping[str, int]] = None) -> Optional[Page]:
        """
        Take one flush's errors (C{culprits}: its top errors by identity;
        C{hosts}: its errors per host) and say what to page, if anything.
        """
        self._flushes.append(_Flush(count, culprits or {},
                                    _top(hosts or {})))
        window = self.window_total
        if self.since is not None:
            self.total += count
        if window >= self.limit:
            self.below = 0
            if self.since is None:
                self.since, self.last_paged, self.total = now, now, window
                return self._page(FIRING, now)
            if now - self.last_paged >= self._repeat:
                self.last_paged = now
                return self._page(REMINDER, now)
            return None
        if self.since is None:
            return None
        self.below += 1
        if self.below < self.size:
            return None
        page = self._page(RESOLVED, now)
        self.since = self.last_paged = None
        self.total = self.below = 0
        return page

    def _page(self, what: str, now: float) -> Page:
        culprits: dict = {}
        hosts: Counter = Counter()
        for flush in self._flushes:
            hosts.update(flush.hosts)
            for identity, culprit in flush.culprits.items():
                seen = culprits.get(identity)
                culprits[identity] = culprit if seen is None else Culprit(
                    culprit.headline, culprit.kind,
                    seen.count + culprit.count, seen.new or culprit.new)
        top = sorted(culprits.values(), key=lambda culprit: -culprit.count)
        return Page(what, self.window_total, now, self.since, self.total,
                    tuple(top[:NAMED]), tuple(hosts.most_common(NAMED)))

    def configure(self, size: int, limit: int,
                  repeat_seconds: float) -> None:
        """A reload's settings: the window keeps the flushes that fit."""
        self.size, self.limit, self._repeat = size, limit, repeat_seconds
        self._flushes = deque(self._flushes, maxlen=size)

    def saved(self) -> Optional[dict]:
        """Where the alert stands, for the snapshots (None: quiet)."""
        if self.since is None:
            return None
        return {"since": self.since, "last_paged": self.last_paged,
                "total": self.total, "below": self.below}

    def restore(self, counts: list, saved: Optional[dict],
                now: float) -> None:
        """
        Take what a snapshot kept: the window's counts (which errors they
        were is not kept) and where the alert stood (L{saved}), its times
        no later than C{now} (the clock may have been set back since).
        """
        self._flushes = deque((_Flush(count, {}, {}) for count in counts),
                              maxlen=self.size)
        if saved is not None:
            self.since = min(saved["since"], now)
            self.last_paged = min(saved["last_paged"], now)
            self.total, self.below = saved["total"], saved["below"]


def _top(hosts: Mapping[str, int]) -> dict:
    """A flush's hosts with the most errors: enough of them that the
    window's top ones are told nearly exactly."""
    return dict(Counter(hosts).most_common(4 * NAMED))


MISSED = "missed"
BACK = "back"


class CanaryWatch:
    """
    CANARY_MAX_SILENCE_SECONDS: the applications' "just monitoring" canary
    errors are expected; when none has come for that long, once at least
    one came (in this run or the last), the error pipeline itself may be
    broken.  Told once, and once again when they are back.

    @ivar last_seen: when the newest canary came (the clock's seconds).
    @ivar missed_since: since when they are missed, if they are.
    """

    def __init__(self, max_silence: float) -> None:
        self.max_silence = max_silence
        self.last_seen: Optional[float] = None
        self.missed_since: Optional[float] = None

    def observe(self, now: float, newest: Optional[float]) -> Optional[str]:
        """
        Take a flush's newest canary (None: none came) and say whether to
        page L{MISSED} or L{BACK}.
        """
        if newest is not None:
            self.last_seen = max(newest, self.last_seen or newest)
            if self.missed_since is not None:
                self.missed_since = None
                return BACK
            return None
        if (not self.max_silence or self.last_seen is None
                or self.missed_since is not None
                or now - self.last_seen < self.max_silence):
            return None
        self.missed_since = now
        return MISSED

    def saved(self) -> Optional[dict]:
        if self.last_seen is None:
            return None
        return {"last_seen": self.last_seen,
                "missed_since": self.missed_since}

    def restore(self, saved: Optional[dict], now: float) -> None:
        """
        Take what the last run saw: canaries had come, so they are watched
        for from the start, which counts as the last one (none could come
        while failnozzle was down: a full CANARY_MAX_SILENCE_SECONDS from
        now before they are missed); an alert already sent stays sent.
        """
        if saved is not None:
            self.last_seen = now
            missed = saved.get("missed_since")
            self.missed_since = None if missed is None else min(missed, now)
