"""
Sentry SDKs as a front door: POST /api/<project>/envelope/ and
/api/<project>/store/, authenticated by a public key of SENTRY_KEYS (from
X-Sentry-Auth, the sentry_key query parameter, or the envelope's DSN).

An event becomes an error record: the exception chain a message
(C{Type: value}) and a traceback in the Python layout, whatever the
language (so tracebacks group by their frames as Python's do); a
C{logentry} or C{message} event its message (its format kept for
grouping); C{level} the level; C{server_name} the source, else the client's
address; the public key's kind the kind.  Other envelope items
(transactions, sessions, attachments, ...) are counted and passed over
without being kept.  Over SENTRY_EVENTS_PER_SECOND per key, the answer is
429 with Retry-After and X-Sentry-Rate-Limits, which SDKs honour.
"""
from __future__ import annotations

import io
import math
import os
from collections import Counter
import re
import uuid
from functools import partial
from typing import IO, Optional
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from failnozzle.httpin import (BadBody, BodyTooLarge, InflatedBody,
                               StrictResource, answer_later, json_reply,
                               report_refused, sender_of)
from failnozzle.ingest import BadDatagram, BelowLevel, decode_json
from failnozzle.levels import level_named

#: Sentry's own limits: an event, and an envelope inflated.
MAX_EVENT_BYTES = 1024 * 1024
MAX_ENVELOPE_BYTES = 100 * 1024 * 1024
#: The longest envelope or item header line.
_MAX_HEADER_BYTES = 64 * 1024
_AUTH_PAIR = re.compile(r"(\w+)=([^,\s]+)")
#: Frames shown per exception: the first and the last, the rest counted.
_FRAMES_SHOWN = 100
#: The longest text of an event's context, and the tags it shows.
_CONTEXT_CHARS = 200
_CONTEXT_TAGS = 10


class BadEvent(BadDatagram):
    reason = "Sentry event is not usable"


class TokenBucket:
    """At most C{rate} a second, in bursts of up to a second's worth."""

    def __init__(self, clock) -> None:
        self._clock = clock
        self._tokens: Optional[float] = None
        self._at = clock.seconds()

    def take(self, count: int, rate: float) -> Optional[float]:
        """
        Take C{count}: None if there were so many, else the seconds until
        there are (and none is taken).  More than a second's worth at once
        is taken from a full bucket, which owes the rest: it would never
        hold them.
        """
        now = self._clock.seconds()
        tokens = rate if self._tokens is None else self._tokens
        self._tokens = min(rate, tokens + (now - self._at) * rate)
        self._at = now
        needed = min(count, rate)
        if self._tokens >= needed:
            self._tokens -= count
            return None
        return (needed - self._tokens) / rate


