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

Whatever a client sends costs a bounded amount: of a message only its
first MAX_PARSED_BYTES are kept (in one bytearray), all sessions together
keep at most MAX_HELD_BYTES, reading it is linear in what is kept (and runs
off the reactor when the service gives it a thread), a session reads no
more while its reply is pending or unread, and failed AUTH attempts are
answered ever later.
"""
from __future__ import annotations

import binascii
import encodings
import encodings.aliases
import hmac
import html
import ipaddress
import pkgutil
import re
import socket
import urllib.parse
from collections import OrderedDict
from typing import Callable, Iterator, Optional

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from OpenSSL import SSL, crypto
from twisted.internet import defer, ssl
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.mail.interfaces import (IChallengeResponse, IMessageDelivery,
                                     IMessageDeliveryFactory)
from twisted.mail.smtp import ESMTP, SMTPServerError
from twisted.python.failure import Failure
from zope.interface import implementer

from failnozzle.config import ConfigError
from failnozzle.counts import Counts
from failnozzle.ingest import BadDatagram, BelowLevel
from failnozzle.ratelog import RateLimitedLog
from failnozzle.textcap import one_line

_log = Logger()

#: Seconds a client may stay silent before it is told 421 and dropped:
#: RFC 5321's five minutes (Twisted's default is ten).
IDLE_TIMEOUT_SECONDS = 300

#: The most a message's content may send without a line end, in bytes.
#: RFC 5321 allows lines of 1,000; this is lenient with careless senders,
#: and still bounds what waits for a line end.
MAX_LINE_BYTES = 65536

#: Longest command line, in bytes (RFC 5321: 512, AUTH responses longer;
#: a MAIL FROM with a 5,000-digit SIZE is still read, and refused).
MAX_COMMAND_BYTES = 8192

#: Longest address in MAIL FROM or RCPT TO, brackets included (RFC 5321).
MAX_PATH_BYTES = 256

#: Of each message, what is kept and read: its headers and the start of
#: its body, where the subject, the kind and the first text part are.
MAX_PARSED_BYTES = 128 * 1024

#: What all sessions together may keep of messages not read yet; past it,
#: new messages are told 452 (try again later).
MAX_HELD_BYTES = 8 * 1024 * 1024

#: Of the text body, what is searched for a traceback, in characters.
MAX_TEXT_CHARS = 65536

#: Of a header, what is read (before any decoding), in characters.
MAX_HEADER_CHARS = 4096

#: MIME parts looked at, and how deep in nested multiparts, to find the
#: text body.
MAX_MIME_PARTS = 100
MAX_MIME_DEPTH = 10

#: Bytes of commands one session runs before the reactor does something
#: else: a command costs about as much as it is long (an address is parsed
#: a character at a time, 1 ms for one of 256 bytes).
COMMAND_BYTES_PER_TURN = 1024

#: Commands refused (5xx) before a client is told 421 and dropped.
MAX_REFUSED_COMMANDS = 20

#: Failed AUTH attempts before a connection is closed.
AUTH_TRIES = 3

#: The wait before answering an AUTH from an address that failed lately:
#: from the first, doubled with each failure up to the most.
AUTH_FIRST_DELAY_SECONDS = 1.0
AUTH_MAX_DELAY_SECONDS = 30.0

#: How long, and for how many client addresses, failures are remembered.
AUTH_MEMORY_SECONDS = 900
AUTH_MEMORY_CLIENTS = 10000

#: Seconds a stop waits for clients to be told 421 before hanging up on
#: them.
_HANG_UP_SECONDS = 2

# What a session may hold unread: a line waiting for its end, and what one
# read brings while it waits for its reply to be sent.
_MAX_UNREAD_BYTES = 4 * MAX_LINE_BYTES

_TRACEBACK = "Traceback (most recent call last):"
# Python's and Django's lines between the tracebacks of chained exceptions.
_CHAINED = ("During handling of the above exception",
            "The above exception")
_FRAME = re.compile(r'^[ \t]*File "(?P<path>[^"\n]+)", line (?P<line>\d{1,9})'
                    r', in (?P<function>\S+)', re.MULTILINE)
# Where the per-request and per-server part of a Django technical report
# without a traceback begins.
_DJANGO_DETAILS = re.compile(r"^(?:Request Method|Django Version): ",
                             re.MULTILINE)
_SIZE_PARAMETER = re.compile(rb"(?:^|\s)SIZE=(\S*)", re.IGNORECASE)
_SIZE_VALUE = re.compile(rb"\d{1,20}")


class BadMail(BadDatagram):
    reason = "mail that could not be read"


def read_mail(data: bytes, kind: str, source: str,
              source_field: str = "source") -> dict:
    """
    The error report a mail message (as received, without the dots SMTP
    adds) stands for, read from its first MAX_PARSED_BYTES in time linear
    in them.

    @param kind: the kind when the message has no X-Failnozzle-Kind header.
    @param source: the host it came from.
    """
    message = _Part(data[:MAX_PARSED_BYTES].replace(b"\r\n", b"\n"))
    exc_text = error_text(text_body(message))
    record = {
        "message": one_line(_decoded_words(message.subject))
        or "(no subject)",
        "exc_text": exc_text,
        "kind": one_line(_decoded_words(message.kind)) or kind,
        **_where(exc_text),
    }
    record[source_field] = source
    return record


# A message's (or a part's) header lines from its start, as the email
# package reads them: a name and a colon, or a continuation.
_HEADER_LINES = re.compile(
    rb"(?:(?:[\x21-\x39\x3b-\x7e]*:|[ \t])[^\n]*(?:\n|\Z))*")


def _field(name: bytes) -> re.Pattern:
    """The first header line of C{name}, its continuations with it."""
    return re.compile(rb"^" + name + rb":([^\n]*(?:\n[ \t][^\n]*)*)",
                      re.IGNORECASE | re.MULTILINE)


_SUBJECT = _field(rb"subject")
_KIND = _field(rb"x-failnozzle-kind")
_CONTENT_TYPE = _field(rb"content-type")
_TRANSFER_ENCODING = _field(rb"content-transfer-encoding")
_DISPOSITION = _field(rb"content-disposition")
_CONTENT_ID = _field(rb"content-id")


class _Part:
    """
    One entity of a MIME message, read only as far as finding its text
    body needs: the header fields that say what it is, its body undecoded.

    @ivar subject: the raw Subject (at most MAX_HEADER_CHARS), or "".
    @ivar content_type: such as C{"text/plain"}, lower case, as the email
        package gives it.
    @ivar params: the Content-Type's parameters, names in lower case.
    """

    def __init__(self, data: bytes, default_type: str = "text/plain") -> None:
        end = _HEADER_LINES.match(data).end()
        # A blank line ends the headers; a line that is none begins the body.
        self.body = data[end + (data[end:end + 1] == b"\n"):]

        def field(pattern: re.Pattern) -> Optional[str]:
            found = pattern.search(data, 0, end)
            if found is None:
                return None
            value = found.group(1)[:MAX_HEADER_CHARS]
            return value.decode("utf-8", "replace").replace("\n", "").strip()

        self.subject = field(_SUBJECT) or ""
        self.kind = field(_KIND) or ""
        self.transfer_encoding = (field(_TRANSFER_ENCODING) or "").lower()
        self.disposition = (field(_DISPOSITION) or "").partition(";")[
            0].strip().lower()
        self.content_id = field(_CONTENT_ID) or ""
        content_type = field(_CONTENT_TYPE)
        self.content_type = default_type
        self.params: dict = {}
        if content_type is not None:
            main, _, params = content_type.partition(";")
            main = main.strip().lower()
            self.content_type = main if main.count("/") == 1 else "text/plain"
            self.params = _parameters(params)

    def param(self, name: str) -> str:
        return self.params.get(name, "")

    def subparts(self, tickets: Iterator) -> Iterator[_Part]:
        """
        The parts of a multipart entity, in order, each taking one of
        C{tickets} (those left for the whole message): none once they are
        used up.
        """
        boundary = self.param("boundary").rstrip()
        if not boundary:
            return
        default = ("message/rfc822" if self.content_type == "multipart/digest"
                   else "text/plain")
        start = None
        for line, after, closing in _delimiters(
                self.body, b"--" + boundary.encode("utf-8", "replace")):
            if start is not None:
                if next(tickets, None) is None:
                    return
                yield _Part(self.body[start:max(start, line - 1)], default)
            if closing:
                return
            start = after
        if start is not None and next(tickets, None) is not None:
            yield _Part(self.body[start:], default)


_PARAMETER = re.compile(r'(?:^|;)[ \t]*([^\s;=]+)[ \t]*=[ \t]*'
                        r'("(?:[^"\\]|\\.)*"|[^;]*)')
_QUOTED_PAIR = re.compile(r"\\(.)")


def _parameters(text: str) -> dict:
    """
    A header's parameters (RFC 2045), the first of each name (in lower
    case), unquoted; of an RFC 2231 one (C{name*=charset'language'value}),
    its value, percent-decoded.  In one pass: the email package's parser
    takes time growing with the square of their length.
    """
    params: dict = {}
    for name, value in _PARAMETER.findall(text):
        value = value.strip()
        if value[:1] == '"' and value[-1:] == '"' and len(value) > 1:
            value = _QUOTED_PAIR.sub(r"\1", value[1:-1])
        name = name.lower()
        if name.endswith("*"):
            name = name[:-1]
            value = urllib.parse.unquote(value.split("'", 2)[-1])
        params.setdefault(name, value)
    return params


_DELIMITER_END = re.compile(rb"(--)?[ \t]*(?:\n|\Z)")


def _delimiters(body: bytes, delimiter: bytes) -> Iterator[tuple]:
    """
    C{(start, start of the next line, closing)} of each line of C{body}
    that is C{delimiter} (a boundary after two dashes), closing if two more
    dashes follow.
    """
    # Every line after a line end, the first too: only line starts are
    # found, by bytes.find.
    text = b"\n" + body
    line = b"\n" + delimiter
    found = text.find(line)
    while found >= 0:
        end = _DELIMITER_END.match(text, found + len(line))
        if end is not None:
            yield found, end.end() - 1, end.group(1) is not None
        found = text.find(line, found + 1)


def text_body(message: _Part) -> str:
    """
    The text a reader would see: the first text/plain part, else the first
    text/html part without its tags, else nothing; line ends as LF, no
    trailing white space, at most MAX_TEXT_CHARS.
    """
    part = _text_part(message)
    if part is None:
        return ""
    text = _text(_payload(part), part.param("charset"))
    if part.content_type == "text/html":
        text = _html_text(text)
    lines = text[:MAX_TEXT_CHARS].replace("\r\n", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip("\n")


def _text_part(message: _Part) -> Optional[_Part]:
    """
    The part C{EmailMessage.get_body(("plain", "html"))} would give,
    looking at no more than MAX_MIME_PARTS parts, MAX_MIME_DEPTH deep.
    """
    html_part = None
    for part in _text_parts(message, 0, iter(range(MAX_MIME_PARTS))):
        if part.content_type == "text/plain":
            return part
        html_part = html_part or part
    return html_part


def _text_parts(part: _Part, depth: int, tickets: Iterator
                ) -> Iterator[_Part]:
    """The text/plain and text/html parts that are no attachments."""
    if part.disposition == "attachment":
        return
    maintype, _, subtype = part.content_type.partition("/")
    if maintype == "text":
        if subtype in ("plain", "html"):
            yield part
        return
    if maintype != "multipart" or depth == MAX_MIME_DEPTH:
        return
    subparts = part.subparts(tickets)
    if subtype == "related":
        subparts = _start_part(part, subparts)
    for subpart in subparts:
        yield from _text_parts(subpart, depth + 1, tickets)


def _start_part(related: _Part, subparts: Iterator[_Part]) -> list:
    """
    Of a multipart/related, the part a reader sees: the one its start
    parameter names, else the first.
    """
    start = related.param("start")
    first = None
    for subpart in subparts:
        if not start or subpart.content_id == start:
            return [subpart]
        first = first or subpart
    return [first] if first else []


_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]+")


def _base64(data: bytes) -> bytes:
    """Base64 read leniently: other bytes skipped, a cut-short end padded."""
    data = _NOT_BASE64.sub(b"", data)
    if len(data) % 4 == 1:
        data = data[:-1]
    return binascii.a2b_base64(data + b"=" * (-len(data) % 4))


def _payload(part: _Part) -> bytes:
    """A part's body, its transfer encoding undone."""
    if part.transfer_encoding == "base64":
        return _base64(part.body)
    if part.transfer_encoding == "quoted-printable":
        return binascii.a2b_qp(part.body)
    return part.body


