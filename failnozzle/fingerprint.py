"""
Fingerprints: which error reports are one bug.

A report's fingerprint is made of its UNIQUE_MSG_TUPLE fields with what
varies from one instance of a bug to the next taken out: numbers, ids,
addresses, quoted values and times in the message; line numbers and the
exception's values in a traceback.  Reports with one fingerprint are one
entry in a digest, which shows the latest of them as it was sent.

Making a fingerprint costs microseconds (tens for a long traceback), so the
aggregator asks for one once per distinct report, never per datagram; the
caches here are for what recurs past its index (a traceback whose frames
are those of one already seen, a message already normalized).
"""
from __future__ import annotations

import hashlib
import re
from typing import Callable, NamedTuple, Optional, Sequence

import orjson
from twisted.logger import Logger

from failnozzle.textcap import cut_end

_log = Logger()

#: The placeholders of the built-in rules, by the name of their group in
#: L{_VARIABLE}: what a digest's reader may see in fingerprints' texts.
_PLACEHOLDERS = {
    "url": None,  # normalized piece by piece, see _normalized_url
    "email": "<email>",
    "uuid": "<uuid>",
    "time": "<time>",
    "ipv6": "<ip>",
    "ipv4": "<ip>",
    "hex": "<hex>",
    "squoted": "'<str>'",
    "dquoted": '"<str>"',
    "duration": "<duration>",
    "idpath": "<id>",
    "number": "<num>",
}

_HEX = "[0-9a-fA-F]"
_IPV6_GROUPS = rf"{_HEX}{{1,4}}(?::{_HEX}{{1,4}}){{0,7}}"

# One pass over a text finds every variable part: at each place the first
# alternative that matches wins, so the specific ones come first.  Every
# repetition a match may begin anywhere in is bounded, so a text costs time
# in proportion to its length, however it is made.
_VARIABLE = re.compile(rf"""
    (?P<url>\b[a-zA-Z][a-zA-Z0-9+.-]{{0,30}}://[^\s'"<>]+)
  | (?P<email>\b[\w.+-]{{1,64}}@
        [A-Za-z0-9-]{{1,63}}(?:\.[A-Za-z0-9-]{{1,63}}){{1,8}})
  | (?P<uuid>\b{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}\b)
  | (?P<time>
        \b\d{{4}}-\d{{2}}-\d{{2}}
            (?:[T\ ]\d{{2}}:\d{{2}}(?::\d{{2}}(?:[.,]\d+)?)?
               (?:\ ?(?:Z|UTC|[+-]\d{{2}}:?\d{{2}}))?)?\b
      | \b\d{{1,2}}/[A-Z][a-z]{{2}}/\d{{4}}:\d{{2}}:\d{{2}}:\d{{2}}
            (?:\ [+-]\d{{4}})?
      | \b\d{{1,2}}:\d{{2}}:\d{{2}}(?:[.,]\d+)?\b)
  | (?P<ipv6>(?<![\w:.])\[?
        (?=[0-9a-fA-F:]*:[0-9a-fA-F:]*[0-9a-fA-F])
        (?:{_HEX}{{1,4}}(?::{_HEX}{{1,4}}){{7}}
          | (?:{_IPV6_GROUPS})?::(?:{_IPV6_GROUPS})?)
        (?:%[\w.]+)?\]?(?::\d{{1,5}})?(?![\w:]))
  | (?P<ipv4>\b(?:\d{{1,3}}\.){{3}}\d{{1,3}}(?::\d{{1,5}})?\b)
  | (?P<hex>\b0[xX]{_HEX}+\b
      | \b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F]){_HEX}{{8,}}\b)
  | (?P<squoted>(?<!\w)'[^'\n]{{0,200}}'(?!\w))
  | (?P<dquoted>(?<!\w)"[^"\n]{{0,200}}"(?!\w))
  | (?P<duration>\b\d+(?:\.\d+)?\ ?
        (?:ns|us|µs|ms|s|secs?|seconds?|m|mins?|minutes?|h|hrs?|hours?)\b)
  | (?P<idpath>(?<=/)(?=[A-Za-z0-9_-]*\d)[A-Za-z0-9_-]{{6,}}(?=[/?\#\s]|$))
  | (?P<number>(?<![\w.])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w]))
""", re.VERBOSE)

