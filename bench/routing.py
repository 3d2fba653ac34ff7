#!/usr/bin/env python3
"""
What ROUTES cost a flush, in process: the routing the daemon runs at each
flush (failnozzle.routing.route, on the reactor), for a batch of --unique
errors from 20 hosts each, through 20 rules as teams write them (19 on a
kind and a message pattern, one on database hosts), and through none.

    python bench/routing.py

Prints the best of --repeat runs, in milliseconds.  Routing is per flush,
never per datagram: receiving costs the same with or without ROUTES.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from failnozzle.aggregate import Entry  # noqa: E402
from failnozzle.config import UniqueMessage, _addresses, _seconds  # noqa
from failnozzle.routing import parse_rules, route  # noqa: E402
from common import team_routes  # noqa: E402

FIELDS = UniqueMessage._fields


def rules(count: int) -> tuple:
    """C{count} rules: per team a kind and a message, then the DBAs'."""
    return parse_rules("ROUTES", team_routes(count), _addresses,
                       _seconds(3600, zero_is_off=True))


def batch(unique: int) -> list:
    """C{unique} errors of 40 kinds, each from 20 hosts (2 databases)."""
    hosts = [f"web{n}" for n in range(18)] + ["db1", "db2"]
    return [Entry(UniqueMessage(
        "views", "handle", "views.py", f"error {n}: connection refused",
        "/srv/app/views.py", 10, "Traceback ...\nError: refused",
        f"team{n % 40}"), {host: 1 for host in hosts}, 0.0, 1.0)
        for n in range(unique)]


def best_of(repeat: int, entries: list, given: tuple) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        route(entries, given, FIELDS)
        best = min(best, time.perf_counter() - started)
    return best * 1000


def main(argv: list) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--unique", type=int, default=10_000)
    parser.add_argument("--rules", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args(argv)
    entries = batch(options.unique)
    print(f"routing a flush of {options.unique:,} unique errors from 20 "
          f"hosts each, best of {options.repeat}:")
    for count in (0, options.rules):
        given = rules(count) if count else ()
        took = best_of(options.repeat, entries, given)
        print(f"  {count:>3} rules: {took:7.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
