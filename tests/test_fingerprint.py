"""
Tests for L{failnozzle.fingerprint}: which reports are one bug.
"""
import datetime
import sys
import traceback
import tracemalloc
from unittest import SkipTest

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from failnozzle import aggregate
from failnozzle.aggregate import Aggregator, Batch, Entry, Report
from failnozzle.config import UniqueMessage
from failnozzle.fingerprint import (CustomFingerprint, Grouping, digest_of,
                                    is_custom)
from failnozzle.ingest import RecordReader
from tests import grouping_corpus

FIELDS = UniqueMessage._fields


def key(message="boom", exc_text=None, **fields):
    """A key of the default UNIQUE_MSG_TUPLE."""
    values = dict(module="shop.views", funcName="checkout",
                  filename="views.py", message=message,
                  pathname="shop/views.py", lineno=50, exc_text=exc_text,
                  kind="shop")
    values.update(fields)
    return tuple(values[name] for name in FIELDS)


def traceback_of(function, *args):
    try:
        function(*args)
    except Exception:
        return traceback.format_exc()
    raise AssertionError("it did not fail")


def normalized(text, rules=()):
    return Grouping(FIELDS, rules=rules)._normalize(text)[0]


class NormalizeTests(SynchronousTestCase):
    """
    The variable parts of a message become placeholders.
    """

    def assertNormalized(self, text, expected):
        self.assertEqual(normalized(text), expected)

    def test_numbers(self):
        self.assertNormalized("lookup failed for user 17 after 3.5 tries",
                              "lookup failed for user <num> after <num> "
                              "tries")

    def test_words_with_digits_kept(self):
        """db1, v2 and sha256 name things; they are not values."""
        self.assertNormalized("db1 v2 sha256", "db1 v2 sha256")

    def test_hex_and_addresses(self):
        self.assertNormalized(
            "<HTTPConnection object at 0x7f3a2c1b5d90>, id 8f14e45fceea",
            "<HTTPConnection object at <hex>>, id <hex>")

    def test_uuid(self):
        self.assertNormalized("order 123e4567-e89b-12d3-a456-426614174000",
                              "order <uuid>")

    def test_ip_addresses(self):
        self.assertNormalized(
            "from 10.0.0.1:5432, [::1]:80, fe80::1 and 2001:db8::8a2e:370",
            "from <ip>, <ip>, <ip> and <ip>")

    def test_email(self):
        self.assertNormalized("mail to bob.smith+x@mail.example.com bounced",
                              "mail to <email> bounced")

    def test_url(self):
        """A URL keeps its scheme, host, path and parameter names."""
        self.assertNormalized(
            "GET https://api.example.com/users/123/orders?id=5&q=abc failed",
            "GET https://api.example.com/users/<num>/orders?id=<val>&q=<val> "
            "failed")

    def test_paths(self):
        self.assertNormalized("Internal Server Error: /items/1/",
                              "Internal Server Error: /items/<num>/")
        self.assertNormalized("no route for /orders/AB17XYZ/",
                              "no route for /orders/<id>/")

    def test_quoted(self):
        self.assertNormalized("""KeyError: 'user_8812' in "foo.txt" """,
                              """KeyError: '<str>' in "<str>" """)

    def test_apostrophes_kept(self):
        """An apostrophe in a word opens no quoted value."""
        self.assertNormalized("can't reach 'db1': it isn't up",
                              "can't reach '<str>': it isn't up")

    def test_times(self):
        self.assertNormalized(
            "at 2026-12-02T04:23:32.5Z, 2026-12-02 04:23:32+01:00, "
            "02/Dec/2026:04:23:32 +0000 and 04:23:32",
            "at <time>, <time>, <time> and <time>")

    def test_durations(self):
        self.assertNormalized("Timeout after 30.21s, took 150ms, 2 hours",
                              "Timeout after <duration>, took <duration>, "
                              "<duration>")

    def test_rules_first(self):
        """GROUPING_RULES are applied before the built-in rules."""
        self.assertEqual(
            normalized("tenant acme-17 failed",
                       rules=[(r"tenant \S+", "tenant <tenant>")]),
            "tenant <tenant> failed")

    def test_long_text_bounded(self):
        """
        Only the start of a long text is normalized: what varies past it
        is kept (two such texts stay apart; none is slow to read).
        """
        head = "x" * 600
        self.assertEqual(normalized(f"1 {head} 2"), f"<num> {head} 2")

    def test_replacements_bounded(self):
        text = " ".join(["7"] * 40)
        self.assertEqual(normalized(text),
                         " ".join(["<num>"] * 32 + ["7"] * 8))


