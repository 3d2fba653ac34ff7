"""
The leader's own pushes, kept until its next merge: reading a push back
from Redis (parsing it, checking every row, reading its keys) is most of
a merge's cost, and the leader's own pushes are a share of them it
already holds.  Redis gives a push back byte for byte, so the bytes
pushed name it; a push not kept here (made before the node led, or past
the bound) is read back from Redis as any other.
"""
from __future__ import annotations

from failnozzle.state import State


class OwnPushes:
    """
    What this node pushed while it led, by the document pushed, holding at
    most C{limit} errors in all: its memory stays within one buffer's.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._pushes: dict = {}
        self._errors = 0

    def keep(self, document: bytes, counted: State) -> None:
        """Keep what C{document}, about to be pushed, was made of."""
        size = len(counted.buffer.entries) + len(counted.bad_input)
        if document in self._pushes or self._errors + size > self.limit:
            return  # read back from Redis
        self._pushes[document] = counted
        self._errors += size

    def take(self) -> dict:
        """
        Everything kept, by document, for a merge, and forgotten here:
        a push the merge does not find in Redis either never got there or
        gets there after the merge began, and is read back from Redis by
        the next.
        """
        pushes = self._pushes
        self.forget()
        return pushes

    def forget(self) -> None:
        """Keep nothing (the lease is lost, or the settings changed)."""
        self._pushes, self._errors = {}, 0
