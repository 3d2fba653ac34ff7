"""
End-to-end: the real C{twistd failnozzle} as a child process, as an
operator starts it, with datagrams over real UDP and digests over real SMTP
(aiosmtpd) or into a maildir.

The daemon is run by the interpreter running the tests, on the same copy of
failnozzle the tests import (see L{child_environment}).
"""
from __future__ import annotations

import http.client as http_client
import json
import os
import re
import signal
import smtplib
import socket
import sys
import sysconfig
from typing import Optional

from twisted.internet import defer, error, protocol, reactor, threads
from twisted.trial.unittest import TestCase

import failnozzle
from failnozzle.spool import Spool
from failnozzle.config import DEFAULT_MONITORING_ERROR_MARKERS
from tests.common import (WAIT_SECONDS, SMTPSink, SilentServer,
                          digest_counts, free_tcp_port, maildir_files,
                          poll_until, read_message, record, send_datagrams,
                          state_file_total)

#: What the C{twistd} console script runs.  C{python -m twisted} would run
#: C{twist}, which has no C{-n}, C{--pidfile} or C{--logfile}.
TWISTD = [sys.executable, "-c",
          "from twisted.scripts.twistd import run; run()"]

_LISTENING = re.compile(r"listening for errors on UDP 127\.0\.0\.1:(\d+)")
_SHUT_DOWN = "Server Shut Down."


