"""
Cluster mode against a real redis-server: the merge of pushes (deltas,
a retried push taken once, first and last seen across nodes), the lease
(taking over, renewal, a stale holder fenced off), and the service's
flush, fallback, rejoin and hand-over.
"""
from __future__ import annotations

import time

import redis
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from failnozzle.aggregate import Batch, Entry
from failnozzle.cluster import ClusterNode, make_node
from failnozzle.redisstore import LeaseLost
from failnozzle.state import State, key_id, key_text, shared_document
from tests.common import (FakeMailTransport, SilentServer, SMTPSink,
                          bounded, digest_total, make_settings, poll_until,
                          record, send_datagrams, start_service,
                          udp_address)
from tests.redisserver import RedisServer
from tests.test_twistd import _TwistdTestCase
from tests.test_web import body_of, json_of, render

FIELDS = make_settings().unique_fields


def key(message: str) -> tuple:
    """A key of the default UNIQUE_MSG_TUPLE."""
    return tuple(message if name == "message" else None for name in FIELDS)


def batch(*entries: Entry) -> Batch:
    return Batch.of(entries)


def counted(*entries: Entry) -> State:
    """What a node counted, for a push: none of it bad input."""
    return State(batch(*entries))


def digests(mail: FakeMailTransport) -> list:
    """The digests given to C{mail}, each delivered now."""
    mail.succeed_all()
    return [message for _, _, message in mail.by_kind("digest")]


