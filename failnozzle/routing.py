"""
ROUTES: who gets which errors.  Each rule matches errors on their fields
(a string is a regular expression searched in the field, a list any of
several), their hosts (C{source}: only the instances from matching hosts
go), their level (at least this severe) or their fingerprint, and sends
them to its own recipients; the first rule that matches takes an error,
unless it says C{continue}, and what no rule matches goes to REPORT_TO.
Applied once per flush, to the batch's entries: never per datagram.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Pattern, Sequence

from failnozzle.levels import level_named

if TYPE_CHECKING:
    # Not at run time: the config reads ROUTES, and failnozzle-send reads
    # the config without Twisted, which the counts' module needs.
    from failnozzle.aggregate import Entry

#: What a match may name beside the fields of UNIQUE_MSG_TUPLE.
SPECIAL = ("source", "level", "fingerprint")
#: The keys a rule may have.
RULE_KEYS = ("name", "match", "to", "from", "reply_to", "repeat_seconds",
             "continue", "page")
#: Bounds on what one match may hold: each pattern is searched at every
#: flush (once per distinct value).
MAX_FIELDS = 20
MAX_PATTERNS = 20
MAX_PATTERN_CHARS = 1000
#: A record without a level is an error, as far as `level` matches.
_UNLEVELLED = 3


class BadRule(ValueError):
    """A rule that cannot be used; says why, naming the rule."""


@dataclass(frozen=True)
class Matcher:
    """
    What one rule's C{match} holds: every condition must.

    @ivar fields: C{(field, patterns)} on the fields of the key.
    @ivar sources: patterns on the hosts, or None.
    @ivar level: the least severe level matched, or None.
    @ivar fingerprints: patterns on the fingerprint, or None.
    """

    fields: tuple = ()
    sources: Optional[tuple] = None
    level: Optional[int] = None
    fingerprints: Optional[tuple] = None

    def names(self) -> tuple:
        """The key's fields it matches on."""
        return tuple(name for name, _ in self.fields)

    def select(self, left: list, fields: _FieldIndex) -> list:
        """
        C{(index, entry)} for each entry of C{left} (None: nothing left of
        it) that matches, the entry cut to its instances from matching
        hosts if C{sources} says.  A regular expression is searched once
        per distinct value, not per error: a flush's errors share most of
        their kinds, modules and hosts.

        @param fields: the batch's errors by the values of their fields.
        """
        positions = fields.positions
        if self.fields:
            if any(name not in positions for name, _ in self.fields):
                # A field the keys do not have (UNIQUE_MSG_TUPLE changed
                # since): nothing has it.
                return []
            # The field likely to have the fewest values first: it rules
            # out most, and its index is small to make.
            name, patterns = min(self.fields, key=_spread)
            chosen = fields.values(name)
            found = sorted(index for value in _found(patterns,
                                                     fields.texts(name))
                           for index in chosen[value]
                           if left[index] is not None)
            for other, patterns in self.fields:
                if other == name or not found:
                    continue
                at = positions[other]
                wanted = _found(patterns, _texts({
                    _typed(left[index].key[at]) for index in found}))
                found = [index for index in found
                         if _typed(left[index].key[at]) in wanted]
            selected = [(index, left[index]) for index in found]
        else:
            selected = [(index, entry) for index, entry in enumerate(left)
                        if entry is not None]
        if self.level is not None:
            selected = [item for item in selected if (
                _UNLEVELLED if item[1].level is None else item[1].level
            ) <= self.level]
        if self.fingerprints is not None:
            wanted = _found(self.fingerprints, _texts({
                _typed(entry.fingerprint) for _, entry in selected}))
            selected = [item for item in selected
                        if _typed(item[1].fingerprint) in wanted]
        if self.sources is None:
            return selected
        return _from_hosts(self.sources, selected)


def _from_hosts(patterns: tuple, selected: list) -> list:
    """
    The C{(index, entry)} of C{selected} with a host one of C{patterns} is
    found in, each cut to its instances from those hosts.
    """
    # Hosts are names, told apart by value alone; others (1, True) by
    # their types too.
    distinct = set().union(*(entry.sources for _, entry in selected))
    if any(type(source) is not str for source in distinct):
        distinct = {(type(source), source) for _, entry in selected
                    for source in entry.sources}
    else:
        distinct = {(str, source) for source in distinct}
    hosts = _found(patterns, _texts(distinct))
    if not hosts:
        return []
    # Each error whole, unless it has hosts not named (beyond
    # MAX_SOURCES_PER_ERROR), which cannot be known to match.
    everywhere = len(hosts) == len(distinct)
    named = {host for kind, host in hosts if kind is str}
    exact = len(named) < len(hosts)
    narrowed = []
    for index, entry in selected:
        if everywhere and not entry.other_sources:
            narrowed.append((index, entry))
            continue
        if exact:
            sources = {source: count for source, count
                       in entry.sources.items()
                       if (type(source), source) in hosts}
        else:
            sources = {source: count for source, count
                       in entry.sources.items() if source in named}
        if len(sources) == len(entry.sources) and not entry.other_sources:
            narrowed.append((index, entry))
        elif sources:
            narrowed.append((index, entry.with_sources(sources)))
    return narrowed


