"""
What the benchmarks share: realistic datagrams, the real daemon started as
users start it, paced senders, and readings from /proc.

Everything talks to 127.0.0.1 only, and every wait is bounded.
"""
from __future__ import annotations

import email
import email.policy
import glob
import logging
import math
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

from failnozzle.loghandler import AggregatorHandler

#: Stand-ins in the template datagram for the bug (in the format of its
#: message, so bugs are apart however they are grouped), the number that
#: varies from one report of it to the next, and its host.
BUG_MARK = b"#BUG#"
NUMBER_MARK = b"#NUMBER#"
HOST_MARK = b"#HOST#"

#: How long the daemon may take to start, or to stop after SIGTERM.
DAEMON_WAIT_SECONDS = 60


def _descend(depth: int, number: str) -> None:
    """Raise from C{depth} frames down, as deep application code does."""
    if depth:
        _descend_further(depth - 1, number)
    raise LookupError(f"no account for user {number} in shard 7: the replica "
                      f"is behind by 3 transactions")


def _descend_further(depth: int, number: str) -> None:
    """L{_descend}'s other half: frames that differ are not folded."""
    _descend(depth, number)


def digest_total(body: str) -> int:
    """The errors a digest counts, from its body's first line ("** 5
    instances of ...", after a cluster node's notice if any): the subject
    may be shortened, the body's is not."""
    return int(re.search(r"^\*\* (\d+) instances? of", body,
                         re.MULTILINE).group(1))


def template_datagram(depth: int = 7) -> bytes:
    """
    What L{AggregatorHandler} sends for C{logger.exception(...)} in a
    request handler, its traceback C{2 * depth + 1} frames deep (~1.7 kB
    at the default; ~2.3 kB per datagram), with L{BUG_MARK} and
    L{NUMBER_MARK} where the error's identity and its varying number go
    (message and traceback) and L{HOST_MARK} for its source.
    """
    handler = AggregatorHandler("127.0.0.1", 9, HOST_MARK.decode(), "app")
    try:
        _descend(depth, NUMBER_MARK.decode())
    except LookupError:
        record = logging.LogRecord(
            "app.views", logging.ERROR, "/srv/app/views.py", 120,
            f"Request failed in {BUG_MARK.decode()} for user %s",
            (NUMBER_MARK.decode(),),
            sys.exc_info(), func="handle_request")
    handler.close()
    return handler.makePickle(record)


def bug_name(number: int) -> bytes:
    """A bug's name, of letters ("bc" for 12): grouping folds numbers."""
    return bytes(ord("a") + int(digit) for digit in str(number))


def datagram_maker(unique: int, hosts: int, variants: int = 1
                   ) -> Callable[[int], bytes]:
    """
    The C{n}-th datagram of a stream that goes round C{unique} errors, each
    round from the next of C{hosts} hosts, and each round of hosts with the
    next of C{variants} numbers in each error's text (reports of one bug
    that vary); with C{unique} 0, a flood where every datagram is a new
    error, the hosts taking turns.
    """
    template = template_datagram()
    by_host = [template.replace(HOST_MARK, b"web%02d" % host)
               for host in range(hosts)]

    def datagram(n: int) -> bytes:
        if unique:
            error, host = n % unique, n // unique % hosts
            variant = n // (unique * hosts) % variants
        else:
            error, host, variant = n, n % hosts, 0
        return by_host[host].replace(BUG_MARK, bug_name(error)).replace(
            NUMBER_MARK, b"%07d" % (error * variants + variant))

    return datagram


def realistic_datagrams(unique: int, hosts: int, variants: int = 1) -> list:
    """Every distinct datagram of L{datagram_maker}C{(unique, hosts,
    variants)}."""
    datagram = datagram_maker(unique, hosts, variants)
    return [datagram(n) for n in range(unique * hosts * variants)]


def cycling(datagrams: list) -> Callable[[int], bytes]:
    """The C{n}-th datagram of an endless round of C{datagrams}: cheaper
    for a sender than making each one."""
    size = len(datagrams)
    return lambda n: datagrams[n % size]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss(pid: int) -> tuple:
    """
    C{(VmRSS, VmHWM)} of a process, in bytes: its resident set size now
    and its peak so far.
    """
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value
    return tuple(int(fields[name].split()[0]) * 1024
                 for name in ("VmRSS", "VmHWM"))


def peak_rss(pid: int) -> int:
    """A process's peak resident set size so far (VmHWM), in bytes."""
    return rss(pid)[1]


def udp_socket_queue(port: int) -> tuple:
    """
    C{(queued_bytes, drops)} of the UDP socket bound to 127.0.0.1:C{port},
    from /proc/net/udp: what waits to be read, and what the kernel dropped
    because the receive buffer was full.
    """
    local = f"0100007F:{port:04X}"
    with open("/proc/net/udp") as table:
        for line in table:
            fields = line.split()
            if fields[1] == local:
                return int(fields[4].split(":")[1], 16), int(fields[-1])
    raise ValueError(f"no UDP socket on 127.0.0.1:{port}")


