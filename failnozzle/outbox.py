"""
Getting a message out: the L{Outbox} spools each message before the first
delivery attempt (in the disk writer's thread), retries with backoff, and
gives up only into C{failed/}; a message a server probably took without
saying so goes to C{unconfirmed/}, and one too big is cut.  The transports
it delivers with are in L{failnozzle.transport}.
"""
from __future__ import annotations

import enum
import math
import os
import re
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import SMTP, default as default_policy
from email.utils import getaddresses, parseaddr
from typing import Optional, Protocol, Sequence

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from failnozzle.config import Settings
from failnozzle.counts import Counts
from failnozzle.shrink import shrink, wire_size
from failnozzle.spool import BadEntry, Maildir, Spool, read_entry, written_at
from failnozzle.transport import (MessageTooBig, RecipientsRefused,
                                  UnconfirmedDelivery, describe_failure,
                                  is_permanent, root_error)
from failnozzle.writer import InlineWriter, Writer

_log = Logger()

#: What is read of a failed message to list it: its headers.
_HEADER_BYTES = 64 * 1024


def envelope(message: EmailMessage) -> tuple:
    """
    The bare addresses SMTP's MAIL FROM and RCPT TO want, from headers that
    may say C{Error Reporter <errors@example.com>}.
    """
    sender = parseaddr(str(message.get("From", "")))[1]
    recipients = [address for _, address in getaddresses(
        [str(message.get("To", ""))]) if address]
    return sender, recipients


#: An address as the settings take it (local@domain) in printable ASCII,
#: the only kind SMTP without SMTPUTF8 carries.
_PLAIN_ADDRESS = re.compile(r"[!-;=?A-~]+@[!-;=?A-~]+")


def _sendable(data: bytes) -> tuple:
    """
    A spooled message and its envelope, if it has one SMTP can carry.

    @return: C{(message, sender, recipients)}.
    @raise ValueError: it has no usable From or To header.
    """
    try:
        message = message_from_bytes(data, _class=EmailMessage, policy=SMTP)
        sender, recipients = envelope(message)
        kind = str(message["X-Failnozzle"])
    # The email package meets odd headers with many kinds of error; after
    # a restart the spool may hold anything.
    except Exception as error:
        raise ValueError(f"its headers cannot be read ({error!r})") from None
    for name, addresses in (("From", [sender]), ("To", recipients)):
        if not addresses or not all(_PLAIN_ADDRESS.fullmatch(address)
                                    for address in addresses):
            raise ValueError(f"it has no usable {name} header")
    if not kind.isprintable():
        raise ValueError("its X-Failnozzle header is not text")
    return message, sender, recipients


class _State(enum.Enum):
    SPOOLING = "being written to the spool"
    READY = "waiting for its next attempt"
    SENDING = "in the middle of an attempt"
    FINISHING = "delivered or given up on, its file being moved"


@dataclass(frozen=True)
class Sending:
    """
    What becomes of a message handed to the outbox.

    @ivar spooled: fires with True once it is on disk, False if the spool
        could not take it (it waits in memory then, and is delivered all
        the same); never fails.
    @ivar outcome: fires with True once it is delivered (or probably
        delivered, see L{Outbox}), False once it is given up on into
        C{failed/}; never fails.
    """

    spooled: defer.Deferred
    outcome: defer.Deferred