#: Every variable part has one of these (but for an IPv6 address of
#: letters, as rare as a word of hex digits and colons).
_MAY_VARY = re.compile(r"[\d'\"@]")

#: What of a text is normalized, at most: its first characters, and that
#: many variable parts in them; the rest is kept as it is (the regular
#: expression costs about 0.3 µs a character, a replacement 1.5 µs).
_NORMALIZED_CHARS = 256
_MAX_REPLACEMENTS = 32

#: A directory of a path with a digit in its name: a version or a release
#: (C{/srv/app/releases/20261201/}, C{python3.11}), which a deploy changes.
_VERSIONED_DIRECTORY = re.compile(r"/[^/\d]*\d[^/]*(?=/)")

#: A URL's parts: its path segments and query values may vary, its
#: scheme, host and parameter names do not.
_URL_QUERY_VALUE = re.compile(r"(?<=[?&;=])([^=&;#]*)(?=[&;#]|$)")

#: What a traceback's lines are, as Python prints them (exception groups'
#: "| " margins included).
_TRACEBACK_START = "Traceback (most recent call last):"
_FRAME = re.compile(r'^[ |]*File "(?P<file>[^"]*)", line \d+'
                    r'(?:, in (?P<function>.*))?$')
_EXCEPTION = re.compile(r"^[ |]*(?P<type>[A-Za-z_][\w.]*)(?::|$)")
_MARGIN = re.compile(r"^[ |+\-]*")

#: A longer traceback is read at its ends only, this many lines each: the
#: first frames and the last, where it failed.
_TRACEBACK_END_LINES = 60

#: Example values of what varied, at most, per entry, and each's length.
MAX_EXAMPLES = 3
_EXAMPLE_CHARS = 40

#: The characters each cache holds at most (its texts and their results):
#: a flood of long new texts costs a few megabytes, not the length of one
#: times a number of entries.
_CACHE_CHARS = 1 << 20


#: How FINGERPRINT_FUNC's fingerprints begin, so a reload or a restart,
#: which makes the built-in ones anew, leaves them as they are.
_CUSTOM = "custom:"


#: What digest_of encodes with orjson: plain JSON types only, so that no
#: datetime, dataclass or subclass of str is taken for another value.
_PLAIN_JSON = (orjson.OPT_PASSTHROUGH_DATETIME
               | orjson.OPT_PASSTHROUGH_DATACLASS
               | orjson.OPT_PASSTHROUGH_SUBCLASS)


def digest_of(parts: object) -> str:
    """
    A short, stable name for what identifies a bug: 16 hex digits.  Made
    once per distinct report, so a flood of new ones pays it each time:
    parts are encoded by orjson (a microsecond for a kilobyte of traceback,
    where repr takes six), by repr what orjson refuses (a lone surrogate,
    a FINGERPRINT_FUNC's object).
    """
    try:
        text = orjson.dumps(parts, option=_PLAIN_JSON)
    except TypeError:
        text = repr(parts).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(text, digest_size=8).hexdigest()


def is_custom(fingerprint: Optional[str]) -> bool:
    """Whether FINGERPRINT_FUNC made this fingerprint."""
    return fingerprint is not None and fingerprint.startswith(_CUSTOM)


class _TextCache:
    """
    Results by the text they were made from, all forgotten at once when
    they would hold more than L{_CACHE_CHARS}: what recurs is found again
    at once, and what never recurs costs a bounded amount.
    """

    def __init__(self, longest: int) -> None:
        """
        @param longest: the most characters one text and its result may
            hold to be kept.
        """
        self._results: dict = {}
        self._chars = 0
        self._longest = longest

    def get(self, text: str):
        return self._results.get(text)

    def put(self, text: str, result: object, chars: int) -> None:
        """Keep C{result} for C{text}; C{chars}: what both hold."""
        if chars > self._longest:
            return
        if self._chars + chars > _CACHE_CHARS:
            self._results.clear()
            self._chars = 0
        self._results[text] = result
        self._chars += chars


