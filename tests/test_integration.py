"""
Datagrams over a real UDP socket to the service, digests over real SMTP to
an independent server (aiosmtpd): plain, STARTTLS and implicit TLS, AUTH;
and faults injected on the way: each delivery failure ends in one clear log
line, and every message ends up delivered or in C{failed/}, never lost.
"""
import email
import email.policy
import email.utils
import os
import ssl

import trustme
from aiosmtpd.smtp import AuthResult
from twisted.internet import defer, reactor
from twisted.logger import LogLevel
from twisted.trial.unittest import TestCase

from failnozzle.aggregate import Batch
from failnozzle.config import DEFAULT_MONITORING_ERROR_MARKERS, ConfigError
from failnozzle.service import FailnozzleService, make_transport
from failnozzle.shrink import wire_size
from tests.common import (HANG_UP, KEEP_AND_HANG_UP, DroppingServer, SMTPSink,
                          SilentAfterDataServer, SilentServer, bounded,
                          capture_log, datagrams_received, digest_counts,
                          failed, free_tcp_port, logged_lines, maildir_files,
                          make_settings, poll_until, read_message, record,
                          send_datagrams, spooled, start_service,
                          state_file_total, udp_address, wait_for_log, word,
                          written)

OUTBOX = "failnozzle.outbox"
TRANSPORT = "failnozzle.transport"
SERVICE = "failnozzle.service"
STATE = "failnozzle.state"
MARKER = DEFAULT_MONITORING_ERROR_MARKERS[0]

#: One error, three times from two hosts.
BOOM_TWICE_ON_WEB1_ONCE_ON_WEB2 = [
    record("boom", source="web1"), record("boom", source="web1"),
    record("boom", source="web2")]

#: Retries a test can wait for: 0.1 s, 0.2 s, then every 0.4 s.
FAST_RETRY = dict(RETRY_MIN_SECONDS=0.1, RETRY_MAX_SECONDS=0.4)


def smtp_settings(port: int, **overrides) -> dict:
    """The settings for an SMTP server on 127.0.0.1:C{port}."""
    settings = dict(SMTP_HOST="127.0.0.1", SMTP_PORT=port, SMTP_TLS="off",
                    REPORT_FROM="nozzle@example.com",
                    REPORT_TO=["ops@example.com"])
    settings.update(overrides)
    return settings


def make_ca(testcase, hostname: str = "127.0.0.1") -> tuple:
    """
    A fresh CA and a server certificate it issued for C{hostname}.

    @return: C{(server_context, ca_file)}: an C{ssl.SSLContext} serving
        that certificate, and the path of the CA's PEM for SMTP_CA_FILE.
    """
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(hostname).configure_cert(context)
    ca_file = testcase.mktemp()
    ca.cert_pem.write_to_path(ca_file)
    return context, ca_file


def count_in(service: FailnozzleService, records: list) -> defer.Deferred:
    """
    Send C{records} as datagrams.

    @return: a Deferred firing once the service has counted them all.
    """
    arrived = datagrams_received(service, len(records))
    send_datagrams(udp_address(service), records)
    return arrived


@defer.inlineCallbacks
def report(service: FailnozzleService, records: list):
    """
    Send C{records} as datagrams, flush once they are all counted, and wait
    until every message that flush began is delivered or given up on.  Use
    it only where no attempt fails for a reason worth retrying: such a
    message is retried, and its outcome waits for the last try.

    @return: a Deferred firing with each message's outcome (True if
        delivered, False if given up on).
    """
    yield count_in(service, records)
    outcomes = yield bounded(defer.gatherResults(service.flush()))
    return outcomes


class PlainSMTPTests(TestCase):
    """
    The whole path over plain SMTP.
    """

    @defer.inlineCallbacks
    def test_digest_arrives(self):
        """
        Errors sent as datagrams arrive as one digest whose counts and
        headers are those of the configuration.
        """
        sink = SMTPSink(self)
        service = start_service(
            self, SMTP_HOST="127.0.0.1", SMTP_PORT=sink.port, SMTP_TLS="off",
            REPORT_FROM="nozzle@example.com",
            REPORT_TO=["ops@example.com", "dev@example.com"],
            REPLY_TO="noreply@example.com")
        arrived = datagrams_received(service, 3)
        send_datagrams(udp_address(service), [
            record("boom", source="web1"), record("boom", source="web2"),
            record("boom", source="web2")])
        yield arrived
        service.flush()
        [message] = yield sink.wait_for(1)
        self.assertEqual(message["From"], "nozzle@example.com")
        self.assertEqual(message["To"], "ops@example.com, dev@example.com")
        self.assertEqual(message["Reply-To"], "noreply@example.com")
        self.assertEqual(sorted(sink.envelopes[0].rcpt_tos),
                         ["dev@example.com", "ops@example.com"])
        body = message.get_content()
        self.assertIn("** 3 instances of 1 unique error (app) **", body)
        self.assertIn("- on web1, 1X\n- on web2, 2X\n", body)

    @defer.inlineCallbacks
    def test_well_formed_mime(self):
        """
        The digest is a well-formed, 7-bit clean text/plain UTF-8 message
        with every header a mail reader needs, and a non-ASCII error
        message comes back unchanged in both subject and body.
        """
        templates = self.mktemp()
        os.mkdir(templates)
        with open(os.path.join(templates, "subject.txt"), "w",
                  encoding="utf-8") as subject:
            subject.write("{{ sorted_counts[0][0].message }} "
                          "({{ total }} on {{ server_name }})")
        sink = SMTPSink(self)
        service = start_service(self, **smtp_settings(
            sink.port, REPLY_TO="noreply@example.com",
            SERVER_NAME="nozzle.example", EMAIL_TEMPLATE_DIR=templates,
            EMAIL_SUBJECT_TEMPLATE="subject.txt"))
        outcomes = yield report(service, [record("Ärger ☃")])
        self.assertEqual(outcomes, [True])
        [message] = sink.messages
        self.assertTrue(sink.envelopes[0].original_content.isascii())
        self.assertEqual(message["From"], "nozzle@example.com")
        self.assertEqual(message["To"], "ops@example.com")
        self.assertEqual(message["Reply-To"], "noreply@example.com")
        self.assertEqual(message["Subject"], "Ärger ☃ (1 on nozzle.example)")
        self.assertIsNotNone(email.utils.parsedate_to_datetime(message["Date"]))
        self.assertRegex(message["Message-ID"], r"^<[^<>@\s]+@nozzle\.example>$")
        self.assertEqual(message.get_content_type(), "text/plain")
        self.assertEqual(message.get_content_charset(), "utf-8")
        self.assertIn("1X Ärger ☃ (in app, src/app/views.py:50)",
                      message.get_content())


