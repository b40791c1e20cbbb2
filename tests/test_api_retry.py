"""
Tests for the reliability parts of L{poststack_relay.api.HTTPEmailAPI}:
retries within the per-message deadline, one idempotency key per message,
the bound on requests in flight, and the circuit breaker.

Everything runs on one L{Clock} shared by the client and the sandbox
(served through C{treq.testing.StubTreq}), with a seeded or recording
random source, so every wait is exact.
"""

from __future__ import annotations

import json
import random
from email.utils import formatdate
from typing import Any, Optional

from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from treq.testing import StubTreq

from poststack_relay.api import (
    APIError,
    APIUnavailable,
    HTTPEmailAPI,
    RequestSlots,
    parse_retry_after,
)
from poststack_relay.api.slots import NoSlot
from poststack_relay.api.transport import to_body_producer
from poststack_relay.replies import (
    API_BAD_ANSWER,
    API_BUSY,
    API_DOWN,
    API_NO_ANSWER,
    API_TIMEOUT,
    Reply,
    reply_for_status,
)
from poststack_relay.sandbox import (
    IN_TREE_DATA_PATH,
    SandboxResource,
    SandboxStore,
    load_sandbox_data,
)
from tests.common.api import BASE, Recorder, email, scripted
from tests.common.keys import FULL_KEY, SCOPED_KEY, SERVICE_KEY, UNKNOWN_KEY

TIMEOUT = 10.0
DEADLINE = 30.0


class RecordingRandom(random.Random):
    """
    A random source whose C{uniform} returns a fixed fraction of its range
    and records every range it was asked for.
    """

    def __init__(self, fraction: float = 1.0) -> None:
        super().__init__(0)
        self.fraction = fraction
        self.ranges: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.ranges.append((a, b))
        return a + (b - a) * self.fraction


class HeldAnswers(Resource):
    """
    Holds every request until the test answers it, and notes when a held
    request's connection is closed.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []
        self.lost: list[Request] = []

    def render(self, request: Request) -> Any:
        self.requests.append(request)
        request.notifyFinish().addErrback(lambda _: self.lost.append(request))
        return NOT_DONE_YET

    def answer(self, index: int, status: int = 202, body: bytes = b'{"id": "em_held"}') -> None:
        request = self.requests[index]
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.write(body)
        request.finish()


class Trickle(Resource):
    """
    Answers 202 with the start of a body and never finishes it; notes when
    the client closes the connection.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []
        self.lost: list[Request] = []

    def render(self, request: Request) -> Any:
        self.requests.append(request)
        request.notifyFinish().addErrback(lambda _: self.lost.append(request))
        request.setResponseCode(202)
        request.setHeader(b"content-type", b"application/json")
        request.write(b'{"id": "em_')
        return NOT_DONE_YET


class RetryMixin:
    """
    A sandbox on a temporary SQLite file behind a L{Recorder}, a shared
    L{Clock}, and an L{HTTPEmailAPI} with exact waits.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = SandboxStore(self.mktemp())  # type: ignore[attr-defined]
        self.addCleanup(self.store.close)  # type: ignore[attr-defined]
        self.sandbox = SandboxResource(self.store, load_sandbox_data(IN_TREE_DATA_PATH), self.clock)
        self.recorder = Recorder(self.sandbox)
        self.rng = RecordingRandom(0.5)
        self.api = self.make_api()

    def make_api(self, resource: Optional[Resource] = None, **options: Any) -> HTTPEmailAPI:
        options.setdefault("deadline", DEADLINE)
        options.setdefault("rng", self.rng)
        self.stub = StubTreq(resource if resource is not None else self.recorder)
        return HTTPEmailAPI(self.stub, BASE, TIMEOUT, SERVICE_KEY, clock=self.clock, **options)

    def settle(self, *ds: "Deferred[Any]", limit: float = 1000.0) -> None:
        """
        Run the clock from one timer to the next until every Deferred has a
        result, no timer is left, or C{limit} seconds have passed.
        """
        end = self.clock.seconds() + limit
        for _ in range(10000):
            self.stub.flush()
            if all(d.called for d in ds):
                return
            calls = self.clock.getDelayedCalls()
            if not calls:
                return
            when = min(c.getTime() for c in calls)
            if when > end:
                return
            self.clock.advance(max(0.0, when - self.clock.seconds()))
        raise AssertionError("settle() did not finish")  # pragma: no cover

    def reply_of(self, d: "Deferred[Any]") -> Reply:
        error: APIError = self.failureResultOf(d, APIError).value  # type: ignore[attr-defined]
        return error.reply

    def keys_seen(self) -> list[bytes]:
        return [s.headers[b"idempotency-key"][0] for s in self.recorder.seen]


class TransientRetryTests(RetryMixin, SynchronousTestCase):
    """
    Transient failures are retried; the message ends with exactly one
    stored email and its id.
    """

    def test_each_fault_then_success(self) -> None:
        """500, 502, 503, reset, malformed 2xx and 2xx without id, once each, then success."""
        for mode in ("500", "502", "503", "reset", "malformed", "noid"):
            self.setUp()
            self.sandbox.inject_fault(mode)
            d = self.api.send_email(FULL_KEY, email())
            self.settle(d)
            email_id = self.successResultOf(d)
            [stored] = self.store.emails()
            self.assertEqual(email_id, stored.id, mode)
            self.assertEqual(len(self.recorder.seen), 2, mode)

    def test_hang_then_success(self) -> None:
        """A hanging attempt times out after api_timeout, then the retry succeeds."""
        self.sandbox.inject_fault("hang")
        d = self.api.send_email(FULL_KEY, email())
        self.clock.advance(TIMEOUT - 0.001)
        self.assertNoResult(d)
        self.assertEqual(len(self.recorder.seen), 1)
        self.settle(d)
        [stored] = self.store.emails()
        self.assertEqual(self.successResultOf(d), stored.id)
        self.assertEqual(len(self.recorder.seen), 2)

    def test_408_retried(self) -> None:
        """A 408 is retried."""
        resource, calls = scripted(408, b'{"error": "Request Timeout"}')
        api = self.make_api(resource, max_attempts=3)
        d = api.send_email(FULL_KEY, email())
        self.settle(d)
        self.reply_of(d)
        self.assertEqual(len(calls), 3)

    def test_accept_then_500_same_id(self) -> None:
        """An email stored before a 500: the retry gets the same id, nothing is stored twice."""
        self.sandbox.inject_fault("accept_then_500")
        d = self.api.send_email(FULL_KEY, email())
        self.assertNoResult(d)
        [first] = self.store.emails()
        self.settle(d)
        self.assertEqual(self.successResultOf(d), first.id)
        self.assertEqual(len(self.store.emails()), 1)
        self.assertEqual(len(self.recorder.seen), 2)

    def test_slow_answer_after_retry_no_duplicate(self) -> None:
        """
        An answer slower than the time-out is stored late, after the retry
        stored the email: still one email, and the id the client got.
        """
        self.sandbox.inject_fault("slow", delay=TIMEOUT * 2)
        d = self.api.send_email(FULL_KEY, email())
        self.settle(d)
        email_id = self.successResultOf(d)
        self.clock.advance(TIMEOUT * 2)
        self.stub.flush()
        [stored] = self.store.emails()
        self.assertEqual(email_id, stored.id)

    def test_same_key_on_every_attempt(self) -> None:
        """Every attempt of one message carries its (random) key, the same each time, and the same body."""
        self.sandbox.inject_fault("503", count=3)
        d = self.api.send_email(FULL_KEY, email())
        self.settle(d)
        self.successResultOf(d)
        keys = self.keys_seen()
        self.assertEqual(len(keys), 4)
        self.assertEqual(len(set(keys)), 1)
        self.assertTrue(keys[0].startswith(b"psr-"))
        self.assertEqual(len({s.body for s in self.recorder.seen}), 1)
        body = json.loads(self.recorder.seen[0].body)
        self.assertEqual(body["idempotency_key"], keys[0].decode())

    def test_client_key_on_every_attempt(self) -> None:
        """A message's own idempotency key is used, unchanged, on every attempt."""
        self.sandbox.inject_fault("reset", count=2)
        d = self.api.send_email(FULL_KEY, email(idempotency_key="order-7"))
        self.settle(d)
        self.successResultOf(d)
        self.assertEqual(self.keys_seen(), [b"order-7"] * 3)

    def test_no_delayed_calls_left(self) -> None:
        """After a retried send, no timer is left on the clock."""
        self.sandbox.inject_fault("503", count=2)
        d = self.api.send_email(FULL_KEY, email())
        self.settle(d)
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_check_retried_within_timeout(self) -> None:
        """An AUTH-time key check is retried after a 503 and a reset."""
        self.sandbox.inject_fault("503", path="/emails", method="GET")
        self.sandbox.inject_fault("reset", path="/emails", method="GET")
        d = self.api.check_api_key(FULL_KEY)
        self.settle(d)
        self.assertIs(self.successResultOf(d), True)
        self.assertEqual(len(self.recorder.seen), 3)

    def test_check_bounded_by_timeout(self) -> None:
        """An AUTH-time check gets api_timeout in all: a hang is APIUnavailable then, no retry."""
        self.sandbox.inject_fault("hang", count=-1, path="/mailboxes/authenticate")
        d = self.api.authenticate_mailbox("alice@yourdomain.com", "alice-password")
        self.clock.advance(TIMEOUT)
        self.failureResultOf(d, APIUnavailable)
        self.assertEqual(len(self.recorder.seen), 1)


