#!/usr/bin/env python3
"""
How failnozzle takes an error storm, against the Python ceiling, in one run
on 127.0.0.1.

    python bench/ingest.py              # everything, a few minutes
    python bench/ingest.py --quick      # a smoke test, under a minute
    python bench/ingest.py --scenario ladder --rates 20000,40000 --repeat 5

The load is what failnozzle.loghandler.AggregatorHandler sends for
logger.exception(...) with a ~1.7 kB traceback (~2.3 kB per datagram), over
--unique errors from --hosts hosts, sent by --senders processes that pace
themselves (a millisecond's worth of datagrams, then a sleep).

Scenarios (--scenario, all by default):

ladder       Each rate of --rates, for --seconds, --repeat times, to two
             receivers one after the other: the real daemon, started as
             users start it (twistd -n failnozzle --config=...), counting
             what its digests report after SIGTERM; and a reference
             receiver: socket.recv + orjson.loads + a dict count of the same
             unique key, with the same receive buffer, in a process of its
             own.  Per point: the loss (sent - counted, cross-checked with
             the socket's drop counter in /proc/net/udp and the kernel's UDP
             InErrors in /proc/net/snmp), datagrams handled per second, CPU
             microseconds per datagram (/proc/<pid>/stat) and peak RSS
             (VmHWM).  A receiver leaves the ladder once it loses more than
             5 %.  Then the highest rate with no loss, the throughput at
             saturation, and the daemon-to-reference ratios.
sustained    The reference at each of --sustained-rates for
             --sustained-seconds (10 s) until it loses: the highest rate it
             holds.  Then the daemon at that rate as long, with a flush
             every --flush-seconds (2 s) and snapshots every second, and
             the reference again.  Prints both losses and CPU per datagram,
             and places each of the daemon's losses: within 0.25 s of a
             flush, of a snapshot, or elsewhere (the socket's drop counter
             sampled every 10 ms); and how long the longest step of making
             one of its digests holds the reactor.
cardinality  --flood-count distinct errors (1,000,000) into the daemon at a
             rate it takes, grouped by fingerprints and with GROUPING =
             'exact': its peak RSS, and whether the digest stays bounded
             (its size, the errors listed, the "more errors not shown"
             line).
hostile      The issue's hostile inputs (a %100000000d format, a repeated
             mapping key, bad formats, 60,000-character fields, zlib GELF
             inflating to 1 MB, a chunk flood from one host beside another
             host's messages, chunks sent again), each into a fresh daemon:
             its memory before and after, the digest, what it logged.
grouping     The daemon on --unique bugs, then on --unique bugs of
             --variants distinct reports each (a number in the message and
             the traceback varies), at --grouping-rate for
             --grouping-seconds: CPU per datagram, and the entries of the
             digest (--unique, if the reports fold).  The ladder also runs
             the daemon with GROUPING = 'exact' beside the default.
routes       The daemon at --routes-rate for --seconds (50 unique errors x 20
             hosts) with no ROUTES and SILENCES, and with 20 rules and 10
             silences (matching a kind, a message, hosts), interleaved
             --repeat times: CPU per datagram and loss for each.  Routing
             and silencing run per flush; this shows receiving does not
             pay for them.
flush        How long a flush of 10,000 unique errors blocks the reactor,
             measured in process phase by phase, and the steps of making
             its digest (the longest is what the reactor waits for at
             once); then whether the real
             daemon loses datagrams while it flushes such a buffer every
             --flush-seconds, against the same load with no flush.

Medians are of --repeat runs.  Everything is bounded in count and time.
"""
from __future__ import annotations

import argparse
import email
import email.policy
import multiprocessing
import os
import re
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import orjson
from common import (Daemon, DropTimeline, cpu_seconds, cycling, digest_total,
                    datagram_maker, kernel_udp_drops, peak_rss,
                    realistic_datagrams, rss, send_from_processes,
                    team_routes, udp_socket_queue, wait_drained)
from failnozzle.config import UniqueMessage

#: Ends the reference receiver's loop; it then reports its count.
STOP = b"stop"

#: A receiver that loses more than this share of a point leaves the ladder.
SATURATED = 0.05

MB = 1024 * 1024


def reference_receiver(buffer_size: int, connection) -> None:
    """
    The Python ceiling: a blocking socket.recv, orjson.loads and a count
    per unique key and source, nothing else.  Sends C{(port, granted
    buffer)} once bound, and the number of datagrams counted once it reads
    L{STOP}.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # As failnozzle.ingest.set_receive_buffer asks (not imported: it would
    # bring Twisted into this process's memory).
    try:
        # SO_RCVBUFFORCE, which Python's socket module does not name.
        sock.setsockopt(socket.SOL_SOCKET, 33, buffer_size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_size)
    sock.bind(("127.0.0.1", 0))
    connection.send((sock.getsockname()[1],
                     sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)))
    fields = UniqueMessage._fields
    counts: dict = {}
    recv, loads = sock.recv, orjson.loads
    while True:
        data = recv(65536)
        if data == STOP:
            break
        record = loads(data)
        key = (tuple(map(record.get, fields)), record.get("source"))
        counts[key] = counts.get(key, 0) + 1
    connection.send(sum(counts.values()))


class ReferenceUnderTest:
    """L{reference_receiver} in a fresh interpreter (spawned, not forked,
    so its memory is its own)."""

    def __init__(self, buffer_size: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._connection, theirs = context.Pipe()
        self._process = context.Process(target=reference_receiver,
                                        args=(buffer_size, theirs))
        self._process.start()
        theirs.close()
        if not self._connection.poll(30):
            self._process.kill()
            raise SystemExit("the reference receiver did not start")
        self.port, self.receive_buffer = self._connection.recv()
        self.pid = self._process.pid

    def stop(self) -> int:
        """Send L{STOP} (again, should the kernel drop it) until the
        receiver answers; return its count."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for _ in range(100):
                sock.sendto(STOP, ("127.0.0.1", self.port))
                if self._connection.poll(0.1):
                    count = self._connection.recv()
                    self._process.join(10)
                    return count
        self._process.kill()
        raise SystemExit("the reference receiver did not stop")


