"""
Tests for L{failnozzle.digest}.
"""
import calendar
import email
import email.policy
import os
import random
import re
import time
from collections import namedtuple
from dataclasses import replace

from jinja2 import Template
from twisted.logger import globalLogPublisher
from twisted.internet.testing import EventLoggingObserver
from twisted.trial.unittest import SynchronousTestCase

from failnozzle.aggregate import Batch, Entry
from failnozzle.config import ConfigError, UniqueMessage
from failnozzle.digest import (SUBJECT_MAX_CHARS, DigestRenderer,
                               build_message, headline_of, pager_message)
from failnozzle.pager import FIRING, REMINDER, RESOLVED, Culprit, Page
from failnozzle.policy import Status, seen_key


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


#: The original failnozzle's own templates, byte for byte.
ORIGINAL_BODY_TEMPLATE = """\
{%- macro plural(count, singular, plural, show_count=True) -%}
  {{- count if show_count }} {% if count == 1 -%}
    {{ singular }}
  {%- else -%}
    {{ plural }}
  {%- endif -%}
{%- endmacro -%}

** {{ plural(total, 'instance', 'instances') }} of {{ plural(total_unique, \
'unique error', 'unique errors') }} ({{ ', '.join(kinds) }}) **

========
Summary:
========
{%- for message, info in sorted_counts %}
{{ info.total }}X {{ message.message }} (in {{ message.kind }}, \
{{ message.pathname }}:{{ message.lineno }})
{%- endfor %}
\x20\x20
========
Details:
========
{%- for message, info in sorted_counts %}
Exception #{{ loop.index }} of {{ loop.length }}: {{ info.total }}X \
{{ message.message }} (in {{ message.kind }}, {{ message.pathname }}:\
{{ message.lineno }})

Seen between {{ info.first_seen }} to {{ info.last_seen }}
{%- for source, count in info.sources_sorted %}\x20
- on {{ source }}, {{ count }}X
{%- endfor %}

{{ message.exc_text }}
{%- if not loop.last %}
----------------------------------------------------------------------
{% endif -%}
{%- endfor %}
[EOM]
"""
ORIGINAL_SUBJECT_TEMPLATE = (
    "{{ server_name }} errors: {{ total }} total, {{ total_unique }} unique "
    "({{ ', '.join(kinds) }})\n")

#: What the original's templates make of its example (times are aware
#: UTC datetimes here, naive local ones there).
ORIGINAL_TEMPLATES_BODY = """\
** 5 instances of 2 unique errors (service1, service2) **

========
Summary:
========
4X Exception in view: Traceback (most recent call last): (in service1, \
src/service1/views.py:50)
1X Could not retrieve file "foo.txt" (in service2, src/service2/files.py:363)
\x20\x20
========
Details:
========
Exception #1 of 2: 4X Exception in view: Traceback (most recent call last): \
(in service1, src/service1/views.py:50)

Seen between 2013-01-09 15:08:41+00:00 to 2013-01-09 15:08:45+00:00\x20
- on host1, 1X\x20
- on host2, 3X

%s
----------------------------------------------------------------------

Exception #2 of 2: 1X Could not retrieve file "foo.txt" (in service2, \
src/service2/files.py:363)

Seen between 2013-01-09 15:08:41+00:00 to 2013-01-09 15:08:41+00:00\x20
- on host3, 1X

%s
[EOM]
""" % (VIEW_TRACEBACK, FILE_TRACEBACK)

ENVELOPE = dict(sender="nozzle@example.com", recipients=("a@example.com",),
                date=at("2013-01-09 15:09:00"), domain="nozzle1.example.com")


def renderer(template_dir=None, unique_tuple=UniqueMessage, **names):
    return DigestRenderer(unique_tuple, "nozzle1", 10000, template_dir,
                          **names)


def error(number, exc_text="trace", kind="app", sources=None, **fields):
    """An entry of one error numbered C{number}, from host h by default."""
    key = UniqueMessage("m", "f", "f.py", f"error {number}", "p.py", number,
                        exc_text, kind)._replace(**fields)
    return Entry(key, {"h": 1} if sources is None else sources, 0, 0)


#: Renders with the original failnozzle's subject.
ORIGINAL_SUBJECT = renderer(subject_template="subject-original.txt")