class TracebackTests(SynchronousTestCase):
    """
    A traceback is known by its exception types and frames, not by its line
    numbers or its exceptions' values.
    """

    def fingerprint(self, exc_text, **fields):
        return Grouping(FIELDS).fingerprint(key("failed", exc_text,
                                                **fields))

    def moved(self, blank_lines, name="checkout", filename="shop/views.py",
              error="ZeroDivisionError"):
        source = "\n" * blank_lines + (
            f"def {name}(cart):\n"
            f"    if cart == 'other':\n"
            f"        raise KeyError(cart)\n"
            f"    raise {error}(cart)\n")
        namespace = {}
        exec(compile(source, filename, "exec"), namespace)
        return traceback_of(namespace[name], f"cart {blank_lines}")

    def test_lines_moved(self):
        self.assertEqual(self.fingerprint(self.moved(1)),
                         self.fingerprint(self.moved(30)))

    def test_versioned_directories(self):
        """
        Directories named with digits (releases, Python's version) count
        as one; a long one costs no more than its length.
        """
        def frame(path):
            return (f'Traceback (most recent call last):\n  File "{path}", '
                    f'line 1, in f\n    x\nValueError: a\n')
        self.assertEqual(
            self.fingerprint(frame("/srv/app/20261201/python3.11/x.py")),
            self.fingerprint(frame("/srv/app/20261202/python3.12/x.py")))
        self.assertNotEqual(self.fingerprint(frame("/srv/app/x.py")),
                            self.fingerprint(frame("/srv/app/y.py")))
        hostile = frame("/" + "1" * 16000) + "extra"
        self.assertIsNotNone(self.fingerprint(hostile))

    def test_other_function(self):
        self.assertNotEqual(self.fingerprint(self.moved(1)),
                            self.fingerprint(self.moved(1, name="pay")))

    def test_other_file(self):
        self.assertNotEqual(
            self.fingerprint(self.moved(1)),
            self.fingerprint(self.moved(1, filename="shop/cart.py")))

    def test_other_exception(self):
        self.assertNotEqual(
            self.fingerprint(self.moved(1)),
            self.fingerprint(self.moved(1, error="ValueError")))

    def test_chained(self):
        """Each exception of a chain counts, with its frames."""
        def wrapped(error):
            try:
                {}["missing"]
            except KeyError:
                raise error("could not load")

        def caused(error):
            try:
                {}["missing"]
            except KeyError as cause:
                raise error("could not load") from cause

        self.assertIn("During handling", traceback_of(wrapped, RuntimeError))
        self.assertNotEqual(
            self.fingerprint(traceback_of(wrapped, RuntimeError)),
            self.fingerprint(traceback_of(wrapped, ValueError)))
        self.assertNotEqual(
            self.fingerprint(traceback_of(wrapped, RuntimeError)),
            self.fingerprint(traceback_of(caused, RuntimeError)))
        text = traceback_of(wrapped, RuntimeError)
        self.assertNotEqual(self.fingerprint(text),
                            self.fingerprint(text.replace("KeyError",
                                                          "IndexError")))

    def test_exception_group(self):
        def group(value):
            raise ExceptionGroup("many", [ValueError(value), KeyError(value)])

        if sys.version_info < (3, 11):
            raise SkipTest("exception groups came with Python 3.11")
        first, second = traceback_of(group, 1), traceback_of(group, 2)
        self.assertIn("| ValueError", first)
        self.assertEqual(self.fingerprint(first), self.fingerprint(second))

    def test_not_a_traceback(self):
        """Another text is normalized as a message is."""
        self.assertEqual(
            self.fingerprint("java.lang.NullPointerException at Foo.java:12"),
            self.fingerprint("java.lang.NullPointerException at Foo.java:40"))

    def test_cut_short(self):
        """A traceback cut before its exception line still groups."""
        text = self.moved(1)
        head = text.rstrip("\n").rpartition("\n")[0]
        self.assertEqual(self.fingerprint(head + "\n    more code"),
                         self.fingerprint(head.replace('line 4,', 'line 9,')
                                          + "\n    more code"))

    def test_values_are_examples(self):
        """The values of the exception are examples of what varied."""
        examples = Grouping(FIELDS).examples(
            key("failed", traceback_of(lambda: {}["user_8812"])))
        self.assertEqual(examples, ("'user_8812'",))


