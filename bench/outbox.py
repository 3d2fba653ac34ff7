#!/usr/bin/env python3
"""
The outbox from the outside: what a server that never confirms gets, what
odd spool entries do to start-up, the modes of what failnozzle writes under
umask 000, and how long a flush holds the reactor with the spool on disk.

    python bench/outbox.py duplicates [--seconds 40]
    python bench/outbox.py recovery [--fuzzed 1000]
    python bench/outbox.py modes
    python bench/outbox.py flush [--unique 200] [--flushes 20]

The first three run the real daemon (twistd -n failnozzle); "flush" runs
FailnozzleService in this process, with the disk writer thread when the
failnozzle imported has one (failnozzle.writer), and prints the time each
flush() call and the longest stall of the reactor thread.  Run one with
PYTHONPATH pointing at another checkout to compare.

Everything talks to 127.0.0.1 only; every run is bounded in time.
"""
from __future__ import annotations

import argparse
import os
import random
import socket
import socketserver
import shutil
import stat
import statistics
import subprocess
import tempfile
import threading
import time

from common import Daemon, datagram_maker, send_paced


class _KeepAndStaySilent(socketserver.StreamRequestHandler):
    """Takes every command and message, and never answers a message's end."""

    def handle(self) -> None:
        try:
            self.converse()
        except ConnectionError:
            pass  # the client gave up waiting, as it should

    def converse(self) -> None:
        self.wfile.write(b"220 127.0.0.1 ESMTP\r\n")
        content = None
        for line in self.rfile:
            if content is None:
                if line.upper().startswith(b"DATA"):
                    content = []
                    self.wfile.write(b"354 go ahead\r\n")
                else:
                    self.wfile.write(b"250 OK\r\n")
            elif line == b".\r\n":
                self.server.messages.append(b"".join(content))
                content = None
            else:
                content.append(line)


class SilentAfterData(socketserver.ThreadingTCPServer):
    """An SMTP server on 127.0.0.1 whose 250 to each message is lost."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _KeepAndStaySilent)
        self.messages: list = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def subjects(self) -> list:
        return [line.split(b":", 1)[1].strip().decode()
                for message in self.messages for line in message.splitlines()
                if line.startswith(b"Subject:")]


def run_duplicates(options) -> None:
    """One error, a flush, then two more: what the server gets."""
    server = SilentAfterData()
    port = server.server_address[1]
    print(f"== a server that keeps each digest but never answers its end "
          f"(SMTP_TIMEOUT 2 s, retries 1 s to 4 s, flush every 2 s), "
          f"{options.seconds:g} s")
    with tempfile.TemporaryDirectory() as directory:
        daemon = Daemon(directory, SMTP_HOST="127.0.0.1", SMTP_PORT=port,
                        SMTP_TLS="off", REPORT_FROM="nozzle@example.com",
                        REPORT_TO=["ops@example.com"], FLUSH_SECONDS=2,
                        SMTP_TIMEOUT=2, RETRY_MIN_SECONDS=1,
                        RETRY_MAX_SECONDS=4)
        datagram = datagram_maker(3, 1)
        send_paced(daemon.port, datagram, 100, 0.01, 1)
        time.sleep(5)
        send_paced(daemon.port, datagram, 100, 0.02, 2, first=1)
        time.sleep(max(0, options.seconds - 5))
        daemon.stop()
        with open(daemon.log.name) as text:
            log = text.read()
    subjects = server.subjects()
    server.shutdown()
    print(f"emails received: {len(subjects)}")
    for subject in sorted(set(subjects)):
        print(f"  {subjects.count(subject)} x {subject!r}")
    print(f"'probably delivered' lines in the log: "
          f"{log.count('is probably delivered')}")


def _odd_entries(new: str, fuzzed: int) -> int:
    """Put odd entries and C{fuzzed} mangled messages in C{new}."""
    good = (b"From: nozzle@example.com\nTo: ops@example.com\n"
            b"Subject: left behind\nX-Failnozzle: digest\n\nbody\n")
    os.mkfifo(os.path.join(new, "fifo"))
    os.mkdir(os.path.join(new, "directory"))
    os.symlink("/etc/passwd", os.path.join(new, "link"))
    with tempfile.TemporaryDirectory() as short:
        with socket.socket(socket.AF_UNIX) as listening:
            listening.bind(os.path.join(short, "s"))
            os.rename(os.path.join(short, "s"), os.path.join(new, "socket"))
    odd = {"empty": b"", "garbage": os.urandom(5000),
           "no-to": good.replace(b"To:", b"X-To:"),
           "odd-from": good.replace(b"From: nozzle@example.com",
                                    b"From: =?utf-8?q?a=0D=0AB?= <x@y>"),
           "good": good}
    chance = random.Random(9)
    for number in range(fuzzed):
        data = bytearray(good)
        for _ in range(chance.randint(1, 10)):
            where = chance.randrange(len(data))
            data[where:where] = chance.choice(
                [b"\n", b":", b"<", b">", b"\xff", b"=?utf-8?q?", b" ",
                 b"\0", b",", b"@"])
        odd[f"fuzzed-{number}"] = bytes(data)
    for name, content in odd.items():
        with open(os.path.join(new, name), "wb") as out:
            out.write(content)
    return 4 + len(odd)


def _delivered(daemon: Daemon, subject: bytes) -> bool:
    """Whether a message with C{subject} is in the daemon's maildir."""
    for path in daemon.digests():
        with open(path, "rb") as stored:
            if b"Subject: " + subject in stored.read():
                return True
    return False