class NodeTests(TestCase):
    """Pushes, merges and the lease, between nodes of one process."""

    def setUp(self) -> None:
        self.redis = RedisServer(self)
        self.settings = make_settings(CLUSTER_URL=self.redis.url,
                                      CLUSTER_NAME="tests")

    def node(self, wall_offset: float = 0.0):
        node = make_node(self.settings, reactor, lambda: wall_offset)
        node.start()
        self.addCleanup(node.stop)
        return node

    @defer.inlineCallbacks
    def lead(self, node):
        change = yield node.keep_lease()
        self.assertEqual(change, ClusterNode.TOOK)
        return node

    @defer.inlineCallbacks
    def test_merge_across_nodes(self):
        """
        The leader's merge sums what every node pushed: totals and per-host
        counts exact, first seen the earliest and last seen the latest of
        any node, in the leader's clock (each push carries its own).
        """
        one, two = self.node(), self.node(wall_offset=100.0)
        yield self.lead(one)
        yield one.push(lambda: counted(
            Entry(key("boom"), {"web1": 3}, 50.0, 60.0),
            Entry(key("only one"), {"web1": 1}, 55.0, 55.0)))
        # Two's clock is 100 s behind the wall: its 0..20 is 100..120.
        yield two.push(lambda: counted(Entry(key("boom"), {"web2": 4}, 0.0,
                                             20.0)))
        yield two.push(lambda: counted(Entry(key("boom"), {"web1": 2}, 30.0,
                                             31.0)))
        merged = yield one.merge()
        by_message = {dict(zip(FIELDS, entry.key))["message"]: entry
                      for entry in merged.batch.entries}
        boom = by_message["boom"]
        self.assertEqual((boom.total, dict(boom.sources)),
                         (9, {"web1": 5, "web2": 4}))
        self.assertEqual((boom.first_seen, boom.last_seen), (50.0, 131.0))
        self.assertEqual(by_message["only one"].total, 1)
        self.assertEqual(merged.batch.total, 10)
        self.assertEqual(one.last_merged, (1, 3, 1))

    def spoil_key_texts(self, *messages: str) -> None:
        """Make Redis' copies of these errors' key texts unreadable: a
        push read back that names them is unusable."""
        client = self.redis.client()
        for message in messages:
            text_id = key_id(key_text(key(message)))
            client.set(f"failnozzle:tests:key:{text_id}", b"\xff\xfe[")

    @defer.inlineCallbacks
    def merged_exactly(self, node, total: int, merged: tuple):
        """Merge as C{node}: C{total} errors, no push unusable, and
        C{merged} (periods, pushes, own pushes) as it says."""
        found = yield node.merge()
        self.assertEqual((found.batch.total, found.unusable), (total, 0))
        self.assertEqual(node.last_merged, merged)

    @staticmethod
    def fail_next_push(node, taken: bool) -> None:
        """Make C{node}'s next push fail as if Redis did not answer it,
        though it took it if C{taken} (the answer was lost)."""
        store, original = node._store, node._store.push

        def failing(*args):
            store.push = original
            if taken:
                original(*args)
                raise redis.TimeoutError("the answer lost")
            raise redis.ConnectionError("gone for a moment")

        store.push = failing

    @defer.inlineCallbacks
    def test_own_pushes_taken_from_memory(self):
        """
        The leader takes the pushes it made while leading from its memory,
        not from Redis (whose copies of their keys are spoiled here), and
        the other nodes' from Redis: each counted once, exactly.
        """
        one, two = self.node(), self.node()
        yield self.lead(one)
        yield one.push(lambda: counted(
            Entry(key("mine"), {"web1": 3}, 1.0, 2.0)))
        yield one.push(lambda: counted(
            Entry(key("mine"), {"web1": 2}, 3.0, 4.0),
            Entry(key("also mine"), {"web1": 1}, 3.0, 3.0)))
        yield two.push(lambda: counted(
            Entry(key("theirs"), {"web2": 4}, 2.0, 2.0)))
        self.spoil_key_texts("mine", "also mine")
        merged = yield one.merge()
        totals = {dict(zip(FIELDS, entry.key))["message"]: entry.total
                  for entry in merged.batch.entries}
        self.assertEqual(totals, {"mine": 5, "also mine": 1, "theirs": 4})
        self.assertEqual((merged.unusable, one.last_merged), (0, (1, 3, 2)))
        self.assertEqual(one.status()["last_merge_own_pushes"], 2)

    @defer.inlineCallbacks
    def test_own_push_as_read_back(self):
        """
        A push taken from memory is merged as the same push read back
        from Redis would be: keys, hosts, times, level, grouping, context,
        bad input.
        """
        pushed = State(batch(
            Entry(key("rich"), {"web1": 3, "web2": 1}, 10.5, 20.25, 3, 2,
                  "fp-rich", 4, True, ("id 1", "id 2"),
                  (("release", "1.2"),)),
            Entry(key("plain"), {"web1": 1}, 11.0, 11.0)),
            bad_input=(Entry(key("junk"), {"web3": 6}, 12.0, 13.0),))
        one, two = self.node(), self.node()
        yield self.lead(one)
        yield one.push(lambda: pushed)
        from_memory = yield one.merge()
        yield one.commit(from_memory.periods, State(), [])
        yield two.push(lambda: pushed)
        read_back = yield one.merge()
        self.assertEqual((from_memory.batch, from_memory.bad_input),
                         (read_back.batch, read_back.bad_input))
        self.assertEqual(from_memory.batch.total, 7)
        self.assertEqual([one.last_merged[1:]], [(1, 0)])

    @defer.inlineCallbacks
    def test_pushed_before_leading_read_back(self):
        """
        What the leader pushed before it led is not in its memory: read
        back from Redis, and counted with what it pushed since.
        """
        one = self.node()
        yield one.push(lambda: counted(Entry(key("early"), {"h": 2}, 1.0,
                                             1.0)))
        yield self.lead(one)
        yield one.push(lambda: counted(Entry(key("late"), {"h": 3}, 2.0,
                                             2.0)))
        self.spoil_key_texts("late")
        yield self.merged_exactly(one, 5, (1, 2, 1))

    @defer.inlineCallbacks
    def test_retried_own_push_taken_once(self):
        """
        The leader's push that Redis took but whose answer was lost is
        sent again and taken once: counted once, from memory.
        """
        one = self.node()
        yield self.lead(one)
        self.fail_next_push(one, taken=True)
        yield one.push(lambda: counted(Entry(key("once"), {"h": 7}, 1.0,
                                             1.0)))
        self.assertEqual((one.connected, one.unpushed), (False, 7))
        yield one.push(lambda: counted())
        self.assertEqual((one.connected, one.unpushed), (True, 0))
        self.spoil_key_texts("once")
        yield self.merged_exactly(one, 7, (1, 1, 1))

    @defer.inlineCallbacks
    def test_own_push_after_the_merge_read_back(self):
        """
        The leader's push that Redis did not take before a merge, and took
        when it was sent again after, is in the next merge, read back.
        """
        one = self.node()
        yield self.lead(one)
        self.fail_next_push(one, taken=False)
        yield one.push(lambda: counted(Entry(key("late"), {"h": 4}, 1.0,
                                             1.0)))
        first = yield one.merge()
        yield one.commit(first.periods, State(), [])
        yield one.push(lambda: counted())
        second = yield one.merge()
        self.assertEqual((first.batch.total, second.batch.total), (0, 4))
        self.assertEqual(one.last_merged, (1, 1, 0))

    @defer.inlineCallbacks
    def test_same_push_twice_in_redis(self):
        """
        The bytes of the leader's push twice in Redis are two pushes: one
        taken from memory, the other read back.
        """
        one = self.node()
        yield self.lead(one)
        yield one.push(lambda: counted(Entry(key("twice"), {"h": 2}, 1.0,
                                             1.0)))
        client = self.redis.client()
        [document] = client.lrange("failnozzle:tests:batch:0", 0, -1)
        client.rpush("failnozzle:tests:batch:0", document)
        yield self.merged_exactly(one, 4, (1, 2, 1))

    @defer.inlineCallbacks
    def test_next_leader_reads_what_the_last_pushed(self):
        """
        A leader replaced (its lease ran out) leaves its pushes in Redis:
        the next leader reads them back, and it forgets them.
        """
        one, two = self.node(), self.node()
        yield self.lead(one)
        yield one.push(lambda: counted(Entry(key("left"), {"h": 5}, 1.0,
                                             1.0)))
        self.redis.client().delete("failnozzle:tests:lease")  # expired
        yield self.lead(two)
        self.assertEqual((yield one.keep_lease()), ClusterNode.LOST)
        merged = yield two.merge()
        self.assertEqual((merged.batch.total, two.last_merged), (5, (1, 1, 0)))
        self.assertEqual(one._own.take(), {})

    @defer.inlineCallbacks
    def test_merge_takes_each_push_once(self):
        """
        Merged pushes are gone once committed; pushes made after the merge
        began go to the next one; a merge that was not committed (its
        leader died) is merged again by the next.
        """
        one = self.node()
        yield self.lead(one)
        yield one.push(lambda: counted(Entry(key("a"), {"h": 1}, 1.0, 1.0)))
        first = yield one.merge()
        yield one.push(lambda: counted(Entry(key("a"), {"h": 2}, 2.0, 2.0)))
        # Not committed: the next merge takes both periods.
        second = yield one.merge()
        self.assertEqual((first.batch.total, second.batch.total), (1, 3))
        yield one.commit(second.periods, State(), [])
        third = yield one.merge()
        self.assertEqual(third.batch.total, 0)

    @defer.inlineCallbacks
    def test_retried_push_taken_once(self):
        """
        A push whose answer was lost is sent again with its number: Redis
        takes it once.
        """
        one = self.node()
        yield self.lead(one)
        document, texts = shared_document(
            State(batch(Entry(key("lost answer"), {"h": 7}, 1.0, 1.0))),
            0.0, FIELDS)
        store = one._store
        for _ in range(3):
            yield defer.maybeDeferred(store.push, "n1", 1, document,
                                      list(texts), texts)
        merged = yield one.merge()
        self.assertEqual(merged.batch.total, 7)

    @defer.inlineCallbacks
    def test_push_waits_for_redis(self):
        """
        While Redis is down a push is kept, and what is counted meanwhile
        waits for the next; once Redis is back both arrive, each once.
        """
        one = self.node()
        self.redis.stop()
        waiting = [counted(Entry(key("x"), {"h": 2}, 1.0, 1.0)),
                   counted(Entry(key("x"), {"h": 5}, 2.0, 2.0))]
        yield one.push(lambda: waiting.pop(0))
        self.assertEqual((one.connected, one.unpushed), (False, 2))
        yield one.push(lambda: waiting.pop(0))
        self.assertEqual(len(waiting), 1, "counted while a push waits")
        self.redis.start()
        yield one.push(lambda: waiting.pop(0))
        self.assertEqual((one.connected, one.unpushed), (True, 0))
        yield one.push(lambda: waiting.pop(0))
        yield self.lead(one)
        merged = yield one.merge()
        self.assertEqual(merged.batch.total, 7)

    @defer.inlineCallbacks
    def test_key_texts_sent_once(self):
        """
        A key's text goes to Redis with the first push that names it;
        one Redis lost (restarted, expired) is sent again when a push
        names it.
        """
        one = self.node()
        entry = Entry(key("long traceback"), {"h": 1}, 1.0, 1.0)
        yield one.push(lambda: counted(entry))
        sent = []
        store = one._store
        original = store.push

        def spy(node, seq, document, ids, texts):
            sent.append(sorted(texts))
            return original(node, seq, document, ids, texts)

        store.push = spy
        yield one.push(lambda: counted(entry))
        self.assertEqual(sent, [[]])
        self.redis.client().delete(
            f"failnozzle:tests:key:{key_id(key_text(entry.key))}")
        yield one.push(lambda: counted(entry))
        self.assertEqual(sent[1:], [[], [key_id(key_text(entry.key))]])
        yield self.lead(one)
        merged = yield one.merge()
        self.assertEqual((merged.batch.total, merged.unusable), (3, 0))

    @defer.inlineCallbacks
    def test_lease_renewed_and_taken_over(self):
        """
        One node holds the lease and keeps it by renewing; the other sees
        who holds it; once released (a clean stop) the other takes it.
        """
        one, two = self.node(), self.node()
        yield self.lead(one)
        self.assertEqual((yield two.keep_lease()), None)
        self.assertEqual((two.leader, two.holder), (False, one.name))
        self.assertEqual((yield one.keep_lease()), None, "renewed")
        self.assertTrue(one.leader)
        yield one.stop()
        self.assertEqual((yield two.keep_lease()), ClusterNode.TOOK)
        self.assertEqual(two.holder, two.name)

    @defer.inlineCallbacks
    def test_stale_leader_fenced(self):
        """
        A leader whose lease ran out (it stalled) and was taken cannot
        merge or commit any more: what it asks is refused and it learns it
        lost the lease; the pushes stay for the new leader.
        """
        one, two = self.node(), self.node()
        yield self.lead(one)
        yield two.push(lambda: counted(Entry(key("y"), {"h": 4}, 1.0, 1.0)))
        merged = yield one.merge()
        self.redis.client().delete("failnozzle:tests:lease")  # expired
        yield self.lead(two)
        yield self.assertFailure(one.commit(merged.periods, State(), []),
                                 LeaseLost)
        yield self.assertFailure(one.merge(), LeaseLost)
        self.assertEqual((yield one.keep_lease()), ClusterNode.LOST)
        again = yield two.merge()
        self.assertEqual(again.batch.total, 4)

    @defer.inlineCallbacks
    def test_shared_state_for_the_next_leader(self):
        """What a leader commits (held errors, the pager, the seen-memory)
        is what the next one reads."""
        one, two = self.node(), self.node()
        yield self.lead(one)
        held = batch(Entry(key("held"), {"h": 3}, 1.0, 2.0))
        seen = [["fp", 1.0, 2.0, 3, 0.0, 0.0]]
        yield one.commit([], State(held={"digest": held},
                                   rate_window=[1, 2, 3]), seen)
        yield one.stop()
        yield self.lead(two)
        state, rows = yield two.shared()
        self.assertEqual(state.held["digest"].total, 3)
        self.assertEqual(state.rate_window, [1, 2, 3])
        self.assertEqual(rows, seen)

    @defer.inlineCallbacks
    def test_keys_only_the_standard_library_reads(self):
        """
        Keys holding a lone surrogate or NaN (which datagrams may carry,
        and orjson does not read) are merged like any other.
        """
        one, two = self.node(), self.node()
        yield two.push(lambda: counted(
            Entry(key("bad \ud800 text"), {"h": 2}, 1.0, 1.0),
            Entry(key(float("nan")), {"h": 3}, 1.0, 1.0),
            Entry(key("plain"), {"h": 4}, 1.0, 1.0)))
        yield self.lead(one)
        merged = yield one.merge()
        self.assertEqual((merged.batch.total, merged.unusable), (9, 0))
        self.assertIn(key("bad \ud800 text"),
                      [entry.key for entry in merged.batch.entries])

    @defer.inlineCallbacks
    def test_corrupt_values_in_redis(self):
        """
        A key text that is not JSON (nor UTF-8) makes the pushes naming it
        unusable, logged, and no other; members of the periods set that
        are not period numbers are dropped; the merge goes on.
        """
        one, two = self.node(), self.node()
        yield two.push(lambda: counted(Entry(key("spoiled"), {"h": 2}, 1.0,
                                             1.0)))
        yield two.push(lambda: counted(Entry(key("fine"), {"h": 5}, 1.0, 1.0)))
        client = self.redis.client()
        client.set(f"failnozzle:tests:key:{key_id(key_text(key('spoiled')))}",
                   b"\xff\xfe[")
        client.sadd("failnozzle:tests:periods", "x", "1e3", "-1")
        yield self.lead(one)
        merged = yield one.merge()
        self.assertEqual((merged.batch.total, merged.unusable), (5, 1))
        self.assertEqual(client.smembers("failnozzle:tests:periods"),
                         {b"0"})
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_failed_commit_not_merged_again(self):
        """
        Pushes merged into a digest whose commit failed are still in
        Redis; the same leader's next merge leaves them out (they were
        sent), and its next commit forgets them.
        """
        one = self.node()
        yield self.lead(one)
        yield one.push(lambda: counted(Entry(key("a"), {"h": 1}, 1.0, 1.0)))
        first = yield one.merge()
        store, original = one._store, one._store.commit

        def refused(*args):
            store.commit = original
            raise redis.ConnectionError("gone for a moment")

        store.commit = refused
        yield self.assertFailure(one.commit(first.periods, State(), []),
                                 redis.ConnectionError)
        yield one.push(lambda: counted(Entry(key("a"), {"h": 2}, 2.0, 2.0)))
        second = yield one.merge()
        self.assertEqual((first.batch.total, second.batch.total), (1, 2))
        self.assertTrue(set(first.periods) <= set(second.periods))
        yield one.commit(second.periods, State(), [])
        third = yield one.merge()
        self.assertEqual((third.batch.total, third.periods), (0, []))

    @defer.inlineCallbacks
    def test_late_renewal_is_not_a_take_over(self):
        """
        A renewal answered after the lease's safe time ran out here, but
        before it ran out in Redis, keeps the same lease: not taken anew.
        """
        one = self.node()
        yield self.lead(one)
        one._renewed -= self.settings.CLUSTER_LEASE_SECONDS
        self.assertFalse(one.leader)
        self.assertIsNone((yield one.keep_lease()))
        self.assertTrue(one.leader)

    @defer.inlineCallbacks
    def test_reads_do_not_prove_redis_answers(self):
        """
        A Redis that refuses writes (out of memory) but answers reads is
        unreachable for the grace period: its reads do not start it anew.
        """
        one = self.node()
        yield one.push(lambda: counted(Entry(key("a"), {"h": 1}, 1.0, 1.0)))
        self.assertTrue(one.connected)
        self.redis.client().config_set("maxmemory", 1)
        yield one.push(lambda: counted(Entry(key("b"), {"h": 1}, 1.0, 1.0)))
        self.assertFalse(one.connected)
        since = one.unreachable_since
        self.assertEqual((yield one.silences()), [])
        self.assertEqual((one.connected, one.unreachable_since),
                         (False, since))
        self.redis.client().config_set("maxmemory", 0)
        yield one.push(lambda: counted())
        self.assertEqual((one.connected, one.unpushed), (True, 0))

    @defer.inlineCallbacks
    def test_calls_without_the_thread_fail_at_once(self):
        """
        A node whose thread is not running (never started, or stopped)
        answers every call at once, as if Redis did not: a stop then
        does not wait for ever.
        """
        idle = make_node(self.settings, reactor, lambda: 0.0)
        yield idle.push(lambda: counted(Entry(key("a"), {"h": 1}, 1.0, 1.0)))
        self.assertEqual((idle.connected, idle.unpushed), (False, 1))
        one = self.node()
        yield one.stop()
        yield self.assertFailure(one.keep_lease(), redis.ConnectionError)

    @defer.inlineCallbacks
    def test_forgetting_a_delivered_digest_is_retried(self):
        """
        A delivered digest that Redis did not forget when told is
        forgotten at a later retry: the next leader does not send it.
        """
        one = self.node()
        yield self.lead(one)
        one.keep_message("<m1@x>", b"a digest")
        store, original = one._store, one._store.drop_message

        def refused(message_id):
            raise redis.ConnectionError("a blip")

        store.drop_message = refused
        one.drop_message("<m1@x>")
        yield one.keep_lease()  # after both, in the cluster's thread
        self.assertEqual(list((yield one.messages())), ["<m1@x>"])
        store.drop_message = original
        one.retry_drops()
        yield one.keep_lease()
        self.assertEqual((yield one.messages()), {})

    @defer.inlineCallbacks
    def test_a_lease_without_expiry_ends(self):
        """
        A lease key no node set (no expiry, any value) is given one: it
        does not keep every node from leading for ever.
        """
        one = self.node()
        client = self.redis.client()
        client.set("failnozzle:tests:lease", b"\xff not a node")
        self.assertIsNone((yield one.keep_lease()))
        self.assertGreater(client.pttl("failnozzle:tests:lease"), 0)


