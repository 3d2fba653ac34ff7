"""
Turning a L{Batch} into words: the subject and body of a digest (Jinja2
templates, overridable as in the original), the pager alert, and the email
message that carries them, always within the size a relay accepts.
"""
from __future__ import annotations

import bisect
import itertools
import os
import re
from datetime import datetime, timezone
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, make_msgid
from functools import cached_property
from typing import Mapping, NamedTuple, Optional, Sequence

from jinja2 import (ChoiceLoader, Environment, FileSystemLoader, Template,
                    TemplateError, TemplateNotFound)
from twisted.logger import Logger

from failnozzle.aggregate import Batch, Entry
from failnozzle.clock import LAST_SECOND
from failnozzle.config import ConfigError
from failnozzle.levels import SYSLOG_LEVELS
from failnozzle.pager import MISSED, REMINDER, RESOLVED, Page
from failnozzle.policy import BACK, NEW, ONGOING, Status, seen_key
from failnozzle.steps import Steps, finish
from failnozzle.textcap import cut_middle, one_line

_log = Logger()

DEFAULT_TEMPLATE_DIR = os.path.join(os.path.dirname(__file__), "templates")

#: The longest subject.  RFC 5322 allows 998 characters a line; a reader
#: takes in far fewer.
SUBJECT_MAX_CHARS = 200
#: The longest C{kinds_summary}, the list of kinds subjects show.
KINDS_SUMMARY_CHARS = 100
#: Errors the built-in body template lists in full if DIGEST_MAX_DETAILS is
#: not set (a custom template gets them all).
BUILTIN_MAX_DETAILS = 100
#: A text shortened to fit a digest keeps at least this many characters,
#: its head and its tail; if that is not enough, fewer errors are listed.
MIN_TEXT_CHARS = 2000
#: The head of a text its size in a message is estimated from.
_SAMPLE_CHARS = 4096
#: Renders tried for each way of shrinking a digest before the next way.
_ATTEMPTS = 3
#: The share of the size limit a shrunk digest is estimated to fill: a
#: little room for the estimate's error saves a render.
_AIM = 0.97
#: Room left for the Subject header when the body is sized before the
#: subject is known: 200 characters of 4 bytes take 1,323 bytes as encoded
#: words; the rest covers the transfer encoding's name and the Message-ID,
#: whose length varies.
_SUBJECT_ALLOWANCE = 2048
#: Pieces of a body template's output (a word to a line each) rendered in
#: one step: about a millisecond's worth.
_PIECES_PER_STEP = 1000
#: How much of what a subject template renders is read at all.
_SUBJECT_SCAN_CHARS = 10_000
#: Characters a header must not carry (line breaks are folded before).
_HEADER_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
#: The bytes quoted-printable leaves as they are (line ends aside).
_QP_SAFE = bytes(range(32, 127)).replace(b"=", b"") + b"\t\r\n"
#: The longest line SMTP carries (RFC 5321), CRLF aside.
_MAX_LINE_BYTES = 998

#: The line where a text is cut to fit, of the number of characters cut.
_TEXT_MARKER = ("[... {} characters cut here to fit the digest's size "
                "limit ...]")
_BODY_MARKER = ("[... the rest of this digest ({lines}) is cut to fit its "
                "size limit ...]\n")
#: What a text shortened to C{n} characters takes beyond C{n}, at most.
_MARKER_CHARS = len(_TEXT_MARKER.format(10 ** 20)) + 2


def utc(seconds: float) -> datetime:
    """
    A timestamp as an aware UTC datetime; one no date can show (out of
    range, NaN) is clamped, so an odd time cannot cost a digest.
    """
    if not 0 <= seconds <= LAST_SECOND:
        seconds = LAST_SECOND if seconds > LAST_SECOND else 0
    return datetime.fromtimestamp(seconds, timezone.utc)


