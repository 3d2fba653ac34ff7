"""
The running daemon: wires receiver, aggregator, renderer and outbox to the
reactor, runs the flush loop, decides who gets what (routing and the pager),
and flushes and waits for the last digests on a clean stop.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Optional

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from failnozzle.aggregate import Aggregator, Batch, Entry, RateWindow
from failnozzle.config import Settings
from failnozzle.digest import DigestRenderer, build_message, pager_alert
from failnozzle.ingest import (ErrorReceiver, RecordReader,
                               internal_error_key_maker)
from failnozzle.outbox import MaildirTransport, Outbox, SMTPTransport

_log = Logger()


@dataclass(frozen=True)
class Route:
    """Who one class of message goes to, and the settings that say so."""

    kind: str
    setting: str
    recipients: tuple
    sender: str
    reply_to: tuple


def make_transport(settings: Settings, reactor):
    """The SMTP transport if an SMTP server is configured, else the maildir."""
    if not settings.smtp_enabled:
        return MaildirTransport(settings.MAILDIR, reactor)
    return SMTPTransport(
        reactor,
        settings.SMTP_HOST,
        settings.SMTP_PORT,
        tls=settings.SMTP_TLS,
        verify=settings.SMTP_TLS_VERIFY,
        ca_file=settings.SMTP_CA_FILE,
        user=settings.SMTP_USER,
        password=settings.SMTP_PASSWORD,
        timeout=settings.SMTP_TIMEOUT,
        helo_name=settings.SERVER_NAME,
    )


class MonitoringFilter:
    """
    Tells "just monitoring" canary errors (a marker in message or exc_text)
    from real ones.
    """

    def __init__(self, unique_fields: tuple, markers: tuple) -> None:
        self._positions = [unique_fields.index(name)
                           for name in ("message", "exc_text")
                           if name in unique_fields]
        self._markers = markers

    def __call__(self, entry: Entry) -> bool:
        texts = [str(entry.key[i]) for i in self._positions]
        return any(marker in text for marker in self._markers
                   for text in texts)


class FailnozzleService(Service):
    """
    The whole daemon as one twistd service.

    @ivar udp_port: the listening port, once started.
    """

    def __init__(self, settings: Settings, reactor,
                 udp_socket: socket.socket,
                 transport: Optional[object] = None) -> None:
        """
        @param udp_socket: the bound socket errors arrive on (see
            L{failnozzle.ingest.bind_udp_socket}); the service adopts it
            when it starts.
        @param transport: where mail goes; by default the one the settings
            describe.
        """
        self.settings = settings
        self._reactor = reactor
        self._udp_socket = udp_socket
        self.udp_port = None
        reader = RecordReader(settings.unique_fields,
                              settings.SOURCE_FIELD_NAME,
                              settings.INCOMING_MESSAGE_MAX_SIZE)
        self.aggregator = Aggregator(
            settings.MAX_UNIQUE_MESSAGES, reactor,
            internal_error_key_maker(reader, settings.INTERNAL_ERROR_FUNC))
        self.receiver = ErrorReceiver(reader, self.aggregator, reactor)
        self.rate_window = RateWindow(settings.PAGER_WINDOW_SIZE,
                                      settings.PAGER_LIMIT)
        self.renderer = DigestRenderer(
            settings.UNIQUE_MSG_TUPLE,
            settings.SERVER_NAME,
            settings.MAX_UNIQUE_MESSAGES,
            settings.EMAIL_TEMPLATE_DIR,
            settings.EMAIL_SUBJECT_TEMPLATE,
            settings.EMAIL_BODY_TEMPLATE,
        )
        self.outbox = Outbox(transport or make_transport(settings, reactor))
        self._is_monitoring = MonitoringFilter(
            settings.unique_fields, settings.MONITORING_ERROR_MARKERS)
        self._routes = {
            "digest": Route("digest", "REPORT_TO", settings.REPORT_TO,
                            settings.REPORT_FROM, settings.REPLY_TO),
            "monitoring": Route("monitoring", "JUST_MONITORING_REPORT_TO",
                                settings.JUST_MONITORING_REPORT_TO,
                                settings.REPORT_FROM, settings.REPLY_TO),
            "pager": Route("pager", "PAGER_TO", settings.PAGER_TO,
                           settings.PAGER_FROM or settings.REPORT_FROM,
                           settings.PAGER_REPLY_TO),
        }
        self._flush_loop = LoopingCall(self._scheduled_flush)
        self._flush_loop.clock = reactor

    def startService(self) -> None:
        super().startService()
        transport = self.outbox.transport
        if isinstance(transport, MaildirTransport):
            try:
                transport.prepare()
            except OSError as error:
                _log.error("MAILDIR {path} cannot be created: {reason}; "
                           "digests cannot be written until it can",
                           path=transport.path, reason=error.strerror)
        sock = self._udp_socket
        self.udp_port = self._reactor.adoptDatagramPort(
            sock.fileno(), sock.family, self.receiver,
            maxPacketSize=self.settings.INCOMING_MESSAGE_MAX_SIZE + 1)
        sock.close()
        address = self.udp_port.getHost()
        _log.info(
            "failnozzle listening for errors on UDP {host}:{port}; a digest "
            "every {seconds:g} s to {transport}",
            host=address.host, port=address.port,
            seconds=self.settings.FLUSH_SECONDS,
            transport=transport.describe(),
        )
        self._flush_loop.start(self.settings.FLUSH_SECONDS, now=False)

    def stopService(self) -> defer.Deferred:
        """
        Stop reading, flush what is buffered, and wait until the digests
        are delivered or have failed (each attempt is bounded by
        SMTP_TIMEOUT).
        """
        super().stopService()
        if self._flush_loop.running:
            self._flush_loop.stop()
        if self.receiver.transport is not None:
            self.receiver.read_pending()
        _log.info("failnozzle stopping: flushing the buffer and waiting for "
                  "the last digests")
        stopped = defer.maybeDeferred(self.udp_port.stopListening)
        stopped.addCallback(lambda _: self.flush())
        stopped.addCallback(lambda _: self.outbox.drain())
        stopped.addCallback(lambda _: _log.info("failnozzle stopped"))
        return stopped

    def _scheduled_flush(self) -> None:
        # Never let an exception out: it would stop the LoopingCall for good.
        # Nor a Deferred: the next flush must not wait for the mail.
        try:
            self.flush()
        except Exception:
            _log.failure("Flush failed; the next one is in {seconds:g} s",
                         seconds=self.settings.FLUSH_SECONDS)

    def flush(self) -> list:
        """
        Flush the buffer: check the error rate, then send each recipient
        class its digest.

        @return: the Deferreds of the deliveries begun.
        """
        batch = self.aggregator.flush()
        monitoring, real = batch.partition(self._is_monitoring)
        sending = []
        if self.rate_window.add(real.total):
            sending += self._page(self.rate_window.total)
            self.rate_window.reset()
        for kind, part in (("digest", real), ("monitoring", monitoring)):
            if part:
                sending += self._send_digest(self._routes[kind], part)
        return sending

    def _send_digest(self, route: Route, batch: Batch) -> list:
        subject, body = self.renderer.render(batch)
        return self._send(route, subject, body, batch.total)

    def _page(self, total: int) -> list:
        _log.warn("Error rate exceeded: {total} errors in the last {flushes} "
                  "flushes (PAGER_LIMIT = {limit})", total=total,
                  flushes=self.rate_window.size, limit=self.rate_window.limit)
        subject, body = pager_alert(self.settings.SERVER_NAME, total,
                                    self.rate_window.size,
                                    self.settings.FLUSH_SECONDS)
        return self._send(self._routes["pager"], subject, body, total)

    def _send(self, route: Route, subject: str, body: str,
              count: int) -> list:
        if not route.recipients:
            _log.warn("Not sending the {kind} message about {count} errors: "
                      "{setting} is not set", kind=route.kind, count=count,
                      setting=route.setting)
            return []
        message = build_message(
            sender=route.sender,
            recipients=route.recipients,
            subject=subject,
            body=body,
            date=self._reactor.seconds(),
            domain=self.settings.SERVER_NAME,
            reply_to=route.reply_to,
            kind=route.kind,
        )
        return [self.outbox.send(message)]
