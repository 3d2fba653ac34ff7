"""
Sentry SDKs and JSON over HTTP: events mapped to errors, envelopes and
their other items, bodies compressed as SDKs send them, and every refusal;
then the real sentry-sdk for Python against a real port.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import zlib
from typing import Optional

import brotli
from twisted.internet import defer, reactor, threads, utils
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.server import Site
from twisted.web.static import File

from failnozzle.sentry import (TokenBucket, context_of, record_of,
                               traceback_of)
from tests.common import record, start_service
from tests.test_browser import BROWSER_FLAGS, chromium
from tests.test_twistd import child_environment
from tests.test_web import _ServiceTestCase, body_of, json_of, render

KEY = "0123456789abcdef"
AUTH = f"Sentry sentry_key={KEY}, sentry_version=7, sentry_client=test/1"

#: A Python exception chain as sentry-sdk sends it (oldest first).
CHAIN = {"values": [
    {"type": "ValueError", "value": "invalid literal for int(): 'x'",
     "module": None, "stacktrace": {"frames": [
         {"filename": "app.py", "abs_path": "/srv/app.py",
          "function": "parse", "module": "app", "lineno": 12,
          "context_line": "    return int(text)", "in_app": True}]}},
    {"type": "RuntimeError", "value": "wrapped", "stacktrace": {"frames": [
        {"filename": "app.py", "abs_path": "/srv/app.py",
         "function": "handle", "module": "app", "lineno": 20,
         "in_app": True},
        {"filename": "lib/util.py", "abs_path": "/usr/lib/util.py",
         "function": "call", "module": "util", "lineno": 3,
         "in_app": False}]}},
]}


def envelope(*items, header=None) -> bytes:
    """An envelope of C{(item header, payload bytes)} pairs."""
    lines = [json.dumps(header or {"event_id": "e" * 32}).encode()]
    for item, payload in items:
        lines += [json.dumps(item).encode(), payload]
    return b"\n".join(lines) + b"\n"


def event_item(event: dict, with_length: bool = True) -> tuple:
    payload = json.dumps(event).encode()
    header = {"type": "event"}
    if with_length:
        header["length"] = len(payload)
    return header, payload


#: An envelope inflating past 4 MB (an attachment) with an event after it.
LARGE_ENVELOPE = gzip.compress(envelope(
    ({"type": "attachment", "length": 6_000_000}, b"\0" * 6_000_000),
    event_item({"message": "after"})))


class TokenBucketTests(SynchronousTestCase):
    """SENTRY_EVENTS_PER_SECOND's bucket."""

    def assert_waits(self, first: int, then: int, wait: float) -> None:
        """At 5 a second, C{first} is taken from the full bucket; C{then}
        waits C{wait} seconds, and is taken after them."""
        clock = Clock()
        bucket = TokenBucket(clock)
        self.assertIsNone(bucket.take(first, rate=5))
        self.assertAlmostEqual(bucket.take(then, rate=5), wait)
        clock.advance(wait)
        self.assertIsNone(bucket.take(then, rate=5))

    def test_bursts_and_waits(self):
        """A second's worth at once, then what is owed waits."""
        self.assert_waits(5, 1, 0.2)

    def test_more_than_a_second_at_once(self):
        """
        More than a second's worth at once (an envelope of 6 events at 5
        a second) is taken once the bucket is full, not refused for ever,
        and what it took beyond is owed.
        """
        self.assert_waits(6, 6, 1.2)