# The codecs Python has, by their normalized names and aliases: only these
# are looked up, as every other name would stay in the codec registry's
# cache for good.
_KNOWN_CODECS = frozenset(
    {*encodings.aliases.aliases, *encodings.aliases.aliases.values(),
     *(module.name for module in pkgutil.iter_modules(encodings.__path__))})
# Decoding these takes time growing with the square of the length.
_SLOW_CODECS = frozenset(("punycode", "idna"))


def _text(data: bytes, charset: str) -> str:
    """
    Bytes in a charset as text.  No charset, or ASCII, is read as UTF-8 (a
    cron job's output often is, undeclared); an unknown or slow charset
    too.  Undecodable bytes are replaced.
    """
    codec = encodings.normalize_encoding(charset.lower())
    codec = encodings.aliases.aliases.get(codec, codec)
    if codec not in _KNOWN_CODECS or codec in _SLOW_CODECS or codec == "ascii":
        codec = "utf_8"
    try:
        return data.decode(codec, "replace")
    except (LookupError, ValueError):
        return data.decode("utf-8", "replace")


_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")


def _decoded_words(value: str) -> str:
    """
    A header's text with its RFC 2047 encoded words decoded (white space
    between two of them dropped), in time linear in its length.
    """
    pieces = []
    position = 0
    for word in _ENCODED_WORD.finditer(value):
        between = value[position:word.start()]
        if not position or between.strip():
            pieces.append(between)
        charset, encoding, text = word.groups()
        raw = text.encode("ascii", "replace")
        data = (_base64(raw) if encoding in "bB"
                else binascii.a2b_qp(raw, header=True))
        pieces.append(_text(data, charset.partition("*")[0]))
        position = word.end()
    pieces.append(value[position:])
    return "".join(pieces)


