"""
Errors by mail over real sockets: the standard library's smtplib and
Django's own AdminEmailHandler send to the service's SMTP_INGEST_BIND on
127.0.0.1, and the digest arrives at a real SMTP server (aiosmtpd).
"""
import base64
import logging
import smtplib
import socket
import ssl
from email.message import EmailMessage
from functools import partial

import trustme
from django.core.mail.backends.smtp import EmailBackend
from django.urls import path
from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater
from twisted.logger import formatEvent
from twisted.trial.unittest import TestCase

import failnozzle.mailin
from failnozzle.mailin import MAX_PARSED_BYTES
from failnozzle.service import FailnozzleService
from tests.common import (WAIT_SECONDS, SMTPSink, bounded, capture_log,
                          datagrams_received, digest_counts, free_tcp_port,
                          record, send_datagrams, start_service,
                          state_file_total, udp_address)

TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/srv/backup/run.py", line 9, in main\n'
    "    raise OSError(28, 'No space left on device')\n"
    "OSError: [Errno 28] No space left on device")


def cron_mail(run: int = 1) -> bytes:
    """The mail cron sends about a failed job: its output, timestamps and
    all."""
    message = EmailMessage()
    message["From"] = "root@web1.example (Cron Daemon)"
    message["To"] = "backup@nozzle.example"
    message["Subject"] = "Cron <root@web1> /srv/backup/run.py"
    message.set_content(f"2026-11-2{run} 02:30:01 starting\n{TRACEBACK}\n")
    return message.as_bytes()


def mail_address(service: FailnozzleService) -> tuple:
    address = service.smtp_port.getHost()
    return (address.host, address.port)


def send_mail(service: FailnozzleService, message: bytes, *,
              recipients=("backup@nozzle.example",),
              helo: str = "web1.example", ca_file: str = None,
              login: tuple = None, size_option: bool = True
              ) -> defer.Deferred:
    """
    Send C{message} with smtplib, in a thread (it blocks), as an
    application would: STARTTLS if C{ca_file} is given (the CA to check
    the certificate with), then AUTH with C{login} if given.

    @param size_option: whether to offer the size in MAIL FROM, as
        smtplib does when the server offers SIZE.
    @return: a Deferred firing with what C{sendmail} returns, or failing
        with its exception.
    """
    host, port = mail_address(service)

    def send():
        with smtplib.SMTP(host, port, local_hostname=helo,
                          timeout=WAIT_SECONDS) as client:
            if ca_file is not None:
                client.starttls(
                    context=ssl.create_default_context(cafile=ca_file))
            if login is not None:
                client.login(*login)
            if size_option:
                return client.sendmail("root@web1.example", list(recipients),
                                       message)
            client.ehlo()
            client.mail("root@web1.example")
            for recipient in recipients:
                client.rcpt(recipient)
            return client.data(message)

    return bounded(threads.deferToThread(send))


def start(testcase: TestCase, sink: SMTPSink, **overrides):
    """A service taking mail on 127.0.0.1 and sending digests to C{sink}."""
    return start_service(
        testcase, SMTP_INGEST_BIND=("127.0.0.1", 0), SMTP_HOST="127.0.0.1",
        SMTP_PORT=sink.port, SMTP_TLS="off", REPORT_FROM="nozzle@example.com",
        REPORT_TO=["ops@example.com"], **overrides)


@defer.inlineCallbacks
def digest_of(service: FailnozzleService, sink: SMTPSink):
    """Flush, and return what the digest that arrives counts."""
    outcomes = yield bounded(defer.gatherResults(service.flush()))
    [message] = sink.messages[-1:]
    return outcomes, digest_counts(message.get_content()), message


