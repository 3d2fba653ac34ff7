"""
What the daemon has done since it started, for its status page and its
metrics: plain counters the parts add to where it costs nothing (a batch of
datagrams at a time, a delivery, a piece of bad input), read when asked.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

#: The inputs errors arrive by, as status and metrics name them.
INPUTS = ("udp", "gelf", "mail", "http", "sentry")


@dataclass
class DeliveryError:
    """The last time a message could not be delivered, and why."""

    at: float
    reason: str


@dataclass
class Counts:
    """
    Since the start (times are the reactor's seconds, which status shows
    as wall-clock times).

    @ivar received: by input (L{INPUTS}), what arrived: datagrams, messages,
        requests' records, bad ones included.
    @ivar bad_input: by reason (as the digest's bad-input entries say it).
    @ivar below_level: by input, the records less severe than MIN_LEVEL
        (or GELF_MIN_LEVEL): received, neither digested nor paged.
    @ivar digests_sent: by class (X-Failnozzle: digest, monitoring, pager).
    @ivar delivery_failures: by kind of failure (temporary, permanent,
        too_big, expired, unconfirmed).
    @ivar dropped_items: by type, the Sentry envelope items that are not
        events (transactions, sessions, ...), or events too large.
    """

    started: float
    received: Counter = field(default_factory=Counter)
    bad_input: Counter = field(default_factory=Counter)
    below_level: Counter = field(default_factory=Counter)
    digests_sent: Counter = field(default_factory=Counter)
    delivery_failures: Counter = field(default_factory=Counter)
    dropped_items: Counter = field(default_factory=Counter)
    last_delivery: Optional[float] = None
    last_delivery_error: Optional[DeliveryError] = None
    last_flush: Optional[float] = None
    last_snapshot: Optional[float] = None

    def delivered(self, kind: str, at: float) -> None:
        self.digests_sent[kind] += 1
        self.last_delivery = at

    def not_delivered(self, failure_kind: str, reason: str,
                      at: float) -> None:
        self.delivery_failures[failure_kind] += 1
        self.last_delivery_error = DeliveryError(at, reason)
