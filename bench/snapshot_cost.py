#!/usr/bin/env python3
"""
What snapshotting costs: the real daemon (twistd -n failnozzle) receiving
the same paced load on 127.0.0.1 with SNAPSHOT_SECONDS = 1 and with
snapshots off, one after the other in the same run.

For each run it prints the datagrams sent, those the daemon counted (from
its last digest, sent on SIGTERM into a maildir), the loss, and the daemon's
CPU time per datagram.

    python bench/snapshot_cost.py [--rate 20000] [--seconds 3] [--unique 50]

Bounded: each run sends for --seconds at most, to 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import tempfile
import time

from common import (Daemon, cpu_seconds, cycling, realistic_datagrams,
                    send_paced)


def run(snapshot_seconds: float, datagrams: list, rate: int,
        seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        daemon = Daemon(directory, FLUSH_SECONDS=3600,
                        SNAPSHOT_SECONDS=snapshot_seconds,
                        PAGER_LIMIT=10 ** 9)
        cpu_before = cpu_seconds(daemon.pid)
        sent = send_paced(daemon.port, cycling(datagrams), rate, seconds,
                          int(rate * seconds))
        time.sleep(0.5)  # let the receive buffer drain before measuring CPU
        cpu = cpu_seconds(daemon.pid) - cpu_before
        daemon.stop()
        return {"sent": sent, "received": daemon.counted(), "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=20000)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--unique", type=int, default=50)
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    datagrams = realistic_datagrams(options.unique, options.hosts)
    size = sum(map(len, datagrams)) / len(datagrams)
    print(f"{len(datagrams)} distinct datagrams of {size:.0f} bytes on "
          f"average, {options.unique} unique errors from {options.hosts} "
          f"hosts, {options.rate}/s for {options.seconds:g} s, "
          f"{options.repeat} runs each")
    print(f"{'snapshots':>12} {'sent':>9} {'counted':>9} {'lost':>7} "
          f"{'CPU us/msg':>11}")
    for snapshot_seconds in (0, 1) * options.repeat:
        result = run(snapshot_seconds, datagrams, options.rate,
                     options.seconds)
        lost = result["sent"] - result["received"]
        label = "every 1 s" if snapshot_seconds else "off"
        print(f"{label:>12} {result['sent']:>9} {result['received']:>9} "
              f"{lost:>7} {result['cpu'] / result['sent'] * 1e6:>11.1f}")


if __name__ == "__main__":
    main()
