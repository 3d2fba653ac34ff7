"""
Receiving errors by mail: an ESMTP server (SMTP_INGEST_BIND) that turns
each message into one error report, for what can only send mail: Django's
AdminEmailHandler, cron's MAILTO, any application's error mail.

A message becomes the record C{{"message": Subject, "exc_text": the text
body's traceback (or the whole text body), "kind": X-Failnozzle-Kind or the
first recipient's local part, source: the client's HELO name or address}}
and is counted as a datagram's record is.  The client hears 250 only once
it is counted and, with snapshots on, in a snapshot: from then on a crash
loses nothing the client let go of.  Nothing is ever relayed: every
recipient address is a mailbox named after a kind.
"""
from __future__ import annotations

import email
import email.policy
import hmac
import re
import socket
from html.parser import HTMLParser
from typing import Callable, Optional

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from OpenSSL import SSL, crypto
from twisted.internet import defer, ssl
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.mail.interfaces import (IChallengeResponse, IMessageDelivery,
                                     IMessageDeliveryFactory, IMessageSMTP)
from twisted.mail.smtp import ESMTP, SMTPServerError
from zope.interface import implementer

from failnozzle.config import ConfigError
from failnozzle.ingest import BadDatagram

_log = Logger()

#: Seconds a client may stay silent before it is told 421 and dropped:
#: RFC 5321's five minutes (Twisted's default is ten).
IDLE_TIMEOUT_SECONDS = 300

#: Longest line accepted, in bytes.  RFC 5321 allows 1,000; this is more
#: lenient with careless senders, and still bounds a line's buffer.
MAX_LINE_BYTES = 65536

#: Seconds a stop waits for clients to be told 421 before hanging up on
#: them.
_HANG_UP_SECONDS = 2

_TRACEBACK = "Traceback (most recent call last):"
# Python's and Django's lines between the tracebacks of chained exceptions.
_CHAINED = ("During handling of the above exception",
            "The above exception")
_FRAME = re.compile(r'^\s*File "(?P<path>[^"]+)", line (?P<line>\d+), '
                    r'in (?P<function>\S+)', re.MULTILINE)
# Where the per-request and per-server part of a Django technical report
# without a traceback begins.
_DJANGO_DETAILS = re.compile(r"^(?:Request Method|Django Version): ",
                             re.MULTILINE)
_SIZE_PARAMETER = re.compile(rb"(?:^|\s)SIZE=(\d+)", re.IGNORECASE)


class BadMail(BadDatagram):
    reason = "mail that could not be read"


def read_mail(data: bytes, kind: str, source: str,
              source_field: str = "source") -> dict:
    """
    The error report a mail message (as received, without the dots SMTP
    adds) stands for.

    @param kind: the kind when the message has no X-Failnozzle-Kind header.
    @param source: the host it came from.
    """
    message = email.message_from_bytes(data, policy=email.policy.default)
    exc_text = error_text(text_body(message))
    record = {
        "message": _one_line(message["Subject"]) or "(no subject)",
        "exc_text": exc_text,
        "kind": _one_line(message["X-Failnozzle-Kind"]) or kind,
        **_where(exc_text),
    }
    record[source_field] = source
    return record


def _one_line(header: Optional[str]) -> str:
    return " ".join(str(header).split()) if header is not None else ""


