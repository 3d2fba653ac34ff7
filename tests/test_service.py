"""
Tests for L{failnozzle.service}: the flush loop, routing, the pager and a
clean stop, over a fake reactor and a fake mail transport.
"""
import gc
import glob
import gzip
import json
import os
import signal
import socket
import zlib

from twisted.internet import defer
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import _ISupportsExitSignalCapturing
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import directlyProvides

from failnozzle.config import ConfigError, DEFAULT_MONITORING_ERROR_MARKERS
from failnozzle.transport import MaildirTransport, SMTPTransport
from failnozzle.service import FailnozzleService, make_transport
from failnozzle.state import StateFile
from failnozzle.steps import in_slices, run_at_once
from tests.common import (FakeMailTransport, HeldWriter, Turns, digest_total,
                          make_settings, record, word)

MARKER = DEFAULT_MONITORING_ERROR_MARKERS[0]


def long_error(number: int) -> dict:
    """
    One of a family of errors that differ only past 50 characters of their
    message and in the middle of their 4,300-character traceback.
    """
    frames = "  File \"app.py\", line 1, in f\n" * 60
    return record("A" * 60 + f" {number}", exc_text=(
        "Traceback (most recent call last):\n" + frames
        + f"  File \"app.py\", line {number}, in g\n" + frames
        + "ValueError: the end\n"))


#: The summary line of the L{long_error}s, after the count, once cut to
#: MAX_FIELD_CHARS = 50.
#: The summary line of the error of LONG_ERRORS, new in its digest.
LONG_ERRORS_CUT = f"X {'A' * 49}… (in app, src/app/views.py:50) [new]\n"


class ServiceTestCase(SynchronousTestCase):
    """
    A started service on a L{MemoryReactorClock} with a L{FakeMailTransport}.
    """

    def start(self, **arguments):
        """A service of L{make}, started."""
        self.make(**arguments).startService()
        return self.service

    def make(self, reload_settings=None, wall_offset=lambda: 0.0,
             freeze_heap=lambda: None, in_steps=run_at_once, writer=None,
             **overrides):
        overrides.setdefault("REPORT_FROM", "nozzle@example.com")
        overrides.setdefault("REPORT_TO", "ops@example.com")
        overrides.setdefault("FLUSH_SECONDS", 60)
        overrides.setdefault("SERVER_NAME", "nozzle1")
        for name in ("SPOOL_DIR", "STATE_FILE", "MAILDIR"):
            overrides.setdefault(name, self.mktemp())
        self.reactor = MemoryReactorClock()
        self.transport = FakeMailTransport()
        udp_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(udp_socket.close)
        self.overrides = overrides
        self.service = FailnozzleService(make_settings(**overrides),
                                         self.reactor, udp_socket,
                                         self.transport,
                                         reload_settings=reload_settings,
                                         wall_offset=wall_offset,
                                         freeze_heap=freeze_heap,
                                         in_steps=in_steps, writer=writer)
        return self.service

    def receive(self, *records, sender=("10.1.1.1", 5000)):
        for item in records:
            data = item if isinstance(item, bytes) else json.dumps(
                item).encode()
            self.service.receiver.datagramReceived(data, sender)


class StartTests(ServiceTestCase):
    """
    Starting the service.
    """

    def test_adopts_socket(self):
        """
        The bound socket is handed to the reactor with room for datagrams
        of INCOMING_MESSAGE_MAX_SIZE (and one byte more, to see oversized
        ones).
        """
        self.start(INCOMING_MESSAGE_MAX_SIZE=1000)
        [(_, family, protocol, size)] = self.reactor.adoptedPorts
        self.assertEqual(family, socket.AF_INET)
        self.assertIs(protocol, self.service.receiver)
        self.assertEqual(size, 1001)

    def test_children(self):
        """
        The disk writer, the listeners, the outbox and the timers are
        child services, running while the service runs (the cluster's
        timer only in a cluster) and stopped with it; the first flush is
        one FLUSH_SECONDS after the start, not at once.
        """
        service = self.start()
        self.assertEqual(
            [child.name for child in service],
            ["writer", "listeners", "outbox", "flush", "snapshot",
             "cluster"])
        self.assertEqual(
            [child.name for child in service if child.running],
            ["writer", "listeners", "outbox", "flush", "snapshot"])
        self.assertEqual(service.getServiceNamed("flush").due, 60)
        self.successResultOf(service.stopService())
        self.assertEqual(
            [child.name for child in service if child.running], [])
        self.assertIsNone(service.next_flush)

    def test_stop_asked_while_starting(self):
        """
        Under twistd, from the first step of the start until the reactor
        runs, SIGTERM and SIGINT ask the reactor to stop once it runs,
        however many arrive, instead of killing the half-started process;
        as it begins to run, they are given back as they were, for it to
        take over.
        """
        before = {signum: signal.getsignal(signum)
                  for signum in (signal.SIGTERM, signal.SIGINT)}
        for signum, handler in before.items():
            self.addCleanup(signal.signal, signum, handler)
        service = self.make()
        service.privilegedStartService()
        service.startService()
        self.assertEqual(signal.getsignal(signal.SIGINT),
                         signal.getsignal(signal.SIGTERM))
        called, stops = [], []
        self.reactor.callFromThread = lambda *call: called.append(call)

        def stop():
            if stops:
                raise ReactorNotRunning()
            stops.append("stop")
        self.reactor.stop = stop
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
            signal.getsignal(signum)(signum, None)
        self.assertEqual(stops, [])  # not in the handler itself
        events = EventLoggingObserver.createWithCleanup(
            self, globalLogPublisher)
        directlyProvides(self.reactor, _ISupportsExitSignalCapturing)
        for function, *args in called:  # the reactor's first turn
            function(*args)
        self.assertEqual(stops, ["stop"])
        self.assertEqual([formatEvent(event) for event in events],
                         ["Received SIGTERM, shutting down."])
        # twistd ends the process by it, as after Twisted's own handler.
        self.assertEqual(self.reactor._exitSignal, signal.SIGTERM)
        for function, args, _ in self.reactor.triggers["before"]["startup"]:
            function(*args)
        self.assertEqual({signum: signal.getsignal(signum)
                          for signum in before}, before)

    def test_signals_left_to_a_running_reactor(self):
        """
        A start while the reactor already runs leaves SIGTERM and SIGINT
        to it.
        """
        before = signal.getsignal(signal.SIGTERM)
        service = self.make()
        self.reactor.running = True
        service.privilegedStartService()
        self.assertEqual(signal.getsignal(signal.SIGTERM), before)

    def test_logs_where(self):
        """
        Start-up says where errors are received and where digests go.
        """
        events = EventLoggingObserver.createWithCleanup(self,
                                                        globalLogPublisher)
        self.start()
        [event] = [e for e in events if "listening" in e["log_format"]]
        self.assertEqual(event["transport"], "fake transport")
        self.assertEqual(event["seconds"], 60)


