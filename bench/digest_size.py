#!/usr/bin/env python3
"""
What hostile batches make of a digest: for each, the size of the message
the daemon would send (as it travels, headers included), its subject's
length, the time to render and build it (median of --repeat) and the
memory traced while doing so, with the default templates and
DIGEST_MAX_BYTES.

    python bench/digest_size.py [--max-bytes 2000000] [--repeat 3]

The batches are built by hand, as a flush would hand them on: one error
with a 20 MB traceback, 2,000 errors with 10 kB kinds, and one error from
1,000,000 hosts (counted by the real aggregator, which names 100).
"""
from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc

from failnozzle.aggregate import Aggregator, Batch, Entry
from failnozzle.config import UniqueMessage
from failnozzle.digest import DigestRenderer

ENVELOPE = dict(sender="nozzle@example.com", recipients=["ops@example.com"],
                date=0, domain="nozzle1.example.com")


def error(number: int, exc_text: str, kind: str = "app") -> Entry:
    return Entry(UniqueMessage("views", "index", "views.py",
                               f"error {number}", "src/app/views.py", number,
                               exc_text, kind), {"web1": 1}, 0, 0)


def large_traceback() -> Batch:
    frame = ('  File "/srv/app/module.py", line 123, in handler\n'
             "    do_the_thing(argument)\n")
    traceback = ("Traceback (most recent call last):\n"
                 + frame * (20_000_000 // len(frame)) + "ValueError: boom")
    return Batch.of([error(0, traceback), error(1, "ValueError: small")])


def long_kinds() -> Batch:
    return Batch.of([error(n, "ValueError: x",
                           kind=f"kind-{n:04d}-" + "k" * 10_000)
                     for n in range(2000)])


def many_hosts() -> Batch:
    class Clock:
        def seconds(self) -> float:
            return 0.0

    aggregator = Aggregator(2000, Clock(), lambda count, exception: (), 100)
    key = error(0, "ValueError: x").key
    for number in range(1_000_000):
        aggregator.add_key(key, f"host-{number:07d}.example.com")
    return aggregator.flush()


def measure(batch: Batch, max_bytes: int, repeat: int) -> dict:
    renderer = DigestRenderer(UniqueMessage, "nozzle1", 2000)
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        message = renderer.message(batch, max_bytes=max_bytes, **ENVELOPE)
        raw = message.as_bytes()
        seconds.append(time.perf_counter() - started)
    tracemalloc.start()
    renderer.message(batch, max_bytes=max_bytes, **ENVELOPE).as_bytes()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"bytes": len(raw), "subject": len(str(message["Subject"])),
            "seconds": statistics.median(seconds), "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-bytes", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    for name, make in (("one error, 20 MB traceback", large_traceback),
                       ("2,000 errors, 10 kB kinds", long_kinds),
                       ("one error, 1,000,000 hosts", many_hosts)):
        figures = measure(make(), options.max_bytes, options.repeat)
        print(f"{name}: {figures['bytes']:,} bytes, subject "
              f"{figures['subject']} characters, {figures['seconds']:.2f} s, "
              f"{figures['peak'] / 1e6:.1f} MB traced")


if __name__ == "__main__":
    main()
