"""
Prometheus metrics (GET /metrics), read from the daemon's counts and parts
when scraped: counting an error costs nothing more for them.
"""
from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    Metric)
from prometheus_client.exposition import choose_encoder
from twisted.web.resource import Resource
from twisted.web.server import Request

from failnozzle.counts import INPUTS
from failnozzle.status import udp_drops

_PREFIX = "failnozzle_"


class MetricsPage(Resource):
    """
    GET /metrics, in the format the scraper asks for (Prometheus' text, or
    OpenMetrics).  Rendered on the reactor: prometheus_client's own Twisted
    resource runs the collection in a thread pool, where the counts and the
    buffer would be read while the reactor changes them.
    """

    isLeaf = True

    def __init__(self, service) -> None:
        super().__init__()
        self._registry = CollectorRegistry(auto_describe=True)
        self._registry.register(FailnozzleCollector(service))
        ProcessCollector(registry=self._registry)

    def render_GET(self, request: Request) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        request.setHeader(b"content-type", content_type.encode("latin-1"))
        return encoder(self._registry)


class FailnozzleCollector:
    """A prometheus_client collector of one running service."""

    def __init__(self, service) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        service = self._service
        counts = service.counts
        wall = service.wall_time
        yield _counter("errors_received", "Errors received, by input (bad "
                       "input included).", "input",
                       {name: counts.received[name] for name in INPUTS})
        yield _counter("bad_input", "Bad input, by reason.", "reason",
                       counts.bad_input)
        yield _counter("below_level", "Records less severe than MIN_LEVEL "
                       "or GELF_MIN_LEVEL, by input: received, not "
                       "errors.", "input", counts.below_level)
        yield _counter("sentry_items_dropped", "Sentry envelope items "
                       "passed over, by type (all but events, and events "
                       "over 1 MB).", "type", counts.dropped_items)
        yield _counter("digests_sent", "Messages delivered, by class "
                       "(digest, monitoring, pager).", "class",
                       counts.digests_sent)
        yield _counter("delivery_failures", "Failed delivery attempts, by "
                       "kind of failure.", "reason",
                       counts.delivery_failures)
        buffered = service.aggregator.view()
        yield _gauge("buffered_errors", "Unique errors counted for the "
                     "next digest.", len(buffered.entries))
        yield _gauge("buffered_instances", "Instances counted for the next "
                     "digest.", buffered.total)
        held = GaugeMetricFamily(_PREFIX + "held_errors", "Instances held "
                                 "for the next digest of a class, its last "
                                 "one undelivered or without news.",
                                 labels=["class"])
        for kind, batch in sorted(service.held.items()):
            held.add_metric([kind], batch.total)
        yield held
        yield _gauge("spool_messages", "Messages waiting to be delivered.",
                     len(service.outbox.waiting_since()))
        try:
            failed = len(service.outbox.failed())
        except OSError:
            failed = float("nan")
        yield _gauge("failed_messages", "Messages given up on, in failed/.",
                     failed)
        yield _gauge("seen_errors", "Errors in the seen-memory.",
                     len(service.seen))
        for name, seconds in (("last_flush", counts.last_flush),
                              ("last_delivery_success", counts.last_delivery),
                              ("last_snapshot", counts.last_snapshot)):
            if seconds is not None:
                yield _gauge(f"{name}_timestamp_seconds", f"When the "
                             f"{name.replace('_', ' ')} was (Unix time).",
                             wall(seconds))
        if service.cluster is not None:
            yield from _cluster_metrics(service.cluster.status(), wall)
        drops = udp_drops(service.datagram_sockets())
        if drops is not None:
            yield CounterMetricFamily(
                _PREFIX + "udp_drops", "Datagrams the kernel dropped for "
                "failnozzle's UDP sockets, their buffers full.", value=drops)


def _cluster_metrics(status: dict, wall) -> Iterator[Metric]:
    """A cluster node's: Redis answers, the lease, what is not merged."""
    yield _gauge("cluster_connected", "1 if Redis answered the last call.",
                 int(status["connected"]))
    yield _gauge("cluster_leader", "1 if this node holds the flush lease "
                 "(sends the cluster's digests).", int(status["leader"]))
    yield _gauge("cluster_alone", "1 if Redis has been unreachable for "
                 "CLUSTER_GRACE_SECONDS: this node sends its own digests.",
                 int(status["alone"]))
    yield _gauge("cluster_unpushed_errors", "Instances counted here that "
                 "Redis has not taken yet (the push retried).",
                 status["unpushed"])
    yield _gauge("cluster_last_merge_pushes", "Pushes the leader merged at "
                 "its last flush (0 on other nodes).",
                 status["last_merge_pushes"])
    if status["last_push"] is not None:
        yield _gauge("cluster_last_push_timestamp_seconds", "When Redis "
                     "last took a push of this node (Unix time).",
                     wall(status["last_push"]))


def _counter(name: str, documentation: str, label: str,
             values) -> CounterMetricFamily:
    family = CounterMetricFamily(_PREFIX + name, documentation,
                                 labels=[label])
    for value, count in sorted(values.items()):
        family.add_metric([str(value)], count)
    return family


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(_PREFIX + name, documentation, value=value)