class FlushLoopTests(ServiceTestCase):
    """
    The LoopingCall that flushes every FLUSH_SECONDS.
    """

    def test_flush_every_period(self):
        """
        A digest goes out after FLUSH_SECONDS, not before, and only when
        something arrived.
        """
        self.start(FLUSH_SECONDS=10, REPEAT_SECONDS=0)
        self.receive(record("boom"))
        self.reactor.advance(9.9)
        self.assertEqual(self.transport.pending, [])
        self.reactor.advance(0.1)
        self.assertEqual(len(self.transport.pending), 1)
        self.transport.succeed_all()
        self.reactor.advance(10)
        self.assertEqual(len(self.transport.pending), 1)
        self.receive(record("boom"))
        self.reactor.advance(10)
        self.assertEqual(len(self.transport.pending), 2)

    def test_flush_holds_collector(self):
        """
        The garbage collector is off while a flush drains and routes the
        buffer, and on again once it is over, even if the flush failed.
        """
        self.addCleanup(gc.enable if gc.isenabled() else gc.disable)
        gc.enable()
        self.start(FLUSH_SECONDS=10)
        collecting = []
        drain = self.service.aggregator.flush

        def drained():
            collecting.append(gc.isenabled())
            return drain()

        self.service.aggregator.flush = drained
        self.receive(record("boom"))
        self.reactor.advance(10)
        self.assertEqual((collecting, gc.isenabled()), ([False], True))

        def broken():
            raise RuntimeError("drain failed")

        self.service.aggregator.flush = broken
        self.assertRaises(RuntimeError, self.service.flush)
        self.assertTrue(gc.isenabled())

    def test_flush_does_not_wait_for_mail(self):
        """
        A delivery still in flight does not delay the next flush: the
        other recipient class gets its digest on time.
        """
        self.start(FLUSH_SECONDS=10,
                   JUST_MONITORING_REPORT_TO="canary@example.com")
        self.receive(record("one"))
        self.reactor.advance(10)
        self.receive(record(f"canary {MARKER}"))
        self.reactor.advance(10)
        self.assertEqual(len(self.transport.by_kind("digest")), 1)
        self.assertEqual(len(self.transport.by_kind("monitoring")), 1)
        self.assertFalse(any(d.called for *_, d in self.transport.pending))

    def test_undelivered_digest_holds_errors(self):
        """
        While a recipient class's digest is undelivered, its new errors are
        held instead of becoming one more digest per flush; once it is
        delivered, one digest covers everything since, with the right
        counts per source and first and last seen.
        """
        self.start(FLUSH_SECONDS=10, REPEAT_SECONDS=0)
        self.receive(record("one"))
        self.reactor.advance(10)
        for _ in range(5):
            self.reactor.advance(1)
            self.receive(record("two", source="web1"),
                         record("one", source="web2"))
            self.reactor.advance(9)
        self.assertEqual(len(self.transport.pending), 1)
        self.transport.succeed_all()
        self.reactor.advance(10)
        [_, (_, _, covering)] = self.transport.by_kind("digest")
        body = covering.get_content()
        self.assertIn("** 10 instances of 2 unique errors (app) **", body)
        self.assertIn("Seen between 1970-01-01 00:00:11 UTC to "
                      "1970-01-01 00:00:51 UTC\n- on web1, 5X\n", body)
        self.assertIn("- on web2, 5X\n", body)

    def test_wall_clock_times(self):
        """
        Times people read (the Date header, first and last seen) are in
        wall-clock time: the reactor's, moved by the offset of the wall
        clock (as after an NTP step).
        """
        self.start(FLUSH_SECONDS=10, wall_offset=lambda: -3600.0)
        self.reactor.advance(7200)
        self.receive(record("one"))
        self.reactor.advance(10)
        [(_, _, message)] = self.transport.by_kind("digest")
        self.assertEqual(message["Date"], "Thu, 01 Jan 1970 01:00:10 +0000")
        self.assertIn("Seen between 1970-01-01 01:00:00 UTC to "
                      "1970-01-01 01:00:00 UTC", message.get_content())

    def test_failing_flush_keeps_loop(self):
        """
        An exception in one flush is logged and the loop goes on; the
        errors of the failed flush are in the next digest.
        """
        self.start(FLUSH_SECONDS=10)

        def broken(batch, **options):
            raise RuntimeError("render exploded")

        self.service.renderer.making = broken
        self.receive(record("one"))
        self.reactor.advance(10)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        del self.service.renderer.making
        self.receive(record("two"))
        self.reactor.advance(10)
        [(_, _, message)] = self.transport.by_kind("digest")
        self.assertIn("** 2 instances of 2 unique errors (app) **",
                      message.get_content())

    def test_failing_partition_gives_batch_back(self):
        """
        A flush that fails before any digest is made counts its errors in
        again, for the next flush.
        """
        self.start(FLUSH_SECONDS=10)

        def broken(entry):
            raise RuntimeError("filter exploded")

        self.service._is_monitoring = broken
        self.receive(record("one"))
        self.reactor.advance(10)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.transport.pending, [])
        self.service._is_monitoring = lambda entry: False
        self.receive(record("two"))
        self.reactor.advance(10)
        [(_, _, message)] = self.transport.by_kind("digest")
        self.assertIn("** 2 instances of 2 unique errors (app) **",
                      message.get_content())

    def test_failing_snapshot_keeps_loop(self):
        """
        An exception while taking a snapshot is logged and the snapshot
        loop goes on.
        """
        self.start(SNAPSHOT_SECONDS=1, FLUSH_SECONDS=3600)
        calls = []

        def broken():
            calls.append(1)
            raise RuntimeError("snapshot exploded")

        self.service.save_state = broken
        for _ in range(3):
            self.receive(record("one"))
            self.reactor.advance(1)
        self.assertEqual(len(calls), 3)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 3)

    def test_digest_message(self):
        """
        The digest is addressed as configured and dated by the reactor.
        """
        self.start(REPORT_TO=["a@example.com", "b@example.com"],
                   REPLY_TO="r@example.com", FLUSH_SECONDS=10)
        self.reactor.advance(1000)
        self.receive(record("boom"), record("boom", source="host2"))
        self.reactor.advance(10)
        [(sender, recipients, message)] = self.transport.by_kind("digest")
        self.assertEqual(sender, "nozzle@example.com")
        self.assertEqual(recipients, ("a@example.com", "b@example.com"))
        self.assertEqual(message["Reply-To"], "r@example.com")
        self.assertEqual(message["Subject"],
                         "[nozzle1] 1 new: Error: boom in views (2 total)")
        self.assertEqual(message["Date"].datetime.timestamp(), 1010)

    def test_bad_input_in_digest(self):
        """
        Bad datagrams are reported in the same digest as the good ones,
        which are all counted.
        """
        self.start(FLUSH_SECONDS=10)
        self.receive(record("boom"), b"not json", b"[1, 2]",
                     record("boom"), b"\xff\xfe")
        self.reactor.advance(10)
        [(_, _, message)] = self.transport.by_kind("digest")
        body = message.get_content()
        self.assertIn("2X boom (in app, src/app/views.py:50)", body)
        self.assertIn("1X Internal error: datagram is not valid JSON", body)
        self.assertIn("1X Internal error: datagram is JSON but not an object",
                      body)
        self.assertIn("1X Internal error: datagram is not valid UTF-8", body)


class DigestLimitTests(ServiceTestCase):
    """
    DIGEST_MAX_BYTES and DIGEST_MAX_DETAILS reach the digests.
    """

    def test_digest_max_bytes(self):
        """
        A digest of errors larger in all than DIGEST_MAX_BYTES is made to
        fit, its totals exact.
        """
        self.start(DIGEST_MAX_BYTES=20_000)
        self.receive(*(record(f"boom {word(n)}",
                              exc_text=f"line {word(n)}\n" * 600)
                       for n in range(30)))
        self.service.flush()
        [(_, _, message)] = self.transport.by_kind("digest")
        self.assertLessEqual(len(message.as_bytes()), 20_000)
        self.assertIn("** 30 instances of 30 unique errors (app) **",
                      message.get_content())

    def test_custom_template_every_error(self):
        """
        With DIGEST_MAX_DETAILS unset, a custom body template gets every
        error; set, it gets that many.
        """
        templates = self.mktemp()
        os.makedirs(templates)
        with open(os.path.join(templates, "body.txt"), "w") as out:
            out.write("{{ sorted_counts | length }} listed")
        for details, listed in ((None, 120), (7, 7)):
            self.start(EMAIL_TEMPLATE_DIR=templates,
                       EMAIL_BODY_TEMPLATE="body.txt",
                       DIGEST_MAX_DETAILS=details)
            self.receive(*(record(f"boom {word(n)}") for n in range(120)))
            self.service.flush()
            [(_, _, message)] = self.transport.by_kind("digest")
            self.assertEqual(message.get_content(), f"{listed} listed\n")


class GroupingTests(ServiceTestCase):
    """
    GROUPING, FINGERPRINT_FUNC and UNIQUE_MSG_TUPLE's fields, in digests.
    """

    def test_folded(self):
        """
        Reports of one bug are one entry, showing the latest and what
        varied.
        """
        self.start()
        self.receive(*(record(f"lookup failed for user {user}")
                       for user in (17, 42, 99, 5)))
        self.service.flush()
        [(_, _, message)] = self.transport.by_kind("digest")
        body = message.get_content()
        self.assertIn("** 4 instances of 1 unique error (app) **", body)
        self.assertIn("4X lookup failed for user 5 (in app", body)
        self.assertIn("Folded in: 4 variants, such as 17; 42; 99\n", body)

    def test_exact(self):
        """GROUPING = 'exact' keeps byte-identical reports together only."""
        self.start(GROUPING="exact")
        self.receive(*(record(f"lookup failed for user {user}")
                       for user in (17, 42)))
        self.service.flush()
        [(_, _, message)] = self.transport.by_kind("digest")
        body = message.get_content()
        self.assertIn("** 2 instances of 2 unique errors (app) **", body)
        self.assertNotIn("Folded in", body)

    def test_fingerprint_func(self):
        """FINGERPRINT_FUNC groups by what it says, past the key."""
        self.start(FINGERPRINT_FUNC=lambda record: record.get("ticket"))
        self.receive(record("one", ticket="T-1"), record("two", ticket="T-1"),
                     record("one", ticket="T-2"))
        self.service.flush()
        [(_, _, message)] = self.transport.by_kind("digest")
        self.assertIn("** 3 instances of 2 unique errors (app) **",
                      message.get_content())

    def test_grouping_rules(self):
        self.start(GROUPING_RULES=[(r"tenant \S+", "tenant <tenant>")])
        self.receive(record("tenant acme failed"),
                     record("tenant initech failed"))
        self.service.flush()
        [(_, _, message)] = self.transport.by_kind("digest")
        self.assertIn("2 instances of 1 unique error",
                      message.get_content())

    def test_misspelt_field_warned_once(self):
        """
        Custom fields of UNIQUE_MSG_TUPLE that no error carries are warned
        of once, in one line; a custom field some errors carry is not, nor
        a default one (a sender may have no module).
        """
        events = EventLoggingObserver.createWithCleanup(self,
                                                        globalLogPublisher)
        self.start(UNIQUE_MSG_TUPLE=["message", "kind", "team", "exc_txt",
                                     "modul", "module"])
        self.receive(record("one", team="billing", module=None),
                     record("two", module=None))
        self.service.flush()
        self.receive(record("three"))
        self.service.flush()
        warned = [formatEvent(event) for event in events
                  if "UNIQUE_MSG_TUPLE" in formatEvent(event)]
        self.assertEqual(warned, [
            "UNIQUE_MSG_TUPLE names 'exc_txt', 'modul', which none of the 2 "
            "errors received carries: misspelt?"])


class NewsTests(ServiceTestCase):
    """
    Each error of a digest is told as new, back or ongoing, from the
    seen-memory, which outlives the service.
    """

    def digest(self):
        """The body of the digest a flush sends now, delivered."""
        self.service.flush()
        self.transport.succeed_all()
        return self.transport.by_kind("digest")[-1][2].get_content()

    def test_new_then_ongoing(self):
        self.start(REPEAT_SECONDS=0)
        self.receive(record("lookup failed for user 17"))
        first = self.digest()
        self.assertIn("** 1 instance of 1 unique error (app) **\n1 new\n",
                      first)
        self.assertIn("1X lookup failed for user 17 (in app, "
                      "src/app/views.py:50) [new]\n", first)
        self.reactor.advance(30)
        self.receive(record("lookup failed for user 42"), record("other"))
        second = self.digest()
        self.assertIn("\n1 new, 1 ongoing\n", second)
        summary = second.split("Summary:\n========\n")[1].split("\n\n")[0]
        self.assertEqual(summary.splitlines(), [
            "1X other (in app, src/app/views.py:50) [new]",
            "1X lookup failed for user 42 (in app, src/app/views.py:50)"])
        self.assertIn("Ongoing since 1970-01-01 00:00:00 UTC (2 in all)",
                      second)

    def test_back(self):
        """Quiet for REGRESSION_DAYS, an error is back, with how long."""
        self.start(REGRESSION_DAYS=1, REPEAT_SECONDS=0)
        self.receive(record("boom"))
        self.digest()
        self.reactor.advance(3 * 24 * 3600)
        self.receive(record("boom"))
        body = self.digest()
        self.assertIn("\n1 back\n", body)
        self.assertIn("1X boom (in app, src/app/views.py:50) [back]", body)
        self.assertIn("Back after 3 days without it (first seen 1970-01-01 "
                      "00:00:00 UTC, 2 in all)", body)

    def test_outlives_restart(self):
        """A new run reads what the last one reported: still ongoing."""
        self.start(REPEAT_SECONDS=0)
        self.receive(record("boom"))
        self.digest()
        state = self.overrides["STATE_FILE"]
        self.service.stopService()
        self.start(STATE_FILE=state, REPEAT_SECONDS=0)
        self.receive(record("boom"))
        self.assertIn("Ongoing since", self.digest())

    def test_exact_grouping(self):
        """With GROUPING = 'exact' errors are remembered by their keys."""
        self.start(GROUPING="exact", REPEAT_SECONDS=0)
        self.receive(record("boom"))
        self.digest()
        self.receive(record("boom"))
        self.assertIn("\n1 ongoing\n", self.digest())