@dataclass(eq=False)
class _Waiting:
    """
    A message the outbox is responsible for until it is delivered or given
    up on.

    @ivar data: the message as spooled, with LF line ends.
    @ivar path: its file in the spool; None while it is being written, or
        if the spool could not take it and it waits in memory only.
    @ivar recipients: the addresses it is still to reach: at first those
        of its To header, then those a server refused while taking it for
        the others.
    @ivar offered: what is offered to the server: C{data}, or C{data} cut
        (to DIGEST_MAX_BYTES, or after a server refused it for its size);
        None until the first attempt.
    @ivar failures: attempts that failed for a reason worth a wait (the
        backoff doubles with each).
    @ivar unconfirmed: attempts whose end the server never answered.
    @ivar successor: the message that replaced this one (L{Outbox.replace}).
    @ivar replacing: the message to replace this one if the attempt under
        way fails and would be retried.
    @ivar replaced: the spool files of the messages this one replaced, to
        be removed once it is on disk or done with.
    @ivar followers: the outcomes of the messages this one replaced, to
        fire with its own.
    """

    message: EmailMessage
    data: bytes
    created: float
    sender: str
    recipients: list
    path: Optional[str] = None
    state: _State = _State.SPOOLING
    attempts: int = 0
    failures: int = 0
    unconfirmed: int = 0
    offered: Optional[bytes] = None
    attempt: Optional[defer.Deferred] = None
    retry: Optional[IDelayedCall] = None
    successor: Optional[_Waiting] = None
    replacing: Optional[_Waiting] = None
    replaced: list = field(default_factory=list)
    followers: list = field(default_factory=list)
    spooled: defer.Deferred = field(default_factory=defer.Deferred)
    outcome: defer.Deferred = field(default_factory=defer.Deferred)

    @property
    def kind(self) -> str:
        return str(self.message["X-Failnozzle"])

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    @property
    def message_id(self) -> str:
        return str(self.message["Message-ID"])


class Mirror(Protocol):
    """
    Where else the messages handed to the outbox are kept until they are
    done with, such as a cluster's Redis (L{failnozzle.cluster}): another
    node sends them if this one dies.
    """

    def keep_message(self, message_id: str, data: bytes) -> None:
        ...

    def drop_message(self, message_id: str) -> None:
        ...


def message_bytes(message: EmailMessage) -> bytes:
    """A message as the spool keeps it: bytes with LF line ends."""
    return message.as_bytes(policy=default_policy)


def _names(maildir: Maildir) -> list:
    """The file names of a maildir's messages, oldest first; none if it
    is not there."""
    try:
        return [os.path.basename(path) for path in maildir.messages()]
    except FileNotFoundError:
        return []


