"""
Messages on disk: maildirs written safely (in C{tmp/}, fsynced, renamed into
C{new/}), the spool every message waits in until the mail server took it,
and the C{failed/} maildir beside it for those it never will.

Each message is a plain RFC 5322 file, so any mail tool can read what is
waiting or what failed.
"""
from __future__ import annotations

import itertools
import os
import socket
from typing import Optional

from twisted.internet.interfaces import IReactorTime


def fsync_directory(path: str) -> None:
    """Make a rename or unlink in C{path} survive a power cut."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class Maildir:
    """
    A maildir that files are written to atomically: a reader sees a whole
    message in C{new/} or none.
    """

    _serial = itertools.count()

    def __init__(self, path: str, clock: IReactorTime) -> None:
        self.path = os.path.abspath(path)
        self._clock = clock

    def prepare(self) -> None:
        """
        Create the maildir if needed.

        @raise OSError: it cannot be created.
        """
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(self.path, sub), exist_ok=True)

    def write(self, data: bytes) -> str:
        """
        Store one message.

        @return: its path in C{new/}.
        @raise OSError: it could not be written.
        """
        self.prepare()
        now = self._clock.seconds()
        name = (f"{int(now)}.M{int(now * 1e6) % 1000000:06d}P{os.getpid()}"
                f"Q{next(self._serial)}.{socket.gethostname()}")
        temporary = os.path.join(self.path, "tmp", name)
        final = os.path.join(self.path, "new", name)
        with open(temporary, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.rename(temporary, final)
        fsync_directory(os.path.dirname(final))
        return final

    def messages(self) -> list:
        """The paths in C{new/}, oldest first."""
        new = os.path.join(self.path, "new")
        return [os.path.join(new, name) for name in sorted(
            os.listdir(new), key=written_at)]


def written_at(path: str) -> float:
    """When a file named by L{Maildir.write} was written (reactor time)."""
    name = os.path.basename(path)
    seconds, _, rest = name.partition(".")
    micro = rest[1:7] if rest.startswith("M") else "0"
    try:
        return int(seconds) + int(micro) / 1e6
    except ValueError:
        return 0.0


class Spool:
    """
    Where messages wait until delivered: a maildir at C{path}, and the
    maildir C{path/failed} for those given up on.
    """

    def __init__(self, path: str, clock: IReactorTime) -> None:
        self.waiting = Maildir(path, clock)
        self.failed = Maildir(os.path.join(path, "failed"), clock)
        self.path = self.waiting.path

    def prepare(self) -> None:
        """
        @raise OSError: the spool cannot be created.
        """
        self.waiting.prepare()
        self.failed.prepare()

    def add(self, data: bytes) -> str:
        """
        @return: the path of the stored message.
        @raise OSError: it could not be stored.
        """
        return self.waiting.write(data)

    def remove(self, path: str) -> None:
        """A message was delivered; it need wait no more."""
        os.unlink(path)
        fsync_directory(os.path.dirname(path))

    def give_up(self, path: Optional[str], data: bytes) -> str:
        """
        Move a message that will never be delivered to C{failed/}; one that
        never made it into the spool is written there.

        @return: its path in C{failed/}.
        @raise OSError: it could not be stored there.
        """
        if path is None:
            return self.failed.write(data)
        self.failed.prepare()
        final = os.path.join(self.failed.path, "new", os.path.basename(path))
        os.rename(path, final)
        fsync_directory(os.path.dirname(final))
        return final