@implementer(IAgent)
class FailingFirst:
    """An agent whose first requests fail with C{errors}, one each; the next go to C{agent}."""

    def __init__(self, errors: list[Exception], agent: IAgent) -> None:
        self.errors = errors
        self.agent = agent

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Optional[Headers] = None,
        bodyProducer: Optional[IBodyProducer] = None,
    ) -> "Deferred[IResponse]":
        if self.errors:
            return fail(self.errors.pop(0))
        return self.agent.request(method, uri, headers, bodyProducer)


class NetworkErrorTests(RetryMixin, SynchronousTestCase):
    """
    Each way Twisted's HTTP client (under treq) says the network or the
    server let a request down is a network error: retried with the same
    key, 451 4.4.1 on the last attempt; never the client's own error.
    """

    ERRORS = [
        RequestNotSent(),
        RequestTransmissionFailed([Failure(neterror.ConnectionLost())]),
        ResponseNeverReceived([Failure(neterror.ConnectionDone())]),
        ResponseFailed([Failure(neterror.ConnectionLost())]),
        neterror.ConnectionRefusedError(),
        neterror.DNSLookupError("api.example"),
        neterror.TCPTimedOutError(),
        neterror.TimeoutError(),
        neterror.ConnectionLost(),
    ]

    def failing_api(self, errors: list[Exception], **options: Any) -> HTTPEmailAPI:
        traversal = RequestTraversalAgent(self.recorder)
        self.stub = traversal  # type: ignore[assignment]  # settle() flushes it
        client = HTTPClient(FailingFirst(errors, traversal), data_to_body_producer=to_body_producer)
        options.setdefault("deadline", DEADLINE)
        return HTTPEmailAPI(client, BASE, TIMEOUT, SERVICE_KEY, clock=self.clock, rng=self.rng, **options)

    def test_retried(self) -> None:
        """One failure, then the retry stores the email and its id is the answer."""
        for error in self.ERRORS:
            self.setUp()
            api = self.failing_api([error])
            d = api.send_email(FULL_KEY, email())
            self.settle(d)
            [stored] = self.store.emails()
            self.assertEqual(self.successResultOf(d), stored.id, error)

    def test_last_attempt(self) -> None:
        """A failure on the only attempt is 451 4.4.1 (no answer)."""
        for error in self.ERRORS:
            self.setUp()
            api = self.failing_api([error], max_attempts=1)
            d = api.send_email(FULL_KEY, email())
            self.settle(d)
            self.assertEqual(self.reply_of(d), API_NO_ANSWER, error)
            self.assertEqual(self.store.emails(), [])


