"""
GELF (Graylog Extended Log Format 1.0 and 1.1) over UDP: telling a GELF
datagram apart, reassembling chunked messages, inflating compressed ones
within a size limit, and mapping a GELF message onto a failnozzle record.

Memory stays bounded whatever arrives: partial messages are capped in number
and in bytes, in all and per sending host (so one host's flood of chunks
cannot stop another's messages), and expire after L{CHUNK_TIMEOUT} seconds;
compressed data is never inflated past the size limit, so a zlib or gzip
bomb costs at most that much; and the record a message becomes has its
texts capped by L{failnozzle.ingest.RecordReader} like any other.  Every
rejection is a L{BadDatagram} subclass, counted like other bad input.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from failnozzle.aggregate import Report
from failnozzle.ingest import BadDatagram, RecordReader, decode_json
from failnozzle.levels import SYSLOG_LEVELS, stricter

#: A chunked message may have at most this many chunks (the GELF spec).
MAX_CHUNKS = 128
#: Seconds after its first chunk that an incomplete message is dropped
#: (Graylog's own timeout: a sender sends all chunks at once).
CHUNK_TIMEOUT = 5.0
#: The default cap on a message's size once reassembled and inflated: a
#: thousand-line traceback is well below it.
DEFAULT_MAX_SIZE = 1024 * 1024
#: The default cap on chunked messages held incomplete at one time.
DEFAULT_MAX_PARTIALS = 1000
#: The default cap on the bytes of chunks held for incomplete messages.
DEFAULT_MAX_PARTIAL_BYTES = 32 * 1024 * 1024
#: The default caps on what one sending host may hold: a tenth of the
#: messages, an eighth of the bytes.
DEFAULT_MAX_PARTIALS_PER_HOST = 100
DEFAULT_MAX_PARTIAL_BYTES_PER_HOST = 4 * 1024 * 1024
#: The default cap on the ids of chunked messages remembered as completed.
DEFAULT_MAX_COMPLETED = 10000

_CHUNK_MAGIC = b"\x1e\x0f"
_GZIP_MAGIC = b"\x1f\x8b"
# Magic (2 bytes), message id (8), sequence number (1), sequence count (1).
_CHUNK_HEADER_SIZE = 12

# GELF field, or fields in order of preference, for each record field.
_KIND_FIELDS = ("_kind", "_facility", "facility")
_FIELD_MAP = (
    ("message", ("short_message",)),
    ("exc_text", ("full_message",)),
    ("pathname", ("file", "_file")),
    ("lineno", ("line", "_line")),
    ("module", ("_module",)),
    ("funcName", ("_funcName", "_function", "_func")),
)


class NotGELF(BadDatagram):
    reason = "datagram is not GELF"


class BadChunkHeader(BadDatagram):
    reason = "GELF chunk has a bad header"


class TooManyChunks(BadDatagram):
    reason = f"GELF message in more than {MAX_CHUNKS} chunks"


class TooManyPartialMessages(BadDatagram):
    reason = "too many incomplete chunked GELF messages held"


class TooManyPartialBytes(BadDatagram):
    reason = "too many bytes of incomplete chunked GELF messages held"


class TooManyPartialMessagesFromHost(BadDatagram):
    reason = "too many incomplete chunked GELF messages held from one host"


class TooManyPartialBytesFromHost(BadDatagram):
    reason = ("too many bytes of incomplete chunked GELF messages held from "
              "one host")


class IncompleteMessage(BadDatagram):
    reason = "chunked GELF message never completed"


class MessageTooLarge(BadDatagram):
    reason = "GELF message larger than the size limit"


class DecompressionBomb(BadDatagram):
    reason = "compressed GELF message inflates beyond the size limit"


class CorruptCompressed(BadDatagram):
    reason = "compressed GELF message is corrupt"


class GELFNotJSON(BadDatagram):
    reason = "GELF message is not a JSON object"


class InvalidGELF(BadDatagram):
    reason = "GELF message lacks a string version or short_message"


#: The first bytes of chunked, gzip and zlib datagrams.
_FRAMED_FIRST_BYTES = frozenset((b"\x1e", b"\x1f", b"\x78"))


def _framing(data: bytes) -> Optional[str]:
    """
    The framing of a GELF datagram, or of a reassembled message, from its
    first bytes: C{"chunked"}, C{"gzip"}, C{"zlib"}, C{"json"} or None.
    """
    head = data[:2]
    if head == _CHUNK_MAGIC:
        return "chunked"
    if head == _GZIP_MAGIC:
        return "gzip"
    # RFC 1950: CMF 0x78 is deflate with a 32 KiB window, and the header
    # check makes the two bytes a multiple of 31.
    if len(head) == 2 and head[0] == 0x78 and (
            (head[0] << 8) | head[1]) % 31 == 0:
        return "zlib"
    if head[:1] == b"{":
        return "json"
    return None


def is_gelf(data: bytes) -> bool:
    """
    Whether a datagram's first bytes say it is GELF: compressed or chunked.
    No JSON text starts with those bytes, so the receiver can hand such a
    datagram to L{GELFDecoder} and read the rest as failnozzle's JSON;
    plain JSON GELF is told apart once parsed, by L{looks_like_gelf}.
    """
    # Every datagram passes here: the first byte settles most of them.
    return data[:1] in _FRAMED_FIRST_BYTES and _framing(data) in (
        "chunked", "gzip", "zlib")


def looks_like_gelf(obj: dict) -> bool:
    """
    Whether a parsed JSON object is a GELF message rather than a failnozzle
    record: GELF requires C{version} and C{short_message}, which a
    failnozzle record never has.
    """
    return "version" in obj and "short_message" in obj


def _basename(path: str) -> str:
    """The last part of a path, written with slashes or backslashes (GELF
    clients on Windows send the latter)."""
    return re.split(r"[\\/]", path)[-1]


def _describe(value: object) -> str:
    """The JSON type of a value, for saying what is wrong with a field."""
    return {dict: "an object", list: "an array", str: "a string",
            bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def record_from_gelf(obj: dict, source_field: str = "source",
                     default_kind: str = "gelf", data: bytes = b"") -> dict:
    """
    The failnozzle record for a GELF message, for
    L{failnozzle.ingest.RecordReader.report_of}: C{host} is the
    source, C{_kind}, C{_facility} or C{facility} the kind, the file's
    basename the filename.  GELF clients name the rest differently (graypy
    sends C{_function}, pygelf C{_func}), so the first field present of
    each alternative wins.

    @param data: the message as received, for the sample an error keeps.
    @raise InvalidGELF: C{version} or C{short_message} is missing or not a
        string.
    """
    if not (isinstance(obj.get("version"), str)
            and isinstance(obj.get("short_message"), str)):
        raise InvalidGELF(", ".join(
            f"{name} is {_describe(obj[name]) if name in obj else 'missing'}"
            for name in ("version", "short_message")), data)

    def first(names: tuple) -> object:
        return next((obj[name] for name in names
                     if obj.get(name) is not None), None)

    record = {field: first(names) for field, names in _FIELD_MAP}
    pathname = record["pathname"]
    record["filename"] = (_basename(pathname) if isinstance(pathname, str)
                          else pathname)
    record["kind"] = first(_KIND_FIELDS)
    if record["kind"] is None:
        record["kind"] = default_kind
    record[source_field] = obj.get("host")
    record["level"] = _syslog_level(obj.get("level"))
    return record


def _syslog_level(value: object) -> Optional[int]:
    """
    A GELF level as a syslog severity, or None if it is none: a digest
    would rather show no level than a wrong one.
    """
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is int and 0 <= value < len(SYSLOG_LEVELS):
        return value
    return None


@dataclass
class _Partial:
    """The chunks of one chunked message received so far."""

    sender: tuple
    deadline: float
    chunks: list
    missing: int
    size: int
    sample: bytes


class GELFDecoder:
    """
    Turns GELF datagrams into failnozzle records, holding the chunks of
    chunked messages until they are complete or expire.

    Chunks are grouped by sending host and message id, so two hosts that
    happen to pick the same id (or a host spoofing another's) do not mix.
    The ids of messages completed in the last L{CHUNK_TIMEOUT} seconds are
    remembered, so a chunk sent again (UDP may duplicate a datagram, some
    clients resend) is dropped rather than held as a new message that
    would never complete.

    @param clock: where time comes from, for the expiry of partial messages.
    @param max_size: the largest message accepted, in bytes, once
        reassembled and inflated.
    @param max_partials: how many incomplete messages may be held; a new one
        beyond that is rejected.
    @param max_partial_bytes: how many bytes of chunks incomplete messages
        may hold in all; a chunk beyond that is rejected along with the
        message it belongs to.
    @param max_partials_per_host: C{max_partials} for the messages of one
        sending host (an address).
    @param max_partial_bytes_per_host: C{max_partial_bytes} for them.
    @param max_completed: how many ids of completed messages are
        remembered at most; past it the oldest is forgotten.
    @param source_field: the record field the host goes into
        (SOURCE_FIELD_NAME).
    @param default_kind: the kind of a message that names none.
    @param on_incomplete: called with an L{IncompleteMessage} and the
        address of the first chunk's sender for each message dropped
        incomplete (on expiry or L{stop}), so lost chunks are counted too;
        without it such messages are dropped silently.
    """

    def __init__(
        self,
        clock: IReactorTime,
        max_size: int = DEFAULT_MAX_SIZE,
        max_partials: int = DEFAULT_MAX_PARTIALS,
        max_partial_bytes: int = DEFAULT_MAX_PARTIAL_BYTES,
        max_partials_per_host: int = DEFAULT_MAX_PARTIALS_PER_HOST,
        max_partial_bytes_per_host: int = DEFAULT_MAX_PARTIAL_BYTES_PER_HOST,
        max_completed: int = DEFAULT_MAX_COMPLETED,
        source_field: str = "source",
        default_kind: str = "gelf",
        on_incomplete: Optional[
            Callable[[IncompleteMessage, tuple], None]] = None,
    ) -> None:
        self._clock = clock
        self.max_size = max_size
        self._max_partials = max_partials
        self._max_partial_bytes = max_partial_bytes
        self._max_host_partials = max_partials_per_host
        self._max_host_bytes = max_partial_bytes_per_host
        self._max_completed = max_completed
        self._source_field = source_field
        self._default_kind = default_kind
        self._on_incomplete = on_incomplete
        # In order of arrival of their first chunk, hence of deadline.
        self._partials: dict = {}
        self._held = 0
        #: Per sending host, C{[messages, bytes]} its partial messages hold.
        self._hosts: dict = {}
        #: The keys of messages completed, in order, with their deadlines.
        self._completed: dict = {}
        self._timer: Optional[IDelayedCall] = None

    def configure(self, source_field: str, default_kind: str) -> None:
        """Take new settings (a reload) for the messages decoded from now."""
        self._source_field = source_field
        self._default_kind = default_kind

    @property
    def partial_messages(self) -> int:
        """How many incomplete messages are held."""
        return len(self._partials)

    @property
    def partial_bytes(self) -> int:
        """How many bytes of chunks incomplete messages hold."""
        return self._held

    @property
    def completed_ids(self) -> int:
        """How many ids of completed messages are remembered."""
        return len(self._completed)

    def held_by(self, host: str) -> tuple:
        """C{(messages, bytes)} the partial messages of C{host} hold."""
        return tuple(self._hosts.get(host, (0, 0)))

    def decode(self, data: bytes, sender: tuple) -> Optional[dict]:
        """
        Decode one GELF datagram from C{sender} (a C{(host, port)} address).

        @return: the record, or None for a chunk that does not complete its
            message yet.
        @raise BadDatagram: a subclass from this module saying why the
            datagram, or the message it completes, is rejected.
        """
        framing = _framing(data)
        if framing == "chunked":
            message = self._add_chunk(data, sender)
            if message is None:
                return None
            data, framing = message, _framing(message)
        if framing == "json":
            if len(data) > self.max_size:
                raise MessageTooLarge(
                    f"{len(data)} bytes, more than {self.max_size}", data)
            text = data
        elif framing == "zlib":
            text = self._inflate(data, zlib.MAX_WBITS)
        elif framing == "gzip":
            text = self._inflate(data, 16 + zlib.MAX_WBITS)
        else:
            what = "chunked message holds a chunk" if framing else (
                f"starts with {data[:2]!r}")
            raise NotGELF(what, data)
        return self.record_from(self._parse(text), text)

    def record_from(self, obj: dict, data: bytes = b"") -> dict:
        """The failnozzle record for a parsed GELF message."""
        return record_from_gelf(obj, self._source_field, self._default_kind,
                                data)

    def _inflate(self, data: bytes, wbits: int) -> bytes:
        """Inflate at most one byte more than the size limit, so a bomb is
        found out without being inflated."""
        inflater = zlib.decompressobj(wbits)
        try:
            text = inflater.decompress(data, self.max_size + 1)
        except zlib.error as error:
            raise CorruptCompressed(str(error), data) from None
        if len(text) > self.max_size:
            raise DecompressionBomb(
                f"{len(data)} bytes inflate to more than {self.max_size}",
                data)
        if not inflater.eof:
            raise CorruptCompressed("the compressed data is cut short", data)
        if inflater.unused_data:
            raise CorruptCompressed(
                f"{len(inflater.unused_data)} bytes after the compressed data",
                data)
        return text

    @staticmethod
    def _parse(data: bytes) -> dict:
        try:
            obj = decode_json(data)
        except BadDatagram as error:
            raise GELFNotJSON(str(error), data) from None
        if type(obj) is not dict:
            raise GELFNotJSON(f"got a JSON {type(obj).__name__}", data)
        return obj

    def _add_chunk(self, data: bytes, sender: tuple) -> Optional[bytes]:
        """
        Hold one chunk.

        @return: the whole message once this chunk completes it, else None.
        """
        if len(data) < _CHUNK_HEADER_SIZE:
            raise BadChunkHeader(
                f"{len(data)} bytes, shorter than the "
                f"{_CHUNK_HEADER_SIZE}-byte header", data)
        number, count = data[10], data[11]
        if count > MAX_CHUNKS:
            raise TooManyChunks(f"sequence count {count}", data)
        if number >= count:
            raise BadChunkHeader(
                f"sequence number {number} of count {count}", data)
        body = data[_CHUNK_HEADER_SIZE:]
        self._expire()
        host = sender[0]
        key = (host, data[2:10])
        partial = self._partials.get(key)
        if partial is None:
            if count == 1:
                return body
            if key in self._completed:
                return None  # Sent again: the message was counted.
            self._check_room(host, data)
        elif len(partial.chunks) != count:
            raise BadChunkHeader(
                f"sequence count {count}, earlier chunks said "
                f"{len(partial.chunks)}", data)
        elif partial.chunks[number] is not None:
            return None  # A duplicate: UDP may deliver a datagram twice.
        elif partial.missing == 1:
            self._discard(key)
            self._remember(key)
            partial.chunks[number] = body
            return b"".join(partial.chunks)
        held = self._hosts.setdefault(host, [0, 0])
        error = None
        if held[1] + len(body) > self._max_host_bytes:
            error = TooManyPartialBytesFromHost(
                f"{len(body)} more bytes on {held[1]} held from {host}, the "
                f"limit is {self._max_host_bytes}", data)
        elif self._held + len(body) > self._max_partial_bytes:
            error = TooManyPartialBytes(
                f"{len(body)} more bytes on {self._held} held, the limit is "
                f"{self._max_partial_bytes}", data)
        if error is not None:
            if partial is not None:
                self._discard(key)
            elif not held[0]:
                del self._hosts[host]
            raise error
        if partial is None:
            partial = self._partials[key] = _Partial(
                sender, self._clock.seconds() + CHUNK_TIMEOUT,
                [None] * count, count, 0, data[:120])
            held[0] += 1
            self._arm()
        partial.chunks[number] = body
        partial.missing -= 1
        partial.size += len(body)
        self._held += len(body)
        held[1] += len(body)
        return None

    def _check_room(self, host: str, data: bytes) -> None:
        """
        @raise TooManyPartialMessages: no new partial message may be held.
        @raise TooManyPartialMessagesFromHost: none from C{host}.
        """
        held = self._hosts.get(host)
        if held is not None and held[0] >= self._max_host_partials:
            raise TooManyPartialMessagesFromHost(
                f"{held[0]} held already from {host}", data)
        if len(self._partials) >= self._max_partials:
            raise TooManyPartialMessages(
                f"{len(self._partials)} held already", data)

    def _remember(self, key: tuple) -> None:
        """Remember a completed message for L{CHUNK_TIMEOUT} seconds, and
        forget the oldest past L{max_completed}."""
        if len(self._completed) >= self._max_completed:
            del self._completed[next(iter(self._completed))]
        self._completed[key] = self._clock.seconds() + CHUNK_TIMEOUT

    def _discard(self, key: tuple) -> _Partial:
        partial = self._partials.pop(key)
        self._held -= partial.size
        host = key[0]
        held = self._hosts[host]
        if held[0] == 1:
            del self._hosts[host]
        else:
            held[0] -= 1
            held[1] -= partial.size
        return partial

    def _expire(self) -> None:
        """Drop the messages past their deadline.  Also called for each
        chunk, so the limits count only live messages even while a burst
        keeps the timer from running."""
        now = self._clock.seconds()
        completed = self._completed
        while completed and next(iter(completed.values())) <= now:
            del completed[next(iter(completed))]
        while self._partials:
            key, partial = next(iter(self._partials.items()))
            if partial.deadline > now:
                return
            self._drop(key, f"after {CHUNK_TIMEOUT:g} s")

    def _drop(self, key: tuple, when: str) -> None:
        partial = self._discard(key)
        if self._on_incomplete is not None:
            got = len(partial.chunks) - partial.missing
            self._on_incomplete(
                IncompleteMessage(
                    f"{got} of {len(partial.chunks)} chunks {when}",
                    partial.sample),
                partial.sender)

    def _arm(self) -> None:
        """Make sure a timer runs for the oldest partial message: without
        one, chunks that never complete would be held until more GELF
        arrives."""
        if self._timer is None and self._partials:
            oldest = next(iter(self._partials.values()))
            self._timer = self._clock.callLater(
                max(0.0, oldest.deadline - self._clock.seconds()),
                self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        self._expire()
        self._arm()

    def stop(self) -> None:
        """Drop every partial message, reporting each as incomplete, and
        cancel the timer: no timer may run once the port is closed."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for key in list(self._partials):
            self._drop(key, "at shutdown")
        self._completed.clear()


class GELFRecordReader(RecordReader):
    """
    Reads failnozzle's JSON and GELF alike, told apart per datagram:
    compressed or chunked GELF by its first bytes, plain JSON GELF by its
    C{version} and C{short_message} once parsed.
    """

    def __init__(self, unique_fields: Sequence[str], source_field: str,
                 max_size: int, decoder: GELFDecoder,
                 max_field_chars: int = 1000,
                 max_exc_text_chars: int = 16384,
                 fingerprint: Optional[Callable[[dict], Optional[str]]] = None,
                 min_level: Optional[int] = None,
                 gelf_min_level: Optional[int] = None) -> None:
        """
        @param max_size: the largest failnozzle datagram; GELF messages are
            bounded by the decoder's own C{max_size} once inflated.
        @param gelf_min_level: GELF_MIN_LEVEL, which GELF messages are held
            to besides C{min_level}: GELF clients ship every log line.
        """
        super().__init__(unique_fields, source_field, max_size,
                         max_field_chars, max_exc_text_chars, fingerprint,
                         min_level)
        self._decoder = decoder
        self._gelf_floor = stricter(min_level, gelf_min_level)

    # RecordReader's hooks: every datagram passes its cheap tests.
    _framed_first_bytes = _FRAMED_FIRST_BYTES
    _foreign_field = "short_message"

    _is_framed = staticmethod(is_gelf)

    def _read_framed(self, data: bytes, sender: Optional[tuple]
                     ) -> Optional[Report]:
        record = self._decoder.decode(data, sender)
        return None if record is None else self._gelf_report(record, data)

    def _read_foreign(self, record: dict, data: bytes) -> Optional[Report]:
        """
        @return: for a GELF message its report, with its level; None for
            failnozzle's JSON.
        """
        if not looks_like_gelf(record):
            return None
        return self._gelf_report(self._decoder.record_from(record, data),
                                 data)

    def _gelf_report(self, record: dict, data: bytes) -> Report:
        # Inflated, its texts may be longer than the datagram: all checked.
        return self._key(record, data, None, record["level"],
                         self._gelf_floor)