class _Normalizer:
    """Replaces the variable parts of texts by placeholders."""

    def __init__(self, rules: Sequence[tuple] = ()) -> None:
        """
        @param rules: GROUPING_RULES, C{(pattern, replacement)} pairs
            applied first, in order, as C{re.sub} applies them.
        """
        self._rules = tuple((re.compile(pattern), replacement)
                            for pattern, replacement in rules)
        self._cache = _TextCache(longest=8192)

    def __call__(self, text: str) -> tuple:
        """C{(normalized text, the values replaced)}."""
        found = self._cache.get(text)
        if found is None:
            found = self._normalize(text)
            normalized, varied = found
            self._cache.put(text, found, len(text) + len(normalized)
                            + sum(map(len, varied)))
        return found

    def _normalize(self, text: str) -> tuple:
        for pattern, replacement in self._rules:
            text = pattern.sub(replacement, text)
        head, varied = _placeholders_in(text[:_NORMALIZED_CHARS])
        return head + text[_NORMALIZED_CHARS:], varied


def _placeholders_in(text: str) -> tuple:
    """
    C{(text with placeholders, the values replaced)}: what re.sub with
    L{_VARIABLE} would give, ten times as fast.  Every variable part has
    one of L{_MAY_VARY}'s characters, which C finds; the regular
    expression, slow at every place it tries, is only tried from the start
    of the word that holds one.
    """
    pieces: list = []
    varied: list = []
    done = 0
    while len(varied) < _MAX_REPLACEMENTS:
        candidate = _MAY_VARY.search(text, done)
        if candidate is None:
            break
        here = candidate.start()
        word = max(done, *(text.rfind(space, done, here) + 1
                           for space in " \t\n"))
        match = _VARIABLE.search(text, word)
        if match is None:
            break
        value = match.group()
        varied.append(value)
        pieces.append(text[done:match.start()])
        pieces.append(_normalized_url(value) if match.lastgroup == "url"
                      else _PLACEHOLDERS[match.lastgroup])
        done = match.end()
    if not pieces:
        return text, ()
    pieces.append(text[done:])
    return "".join(pieces), tuple(varied)


def _normalized_url(url: str) -> str:
    """A URL with its variable path segments and query values replaced."""
    base, question, query = url.partition("?")
    scheme, _, rest = base.partition("://")
    host, slash, path = rest.partition("/")
    path = _VARIABLE.sub(
        lambda match: _PLACEHOLDERS.get(match.lastgroup) or "<url>", path)
    if query:
        query = _URL_QUERY_VALUE.sub("<val>", query)
    return f"{scheme}://{host}{slash}{path}{question}{query}"


class _Traceback(NamedTuple):
    """A Python traceback as a fingerprint sees it."""

    #: Per exception, in order: its type and its frames (file, function).
    shape: tuple
    #: The last exception's line after its type, for examples.
    value: str


def _traceback_of(text: str) -> Optional[_Traceback]:
    """
    Read a traceback Python printed (chained exceptions and exception
    groups included), or None if C{text} holds none.
    """
    if _TRACEBACK_START not in text:
        return None
    shape: list = []
    frames: list = []
    value = ""
    after_frame = False
    lines = text.splitlines()
    if len(lines) > 2 * _TRACEBACK_END_LINES:
        lines = (lines[:_TRACEBACK_END_LINES]
                 + lines[-_TRACEBACK_END_LINES:])
    for line in lines:
        if after_frame:
            after_frame = False
            continue  # the frame's source line
        frame = _FRAME.match(line)
        if frame is not None:
            path = _VERSIONED_DIRECTORY.sub("/<v>", frame.group("file"))
            frames.append((path, frame.group("function")))
            after_frame = True
            continue
        if not frames:
            continue  # "Traceback ..." or a chain's separating sentence
        exception = _EXCEPTION.match(line)
        if exception is not None and not set(line.strip()) <= set("^~"):
            kind = exception.group("type")
            shape.append((kind, tuple(frames)))
            value = _MARGIN.sub("", line)[len(kind) + 1:].strip()
            frames = []
    if frames:  # cut short before its exception line
        shape.append((None, tuple(frames)))
    return _Traceback(tuple(shape), value)