def text_body(message: email.message.EmailMessage) -> str:
    """
    The text a reader would see: the first text/plain part, else the first
    text/html part without its tags, else nothing; line ends as LF, no
    trailing white space.
    """
    part = message.get_body(preferencelist=("plain", "html"))
    if part is None:
        return ""
    text = _decoded(part)
    if part.get_content_subtype() == "html":
        text = _HTMLText.of(text)
    lines = text.replace("\r\n", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip("\n")


def _decoded(part: email.message.EmailMessage) -> str:
    """
    A text part's content, its transfer encoding and charset undone.  No
    charset, or ASCII, is read as UTF-8 (a cron job's output often is,
    undeclared); an unknown charset too.  Undecodable bytes are replaced.
    """
    payload = part.get_payload(decode=True) or b""
    charset = part.get_content_charset() or "utf-8"
    if charset in ("us-ascii", "ascii"):
        charset = "utf-8"
    try:
        return payload.decode(charset, "replace")
    except (LookupError, ValueError):
        return payload.decode("utf-8", "replace")


class _HTMLText(HTMLParser):
    """The text of an HTML document: no tags, scripts or styles."""

    _HIDDEN = frozenset(("script", "style", "head", "title"))
    _BREAKS = frozenset(("br", "p", "div", "tr", "li", "pre", "table",
                         "h1", "h2", "h3", "h4", "h5", "h6"))

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._parts: list = []
        self._hidden = 0

    @classmethod
    def of(cls, html: str) -> str:
        parser = cls()
        parser.feed(html)
        parser.close()
        return re.sub(r"\n\s*\n+", "\n\n", "".join(parser._parts))

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self._HIDDEN:
            self._hidden += 1
        elif tag in self._BREAKS:
            self._parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN:
            self._hidden = max(0, self._hidden - 1)

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self._parts.append(data)


def error_text(body: str) -> str:
    """
    What of a text body tells one error from another, so reports of the
    same error fold: the Python traceback in it ("Traceback (most recent
    call last):" to the exception line that ends it, chained exceptions
    included, Django's "Exception Type:"/"Exception Value:" ending too);
    else, for a Django report without a traceback, its head before the
    request and server details; else the whole body.  A Django report's
    other parts (server time, request, META, settings) differ in every
    report.
    """
    lines = body.split("\n")
    start = next((number for number, line in enumerate(lines)
                  if line.strip() == _TRACEBACK), None)
    if start is not None:
        end = _traceback_end(lines, start)
        if end is not None:
            return "\n".join(lines[start:end + 1])
    details = _DJANGO_DETAILS.search(body)
    if details is not None:
        return body[:details.start()].rstrip()
    return body


def _traceback_end(lines: list, start: int) -> Optional[int]:
    """
    The number of the line that ends the traceback beginning at
    C{lines[start]}: the first line after it indented no deeper than its
    header, unless a chained exception's traceback follows; None if the
    text ends before that (cut short).
    """
    indent = _indent(lines[start])
    number = start + 1
    while number < len(lines):
        line = lines[number].strip()
        if (not line or _indent(lines[number]) > indent or line == _TRACEBACK
                or line.startswith(_CHAINED)):
            number += 1
            continue
        end = number
        if (line.startswith("Exception Type:") and end + 1 < len(lines)
                and lines[end + 1].startswith("Exception Value:")):
            end += 1
        following = next((text.strip() for text in lines[end + 1:]
                          if text.strip()), "")
        if not following.startswith(_CHAINED):
            return end
        number = end + 1
    return None


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _where(exc_text: str) -> dict:
    """
    Where a traceback's last frame is, in the fields a logging record
    has, so a digest's headline says where the error happened.
    """
    if not exc_text.startswith(_TRACEBACK):
        return {}
    frames = list(_FRAME.finditer(exc_text))
    if not frames:
        return {}
    path = frames[-1].group("path")
    filename = path.replace("\\", "/").rpartition("/")[2]
    return {"pathname": path, "lineno": int(frames[-1].group("line")),
            "funcName": frames[-1].group("function"), "filename": filename,
            "module": filename.rpartition(".")[0] or filename}


def _address_text(value: object) -> str:
    return (value.decode("utf-8", "replace") if isinstance(value, bytes)
            else str(value))


#: HELO names that name no host: msmtp's default, for one.
_NO_NAMES = frozenset(("", "localhost", "localhost.localdomain"))


def client_name(helo: tuple) -> str:
    """
    The sending host: the name the client gave in HELO or EHLO (Django and
    smtplib give the machine's name; an address literal loses its
    brackets), else, or if that is "localhost", its IP address.
    """
    name, address = helo
    given = _address_text(name or b"").split()
    name = given[0].strip("[]")[:255] if given else ""
    return _address_text(address) if name.lower() in _NO_NAMES else name


@implementer(IMessageSMTP)
class _Message:
    """
    The content of one message, kept up to C{max_bytes} (counted as on
    the wire, CRLF included); beyond that the client is told 552 at its
    end, and nothing is counted.
    """

    def __init__(self, ingest: MailIngest, recipient) -> None:
        self._ingest = ingest
        self._recipient = recipient
        self._lines: list = []
        self._size = 0

    def lineReceived(self, line: bytes) -> None:
        self._size += len(line) + 2
        if self._size > self._ingest.max_bytes:
            self._lines = []
            # Twisted sends it as it is: bytes.
            raise SMTPServerError(
                552, b"Message too big: more than %d bytes"
                % self._ingest.max_bytes)
        self._lines.append(line)

    def eomReceived(self) -> defer.Deferred:
        data, self._lines = b"\n".join(self._lines), []
        return self._ingest.receive(data, self._recipient)

    def connectionLost(self) -> None:
        self._lines = []


@implementer(IMessageSMTP)
class _Copy:
    """
    A further recipient's copy of a message: Twisted hands every
    recipient the content, but one message is one error, counted once.
    """

    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self) -> defer.Deferred:
        return defer.succeed(None)

    def connectionLost(self) -> None:
        pass