class DaemonUnderTest:
    """The real daemon, as L{common.Daemon} starts it, counted from its
    digests once stopped."""

    def __init__(self, directory: str, buffer_size: int, **settings) -> None:
        settings.setdefault("FLUSH_SECONDS", 3600)
        self.daemon = Daemon(directory, UDP_RCVBUF=buffer_size, **settings)
        self.port = self.daemon.port
        self.pid = self.daemon.pid
        self.receive_buffer = self.daemon.receive_buffer

    def stop(self) -> int:
        self.daemon.stop()
        return self.daemon.counted()


@dataclass
class Run:
    """What one receiver did with one load."""

    sent: int
    counted: int
    busy: float  # seconds from the first datagram until the queue was empty
    cpu: float  # seconds of CPU the receiver used meanwhile
    peak_rss: int
    socket_drops: int
    kernel_drops: int
    #: The drops over time, if asked for (see L{common.DropTimeline}).
    timeline: Optional[DropTimeline] = None

    @property
    def lost(self) -> int:
        return self.sent - self.counted

    @property
    def handled_per_second(self) -> float:
        return self.counted / self.busy

    @property
    def cpu_per_message(self) -> float:
        """Microseconds of CPU per datagram counted."""
        return self.cpu / max(1, self.counted) * 1e6


def measure(receiver, datagram: Callable[[int], bytes], rate: float,
            seconds: float, count: int, senders: int,
            watched: Optional[str] = None) -> Run:
    """
    Send one load to a started receiver, wait until it has read it all,
    take the readings, then stop it and learn what it counted.

    @param watched: a file whose changes are timed beside the drops (the
        daemon's state file), for a L{DropTimeline}.
    """
    kernel_before = kernel_udp_drops()
    drops_before = udp_socket_queue(receiver.port)[1]
    cpu_before = cpu_seconds(receiver.pid)
    timeline = None
    try:
        if watched is not None:
            timeline = DropTimeline(receiver.port, watched)
        sent, start = send_from_processes(receiver.port, datagram, rate,
                                          seconds, count, senders)
        drained = wait_drained(receiver.port)
        time.sleep(0.05)  # the last datagrams read are being counted
        cpu = cpu_seconds(receiver.pid) - cpu_before
        peak = peak_rss(receiver.pid)
        socket_drops = udp_socket_queue(receiver.port)[1] - drops_before
        kernel_drops = kernel_udp_drops() - kernel_before
    finally:
        if timeline is not None:
            timeline.stop()
        counted = receiver.stop()
    return Run(sent, counted, drained - start, cpu, peak, socket_drops,
               kernel_drops, timeline)