def write_template(testcase, text, name="body.txt"):
    """A new template directory holding C{text} as C{name}."""
    path = testcase.mktemp()
    os.makedirs(path)
    with open(os.path.join(path, name), "w") as out:
        out.write(text)
    return path


def body_bytes(body):
    """The bytes C{body} takes in a digest as it travels (CRLF line ends)."""
    payload = build_message(subject="", body=body, **ENVELOPE).get_payload()
    return len(payload) + payload.count("\n")


def not_listed(body):
    """The numbers of the "N more not listed" line: (instances, errors)."""
    [(instances, errors)] = re.findall(
        r"^(\d+)X in (\d+) more unique errors not listed", body, re.M)
    return int(instances), int(errors)


def summary_total(body):
    """The instances the Summary lines of the errors listed add up to."""
    summary = body.split("Summary:\n========\n", 1)[1].split("\n\n", 1)[0]
    return sum(int(count) for count in re.findall(
        r"^(\d+)X (?!in \d+ more unique errors)", summary, re.M))


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
        The subject names the server, how many errors there are and the
        first one: its exception (the last line of its traceback) and
        module, then the total.
        """
        subject, _ = renderer().render(EXAMPLE_BATCH)
        self.assertEqual(
            subject, "[nozzle1] 2 unique: SomeException: fail! in views "
                     "(5 total)")

    def test_subject_news(self):
        """
        With the news known, the subject leads with what matters most (new,
        else back, else ongoing) and its first error, then the others and
        the total, thousands separated.
        """
        first, second = EXAMPLE_BATCH.entries
        big = Batch((first, replace(second, sources={"h": 4206})))
        for kinds, expected in [
                (("new", "ongoing"), "1 new: SomeException: fail! in views "
                                     "(+1 ongoing, 4,210 total)"),
                (("back", "new"), "1 new: SomeException: fail! in views "
                                  "(+1 back, 4,210 total)"),
                (("ongoing", "back"), "1 back: SomeException: fail! in views "
                                      "(+1 ongoing, 4,210 total)"),
                (("ongoing", "ongoing"), "2 ongoing: SomeException: fail! in "
                                         "views (4,210 total)")]:
            statuses = {seen_key(entry): Status(kind, 0, 1)
                        for entry, kind in zip(big.entries, kinds)}
            subject, _ = renderer().render(big, statuses=statuses)
            self.assertEqual(subject, f"[nozzle1] {expected}")

    def test_subject_message(self):
        """
        Without a traceback the subject shows the message, shortened, and
        the kind when there is no module; with neither text, no headline.
        """
        long = error(1, message="disk full " * 20, exc_text=None, module=None)
        subject, _ = renderer().render(Batch((long,)))
        shown = ("disk full " * 9)[:89]
        self.assertEqual(subject, f"[nozzle1] 1 unique: {shown}"
                                  "\N{HORIZONTAL ELLIPSIS} in app (1 total)")
        subject, _ = renderer().render(Batch((), overflow=7))
        self.assertEqual(subject, "[nozzle1] 7 total")

    def test_original_subject(self):
        """
        EMAIL_SUBJECT_TEMPLATE = 'subject-original.txt' gives the original
        failnozzle's subject: server, totals and kinds.
        """
        subject, _ = renderer(subject_template="subject-original.txt").render(
            EXAMPLE_BATCH)
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
        exact.
        """
        entries = [Entry(UniqueMessage("m", "f", "f.py", f"error {n}", "p.py",
                                       n, "trace", f"app{n % 3}"),
                         {"h": 10 - n}, 0, 0) for n in range(5)]
        subject, body = DigestRenderer(UniqueMessage, "nozzle1", 10000,
                                       max_details=2).render(
            Batch.of(entries))
        self.assertEqual(
            subject, "[nozzle1] 5 unique: error 0 in m (40 total)")
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

    def test_context(self):
        """
        What the latest report said of where it happened (a Sentry
        event's release, environment, ...) is a line under its details.
        """
        entry = Entry(UniqueMessage("m", "f", "f.py", "oops", "p.py", 1,
                                    "trace", "app"), {"h": 2}, 0, 0, 3,
                      context=(("release", "shop@1.2.3"), ("user", "42")))
        _, body = renderer().render(Batch((entry,)))
        self.assertIn("Level: error (3)\nRelease: shop@1.2.3; User: 42\n"
                      "- on h, 2X\n", body)

    def test_unknown_source_and_kind(self):
        """
        A missing source or kind does not break the digest.
        """
        entry = Entry(UniqueMessage("m", "f", "f.py", "oops", "p.py", 1,
                                    "trace", None), {None: 2, "h": 1}, 0, 0)
        subject, body = renderer().render(Batch((entry,)))
        self.assertEqual(subject, "[nozzle1] 1 unique: oops in m (3 total)")
        self.assertIn("- on None, 2X\n- on h, 1X\n", body)

    def test_custom_unique_fields(self):
        """
        A UNIQUE_MSG_TUPLE without the default fields still renders with
        the built-in templates.
        """
        Custom = namedtuple("Custom", ["x", "y"])
        entry = Entry(Custom(1, 2), {"h": 1}, 0, 0)
        subject, body = renderer(unique_tuple=Custom).render(Batch((entry,)))
        self.assertEqual("[nozzle1] 1 unique: 1 (1 total)", subject)
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
        self.assertTrue(subject.startswith("[nozzle1] 2 unique:"), subject)

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

    def test_render_error_after_steps_falls_back(self):
        """
        A custom template that fails once it has rendered several steps'
        worth falls back the same way when the digest is made in steps.
        """
        path = self.template_dir()
        self.write(path, "body.txt",
                   "{% for i in range(5000) %}{{ i }}\n{% endfor %}"
                   "{{ total / 0 }}")
        making = renderer(path, body_template="body.txt").making(
            EXAMPLE_BATCH, sender="n@example.com",
            recipients=["ops@example.com"], date=0, domain="example.com")
        steps = 0
        while True:
            try:
                next(making)
            except StopIteration as done:
                message = done.value
                break
            steps += 1
        self.assertGreater(steps, 3)
        self.assertEqual(message.get_content(), EXAMPLE_BODY)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


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

    def test_nul_encoded(self):
        """
        A NUL, which 7bit may not carry (RFC 2045), makes the body
        quoted-printable.
        """
        raw, message = self.build(body="a\0b\n")
        self.assertEqual(message["Content-Transfer-Encoding"],
                         "quoted-printable")
        self.assertNotIn(b"\0", raw)
        self.assertEqual(message.get_content(), "a\0b\n")

    def test_wall_offset(self):
        """
        The Date header shows the reactor time shifted by the wall-clock
        offset given.
        """
        _, message = self.build(wall_offset=-60)
        self.assertEqual(message["Date"].datetime.timestamp(),
                         at("2013-01-09 15:08:00"))


