"""
Python's cyclic garbage collector, kept out of the reactor's way.

The reactor is one thread: while the collector walks the heap, no datagram
is read.  Start-up leaves a large heap that a full collection walks again
each time (L{freeze_heap}), and a flush makes and keeps some hundred
thousand objects in one turn, each young collection they set off walking
the ones before again (L{collector_held}).
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


def freeze_heap() -> None:
    """
    Put every object the daemon holds now out of the garbage collector's
    sight (C{gc.freeze}): a full collection otherwise walks all of Twisted,
    Jinja2 and the email package, holding the reactor some 30 ms, long
    enough for a busy UDP socket to overflow.  Objects made later are
    collected as before.  Called again after a reload, so that what the
    old settings held is collected (C{gc.unfreeze} first) rather than kept
    for good if it holds a cycle.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


@contextmanager
def collector_held() -> Iterator[None]:
    """
    Keep the collector off while the body runs, and turn it on again after
    if it was on (also as a decorator).  A flush of 10,000 errors set off
    some hundred young collections and a full one, a fifth of its time
    with the heap frozen and two fifths without; held,
    what it made is walked once, by the first collection after, about a
    millisecond.  Only for work that makes what it keeps: garbage made
    meanwhile waits too.
    """
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()