@dataclass(frozen=True)
class Rule:
    """One of ROUTES."""

    name: str
    match: Matcher
    to: tuple
    sender: Optional[str] = None
    reply_to: tuple = ()
    repeat_seconds: Optional[float] = None
    keep_going: bool = False
    #: Whether its errors' rate pages its own 'to' too.
    page: bool = False

    @property
    def kind(self) -> str:
        """Its digests' class (X-Failnozzle) and what is held for them."""
        return f"route:{self.name}"


def route(entries: Sequence[Entry], rules: Sequence[Rule],
          fields: Sequence[str]) -> tuple:
    """
    Split a batch's C{entries} by C{rules}: C{(routed, rest)}, the entries
    of each rule's kind that got some, and those no rule took.  An error
    whose hosts a rule took only some of goes on with the others.
    """
    if not rules:
        return {}, list(entries)
    by_field = _FieldIndex(entries, fields)
    # What is left of each error to route (None: nothing), and the hosts
    # of it that rules letting errors go on (continue) took, which are no
    # longer REPORT_TO's (True: all of it, hosts not named included).
    left: list = list(entries)
    covered: list = [None] * len(left)
    routed: dict = {}
    for rule in rules:
        selected = rule.match.select(left, by_field)
        if not selected:
            continue
        routed[rule.kind] = [entry for _, entry in selected]
        for index, matched in selected:
            if not rule.keep_going:
                left[index] = _without(left[index], matched.sources)
            elif matched is left[index]:
                covered[index] = True
            elif covered[index] is not True:
                covered[index] = (covered[index] or set()).union(
                    matched.sources)
    rest = []
    for entry, taken in zip(left, covered):
        if entry is not None and taken is not True:
            entry = _without(entry, taken) if taken else entry
            if entry is not None:
                rest.append(entry)
    return routed, rest


class _FieldIndex:
    """
    A batch's errors by the values of their fields, made for a field when
    a rule first asks: the indexes of the errors holding each value, and
    the values by the text patterns are searched in, made once for all the
    rules (ten silences on messages read 10,000 messages' texts once).

    @ivar positions: where each field is in a key.
    """

    def __init__(self, entries: Sequence[Entry],
                 fields: Sequence[str]) -> None:
        self._entries = entries
        self.positions = {name: at for at, name in enumerate(fields)}
        self._values: dict = {}
        self._texts: dict = {}

    def values(self, name: str) -> dict:
        """For field C{name}, the indexes of the errors holding each of its
        values (as L{_typed} gives them)."""
        found = self._values.get(name)
        if found is None:
            found = self._values[name] = {}
            position = self.positions[name]
            for index, entry in enumerate(self._entries):
                found.setdefault(_typed(entry.key[position]), []).append(
                    index)
        return found

    def texts(self, name: str) -> dict:
        """Field C{name}'s values by their texts (see L{_texts})."""
        found = self._texts.get(name)
        if found is None:
            found = self._texts[name] = _texts(self.values(name))
        return found


def _without(entry: Entry, hosts) -> Optional[Entry]:
    """What is left of C{entry} once a rule took its instances from
    C{hosts} (all of them if that is its own sources)."""
    if hosts is entry.sources:
        return None
    sources = {source: count for source, count in entry.sources.items()
               if source not in hosts}
    if not sources and not entry.other_sources:
        return None
    return entry.with_sources(sources, entry.other_sources)


#: The fields of a key by how many values a flush's errors usually have
#: of them, fewest first; any other after these.
_BY_SPREAD = ("kind", "level", "module", "filename", "funcName", "pathname",
              "lineno", "message", "exc_text")


def _spread(field: tuple) -> int:
    name = field[0]
    return (_BY_SPREAD.index(name) if name in _BY_SPREAD
            else len(_BY_SPREAD))


def _typed(value: object) -> tuple:
    """A value with its type: 1, 1.0 and True are equal, not one text."""
    return type(value), value


def _texts(values) -> dict:
    """
    C{values} (as L{_typed} gives them) by the text a pattern is searched
    in, C{str(value)}; None, in no text.
    """
    texts: dict = {}
    for typed in values:
        value = typed[1]
        if value is not None:
            texts.setdefault(value if type(value) is str else str(value),
                             []).append(typed)
    return texts


def _found(patterns: tuple, texts: dict) -> set:
    """The values of C{texts} (see L{_texts}) in whose text one of
    C{patterns} is found."""
    found: set = set()
    for pattern in patterns:
        # Searched from C, one call per text: a Python loop doubled it.
        for text in filter(pattern.search, texts):
            found.update(texts[text])
    return found