class TLSTests(TestCase):
    """C{rediss://}: TLS, checked against the CA the URL names, and a
    password."""

    @defer.inlineCallbacks
    def test_push_and_merge_over_tls(self):
        server = RedisServer(self, tls=True)
        settings = make_settings(CLUSTER_URL=server.url)
        one = make_node(settings, reactor, lambda: 0.0)
        one.start()
        self.addCleanup(one.stop)
        yield one.push(lambda: counted(Entry(key("secret"), {"h": 3}, 1.0,
                                             1.0)))
        self.assertTrue(one.connected)
        self.assertEqual((yield one.keep_lease()), ClusterNode.TOOK)
        merged = yield one.merge()
        self.assertEqual(merged.batch.total, 3)

    @defer.inlineCallbacks
    def test_wrong_password(self):
        """A wrong password is Redis refusing: one log line that says so,
        not the password."""
        server = RedisServer(self, tls=True)
        settings = make_settings(
            CLUSTER_URL=server.url.replace(":s3cret@", ":wrong@"))
        one = make_node(settings, reactor, lambda: 0.0)
        one.start()
        self.addCleanup(one.stop)
        events = EventLoggingObserver.createWithCleanup(self,
                                                        globalLogPublisher)
        yield one.push(lambda: counted(Entry(key("x"), {"h": 1}, 1.0, 1.0)))
        self.assertFalse(one.connected)
        [said] = [event for event in events
                  if "unreachable" in event["log_format"]]
        text = formatEvent(said)
        self.assertIn("invalid", text.lower())
        self.assertNotIn("wrong", text)