def run_recovery(options) -> None:
    """Start the daemon on a spool full of odd entries."""
    with tempfile.TemporaryDirectory() as directory:
        new = os.path.join(directory, "failnozzle-spool", "new")
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(directory, "failnozzle-spool", sub))
        entries = _odd_entries(new, options.fuzzed)
        print(f"== start-up on a spool of {entries} entries: a FIFO, a "
              f"directory, a socket, a symlink, garbage, odd headers, "
              f"{options.fuzzed} fuzzed messages, one good message")
        started = time.monotonic()
        daemon = Daemon(directory)
        print(f"listening after {time.monotonic() - started:.2f} s")
        while (not _delivered(daemon, b"left behind")
               and daemon.process.poll() is None
               and time.monotonic() < started + 20):
            time.sleep(0.05)
        if _delivered(daemon, b"left behind"):
            print(f"the good message delivered "
                  f"{time.monotonic() - started:.2f} s after the start")
        else:
            print("the good message not delivered")
        if daemon.process.poll() is not None:
            print(f"the daemon exited by itself, status "
                  f"{daemon.process.returncode}")
        daemon.process.terminate()
        try:
            daemon.process.wait(10)
        except subprocess.TimeoutExpired:
            print("the daemon did not stop within 10 s of SIGTERM: killed")
            daemon.process.kill()
            daemon.process.wait()
        with open(daemon.log.name) as log:
            text = log.read()
        bad = os.path.join(directory, "failnozzle-spool", "bad")
        aside = len(os.listdir(bad)) if os.path.isdir(bad) else 0
        delivered = len(daemon.digests())
        print(f"set aside in bad/: {aside}, one line each: "
              f"{text.count('Spool entry')}; delivered to the maildir: "
              f"{delivered}; still in new/: {len(os.listdir(new))}")


def run_modes(options) -> None:
    """Modes of what the daemon writes with umask 000."""
    previous = os.umask(0)
    try:
        with tempfile.TemporaryDirectory() as directory:
            daemon = Daemon(directory, FLUSH_SECONDS=1)
            send_paced(daemon.port, datagram_maker(1, 1), 100, 0.01, 1)
            time.sleep(2.5)
            daemon.stop()
            print("== modes of what the daemon wrote, umask 000")
            for root, directories, files in os.walk(directory):
                for name in sorted(directories + files):
                    path = os.path.join(root, name)
                    if name in ("site.py", "twistd.log") or "__" in path:
                        continue
                    mode = stat.S_IMODE(os.lstat(path).st_mode)
                    print(f"  {mode:04o} {os.path.relpath(path, directory)}")
    finally:
        os.umask(previous)


