"""
The twistd side: command-line options and L{makeService}.

  twistd -n failnozzle --config=site.py
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from failnozzle.config import ConfigError, load_settings, parse_host_port
from failnozzle.ingest import bind_udp_socket
from failnozzle.mailin import bind_tcp_socket
from failnozzle.service import FailnozzleService
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
    ]

    def postOptions(self) -> None:
        """Turn the options given into settings that override the file."""
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


def _host_port(option: str, text: str,
               default_host: Optional[str] = "0.0.0.0") -> tuple:
    try:
        return parse_host_port(text, default_host)
    except ValueError as error:
        raise usage.UsageError(f"{option}: {error}") from None


def _bind(settings, setting: str, bind: Callable[[str, int], object]):
    """
    @return: what C{bind(host, port)} returns for the address C{setting}
        holds: the socket bound there.
    @raise ConfigError: it cannot be bound.
    """
    host, port = getattr(settings, setting)
    try:
        return bind(host, port)
    except OSError as error:
        raise ConfigError(f"{setting}: cannot listen on {host}:{port}: "
                          f"{error.strerror}") from None


def makeService(options: Options, reactor=None) -> IService:
    """
    Build the daemon from its options.  A wrong setting, or an address
    that cannot be listened on, stops start-up with one line naming the
    setting (SystemExit), never a traceback.
    """
    if reactor is None:
        from twisted.internet import reactor
    try:
        settings, notices = load_settings(options["config"], options.overrides)
        sockets = {}
        bind_udp = partial(bind_udp_socket,
                           receive_buffer=settings.UDP_RCVBUF)
        try:
            for setting in ("UDP_BIND", "GELF_BIND"):
                if getattr(settings, setting) is not None:
                    sockets[setting], granted = _bind(settings, setting,
                                                      bind_udp)
            if settings.SMTP_INGEST_BIND is not None:
                sockets["SMTP_INGEST_BIND"] = _bind(
                    settings, "SMTP_INGEST_BIND", bind_tcp_socket)
            service = FailnozzleService(
                settings, reactor, sockets["UDP_BIND"],
                writer=DiskWriter(reactor),
                gelf_socket=sockets.get("GELF_BIND"),
                smtp_socket=sockets.get("SMTP_INGEST_BIND"))
        except BaseException:
            for sock in sockets.values():
                sock.close()
            raise
    except ConfigError as error:
        raise SystemExit(f"failnozzle: {error}") from None
    for notice in notices:
        _log.warn("Config: {notice}", notice=notice)
    _log.info("UDP receive buffer: asked for {asked} bytes, the kernel "
              "reports {granted} (UDP_RCVBUF; the kernel caps it at "
              "net.core.rmem_max unless run as root)",
              asked=settings.UDP_RCVBUF, granted=granted)
    return service