_COPY = _Copy()


@implementer(IMessageDelivery)
class _Transaction:
    """One mail transaction (MAIL, RCPT..., DATA): its recipients."""

    def __init__(self, ingest: MailIngest) -> None:
        self._ingest = ingest
        self._recipients: list = []
        self._message: Optional[_Message] = None

    def receivedHeader(self, helo, origin, recipients) -> None:
        return None

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user) -> Callable[[], IMessageSMTP]:
        """
        Every address is accepted, as the mailbox of a kind, up to
        C{max_recipients}; nothing is relayed.
        """
        if len(self._recipients) >= self._ingest.max_recipients:
            # Twisted sends it with networkString: str.
            raise SMTPServerError(452, "Too many recipients")
        self._recipients.append(user)
        return self._message_for

    def _message_for(self) -> IMessageSMTP:
        if self._message is not None:
            return _COPY
        self._message = _Message(self._ingest, self._recipients[0])
        return self._message


class _Session(ESMTP):
    """
    One client's connection: Twisted's ESMTP, with SIZE, limits, AUTH only
    where allowed, and answers for what Twisted would raise on or answer
    550 to.
    """

    noisy = False
    timeout = IDLE_TIMEOUT_SECONDS
    MAX_LENGTH = MAX_LINE_BYTES

    def __init__(self, ingest: MailIngest) -> None:
        super().__init__(ingest.challengers, ingest.tls)
        self._ingest = ingest
        self.host = ingest.domain
        self.callLater = ingest.clock.callLater
        self.closed = defer.Deferred()
        if not ingest.challengers:
            self.deliveryFactory = ingest
        self._discard_read = False

    def connectionMade(self) -> None:
        self._ingest.sessions.add(self)
        super().connectionMade()

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        self._ingest.sessions.discard(self)
        self.closed.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self._discard_read = False
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        # Lines sent with STARTTLS in one packet are plain text someone may
        # have injected, not commands over TLS (CVE-2011-0411).
        if not self._discard_read:
            super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        # Twisted answers 500 and goes on reading: the rest of the line then
        # arrives as commands, and a line without an end fills memory.
        self._buffer = b""
        self.sendCode(500, b"Line too long")
        self.transport.loseConnection()

    def do_NOOP(self, rest: bytes) -> None:
        # RFC 5321 requires it; Twisted answers 500.
        self.sendCode(250, b"OK")

    def lookupMethod(self, command: bytes):
        if not command.isascii():
            return None  # Twisted would raise UnicodeDecodeError.
        return super().lookupMethod(command)

    def _may_authenticate(self) -> bool:
        """AUTH only over TLS when TLS is configured: passwords stay hidden."""
        return self.ctx is None or self.startedTLS

    def extensions(self) -> dict:
        extensions = super().extensions()
        if not self._may_authenticate():
            del extensions[b"AUTH"]
        extensions[b"SIZE"] = [b"%d" % self._ingest.max_bytes]
        extensions[b"8BITMIME"] = None
        return extensions

    def ext_STARTTLS(self, rest: bytes) -> None:
        super().ext_STARTTLS(rest)
        if self.startedTLS:
            self._discard_read = True
            self._buffer = b""

    def ext_AUTH(self, rest: bytes) -> None:
        if not self.challengers:
            self.sendCode(502, b"AUTH not available")
        elif not self._may_authenticate():
            self.sendCode(538, b"Encryption required: STARTTLS first")
        elif not rest.split():
            self.sendCode(501, b"Syntax: AUTH mechanism")
        else:
            super().ext_AUTH(rest)

    def do_MAIL(self, rest: bytes) -> None:
        match = self.mail_re.match(rest)
        size = (_SIZE_PARAMETER.search(match.group("opts") or b"")
                if match else None)
        if size and int(size.group(1)) > self._ingest.max_bytes:
            self.sendCode(552, b"Message too big: more than %d bytes"
                          % self._ingest.max_bytes)
        else:
            super().do_MAIL(rest)

    def validateFrom(self, helo, origin):
        if self.deliveryFactory is None:
            # Twisted sends it with networkString: str.
            raise SMTPServerError(530, "Authentication required")
        return super().validateFrom(helo, origin)

    def _messageHandled(self, resultList: list) -> None:
        # Twisted answers any failure 550, which tells the client to give
        # up; a stop (421) must tell it to try again later.
        for success, result in resultList:
            if not success:
                if result.check(SMTPServerError):
                    self.sendCode(result.value.code, result.value.resp)
                else:
                    _log.failure("Could not count a mail message", result)
                    self.sendCode(451, b"Local error; try again later")
                return
        self.sendCode(250, b"Counted for the next digest")

    def hang_up(self) -> defer.Deferred:
        """Tell the client the server is stopping, and close."""
        self.sendCode(421, self.host + b" failnozzle stopping; try again "
                                       b"later")
        self.transport.loseConnection()
        return self.closed


