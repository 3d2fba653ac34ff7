"""
Tests for L{failnozzle.ingest}: reading datagrams into keys, bad input,
the receiver's counting and rate-limited logging, and the UDP socket.
"""
import json
import random
import socket
import tracemalloc

from twisted.internet import udp
from twisted.internet.task import Clock
from twisted.internet.testing import (EventLoggingObserver,
                                      FakeDatagramTransport,
                                      MemoryReactorClock)
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from failnozzle.aggregate import Aggregator, Report
from failnozzle.config import UniqueMessage
from failnozzle.ingest import (BadDatagram, ErrorReceiver, NotAnObject,
                               NotJSON, NotUTF8, OversizedDatagram,
                               RecordReader, WrongFieldType,
                               bind_udp_socket, default_internal_error_record,
                               internal_error_key_maker, set_receive_buffer)
from failnozzle.textcap import FIELD_MARK
from tests.common import record

FIELDS = UniqueMessage._fields


def encode(fields):
    return json.dumps(fields).encode("utf-8")


def make_reader(max_size=65536):
    return RecordReader(FIELDS, "source", max_size)


class RecordReaderTests(SynchronousTestCase):
    """
    L{RecordReader.read} on good records.
    """

    def test_normal_record(self):
        """
        The key holds the unique fields in UNIQUE_MSG_TUPLE order; the
        source is apart, and other fields are ignored.
        """
        data = encode({
            "module": "log", "funcName": "log_exception",
            "message": "GET http://localhost:5000/folders/5/emails",
            "filename": "log.py", "lineno": 214, "args": [],
            "exc_text": "Traceback (most recent call last):",
            "kind": "app", "pathname": "/some/path.py",
            "source": "eric-desktop"})
        key, source, *_ = make_reader().read(data)
        self.assertEqual(key, (
            "log", "log_exception", "log.py",
            "GET http://localhost:5000/folders/5/emails", "/some/path.py",
            214, "Traceback (most recent call last):", "app"))
        self.assertEqual(source, "eric-desktop")

    def test_missing_fields(self):
        """
        Missing fields, the source included, are None.
        """
        key, source, *_ = make_reader().read(b'{"message": "boom"}')
        self.assertEqual(key, (None, None, None, "boom", None, None, None,
                               None))
        self.assertIsNone(source)

    def test_empty_object(self):
        """
        An empty object is a record of Nones.
        """
        self.assertEqual(make_reader().read(b"{}"),
                         Report((None,) * len(FIELDS), None))

    def test_multiline_clipped(self):
        """
        A multi-line message is clipped at its first line; exc_text, set,
        is kept (the original's test_process_one_multiline).
        """
        key, _, *_ = make_reader().read(encode(record(
            "1\n2\n3\n", exc_text="Traceback (most recent call last):")))
        fields = dict(zip(FIELDS, key))
        self.assertEqual(fields["message"], "1")
        self.assertEqual(fields["exc_text"],
                         "Traceback (most recent call last):")

    def test_multiline_fills_exc_text(self):
        """
        Without exc_text the whole multi-line message moves there (the
        original's test_process_one_fill_exc); empty or null counts as
        without.
        """
        for extra in ({}, {"exc_text": ""}, {"exc_text": None}):
            data = dict(message="1\n2\n3\n", source="h", **extra)
            key, _, *_ = make_reader().read(encode(data))
            fields = dict(zip(FIELDS, key))
            self.assertEqual(fields["message"], "1", extra)
            self.assertEqual(fields["exc_text"], "1\n2\n3\n", extra)

    def test_same_error_same_key(self):
        """
        Two reports of the same error from different hosts have the same
        key and their own sources.
        """
        reader = make_reader()
        first = reader.read(encode(record("boom", source="web1")))
        second = reader.read(encode(record("boom", source="web2")))
        self.assertEqual(first[0], second[0])
        self.assertEqual((first[1], second[1]), ("web1", "web2"))

    def test_custom_fields(self):
        """
        A custom field list and source field are used as given (the
        original's test_customization_msg_impl).
        """
        reader = RecordReader(("x", "y", "z"), "src", 65536)
        self.assertEqual(
            reader.read(b'{"x": 1, "y": 2, "z": 3, "src": "src", "m": 4}'),
            Report((1, 2, 3), "src"))

    def test_non_text_message(self):
        """
        A message that is no string is kept as it is.
        """
        key, _, *_ = make_reader().read(b'{"message": 42}')
        self.assertEqual(dict(zip(FIELDS, key))["message"], 42)

    def test_nan_is_one_error(self):
        """
        NaN and Infinity, which Python's json writes, are read as text so
        that the same error always has the same key (a NaN float is not
        even equal to itself).
        """
        reader = make_reader()
        data = b'{"message": "m", "lineno": NaN, "kind": -Infinity}'
        first, _, *_ = reader.read(data)
        second, _, *_ = reader.read(data)
        self.assertEqual(first, second)
        fields = dict(zip(FIELDS, first))
        self.assertEqual((fields["lineno"], fields["kind"]),
                         ("NaN", "-Infinity"))

    def test_byte_order_mark(self):
        """
        A UTF-8 byte order mark, which the JSON standard lets readers
        ignore and orjson refuses, is ignored.
        """
        key, _, *_ = make_reader().read(b'\xef\xbb\xbf{"message": "marked"}')
        self.assertEqual(dict(zip(FIELDS, key))["message"], "marked")

    def test_max_size_accepted(self):
        """
        A datagram of exactly the maximum size is read.
        """
        data = encode({"message": ""})
        data = data[:-1] + b" " * (100 - len(data)) + data[-1:]
        self.assertEqual(len(data), 100)
        key, _, *_ = make_reader(max_size=100).read(data)
        self.assertEqual(dict(zip(FIELDS, key))["message"], "")


