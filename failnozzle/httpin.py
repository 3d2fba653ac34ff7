"""
Errors over HTTP: request bodies bounded before they are read, inflated
(gzip, deflate, br) under a cap a piece at a time, and POST /api/errors,
which takes failnozzle's own JSON records, one object or one per line.
"""
from __future__ import annotations

import hmac
import json
import zlib
from typing import IO, Iterator, Optional

import brotli
import orjson
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.error import UnsupportedMethod
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from failnozzle.ingest import BadDatagram, BelowLevel, decode_json

_log = Logger()

#: The largest body any endpoint takes, as sent (Sentry's envelopes with
#: their attachments are the largest): a longer one is refused with 413
#: before it is read.
MAX_BODY_BYTES = 20 * 1024 * 1024
#: What /api/errors takes in one request, inflated, and in records.
MAX_ERRORS_BYTES = 1024 * 1024
MAX_ERRORS_RECORDS = 10_000
#: How much is inflated at a time.
_CHUNK = 64 * 1024


class BodyTooLarge(Exception):
    """A body inflates past its cap."""


class BadBody(Exception):
    """A body that cannot be inflated as its Content-Encoding says."""


class RefusedBody(BadDatagram):
    reason = "HTTP request body refused"


def sender_of(request: Request) -> tuple:
    """The client's address and port, as a datagram's sender."""
    peer = request.getClientAddress()
    return getattr(peer, "host", "unknown"), getattr(peer, "port", 0)


def report_refused(service, request: Request, why: str) -> None:
    """
    A body refused (400, 413) from a sender let in: bad input, counted,
    logged and in the digest as a bad datagram is, since the errors it
    held are lost unless the sender tells.
    """
    path = request.path.decode("ascii", "replace")
    service.report_bad_input(RefusedBody(f"{path}: {why}"),
                             sender_of(request))


class StrictResource(Resource):
    """
    A resource that answers HEAD only where it answers GET, and else 405
    as for any method it does not take: Twisted's calls a C{render_GET}
    that a resource taking only POST does not have (a 500, and a
    traceback in the log for anyone who asks).
    """

    def render_HEAD(self, request: Request) -> bytes:
        if getattr(self, "render_GET", None) is None:
            raise UnsupportedMethod(sorted(
                name[len("render_"):].encode("ascii") for name in dir(self)
                if name.startswith("render_") and name != "render_HEAD"))
        return self.render_GET(request)