class MappingTests(SynchronousTestCase):
    """What a Sentry event becomes."""

    def test_exception_chain(self):
        """
        The last exception is the message, the chain a Python-style
        traceback, the innermost in-app frame the location.
        """
        found, level = record_of({"exception": CHAIN, "level": "error",
                                  "server_name": "web3"}, "shop", "10.0.0.9")
        self.assertEqual(level, 3)
        self.assertEqual(found["message"], "RuntimeError: wrapped")
        self.assertEqual(found["kind"], "shop")
        self.assertEqual(found["source"], "web3")
        self.assertEqual((found["module"], found["funcName"],
                          found["pathname"], found["filename"],
                          found["lineno"]),
                         ("app", "handle", "/srv/app.py", "app.py", 20))
        self.assertEqual(found["exc_text"], textwrap.dedent("""\
            Traceback (most recent call last):
              File "app.py", line 12, in parse
                return int(text)
            ValueError: invalid literal for int(): 'x'

            During handling of the above exception, another exception occurred:

            Traceback (most recent call last):
              File "app.py", line 20, in handle
              File "lib/util.py", line 3, in call
            RuntimeError: wrapped"""))

    def test_javascript_frames(self):
        """
        Another language's frames (a URL, a column, no module) read the
        same way; no level: an error, as Sentry takes it; no server name:
        the client's address.
        """
        found, level = record_of({"exception": {"values": [{
            "type": "TypeError", "value": "x is undefined",
            "stacktrace": {"frames": [
                {"filename": "https://shop.example/app.js", "function": "?",
                 "lineno": 1, "colno": 3456}]}}]}}, "web", "10.0.0.9")
        self.assertEqual(level, 3)
        self.assertEqual(found["source"], "10.0.0.9")
        self.assertEqual(found["exc_text"],
                         "Traceback (most recent call last):\n"
                         '  File "https://shop.example/app.js", line 1, '
                         "in ?\nTypeError: x is undefined")

    def test_java_exception(self):
        """
        A chained exception as the Java SDK sends it (the cause first, the
        class's simple name and its package, no in_app, no level): the
        outer one is the message, the innermost frame the location, and it
        is an error.
        """
        def frames(*lines):
            return {"frames": [{"filename": "Shop.java", "function": name,
                                "module": "com.shop.Shop", "lineno": line,
                                "native": False} for name, line in lines]}
        found, level = record_of({"exception": {"values": [
            {"type": "IllegalStateException", "value": "no such row",
             "module": "java.lang", "thread_id": 1,
             "stacktrace": frames(("main", 24), ("lookup", 6)),
             "mechanism": {"type": "chained", "exception_id": 1,
                           "parent_id": 0}},
            {"type": "RuntimeException", "value": "lookup failed",
             "module": "java.lang", "thread_id": 1,
             "stacktrace": frames(("main", 24), ("checkout", 13)),
             "mechanism": {"type": "chained", "exception_id": 0}}]},
            "platform": "java", "server_name": "java7"}, "shop", "h")
        self.assertEqual(level, 3)
        self.assertEqual(found["message"], "RuntimeException: lookup failed")
        self.assertEqual((found["module"], found["funcName"],
                          found["filename"], found["lineno"]),
                         ("com.shop.Shop", "checkout", "Shop.java", 13))
        self.assertEqual(found["exc_text"], textwrap.dedent("""\
            Traceback (most recent call last):
              File "Shop.java", line 24, in main
              File "Shop.java", line 6, in lookup
            IllegalStateException: no such row

            During handling of the above exception, another exception occurred:

            Traceback (most recent call last):
              File "Shop.java", line 24, in main
              File "Shop.java", line 13, in checkout
            RuntimeException: lookup failed"""))

    def test_logentry(self):
        """
        A logging event: its formatted message, its format kept for
        grouping (without "formatted", as older SDKs send it, formatted as
        a logging record's); a plain message event: the message.
        """
        found, level = record_of({"logentry": {
            "message": "payment failed for order %s", "params": [42],
            "formatted": "payment failed for order 42"},
            "logger": "checkout", "level": "warning"}, "shop", "h")
        self.assertEqual((found["message"], found["msg"], found["module"],
                          level),
                         ("payment failed for order 42",
                          "payment failed for order %s", "checkout", 4))
        found, _ = record_of({"logentry": {
            "message": "payment failed for order %s", "params": [42]}},
            "shop", "h")
        self.assertEqual((found["msg"], found["args"]),
                         ("payment failed for order %s", [42]))
        self.assertNotIn("message", found)
        found, level = record_of({"message": "disk full", "level": "info"},
                                 "shop", "h")
        self.assertEqual((found["message"], level), ("disk full", 6))
        self.assertNotIn("msg", found)

    def test_context(self):
        """
        Release, environment, user, URL, transaction and tags are kept as
        text beside the error; what is not a scalar is left out.
        """
        self.assertEqual(context_of({
            "release": "shop@1.2.3", "environment": "prod",
            "user": {"id": 42, "email": "a@example.com"},
            "request": {"url": "https://shop.example/cart", "method": "GET"},
            "transaction": "/cart", "tags": {"region": "eu", "beta": True},
        }), (("release", "shop@1.2.3"), ("environment", "prod"),
             ("user", "42"), ("url", "https://shop.example/cart"),
             ("transaction", "/cart"), ("tags", "region=eu")))
        self.assertEqual(context_of({
            "release": {"x": 1}, "user": "nope", "request": [],
            "tags": [["a", "b"], "junk", ["c"]], "environment": "e" * 500,
        }), (("environment", "e" * 200), ("user", "nope"), ("tags", "a=b")))

    def test_nothing_usable(self):
        """An event with no text still counts, as "(no message)"."""
        found, _ = record_of({"exception": "junk", "level": 7}, "k", "h")
        self.assertEqual(found["message"], "(no message)")

    def test_long_stack(self):
        """Past 100 frames, the first and last 50 are shown."""
        frames = [{"filename": f"f{n}.py", "function": "f", "lineno": n}
                  for n in range(500)]
        text = traceback_of([{"type": "RecursionError",
                              "stacktrace": {"frames": frames}}])
        self.assertIn("[400 frames not shown]", text)
        self.assertIn('"f0.py"', text)
        self.assertIn('"f499.py"', text)
        self.assertNotIn('"f50.py"', text)


