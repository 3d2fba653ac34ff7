"""
Tests for L{failnozzle.silences}: SILENCES and silences added at run time,
their matching, their end, their file; and, through the service, errors
kept out of the mail and the pager but counted, and the digest's line.
"""
import json
import os

from twisted.internet.defer import succeed
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import Logger, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from failnozzle.aggregate import Entry
from failnozzle.routing import BadRule
from failnozzle.silences import Silences, config_silences, parse_silence
from tests.common import record
from tests.test_config import ConfigTestCase
from tests.test_service import ServiceTestCase
from tests.test_web import json_of, render

FIELDS = ("kind", "message")
UNTIL = "2027-01-31T00:00:00Z"
#: 2027-01-31T00:00:00Z in seconds since the epoch.
UNTIL_SECONDS = 1801353600.0


def entry(kind, message="boom", count=1):
    return Entry((kind, message), {"web1": count}, 1.0, 2.0)


def run_now(function, *args):
    return succeed(function(*args))


class SilenceTests(SynchronousTestCase):

    def silences(self, path=None):
        return Silences(path, run_now, Logger())

    def test_parse(self):
        silence = parse_silence("S", {"match": {"kind": "legacy"},
                                      "until": UNTIL, "comment": "OPS-12"},
                                "config", "c1")
        self.assertEqual((silence.until, silence.comment),
                         (UNTIL_SECONDS, "OPS-12"))
        self.assertEqual(silence.shown(3), {
            "id": "c1", "match": {"kind": "legacy"}, "until": UNTIL,
            "comment": "OPS-12", "origin": "config", "silenced": 3})

    def test_refused(self):
        for given, fragment in [
                ({"match": {"kind": "x"}}, "needs 'until'"),
                ({"match": {"kind": "x"}, "until": "tomorrow"},
                 "a time with its zone"),
                ({"match": {"kind": "x"}, "until": "2027-01-31T00:00:00"},
                 "a time with its zone"),
                ({"match": {}, "until": UNTIL}, "'match' must be"),
                ({"match": {"kind": "("}, "until": UNTIL},
                 "not a regular expression"),
                ({"match": {"kind": "x"}, "until": UNTIL, "why": "?"},
                 "has 'why'"),
                ({"match": {"kind": "x"}, "until": UNTIL, "comment": 3},
                 "'comment' must be")]:
            with self.subTest(given=given):
                error = self.assertRaises(BadRule, parse_silence, "S",
                                          given, "control")
                self.assertIn(fragment, str(error))

    def test_split_counts_and_ends(self):
        """
        A silence in force takes what it matches, counted; once over, it
        takes nothing, is logged once, and an added one is forgotten.
        """
        events = EventLoggingObserver.createWithCleanup(self,
                                                        globalLogPublisher)
        silences = self.silences()
        silences.configure(config_silences("SILENCES", [
            {"match": {"kind": "^legacy$"}, "until": 1000,
             "comment": "known"}]), None)
        added = silences.add({"match": {"message": "flaky"}, "until": 2000},
                             now=10, fields=FIELDS)
        silenced, rest = silences.split(
            [entry("legacy", count=3), entry("shop", "flaky test"),
             entry("shop")], FIELDS, now=10)
        configured = silences.all()[0].id
        self.assertTrue(configured.startswith("config-"))
        self.assertEqual([(s.id, len(found)) for s, found in silenced],
                         [(configured, 1), (added.id, 1)])
        self.assertEqual([e.key for e in rest], [("shop", "boom")])
        self.assertEqual(silences.silenced,
                         {configured: 3, added.id: 1})
        silenced, rest = silences.split([entry("legacy")], FIELDS, now=1500)
        self.assertEqual((silenced, len(rest)), ([], 1))
        silences.split([], FIELDS, now=2500)
        silences.split([], FIELDS, now=3000)
        over = [e for e in events if "is over" in e.get("log_format", "")]
        self.assertEqual([e["id"] for e in over], [configured, added.id])
        self.assertEqual([s.id for s in silences.all()], [configured])

    def test_added_kept_in_file(self):
        """Silences added at run time outlive a restart; a removed one
        does not; a broken file is set aside, not trusted."""
        path = self.mktemp()
        silences = self.silences(path)
        kept = silences.add({"match": {"kind": "a"}, "until": UNTIL,
                             "comment": "one"}, now=0, fields=FIELDS)
        gone = silences.add({"match": {"kind": "b"}, "until": UNTIL},
                            now=0, fields=FIELDS)
        silences.remove(gone.id)
        again = self.silences(path)
        again.load()
        self.assertEqual([(s.id, s.comment, s.until) for s in again.all()],
                         [(kept.id, "one", UNTIL_SECONDS)])
        with open(path, "w") as out:
            out.write('{"version": 1, "silences": [{"match": 3}]}')
        broken = self.silences(path)
        broken.load()
        self.assertEqual(broken.all(), [])
        self.assertFalse(os.path.exists(path))

    def test_added_for_a_while(self):
        """
        A silence added with 'for' ends that many seconds after the
        daemon's now; 'for' is refused with 'until', or not a number of
        seconds within 100 years.
        """
        silences = self.silences()
        added = silences.add({"match": {"kind": "a"}, "for": 7200},
                             now=UNTIL_SECONDS, fields=FIELDS)
        self.assertEqual(added.until, UNTIL_SECONDS + 7200)
        for end in ({"for": 60, "until": UNTIL}, {"for": 0}, {"for": -5},
                    {"for": "2h"}, {"for": True}, {"for": 1e300}):
            self.assertRaises(BadRule, silences.add, {
                "match": {"kind": "a"}, **end}, now=10, fields=FIELDS)

    def test_limits(self):
        silences = self.silences()
        self.assertRaises(BadRule, silences.add, {
            "match": {"kind": "a"}, "until": 5}, now=10, fields=FIELDS)
        # A field the keys lack, an empty pattern, too many patterns, one
        # too long, and 17 kB in all.
        for match in ({"nosuch": "x"}, {"kind": ""},
                      {"kind": ["x"] * 21}, {"kind": "x" * 1001},
                      {"kind": ["x" * 1000] * 17}):
            self.assertRaises(BadRule, silences.add, {
                "match": match, "until": UNTIL}, now=10, fields=FIELDS)
        self.assertRaises(KeyError, silences.remove, "nope")


