"""
The HTTP face (HTTP_BIND), on twisted.web: the status page (/) and its
JSON (/status), health for probes (/healthz), Prometheus metrics (/metrics),
the control API failnozzle-ctl speaks (/api/...), and the inputs: Sentry
SDKs (/api/<project>/envelope/, see L{failnozzle.sentry}) and JSON records
(/api/errors, see L{failnozzle.httpin}), which have keys of their own.

Who may ask: on a loopback address status and metrics are open and control
takes HTTP_TOKEN if one is set; on any other address everything but
/healthz takes it (the config refuses such an address without a token).
The token comes as C{Authorization: Bearer TOKEN} and is compared in
constant time.  A control request must say C{Content-Type:
application/json}, which a web page cannot make a browser send to another
site without asking it first.
"""
from __future__ import annotations

import ipaddress
import os
import time
from typing import Callable

import orjson
from jinja2 import Environment, FileSystemLoader, select_autoescape
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import NoResource, Resource
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from failnozzle.digest import duration
from failnozzle.httpin import (BoundedRequest, ErrorsResource,
                               StrictResource, answer_later, bearer_matches,
                               json_reply)
from failnozzle.metrics import MetricsPage
from failnozzle.routing import BadRule
from failnozzle.sentry import SentryAPI
from failnozzle.status import FAILED_LISTED, health_of, status_of

_log = Logger()

#: The most a control request's body may hold.
MAX_CONTROL_BYTES = 64 * 1024
#: HTTP connections open at once, at most.
MAX_CONNECTIONS = 1000

_TEMPLATES = Environment(
    loader=FileSystemLoader(os.path.join(os.path.dirname(__file__),
                                         "templates")),
    autoescape=select_autoescape(["html"]))
_TEMPLATES.filters["utc"] = lambda seconds: time.strftime(
    "%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))
_TEMPLATES.filters["duration"] = duration


def make_site(service) -> Site:
    """The twisted.web site of a L{failnozzle.service.FailnozzleService}."""
    access = _Access(service)
    root = _Root(service, access)
    root.putChild(b"status", _Guarded(access, _StatusJSON(service)))
    root.putChild(b"healthz", _Health(service))
    root.putChild(b"metrics", _Guarded(access, MetricsPage(service)))
    # /api/<project>/envelope/ for Sentry SDKs beside the named children.
    api = SentryAPI(service)
    api.putChild(b"errors", ErrorsResource(service))
    api.putChild(b"status", _Guarded(access, _StatusJSON(service)))
    api.putChild(b"flush", _Control(access, service, _flush))
    api.putChild(b"reload", _Control(access, service, _reload))
    failed = _Guarded(access, _FailedList(service))
    failed.putChild(b"resend", _Control(access, service, _resend))
    api.putChild(b"failed", failed)
    silences = _Guarded(access, _SilenceList(service))
    silences.putChild(b"add", _Control(access, service, _add_silence))
    silences.putChild(b"remove", _Control(access, service, _remove_silence))
    api.putChild(b"silences", silences)
    root.putChild(b"api", api)
    site = _QuietSite(root, requestFactory=BoundedRequest)
    site.displayTracebacks = False
    return site


class _CountedChannel(HTTPChannel):
    """A connection its site counts while it is open."""

    def connectionMade(self) -> None:
        self.factory.connections += 1
        super().connectionMade()

    def connectionLost(self, reason) -> None:
        self.factory.connections -= 1
        super().connectionLost(reason)


class _QuietSite(Site):
    """
    No line per request: a storm of Sentry events would be a storm of log
    lines (the status and metrics count them).  At most
    L{MAX_CONNECTIONS} connections at once, each closed after a minute
    without a byte (Twisted's timeout): more are closed at once, so slow
    clients cannot take every file descriptor.
    """

    noisy = False
    protocol = _CountedChannel
    connections = 0

    def buildProtocol(self, addr):
        if self.connections >= MAX_CONNECTIONS:
            return None
        return super().buildProtocol(addr)

    def log(self, request: Request) -> None:
        pass


class _Access:
    """Whether a request may read status, or control."""

    def __init__(self, service) -> None:
        self._service = service

    @staticmethod
    def on_loopback(request: Request) -> bool:
        """
        Whether the request came to a loopback address (that of the
        connection, whatever a reload made of HTTP_BIND since) and names
        one: a Host header naming another host is a web page rebound to
        this one by its DNS, or a proxy exposing it.
        """
        local = getattr(request.getHost(), "host", None)
        if local is None or not is_loopback(local):
            return False
        named = request.requestHeaders.getRawHeaders(b"host") or []
        if len(named) > 1 or any(request.requestHeaders.hasHeader(header)
                                 for header in _FORWARDED):
            return False  # not one Host; or a proxy said it forwards
        return not named or is_loopback(_host_of(named[0]))

    def allows(self, request: Request, control: bool) -> bool:
        token = self._service.settings.HTTP_TOKEN
        loopback = self.on_loopback(request)
        if token is None:
            return loopback
        if loopback and not control:
            return True
        return bearer_matches(request, token)


#: Headers a proxy adds to what it forwards, as nginx, Apache, HAProxy,
#: Caddy and Traefik do when asked (the Host they send may be loopback).
_FORWARDED = (b"forwarded", b"x-forwarded-for", b"x-forwarded-host",
              b"x-real-ip")


def _host_of(header: bytes) -> str:
    """
    The host a Host header names, without its port: C{[::1]:1550} is
    C{::1}; a header of another shape is given whole (so names no
    loopback address).
    """
    text = header.decode("latin-1").strip()
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":") if port else "0"
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        return text
    return host if port.isdigit() else text


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _unauthorized(request: Request) -> bytes:
    request.setHeader(b"www-authenticate", b'Bearer realm="failnozzle"')
    return _refuse(request, 401, "HTTP_TOKEN required")