class GroupWaitTests(ServiceTestCase):
    """
    GROUP_WAIT_SECONDS: after a quiet FLUSH_SECONDS the first digest goes
    out soon after its first error, then no more often than every
    FLUSH_SECONDS.
    """

    def digests(self):
        self.transport.succeed_all()
        return len(self.transport.by_kind("digest"))

    def test_first_news_fast(self):
        self.start(GROUP_WAIT_SECONDS=10, FLUSH_SECONDS=60)
        self.reactor.advance(100)
        self.receive(record("boom"))
        self.reactor.advance(9.9)
        self.assertEqual(self.digests(), 0)
        self.receive(record("boom"), record("bang"))
        self.reactor.advance(0.1)
        self.assertEqual(self.digests(), 1, "10 s after the first error")
        self.assertIn("** 3 instances of 2 unique errors",
                      self.transport.by_kind("digest")[0][2].get_content())
        self.receive(record("other"))
        self.reactor.advance(59.9)
        self.assertEqual(self.digests(), 1, "FLUSH_SECONDS after that one")
        self.reactor.advance(0.1)
        self.assertEqual(self.digests(), 2)

    def test_not_within_a_storm(self):
        """Once errors flow, digests go every FLUSH_SECONDS only."""
        self.start(GROUP_WAIT_SECONDS=10, FLUSH_SECONDS=60)
        self.receive(record("boom"))
        self.reactor.advance(10)
        self.assertEqual(self.digests(), 1)
        self.reactor.advance(30)
        self.receive(record("bang"))
        self.reactor.advance(29.9)
        self.assertEqual(self.digests(), 1)
        self.reactor.advance(0.1)
        self.assertEqual(self.digests(), 2)

    def test_flush_sooner(self):
        """When the next flush comes before GROUP_WAIT_SECONDS, it sends."""
        self.start(GROUP_WAIT_SECONDS=10, FLUSH_SECONDS=5)
        self.receive(record("boom"))
        self.reactor.advance(5)
        self.assertEqual(self.digests(), 1)

    def test_off(self):
        self.start(GROUP_WAIT_SECONDS=0, FLUSH_SECONDS=60)
        self.receive(record("boom"))
        self.reactor.advance(59.9)
        self.assertEqual(self.digests(), 0)
        self.reactor.advance(0.1)
        self.assertEqual(self.digests(), 1)


class QuietRepeatTests(ServiceTestCase):
    """
    REPEAT_SECONDS: a persistent error gives one digest per repeat
    interval, not one per flush, and is counted meanwhile.
    """

    def flush(self, *records):
        self.receive(*records)
        self.reactor.advance(60)
        self.transport.succeed_all()
        return [message.get_content() for _, _, message
                in self.transport.by_kind("digest")]

    def test_one_digest_per_repeat(self):
        self.start(REPEAT_SECONDS=600)
        self.assertEqual(len(self.flush(record("boom"))), 1)
        for _ in range(9):
            digests = self.flush(record("boom"), record("boom"))
        self.assertEqual(len(digests), 1, "quiet until 600 s after it")
        digests = self.flush(record("boom"))
        self.assertEqual(len(digests), 2)
        self.assertIn("** 19 instances of 1 unique error (app) **",
                      digests[1])
        self.assertIn("Ongoing since 1970-01-01 00:00:00 UTC (20 in all)",
                      digests[1])

    def test_news_beside_still_happening(self):
        """
        A new error makes a digest; the quiet ongoing one is in a line of
        "still happening", its count exact.
        """
        self.start(REPEAT_SECONDS=600)
        self.flush(record("boom"))
        self.flush(record("boom"), record("boom"))
        digests = self.flush(record("boom"), record("bang"))
        self.assertEqual(len(digests), 2)
        body = digests[1]
        self.assertIn("** 4 instances of 2 unique errors (app) **\n"
                      "1 new, 1 ongoing\n", body)
        self.assertIn("1X bang (in app, src/app/views.py:50) [new]\n\n"
                      "Still happening (listed in full in a recent "
                      "digest):\n3X boom (in app, src/app/views.py:50), "
                      "ongoing since 1970-01-01 00:00:00 UTC\n", body)
        self.assertEqual(body.count("Exception #"), 1)

    def test_rising_is_news(self):
        """A rate RISE_FACTOR times the last one listed makes a digest."""
        self.start(REPEAT_SECONDS=600, RISE_FACTOR=10)
        self.flush(record("boom"))
        self.assertEqual(len(self.flush(*[record("boom")] * 9)), 1)
        digests = self.flush(*[record("boom")] * 20)
        self.assertEqual(len(digests), 2)
        self.assertIn("Exception #1 of 1: 29X boom", digests[1])

    def test_canaries_every_flush(self):
        """Canaries are what shows the pipeline works: never quiet."""
        self.start(REPEAT_SECONDS=600,
                   JUST_MONITORING_REPORT_TO="canary@example.com")
        for _ in range(3):
            self.receive(record(f"{MARKER} ping"))
            self.reactor.advance(60)
            self.transport.succeed_all()
        self.assertEqual(len(self.transport.by_kind("monitoring")), 3)

    def test_restart_within_repeat(self):
        """
        The errors counted quietly outlive a restart, which keeps the
        repeat interval: the digest after it comes when it ends, with
        every instance.
        """
        self.start(REPEAT_SECONDS=600)
        self.flush(record("boom"))
        self.flush(record("boom"))
        state = self.overrides["STATE_FILE"]
        self.service.stopService()
        self.start(REPEAT_SECONDS=600, STATE_FILE=state)
        self.assertEqual(self.flush(record("boom")), [],
                         "still within the interval")
        self.receive(record("boom"))
        self.reactor.advance(600)
        self.transport.succeed_all()
        [(_, _, message)] = self.transport.by_kind("digest")
        self.assertIn("** 3 instances of 1 unique error (app) **",
                      message.get_content())


class OddTextTests(ServiceTestCase):
    """
    Text that is valid JSON but not encodable as UTF-8.
    """

    def test_lone_surrogate(self):
        """
        A report whose message is a lone surrogate (JSON "\\udcff") is
        digested with the other errors of its window, none lost.
        """
        self.start()
        self.receive(b'{"message": "bad \\udcff", "source": "h"}',
                     record("fine"))
        self.service.flush()
        [(_, _, message)] = self.transport.by_kind("digest")
        body = message.get_content()
        self.assertIn("1X bad ?", body)
        self.assertIn("1X fine", body)


class GELFTests(ServiceTestCase):
    """
    GELF on the same port as failnozzle's JSON.
    """

    def gelf(self, **fields):
        message = {"version": "1.1", "host": "web7",
                   "short_message": "disk full", "full_message": "trace",
                   "level": 3, "_kind": "storage"}
        message.update(fields)
        return json.dumps(message).encode()

    def test_plain_and_compressed(self):
        """
        Plain, zlib and gzip GELF are counted as one error, beside a
        failnozzle record, with host as the source, _kind as the kind and
        the most severe level shown.
        """
        self.start()
        self.receive(self.gelf(level=4), zlib.compress(self.gelf()),
                     gzip.compress(self.gelf(level=4)), record("fine"))
        self.service.flush()
        [(_, _, message)] = self.transport.by_kind("digest")
        body = message.get_content()
        self.assertIn("3X disk full (in storage)\n", body)
        self.assertIn("UTC\nLevel: error (3)\n- on web7, 3X", body)
        self.assertIn("1X fine", body)
        self.assertEqual(body.count("Level:"), 1)

    def test_default_kind(self):
        """
        A GELF message that names no kind gets GELF_DEFAULT_KIND.
        """
        self.start(GELF_DEFAULT_KIND="graylog")
        self.receive(self.gelf(_kind=None))
        self.service.flush()
        [(_, _, message)] = self.transport.by_kind("digest")
        self.assertIn("1X disk full (in graylog", message.get_content())

    def test_lost_chunks_reported(self):
        """
        A chunked message whose other chunks never come is reported as bad
        input once it expires, from the host that sent its first chunk.
        """
        self.start()
        first_of_two = b"\x1e\x0f" + b"12345678" + b"\x00\x02" + b'{"ver'
        self.receive(first_of_two, sender=("10.9.9.9", 1234))
        self.reactor.advance(6)
        self.service.flush()
        [(_, _, message)] = self.transport.by_kind("digest")
        body = message.get_content()
        self.assertIn("chunked GELF message never completed", body)
        self.assertIn("- on 10.9.9.9, 1X", body)


class RoutingTests(ServiceTestCase):
    """
    REPORT_TO gets the real errors, JUST_MONITORING_REPORT_TO the canaries.
    """

    def test_split(self):
        """
        Real and monitoring errors go in separate digests to their own
        recipients; a marker counts in message or exc_text.
        """
        self.start(JUST_MONITORING_REPORT_TO="canary@example.com")
        self.receive(record("real"),
                     record(f"canary {MARKER}"),
                     record("other canary", exc_text=f"trace {MARKER}"))
        self.service.flush()
        [(_, to_real, real)] = self.transport.by_kind("digest")
        [(_, to_canary, canary)] = self.transport.by_kind("monitoring")
        self.assertEqual(to_real, ("ops@example.com",))
        self.assertEqual(to_canary, ("canary@example.com",))
        self.assertIn("1 instance of 1 unique error", real.get_content())
        self.assertNotIn(MARKER, real.get_content())
        self.assertIn("2 instances of 2 unique errors", canary.get_content())

    def test_only_monitoring(self):
        """
        A window holding only monitoring errors sends nothing to REPORT_TO.
        """
        self.start(JUST_MONITORING_REPORT_TO="canary@example.com")
        self.receive(record(f"canary {MARKER}"))
        self.service.flush()
        self.assertEqual(self.transport.by_kind("digest"), [])
        self.assertEqual(len(self.transport.by_kind("monitoring")), 1)

    def test_no_address_not_sent(self):
        """
        A class with no address configured is logged and not sent: never
        an empty To:.
        """
        events = EventLoggingObserver.createWithCleanup(self,
                                                        globalLogPublisher)
        self.start()
        self.receive(record(f"canary {MARKER}"), record(f"canary {MARKER}"))
        self.service.flush()
        self.assertEqual(self.transport.pending, [])
        [event] = [e for e in events if e.get("setting")]
        self.assertEqual(event["setting"], "JUST_MONITORING_REPORT_TO")
        self.assertEqual(event["count"], 2)

    def test_custom_markers(self):
        """
        MONITORING_ERROR_MARKERS decides what is a canary.
        """
        self.start(JUST_MONITORING_REPORT_TO="canary@example.com",
                   MONITORING_ERROR_MARKERS=["CANARY"])
        self.receive(record("a CANARY"), record(f"not {MARKER}"))
        self.service.flush()
        [(_, _, canary)] = self.transport.by_kind("monitoring")
        self.assertIn("a CANARY", canary.get_content())
        [(_, _, real)] = self.transport.by_kind("digest")
        self.assertIn(MARKER, real.get_content())


