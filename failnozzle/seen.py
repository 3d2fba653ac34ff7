"""
The seen-memory: every error failnozzle has reported, by fingerprint, so a
digest can say which of its errors are new, back after a quiet time, or
ongoing.

It changes only when a digest is made, and is written then, whole and
atomically, beside the state file (C{STATE_FILE.seen}); at most SEEN_MAX
errors are kept, those seen longest ago forgotten first.  A file that is
not what this module writes is set aside with one log line, as the state
file is: nothing in it can keep the daemon from starting.

  STATE_FILE.seen      {"version": 1, "seen": [[fingerprint, first_seen,
                       last_seen, total, last_reported, rate], ...]},
                       wall-clock seconds, the rate per second when it was
                       last listed in full, oldest first
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import orjson
from twisted.logger import Logger

from failnozzle.spool import BadEntry, move_aside, read_entry, replace_file

_log = Logger()

_VERSION = 1

#: A fingerprint longer than this is not one failnozzle made.
_MAX_FINGERPRINT_CHARS = 100

#: The most a file is read: twice what the largest SEEN_MAX (1,000,000)
#: takes, so a file written with a larger SEEN_MAX than today's is read,
#: and trimmed, not set aside.
_MAX_FILE_BYTES = 200 * 1_000_000


@dataclass(slots=True)
class Seen:
    """What is remembered of one error (wall-clock seconds)."""

    first_seen: float
    last_seen: float
    total: int
    #: When it was last listed in full in a digest, and its rate then
    #: (instances a second).
    last_reported: float
    rate: float = 0.0


class SeenMemory:
    """Fingerprint to L{Seen}, at most C{max_size} of them."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        # In the order last seen, oldest first (dicts keep insertion
        # order): the first ones are forgotten first.
        self._seen: dict = {}

    def __len__(self) -> int:
        return len(self._seen)

    def get(self, fingerprint: str) -> Optional[Seen]:
        return self._seen.get(fingerprint)

    def record(self, fingerprint: str, first_seen: float, last_seen: float,
               count: int, listed: Optional[tuple] = None) -> None:
        """
        Remember that C{count} more of an error were reported, and if
        C{listed}, C{(when, rate)}, that it was listed in full then.
        """
        seen = self._seen.pop(fingerprint, None)
        if seen is None:
            seen = Seen(first_seen, last_seen, count, *(listed or (0.0,)))
        else:
            seen.first_seen = min(seen.first_seen, first_seen)
            seen.last_seen = max(seen.last_seen, last_seen)
            seen.total += count
            if listed is not None:
                seen.last_reported, seen.rate = listed
        self._seen[fingerprint] = seen
        self._forget()

    def resize(self, max_size: int) -> None:
        """Take a new SEEN_MAX (a reload)."""
        self.max_size = max_size
        self._forget()

    def _forget(self) -> None:
        while len(self._seen) > self.max_size:
            del self._seen[next(iter(self._seen))]

    def rows(self) -> list:
        """The memory as the file holds it, oldest first."""
        return [[fingerprint, seen.first_seen, seen.last_seen, seen.total,
                 seen.last_reported, seen.rate] for fingerprint, seen
                in self._seen.items()]

    def restore(self, rows: Iterable[list]) -> None:
        """Take rows as L{rows} gives them (checked), the newest kept."""
        for row in sorted(rows, key=lambda row: row[2]):
            fingerprint, first, last, total, reported, rate = row
            self._seen.pop(fingerprint, None)
            self._seen[fingerprint] = Seen(first, last, total, reported,
                                           rate)
        self._forget()


class SeenFile:
    """Where the seen-memory is kept between runs."""

    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, rows: list) -> None:
        """Replace the file with C{rows} (blocking: for the writer)."""
        replace_file(self.path, seen_document(rows))

    def read(self) -> list:
        """
        The rows kept, checked; none if there is no file, or if it is
        unusable: then it is set aside (C{.bad-<time>}) and logged.
        """
        try:
            data, size = read_entry(self.path, _MAX_FILE_BYTES)
        except (FileNotFoundError, NotADirectoryError):
            # None at all is no trouble; a directory that cannot hold one
            # is said when writing fails.
            return []
        except BadEntry as error:
            return self._set_aside(error)
        except OSError as error:
            _log.warn("Could not read the seen-memory {path} ({error}): "
                      "every error is new again", path=self.path,
                      error=error.strerror or error)
            return []
        try:
            if len(data) < size:
                raise ValueError(f"larger than any seen-memory "
                                 f"({size:,} bytes)")
            return seen_rows(data)
        except ValueError as error:
            return self._set_aside(error)

    def _set_aside(self, error: Exception) -> list:
        aside = move_aside(self.path)
        _log.warn("The seen-memory {path} is unusable ({error}); moved to "
                  "{aside}: every error is new again", path=self.path,
                  error=error, aside=aside)
        return []


def seen_document(rows: list) -> bytes:
    """The seen-memory's rows as its file, and the cluster, keep them."""
    return orjson.dumps({"version": _VERSION, "seen": rows})


def seen_rows(document: bytes) -> list:
    """The rows of a L{seen_document}, checked.  @raise ValueError: it is
    not one."""
    return _rows_of(orjson.loads(document))


def _rows_of(saved: object) -> list:
    """The rows of a file's JSON, checked.  @raise ValueError: not ours."""
    if type(saved) is not dict or saved.get("version") != _VERSION:
        raise ValueError("not a seen-memory of a known version")
    rows = saved.get("seen")
    if type(rows) is not list:
        raise ValueError("no list of errors")
    for row in rows:
        if not (type(row) is list and len(row) == 6
                and type(row[0]) is str
                and 0 < len(row[0]) <= _MAX_FINGERPRINT_CHARS
                and all(type(number) in (int, float)
                        and math.isfinite(number) and number >= 0
                        for number in (row[1], row[2], row[4], row[5]))
                and type(row[3]) is int and row[3] >= 0):
            raise ValueError(f"a bad row: {str(row)[:80]}")
    return rows