def wait_drained(port: int, limit: float = 10.0) -> float:
    """
    Wait (at most C{limit} s) until the receiver has read everything queued
    on its socket.

    @return: the monotonic time it was seen empty.
    """
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if udp_socket_queue(port)[0] == 0:
            return time.monotonic()
        time.sleep(0.01)
    return time.monotonic()


class DropTimeline:
    """
    The drop counter and queue of a UDP socket sampled every C{interval}
    seconds in a thread, beside the moments a file changed (the daemon's
    state file: a snapshot), so that each loss can be told apart: at a
    flush, at a snapshot, or in between.
    """

    def __init__(self, port: int, watched: str, interval: float = 0.01
                 ) -> None:
        self._port, self._watched, self._interval = port, watched, interval
        #: C{(time.time(), drops, queued bytes)}, in order.
        self.samples: list = []
        #: The times C{watched} was seen to change.
        self.changes: list = []
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        changed = None
        while self._running:
            now = time.time()
            queued, drops = udp_socket_queue(self._port)
            self.samples.append((now, drops, queued))
            try:
                mtime = os.stat(self._watched).st_mtime
            except OSError:
                mtime = None
            if mtime != changed and mtime is not None:
                self.changes.append(mtime)
            changed = mtime
            time.sleep(self._interval)

    def stop(self) -> None:
        self._running = False
        self._thread.join()

    @property
    def max_queued(self) -> int:
        return max((queued for _, _, queued in self.samples), default=0)

    def losses(self, flushes: list, window: float = 0.25) -> dict:
        """
        The datagrams dropped within C{window} seconds of a flush (the
        moments in C{flushes}), else of a change of the watched file (a
        snapshot), else elsewhere.
        """
        split = {"at a flush": 0, "at a snapshot": 0, "elsewhere": 0}
        for (before, dropped_before, _), (after, dropped, _) in zip(
                self.samples, self.samples[1:]):
            lost = dropped - dropped_before
            if not lost:
                continue

            def near(moments: list) -> bool:
                return any(before - window <= moment <= after + window
                           for moment in moments)

            place = ("at a flush" if near(flushes) else
                     "at a snapshot" if near(self.changes) else "elsewhere")
            split[place] += lost
        return split


def kernel_udp_drops() -> int:
    """
    UDP datagrams this network namespace's kernel dropped so far
    (/proc/net/snmp InErrors, which includes RcvbufErrors): other programs'
    drops count too, so use it only to cross-check.
    """
    with open("/proc/net/snmp") as snmp:
        rows = [line.split() for line in snmp if line.startswith("Udp:")]
    return int(dict(zip(rows[0], rows[1]))["InErrors"])


def twistd_command() -> list:
    """The twistd next to this interpreter, as a user would run it."""
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(twistd):
        return [twistd]
    return [sys.executable, "-c",
            "from twisted.scripts.twistd import run; run()"]


