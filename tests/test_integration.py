"""
Datagrams over a real UDP socket to the service, digests over real SMTP to
an independent server (aiosmtpd).
"""
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.common import (SMTPSink, datagrams_received, record, send_datagrams,
                          start_service, udp_address)


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