class SentryAPI(StrictResource):
    """
    /api/: its named children (the control API, /api/errors), and
    /api/<project>/(envelope|store)/ for anything else.
    """

    def __init__(self, service) -> None:
        super().__init__()
        self._service = service
        self._buckets: dict = {}
        #: Large envelopes are read one at a time: each thread reading
        #: one takes the interpreter from the reactor now and then.
        self._large = defer.DeferredLock()

    def getChild(self, project: bytes, request: Request) -> Resource:
        return _Project(self)

    def budget(self, key: str, count: int) -> Optional[float]:
        """None, or how long the key must wait (its events over budget)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self._service.reactor)
        return bucket.take(count,
                           self._service.settings.SENTRY_EVENTS_PER_SECOND)

    def receive(self, request: Request, envelope: bool):
        """
        Check the key before inflating or reading the body (or, if only the
        envelope names it, after its first line), read every event, then
        count them all or, over budget, none.  An envelope inflating past
        L{INLINE_BYTES} is read again from the start in a thread (zlib and
        brotli let go of the interpreter meanwhile): 100 MB of attachments
        would hold the reactor a quarter of a second.
        """
        service = self._service
        keys = service.settings.SENTRY_KEYS or {}
        if not keys:
            return _reply(request, {"detail": "SENTRY_KEYS is not set"}, 404)
        if not service.running:
            return _reply(request, {"detail": "failnozzle is stopping"}, 503)
        key = _public_key(request)
        if key is not None and key not in keys:
            return _key_refused(request, key)
        if key is None and not envelope:
            return _key_refused(request, None)
        encoding = (request.getHeader(b"content-encoding")
                    or b"").decode("latin-1")
        limit = MAX_ENVELOPE_BYTES if envelope else MAX_EVENT_BYTES
        needed = frozenset(keys) if key is None else None
        unreadable = partial(self._unreadable, request, key is not None)
        try:
            read = read_body(request.content, encoding, envelope,
                             min(limit, INLINE_BYTES), needed)
        except BodyTooLarge:
            if limit <= INLINE_BYTES:
                return unreadable(Failure())
            reading = self._large.run(self._read_large, request, encoding,
                                      needed)
            reading.addCallbacks(partial(self._take, request, key),
                                 unreadable)
            return answer_later(request, reading)
        except (_KeyRefused, *_UNREADABLE):
            return unreadable(Failure())
        answer = self._take(request, key, read)
        if isinstance(answer, defer.Deferred):
            return answer_later(request, answer)
        return answer

    def _read_large(self, request: Request, encoding: str,
                    keys: Optional[frozenset]) -> defer.Deferred:
        """
        Read an envelope whole in a thread, from a copy of its body (at
        most 20 MiB): twisted.web closes the body's file if the client
        goes meanwhile.
        """
        if request.content.closed:
            raise _Gone()
        request.content.seek(0)
        return self._service.in_thread(
            read_body, io.BytesIO(request.content.read()), encoding, True,
            MAX_ENVELOPE_BYTES, keys)

    def _unreadable(self, request: Request, known_key: bool,
                    failure: Failure) -> bytes:
        """
        The answer to a body that could not be read as it says: bad input
        too if its sender was let in by a known key (without one, anyone
        could fill the digest).
        """
        if failure.check(_Gone):
            return b""  # nobody to answer
        failure.trap(BodyTooLarge, _KeyRefused, *_UNREADABLE)
        error = failure.value
        if isinstance(error, _KeyRefused):
            return _key_refused(request, error.key)
        why, code = ((f"too large: {error}", 413)
                     if isinstance(error, BodyTooLarge)
                     else (f"bad body: {error}", 400))
        if known_key:
            report_refused(self._service, request, why)
        return _reply(request, {"detail": why}, code)

    def _take(self, request: Request, key: Optional[str], read: tuple):
        """
        Count what a body held, if its key is known and within budget.

        @return: the answer, or a Deferred of it once what was counted is
            in a snapshot.
        """
        service = self._service
        keys = service.settings.SENTRY_KEYS or {}
        header, events, dropped = read
        # A large envelope was read in a thread: the daemon may have begun
        # to stop, or a reload dropped the key, meanwhile.
        if not service.running:
            return _reply(request, {"detail": "failnozzle is stopping"}, 503)
        if key is None:
            key = _dsn_key(header)
        if key not in keys:
            return _key_refused(request, key)
        wait = self.budget(key, len(events)) if events else None
        if wait is not None:
            return _rate_limited(request, wait)
        service.counts.dropped_items.update(dropped)
        sender = sender_of(request)
        for event in events:
            self._count(event, keys[key], sender)
        ids = [_event_id(header.get("event_id"))] + [
            _event_id(event.get("event_id")) for event in events
            if isinstance(event, dict)]
        event_id = next(filter(None, ids), None) or uuid.uuid4().hex
        return service.saved_soon(durable=False).addCallback(
            lambda _: _reply(request, {"id": event_id}))

    def _count(self, event, kind: str, sender: tuple) -> None:
        service = self._service
        service.counts.received["sentry"] += 1
        if not isinstance(event, dict):
            service.report_bad_input(event if isinstance(event, BadEvent)
                                     else BadEvent("not a JSON object"),
                                     sender)
            return
        record, level = record_of(event, kind, sender[0])
        try:
            report = service.reader.report_of(record, level=level)
        except BelowLevel:
            service.counts.below_level["sentry"] += 1
            return
        except BadDatagram as error:
            service.report_bad_input(error, sender)
            return
        service.aggregator.add(report._replace(context=context_of(event)))


_EVENT_ID = re.compile(r"[0-9a-fA-F]{32}|[0-9a-fA-F-]{36}")


def _event_id(value) -> Optional[str]:
    """An event id as Sentry writes one (32 hex digits), else None."""
    if isinstance(value, str) and _EVENT_ID.fullmatch(value):
        return value.replace("-", "").lower()
    return None


def _reply(request: Request, value: dict, code: int = 200,
           headers: Optional[dict] = None) -> bytes:
    """A JSON answer that a browser's SDK, on another origin, may read."""
    request.setHeader(b"access-control-allow-origin", b"*")
    request.setHeader(b"access-control-expose-headers",
                      b"x-sentry-rate-limits, retry-after")
    return json_reply(request, value, code, headers)