class NotRetriedTests(RetryMixin, SynchronousTestCase):
    """
    Answers that say something certain about the message are final.
    """

    def assertOneRequest(self, d: "Deferred[str]", code: int) -> None:
        self.assertEqual(self.reply_of(d).code, code)
        self.assertEqual(len(self.recorder.seen), 1)

    def test_400(self) -> None:
        """400 is not retried."""
        self.assertOneRequest(self.api.send_email(FULL_KEY, email(subject=None)), 554)

    def test_401(self) -> None:
        """401 is not retried."""
        self.assertOneRequest(self.api.send_email(UNKNOWN_KEY, email()), 554)

    def test_403(self) -> None:
        """403 is not retried."""
        d = self.api.send_email(SCOPED_KEY, email(**{"from": "you@anotherdomain.com"}))
        self.assertOneRequest(d, 550)

    def test_404(self) -> None:
        """404 is not retried."""
        d = self.api.send_email(FULL_KEY, email(template_id="tpl_nosuchtemplate000000"))
        self.assertOneRequest(d, 554)

    def test_409(self) -> None:
        """409 (key reused with another body) is not retried."""
        self.successResultOf(self.api.send_email(FULL_KEY, email(idempotency_key="k-9")))
        d = self.api.send_email(FULL_KEY, email(idempotency_key="k-9", subject="Other"))
        self.assertEqual(self.reply_of(d).code, 554)
        self.assertEqual(len(self.recorder.seen), 2)

    def test_422(self) -> None:
        """422, from the data (the sender domain: 550) or injected (554), is not retried."""
        self.assertOneRequest(
            self.api.send_email(FULL_KEY, email(**{"from": "you@pendingdomain.com"})), 550
        )
        self.sandbox.inject_fault("422")
        d = self.api.send_email(FULL_KEY, email())
        self.assertEqual(self.reply_of(d).code, 554)
        self.assertEqual(len(self.recorder.seen), 2)

    def test_quota(self) -> None:
        """A quota 429 is not retried: exactly one request, the quota reply at once."""
        self.sandbox.inject_fault("quota")
        d = self.api.send_email(FULL_KEY, email())
        reply = self.reply_of(d)
        self.assertIn("(monthly_limit_exceeded)", reply.text)
        self.assertNotIn("retry-after", reply.text)
        self.assertEqual(len(self.recorder.seen), 1)
        self.assertEqual(self.store.emails(), [])

    def test_quota_with_retry_after(self) -> None:
        """A quota 429 is final even if it carries Retry-After."""
        resource, calls = scripted(
            429,
            b'{"error": "Daily limit", "code": "daily_limit_exceeded"}',
            {b"content-type": b"application/json", b"retry-after": b"1"},
        )
        api = self.make_api(resource)
        self.assertIn("daily_limit_exceeded", self.reply_of(api.send_email(FULL_KEY, email())).text)
        self.assertEqual(len(calls), 1)

    def test_unknown_429_without_retry_after(self) -> None:
        """A 429 with neither a throttling code nor Retry-After may be a quota: not retried."""
        resource, calls = scripted(429, b'{"error": "Slow down", "code": "mystery"}')
        api = self.make_api(resource)
        self.assertEqual(self.reply_of(api.send_email(FULL_KEY, email())).code, 451)
        self.assertEqual(len(calls), 1)

    def test_other_statuses(self) -> None:
        """A redirect and a 418 are not retried."""
        for status in (302, 418):
            resource, calls = scripted(status, b'{"error": "no"}')
            api = self.make_api(resource)
            self.assertEqual(self.reply_of(api.send_email(FULL_KEY, email())).code, 451)
            self.assertEqual(len(calls), 1, status)

    def test_check_invalid_key_not_retried(self) -> None:
        """A 401 on the key check is an answer: one request."""
        self.assertIs(self.successResultOf(self.api.check_api_key(UNKNOWN_KEY)), False)
        self.assertEqual(len(self.recorder.seen), 1)