# Comments, and the elements whose content is no text.
_HIDDEN = re.compile(r"<!--|<(script|style|head|title)\b", re.IGNORECASE)
_HIDDEN_END = {name: re.compile(rf"</{name}\b[^<>]*>", re.IGNORECASE)
               for name in ("script", "style", "head", "title")}
# The start tags of blocks, which begin a line; and any tag, declaration
# or processing instruction.  Neither takes a "<" that is not closed.
_BREAK = re.compile(r"<(?:br|p|div|tr|li|pre|table|h[1-6])\b[^<>]*>",
                    re.IGNORECASE)
_TAG = re.compile(r"</?[a-zA-Z][^<>]*>|<[!?/][^<>]*>")


def _html_text(document: str) -> str:
    """
    The text of an HTML document: no tags, comments, scripts or styles,
    blocks on lines of their own, entities decoded; a "<" that opens no
    tag, or one never closed, is text.  By regular expressions, with a
    step of Python only per comment or hidden element (Python's HTMLParser
    takes time growing with the square of some inputs).
    """
    pieces = []
    position = 0
    while True:
        hidden = _HIDDEN.search(document, position)
        if hidden is None:
            break
        pieces.append(document[position:hidden.start()])
        if hidden.group(1) is None:
            end = document.find("-->", hidden.end())
            position = len(document) if end < 0 else end + 3
        else:
            end = _HIDDEN_END[hidden.group(1).lower()].search(document,
                                                              hidden.end())
            position = len(document) if end is None else end.end()
    pieces.append(document[position:])
    text = _TAG.sub("", _BREAK.sub("\n", "".join(pieces)))
    return re.sub(r"\n\s*\n+", "\n\n", html.unescape(text))