def parse_rules(setting: str, value: object, addresses, seconds) -> tuple:
    """
    The rules a ROUTES setting gives.

    @param addresses: checks and reads an address setting (name, value).
    @param seconds: checks and reads a duration (name, value).
    @raise BadRule: one cannot be used; the message names it (or what
        C{addresses} and C{seconds} raise).
    """
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise BadRule(f"{setting} must be a list of rules (dicts), not a "
                      f"{type(value).__name__}")
    rules = []
    for number, given in enumerate(value, 1):
        where = f"{setting}[{number - 1}]"
        check_keys(where, given, RULE_KEYS, "a rule")
        name = given.get("name", str(number))
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]{1,64}",
                                                         name):
            raise BadRule(f"{where}: its name must be 1 to 64 letters, "
                          f"digits, '_', '.' or '-', not {name!r}")
        where = f"{setting} rule {name!r}"
        if "to" not in given:
            raise BadRule(f"{where} has no 'to'")
        keep_going = given.get("continue", False)
        page = given.get("page", False)
        for flag, value in (("continue", keep_going), ("page", page)):
            if not isinstance(value, bool):
                raise BadRule(f"{where}: {flag!r} must be True or False")
        repeat = given.get("repeat_seconds")
        sender = given.get("from")
        to = addresses(f"{where} 'to'", given["to"])
        reply_to = addresses(f"{where} 'reply_to'", given.get("reply_to"))
        if sender is not None:
            sender = addresses(f"{where} 'from'", sender)
            if len(sender) != 1:
                raise BadRule(f"{where}: 'from' must be one address")
            [sender] = sender
        if repeat is not None:
            repeat = seconds(f"{where} 'repeat_seconds'", repeat)
        if not to:
            raise BadRule(f"{where}: 'to' names no address")
        rules.append(Rule(name, matcher_of(where, given.get("match")), to,
                          sender, reply_to, repeat, keep_going, page))
    names = [rule.name for rule in rules]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise BadRule(f"{setting}: two rules are named {twice[0]!r}")
    return tuple(rules)


def check_keys(where: str, given: object, keys: Sequence[str],
               what: str) -> None:
    """
    @raise BadRule: C{given} is not a dict, or has a key not in C{keys}
        (C{what} names what has them, such as "a rule").
    """
    if not isinstance(given, dict):
        raise BadRule(f"{where} must be a dict, not a "
                      f"{type(given).__name__}")
    unknown = sorted(map(str, set(given) - set(keys)))
    if unknown:
        raise BadRule(f"{where} has {', '.join(map(repr, unknown))}; "
                      f"{what} may have {', '.join(keys)}")


def matcher_of(where: str, given: object) -> Matcher:
    """
    A C{match} dict as a L{Matcher}.

    @raise BadRule: it cannot be used (C{where} names the rule).
    """
    if not isinstance(given, dict) or not given:
        raise BadRule(f"{where}: 'match' must be a dict of at least one "
                      f"field, such as {{'kind': 'billing'}}")
    if len(given) > MAX_FIELDS:
        raise BadRule(f"{where}: 'match' may hold at most {MAX_FIELDS} "
                      f"fields")
    fields, conditions = [], {}
    for name, wanted in given.items():
        if not isinstance(name, str):
            raise BadRule(f"{where}: match on {name!r}, not a field name")
        if name == "level":
            conditions["level"] = _level(where, wanted)
            continue
        patterns = _patterns(f"{where} {name!r}", wanted)
        if name == "source":
            conditions["sources"] = patterns
        elif name == "fingerprint":
            conditions["fingerprints"] = patterns
        else:
            fields.append((name, patterns))
    return Matcher(tuple(fields), **conditions)


def _level(where: str, wanted: object) -> int:
    level = level_named(wanted) if isinstance(wanted, str) else wanted
    if (not isinstance(level, int) or isinstance(level, bool)
            or not 0 <= level <= 7):
        raise BadRule(f"{where}: 'level' must be a syslog severity, 0 to 7 "
                      f"or a name such as 'error', not {wanted!r}")
    return level


def _patterns(where: str, wanted: object) -> tuple:
    texts = [wanted] if isinstance(wanted, str) else wanted
    if (not isinstance(texts, (list, tuple)) or not texts
            or not all(isinstance(text, str) for text in texts)):
        raise BadRule(f"{where}: a regular expression or a list of them, "
                      f"not {_shown(wanted)}")
    if len(texts) > MAX_PATTERNS or any(
            len(text) > MAX_PATTERN_CHARS for text in texts):
        raise BadRule(f"{where}: at most {MAX_PATTERNS} regular expressions "
                      f"of at most {MAX_PATTERN_CHARS} characters each")
    if "" in texts:
        raise BadRule(f"{where}: an empty regular expression matches "
                      f"everything; write '.*' if that is meant")
    compiled: list[Pattern] = []
    for text in texts:
        try:
            compiled.append(re.compile(text))
        except re.error as error:
            raise BadRule(f"{where}: {text!r} is not a regular expression: "
                          f"{error}") from None
    return tuple(compiled)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def unknown_fields(rules: Sequence[Rule], fields: Sequence[str]) -> list:
    """C{(rule, field)} for each field a rule matches on that a key does
    not have (it would never match)."""
    return [(rule.name, name) for rule in rules
            for name in rule.match.names() if name not in fields]
