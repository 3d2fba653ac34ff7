"""
Cluster mode (CLUSTER_URL): many nodes, one digest, through one Redis or
Valkey server (see L{failnozzle.redisstore} for its keys).

Each node counts on its hot path as a single node does, and every
SNAPSHOT_SECONDS pushes what it counted since its last push: the changed
errors only, their key texts once.  A push that fails is retried as it
was, with its sequence number, so Redis takes it once however often it is
retried, and the node counts the next one meanwhile.  One node holds the
flush lease; at each flush it takes every push since its last flush (a new
period begins), merges them and sends the digests as a single node would,
then commits: the pushes merged are gone and what it decides by (held
errors, the pager, the canaries, the seen-memory) is kept for whoever
holds the lease next; its own pushes made while it leads it takes from
memory (L{failnozzle.ownpushes}) instead of reading them back.  A node
that loses Redis for CLUSTER_GRACE_SECONDS sends digests of its own, of
what it did not push.

Every call to Redis runs in one thread of the node's own, in the order
made: a message kept in the outbox is in Redis before the commit that
forgets the pushes it reports.
"""
from __future__ import annotations

import os
import socket
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import orjson
import redis
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from failnozzle.aggregate import Batch
from failnozzle.ownpushes import OwnPushes
from failnozzle.redisstore import Lease, LeaseLost, RedisStore
from failnozzle.seen import seen_document, seen_rows
from failnozzle.state import (State, key_of_text, parse_shared, read_shared,
                              shared_document, shared_key_ids)

_log = Logger()

#: How long Redis keeps a key text no push or commit has named.
KEY_SECONDS = 7 * 24 * 3600


def node_name() -> str:
    """This run's name in the cluster: the host's, and a part of its own
    (a restarted node is a new one, its pushes numbered anew)."""
    return f"{socket.gethostname()}-{os.urandom(3).hex()}"


@dataclass
class _Push:
    """What a node counted and has not seen Redis take yet."""

    seq: int
    batch: Batch
    document: bytes
    #: Every key the document names, its text by id.
    texts: dict
    #: The texts to send with it: at first those not sent before.
    sending: dict = field(default_factory=dict)
    #: Whether Redis did not answer it once: it waits for Redis.
    unanswered: bool = False


@dataclass
class Merged:
    """What the leader took from Redis for a flush."""

    periods: list
    batch: Batch
    #: Pushes that could not be read (logged), and so are not in C{batch}.
    unusable: int = 0
    #: The entries of C{batch} that are bad input, as each push said.
    bad_input: tuple = ()