class _Busy(Protocol):
    """What a client past SMTP_INGEST_MAX_CONNECTIONS gets: 421, goodbye."""

    def connectionMade(self) -> None:
        self.transport.write(b"421 Too many connections; try again later"
                             b"\r\n")
        self.transport.loseConnection()


@implementer(IChallengeResponse)
class _PlainCredentials(UsernamePassword):
    """AUTH PLAIN (RFC 4616); a malformed response fails to log in."""

    def __init__(self) -> None:
        super().__init__(None, None)

    def getChallenge(self) -> bytes:
        return b""

    def setResponse(self, response: bytes) -> None:
        # Twisted's own raises on a malformed response, out of the protocol.
        parts = response.split(b"\0")
        if len(parts) == 3:
            _, self.username, self.password = parts

    def moreChallenges(self) -> bool:
        return False


@implementer(IChallengeResponse)
class _LoginCredentials(UsernamePassword):
    """AUTH LOGIN, with the prompts clients expect."""

    def __init__(self) -> None:
        super().__init__(None, None)
        self._prompts = [b"Username:", b"Password:"]
        self._fields = ["username", "password"]

    def getChallenge(self) -> bytes:
        return self._prompts.pop(0)

    def setResponse(self, response: bytes) -> None:
        setattr(self, self._fields.pop(0), response)

    def moreChallenges(self) -> bool:
        return bool(self._prompts)