class Daemon:
    """
    The real daemon, C{twistd -n failnozzle --config=...}, with its config,
    maildir, spool and state file in C{directory}, listening on a free port
    of 127.0.0.1.

    @ivar port: the UDP port it listens on.
    @ivar receive_buffer: the receive buffer size the kernel granted it.
    """

    def __init__(self, directory: str, **settings) -> None:
        """
        @param settings: config file assignments (beyond the defaults),
            such as C{FLUSH_SECONDS=3600}.
        """
        self.directory = directory
        config = os.path.join(directory, "site.py")
        # Every error in a digest at every flush (no quiet repeats), so
        # what it counted is what its digests say; HTTP, as UDP, on a free
        # port.
        settings = {"UDP_BIND": ("127.0.0.1", 0), "REPEAT_SECONDS": 0,
                    "HTTP_BIND": ("127.0.0.1", 0), **settings}
        with open(config, "w") as out:
            for name, value in settings.items():
                out.write(f"{name} = {value!r}\n")
        self.log = open(os.path.join(directory, "twistd.log"), "w+")
        self.process = subprocess.Popen(
            twistd_command() + ["-n", "--pidfile=", "failnozzle",
                                f"--config={config}"],
            cwd=directory, stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.process.pid
        self.port, self.receive_buffer = self._wait_until_listening()
        self.lifetime_peak_rss = None

    def _wait_until_listening(self) -> tuple:
        deadline = time.monotonic() + DAEMON_WAIT_SECONDS
        while time.monotonic() < deadline and self.process.poll() is None:
            text = self.read_log()
            listening = re.search(
                r"listening for errors on UDP 127\.0\.0\.1:(\d+)", text)
            granted = re.search(r"the kernel reports (\d+)", text)
            if listening and granted:
                return int(listening.group(1)), int(granted.group(1))
            time.sleep(0.05)
        self.process.kill()
        self.process.wait()
        raise SystemExit(f"the daemon did not start; see {self.log.name}:\n"
                         + self.read_log())

    def http_port(self) -> int:
        """The port of its HTTP_BIND, as its log says."""
        found = re.search(r"listening for status and control on HTTP "
                          r"[\d.]+:(\d+)", self.read_log())
        if found is None:
            raise SystemExit("the daemon does not say it listens on HTTP")
        return int(found.group(1))

    def read_log(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> float:
        """
        SIGTERM, as a process manager stops it; it flushes its buffer into
        the maildir and exits.  Sets L{lifetime_peak_rss}, which includes
        that last flush.

        @return: the seconds it took to exit.
        """
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        deadline = started + DAEMON_WAIT_SECONDS
        while time.monotonic() < deadline:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid:
                # Reaped here for its rusage; tell Popen it is gone.
                self.process.returncode = os.waitstatus_to_exitcode(status)
                self.lifetime_peak_rss = usage.ru_maxrss * 1024
                self.log.close()
                return time.monotonic() - started
            time.sleep(0.02)
        self.process.kill()
        self.process.wait()
        raise SystemExit(f"the daemon did not stop within "
                         f"{DAEMON_WAIT_SECONDS} s; see {self.log.name}")

    def digests(self) -> list:
        """The paths of the digests it wrote, oldest first."""
        return sorted(glob.glob(os.path.join(
            self.directory, "failnozzle-mail", "new", "*")),
            key=os.path.getmtime)

    def counted(self) -> int:
        """The total of the digests it wrote: every error it counted."""
        total = 0
        for path in self.digests():
            with open(path, "rb") as stored:
                body = email.message_from_binary_file(
                    stored, policy=email.policy.default).get_content()
            total += digest_total(body)
        return total


def send_paced(port: int, datagram: Callable[[int], bytes], rate: float,
               seconds: float, count: int, first: int = 0, step: int = 1,
               start: Optional[float] = None) -> int:
    """
    Send C{datagram(first)}, C{datagram(first + step)}, ... to
    127.0.0.1:C{port} at C{rate} per second, a millisecond's worth at a time
    with a sleep in between, until C{count} are sent or C{seconds} have
    passed since C{start} (a C{time.monotonic()} moment, by default now).

    @return: how many were sent.
    """
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect(("127.0.0.1", port))
    send = sender.send
    if start is None:
        start = time.monotonic()
    time.sleep(max(0.0, start - time.monotonic()))
    batch = max(1, int(rate / 1000))
    sent = 0
    n = first
    try:
        while sent < count:
            elapsed = time.monotonic() - start
            if elapsed >= seconds:
                break
            due = min(count, int(elapsed * rate) + 1, sent + batch)
            if sent >= due:
                time.sleep(0.001)
                continue
            while sent < due:
                send(datagram(n))
                n += step
                sent += 1
    except ConnectionRefusedError:
        pass  # the receiver is gone; what was sent is counted
    finally:
        sender.close()
    return sent


def _sender_process(connection, *arguments) -> None:
    connection.send(send_paced(*arguments))
    connection.close()


def send_from_processes(port: int, datagram: Callable[[int], bytes],
                        rate: float, seconds: float, count: int,
                        senders: int = 1) -> tuple:
    """
    L{send_paced} from C{senders} processes at once, sharing the rate and
    the count (sender C{i} sends datagrams C{i}, C{i + senders}, ...).

    @return: C{(sent, start)}: how many were sent in all, and the
        monotonic moment sending began.
    """
    context = multiprocessing.get_context("fork")
    start = time.monotonic() + 0.1
    running = []
    for index in range(senders):
        share = math.ceil((count - index) / senders)
        receiving, sending = context.Pipe(duplex=False)
        process = context.Process(target=_sender_process, args=(
            sending, port, datagram, rate / senders, seconds, share, index,
            senders, start))
        process.start()
        sending.close()
        running.append((process, receiving))
    sent = 0
    for process, receiving in running:
        if not receiving.poll(seconds + 10):
            process.kill()
            raise SystemExit("a sender process did not finish")
        sent += receiving.recv()
        process.join()
    return sent, start


def team_routes(count: int) -> list:
    """
    C{count} ROUTES rules as teams write them: one per team on a kind and a
    message pattern, the last on database hosts.
    """
    rules = [{"name": f"team{n}", "to": f"team{n}@example.com",
              "match": {"kind": f"^team{n}$",
                        "message": "(?i)timeout|refused"}}
             for n in range(count - 1)]
    rules.append({"name": "dba", "to": "dba@example.com",
                  "match": {"source": r"^db\d+$"}})
    return rules[:count]
