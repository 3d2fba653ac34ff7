"""
The running daemon: wires receiver, aggregator, renderer and outbox to the
reactor, runs the flush loop, decides who gets what (routing, the pager, and
holding errors while a digest is undelivered), snapshots what is counted,
and on a clean stop flushes into the spool and delivers what it can.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Callable, Optional

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from failnozzle.aggregate import Aggregator, Batch, Entry, RateWindow
from failnozzle.config import Settings
from failnozzle.digest import DigestRenderer, build_message, pager_alert
from failnozzle.gelf import GELFDecoder, GELFRecordReader
from failnozzle.ingest import (BadDatagram, ErrorReceiver,
                               internal_error_key_maker)
from failnozzle.mailin import MailIngest, tls_options
from failnozzle.outbox import MaildirTransport, Outbox, SMTPTransport
from failnozzle.spool import Spool
from failnozzle.state import State, StateFile

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
    @ivar ports: all listening ports, UDP_BIND's first, then GELF_BIND's.
    @ivar mail: the SMTP server (SMTP_INGEST_BIND), or None.
    @ivar smtp_port: its listening port, once started.
    """

    def __init__(self, settings: Settings, reactor,
                 udp_socket: socket.socket,
                 transport: Optional[object] = None,
                 in_thread: Optional[Callable[..., defer.Deferred]] = None,
                 gelf_socket: Optional[socket.socket] = None,
                 smtp_socket: Optional[socket.socket] = None) -> None:
        """
        @param udp_socket: the bound socket errors arrive on (see
            L{failnozzle.ingest.bind_udp_socket}); the service adopts it
            when it starts.
        @param transport: where mail goes; by default the one the settings
            describe.
        @param in_thread: runs blocking file writes (snapshots) off the
            reactor, such as C{threads.deferToThread}; by default they run
            on it.
        @param gelf_socket: a second bound socket (GELF_BIND), read the
            same way: both take GELF and failnozzle's JSON.
        @param smtp_socket: a bound, listening TCP socket (SMTP_INGEST_BIND,
            see L{failnozzle.mailin.bind_tcp_socket}) to receive errors by
            mail on.
        @raise ConfigError: SMTP_INGEST_TLS_CERT or _KEY is unusable.
        """
        self.settings = settings
        self._reactor = reactor
        self.udp_port = None
        self._gelf = GELFDecoder(reactor,
                                 source_field=settings.SOURCE_FIELD_NAME,
                                 default_kind=settings.GELF_DEFAULT_KIND,
                                 on_incomplete=self._gelf_incomplete)
        reader = GELFRecordReader(settings.unique_fields,
                                  settings.SOURCE_FIELD_NAME,
                                  settings.INCOMING_MESSAGE_MAX_SIZE,
                                  self._gelf, settings.MAX_FIELD_CHARS,
                                  settings.MAX_EXC_TEXT_CHARS)
        self.aggregator = Aggregator(
            settings.MAX_UNIQUE_MESSAGES, reactor,
            internal_error_key_maker(reader, settings.INTERNAL_ERROR_FUNC),
            settings.MAX_SOURCES_PER_ERROR)
        self.receiver = ErrorReceiver(reader, self.aggregator, reactor)
        self._listeners = [(udp_socket, self.receiver)]
        if gelf_socket is not None:
            self._listeners.append(
                (gelf_socket, ErrorReceiver(reader, self.aggregator, reactor)))
        self.ports: list = []
        self._smtp_socket = smtp_socket
        self.smtp_port = None
        self.mail = None
        if smtp_socket is not None:
            self.mail = self._mail_ingest(reader)
        self.rate_window = RateWindow(settings.PAGER_WINDOW_SIZE,
                                      settings.PAGER_LIMIT)
        self.renderer = DigestRenderer(
            settings.UNIQUE_MSG_TUPLE,
            settings.SERVER_NAME,
            settings.MAX_UNIQUE_MESSAGES,
            settings.EMAIL_TEMPLATE_DIR,
            settings.EMAIL_SUBJECT_TEMPLATE,
            settings.EMAIL_BODY_TEMPLATE,
            settings.DIGEST_MAX_DETAILS or 100,
        )
        self.outbox = Outbox(
            transport or make_transport(settings, reactor),
            Spool(settings.SPOOL_DIR, reactor), reactor,
            settings.RETRY_MIN_SECONDS, settings.RETRY_MAX_SECONDS,
            settings.SPOOL_LIFETIME_SECONDS)
        self.state_file = (StateFile(settings.STATE_FILE, reactor,
                                     in_thread or defer.maybeDeferred)
                           if settings.SNAPSHOT_SECONDS else None)
        self._state_unwritable = False
        #: Who waits for the snapshot that has not begun yet, if one is
        #: queued (see L{saved_soon}).
        self._next_snapshot: Optional[list] = None
        #: Per digest kind, the errors waiting for that kind's last digest
        #: to be delivered, so an outage gives one digest, not one a flush.
        self._held: dict = {}
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
        self._snapshot_loop = LoopingCall(self._scheduled_snapshot)
        self._snapshot_loop.clock = reactor

    def _mail_ingest(self, reader) -> MailIngest:
        settings = self.settings
        tls = (tls_options(settings.SMTP_INGEST_TLS_CERT,
                           settings.SMTP_INGEST_TLS_KEY)
               if settings.SMTP_INGEST_TLS_CERT else None)
        return MailIngest(
            reader, self.aggregator, self.receiver.report_bad_input,
            self.saved_soon, self._reactor,
            domain=settings.SERVER_NAME,
            source_field=settings.SOURCE_FIELD_NAME,
            max_bytes=settings.SMTP_INGEST_MAX_BYTES,
            max_connections=settings.SMTP_INGEST_MAX_CONNECTIONS,
            max_recipients=settings.SMTP_INGEST_MAX_RECIPIENTS,
            users=settings.SMTP_INGEST_USERS, tls=tls)

    def startService(self) -> None:
        super().startService()
        transport = self.outbox.transport
        if isinstance(transport, MaildirTransport):
            _prepare(transport, "MAILDIR", "digests cannot be written")
        _prepare(self.outbox.spool, "SPOOL_DIR",
                 "messages wait in memory only")
        if self.state_file is not None:
            self._restore_state()
            # Also finds out now, not at the first flush, if it cannot be
            # written.
            self.save_state()
        for sock, receiver in self._listeners:
            self.ports.append(self._reactor.adoptDatagramPort(
                sock.fileno(), sock.family, receiver,
                maxPacketSize=self.settings.INCOMING_MESSAGE_MAX_SIZE + 1))
            sock.close()
        self.udp_port = self.ports[0]
        address = self.udp_port.getHost()
        _log.info(
            "failnozzle listening for errors on UDP {host}:{port}; a digest "
            "every {seconds:g} s to {transport}",
            host=address.host, port=address.port,
            seconds=self.settings.FLUSH_SECONDS,
            transport=transport.describe(),
        )
        for port in self.ports[1:]:
            address = port.getHost()
            _log.info("failnozzle listening for GELF on UDP {host}:{port}",
                      host=address.host, port=address.port)
        if self.mail is not None:
            sock = self._smtp_socket
            self.smtp_port = self._reactor.adoptStreamPort(
                sock.fileno(), sock.family, self.mail)
            sock.close()
            address = self.smtp_port.getHost()
            _log.info("failnozzle listening for mail on SMTP {host}:{port}",
                      host=address.host, port=address.port)
        self.outbox.recover()
        self._flush_loop.start(self.settings.FLUSH_SECONDS, now=False)
        if self.state_file is not None:
            self._snapshot_loop.start(self.settings.SNAPSHOT_SECONDS,
                                      now=False)

    def stopService(self) -> defer.Deferred:
        """
        Stop reading, flush what is buffered into the spool, and try to
        deliver for up to SHUTDOWN_TIMEOUT_SECONDS; what is not delivered
        by then stays in the spool for the next start.  Mail clients get
        their 250 for what was counted before, and 421 (try again later)
        for what arrives once the stop began.
        """
        super().stopService()
        for loop in (self._flush_loop, self._snapshot_loop):
            if loop.running:
                loop.stop()
        for _, receiver in self._listeners:
            if receiver.transport is not None:
                receiver.read_pending()
        self._gelf.stop()
        listening = list(self.ports)
        if self.mail is not None:
            self.mail.stop_accepting()
            listening.append(self.smtp_port)
        _log.info("failnozzle stopping: flushing the buffer and delivering "
                  "for up to {seconds:g} s",
                  seconds=self.settings.SHUTDOWN_TIMEOUT_SECONDS)
        stopped = defer.gatherResults([defer.maybeDeferred(port.stopListening)
                                       for port in listening])
        stopped.addCallback(lambda _: self.flush(final=True))
        stopped.addCallback(lambda _: self.outbox.stop(
            self.settings.SHUTDOWN_TIMEOUT_SECONDS))
        stopped.addCallback(lambda _: self.save_state())
        if self.mail is not None:
            stopped.addCallback(lambda _: self.mail.hang_up())
        stopped.addCallback(lambda _: _log.info("failnozzle stopped"))
        return stopped

    def _gelf_incomplete(self, error: BadDatagram, sender: tuple) -> None:
        # Chunked GELF messages whose chunks never all came are bad input.
        self.receiver.report_bad_input(error, sender)

    def _restore_state(self) -> None:
        """Count in again what the last run had counted but not sent."""
        state = self.state_file.load()
        if state is None:
            return
        self.aggregator.restore(state.buffer)
        self._held = {kind: batch for kind, batch in state.held.items()
                      if kind in ("digest", "monitoring")}
        self.rate_window.counts = state.rate_window[-self.rate_window.size:]
        _log.info("Restored {total} errors from {path}",
                  total=state.buffer.total + sum(
                      batch.total for batch in self._held.values()),
                  path=self.state_file.path)

    def save_state(self) -> defer.Deferred:
        """
        Snapshot what is counted now.  A failure is logged once until
        writing works again, and never stops the daemon.

        @return: a Deferred firing when the snapshot is written or failed.
        """
        if self.state_file is None:
            return defer.succeed(None)
        return self.state_file.save(self._current_state).addCallbacks(
            self._state_saved, self._state_not_saved)

    def saved_soon(self) -> defer.Deferred:
        """
        A snapshot of everything counted until now, for a sender told "got
        it" only once a crash can no longer lose it: mail is answered 250
        then.  Callers share the snapshot that has not begun yet, so a
        burst of mail costs one more snapshot, not one each.

        @return: a Deferred firing once that snapshot is written, or failed
            to be (that is logged, and the count is still in memory); at
            once without snapshots.
        """
        if self.state_file is None:
            return defer.succeed(None)
        waiting = defer.Deferred()
        if self._next_snapshot is not None:
            self._next_snapshot.append(waiting)
            return waiting
        waiters = self._next_snapshot = [waiting]

        def saved(_: object) -> None:
            for waiter in waiters:
                waiter.callback(None)

        self.save_state().addCallback(saved)
        return waiting

    def _current_state(self) -> State:
        # From now on a snapshot begun later is needed to hold new counts.
        self._next_snapshot = None
        # Views of what changed since the last snapshot, not copies:
        # StateFile reads them at once and keeps the rest from before.
        self.aggregator.changed = False
        buffer, whole = self.aggregator.changes(self.state_file.needs_whole)
        return State(buffer, dict(self._held), list(self.rate_window.counts),
                     changes_only=not whole,
                     bad_input=self.aggregator.bad_input())

    def _state_saved(self, _: object) -> None:
        if self._state_unwritable:
            _log.info("STATE_FILE {path} is written again",
                      path=self.state_file.path)
            self._state_unwritable = False

    def _state_not_saved(self, failure: Failure) -> None:
        self.aggregator.changed = True
        if not self._state_unwritable:
            error = failure.value
            _log.error("Cannot write STATE_FILE {path}: {reason}; a crash "
                       "now would lose what is buffered",
                       path=self.state_file.path,
                       reason=getattr(error, "strerror", None) or error)
        self._state_unwritable = True

    def _scheduled_snapshot(self) -> None:
        if self.aggregator.changed and not self.state_file.busy:
            self.save_state()

    def _scheduled_flush(self) -> None:
        # Never let an exception out: it would stop the LoopingCall for good.
        # Nor a Deferred: the next flush must not wait for the mail.
        try:
            self.flush()
        except Exception:
            _log.failure("Flush failed; the next one is in {seconds:g} s",
                         seconds=self.settings.FLUSH_SECONDS)

    def flush(self, final: bool = False) -> list:
        """
        Flush the buffer: check the error rate, then send each recipient
        class its digest, unless its last digest is still undelivered: then
        the errors are held for the next one.

        @param final: send everything, held or not (on a clean stop).
        @return: the outcomes (see L{Outbox.send}) of the messages sent.
        """
        batch = self.aggregator.flush()
        monitoring, real = batch.partition(self._is_monitoring)
        sending = []
        if self.rate_window.add(real.total):
            sending += self._page(self.rate_window.total)
            self.rate_window.reset()
        undelivered = set() if final else self.outbox.waiting_kinds()
        for kind, part in (("digest", real), ("monitoring", monitoring)):
            held = self._held.pop(kind, None)
            pending = (held.merge(part, self.settings.MAX_UNIQUE_MESSAGES,
                                  self.settings.MAX_SOURCES_PER_ERROR)
                       if held else part)
            if not pending:
                continue
            if kind in undelivered:
                self._held[kind] = pending
                _log.info("Holding {total} errors for the next {kind}: the "
                          "last one is not delivered yet",
                          total=pending.total, kind=kind)
            else:
                sending += self._send_digest(self._routes[kind], pending)
        self.save_state()
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


def _prepare(directory, setting: str, consequence: str) -> None:
    """Create a directory the service writes to, or say loudly why not."""
    try:
        directory.prepare()
    except OSError as error:
        _log.error("{setting} {path} cannot be created: {reason}; "
                   "{consequence} until it can", setting=setting,
                   path=directory.path, reason=error.strerror,
                   consequence=consequence)