class ThrottlingTests(RetryMixin, SynchronousTestCase):
    """
    429 rate_limit_exceeded and Retry-After.
    """

    def test_retry_after_honoured(self) -> None:
        """Retry-After: 3 makes the retry wait 3 s (not the shorter jitter), then it succeeds."""
        self.sandbox.inject_fault("429", retry_after="3")
        d = self.api.send_email(FULL_KEY, email())
        self.clock.advance(2.999)
        self.stub.flush()
        self.assertEqual(len(self.recorder.seen), 1)
        self.clock.advance(0.001)
        self.stub.flush()
        self.assertEqual(len(self.recorder.seen), 2)
        [stored] = self.store.emails()
        self.assertEqual(self.successResultOf(d), stored.id)

    def test_retry_after_http_date(self) -> None:
        """A Retry-After HTTP date is honoured, counted on the clock."""
        self.clock.advance(1_700_000_000)
        when = formatdate(self.clock.seconds() + 4, usegmt=True)
        self.sandbox.inject_fault("429", retry_after=when)
        d = self.api.send_email(FULL_KEY, email())
        self.clock.advance(3.9)
        self.stub.flush()
        self.assertEqual(len(self.recorder.seen), 1)
        self.clock.advance(0.1)
        self.stub.flush()
        self.assertEqual(len(self.recorder.seen), 2)
        self.successResultOf(d)

    def test_without_retry_after(self) -> None:
        """A rate_limit_exceeded 429 without Retry-After is retried after the jittered back-off."""
        self.sandbox.inject_fault("429")
        d = self.api.send_email(FULL_KEY, email())
        self.settle(d)
        self.successResultOf(d)
        self.assertEqual(self.rng.ranges, [(0, 0.25)])
        self.assertEqual(self.clock.seconds(), 0.125)

    def test_retry_after_beyond_deadline(self) -> None:
        """A Retry-After past the deadline ends the send at once with the hint."""
        self.sandbox.inject_fault("429", retry_after="60")
        d = self.api.send_email(FULL_KEY, email())
        self.assertEqual(
            self.reply_of(d), Reply(451, "4.7.0", "PostStack rate limit reached, retry-after=60s")
        )
        self.assertEqual(self.clock.seconds(), 0)
        self.assertEqual(len(self.recorder.seen), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_retry_after_date_beyond_deadline(self) -> None:
        """An HTTP-date Retry-After past the deadline gives the hint in seconds."""
        self.clock.advance(1_700_000_000)
        when = formatdate(self.clock.seconds() + 90, usegmt=True)
        self.sandbox.inject_fault("429", retry_after=when)
        d = self.api.send_email(FULL_KEY, email())
        self.assertEqual(
            self.reply_of(d), Reply(451, "4.7.0", "PostStack rate limit reached, retry-after=90s")
        )

    def test_throttled_until_deadline(self) -> None:
        """Throttled on every attempt: the last 451 carries the hint, before the deadline."""
        self.sandbox.inject_fault("429", count=-1, retry_after="10")
        d = self.api.send_email(FULL_KEY, email())
        self.settle(d)
        self.assertEqual(
            self.reply_of(d), Reply(451, "4.7.0", "PostStack rate limit reached, retry-after=10s")
        )
        self.assertEqual(len(self.recorder.seen), 3)  # at 0, 10 and 20 s
        self.assertEqual(self.clock.seconds(), 20)
        self.assertEqual(self.store.emails(), [])

    def test_throttling_not_a_breaker_failure(self) -> None:
        """Throttled answers never open the breaker."""
        api = self.make_api(max_attempts=1, breaker_failures=2)
        self.sandbox.inject_fault("429", count=5, retry_after="1")
        for _ in range(5):
            self.reply_of(api.send_email(FULL_KEY, email()))
        self.assertEqual(api.breaker.state, "closed")
        self.assertEqual(len(self.recorder.seen), 5)


class DeadlineTests(RetryMixin, SynchronousTestCase):
    """
    All attempts of one message fit in the deadline, and their number is
    bounded.
    """

    def test_5xx_until_deadline(self) -> None:
        """503 on every attempt: 451 4.3.0, at most max_attempts requests, within the deadline."""
        self.sandbox.inject_fault("503", count=-1)
        api = self.make_api(rng=RecordingRandom(1.0), breaker_failures=0)
        d = api.send_email(FULL_KEY, email())
        self.settle(d)
        reply = self.reply_of(d)
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))
        self.assertIn("temporary API failure", reply.text)
        self.assertEqual(len(self.recorder.seen), 8)
        self.assertLessEqual(self.clock.seconds(), DEADLINE)
        self.assertEqual(self.store.emails(), [])

    def test_default_breaker_one_message(self) -> None:
        """
        With the default breaker (5 calls), one message against a hard-down
        API counts once: it makes every attempt and ends with the API's own
        failure, the breaker still closed.
        """
        self.sandbox.inject_fault("503", count=-1)
        d = self.api.send_email(FULL_KEY, email())
        self.settle(d)
        self.assertIn("temporary API failure", self.reply_of(d).text)
        self.assertEqual(len(self.recorder.seen), 8)
        self.assertLessEqual(self.clock.seconds(), DEADLINE)
        self.assertEqual((self.api.breaker.state, self.api.breaker.failures), ("closed", 1))

    def test_max_attempts(self) -> None:
        """max_attempts=3 means three requests at most."""
        self.sandbox.inject_fault("500", count=-1)
        api = self.make_api(max_attempts=3)
        d = api.send_email(FULL_KEY, email())
        self.settle(d)
        self.reply_of(d)
        self.assertEqual(len(self.recorder.seen), 3)

    def test_hang_until_deadline(self) -> None:
        """
        Hanging attempts: the last one is cut to the time left, and the
        time-out reply comes exactly at the deadline.
        """
        self.sandbox.inject_fault("hang", count=-1)
        d = self.api.send_email(FULL_KEY, email())
        self.settle(d)
        self.assertEqual(self.reply_of(d), API_TIMEOUT)
        self.assertEqual(self.clock.seconds(), DEADLINE)
        self.assertEqual(len(self.recorder.seen), 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reset_until_deadline(self) -> None:
        """Resets on every attempt end in 451 4.4.1 within the deadline."""
        self.sandbox.inject_fault("reset", count=-1)
        api = self.make_api(breaker_failures=0)
        d = api.send_email(FULL_KEY, email())
        self.settle(d)
        self.assertEqual(self.reply_of(d), API_NO_ANSWER)
        self.assertLessEqual(self.clock.seconds(), DEADLINE)
        self.assertLessEqual(len(self.recorder.seen), 8)

    def test_noid_until_deadline(self) -> None:
        """2xx without an id on every attempt: the no-id 451, nothing stored, all with one key."""
        self.sandbox.inject_fault("noid", count=-1)
        d = self.api.send_email(FULL_KEY, email())
        self.settle(d)
        reply = self.reply_of(d)
        self.assertTrue(reply.text.startswith(API_BAD_ANSWER.text))
        self.assertIn("set X-PostStack-Idempotency-Key", reply.text)
        self.assertEqual(self.store.emails(), [])
        self.assertEqual(len(set(self.keys_seen())), 1)

    def test_short_time_left_not_used(self) -> None:
        """A back-off that leaves less than a second before the deadline ends the send instead."""
        self.sandbox.inject_fault("503", count=-1)
        api = self.make_api(deadline=1.2, rng=RecordingRandom(1.0))
        d = api.send_email(FULL_KEY, email())
        self.settle(d)
        self.reply_of(d)
        # The retry would wait 0.25 s and leave 0.95 s (< 1 s) before the
        # deadline: the send ends after the first attempt, at once.
        self.assertEqual(len(self.recorder.seen), 1)
        self.assertEqual(self.clock.seconds(), 0)


class BackoffTests(RetryMixin, SynchronousTestCase):
    """
    Full-jitter exponential back-off from the injected random source.
    """

    def test_ranges_double_up_to_the_cap(self) -> None:
        """The n-th retry draws from [0, min(5, 0.25 * 2**(n-1))]."""
        rng = RecordingRandom(1.0)
        api = self.make_api(deadline=1000.0, rng=rng, breaker_failures=0)
        self.sandbox.inject_fault("503", count=-1)
        d = api.send_email(FULL_KEY, email())
        self.settle(d)
        self.reply_of(d)
        self.assertEqual(
            rng.ranges,
            [(0, 0.25), (0, 0.5), (0, 1.0), (0, 2.0), (0, 4.0), (0, 5.0), (0, 5.0)],
        )
        self.assertEqual(self.clock.seconds(), 0.25 + 0.5 + 1 + 2 + 4 + 5 + 5)

    def test_seeded_random_is_deterministic(self) -> None:
        """With random.Random(7) the retry happens exactly at Random(7).uniform(0, 0.25)."""
        expected = random.Random(7).uniform(0, 0.25)
        api = self.make_api(rng=random.Random(7))
        self.sandbox.inject_fault("503")
        d = api.send_email(FULL_KEY, email())
        self.clock.advance(expected - 0.0001)
        self.stub.flush()
        self.assertEqual(len(self.recorder.seen), 1)
        self.clock.advance(0.0001)
        self.stub.flush()
        self.assertEqual(len(self.recorder.seen), 2)
        self.successResultOf(d)


class RetryLoggingTests(RetryMixin, SynchronousTestCase):
    """
    One C{api_retry} event per retry, without keys or bodies.
    """

    def test_api_retry_events(self) -> None:
        """Two 503s then success: two api_retry events, no failure events, no secrets."""
        self.sandbox.inject_fault("503", count=2)
        with capturedLogs() as events:
            d = self.api.send_email(FULL_KEY, email(idempotency_key="order-secretish"))
            self.settle(d)
        self.successResultOf(d)
        ours = [
            e for e in events if str(e.get("log_namespace", "")).startswith("poststack_relay.api")
        ]
        retries = [e for e in ours if e.get("event") == "api_retry"]
        self.assertEqual([e["attempt"] for e in retries], [1, 2])
        self.assertEqual([e["status"] for e in retries], [503, 503])
        self.assertEqual([e["delay"] for e in retries], [0.125, 0.25])
        self.assertEqual([e["log_level"].name for e in retries], ["info", "info"])
        self.assertEqual([e for e in ours if e.get("event") != "api_retry"], [])
        for event in ours:
            text = formatEvent(event) + repr(event)
            for secret in (FULL_KEY, "order-secretish", "Hello there"):
                self.assertNotIn(secret, text)

    def test_network_retry_names_error_class(self) -> None:
        """A retried reset names the error class; the final failure logs api_network_error once."""
        self.sandbox.inject_fault("reset", count=-1)
        api = self.make_api(max_attempts=2)
        with capturedLogs() as events:
            d = api.send_email(FULL_KEY, email())
            self.settle(d)
        self.reply_of(d)
        [retry] = [e for e in events if e.get("event") == "api_retry"]
        self.assertEqual(retry["status"], None)
        self.assertIn("Response", retry["error"])
        [final] = [e for e in events if e.get("event") == "api_network_error"]
        self.assertEqual(final["attempts"], 2)


class InFlightTests(RetryMixin, SynchronousTestCase):
    """
    At most C{max_in_flight} requests at once; the rest wait, in order,
    for a bounded time.
    """

    def test_third_waits_for_a_slot(self) -> None:
        """max_in_flight=2: the third message waits, then goes when one finishes."""
        held = HeldAnswers()
        api = self.make_api(held, max_in_flight=2)
        ds = [api.send_email(FULL_KEY, email(subject=f"m{i}")) for i in range(3)]
        self.stub.flush()
        self.assertEqual(len(held.requests), 2)
        self.assertEqual((api.slots.held, api.slots.waiting), (2, 1))
        held.answer(0, body=b'{"id": "em_0"}')
        self.stub.flush()
        self.assertEqual(self.successResultOf(ds[0]), "em_0")
        self.assertEqual(len(held.requests), 3)
        self.assertEqual(json.loads(held.requests[2].content.getvalue())["subject"], "m2")
        held.answer(1, body=b'{"id": "em_1"}')
        held.answer(2, body=b'{"id": "em_2"}')
        self.stub.flush()
        self.assertEqual([self.successResultOf(d) for d in ds[1:]], ["em_1", "em_2"])
        self.assertEqual((api.slots.held, api.slots.waiting), (0, 0))

    def test_queue_timeout(self) -> None:
        """A message that gets no slot within queue_timeout fails with 451 4.3.2, no request."""
        held = HeldAnswers()
        api = self.make_api(held, max_in_flight=1, queue_timeout=2.0)
        first = api.send_email(FULL_KEY, email())
        second = api.send_email(FULL_KEY, email())
        self.clock.advance(1.999)
        self.assertNoResult(second)
        self.clock.advance(0.001)
        self.assertEqual(self.reply_of(second), API_BUSY)
        self.assertEqual(
            API_BUSY.line(),
            b"451 4.3.2 PostStack relay busy: too many messages waiting for the API, "
            b"try again later\r\n",
        )
        self.stub.flush()
        self.assertEqual(len(held.requests), 1)
        held.answer(0)
        self.stub.flush()
        self.successResultOf(first)
        self.assertEqual((api.slots.held, api.slots.waiting), (0, 0))

    def test_fifo(self) -> None:
        """Waiting messages get slots in the order they came."""
        held = HeldAnswers()
        api = self.make_api(held, max_in_flight=1)
        ds = [api.send_email(FULL_KEY, email(subject=f"m{i}")) for i in range(4)]
        for i in range(4):
            self.stub.flush()
            self.assertEqual(len(held.requests), i + 1)
            subject = json.loads(held.requests[i].content.getvalue())["subject"]
            self.assertEqual(subject, f"m{i}")
            held.answer(i, body=b'{"id": "em_%d"}' % i)
        self.stub.flush()
        self.assertEqual([self.successResultOf(d) for d in ds], ["em_0", "em_1", "em_2", "em_3"])

    def test_cancelled_waiter_leaks_nothing(self) -> None:
        """A waiting send that is cancelled leaves the queue; the slot goes to the next one."""
        held = HeldAnswers()
        api = self.make_api(held, max_in_flight=1)
        first = api.send_email(FULL_KEY, email(subject="first"))
        cancelled = api.send_email(FULL_KEY, email(subject="cancelled"))
        third = api.send_email(FULL_KEY, email(subject="third"))
        cancelled.cancel()
        self.failureResultOf(cancelled, CancelledError)
        self.assertEqual(api.slots.waiting, 1)
        held.answer(0)
        self.stub.flush()
        self.successResultOf(first)
        self.assertEqual(len(held.requests), 2)
        self.assertEqual(json.loads(held.requests[1].content.getvalue())["subject"], "third")
        held.answer(1)
        self.stub.flush()
        self.successResultOf(third)
        self.assertEqual((api.slots.held, api.slots.waiting), (0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_during_attempt_frees_slot(self) -> None:
        """Cancelling a send in flight frees its slot, closes its request and is not retried."""
        held = HeldAnswers()
        api = self.make_api(held, max_in_flight=1)
        d = api.send_email(FULL_KEY, email())
        self.stub.flush()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.stub.flush()
        self.assertEqual(held.lost, held.requests)
        self.assertEqual(api.slots.held, 0)
        self.assertEqual(api.breaker.failures, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(held.requests), 1)

    def test_cancel_during_backoff(self) -> None:
        """Cancelling a send while it waits to retry stops it: no further request, no timer."""
        self.sandbox.inject_fault("503", count=-1)
        d = self.api.send_email(FULL_KEY, email())
        self.assertNoResult(d)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.clock.advance(DEADLINE)
        self.assertEqual(len(self.recorder.seen), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_checks_share_the_slots(self) -> None:
        """AUTH-time checks count against max_in_flight too."""
        held = HeldAnswers()
        api = self.make_api(held, max_in_flight=1)
        send = api.send_email(FULL_KEY, email())
        check = api.check_api_key(FULL_KEY)
        self.stub.flush()
        self.assertEqual(len(held.requests), 1)
        held.answer(0)
        self.stub.flush()
        self.successResultOf(send)
        self.assertEqual(len(held.requests), 2)
        held.answer(1, status=200, body=b'{"data": []}')
        self.stub.flush()
        self.assertIs(self.successResultOf(check), True)

    def test_busy_check_unavailable(self) -> None:
        """A check that gets no slot in time is APIUnavailable (454 at AUTH)."""
        held = HeldAnswers()
        api = self.make_api(held, max_in_flight=1, queue_timeout=1.0)
        api.send_email(FULL_KEY, email())
        check = api.check_api_key(FULL_KEY)
        self.clock.advance(1.0)
        self.failureResultOf(check, APIUnavailable)

    def test_tenant_share(self) -> None:
        """
        One tenant holds at most max_in_flight_per_credential slots: its
        further sends wait although slots are free, another tenant's send
        goes at once, and the wait is counted; a send without a tenant has
        no cap of its own.
        """
        held = HeldAnswers()
        api = self.make_api(held, max_in_flight=4, max_in_flight_per_credential=2)
        flood = [api.send_email(FULL_KEY, email(subject=f"a{i}"), tenant="key:a") for i in range(3)]
        self.stub.flush()
        self.assertEqual(len(held.requests), 2)
        self.assertEqual((api.slots.held, api.slots.waiting, api.slots.waiting_capped), (2, 1, 1))
        other = api.send_email(SCOPED_KEY, email(subject="b"), tenant="key:b")
        untenanted = api.send_email(FULL_KEY, email(subject="none"))
        self.stub.flush()
        subjects = [json.loads(r.content.getvalue())["subject"] for r in held.requests]
        self.assertEqual(subjects, ["a0", "a1", "b", "none"])
        self.assertEqual(api.metrics.registry.get_sample_value("poststack_relay_upstream_capped_total"), 1.0)
        held.answer(2, body=b'{"id": "em_b"}')
        self.stub.flush()
        self.assertEqual(self.successResultOf(other), "em_b")
        self.assertEqual(len(held.requests), 4)  # the freed slot is not a's to take
        held.answer(0, body=b'{"id": "em_a0"}')
        self.stub.flush()
        self.assertEqual(len(held.requests), 5)  # a's own release lets a2 go
        for index in (1, 3, 4):
            held.answer(index)
        self.stub.flush()
        for d in [*flood, untenanted]:
            self.successResultOf(d)
        self.assertEqual((api.slots.held, api.slots.waiting), (0, 0))

    def test_default_tenant_share(self) -> None:
        """By default one tenant may hold a quarter of max_in_flight (at least one)."""
        self.assertEqual(self.make_api(max_in_flight=64).slots.per_tenant, 16)
        self.assertEqual(self.make_api(max_in_flight=2).slots.per_tenant, 1)
        self.assertEqual(
            self.make_api(max_in_flight=8, max_in_flight_per_credential=8).slots.per_tenant, 8
        )

    def test_retry_waits_for_slot_again(self) -> None:
        """A slot is held per attempt, not during the back-off between attempts."""
        self.sandbox.inject_fault("503")
        api = self.make_api(max_in_flight=1)
        d = api.send_email(FULL_KEY, email())
        self.assertNoResult(d)
        self.assertEqual(api.slots.held, 0)
        self.settle(d)
        self.successResultOf(d)


class RequestSlotsTests(SynchronousTestCase):
    """
    L{RequestSlots} on its own.
    """

    def test_limit_and_release(self) -> None:
        """Up to the limit at once; a release hands the slot to the first waiter."""
        clock = Clock()
        slots = RequestSlots(2, clock)
        self.successResultOf(slots.acquire(1))
        self.successResultOf(slots.acquire(1))
        waiter = slots.acquire(5)
        self.assertNoResult(waiter)
        slots.release()
        self.successResultOf(waiter)
        self.assertEqual((slots.held, slots.waiting), (2, 0))
        self.assertEqual(clock.getDelayedCalls(), [])
        slots.release()
        slots.release()
        self.assertEqual(slots.held, 0)

    def test_timeout(self) -> None:
        """A waiter fails with NoSlot after its timeout and leaves the queue."""
        clock = Clock()
        slots = RequestSlots(1, clock)
        self.successResultOf(slots.acquire(1))
        waiter = slots.acquire(3)
        clock.advance(3)
        self.failureResultOf(waiter, NoSlot)
        self.assertEqual(slots.waiting, 0)
        slots.release()
        self.assertEqual(slots.held, 0)

    def test_zero_timeout(self) -> None:
        """With no slot free, a zero wait fails at once."""
        slots = RequestSlots(1, Clock())
        self.successResultOf(slots.acquire(0))
        self.failureResultOf(slots.acquire(0), NoSlot)

    def test_no_overtaking(self) -> None:
        """A new acquirer does not jump the queue."""
        clock = Clock()
        slots = RequestSlots(1, clock)
        self.successResultOf(slots.acquire(1))
        first = slots.acquire(5)
        slots.release()
        self.successResultOf(first)
        second = slots.acquire(5)
        self.assertNoResult(second)

    def test_bad_limit(self) -> None:
        """A limit below 1 is refused."""
        self.assertRaises(ValueError, RequestSlots, 0, Clock())


class BreakerTests(RetryMixin, SynchronousTestCase):
    """
    The circuit breaker: fail fast while the API is known to be down, each
    call counted once, and close by itself within about a second of the
    API answering again.
    """

    def setUp(self) -> None:
        super().setUp()
        self.api = self.make_api(max_attempts=1, breaker_failures=3, breaker_cooldown=0.5)

    def fail_times(self, n: int, mode: str = "503") -> None:
        self.sandbox.inject_fault(mode, count=n)
        for _ in range(n):
            d = self.api.send_email(FULL_KEY, email())
            self.settle(d)
            self.reply_of(d)

    def down(self, mode: str = "503") -> None:
        """The whole API fails: sends, key checks and the probe's GET."""
        self.sandbox.inject_fault(mode, count=-1)
        self.sandbox.inject_fault(mode, count=-1, path="/emails", method="GET")

    def probes(self) -> int:
        return len([s for s in self.recorder.seen if s.method == b"GET" and b"authorization" not in s.headers])

    def test_opens_and_fails_fast(self) -> None:
        """After 3 failed calls the next send and checks fail at once, with no request."""
        self.down()
        with capturedLogs() as events:
            self.fail_times(3)
            self.assertEqual(self.api.breaker.state, "open")
            for _ in range(5):
                self.assertEqual(self.reply_of(self.api.send_email(FULL_KEY, email())), API_DOWN)
            self.failureResultOf(self.api.check_api_key(FULL_KEY), APIUnavailable)
            self.failureResultOf(
                self.api.authenticate_mailbox("alice@yourdomain.com", "alice-password"),
                APIUnavailable,
            )
        self.assertEqual(len(self.recorder.seen), 3)
        self.assertEqual(
            API_DOWN.line(),
            b"451 4.3.0 PostStack API temporarily unavailable after repeated failures, "
            b"try again later\r\n",
        )
        [opened] = [e for e in events if e.get("event") == "api_breaker_open"]
        self.assertEqual(opened["log_level"].name, "warn")
        self.assertEqual(opened["failures"], 3)
        self.assertEqual(opened["interval"], 0.5)

    def test_message_counts_once(self) -> None:
        """One message that fails 3 attempts counts once; 3 such messages open the breaker."""
        api = self.make_api(max_attempts=3, breaker_failures=3, rng=RecordingRandom(0.0))
        self.sandbox.inject_fault("503", count=-1)
        d = api.send_email(FULL_KEY, email())
        self.settle(d)
        self.assertIn("temporary API failure", self.reply_of(d).text)
        self.assertEqual(len(self.recorder.seen), 3)
        self.assertEqual((api.breaker.state, api.breaker.failures), ("closed", 1))
        d = api.send_email(FULL_KEY, email())
        self.settle(d)
        self.assertIn("temporary API failure", self.reply_of(d).text)
        self.assertEqual((api.breaker.state, api.breaker.failures), ("closed", 2))
        # The third message's first failure opens the breaker: its own
        # retry is refused at once, like every other message's.
        d = api.send_email(FULL_KEY, email())
        self.settle(d)
        self.assertEqual(self.reply_of(d), API_DOWN)
        self.assertEqual(len(self.recorder.seen), 7)
        self.assertEqual(api.breaker.state, "open")
        self.assertEqual(self.reply_of(api.send_email(FULL_KEY, email())), API_DOWN)
        api.stop()

    def test_check_counts_once(self) -> None:
        """An AUTH-time check retried within its time-out counts once too."""
        api = self.make_api(breaker_failures=2, rng=RecordingRandom(0.0))
        self.sandbox.inject_fault("503", count=-1, path="/emails", method="GET")
        d = api.check_api_key(FULL_KEY)
        self.settle(d)
        self.failureResultOf(d, APIUnavailable)
        self.assertGreater(len(self.recorder.seen), 2)
        self.assertEqual((api.breaker.state, api.breaker.failures), ("closed", 1))

    def test_self_probe_closes_on_recovery(self) -> None:
        """
        While open the relay probes every 0.5 s by itself (GET without a
        key); a 5xx probe keeps it open; the first probe answered after the
        API recovers closes it, and sends go through again.
        """
        self.down()
        self.fail_times(3)
        self.assertEqual(self.probes(), 0)
        with capturedLogs() as events:
            for n in range(1, 5):
                self.clock.advance(0.5)
                self.assertEqual(self.probes(), n)
                self.assertEqual(self.api.breaker.state, "open")
                self.assertEqual(self.reply_of(self.api.send_email(FULL_KEY, email())), API_DOWN)
            self.sandbox.clear_faults()  # the API is back
            self.clock.advance(0.5)
            self.assertEqual(self.api.breaker.state, "closed")
            email_id = self.successResultOf(self.api.send_email(FULL_KEY, email()))
        self.assertEqual(self.probes(), 5)
        [stored] = self.store.emails()
        self.assertEqual(email_id, stored.id)
        self.assertEqual(self.api.breaker.failures, 0)
        [closed] = [e for e in events if e.get("event") == "api_breaker_closed"]
        self.assertEqual(closed["log_level"].name, "info")
        self.assertEqual(closed["outage"], 2.5)
        self.assertEqual([e for e in events if e.get("event") == "api_breaker_open"], [])
        # Closed: no probe is left behind.
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(self.probes(), 5)

    def test_probe_never_doubles(self) -> None:
        """
        A probe that hangs is never joined by a second: the next starts when
        it times out (after 1 s); after recovery the breaker closes within
        about a second.
        """
        self.down("hang")
        self.fail_times(3, "reset")
        self.clock.advance(0.5)
        self.assertEqual(self.probes(), 1)
        self.clock.advance(0.999)
        self.assertEqual(self.probes(), 1)
        self.clock.advance(0.001)  # timed out after 1 s: the next starts at once
        self.assertEqual(self.probes(), 2)
        self.stub.flush()
        self.assertEqual(self.sandbox.pending, 1)
        self.sandbox.clear_faults()  # the API is back; the probe in flight still hangs
        recovered = self.clock.seconds()
        self.clock.advance(1.0)
        self.assertEqual(self.probes(), 3)
        self.assertEqual(self.api.breaker.state, "closed")
        self.assertLessEqual(self.clock.seconds() - recovered, 1.0)
        self.assertEqual(value_of(self.api, "breaker_probe", "timeout"), 2.0)
        self.assertEqual(value_of(self.api, "breaker_probe", "401"), 1.0)
        self.sandbox.abort_pending()

    def test_fast_failing_probes_keep_their_interval(self) -> None:
        """Probes that fail at once (resets) are still one per interval."""
        self.down("reset")
        self.fail_times(3)
        for _ in range(20):  # 5 s, in steps exact in binary
            self.clock.advance(0.25)
            self.stub.flush()
        self.assertEqual(self.probes(), 10)
        self.assertEqual(self.api.breaker.state, "open")

    def test_stop_cancels_probing(self) -> None:
        """stop() cancels the next probe and the one in flight; a later refusal restarts it."""
        self.down("hang")
        self.fail_times(3, "503")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(0.5)
        self.assertEqual(self.probes(), 1)
        self.api.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.stub.flush()
        self.assertEqual(self.sandbox.pending, 0)  # the held probe's connection was closed
        self.clock.advance(10)
        self.assertEqual(self.probes(), 1)
        self.assertEqual(self.api.breaker.state, "open")
        self.sandbox.clear_faults()
        self.assertEqual(self.reply_of(self.api.send_email(FULL_KEY, email())), API_DOWN)
        self.clock.advance(0)
        self.assertEqual(self.api.breaker.state, "closed")

    def test_answers_reset_the_count(self) -> None:
        """A 4xx (or any answer) between transient failures resets the consecutive count."""
        self.fail_times(2)
        self.reply_of(self.api.send_email(FULL_KEY, email(subject=None)))  # 400
        self.fail_times(2)
        self.assertEqual(self.api.breaker.state, "closed")
        self.successResultOf(self.api.check_api_key(FULL_KEY))
        self.fail_times(2)
        self.assertEqual(self.api.breaker.state, "closed")
        self.assertEqual(self.api.breaker.failures, 2)

    def test_quota_and_4xx_do_not_count(self) -> None:
        """Quota 429s and 422s never open the breaker."""
        self.fail_times(5, "quota")
        self.fail_times(5, "422")
        self.assertEqual(self.api.breaker.state, "closed")
        self.assertEqual(len(self.recorder.seen), 10)

    def test_network_errors_and_timeouts_count(self) -> None:
        """Resets and full-length time-outs count as failures."""
        self.fail_times(2, "reset")
        self.fail_times(1, "hang")
        self.assertEqual(self.api.breaker.state, "open")

    def test_checks_count(self) -> None:
        """Transient failures of AUTH-time checks count too."""
        self.sandbox.inject_fault("503", count=-1, path="/emails", method="GET")
        for _ in range(3):
            d = self.api.check_api_key(FULL_KEY)
            self.settle(d)
            self.failureResultOf(d, APIUnavailable)
        self.assertEqual(self.api.breaker.state, "open")

    def test_disabled(self) -> None:
        """breaker_failures=0 never opens."""
        api = self.make_api(max_attempts=1, breaker_failures=0)
        self.sandbox.inject_fault("503", count=20)
        for _ in range(20):
            self.reply_of(api.send_email(FULL_KEY, email()))
        self.assertEqual(len(self.recorder.seen), 20)
        self.assertEqual(api.breaker.state, "closed")

    def test_truncated_timeout_not_counted(self) -> None:
        """A time-out cut short by the message's deadline is not evidence the API is down."""
        api = self.make_api(deadline=15.0, breaker_failures=2)
        self.sandbox.inject_fault("hang", count=-1)
        d = api.send_email(FULL_KEY, email())
        self.settle(d)
        self.assertEqual(self.reply_of(d), API_TIMEOUT)
        self.assertEqual(len(self.recorder.seen), 2)
        self.assertEqual(api.breaker.failures, 1)
        self.assertEqual(api.breaker.state, "closed")

    def test_open_during_backoff(self) -> None:
        """A message waiting to retry when the breaker opens fails fast at its next attempt."""
        api = self.make_api(breaker_failures=2, rng=RecordingRandom(1.0))
        self.sandbox.inject_fault("503", count=-1)
        waiting = api.send_email(FULL_KEY, email(subject="waiting"))
        self.assertNoResult(waiting)
        other = api.send_email(FULL_KEY, email(subject="other"))
        self.assertNoResult(other)
        self.assertEqual(api.breaker.state, "open")
        self.clock.advance(0.25)
        self.assertEqual(self.reply_of(waiting), API_DOWN)
        self.assertEqual(self.reply_of(other), API_DOWN)
        self.assertEqual(len(self.recorder.seen), 2)
        api.stop()

    def test_straggler_success_closes(self) -> None:
        """A request that started before the breaker opened and then succeeds closes it."""
        api = self.make_api(max_attempts=1, breaker_failures=1)
        self.sandbox.inject_fault("503", count=-1, path="/emails", method="GET")
        self.sandbox.inject_fault("slow", delay=5)
        slow = api.send_email(FULL_KEY, email())
        self.sandbox.inject_fault("503")
        self.reply_of(api.send_email(FULL_KEY, email()))
        self.assertEqual(api.breaker.state, "open")
        self.clock.advance(4.9)
        self.assertEqual(api.breaker.state, "open")
        self.clock.advance(0.1)
        self.stub.flush()
        self.successResultOf(slow)
        self.assertEqual(api.breaker.state, "closed")
        self.assertEqual(self.clock.getDelayedCalls(), [])


def value_of(api: HTTPEmailAPI, call: str, status: str) -> float:
    """The count of C{upstream_requests_total} for C{call} and C{status}."""
    found = api.metrics.registry.get_sample_value(
        "poststack_relay_upstream_requests_total", {"call": call, "status": status}
    )
    return found or 0.0



class ConnectionHygieneTests(RetryMixin, SynchronousTestCase):
    """
    A timed-out attempt closes its connection, so a half-read connection is
    never reused from the pool.
    """

    def test_timeout_before_headers_closes(self) -> None:
        """A hanging request's connection is closed when the attempt times out."""
        api = self.make_api(max_attempts=1)
        self.sandbox.inject_fault("hang")
        d = api.send_email(FULL_KEY, email())
        self.stub.flush()
        self.assertEqual(self.sandbox.pending, 1)
        self.clock.advance(TIMEOUT)
        self.stub.flush()
        self.assertEqual(self.reply_of(d), API_TIMEOUT)
        self.assertEqual(self.sandbox.pending, 0)

    def test_timeout_during_body_closes(self) -> None:
        """A body that never ends: the attempt times out and its connection is closed."""
        trickle = Trickle()
        api = self.make_api(trickle, max_attempts=1)
        d = api.send_email(FULL_KEY, email())
        self.stub.flush()
        self.assertEqual(trickle.lost, [])
        self.clock.advance(TIMEOUT)
        self.stub.flush()
        self.assertEqual(self.reply_of(d), API_TIMEOUT)
        self.assertEqual(trickle.lost, trickle.requests)


class ParseRetryAfterTests(SynchronousTestCase):
    """
    L{parse_retry_after} and the hint in L{reply_for_status}.
    """

    def test_seconds(self) -> None:
        """Delay-seconds, with spaces around."""
        self.assertEqual(parse_retry_after("3", 100.0), 3.0)
        self.assertEqual(parse_retry_after(" 120 ", 100.0), 120.0)

    def test_http_date(self) -> None:
        """An HTTP date counts from now; a past date is 0."""
        now = 1_700_000_000.0
        self.assertEqual(parse_retry_after(formatdate(now + 7, usegmt=True), now), 7.0)
        self.assertEqual(parse_retry_after(formatdate(now - 7, usegmt=True), now), 0.0)

    def test_garbage(self) -> None:
        """Absent, negative, fractional, non-ASCII digits or junk: None."""
        for value in (None, "", "-1", "1.5", "\u00b2", "soon", "9" * 20):
            self.assertIsNone(parse_retry_after(value, 0.0), value)

    def test_reply_hint_non_ascii_digit(self) -> None:
        """A Retry-After of a non-ASCII digit gives no hint and no crash."""
        self.assertEqual(
            reply_for_status(429, None, "\u00b2"),
            Reply(451, "4.7.0", "PostStack rate limit reached"),
        )


class ConstructorTests(SynchronousTestCase):
    """
    Settings that cannot work are refused.
    """

    def test_bad_settings(self) -> None:
        """Non-positive timeout or deadline, zero attempts, negative breaker values."""
        for options in (
            {"deadline": 0},
            {"max_attempts": 0},
            {"breaker_failures": -1},
            {"breaker_cooldown": -1},
            {"breaker_cooldown": 0},
            {"backoff_base": -1},
        ):
            self.assertRaises(
                ValueError, HTTPEmailAPI, StubTreq(Resource()), BASE, TIMEOUT, **options
            )
        self.assertRaises(ValueError, HTTPEmailAPI, StubTreq(Resource()), BASE, 0)


class EmailIdShapeTests(SynchronousTestCase):
    def test_odd_ids_are_not_ids(self) -> None:
        """A 2xx whose id could not stand in a reply line counts as an answer without an id."""
        from poststack_relay.api.answers import email_id as _email_id

        self.assertEqual(_email_id({"id": "em_abc123"}), "em_abc123")
        for bad in ("", " ", "em_\r\n250 ok", "x" * 101, "é", None, 7):
            self.assertIsNone(_email_id({"id": bad}), bad)
