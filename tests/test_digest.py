"""
Tests for L{failnozzle.digest}.
"""
import calendar
import email
import email.policy
import os
import time
from collections import namedtuple

from twisted.logger import globalLogPublisher
from twisted.internet.testing import EventLoggingObserver
from twisted.trial.unittest import SynchronousTestCase

from failnozzle.aggregate import Batch, Entry
from failnozzle.config import ConfigError, UniqueMessage
from failnozzle.digest import DigestRenderer, build_message, pager_alert


def at(text):
    """Seconds since the epoch for a UTC 'YYYY-mm-dd HH:MM:SS'."""
    return calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M:%S"))


VIEW_TRACEBACK = (
    "Traceback (most recent call last):\n"
    "  ...\n"
    '  File "src/service1/views.py", line 50, in myfunc\n'
    '     raise SomeException("fail!")\n'
    "SomeException: fail!"
)
FILE_TRACEBACK = (
    "Traceback (most recent call last):\n"
    "  ...\n"
    '  File "src/service1/views.py", line 50, in myfunc\n'
    "     with open(filename, 'r') as handle:\n"
    "IOError: [Errno 2] No such file or directory: 'foo.txt'"
)

#: The two errors of the original failnozzle's example email.
EXAMPLE_BATCH = Batch((
    Entry(
        UniqueMessage("views", "myfunc", "views.py",
                      "Exception in view: Traceback (most recent call last):",
                      "src/service1/views.py", 50, VIEW_TRACEBACK,
                      "service1"),
        {"host2": 3, "host1": 1},
        at("2013-01-09 15:08:41"), at("2013-01-09 15:08:45"),
    ),
    Entry(
        UniqueMessage("files", "get", "files.py",
                      'Could not retrieve file "foo.txt"',
                      "src/service2/files.py", 363, FILE_TRACEBACK,
                      "service2"),
        {"host3": 1},
        at("2013-01-09 15:08:41"), at("2013-01-09 15:08:41"),
    ),
))

#: The original's example email, times now printed in UTC to the second.
EXAMPLE_BODY = """\
** 5 instances of 2 unique errors (service1, service2) **

========
Summary:
========
4X Exception in view: Traceback (most recent call last): (in service1, src/service1/views.py:50)
1X Could not retrieve file "foo.txt" (in service2, src/service2/files.py:363)

========
Details:
========
Exception #1 of 2: 4X Exception in view: Traceback (most recent call last): (in service1, src/service1/views.py:50)

Seen between 2013-01-09 15:08:41 UTC to 2013-01-09 15:08:45 UTC
- on host1, 1X
- on host2, 3X

Traceback (most recent call last):
  ...
  File "src/service1/views.py", line 50, in myfunc
     raise SomeException("fail!")
SomeException: fail!
----------------------------------------------------------------------

Exception #2 of 2: 1X Could not retrieve file "foo.txt" (in service2, src/service2/files.py:363)

Seen between 2013-01-09 15:08:41 UTC to 2013-01-09 15:08:41 UTC
- on host3, 1X

Traceback (most recent call last):
  ...
  File "src/service1/views.py", line 50, in myfunc
     with open(filename, 'r') as handle:
IOError: [Errno 2] No such file or directory: 'foo.txt'

[EOM]
"""


def renderer(template_dir=None, unique_tuple=UniqueMessage, **names):
    return DigestRenderer(unique_tuple, "nozzle1", 10000, template_dir,
                          **names)


