"""
Tests for L{failnozzle.pager}: when to page, remind and resolve, and what
a page names, fed numbers and times as the service feeds it.
"""
from twisted.trial.unittest import SynchronousTestCase

from failnozzle.pager import (BACK, FIRING, MISSED, REMINDER, RESOLVED,
                              CanaryWatch, Culprit, Pager)


def culprits(**counts):
    return {name: Culprit(f"{name} failed", "shop", count)
            for name, count in counts.items()}


class WindowTests(SynchronousTestCase):

    def test_sliding_window(self):
        """
        The window sums the last C{size} flushes and fires when the sum
        reaches the limit; the original's test sequence gives the same
        answers.
        """
        pager = Pager(3, 3, 3600)
        fired = [pager.observe(now, count) is not None
                 for now, count in enumerate([1, 0, 1, 1, 5])]
        self.assertEqual(fired, [False, False, False, False, True])
        self.assertEqual(pager.counts, [1, 1, 5])

    def test_limit_reached_exactly(self):
        """Reaching the limit exactly is enough, as in the original."""
        self.assertEqual(Pager(5, 10, 3600).observe(0, 10).what, FIRING)


class CycleTests(SynchronousTestCase):
    """Fire once, remind, resolve."""

    def test_pages_once_then_reminds(self):
        """
        While the rate stays over the limit there is no second page until
        PAGER_REPEAT_SECONDS have passed; then a reminder that says since
        when and how many since.
        """
        pager = Pager(2, 10, 3600)
        page = pager.observe(60, 12)
        self.assertEqual((page.what, page.since, page.total), (FIRING, 60, 12))
        for now in range(120, 3660, 60):
            self.assertIsNone(pager.observe(now, 10))
        page = pager.observe(3660, 10)
        self.assertEqual(page.what, REMINDER)
        self.assertEqual((page.since, page.at), (60, 3660))
        self.assertEqual(page.total, 12 + 10 * 60)
        self.assertIsNone(pager.observe(3720, 10))

    def test_resolves_after_a_whole_window_below(self):
        """
        Once the window's count has been below the limit for a whole
        window (of flushes), one "resolved", with the duration's bounds
        and the total; then quiet, and a new storm pages anew.
        """
        pager = Pager(3, 10, 3600)
        pager.observe(0, 10)
        answers = [pager.observe(now, count)
                   for now, count in [(60, 0), (120, 0), (180, 0), (240, 0),
                                      (300, 0)]]
        # The window held 10 until the 10 slid out at 180; then 3 below.
        self.assertEqual([page and page.what for page in answers],
                         [None, None, None, None, RESOLVED])
        resolved = answers[-1]
        self.assertEqual((resolved.since, resolved.at, resolved.total),
                         (0, 300, 10))
        self.assertIsNone(pager.observe(360, 0))
        self.assertEqual(pager.observe(420, 10).what, FIRING)

    def test_flapping_is_one_alert(self):
        """A flush back over the limit before the window is quiet starts
        the count of quiet flushes again: no resolve, no new page."""
        pager = Pager(2, 10, 3600)
        pager.observe(0, 10)
        answers = [pager.observe(now, count) for now, count in
                   [(60, 0), (120, 0), (180, 10), (240, 0), (300, 0),
                    (360, 0)]]
        self.assertEqual([page and page.what for page in answers],
                         [None, None, None, None, None, RESOLVED])
        self.assertEqual(answers[-1].total, 20)

    def test_names_top_errors_and_hosts(self):
        """
        A page names the window's errors, summed over its flushes, most
        first (new if new in any), and its hosts with the most.
        """
        pager = Pager(2, 10, 3600)
        pager.observe(0, 5, culprits(a=4, b=1), {"web1": 5})
        new = {"c": Culprit("c failed", "billing", 6, new=True)}
        page = pager.observe(60, 7, {**culprits(a=1), **new},
                             {"web1": 1, "web2": 6})
        self.assertEqual([(c.headline, c.count, c.new)
                          for c in page.culprits],
                         [("c failed", 6, True), ("a failed", 5, False),
                          ("b failed", 1, False)])
        self.assertEqual(page.hosts, (("web1", 6), ("web2", 6)))
        self.assertEqual(page.window_total, 12)


class KeptTests(SynchronousTestCase):

    def test_saved_and_restored(self):
        """
        Where the alert stands survives a restart: a restored pager goes
        on reminding and resolves the alert the last run began.
        """
        pager = Pager(2, 10, 3600)
        self.assertIsNone(pager.saved())
        pager.observe(0, 10)
        pager.observe(60, 3)
        again = Pager(2, 10, 3600)
        again.restore(pager.counts, pager.saved(), now=60)
        self.assertIsNone(again.observe(120, 0))
        resolved = again.observe(180, 0)
        self.assertEqual((resolved.what, resolved.since, resolved.total),
                         (RESOLVED, 0, 13))

    def test_configure_keeps_what_fits(self):
        pager = Pager(3, 10, 3600)
        for now, count in enumerate([4, 4, 1]):
            pager.observe(now, count)
        pager.configure(2, 5, 60)
        self.assertEqual(pager.counts, [4, 1])
        self.assertEqual(pager.observe(10, 4).what, FIRING)

    def test_restored_times_not_ahead(self):
        """A clock set back across a restart: the alert's times are taken
        as now, not left ahead (no reminder would come until then)."""
        pager = Pager(1, 10, 60)
        pager.observe(5000, 10)
        again = Pager(1, 10, 60)
        again.restore(pager.counts, pager.saved(), now=100)
        self.assertEqual((again.since, again.last_paged), (100, 100))
        self.assertEqual(again.observe(160, 10).what, REMINDER)


class CanaryWatchTests(SynchronousTestCase):
    """CANARY_MAX_SILENCE_SECONDS."""

    def test_missed_once_then_back(self):
        watch = CanaryWatch(300)
        self.assertIsNone(watch.observe(60, None), "none seen yet")
        self.assertIsNone(watch.observe(120, 100))
        self.assertIsNone(watch.observe(360, None))
        self.assertEqual(watch.observe(420, None), MISSED)
        self.assertIsNone(watch.observe(480, None), "told once")
        self.assertEqual(watch.observe(540, 530), BACK)
        self.assertIsNone(watch.observe(600, None))

    def test_off(self):
        watch = CanaryWatch(0)
        watch.observe(0, 0)
        self.assertIsNone(watch.observe(10 ** 9, None))

    def test_restored(self):
        """What the last run saw counts: a restart does not wait for a
        first canary to start watching."""
        watch = CanaryWatch(300)
        watch.observe(100, 100)
        again = CanaryWatch(300)
        # Down for an hour: a full CANARY_MAX_SILENCE_SECONDS from the
        # start before they are missed.
        again.restore(watch.saved(), now=3700)
        self.assertIsNone(again.observe(3760, None))
        self.assertEqual(again.observe(4000, None), MISSED)
        later = CanaryWatch(300)
        later.restore(again.saved(), now=5000)
        self.assertIsNone(later.observe(5400, None), "already told")
        self.assertEqual(later.observe(5460, 5450), BACK)
