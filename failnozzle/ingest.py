"""
Receiving errors: the UDP protocol, and reading a datagram into the unique
key and source of the error it reports.

Bad input never escapes as an exception: each kind of it is a L{BadDatagram}
subclass, which the receiver counts (for the next digest) and logs at a
limited rate.
"""
from __future__ import annotations

import json
import socket
import sys
from typing import Callable, Mapping, Optional, Sequence

import orjson
from twisted.internet import udp
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from failnozzle.aggregate import SCALAR_TYPES, Report, rekeying
from failnozzle.counts import Counts
from failnozzle.levels import logging_level
from failnozzle.ratelog import RateLimitedLog
from failnozzle.textcap import (cut_end, cut_middle, format_capped,
                                recut_middle)

_log = Logger()

#: The standard library's JSON reader, for what orjson refuses, built once:
#: json.loads(text, parse_constant=...) builds a new decoder per call, which
#: is a tenth of a datagram's cost.  NaN and Infinity (Python's json writes
#: them) are kept as text: a NaN float differs even from itself, so each
#: would be a new error.
decode_json_text = json.JSONDecoder(parse_constant=str).decode


def decode_json(data: bytes) -> object:
    """
    A JSON document: orjson's reading, else the standard library's, which
    accepts what Python's json writes beyond the standard (NaN, Infinity,
    lone surrogates) and a UTF-8 byte order mark, and says why the rest is
    bad.

    @raise NotUTF8: C{data} is not UTF-8.
    @raise NotJSON: C{data} is not JSON.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise NotUTF8(str(error), data) from None
    try:
        return decode_json_text(text.removeprefix("\ufeff"))
    except (ValueError, RecursionError) as error:
        raise NotJSON(str(error) or type(error).__name__, data) from None


class BadDatagram(ValueError):
    """A datagram that is not an error report; subclasses say why."""

    reason = "bad datagram"

    def __init__(self, detail: str, data: bytes = b"") -> None:
        super().__init__(detail)
        self.detail = detail
        self.sample = data[:120]

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class OversizedDatagram(BadDatagram):
    reason = "datagram larger than INCOMING_MESSAGE_MAX_SIZE"


class NotUTF8(BadDatagram):
    reason = "datagram is not valid UTF-8"


class NotJSON(BadDatagram):
    reason = "datagram is not valid JSON"


class NotAnObject(BadDatagram):
    reason = "datagram is JSON but not an object"


class WrongFieldType(BadDatagram):
    reason = "datagram has a field of the wrong type"


class BelowLevel(Exception):
    """
    A record less severe than MIN_LEVEL (or, for GELF, GELF_MIN_LEVEL): not
    an error, nor bad input; counted as such and let go.
    """


class RecordReader:
    """
    Turns a datagram, or a record, into C{(key, source)}: the values of the
    unique fields and of the source field.

    As in the original, missing fields are None, and a multi-line message is
    clipped at its first line, the whole text moving to exc_text if that is
    empty.  Every text kept is capped: exc_text at C{max_exc_text_chars},
    cut in the middle; the other fields and the source at
    C{max_field_chars}, cut at the end.
    """

    def __init__(self, unique_fields: Sequence[str], source_field: str,
                 max_size: int, max_field_chars: int = 1000,
                 max_exc_text_chars: int = 16384,
                 fingerprint: Optional[Callable[[dict], Optional[str]]] = None,
                 min_level: Optional[int] = None) -> None:
        """
        @param fingerprint: FINGERPRINT_FUNC (see
            L{failnozzle.fingerprint.CustomFingerprint}), if configured.
        @param min_level: MIN_LEVEL: a record less severe raises
            L{BelowLevel}.
        """
        self._fields = tuple(unique_fields)
        self._floor = min_level
        self._fingerprint = fingerprint
        self._source_field = source_field
        self.max_size = max_size
        self._field_cap = max_field_chars
        self._exc_cap = max_exc_text_chars
        #: How each field is cut, and where: a record's, and a key's kept
        #: from before (see L{rekeying}).
        self._cuts = self._cuts_with(cut_middle)
        self._recuts = self._cuts_with(recut_middle)
        self._exc_index = (self._fields.index("exc_text")
                           if "exc_text" in self._fields else None)
        #: No text of a datagram this long or shorter can need a cut.
        self._uncut_size = min([cap for _, cap in self._cuts]
                               + [max_field_chars])

    def _cuts_with(self, cut_traceback: Callable[[str, int], str]) -> tuple:
        """Per field, its cut and cap: C{cut_traceback} for exc_text."""
        return tuple(
            (cut_traceback, self._exc_cap) if name == "exc_text"
            else (cut_end, self._field_cap) for name in self._fields)

    # Hooks for a reader of another format too (GELF): a datagram starting
    # with one of these bytes for which _is_framed is true goes to
    # _read_framed, and a record holding this field to _read_foreign,
    # which gives its key or None.
    _framed_first_bytes: frozenset = frozenset()
    _foreign_field: Optional[str] = None

    def _is_framed(self, data: bytes) -> bool:
        raise NotImplementedError

    def _read_framed(self, data: bytes, sender: Optional[tuple]
                     ) -> Optional[Report]:
        raise NotImplementedError

    def _read_foreign(self, record: dict, data: bytes) -> Optional[Report]:
        raise NotImplementedError

    def read(self, data: bytes, sender: Optional[tuple] = None
             ) -> Optional[Report]:
        """
        Decode one datagram from C{sender} (an address).

        @return: its report, or None when the datagram completes no
            error report yet (a subclass may hold partial messages).
        @raise BadDatagram: it is not a JSON object with usable fields.
        @raise BelowLevel: it is less severe than MIN_LEVEL.
        """
        if data[:1] in self._framed_first_bytes and self._is_framed(data):
            return self._read_framed(data, sender)
        if len(data) > self.max_size:
            raise OversizedDatagram(
                f"more than {self.max_size} bytes", data)
        record = decode_json(data)
        if type(record) is not dict:
            raise NotAnObject(f"got a JSON {type(record).__name__}", data)
        # A text decoded from JSON has at most as many characters as the
        # datagram has bytes.
        return self._key(record, data, len(data), None, self._floor)

    def report_of(self, record: dict, data: bytes = b"",
                  level: Optional[int] = None) -> Report:
        """
        Read the report of a decoded record (changed in place): its key
        and source, their texts capped, sent with the syslog C{level}
        (else the C{logging} level it says, if any).

        @raise BelowLevel: it is less severe than MIN_LEVEL.

        @param data: the input it came from, for the sample bad input
            keeps.
        @raise WrongFieldType: a unique field or the source holds a list or
            an object, which cannot be compared as a whole.
        """
        return self._key(record, data, None, level, self._floor)

    def key_of(self, record: dict) -> tuple:
        """The key of a record failnozzle makes itself (bad input's): as
        L{report_of}'s, whatever its level."""
        return self._key(record, b"", None, None, None).key

    def _key(self, record: dict, data: bytes, longest: Optional[int],
             level: Optional[int], floor: Optional[int]) -> Report:
        """
        L{report_of}, where C{longest}, if known, bounds the length of
        every text the record holds: the hot path skips the caps when no
        text can need one.  It is known only for a record just decoded
        from JSON.  C{floor}: the least severe level taken (None: all).
        """
        if level is None:
            level = logging_level(record)
        if level is not None and floor is not None and level > floor:
            raise BelowLevel(level)
        decoded = longest is not None
        if self._foreign_field in record:
            found = self._read_foreign(record, data)
            if found is not None:
                return found
        message = record.get("message")
        template = record.get("msg")
        if message is None and template is not None:
            message = record["message"] = self._formatted_msg(record)
            longest = None
        if template is not None:
            template = _template_of(template, message)
        if type(message) is str and "\n" in message:
            if not record.get("exc_text"):
                record["exc_text"] = message
                longest = None  # the first line is no longer elsewhere
            record["message"] = message.partition("\n")[0]
        key = tuple(map(record.get, self._fields))
        source = record.get(self._source_field)
        if not decoded:
            # A record made in Python may hold any object.
            if (type(source) not in SCALAR_TYPES
                    or not SCALAR_TYPES.issuperset(map(type, key))):
                raise self._wrong_type(key, source, data)
        else:
            # Of what JSON decodes to, only the scalars hash: one hash each,
            # which counting the key needs anyway, checks every value.
            try:
                hash(key), hash(source)
            except TypeError:
                raise self._wrong_type(key, source, data) from None
        custom = (None if self._fingerprint is None
                  else self._fingerprint(record))
        if longest is not None:
            if longest <= self._uncut_size:
                return Report(key, source, level, template, custom)
            if self._exc_index is not None:
                exc_text = key[self._exc_index]
                # Each other text is elsewhere in the datagram, so shorter
                # than what exc_text leaves of it: most tracebacks need no
                # more.
                if (type(exc_text) is str and len(exc_text) <= self._exc_cap
                        and longest - len(exc_text) <= self._field_cap):
                    return Report(key, source, level, template, custom)
        if type(source) is str:
            source = cut_end(source, self._field_cap)
        if type(template) is str:
            template = cut_end(template, self._field_cap)
        return Report(_cut_key(key, self._cuts), source, level, template,
                      custom)

    def rekeying(self, fields: Optional[Sequence[str]]
                 ) -> Callable[[tuple], tuple]:
        """
        What turns a key of C{fields} (None: of this reader's), counted
        under other caps (before a reload, or in an earlier run), into the
        key the same error arriving now gets: read by field name (see
        L{failnozzle.aggregate.rekeying}), each text cut to this reader's
        caps.  Errors kept from then and those from now are so counted
        together, and a lowered cap frees what it is meant to.
        """
        renamed = rekeying(fields, self._fields)
        return lambda key: _cut_key(renamed(key), self._recuts)

    def _formatted_msg(self, record: dict) -> object:
        """
        The message of a record sent as C{logging} holds it, as the original
        failnozzle's handler did unless the record carried a traceback: the
        C{msg} format with its C{args}, formatted under the exc_text cap
        (a multi-line message may move there); if they do not fit, both
        as text.
        """
        msg, args = record["msg"], record.get("args")
        if type(msg) is not str or not args:
            return msg
        if type(args) is list:
            args = tuple(args)
        try:
            return format_capped(msg, args, max(self._exc_cap,
                                                self._field_cap))
        except Exception:
            return f"{msg} (arguments that do not fit: {_text_of(args)})"

    def _wrong_type(self, key: tuple, source: object,
                    data: bytes) -> WrongFieldType:
        name, value = next(
            (name, value) for name, value in zip(
                self._fields + (self._source_field,), key + (source,))
            if type(value) not in SCALAR_TYPES)
        return WrongFieldType(f"field {name!r} is a JSON {_json_type(value)}",
                              data)


def _cut_key(key: tuple, cuts: tuple) -> tuple:
    """C{key} with each text longer than its cap cut; C{cuts} holds, per
    field, its cut and its cap."""
    return tuple([
        value if type(value) is not str or len(value) <= cap
        else cut(value, cap)
        for value, (cut, cap) in zip(key, cuts)])


def _template_of(msg: object, message: object) -> Optional[str]:
    """
    The C{logging} format a record's message was made from, if C{msg} is
    one: a text with a directive (C{%s}, or C{{}} for str.format styles)
    that differs from the message.  failnozzle's own handler sends it so.
    """
    if (type(msg) is str and msg != message
            and ("%" in msg or "{" in msg)):
        return msg
    return None


def _text_of(args: object) -> str:
    """The arguments of a C{msg} that they do not fit, as text."""
    try:
        return repr(list(args) if type(args) is tuple else args)
    except Exception:
        return f"<{type(args).__name__}>"


def _json_type(value: object) -> str:
    return {dict: "object", list: "array"}.get(type(value),
                                               type(value).__name__)


def default_internal_error_record(count: int, error: Exception) -> dict:
    """
    The record that stands for C{count} pieces of bad input like C{error}
    in a digest (the default INTERNAL_ERROR_FUNC): datagrams or mail, which
    C{error}'s reason names.  Its place fields are failnozzle's, so every
    kind of bad input comes under one module and function.
    """
    sample = getattr(error, "sample", b"")
    return {
        "module": "failnozzle.ingest",
        "funcName": "datagramReceived",
        "filename": "ingest.py",
        "pathname": "failnozzle/ingest.py",
        "lineno": 0,
        "kind": "failnozzle",
        "message": f"Internal error: {getattr(error, 'reason', error)}",
        "exc_text": (
            f"Internal error: {count} bad input(s) of this kind since the "
            f"last digest.\nThe last one: {error}\n"
            f"It began with: {sample!r}"
        ),
    }


def internal_error_key_maker(
    reader: RecordReader,
    custom: Optional[Callable[[int, Exception], Mapping]] = None,
) -> Callable[[int, Exception], tuple]:
    """
    Make the function that gives the unique key under which bad input is
    reported: C{custom} (INTERNAL_ERROR_FUNC, as in the original) when it
    works, else the default record, so a broken hook costs no digest.
    """

    def internal_error_key(count: int, error: Exception) -> tuple:
        if custom is not None:
            try:
                return reader.key_of(dict(custom(count, error)))
            except Exception:
                _log.failure("INTERNAL_ERROR_FUNC failed; using the default "
                             "internal error record")
        return reader.key_of(default_internal_error_record(count, error))

    return internal_error_key


class ErrorReceiver(DatagramProtocol):
    """
    The UDP endpoint applications send their errors to: one JSON object per
    datagram, counted into the aggregator.
    """

    noisy = False

    def __init__(self, reader: RecordReader, aggregator,
                 clock: IReactorTime, counts: Optional[Counts] = None,
                 input_name: str = "udp") -> None:
        """
        @param aggregator: an L{failnozzle.aggregate.Aggregator}.
        @param counts: where the datagrams read and the bad ones are
            counted, under C{input_name}.
        """
        #: What reads datagrams: replaced by a reload.
        self.reader = reader
        self._aggregator = aggregator
        self._bad_input_log = RateLimitedLog(_log, clock)
        self._counts = counts or Counts(0.0)
        self._input_name = input_name

    #: How many datagrams the port reads per wake-up, at most: about 5 ms
    #: of them, enough to make the reactor's turn cheap per datagram, few
    #: enough to keep timers and mail on time.
    batch = 1000

    def startProtocol(self) -> None:
        """
        Have the port read in L{read_pending}'s loop, which costs less per
        datagram than Twisted's: that one checks its throughput and the
        address family for each datagram, and stops after 256 KiB.
        """
        if isinstance(self.transport, udp.Port):
            self.transport.doRead = self._read_batch

    def _read_batch(self) -> None:
        # None: anything else returned by doRead tells the reactor to close
        # the port.
        self.read_pending(self.batch)

    def datagramReceived(self, data: bytes, addr: tuple) -> None:
        try:
            report = self.reader.read(data, addr)
            if report is not None:
                self._aggregator.add(report)
        except BelowLevel:
            self._counts.below_level[self._input_name] += 1
        except BadDatagram as error:
            self.report_bad_input(error, addr)
        except Exception:
            # A bug, not bad input: said, and the next datagram is read.
            _log.failure("Could not count a datagram from {host}",
                         host=addr[0])

    def report_bad_input(self, error: BadDatagram, sender: tuple) -> None:
        """Count bad input from C{sender} for the digest, and log it."""
        self._aggregator.add_bad_input(error, sender[0])
        self._counts.bad_input[error.reason] += 1
        self._bad_input_log.warn(
            error.reason, "Bad input from {host}:{port}: {error}",
            host=sender[0], port=sender[1], error=error)

    def read_pending(self, limit: int = 100000) -> int:
        """
        Read what the kernel holds for this port, up to C{limit} datagrams,
        each with its sender's address as C{recvfrom} gives it: the port's
        read loop (see L{startProtocol}), and on a clean stop the last
        datagrams sent before it.

        @return: how many were read.
        """
        recvfrom = self.transport.getHandle().recvfrom
        size = self.reader.max_size + 1
        read = limit
        for count in range(limit):
            try:
                data, addr = recvfrom(size)
            except (BlockingIOError, ConnectionRefusedError):
                read = count
                break
            self.datagramReceived(data, addr)
        # Counted once a batch, not once a datagram.
        self._counts.received[self._input_name] += read
        return read

    def stopProtocol(self) -> None:
        self._bad_input_log.stop()


#: Linux's SO_RCVBUFFORCE, which Python's socket module does not name.
_SO_RCVBUFFORCE = 33 if sys.platform.startswith("linux") else None


def set_receive_buffer(sock: socket.socket, size: int) -> int:
    """
    Enlarge a socket's receive buffer so a burst is not dropped by the
    kernel while the reactor is busy.  Beyond C{net.core.rmem_max} only a
    privileged process gets its wish (SO_RCVBUFFORCE).

    @return: the size the kernel reports afterwards.
    """
    force = getattr(socket, "SO_RCVBUFFORCE", _SO_RCVBUFFORCE)
    try:
        if force is None:
            raise PermissionError
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def bind_udp_socket(host: str, port: int, receive_buffer: int) -> tuple:
    """
    Open the UDP socket errors arrive on, before the reactor runs, so a
    port in use or an address not on this machine stops start-up with one
    clear line (and a port below 1024 can be bound before twistd sheds
    privileges).

    @return: C{(sock, granted)}: the bound, non-blocking socket and the
        receive buffer size the kernel reports.
    @raise OSError: the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        granted = set_receive_buffer(sock, receive_buffer)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock, granted