class TLSTests(TestCase):
    """
    STARTTLS and implicit TLS with the server's certificate checked against
    a CA given as SMTP_CA_FILE; a certificate that does not fit means no
    mail at all, never mail in clear.
    """

    @defer.inlineCallbacks
    def test_starttls(self):
        """
        With SMTP_TLS = 'starttls' the digest arrives over the TLS session
        the client started.
        """
        context, ca_file = make_ca(self)
        sink = SMTPSink(self, tls_context=context, require_starttls=True)
        service = start_service(self, **smtp_settings(
            sink.port, SMTP_TLS="starttls", SMTP_CA_FILE=ca_file))
        outcomes = yield report(service, [record("boom")])
        self.assertEqual(outcomes, [True])
        self.assertEqual(len(sink.messages), 1)
        self.assertIsNotNone(sink.tls_versions[0])

    @defer.inlineCallbacks
    def test_implicit_tls(self):
        """
        With SMTP_TLS = 'implicit' the digest arrives over a connection
        that is TLS from its first byte.
        """
        context, ca_file = make_ca(self)
        sink = SMTPSink(self, ssl_context=context)
        service = start_service(self, **smtp_settings(
            sink.port, SMTP_TLS="implicit", SMTP_CA_FILE=ca_file))
        outcomes = yield report(service, [record("boom")])
        self.assertEqual(outcomes, [True])
        self.assertEqual(len(sink.messages), 1)
        self.assertIsNotNone(sink.tls_versions[0])

    @defer.inlineCallbacks
    def test_ca_bundle(self):
        """
        SMTP_CA_FILE may be a bundle: the server's CA is trusted though
        another CA comes first in the file.
        """
        context, ca_file = make_ca(self)
        _, other_ca_file = make_ca(self)
        bundle = self.mktemp()
        with open(bundle, "wb") as out:
            for path in (other_ca_file, ca_file):
                with open(path, "rb") as pem:
                    out.write(pem.read())
        sink = SMTPSink(self, tls_context=context, require_starttls=True)
        service = start_service(self, **smtp_settings(
            sink.port, SMTP_TLS="starttls", SMTP_CA_FILE=bundle))
        outcomes = yield report(service, [record("boom")])
        self.assertEqual(outcomes, [True])
        self.assertEqual(len(sink.messages), 1)

    def test_ca_file_without_certificate(self):
        """
        An SMTP_CA_FILE holding no certificate stops start-up with a
        ConfigError naming the setting and the file.
        """
        empty = self.mktemp()
        with open(empty, "w") as out:
            out.write("not a certificate\n")
        settings = make_settings(**smtp_settings(
            free_tcp_port(), SMTP_TLS="starttls", SMTP_CA_FILE=empty))
        error = self.assertRaises(ConfigError, make_transport, settings,
                                  reactor)
        self.assertEqual(str(error),
                         f"SMTP_CA_FILE: no PEM certificate in {empty!r}")

    @defer.inlineCallbacks
    def test_starttls_not_offered(self):
        """
        A server that does not offer STARTTLS gets nothing, and the log
        says that is why.
        """
        _, ca_file = make_ca(self)
        sink = SMTPSink(self)
        events = capture_log(self)
        service = start_service(self, **smtp_settings(
            sink.port, SMTP_TLS="starttls", SMTP_CA_FILE=ca_file))
        outcomes = yield report(service, [record("boom")])
        self.assertEqual(outcomes, [False])
        self.assertEqual(sink.messages, [])
        [line] = logged_lines(events, OUTBOX)
        self.assertIn(f"SMTP server 127.0.0.1:{sink.port}", line)
        self.assertIn("does not offer STARTTLS", line)

    @defer.inlineCallbacks
    def assertWrongHostRefused(self, tls: str, ca_file: str,
                               **controller_options):
        """
        Over C{tls}, a server whose certificate the trusted CA in
        C{ca_file} issued for another host name gets nothing, not even in
        clear, and the log names the server and says TLS failed because of
        the name.  That will not pass by itself: no retry, the message goes
        to C{failed/} at once.
        """
        events = capture_log(self)
        sink = SMTPSink(self, **controller_options)
        service = start_service(self, **smtp_settings(
            sink.port, SMTP_TLS=tls, SMTP_CA_FILE=ca_file))
        outcomes = yield report(service, [record("boom")])
        self.assertEqual(outcomes, [False])
        self.assertEqual(sink.offered, [])
        [line] = logged_lines(events, OUTBOX)
        self.assertIn(f"SMTP server 127.0.0.1:{sink.port}: TLS failed: the "
                      f"server's certificate is not valid for 127.0.0.1", line)
        self.assertEqual(logged_lines(events, OUTBOX, LogLevel.warn), [])
        self.assertEqual(spooled(service), [])
        [kept] = failed(service)
        self.assertIn(kept, line)
        self.assertEqual(digest_counts(read_message(kept).get_content()),
                         {"boom": {"host1": 1}})

    @defer.inlineCallbacks
    def test_unknown_ca(self):
        """
        A certificate from a CA other than SMTP_CA_FILE means nothing is
        sent, not even in clear, and the log names the server and says TLS
        failed.  It may be fixed on the server (a certificate being
        renewed), so the message stays in the spool to be tried again.
        """
        context, _ = make_ca(self)
        _, other_ca_file = make_ca(self)
        sink = SMTPSink(self, tls_context=context)
        service = start_service(self, **smtp_settings(
            sink.port, SMTP_TLS="starttls", SMTP_CA_FILE=other_ca_file))
        attempt = wait_for_log(self, OUTBOX, r"; attempt 1, next in 30 s")
        yield count_in(service, [record("boom")])
        [outcome] = service.flush()
        line = yield attempt
        self.assertIn(f"SMTP server 127.0.0.1:{sink.port}: TLS failed", line)
        self.assertIn("certificate verify failed", line)
        self.assertNoResult(outcome)
        self.assertEqual(sink.offered, [])
        self.assertEqual(len(spooled(service)), 1)
        self.assertEqual(failed(service), [])

    def test_starttls_wrong_host(self):
        """
        STARTTLS to a server with a certificate for 'wrong.example' sends
        nothing, though the server would take mail in clear.
        """
        context, ca_file = make_ca(self, "wrong.example")
        return self.assertWrongHostRefused("starttls", ca_file,
                                           tls_context=context)

    def test_implicit_tls_wrong_host(self):
        """
        Implicit TLS to a server with a certificate for 'wrong.example'
        sends nothing.
        """
        context, ca_file = make_ca(self, "wrong.example")
        return self.assertWrongHostRefused("implicit", ca_file,
                                           ssl_context=context)


class AuthTests(TestCase):
    """
    SMTP AUTH with SMTP_USER and SMTP_PASSWORD, over STARTTLS.
    """

    def auth_sink(self) -> tuple:
        """
        A server that wants STARTTLS, then AUTH as nozzle / s3cret.

        @return: C{(sink, ca_file)}.
        """
        def authenticator(server, session, envelope, mechanism, auth_data):
            # handled=False: aiosmtpd then answers a failure with 535 itself.
            return AuthResult(success=(auth_data.login, auth_data.password)
                              == (b"nozzle", b"s3cret"), handled=False)

        context, ca_file = make_ca(self)
        sink = SMTPSink(self, tls_context=context, require_starttls=True,
                        authenticator=authenticator, auth_required=True)
        return sink, ca_file

    @defer.inlineCallbacks
    def test_right_password(self):
        """
        With the right credentials the digest arrives.
        """
        sink, ca_file = self.auth_sink()
        service = start_service(self, **smtp_settings(
            sink.port, SMTP_TLS="starttls", SMTP_CA_FILE=ca_file,
            SMTP_USER="nozzle", SMTP_PASSWORD="s3cret"))
        outcomes = yield report(service, [record("boom")])
        self.assertEqual(outcomes, [True])
        self.assertEqual(len(sink.messages), 1)

    @defer.inlineCallbacks
    def test_wrong_password(self):
        """
        With a wrong password nothing is delivered, and one log line names
        the server and says AUTH was rejected.
        """
        sink, ca_file = self.auth_sink()
        events = capture_log(self)
        service = start_service(self, **smtp_settings(
            sink.port, SMTP_TLS="starttls", SMTP_CA_FILE=ca_file,
            SMTP_USER="nozzle", SMTP_PASSWORD="wrong"))
        outcomes = yield report(service, [record("boom")])
        self.assertEqual(outcomes, [False])
        self.assertEqual(sink.messages, [])
        [line] = logged_lines(events, OUTBOX)
        self.assertIn(f"SMTP server 127.0.0.1:{sink.port}: AUTH rejected",
                      line)


