"""
Tests for L{failnozzle.httpin}'s L{InflatedBody}: bodies inflated a piece
at a time, whatever their size and encoding.
"""
import gzip
import io
import os
import zlib

import brotli
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.test.requesthelper import DummyRequest

from failnozzle.httpin import (_CHUNK, BadBody, BodyTooLarge, InflatedBody,
                               answer_later)


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    return compressor.compress(data) + compressor.flush()


#: Each Content-Encoding, and how its bodies are made.
ENCODINGS = (("gzip", gzip.compress), ("deflate", zlib.compress),
             ("deflate", raw_deflate), ("br", brotli.compress))


def bodies() -> list:
    """Bodies of either kind at the sizes where a piece ends (the
    inflaters hold output back there) and well past them."""
    text = b'{"message": "lookup failed for user 17"}\n' * 30_000
    random = os.urandom(len(text))
    return [data[:size] for data in (text, random)
            for size in (_CHUNK - 1, _CHUNK, _CHUNK + 1, 2 * _CHUNK + 1,
                         len(text))]


def inflated(data: bytes, encoding: str, limit: int = 10 ** 8) -> bytes:
    return InflatedBody(io.BytesIO(data), encoding, limit).rest()


class InflatedBodyTests(SynchronousTestCase):

    def test_whole(self):
        """
        Every encoding gives back the whole body, of any size, what the
        inflater holds back at the end of a piece included (bodies just
        past 64 KiB of raw deflate, and past about 100 KiB of br, were
        taken for cut short).
        """
        for encoding, compress in ENCODINGS:
            for data in bodies():
                self.assertEqual(inflated(compress(data), encoding), data,
                                 (encoding, compress, len(data)))

    def test_cut_short(self):
        """A body that ends before its compressed stream does is said to
        end too soon, for every encoding."""
        data = bodies()[-1]
        for encoding, compress in ENCODINGS:
            whole = compress(data)
            with self.assertRaises(BadBody) as caught:
                inflated(whole[:len(whole) // 2], encoding)
            self.assertIn("ends too soon", str(caught.exception))

    def test_over_the_limit(self):
        """What inflates past the limit raises, however it is encoded."""
        for encoding, compress in ENCODINGS:
            with self.assertRaises(BodyTooLarge):
                inflated(compress(b"\0" * 1_000_000), encoding,
                         limit=200_000)


class AnswerLaterTests(SynchronousTestCase):

    def test_answered(self):
        """The bytes the Deferred fires with are the answer."""
        request = DummyRequest([b"x"])
        answering = defer.Deferred()
        self.assertIs(answer_later(request, answering), NOT_DONE_YET)
        answering.callback(b"done")
        self.assertEqual((request.written, request.finished), ([b"done"], 1))

    def test_sized(self):
        """
        Over HTTP/1.1 the answer goes out with its Content-Length, not in
        chunks, and the connection stays open for the next request.
        """
        answering = defer.Deferred()

        class Later(Resource):
            isLeaf = True

            def render_POST(self, request):
                return answer_later(request, answering)

        # Its idle timeout on a clock of its own, not left on the reactor.
        channel = Site(Later(), reactor=Clock()).buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: 0\r\n\r\n")
        answering.callback(b'{"id": "e"}\n')
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertIn(b"\r\nContent-Length: 12", head)
        self.assertNotIn(b"Transfer-Encoding", head)
        self.assertEqual(body, b'{"id": "e"}\n')
        self.assertFalse(transport.disconnecting)

    def test_failed(self):
        """
        A Deferred that fails is logged and answered 500: the client is
        not left waiting until it gives up.
        """
        request = DummyRequest([b"x"])
        request.path = b"/x"
        answer_later(request, defer.fail(KeyError("gone")))
        self.assertEqual((request.responseCode, request.finished), (500, 1))
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_client_gone(self):
        """A client gone before the answer is not written to."""
        request = DummyRequest([b"x"])
        answering = defer.Deferred()
        answer_later(request, answering)
        request.processingFailed(Failure(ConnectionError("gone")))
        answering.callback(b"late")
        self.assertEqual(request.written, [])
