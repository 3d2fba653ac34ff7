"""
The HTTP face: status, the page, health, metrics and the control API, each
rendered through the site's resource tree (DummyRequest), and served on a
real port to a real HTTP client.
"""
from __future__ import annotations

import json
import os
import socket
from io import BytesIO
from typing import Optional

from twisted.internet import defer, reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.error import UnsupportedMethod
from twisted.web.resource import getChildForRequest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from failnozzle import web
from failnozzle.config import ConfigError
from failnozzle.service import FailnozzleService
from failnozzle.status import health_of
from tests.common import (FakeMailTransport, SMTPSink, datagrams_received,
                          make_settings, poll_until, record, send_datagrams,
                          start_service, udp_address)

TOKEN = "s3cret-token-0123456789"


def render(service, path: str, method: bytes = b"GET", body: bytes = b"",
           args: Optional[dict] = None, local: str = "127.0.0.1",
           turn: Optional[MemoryReactorClock] = None,
           **headers: str) -> DummyRequest:
    """
    C{method} C{path} (with the query C{args}) through the service's site,
    as twisted.web would, on a connection to the address C{local}, then
    the end of the reactor's C{turn}, if given (what waits for it, such as
    a quick snapshot, runs); the request, finished, with C{written} and
    C{responseCode}.
    """
    request = DummyRequest(path.lstrip("/").encode().split(b"/"))
    request.path = path.encode()
    request.getHost = lambda: IPv4Address("TCP", local, 1550)
    request.method = method
    request.args = args or {}
    request.content = BytesIO(body)
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name.replace("_", "-"), [value])
    resource = getChildForRequest(service.web.resource, request)
    try:
        result = resource.render(request)
    except UnsupportedMethod:
        # As twisted.web.server.Request.render answers it.
        request.setResponseCode(405)
        result = b""
    if result is not NOT_DONE_YET:
        request.write(result)
        request.finish()
    if turn is not None:
        turn.advance(0)
    return request


def body_of(request: DummyRequest) -> bytes:
    return b"".join(request.written)


def json_of(request: DummyRequest) -> dict:
    return json.loads(body_of(request))


class _ServiceTestCase(SynchronousTestCase):
    """A service on a memory reactor with a fake mail transport."""

    def start(self, **overrides) -> FailnozzleService:
        overrides.setdefault("REPORT_TO", "ops@example.com")
        overrides.setdefault("REPORT_FROM", "nozzle@example.com")
        for name in ("SPOOL_DIR", "STATE_FILE", "MAILDIR"):
            overrides.setdefault(name, self.mktemp())
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_700_000_000)
        self.transport = FakeMailTransport()
        udp_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(udp_socket.close)
        self.service = FailnozzleService(
            make_settings(**overrides), self.reactor, udp_socket,
            self.transport, reload_settings=lambda: (
                make_settings(**overrides), []))
        self.service.startService()
        self.addCleanup(lambda: self.service.running
                        and self.service.stopService())
        return self.service

    def receive(self, *items, sender=("10.0.0.1", 5000)) -> None:
        for item in items:
            data = item if isinstance(item, bytes) else json.dumps(
                item).encode()
            self.service.receiver.datagramReceived(data, sender)


