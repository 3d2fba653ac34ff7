"""
Texts within a size bound: a field cut at its end, a traceback cut in the
middle, C{logging}'s C{msg % args} formatted under a cap, and a text made
one line.

Every text an error keeps passes through here, so no input costs more than
its capped size.  The formatter never builds more than the cap, whatever the
widths, precisions or repetitions a format asks for, and its result is the
one Python gives, cut as L{cut_middle} would cut it.
"""
from __future__ import annotations

import math
import re
import sys
from itertools import chain
from typing import Callable

#: Ends a field cut at its cap.
FIELD_MARK = "…"

#: A specifier with a mapping key (which may repeat), a C{*}, or an C{f}
#: (1e308 takes 309 digits): what it asks for is known only once parsed.
_KEY_OR_STAR = re.compile(r"%[-+ #0]*(?:[(*]|[0-9]*\.\*|[0-9.]*[hlL]?[fF])")
#: The widths and precisions a format asks for (and, harmlessly, digits
#: after a C{%%}).
_SIZES = re.compile(r"%[-+ #0]*([0-9]*)(?:\.([0-9]*))?")

#: What follows C{%} and the mapping key, as Python's parser reads it.
_SPEC = re.compile(r"([-+ #0]*)(\*|[0-9]*)(?:\.(\*|[0-9]*))?[hlL]?(.?)",
                   re.S)
#: A specifier with a mapping key holding no parentheses, as a whole.
_SIMPLE_KEYED = re.compile(r"\([^()]*\)" + _SPEC.pattern, re.S)

_TEXT_CONVERSIONS = {"s": str, "r": repr, "a": ascii}
_INTEGER_CONVERSIONS = frozenset("diouxX")
_FLOAT_CONVERSIONS = frozenset("eEfFgG")

#: The code points of control characters (C0, DEL, C1): a terminal acts
#: on them, and a line break among them would go on into a line's next.
CONTROL_CODES = (*range(0x20), *range(0x7f, 0xa0))
#: Control characters, read as spaces by L{one_line}.
_CONTROLS = dict.fromkeys(CONTROL_CODES, " ")

#: Past this precision a float's digits are all known zeros (a double has
#: at most 1074 digits after the point, 767 significant ones).
_FLOAT_PRECISION = 1100


def one_line(text: str) -> str:
    """
    C{text} on one line, each run of white space and control characters
    one space: a NUL, an escape sequence or a line break would go on into
    digests and logs.
    """
    return " ".join(text.translate(_CONTROLS).split())


def cut_end(text: str, cap: int) -> str:
    """C{text} if it has at most C{cap} characters, else its start ending in
    L{FIELD_MARK}, C{cap} characters in all."""
    if len(text) <= cap:
        return text
    return text[:cap - 1] + FIELD_MARK


def _mark(cut: int) -> str:
    return f"[… {cut:,} characters cut …]"


#: L{_mark} in a text, and the number it says (of a size a text can be).
_MARK = re.compile(r"\[… ([0-9][0-9,]{0,24}) characters cut …\]")


def cut_middle(text: str, cap: int,
               mark: Callable[[int], str] = _mark) -> str:
    """
    C{text} if it has at most C{cap} characters, else its head and its tail
    around a line saying how many characters were cut, C{cap} characters in
    all: a Python traceback ends with what matters, a Java one begins with
    it.  The cut falls between lines where a line ends near it.

    @param mark: makes that line of the number cut, if not the one the
        texts of an error are cut with (a digest says why it cut).
    """
    if len(text) <= cap:
        return text
    return _cut_middle(len(text), lambda size: text[:size],
                       lambda size: text[len(text) - size:], cap, mark)


