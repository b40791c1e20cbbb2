"""
L{poststack_relay.holds}: a 429 remembered per credential and answered at
C{MAIL FROM}, through L{RelayDelivery} and the real API client.
"""

from __future__ import annotations

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.api import APIError, HTTPEmailAPI
from poststack_relay.auth import Identity
from poststack_relay.delivery import RelayDelivery
from poststack_relay.fleet import LocalState
from poststack_relay.config import DEFAULT_API_QUOTA_HOLD
from poststack_relay.holds import MAX_RATE_HOLD, CredentialHolds
from poststack_relay.replies import Reply, reply_for_status
from poststack_relay.sandbox import (
    IN_TREE_DATA_PATH,
    SandboxResource,
    SandboxStore,
    load_sandbox_data,
)
from poststack_relay.testing import MemoryEmailAPI
from poststack_relay.translate import Envelope
from tests.common.api import BASE, email
from tests.common.keys import FULL_KEY, SCOPED_KEY

KEY = "ps_live_holdtests0000000000000000"
OTHER = "ps_live_otherkey00000000000000000"
ENV = Envelope("you@yourdomain.com", ("user@example.com",))
RAW = (
    b"From: you@yourdomain.com\r\nTo: user@example.com\r\nSubject: hi\r\n"
    b"Message-ID: <1@yourdomain.com>\r\n\r\nHello\r\n"
)


def rate_limit(seconds: int) -> APIError:
    body = {"error": "Too many requests", "code": "rate_limit_exceeded"}
    return APIError(reply_for_status(429, body, str(seconds)), 429, "rate_limit_exceeded",
                    retry_after=float(seconds))


def quota() -> APIError:
    body = {"error": "Monthly limit reached", "code": "monthly_limit_exceeded"}
    return APIError(reply_for_status(429, body), 429, "monthly_limit_exceeded")


class HoldsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.holds = CredentialHolds(LocalState(self.clock))

    def test_rate_limit_counts_down(self) -> None:
        error = rate_limit(5)
        self.holds.learned(KEY, error.status, error.code, error.retry_after, error.reply, "k")
        self.assertEqual(
            self.holds.refusal(KEY), Reply(451, "4.7.0", "PostStack rate limit reached, retry-after=5s")
        )
        self.assertIsNone(self.holds.refusal(OTHER))
        self.clock.advance(3.5)
        self.assertEqual(self.holds.refusal(KEY), Reply(451, "4.7.0", "PostStack rate limit reached, retry-after=2s"))
        self.clock.advance(1.5)
        self.assertIsNone(self.holds.refusal(KEY))

    def test_quota_keeps_the_apis_reason(self) -> None:
        error = quota()
        self.holds.learned(KEY, error.status, error.code, None, error.reply, "k")
        reply = self.holds.refusal(KEY)
        self.assertEqual(reply, error.reply)
        assert reply is not None
        self.assertIn("Monthly limit reached", reply.text)
        self.assertIn("monthly_limit_exceeded", reply.text)
        self.clock.advance(DEFAULT_API_QUOTA_HOLD)
        self.assertIsNone(self.holds.refusal(KEY))

    def test_quota_hold_configurable(self) -> None:
        error = quota()
        for seconds in (0.0, 2.0):
            holds = CredentialHolds(LocalState(self.clock), quota_hold=seconds)
            holds.learned(KEY, error.status, error.code, None, error.reply, "k")
            self.assertEqual(holds.refusal(KEY) is not None, seconds > 0)
        self.clock.advance(2)
        self.assertIsNone(holds.refusal(KEY))

    def test_not_held(self) -> None:
        """
        Other statuses, and a rate limit that does not say how long, hold
        nothing.
        """
        no_hint = APIError(reply_for_status(429, {"code": "rate_limit_exceeded"}), 429,
                           "rate_limit_exceeded")
        for error in (no_hint, APIError(reply_for_status(503, None), 503),
                      APIError(reply_for_status(422, None), 422)):
            self.holds.learned(KEY, error.status, error.code, error.retry_after, error.reply, "k")
        self.assertIsNone(self.holds.refusal(KEY))

    def test_capped(self) -> None:
        self.holds.throttled(KEY, 10 * MAX_RATE_HOLD)
        self.clock.advance(MAX_RATE_HOLD)
        self.assertIsNone(self.holds.refusal(KEY))

    def test_logged_once_no_key(self) -> None:
        with capturedLogs() as events:
            self.holds.throttled(KEY, 5)
            self.holds.throttled(KEY, 5)
        held = [e for e in events if e.get("event") == "credential_held"]
        self.assertEqual(len(held), 1)
        self.assertNotIn(KEY, repr(held))


class DeliveryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.holds = CredentialHolds(LocalState(self.clock))
        self.api = MemoryEmailAPI()
        identity = Identity("api_key", KEY, None, "ps_live_h…", b"d", "key:x")
        self.delivery = RelayDelivery(identity, self.api, True, self.holds)
        other = Identity("api_key", OTHER, None, "ps_live_o…", b"e", "key:y")
        self.other = RelayDelivery(other, self.api, True, self.holds)

    def test_mail_from_refused_after_429(self) -> None:
        """
        After DATA got a 429, the next MAIL FROM with that key is refused
        before any upload; another key is not; after Retry-After it passes.
        """
        self.assertIsNone(self.delivery.validate_sender("you@yourdomain.com"))
        self.api.next_error = rate_limit(7)
        reply = self.successResultOf(self.delivery.deliver(ENV, RAW))
        self.assertEqual((reply.code, reply.enhanced), (451, "4.7.0"))
        held = self.delivery.validate_sender("you@yourdomain.com")
        self.assertEqual(held, Reply(451, "4.7.0", "PostStack rate limit reached, retry-after=7s"))
        self.assertIsNone(self.other.validate_sender("you@yourdomain.com"))
        self.clock.advance(7)
        self.assertIsNone(self.delivery.validate_sender("you@yourdomain.com"))


class ClientTests(SynchronousTestCase):
    """
    The real client (over treq's StubTreq and the sandbox) tells the holds
    at the first throttling 429, while the message waits to retry.
    """

    def test_throttled_while_waiting(self) -> None:
        clock = Clock()
        store = SandboxStore(self.mktemp())
        self.addCleanup(store.close)
        sandbox = SandboxResource(store, load_sandbox_data(IN_TREE_DATA_PATH), clock)
        holds = CredentialHolds(LocalState(clock))
        stub = StubTreq(sandbox)
        api = HTTPEmailAPI(stub, BASE, 10.0, None, clock=clock, deadline=30.0,
                           throttled=holds.throttled)
        sandbox.inject_fault("429", retry_after="5")
        d = api.send_email(FULL_KEY, email())
        stub.flush()
        self.assertFalse(d.called)
        self.assertEqual(
            holds.refusal(FULL_KEY), Reply(451, "4.7.0", "PostStack rate limit reached, retry-after=5s")
        )
        self.assertIsNone(holds.refusal(SCOPED_KEY))
        for _ in range(10):
            clock.advance(1)
            stub.flush()
        self.successResultOf(d)
        self.assertIsNone(holds.refusal(FULL_KEY))