class ServiceTests(TestCase):
    """Services of one process sharing a real Redis: one digest, global
    counts; their fallback and rejoin; the hand-over at a clean stop."""

    def setUp(self) -> None:
        self.redis = RedisServer(self)

    def start(self, transport, **overrides):
        overrides.setdefault("FLUSH_SECONDS", 3600)
        overrides.setdefault("GROUP_WAIT_SECONDS", 0)
        # Every flush mails what it has, news or not: digests to count.
        overrides.setdefault("REPEAT_SECONDS", 0)
        return start_service(self, transport, CLUSTER_URL=self.redis.url,
                             SERVER_NAME="nozzle", **overrides)

    @defer.inlineCallbacks
    def counted_everywhere(self, services, expected: int):
        """Wait until every error sent is in the cluster (pushed) or in a
        node's buffer."""
        def received() -> int:
            return sum(service.counts.received["udp"]
                       for service in services)
        yield poll_until(lambda: received() >= expected, "datagrams")

    @defer.inlineCallbacks
    def pushed(self, *services):
        for service in services:
            yield service.cluster.push(service._take_counted)

    @defer.inlineCallbacks
    def leader_and_follower(self, mail: FakeMailTransport, **overrides):
        """Two nodes, the first holding the lease, the second knowing."""
        one = self.start(mail, **overrides)
        yield poll_until(lambda: one.cluster.leader, "a leader")
        two = self.start(mail, **overrides)
        yield poll_until(lambda: two.cluster.holder == one.cluster.name,
                         "the lease seen")
        return one, two

    @defer.inlineCallbacks
    def leader_digest(self, leader, mail: FakeMailTransport):
        """The one digest the leader's flush sends now."""
        leader._cluster_flush()
        yield poll_until(lambda: mail.by_kind("digest"), "a digest")
        yield leader._cluster_flushing
        [message] = digests(mail)
        return message

    @defer.inlineCallbacks
    def test_one_digest_with_global_counts(self):
        """
        Errors sent to two nodes make one digest, from the leader, with
        the counts of both, per host.
        """
        mail = FakeMailTransport()
        one, two = yield self.leader_and_follower(mail)
        send_datagrams(udp_address(one), [record("boom", "web1")] * 3)
        send_datagrams(udp_address(two), [record("boom", "web2")] * 4)
        yield self.counted_everywhere([one, two], 7)
        yield self.pushed(one, two)
        two._cluster_flush()
        message = yield self.leader_digest(one, mail)
        self.assertEqual(digest_total(message), 7)
        body = message.get_content()
        self.assertIn("web1", body)
        self.assertIn("web2", body)
        # The leader's own pushes from its memory, the follower's read.
        merged, own = one.cluster.last_merged[1:]
        self.assertGreater(merged, own)
        self.assertGreaterEqual(own, 1)

    @defer.inlineCallbacks
    def test_alone_then_rejoin(self):
        """
        With Redis down past the grace period a node sends a digest of its
        own, saying so; once Redis is back what it counted since reaches
        the cluster's digest, and what it reported alone does not again.
        """
        mail = FakeMailTransport()
        one = self.start(mail, CLUSTER_GRACE_SECONDS=0)
        yield poll_until(lambda: one.cluster.leader, "a leader")
        self.redis.stop()
        send_datagrams(udp_address(one), [record("alone", "web1")] * 5)
        yield self.counted_everywhere([one], 5)
        yield one.cluster.push(one._take_counted)
        self.assertTrue(one.cluster.alone)
        # The push Redis did not answer is kept for it (Redis may have
        # taken it): what is counted after goes in the digest alone.
        self.assertEqual(one.cluster.unpushed, 5)
        send_datagrams(udp_address(one), [record("alone", "web1")] * 3)
        yield self.counted_everywhere([one], 8)
        one._cluster_flush()
        yield poll_until(lambda: mail.by_kind("digest"), "a digest alone")
        [alone] = digests(mail)
        self.assertIn("Redis unreachable", alone["Subject"])
        self.assertTrue(alone.get_content().startswith(
            f"This digest comes from cluster node {one.cluster.name} "
            f"alone"))
        self.assertEqual(digest_total(alone), 3)
        self.redis.start()
        send_datagrams(udp_address(one), [record("alone", "web1")] * 2)
        yield self.counted_everywhere([one], 10)
        yield self.pushed(one, one)
        self.assertEqual(one.cluster.unpushed, 0)
        self.assertFalse(one.cluster.alone)
        yield one.cluster.keep_lease()
        yield poll_until(lambda: one._taking_over is None, "take-over")
        one._cluster_flush()
        yield poll_until(lambda: len(mail.by_kind("digest")) == 2,
                         "the cluster's digest")
        totals = [digest_total(message) for message in digests(mail)]
        self.assertEqual(totals, [3, 7])

    @defer.inlineCallbacks
    def test_silences_shared(self):
        """
        A silence added at run time on one node keeps its errors out of
        the leader's digest, and its removal on another node lets them in
        again.
        """
        mail = FakeMailTransport()
        one, two = yield self.leader_and_follower(mail)
        silence = two.silences.add(
            {"match": {"message": "hush"}, "until": time.time() + 3600,
             "comment": "known"}, time.time(), two.settings.unique_fields)
        yield poll_until(lambda: [found.id for found in one.silences.all()]
                         == [silence.id], "the silence shared")
        send_datagrams(udp_address(two), [record("hush", "web2"),
                                          record("loud", "web2")])
        yield self.counted_everywhere([two], 2)
        yield self.pushed(two)
        message = yield self.leader_digest(one, mail)
        self.assertEqual(digest_total(message), 1)
        self.assertIn("known", message.get_content())
        one.silences.remove(silence.id)
        yield poll_until(lambda: not two.silences.all(),
                         "the silence removed everywhere")

    @defer.inlineCallbacks
    def test_bad_input_does_not_page(self):
        """
        Bad input sent to any node is not an error to the leader's pager,
        as on a single node; errors are.
        """
        mail = FakeMailTransport()
        pager = dict(PAGER_TO="pager@example.com",
                     PAGER_FROM="alarm@example.com", PAGER_WINDOW_SIZE=1,
                     PAGER_LIMIT=5)
        one, two = yield self.leader_and_follower(mail, **pager)
        send_datagrams(udp_address(two), [b"junk"] * 10
                       + [record("boom", "web2")] * 2)
        yield self.counted_everywhere([two], 12)
        yield self.pushed(two)
        message = yield self.leader_digest(one, mail)
        self.assertEqual(digest_total(message), 12)
        self.assertEqual(mail.by_kind("pager"), [])
        send_datagrams(udp_address(two), [record("boom", "web2")] * 6)
        yield self.counted_everywhere([two], 18)
        yield self.pushed(two)
        one._cluster_flush()
        yield poll_until(lambda: mail.by_kind("pager"), "a page")
        mail.succeed_all()

    @defer.inlineCallbacks
    def test_waiting_push_in_the_snapshot(self):
        """
        A push that waits for Redis is in the snapshot: a node killed
        meanwhile (its state file taken by the next run) reports it.
        """
        mail = FakeMailTransport()
        one = self.start(mail)
        yield poll_until(lambda: one.cluster.connected, "Redis answering")
        self.redis.stop()
        send_datagrams(udp_address(one), [record("waits", "web1")] * 5)
        yield self.counted_everywhere([one], 5)
        yield one.cluster.push(one._take_counted)
        self.assertEqual(one.cluster.unpushed, 5)
        yield one.save_state()
        one._stop_timers()  # as if killed: nothing more from it
        again = self.start(mail, STATE_FILE=one.settings.STATE_FILE)
        self.assertEqual(sum(batch.total for batch in again._held.values()),
                         5)
        self.redis.start()  # so that the stops hand over, mailing nothing

    @defer.inlineCallbacks
    def test_seen_memory_shared_once_remembered(self):
        """
        What the leader's digest reported is in the seen-memory in Redis
        once it is remembered, not one digest later: the next leader does
        not take it for new.
        """
        mail = FakeMailTransport()
        one = self.start(mail)
        yield poll_until(lambda: one.cluster.leader, "a leader")
        send_datagrams(udp_address(one), [record("seen once", "web1")] * 2)
        yield self.counted_everywhere([one], 2)
        yield self.pushed(one)
        yield self.leader_digest(one, mail)
        yield poll_until(lambda: len(one.seen.rows()) == 1, "remembered")
        yield one.cluster.keep_lease()  # after the commit, in its thread
        _, rows = yield one.cluster.shared()
        self.assertEqual(rows, one.seen.rows())

    @defer.inlineCallbacks
    def test_take_over_retried(self):
        """
        A take-over that Redis did not answer is tried again at a later
        tick; until it is done, the new leader sends no digest.
        """
        mail = FakeMailTransport()
        one = self.start(mail)
        original, asked = one.cluster.shared, []

        def blip():
            asked.append(one._taken_over_for)
            if len(asked) == 1:
                return defer.fail(redis.ConnectionError("a blip"))
            return original()

        one.cluster.shared = blip
        yield poll_until(lambda: asked, "a take-over")
        self.assertEqual(one._cluster_flush(), [])
        self.assertIsNone(one._cluster_flushing, "flushed before taking")
        yield poll_until(lambda: one._taken_over_for == one.cluster.token,
                         "the take-over done at a later tick")
        self.assertEqual(asked, [None, None])

    @defer.inlineCallbacks
    def test_follower_pushes_what_it_held(self):
        """
        Errors a node held (from its state file, or while it was alone)
        reach the leader's digest once it follows, instead of staying.
        """
        mail = FakeMailTransport()
        one, two = yield self.leader_and_follower(mail)
        now = reactor.seconds()
        two._held["digest"] = batch(Entry(key("held here"), {"web2": 4},
                                          now, now))
        two._cluster_flush()
        self.assertEqual(two._held, {})
        yield self.pushed(two)
        message = yield self.leader_digest(one, mail)
        self.assertEqual(digest_total(message), 4)
        self.assertIn("held here", message.get_content())

    @defer.inlineCallbacks
    def test_silence_added_while_redis_is_down(self):
        """
        A silence added while Redis does not answer holds on its node,
        is not undone when Redis is back, and reaches the other nodes.
        """
        mail = FakeMailTransport()
        one, two = yield self.leader_and_follower(mail)
        self.redis.stop()
        silence = two.silences.add(
            {"match": {"message": "hush"}, "until": time.time() + 3600,
             "comment": "while down"}, time.time(),
            two.settings.unique_fields)
        yield poll_until(lambda: two.cluster.connected is False,
                         "Redis seen down")
        self.redis.start()
        yield poll_until(lambda: [found.id for found in one.silences.all()]
                         == [silence.id], "the silence shared")
        self.assertEqual([found.id for found in two.silences.all()],
                         [silence.id])

    @defer.inlineCallbacks
    def test_clean_stop_hands_over(self):
        """
        A leader stopped cleanly pushes what it counted and gives up the
        lease, sending no digest itself; the next leader's digest has its
        errors, and what it held.
        """
        mail = FakeMailTransport()
        one, two = yield self.leader_and_follower(mail)
        send_datagrams(udp_address(one), [record("handed", "web1")] * 6)
        yield self.counted_everywhere([one], 6)
        yield one.stopService()
        self.assertEqual(mail.by_kind("digest"), [])
        yield poll_until(lambda: two.cluster.leader, "the next leader")
        yield poll_until(lambda: two._taking_over is None, "take-over")
        two._cluster_flush()
        yield poll_until(lambda: mail.by_kind("digest"), "a digest")
        self.assertEqual([digest_total(message) for message in digests(mail)],
                         [6])

    @defer.inlineCallbacks
    def test_undelivered_digest_sent_by_next_leader(self):
        """
        A digest the leader could not deliver is in Redis: the node that
        takes the lease after it died sends it.
        """
        failing = FakeMailTransport()
        one = self.start(failing)
        yield poll_until(lambda: one.cluster.leader, "a leader")
        send_datagrams(udp_address(one), [record("stuck", "web1")] * 2)
        yield self.counted_everywhere([one], 2)
        one._cluster_flush()
        yield poll_until(lambda: failing.pending, "a delivery attempt")
        yield bounded(one._cluster_flushing or defer.succeed(None))
        failing.fail_all(ConnectionRefusedError())
        client = self.redis.client()
        self.assertEqual(client.hlen("failnozzle:failnozzle:outbox"), 1)
        # One dies: its lease runs out, it never comes back.
        one._stop_timers()
        client.delete("failnozzle:failnozzle:lease")
        delivered = FakeMailTransport()
        two = self.start(delivered)
        yield poll_until(lambda: two.cluster.leader, "the next leader")
        yield poll_until(lambda: delivered.pending, "the digest adopted")
        [message] = digests(delivered)
        self.assertEqual(digest_total(message), 2)
        yield poll_until(
            lambda: client.hlen("failnozzle:failnozzle:outbox") == 0,
            "the delivered digest forgotten")


