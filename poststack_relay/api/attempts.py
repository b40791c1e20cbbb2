# -*- test-case-name: tests.test_api_retry -*-
"""
One API call as the relay makes it: a request slot, the circuit breaker,
then attempts until an answer is final, the retry policy gives up or the
deadline comes (L{Attempts}).  Each attempt has its own time-out, covering
the whole answer, and is counted in the upstream metrics.
"""

from __future__ import annotations

from typing import Callable, Optional

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from ..metrics import UpstreamMetrics
from ..replies import API_CLIENT_ERROR, API_NO_ANSWER, API_TIMEOUT
from .answers import Answer
from .body import Body
from .breaker import CircuitBreaker
from .errors import NETWORK_ERRORS, AttemptError, Refused
from .retry import RetryPolicy
from .slots import NoSlot, RequestSlots
from .transport import APITransport, PreparedURL

__all__ = ["Attempts", "Request"]

_log = Logger(namespace=__package__)  # every API event: "poststack_relay.api"


@attrs.frozen
class Request:
    """
    One API request, as every attempt makes it.

    @ivar method: C{"GET"} or C{"POST"}.
    @ivar path: the path, for logs (C{"/emails"}).
    @ivar url: the prepared URL.
    @ivar headers: the request's headers.
    @ivar data: the body, if any.
    @ivar throttled: called with the seconds of C{Retry-After} whenever an
        attempt is answered with a throttling C{429} (before any retry), so
        the relays can refuse this credential's next messages at C{MAIL
        FROM} (L{poststack_relay.holds}).
    """

    method: str
    path: str
    url: PreparedURL
    headers: Headers
    data: Optional[Body] = None
    throttled: Optional[Callable[[float], None]] = None


