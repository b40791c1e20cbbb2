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
from poststack_relay.holds import HELD_QUOTA, HELD_RATE, HELD_SENDER_DOMAIN, MAX_RATE_HOLD, CredentialHolds
from poststack_relay import replies
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


def unverified(domain: str = "pendingdomain.com") -> APIError:
    return APIError(reply_for_status(422, {"error": "Domain not verified"}), 422, "unprocessable_entity",
                    sender_domain=domain)


class SenderDomainHoldsTests(SynchronousTestCase):
    """A sender domain the API refused, held per (key, domain) for sender_domain_hold seconds."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.state = LocalState(self.clock)
        self.holds = CredentialHolds(self.state, sender_domain_hold=90.0)

    def learn(self, error: APIError, key: str = KEY) -> None:
        self.holds.learned(key, error.status, error.code, error.retry_after, error.reply, "k",
                           error.sender_domain)

    def test_held_per_key_and_domain(self) -> None:
        """The next MAIL FROM on that domain (any local part, any case, a display form) with that key is held; not another domain or key; not after the hold."""
        self.learn(unverified())
        reason, reply = self.holds.held(KEY, "Other@PendingDomain.COM") or ("", None)
        self.assertEqual(reason, HELD_SENDER_DOMAIN)
        self.assertEqual(
            reply,
            Reply(550, "5.7.1", "Sender address rejected: the domain pendingdomain.com is not verified in "
                  "PostStack; verify it (PostStack dashboard, Domains), or send from a verified domain "
                  "(PostStack API said HTTP 422 recently)"),
        )
        self.assertEqual(self.holds.refusal(KEY, "you@pendingdomain.com"), reply)
        for key, sender in ((KEY, "you@yourdomain.com"), (OTHER, "you@pendingdomain.com"), (KEY, ""),
                            (KEY, "poststack")):
            self.assertIsNone(self.holds.held(key, sender), (key, sender))
        self.assertIsNone(self.holds.refusal(KEY))  # the credential itself is not held
        self.clock.advance(89.9)
        self.assertIsNotNone(self.holds.held(KEY, "you@pendingdomain.com"))
        self.clock.advance(0.1)
        self.assertIsNone(self.holds.held(KEY, "you@pendingdomain.com"))

    def test_statuses(self) -> None:
        """404 and 403 refusals are held with their own text."""
        for status, words in ((404, "is not a PostStack sending domain of this account"),
                              (403, "this API key may not send from x.example")):
            self.learn(APIError(reply_for_status(status, None), status, None, sender_domain="x.example"), OTHER)
            reply = self.holds.refusal(OTHER, "a@x.example")
            assert reply is not None
            self.assertIn(words, reply.text)
            self.assertIn(f"HTTP {status}", reply.text)

    def test_off_and_not_a_domain_refusal(self) -> None:
        """sender_domain_hold 0 holds nothing; an API error without a sender domain holds no domain."""
        off = CredentialHolds(LocalState(self.clock), sender_domain_hold=0.0)
        off.learned(KEY, 422, None, None, unverified().reply, "k", "pendingdomain.com")
        self.assertIsNone(off.held(KEY, "you@pendingdomain.com"))
        self.learn(APIError(reply_for_status(422, {"error": "Template not published"}), 422))
        self.assertIsNone(self.holds.held(KEY, "you@pendingdomain.com"))

    def test_state_never_holds_the_key_or_domain(self) -> None:
        """What goes to the (shareable) state is a digest and the status, logged once per new hold."""
        notes: list[tuple[str, str, float]] = []
        real = self.state.remember
        self.state.remember = lambda s, v, t: (notes.append((s, v, t)), real(s, v, t))[1]  # type: ignore[method-assign]  # spy
        with capturedLogs() as events:
            self.learn(unverified())
            self.learn(unverified())
        self.assertEqual([(v, t) for _, v, t in notes], [("422", 90.0)] * 2)
        self.assertNotIn("pendingdomain", repr(notes))
        self.assertNotIn(KEY, repr(notes))
        held = [e for e in events if e.get("event") == "sender_domain_held"]
        self.assertEqual(len(held), 1)
        self.assertEqual((held[0]["domain"], held[0]["status"], held[0]["seconds"]), ("pendingdomain.com", 422, 90.0))
        self.assertNotIn(KEY, repr(held))

    def test_credential_hold_first(self) -> None:
        """A held credential answers before its domain: the 429s say more (they hold every domain)."""
        self.learn(unverified())
        self.holds.throttled(KEY, 5)
        self.assertEqual(self.holds.held(KEY, "you@pendingdomain.com")[0], HELD_RATE)  # type: ignore[index]  # not None here
        error = quota()
        self.holds.learned(OTHER, error.status, error.code, None, error.reply, "k")
        self.assertEqual(self.holds.held(OTHER, "you@x.com")[0], HELD_QUOTA)  # type: ignore[index]  # not None here


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

    def test_mail_from_refused_after_domain_refusal(self) -> None:
        """
        After DATA got the API's refusal of the sender domain, the next
        MAIL FROM on that domain with that key is refused (and logged); the
        policy still comes first.
        """
        self.api.next_error = unverified()
        self.successResultOf(self.delivery.deliver(Envelope("you@pendingdomain.com", ("u@example.com",)), RAW))
        with capturedLogs() as events:
            held = self.delivery.validate_sender("you@pendingdomain.com", "s1", "192.0.2.1")
            self.assertEqual(self.delivery.validate_sender("poststack", "s1", "192.0.2.1"),
                             replies.SENDER_NO_DOMAIN)
        assert held is not None
        self.assertEqual((held.code, held.enhanced), (550, "5.7.1"))
        self.assertIsNone(self.delivery.validate_sender("you@yourdomain.com"))
        self.assertIsNone(self.other.validate_sender("you@pendingdomain.com"))
        self.assertEqual(
            [(e["session"], e["client"], e["reason"], e["mail_from"]) for e in events
             if e.get("event") == "smtp_sender_refused"],
            [("s1", "192.0.2.1", "sender_domain", "you@pendingdomain.com"),
             ("s1", "192.0.2.1", "no_domain", "poststack")],
        )


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