class StatusTests(_ServiceTestCase):
    """GET /status, GET / and GET /healthz."""

    def test_status(self):
        """
        The status says what is buffered (the top errors with their counts
        and hosts), bad input by reason, the flush times and what was
        delivered.
        """
        service = self.start()
        self.receive(record("boom", source="web1"),
                     record("boom", source="web2"), b"not json")
        status = json_of(render(service, "/status"))
        self.assertEqual(status["buffered"]["unique"], 2)
        self.assertEqual(status["buffered"]["total"], 3)
        [boom, bad] = status["buffered"]["top"]
        self.assertEqual(boom["count"], 2)
        self.assertEqual(boom["message"], "boom")
        self.assertEqual(boom["hosts"], {"web1": 1, "web2": 1})
        self.assertEqual(status["bad_input"],
                         {"datagram is not valid JSON": 1})
        # GROUP_WAIT_SECONDS after the first error.
        self.assertEqual(status["flush"]["next"], 1_700_000_010)
        self.assertIsNone(status["flush"]["last"])
        self.assertEqual(status["delivery"]["sent"], {})
        self.assertEqual(status["spool"]["messages"], 0)

        self.reactor.advance(10)
        self.transport.succeed_all()
        status = json_of(render(service, "/status"))
        self.assertEqual(status["buffered"]["total"], 0)
        self.assertEqual(status["flush"]["last"], 1_700_000_010)
        self.assertEqual(status["flush"]["next"], 1_700_000_070)
        self.assertEqual(status["delivery"]["sent"], {"digest": 1})
        self.assertEqual(status["delivery"]["last_success"], 1_700_000_010)
        self.assertEqual(status["seen_errors"], 2)

    def test_delivery_error(self):
        """A delivery that failed is in the status: when, why, how many."""
        service = self.start()
        self.receive(record("boom"))
        self.reactor.advance(10)
        self.transport.fail_all(ConnectionRefusedError("refused"))
        status = json_of(render(service, "/status"))
        error = status["delivery"]["last_error"]
        self.assertEqual(error["at"], 1_700_000_010)
        self.assertIn("refused", error["reason"])
        self.assertEqual(status["delivery"]["failures"], {"temporary": 1})
        self.assertEqual(status["spool"]["messages"], 1)
        self.assertEqual(status["spool"]["oldest_age_seconds"], 0)

    def test_page_escapes(self):
        """
        The page is HTML that shows the errors, their texts escaped: a
        hostile message is text, not markup.
        """
        service = self.start()
        self.receive(record("<script>alert(1)</script>", source="<b>h</b>"))
        page = render(service, "/")
        self.assertEqual(page.responseHeaders.getRawHeaders(
            "content-type"), ["text/html; charset=utf-8"])
        html = body_of(page).decode()
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;", html)
        self.assertIn("&lt;b&gt;h&lt;/b&gt;", html)
        self.assertNotIn("<script>", html)
        self.assertIn("healthy", html)

    def test_healthz(self):
        """
        200 while the flush loop runs on time; 503 and why once a flush
        is late (the reactor was blocked), and while stopping.
        """
        service = self.start(FLUSH_SECONDS=10)
        self.reactor.advance(10)
        health = render(service, "/healthz")
        self.assertEqual((health.responseCode or 200, body_of(health)),
                         (200, b"ok\n"))
        # The clock jumps past two periods without the loop running.
        service.counts.last_flush -= 30
        health = render(service, "/healthz")
        self.assertEqual(health.responseCode, 503)
        self.assertEqual(body_of(health), b"unhealthy: the last flush was "
                                          b"30 s ago (FLUSH_SECONDS = 10)\n")
        service.stopService()
        self.assertEqual(health_of(service), "stopping")

    def test_wrong_method(self):
        """A method an endpoint does not take is refused with 405."""
        service = self.start()
        request = render(service, "/status", method=b"POST")
        self.assertEqual(request.responseCode, 405)
        request = render(service, "/api/flush")
        self.assertEqual(request.responseCode, 405)
        request = render(service, "/api/flush/more", method=b"POST",
                         content_type="application/json")
        self.assertEqual(request.responseCode, 404)


class MetricsTests(_ServiceTestCase):
    """GET /metrics."""

    def test_metrics(self):
        """
        Prometheus' text format, with the counters by label, the gauges of
        what is buffered and waiting, and process metrics.
        """
        service = self.start()
        self.receive(record("boom"), b"[]")
        self.reactor.advance(10)
        self.transport.succeed_all()
        text = body_of(render(service, "/metrics")).decode()
        for line in (
                'failnozzle_bad_input_total{reason="datagram is JSON but '
                'not an object"} 1.0',
                'failnozzle_digests_sent_total{class="digest"} 1.0',
                'failnozzle_errors_received_total{input="mail"} 0.0',
                "failnozzle_buffered_errors 0.0",
                "failnozzle_spool_messages 0.0",
                "failnozzle_last_flush_timestamp_seconds 1.70000001e+09",
                "failnozzle_last_delivery_success_timestamp_seconds "
                "1.70000001e+09"):
            self.assertIn(line + "\n", text)
        self.assertIn("# TYPE failnozzle_errors_received_total counter",
                      text)
        self.assertIn("process_resident_memory_bytes", text)


