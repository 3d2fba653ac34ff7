"""
Unit tests for L{failnozzle.outbox}: spooling through the disk writer,
retries, replacing, messages probably delivered or too big, and recovering
whatever a previous run left in the spool.
"""
import email
import email.policy
import os

from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.mail import smtp
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from failnozzle.digest import build_message
from failnozzle.outbox import Outbox
from failnozzle.shrink import wire_size
from failnozzle.spool import Spool
from failnozzle.transport import (MessageTooBig, RecipientsRefused,
                                  UnconfirmedDelivery)
from tests.common import FakeMailTransport, digest_message as message


class QueuedWriter:
    """
    A disk writer whose writes wait until the test lets them run, as the
    writer thread would make them wait.
    """

    def __init__(self):
        self.queued = []

    def run(self, function, *args):
        written = defer.Deferred()
        self.queued.append((written, function, args))
        return written

    def finish(self, count=None):
        """Run the first C{count} writes queued (all by default), in order."""
        while self.queued and count != 0:
            written, function, args = self.queued.pop(0)
            defer.maybeDeferred(function, *args).chainDeferred(written)
            count = None if count is None else count - 1


class OutboxTestCase(SynchronousTestCase):
    """
    An outbox on a real spool, a fake clock and a L{FakeMailTransport}; its
    writes wait in a L{QueuedWriter} unless C{queued} is False.
    """

    queued = True

    def setUp(self):
        self.events = EventLoggingObserver.createWithCleanup(
            self, globalLogPublisher)
        self.clock = Clock()
        self.transport = FakeMailTransport()
        self.spool = Spool(self.mktemp(), self.clock)
        self.spool.prepare()
        self.writer = QueuedWriter() if self.queued else None
        self.outbox = self.make_outbox()

    def make_outbox(self, **options):
        options = dict(dict(retry_min=30, retry_max=600, lifetime=3600),
                       **options)
        return Outbox(self.transport, self.spool, self.clock,
                      writer=self.writer, **options)

    def spooled(self):
        return self.spool.waiting.messages()

    def lines(self, level=None):
        return [formatEvent(event) for event in self.events
                if level is None or event["log_level"] == level]

    def fail_next(self, exception):
        self.transport.pending[-1][-1].errback(exception)