class SilentRedisTests(TestCase):
    """A Redis that takes connections and never answers (hung, or its
    packets dropped): the node counts on, and stops without it."""

    @defer.inlineCallbacks
    def test_stop_asks_no_more(self):
        """
        A node stopping while Redis does not answer asks it nothing more:
        the calls queued for it fail at once instead of each waiting out
        the timeout (no new connection is made for them), and what the
        node counted is in the digest it sends itself.
        """
        silent = SilentServer(self)
        mail = FakeMailTransport()
        service = start_service(
            self, mail, CLUSTER_URL=f"redis://127.0.0.1:{silent.port}/0",
            CLUSTER_LEASE_SECONDS=3, FLUSH_SECONDS=3600,
            GROUP_WAIT_SECONDS=0, SERVER_NAME="nozzle")
        yield poll_until(lambda: service.cluster.connected is False,
                         "Redis found not answering")
        send_datagrams(udp_address(service), [record("hung", "web1")] * 4)
        yield poll_until(lambda: service.counts.received["udp"] >= 4,
                         "datagrams")
        asked = len(silent.connections)
        stopped = service.stopService()
        yield poll_until(lambda: mail.by_kind("digest"), "the digest")
        mail.succeed_all()
        yield stopped
        # The call under way when the stop began may connect once more.
        self.assertLessEqual(len(silent.connections) - asked, 1)
        [message] = digests(mail)
        self.assertEqual(digest_total(message), 4)
        self.assertIn("Redis unreachable", message["Subject"])


