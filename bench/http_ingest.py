#!/usr/bin/env python3
"""
What the HTTP face costs, in one run on 127.0.0.1.

    python bench/http_ingest.py            # both, a couple of minutes
    python bench/http_ingest.py --quick    # a smoke test

sentry   Sentry envelopes (one event with a 20-frame exception, gzip, as
         sentry-sdk sends them) posted over --connections keep-alive
         connections for --seconds, as fast as they are answered, to: the
         real daemon (twistd -n failnozzle, SENTRY_KEYS set), and a
         reference: a bare twisted.web resource in a process of its own that
         reads the same bodies, inflates them, splits the envelope and
         JSON-decodes every line, then answers {"id": ...}.  Per receiver:
         events answered per second and CPU microseconds per event; the
         daemon's rate as a share of the reference's.
metrics  The daemon on UDP at --udp-rate for --udp-seconds, 50 unique
         errors from 20 hosts, three ways interleaved --repeat times: with
         HTTP off, with HTTP on and idle, and with /metrics scraped every
         second: CPU microseconds per datagram and loss for each.
"""
from __future__ import annotations

import argparse
import gzip
import http.client
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Daemon, cpu_seconds, datagram_maker  # noqa: E402
from ingest import DaemonUnderTest, measure  # noqa: E402

KEY = "0123456789abcdef"

#: The reference receiver: what any HTTP receiver of these bodies must do.
REFERENCE = r'''
import gzip, sys, orjson
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

class Envelope(Resource):
    isLeaf = True
    def render_POST(self, request):
        body = gzip.decompress(request.content.read())
        lines = body.split(b"\n")
        header = orjson.loads(lines[0])
        for line in lines[1:]:
            if line.strip():
                orjson.loads(line)
        request.setHeader(b"content-type", b"application/json")
        return orjson.dumps({"id": header.get("event_id")})

site = Site(Envelope())
port = reactor.listenTCP(0, site, interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
'''


def envelope_body(number: int) -> bytes:
    """An envelope of one error event, as sentry-sdk makes it, gzipped."""
    frames = [{"filename": f"app/module{n}.py",
               "abs_path": f"/srv/app/module{n}.py",
               "function": f"handler_{n}", "module": f"app.module{n}",
               "lineno": 10 + n, "context_line": f"    result = step_{n}()",
               "in_app": True} for n in range(20)]
    event = {"event_id": f"{number:032x}", "level": "error",
             "platform": "python", "server_name": f"web{number % 20}",
             "exception": {"values": [{
                 "type": "KeyError", "value": f"'user_{number % 1000}'",
                 "module": None, "stacktrace": {"frames": frames}}]}}
    payload = json.dumps(event).encode()
    lines = [json.dumps({"event_id": event["event_id"],
                         "sent_at": "2026-12-02T00:00:00Z"}).encode(),
             json.dumps({"type": "event",
                         "length": len(payload)}).encode(), payload]
    return gzip.compress(b"\n".join(lines) + b"\n")


def _poster(port: int, path: str, seconds: float, bodies: list,
            results) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/x-sentry-envelope",
               "Content-Encoding": "gzip",
               "X-Sentry-Auth": f"Sentry sentry_key={KEY}, "
                                f"sentry_version=7"}
    answered = refused = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        connection.request("POST", path, bodies[answered % len(bodies)],
                           headers)
        response = connection.getresponse()
        response.read()
        if response.status == 200:
            answered += 1
        else:
            refused += 1
    results.put((answered, refused))


