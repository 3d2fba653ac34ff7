"""
SILENCES: known, accepted errors kept out of the mail and the pager until a
time, and still counted.  Some come from the config; others are added and
removed while the daemon runs (failnozzle-ctl silence, the control API) and
kept in STATE_FILE.silences across restarts.  They match as ROUTES' rules
do (failnozzle.routing), once per flush.
"""
from __future__ import annotations

import datetime
import hashlib
import secrets
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Protocol, Sequence

import orjson

if TYPE_CHECKING:  # failnozzle-send imports this, and never Twisted
    from twisted.internet.defer import Deferred

from failnozzle.routing import (BadRule, Rule, check_keys, matcher_of, route,
                                unknown_fields)
from failnozzle.spool import BadEntry, move_aside, read_entry, replace_file

#: At most this many silences, and this long a comment.
MAX_SILENCES = 200
MAX_COMMENT_CHARS = 500
#: The longest silence added at run time, as JSON: the file of them all
#: stays within what is read back (L{_MAX_FILE_BYTES}).
MAX_SILENCE_BYTES = 16 * 1024
_MAX_FILE_BYTES = 2 * MAX_SILENCES * MAX_SILENCE_BYTES
#: The keys a silence may have.
SILENCE_KEYS = ("match", "until", "comment")
#: The longest a silence added at run time may be asked to last ("for").
MAX_FOR_SECONDS = 100 * 366 * 86400
_FORMAT = 1


@dataclass(frozen=True)
class Silence:
    """
    One silence.

    @ivar given: its C{match} as given, to show and to keep.
    @ivar until: when it ends (wall-clock seconds).
    @ivar origin: C{"config"} (SILENCES) or C{"control"} (added at run
        time, kept in the silences file).
    """

    id: str
    rule: Rule
    given: dict
    until: float
    comment: str
    origin: str

    def shown(self, silenced: int) -> dict:
        """As the status and the control API show it."""
        return {"id": self.id, "match": self.given,
                "until": _iso(self.until), "comment": self.comment,
                "origin": self.origin, "silenced": silenced}


def parse_silence(where: str, given: object, origin: str,
                  silence_id: Optional[str] = None) -> Silence:
    """
    A silence from its dict: C{match} (as a route's), C{until} (an ISO
    8601 time with its zone, such as C{'2027-01-31T00:00:00Z'}, or
    seconds since the epoch) and C{comment}.

    @raise BadRule: it cannot be used; the message names C{where}.
    """
    check_keys(where, given, SILENCE_KEYS, "a silence")
    comment = given.get("comment", "")
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT_CHARS \
            or not comment.isprintable():
        raise BadRule(f"{where}: 'comment' must be printable text of at "
                      f"most {MAX_COMMENT_CHARS} characters")
    silence_id = silence_id or secrets.token_hex(4)
    matcher = matcher_of(where, given.get("match"))
    return Silence(silence_id, Rule(silence_id, matcher, ()),
                   dict(given["match"]), _until(where, given.get("until")),
                   comment, origin)