class GroupingTests(SynchronousTestCase):
    """
    Which fields make a fingerprint, and the settings that change it.
    """

    def test_fields_as_they_are(self):
        """Kind, module, function and path count as they are; lineno not."""
        grouping = Grouping(FIELDS)
        base = grouping.fingerprint(key())
        self.assertEqual(grouping.fingerprint(key(lineno=99)), base)
        for name in ("kind", "module", "funcName", "pathname", "filename"):
            with self.subTest(name=name):
                self.assertNotEqual(
                    grouping.fingerprint(key(**{name: "other"})), base)

    def test_caches_bounded_by_characters(self):
        """
        A flood of long new texts (a message and an exc_text that is no
        traceback, 4 kB each, each report new) leaves the caches holding a
        few megabytes, not 4,096 times their length; a text seen again
        gives the fingerprint it gave.
        """
        grouping = Grouping(FIELDS)
        first = key("lookup of item 1 failed " + "x" * 4000,
                    "SELECT 1 FROM items " + "y" * 4000)
        fingerprint = grouping.fingerprint(first)
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        for number in range(2, 3000):
            grouping.fingerprint(key(
                f"lookup of item {number} failed {'x' * 4000}",
                f"SELECT {number} FROM items {'y' * 4000}"))
        held, _ = tracemalloc.get_traced_memory()
        self.assertLess(held, 6_000_000)
        self.assertEqual(grouping.fingerprint(first), fingerprint)

    def test_template_preferred(self):
        """
        The format a logging message was made from stands for its
        message: what the arguments put in does not split the error.
        """
        grouping = Grouping(FIELDS)
        self.assertEqual(
            grouping.fingerprint(key("user bob failed"), "user %s failed"),
            grouping.fingerprint(key("user alice failed"), "user %s failed"))
        self.assertNotEqual(
            grouping.fingerprint(key("user bob failed")),
            grouping.fingerprint(key("user alice failed")))

    def test_exact(self):
        """GROUPING = 'exact': keys as they are, the original's way."""
        exact = Grouping(FIELDS, exact=True)
        self.assertIsNone(exact.fingerprint(key("user 17")))
        self.assertEqual(exact.examples(key("user 17")), ())

    def test_custom_fields(self):
        """Fields of a custom UNIQUE_MSG_TUPLE count as they are."""
        grouping = Grouping(("team", "message"))
        self.assertEqual(grouping.fingerprint(("a", "user 1")),
                         grouping.fingerprint(("a", "user 2")))
        self.assertNotEqual(grouping.fingerprint(("a", "user 1")),
                            grouping.fingerprint(("b", "user 1")))

    def test_digest_stable(self):
        """
        A fingerprint is the same in every run (it is saved): not Python's
        hash, which differs from run to run.
        """
        self.assertEqual(digest_of(("a",)), "2757634b7f53cf25")
        self.assertNotEqual(digest_of(("a", "b")), digest_of(("a b",)))

    def test_digest_of_anything(self):
        """
        What JSON cannot say (a lone surrogate, a huge integer, an object,
        a datetime) is digested too, and not as something else.
        """
        for odd, plain in [("\ud800", "\\ud800"), (2 ** 70, str(2 ** 70)),
                           (datetime.datetime(2020, 1, 1),
                            "2020-01-01T00:00:00")]:
            self.assertEqual(digest_of((odd,)), digest_of((odd,)))
            self.assertNotEqual(digest_of((odd,)), digest_of((plain,)))
        self.assertEqual(len(digest_of((Grouping,))), 16)


