"""
Tests for L{failnozzle.mailin}: mail into records (headers, MIME, charsets,
tracebacks), the SMTP server's limits, AUTH and STARTTLS, the 250 that
waits for the count and the snapshot, and random input, over
L{StringTransport} and L{Clock}.
"""
import base64
import email
import email.policy
import encodings
import random
import socket
from email.message import EmailMessage

import trustme
from cryptography.hazmat.primitives import serialization
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

import failnozzle.mailin
from failnozzle.aggregate import Aggregator
from failnozzle.config import ConfigError, UniqueMessage
from failnozzle.ingest import RecordReader, default_internal_error_record
from failnozzle.mailin import (AUTH_MAX_DELAY_SECONDS, AUTH_MEMORY_SECONDS,
                               COMMAND_BYTES_PER_TURN, IDLE_TIMEOUT_SECONDS,
                               MAX_COMMAND_BYTES, MAX_HEADER_CHARS,
                               MAX_LINE_BYTES, MAX_MIME_DEPTH, MAX_MIME_PARTS,
                               MAX_PARSED_BYTES, MAX_PATH_BYTES,
                               MAX_REFUSED_COMMANDS, MAX_TEXT_CHARS, BadMail,
                               MailIngest, UsersChecker, bind_tcp_socket,
                               client_name, error_text, read_mail,
                               tls_options)
from failnozzle.service import FailnozzleService
from tests.common import (FakeMailTransport, HeldWriter, capture_log,
                          make_settings, record, state_file_total)

FIELDS = UniqueMessage._fields

PYTHON_TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/srv/backup/run.py", line 12, in <module>\n'
    "    main()\n"
    '  File "/srv/backup/run.py", line 9, in main\n'
    "    raise OSError(28, 'No space left on device')\n"
    "OSError: [Errno 28] No space left on device")


def django_report(path: str = "/items/1/", remote_addr: str = "10.0.0.7",
                  server_time: str = "Wed, 25 Nov 2026 23:19:11 -0600",
                  traceback: bool = True) -> str:
    """
    The text body Django's AdminEmailHandler sends (Django 5.2's
    technical_500.txt), with what differs from one request to the next
    as parameters.
    """
    frames = (
        "\n\nTraceback (most recent call last):\n"
        '  File "/srv/app/django/core/handlers/exception.py", line 55, in '
        "inner\n"
        "    response = get_response(request)\n"
        "               ^^^^^^^^^^^^^^^^^^^^^\n"
        '  File "/srv/app/shop/views.py", line 14, in item\n'
        "    return {}[key]\n"
        "           ^^^^^^^\n"
        "\n"
        "The above exception ('missing') was the direct cause of the "
        "following exception:\n"
        '  File "/srv/app/shop/views.py", line 20, in item\n'
        '    raise ValueError("bad item") from e\n'
        "    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
        "\n"
        f"Exception Type: ValueError at {path}\n"
        "Exception Value: bad item\n") if traceback else "\n"
    return (
        f"Internal Server Error: {path}\n\n"
        f"{'ValueError' if traceback else 'Report'} at {path}\n"
        f"{'bad item' if traceback else 'No exception message supplied'}\n\n"
        "Request Method: GET\n"
        f"Request URL: http://shop.example{path}\n"
        "Django Version: 5.2.19\n"
        "Python Executable: /srv/app/venv/bin/python\n"
        "Python Version: 3.11.7\n"
        "Python Path: ['/srv/app']\n"
        f"Server time: {server_time}\n"
        "Installed Applications:\n['shop']\n"
        "Installed Middleware:\n[]"
        f"{frames}"
        "Raised during: shop.views.item\n\n"
        "Request information:\n"
        "USER: AnonymousUser\n\n"
        "GET: No GET data\n\n"
        "META:\n"
        f"REMOTE_ADDR = '{remote_addr}'\n"
        "REQUEST_METHOD = 'GET'\n\n"
        "Settings:\n"
        "Using settings module shop.settings\n"
        "DEBUG = False\n")


def mail(body: str = "disk full", subject: str = "backup failed",
         **headers) -> bytes:
    """A text/plain UTF-8 message, as bytes with LF line ends."""
    message = EmailMessage()
    if subject is not None:
        message["Subject"] = subject
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    message.set_content(body)
    return message.as_bytes()


def with_attachments() -> EmailMessage:
    """A text body, then a text attachment and a binary one."""
    message = EmailMessage()
    message["Subject"] = "with attachments"
    message.set_content("the body\n")
    message.add_attachment("an attached log\n", filename="run.log")
    message.add_attachment(b"\x00\x01", maintype="application",
                           subtype="octet-stream", filename="core")
    return message


def read(data: bytes, kind: str = "cron", source: str = "web1") -> dict:
    return read_mail(data, kind, source)