@attrs.define
class Attempts:
    """
    Makes API calls: one slot, one breaker decision and one attempt at a
    time, retried by the policy within a deadline.

    @ivar transport: makes one request.
    @ivar clock: for time-outs, back-off and the deadline.
    @ivar slots: the request slots (shared by every call).
    @ivar breaker: the circuit breaker (shared by every call).
    @ivar policy: the retry policy.
    @ivar timeout: seconds one attempt may take, from sending the request
        to the last byte of the answer.
    @ivar deadline: seconds all attempts of one message may take.
    @ivar queue_timeout: seconds a call may wait for a slot.
    @ivar reachable: called with the clock's time for every answer that is
        not a 5xx.
    """

    transport: APITransport
    clock: IReactorTime
    slots: RequestSlots
    breaker: CircuitBreaker
    policy: RetryPolicy
    timeout: float
    deadline: float
    queue_timeout: float
    reachable: Callable[[float], None]

    async def attempt(
        self, request: Request, timeout: float, upstream: UpstreamMetrics
    ) -> Answer:
        """
        One attempt, counted in C{upstream} (status and duration).

        The time-out is ours, not treq's: treq's C{timeout=} only covers the
        wait for the response headers, while a body that trickles in must
        not hold an SMTP session forever either.  When it expires the
        request is cancelled, which closes its connection (before the
        headers Twisted aborts it, after them the body reader stops it), so
        a half-used connection never returns to the pool.

        @raise AttemptError: no complete answer arrived in C{timeout}
            seconds.  A cancellation from outside stays a
            C{CancelledError}.
        """
        exchange = Deferred.fromCoroutine(
            self.transport.exchange(request.method, request.url, request.headers, request.data)
        )
        expired: list[bool] = []
        cancelled: list[bool] = []

        def expire() -> None:
            expired.append(True)
            exchange.cancel()

        def cancel(_: object) -> None:
            # Cancelled from outside (the message was abandoned).  What the
            # attempt then fails with (often ResponseNeverReceived) says
            # nothing about the API.
            cancelled.append(True)
            exchange.cancel()

        outcome: Deferred[Answer] = Deferred(cancel)
        exchange.chainDeferred(outcome)
        clock = self.clock
        started = clock.seconds()
        timer = clock.callLater(timeout, expire)
        try:
            answer = await outcome
        except Exception as e:
            name = e.__class__.__name__
            ended = clock.seconds() - started
            if expired:
                upstream.attempt("timeout", ended)
                raise AttemptError("timeout", "timeout", API_TIMEOUT, timeout) from None
            if cancelled:
                upstream.attempt("cancelled", ended)
                raise CancelledError() from None
            if isinstance(e, NETWORK_ERRORS):
                upstream.attempt("network_error", ended)
                raise AttemptError("network", name, API_NO_ANSWER, timeout) from None
            upstream.attempt("client_error", ended)
            # Only the class name: an exception's text could quote a header.
            raise AttemptError("client", name, API_CLIENT_ERROR, timeout) from None
        finally:
            if timer.active():
                timer.cancel()
        now = clock.seconds()
        upstream.attempt(answer.status, now - started)
        if answer.status < 500:
            self.reachable(now)
        return answer

    async def call(
        self,
        request: Request,
        deadline_at: float,
        upstream: UpstreamMetrics,
        needs_id: bool = False,
        tenant: Optional[str] = None,
    ) -> Answer:
        """
        Make the request, retrying transient failures until C{deadline_at}
        (clock seconds) or the policy's C{max_attempts}; return the last
        answer (with its attempt count and the C{Retry-After} it still
        asked for).  Each attempt holds one of C{tenant}'s request slots
        (L{RequestSlots}: C{None}, the shared pool without a cap).

        @raise Refused: the breaker is open, or no slot was free in time.
        @raise AttemptError: the last attempt got no answer.
        """
        clock, slots, breaker = self.clock, self.slots, self.breaker
        # The least time worth starting an attempt with.
        window = min(self.timeout, self.deadline, 1.0)
        attempt = 0
        # A call counts at most one failure toward opening the breaker: its
        # first, however many attempts it makes.
        counted = False
        while True:
            attempt += 1
            if breaker.refuses():
                raise Refused("breaker")
            wait = min(self.queue_timeout, deadline_at - clock.seconds() - window)
            try:
                await slots.acquire(max(0.0, wait), tenant)
            except NoSlot:
                raise Refused("busy") from None
            error: Optional[AttemptError] = None
            answer: Optional[Answer] = None
            try:
                if breaker.refuses():
                    raise Refused("breaker")
                attempt_timeout = min(self.timeout, deadline_at - clock.seconds())
                outcome = "inconclusive"
                try:
                    answer = await self.attempt(request, attempt_timeout, upstream)
                except AttemptError as e:
                    error = e
                    if e.kind == "network" or (e.kind == "timeout" and attempt_timeout >= self.timeout):
                        outcome = "failure"
                else:
                    outcome = "failure" if answer.status >= 500 else "success"
                finally:
                    if outcome == "failure":
                        outcome, counted = ("inconclusive" if counted else "failure"), True
                    breaker.record(outcome)
            finally:
                slots.release(tenant)

            reason: Optional[tuple[str, Optional[float]]] = None
            if answer is not None:
                reason = self.policy.reason(answer, clock.seconds(), needs_id)
                if reason is None:
                    return attrs.evolve(answer, attempts=attempt)
                if answer.status == 429 and reason[1] and request.throttled is not None:
                    request.throttled(reason[1])
            elif error is not None and error.kind != "client":
                reason = (error.error, None)

            if reason is not None and attempt < self.policy.max_attempts:
                what, retry_after = reason
                delay = self.policy.delay(attempt, retry_after)
                if clock.seconds() + delay + window <= deadline_at:
                    _log.info(
                        "PostStack API {method} {path} attempt {attempt} failed ({what}); "
                        "retrying in {delay}s",
                        method=request.method,
                        path=request.path,
                        attempt=attempt,
                        status=None if answer is None else answer.status,
                        error=error.error if error is not None else None,
                        what=what,
                        delay=round(delay, 3),
                        event="api_retry",
                    )
                    upstream.retries.inc()
                    await deferLater(clock, delay)
                    continue

            # The last attempt.
            if answer is None:
                assert error is not None
                _log_attempt_error(request, error, attempt)
                raise error
            return attrs.evolve(answer, attempts=attempt, retry_after=reason[1] if reason else None)


def _log_attempt_error(request: Request, error: AttemptError, attempts: int) -> None:
    method, path = request.method, request.path
    if error.kind == "timeout":
        _log.warn(
            "PostStack API {method} {path} timed out after {timeout}s ({attempts} attempt(s))",
            method=method,
            path=path,
            timeout=round(error.timeout, 3),
            attempts=attempts,
            event="api_timeout",
        )
    elif error.kind == "network":
        _log.warn(
            "PostStack API {method} {path} failed: {error} ({attempts} attempt(s))",
            method=method,
            path=path,
            error=error.error,
            attempts=attempts,
            event="api_network_error",
        )
    else:
        _log.error(
            "PostStack API {method} {path} failed unexpectedly: {error}",
            method=method,
            path=path,
            error=error.error,
            attempts=attempts,
            event="api_client_error",
        )