class EndpointTests(_ServiceTestCase):
    """POST /api/<project>/envelope/ and /store/."""

    def start(self, **overrides):
        overrides.setdefault("SENTRY_KEYS", {KEY: "shop"})
        return super().start(**overrides)

    def post(self, path, body, **headers):
        headers.setdefault("x_sentry_auth", AUTH)
        return render(self.service, path, method=b"POST", body=body,
                      turn=self.reactor,
                      **headers)

    def test_envelope(self):
        """
        An envelope's event is counted, answered with its id; the other
        items are counted by type and dropped.
        """
        self.start()
        body = envelope(
            ({"type": "session"}, b'{"sid": "1"}'),
            event_item({"exception": CHAIN, "server_name": "web3"}),
            ({"type": "attachment", "length": 5}, b"12345"),
            ({"type": "transaction"}, b'{"spans": []}'))
        answer = self.post("/api/1/envelope/", body)
        self.assertEqual(json_of(answer), {"id": "e" * 32})
        [entry] = self.service.aggregator.view().entries
        self.assertEqual(entry.sources, {"web3": 1})
        counts = self.service.counts
        self.assertEqual(counts.received["sentry"], 1)
        self.assertEqual(dict(counts.dropped_items),
                         {"session": 1, "attachment": 1, "transaction": 1})
        status = json_of(render(self.service, "/status"))
        self.assertEqual(status["received"]["sentry"], 1)
        self.assertEqual(status["sentry_items_dropped"],
                         {"session": 1, "attachment": 1, "transaction": 1})
        metrics = body_of(render(self.service, "/metrics")).decode()
        self.assertIn('failnozzle_sentry_items_dropped_total{type="session"}'
                      ' 1.0\n', metrics)

    def test_encodings(self):
        """gzip, deflate (zlib and raw) and br bodies, as SDKs send them."""
        self.start()
        body = envelope(event_item({"message": "boom"}, with_length=False))
        raw = zlib.compressobj(wbits=-15)
        for encoding, data in (
                ("gzip", gzip.compress(body)),
                ("deflate", zlib.compress(body)),
                ("deflate", raw.compress(body) + raw.flush()),
                ("br", brotli.compress(body))):
            answer = self.post("/api/1/envelope/", data,
                               content_encoding=encoding)
            self.assertEqual(answer.responseCode or 200, 200, encoding)
        self.assertEqual(self.service.aggregator.view().total, 4)

    def test_below_min_level(self):
        """
        An event less severe than MIN_LEVEL is answered and counted as
        such, in the status and the metrics, and not as an error.
        """
        self.start(MIN_LEVEL="warning")
        for level in ("info", "debug", "error"):
            answer = self.post("/api/1/envelope/", envelope(event_item(
                {"message": f"a {level} event", "level": level})))
            self.assertEqual(json_of(answer), {"id": "e" * 32})
        [entry] = self.service.aggregator.view().entries
        self.assertEqual(entry.key[3], "a error event")
        status = json_of(render(self.service, "/status"))
        self.assertEqual(status["below_level"], {"sentry": 2})
        metrics = body_of(render(self.service, "/metrics")).decode()
        self.assertIn('failnozzle_below_level_total{input="sentry"} 2.0\n',
                      metrics)

    def test_store(self):
        """The older store endpoint: the body is the event."""
        self.start()
        answer = self.post("/api/7/store/", json.dumps(
            {"event_id": "a" * 32, "message": "boom"}).encode())
        self.assertEqual(json_of(answer), {"id": "a" * 32})

    def test_what_orjson_refuses(self):
        """
        An event holding a lone surrogate (sentry-sdk sends the file names
        Python could not decode that way) is an error with its text; an
        event that is no JSON is bad input that says so.
        """
        self.start()
        body = envelope(
            ({"type": "event"}, b'{"message": "cannot read \\udcff.csv"}'),
            ({"type": "event"}, b'{"message": '))
        answer = self.post("/api/1/envelope/", body)
        self.assertEqual(answer.responseCode or 200, 200, body_of(answer))
        [bad] = self.service.aggregator.bad_input()
        self.assertIn("not JSON", bad.key[6])
        self.assertEqual([entry.key[3] for entry in
                          self.service.aggregator.view().entries
                          if entry.key != bad.key], ["cannot read \udcff.csv"])

    def test_key_in_query_and_dsn(self):
        """The key may come as ?sentry_key= or in the envelope's DSN."""
        self.start()
        body = envelope(event_item({"message": "boom"}), header={
            "dsn": f"http://{KEY}@nozzle:1550/1"})
        answer = self.post("/api/1/envelope/", body, x_sentry_auth="")
        self.assertEqual(answer.responseCode or 200, 200)
        body = envelope(event_item({"message": "boom"}))
        request = render(self.service, "/api/1/envelope/", method=b"POST",
                         turn=self.reactor,
                         body=body, args={b"sentry_key": [KEY.encode()]})
        self.assertEqual(request.responseCode or 200, 200)
        self.assertEqual(self.service.aggregator.view().total, 2)

    def test_refusals(self):
        """
        An unknown key 403, none 401, a body that is not an envelope 400,
        a corrupt or unknown encoding 400, a bomb 413 (at once), and
        without SENTRY_KEYS 404; no event is counted, and each body
        refused from a sender let in is bad input, saying why.
        """
        self.start()
        body = envelope(event_item({"message": "boom"}))
        cases = [
            (self.post("/api/1/envelope/", body,
                       x_sentry_auth="Sentry sentry_key=nope"), 403),
            (self.post("/api/1/store/", b"{}", x_sentry_auth=""), 401),
            (self.post("/api/1/envelope/", b"[1]\n"), 400),
            (self.post("/api/1/envelope/", b"garbage",
                       content_encoding="gzip"), 400),
            (self.post("/api/1/envelope/", body,
                       content_encoding="compress"), 400),
            (self.post("/api/1/store/", gzip.compress(b" " * 2_000_000),
                       content_encoding="gzip"), 413),
            (self.post("/api/1/other/", body), 404),
        ]
        for request, code in cases:
            self.assertEqual(request.responseCode, code, body_of(request))
        [bad] = self.service.aggregator.bad_input()
        self.assertEqual((bad.total, self.service.aggregator.view().total),
                         (4, 4))
        self.assertIn("HTTP request body refused: /api/1/store/: too large",
                      bad.key[6])
        self.assertEqual(self.service.counts.bad_input,
                         {"HTTP request body refused": 4})

    def test_bomb_envelope(self):
        """
        An envelope inflating past 100 MB is refused after reading that
        much, not more; an event item over 1 MB, with its length or
        without, is bad input (said in the digest and the log), and the
        items after it are read.
        """
        self.start()
        compressor = zlib.compressobj(9, wbits=16 + 15)
        header = envelope()
        data = compressor.compress(header + b'{"type": "attachment", '
                                            b'"length": 200000000}\n')
        chunk = b"\0" * 1_000_000
        for _ in range(200):
            data += compressor.compress(chunk)
        data += compressor.flush()
        self.assertLess(len(data), 300_000)
        answer = self.post("/api/1/envelope/", data, content_encoding="gzip")
        self.assertEqual(answer.responseCode, 413)
        huge = {"message": "x" * 1_100_000}
        big = envelope(event_item(huge), event_item(huge, with_length=False),
                       event_item({"message": "after"}))
        answer = self.post("/api/1/envelope/", big)
        self.assertEqual(answer.responseCode or 200, 200)
        self.assertEqual(dict(self.service.counts.dropped_items), {})
        refused, bad = self.service.aggregator.bad_input()
        self.assertIn("inflates past 104,857,600 bytes", refused.key[6])
        self.assertIn("an event item over the 1,048,576 bytes Sentry allows",
                      bad.key[6])
        self.assertEqual(bad.total, 2)
        self.assertIn("after", [entry.key[3] for entry in
                                self.service.aggregator.view().entries])

    def hold_threads(self) -> list:
        """Have what the service runs in a thread wait: each C{(call,
        Deferred)} is in the list returned, for the test to fire."""
        calls: list = []
        self.service.in_thread = lambda *call: calls.append(
            (call, defer.Deferred())) or calls[-1][1]
        return calls

    def test_large_envelope_read_in_a_thread(self):
        """
        An envelope inflating past 4 MB (attachments the event comes
        after) is read again, whole, off the reactor, and its event
        counted; a small one is read at once.
        """
        self.start()
        ran = []

        def in_thread(function, *args):
            ran.append(function.__name__)
            return defer.maybeDeferred(function, *args)

        self.service.in_thread = in_thread
        small = envelope(event_item({"message": "small"}))
        self.assertEqual(json_of(self.post("/api/1/envelope/", small)),
                         {"id": "e" * 32})
        self.assertEqual(ran, [])
        big = LARGE_ENVELOPE
        answer = self.post("/api/1/envelope/", big, content_encoding="gzip")
        self.assertEqual(json_of(answer), {"id": "e" * 32})
        self.assertEqual(ran, ["read_body"])
        self.assertEqual(sorted(entry.key[3] for entry in
                                self.service.aggregator.view().entries),
                         ["after", "small"])
        self.assertEqual(self.service.counts.dropped_items, {"attachment": 1})

    def test_client_gone_before_a_large_envelope_is_read(self):
        """
        A client that goes while its large envelope waits for its turn in
        the thread (twisted.web closes the body's file) is not answered
        with an error, and nothing is counted or said of it.
        """
        self.start()
        calls = self.hold_threads()
        big = LARGE_ENVELOPE
        first = self.post("/api/1/envelope/", big, content_encoding="gzip")
        gone = self.post("/api/1/envelope/", big, content_encoding="gzip")
        gone.content.close()
        [((function, *args), reading)] = calls
        reading.callback(function(*args))  # the first's turn ends
        self.reactor.advance(0)  # and the reactor's, with its snapshot
        self.assertEqual(json_of(first), {"id": "e" * 32})
        self.assertEqual(len(calls), 1)
        self.assertEqual(body_of(gone), b"")
        self.assertEqual(self.service.aggregator.bad_input(), ())

    def test_changed_while_a_large_envelope_is_read(self):
        """
        A large envelope whose reading in the thread ends once a reload
        dropped its key is refused with 403, and once the stop began with
        503; nothing of it is counted either way.
        """
        big = LARGE_ENVELOPE
        for change, code in (("reload", 403), ("stop", 503)):
            self.start()
            calls = self.hold_threads()
            answer = self.post("/api/1/envelope/", big,
                               content_encoding="gzip")
            if change == "reload":
                self.service.settings = dataclasses.replace(
                    self.service.settings, SENTRY_KEYS={"other": "shop"})
            else:
                self.service.stopService()
            [((function, *args), reading)] = calls
            reading.callback(function(*args))
            self.assertEqual(answer.responseCode, code, change)
            self.assertEqual(self.service.aggregator.view().total, 0)

    def test_keyless_garbage_not_bad_input(self):
        """
        A body that cannot be read, from a sender that named no key, is
        refused without being bad input: anyone could fill the digest.
        """
        self.start()
        for body, encoding in ((b"junk", "identity"), (b"junk", "gzip")):
            answer = self.post("/api/1/envelope/", body, x_sentry_auth="",
                               content_encoding=encoding)
            self.assertEqual(answer.responseCode, 400)
        self.assertEqual(self.service.aggregator.bad_input(), ())

    def test_unknown_dsn_key_before_the_rest(self):
        """
        An envelope naming its key only in its header, an unknown one, is
        refused with 403 once that line is read, the rest (a bomb) never
        inflated; naming none, 401.
        """
        self.start()
        self.service.in_thread = lambda *call: self.fail("read in a thread")
        bomb = gzip.compress(b"{}\n" + b"\0" * 50_000_000)
        for header, code in (({"dsn": "http://nope@example.com/1"}, 403),
                             ({}, 401)):
            body = gzip.compress(json.dumps(header).encode() + b"\n") + bomb
            answer = self.post("/api/1/envelope/", body, x_sentry_auth="",
                               content_encoding="gzip")
            self.assertEqual(answer.responseCode, code)
        self.assertEqual(self.service.aggregator.bad_input(), ())

    def test_rate_limited(self):
        """
        Past SENTRY_EVENTS_PER_SECOND, 429 with Retry-After and
        X-Sentry-Rate-Limits; a second later there is room again.
        """
        self.start(SENTRY_EVENTS_PER_SECOND=2)
        body = envelope(event_item({"message": "boom"}))
        codes = [self.post("/api/1/envelope/", body).responseCode or 200
                 for _ in range(3)]
        self.assertEqual(codes, [200, 200, 429])
        limited = self.post("/api/1/envelope/", body)
        self.assertEqual(limited.responseHeaders.getRawHeaders(
            "retry-after"), ["1"])
        self.assertEqual(limited.responseHeaders.getRawHeaders(
            "x-sentry-rate-limits"), ["1::key"])
        self.reactor.advance(1)
        self.assertEqual(self.post("/api/1/envelope/", body).responseCode
                         or 200, 200)

    def test_hostile_envelopes(self):
        """
        An unknown key is refused before the body is read (nothing of it
        is counted); a broken DSN is no key; an envelope with no header,
        or more than 1,000 items, is refused; item types not Sentry's are
        counted as "other"; events past 10 in one envelope are dropped; an
        event id that is not one is replaced.
        """
        self.start()
        items = envelope(({"type": "made-up-1"}, b"x"),
                         ({"type": "made-up-2"}, b"x"))
        refused = self.post("/api/1/envelope/", items,
                            x_sentry_auth="Sentry sentry_key=nope")
        self.assertEqual(refused.responseCode, 403)
        self.assertEqual(dict(self.service.counts.dropped_items), {})
        broken = envelope(event_item({"message": "x"}),
                          header={"dsn": "http://[::1/1"})
        self.assertEqual(self.post("/api/1/envelope/", broken,
                                   x_sentry_auth="").responseCode, 401)
        self.assertEqual(self.post("/api/1/envelope/", b"").responseCode,
                         400)
        self.assertEqual(self.post(
            "/api/1/envelope/",
            b"{}\n" + b'{"type": "log", "length": 0}\n\n' * 1001
        ).responseCode, 400)
        answer = self.post("/api/1/envelope/", items)
        self.assertEqual(dict(self.service.counts.dropped_items),
                         {"other": 2})
        self.assertEqual(len(json_of(answer)["id"]), 32)
        many = envelope(*[event_item({"message": f"e{n}"})
                          for n in range(12)],
                        header={"event_id": {"not": "an id"}})
        answer = self.post("/api/1/envelope/", many)
        self.assertRegex(json_of(answer)["id"], "^[0-9a-f]{32}$")
        self.assertEqual(self.service.counts.received["sentry"], 10)
        self.assertEqual(self.service.counts.dropped_items["event"], 2)

    def test_over_budget_counts_nothing(self):
        """
        An envelope whose events exceed what is left of the budget: 429,
        none of them counted.
        """
        self.start(SENTRY_EVENTS_PER_SECOND=2)
        self.post("/api/1/envelope/", envelope(event_item({"message": "a"})))
        body = envelope(*[event_item({"message": "boom"})] * 2)
        limited = self.post("/api/1/envelope/", body)
        self.assertEqual(limited.responseCode, 429)
        self.assertEqual(self.service.aggregator.view().total, 1)
        self.assertEqual(self.service.counts.received["sentry"], 1)

    def test_browser(self):
        """
        A browser's preflight is answered, and every answer says any
        origin may read it, rate limits included.
        """
        self.start()
        preflight = render(self.service, "/api/1/envelope/",
                           method=b"OPTIONS")
        self.assertEqual(preflight.responseHeaders.getRawHeaders(
            "access-control-allow-methods"), ["POST"])
        answer = self.post("/api/1/envelope/",
                           envelope(event_item({"message": "x"})))
        self.assertEqual(answer.responseHeaders.getRawHeaders(
            "access-control-allow-origin"), ["*"])

    def test_stopping(self):
        """Once the stop began, events are refused with 503, not lost."""
        self.start()
        self.service.stopService()
        answer = self.post("/api/1/envelope/",
                           envelope(event_item({"message": "x"})))
        self.assertEqual(answer.responseCode, 503)

    def test_off(self):
        """Without SENTRY_KEYS the endpoints answer 404."""
        _ServiceTestCase.start(self)
        answer = self.post("/api/1/envelope/", envelope())
        self.assertEqual(answer.responseCode, 404)