class _Project(StrictResource):
    isLeaf = True

    def __init__(self, api: SentryAPI) -> None:
        super().__init__()
        self._api = api

    def render_POST(self, request: Request):
        endpoint = [part for part in request.postpath if part]
        if endpoint not in ([b"envelope"], [b"store"]):
            return _reply(request, {"detail": "not found"}, 404)
        return self._api.receive(request, envelope=endpoint == [b"envelope"])

    def render_OPTIONS(self, request: Request) -> bytes:
        """A browser's preflight, before it posts an envelope."""
        request.setHeader(b"access-control-allow-methods", b"POST")
        request.setHeader(b"access-control-allow-headers",
                          b"content-type, content-encoding, x-sentry-auth")
        request.setHeader(b"access-control-max-age", b"86400")
        return _reply(request, {}, 200)


def _key_refused(request: Request, key: Optional[str]) -> bytes:
    """401 for no key, 403 for one not in SENTRY_KEYS."""
    if key is None:
        return _reply(request, {"detail": "missing authorization"}, 401)
    return _reply(request, {"detail": "unknown public key"}, 403)


def _rate_limited(request: Request, wait: float) -> bytes:
    seconds = max(1, math.ceil(wait))
    return _reply(request, {"detail": "over SENTRY_EVENTS_PER_SECOND"},
                  429, {"Retry-After": str(seconds),
                        "X-Sentry-Rate-Limits": f"{seconds}::key"})


def _public_key(request: Request) -> Optional[str]:
    """The key of X-Sentry-Auth, or of the sentry_key parameter."""
    auth = (request.getHeader(b"x-sentry-auth") or b"").decode("latin-1")
    for name, value in _AUTH_PAIR.findall(auth):
        if name == "sentry_key":
            return value
    values = request.args.get(b"sentry_key")
    return values[0].decode("latin-1") if values else None


def _dsn_key(header: dict) -> Optional[str]:
    dsn = header.get("dsn")
    if not isinstance(dsn, str):
        return None
    try:
        return urlsplit(dsn).username or None
    except ValueError:  # such as a broken IPv6 address
        return None


class _BadEnvelope(Exception):
    """Not an envelope."""


#: What keeps a body from being read, beside its size.
_UNREADABLE = (BadBody, BadDatagram, _BadEnvelope)
#: How far an envelope is inflated on the reactor before it is read in a
#: thread instead (zlib inflates it in about 10 ms).
INLINE_BYTES = 4 * 1024 * 1024


class _Gone(Exception):
    """The client went before its body was read."""


class _KeyRefused(Exception):
    """The key the envelope names is none, or not known.

    @ivar key: which, if any."""

    def __init__(self, key: Optional[str]) -> None:
        super().__init__(key)
        self.key = key


def read_body(content: IO[bytes], encoding: str, envelope: bool,
              limit: int, keys: Optional[frozenset] = None) -> tuple:
    """
    The envelope's header, events and items dropped by type, or the
    store endpoint's event, inflated within C{limit} bytes: on the reactor
    or in a thread (it touches nothing else).  With C{keys}, the request
    named no key: the envelope's header must name one of them, which is
    checked before the rest is read.

    @raise BodyTooLarge: it inflates past C{limit}.
    @raise BadBody, BadDatagram, _BadEnvelope: it is not what it says.
    @raise _KeyRefused: its header names none of C{keys}.
    """
    body = InflatedBody(content, encoding, limit)
    if not envelope:
        return {}, [decode_json(body.rest())], Counter()
    header = _json_line(body.readline(_MAX_HEADER_BYTES), "header")
    if keys is not None and _dsn_key(header) not in keys:
        raise _KeyRefused(_dsn_key(header))
    events, dropped = _envelope_events(body)
    return header, events, dropped


#: Sentry's item types; any other is counted as "other" (a client's own
#: names must not become counters without end).
ITEM_TYPES = frozenset((
    "event", "transaction", "session", "sessions", "client_report",
    "attachment", "check_in", "log", "otel_log", "span", "otel_span",
    "profile", "profile_chunk", "replay_event", "replay_recording",
    "replay_video", "user_report", "feedback", "statsd", "metric_meta",
    "trace_metric", "security"))