class PagerTests(ServiceTestCase):
    """
    The pager fires when the non-monitoring count over the last
    PAGER_WINDOW_SIZE flushes reaches PAGER_LIMIT.
    """

    def start_pager(self, **overrides):
        options = dict(PAGER_TO="pager@example.com",
                       PAGER_FROM="alarm@example.com",
                       PAGER_REPLY_TO="oncall@example.com",
                       PAGER_WINDOW_SIZE=3, PAGER_LIMIT=5,
                       JUST_MONITORING_REPORT_TO="canary@example.com",
                       FLUSH_SECONDS=10)
        options.update(overrides)
        return self.start(**options)

    def test_alert_over_window(self):
        """
        Counts from several flushes add up; reaching the limit sends one
        alert to PAGER_TO from PAGER_FROM with PAGER_REPLY_TO, naming the
        error and its host; while the rate stays over, no more.
        """
        self.start_pager()
        for count in (2, 2):
            self.receive(*[record("boom")] * count)
            self.reactor.advance(10)
        self.assertEqual(self.transport.by_kind("pager"), [])
        self.receive(record("boom"))
        self.reactor.advance(10)
        [(sender, recipients, alert)] = self.transport.by_kind("pager")
        self.assertEqual(sender, "alarm@example.com")
        self.assertEqual(recipients, ("pager@example.com",))
        self.assertEqual(alert["Reply-To"], "oncall@example.com")
        self.assertEqual(alert["Subject"], "nozzle1 error rate exceeded: "
                                           "5 errors, most Error: boom in "
                                           "views")
        body = alert.get_content()
        self.assertIn("received 5 errors", body)
        self.assertIn("  5X Error: boom in views (app) [new]\n", body)
        self.assertIn("  host1: 5\n", body)
        self.receive(*[record("boom")] * 4)
        self.reactor.advance(10)
        self.assertEqual(len(self.transport.by_kind("pager")), 1)

    def test_remind_then_resolve(self):
        """
        A storm that lasts is paged again every PAGER_REPEAT_SECONDS; once
        the rate has been under the limit for a whole window, "resolved"
        with how long and how many, once.
        """
        self.start_pager(PAGER_REPEAT_SECONDS=60)
        for _ in range(7):
            self.receive(*[record("boom")] * 5)
            self.reactor.advance(10)
        subjects = [alert["Subject"] for _, _, alert
                    in self.transport.by_kind("pager")]
        self.assertEqual(len(subjects), 2, subjects)
        self.assertIn("(still, since", subjects[1])
        for _ in range(6):
            self.reactor.advance(10)
        pages = self.transport.by_kind("pager")
        self.assertEqual(len(pages), 3)
        resolved = pages[-1][2]
        self.assertEqual(resolved["Subject"], "nozzle1 error rate resolved: "
                                              "below 5 again after 1 minute, "
                                              "35 errors")

    def test_state_kept_across_restart(self):
        """
        An alert begun before a restart is resolved after it, not paged
        again.
        """
        self.start_pager()
        self.receive(*[record("boom")] * 5)
        self.reactor.advance(10)
        self.service.stopService()
        self.assertEqual(len(self.transport.by_kind("pager")), 1)
        state_file = self.overrides["STATE_FILE"]
        self.start_pager(STATE_FILE=state_file)
        self.receive(*[record("boom")] * 5)
        self.reactor.advance(10)
        self.assertEqual(self.transport.by_kind("pager"), [])
        for _ in range(10):
            self.reactor.advance(10)
        [(_, _, resolved)] = self.transport.by_kind("pager")
        self.assertIn("error rate resolved", resolved["Subject"])

    def test_window_slides(self):
        """
        Counts older than PAGER_WINDOW_SIZE flushes no longer count.
        """
        self.start_pager()
        self.receive(*[record("boom")] * 4)
        for _ in range(3):
            self.reactor.advance(10)
        self.receive(record("boom"))
        self.reactor.advance(10)
        self.assertEqual(self.transport.by_kind("pager"), [])

    def test_monitoring_not_counted(self):
        """
        Canary errors do not page.
        """
        self.start_pager()
        self.receive(*[record(f"canary {MARKER}")] * 10)
        self.reactor.advance(10)
        self.assertEqual(self.transport.by_kind("pager"), [])

    def test_bad_input_not_counted(self):
        """
        Bad input does not count toward the rate (the original counted it:
        a port scanner paged on-call), nor is it named.
        """
        self.start_pager()
        self.receive(*[b"junk"] * 5, *[record("boom")] * 4)
        self.reactor.advance(10)
        self.assertEqual(self.transport.by_kind("pager"), [])
        self.receive(b"junk", record("boom"))
        self.reactor.advance(10)
        [(_, _, alert)] = self.transport.by_kind("pager")
        self.assertIn("received 5 errors", alert.get_content())
        self.assertNotIn("junk", alert.get_content())

    def test_reload_keeps_the_alert(self):
        """
        A reload that changes the pager's limit, routes, silences and
        levels keeps where the alert stands: no second page, and the
        storm it began is resolved, once.
        """
        given = {}
        self.start_pager(reload_settings=lambda: (make_settings(
            **{**self.overrides, **given}), []))
        self.receive(*[record("boom")] * 5)
        self.reactor.advance(10)
        given.update(PAGER_LIMIT=6, MIN_LEVEL="warning", SILENCES=[
            {"match": {"kind": "^legacy$"}, "until": 4e9}], ROUTES=[
            {"match": {"kind": "^billing$"}, "to": "b@example.com"}])
        self.assertTrue(self.service.reload())
        self.receive(*[record("boom")] * 6)
        self.reactor.advance(10)
        self.assertEqual(len(self.transport.by_kind("pager")), 1)
        for _ in range(5):
            self.reactor.advance(10)
        subjects = [alert["Subject"] for _, _, alert
                    in self.transport.by_kind("pager")]
        self.assertEqual(len(subjects), 2, subjects)
        self.assertIn("error rate resolved", subjects[1])
        self.assertIn("11 errors", subjects[1])

    def test_bad_canaries_not_taken_off(self):
        """
        Bad input that goes with the canaries (its record quotes the
        datagram, marker and all) is not taken off the real errors' count.
        """
        self.start_pager(PAGER_LIMIT=3, PAGER_WINDOW_SIZE=1)
        self.receive(*[f'{{"message": "canary {MARKER}", oops'.encode()] * 5,
                     *[record("boom")] * 3)
        self.reactor.advance(10)
        [(_, _, alert)] = self.transport.by_kind("pager")
        self.assertIn("received 3 errors", alert.get_content())
        self.assertEqual(self.service.pager.counts, [3])

    def test_pager_from_defaults_to_report_from(self):
        """
        Without PAGER_FROM, the alert comes from REPORT_FROM.
        """
        self.start_pager(PAGER_FROM=None)
        self.receive(*[record("boom")] * 5)
        self.reactor.advance(10)
        [(sender, _, _)] = self.transport.by_kind("pager")
        self.assertEqual(sender, "nozzle@example.com")

    def test_no_pager_to(self):
        """
        Without PAGER_TO the alert is logged, not sent.
        """
        events = EventLoggingObserver.createWithCleanup(self,
                                                        globalLogPublisher)
        self.start_pager(PAGER_TO=None)
        self.receive(*[record("boom")] * 5)
        self.reactor.advance(10)
        self.assertEqual(self.transport.by_kind("pager"), [])
        self.assertEqual(
            [e["setting"] for e in events if e.get("setting")], ["PAGER_TO"])
        self.assertTrue([e for e in events if e.get("count") == 5])


class DigestInStepsTests(ServiceTestCase):
    """
    Digests are made in steps, the reactor taking its turns between them,
    and a clean stop waits for those being made.
    """

    def setUp(self):
        self.turns = Turns()
        self.given = []
        self.start(in_steps=in_slices(self.turns, slice_seconds=0),
                   reload_settings=lambda: self.given.pop(0))

    def reload_without_funcname(self) -> None:
        fields = [name for name in self.service.settings.unique_fields
                  if name != "funcName"]
        self.given.append((make_settings(**dict(
            self.overrides, UNIQUE_MSG_TUPLE=fields)), []))
        self.assertTrue(self.service.reload())

    def test_made_in_turns(self):
        self.receive(record("one"), record("two"))
        self.reactor.advance(60)
        self.assertEqual(self.transport.by_kind("digest"), [])
        self.assertGreater(self.turns.take_all(), 1)
        [(_, _, message)] = self.transport.by_kind("digest")
        self.assertIn("2 unique errors", message.get_content())

    def test_reload_before_first_step(self):
        """
        A reload that changes the shape of keys between a flush and the
        first step of its digest: the digest is made as the flush found
        its errors, and the next digest as the reload wants them.
        """
        self.receive(record("before", funcName="one"),
                     record("before", funcName="two"))
        self.reactor.advance(60)
        self.reload_without_funcname()
        self.turns.take_all()
        [(_, _, first)] = self.transport.by_kind("digest")
        self.assertIn("2 unique errors", first.get_content())
        self.transport.succeed_all()
        self.receive(record("after", lineno=1), record("after", lineno=2))
        self.reactor.advance(60)
        self.turns.take_all()
        [_, (_, _, second)] = self.transport.by_kind("digest")
        self.assertIn("2 instances of 1 unique error (app)",
                      second.get_content())

    def test_not_made_after_reload_held_rekeyed(self):
        """
        A digest that cannot be made holds its errors as a reload while it
        was being made re-keyed them: the next digest has them, folded.
        """
        def broken(batch, **options):
            yield
            raise RuntimeError("template exploded")

        self.service.renderer.making = broken
        self.receive(record("one", funcName="one"),
                     record("one", funcName="two"))
        self.reactor.advance(60)
        self.reload_without_funcname()
        self.turns.take_all()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.reactor.advance(60)
        self.turns.take_all()
        [(_, _, message)] = self.transport.by_kind("digest")
        self.assertIn("2 instances of 1 unique error (app)",
                      message.get_content())

    def test_stop_waits_for_digest_being_made(self):
        self.receive(record("buffered"))
        stopped = self.service.stopService()
        self.turns.turn()
        self.assertNoResult(stopped)
        self.turns.take_all()
        [(_, _, message)] = self.transport.by_kind("digest")
        self.assertIn("buffered", message.get_content())
        self.transport.succeed_all()
        self.assertIsNone(self.successResultOf(stopped))