class FailedDeliveryTests(TestCase):
    """
    Each way a delivery fails, against a real server: the attempt is logged
    in one line naming the server and the reason; a temporary failure is
    retried until the message arrives, once; a permanent one moves the
    whole message to C{failed/}.
    """

    @defer.inlineCallbacks
    def assertDeliveredOnce(self, service: FailnozzleService,
                            sink: SMTPSink, outcome: defer.Deferred):
        """
        C{outcome} reports the message delivered; C{sink} has it, once,
        with the counts of L{BOOM_TWICE_ON_WEB1_ONCE_ON_WEB2}; nothing is
        left in the spool.
        """
        delivered = yield bounded(outcome)
        self.assertIs(delivered, True)
        [message] = sink.messages
        self.assertEqual(digest_counts(message.get_content()),
                         {"boom": {"web1": 2, "web2": 1}})
        self.assertEqual(spooled(service), [])
        self.assertEqual(failed(service), [])

    @defer.inlineCallbacks
    def test_connection_refused(self):
        """
        Nothing listening on the port is logged as "connection refused"; the
        digest waits in the spool, is retried, and reaches the server that
        has come up meanwhile, once.
        """
        port = free_tcp_port()
        service = start_service(self, **smtp_settings(port, **FAST_RETRY))
        refused = wait_for_log(self, OUTBOX, r"; attempt 1, next in 0.1 s")
        yield count_in(service, BOOM_TWICE_ON_WEB1_ONCE_ON_WEB2)
        [outcome] = service.flush()
        line = yield refused
        self.assertIn(f"SMTP server 127.0.0.1:{port}: connection refused",
                      line)
        self.assertEqual(len(spooled(service)), 1)
        sink = SMTPSink(self, port=port)
        yield self.assertDeliveredOnce(service, sink, outcome)

    @defer.inlineCallbacks
    def test_no_answer(self):
        """
        A server that accepts the connection and never answers costs
        SMTP_TIMEOUT, logged as "no answer within" that time; the digest is
        tried again, and arrives once a real server has taken the port.
        """
        server = SilentServer(self)
        service = start_service(self, **smtp_settings(
            server.port, SMTP_TIMEOUT=0.3, RETRY_MIN_SECONDS=0.3,
            RETRY_MAX_SECONDS=0.3))
        timed_out = wait_for_log(self, OUTBOX, r"; attempt 1, next in 0.3 s")
        yield count_in(service, BOOM_TWICE_ON_WEB1_ONCE_ON_WEB2)
        [outcome] = service.flush()
        line = yield timed_out
        self.assertIn(f"SMTP server 127.0.0.1:{server.port}: "
                      f"no answer within 0.3 s", line)
        self.assertEqual(len(server.connections), 1)
        self.assertEqual(len(spooled(service)), 1)
        yield server.stop()
        sink = SMTPSink(self, port=server.port)
        yield self.assertDeliveredOnce(service, sink, outcome)

    @defer.inlineCallbacks
    def test_temporary_rejection(self):
        """
        A 451 reply to DATA is logged with the reply and retried with
        backoff; the first 250 ends it, with the message delivered once.
        """
        sink = SMTPSink(self, first_answers=["451 4.3.0 try again later"] * 2)
        events = capture_log(self)
        service = start_service(self, **smtp_settings(sink.port,
                                                      **FAST_RETRY))
        yield count_in(service, BOOM_TWICE_ON_WEB1_ONCE_ON_WEB2)
        [outcome] = service.flush()
        yield self.assertDeliveredOnce(service, sink, outcome)
        self.assertEqual(len(sink.offered), 3)
        lines = logged_lines(events, OUTBOX, LogLevel.warn)
        self.assertEqual(len(lines), 2)
        for line, (attempt, delay) in zip(lines, [(1, 0.1), (2, 0.2)]):
            self.assertIn(f"SMTP server 127.0.0.1:{sink.port}: the server "
                          f"replied 451 4.3.0 try again later; attempt "
                          f"{attempt}, next in {delay} s", line)

    @defer.inlineCallbacks
    def test_data_rejected(self):
        """
        A 550 reply to DATA is final: no retry, nothing arrives, one line
        at error level gives the server's reply and where the message is
        kept, and the file in C{failed/} is the whole message the server
        was offered.
        """
        sink = SMTPSink(self, reply="550 5.7.1 not today")
        events = capture_log(self)
        service = start_service(self, **smtp_settings(sink.port,
                                                      **FAST_RETRY))
        outcomes = yield report(service, BOOM_TWICE_ON_WEB1_ONCE_ON_WEB2)
        self.assertEqual(outcomes, [False])
        self.assertEqual(sink.messages, [])
        [offered] = sink.offered
        [line] = logged_lines(events, OUTBOX)
        self.assertIn(f"SMTP server 127.0.0.1:{sink.port}: "
                      f"the server replied 550 5.7.1 not today", line)
        self.assertEqual(spooled(service), [])
        [kept] = failed(service)
        self.assertIn(f"the message is kept in {kept}", line)
        with open(kept, "rb") as stored:
            self.assertEqual(stored.read(), offered)
        message = read_message(kept)
        self.assertEqual(message["To"], "ops@example.com")
        self.assertEqual(digest_counts(message.get_content()),
                         {"boom": {"web1": 2, "web2": 1}})

    @defer.inlineCallbacks
    def test_recipient_greylisted(self):
        """
        A server that takes the message for one recipient and answers 451
        for the other (greylisting) has not delivered it: it is retried for
        that recipient alone, and each recipient gets it once.
        """
        sink = SMTPSink(self, rcpt_answers={
            "dev@example.com": ["451 4.7.1 greylisted, try again later"]})
        events = capture_log(self)
        service = start_service(self, **smtp_settings(
            sink.port, REPORT_TO=["ops@example.com", "dev@example.com"],
            **FAST_RETRY))
        outcomes = yield report(service, BOOM_TWICE_ON_WEB1_ONCE_ON_WEB2)
        self.assertEqual(outcomes, [True])
        self.assertEqual([envelope.rcpt_tos for envelope in sink.envelopes],
                         [["ops@example.com"], ["dev@example.com"]])
        first, second = sink.messages
        self.assertEqual(first["Message-ID"], second["Message-ID"])
        self.assertEqual(digest_counts(second.get_content()),
                         {"boom": {"web1": 2, "web2": 1}})
        [line] = logged_lines(events, OUTBOX, LogLevel.warn)
        self.assertIn(f"to dev@example.com via SMTP server 127.0.0.1:"
                      f"{sink.port}: the server refused dev@example.com: 451 "
                      f"4.7.1 greylisted, try again later; attempt 1", line)
        self.assertEqual(spooled(service), [])

    @defer.inlineCallbacks
    def test_recipient_refused(self):
        """
        A 550 for one recipient while the other takes the message: the one
        gets it, and the message goes to C{failed/} with an error naming
        the other and the server's reply.
        """
        sink = SMTPSink(self, rcpt_answers={
            "dev@example.com": ["550 5.1.1 no such user"]})
        events = capture_log(self)
        service = start_service(self, **smtp_settings(
            sink.port, REPORT_TO=["ops@example.com", "dev@example.com"],
            **FAST_RETRY))
        outcomes = yield report(service, BOOM_TWICE_ON_WEB1_ONCE_ON_WEB2)
        self.assertEqual(outcomes, [False])
        self.assertEqual([envelope.rcpt_tos for envelope in sink.envelopes],
                         [["ops@example.com"]])
        [line] = logged_lines(events, OUTBOX)
        self.assertIn("Giving up on", line)
        self.assertIn(f"to dev@example.com via SMTP server 127.0.0.1:"
                      f"{sink.port}: the server refused dev@example.com: 550 "
                      f"5.1.1 no such user", line)
        self.assertEqual(spooled(service), [])
        [kept] = failed(service)
        self.assertEqual(digest_counts(read_message(kept).get_content()),
                         {"boom": {"web1": 2, "web2": 1}})

    @defer.inlineCallbacks
    def test_connection_dropped_in_data(self):
        """
        A server that hangs up after the message's content but before its
        reply may have kept it (this one did not): the attempt is logged as
        such, and the retry delivers it, once.
        """
        sink = SMTPSink(self, first_answers=[HANG_UP])
        service = start_service(self, **smtp_settings(sink.port,
                                                      **FAST_RETRY))
        lost = wait_for_log(self, OUTBOX, r"; attempt 1, next in 0.1 s")
        yield count_in(service, BOOM_TWICE_ON_WEB1_ONCE_ON_WEB2)
        [outcome] = service.flush()
        line = yield lost
        self.assertIn(f"SMTP server 127.0.0.1:{sink.port}: the server "
                      f"closed the connection after the end of the message, "
                      f"before replying to it: the server may have kept it",
                      line)
        yield self.assertDeliveredOnce(service, sink, outcome)
        self.assertEqual(len(sink.offered), 2)

    @defer.inlineCallbacks
    def test_connection_dropped_in_content(self):
        """
        A server that hangs up while a large digest's content is still on
        its way: the attempt is logged as a lost connection, and once a
        working server has the port the digest arrives, whole and once.
        """
        server = DroppingServer(self)
        service = start_service(self, **smtp_settings(server.port,
                                                      **FAST_RETRY))
        lost = wait_for_log(self, OUTBOX, r"; attempt 1, next in 0.1 s")
        traceback = "Traceback (most recent call last):\n" + "  frame\n" * 400
        yield count_in(service, [record(f"boom {word(number)}",
                                        exc_text=traceback)
                                 for number in range(40)])
        [outcome] = service.flush()
        line = yield lost
        self.assertIn(f"SMTP server 127.0.0.1:{server.port}: the connection "
                      f"was lost", line)
        yield server.stop()
        sink = SMTPSink(self, port=server.port)
        delivered = yield bounded(outcome)
        self.assertIs(delivered, True)
        [message] = sink.messages
        self.assertEqual(digest_counts(message.get_content()),
                         {f"boom {word(number)}": {"host1": 1}
                          for number in range(40)})
        self.assertEqual(spooled(service), [])

    @defer.inlineCallbacks
    def test_reply_lost(self):
        """
        Delivery is at least once: when a server took the message but its
        250 never came, the message is sent again, so it arrives twice
        (with the same Message-ID, for mail readers that fold duplicates),
        never zero times.
        """
        sink = SMTPSink(self, first_answers=[KEEP_AND_HANG_UP])
        service = start_service(self, **smtp_settings(sink.port,
                                                      **FAST_RETRY))
        outcomes = yield report(service, BOOM_TWICE_ON_WEB1_ONCE_ON_WEB2)
        self.assertEqual(outcomes, [True])
        first, second = sink.messages
        self.assertEqual(first["Message-ID"], second["Message-ID"])
        self.assertEqual(first.get_content(), second.get_content())
        self.assertEqual(digest_counts(second.get_content()),
                         {"boom": {"web1": 2, "web2": 1}})
        self.assertEqual(spooled(service), [])


