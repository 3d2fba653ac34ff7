"""
Fixtures shared by the tests: settings, a running service on a real UDP
port, and a real, independent SMTP server (aiosmtpd) to receive its mail.
"""
from __future__ import annotations

import email
import email.policy
import json
import logging
import os
import re
import socket
from typing import Mapping, Optional, Sequence

from twisted.application.service import Service
from twisted.internet import defer, reactor, task, threads
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, Logger, formatEvent, globalLogPublisher
from twisted.protocols.basic import LineReceiver

from failnozzle.config import Settings, load_settings
from failnozzle.digest import build_message
from failnozzle.ingest import bind_udp_socket
from failnozzle.mailin import bind_tcp_socket
from failnozzle.service import FailnozzleService
from failnozzle.slots import SlotFile
from failnozzle.writer import DiskWriter

#: Upper bound for waiting on anything over real sockets; a test that
#: needs it has failed.
WAIT_SECONDS = 20


def bounded(waiting: defer.Deferred) -> defer.Deferred:
    """
    C{waiting}, failing with C{TimeoutError} if it has not fired within
    L{WAIT_SECONDS}, such as the outcome of a delivery a fault made
    endless.
    """
    return waiting.addTimeout(WAIT_SECONDS, reactor)


def make_settings(**overrides) -> Settings:
    """Settings as a config file with these assignments would give."""
    return load_settings(None, overrides)[0]


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_service(testcase, transport=None, **overrides) -> FailnozzleService:
    """
    Start a L{FailnozzleService} on 127.0.0.1 (a free UDP port, and TCP
    ports for mail and HTTP if SMTP_INGEST_BIND or HTTP_BIND is given) with
    the real reactor and its disk writer thread; it is stopped when the
    test ends.
    """
    overrides.setdefault("UDP_BIND", ("127.0.0.1", 0))
    for name in ("SPOOL_DIR", "STATE_FILE", "MAILDIR"):
        overrides.setdefault(name, testcase.mktemp())
    settings = make_settings(**overrides)
    udp_socket, _ = bind_udp_socket(*settings.UDP_BIND, settings.UDP_RCVBUF)
    smtp_socket = (bind_tcp_socket(*settings.SMTP_INGEST_BIND)
                   if settings.SMTP_INGEST_BIND else None)
    http_socket = (bind_tcp_socket(*settings.HTTP_BIND)
                   if "HTTP_BIND" in overrides and settings.HTTP_BIND
                   else None)
    service = FailnozzleService(settings, reactor, udp_socket, transport,
                                smtp_socket=smtp_socket,
                                http_socket=http_socket,
                                writer=DiskWriter(reactor))
    service.startService()
    testcase.addCleanup(lambda: service.running and service.stopService())
    return service


def written(service: FailnozzleService) -> defer.Deferred:
    """
    A Deferred firing once the service's disk writer has done every write
    asked for until now (spooling, snapshots).
    """
    return service.writer.run(lambda: None)


def udp_address(service: FailnozzleService) -> tuple:
    address = service.udp_port.getHost()
    return (address.host, address.port)


def send_datagrams(address: tuple, payloads) -> int:
    """
    Send each payload (bytes, or a record to encode as JSON) as one
    datagram to C{address}; return how many were sent.
    """
    count = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for payload in payloads:
            if not isinstance(payload, bytes):
                payload = json.dumps(payload).encode("utf-8")
            sender.sendto(payload, address)
            count += 1
    return count


def datagrams_received(service: FailnozzleService,
                       count: int) -> defer.Deferred:
    """
    A Deferred that fires once the service's receiver has handled C{count}
    more datagrams, so a test can flush knowing they are all counted.
    """
    receiver = service.receiver
    handle = receiver.datagramReceived
    arrived = defer.Deferred()
    seen = [0]

    def counting(data: bytes, addr: tuple) -> None:
        handle(data, addr)
        seen[0] += 1
        if seen[0] == count:
            del receiver.datagramReceived
            arrived.callback(seen[0])

    receiver.datagramReceived = counting
    return arrived.addTimeout(WAIT_SECONDS, reactor)