class DigestAfterSnapshotTests(ServiceTestCase):
    """
    The errors a flush hands on are in a snapshot on disk before their
    digest is made: making it would slow the writing, and a crash
    meanwhile would lose them.
    """

    def test_digest_made_once_snapshot_written(self):
        writer = HeldWriter()
        self.start(writer=writer)
        writer.run_all()  # start-up's snapshot
        self.receive(record("one"))
        self.reactor.advance(60)
        # A snapshot from before the flush, then the flush's: the digest
        # waits for both.
        for _ in range(2):
            self.assertEqual(writer.names(), ["StateFile._write"])
            function, args, done = writer.pending.pop()
            done.callback(function(*args))
        self.assertEqual(writer.names(), ["Spool.add"])
        writer.run_all()
        [(_, _, message)] = self.transport.by_kind("digest")
        self.assertIn("one", message.get_content())

    def test_digest_made_when_snapshot_fails(self):
        """
        A snapshot that cannot be written does not keep the digest back.
        """
        writer = HeldWriter()
        self.start(writer=writer)
        writer.run_all()
        self.receive(record("one"))
        self.reactor.advance(60)
        [(_, _, done)] = writer.pending
        writer.pending.clear()
        done.errback(OSError(28, "No space left on device"))
        writer.run_all()
        [(_, _, message)] = self.transport.by_kind("digest")
        self.assertIn("one", message.get_content())


class StopTests(ServiceTestCase):
    """
    A clean stop flushes and waits for the last digests.
    """

    def test_stop_flushes_and_waits(self):
        """
        Stopping stops reading, flushes what is buffered and fires only
        once the digest is delivered.
        """
        self.start()
        stopped_listening = []
        self.service.udp_port.stopListening = lambda: stopped_listening.append(
            self.transport.pending[:])
        self.receive(record("buffered"))
        stopped = self.service.stopService()
        self.assertNoResult(stopped)
        self.assertEqual(stopped_listening, [[]], "stop reading, then flush")
        [(_, _, message)] = self.transport.by_kind("digest")
        self.assertIn("buffered", message.get_content())
        self.transport.succeed_all()
        self.assertIsNone(self.successResultOf(stopped))
        self.assertFalse(self.service._flush_timer.running)

    def test_stop_waits_for_failures_too(self):
        """
        A failed delivery ends the wait as well: stopping never hangs on
        it and never fails.
        """
        self.start()
        self.receive(record("buffered"))
        stopped = self.service.stopService()
        self.transport.pending[0][-1].errback(ConnectionRefusedError())
        self.assertIsNone(self.successResultOf(stopped))

    def test_stop_steps_after_failure(self):
        """
        A step of the stop that fails is logged and the steps after it
        are taken all the same: the buffer is still flushed and the
        snapshot written.
        """
        self.start()
        self.receive(record("buffered"))

        def broken():
            raise OSError("the port would not close")

        self.service.udp_port.stopListening = broken
        stopped = self.service.stopService()
        [(_, _, message)] = self.transport.by_kind("digest")
        self.assertIn("buffered", message.get_content())
        self.transport.succeed_all()
        self.assertIsNone(self.successResultOf(stopped))
        [failure] = self.flushLoggedErrors(OSError)
        state = StateFile(self.service.settings.STATE_FILE, Clock()).load()
        self.assertEqual(state.buffer.total, 0)

    def test_held_errors_wait_across_restart(self):
        """
        Errors held behind an undelivered digest are not sent as one more
        digest by the final flush: the snapshot keeps them for the next
        run, so an outage across a clean restart still gives two digests.
        """
        self.start(FLUSH_SECONDS=10)
        self.receive(record("one"))
        self.reactor.advance(10)
        self.receive(record("two"))
        self.reactor.advance(10)
        self.receive(record("three"))
        self.service.stopService()
        self.assertEqual(len(self.transport.by_kind("digest")), 1)
        state = StateFile(self.service.settings.STATE_FILE, Clock()).load()
        self.assertEqual(state.held["digest"].total, 2)

    def test_held_errors_sent_without_snapshots(self):
        """
        Without snapshots nothing outlives the run but the spool: the
        final flush sends the held errors as a digest of their own.
        """
        self.start(FLUSH_SECONDS=10, SNAPSHOT_SECONDS=0)
        self.receive(record("one"))
        self.reactor.advance(10)
        self.receive(record("two"))
        self.reactor.advance(10)
        self.service.stopService()
        self.assertEqual(len(self.transport.by_kind("digest")), 2)

    def test_stop_empty(self):
        """
        With nothing buffered, stopping sends nothing and ends at once.
        """
        self.start()
        self.successResultOf(self.service.stopService())
        self.assertEqual(self.transport.pending, [])


class SnapshotTests(ServiceTestCase):
    """
    Snapshots every SNAPSHOT_SECONDS hold what is counted, though each
    reads only what changed since the one before.
    """

    def saved(self):
        """What a service started after a crash now would restore."""
        state = StateFile(self.service.settings.STATE_FILE, Clock()).load()
        counts = {}
        for entry in state.buffer.entries:
            message = entry.key[self.service.settings.unique_fields.index(
                "message")]
            counts.setdefault(message, {})
            for source, count in entry.sources.items():
                counts[message][source] = (counts[message].get(source, 0)
                                           + count)
        return counts

    def test_counts_across_snapshots(self):
        """
        Errors counted before earlier snapshots, and counted again since,
        are all in the last one; bad input with the count it had last.
        """
        self.start(SNAPSHOT_SECONDS=1, FLUSH_SECONDS=3600)
        self.receive(record("a", source="web1"), record("b", source="web1"))
        self.reactor.advance(1)
        self.receive(record("a", source="web2"), b"not json")
        self.reactor.advance(1)
        self.receive(record("c", source="web1"), b"not json either")
        self.reactor.advance(1)
        bad = "Internal error: datagram is not valid JSON"
        self.assertEqual(self.saved(), {
            "a": {"web1": 1, "web2": 1},
            "b": {"web1": 1},
            "c": {"web1": 1},
            bad: {"10.1.1.1": 2},
        })

    def test_flushed_errors_leave(self):
        """
        The snapshot after a flush holds only what was counted since.
        """
        self.start(SNAPSHOT_SECONDS=1, FLUSH_SECONDS=10)
        self.receive(record("before"))
        self.reactor.advance(1)
        self.reactor.advance(9)
        self.receive(record("after"))
        self.reactor.advance(1)
        self.assertEqual(self.saved(), {"after": {"host1": 1}})

    def test_whole_after_failed_snapshot(self):
        """
        Once a snapshot could not be written, the next one that can holds
        every error, those counted before the failure too.
        """
        state = self.mktemp()
        self.start(SNAPSHOT_SECONDS=1, FLUSH_SECONDS=3600,
                   STATE_FILE=os.path.join(state, "state.json"))
        self.receive(record("a"))
        self.reactor.advance(1)
        self.receive(record("b"))
        self.reactor.advance(1)
        self.assertTrue(self.service.state_file.needs_whole)
        os.makedirs(state)
        self.receive(record("c"))
        self.reactor.advance(1)
        self.assertEqual(set(self.saved()), {"a", "b", "c"})


class UnsettledTests(ServiceTestCase):
    """
    Errors stay in the snapshots until their digest is in the spool, or,
    when the spool cannot take it, until it is delivered.
    """

    def unspoolable(self):
        blocker = self.mktemp()
        with open(blocker, "w"):
            pass
        return os.path.join(blocker, "spool")

    def saved(self):
        return StateFile(self.service.settings.STATE_FILE, Clock(),
                         fields=self.service.settings.unique_fields).load()

    def test_spool_unwritable(self):
        """
        With the spool unwritable, a flushed digest's errors are in the
        snapshot until it is delivered, then they leave it: the next run
        sends nothing again.
        """
        self.start(SPOOL_DIR=self.unspoolable(), SNAPSHOT_SECONDS=1)
        self.receive(record("one"), record("one"))
        self.reactor.advance(60)
        self.assertEqual(len(self.transport.pending), 1)
        self.assertEqual(self.saved().unsettled["digest"].total, 2)
        self.transport.succeed_all()
        self.assertEqual(self.saved().unsettled, {})

        self.transport.pending.clear()
        self.service.stopService()
        self.start(**self.overrides)
        self.reactor.advance(60)
        self.assertEqual(self.transport.pending, [])

    def test_restored_after_crash(self):
        """
        Errors of a digest that was never safe in the spool come back as
        held errors after a crash, and are in the next digest.
        """
        self.start(SPOOL_DIR=self.unspoolable(), SNAPSHOT_SECONDS=1)
        self.receive(record("one"), record("one"))
        self.reactor.advance(60)
        crashed = dict(self.overrides)
        crashed["SPOOL_DIR"] = self.mktemp()
        self.start(**crashed)
        self.reactor.advance(60)
        [(_, _, message)] = self.transport.by_kind("digest")
        self.assertIn("** 2 instances of 1 unique error (app) **",
                      message.get_content())

    def test_spooled_settles(self):
        """
        Once the digest is in the spool its errors leave the snapshot:
        the spool holds them.
        """
        self.start(SNAPSHOT_SECONDS=1)
        self.receive(record("one"))
        self.reactor.advance(60)
        self.assertEqual(len(self.transport.pending), 1)
        state = self.saved()
        self.assertEqual(state.unsettled, {})
        self.assertEqual(state.buffer.total, 0)


