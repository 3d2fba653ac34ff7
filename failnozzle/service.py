"""
The running daemon: wires receiver, aggregator, renderer and outbox to the
reactor as child services, decides who gets what (routing, the pager, and
holding errors while a digest is undelivered), snapshots what is counted,
and on a clean stop flushes into the spool and delivers what it can.
"""
from __future__ import annotations

import heapq
import signal
import socket
from collections import Counter
import dataclasses
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from typing import TYPE_CHECKING, Callable, Optional

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import _ISupportsExitSignalCapturing
from twisted.logger import Logger
from twisted.python.failure import Failure

from failnozzle.aggregate import Aggregator, Batch, Entry
from failnozzle.collector import collector_held
from failnozzle.config import (DEFAULT_FIELDS, UNUSED_SETTINGS, ConfigError,
                               Settings, changed_settings)
from failnozzle.counts import Counts
from failnozzle.digest import (DigestRenderer, Notice, Silenced,
                               build_message, canary_message, headline_of,
                               pager_message)
from failnozzle.fingerprint import CustomFingerprint, Grouping
from failnozzle.gelf import GELFDecoder, GELFRecordReader
from failnozzle.ingest import (BadDatagram, ErrorReceiver,
                               internal_error_key_maker)
from failnozzle.listeners import (DATAGRAM, LISTENING, Listeners,
                                  bind_listening, overlaps)
from failnozzle.mailin import MailIngest, tls_options
from failnozzle.outbox import Outbox, message_bytes
from failnozzle.pager import (MISSED, NAMED, RESOLVED, CanaryWatch, Culprit,
                              Page, Pager)
from failnozzle.policy import (NEW, NewsRules, Telling, remembering,
                               seen_key, status_of, telling)
from failnozzle.routing import route
from failnozzle.seen import SeenFile, SeenMemory
from failnozzle.silences import Silences
from failnozzle.spool import Spool
from failnozzle.state import State, StateFile
from failnozzle.steps import Steps, run_at_once
from failnozzle.timer import Timer
from failnozzle.transport import MaildirTransport, SMTPTransport
from failnozzle.web import make_site
from failnozzle.writer import InlineWriter, Writer

if TYPE_CHECKING:
    from failnozzle.cluster import ClusterNode, Merged

_log = Logger()

#: What a snapshot calls a cluster's push that waits for Redis: no digest
#: kind, so its errors are routed as any others at the next start.
_WAITING_PUSH = "cluster push"

#: The settings a cluster node takes at start only.
_CLUSTER_SETTINGS = {"CLUSTER_URL", "CLUSTER_NAME", "CLUSTER_LEASE_SECONDS",
                     "CLUSTER_GRACE_SECONDS"}

#: What status and metrics call the datagrams of each port.
_INPUT_NAMES = {"UDP_BIND": "udp", "GELF_BIND": "gelf"}


@dataclass(frozen=True)
class Route:
    """Who one class of message goes to, and the settings that say so."""

    kind: str
    setting: str
    recipients: tuple
    sender: str
    reply_to: tuple


def make_transport(settings: Settings, reactor,
                   writer: Optional[Writer] = None):
    """
    The SMTP transport if an SMTP server is configured, else the maildir
    (written with C{writer}).
    """
    if not settings.smtp_enabled:
        return MaildirTransport(settings.MAILDIR, reactor, writer)
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