class OutboxTests(OutboxTestCase):
    """
    The outbox spools before sending, logs each outcome in one line,
    retries with backoff and gives up only into failed/.
    """

    queued = False

    def failed(self):
        return self.spool.failed.messages()

    def test_spooled_before_sending(self):
        """
        The message is on disk before the first attempt and removed once
        the server accepted it; the outcome is True.
        """
        self.transport.deliver = self.checking_spool(self.transport.deliver)
        sent = self.outbox.send(message("hello")).outcome
        self.assertNoResult(sent)
        [path] = self.spooled()
        with open(path, "rb") as stored:
            self.assertIn(b"Subject: hello", stored.read())
        self.transport.pending[0][-1].callback(None)
        self.assertIs(self.successResultOf(sent), True)
        self.assertEqual(self.spooled(), [])
        [event] = self.events
        self.assertEqual(event["subject"], "hello")
        self.assertEqual(event["recipients"], "ops@example.com")

    def checking_spool(self, deliver):
        def deliver_when_spooled(*args):
            self.assertEqual(len(self.spooled()), 1, "spooled first")
            return deliver(*args)
        return deliver_when_spooled

    def test_envelope_from_headers(self):
        """
        The envelope holds the bare addresses of the From and To headers,
        which may carry display names.
        """
        named = build_message(
            sender="Error Reporter <errors@example.com>",
            recipients=["Ops <ops@example.com>", "dev@example.com"],
            subject="s", body="b\n", date=0, domain="nozzle1")
        self.outbox.send(named)
        [(sender, recipients, sent, _)] = self.transport.pending
        self.assertEqual(sender, "errors@example.com")
        self.assertEqual(recipients, ("ops@example.com", "dev@example.com"))
        self.assertIs(sent, named)

    def test_backoff_schedule(self):
        """
        Temporary failures are retried after RETRY_MIN_SECONDS, doubling
        each time up to RETRY_MAX_SECONDS, and each one is logged with the
        reason and the next delay.
        """
        self.outbox.send(message())
        attempts_at = []
        for _ in range(7):
            attempts_at.append(self.clock.seconds())
            self.fail_next(error.ConnectionRefusedError())
            self.clock.advance(min(self.clock.getDelayedCalls()[0].getTime()
                                   - self.clock.seconds(), 10000))
        self.assertEqual(attempts_at, [0, 30, 90, 210, 450, 930, 1530])
        delays = [e["delay"] for e in self.events if "delay" in e]
        self.assertEqual(delays, [30, 60, 120, 240, 480, 600, 600])
        self.assertEqual(self.events[0]["reason"], "connection refused")
        self.assertEqual(len(self.spooled()), 1)

    def test_long_outage_keeps_retrying(self):
        """
        Thousands of failed attempts (a day-long outage with a short
        RETRY_MAX_SECONDS) go on being retried every RETRY_MAX_SECONDS: the
        delay's growth stops there instead of overflowing.
        """
        self.outbox = Outbox(self.transport, self.spool, self.clock,
                             retry_min=0.5, retry_max=60, lifetime=5 * 86400)
        self.outbox.send(message())
        for _ in range(1500):
            self.fail_next(error.ConnectionRefusedError())
            [retry] = self.clock.getDelayedCalls()
            self.clock.advance(retry.getTime() - self.clock.seconds())
        self.assertEqual(self.events[-1]["delay"], 60)
        self.assertEqual(len(self.transport.pending), 1501)

    def test_recipients_refused(self):
        """
        A message the server took for some recipients only is tried again
        for the others alone.
        """
        named = build_message(
            sender="nozzle@example.com",
            recipients=["ops@example.com", "Dev <dev@example.com>"],
            subject="s", body="b\n", date=0, domain="nozzle1")
        sent = self.outbox.send(named).outcome
        self.fail_next(RecipientsRefused([("dev@example.com", 451, "later")]))
        self.clock.advance(30)
        self.assertEqual([recipients for _, recipients, _, _
                          in self.transport.pending],
                         [("ops@example.com", "dev@example.com"),
                          ("dev@example.com",)])
        self.transport.succeed_all()
        self.assertIs(self.successResultOf(sent), True)
        self.assertEqual(self.spooled(), [])

    def test_delivered_after_retry(self):
        """
        A message that fails, then goes through, is delivered once and
        leaves the spool.
        """
        sent = self.outbox.send(message()).outcome
        self.fail_next(smtp.SMTPDeliveryError(451, b"try later"))
        self.clock.advance(30)
        self.assertEqual(len(self.transport.pending), 2)
        self.transport.pending[1][-1].callback(None)
        self.assertIs(self.successResultOf(sent), True)
        self.assertEqual(self.spooled(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_permanent_failure(self):
        """
        A 5xx reply moves the message to failed/ at once, with an error
        saying why; the outcome is False and nothing is retried.
        """
        sent = self.outbox.send(message("doomed")).outcome
        self.fail_next(smtp.SMTPDeliveryError(550, b"no such user"))
        self.assertIs(self.successResultOf(sent), False)
        self.assertEqual(self.spooled(), [])
        [path] = self.failed()
        with open(path, "rb") as stored:
            self.assertIn(b"Subject: doomed", stored.read())
        [event] = self.events
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertIn("550 no such user", event["why"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lifetime(self):
        """
        A message still undelivered after SPOOL_LIFETIME_SECONDS moves to
        failed/; the last retry is not put off past the lifetime.
        """
        sent = self.outbox.send(message()).outcome
        while not sent.called:
            self.fail_next(error.ConnectionRefusedError())
            if self.clock.getDelayedCalls():
                self.clock.advance(
                    self.clock.getDelayedCalls()[0].getTime()
                    - self.clock.seconds())
        self.assertIs(self.successResultOf(sent), False)
        self.assertEqual(self.clock.seconds(), 3600)
        self.assertEqual(len(self.failed()), 1)
        self.assertIn("SPOOL_LIFETIME_SECONDS", self.events[-1]["why"])

    def test_transport_raises(self):
        """
        A transport that raises instead of failing its Deferred is handled
        as a failed attempt.
        """
        def broken(*args):
            raise RuntimeError("bug")

        self.transport.deliver = broken
        self.outbox.send(message())
        self.assertEqual(self.events[0]["reason"], "RuntimeError: bug")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_waiting_kinds(self):
        """
        The kinds of undelivered messages are known, so the service can
        hold errors instead of spooling one digest after another.
        """
        self.outbox.send(build_message(
            sender="a@example.com", recipients=["b@example.com"],
            subject="s", body="b\n", date=0, domain="d", kind="pager"))
        self.outbox.send(message())
        self.assertEqual(self.outbox.waiting_kinds(), {"pager", "digest"})
        self.transport.pending[1][-1].callback(None)
        self.assertEqual(self.outbox.waiting_kinds(), {"pager"})

    def test_recover(self):
        """
        Messages a previous run left in the spool are sent by the next one;
        their age counts from when they were spooled.
        """
        self.outbox.send(message("left behind"))
        self.outbox.stop(10)
        self.clock.advance(100)
        restarted = self.make_outbox()
        self.transport.pending = []
        self.assertEqual(restarted.recover(), 1)
        [(_, recipients, sent, result)] = self.transport.pending
        self.assertEqual(sent["Subject"], "left behind")
        self.assertEqual(recipients, ("ops@example.com",))
        result.callback(None)
        self.assertEqual(self.spooled(), [])

    def test_as_a_service(self):
        """
        As a service the outbox sends what the spool holds when it starts,
        and gives delivery C{shutdown_timeout} seconds when it stops.
        """
        self.outbox.send(message("left behind"))
        self.outbox.stop(10)
        restarted = self.make_outbox(shutdown_timeout=30)
        self.transport.pending = []
        restarted.startService()
        [(_, _, sent, _)] = self.transport.pending
        self.assertEqual(sent["Subject"], "left behind")
        stopped = restarted.stopService()
        self.clock.advance(29)
        self.assertNoResult(stopped)
        self.clock.advance(1)
        self.successResultOf(stopped)
        self.assertEqual(len(self.spooled()), 1)

    def test_unwritable_spool(self):
        """
        A spool that cannot be written is reported, and the message is
        still delivered from memory.
        """
        blocker = self.mktemp()
        with open(blocker, "w"):
            pass
        self.outbox.spool = Spool(os.path.join(blocker, "spool"), self.clock)
        sent = self.outbox.send(message()).outcome
        self.assertIn("Cannot write to the spool", self.events[0]["log_format"])
        self.transport.pending[0][-1].callback(None)
        self.assertIs(self.successResultOf(sent), True)

    def test_stop(self):
        """
        Stopping cancels the retries and gives attempts under way until the
        timeout; what is not delivered stays in the spool, as one line
        says.
        """
        self.outbox.send(message("retrying"))
        self.fail_next(error.ConnectionRefusedError())
        self.outbox.send(message("in flight"))
        stopped = self.outbox.stop(10)
        self.assertNoResult(stopped)
        self.clock.advance(10)
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(self.transport.pending[1][-1].called)
        self.assertEqual(len(self.spooled()), 2)
        self.assertEqual(self.lines()[-1],
                         f"2 message(s) not delivered stay in the spool "
                         f"{self.spool.path} for the next start")

    def test_stop_with_messages_in_memory_only(self):
        """
        What a spool that could not be written held in memory only is said
        to be lost at the stop, in one error line.
        """
        blocker = self.mktemp()
        with open(blocker, "w"):
            pass
        self.outbox.spool = Spool(os.path.join(blocker, "spool"), self.clock)
        self.outbox.send(message())
        self.fail_next(error.ConnectionRefusedError())
        self.successResultOf(self.outbox.stop(10))
        self.assertIn("1 message(s) not delivered and not in the spool",
                      self.lines(LogLevel.error)[-1])

    def test_stop_waits_for_delivery(self):
        """
        An attempt that succeeds within the timeout ends the wait at once.
        """
        self.outbox.send(message())
        stopped = self.outbox.stop(10)
        self.transport.pending[0][-1].callback(None)
        self.successResultOf(stopped)
        self.assertEqual(self.spooled(), [])


class SpoolingTests(OutboxTestCase):
    """
    Spooling runs in the writer, and delivery starts only once the message
    is on disk.
    """

    def test_delivery_waits_for_spool(self):
        """
        Nothing is sent while the spool write is under way, though the
        message counts as waiting; once it is on disk, C{spooled} fires
        with True and the first attempt begins.
        """
        sending = self.outbox.send(message(kind="pager"))
        self.assertNoResult(sending.spooled)
        self.assertEqual(self.transport.pending, [])
        self.assertEqual(self.outbox.waiting_kinds(), {"pager"})
        self.assertEqual(self.spooled(), [])
        self.writer.finish()
        self.assertIs(self.successResultOf(sending.spooled), True)
        self.assertEqual(len(self.spooled()), 1)
        self.assertEqual(len(self.transport.pending), 1)
        self.transport.succeed_all()
        self.assertNoResult(sending.outcome)
        self.writer.finish()
        self.assertIs(self.successResultOf(sending.outcome), True)
        self.assertEqual(self.spooled(), [])
        self.assertEqual(self.outbox.waiting_kinds(), set())

    def test_spool_write_fails(self):
        """
        A spool write that fails fires C{spooled} with False, says why in
        one line, and the message is delivered from memory, retried as any
        other.
        """
        self.writer = None
        blocker = self.mktemp()
        with open(blocker, "w"):
            pass
        self.spool = Spool(os.path.join(blocker, "spool"), self.clock)
        self.outbox = self.make_outbox()
        sending = self.outbox.send(message("unspooled"))
        self.assertIs(self.successResultOf(sending.spooled), False)
        [line] = self.lines()
        self.assertIn("Cannot write to the spool", line)
        self.assertIn("Not a directory", line)
        self.assertIn("'unspooled' waits in memory only", line)
        self.fail_next(error.ConnectionRefusedError())
        self.clock.advance(30)
        self.transport.succeed_all()
        self.assertIs(self.successResultOf(sending.outcome), True)
        self.assertEqual(len(self.transport.pending), 2)

    def test_stop_waits_for_spooling(self):
        """
        A stop while a message is being spooled waits for it to be on disk
        and for the attempt that follows.
        """
        sending = self.outbox.send(message())
        stopped = self.outbox.stop(10)
        self.assertNoResult(stopped)
        self.writer.finish()
        self.assertNoResult(stopped)
        self.transport.succeed_all()
        self.successResultOf(stopped)
        self.writer.finish()
        self.assertIs(self.successResultOf(sending.outcome), True)

    def test_stop_times_out_while_spooling(self):
        """
        A spool write still under way when the stop's time is up no longer
        begins an attempt: the message waits in the spool.
        """
        sending = self.outbox.send(message())
        stopped = self.outbox.stop(10)
        self.clock.advance(10)
        self.successResultOf(stopped)
        self.writer.finish()
        self.assertIs(self.successResultOf(sending.spooled), True)
        self.assertEqual(self.transport.pending, [])
        self.assertEqual(len(self.spooled()), 1)


class ReplaceTests(OutboxTestCase):
    """
    Outbox.replace: one pending message of a kind instead of one per
    window of an outage.
    """

    queued = False

    def pager(self, subject):
        return message(subject, kind="pager")

    def test_replaces_waiting(self):
        """
        A message of the kind waiting for its retry is replaced: its file
        leaves the spool, only the new one is tried, and the old one's
        outcome fires with the new one's.
        """
        first = self.outbox.send(self.pager("3 errors"))
        self.fail_next(error.ConnectionRefusedError())
        second = self.outbox.replace("pager", self.pager("7 errors"))
        [path] = self.spooled()
        with open(path, "rb") as stored:
            self.assertIn(b"Subject: 7 errors", stored.read())
        self.assertEqual(len(self.transport.pending), 2)
        self.clock.advance(30)
        self.assertEqual(len(self.transport.pending), 2, "no retry of it")
        self.transport.succeed_all()
        self.assertIs(self.successResultOf(second.outcome), True)
        self.assertIs(self.successResultOf(first.outcome), True)
        self.assertEqual(self.spooled(), [])
        self.assertIn("'7 errors' replaces '3 errors', not delivered yet",
                      self.lines())

    def test_leaves_attempt_alone(self):
        """
        A message in the middle of an attempt is not replaced, nor is one
        of another kind.
        """
        sending = self.outbox.send(self.pager("3 errors"))
        digest = self.outbox.send(message("digest"))
        self.fail_next(error.ConnectionRefusedError())
        self.outbox.replace("pager", self.pager("7 errors"))
        self.assertEqual(len(self.spooled()), 3)
        self.transport.pending[0][-1].callback(None)
        self.assertIs(self.successResultOf(sending.outcome), True)
        self.clock.advance(30)
        self.assertEqual([m["Subject"] for _, _, m, _
                          in self.transport.pending],
                         ["3 errors", "digest", "7 errors", "digest"])
        self.assertNoResult(digest.outcome)

    def test_replaces_attempt_that_fails(self):
        """
        A message in the middle of an attempt when it is replaced is not
        retried if that attempt fails: it is replaced then, its file gone,
        its outcome the new one's.
        """
        first = self.outbox.send(self.pager("3 errors"))
        second = self.outbox.replace("pager", self.pager("7 errors"))
        self.assertEqual(len(self.spooled()), 2)
        self.transport.pending[0][-1].errback(error.ConnectionRefusedError())
        [path] = self.spooled()
        with open(path, "rb") as stored:
            self.assertIn(b"Subject: 7 errors", stored.read())
        self.clock.advance(3600)
        self.assertEqual([m["Subject"] for _, _, m, _
                          in self.transport.pending],
                         ["3 errors", "7 errors"])
        self.transport.succeed_all()
        self.assertIs(self.successResultOf(first.outcome), True)
        self.assertIs(self.successResultOf(second.outcome), True)

    def test_replaces_one_being_spooled(self):
        """
        A message still being spooled is replaced too: once both writes
        are done only the new one is on disk, and the old one was never
        tried.
        """
        self.writer = QueuedWriter()
        self.outbox = self.make_outbox()
        first = self.outbox.send(self.pager("3 errors"))
        second = self.outbox.replace("pager", self.pager("7 errors"))
        self.writer.finish()
        self.assertIs(self.successResultOf(first.spooled), True)
        self.writer.finish()
        [path] = self.spooled()
        with open(path, "rb") as stored:
            self.assertIn(b"Subject: 7 errors", stored.read())
        self.assertEqual([m["Subject"] for _, _, m, _
                          in self.transport.pending], ["7 errors"])
        self.transport.succeed_all()
        self.writer.finish()
        self.assertIs(self.successResultOf(first.outcome), True)
        self.assertIs(self.successResultOf(second.outcome), True)

    def test_old_file_kept_until_new_is_safe(self):
        """
        If the new message cannot be spooled, the old one's file stays on
        disk (a crash would still find an alert there) until the new one
        is delivered.
        """
        self.outbox.send(self.pager("3 errors"))
        self.fail_next(error.ConnectionRefusedError())
        [old] = self.spooled()
        self.outbox.spool = Spool(os.path.join(old, "not-a-directory"),
                                  self.clock)
        self.outbox.spool.remove = self.spool.remove
        replacing = self.outbox.replace("pager", self.pager("7 errors"))
        self.assertIs(self.successResultOf(replacing.spooled), False)
        self.assertEqual(self.spooled(), [old])
        self.transport.succeed_all()
        self.assertIs(self.successResultOf(replacing.outcome), True)
        self.assertEqual(self.spooled(), [])


class UnconfirmedTests(OutboxTestCase):
    """
    A server that never answers the end of the message may have kept it:
    tried a few times, then set aside as probably delivered.
    """

    queued = False

    def unconfirmed(self):
        return UnconfirmedDelivery(Failure(defer.TimeoutError()))

    def test_set_aside_after_three(self):
        """
        After three attempts without a reply to the end of the message the
        message moves to unconfirmed/, one warning says it is probably
        delivered, its outcome is True and nothing more is tried.
        """
        sending = self.outbox.send(message("maybe"))
        for _ in range(3):
            self.fail_next(self.unconfirmed())
            for call in self.clock.getDelayedCalls():
                self.clock.advance(call.getTime() - self.clock.seconds())
        self.assertEqual(len(self.transport.pending), 3)
        self.assertIs(self.successResultOf(sending.outcome), True)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.spooled(), [])
        [kept] = self.spool.unconfirmed.messages()
        line = self.lines(LogLevel.warn)[-1]
        self.assertIn("'maybe' to ops@example.com via fake transport is "
                      "probably delivered: no answer within 30 s after the "
                      "end of the message, before replying to it: the "
                      "server may have kept it, 3 times, so it is not sent "
                      "again", line)
        self.assertIn(kept, line)
        self.assertEqual(self.outbox.waiting_kinds(), set())

    def test_resent_only_by_name(self):
        """
        A message set aside as probably delivered is listed apart from
        those given up on, is not among "all" of those resent, and is
        resent when named: back in the spool and tried at once.
        """
        sending = self.outbox.send(message("maybe"))
        for _ in range(3):
            self.fail_next(self.unconfirmed())
            for call in self.clock.getDelayedCalls():
                self.clock.advance(call.getTime() - self.clock.seconds())
        self.successResultOf(sending.outcome)
        [name] = self.outbox.unconfirmed()
        self.assertEqual(self.outbox.failed(), [])
        self.assertIn("maybe", self.outbox.described_failed(name)["subject"])
        self.assertEqual(self.successResultOf(self.outbox.resend()), [])
        self.assertEqual(self.successResultOf(self.outbox.resend([name])),
                         [name])
        self.assertEqual(self.outbox.unconfirmed(), [])
        self.assertEqual(len(self.spooled()), 1)
        self.assertEqual(len(self.transport.pending), 4)

    def test_retries_are_normal_failures(self):
        """
        The first two are retried with the usual backoff, and a delivery
        then ends it as any other.
        """
        sending = self.outbox.send(message())
        self.fail_next(self.unconfirmed())
        self.clock.advance(30)
        self.fail_next(self.unconfirmed())
        self.clock.advance(60)
        self.transport.succeed_all()
        self.assertIs(self.successResultOf(sending.outcome), True)
        self.assertFalse(os.path.exists(self.spool.unconfirmed.path))
        self.assertEqual(len(self.transport.pending), 3)


class SizeTests(OutboxTestCase):
    """
    A message too big for the server, or for DIGEST_MAX_BYTES, is cut,
    not given up on.
    """

    queued = False

    BODY = "Summary: 500 errors\n" + "  File \"app.py\", line 1\n" * 2000

    def setUp(self):
        super().setUp()
        self.transport.offered = []
        deliver = self.transport.deliver

        def keeping(sender, recipients, message, data=None):
            self.transport.offered.append(data)
            return deliver(sender, recipients, message, data)

        self.transport.deliver = keeping

    def too_big(self, sent):
        return MessageTooBig(sent, smtp.SMTPDeliveryError(
            552, b"5.3.4 Message size exceeds fixed limit"))

    def test_cut_and_retried_at_once(self):
        """
        Refused for its size, the message is offered again at once, cut to
        half the size refused, with the summary and a marker; the spool
        keeps it whole.
        """
        sending = self.outbox.send(message(body=self.BODY))
        whole = self.transport.offered[0]
        self.fail_next(self.too_big(wire_size(whole)))
        self.clock.advance(0)
        self.assertEqual(len(self.transport.pending), 2)
        cut = self.transport.offered[1]
        self.assertLessEqual(wire_size(cut), wire_size(whole) // 2)
        body = email.message_from_bytes(
            cut, policy=email.policy.default).get_content()
        self.assertTrue(body.startswith("Summary: 500 errors\n"))
        self.assertIn(f"the mail server refused {wire_size(whole):,} bytes "
                      f"of it as too big.]", body)
        self.transport.succeed_all()
        self.assertIs(self.successResultOf(sending.outcome), True)
        self.assertEqual(self.spool.failed.messages(), [])
        [warning] = self.lines(LogLevel.warn)
        self.assertIn(f"as too big: 552 5.3.4 Message size exceeds fixed "
                      f"limit; sending it cut to {wire_size(cut):,} bytes now",
                      warning)
        self.assertIn(", cut to ", self.lines(LogLevel.info)[-1])

    def test_refused_until_it_cannot_be_cut(self):
        """
        A server that refuses every size gets ever smaller messages, then
        the whole message goes to failed/ saying it cannot be cut more.
        """
        sending = self.outbox.send(message(body=self.BODY))
        while not sending.outcome.called:
            self.fail_next(self.too_big(wire_size(
                self.transport.offered[-1])))
            self.clock.advance(0)
        self.assertIs(self.successResultOf(sending.outcome), False)
        self.assertLess(len(self.transport.pending), 12)
        [kept] = self.spool.failed.messages()
        with open(kept, "rb") as stored:
            self.assertEqual(stored.read(), self.transport.offered[0])
        [line] = self.lines(LogLevel.error)
        self.assertIn("it cannot be cut to", line)

    def test_digest_max_bytes(self):
        """
        A message larger than max_bytes is offered cut to it; the spool
        holds it whole.
        """
        self.outbox = self.make_outbox(max_bytes=10000)
        self.outbox.send(message(body=self.BODY))
        self.assertLessEqual(wire_size(self.transport.offered[0]), 10000)
        self.assertIn(b"DIGEST_MAX_BYTES is 10,000", self.transport.offered[0])
        [path] = self.spooled()
        self.assertGreater(os.path.getsize(path), 40000)


class RecoveryTests(OutboxTestCase):
    """
    Whatever a previous run (or anyone) left in the spool's new/, start-up
    goes on: each entry that is no message to send is moved to bad/ with
    one line, the others are sent.
    """

    queued = False

    def entry(self, name, content=None):
        path = os.path.join(self.spool.path, "new", name)
        if content is not None:
            with open(path, "wb") as out:
                out.write(content)
        return path

    def good(self, subject="left behind"):
        return message(subject).as_bytes(policy=email.policy.default)

    def test_odd_entries(self):
        """
        FIFOs, directories, sockets, links, empty files, garbage and
        messages without a usable From or To are each set aside in one line
        saying what they are; the good messages beside them are sent.
        """
        import socket
        import tempfile

        good = self.good()
        os.mkfifo(self.entry("1.fifo"))
        os.mkdir(self.entry("2.dir"))
        os.symlink("/etc/passwd", self.entry("3.link"))
        with tempfile.TemporaryDirectory() as short:
            with socket.socket(socket.AF_UNIX) as listening:
                listening.bind(os.path.join(short, "s"))
                os.rename(os.path.join(short, "s"), self.entry("4.socket"))
        odd = {
            "5.empty": b"",
            "6.garbage": os.urandom(3000),
            "7.no-from": good.replace(b"From:", b"X-From:"),
            "8.no-to": good.replace(b"To:", b"X-To:"),
            "9.spaces": good.replace(b"To: ops@example.com",
                                     b"To: a b@example.com"),
            "10.unicode": good.replace(b"To: ops@example.com",
                                       "To: öps@exämple.com".encode()),
            "11.crlf": good.replace(b"From: nozzle@example.com",
                                    b"From: =?utf-8?q?a=0D=0AB?= <x@y>"),
            "12.encoded": good.replace(b"To: ops@example.com",
                                       b"To: =?utf-8?b?////?="),
        }
        for name, content in odd.items():
            self.entry(name, content)
        self.entry("99.good", good)
        self.assertEqual(self.outbox.recover(), 1)
        [(_, recipients, sent, _)] = self.transport.pending
        self.assertEqual(sent["Subject"], "left behind")
        errors = self.lines(LogLevel.error)
        self.assertEqual(len(errors), 4 + len(odd), errors)
        for name, what in [("1.fifo", "is a FIFO"),
                           ("2.dir", "is a directory"),
                           ("3.link", "is a symbolic link"),
                           ("4.socket", "is a socket"),
                           ("5.empty", "no usable From header"),
                           ("8.no-to", "no usable To header"),
                           ("9.spaces", "no usable To header"),
                           ("10.unicode", "no usable To header")]:
            [line] = [line for line in errors if f"/{name} " in line]
            self.assertIn(what, line)
            self.assertIn(f"moved to {self.spool.bad}/{name}", line)
        self.assertEqual(len(os.listdir(self.spool.bad)), 4 + len(odd))
        self.assertEqual(os.listdir(os.path.join(self.spool.path, "new")),
                         ["99.good"])

    def test_fuzz(self):
        """
        Hundreds of messages cut, flipped and spliced at random never stop
        recovery: each is sent or set aside in one line.
        """
        import random

        chance = random.Random(9)
        good = self.good()
        for number in range(300):
            data = bytearray(good)
            for _ in range(chance.randint(1, 20)):
                where = chance.randrange(len(data))
                what = chance.choice([b"\n", b":", b"<", b">", b"\xff",
                                      b"=?utf-8?q?", b"\r", b" ", b"\0",
                                      b",", b"@", b'"', b"\\"])
                if chance.random() < 0.3:
                    del data[where:where + chance.randint(1, 50)]
                else:
                    data[where:where] = what
            self.entry(f"{number}.fuzz", bytes(data))
        count = self.outbox.recover()
        self.assertEqual(count, len(self.transport.pending))
        aside = os.listdir(self.spool.bad)
        self.assertEqual(count + len(aside), 300)
        self.assertEqual(len(self.lines(LogLevel.error)), len(aside))
        for _, recipients, _, _ in self.transport.pending:
            self.assertTrue(recipients)
            self.assertTrue(all(address.isascii() for address in recipients))

    def test_too_big_to_read_whole(self):
        """
        A spooled file larger than max_bytes is read only that far and
        sent cut, its summary first; the file stays whole on disk.
        """
        body = "Summary: 9000 errors\n" + "a traceback line\n" * 100000
        path = self.entry("1.big", message(body=body).as_bytes(
            policy=email.policy.default))
        self.outbox = self.make_outbox(max_bytes=50000)
        self.assertEqual(self.outbox.recover(), 1)
        [(_, _, sent, _)] = self.transport.pending
        text = sent.get_content()
        self.assertTrue(text.startswith("Summary: 9000 errors\n"))
        self.assertIn("only 50,000 bytes of it were read back from the "
                      "spool (DIGEST_MAX_BYTES).]", text)
        self.assertGreater(os.path.getsize(path), 1000000)
