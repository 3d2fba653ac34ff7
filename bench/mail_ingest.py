#!/usr/bin/env python3
"""
What hostile SMTP clients cost the daemon's mail ingest (SMTP_INGEST_BIND),
measured from outside, on 127.0.0.1.

    python bench/mail_ingest.py                   # every attack, a few minutes
    python bench/mail_ingest.py --attack subject,lines
    python bench/mail_ingest.py --parse           # read_mail in process: 1x/10x

Each attack gets a daemon of its own (twistd -n failnozzle --config=...,
started as users start it) and runs in a process of its own.  Meanwhile
this process runs two probes: a lag probe, an SMTP connection of its own
that sends NOOP and times each reply (its longest round trip is the
longest the reactor was held), and a UDP probe sending one error datagram
every millisecond (the digest must count every one: none dropped while
the reactor was busy).  Per attack: the daemon's RSS before, at its peak
during the attack (VmHWM, reset first) and after; the NOOP round trips
(median, 99th percentile, longest: on a busy machine the daemon also waits
for a CPU); UDP datagrams sent and counted; the log lines the attack caused
(tracebacks among them); what the attacker saw; and what the digest
written at SIGTERM listed besides the probe.

--parse times read_mail alone (CPU time) on adversarial messages of a size,
ten times that size (linear work takes ten times as long) and
SMTP_INGEST_MAX_BYTES (of which 128 KiB are read).
"""
from __future__ import annotations

import argparse
import base64
import email
import email.policy
import json
import multiprocessing
import os
import re
import socket
import sys
import tempfile
import threading
import time
from typing import Callable

from common import Daemon, rss

MB = 1024 * 1024

#: Every wait for the daemon is bounded by this.
ATTACK_SECONDS = 60