class ReadMailTests(SynchronousTestCase):
    """
    L{read_mail}: a message into a record.
    """

    def test_plain(self):
        """
        Subject is the message, the text body exc_text; kind and source
        are those given, and there is no code location without a
        traceback.
        """
        self.assertEqual(read(mail("disk full\n", "backup failed")), {
            "message": "backup failed", "exc_text": "disk full",
            "kind": "cron", "source": "web1"})

    def test_kind_header(self):
        """
        An X-Failnozzle-Kind header names the kind, whoever the message
        went to.
        """
        data = mail(X_Failnozzle_Kind=" billing ")
        self.assertEqual(read(data, kind="errors")["kind"], "billing")

    def test_source_field(self):
        """
        The source goes into SOURCE_FIELD_NAME.
        """
        record = read_mail(mail(), "cron", "web1", source_field="host")
        self.assertEqual(record["host"], "web1")
        self.assertNotIn("source", record)

    def test_no_subject(self):
        """
        A message without a subject says so.
        """
        self.assertEqual(read(mail(subject=None))["message"], "(no subject)")

    def test_encoded_subject(self):
        """
        RFC 2047 encoded words (B and Q, UTF-8 and ISO-8859-1) are decoded,
        and a folded subject is one line.
        """
        data = (b"Subject: =?utf-8?b?w4RyZ2VyIOKYgw==?= in\n"
                b" =?iso-8859-1?q?M=FCnchen?=\n\nbody\n")
        self.assertEqual(read(data)["message"], "Ärger ☃ in München")

    def test_quoted_printable(self):
        """
        A quoted-printable body is decoded, soft line breaks joined.
        """
        data = (b"Subject: x\nContent-Type: text/plain; charset=utf-8\n"
                b"Content-Transfer-Encoding: quoted-printable\n\n"
                b"caf=C3=A9 is a very long line that was broken by the =\n"
                b"encoder\n")
        self.assertEqual(read(data)["exc_text"],
                         "café is a very long line that was broken by the "
                         "encoder")

    def test_base64(self):
        """
        A base64 body is decoded.
        """
        encoded = base64.encodebytes("Fehler: Größe\n".encode("utf-8"))
        data = (b"Subject: x\nContent-Type: text/plain; charset=utf-8\n"
                b"Content-Transfer-Encoding: base64\n\n" + encoded)
        self.assertEqual(read(data)["exc_text"], "Fehler: Größe")

    def test_legacy_charsets(self):
        """
        Bodies in ISO-8859-1 and windows-1252 are decoded by their charset.
        """
        for charset, raw in (("iso-8859-1", b"M\xfcnchen"),
                             ("windows-1252", b"\x93quoted\x94")):
            data = (b"Subject: x\nContent-Type: text/plain; charset="
                    + charset.encode() + b"\n"
                    b"Content-Transfer-Encoding: 8bit\n\n" + raw + b"\n")
            self.assertEqual(read(data)["exc_text"],
                             raw.decode(charset), charset)

    def test_undeclared_utf8(self):
        """
        A body without a charset (cron's mail often has none) is read as
        UTF-8, not as ASCII with every non-ASCII byte replaced.
        """
        data = "Subject: x\n\nÄrger: ☃\n".encode("utf-8")
        self.assertEqual(read(data)["exc_text"], "Ärger: ☃")

    def test_unknown_charset(self):
        """
        An unknown charset (or one that is no text encoding) is read as
        UTF-8, undecodable bytes replaced.
        """
        for charset in (b"x-no-such-charset", b"base64"):
            data = (b"Subject: x\nContent-Type: text/plain; charset="
                    + charset + b"\n\nok \xff\n")
            self.assertEqual(read(data)["exc_text"], "ok \ufffd")

    def test_multipart_alternative(self):
        """
        Of text/html and text/plain alternatives the plain one is used,
        whatever the order.
        """
        message = EmailMessage()
        message["Subject"] = "x"
        message.set_content("<p>the <b>html</b> one</p>", subtype="html")
        message.add_alternative("the plain one\n")
        self.assertEqual(read(message.as_bytes())["exc_text"],
                         "the plain one")

    def test_multipart_attachment(self):
        """
        With attachments the first text/plain part that is not one is the
        body: a text attachment is not.
        """
        self.assertEqual(read(with_attachments().as_bytes())["exc_text"],
                         "the body")

    def test_html_only(self):
        """
        An HTML-only message gives its text: tags, scripts and styles
        gone, blocks on lines of their own, entities decoded.
        """
        message = EmailMessage()
        message["Subject"] = "x"
        message.set_content(
            "<html><head><title>t</title><style>p {}</style></head><body>"
            "<h1>Error</h1><p>disk &amp; tape<br>full</p>"
            "<script>alert(1)</script><div>again</div></body></html>",
            subtype="html")
        data = message.as_bytes()
        self.assertEqual(read(data)["exc_text"],
                         "Error\ndisk & tape\nfull\nagain")

    def test_no_text(self):
        """
        A message with no text part has an empty exc_text.
        """
        message = EmailMessage()
        message["Subject"] = "x"
        message.set_content(b"\x00\x01", maintype="application",
                            subtype="octet-stream")
        self.assertEqual(read(message.as_bytes())["exc_text"], "")

    def test_line_ends_and_trailing_space(self):
        """
        CRLF becomes LF; trailing white space on each line, and blank
        lines around the text, are dropped.
        """
        data = b"Subject: x\r\n\r\n\r\n one  \r\ntwo\t\r\n\r\n\r\n"
        self.assertEqual(read(data)["exc_text"], " one\ntwo")

    def test_no_headers(self):
        """
        Text without headers is all body, without a subject.
        """
        record = read(b"\njust text\n")
        self.assertEqual((record["message"], record["exc_text"]),
                         ("(no subject)", "just text"))

    def test_garbage(self):
        """
        Bytes that are no mail at all still give a record.
        """
        record = read(b"\xff\xfe\x00garbage\n\x80\n")
        self.assertEqual(record["kind"], "cron")
        self.assertIsInstance(record["exc_text"], str)

    def test_truncated_and_random(self):
        """
        Random bytes and every prefix of a multipart message read as a
        record whose unique fields are strings, numbers or None.
        """
        message = EmailMessage()
        message["Subject"] = "=?utf-8?q?=C3=84rger?="
        message.set_content(PYTHON_TRACEBACK, cte="quoted-printable")
        message.add_alternative("<p>x</p>", subtype="html")
        data = message.as_bytes()
        rng = random.Random(5)
        inputs = [data[:end] for end in range(0, len(data), 7)] + [
            bytes(rng.randrange(256) for _ in range(rng.randrange(400)))
            for _ in range(300)]
        reader = RecordReader(FIELDS, "source", 65536)
        for data in inputs:
            reader.report_of(read(data))

    def test_subject_capped_before_decoding(self):
        """
        A Subject of 200 kB of encoded words, folded, is read from its
        first MAX_HEADER_CHARS only: the message is the decoded start.
        """
        data = b"Subject: " + b"=?utf-8?q?a?=\n " * 14300 + b"\n\nbody\n"
        message = read(data)["message"]
        self.assertEqual(set(message), {"a"})
        self.assertLessEqual(len(message), MAX_HEADER_CHARS // 13)
        self.assertGreater(len(message), MAX_HEADER_CHARS // 16)

    def test_encoded_words(self):
        """
        Encoded words are decoded however they come: B without its
        padding, a language after the charset (RFC 2231), a charset
        Python does not know (as UTF-8), text between words kept and
        white space between them dropped.
        """
        data = (b"Subject: =?utf-8?b?w4Q?= =?UTF-8*de?Q?=C3=B6_x?=y "
                b"=?x-unknown?q?=C3=BC?= =?utf-8?q?broken\n\nbody\n")
        self.assertEqual(read(data)["message"],
                         "Äö xy ü =?utf-8?q?broken")

    def test_control_characters(self):
        """
        NULs and other control characters in the subject, the kind and
        the HELO name read as spaces: they do not reach digests.
        """
        data = (b"Subject: a\0b\x1b[31mc\xc2\x85d\n"
                b"X-Failnozzle-Kind: k\0x\n\nbody")
        record = read(data)
        self.assertEqual((record["message"], record["kind"]),
                         ("a b [31mc d", "k x"))
        self.assertEqual(client_name((b"web1\0evil", b"10.0.0.7")), "web1")
        self.assertEqual(client_name((b"\0", b"10.0.0.7")), "10.0.0.7")

    def test_raw_utf8_headers(self):
        """
        A header in raw UTF-8 (no encoded words) reads as UTF-8; bytes
        that are not are replaced.
        """
        data = "Subject: Ärger ☃\n\nbody".encode() + b"\nSubject: x"
        self.assertEqual(read(data)["message"], "Ärger ☃")
        self.assertEqual(read(b"Subject: \xff\n\nbody")["message"], "\ufffd")

    def test_prefix_only(self):
        """
        Of a message only its first MAX_PARSED_BYTES are read: a
        traceback beyond them is not seen, and exc_text is the start of
        the body, at most MAX_TEXT_CHARS.
        """
        data = mail("x\n" * MAX_PARSED_BYTES + PYTHON_TRACEBACK)
        exc_text = read(data)["exc_text"]
        self.assertNotIn("Traceback", exc_text)
        self.assertEqual(set(exc_text), {"x", "\n"})
        self.assertLessEqual(len(exc_text), MAX_TEXT_CHARS)

    def test_cut_short_base64(self):
        """
        A base64 body cut short (by the prefix, or a client) decodes as
        far as it goes.
        """
        encoded = base64.b64encode(b"disk full on /var")
        for cut in range(len(encoded) - 4, len(encoded) + 1):
            data = (b"Subject: x\nContent-Transfer-Encoding: base64\n\n"
                    + encoded[:cut])
            self.assertTrue(
                "disk full on /var".startswith(read(data)["exc_text"]), cut)
            self.assertGreaterEqual(len(read(data)["exc_text"]), 12)

    def test_slow_charsets(self):
        """
        A body in punycode or idna, whose decoding takes time growing
        with the square of the length, is read as UTF-8.
        """
        for charset in (b"punycode", b"IDNA"):
            data = (b"Subject: x\nContent-Type: text/plain; charset="
                    + charset + b"\n\na-" + b"9" * 1000)
            self.assertEqual(read(data)["exc_text"], "a-" + "9" * 1000)

    def test_rfc2231_charset(self):
        """
        A charset given as an RFC 2231 parameter is used; the charset it
        is itself declared in is not looked up.
        """
        data = (b"Subject: x\nContent-Type: text/plain; "
                b"charset*=x-attacker''iso-8859-1\n\nM\xfcnchen")
        self.assertEqual(read(data)["exc_text"], "München")

    def test_parameters(self):
        """
        Content-Type parameters are read as the email package reads them:
        quoted (with ";" and escaped quotes inside) or not, names in any
        case, the first of a name; a boundary so found splits the parts.
        """
        data = (b'Subject: x\nContent-Type: Multipart/Mixed; x="a;\\"b"; '
                b'BOUNDARY = "=_a;b" ; boundary=other\n\n'
                b"--=_a;b\nContent-Type: text/plain; charset=\"iso-8859-1\"\n"
                b"\nM\xfcnchen\n--=_a;b--\n")
        self.assertEqual(read(data)["exc_text"], "München")
        self.assertEqual(read(data)["exc_text"],
                         reference_record(data)["body"])

    def test_unknown_charsets_not_remembered(self):
        """
        Charset names Python does not know are not looked up, so the
        codec registry's cache does not grow with each new one.
        """
        read(mail())
        cached = len(encodings._cache)
        for number in range(200):
            read(b"Subject: =?x-%d?q?a?=\nContent-Type: text/plain; "
                 b"charset=x-%d\n\nbody" % (number, number))
        self.assertEqual(len(encodings._cache), cached)

    def multipart(self, depth: int, parts: int = 1) -> bytes:
        """C{depth} nested multiparts, the last holding C{parts} parts,
        the text one last."""
        data = (b"Content-Type: multipart/mixed; boundary=last\n\n"
                + b"--last\nContent-Type: application/x-empty\n\n\n" * (
                    parts - 1)
                + b"--last\n\nthe text\n--last--\n")
        for level in range(depth - 1):
            data = (b"Content-Type: multipart/mixed; boundary=%d\n\n--%d\n"
                    % (level, level) + data + b"\n--%d--\n" % level)
        return b"Subject: x\n" + data

    def test_nesting_bounded(self):
        """
        A text part is found MAX_MIME_DEPTH multiparts deep, not
        deeper; a message nested 5,000 deep reads (as no text) at once.
        """
        self.assertEqual(read(self.multipart(MAX_MIME_DEPTH))["exc_text"],
                         "the text")
        self.assertEqual(read(self.multipart(MAX_MIME_DEPTH + 1))["exc_text"],
                         "")
        self.assertEqual(read(self.multipart(5000))["exc_text"], "")

    def test_parts_bounded(self):
        """
        A text part is found among MAX_MIME_PARTS parts, not after more.
        """
        self.assertEqual(read(self.multipart(1, MAX_MIME_PARTS))["exc_text"],
                         "the text")
        self.assertEqual(read(self.multipart(1, MAX_MIME_PARTS + 1))[
            "exc_text"], "")

    def test_related_start(self):
        """
        Of a multipart/related only the start part is read: the one its
        start parameter names, else the first.
        """
        def related(start: bytes) -> bytes:
            return (b"Subject: x\nContent-Type: multipart/related; "
                    b"boundary=b" + start + b"\n\n--b\nContent-ID: <one>\n\n"
                    b"first\n--b\nContent-ID: <two>\n\nsecond\n--b--\n")

        self.assertEqual(read(related(b""))["exc_text"], "first")
        self.assertEqual(read(related(b'; start="<two>"'))["exc_text"],
                         "second")
        self.assertEqual(read(related(b'; start="<three>"'))["exc_text"],
                         "first")

    def test_digest_parts(self):
        """
        The parts of a multipart/digest are messages, not text, unless
        they say so.
        """
        data = (b"Subject: x\nContent-Type: multipart/digest; boundary=b\n\n"
                b"--b\n\nnot text\n--b\nContent-Type: text/plain\n\ntext\n"
                b"--b--\n")
        self.assertEqual(read(data)["exc_text"], "text")

    def test_html_edges(self):
        """
        Of HTML, a "<" that opens no tag is text, an unclosed comment or
        script hides the rest, an unclosed tag shows as text, and 50,000
        unclosed tags read as text at once.
        """
        def html(text: bytes) -> str:
            return read(b"Subject: x\nContent-Type: text/html\n\n"
                        + text)["exc_text"]

        self.assertEqual(html(b"a < b &lt; c"), "a < b < c")
        self.assertEqual(html(b"a<!-- b"), "a")
        self.assertEqual(html(b"a<script>b</script c"), "a")
        self.assertEqual(html(b"a<SCRIPT>b</Script >c"), "ac")
        self.assertEqual(html(b"a<b c"), "a<b c")
        self.assertEqual(html(b"<!DOCTYPE html><?xml x?>a</ >b"), "ab")
        self.assertEqual(html(b"<a" * 50000), ("<a" * 50000)[:MAX_TEXT_CHARS])


def reference_record(data: bytes) -> dict:
    """
    What the email package makes of a message (as read_mail did before it
    read MIME itself): its subject and its text body, before the
    traceback is looked for.
    """
    message = email.message_from_bytes(data, policy=email.policy.default)
    part = message.get_body(preferencelist=("plain", "html"))
    text = ""
    if part is not None:
        payload = part.get_payload(decode=True) or b""
        charset = part.get_content_charset() or "utf-8"
        text = payload.decode("utf-8" if charset in ("us-ascii", "ascii")
                              else charset, "replace")
        if part.get_content_subtype() == "html":
            text = failnozzle.mailin._html_text(text)
    text = "\n".join(line.rstrip() for line in text.replace(
        "\r\n", "\n").split("\n")).strip("\n")
    return {"message": " ".join(str(message["Subject"] or "").split()),
            "body": text}


class ReferenceTests(SynchronousTestCase):
    """
    L{read_mail} reads what mail clients send as the email package does.
    """

    def messages(self):
        """Messages as Python, Django and mail clients make them."""
        plain = EmailMessage()
        plain["Subject"] = "Ärger im Büro: the backup failed again"
        plain.set_content("Größe: 12 GB\nTraceback? none\n")
        yield plain
        for cte in ("quoted-printable", "base64", "8bit", "7bit"):
            message = EmailMessage()
            message["Subject"] = "=?utf-8?q?encoded?= and plain"
            body = ("caf\u00e9 " * 50 + "\n") if cte != "7bit" else "ascii\n"
            message.set_content(body, cte=cte)
            yield message
        for charset in ("iso-8859-1", "windows-1252", "koi8-r", "shift_jis"):
            message = EmailMessage()
            message["Subject"] = "legacy"
            message.set_content("Жёлтый ключ 鍵\n".encode(charset, "replace"),
                                maintype="text", subtype="plain",
                                cte="8bit")
            message.set_param("charset", charset)
            yield message
        alternative = EmailMessage()
        alternative["Subject"] = "alternative"
        alternative.set_content("<p>html first</p>", subtype="html")
        alternative.add_alternative("plain second\n")
        yield alternative
        yield with_attachments()
        related = EmailMessage()
        related["Subject"] = "related"
        related.set_content("<p>see <img src='cid:x'></p>", subtype="html")
        related.add_related(b"GIF89a", maintype="image", subtype="gif",
                            cid="<x>")
        yield related
        nested = EmailMessage()
        nested["Subject"] = "nested"
        nested.make_mixed()
        inner = EmailMessage()
        inner.set_content("<b>inner html</b>", subtype="html")
        inner.add_alternative("inner plain\n")
        nested.attach(inner)
        yield nested
        html_only = EmailMessage()
        html_only["Subject"] = "html only"
        html_only.set_content("<html><body><h1>Error</h1><p>at &amp; "
                              "there</p></body></html>", subtype="html")
        yield html_only

    def test_same_as_email_package(self):
        """
        Subject and text body of each message are those the email package
        gives, with CRLF or LF line ends.
        """
        for message in self.messages():
            for data in (message.as_bytes(),
                         message.as_bytes().replace(b"\n", b"\r\n")):
                record = read(data)
                expected = reference_record(data)
                self.assertEqual(record["message"], expected["message"])
                self.assertEqual(record["exc_text"],
                                 error_text(expected["body"]),
                                 message["Subject"])

    def test_django_report(self):
        """
        Django's error mail (text and HTML alternatives) reads the same.
        """
        message = EmailMessage()
        message["Subject"] = "[Django] ERROR: Internal Server Error: /items/1/"
        message.set_content(django_report())
        message.add_alternative("<html><body><pre>"
                                + django_report() + "</pre></body></html>",
                                subtype="html")
        data = message.as_bytes()
        self.assertEqual(read(data)["exc_text"],
                         error_text(reference_record(data)["body"]))


class ErrorTextTests(SynchronousTestCase):
    """
    L{error_text}: the part of a body that tells one error from another.
    """

    def test_traceback_in_output(self):
        """
        From a job's output only the traceback is kept: the lines around
        it (times, sizes) would keep runs from folding.
        """
        body = ("2026-11-25 02:30:01 starting, 1234 files\n"
                f"{PYTHON_TRACEBACK}\n"
                "2026-11-25 02:30:09 exit status 1\n")
        self.assertEqual(error_text(body), PYTHON_TRACEBACK)

    def test_chained(self):
        """
        Chained exceptions are kept whole, to the last exception line.
        """
        chained = (f"{PYTHON_TRACEBACK}\n\n"
                   "During handling of the above exception, another "
                   "exception occurred:\n\n"
                   "Traceback (most recent call last):\n"
                   '  File "/srv/backup/run.py", line 14, in <module>\n'
                   "    report()\n"
                   "RuntimeError: could not report")
        self.assertEqual(error_text(f"before\n{chained}\nafter"), chained)

    def test_indented(self):
        """
        An indented traceback ends at the first line indented no deeper
        than its header.
        """
        indented = "\n".join("    " + line
                             for line in PYTHON_TRACEBACK.split("\n"))
        self.assertEqual(error_text(f"job failed:\n{indented}\n  done"),
                         indented)

    def test_cut_short(self):
        """
        A traceback with no exception line (the output was cut) is no
        traceback to go by: the whole body is kept.
        """
        body = "x\n" + PYTHON_TRACEBACK.rpartition("\n")[0]
        self.assertEqual(error_text(body), body)

    def test_no_traceback(self):
        """
        A body without a traceback is kept whole.
        """
        self.assertEqual(error_text("rsync: connection refused\n(code 10)"),
                         "rsync: connection refused\n(code 10)")

    def test_django(self):
        """
        Of Django's report the traceback is kept, chained cause and
        Exception Type/Value included: two requests that failed alike,
        at different times from different clients, give one text.
        """
        first = error_text(django_report())
        second = error_text(django_report(
            remote_addr="10.9.9.9", server_time="Thu, 26 Nov 2026 01:02:03"))
        self.assertEqual(first, second)
        self.assertTrue(first.startswith("Traceback (most recent call last)"))
        self.assertIn("The above exception ('missing')", first)
        self.assertTrue(first.endswith("Exception Type: ValueError at "
                                       "/items/1/\nException Value: bad item"))

    def test_django_without_traceback(self):
        """
        Of a Django report without a traceback (an error logged with the
        request but no exception) the head is kept, before the request
        and server details.
        """
        first = error_text(django_report(traceback=False))
        self.assertEqual(first, "Internal Server Error: /items/1/\n\n"
                                "Report at /items/1/\n"
                                "No exception message supplied")
        self.assertEqual(first, error_text(django_report(
            traceback=False, server_time="Thu, 26 Nov 2026 01:02:03")))

    def test_where(self):
        """
        With a traceback, the record says where its last frame is, as a
        logging record would.
        """
        record = read(mail(django_report()))
        self.assertEqual(
            {name: record[name] for name in ("pathname", "lineno",
                                             "funcName", "filename",
                                             "module")},
            {"pathname": "/srv/app/shop/views.py", "lineno": 20,
             "funcName": "item", "filename": "views.py", "module": "views"})

    def test_linear(self):
        """
        Finding a traceback's end looks at each line at most three times,
        whatever the body: chained headers by the thousand, blank lines,
        deep indentation, headers within headers.
        """
        class CountingList(list):
            looks = 0

            def __getitem__(self, index):
                item = super().__getitem__(index)
                CountingList.looks += len(item) if isinstance(
                    index, slice) else 1
                return item

        bodies = {
            "chained": ["x", "The above exception"] * 5000,
            "blank": [""] * 10000 + ["E: x"],
            "indented": [" " * 100 + "x"] * 10000 + ["E: x"],
            "headers": ["Traceback (most recent call last):", "x",
                        "", "During handling of the above exception"] * 2500,
            "django": ["Exception Type: E", "Exception Value: v", "",
                       "The above exception"] * 2500,
        }
        for name, lines in bodies.items():
            lines = CountingList(["Traceback (most recent call last):"]
                                 + lines)
            CountingList.looks = 0
            failnozzle.mailin._traceback_end(lines, 0)
            self.assertLessEqual(CountingList.looks, 3 * len(lines), name)

    def test_where_overflow(self):
        """
        A line number of 5,000 digits is no frame (Python cannot even
        make it an int), not an error.
        """
        text = (f"{PYTHON_TRACEBACK.rpartition(chr(10))[0]}\n"
                f'  File "/x.py", line {"9" * 5000}, in f\nE: x')
        record = read(mail(text))
        self.assertEqual((record["pathname"], record["lineno"]),
                         ("/srv/backup/run.py", 9))


class ClientNameTests(SynchronousTestCase):
    """
    L{client_name}: the source of a message.
    """

    def test_helo_name(self):
        """
        The name given in HELO or EHLO; of an address literal the address.
        """
        self.assertEqual(client_name((b"web1.example", b"10.0.0.7")),
                         "web1.example")
        self.assertEqual(client_name((b"[10.0.0.8]", b"10.0.0.7")),
                         "10.0.0.8")

    def test_address(self):
        """
        Without a HELO name, the client's address.
        """
        self.assertEqual(client_name((None, "10.0.0.7")), "10.0.0.7")
        self.assertEqual(client_name((b"  ", b"10.0.0.7")), "10.0.0.7")
        self.assertEqual(client_name((b"[]", b"10.0.0.7")), "10.0.0.7")

    def test_localhost(self):
        """
        "localhost" (msmtp's default HELO name) names no host: the
        address does.
        """
        for name in (b"localhost", b"LOCALHOST.localdomain"):
            self.assertEqual(client_name((name, b"10.0.0.7")), "10.0.0.7")


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that can start TLS, as a TCP connection can."""

    tls = None

    def startTLS(self, contextFactory, normal=True):
        self.tls = contextFactory


class Client:
    """One client's connection to a L{MailIngest}, over a StringTransport."""

    def __init__(self, ingest: MailIngest, transport: StringTransport):
        self.transport = transport
        self.protocol = ingest.buildProtocol(transport.getPeer())
        self.protocol.makeConnection(transport)

    def send(self, *lines: bytes) -> list:
        """Send C{lines}; return the reply lines that came back."""
        self.transport.clear()
        self.protocol.dataReceived(b"".join(line + b"\r\n" for line in lines))
        return self.replies()

    def replies(self) -> list:
        """The reply lines sent since the last L{send}."""
        replies = self.transport.value().decode("ascii").split("\r\n")[:-1]
        self.transport.clear()
        return replies

    def codes(self, *lines: bytes) -> list:
        """Send C{lines}; return the codes of the last line of each reply."""
        return [int(line[:3]) for line in self.send(*lines)
                if line[3:4] != "-"]

    def reply_codes(self) -> list:
        """The codes of the replies sent since the last L{send}."""
        return [int(line[:3]) for line in self.replies()
                if line[3:4] != "-"]


class IngestTestCase(SynchronousTestCase):
    """
    A L{MailIngest} over a real aggregator on a L{Clock}, whose snapshots
    the test finishes (C{self.snapshots}).
    """

    ingest = None

    def setUp(self):
        self.clock = Clock()
        self.reader = RecordReader(FIELDS, "source", 65536)
        self.aggregator = Aggregator(1000, self.clock,
                                     lambda count, error: ("bad",) * 8)
        self.bad = []
        self.snapshots = []

    def saved(self) -> defer.Deferred:
        snapshot = defer.Deferred()
        self.snapshots.append(snapshot)
        return snapshot

    def finish_snapshots(self):
        for snapshot in self.snapshots:
            snapshot.callback(None)
        self.snapshots = []

    def make_ingest(self, **options) -> MailIngest:
        options.setdefault("max_bytes", 10000)
        options.setdefault("max_connections", 10)
        options.setdefault("max_recipients", 10)
        self.ingest = MailIngest(
            self.reader, self.aggregator,
            lambda error, sender: self.bad.append((error, sender)),
            self.saved, self.clock, domain="nozzle.example",
            source_field="source", **options)
        return self.ingest

    def connect(self, ingest=None, transport=None) -> Client:
        return Client(ingest or self.ingest or self.make_ingest(),
                      transport or StringTransport(
                          peerAddress=IPv4Address("TCP", "10.0.0.7", 40000)))

    def counted(self) -> list:
        """C{(message, kind, source, count)} for each error counted."""
        batch = self.aggregator.flush()
        return [(entry.key[FIELDS.index("message")],
                 entry.key[FIELDS.index("kind")], source, count)
                for entry in batch.entries
                for source, count in entry.sources.items()]

    def transaction(self, client: Client, data: bytes = None,
                    recipients=(b"Backup@nozzle.example",)) -> list:
        """
        EHLO, MAIL, RCPT for each recipient, DATA, the message and its end.

        @return: the codes of the replies.
        """
        data = mail() if data is None else data
        lines = [b"EHLO web1.example", b"MAIL FROM:<root@web1.example>"]
        lines += [b"RCPT TO:<%s>" % address for address in recipients]
        lines += [b"DATA"]
        lines += [b"." + line if line.startswith(b".") else line
                  for line in data.split(b"\n")]
        return client.codes(*lines, b".")


class SessionTests(IngestTestCase):
    """
    A message's way from the client to the aggregator, and its 250.
    """

    def test_counted_once(self):
        """
        A message to three addresses is one error, of the first
        recipient's kind (lower-cased), from the host named in EHLO.
        """
        client = self.connect()
        self.transaction(client, recipients=(
            b"Backup@nozzle.example", b"ops@nozzle.example",
            b"dev@elsewhere.example"))
        self.assertEqual(self.counted(),
                         [("backup failed", "backup", "web1.example", 1)])

    def test_250_after_snapshot(self):
        """
        The 250 comes only once the message is counted and a snapshot
        holding it is written.
        """
        client = self.connect()
        codes = self.transaction(client)
        self.assertEqual(codes[-1], 354, "no answer to the end of data yet")
        self.assertEqual(len(self.snapshots), 1)
        self.assertEqual(self.aggregator.view().total, 1,
                         "counted before the snapshot is asked for")
        self.finish_snapshots()
        self.assertEqual(client.replies(), ["250 Counted for the next digest"])

    def test_greeting_and_extensions(self):
        """
        The greeting names SERVER_NAME; EHLO offers SIZE with the limit
        and 8BITMIME, and neither AUTH nor STARTTLS unless configured.
        """
        client = self.connect(self.make_ingest(max_bytes=1234))
        self.assertTrue(client.replies()[0].startswith("220 nozzle.example "))
        replies = client.send(b"EHLO web1")
        self.assertEqual(replies[1:], ["250-SIZE 1234", "250 8BITMIME"])

    def test_no_helo(self):
        """
        A client that says no HELO is named by its address.
        """
        client = self.connect()
        client.send(b"MAIL FROM:<a@b>", b"RCPT TO:<app@x>", b"DATA",
                    b"Subject: x", b"", b"y", b".")
        self.finish_snapshots()
        self.assertEqual(self.counted(), [("x", "app", "10.0.0.7", 1)])

    def test_session_goes_on(self):
        """
        Several messages over one connection are each counted, with the
        kind of each one's recipient.
        """
        client = self.connect()
        self.transaction(client, mail(subject="one"), [b"a@x"])
        self.transaction(client, mail(subject="two"), [b"b@x"])
        self.finish_snapshots()
        self.assertEqual(sorted(self.counted()),
                         [("one", "a", "web1.example", 1),
                          ("two", "b", "web1.example", 1)])

    def test_dots(self):
        """
        Lines beginning with a dot arrive without the dot SMTP added.
        """
        client = self.connect()
        self.transaction(client, mail(".hidden\n..two\n"))
        [entry] = self.aggregator.flush().entries
        self.assertEqual(entry.key[FIELDS.index("exc_text")],
                         ".hidden\n..two")

    def test_unreadable(self):
        """
        A message that cannot be read is counted as bad input, reported
        with the client's address, and answered 250 once the snapshot is
        written: it is in the digest.
        """
        def broken(*args):
            raise LookupError("no such codec")

        self.patch(failnozzle.mailin, "read_mail", broken)
        client = self.connect()
        self.transaction(client)
        [(error, sender)] = self.bad
        self.assertIsInstance(error, BadMail)
        self.assertEqual(str(error), "mail that could not be read: "
                                     "LookupError: no such codec")
        self.assertEqual(sender, ("10.0.0.7", 40000))
        self.assertEqual(self.aggregator.view().total, 0)
        self.finish_snapshots()
        self.assertEqual(client.replies(), ["250 Counted for the next digest"])

    def test_unreadable_in_the_digest(self):
        """
        The digest's entry for mail that could not be read says what it
        was, and does not call it a datagram.
        """
        record = default_internal_error_record(
            2, BadMail("LookupError: no such codec", b"Subject: x"))
        self.assertEqual(record["message"],
                         "Internal error: mail that could not be read")
        self.assertTrue(record["exc_text"].startswith(
            "Internal error: 2 bad input(s) of this kind since the last "
            "digest.\nThe last one: mail that could not be read: "
            "LookupError: no such codec\n"), record["exc_text"])
        self.assertNotIn("datagram", record["exc_text"])

    def test_snapshot_error(self):
        """
        Should the wait for the snapshot fail, the client is told to try
        again later (451), and the failure is logged.
        """
        self.saved = lambda: defer.fail(RuntimeError("disk on fire"))
        codes = self.transaction(self.connect())
        self.assertEqual(codes[-1], 451)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_non_ascii_command(self):
        """
        A command that is not ASCII is an unknown command.
        """
        client = self.connect()
        self.assertEqual(client.send(b"\xff\xfeHELO"),
                         ["500 Command not implemented"])

    def test_starttls_not_configured(self):
        """
        STARTTLS without SMTP_INGEST_TLS_CERT is refused.
        """
        self.assertEqual(self.connect().codes(b"STARTTLS"), [454])


class InputTests(IngestTestCase):
    """
    How a session reads: one command at a time, a message's content
    compactly, what all may hold bounded.
    """

    def start_data(self, client: Client) -> list:
        return client.codes(b"EHLO web1", b"MAIL FROM:<a@b>",
                            b"RCPT TO:<kind@x>", b"DATA")

    def test_one_command_at_a_time(self):
        """
        Commands sent while a message waits for its 250 are answered
        after it, in order: one message at a time per client.
        """
        client = self.connect()
        client.replies()
        self.start_data(client)
        self.assertEqual(client.codes(b"Subject: one", b"", b"x", b".",
                                      b"NOOP", b"MAIL FROM:<a@b>"), [])
        self.assertEqual(len(self.snapshots), 1)
        self.finish_snapshots()
        self.assertEqual(client.reply_codes(), [250, 250, 250])

    def test_turns(self):
        """
        A client sending thousands of commands at once has
        COMMAND_BYTES_PER_TURN of them run, then the rest at the next
        turns of the reactor.
        """
        client = self.connect()
        client.replies()
        self.assertEqual(len(client.codes(*[b"NOOP"] * 10000)),
                         COMMAND_BYTES_PER_TURN // 6 + 1)
        self.clock.advance(0)
        self.assertEqual(client.transport.value(),
                         b"250 OK\r\n" * (10000 - COMMAND_BYTES_PER_TURN // 6
                                          - 1))

    def test_slow_lines_searched_once(self):
        """
        A command or a content line sent a byte at a time is searched for
        its end once, not once a byte: the bytes searched grow as the
        bytes sent, not as their square.
        """
        class Searched(bytearray):
            count = 0

            def find(self, sub, start=0, end=None):
                Searched.count += len(self[start:end])
                return super().find(sub, start, end)

            def rfind(self, sub, start=0, end=None):
                Searched.count += len(self[start:end])
                return super().rfind(sub, start, end)

        client = self.connect(self.make_ingest(max_bytes=100000))
        client.replies()
        client.protocol._unread = Searched()
        sent = b"HELO " + b"h" * 5000 + b"\r\nMAIL FROM:<a@b>\r\n"
        sent += b"RCPT TO:<k@x>\r\nDATA\r\nSubject: slow\r\n\r\n"
        sent += b"y" * 20000 + b"\r\n.\r\n"
        for byte in range(len(sent)):
            client.protocol.dataReceived(sent[byte:byte + 1])
            self.clock.advance(0)  # The next turn, after a long command.
        self.assertEqual(client.reply_codes(), [250, 250, 250, 354])
        self.assertLess(Searched.count, 8 * len(sent))
        self.finish_snapshots()
        self.assertEqual(client.reply_codes(), [250])

    def test_replies_not_read(self):
        """
        The session is the producer of its own transport: when replies
        back up (the client does not read them) it reads nothing more,
        and goes on when they are gone.
        """
        client = self.connect()
        self.assertIs(client.transport.producer, client.protocol)
        client.replies()
        client.protocol.pauseProducing()
        self.assertEqual(client.transport.producerState, "paused")
        self.assertEqual(client.codes(b"NOOP", b"NOOP"), [])
        client.protocol.resumeProducing()
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual(client.reply_codes(), [250, 250])

    def test_too_much_unread(self):
        """
        A transport that delivers what a waiting session did not ask for
        cannot make it hold more than a few lines' worth: the client is
        dropped.
        """
        client = self.connect()
        client.replies()
        client.protocol.pauseProducing()
        client.protocol.dataReceived(b"NOOP\r\n" * 60000)
        self.assertEqual(client.replies(), ["500 Too much unread input"])
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(client.protocol._unread, b"")

    def test_content_kept_compactly(self):
        """
        Of a message only MAX_PARSED_BYTES are kept, in one bytearray,
        however it comes (short lines, pieces of any size); at its end
        nothing is held any more.
        """
        client = self.connect(self.make_ingest(max_bytes=10 * 1024 * 1024))
        client.replies()
        self.start_data(client)
        client.protocol.dataReceived(b"Subject: lines\r\n\r\n")
        for _ in range(50):
            client.protocol.dataReceived(b"a\r\n" * 10000 + b"a")
        self.assertEqual(self.ingest.held_bytes, MAX_PARSED_BYTES + 2)
        self.assertEqual(len(client.protocol._message._kept),
                         MAX_PARSED_BYTES + 2)
        client.protocol.dataReceived(b"\r\n.\r\n")
        self.assertEqual(self.ingest.held_bytes, 0)
        self.finish_snapshots()
        self.assertEqual(client.replies(), ["250 Counted for the next digest"])
        self.assertEqual(self.counted(), [("lines", "kind", "web1", 1)])

    def test_content_in_any_pieces(self):
        """
        Content cut anywhere, the end of data and doubled dots included,
        arrives as it was sent.
        """
        data = (b"Subject: pieces\r\n\r\n.first\r\n..\r\nx\r\n.\r\n")
        for size in (1, 2, 3, 5, 7):
            client = self.connect()
            self.start_data(client)
            for start in range(0, len(data), size):
                client.protocol.dataReceived(data[start:start + size])
            [entry] = self.aggregator.flush().entries
            self.assertEqual(entry.key[FIELDS.index("exc_text")],
                             "first\n.\nx", size)
        client = self.connect()
        self.start_data(client)
        self.assertEqual(client.codes(b"."), [])
        self.assertEqual(self.aggregator.flush().entries[0].key[
            FIELDS.index("message")], "(no subject)")

    def test_all_sessions_bounded(self):
        """
        Past max_held_bytes over all sessions, a message being received
        is refused 452 at its end and MAIL of another is refused 452
        (try again later), nothing counted; once memory is free again,
        mail is taken.
        """
        ingest = self.make_ingest(max_held_bytes=2000, max_bytes=100000)
        events = capture_log(self)
        first, second = self.connect(ingest), self.connect(ingest)
        self.start_data(first)
        first.protocol.dataReceived(b"Subject: big\r\n\r\n" + b"y" * 1982
                                    + b"\r\n")
        self.assertEqual(ingest.held_bytes, 2000)
        self.assertEqual(self.start_data(second)[1:2], [452])
        first.protocol.dataReceived(b"more\r\n.\r\n")
        self.assertEqual(first.reply_codes(), [452])
        self.assertEqual(ingest.held_bytes, 0)
        self.assertEqual(self.transaction(second)[-1], 354)
        self.finish_snapshots()
        self.assertEqual(second.reply_codes(), [250])
        self.assertEqual(self.counted(), [("backup failed", "backup",
                                           "web1.example", 1)])
        self.assertIn("Refused mail from 10.0.0.7 for now (452): the "
                      "messages being received hold 2000 bytes, the most "
                      "they may", [formatEvent(event) for event in events])

    def test_connection_lost_in_data(self):
        """
        A client gone in the middle of a message gives back what it held;
        nothing is counted.
        """
        client = self.connect()
        self.start_data(client)
        client.protocol.dataReceived(b"Subject: x\r\n\r\nbody\r\n")
        self.assertGreater(self.ingest.held_bytes, 0)
        client.protocol.connectionLost(None)
        self.assertEqual(self.ingest.held_bytes, 0)
        self.assertEqual(self.aggregator.view().total, 0)


class LimitTests(IngestTestCase):
    """
    SMTP_INGEST_MAX_BYTES, _MAX_CONNECTIONS, _MAX_RECIPIENTS, the line
    length and the idle timeout.
    """

    def test_size_parameter(self):
        """
        MAIL FROM with a SIZE over the limit is refused with 552; at the
        limit it is accepted.
        """
        client = self.connect(self.make_ingest(max_bytes=1000))
        self.assertEqual(client.codes(b"EHLO x",
                                      b"MAIL FROM:<a@b> SIZE=1001",
                                      b"MAIL FROM:<a@b> SIZE=1000"),
                         [250, 552, 250])

    def test_too_big(self):
        """
        A message over SMTP_INGEST_MAX_BYTES (counted with its CRLFs) is
        refused with 552 at its end and not counted; the connection goes
        on, and the next message is.
        """
        client = self.connect(self.make_ingest(max_bytes=500))
        codes = self.transaction(client, mail("x\n" * 200))
        self.assertEqual(codes[-1], 552)
        self.assertEqual(self.snapshots, [])
        self.assertEqual(self.aggregator.view().total, 0)
        self.transaction(client, mail("small"))
        self.finish_snapshots()
        self.assertEqual(client.replies()[-1],
                         "250 Counted for the next digest")
        self.assertEqual(self.aggregator.view().total, 1)

    def test_at_the_limit(self):
        """
        A message of exactly SMTP_INGEST_MAX_BYTES is taken; one byte
        less is too little.
        """
        data = mail("x")
        size = sum(len(line) + 2 for line in data.split(b"\n"))
        codes = self.transaction(
            self.connect(self.make_ingest(max_bytes=size - 1)), data)
        self.assertEqual(codes[-1], 552)
        self.transaction(self.connect(self.make_ingest(max_bytes=size)),
                         data)
        self.assertEqual(self.aggregator.view().total, 1)

    def test_bad_size(self):
        """
        A SIZE that is not 1 to 20 digits (5,000 digits, negative, not a
        number, empty) is answered 501, and nothing is logged; 20 digits
        over the limit are 552.
        """
        events = capture_log(self)
        client = self.connect(self.make_ingest(max_bytes=1000))
        client.send(b"EHLO x")
        for size in (b"9" * 5000, b"-5", b"abc", b"", b"1e3", b"1,2"):
            codes = client.codes(b"MAIL FROM:<a@b> SIZE=" + size)
            self.clock.advance(0)  # The next turn, after a long command.
            self.assertEqual(codes + client.reply_codes(), [501], size[:10])
        self.assertEqual(client.codes(b"MAIL FROM:<a@b> size=" + b"9" * 20),
                         [552])
        self.assertEqual(client.codes(b"MAIL FROM:<a@b> SIZE=0999"), [250])
        self.assertEqual(list(events), [])

    def test_long_paths(self):
        """
        An address over MAX_PATH_BYTES in MAIL FROM or RCPT TO is answered
        501 before it is parsed (Twisted takes time growing with the
        square of its length); up to it, it is taken.
        """
        path = b"<" + b"a." * 126 + b"a@x>"
        shorter = path[:-5] + b"@x>"
        self.assertEqual((len(path), len(shorter)),
                         (MAX_PATH_BYTES + 1, MAX_PATH_BYTES - 1))
        client = self.connect()
        client.send(b"EHLO x")
        self.assertEqual(client.codes(b"MAIL FROM:" + path,
                                      b"MAIL FROM:" + shorter,
                                      b"RCPT TO:" + path,
                                      b"RCPT TO:" + shorter),
                         [501, 250, 501, 250])

    def test_refused_commands(self):
        """
        After MAX_REFUSED_COMMANDS commands refused (5xx) a client is
        told 421 and dropped, with one line logged.
        """
        events = capture_log(self)
        client = self.connect()
        client.replies()
        replies = client.send(*[b"GET / HTTP/1.1"] * 100)
        self.assertEqual(replies[-1], "421 Too many errors; closing")
        self.assertEqual(len(replies), MAX_REFUSED_COMMANDS + 1)
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual([formatEvent(event) for event in events],
                         ["Closed the SMTP connection from 10.0.0.7: it had "
                          "20 commands refused"])

    def test_nul_bytes(self):
        """
        NULs in a command, in a quoted recipient and in a message are
        taken as any other byte: answered; in the subject and the kind
        they read as spaces.
        """
        client = self.connect()
        client.replies()
        self.assertEqual(client.codes(b"\0\0"), [500])
        self.transaction(client, b"Subject: a\0b\n\nc\0d",
                         recipients=[b'"k\0ind"@x'])
        self.finish_snapshots()
        [entry] = self.aggregator.flush().entries
        self.assertEqual([entry.key[FIELDS.index(name)] for name in (
            "message", "kind", "exc_text")], ["a b", '"k ind"', "c\0d"])

    def test_turned_away_logged_once(self):
        """
        Clients turned away for SMTP_INGEST_MAX_CONNECTIONS are logged one
        line a minute, and a line at its end says how many were not.
        """
        events = capture_log(self)
        ingest = self.make_ingest(max_connections=1)
        self.connect(ingest)
        for _ in range(50):
            ingest.buildProtocol(None)
        self.clock.advance(60)
        ingest.buildProtocol(None)
        line = ("Turned a client away (421): SMTP_INGEST_MAX_CONNECTIONS "
                "(1) are connected")
        self.assertEqual([formatEvent(event) for event in events],
                         [line, "49 more not logged in the last 60 s: "
                                "clients turned away", line])

    def test_recipients(self):
        """
        Past SMTP_INGEST_MAX_RECIPIENTS a recipient gets 452; the message
        still goes to the others, once.
        """
        client = self.connect(self.make_ingest(max_recipients=2))
        codes = self.transaction(client, recipients=[b"a@x", b"b@x", b"c@x"])
        self.assertEqual(codes[2:5], [250, 250, 452])
        self.finish_snapshots()
        self.assertEqual(self.counted(), [("backup failed", "a",
                                           "web1.example", 1)])

    def test_connections(self):
        """
        Past SMTP_INGEST_MAX_CONNECTIONS a client is told 421 and
        disconnected; once one leaves, the next may come in.
        """
        ingest = self.make_ingest(max_connections=2)
        first, second = self.connect(ingest), self.connect(ingest)
        transport = StringTransport()
        turned_away = ingest.buildProtocol(None)
        turned_away.makeConnection(transport)
        self.assertEqual(transport.value(),
                         b"421 Too many connections; try again later\r\n")
        self.assertTrue(transport.disconnecting)
        first.protocol.connectionLost(None)
        self.assertEqual(self.connect(ingest).replies()[0][:4], "220 ")
        self.assertEqual(len(ingest.sessions), 2)
        self.assertIn(second.protocol, ingest.sessions)

    def test_idle_timeout(self):
        """
        A client silent for IDLE_TIMEOUT_SECONDS is told 421 and dropped;
        each line it sends starts the wait again.
        """
        client = self.connect()
        client.replies()
        self.clock.advance(IDLE_TIMEOUT_SECONDS - 1)
        client.send(b"NOOP")
        self.clock.advance(IDLE_TIMEOUT_SECONDS - 1)
        self.assertFalse(client.transport.disconnecting)
        self.clock.advance(1)
        [line] = client.replies()
        self.assertTrue(line.startswith("421 "), line)
        self.assertTrue(client.transport.disconnecting)

    def test_line_too_long(self):
        """
        A message's content that goes on for more than MAX_LINE_BYTES
        without a line end is answered 500 and the connection closed;
        nothing is counted.
        """
        client = self.connect()
        client.send(b"EHLO x", b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>",
                    b"DATA", b"Subject: x", b"")
        for _ in range(3):
            client.protocol.dataReceived(b"y" * (MAX_LINE_BYTES // 2))
        self.assertEqual(client.replies(), ["500 Line too long"])
        self.assertTrue(client.transport.disconnecting)
        client.protocol.connectionLost(None)
        self.assertEqual(self.aggregator.view().total, 0)
        self.assertEqual(self.ingest.held_bytes, 0)

    def test_bare_lf_command(self):
        """
        A command ended with a bare LF (no CR), alone or before a CRLF
        line, is refused with 500 and the connection closed, rather than
        never answered.
        """
        for data in (b"EHLO x\n", b"EHLO x\nMAIL FROM:<a@b>\r\n"):
            client = self.connect()
            client.protocol.dataReceived(data)
            self.assertEqual(client.replies()[1:], [
                "500 5.5.2 Bare LF received: end lines with CRLF"], data)
            self.assertTrue(client.transport.disconnecting)
            client.protocol.connectionLost(None)

    def test_long_content_line(self):
        """
        A line longer than MAX_LINE_BYTES that ends is content as any
        other: only what waits for a line end is bounded.
        """
        client = self.connect(self.make_ingest(max_bytes=10 * MAX_LINE_BYTES))
        codes = self.transaction(client, mail("y" * (2 * MAX_LINE_BYTES)))
        self.assertEqual(codes[-1], 354)
        self.finish_snapshots()
        self.assertEqual(client.replies(), ["250 Counted for the next digest"])

    def test_bare_line_feeds(self):
        """
        Content whose lines end in bare LFs (smtplib sends bytes as they
        are) is taken however long, its short lines not one long line.
        """
        client = self.connect(self.make_ingest(max_bytes=10 * MAX_LINE_BYTES))
        client.replies()
        client.send(b"EHLO x", b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"DATA")
        for _ in range(4):
            client.protocol.dataReceived(b"Subject: bare\n\n" + b"x\n" * (
                MAX_LINE_BYTES // 4))
        client.protocol.dataReceived(b"\r\n.\r\n")
        self.finish_snapshots()
        self.assertEqual(client.replies(), ["250 Counted for the next digest"])

    def test_endless_line(self):
        """
        A command without a line end is not kept past MAX_COMMAND_BYTES:
        the client is told 500 and dropped.
        """
        client = self.connect()
        client.replies()
        for _ in range(3):
            client.protocol.dataReceived(b"z" * (MAX_COMMAND_BYTES // 2))
        self.assertEqual(client.replies(), ["500 Line too long"])
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(client.protocol._unread, b"")

    def test_command_too_long(self):
        """
        A command line over MAX_COMMAND_BYTES, line end and all, is
        answered 500 and the connection closed.
        """
        client = self.connect()
        client.replies()
        self.assertEqual(client.send(b"HELO " + b"h" * MAX_COMMAND_BYTES),
                         ["500 Line too long"])
        self.assertTrue(client.transport.disconnecting)


class AuthTests(IngestTestCase):
    """
    SMTP_INGEST_USERS: AUTH PLAIN and LOGIN, required before MAIL.
    """

    def setUp(self):
        super().setUp()
        self.make_ingest(users={"django": "s3cret", "cron": "other"})

    def plain(self, user: bytes, password: bytes) -> bytes:
        return b"AUTH PLAIN " + base64.b64encode(b"\0" + user + b"\0"
                                                 + password)

    def test_offered(self):
        """
        EHLO offers AUTH PLAIN and LOGIN.
        """
        self.assertIn("250-AUTH PLAIN LOGIN",
                      self.connect().send(b"EHLO x"))

    def test_required(self):
        """
        MAIL before AUTH is refused with 530.
        """
        self.assertEqual(self.connect().codes(b"EHLO x", b"MAIL FROM:<a@b>"),
                         [250, 530])

    def test_plain(self):
        """
        With the right name and password (PLAIN) mail is taken.
        """
        client = self.connect()
        self.assertEqual(client.codes(b"EHLO x",
                                      self.plain(b"django", b"s3cret")),
                         [250, 235])
        self.transaction(client)
        self.assertEqual(self.aggregator.view().total, 1)

    def test_login(self):
        """
        AUTH LOGIN prompts for the name, then the password.
        """
        client = self.connect()
        client.send(b"EHLO x")
        self.assertEqual(client.send(b"AUTH LOGIN"),
                         ["334 " + base64.b64encode(b"Username:").decode()])
        self.assertEqual(client.send(base64.b64encode(b"cron")),
                         ["334 " + base64.b64encode(b"Password:").decode()])
        self.assertEqual(client.codes(base64.b64encode(b"other"),
                                      b"MAIL FROM:<a@b>"), [235, 250])

    def test_wrong(self):
        """
        A wrong password, another user's password, an unknown user and a
        malformed response are all 535 (once the delay is over), and MAIL
        is still refused.
        """
        for line in (self.plain(b"django", b"wrong"),
                     self.plain(b"django", b"other"),
                     self.plain(b"nobody", b"s3cret"),
                     b"AUTH PLAIN " + base64.b64encode(b"no NULs"),
                     b"AUTH PLAIN " + base64.b64encode(b"\0a\0b\0c")):
            client = self.connect()
            self.assertEqual(client.codes(b"EHLO x", line,
                                          b"MAIL FROM:<a@b>"), [250], line)
            self.clock.advance(AUTH_MAX_DELAY_SECONDS)
            self.assertEqual(client.reply_codes(), [535, 530], line)

    def test_bad_commands(self):
        """
        AUTH without a mechanism, or with an unknown one, is refused
        without ending the session.
        """
        client = self.connect()
        self.assertEqual(client.codes(b"EHLO x", b"AUTH", b"AUTH CRAM-MD5",
                                      b"NOOP"), [250, 501, 504, 250])

    def test_not_configured(self):
        """
        Without SMTP_INGEST_USERS, AUTH is not available.
        """
        client = self.connect(self.make_ingest())
        self.assertEqual(client.codes(b"AUTH PLAIN AGEAYg=="), [502])

    def connect_from(self, host: str) -> Client:
        client = self.connect(transport=StringTransport(
            peerAddress=IPv4Address("TCP", host, 40000)))
        client.send(b"EHLO x")
        return client

    def answer_after(self, client: Client, seconds: float) -> list:
        """The codes answered within C{seconds}, and not before."""
        self.clock.advance(seconds - 0.001)
        early = client.reply_codes()
        self.clock.advance(0.001)
        self.assertEqual(early, [], f"answered before {seconds} s")
        return client.reply_codes()

    def test_slowed_and_dropped(self):
        """
        Each failed attempt is answered later than the last (1 s, 2 s, 4
        s); after AUTH_TRIES failures the client is told 421 and dropped;
        guesses sent together are tried one after the other.
        """
        events = capture_log(self)
        client = self.connect_from("10.0.0.7")
        self.assertEqual(client.codes(*[self.plain(b"django", b"guess")] * 5),
                         [])
        self.assertEqual(self.answer_after(client, 1), [535])
        self.assertEqual(self.answer_after(client, 2), [535])
        self.assertEqual(self.answer_after(client, 4), [421])
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(
            [formatEvent(event) for event in events],
            ["Failed AUTH from 10.0.0.7 (1 lately); the answer waits 1 s",
             "Closed the SMTP connection from 10.0.0.7: it failed AUTH 3 "
             "times"])

    def test_remembered_per_address(self):
        """
        Reconnecting does not start the wait again: the address's
        failures are remembered AUTH_MEMORY_SECONDS, and another
        address's are its own.  An IPv6 client's /64 is one address.
        """
        first = self.connect_from("10.0.0.7")
        first.send(self.plain(b"django", b"guess"))
        self.assertEqual(self.answer_after(first, 1), [535])
        again = self.connect_from("10.0.0.7")
        again.send(self.plain(b"django", b"guess"))
        self.assertEqual(self.answer_after(again, 2), [535])
        other = self.connect_from("10.0.0.8")
        other.send(self.plain(b"django", b"guess"))
        self.assertEqual(self.answer_after(other, 1), [535])
        for host, wait in (("2001:db8::1", 1), ("2001:db8::2", 2),
                           ("2001:db8:0:1::1", 1)):
            client = self.connect_from(host)
            client.send(self.plain(b"django", b"guess"))
            self.assertEqual(self.answer_after(client, wait), [535], host)
        self.clock.advance(AUTH_MEMORY_SECONDS + 1)
        later = self.connect_from("10.0.0.7")
        later.send(self.plain(b"django", b"guess"))
        self.assertEqual(self.answer_after(later, 1), [535])

    def test_success_waits_too(self):
        """
        After failures from its address, the right password too is
        answered only after the wait (guesses sent on many connections at
        once learn nothing sooner); from another address at once.
        """
        client = self.connect_from("10.0.0.7")
        client.send(self.plain(b"django", b"guess"),
                    self.plain(b"django", b"s3cret"), b"MAIL FROM:<a@b>")
        self.assertEqual(self.answer_after(client, 1), [535])
        self.assertEqual(self.answer_after(client, 1), [235, 250])
        other = self.connect_from("10.0.0.8")
        self.assertEqual(other.codes(self.plain(b"django", b"s3cret")),
                         [235])

    def test_memory_bounded(self):
        """
        At most AUTH_MEMORY_CLIENTS addresses are remembered, the one that
        failed longest ago forgotten first.
        """
        self.patch(failnozzle.mailin, "AUTH_MEMORY_CLIENTS", 2)
        for host in ("10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.3"):
            self.ingest.auth_failures.failed(host)
        self.assertEqual(
            [self.ingest.auth_failures.delay(host) for host in (
                "10.0.0.1", "10.0.0.2", "10.0.0.3")], [2.0, 0.0, 1.0])

    def test_delay_capped(self):
        """
        The wait grows no longer than AUTH_MAX_DELAY_SECONDS, however
        many failures.
        """
        for _ in range(10000):
            self.ingest.auth_failures.failed("10.0.0.7")
        self.assertEqual(self.ingest.auth_failures.delay("10.0.0.7"),
                         AUTH_MAX_DELAY_SECONDS)

    def test_lost_while_waiting(self):
        """
        A client gone during the wait leaves nothing scheduled (the
        minute of the failure's warning is the server's).
        """
        client = self.connect_from("10.0.0.7")
        client.send(self.plain(b"django", b"guess"))
        client.protocol.connectionLost(None)
        self.ingest.events.stop()
        self.assertEqual([call for call in self.clock.getDelayedCalls()
                          if call.active()], [])


class UsersCheckerTests(SynchronousTestCase):
    """
    L{UsersChecker}.
    """

    def test_check(self):
        """
        The right password gives the user name; anything else fails.
        """
        checker = UsersChecker({"django": "s3cret", "ünï": "pässword"})
        self.assertEqual(self.successResultOf(checker.requestAvatarId(
            UsernamePassword(b"django", b"s3cret"))), b"django")
        self.assertEqual(self.successResultOf(checker.requestAvatarId(
            UsernamePassword("ünï".encode(), "pässword".encode()))),
            "ünï".encode())
        for name, password in ((b"django", b"s3cre"), (b"nobody", b""),
                               (None, None), (b"django", b"")):
            self.failureResultOf(checker.requestAvatarId(
                UsernamePassword(name, password)), UnauthorizedLogin)


class TLSTests(IngestTestCase):
    """
    STARTTLS, and AUTH only after it.
    """

    def setUp(self):
        super().setUp()
        self.options = object()
        self.make_ingest(users={"django": "s3cret"}, tls=self.options)

    def connect_tls(self) -> Client:
        return self.connect(transport=TLSStringTransport(
            peerAddress=IPv4Address("TCP", "10.0.0.7", 40000)))

    def test_auth_after_starttls(self):
        """
        Before STARTTLS, EHLO offers STARTTLS and no AUTH, and AUTH is
        refused with 538; after it, AUTH is offered and works.
        """
        client = self.connect_tls()
        replies = client.send(b"EHLO x")
        self.assertIn("250-STARTTLS", replies)
        self.assertFalse([line for line in replies if "AUTH" in line])
        self.assertEqual(client.codes(b"AUTH PLAIN AGRqYW5nbwBzM2NyZXQ=",
                                      b"MAIL FROM:<a@b>"), [538, 530])
        self.assertEqual(client.codes(b"STARTTLS"), [220])
        self.assertIs(client.transport.tls, self.options)
        replies = client.send(b"EHLO x")
        self.assertIn("250-AUTH PLAIN LOGIN", replies)
        self.assertNotIn("250-STARTTLS", replies)
        self.assertEqual(client.codes(b"AUTH PLAIN AGRqYW5nbwBzM2NyZXQ=",
                                      b"MAIL FROM:<a@b>"), [235, 250])

    def test_no_injection(self):
        """
        Commands sent in clear in the same packet as STARTTLS are
        dropped, not run as if they had come over TLS.
        """
        client = self.connect_tls()
        client.replies()
        self.assertEqual(client.codes(b"STARTTLS", b"EHLO evil",
                                      b"MAIL FROM:<a@b>"), [220])
        self.assertEqual(client.codes(b"EHLO x"), [250])


class ReadingTests(IngestTestCase):
    """
    The reading of each message handed to C{in_thread}, one at a time,
    and counted when it is done.
    """

    def setUp(self):
        super().setUp()
        self.runs = []
        self.make_ingest(in_thread=self.in_thread)

    def in_thread(self, function, *args) -> defer.Deferred:
        """Runs C{function} when the test says so."""
        done = defer.Deferred()
        self.runs.append(lambda: defer.maybeDeferred(
            function, *args).chainDeferred(done))
        return done

    def send(self, subject: str) -> Client:
        client = self.connect()
        self.transaction(client, mail(subject=subject))
        return client

    def test_counted_once_read(self):
        """
        A message is counted only once it is read, and a second one is
        read only once the first is done, with what it holds given back
        only then.
        """
        first, second = self.send("one"), self.send("two")
        self.assertEqual(len(self.runs), 1)
        self.assertGreater(self.ingest.held_bytes, 0)
        self.assertEqual(self.aggregator.view().total, 0)
        self.runs.pop()()
        self.assertEqual(self.aggregator.view().total, 1)
        self.assertEqual(len(self.runs), 1)
        self.runs.pop()()
        self.assertEqual(self.ingest.held_bytes, 0)
        self.finish_snapshots()
        self.assertEqual([first.replies(), second.replies()],
                         [["250 Counted for the next digest"]] * 2)
        self.assertEqual(sorted(self.counted()),
                         [("one", "backup", "web1.example", 1),
                          ("two", "backup", "web1.example", 1)])

    def test_client_gone(self):
        """
        A message whose client left before it was read is not counted:
        it was not told 250, and sends it again.
        """
        client = self.send("gone")
        client.protocol.connectionLost(None)
        self.runs.pop()()
        self.assertEqual(self.aggregator.view().total, 0)
        self.assertEqual(self.ingest.held_bytes, 0)
        self.assertEqual(self.snapshots, [])

    def test_stop_while_reading(self):
        """
        A message read after the stop began is not counted, and the
        client is told 421.
        """
        client = self.send("late")
        self.ingest.stop_accepting()
        self.runs.pop()()
        self.assertEqual(self.aggregator.view().total, 0)
        self.assertEqual(client.reply_codes(), [421])

    def test_unreadable(self):
        """
        A message whose reading raises is counted as bad input.
        """
        self.patch(failnozzle.mailin, "read_mail", lambda *args: 1 / 0)
        client = self.send("bad")
        self.runs.pop()()
        [(error, _)] = self.bad
        self.assertEqual(str(error), "mail that could not be read: "
                                     "ZeroDivisionError: division by zero")
        self.finish_snapshots()
        self.assertEqual(client.reply_codes(), [250])


class StopTests(IngestTestCase):
    """
    Stopping: 421 for what arrives after, a hang-up for everyone.
    """

    def test_stop_accepting(self):
        """
        Once the stop began, a message is answered 421 (try again later)
        and not counted.
        """
        client = self.connect()
        self.ingest.stop_accepting()
        codes = self.transaction(client)
        self.assertEqual(codes[-1], 421)
        self.assertEqual(self.aggregator.view().total, 0)

    def test_hang_up(self):
        """
        Every client still connected is told 421 and disconnected; the
        Deferred fires once all are gone.
        """
        ingest = self.make_ingest()
        clients = [self.connect(ingest) for _ in range(2)]
        for client in clients:
            client.replies()
        gone = ingest.hang_up()
        for client in clients:
            [line] = client.replies()
            self.assertTrue(line.startswith("421 nozzle.example "), line)
            self.assertTrue(client.transport.disconnecting)
        self.assertNoResult(gone)
        for client in clients:
            client.protocol.connectionLost(None)
        self.successResultOf(gone)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_hang_up_aborts(self):
        """
        A connection that does not close within a few seconds is aborted.
        """
        aborted = []
        transport = StringTransport(
            peerAddress=IPv4Address("TCP", "10.0.0.7", 40000))
        transport.abortConnection = lambda: aborted.append(True)
        client = self.connect(self.make_ingest(), transport)
        gone = self.ingest.hang_up()
        self.clock.advance(2)
        self.assertEqual(aborted, [True])
        client.protocol.connectionLost(None)
        self.successResultOf(gone)


class FuzzTests(IngestTestCase):
    """
    Random and cut-short input never raises out of the protocol, nor
    logs an error.
    """

    SESSION = (
        b"EHLO web1\r\nAUTH PLAIN AGRqYW5nbwBzM2NyZXQ=\r\nAUTH LOGIN\r\n"
        b"ZGphbmdv\r\nczNjcmV0\r\nMAIL FROM:<a@b> SIZE=100\r\n"
        b"RCPT TO:<Kind@x>\r\nRCPT TO:<k2@x>\r\nDATA\r\n"
        b"Subject: =?utf-8?q?hi?=\r\n"
        b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n"
        b"Content-Type: text/plain; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"Traceback (most recent call last):\r\n"
        b'  File "a", line 1, in f\r\nE: =E4\r\n--XX--\r\n.\r\n'
        b"RSET\r\nSTARTTLS\r\nAUTH\r\n\xff\r\nQUIT\r\n")

    def mutations(self, rng: random.Random, count: int):
        """Random bytes, and the session above mangled and cut short."""
        for number in range(count):
            if number % 10 == 0:
                yield bytes(rng.randrange(256)
                            for _ in range(rng.randrange(1, 500)))
                continue
            data = bytearray(self.SESSION)
            for _ in range(rng.randrange(8)):
                if not data:
                    break
                where = rng.randrange(len(data))
                action = rng.randrange(4)
                if action == 0:
                    data[where] = rng.randrange(256)
                elif action == 1:
                    del data[where:where + rng.randrange(1, 40)]
                elif action == 2:
                    data[where:where] = bytes(
                        rng.randrange(256) for _ in range(rng.randrange(20)))
                else:
                    del data[where:]
            yield bytes(data)

    def test_random_sessions(self):
        """
        Each input, in random pieces, with and without AUTH and TLS, then
        the connection lost: no exception, no error logged, and the
        sessions that got through counted.
        """
        events = capture_log(self)
        rng = random.Random(1549)
        ingests = [
            self.make_ingest(max_bytes=2000),
            self.make_ingest(max_bytes=2000, users={"django": "s3cret"}),
            self.make_ingest(max_bytes=2000, users={"django": "s3cret"},
                             tls=object()),
        ]
        for number, data in enumerate(self.mutations(rng, 1500)):
            client = self.connect(ingests[number % 3], TLSStringTransport(
                peerAddress=IPv4Address("TCP", "10.0.0.7", 40000)))
            while data:
                size = rng.randrange(1, 64)
                client.protocol.dataReceived(data[:size])
                data = data[size:]
            self.finish_snapshots()
            client.protocol.connectionLost(None)
        self.assertEqual([event for event in events
                          if event.get("log_failure")
                          or event["log_level"].name in ("error",
                                                         "critical")], [])
        self.assertGreater(self.aggregator.flush().total, 50)


class TLSOptionsTests(SynchronousTestCase):
    """
    L{tls_options}: SMTP_INGEST_TLS_CERT and _KEY, checked at start-up.
    """

    def setUp(self):
        self.ca = trustme.CA()
        self.cert = self.ca.issue_cert("nozzle.example")

    def write(self, data: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as out:
            out.write(data)
        return path

    def chain(self) -> str:
        return self.write(b"".join(pem.bytes()
                                   for pem in self.cert.cert_chain_pems))

    def key(self) -> str:
        return self.write(self.cert.private_key_pem.bytes())

    def test_good(self):
        """
        A certificate with its chain and the matching key give options
        that serve the certificate.
        """
        options = tls_options(self.chain(), self.key())
        self.assertIsNotNone(options.getContext())

    def assertRefused(self, cert: str, key: str, *expected: str):
        error = self.assertRaises(ConfigError, tls_options, cert, key)
        for text in expected:
            self.assertIn(text, str(error))

    def test_unreadable(self):
        """
        A missing file is named with the setting.
        """
        self.assertRefused(self.chain(), "/no/such/key.pem",
                           "SMTP_INGEST_TLS_KEY: cannot read "
                           "'/no/such/key.pem'")
        self.assertRefused("/no/such/cert.pem", self.key(),
                           "SMTP_INGEST_TLS_CERT: cannot read")

    def test_not_pem(self):
        """
        Files without a certificate, or without a key, are named.
        """
        junk = self.write(b"junk")
        self.assertRefused(junk, self.key(),
                           f"SMTP_INGEST_TLS_CERT: no PEM certificate in "
                           f"{junk!r}")
        self.assertRefused(self.chain(), junk, "SMTP_INGEST_TLS_KEY: no PEM "
                                               "private key")

    def test_encrypted_key(self):
        """
        A key with a passphrase is refused at once, not asked about.
        """
        key = serialization.load_pem_private_key(
            self.cert.private_key_pem.bytes(), None)
        encrypted = self.write(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase")))
        self.assertRefused(self.chain(), encrypted,
                           "SMTP_INGEST_TLS_KEY: no PEM private key "
                           "(without a passphrase)")

    def test_wrong_key(self):
        """
        A key that is not the certificate's is refused.
        """
        other = self.write(self.ca.issue_cert(
            "other.example").private_key_pem.bytes())
        self.assertRefused(self.chain(), other,
                           "SMTP_INGEST_TLS_KEY: the key in", "is not the "
                           "one of the certificate")


class BindTests(SynchronousTestCase):
    """
    L{bind_tcp_socket}.
    """

    def test_listening(self):
        """
        The socket is bound, listening and non-blocking.
        """
        sock = bind_tcp_socket("127.0.0.1", 0)
        self.addCleanup(sock.close)
        self.assertFalse(sock.getblocking())
        with socket.create_connection(sock.getsockname()):
            pass

    def test_in_use(self):
        """
        An address in use raises OSError, and no socket is left open.
        """
        holder = bind_tcp_socket("127.0.0.1", 0)
        self.addCleanup(holder.close)
        self.assertRaises(OSError, bind_tcp_socket, *holder.getsockname())


class ServiceTests(SynchronousTestCase):
    """
    The service with SMTP_INGEST_BIND: the port, the 250's snapshot, the
    stop.
    """

    def start(self, **overrides):
        for name in ("SPOOL_DIR", "STATE_FILE", "MAILDIR"):
            overrides.setdefault(name, self.mktemp())
        self.reactor = MemoryReactorClock()
        self.writer = HeldWriter()
        udp_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(udp_socket.close)
        smtp_socket = socket.socket()
        self.addCleanup(smtp_socket.close)
        self.service = FailnozzleService(
            make_settings(SMTP_INGEST_BIND=("127.0.0.1", 0), **overrides),
            self.reactor, udp_socket, FakeMailTransport(),
            writer=self.writer, smtp_socket=smtp_socket)
        events = capture_log(self)
        self.service.startService()
        self.events = events
        return self.service

    def test_adopts_port(self):
        """
        The SMTP socket is handed to the reactor with the ingest as its
        factory, and start-up says where mail is received.
        """
        service = self.start()
        [(_, _, _, _), (_, family, factory)] = self.reactor.adoptedPorts
        self.assertEqual(family, socket.AF_INET)
        self.assertIs(factory, service.mail)
        self.assertIn("failnozzle listening for mail on SMTP 0.0.0.0:1234",
                      [event["log_format"].format(**event)
                       for event in self.events if "log_format" in event])

    def test_saved_soon(self):
        """
        The 250 waits for a snapshot begun after the count: not the one
        being written, and one snapshot serves a burst of messages.
        """
        service = self.start()
        self.writer.run_begun()
        service.save_state()
        self.assertEqual(len(self.writer.pending), 1, "a snapshot being written")
        first, second = service.saved_soon(), service.saved_soon()
        self.writer.run_begun()
        self.assertNoResult(first)
        self.assertEqual(len(self.writer.pending), 1, "one snapshot for both")
        self.writer.run_begun()
        self.successResultOf(first)
        self.successResultOf(second)

    def test_saved_soon_quick(self):
        """
        Waits that are not C{durable} (Sentry's, HTTP's) within one turn
        of the reactor share a snapshot taken once it ends, and end once
        it is in the file, before the disk writer syncs anything; the
        next scheduled snapshot syncs it.  A durable one joining them
        makes the shared snapshot durable.
        """
        service = self.start()
        service.aggregator.add(service.reader.report_of(record("a")))
        service.save_state()
        self.writer.run_all()  # "a"'s key written
        service.aggregator.add(service.reader.report_of(record("a")))
        first = service.saved_soon(durable=False)
        second = service.saved_soon(durable=False)
        self.assertNoResult(first)
        self.reactor.advance(0)
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(self.writer.pending, [])
        self.assertEqual(state_file_total(service.state_file.path), 2)
        self.reactor.advance(service.settings.SNAPSHOT_SECONDS)
        self.assertEqual(self.writer.names(), ["StateFile._write"])
        self.writer.run_all()
        service.aggregator.add(service.reader.report_of(record("a")))
        quick, durable = (service.saved_soon(durable=False),
                          service.saved_soon())
        self.reactor.advance(0)
        self.assertNoResult(quick)
        self.assertEqual(self.writer.names(), ["StateFile._write"])
        self.writer.run_begun()
        self.successResultOf(quick)
        self.successResultOf(durable)

    def test_saved_soon_taken_by_another(self):
        """
        A snapshot begun for another reason (the timer's, a flush's)
        before the quick one takes its waiters with it: it stays durable,
        and they are told when it is written.
        """
        service = self.start()
        self.writer.run_all()
        service.aggregator.add(service.reader.report_of(record("a")))
        waiting = service.saved_soon(durable=False)
        service.save_state()
        self.assertEqual(self.writer.names(), ["StateFile._write"])
        self.reactor.advance(0)
        self.assertNoResult(waiting)
        self.writer.run_begun()
        self.successResultOf(waiting)

    def test_saved_soon_failed(self):
        """
        A snapshot that cannot be written still ends the wait: the count
        is in memory, and the daemon says the state file is unwritable.
        """
        service = self.start()
        self.writer.run_begun()
        waiting = service.saved_soon()
        [(_, _, snapshot)] = self.writer.pending
        snapshot.errback(OSError(28, "No space left on device"))
        self.successResultOf(waiting)

    def test_saved_soon_without_snapshots(self):
        """
        With SNAPSHOT_SECONDS = 0 there is nothing to wait for.
        """
        service = self.start(SNAPSHOT_SECONDS=0)
        self.successResultOf(service.saved_soon())

    def test_stop(self):
        """
        Stopping refuses new mail at once, stops listening, flushes, and
        only then hangs up on the clients still connected.
        """
        service = self.start()
        self.writer.run_begun()
        client = Client(service.mail, StringTransport(
            peerAddress=IPv4Address("TCP", "10.0.0.7", 40000)))
        client.replies()
        stopped = service.stopService()
        self.assertFalse(service.mail.accepting)
        self.assertEqual(client.replies(), [])
        self.writer.run_all()
        [line] = client.replies()
        self.assertTrue(line.startswith("421 "), line)
        self.assertTrue(client.transport.disconnecting)
        self.assertNoResult(stopped)
        client.protocol.connectionLost(None)
        self.successResultOf(stopped)
