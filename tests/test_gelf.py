"""
Tests for L{failnozzle.gelf}: framing, chunk reassembly and its limits,
inflating within a size limit, the mapping onto a failnozzle record, a
real GELF client library (pygelf), and random input.
"""
import functools
import gzip
import json
import logging
import random
import socket
import tracemalloc
import zlib
from logging.handlers import BufferingHandler

import pygelf
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

import failnozzle.gelf
import failnozzle.ingest
from failnozzle.config import UniqueMessage
from failnozzle.gelf import (CHUNK_TIMEOUT, MAX_CHUNKS, BadChunkHeader,
                             CorruptCompressed, DecompressionBomb,
                             GELFDecoder, GELFNotJSON, GELFRecordReader,
                             IncompleteMessage,
                             InvalidGELF, MessageTooLarge, NotGELF,
                             TooManyChunks, TooManyPartialBytes,
                             TooManyPartialBytesFromHost,
                             TooManyPartialMessages,
                             TooManyPartialMessagesFromHost, is_gelf,
                             looks_like_gelf, record_from_gelf)
from failnozzle.ingest import BadDatagram, RecordReader
from tests.common import WAIT_SECONDS

FIELDS = UniqueMessage._fields
SENDER = ("10.0.0.1", 5000)
MESSAGE_ID = b"\x01\x02\x03\x04\x05\x06\x07\x08"


def gelf(**fields):
    """A GELF message: the required fields and C{fields}."""
    return {"version": "1.1", "host": "web1", "short_message": "boom",
            **fields}


def plain(obj):
    return json.dumps(obj).encode("utf-8")


def zlibbed(obj):
    return zlib.compress(plain(obj))


def gzipped(obj):
    return gzip.compress(plain(obj), mtime=0)


def chunked(payload, size, message_id=MESSAGE_ID, count=None):
    """
    C{payload} cut into GELF chunks of C{size} bytes, in order; C{count}
    overrides the sequence count each chunk gives.
    """
    pieces = [payload[start:start + size]
              for start in range(0, len(payload), size)]
    count = len(pieces) if count is None else count
    return [b"\x1e\x0f" + message_id + bytes([number, count]) + piece
            for number, piece in enumerate(pieces)]