def run_flush(options) -> None:
    """How long each flush, with its spooling, holds the reactor thread."""
    from twisted.internet import reactor, task

    from failnozzle.config import load_settings
    from failnozzle.ingest import bind_udp_socket
    from failnozzle.service import FailnozzleService
    try:
        from failnozzle.writer import DiskWriter
    except ImportError:
        writer = {}
        where = "in the reactor thread (no failnozzle.writer)"
    else:
        writer = {"writer": DiskWriter(reactor)}
        where = "in the disk writer thread"
    directory = tempfile.mkdtemp(dir=os.getcwd())
    settings = load_settings(None, {
        "MAILDIR": os.path.join(directory, "mail"),
        "SPOOL_DIR": os.path.join(directory, "spool"),
        "STATE_FILE": os.path.join(directory, "state.json"),
        "SNAPSHOT_SECONDS": 0, "PAGER_LIMIT": 10 ** 9,
        "FLUSH_SECONDS": 3600, "UDP_BIND": ("127.0.0.1", 0)})[0]
    sock, _ = bind_udp_socket("127.0.0.1", 0, 65536)
    service = FailnozzleService(settings, reactor, sock, **writer)
    datagram = datagram_maker(options.unique, 1)
    durations, sends, stalls = [], [], []
    send = service.outbox.send

    def timed_send(message):
        started = time.perf_counter()
        try:
            return send(message)
        finally:
            sends.append(time.perf_counter() - started)

    service.outbox.send = timed_send
    beat = {"last": None, "worst": 0.0}

    def heartbeat() -> None:
        now = time.perf_counter()
        if beat["last"] is not None:
            beat["worst"] = max(beat["worst"], now - beat["last"])
        beat["last"] = now

    def one_flush(number: int) -> None:
        if number:
            stalls.append(beat["worst"])
        if number == options.flushes:
            loop.stop()
            reactor.callLater(0.5, finish)
            return
        for n in range(options.unique):
            service.receiver.datagramReceived(
                datagram(number * options.unique + n), ("127.0.0.1", 9))
        beat["last"], beat["worst"] = None, 0.0
        started = time.perf_counter()
        service.flush()
        durations.append(time.perf_counter() - started)

    def finish() -> None:
        service.stopService().addBoth(lambda _: reactor.stop())

    counter = iter(range(options.flushes + 1))
    loop = task.LoopingCall(lambda: one_flush(next(counter)))
    beating = task.LoopingCall(heartbeat)
    service.startService()
    reactor.callWhenRunning(beating.start, 0.001)
    reactor.callWhenRunning(loop.start, 0.5)
    reactor.run()
    mail = os.path.join(directory, "mail", "new")
    delivered = len(os.listdir(mail))
    shutil.rmtree(directory)
    print(f"== {options.flushes} flushes of {options.unique} new errors "
          f"each, spool and maildir on {os.getcwd()}, writes {where}")
    print(f"digests delivered: {delivered}")
    for what, seconds in [("flush() on the reactor thread", durations),
                          ("  of which outbox.send()", sends),
                          ("longest reactor stall between flushes (1 ms "
                           "heartbeat)", stalls)]:
        print(f"{what}: median {statistics.median(seconds) * 1000:.1f} ms, "
              f"90th percentile "
              f"{statistics.quantiles(seconds, n=10)[-1] * 1000:.1f} ms, "
              f"max {max(seconds) * 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    scenarios = parser.add_subparsers(dest="scenario", required=True)
    duplicates = scenarios.add_parser("duplicates")
    duplicates.add_argument("--seconds", type=float, default=40)
    recovery = scenarios.add_parser("recovery")
    recovery.add_argument("--fuzzed", type=int, default=1000)
    scenarios.add_parser("modes")
    flush = scenarios.add_parser("flush")
    flush.add_argument("--unique", type=int, default=200)
    flush.add_argument("--flushes", type=int, default=20)
    options = parser.parse_args()
    {"duplicates": run_duplicates, "recovery": run_recovery,
     "modes": run_modes, "flush": run_flush}[options.scenario](options)


if __name__ == "__main__":
    main()
