"""
Tests for L{failnozzle.shrink}: a spooled message cut to a size, headers
kept, the body cut at a line with a marker saying how much and why.
"""
import email
from email.policy import default

from twisted.trial.unittest import SynchronousTestCase

from failnozzle.digest import build_message
from failnozzle.shrink import shrink, wire_size

WHY = "the mail server takes at most 5,000 bytes (SIZE)"


def spooled(body: str, **headers) -> bytes:
    """A digest as the outbox spools it."""
    message = build_message(sender="nozzle@example.com",
                            recipients=["ops@example.com"],
                            subject="nozzle1 errors: 40 total", body=body,
                            date=0, domain="nozzle1", **headers)
    return message.as_bytes(policy=default)


def parsed(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=default)


class WireSizeTests(SynchronousTestCase):
    """
    The size SMTP's SIZE counts.
    """

    def test_crlf(self):
        """
        Each LF counts as CRLF.
        """
        self.assertEqual(wire_size(b"a\nbb\n"), 7)


class ShrinkTests(SynchronousTestCase):
    """
    Cutting a message down to a limit.
    """

    SUMMARY = "Summary: 40 errors\n- 20X boom\n- 20X bang\n\n"

    def body(self, line: str = "  File \"app.py\", line 1, in f\n",
             lines: int = 2000) -> str:
        return self.SUMMARY + line * lines

    def test_fits_already(self):
        """
        A message within the limit is given back as it is.
        """
        data = spooled("short\n")
        self.assertIs(shrink(data, 10000, WHY), data)

    def assertCut(self, data: bytes, limit: int, least: float = 0.8) -> str:
        """
        C{data} cut to C{limit}: within it, and not below C{least} of it,
        headers kept, body the summary then whole lines and the marker;
        returns the body.
        """
        cut = shrink(data, limit, WHY)
        self.assertLessEqual(wire_size(cut), limit)
        self.assertGreater(wire_size(cut), limit * least, "not cut too much")
        original, message = parsed(data), parsed(cut)
        for name in ("From", "To", "Subject", "Date", "Message-ID",
                     "X-Failnozzle"):
            self.assertEqual(message[name], original[name], name)
        body = message.get_content()
        self.assertTrue(body.startswith(self.SUMMARY), body[:200])
        kept, marker = body.rstrip("\n").rsplit("\n", 1)
        self.assertEqual(marker, f"[failnozzle cut the rest of this message "
                                 f"here: it is {wire_size(data):,} bytes, "
                                 f"and {WHY}.]")
        self.assertTrue(original.get_content().startswith(kept),
                        "whole lines only")
        return body

    def test_ascii(self):
        """
        A 7-bit body is cut at a line boundary, and stays 7-bit.
        """
        data = spooled(self.body())
        self.assertCut(data, 5000)
        self.assertEqual(parsed(shrink(data, 5000, WHY))
                         ["Content-Transfer-Encoding"], "7bit")

    def test_quoted_printable(self):
        """
        A body in quoted-printable (non-ASCII text) is cut on its text,
        not its encoding: what is kept reads back whole.
        """
        data = spooled(self.body(line="Ärger ☃ in «views» ünïcode\n"))
        self.assertIn(b"quoted-printable", data)
        self.assertCut(data, 5000)

    def test_long_lines(self):
        """
        Lines longer than the limit leave the summary's lines only.
        """
        data = spooled(self.SUMMARY + "x" * 30000 + "\n")
        body = self.assertCut(data, 5000, least=0)
        self.assertNotIn("xxx", body)

    def test_missing(self):
        """
        A message read only in part is cut even if the part fits, and the
        marker counts the bytes that were not read.
        """
        data = spooled(self.body(lines=10))
        cut = shrink(data, 100000, "only part of it was read", missing=500)
        body = parsed(cut).get_content()
        self.assertIn(f"it is {wire_size(data) + 500:,} bytes, and only "
                      f"part of it was read.]", body)

    def test_headers_too_big(self):
        """
        A limit smaller than the headers cannot be met.
        """
        error = self.assertRaises(ValueError, shrink,
                                  spooled(self.body()), 100, WHY)
        self.assertIn("headers alone", str(error))

    def test_not_text(self):
        """
        A body that is not text (a multipart message, not failnozzle's) is
        not cut.
        """
        message = email.message.EmailMessage()
        message["Subject"] = "s"
        message.set_content("x" * 10000)
        message.add_attachment(b"\0" * 10000, maintype="application",
                               subtype="octet-stream")
        self.assertRaises(ValueError, shrink, message.as_bytes(), 5000, WHY)

    def test_garbage(self):
        """
        Bytes that are no message at all are not cut, and raise nothing
        but ValueError.
        """
        for data in (b"\xff" * 10000, b"Content-Type: text/plain; "
                     b"charset=nonesuch\n\n" + b"x\n" * 5000,
                     b"Content-Transfer-Encoding: base64\n\n" + b"!" * 10000):
            try:
                cut = shrink(data, 5000, WHY)
            except ValueError:
                continue
            self.assertLessEqual(wire_size(cut), 5000)
