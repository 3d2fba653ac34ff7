"""
Tests for L{failnozzle.writer}: the one thread every disk write runs in,
and its inline stand-in for tests.
"""
import threading

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from failnozzle.writer import DiskWriter, InlineWriter
from tests.common import bounded


class DiskWriterTests(TestCase):
    """
    Writes run in one thread that is not the reactor's, one at a time, in
    the order asked for; stopping waits for them.
    """

    def writer(self) -> DiskWriter:
        writer = DiskWriter(reactor)
        writer.startService()
        self.addCleanup(writer.stopService)
        return writer

    @defer.inlineCallbacks
    def test_one_thread_in_order(self):
        """
        Each write runs in the same thread, not the reactor's, after those
        asked for before it, and its Deferred fires with its result.
        """
        writer = self.writer()
        done = []
        results = yield bounded(defer.gatherResults([
            writer.run(lambda n=n: done.append(
                (n, threading.current_thread())) or n)
            for n in range(50)]))
        self.assertEqual(results, list(range(50)))
        self.assertEqual([n for n, _ in done], list(range(50)))
        threads = {thread for _, thread in done}
        self.assertEqual(len(threads), 1)
        self.assertIsNot(threads.pop(), threading.current_thread())

    @defer.inlineCallbacks
    def test_failure(self):
        """
        A write that raises fails its Deferred with that error, and the
        writes after it still run.
        """
        writer = self.writer()

        def broken():
            raise OSError(28, "No space left on device")

        failed = writer.run(broken)
        after = writer.run(lambda: "after")
        with self.assertRaises(OSError):
            yield bounded(failed)
        self.assertEqual((yield bounded(after)), "after")

    @defer.inlineCallbacks
    def test_stop_waits_for_writes(self):
        """
        Stopping fires only once every write asked for before it is done,
        however long the writes take.
        """
        writer = DiskWriter(reactor)
        writer.startService()
        release = threading.Event()
        done = []
        writer.run(lambda: release.wait(10) and done.append("slow"))
        writer.run(done.append, "queued")
        stopped = writer.stopService()
        self.assertNoResult(stopped)
        release.set()
        yield bounded(stopped)
        self.assertEqual(done, ["slow", "queued"])

    @defer.inlineCallbacks
    def test_after_stop_runs_inline(self):
        """
        A write asked for once the writer is stopped runs at once, in the
        caller's thread: it is not dropped.
        """
        writer = DiskWriter(reactor)
        writer.startService()
        yield bounded(writer.stopService())
        where = []
        result = writer.run(lambda: where.append(threading.current_thread()))
        self.assertEqual(where, [threading.current_thread()])
        self.successResultOf(result)

    @defer.inlineCallbacks
    def test_stop_without_start(self):
        """
        Writes asked for before a start that never came still run when
        the writer is stopped.
        """
        writer = DiskWriter(reactor)
        done = []
        writer.run(done.append, "early")
        yield bounded(writer.stopService())
        self.assertEqual(done, ["early"])


class InlineWriterTests(SynchronousTestCase):
    """
    The stand-in for tests driven by a fake clock.
    """

    def test_runs_at_once(self):
        """
        A write runs before run() returns; its result or its error is in
        the Deferred.
        """
        writer = InlineWriter()
        writer.startService()
        self.assertEqual(self.successResultOf(writer.run(len, "abc")), 3)
        self.failureResultOf(writer.run(int, "x"), ValueError)
        writer.stopService()
        self.assertEqual(self.successResultOf(writer.run(len, "ab")), 2)