class AccessTests(_ServiceTestCase):
    """Who may read status and who may control."""

    def test_loopback_without_token(self):
        """
        On loopback without HTTP_TOKEN status is open, and so is control,
        for a JSON request only (a web page cannot send one elsewhere).
        """
        service = self.start()
        self.assertEqual(render(service, "/status").responseCode, 200)
        refused = render(service, "/api/flush", method=b"POST",
                         content_type="text/plain")
        self.assertEqual(refused.responseCode, 415)
        flushed = render(service, "/api/flush", method=b"POST",
                         content_type="application/json")
        self.assertEqual(json_of(flushed), {"flushed": 0, "digests": 0})

    def test_loopback_with_token(self):
        """
        On loopback with HTTP_TOKEN status is open and control takes the
        token: none or a wrong one is refused with 401.
        """
        service = self.start(HTTP_TOKEN=TOKEN)
        self.assertEqual(render(service, "/status").responseCode, 200)
        for given in ({}, {"authorization": "Bearer wrong-token"},
                      {"authorization": TOKEN}):
            refused = render(service, "/api/flush", method=b"POST",
                             content_type="application/json", **given)
            self.assertEqual(refused.responseCode, 401, given)
            self.assertEqual(json_of(refused),
                             {"error": "HTTP_TOKEN required"})
        taken = render(service, "/api/flush", method=b"POST",
                       content_type="application/json",
                       authorization=f"Bearer {TOKEN}")
        self.assertEqual(taken.responseCode, 200)

    def test_other_address(self):
        """
        On an address other than loopback every endpoint but /healthz
        takes the token, and such an address without one is refused at
        start-up.
        """
        service = self.start(HTTP_BIND=("0.0.0.0", 0), HTTP_TOKEN=TOKEN)
        for path in ("/", "/status", "/metrics", "/api/failed"):
            refused = render(service, path, local="10.0.0.5")
            self.assertEqual(refused.responseCode, 401, path)
            allowed = render(service, path, local="10.0.0.5",
                             authorization=f"Bearer {TOKEN}")
            self.assertEqual(allowed.responseCode or 200, 200, path)
        self.assertEqual(body_of(render(service, "/healthz",
                                        local="10.0.0.5")), b"ok\n")
        with self.assertRaises(ConfigError) as raised:
            make_settings(HTTP_BIND=("0.0.0.0", 1550))
        self.assertIn("HTTP_TOKEN is required", str(raised.exception))

    def test_rebound_host(self):
        """
        On loopback, a request whose Host names another host (a page whose
        DNS now points here, or a proxy) is refused status and control
        without the token; one naming loopback is not.
        """
        service = self.start()
        for host, code in (("attacker.example", 401),
                           ("attacker.example:1550", 401),
                           ("127.0.0.1:1550", 200), ("[::1]:1550", 200),
                           ("localhost", 200)):
            request = render(service, "/status", host=host)
            self.assertEqual(request.responseCode or 200, code, host)
        flush = render(service, "/api/flush", method=b"POST",
                       content_type="application/json",
                       host="attacker.example")
        self.assertEqual(flush.responseCode, 401)

    def test_host_tricks(self):
        """
        A Host header that only begins with a loopback address, names one
        with a port that is none, or comes twice, is not loopback; nor is
        a request a proxy says it forwards, whatever its Host (nginx's
        default sends the address it forwards to).
        """
        service = self.start()
        for host in ("[::1].attacker.example", "[::1]x", "[::1]:1550x",
                     "127.0.0.1:x", "localhost.attacker.example"):
            request = render(service, "/status", host=host)
            self.assertEqual(request.responseCode, 401, host)
        twice = render(service, "/status")
        twice.requestHeaders.setRawHeaders("host", ["attacker.example",
                                                    "127.0.0.1"])
        self.assertFalse(web._Access.on_loopback(twice))
        for header in ("x_forwarded_for", "forwarded", "x_real_ip",
                       "x_forwarded_host"):
            request = render(service, "/status", host="127.0.0.1:1550",
                             **{header: "203.0.113.9"})
            self.assertEqual(request.responseCode, 401, header)

    def test_bad_bodies(self):
        """A control body that is not a JSON object, or too big: 400, 413."""
        service = self.start()
        json_type = {"content_type": "application/json"}
        for body, code in ((b"{", 400), (b"[1]", 400),
                           (b" " * 70_000, 413),
                           (b'{"ids": "all"}', 400)):
            request = render(service, "/api/failed/resend", method=b"POST",
                             body=body, **json_type)
            self.assertEqual(request.responseCode, code, body[:10])