@implementer(ICredentialsChecker)
class UsersChecker:
    """SMTP_INGEST_USERS' names and passwords, compared in constant time."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: dict) -> None:
        self._users = {name.encode("utf-8"): password.encode("utf-8")
                       for name, password in users.items()}

    def requestAvatarId(self, credentials) -> defer.Deferred:
        name = credentials.username or b""
        password = credentials.password or b""
        expected = self._users.get(name)
        # Compared even for an unknown name, which so takes as long.
        matches = hmac.compare_digest(password, expected or b"")
        if matches and expected is not None:
            return defer.succeed(name)
        return defer.fail(UnauthorizedLogin())


@implementer(IRealm)
class _Realm:
    """A user who logged in may send mail, as anyone may without AUTH."""

    def __init__(self, ingest: MailIngest) -> None:
        self._ingest = ingest

    def requestAvatar(self, avatar_id, mind, *interfaces) -> tuple:
        return IMessageDeliveryFactory, self._ingest, lambda: None


def tls_options(cert_path: str, key_path: str) -> ssl.CertificateOptions:
    """
    The TLS options STARTTLS offers: the certificate (and any chain after
    it in the same file) and its key, checked now so that a bad file stops
    start-up, not the first client's STARTTLS.

    @raise ConfigError: a file is unreadable, not PEM, or the key does not
        fit the certificate; it names the setting.
    """
    pems = {}
    for setting, path in (("SMTP_INGEST_TLS_CERT", cert_path),
                          ("SMTP_INGEST_TLS_KEY", key_path)):
        try:
            with open(path, "rb") as pem:
                pems[setting] = pem.read()
        except OSError as error:
            raise ConfigError(f"{setting}: cannot read {path!r}: "
                              f"{error.strerror}") from None
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END "
                        rb"CERTIFICATE-----", pems["SMTP_INGEST_TLS_CERT"],
                        re.DOTALL)
    try:
        chain = [ssl.Certificate.loadPEM(block).original for block in blocks]
    except crypto.Error:
        chain = []
    if not chain:
        raise ConfigError(f"SMTP_INGEST_TLS_CERT: no PEM certificate in "
                          f"{cert_path!r}")
    try:
        # An empty passphrase, not None: OpenSSL would ask for one on the
        # terminal.
        key = crypto.load_privatekey(crypto.FILETYPE_PEM,
                                     pems["SMTP_INGEST_TLS_KEY"], b"")
    except crypto.Error:
        raise ConfigError(f"SMTP_INGEST_TLS_KEY: no PEM private key (without "
                          f"a passphrase) in {key_path!r}") from None
    options = ssl.CertificateOptions(privateKey=key, certificate=chain[0],
                                     extraCertChain=chain[1:])
    try:
        options.getContext()
    except SSL.Error:
        raise ConfigError(f"SMTP_INGEST_TLS_KEY: the key in {key_path!r} is "
                          f"not the one of the certificate in "
                          f"{cert_path!r}") from None
    return options


@implementer(IMessageDeliveryFactory)
class MailIngest(ServerFactory):
    """
    The SMTP server: builds a session per connection (up to
    C{max_connections}), and counts each message that arrives.

    @ivar sessions: the connections open now.
    """

    noisy = False

    def __init__(self, reader, aggregator, report_bad_input: Callable,
                 saved: Callable[[], defer.Deferred], clock: IReactorTime, *,
                 domain: str, source_field: str, max_bytes: int,
                 max_connections: int, max_recipients: int,
                 users: Optional[dict] = None,
                 tls: Optional[ssl.CertificateOptions] = None) -> None:
        """
        @param reader: the L{failnozzle.ingest.RecordReader} datagrams are
            read with, for the unique key of each message's record.
        @param aggregator: where each message is counted.
        @param report_bad_input: counts and logs a message that could not
            be read (C{error, (host, port)}).
        @param saved: returns a Deferred firing once what is counted now
            is in a snapshot (or failed to be written); a message is
            answered 250 then.
        @param domain: the name the server greets with.
        @param users: names and passwords: AUTH is then required.
        @param tls: offered with STARTTLS; with C{users}, AUTH only after
            it.
        """
        self._aggregator = aggregator
        self._report_bad_input = report_bad_input
        self._saved = saved
        self.clock = clock
        self.sessions: set = set()
        self.accepting = True
        self.configure(reader, domain=domain, source_field=source_field,
                       max_bytes=max_bytes, max_connections=max_connections,
                       max_recipients=max_recipients, users=users, tls=tls)

    def configure(self, reader, *, domain: str, source_field: str,
                  max_bytes: int, max_connections: int, max_recipients: int,
                  users: Optional[dict] = None,
                  tls: Optional[ssl.CertificateOptions] = None) -> None:
        """
        Take new settings (see L{__init__}): for the connections made from
        now on, and for the messages of those open.
        """
        self._reader = reader
        self.domain = domain.encode("ascii", "replace")
        self._source_field = source_field
        self.max_bytes = max_bytes
        self.max_connections = max_connections
        self.max_recipients = max_recipients
        self.tls = tls
        self.challengers: dict = {}
        self.portal = None
        if users:
            self.challengers = {b"PLAIN": _PlainCredentials,
                                b"LOGIN": _LoginCredentials}
            self.portal = Portal(_Realm(self), [UsersChecker(users)])

    def buildProtocol(self, addr) -> Protocol:
        if len(self.sessions) >= self.max_connections:
            return _Busy()
        session = _Session(self)
        session.factory = self
        session.portal = self.portal
        return session

    def getMessageDelivery(self) -> IMessageDelivery:
        return _Transaction(self)

    def receive(self, data: bytes, recipient) -> defer.Deferred:
        """
        Count the message C{data} sent to C{recipient} (the first one, a
        L{twisted.mail.smtp.User}), once, whoever else it went to.

        @return: a Deferred firing when the client may be told 250.
        """
        if not self.accepting:
            # Not counted: the last digest may be gone already.
            return defer.fail(SMTPServerError(
                421, b"failnozzle stopping; try again later"))
        peer = recipient.protocol.transport.getPeer()
        source = client_name(recipient.helo)
        kind = _address_text(recipient.dest.local).lower()
        try:
            record = read_mail(data, kind, source, self._source_field)
        except Exception as error:
            self._report_bad_input(
                BadMail(f"{type(error).__name__}: {error}", data),
                (peer.host, peer.port))
        else:
            self._aggregator.add_key(*self._reader.key_and_source(record))
        return self._saved().addCallback(lambda _: None)

    def stop_accepting(self) -> None:
        """From now on answer messages 421 (try later) and count none."""
        self.accepting = False

    def hang_up(self) -> defer.Deferred:
        """
        Tell every client still connected 421 and close; abort those whose
        connection has not closed within a few seconds.

        @return: a Deferred firing once all are closed.
        """
        sessions = list(self.sessions)
        closed = defer.gatherResults([session.hang_up()
                                      for session in sessions])
        abort = self.clock.callLater(_HANG_UP_SECONDS, lambda: [
            session.transport.abortConnection() for session in sessions
            if session in self.sessions])

        def done(_: object) -> None:
            if abort.active():
                abort.cancel()

        return closed.addBoth(done)


def bind_tcp_socket(host: str, port: int, backlog: int = 50
                    ) -> socket.socket:
    """
    Open the TCP socket mail arrives on, before the reactor runs, so a
    port in use stops start-up with one clear line (and port 25 can be
    bound before twistd sheds privileges).

    @raise OSError: the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # A restart must not wait for the last run's connections to age.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