class SilenceSettingsTests(ConfigTestCase):

    def test_refused_in_one_line(self):
        self.assertConfigError(
            "SILENCES = [{'match': {'kynd': 'x'}, 'until': 2e9}]\n",
            "SILENCES", "matches on 'kynd'")
        self.assertConfigError("SILENCES = [{'match': {'kind': 'x'}}]\n",
                               "SILENCES[0]", "needs 'until'")


class SilencedServiceTests(ServiceTestCase):
    """Silenced errors: counted, not mailed, not paged, told in a line."""

    def start_silenced(self, **overrides):
        self.start(SILENCES=[{"match": {"kind": "^legacy$"},
                              "until": 4e9, "comment": "known, OPS-12"}],
                   PAGER_TO="pager@example.com", PAGER_LIMIT=3,
                   PAGER_WINDOW_SIZE=1, **overrides)

    def test_kept_out_and_told(self):
        self.start_silenced()
        self.receive(*[record("cron failed", kind="legacy")] * 5,
                     record("boom"))
        self.reactor.advance(60)
        self.assertEqual(self.transport.by_kind("pager"), [])
        [(_, _, digest)] = self.transport.by_kind("digest")
        body = digest.get_content()
        self.assertNotIn("cron failed", body)
        self.assertIn("5 errors silenced by 1 rule: known, OPS-12\n[EOM]",
                      body)
        status = json_of(render(self.service, "/status"))
        self.assertEqual(status["silences"][0]["silenced"], 5)
        page = b"".join(render(self.service, "/").written).decode()
        self.assertIn("<code>kind=^legacy$</code> until", page)
        self.assertIn(": known, OPS-12</td><td class=\"count\">5</td>", page)

    def test_only_silenced_sends_nothing(self):
        self.start_silenced()
        self.receive(*[record("cron failed", kind="legacy")] * 5)
        self.reactor.advance(60)
        self.assertEqual(self.transport.pending, [])

    def test_added_at_run_time(self):
        """
        POST /api/silences/add silences a running daemon at once, GET
        /api/silences lists it, /api/silences/remove ends it.
        """
        self.start(HTTP_BIND=("127.0.0.1", 0))
        added = json_of(render(
            self.service, "/api/silences/add", method=b"POST",
            content_type="application/json", body=json.dumps({
                "match": {"message": "flaky"}, "until": UNTIL,
                "comment": "CI noise"}).encode()))["silence"]
        self.receive(record("flaky test"), record("boom"))
        self.reactor.advance(60)
        [(_, _, _, _)] = self.transport.pending
        body = self.transport.pending[0][2].get_content()
        self.assertNotIn("flaky test", body)
        self.assertIn("1 error silenced by 1 rule: CI noise", body)
        listed = json_of(render(self.service, "/api/silences"))
        self.assertEqual([item["id"] for item in listed["silences"]],
                         [added["id"]])
        removed = json_of(render(
            self.service, "/api/silences/remove", method=b"POST",
            content_type="application/json",
            body=json.dumps({"id": added["id"]}).encode()))
        self.assertEqual(removed, {"removed": added["id"]})
        refused = render(self.service, "/api/silences/add", method=b"POST",
                         content_type="application/json",
                         body=b'{"match": {"kind": "("}, "until": 1}')
        self.assertEqual(refused.responseCode, 400)