class LoweredCapsTests(ServiceTestCase):
    """
    Errors restored from the snapshot of a run with higher MAX_FIELD_CHARS
    and MAX_EXC_TEXT_CHARS are cut as errors arriving now are.
    """

    def test_restored_cut(self):
        """
        What was counted, and kept until its digest was safe, by a run
        with higher caps is cut to this run's and folded with the errors
        that differ from it only past them; the totals are exact.
        """
        blocker = self.mktemp()
        with open(blocker, "w"):
            pass
        self.start(SNAPSHOT_SECONDS=1, MAX_EXC_TEXT_CHARS=3000,
                   SPOOL_DIR=os.path.join(blocker, "spool"))
        self.receive(long_error(1), long_error(2))
        self.reactor.advance(60)
        self.receive(long_error(3))
        self.reactor.advance(1)
        crashed = dict(self.overrides, SPOOL_DIR=self.mktemp(),
                       MAX_FIELD_CHARS=50, MAX_EXC_TEXT_CHARS=1000)
        self.start(**crashed)
        self.receive(long_error(4))
        self.reactor.advance(60)
        [(_, _, message)] = self.transport.by_kind("digest")
        body = message.get_content()
        self.assertIn("** 4 instances of 1 unique error (app) **", body)
        self.assertIn("\n4" + LONG_ERRORS_CUT, body)
        self.assertEqual(body.count("characters cut …]"), 1)


class MakeTransportTests(SynchronousTestCase):
    """
    Which transport the settings choose.
    """

    def test_maildir_without_smtp(self):
        """
        No SMTP_HOST: digests go into MAILDIR.
        """
        transport = make_transport(make_settings(MAILDIR="mail"),
                                   MemoryReactorClock())
        self.assertIsInstance(transport, MaildirTransport)
        self.assertTrue(transport.path.endswith("/mail"))

    def test_smtp(self):
        """
        SMTP_HOST: digests go to it, with the SMTP settings.
        """
        transport = make_transport(
            make_settings(SMTP_HOST="mail.example.com", SMTP_PORT=465,
                          SMTP_TLS_VERIFY=False, SMTP_TIMEOUT=7,
                          REPORT_FROM="a@example.com",
                          REPORT_TO="b@example.com"),
            MemoryReactorClock())
        self.assertIsInstance(transport, SMTPTransport)
        # SMTP_TLS unset: implicit TLS is tried first on 465.
        self.assertEqual((transport.host, transport.port, transport.mode,
                          transport.timeout),
                         ("mail.example.com", 465, "implicit", 7))


class OutageTransport:
    """
    A mail server that refuses every connection until C{back_at} (reactor
    time), then accepts everything; it keeps what it accepted.
    """

    timeout = 30

    def __init__(self, clock, back_at):
        self.clock = clock
        self.back_at = back_at
        self.accepted = []

    def describe(self):
        return "flaky server"

    def deliver(self, sender, recipients, message, data=None):
        if self.clock.seconds() < self.back_at:
            return defer.fail(ConnectionRefusedError())
        self.accepted.append(message)
        return defer.succeed(None)


class OutageTests(SynchronousTestCase):
    """
    An hour-long mail server outage at FLUSH_SECONDS = 60, with the default
    retry settings, over a fake clock.
    """

    def test_one_hour_outage(self):
        """
        Errors arriving all through the outage reach the recipient in two
        emails (the pending digest, then one covering the rest) with every
        instance counted, and the spool never holds more than one digest.
        """
        reactor = MemoryReactorClock()
        transport = OutageTransport(reactor, back_at=3600)
        udp_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(udp_socket.close)
        service = FailnozzleService(
            make_settings(REPORT_FROM="nozzle@example.com",
                          REPORT_TO="ops@example.com", FLUSH_SECONDS=60,
                          REPEAT_SECONDS=0,
                          PAGER_LIMIT=10 ** 6, SPOOL_DIR=self.mktemp(),
                          STATE_FILE=self.mktemp(), MAILDIR=self.mktemp()),
            reactor, udp_socket, transport)
        service.startService()
        spooled_most = 0
        sent = 0
        while reactor.seconds() < 3 * 3600:
            if reactor.seconds() < 3600:
                service.receiver.datagramReceived(
                    json.dumps(record("outage", source=f"web{sent % 3}"))
                    .encode(), ("10.0.0.1", 5000))
                sent += 1
            reactor.advance(10)
            spooled_most = max(spooled_most,
                               len(service.outbox.spool.waiting.messages()))
        self.assertEqual(len(transport.accepted), 2)
        totals = [digest_total(message) for message in transport.accepted]
        # The first went GROUP_WAIT_SECONDS after the first error.
        self.assertEqual(totals[0], 1)
        self.assertEqual(sum(totals), sent)
        self.assertEqual(spooled_most, 1)
        self.assertEqual(service.outbox.spool.waiting.messages(), [])