class CapTests(SynchronousTestCase):
    """
    Every text kept is capped: exc_text at MAX_EXC_TEXT_CHARS, cut in the
    middle; the message's first line, every other field and the source at
    MAX_FIELD_CHARS, cut at the end.
    """

    def fields(self, data, reader=None):
        key, source, *_ = (reader or make_reader()).read(encode(data))
        return dict(zip(FIELDS, key), source=source)

    def test_short_untouched(self):
        """
        Texts within the caps are kept as they are, long datagram or short;
        numbers, booleans and null are not texts.
        """
        data = record("m" * 1000, exc_text="t" * 16384, module="x" * 1000,
                      source="h" * 1000, lineno=10 ** 18, kind=True)
        fields = self.fields(data)
        for name in ("message", "exc_text", "module", "source", "lineno",
                     "kind"):
            self.assertEqual(fields[name], data[name], name)
        self.assertEqual(self.fields({"message": "m", "lineno": None}),
                         dict(self.fields({"message": "m"})))

    def test_each_field_capped(self):
        """
        Each text field, the source included, is cut at its cap, however
        the others are.
        """
        names = [name for name in FIELDS if name != "lineno"] + ["source"]
        for name in names:
            data = record("m", exc_text="short")
            data[name] = "v" * 70000
            fields = self.fields(data, make_reader(10 ** 6))
            if name == "exc_text":
                self.assertIn(len(fields[name]), range(16300, 16385))
                self.assertRegex(
                    fields[name],
                    r"^v{8000,}\[… 53,\d{3} characters cut …\]v+$")
            else:
                self.assertEqual(fields[name], "v" * 999 + FIELD_MARK, name)
            for other in set(names) - {name}:
                self.assertEqual(fields[other], data[other])

    def test_long_traceback_with_long_fields(self):
        """
        A datagram with a long traceback and other long texts has all of
        them cut.
        """
        fields = self.fields(record("m" * 5000, exc_text="t" * 20000,
                                    pathname="p" * 3000))
        self.assertIn(len(fields["exc_text"]), range(16300, 16385))
        self.assertEqual(len(fields["message"]), 1000)
        self.assertEqual(len(fields["pathname"]), 1000)

    def test_multiline_message_capped(self):
        """
        A long multi-line message gives a capped first line, and exc_text
        capped in the middle, keeping the last line.
        """
        message = "first " * 400 + "\n" + "middle\n" * 5000 + "last line"
        fields = self.fields({"message": message})
        self.assertEqual(len(fields["message"]), 1000)
        self.assertTrue(fields["message"].startswith("first first"))
        self.assertLessEqual(len(fields["exc_text"]), 16384)
        self.assertTrue(fields["exc_text"].startswith("first first"))
        self.assertTrue(fields["exc_text"].endswith("middle\nlast line"))

    def test_custom_caps(self):
        """
        The caps are the reader's settings.
        """
        reader = RecordReader(FIELDS, "source", 65536, max_field_chars=10,
                              max_exc_text_chars=100)
        fields = self.fields(record("m" * 50, exc_text="e" * 500,
                                    source="s" * 11), reader)
        self.assertEqual(fields["message"], "m" * 9 + FIELD_MARK)
        self.assertEqual(fields["source"], "s" * 9 + FIELD_MARK)
        self.assertIn(len(fields["exc_text"]), range(90, 101))
        self.assertIn("characters cut", fields["exc_text"])

    def test_records_capped(self):
        """
        A record read by key_and_source (mail, the internal error record)
        is capped too.
        """
        key, source, *_ = make_reader().report_of(
            {"message": "m" * 5000, "exc_text": "e" * 50000,
             "source": "s" * 2000})
        fields = dict(zip(FIELDS, key))
        self.assertEqual(len(fields["message"]), 1000)
        self.assertLessEqual(len(fields["exc_text"]), 16384)
        self.assertEqual(len(source), 1000)

    def test_internal_error_record_capped(self):
        """
        So is what INTERNAL_ERROR_FUNC returns.
        """
        key = internal_error_key_maker(
            make_reader(), lambda count, error: {"message": "x" * 10 ** 6,
                                                 "kind": "k" * 5000})(
                1, NotJSON("x"))
        fields = dict(zip(FIELDS, key))
        self.assertEqual(len(fields["message"]), 1000)
        self.assertEqual(len(fields["kind"]), 1000)