class UnconfirmedTests(TestCase):
    """
    At least once, not ten times: a server that keeps each message but
    whose reply to its end is lost gets it three times, then the message is
    set aside as probably delivered and the errors held behind it flow on.
    """

    @defer.inlineCallbacks
    def assertProbablyDelivered(self, server_port: int, copies, **settings):
        """
        Errors flushed while the server at C{server_port} never confirms
        reach it three times (C{copies()} lists what it kept), then sit in
        C{unconfirmed/} with one warning; errors counted meanwhile are
        held, and sent in the next digest.

        @return: the service, for the next digest.
        """
        events = capture_log(self)
        service = start_service(self, **smtp_settings(
            server_port, SMTP_TIMEOUT=0.5, **FAST_RETRY, **settings))
        yield count_in(service, BOOM_TWICE_ON_WEB1_ONCE_ON_WEB2)
        [outcome] = service.flush()
        retried = wait_for_log(self, OUTBOX, r"attempt 1, next in")
        yield retried
        yield count_in(service, [record("held", source="web9")])
        self.assertEqual(service.flush(), [])
        delivered = yield bounded(outcome)
        self.assertIs(delivered, True)
        kept = copies()
        self.assertEqual(len(kept), 3)
        for content in kept:
            message = email.message_from_bytes(content,
                                               policy=email.policy.default)
            self.assertEqual(digest_counts(message.get_content()),
                             {"boom": {"web1": 2, "web2": 1}})
        warnings = logged_lines(events, OUTBOX, LogLevel.warn)
        self.assertEqual(len(warnings), 3)
        self.assertIn("is probably delivered", warnings[-1])
        self.assertIn("the server may have kept it, 3 times, so it is not "
                      "sent again", warnings[-1])
        [aside] = maildir_files(service.outbox.spool.unconfirmed.path)
        self.assertIn(aside, warnings[-1])
        self.assertEqual(spooled(service), [])
        self.assertEqual(failed(service), [])
        return service

    @defer.inlineCallbacks
    def assertHeldFlowOn(self, service, port):
        """The next flush sends what was held, to a server on C{port}."""
        sink = SMTPSink(self, port=port)
        [outcome] = service.flush()
        delivered = yield bounded(outcome)
        self.assertIs(delivered, True)
        [message] = sink.messages
        self.assertEqual(digest_counts(message.get_content()),
                         {"held": {"web9": 1}})

    @defer.inlineCallbacks
    def test_silent_after_data(self):
        """
        A server that keeps the message and never answers the end of it.
        """
        server = SilentAfterDataServer(self)
        service = yield self.assertProbablyDelivered(
            server.port, lambda: server.messages)
        yield server.stop()
        yield self.assertHeldFlowOn(service, server.port)

    @defer.inlineCallbacks
    def test_drops_after_data(self):
        """
        A server (aiosmtpd) that keeps the message and hangs up before
        its reply, each time.
        """
        sink = SMTPSink(self, first_answers=[KEEP_AND_HANG_UP] * 3)
        service = yield self.assertProbablyDelivered(
            sink.port, lambda: sink.offered)
        [outcome] = service.flush()
        delivered = yield bounded(outcome)
        self.assertIs(delivered, True)
        self.assertEqual(digest_counts(sink.messages[-1].get_content()),
                         {"held": {"web9": 1}})
        self.assertEqual(len(sink.offered), 4)