class Outbox(Service):
    """
    Never loses a message: each one is written to the spool before the
    first delivery attempt and removed only once the server accepted it.
    Temporary failures are retried with exponential backoff, from
    C{retry_min} up to C{retry_max} seconds, for at most C{lifetime}
    seconds; permanent failures and expired messages move to C{failed/}.

    A message whose whole content went out but whose end the server never
    answered may have been kept: it is tried C{unconfirmed_retries} more
    times, then moved to C{unconfirmed/} as probably delivered, its outcome
    True.  A message larger than C{max_bytes}, or than a server takes, is
    cut (see L{failnozzle.shrink}); one a server refuses for its size is
    cut to half that size and tried again at once.

    Every disk write goes through C{writer}, and every outcome is logged
    in one line.  As a service it sends what the last run left in the
    spool when it starts, and delivers for up to C{shutdown_timeout}
    seconds when it stops (see L{recover} and L{stop}).
    """

    def __init__(self, transport, spool: Spool, clock: IReactorTime,
                 retry_min: float = 30, retry_max: float = 1800,
                 lifetime: float = 5 * 24 * 3600,
                 writer: Optional[Writer] = None,
                 max_bytes: int = Settings.DIGEST_MAX_BYTES,
                 unconfirmed_retries: int = 2,
                 counts: Optional[Counts] = None,
                 shutdown_timeout: float = Settings.SHUTDOWN_TIMEOUT_SECONDS
                 ) -> None:
        """
        @param writer: writes the spool; by default at once, in the
            reactor's thread.
        @param counts: where deliveries and failures are counted.
        """
        self.counts = counts or Counts(0.0)
        self.spool = spool
        self._clock = clock
        self._writer = writer or InlineWriter()
        self._unconfirmed_retries = unconfirmed_retries
        self._waiting: list = []
        #: A stop began: no more retries.
        self._stopping = False
        #: The stop's wait is over: no more attempts at all.
        self._stopped = False
        self._settle_waiters: list = []
        #: Keeps the messages sent (not those recovered) elsewhere too.
        self.mirror: Optional[Mirror] = None
        self.configure(transport, retry_min, retry_max, lifetime, max_bytes,
                       shutdown_timeout)

    def configure(self, transport, retry_min: float, retry_max: float,
                  lifetime: float,
                  max_bytes: int = Settings.DIGEST_MAX_BYTES,
                  shutdown_timeout: float = Settings.SHUTDOWN_TIMEOUT_SECONDS
                  ) -> None:
        """
        Take new settings (a reload): the next attempts use C{transport},
        the new delays and size limit; messages waiting keep their place.
        """
        self.transport = transport
        self.shutdown_timeout = shutdown_timeout
        self._retry_min = retry_min
        self._retry_max = retry_max
        #: Past this many doublings the delay is retry_max anyway; capping
        #: the exponent keeps a long outage from overflowing a float.
        self._max_doublings = max(0, math.ceil(math.log2(
            retry_max / retry_min)))
        self._lifetime = lifetime
        self._max_bytes = max_bytes

    def waiting_kinds(self) -> set:
        """
        The kinds (X-Failnozzle) of the messages not delivered yet, those
        still being spooled included.
        """
        return {waiting.kind for waiting in self._waiting
                if waiting.state is not _State.FINISHING}

    def waiting_ids(self) -> set:
        """The Message-IDs of the messages not done with yet."""
        return {waiting.message_id for waiting in self._waiting}

    def waiting_since(self) -> list:
        """When each message not delivered yet was made (reactor time)."""
        return [waiting.created for waiting in self._waiting
                if waiting.state is not _State.FINISHING]

    def failed(self) -> list:
        """
        The messages given up on, in C{failed/}: their file names, oldest
        first.

        @raise OSError: the directory cannot be read.
        """
        return _names(self.spool.failed)

    def unconfirmed(self) -> list:
        """
        The messages probably delivered (the server never answered their
        end), in C{unconfirmed/}: their file names, oldest first.

        @raise OSError: the directory cannot be read.
        """
        return _names(self.spool.unconfirmed)

    def described_failed(self, name: str) -> dict:
        """
        What the control API lists of the message C{name} in C{failed/}
        or C{unconfirmed/}: its id, subject, recipients, size and when it
        was given up on (or set aside).
        """
        path = self._set_aside_path(name)
        described = {"id": name, "subject": None, "to": None, "bytes": None,
                     "failed_at": None}
        try:
            data, size = read_entry(path, _HEADER_BYTES)
            described.update(bytes=size, failed_at=os.stat(path).st_mtime)
        except (OSError, BadEntry):
            return described
        headers = message_from_bytes(data.split(b"\n\n", 1)[0],
                                     policy=default_policy)
        described.update(subject=str(headers.get("Subject", "")),
                         to=str(headers.get("To", "")))
        return described

    def _set_aside_path(self, name: str) -> str:
        """Where the message C{name} of failed/ or unconfirmed/ is."""
        failed = os.path.join(self.spool.failed.path, "new", name)
        if os.path.lexists(failed):
            return failed
        return os.path.join(self.spool.unconfirmed.path, "new", name)

    def resend(self, names: Optional[Sequence[str]] = None
               ) -> defer.Deferred:
        """
        Put messages given up on (by file name; all of C{failed/} if None)
        back into the spool and try to deliver them now; messages of
        C{unconfirmed/} only by name, since each was probably delivered.

        @return: a Deferred firing with the names taken back.
        @raise KeyError: a name is in neither.
        """
        present = self.failed()
        unknown = sorted(set(names or ()) - set(present)
                         - set(self.unconfirmed()))
        if unknown:
            raise KeyError(", ".join(unknown))
        chosen = present if names is None else list(dict.fromkeys(names))
        paths = [self._set_aside_path(name) for name in chosen]

        def take_back() -> list:
            # Each on its own: one gone already (a resend of the same at
            # once) leaves the others to be sent.
            moved = []
            for path in paths:
                try:
                    moved.append(self.spool.waiting.take(path))
                except FileNotFoundError:
                    continue
            return moved

        def taken(moved: list) -> list:
            for path in moved:
                waiting = self._recovered(path)
                if waiting is not None:
                    # As if just made: its lifetime starts again.
                    waiting.created = self._clock.seconds()
                    self._waiting.append(waiting)
                    waiting.spooled.callback(True)
                    self._attempt(waiting)
            _log.info("{count} message(s) taken back into the spool {path} "
                      "to be sent again", count=len(moved),
                      path=self.spool.path)
            return [os.path.basename(path) for path in moved]

        return self._writer.run(take_back).addCallback(taken)

    def recover(self) -> int:
        """
        Take on the messages a previous run left in the spool, and try to
        deliver them now.  An entry that is no message to send (not a
        regular file, unreadable, without a usable From or To) is moved to
        C{bad/} with one line in the log, and start-up goes on.

        @return: how many messages there were.
        """
        try:
            paths = self.spool.waiting.messages()
        except (FileNotFoundError, NotADirectoryError):
            # No spool, so nothing in it; the failure to create it was
            # reported when it happened.
            return 0
        except OSError as error:
            _log.error("Cannot read the spool {path}: {reason}",
                       path=self.spool.path, reason=error.strerror)
            return 0
        recovered = [waiting for waiting in map(self._recovered, paths)
                     if waiting is not None]
        if recovered:
            _log.info("{count} message(s) left in the spool {path} by the "
                      "last run will be sent now", count=len(recovered),
                      path=self.spool.path)
        for waiting in recovered:
            self._waiting.append(waiting)
            waiting.spooled.callback(True)
            self._attempt(waiting)
        return len(recovered)

    def _recovered(self, path: str) -> Optional[_Waiting]:
        """The message spooled at C{path}, or None if it is none."""
        try:
            data, size = read_entry(path, self._max_bytes)
            if size > len(data):
                data = shrink(data, self._max_bytes,
                              f"only {self._max_bytes:,} bytes of it were "
                              f"read back from the spool (DIGEST_MAX_BYTES)",
                              missing=size - len(data))
            message, sender, recipients = _sendable(data)
        except OSError as error:
            self._set_aside(path, f"cannot be read ({error.strerror})")
            return None
        except BadEntry as error:
            self._set_aside(path, f"is {error}")
            return None
        except ValueError as error:
            self._set_aside(path, f"is no message to send: {error}")
            return None
        return _Waiting(message, data, written_at(path), sender, recipients,
                        path=path, state=_State.READY)

    def _set_aside(self, path: str, why: str) -> None:
        def moved(where: str) -> None:
            _log.error("Spool entry {path} {why}: moved to {where}, and "
                       "nothing is sent for it", path=path, why=why,
                       where=where)

        def not_moved(failure: Failure) -> None:
            _log.error("Spool entry {path} {why}, and cannot be moved "
                       "aside: {reason}; nothing is sent for it", path=path,
                       why=why, reason=failure.value)

        self._writer.run(self.spool.set_aside, path).addCallbacks(
            moved, not_moved)

    def send(self, message: EmailMessage,
             data: Optional[bytes] = None) -> Sending:
        """
        Spool one message, then deliver it to the addresses in its To
        header, from the one in its From header.

        @param data: the message as bytes with LF line ends, if made
            already (off the reactor).
        """
        return self._sending(self._queue(message, data))

    def adopt(self, data: bytes) -> Sending:
        """
        Take on a message another process kept (a cluster's last leader):
        spooled and delivered as one handed to L{send}.

        @raise ValueError: it is no message to send.
        """
        message = _sendable(data)[0]
        return self.send(message, data)

    def replace(self, kind: str, message: EmailMessage) -> Sending:
        """
        Send C{message} instead of the messages of C{kind} still waiting:
        the pager alert that says it all, instead of one per window of an
        outage.  One in the middle of an attempt is replaced if that
        attempt fails.  Their files leave the spool once the new one is in
        it, and their outcomes fire with its own.
        """
        new = self._queue(message)
        for old in list(self._waiting):
            if old is new or old.kind != kind:
                continue
            if old.state in (_State.SPOOLING, _State.READY):
                self._supersede(old, new)
            elif old.state is _State.SENDING:
                old.replacing = new
        return self._sending(new)

    @staticmethod
    def _sending(waiting: _Waiting) -> Sending:
        return Sending(waiting.spooled, waiting.outcome)

    def _queue(self, message: EmailMessage,
               data: Optional[bytes] = None) -> _Waiting:
        if data is None:
            data = message_bytes(message)
        sender, recipients = envelope(message)
        waiting = _Waiting(message, data, self._clock.seconds(), sender,
                           recipients)
        self._waiting.append(waiting)
        if self.mirror is not None:
            self.mirror.keep_message(waiting.message_id, data)
        self._writer.run(self.spool.add, data).addCallbacks(
            self._spooled, self._not_spooled, callbackArgs=(waiting,),
            errbackArgs=(waiting,)).addErrback(
                lambda failure: _log.failure(
                    "Could not go on with {subject!r} once spooled", failure,
                    subject=waiting.subject))
        return waiting

    def _spooled(self, path: str, waiting: _Waiting) -> None:
        waiting.path = path
        waiting.spooled.callback(True)
        if waiting.successor is not None:
            self._hand_on(waiting)
            return
        self._remove_replaced(waiting)
        self._ready(waiting)

    def _not_spooled(self, failure: Failure, waiting: _Waiting) -> None:
        error = failure.value
        _log.error("Cannot write to the spool {spool}: {reason}; "
                   "{subject!r} waits in memory only",
                   spool=self.spool.path,
                   reason=getattr(error, "strerror", None) or error,
                   subject=waiting.subject)
        waiting.spooled.callback(False)
        if waiting.successor is None:
            self._ready(waiting)

    def _ready(self, waiting: _Waiting) -> None:
        waiting.state = _State.READY
        if self._stopped:
            self._settle()
        else:
            self._attempt(waiting)

    def _supersede(self, old: _Waiting, new: _Waiting) -> None:
        _log.info("{new!r} replaces {old!r}, not delivered yet",
                  new=new.subject, old=old.subject)
        if old.retry is not None:
            old.retry.cancel()
            old.retry = None
        self._waiting.remove(old)
        self._forget(old)
        old.successor = new
        new.followers += [old.outcome] + old.followers
        new.replaced += old.replaced
        old.followers, old.replaced = [], []
        if old.state is _State.READY:
            self._hand_on(old)

    def _hand_on(self, old: _Waiting) -> None:
        """Leave the spool file of a replaced message to its successor."""
        new = old.successor
        while new.successor is not None:
            new = new.successor
        if old.path is not None:
            new.replaced.append(old.path)
        if new.path is not None:
            # Safe on disk: the old files can go.  Else they go once it is
            # (or once it is done with, if the spool never took it).
            self._remove_replaced(new)

    def _remove_replaced(self, waiting: _Waiting) -> None:
        for path in waiting.replaced:
            self._writer.run(self.spool.remove, path).addErrback(
                self._not_removed, path)
        waiting.replaced = []

    def _attempt(self, waiting: _Waiting) -> None:
        waiting.retry = None
        waiting.state = _State.SENDING
        waiting.attempts += 1
        attempt = waiting.attempt = defer.maybeDeferred(
            self.transport.deliver, waiting.sender, waiting.recipients,
            waiting.message, self._cut(waiting))
        attempt.addCallbacks(self._delivered, self._failed,
                             callbackArgs=(waiting,), errbackArgs=(waiting,))

    def _cut(self, waiting: _Waiting) -> bytes:
        """What to offer: the message, cut to DIGEST_MAX_BYTES if need be."""
        if waiting.offered is None:
            try:
                waiting.offered = shrink(
                    waiting.data, self._max_bytes,
                    f"DIGEST_MAX_BYTES is {self._max_bytes:,}")
            except ValueError:
                # Offered whole: the server will say if it is too big.
                waiting.offered = waiting.data
        return waiting.offered

    def _delivered(self, result: object, waiting: _Waiting) -> None:
        waiting.attempt = None
        cut = ("" if waiting.offered is waiting.data else
               f", cut to {wire_size(waiting.offered):,} bytes")
        _log.info("Sent {subject!r} to {recipients} via {transport}"
                  "{where}{cut}",
                  subject=waiting.subject,
                  recipients=", ".join(waiting.recipients),
                  transport=self.transport.describe(),
                  where=f": {result}" if isinstance(result, str) else "",
                  cut=cut)
        self.counts.delivered(waiting.kind, self._clock.seconds())
        # At once: another node must not send it again.
        self._forget(waiting)
        waiting.state = _State.FINISHING
        self._settle()
        if waiting.path is None:
            self._finish(waiting, True)
            return
        removing = self._writer.run(self.spool.remove, waiting.path)
        removing.addErrback(self._not_removed, waiting.path)
        removing.addCallback(lambda _: self._finish(waiting, True))

    @staticmethod
    def _not_removed(failure: Failure, path: str) -> None:
        _log.error("Cannot remove {path} from the spool: {reason}; the next "
                   "start sends it again", path=path,
                   reason=getattr(failure.value, "strerror", None)
                   or failure.value)

    def _finish(self, waiting: _Waiting, outcome: bool) -> None:
        self._waiting.remove(waiting)
        self._remove_replaced(waiting)
        for done in [waiting.outcome] + waiting.followers:
            done.callback(outcome)
        self._settle()

    def _forget(self, waiting: _Waiting) -> None:
        if self.mirror is not None:
            self.mirror.drop_message(waiting.message_id)

    def _failed(self, failure: Failure, waiting: _Waiting) -> None:
        waiting.attempt = None
        waiting.state = _State.READY
        error = root_error(failure)
        if isinstance(error, RecipientsRefused):
            # The others have it; only those refused are to be tried again.
            waiting.recipients = [address for address, _, _
                                  in error.refused]
        reason = describe_failure(failure,
                                  getattr(self.transport, "timeout", 0))
        now = self._clock.seconds()
        age = now - waiting.created
        if isinstance(error, MessageTooBig):
            self.counts.not_delivered("too_big", reason, now)
            self._too_big(waiting, error, reason)
        elif is_permanent(failure):
            self.counts.not_delivered("permanent", reason, now)
            self._give_up(waiting, reason)
        elif age >= self._lifetime:
            self.counts.not_delivered("expired", reason, now)
            self._give_up(waiting, f"{reason}; still undelivered after "
                                   f"{age:.0f} s (SPOOL_LIFETIME_SECONDS)")
        elif isinstance(error, UnconfirmedDelivery):
            self.counts.not_delivered("unconfirmed", reason, now)
            if waiting.unconfirmed >= self._unconfirmed_retries:
                self._probably_delivered(waiting, reason)
            else:
                waiting.unconfirmed += 1
                self._retry_later(waiting, reason, age)
        else:
            self.counts.not_delivered("temporary", reason, now)
            self._retry_later(waiting, reason, age)

    def _retry_later(self, waiting: _Waiting, reason: str,
                     age: float) -> None:
        if waiting.replacing is not None and (
                waiting.replacing in self._waiting):
            _log.warn("Could not send {subject!r} via {transport}: "
                      "{reason}", subject=waiting.subject,
                      transport=self.transport.describe(), reason=reason)
            self._supersede(waiting, waiting.replacing)
            return
        if self._stopping:
            self._stays(waiting, reason)
            return
        waiting.failures += 1
        doublings = min(waiting.failures - 1, self._max_doublings)
        delay = min(self._retry_min * 2 ** doublings, self._retry_max,
                    self._lifetime - age)
        _log.warn("Could not send {subject!r} to {recipients} via "
                  "{transport}: {reason}; attempt {attempt}, next in "
                  "{delay:g} s",
                  subject=waiting.subject,
                  recipients=", ".join(waiting.recipients),
                  transport=self.transport.describe(), reason=reason,
                  attempt=waiting.attempts, delay=delay)
        waiting.retry = self._clock.callLater(delay, self._attempt, waiting)

    def _stays(self, waiting: _Waiting, reason: str) -> None:
        """A stop is under way: the message waits for the next start."""
        _log.warn("Could not send {subject!r} via {transport}: {reason}; "
                  "{where}", subject=waiting.subject,
                  transport=self.transport.describe(), reason=reason,
                  where="it stays in the spool for the next start"
                  if waiting.path else "it could not be spooled, so it "
                  "ends with this run")
        self._settle()

    def _too_big(self, waiting: _Waiting, error: MessageTooBig,
                 reason: str) -> None:
        """Cut the message to half the size refused, and try again now."""
        limit = error.sent // 2
        try:
            waiting.offered = shrink(
                waiting.data, limit, f"the mail server refused "
                                     f"{error.sent:,} bytes of it as too big")
        except ValueError as why:
            self._give_up(waiting, f"{reason}; it cannot be cut to {limit:,} "
                                   f"bytes: {why}")
            return
        if self._stopping:
            self._stays(waiting, reason)
            return
        _log.warn("Could not send {subject!r} via {transport}: {reason}; "
                  "sending it cut to {size:,} bytes now",
                  subject=waiting.subject,
                  transport=self.transport.describe(), reason=reason,
                  size=wire_size(waiting.offered))
        waiting.retry = self._clock.callLater(0, self._attempt, waiting)

    def _give_up(self, waiting: _Waiting, why: str) -> None:
        def kept(where: str) -> None:
            _log.error("Giving up on {subject!r} to {recipients} via "
                       "{transport}: {why}; the message is kept in {where}",
                       subject=waiting.subject,
                       recipients=", ".join(waiting.recipients),
                       transport=self.transport.describe(), why=why,
                       where=where)
            self._finish(waiting, False)

        self._keep(waiting, self.spool.give_up, self.spool.failed, kept)

    def _probably_delivered(self, waiting: _Waiting, reason: str) -> None:
        def kept(where: str) -> None:
            _log.warn("{subject!r} to {recipients} via {transport} is "
                      "probably delivered: {reason}, {count} times, so it is "
                      "not sent again; the message is kept in {where}",
                      subject=waiting.subject,
                      recipients=", ".join(waiting.recipients),
                      transport=self.transport.describe(), reason=reason,
                      count=waiting.unconfirmed + 1, where=where)
            self._finish(waiting, True)

        self._keep(waiting, self.spool.set_unconfirmed,
                   self.spool.unconfirmed, kept)

    def _keep(self, waiting: _Waiting, move, maildir: Maildir,
              kept) -> None:
        """Move a message done with into C{maildir}, then call C{kept}."""
        def not_kept(failure: Failure) -> str:
            return (f"nowhere: {maildir.path} cannot be written "
                    f"({getattr(failure.value, 'strerror', failure.value)}); "
                    f"the message follows\n"
                    f"{waiting.data.decode('utf-8', 'replace')}")

        waiting.state = _State.FINISHING
        self._forget(waiting)
        self._settle()
        moving = self._writer.run(move, waiting.path, waiting.data)
        moving.addErrback(not_kept).addCallback(kept)

    def startService(self) -> None:
        super().startService()
        self.recover()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self.stop(self.shutdown_timeout)

    def stop(self, timeout: float) -> defer.Deferred:
        """
        Stop retrying, and give the messages being spooled and the
        attempts under way up to C{timeout} seconds; what is not delivered
        by then stays in the spool.

        @return: a Deferred firing when that is done.
        """
        self._stopping = True
        for waiting in self._waiting:
            if waiting.retry is not None:
                waiting.retry.cancel()
                waiting.retry = None
        done = defer.Deferred(self._settle_waiters.remove)
        self._settle_waiters.append(done)
        self._settle()
        done.addTimeout(timeout, self._clock)
        done.addErrback(lambda failure: failure.trap(defer.TimeoutError))
        done.addCallback(self._cancel_attempts)
        return done

    def _settle(self) -> None:
        """Tell the stop once nothing is being spooled or sent."""
        if self._settle_waiters and not any(
                waiting.state in (_State.SPOOLING, _State.SENDING)
                for waiting in self._waiting):
            waiters, self._settle_waiters = self._settle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _cancel_attempts(self, _: object) -> None:
        self._stopped = True
        spooled = sum(waiting.path is not None for waiting in self._waiting)
        lost = len(self._waiting) - spooled
        for waiting in list(self._waiting):
            if waiting.attempt is not None:
                waiting.attempt.cancel()
        if spooled:
            _log.info("{count} message(s) not delivered stay in the spool "
                      "{path} for the next start", count=spooled,
                      path=self.spool.path)
        if lost:
            _log.error("{count} message(s) not delivered and not in the "
                       "spool {path} (it could not be written) are lost",
                       count=lost, path=self.spool.path)