def word(number: int) -> str:
    """
    A word standing for C{number} ("bc" for 12), for errors that must stay
    apart: numbers in messages are folded by the default grouping.
    """
    return "".join(chr(ord("a") + int(digit)) for digit in str(number))


def record(message: str = "boom", source: str = "host1", **fields) -> dict:
    """A record as failnozzle.loghandler.AggregatorHandler would send it."""
    base = {
        "module": "views",
        "funcName": "index",
        "filename": "views.py",
        "pathname": "src/app/views.py",
        "lineno": 50,
        "message": message,
        "exc_text": f"Traceback (most recent call last):\nError: {message}",
        "kind": "app",
        "source": source,
    }
    base.update(fields)
    return base


def digest_total(message) -> int:
    """The errors a digest counts, from its body's first line (after a
    cluster node's notice, if any)."""
    return int(re.search(r"^\*\* (\d+) instances? of",
                         message.get_content(), re.MULTILINE).group(1))


def digest_message(subject: str = "[nozzle1] 1 new: boom (1 total)",
                   body: str = "boom\n", kind: str = "digest"):
    """A message as the service builds it, to ops@example.com."""
    return build_message(sender="nozzle@example.com",
                         recipients=["ops@example.com"], subject=subject,
                         body=body, date=0, domain="nozzle1", kind=kind)


class _ToTwistedLog(logging.Handler):
    """
    Hands aiosmtpd's log records to twisted.logger, so that trial keeps them
    in test.log instead of Python printing them on the console (as it does
    with warnings nobody handles, such as the server's traceback when a
    client hangs up in mid TLS handshake, which some tests do on purpose).
    """

    _log = Logger(namespace="aiosmtpd")

    def emit(self, record: logging.LogRecord) -> None:
        self._log.info("{line}", line=self.format(record))


#: An answer for L{SMTPSink}'s C{first_answers}: hang up instead of
#: replying to DATA, and drop the message, as a server that died.
HANG_UP = "hang up"

#: An answer for L{SMTPSink}'s C{first_answers}: keep the message, then hang
#: up before replying, as a server whose 250 never reached the client.
KEEP_AND_HANG_UP = "keep and hang up"


