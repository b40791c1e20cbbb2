"""
L{poststack_relay.rates}: events per key in a sliding window, through the
fleet state.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.fleet import LocalState
from poststack_relay.rates import RateLimit, seconds_until_at_most, sliding_estimate


class EstimateTests(SynchronousTestCase):
    def test_estimate(self) -> None:
        """
        The previous bucket counts for the share of it still in the window.
        """
        self.assertEqual(sliding_estimate(10, 4, 0.0, 60.0), 14.0)
        self.assertEqual(sliding_estimate(10, 4, 30.0, 60.0), 9.0)
        self.assertEqual(sliding_estimate(10, 4, 60.0, 60.0), 4.0)

    def test_until_within_bucket(self) -> None:
        """
        With the current bucket under the bound, the previous one sliding
        out is enough: 10 * (1 - (e + t) / 60) + 4 <= 9 at e + t = 30.
        """
        self.assertAlmostEqual(seconds_until_at_most(10, 4, 12.0, 60.0, 9), 18.0)
        self.assertEqual(seconds_until_at_most(10, 4, 30.0, 60.0, 9), 0.0)

    def test_until_next_bucket(self) -> None:
        """
        With the current bucket over the bound, the wait runs into the next
        bucket: 20 * (1 - g) <= 10 at g = 1/2, 30 s into it.
        """
        self.assertAlmostEqual(seconds_until_at_most(5, 20, 50.0, 60.0, 10), 40.0)
        # A bound of 0 (limit 1): the whole bucket must slide out.
        self.assertAlmostEqual(seconds_until_at_most(0, 1, 10.0, 60.0, 0), 110.0)


class RateLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(60 * 20_000)  # the start of a bucket
        self.state = LocalState(self.clock)

    def test_limit(self) -> None:
        """
        C{limit} events are allowed; the next is refused with the seconds
        until one is allowed again, and refusals are not counted.
        """
        rate = RateLimit(self.state, self.clock, 3, 60.0, "conn")
        self.assertEqual([rate.hit("a") for _ in range(3)], [None, None, None])
        # Next bucket, 3 * (1 - g) <= 2 at g = 1/3: 60 + 20 s.
        self.assertEqual(rate.hit("a"), 80)
        self.assertEqual(rate.hit("a"), 80)
        self.assertEqual(rate.rate("a"), 3.0)
        # Other keys are counted apart.
        self.assertIsNone(rate.hit("b"))

    def test_window_slides(self) -> None:
        """
        The burst slides out of the window: one event is allowed again
        once the estimate leaves room for it, at the advertised time.
        """
        rate = RateLimit(self.state, self.clock, 4, 60.0, "conn")
        for _ in range(4):
            self.assertIsNone(rate.hit("a"))
        self.clock.advance(30)
        wait = rate.hit("a")
        # Next bucket, 4 * (1 - g) <= 3 at g = 1/4: 30 + 15 s.
        self.assertEqual(wait, 45)
        assert wait is not None
        self.clock.advance(wait - 1)
        self.assertIsNotNone(rate.hit("a"))
        self.clock.advance(1)
        self.assertIsNone(rate.hit("a"))

    def test_steady_pace(self) -> None:
        """
        A sender below the limit's pace is never refused, over many
        windows.
        """
        rate = RateLimit(self.state, self.clock, 60, 60.0, "conn")
        for _ in range(600):
            self.assertIsNone(rate.hit("a"))
            self.clock.advance(1.25)

    def test_off(self) -> None:
        """
        A limit of 0 allows everything and counts nothing.
        """
        rate = RateLimit(self.state, self.clock, 0, 60.0, "conn")
        for _ in range(100):
            self.assertIsNone(rate.hit("a"))
        self.assertEqual(len(self.state), 0)

    def test_prefixes_apart(self) -> None:
        """
        Two rates on one state count apart.
        """
        connections = RateLimit(self.state, self.clock, 1, 60.0, "conn")
        logins = RateLimit(self.state, self.clock, 1, 60.0, "auth")
        self.assertIsNone(connections.hit("a"))
        self.assertIsNone(logins.hit("a"))
        self.assertIsNotNone(connections.hit("a"))

    def test_bad_arguments(self) -> None:
        with self.assertRaises(ValueError):
            RateLimit(self.state, self.clock, -1)
        with self.assertRaises(ValueError):
            RateLimit(self.state, self.clock, 1, 0.0)