class ControlTests(_ServiceTestCase):
    """POST /api/flush, /api/reload and the failed messages."""

    def test_flush(self):
        """A flush now: the buffered errors go out in a digest."""
        service = self.start()
        self.receive(record("boom"), record("boom"))
        flushed = render(service, "/api/flush", method=b"POST",
                         content_type="application/json")
        self.assertEqual(json_of(flushed), {"flushed": 2, "digests": 1})
        self.assertEqual(len(self.transport.pending), 1)

    def test_reload(self):
        """A reload, as SIGHUP."""
        service = self.start()
        reloaded = render(service, "/api/reload", method=b"POST",
                          content_type="application/json")
        self.assertEqual(json_of(reloaded), {"reloaded": True})

    def test_failed_list_and_resend(self):
        """
        A digest given up on is listed (subject, recipients) and, resent,
        goes back into the spool and is tried at once; an unknown id is
        refused.
        """
        service = self.start()
        self.receive(record("boom"))
        self.reactor.advance(10)
        self.transport.fail_all(_permanent())
        [failed] = json_of(render(service, "/api/failed"))["failed"]
        self.assertEqual(failed["to"], "ops@example.com")
        self.assertIn("boom", failed["subject"])
        self.assertGreater(failed["bytes"], 100)
        unknown = render(service, "/api/failed/resend", method=b"POST",
                         body=b'{"ids": ["nope"]}',
                         content_type="application/json")
        self.assertEqual((unknown.responseCode, json_of(unknown)),
                         (400, {"error": "not in failed/ or unconfirmed/: "
                                         "nope"}))
        resent = render(service, "/api/failed/resend", method=b"POST",
                        body=json.dumps({"ids": [failed["id"]]}).encode(),
                        content_type="application/json")
        self.assertEqual(json_of(resent), {"resent": [failed["id"]]})
        self.assertEqual(json_of(render(service, "/api/failed")),
                         {"failed": [], "not_listed": 0, "unconfirmed": [],
                          "unconfirmed_not_listed": 0})
        self.assertEqual(len(self.transport.pending), 2)
        self.transport.succeed_all()
        self.assertEqual(os.listdir(os.path.join(
            service.settings.SPOOL_DIR, "new")), [])


def _permanent():
    from twisted.mail.smtp import SMTPDeliveryError
    return SMTPDeliveryError(550, b"no such user")


