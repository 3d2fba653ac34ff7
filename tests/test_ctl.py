"""
failnozzle-ctl against the real C{twistd failnozzle}, with digests over
real SMTP (aiosmtpd): status after a delivery failure, the failed message
listed and resent, a flush on demand.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import sys

from twisted.internet import defer, protocol, reactor, utils
from twisted.trial.unittest import SynchronousTestCase

import failnozzle.ctl
from failnozzle.ctl import duration_argument

from tests.common import SMTPSink, free_tcp_port, record, send_datagrams
from tests.test_twistd import _TwistdTestCase, child_environment

_HTTP = re.compile(r"listening for status and control on HTTP "
                   r"(127\.0\.0\.1:\d+)")


def ctl(*args: str) -> defer.Deferred:
    """Run C{failnozzle-ctl *args}; fires with (stdout, stderr, status)."""
    return utils.getProcessOutputAndValue(
        sys.executable, ["-m", "failnozzle.ctl", *args],
        env=child_environment())


@defer.inlineCallbacks
def buffered(http: str, total: int):
    """Ask C{status} until the daemon buffers C{total} errors (at most a
    hundred times)."""
    for _ in range(100):
        out, _, _ = yield ctl("--http", http, "--json", "status")
        if json.loads(out)["buffered"]["total"] == total:
            return


class CtlTests(_TwistdTestCase):
    """failnozzle-ctl, as an operator uses it."""

    @defer.inlineCallbacks
    def test_failed_resend_and_flush(self):
        """
        A digest the server refuses for good shows as the last delivery
        error in C{status} and in C{failed list}; C{failed resend} sends it
        again, now accepted; C{flush} sends what is buffered at once.
        """
        sink = SMTPSink(self, first_answers=["550 mailbox unavailable"])
        process, address, _ = yield self.start_daemon(
            **self.smtp_settings(sink.port, 3600, GROUP_WAIT_SECONDS=0.5))
        http = _HTTP.search(process.text).group(1)
        send_datagrams(address, [record("boom")])
        yield process.wait_for(r"Giving up on")

        out, err, status = yield ctl("--http", http, "status")
        self.assertEqual(status, 0, err)
        self.assertIn(b"last delivery error:", out)
        self.assertIn(b"550 mailbox unavailable", out)
        self.assertIn(b"spool: 0 waiting, 1 failed", out)

        out, err, status = yield ctl("--http", http, "failed", "list")
        self.assertEqual(status, 0, err)
        [line] = out.decode().splitlines()
        self.assertIn("to ops@example.com: [", line)
        self.assertIn("1 new: Error: boom", line)

        out, err, status = yield ctl("--http", http, "failed", "resend")
        self.assertEqual((out, status), (b"resent 1 message(s)\n", 0), err)
        [message] = yield sink.wait_for(1)
        self.assertIn("boom", message.get_content())

        # A flush went out within FLUSH_SECONDS: no group wait, these
        # wait for the next flush, or for one asked for.
        send_datagrams(address, [record("bang"), record("bang")])
        yield buffered(http, 2)
        out, err, status = yield ctl("--http", http, "flush")
        self.assertEqual((out, status),
                         (b"flushed 2 errors into 1 digest(s)\n", 0), err)
        [_, message] = yield sink.wait_for(2)
        self.assertIn("bang", message.get_content())

    @defer.inlineCallbacks
    def test_silence_running_daemon(self):
        """
        C{silence add} keeps a known error out of a running daemon's next
        digest, which says how many it kept out and why; C{silence list}
        shows it with its count; C{silence remove} ends it.
        """
        sink = SMTPSink(self)
        process, address, _ = yield self.start_daemon(
            **self.smtp_settings(sink.port, 3600))
        http = _HTTP.search(process.text).group(1)
        out, err, status = yield ctl(
            "--http", http, "silence", "add", "--until",
            "2099-01-01T00:00:00Z", "--comment", "known, OPS-12",
            "kind=^legacy$")
        self.assertEqual(status, 0, err)
        self.assertTrue(out.startswith(b"added "), out)
        send_datagrams(address, [record("cron failed", kind="legacy")] * 3
                       + [record("boom")])
        for _ in range(100):
            out, err, status = yield ctl("--http", http, "--json", "status")
            if json.loads(out)["buffered"]["total"] == 4:
                break
        out, err, status = yield ctl("--http", http, "flush")
        self.assertEqual(status, 0, err)
        [message] = yield sink.wait_for(1)
        body = message.get_content()
        self.assertNotIn("cron failed", body)
        self.assertIn("3 errors silenced by 1 rule: known, OPS-12", body)
        out, err, status = yield ctl("--http", http, "silence", "list")
        [line] = out.decode().splitlines()
        self.assertIn("kind=^legacy$  (known, OPS-12)  3 silenced", line)
        silence_id = line.split()[0]
        out, err, status = yield ctl("--http", http, "silence", "remove",
                                     silence_id)
        self.assertEqual((out, status),
                         (f"removed {silence_id}\n".encode(), 0), err)

    @defer.inlineCallbacks
    def test_status_of_odd_text(self):
        """
        An error whose text holds a lone surrogate (a datagram may) is in
        C{status} as a backslash escape: the command does not fail on it;
        and a terminal's control sequence a sender put in its text is
        shown escaped, not played on the operator's terminal.
        """
        process, address, _ = yield self.start_daemon(
            UDP_BIND=("127.0.0.1", 0), HTTP_BIND=("127.0.0.1", 0),
            FLUSH_SECONDS=3600)
        http = _HTTP.search(process.text).group(1)
        send_datagrams(address, [b'{"message": "lone \\ud800 half", '
                                 b'"source": "web\\udfff"}',
                                 b'{"message": "clear \\u001b[2J\\r'
                                 b'\\u009b31m me", "source": "web1"}'])
        yield buffered(http, 2)
        out, err, status = yield ctl("--http", http, "status")
        self.assertEqual(status, 0, err)
        self.assertIn(b"lone \\ud800 half", out)
        self.assertIn(b"clear \\x1b[2J\\x0d\\x9b31m me", out)
        self.assertNotIn(b"\x1b", out)
        self.assertNotIn(b"\r", out)

    @defer.inlineCallbacks
    def test_unreachable(self):
        """Nothing listening: one line saying so, status 1."""
        out, err, status = yield ctl("--http", f"127.0.0.1:{free_tcp_port()}",
                                     "status")
        self.assertEqual((out, status), (b"", 1))
        self.assertRegex(err.decode(), r"^failnozzle-ctl: cannot reach "
                                       r"failnozzle at 127\.0\.0\.1:\d+: ")
        self.assertEqual(len(err.decode().splitlines()), 1)

    @defer.inlineCallbacks
    def test_not_http(self):
        """
        Something else on the port (it answers a line that is no HTTP):
        one line saying so, status 1.
        """
        factory = protocol.ServerFactory.forProtocol(_Banner)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        out, err, status = yield ctl(
            "--http", f"127.0.0.1:{port.getHost().port}", "status")
        self.assertEqual((out, status), (b"", 1))
        [line] = err.decode().splitlines()
        self.assertRegex(line, r"^failnozzle-ctl: 127\.0\.0\.1:\d+ did not "
                               r"answer HTTP .*: is it failnozzle's "
                               r"HTTP_BIND\?$")

    @defer.inlineCallbacks
    def test_usage_errors(self):
        """
        What cannot be sent as asked is a usage error (status 2) naming
        it, before anything is sent: a port out of range, an address
        without a port, a token with a line break, a silence that is not
        FIELD=REGEX.
        """
        http = f"127.0.0.1:{free_tcp_port()}"
        for args, said in [
                (["--http", "127.0.0.1:99999", "status"],
                 "not HOST:PORT with a port from 1 to 65535"),
                (["--http", "::1", "status"], "not HOST:PORT"),
                (["--http", http, "--token", "a\r\nX-Evil: 1", "status"],
                 "the token holds a line break"),
                (["--http", http, "silence", "add", "--until", "1",
                  "kind"], "'kind' is not FIELD=REGEX"),
                (["--http", http, "silence", "add", "--until", "1",
                  "kind=a", "kind=b"], "kind is given twice")]:
            out, err, status = yield ctl(*args)
            self.assertEqual((out, status), (b"", 2), args)
            self.assertIn(said, err.decode(), args)
            self.assertNotIn("Traceback", err.decode(), args)


class _Banner(protocol.Protocol):
    """A server that is not HTTP: says one line and hangs up."""

    def connectionMade(self):
        self.transport.write(b"SSH-2.0-OpenSSH_9.2\r\n")
        self.transport.loseConnection()


class SilenceForTests(SynchronousTestCase):
    """
    C{silence add --for DURATION}: the silence ends that long from now.
    """

    def asked(self, *args: str) -> tuple:
        """The path and body C{failnozzle-ctl *args} asks the daemon."""
        asked = []

        def request(address, path, token, body=None):
            asked.append((path, body))
            return {"silence": {"id": "s1", "until": "then", "match": {},
                                "comment": "", "silenced": 0,
                                "origin": "control"}}

        self.patch(failnozzle.ctl, "request", request)
        self.patch(sys, "stdout", io.StringIO())
        self.assertEqual(failnozzle.ctl.main(list(args)), 0)
        [(path, body)] = asked
        return path, body

    def test_for(self):
        """The duration is sent as it is: the daemon's clock ends it."""
        path, body = self.asked("silence", "add", "--for", "1h30m",
                                "--comment", "deploy", "kind=shop")
        self.assertEqual((path, body), ("/api/silences/add", {
            "match": {"kind": "shop"}, "comment": "deploy", "for": 5400.0}))

    def test_until_as_given(self):
        _, body = self.asked("silence", "add", "--until",
                             "2027-01-31T00:00:00Z", "kind=shop")
        self.assertEqual(body["until"], "2027-01-31T00:00:00Z")
        _, body = self.asked("silence", "add", "--until", "1800000000",
                             "kind=shop")
        self.assertEqual(body["until"], 1800000000.0)

    def test_durations(self):
        for text, seconds in [("45s", 45), ("90m", 5400), ("2h", 7200),
                              ("1d", 86400), ("1w", 604800),
                              ("1d2h3m4s", 93784), ("600", 600),
                              ("5200w", 5200 * 604800)]:
            self.assertEqual(duration_argument(text), seconds, text)
        for text in ["", "2x", "h", "1h 30m", "-5", "0", "0h", "１h",
                     "1.5h", "9" * 400 + "w", "9" * 400, "5300w"]:
            self.assertRaises(argparse.ArgumentTypeError,
                              duration_argument, text)