class SMTPLibTests(TestCase):
    """
    The standard library's SMTP client.
    """

    @defer.inlineCallbacks
    def test_cron_mail_folds(self):
        """
        Two runs of a cron job that failed alike, their output differing
        in its timestamps, sent to one address in each of two messages,
        arrive as one error counted twice, from the host named in EHLO.
        """
        sink = SMTPSink(self)
        service = start(self, sink)
        refused = yield send_mail(service, cron_mail(1), recipients=(
            "backup@nozzle.example", "ops@nozzle.example"))
        self.assertEqual(refused, {})
        yield send_mail(service, cron_mail(2))
        outcomes, counts, message = yield digest_of(service, sink)
        self.assertEqual(outcomes, [True])
        self.assertEqual(counts, {"Cron <root@web1> /srv/backup/run.py":
                                  {"web1.example": 2}})
        body = message.get_content()
        self.assertIn("** 2 instances of 1 unique error (backup) **", body)
        self.assertIn(f"{TRACEBACK}\n", body)
        self.assertIn("(in backup, /srv/backup/run.py:9)", body)
        self.assertNotIn("starting", body)

    @defer.inlineCallbacks
    def test_250_after_snapshot(self):
        """
        When the client hears 250, the error is already in STATE_FILE: a
        crash from then on cannot lose it.
        """
        sink = SMTPSink(self)
        state = self.mktemp()
        service = start(self, sink, STATE_FILE=state)
        yield send_mail(service, cron_mail())
        self.assertEqual(state_file_total(state), 1)

    @defer.inlineCallbacks
    def test_too_big(self):
        """
        A message over SMTP_INGEST_MAX_BYTES is refused with 552, whether
        the client said its size in MAIL FROM or not; nothing is counted.
        """
        sink = SMTPSink(self)
        service = start(self, sink, SMTP_INGEST_MAX_BYTES=1000)
        big = cron_mail().replace(b"starting", b"x" * 2000)
        error = yield self.assertFailure(send_mail(service, big),
                                         smtplib.SMTPSenderRefused)
        self.assertEqual(error.smtp_code, 552)
        code, _ = yield send_mail(service, big, size_option=False)
        self.assertEqual(code, 552)
        self.assertEqual(service.aggregator.flush().total, 0)

    @defer.inlineCallbacks
    def test_kind_header_and_recipient(self):
        """
        X-Failnozzle-Kind names the kind; without it the first
        recipient's local part does.
        """
        sink = SMTPSink(self)
        service = start(self, sink)
        message = EmailMessage()
        message["Subject"] = "queue stuck"
        message["X-Failnozzle-Kind"] = "billing"
        message.set_content("42 jobs waiting")
        yield send_mail(service, message.as_bytes(),
                        recipients=("errors@nozzle.example",))
        yield send_mail(service, cron_mail(), recipients=(
            "Reports@nozzle.example",))
        kinds = sorted(entry.key[service.settings.unique_fields.index("kind")]
                       for entry in service.aggregator.flush().entries)
        self.assertEqual(kinds, ["billing", "reports"])


def write_tls_files(testcase: TestCase) -> tuple:
    """
    A certificate for 127.0.0.1 from a new CA, and its key.

    @return: C{(cert_file, key_file, ca_file)}.
    """
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    paths = [testcase.mktemp() for _ in range(3)]
    with open(paths[0], "wb") as cert:
        for pem in issued.cert_chain_pems:
            cert.write(pem.bytes())
    issued.private_key_pem.write_to_path(paths[1])
    ca.cert_pem.write_to_path(paths[2])
    return tuple(paths)


class AuthTLSTests(TestCase):
    """
    SMTP_INGEST_USERS with SMTP_INGEST_TLS_CERT/_KEY, with smtplib.
    """

    def start(self):
        cert, key, self.ca_file = write_tls_files(self)
        self.sink = SMTPSink(self)
        return start(self, self.sink, SMTP_INGEST_TLS_CERT=cert,
                     SMTP_INGEST_TLS_KEY=key,
                     SMTP_INGEST_USERS={"django": "s3cret"})

    @defer.inlineCallbacks
    def test_starttls_and_login(self):
        """
        STARTTLS with the certificate checked, then AUTH: the mail is
        counted.
        """
        service = self.start()
        yield send_mail(service, cron_mail(), ca_file=self.ca_file,
                        login=("django", "s3cret"))
        self.assertEqual(service.aggregator.flush().total, 1)

    @defer.inlineCallbacks
    def test_wrong_password(self):
        """
        A wrong password is refused (535), and nothing is counted.
        """
        service = self.start()
        error = yield self.assertFailure(
            send_mail(service, cron_mail(), ca_file=self.ca_file,
                      login=("django", "guess")),
            smtplib.SMTPAuthenticationError)
        self.assertEqual(error.smtp_code, 535)
        self.assertEqual(service.aggregator.flush().total, 0)

    @defer.inlineCallbacks
    def test_auth_needs_tls(self):
        """
        In clear, AUTH is not offered, so smtplib will not send the
        password; mail without AUTH is refused with 530.
        """
        service = self.start()
        yield self.assertFailure(
            send_mail(service, cron_mail(), login=("django", "s3cret")),
            smtplib.SMTPNotSupportedError)
        error = yield self.assertFailure(send_mail(service, cron_mail()),
                                         smtplib.SMTPSenderRefused)
        self.assertEqual(error.smtp_code, 530)


