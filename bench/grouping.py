#!/usr/bin/env python3
"""
How well and how fast failnozzle's fingerprints group, in process.

    python bench/grouping.py

Prints, for the corpus of real errors in tests/grouping_corpus.py (each case
run for a few values of what varies): the fold rate (cases whose reports
all got one fingerprint) and the false-merge rate (pairs of different cases
that got one).  Then what making one fingerprint costs, for usual reports and
for hostile texts made to be slow (the median of many, in microseconds).
"""
from __future__ import annotations

import itertools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from failnozzle.config import UniqueMessage  # noqa: E402
from failnozzle.fingerprint import Grouping  # noqa: E402
from failnozzle.ingest import RecordReader  # noqa: E402
from tests import grouping_corpus  # noqa: E402

FIELDS = UniqueMessage._fields


def corpus_rates() -> None:
    reader = RecordReader(FIELDS, "source", 65536)
    grouping = Grouping(FIELDS)
    digests = {}
    folded = 0
    for name, datagrams in grouping_corpus.datagrams():
        made = set()
        for datagram in datagrams:
            report = reader.read(datagram)
            made.add(grouping.fingerprint(report.key, report.template))
        folded += len(made) == 1
        digests[name] = made
    pairs = list(itertools.combinations(digests, 2))
    merged = [(first, second) for first, second in pairs
              if digests[first] & digests[second]]
    print(f"corpus: {len(digests)} cases of "
          f"{len(grouping_corpus.VARIANTS)} reports each")
    print(f"fold rate: {folded} of {len(digests)} cases folded into one "
          f"entry ({folded / len(digests):.0%})")
    print(f"false-merge rate: {len(merged)} of {len(pairs)} pairs of "
          f"different cases folded together ({len(merged) / len(pairs):.1%})")
    for first, second in merged:
        print(f"  merged: {first!r} and {second!r}")


def key(message: str, exc_text=None) -> tuple:
    values = dict(module="shop.views", funcName="checkout",
                  filename="views.py", message=message,
                  pathname="shop/views.py", lineno=50, exc_text=exc_text,
                  kind="shop")
    return tuple(values[name] for name in FIELDS)


def cost(make, count: int = 300) -> float:
    """Median microseconds of one fingerprint of C{make(n)}, each new."""
    keys = [make(n) for n in range(count)]
    times = []
    for made in keys:
        grouping = Grouping(FIELDS)  # no cache from the one before
        began = time.perf_counter()
        grouping.fingerprint(made)
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e6


def traceback_text(n: int, depth: int = 15) -> str:
    frames = "".join(f'  File "/srv/app/module{i}.py", line {i + n}, in '
                     f'function{i}\n    call{i}(x)\n' for i in range(depth))
    return (f"Traceback (most recent call last):\n{frames}"
            f"KeyError: 'user_{n}'")


def costs() -> None:
    loads = {
        "a message without digits or quotes": lambda n: key(
            "Exception in view " + "abcdefghij"[n % 10]),
        "lookup failed for user N": lambda n: key(
            f"lookup failed for user {n}"),
        "a 110-character urllib3 message": lambda n: key(
            f"<HTTPConnection object at 0x{n:012x}>: Failed to establish a "
            f"new connection: [Errno 111] Connection refused"),
        "message and a 1.7 kB traceback": lambda n: key(
            f"lookup failed for user {n}", traceback_text(n)),
        "hostile: 1,000 characters of '1 '": lambda n: key(
            f"{n} " + "1 " * 500),
        "hostile: 16,000 characters of \"'a\" as exc_text": lambda n: key(
            "x", f"{n}" + "'a" * 8000),
        "hostile: a 64 kB traceback of distinct frames": lambda n: key(
            "x", "Traceback (most recent call last):\n" + "".join(
                f'  File "/x/{n}/{i}.py", line 1, in f\n'
                for i in range(1600))),
    }
    print("\ncost of making one fingerprint, each for a new report "
          "(median, us):")
    for name, make in loads.items():
        print(f"  {name:<52} {cost(make):>8.1f}")


if __name__ == "__main__":
    corpus_rates()
    costs()