class CustomFingerprintTests(SynchronousTestCase):
    """
    FINGERPRINT_FUNC.
    """

    def test_str_and_tuple(self):
        custom = CustomFingerprint(lambda record: record.get("team"))
        made = custom({"team": "billing"})
        self.assertTrue(is_custom(made))
        self.assertEqual(made, custom({"team": "billing", "x": 1}))
        self.assertNotEqual(made, custom({"team": "search"}))
        self.assertTrue(is_custom(CustomFingerprint(
            lambda record: ("a", 1))({})))

    def test_none_is_built_in(self):
        self.assertIsNone(CustomFingerprint(lambda record: None)({}))

    def test_failure_logged_once(self):
        """
        A hook that fails leaves its reports to the built-in rules, and
        is logged once with its traceback.
        """
        events = EventLoggingObserver.createWithCleanup(
            self, globalLogPublisher)
        custom = CustomFingerprint(lambda record: record["missing"])
        self.assertIsNone(custom({}))
        self.assertIsNone(custom({}))
        wrong = CustomFingerprint(lambda record: 42)
        self.assertIsNone(wrong({}))
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)
        self.assertEqual(len(events), 2)

    def test_read_into_report(self):
        """The readers give the hook each record, whole."""
        reader = RecordReader(FIELDS, "source", 65536, fingerprint=(
            CustomFingerprint(lambda record: record["team"])))
        first = reader.read(b'{"message": "a", "team": "billing"}')
        second = reader.read(b'{"message": "b", "team": "billing"}')
        self.assertEqual(first.fingerprint, second.fingerprint)
        self.assertTrue(is_custom(first.fingerprint))