class RekeyingTests(SynchronousTestCase):
    """
    L{RecordReader.rekeying}: keys counted under other fields or caps,
    made what the same errors arriving now get.
    """

    def test_cut_as_if_arriving_now(self):
        """
        A key kept from a reader with higher caps is the key a reader
        with lower caps gives the same record.
        """
        data = record("m" * 900, exc_text="frame\n" * 2000,
                      module="x" * 500, lineno=7)
        old = RecordReader(FIELDS, "source", 10 ** 6,
                           max_exc_text_chars=8000).read(encode(data))[0]
        new_reader = RecordReader(FIELDS, "source", 10 ** 6,
                                  max_field_chars=100,
                                  max_exc_text_chars=1000)
        self.assertEqual(new_reader.rekeying(None)(old),
                         new_reader.read(encode(data))[0])

    def test_read_by_field_name(self):
        """
        A key of other fields is read by name, a field it lacks being
        None, and then cut.
        """
        reader = RecordReader(("message", "kind"), "source", 65536,
                              max_field_chars=5)
        rekey = reader.rekeying(("kind", "module", "message"))
        self.assertEqual(rekey(("app", "views", "a long message")),
                         ("a lo" + FIELD_MARK, "app"))
        self.assertEqual(RecordReader(("message", "lineno"), "source",
                                      65536).rekeying(("message",))(("m",)),
                         ("m", None))