def error_text(body: str) -> str:
    """
    What of a text body tells one error from another, so reports of the
    same error fold: the Python traceback in it ("Traceback (most recent
    call last):" to the exception line that ends it, chained exceptions
    included, Django's "Exception Type:"/"Exception Value:" ending too);
    else, for a Django report without a traceback, its head before the
    request and server details; else the whole body.  A Django report's
    other parts (server time, request, META, settings) differ in every
    report.  Linear in the length of C{body}.
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
    text ends before that (cut short).  Each line is looked at at most
    twice.
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
        number = end + 1
        while number < len(lines) and not lines[number].strip():
            number += 1
        if number == len(lines) or not lines[number].strip().startswith(
                _CHAINED):
            return end
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
    last = None
    for last in _FRAME.finditer(exc_text):
        pass
    if last is None:
        return {}
    path = last.group("path")
    filename = path.replace("\\", "/").rpartition("/")[2]
    return {"pathname": path, "lineno": int(last.group("line")),
            "funcName": last.group("function"), "filename": filename,
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
    given = one_line(_address_text(name or b"")).partition(" ")[0]
    name = given.strip("[]")[:255]
    return _address_text(address) if name.lower() in _NO_NAMES else name


def _declared_size(options: Optional[bytes]) -> Optional[int]:
    """
    The SIZE a client declared in MAIL FROM's options (RFC 1870), if any.

    @raise ValueError: it is not 1 to 20 digits.
    """
    found = _SIZE_PARAMETER.search(options or b"")
    if found is None:
        return None
    if not _SIZE_VALUE.fullmatch(found.group(1)):
        raise ValueError("SIZE is not a number of bytes")
    return int(found.group(1))


class _Message:
    """
    The content of one message as it arrives: its size (counted as on the
    wire, CRLF included), and its first MAX_PARSED_BYTES in one bytearray,
    taken from what all sessions may hold.  Past C{max_bytes} it is refused
    with 552, and with 452 if there is no room to keep it.

    @ivar refused: C{(code, reply)} it is to be answered at its end, if not
        250.
    @ivar abandoned: the client left before it was answered.
    """

    def __init__(self, ingest: MailIngest, recipient) -> None:
        self.recipient = recipient
        self.refused: Optional[tuple] = None
        self.abandoned = False
        self._ingest = ingest
        self._size = 0
        # A line end (standing for the one before the final dot, which
        # ends no line of the content), then the content.
        self._kept = bytearray()
        self._held = 0

    def write(self, piece: bytes) -> None:
        """
        Take a piece of the content as it came, dots still doubled: from
        a line end (or a bare LF) to before the next one.
        """
        if self.refused:
            return
        data = piece.replace(b"\r\n.", b"\r\n")
        self._size += len(data)
        if self._size > self._ingest.max_bytes:
            # Twisted sends it as it is: bytes.
            self._refuse(552, b"Message too big: more than %d bytes"
                         % self._ingest.max_bytes)
            return
        room = MAX_PARSED_BYTES + 2 - len(self._kept)
        if room > 0:
            data = data[:room]
            if not self._ingest.hold(len(data)):
                self._refuse(452, b"Insufficient system storage; try again "
                                  b"later")
                return
            self._held += len(data)
            self._kept += data

    def _refuse(self, code: int, reply: bytes) -> None:
        self.refused = (code, reply)
        self.release()

    def content(self) -> bytes:
        """What was kept, to be read once; still held until L{release}."""
        content = bytes(memoryview(self._kept)[2:])
        self._kept = bytearray()
        return content

    def release(self) -> None:
        """Give back what this message held."""
        self._kept = bytearray()
        self._ingest.release(self._held)
        self._held = 0


@implementer(IMessageDelivery)
class _Transaction:
    """One mail transaction (MAIL, RCPT..., DATA): its recipients."""

    def __init__(self, ingest: MailIngest) -> None:
        self._ingest = ingest
        self._recipients = 0

    def receivedHeader(self, helo, origin, recipients) -> None:
        return None

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user) -> Callable[[], None]:
        """
        Every address is accepted, as the mailbox of a kind, up to
        C{max_recipients}; nothing is relayed.
        """
        if self._recipients >= self._ingest.max_recipients:
            # Twisted sends it with networkString: str.
            raise SMTPServerError(452, "Too many recipients")
        self._recipients += 1
        # The content goes to _Session.do_DATA, not to an IMessage.
        return lambda: None


def _client_address(host: str) -> str:
    """Whose failed AUTH attempts these are: an IPv6 client's /64."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


