"""
Tests for L{failnozzle.routing}: ROUTES read and checked, and a batch's
errors split by them.
"""
from twisted.trial.unittest import SynchronousTestCase

from failnozzle.aggregate import Entry
from failnozzle.routing import Rule, matcher_of, route
from tests.test_config import ConfigTestCase

FIELDS = ("kind", "message", "exc_text", "lineno")


def error(kind="shop", message="boom", sources=None, level=None,
          fingerprint=None, exc_text=None, lineno=12, other_sources=0):
    return Entry((kind, message, exc_text, lineno), sources or {"web1": 1},
                 1.0, 2.0, level, other_sources, fingerprint)


class MatchTests(SynchronousTestCase):
    """One rule's match."""

    def matches(self, match, entry):
        """The entry as a rule of C{match} takes it, or None."""
        routed, _ = route([entry], [Rule("t", matcher_of("test", match),
                                         ("t@example.com",))], FIELDS)
        [taken] = routed.get("route:t", [None])
        return taken

    def test_regular_expressions_searched(self):
        self.assertTrue(self.matches({"kind": "bill"}, error("billing")))
        self.assertFalse(self.matches({"kind": "^bill$"}, error("billing")))
        self.assertTrue(self.matches({"message": r"(?i)timeout"},
                                     error(message="DB Timeout after 3s")))
        self.assertTrue(self.matches({"lineno": r"^12$"}, error()))
        self.assertFalse(self.matches({"exc_text": "."}, error()))

    def test_list_is_any_and_keys_are_all(self):
        match = {"kind": ["shop", "cart"], "message": "boom"}
        self.assertTrue(self.matches(match, error("cart")))
        self.assertFalse(self.matches(match, error("cart", "bang")))
        self.assertFalse(self.matches(match, error("billing")))

    def test_level_at_least(self):
        """'level' is at least this severe; no level counts as error."""
        match = {"level": "error"}
        self.assertTrue(self.matches(match, error(level=2)))
        self.assertTrue(self.matches(match, error(level=3)))
        self.assertFalse(self.matches(match, error(level=4)))
        self.assertTrue(self.matches(match, error(level=None)))
        self.assertFalse(self.matches({"level": 2}, error(level=None)))

    def test_source_takes_its_hosts_only(self):
        """A source match takes only the instances from matching hosts."""
        entry = error(sources={"db1": 5, "web1": 3}, other_sources=2)
        taken = self.matches({"source": r"^db\d+"}, entry)
        self.assertEqual((taken.sources, taken.total), ({"db1": 5}, 5))
        self.assertIsNone(self.matches({"source": "^mail"}, entry))

    def test_source_matching_every_host(self):
        """
        A source pattern that every host matches takes each error whole,
        but for the instances from hosts beyond MAX_SOURCES_PER_ERROR,
        whose names are not kept.
        """
        whole = error("cart", sources={"db1": 5, "db2": 1})
        cut = error("shop", sources={"db1": 3}, other_sources=2)
        routed, rest = route([whole, cut], [Rule(
            "t", matcher_of("test", {"source": r"^db"}),
            ("t@example.com",))], FIELDS)
        self.assertIs(routed["route:t"][0], whole)
        self.assertEqual([(e.sources, e.total) for e in routed["route:t"]],
                         [({"db1": 5, "db2": 1}, 6), ({"db1": 3}, 3)])
        self.assertEqual([(e.sources, e.other_sources) for e in rest],
                         [({}, 2)])

    def test_equal_values_of_other_types(self):
        """1, 1.0 and True are equal in Python, not in a pattern's eyes."""
        self.assertTrue(self.matches({"lineno": "^True$"},
                                     error(lineno=True)))
        self.assertFalse(self.matches({"lineno": "^True$"}, error(lineno=1)))
        routed, _ = route(
            [error(sources={1: 1}), error("cart", sources={True: 1})],
            [Rule("t", matcher_of("test", {"source": "^True$"}),
                  ("t@example.com",))], FIELDS)
        self.assertEqual([e.key[0] for e in routed["route:t"]], ["cart"])

    def test_fingerprint(self):
        self.assertTrue(self.matches({"fingerprint": "^ab12"},
                                     error(fingerprint="ab12cd")))
        self.assertFalse(self.matches({"fingerprint": "^ab12"}, error()))


