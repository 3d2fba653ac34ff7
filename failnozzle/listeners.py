"""
The ports errors arrive on: UDP_BIND and GELF_BIND (datagrams),
SMTP_INGEST_BIND (mail), and HTTP_BIND (status, metrics and control).

Sockets are bound before the reactor runs, so a port in use, or an address
not on this machine, stops start-up with one line naming the setting (and a
port below 1024 can be bound before twistd sheds privileges); the service
adopts them when it starts.  A reload binds the addresses that changed
first, and moves to them only if all could be bound.
"""
from __future__ import annotations

import socket
from typing import Iterable, Mapping, Optional

from twisted.internet import defer
from twisted.logger import Logger

from failnozzle.config import ConfigError, Settings
from failnozzle.ingest import bind_udp_socket, set_receive_buffer
from failnozzle.mailin import bind_tcp_socket

_log = Logger()

#: The settings naming an address to listen on, in the order they start.
LISTENING = ("UDP_BIND", "GELF_BIND", "SMTP_INGEST_BIND", "HTTP_BIND")
#: Those of them that take datagrams.
DATAGRAM = ("UDP_BIND", "GELF_BIND")


def bind_listening(settings: Settings,
                   names: Iterable[str] = LISTENING) -> dict:
    """
    Bind the sockets of the settings C{names} that are set.

    @return: setting name to bound socket.
    @raise ConfigError: one cannot be bound (none is left open then).
    """
    sockets: dict = {}
    try:
        for name in names:
            address = getattr(settings, name)
            if address is not None:
                sockets[name] = _bind(settings, name, *address)
    except BaseException:
        close_all(sockets)
        raise
    return sockets


def _bind(settings: Settings, name: str, host: str,
          port: int) -> socket.socket:
    try:
        if name in DATAGRAM:
            return bind_udp_socket(host, port, settings.UDP_RCVBUF)[0]
        return bind_tcp_socket(host, port)
    except OSError as error:
        raise ConfigError(f"{name}: cannot listen on {host}:{port}: "
                          f"{error.strerror}") from None


def close_all(sockets: Mapping[str, socket.socket]) -> None:
    for sock in sockets.values():
        sock.close()


def overlaps(old: Optional[tuple], new: Optional[tuple]) -> bool:
    """
    Whether a socket bound to C{new} conflicts with one still bound to
    C{old}: the same port, on the same host or on all of them.
    """
    if old is None or new is None or old[1] != new[1] or old[1] == 0:
        return False
    wildcards = ("0.0.0.0", "::")
    return old[0] == new[0] or old[0] in wildcards or new[0] in wildcards


class Listeners:
    """
    The listening ports of a running service, by setting name, each with
    the protocol (or factory) that reads what arrives on it.
    """

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self.ports: dict = {}
        self._protocols: dict = {}

    def adopt(self, name: str, sock: socket.socket, protocol,
              max_packet_size: int) -> None:
        """
        Listen on the bound C{sock} for the setting C{name}, reading with
        C{protocol}; the socket is closed, the port keeps its own copy.
        """
        if name in DATAGRAM:
            port = self._reactor.adoptDatagramPort(
                sock.fileno(), sock.family, protocol,
                maxPacketSize=max_packet_size)
        else:
            port = self._reactor.adoptStreamPort(sock.fileno(), sock.family,
                                                 protocol)
        sock.close()
        self.ports[name] = port
        self._protocols[name] = protocol

    def get(self, name: str):
        """The port of the setting C{name}, or None."""
        return self.ports.get(name)

    def address(self, name: str) -> Optional[tuple]:
        """The (host, port) the port of C{name} is bound to, or None."""
        port = self.ports.get(name)
        if port is None:
            return None
        bound = port.getHost()
        # Not an IP address: a memory reactor's port, in tests.
        host = getattr(bound, "host", None)
        return None if host is None else (host, bound.port)

    def stop(self, names: Iterable[str]) -> defer.Deferred:
        """
        Stop listening on the ports of C{names}, datagram ports after
        reading what the kernel still holds for them.

        @return: a Deferred firing once all are closed, failing with the
            first failure if one could not be.
        """
        closing = []
        for name in list(names):
            port = self.ports.pop(name, None)
            if port is None:
                continue
            protocol = self._protocols.pop(name)
            if name in DATAGRAM and protocol.transport is not None:
                protocol.read_pending()
            closing.append(defer.maybeDeferred(port.stopListening))
        return defer.gatherResults(closing, consumeErrors=True).addErrback(
            lambda failure: failure.value.subFailure)

    def set_receive_buffer(self, rcvbuf: Optional[int]) -> None:
        """A reload's new UDP_RCVBUF, on the datagram ports in place."""
        if rcvbuf is None:
            return
        for name in DATAGRAM:
            port = self.ports.get(name)
            if port is not None:
                set_receive_buffer(port.getHandle(), rcvbuf)
