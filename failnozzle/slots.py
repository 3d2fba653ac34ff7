"""
A file rewritten many times a second and never lost: slots overwritten in
place, each with its own checksum, the newest whole one read back.

Replacing a file safely (a temporary file, fsynced, renamed, the directory
fsynced) costs four metadata changes the disk must make durable, and a
Sentry SDK or mail client waiting for its event to be in the next snapshot
would pay for them on every answer.  Overwriting blocks a file already has
costs one data write.  Two kinds of write share the file:

- L{SlotFile.write}: into slot 0 or 1 by turns, then C{fdatasync}
  (blocking: for the disk writer).  A crash of the machine keeps it.
- L{SlotFile.put}: into slot 2 or 3 by turns, the page cache only: cheap
  enough for the reactor, and a crash of the process (kill -9) keeps it;
  the next write makes it durable as well.

A crash may tear the slot being written; its checksum then fails and the
newest whole slot is read instead.  A write never overwrites the newest
synced slot (there are two, written one after the other), so a power cut
loses at most what was put or written since the last write.

  slot N at offset N * capacity (the file's size is four times that),
  each: a header (magic, sequence number, payload length, CRC-32 of those
  and the payload), then the payload

The caller numbers its payloads (L{SlotFile.number}) when it makes them,
so the newest state wins whichever kind of write carried it.  A payload
too large for its slot, or far smaller, replaces the whole file (safely,
as above) with slots fitting it.  A file beginning with C{{} is a snapshot
from before slots (one JSON document) and is read whole.
"""
from __future__ import annotations

import math
import os
import struct
import time
import weakref
import zlib
from typing import BinaryIO, Callable, Optional

from failnozzle.spool import (PRIVATE_FILE, open_regular, replace_file,
                              write_at)

_HEADER = struct.Struct(">8sQQI")
_MAGIC = b"fnslots1"
_SYNCED = (0, 1)
_PUT = (2, 3)
_SLOTS = len(_SYNCED) + len(_PUT)
#: The smallest slot: most snapshots fit, and the file never shrinks below.
MIN_CAPACITY = 64 * 1024
#: How often a write looks whether its file is still the one at its path.
RECHECK_SECONDS = 1.0
#: Sequence numbers from here on are not failnozzle's (it would take it
#: thousands of years to count so far): such a slot is not whole.
_MAX_SEQUENCE = 1 << 62
#: Where there is no fdatasync (macOS), fsync.
_datasync = getattr(os, "fdatasync", os.fsync)


class Unreadable(ValueError):
    """No slot holds a whole payload: says why."""