def smtp_port(daemon: Daemon) -> int:
    """The port the daemon's SMTP ingest listens on, from its log."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = re.search(r"listening for mail on SMTP 127\.0\.0\.1:(\d+)",
                          daemon.read_log())
        if found:
            return int(found.group(1))
        time.sleep(0.05)
    raise SystemExit("the daemon does not say where it takes mail")


def reset_peak(pid: int) -> None:
    """Start VmHWM again from the current RSS."""
    with open(f"/proc/{pid}/clear_refs", "w") as refs:
        refs.write("5")


class Client:
    """A raw SMTP client: what it sends is exactly what is given."""

    def __init__(self, port: int, timeout: float = 30) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port),
                                             timeout=timeout)
        self.lines = self.sock.makefile("rb")
        self.greeting = self.reply()

    def reply(self) -> tuple:
        """C{(code, last line)} of the next reply; C{(0, b"")} if closed."""
        while True:
            line = self.lines.readline(70000)
            if not line:
                return 0, b""
            if line[3:4] != b"-":
                return int(line[:3] or 0), line.rstrip()

    def command(self, line: bytes) -> int:
        self.sock.sendall(line + b"\r\n")
        return self.reply()[0]

    def send_mail(self, data: bytes, helo: bytes = b"EHLO attacker") -> list:
        """A whole transaction; the codes of its replies."""
        codes = [self.command(helo), self.command(b"MAIL FROM:<a@b>"),
                 self.command(b"RCPT TO:<attack@nozzle>"),
                 self.command(b"DATA")]
        if codes[-1] != 354:
            return codes
        stuffed = re.sub(rb"(?m)^\.", b"..", data.replace(b"\r\n", b"\n"))
        self.sock.sendall(stuffed.replace(b"\n", b"\r\n") + b"\r\n.\r\n")
        return codes + [self.reply()[0]]

    def close(self) -> None:
        self.sock.close()


def message(subject: str = "attack", body: bytes = b"x", headers: bytes = b""
            ) -> bytes:
    return (b"Subject: " + subject.encode() + b"\n" + headers + b"\n"
            + body)


# The attacks: each runs in a process of its own against the daemon's port
# and returns what the attacker saw.

def attack_traceback(port: int) -> dict:
    """The quadratic traceback searches: 120 kB bodies, one of each."""
    bodies = {
        "chained": b"Traceback (most recent call last):\n"
                   + b"x\nThe above exception\n" * 5700,
        "blank lines": b"Traceback (most recent call last):\n"
                       + b"\n" * 120000 + b"E: x\n",
        "open quotes": b"Traceback (most recent call last):\n"
                       + b'  File "aaaa\n' * 9000 + b"E: x\n",
    }
    seen = {}
    for name, body in bodies.items():
        client = Client(port)
        started = time.monotonic()
        seen[name] = (client.send_mail(message(name, body))[-1],
                      f"{time.monotonic() - started:.2f} s")
        client.close()
    return seen


def attack_subject(port: int) -> dict:
    """A 200 kB Subject of encoded words (RFC 2047)."""
    client = Client(port)
    subject = "=?utf-8?q?a?=\n " * 14300
    return {"reply": client.send_mail(message(subject))[-1]}


def attack_lines(port: int, connections: int = 5) -> dict:
    """Five connections each sending 10 MiB of short lines."""
    chunk = b"a\r\n" * 100000
    clients = [Client(port) for _ in range(connections)]
    for client in clients:
        for line in (b"EHLO x", b"MAIL FROM:<a@b>", b"RCPT TO:<k@x>",
                     b"DATA"):
            client.command(line)
        client.sock.sendall(b"Subject: lines\r\n\r\n")
    for _ in range(10 * MB // len(chunk) - 1):
        for client in clients:
            client.sock.sendall(chunk)
    for client in clients:
        client.sock.sendall(b".\r\n")
    return {"replies": [client.reply()[0] for client in clients]}


def attack_auth(port: int, seconds: float = 10) -> dict:
    """Password guessing for 10 s: one connection, then reconnecting."""
    guesses, replies = 0, {}
    deadline = time.monotonic() + seconds
    connections = 0
    while time.monotonic() < deadline:
        client = Client(port, timeout=seconds)
        connections += 1
        client.command(b"EHLO x")
        try:
            while time.monotonic() < deadline:
                code = client.command(b"AUTH PLAIN " + base64.b64encode(
                    b"\0django\0guess%d" % guesses))
                guesses += 1
                replies[code] = replies.get(code, 0) + 1
                if code in (0, 421):
                    break
        except OSError:
            pass
        client.close()
    return {"guesses/s": round(guesses / seconds, 1),
            "connections": connections, "replies": replies}


def attack_auth_parallel(port: int, connections: int = 50,
                         seconds: float = 10) -> dict:
    """Password guessing for 10 s on 50 connections at once."""
    results = []

    def guess() -> None:
        results.append(attack_auth(port, seconds))

    threads = [threading.Thread(target=guess) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + ATTACK_SECONDS)
    return {"guesses/s": round(sum(result["guesses/s"]
                                   for result in results), 1),
            "connections": sum(result["connections"] for result in results)}


def attack_size(port: int, commands: int = 3000) -> dict:
    """Bad SIZE= parameters: 5,000 digits, not a number, negative."""
    client = Client(port)
    client.command(b"EHLO x")
    replies = {}
    for number in range(commands):
        size = (b"9" * 5000, b"abc", b"-5")[number % 3]
        code = client.command(b"MAIL FROM:<a@b> SIZE=" + size)
        replies[code] = replies.get(code, 0) + 1
        if code in (0, 421):
            client = Client(port)
            client.command(b"EHLO x")
        elif code == 250:
            client.command(b"RSET")
    return {"replies": replies}


def attack_pipelining(port: int, seconds: float = 5) -> dict:
    """NOOP after NOOP for 5 s, never reading a reply."""
    client = Client(port)
    chunk = b"NOOP\r\n" * 10000
    sent = 0
    deadline = time.monotonic() + seconds
    client.sock.settimeout(1)
    while time.monotonic() < deadline:
        try:
            client.sock.sendall(chunk)
            sent += 10000
        except socket.timeout:
            pass
        except OSError:
            break
    return {"commands sent": sent}


def attack_recipients(port: int) -> dict:
    """10,000 RCPTs of long addresses, then one of 60 kB, then the data."""
    client = Client(port)
    client.command(b"EHLO x")
    client.command(b"MAIL FROM:<a@b>")
    replies = {}
    address = b"<" + b"a." * 120 + b"a@x>"
    client.sock.sendall(b"".join(b"RCPT TO:" + address + b"\r\n"
                                 for _ in range(10000)))
    for _ in range(10000):
        code = client.reply()[0]
        replies[code] = replies.get(code, 0) + 1
    long_address = client.command(b"RCPT TO:<" + b"a." * 30000 + b"@x>")
    return {"replies": replies, "60 kB address": long_address}


def attack_helo(port: int, connections: int = 100) -> dict:
    """100 connections each naming itself with 60 kB, then sending mail."""
    clients, codes = [], {}
    for number in range(connections):
        client = Client(port)
        if client.greeting[0] != 220:
            codes[client.greeting[0]] = codes.get(client.greeting[0], 0) + 1
            continue
        code = client.command(b"EHLO " + b"h" * 60000 + b"%d" % number)
        codes[code] = codes.get(code, 0) + 1
        clients.append(client)
    for client in clients:
        client.close()
    return {"replies to EHLO": codes}


def attack_nul(port: int) -> dict:
    """NUL bytes in commands, in the HELO name and in the message."""
    client = Client(port)
    replies = [client.command(b"\0\0\0"), client.command(b"HELO a\0b\0c")]
    replies += client.send_mail(message("nul\0subject",
                                        b"body\0with\0NULs\n"),
                                helo=b"HELO x\0y")
    return {"replies": replies}


def attack_headers(port: int) -> dict:
    """A 60 kB header line, and a Subject folded over 10 MiB."""
    client = Client(port)
    long_line = client.send_mail(message(
        "long header", headers=b"X-Long: " + b"y" * 60000 + b"\n"))[-1]
    folded = client.send_mail(b"Subject: folded\n" + b" word\n" * 1400000
                              + b"\nbody\n")[-1]
    return {"60 kB header": long_line, "10 MiB folded Subject": folded}


def attack_mime(port: int) -> dict:
    """Multipart nested 150,000 deep, and 1,000,000 empty parts."""
    nested = b"".join(b"Content-Type: multipart/mixed; boundary=%d\n\n--%d\n"
                      % (depth, depth) for depth in range(150000))
    many = (b"Content-Type: multipart/mixed; boundary=b\n\n"
            + b"--b\n\nx\n" * 1000000)
    client = Client(port)
    return {"nested": client.send_mail(message("nested", headers=nested))[-1],
            "many parts": client.send_mail(b"Subject: many\n" + many)[-1]}


def attack_encodings(port: int) -> dict:
    """A 9 MiB base64 text part, a 9 MiB quoted-printable one, and 1 MB
    of punycode."""
    raw = b"Traceback (most recent call last):\n" * 200000
    b64 = (b"Content-Type: text/plain; charset=utf-8\n"
           b"Content-Transfer-Encoding: base64\n\n"
           + base64.encodebytes(raw * 1))
    qp = (b"Content-Type: text/plain; charset=utf-8\n"
          b"Content-Transfer-Encoding: quoted-printable\n\n"
          + b"=E2=98=83=\n" * 800000)
    puny = (b"Content-Type: text/plain; charset=punycode\n"
            b"Content-Transfer-Encoding: base64\n\n"
            + base64.encodebytes(b"a-" + b"9" * 1000000))
    client = Client(port)
    return {name: client.send_mail(b"Subject: " + name.encode() + b"\n"
                                   + data)[-1]
            for name, data in (("base64", b64), ("qp", qp),
                               ("punycode", puny))}


def attack_charsets(port: int, count: int = 2000) -> dict:
    """2,000 messages, each with a charset name of its own."""
    client = Client(port)
    client.command(b"EHLO x")
    codes = {}
    for number in range(count):
        data = (b"Subject: =?x-charset-%d-%s?q?a?=\n"
                b"Content-Type: text/plain; charset=x-charset-%d-%s\n\nbody"
                % (number, b"z" * 3000, number, b"z" * 3000))
        code = client.send_mail(data, helo=b"NOOP")[-1]
        codes[code] = codes.get(code, 0) + 1
    return {"replies": codes}


def attack_html(port: int) -> dict:
    """HTML-only mail of 5 MiB of unclosed tags."""
    client = Client(port)
    data = (b"Subject: html\nContent-Type: text/html\n\n"
            + (b"<a" * 500 + b"\n") * (5 * MB // 1001))
    return {"reply": client.send_mail(data)[-1]}


def attack_idle(port: int, connections: int = 300, seconds: float = 5
                ) -> dict:
    """300 connections that never send a thing."""
    greetings, clients = {}, []
    for _ in range(connections):
        try:
            client = Client(port, timeout=5)
        except OSError:
            greetings["refused"] = greetings.get("refused", 0) + 1
            continue
        code = client.greeting[0]
        greetings[code] = greetings.get(code, 0) + 1
        clients.append(client)
    time.sleep(seconds)
    for client in clients:
        client.close()
    return {"greetings": greetings}


def attack_slowloris(port: int, connections: int = 90, seconds: float = 10
                     ) -> dict:
    """90 connections in DATA, each sending a line a second."""
    clients = []
    for _ in range(connections):
        client = Client(port)
        if client.greeting[0] != 220:
            break
        for line in (b"EHLO x", b"MAIL FROM:<a@b>", b"RCPT TO:<k@x>",
                     b"DATA"):
            client.command(line)
        clients.append(client)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for client in clients:
            client.sock.sendall(b"X-Slow: " + b"s" * 60000 + b"\r\n")
        time.sleep(1)
    return {"connections in DATA": len(clients)}


def attack_drip(port: int, connections: int = 20) -> dict:
    """20 connections in DATA, each dripping a 60 kB line 10 bytes a
    packet."""
    clients = []
    for _ in range(connections):
        client = Client(port)
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for line in (b"EHLO x", b"MAIL FROM:<a@b>", b"RCPT TO:<k@x>",
                     b"DATA"):
            client.command(line)
        client.sock.sendall(b"Subject: drip\r\n\r\n")
        clients.append(client)
    for _ in range(6000):
        for client in clients:
            client.sock.send(b"d" * 10)
    for client in clients:
        client.sock.sendall(b"\r\n.\r\n")
    return {"replies": [client.reply()[0] for client in clients]}


def attack_junk(port: int, lines: int = 200000) -> dict:
    """200,000 lines of junk commands in one go."""
    client = Client(port)
    client.sock.settimeout(10)
    try:
        client.sock.sendall(b"GET / HTTP/1.1\r\n" * lines)
    except OSError as error:
        return {"send": type(error).__name__}
    codes = {}
    while True:
        code = client.reply()[0]
        codes[code] = codes.get(code, 0) + 1
        if code in (0, 421):
            break
    return {"replies": codes}


ATTACKS = {attack.__name__.partition("_")[2]: attack for attack in (
    attack_traceback, attack_subject, attack_lines, attack_auth,
    attack_auth_parallel, attack_size,
    attack_pipelining, attack_recipients, attack_helo, attack_nul,
    attack_headers, attack_mime, attack_encodings, attack_charsets,
    attack_html, attack_idle, attack_slowloris, attack_drip, attack_junk)}

#: The daemon's settings for an attack, beyond SMTP_INGEST_BIND.
SETTINGS = {name: {"SMTP_INGEST_USERS": {"django": "s3cret"}}
            for name in ("auth", "auth_parallel")}


class LagProbe(threading.Thread):
    """NOOP, reply, NOOP...: the longest round trip is the longest hold."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.client = Client(port, timeout=ATTACK_SECONDS)
        self.client.command(b"EHLO probe")
        self.round_trips = [0.0]
        self.failed = None
        self.running = True

    def run(self) -> None:
        try:
            while self.running:
                started = time.monotonic()
                if self.client.command(b"NOOP") != 250:
                    raise OSError("NOOP not answered 250")
                self.round_trips.append(time.monotonic() - started)
                time.sleep(0.002)
        except OSError as error:
            self.failed = error

    def summary(self) -> str:
        times = sorted(self.round_trips)
        return (f"NOOP round trips: median {times[len(times) // 2] * 1000:.0f}"
                f" ms, 99th percentile {times[len(times) * 99 // 100] * 1000:.0f}"
                f" ms, longest {times[-1] * 1000:.0f} ms")

    def stop(self) -> None:
        self.running = False
        self.join(ATTACK_SECONDS)
        self.client.close()