class _Recent(OrderedDict):
    """A mapping of at most C{size} items, the least recently put
    forgotten first."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key: object, value: object) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


#: A shared document as the cluster's thread parsed it, or what is wrong
#: with it (said when it is read, on the reactor).
_Parsed = Union[dict, ValueError]


def _parsed(document: bytes) -> _Parsed:
    try:
        return parse_shared(document)
    except ValueError as error:
        return error


def _parsed_unless_own(document: bytes, own: set) -> Union[bytes, _Parsed]:
    """
    C{document} parsed, unless it is one of C{own}, the leader's pushes in
    its memory: then left as it is, and taken out of C{own} (the same
    bytes twice in Redis are two pushes, the second read back).
    """
    if document in own:
        own.discard(document)
        return document
    return _parsed(document)


class ClusterNode:
    """
    One node's part in a cluster: its pushes, the lease, and, while it
    holds the lease, the merge and commit around its flushes.

    @ivar leader: whether this node holds the flush lease, as of its last
        renewal.
    @ivar holder: the name of the node that held the lease when last
        asked, if any.
    @ivar connected: whether the last call to Redis worked; None before
        the first.
    """

    #: What a lease change is, as L{keep_lease} tells it.
    TOOK, LOST = "took", "lost"

    def __init__(self, store: RedisStore, reactor, name: str,
                 lease_seconds: float, grace_seconds: float,
                 fields: tuple, wall_offset: Callable[[], float],
                 max_unique: int, max_sources: int) -> None:
        self._store = store
        self._reactor = reactor
        self.name = name
        self.lease_seconds = lease_seconds
        self.grace_seconds = grace_seconds
        self._wall_offset = wall_offset
        #: Key ids known to be in Redis, and key by id, as read back.
        self._stored = _Recent(0)
        self._keys = _Recent(0)
        #: This node's pushes since its last merge, while it leads.
        self._own = OwnPushes(0)
        self.configure(fields, max_unique, max_sources)
        self._pool = ThreadPool(1, 1, name="failnozzle-cluster")
        #: Periods merged into a digest whose commit failed: in Redis
        #: still, not to be merged again.
        self._uncommitted: set = set()
        #: Delivered digests Redis did not forget when told.
        self._undropped: set = set()
        self._seq = 0
        self._pending: Optional[_Push] = None
        #: One push at a time, the stop after them.
        self._pushing = defer.DeferredLock()
        self.token: Optional[str] = None
        self._renewed: Optional[float] = None
        self.holder: Optional[str] = None
        self.connected: Optional[bool] = None
        self._unreachable_since: Optional[float] = None
        self.last_push: Optional[float] = None
        #: The periods merged by the last flush, their pushes, and of
        #: those how many were this node's, taken from its memory.
        self.last_merged: tuple = (0, 0, 0)
        #: Whether the node stops, and whether, Redis not answering then,
        #: the calls still queued for it fail at once instead of each
        #: waiting out the timeout (read in the cluster's thread).
        self._stopping = False
        self._given_up = False

    def configure(self, fields: tuple, max_unique: int,
                  max_sources: int) -> None:
        """Take new settings (a reload)."""
        self._fields = fields
        self._max_unique = max_unique
        self._max_sources = max_sources
        self._stored.size = self._keys.size = max(10_000, 4 * max_unique)
        self._own.limit = max_unique
        # Kept with the fields before, perhaps: read back from Redis, and
        # re-keyed, instead.
        self._own.forget()

    def start(self) -> None:
        self._pool.start()
        # Its thread must not keep the process alive if the reactor stops
        # without the service's stop (which calls L{stop} first).
        self._reactor.addSystemEventTrigger("after", "shutdown",
                                            self._stop_pool)

    def _stop_pool(self) -> None:
        if self._pool.started:
            self._pool.callInThread(self._store.close)
            self._pool.stop()

    def stopping(self) -> None:
        """
        The node begins its clean stop: if Redis does not answer now, or
        stops answering during the stop, nothing more waits for it, so a
        stop takes one timeout at most on Redis' account, not one for each
        call queued behind it (what Redis does not take is flushed here).
        """
        self._stopping = True
        if self.connected is False:
            self._give_up()

    def _give_up(self) -> None:
        if not self._given_up:
            self._given_up = True
            _log.warn("Cluster node {name} stops without Redis, which does "
                      "not answer: what it counted is sent from here",
                      name=self.name)

    def stop(self) -> defer.Deferred:
        """Give up the lease if held (after the push under way), then close
        the connection and the thread."""
        def release() -> Optional[defer.Deferred]:
            token, self.token = self.token, None
            if token is None:
                return None
            return self._call(self._store.release_lease, token).addErrback(
                lambda failure: failure.trap(redis.RedisError))

        return self._pushing.run(release).addBoth(
            lambda _: self._stop_pool())

    @property
    def leader(self) -> bool:
        # A lease renewed this long ago may have run out in Redis.
        return self.token is not None and (
            self._reactor.seconds() - self._renewed
            < self.lease_seconds * 2 / 3)

    @property
    def alone(self) -> bool:
        """Whether Redis has been unreachable for the grace period: this
        node sends digests of its own."""
        since = self._unreachable_since
        return since is not None and (self._reactor.seconds() - since
                                      >= self.grace_seconds)

    @property
    def unpushed(self) -> int:
        """Errors counted in the push Redis has not taken yet."""
        return 0 if self._pending is None else self._pending.batch.total

    @property
    def unreachable_since(self) -> Optional[float]:
        """Since when (reactor time) Redis does not answer, if it does
        not."""
        return self._unreachable_since

    def waiting(self) -> Batch:
        """
        The push that waits for Redis (it did not answer it), for the
        snapshot: a node killed meanwhile reports it at its next start
        (at least once: Redis may have taken it without saying so).
        """
        pending = self._pending
        return (pending.batch if pending is not None and pending.unanswered
                else Batch())

    def take_unpushed(self) -> Batch:
        """
        The push Redis has not taken, taken back to be sent from here (a
        stop while Redis does not answer): reported at least once, though
        Redis may have taken it without saying so.
        """
        pending, self._pending = self._pending, None
        return Batch() if pending is None else pending.batch

    def _call(self, function: Callable, *args: object) -> defer.Deferred:
        """Run a store call that writes in the cluster's thread, and note
        whether Redis answered."""
        calling = self._in_thread(function, *args)
        calling.addCallbacks(self._answered, self._not_answered)
        return calling

    def _call_reading(self, function: Callable,
                      *args: object) -> defer.Deferred:
        """
        Run a store call that only reads: a failure is noted, an answer
        is not taken as Redis answering, which only a write proves (a
        Redis out of memory refuses writes, not reads).
        """
        calling = self._in_thread(function, *args)
        calling.addErrback(self._not_answered)
        return calling

    def _in_thread(self, function: Callable,
                   *args: object) -> defer.Deferred:
        # A stopped (or never started) pool would never call back.
        if not self._pool.started or self._pool.joined:
            return defer.fail(redis.ConnectionError(
                "the cluster's thread is not running"))
        return threads.deferToThreadPool(self._reactor, self._pool,
                                         self._unless_given_up, function,
                                         *args)

    def _unless_given_up(self, function: Callable, *args: object) -> object:
        # In the cluster's thread, for a call queued before the stop gave
        # up on Redis.
        if self._given_up:
            raise redis.ConnectionError("not asked: the node stops and "
                                        "Redis does not answer")
        return function(*args)

    def _answered(self, result: object) -> object:
        if self.connected is False:
            _log.info("Redis answers again (cluster {name}); merging "
                      "again", name=self.name)
        self.connected = True
        self._unreachable_since = None
        return result

    def _not_answered(self, failure: Failure) -> Failure:
        if failure.check(redis.RedisError):
            if self.connected is not False:
                _log.error("Redis is unreachable from cluster node {name}, "
                           "or refuses it: {error}; counting here, and after "
                           "CLUSTER_GRACE_SECONDS = {grace:g} s sending "
                           "digests of its own", name=self.name,
                           error=failure.value, grace=self.grace_seconds)
                self._unreachable_since = self._reactor.seconds()
            self.connected = False
            if self._stopping:
                self._give_up()
        return failure

    def push(self, take: Callable[[], State]) -> defer.Deferred:
        """
        Push what C{take} gives (what was counted since: its buffer, and
        the entries of it that are bad input), once the push
        under way is done, unless a push Redis has not taken yet is
        retried first: then what is counted waits for the next one.  Never
        fails: a failure is what L{connected} says.

        @return: a Deferred firing once Redis took it, or did not.
        """
        return self._pushing.run(self._push, take)

    def _push(self, take: Callable[[], State]) -> defer.Deferred:
        if self._pending is None:
            counted = take()
            if not counted.buffer:
                return defer.succeed(None)
            self._pending = self._push_of(counted)
        pending = self._pending

        def answered(missing: Optional[list]) -> Optional[defer.Deferred]:
            if missing is None:
                for key_id in pending.texts:
                    self._stored.put(key_id, True)
                self._pending = None
                self.last_push = self._reactor.seconds()
                return None
            # Redis lost some (restarted, or they expired): all sent
            # again, so the answer is not missing ones once more.
            pending.sending = dict(pending.texts)
            return self._send(pending).addCallback(answered)

        def not_answered(failure: Failure) -> None:
            failure.trap(redis.RedisError)
            pending.unanswered = True

        return self._send(pending).addCallback(answered).addErrback(
            not_answered)

    def _push_of(self, counted: State) -> _Push:
        document, texts = shared_document(counted, self._wall_offset(),
                                          self._fields)
        if self.token is not None:
            self._own.keep(document, counted)
        self._seq += 1
        return _Push(self._seq, counted.buffer, document, texts,
                     {key_id: text for key_id, text in texts.items()
                      if key_id not in self._stored})

    def _send(self, push: _Push) -> defer.Deferred:
        return self._call(self._store.push, self.name, push.seq,
                          push.document, list(push.texts), push.sending)

    def keep_lease(self) -> defer.Deferred:
        """
        Renew the lease, or take it if it is free.

        @return: a Deferred firing with L{TOOK} if this node holds it now
            and did not before (or held an older one), L{LOST} if it held
            it and does not any more, else None; it fails if Redis does
            not answer.
        """
        asked = self._reactor.seconds()

        def answered(lease: Lease) -> Optional[str]:
            # Renewed late (after leader turned False) is not taken anew.
            before = self.token
            self.holder = lease.holder
            if lease.held:
                self.token, self._renewed = lease.token, asked
                return self.TOOK if before != lease.token else None
            self.token = None
            self._own.forget()
            return self.LOST if before is not None else None

        return self._call(self._store.keep_lease, self.name,
                          self.token or "", self.lease_seconds).addCallback(
                              answered)

    @staticmethod
    def unanswered(failure: Failure) -> bool:
        """Whether C{failure} is Redis not answering (or refusing): said
        once, when it stops answering, not at every call."""
        return failure.check(redis.RedisError) is not None

    @staticmethod
    def refused_leader(failure: Failure) -> bool:
        """Whether C{failure} is Redis refusing what only the leader may
        do: another node holds the lease."""
        return failure.check(LeaseLost) is not None

    def lost_lease(self) -> None:
        """What the leader asked was refused: another node holds it."""
        if self.token is not None:
            _log.warn("Cluster node {name} lost the flush lease",
                      name=self.name)
        self.token = None
        self._own.forget()

    def merge(self) -> defer.Deferred:
        """
        Begin a new period and read every push of the ones before (for
        the leader, before a flush); this node's own are taken from its
        memory.

        @return: a Deferred firing with L{Merged}; it fails with
            L{LeaseLost} or a C{redis.RedisError}.
        """
        token = self.token
        # Every push kept so far is in the thread's queue before the
        # rotation: in this merge's periods, or never in Redis.
        own = self._own.take()

        def take(token: str, unread: set) -> tuple:
            found = {period: [_parsed_unless_own(document, unread)
                              for document in documents]
                     for period, documents in
                     self._store.rotate(token).items()}
            return found, self._store.texts(self._unknown_ids(
                parsed for documents in found.values()
                for parsed in documents))

        return self._call(take, token, set(own)).addCallback(
            lambda result: self._merged(*result, own))

    def _unknown_ids(self, documents) -> list:
        """The key ids C{documents} (parsed by L{_parsed}) name whose keys
        are not read yet (in the cluster's thread: only looked up)."""
        ids: set = set()
        for document in documents:
            if type(document) is not dict:
                continue  # the leader's own, or said when it is read
            try:
                ids |= shared_key_ids(document)
            except ValueError:
                pass  # said when it is read
        return [key_id for key_id in ids if key_id not in self._keys]

    def _merged(self, found: dict, texts: dict, own: dict) -> Merged:
        entries: list = []
        bad_input: list = []
        overflow = unusable = 0
        pushes = mine = 0
        known: dict = {}
        periods = [str(period) for period in found]
        self._uncommitted &= set(periods)
        for period in sorted(found):
            if str(period) in self._uncommitted:
                continue  # in a digest already; committed with these
            for document in found[period]:
                pushes += 1
                if type(document) is bytes:
                    mine += 1
                    state = own[document]
                else:
                    state = self._read_pushed(period, document, texts, known)
                if state is None:
                    unusable += 1
                    continue
                entries += state.buffer.entries
                bad_input += state.bad_input
                overflow += state.buffer.overflow
        self._remember(known)
        self.last_merged = (len(found), pushes, mine)
        batch = Batch().merge(Batch(tuple(entries), overflow),
                              self._max_unique, self._max_sources)
        return Merged(periods, batch, unusable, tuple(bad_input))

    def _read_pushed(self, period: int, document: _Parsed, texts: dict,
                     known: dict) -> Optional[State]:
        """A push read back from Redis (see L{_read}), or None if it is
        unusable (logged)."""
        try:
            return self._read(document, texts, known)
        except Exception as error:
            # Whatever Redis holds, the rest of the merge goes on.
            _log.error("A push in Redis of period {period} is unusable "
                       "({error}); its errors are not in the digest",
                       period=period, error=error)
            return None

    def _read(self, document: _Parsed, texts: dict, known: dict) -> State:
        """
        A shared document, its keys from those read, C{known} (by this
        merge: added to), or C{texts}.  The keys read are remembered only
        once the merge is done (L{_remember}): one that its thread found
        known must stay known until it is read.
        """
        if isinstance(document, ValueError):
            raise document

        def read_keys(wanted: set, length: Optional[int]) -> dict:
            keys = {}
            for key_id in wanted:
                key = known.get(key_id)
                if key is None:
                    key = self._keys.get(key_id)
                if key is None:
                    text = texts.get(key_id)
                    if text is None:
                        raise ValueError(f"the key {key_id} is not in Redis")
                    key = key_of_text(text)
                known[key_id] = key
                if length is not None and len(key) != length:
                    raise ValueError("a key of the wrong shape")
                keys[key_id] = key
            return keys

        return read_shared(document, self._wall_offset(), self._fields,
                           read_keys)

    def _remember(self, known: dict) -> None:
        for key_id, key in known.items():
            self._keys.put(key_id, key)

    def commit(self, periods: list, state: State,
               seen: list) -> defer.Deferred:
        """
        Forget the merged C{periods} in Redis and keep what the leader
        decides by, for the next leader.

        @return: a Deferred failing with L{LeaseLost} or a
            C{redis.RedisError} if that was not done.
        """
        token = self.token
        document, texts = shared_document(state, self._wall_offset(),
                                          self._fields)
        seen_bytes = seen_document(seen)
        sending = {key_id: text for key_id, text in texts.items()
                   if key_id not in self._stored}

        def commit(sending: dict) -> None:
            missing = self._store.commit(token, periods, document,
                                         seen_bytes, list(texts), sending)
            if missing:
                missing = self._store.commit(
                    token, periods, document, seen_bytes, list(texts),
                    {key_id: texts[key_id] for key_id in missing})
            if missing:
                raise redis.DataError(f"Redis lost {len(missing)} key "
                                      f"texts as they were sent")

        def committed(_: object) -> None:
            for key_id in texts:
                self._stored.put(key_id, True)
            self._uncommitted -= set(periods)

        def failed(failure: Failure) -> Failure:
            # Their errors were sent: if this node merges them again (its
            # commit failed, its lease held), they are left out.
            self._uncommitted |= set(periods)
            return failure

        return self._call(commit, sending).addCallbacks(committed, failed)

    def shared(self) -> defer.Deferred:
        """
        What the last leader left (for a node that took the lease).

        @return: a Deferred firing with C{(state, seen_rows)}, state None
            if there is none or it cannot be read (logged).
        """
        def take() -> tuple:
            shared = self._store.shared()
            parsed = None if shared.state is None else _parsed(shared.state)
            ids = self._unknown_ids([] if parsed is None else [parsed])
            return shared, parsed, self._store.texts(ids)

        def read(result: tuple) -> tuple:
            shared, parsed, texts = result
            state = rows = None
            known: dict = {}
            try:
                if parsed is not None:
                    state = self._read(parsed, texts, known)
                    self._remember(known)
                if shared.seen is not None:
                    rows = seen_rows(shared.seen)
            except ValueError as error:
                _log.error("What the last leader left in Redis is unusable "
                           "({error}); held errors and the pager start "
                           "afresh", error=error)
            return state, rows or []

        return self._call_reading(take).addCallback(read)

    def keep_message(self, message_id: str, data: bytes) -> None:
        """Keep a digest in Redis until it is delivered (the leader's),
        for the next leader to send if this one dies."""
        if self.token is not None:
            self._call(self._store.keep_message, message_id,
                       data).addErrback(self._unkept, message_id)

    def drop_message(self, message_id: str) -> None:
        """Forget a delivered digest in Redis; if Redis does not take
        that, again at each L{retry_drops} until it does (else the next
        leader would send it again)."""
        def dropped(_: object) -> None:
            self._undropped.discard(message_id)

        def not_dropped(failure: Failure) -> None:
            if message_id not in self._undropped:
                self._undropped.add(message_id)
                self._unkept(failure, message_id)

        self._call(self._store.drop_message, message_id).addCallbacks(
            dropped, not_dropped)

    def retry_drops(self) -> None:
        """Forget again the delivered digests Redis did not forget."""
        for message_id in list(self._undropped):
            self.drop_message(message_id)

    @staticmethod
    def _unkept(failure: Failure, message_id: str) -> None:
        failure.trap(redis.RedisError)
        _log.warn("Could not keep or forget {id} in Redis: {error}",
                  id=message_id, error=failure.value)

    def keep_silence(self, silence_id: str, row: dict) -> defer.Deferred:
        """Share a silence added here with the cluster: a Deferred that
        fails if Redis did not take it."""
        return self._call(self._store.keep_silence, silence_id,
                          orjson.dumps(row))

    def drop_silence(self, silence_id: str) -> defer.Deferred:
        return self._call(self._store.drop_silence, silence_id)

    def silences(self) -> defer.Deferred:
        """
        The silences added at run time on any node: a Deferred firing with
        their rows (one that is not JSON left out, and logged).
        """
        def read(documents: list) -> list:
            rows = []
            for document in documents:
                try:
                    rows.append(orjson.loads(document))
                except orjson.JSONDecodeError as error:
                    _log.warn("A silence in Redis is not JSON ({error}); "
                              "left out", error=error)
            return rows

        return self._call_reading(self._store.silences).addCallback(read)

    def messages(self) -> defer.Deferred:
        """The digests kept in Redis, by Message-ID."""
        return self._call_reading(self._store.messages)

    def status(self) -> dict:
        """For the status page and metrics."""
        return {
            "node": self.name,
            "connected": bool(self.connected),
            "leader": self.leader,
            "lease_holder": self.holder,
            "alone": self.alone,
            "last_push": self.last_push,
            "unpushed": self.unpushed,
            "last_merge_periods": self.last_merged[0],
            "last_merge_pushes": self.last_merged[1],
            "last_merge_own_pushes": self.last_merged[2],
        }


def make_node(settings, reactor, wall_offset: Callable[[], float]
              ) -> ClusterNode:
    """The cluster node CLUSTER_URL and the settings around it describe."""
    timeout = min(5.0, settings.CLUSTER_LEASE_SECONDS / 3)
    store = RedisStore(settings.CLUSTER_URL, settings.CLUSTER_NAME, timeout,
                       KEY_SECONDS)
    return ClusterNode(store, reactor, node_name(),
                       settings.CLUSTER_LEASE_SECONDS,
                       settings.CLUSTER_GRACE_SECONDS,
                       settings.unique_fields, wall_offset,
                       settings.MAX_UNIQUE_MESSAGES,
                       settings.MAX_SOURCES_PER_ERROR)