def make_renderer(settings: Settings) -> DigestRenderer:
    """
    The digest renderer the settings describe.

    @raise ConfigError: a template cannot be found or does not compile.
    """
    return DigestRenderer(
        settings.UNIQUE_MSG_TUPLE,
        settings.SERVER_NAME,
        settings.MAX_UNIQUE_MESSAGES,
        settings.EMAIL_TEMPLATE_DIR,
        settings.EMAIL_SUBJECT_TEMPLATE,
        settings.EMAIL_BODY_TEMPLATE,
        settings.DIGEST_MAX_DETAILS,
        settings.MAX_SOURCES_PER_ERROR,
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
        # Loops rather than any() over a generator: a flush asks this of
        # every error.
        key = entry.key
        for position in self._positions:
            text = key[position]
            if text is None:
                continue
            text = text if type(text) is str else str(text)
            for marker in self._markers:
                if marker in text:
                    return True
        return False


@dataclass
class _Configured:
    """
    What the service makes of its settings, besides what it counts: made
    whole before any of it is used, so a reload whose settings cannot be
    used (a template that does not compile, a certificate that cannot be
    read) changes nothing.
    """

    reader: GELFRecordReader
    internal_error_key: Callable[[int, Exception], tuple]
    grouping: Grouping
    renderer: DigestRenderer
    transport: object
    mail_tls: Optional[object]
    is_monitoring: MonitoringFilter
    routes: dict


class FailnozzleService(MultiService):
    """
    The whole daemon as one twistd service.  The parts that start and stop
    are its children (the disk writer, the listeners, the outbox, and the
    flush, snapshot and cluster-tick timers), started and stopped in the
    order L{startService} and L{stopService} list.

    @ivar udp_port: the listening port of UDP_BIND, once started.
    @ivar ports: the datagram ports, UDP_BIND's first, then GELF_BIND's.
    @ivar mail: the SMTP server (SMTP_INGEST_BIND), or None.
    @ivar smtp_port: its listening port, once started.
    """

    def __init__(self, settings: Settings, reactor,
                 udp_socket: socket.socket,
                 transport: Optional[object] = None,
                 in_thread: Optional[Callable[..., defer.Deferred]] = None,
                 in_steps: Callable[[Steps], defer.Deferred] = run_at_once,
                 gelf_socket: Optional[socket.socket] = None,
                 smtp_socket: Optional[socket.socket] = None,
                 http_socket: Optional[socket.socket] = None,
                 wall_offset: Callable[[], float] = lambda: 0.0,
                 reload_settings: Optional[Callable[[], tuple]] = None,
                 writer: Optional[Service] = None,
                 freeze_heap: Callable[[], None] = lambda: None) -> None:
        """
        @param udp_socket: the bound socket errors arrive on (see
            L{failnozzle.listeners.bind_listening}); the service adopts it
            when it starts.
        @param transport: where mail goes; by default the one the settings
            describe.
        @param in_thread: runs the reading of mail, and of large Sentry
            envelopes, off the reactor, such as in the reactor's thread
            pool; by default it runs on it.
        @param in_steps: runs the making of digests, written as steps
            (see L{failnozzle.steps}), such as a slice at a time on the
            reactor; by default at once.
        @param gelf_socket: a second bound socket (GELF_BIND), read the
            same way: both take GELF and failnozzle's JSON.
        @param smtp_socket: a bound, listening TCP socket (SMTP_INGEST_BIND)
            to receive errors by mail on.
        @param http_socket: one (HTTP_BIND) to serve status, metrics,
            health and control on.
        @param wall_offset: how far the wall clock is ahead of the
            reactor's time (see L{failnozzle.clock}); what people read is
            dated in wall-clock time.
        @param reload_settings: gives C{(settings, notices)} read anew
            from the config file, or raises ConfigError: what L{reload}
            (SIGHUP) takes; None: the service cannot reload.
        @param writer: runs the disk writes (spool, maildir, snapshots): a
            child service that is also a L{failnozzle.writer.Writer}, such
            as a L{failnozzle.writer.DiskWriter}; by default they run at
            once, on the reactor.
        @param freeze_heap: called once start-up, and then each reload, has
            made what lasts, to put it out of the garbage collector's sight
            (L{failnozzle.collector.freeze_heap}); by default nothing is done.
        @raise ConfigError: a setting cannot be used (a template, a
            certificate).
        """
        super().__init__()
        self.settings = settings
        self._reactor = reactor
        self._wall_offset = wall_offset
        self._reload_settings = reload_settings
        self._freeze_heap = freeze_heap
        self._given_transport = transport
        self.writer = writer or InlineWriter()
        #: Runs blocking reading (mail, large envelopes) off the reactor.
        self.in_thread = in_thread or defer.maybeDeferred
        self._in_steps = in_steps
        self.listeners = Listeners(
            reactor, {name: sock for name, sock in (
                ("UDP_BIND", udp_socket), ("GELF_BIND", gelf_socket),
                ("SMTP_INGEST_BIND", smtp_socket),
                ("HTTP_BIND", http_socket)) if sock is not None},
            self._protocol_for,
            lambda: self.settings.INCOMING_MESSAGE_MAX_SIZE + 1)
        #: What it has done since it started, for status and metrics.
        self.counts = Counts(reactor.seconds())
        self._gelf = GELFDecoder(reactor,
                                 on_incomplete=self.report_bad_input)
        self.outbox: Optional[Outbox] = None
        configured = self._configure(settings, set())
        self.aggregator = Aggregator(
            settings.MAX_UNIQUE_MESSAGES, reactor,
            configured.internal_error_key, settings.MAX_SOURCES_PER_ERROR,
            configured.grouping, on_first=self._first_error)
        #: The flush GROUP_WAIT_SECONDS after the first error of a storm,
        #: if one is due, and when the last flush that had errors was.
        self._group_wait: Optional[object] = None
        self._last_busy_flush: Optional[float] = None
        #: The protocol of each datagram port, by setting: one each, made
        #: anew when a reload moves the port.
        self._receivers = {"UDP_BIND": ErrorReceiver(
            configured.reader, self.aggregator, reactor, self.counts,
            _INPUT_NAMES["UDP_BIND"])}
        self.mail: Optional[MailIngest] = None
        self.pager = Pager(settings.PAGER_WINDOW_SIZE, settings.PAGER_LIMIT,
                           settings.PAGER_REPEAT_SECONDS)
        self.canary = CanaryWatch(settings.CANARY_MAX_SILENCE_SECONDS)
        #: By route, the pagers of those that say 'page'.
        self._route_pagers: dict = {}
        self.silences = Silences(None, self.writer.run, _log)
        #: By digest class, the instances silences kept out of its
        #: digests since the last one, by silence.
        self._silenced_for: dict = {}
        self.outbox = Outbox(configured.transport,
                             Spool(settings.SPOOL_DIR, reactor), reactor,
                             writer=self.writer, counts=self.counts)
        #: This node's part in a cluster (CLUSTER_URL), if in one.
        self.cluster: Optional[ClusterNode] = None
        if settings.CLUSTER_URL is not None:
            # Imported only for a cluster: redis-py is 6.6 MB of the
            # daemon's memory.
            from failnozzle.cluster import make_node
            self.cluster = make_node(settings, reactor, wall_offset)
            self.outbox.mirror = self.silences.shared = self.cluster
        self._cluster_timer = Timer(self._cluster_seconds(),
                                    self._cluster_tick, reactor,
                                    at_start=True)
        #: The cluster's push and lease renewal, its flush, and the taking
        #: over of what the last leader left, while under way.
        self._ticking = False
        self._cluster_flushing: Optional[defer.Deferred] = None
        self._taking_over: Optional[defer.Deferred] = None
        #: The cluster's push waiting for Redis that the last snapshot
        #: holds (see L{_unsettled_batches}).
        self._saved_waiting = Batch()
        #: The lease token for which what the last leader left was taken:
        #: a leader flushes only once it has taken it.
        self._taken_over_for: Optional[str] = None
        self.state_file: Optional[StateFile] = None
        #: Every error reported, and where it is kept between runs (beside
        #: the state file; none without snapshots).
        self.seen = SeenMemory(settings.SEEN_MAX)
        self._seen_file: Optional[SeenFile] = None
        self._seen_unwritable = False
        #: The digest kinds whose errors wait for news (see L{_say_quiet}).
        self._quiet: set = set()
        self._snapshots: Optional[StateFile] = None
        self._state_unwritable = False
        #: Who waits for the snapshot that has not begun yet to be written,
        #: and who for it to be durable, if one is queued (see
        #: L{saved_soon}).
        self._next_snapshot: Optional[tuple] = None
        #: Per digest kind, the errors waiting for that kind's last digest
        #: to be delivered, so an outage gives one digest, not one a flush.
        self._held: dict = {}
        #: The batches of digests not yet safe (see L{_keep_until_safe}).
        self._unsettled: dict = {}
        #: Per kind, how many digests are being made (L{_send_digest}).
        self._making: dict = {}
        self._flush_timer = Timer(settings.FLUSH_SECONDS,
                                  self._scheduled_flush, reactor)
        self._snapshot_timer = Timer(settings.SNAPSHOT_SECONDS,
                                     self._scheduled_snapshot, reactor)
        self._previous_sighup = None
        #: Whether a SIGHUP's reload waits for the reactor's turn.
        self._reload_asked = False
        self._apply(settings, configured, set(), None)
        #: The HTTP site of HTTP_BIND: status, metrics, control.
        self.web = make_site(self)
        for name, child in [
                ("writer", self.writer), ("listeners", self.listeners),
                ("outbox", self.outbox), ("flush", self._flush_timer),
                ("snapshot", self._snapshot_timer),
                ("cluster", self._cluster_timer)]:
            child.setName(name)
            self.addService(child)

    @property
    def ports(self) -> list:
        return [port for port in map(self.listeners.get, DATAGRAM)
                if port is not None]

    @property
    def receiver(self) -> ErrorReceiver:
        """The protocol of UDP_BIND's port."""
        return self._receivers["UDP_BIND"]

    @property
    def udp_port(self):
        return self.listeners.get("UDP_BIND")

    @property
    def smtp_port(self):
        return self.listeners.get("SMTP_INGEST_BIND")

    def listening(self) -> dict:
        """Setting name to the (host, port) it listens on, for those set."""
        return {name: address for name, address in (
            (name, self.listeners.address(name)) for name in LISTENING)
            if address is not None}

    def datagram_sockets(self) -> list:
        """The sockets of the datagram ports, for the kernel's counts."""
        return [port.socket for port in self.ports
                if getattr(port, "socket", None) is not None]

    @property
    def can_reload(self) -> bool:
        """Whether L{reload} can read the config again."""
        return self._reload_settings is not None

    @property
    def reactor(self):
        return self._reactor

    @property
    def reader(self):
        """What reads records (JSON, GELF) into reports: a reload's."""
        return self._reader

    def report_bad_input(self, error: BadDatagram, sender: tuple) -> None:
        """Count and log bad input of any kind, as the receiver does its
        own."""
        self.receiver.report_bad_input(error, sender)

    def reactor_seconds(self) -> float:
        return self._reactor.seconds()

    def wall_time(self, seconds: float) -> float:
        """The wall-clock time of the reactor's time C{seconds}."""
        return seconds + self._wall_offset()

    @property
    def held(self) -> dict:
        """Per digest kind, the errors waiting for the next digest."""
        return dict(self._held)

    @property
    def next_flush(self) -> Optional[float]:
        """When the next flush is due (reactor time), if one is."""
        calls = [self._flush_timer.due]
        if self._group_wait is not None and self._group_wait.active():
            calls.append(self._group_wait.getTime())
        return min((call for call in calls if call is not None),
                   default=None)

    def _configure(self, settings: Settings, changed: set) -> _Configured:
        """
        Make what the settings describe (C{changed}: the names a reload
        changed; empty at start, when everything is made).

        @raise ConfigError: a setting cannot be used.
        """
        custom = settings.FINGERPRINT_FUNC
        reader = GELFRecordReader(
            settings.unique_fields, settings.SOURCE_FIELD_NAME,
            settings.INCOMING_MESSAGE_MAX_SIZE, self._gelf,
            settings.MAX_FIELD_CHARS, settings.MAX_EXC_TEXT_CHARS,
            None if custom is None else CustomFingerprint(custom),
            settings.MIN_LEVEL, settings.GELF_MIN_LEVEL)
        transport = self._given_transport
        if transport is None:
            # Made anew each time: a reload reads SMTP_CA_FILE again.
            transport = make_transport(settings, self._reactor, self.writer)
            if self.outbox is not None and hasattr(transport, "keep_mode_of"):
                transport.keep_mode_of(self.outbox.transport)
        mail_tls = None
        if settings.SMTP_INGEST_BIND and settings.SMTP_INGEST_TLS_CERT:
            mail_tls = tls_options(settings.SMTP_INGEST_TLS_CERT,
                                   settings.SMTP_INGEST_TLS_KEY)
        return _Configured(
            reader=reader,
            internal_error_key=internal_error_key_maker(
                reader, settings.INTERNAL_ERROR_FUNC),
            grouping=Grouping(settings.unique_fields,
                              exact=settings.GROUPING == "exact",
                              rules=settings.GROUPING_RULES),
            renderer=make_renderer(settings),
            transport=transport,
            mail_tls=mail_tls,
            is_monitoring=MonitoringFilter(
                settings.unique_fields, settings.MONITORING_ERROR_MARKERS),
            routes={
                "digest": Route("digest", "REPORT_TO", settings.REPORT_TO,
                                settings.REPORT_FROM, settings.REPLY_TO),
                "monitoring": Route(
                    "monitoring", "JUST_MONITORING_REPORT_TO",
                    settings.JUST_MONITORING_REPORT_TO,
                    settings.REPORT_FROM, settings.REPLY_TO),
                "pager": Route("pager", "PAGER_TO", settings.PAGER_TO,
                               settings.PAGER_FROM or settings.REPORT_FROM,
                               settings.PAGER_REPLY_TO),
                "canary": Route("canary", "PAGER_TO", settings.PAGER_TO,
                                settings.PAGER_FROM or settings.REPORT_FROM,
                                settings.PAGER_REPLY_TO),
                **{rule.kind: Route(
                    rule.kind, f"ROUTES rule {rule.name!r}", rule.to,
                    rule.sender or settings.REPORT_FROM,
                    rule.reply_to or settings.REPLY_TO)
                   for rule in settings.ROUTES},
                # The pages of routes that say 'page': to their 'to'.
                **{_page_kind(rule.kind): Route(
                    _page_kind(rule.kind), f"ROUTES rule {rule.name!r}",
                    rule.to, settings.PAGER_FROM or rule.sender
                    or settings.REPORT_FROM,
                    rule.reply_to or settings.PAGER_REPLY_TO)
                   for rule in settings.ROUTES if rule.page},
            })

    def _apply(self, settings: Settings, configured: _Configured,
               changed: set, previous: Optional[Settings]) -> None:
        """
        Take what L{_configure} made, keeping everything counted, held or
        waiting: re-keyed if the fields of a key changed, and cut to the
        caps (MAX_FIELD_CHARS, MAX_EXC_TEXT_CHARS) if they were lowered.
        """
        self.settings = settings
        self._reader = configured.reader
        self._grouping = configured.grouping
        self._news_rules = NewsRules.of(settings)
        #: What each route's digests are told by: its own repeat_seconds.
        self._route_rules = {
            rule.kind: dataclasses.replace(
                self._news_rules, repeat_after=rule.repeat_seconds)
            for rule in settings.ROUTES if rule.repeat_seconds is not None}
        self.seen.resize(settings.SEEN_MAX)
        if "UNIQUE_MSG_TUPLE" in changed or previous is None:
            self._fields_checked = False
        self.renderer = configured.renderer
        self._is_monitoring = configured.is_monitoring
        self._routes = configured.routes
        self.silences.configure(settings.SILENCES,
                                f"{settings.STATE_FILE}.silences")
        self._gelf.configure(settings.SOURCE_FIELD_NAME,
                             settings.GELF_DEFAULT_KIND)
        for receiver in self._receivers.values():
            receiver.reader = configured.reader
        rekey = configured.reader.rekeying(previous
                                           and previous.unique_fields)
        grouping = configured.grouping
        # Fingerprints are made anew only if their rules or the keys'
        # shape changed: one made from a key alone misses the logging
        # format it came with.
        regroup = bool(changed & {"GROUPING", "GROUPING_RULES",
                                  "UNIQUE_MSG_TUPLE", "MAX_FIELD_CHARS",
                                  "MAX_EXC_TEXT_CHARS"})
        self.aggregator.configure(settings.MAX_UNIQUE_MESSAGES,
                                  settings.MAX_SOURCES_PER_ERROR,
                                  configured.internal_error_key, rekey,
                                  grouping, regroup)
        self._held = {kind: batch.rekeyed(rekey, grouping, regroup)
                      for kind, batch in self._held.items()}
        self._unsettled = {
            token: (kind, batch.rekeyed(rekey, grouping, regroup))
            for token, (kind, batch) in self._unsettled.items()}
        if "ROUTES" in changed:
            # Once re-keyed: rules read the keys of now.
            self._reroute_held()
        self.canary.max_silence = settings.CANARY_MAX_SILENCE_SECONDS
        # A route's pager outlives a reload that keeps the route.
        self._route_pagers = {
            rule.kind: self._route_pagers.get(rule.kind) or Pager(1, 1, 0)
            for rule in settings.ROUTES if rule.page}
        for pager in [self.pager, *self._route_pagers.values()]:
            pager.configure(settings.PAGER_WINDOW_SIZE, settings.PAGER_LIMIT,
                            settings.PAGER_REPEAT_SECONDS)
        self.outbox.configure(configured.transport,
                              settings.RETRY_MIN_SECONDS,
                              settings.RETRY_MAX_SECONDS,
                              settings.SPOOL_LIFETIME_SECONDS,
                              settings.DIGEST_MAX_BYTES,
                              settings.SHUTDOWN_TIMEOUT_SECONDS)
        if previous is not None:
            self._prepare_directories(changed)
        if self.cluster is not None:
            self.cluster.configure(settings.unique_fields,
                                   settings.MAX_UNIQUE_MESSAGES,
                                   settings.MAX_SOURCES_PER_ERROR)
        self._configure_mail(settings, configured)
        self._configure_snapshots(settings, changed)

    def _prepare_directories(self, changed: set) -> None:
        """What start-up does for the directories a reload changed."""
        transport = self.outbox.transport
        if isinstance(transport, MaildirTransport):
            _prepare(transport, "MAILDIR", "digests cannot be written")
        if "SPOOL_DIR" in changed:
            self.outbox.spool = Spool(self.settings.SPOOL_DIR, self._reactor)
            _prepare(self.outbox.spool, "SPOOL_DIR",
                     "messages wait in memory only")
            self.outbox.recover()

    def _configure_snapshots(self, settings: Settings, changed: set) -> None:
        """
        One L{StateFile} for the life of the service, so its keys files'
        generations only grow; a reload that changes where or how keys are
        saved makes the next snapshot whole, in a new keys file.
        """
        if not settings.SNAPSHOT_SECONDS:
            if self.state_file is not None:  # turned off by this reload
                self._retired(self.state_file.retire())
            self.state_file = self._seen_file = None
            return
        self._seen_file = SeenFile(f"{settings.STATE_FILE}.seen")
        if self._snapshots is None:
            self._snapshots = StateFile(settings.STATE_FILE, self._reactor,
                                        self.writer.run,
                                        settings.unique_fields,
                                        self._wall_offset)
        elif self.state_file is None or changed & {"STATE_FILE",
                                                   "UNIQUE_MSG_TUPLE"}:
            self._retired(self._snapshots.configure(settings.STATE_FILE,
                                                    settings.unique_fields))
            self._state_unwritable = False
        self.state_file = self._snapshots

    def _retired(self, removing: defer.Deferred) -> None:
        """Log, if it fails, the removal of a snapshot that a later start
        must not restore (this run delivers what it holds)."""
        def failed(failure: Failure) -> None:
            error = failure.value
            _log.error("Cannot remove the old STATE_FILE {path}: {reason}; "
                       "a start restoring it would send its errors again",
                       path=getattr(error, "filename", None),
                       reason=getattr(error, "strerror", None) or error)

        removing.addErrback(failed)

    def _configure_mail(self, settings: Settings,
                        configured: _Configured) -> None:
        if settings.SMTP_INGEST_BIND is None:
            return
        limits = dict(
            domain=settings.SERVER_NAME,
            source_field=settings.SOURCE_FIELD_NAME,
            max_bytes=settings.SMTP_INGEST_MAX_BYTES,
            max_connections=settings.SMTP_INGEST_MAX_CONNECTIONS,
            max_recipients=settings.SMTP_INGEST_MAX_RECIPIENTS,
            users=settings.SMTP_INGEST_USERS, tls=configured.mail_tls)
        if self.mail is None:
            self.mail = MailIngest(
                configured.reader, self.aggregator, self.report_bad_input,
                self.saved_soon, self._reactor, in_thread=self.in_thread,
                counts=self.counts, **limits)
        else:
            self.mail.configure(configured.reader, **limits)

    def privilegedStartService(self) -> None:
        """
        The first step of a start under twistd, in the daemon itself: until
        the reactor runs and takes SIGTERM and SIGINT over, they ask it to
        stop once it runs, so that a stop asked for while starting is a
        clean one, not a half-started process killed with its pidfile left
        behind (and the launcher of C{twistd --pidfile} waiting on it).
        """
        if not self._reactor.running:
            previous = {signum: signal.signal(signum, self._stop_once_running)
                        for signum in (signal.SIGTERM, signal.SIGINT)}
            self._reactor.addSystemEventTrigger(
                "before", "startup", self._hand_over_signals, previous)
        super().privilegedStartService()

    def _stop_once_running(self, signum: int, frame: object) -> None:
        # In a signal handler: the reactor does the work in its own turn.
        self._reactor.callFromThread(self._stop_reactor, signum)

    @staticmethod
    def _hand_over_signals(previous: dict) -> None:
        """Give SIGTERM and SIGINT back as they were, for the reactor to
        take over (it leaves SIGINT alone if it finds another handler)."""
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None
                          else handler)

    def _stop_reactor(self, signum: int) -> None:
        """Stop as Twisted does on the signal: twistd then ends the
        process by it."""
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            return  # a second signal: the stop has begun
        _log.info("Received {signal}, shutting down.",
                  signal=signal.Signals(signum).name)
        if _ISupportsExitSignalCapturing.providedBy(self._reactor):
            self._reactor._exitSignal = signum

    def startService(self) -> None:
        """
        Start the parts and the children, in this order; L{stopService}
        stops them in its own, which is not the reverse (signals are
        caught first and let go first, the buffer is flushed after the
        ports close and before the outbox stops).  A step that raises
        stops the start.
        """
        # Not MultiService's, which starts every child at once.
        Service.startService(self)
        for step in [
                self._catch_sighup,  # first: a SIGHUP must not end us now
                self.writer.startService,
                self._start_cluster,
                self._prepare_outputs,
                self._restore,
                self.listeners.startService,
                self._say_listening,
                self.outbox.startService,  # what the last run left
                self._start_timers,
                self._freeze_heap,  # last: what start-up made lasts
        ]:
            step()

    def _start_cluster(self) -> None:
        if self.cluster is not None:
            self.cluster.start()
            _log.info("Cluster node {node} of {name} on Redis: pushing "
                      "every {seconds:g} s", node=self.cluster.name,
                      name=self.settings.CLUSTER_NAME,
                      seconds=self._cluster_seconds())

    def _cluster_seconds(self) -> float:
        """How often a cluster node pushes and renews its lease."""
        return min(self.settings.SNAPSHOT_SECONDS or 1,
                   self.settings.CLUSTER_LEASE_SECONDS / 3)

    def _catch_sighup(self) -> None:
        if self._reload_settings is not None:
            self._previous_sighup = signal.signal(signal.SIGHUP,
                                                  self._sighup)

    def _prepare_outputs(self) -> None:
        transport = self.outbox.transport
        if isinstance(transport, MaildirTransport):
            _prepare(transport, "MAILDIR", "digests cannot be written")
        _prepare(self.outbox.spool, "SPOOL_DIR",
                 "messages wait in memory only")

    def _restore(self) -> None:
        """What the last run remembered and had counted, if kept."""
        self.silences.load()
        if self.state_file is not None:
            self.seen.restore(self._seen_file.read())
            self._restore_state()
            # Also finds out now, not at the first flush, if it cannot be
            # written.
            self.save_state()

    def _say_listening(self) -> None:
        address = self.udp_port.getHost()
        _log.info(
            "failnozzle listening for errors on UDP {host}:{port}; a digest "
            "every {seconds:g} s to {transport}",
            host=address.host, port=address.port,
            seconds=self.settings.FLUSH_SECONDS,
            transport=self.outbox.transport.describe(),
        )

    def _protocol_for(self, name: str):
        """What the port of the setting C{name} reads with: a datagram
        port's own receiver, made anew if its last port may still be
        closing with it."""
        if name == "HTTP_BIND":
            return self.web
        if name == "SMTP_INGEST_BIND":
            return self.mail
        receiver = self._receivers.get(name)
        if receiver is None or receiver.numPorts:
            receiver = self._receivers[name] = ErrorReceiver(
                self._reader, self.aggregator, self._reactor, self.counts,
                _INPUT_NAMES[name])
        return receiver

    def _start_timers(self) -> None:
        self._flush_timer.restart(self.settings.FLUSH_SECONDS)
        if self.cluster is not None:
            self._cluster_timer.restart(self._cluster_seconds(), now=True)
        if self.state_file is not None:
            self._snapshot_timer.restart(self.settings.SNAPSHOT_SECONDS)

    def _sighup(self, signum: int, frame: object) -> None:
        # In a signal handler: the reactor does the work in its own turn,
        # once for all the SIGHUPs until then (each reload blocks it a
        # while: a burst of them must not starve the rest).
        if not self._reload_asked:
            self._reload_asked = True
            self._reactor.callFromThread(self._asked_reload)

    def _asked_reload(self) -> None:
        self._reload_asked = False  # a SIGHUP from now on reads again
        self.reload()

    def reload(self) -> bool:
        """
        Read the config file again (SIGHUP) and take its settings, and the
        templates and certificate files again: what is counted, held or
        waiting is kept (re-keyed if UNIQUE_MSG_TUPLE changed), ports whose
        address changed are moved, timers whose period changed restart.  A
        config that cannot be used is reported in one line, and the running
        one kept.

        @return: whether the new settings were taken.
        """
        if not self.running:
            # A SIGHUP just before a stop: the stop has begun.
            return False
        try:
            settings, notices = self._reload_settings()
            changed = changed_settings(self.settings, settings)
            configured = self._configure(settings, changed)
            moved = [name for name in LISTENING if name in changed]
            # An address that overlaps the old one (127.0.0.1:1549 then
            # 0.0.0.0:1549) can only be bound once the old port is closed.
            swapped = [name for name in moved if overlaps(
                self.listeners.address(name), getattr(settings, name))]
            sockets = bind_listening(settings, [
                name for name in moved if name not in swapped])
        except ConfigError as error:
            _log.error("Not reloading the config: {error}; the running "
                       "settings are kept", error=error)
            return False
        for notice in notices:
            _log.warn("Config: {notice}", notice=notice)
        unused = changed & UNUSED_SETTINGS
        at_start = changed & _CLUSTER_SETTINGS
        if at_start:
            _log.warn("Reload: {names} take effect at the next start",
                      names=", ".join(sorted(at_start)))
        if unused:
            _log.warn("Reload: changing {names} has no effect, now or at "
                      "the next start: logging goes through twistd "
                      "(--logfile, --syslog)", names=", ".join(sorted(unused)))
        previous = self.settings
        try:
            self._apply(settings, configured, changed, previous)
            self.listeners.set_receive_buffer(
                settings.UDP_RCVBUF if "UDP_RCVBUF" in changed else None)
            self.listeners.stop(
                [name for name in moved if name not in swapped]).addErrback(
                    lambda failure: _log.failure(
                        "Reload: could not stop listening on an old address",
                        failure))
            self.listeners.listen(sockets)
            for name in swapped:
                self._move(name, previous)
        finally:
            self._restart_timers(changed)
        if self.state_file is not None:
            self.save_state()
        taken = sorted(changed - unused)
        _log.info("Reloaded the config: {names}; templates and certificate "
                  "files read again", names=", ".join(taken) + " changed"
                  if taken else "no setting changed")
        self._freeze_heap()
        return True

    def _move(self, name: str, previous: Settings) -> defer.Deferred:
        """
        Close the port of C{name}, then listen on its new address; if that
        cannot be bound, on the old one again (both said in the log).
        """
        def listen(_: object) -> None:
            for settings in (self.settings, previous):
                try:
                    self.listeners.listen(bind_listening(settings, [name]))
                except ConfigError as error:
                    _log.error("Reload: {error}", error=error)
                else:
                    return
            _log.error("Reload: not listening on {setting} any more",
                       setting=name)

        moving = self.listeners.stop([name])
        moving.addBoth(listen)
        return moving

    def _restart_timers(self, changed: set) -> None:
        """
        Restart the timers whose period a reload changed, and any that is
        not running: only they, or frequent reloads would put off every
        flush.
        """
        flush, snapshot = self._flush_timer, self._snapshot_timer
        if "FLUSH_SECONDS" in changed or not flush.running:
            flush.restart(self.settings.FLUSH_SECONDS)
        if self.state_file is None:
            if snapshot.running:
                snapshot.stopService()
        elif "SNAPSHOT_SECONDS" in changed or not snapshot.running:
            snapshot.restart(self.settings.SNAPSHOT_SECONDS)
        cluster = self._cluster_timer
        if cluster.running and cluster.step != self._cluster_seconds():
            cluster.restart(self._cluster_seconds())

    def stopService(self) -> defer.Deferred:
        """
        Stop reading, flush what is buffered into the spool, and try to
        deliver for up to SHUTDOWN_TIMEOUT_SECONDS; what is not delivered
        by then stays in the spool for the next start, and errors held
        behind an undelivered digest stay in the snapshot.  Mail clients
        get their 250 for what was counted before, and 421 (try again
        later) for what arrives once the stop began.  Every step is taken
        even if one before it failed: that one is logged.
        """
        # Not MultiService's, which stops every child at once.
        Service.stopService(self)
        _log.info("failnozzle stopping: flushing the buffer and delivering "
                  "for up to {seconds:g} s",
                  seconds=self.settings.SHUTDOWN_TIMEOUT_SECONDS)
        return _each_step([
            ("stop reloading", self._restore_sighup),
            ("stop the timers", self._stop_timers),
            ("refuse new mail", self._stop_accepting_mail),
            ("read what the kernel holds and stop listening",
             self.listeners.stopService),
            ("drop incomplete GELF messages", self._gelf.stop),
            ("flush", self._final_flush),
            ("make the last digests", self._handed_over),
            ("deliver", self.outbox.stopService),
            ("leave the cluster", self._leave_cluster),
            ("snapshot", self.save_state),
            ("hang up on mail clients", self._hang_up_mail),
            ("finish the disk writes", self.writer.stopService),
        ]).addCallback(lambda _: _log.info("failnozzle stopped"))

    def _stop_timers(self) -> None:
        for timer in (self._flush_timer, self._snapshot_timer,
                      self._cluster_timer):
            if timer.running:
                timer.stopService()
        if self._group_wait is not None:
            self._group_wait.cancel()
            self._group_wait = None

    def _first_error(self) -> None:
        """
        The first error since the last flush: if the FLUSH_SECONDS before
        were quiet, its digest goes out GROUP_WAIT_SECONDS from now (long
        enough to fold a burst), unless the next flush comes sooner; the
        flushes then go on every FLUSH_SECONDS from that one.
        """
        wait, period = (self.settings.GROUP_WAIT_SECONDS,
                        self.settings.FLUSH_SECONDS)
        now = self._reactor.seconds()
        next_flush = self._flush_timer.due
        if (not wait or self._group_wait is not None or next_flush is None
                or (self._last_busy_flush is not None
                    and now - self._last_busy_flush < period)
                or next_flush <= now + wait):
            return
        self._group_wait = self._reactor.callLater(wait, self._flush_now)

    def _flush_now(self) -> None:
        """The flush of L{_first_error}: the flush timer begins anew."""
        self._group_wait = None
        if self._flush_timer.running:
            self._flush_timer.restart(self.settings.FLUSH_SECONDS, now=True)

    def _stop_accepting_mail(self) -> None:
        if self.mail is not None:
            self.mail.stop_accepting()

    def _restore_sighup(self) -> None:
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None

    def _hang_up_mail(self) -> Optional[defer.Deferred]:
        return self.mail.hang_up() if self.mail is not None else None

    def _restore_state(self) -> None:
        """
        Count in again what the last run had counted but not sent, cut to
        this run's caps (the snapshot has its keys read by field name).
        """
        state = self.state_file.load()
        if state is None:
            return
        recut = self._reader.rekeying(None)
        # Saved fingerprints are kept (made from the reports as they came,
        # with their logging formats); those missing are made.
        grouping = self._grouping
        self.aggregator.restore(state.buffer.rekeyed(recut, grouping,
                                                     anew=False))
        # Errors whose digest was not yet safe in the spool are reported
        # again: at least once; by the routes of this run.
        for kind in sorted(set(state.held) | set(state.unsettled)):
            for batch in (state.held.get(kind), state.unsettled.get(kind)):
                if batch:
                    self._hold(kind, batch.rekeyed(recut, grouping,
                                                   anew=False))
        self._reroute_held()
        self._restore_pagers(state)
        _log.info("Restored {total} errors from {path}",
                  total=state.buffer.total + sum(
                      batch.total for batch in self._held.values()),
                  path=self.state_file.path)

    def _restore_pagers(self, state: State) -> None:
        """Take where the pagers and the canary watch stood from C{state}."""
        now = self._reactor.seconds()
        self.pager.restore(state.rate_window, state.pager, now)
        self.canary.restore(state.canary, now)
        for kind, kept in (state.route_pagers or {}).items():
            if kind in self._route_pagers:
                self._route_pagers[kind].restore(kept["counts"],
                                                 kept["alert"], now)

    def _decided_by(self) -> dict:
        """What the flushes decide by, as a L{State} holds it: the held
        errors, the pagers and the canary watch."""
        return dict(held=dict(self._held), rate_window=self.pager.counts,
                    pager=self.pager.saved(), canary=self.canary.saved(),
                    route_pagers={
                        kind: {"counts": pager.counts,
                               "alert": pager.saved()}
                        for kind, pager in self._route_pagers.items()}
                    or None)

    def save_state(self, quick: bool = False) -> defer.Deferred:
        """
        Snapshot what is counted now, for those waiting for the next
        snapshot too (L{saved_soon}).  A failure is logged once until
        writing works again, and never stops the daemon.

        @param quick: in the file is enough (L{State.quick}), unless one of
            those waiting wants it durable.
        @return: a Deferred firing when the snapshot is written or failed.
        """
        taken: list = []

        def take() -> bool:
            """Take those waiting for the next snapshot; whether one of
            them wants it durable."""
            waiters, self._next_snapshot = self._next_snapshot, None
            if waiters is None:
                return False
            taken.extend(waiters[False] + waiters[True])
            return bool(waiters[True])

        def saved(_: object) -> None:
            for waiter in taken:
                waiter.callback(None)

        if self.state_file is None:
            # Turned off (by a reload) while they waited: nothing to wait for.
            take()
            saved(None)
            return defer.succeed(None)

        def current() -> State:
            durable = take()
            return self._current_state(quick and not durable)

        return self.state_file.save(current).addCallbacks(
            self._state_saved, self._state_not_saved).addCallback(saved)

    def saved_soon(self, durable: bool = True) -> defer.Deferred:
        """
        A snapshot of everything counted until now, for a sender told "got
        it" only once a crash can no longer lose it: mail is answered 250
        once a crash of the machine cannot (C{durable}: synced, as RFC 5321
        asks), Sentry and HTTP requests once a crash of the daemon cannot
        (in the file; synced by the next snapshot, within
        SNAPSHOT_SECONDS).  Callers share the snapshot that has not begun
        yet, so a burst of them costs one more snapshot, not one each:
        while one is written, everyone arriving waits for the next, and
        those not durable that arrive in one turn of the reactor (several
        connections' requests read at once) share one taken after it.

        @return: a Deferred firing once that snapshot is written, or failed
            to be (that is logged, and the count is still in memory); at
            once without snapshots.
        """
        if self.state_file is None:
            return defer.succeed(None)
        waiting = defer.Deferred()
        if self._next_snapshot is not None:
            self._next_snapshot[durable].append(waiting)
            return waiting
        waiters: tuple = ([], [])
        waiters[durable].append(waiting)
        self._next_snapshot = waiters
        if durable:
            self.save_state()
        else:
            self._reactor.callLater(0, self.save_state, quick=True)
        return waiting

    def _waiting_changed(self) -> bool:
        """Whether a cluster's push began or ended waiting for Redis since
        the last snapshot (which holds it: see L{_unsettled_batches})."""
        if self.cluster is None:
            return False
        waiting = self.cluster.waiting()
        return bool(waiting or self._saved_waiting) and (
            waiting is not self._saved_waiting)

    def _current_state(self, quick: bool) -> State:
        # A quick one leaves the next scheduled one to sync it.
        self.aggregator.changed = quick
        # Views of what changed since the last snapshot, not copies:
        # StateFile reads them at once and keeps the rest from before.
        buffer, whole = self.aggregator.changes(self.state_file.needs_whole)
        return State(buffer, changes_only=not whole, quick=quick,
                     bad_input=self.aggregator.bad_input(),
                     unsettled=self._unsettled_batches(),
                     **self._decided_by())

    def _state_saved(self, _: object) -> None:
        self.counts.last_snapshot = self._reactor.seconds()
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
        # As for the flush: an exception would stop the loop for good.
        try:
            if ((self.aggregator.changed or self._waiting_changed())
                    and not self.state_file.busy):
                self.save_state()
        except Exception:
            _log.failure("Snapshot failed; the next one is in {seconds:g} s",
                         seconds=self.settings.SNAPSHOT_SECONDS)

    def flush_now(self) -> list:
        """
        Flush now, as asked by control: in a cluster, the leader merges
        and flushes (its digests' outcomes are not waited for), a node
        alone flushes its own, the others push what they counted.

        @return: the outcomes of the messages sent, as far as known.
        """
        if self.cluster is None:
            return self.flush()
        if not (self.cluster.leader or self.cluster.alone):
            self.cluster.push(self._take_counted)
        return self._cluster_flush()

    def _scheduled_flush(self) -> None:
        # Never let an exception out: it would stop the timer for good.
        # Nor a Deferred: the next flush must not wait for the mail.
        try:
            if self.cluster is None:
                self.flush()
            else:
                self._cluster_flush()
        except Exception:
            _log.failure("Flush failed; the next one is in {seconds:g} s",
                         seconds=self.settings.FLUSH_SECONDS)

    def _cluster_tick(self) -> None:
        """
        Push what was counted since the last push, and renew the lease or
        take it; one at a time, so a Redis that does not answer is asked
        once a timeout, not once a tick.
        """
        if self._ticking:
            return
        cluster = self.cluster
        try:
            pushed = cluster.push(self._take_counted)
            leased = cluster.keep_lease()
        except Exception:
            _log.failure("Cluster push failed; the next one is in "
                         "{seconds:g} s", seconds=self._cluster_seconds())
            return
        if cluster.connected:
            cluster.retry_drops()
        leased.addCallback(self._lease_changed)
        leased.addErrback(self._cluster_call_failed,
                          "Cluster lease renewal failed")
        silenced = cluster.silences().addCallback(self.silences.take_shared)
        silenced.addErrback(self._cluster_call_failed,
                            "Could not take the cluster's silences")
        self._ticking = True

        def done(_: object) -> None:
            self._ticking = False

        defer.DeferredList([pushed, leased, silenced]).addCallback(done)

    def _cluster_call_failed(self, failure: Failure, what: str) -> None:
        if not self.cluster.unanswered(failure):
            _log.failure(what, failure)

    def _take_counted(self) -> State:
        """What was counted since the last push, for the cluster, with
        which of it is bad input."""
        if not self.aggregator:
            return State()
        bad_input = self.aggregator.bad_input()
        return State(self.aggregator.flush(), bad_input=bad_input)

    def _lease_changed(self, change: Optional[str]) -> None:
        cluster = self.cluster
        if change == cluster.TOOK:
            _log.info("Cluster node {node} holds the flush lease: the "
                      "digests go out from here", node=cluster.name)
        elif change == cluster.LOST:
            self._lost_lease()
        # Taken at the tick after one that failed, or after the flush
        # under way (which its commit, refused, leaves to this).
        if (cluster.token is not None
                and self._taken_over_for != cluster.token
                and self._taking_over is None
                and self._cluster_flushing is None):
            self._take_over()

    def _leads(self) -> bool:
        """Whether this node holds the lease and has taken what the last
        leader left: only then may it flush or commit the cluster's."""
        return (self.cluster.leader
                and self._taken_over_for == self.cluster.token)

    def _lost_lease(self) -> None:
        """Another node leads: what was held is its to send (in what this
        one committed, or in the pushes it did not commit)."""
        self.cluster.lost_lease()
        _log.warn("Cluster node {node} does not hold the flush lease any "
                  "more (held by {holder})", node=self.cluster.name,
                  holder=self.cluster.holder)
        self._held = {}

    def _take_over(self) -> defer.Deferred:
        """
        Take what the last leader decided by (held errors, the pagers, the
        canaries, the seen-memory), and the digests it had not delivered.
        """
        cluster = self.cluster
        token = cluster.token

        def take(shared: tuple) -> defer.Deferred:
            state, seen = shared
            self.seen.restore(seen)
            if state is not None:
                # Instead of what this node held (from its state file, or
                # from when it led before): the cluster's, as of now.
                self._held = {}
                for kind, batch in state.held.items():
                    self._hold(kind, batch)
                self._restore_pagers(state)
            return cluster.messages()

        def adopt(messages: dict) -> None:
            mine = self.outbox.waiting_ids()
            adopted = 0
            for message_id, data in messages.items():
                if message_id in mine:
                    continue
                try:
                    self.outbox.adopt(data)
                    adopted += 1
                except ValueError as error:
                    _log.error("Message {id} in Redis is no message to "
                               "send ({error}); dropped", id=message_id,
                               error=error)
                    cluster.drop_message(message_id)
            if adopted:
                _log.info("{count} message(s) the last leader had not "
                          "delivered will be sent from here", count=adopted)
            self._taken_over_for = token

        def failed(failure: Failure) -> None:
            if not cluster.unanswered(failure):
                _log.failure("Could not take over what the last leader "
                             "left; trying again in {seconds:g} s", failure,
                             seconds=self._cluster_seconds())

        def done(_: object) -> None:
            self._taking_over = None

        # Set before its callbacks run: they may run at once.
        self._taking_over = taking = cluster.shared()
        return taking.addCallback(take).addCallback(adopt).addErrback(
            failed).addBoth(done)

    def _cluster_flush(self) -> list:
        """
        The flush of a cluster node: the leader's merges every node's
        pushes and sends the digests; a node alone sends its own; the
        others send nothing.
        """
        cluster = self.cluster
        if self._cluster_flushing is not None or self._taking_over is not None:
            return []
        if cluster.alone:
            return self.flush(notice=self._alone_notice())
        if not (self._leads() and cluster.connected):
            # On time: the digest is the leader's (health reads this).
            self.counts.last_flush = self._reactor.seconds()
            if not cluster.leader:
                self._push_held()
            return []
        flushing = self._cluster_flushing = cluster.merge()
        flushing.addCallback(self._flush_merged)
        flushing.addErrback(self._cluster_flush_failed)

        def done(_: object) -> None:
            self._cluster_flushing = None

        flushing.addCallback(done)
        return []

    def _push_held(self) -> None:
        """
        Errors held here (while alone, or from the state file) go to the
        leader with the next push: a node that does not lead never sends
        them.  Held from when this node led, they are in what it committed
        too: sent twice rather than lost.
        """
        if self._held:
            for batch in self._held.values():
                self.aggregator.restore(batch)
            self._held = {}

    def _flush_merged(self, merged: Merged) -> defer.Deferred:
        """Flush what the cluster counted, then commit: the pushes merged
        are forgotten once its digests are in the outbox's hands."""
        self.aggregator.restore(merged.batch)
        try:
            self.flush(bad_input=merged.bad_input)
        except Exception:
            # What flush could not hand on it counts again: in the buffer.
            _log.failure("Flush failed; the next one is in {seconds:g} s",
                         seconds=self.settings.FLUSH_SECONDS)
        return self._handed_over().addCallback(
            lambda _: self._commit(merged.periods))

    def _commit(self, periods: list) -> defer.Deferred:
        return self.cluster.commit(periods, State(**self._decided_by()),
                                   self.seen.rows())

    def _cluster_flush_failed(self, failure: Failure) -> None:
        if self.cluster.refused_leader(failure):
            self._lost_lease()
        elif not self.cluster.unanswered(failure):
            # A Redis that does not answer is said once, when it stops.
            _log.failure("Cluster flush failed; the next one is in "
                         "{seconds:g} s", failure,
                         seconds=self.settings.FLUSH_SECONDS)

    def _alone_notice(self) -> Notice:
        cluster = self.cluster
        since = cluster.unreachable_since
        when = ("" if since is None else " since " + formatdate(
            self.wall_time(since), usegmt=True))
        return Notice(
            f"node {cluster.name} alone: Redis unreachable",
            f"This digest comes from cluster node {cluster.name} alone: "
            f"Redis has been unreachable{when}, so it holds only the errors "
            f"this node counted meanwhile.  The cluster's digests resume "
            f"once Redis answers again.")

    def _final_flush(self) -> object:
        """The flush of a clean stop; in a cluster, the hand-over."""
        if self.cluster is None:
            return self.flush(final=True)
        return self._hand_over()

    def _hand_over(self) -> defer.Deferred:
        """
        A cluster node's clean stop: what it counted goes to Redis and, if
        it leads, what it decides by; what Redis does not take is flushed
        here, as a single node would.
        """
        cluster = self.cluster
        cluster.stopping()
        before = defer.Deferred()
        (self._cluster_flushing or defer.succeed(None)).addBoth(
            lambda result: (before.callback(None), result)[1])

        def push(_: object) -> defer.Deferred:
            return cluster.push(self._take_counted)

        def rest(_: object) -> object:
            if cluster.unpushed or self.aggregator:
                self.aggregator.restore(cluster.take_unpushed())
                return self.flush(final=True, notice=self._alone_notice())
            if self._leads():
                return self._commit([]).addErrback(
                    self._cluster_flush_failed)
            return None

        # Twice: a push not taken yet goes first, then what is counted.
        return before.addCallback(push).addCallback(push).addCallback(rest)

    def _leave_cluster(self) -> Optional[defer.Deferred]:
        return self.cluster.stop() if self.cluster is not None else None

    def _silence(self, real: Batch) -> Batch:
        """
        C{real} without what a silence in force matches: counted for it
        and for the digest each error would have gone to, which says so in
        a line.
        """
        try:
            silenced, kept = self.silences.split(
                real.entries, self.settings.unique_fields,
                self.wall_time(self._reactor.seconds()))
        except Exception:
            # Mailed rather than never: a silence must not stop the flush.
            _log.failure("Could not apply the silences; this flush's "
                         "errors are all mailed")
            return real
        for silence, entries in silenced:
            for kind, part in _by_class(self._routed(Batch(tuple(entries)))):
                self._silenced_for.setdefault(kind, Counter())[
                    silence.id] += part.total
        return Batch(tuple(kept), real.overflow)

    def _routed(self, batch: Batch) -> tuple:
        """C{batch} split by ROUTES: C{(routed, rest)}, the batch of each
        route that got errors, and the rest, with the overflow."""
        routed, rest = route(batch.entries, self.settings.ROUTES,
                             self.settings.unique_fields)
        return ({kind: Batch(tuple(entries))
                 for kind, entries in routed.items()},
                Batch(tuple(rest), batch.overflow))

    def _reroute_held(self) -> None:
        """
        Route anew, by the ROUTES of now (a reload changed them, or a
        restart did), what is held for REPORT_TO and for routes there are
        no more; what a route still there holds stays with it (routed when
        counted, and one rule's copy of an error, 'continue', is not
        another's).
        """
        stale = [kind for kind in self._held
                 if kind == "digest" or kind not in self._routes]
        # All routed before any is let go: a rule that fails loses nothing.
        split = [self._routed(self._held[kind]) for kind in stale]
        for kind in stale:
            del self._held[kind]
        for parts in split:
            for kind, part in _by_class(parts):
                self._hold(kind, part)

    def _hold(self, kind: str, batch: Batch) -> None:
        """Keep C{batch} for the next digest of C{kind}, with what is held;
        for a route there is no more, for where the ROUTES of now send
        its errors."""
        if kind not in self._routes:
            for kind, part in _by_class(self._routed(batch)):
                self._hold(kind, part)
            return
        held = self._held.get(kind)
        self._held[kind] = batch if not held else held.merge(
            batch, self.settings.MAX_UNIQUE_MESSAGES,
            self.settings.MAX_SOURCES_PER_ERROR)

    def _check_fields(self, batch: Batch) -> None:
        """
        Warn, once, in one line, of the fields of UNIQUE_MSG_TUPLE beyond
        the default ones that none of the first errors flushed carries: a
        misspelt field is None for every error, which then tells nothing
        apart (custom fields stay legal; a sender that has no module or
        line number is no mistake).
        """
        if self._fields_checked or not batch.entries:
            return
        self._fields_checked = True
        fields = self.settings.unique_fields
        missing = {fields.index(name): name for name in fields
                   if name not in DEFAULT_FIELDS}
        for entry in batch.entries:
            if not missing:
                # Read no further: the first flush may hold 10,000 errors.
                break
            missing = {position: name for position, name in missing.items()
                       if entry.key[position] is None}
        if missing:
            _log.warn("UNIQUE_MSG_TUPLE names {fields}, which none of the "
                      "{count} errors received carries: misspelt?",
                      fields=", ".join(map(repr, missing.values())),
                      count=len(batch.entries))

    def _may_hold_across_restart(self) -> bool:
        """Whether held errors outlive this run: in a snapshot."""
        return self.state_file is not None and not self._state_unwritable

    @collector_held()
    def flush(self, final: bool = False, notice: Optional[Notice] = None,
              bad_input: tuple = ()) -> list:
        """
        Flush the buffer: check the error rate, then send each recipient
        class its digest, unless its last digest is still undelivered: then
        the errors are held for the next one.  Errors whose digest could
        not be made or handed over are held too: a failing flush loses
        nothing.

        @param final: this is the last flush of the run (a clean stop):
            errors are held only if the snapshot keeps them for the next
            run, which sends them once the undelivered digest is out, so an
            outage across a restart still gives two digests.
        @param notice: what each digest says first, if anything.
        @param bad_input: entries of the buffer that are bad input besides
            those counted here (the cluster's, for its leader).
        @return: the outcomes (see L{Outbox.send}) of the messages sent.
        """
        # Not errors to the pager: taken before the flush mixes them in.
        bad_input = self.aggregator.bad_input() + bad_input
        batch = self.aggregator.flush()
        if batch:
            self._last_busy_flush = self._reactor.seconds()
        self._check_fields(batch)
        # Nothing drained may be lost if a hook or a rule fails here.
        try:
            monitoring, real = batch.partition(self._is_monitoring)
            real = self._silence(real)
            routed, rest = self._routed(real)
        except Exception:
            self.aggregator.restore(batch)
            raise
        sending = []
        try:
            sending += self._page(self.pager, self._routes["pager"],
                                  real, bad_input)
            for kind, pager in self._route_pagers.items():
                sending += self._page(pager, self._routes[_page_kind(kind)],
                                      routed.get(kind, Batch()), bad_input)
        except Exception:
            _log.failure("Could not page about the error rate")
        try:
            sending += self._watch_canaries(monitoring)
        except Exception:
            _log.failure("Could not page about the canaries")
        undelivered = (self.outbox.waiting_kinds() | {
            kind for kind, making in self._making.items() if making}
            if not final or self._may_hold_across_restart() else set())
        #: Fired once the snapshot below, which holds the errors handed on,
        #: is written: only then are their digests made (making one holds
        #: Python's lock against the writer, and a crash meanwhile would
        #: lose them).
        written: list = []
        parts = {"digest": rest, "monitoring": monitoring, **{
            rule.kind: routed.get(rule.kind) for rule in self.settings.ROUTES}}
        for kind, part in parts.items():
            if part:
                self._hold(kind, part)
            pending = self._held.get(kind)
            if not pending:
                continue
            if kind in undelivered:
                _log.info("Holding {total} errors for the next {kind}: the "
                          "last one is not delivered yet",
                          total=pending.total, kind=kind)
                continue
            told = self._telling(kind, pending)
            if not told.worth_sending and (
                    not final or self._may_hold_across_restart()):
                self._say_quiet(kind, pending)
                continue
            self._quiet.discard(kind)
            # Handed on: a digest that cannot be made holds them again.
            del self._held[kind]
            sending += self._send_digest(self._routes[kind], told, written,
                                         notice)
        saved = self.save_state()
        for waiting in written:
            saved.addBoth(waiting.callback)
        # Only a flush that got this far is one: health says when not.
        self.counts.last_flush = self._reactor.seconds()
        return sending

    def _telling(self, kind: str, batch: Batch) -> Telling:
        """What the next digest of C{kind} would tell of C{batch} now."""
        wall_offset = self._wall_offset()
        return telling(batch, self.seen, wall_offset,
                       self._reactor.seconds() + wall_offset,
                       self._route_rules.get(kind, self._news_rules),
                       repeats=kind != "monitoring", scope=_scope(kind))

    def _say_quiet(self, kind: str, batch: Batch) -> None:
        """Log, once a quiet time, that errors wait for news."""
        if kind in self._quiet:
            return
        self._quiet.add(kind)
        _log.info("Nothing new, back or rising for the {kind}: its {total} "
                  "errors are counted for the next one (at the latest in "
                  "REPEAT_SECONDS = {repeat:g} s)", kind=kind,
                  total=batch.total,
                  repeat=self.settings.REPEAT_SECONDS)

    def _send_digest(self, route: Route, told: Telling, written: list,
                     notice: Optional[Notice] = None) -> list:
        """
        Make the digest of C{batch} (rendering and serializing it: tens of
        milliseconds for a large one) with C{in_steps}, then hand it to
        the outbox.  Its errors are in the snapshots until it is safe (see
        L{_keep_until_safe}), and held again if it cannot be made.

        @param written: takes a Deferred whose firing starts the making.

        @return: the digest's outcome, as L{flush} gives them.
        """
        batch = told.batch
        if not self._has_recipients(route, batch.total):
            return []
        kind = route.kind
        settled = self._keep_until_safe(kind, batch)
        #: Fires once the digest is in the outbox's hands, or not made.
        handed = defer.Deferred()
        remembered: list = []
        making = self._making.setdefault(kind, set())
        making.add(handed)

        def done_making() -> None:
            making.discard(handed)
            handed.callback(None)

        def hand_over(made: tuple) -> defer.Deferred:
            try:
                sending = self.outbox.send(*made)
            except Exception:
                return not_made(Failure())
            done_making()
            sending.spooled.addCallback(
                lambda spooled: settled(safe(spooled)) if spooled else spooled)
            return sending.outcome.addCallback(safe).addCallback(settled)

        def safe(result: bool) -> bool:
            # Spooled or delivered: its errors count as reported (one a
            # crash kept from the spool is reported again, as new).
            if result and not remembered:
                remembered.append(True)
                self._remember_reported(told)
            return result

        def not_made(failure: Failure) -> bool:
            _log.failure("Could not make the {kind} of {total} errors; "
                         "they are kept for the next one", failure,
                         kind=kind, total=batch.total)
            result = settled(False, hold=True)
            done_making()
            return result

        steps = defer.maybeDeferred(self._digest_steps, told, route, notice)
        made = defer.Deferred()
        written.append(made)
        made.addCallback(lambda _: steps).addCallback(self._in_steps)
        return [made.addCallbacks(hand_over, not_made)]

    def _handed_over(self) -> defer.DeferredList:
        """Fires once the digests being made are in the outbox's hands."""
        return defer.DeferredList([handed for making in self._making.values()
                                   for handed in making])

    def _digest_steps(self, told: Telling, route: Route,
                      notice: Optional[Notice]) -> Steps[tuple]:
        """
        The steps that make the digest C{told} for C{route}, and its
        bytes, with the renderer and settings of now: a reload before they
        run would bring keys of another shape.
        """
        return _with_bytes(self.renderer.making(
            told.batch, max_bytes=self.settings.DIGEST_MAX_BYTES,
            statuses=told.statuses, quiet=told.quiet,
            silenced=self._silenced_summary(route.kind), notice=notice,
            **self._envelope(route)))

    def _silenced_summary(self, kind: str) -> Optional[Silenced]:
        """What silences kept out of C{kind}'s digests since the last one:
        its line in this one."""
        counts = self._silenced_for.pop(kind, None)
        if not counts:
            return None
        comments = {silence.id: silence.comment
                    for silence in self.silences.all()}
        return Silenced(sum(counts.values()), len(counts), tuple(
            comments.get(silence_id) or silence_id for silence_id in counts))

    def _remember_reported(self, told: Telling) -> None:
        """
        Put the errors of a digest handed to the outbox in the
        seen-memory, in steps, and write it; a failure to is logged once
        until writing works again.
        """
        wall_offset = self._wall_offset()
        remembered = self._in_steps(remembering(
            self.seen, told, wall_offset,
            self._reactor.seconds() + wall_offset))
        remembered.addCallback(lambda _: self._write_seen())
        remembered.addCallback(lambda _: self._share_seen())
        remembered.addErrback(lambda failure: _log.failure(
            "Could not remember what a digest reported", failure))

    def _share_seen(self) -> None:
        """
        A cluster leader's seen-memory, once it remembers a digest, to
        Redis: the flush's commit came before, and the next leader must
        not take that digest's errors for new.
        """
        if self.cluster is not None and self._leads():
            self._commit([]).addErrback(self._cluster_flush_failed)

    def _write_seen(self) -> None:
        if self._seen_file is None:
            return
        writing = self.writer.run(self._seen_file.write, self.seen.rows())

        def written(_: object) -> None:
            self._seen_unwritable = False

        def failed(failure: Failure) -> None:
            if not self._seen_unwritable:
                self._seen_unwritable = True
                error = failure.value
                _log.error("Cannot write the seen-memory {path}: {error}; "
                           "after a restart every error is new again",
                           path=self._seen_file.path,
                           error=getattr(error, "strerror", None) or error)

        writing.addCallbacks(written, failed)

    def _keep_until_safe(self, kind: str,
                         batch: Batch) -> Callable[..., bool]:
        """
        Keep C{batch} in the snapshots until its digest is in the spool,
        or, if the spool cannot take it, until it is delivered or given up
        on: a crash before then reports those errors again rather than
        never.

        @return: what to call, once, when that is so; it hands on the
            result it is given, so the caller's outcome stays whole.  With
            C{hold}, the batch is held for the next digest, as it is then:
            a reload meanwhile may have re-keyed it.
        """
        token = object()
        self._unsettled[token] = (kind, batch)

        def settled(result: bool, hold: bool = False) -> bool:
            unsettled = self._unsettled.pop(token, None)
            if unsettled is not None:
                if hold:
                    self._hold(*unsettled)
                self.save_state()
            return result

        return settled

    def _unsettled_batches(self) -> dict:
        """The unsettled batches by kind, as a snapshot holds them, with
        a cluster's push that waits for Redis (routed at the next start),
        which is noted as the one the snapshot holds."""
        by_kind: dict = {}
        self._saved_waiting = (Batch() if self.cluster is None
                               else self.cluster.waiting())
        for kind, batch in [*self._unsettled.values(),
                            (_WAITING_PUSH, self._saved_waiting)]:
            if not batch:
                continue
            held = by_kind.get(kind)
            by_kind[kind] = batch if held is None else held.merge(
                batch, self.settings.MAX_UNIQUE_MESSAGES,
                self.settings.MAX_SOURCES_PER_ERROR)
        return by_kind

    def _rate_page(self, pager: Pager, real: Batch,
                   bad_input: tuple) -> Optional[Page]:
        """
        Hand C{pager} this flush's errors (bad input is not one): their
        count, the top ones, marked new as the digest would, and the hosts
        of those.
        """
        bad = {entry.identity for entry in bad_input}
        errors = [entry for entry in real.entries if entry.identity not in bad]
        # Bad input may have gone with the canaries (its record quotes the
        # datagram): only what is left here is left out.
        count = sum(entry.total for entry in errors) + real.overflow
        fields = self.settings.unique_fields
        wall_offset = self._wall_offset()
        culprits, hosts = {}, Counter()
        for entry in heapq.nlargest(4 * NAMED, errors,
                                    key=lambda entry: entry.total):
            hosts.update(entry.sources)
            if len(culprits) == NAMED:
                continue
            key = seen_key(entry)
            message = dict(zip(fields, entry.key))
            # New if no digest, REPORT_TO's or a route's, told of it.
            seen = next(filter(None, (self.seen.get(_scope(kind) + key)
                                      for kind in self._routes)), None)
            status = status_of(seen,
                               entry.first_seen + wall_offset, entry.total,
                               self._news_rules)
            culprits[key] = Culprit(headline_of(message), message.get("kind"),
                                    entry.total, status.kind == NEW)
        return pager.observe(self._reactor.seconds(), count, culprits, hosts)

    def _watch_canaries(self, monitoring: Batch) -> list:
        """Page when the canaries stop coming, and when they are back."""
        newest = max((entry.last_seen for entry in monitoring.entries),
                     default=None)
        what = self.canary.observe(self._reactor.seconds(), newest)
        if what is None:
            return []
        last = self.canary.last_seen + self._wall_offset()
        if what == MISSED:
            _log.warn("No canary since {since} (CANARY_MAX_SILENCE_SECONDS = "
                      "{limit:g}): the error pipeline may be broken",
                      since=last, limit=self.canary.max_silence)
        else:
            _log.info("Canaries are back")
        return self._send_page(self._routes["canary"], 0, *canary_message(
            self.settings.SERVER_NAME, what, last,
            self._reactor.seconds() + self._wall_offset(),
            self.canary.max_silence))

    def _page(self, pager: Pager, route: Route, real: Batch,
              bad_input: tuple) -> list:
        """Page C{route} about C{real}'s rate if C{pager} says to."""
        page = self._rate_page(pager, real, bad_input)
        if page is None:
            return []
        if page.what == RESOLVED:
            _log.info("Error rate back below PAGER_LIMIT = {limit} for a "
                      "whole window, {total} errors since it went over "
                      "({to})", limit=pager.limit, total=page.total,
                      to=route.setting)
        else:
            _log.warn("Error rate exceeded: {count} errors in the last "
                      "{flushes} flushes (PAGER_LIMIT = {limit}; "
                      "{to})", count=page.window_total,
                      flushes=pager.size, limit=pager.limit,
                      to=route.setting)
        return self._send_page(route, page.window_total, *pager_message(
            self.settings.SERVER_NAME, page, pager.size,
            self.settings.FLUSH_SECONDS, pager.limit, self._wall_offset()))

    def _send_page(self, route: Route, count: int, subject: str,
                   body: str) -> list:
        """Send a page; an outage holds one of its class, the latest, not
        one per reminder."""
        if not self._has_recipients(route, count):
            return []
        message = build_message(subject=subject, body=body,
                                **self._envelope(route))
        sending = (self.outbox.replace(route.kind, message)
                   if route.kind in self.outbox.waiting_kinds()
                   else self.outbox.send(message))
        return [sending.outcome]

    def _has_recipients(self, route: Route, count: int) -> bool:
        if not route.recipients:
            _log.warn("Not sending the {kind} message about {count} errors: "
                      "{setting} is not set", kind=route.kind, count=count,
                      setting=route.setting)
        return bool(route.recipients)

    def _envelope(self, route: Route) -> dict:
        """What a message of C{route} is addressed and dated with."""
        return dict(sender=route.sender, recipients=route.recipients,
                    date=self._reactor.seconds(),
                    wall_offset=self._wall_offset(),
                    domain=self.settings.SERVER_NAME,
                    reply_to=route.reply_to, kind=route.kind)


