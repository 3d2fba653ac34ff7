"""
Real errors that vary from one instance to the next, for the grouping tests
(tests/test_fingerprint.py) and their figures (bench/grouping.py).

Each case runs real code (it raises, and logs through failnozzle's own
handler) for a few values of what varies, and gives the datagrams the
handler would send.  Every case is a different bug: the instances of one
case must fold into one entry, and no two cases may fold together.
"""
from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import logging
import math
import re
import socket
import struct
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from typing import Callable, Iterator

from failnozzle.loghandler import AggregatorHandler

#: The values each case is run with.
VARIANTS = (17, 4242, 9)


class _Capture(AggregatorHandler):
    """The handler, keeping what it would send."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1", 9, "web1", "shop")
        self.sent: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.sent.append(self.makePickle(record))


def _logged(run: Callable[[logging.Logger], None]) -> bytes:
    """What failnozzle's handler sends for what C{run} logs."""
    handler = _Capture()
    logger = logging.Logger("corpus")
    logger.addHandler(handler)
    run(logger)
    [datagram] = handler.sent
    return datagram


def _failing(make: Callable[[int], object], log: str, *args):
    """A case: C{make(value)} raises, and the failure is logged."""
    def case(value: int) -> bytes:
        def run(logger: logging.Logger) -> None:
            try:
                make(value)
            except Exception:
                logger.exception(log, *[arg(value) if callable(arg) else arg
                                        for arg in args])
        return _logged(run)
    return case


def _error(log: str, *args):
    """A case: an error logged without a traceback."""
    def case(value: int) -> bytes:
        return _logged(lambda logger: logger.error(
            log, *[arg(value) for arg in args]))
    return case


def _unlisted_port(value: int) -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _lookup(value: int) -> None:
    users: dict = {}
    users[f"user_{value}"]


def _connect(value: int) -> None:
    socket.create_connection(("127.0.0.1", _unlisted_port(value)), 1).close()


def _fetch(value: int) -> None:
    port = _unlisted_port(value)
    urllib.request.urlopen(
        f"http://127.0.0.1:{port}/items/{value}/?page={value}&q=x", timeout=1)


def _wrapped(value: int) -> None:
    try:
        {}[value]
    except KeyError as error:
        raise RuntimeError(f"could not load order {value}") from error


def _moved(value: int) -> None:
    """The same function after a deploy that moved its lines."""
    source = "\n" * value + textwrap.dedent("""
        def checkout(cart):
            return cart["total"] / cart["items"]
        """)
    namespace: dict = {}
    exec(compile(source, "shop/views.py", "exec"), namespace)
    namespace["checkout"]({"total": value, "items": 0})


class HTTPConnection:
    """As urllib3 names its connections in its errors."""


def _urllib3_style(value: int) -> None:
    raise ConnectionError(f"{HTTPConnection()!r}: Failed to establish a new "
                          f"connection: [Errno 111] Connection refused")


def _run_failing(value: int) -> None:
    subprocess.run([sys.executable, "-c", f"raise SystemExit({value})"],
                   check=True)


class Order:
    pass


#: name: a function of the varying value giving a datagram.
CASES: dict = {
    "KeyError for a user": _failing(_lookup, "lookup failed for user %s",
                                    lambda v: v),
    "int() of bad text": _failing(lambda v: int(f"abc{v}"),
                                  "could not read the quantity"),
    "division by zero, logged with the cart": _failing(
        lambda v: v / 0, "ratio for cart %d failed", lambda v: v),
    "connection refused": _failing(_connect, "could not reach the cache"),
    "urlopen refused": _failing(_fetch, "could not fetch the item"),
    "timeout with its duration": _error("Timeout after %.2fs",
                                        lambda v: v + 0.21),
    "object repr with its address": _error("bad object %r",
                                           lambda v: Order()),
    "uuid": _error("order %s not found", lambda v: uuid.uuid4()),
    "email address": _error("mail to %s bounced",
                            lambda v: f"user{v}@example.com"),
    "IPv4 and port": _error("peer %s reset the connection",
                            lambda v: f"10.0.{v % 256}.1:{5000 + v}"),
    "IPv6 and port": _error("connect to %s failed",
                            lambda v: f"[fe80::{v:x}]:{v}"),
    "ISO timestamp": _error("job stuck since %s", lambda v: (
        datetime.datetime(2026, 12, 1) + datetime.timedelta(minutes=v))
        .isoformat()),
    "common log timestamp": _error("request at %s was late", lambda v:
                                   time.strftime("%d/%b/%Y:%H:%M:%S +0000",
                                                 time.gmtime(v * 1000))),
    "duration in ms": _error("render took %dms", lambda v: v),
    "quoted file name": _failing(lambda v: open(f"/nonexistent/{v}.txt"),
                                 'Could not retrieve file "%s"',
                                 lambda v: f"{v}.txt"),
    "Django's internal server error": _error("Internal Server Error: %s",
                                             lambda v: f"/items/{v}/"),
    "id-like path segment": _error("no route for %s",
                                   lambda v: f"/orders/AB{v}XYZ/"),
    "sha1 id": _error("cache miss for %s", lambda v: hashlib.sha1(
        str(v).encode()).hexdigest()),
    "json.loads of cut text": _failing(
        lambda v: json.loads('{"a": ' + " " * v), "bad payload"),
    "list index": _failing(lambda v: [][v], "row %d missing", lambda v: v),
    "missing attribute": _failing(lambda v: getattr(Order(), f"attr{v}"),
                                  "bad order"),
    "chained exceptions": _failing(_wrapped, "order failed"),
    "the same traceback after a deploy": _failing(_moved, "checkout failed"),
    "strptime of a bad date": _failing(
        lambda v: datetime.datetime.strptime(f"2026-13-{v}", "%Y-%m-%d"),
        "bad date"),
    "float out of range": _error("value %.2f out of range",
                                 lambda v: v * 1.5),
    "struct.unpack": _failing(lambda v: struct.unpack("i", b"x" * (v % 4)),
                              "packet %d bad", lambda v: v),
    "bad IP address": _failing(
        lambda v: ipaddress.ip_address(f"300.1.1.{v}"), "bad client"),
    "a command that failed": _failing(_run_failing, "backup failed"),
    "regular expression error": _failing(
        lambda v: re.compile("x" * v + "["), "bad filter"),
    "undecodable bytes": _failing(
        lambda v: (b"a" * v + b"\xff").decode(), "bad upload"),
    "math range error": _failing(lambda v: math.exp(1000 + v),
                                 "exp(%d) failed", lambda v: v),
    "urllib3's connection error": _failing(_urllib3_style,
                                           "search unavailable"),
}


def datagrams() -> Iterator[tuple]:
    """C{(case, [datagram per variant])} for every case."""
    for name, case in CASES.items():
        yield name, [case(value) for value in VARIANTS]