class BadDatagramTests(SynchronousTestCase):
    """
    Each kind of bad input raises its own L{BadDatagram} subclass.
    """

    def assertBad(self, kind, data, reader=None):
        """
        Reading C{data} raises C{kind}, which starts with its reason and
        keeps the start of the datagram.
        """
        error = self.assertRaises(kind, (reader or make_reader()).read, data)
        self.assertIsInstance(error, BadDatagram)
        self.assertTrue(str(error).startswith(kind.reason + ": "))
        self.assertEqual(error.sample, data[:120])
        return error

    def test_oversized(self):
        """
        A datagram above the maximum size is refused before decoding.
        """
        data = encode({"message": "x" * 200})
        error = self.assertBad(OversizedDatagram, data, make_reader(100))
        self.assertIn("more than 100 bytes", str(error))

    def test_not_utf8(self):
        """
        Bytes that are not UTF-8.
        """
        self.assertBad(NotUTF8, b"\xff\xfe{}")
        self.assertBad(NotUTF8, b'{"message": "caf\xe9"}')

    def test_not_json(self):
        """
        Text that is not JSON, or is cut short.
        """
        for data in (b"not json", b"", b'{"message": }', b'{"a": 1',
                     b"{'single': 'quotes'}", b'{"a": 1} trailing'):
            self.assertBad(NotJSON, data)

    def test_deeply_nested(self):
        """
        Nesting deep enough to exhaust the parser's recursion is bad JSON,
        not a crash.
        """
        self.assertBad(NotJSON, b"[" * 60000)
        self.assertBad(NotJSON, b'{"a":' * 10000)
        self.assertBad(NotJSON, b"[" * 100000, make_reader(10 ** 6))

    def test_huge_integer(self):
        """
        An integer too long for Python to convert is bad JSON.
        """
        self.assertBad(NotJSON, b'{"lineno": ' + b"1" * 5000 + b"}")

    def test_not_an_object(self):
        """
        JSON that is a list, a string, a number, a boolean or null.
        """
        for data, name in ((b"[1, 2]", "list"), (b'"text"', "str"),
                           (b"42", "int"), (b"4.2", "float"),
                           (b"null", "NoneType"), (b"true", "bool")):
            error = self.assertBad(NotAnObject, data)
            self.assertIn(name, str(error))

    def test_list_in_unique_field(self):
        """
        A list or an object in a unique field cannot be part of a key.
        """
        for value, kind in (([1, 2], "array"), ({"a": 1}, "object")):
            error = self.assertBad(WrongFieldType,
                                   encode(record("m", lineno=value)))
            self.assertIn(f"field 'lineno' is a JSON {kind}", str(error))

    def test_list_in_source(self):
        """
        Nor can a list or an object be a source.
        """
        for value, kind in ((["a"], "array"), ({"h": 1}, "object")):
            error = self.assertBad(WrongFieldType,
                                   encode(record("m", source=value)))
            self.assertIn(f"field 'source' is a JSON {kind}", str(error))

    def test_list_elsewhere_ignored(self):
        """
        Lists and objects in other fields are no problem.
        """
        key, source, *_ = make_reader().read(encode(record(
            "m", args=[1, 2], extra={"a": [1]})))
        self.assertEqual(dict(zip(FIELDS, key))["message"], "m")
        self.assertEqual(source, "host1")


class InternalErrorKeyTests(SynchronousTestCase):
    """
    L{internal_error_key_maker}: the key bad input is reported under.
    """

    def test_default(self):
        """
        Without INTERNAL_ERROR_FUNC the key is the default record's, whose
        message says what kind of bad input it stands for.
        """
        reader = make_reader()
        error = NotJSON("Expecting value", b"junk")
        key = internal_error_key_maker(reader)(3, error)
        expected = default_internal_error_record(3, error)
        self.assertEqual(key, tuple(expected.get(name) for name in FIELDS))
        self.assertEqual(dict(zip(FIELDS, key))["message"],
                         "Internal error: datagram is not valid JSON")
        self.assertIn("3 bad input(s)", expected["exc_text"])
        self.assertIn("b'junk'", expected["exc_text"])

    def test_custom_used(self):
        """
        INTERNAL_ERROR_FUNC is called with the count and the exception, and
        its record gives the key (the original's
        test_customization_fake_record); missing fields are None.
        """
        calls = []

        def custom(count, exception):
            calls.append((count, exception))
            return {"module": "mine", "message": f"{count} bad"}

        error = NotJSON("x")
        key = internal_error_key_maker(make_reader(), custom)(1, error)
        self.assertEqual(calls, [(1, error)])
        self.assertEqual(key, ("mine", None, None, "1 bad", None, None, None,
                               None))

    def test_custom_fields(self):
        """
        With a custom UNIQUE_MSG_TUPLE the custom record fills its fields.
        """
        reader = RecordReader(("x", "y"), "src", 65536)
        key = internal_error_key_maker(
            reader, lambda count, error: {"x": count, "y": "internal"})(
                4, NotJSON("x"))
        self.assertEqual(key, (4, "internal"))

    def test_custom_raises(self):
        """
        An INTERNAL_ERROR_FUNC that raises costs no digest: the default
        record is used and the failure logged.
        """
        events = EventLoggingObserver.createWithCleanup(self,
                                                        globalLogPublisher)

        def broken(count, exception):
            return 1 / 0

        reader = make_reader()
        error = NotUTF8("x")
        key = internal_error_key_maker(reader, broken)(2, error)
        self.assertEqual(
            key, internal_error_key_maker(reader)(2, error))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        [event] = [e for e in events if "log_failure" in e]
        self.assertIn("INTERNAL_ERROR_FUNC failed", formatEvent(event))

    def test_custom_returns_unusable(self):
        """
        A record that is no mapping, or holds a list in a unique field,
        falls back to the default too.
        """
        reader = make_reader()
        error = NotJSON("x")
        default = internal_error_key_maker(reader)(1, error)
        for result in (None, 5, {"message": ["a", "list"]}):
            key = internal_error_key_maker(
                reader, lambda count, exc: result)(1, error)
            self.assertEqual(key, default, result)
        self.assertEqual(len(self.flushLoggedErrors(TypeError,
                                                    WrongFieldType)), 3)