class SMTPSink:
    """
    A real SMTP server (aiosmtpd, in its own thread) on 127.0.0.1 that
    keeps every message it accepts.

    @ivar messages: the parsed messages, in arrival order.
    @ivar envelopes: the aiosmtpd envelopes (mail_from, rcpt_tos, ...).
    @ivar tls_versions: for each message, the TLS version of the connection
        it came over (C{"TLSv1.3"}, ...), or None if it came in clear.
    @ivar offered: the content of every message offered (each DATA
        command whose content came in whole), kept or not, with LF line
        ends.
    """

    def __init__(self, testcase, reply: Optional[str] = None,
                 port: Optional[int] = None, first_answers: Sequence = (),
                 rcpt_answers: Optional[Mapping[str, Sequence]] = None,
                 **controller_options) -> None:
        """
        @param reply: the answer to DATA instead of C{250 OK}, e.g.
            C{"550 no thanks"}.
        @param port: the port to listen on; by default a free one.
        @param first_answers: how to meet the first DATA commands, one
            each, before answering as usual: a reply such as C{"451 busy"}
            (the message is not kept), L{HANG_UP} or L{KEEP_AND_HANG_UP}.
        @param rcpt_answers: for an address, the replies to its first RCPT
            commands, one each, instead of accepting it: C{{"dev@example.com":
            ["451 greylisted"]}}.
        @param controller_options: passed to aiosmtpd's C{Controller}
            (tls_context, require_starttls, ssl_context, authenticator,
            auth_required, auth_require_tls, ...).
        """
        from aiosmtpd.controller import Controller

        self.messages: list = []
        self.envelopes: list = []
        self.tls_versions: list = []
        self.offered: list = []
        self._waiting: list = []
        self._reply = reply
        self._first_answers = list(first_answers)
        self._rcpt_answers = {address: list(answers) for address, answers
                              in (rcpt_answers or {}).items()}
        self.port = port or free_tcp_port()
        self._controller = Controller(self, hostname="127.0.0.1",
                                      port=self.port, **controller_options)
        server_log = logging.getLogger("mail.log")
        handler = _ToTwistedLog()
        server_log.addHandler(handler)
        testcase.addCleanup(server_log.removeHandler, handler)
        self._controller.start()
        # Stopped from a thread so the reactor can go on meanwhile: from
        # Python 3.12 on, asyncio waits for open connections to close, and
        # our client may still be saying QUIT when the test ends.
        testcase.addCleanup(threads.deferToThread, self._controller.stop)

    async def handle_RCPT(self, server, session, envelope, address,
                          rcpt_options) -> str:
        answers = self._rcpt_answers.get(address)
        if answers:
            return answers.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:
        self.offered.append(
            envelope.original_content.replace(b"\r\n", b"\n"))
        answer = self._first_answers.pop(0) if self._first_answers else None
        if answer == KEEP_AND_HANG_UP:
            self._keep(server, envelope)
        if answer in (HANG_UP, KEEP_AND_HANG_UP):
            # No reply at all: the client sees the connection go in the
            # middle of DATA.  aiosmtpd's own reply then goes nowhere.
            server.transport.abort()
            return "250 OK"
        if answer is not None:
            return answer
        if self._reply is not None:
            return self._reply
        self._keep(server, envelope)
        return "250 OK"

    def _keep(self, server, envelope) -> None:
        message = email.message_from_bytes(
            envelope.original_content.replace(b"\r\n", b"\n"),
            policy=email.policy.default)
        tls = server.transport.get_extra_info("ssl_object")
        # Recorded here, before the client can see "250 OK", so a test that
        # waits on its delivery Deferred finds the message already listed.
        self.envelopes.append(envelope)
        self.messages.append(message)
        self.tls_versions.append(tls.version() if tls is not None else None)
        reactor.callFromThread(self._arrived)

    def _arrived(self) -> None:
        waiting, self._waiting = self._waiting, []
        for count, arrived in waiting:
            self._fire_when(count, arrived)

    def _fire_when(self, count: int, arrived: defer.Deferred) -> None:
        if len(self.messages) >= count:
            arrived.callback(self.messages[:count])
        else:
            self._waiting.append((count, arrived))

    def wait_for(self, count: int) -> defer.Deferred:
        """A Deferred firing with the first C{count} messages once here."""
        arrived = defer.Deferred()
        self._fire_when(count, arrived)
        return arrived.addTimeout(WAIT_SECONDS, reactor)