class PagerMessageTests(SynchronousTestCase):
    """
    A page's words: the original's first, then what broke and where; and
    the "resolved" message.
    """

    page = Page(FIRING, 120, at=600, since=600, total=120, culprits=(
        Culprit("KeyError: 'user_17' in views", "shop", 80, new=True),
        Culprit("Timeout in db", None, 40)),
        hosts=(("web3", 70), ("web1", 50)))

    def test_firing(self):
        subject, body = pager_message("nozzle1", self.page, 5, 60, 100)
        self.assertEqual(subject, "nozzle1 error rate exceeded: 120 errors, "
                                  "most KeyError: 'user_17' in views")
        self.assertEqual(body, (
            "Danger: received 120 errors within the alert window (the last "
            "5 flushes of 60 s); PAGER_LIMIT is 100.\n"
            "\nTop errors in the window:\n"
            "  80X KeyError: 'user_17' in views (shop) [new]\n"
            "  40X Timeout in db\n"
            "\nHosts with the most:\n  web3: 70\n  web1: 50\n"))

    def test_fields_cannot_add_lines(self):
        """A sender's line breaks in a kind or a host name are spaces."""
        page = replace(self.page, culprits=(
            Culprit("boom", "shop\n  9999X forged", 80),),
            hosts=(("web3\n  db1: 5000", 70),))
        _, body = pager_message("nozzle1", page, 5, 60, 100)
        self.assertIn("  80X boom (shop 9999X forged)\n", body)
        self.assertIn("  web3 db1: 5000: 70\n", body)

    def test_kind_not_text(self):
        """A kind a record gave as a number is shown as one."""
        page = replace(self.page, culprits=(Culprit("boom", 5, 80),))
        _, body = pager_message("nozzle1", page, 5, 60, 100)
        self.assertIn("  80X boom (5)\n", body)

    def test_reminder(self):
        page = replace(self.page, what=REMINDER, at=4200, total=9000)
        subject, body = pager_message("nozzle1", page, 5, 60, 100,
                                      wall_offset=at("2013-01-09 15:00:00"))
        self.assertTrue(subject.startswith(
            "nozzle1 error rate exceeded (still, since 2013-01-09 15:10:00 "
            "UTC): 120 errors"), subject)
        self.assertIn("Over the limit since 2013-01-09 15:10:00 UTC, with "
                      "9,000 errors since then.\n", body)

    def test_resolved(self):
        page = Page(RESOLVED, 3, at=600 + 2 * 3600, since=600, total=9000)
        subject, body = pager_message("nozzle1", page, 1, 60, 100)
        self.assertEqual(subject, "nozzle1 error rate resolved: below 100 "
                                  "again after 2 hours, 9,000 errors")
        self.assertIn("Resolved: 3 errors within the alert window (the last "
                      "flush of 60 s), below PAGER_LIMIT (100)", body)
        self.assertIn("with 9,000 errors in all.\n", body)