def raw_session(service: FailnozzleService, data: bytes,
                replies: int) -> defer.Deferred:
    """
    Send C{data} at once on a plain socket, as a hostile client would,
    then read until C{replies} lines (the greeting first) have come or
    the server closes.

    @return: a Deferred firing with the lines.
    """
    def talk():
        with socket.create_connection(mail_address(service),
                                      timeout=WAIT_SECONDS) as sock:
            lines = sock.makefile("rb")
            sock.sendall(data)
            got = []
            while len(got) < replies:
                line = lines.readline()
                if not line:
                    break
                got.append(line.rstrip(b"\r\n"))
            return got

    return bounded(threads.deferToThread(talk))


class HostileClientTests(TestCase):
    """
    What a hostile client gets over a real socket: bounded, answered,
    never a traceback.
    """

    def setUp(self):
        self.events = capture_log(self)

    def tearDown(self):
        self.assertEqual([formatEvent(event) for event in self.events
                          if event.get("log_failure")], [])

    @defer.inlineCallbacks
    def test_auth_slowed_then_dropped(self):
        """
        On one connection, the third wrong password is answered 421 and
        the connection closed; guesses sent at once are tried one at a
        time; after a reconnection the address's failures still count,
        and the right password still works.
        """
        self.patch(failnozzle.mailin, "AUTH_FIRST_DELAY_SECONDS", 0.01)
        service = start(self, SMTPSink(self), SMTP_INGEST_USERS={
            "django": "s3cret"})
        guess = b"AUTH PLAIN " + base64.b64encode(b"\0django\0guess")
        lines = yield raw_session(service, b"EHLO x\r\n" + (guess + b"\r\n")
                                  * 10, 20)
        self.assertEqual([line[:4] for line in lines if line[3:4] == b" "],
                         [b"220 ", b"250 ", b"535 ", b"535 ", b"421 "])
        error = yield self.assertFailure(
            send_mail(service, cron_mail(), login=("django", "guess")),
            smtplib.SMTPAuthenticationError)
        self.assertEqual(error.smtp_code, 535)
        # smtplib tried PLAIN, then LOGIN: five failures from the address.
        self.assertEqual(service.mail.auth_failures.delay("127.0.0.1"),
                         0.01 * 2 ** 4)
        yield send_mail(service, cron_mail(), login=("django", "s3cret"))
        self.assertEqual(service.aggregator.flush().total, 1)

    @defer.inlineCallbacks
    def test_bad_size(self):
        """
        MAIL FROM with a SIZE of 5,000 digits, negative or not a number
        is answered 501, the session goes on, nothing is logged.
        """
        service = start(self, SMTPSink(self))
        host, port = mail_address(service)

        def send():
            with smtplib.SMTP(host, port, timeout=WAIT_SECONDS) as client:
                client.ehlo()
                codes = [client.mail("a@b", [f"SIZE={size}"])[0] for size in
                         ("9" * 5000, "-1", "lots")]
                return codes + [client.noop()[0]]

        codes = yield bounded(threads.deferToThread(send))
        self.assertEqual(codes, [501, 501, 501, 250])

    @defer.inlineCallbacks
    def test_replies_not_read(self):
        """
        A client that sends commands without reading the replies makes
        the session stop reading (its replies wait in the socket, not in
        memory); once it reads, every reply comes, in order.
        """
        service = start(self, SMTPSink(self))
        paused = defer.Deferred()
        pause = failnozzle.mailin._Session.pauseProducing

        def pausing(session):
            pause(session)
            if not paused.called:
                paused.callback(session)

        made = failnozzle.mailin._Session.connectionMade

        def small_buffer(session):
            # Replies not read soon fill the sockets, not the kernel's
            # megabytes.
            session.transport.getHandle().setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            made(session)

        self.patch(failnozzle.mailin._Session, "pauseProducing", pausing)
        self.patch(failnozzle.mailin._Session, "connectionMade", small_buffer)
        count = 200000
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(WAIT_SECONDS)
            sock.connect(mail_address(service))
            sock.setblocking(False)
            data = b"NOOP\r\n" * count
            sent = 0
            while not paused.called:
                try:
                    sent += sock.send(data[sent:sent + 65536])
                except BlockingIOError:
                    yield deferLater(reactor, 0.01, lambda: None)
                if sent == len(data):
                    break
            session = yield bounded(paused)
            self.assertIn("replies", session._waiting)
            sock.settimeout(WAIT_SECONDS)
            # Reading and sending at once, as the server waits for both.
            reading = threads.deferToThread(sock.makefile("rb").read)
            yield bounded(threads.deferToThread(
                sock.sendall, data[sent:] + b"QUIT\r\n"))
            replies = yield bounded(reading)
        lines = replies.split(b"\r\n")
        self.assertEqual(lines[1:count + 1], [b"250 OK"] * count)
        self.assertEqual(lines[count + 1][:4], b"221 ")

    @defer.inlineCallbacks
    def test_content_bounded(self):
        """
        A 5 MiB message of short lines is taken whole (250) while at most
        MAX_PARSED_BYTES of it is ever held, and all is given back.
        """
        service = start(self, SMTPSink(self))
        held = []
        hold = service.mail.hold
        self.patch(service.mail, "hold", lambda size: held.append(
            service.mail.held_bytes + size) or hold(size))
        message = cron_mail().replace(b"starting", b"x\n" * (2_500_000))
        yield send_mail(service, message)
        self.assertLessEqual(max(held), MAX_PARSED_BYTES + 2)
        self.assertEqual(service.mail.held_bytes, 0)
        self.assertEqual(service.aggregator.flush().total, 1)

    @defer.inlineCallbacks
    def test_read_in_thread(self):
        """
        With mail read in the reactor's thread pool (as under twistd), a
        message is counted, and datagrams sent meanwhile are too.
        """
        service = start(self, SMTPSink(self))
        service.mail._in_thread = partial(
            threads.deferToThreadPool, reactor, reactor.getThreadPool())
        arrived = datagrams_received(service, 100)
        sending = send_mail(service, cron_mail())
        send_datagrams(udp_address(service), [record()] * 100)
        yield sending
        yield arrived
        self.assertEqual(service.aggregator.flush().total, 101)

    @defer.inlineCallbacks
    def test_connections_turned_away(self):
        """
        Past SMTP_INGEST_MAX_CONNECTIONS each client is told 421, with
        one line logged for all of them.
        """
        service = start(self, SMTPSink(self), SMTP_INGEST_MAX_CONNECTIONS=1)

        def connect() -> socket.socket:
            sock = socket.create_connection(mail_address(service),
                                            timeout=WAIT_SECONDS)
            self.assertEqual(sock.makefile("rb").readline()[:4], b"220 ")
            return sock

        first = yield bounded(threads.deferToThread(connect))
        self.addCleanup(first.close)
        for _ in range(10):
            lines = yield raw_session(service, b"", 2)
            self.assertEqual(lines,
                             [b"421 Too many connections; try again later"])
        self.assertEqual(
            [formatEvent(event) for event in self.events
             if "Turned" in event.get("log_format", "")],
            ["Turned a client away (421): SMTP_INGEST_MAX_CONNECTIONS (1) "
             "are connected"])


