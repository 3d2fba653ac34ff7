"""
Cutting a message down to a size a mail server takes.

It works on the message's bytes as spooled (after a restart there is
nothing else): the headers are kept, and the text body is cut at a line
boundary with a last line saying how much was cut and why.  A digest's
summary comes first in its body, so its headlines and totals survive.
"""
from __future__ import annotations

import math
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as default_policy

#: Transfer encodings a cut body is written in again as it was.
_ENCODINGS = ("7bit", "8bit", "quoted-printable", "base64")

#: Tries at finding how much text fits once encoded; each one starts from
#: how far the last one missed, so two or three are usually enough.
_TRIES = 8


def wire_size(data: bytes) -> int:
    """
    The size of a message with LF line ends as SMTP counts it (RFC 1870):
    each line end as CRLF.
    """
    return len(data) + data.count(b"\n")


def shrink(data: bytes, limit: int, reason: str, missing: int = 0) -> bytes:
    """
    C{data} with its text body cut so that the whole message is at most
    C{limit} bytes on the wire (L{wire_size}).

    @param data: a message with LF line ends, as spooled.
    @param reason: why, for the line that ends the cut body, such as
        C{"the mail server takes at most 1,000,000 bytes (SIZE)"}.
    @param missing: how many bytes of the message were already left out
        after C{data} (a spool file read only in part).
    @return: the cut message, or C{data} if it fits already.
    @raise ValueError: it cannot be cut to that size: its body is not text,
        or its headers alone are larger.
    """
    if not missing and wire_size(data) <= limit:
        return data
    try:
        message = message_from_bytes(data, _class=EmailMessage,
                                     policy=default_policy)
        text = message.get_content()
        encoding = str(message.get("Content-Transfer-Encoding", "")).lower()
        charset = message.get_content_charset() or "utf-8"
    # The email package meets odd input with many kinds of error; the
    # spool may hold anything after a restart.
    except Exception as error:
        raise ValueError(f"its body cannot be read ({error!r})") from None
    if not isinstance(text, str):
        raise ValueError("its body is not text")
    if encoding not in _ENCODINGS:
        encoding = "quoted-printable"
    size = wire_size(data) + missing
    marker = (f"\n[failnozzle cut the rest of this message here: it is "
              f"{size:,} bytes, and {reason}.]\n")
    keep = len(text)
    for _ in range(_TRIES):
        kept = text[:keep]
        if keep < len(text):
            # At a line boundary, whole lines only.
            kept = kept[:kept.rfind("\n") + 1]
        try:
            message.set_content(kept + marker, charset=charset, cte=encoding)
        except (LookupError, ValueError) as error:
            raise ValueError(f"its body cannot be written again ({error})") \
                from None
        cut = message.as_bytes(policy=default_policy)
        over = wire_size(cut) - limit
        if over <= 0:
            return cut
        if not kept:
            raise ValueError(f"its headers alone are more than {limit:,} "
                             f"bytes")
        # Encoded, each character of the body costs about the same.
        body = cut[cut.find(b"\n\n") + 2:]
        per_byte = (len(kept) + len(marker)) / wire_size(body)
        keep = max(0, len(kept) - math.ceil(over * per_byte) - 1)
    raise ValueError(f"it could not be cut to {limit:,} bytes")
