"""
Tests for L{failnozzle.loghandler}: what the handler sends, that it never
raises into the application, and that failnozzle reads what it sends.
"""
import datetime
import json
import logging
import logging.config
import os
import socket
import sys

from twisted.trial.unittest import SynchronousTestCase

from failnozzle.config import UniqueMessage
from failnozzle.ingest import RecordReader
from failnozzle.loghandler import AggregatorHandler

#: How long a test waits for a datagram over loopback; reaching it is a
#: failure.
RECEIVE_TIMEOUT = 10

CLIPPED = "[clipped by failnozzle]"

#: The largest UDP payload over IPv4.
MAX_DATAGRAM_BYTES = 65507


class CapturingHandler(AggregatorHandler):
    """
    An L{AggregatorHandler} that keeps what it would send, and the errors
    it would report.
    """

    def __init__(self, *args):
        super().__init__(*args)
        self.sent = []
        self.errors = []

    def send(self, data):
        self.sent.append(data)

    def handleError(self, record):
        self.errors.append(sys.exc_info()[1])


class HandlerTestCase(SynchronousTestCase):
    """
    A logger of its own for each test, so records go only where the test
    says.
    """

    def make_logger(self, handler):
        logger = logging.getLogger(f"failnozzle.tests.{self.id()}")
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
        self.addCleanup(logger.removeHandler, handler)
        self.addCleanup(handler.close)
        return logger

    def capture(self):
        """A capturing handler (source web1, kind myapp) and its logger."""
        handler = CapturingHandler("127.0.0.1", 9, "web1", "myapp")
        return handler, self.make_logger(handler)

    def sent_records(self, handler):
        return [json.loads(data) for data in handler.sent]


class MakePickleTests(HandlerTestCase):
    """
    The JSON each record becomes.
    """

    def test_fields(self):
        """
        The record goes as JSON with the formatted message, its format as
        msg (args used up), source, kind, and where it was logged.
        """
        handler, logger = self.capture()
        line = sys._getframe().f_lineno + 1
        logger.error("Could not retrieve file %r", "foo.txt")
        [sent] = self.sent_records(handler)
        self.assertEqual(sent["message"],
                         "Could not retrieve file 'foo.txt'")
        self.assertEqual(sent["msg"], "Could not retrieve file %r")
        self.assertIsNone(sent["args"])
        self.assertEqual(sent["source"], "web1")
        self.assertEqual(sent["kind"], "myapp")
        self.assertEqual(sent["module"], "test_loghandler")
        self.assertEqual(sent["funcName"], "test_fields")
        self.assertEqual(sent["filename"], "test_loghandler.py")
        self.assertEqual(sent["pathname"], __file__.replace(".pyc", ".py"))
        self.assertEqual(sent["lineno"], line)
        self.assertEqual(sent["levelname"], "ERROR")
        self.assertIsNone(sent["exc_info"])
        self.assertIsNone(sent["exc_text"])
        self.assertEqual(handler.errors, [])

    def test_exception(self):
        """
        logger.exception sends the formatted traceback in exc_text.
        """
        handler, logger = self.capture()
        try:
            1 / 0
        except ZeroDivisionError:
            logger.exception("Division failed for %s", "user 42")
        [sent] = self.sent_records(handler)
        self.assertEqual(sent["message"], "Division failed for user 42")
        self.assertTrue(sent["exc_text"].startswith(
            "Traceback (most recent call last):\n"), sent["exc_text"])
        self.assertIn('test_loghandler.py", line ', sent["exc_text"])
        self.assertTrue(sent["exc_text"].endswith(
            "ZeroDivisionError: division by zero"), sent["exc_text"])
        self.assertIsNone(sent["exc_info"])

    def test_exc_info_left_for_others(self):
        """
        The record keeps its exc_info for the handlers after this one.
        """
        handler, _ = self.capture()
        try:
            1 / 0
        except ZeroDivisionError:
            record = logging.LogRecord("n", logging.ERROR, "p.py", 1, "m",
                                       (), sys.exc_info())
        handler.handle(record)
        self.assertIs(record.exc_info[0], ZeroDivisionError)
        self.assertEqual(len(handler.sent), 1)

    def test_exc_text_already_formatted(self):
        """
        A traceback another handler already formatted into exc_text is
        sent as it is.
        """
        handler, _ = self.capture()
        record = logging.LogRecord("n", logging.ERROR, "p.py", 1, "m", (),
                                   None)
        record.exc_text = "Traceback: formatted elsewhere"
        handler.handle(record)
        [sent] = self.sent_records(handler)
        self.assertEqual(sent["exc_text"], "Traceback: formatted elsewhere")

    def test_unencodable_values(self):
        """
        Values JSON cannot encode (objects, bytes, sets, dicts with tuple
        keys, cycles) become their repr instead of losing the record.
        """
        handler, logger = self.capture()
        cycle = {}
        cycle["self"] = cycle
        marker = object()
        logger.error("boom", extra={
            "obj": marker,
            "raw": b"\x00bytes",
            "when": datetime.date(2013, 1, 9),
            "tags": {"a"},
            "by_pair": {(1, 2): 3},
            "cycle": cycle,
        })
        [sent] = self.sent_records(handler)
        self.assertEqual(sent["message"], "boom")
        self.assertEqual(sent["obj"], repr(marker))
        self.assertEqual(sent["raw"], repr(b"\x00bytes"))
        self.assertEqual(sent["when"], "datetime.date(2013, 1, 9)")
        self.assertEqual(sent["tags"], "{'a'}")
        self.assertEqual(sent["by_pair"], "{(1, 2): 3}")
        self.assertEqual(sent["cycle"], "{'self': {...}}")
        self.assertEqual(handler.errors, [])

    def test_bad_format_sent_not_raised(self):
        """
        A message whose arguments do not fit its format is sent all the
        same (logging's own handlers send nothing), its format and
        arguments worded as the daemon words such a mismatch, and nothing
        is raised or reported as the handler's error.
        """
        handler, logger = self.capture()
        logger.error("%d apples", "some")
        [data] = handler.sent
        sent = json.loads(data)
        self.assertEqual(sent["message"], "%d apples (arguments that do not "
                                          "fit: ('some',))")
        self.assertEqual(sent["msg"], "%d apples")
        self.assertEqual(handler.errors, [])