def config_silences(setting: str, value: object) -> tuple:
    """The silences of the SILENCES setting (their ids by position)."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or len(value) > MAX_SILENCES:
        raise BadRule(f"{setting} must be a list of at most "
                      f"{MAX_SILENCES:,} silences (dicts)")
    return tuple(parse_silence(f"{setting}[{number}]", given, "config",
                               "config-" + _digest_of(given))
                 for number, given in enumerate(value))


def _digest_of(given: dict) -> str:
    """A config silence's id: made of what it says, so a reload that
    moves it keeps its id (and its count), one that changes it does not."""
    return hashlib.blake2b(repr(sorted(given.items())).encode(
        "utf-8", "surrogatepass"), digest_size=4).hexdigest()


def _until(where: str, value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            raise BadRule(f"{where}: 'until' is out of range") from None
    elif isinstance(value, str):
        try:
            moment = datetime.datetime.fromisoformat(
                value.strip().replace("Z", "+00:00"))
        except ValueError:
            moment = None
        if moment is None or moment.tzinfo is None:
            raise BadRule(f"{where}: 'until' must be a time with its zone, "
                          f"such as '2027-01-31T00:00:00Z', not {value!r}")
        seconds = moment.timestamp()
    else:
        raise BadRule(f"{where} needs 'until': when it ends, such as "
                      f"'2027-01-31T00:00:00Z'")
    if not 0 < seconds < 253402300800:  # year 10000
        raise BadRule(f"{where}: 'until' is out of range")
    return seconds


def _ending(given: object, now: float) -> object:
    """
    A silence added at run time, its C{for} (seconds from C{now}, the
    daemon's wall clock: the client's may be off) made its C{until}.
    """
    if not (isinstance(given, dict) and "for" in given):
        return given
    seconds = given["for"]
    if "until" in given:
        raise BadRule("the silence gives both 'until' and 'for': one")
    if not (isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
            and 0 < seconds <= MAX_FOR_SECONDS):
        raise BadRule(f"the silence's 'for' must be seconds, more than 0 "
                      f"and at most {MAX_FOR_SECONDS:,} (100 years)")
    ending = {name: value for name, value in given.items() if name != "for"}
    ending["until"] = now + seconds
    return ending


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(
        seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class SharedSilences(Protocol):
    """Where the silences added at run time are shared with other nodes
    (a cluster's Redis, L{failnozzle.cluster})."""

    def keep_silence(self, silence_id: str, row: dict) -> Deferred:
        """A Deferred failing if it was not kept."""

    def drop_silence(self, silence_id: str) -> Deferred:
        """A Deferred failing if it was not dropped."""


class Silences:
    """
    The silences in force: the config's, and those added at run time.

    @ivar silenced: by silence id, the instances it kept out so far.
    """

    def __init__(self, path: Optional[str], write: Callable, log) -> None:
        """
        @param path: where the added ones are kept (None: not kept).
        @param write: runs a blocking write (the disk writer).
        @param log: a Logger.
        """
        self._path = path
        self._write = write
        self._log = log
        self._configured: tuple = ()
        self._added: dict = {}
        self.silenced: Counter = Counter()
        #: The silences whose end the log has told.
        self._said_over: set = set()
        #: Shares the added ones with the other nodes of a cluster.
        self.shared: Optional[SharedSilences] = None
        #: Silences added (or removed: None) here that the cluster has not
        #: taken yet: they stand over what it says, and are sent again.
        self._unshared: dict = {}

    def configure(self, configured: Sequence[Silence],
                  path: Optional[str]) -> None:
        """A start's or a reload's SILENCES and silences file."""
        self._configured = tuple(configured)
        self._path = path

    def all(self) -> list:
        return [*self._configured, *self._added.values()]

    def shown(self) -> list:
        return [silence.shown(self.silenced[silence.id])
                for silence in self.all()]

    def in_force(self, now: float) -> list:
        """The silences not yet over at C{now} (wall-clock); those over
        are said in the log, once, and the added ones forgotten."""
        for silence in self.all():
            if silence.until > now or silence.id in self._said_over:
                continue
            self._said_over.add(silence.id)
            self._log.info("Silence {id} ({comment}) is over; it kept "
                           "{count} errors out of the mail", id=silence.id,
                           comment=silence.comment or "no comment",
                           count=self.silenced[silence.id])
            if self._added.pop(silence.id, None) is not None:
                self._save()
                self._share(silence.id, None)
        return [silence for silence in self.all() if silence.until > now]

    def add(self, given: object, now: float,
            fields: Sequence[str]) -> Silence:
        """
        Add a silence at run time (kept across restarts), which may match
        on C{fields} (UNIQUE_MSG_TUPLE's), source, level and fingerprint.

        @raise BadRule: it cannot be used, or there are too many.
        """
        if len(self._added) + len(self._configured) >= MAX_SILENCES:
            raise BadRule(f"there are {MAX_SILENCES:,} silences already")
        silence = parse_silence("the silence", _ending(given, now),
                                "control")
        if silence.until <= now:
            raise BadRule("the silence would be over already")
        if len(orjson.dumps(silence.given)) > MAX_SILENCE_BYTES:
            raise BadRule(f"the silence's match is longer than "
                          f"{MAX_SILENCE_BYTES:,} bytes")
        for _, name in unknown_fields([silence.rule], fields):
            raise BadRule(f"the silence matches on {name!r}, which is not "
                          f"in UNIQUE_MSG_TUPLE (nor source, level, "
                          f"fingerprint)")
        self._added[silence.id] = silence
        self._save()
        self._share(silence.id, silence)
        return silence

    def remove(self, silence_id: str) -> Silence:
        """
        @raise KeyError: no silence added at run time has that id (those
            of the config go with the config).
        """
        silence = self._added.pop(silence_id)
        self._save()
        self._share(silence_id, None)
        return silence

    def _share(self, silence_id: str, silence: Optional[Silence]) -> None:
        """Tell the cluster, if any, of a silence added or removed
        (None) here; until it has taken it, this stands."""
        if self.shared is None:
            return
        again = self._unshared.get(silence_id, False) is silence
        self._unshared[silence_id] = silence
        if silence is None:
            sending = self.shared.drop_silence(silence_id)
        else:
            sending = self.shared.keep_silence(silence_id, _row(silence))

        def taken(_: object) -> None:
            if self._unshared.get(silence_id, False) is silence:
                del self._unshared[silence_id]

        def not_taken(failure) -> None:
            if not again:
                self._log.warn("Could not share silence {id} with the "
                               "cluster ({error}); it holds here, and is "
                               "sent again while Redis answers",
                               id=silence_id, error=failure.value)

        sending.addCallbacks(taken, not_taken)

    def take_shared(self, rows: Sequence[dict]) -> None:
        """
        Take the added silences of the cluster instead of this node's: the
        rows other nodes kept (as L{_save} writes them), with the changes
        made here it has not taken yet (sent again); one that cannot be
        read is said and left out.
        """
        added = {}
        for row in list(rows)[:MAX_SILENCES]:
            try:
                silence = _silence_of(row)
            except (ValueError, AttributeError) as error:
                self._log.warn("A silence shared in the cluster cannot be "
                               "read ({error}); left out", error=error)
                continue
            added[silence.id] = silence
        for silence_id, silence in list(self._unshared.items()):
            if silence is None:
                added.pop(silence_id, None)
            else:
                added[silence_id] = silence
            self._share(silence_id, silence)
        if added.keys() != self._added.keys():
            self._added = added
            self._save()

    def split(self, entries: Sequence, fields: Sequence[str],
              now: float) -> tuple:
        """
        C{(silenced, rest)} of a flush's C{entries}: C{(silence, entries)}
        for each silence in force that matched some (counted for it), and
        the entries none matched.
        """
        silences = self.in_force(now)
        if not silences:
            return [], list(entries)
        by_rule = {silence.rule.kind: silence for silence in silences}
        routed, rest = route(entries, [s.rule for s in silences], fields)
        silenced = []
        for kind, matched in routed.items():
            silence = by_rule[kind]
            self.silenced[silence.id] += sum(e.total for e in matched)
            silenced.append((silence, matched))
        return silenced, rest

    def load(self) -> None:
        """Take the added silences the file keeps; one it cannot read is
        said in one line and set aside."""
        if self._path is None:
            return
        try:
            data, _ = read_entry(self._path, _MAX_FILE_BYTES)
        except (FileNotFoundError, NotADirectoryError):
            return
        except BadEntry as error:
            self._set_aside(error)
            return
        except OSError as error:
            self._log.warn("Cannot read the silences in {path}: {error}",
                           path=self._path, error=error.strerror or error)
            return
        try:
            saved = orjson.loads(data)
            if not (isinstance(saved, dict) and saved.get("version")
                    == _FORMAT and isinstance(saved.get("silences"), list)):
                raise ValueError("not a silences file")
            for row in saved["silences"][:MAX_SILENCES]:
                silence = _silence_of(row)
                self._added[silence.id] = silence
        except (ValueError, AttributeError) as error:
            self._added = {}
            self._set_aside(error)

    def _set_aside(self, error: Exception) -> None:
        self._log.error("The silences in {path} cannot be read ({error}); "
                        "set aside as {aside}", path=self._path, error=error,
                        aside=move_aside(self._path))

    def _save(self) -> None:
        if self._path is None:
            return
        rows = [_row(silence) for silence in self._added.values()]
        path = self._path
        writing = self._write(replace_file, path, orjson.dumps(
            {"version": _FORMAT, "silences": rows}))
        writing.addErrback(lambda failure: self._log.error(
            "Cannot keep the silences in {path}: {error}; they hold until "
            "the next stop", path=path, error=failure.value))


def _row(silence: Silence) -> dict:
    """An added silence as its file, and a cluster, keep it."""
    return {"id": silence.id, "match": silence.given,
            "until": silence.until, "comment": silence.comment}


def _silence_of(row: dict) -> Silence:
    """The silence of a L{_row}.  @raise ValueError: it is none."""
    return parse_silence("a kept silence", {name: row.get(name)
                                            for name in SILENCE_KEYS},
                         "control", str(row.get("id"))[:32])
