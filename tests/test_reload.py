"""
Reloading the config (SIGHUP) over real sockets, in process and in a real
C{twistd}: what was counted stays, new settings and addresses take effect,
and a config that cannot be used changes nothing.
"""
from __future__ import annotations

import os
import socket

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from failnozzle.listeners import bind_listening
from failnozzle.service import FailnozzleService
from tests.common import (FakeMailTransport, SMTPSink, datagrams_received,
                          make_settings, poll_until, record,
                          send_datagrams)
from tests.test_mailin_integration import cron_mail, send_mail
from tests.test_twistd import _TwistdTestCase, write_config


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def can_bind(address: tuple) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(address)
        except OSError:
            return False
    return True


class MovedPortTests(TestCase):
    """
    A reload that changes UDP_BIND moves the service to the new address.
    """

    def start(self) -> tuple:
        """
        A running service on 127.0.0.1 whose reload takes the settings
        L{changed} gives, and the transport it sends with.
        """
        self.overrides = dict(
            UDP_BIND=("127.0.0.1", 0), FLUSH_SECONDS=3600,
            SPOOL_DIR=self.mktemp(), STATE_FILE=self.mktemp(),
            MAILDIR=self.mktemp())
        settings = make_settings(**self.overrides)
        self.given = []
        transport = FakeMailTransport()
        service = FailnozzleService(
            settings, reactor, bind_listening(settings, ["UDP_BIND"])[
                "UDP_BIND"],
            transport, reload_settings=lambda: self.given.pop(0))
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service, transport

    def changed(self, **changes) -> None:
        """What the next reload reads: the settings, so changed."""
        self.given.append(
            (make_settings(**dict(self.overrides, **changes)), []))

    @defer.inlineCallbacks
    def test_udp_bind_changed(self):
        """
        After the reload the new address is read and the old one closed;
        errors from before and after are in one digest.
        """
        service, transport = self.start()
        old = ("127.0.0.1", service.udp_port.getHost().port)
        arrived = datagrams_received(service, 1)
        send_datagrams(old, [record("before")])
        yield arrived

        new = ("127.0.0.1", free_udp_port())
        self.changed(UDP_BIND=new)
        self.assertTrue(service.reload())
        self.assertEqual(service.udp_port.getHost().port, new[1])
        yield poll_until(lambda: can_bind(old), f"{old} to be closed")
        arrived = datagrams_received(service, 1)
        send_datagrams(new, [record("after")])
        yield arrived
        service.flush()
        [(_, _, message, _)] = transport.pending
        body = message.get_content()
        self.assertIn("1X before", body)
        self.assertIn("1X after", body)

    @defer.inlineCallbacks
    def test_same_port_all_interfaces(self):
        """
        From 127.0.0.1:P to 0.0.0.0:P, which cannot be bound beside the old
        socket (what the start-up notice about UDP_BIND suggests): the old
        port is closed first, then the new one read.
        """
        service, transport = self.start()
        port = service.udp_port.getHost().port
        arrived = datagrams_received(service, 1)
        send_datagrams(("127.0.0.1", port), [record("before")])
        yield arrived
        self.changed(UDP_BIND=("0.0.0.0", port))
        self.assertTrue(service.reload())
        yield poll_until(lambda: service.udp_port is not None
                         and service.udp_port.getHost().host == "0.0.0.0",
                         "the port to move to 0.0.0.0")
        arrived = datagrams_received(service, 1)
        send_datagrams(("127.0.0.1", port), [record("after")])
        yield arrived
        service.flush()
        [(_, _, message, _)] = transport.pending
        self.assertIn("** 2 instances of 2 unique errors", message.get_content())

    @defer.inlineCallbacks
    def test_mail_turned_on(self):
        """
        A reload that sets SMTP_INGEST_BIND starts the SMTP server: mail
        sent to it is counted.
        """
        service, transport = self.start()
        self.changed(SMTP_INGEST_BIND=("127.0.0.1", 0))
        self.assertIsNone(service.smtp_port)
        self.assertTrue(service.reload())
        yield send_mail(service, cron_mail(1))
        service.flush()
        [(_, _, message, _)] = transport.pending
        self.assertIn("Cron <root@web1>", message.get_content())

    @defer.inlineCallbacks
    def test_new_address_in_use(self):
        """
        A new address that cannot be bound keeps the reload from being
        taken at all: the old port is still read.
        """
        service, _ = self.start()
        taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        self.changed(UDP_BIND=taken.getsockname(),
                     REPORT_TO="new@example.com")
        self.assertFalse(service.reload())
        self.assertEqual(service.settings.REPORT_TO, ("failnozzle@localhost",))
        arrived = datagrams_received(service, 1)
        send_datagrams(("127.0.0.1", service.udp_port.getHost().port),
                       [record("still read")])
        yield arrived


class SighupDaemonTests(_TwistdTestCase):
    """
    SIGHUP to a running C{twistd -n failnozzle}.
    """

    @defer.inlineCallbacks
    def test_sighup_reloads(self):
        """
        SIGHUP reads the config file again: the digest of what was counted
        before and after goes to the new recipient, from the new port; the
        daemon keeps running and logs what changed.
        """
        sink = SMTPSink(self)
        settings = self.smtp_settings(sink.port, flush_seconds=3600)
        process, address, cwd = yield self.start_daemon(**settings)
        send_datagrams(address, [record("before", source="web1")])
        send_datagrams(address, [b"not json"])
        yield process.wait_for("Bad input from")
        new_port = free_udp_port()
        settings.update(REPORT_TO=["new@example.com"], FLUSH_SECONDS=1,
                        UDP_BIND=("127.0.0.1", new_port))
        write_config(cwd, **settings)
        process.transport.signalProcess("HUP")
        yield process.wait_for(r"Reloaded the config: .*REPORT_TO")
        send_datagrams(("127.0.0.1", new_port),
                       [record("after", source="web2")])
        [message] = yield process.wait_for_mail(sink, 1)
        self.assertEqual(sink.envelopes[0].rcpt_tos, ["new@example.com"])
        body = message.get_content()
        self.assertIn("1X before", body)
        self.assertIn("1X after", body)
        self.assertIsNone(process.reason)
        self.assertNotIn("Traceback", process.text)

    @defer.inlineCallbacks
    def test_sighup_with_broken_config(self):
        """
        SIGHUP with a config file that no longer loads logs one line and
        keeps the daemon running on the settings it had.
        """
        sink = SMTPSink(self)
        settings = self.smtp_settings(sink.port, flush_seconds=1)
        process, address, cwd = yield self.start_daemon(**settings)
        with open(os.path.join(cwd, "site.py"), "a") as config:
            config.write("FLUSH_SECONDS = 'soon'\n")
        process.transport.signalProcess("HUP")
        yield process.wait_for(r"Not reloading the config: .*FLUSH_SECONDS")
        send_datagrams(address, [record("still counted")])
        [message] = yield process.wait_for_mail(sink, 1)
        self.assertIn("still counted", message.get_content())
        self.assertIsNone(process.reason)