def _refuse(request: Request, code: int, why: str) -> bytes:
    return _json(request, {"error": why}, code)


def _json(request: Request, value, code: int = 200) -> bytes:
    return json_reply(request, value, code, indent=True)


class _Guarded(Resource):
    """A read-only resource behind L{_Access}."""

    def __init__(self, access: _Access, inner: Resource) -> None:
        super().__init__()
        self._access = access
        self._inner = inner

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self._inner.getChildWithDefault(path, request)

    def render(self, request: Request):
        if not self._access.allows(request, control=False):
            return _unauthorized(request)
        return self._inner.render(request)


class _Root(Resource):
    """The status page."""

    def __init__(self, service, access: _Access) -> None:
        super().__init__()
        self._service = service
        self._access = access

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self
        return super().getChild(path, request)

    def render_GET(self, request: Request) -> bytes:
        if not self._access.allows(request, control=False):
            return _unauthorized(request)
        status = status_of(self._service)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return _TEMPLATES.get_template("status.html").render(
            status=status, health=health_of(self._service)).encode(
                "utf-8", "replace")  # a lone surrogate from an error


class _StatusJSON(Resource):
    isLeaf = True

    def __init__(self, service) -> None:
        super().__init__()
        self._service = service

    def render_GET(self, request: Request) -> bytes:
        return _json(request, status_of(self._service))


class _Health(Resource):
    """200 "ok", or 503 and why: for load balancers and probes."""

    isLeaf = True

    def __init__(self, service) -> None:
        super().__init__()
        self._service = service

    def render_GET(self, request: Request) -> bytes:
        problem = health_of(self._service)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if problem is not None:
            request.setResponseCode(503)
            return f"unhealthy: {problem}\n".encode("utf-8")
        return b"ok\n"


class _FailedList(Resource):
    """GET /api/failed: the messages given up on, and those probably
    delivered."""

    def __init__(self, service) -> None:
        super().__init__()
        self._service = service

    def render_GET(self, request: Request) -> bytes:
        outbox = self._service.outbox
        try:
            failed, unconfirmed = outbox.failed(), outbox.unconfirmed()
        except OSError as error:
            return _refuse(request, 500, f"cannot read failed/ or "
                                         f"unconfirmed/: {error.strerror}")
        return _json(request, {
            "failed": [outbox.described_failed(name)
                       for name in failed[:FAILED_LISTED]],
            "not_listed": max(0, len(failed) - FAILED_LISTED),
            # Probably delivered: resent only by id.
            "unconfirmed": [outbox.described_failed(name)
                            for name in unconfirmed[:FAILED_LISTED]],
            "unconfirmed_not_listed": max(
                0, len(unconfirmed) - FAILED_LISTED)})


