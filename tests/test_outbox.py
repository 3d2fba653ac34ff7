"""
Unit tests for L{failnozzle.outbox}: the maildir transport, the outbox, and
the SMTP transport over a L{MemoryReactor} and a fake connection.
"""
import email
import email.policy
import os

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.internet.testing import (EventLoggingObserver, MemoryReactorClock,
                                      StringTransport)
from twisted.logger import LogLevel, globalLogPublisher
from twisted.mail import smtp
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from failnozzle.digest import build_message
from failnozzle.outbox import (MaildirTransport, Outbox, RecipientsRefused,
                               SMTPTransport, describe_failure, is_permanent)
from failnozzle.spool import Spool
from tests.common import FakeMailTransport


def message(subject="nozzle1 errors: 1 total", body="boom\n"):
    return build_message(sender="nozzle@example.com",
                         recipients=["ops@example.com"], subject=subject,
                         body=body, date=0, domain="nozzle1")


class MaildirTransportTests(SynchronousTestCase):
    """
    Digests written into a maildir when no SMTP server is configured.
    """

    def test_writes_into_new(self):
        """
        Each message becomes one file in new/, readable as an email, with
        nothing left in tmp/.
        """
        path = self.mktemp()
        transport = MaildirTransport(path, Clock())
        first = self.successResultOf(transport.deliver(
            "a@example.com", ["b@example.com"], message("one")))
        second = self.successResultOf(transport.deliver(
            "a@example.com", ["b@example.com"], message("two")))
        self.assertNotEqual(first, second)
        self.assertEqual(sorted(os.listdir(os.path.join(path, "new"))),
                         sorted([os.path.basename(first),
                                 os.path.basename(second)]))
        self.assertEqual(os.listdir(os.path.join(path, "tmp")), [])
        with open(first, "rb") as stored:
            parsed = email.message_from_binary_file(
                stored, policy=email.policy.default)
        self.assertEqual(parsed["Subject"], "one")
        self.assertEqual(parsed.get_content(), "boom\n")

    def test_prepare_creates(self):
        """
        prepare() makes tmp/, new/ and cur/.
        """
        path = self.mktemp()
        MaildirTransport(path, Clock()).prepare()
        self.assertEqual(sorted(os.listdir(path)), ["cur", "new", "tmp"])

    def test_unwritable(self):
        """
        A maildir that cannot be created fails the delivery with the
        OSError, it does not raise.
        """
        blocker = self.mktemp()
        with open(blocker, "w"):
            pass
        transport = MaildirTransport(os.path.join(blocker, "mail"), Clock())
        failure = self.failureResultOf(transport.deliver(
            "a@example.com", ["b@example.com"], message()))
        failure.trap(OSError)
        self.assertIn("maildir", transport.describe())


