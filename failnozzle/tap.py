"""
The twistd side: command-line options and L{makeService}.

  twistd -n failnozzle --config=site.py
  twistd failnozzle --config=site.py --check
"""
from __future__ import annotations

import resource
import socket
from functools import partial
from typing import Callable, NoReturn, Optional

from twisted.application.service import IService
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python import usage

from failnozzle.check import print_version, report_check
from failnozzle.clock import SteadyClock, steady_reactor
from failnozzle.collector import freeze_heap
from failnozzle.config import (ConfigError, Settings, load_settings,
                               parse_host_port)
from failnozzle.listeners import LISTENING, bind_listening, close_all
from failnozzle.service import FailnozzleService
from failnozzle.steps import in_slices
from failnozzle.web import MAX_CONNECTIONS as MAX_HTTP_CONNECTIONS
from failnozzle.writer import DiskWriter

_log = Logger()


class Options(usage.Options):
    """
    C{twistd failnozzle} options.  Anything given here overrides the same
    setting in the config file.
    """

    synopsis = "[options]"
    longdesc = (
        "Receives application errors as JSON datagrams over UDP, folds "
        "identical ones together and sends one digest email every "
        "FLUSH_SECONDS, through SMTP_HOST or, when no SMTP server is "
        "configured, into MAILDIR.  Settings are read from --config, a "
        "Python file of UPPER_CASE assignments (the original failnozzle's "
        "format); README.rst lists every setting."
    )
    optFlags = [
        ["check", None,
         "Check the settings (the config file and these options) without "
         "starting: print every problem, one line each, and exit with 1, "
         "or say they are valid and exit with 0."],
    ]
    optParameters = [
        ["config", "c", None,
         "Config file: a Python module of UPPER_CASE settings."],
        ["udp", "u", None,
         "Receive errors on HOST:PORT, e.g. 127.0.0.1:1549 or [::1]:1549 "
         "(UDP_BIND)."],
        ["flush-seconds", "f", None,
         "Seconds between digests (FLUSH_SECONDS).", float],
        ["maildir", "m", None,
         "Write digests into this maildir when no SMTP server is "
         "configured (MAILDIR)."],
        ["smtp", "s", None,
         "Send digests through the SMTP server at HOST:PORT (SMTP_HOST, "
         "SMTP_PORT); REPORT_FROM and REPORT_TO must be set too."],
        ["smtp-ingest", None, None,
         "Receive errors by mail (SMTP) on HOST:PORT, e.g. "
         "127.0.0.1:2525 (SMTP_INGEST_BIND)."],
        ["http", None, None,
         "Serve the status page, metrics, health and control API on "
         "HOST:PORT (HTTP_BIND; default 127.0.0.1:1550), or 'off'."],
    ]

    def opt_version(self) -> NoReturn:
        """
        Print failnozzle's version and exit.
        """
        raise SystemExit(print_version())

    def postOptions(self) -> None:
        """
        Turn the options given into settings that override the file; with
        --check, check them and exit.
        """
        self.overrides = {}
        if self["udp"] is not None:
            self.overrides["UDP_BIND"] = _host_port("--udp", self["udp"])
        if self["flush-seconds"] is not None:
            self.overrides["FLUSH_SECONDS"] = self["flush-seconds"]
        if self["maildir"] is not None:
            self.overrides["MAILDIR"] = self["maildir"]
        if self["smtp"] is not None:
            host, port = _host_port("--smtp", self["smtp"], None)
            self.overrides.update(SMTP_HOST=host, SMTP_PORT=port)
        if self["smtp-ingest"] is not None:
            self.overrides["SMTP_INGEST_BIND"] = _host_port(
                "--smtp-ingest", self["smtp-ingest"])
        if self["http"] is not None:
            self.overrides["HTTP_BIND"] = (
                None if self["http"] == "off"
                else _host_port("--http", self["http"], "127.0.0.1"))
        if self["check"]:
            raise SystemExit(report_check(self["config"], self.overrides))


def _host_port(option: str, text: str,
               default_host: Optional[str] = "0.0.0.0") -> tuple:
    try:
        return parse_host_port(text, default_host)
    except ValueError as error:
        raise usage.UsageError(f"{option}: {error}") from None


