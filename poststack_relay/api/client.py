# -*- test-case-name: tests.test_api,tests.test_api_retry,tests.test_metrics -*-
"""
L{HTTPEmailAPI}: L{IEmailAPI} over HTTP.  A call is a request slot, the
circuit breaker and attempts (L{poststack_relay.api.attempts}); what an
answer means is in L{poststack_relay.api.answers}; the one HTTP path is
treq (L{poststack_relay.api.transport}).
"""

from __future__ import annotations

import json
import random
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from ..config import (
    DEFAULT_API_BREAKER_COOLDOWN,
    DEFAULT_API_BREAKER_FAILURES,
    DEFAULT_API_DEADLINE,
    DEFAULT_API_MAX_IN_FLIGHT,
    DEFAULT_API_MAX_IN_FLIGHT_PER_CREDENTIAL,
    DEFAULT_API_QUEUE_TIMEOUT,
)
from ..interfaces import IEmailAPI
from ..metrics import RelayMetrics
from ..replies import API_BUSY, API_DOWN, API_NOT_ENCODABLE
from ..translate import EmailRequest
from .answers import key_check_outcome, mailbox_outcome, send_outcome
from .attempts import Attempts, Request
from .body import json_body
from .breaker import BREAKER_PROBE_TIMEOUT, CircuitBreaker
from .errors import APIError, APIUnavailable, AttemptError, Refused
from .retry import DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_CAP, DEFAULT_MAX_ATTEMPTS, RetryPolicy
from .slots import RequestSlots, tenant_share
from .transport import APITransport

__all__ = ["HTTPEmailAPI"]

_EMAILS = "/emails"
_KEY_CHECK = "/emails?per_page=1"
_MAILBOX = "/mailboxes/authenticate"