class UDPProbe(threading.Thread):
    """One error datagram a millisecond, all the same error."""

    DATAGRAM = json.dumps({"message": "udp probe", "kind": "probe",
                           "source": "prober"}).encode()

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect(("127.0.0.1", port))
        self.sent = 0
        self.running = True

    def run(self) -> None:
        started = time.monotonic()
        while self.running:
            due = int((time.monotonic() - started) * 1000)
            while self.sent < due:
                self.sock.send(self.DATAGRAM)
                self.sent += 1
            time.sleep(0.001)

    def stop(self) -> None:
        self.running = False
        self.join(ATTACK_SECONDS)
        self.sock.close()


_HEADLINE = re.compile(r"^Exception #\d+ of \d+: (\d+)X (.*) \(in ", re.M)


def digest_entries(daemon: Daemon) -> dict:
    """Each error the digests list in full: its message and count."""
    entries = {}
    for path in daemon.digests():
        with open(path, "rb") as stored:
            body = email.message_from_binary_file(
                stored, policy=email.policy.default).get_content()
        for count, text in _HEADLINE.findall(body):
            entries[text] = entries.get(text, 0) + int(count)
    return entries


def _attacker(connection, attack: Callable, port: int) -> None:
    try:
        connection.send(attack(port))
    except Exception as error:
        connection.send({"attacker failed": f"{type(error).__name__}: "
                                            f"{error}"})
    connection.close()