def _format_utc(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


class SourceCounts(dict):
    """
    How often each named source sent one error.  The original's was a
    Python 2 C{defaultdict(int)}: its templates' C{iteritems()},
    C{has_key()} and missing sources (0) work here too.
    """

    def __missing__(self, source) -> int:
        return 0

    def iteritems(self):
        return iter(self.items())

    def iterkeys(self):
        return iter(self.keys())

    def itervalues(self):
        return iter(self.values())

    def has_key(self, source) -> bool:
        return source in self


class Occurrences:
    """
    How often, when and where one unique error happened: the C{info} of
    the original's templates (its MessageCounts), and more.

    @ivar total: every instance, those from other sources included.
    @ivar first_seen: the first instance, as an aware UTC datetime.
    @ivar last_seen: the last instance, likewise.
    @ivar other_sources: instances from sources past MAX_SOURCES_PER_ERROR,
        which are not named.
    @ivar level: the most severe syslog level seen (GELF sends one), or
        None.
    @ivar variants: how many distinct reports were folded into this error
        (1: one), and C{more_variants} whether there were more.
    @ivar examples: a few texts of what varied between them.
    @ivar context: what the latest report said of where it happened, name
        to text (a Sentry event's release, environment, user, url,
        transaction, tags), if anything.
    @ivar status: C{"new"}, C{"back"} or C{"ongoing"} (see
        L{failnozzle.policy}), or None if not known; C{since} when it was
        first seen, C{seen_total} its instances reported so far, this
        digest's included, and for one back C{quiet_for}, how long it had
        not been seen, as text (C{"3 days"}).
    """

    def __init__(self, entry: Entry, wall_offset: float = 0.0,
                 max_sources: Optional[int] = None,
                 status: Optional[Status] = None) -> None:
        """
        @param wall_offset: seconds to add to the entry's reactor times to
            get wall-clock times.
        @param max_sources: at most this many sources are named, the others
            counted in C{other_sources} (a batch made with a larger cap).
        """
        self.total = entry.total
        self.first_seen = utc(entry.first_seen + wall_offset)
        self.last_seen = utc(entry.last_seen + wall_offset)
        self.level = entry.level
        self.other_sources = entry.other_sources
        self.variants = entry.variants
        self.more_variants = entry.more_variants
        self.examples = entry.examples
        self.context = dict(entry.context)
        self.status = self.since = self.seen_total = self.quiet_for = None
        if status is not None:
            self.status = status.kind
            self.since = utc(status.since)
            self.seen_total = status.total
            self.quiet_for = duration(status.quiet) if status.quiet else None
        self._named = entry.sources
        if max_sources is not None and len(entry.sources) > max_sources:
            self._named = dict(itertools.islice(entry.sources.items(),
                                                max_sources))
            self.other_sources += (sum(entry.sources.values())
                                   - sum(self._named.values()))

    @cached_property
    def sources(self) -> SourceCounts:
        """The count of each source named, as the original's dict."""
        return SourceCounts(self._named)

    @cached_property
    def sources_sorted(self) -> list:
        """C{(source, count)} pairs in the order of the sources' names."""
        return sorted(self._named.items(), key=lambda item: str(item[0]))

    @property
    def level_name(self) -> Optional[str]:
        """The level as syslog names it ("error" for 3)."""
        return None if self.level is None else SYSLOG_LEVELS[self.level]


#: Still happening errors shown in a line each, at most, and the length of
#: their texts there.
MAX_STILL_HAPPENING = 100
_STILL_HAPPENING_CHARS = 200


def duration(seconds: float) -> str:
    """A time as a reader says it: C{"3 days"}, C{"5 hours"}."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{int(seconds)} seconds"


class Silenced(NamedTuple):
    """What silences kept out of a digest: its last line says so."""

    errors: int
    rules: int
    #: The silences' comments (their ids where they have none).
    comments: tuple


class Notice(NamedTuple):
    """
    What a digest says before anything its templates make, whatever they
    are: a node of a cluster sending digests of its own while Redis is
    unreachable.
    """

    #: Put before the subject, in parentheses.
    subject: str
    #: The body's first paragraph.
    body: str


def news_counts(statuses: Mapping[str, Status]) -> dict:
    """How many errors are new, back and ongoing: C{{"new": 3, ...}}."""
    counts = {kind: 0 for kind in (NEW, BACK, ONGOING)}
    for status in statuses.values():
        counts[status.kind] += 1
    return counts


def news_summary(counts: Mapping[str, int]) -> Optional[str]:
    """C{"3 new, 1 back, 12 ongoing"}: the parts that are not none."""
    return ", ".join(f"{count} {kind}" for kind, count in counts.items()
                     if count) or None


def _environment(loader) -> Environment:
    environment = Environment(loader=loader, autoescape=False)
    environment.filters["utc"] = _format_utc
    # A sender's line breaks must not make lines of the digest's own.
    environment.filters["one_line"] = lambda value: one_line(str(value))
    return environment


class DigestRenderer:
    """
    Renders digests with the configured templates, falling back to the
    built-in ones if a custom template fails on some batch, so a template
    bug costs a pretty digest, never the digest.
    """

    def __init__(
        self,
        unique_tuple: type,
        server_name: str,
        max_unique: int,
        template_dir: Optional[str] = None,
        subject_template: str = "subject-template.txt",
        body_template: str = "body-template.txt",
        max_details: Optional[int] = None,
        max_sources: int = 100,
    ) -> None:
        """
        @param max_details: how many errors the templates list in full
            (DIGEST_MAX_DETAILS); the rest are only counted.  None: a custom
            body template gets every error, the built-in one lists
            L{BUILTIN_MAX_DETAILS}, which keeps a digest of thousands of
            unique errors readable and quick to build.
        @param max_sources: MAX_SOURCES_PER_ERROR, the sources named per
            error.
        @raise ConfigError: a template cannot be found or does not compile.
        """
        self._unique_tuple = unique_tuple
        self._server_name = server_name
        self._max_unique = max_unique
        self._max_sources = max_sources
        fields = unique_tuple._fields
        self._kind_index = fields.index("kind") if "kind" in fields else None
        default_loader = FileSystemLoader(DEFAULT_TEMPLATE_DIR)
        loader = default_loader
        if template_dir is not None:
            loader = ChoiceLoader([FileSystemLoader(template_dir),
                                   default_loader])
        environment = _environment(loader)
        self._templates = (
            _load(environment, "EMAIL_SUBJECT_TEMPLATE", subject_template),
            _load(environment, "EMAIL_BODY_TEMPLATE", body_template),
        )
        builtin = _environment(default_loader)
        self._builtin_templates = (
            builtin.get_template("subject-template.txt"),
            builtin.get_template("body-template.txt"),
        )
        self._builtin_details = (BUILTIN_MAX_DETAILS if max_details is None
                                 else max_details)
        custom_body = not _same_file(self._templates[1],
                                     self._builtin_templates[1])
        self._details = (None if custom_body and max_details is None
                         else self._builtin_details)
        #: Why errors past that many are not listed, as a digest says it.
        self._details_reason = (
            f"DIGEST_MAX_DETAILS = {max_details}" if max_details is not None
            else f"DIGEST_MAX_DETAILS is not set: {BUILTIN_MAX_DETAILS} are "
                 f"listed")

    def render(self, batch: Batch, *, max_bytes: Optional[int] = None,
               wall_offset: float = 0.0,
               statuses: Optional[Mapping[str, Status]] = None,
               quiet: int = 0, silenced: Optional[Silenced] = None) -> tuple:
        """
        @param max_bytes: the most the body may take in a message (after
            its transfer encoding, with CRLF line ends), if bounded: long
            texts are shortened, then fewer errors listed, and as a last
            resort the body is cut at a line.
        @param wall_offset: seconds to add to the reactor's times to show
            wall-clock times (0: the reactor's clock is the wall clock).
        @param statuses: by L{failnozzle.policy.seen_key}, whether each
            error is new, back or ongoing, if known.
        @param quiet: how many of the batch's last errors are only still
            happening: counted in a line each, not listed in full.
        @param silenced: what silences kept out of it, if anything.
        @return: C{(subject, body)}; the subject is one line of at most
            L{SUBJECT_MAX_CHARS}.
        """
        return finish(self._rendering(batch, max_bytes, wall_offset,
                                      statuses, quiet, silenced))

    def _rendering(self, batch: Batch, max_bytes: Optional[int],
                   wall_offset: float,
                   statuses: Optional[Mapping[str, Status]],
                   quiet: int, silenced: Optional[Silenced] = None
                   ) -> Steps[tuple]:
        """L{render} in steps."""
        try:
            return (yield from self._render(self._templates, self._details,
                                            batch, max_bytes, wall_offset,
                                            statuses, quiet, silenced))
        except Exception:
            _log.failure("A custom digest template failed; this digest uses "
                         "the built-in templates")
            return (yield from self._render(
                self._builtin_templates, self._builtin_details, batch,
                max_bytes, wall_offset, statuses, quiet, silenced))

    def message(self, batch: Batch, *, max_bytes: Optional[int] = None,
                wall_offset: float = 0.0,
                statuses: Optional[Mapping[str, Status]] = None,
                quiet: int = 0, **envelope) -> EmailMessage:
        """
        The digest of C{batch} as a message, no larger than C{max_bytes} as
        it travels, headers included, if given.

        @param envelope: the other arguments of L{build_message}: sender,
            recipients, date, domain, and reply_to and kind if wanted.
        """
        return finish(self.making(batch, max_bytes=max_bytes,
                                  wall_offset=wall_offset, statuses=statuses,
                                  quiet=quiet, **envelope))

    def making(self, batch: Batch, *, max_bytes: Optional[int] = None,
               wall_offset: float = 0.0,
               statuses: Optional[Mapping[str, Status]] = None,
               quiet: int = 0, silenced: Optional[Silenced] = None,
               notice: Optional[Notice] = None,
               **envelope) -> Steps[EmailMessage]:
        """
        L{message} in steps (see L{failnozzle.steps}), so that the reactor
        takes its turns while a large digest is made.

        @param notice: what it says first, if anything.
        """
        budget = None
        if max_bytes is not None:
            headers = build_message(subject="", body="",
                                    wall_offset=wall_offset, **envelope)
            budget = max_bytes - len(headers.as_bytes()) - _SUBJECT_ALLOWANCE
        subject, body = yield from self._rendering(batch, budget, wall_offset,
                                                   statuses, quiet, silenced)
        if notice is not None:
            subject = subject_line(f"({notice.subject}) {subject}")
            body = f"{notice.body}\n\n{body}"
        yield
        # The outbox cuts what it offers if this is still too big (see
        # failnozzle.shrink): estimates of quoted-printable may be short.
        return build_message(subject=subject, body=body,
                             wall_offset=wall_offset, **envelope)

    def _render(self, templates: tuple, details: Optional[int],
                batch: Batch, max_bytes: Optional[int], wall_offset: float,
                statuses: Optional[Mapping[str, Status]],
                quiet: int, silenced: Optional[Silenced]) -> Steps[tuple]:
        subject_template, body_template = templates
        # Each of these walks every error of the batch: a step of its own.
        common = self._common(batch, details)
        counts = None if statuses is None else news_counts(statuses)
        common["news_counts"] = counts
        common["news_summary"] = counts and news_summary(counts)
        common["silenced"] = silenced
        listed = len(batch.entries) - quiet
        common.update(self._still_happening(
            batch.entries[listed:], wall_offset, statuses or {}))
        yield
        view = _DigestView(Batch(batch.entries[:listed], batch.overflow),
                           self._unique_tuple, common, details,
                           self._details_reason, self._max_sources,
                           wall_offset, statuses or {})
        yield
        # Only the head of what a subject template renders is read: texts
        # are cut to that length before it renders them.
        subject = subject_line(subject_template.render(
            view.context(view.listable, _SUBJECT_SCAN_CHARS)))
        return subject, (yield from view.body(body_template, max_bytes))

    def _still_happening(self, entries: Sequence[Entry], wall_offset: float,
                         statuses: Mapping[str, Status]) -> dict:
        """
        The names for the errors only still happening: C{still_happening},
        C{(message, info)} for the first L{MAX_STILL_HAPPENING} of them,
        their texts short, and C{still_happening_more} and
        C{still_happening_more_total} for the others.
        """
        shown = entries[:MAX_STILL_HAPPENING]
        return {
            "still_happening": [
                (_shortened_message(self._unique_tuple._make(entry.key),
                                    _STILL_HAPPENING_CHARS),
                 Occurrences(entry, wall_offset, self._max_sources,
                             statuses.get(seen_key(entry))))
                for entry in shown],
            "still_happening_more": len(entries) - len(shown),
            "still_happening_more_total": sum(
                entry.total for entry in entries[len(shown):]),
        }

    def _common(self, batch: Batch, details: Optional[int]) -> dict:
        """The names every template context has, however it is cut."""
        index = self._kind_index
        kinds = sorted({str(entry.key[index]) for entry in batch.entries
                        if entry.key[index] is not None}
                       if index is not None else ())
        return {
            "server_name": self._server_name,
            "total": batch.total,
            "total_unique": len(batch.entries),
            "kinds": kinds,
            "kinds_summary": _kinds_summary(kinds),
            "overflow": batch.overflow,
            "max_unique": self._max_unique,
            "max_details": details,
            "max_sources": self._max_sources,
        }


class _DigestView:
    """
    One batch as the templates see it, with a given number of errors
    listed in full and their texts shortened to a given length, and the
    search for the view whose body fits a size.
    """

    def __init__(self, batch: Batch, unique_tuple: type, common: dict,
                 details: Optional[int], details_reason: str,
                 max_sources: int, wall_offset: float,
                 statuses: Mapping[str, Status]) -> None:
        """
        @param details: how many errors may be listed, if not all.
        @param details_reason: why no more are, as the digest says it.
        """
        entries = batch.entries
        #: How many errors may be listed: all, or DIGEST_MAX_DETAILS.
        self.listable = (len(entries) if details is None
                         else min(details, len(entries)))
        self._common = common
        self._details_reason = details_reason
        self._unique = len(entries)
        self._messages = [unique_tuple._make(entry.key)
                          for entry in entries[:self.listable]]
        self._infos = [Occurrences(entry, wall_offset, max_sources,
                                   statuses.get(seen_key(entry))
                                   if statuses else None)
                       for entry in entries[:self.listable]]
        self._totals_before = [0, *itertools.accumulate(
            entry.total for entry in entries)]

    def context(self, listed: int, text_chars: Optional[int] = None) -> dict:
        """
        The names a template sees with the first C{listed} errors in full,
        their texts cut to about C{text_chars} characters if given.
        """
        messages = self._messages[:listed]
        if text_chars is not None:
            messages = [_shortened_message(message, text_chars)
                        for message in messages]
        not_listed = self._unique - listed
        reason = None
        if not_listed:
            reason = (self._details_reason if listed == self.listable
                      else "to fit the digest's size limit")
        return dict(
            self._common,
            sorted_counts=list(zip(messages, self._infos)),
            not_listed_unique=not_listed,
            not_listed_total=(self._totals_before[-1]
                              - self._totals_before[listed]),
            not_listed_reason=reason,
        )

    def body(self, template: Template, max_bytes: Optional[int]
             ) -> Steps[str]:
        """
        The body C{template} renders, within C{max_bytes} if given: the
        longest texts are shortened first (down to L{MIN_TEXT_CHARS}), then
        fewer errors are listed in full, and as a last resort the body is
        cut at a line.  Each way estimates from the last render and checks
        with the next, so a few renders are enough.
        """
        listed = self.listable
        if max_bytes is None:
            return (yield from _render_body(template, self.context(listed)))
        sizes = [[_text_size(value) for value in message
                  if type(value) is str] for message in self._messages]
        texts = [text for per_message in sizes for text in per_message]
        # Texts that take more in all than the limit cannot all be shown
        # whole: cutting them first spares rendering and measuring them.
        chars = _text_limit(texts, None, sum(length * ratio for length, ratio
                                             in texts) - max_bytes)
        body = yield from _render_body(template,
                                       self.context(listed, chars))
        size = _wire_size(body)
        if size <= max_bytes:
            return body
        # How far off the texts' estimated sizes are: a template may show a
        # text twice, or not at all.
        scale = 1.0
        for _ in range(_ATTEMPTS):
            shorter = _text_limit(texts, chars,
                                  (size - max_bytes * _AIM) / scale)
            if shorter is None:
                break
            estimate = _bytes_saved(texts, chars, shorter)
            body = yield from _render_body(template,
                                           self.context(listed, shorter))
            before, size = size, _wire_size(body)
            chars, scale = shorter, (before - size) / estimate
            if size <= max_bytes:
                return body
            if scale <= 0:
                break
        base = _wire_size((yield from _render_body(template,
                                                   self.context(0, chars))))
        weights = self._weights_before(chars, sizes)
        for _ in range(_ATTEMPTS):
            if not listed or size <= base:
                break
            bytes_per_weight = (size - base) / weights[listed]
            fitting = bisect.bisect_right(
                weights, (max_bytes * _AIM - base) / bytes_per_weight) - 1
            listed = max(0, min(fitting, listed - 1 - listed // 20))
            body = yield from _render_body(template,
                                           self.context(listed, chars))
            size = _wire_size(body)
            if size <= max_bytes:
                return body
        return _cut_at_line(body, max_bytes, size)

    def _weights_before(self, text_chars: Optional[int],
                        sizes: Sequence[list]) -> list:
        """
        For each number of errors listed, an estimate of what listing them
        costs: their texts (whose L{_text_size}s are C{sizes}), other
        values and their sources' names.
        """
        def weight(message, info, texts) -> float:
            shown = sum(_length_within(length, text_chars) * ratio
                        for length, ratio in texts)
            others = sum(len(str(value)) for value in message
                         if type(value) is not str)
            return shown + others + sum(len(str(source)) + 16
                                        for source in info._named) + 200
        return [0, *itertools.accumulate(map(
            weight, self._messages, self._infos, sizes))]


def _render_body(template: Template, context: dict) -> Steps[str]:
    """
    What C{template} renders from C{context}, ending with a line end, in
    steps of L{_PIECES_PER_STEP} pieces of its output.
    """
    rendering = template.generate(context)
    pieces: list = []
    while True:
        before = len(pieces)
        pieces.extend(itertools.islice(rendering, _PIECES_PER_STEP))
        if len(pieces) - before < _PIECES_PER_STEP:
            break
        yield
    body = "".join(pieces)
    return body if body.endswith("\n") else body + "\n"


def _text_size(text: str) -> tuple:
    """
    C{(length, bytes per character)} of a text, the bytes it takes in a
    message estimated from its head.
    """
    sample = text[:_SAMPLE_CHARS].encode("utf-8", "replace")
    escaped = (0 if sample.isascii()
               else 2 * len(sample.translate(None, _QP_SAFE)))
    ratio = ((len(sample) + escaped + sample.count(b"\n"))
             / max(min(len(text), _SAMPLE_CHARS), 1))
    return len(text), ratio


def _length_within(length: int, text_chars: Optional[int]) -> int:
    """The length of a text of C{length} once shortened to C{text_chars}."""
    if text_chars is None or length <= text_chars + _MARKER_CHARS:
        return length
    return text_chars + _MARKER_CHARS


def _bytes_saved(texts: Sequence[tuple], now: Optional[int],
                 shorter: int) -> float:
    """The bytes shortening C{texts} from C{now} to C{shorter} saves."""
    return sum((_length_within(length, now)
                - _length_within(length, shorter)) * ratio
               for length, ratio in texts)


def _text_limit(texts: Sequence[tuple], now: Optional[int],
                needed: float) -> Optional[int]:
    """
    The longest text length, below C{now} and at least L{MIN_TEXT_CHARS},
    that saves C{needed} bytes, shortening the longest texts first;
    L{MIN_TEXT_CHARS} if none saves that much; None if shortening saves
    nothing more.

    @param texts: C{(length, bytes per character)} of each text.
    """
    long_ones = [text for text in texts
                 if text[0] > MIN_TEXT_CHARS + _MARKER_CHARS]
    if needed <= 0 or not long_ones:
        return None
    most = _bytes_saved(long_ones, now, MIN_TEXT_CHARS)
    if most <= 0:
        return None
    low = MIN_TEXT_CHARS
    if most < needed:
        return low
    high = max(length for length, _ in long_ones) if now is None else now
    while high - low > 1:
        middle = (low + high) // 2
        if _bytes_saved(long_ones, now, middle) >= needed:
            low = middle
        else:
            high = middle
    return low


def _shortened_message(message: tuple, text_chars: int) -> tuple:
    """The message with its texts longer than C{text_chars} shortened."""
    cap = text_chars + _MARKER_CHARS
    changes = {name: cut_middle(value, cap, _TEXT_MARKER.format)
               for name, value in zip(message._fields, message)
               if type(value) is str and len(value) > cap}
    return message._replace(**changes) if changes else message


def _kinds_summary(kinds: Sequence[str],
                   width: int = KINDS_SUMMARY_CHARS) -> str:
    """
    The kinds, comma-separated, as many as fit in C{width} characters with
    a "+N more" saying how many did not; the first one is always shown, if
    need be shortened.
    """
    shown, text = 0, ""
    for kind in kinds:
        kind = " ".join(kind[:width + 1].split())
        rest = len(kinds) - shown - 1
        more = f" +{rest} more" if rest else ""
        joined = f"{text}, {kind}" if shown else kind
        if len(joined) + len(more) > width:
            break
        shown, text = shown + 1, joined
    else:
        return text
    if not shown:
        shown, text = 1, kind[:max(width - len(more) - 3, 1)] + "..."
    rest = len(kinds) - shown
    return f"{text} +{rest} more" if rest else text


def subject_line(text: str) -> str:
    """
    C{text} as a subject: one line (whitespace and line breaks folded,
    control characters replaced) of at most L{SUBJECT_MAX_CHARS}, a longer
    one cut with "...".
    """
    line = _HEADER_CONTROL.sub("?", " ".join(
        text[:_SUBJECT_SCAN_CHARS].split()))
    if len(line) > SUBJECT_MAX_CHARS or len(text) > _SUBJECT_SCAN_CHARS:
        line = line[:SUBJECT_MAX_CHARS - 4].rstrip() + " ..."
    return line


def _same_file(one: Template, other: Template) -> bool:
    return (os.path.realpath(one.filename or "")
            == os.path.realpath(other.filename or ""))


def _load(environment: Environment, setting: str, name: str):
    try:
        return environment.get_template(name)
    except TemplateNotFound:
        raise ConfigError(f"{setting}: template {name!r} not found") from None
    except (OSError, UnicodeDecodeError) as error:
        # Unreadable, or not UTF-8 (a Latin-1 template of the original's
        # days): Jinja2 lets these through.
        raise ConfigError(f"{setting}: cannot read template {name!r}: "
                          f"{getattr(error, 'strerror', None) or error}"
                          ) from None
    except TemplateError as error:
        line = getattr(error, "lineno", None)
        where = f" line {line}" if line else ""
        raise ConfigError(f"{setting}: template {name!r}{where}: "
                          f"{error}") from None


def headline_of(message: Mapping) -> str:
    """
    An error in one line, as the default subject names it: the last line of
    its traceback, else its message, else its first field that says
    anything, and its module; C{message} maps the UNIQUE_MSG_TUPLE fields
    to the values.
    """
    trace = str(message.get("exc_text") or "")
    text = str(message.get("message") or "")
    if "Traceback (most recent call last)" in trace or not text.strip():
        text = (trace.strip().splitlines() or [text])[-1]
    if not text.strip():
        text = next((str(value) for value in message.values()
                     if value is not None and str(value)), "")
    module = message.get("module")
    if module and str(module) != text:
        text += f" in {module}"
    return cut_middle(one_line(text), 120)


def pager_message(server_name: str, page: Page, window_size: int,
                  flush_seconds: float, limit: int,
                  wall_offset: float = 0.0) -> tuple:
    """
    The subject and body of a page (see L{failnozzle.pager}): the
    original's words first ("error rate exceeded", "Danger: received ..."),
    which mail filters may know, then what broke and where; or, once it is
    over, since when and how many in all.
    """
    window = (f"the last {window_size} flushes of {flush_seconds:g} s"
              if window_size > 1 else f"the last flush of {flush_seconds:g} s")
    since = _format_utc(utc(page.since + wall_offset))
    if page.what == RESOLVED:
        lasted = duration(max(0.0, page.at - page.since))
        subject = (f"{server_name} error rate resolved: below {limit:,} "
                   f"again after {lasted}, {page.total:,} errors")
        body = (f"Resolved: {page.window_total:,} errors within the alert "
                f"window ({window}), below PAGER_LIMIT ({limit:,}) for all "
                f"of it.\nThe rate was over the limit from {since} for "
                f"{lasted}, with {page.total:,} errors in all.\n")
        return subject, body
    subject = f"{server_name} error rate exceeded"
    if page.what == REMINDER:
        subject += f" (still, since {since})"
    subject += f": {page.window_total:,} errors"
    if page.culprits:
        subject += f", most {page.culprits[0].headline}"
    body = (f"Danger: received {page.window_total:,} errors within the "
            f"alert window ({window}); PAGER_LIMIT is {limit:,}.\n")
    if page.what == REMINDER:
        body += (f"Over the limit since {since}, with {page.total:,} "
                 f"errors since then.\n")
    if page.culprits:
        body += "\nTop errors in the window:\n" + "".join(
            f"  {culprit.count:,}X {culprit.headline}"
            f"{f' ({one_line(str(culprit.kind))})' if culprit.kind else ''}"
            f"{' [new]' if culprit.new else ''}\n"
            for culprit in page.culprits)
    if page.hosts:
        body += "\nHosts with the most:\n" + "".join(
            f"  {one_line(str(host))}: {count:,}\n"
            for host, count in page.hosts)
    return subject, body


def canary_message(server_name: str, what: str, last_seen: float,
                   now: float, max_silence: float) -> tuple:
    """
    The subject and body of a page that the canaries stopped coming
    (L{failnozzle.pager.MISSED}), or that they are back; times are
    wall-clock.
    """
    since = _format_utc(utc(last_seen))
    silent = duration(max(0.0, now - last_seen))
    if what == MISSED:
        return (f"{server_name}: no canary since {since}: the error "
                f"pipeline may be broken",
                f"failnozzle has received no \"just monitoring\" canary "
                f"error for {silent} (CANARY_MAX_SILENCE_SECONDS = "
                f"{max_silence:g}).\nThe applications that send them, the "
                f"network between, or failnozzle's input may be broken: "
                f"errors may be going unreported.\n")
    return (f"{server_name}: canaries are back",
            f"A canary error arrived again; the last one before it came at "
            f"{since}.\n")


def build_message(
    *,
    sender: str,
    recipients: Sequence[str],
    subject: str,
    body: str,
    date: float,
    domain: str,
    reply_to: Sequence[str] = (),
    kind: str = "digest",
    wall_offset: float = 0.0,
) -> EmailMessage:
    """
    A well-formed UTF-8 text/plain message.

    @param subject: shown as it is, as one line (see L{subject_line}).
    @param date: the reactor time the message is made at.
    @param domain: the right-hand side of the Message-ID (SERVER_NAME).
    @param kind: says what the message is in an X-Failnozzle header, for
        mail filters: digest, monitoring or pager.
    @param wall_offset: seconds to add to C{date} to get the wall-clock
        time the Date header shows.
    """
    message = EmailMessage(policy=SMTP)
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    if reply_to:
        message["Reply-To"] = ", ".join(reply_to)
    message["Subject"] = _literal(_encodable(subject_line(subject)))
    message["Date"] = formatdate(date + wall_offset, usegmt=True)
    message["Message-ID"] = make_msgid(domain=domain)
    message["X-Failnozzle"] = kind
    _set_body(message, body)
    return message


def _set_body(message: EmailMessage, body: str) -> None:
    body = _encodable(body)
    message.set_content(body, charset="utf-8", cte=_transfer_encoding(body))


def _literal(text: str) -> str:
    """
    C{text} as a header shows it to the letter: the email package decodes
    RFC 2047 encoded words ("=?utf-8?q?...?=") in the values it is given,
    which would let an error's kind or message put a line break, and so
    another header, into a subject.  A zero-width space keeps them apart.
    """
    return text.replace("=?", "=\N{ZERO WIDTH SPACE}?")


def _encodable(text: str) -> str:
    """
    The text with what UTF-8 cannot encode (lone surrogates, which JSON's
    "\\udcff" escapes give) replaced, so one odd error report cannot keep
    a whole digest from being sent.
    """
    return text.encode("utf-8", "replace").decode("utf-8")


def _seven_bit(data: bytes, lines: Sequence[bytes]) -> bool:
    """
    Whether a body travels as it is: ASCII, no NUL (RFC 2045) and no line
    longer than SMTP allows.
    """
    return (data.isascii() and b"\0" not in data
            and max(map(len, lines), default=0) <= _MAX_LINE_BYTES)


def _transfer_encoding(body: str) -> str:
    """
    Plain text stays readable as it is (7bit) whenever SMTP allows it, and
    is quoted-printable otherwise.
    """
    data = body.encode("utf-8")
    return ("7bit" if _seven_bit(data, data.splitlines())
            else "quoted-printable")


def _wire_size(body: str) -> int:
    """
    The bytes C{body} takes in a message, after its transfer encoding and
    with CRLF line ends: exactly for 7bit, at least as many for
    quoted-printable (escapes, soft line breaks every 75 characters at
    worst, a quoted space or tab at the end of a line).
    """
    data = body.encode("utf-8", "replace")
    lines = data.splitlines()
    if _seven_bit(data, lines):
        return sum(map(len, lines)) + 2 * max(len(lines), 1)
    size = 2
    for line in lines:
        encoded = len(line) + 2 * len(line.translate(None, _QP_SAFE))
        if line[-1:] in (b" ", b"\t"):
            encoded += 5
        if encoded > 78:
            encoded += 3 * -(-(encoded - 78) // 75)
        size += encoded + 2
    return size


def _cut_at_line(body: str, max_bytes: int, size: int) -> str:
    """
    The head of C{body} (whose wire size is C{size}) that fits in
    C{max_bytes} with a marker saying how much is cut: cut at a line end,
    or inside the only line.
    """
    marker = _wire_size(_BODY_MARKER.format(lines=f"{10 ** 12} lines"))
    room = max_bytes - marker - 8
    keep = len(body)
    while keep and size > room:
        keep = max(0, min(keep - 1, int(keep * room / size)))
        size = _wire_size(body[:keep])
    line_end = body.rfind("\n", 0, keep) + 1
    head = body[:line_end] if line_end else body[:keep] + "\n" * bool(keep)
    cut = body.count("\n", len(head)) + (not body.endswith("\n"))
    return head + _BODY_MARKER.format(
        lines=f"{cut} line" if cut == 1 else f"{cut} lines")