class HeadlineTests(SynchronousTestCase):
    """What a page calls an error."""

    def test_traceback_last_line(self):
        self.assertEqual(headline_of({
            "message": "lookup failed", "module": "views",
            "exc_text": "Traceback (most recent call last):\n  File ...\n"
                        "KeyError: 'x'"}), "KeyError: 'x' in views")

    def test_one_line(self):
        self.assertEqual(headline_of({"message": "disk\nfull\r\n",
                                      "exc_text": None}), "disk full")

    def test_message_else_first_field(self):
        self.assertEqual(headline_of({"message": "disk full",
                                      "exc_text": None}), "disk full")
        self.assertEqual(headline_of({"message": None, "exc_text": "",
                                      "job": "nightly"}), "nightly")


class LayoutTests(SynchronousTestCase):
    """
    What the built-in body shows beyond the original's example.
    """

    def test_location_unknown(self):
        """
        Where a record gave no pathname or lineno, the headline says what
        is known and no "None".
        """
        entries = [error(1, pathname=None, lineno=None),
                   error(2, lineno=None),
                   error(3, kind=None, pathname=None)]
        entries = [Entry(entry.key, {"h": 3 - n}, 0, 0)
                   for n, entry in enumerate(entries)]
        _, body = renderer().render(Batch.of(entries))
        self.assertIn("Summary:\n========\n"
                      "3X error 1 (in app)\n"
                      "2X error 2 (in app, p.py)\n"
                      "1X error 3\n\n", body)
        self.assertNotIn("None", body)

    def test_fields_cannot_add_lines(self):
        """
        Line breaks and control characters a sender put in a message, a
        kind, a path or a host are shown as spaces in the lines the digest
        makes of them: they cannot forge a line of the summary or a host.
        """
        entry = Entry(error(1, message="boom\n9999X forged\r\n\x1b[2J",
                            kind="app\n\nDetails:", pathname="p.py\u2028x")
                      .key, {"web1\n- on db1, 5000X": 2}, 0, 0)
        _, body = renderer().render(Batch((entry,)))
        self.assertIn("Summary:\n========\n"
                      "2X boom 9999X forged [2J (in app Details:, p.py x:1)"
                      "\n\n",
                      body)
        self.assertIn("- on web1 - on db1, 5000X, 2X\n", body)
        self.assertNotIn("\n9999X", body)
        self.assertNotIn("\x1b", body)

    def test_other_sources(self):
        """
        Instances from hosts past MAX_SOURCES_PER_ERROR are one line after
        the named hosts, and the totals include them.
        """
        entry = Entry(error(1).key, {"web1": 1, "web2": 1}, 0, 0,
                      other_sources=998000)
        _, body = DigestRenderer(UniqueMessage, "nozzle1", 10000,
                                 max_sources=2).render(Batch((entry,)))
        self.assertIn("** 998002 instances of 1 unique error (app) **", body)
        self.assertIn(
            "- on web1, 1X\n- on web2, 1X\n"
            "- and 998000X on other hosts (only MAX_SOURCES_PER_ERROR = 2 "
            "are named)\n", body)

    def test_sources_capped_when_shown(self):
        """
        An error with more sources than MAX_SOURCES_PER_ERROR (a batch
        made with a larger cap) names the first ones and counts the rest.
        """
        sources = {f"web{n:03d}": 2 for n in range(150)}
        entry = Entry(error(1).key, sources, 0, 0)
        _, body = DigestRenderer(UniqueMessage, "nozzle1", 10000,
                                 max_sources=100).render(Batch((entry,)))
        self.assertEqual(body.count("\n- on web"), 100)
        self.assertIn("- on web099, 2X\n- and 100X on other hosts", body)
        self.assertNotIn("web100", body)
        self.assertIn("300X error 1", body)

    def test_wall_offset(self):
        """
        Times are shown shifted by the wall-clock offset given, for a
        reactor whose clock is not the wall clock.
        """
        _, body = renderer().render(EXAMPLE_BATCH, wall_offset=3600.5)
        self.assertIn("Seen between 2013-01-09 16:08:41 UTC to "
                      "2013-01-09 16:08:45 UTC\n", body)
        message = renderer().message(EXAMPLE_BATCH, wall_offset=3600,
                                     **ENVELOPE)
        self.assertIn("16:08:45 UTC\n", message.get_content())
        self.assertEqual(message["Date"].datetime.timestamp(),
                         ENVELOPE["date"] + 3600)

    def test_times_no_date_shows(self):
        """
        A time no date can show (NaN, far future) is clamped, not an error
        that costs the digest.
        """
        entry = Entry(error(1).key, {"h": 1}, float("nan"), 1e30)
        _, body = renderer().render(Batch((entry,)))
        self.assertIn("Seen between 1970-01-01 00:00:00 UTC to "
                      "9999-12-31 23:59:59 UTC\n", body)