class SizeTests(TestCase):
    """
    A digest too big for the server is cut, never put in failed/ for its
    size: to the SIZE the server announces, or to half after a 552.
    """

    TRACEBACK = "Traceback (most recent call last):\n" + "  frame\n" * 400

    def records(self):
        return [record(f"boom {word(number)}", exc_text=self.TRACEBACK)
                for number in range(40)]

    def assertCut(self, message, why: str):
        """
        C{message} is a digest cut with a marker saying C{why}, and its
        summary (every error's headline and total) kept.
        """
        body = message.get_content()
        self.assertIn("** 40 instances of 40 unique errors (app) **", body)
        for number in range(40):
            self.assertIn(f"1X boom {word(number)} (in app", body)
        self.assertIn(why, body.rstrip().splitlines()[-1])

    @defer.inlineCallbacks
    def test_size_announced(self):
        """
        A server announcing SIZE 30000 (aiosmtpd's data_size_limit) gets
        the digest cut to it, at the first attempt.
        """
        sink = SMTPSink(self, data_size_limit=30000)
        service = start_service(self, **smtp_settings(sink.port))
        outcomes = yield report(service, self.records())
        self.assertEqual(outcomes, [True])
        [message] = sink.messages
        self.assertLessEqual(len(sink.envelopes[0].original_content), 30000)
        self.assertCut(message, "the mail server takes at most 30,000 bytes "
                                "(SIZE).]")
        self.assertEqual(len(sink.offered), 1)

    @defer.inlineCallbacks
    def test_refused_for_size(self):
        """
        A 552 to the digest (no SIZE announced) gets it again at once, cut
        to half, and it arrives.
        """
        sink = SMTPSink(self, first_answers=[
            "552 5.3.4 Message size exceeds fixed maximum message size"])
        events = capture_log(self)
        service = start_service(self, **smtp_settings(sink.port))
        outcomes = yield report(service, self.records())
        self.assertEqual(outcomes, [True])
        first, second = sink.offered
        self.assertLessEqual(wire_size(second), wire_size(first) // 2)
        [message] = sink.messages
        self.assertCut(message, "bytes of it as too big.]")
        [line] = logged_lines(events, OUTBOX, LogLevel.warn)
        self.assertIn("as too big: 552 5.3.4 Message size exceeds fixed "
                      "maximum message size; sending it cut to", line)
        self.assertEqual(failed(service), [])


class AutomaticTLSTests(TestCase):
    """
    SMTP_TLS unset, against real servers on ports other than 465: a server
    speaking TLS from the first byte (as the original failnozzle always
    did) and a STARTTLS server both get the digest, over TLS with the
    certificate checked; the log says once which mode worked.
    """

    def start(self, sink: SMTPSink, ca_file: str) -> FailnozzleService:
        """
        A service sending to C{sink} with SMTP_TLS unset, trusting
        C{ca_file}; a greeting wait of 1 s (SMTP_TIMEOUT / 2).
        """
        return start_service(self, **smtp_settings(
            sink.port, SMTP_TLS=None, SMTP_CA_FILE=ca_file, SMTP_TIMEOUT=2))

    @defer.inlineCallbacks
    def assertDelivered(self, sink: SMTPSink, ca_file: str, mode: str):
        events = capture_log(self)
        service = self.start(sink, ca_file)
        for message in ("first", "second"):
            outcomes = yield report(service, [record(message)])
            self.assertEqual(outcomes, [True])
        self.assertEqual(len(sink.messages), 2)
        self.assertTrue(all(sink.tls_versions), sink.tls_versions)
        [line] = logged_lines(events, TRANSPORT, LogLevel.info)
        self.assertEqual(line, f"SMTP_TLS is not set: SMTP server "
                               f"127.0.0.1:{sink.port} takes mail over "
                               f"{mode}, which failnozzle uses from now on")
        self.assertEqual(logged_lines(events, OUTBOX, LogLevel.warn), [])

    def test_implicit(self):
        """
        An implicit TLS server on a random port: silent at first, it is
        reached with implicit TLS.
        """
        context, ca_file = make_ca(self)
        sink = SMTPSink(self, ssl_context=context)
        return self.assertDelivered(sink, ca_file, "implicit TLS")

    def test_starttls(self):
        """
        A STARTTLS server is reached over STARTTLS.
        """
        context, ca_file = make_ca(self)
        sink = SMTPSink(self, tls_context=context, require_starttls=True)
        return self.assertDelivered(sink, ca_file, "STARTTLS")

    @defer.inlineCallbacks
    def test_implicit_first_answered_in_clear(self):
        """
        Implicit TLS tried first (as on port 465) on a STARTTLS server: its
        answer in plain text sends the digest over STARTTLS.
        """
        context, ca_file = make_ca(self)
        sink = SMTPSink(self, tls_context=context, require_starttls=True)
        service = self.start(sink, ca_file)
        service.outbox.transport.mode = "implicit"
        outcomes = yield report(service, [record("boom")])
        self.assertEqual(outcomes, [True])
        self.assertIsNotNone(sink.tls_versions[0])
        self.assertEqual(service.outbox.transport.mode, "starttls")

    @defer.inlineCallbacks
    def assertGivenUp(self, sink: SMTPSink, ca_file: str, why: str):
        """
        C{sink} is offered nothing, not even in clear: the digest goes to
        failed/ at once, with no retry, and the log line says C{why}.
        """
        events = capture_log(self)
        service = self.start(sink, ca_file)
        outcomes = yield report(service, [record("boom")])
        self.assertEqual(outcomes, [False])
        self.assertEqual(sink.offered, [])
        [line] = logged_lines(events, OUTBOX)
        self.assertIn(f"SMTP server 127.0.0.1:{sink.port}: {why}", line)
        self.assertEqual(logged_lines(events, OUTBOX, LogLevel.warn), [])
        self.assertEqual(len(failed(service)), 1)

    def test_never_in_clear(self):
        """
        A server offering neither implicit TLS nor STARTTLS.
        """
        _, ca_file = make_ca(self)
        return self.assertGivenUp(
            SMTPSink(self), ca_file, "the server does not offer STARTTLS "
            "(nothing is sent in clear unless SMTP_TLS = 'off')")

    def test_wrong_host(self):
        """
        A certificate for another name, once the implicit TLS server was
        found out: refused for good.
        """
        context, ca_file = make_ca(self, "wrong.example")
        return self.assertGivenUp(
            SMTPSink(self, ssl_context=context), ca_file,
            "no greeting within 1 s (a server waiting for TLS from the first "
            "byte?); then over implicit TLS: TLS failed: the server's "
            "certificate is not valid for 127.0.0.1")


class OutageTests(TestCase):
    """
    The mail server down for several flushes: errors are held, not turned
    into one more spooled digest per flush, and when the server is back the
    recipient gets the pending digest, then one covering the outage.
    """

    def timed_templates(self) -> str:
        """
        A template directory whose body is the default one followed by one
        line per error, C{seen MESSAGE FIRST LAST}, with the times as
        seconds, so a test can check them to the microsecond.
        """
        templates = self.mktemp()
        os.mkdir(templates)
        with open(os.path.join(templates, "timed.txt"), "w") as body:
            body.write('{% include "body-template.txt" %}\n'
                       "{% for message, info in sorted_counts -%}\n"
                       "seen {{ message.message }} "
                       "{{ info.first_seen.timestamp() }} "
                       "{{ info.last_seen.timestamp() }}\n"
                       "{% endfor %}")
        return templates

    def assertDuring(self, moment: float, span: tuple) -> None:
        """
        C{moment} lies within C{span}, C{(start, end)}, give or take the
        microsecond a datetime rounds to.
        """
        start, end = span
        self.assertTrue(start - 1e-6 <= moment <= end + 1e-6,
                        f"{moment} is not within {span}")

    @defer.inlineCallbacks
    def test_one_digest_after_outage(self):
        """
        The digest of the first flush cannot be sent; three more flushes
        hold their errors while it is retried, and the spool never holds
        more than that one message.  Once the server is up, the pending
        digest arrives, and the next flush sends one digest with every
        error of the outage: totals, counts per host, first and last seen.
        Nothing more arrives.
        """
        port = free_tcp_port()
        # Every error in full in every digest, as the original sent them.
        service = start_service(self, **smtp_settings(
            port, EMAIL_TEMPLATE_DIR=self.timed_templates(),
            EMAIL_BODY_TEMPLATE="timed.txt", REPEAT_SECONDS=0,
            **FAST_RETRY))
        refused = wait_for_log(self, OUTBOX, r"refused; attempt 1, next in")
        yield count_in(service, BOOM_TWICE_ON_WEB1_ONCE_ON_WEB2)
        [pending] = service.flush()
        yield refused

        outage = [
            [record("boom", source="web1"), record("bang", source="web3")],
            [record("bang", source="web3"), record("bang", source="web3"),
             record("boom", source="web2")],
            [record("crash", source="web4")],
        ]
        times = []
        for attempt, records in enumerate(outage, start=2):
            retried = wait_for_log(self, OUTBOX,
                                   f"refused; attempt {attempt}, next in")
            before = reactor.seconds()
            yield count_in(service, records)
            times.append((before, reactor.seconds()))
            self.assertEqual(service.flush(), [])
            yield retried
            self.assertEqual(len(spooled(service)), 1)

        sink = SMTPSink(self, port=port)
        delivered = yield bounded(pending)
        self.assertIs(delivered, True)
        [first] = sink.messages
        self.assertEqual(digest_counts(first.get_content()),
                         {"boom": {"web1": 2, "web2": 1}})

        [outcome] = service.flush()
        delivered = yield bounded(outcome)
        self.assertIs(delivered, True)
        second = sink.messages[1]
        body = second.get_content()
        self.assertIn("** 6 instances of 3 unique errors (app) **", body)
        self.assertEqual(digest_counts(body), {
            "bang": {"web3": 3},
            "boom": {"web1": 1, "web2": 1},
            "crash": {"web4": 1},
        })
        seen = {message: (float(first_seen), float(last_seen))
                for message, first_seen, last_seen in (
                    line.split()[1:] for line in body.splitlines()
                    if line.startswith("seen "))}
        for message, first_flush, last_flush in [
                ("boom", 0, 1), ("bang", 0, 1), ("crash", 2, 2)]:
            first_seen, last_seen = seen[message]
            self.assertDuring(first_seen, times[first_flush])
            self.assertDuring(last_seen, times[last_flush])

        self.assertEqual(service.flush(), [])
        self.assertEqual(len(sink.messages), 2)
        self.assertEqual(spooled(service), [])
        self.assertEqual(failed(service), [])

    @defer.inlineCallbacks
    def test_pager_alerts_coalesced(self):
        """
        A page that cannot be delivered is replaced by the next one (a
        reminder, here at every flush), which says since when and how many
        since: one page in the spool during an outage, not one per flush,
        and it arrives once the server is back, beside the pending digest.
        """
        port = free_tcp_port()
        service = start_service(self, **smtp_settings(
            port, PAGER_LIMIT=3, PAGER_WINDOW_SIZE=2, PAGER_REPEAT_SECONDS=0,
            PAGER_TO=["pager@example.com"], REPEAT_SECONDS=0, **FAST_RETRY))
        yield count_in(service, [record("boom")] * 2)
        [pending] = service.flush()
        outcomes = []
        for count in (2, 3):
            yield count_in(service, [record("boom")] * count)
            [alert] = service.flush()
            outcomes.append(alert)
            yield written(service)
        # The replaced alert's file goes once the new one is on disk (and
        # its attempt, if one was under way, has failed).
        yield poll_until(lambda: len(spooled(service)) == 2,
                         "the replaced alert to leave the spool")

        sink = SMTPSink(self, port=port)
        delivered = yield bounded(
            defer.gatherResults([pending] + outcomes))
        self.assertEqual(delivered, [True, True, True])
        [page] = [message for message in sink.messages
                  if message["To"] == "pager@example.com"]
        body = page.get_content()
        self.assertIn("received 5 errors within the alert window", body)
        self.assertIn("Over the limit since", body)
        self.assertIn("with 7 errors since then", body)
        self.assertIn("(still, since", page["Subject"])
        self.assertEqual(len(sink.messages), 2)
        # The window still holds 3 errors: the digest, and a reminder.
        yield bounded(defer.gatherResults(service.flush()))
        [digest] = [message for message in sink.messages[2:]
                    if message["To"] != "pager@example.com"]
        self.assertEqual(digest_counts(digest.get_content()),
                         {"boom": {"host1": 5}})


class SpoolTests(TestCase):
    """
    The spool across a restart, and a spool that cannot be written.
    """

    @defer.inlineCallbacks
    def test_unwritable_spool(self):
        """
        A SPOOL_DIR that cannot be created (its parent is a regular file)
        is reported at start-up in one line naming it and the reason; the
        digest waits in memory instead, and is still retried and delivered.
        """
        blocker = os.path.abspath(self.mktemp())
        with open(blocker, "w"):
            pass
        spool = os.path.join(blocker, "spool")
        port = free_tcp_port()
        events = capture_log(self)
        service = start_service(self, **smtp_settings(
            port, SPOOL_DIR=spool, **FAST_RETRY))
        [start_up] = logged_lines(events, SERVICE)
        self.assertEqual(start_up, f"SPOOL_DIR {spool} cannot be created: "
                                   f"Not a directory; messages wait in "
                                   f"memory only until it can")
        refused = wait_for_log(self, OUTBOX, r"refused; attempt 1, next in")
        yield count_in(service, BOOM_TWICE_ON_WEB1_ONCE_ON_WEB2)
        [outcome] = service.flush()
        yield refused
        [not_spooled] = logged_lines(events, OUTBOX)
        self.assertIn(f"Cannot write to the spool {spool}: Not a directory",
                      not_spooled)
        self.assertIn("waits in memory only", not_spooled)

        sink = SMTPSink(self, port=port)
        delivered = yield bounded(outcome)
        self.assertIs(delivered, True)
        [message] = sink.messages
        self.assertEqual(digest_counts(message.get_content()),
                         {"boom": {"web1": 2, "web2": 1}})

    @defer.inlineCallbacks
    def test_unwritable_state_file(self):
        """
        A STATE_FILE that cannot be written (its directory is a regular
        file) is reported at start-up and when a snapshot fails, once
        however often that happens, as is the seen-memory beside it;
        digests are sent all the same.
        """
        blocker = os.path.abspath(self.mktemp())
        with open(blocker, "w"):
            pass
        state = os.path.join(blocker, "state.json")
        sink = SMTPSink(self)
        events = capture_log(self)
        service = start_service(self, STATE_FILE=state,
                                **smtp_settings(sink.port))
        cannot_write = [f"Cannot write STATE_FILE {state}: Not a directory; "
                        f"a crash now would lose what is buffered"]
        yield written(service)
        self.assertEqual(logged_lines(events, SERVICE), cannot_write,
                         "reported at start-up")
        for message in ("first", "second"):
            outcomes = yield report(service, [record(message)])
            self.assertEqual(outcomes, [True])
        self.assertEqual(
            [digest_counts(message.get_content())
             for message in sink.messages],
            [{"first": {"host1": 1}}, {"second": {"host1": 1}}])
        self.assertEqual(logged_lines(events, SERVICE), cannot_write + [
            f"Cannot write the seen-memory {state}.seen: Not a directory; "
            f"after a restart every error is new again"], "and only once")

    @defer.inlineCallbacks
    def test_odd_spool_entries_at_start(self):
        """
        A FIFO, a directory and a message without recipients in the spool
        do not stop start-up (a FIFO used to hang it): each is moved to
        bad/ in one line, and the good message beside them is delivered.
        """
        spool = os.path.abspath(self.mktemp())
        first = start_service(self, SPOOL_DIR=spool)
        yield first.stopService()
        new = os.path.join(spool, "new")
        os.mkfifo(os.path.join(new, "fifo"))
        os.mkdir(os.path.join(new, "directory"))
        with open(os.path.join(new, "no-recipients"), "wb") as out:
            out.write(b"From: a@example.com\nSubject: s\n\nbody\n")
        with open(os.path.join(new, "good"), "wb") as out:
            out.write(b"From: a@example.com\nTo: ops@example.com\n"
                      b"Subject: left behind\n\nbody\n")
        sink = SMTPSink(self)
        events = capture_log(self)
        service = start_service(self, SPOOL_DIR=spool,
                                **smtp_settings(sink.port))
        [message] = yield sink.wait_for(1)
        self.assertEqual(message["Subject"], "left behind")
        yield written(service)
        lines = logged_lines(events, OUTBOX)
        self.assertEqual(len(lines), 3, lines)
        self.assertEqual(sorted(os.listdir(os.path.join(spool, "bad"))),
                         ["directory", "fifo", "no-recipients"])

    @defer.inlineCallbacks
    def test_restart_delivers_spooled(self):
        """
        A digest a stopped service could not deliver is left in the spool;
        the next service on that spool sends it at start, once, and does
        not count its errors again.
        """
        port = free_tcp_port()
        settings = smtp_settings(port, SPOOL_DIR=self.mktemp(),
                                 STATE_FILE=self.mktemp(),
                                 SHUTDOWN_TIMEOUT_SECONDS=1, **FAST_RETRY)
        first = start_service(self, **settings)
        refused = wait_for_log(self, OUTBOX, r"refused; attempt 1, next in")
        yield count_in(first, BOOM_TWICE_ON_WEB1_ONCE_ON_WEB2)
        first.flush()
        yield refused
        yield first.stopService()
        self.assertEqual(len(spooled(first)), 1)

        sink = SMTPSink(self, port=port)
        recovered = wait_for_log(self, OUTBOX, r"left in the spool")
        second = start_service(self, **settings)
        line = yield recovered
        self.assertTrue(line.startswith("1 message(s) left in the spool"),
                        line)
        yield poll_until(lambda: not spooled(second),
                         "delivery of the spooled digest")
        [message] = sink.messages
        self.assertEqual(digest_counts(message.get_content()),
                         {"boom": {"web1": 2, "web2": 1}})
        self.assertEqual(second.flush(), [])


class SnapshotTests(TestCase):
    """
    STATE_FILE: what a service counted survives its crash, and a state
    file that cannot be read costs the old counts, never the start.
    """

    @defer.inlineCallbacks
    def test_restore_after_crash(self):
        """
        A service's counts reach the state file within SNAPSHOT_SECONDS; a
        second service started on that file after the first one died (no
        stop, no last flush) sends them in its next digest, with what it
        counted itself.
        """
        state = self.mktemp()
        first = start_service(self, STATE_FILE=state, SNAPSHOT_SECONDS=0.1)
        yield count_in(first, BOOM_TWICE_ON_WEB1_ONCE_ON_WEB2
                       + [record("bang", source="web3")])
        yield poll_until(lambda: state_file_total(state) == 4,
                         "snapshot of the 4 errors")
        # The crash: the port closes, nothing is flushed or saved.
        yield first.udp_port.stopListening()

        sink = SMTPSink(self)
        events = capture_log(self)
        second = start_service(self, STATE_FILE=state,
                               **smtp_settings(sink.port))
        self.assertIn(f"Restored 4 errors from {os.path.abspath(state)}",
                      logged_lines(events, SERVICE, LogLevel.info))
        outcomes = yield report(second, [record("boom", source="web4")])
        self.assertEqual(outcomes, [True])
        [message] = sink.messages
        self.assertEqual(digest_counts(message.get_content()), {
            "boom": {"web1": 2, "web2": 1, "web4": 1},
            "bang": {"web3": 1},
        })

    @defer.inlineCallbacks
    def assertSetAside(self, content: str):
        """
        A service whose STATE_FILE holds C{content} moves it aside (kept,
        with the same content), says so in one line at error level, and
        starts with nothing counted.
        """
        state = os.path.abspath(self.mktemp())
        with open(state, "w") as out:
            out.write(content)
        sink = SMTPSink(self)
        events = capture_log(self)
        service = start_service(self, STATE_FILE=state,
                                **smtp_settings(sink.port))
        [line] = logged_lines(events, STATE)
        self.assertIn(f"STATE_FILE {state} is unusable", line)
        self.assertIn("starting with an empty buffer", line)
        [aside] = [name for name in os.listdir(os.path.dirname(state))
                   if name.startswith(os.path.basename(state) + ".bad-")]
        aside = os.path.join(os.path.dirname(state), aside)
        self.assertIn(f"moved to {aside}", line)
        with open(aside) as kept:
            self.assertEqual(kept.read(), content)
        self.assertEqual(service.flush(), [])
        outcomes = yield report(service, [record("fresh")])
        self.assertEqual(outcomes, [True])
        self.assertEqual(digest_counts(sink.messages[0].get_content()),
                         {"fresh": {"host1": 1}})

    def test_corrupt_state_file(self):
        """
        A state file that is not JSON (cut short) is set aside.
        """
        return self.assertSetAside('{"version": 2, "buffer": {"entr')

    def test_state_file_of_wrong_shape(self):
        """
        A state file that is JSON but not a snapshot is set aside.
        """
        return self.assertSetAside('{"version": 2, "buffer": []}')


class RoutingTests(TestCase):
    """
    "Just monitoring" canary errors go to JUST_MONITORING_REPORT_TO, real
    errors to REPORT_TO, each in its own message.
    """

    def start(self) -> tuple:
        """A sink and a service sending to it; C{(sink, service)}."""
        sink = SMTPSink(self)
        service = start_service(self, **smtp_settings(
            sink.port, REPORT_TO=["ops@example.com"],
            JUST_MONITORING_REPORT_TO=["canary@example.com"]))
        return sink, service

    @defer.inlineCallbacks
    def test_separate_messages(self):
        """
        A window with both kinds sends one message to each address, each
        with only its own errors.
        """
        sink, service = self.start()
        outcomes = yield report(service, [
            record(f"canary {MARKER}"), record("real trouble"),
            record("real trouble")])
        self.assertEqual(outcomes, [True, True])
        received = {tuple(envelope.rcpt_tos): message.get_content()
                    for envelope, message in zip(sink.envelopes,
                                                 sink.messages)}
        self.assertEqual(sorted(received),
                         [("canary@example.com",), ("ops@example.com",)])
        real = received[("ops@example.com",)]
        self.assertIn("2X real trouble", real)
        self.assertNotIn(MARKER, real)
        canary = received[("canary@example.com",)]
        self.assertIn(f"1X canary {MARKER}", canary)
        self.assertNotIn("real trouble", canary)

    @defer.inlineCallbacks
    def test_only_monitoring(self):
        """
        A window of only monitoring errors sends nothing to REPORT_TO.
        """
        sink, service = self.start()
        outcomes = yield report(service, [record(f"canary {MARKER}")])
        self.assertEqual(outcomes, [True])
        self.assertEqual([envelope.rcpt_tos for envelope in sink.envelopes],
                         [["canary@example.com"]])

    @defer.inlineCallbacks
    def test_two_teams(self):
        """
        With ROUTES, each team's address gets one message with only its
        errors, sent over UDP from two hosts; the rest goes to REPORT_TO.
        """
        sink = SMTPSink(self)
        service = start_service(self, **smtp_settings(
            sink.port, REPORT_TO=["ops@example.com"], ROUTES=[
                {"name": "billing", "match": {"kind": "^billing$"},
                 "to": "billing@example.com"},
                {"name": "dba", "match": {"source": r"^db\d+$"},
                 "to": "dba@example.com"}]))
        outcomes = yield report(service, [
            record("card declined", kind="billing", source="web1"),
            record("deadlock", source="db1"), record("deadlock",
                                                     source="web2"),
            record("cart empty", source="web1")])
        self.assertEqual(outcomes, [True, True, True])
        received = {tuple(envelope.rcpt_tos): message
                    for envelope, message in zip(sink.envelopes,
                                                 sink.messages)}
        self.assertEqual(sorted(received), [
            ("billing@example.com",), ("dba@example.com",),
            ("ops@example.com",)])
        self.assertEqual(digest_counts(
            received[("billing@example.com",)].get_content()),
            {"card declined": {"web1": 1}})
        self.assertEqual(digest_counts(
            received[("dba@example.com",)].get_content()),
            {"deadlock": {"db1": 1}})
        self.assertEqual(digest_counts(
            received[("ops@example.com",)].get_content()),
            {"deadlock": {"web2": 1}, "cart empty": {"web1": 1}})
        self.assertEqual(received[("dba@example.com",)]["X-Failnozzle"],
                         "route:dba")


class PagerTests(TestCase):
    """
    The pager alert, end to end.
    """

    @defer.inlineCallbacks
    def test_alert_on_crossing_limit(self):
        """
        Below PAGER_LIMIT nobody is paged; the flush that crosses it sends
        one alert to PAGER_TO, from PAGER_FROM with PAGER_REPLY_TO.
        """
        sink = SMTPSink(self)
        service = start_service(self, **smtp_settings(
            sink.port, PAGER_LIMIT=3, PAGER_TO=["pager@example.com"],
            PAGER_FROM="alarm@example.com",
            PAGER_REPLY_TO="oncall@example.com", SERVER_NAME="nozzle1",
            REPEAT_SECONDS=0))
        outcomes = yield report(service, [record("boom"), record("boom")])
        self.assertEqual(outcomes, [True])
        outcomes = yield report(service, [record("boom")])
        self.assertEqual(outcomes, [True, True])
        pages = [message for envelope, message
                 in zip(sink.envelopes, sink.messages)
                 if envelope.rcpt_tos == ["pager@example.com"]]
        self.assertEqual(len(pages), 1)
        [page] = pages
        self.assertEqual(page["To"], "pager@example.com")
        self.assertEqual(page["From"], "alarm@example.com")
        self.assertEqual(page["Reply-To"], "oncall@example.com")
        self.assertTrue(page["Subject"].startswith(
            "nozzle1 error rate exceeded: 3 errors, most Error: boom"))
        self.assertIn("received 3 errors", page.get_content())
        self.assertEqual(len(sink.messages), 3)

    @defer.inlineCallbacks
    def test_storm_pages_once_then_resolves(self):
        """
        A storm over several flushes pages once, naming its error and host;
        once the rate has been below the limit for a whole window, one
        "resolved" follows, and nothing more.
        """
        sink = SMTPSink(self)
        service = start_service(self, **smtp_settings(
            sink.port, PAGER_LIMIT=3, PAGER_WINDOW_SIZE=2,
            PAGER_TO=["pager@example.com"], SERVER_NAME="nozzle1",
            REPEAT_SECONDS=0))
        for _ in range(4):
            yield report(service, [record("boom", source="web3")] * 3)
        for _ in range(4):
            yield bounded(defer.gatherResults(service.flush()))
        pages = [message for envelope, message
                 in zip(sink.envelopes, sink.messages)
                 if envelope.rcpt_tos == ["pager@example.com"]]
        self.assertEqual([page["Subject"].split(":")[0] for page in pages],
                         ["nozzle1 error rate exceeded",
                          "nozzle1 error rate resolved"])
        self.assertIn("  3X Error: boom in views (app) [new]\n",
                      pages[0].get_content())
        self.assertIn("  web3: 3\n", pages[0].get_content())
        self.assertIn("with 12 errors in all", pages[1].get_content())


class StopTests(TestCase):
    """
    A clean stop over a real socket.
    """

    @defer.inlineCallbacks
    def test_datagrams_queued_at_stop_are_reported(self):
        """
        Datagrams the kernel holds when the stop begins, not yet read by the
        reactor, are read and reported in the last digest.
        """
        service = start_service(self)
        send_datagrams(udp_address(service),
                       [record("late", source=f"web{i}") for i in range(50)])
        yield service.stopService()
        mail = service.outbox.transport.path
        [name] = os.listdir(os.path.join(mail, "new"))
        with open(os.path.join(mail, "new", name), "rb") as stored:
            body = email.message_from_binary_file(
                stored, policy=email.policy.default).get_content()
        self.assertIn("** 50 instances of 1 unique error (app) **", body)
        self.assertIn("- on web49, 1X", body)


class GELFClientTests(TestCase):
    """
    A real GELF client library, in its default settings (compressed, and
    chunked past 1,300 bytes), sending to the failnozzle port.
    """

    @defer.inlineCallbacks
    def test_pygelf(self):
        """
        pygelf's UDP handler, with a traceback too large for one chunk, is
        counted as failnozzle's own reports are: the short message, the
        traceback, the sending host as the source.
        """
        import logging

        from pygelf import GelfUdpHandler

        service = start_service(self)
        host, port = udp_address(service)
        handler = GelfUdpHandler(host=host, port=port)
        logger = logging.getLogger("failnozzle.test.gelf")
        logger.propagate = False
        logger.addHandler(handler)
        self.addCleanup(logger.removeHandler, handler)
        # About 1,800 bytes once compressed: two chunks of 1,300.
        noise = os.urandom(1500).hex()
        arrived = datagrams_received(service, 2)
        try:
            raise ValueError(noise)
        except ValueError:
            logger.exception("payment failed")
        yield arrived
        [entry] = service.aggregator.flush().entries
        key = dict(zip(service.settings.unique_fields, entry.key))
        self.assertEqual(key["message"], "payment failed")
        self.assertIn(noise, key["exc_text"])
        self.assertEqual(key["kind"], "gelf")
        self.assertEqual(list(entry.sources.values()), [1])
        _, body = service.renderer.render(Batch.of([entry]))
        self.assertIn("\nLevel: error (3)\n", body)

    @defer.inlineCallbacks
    def test_gelf_bind(self):
        """
        With GELF_BIND, GELF sent to that second port is counted too.
        """
        import logging

        from pygelf import GelfUdpHandler

        from failnozzle.ingest import bind_udp_socket

        gelf_socket, _ = bind_udp_socket("127.0.0.1", 0, 65536)
        settings = make_settings(
            UDP_BIND=("127.0.0.1", 0), GELF_BIND=("127.0.0.1", 0),
            **{name: self.mktemp()
               for name in ("SPOOL_DIR", "STATE_FILE", "MAILDIR")})
        udp_socket, _ = bind_udp_socket("127.0.0.1", 0, 65536)
        service = FailnozzleService(settings, reactor, udp_socket,
                                    gelf_socket=gelf_socket)
        service.startService()
        self.addCleanup(service.stopService)
        gelf_address = service.ports[1].getHost()
        handler = GelfUdpHandler(host="127.0.0.1", port=gelf_address.port)
        logger = logging.getLogger("failnozzle.test.gelf_bind")
        logger.propagate = False
        logger.addHandler(handler)
        self.addCleanup(logger.removeHandler, handler)
        arrived = defer.Deferred()
        receiver = service.ports[1].protocol
        handle = receiver.datagramReceived

        def counting(data, addr):
            handle(data, addr)
            arrived.callback(None)

        receiver.datagramReceived = counting
        logger.error("queue stuck")
        yield bounded(arrived)
        [entry] = service.aggregator.flush().entries
        key = dict(zip(service.settings.unique_fields, entry.key))
        self.assertEqual((key["message"], key["kind"]), ("queue stuck", "gelf"))
        self.assertEqual(entry.level, 3)
