# -*- test-case-name: tests.test_fleet_local -*-
"""
L{LocalState}: the fleet state of one relay process, in memory.

It is the whole store when no Redis is configured (a single relay, C{make
run}, a systemd unit), and the mirror that answers every read at once when
one is (L{poststack_relay.fleet.redis.RedisState} writes what the fleet
says into it).  Everything here is synchronous and bounded.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence, TypeVar

import attrs
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from ..interfaces import IFleetState

__all__ = ["DEFAULT_MAX_COUNTERS", "DEFAULT_MAX_NOTES", "LocalState"]

# The most counters (client addresses, mailboxes) and notes remembered.
DEFAULT_MAX_COUNTERS = 100_000
DEFAULT_MAX_NOTES = 10_000


_V = TypeVar("_V")


@attrs.define
class _Count:
    count: int
    expires: float


@implementer(IFleetState)
class LocalState:
    """
    Counters with a sliding window and notes with a lifetime, in memory.

    A counter is forgotten once its window passes with no new addition (the
    window restarts at each addition).  A note is forgotten when its time
    is up.  Memory is bounded: past C{max_counters} counters (or
    C{max_notes} notes) the least recently changed are forgotten first.

    @param clock: the time source.
    """

    def __init__(
        self,
        clock: IReactorTime,
        max_counters: int = DEFAULT_MAX_COUNTERS,
        max_notes: int = DEFAULT_MAX_NOTES,
    ) -> None:
        self._clock = clock
        self.max_counters = max_counters
        self.max_notes = max_notes
        # Least recently changed first.
        self._counts: OrderedDict[str, _Count] = OrderedDict()
        self._notes: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        """
        How many counters are remembered.
        """
        return len(self._counts)

    def _expire(self, now: float) -> None:
        counts = self._counts
        # Usually every counter has the same window, so the expired ones
        # are first; a longer-lived one in front only delays the sweep
        # (reads check each counter's own expiry).
        while counts:
            key, entry = next(iter(counts.items()))
            if entry.expires > now:
                break
            del counts[key]

    def counts(self, keys: Sequence[str]) -> list[int]:
        """
        See L{IFleetState.counts}.
        """
        now = self._clock.seconds()
        self._expire(now)
        out = []
        for key in keys:
            entry = self._counts.get(key)
            out.append(entry.count if entry is not None and entry.expires > now else 0)
        return out

    def add(self, keys: Sequence[str], window: float) -> list[int]:
        """
        See L{IFleetState.add}.
        """
        now = self._clock.seconds()
        self._expire(now)
        out = []
        for key in keys:
            entry = self._counts.pop(key, None)
            if entry is None or entry.expires <= now:
                entry = _Count(0, now)
            entry.count += 1
            entry.expires = now + window
            self._counts[key] = entry  # now the most recent
            out.append(entry.count)
        self._bound(self._counts, self.max_counters)
        return out

    def seconds_left(self, keys: Sequence[str]) -> list[float]:
        """
        See L{IFleetState.seconds_left}.
        """
        now = self._clock.seconds()
        out = []
        for key in keys:
            entry = self._counts.get(key)
            out.append(max(0.0, entry.expires - now) if entry is not None else 0.0)
        return out

    def put_count(self, key: str, count: int, window: float) -> None:
        """
        Set a counter to what the fleet says it is, for C{window} seconds,
        unless this relay counted more in its live window (failures counted
        while Redis did not answer, or an announcement overtaken by a later
        addition): a count never goes backwards before its window passes.
        """
        now = self._clock.seconds()
        entry = self._counts.pop(key, None)
        if entry is not None and entry.expires > now:
            count = max(count, entry.count)
        self._counts[key] = _Count(count, now + window)
        self._bound(self._counts, self.max_counters)

    def remember(self, subject: str, value: str, seconds: float) -> None:
        """
        See L{IFleetState.remember}.
        """
        self._notes.pop(subject, None)
        if seconds > 0:
            self._notes[subject] = (value, self._clock.seconds() + seconds)
            self._bound(self._notes, self.max_notes)

    def recall(self, subject: str) -> Optional[tuple[str, float]]:
        """
        See L{IFleetState.recall}.
        """
        note = self._notes.get(subject)
        if note is None:
            return None
        left = note[1] - self._clock.seconds()
        if left <= 0:
            del self._notes[subject]
            return None
        return note[0], left

    @staticmethod
    def _bound(entries: "OrderedDict[str, _V]", most: int) -> None:
        while len(entries) > most:
            entries.popitem(last=False)