class OriginalContextTests(SynchronousTestCase):
    """
    Templates written for the original failnozzle work unchanged: they get
    its whole context.
    """

    def test_original_templates(self):
        """
        The original's own subject and body templates render its example.
        """
        path = write_template(self, ORIGINAL_BODY_TEMPLATE,
                              "body-template.txt")
        with open(os.path.join(path, "subject-template.txt"), "w") as out:
            out.write(ORIGINAL_SUBJECT_TEMPLATE)
        subject, body = renderer(path).render(EXAMPLE_BATCH)
        self.assertEqual(
            subject, "nozzle1 errors: 5 total, 2 unique (service1, service2)")
        self.assertEqual(body, ORIGINAL_TEMPLATES_BODY)

    def test_names_and_methods(self):
        """
        What the original's context offered a template: kinds as a
        collection of strings, info.sources as a dict of source -> count
        (with the Python 2 methods and 0 for a missing source), the
        message as a namedtuple, first_seen and last_seen as datetimes.
        """
        path = write_template(self, (
            "{{ server_name }} {{ total }} {{ total_unique }} "
            "{{ sorted_counts | length }} {{ ', '.join(kinds) }} "
            "{{ kinds | length }}\n"
            "{% for message, info in sorted_counts %}"
            "{{ message._asdict()['kind'] }} {{ message[3] }} "
            "{{ message._fields | length }} {{ info.total }} "
            "{{ info.sources.items() | sort | list }} "
            "{{ info.sources.iteritems() | sort | list }} "
            "{{ info.sources['nowhere'] }} "
            "{{ info.sources.has_key('host3') }} "
            "{{ info.sources | length }} {{ info.sources.values() | sum }} "
            "{{ info.first_seen.strftime('%H:%M:%S') }} "
            "{{ (info.last_seen - info.first_seen).seconds }}\n"
            "{% endfor %}"))
        _, body = renderer(path, body_template="body.txt").render(
            EXAMPLE_BATCH)
        self.assertEqual(body.splitlines(), [
            "nozzle1 5 2 2 service1, service2 2",
            "service1 Exception in view: Traceback (most recent call last): "
            "8 4 [('host1', 1), ('host2', 3)] [('host1', 1), ('host2', 3)] "
            "0 False 2 4 15:08:41 4",
            'service2 Could not retrieve file "foo.txt" 8 1 [(\'host3\', 1)] '
            "[('host3', 1)] 0 True 1 1 15:08:41 0",
        ])

    def test_additions(self):
        """
        Beside the original's names, templates get the level, the
        instances from hosts not named and the ready kinds summary.
        """
        path = write_template(self, (
            "{{ kinds_summary }} {{ max_sources }}\n"
            "{% for message, info in sorted_counts %}"
            "{{ info.level }} {{ info.level_name }} {{ info.other_sources }} "
            "{{ info.total }}\n{% endfor %}"))
        entry = Entry(error(1).key, {"h": 2}, 0, 0, 3, other_sources=5)
        _, body = renderer(path, body_template="body.txt").render(
            Batch((entry,)))
        self.assertEqual(body, "app 100\n3 error 5 7\n")