class FoldingTests(SynchronousTestCase):
    """
    The aggregator folds reports by their fingerprints, and each entry
    shows the latest report and what varied.
    """

    def setUp(self):
        self.clock = Clock()
        self.aggregator = Aggregator(
            100, self.clock, lambda count, error: key("bad input"),
            grouping=Grouping(FIELDS))

    def add(self, message, source="web1", **fields):
        self.aggregator.add(Report(key(message, **fields), source))

    def test_folded(self):
        for number in range(5):
            self.clock.advance(1)
            self.add(f"lookup failed for user {number}")
        self.add("lookup failed for user 4", source="web2")
        [entry] = self.aggregator.flush().entries
        self.assertEqual(entry.total, 6)
        self.assertEqual(dict(entry.sources), {"web1": 5, "web2": 1})
        self.assertEqual(entry.variants, 5)
        self.assertEqual(entry.examples, ("0", "1", "2"))
        self.assertEqual(entry.key, key("lookup failed for user 4"))
        self.assertEqual((entry.first_seen, entry.last_seen), (1, 5))

    def test_latest_shown(self):
        """The latest report is shown, whatever came before."""
        self.add("user 1", lineno=1)
        self.add("user 2", lineno=7)
        self.add("user 1", lineno=1)
        [entry] = self.aggregator.flush().entries
        self.assertEqual(entry.key, key("user 1", lineno=1))
        self.assertEqual(entry.variants, 2)

    def test_apart(self):
        self.add("lookup failed for user 1")
        self.add("update failed for user 1")
        self.assertEqual(len(self.aggregator.flush().entries), 2)

    def test_index_bounded(self):
        """
        Past INDEX_MAX distinct reports a flush period, reports are still
        folded, and their variants are no longer counted but said to be
        more.
        """
        self.patch(aggregate, "INDEX_MAX", 3)
        for number in range(6):
            self.add(f"user {number}")
        self.add("user 0")
        [entry] = self.aggregator.flush().entries
        self.assertEqual(entry.total, 7)
        self.assertEqual(entry.variants, 3)
        self.assertTrue(entry.more_variants)

    def test_overflow_remembered(self):
        """
        A report past MAX_UNIQUE_MESSAGES is counted in the overflow, its
        fingerprint made once.
        """
        made = []

        class Counted(Grouping):
            def fingerprint(self, key, template=None):
                made.append(key)
                return super().fingerprint(key, template)

        aggregator = Aggregator(1, self.clock, lambda count, error: key(),
                                grouping=Counted(FIELDS))
        aggregator.add(Report(key("one"), "web1"))
        for _ in range(3):
            aggregator.add(Report(key("two"), "web1"))
        batch = aggregator.flush()
        self.assertEqual((len(batch.entries), batch.overflow), (1, 3))
        self.assertEqual(len(made), 2)

    def test_fingerprints_remembered_across_flushes(self):
        """
        A report that recurs after a flush (a cluster node's push empties
        the buffer each second) is not fingerprinted again; one not seen
        before is; a reload's new grouping makes them anew; past
        FINGERPRINTS_MAX reports the memory starts again.
        """
        made = []

        class Counted(Grouping):
            def fingerprint(self, key, template=None):
                made.append(key[FIELDS.index("message")])
                return super().fingerprint(key, template)

        aggregator = Aggregator(100, self.clock, lambda count, error: key(),
                                grouping=Counted(FIELDS))
        for message in ["user 1", "user 2", "user 1"]:
            aggregator.add(Report(key(message), "web1"))
        aggregator.flush()
        for message in ["user 2", "user 1", "user 3"]:
            aggregator.add(Report(key(message), "web1"))
        [entry] = aggregator.flush().entries
        self.assertEqual((entry.total, entry.variants), (3, 3))
        self.assertEqual(made, ["user 1", "user 2", "user 3"])

        aggregator.configure(100, 100, lambda count, error: key(),
                             grouping=Counted(FIELDS))
        aggregator.add(Report(key("user 1"), "web1"))
        self.assertEqual(made[3:], ["user 1"])

        self.patch(aggregate, "FINGERPRINTS_MAX", 2)
        aggregator.flush()
        for message in ["user 4", "user 5", "user 1"]:
            aggregator.add(Report(key(message), "web1"))
        aggregator.flush()
        aggregator.add(Report(key("user 1"), "web1"))
        self.assertEqual(made[4:], ["user 4", "user 5", "user 1"])

    def test_remembered_with_template(self):
        """
        A report remembered without a logging template is fingerprinted
        anew when it comes with one: the template may fold it with others.
        """
        def report(message, template=None):
            return Report(key(message), "web1", template=template)

        self.aggregator.add(report("order 17 for alice failed: timeout"))
        self.aggregator.flush()
        template = "order %s for %s failed: %s"
        self.aggregator.add(report("order 17 for alice failed: timeout",
                                   template))
        self.aggregator.add(report("order 18 for bob failed: timeout",
                                   template))
        [entry] = self.aggregator.flush().entries
        self.assertEqual(entry.total, 2)

    def test_merged_variants(self):
        """
        Batches merged (a digest that waited) say as many variants as are
        sure: the same report counted in both is one.
        """
        def batch(message, variants=1):
            return Batch((Entry(key(message), {"web1": 1}, 1.0, 2.0,
                                fingerprint="f", variants=variants),))

        def merged(first, second):
            [entry] = first.merge(second, 10).entries
            return entry.variants, entry.more_variants

        self.assertEqual(merged(batch("user 1"), batch("user 1")), (1, False))
        self.assertEqual(merged(batch("user 1"), batch("user 2")), (2, False))
        self.assertEqual(merged(batch("user 1", 3), batch("user 2", 4)),
                         (4, True))

    def test_custom_not_indexed(self):
        """
        FINGERPRINT_FUNC sees every record: its fingerprint may depend on
        fields outside the key.
        """
        self.aggregator.add(Report(key(), "web1", fingerprint="custom:a"))
        self.aggregator.add(Report(key(), "web1", fingerprint="custom:b"))
        self.assertEqual(len(self.aggregator.flush().entries), 2)

    def test_format_kept_over_reload(self):
        """
        A reload that leaves the grouping as it was keeps fingerprints
        made from logging formats: the key alone would not make them.
        """
        def report(user):
            return Report(key(f"user {user} failed"), "web1",
                          template="user %s failed")

        self.aggregator.add(report("bob"))
        self.aggregator.configure(100, 100, lambda count, error: key(),
                                  grouping=Grouping(FIELDS), regroup=False)
        self.aggregator.add(report("alice"))
        [entry] = self.aggregator.flush().entries
        self.assertEqual(entry.total, 2)

    def test_restored_not_a_variant(self):
        """A report restored, then sent again, is not one more variant."""
        self.add("user 1")
        self.aggregator.restore(self.aggregator.flush())
        self.add("user 1")
        [entry] = self.aggregator.flush().entries
        self.assertEqual((entry.total, entry.variants), (2, 1))

    def test_regrouped_on_reload(self):
        """
        A reload to GROUPING = 'exact' splits what the buffer holds by key
        (the latest of each error); FINGERPRINT_FUNC's stay as they are.
        """
        self.add("user 1")
        self.add("user 2")
        self.aggregator.add(Report(key("x"), "web1", fingerprint="custom:a"))
        self.aggregator.configure(100, 100, lambda count, error: key(),
                                  grouping=Grouping(FIELDS, exact=True))
        entries = self.aggregator.flush().entries
        self.assertEqual(sorted(entry.fingerprint or "" for entry in entries),
                         ["", "custom:a"])
        self.assertEqual(sum(entry.total for entry in entries), 3)