class SlotFile:
    """
    One such file.  L{number}, L{fits} and L{put} are for one thread (the
    reactor's), L{write} and L{close} for another (the disk writer's),
    never while a put may be made; L{read} is for before all.
    """

    def __init__(self, path: str,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._monotonic = monotonic
        #: The file the slots are in; None: the next write replaces it, as
        #: it does once a write failed (the disk may have dropped it).
        self._descriptor: Optional[int] = None
        self._closer: Optional[weakref.finalize] = None
        self._broken = False
        self._capacity = 0
        #: The slots the next write and the next put go to.
        self._next = {_SYNCED: 0, _PUT: 2}
        self._sequence = 0
        #: When C{path} was last seen to be that file.
        self._checked = -math.inf

    def read(self, limit: int) -> Optional[bytes]:
        """
        The newest whole payload, made durable if it was not yet.
        Blocking: for start-up.

        @param limit: the largest payload read.
        @return: None if there is no file.
        @raise Unreadable: no slot is whole (within C{limit}), or the old
            format's document is larger than C{limit}.
        @raise BadEntry: it is not a regular file.
        @raise OSError: it cannot be read.
        """
        try:
            stored = open_regular(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        with stored:
            status = os.fstat(stored.fileno())
            if stored.read(1) == b"{":
                stored.seek(0)
                document = stored.read(limit + 1)
                if len(document) > limit:
                    raise Unreadable(f"larger than {limit} bytes")
                return document
            capacity = status.st_size // _SLOTS
            # One payload in memory at a time, however large the file.
            found = {slot: _whole(stored, slot * capacity, capacity, limit)
                     for slot in range(_SLOTS)}
            whole = {slot: sequence for slot, sequence in found.items()
                     if sequence is not None}
            if not whole:
                raise Unreadable(f"no slot is whole (and at most {limit} "
                                 f"bytes)")
            newest = max(whole, key=whole.__getitem__)
            payload = _payload(stored, newest * capacity)
        self._sequence = whole[newest]
        for kind in (_SYNCED, _PUT):
            # The older of the two (or the one not whole) is written first.
            self._next[kind] = min(kind, key=lambda slot: whole.get(slot, -1))
        try:
            self._hold(capacity, status)
            # A crash of the process may have left it in the page cache
            # alone: the next write must not overwrite the newest synced.
            _datasync(self._descriptor)
        except OSError:
            self.close()  # the first write replaces it, or says why not
        return payload

    def number(self) -> int:
        """A sequence number for a payload made now: higher than all
        before it."""
        self._sequence += 1
        return self._sequence

    def fits(self, size: int) -> bool:
        """
        Whether a payload of C{size} bytes can be L{put}: it fits a slot,
        which is not far larger, and the file is still the one at C{path}
        (looked at once a second: a file removed or replaced by hand is
        made again).
        """
        needed = _HEADER.size + size
        if (self._descriptor is None or self._broken
                or needed > self._capacity
                or (self._capacity > MIN_CAPACITY
                    and needed * 4 < self._capacity)):
            return False
        now = self._monotonic()
        if now - self._checked < RECHECK_SECONDS:
            return True
        try:
            named = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        held = os.fstat(self._descriptor)
        if ((named.st_dev, named.st_ino) != (held.st_dev, held.st_ino)
                or held.st_size != _SLOTS * self._capacity):
            return False
        self._checked = now
        return True

    def put(self, payload: bytes, sequence: int) -> None:
        """
        Put C{payload}, which L{fits}, into the page cache.

        @raise OSError: it could not be written; the next write replaces
            the file.
        """
        self._overwrite(_PUT, payload, sequence)

    def write(self, payload: bytes, sequence: int) -> None:
        """
        Make C{payload} durable, even after a crash in the middle of this
        write (which leaves the newest synced before it), into a slot or a
        new file.  Blocking: for the disk writer.

        @raise OSError: it could not be written; the next write replaces
            the file.
        """
        try:
            if self.fits(len(payload)):
                self._overwrite(_SYNCED, payload, sequence)
                _datasync(self._descriptor)
                return
            self.close()
            framed = _framed(sequence, payload)
            capacity = max(MIN_CAPACITY,
                           -(-len(framed) * 3 // 2 // 4096) * 4096)
            replace_file(self.path, framed, size=_SLOTS * capacity)
            self._next = {_SYNCED: 1, _PUT: 2}
            self._hold(capacity, os.stat(self.path, follow_symlinks=False))
        except BaseException:
            self._broken = True
            raise

    def close(self) -> None:
        """Let go of the file: the next write replaces it."""
        if self._closer is not None:
            self._closer()
        self._descriptor = self._closer = None

    def _overwrite(self, kind: tuple, payload: bytes, sequence: int) -> None:
        """Write into the next slot of C{kind}; the one after it is next."""
        slot = self._next[kind]
        try:
            write_at(self._descriptor, _framed(sequence, payload),
                     slot * self._capacity)
        except BaseException:
            self._broken = True
            raise
        self._next[kind] = kind[1 - kind.index(slot)]

    def _hold(self, capacity: int, status: os.stat_result) -> None:
        """
        Open the file at C{path}, if it is the one C{status} is of.

        @raise OSError: it cannot be opened, or is another file now.
        """
        # Not blocking should a FIFO be put there meanwhile.
        descriptor = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW
                             | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            held = os.fstat(descriptor)
            if (held.st_dev, held.st_ino) != (status.st_dev, status.st_ino):
                raise FileNotFoundError(f"{self.path} was replaced meanwhile")
            # It tells tracebacks, whatever mode a copy made by hand has.
            os.fchmod(descriptor, PRIVATE_FILE)
        except BaseException:
            os.close(descriptor)
            raise
        self.close()
        self._descriptor, self._capacity = descriptor, capacity
        self._closer = weakref.finalize(self, os.close, descriptor)
        self._broken = False
        self._checked = self._monotonic()


def _framed(sequence: int, payload: bytes) -> bytes:
    return _HEADER.pack(_MAGIC, sequence, len(payload),
                        _checksum(sequence, payload)) + payload


def _checksum(sequence: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack(
        ">QQ", sequence, len(payload))))


def _whole(stored: BinaryIO, offset: int, capacity: int,
           limit: int) -> Optional[int]:
    """
    @return: the sequence number of the slot at C{offset}, if it is whole
        and its payload at most C{limit} bytes.
    """
    stored.seek(offset)
    header = stored.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    magic, sequence, length, checksum = _HEADER.unpack(header)
    if (magic != _MAGIC or _HEADER.size + length > capacity
            or length > limit or sequence >= _MAX_SEQUENCE):
        return None
    payload = stored.read(length)
    if len(payload) < length or _checksum(sequence, payload) != checksum:
        return None
    return sequence


def _payload(stored: BinaryIO, offset: int) -> bytes:
    """The payload of the slot at C{offset}, found whole."""
    stored.seek(offset)
    _, _, length, _ = _HEADER.unpack(stored.read(_HEADER.size))
    return stored.read(length)