def run_attack(name: str) -> None:
    attack, settings = ATTACKS[name], SETTINGS.get(name, {})
    with tempfile.TemporaryDirectory() as directory:
        daemon = Daemon(directory, SMTP_INGEST_BIND=("127.0.0.1", 0),
                        FLUSH_SECONDS=3600, **settings)
        try:
            port = smtp_port(daemon)
            lag, udp = LagProbe(port), UDPProbe(daemon.port)
            lag.start()
            udp.start()
            time.sleep(1)
            before, _ = rss(daemon.pid)
            reset_peak(daemon.pid)
            log_before = len(daemon.read_log().splitlines())
            receiving, sending = multiprocessing.get_context("fork").Pipe(
                duplex=False)
            process = multiprocessing.get_context("fork").Process(
                target=_attacker, args=(sending, attack, port))
            started = time.monotonic()
            process.start()
            sending.close()
            seen = (receiving.recv() if receiving.poll(ATTACK_SECONDS)
                    else {"attacker": "still running: killed"})
            process.kill()
            process.join()
            attack_seconds = time.monotonic() - started
            time.sleep(1)
            after, peak = rss(daemon.pid)
            lag.stop()
            udp.stop()
            log = daemon.read_log().splitlines()[log_before:]
        finally:
            try:
                daemon.stop()
            except SystemExit as error:
                print(f"{name}: {error}")
        entries = digest_entries(daemon)
        probe = entries.pop("udp probe", 0)
        tracebacks = sum("Traceback (most recent call last)" in line
                         for line in log)
        print(f"{name}: {attack.__doc__.strip()}")
        print(f"  RSS {before / MB:.1f} MB before, {peak / MB:.1f} MB at the "
              f"peak, {after / MB:.1f} MB after ({attack_seconds:.1f} s)")
        print(f"  {lag.summary()}"
              + (f" (probe failed: {lag.failed})" if lag.failed else ""))
        print(f"  UDP probe: {udp.sent} sent, {probe} counted, "
              f"{udp.sent - probe} lost")
        print(f"  log: {len(log)} lines, {tracebacks} tracebacks")
        for line in [line for line in log if "Traceback" not in line][:6]:
            print(f"    {line[:150]}")
        print(f"  attacker saw: {seen}")
        shown = {text[:70]: count for text, count in entries.items()}
        print(f"  digest besides the probe: {shown}")
        print()