def _by_class(parts: tuple) -> list:
    """C{(kind, batch)} for each non-empty part of what
    L{FailnozzleService._routed} split: the routes', then REPORT_TO's."""
    routed, rest = parts
    return [(kind, part) for kind, part in [("digest", rest),
                                            *routed.items()] if part]


def _page_kind(kind: str) -> str:
    """The class of a route's pages: C{page:NAME} for C{route:NAME}."""
    return "page:" + kind.partition(":")[2]


def _scope(kind: str) -> str:
    """What the seen-memory's keys for C{kind}'s digests begin with: a
    route's team is told what is news to it (see L{Telling.scope})."""
    return f"{kind} " if kind.startswith("route:") else ""


def _with_bytes(making: Steps[EmailMessage]) -> Steps[tuple]:
    """The message that C{making} makes, and its bytes, in steps."""
    message = yield from making
    yield
    return message, message_bytes(message)


def _each_step(steps: list) -> defer.Deferred:
    """
    Take C{(description, step)} steps in turn, each once the one before it
    (and any Deferred it returned) is done, whether it worked or failed; a
    failure is logged with its description.
    """
    done = defer.succeed(None)
    for description, step in steps:
        done.addCallback(lambda _, step=step: step())
        done.addErrback(lambda failure, description=description: _log.failure(
            "Stopping: could not {step}", failure, step=description))
    return done


def _prepare(directory, setting: str, consequence: str) -> None:
    """Create a directory the service writes to, or say loudly why not."""
    try:
        directory.prepare()
    except OSError as error:
        _log.error("{setting} {path} cannot be created: {reason}; "
                   "{consequence} until it can", setting=setting,
                   path=directory.path, reason=error.strerror,
                   consequence=consequence)