class Point:
    """
    One receiver at one load, over several runs.  The loss and its
    cross-checks are those of the run with the median loss, so they agree
    with each other; the other readings are medians over the runs.
    """

    def __init__(self, runs: list) -> None:
        typical = sorted(runs, key=lambda run: run.lost)[len(runs) // 2]
        self.sent = typical.sent
        self.lost = typical.lost
        self.socket_drops = typical.socket_drops
        self.kernel_drops = typical.kernel_drops
        self.handled_per_second, self.cpu_per_message, self.peak_rss = (
            statistics.median(getattr(run, reading) for run in runs)
            for reading in ("handled_per_second", "cpu_per_message",
                            "peak_rss"))


def run_ladder(options, datagrams: list) -> None:
    """
    Climb the rates with both receivers, interleaved run by run so both
    see the same machine; print a row per receiver and rate, then the
    summary.
    """
    size = sum(map(len, datagrams)) / len(datagrams)
    print(f"== ladder: {options.unique} unique errors x {options.hosts} "
          f"hosts, {size:.0f} bytes per datagram, {options.seconds:g} s per "
          f"point from {options.senders} sender process(es), median of "
          f"{options.repeat}")
    print(f"{'offered/s':>10} {'receiver':<10} {'sent/s':>9} {'lost':>8} "
          f"{'lost %':>7} {'sock drops':>10} {'kern drops':>10} "
          f"{'handled/s':>10} {'CPU us/msg':>10} {'RSS MB':>7}")
    receivers = {
        "daemon": lambda directory: DaemonUnderTest(directory,
                                                    options.rcvbuf),
        "exact": lambda directory: DaemonUnderTest(directory, options.rcvbuf,
                                                   GROUPING="exact"),
        "reference": lambda directory: ReferenceUnderTest(options.rcvbuf),
    }
    results: dict = {name: {} for name in receivers}
    climbing = list(receivers)
    buffers = set()
    for rate in options.rates:
        runs: dict = {name: [] for name in climbing}
        for _ in range(options.repeat):
            for name in climbing:
                with tempfile.TemporaryDirectory() as directory:
                    receiver = receivers[name](directory)
                    buffers.add(receiver.receive_buffer)
                    runs[name].append(measure(
                        receiver, cycling(datagrams), rate, options.seconds,
                        int(rate * options.seconds), options.senders))
        for name in list(climbing):
            point = results[name][rate] = Point(runs[name])
            print(f"{rate:>10,} {name:<10} "
                  f"{point.sent / options.seconds:>9,.0f} {point.lost:>8,.0f} "
                  f"{point.lost / point.sent:>7.2%} "
                  f"{point.socket_drops:>10,.0f} {point.kernel_drops:>10,.0f} "
                  f"{point.handled_per_second:>10,.0f} "
                  f"{point.cpu_per_message:>10.1f} "
                  f"{point.peak_rss / MB:>7.1f}", flush=True)
            if point.lost > SATURATED * point.sent:
                climbing.remove(name)
        if not climbing:
            break
    print(f"receive buffer granted (bytes): "
          f"{', '.join(map(str, sorted(buffers)))}")
    summarize_ladder(results)


def summarize_ladder(results: dict) -> None:
    """The headline figures of the ladder, and the ratios of the daemon to
    the reference and to itself with GROUPING = 'exact'; CPU and memory
    compared at the highest rate all took whole."""

    def zero_loss_rate(points: dict) -> int:
        return max((rate for rate, point in points.items()
                    if point.lost == 0), default=0)

    names = ("daemon", "exact", "reference")
    common_rate = min(zero_loss_rate(results[name]) for name in names)
    rows = [
        ("zero-loss rate /s", [zero_loss_rate(results[name])
                               for name in names], "{:,}"),
        ("handled/s at saturation",
         [max(point.handled_per_second for point in results[name].values())
          for name in names], "{:,.0f}"),
    ]
    if common_rate:
        rows += [
            (f"CPU us/msg at {common_rate:,}/s",
             [results[name][common_rate].cpu_per_message for name in names],
             "{:.1f}"),
            (f"peak RSS MB at {common_rate:,}/s",
             [results[name][common_rate].peak_rss / MB for name in names],
             "{:.1f}"),
        ]
    print(f"\n{'':<28} {'daemon':>12} {'exact':>12} {'reference':>12} "
          f"{'/exact':>7} {'/ref':>7}")
    for label, (mine, exact, theirs), form in rows:
        ratios = [f"{mine / other:.2f}" if other else "-"
                  for other in (exact, theirs)]
        print(f"{label:<28} {form.format(mine):>12} {form.format(exact):>12} "
              f"{form.format(theirs):>12} {ratios[0]:>7} {ratios[1]:>7}")
    print("(daemon: grouping by fingerprints, the default; exact: GROUPING = "
          "'exact'; zero loss: the run with the median loss lost nothing; "
          "handled/s is counted / seconds from the first datagram until its "
          "socket was empty)")
    for name, points in results.items():
        if not points[max(points)].lost:
            print(f"({name} lost nothing even at the top rate: its "
                  f"saturation is above the ladder)")
    print()


#: What run_routes configures: 20 rules as teams write them, 10 silences.
ROUTED = {
    "ROUTES": team_routes(20),
    "SILENCES": [{"match": {"message": f"^known issue {n}$"},
                  "until": "2099-01-01T00:00:00Z", "comment": f"OPS-{n}"}
                 for n in range(10)],
}


def run_routes(options) -> None:
    """The daemon with and without ROUTES and SILENCES, same load."""
    rate, seconds = options.routes_rate, options.seconds
    print(f"== routes: {rate:,.0f}/s for {seconds:g} s ({options.unique} "
          f"errors x {options.hosts} hosts), without and with 20 ROUTES and "
          f"10 SILENCES, median of {options.repeat}")
    print(f"{'configured':<22} {'sent':>9} {'lost':>7} {'CPU us/msg':>11}")
    datagrams = realistic_datagrams(options.unique, options.hosts)
    ways = {"none": {}, "20 routes, 10 silences": ROUTED}
    runs: dict = {way: [] for way in ways}
    for _ in range(options.repeat):
        for way, settings in ways.items():
            with tempfile.TemporaryDirectory() as directory:
                receiver = DaemonUnderTest(directory, options.rcvbuf,
                                           **settings)
                runs[way].append(measure(
                    receiver, cycling(datagrams), rate, seconds,
                    int(rate * seconds), options.senders))
    for way in ways:
        point = Point(runs[way])
        print(f"{way:<22} {point.sent:>9,} {point.lost:>7,.0f} "
              f"{point.cpu_per_message:>11.2f}")
    print()


def run_grouping(options) -> None:
    """
    What folding costs: the daemon on --unique bugs, and on as many bugs of
    --variants reports each (their messages and tracebacks differing in a
    number), at --grouping-rate, runs interleaved: CPU per datagram, loss,
    and the entries its digest lists.
    """
    rate, seconds = options.grouping_rate, options.grouping_seconds
    count = int(rate * seconds)
    print(f"== grouping: {options.unique} bugs from {options.hosts} hosts, "
          f"with 1 and with {options.variants:,} distinct reports each, "
          f"{count:,} datagrams at {rate:,}/s; median of {options.repeat}")
    print(f"{'workload':<28} {'lost':>7} {'CPU us/msg':>10} {'entries':>8} "
          f"{'total':>9}")
    medians = {}
    workloads = {f"{options.unique} x 1": 1,
                 f"{options.unique} x {options.variants:,}": options.variants}
    runs: dict = {name: [] for name in workloads}
    for _ in range(options.repeat):
        for name, variants in workloads.items():
            with tempfile.TemporaryDirectory() as directory:
                receiver = DaemonUnderTest(directory, options.rcvbuf)
                run = measure(receiver, datagram_maker(
                    options.unique, options.hosts, variants), rate, seconds,
                    count, options.senders)
                [digest] = [read_digest(path)
                            for path in receiver.daemon.digests()]
            runs[name].append(run)
            print(f"{name:<28} {run.lost:>7,} {run.cpu_per_message:>10.1f} "
                  f"{digest['unique']:>8,} {digest['total']:>9,}",
                  flush=True)
    for name, done in runs.items():
        medians[name] = statistics.median(run.cpu_per_message
                                          for run in done)
    few, many = medians.values()
    print(f"CPU per datagram (medians): {few:.1f} us with 1 report per "
          f"bug, {many:.1f} us with {options.variants:,}: {many / few:.2f}x\n")


def run_sustained(options, datagrams: list) -> None:
    """
    The bare reference at each of --sustained-rates until it loses: the
    highest rate it holds.  Then the daemon at that rate for as long, with
    flushes every --flush-seconds and snapshots every second, and the
    reference once more (the machine is shared; a loss there says the run
    is not clean).  Each of the daemon's losses is placed: within 0.25 s of
    a flush (a digest written), of a snapshot (the state file replaced),
    or elsewhere.
    """
    seconds = options.sustained_seconds
    size = sum(map(len, datagrams)) / len(datagrams)
    print(f"== sustained: {options.unique} unique errors x {options.hosts} "
          f"hosts, {size:.0f} bytes per datagram, {seconds:g} s per run from "
          f"{options.senders} sender process(es)")
    header = (f"{'receiver':<32} {'offered/s':>10} {'sent':>9} {'lost':>7} "
              f"{'CPU us/msg':>10}")
    print(header)

    def run(name: str, rate: int, **settings) -> Run:
        with tempfile.TemporaryDirectory() as directory:
            if name == "reference":
                receiver, watched = ReferenceUnderTest(options.rcvbuf), None
            else:
                receiver = DaemonUnderTest(directory, options.rcvbuf,
                                           **settings)
                watched = os.path.join(directory, "failnozzle-state.json")
            result = measure(receiver, cycling(datagrams), rate, seconds,
                             int(rate * seconds), options.senders, watched)
            result.granted = receiver.receive_buffer
            if watched is not None:
                result.flushes = [os.path.getmtime(path) for path
                                  in receiver.daemon.digests()]
        label = name if name == "reference" else (
            f"daemon (flush every {settings['FLUSH_SECONDS']:g} s)")
        print(f"{label:<32} {rate:>10,} {result.sent:>9,} {result.lost:>7,} "
              f"{result.cpu_per_message:>10.1f}", flush=True)
        return result

    # The machine is shared: a rate counts as held if one of the tries
    # lost nothing, and the daemon gets as many tries.
    held, references = 0, []
    for rate in options.sustained_rates:
        tries = []
        for _ in range(options.sustained_tries):
            tries.append(run("reference", rate))
            if not tries[-1].lost:
                break
        if tries[-1].lost:
            break
        held, references = rate, tries
    if not held:
        print("the reference lost datagrams at every rate: nothing to "
              "compare\n")
        return
    daemons = []
    for _ in range(options.sustained_tries):
        daemons.append(run("daemon", held,
                           FLUSH_SECONDS=options.flush_seconds))
        references.append(run("reference", held))
    print(f"\nhighest rate the reference held without loss: {held:,}/s; "
          f"its runs there lost "
          f"{', '.join(f'{run.lost:,}' for run in references)}")
    for daemon in daemons:
        split = ", ".join(
            f"{count:,} {place}" for place, count
            in daemon.timeline.losses(daemon.flushes).items())
        print(f"daemon at {held:,}/s for {seconds:g} s: {daemon.lost:,} lost "
              f"of {daemon.sent:,} ({split}); "
              f"{len(daemon.flushes)} digests; its socket held at most "
              f"{daemon.timeline.max_queued / MB:.1f} MB of the "
              f"{daemon.granted / MB:.0f} MB granted")
    mine = statistics.median(run.cpu_per_message for run in daemons)
    theirs = statistics.median(run.cpu_per_message for run in references)
    print(f"CPU per datagram at {held:,}/s (medians): daemon {mine:.1f} us, "
          f"reference {theirs:.1f} us: {mine / theirs:.2f}x")
    print_digest_steps(options.unique, options.hosts, options.repeat)
    print()


def read_digest(path: str) -> dict:
    """
    The figures of one digest file: its size, the errors listed in full,
    the summary's lines for the errors not listed and not stored, and
    whether the summary's counts add up to the subject's total.
    """
    with open(path, "rb") as stored:
        data = stored.read()
    message = email.message_from_bytes(data, policy=email.policy.default)
    text = message.get_content()
    total = digest_total(text)
    summary = text.split("Summary:\n========\n", 1)[1].split(
        "========\nDetails:", 1)[0]
    return {
        "bytes": len(data),
        "total": total,
        "unique": int(re.search(r"of (\d+) unique errors?", text).group(1)),
        "listed": len(re.findall(r"^Exception #\d+ of \d+:", text, re.M)),
        "summary lines": re.findall(
            r"^\d+X (?:in \d+ more unique errors not listed|more errors not "
            r"shown)", summary, re.M),
        "exact": sum(map(int, re.findall(r"^(\d+)X ", summary, re.M)))
        == total,
    }


def run_cardinality(options) -> None:
    """
    A flood of distinct errors into the daemon, --repeat times, with the
    default grouping and with GROUPING = 'exact' (runs interleaved):
    memory (after start-up, and at its peak), loss, and the digest it
    makes of them.
    """
    count, rate = options.flood_count, options.flood_rate
    settings = ({} if options.max_unique is None
                else {"MAX_UNIQUE_MESSAGES": options.max_unique})
    print(f"== cardinality: {count:,} distinct errors from {options.hosts} "
          f"hosts at {rate:,.0f}/s into the daemon (MAX_UNIQUE_MESSAGES "
          f"{options.max_unique or 'default'}), then SIGTERM; "
          f"{options.repeat} run(s) per grouping")
    print(f"{'grouping':<9} {'sent':>10} {'lost':>7} {'sock drops':>10} "
          f"{'kern drops':>10} {'handled/s':>10} {'CPU us/msg':>10} "
          f"{'idle MB':>8} {'peak MB':>8} {'+digest MB':>10}")
    groupings = ("default", "exact")
    runs: dict = {grouping: [] for grouping in groupings}
    peaks: dict = {grouping: [] for grouping in groupings}
    for _ in range(options.repeat):
        for grouping in groupings:
            with tempfile.TemporaryDirectory() as directory:
                receiver = DaemonUnderTest(directory, options.rcvbuf,
                                           GROUPING=grouping, **settings)
                idle = peak_rss(receiver.pid)
                run = measure(receiver, datagram_maker(0, options.hosts),
                              rate, count / rate + 5, count,
                              options.senders)
                daemon = receiver.daemon
                digests = [read_digest(path) for path in daemon.digests()]
            runs[grouping].append(run)
            peaks[grouping].append(daemon.lifetime_peak_rss)
            print(f"{grouping:<9} {run.sent:>10,} {run.lost:>7,} "
                  f"{run.socket_drops:>10,} {run.kernel_drops:>10,} "
                  f"{run.handled_per_second:>10,.0f} "
                  f"{run.cpu_per_message:>10.1f} {idle / MB:>8.1f} "
                  f"{run.peak_rss / MB:>8.1f} "
                  f"{daemon.lifetime_peak_rss / MB:>10.1f}", flush=True)
    for grouping in groupings:
        receiving = statistics.median(run.peak_rss for run in runs[grouping])
        print(f"{grouping}: median peak RSS {receiving / MB:.1f} MB while "
              f"receiving, {statistics.median(peaks[grouping]) / MB:.1f} MB "
              f"with the final digest; median loss "
              f"{statistics.median(run.lost for run in runs[grouping]):,.0f}")
    for digest in digests:
        print(f"  digest (last run): {digest['bytes']:,} bytes, "
              f"{digest['total']:,} errors in its headline, "
              f"{digest['listed']:,} listed in full; summary: "
              f"{'; '.join(digest['summary lines']) or 'nothing more'}; "
              f"summary counts add up to the total: "
              f"{'yes' if digest['exact'] else 'NO'}")
    print()


def gelf_chunks(payload: bytes, size: int, message_id: bytes) -> list:
    """C{payload} as GELF chunks of C{size} bytes."""
    pieces = [payload[start:start + size]
              for start in range(0, len(payload), size)]
    return [b"\x1e\x0f" + message_id + bytes([number, len(pieces)]) + piece
            for number, piece in enumerate(pieces)]


def gelf_message(**fields) -> bytes:
    return orjson.dumps({"version": "1.1", "host": "gelf-host",
                         "short_message": "boom", **fields})


def hostile_loads() -> list:
    """
    C{(name, [(datagrams, sender address), ...], wait)}: each load of the
    issue's hostile inputs, in the order sent, and the seconds to wait
    before stopping the daemon (past GELF's 5 s chunk timeout where it
    matters).
    """
    import zlib

    mark = "1669fe88"  # not a monitoring marker: it is only an id here
    one, two = ("127.0.0.1", 0), ("127.0.0.2", 0)
    flood = [gelf_chunks(b"x" * 16000, 8000, b"F%07d" % number)[0]
             for number in range(3000)]
    chunked = [gelf_chunks(gelf_message(short_message=f"chunked {number}",
                                        full_message="t" * 3000), 1000,
                           b"B%07d" % number) for number in range(50)]
    resent = gelf_chunks(gelf_message(short_message="sent twice",
                                      full_message="r" * 5000), 1000,
                         b"RESENT!!")
    return [
        ("5 x {'msg': '%100000000d', 'args': [1]}",
         [([orjson.dumps({"msg": "%100000000d", "args": [number],
                          "source": "web1"}) for number in range(5)], one)],
         0),
        ("5 x '%(a)s' * 6000 with a 30,000-character a",
         [([orjson.dumps({"msg": "%(a)s" * 6000,
                          "args": {"a": f"{number}" * 30000},
                          "source": "web1"}) for number in range(5)], one)],
         0),
        ("1,000 x %c of 2**40, %d of a string, too few arguments",
         [([orjson.dumps({"msg": spec, "args": args, "source": "web1"})
            for number in range(334)
            for spec, args in (("%c", [2 ** 40 + number]),
                               ("%d items", [f"x{number}"]),
                               ("%s and %s", [number]))], one)], 0),
        ("200 x a 60,000-character traceback, message, kind, source",
         [([orjson.dumps({"message": f"{number} " + "m" * 15000,
                          "exc_text": "Traceback\n" + "t" * 15000 + "\n"
                          + "u" * 15000 + f"\nError {number}",
                          "kind": "k" * 5000, "source": "s" * 5000})
            for number in range(200)], one)], 0),
        ("200 x zlib GELF inflating to 1 MB each (distinct)",
         [([zlib.compress(gelf_message(
             short_message=f"bomb {number}",
             full_message=f"{number}:" + "x" * (1024 * 1024 - 300)))
            for number in range(200)], one)], 0),
        ("3,000 first chunks from 127.0.0.1, then 50 chunked messages from "
         "127.0.0.2",
         [(flood, one), ([data for message in chunked for data in message],
                         two)], 6),
        (f"a chunked message, then its chunks again ({mark})",
         [(resent, one), (resent, one)], 6),
    ]


def run_hostile(options) -> None:
    """
    The issue's hostile inputs against the real daemon, one daemon each:
    its memory before and after, what the digest shows, and what it
    logged.
    """
    print("== hostile input: each load into a fresh daemon (FLUSH_SECONDS "
          "3600), then SIGTERM")
    for number, (name, sends, wait) in enumerate(hostile_loads(), 1):
        if options.hostile and number not in options.hostile:
            continue
        with tempfile.TemporaryDirectory() as directory:
            receiver = DaemonUnderTest(directory, options.rcvbuf)
            daemon = receiver.daemon
            before, _ = rss(receiver.pid)
            for datagrams, address in sends:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.bind(address)
                    for data in datagrams:
                        sock.sendto(data, ("127.0.0.1", receiver.port))
                        # A millisecond's worth at a time, as send_paced.
                        time.sleep(0.0002)
            wait_drained(receiver.port)
            time.sleep(0.2 + wait)
            after, peak = rss(receiver.pid)
            drops = udp_socket_queue(receiver.port)[1]
            print(f"* {number}. {name}\n  RSS {before / MB:.1f} MB before, "
                  f"{after / MB:.1f} MB after, peak {peak / MB:.1f} MB; "
                  f"socket drops {drops}", flush=True)
            try:
                daemon.stop()
            except SystemExit as error:  # killed: say so, go on
                print(f"  {error}")
                continue
            with open(daemon.log.name) as stored:
                log = stored.read()
            texts = [email.message_from_binary_file(
                open(path, "rb"), policy=email.policy.default)
                for path in daemon.digests()]
        print(f"  {log.count('Traceback (most recent call last)')} "
              f"tracebacks and {log.count('Bad datagram')} bad-datagram "
              f"lines logged")
        for message in texts:
            body = message.get_content()
            summary = body.split("Summary:\n========\n", 1)[1].split(
                "\n\n", 1)[0].splitlines()
            longest = max(map(len, body.splitlines()))
            print(f"  digest: {len(message.as_bytes()):,} bytes, "
                  f"{message['Subject'][:90]!r}; longest line {longest:,} "
                  f"characters; {body.count('characters cut')} cut "
                  f"tracebacks")
            for line in summary[:4] + (["..."] if len(summary) > 4 else []):
                print(f"    {line[:110]}{'…' if len(line) > 110 else ''}")
    print()


def fill_service(unique: int, hosts: int, **more):
    """
    A FailnozzleService, not started, on a fake clock, writing into a
    temporary maildir and spool (snapshots off), the heap before it frozen
    as the daemon's is once started (L{freeze_heap}), whose buffer holds
    C{unique} errors each sent once from each of C{hosts} hosts, fed
    through its own receiver as datagrams; C{more} settings if given.

    @return: C{(service, temporary directory)}.
    """
    # Imported here: the reference receiver's process imports this module,
    # and must not carry Twisted and Jinja2 in its memory.
    from twisted.internet.task import Clock

    from failnozzle.collector import freeze_heap
    from failnozzle.config import load_settings
    from failnozzle.ingest import bind_udp_socket
    from failnozzle.service import FailnozzleService

    directory = tempfile.TemporaryDirectory()
    settings = load_settings(None, {
        "MAILDIR": os.path.join(directory.name, "mail"),
        "SPOOL_DIR": os.path.join(directory.name, "spool"),
        "SNAPSHOT_SECONDS": 0,
        "PAGER_LIMIT": 10 ** 9,
        "MAX_UNIQUE_MESSAGES": unique,  # room for them all
        **more,
    })[0]
    clock = Clock()
    clock.advance(time.time())
    sock, _ = bind_udp_socket("127.0.0.1", 0, 65536)
    sock.close()  # only start() would use it
    service = FailnozzleService(settings, clock, sock)
    freeze_heap()
    for path in (settings.MAILDIR, settings.SPOOL_DIR):
        os.makedirs(path)
    datagram = datagram_maker(unique, hosts)
    for n in range(unique * hosts):
        service.receiver.datagramReceived(datagram(n), ("127.0.0.1", 9))
        clock.advance(0.0001)
    return service, directory


#: The parts of FailnozzleService.flush whose share of it is printed, by
#: the name of the function that does each, in the order they run.
FLUSH_PARTS = {
    "aggregator.flush()": ("aggregate.py", "flush"),
    "UNIQUE_MSG_TUPLE checked (first only)": ("service.py", "_check_fields"),
    "monitoring or not": ("aggregate.py", "partition"),
    "silences": ("service.py", "_silence"),
    "routes": ("service.py", "_routed"),
    "pagers": ("service.py", "_page"),
    "new, back or ongoing": ("service.py", "_telling"),
    "the digest made (Jinja2, email)": ("service.py", "_with_bytes"),
    "spool and maildir": ("outbox.py", "send"),
    "the seen-memory": ("service.py", "_remember_reported"),
}


def time_flush_phases(unique: int, hosts: int) -> dict:
    """
    Seconds the daemon's own flush (L{FailnozzleService.flush}, its digest
    made at once) of C{unique} errors takes, without and with 20 ROUTES,
    and with 10 SILENCES too, and the share of each of its parts (L{FLUSH_PARTS}),
    measured with cProfile on a run of its own and applied to the
    unprofiled time.
    """
    import cProfile
    import pstats

    service, directory = fill_service(unique, hosts)
    with directory:
        whole_started = time.perf_counter()
        service.flush()
        whole = time.perf_counter() - whole_started
        maildir = os.path.join(directory.name, "mail", "new")
        size = sum(os.path.getsize(os.path.join(maildir, name))
                   for name in os.listdir(maildir))
    service, directory = fill_service(unique, hosts)
    with directory:
        profile = cProfile.Profile()
        profile.runcall(service.flush)
    cumulative: dict = {}
    for (path, _, function), row in pstats.Stats(profile).stats.items():
        place = (os.path.basename(path), function)
        cumulative[place] = cumulative.get(place, 0) + row[3]
    profiled = cumulative[("service.py", "flush")]
    routed = {}
    for name, settings in (("20 ROUTES", {"ROUTES": ROUTED["ROUTES"]}),
                           ("20 ROUTES + 10 SILENCES", ROUTED)):
        service, directory = fill_service(unique, hosts, **settings)
        with directory:
            routed_started = time.perf_counter()
            service.flush()
            routed[f"the same, {name}"] = (time.perf_counter()
                                           - routed_started)
    return {
        **{name: whole * cumulative.get(place, 0) / profiled
           for name, place in FLUSH_PARTS.items()},
        "FailnozzleService.flush(), whole": whole,
        **routed,
        "digest bytes": size,
    }


def digest_steps(unique: int, hosts: int) -> list:
    """
    Seconds each step of making the digest of C{unique} errors from
    C{hosts} hosts takes, the reactor taking its turns between them (see
    failnozzle.steps), in process.
    """
    service, directory = fill_service(unique, hosts)
    with directory:
        told = service._telling("digest", service.aggregator.flush())
        making = service._digest_steps(told, service._routes["digest"], None)
        steps = []
        while True:
            started = time.perf_counter()
            try:
                next(making)
            except StopIteration:
                steps.append(time.perf_counter() - started)
                return steps
            steps.append(time.perf_counter() - started)


def print_digest_steps(unique: int, hosts: int, repeat: int) -> None:
    runs = [digest_steps(unique, hosts) for _ in range(max(repeat, 3))]
    print(f"making the digest of {unique:,} errors x {hosts} hosts on the "
          f"reactor, in process, median of {len(runs)}: "
          f"{statistics.median(map(len, runs)):.0f} steps, "
          f"{statistics.median(map(sum, runs)) * 1000:.1f} ms in all, the "
          f"longest {statistics.median(map(max, runs)) * 1000:.1f} ms")


def run_flush(options) -> None:
    """How long a flush of --flush-unique errors blocks the reactor, and
    whether the daemon loses datagrams while it flushes."""
    unique, rate = options.flush_unique, options.flush_rate
    print(f"== flush of {unique:,} unique errors (x 2 hosts): reactor time, "
          f"in process, median of {options.repeat}")
    timings = [time_flush_phases(unique, 2) for _ in range(options.repeat)]
    for name in timings[0]:
        value = statistics.median(timing[name] for timing in timings)
        if name == "digest bytes":
            print(f"  {name:<36} {value:>12,.0f}")
        else:
            print(f"  {name:<36} {value * 1000:>9,.0f} ms")
    print_digest_steps(unique, 2, options.repeat)
    seconds = options.flush_load_seconds
    print(f"\n== flush under load: the daemon, {unique:,} unique errors from "
          f"{options.hosts} hosts at {rate:,.0f}/s for {seconds:g} s, "
          f"median of {options.repeat}")
    print(f"{'FLUSH_SECONDS':>24} {'sent':>9} {'lost':>7} {'sock drops':>10} "
          f"{'kern drops':>10} {'digests':>8} {'CPU us/msg':>10}")
    datagram = datagram_maker(unique, options.hosts)
    for flush_seconds in (3600, options.flush_seconds):
        runs, digests = [], []
        for _ in range(options.repeat):
            with tempfile.TemporaryDirectory() as directory:
                receiver = DaemonUnderTest(
                    directory, options.rcvbuf, FLUSH_SECONDS=flush_seconds,
                    MAX_UNIQUE_MESSAGES=unique)
                runs.append(measure(receiver, datagram, rate, seconds,
                                    int(rate * seconds), options.senders))
                digests.append(len(receiver.daemon.digests()))
        point = Point(runs)
        label = (f"{flush_seconds:g} (none under load)"
                 if flush_seconds > seconds else f"{flush_seconds:g}")
        print(f"{label:>24} {point.sent:>9,.0f} {point.lost:>7,.0f} "
              f"{point.socket_drops:>10,.0f} {point.kernel_drops:>10,.0f} "
              f"{statistics.median(digests):>8,.0f} "
              f"{point.cpu_per_message:>10.1f}")
    print()


def parse_options(argv: list) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--scenario", default="all",
                        choices=("all", "ladder", "sustained",
                                 "cardinality", "flush", "hostile",
                                 "grouping", "routes"))
    parser.add_argument("--routes-rate", type=float, default=30000)
    parser.add_argument("--quick", action="store_true",
                        help="a short smoke run: fewer rates, one run each, "
                             "a smaller flood")
    parser.add_argument("--rates", type=lambda text: [
        int(rate) for rate in text.split(",")],
        help="offered rates, datagrams per second, comma-separated")
    parser.add_argument("--seconds", type=float,
                        help="seconds of load per ladder point (default 2)")
    parser.add_argument("--repeat", type=int,
                        help="runs per point (default 3)")
    parser.add_argument("--unique", type=int, default=50)
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--senders", type=int, default=1, choices=(1, 2))
    parser.add_argument("--rcvbuf", type=int, default=4 * MB,
                        help="UDP_RCVBUF, and the reference's SO_RCVBUF")
    parser.add_argument("--flood-count", type=int,
                        help="distinct errors in the cardinality flood "
                             "(default 1,000,000)")
    parser.add_argument("--flood-rate", type=float, default=20000,
                        help="its rate, datagrams per second")
    parser.add_argument("--max-unique", type=int,
                        help="the daemon's MAX_UNIQUE_MESSAGES in the "
                        "cardinality flood (default: its default)")
    parser.add_argument("--sustained-rates", type=lambda text: [
        int(rate) for rate in text.split(",")],
        help="rates the sustained scenario tries the reference at")
    parser.add_argument("--sustained-seconds", type=float, default=10,
                        help="seconds of each sustained run")
    parser.add_argument("--sustained-tries", type=int, default=2,
                        help="runs of the reference per rate until one "
                             "loses nothing, and runs of the daemon")
    parser.add_argument("--hostile", type=lambda text: [
        int(number) for number in text.split(",")],
        help="which hostile loads to send, by number (default all)")
    parser.add_argument("--variants", type=int, default=1000,
                        help="distinct reports per bug in the grouping "
                             "scenario")
    parser.add_argument("--grouping-rate", type=int, default=30000)
    parser.add_argument("--grouping-seconds", type=float,
                        help="seconds of load per grouping run (default "
                             "10)")
    parser.add_argument("--flush-unique", type=int, default=10000)
    parser.add_argument("--flush-seconds", type=float, default=2,
                        help="FLUSH_SECONDS in the flush-under-load runs")
    parser.add_argument("--flush-load-seconds", type=float,
                        help="seconds of load in those runs (default 7)")
    parser.add_argument("--flush-rate", type=float, default=10000,
                        help="their rate: at least --flush-unique per "
                             "flush, so each flush holds them all")
    options = parser.parse_args(argv)
    quick = options.quick
    defaults = {
        "rates": [10000, 40000] if quick else [
            10000, 20000, 30000, 40000, 50000, 60000, 70000, 80000, 100000,
            130000],
        "seconds": 1 if quick else 2,
        "repeat": 1 if quick else 3,
        "flood_count": 100000 if quick else 1000000,
        "flush_load_seconds": 5 if quick else 7,
        "grouping_seconds": 3 if quick else 10,
        "sustained_rates": [20000, 40000] if quick else [
            20000, 30000, 40000, 50000, 60000, 70000, 80000, 90000, 100000],
    }
    for name, value in defaults.items():
        if getattr(options, name) is None:
            setattr(options, name, value)
    return options


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it."""
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "CPU model unknown"


def main(argv: list) -> None:
    options = parse_options(argv)
    began = time.monotonic()
    print(f"failnozzle ingest benchmark, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{len(os.sched_getaffinity(0))} CPUs ({cpu_model()}), Python "
          f"{sys.version.split()[0]}, load average "
          f"{os.getloadavg()[0]:.2f} (other programs share the CPUs)\n")
    if options.scenario in ("all", "ladder"):
        run_ladder(options, realistic_datagrams(options.unique,
                                                options.hosts))
    if options.scenario in ("all", "sustained"):
        run_sustained(options, realistic_datagrams(options.unique,
                                                   options.hosts))
    if options.scenario in ("all", "hostile"):
        run_hostile(options)
    if options.scenario in ("all", "cardinality"):
        run_cardinality(options)
    if options.scenario in ("all", "flush"):
        run_flush(options)
    if options.scenario in ("all", "grouping"):
        run_grouping(options)
    if options.scenario in ("all", "routes"):
        run_routes(options)
    print(f"done in {time.monotonic() - began:.0f} s, load average "
          f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