@implementer(IPushProducer)
class _Session(ESMTP):
    """
    One client's connection: Twisted's ESMTP, with SIZE, limits, AUTH only
    where allowed and slowed down after failures, and answers for what
    Twisted would raise on or answer 550 to.

    It reads its input itself, one command at a time: nothing more while
    a reply is pending (the count of a message, a delayed AUTH answer) or
    unsent (it is the producer of its own transport), and at most
    C{COMMAND_BYTES_PER_TURN} before the reactor does something else.  A
    message's content is taken whole pieces at a time, not line by line.
    """

    noisy = False
    timeout = IDLE_TIMEOUT_SECONDS

    def __init__(self, ingest: MailIngest) -> None:
        super().__init__(ingest.challengers, ingest.tls)
        self._ingest = ingest
        self.host = ingest.domain
        self.callLater = ingest.clock.callLater
        self.closed = defer.Deferred()
        if not ingest.challengers:
            self.deliveryFactory = ingest
        self._unread = bytearray()
        # Of it, what was searched for a line end already: a line sent a
        # byte at a time is searched once, not once a byte.
        self._searched = 0
        self._waiting: set = set()
        self._timers: dict = {}
        self._reading = False
        self._gone = False
        self._message: Optional[_Message] = None
        self._counting: Optional[_Message] = None
        self._refused = 0
        self._auth_failures = 0

    def connectionMade(self) -> None:
        self._ingest.sessions.add(self)
        self._address = _client_address(self.transport.getPeer().host)
        super().connectionMade()
        self.transport.registerProducer(self, True)

    def connectionLost(self, reason) -> None:
        self._gone = True
        for timer in self._timers.values():
            timer.cancel()
        if self._message is not None:
            self._message.release()
        if self._counting is not None:
            self._counting.abandoned = True
        super().connectionLost(reason)
        self._ingest.sessions.discard(self)
        self.closed.callback(None)

    # Reading, one command at a time.

    def dataReceived(self, data: bytes) -> None:
        self._unread += data
        if len(self._unread) > _MAX_UNREAD_BYTES:
            self._drop("sent more than {limit} bytes without waiting for "
                       "replies", b"Too much unread input",
                       limit=_MAX_UNREAD_BYTES)
            return
        self._read()

    def _read(self) -> None:
        if self._reading:
            return  # Called back from a command: its loop goes on.
        self._reading = True
        try:
            read = 0
            while not self._waiting and not self.transport.disconnecting:
                if self._message is not None:
                    if not self._content():
                        return
                elif read >= COMMAND_BYTES_PER_TURN:
                    self._wait("turn", 0)
                else:
                    line = self._command()
                    if line is None:
                        return
                    read += len(line) + 2
                    self.lineReceived(line)
        finally:
            self._reading = False

    def _command(self) -> Optional[bytes]:
        """
        The next command line, if it has come in whole.  One that ends in
        a bare LF (no CR) is refused and the connection closed, as Postfix
        does: it would never be answered, and a bare LF that ends nothing
        is how SMTP smuggling begins.
        """
        unread = self._unread
        start = max(0, self._searched - 1)
        end = unread.find(b"\r\n", start, MAX_COMMAND_BYTES + 2)
        lf = unread.find(b"\n", start,
                         end if end >= 0 else MAX_COMMAND_BYTES + 2)
        if lf >= 0 and unread[lf - 1:lf] != b"\r":
            self._drop("ended a command with a bare LF, not CRLF",
                       b"5.5.2 Bare LF received: end lines with CRLF")
            return None
        if end < 0:
            self._searched = len(unread)
            if len(unread) > MAX_COMMAND_BYTES:
                self._line_too_long(MAX_COMMAND_BYTES)
            return None
        line = bytes(unread[:end])
        del unread[:end + 2]
        self._searched = 0
        return line

    def _content(self) -> bool:
        """
        Hand the message the content read so far; at its end answer it.

        @return: whether its end was reached.
        """
        self.resetTimeout()
        unread = self._unread
        end = unread.find(b"\r\n.\r\n", max(0, self._searched - 4))
        if end >= 0:
            self._message.write(bytes(unread[:end]))
            del unread[:end + 5]
            self._searched = 0
            self._end_of_data()
            return True
        # Up to the last line end: before it if it is CRLF, so the next
        # piece begins with one; after it if it is a bare LF (as smtplib
        # sends bytes), which begins no SMTP line.
        last = unread.rfind(b"\n", self._searched)
        cut = last - 1 if unread[last - 1:last] == b"\r" else last + 1
        if cut > 0:
            self._message.write(bytes(unread[:cut]))
            del unread[:cut]
        self._searched = len(unread)
        if len(unread) > MAX_LINE_BYTES + 2:
            self._line_too_long(MAX_LINE_BYTES)
        return False

    def _line_too_long(self, limit: int) -> None:
        self._drop("sent more than {limit} bytes without a line end",
                   b"Line too long", limit=limit)

    def _drop(self, why: str, reply: bytes, code: int = 500,
              **fields) -> None:
        """Say why, and close the connection."""
        self._unread.clear()
        self._searched = 0
        self._ingest.events.warn(
            "connections closed: " + why.format(**fields),
            "Closed the SMTP connection from {host}: it " + why,
            host=self._address, **fields)
        ESMTP.sendCode(self, code, reply)
        self.transport.loseConnection()

    def _wait(self, reason: str, seconds: float) -> defer.Deferred:
        """
        Read nothing more for C{seconds}: the Deferred fires then, before
        reading goes on.
        """
        waited = defer.Deferred()

        def over() -> None:
            del self._timers[reason]
            waited.callback(None)
            self._resume(reason)

        self._pause(reason)
        self._timers[reason] = self._ingest.clock.callLater(seconds, over)
        return waited

    def _pause(self, reason: str) -> None:
        if not self._waiting and not self.transport.disconnecting:
            self.transport.pauseProducing()
        self._waiting.add(reason)

    def _resume(self, reason: str) -> None:
        if reason not in self._waiting:
            return
        self._waiting.discard(reason)
        if self._waiting or self._gone or self.transport.disconnecting:
            return
        self.transport.resumeProducing()
        self._read()

    # IPushProducer: replies the client does not read stop the reading.

    def pauseProducing(self) -> None:
        self._pause("replies")

    def resumeProducing(self) -> None:
        self._resume("replies")

    def stopProducing(self) -> None:
        pass

    # Commands.

    def sendCode(self, code: int, message: bytes = b"") -> None:
        super().sendCode(code, message)
        if 500 <= code < 600:
            self._refused += 1
            if self._refused == MAX_REFUSED_COMMANDS:
                self._drop("had {count} commands refused",
                           b"Too many errors; closing", 421,
                           count=self._refused)

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
        started = self.startedTLS
        super().ext_STARTTLS(rest)
        if self.startedTLS and not started:
            # Lines sent with STARTTLS in one packet are plain text someone
            # may have injected, not commands over TLS (CVE-2011-0411).
            self._unread.clear()
            self._searched = 0

    def ext_AUTH(self, rest: bytes) -> None:
        if not self.challengers:
            self.sendCode(502, b"AUTH not available")
        elif not self._may_authenticate():
            self.sendCode(538, b"Encryption required: STARTTLS first")
        elif not rest.split():
            self.sendCode(501, b"Syntax: AUTH mechanism")
        else:
            super().ext_AUTH(rest)

    def _cbAuthenticated(self, loginInfo):
        # An address that failed lately waits even for a success: guesses
        # sent at once on many connections tell nothing sooner.
        result = super()._cbAuthenticated(loginInfo)
        delay = self._ingest.auth_failures.delay(self._address)
        if delay:
            return self._wait("auth", delay).addCallback(lambda _: result)
        return result

    def _ebAuthenticated(self, reason) -> None:
        if not reason.check(UnauthorizedLogin):
            super()._ebAuthenticated(reason)
            return
        self._auth_failures += 1
        failures = self._ingest.auth_failures.failed(self._address)
        delay = self._ingest.auth_failures.delay(self._address)
        self._ingest.events.warn(
            "failed AUTH", "Failed AUTH from {host} ({failures} lately); "
            "the answer waits {delay:g} s", host=self._address,
            failures=failures, delay=delay)
        if self._auth_failures < AUTH_TRIES:
            self._wait("auth", delay).addCallback(
                lambda _: self.sendCode(535, b"Authentication failed"))
        else:
            self._wait("auth", delay).addCallback(lambda _: self._drop(
                "failed AUTH {tries} times", b"Too many failed AUTH "
                b"attempts; closing", 421, tries=AUTH_TRIES))

    def do_MAIL(self, rest: bytes) -> None:
        match = self.mail_re.match(rest)
        if match is None:
            super().do_MAIL(rest)
            return
        try:
            size = _declared_size(match.group("opts"))
        except ValueError:
            self.sendCode(501, b"Syntax: SIZE=<message size in bytes>")
            return
        if len(match.group("path")) > MAX_PATH_BYTES:
            self.sendCode(501, b"Path too long")
        elif size is not None and size > self._ingest.max_bytes:
            self.sendCode(552, b"Message too big: more than %d bytes"
                          % self._ingest.max_bytes)
        elif not self._ingest.has_room():
            self._ingest.events.warn(
                "mail refused for memory", "Refused mail from {host} for "
                "now (452): the messages being received hold {held} bytes, "
                "the most they may", host=self._address,
                held=self._ingest.held_bytes)
            self.sendCode(452, b"Insufficient system storage; try again "
                               b"later")
        else:
            super().do_MAIL(rest)

    def do_RCPT(self, rest: bytes) -> None:
        match = self.rcpt_re.match(rest)
        if match is not None and len(match.group("path")) > MAX_PATH_BYTES:
            self.sendCode(501, b"Path too long")
        else:
            super().do_RCPT(rest)

    def validateFrom(self, helo, origin):
        if self.deliveryFactory is None:
            # Twisted sends it with networkString: str.
            raise SMTPServerError(530, "Authentication required")
        return super().validateFrom(helo, origin)

    def do_DATA(self, rest: bytes) -> None:
        # Twisted's hands each line to each recipient's IMessage; here the
        # content is read whole pieces at a time, once.
        if self._from is None or not self._to:
            self.sendCode(503, b"Must have valid receiver and originator")
            return
        recipient = self._to[0][0]
        self._from = None
        self._to = []
        self._message = _Message(self._ingest, recipient)
        # The content begins at a line start: a line end before it lets
        # its first line be found as any other.
        self._unread[:0] = b"\r\n"
        self._searched = 0
        self.sendCode(354, b"Continue")

    def _end_of_data(self) -> None:
        message, self._message = self._message, None
        if message.refused:
            code, reply = message.refused
            if code == 552:
                self._ingest.events.warn(
                    "messages too big", "Refused a message from {host}: "
                    "more than SMTP_INGEST_MAX_BYTES ({limit} bytes)",
                    host=self._address, limit=self._ingest.max_bytes)
            self.sendCode(code, reply)
            return
        self._counting = message
        self._pause("count")
        counted = self._ingest.receive(message)
        counted.addCallbacks(self._counted, self._not_counted)
        counted.addBoth(lambda _: self._resume("count"))

    def _counted(self, _: object) -> None:
        self._counting = None
        self.sendCode(250, b"Counted for the next digest")

    def _not_counted(self, failure: Failure) -> None:
        # A stop (421) must tell the client to try again later.
        self._counting = None
        if failure.check(SMTPServerError):
            self.sendCode(failure.value.code, failure.value.resp)
        else:
            _log.failure("Could not count a mail message", failure)
            self.sendCode(451, b"Local error; try again later")

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