class _Tracked(Protocol):
    """Lists itself with its factory, and says when it is closed."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.closed = defer.Deferred()

    def connectionLost(self, reason) -> None:
        self.closed.callback(None)


class _Silent(_Tracked):
    """Accepts a connection and never says a word."""


class _DropInData(_Tracked, LineReceiver):
    """
    Says yes to every SMTP command, and hangs up a few lines into the
    message's content.
    """

    def connectionMade(self) -> None:
        super().connectionMade()
        self._content_lines = None
        self.sendLine(b"220 127.0.0.1 ESMTP")

    def lineReceived(self, line: bytes) -> None:
        if self._content_lines is not None:
            self._content_lines += 1
            if self._content_lines == 10:
                self.transport.abortConnection()
        elif line.upper().startswith(b"DATA"):
            self._content_lines = 0
            self.sendLine(b"354 go ahead")
        else:
            self.sendLine(b"250 OK")


class _KeepAndStaySilent(_Tracked, LineReceiver):
    """
    Says yes to every SMTP command and keeps each message's content, but
    never answers the end of a message: a server whose reply is lost.
    """

    def connectionMade(self) -> None:
        super().connectionMade()
        self._content = None
        self.sendLine(b"220 127.0.0.1 ESMTP")

    def lineReceived(self, line: bytes) -> None:
        if self._content is None:
            if line.upper().startswith(b"DATA"):
                self._content = []
                self.sendLine(b"354 go ahead")
            else:
                self.sendLine(b"250 OK")
        elif line == b".":
            self.factory.messages.append(b"\n".join(self._content) + b"\n")
            self._content = None
        else:
            self._content.append(line[1:] if line.startswith(b".") else line)


class _LoopbackServer:
    """
    A TCP server on 127.0.0.1 speaking L{protocol}.  When stopped, or when
    the test ends, it hangs up on whoever is still connected and stops
    listening.

    @ivar port: the port it listens on.
    @ivar connections: the server side of each connection accepted.
    @ivar messages: the content of each message it kept, if it keeps any,
        with LF line ends.
    """

    protocol: type = Protocol

    def __init__(self, testcase) -> None:
        factory = Factory.forProtocol(self.protocol)
        factory.connections = self.connections = []
        factory.messages = self.messages = []
        self._listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.port = self._listening.getHost().port
        self._stopped = False
        testcase.addCleanup(self.stop)

    def stop(self) -> defer.Deferred:
        """
        Hang up on everyone connected and stop listening, so that another
        server may take the port.

        @return: a Deferred firing when that is done (at once if it was
            done before).
        """
        if self._stopped:
            return defer.succeed(None)
        self._stopped = True
        for connection in self.connections:
            connection.transport.abortConnection()
        closed = [connection.closed for connection in self.connections]
        return defer.gatherResults(
            closed + [defer.maybeDeferred(self._listening.stopListening)])


class SilentServer(_LoopbackServer):
    """
    Accepts connections and never answers, like a hung mail server.
    """

    protocol = _Silent


class SilentAfterDataServer(_LoopbackServer):
    """
    An SMTP server that takes and keeps every message, then never replies
    to its end, as if its 250 was lost on the way.
    """

    protocol = _KeepAndStaySilent


class DroppingServer(_LoopbackServer):
    """
    An SMTP server that dies in the middle of DATA: it takes every command,
    then hangs up once a few lines of the message's content are in.
    """

    protocol = _DropInData


def capture_log(testcase) -> EventLoggingObserver:
    """Every event logged through twisted.logger until the test ends."""
    return EventLoggingObserver.createWithCleanup(testcase,
                                                  globalLogPublisher)


def logged_lines(events, namespace: str,
                 level: LogLevel = LogLevel.error) -> list:
    """The formatted text of the events of C{namespace} at C{level}."""
    return [formatEvent(event) for event in events
            if event.get("log_namespace") == namespace
            and event.get("log_level") == level]


def wait_for_log(testcase, namespace: str, pattern: str) -> defer.Deferred:
    """
    A Deferred firing with the text of the next event of C{namespace}
    (logged from now on) that the regular expression C{pattern} finds,
    at most L{WAIT_SECONDS} from now.
    """
    compiled = re.compile(pattern)
    found = defer.Deferred()

    def observe(event) -> None:
        if found.called or event.get("log_namespace") != namespace:
            return
        text = formatEvent(event)
        if compiled.search(text):
            found.callback(text)

    # Removed only when the test ends: removing an observer while the
    # publisher calls it would skip the next one.
    globalLogPublisher.addObserver(observe)
    testcase.addCleanup(globalLogPublisher.removeObserver, observe)
    return found.addTimeout(WAIT_SECONDS, reactor)


def poll_until(condition, what: str, every: float = 0.05
               ) -> defer.Deferred:
    """
    Check C{condition()} every C{every} seconds until it is true, for what
    has no event to wait for (files written by another process); fail after
    L{WAIT_SECONDS}.
    """
    done = defer.Deferred()
    deadline = reactor.seconds() + WAIT_SECONDS

    def check() -> None:
        if condition():
            loop.stop()
            done.callback(None)
        elif reactor.seconds() > deadline:
            loop.stop()
            done.errback(AssertionError(
                f"no {what} within {WAIT_SECONDS} s"))

    loop = task.LoopingCall(check)
    loop.clock = reactor
    # If condition() raises, the loop ends with that error.
    loop.start(every).addErrback(done.errback)
    return done


def snapshot_document(path: str) -> Optional[dict]:
    """The snapshot the state file at C{path} holds, as JSON; None if
    there is no such file."""
    payload = SlotFile(path).read(1 << 30)
    return None if payload is None else json.loads(payload)


def state_file_total(path: str) -> int:
    """
    How many errors the state file at C{path} holds in its buffer (0 if
    there is no such file yet).
    """
    state = snapshot_document(path)
    if state is None:
        return 0
    # Each entry: [key number, [[source, count], ...], first, last].
    return sum(count for entry in state["buffer"]["entries"]
               for _, count in entry[1])


def maildir_files(path: str) -> list:
    """The paths of the messages in the maildir C{path}'s C{new/}."""
    new = os.path.join(path, "new")
    if not os.path.isdir(new):
        return []
    return sorted(os.path.join(new, name) for name in os.listdir(new))