#: Events taken from one envelope (Sentry's SDKs send one), and items read.
MAX_EVENTS_PER_ENVELOPE = 10
MAX_ITEMS_PER_ENVELOPE = 1000


def _envelope_events(body: InflatedBody) -> tuple:
    """
    The events of an envelope (decoded JSON) after its header, at most
    L{MAX_EVENTS_PER_ENVELOPE} (a L{BadEvent} for one over
    L{MAX_EVENT_BYTES}), and a count by type of the items skipped: the
    others, and events past that.
    """
    events: list = []
    dropped: Counter = Counter()
    for _ in range(MAX_ITEMS_PER_ENVELOPE):
        line = body.readline(_MAX_HEADER_BYTES)
        if line == b"":
            return events, dropped
        if line is not None and not line.strip():
            continue
        item = _json_line(line, "item header")
        kind, length = item.get("type"), item.get("length")
        if not isinstance(length, int) or isinstance(length, bool) \
                or length < 0:
            length = None
        taken = kind == "event" and len(events) < MAX_EVENTS_PER_ENVELOPE
        if not taken or (length or 0) > MAX_EVENT_BYTES:
            if taken:  # an error report lost: said as bad input
                events.append(_too_large())
            else:
                dropped[kind if kind in ITEM_TYPES else "other"] += 1
            if length is None:
                body.skip_line()
            else:
                body.skip(length)
                body.skip_newline()
            continue
        if length is None:
            payload = body.readline(MAX_EVENT_BYTES)
        else:
            payload = body.read(length)
            body.skip_newline()
        if payload is None:
            events.append(_too_large())
            continue
        try:
            events.append(decode_json(payload))
        except BadDatagram as error:
            # Counted as bad input, saying why, with the others.
            events.append(BadEvent(f"not JSON: {error}"))
    raise _BadEnvelope(f"it holds more than {MAX_ITEMS_PER_ENVELOPE:,} items")


def _too_large() -> BadEvent:
    return BadEvent(f"an event item over the {MAX_EVENT_BYTES:,} bytes "
                    f"Sentry allows")


def _json_line(line: Optional[bytes], what: str) -> dict:
    if line == b"":
        raise _BadEnvelope(f"it has no {what}")
    if line is None:
        raise _BadEnvelope(f"its {what} is longer than "
                           f"{_MAX_HEADER_BYTES:,} bytes")
    try:
        value = decode_json(line) if line.strip() else {}
    except BadDatagram:
        raise _BadEnvelope(f"its {what} is not JSON") from None
    if not isinstance(value, dict):
        raise _BadEnvelope(f"its {what} is not a JSON object")
    return value


def record_of(event: dict, kind: str, client: str) -> tuple:
    """
    The failnozzle record of a Sentry event, and its syslog level: error
    if it names none, None if it names one failnozzle does not know.
    """
    exceptions = [value for value in _values(event.get("exception"))
                  if isinstance(value, dict)]
    logentry = event.get("logentry") or event.get("sentry.interfaces.Message")
    message, template, params = _message_of(logentry, event.get("message"))
    record: dict = {"kind": kind}
    if template is not None:
        record["msg"] = template
        if message is None:
            # Formatted as failnozzle formats a logging record's, within
            # its caps (older SDKs send no "formatted").
            record["args"] = params
    if exceptions:
        last = exceptions[-1]
        record["exc_text"] = traceback_of(exceptions)
        if template is None:
            message = message or _exception_line(last)
        frame = _culprit_frame(last)
        if frame is not None:
            path = _text(frame.get("abs_path") or frame.get("filename"))
            record.update(
                module=_text(frame.get("module")),
                funcName=_text(frame.get("function")),
                pathname=path,
                filename=os.path.basename(path) if path else None,
                lineno=frame.get("lineno") if isinstance(
                    frame.get("lineno"), int) else None)
    if "module" not in record and event.get("logger"):
        record["module"] = _text(event.get("logger"))
    if message is not None or "args" not in record:
        record["message"] = message or "(no message)"
    record["source"] = _text(event.get("server_name")) or client
    # An event naming no level is an error, as Sentry takes it (the Java
    # SDK names none for an exception).
    level = event.get("level") or "error"
    return record, level_named(level) if isinstance(level, str) else None


