"""
Unit tests for L{failnozzle.outbox}: the maildir transport, the outbox, and
the SMTP transport over a L{MemoryReactor} and a fake connection.
"""
import email
import email.policy
import os

from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.internet.testing import (EventLoggingObserver, MemoryReactorClock,
                                      StringTransport)
from twisted.logger import globalLogPublisher
from twisted.mail import smtp
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from failnozzle.digest import build_message
from failnozzle.outbox import (MaildirTransport, Outbox, SMTPTransport,
                               describe_failure)
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
    The outbox logs each outcome in one line and tracks what is in flight.
    """

    def setUp(self):
        self.events = EventLoggingObserver.createWithCleanup(
            self, globalLogPublisher)
        self.transport = FakeMailTransport()
        self.outbox = Outbox(self.transport)

    def test_delivered(self):
        """
        A delivery gives True and logs the subject and recipients.
        """
        sent = self.outbox.send(message("hello"))
        self.assertNoResult(sent)
        self.transport.pending[0][-1].callback(None)
        self.assertIs(self.successResultOf(sent), True)
        [event] = self.events
        self.assertEqual(event["subject"], "hello")
        self.assertEqual(event["recipients"], "ops@example.com")

    def test_envelope_from_headers(self):
        """
        The envelope holds the bare addresses of the From and To headers,
        which may carry display names.
        """
        named = build_message(
            sender="Error Reporter <errors@example.com>",
            recipients=["Ops <ops@example.com>", "dev@example.com"],
            subject="s", body="b\n", date=0, domain="nozzle1")
        delivered = []
        self.transport.deliver = lambda *args: delivered.append(args)
        self.outbox.send(named)
        [(sender, recipients, sent)] = delivered
        self.assertEqual(sender, "errors@example.com")
        self.assertEqual(recipients, ["ops@example.com", "dev@example.com"])
        self.assertIs(sent, named)

    def test_failed(self):
        """
        A failed delivery gives False, never a failure, and logs one line
        naming the transport and the reason.
        """
        sent = self.outbox.send(message("hello"))
        self.transport.pending[0][-1].errback(error.ConnectionRefusedError())
        self.assertIs(self.successResultOf(sent), False)
        [event] = self.events
        self.assertEqual(event["log_level"].name, "error")
        self.assertEqual(event["transport"], "fake transport")
        self.assertEqual(event["reason"], "connection refused")

    def test_transport_raises(self):
        """
        A transport that raises instead of failing its Deferred is handled
        the same way.
        """
        def broken(*args):
            raise RuntimeError("bug")

        self.transport.deliver = broken
        sent = self.outbox.send(message())
        self.assertIs(self.successResultOf(sent), False)
        self.assertEqual(self.events[0]["reason"], "RuntimeError: bug")

    def test_drain(self):
        """
        drain() fires once every delivery begun has ended, either way.
        """
        self.outbox.send(message())
        self.outbox.send(message())
        drained = self.outbox.drain()
        self.transport.pending[0][-1].callback(None)
        self.assertNoResult(drained)
        self.transport.pending[1][-1].errback(error.ConnectionLost())
        self.successResultOf(drained)
        self.successResultOf(self.outbox.drain())


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