class _AuthFailures:
    """
    Failed AUTH attempts per client address (an IPv6 client's /64), each
    remembered AUTH_MEMORY_SECONDS after the last, for at most
    AUTH_MEMORY_CLIENTS addresses (the oldest forgotten first): each one
    doubles the wait before answering that address, which reconnecting
    does not start again.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        #: Per address: failures, and the time of the last one.
        self._failures: OrderedDict = OrderedDict()

    def delay(self, address: str) -> float:
        """The seconds to wait before answering an AUTH from C{address}."""
        failures = self._count(address)
        if not failures:
            return 0.0
        return min(AUTH_MAX_DELAY_SECONDS, AUTH_FIRST_DELAY_SECONDS
                   * 2 ** min(failures - 1, 16))

    def failed(self, address: str) -> int:
        """Count one more failure of C{address}; return how many lately."""
        failures = self._count(address) + 1
        self._failures[address] = (failures, self._clock.seconds())
        self._failures.move_to_end(address)
        while len(self._failures) > AUTH_MEMORY_CLIENTS:
            self._failures.popitem(last=False)
        return failures

    def _count(self, address: str) -> int:
        failures, last = self._failures.get(address, (0, 0.0))
        if failures and self._clock.seconds() - last > AUTH_MEMORY_SECONDS:
            del self._failures[address]
            return 0
        return failures


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
    @ivar held_bytes: what the messages being received and read hold.
    @ivar events: the warnings about clients, at a limited rate.
    @ivar auth_failures: the failed AUTH attempts remembered.
    """

    noisy = False

    def __init__(self, reader, aggregator, report_bad_input: Callable,
                 saved: Callable[[], defer.Deferred], clock: IReactorTime, *,
                 domain: str, source_field: str, max_bytes: int,
                 max_connections: int, max_recipients: int,
                 users: Optional[dict] = None,
                 tls: Optional[ssl.CertificateOptions] = None,
                 in_thread: Callable[..., defer.Deferred] = (
                     defer.maybeDeferred),
                 max_held_bytes: int = MAX_HELD_BYTES,
                 counts: Optional[Counts] = None) -> None:
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
        @param in_thread: runs the reading of a message, one at a time,
            such as in the reactor's thread pool; by default on the
            reactor.
        @param max_held_bytes: what all messages may hold together.
        @param counts: where the messages received are counted.
        """
        self._aggregator = aggregator
        self._counts = counts or Counts(0.0)
        self._report_bad_input = report_bad_input
        self._saved = saved
        self.clock = clock
        self._in_thread = in_thread
        self._reading = defer.DeferredLock()
        self.max_held_bytes = max_held_bytes
        self.held_bytes = 0
        self.events = RateLimitedLog(_log, clock)
        self.auth_failures = _AuthFailures(clock)
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
            self.events.warn(
                "clients turned away", "Turned a client away (421): "
                "SMTP_INGEST_MAX_CONNECTIONS ({limit}) are connected",
                limit=self.max_connections)
            return _Busy()
        session = _Session(self)
        session.factory = self
        session.portal = self.portal
        return session

    def getMessageDelivery(self) -> IMessageDelivery:
        return _Transaction(self)

    def has_room(self) -> bool:
        """Whether a new message may be taken now."""
        return self.held_bytes < self.max_held_bytes

    def hold(self, size: int) -> bool:
        """Take C{size} bytes for a message, if all may still hold them."""
        if self.held_bytes + size > self.max_held_bytes:
            return False
        self.held_bytes += size
        return True

    def release(self, size: int) -> None:
        self.held_bytes -= size

    def receive(self, message: _Message) -> defer.Deferred:
        """
        Read and count C{message}, once, whoever else it went to: as the
        first recipient's (a L{twisted.mail.smtp.User}) kind, from the host
        its client named.

        @return: a Deferred firing when the client may be told 250.
        """
        if not self.accepting:
            message.release()
            return defer.fail(_stopping())
        recipient = message.recipient
        peer = recipient.protocol.transport.getPeer()
        data = message.content()
        reading = self._reading.run(
            self._in_thread, read_mail, data,
            one_line(_address_text(recipient.dest.local)).lower(),
            client_name(recipient.helo), self._source_field)
        return reading.addBoth(self._count, message, data, (peer.host,
                                                            peer.port))

    def _count(self, record, message: _Message, data: bytes,
               sender: tuple) -> Optional[defer.Deferred]:
        message.release()
        if not self.accepting:
            # Not counted: the last digest may be gone already.
            raise _stopping()
        if message.abandoned:
            return None  # Not told 250, the client sends it again.
        self._counts.received["mail"] += 1
        if isinstance(record, Failure):
            self._report_bad_input(BadMail(
                f"{record.type.__name__}: {record.value}", data), sender)
        else:
            try:
                self._aggregator.add(self._reader.report_of(record))
            except BelowLevel:
                self._counts.below_level["mail"] += 1
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
        self.events.stop()
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


def _stopping() -> SMTPServerError:
    return SMTPServerError(421, b"failnozzle stopping; try again later")


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
