"""
Tests for L{failnozzle.spool}: private files and directories whatever the
umask, entries read back safely whatever they are, and where messages go.
"""
import os
import socket
import stat
import tempfile

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from failnozzle.spool import (BadEntry, Maildir, Spool, make_private_dirs,
                              open_private, read_entry, replace_file,
                              write_private)


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


class UmaskTestCase(SynchronousTestCase):
    """Runs each test with the given umask, the widest one: 000."""

    umask = 0o000

    def setUp(self):
        previous = os.umask(self.umask)
        self.addCleanup(os.umask, previous)


class PrivateFilesTests(UmaskTestCase):
    """
    What failnozzle writes is 0600, the directories it creates 0700, with
    the umask at 000.
    """

    def test_open_private(self):
        """
        A new file is 0600, in binary and text modes, and a file there
        before with a wider mode is made 0600 by being written.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        for name, mode, options in [("a", "wb", {}), ("b", "x", {}),
                                    ("c", "a", {"encoding": "utf-8"})]:
            path = os.path.join(directory, name)
            with open_private(path, mode, **options) as out:
                out.write(b"x" if "b" in mode else "x")
            self.assertEqual(mode_of(path), 0o600, mode)
        wide = os.path.join(directory, "wide")
        with open(wide, "w"):
            pass
        os.chmod(wide, 0o644)
        with open_private(wide, "a") as out:
            out.write("more")
        self.assertEqual(mode_of(wide), 0o600)

    def test_make_private_dirs(self):
        """
        Every directory created is 0700; one that was there before keeps
        its mode.
        """
        top = os.path.abspath(self.mktemp())
        os.mkdir(top)
        os.chmod(top, 0o755)
        deep = os.path.join(top, "a", "b", "c")
        make_private_dirs(deep)
        make_private_dirs(deep)
        for path in (os.path.join(top, "a"), os.path.join(top, "a", "b"),
                     deep):
            self.assertEqual(mode_of(path), 0o700, path)
        self.assertEqual(mode_of(top), 0o755)

    def test_make_private_dirs_not_a_directory(self):
        """
        A regular file in the way fails as os.makedirs does.
        """
        blocker = self.mktemp()
        with open(blocker, "w"):
            pass
        error = self.assertRaises(OSError, make_private_dirs,
                                  os.path.join(blocker, "spool", "new"))
        self.assertEqual(error.strerror, "Not a directory")

    def test_everything_the_spool_writes(self):
        """
        The spool, failed/, unconfirmed/, bad/ and a maildir: each
        directory 0700, each message 0600.
        """
        clock = Clock()
        spool = Spool(self.mktemp(), clock)
        spool.prepare()
        delivered = Maildir(self.mktemp(), clock).write(b"Subject: x\n\nx\n")
        files = [delivered,
                 spool.give_up(spool.add(b"Subject: 1\n\n1\n"), b""),
                 spool.give_up(None, b"Subject: 2\n\n2\n"),
                 spool.set_unconfirmed(spool.add(b"Subject: 3\n\n3\n"), b""),
                 spool.set_aside(spool.add(b"junk"))]
        for path in files:
            self.assertEqual(mode_of(path), 0o600, path)
        directories = [os.path.dirname(delivered), spool.bad]
        for maildir in (spool.waiting, spool.failed, spool.unconfirmed):
            directories += [os.path.join(maildir.path, sub)
                            for sub in ("tmp", "new", "cur")]
        for path in directories:
            self.assertEqual(mode_of(path), 0o700, path)


class WritePrivateTests(UmaskTestCase):
    """
    L{write_private}, which every snapshot and message is written with, and
    L{replace_file} over it.
    """

    def setUp(self):
        super().setUp()
        self.directory = self.mktemp()
        os.mkdir(self.directory)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def test_new_file(self):
        """
        The file holds the data whole, 0600 with the umask at 000 or at
        277 (which would leave it unwritable, 0400).
        """
        data = bytes(range(256)) * 4096
        write_private(self.path("wide"), data)
        os.umask(0o277)
        write_private(self.path("narrow"), b"")
        with open(self.path("wide"), "rb") as written:
            self.assertEqual(written.read(), data)
        self.assertEqual(mode_of(self.path("wide")), 0o600)
        self.assertEqual(mode_of(self.path("narrow")), 0o600)

    def test_never_through_what_is_there(self):
        """
        A file or a link at the path is refused, not written through:
        the file keeps its data and mode, the link's target is untouched.
        """
        with open(self.path("there"), "wb") as out:
            out.write(b"before")
        os.chmod(self.path("there"), 0o644)
        os.symlink(self.path("target"), self.path("link"))
        for name in ("there", "link"):
            self.assertRaises(FileExistsError, write_private,
                              self.path(name), b"after")
        with open(self.path("there"), "rb") as kept:
            self.assertEqual(kept.read(), b"before")
        self.assertEqual(mode_of(self.path("there")), 0o644)
        self.assertFalse(os.path.lexists(self.path("target")))

    def test_replace_file_after_a_crash(self):
        """
        L{replace_file} replaces the file whole, private, even with a
        temporary file or link left where it writes (a crash between
        writing and renaming): that is removed, not written through.
        """
        path = self.path("state")
        with open(path, "wb") as out:
            out.write(b"old")
        os.chmod(path, 0o644)
        os.symlink(self.path("target"), f"{path}.tmp")
        replace_file(path, b"new")
        with open(path, "rb") as replaced:
            self.assertEqual(replaced.read(), b"new")
        self.assertEqual(mode_of(path), 0o600)
        self.assertFalse(os.path.lexists(f"{path}.tmp"))
        self.assertFalse(os.path.lexists(self.path("target")))


class ReadEntryTests(SynchronousTestCase):
    """
    Reading back what is in the spool's new/: only regular files, never
    blocking, never following a link, never more than the limit.
    """

    def setUp(self):
        self.directory = self.mktemp()
        os.mkdir(self.directory)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def test_regular(self):
        """
        A regular file gives its bytes and its size, at most C{limit}
        bytes of it.
        """
        with open(self.path("m"), "wb") as out:
            out.write(b"0123456789")
        self.assertEqual(read_entry(self.path("m"), 100), (b"0123456789", 10))
        self.assertEqual(read_entry(self.path("m"), 4), (b"0123", 10))

    def test_huge_sparse_file(self):
        """
        A file of a terabyte costs only the limit to read.
        """
        with open(self.path("huge"), "wb") as out:
            out.truncate(2 ** 40)
        data, size = read_entry(self.path("huge"), 1000)
        self.assertEqual((len(data), size), (1000, 2 ** 40))

    def assertBad(self, name: str, kind: str):
        error = self.assertRaises(BadEntry, read_entry, self.path(name), 100)
        self.assertEqual(str(error), kind)

    def test_not_regular(self):
        """
        A FIFO (which would block an open for reading), a directory, a
        socket and symbolic links, to a file or nowhere, are each named for
        what they are.
        """
        os.mkfifo(self.path("fifo"))
        os.mkdir(self.path("dir"))
        with open(self.path("target"), "wb") as out:
            out.write(b"Subject: elsewhere\n\nx\n")
        os.symlink(self.path("target"), self.path("link"))
        os.symlink("/nonexistent", self.path("dangling"))
        # A socket's path must be short: bound elsewhere, then moved in.
        with tempfile.TemporaryDirectory() as short:
            with socket.socket(socket.AF_UNIX) as listening:
                listening.bind(os.path.join(short, "s"))
                os.rename(os.path.join(short, "s"), self.path("socket"))
        self.assertBad("fifo", "a FIFO")
        self.assertBad("dir", "a directory")
        self.assertBad("link", "a symbolic link")
        self.assertBad("dangling", "a symbolic link")
        self.assertBad("socket", "a socket")

    def test_vanished(self):
        """
        An entry gone meanwhile is an OSError.
        """
        self.assertRaises(FileNotFoundError, read_entry, self.path("gone"),
                          100)


class SpoolTests(SynchronousTestCase):
    """
    Where a message goes once it needs no more trying.
    """

    def setUp(self):
        self.spool = Spool(self.mktemp(), Clock())
        self.spool.prepare()

    def test_set_aside_keeps_names_apart(self):
        """
        Entries of the same name set aside one after the other are all
        kept in bad/, under distinct names.
        """
        kept = []
        for content in (b"one", b"two", b"three"):
            path = os.path.join(self.spool.path, "new", "odd")
            with open(path, "wb") as out:
                out.write(content)
            kept.append(self.spool.set_aside(path))
        self.assertEqual([os.path.basename(path) for path in kept],
                         ["odd", "odd.1", "odd.2"])
        for path, content in zip(kept, (b"one", b"two", b"three")):
            with open(path, "rb") as stored:
                self.assertEqual(stored.read(), content)
        self.assertEqual(self.spool.waiting.messages(), [])

    def test_set_aside_fifo(self):
        """
        A FIFO is moved aside as it is, without being opened.
        """
        path = os.path.join(self.spool.path, "new", "fifo")
        os.mkfifo(path)
        aside = self.spool.set_aside(path)
        self.assertTrue(stat.S_ISFIFO(os.lstat(aside).st_mode))

    def test_unconfirmed(self):
        """
        A message probably delivered moves to unconfirmed/new under its
        name; one that never was in the spool is written there.
        """
        path = self.spool.add(b"Subject: s\n\nb\n")
        moved = self.spool.set_unconfirmed(path, b"")
        self.assertEqual(moved, os.path.join(
            self.spool.path, "unconfirmed", "new", os.path.basename(path)))
        written = self.spool.set_unconfirmed(None, b"Subject: t\n\nb\n")
        self.assertEqual(sorted(self.spool.unconfirmed.messages()),
                         sorted([moved, written]))
        self.assertEqual(self.spool.waiting.messages(), [])