class DetailsTests(SynchronousTestCase):
    """
    How many errors the templates list in full (DIGEST_MAX_DETAILS).
    """

    batch = Batch.of([Entry(error(n).key, {"h": 200 - n}, 0, 0)
                      for n in range(120)])

    def test_custom_template_gets_every_error(self):
        """
        A custom body template gets every kept error when
        DIGEST_MAX_DETAILS is not set.
        """
        path = write_template(
            self, "{{ sorted_counts | length }} {{ not_listed_unique }}")
        _, body = renderer(path, body_template="body.txt").render(self.batch)
        self.assertEqual(body, "120 0\n")

    def test_max_details_for_custom_template(self):
        """
        DIGEST_MAX_DETAILS, when set, limits a custom template too.
        """
        path = write_template(
            self, "{{ sorted_counts | length }} {{ not_listed_unique }} "
                  "{{ not_listed_total }} {{ max_details }}")
        _, body = renderer(path, body_template="body.txt",
                           max_details=5).render(self.batch)
        self.assertEqual(body, f"5 115 {sum(range(81, 196))} 5\n")

    def test_builtin_lists_100(self):
        """
        The built-in body lists 100 errors in full by default and counts
        the rest in one line, which does not claim DIGEST_MAX_DETAILS is
        set.
        """
        _, body = renderer().render(self.batch)
        self.assertIn("Exception #100 of 100: 101X error 99 ", body)
        self.assertIn(f"\n{sum(range(81, 101))}X in 20 more unique errors "
                      "not listed (DIGEST_MAX_DETAILS is not set: 100 are "
                      "listed)\n", body)

    def test_builtin_lists_100_when_set(self):
        """
        DIGEST_MAX_DETAILS = 100, when set, is named as set.
        """
        _, body = renderer(max_details=100).render(self.batch)
        self.assertIn("Exception #100 of 100: 101X error 99 ", body)
        self.assertIn("more unique errors not listed (DIGEST_MAX_DETAILS = "
                      "100)\n", body)

    def test_fallback_lists_100(self):
        """
        A custom template that fails falls back to the built-in one, which
        lists 100.
        """
        path = write_template(self, "{{ total / 0 }}")
        _, body = renderer(path, body_template="body.txt").render(self.batch)
        self.flushLoggedErrors(ZeroDivisionError)
        self.assertIn("Exception #100 of 100:", body)