class ErrorsEndpointTests(_ServiceTestCase):
    """POST /api/errors."""

    def post(self, body, **headers):
        return render(self.service, "/api/errors", method=b"POST",
                      body=body, turn=self.reactor, **headers)

    def test_records(self):
        """
        One record, or one per line; a bad line is bad input, counted, and
        the others are taken.
        """
        service = self.start()
        lines = b"\n".join([json.dumps(record("boom")).encode(), b"",
                            b"not json",
                            json.dumps(record("boom")).encode()])
        answer = self.post(lines)
        self.assertEqual(json_of(answer), {"accepted": 2, "bad": 1})
        answer = self.post(gzip.compress(json.dumps(record("x")).encode()),
                           content_encoding="gzip")
        self.assertEqual(json_of(answer), {"accepted": 1, "bad": 0})
        self.assertEqual(service.counts.received["http"], 4)
        self.assertEqual(service.aggregator.view().total, 4)

    def test_pretty_printed(self):
        """
        One object laid out on several lines (as json.dumps(indent=2) or
        jq print it) is one record; lines that are no JSON by themselves
        nor together are each bad input.
        """
        service = self.start()
        pretty = json.dumps(record("boom"), indent=2).encode()
        answer = self.post(pretty)
        self.assertEqual(json_of(answer), {"accepted": 1, "bad": 0})
        answer = self.post(b"{\nnot json\n}")
        self.assertEqual(json_of(answer), {"accepted": 0, "bad": 3})
        [entry] = [entry for entry in service.aggregator.view().entries
                   if entry not in service.aggregator.bad_input()]
        self.assertEqual(entry.key[3], "boom")

    def test_below_min_level(self):
        """A record below MIN_LEVEL is taken, and counted as such."""
        service = self.start(MIN_LEVEL=3)
        lines = b"\n".join(
            json.dumps(record(f"level {number}", levelno=number)).encode()
            for number in (20, 40))
        answer = self.post(lines)
        self.assertEqual(json_of(answer), {"accepted": 2, "bad": 0})
        self.assertEqual(service.counts.below_level, {"http": 1})
        self.assertEqual(service.aggregator.view().total, 1)

    def test_too_many_records(self):
        """Past 10,000 records, 413 and none of them counted: the refusal
        is bad input."""
        service = self.start()
        body = b"\n".join([b'{"message": "x"}'] * 10_001)  # under 1 MiB
        answer = self.post(gzip.compress(body), content_encoding="gzip")
        self.assertEqual(answer.responseCode, 413)
        [bad] = service.aggregator.bad_input()
        self.assertIn("/api/errors: more than 10,000 records", bad.key[6])
        self.assertEqual(service.aggregator.view().total, 1)

    def test_token(self):
        """With HTTP_ERRORS_TOKEN, only requests bearing it are taken."""
        self.start(HTTP_ERRORS_TOKEN="e" * 20)
        body = json.dumps(record("boom")).encode()
        refused = self.post(body)
        self.assertEqual(refused.responseCode, 401)
        taken = self.post(body, authorization="Bearer " + "e" * 20)
        self.assertEqual(json_of(taken), {"accepted": 1, "bad": 0})