class DaemonTests(_TwistdTestCase):
    """
    Three C{twistd -n failnozzle} processes sharing a real redis-server,
    mailing a real SMTP server.
    """

    @defer.inlineCallbacks
    def start_nodes(self, sink: SMTPSink, count: int) -> list:
        redis_server = RedisServer(self)
        settings = self.smtp_settings(
            sink.port, flush_seconds=1, CLUSTER_URL=redis_server.url,
            CLUSTER_LEASE_SECONDS=3, GROUP_WAIT_SECONDS=0, REPEAT_SECONDS=0,
            SERVER_NAME="fleet")
        nodes = []
        for _ in range(count):
            process, address, _ = yield self.start_daemon(**settings)
            nodes.append((process, address))
        return nodes, redis_server

    @staticmethod
    def leader_of(nodes: list) -> tuple:
        leaders = [node for node in nodes
                   if "holds the flush lease" in node[0].text]
        return leaders[-1]

    @defer.inlineCallbacks
    def digests_until(self, process, sink: SMTPSink, total: int) -> list:
        """
        The digests that arrive until they count C{total} errors in all:
        a push that comes after a flush is in the next digest.
        """
        while True:
            messages = yield process.wait_for_mail(sink,
                                                   len(sink.messages) + 1)
            counted = sum(map(digest_total, messages))
            if counted >= total:
                return messages

    @defer.inlineCallbacks
    def test_one_digest_and_kill_9_of_the_leader(self):
        """
        Errors sent to three nodes are mailed by the leader only, each
        counted once; after the leader is killed with SIGKILL another
        takes over and mails the errors sent to the two left.
        """
        sink = SMTPSink(self)
        nodes, redis_server = yield self.start_nodes(sink, 3)
        yield nodes[0][0].wait_for("holds the flush lease")
        for index, (_, address) in enumerate(nodes):
            send_datagrams(address, [record("spread", f"web{index}")]
                           * (index + 2))
        first = yield self.digests_until(nodes[0][0], sink, 2 + 3 + 4)
        self.assertEqual(sum(map(digest_total, first)), 9)
        # Killed once its digests and merges are done with in Redis: one
        # killed before would have them sent again (at least once).
        client = redis_server.client()
        yield poll_until(lambda: not client.exists(
            "failnozzle:failnozzle:outbox", "failnozzle:failnozzle:periods"),
            "the digests forgotten")
        process, _ = self.leader_of(nodes)
        process.transport.signalProcess("KILL")
        yield process.wait_for_end()
        left = [node for node in nodes if node[0] is not process]
        for _, address in left:
            send_datagrams(address, [record("after", "web9")] * 5)
        messages = yield self.digests_until(left[0][0], sink, 9 + 10)
        self.assertEqual(sum(map(digest_total, messages)), 19)
        self.assertTrue(any("holds the flush lease" in node[0].text
                            for node in left))