class RouteTests(ConfigTestCase):
    """The ladder: order, continue, the rest."""

    def rules(self, *given):
        settings, _ = self.load(f"ROUTES = {list(given)!r}\n"
                                f"UNIQUE_MSG_TUPLE = {list(FIELDS)!r}\n")
        return settings.ROUTES

    def split(self, rules, *entries):
        routed, rest = route(entries, rules, FIELDS)
        return ({kind: [(e.key[0], e.key[1], dict(e.sources))
                        for e in found] for kind, found in routed.items()},
                [(e.key[0], e.key[1], dict(e.sources)) for e in rest])

    def test_first_match_takes_it(self):
        rules = self.rules(
            {"match": {"kind": "billing"}, "to": "bill@example.com",
             "name": "billing"},
            {"match": {"message": "boom"}, "to": "all@example.com",
             "name": "booms"})
        self.assertEqual(self.split(rules, error("billing"), error("shop"),
                                    error("shop", "quiet")),
                         ({"route:billing": [("billing", "boom",
                                              {"web1": 1})],
                           "route:booms": [("shop", "boom", {"web1": 1})]},
                          [("shop", "quiet", {"web1": 1})]))

    def test_continue(self):
        """
        continue lets an error reach later rules too; one a continue rule
        took does not also go to REPORT_TO.
        """
        rules = self.rules(
            {"match": {"message": "(?i)timeout"}, "to": "sre@example.com",
             "name": "sre", "continue": True},
            {"match": {"kind": "billing"}, "to": "bill@example.com",
             "name": "billing"})
        routed, rest = self.split(rules, error("billing", "Timeout"),
                                  error("shop", "Timeout"))
        self.assertEqual(sorted(routed), ["route:billing", "route:sre"])
        self.assertEqual(len(routed["route:sre"]), 2)
        self.assertEqual(rest, [])

    def test_hosts_split(self):
        """The hosts a source rule did not take go on down the ladder."""
        rules = self.rules(
            {"match": {"source": "^db"}, "to": "dba@example.com",
             "name": "dba"})
        self.assertEqual(
            self.split(rules, error(sources={"db1": 2, "web1": 1})),
            ({"route:dba": [("shop", "boom", {"db1": 2})]},
             [("shop", "boom", {"web1": 1})]))

    def test_continue_with_hosts(self):
        """
        Hosts a continue rule took are not REPORT_TO's, whether it took
        some of an error's hosts or all of them before a later rule took
        some.
        """
        some = self.rules(
            {"match": {"source": "^db"}, "to": "dba@example.com",
             "name": "dba", "continue": True})
        self.assertEqual(
            self.split(some, error(sources={"db1": 2, "web1": 1})),
            ({"route:dba": [("shop", "boom", {"db1": 2})]},
             [("shop", "boom", {"web1": 1})]))
        whole_then_some = self.rules(
            {"match": {"kind": "shop"}, "to": "shop@example.com",
             "name": "shop", "continue": True},
            {"match": {"source": "^db"}, "to": "dba@example.com",
             "name": "dba"})
        routed, rest = self.split(whole_then_some,
                                  error(sources={"db1": 2, "web1": 1}))
        self.assertEqual(routed["route:dba"], [("shop", "boom", {"db1": 2})])
        self.assertEqual(rest, [])


class RuleSettingsTests(ConfigTestCase):
    """ROUTES refused in one line naming the rule."""

    def test_refused(self):
        for given, fragment in [
                ("{'match': {'kind': 'x'}}", "rule '1' has no 'to'"),
                ("{'match': {'kind': '('}, 'to': 'a@b.example'}",
                 "is not a regular expression"),
                ("{'match': {}, 'to': 'a@b.example'}", "'match' must be"),
                ("{'match': {'kynd': 'x'}, 'to': 'a@b.example'}",
                 "matches on 'kynd', which is not in UNIQUE_MSG_TUPLE"),
                ("{'match': {'kind': 'x'}, 'to': 'a@b.example', 'page': 1}",
                 "'page' must be True or False"),
                ("{'match': {'kind': 'x'}, 'to': 'a@b.example', 'pages': 1}",
                 "has 'pages'"),
                ("{'match': {'kind': 'x'}, 'to': 'nobody'}",
                 "'nobody' is not an email address"),
                ("{'match': {'level': 'loud'}, 'to': 'a@b.example'}",
                 "'level' must be"),
                ("{'match': {'kind': 'x'}, 'to': 'a@b.example', "
                 "'continue': 'yes'}", "'continue' must be"),
                ("{'match': {'kind': 3}, 'to': 'a@b.example'}",
                 "a regular expression or a list"),
                ("'billing'", "must be a dict")]:
            with self.subTest(given=given):
                self.assertConfigError(f"ROUTES = [{given}]\n", "ROUTES",
                                       fragment)

    def test_names_unique(self):
        rule = "{'name': 'a', 'match': {'kind': 'x'}, 'to': 'a@b.example'}"
        self.assertConfigError(f"ROUTES = [{rule}, {rule}]\n", "ROUTES",
                               "two rules are named 'a'")
