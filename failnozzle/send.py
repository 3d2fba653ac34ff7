"""
C{failnozzle-send}: report one error to failnozzle from a shell script or a
cron job, as one datagram of the same JSON the log handler sends::

    backup.sh 2>&1 | failnozzle-send --kind backup --exc-text - "backup failed"

It never imports Twisted (only the standard library, and failnozzle's own
config and loghandler, which use nothing else), so it starts quickly from
cron and needs no reactor.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import BinaryIO, Optional, Sequence

from failnozzle import __version__
from failnozzle.config import parse_host_port
from failnozzle.loghandler import MAX_DATAGRAM_BYTES, encode_datagram

PROG = "failnozzle-send"

#: Where errors go when neither --to nor FAILNOZZLE_ADDRESS says otherwise:
#: failnozzle's default UDP_BIND.
DEFAULT_ADDRESS = "127.0.0.1:1549"

#: The environment variable that replaces DEFAULT_ADDRESS, so a fleet's
#: scripts need not each name the failnozzle host.
ADDRESS_VARIABLE = "FAILNOZZLE_ADDRESS"

#: The kind of an error sent without --kind.
DEFAULT_KIND = "cli"

#: More than this many bytes of standard input can never fit in one
#: datagram: each byte becomes at least one byte of JSON.
STDIN_LIMIT = MAX_DATAGRAM_BYTES + 1


class SendError(Exception):
    """The error could not be sent; the message says why, in one line."""


def parse_address(text: str) -> tuple:
    """
    C{(host, port)} from C{HOST:PORT} or C{[IPV6]:PORT}, read as the
    daemon reads C{--udp}, but with a host required and port 0, which only
    a listener may name, refused.
    """
    try:
        host, port = parse_host_port(text, default_host=None)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(
            f"the port of {text!r} is not from 1 to 65535")
    return host, port


def parse_where(text: str) -> tuple:
    """
    C{(pathname, lineno)} from C{FILE:LINE}, or C{(pathname, None)} from a
    bare C{FILE}.
    """
    pathname, colon, line = text.rpartition(":")
    if colon and pathname and line.isascii() and line.isdigit():
        return _text(pathname), int(line)
    return _text(text), None


def _text(argument: str) -> str:
    """
    An argument as valid Unicode: bytes of the command line that are not
    UTF-8 reach Python as lone surrogates, which no email can carry, so
    they become U+FFFD here rather than break a digest.
    """
    return argument.encode("utf-8", "surrogateescape").decode(
        "utf-8", "replace")


def make_parser() -> argparse.ArgumentParser:
    """The command line; its help is the reference for cron users."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Send one error to failnozzle, as one UDP datagram.",
        epilog=f"The address is --to, else ${ADDRESS_VARIABLE}, else "
               f"{DEFAULT_ADDRESS}.  Exit status: 0 sent (UDP: not a proof "
               f"of delivery), 1 could not send, 2 usage error.")
    parser.add_argument("message", metavar="MESSAGE", type=_text,
                        help="one line saying what went wrong")
    parser.add_argument("--kind", type=_text, default=DEFAULT_KIND,
                        help="the job or service the error belongs to "
                             f"(default: {DEFAULT_KIND})")
    parser.add_argument("--source", type=_text, default=socket.gethostname(),
                        help="the host it happened on (default: this host's "
                             "name)")
    parser.add_argument("--exc-text", metavar="TEXT", type=_text,
                        help="the details, such as a traceback or a job's "
                             "output; - reads them from standard input")
    parser.add_argument("--where", metavar="FILE[:LINE]", type=parse_where,
                        help="the script (and line) the error comes from")
    parser.add_argument("--to", metavar="HOST:PORT", type=parse_address,
                        help="failnozzle's UDP address; [::1]:1549 for IPv6")
    parser.add_argument("--version", action="version",
                        version=f"{PROG} (failnozzle) {__version__}")
    return parser


def read_details(stream: BinaryIO) -> str:
    """
    The start of C{stream} as text, as much as one datagram could hold.
    The rest is read and dropped, so the command writing into the pipe
    runs to its end instead of dying of SIGPIPE.
    """
    head = stream.read(STDIN_LIMIT)
    while stream.read(65536):
        pass
    return head.decode("utf-8", "replace")


def read_stdin() -> str:
    """
    L{read_details} of standard input.

    @raise SendError: it is closed, or reading it fails.
    """
    if sys.stdin is None:
        raise SendError("cannot read standard input: it is closed")
    try:
        return read_details(sys.stdin.buffer)
    except OSError as error:
        raise SendError(f"cannot read standard input: {_reason(error)}")


def build_record(*, message: str, kind: str, source: str,
                 exc_text: Optional[str] = None,
                 where: Optional[tuple] = None) -> dict:
    """
    The fields the log handler would send, with the location taken from
    C{where} (pathname, lineno) as C{logging} derives it from a file.
    """
    pathname, lineno = where or (None, None)
    filename = os.path.basename(pathname) if pathname else None
    module = os.path.splitext(filename)[0] if filename else None
    return {
        "module": module,
        "funcName": None,
        "filename": filename,
        "pathname": pathname,
        "lineno": lineno,
        "message": message,
        "exc_text": exc_text,
        "kind": kind,
        "source": source,
    }


def _describe(host: str, port: int) -> str:
    """C{host:port} as it is written on the command line."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(error: Exception) -> str:
    """The words of an error without its errno, for a one-line message."""
    return getattr(error, "strerror", None) or str(error)


def send(data: bytes, host: str, port: int) -> None:
    """
    Send C{data} as one datagram to the first address of C{host} this
    machine can send to: a name with an IPv6 address on a machine without
    IPv6 falls back to its IPv4 one.

    @raise SendError: the name does not resolve, or no address takes it.
    """
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as error:
        # UnicodeError: a name IDNA refuses, such as one with an empty label.
        raise SendError(f"cannot resolve {host}: {_reason(error)}")
    for family, socktype, protocol, _, address in addresses:
        try:
            with socket.socket(family, socktype, protocol) as udp:
                udp.sendto(data, address)
            return
        except OSError as error:
            failure = error
    raise SendError(
        f"cannot send to {_describe(host, port)}: {_reason(failure)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    Run C{failnozzle-send}: 0 when the datagram was sent, 1 (with one line
    on standard error) when it could not be; a usage error exits with 2
    through argparse.
    """
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.to is None:
        configured = os.environ.get(ADDRESS_VARIABLE) or DEFAULT_ADDRESS
        try:
            args.to = parse_address(configured)
        except argparse.ArgumentTypeError as error:
            parser.error(f"{ADDRESS_VARIABLE}: {error}")
    exc_text = args.exc_text
    try:
        if exc_text == "-":
            exc_text = read_stdin()
        record = build_record(message=args.message, kind=args.kind,
                              source=args.source, exc_text=exc_text,
                              where=args.where)
        send(encode_datagram(record), *args.to)
    except SendError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    return 0
