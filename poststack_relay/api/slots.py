# -*- test-case-name: tests.test_api_slots,tests.test_api_retry -*-
"""
A bound on the API requests in flight, shared fairly between tenants:
L{RequestSlots}, a counting semaphore with timed, first-come first-served
waits and a cap on the slots one tenant (one sending credential) may hold.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["NoSlot", "RequestSlots", "tenant_share"]


def tenant_share(limit: int, per_tenant: int) -> int:
    """
    The slots one tenant may hold of C{limit}: C{per_tenant}, or if it is
    C{0} (the default of C{--api-max-in-flight-per-credential}) a quarter
    of C{limit}, at least 1; never more than C{limit}.

    A quarter: a flood from one customer leaves three quarters of the
    slots to everybody else, and it takes four customers flooding at once
    to fill the pool; a steady sender with fewer parallel connections than
    that (16 of the default 64) never meets the cap.
    """
    if per_tenant < 0:
        raise ValueError(f"per_tenant must not be negative, not {per_tenant}")
    return min(limit, per_tenant or max(1, limit // 4))


class NoSlot(Exception):
    """
    No request slot became free in time.
    """


class _Waiter:
    """
    One queued acquirer: its place in the arrival order, its tenant, the
    Deferred it waits on and the timer that ends its wait.
    """

    __slots__ = ("order", "tenant", "deferred", "timer")

    def __init__(self, order: int, tenant: Optional[str], deferred: "Deferred[None]") -> None:
        self.order = order
        self.tenant = tenant
        self.deferred = deferred
        self.timer: Optional[IDelayedCall] = None


class RequestSlots:
    """
    A counting semaphore for API requests, with timed, first-come
    first-served waits and a per-tenant cap.

    At most C{limit} slots are held at once, and at most C{per_tenant} of
    them by one tenant (a request without a tenant, C{None}, has no cap).
    A released slot goes straight to the longest waiter whose tenant holds
    less than its cap; a waiter whose tenant is at its cap waits on without
    holding back those behind it.  So there is never a free slot and a
    waiter that could take it at the same time, and a new acquirer takes a
    free slot at once if its tenant is under its cap (no waiter could have
    had it).  A waiter whose time runs out, or whose Deferred is cancelled,
    leaves the queue and never takes a slot.

    Cost: taking a free slot is a comparison, a dict read and a dict write;
    handing a released slot on looks at the head of each waiting tenant's
    queue (one per tenant waiting, not one per waiter).

    @ivar limit: the most slots held at once.
    @ivar per_tenant: the most slots one tenant holds at once.
    @ivar held: slots held now.
    """

    def __init__(
        self,
        limit: int,
        clock: IReactorTime,
        per_tenant: Optional[int] = None,
        capped: Optional[Callable[[], None]] = None,
    ) -> None:
        """
        @param per_tenant: the cap per tenant; C{None}: C{limit} (no cap
            beyond the pool's).  More than C{limit} means C{limit}.
        @param capped: called (cheaply, no arguments) each time an
            acquirer finds its tenant already holding C{per_tenant} slots,
            for a metric.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        if per_tenant is None:
            per_tenant = limit
        if per_tenant < 1:
            raise ValueError(f"per_tenant must be at least 1, not {per_tenant}")
        self.limit = limit
        self.per_tenant = min(per_tenant, limit)
        self.held = 0
        self._clock = clock
        self._capped = capped
        # Slots held per tenant; a tenant holding none has no entry, so the
        # dict stays as small as the number of tenants in flight.
        self._tenants: dict[str, int] = {}
        # The waiters, one FIFO queue per tenant that has any (in the order
        # tenants first queued); each waiter knows its arrival order.
        self._queues: dict[Optional[str], deque[_Waiter]] = {}
        self._waiting = 0
        self._arrivals = 0

    @property
    def waiting(self) -> int:
        """
        How many acquirers are queued.
        """
        return self._waiting

    @property
    def waiting_capped(self) -> int:
        """
        How many queued acquirers wait on because their tenant holds its
        cap (rather than for a free slot); counted on demand, for a gauge.
        """
        cap, tenants = self.per_tenant, self._tenants
        return sum(
            len(queue)
            for tenant, queue in self._queues.items()
            if tenant is not None and tenants.get(tenant, 0) >= cap
        )

    def held_by(self, tenant: str) -> int:
        """
        How many slots C{tenant} holds now.
        """
        return self._tenants.get(tenant, 0)

    def acquire(self, timeout: float, tenant: Optional[str] = None) -> "Deferred[None]":
        """
        Take a slot for C{tenant}: fires with C{None} once one is held, or
        fails with C{NoSlot} after C{timeout} seconds.  Cancelling the
        Deferred leaves the queue.  Every success must be paired with a
        L{release} for the same tenant.
        """
        if tenant is None:
            if self.held < self.limit:
                self.held += 1
                return succeed(None)
        else:
            has = self._tenants.get(tenant, 0)
            if has < self.per_tenant:
                if self.held < self.limit:
                    self._tenants[tenant] = has + 1
                    self.held += 1
                    return succeed(None)
            elif self._capped is not None:
                self._capped()
        if timeout <= 0:
            return fail(NoSlot())

        def cancel(_: "Deferred[None]") -> None:
            self._forget(waiter)

        waiter = _Waiter(self._arrivals, tenant, Deferred(cancel))
        self._arrivals += 1
        waiter.timer = self._clock.callLater(timeout, self._expire, waiter)
        queue = self._queues.get(tenant)
        if queue is None:
            queue = self._queues[tenant] = deque()
        queue.append(waiter)
        self._waiting += 1
        return waiter.deferred

    def _expire(self, waiter: _Waiter) -> None:
        if self._forget(waiter):
            waiter.deferred.errback(NoSlot())

    def _forget(self, waiter: _Waiter) -> bool:
        """
        Take C{waiter} out of its queue, if it is still there, and stop its
        timer; C{True} if it was there.
        """
        queue = self._queues.get(waiter.tenant)
        if queue is None:
            return False
        try:
            queue.remove(waiter)  # _Waiter compares by identity
        except ValueError:
            return False
        if not queue:
            del self._queues[waiter.tenant]
        self._waiting -= 1
        timer = waiter.timer
        if timer is not None and timer.active():
            timer.cancel()
        return True

    def _next(self) -> Optional[_Waiter]:
        """
        The longest waiter whose tenant holds less than its cap, if any.
        """
        cap, tenants = self.per_tenant, self._tenants
        best: Optional[_Waiter] = None
        for tenant, queue in self._queues.items():
            if tenant is not None and tenants.get(tenant, 0) >= cap:
                continue
            head = queue[0]
            if best is None or head.order < best.order:
                best = head
        return best

    def release(self, tenant: Optional[str] = None) -> None:
        """
        Give back a slot C{tenant} held: to the longest waiter that may
        take it, if any.
        """
        if tenant is not None:
            left = self._tenants[tenant] - 1
            if left:
                self._tenants[tenant] = left
            else:
                del self._tenants[tenant]
        if self._waiting:
            waiter = self._next()
            if waiter is not None:
                queue = self._queues[waiter.tenant]
                queue.popleft()
                if not queue:
                    del self._queues[waiter.tenant]
                self._waiting -= 1
                if waiter.tenant is not None:
                    self._tenants[waiter.tenant] = self._tenants.get(waiter.tenant, 0) + 1
                timer = waiter.timer
                if timer is not None and timer.active():
                    timer.cancel()
                # The slot passes on (held is unchanged); the state is
                # settled before the waiter runs, which may acquire or
                # release again.
                waiter.deferred.callback(None)
                return
        self.held -= 1