class BoundedRequest(Request):
    """
    A request whose body may not be longer than L{MAX_BODY_BYTES}: one
    announced longer is answered 413 and the connection closed before a
    byte of it is stored; a chunked one is cut off when it gets there.
    """

    _received = 0
    _refused = False
    _content_type: Optional[list] = None

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > MAX_BODY_BYTES:
            self._refuse()
            return
        # Twisted parses a form's body into request.args before anything
        # sees the request (20 MiB of "a=&" is seconds and gigabytes), and
        # parses every POST's Content-Type with the email package to know
        # (a seventh of a Sentry event's cost): failnozzle takes no form,
        # so the header is out of Twisted's sight until L{process}.
        self._content_type = self.requestHeaders.getRawHeaders(
            b"content-type")
        self.requestHeaders.removeHeader(b"content-type")
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > MAX_BODY_BYTES:
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes,
                        version: bytes) -> None:
        if not self._refused:
            super().requestReceived(command, path, version)

    def process(self) -> None:
        if self._content_type is not None:
            self.requestHeaders.setRawHeaders(b"content-type",
                                              self._content_type)
        super().process()

    def _refuse(self) -> None:
        self._refused = True
        transport = self.channel.transport
        body = f"the body is longer than {MAX_BODY_BYTES:,} bytes\n".encode()
        transport.write(b"HTTP/1.1 413 Request Entity Too Large\r\n"
                        b"Content-Type: text/plain\r\nConnection: close\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        transport.loseConnection()


class InflatedBody:
    """
    A request's body as its Content-Encoding says to read it, inflated a
    piece at a time: what it inflates to beyond C{limit} bytes raises
    L{BodyTooLarge}, whatever the compression ratio (a bomb costs the
    reading of C{limit} bytes, no more).  Lines are found by an offset into
    the piece at hand, never by copying what follows them: a body of a
    million empty lines costs what a million bytes do.
    """

    def __init__(self, raw: IO[bytes], encoding: str, limit: int) -> None:
        self._chunks = _inflated(raw, encoding.strip().lower())
        self._limit = limit
        self._read = 0
        #: The piece at hand, and where in it reading is.
        self._buffer = b""
        self._at = 0
        self._ended = False

    def _more(self) -> bool:
        """Append the next piece to what is left of this one."""
        if self._ended:
            return False
        for chunk in self._chunks:
            if chunk:
                self._read += len(chunk)
                if self._read > self._limit:
                    raise BodyTooLarge(f"it inflates past {self._limit:,} "
                                       f"bytes")
                self._buffer = self._buffer[self._at:] + chunk
                self._at = 0
                return True
        self._ended = True
        return False

    def _left(self) -> int:
        return len(self._buffer) - self._at

    def _take(self, size: int) -> bytes:
        data = self._buffer[self._at:self._at + size]
        self._at += len(data)
        return data

    def read(self, size: int) -> bytes:
        """Up to C{size} bytes (fewer only at the end)."""
        while self._left() < size and self._more():
            pass
        return self._take(size)

    def readline(self, limit: int) -> Optional[bytes]:
        """
        The next line with its LF (as a file's C{readline}), of at most
        C{limit} bytes before it: a longer one is skipped whole and C{None}
        returned in its place; b"" at the end.
        """
        searched = self._at
        while True:
            end = self._buffer.find(b"\n", searched)
            if end >= 0:
                if end - self._at > limit:
                    self._at = end + 1
                    return None
                return self._take(end + 1 - self._at)
            if self._left() > limit:
                self.skip_line()
                return None
            searched = len(self._buffer) - self._at
            if not self._more():
                return self._take(self._left())

    def skip_line(self) -> None:
        """Pass over the rest of this line and its LF."""
        while True:
            end = self._buffer.find(b"\n", self._at)
            if end >= 0:
                self._at = end + 1
                return
            self._at = len(self._buffer)
            if not self._more():
                return

    def skip_newline(self) -> None:
        """Pass over one LF, if one comes next."""
        if not self._left():
            self._more()
        if self._buffer[self._at:self._at + 1] == b"\n":
            self._at += 1

    def skip(self, size: int) -> None:
        """Pass over C{size} bytes without keeping them."""
        while size > 0:
            if not self._left() and not self._more():
                return
            taken = min(size, self._left())
            self._at += taken
            size -= taken

    def rest(self) -> bytes:
        """Everything left (within the limit)."""
        while self._more():
            pass
        return self._take(self._left())


def _inflated(raw: IO[bytes], encoding: str) -> Iterator[bytes]:
    if encoding in ("", "identity"):
        yield from iter(lambda: raw.read(_CHUNK), b"")
    elif encoding in ("gzip", "x-gzip", "deflate"):
        yield from _zlib_inflated(raw, encoding)
    elif encoding == "br":
        yield from _brotli_inflated(raw)
    else:
        raise BadBody(f"Content-Encoding {encoding!r} is not gzip, deflate "
                      f"or br")


def _zlib_inflated(raw: IO[bytes], encoding: str) -> Iterator[bytes]:
    first = raw.read(_CHUNK)
    if encoding == "deflate":
        # RFC 9110's deflate is zlib's format; some clients send it raw.
        wbits = 15 if first[:1] == b"\x78" else -15
    else:
        wbits = 16 + 15
    inflater = zlib.decompressobj(wbits)
    data = first
    try:
        while True:
            if not data:
                data = raw.read(_CHUNK)
            if not data and not inflater.eof:
                # The input is used up: what the inflater holds back of
                # its output (a piece at a time) comes out without more.
                held = inflater.decompress(b"", _CHUNK)
                if held:
                    yield held
                    continue
                raise BadBody(f"the {encoding} body ends too soon")
            if not data:
                return
            if inflater.eof:
                if wbits != 16 + 15:
                    raise BadBody(f"the {encoding} body goes on past its "
                                  f"end")
                # gzip may hold several members, one after another.
                inflater = zlib.decompressobj(wbits)
            yield inflater.decompress(data, _CHUNK)
            data = (inflater.unused_data if inflater.eof
                    else inflater.unconsumed_tail)
    except zlib.error as error:
        raise BadBody(f"the {encoding} body is corrupt: {error}") from None


def _brotli_inflated(raw: IO[bytes]) -> Iterator[bytes]:
    inflater = brotli.Decompressor()
    try:
        while not inflater.is_finished():
            data = raw.read(_CHUNK) if inflater.can_accept_more_data() \
                else b""
            out = inflater.process(data, output_buffer_limit=_CHUNK)
            if not data and not out and not inflater.is_finished():
                # Nothing more to read, and nothing held back came out.
                raise BadBody("the br body ends too soon")
            yield out
    except brotli.error as error:
        raise BadBody(f"the br body is corrupt: {error}") from None


def json_reply(request: Request, value, code: int = 200,
               headers: Optional[dict] = None, indent: bool = False) -> bytes:
    """A JSON answer, never cached; C{indent}ed for people to read."""
    # Twisted's table of reasons has no 429.
    request.setResponseCode(code, b"Too Many Requests" if code == 429
                            else None)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    for name, text in (headers or {}).items():
        request.setHeader(name.encode("ascii"), text.encode("ascii"))
    try:
        return orjson.dumps(value, option=orjson.OPT_INDENT_2 if indent
                            else None) + b"\n"
    except orjson.JSONEncodeError:
        # What orjson refuses and errors may hold: a lone surrogate, an
        # integer past 64 bits (the standard library's reader keeps them).
        return json.dumps(value, indent=2 if indent else None,
                          default=str).encode() + b"\n"


def answer_later(request: Request, answering: Deferred) -> object:
    """
    Answer with the bytes C{answering} fires with, unless the client has
    gone meanwhile: for a sender told "got it" only once a crash can no
    longer lose it, and for control that takes a while.
    """
    gone: list = []
    request.notifyFinish().addErrback(gone.append)

    def answer(data: bytes) -> None:
        if not gone:
            gone.append("answered")
            # Whole, so sized: not chunked, which costs both ends a
            # chunk's framing and the end its own write.
            request.setHeader(b"content-length", b"%d" % len(data))
            request.write(data)
            request.finish()

    def failed(failure: Failure) -> None:
        _log.failure("Could not answer {path}", failure,
                     path=request.path.decode("ascii", "replace"))
        # Not left waiting until it gives up.
        answer(json_reply(request, {"error": "failed; the log says why"},
                          500))

    answering.addCallback(answer)
    answering.addErrback(failed)
    return NOT_DONE_YET


class ErrorsResource(StrictResource):
    """
    POST /api/errors: failnozzle's JSON records, one object or one per line
    (each as a datagram would be), with HTTP_ERRORS_TOKEN if one is set.
    Answered once they are counted and, with snapshots, in the state file
    (L{failnozzle.service.FailnozzleService.saved_soon}).
    """

    isLeaf = True

    def __init__(self, service) -> None:
        super().__init__()
        self._service = service

    def render_POST(self, request: Request):
        service = self._service
        token = service.settings.HTTP_ERRORS_TOKEN
        if token is not None and not bearer_matches(request, token):
            request.setHeader(b"www-authenticate",
                              b'Bearer realm="failnozzle"')
            return json_reply(request, {"error": "HTTP_ERRORS_TOKEN "
                                                 "required"}, 401)
        if not service.running:
            return json_reply(request, {"error": "failnozzle is stopping"},
                              503)
        try:
            body = InflatedBody(request.content, (request.getHeader(
                b"content-encoding") or b"").decode("latin-1"),
                MAX_ERRORS_BYTES).rest()
        except BodyTooLarge as error:
            return self._refuse(request, f"too large: {error}", 413)
        except BadBody as error:
            return self._refuse(request, str(error), 400)
        # Read whole and checked before any is counted: a refused request
        # sent again is not counted twice.
        records = records_of(body)
        if len(records) > MAX_ERRORS_RECORDS:
            return self._refuse(request, f"more than {MAX_ERRORS_RECORDS:,} "
                                         f"records", 413)
        sender = sender_of(request)
        accepted = bad = 0
        for line in records:
            service.counts.received["http"] += 1
            try:
                report = service.reader.read(line.rstrip(b"\r"), sender)
            except BelowLevel:
                # Taken, as the sender meant it; not an error.
                service.counts.below_level["http"] += 1
                accepted += 1
                continue
            except BadDatagram as error:
                service.report_bad_input(error, sender)
                bad += 1
                continue
            if report is not None:
                service.aggregator.add(report)
                accepted += 1
        saved = service.saved_soon(durable=False)
        return answer_later(request, saved.addCallback(
            lambda _: json_reply(request, {"accepted": accepted,
                                           "bad": bad})))


    def _refuse(self, request: Request, why: str, code: int) -> bytes:
        report_refused(self._service, request, why)
        return json_reply(request, {"error": why}, code)


def records_of(body: bytes) -> list:
    """
    The records of a body of /api/errors: one per line, or one object
    laid out on several (pretty-printed), which is tried only when the
    first line is no JSON by itself.
    """
    lines = [line for line in body.split(b"\n") if line.strip()]
    if len(lines) > 1 and not _is_json(lines[0]):
        try:
            whole = decode_json(body)
        except BadDatagram:
            return lines
        if isinstance(whole, dict):
            return [body]
    return lines


def _is_json(data: bytes) -> bool:
    try:
        decode_json(data)
    except BadDatagram:
        return False
    return True


def bearer_matches(request: Request, token: str) -> bool:
    """Whether the request says C{Authorization: Bearer TOKEN}, compared
    in constant time."""
    given = request.getHeader(b"authorization") or b""
    scheme, _, value = given.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(
        value.strip(), token.encode("ascii"))
