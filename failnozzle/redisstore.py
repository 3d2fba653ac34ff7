"""
What the nodes of a cluster share, in one Redis or Valkey server (see
L{failnozzle.cluster}): blocking calls through redis-py, made in a thread
of the cluster's own, each step that must be whole a Lua script, so a node
that dies between two calls leaves nothing half done.

All keys begin with C{failnozzle:NAME:} (CLUSTER_NAME):

  period            the number of the period pushes go to now (INCR)
  periods           the periods with pushes the leader has not merged yet
  batch:P           the pushes of period P: one shared document each
  applied:NODE      the last push sequence number of NODE taken (a retried
                    push is taken once)
  key:ID            an error's key text, by content id, with an expiry
                    each push and commit that names it renews
  epoch, lease      the flush lease: C{"EPOCH NODE"}, with an expiry; the
                    epoch fences a holder that lost it
  state, seen       what the leader decides by (held errors, the pager,
                    the canaries) and the seen-memory, as of its last flush
  outbox            Message-ID to message: digests not yet delivered
  silences          id to silence (JSON): those added at run time
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import redis

#: Stores the key texts sent (id, text pairs from ARGV[first + count] on) and
#: renews the keys named (COUNT ids from ARGV[first]); returns the ids named
#: that are neither sent nor stored.
_KEEP_KEYS = """
local function keep_keys(prefix, ttl, first, count)
  for i = first + count, #ARGV, 2 do
    redis.call('SET', prefix .. 'key:' .. ARGV[i], ARGV[i + 1], 'EX', ttl)
  end
  local missing = {}
  for i = first, first + count - 1 do
    if redis.call('EXPIRE', prefix .. 'key:' .. ARGV[i], ttl) == 0 then
      missing[#missing + 1] = ARGV[i]
    end
  end
  return missing
end
"""

#: Takes a push once: its key texts, then the document, into the period of
#: now.  Returns {'ok'}, {'dup'} (taken before) or {'missing', ids}: keys
#: neither sent now nor stored, which the node sends with the same push.
_PUSH = _KEEP_KEYS + """
local prefix, node, seq = ARGV[1], ARGV[2], tonumber(ARGV[3])
local document, ttl, count = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local applied = prefix .. 'applied:' .. node
if seq <= tonumber(redis.call('GET', applied) or '0') then
  return {'dup'}
end
local missing = keep_keys(prefix, ttl, 7, count)
if #missing > 0 then
  return {'missing', missing}
end
local period = redis.call('GET', prefix .. 'period') or '0'
redis.call('RPUSH', prefix .. 'batch:' .. period, document)
redis.call('SADD', prefix .. 'periods', period)
redis.call('SET', applied, seq, 'EX', ttl)
return {'ok'}
"""

#: Renews the lease of the token given, or takes the lease if no one holds
#: it.  Returns {1, token} (held, perhaps anew) or {0, holder's token}.
_KEEP_LEASE = """
local prefix, token, ttl, node = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local lease = prefix .. 'lease'
local current = redis.call('GET', lease)
if current then
  if current == token then
    redis.call('PEXPIRE', lease, ttl)
    return {1, current}
  end
  if redis.call('PTTL', lease) == -1 then
    -- Not set by a node (each sets an expiry): it ends like a lease.
    redis.call('PEXPIRE', lease, ttl)
  end
  return {0, current}
end
local taken = redis.call('INCR', prefix .. 'epoch') .. ' ' .. node
redis.call('SET', lease, taken, 'PX', ttl)
return {1, taken}
"""

_RELEASE_LEASE = """
if redis.call('GET', ARGV[1] .. 'lease') == ARGV[2] then
  return redis.call('DEL', ARGV[1] .. 'lease')
end
return 0
"""

#: For the lease holder only: begins a new period, and returns the pushes
#: of every earlier one not merged yet, {period, {documents}, ...}.
_ROTATE = """
local prefix, token = ARGV[1], ARGV[2]
if redis.call('GET', prefix .. 'lease') ~= token then
  return false
end
local now = redis.call('INCR', prefix .. 'period')
local found = {}
for _, period in ipairs(redis.call('SMEMBERS', prefix .. 'periods')) do
  if not string.match(period, '^%d+$') then
    redis.call('SREM', prefix .. 'periods', period)
  elseif tonumber(period) < now then
    found[#found + 1] = period
    found[#found + 1] = redis.call('LRANGE', prefix .. 'batch:' .. period,
                                   0, -1)
  end
end
return found
"""

#: For the lease holder only: the periods merged are gone, the state and
#: seen-memory they left are kept, and the keys that state names stored
#: (texts sent with it) or renewed.  Returns {'ok'}, {'lost'} (not the
#: holder) or {'missing', ids}: keys neither sent nor stored; nothing else
#: was done.
_COMMIT = _KEEP_KEYS + """
local prefix, token = ARGV[1], ARGV[2]
if redis.call('GET', prefix .. 'lease') ~= token then
  return {'lost'}
end
local state, seen, ttl = ARGV[3], ARGV[4], tonumber(ARGV[5])
local periods, count = tonumber(ARGV[6]), tonumber(ARGV[7])
local ids = 8 + periods
local missing = keep_keys(prefix, ttl, ids, count)
if #missing > 0 then
  return {'missing', missing}
end
for i = 8, ids - 1 do
  redis.call('DEL', prefix .. 'batch:' .. ARGV[i])
  redis.call('SREM', prefix .. 'periods', ARGV[i])
end
redis.call('SET', prefix .. 'state', state)
redis.call('SET', prefix .. 'seen', seen)
return {'ok'}
"""


class LeaseLost(Exception):
    """The lease is another node's now: what was asked of its holder was
    not done."""


@dataclass(frozen=True)
class Lease:
    """Who holds the flush lease, as a node sees it after asking."""

    held: bool
    #: The holder's token, C{"EPOCH NODE"}.
    token: str

    @property
    def holder(self) -> str:
        return self.token.partition(" ")[2]


@dataclass(frozen=True)
class Shared:
    """What the leader left: its state and seen-memory documents."""

    state: Optional[bytes]
    seen: Optional[bytes]


class RedisStore:
    """
    The cluster's keys on one server, by blocking calls: for a thread of
    their own, never the reactor's.  Every call may raise
    C{redis.RedisError} (including C{ConnectionError} and C{TimeoutError}).
    """

    def __init__(self, url: str, name: str, timeout: float,
                 key_seconds: int) -> None:
        """
        @param url: C{redis://}, C{rediss://} (TLS) or C{unix://}, with a
            password and database if wanted.
        @param timeout: for connecting and for each answer.
        @param key_seconds: how long a key text is kept after the last push
            or commit that names it.
        """
        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._prefix = f"failnozzle:{name}:"
        self._key_seconds = key_seconds
        scripts = dict(push=_PUSH, keep=_KEEP_LEASE, release=_RELEASE_LEASE,
                       rotate=_ROTATE, commit=_COMMIT)
        self._scripts = {name: self._redis.register_script(text)
                         for name, text in scripts.items()}

    def _run(self, script: str, *args: object) -> object:
        return self._scripts[script](args=[self._prefix, *args])

    def push(self, node: str, seq: int, document: bytes, ids: list,
             texts: dict) -> Optional[list]:
        """
        Add one push of C{node}, numbered C{seq} (pushes of a node are
        taken in order, and each once), naming the keys C{ids}, of which
        C{texts} are sent with it.

        @return: None if it is taken (now or before), else the ids whose
            texts Redis lacks: nothing was taken.
        """
        pairs = [part for pair in texts.items() for part in pair]
        answer = self._run("push", node, seq, document, self._key_seconds,
                           len(ids), *ids, *pairs)
        return _missing(answer)

    def keep_lease(self, node: str, token: str, seconds: float) -> Lease:
        """Renew the lease C{token}, or take it if it is free."""
        held, current = self._run("keep", token, int(seconds * 1000), node)
        return Lease(bool(held), current.decode("utf-8", "replace"))

    def release_lease(self, token: str) -> None:
        self._run("release", token)

    def rotate(self, token: str) -> dict:
        """
        Begin a new period, for the holder of C{token}.

        @return: by period, the documents pushed in it, for each earlier
            period not merged yet.
        @raise LeaseLost: C{token} does not hold the lease.
        """
        found = self._run("rotate", token)
        if found is None:
            raise LeaseLost()
        return {int(found[i]): list(found[i + 1])
                for i in range(0, len(found), 2)}

    def texts(self, ids: list) -> dict:
        """The key texts of C{ids} that Redis has, by id, as stored."""
        if not ids:
            return {}
        values = self._redis.mget([self._prefix + "key:" + key_id
                                   for key_id in ids])
        return {key_id: value for key_id, value in zip(ids, values)
                if value is not None}

    def commit(self, token: str, periods: list, state: bytes, seen: bytes,
               ids: list, texts: dict) -> Optional[list]:
        """
        Forget C{periods}, merged, and keep C{state} and C{seen}, whose
        keys are C{ids}, of which C{texts} are sent with it.

        @return: None if done, else the ids whose texts Redis lacks:
            nothing was done.
        @raise LeaseLost: C{token} does not hold the lease: nothing was
            done.
        """
        pairs = [part for pair in texts.items() for part in pair]
        answer = self._run("commit", token, state, seen, self._key_seconds,
                           len(periods), len(ids), *periods, *ids, *pairs)
        if answer[0] == b"lost":
            raise LeaseLost()
        return _missing(answer)

    def shared(self) -> Shared:
        state, seen = self._redis.mget([self._prefix + "state",
                                        self._prefix + "seen"])
        return Shared(state, seen)

    def keep_message(self, message_id: str, data: bytes) -> None:
        self._redis.hset(self._prefix + "outbox", message_id, data)

    def drop_message(self, message_id: str) -> None:
        self._redis.hdel(self._prefix + "outbox", message_id)

    def messages(self) -> dict:
        """The messages not yet delivered, by Message-ID."""
        return {key.decode("utf-8", "replace"): value for key, value in
                self._redis.hgetall(self._prefix + "outbox").items()}

    def keep_silence(self, silence_id: str, row: bytes) -> None:
        self._redis.hset(self._prefix + "silences", silence_id, row)

    def drop_silence(self, silence_id: str) -> None:
        self._redis.hdel(self._prefix + "silences", silence_id)

    def silences(self) -> list:
        """The silences added at run time, as JSON, each as kept."""
        return list(self._redis.hvals(self._prefix + "silences"))

    def close(self) -> None:
        self._redis.close()


def _missing(answer: list) -> Optional[list]:
    """The ids a script's {'missing', ids} answer names; None for others."""
    if answer[0] == b"missing":
        return [key_id.decode() for key_id in answer[1]]
    return None
