# -*- test-case-name: tests.test_api_retry -*-
"""
A bound on the API requests in flight: L{RequestSlots}, a counting
semaphore with timed, first-come first-served waits.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["NoSlot", "RequestSlots"]


class NoSlot(Exception):
    """
    No request slot became free in time.
    """


class RequestSlots:
    """
    A counting semaphore for API requests, with timed, first-come
    first-served waits.

    At most C{limit} slots are held at once.  A released slot goes straight
    to the longest waiter.  A waiter whose time runs out, or whose Deferred
    is cancelled, leaves the queue and never takes a slot.

    @ivar limit: the most slots held at once.
    @ivar held: slots held now.
    """

    def __init__(self, limit: int, clock: IReactorTime) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self.limit = limit
        self.held = 0
        self._clock = clock
        self._waiting: deque[tuple["Deferred[None]", IDelayedCall]] = deque()

    @property
    def waiting(self) -> int:
        """
        How many acquirers are queued.
        """
        return len(self._waiting)

    def acquire(self, timeout: float) -> "Deferred[None]":
        """
        Take a slot: fires with C{None} once one is held, or fails with
        C{NoSlot} after C{timeout} seconds.  Cancelling the Deferred
        leaves the queue.  Every success must be paired with L{release}.
        """
        if self.held < self.limit and not self._waiting:
            self.held += 1
            return succeed(None)
        if timeout <= 0:
            return fail(NoSlot())

        def cancel(d: "Deferred[None]") -> None:
            self._forget(d)

        waiter: Deferred[None] = Deferred(cancel)

        def expire() -> None:
            if self._forget(waiter):
                waiter.errback(NoSlot())

        self._waiting.append((waiter, self._clock.callLater(timeout, expire)))
        return waiter

    def _forget(self, waiter: "Deferred[None]") -> bool:
        for entry in self._waiting:
            if entry[0] is waiter:
                self._waiting.remove(entry)
                if entry[1].active():
                    entry[1].cancel()
                return True
        return False

    def release(self) -> None:
        """
        Give a slot back: to the first waiter, if any.
        """
        if self._waiting:
            waiter, timer = self._waiting.popleft()
            if timer.active():
                timer.cancel()
            waiter.callback(None)  # the slot passes on; held is unchanged
        else:
            self.held -= 1