class ReceiverTestCase(SynchronousTestCase):
    """
    An L{ErrorReceiver} over a fake transport, with a real aggregator and
    a L{Clock}.
    """

    def setUp(self):
        self.clock = Clock()
        self.reader = make_reader()
        self.aggregator = Aggregator(
            10000, self.clock, internal_error_key_maker(self.reader))
        self.receiver = ErrorReceiver(self.reader, self.aggregator,
                                      self.clock)
        self.receiver.makeConnection(FakeDatagramTransport())
        self.events = EventLoggingObserver.createWithCleanup(
            self, globalLogPublisher)

    def receive(self, *payloads, sender=("10.0.0.1", 5000)):
        for payload in payloads:
            if not isinstance(payload, bytes):
                payload = encode(payload)
            self.receiver.datagramReceived(payload, sender)

    def logged(self):
        """The text of each event the receiver logged."""
        return [formatEvent(event) for event in self.events
                if event.get("log_namespace") == "failnozzle.ingest"]

    def entries(self):
        """The flushed batch's entries by message."""
        batch = self.aggregator.flush()
        message = FIELDS.index("message")
        return {entry.key[message]: dict(entry.sources)
                for entry in batch.entries}


class ErrorReceiverTests(ReceiverTestCase):
    """
    Counting good and bad datagrams.
    """

    def test_good_counted(self):
        """
        Good datagrams are counted by key and by the source they name (not
        the address they came from), and nothing is logged.
        """
        self.receive(record("boom", source="web1"),
                     record("boom", source="web2"),
                     record("boom", source="web2"),
                     record("bang", source="web1"))
        self.assertEqual(self.entries(), {"boom": {"web1": 1, "web2": 2},
                                          "bang": {"web1": 1}})
        self.assertEqual(self.logged(), [])

    def test_bad_counted_by_kind(self):
        """
        Bad datagrams are one entry per kind of problem, with a count per
        sending address.
        """
        self.receive(b"junk", b"more junk", sender=("10.0.0.1", 5000))
        self.receive(b"junk", sender=("10.0.0.2", 6000))
        self.receive(b"[1]", sender=("10.0.0.1", 5001))
        self.receive(b"\xff", sender=("10.0.0.3", 5000))
        self.receive(record("boom"))
        self.assertEqual(self.entries(), {
            "Internal error: datagram is not valid JSON":
                {"10.0.0.1": 2, "10.0.0.2": 1},
            "Internal error: datagram is JSON but not an object":
                {"10.0.0.1": 1},
            "Internal error: datagram is not valid UTF-8": {"10.0.0.3": 1},
            "boom": {"host1": 1},
        })

    def test_bad_default_record(self):
        """
        The entry of bad input has the key of the default internal error
        record, counting all of that kind.
        """
        self.receive(b"junk", b"junk", b"junk")
        [entry] = self.aggregator.flush().entries
        record = default_internal_error_record(3, NotJSON("", b"junk"))
        self.assertEqual(dict(zip(FIELDS, entry.key))["module"],
                         record["module"])
        self.assertIn("3 bad input(s)",
                      dict(zip(FIELDS, entry.key))["exc_text"])
        self.assertEqual(entry.total, 3)

    def test_flush_starts_over(self):
        """
        After a flush the bad input counts start from nothing.
        """
        self.receive(b"junk")
        self.aggregator.flush()
        self.assertEqual(self.entries(), {})