class DefaultTemplateTests(SynchronousTestCase):
    """
    The built-in templates reproduce the original's example email.
    """

    def test_golden_body(self):
        """
        The body of the original's example, line for line.
        """
        _, body = renderer().render(EXAMPLE_BATCH)
        self.assertEqual(body, EXAMPLE_BODY)

    def test_subject(self):
        """
        The subject is the original's: server, totals and kinds, one line.
        """
        subject, _ = renderer().render(EXAMPLE_BATCH)
        self.assertEqual(
            subject, "nozzle1 errors: 5 total, 2 unique (service1, service2)")

    def test_singular(self):
        """
        One instance of one error is worded in the singular.
        """
        batch = Batch(EXAMPLE_BATCH.entries[1:])
        _, body = renderer().render(batch)
        self.assertTrue(body.startswith(
            "** 1 instance of 1 unique error (service2) **\n"), body)

    def test_overflow_line(self):
        """
        Errors past MAX_UNIQUE_MESSAGES are summed up in one line, and the
        headline total includes them.
        """
        batch = Batch(EXAMPLE_BATCH.entries, overflow=7)
        _, body = renderer().render(batch)
        self.assertIn("** 12 instances of 2 unique errors", body)
        self.assertIn(
            "1X Could not retrieve file \"foo.txt\" (in service2, "
            "src/service2/files.py:363)\n"
            "7X more errors not shown (more than 10000 unique errors "
            "arrived)\n", body)

    def test_details_capped(self):
        """
        Past DIGEST_MAX_DETAILS errors, the rest are counted in one summary
        line and not shown in detail; the headline and the subject stay
        exact, kinds included.
        """
        entries = [Entry(UniqueMessage("m", "f", "f.py", f"error {n}", "p.py",
                                       n, "trace", f"app{n % 3}"),
                         {"h": 10 - n}, 0, 0) for n in range(5)]
        subject, body = DigestRenderer(UniqueMessage, "nozzle1", 10000,
                                       max_details=2).render(
            Batch.of(entries))
        self.assertEqual(
            subject, "nozzle1 errors: 40 total, 5 unique (app0, app1, app2)")
        self.assertIn("** 40 instances of 5 unique errors", body)
        self.assertIn(
            "9X error 1 (in app1, p.py:1)\n"
            "21X in 3 more unique errors not listed (DIGEST_MAX_DETAILS = 2)\n",
            body)
        self.assertIn("Exception #2 of 2:", body)
        self.assertNotIn("error 2", body)

    def test_missing_exc_text(self):
        """
        An error without exc_text shows no 'None' where the traceback
        would be.
        """
        entry = Entry(UniqueMessage("m", "f", "f.py", "oops", "p.py", 1,
                                    None, "app"), {"h": 1}, 0, 0)
        _, body = renderer().render(Batch((entry,)))
        self.assertNotIn("None", body)
        self.assertTrue(body.endswith("- on h, 1X\n\n[EOM]\n"), body)

    def test_level(self):
        """
        An error sent with a level (GELF) shows it under its details;
        one without shows no level line.
        """
        gelf = Entry(UniqueMessage("m", "f", "f.py", "oops", "p.py", 1,
                                   "trace", "app"), {"h": 2}, 0, 0, 3)
        plain = Entry(UniqueMessage("m", "f", "f.py", "other", "p.py", 2,
                                    "trace", "app"), {"h": 1}, 0, 0)
        _, body = renderer().render(Batch.of([gelf, plain]))
        self.assertIn("UTC\nLevel: error (3)\n- on h, 2X\n", body)
        self.assertEqual(body.count("Level:"), 1)

    def test_unknown_source_and_kind(self):
        """
        A missing source or kind does not break the digest.
        """
        entry = Entry(UniqueMessage("m", "f", "f.py", "oops", "p.py", 1,
                                    "trace", None), {None: 2, "h": 1}, 0, 0)
        subject, body = renderer().render(Batch((entry,)))
        self.assertEqual(subject, "nozzle1 errors: 3 total, 1 unique ()")
        self.assertIn("- on None, 2X\n- on h, 1X\n", body)

    def test_custom_unique_fields(self):
        """
        A UNIQUE_MSG_TUPLE without the default fields still renders with
        the built-in templates.
        """
        Custom = namedtuple("Custom", ["x", "y"])
        entry = Entry(Custom(1, 2), {"h": 1}, 0, 0)
        subject, body = renderer(unique_tuple=Custom).render(Batch((entry,)))
        self.assertIn("1 total, 1 unique", subject)
        self.assertIn("- on h, 1X", body)


