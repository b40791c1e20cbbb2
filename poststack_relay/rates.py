# -*- test-case-name: tests.test_rates -*-
"""
Rates in a sliding window: how many events (connections, logins...) one
key (a client address) had in the last C{period} seconds, and whether one
more is allowed under a limit (Postfix's anvil).

L{RateLimit} counts through an L{IFleetState}, so a fleet that shares its
state (C{--redis-url}) shares the rates too; every answer comes from the
relay's own memory at once, never from a round trip.

The window slides without remembering every event: each key is counted in
fixed buckets of C{period} seconds (two counters per key at most), and the
rate is the current bucket's count plus the previous bucket's, weighted by
the part of it still inside the window (L{sliding_estimate}).  A steady
sender below the limit's pace is never refused; a burst is refused until
enough of it has slid out of the window (L{seconds_until_at_most}).
"""

from __future__ import annotations

import math
from typing import Optional

from twisted.internet.interfaces import IReactorTime

from .interfaces import IFleetState

__all__ = ["RateLimit", "seconds_until_at_most", "sliding_estimate"]


def sliding_estimate(previous: int, current: int, elapsed: float, period: float) -> float:
    """
    Events in the last C{period} seconds: all of the C{current} bucket's
    (C{elapsed} seconds old) and the share of the C{previous} bucket's
    still inside the window.
    """
    return current + previous * (1.0 - elapsed / period)


def seconds_until_at_most(
    previous: int, current: int, elapsed: float, period: float, most: float
) -> float:
    """
    Seconds until L{sliding_estimate} is at most C{most} if no event comes
    meanwhile (0 if it already is).
    """
    if sliding_estimate(previous, current, elapsed, period) <= most:
        return 0.0
    if current <= most:
        # Within this bucket, as the previous one slides out (previous > 0).
        return period * (1.0 - (most - current) / previous) - elapsed
    # In the next bucket, as this one slides out.
    return (period - elapsed) + period * (1.0 - most / current)


class RateLimit:
    """
    At most C{limit} events per key in any C{period} seconds.

    An event that is refused is not counted: a client that keeps trying
    gets in at the limit's pace, and a refusal costs no write to a shared
    store.

    @param state: where the counts live (the relay's L{IFleetState}).
    @param clock: the time source (buckets follow its C{seconds()}).
    @param limit: events allowed per C{period}; C{0}: no limit (nothing is
        counted).
    @param period: the window, in seconds.
    @param prefix: names this rate's counters in C{state} (C{conn}, C{auth}):
        each rate has its own.
    """

    def __init__(
        self,
        state: IFleetState,
        clock: IReactorTime,
        limit: int,
        period: float = 60.0,
        prefix: str = "rate",
    ) -> None:
        if limit < 0 or period <= 0:
            raise ValueError(f"limit must not be negative and period positive: {limit}, {period}")
        self.state = state
        self.clock = clock
        self.limit = limit
        self.period = period
        self.prefix = prefix

    def _keys(self, key: str) -> tuple[list[str], float]:
        now = self.clock.seconds()
        bucket = math.floor(now / self.period)
        elapsed = now - bucket * self.period
        keys = [f"{self.prefix}:{bucket}:{key}", f"{self.prefix}:{bucket - 1}:{key}"]
        return keys, elapsed

    def rate(self, key: str) -> float:
        """
        The events of C{key} in the last C{period} seconds (an estimate,
        see the module).
        """
        keys, elapsed = self._keys(key)
        current, previous = self.state.counts(keys)
        return sliding_estimate(previous, current, elapsed, self.period)

    def hit(self, key: str) -> Optional[int]:
        """
        One more event for C{key}: C{None} if it is allowed (and counted),
        else the whole seconds (at least 1) to wait before one is allowed
        again (nothing counted).
        """
        if self.limit == 0:
            return None
        keys, elapsed = self._keys(key)
        current, previous = self.state.counts(keys)
        most = self.limit - 1  # events before this one, for it to be allowed
        if sliding_estimate(previous, current, elapsed, self.period) > most:
            wait = seconds_until_at_most(previous, current, elapsed, self.period, most)
            return max(1, math.ceil(wait))
        # The current bucket must outlive the next one, where it is the
        # previous bucket.
        self.state.add(keys[:1], 2 * self.period)
        return None