def time_read_mail(data: bytes) -> float:
    from failnozzle.mailin import read_mail

    # CPU time: the machine's other programs do not count.
    started = time.process_time()
    try:
        read_mail(data, "kind", "source")
    except Exception:
        return float("nan")  # As the daemon would: bad input.
    return time.process_time() - started


#: Adversarial messages of about C{n} bytes, for --parse.
PARSE_CASES = {
    "chained tracebacks": lambda n: message(body=(
        b"Traceback (most recent call last):\n"
        + b"x\nThe above exception\n" * (n // 22))),
    "blank lines": lambda n: message(body=(
        b"Traceback (most recent call last):\n" + b"\n" * n + b"E: x\n")),
    "deep indent": lambda n: message(body=(
        b"Traceback (most recent call last):\n"
        + (b" " * 1000 + b"x\n") * (n // 1002) + b"E: x\n")),
    "many frames": lambda n: message(body=(
        b"Traceback (most recent call last):\n"
        + b'  File "/a.py", line 1, in f\n    f()\n' * (n // 36)
        + b"E: x\n")),
    "long lines": lambda n: message(body=(b"y" * 5999 + b"\n")
                                    * (n // 6000)),
    "encoded subject": lambda n: message("=?utf-8?q?a?= " * (n // 14)),
    "many headers": lambda n: b"X-A: b\n" * (n // 7) + b"\nbody\n",
    "many parts": lambda n: (b"Content-Type: multipart/mixed; boundary=b\n\n"
                             + b"--b\n\nx\n" * (n // 7)),
    "parameters": lambda n: (b"Content-Type: multipart/mixed; boundary=b\n\n"
                             + (b'--b\nContent-Type: x/y; a="' + b";" * 1000
                                + b'"\n\n') * (n // 1024)),
    "nested parts": lambda n: b"".join(
        b"Content-Type: multipart/mixed; boundary=%d\n\n--%d\n" % (i, i)
        for i in range(n // 50)),
    "html open tags": lambda n: (b"Content-Type: text/html\n\n"
                                 + (b"<a" * 500 + b"\n") * (n // 1001)),
    "html tags": lambda n: (b"Content-Type: text/html\n\n"
                            + (b"<b>" * 300 + b"\n") * (n // 901)),
    "html comments": lambda n: (b"Content-Type: text/html\n\n"
                                + (b"<!---->" * 100 + b"\n") * (n // 701)),
    "html entities": lambda n: (b"Content-Type: text/html\n\n"
                                + (b"&amp;" * 200 + b"\n") * (n // 1001)),
    "punycode": lambda n: (b"Content-Type: text/plain; charset=punycode\n"
                           b"Content-Transfer-Encoding: base64\n\n"
                           + base64.encodebytes(b"a-" + b"9" * (n * 3 // 4))),
}


def run_parse(sizes: list, repeat: int) -> None:
    print(f"read_mail on adversarial messages, CPU ms (the best of "
          f"{repeat}; nan: it raised); the second size takes about "
          f"{sizes[1] / sizes[0]:g}x the first's time if the work is "
          f"linear; past MAX_PARSED_BYTES (128 KiB) only that much is read")
    print(f"{'case':<20}" + "".join(f"{size / 1024:>10,.0f} kB"
                                    for size in sizes) + "   ratio")
    for name, make in PARSE_CASES.items():
        times = []
        for size in sizes:
            data = make(size)
            times.append(min(time_read_mail(data) for _ in range(repeat)))
        print(f"{name:<20}" + "".join(f"{t * 1000:>13.1f}" for t in times)
              + f"  {times[1] / max(times[0], 1e-9):>6.1f}")
    print()


def main(argv: list) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--attack", default=",".join(ATTACKS),
                        help="comma-separated, of: " + ", ".join(ATTACKS))
    parser.add_argument("--parse", action="store_true",
                        help="only time read_mail in this process")
    parser.add_argument("--sizes", default="12000,120000,10485760",
                        help="message sizes for --parse, in bytes (the "
                             "last: SMTP_INGEST_MAX_BYTES)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="runs of each --parse case")
    options = parser.parse_args(argv)
    print(f"failnozzle mail ingest benchmark, {time.strftime('%Y-%m-%d %H:%M')}"
          f", {len(os.sched_getaffinity(0))} CPUs, Python "
          f"{sys.version.split()[0]}, load average {os.getloadavg()[0]:.2f}\n")
    if options.parse:
        run_parse([int(size) for size in options.sizes.split(",")],
                  options.repeat)
        return
    for name in options.attack.split(","):
        run_attack(name)


if __name__ == "__main__":
    main(sys.argv[1:])