class SubjectTests(SynchronousTestCase):
    """
    Subjects stay one readable line within SMTP's limits.
    """

    def test_kinds_cut(self):
        """
        The original's subject lists the kinds that fit and says how many
        more there are; the totals stay exact.
        """
        batch = Batch.of([error(n, kind=f"kind-{n:04d}") for n in range(2000)])
        subject, body = ORIGINAL_SUBJECT.render(batch)
        kinds = ", ".join(f"kind-{n:04d}" for n in range(8))
        self.assertEqual(subject, f"nozzle1 errors: 2000 total, 2000 unique "
                                  f"({kinds} +1992 more)")
        self.assertIn(f"** 2000 instances of 2000 unique errors ({kinds} "
                      "+1992 more) **", body)

    def test_long_kind(self):
        """
        A kind too long for the subject is shortened rather than left out.
        """
        batch = Batch.of([error(1, kind="k" * 5000), error(2, kind="z")])
        subject, _ = ORIGINAL_SUBJECT.render(batch)
        self.assertEqual(subject, "nozzle1 errors: 2 total, 2 unique "
                                  f"({'k' * 89}... +1 more)")

    def test_custom_subject_capped(self):
        """
        Whatever a custom subject template renders, the subject is one
        line of at most SUBJECT_MAX_CHARS.
        """
        path = write_template(self, "{{ ', '.join(kinds) }}\n" * 3,
                              "subject.txt")
        batch = Batch.of([error(n, kind=f"kind-{n}\nx" * 50)
                          for n in range(2000)])
        subject, _ = renderer(path, subject_template="subject.txt").render(
            batch)
        self.assertEqual(len(subject), SUBJECT_MAX_CHARS)
        self.assertTrue(subject.startswith("kind-0 xkind-0 x"), subject)
        self.assertTrue(subject.endswith(" ..."), subject)

    def test_encoded_words_literal(self):
        """
        An encoded word in a message is shown as it is, never decoded into
        the header, where its line break would start another header.
        """
        text = "=?utf-8?q?=0D=0ABcc:_evil@example.com?="
        subject, body = renderer().render(Batch((error(1, message=text),)))
        message = build_message(subject=subject, body=body, **ENVELOPE)
        raw = message.as_bytes()
        self.assertNotIn(b"\nBcc:", raw)
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        self.assertIsNone(parsed["Bcc"])
        self.assertEqual(parsed["Subject"].replace("\N{ZERO WIDTH SPACE}", ""),
                         f"[nozzle1] 1 unique: {text} in m (1 total)")

    def test_control_characters(self):
        """
        Control characters in a subject are replaced: a NUL would have a
        server refuse the digest.
        """
        subject, body = renderer().render(
            Batch((error(1, message="a\x00b\x1bc\x85d"),)))
        self.assertTrue(subject.endswith(": a?b?c d in m (1 total)"), subject)
        raw = build_message(subject=subject, body=body, **ENVELOPE).as_bytes()
        self.assertNotIn(b"\0", raw)