class CustomTemplateTests(SynchronousTestCase):
    """
    EMAIL_TEMPLATE_DIR, EMAIL_BODY_TEMPLATE and EMAIL_SUBJECT_TEMPLATE.
    """

    def write(self, directory, name, text):
        with open(os.path.join(directory, name), "w") as out:
            out.write(text)

    def template_dir(self):
        path = self.mktemp()
        os.makedirs(path)
        return path

    def test_original_style_template(self):
        """
        A template written for the original failnozzle (sorted_counts,
        info.sources_sorted, info.first_seen, kinds, server_name) works.
        """
        path = self.template_dir()
        self.write(path, "body.txt",
                   "{{ server_name }}: {{ total_unique }} of {{ total }} "
                   "({{ ', '.join(kinds) }})\n"
                   "{% for message, info in sorted_counts %}"
                   "{{ info.total }} {{ message.message }} "
                   "{{ info.first_seen.year }} "
                   "{% for source, count in info.sources_sorted %}"
                   "[{{ source }}={{ count }}]{% endfor %}\n"
                   "{% endfor %}")
        _, body = renderer(path, body_template="body.txt").render(
            EXAMPLE_BATCH)
        self.assertEqual(
            body,
            "nozzle1: 2 of 5 (service1, service2)\n"
            "4 Exception in view: Traceback (most recent call last): 2013 "
            "[host1=1][host2=3]\n"
            '1 Could not retrieve file "foo.txt" 2013 [host3=1]\n')

    def test_subject_falls_back_to_builtin(self):
        """
        A template directory that holds only a body template still finds
        the built-in subject template.
        """
        path = self.template_dir()
        self.write(path, "body-template.txt", "custom body")
        subject, body = renderer(path).render(EXAMPLE_BATCH)
        self.assertEqual(body, "custom body\n")
        self.assertTrue(subject.startswith("nozzle1 errors: 5 total"))

    def test_multiline_subject_folded(self):
        """
        A subject template that renders several lines gives one line.
        """
        path = self.template_dir()
        self.write(path, "s.txt", "errors\n  on {{ server_name }}\n")
        subject, _ = renderer(path, subject_template="s.txt").render(
            EXAMPLE_BATCH)
        self.assertEqual(subject, "errors on nozzle1")

    def test_missing_template(self):
        """
        A template that is not there stops start-up naming the setting.
        """
        error = self.assertRaises(
            ConfigError, renderer, self.template_dir(),
            body_template="nope.txt")
        self.assertEqual(
            str(error), "EMAIL_BODY_TEMPLATE: template 'nope.txt' not found")

    def test_syntax_error(self):
        """
        A template that does not compile stops start-up naming the setting
        and the line.
        """
        path = self.template_dir()
        self.write(path, "bad.txt", "line one\n{% for %}\n")
        error = self.assertRaises(ConfigError, renderer, path,
                                  subject_template="bad.txt")
        self.assertIn("EMAIL_SUBJECT_TEMPLATE: template 'bad.txt' line 2",
                      str(error))
        self.assertNotIn("\n", str(error))

    def test_render_error_falls_back(self):
        """
        A custom template that fails on a batch is logged, and the digest
        is rendered with the built-in templates instead of being lost.
        """
        path = self.template_dir()
        self.write(path, "body.txt", "{{ total / 0 }}")
        events = EventLoggingObserver.createWithCleanup(self,
                                                        globalLogPublisher)
        _, body = renderer(path, body_template="body.txt").render(
            EXAMPLE_BATCH)
        self.assertEqual(body, EXAMPLE_BODY)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertIn("built-in templates",
                      events[0]["log_format"])


