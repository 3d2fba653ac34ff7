"""
Messages on disk: maildirs written safely (in C{tmp/}, fsynced, renamed into
C{new/}), the spool every message waits in until the mail server took it,
and beside it C{failed/} for those it never will, C{unconfirmed/} for those
a server probably took without saying so, and C{bad/} for entries that are
no message failnozzle can send.

Each message is a plain RFC 5322 file, so any mail tool can read what is
waiting or what failed.  Everything written here, and by the state file
(L{open_private}, L{write_private}, L{make_private_dirs}), is private to
failnozzle's user: files 0600 and the directories it creates 0700, whatever
the umask.
"""
from __future__ import annotations

import itertools
import os
import socket
import stat
from typing import IO, TYPE_CHECKING, BinaryIO, Optional

if TYPE_CHECKING:
    # Only named: the config's silences use this module's file helpers,
    # and failnozzle-send reads the config without Twisted.
    from twisted.internet.interfaces import IReactorTime

PRIVATE_FILE = 0o600
PRIVATE_DIRECTORY = 0o700


def _private_opener(path: str, flags: int) -> int:
    descriptor = os.open(path, flags | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        # The umask may have taken bits away from the mode, or the file was
        # there before with a wider one.
        os.fchmod(descriptor, PRIVATE_FILE)
    except OSError:
        os.close(descriptor)
        raise
    return descriptor


def open_private(path: str, mode: str = "wb", **options) -> IO:
    """
    C{open(path, mode, **options)} for writing, the file being 0600 whatever
    the umask, and made so if it was there before with another mode.
    """
    return open(path, mode, opener=_private_opener, **options)


def make_private_dirs(path: str) -> None:
    """
    C{os.makedirs(path, exist_ok=True)}, each directory it creates being
    0700 whatever the umask; those there before are left as they are.
    """
    parent = os.path.dirname(path)
    if parent and parent != path and not os.path.exists(parent):
        make_private_dirs(parent)
    try:
        os.mkdir(path, PRIVATE_DIRECTORY)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return
    os.chmod(path, PRIVATE_DIRECTORY)


def fsync_directory(path: str) -> None:
    """Make a rename or unlink in C{path} survive a power cut."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_private(path: str, data: bytes,
                  size: Optional[int] = None) -> None:
    """
    Create the file C{path}, 0600 whatever the umask, write C{data}, make
    it C{size} bytes long if given (the rest read as zeros, its blocks
    reserved where the file system can, so writing there later cannot
    find the disk full), and fsync it (blocking: for the disk writer), in
    as few system calls as that takes: no buffering layer, one write for
    most files.  It must not exist: nothing there before, a link or a file
    with a wider mode, is written through.

    @raise FileExistsError: something is at C{path}.
    """
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                         | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        # The umask may have taken bits away from the mode.
        os.fchmod(descriptor, PRIVATE_FILE)
        write_at(descriptor, data, 0)
        if size is not None:
            try:
                os.posix_fallocate(descriptor, 0, size)
            except (OSError, AttributeError):  # AttributeError: macOS
                os.ftruncate(descriptor, size)  # a hole, at least
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_at(descriptor: int, data: bytes, offset: int) -> None:
    """Write all of C{data} at C{offset} of the file open as
    C{descriptor}, however many calls that takes."""
    with memoryview(data) as view:
        written = 0
        while written < len(view):
            written += os.pwrite(descriptor, view[written:],
                                 offset + written)


def replace_file(path: str, data: bytes, size: Optional[int] = None) -> None:
    """
    Replace the file at C{path} with C{data} (made C{size} bytes long if
    given, as by L{write_private}), whole or not at all, and so
    that a power cut keeps it: a private temporary file, fsynced, renamed
    over it, then the directory fsynced (blocking: for the disk writer).
    """
    temporary = f"{path}.tmp"
    try:
        write_private(temporary, data, size)
    except FileExistsError:
        # Left by a run that stopped between writing it and renaming it.
        os.unlink(temporary)
        write_private(temporary, data, size)
    os.replace(temporary, path)
    fsync_directory(os.path.dirname(os.path.abspath(path)))


def move_aside(path: str) -> str:
    """
    Move an unusable file out of the way, beside it, named for when it was
    last written (C{.bad-<time>}).

    @return: where it is now, or what kept it there.
    """
    try:
        aside = f"{path}.bad-{int(os.lstat(path).st_mtime)}"
        os.replace(path, aside)
    except OSError as failure:
        return f"nowhere ({failure.strerror})"
    return aside


class BadEntry(Exception):
    """A spool entry that cannot be a message: says what it is instead."""


_FILE_TYPES = [(stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
               (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device")]


def _check_regular(mode: int) -> None:
    """@raise BadEntry: C{mode} is not that of a regular file."""
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_TYPES if test(mode)),
                    "not a regular file")
        raise BadEntry(kind)


def open_regular(path: str) -> BinaryIO:
    """
    Open for reading what is at C{path} only if it is a regular file: a
    FIFO would block, a device never end, and a symbolic link is not
    followed.

    @raise BadEntry: it is not a regular file.
    @raise OSError: it cannot be opened.
    """
    _check_regular(os.lstat(path).st_mode)
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW
                         | os.O_CLOEXEC)
    opened = open(descriptor, "rb")
    try:
        # Checked again on what was opened, in case it was swapped meanwhile.
        _check_regular(os.fstat(descriptor).st_mode)
    except BaseException:
        opened.close()
        raise
    return opened


def read_entry(path: str, limit: int) -> tuple:
    """
    Read what may be a message, safely whatever is at C{path} (see
    L{open_regular}); a huge file costs at most C{limit} bytes.

    @return: C{(data, size)}: at most the first C{limit} bytes, and the
        file's size.
    @raise BadEntry: it is not a regular file.
    @raise OSError: it cannot be read.
    """
    with open_regular(path) as stored:
        return stored.read(limit), os.fstat(stored.fileno()).st_size


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
            make_private_dirs(os.path.join(self.path, sub))

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
        write_private(temporary, data)
        os.rename(temporary, final)
        fsync_directory(os.path.dirname(final))
        return final

    def take(self, path: str) -> str:
        """
        Move the message at C{path} (in another maildir of the same file
        system) into this one's C{new/}, under the same name.

        @return: its new path.
        @raise OSError: it could not be moved.
        """
        self.prepare()
        final = os.path.join(self.path, "new", os.path.basename(path))
        os.rename(path, final)
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
    Where messages wait until delivered: a maildir at C{path}, and beside
    them the maildirs C{path/failed} for those given up on and
    C{path/unconfirmed} for those probably delivered, and the folder
    C{path/bad} for entries that were no message to send.
    """

    def __init__(self, path: str, clock: IReactorTime) -> None:
        self.waiting = Maildir(path, clock)
        self.failed = Maildir(os.path.join(path, "failed"), clock)
        self.unconfirmed = Maildir(os.path.join(path, "unconfirmed"), clock)
        self.path = self.waiting.path
        self.bad = os.path.join(self.path, "bad")

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
        return self._keep(self.failed, path, data)

    def set_unconfirmed(self, path: Optional[str], data: bytes) -> str:
        """
        Move a message a server probably took, without ever saying so, to
        C{unconfirmed/}.

        @return: its path there.
        @raise OSError: it could not be stored there.
        """
        return self._keep(self.unconfirmed, path, data)

    @staticmethod
    def _keep(maildir: Maildir, path: Optional[str], data: bytes) -> str:
        if path is None:
            return maildir.write(data)
        kept = maildir.take(path)
        # Dated when it was moved there (a rename keeps the old date).
        os.utime(kept)
        return kept

    def set_aside(self, path: str) -> str:
        """
        Move an entry of C{new/} that is no message to send, whatever it is
        (a FIFO, a directory, a file with no recipients), into C{bad/},
        where it does nothing until someone looks.

        @return: its path there.
        @raise OSError: it could not be moved.
        """
        make_private_dirs(self.bad)
        name = os.path.basename(path)
        final = os.path.join(self.bad, name)
        for number in itertools.count(1):
            if not os.path.lexists(final):
                break
            final = os.path.join(self.bad, f"{name}.{number}")
        os.rename(path, final)
        fsync_directory(self.bad)
        return final