def recut_middle(text: str, cap: int) -> str:
    """
    What L{cut_middle} makes of the text that C{text} was cut from (with
    a cap above C{cap}), as far as C{text} holds it, or of C{text} if it
    was not cut: the same, if C{cap} keeps no more of its head and tail
    than C{text} kept, and otherwise as close as C{text} allows, its mark
    still counting the characters cut from the text itself.  A cap
    lowered between runs or by a reload so cuts a kept traceback as it
    cuts the same traceback arriving anew.

    A text that holds a mark of its own is taken as cut there.
    """
    found = _MARK.search(text)
    if found is None:
        return cut_middle(text, cap)
    start, end = text[:found.start()], text[found.end():]
    if start.endswith("\n") and end.startswith("\n"):
        end = end[1:]  # the line end the mark was given
    length = len(start) + int(found.group(1).replace(",", "")) + len(end)
    room = cap - len(_mark(length)) - 1
    if len(text) <= cap and not (2 <= room and room // 2 <= len(start)
                                 and room - room // 2 <= len(end)):
        # The cap keeps more of the head or the tail than the text holds:
        # as it was cut is as close as it gets.
        return text
    return _cut_middle(length, lambda size: start[:size],
                       lambda size: end[max(0, len(end) - size):], cap)


def _cut_middle(length: int, head: Callable[[int], str],
                tail: Callable[[int], str], cap: int,
                mark: Callable[[int], str] = _mark) -> str:
    """L{cut_middle} of a text known by its C{length}, its C{head(n)} and
    its C{tail(n)} (its first and last C{n} characters)."""
    room = cap - len(mark(length)) - 1
    if room < 2:
        return head(cap)
    head_size = room // 2
    start, end = head(head_size), tail(room - head_size)
    line_end = start.rfind("\n", head_size // 2)
    if line_end >= 0:
        start = start[:line_end + 1]
    line_start = end.find("\n", 0, len(end) // 2)
    if line_start >= 0:
        end = end[line_start + 1:]
    return (start + mark(length - len(start) - len(end))
            + ("\n" if start.endswith("\n") else "") + end)


def format_capped(msg: str, args: object, cap: int) -> str:
    """
    C{cut_middle(msg % args, cap)}, at a cost bounded by the cap and the
    size of C{msg} and C{args}, not by the widths, precisions and
    repetitions C{msg} asks for.

    @raise Exception: whatever C{msg % args} raises (TypeError, ValueError,
        KeyError, OverflowError, or what an argument's C{__str__} raises).
    """
    if _asks_little(msg, 4 * cap):
        return cut_middle(msg % args, cap)
    pieces = _Pieces(msg, args).pieces
    length = sum(piece.length for piece in pieces)
    if length <= cap:
        return "".join(piece.text(piece.length) for piece in pieces)
    return _cut_middle(length, lambda size: _head(pieces, size),
                       lambda size: _head(pieces[::-1], size, True), cap)


def _asks_little(msg: str, room: int) -> bool:
    """
    Whether C{msg % args} has at most C{room} characters more than C{msg}
    and its arguments converted each once: no mapping key, no C{*}, no
    C{f}, and widths and precisions adding up to at most C{room}.
    Python's C{%} then formats it in C at a bounded cost.
    """
    if _KEY_OR_STAR.search(msg):
        return False
    try:
        return sum(map(int, filter(None, chain.from_iterable(
            _SIZES.findall(msg))))) <= room
    except ValueError:  # more digits than Python converts
        return False


def _head(pieces: list, size: int, backwards: bool = False) -> str:
    """The first C{size} characters of C{pieces} (the last C{size} of them
    in reverse order if C{backwards}), making no piece longer than that."""
    texts = []
    for piece in pieces:
        if size <= 0:
            break
        text = piece.text(size)
        texts.append(text[-size:] if backwards else text[:size])
        size -= len(texts[-1])
    return "".join(texts[::-1] if backwards else texts)


class _Literal:
    """Text of the format between specifiers."""

    def __init__(self, text: str) -> None:
        self.text_ = text
        self.length = len(text)

    def text(self, size: int) -> str:
        return self.text_


class _Conversion:
    """
    One specifier with its argument: its exact C{length}, and C{text(n)},
    a text whose first and last C{n} characters are those of the
    conversion, however long the conversion would be.
    """

    def __init__(self, flags: str, width, precision, conversion: str,
                 value: object, converted: dict) -> None:
        self._flags, self._conversion, self.value = flags, conversion, value
        self._width, self._precision = width, precision
        if conversion in _TEXT_CONVERSIONS:
            key = (id(value), conversion)
            text = converted.get(key)
            if text is None:
                text = converted[key] = _TEXT_CONVERSIONS[conversion](value)
            self._text = text
            natural = len(text) if precision is None else min(precision,
                                                              len(text))
        elif conversion == "c":
            natural = len(self._format(None, None))
        elif conversion in _INTEGER_CONVERSIONS:
            plain = self._plain(None, converted)
            # Digits, without the sign and the 0x or 0o of "#".
            self._digits = len(plain) - (plain[0] in "+- ") - (
                2 if "#" in flags and conversion in "oxX" else 0)
            natural = len(plain) + max(0, (precision or 0) - self._digits)
        elif conversion in _FLOAT_CONVERSIONS:
            bounded = min(6 if precision is None else precision,
                          _FLOAT_PRECISION)
            natural = len(self._plain(bounded, converted))
            if (bounded < (precision or 0) and self._zeros_follow()
                    and math.isfinite(float(value))):
                natural += precision - bounded
        else:
            raise ValueError(f"unsupported format character {conversion!r}")
        self._natural = natural
        self.length = natural if width is None else max(width, natural)

    def _plain(self, precision, converted: dict) -> str:
        """The conversion without a width, made once per value and
        specifier however often a mapping key repeats it."""
        key = (id(self.value), self._flags, self._conversion, precision)
        text = converted.get(key)
        if text is None:
            text = converted[key] = self._format(None, precision)
        return text

    def _zeros_follow(self) -> bool:
        """Whether a precision past a float's digits adds zeros."""
        return self._conversion in "eEfF" or "#" in self._flags

    def _format(self, width, precision) -> str:
        spec = "%" + self._flags + ("" if width is None else str(width))
        if precision is not None:
            spec += "." + str(precision)
        return (spec + self._conversion) % (self.value,)

    def text(self, size: int) -> str:
        padding = (0 if self._width is None
                   else max(0, self._width - self._natural))
        if self._conversion in _TEXT_CONVERSIONS:
            text = self._text
            if self._precision is not None:
                text = text[:self._precision]
            if not padding:
                return text
            return ("%" + self._flags + str(len(text) + min(padding, size))
                    + "s") % (text,)
        precision = self._precision
        if precision is not None:
            if self._conversion in _INTEGER_CONVERSIONS:
                precision = min(precision, self._digits + size)
            elif self._conversion in _FLOAT_CONVERSIONS:
                precision = min(precision, _FLOAT_PRECISION + (
                    size if self._zeros_follow() else 0))
        text = self._format(None, precision)
        if not padding:
            return text
        return self._format(len(text) + min(padding, size), precision)


class _Pieces:
    """
    C{msg % args} as pieces, parsed as Python parses it (the same
    arguments consumed, the same errors raised), none of them formatted
    beyond what its length takes to know.
    """

    def __init__(self, msg: str, args: object) -> None:
        if isinstance(args, tuple):
            self._args, self._count, self._next = args, len(args), 0
        else:
            self._args, self._count, self._next = args, -1, -2
        self._mapping = (args if hasattr(type(args), "__getitem__")
                         and not isinstance(args, (tuple, str)) else None)
        self._converted: dict = {}
        #: The piece of each specifier with a simple mapping key, as text:
        #: one repeated a thousand times is parsed once.
        self._keyed: dict = {}
        self.pieces: list = []
        position = 0
        while True:
            percent = msg.find("%", position)
            if percent < 0:
                break
            if percent > position:
                self.pieces.append(_Literal(msg[position:percent]))
            position = self._specifier(msg, percent + 1)
        if position < len(msg):
            self.pieces.append(_Literal(msg[position:]))
        if self._next < self._count and self._mapping is None:
            raise TypeError("not all arguments converted during string "
                            "formatting")

    def _argument(self) -> object:
        if self._next >= self._count:
            raise TypeError("not enough arguments for format string")
        self._next += 1
        return self._args if self._count < 0 else self._args[self._next - 1]

    def _star(self) -> int:
        value = self._argument()
        if not isinstance(value, int):
            raise TypeError("* wants int")
        if not -sys.maxsize - 1 <= value <= sys.maxsize:
            raise OverflowError("Python int too large to convert to C "
                                "ssize_t")
        return int(value)  # True is 1

    def _specifier(self, msg: str, position: int) -> int:
        """Add the piece of the specifier after the C{%} at C{position} - 1;
        return where the format goes on."""
        if msg[position:position + 1] == "%":
            self.pieces.append(_Literal("%"))
            return position + 1
        keyed = None
        if msg[position:position + 1] == "(":
            keyed = _SIMPLE_KEYED.match(msg, position)
            piece = keyed and self._keyed.get(keyed.group())
            if piece:
                # Its key looked up and its value taken, as the first time.
                self.pieces.append(piece)
                self._args, self._count, self._next = piece.value, -1, -1
                return keyed.end()
            position = self._key(msg, position + 1)
        match = _SPEC.match(msg, position)
        flags, width, precision, conversion = match.groups()
        if not conversion:
            raise ValueError("incomplete format")
        if width == "*":
            width = self._star()
            if width < 0:
                flags += "-"
                # Python negates it in C: the most negative stays so.
                width = -width if width > -sys.maxsize - 1 else None
        else:
            width = _number(width, "width")
        if precision == "*":
            precision = max(0, self._star())
        elif precision is not None:
            precision = _number(precision, "precision") or 0
        piece = _Conversion(flags, width, precision, conversion,
                            self._argument(), self._converted)
        self.pieces.append(piece)
        if keyed:
            self._keyed[keyed.group()] = piece
        return match.end()

    def _key(self, msg: str, start: int) -> int:
        """Look up the key of C{%(key)}, its parentheses balanced, and make
        its value the argument; return where the specifier goes on."""
        if self._mapping is None:
            raise TypeError("format requires a mapping")
        depth, position = 1, start
        while depth and position < len(msg):
            depth += {"(": 1, ")": -1}.get(msg[position], 0)
            position += 1
        if depth:
            raise ValueError("incomplete format key")
        self._args = self._mapping[msg[start:position - 1]]
        self._count, self._next = -1, -2
        return position


def _number(digits: str, name: str):
    """A width or precision written in digits, or None if none is."""
    if not digits:
        return None
    value = int(digits)
    if value > sys.maxsize:
        raise ValueError(f"{name} too big")
    return value
