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

import math
import os
import re
import uuid
from typing import Optional
from urllib.parse import urlsplit

import orjson
from twisted.web.resource import Resource
from twisted.web.server import Request

from failnozzle.httpin import (BadBody, BodyTooLarge, InflatedBody,
                               answer_later, json_reply)
from failnozzle.ingest import BadDatagram

#: Sentry's own limits: an event, and an envelope inflated.
MAX_EVENT_BYTES = 1024 * 1024
MAX_ENVELOPE_BYTES = 100 * 1024 * 1024
#: The longest envelope or item header line.
_MAX_HEADER_BYTES = 64 * 1024
#: Sentry's levels as syslog's.
LEVELS = {"fatal": 2, "critical": 2, "error": 3, "warning": 4, "warn": 4,
          "info": 6, "log": 6, "debug": 7}
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

    def __init__(self, rate: float, clock) -> None:
        self._rate = rate
        self._clock = clock
        self._tokens = rate
        self._at = clock.seconds()

    def take(self) -> Optional[float]:
        """Take one: None if there was one, else seconds until there is."""
        now = self._clock.seconds()
        self._tokens = min(self._rate,
                           self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return None
        return (1 - self._tokens) / self._rate


class SentryAPI(Resource):
    """
    /api/: its named children (the control API, /api/errors), and
    /api/<project>/(envelope|store)/ for anything else.
    """

    def __init__(self, service) -> None:
        super().__init__()
        self._service = service
        self._buckets: dict = {}

    def getChild(self, project: bytes, request: Request) -> Resource:
        return _Project(self)

    def budget(self, key: str) -> Optional[float]:
        """None, or how long the key must wait (its events over budget)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(
                self._service.settings.SENTRY_EVENTS_PER_SECOND,
                self._service.reactor)
        return bucket.take()

    def receive(self, request: Request, envelope: bool):
        service = self._service
        keys = service.settings.SENTRY_KEYS or {}
        if not keys:
            return json_reply(request, {"detail": "SENTRY_KEYS is not set"},
                              404)
        key = _public_key(request)
        if key is None and not envelope:
            return _unauthorized(request, "missing authorization")
        body = InflatedBody(request.content, (request.getHeader(
            b"content-encoding") or b"").decode("latin-1"),
            MAX_ENVELOPE_BYTES if envelope else MAX_EVENT_BYTES)
        try:
            if envelope:
                header, events = _read_envelope(body, key, service.counts)
                key = key or _dsn_key(header)
            else:
                event = orjson.loads(body.rest())
                events, header = [event], {}
        except BodyTooLarge as error:
            return json_reply(request, {"detail": f"too large: {error}"},
                              413)
        except (BadBody, orjson.JSONDecodeError, _BadEnvelope) as error:
            return json_reply(request, {"detail": f"bad body: {error}"}, 400)
        if key is None:
            return _unauthorized(request, "missing authorization")
        kind = keys.get(key)
        if kind is None:
            return json_reply(request, {"detail": "unknown public key"}, 403)
        peer = request.getClientAddress()
        sender = (getattr(peer, "host", "unknown"), getattr(peer, "port", 0))
        event_id = header.get("event_id")
        for event in events:
            if not isinstance(event, dict):
                service.report_bad_input(BadEvent("not a JSON object"),
                                         sender)
                continue
            wait = self.budget(key)
            if wait is not None:
                return _rate_limited(request, wait)
            service.counts.received["sentry"] += 1
            record, level = record_of(event, kind, sender[0])
            try:
                report = service.reader.report_of(record, level=level)
                report = report._replace(context=context_of(event))
            except BadDatagram as error:
                service.report_bad_input(error, sender)
                continue
            service.aggregator.add(report)
            event_id = event_id or event.get("event_id")
        event_id = str(event_id or uuid.uuid4().hex)
        return answer_later(request, service.saved_soon(),
                            lambda: json_reply(request, {"id": event_id}))


class _Project(Resource):
    isLeaf = True

    def __init__(self, api: SentryAPI) -> None:
        super().__init__()
        self._api = api

    def render_POST(self, request: Request):
        endpoint = [part for part in request.postpath if part]
        if endpoint not in ([b"envelope"], [b"store"]):
            return json_reply(request, {"detail": "not found"}, 404)
        return self._api.receive(request, envelope=endpoint == [b"envelope"])


def _unauthorized(request: Request, why: str) -> bytes:
    return json_reply(request, {"detail": why}, 401)


def _rate_limited(request: Request, wait: float) -> bytes:
    seconds = max(1, math.ceil(wait))
    return json_reply(request, {"detail": "over SENTRY_EVENTS_PER_SECOND"},
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
    return urlsplit(dsn).username or None


class _BadEnvelope(Exception):
    """Not an envelope."""


def _read_envelope(body: InflatedBody, key: Optional[str],
                   counts) -> tuple:
    """
    The envelope's header and its events (decoded JSON); the other items
    are counted by type in C{counts.dropped_items} and skipped.
    """
    header = _json_line(body.readline(_MAX_HEADER_BYTES), "header")
    events = []
    while True:
        line = body.readline(_MAX_HEADER_BYTES)
        if line == b"":
            return header, events
        if line is not None and not line.strip():
            continue
        item = _json_line(line, "item header")
        kind, length = item.get("type"), item.get("length")
        if not isinstance(length, int) or isinstance(length, bool) \
                or length < 0:
            length = None
        if kind != "event" or (length or 0) > MAX_EVENT_BYTES:
            counts.dropped_items[str(kind)[:50]] += 1
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
            counts.dropped_items["event"] += 1
            continue
        try:
            events.append(orjson.loads(payload))
        except orjson.JSONDecodeError:
            events.append(None)


def _json_line(line: Optional[bytes], what: str) -> dict:
    if line is None:
        raise _BadEnvelope(f"its {what} is longer than "
                           f"{_MAX_HEADER_BYTES:,} bytes")
    try:
        value = orjson.loads(line) if line.strip() else {}
    except orjson.JSONDecodeError:
        raise _BadEnvelope(f"its {what} is not JSON") from None
    if not isinstance(value, dict):
        raise _BadEnvelope(f"its {what} is not a JSON object")
    return value


def record_of(event: dict, kind: str, client: str) -> tuple:
    """
    The failnozzle record of a Sentry event, and its syslog level (None if
    it says none).
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
    level = event.get("level")
    return record, LEVELS.get(level) if isinstance(level, str) else None


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
            for frame in shown:
                if frame is None:
                    lines.append(f"  [{len(frames) - _FRAMES_SHOWN} frames "
                                 f"not shown]")
                    continue
                lines.append(_frame_line(frame))
                context = frame.get("context_line")
                if isinstance(context, str) and context.strip():
                    lines.append(f"    {context.strip()}")
        lines.append(_exception_line(exception))
        parts.append("\n".join(lines))
    return ("\n\nDuring handling of the above exception, another exception "
            "occurred:\n\n").join(parts)


def _frame_line(frame: dict) -> str:
    where = (_text(frame.get("filename")) or _text(frame.get("abs_path"))
             or _text(frame.get("module")) or "?")
    line = frame.get("lineno")
    function = _text(frame.get("function")) or "?"
    at = f", line {line}" if isinstance(line, int) else ""
    return f'  File "{where}"{at}, in {function}'
