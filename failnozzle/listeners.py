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
from typing import Callable, Iterable, Mapping, Optional

from twisted.application.service import Service
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


#: How start-up and reloads say what listens where (UDP_BIND's own line
#: at start-up names the flush too).
_WHAT = {"UDP_BIND": "errors on UDP", "GELF_BIND": "GELF on UDP",
         "SMTP_INGEST_BIND": "mail on SMTP",
         "HTTP_BIND": "status and control on HTTP"}


class Listeners(Service):
    """
    The listening ports of a running service, by setting name, each with
    the protocol (or factory) that reads what arrives on it.  As a service
    it listens on the sockets it was given when it starts, and stops
    listening on all (reading what the kernel holds) when it stops.

    @ivar bound: the sockets given, by setting, until it starts.
    """

    def __init__(self, reactor, bound: Mapping[str, socket.socket],
                 protocol_for: Callable[[str], object],
                 max_packet_size: Callable[[], int]) -> None:
        """
        @param protocol_for: the protocol (or factory) a setting's port
            reads with, asked each time one is listened on.
        @param max_packet_size: the size of datagram taken whole.
        """
        self._reactor = reactor
        self.bound = dict(bound)
        self._protocol_for = protocol_for
        self._max_packet_size = max_packet_size
        self.ports: dict = {}
        self._protocols: dict = {}

    def startService(self) -> None:
        super().startService()
        bound, self.bound = self.bound, {}
        self.listen(bound, moved=False)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self.stop(LISTENING)

    def listen(self, sockets: Mapping[str, socket.socket],
               moved: bool = True) -> None:
        """
        Adopt the bound C{sockets}, by setting, and say where (UDP_BIND's
        only if C{moved} by a reload: start-up says it in a line naming
        the flush too).
        """
        for name in LISTENING:
            sock = sockets.get(name)
            if sock is None:
                continue
            self.adopt(name, sock, self._protocol_for(name),
                       self._max_packet_size())
            if moved or name != "UDP_BIND":
                address = self.ports[name].getHost()
                _log.info("failnozzle listening for {what} {host}:{port}",
                          what=_WHAT[name], host=address.host,
                          port=address.port)

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