class ServedTests(TestCase):
    """The site on a real port, asked by a real HTTP client."""

    @defer.inlineCallbacks
    def test_served(self):
        """
        HTTP_BIND is listened on with the rest: status over a real
        connection counts the datagrams received on the real UDP port.
        """
        sink = SMTPSink(self)
        service = start_service(self, HTTP_BIND=("127.0.0.1", 0),
                                SMTP_HOST="127.0.0.1", SMTP_PORT=sink.port,
                                SMTP_TLS="off",
                                REPORT_FROM="nozzle@example.com",
                                REPORT_TO=["ops@example.com"])
        host, port = service.listening()["HTTP_BIND"]
        arrived = datagrams_received(service, 2)
        send_datagrams(udp_address(service), [record("boom"), b"junk"])
        yield arrived
        agent = Agent(reactor)
        response = yield agent.request(
            b"GET", f"http://{host}:{port}/status".encode())
        status = json.loads((yield readBody(response)))
        self.assertEqual(status["received"]["udp"], 2)
        self.assertEqual(status["listening"]["http_bind"], f"{host}:{port}")
        response = yield agent.request(
            b"POST", f"http://{host}:{port}/api/flush".encode(),
            Headers({"content-type": ["application/json"]}),
            FileBodyProducer(BytesIO(b"{}")))
        self.assertEqual(json.loads((yield readBody(response))),
                         {"flushed": 2, "digests": 1})
        yield sink.wait_for(1)


    @defer.inlineCallbacks
    def test_head(self):
        """
        HEAD is answered where GET is, and with 405 and the methods taken
        where only POST is (Twisted's Resource had raised, a 500 and a
        traceback in the log); nothing is logged as critical.
        """
        service = start_service(self, HTTP_BIND=("127.0.0.1", 0),
                                SENTRY_KEYS={"abc": "shop"})
        host, port = service.listening()["HTTP_BIND"]
        events = EventLoggingObserver.createWithCleanup(
            self, globalLogPublisher)
        agent = Agent(reactor)
        codes = {}
        for path in ("/healthz", "/status", "/api/errors", "/api/flush",
                     "/api/1/envelope/", "/api", "/api/failed/resend"):
            response = yield agent.request(
                b"HEAD", f"http://{host}:{port}{path}".encode())
            codes[path] = (response.code,
                           response.headers.getRawHeaders("allow"))
        self.assertEqual(codes, {
            "/healthz": (200, None), "/status": (200, None),
            "/api/errors": (405, ["POST"]), "/api/flush": (405, ["POST"]),
            "/api/1/envelope/": (405, ["OPTIONS, POST"]),
            "/api": (405, [""]), "/api/failed/resend": (405, ["POST"])})
        self.assertEqual([event for event in events
                          if event["log_level"] == LogLevel.critical], [])


class OddTextTests(_ServiceTestCase):
    """What errors may hold that JSON encoders refuse."""

    def test_surrogates_and_huge_integers(self):
        """
        A lone surrogate and an integer past 64 bits (which the standard
        library's JSON reader keeps) do not stop the status or the page.
        """
        service = self.start()
        self.receive(b'{"message": "bad \\ud800 text", "kind": '
                     b'123456789012345678901234567890, "source": "h\\udfff"}')
        status = render(service, "/status")
        self.assertEqual(status.responseCode or 200, 200)
        [error] = json_of(status)["buffered"]["top"]
        self.assertEqual(error["message"], "bad \ud800 text")
        self.assertEqual(error["kind"], 123456789012345678901234567890)
        page = render(service, "/")
        self.assertEqual(page.responseCode or 200, 200)
        self.assertIn(b"bad ? text", body_of(page))


class ConnectionLimitTests(TestCase):
    """Slow clients cannot hold every connection."""

    @defer.inlineCallbacks
    def test_past_the_limit(self):
        """
        Past MAX_CONNECTIONS open connections a new one is closed at once;
        once one closes, a new one is served again.
        """
        self.patch(web, "MAX_CONNECTIONS", 3)
        service = start_service(self, HTTP_BIND=("127.0.0.1", 0))
        address = service.listening()["HTTP_BIND"]

        def connect_and_ask(count: int) -> list:
            held = [socket.create_connection(address, timeout=10)
                    for _ in range(count)]
            try:
                # Sent without its end: each waits for more, as a slow
                # client does.
                for sock in held:
                    sock.sendall(b"GET /status HTTP/1.1\r\n")
                with socket.create_connection(address, timeout=10) as extra:
                    try:
                        extra.sendall(b"GET /healthz HTTP/1.1\r\n"
                                      b"Host: 127.0.0.1\r\n\r\n")
                        refused = extra.recv(100)
                    except ConnectionResetError:
                        refused = b""  # closed before it read the request
            finally:
                for sock in held:
                    sock.close()
            return refused

        refused = yield threads.deferToThread(connect_and_ask, 3)
        self.assertEqual(refused, b"")
        yield poll_until(lambda: service.web.connections == 0,
                         "the connections closed")
        served = yield threads.deferToThread(connect_and_ask, 0)
        self.assertTrue(served.startswith(b"HTTP/1.1 200"), served)