class ReloadTests(ServiceTestCase):
    """
    A reload (SIGHUP) takes the config file's new settings and keeps what
    is counted, held or waiting.
    """

    def setUp(self):
        self.given = []
        #: When the service asked for its heap to be frozen.
        self.freezes = []
        self.start(reload_settings=lambda: self.given.pop(0),
                   freeze_heap=lambda: self.freezes.append(
                       self.service.running),
                   # Every flush sends what it has, as the original did:
                   # these tests count digests.
                   FLUSH_SECONDS=60, REPEAT_SECONDS=0)
        self.addCleanup(self.service.stopService)
        self.events = EventLoggingObserver.createWithCleanup(
            self, globalLogPublisher)

    def reload(self, **changes):
        """Reload with the settings of start(), changed so."""
        self.given.append((make_settings(**dict(self.overrides, **changes)),
                           []))
        return self.service.reload()

    def digests(self):
        return [(recipients, message) for _, recipients, message
                in self.transport.by_kind("digest")]

    def test_recipients_and_templates(self):
        """
        New recipients and templates take effect for the errors counted
        before the reload too.
        """
        templates = self.mktemp()
        os.makedirs(templates)
        with open(os.path.join(templates, "subject.txt"), "w") as out:
            out.write("reloaded: {{ total }}")
        self.receive(record("before"))
        self.assertTrue(self.reload(REPORT_TO="new@example.com",
                                    EMAIL_TEMPLATE_DIR=templates,
                                    EMAIL_SUBJECT_TEMPLATE="subject.txt"))
        self.receive(record("after"))
        self.reactor.advance(60)
        [(recipients, message)] = self.digests()
        self.assertEqual(recipients, ("new@example.com",))
        self.assertEqual(message["Subject"], "reloaded: 2")
        [line] = [e for e in self.events if "Reloaded" in e["log_format"]]
        self.assertIn("EMAIL_SUBJECT_TEMPLATE", line["names"])

    def test_flush_period(self):
        """
        A new FLUSH_SECONDS is the loop's period from the reload on.
        """
        self.receive(record("one"))
        self.reactor.advance(30)
        self.reload(FLUSH_SECONDS=5)
        self.reactor.advance(5)
        self.assertEqual(len(self.digests()), 1)

    def test_unique_fields(self):
        """
        With lineno no longer a unique field, errors counted before the
        reload that differed only by it are one error, counted in full;
        so are the errors held behind an undelivered digest.
        """
        self.receive(record("one", lineno=1))
        self.reactor.advance(60)
        self.receive(record("two", lineno=1), record("two", lineno=2))
        self.reactor.advance(60)
        self.receive(record("three", lineno=1), record("three", lineno=2))
        fields = [name for name in self.service.settings.unique_fields
                  if name != "lineno"]
        self.assertTrue(self.reload(UNIQUE_MSG_TUPLE=fields))
        self.transport.succeed_all()
        self.reactor.advance(60)
        [_, (_, covering)] = self.digests()
        body = covering.get_content()
        self.assertIn("** 4 instances of 2 unique errors (app) **", body)
        self.assertIn("2X three (in app", body)
        self.assertIn("2X two (in app", body)

    def test_caps_lowered(self):
        """
        Lowered MAX_FIELD_CHARS and MAX_EXC_TEXT_CHARS cut the errors
        counted and held before the reload as they cut those arriving
        after it: errors that differ only past the new caps are one, with
        every instance counted.
        """
        self.service.stopService()
        self.start(reload_settings=lambda: self.given.pop(0),
                   MAX_EXC_TEXT_CHARS=3000, REPEAT_SECONDS=0)
        self.receive(long_error(1))
        self.reactor.advance(60)
        self.receive(long_error(2), long_error(3))
        self.reactor.advance(60)  # held: the first digest is undelivered
        self.receive(long_error(4))
        self.assertTrue(self.reload(MAX_FIELD_CHARS=50,
                                    MAX_EXC_TEXT_CHARS=1000))
        self.receive(long_error(5))
        self.transport.succeed_all()
        self.reactor.advance(60)
        [_, (_, covering)] = self.digests()
        body = covering.get_content()
        self.assertIn("** 4 instances of 1 unique error (app) **", body)
        self.assertIn("\n4" + LONG_ERRORS_CUT, body)
        self.assertEqual(body.count("characters cut …]"), 1)

    def test_unused_setting_said(self):
        """
        A changed LOG_LEVEL or LOG_FORMAT, which failnozzle accepts but
        does not use, is said in one line; the rest of the reload is taken.
        """
        self.assertTrue(self.reload(LOG_LEVEL="INFO", LOG_FORMAT="%(message)s",
                                    REPORT_TO="new@example.com"))
        [line] = [formatEvent(event) for event in self.events
                  if "no effect" in event["log_format"]]
        self.assertEqual(line, "Reload: changing LOG_FORMAT, LOG_LEVEL has "
                               "no effect, now or at the next start: "
                               "logging goes through twistd (--logfile, "
                               "--syslog)")
        self.assertEqual(self.service.settings.REPORT_TO,
                         ("new@example.com",))
        [reloaded] = [event for event in self.events
                      if "Reloaded" in event["log_format"]]
        self.assertEqual(reloaded["names"], "REPORT_TO changed")

    def test_no_unused_setting_said(self):
        """
        A reload that leaves them as they were says nothing of them.
        """
        self.assertTrue(self.reload(REPORT_TO="new@example.com"))
        self.assertEqual([event for event in self.events
                          if "no effect" in event["log_format"]], [])

    def test_unusable_config_kept(self):
        """
        A config that cannot be used is reported in one line and changes
        nothing: the running settings go on.
        """
        def broken():
            raise ConfigError("REPORT_TO: 'nobody' is not an email address")

        self.service._reload_settings = broken
        self.receive(record("kept"))
        self.assertFalse(self.service.reload())
        [line] = [e for e in self.events if "Not reloading" in
                  e["log_format"]]
        self.assertIn("REPORT_TO", str(line["error"]))
        self.reactor.advance(60)
        [(recipients, message)] = self.digests()
        self.assertEqual(recipients, ("ops@example.com",))
        self.assertIn("kept", message.get_content())

    def test_template_that_fails_kept(self):
        """
        New settings with a template that does not compile are not taken,
        none of them.
        """
        templates = self.mktemp()
        os.makedirs(templates)
        with open(os.path.join(templates, "body.txt"), "w") as out:
            out.write("{% for %}")
        self.assertFalse(self.reload(REPORT_TO="new@example.com",
                                     EMAIL_TEMPLATE_DIR=templates,
                                     EMAIL_BODY_TEMPLATE="body.txt"))
        self.receive(record("kept"))
        self.reactor.advance(60)
        [(recipients, _)] = self.digests()
        self.assertEqual(recipients, ("ops@example.com",))

    def test_heap_frozen(self):
        """
        The heap is frozen once the service has started, and again after
        each reload that took new settings, not after one that did not.
        """
        self.assertEqual(self.freezes, [True])
        self.assertTrue(self.reload(REPORT_TO="new@example.com"))
        self.assertEqual(len(self.freezes), 2)

        def broken():
            raise ConfigError("REPORT_TO: 'nobody' is not an email address")

        self.service._reload_settings = broken
        self.assertFalse(self.service.reload())
        self.assertEqual(len(self.freezes), 2)

    def test_nothing_changed(self):
        """
        A reload of the same settings says so and changes nothing.
        """
        self.receive(record("one"))
        self.assertTrue(self.reload())
        [line] = [e for e in self.events if "Reloaded" in e["log_format"]]
        self.assertEqual(line["names"], "no setting changed")
        self.reactor.advance(60)
        self.assertEqual(len(self.digests()), 1)

    def test_snapshots_turned_on(self):
        """
        Snapshots turned on by a reload are taken from then on, holding
        what was counted before.
        """
        self.service.stopService()
        self.start(reload_settings=lambda: self.given.pop(0),
                   SNAPSHOT_SECONDS=0)
        self.receive(record("before"))
        self.reload(SNAPSHOT_SECONDS=1)
        self.reactor.advance(1)
        state = StateFile(self.service.settings.STATE_FILE, Clock()).load()
        self.assertEqual(state.buffer.total, 1)

    def snapshotted_one(self) -> str:
        """Start again with snapshots on, and one error in a snapshot;
        the path of STATE_FILE."""
        self.service.stopService()
        self.start(reload_settings=lambda: self.given.pop(0),
                   SNAPSHOT_SECONDS=1)
        self.receive(record("one"))
        self.reactor.advance(1)
        return self.service.settings.STATE_FILE

    def test_snapshots_turned_off(self):
        """
        Snapshots turned off by a reload: the last one is removed, keys
        files with it, so a later start with snapshots on again does not
        restore, and send a second time, what this run delivered.
        """
        path = self.snapshotted_one()
        self.assertTrue(glob.glob(path + ".keys.*"))
        self.assertTrue(self.reload(SNAPSHOT_SECONDS=0))
        self.assertEqual(glob.glob(path + "*"), [])
        self.reactor.advance(60)
        self.transport.succeed_all()
        self.assertEqual(len(self.digests()), 1)
        self.service.stopService()
        self.start(STATE_FILE=path, SNAPSHOT_SECONDS=1)
        self.reactor.advance(60)
        self.assertEqual(self.transport.by_kind("digest"), [])

    def test_quick_wait_when_snapshots_turned_off(self):
        """
        A Sentry or HTTP answer waiting for the end of the reactor's turn
        when a reload turns snapshots off meanwhile is given: there is
        nothing left to wait for.
        """
        self.snapshotted_one()
        waiting = self.service.saved_soon(durable=False)
        self.assertTrue(self.reload(SNAPSHOT_SECONDS=0))
        self.reactor.advance(0)
        self.successResultOf(waiting)

    def test_state_file_moved(self):
        """
        A reload that moves STATE_FILE writes the next snapshot there,
        whole, and removes the one at the old path.
        """
        old = self.snapshotted_one()
        new = self.mktemp()
        self.assertTrue(self.reload(STATE_FILE=new))
        self.assertEqual(glob.glob(old + "*"), [])
        self.assertEqual(StateFile(new, Clock()).load().buffer.total, 1)

    def test_old_state_file_not_removable(self):
        """
        A snapshot that cannot be removed whole is said in one line, naming
        what is left and what it risks; the reload is taken.
        """
        stuck = self.snapshotted_one() + ".keys.99"
        os.makedirs(stuck)  # unlink() fails, even for root
        self.assertTrue(self.reload(SNAPSHOT_SECONDS=0))
        [line] = [formatEvent(event) for event in self.events
                  if "old STATE_FILE" in event["log_format"]]
        self.assertIn(stuck, line)
        self.assertIn("would send its errors again", line)
        self.assertIsNone(self.service.state_file)

    def test_fields_changed_then_restart(self):
        """
        A reload that adds a field of a key, then a restart: the snapshot
        written since is read back (not set aside for keys of two shapes),
        with what was counted before and after the reload.
        """
        self.service.stopService()
        self.start(reload_settings=lambda: self.given.pop(0),
                   SNAPSHOT_SECONDS=1)
        self.receive(record("before"))
        self.reactor.advance(1)
        fields = list(self.service.settings.unique_fields) + ["request_id"]
        self.assertTrue(self.reload(UNIQUE_MSG_TUPLE=fields))
        self.receive(record("after", request_id=7))
        self.reactor.advance(1)
        state = StateFile(self.service.settings.STATE_FILE, Clock(),
                          fields=tuple(fields)).load()
        self.assertEqual(state.buffer.total, 2)
        self.assertEqual(glob.glob(self.service.settings.STATE_FILE + "*.bad-*"),
                         [])

    def test_unsettled_rekeyed(self):
        """
        Errors kept until their digest is safe are re-keyed with the rest.
        """
        self.service.stopService()
        blocker = self.mktemp()
        with open(blocker, "w"):
            pass
        self.start(reload_settings=lambda: self.given.pop(0),
                   SNAPSHOT_SECONDS=1,
                   SPOOL_DIR=os.path.join(blocker, "spool"))
        self.receive(record("one"))
        self.reactor.advance(60)
        fields = [name for name in self.service.settings.unique_fields
                  if name != "lineno"]
        self.assertTrue(self.reload(UNIQUE_MSG_TUPLE=fields))
        self.reactor.advance(1)
        state = StateFile(self.service.settings.STATE_FILE, Clock(),
                          fields=tuple(fields)).load()
        [entry] = state.unsettled["digest"].entries
        self.assertEqual(len(entry.key), len(fields))

    def test_frequent_reloads(self):
        """
        Reloads more often than FLUSH_SECONDS put off no flush: only a
        changed period restarts its loop.
        """
        for number in range(5):
            self.receive(record("one"))
            self.reactor.advance(50)
            self.transport.succeed_all()
            self.reload(REPORT_TO=f"new{number}@example.com")
        self.assertEqual(len(self.digests()), 4)

    def test_template_edited_in_place(self):
        """
        A template changed in its file is read again by a reload, though no
        setting changed.
        """
        templates = self.mktemp()
        os.makedirs(templates)
        subject = os.path.join(templates, "subject.txt")
        with open(subject, "w") as out:
            out.write("first: {{ total }}")
        self.service.stopService()
        self.start(reload_settings=lambda: self.given.pop(0),
                   EMAIL_TEMPLATE_DIR=templates,
                   EMAIL_SUBJECT_TEMPLATE="subject.txt")
        with open(subject, "w") as out:
            out.write("second: {{ total }}")
        self.assertTrue(self.reload())
        self.receive(record("one"))
        self.reactor.advance(60)
        [(_, message)] = self.digests()
        self.assertEqual(message["Subject"], "second: 1")

    def test_not_after_stop(self):
        """
        A reload asked for once a stop has begun (a SIGHUP just before a
        SIGTERM) does nothing: no loop starts again.
        """
        self.service.stopService()
        self.given.append((make_settings(**dict(self.overrides,
                                                FLUSH_SECONDS=5)), []))
        self.assertFalse(self.service.reload())
        self.assertFalse(self.service._flush_timer.running)

    def test_sighup_handler(self):
        """
        The service reloads on SIGHUP while it runs, and gives the signal
        back to what had it before once it stops.
        """
        import signal
        self.assertEqual(signal.getsignal(signal.SIGHUP),
                         self.service._sighup)
        self.service.stopService()
        self.assertNotEqual(signal.getsignal(signal.SIGHUP),
                            self.service._sighup)


    def test_sighups_coalesced(self):
        """
        SIGHUPs arriving before the reactor's turn make one reload between
        them; one arriving once that reload began makes another.
        """
        queued = []
        self.reactor.callFromThread = lambda f, *args: queued.append(f)
        for _ in range(200):
            self.service._sighup(signal.SIGHUP, None)
        self.assertEqual(len(queued), 1)
        self.given.append((make_settings(**self.overrides), []))
        queued.pop()()
        self.assertEqual(self.given, [])
        self.service._sighup(signal.SIGHUP, None)
        self.assertEqual(len(queued), 1)