@implementer(IEmailAPI)
class HTTPEmailAPI:
    """
    L{IEmailAPI} over HTTP, with retries, a bound on requests in flight
    and a circuit breaker (see C{docs/replies.md}, "Retries").

    @param client: a C{treq.client.HTTPClient}: the relay's, from
        L{poststack_relay.api.make_http_client} (a persistent pool, bodies
        streamed); or C{treq.testing.StubTreq} in tests (which takes bodies
        as bytes only: a message with attachments large enough to be
        streamed cannot go through it).
    @param base_url: the API's base URL.
    @param timeout: seconds one attempt may take, from sending the request
        to the last byte of the answer.
    @param service_key: the relay's key for mailbox logins, or C{None}.
    @param clock: the clock for time-outs, back-off and the breaker; the
        global reactor if C{None}.
    @param deadline: seconds all attempts for one message may take, queue
        waits and back-off included.  AUTH-time checks get C{timeout} in all.
    @param max_in_flight: most API requests (sends and checks) at once.
    @param max_in_flight_per_credential: most sends at once for one tenant
        (the C{tenant} of L{send_email}); C{0}: a quarter of
        C{max_in_flight} (L{tenant_share}).  AUTH-time checks have no
        tenant: they share the pool without a cap.
    @param queue_timeout: seconds a request may wait for a free slot.
    @param breaker_failures: calls in a row that failed transiently (each
        counted once, however many attempts it made) that open the circuit
        breaker; C{0} disables it.
    @param breaker_cooldown: seconds between the breaker's own probes of
        the API while it is open (L{CircuitBreaker}); it closes on the
        first probe answered.
    @param max_attempts: most requests per message (C{1}: no retries).
    @param backoff_base: seconds; the n-th retry waits a random time in
        C{[0, min(backoff_cap, backoff_base * 2**(n-1))]} (full jitter), and
        at least what C{Retry-After} asks.
    @param backoff_cap: see C{backoff_base}.
    @param rng: the random source for the jitter.
    @param throttled: called with the API key and the seconds of
        C{Retry-After} whenever a send's attempt is answered with a
        throttling C{429} (L{poststack_relay.holds.CredentialHolds.throttled}).
    @param metrics: where attempts, retries, requests in flight, the queue
        and the breaker are counted (C{docs/metrics.md}); a private
        L{RelayMetrics} if C{None}.  Its C{upstream_in_flight},
        C{upstream_queue}, C{api_breaker_open} and
        C{api_last_reachable_timestamp_seconds} gauges read this client.

    @ivar last_reachable: clock seconds of the last HTTP answer that was not
        a 5xx (any call, the probe included), or C{None}.
    """

    def __init__(
        self,
        client: Any,
        base_url: str,
        timeout: float,
        service_key: Optional[str] = None,
        clock: Optional[IReactorTime] = None,
        *,
        deadline: float = DEFAULT_API_DEADLINE,
        max_in_flight: int = DEFAULT_API_MAX_IN_FLIGHT,
        max_in_flight_per_credential: int = DEFAULT_API_MAX_IN_FLIGHT_PER_CREDENTIAL,
        queue_timeout: float = DEFAULT_API_QUEUE_TIMEOUT,
        breaker_failures: int = DEFAULT_API_BREAKER_FAILURES,
        breaker_cooldown: float = DEFAULT_API_BREAKER_COOLDOWN,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff_base: float = DEFAULT_BACKOFF_BASE,
        backoff_cap: float = DEFAULT_BACKOFF_CAP,
        rng: Optional[random.Random] = None,
        metrics: Optional[RelayMetrics] = None,
        throttled: Optional[Callable[[str, float], None]] = None,
    ) -> None:
        if timeout <= 0 or deadline <= 0 or queue_timeout < 0:
            raise ValueError("timeout and deadline must be positive, queue_timeout not negative")
        if max_attempts < 1 or breaker_failures < 0 or breaker_cooldown < 0:
            raise ValueError("max_attempts must be at least 1, breaker settings not negative")
        if breaker_failures and breaker_cooldown <= 0:
            raise ValueError("breaker_cooldown (the probe interval) must be positive")
        self._policy = RetryPolicy(
            max_attempts, backoff_base, backoff_cap, rng if rng is not None else random.Random()
        )
        self._transport = APITransport(client, base_url)
        for path in (_EMAILS, _KEY_CHECK, _MAILBOX):
            self._transport.url(path)  # made now, not on the first request
        self._timeout = timeout
        self._deadline = deadline
        self._service_key = service_key
        self._clock = clock
        self._max_in_flight = max_in_flight
        self._per_credential = tenant_share(max_in_flight, max_in_flight_per_credential)
        self._queue_timeout = queue_timeout
        self._breaker_settings = (breaker_failures, breaker_cooldown)
        self._attempts_: Optional[Attempts] = None
        self.last_reachable: Optional[float] = None
        self._throttled = throttled
        self.metrics = metrics if metrics is not None else RelayMetrics()
        self._upstream = self.metrics.upstream
        self.metrics.upstream_in_flight.set_function(
            lambda: self._attempts_.slots.held if self._attempts_ is not None else 0
        )
        self.metrics.upstream_queue.set_function(
            lambda: self._attempts_.slots.waiting if self._attempts_ is not None else 0
        )
        self.metrics.upstream_queue_capped.set_function(
            lambda: self._attempts_.slots.waiting_capped if self._attempts_ is not None else 0
        )
        self.metrics.api_breaker_open.set_function(
            lambda: 0 if self._attempts_ is None or self._attempts_.breaker.state == "closed" else 1
        )
        self.metrics.api_last_reachable_timestamp_seconds.set_function(
            lambda: self.last_reachable or 0.0
        )

    def _reached(self, now: float) -> None:
        self.last_reachable = now

    @property
    def _attempts(self) -> Attempts:
        if self._attempts_ is None:
            if self._clock is None:
                from twisted.internet import reactor

                self._clock = reactor
            clock = self._clock
            assert clock is not None
            self._attempts_ = Attempts(
                self._transport,
                clock,
                RequestSlots(
                    self._max_in_flight,
                    clock,
                    self._per_credential,
                    self.metrics.upstream_capped_total.inc,
                ),
                CircuitBreaker(*self._breaker_settings, clock, self._breaker_probe),
                self._policy,
                self._timeout,
                self._deadline,
                self._queue_timeout,
                self._reached,
            )
        return self._attempts_

    @property
    def slots(self) -> RequestSlots:
        """The request slots (shared by sends and checks)."""
        return self._attempts.slots

    @property
    def breaker(self) -> CircuitBreaker:
        """The circuit breaker (shared by sends and checks)."""
        return self._attempts.breaker

    def stop(self) -> None:
        """
        Stop the breaker's probing (when the relay stops): no timer or
        probe is left behind.  A request refused later starts it again.
        """
        if self._attempts_ is not None:
            self._attempts_.breaker.stop()

    def reachable_within(self, seconds: float) -> bool:
        """
        Did the API give an answer that is not a 5xx (to any call, the
        probe included) within the last C{seconds} seconds?
        """
        last = self.last_reachable
        return last is not None and self._attempts.clock.seconds() - last <= seconds

    def probe(self, timeout: Optional[float] = None) -> "Deferred[bool]":
        """
        One cheap request, C{GET /emails?per_page=1} without a key, to learn
        whether the API answers: fires C{True} for any answer that is not a
        5xx (a 401 is the expected one), C{False} for a 5xx, a network
        error or a time-out.  No retries; the request slots and the
        circuit breaker are bypassed.  Cancelling it cancels the request.

        @param timeout: seconds; the attempt time-out if C{None}.
        """
        return self._probe(timeout if timeout is not None else self._timeout, "probe")

    def _breaker_probe(self) -> "Deferred[bool]":
        """
        The open breaker's own probe: L{probe} with a short time-out,
        counted as C{call="breaker_probe"}.
        """
        return self._probe(min(self._timeout, BREAKER_PROBE_TIMEOUT), "breaker_probe")

    def _probe(self, timeout: float, call: str) -> "Deferred[bool]":
        transport = self._transport
        request = Request("GET", _KEY_CHECK, transport.url(_KEY_CHECK), transport.headers(None))

        async def probe() -> bool:
            try:
                answer = await self._attempts.attempt(request, timeout, self._upstream[call])
            except AttemptError:
                return False
            return answer.status < 500

        return Deferred.fromCoroutine(probe())

    async def _check(self, request: Request, call: str) -> Any:
        """
        An AUTH-time request: retried like a send, within one C{timeout}.
        Raises L{APIUnavailable} instead of an answer-less ending.
        """
        attempts = self._attempts
        deadline_at = attempts.clock.seconds() + min(self._timeout, self._deadline)
        try:
            return await attempts.call(request, deadline_at, self._upstream[call])
        except Refused as e:
            raise APIUnavailable("breaker open" if e.reason == "breaker" else "relay busy") from None
        except AttemptError:
            raise APIUnavailable("no answer") from None

    def check_api_key(self, api_key: str) -> "Deferred[bool]":
        """
        See L{IEmailAPI.check_api_key}: C{GET /emails?per_page=1} with the
        key; 200 is valid, 401/403 invalid, anything else unavailable.
        """
        transport = self._transport
        request = Request("GET", _EMAILS, transport.url(_KEY_CHECK), transport.headers(api_key))

        async def check() -> bool:
            return key_check_outcome(await self._check(request, "key_check"))

        return Deferred.fromCoroutine(check())

    def authenticate_mailbox(self, email: str, password: str) -> "Deferred[Optional[str]]":
        """
        See L{IEmailAPI.authenticate_mailbox}: C{POST /mailboxes/authenticate}
        with the service key (L{poststack_relay.api.answers.mailbox_outcome}).
        """
        service_key = self._service_key

        async def check() -> Optional[str]:
            if service_key is None:
                return None
            transport = self._transport
            request = Request(
                "POST",
                _MAILBOX,
                transport.url(_MAILBOX),
                transport.headers(service_key, body=True),
                json.dumps({"email": email, "password": password}).encode("utf-8"),
            )
            answer = await self._check(request, "mailbox_check")
            return mailbox_outcome(answer, email, service_key, password)

        return Deferred.fromCoroutine(check())

    def send_email(
        self, api_key: str, request: EmailRequest, tenant: Optional[str] = None
    ) -> "Deferred[str]":
        """
        See L{IEmailAPI.send_email}: C{POST /emails}, retried on transient
        failures within the deadline, each attempt in one of C{tenant}'s
        request slots (at most C{max_in_flight_per_credential} at once; no
        cap of its own if C{None}).  Every attempt carries the request's
        own idempotency key, as it is, in the C{Idempotency-Key} header and
        the body's C{idempotency_key}, so a retry after a lost answer cannot
        send twice.  The key is decided before (by delivery:
        L{poststack_relay.idempotency.keyed}), never here.

        @raise ValueError: (at once) the request has no idempotency key, or
            its payload holds another one: a bug in the caller.
        """
        key = request.idempotency_key
        if key is None or request.payload.get("idempotency_key") != key:
            raise ValueError(
                "send_email needs a request whose idempotency key is decided "
                "(poststack_relay.idempotency.keyed), in the request and its payload"
            )

        async def send() -> str:
            attempts = self._attempts
            deadline_at = attempts.clock.seconds() + self._deadline
            try:
                data = json_body(request.payload)
            except (TypeError, ValueError, UnicodeEncodeError):
                raise APIError(API_NOT_ENCODABLE) from None
            transport = self._transport
            throttled = self._throttled
            call = Request(
                "POST",
                _EMAILS,
                transport.url(_EMAILS),
                transport.headers(api_key, key, body=True),
                data,
                None if throttled is None else (lambda seconds: throttled(api_key, seconds)),
            )
            try:
                answer = await attempts.call(
                    call, deadline_at, self._upstream["send"], needs_id=True, tenant=tenant
                )
            except Refused as e:
                raise APIError(API_DOWN if e.reason == "breaker" else API_BUSY) from None
            except AttemptError as e:
                raise APIError(e.reply) from None
            return send_outcome(answer, api_key, self._service_key, request.retry_safe, request.payload.get("from"))

        return Deferred.fromCoroutine(send())
