"""
The benchmark scripts drive the daemon's own code (bench/ must not copy
it): run in process with small numbers, they must still fit it.  Their
figures are not checked here; the scripts print them.
"""
import os
import sys

from twisted.trial.unittest import SynchronousTestCase

_BENCH = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "bench")


def bench_module(name: str):
    """The module bench/C{name}.py, imported as its scripts import it."""
    if _BENCH not in sys.path:
        sys.path.insert(0, _BENCH)
    __import__(name)
    return sys.modules[name]


class FlushBenchTests(SynchronousTestCase):
    """
    bench/ingest.py's in-process flush scenario runs the service's flush
    and its digest steps.
    """

    def test_flush_phases(self):
        """
        The whole flush writes the digest into the maildir.
        """
        timings = bench_module("ingest").time_flush_phases(50, 2)
        self.assertGreater(timings["digest bytes"], 0)

    def test_digest_steps(self):
        """
        The digest is made in more than one step, each timed.
        """
        steps = bench_module("ingest").digest_steps(50, 2)
        self.assertGreater(len(steps), 1)


class RoutingBenchTests(SynchronousTestCase):
    """
    bench/routing.py routes through the daemon's own rules.
    """

    def test_routes(self):
        """
        The instances routed and the rest add up to those given: the
        database hosts' rule splits errors by host and loses none.
        """
        routing = bench_module("routing")
        from failnozzle.routing import route
        entries = routing.batch(40)
        routed, rest = route(entries, routing.rules(20),
                             routing.FIELDS)
        self.assertEqual(
            sum(entry.total for matched in routed.values()
                for entry in matched) + sum(entry.total for entry in rest),
            sum(entry.total for entry in entries))