class ClippingTests(HandlerTestCase):
    """
    A record too long for one datagram is clipped to fit.
    """

    def send_one(self, message, exception_text=None, **extra):
        """
        Log C{message}, with a traceback of an exception of
        C{exception_text} if given; return what was sent, checking that it
        fits one datagram.
        """
        handler, logger = self.capture()
        if exception_text is None:
            logger.error(message, extra=extra)
        else:
            try:
                raise ValueError(exception_text)
            except ValueError:
                logger.exception(message, extra=extra)
        [data] = handler.sent
        self.assertLessEqual(len(data), MAX_DATAGRAM_BYTES)
        return json.loads(data)

    def test_short_untouched(self):
        """
        A record that fits is sent whole.
        """
        sent = self.send_one("x" * 30000)
        self.assertEqual(sent["message"], "x" * 30000)
        self.assertEqual(sent["msg"], "x" * 30000)

    def test_huge_message(self):
        """
        A huge message keeps its start and says it was clipped; msg, its
        format, is dropped.
        """
        sent = self.send_one("start " + "x" * 200000)
        self.assertTrue(sent["message"].startswith("start xxx"))
        self.assertTrue(sent["message"].endswith("\n" + CLIPPED))
        self.assertGreater(len(sent["message"]), 60000)
        self.assertIsNone(sent["msg"])
        self.assertEqual(sent["source"], "web1")

    def test_message_and_traceback(self):
        """
        When message and exc_text are both huge, both keep a fair part.
        """
        sent = self.send_one("m" * 100000, exception_text="t" * 100000)
        self.assertGreater(len(sent["message"]), 30000)
        self.assertGreater(len(sent["exc_text"]), 30000)
        self.assertTrue(sent["exc_text"].endswith(CLIPPED))

    def test_short_message_kept_whole(self):
        """
        Only values longer than the common cap are clipped.
        """
        sent = self.send_one("short", exception_text="t" * 100000)
        self.assertEqual(sent["message"], "short")
        self.assertTrue(sent["exc_text"].startswith("Traceback"))
        self.assertTrue(sent["exc_text"].endswith(CLIPPED))

    def test_escaped_text(self):
        """
        Text that grows when escaped (non-ASCII, control characters,
        quotes) is clipped by its size as sent.
        """
        for text in ("\u00e9" * 100000, "\x00" * 100000, '"' * 100000,
                     "\U0001f600" * 50000):
            sent = self.send_one(text)
            self.assertTrue(sent["message"].startswith(text[:100]))
            self.assertTrue(sent["message"].endswith(CLIPPED))

    def test_many_extra_fields(self):
        """
        Length spread over many extra fields is clipped too.
        """
        sent = self.send_one("boom", **{f"field{n}": "v" * 2000
                                        for n in range(100)})
        self.assertEqual(sent["message"], "boom")
        self.assertTrue(sent["field0"].endswith(CLIPPED))


class NeverRaisesTests(HandlerTestCase):
    """
    The application never sees an exception from the handler.
    """

    def test_nobody_listening(self):
        """
        Sending to a port nobody listens on raises nothing, record after
        record.
        """
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        handler = AggregatorHandler("127.0.0.1", port, "web1", "myapp")
        logger = self.make_logger(handler)
        for number in range(5):
            logger.error("nobody hears %d", number)
            try:
                1 / 0
            except ZeroDivisionError:
                logger.exception("nor this")
        self.assertIsNotNone(handler.sock)


