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
import email
import email.policy
import glob
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

from failnozzle.loghandler import AggregatorHandler

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def realistic_datagrams(unique: int, hosts: int) -> list:
    """What AggregatorHandler sends for logger.exception(...), ~2.3 kB each."""
    handler = AggregatorHandler("127.0.0.1", 9, "host", "app")
    datagrams = []
    for number in range(unique):
        try:
            raise ValueError("x" * 1400 + f" failure number {number}")
        except ValueError:
            record = logging.LogRecord(
                "app.views", logging.ERROR, "/srv/app/views.py", 100 + number,
                "Request failed for user %s", (number,), sys.exc_info())
        for host in range(hosts):
            handler.source = f"web{host:02d}"
            datagrams.append(handler.makePickle(record))
    return datagrams


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_daemon(directory: str, snapshot_seconds: float) -> tuple:
    config = os.path.join(directory, "site.py")
    with open(config, "w") as out:
        out.write(f"UDP_BIND = ('127.0.0.1', 0)\n"
                  f"FLUSH_SECONDS = 3600\n"
                  f"SNAPSHOT_SECONDS = {snapshot_seconds}\n"
                  f"PAGER_LIMIT = 10 ** 9\n")
    log = open(os.path.join(directory, "twistd.log"), "w+")
    process = subprocess.Popen(
        TWISTD + ["-n", "--pidfile=", "failnozzle", f"--config={config}"],
        cwd=directory, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        log.seek(0)
        match = re.search(r"listening for errors on UDP 127\.0\.0\.1:(\d+)",
                          log.read())
        if match:
            return process, int(match.group(1)), log
        time.sleep(0.05)
    process.kill()
    raise SystemExit("the daemon did not start; see " + log.name)


def send_paced(port: int, datagrams: list, rate: int, seconds: float) -> int:
    """Send at C{rate} per second, in small batches, for C{seconds}."""
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    batch = max(1, rate // 1000)
    sent = 0
    start = time.monotonic()
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= seconds:
            break
        due = int(elapsed * rate)
        while sent < due:
            for _ in range(batch):
                sender.sendto(datagrams[sent % len(datagrams)],
                              ("127.0.0.1", port))
                sent += 1
        time.sleep(0.001)
    return sent


def counted(directory: str) -> int:
    """The total of the digests the daemon wrote."""
    total = 0
    for path in glob.glob(os.path.join(directory, "failnozzle-mail", "new",
                                       "*")):
        with open(path, "rb") as stored:
            subject = email.message_from_binary_file(
                stored, policy=email.policy.default)["Subject"]
        total += int(re.search(r"errors: (\d+) total", subject).group(1))
    return total


def run(snapshot_seconds: float, datagrams: list, rate: int,
        seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        process, port, log = start_daemon(directory, snapshot_seconds)
        cpu_before = cpu_seconds(process.pid)
        sent = send_paced(port, datagrams, rate, seconds)
        time.sleep(0.5)  # let the receive buffer drain before measuring CPU
        cpu = cpu_seconds(process.pid) - cpu_before
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        log.close()
        return {"sent": sent, "received": counted(directory), "cpu": cpu}


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