def context_of(event: dict) -> tuple:
    """
    What an event says of where it happened, beside its error: C{(name,
    text)} pairs of its release, environment, user, request URL,
    transaction and tags, each text capped.
    """
    user = event.get("user")
    if isinstance(user, dict):
        user = next((user[name] for name in ("id", "username", "email",
                                             "ip_address")
                     if _scalar(user.get(name)) is not None), None)
    request = event.get("request")
    url = request.get("url") if isinstance(request, dict) else None
    tags = event.get("tags")
    if isinstance(tags, dict):
        tags = list(tags.items())
    if isinstance(tags, list):
        pairs = [pair for pair in tags if isinstance(pair, (list, tuple))
                 and len(pair) == 2 and _scalar(pair[0])
                 and _scalar(pair[1])][:_CONTEXT_TAGS]
        tags = ", ".join(f"{_scalar(name)}={_scalar(value)}"
                         for name, value in pairs) or None
    found = (("release", event.get("release")),
             ("environment", event.get("environment")),
             ("user", user), ("url", url),
             ("transaction", event.get("transaction")), ("tags", tags))
    return tuple((name, _scalar(value)[:_CONTEXT_CHARS])
                 for name, value in found if _scalar(value))


def _scalar(value) -> Optional[str]:
    """A JSON scalar as text; None for anything else, or nothing."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (str, int, float)):
        return str(value) or None
    return None


def _values(exception) -> list:
    if isinstance(exception, dict):
        exception = exception.get("values")
    return exception if isinstance(exception, list) else []


def _text(value) -> Optional[str]:
    return value if isinstance(value, str) and value else None


def _message_of(logentry, message) -> tuple:
    """
    C{(message, format, params)} of a logentry or a plain message: the
    format only if it has params, the message None if only they are sent.
    """
    if isinstance(logentry, dict):
        text, params = _text(logentry.get("message")), logentry.get("params")
        formatted = _text(logentry.get("formatted"))
        if params and isinstance(params, (list, dict)) and text:
            return formatted, text, params
        return formatted or text, None, None
    if isinstance(message, dict):
        return _message_of(message, None)
    return _text(message), None, None


def _exception_line(exception: dict) -> str:
    kind = _text(exception.get("type")) or "Error"
    value = exception.get("value")
    return f"{kind}: {value}" if isinstance(value, str) and value else kind


def _frames(exception: dict) -> list:
    stacktrace = exception.get("stacktrace")
    frames = stacktrace.get("frames") if isinstance(stacktrace, dict) else None
    return [frame for frame in frames if isinstance(frame, dict)] \
        if isinstance(frames, list) else []


def _culprit_frame(exception: dict) -> Optional[dict]:
    """The innermost frame of the application's, else the innermost."""
    frames = _frames(exception)
    for frame in reversed(frames):
        if frame.get("in_app") is True:
            return frame
    return frames[-1] if frames else None


def traceback_of(exceptions: list) -> str:
    """
    The exception chain (oldest first, as Sentry sends it) as Python prints
    one, for any language: C{File "...", line N, in function} per frame.
    """
    parts = []
    for exception in exceptions:
        frames = _frames(exception)
        lines = []
        if frames:
            lines.append("Traceback (most recent call last):")
            shown = frames
            if len(frames) > _FRAMES_SHOWN:
                half = _FRAMES_SHOWN // 2
                shown = frames[:half] + [None] + frames[-half:]
            _frame_lines(shown, len(frames), lines)
        lines.append(_exception_line(exception))
        parts.append("\n".join(lines))
    return ("\n\nDuring handling of the above exception, another exception "
            "occurred:\n\n").join(parts)


def _frame_lines(shown: list, total: int, lines: list) -> None:
    """
    Append C{File "...", line N, in function} and the frame's line of code
    for each frame shown (None: where the frames not shown are).  Written
    out, without a call per field: a traceback is tens of frames, and this
    was most of what an event cost to read.
    """
    append = lines.append
    for frame in shown:
        if frame is None:
            append(f"  [{total - _FRAMES_SHOWN} frames not shown]")
            continue
        get = frame.get
        where = get("filename")
        if not (isinstance(where, str) and where):
            where = get("abs_path")
        if not (isinstance(where, str) and where):
            where = get("module")
        if not (isinstance(where, str) and where):
            where = "?"
        function = get("function")
        if not (isinstance(function, str) and function):
            function = "?"
        line = get("lineno")
        if isinstance(line, int):
            append(f'  File "{where}", line {line}, in {function}')
        else:
            append(f'  File "{where}", in {function}')
        context = get("context_line")
        if isinstance(context, str):
            context = context.strip()
            if context:
                append(f"    {context}")