class SizeTests(SynchronousTestCase):
    """
    A digest always fits DIGEST_MAX_BYTES (or the smaller limit a server
    gives), as it travels, headers and transfer encoding included.
    """

    def message(self, batch, max_bytes, renderer=None, **envelope):
        envelope = dict(ENVELOPE, **envelope)
        message = (renderer or globals()["renderer"]()).message(
            batch, max_bytes=max_bytes, **envelope)
        raw = message.as_bytes()
        self.assertLessEqual(len(raw), max_bytes)
        return message, raw

    def test_fitting_digest_unchanged(self):
        """
        A digest within the limit is as it would be without one.
        """
        message, _ = self.message(EXAMPLE_BATCH, 2_000_000)
        self.assertEqual(message.get_content(), EXAMPLE_BODY)

    def test_long_traceback_cut(self):
        """
        A traceback too long for the limit keeps its head and its tail,
        whole lines around a marker saying how many characters are cut;
        the other errors are shown as they are.
        """
        frames = "".join(f'  File "app.py", line {n}, in f{n}\n    f()\n'
                         for n in range(100_000))
        traceback = ("Traceback (most recent call last):\n" + frames
                     + "ValueError: the end")
        batch = Batch.of([error(1, traceback, sources={"h": 5}),
                          error(2, FILE_TRACEBACK)])
        message, _ = self.message(batch, 200_000)
        body = message.get_content()
        shown = body.split("- on h, 5X\n\n", 1)[1].split(
            "\n------", 1)[0]
        self.assertTrue(shown.startswith(
            'Traceback (most recent call last):\n  File "app.py", line 0, '
            "in f0\n"), shown[:200])
        self.assertTrue(shown.endswith("    f()\nValueError: the end"))
        [(head, cut, tail)] = re.findall(
            r"(.*\n)\[\.\.\. (\d+) characters cut here to fit the digest's "
            r"size limit \.\.\.\]\n(.*)", shown, re.S)
        self.assertEqual(len(head) + int(cut) + len(tail), len(traceback))
        self.assertTrue(traceback.startswith(head))
        self.assertTrue(traceback.endswith("\n" + tail))
        self.assertIn("\n" + FILE_TRACEBACK + "\n", body)
        self.assertIn("** 6 instances of 2 unique errors (app) **", body)
        self.assertGreater(len(body), 150_000)

    def test_fewer_errors_listed(self):
        """
        When shortened tracebacks are still too many, fewer errors are
        listed in full; the totals and the "not listed" line stay exact.
        """
        batch = Batch.of([error(n, f"line {n}\n" * 3000,
                                sources={"h": 100 - n}) for n in range(50)])
        message, _ = self.message(batch, 60_000)
        body = message.get_content()
        instances, errors = not_listed(body)
        listed = body.count("\nException #")
        self.assertGreater(listed, 5)
        self.assertEqual(listed + errors, 50)
        self.assertEqual(summary_total(body) + instances, batch.total)
        self.assertIn("** 3775 instances of 50 unique errors (app) **", body)
        self.assertIn("errors not listed (to fit the digest's size limit)",
                      body)
        self.assertTrue(body.endswith("[EOM]\n"))

    def test_quoted_printable_growth(self):
        """
        Non-ASCII text, which grows threefold and more when encoded as
        quoted-printable, is measured as it travels.
        """
        batch = Batch.of([error(n, "Ärger ☃ 😀 = \t \n" * 20_000)
                          for n in range(3)])
        message, raw = self.message(batch, 300_000)
        self.assertEqual(message["Content-Transfer-Encoding"],
                         "quoted-printable")
        self.assertIn("characters cut here", message.get_content())
        self.assertGreater(len(raw), 250_000)

    def test_limit_per_call(self):
        """
        The limit is given with each digest, as a server's SIZE may lower
        it.
        """
        batch = Batch.of([error(n, "x" * 50_000) for n in range(10)])
        digests = renderer()
        _, large = self.message(batch, 400_000, digests)
        _, small = self.message(batch, 100_000, digests)
        self.assertGreater(len(large), 300_000)
        self.assertGreater(len(small), 75_000)

    def test_headers_counted(self):
        """
        Long headers (many recipients) leave less room to the body.
        """
        recipients = [f"someone.{n}@example.com" for n in range(100)]
        batch = Batch.of([error(n, "x" * 5000) for n in range(20)])
        message, _ = self.message(batch, 20_000, recipients=recipients)
        self.assertEqual(len(message["To"].addresses), 100)

    def test_render_bounds_body(self):
        """
        render's max_bytes bounds the body as it travels, whatever it
        holds: escapes, spaces at line ends, long lines, NUL.
        """
        chooser = random.Random(9)
        pieces = ["a", "=", " ", "\t", "\n", "Ä", "😀", "\0", "x" * 1200]
        batch = Batch.of([
            error(n, "".join(chooser.choices(pieces, k=10_000)))
            for n in range(20)])
        digests = renderer()
        for max_bytes in (3_000, 40_000, 250_000, 1_000_000):
            _, body = digests.render(batch, max_bytes=max_bytes)
            self.assertLessEqual(body_bytes(body), max_bytes)
            self.assertGreater(body_bytes(body), max_bytes * 0.8)

    def test_custom_template_cut_at_line(self):
        """
        A custom template that prints more than any shortening can spare
        has its body cut at a line, with a marker that says so.
        """
        path = write_template(
            self, "{% for n in range(20000) %}line {{ n }}\n{% endfor %}")
        message, _ = self.message(
            EXAMPLE_BATCH, 20_000, renderer(path, body_template="body.txt"))
        body = message.get_content()
        lines = body.splitlines()
        self.assertEqual(lines[:2], ["line 0", "line 1"])
        kept = len(lines) - 1
        self.assertEqual(lines[-2], f"line {kept - 1}")
        self.assertEqual(lines[-1], f"[... the rest of this digest "
                                    f"({20000 - kept} lines) is cut to fit "
                                    f"its size limit ...]")

    def test_one_huge_line(self):
        """
        Even one line larger than the limit is cut.
        """
        path = write_template(self, "{{ 'x' * 1000000 }}")
        message, _ = self.message(
            EXAMPLE_BATCH, 50_000, renderer(path, body_template="body.txt"))
        self.assertTrue(message.get_content().endswith(
            "x\n[... the rest of this digest (1 line) is cut to fit its size "
            "limit ...]\n"))

    def test_few_renders(self):
        """
        Fitting 2,000 errors takes a few renders, not one per error.
        """
        renders = []
        original = Template.render

        def counting(template, *args, **kwargs):
            renders.append(template)
            return original(template, *args, **kwargs)

        self.patch(Template, "render", counting)
        path = write_template(
            self, "{% for message, info in sorted_counts %}"
                  "{{ message.exc_text }}\n{% endfor %}")
        batch = Batch.of([error(n, f"{n}\n" * (2000 + n))
                          for n in range(2000)])
        self.message(batch, 100_000, renderer(path, body_template="body.txt"))
        self.assertLessEqual(len(renders), 10)
