"""
Unit tests for L{failnozzle.transport}: the maildir transport, and the SMTP
transport over a L{MemoryReactor} and a fake connection (the SIZE a server
announces, no reply to the end of the message, refusals for size, the TLS
mode found out), and what its failures mean.
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
from twisted.logger import formatEvent, globalLogPublisher
from twisted.mail import smtp
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from failnozzle.shrink import wire_size
from failnozzle.transport import (BothModesFailed, MaildirTransport,
                                  MessageTooBig, RecipientsRefused,
                                  SMTPTransport, UnconfirmedDelivery,
                                  describe_failure, is_permanent)
from tests.common import digest_message as message


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
        # Its start and stop are not logged at each delivery.
        self.assertFalse(factory.noisy)

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


class SMTPConversationTests(SynchronousTestCase):
    """
    What the SMTP transport makes of a server's answers, over a memory
    reactor and a fake connection: the SIZE it announces, a reply to the
    end of the message that never comes, a refusal for size.
    """

    BIG = "Summary: 99 errors\n" + "  File \"app.py\", line 1, in f\n" * 3000

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.transport = SMTPTransport(self.reactor, "mail.example.com", 25,
                                       tls="off", timeout=10)

    def connect(self, body="boom\n"):
        """
        Deliver a message, and connect its client to a fake connection.

        @return: C{(result, protocol, wire)}.
        """
        result = self.transport.deliver("a@example.com", ["b@example.com"],
                                        message(body=body))
        factory = self.reactor.tcpClients[-1][2]
        protocol = factory.buildProtocol(None)
        wire = StringTransport()
        protocol.makeConnection(wire)
        return result, protocol, wire

    def to_data(self, protocol, wire, ehlo=b"250 ok"):
        """Answer up to DATA, and let the content through."""
        for reply in [b"220 hello", ehlo, b"250 sender ok",
                      b"250 recipient ok", b"354 go on"]:
            protocol.dataReceived(reply + b"\r\n")
        while wire.producer is not None:
            wire.producer.resumeProducing()

    def test_size_announced(self):
        """
        A message over the SIZE the server announces is cut to it before
        it is sent, its summary kept, with a marker saying why.
        """
        _, protocol, wire = self.connect(self.BIG)
        self.to_data(protocol, wire, ehlo=b"250-mail.example.com\r\n"
                                         b"250 SIZE 20000")
        content = wire.value().split(b"DATA\r\n", 1)[1]
        self.assertLessEqual(len(content), 20000 + len(b".\r\n"))
        self.assertIn(b"Summary: 99 errors", content)
        self.assertIn(b"the mail server takes at most 20,000 bytes (SIZE).]",
                      content)

    def test_size_nonsense(self):
        """
        A SIZE of nonsense, of zero (no limit) or of thousands of digits
        limits nothing.
        """
        for size in (b"", b"0", b"lots", b"9" * 5000):
            _, protocol, wire = self.connect(self.BIG)
            self.to_data(protocol, wire, ehlo=b"250 SIZE " + size)
            self.assertNotIn(b"failnozzle cut", wire.value(), size)

    def test_silent_after_end(self):
        """
        A server that says nothing once the end of the message is sent
        may have kept it: the attempt fails as unconfirmed, on the idle
        timer as on the attempt's timeout.
        """
        result, protocol, wire = self.connect()
        self.to_data(protocol, wire)
        self.assertTrue(wire.value().endswith(b"\r\n.\r\n"))
        self.reactor.advance(10)
        failure = self.failureResultOf(result, UnconfirmedDelivery)
        self.assertEqual(describe_failure(failure, 10),
                         "no answer within 10 s after the end of the "
                         "message, before replying to it: the server may "
                         "have kept it")
        self.assertFalse(is_permanent(failure))

    def test_lost_after_end(self):
        """
        A connection lost once the end of the message is sent is
        unconfirmed too; one lost before is not.
        """
        result, protocol, wire = self.connect()
        self.to_data(protocol, wire)
        protocol.connectionLost(Failure(error.ConnectionLost()))
        factory = self.reactor.tcpClients[-1][2]
        factory.clientConnectionLost(None, Failure(error.ConnectionLost()))
        failure = self.failureResultOf(result, UnconfirmedDelivery)
        self.assertIn("the connection was lost after the end of the message",
                      describe_failure(failure, 10))

        result, protocol, wire = self.connect()
        protocol.dataReceived(b"220 hello\r\n")
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.reactor.tcpClients[-1][2].clientConnectionLost(
            None, Failure(error.ConnectionDone()))
        self.failureResultOf(result, error.ConnectionDone)

    def test_tls_reason_kept(self):
        """
        The reason the protocol was given for the end of its connection
        (through TLS, a certificate for another name) is the failure's,
        though the factory is told only that the connection closed, as
        Twisted 23.10 tells it.
        """
        result, protocol, wire = self.connect()
        protocol.dataReceived(b"220 hello\r\n")
        protocol.connectionLost(Failure(VerificationError(errors=[])))
        self.reactor.tcpClients[-1][2].clientConnectionLost(
            None, Failure(error.ConnectionDone()))
        failure = self.failureResultOf(result, VerificationError)
        self.assertTrue(is_permanent(failure))

    def test_reply_after_end(self):
        """
        Any reply to the end of the message settles it: a 451 is a plain
        temporary failure.
        """
        result, protocol, wire = self.connect()
        self.to_data(protocol, wire)
        protocol.dataReceived(b"451 4.3.0 later\r\n")
        self.failureResultOf(result, smtp.SMTPDeliveryError)

    def test_refused_for_size(self):
        """
        A 552, or a 5.3.4 or 5.2.3 status, in reply to the message is a
        refusal for size, with the size offered; a 552 5.2.2 (mailbox
        full) is not.
        """
        for reply, too_big in [(b"552 Error: Too much mail data", True),
                               (b"552 5.3.4 Message size exceeds limit", True),
                               (b"554 5.3.4 Message too big", True),
                               (b"552-5.2.3 Your message exceeded Google's "
                                b"message size limits", True),
                               (b"552 5.2.2 Mailbox full", False)]:
            result, protocol, wire = self.connect()
            self.to_data(protocol, wire)
            protocol.dataReceived(reply.replace(b"552-", b"552 ") + b"\r\n")
            if too_big:
                failure = self.failureResultOf(result, MessageTooBig)
                self.assertEqual(failure.value.sent, wire_size(
                    self.reactor.tcpClients[-1][2].data))
                self.assertFalse(is_permanent(failure))
            else:
                failure = self.failureResultOf(result,
                                               smtp.SMTPDeliveryError)
                self.assertTrue(is_permanent(failure))

    def test_recipient_552_not_size(self):
        """
        A 552 to every recipient is the recipients' refusal, not the
        message's size.
        """
        result, protocol, wire = self.connect()
        for reply in [b"220 hello", b"250 ok", b"250 sender ok",
                      b"552 5.2.2 mailbox full"]:
            protocol.dataReceived(reply + b"\r\n")
        failure = self.failureResultOf(result, smtp.SMTPDeliveryError)
        self.assertTrue(is_permanent(failure))


class AutomaticTLSTests(SynchronousTestCase):
    """
    SMTP_TLS unset: implicit TLS first on 465, STARTTLS first elsewhere,
    the other mode when the first one's failure points to it, and never
    clear text.
    """

    def transport(self, port):
        self.reactor = MemoryReactorClock()
        return SMTPTransport(self.reactor, "mail.example.com", port,
                             verify=False, timeout=30, greeting_wait=5)

    def deliver(self, transport):
        return transport.deliver("a@example.com", ["b@example.com"],
                                 message())

    def connected(self, client):
        """The protocol of a client the reactor was asked for, connected."""
        protocol = client[2].buildProtocol(None)
        wire = StringTransport()
        protocol.makeConnection(wire)
        return protocol, wire

    def test_465_implicit_first(self):
        """
        On port 465 the first connection is TLS from the first byte.
        """
        transport = self.transport(465)
        self.deliver(transport)
        self.assertEqual(len(self.reactor.sslClients), 1)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_silence_means_implicit(self):
        """
        On another port STARTTLS comes first; a server silent for the
        greeting wait is then tried with implicit TLS.
        """
        transport = self.transport(2525)
        result = self.deliver(transport)
        [client] = self.reactor.tcpClients
        protocol, wire = self.connected(client)
        self.assertTrue(client[2].buildProtocol(None).requireTransportSecurity)
        self.reactor.advance(4.9)
        self.assertEqual(self.reactor.sslClients, [])
        self.reactor.advance(0.1)
        self.assertTrue(wire.disconnecting or wire.disconnected)
        [ssl_client] = self.reactor.sslClients
        self.assertNoResult(result)
        self.assertFalse(ssl_client[2].buildProtocol(None)
                         .requireTransportSecurity)

    def test_greeting_stops_the_wait(self):
        """
        A server that greets in time is not doubted: nothing more is tried
        after the greeting wait.
        """
        transport = self.transport(2525)
        self.deliver(transport)
        protocol, wire = self.connected(self.reactor.tcpClients[0])
        protocol.dataReceived(b"220 hello\r\n")
        self.reactor.advance(6)
        self.assertEqual(self.reactor.sslClients, [])

    def test_plain_answer_means_starttls(self):
        """
        A TLS handshake answered in plain text (OpenSSL's "wrong version
        number") is tried again with STARTTLS, which still insists on TLS.
        """
        transport = self.transport(465)
        result = self.deliver(transport)
        factory = self.reactor.sslClients[0][2]
        factory.clientConnectionLost(None, Failure(SSL.Error(
            [("SSL routines", "", "wrong version number")])))
        [client] = self.reactor.tcpClients
        self.assertTrue(client[2].buildProtocol(None).requireTransportSecurity)
        self.assertNoResult(result)

    def test_certificate_points_nowhere(self):
        """
        A certificate that fails its check is no reason to try the other
        mode: the attempt fails with it, permanently for a wrong name.
        """
        transport = self.transport(465)
        result = self.deliver(transport)
        self.reactor.sslClients[0][2].clientConnectionLost(
            None, Failure(VerificationError(errors=[])))
        failure = self.failureResultOf(result, VerificationError)
        self.assertTrue(is_permanent(failure))
        self.assertEqual(self.reactor.tcpClients, [])

        result = self.deliver(transport)
        self.reactor.sslClients[1][2].clientConnectionLost(None, Failure(
            SSL.Error([("SSL routines", "", "certificate verify failed")])))
        self.failureResultOf(result, SSL.Error)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_both_fail(self):
        """
        When the other mode fails too, the reason gives both.
        """
        transport = self.transport(2525)
        result = self.deliver(transport)
        self.connected(self.reactor.tcpClients[0])
        self.reactor.advance(5)
        self.reactor.sslClients[0][2].clientConnectionFailed(
            None, Failure(error.ConnectionRefusedError()))
        failure = self.failureResultOf(result, BothModesFailed)
        self.assertEqual(describe_failure(failure, 30),
                         "no greeting within 5 s (a server waiting for TLS "
                         "from the first byte?); then over implicit TLS: "
                         "connection refused")

    def test_slow_greeting(self):
        """
        A server silent for the greeting wait that then answers implicit
        TLS in clear is slow, not waiting for TLS: the next attempt waits
        for its greeting as long as for any reply.
        """
        transport = self.transport(2525)
        result = self.deliver(transport)
        self.connected(self.reactor.tcpClients[0])
        self.reactor.advance(5)
        self.reactor.sslClients[0][2].clientConnectionLost(None, Failure(
            SSL.Error([("SSL routines", "", "wrong version number")])))
        self.failureResultOf(result, BothModesFailed)
        self.deliver(transport)
        self.connected(self.reactor.tcpClients[1])
        self.reactor.advance(29)
        self.assertEqual(len(self.reactor.sslClients), 1)

    def test_mode_kept(self):
        """
        Once a mode worked it is the only one: the next message goes
        straight to it with no greeting wait, and the log says so once.
        """
        events = EventLoggingObserver.createWithCleanup(self,
                                                        globalLogPublisher)
        transport = self.transport(2525)
        self.deliver(transport)
        self.connected(self.reactor.tcpClients[0])
        self.reactor.advance(5)
        protocol, wire = self.connected(self.reactor.sslClients[0])
        for reply in [b"220 hello", b"250 ok", b"250 sender ok",
                      b"250 recipient ok", b"354 go on"]:
            protocol.dataReceived(reply + b"\r\n")
        while wire.producer is not None:
            wire.producer.resumeProducing()
        protocol.dataReceived(b"250 queued\r\n")
        self.assertEqual(transport.mode, "implicit")
        [line] = [formatEvent(event) for event in events]
        self.assertEqual(line, "SMTP_TLS is not set: SMTP server "
                               "mail.example.com:2525 takes mail over "
                               "implicit TLS, which failnozzle uses from now "
                               "on")
        self.deliver(transport)
        self.assertEqual(len(self.reactor.sslClients), 2)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_explicit_mode_never_switches(self):
        """
        SMTP_TLS set: a silent server is only a timeout.
        """
        self.reactor = MemoryReactorClock()
        transport = SMTPTransport(self.reactor, "mail.example.com", 2525,
                                  tls="starttls", verify=False, timeout=30)
        result = self.deliver(transport)
        self.connected(self.reactor.tcpClients[0])
        self.reactor.advance(30)
        self.failureResultOf(result, defer.TimeoutError)
        self.assertEqual(self.reactor.sslClients, [])


class IsPermanentTests(SynchronousTestCase):
    """
    Which failures are worth trying again.
    """

    def test_permanent(self):
        """
        5xx replies (AUTH rejections included) and a certificate for
        another name are permanent, however Twisted and pyOpenSSL wrapped
        the certificate's failure.
        """
        wrapped = smtp.SMTPConnectError(-1, "Unable to connect")
        wrapped.__cause__ = VerificationError(errors=[])
        chained = SSL.Error([("SSL routines", "", "handshake failure")])
        chained.__context__ = VerificationError(errors=[])
        for exception in (smtp.SMTPDeliveryError(550, b"no"),
                          smtp.AUTHDeclinedError(535, b"bad password"),
                          VerificationError(errors=[]), wrapped, chained,
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