#: Files open at once besides connections: sockets, the spool's, state and
#: maildir files being written, the threads' pipes.
FILES_BESIDES_CONNECTIONS = 128


def open_files_needed(settings: Settings) -> int:
    """How many files the daemon may hold open at once, its caps on
    connections reached."""
    return (FILES_BESIDES_CONNECTIONS
            + (MAX_HTTP_CONNECTIONS if settings.HTTP_BIND else 0)
            + (settings.SMTP_INGEST_MAX_CONNECTIONS
               if settings.SMTP_INGEST_BIND else 0))


def raise_open_files_limit(
        needed: int,
        getrlimit: Callable[[int], tuple] = resource.getrlimit,
        setrlimit: Callable[[int, tuple], None] = resource.setrlimit,
) -> Optional[str]:
    """
    Raise the soft limit on open files to C{needed} if the hard limit
    allows: systemd's soft default, 1,024, is less than the connections
    failnozzle accepts, and past it even a snapshot cannot be written.

    @return: what to say if the limit stays below C{needed}, else None.
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if wanted > soft:
        setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if wanted < needed:
        return (f"failnozzle may hold {needed:,} files open at once (its "
                f"HTTP and mail connections at their caps), but may open "
                f"only {wanted:,} (the hard limit on open files); past it "
                f"connections are refused and snapshots fail: raise it "
                f"(LimitNOFILE= in a systemd unit, ulimit -Hn)")
    return None


def _bind(settings: Settings, notices: list) -> dict:
    """
    Bind every address the settings name.  HTTP_BIND left at its default
    may be in use (a second failnozzle on the host, with a config written
    for the original, which had no HTTP port): that is a notice and no
    HTTP, not a reason not to start.  Any other address in use is.
    """
    default_http = settings.HTTP_BIND == Settings.HTTP_BIND
    names = [name for name in LISTENING
             if not (default_http and name == "HTTP_BIND")]
    sockets = bind_listening(settings, names)
    if default_http:
        try:
            sockets.update(bind_listening(settings, ["HTTP_BIND"]))
        except ConfigError as error:
            notices.append(f"{error}; no status page, metrics or control "
                           f"(set HTTP_BIND, or --http, to another port)")
    return sockets


def _in_thread_pool(reactor, function, *args) -> Deferred:
    """Run C{function} in the reactor's thread pool (made when first used)."""
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(),
                                     function, *args)


def makeService(options: Options, reactor=None) -> IService:
    """
    Build the daemon from its options.  A wrong setting, or an address
    that cannot be listened on, stops start-up with one line naming the
    setting (SystemExit), never a traceback.
    """
    # A reactor given by a test: its own time, and the test's heap.
    wall_offset, freeze = (lambda: 0.0), (lambda: None)
    own_process = reactor is None
    if own_process:
        from twisted.internet import reactor
        wall_offset = steady_reactor(reactor, SteadyClock())
        freeze = freeze_heap
    load = partial(load_settings, options["config"], options.overrides)
    try:
        settings, notices = load()
        sockets = _bind(settings, notices)
        try:
            service = FailnozzleService(
                settings, reactor, sockets["UDP_BIND"],
                writer=DiskWriter(reactor),
                in_thread=partial(_in_thread_pool, reactor),
                in_steps=in_slices(reactor),
                gelf_socket=sockets.get("GELF_BIND"),
                smtp_socket=sockets.get("SMTP_INGEST_BIND"),
                http_socket=sockets.get("HTTP_BIND"),
                wall_offset=wall_offset, reload_settings=load,
                freeze_heap=freeze)
        except BaseException:
            close_all(sockets)
            raise
    except ConfigError as error:
        raise SystemExit(f"failnozzle: {error}") from None
    if own_process:
        too_few = raise_open_files_limit(open_files_needed(settings))
        if too_few is not None:
            _log.warn("{too_few}", too_few=too_few)
    for notice in notices:
        _log.warn("Config: {notice}", notice=notice)
    _log.info("UDP receive buffer: asked for {asked} bytes, the kernel "
              "reports {granted} (UDP_RCVBUF; the kernel caps it at "
              "net.core.rmem_max unless run as root)",
              asked=settings.UDP_RCVBUF,
              granted=sockets["UDP_BIND"].getsockopt(socket.SOL_SOCKET,
                                                     socket.SO_RCVBUF))
    return service