class RealClientTests(TestCase):
    """The real sentry-sdk, in a process of its own, to a real port."""

    def run_client(self, script: str, program: str = sys.executable,
                   suffix: str = ".py", run: Optional[str] = None,
                   **environment: str) -> defer.Deferred:
        """Run C{script} with C{program} (its C{run} command if it has
        one); it must succeed."""
        path = self.mktemp() + suffix
        with open(path, "w") as source:
            source.write(script)
        return self.run_program(program, [run, path] if run else [path],
                                **environment)

    @defer.inlineCallbacks
    def run_program(self, program: str, arguments: list,
                    **environment: str):
        """Run C{program} with C{arguments}; it must succeed."""
        out, err, status = yield utils.getProcessOutputAndValue(
            program, arguments, env={**child_environment(), **environment})
        self.assertEqual(status, 0, err)

    def sentry_service(self, kind: str = "shop") -> tuple:
        """A started service taking Sentry events of C{kind} on a free
        port, and the DSN for it."""
        service = start_service(self, HTTP_BIND=("127.0.0.1", 0),
                                SENTRY_KEYS={KEY: kind})
        host, port = service.listening()["HTTP_BIND"]
        return service, f"http://{KEY}@{host}:{port}/1"

    def assert_reported(self, service, messages: set, exception: str,
                        frame: str, host: str, release: str) -> dict:
        """
        The errors counted are C{messages}; the one C{exception} came with
        a traceback through C{frame}, from C{host}, of C{release}.

        @return: the errors, by message.
        """
        entries = {entry.key[3]: entry
                   for entry in service.aggregator.view().entries}
        self.assertEqual(set(entries), messages)
        caught = entries[exception]
        self.assertIn(f"in {frame}\n", caught.key[6])
        self.assertEqual(caught.sources, {host: 1})
        self.assertEqual(dict(caught.context)["release"], release)
        return entries

    @defer.inlineCallbacks
    def test_sentry_sdk(self):
        """
        capture_exception (a chained one), capture_message and the logging
        integration, in sentry-sdk's default settings (compressed as it
        compresses), become errors with their texts, levels and host.
        """
        service, dsn = self.sentry_service()
        script = textwrap.dedent(f"""\
            import logging, sentry_sdk
            sentry_sdk.init(dsn="{dsn}",
                            server_name="web7", release="shop@1.2.3",
                            environment="prod")
            def lookup(user):
                return {{}}[f"user_{{user}}"]
            try:
                try:
                    lookup(17)
                except KeyError as error:
                    raise RuntimeError("lookup failed") from error
            except Exception:
                sentry_sdk.capture_exception()
            sentry_sdk.capture_message("disk full")
            logging.getLogger("checkout").error("payment failed for %s", 42)
            assert sentry_sdk.flush(10) is None
            """)
        yield self.run_client(script)
        entries = {entry.key[3]: entry
                   for entry in service.aggregator.view().entries}
        self.assertEqual(set(entries), {"RuntimeError: lookup failed",
                                        "disk full",
                                        "payment failed for 42"})
        chained = entries["RuntimeError: lookup failed"]
        self.assertIn("KeyError: 'user_17'", chained.key[6])
        self.assertIn('in lookup\n    return {}[f"user_{user}"]',
                      chained.key[6])
        self.assertEqual(chained.sources, {"web7": 1})
        self.assertEqual(dict(chained.context)["release"], "shop@1.2.3")
        self.assertEqual(dict(chained.context)["environment"], "prod")
        self.assertEqual(entries["disk full"].level, 6)
        self.assertEqual(service.counts.received["sentry"], 3)

    @defer.inlineCallbacks
    def test_django_app(self):
        """
        A Django app's unhandled exception, reported by sentry-sdk's Django
        integration (on by default), becomes an error with its traceback,
        its view's route and its host: the 500 a user saw is in the digest.
        """
        service, dsn = self.sentry_service()
        script = textwrap.dedent(f"""\
            import django, sentry_sdk
            from django.conf import settings
            from django.urls import path
            def item(request, number):
                return {{}}[f"item_{{number}}"]
            urlpatterns = [path("items/<int:number>/", item)]
            settings.configure(DEBUG=False, ALLOWED_HOSTS=["testserver"],
                               ROOT_URLCONF=__name__, LOGGING_CONFIG=None)
            sentry_sdk.init(dsn="{dsn}",
                            server_name="web8")
            django.setup()
            from django.test import Client
            answer = Client(raise_request_exception=False).get("/items/3/")
            assert answer.status_code == 500, answer.status_code
            assert sentry_sdk.flush(10) is None
            """)
        yield self.run_client(script)
        [entry] = service.aggregator.view().entries
        self.assertEqual(entry.key[3], "KeyError: 'item_3'")
        self.assertIn('in item\n    return {}[f"item_{number}"]',
                      entry.key[6])
        self.assertEqual(entry.sources, {"web8": 1})
        self.assertEqual(dict(entry.context).get("transaction"),
                         "/items/{number}/", entry.context)

    @defer.inlineCallbacks
    def test_sentry_node(self):
        """
        @sentry/node in its default settings: an exception, one with a
        cause and a message become errors with their JavaScript stacks as
        tracebacks, release and host.
        """
        modules = os.environ.get("FAILNOZZLE_SENTRY_NODE")
        node = shutil.which("node")
        if not modules or not node:
            raise SkipTest("no @sentry/node: .ci/run installs it from npm "
                           "and names it in FAILNOZZLE_SENTRY_NODE")
        service, dsn = self.sentry_service()
        script = textwrap.dedent(f"""\
            const Sentry = require("@sentry/node");
            Sentry.init({{dsn: "{dsn}",
                         serverName: "node7", release: "shop@2.0.0"}});
            function lookup(user) {{ return ({{}})["user_" + user].name; }}
            try {{ lookup(17); }} catch (e) {{ Sentry.captureException(e); }}
            try {{
              try {{ JSON.parse("{{bad"); }}
              catch (e) {{
                throw new Error("config unreadable", {{cause: e}});
              }}
            }} catch (e) {{ Sentry.captureException(e); }}
            Sentry.captureMessage("disk full on /var");
            Sentry.flush(10000).then((sent) => process.exit(sent ? 0 : 3));
            """)
        yield self.run_client(script, node, ".js", NODE_PATH=modules)
        undefined = ("TypeError: Cannot read properties of undefined "
                     "(reading 'name')")
        entries = self.assert_reported(
            service, {undefined, "Error: config unreadable",
                      "disk full on /var"}, undefined, "lookup", "node7",
            "shop@2.0.0")
        self.assertIn("SyntaxError:",
                      entries["Error: config unreadable"].key[6])
        self.assertEqual(entries["disk full on /var"].level, 6)

    @defer.inlineCallbacks
    def test_sentry_browser(self):
        """
        @sentry/browser, bundled as applications bundle it (esbuild), in a
        page of another origin loaded by Chromium: the cross-origin posts
        are answered so the page may read them (CORS), and an exception
        and a message become errors with the page's stack and release.
        """
        browser = chromium()
        modules = os.environ.get("FAILNOZZLE_SENTRY_NODE")
        bundler = modules and os.path.join(modules, ".bin", "esbuild")
        if not bundler or not os.path.exists(os.path.join(
                modules, "@sentry", "browser")):
            raise SkipTest("no @sentry/browser and esbuild: .ci/run "
                           "installs them from npm and names them in "
                           "FAILNOZZLE_SENTRY_NODE")
        service, dsn = self.sentry_service("web")
        site = os.path.abspath(self.mktemp())
        os.makedirs(site)
        entry = os.path.join(site, "entry.js")
        with open(entry, "w") as source:
            source.write('import * as Sentry from "@sentry/browser";\n'
                         'window.Sentry = Sentry;\n')
        yield self.run_program(
            bundler, [entry, "--bundle", "--format=iife",
                      "--outfile=" + os.path.join(site, "bundle.js"),
                      "--log-level=warning"], NODE_PATH=modules)
        with open(os.path.join(site, "index.html"), "w") as page:
            page.write(textwrap.dedent(f"""\
                <!doctype html><html><head><title>loading</title>
                <script src="bundle.js"></script></head><body><script>
                Sentry.init({{dsn: "{dsn}",
                             release: "web@3.1"}});
                function lookup(user) {{ return ({{}})["user_" + user].name; }}
                try {{ lookup(17); }}
                catch (e) {{ Sentry.captureException(e); }}
                Sentry.captureMessage("checkout button broken");
                Sentry.flush(10000).then(function (sent) {{
                  document.title = sent ? "sent" : "not sent"; }});
                </script></body></html>
                """))
        pages = reactor.listenTCP(0, Site(File(site)), interface="127.0.0.1")
        self.addCleanup(pages.stopListening)
        profile = os.path.abspath(self.mktemp())
        out, err, status = yield utils.getProcessOutputAndValue(
            browser, BROWSER_FLAGS + [
                f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                "--dump-dom", f"http://127.0.0.1:{pages.getHost().port}/"],
            env={"HOME": profile})
        self.assertEqual(status, 0, err)
        self.assertIn("<title>sent</title>", out.decode())
        undefined = ("TypeError: Cannot read properties of undefined "
                     "(reading 'name')")
        # A browser names no server: the host is the client's address.
        self.assert_reported(service, {undefined, "checkout button broken"},
                             undefined, "lookup", "127.0.0.1", "web@3.1")
        self.assertEqual(service.counts.received["sentry"], 2)

    @defer.inlineCallbacks
    def test_sentry_go(self):
        """
        sentry-go as Debian packages it: an error wrapping another and a
        message become errors with the Go stack, release and host.
        """
        go = shutil.which("go")
        library = "/usr/share/gocode"
        if not go or not os.path.isdir(os.path.join(
                library, "src", "github.com", "getsentry", "sentry-go")):
            raise SkipTest("no sentry-go: .ci/run installs Debian's "
                           "golang-go and "
                           "golang-github-getsentry-sentry-go-dev")
        service, dsn = self.sentry_service()
        script = textwrap.dedent(f"""\
            package main

            import (
            \t"errors"
            \t"fmt"
            \t"os"
            \t"time"

            \t"github.com/getsentry/sentry-go"
            )

            func lookup(user int) error {{
            \treturn fmt.Errorf("lookup failed for user %d: %w", user,
            \t\terrors.New("no such row"))
            }}

            func main() {{
            \tsentry.Init(sentry.ClientOptions{{
            \t\tDsn: "{dsn}",
            \t\tServerName: "go7", Release: "shop@4.0"}})
            \tsentry.CaptureException(lookup(17))
            \tsentry.CaptureMessage("queue stuck")
            \tif !sentry.Flush(10 * time.Second) {{
            \t\tos.Exit(3)
            \t}}
            }}
            """)
        cache = os.path.abspath(self.mktemp())
        yield self.run_client(script, go, ".go", GOPATH=library,
                              GO111MODULE="off", GOCACHE=cache,
                              HOME=cache, run="run")
        wrapped = "*fmt.wrapError: lookup failed for user 17: no such row"
        entries = self.assert_reported(service, {wrapped, "queue stuck"},
                                       wrapped, "main", "go7", "shop@4.0")
        self.assertIn("*errors.errorString: no such row",
                      entries[wrapped].key[6])
        self.assertEqual(entries["queue stuck"].level, 6)

    @defer.inlineCallbacks
    def test_sentry_ruby(self):
        """
        sentry-ruby as Debian packages it, in its default settings: an
        exception and a message become errors with the Ruby backtrace,
        release and host.
        """
        ruby = shutil.which("ruby")
        if not ruby or subprocess.run(
                [ruby, "-e", 'require "sentry-ruby"'],
                capture_output=True).returncode:
            raise SkipTest("no sentry-ruby: .ci/run installs Debian's ruby "
                           "and ruby-sentry-ruby")
        service, dsn = self.sentry_service()
        script = textwrap.dedent(f"""\
            require "sentry-ruby"
            Sentry.init do |config|
              config.dsn = "{dsn}"
              config.server_name = "rb7"
              config.release = "shop@5.0"
            end
            def lookup(user)
              {{}}.fetch("user_#{{user}}")
            end
            begin
              lookup(17)
            rescue => e
              Sentry.capture_exception(e)
            end
            Sentry.capture_message("cache cold")
            """)
        yield self.run_client(script, ruby, ".rb")
        missing = 'KeyError: key not found: "user_17"'
        self.assert_reported(service, {missing, "cache cold"}, missing,
                             "lookup", "rb7", "shop@5.0")
        self.assertEqual(service.counts.received["sentry"], 2)

    @defer.inlineCallbacks
    def test_sentry_java(self):
        """
        io.sentry:sentry, the Java SDK, in its default settings, in a class
        compiled with javac: a chained exception and a message become
        errors with the Java stack as a traceback, their levels, release,
        environment and host.
        """
        jar = os.environ.get("FAILNOZZLE_SENTRY_JAVA")
        javac, java = shutil.which("javac"), shutil.which("java")
        if not jar or not os.path.isfile(jar) or not javac or not java:
            raise SkipTest("no Java SDK: .ci/run fetches io.sentry:sentry "
                           "with mvn where Maven serves it, and names its "
                           "jar in FAILNOZZLE_SENTRY_JAVA")
        service, dsn = self.sentry_service()
        classes = os.path.abspath(self.mktemp())
        os.makedirs(classes)
        source = os.path.join(classes, "Shop.java")
        with open(source, "w") as program:
            program.write(textwrap.dedent(f"""\
                import io.sentry.Sentry;

                public class Shop {{
                    static void lookup(int user) {{
                        throw new IllegalStateException(
                            "no such row for user " + user);
                    }}

                    static void checkout(int user) {{
                        try {{
                            lookup(user);
                        }} catch (IllegalStateException error) {{
                            throw new RuntimeException("lookup failed", error);
                        }}
                    }}

                    public static void main(String[] arguments) {{
                        Sentry.init(options -> {{
                            options.setDsn("{dsn}");
                            options.setServerName("java7");
                            options.setRelease("shop@6.0");
                        }});
                        try {{
                            checkout(17);
                        }} catch (RuntimeException error) {{
                            Sentry.captureException(error);
                        }}
                        Sentry.captureMessage("stock count negative");
                        Sentry.flush(10000);
                        Sentry.close();
                    }}
                }}
                """))
        yield self.run_program(javac, ["-d", classes, "-cp", jar, source])
        yield self.run_program(java, ["-cp", os.pathsep.join([jar, classes]),
                                      "Shop"])
        chained = "RuntimeException: lookup failed"
        entries = self.assert_reported(
            service, {chained, "stock count negative"}, chained, "checkout",
            "java7", "shop@6.0")
        self.assertEqual(entries[chained].key[6], textwrap.dedent("""\
            Traceback (most recent call last):
              File "Shop.java", line 24, in main
              File "Shop.java", line 11, in checkout
              File "Shop.java", line 5, in lookup
            IllegalStateException: no such row for user 17

            During handling of the above exception, another exception occurred:

            Traceback (most recent call last):
              File "Shop.java", line 24, in main
              File "Shop.java", line 13, in checkout
            RuntimeException: lookup failed"""))
        # The SDK names no level for an exception: an error, as in Sentry.
        self.assertEqual(entries[chained].level, 3)
        self.assertEqual(dict(entries[chained].context)["environment"],
                         "production")
        self.assertEqual(entries["stock count negative"].level, 6)
        self.assertEqual(service.counts.received["sentry"], 2)