class LevelTests(ServiceTestCase):
    """
    MIN_LEVEL and GELF_MIN_LEVEL: records less severe are counted as such,
    and neither digested nor paged.
    """

    def gelf(self, level, message="disk full"):
        return json.dumps({"version": "1.1", "host": "web7", "level": level,
                           "short_message": message}).encode()

    def digest_lines(self):
        self.service.flush()
        return [line for _, _, message in self.transport.by_kind("digest")
                for line in message.get_content().splitlines()
                if line.endswith("[new]")]

    def test_gelf_below_warning(self):
        """
        By default GELF informational and debug lines are not errors (GELF
        clients ship every log line); warnings and worse are; failnozzle's
        JSON, whatever its level, is.
        """
        self.start()
        self.receive(self.gelf(6, "user logged in"), self.gelf(7, "cache hit"),
                     self.gelf(4, "disk 90% full"),
                     record("debug detail", levelno=10))
        self.assertEqual(self.service.counts.below_level, {"udp": 2})
        self.assertEqual(self.digest_lines(), [
            "1X disk 90% full (in gelf) [new]",
            "1X debug detail (in app, src/app/views.py:50) [new]"])

    def test_min_level(self):
        """
        MIN_LEVEL holds every record that carries a level, failnozzle's
        JSON by its logging levelno or levelname, GELF too (the stricter
        of the two floors); records without a level are errors.
        """
        self.start(MIN_LEVEL="error", GELF_MIN_LEVEL=None)
        self.receive(record("retrying", levelno=30),
                     record("no level at all"),
                     record("custom level 45", levelno=45),
                     record("by name", levelname="CRITICAL"),
                     record("info by name", levelname="INFO"),
                     self.gelf(4), self.gelf(2, "raid degraded"))
        self.assertEqual(self.service.counts.below_level, {"udp": 3})
        lines = self.digest_lines()
        self.assertEqual(len(lines), 4, lines)
        self.assertFalse([line for line in lines
                          if "retrying" in line or "info by" in line
                          or "disk full" in line])

    def test_gelf_floor_off(self):
        """GELF_MIN_LEVEL = None lets every GELF level in."""
        self.start(GELF_MIN_LEVEL=None)
        self.receive(self.gelf(7, "cache hit"))
        self.assertEqual(self.service.counts.below_level, {})
        self.assertEqual(self.digest_lines(), ["1X cache hit (in gelf) [new]"])

    def test_not_paged(self):
        """Records below the level do not count toward the pager."""
        self.start(PAGER_TO="oncall@example.com", PAGER_LIMIT=2,
                   PAGER_WINDOW_SIZE=1)
        self.receive(*[self.gelf(6, f"noise {n}") for n in range(5)])
        self.service.flush()
        self.assertEqual(self.transport.by_kind("pager"), [])
        self.assertEqual(self.transport.by_kind("digest"), [])
        # As many errors do page.
        self.receive(*[self.gelf(3, f"error {n}") for n in range(5)])
        self.service.flush()
        self.assertEqual(len(self.transport.by_kind("pager")), 1)

    def test_level_shown(self):
        """A logging record's level is shown in the digest as syslog's."""
        self.start()
        self.receive(record("boom", levelno=40))
        self.service.flush()
        [(_, _, message)] = self.transport.by_kind("digest")
        self.assertIn("Level: error (3)\n", message.get_content())

    def test_reload(self):
        """A reload's MIN_LEVEL holds from then on; counts are kept."""
        settings = {}
        self.start(reload_settings=lambda: (make_settings(
            **{**self.overrides, **settings}), []))
        self.receive(record("first", levelno=20))
        settings["MIN_LEVEL"] = 4
        self.assertTrue(self.service.reload())
        self.receive(record("second", levelno=20))
        self.assertEqual(self.service.counts.below_level, {"udp": 1})
        self.assertEqual(len(self.digest_lines()), 1)


class RouteTests(ServiceTestCase):
    """ROUTES: each recipient gets one digest with only its errors."""

    ROUTES = [
        {"name": "sre", "match": {"message": "(?i)timeout"},
         "to": "sre@example.com", "continue": True},
        {"name": "billing", "match": {"kind": "^billing$"},
         "to": "billing@example.com", "from": "bills@example.com"},
    ]

    def digests(self):
        return {recipients: [line.split(" (in ")[0] for line
                             in message.get_content().splitlines()
                             if line.endswith("[new]")]
                for _, recipients, message, _ in self.transport.pending}

    def test_teams_get_only_theirs(self):
        """
        A route's digest holds its errors only, from its own From; an
        error a continue route took may reach a later one too; the rest
        goes to REPORT_TO; canaries go their own way first.
        """
        self.start(ROUTES=self.ROUTES, JUST_MONITORING_REPORT_TO="c@x.example")
        self.receive(record("card declined", kind="billing"),
                     record("Timeout talking to ledger", kind="billing"),
                     record("db timeout", kind="shop"),
                     record("cart empty", kind="shop"),
                     record(f"canary {MARKER}", kind="billing"))
        self.reactor.advance(60)
        self.assertEqual(self.digests(), {
            ("billing@example.com",): ["1X card declined",
                                       "1X Timeout talking to ledger"],
            ("sre@example.com",): ["1X Timeout talking to ledger",
                                   "1X db timeout"],
            ("ops@example.com",): ["1X cart empty"],
            ("c@x.example",): [f"1X canary {MARKER}"]})
        senders = {recipients: sender for sender, recipients, *_
                   in self.transport.pending}
        self.assertEqual(senders[("billing@example.com",)],
                         "bills@example.com")
        self.assertEqual(senders[("sre@example.com",)], "nozzle@example.com")
        kinds = {message["X-Failnozzle"] for _, _, message, _
                 in self.transport.pending}
        self.assertEqual(kinds, {"route:billing", "route:sre", "digest",
                                 "monitoring"})

    def start_holding(self) -> dict:
        """
        Start with no ROUTES, a digest not delivered and a billing error
        held behind it.

        @return: the settings the next reload adds.
        """
        given: dict = {}
        self.start(reload_settings=lambda: (make_settings(
            **{**self.overrides, **given}), []))
        self.receive(record("first"))
        self.reactor.advance(60)
        self.receive(record("card declined", kind="billing"))
        self.reactor.advance(60)
        return given

    def test_reload_routes_what_is_held(self):
        """
        Errors held for a digest (its last one undelivered) are routed by
        the ROUTES a reload brings: nothing held is lost or sent twice.
        """
        given = self.start_holding()
        self.assertEqual(set(self.service.held), {"digest"})
        given["ROUTES"] = self.ROUTES
        self.assertTrue(self.service.reload())
        self.assertEqual(set(self.service.held), {"route:billing"})
        self.assertEqual(self.service.held["route:billing"].total, 1)
        self.reactor.advance(60)
        [(_, recipients, _, _)] = self.transport.pending[1:]
        self.assertEqual(recipients, ("billing@example.com",))

    def test_news_per_route(self):
        """
        What is news is judged per recipient: an error another route's
        digest told of is still new to a team whose digest waited.
        """
        self.start(ROUTES=self.ROUTES)
        self.receive(record("card declined", kind="billing"))
        self.reactor.advance(60)
        # Billing's digest is not delivered yet: what follows waits.
        self.receive(record("Timeout talking to ledger", kind="billing"))
        self.reactor.advance(60)
        self.assertEqual(self.digests()[("sre@example.com",)],
                         ["1X Timeout talking to ledger"])
        [first] = [result for _, recipients, _, result
                   in self.transport.pending
                   if recipients == ("billing@example.com",)]
        first.callback(None)
        self.reactor.advance(60)
        [_, second] = [message for _, recipients, message, _
                       in self.transport.pending
                       if recipients == ("billing@example.com",)]
        self.assertIn("1X Timeout talking to ledger (in billing",
                      second.get_content())
        self.assertIn("[new]", second.get_content())

    def test_reload_fields_and_routes_together(self):
        """
        A reload that changes UNIQUE_MSG_TUPLE and ROUTES at once routes
        what is held by the keys of now.
        """
        given = self.start_holding()
        given["UNIQUE_MSG_TUPLE"] = ["kind", "message", "exc_text"]
        given["ROUTES"] = self.ROUTES
        self.assertTrue(self.service.reload())
        self.assertEqual(set(self.service.held), {"route:billing"})
        [entry] = self.service.held["route:billing"].entries
        self.assertEqual(entry.key[:2], ("billing", "card declined"))


class CanaryTests(ServiceTestCase):
    """CANARY_MAX_SILENCE_SECONDS: canaries that stop, and come back."""

    def test_missed_and_back(self):
        self.start(CANARY_MAX_SILENCE_SECONDS=120, FLUSH_SECONDS=60,
                   PAGER_TO="pager@example.com",
                   JUST_MONITORING_REPORT_TO="canary@example.com")
        self.reactor.advance(300)
        self.assertEqual(self.transport.by_kind("canary"), [],
                         "no canary ever: nothing to miss")
        self.receive(record(f"canary {MARKER}"))
        self.reactor.advance(60)
        self.assertEqual(self.transport.by_kind("canary"), [])
        # 120 s since it came, at the second flush after it.
        self.reactor.advance(60)
        [(_, recipients, missed)] = self.transport.by_kind("canary")
        self.assertEqual(recipients, ("pager@example.com",))
        self.assertIn("no canary since 1970-01-01 00:05:00 UTC: the error "
                      "pipeline may be broken", missed["Subject"])
        self.reactor.advance(600)
        self.assertEqual(len(self.transport.by_kind("canary")), 1)
        self.receive(record(f"canary {MARKER}"))
        self.reactor.advance(60)
        [_, (_, _, back)] = self.transport.by_kind("canary")
        self.assertEqual(back["Subject"], "nozzle1: canaries are back")


class RoutePagerTests(ServiceTestCase):
    """'page': True on a route pages its own address about its errors."""

    def test_route_pages_its_team(self):
        self.start(PAGER_TO="oncall@example.com", PAGER_LIMIT=3,
                   PAGER_WINDOW_SIZE=1, ROUTES=[
                       {"name": "billing", "match": {"kind": "^billing$"},
                        "to": "billing@example.com", "page": True}])
        self.receive(*[record("card declined", kind="billing")] * 3,
                     record("boom"))
        self.reactor.advance(60)
        pages = {recipients: message for _, recipients, message
                 in self.transport.by_kind("page:billing")}
        self.assertEqual(list(pages), [("billing@example.com",)])
        body = pages[("billing@example.com",)].get_content()
        self.assertIn("received 3 errors", body)
        self.assertIn("3X Error: card declined in views (billing)", body)
        # The central pager counts every error: 4 over its limit of 3.
        [(_, recipients, central)] = self.transport.by_kind("pager")
        self.assertEqual(recipients, ("oncall@example.com",))
        self.assertIn("received 4 errors", central.get_content())

    def test_route_alert_kept_across_restart(self):
        """A route's alert outlives a restart: no second page to it."""
        settings = dict(PAGER_LIMIT=3, PAGER_WINDOW_SIZE=2, ROUTES=[
            {"name": "billing", "match": {"kind": "^billing$"},
             "to": "billing@example.com", "page": True}])
        self.start(**settings)
        self.receive(*[record("card declined", kind="billing")] * 3)
        self.reactor.advance(60)
        self.assertEqual(len(self.transport.by_kind("page:billing")), 1)
        self.service.stopService()
        self.start(STATE_FILE=self.overrides["STATE_FILE"], **settings)
        self.receive(*[record("card declined", kind="billing")] * 3)
        self.reactor.advance(60)
        self.assertEqual(self.transport.by_kind("page:billing"), [])
