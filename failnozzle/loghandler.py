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

#: Keep each datagram below the largest UDP payload over IPv4 (65507 bytes),
#: leaving room for the other fields.
MAX_TEXT_BYTES = 60000


def _clip(text: str, limit: int = MAX_TEXT_BYTES) -> str:
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode("utf-8", "ignore") + "\n[clipped by failnozzle]"


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
        values JSON cannot encode become their repr.
        """
        fields = dict(record.__dict__)
        fields["message"] = _clip(record.getMessage())
        if record.exc_info:
            if not record.exc_text:
                formatter = self.formatter or logging.Formatter()
                fields["exc_text"] = formatter.formatException(record.exc_info)
        fields["exc_info"] = None
        if fields.get("exc_text"):
            fields["exc_text"] = _clip(fields["exc_text"])
        fields["msg"] = fields["message"]
        fields["args"] = None
        fields["source"] = self.source
        fields["kind"] = self.kind
        return json.dumps(fields, default=repr).encode("utf-8")