class BodyLimitTests(TestCase):
    """A body announced too long is refused before it is read."""

    @defer.inlineCallbacks
    def test_content_length_refused(self):
        service = start_service(self, HTTP_BIND=("127.0.0.1", 0),
                                SENTRY_KEYS={KEY: "shop"})
        address = service.listening()["HTTP_BIND"]

        def ask() -> bytes:
            with socket.create_connection(address, timeout=10) as client:
                client.sendall(b"POST /api/1/envelope/ HTTP/1.1\r\n"
                               b"Host: x\r\nContent-Length: 999999999\r\n"
                               b"\r\n")
                return client.recv(200)

        reply = yield threads.deferToThread(ask)
        self.assertTrue(reply.startswith(b"HTTP/1.1 413 "), reply)

    @defer.inlineCallbacks
    def test_form_not_parsed(self):
        """
        A form-encoded body is never parsed into arguments (Twisted would
        before any check), yet /api/errors takes its lines as records, as
        curl -d sends them.
        """
        service = start_service(self, HTTP_BIND=("127.0.0.1", 0))
        address = service.listening()["HTTP_BIND"]
        record_line = json.dumps(record("boom")).encode()
        body = record_line + b"\n" + b"a=&" * 100_000

        def ask() -> bytes:
            with socket.create_connection(address, timeout=10) as client:
                client.sendall(
                    b"POST /api/errors HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/x-www-form-urlencoded\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                    % (len(body), body))
                return b"".join(iter(lambda: client.recv(65536), b""))

        reply = yield threads.deferToThread(ask)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply[:200])
        self.assertIn(b'{"accepted":1,"bad":1}', reply)