def post_for(port: int, path: str, seconds: float, connections: int,
             bodies: list) -> tuple:
    """Post from C{connections} processes; (answered, refused)."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    posters = [context.Process(target=_poster, args=(
        port, path, seconds, bodies, results)) for _ in range(connections)]
    for poster in posters:
        poster.start()
    totals = [results.get(timeout=seconds + 60) for _ in posters]
    for poster in posters:
        poster.join()
    return (sum(answered for answered, _ in totals),
            sum(refused for _, refused in totals))


def measure_http(pid: int, port: int, path: str, options,
                 bodies: list) -> tuple:
    before = cpu_seconds(pid)
    started = time.monotonic()
    answered, refused = post_for(port, path, options.seconds,
                                 options.connections, bodies)
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(pid) - before
    return answered / elapsed, cpu / max(answered, 1) * 1e6, refused


def run_sentry(options) -> None:
    bodies = [envelope_body(n) for n in range(1000)]
    print(f"== Sentry envelopes (one event, gzip, {len(bodies[0]):,} bytes) "
          f"over {options.connections} keep-alive connections for "
          f"{options.seconds:g} s, median of {options.repeat}")
    print(f"{'receiver':<32} {'events/s':>10} {'CPU us/event':>13} "
          f"{'refused':>8}")
    rows: dict = {"daemon": [], "reference (bare twisted.web)": []}
    for _ in range(options.repeat):
        with tempfile.TemporaryDirectory() as directory:
            daemon = Daemon(directory, HTTP_BIND=("127.0.0.1", 0),
                            SENTRY_KEYS={KEY: "shop"},
                            SENTRY_EVENTS_PER_SECOND=1_000_000,
                            FLUSH_SECONDS=3600)
            try:
                http_port = daemon.http_port()
                rows["daemon"].append(measure_http(
                    daemon.pid, http_port, "/api/1/envelope/", options,
                    bodies))
            finally:
                daemon.stop()
        reference = subprocess.Popen([sys.executable, "-c", REFERENCE],
                                     stdout=subprocess.PIPE)
        try:
            port = int(reference.stdout.readline())
            rows["reference (bare twisted.web)"].append(measure_http(
                reference.pid, port, "/", options, bodies))
        finally:
            reference.kill()
            reference.wait()
    medians = {}
    for name, runs in rows.items():
        rate = statistics.median(run[0] for run in runs)
        cpu = statistics.median(run[1] for run in runs)
        refused = statistics.median(run[2] for run in runs)
        medians[name] = rate
        print(f"{name:<32} {rate:>10,.0f} {cpu:>13.1f} {refused:>8,.0f}")
    print(f"daemon / reference: "
          f"{medians['daemon'] / medians['reference (bare twisted.web)']:.2f}"
          f" of the events per second (target: at least 0.7)\n")


def _scrape(port: int, stop: threading.Event, scrapes: list) -> None:
    while not stop.wait(1.0):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                    timeout=10) as reply:
            reply.read()
        scrapes.append(time.monotonic())


def run_metrics(options) -> None:
    rate, seconds = options.udp_rate, options.udp_seconds
    print(f"== UDP at {rate:,.0f}/s for {seconds:g} s (50 errors x 20 "
          f"hosts) with HTTP off, idle, and /metrics scraped every second; "
          f"median of {options.repeat}")
    print(f"{'HTTP':<28} {'sent':>9} {'lost':>7} {'CPU us/msg':>11} "
          f"{'scrapes':>8}")
    datagram = datagram_maker(50, 20)
    ways = ("off", "on, idle", "on, /metrics every second")
    runs: dict = {way: [] for way in ways}
    for _ in range(options.repeat):
        for way in ways:
            with tempfile.TemporaryDirectory() as directory:
                receiver = DaemonUnderTest(
                    directory, 4 * 1024 * 1024,
                    HTTP_BIND=None if way == "off" else ("127.0.0.1", 0))
                stop, scrapes = threading.Event(), []
                scraper = None
                if way.endswith("second"):
                    scraper = threading.Thread(target=_scrape, args=(
                        receiver.daemon.http_port(), stop, scrapes))
                    scraper.start()
                try:
                    run = measure(receiver, datagram, rate, seconds,
                                  int(rate * seconds), 1)
                finally:
                    stop.set()
                    if scraper is not None:
                        scraper.join()
                runs[way].append((run, len(scrapes)))
    for way in ways:
        points = [run for run, _ in runs[way]]
        scrapes = statistics.median(count for _, count in runs[way])
        cpu = statistics.median(run.cpu_per_message for run in points)
        print(f"{way:<28} "
              f"{statistics.median(run.sent for run in points):>9,.0f} "
              f"{statistics.median(run.lost for run in points):>7,.0f} "
              f"{cpu:>11.2f} {scrapes:>8,.0f}")
    print()


def main(argv: list) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--scenario", default="all",
                        choices=("all", "sentry", "metrics"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--udp-rate", type=float, default=30000)
    parser.add_argument("--udp-seconds", type=float, default=10)
    options = parser.parse_args(argv)
    if options.quick:
        options.repeat, options.seconds, options.udp_seconds = 1, 3, 3
    print(f"failnozzle HTTP benchmark, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, load "
          f"average {os.getloadavg()[0]:.2f}\n")
    if options.scenario in ("all", "sentry"):
        run_sentry(options)
    if options.scenario in ("all", "metrics"):
        run_metrics(options)


if __name__ == "__main__":
    main(sys.argv[1:])