class VisibleTests(TestCase):
    """Connection state, lease holder and merge lag in status and
    metrics."""

    @defer.inlineCallbacks
    def test_status_and_metrics(self):
        redis_server = RedisServer(self)
        service = start_service(self, FakeMailTransport(),
                                CLUSTER_URL=redis_server.url)
        yield poll_until(lambda: service.cluster.leader, "a leader")
        send_datagrams(udp_address(service), [record("seen", "web1")])
        yield poll_until(lambda: service.cluster.last_push is not None,
                         "a push")
        shown = json_of(render(service, "/status"))["cluster"]
        self.assertEqual(
            (shown["node"], shown["connected"], shown["leader"],
             shown["lease_holder"], shown["alone"], shown["unpushed"]),
            (service.cluster.name, True, True, service.cluster.name, False,
             0))
        self.assertLess(abs(shown["last_push"] - time.time()), 30)
        page = body_of(render(service, "/")).decode()
        self.assertIn("holds the flush lease", page)
        metrics = body_of(render(service, "/metrics")).decode()
        self.assertIn("failnozzle_cluster_leader 1.0", metrics)
        self.assertIn("failnozzle_cluster_connected 1.0", metrics)
        redis_server.stop()
        send_datagrams(udp_address(service), [record("unseen", "web1")])
        yield poll_until(lambda: service.cluster.unpushed, "a failed push")
        shown = json_of(render(service, "/status"))["cluster"]
        self.assertEqual((shown["connected"], shown["unpushed"]), (False, 1))
        self.assertIn("Redis unreachable",
                      body_of(render(service, "/")).decode())
        metrics = body_of(render(service, "/metrics")).decode()
        self.assertIn("failnozzle_cluster_connected 0.0", metrics)
        self.assertIn("failnozzle_cluster_unpushed_errors 1.0", metrics)