class Grouping:
    """
    Makes fingerprints by the built-in rules (GROUPING = 'default'), or by
    the byte-identical fields (GROUPING = 'exact', the original's way).
    """

    def __init__(self, fields: Sequence[str], exact: bool = False,
                 rules: Sequence[tuple] = ()) -> None:
        """
        @param fields: UNIQUE_MSG_TUPLE's names, in the order of a key.
        @param rules: GROUPING_RULES, applied to texts before the built-in
            rules.
        """
        self._fields = tuple(fields)
        self._exact = exact
        self._normalize = _Normalizer(rules)
        # Long enough for any traceback's head (MAX_EXC_TEXT_CHARS).
        self._tracebacks = _TextCache(longest=_CACHE_CHARS // 16)

    def fingerprint(self, key: tuple, template: Optional[str] = None
                    ) -> Optional[str]:
        """
        The fingerprint of the report with this key; None with GROUPING =
        'exact' (the key is its own).

        @param template: the C{logging} format the message was made from
            (C{msg} before C{% args}), which names the bug better than the
            message does.
        """
        if self._exact:
            return None
        parts = []
        for name, field in zip(self._fields, key):
            if type(field) is not str or name == "lineno":
                parts.append(None if name == "lineno" else field)
            elif name == "message":
                parts.append(self._normalize(
                    field if template is None else template)[0])
            elif name == "exc_text":
                parts.append(self._text_shape(field)[0])
            else:
                parts.append(field)
        return digest_of(parts)

    def examples(self, key: tuple) -> tuple:
        """
        What varied in this report, as one short text: the values its
        message has where its fingerprint has placeholders, else those of
        its traceback's last exception.  Asked for only while an entry
        wants examples: it costs a message's normalization.
        """
        if self._exact:
            return ()
        fields = dict(zip(self._fields, key))
        message, exc_text = fields.get("message"), fields.get("exc_text")
        varied: tuple = ()
        if type(message) is str:
            varied = self._normalize(message)[1]
        if not varied and type(exc_text) is str:
            value = self._text_shape(exc_text)[1]
            if value:
                varied = self._normalize(value)[1]
        return _examples(varied)

    def _text_shape(self, text: str) -> tuple:
        """
        C{(shape, value)}: what identifies a traceback (a digest of its
        exception types and frames) and its last exception's value; for
        another text, the text normalized.

        A traceback's frames are read once: the text before its last line
        (the exception's, which holds the values that vary) is cached.
        """
        head, _, last = text.rstrip("\n").rpartition("\n")
        exception = _EXCEPTION.match(last)
        if exception is None or last.startswith(" ") or not head:
            return self._whole_shape(text)
        frames = self._tracebacks.get(head)
        if frames is None:
            traceback = _traceback_of(head)
            if (traceback is None or not traceback.shape
                    or traceback.shape[-1][0]):
                # Not one traceback whose last line is its exception's.
                return self._whole_shape(text)
            frames = digest_of(traceback.shape)
            self._tracebacks.put(head, frames, len(head))
        kind = exception.group("type")
        return f"{frames} {kind}", last[len(kind) + 1:].strip()

    def _whole_shape(self, text: str) -> tuple:
        traceback = _traceback_of(text)
        if traceback is None:
            return self._normalize(text)[0], ""
        return digest_of(traceback.shape), traceback.value


def _examples(varied: tuple) -> tuple:
    """What varied in one report, as one short example text."""
    if not varied:
        return ()
    return (cut_end(" ".join(varied), _EXAMPLE_CHARS),)


class CustomFingerprint:
    """
    FINGERPRINT_FUNC as the readers call it: the C{str} or C{tuple} it
    returns, made a digest.  None, or a failure, leaves the report to the
    built-in rules; the first failure is logged with its traceback, the
    others only counted (a broken hook is one mistake, not one a report).
    """

    def __init__(self, func: Callable[[dict], object]) -> None:
        self._func = func
        self.failures = 0

    def __call__(self, record: dict) -> Optional[str]:
        try:
            made = self._func(record)
            if made is not None and not isinstance(made, (str, tuple)):
                raise TypeError(f"it returned a {type(made).__name__}, not "
                                f"a str, a tuple or None")
        except Exception:
            self.failures += 1
            if self.failures == 1:
                _log.failure("FINGERPRINT_FUNC failed; this report and "
                             "those it fails on from now are grouped by "
                             "the built-in rules")
            return None
        return None if made is None else _CUSTOM + digest_of(made)