class EndToEndTests(HandlerTestCase):
    """
    Over a real UDP socket on 127.0.0.1, into failnozzle's reader.
    """

    def listen(self):
        """A blocking UDP socket on 127.0.0.1 and its port."""
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(receiver.close)
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(RECEIVE_TIMEOUT)
        return receiver, receiver.getsockname()[1]

    def test_read_by_failnozzle(self):
        """
        What the handler sends is read by failnozzle into the key of the
        error, with the handler's source.
        """
        receiver, port = self.listen()
        logger = self.make_logger(
            AggregatorHandler("127.0.0.1", port, "web1", "myapp"))
        try:
            raise KeyError("missing")
        except KeyError:
            line = sys._getframe().f_lineno + 1
            logger.exception("Lookup failed")
        data = receiver.recv(65536)
        self.assertIsNone(RecordReader(UniqueMessage._fields, "source",
                                       65536).read(data).template)
        key, source, *_ = RecordReader(UniqueMessage._fields, "source",
                                       65536).read(data)
        fields = UniqueMessage(*key)
        self.assertEqual(source, "web1")
        self.assertEqual(fields.kind, "myapp")
        self.assertEqual(fields.message, "Lookup failed")
        self.assertEqual(fields.module, "test_loghandler")
        self.assertEqual(fields.funcName, "test_read_by_failnozzle")
        self.assertEqual(fields.filename, "test_loghandler.py")
        self.assertEqual(fields.lineno, line)
        self.assertTrue(fields.exc_text.endswith("KeyError: 'missing'"))

    def test_format_arrives(self):
        """
        failnozzle reads the format a message was made from, which groups
        it with the others made from it.
        """
        receiver, port = self.listen()
        logger = self.make_logger(
            AggregatorHandler("127.0.0.1", port, "web1", "myapp"))
        logger.error("lookup failed for user %s", 17)
        report = RecordReader(UniqueMessage._fields, "source",
                              65536).read(receiver.recv(65536))
        self.assertEqual(UniqueMessage(*report.key).message,
                         "lookup failed for user 17")
        self.assertEqual(report.template, "lookup failed for user %s")

    def test_huge_record_arrives(self):
        """
        A record far longer than a datagram arrives, clipped, and is read.
        """
        receiver, port = self.listen()
        logger = self.make_logger(
            AggregatorHandler("127.0.0.1", port, "web1", "myapp"))
        logger.error("first line " + "y" * 300000)
        data = receiver.recv(65536)
        key, source, *_ = RecordReader(UniqueMessage._fields, "source",
                                       65536).read(data)
        fields = UniqueMessage(*key)
        self.assertEqual(source, "web1")
        # The clipped message has two lines: failnozzle keeps the first
        # and moves the whole text to exc_text, as the original did.
        self.assertTrue(fields.message.startswith("first line yyy"))
        self.assertTrue(fields.exc_text.endswith(CLIPPED))

    def test_file_config(self):
        """
        logging.config.fileConfig with the original README's handler
        section, os.uname() and all, works on Python 3 and delivers.
        """
        receiver, port = self.listen()
        path = self.mktemp()
        with open(path, "w") as ini:
            ini.write(f"""\
[loggers]
keys=root,myapp

[handlers]
keys=failnozzleHandler

[formatters]
keys=

[logger_root]
level=WARNING
handlers=

[logger_myapp]
level=INFO
handlers=failnozzleHandler
qualname=myapp

[handler_failnozzleHandler]
class=failnozzle.loghandler.AggregatorHandler
level=ERROR
args=('127.0.0.1', {port}, os.uname()[1], 'myapp')
""")
        root = logging.getLogger()
        saved_root = (root.level, root.handlers[:])
        logger = logging.getLogger("myapp")

        def restore():
            for handler in logger.handlers[:]:
                logger.removeHandler(handler)
                handler.close()
            root.setLevel(saved_root[0])
            root.handlers[:] = saved_root[1]

        self.addCleanup(restore)
        # Other tests' loggers stay enabled; the file itself is the
        # README's.
        logging.config.fileConfig(path, disable_existing_loggers=False)
        [handler] = logger.handlers
        self.assertIsInstance(handler, AggregatorHandler)
        self.assertEqual(handler.level, logging.ERROR)
        logger.warning("below the handler's level")
        logger.error("from fileConfig")
        sent = json.loads(receiver.recv(65536))
        self.assertEqual(sent["message"], "from fileConfig")
        self.assertEqual(sent["source"], os.uname()[1])
        self.assertEqual(sent["kind"], "myapp")
        self.assertEqual(sent["name"], "myapp")