def child_environment() -> dict:
    """
    This process's environment, so the child finds the installed packages
    and the failnozzle plugin, with the copy of failnozzle the tests import
    put first on C{PYTHONPATH} when it is a source tree rather than an
    installed package: the daemon then runs the code under test even if
    an older failnozzle is installed.
    """
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(
        failnozzle.__file__)))
    installed = {os.path.realpath(sysconfig.get_paths()[key])
                 for key in ("purelib", "platlib")}
    if os.path.realpath(root) not in installed:
        env["PYTHONPATH"] = os.pathsep.join(
            [root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


class TwistdProcess(protocol.ProcessProtocol):
    """
    Collects a child's stdout and stderr as one text, lets a test wait for
    a line in it, and for the end of the process.

    @ivar ended: fires with the reason the process ended
        (L{error.ProcessDone} or L{error.ProcessTerminated}).
    """

    def __init__(self) -> None:
        self.output = b""
        self.reason = None
        self.ended = defer.Deferred()
        self._waiting: list = []

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    @property
    def _lines(self) -> str:
        """The output up to its last complete line."""
        return self.text[:self.text.rfind("\n") + 1]

    def outReceived(self, data: bytes) -> None:
        self.output += data
        still_waiting = []
        for pattern, found in self._waiting:
            match = pattern.search(self._lines)
            if match:
                found.callback(match)
            else:
                still_waiting.append((pattern, found))
        self._waiting = still_waiting

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.reason = reason.value
        waiting, self._waiting = self._waiting, []
        for pattern, found in waiting:
            found.errback(AssertionError(
                f"twistd ended ({reason.value}) before logging "
                f"{pattern.pattern!r}; its output:\n{self.text}"))
        self.ended.callback(reason.value)

    def wait_for(self, pattern: str) -> defer.Deferred:
        """
        A Deferred firing with the first match of the regular expression
        C{pattern} in the complete lines of output, at most L{WAIT_SECONDS}
        from now.
        """
        compiled = re.compile(pattern, re.MULTILINE)
        match = compiled.search(self._lines)
        if match:
            return defer.succeed(match)
        if self.reason is not None:
            return defer.fail(AssertionError(
                f"twistd ended ({self.reason}) without logging {pattern!r}; "
                f"its output:\n{self.text}"))
        entry = []
        found = defer.Deferred(lambda _: self._waiting.remove(entry[0]))
        entry.append((compiled, found))
        self._waiting.append(entry[0])
        return found.addTimeout(WAIT_SECONDS, reactor).addErrback(
            self._timed_out, f"logging {pattern!r}")

    def wait_for_end(self) -> defer.Deferred:
        """The reason the process ended, at most L{WAIT_SECONDS} from now."""
        ended = defer.Deferred()

        def fire(reason):
            if not ended.called:  # not cancelled by the timeout
                ended.callback(reason)
            return reason

        self.ended.addCallback(fire)
        return ended.addTimeout(WAIT_SECONDS, reactor).addErrback(
            self._timed_out, "the end of the process")

    def wait_for_mail(self, sink: SMTPSink, count: int) -> defer.Deferred:
        """
        C{sink.wait_for(count)}, failing with this process's output if the
        messages do not arrive.
        """
        return sink.wait_for(count).addErrback(
            self._timed_out, f"sending {count} message(s) to {sink.port}")

    def _timed_out(self, failure, what: str):
        failure.trap(defer.TimeoutError)
        raise AssertionError(
            f"twistd did not get to {what} within {WAIT_SECONDS} s; its "
            f"output:\n{self.text}")


def spawn_twistd(testcase: TestCase, args: list, cwd: str,
                 command: list = TWISTD,
                 process: Optional[TwistdProcess] = None) -> TwistdProcess:
    """
    Run C{twistd *args} (or C{command + args}) in C{cwd}, read by
    C{process} (by default a new L{TwistdProcess}).  If it is still running
    when the test ends, it is killed (SIGKILL) and waited for.
    """
    process = process or TwistdProcess()
    if (command == TWISTD and "failnozzle" in args
            and not any(arg.startswith("--http") for arg in args)):
        # HTTP on a free port, as UDP: tests run side by side.
        at = args.index("failnozzle") + 1
        args = args[:at] + ["--http", "127.0.0.1:0"] + args[at:]
    transport = reactor.spawnProcess(process, sys.executable, command + args,
                                     env=child_environment(), path=cwd)

    def kill_if_running():
        if process.reason is not None:
            return None
        try:
            transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass
        return process.ended

    testcase.addCleanup(kill_if_running)
    return process


def write_config(directory: str, **settings) -> str:
    """Write a config file of these assignments; return its path."""
    path = os.path.join(directory, "site.py")
    with open(path, "w") as config:
        for name, value in settings.items():
            config.write(f"{name} = {value!r}\n")
    return path


def lines_of(text: str) -> list:
    return [line for line in text.splitlines() if line.strip()]


class _TwistdTestCase(TestCase):
    """
    Helpers for running twistd in a directory of the test's own.
    """

    def make_directory(self) -> str:
        """A new empty directory (absolute path) for this test."""
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def smtp_settings(self, port: int, flush_seconds: float,
                      **more) -> dict:
        """Settings for mail to 127.0.0.1:C{port} in clear."""
        return dict(UDP_BIND=("127.0.0.1", 0), FLUSH_SECONDS=flush_seconds,
                    SMTP_HOST="127.0.0.1", SMTP_PORT=port, SMTP_TLS="off",
                    REPORT_FROM="nozzle@example.com",
                    REPORT_TO=["ops@example.com"], **more)

    @defer.inlineCallbacks
    def start_daemon(self, *args, cwd: Optional[str] = None, **settings):
        """
        Run C{twistd -n failnozzle *args} with a config file of
        C{settings} (if any) in C{cwd} (by default a new directory), and
        wait until it listens.

        @return: a Deferred firing with C{(process, (host, port), cwd)}.
        """
        cwd = cwd or self.make_directory()
        if settings:
            args = (f"--config={write_config(cwd, **settings)}",) + args
        process = spawn_twistd(self, ["-n", "failnozzle", *args], cwd)
        listening = yield process.wait_for(_LISTENING.pattern)
        return process, ("127.0.0.1", int(listening.group(1))), cwd


class SMTPDaemonTests(_TwistdTestCase):
    """
    C{twistd -n failnozzle --config=site.py} sending digests to a real SMTP
    server.
    """

    @defer.inlineCallbacks
    def test_digest_arrives(self):
        """
        The daemon logs the UDP port it got; errors sent there arrive after
        FLUSH_SECONDS as one digest with their counts per source.
        """
        sink = SMTPSink(self)
        process, address, _ = yield self.start_daemon(
            **self.smtp_settings(sink.port, flush_seconds=1))
        send_datagrams(address, [
            record("boom", source="web1"), record("boom", source="web2"),
            record("boom", source="web2")])
        [message] = yield process.wait_for_mail(sink, 1)
        self.assertEqual(message["From"], "nozzle@example.com")
        self.assertEqual(sink.envelopes[0].rcpt_tos, ["ops@example.com"])
        body = message.get_content()
        self.assertIn("** 3 instances of 1 unique error (app) **", body)
        self.assertIn("- on web1, 1X\n- on web2, 2X\n", body)
        yield process.wait_for(r"Sent .* via SMTP")

    @defer.inlineCallbacks
    def test_canaries_stop_and_come_back(self):
        """
        With CANARY_MAX_SILENCE_SECONDS, canaries that stop coming page
        PAGER_TO that the pipeline may be broken, once; when one comes
        again, PAGER_TO is told they are back.
        """
        sink = SMTPSink(self)
        process, address, _ = yield self.start_daemon(
            **self.smtp_settings(
                sink.port, flush_seconds=0.5, CANARY_MAX_SILENCE_SECONDS=1,
                PAGER_TO=["pager@example.com"],
                JUST_MONITORING_REPORT_TO=["canary@example.com"]))
        canary = record(f"canary {DEFAULT_MONITORING_ERROR_MARKERS[0]}")
        send_datagrams(address, [canary])
        messages = yield process.wait_for_mail(sink, 2)
        pages = [message for message in messages
                 if message["X-Failnozzle"] == "canary"]
        [missed] = pages
        self.assertIn("the error pipeline may be broken", missed["Subject"])
        self.assertEqual(missed["To"], "pager@example.com")
        send_datagrams(address, [canary])
        messages = yield process.wait_for_mail(sink, 4)
        pages = [message["Subject"] for message in messages
                 if message["X-Failnozzle"] == "canary"]
        self.assertEqual(len(pages), 2, pages)
        self.assertTrue(pages[1].endswith(": canaries are back"), pages)

    @defer.inlineCallbacks
    def test_sigterm_delivers_buffered_errors(self):
        """
        On SIGTERM the errors received but not yet flushed (FLUSH_SECONDS
        is an hour) are sent before the process ends, and the process ends
        as twistd's clean stop on a signal does: killed by that signal
        after logging "Server Shut Down.".
        """
        sink = SMTPSink(self)
        process, address, _ = yield self.start_daemon(
            **self.smtp_settings(sink.port, flush_seconds=3600))
        send_datagrams(address, [
            record("boom", source="web1"), record("boom", source="web1"),
            record("bang", source="web2")])
        # The daemon logs nothing per good datagram.  A bad one, sent last
        # on the same socket, is logged once read: by then the kernel has
        # handed over the good ones before it (one socket, in order).
        send_datagrams(address, [b"not json"])
        yield process.wait_for(r"Bad input from 127\.0\.0\.1:\d+: "
                               r"datagram is not valid JSON")
        self.assertEqual(sink.messages, [])

        process.transport.signalProcess("TERM")
        reason = yield process.wait_for_end()
        [message] = yield process.wait_for_mail(sink, 1)

        body = message.get_content()
        self.assertIn(
            "** 4 instances of 3 unique errors (app, failnozzle) **", body)
        self.assertIn("2X boom (in app, src/app/views.py:50)", body)
        self.assertIn("1X bang (in app, src/app/views.py:50)", body)
        self.assertIn("Internal error: datagram is not valid JSON", body)
        log = process.text
        self.assertIn("Received SIGTERM", log)
        self.assertLess(log.index("Received SIGTERM"), log.index("Sent "))
        self.assertLess(log.index("Sent "), log.index(_SHUT_DOWN))
        self.assertNotIn("Traceback", log)
        self.assertIsInstance(reason, error.ProcessTerminated)
        self.assertEqual(reason.signal, signal.SIGTERM)


    @defer.inlineCallbacks
    def test_sigint_as_sigterm(self):
        """
        SIGINT (Ctrl-C on C{twistd -n}) stops as SIGTERM does: what was
        received is sent, and the process ends killed by SIGINT after
        twistd's clean stop.
        """
        sink = SMTPSink(self)
        process, address, _ = yield self.start_daemon(
            **self.smtp_settings(sink.port, flush_seconds=3600))
        send_datagrams(address, [record("boom"), b"not json"])
        yield process.wait_for(r"datagram is not valid JSON")
        process.transport.signalProcess("INT")
        reason = yield process.wait_for_end()
        [message] = yield process.wait_for_mail(sink, 1)
        self.assertIn("1X boom", message.get_content())
        self.assertIn("Received SIGINT, shutting down.", process.text)
        self.assertIn(_SHUT_DOWN, process.text)
        self.assertNotIn("Traceback", process.text)
        self.assertEqual(reason.signal, signal.SIGINT)


class RecoveryTests(_TwistdTestCase):
    """
    What the daemon had counted or spooled survives its death: SIGKILL
    costs at most the last SNAPSHOT_SECONDS, and SIGTERM with the mail
    server away leaves the digest in the spool; the next run sends it.
    """

    @defer.inlineCallbacks
    def assertNextDigests(self, process: TwistdProcess, address: tuple,
                          sink: SMTPSink, counts: dict):
        """
        The next digest C{sink} gets from C{process} holds exactly
        C{counts} (see L{digest_counts}); the one after it only an error
        sent once that has arrived, so nothing was counted twice.
        """
        [message] = yield process.wait_for_mail(sink, 1)
        self.assertEqual(digest_counts(message.get_content()), counts)
        send_datagrams(address, [record("after", source="web9")])
        messages = yield process.wait_for_mail(sink, 2)
        self.assertEqual(digest_counts(messages[1].get_content()),
                         {"after": {"web9": 1}})

    @defer.inlineCallbacks
    def test_sigkill_then_restart(self):
        """
        Errors counted by a daemon killed with SIGKILL before any flush
        (FLUSH_SECONDS is an hour) are in the first digest of the next
        run on the same working directory, once they had reached the
        state file (SNAPSHOT_SECONDS = 0.1).
        """
        sink = SMTPSink(self)
        settings = self.smtp_settings(sink.port, flush_seconds=3600,
                                      SNAPSHOT_SECONDS=0.1)
        process, address, cwd = yield self.start_daemon(**settings)
        send_datagrams(address, [
            record("boom", source="web1"), record("boom", source="web1"),
            record("boom", source="web2"), record("bang", source="web3")])
        state = os.path.join(cwd, "failnozzle-state.json")
        yield poll_until(lambda: state_file_total(state) == 4,
                         f"snapshot of the 4 errors in {state}")
        process.transport.signalProcess("KILL")
        reason = yield process.wait_for_end()
        self.assertEqual(reason.signal, signal.SIGKILL)
        self.assertEqual(sink.offered, [])

        settings["FLUSH_SECONDS"] = 0.5
        restarted, address, _ = yield self.start_daemon(cwd=cwd, **settings)
        yield restarted.wait_for(f"Restored 4 errors from {re.escape(state)}")
        yield self.assertNextDigests(restarted, address, sink, {
            "boom": {"web1": 2, "web2": 1}, "bang": {"web3": 1}})

    @defer.inlineCallbacks
    def test_sentry_answers_survive_sigkill(self):
        """
        A Sentry event answered 200 is in the state file, though the next
        scheduled snapshot is an hour away: a daemon killed with SIGKILL
        right after the answer reports it in the next run.  (The answer
        waits for the file, not the disk: the second and third are put
        there on the spot, their key being written already.)
        """
        sink = SMTPSink(self)
        settings = self.smtp_settings(
            sink.port, flush_seconds=3600, SNAPSHOT_SECONDS=3600,
            HTTP_BIND=("127.0.0.1", 0), SENTRY_KEYS={"k" * 32: "shop"})
        process, _, cwd = yield self.start_daemon(**settings)
        http = yield process.wait_for(
            r"listening for status and control on HTTP 127\.0\.0\.1:(\d+)")

        def post_events() -> list:
            connection = http_client.HTTPConnection(
                "127.0.0.1", int(http.group(1)), timeout=WAIT_SECONDS)
            answers = []
            for server in ("web1", "web1", "web2"):
                connection.request(
                    "POST", "/api/1/store/", json.dumps({
                        "level": "error", "server_name": server,
                        "exception": {"values": [
                            {"type": "KeyError", "value": "'user'"}]}}),
                    {"X-Sentry-Auth": f"Sentry sentry_key={'k' * 32}"})
                reply = connection.getresponse()
                answers.append((reply.status, json.loads(reply.read())))
            connection.close()
            return answers

        answers = yield threads.deferToThread(post_events)
        process.transport.signalProcess("KILL")
        self.assertEqual([status for status, _ in answers], [200] * 3)
        self.assertTrue(all(answer["id"] for _, answer in answers))
        yield process.wait_for_end()
        settings["FLUSH_SECONDS"] = 0.5
        restarted, _, _ = yield self.start_daemon(cwd=cwd, **settings)
        [message] = yield restarted.wait_for_mail(sink, 1)
        self.assertEqual(digest_counts(message.get_content()),
                         {"KeyError: 'user'": {"web1": 2, "web2": 1}})

    @defer.inlineCallbacks
    def test_seen_memory_after_sigkill(self):
        """
        An error reported by a daemon killed with SIGKILL after its digest
        is told as ongoing by the next run, not as new.
        """
        sink = SMTPSink(self)
        settings = self.smtp_settings(sink.port, flush_seconds=0.5,
                                      REPEAT_SECONDS=0)
        process, address, cwd = yield self.start_daemon(**settings)
        send_datagrams(address, [record("lookup failed for user 17")])
        [first] = yield process.wait_for_mail(sink, 1)
        self.assertIn("[new]", first.get_content())
        # Delivered and out of the spool (else the next run sends it
        # again), and remembered.
        spool = os.path.join(cwd, "failnozzle-spool")
        seen = os.path.join(cwd, "failnozzle-state.json.seen")
        yield poll_until(lambda: os.path.exists(seen) and not any(
            os.listdir(os.path.join(spool, part)) for part in ("new", "cur")),
            f"the digest out of {spool} and {seen} written")
        process.transport.signalProcess("KILL")
        yield process.wait_for_end()

        restarted, address, _ = yield self.start_daemon(cwd=cwd, **settings)
        send_datagrams(address, [record("lookup failed for user 42")])
        [_, second] = yield restarted.wait_for_mail(sink, 2)
        body = second.get_content()
        self.assertIn("\n1 ongoing\n", body)
        self.assertIn("(2 in all)", body)
        self.assertNotIn("[new]", body)

    @defer.inlineCallbacks
    def test_sigterm_with_server_down(self):
        """
        SIGTERM while the mail server takes the connection and never
        answers (SMTP_TIMEOUT longer than the test's patience): the daemon
        stops after SHUTDOWN_TIMEOUT_SECONDS, as a clean stop, with the
        digest of what it had counted left in the spool.  The next run,
        with the server back, delivers it.
        """
        server = SilentServer(self)
        settings = self.smtp_settings(
            server.port, flush_seconds=3600, SMTP_TIMEOUT=WAIT_SECONDS * 3,
            SHUTDOWN_TIMEOUT_SECONDS=1)
        process, address, cwd = yield self.start_daemon(**settings)
        send_datagrams(address, [
            record("boom", source="web1"), record("boom", source="web2")])
        # Logged once read: by then the two before it are counted.
        send_datagrams(address, [b"not json"])
        yield process.wait_for(r"Bad input from ")

        process.transport.signalProcess("TERM")
        reason = yield process.wait_for_end()
        self.assertEqual(reason.signal, signal.SIGTERM)
        self.assertEqual(len(server.connections), 1)
        self.assertIn("delivering for up to 1 s", process.text)
        self.assertRegex(process.text,
                         r"Could not send .*: cut short by the stop "
                         r"\(SHUTDOWN_TIMEOUT_SECONDS\); it stays in the "
                         r"spool for the next start")
        self.assertIn(_SHUT_DOWN, process.text)
        self.assertNotIn("Traceback", process.text)
        [spooled] = maildir_files(os.path.join(cwd, "failnozzle-spool"))
        self.assertEqual(digest_counts(read_message(spooled).get_content()), {
            "boom": {"web1": 1, "web2": 1},
            "Internal error: datagram is not valid JSON": {"127.0.0.1": 1},
        })

        yield server.stop()
        sink = SMTPSink(self)
        settings.update(SMTP_PORT=sink.port, FLUSH_SECONDS=0.5)
        restarted, address, _ = yield self.start_daemon(cwd=cwd, **settings)
        yield self.assertNextDigests(restarted, address, sink, {
            "boom": {"web1": 1, "web2": 1},
            "Internal error: datagram is not valid JSON": {"127.0.0.1": 1},
        })
        yield poll_until(
            lambda: not maildir_files(os.path.join(cwd, "failnozzle-spool")),
            "empty spool")


    @defer.inlineCallbacks
    def test_sigkill_with_spool_unwritable(self):
        """
        With the spool unwritable and the mail server down, a digest made
        before a SIGKILL holds errors no spool file has: the snapshot still
        does, so the next run, spool and server back, reports them.
        """
        settings = self.smtp_settings(
            free_tcp_port(), flush_seconds=1, SNAPSHOT_SECONDS=0.1,
            SPOOL_DIR="blocked/spool", RETRY_MIN_SECONDS=3600,
            RETRY_MAX_SECONDS=3600)
        cwd = self.make_directory()
        with open(os.path.join(cwd, "blocked"), "w"):
            pass
        process, address, _ = yield self.start_daemon(cwd=cwd, **settings)
        send_datagrams(address, [record("boom", source="web1")] * 3)
        yield process.wait_for(r"Could not send .* connection refused")
        process.transport.signalProcess("KILL")
        yield process.wait_for_end()

        os.unlink(os.path.join(cwd, "blocked"))
        sink = SMTPSink(self)
        settings.update(SMTP_PORT=sink.port, FLUSH_SECONDS=0.5)
        restarted, address, _ = yield self.start_daemon(cwd=cwd, **settings)
        yield self.assertNextDigests(restarted, address, sink, {
            "boom": {"web1": 3}})


class MaildirDaemonTests(_TwistdTestCase):
    """
    C{twistd -n failnozzle} with no config file and no SMTP server: digests
    go into C{./failnozzle-mail}.
    """

    @defer.inlineCallbacks
    def test_digest_file_without_config(self):
        """
        With only command-line options, a digest is written into
        C{failnozzle-mail/new} under the working directory, and the log
        line about it names the file.
        """
        process, address, cwd = yield self.start_daemon(
            "--udp", "127.0.0.1:0", "--flush-seconds", "1")
        send_datagrams(address, [record("boom", source="web1")] * 2)
        sent = yield process.wait_for(r"Sent .* via maildir (\S+): (\S+)$")
        maildir, path = sent.group(1), sent.group(2)
        self.assertEqual(os.path.realpath(maildir),
                         os.path.realpath(os.path.join(cwd,
                                                       "failnozzle-mail")))
        self.assertEqual(os.path.dirname(os.path.realpath(path)),
                         os.path.realpath(os.path.join(maildir, "new")))
        self.assertEqual(os.listdir(os.path.join(maildir, "new")),
                         [os.path.basename(path)])
        with open(path, encoding="utf-8") as digest:
            text = digest.read()
        self.assertIn("** 2 instances of 1 unique error (app) **", text)
        self.assertIn("- on web1, 2X\n", text)


class ConfigErrorTests(_TwistdTestCase):
    """
    A wrong configuration stops C{twistd failnozzle} before it starts, with
    one line naming what is wrong and a non-zero status, never a traceback.
    """

    @defer.inlineCallbacks
    def assert_refused(self, args: list, *expected: str, config=None):
        """
        Run C{twistd -n failnozzle *args}, with a config file of the text
        C{config} if given, and check that it stops at once with one line
        of output that contains each of C{expected}.

        @return: a Deferred firing with that line.
        """
        cwd = self.make_directory()
        if config is not None:
            path = os.path.join(cwd, "site.py")
            with open(path, "w") as config_file:
                config_file.write(config)
            args = [f"--config={path}"] + args
        process = spawn_twistd(self, ["-n", "failnozzle", *args], cwd)
        reason = yield process.wait_for_end()
        output = process.text
        self.assertIsInstance(reason, error.ProcessTerminated, output)
        self.assertIsNone(reason.signal, output)
        self.assertNotEqual(reason.exitCode, 0, output)
        self.assertNotIn("Traceback", output)
        lines = lines_of(output)
        self.assertEqual(len(lines), 1, output)
        for text in expected:
            self.assertIn(text, lines[0])
        return lines[0]

    @defer.inlineCallbacks
    def test_secret_not_shown(self):
        """
        A secret setting of the wrong type is named with its type, never
        its value.
        """
        line = yield self.assert_refused(
            [], "SMTP_PASSWORD", "it is a list",
            config="UDP_BIND = ('127.0.0.1', 0)\n"
                   "SMTP_PASSWORD = ['hunter2']\n")
        self.assertNotIn("hunter2", line)

    def test_wrong_type(self):
        """
        A setting of the wrong type is named with the value given.
        """
        return self.assert_refused(
            [], "FLUSH_SECONDS", "'soon'",
            config="UDP_BIND = ('127.0.0.1', 0)\nFLUSH_SECONDS = 'soon'\n")

    def test_smtp_without_recipients(self):
        """
        SMTP_HOST without REPORT_TO: the missing setting is named.
        """
        return self.assert_refused(
            [], "REPORT_TO", "SMTP_HOST",
            config="UDP_BIND = ('127.0.0.1', 0)\n"
                   "SMTP_HOST = '127.0.0.1'\n"
                   "REPORT_FROM = 'nozzle@example.com'\n")

    def test_syntax_error(self):
        """
        A config file that is not valid Python: the file and line are
        named.
        """
        return self.assert_refused(
            [], "site.py", "line 2",
            config="UDP_BIND = ('127.0.0.1', 0)\nFLUSH_SECONDS = = 3\n")

    def test_missing_config_file(self):
        """
        A config file that does not exist is named.
        """
        return self.assert_refused(
            ["--config=no-such-site.py", "--udp", "127.0.0.1:0"],
            "no-such-site.py")

    def test_udp_port_in_use(self):
        """
        A UDP port another socket holds: UDP_BIND and the address are
        named.
        """
        holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        return self.assert_refused(
            ["--udp", f"127.0.0.1:{port}"],
            "UDP_BIND", f"127.0.0.1:{port}", "in use")

    def test_smtp_ingest_port_in_use(self):
        """
        A TCP port another socket listens on: SMTP_INGEST_BIND and the
        address are named.
        """
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        return self.assert_refused(
            ["--udp", "127.0.0.1:0", "--smtp-ingest", f"127.0.0.1:{port}"],
            "SMTP_INGEST_BIND", f"127.0.0.1:{port}", "in use")


class DaemonizedTests(_TwistdTestCase):
    """
    C{twistd --pidfile=... --logfile=... failnozzle}: in the background, as
    an init script would start it.
    """

    def kill_at_the_end(self, pidfile: str) -> None:
        """When the test ends, kill the daemon of C{pidfile} if it still
        runs (whatever the launcher did)."""
        def kill_if_running():
            try:
                with open(pidfile) as pid_text:
                    os.kill(int(pid_text.read()), signal.SIGKILL)
            except (OSError, ValueError):
                pass

        self.addCleanup(kill_if_running)

    @defer.inlineCallbacks
    def test_pidfile_maildir_and_stop(self):
        """
        The daemon writes its pid file, writes digests of what it receives
        into MAILDIR, and on SIGTERM to the pid in that file shuts down and
        removes the pid file.
        """
        cwd = self.make_directory()
        pidfile = os.path.join(cwd, "failnozzle.pid")
        logfile = os.path.join(cwd, "failnozzle.log")
        maildir = os.path.join(cwd, "mail")
        config = write_config(cwd, UDP_BIND=("127.0.0.1", 0),
                              FLUSH_SECONDS=1, MAILDIR=maildir)

        def read_log():
            with open(logfile, encoding="utf-8") as log:
                return log.read()

        self.kill_at_the_end(pidfile)
        launcher = spawn_twistd(self, [f"--pidfile={pidfile}",
                                       f"--logfile={logfile}", "failnozzle",
                                       f"--config={config}"], cwd)
        # The launching process ends once the daemon has started its
        # service (twistd's status pipe), so the log has the port by then.
        reason = yield launcher.wait_for_end()
        self.assertIsInstance(reason, error.ProcessDone, launcher.text)
        with open(pidfile) as pid_text:
            pid = int(pid_text.read())
        self.assertNotEqual(pid, launcher.transport.pid)
        port = int(_LISTENING.search(read_log()).group(1))

        send_datagrams(("127.0.0.1", port), [record("boom", source="web1")])
        new = os.path.join(maildir, "new")
        yield poll_until(lambda: os.listdir(new), "digest in the maildir")
        [name] = os.listdir(new)
        with open(os.path.join(new, name), encoding="utf-8") as digest:
            self.assertIn("** 1 instance of 1 unique error (app) **",
                          digest.read())

        os.kill(pid, signal.SIGTERM)
        yield poll_until(
            lambda: not os.path.exists(pidfile) and _SHUT_DOWN in read_log(),
            "pid file removal and shut-down log line")
        self.assertNotIn("Traceback", read_log())


    @defer.inlineCallbacks
    def test_sigterm_while_starting(self):
        """
        SIGTERM while the daemon is still starting (taking on the 2,000
        messages the last run left in its spool): the launcher ends as
        after any start, and the daemon stops cleanly once started, its
        pid file removed and every message delivered or still spooled,
        not killed half-started with its pid file left behind.
        """
        cwd = self.make_directory()
        pidfile = os.path.join(cwd, "failnozzle.pid")
        logfile = os.path.join(cwd, "failnozzle.log")
        maildir, spool = os.path.join(cwd, "mail"), os.path.join(cwd, "spool")
        config = write_config(cwd, UDP_BIND=("127.0.0.1", 0),
                              MAILDIR=maildir, SPOOL_DIR=spool)
        left = Spool(spool, reactor)
        with open(left.add(b"From: a@example.com\r\nTo: b@example.com\r\n"
                           b"Subject: left\r\n\r\nleft behind\r\n"),
                  "rb") as first:
            message = first.read()
        for number in range(1, 2000):
            with open(os.path.join(spool, "new",
                                   f"1700000000.M{number:06d}P1Q{number}.x"),
                      "wb") as copy:
                copy.write(message)

        def read_log():
            with open(logfile, encoding="utf-8") as log:
                return log.read()

        def signal_once_listening():
            try:
                if "listening for errors" not in read_log():
                    return False
                with open(pidfile) as pid_text:
                    pid = int(pid_text.read())
            except OSError:  # not yet
                return False
            os.kill(pid, signal.SIGTERM)
            return True

        self.kill_at_the_end(pidfile)
        launcher = spawn_twistd(self, [f"--pidfile={pidfile}",
                                       f"--logfile={logfile}", "failnozzle",
                                       f"--config={config}"], cwd)
        yield poll_until(signal_once_listening, "listening", every=0.001)
        reason = yield launcher.wait_for_end()
        self.assertIsInstance(reason, error.ProcessDone, launcher.text)
        yield poll_until(
            lambda: not os.path.exists(pidfile) and _SHUT_DOWN in read_log(),
            "pid file removal and shut-down log line")
        self.assertIn("failnozzle stopping", read_log())
        self.assertNotIn("Traceback", read_log())
        self.assertEqual(
            len(maildir_files(maildir)) + len(maildir_files(spool)), 2000)


class HelpTests(_TwistdTestCase):
    """
    C{twistd failnozzle --help}.
    """

    @defer.inlineCallbacks
    def test_options_documented(self):
        """
        The help lists every command-line option and succeeds.
        """
        process = spawn_twistd(self, ["failnozzle", "--help"],
                               self.make_directory())
        reason = yield process.wait_for_end()
        self.assertIsInstance(reason, error.ProcessDone, process.text)
        for option in ("--config=", "--udp=", "--flush-seconds=",
                       "--maildir=", "--smtp=", "--smtp-ingest="):
            self.assertIn(option, process.text)


class MailInDaemonTests(_TwistdTestCase):
    """
    C{twistd -n failnozzle} with SMTP_INGEST_BIND: error mail in, digest
    out.
    """

    @defer.inlineCallbacks
    def test_mail_to_digest(self):
        """
        The daemon logs the SMTP port it got; a message smtplib sends
        there is in the next digest, the client having heard 250.
        """
        sink = SMTPSink(self)
        process, _, _ = yield self.start_daemon(**self.smtp_settings(
            sink.port, flush_seconds=1,
            SMTP_INGEST_BIND=("127.0.0.1", 0)))
        listening = yield process.wait_for(
            r"listening for mail on SMTP 127\.0\.0\.1:(\d+)")

        def send():
            with smtplib.SMTP("127.0.0.1", int(listening.group(1)),
                              local_hostname="web1.example",
                              timeout=WAIT_SECONDS) as client:
                return client.sendmail(
                    "root@web1.example", ["backup@nozzle.example"],
                    b"Subject: nightly backup failed\r\n\r\ndisk full\r\n")

        refused = yield threads.deferToThread(send)
        self.assertEqual(refused, {})
        [message] = yield process.wait_for_mail(sink, 1)
        self.assertEqual(digest_counts(message.get_content()),
                         {"nightly backup failed": {"web1.example": 1}})