def item(request, number: int):
    """A Django view that fails, with a chained exception."""
    try:
        return {}[f"item-{number}"]
    except KeyError as error:
        raise ValueError("no such item") from error


#: The URLconf of the Django site in L{DjangoTests}.
urlpatterns = [path("items/<int:number>/", item)]


class FailnozzleBackend(EmailBackend):
    """
    The backend docs/mail-in.rst gives a site whose other mail must still go
    through EMAIL_HOST: error mail only, to failnozzle (here on the port
    a test sets).
    """

    port_for_tests = None

    def __init__(self, **kwargs):
        kwargs.update(host="127.0.0.1", port=self.port_for_tests)
        super().__init__(**kwargs)


class DjangoTests(TestCase):
    """
    A Django site with the error mail every Django site has (DEBUG off,
    ADMINS, Django's default LOGGING: AdminEmailHandler on
    django.request) and its SMTP backend pointed at failnozzle.
    """

    def setUp(self):
        from django.conf import settings

        if not settings.configured:
            settings.configure(
                DEBUG=False, ALLOWED_HOSTS=["*"], INSTALLED_APPS=[],
                ROOT_URLCONF=__name__, SECRET_KEY="failnozzle tests",
                ADMINS=[("Ops", "django@nozzle.example")],
                SERVER_EMAIL="root@web1.example", EMAIL_HOST="127.0.0.1",
                EMAIL_TIMEOUT=WAIT_SECONDS)
        import django
        from django.core.mail.utils import DNS_NAME

        django.setup()
        # The name Django's SMTP backend says EHLO with: this machine's.
        DNS_NAME.get_fqdn()
        machine, DNS_NAME._fqdn = DNS_NAME._fqdn, "web1.example"
        self.addCleanup(setattr, DNS_NAME, "_fqdn", machine)

    #: EMAIL_PORT, if not failnozzle's.
    email_port = None

    def request(self, service: FailnozzleService, remote_addr: str,
                agent: str) -> defer.Deferred:
        """
        Ask the site for C{/items/1/} as C{remote_addr} with browser
        C{agent}, in a thread: Django mails its report of the error at
        once, blocking.

        @return: a Deferred firing with the response's status code.
        """
        from django.test import Client
        from django.test.utils import override_settings

        def get():
            with override_settings(EMAIL_PORT=self.email_port or
                                   mail_address(service)[1]):
                client = Client(raise_request_exception=False)
                return client.get("/items/1/", REMOTE_ADDR=remote_addr,
                                  HTTP_USER_AGENT=agent).status_code

        return bounded(threads.deferToThread(get))

    @defer.inlineCallbacks
    def test_same_error_folds(self):
        """
        The same exception on two requests from different clients (the
        reports differ in META, time and user agent) is one digest entry
        counted 2X, with Django's traceback and where it was raised.
        """
        sink = SMTPSink(self)
        service = start(self, sink)
        for remote_addr, agent in (("10.0.0.7", "Firefox"),
                                   ("192.0.2.8", "curl/8.0")):
            status = yield self.request(service, remote_addr, agent)
            self.assertEqual(status, 500)
        outcomes, counts, message = yield digest_of(service, sink)
        subject = ("[Django] ERROR (EXTERNAL IP): Internal Server Error: "
                   "/items/1/")
        self.assertEqual(counts, {subject: {"web1.example": 2}})
        body = message.get_content()
        self.assertIn("(in django, ", body)
        self.assertIn("test_mailin_integration.py:", body)
        self.assertIn("The above exception ('item-1') was the direct cause",
                      body)
        self.assertIn("Exception Type: ValueError at /items/1/\n"
                      "Exception Value: no such item\n", body)
        for volatile in ("Firefox", "curl", "Server time", "META"):
            self.assertNotIn(volatile, body)

    @defer.inlineCallbacks
    def test_own_backend(self):
        """
        With docs/mail-in.rst's FailnozzleBackend on the mail_admins handler, error
        mail goes to failnozzle while EMAIL_HOST (here a port nothing
        listens on) stays the site's for its other mail.
        """
        from django.utils.log import AdminEmailHandler

        sink = SMTPSink(self)
        service = start(self, sink)
        self.patch(FailnozzleBackend, "port_for_tests",
                   mail_address(service)[1])
        self.email_port = free_tcp_port()
        handler = AdminEmailHandler(
            email_backend=f"{__name__}.FailnozzleBackend")
        logger = logging.getLogger("django")
        self.patch(logger, "handlers", [handler])
        status = yield self.request(service, "10.0.0.7", "Firefox")
        self.assertEqual(status, 500)
        _, counts, _ = yield digest_of(service, sink)
        self.assertEqual(list(counts.values()), [{"web1.example": 1}])