class MessageTests(SynchronousTestCase):
    """
    The email message that carries a digest.
    """

    def build(self, **overrides):
        options = dict(sender="nozzle@example.com",
                       recipients=("a@example.com", "b@example.com"),
                       subject="nozzle1 errors: 5 total",
                       body=EXAMPLE_BODY, date=at("2013-01-09 15:09:00"),
                       domain="nozzle1.example.com")
        options.update(overrides)
        raw = build_message(**options).as_bytes()
        return raw, email.message_from_bytes(raw.replace(b"\r\n", b"\n"),
                                             policy=email.policy.default)

    def test_headers(self):
        """
        From, To, Subject, Date (from the reactor's time, in UTC) and a
        Message-ID on the configured domain; no Reply-To unless given.
        """
        _, message = self.build()
        self.assertEqual(message["From"], "nozzle@example.com")
        self.assertEqual(message["To"], "a@example.com, b@example.com")
        self.assertEqual(message["Subject"], "nozzle1 errors: 5 total")
        self.assertEqual(message["Date"].datetime.timestamp(),
                         at("2013-01-09 15:09:00"))
        self.assertEqual(message["Date"].datetime.utcoffset().seconds, 0)
        self.assertTrue(message["Message-ID"].endswith(
            "@nozzle1.example.com>"))
        self.assertIsNone(message["Reply-To"])
        self.assertEqual(message["X-Failnozzle"], "digest")

    def test_reply_to_and_kind(self):
        """
        Reply-To lists the given addresses; X-Failnozzle says the kind.
        """
        _, message = self.build(reply_to=("r@example.com",), kind="pager")
        self.assertEqual(message["Reply-To"], "r@example.com")
        self.assertEqual(message["X-Failnozzle"], "pager")

    def test_ascii_body_readable(self):
        """
        An ASCII body travels as it is (7bit), CRLF line ends, so the
        message is readable without decoding.
        """
        raw, message = self.build()
        self.assertEqual(message.get_content_type(), "text/plain")
        self.assertEqual(message.get_content_charset(), "utf-8")
        self.assertEqual(message["Content-Transfer-Encoding"], "7bit")
        self.assertIn(b"\r\n- on host2, 3X\r\n", raw)
        self.assertEqual(message.get_content(), EXAMPLE_BODY)

    def test_unicode(self):
        """
        Non-ASCII subject and body survive encoding.
        """
        raw, message = self.build(subject="Ärger ☃", body="Fehler: Ärger ☃\n")
        self.assertTrue(raw.isascii())
        self.assertEqual(message["Subject"], "Ärger ☃")
        self.assertEqual(message.get_content(), "Fehler: Ärger ☃\n")

    def test_lone_surrogates(self):
        """
        Text UTF-8 cannot encode (a lone surrogate, as the JSON escape
        "\\udcff" gives) is replaced, not an error that loses the digest.
        """
        raw, message = self.build(subject="bad \udcff", body="x \udcff y\n")
        self.assertEqual(message["Subject"], "bad ?")
        self.assertEqual(message.get_content(), "x ? y\n")

    def test_long_lines(self):
        """
        A line longer than SMTP allows is encoded, not sent as it is.
        """
        raw, message = self.build(body="x" * 5000 + "\n")
        self.assertTrue(all(len(line) <= 998 for line in raw.split(b"\r\n")))
        self.assertEqual(message.get_content(), "x" * 5000 + "\n")


class PagerAlertTests(SynchronousTestCase):
    """
    The pager alert's words.
    """

    def test_alert(self):
        """
        The subject names the server, the body the count and the window.
        """
        subject, body = pager_alert("nozzle1", 120, 5, 60)
        self.assertEqual(subject, "nozzle1 error rate exceeded")
        self.assertEqual(
            body, "Danger: received 120 errors within the alert window "
                  "(the last 5 flushes of 60 s).\n")