@functools.lru_cache(maxsize=None)
def zeros_compressed(wbits, megabytes=100):
    """
    C{megabytes} MiB of zeros, compressed (zlib or gzip by C{wbits}) a
    mebibyte at a time, so the test never holds them inflated.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    block = bytes(1024 * 1024)
    return b"".join([compressor.compress(block) for _ in range(megabytes)]
                    + [compressor.flush()])


class DecoderTestCase(SynchronousTestCase):
    """
    A L{GELFDecoder} on a L{Clock}, recording the messages it reports
    incomplete.
    """

    def setUp(self):
        self.clock = Clock()
        self.incomplete = []
        self.decoder = self.make_decoder()

    def make_decoder(self, **kwargs):
        return GELFDecoder(
            self.clock,
            on_incomplete=lambda error, sender: self.incomplete.append(
                (error, sender)),
            **kwargs)

    def feed(self, datagrams, sender=SENDER, decoder=None):
        """
        Decode each datagram in turn; all but the last must give None.

        @return: what the last one gave.
        """
        decoder = decoder or self.decoder
        *first, last = datagrams
        for data in first:
            self.assertIsNone(decoder.decode(data, sender))
        return decoder.decode(last, sender)

    def assertBad(self, kind, data, sender=SENDER, decoder=None):
        """
        Decoding C{data} raises C{kind}, a L{BadDatagram} whose text starts
        with its reason.
        """
        error = self.assertRaises(kind, (decoder or self.decoder).decode,
                                  data, sender)
        self.assertIsInstance(error, BadDatagram)
        self.assertTrue(str(error).startswith(kind.reason + ": "), error)
        return error

    def assertHoldsNothing(self, decoder=None):
        decoder = decoder or self.decoder
        self.assertEqual((decoder.partial_messages, decoder.partial_bytes),
                         (0, 0))


class FramingTests(DecoderTestCase):
    """
    Telling the framing of a datagram by its first bytes.
    """

    def test_each_framing(self):
        """
        Plain JSON, zlib, gzip and chunked datagrams of one message all
        give the same record.
        """
        message = gelf(full_message="Traceback")
        expected = record_from_gelf(message)
        for data in (plain(message), zlibbed(message), gzipped(message),
                     zlib.compress(plain(message), 1),
                     zlib.compress(plain(message), 9)):
            self.assertEqual(self.decoder.decode(data, SENDER), expected,
                             data[:2])
        self.assertEqual(self.feed(chunked(plain(message), 20)), expected)

    def test_is_gelf(self):
        """
        Compressed and chunked datagrams are GELF by their first bytes;
        plain JSON, GELF or not, is left for parsing to decide.
        """
        message = gelf()
        for data in (zlibbed(message), gzipped(message),
                     chunked(plain(message), 20)[0]):
            self.assertTrue(is_gelf(data), data[:2])
        for data in (plain(message), b'{"message": "m"}', b"", b"x",
                     b"\x78", b"\x78\x00", b"\x1e", b"\x1f", b" {}"):
            self.assertFalse(is_gelf(data), data)

    def test_zlib_header_check(self):
        """
        0x78 starts zlib only with a second byte that makes the header a
        multiple of 31, as zlib's own levels do.
        """
        self.assertEqual({zlib.compress(b"x", level)[:2]
                          for level in range(10)},
                         {b"\x78\x01", b"\x78\x5e", b"\x78\x9c", b"\x78\xda"})
        for second in range(256):
            self.assertEqual(is_gelf(bytes([0x78, second])),
                             (0x7800 + second) % 31 == 0, second)

    def test_not_gelf(self):
        """
        Anything else is not GELF: text, leading white space, a lone magic
        byte, a zlib-like start with a bad header check.
        """
        for data in (b"", b"x", b"hello", b" {}", b"[1]", b"\x1e",
                     b"\x1f", b"\x78\x00\x00", b"\x00\x00"):
            error = self.assertBad(NotGELF, data)
            self.assertEqual(error.sample, data)

    def test_looks_like_gelf(self):
        """
        A parsed object is GELF when it has both version and
        short_message, which no failnozzle record has.
        """
        self.assertTrue(looks_like_gelf(gelf()))
        self.assertTrue(looks_like_gelf({"version": None,
                                         "short_message": None}))
        for obj in ({}, {"message": "m", "source": "h"},
                    {"version": "1.1"}, {"short_message": "m"}):
            self.assertFalse(looks_like_gelf(obj), obj)

    def test_json_not_gelf(self):
        """
        JSON without version or short_message is not a GELF message.
        """
        for obj in ({"message": "m"}, {"version": "1.1"},
                    {"short_message": "m"}):
            for data in (plain(obj), zlibbed(obj), gzipped(obj)):
                error = self.assertBad(InvalidGELF, data)
                self.assertEqual(error.sample, plain(obj))

    def test_not_json(self):
        """
        A compressed or chunked message that is not UTF-8 JSON, or not an
        object, or nested too deep for the parser.
        """
        for payload in (b"not json", b"[1, 2]", b'"text"', b"null",
                        b"\xff\xfe{}", b'{"short_message": "caf\xe9"}',
                        "{}".encode("utf-16"), b"[" * 100000,
                        b'{"a": 1', b"{} trailing"):
            for data in (zlib.compress(payload),
                         gzip.compress(payload, mtime=0)):
                error = self.assertBad(GELFNotJSON, data)
                self.assertEqual(error.sample, payload[:120])
        self.assertBad(GELFNotJSON, b'{"a": 1')
        *first, last = chunked(b'{"a": 1', 3)
        self.assertIsNone(self.feed(first))
        self.assertBad(GELFNotJSON, last)

    def test_nan_kept_as_text(self):
        """
        NaN and Infinity are read as text, as in failnozzle's own JSON, so
        the same error always has the same key; as a level, which must be
        a syslog severity, they are no level.
        """
        record = self.decoder.decode(
            zlib.compress(b'{"version": "1.1", "short_message": "m", '
                          b'"line": NaN, "level": Infinity}'), SENDER)
        self.assertEqual((record["lineno"], record["level"]), ("NaN", None))


class MappingTests(SynchronousTestCase):
    """
    L{record_from_gelf}: GELF fields onto failnozzle's.
    """

    def test_table(self):
        """
        Each GELF field goes where docs/gelf.rst's table says; the filename
        is the file's basename.
        """
        record = record_from_gelf(gelf(
            short_message="disk full", full_message="Traceback\n  line",
            host="db1", _kind="backup", file="/srv/app/backup.py", line=42,
            _module="backup", _funcName="run", level=3, timestamp=1.5,
            _other="ignored"))
        self.assertEqual(record, {
            "message": "disk full", "exc_text": "Traceback\n  line",
            "source": "db1", "kind": "backup",
            "pathname": "/srv/app/backup.py", "filename": "backup.py",
            "lineno": 42, "module": "backup", "funcName": "run",
            "level": 3})

    def test_missing_fields(self):
        """
        Optional fields that are missing or null are None; the kind is
        'gelf'.
        """
        self.assertEqual(
            record_from_gelf({"version": "1.0", "short_message": "m",
                              "file": None, "_kind": None}),
            {"message": "m", "exc_text": None, "source": None,
             "kind": "gelf", "pathname": None, "filename": None,
             "lineno": None, "module": None, "funcName": None,
             "level": None})

    def test_level(self):
        """
        The level is kept when it is a syslog severity, 0 to 7 (a whole
        float too); anything else is no level rather than a wrong one.
        """
        for level, kept in [(0, 0), (3, 3), (7, 7), (3.0, 3), (8, None),
                            (-1, None), (2.5, None), ("3", None),
                            (True, None), (None, None)]:
            record = record_from_gelf(gelf(short_message="m", level=level))
            self.assertEqual(record["level"], kept, level)

    def test_kind_preference(self):
        """
        The kind is _kind, else _facility, else facility, else the default
        kind, which is configurable.
        """
        fields = {"_kind": "a", "_facility": "b", "facility": "c"}
        for dropped, kind in (((), "a"), (("_kind",), "b"),
                              (("_kind", "_facility"), "c")):
            message = gelf(**{name: value for name, value in fields.items()
                              if name not in dropped})
            self.assertEqual(record_from_gelf(message)["kind"], kind)
        self.assertEqual(
            record_from_gelf(gelf(), default_kind="app")["kind"], "app")

    def test_alternatives(self):
        """
        GELF 1.1's _file and _line, and _function (graypy's name) or _func
        (pygelf's), stand in for file, line and _funcName; the latter win
        when both are there.
        """
        record = record_from_gelf(gelf(_file="a/b.py", _line="7",
                                       _function="f"))
        self.assertEqual(
            (record["pathname"], record["filename"], record["lineno"],
             record["funcName"]), ("a/b.py", "b.py", "7", "f"))
        self.assertEqual(record_from_gelf(gelf(_func="h"))["funcName"], "h")
        self.assertEqual(
            record_from_gelf(gelf(_function="f", _func="h"))["funcName"],
            "f")
        record = record_from_gelf(gelf(
            file="x.py", _file="y.py", line=1, _line=2, _funcName="g",
            _function="f"))
        self.assertEqual(
            (record["pathname"], record["lineno"], record["funcName"]),
            ("x.py", 1, "g"))

    def test_filename(self):
        """
        The basename of Windows paths too; a file that is no string is
        kept as it is.
        """
        for path, name in (("C:\\app\\views.py", "views.py"),
                           ("views.py", "views.py"), ("/srv/", ""),
                           ("Main.java", "Main.java")):
            self.assertEqual(record_from_gelf(gelf(file=path))["filename"],
                             name, path)
        self.assertEqual(record_from_gelf(gelf(file=5))["filename"], 5)

    def test_source_field(self):
        """
        The host goes into the configured source field.
        """
        record = record_from_gelf(gelf(host="db1"), source_field="node")
        self.assertEqual(record["node"], "db1")
        self.assertNotIn("source", record)

    def test_required_fields(self):
        """
        A version or short_message that is missing or no string is
        rejected, saying which.
        """
        for obj, detail in (
                ({"version": "1.1"}, "short_message is missing"),
                ({"short_message": "m"}, "version is missing"),
                ({"version": 1.1, "short_message": "m"},
                 "version is a number"),
                ({"version": "1.1", "short_message": None},
                 "short_message is null"),
                ({"version": "1.1", "short_message": ["m"]},
                 "short_message is an array")):
            error = self.assertRaises(InvalidGELF, record_from_gelf, obj)
            self.assertIn(detail, str(error))

    def test_report_of(self):
        """
        The record gives RecordReader its key, in UNIQUE_MSG_TUPLE order,
        and the host as source; a multi-line short_message is clipped as
        failnozzle's own are.
        """
        reader = RecordReader(FIELDS, "source", 65536)
        key, source, *_ = reader.report_of(record_from_gelf(gelf(
            short_message="first\nsecond", host="web2", _facility="cron",
            _file="/a/job.py", _line=3, _module="job", _function="main")))
        self.assertEqual(dict(zip(FIELDS, key)), {
            "module": "job", "funcName": "main", "filename": "job.py",
            "message": "first", "pathname": "/a/job.py", "lineno": 3,
            "exc_text": "first\nsecond", "kind": "cron"})
        self.assertEqual(source, "web2")

    def test_decoder_settings(self):
        """
        The decoder maps with its source field and default kind.
        """
        decoder = GELFDecoder(Clock(), source_field="node",
                              default_kind="app")
        record = decoder.decode(zlibbed(gelf(host="db1")), SENDER)
        self.assertEqual((record["node"], record["kind"]), ("db1", "app"))


class ChunkTests(DecoderTestCase):
    """
    Reassembling chunked messages.
    """

    def test_chunked_framings(self):
        """
        A message chunked uncompressed, zlib-compressed or gzipped is
        reassembled, and nothing is held afterwards.
        """
        message = gelf(full_message="x" * 3000)
        for number, payload in enumerate(
                (plain(message), zlibbed(message), gzipped(message))):
            datagrams = chunked(payload, max(1, len(payload) // 5),
                                bytes([number]) * 8)
            self.assertGreater(len(datagrams), 4)
            self.assertEqual(self.feed(datagrams), record_from_gelf(message))
            self.assertHoldsNothing()

    def test_out_of_order(self):
        """
        Chunks may arrive in any order.
        """
        message = gelf(full_message="y" * 1000)
        for seed in range(5):
            shuffled = chunked(zlibbed(message), 7, bytes([seed]) * 8)
            random.Random(seed).shuffle(shuffled)
            self.assertEqual(self.feed(shuffled), record_from_gelf(message))
        self.assertEqual(self.feed(chunked(zlibbed(message), 7)[::-1]),
                         record_from_gelf(message))
        self.assertHoldsNothing()

    def test_duplicates_ignored(self):
        """
        A chunk received twice is ignored the second time, even when its
        body differs.
        """
        message = gelf(short_message="once")
        first, second, third = chunked(plain(message),
                                       len(plain(message)) // 3 + 1)
        forged = first[:12] + b"X" * (len(first) - 12)
        self.assertEqual(self.feed([first, first, second, forged, second,
                                    third]),
                         record_from_gelf(message))
        self.assertHoldsNothing()

    def test_single_chunk(self):
        """
        A message in one chunk is complete at once and never held.
        """
        message = gelf()
        [datagram] = chunked(zlibbed(message), 10000)
        self.assertEqual(self.decoder.decode(datagram, SENDER),
                         record_from_gelf(message))
        self.assertHoldsNothing()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_most_chunks(self):
        """
        A message in 128 chunks, the most GELF allows, is reassembled.
        """
        length = MAX_CHUNKS * 40 - len(plain(gelf(full_message="")))
        datagrams = chunked(plain(gelf(full_message="z" * length)), 40)
        self.assertEqual(len(datagrams), MAX_CHUNKS)
        self.assertEqual(self.feed(datagrams)["exc_text"], "z" * length)

    def test_interleaved(self):
        """
        Chunks of several messages may interleave; each is reassembled by
        its id.
        """
        messages = [gelf(short_message=f"m{number}") for number in range(3)]
        streams = [chunked(zlibbed(message), 10, bytes([number]) * 8)
                   for number, message in enumerate(messages)]
        results = []
        for datagrams in zip(*streams):
            for datagram in datagrams:
                results.append(self.decoder.decode(datagram, SENDER))
        done = [result["message"] for result in results if result]
        self.assertEqual(done, ["m0", "m1", "m2"])
        self.assertHoldsNothing()

    def test_by_host(self):
        """
        The same message id from two hosts is two messages; from two ports
        of one host, it is one.
        """
        one, two = (plain(gelf(short_message=name)) for name in ("a", "b"))
        first_one, second_one = chunked(one, len(one) // 2 + 1)
        first_two, second_two = chunked(two, len(two) // 2 + 1)
        self.assertIsNone(self.decoder.decode(first_one, ("10.0.0.1", 1)))
        self.assertIsNone(self.decoder.decode(first_two, ("10.0.0.2", 1)))
        self.assertEqual(self.decoder.partial_messages, 2)
        self.assertEqual(
            self.decoder.decode(second_two, ("10.0.0.2", 1))["message"], "b")
        self.assertEqual(
            self.decoder.decode(second_one, ("10.0.0.1", 2))["message"], "a")
        self.assertHoldsNothing()

    def test_bad_headers(self):
        """
        A chunk too short for its header, a sequence count of 0, or a
        sequence number not below the count is rejected and not held.
        """
        header = b"\x1e\x0f" + MESSAGE_ID
        for data, detail in (
                (b"\x1e\x0f", "2 bytes, shorter than the 12-byte header"),
                (header + b"\x00", "11 bytes"),
                (header + b"\x00\x00body", "sequence number 0 of count 0"),
                (header + b"\x02\x02body", "sequence number 2 of count 2"),
                (header + b"\xff\x80body", "sequence number 255 of count")):
            error = self.assertBad(BadChunkHeader, data)
            self.assertIn(detail, str(error))
            self.assertEqual(error.sample, data[:120])
        self.assertHoldsNothing()

    def test_count_changes(self):
        """
        A chunk whose sequence count differs from its message's earlier
        chunks is rejected; the message still completes.
        """
        message = gelf()
        first, second = chunked(plain(message), len(plain(message)) // 2 + 1)
        self.assertIsNone(self.decoder.decode(first, SENDER))
        error = self.assertBad(BadChunkHeader,
                               chunked(b"xyz", 1, count=3)[1])
        self.assertIn("sequence count 3, earlier chunks said 2", str(error))
        self.assertEqual(self.decoder.decode(second, SENDER),
                         record_from_gelf(message))

    def test_too_many_chunks(self):
        """
        A sequence count above 128 is rejected.
        """
        for count in (129, 255):
            error = self.assertBad(TooManyChunks,
                                   chunked(b"x", 1, count=count)[0])
            self.assertIn(f"sequence count {count}", str(error))
        self.assertHoldsNothing()

    def test_nested_chunk(self):
        """
        A reassembled message that is itself a chunk is not GELF.
        """
        inner = chunked(plain(gelf()), 10000, b"inner id")[0]
        error = self.assertBad(NotGELF,
                               chunked(inner, 10000, b"outer id")[0])
        self.assertIn("chunked message holds a chunk", str(error))

    def test_empty_message(self):
        """
        Chunks with empty bodies make an empty message, which is not GELF.
        """
        header = b"\x1e\x0f" + MESSAGE_ID
        self.assertIsNone(self.decoder.decode(header + b"\x00\x02", SENDER))
        self.assertBad(NotGELF, header + b"\x01\x02")
        self.assertHoldsNothing()


class ExpiryTests(DecoderTestCase):
    """
    Incomplete messages expire after five seconds, and are reported.
    """

    def start(self, message_id=MESSAGE_ID, sender=SENDER):
        """
        Send the first of two chunks of a message.

        @return: the second chunk.
        """
        payload = plain(gelf(short_message=repr(message_id)))
        first, second = chunked(payload, len(payload) // 2 + 1, message_id)
        self.assertIsNone(self.decoder.decode(first, sender))
        return second

    def test_completes_in_time(self):
        """
        The last chunk just before the deadline completes the message,
        and no timer is left running once it has fired.
        """
        second = self.start()
        self.clock.advance(CHUNK_TIMEOUT - 0.1)
        self.assertEqual(self.decoder.decode(second, SENDER)["message"],
                         repr(MESSAGE_ID))
        self.clock.advance(0.1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.incomplete, [])

    def test_expires(self):
        """
        Five seconds after its first chunk an incomplete message is dropped
        and reported with its sender; a chunk that comes later starts a new
        message, which does not complete.
        """
        second = self.start(sender=("10.0.0.9", 1234))
        self.clock.advance(CHUNK_TIMEOUT - 0.1)
        self.assertEqual(self.decoder.partial_messages, 1)
        self.assertEqual(self.incomplete, [])
        self.clock.advance(0.1)
        self.assertHoldsNothing()
        [(error, sender)] = self.incomplete
        self.assertIsInstance(error, IncompleteMessage)
        self.assertEqual(str(error), "chunked GELF message never completed: "
                                     "1 of 2 chunks after 5 s")
        self.assertEqual(error.sample[:2], b"\x1e\x0f")
        self.assertEqual(sender, ("10.0.0.9", 1234))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsNone(self.decoder.decode(second, SENDER))
        self.assertEqual(self.decoder.partial_messages, 1)

    def test_each_deadline(self):
        """
        Each message expires five seconds after its own first chunk, also
        when the oldest completed before.
        """
        done = self.start(b"AAAAAAAA")
        self.clock.advance(1)
        self.start(b"BBBBBBBB")
        self.clock.advance(1)
        self.start(b"CCCCCCCC")
        self.decoder.decode(done, SENDER)
        self.clock.advance(CHUNK_TIMEOUT - 2)
        self.assertEqual(self.incomplete, [])
        self.clock.advance(1)
        self.assertEqual(self.samples(), [b"BBBBBBBB"])
        self.clock.advance(1)
        self.assertEqual(self.samples(), [b"BBBBBBBB", b"CCCCCCCC"])
        self.assertHoldsNothing()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def samples(self):
        """The message ids of the messages reported incomplete."""
        return [error.sample[2:10] for error, _ in self.incomplete]

    def test_expired_when_busy(self):
        """
        A message past its deadline no longer counts against the limits
        even when the timer could not run yet (the reactor busy with a
        burst of datagrams).
        """
        self.decoder = self.make_decoder(max_partials=1)
        self.start(b"AAAAAAAA")
        self.assertRaises(TooManyPartialMessages, self.start, b"BBBBBBBB")
        self.clock.rightNow += CHUNK_TIMEOUT
        self.start(b"BBBBBBBB")
        self.assertEqual(self.samples(), [b"AAAAAAAA"])
        self.assertEqual(self.decoder.partial_messages, 1)

    def test_stop(self):
        """
        Stopping drops what is held, reports it, and leaves no timer.
        """
        self.start(b"AAAAAAAA")
        self.start(b"BBBBBBBB", ("10.0.0.2", 1))
        self.decoder.stop()
        self.assertHoldsNothing()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(
            [(str(error), sender) for error, sender in self.incomplete],
            [("chunked GELF message never completed: 1 of 2 chunks at "
              "shutdown", SENDER),
             ("chunked GELF message never completed: 1 of 2 chunks at "
              "shutdown", ("10.0.0.2", 1))])

    def test_without_callback(self):
        """
        Without on_incomplete, an expired message is dropped all the same.
        """
        self.decoder = GELFDecoder(self.clock)
        self.start()
        self.clock.advance(CHUNK_TIMEOUT)
        self.assertHoldsNothing()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LimitTests(DecoderTestCase):
    """
    The caps on partial messages, on the bytes they hold, and on a
    message's size.
    """

    def test_max_partials(self):
        """
        Past max_partials a new message is rejected, while chunks of the
        messages held are still taken; once one completes there is room.
        """
        self.decoder = self.make_decoder(max_partials=2)
        streams = [chunked(plain(gelf(short_message=str(number))), 30,
                           bytes([number]) * 8) for number in range(3)]
        self.decoder.decode(streams[0][0], SENDER)
        self.decoder.decode(streams[1][0], SENDER)
        error = self.assertBad(TooManyPartialMessages, streams[2][0])
        self.assertIn("2 held already", str(error))
        self.assertEqual(self.decoder.partial_messages, 2)
        self.assertEqual(self.feed(streams[0][1:])["message"], "0")
        self.assertEqual(self.feed(streams[2])["message"], "2")
        self.assertEqual(self.feed(streams[1][1:])["message"], "1")
        self.assertHoldsNothing()

    def test_max_partial_bytes(self):
        """
        A chunk that would take the bytes held past max_partial_bytes is
        rejected, and the message it belongs to dropped, as it can never
        complete; a first chunk past it holds nothing.
        """
        self.decoder = self.make_decoder(max_partial_bytes=150)
        small = chunked(plain(gelf(short_message="s" * 40)), 40, b"small id")
        big = chunked(plain(gelf(short_message="b" * 200)), 70, b"big id..")
        self.decoder.decode(small[0], SENDER)
        self.decoder.decode(big[0], SENDER)
        self.assertEqual(self.decoder.partial_bytes, 110)
        error = self.assertBad(TooManyPartialBytes, big[1])
        self.assertIn("70 more bytes on 110 held, the limit is 150",
                      str(error))
        self.assertEqual(self.decoder.partial_bytes, 40)
        self.assertEqual(self.decoder.partial_messages, 1)
        error = self.assertBad(TooManyPartialBytes,
                               chunked(b"x" * 240, 120, b"third id")[0])
        self.assertEqual(self.decoder.partial_bytes, 40)
        self.assertEqual(self.feed(small[1:])["message"], "s" * 40)
        self.assertHoldsNothing()

    def held(self, *datagrams):
        """The bytes of chunk bodies in C{datagrams}."""
        return sum(len(data) - 12 for data in datagrams)

    def test_completing_chunk_at_limit(self):
        """
        The chunk that completes a message is taken even at the limit: it
        frees the bytes held rather than adding to them.
        """
        payload = plain(gelf())
        datagrams = chunked(payload, len(payload) // 2 + 1)
        self.decoder = self.make_decoder(
            max_partial_bytes=self.held(datagrams[0]))
        self.assertEqual(self.feed(datagrams), record_from_gelf(gelf()))

    def test_max_size(self):
        """
        A reassembled uncompressed message may be max_size bytes, no more.
        """
        payload = plain(gelf(short_message="m" * 200))
        exact = self.make_decoder(max_size=len(payload))
        self.assertEqual(self.feed(chunked(payload, 50), decoder=exact),
                         record_from_gelf(gelf(short_message="m" * 200)))
        smaller = self.make_decoder(max_size=len(payload) - 1)
        *first, last = chunked(payload, 50)
        self.assertIsNone(self.feed(first, decoder=smaller))
        error = self.assertBad(MessageTooLarge, last, decoder=smaller)
        self.assertIn(f"{len(payload)} bytes, more than {len(payload) - 1}",
                      str(error))
        self.assertHoldsNothing(smaller)

    def test_defaults(self):
        """
        By default a message may inflate to 1 MiB, 1000 partial messages
        may be held, and 32 MiB of chunks; 100 of the messages and 4 MiB
        from one host.
        """
        decoder = GELFDecoder(Clock())
        self.assertEqual(decoder.max_size, 1024 * 1024)
        for number in range(1000):
            decoder.decode(chunked(b"x" * 4, 2, number.to_bytes(8, "big"))[0],
                           (f"10.0.0.{number // 100}", 5000))
        self.assertEqual(decoder.partial_messages, 1000)
        self.assertBad(TooManyPartialMessages,
                       chunked(b"x" * 4, 2, b"one more")[0],
                       ("10.0.1.1", 5000), decoder=decoder)
        self.assertBad(TooManyPartialMessagesFromHost,
                       chunked(b"x" * 4, 2, b"one more")[0], decoder=decoder)
        decoder.stop()
        body = b"x" * 60000
        for number in range(559):
            decoder.decode(b"\x1e\x0f" + number.to_bytes(8, "big") + b"\x00\x02"
                           + body, (f"10.0.0.{number // 69}", 5000))
        self.assertEqual(decoder.partial_bytes, 559 * 60000)
        self.assertEqual(decoder.held_by("10.0.0.0"), (69, 69 * 60000))
        self.assertBad(TooManyPartialBytes,
                       b"\x1e\x0fone more\x00\x02" + body,
                       ("10.0.1.1", 5000), decoder=decoder)
        self.assertBad(TooManyPartialBytesFromHost,
                       b"\x1e\x0fone more\x00\x02" + body, decoder=decoder)
        decoder.stop()


class HostLimitTests(DecoderTestCase):
    """
    One host's chunks cannot take the room of another's.
    """

    def streams(self, count, size=30):
        """C{count} chunked messages, each in chunks of C{size} bytes."""
        return [chunked(plain(gelf(short_message=str(number))), size,
                        number.to_bytes(8, "big")) for number in range(count)]

    def test_partials_per_host(self):
        """
        Past max_partials_per_host a new message from that host is
        rejected; other hosts' messages are still taken and complete.
        """
        self.decoder = self.make_decoder(max_partials=10,
                                         max_partials_per_host=3)
        flood = self.streams(5)
        for stream in flood[:3]:
            self.decoder.decode(stream[0], SENDER)
        error = self.assertBad(TooManyPartialMessagesFromHost, flood[3][0])
        self.assertIn("3 held already from 10.0.0.1", str(error))
        self.assertEqual(self.decoder.held_by("10.0.0.1")[0], 3)
        other = ("10.0.0.2", 5000)
        for stream in self.streams(3):
            self.assertIsNone(self.decoder.decode(stream[0], other))
        self.assertEqual(self.feed(self.streams(3)[2][1:], other)["message"],
                         "2")
        self.assertEqual(self.feed(flood[0][1:])["message"], "0")
        self.assertEqual(self.feed(flood[4])["message"], "4")

    def test_bytes_per_host(self):
        """
        Past max_partial_bytes_per_host a chunk from that host is rejected
        and its message dropped; another host's chunks are still taken.
        """
        self.decoder = self.make_decoder(max_partial_bytes=1000,
                                         max_partial_bytes_per_host=40)
        [big] = self.streams(1, size=10)
        for data in big[:4]:
            self.decoder.decode(data, SENDER)
        error = self.assertBad(TooManyPartialBytesFromHost, big[4])
        self.assertIn("10 more bytes on 40 held from 10.0.0.1, the limit is "
                      "40", str(error))
        self.assertEqual(self.decoder.held_by("10.0.0.1"), (0, 0))
        other = ("10.0.0.2", 5000)
        self.assertEqual(self.feed(self.streams(1, size=30)[0],
                                   other)["message"], "0")
        self.assertHoldsNothing()

    def test_flood_does_not_stop_others(self):
        """
        A host sending 5,000 first chunks that never complete, under the
        default limits, leaves room for every message of another host.
        """
        decoder = GELFDecoder(self.clock)
        for number in range(5000):
            try:
                decoder.decode(b"\x1e\x0f" + number.to_bytes(8, "big")
                               + b"\x00\x02" + b"x" * 8000, SENDER)
            except BadDatagram:
                pass
        self.assertEqual(decoder.held_by(SENDER[0]), (100, 800000))
        other = ("10.0.0.2", 5000)
        for stream in self.streams(50, size=20):
            self.assertEqual(self.feed(stream, other, decoder)["source"],
                             "web1")
        decoder.stop()


class ResentChunkTests(DecoderTestCase):
    """
    Chunks of a message that completed, sent again, are not a new message.
    """

    def test_resent_after_completion(self):
        """
        Every chunk of a completed message, sent again within
        CHUNK_TIMEOUT, is dropped: nothing is held, nothing is reported
        incomplete.
        """
        message = gelf(short_message="once")
        datagrams = chunked(plain(message), 20)
        self.assertEqual(self.feed(datagrams), record_from_gelf(message))
        for data in datagrams[::-1] + datagrams:
            self.assertIsNone(self.decoder.decode(data, SENDER))
        self.assertHoldsNothing()
        self.clock.advance(CHUNK_TIMEOUT)
        self.assertEqual(self.incomplete, [])
        self.assertEqual(self.decoder.completed_ids, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_same_id_from_another_host(self):
        """
        The same id from another host is another message.
        """
        datagrams = chunked(plain(gelf()), 20)
        self.feed(datagrams)
        self.assertEqual(self.feed(datagrams, ("10.0.0.2", 1)),
                         record_from_gelf(gelf()))

    def test_forgotten_after_timeout(self):
        """
        After CHUNK_TIMEOUT the id is forgotten: a sender may use it again.
        """
        datagrams = chunked(plain(gelf()), 20)
        self.feed(datagrams)
        self.assertEqual(self.decoder.completed_ids, 1)
        self.clock.advance(CHUNK_TIMEOUT)
        self.assertEqual(self.feed(datagrams), record_from_gelf(gelf()))

    def test_bounded(self):
        """
        At most max_completed ids are remembered; the oldest goes first.
        """
        self.decoder = self.make_decoder(max_completed=2)
        streams = [chunked(plain(gelf()), 20, bytes([number]) * 8)
                   for number in range(3)]
        for stream in streams:
            self.feed(stream)
        self.assertEqual(self.decoder.completed_ids, 2)
        self.assertIsNone(self.decoder.decode(streams[2][0], SENDER))
        self.assertIsNone(self.decoder.decode(streams[0][0], SENDER))
        self.assertEqual(self.decoder.partial_messages, 1)


class GELFCapTests(SynchronousTestCase):
    """
    A GELF message's texts are capped like those of failnozzle's JSON,
    however large it inflates.
    """

    def test_inflated_capped(self):
        """
        A zlib message inflating to about 1 MiB gives a key of capped
        texts: exc_text cut in the middle, message, kind and source at
        the end.
        """
        reader = GELFRecordReader(FIELDS, "source", 65507,
                                  GELFDecoder(Clock()))
        data = zlibbed(gelf(short_message="s" * 300000,
                            full_message="f" * 400000 + "the end",
                            host="h" * 5000, _kind="k" * 200000))
        self.assertLess(len(data), 10000)
        key, source, level, *_ = reader.read(data, SENDER)
        fields = dict(zip(FIELDS, key))
        self.assertLessEqual(len(fields["exc_text"]), 16384)
        self.assertTrue(fields["exc_text"].endswith("the end"))
        self.assertEqual(len(fields["message"]), 1000)
        self.assertEqual(len(fields["kind"]), 1000)
        self.assertEqual(len(source), 1000)

    def test_plain_capped(self):
        """
        So is a plain JSON GELF message.
        """
        reader = GELFRecordReader(FIELDS, "source", 65507,
                                  GELFDecoder(Clock()),
                                  max_field_chars=50)
        key, source, *_ = reader.read(
            plain(gelf(short_message="s" * 60)), SENDER)
        self.assertEqual(len(dict(zip(FIELDS, key))["message"]), 50)


class CompressionTests(DecoderTestCase):
    """
    Inflating within the size limit, and compressed data that is corrupt.
    """

    def assertBomb(self, data, compressed):
        """
        C{data}, which holds the compressed data C{compressed}, is
        rejected as a bomb, having cost no more memory than a few times
        the size limit.
        """
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        error = self.assertBad(DecompressionBomb, data)
        peak = tracemalloc.get_traced_memory()[1]
        self.assertLess(peak, 4 * self.decoder.max_size)
        self.assertIn(f"{len(compressed)} bytes inflate to more than 1048576",
                      str(error))

    def test_zlib_bomb(self):
        """
        100 MiB of zeros, zlib-compressed to 100 kB, are rejected without
        being inflated.
        """
        data = zeros_compressed(zlib.MAX_WBITS)
        self.assertLess(len(data), 110000)
        self.assertBomb(data, data)

    def test_gzip_bomb(self):
        """
        The same gzipped.
        """
        data = zeros_compressed(16 + zlib.MAX_WBITS)
        self.assertEqual(data[:2], b"\x1f\x8b")
        self.assertBomb(data, data)

    def test_chunked_bomb(self):
        """
        The same in chunks: reassembled, then rejected; nothing is held.
        """
        data = zeros_compressed(zlib.MAX_WBITS)
        *first, last = chunked(data, 60000)
        self.assertIsNone(self.feed(first))
        self.assertBomb(last, data)
        self.assertHoldsNothing()

    def test_size_limit(self):
        """
        A message may inflate to max_size bytes, not one more.
        """
        message = gelf(full_message="x" * 5000)
        size = len(plain(message))
        for data in (zlibbed(message), gzipped(message)):
            exact = self.make_decoder(max_size=size)
            self.assertEqual(exact.decode(data, SENDER),
                             record_from_gelf(message))
            smaller = self.make_decoder(max_size=size - 1)
            self.assertBad(DecompressionBomb, data, decoder=smaller)

    def test_truncated(self):
        """
        Compressed data cut anywhere is corrupt.
        """
        for data in (zlibbed(gelf()), gzipped(gelf())):
            for end in range(2, len(data)):
                error = self.assertBad(CorruptCompressed, data[:end])
                self.assertEqual(error.sample, data[:end][:120])
        error = self.assertBad(CorruptCompressed, zlibbed(gelf())[:-4])
        self.assertIn("the compressed data is cut short", str(error))

    def test_checksum(self):
        """
        A wrong Adler-32 (zlib) or CRC-32 (gzip) is corrupt data.
        """
        data = bytearray(zlibbed(gelf()))
        data[-1] ^= 1
        error = self.assertBad(CorruptCompressed, bytes(data))
        self.assertIn("incorrect data check", str(error))
        data = bytearray(gzipped(gelf()))
        data[-5] ^= 1
        error = self.assertBad(CorruptCompressed, bytes(data))
        self.assertIn("incorrect data check", str(error))

    def test_bad_stream(self):
        """
        A deflate stream that is not one, or a zlib header that asks for a
        preset dictionary, is corrupt data.
        """
        for data in (b"\x78\x9c" + b"\xff" * 20, b"\x1f\x8b" + b"\x00" * 20,
                     b"\x78\xbb" + zlibbed(gelf())[2:]):
            self.assertBad(CorruptCompressed, data)

    def test_trailing_data(self):
        """
        Bytes after the end of the compressed stream are corrupt data, not
        silently ignored.
        """
        for data in (zlibbed(gelf()), gzipped(gelf())):
            error = self.assertBad(CorruptCompressed, data + b"junk")
            self.assertIn("4 bytes after the compressed data", str(error))


class RejectionTests(SynchronousTestCase):
    """
    The kinds of rejection, which the receiver counts and reports by their
    reasons.
    """

    def test_reasons_distinct(self):
        """
        Each kind of rejection is a BadDatagram with a reason of its own,
        none shared with failnozzle's own JSON, so a digest tells them
        apart.
        """
        kinds = [value for value in vars(failnozzle.gelf).values()
                 if isinstance(value, type) and issubclass(value, BadDatagram)
                 and value is not BadDatagram]
        self.assertEqual(len(kinds), 13)
        ours = [kind.reason for kind in kinds]
        theirs = [value.reason for value in vars(failnozzle.ingest).values()
                  if isinstance(value, type)
                  and issubclass(value, BadDatagram)]
        self.assertEqual(len(set(ours)), len(ours))
        self.assertEqual(set(ours) & set(theirs), set())


class PygelfTests(SynchronousTestCase):
    """
    What a real GELF client, pygelf's UDP handler, sends over a real socket
    on 127.0.0.1 is decoded as sent.
    """

    def setUp(self):
        self.receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(self.receiver.close)
        self.receiver.bind(("127.0.0.1", 0))
        self.receiver.settimeout(WAIT_SECONDS)
        # A logger of its own, outside logging's registry: nothing global
        # changes.
        self.logger = logging.Logger("app.payments")
        self.kept = BufferingHandler(capacity=10)
        self.logger.addHandler(self.kept)

    def send(self, **options):
        """
        Log an exception through a pygelf UDP handler made with
        C{options}.

        @return: the log record, and the datagrams it became.
        """
        handler = pygelf.GelfUdpHandler(*self.receiver.getsockname(),
                                        **options)
        self.logger.addHandler(handler)
        noise = random.Random(12201).randbytes(8000).hex()
        try:
            raise ValueError(noise)
        except ValueError:
            self.logger.exception("payment failed for order %d", 42)
        self.logger.removeHandler(handler)
        handler.close()
        datagrams = [self.receiver.recv(65535)]
        if datagrams[0][:2] == b"\x1e\x0f":
            datagrams += [self.receiver.recv(65535)
                          for _ in range(datagrams[0][11] - 1)]
        [record] = self.kept.buffer
        return record, datagrams

    def assertSent(self, record, result):
        """
        C{result} is the failnozzle record for the LogRecord C{record}.
        """
        self.assertEqual(result["message"], "payment failed for order 42")
        self.assertTrue(result["exc_text"].startswith(
            "Traceback (most recent call last):\n"))
        self.assertIn(str(record.exc_info[1]), result["exc_text"])
        self.assertEqual(result["source"], socket.gethostname())
        self.assertEqual(result["level"], 3)

    def test_default_settings(self):
        """
        In its default settings (compression on, 1300-byte chunks) pygelf
        sends a large traceback zlib-compressed in chunks, which are
        reassembled in any order; it names no kind, so the kind is 'gelf'.
        """
        record, datagrams = self.send()
        self.assertGreater(len(datagrams), 3)
        self.assertTrue(all(data[:2] == b"\x1e\x0f" for data in datagrams))
        self.assertTrue(all(is_gelf(data) for data in datagrams))
        self.assertEqual(max(map(len, datagrams)), 1300 + 12)
        message = b"".join(data[12:] for data in datagrams)
        self.assertEqual(message[:1], b"\x78")
        result = self.feed(GELFDecoder(Clock()), datagrams)
        self.assertSent(record, result)
        self.assertEqual(result["kind"], "gelf")
        self.assertIsNone(result["pathname"])
        self.assertEqual(self.feed(GELFDecoder(Clock()), datagrams[::-1]),
                         result)
        key, source, *_ = RecordReader(FIELDS, "source", 65536).report_of(
            result)
        self.assertEqual(dict(zip(FIELDS, key))["message"],
                         "payment failed for order 42")
        self.assertEqual(source, socket.gethostname())

    def feed(self, decoder, datagrams):
        """Decode the datagrams in turn; the last gives the record."""
        *first, last = datagrams
        self.assertEqual([decoder.decode(data, ("127.0.0.1", 1))
                          for data in first], [None] * len(first))
        return decoder.decode(last, ("127.0.0.1", 1))

    def test_debug_fields(self):
        """
        With debug on and a _kind field, the code location and the kind
        are in the record too; a datagram under the chunk size is sent
        whole.
        """
        record, datagrams = self.send(debug=True, _kind="payments",
                                      chunk_size=65000)
        [data] = datagrams
        self.assertTrue(is_gelf(data))
        result = GELFDecoder(Clock()).decode(data, ("127.0.0.1", 1))
        self.assertSent(record, result)
        self.assertEqual(
            {name: result[name] for name in ("kind", "pathname", "filename",
                                             "lineno", "module",
                                             "funcName")},
            {"kind": "payments", "pathname": "test_gelf.py",
             "filename": "test_gelf.py", "lineno": record.lineno,
             "module": "test_gelf", "funcName": "send"})

    def test_uncompressed(self):
        """
        Uncompressed, pygelf sends plain JSON, which is GELF by its fields,
        or plain JSON in chunks.
        """
        record, [data] = self.send(compress=False, chunk_size=65000)
        self.assertFalse(is_gelf(data))
        self.assertTrue(looks_like_gelf(json.loads(data)))
        self.assertSent(record, record_from_gelf(json.loads(data)))
        self.assertSent(record,
                        GELFDecoder(Clock()).decode(data, ("127.0.0.1", 1)))
        self.kept.flush()
        record, datagrams = self.send(compress=False)
        self.assertGreater(len(datagrams), 10)
        self.assertSent(record, self.feed(GELFDecoder(Clock()), datagrams))


def mutated(rng, data):
    """C{data} with one to three bytes changed at random."""
    data = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


class FuzzTests(DecoderTestCase):
    """
    Whatever arrives, decoding raises nothing but BadDatagram subclasses
    and holds no more than its limits.
    """

    def test_random_input(self):
        """
        Random bytes, random bytes after each magic, and truncated and
        mutated good datagrams of every framing, chunks among them
        (shuffled, from a few message ids so that they collide), give a
        record, None, or a BadDatagram; every record gives a key or a
        BadDatagram.
        """
        rng = random.Random(12201)
        reader = RecordReader(FIELDS, "source", 65536)
        decoder = self.make_decoder(max_size=8192, max_partials=20,
                                    max_partial_bytes=4096)
        messages = [gelf(), gelf(full_message="t" * 3000, _line=3,
                                 host=["list"]),
                    gelf(full_message="u" * 9000),
                    gelf(short_message="a\nb", file="/x/y.py", level=3)]
        good = []
        for message in messages:
            good += [plain(message), zlibbed(message), gzipped(message)]
        payloads = []
        for _ in range(2000):
            payloads.append(bytes(rng.randrange(256)
                                  for _ in range(rng.randrange(80))))
        for magic in (b"\x1e\x0f", b"\x1f\x8b", b"\x78\x9c", b"{"):
            for _ in range(500):
                payloads.append(magic + bytes(
                    rng.randrange(256) for _ in range(rng.randrange(80))))
        for _ in range(2000):
            data = rng.choice(good)
            payloads.append(data[:rng.randrange(len(data) + 1)])
            payloads.append(mutated(rng, data))
        for _ in range(300):
            data = rng.choice(good)
            datagrams = chunked(data, rng.randrange(len(data) // 200 + 1, 400),
                                bytes([rng.randrange(4)]) * 8)
            datagrams = [mutated(rng, data) if rng.random() < 0.2 else data
                         for data in datagrams
                         if rng.random() < 0.95]
            rng.shuffle(datagrams)
            payloads += datagrams
        outcomes = {}
        for number, data in enumerate(payloads):
            sender = ("10.0.0.%d" % (number % 3), 5000)
            try:
                result = decoder.decode(data, sender)
                if result is not None:
                    reader.report_of(result)
                    outcome = "record"
                else:
                    outcome = None
            except BadDatagram as error:
                outcome = type(error)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            self.assertLessEqual(decoder.partial_messages, 20)
            self.assertLessEqual(decoder.partial_bytes, 4096)
            self.clock.advance(0.01 if rng.random() < 0.99 else 1)
        self.assertEqual(sum(outcomes.values()), len(payloads))
        self.assertGreaterEqual(set(outcomes), {
            "record", None, NotGELF, BadChunkHeader, TooManyChunks,
            TooManyPartialMessages, TooManyPartialBytes, MessageTooLarge,
            DecompressionBomb, CorruptCompressed, GELFNotJSON, InvalidGELF,
            failnozzle.ingest.WrongFieldType})
        self.assertTrue(self.incomplete)
        decoder.stop()
        self.assertHoldsNothing(decoder)
