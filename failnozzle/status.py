"""
What a running daemon says of itself: the status (GET /status, and the
page at /), and whether it is healthy (GET /healthz).  Built when asked,
from what the parts keep anyway: nothing here runs per error.
"""
from __future__ import annotations

import os
import resource
from typing import Optional

from failnozzle import __version__
from failnozzle.counts import INPUTS

#: The errors the status lists with their counts and hosts.
TOP_ERRORS = 10
#: Hosts named per error there.
TOP_HOSTS = 5
#: The longest text shown per error.
_TEXT_CHARS = 300
#: The failed messages GET /api/failed lists (each read for its headers).
FAILED_LISTED = 100
#: A flush later than FLUSH_SECONDS by more than this is not on time.
_FLUSH_GRACE_SECONDS = 5.0


def status_of(service) -> dict:
    """
    The status of a L{failnozzle.service.FailnozzleService}, as JSON
    values (times wall-clock seconds since the epoch, None if never).
    """
    now = service.reactor_seconds()
    wall = service.wall_time
    counts = service.counts
    settings = service.settings
    buffered = service.aggregator.view()
    held = service.held
    waiting = service.outbox.waiting_since()
    failed = _failed_names(service)
    last_error = counts.last_delivery_error
    return {
        "version": __version__,
        "server_name": settings.SERVER_NAME,
        "started": wall(counts.started),
        "uptime_seconds": now - counts.started,
        "listening": {name.lower(): (f"[{host}]:{port}" if ":" in host
                                     else f"{host}:{port}")
                      for name, (host, port) in service.listening().items()},
        "received": {name: counts.received[name] for name in INPUTS},
        "bad_input": dict(counts.bad_input),
        "below_level": dict(counts.below_level),
        "silences": service.silences.shown(),
        "sentry_items_dropped": dict(counts.dropped_items),
        "buffered": {
            "unique": len(buffered.entries),
            "total": buffered.total,
            "not_kept": buffered.overflow,
            "top": [_error_of(entry, settings.unique_fields, wall)
                    for entry in sorted(
                buffered.entries, key=lambda e: -e.total)[:TOP_ERRORS]],
        },
        "held": {kind: {"unique": len(batch.entries), "total": batch.total}
                 for kind, batch in held.items()},
        "spool": {
            "messages": len(waiting),
            "oldest_age_seconds": now - min(waiting) if waiting else None,
            "failed": len(failed),
        },
        "flush": {
            "every_seconds": settings.FLUSH_SECONDS,
            "last": _wall_or_none(wall, counts.last_flush),
            "next": _wall_or_none(wall, service.next_flush),
        },
        "delivery": {
            "to": service.outbox.transport.describe(),
            "sent": dict(counts.digests_sent),
            "last_success": _wall_or_none(wall, counts.last_delivery),
            "last_error": None if last_error is None else {
                "at": wall(last_error.at), "reason": last_error.reason},
            "failures": dict(counts.delivery_failures),
        },
        "snapshot": {
            "path": None if service.state_file is None
            else service.state_file.path,
            "age_seconds": None if counts.last_snapshot is None
            else now - counts.last_snapshot,
        },
        "seen_errors": len(service.seen),
        "cluster": _cluster_of(service),
        "udp_drops": udp_drops(service.datagram_sockets()),
        "memory": memory(),
    }


def health_of(service) -> Optional[str]:
    """
    Why the daemon is not healthy, or None if it is: it listens on
    UDP_BIND and its flush loop ran on time.
    """
    if not service.running:
        return "stopping"
    if "UDP_BIND" not in service.listening():
        return "not listening on UDP_BIND"
    settings = service.settings
    since = service.counts.last_flush
    if since is None:
        since = service.counts.started
    late = service.reactor_seconds() - since - settings.FLUSH_SECONDS
    if late > max(_FLUSH_GRACE_SECONDS, settings.FLUSH_SECONDS):
        return f"the last flush was {late + settings.FLUSH_SECONDS:.0f} s " \
               f"ago (FLUSH_SECONDS = {settings.FLUSH_SECONDS:g})"
    return None


def _cluster_of(service) -> Optional[dict]:
    """This node's part in a cluster, if in one (CLUSTER_URL)."""
    cluster = service.cluster
    if cluster is None:
        return None
    shown = cluster.status()
    shown["last_push"] = _wall_or_none(service.wall_time, shown["last_push"])
    return shown


def _error_of(entry, names: tuple, wall) -> dict:
    fields = dict(zip(names, entry.key))
    text = next((value for value in (fields.get("message"),
                                     fields.get("exc_text"), *entry.key)
                 if value is not None and str(value)), "")
    hosts = sorted(entry.sources.items(), key=lambda item: -item[1])
    return {
        "count": entry.total,
        "message": str(text)[:_TEXT_CHARS],
        "kind": fields.get("kind"),
        "first_seen": wall(entry.first_seen),
        "last_seen": wall(entry.last_seen),
        "hosts": {str(host): count for host, count in hosts[:TOP_HOSTS]},
        "more_hosts": max(0, len(hosts) - TOP_HOSTS) + (
            1 if entry.other_sources else 0),
    }


def _wall_or_none(wall, seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else wall(seconds)


def _failed_names(service) -> list:
    try:
        return service.outbox.failed()
    except OSError:
        return []


def udp_drops(sockets: list) -> Optional[int]:
    """
    What the kernel dropped for these sockets because their receive
    buffers were full (Linux's /proc/net/udp, by inode); None elsewhere.
    """
    inodes = set()
    for sock in sockets:
        try:
            inodes.add(str(os.fstat(sock.fileno()).st_ino))
        except OSError:
            continue
    total, found = 0, False
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table) as lines:
                next(lines, None)
                for line in lines:
                    columns = line.split()
                    if len(columns) >= 13 and columns[9] in inodes:
                        total += int(columns[12])
                        found = True
        except OSError:
            continue
    return total if found else None


def memory() -> dict:
    """Resident memory now and at the peak, in bytes (Linux), else the
    peak as getrusage gives it."""
    try:
        with open("/proc/self/status") as status:
            values = dict(line.split(":", 1) for line in status
                          if line.startswith(("VmRSS", "VmHWM")))
        return {"rss_bytes": int(values["VmRSS"].split()[0]) * 1024,
                "peak_rss_bytes": int(values["VmHWM"].split()[0]) * 1024}
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"rss_bytes": None, "peak_rss_bytes": peak}