class OutboxTests(SynchronousTestCase):
    """
    The outbox spools before sending, logs each outcome in one line,
    retries with backoff and gives up only into failed/.
    """

    def setUp(self):
        self.events = EventLoggingObserver.createWithCleanup(
            self, globalLogPublisher)
        self.clock = Clock()
        self.transport = FakeMailTransport()
        self.spool = Spool(self.mktemp(), self.clock)
        self.spool.prepare()
        self.outbox = self.make_outbox()

    def make_outbox(self):
        return Outbox(self.transport, self.spool, self.clock, retry_min=30,
                      retry_max=600, lifetime=3600)

    def spooled(self):
        return self.spool.waiting.messages()

    def failed(self):
        return self.spool.failed.messages()

    def fail_next(self, exception):
        self.transport.pending[-1][-1].errback(exception)

    def test_spooled_before_sending(self):
        """
        The message is on disk before the first attempt and removed once
        the server accepted it; the outcome is True.
        """
        self.transport.deliver = self.checking_spool(self.transport.deliver)
        sent = self.outbox.send(message("hello"))
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
        sent = self.outbox.send(named)
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
        sent = self.outbox.send(message())
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
        sent = self.outbox.send(message("doomed"))
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
        sent = self.outbox.send(message())
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

    def test_unwritable_spool(self):
        """
        A spool that cannot be written is reported, and the message is
        still delivered from memory.
        """
        blocker = self.mktemp()
        with open(blocker, "w"):
            pass
        self.outbox.spool = Spool(os.path.join(blocker, "spool"), self.clock)
        sent = self.outbox.send(message())
        self.assertIn("Cannot write to the spool", self.events[0]["log_format"])
        self.transport.pending[0][-1].callback(None)
        self.assertIs(self.successResultOf(sent), True)

    def test_stop(self):
        """
        Stopping cancels the retries and gives attempts under way until the
        timeout; what is not delivered stays in the spool.
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

    def test_stop_waits_for_delivery(self):
        """
        An attempt that succeeds within the timeout ends the wait at once.
        """
        self.outbox.send(message())
        stopped = self.outbox.stop(10)
        self.transport.pending[0][-1].callback(None)
        self.successResultOf(stopped)
        self.assertEqual(self.spooled(), [])


class DescribeFailureTests(SynchronousTestCase):
    """
    Reasons a person can act on.
    """

    def describe(self, exception):
        return describe_failure(Failure(exception), 30)

    def test_reasons(self):
        """
        Each kind of failure has its own short reason.
        """
        cases = [
            (error.ConnectionRefusedError(), "connection refused"),
            (defer.TimeoutError(), "no answer within 30 s"),
            (smtp.SMTPTimeoutError(-1, b"Timeout waiting for SMTP server "
                                   b"response"), "no answer within 30 s"),
            (error.DNSLookupError("x"), "host name not found"),
            (smtp.AUTHDeclinedError(535, b"5.7.8 Authentication failed"),
             "AUTH rejected: 535 5.7.8 Authentication failed"),
            (smtp.SMTPDeliveryError(550, b"5.1.1 no such user"),
             "the server replied 550 5.1.1 no such user"),
            (SSL.Error([("SSL routines", "", "certificate verify failed")]),
             "TLS failed: certificate verify failed"),
            (RecipientsRefused([("a@example.com", 451, "4.7.1 later"),
                                ("b@example.com", 550, "no\r\nsuch user")]),
             "the server refused a@example.com: 451 4.7.1 later; "
             "b@example.com: 550 no such user"),
            (defer.CancelledError(),
             "cut short by the stop (SHUTDOWN_TIMEOUT_SECONDS)"),
        ]
        for exception, reason in cases:
            self.assertEqual(self.describe(exception), reason)

    def test_unwraps_connect_error(self):
        """
        ESMTPSenderFactory's wrapping of what went wrong is looked through.
        """
        wrapped = smtp.SMTPConnectError(-1, "Unable to connect")
        wrapped.__cause__ = error.ConnectionRefusedError()
        self.assertEqual(self.describe(wrapped), "connection refused")


class SMTPTransportTests(SynchronousTestCase):
    """
    How the SMTP transport connects and talks, over a memory reactor.
    """

    def transport(self, **options):
        self.reactor = MemoryReactorClock()
        options.setdefault("verify", False)
        return SMTPTransport(self.reactor, "mail.example.com", 587,
                             timeout=10, **options)

    def test_plain_connect(self):
        """
        With TLS off it connects over TCP with the timeout, asks for no
        TLS and no AUTH.
        """
        transport = self.transport(tls="off")
        transport.deliver("a@example.com", ["b@example.com"], message())
        [(host, port, factory, timeout, _)] = self.reactor.tcpClients
        self.assertEqual((host, port, timeout), ("mail.example.com", 587, 10))
        self.assertIsInstance(factory, smtp.ESMTPSenderFactory)
        protocol = factory.buildProtocol(None)
        self.assertFalse(protocol.requireTransportSecurity)
        self.assertFalse(protocol.requireAuthentication)
        self.assertIsNone(protocol.context)
        self.assertEqual(factory.retries, 0)

    def test_starttls_requires_tls(self):
        """
        STARTTLS mode refuses to go on in clear; AUTH is required when a
        user is configured.
        """
        transport = self.transport(tls="starttls", user="u", password="p")
        transport.deliver("a@example.com", ["b@example.com"], message())
        protocol = self.reactor.tcpClients[0][2].buildProtocol(None)
        self.assertTrue(protocol.requireTransportSecurity)
        self.assertTrue(protocol.requireAuthentication)
        self.assertIsNotNone(protocol.context)

    def test_implicit_tls_connects_ssl(self):
        """
        Implicit TLS connects with TLS from the first byte.
        """
        transport = self.transport(tls="implicit")
        transport.deliver("a@example.com", ["b@example.com"], message())
        self.assertEqual(self.reactor.tcpClients, [])
        [(host, port, factory, options, timeout, _)] = self.reactor.sslClients
        self.assertEqual((host, port, timeout), ("mail.example.com", 587, 10))
        self.assertFalse(factory.buildProtocol(None).requireTransportSecurity)

    def test_conversation(self):
        """
        Over a fake connection, the message is sent with LF turned into
        CRLF, and the Deferred fires once the server accepted it.
        """
        transport = self.transport(tls="off")
        sent = transport.deliver("a@example.com", ["b@example.com"],
                                 message(body="line one\nline two\n"))
        protocol = self.reactor.tcpClients[0][2].buildProtocol(None)
        wire = StringTransport()
        protocol.makeConnection(wire)
        for reply in [b"220 hello", b"250 ok", b"250 sender ok",
                      b"250 recipient ok", b"354 go on"]:
            protocol.dataReceived(reply + b"\r\n")
        # Pull the body through, as the reactor would.
        while wire.producer is not None:
            wire.producer.resumeProducing()
        self.assertIn(b"MAIL FROM:<a@example.com>\r\n", wire.value())
        self.assertIn(b"RCPT TO:<b@example.com>\r\n", wire.value())
        self.assertIn(b"\r\nline one\r\nline two\r\n.\r\n", wire.value())
        self.assertNoResult(sent)
        protocol.dataReceived(b"250 queued\r\n")
        self.successResultOf(sent)
        self.assertFalse(wire.disconnected)
        protocol.dataReceived(b"250 reset\r\n")
        self.assertTrue(wire.value().endswith(b"QUIT\r\n"))
        protocol.dataReceived(b"221 bye\r\n")
        self.assertTrue(wire.disconnected, "hangs up without waiting")

    def test_helo_name(self):
        """
        SERVER_NAME is the HELO name, IDNA-encoded; one IDNA refuses
        still gives a HELO name rather than a failed delivery.
        """
        for name, helo in [("bücher.example", b"xn--bcher-kva.example"),
                           ("a..b", b"a..b")]:
            transport = self.transport(tls="off", helo_name=name)
            transport.deliver("a@example.com", ["b@example.com"], message())
            self.assertEqual(self.reactor.tcpClients[0][2].domain, helo)

    def test_timeout_cancels(self):
        """
        A connection attempt that has not finished within the timeout is
        given up: the Deferred fails with a timeout and the connector is
        disconnected.
        """
        transport = self.transport(tls="off")
        sent = transport.deliver("a@example.com", ["b@example.com"],
                                 message())
        connector = self.reactor.connectors[0]
        self.reactor.advance(10)
        self.failureResultOf(sent, defer.TimeoutError)
        self.assertTrue(connector._disconnected)


class IsPermanentTests(SynchronousTestCase):
    """
    Which failures are worth trying again.
    """

    def test_permanent(self):
        """
        5xx replies (AUTH rejections included) and a certificate for
        another name are permanent.
        """
        for exception in (smtp.SMTPDeliveryError(550, b"no"),
                          smtp.AUTHDeclinedError(535, b"bad password"),
                          VerificationError(errors=[]),
                          RecipientsRefused([("a@example.com", 550, "no")])):
            self.assertTrue(is_permanent(Failure(exception)), exception)

    def test_temporary(self):
        """
        4xx replies, refused and lost connections and timeouts may pass;
        so may recipients refused if one of them was refused with a 4xx.
        """
        wrapped = smtp.SMTPConnectError(-1, "Unable to connect")
        wrapped.__cause__ = error.ConnectionRefusedError()
        partly = RecipientsRefused([("a@example.com", 550, "no"),
                                    ("b@example.com", 451, "later")])
        for exception in (smtp.SMTPDeliveryError(451, b"later"),
                          error.ConnectionRefusedError(),
                          error.ConnectionLost(), defer.TimeoutError(),
                          wrapped, partly):
            self.assertFalse(is_permanent(Failure(exception)), exception)