class BadInputLogTests(ReceiverTestCase):
    """
    Bad input is logged at a limited rate.
    """

    def test_first_logged(self):
        """
        The first bad datagram of a kind is logged with its sender and
        what is wrong.
        """
        self.receive(b"junk", sender=("10.0.0.9", 4321))
        [line] = self.logged()
        self.assertIn("Bad input from 10.0.0.9:4321: datagram is not "
                      "valid JSON", line)
        [event] = [e for e in self.events if e.get("host") == "10.0.0.9"]
        self.assertEqual(event["port"], 4321)
        self.assertIsInstance(event["error"], NotJSON)

    def test_held_back_then_counted(self):
        """
        Further bad datagrams of that kind are held back for 60 s; then
        one line says how many there were.
        """
        self.receive(b"junk")
        self.clock.advance(30)
        self.receive(b"junk", b"junk")
        self.clock.advance(29.9)
        self.receive(b"junk")
        self.assertEqual(len(self.logged()), 1)
        self.clock.advance(0.1)
        lines = self.logged()
        self.assertEqual(len(lines), 2)
        self.assertIn("3 more not logged in the last 60 s: datagram is not "
                      "valid JSON", lines[1])

    def test_nothing_held_back(self):
        """
        A lone bad datagram is not followed by a count of nothing.
        """
        self.receive(b"junk")
        self.clock.advance(120)
        self.assertEqual(len(self.logged()), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_new_window(self):
        """
        After the 60 s the next bad datagram is logged again.
        """
        self.receive(b"junk")
        self.clock.advance(60)
        self.receive(b"junk")
        lines = self.logged()
        self.assertEqual(len(lines), 2)
        self.assertIn("Bad input from", lines[1])

    def test_kinds_apart(self):
        """
        Each kind of problem has its own limit, so a flood of one kind
        does not hide another.
        """
        self.receive(b"junk", b"junk", b"[1]", b"\xff", b"[2]")
        lines = self.logged()
        self.assertEqual(len(lines), 3)
        self.assertIn("not valid JSON", lines[0])
        self.assertIn("not an object", lines[1])
        self.assertIn("not valid UTF-8", lines[2])

    def test_flood(self):
        """
        A flood of 10,000 junk datagrams makes two log lines and one digest
        entry counting them all.
        """
        for number in range(10000):
            self.receive(b"junk %d" % number,
                         sender=("10.0.0.%d" % (number % 4), 5000))
        self.clock.advance(60)
        lines = self.logged()
        self.assertEqual(len(lines), 2)
        self.assertIn("9999 more", lines[1])
        [entry] = self.aggregator.flush().entries
        self.assertEqual(entry.total, 10000)
        self.assertEqual(len(entry.sources), 4)

    def test_stop_says_held_back(self):
        """
        When the port closes, what is held back is said at once and no
        timer is left behind.
        """
        self.receive(b"junk", b"junk", b"[1]")
        self.receiver.doStop()
        lines = self.logged()
        self.assertEqual(len(lines), 3)
        self.assertIn("1 more not logged in the last 60 s: datagram is not "
                      "valid JSON", lines[2])
        self.assertEqual(self.clock.getDelayedCalls(), [])


def random_json(rng, depth=0):
    """A random JSON value, nested a little."""
    choice = rng.randrange(8 if depth < 3 else 5)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.randint(-2 ** 70, 2 ** 70)
    if choice == 3:
        return rng.uniform(-1e10, 1e10)
    if choice == 4:
        return "".join(chr(rng.randrange(0x20, 0x3000))
                       for _ in range(rng.randrange(20)))
    if choice == 5:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(FIELDS + ("source", "other")):
            random_json(rng, depth + 1) for _ in range(rng.randrange(6))}


class FuzzTests(ReceiverTestCase):
    """
    Whatever arrives, the receiver neither raises nor loses count.
    """

    def test_random_input(self):
        """
        Random bytes, truncated and mutated good datagrams and random JSON
        all go through datagramReceived without an exception, and every
        one of them is counted, as an error or as bad input.
        """
        rng = random.Random(1549)
        good = [encode(record("boom")), encode(record("m\nline", exc_text="")),
                encode({"message": "x", "lineno": 1.5, "source": None})]
        payloads = []
        for _ in range(1000):
            payloads.append(bytes(rng.randrange(256)
                                  for _ in range(rng.randrange(64))))
        for _ in range(1000):
            data = rng.choice(good)
            payloads.append(data[:rng.randrange(len(data) + 1)])
        for _ in range(1000):
            data = bytearray(rng.choice(good))
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            payloads.append(bytes(data))
        for _ in range(1000):
            payloads.append(json.dumps(random_json(rng)).encode("utf-8"))
        for number, data in enumerate(payloads):
            self.receive(data, sender=("10.0.0.%d" % (number % 7), number))
            self.clock.advance(0.01)
        self.assertEqual(self.aggregator.flush().total, len(payloads))