class _SilenceList(Resource):
    """GET /api/silences: the silences, and what each kept out."""

    def __init__(self, service) -> None:
        super().__init__()
        self._service = service

    def render_GET(self, request: Request) -> bytes:
        return _json(request, {"silences": self._service.silences.shown()})


class _Control(StrictResource):
    """A POST that acts: C{action(service, body)} gives the reply, or a
    Deferred of it."""

    def __init__(self, access: _Access, service,
                 action: Callable[[object, dict], object]) -> None:
        super().__init__()
        self._access = access
        self._service = service
        self._action = action

    def getChild(self, path: bytes, request: Request) -> Resource:
        # /api/flush/ is /api/flush; /api/flush/anything is nothing.
        return self if path == b"" else NoResource()

    def render_POST(self, request: Request):
        if not self._access.allows(request, control=True):
            return _unauthorized(request)
        kind = (request.getHeader(b"content-type") or b"").split(b";")[0]
        if kind.strip().lower() != b"application/json":
            return _refuse(request, 415, "Content-Type must be "
                                         "application/json")
        data = request.content.read(MAX_CONTROL_BYTES + 1)
        if len(data) > MAX_CONTROL_BYTES:
            return _refuse(request, 413, f"more than {MAX_CONTROL_BYTES} "
                                         f"bytes")
        try:
            body = orjson.loads(data) if data.strip() else {}
        except orjson.JSONDecodeError:
            return _refuse(request, 400, "the body is not JSON")
        if not isinstance(body, dict):
            return _refuse(request, 400, "the body is not a JSON object")
        if not self._service.running:
            return _refuse(request, 503, "failnozzle is stopping")
        try:
            result = self._action(self._service, body)
        except _BadRequest as error:
            return _refuse(request, 400, str(error))
        if not isinstance(result, defer.Deferred):
            return _json(request, result)
        result.addCallback(lambda value: _json(request, value))
        return answer_later(request, result.addErrback(self._failed, request))

    @staticmethod
    def _failed(failure: Failure, request: Request) -> bytes:
        if failure.check(_BadRequest):
            return _refuse(request, 400, str(failure.value))
        _log.failure("Control request {path} failed", failure,
                     path=request.path.decode("ascii", "replace"))
        return _refuse(request, 500, "failed; the log says why")


class _BadRequest(Exception):
    """A control request that cannot be done as asked."""


def _flush(service, body: dict) -> dict:
    buffered = service.aggregator.view().total + sum(
        batch.total for batch in service.held.values())
    outcomes = service.flush_now()
    return {"flushed": buffered, "digests": len(outcomes)}


def _reload(service, body: dict) -> dict:
    if not service.can_reload:
        raise _BadRequest("this daemon was started without reloading")
    taken = service.reload()
    return {"reloaded": taken} if taken else {
        "reloaded": False,
        "error": "the config could not be used; the log says why"}


def _add_silence(service, body: dict) -> dict:
    try:
        silence = service.silences.add(
            body, service.wall_time(service.reactor_seconds()),
            service.settings.unique_fields)
    except BadRule as error:
        raise _BadRequest(str(error)) from None
    _log.info("Silence {id} added until {until}: {comment}", id=silence.id,
              until=silence.shown(0)["until"],
              comment=silence.comment or "no comment")
    return {"silence": silence.shown(0)}


def _remove_silence(service, body: dict) -> dict:
    silence_id = body.get("id")
    if not isinstance(silence_id, str):
        raise _BadRequest('"id" must be the id of a silence')
    try:
        silence = service.silences.remove(silence_id)
    except KeyError:
        raise _BadRequest(f"no silence added at run time is {silence_id!r} "
                          f"(those of SILENCES go with the config)") from None
    _log.info("Silence {id} removed ({comment})", id=silence.id,
              comment=silence.comment or "no comment")
    return {"removed": silence.id}


def _resend(service, body: dict) -> defer.Deferred:
    ids = body.get("ids")
    if ids is not None and not (isinstance(ids, list) and all(
            isinstance(name, str) for name in ids)):
        raise _BadRequest('"ids" must be a list of strings')
    try:
        resending = service.outbox.resend(ids)
    except KeyError as error:
        raise _BadRequest(f"not in failed/ or unconfirmed/: "
                          f"{error.args[0]}") from None
    return resending.addCallback(lambda names: {"resent": names})