def spooled(service: FailnozzleService) -> list:
    """The messages waiting in the service's spool."""
    return maildir_files(service.outbox.spool.path)


def failed(service: FailnozzleService) -> list:
    """The messages the service gave up on, in the spool's C{failed/}."""
    return maildir_files(service.outbox.spool.failed.path)


def read_message(path: str) -> email.message.EmailMessage:
    """The message stored in the file at C{path}, parsed."""
    with open(path, "rb") as stored:
        return email.message_from_binary_file(stored,
                                              policy=email.policy.default)


_HEADLINE = re.compile(r"^Exception #\d+ of \d+: (\d+)X (.*) \(in ",
                       re.MULTILINE)
_SOURCE = re.compile(r"^- on (.*), (\d+)X$", re.MULTILINE)


def digest_counts(body: str) -> dict:
    """
    What a digest in the default layout says: for each error message, the
    count per source, read from its Details section, each checked against
    the error's total there.
    """
    details = body.split("Details:\n========\n", 1)[1]
    starts = list(_HEADLINE.finditer(details))
    counts = {}
    for match, following in zip(starts, starts[1:] + [None]):
        section = details[match.end():following.start()
                          if following else len(details)]
        sources = {source: int(count)
                   for source, count in _SOURCE.findall(section)}
        if sum(sources.values()) != int(match.group(1)):
            raise AssertionError(f"the counts per source of {match.group(2)!r}"
                                 f" do not add up to its total:\n{body}")
        counts[match.group(2)] = sources
    return counts


class FakeMailTransport:
    """
    A mail transport that keeps what it is given; each delivery's outcome
    is decided by the test through the Deferred in C{pending}.
    """

    timeout = 30

    def __init__(self):
        self.pending = []

    def describe(self) -> str:
        return "fake transport"

    def deliver(self, sender, recipients, message, data=None):
        result = defer.Deferred()
        self.pending.append((sender, tuple(recipients), message, result))
        return result

    def succeed_all(self):
        for *_, result in self.pending:
            if not result.called:
                result.callback(None)

    def fail_all(self, error: Exception):
        for *_, result in self.pending:
            if not result.called:
                result.errback(error)

    def by_kind(self, kind):
        return [(sender, recipients, message)
                for sender, recipients, message, _ in self.pending
                if message["X-Failnozzle"] == kind]


class Turns:
    """
    A reactor as far as C{callLater(0, ...)} goes, whose turns the test
    takes: a call scheduled in a turn runs in the next one, as the real
    reactor does it (L{twisted.internet.task.Clock} would run it in the
    same one).
    """

    def __init__(self) -> None:
        self._due: list = []

    def callLater(self, delay: float, function, *args) -> task.DelayedCall:
        call = task.DelayedCall(0, function, args, {},
                                self._cancel, lambda call: None)
        self._due.append(call)
        return call

    def _cancel(self, call: task.DelayedCall) -> None:
        if call in self._due:
            self._due.remove(call)

    def turn(self) -> None:
        due, self._due = self._due, []
        for call in due:
            call.called = True
            call.func(*call.args)

    def take_all(self) -> int:
        """Take turns until nothing is due; how many were taken."""
        taken = 0
        while self._due:
            self.turn()
            taken += 1
        return taken


class HeldWriter(Service):
    """
    A disk writer whose writes (snapshots, spool) wait until the test lets
    them run: what is written when, and what waits for it, can be seen.
    """

    def __init__(self) -> None:
        self.pending: list = []

    def run(self, function, *args) -> defer.Deferred:
        done = defer.Deferred()
        self.pending.append((function, args, done))
        return done

    def names(self) -> list:
        return [function.__qualname__ for function, _, _ in self.pending]

    def run_begun(self) -> None:
        """Run the writes waiting, not those they lead to."""
        begun, self.pending = self.pending, []
        for function, args, done in begun:
            done.callback(function(*args))

    def run_all(self) -> None:
        """Run the writes waiting, and those they lead to."""
        while self.pending:
            self.run_begun()