class ReadLoopTests(SynchronousTestCase):
    """
    The port's read loop: L{ErrorReceiver} reads a real socket on
    127.0.0.1, up to a batch per wake-up of the reactor.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.reader = make_reader()
        self.aggregator = Aggregator(10000, self.reactor,
                                     internal_error_key_maker(self.reader))
        self.receiver = ErrorReceiver(self.reader, self.aggregator,
                                      self.reactor)
        self.port = udp.Port(0, self.receiver, "127.0.0.1", 65536,
                             self.reactor)
        self.port.startListening()
        self.addCleanup(self.reactor.advance, 0)  # connectionLost: closed
        self.addCleanup(self.port.stopListening)
        self.sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(self.sender.close)
        self.sender.connect(("127.0.0.1", self.port.getHost().port))

    def send(self, *payloads):
        for payload in payloads:
            self.sender.send(payload)

    def test_reads_a_batch(self):
        """
        A wake-up reads at most a batch of datagrams, counting each; the
        next reads the rest; doRead returns None, which keeps the port
        open.
        """
        self.receiver.batch = 10
        self.send(*[encode(record(f"e{number % 3}")) for number in range(25)])
        for expected in (10, 20, 25, 25):
            self.assertIsNone(self.port.doRead())
            self.assertEqual(self.aggregator.view().total, expected)

    def test_bad_input_and_bugs_do_not_stop_it(self):
        """
        Bad input is counted as such, and a reader that fails (a bug) is
        logged; the datagrams after them in the batch are counted.
        """
        read = self.reader.read

        def failing(data, sender=None):
            if data == b'"bug"':
                raise RuntimeError("a bug")
            return read(data, sender)

        self.reader.read = failing
        self.send(b"junk", b'"bug"', encode(record("after")))
        self.port.doRead()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        message = FIELDS.index("message")
        self.assertEqual(
            sorted(entry.key[message] for entry in
                   self.aggregator.flush().entries),
            ["Internal error: datagram is not valid JSON", "after"])

    def test_hostile_capped(self):
        """
        Hostile datagrams over the socket give capped keys: a 52-byte
        C{%100000000d} a 1,000-character message, a 60,000-character
        traceback 16,384 characters, its end kept.
        """
        self.send(encode({"msg": "%100000000d", "args": [1]}),
                  encode(record("long", exc_text="t" * 60000 + "the end")))
        self.port.doRead()
        fields = {entry.key[FIELDS.index("message")][:4]:
                  dict(zip(FIELDS, entry.key))
                  for entry in self.aggregator.flush().entries}
        self.assertEqual(fields["    "]["message"], " " * 999 + FIELD_MARK)
        exc_text = fields["long"]["exc_text"]
        self.assertLessEqual(len(exc_text), 16384)
        self.assertTrue(exc_text.endswith("the end"))

    def test_read_pending(self):
        """
        read_pending reads what is queued, up to its limit, and says how
        many it read.
        """
        self.send(*[encode(record("m"))] * 5)
        self.assertEqual(self.receiver.read_pending(3), 3)
        self.assertEqual(self.receiver.read_pending(), 2)
        self.assertEqual(self.receiver.read_pending(), 0)
        self.assertEqual(self.aggregator.view().total, 5)


class SocketTests(SynchronousTestCase):
    """
    L{bind_udp_socket} and L{set_receive_buffer} on a real socket.
    """

    def test_bind(self):
        """
        The socket is bound where asked, non-blocking, and receives.
        """
        sock, granted = bind_udp_socket("127.0.0.1", 0, 1024 * 1024)
        self.addCleanup(sock.close)
        host, port = sock.getsockname()
        self.assertEqual(host, "127.0.0.1")
        self.assertNotEqual(port, 0)
        self.assertEqual(sock.gettimeout(), 0.0)
        self.assertEqual(sock.family, socket.AF_INET)
        self.assertEqual(sock.type, socket.SOCK_DGRAM)
        self.assertEqual(
            granted, sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"{}", (host, port))
        sock.settimeout(5)
        self.assertEqual(sock.recv(100), b"{}")

    def test_set_receive_buffer(self):
        """
        The kernel's answer is returned, at least what was asked for a
        small buffer (Linux doubles it for its own bookkeeping).
        """
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            granted = set_receive_buffer(sock, 65536)
            self.assertEqual(
                granted, sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
            self.assertGreaterEqual(granted, 65536)

    def test_address_in_use(self):
        """
        A port already bound is an OSError, for start-up to report.
        """
        first, _, *_ = bind_udp_socket("127.0.0.1", 0, 65536)
        self.addCleanup(first.close)
        port = first.getsockname()[1]
        error = self.assertRaises(OSError, bind_udp_socket, "127.0.0.1",
                                  port, 65536)
        self.assertEqual(error.strerror, "Address already in use")


class OriginalHandlerTests(SynchronousTestCase):
    """
    Records from the original failnozzle's log handler, which sent
    C{logging}'s C{msg} and C{args} but no C{message} unless the record
    carried a traceback.
    """

    def read(self, **fields):
        reader = RecordReader(("message", "kind"), "source", 65536)
        return reader.read(json.dumps(fields).encode())

    def test_msg_and_args(self):
        """
        Without a message, C{msg} formatted with C{args} stands for it.
        """
        self.assertEqual(
            self.read(msg="user %s failed %d times", args=["bob", 3],
                      kind="app", source="web1"),
            Report(("user bob failed 3 times", "app"), "web1",
                   template="user %s failed %d times"))

    def test_args_mapping(self):
        """
        C{args} given as a mapping, as C{logging} allows, fill named fields.
        """
        self.assertEqual(self.read(msg="%(user)s", args={"user": "bob"})[0],
                         ("bob", None))

    def test_args_do_not_fit(self):
        """
        C{args} that do not fit the format show C{msg} and C{args} as text:
        a C{%d} given a string, a C{%c} given a huge number, too few or too
        many arguments.  Nothing is logged.
        """
        events = EventLoggingObserver.createWithCleanup(self,
                                                        globalLogPublisher)
        for msg, args in (("%d items", ["x"]), ("%c", [2 ** 40]),
                          ("%s and %s", ["a"]), ("%s", ["a", "b"]),
                          ("%(user)s", ["bob"])):
            self.assertEqual(
                self.read(msg=msg, args=args)[0],
                (f"{msg} (arguments that do not fit: {args!r})", None))
        self.assertEqual(list(events), [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_formatted_as_python_does(self):
        """
        What fits is formatted as Python's C{%} formats it: widths, flags,
        precisions, C{*}, mapping keys.
        """
        for msg, args in (("%5d|%-5s|%+.2f", [42, "ab", 3.14159]),
                          ("%*d %#x %.3s", [6, 7, 255, "abcdef"]),
                          ("%(a)s-%(a)05d", {"a": 7}), ("100%% %s", ["done"])):
            self.assertEqual(self.read(msg=msg, args=args)[0][0],
                             msg % (tuple(args) if type(args) is list
                                    else args))

    def test_huge_width_capped(self):
        """
        The 52-byte C{%100000000d} (98 MB each, formatted whole) gives a
        message of MAX_FIELD_CHARS, ending in the mark, at a cost of little
        more than that.
        """
        data = json.dumps({"msg": "%100000000d", "args": [1]}).encode()
        reader = RecordReader(("message",), "source", 65536)
        tracemalloc.start()
        try:
            (message,), _, *_ = reader.read(data)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual(message, " " * 999 + FIELD_MARK)
        self.assertLess(peak, 1024 * 1024)

    def test_repeated_key_capped(self):
        """
        A mapping key repeated for a long multi-line value fills message
        and exc_text to their caps only.
        """
        value = "line one\n" + "x" * 3000
        reader = make_reader()
        key, _, *_ = reader.read(json.dumps(
            {"msg": "%(a)s" * 20, "args": {"a": value}}).encode())
        fields = dict(zip(FIELDS, key))
        self.assertEqual(fields["message"], "line one")
        self.assertLessEqual(len(fields["exc_text"]), 16384)
        self.assertIn("characters cut", fields["exc_text"])
        self.assertTrue(fields["exc_text"].endswith("x" * 1000))

    def test_message_wins(self):
        """
        A message, when sent, is used as it is.
        """
        self.assertEqual(
            self.read(message="done", msg="%s", args=["other"])[0],
            ("done", None))
