"""
The C{logging} handler applications use to send their errors to failnozzle,
usable from C{logging.config.fileConfig} as with the original::

    [handler_failnozzleHandler]
    class=failnozzle.loghandler.AggregatorHandler
    level=ERROR
    args=('failnozzle.example.com', 1549, os.uname()[1], 'myapp')

It depends on the standard library only, so it can be installed into any
application.
"""
from __future__ import annotations

import json
import logging
import logging.handlers

#: The largest UDP payload over IPv4: a longer record cannot be sent at all.
MAX_DATAGRAM_BYTES = 65507

CLIPPED = "\n[clipped by failnozzle]"


def _encodable(value: object) -> object:
    """C{value}, or its repr if JSON cannot encode it even with C{repr}."""
    try:
        json.dumps(value, default=repr)
    except (TypeError, ValueError, RecursionError):
        return repr(value)
    return value


def _encode(fields: dict) -> str:
    """
    JSON text, all ASCII (so its length is its size in bytes, and lone
    surrogates survive).  Values JSON cannot encode become their repr.
    """
    try:
        return json.dumps(fields, default=repr)
    except (TypeError, ValueError, RecursionError):
        return json.dumps({str(name): _encodable(value)
                           for name, value in fields.items()}, default=repr)


def _clip(text: str, budget: int) -> str:
    """
    The longest start of C{text} that, marked as clipped, takes at most
    C{budget} bytes as JSON; "" if not even the mark fits.
    """
    low, high = 0, min(len(text), budget)
    while low < high:
        middle = (low + high + 1) // 2
        if len(json.dumps(text[:middle] + CLIPPED)) <= budget:
            low = middle
        else:
            high = middle - 1
    clipped = text[:low] + CLIPPED
    return clipped if len(json.dumps(clipped)) <= budget else ""


def _fit(fields: dict) -> dict:
    """
    Clip the longest values to one common size so the JSON fits in one
    datagram; message and exc_text are clipped alike, so neither is lost
    to the other.  msg, where present (the format of message), is
    dropped.
    """
    fields = {str(name): _encodable(value) for name, value in fields.items()}
    if "msg" in fields:
        fields["msg"] = None
    sizes = {name: len(json.dumps(value, default=repr))
             for name, value in fields.items()}
    room = MAX_DATAGRAM_BYTES - (len(_encode(fields)) - sum(sizes.values()))
    # Find the largest cap such that the values, each cut to at most the
    # cap, fit in the room left by names and punctuation.
    ordered = sorted(sizes.values(), reverse=True)
    rest = sum(ordered)
    for count, size in enumerate(ordered, 1):
        rest -= size
        cap = (room - rest) // count
        if count == len(ordered) or cap >= ordered[count]:
            break
    for name, size in sizes.items():
        if size > cap:
            value = fields[name]
            text = value if isinstance(value, str) else json.dumps(
                value, default=repr)
            fields[name] = _clip(text, cap)
    return fields


def encode_datagram(fields: dict) -> bytes:
    """
    A record as the payload of one datagram: JSON, all ASCII, the longest
    values clipped if it would not fit.  The handler and C{failnozzle-send}
    both use it, so a record is clipped alike whoever sends it.
    """
    data = _encode(fields)
    if len(data) > MAX_DATAGRAM_BYTES:
        data = _encode(_fit(fields))
    return data.encode("ascii")


def _message_of(record: logging.LogRecord) -> str:
    """
    The record's message; for one whose arguments do not fit its format
    (which logging's own handlers only report on standard error, sending
    nothing), the format and the arguments, as the daemon words that: the
    error is reported all the same.
    """
    try:
        return record.getMessage()
    except Exception:
        try:
            args = repr(record.args)
        except Exception:
            args = f"<{type(record.args).__name__}>"
        return f"{record.msg} (arguments that do not fit: {args})"


class AggregatorHandler(logging.handlers.DatagramHandler):
    """
    Sends each record as one JSON object over UDP, with the C{source} (the
    host it happened on) and C{kind} (the application) added.

    Like every C{logging} handler it never raises into the application: a
    failure to send goes to L{logging.Handler.handleError}.
    """

    def __init__(self, host: str, port: int, source: str, kind: str) -> None:
        """
        @param host: the host failnozzle runs on.
        @param port: its UDP port (UDP_BIND; 1549 by default).
        @param source: the name of the machine the errors happen on.
        @param kind: the kind of service sending them (app, imap, ...).
        """
        super().__init__(host, port)
        self.source = source
        self.kind = kind

    def makePickle(self, record: logging.LogRecord) -> bytes:
        """
        Encode a record as JSON (not a pickle, despite the name the base
        class gives this step).  The formatted traceback goes in exc_text;
        values JSON cannot encode become their repr; a record too long for
        one datagram has its longest values clipped.
        """
        fields = dict(record.__dict__)
        fields["message"] = _message_of(record)
        if record.exc_info and not record.exc_text:
            formatter = self.formatter or logging.Formatter()
            fields["exc_text"] = formatter.formatException(record.exc_info)
        fields["exc_info"] = None
        # The format the message was made from groups it with the others
        # made from it (failnozzle.fingerprint); the arguments are in the
        # message already.
        fields["msg"] = (record.msg if isinstance(record.msg, str)
                         else fields["message"])
        fields["args"] = None
        fields["source"] = self.source
        fields["kind"] = self.kind
        return encode_datagram(fields)