class CorpusTests(SynchronousTestCase):
    """
    Real errors (tests/grouping_corpus.py): every case folds into one
    entry, and no two cases into one.
    """

    def setUp(self):
        self.reader = RecordReader(FIELDS, "source", 65536)
        self.grouping = Grouping(FIELDS)

    def fingerprint(self, datagram):
        report = self.reader.read(datagram)
        return self.grouping.fingerprint(report.key, report.template)

    def test_corpus(self):
        cases = dict(grouping_corpus.datagrams())
        self.assertGreaterEqual(len(cases), 30)
        digests = {}
        for name, datagrams in cases.items():
            with self.subTest(case=name):
                self.assertGreater(len(set(datagrams)), 1, "they vary")
                made = set(map(self.fingerprint, datagrams))
                self.assertEqual(len(made), 1)
                digests[name] = made.pop()
        self.assertEqual(len(set(digests.values())), len(cases))

    def test_corpus_digest(self):
        """Through the daemon's aggregator: one entry per case."""
        aggregator = Aggregator(100, Clock(), lambda count, error: key(),
                                grouping=self.grouping)
        cases = dict(grouping_corpus.datagrams())
        for datagrams in cases.values():
            for datagram in datagrams:
                aggregator.add(self.reader.read(datagram))
        entries = aggregator.flush().entries
        self.assertEqual(len(entries), len(cases))
        self.assertEqual({entry.total for entry in entries},
                         {len(grouping_corpus.VARIANTS)})
