"""
Tests for L{poststack_relay.api}: the PostStack HTTP client and the
status -> SMTP reply mapping.

The client talks to the real sandbox resource through
C{treq.testing.StubTreq}; the sandbox and the client's time-out share one
L{Clock}, so slow, hanging and trickling answers are driven by hand.  A few
tests use a small recording or scripted resource where the sandbox cannot
produce the answer (redirects, answers without a mailbox, trickled bodies).
C{tests/test_api_transport.py} tests the relay's own treq client over real
loopback TCP.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from treq.testing import StubTreq

from poststack_relay._version import __version__
from poststack_relay.api import (
    STREAM_MIN_CONTENT,
    USER_AGENT,
    APIError,
    APIUnavailable,
    BodyProducer,
    HTTPEmailAPI,
    MailboxSuspended,
    body_bytes,
    json_body,
)
from poststack_relay.api.answers import refuses_sender_domain
from poststack_relay.replies import (
    API_BAD_ANSWER,
    API_NO_ANSWER,
    API_SERVICE_KEY_REJECTED,
    API_TIMEOUT,
    QUOTA_CODES,
    Reply,
    reply_for_status,
)
from poststack_relay.sandbox import (
    IN_TREE_DATA_PATH,
    SandboxData,
    SandboxResource,
    SandboxStore,
    load_sandbox_data,
)
from poststack_relay.translate import EmailRequest
from tests.common.api import BASE, Recorder, Seen, email, scripted
from tests.common.keys import FULL_KEY, SCOPED_KEY, SERVICE_KEY, UNKNOWN_KEY, scan

TIMEOUT = 10.0


class Trickle(Resource):
    """
    Answers 202 with the start of a JSON body and never finishes it.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render(self, request: Request) -> Any:
        self.requests.append(request)
        request.setResponseCode(202)
        request.setHeader(b"content-type", b"application/json")
        request.write(b'{"id": "em_')
        return NOT_DONE_YET


class SandboxMixin:
    """
    A sandbox on a temporary SQLite file, a shared L{Clock}, and helpers to
    build an L{HTTPEmailAPI} over C{StubTreq}.
    """

    mktemp: Callable[[], str]
    addCleanup: Callable[..., None]

    def make_sandbox(self, data: Optional[SandboxData] = None) -> None:
        self.clock = Clock()
        self.store = SandboxStore(self.mktemp())
        self.addCleanup(self.store.close)
        self.data = data or load_sandbox_data(IN_TREE_DATA_PATH)
        self.sandbox = SandboxResource(self.store, self.data, self.clock)
        self.recorder = Recorder(self.sandbox)

    def make_api(
        self,
        resource: Optional[Resource] = None,
        service_key: Optional[str] = SERVICE_KEY,
        **options: Any,
    ) -> HTTPEmailAPI:
        """
        An L{HTTPEmailAPI} over C{StubTreq}.  Unless C{options} say
        otherwise it makes one attempt per call and has no circuit breaker:
        these tests pin how one answer is classified, and
        C{tests/test_api_retry.py} covers retries and the breaker.
        """
        options.setdefault("max_attempts", 1)
        options.setdefault("breaker_failures", 0)
        served = resource if resource is not None else self.recorder
        self.stub = StubTreq(served)
        return HTTPEmailAPI(
            self.stub, BASE + "/", TIMEOUT, service_key, clock=self.clock, **options
        )


def _reply_of(case: SynchronousTestCase, d: "Deferred[Any]") -> Reply:
    failure = case.failureResultOf(d, APIError)
    error: APIError = failure.value
    return error.reply


class CheckAPIKeyTests(SandboxMixin, SynchronousTestCase):
    """
    L{HTTPEmailAPI.check_api_key}.
    """

    def setUp(self) -> None:
        self.make_sandbox()
        self.api = self.make_api()

    def test_valid(self) -> None:
        """A key the sandbox knows is valid, checked with GET /emails?per_page=1."""
        self.assertIs(self.successResultOf(self.api.check_api_key(FULL_KEY)), True)
        self.assertEqual([(s.method, s.path) for s in self.recorder.seen], [(b"GET", b"/emails")])

    def test_sending_access_key_valid(self) -> None:
        """A sending-access key (no GET /domains) is valid too."""
        self.assertIs(self.successResultOf(self.api.check_api_key(SCOPED_KEY)), True)

    def test_unknown(self) -> None:
        """An unknown key is invalid (401)."""
        self.assertIs(self.successResultOf(self.api.check_api_key(UNKNOWN_KEY)), False)

    def test_forbidden(self) -> None:
        """A 403 answer also means invalid."""
        resource, _ = scripted(403, b'{"error": "Forbidden", "code": "forbidden"}')
        api = self.make_api(resource)
        self.assertIs(self.successResultOf(api.check_api_key(FULL_KEY)), False)

    def test_5xx(self) -> None:
        """A 5xx on GET /emails cannot tell: APIUnavailable."""
        for mode in ("500", "502", "503"):
            self.sandbox.inject_fault(mode, path="/emails", method="GET")
            self.failureResultOf(self.api.check_api_key(FULL_KEY), APIUnavailable)

    def test_429(self) -> None:
        """A throttled key check cannot tell: APIUnavailable."""
        self.sandbox.inject_fault("429", retry_after="1", path="/emails", method="GET")
        self.failureResultOf(self.api.check_api_key(FULL_KEY), APIUnavailable)

    def test_reset(self) -> None:
        """A dropped connection on GET /emails is APIUnavailable."""
        self.sandbox.inject_fault("reset", path="/emails", method="GET")
        self.failureResultOf(self.api.check_api_key(FULL_KEY), APIUnavailable)

    def test_timeout(self) -> None:
        """A hanging key check fails with APIUnavailable when the time-out expires."""
        self.sandbox.inject_fault("hang", path="/emails", method="GET")
        d = self.api.check_api_key(FULL_KEY)
        self.assertNoResult(d)
        self.clock.advance(TIMEOUT)
        self.failureResultOf(d, APIUnavailable)


class AuthenticateMailboxTests(SandboxMixin, SynchronousTestCase):
    """
    L{HTTPEmailAPI.authenticate_mailbox}.
    """

    def setUp(self) -> None:
        self.make_sandbox()
        self.api = self.make_api()

    def test_good(self) -> None:
        """A good login fires with the mailbox's canonical address."""
        address = self.successResultOf(
            self.api.authenticate_mailbox("ALICE@YourDomain.com", "alice-password")
        )
        self.assertEqual(address, "alice@yourdomain.com")
        [seen] = self.recorder.seen
        self.assertEqual((seen.method, seen.path), (b"POST", b"/mailboxes/authenticate"))
        self.assertEqual(seen.headers[b"authorization"], [b"Bearer " + SERVICE_KEY.encode()])
        self.assertEqual(
            json.loads(seen.body), {"email": "ALICE@YourDomain.com", "password": "alice-password"}
        )

    def test_wrong_password(self) -> None:
        """A wrong password (401 Invalid email or password) is None."""
        self.assertIsNone(
            self.successResultOf(self.api.authenticate_mailbox("alice@yourdomain.com", "nope"))
        )

    def test_unknown_mailbox(self) -> None:
        """An unknown mailbox is None."""
        self.assertIsNone(
            self.successResultOf(self.api.authenticate_mailbox("carol@yourdomain.com", "x"))
        )

    def test_suspended(self) -> None:
        """
        A suspended mailbox (403 Mailbox is suspended, after the right
        password) is MailboxSuspended, not a failed login.
        """
        self.failureResultOf(
            self.api.authenticate_mailbox("bob@yourdomain.com", "bob-password"), MailboxSuspended
        )
        # With a wrong password it is a failed login like any other.
        self.assertIsNone(self.successResultOf(self.api.authenticate_mailbox("bob@yourdomain.com", "x")))

    def test_api_down(self) -> None:
        """A 5xx, a 429, a reset or a hang is APIUnavailable, never None."""
        for mode in ("500", "503", "429", "reset"):
            self.sandbox.inject_fault(mode, path="/mailboxes/authenticate")
            self.failureResultOf(
                self.api.authenticate_mailbox("alice@yourdomain.com", "alice-password"),
                APIUnavailable,
            )
        self.sandbox.inject_fault("hang", path="/mailboxes/authenticate")
        d = self.api.authenticate_mailbox("alice@yourdomain.com", "alice-password")
        self.clock.advance(TIMEOUT)
        self.failureResultOf(d, APIUnavailable)

    def test_no_service_key(self) -> None:
        """Without a service key, mailbox logins are None and no request is made."""
        api = self.make_api(service_key=None)
        self.assertIsNone(
            self.successResultOf(api.authenticate_mailbox("alice@yourdomain.com", "alice-password"))
        )
        self.assertEqual(self.recorder.seen, [])

    def test_key_not_a_service_key(self) -> None:
        """
        A service key that may not authenticate mailboxes (403) is an
        operator error: APIUnavailable and an error event, not None.
        """
        api = self.make_api(service_key=FULL_KEY)
        with capturedLogs() as events:
            self.failureResultOf(
                api.authenticate_mailbox("alice@yourdomain.com", "alice-password"), APIUnavailable
            )
        [event] = [e for e in events if e.get("event") == "api_service_key_rejected"]
        self.assertEqual(event["log_level"].name, "error")
        text = formatEvent(event)
        self.assertIn("HTTP 403", text)
        self.assertIn("may not authenticate mailboxes", text)
        self.assertNotIn(FULL_KEY, text)

    def test_service_key_unknown(self) -> None:
        """An unknown service key (401 Invalid API key) is APIUnavailable plus an error event."""
        api = self.make_api(service_key=UNKNOWN_KEY)
        with capturedLogs() as events:
            self.failureResultOf(
                api.authenticate_mailbox("alice@yourdomain.com", "alice-password"), APIUnavailable
            )
        [event] = [e for e in events if e.get("event") == "api_service_key_rejected"]
        self.assertIn("HTTP 401", formatEvent(event))
        self.assertNotIn(UNKNOWN_KEY, formatEvent(event))

    def test_bad_login_logs_no_error(self) -> None:
        """A wrong password or a suspended mailbox logs no service-key error."""
        with capturedLogs() as events:
            self.successResultOf(self.api.authenticate_mailbox("alice@yourdomain.com", "nope"))
            self.failureResultOf(
                self.api.authenticate_mailbox("bob@yourdomain.com", "bob-password"), MailboxSuspended
            )
        self.assertEqual([e for e in events if e.get("event") == "api_service_key_rejected"], [])

    def test_authorization_header_refused(self) -> None:
        """A 401 that blames the Authorization header is an operator error."""
        resource, _ = scripted(
            401,
            b'{"error": "Authorization must be \'Bearer <api key>\'", "code": "unauthorized"}',
        )
        api = self.make_api(resource)
        self.failureResultOf(api.authenticate_mailbox("a@yourdomain.com", "pw"), APIUnavailable)

    def test_401_without_error_body(self) -> None:
        """A 401/403 whose body is not an API error (a proxy page) cannot tell: APIUnavailable."""
        for status in (401, 403):
            resource, _ = scripted(status, b"<html>denied</html>", {b"content-type": b"text/html"})
            api = self.make_api(resource)
            self.failureResultOf(api.authenticate_mailbox("a@yourdomain.com", "pw"), APIUnavailable)

    def test_200_without_mailbox(self) -> None:
        """A 200 without a mailbox object is a bad answer: APIUnavailable, not a failed login."""
        resource, _ = scripted(200, b'{"ok": true}')
        api = self.make_api(resource)
        self.failureResultOf(api.authenticate_mailbox("a@yourdomain.com", "pw"), APIUnavailable)

    def test_200_inactive(self) -> None:
        """A 200 naming a mailbox that is not active is MailboxSuspended."""
        resource, _ = scripted(
            200, b'{"mailbox": {"email_address": "a@yourdomain.com", "status": "suspended"}}'
        )
        api = self.make_api(resource)
        self.failureResultOf(api.authenticate_mailbox("a@yourdomain.com", "pw"), MailboxSuspended)

    def test_404(self) -> None:
        """A 404 from the mailbox endpoint is a failed login."""
        resource, _ = scripted(404, b'{"error": "Mailbox not found", "code": "not_found"}')
        api = self.make_api(resource)
        self.assertIsNone(self.successResultOf(api.authenticate_mailbox("a@yourdomain.com", "pw")))


class SendEmailTests(SandboxMixin, SynchronousTestCase):
    """
    L{HTTPEmailAPI.send_email}: the id on success, the exact SMTP reply on
    each failure.
    """

    def setUp(self) -> None:
        self.make_sandbox()
        self.api = self.make_api()

    def assertReply(self, d: "Deferred[str]", code: int, enhanced: str, *texts: str) -> Reply:
        reply = _reply_of(self, d)
        self.assertEqual((reply.code, reply.enhanced), (code, enhanced), reply)
        for text in texts:
            self.assertIn(text, reply.text)
        return reply

    def test_accepted(self) -> None:
        """A 202 fires with the email id the sandbox stored."""
        email_id = self.successResultOf(self.api.send_email(FULL_KEY, email()))
        [stored] = self.store.emails()
        self.assertEqual(email_id, stored.id)
        self.assertTrue(email_id.startswith("em_"))

    def test_no_delayed_calls_left(self) -> None:
        """A finished request leaves no time-out timer behind."""
        self.successResultOf(self.api.send_email(FULL_KEY, email()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_400(self) -> None:
        """400 (missing subject) is 554 5.6.0 with the API's message."""
        self.assertReply(
            self.api.send_email(FULL_KEY, email(subject=None)),
            554,
            "5.6.0",
            "PostStack API: 'subject' is required",
            "(HTTP 400)",
        )

    def test_401(self) -> None:
        """401 (unknown key) is 554 5.7.8: the key was rejected."""
        self.assertReply(
            self.api.send_email(UNKNOWN_KEY, email()),
            554,
            "5.7.8",
            "PostStack API: Invalid API key",
            "check that it is valid and not revoked",
        )

    def test_401_service_key(self) -> None:
        """
        401 for the relay's own service key (a mailbox send) is the
        operator's problem: 451 4.3.5 and an error event.
        """
        api = self.make_api(service_key=UNKNOWN_KEY)
        with capturedLogs() as events:
            d = api.send_email(UNKNOWN_KEY, email())
        self.assertEqual(_reply_of(self, d), API_SERVICE_KEY_REJECTED)
        self.assertEqual(
            [e["log_level"].name for e in events if e.get("event") == "api_service_key_rejected"],
            ["error"],
        )

    def test_403_scope(self) -> None:
        """403 (a domain-scoped key sending from another domain) is 550 5.7.1 naming the domain; the error carries it."""
        d = self.api.send_email(SCOPED_KEY, email(**{"from": "You <you@AnotherDomain.com>"}))
        error = self.failureResultOf(d, APIError).value
        self.assertEqual((error.status, error.sender_domain), (403, "anotherdomain.com"))
        self.assertEqual(
            error.reply,
            Reply(
                550, "5.7.1",
                "Sender address rejected: this API key may not send from anotherdomain.com; use a key allowed "
                "to send from it, or send from a verified domain (PostStack API: API key is not allowed to "
                "send from anotherdomain.com, HTTP 403)",
            ),
        )

    def test_404_template(self) -> None:
        """404 (unknown template) is 554 5.6.0 with the API's message."""
        self.assertReply(
            self.api.send_email(FULL_KEY, email(template_id="tpl_nosuchtemplate000000")),
            554,
            "5.6.0",
            "PostStack API: Template not found",
            "(HTTP 404)",
        )

    def test_404_domain(self) -> None:
        """404 (unknown sender domain) is 550 5.7.1 naming the domain and saying to add it."""
        d = self.api.send_email(FULL_KEY, email(**{"from": "you@unknown.example"}))
        error = self.failureResultOf(d, APIError).value
        self.assertEqual(error.sender_domain, "unknown.example")
        self.assertEqual((error.reply.code, error.reply.enhanced), (550, "5.7.1"))
        self.assertTrue(error.reply.text.startswith(
            "Sender address rejected: the domain unknown.example is not a PostStack sending domain of this "
            "account; add and verify it"), error.reply.text)
        self.assertTrue(error.reply.text.endswith("(PostStack API: Domain not found, HTTP 404)"))

    def test_409(self) -> None:
        """409 (same idempotency key, different body) is 554 5.6.0 naming the key reuse."""
        self.successResultOf(self.api.send_email(FULL_KEY, email(idempotency_key="k-1")))
        self.assertReply(
            self.api.send_email(FULL_KEY, email(idempotency_key="k-1", subject="Other")),
            554,
            "5.6.0",
            "PostStack API: Idempotency key already used with a different request body",
            "idempotency key was already used",
        )

    def test_idempotent_replay(self) -> None:
        """The same key and body fire with the original id and store nothing new."""
        first = self.successResultOf(self.api.send_email(FULL_KEY, email(idempotency_key="k-2")))
        second = self.successResultOf(self.api.send_email(FULL_KEY, email(idempotency_key="k-2")))
        self.assertEqual(first, second)
        self.assertEqual(len(self.store.emails()), 1)

    def test_413(self) -> None:
        """413 (body over the API's limit) is 552 5.3.4."""
        self.make_sandbox(attrs.evolve(load_sandbox_data(IN_TREE_DATA_PATH), max_body_bytes=100))
        api = self.make_api()
        self.assertReply(
            api.send_email(FULL_KEY, email(text="x" * 200)),
            552,
            "5.3.4",
            "PostStack API: Request body is",
            "message too large for the API",
        )

    def test_422_domain(self) -> None:
        """422 (unverified domain) is 550 5.7.1 naming the domain, saying to verify it, with the API's message."""
        d = self.api.send_email(FULL_KEY, email(**{"from": "you@pendingdomain.com"}))
        error = self.failureResultOf(d, APIError).value
        self.assertEqual((error.status, error.sender_domain), (422, "pendingdomain.com"))
        self.assertEqual(
            error.reply,
            Reply(
                550, "5.7.1",
                "Sender address rejected: the domain pendingdomain.com is not verified in PostStack; verify it "
                "(PostStack dashboard, Domains), or send from a verified domain (PostStack API: Domain not "
                "verified, HTTP 422)",
            ),
        )

    def test_sender_domain_rule(self) -> None:
        """Only a 403/404/422 whose message names a domain (or the From domain) refuses the sender's domain."""
        for status, message, expected in [
            (422, "Domain not verified", True),
            (404, "Domain not found", True),
            (403, "API key is not allowed to send from x.example", True),
            (422, "Template not published", False),
            (404, "Template not found", False),
            (403, "This API key has sending access only", False),
            (400, "Invalid domain in from", False),
            (409, "Domain conflict", False),
        ]:
            self.assertEqual(refuses_sender_domain(status, message, "x.example"), expected, (status, message))
        self.assertFalse(refuses_sender_domain(422, "Domain not verified", None))

    def test_422_template(self) -> None:
        """422 (unpublished template) is 554 5.6.0 with the API's message."""
        self.assertReply(
            self.api.send_email(FULL_KEY, email(template_id="tpl_draft000000000000000")),
            554,
            "5.6.0",
            "PostStack API: Template not published (HTTP 422)",
        )

    def test_429_retry_after(self) -> None:
        """A throttling 429 with Retry-After is exactly 451 4.7.0 ... retry-after=3s."""
        self.sandbox.inject_fault("429", retry_after="3")
        self.assertEqual(
            _reply_of(self, self.api.send_email(FULL_KEY, email())),
            Reply(451, "4.7.0", "PostStack rate limit reached, retry-after=3s"),
        )

    def test_429_without_retry_after(self) -> None:
        """A throttling 429 without Retry-After is 451 4.7.0 without a hint."""
        self.sandbox.inject_fault("429")
        self.assertEqual(
            _reply_of(self, self.api.send_email(FULL_KEY, email())),
            Reply(451, "4.7.0", "PostStack rate limit reached"),
        )

    def test_429_quota(self) -> None:
        """A quota 429 is 451 4.7.0 naming the quota code and saying waiting will not help."""
        self.sandbox.inject_fault("quota")
        reply = self.assertReply(
            self.api.send_email(FULL_KEY, email()),
            451,
            "4.7.0",
            "PostStack API: Monthly limit reached",
            "(monthly_limit_exceeded)",
            "waiting seconds will not help",
        )
        self.assertNotIn("retry-after", reply.text)
        error: APIError = self.failureResultOf(
            self._quota_again(), APIError
        ).value
        self.assertEqual((error.status, error.code), (429, "monthly_limit_exceeded"))

    def _quota_again(self) -> "Deferred[str]":
        self.sandbox.inject_fault("quota")
        return self.api.send_email(FULL_KEY, email())

    def test_5xx(self) -> None:
        """500, 502 and 503 are 451 4.3.0 with the API's message."""
        for mode in ("500", "502", "503"):
            self.sandbox.inject_fault(mode)
            self.assertReply(
                self.api.send_email(FULL_KEY, email()),
                451,
                "4.3.0",
                "PostStack API: Internal server error (sandbox fault)",
                "temporary API failure",
            )

    def test_accept_then_500(self) -> None:
        """A lost acceptance (stored, then 500) is still 451 4.3.0, never 250."""
        self.sandbox.inject_fault("accept_then_500")
        self.assertReply(self.api.send_email(FULL_KEY, email()), 451, "4.3.0")
        self.assertEqual(len(self.store.emails()), 1)

    def test_malformed(self) -> None:
        """A 2xx with a non-JSON body is 451 4.3.0 (API_BAD_ANSWER)."""
        self.sandbox.inject_fault("malformed")
        reply = self.assertReply(self.api.send_email(FULL_KEY, email()), 451, "4.3.0")
        self.assertTrue(reply.text.startswith(API_BAD_ANSWER.text), reply)

    def test_noid(self) -> None:
        """A 2xx JSON body without an id is 451 4.3.0 (API_BAD_ANSWER), with the API status."""
        self.sandbox.inject_fault("noid")
        failure = self.failureResultOf(self.api.send_email(FULL_KEY, email()), APIError)
        self.assertEqual(failure.value.status, 202)
        self.assertTrue(failure.value.reply.text.startswith(API_BAD_ANSWER.text))
        self.assertEqual(
            (failure.value.reply.code, failure.value.reply.enhanced),
            (API_BAD_ANSWER.code, API_BAD_ANSWER.enhanced),
        )

    def test_bad_answer_hint(self) -> None:
        """
        The no-id reply only promises no duplicate when a resend carries
        the same key (the client's own, or a derived one), not a random one.
        """
        self.sandbox.inject_fault("noid")
        with_key = _reply_of(self, self.api.send_email(FULL_KEY, email(idempotency_key="k-3")))
        derived = attrs.evolve(email(idempotency_key="psr-" + "d" * 40), idempotency_kind="derived")
        self.sandbox.inject_fault("noid")
        self.assertIn("prevents a second send", _reply_of(self, self.api.send_email(FULL_KEY, derived)).text)
        self.sandbox.inject_fault("noid")
        without_key = _reply_of(self, self.api.send_email(FULL_KEY, email()))
        self.assertIn("prevents a second send", with_key.text)
        self.assertNotIn("prevents a second send", without_key.text)
        self.assertIn("set X-PostStack-Idempotency-Key", without_key.text)

    def test_reset(self) -> None:
        """A connection reset is 451 4.4.1."""
        self.sandbox.inject_fault("reset")
        self.assertEqual(_reply_of(self, self.api.send_email(FULL_KEY, email())), API_NO_ANSWER)
        self.assertEqual(API_NO_ANSWER.code, 451)
        self.assertEqual(API_NO_ANSWER.enhanced, "4.4.1")

    def test_timeout_hang(self) -> None:
        """A request with no answer is 451 4.4.2 exactly when the time-out expires."""
        self.sandbox.inject_fault("hang")
        d = self.api.send_email(FULL_KEY, email())
        self.clock.advance(TIMEOUT - 1)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertEqual(_reply_of(self, d), API_TIMEOUT)
        self.assertEqual((API_TIMEOUT.code, API_TIMEOUT.enhanced), (451, "4.4.2"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_slow_but_in_time(self) -> None:
        """An answer that arrives before the time-out is used."""
        self.sandbox.inject_fault("slow", delay=TIMEOUT / 2)
        d = self.api.send_email(FULL_KEY, email())
        self.assertNoResult(d)
        self.clock.advance(TIMEOUT / 2)
        self.stub.flush()
        self.assertTrue(self.successResultOf(d).startswith("em_"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_slow_too_late(self) -> None:
        """An answer slower than the time-out is 451 4.4.2."""
        self.sandbox.inject_fault("slow", delay=TIMEOUT * 2)
        d = self.api.send_email(FULL_KEY, email())
        self.clock.advance(TIMEOUT)
        self.assertEqual(_reply_of(self, d), API_TIMEOUT)

    def test_timeout_covers_body(self) -> None:
        """
        The time-out covers the whole answer: headers that arrive in time
        followed by a body that never ends is still 451 4.4.2.
        """
        trickle = Trickle()
        api = self.make_api(trickle)
        d = api.send_email(FULL_KEY, email())
        self.stub.flush()
        self.assertEqual(len(trickle.requests), 1)
        self.assertNoResult(d)
        self.clock.advance(TIMEOUT)
        self.assertEqual(_reply_of(self, d), API_TIMEOUT)

    def test_redirect_not_followed(self) -> None:
        """A 302 is 451 4.3.0 and no second request is made."""
        resource, calls = scripted(
            302, b"", {b"location": BASE.encode() + b"/elsewhere", b"content-type": b"text/plain"}
        )
        api = self.make_api(resource)
        self.assertReply(
            api.send_email(FULL_KEY, email()), 451, "4.3.0", "HTTP 302", "unexpected API answer"
        )
        self.assertEqual(calls, [(b"POST", BASE + "/emails")])

    def test_unknown_status(self) -> None:
        """A status outside the contract (418) is 451 4.3.0, never a bounce."""
        resource, _ = scripted(418, b'{"error": "I am a teapot", "code": "teapot"}')
        api = self.make_api(resource)
        self.assertReply(
            api.send_email(FULL_KEY, email()), 451, "4.3.0", "PostStack API: I am a teapot"
        )

    def test_request_id(self) -> None:
        """An APIError carries the API's x-request-id and code."""
        failure = self.failureResultOf(
            self.api.send_email(FULL_KEY, email(**{"from": "you@pendingdomain.com"})), APIError
        )
        self.assertEqual(failure.value.status, 422)
        self.assertEqual(failure.value.code, "unprocessable_entity")
        self.assertIsNotNone(failure.value.request_id)
        self.assertTrue(str(failure.value.request_id).startswith("req_"))

    def test_not_encodable(self) -> None:
        """A payload that cannot be JSON is 554 5.6.0 and no request is made."""
        self.assertReply(
            self.api.send_email(FULL_KEY, email(variables={"x": object()})), 554, "5.6.0"
        )
        self.assertEqual(self.recorder.seen, [])


class RequestDetailsTests(SandboxMixin, SynchronousTestCase):
    """
    What goes on the wire for C{POST /emails}.
    """

    def setUp(self) -> None:
        self.make_sandbox()
        self.api = self.make_api()

    def sent(self, request: EmailRequest, key: str = FULL_KEY) -> Seen:
        self.successResultOf(self.api.send_email(key, request))
        [seen] = self.recorder.seen
        return seen

    def test_headers(self) -> None:
        """Bearer key, our User-Agent, a JSON content type, and JSON accepted."""
        seen = self.sent(email())
        self.assertEqual((seen.method, seen.path), (b"POST", b"/emails"))
        self.assertEqual(seen.headers[b"authorization"], [b"Bearer " + FULL_KEY.encode()])
        self.assertEqual(seen.headers[b"user-agent"], [b"poststack-relay/" + __version__.encode()])
        self.assertEqual(USER_AGENT, "poststack-relay/" + __version__)
        self.assertEqual(seen.headers[b"content-type"], [b"application/json"])
        self.assertEqual(seen.headers[b"accept"], [b"application/json"])

    def test_idempotency_header(self) -> None:
        """The Idempotency-Key header equals the request's idempotency key."""
        seen = self.sent(email(idempotency_key="order-1234"))
        self.assertEqual(seen.headers[b"idempotency-key"], [b"order-1234"])
        self.assertEqual(json.loads(seen.body)["idempotency_key"], "order-1234")
        [stored] = self.store.emails()
        self.assertEqual(stored.idempotency_key, "order-1234")

    def test_random_key_sent_as_it_is(self) -> None:
        """A message's random key (no key of its own) goes out unchanged, as the header and in the body."""
        request = email()
        seen = self.sent(request)
        key = request.idempotency_key
        assert key is not None
        self.assertEqual(seen.headers[b"idempotency-key"], [key.encode("ascii")])
        self.assertEqual(json.loads(seen.body)["idempotency_key"], key)
        [stored] = self.store.emails()
        self.assertEqual(stored.idempotency_key, key)

    def test_request_not_changed(self) -> None:
        """Sending leaves the caller's EmailRequest payload alone."""
        request = email()
        before = dict(request.payload)
        self.sent(request)
        self.assertEqual(request.payload, before)

    def test_no_key_is_a_bug(self) -> None:
        """
        A request whose key was not decided (none, or none in its payload,
        or another one there) is refused at once: no request is made.
        """
        payload = email().payload
        no_key = dict(payload)
        del no_key["idempotency_key"]
        for request in (
            EmailRequest(payload=no_key, idempotency_key=None),
            EmailRequest(payload=no_key, idempotency_key="k-1"),
            EmailRequest(payload=payload, idempotency_key="k-other"),
        ):
            self.assertRaises(ValueError, self.api.send_email, FULL_KEY, request)
        self.assertEqual(self.recorder.seen, [])

    def test_body_is_utf8_json(self) -> None:
        """The body is the payload as UTF-8 JSON; a non-ASCII subject survives."""
        subject = "Grüße, 日本語 \N{SNOWMAN}"
        request = email(subject=subject)
        seen = self.sent(request)
        self.assertIn(subject.encode("utf-8"), seen.body)
        body = json.loads(seen.body.decode("utf-8"))
        self.assertEqual(body, request.payload)
        [stored] = self.store.emails()
        self.assertEqual(stored.payload["subject"], subject)

    def test_key_check_headers(self) -> None:
        """The key check sends the key as Bearer, our User-Agent, and no body."""
        self.successResultOf(self.api.check_api_key(FULL_KEY))
        [seen] = self.recorder.seen
        self.assertEqual(seen.headers[b"authorization"], [b"Bearer " + FULL_KEY.encode()])
        self.assertEqual(seen.headers[b"user-agent"], [USER_AGENT.encode()])
        self.assertEqual(seen.body, b"")
        self.assertNotIn(b"content-type", seen.headers)

    def test_key_with_line_break(self) -> None:
        """A key with CR/LF cannot add a header: it stays inside one Authorization value."""
        self.successResultOf(self.api.check_api_key("sk_test_x\r\nX-Injected: yes"))
        [seen] = self.recorder.seen
        self.assertNotIn(b"x-injected", seen.headers)
        self.assertEqual(len(seen.headers[b"authorization"]), 1)


class DeeplyNested(Resource):
    """Answers 202 with JSON nested deeper than Python's parser can go."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[Optional[list[bytes]]] = []

    def render(self, request: Request) -> bytes:
        self.keys.append(request.requestHeaders.getRawHeaders(b"idempotency-key"))
        request.setResponseCode(202)
        return b"[" * 100_000 + b"]" * 100_000


class MalformedAnswerTests(SandboxMixin, SynchronousTestCase):
    """
    Content that is not usable JSON is an answer without a body, whatever
    breaks the parser.
    """

    def test_nested_too_deep(self) -> None:
        """
        A 2xx nested deeper than the JSON parser goes (RecursionError) is a
        2xx without an email id, retried with the same key, then 451 4.3.0
        with the bad-answer hint; not the relay's own unexpected error.
        """
        self.make_sandbox()
        nested = DeeplyNested()
        api = self.make_api(nested, max_attempts=2)
        d = api.send_email(FULL_KEY, email(idempotency_key="k-nested"))
        self.clock.advance(60)
        error = self.failureResultOf(d, APIError).value
        self.assertEqual(nested.keys, [[b"k-nested"], [b"k-nested"]])
        self.assertEqual(error.status, 202)
        self.assertTrue(error.reply.text.startswith(API_BAD_ANSWER.text), error.reply)


class SecretsTests(SandboxMixin, SynchronousTestCase):
    """
    No key (and no mailbox password) in an exception or a log event.
    """

    SECRET = "sk_test_secret_0b9e8d7c6a5f4e3d"
    PASSWORD = "pw-secret-71d2c9"

    def setUp(self) -> None:
        self.make_sandbox()

    def collect(self) -> tuple[list[dict[str, Any]], list[BaseException]]:
        """
        Run every failure path with secret keys; return the log events and
        the exceptions raised.
        """
        errors: list[BaseException] = []

        def keep(d: "Deferred[Any]") -> None:
            results: list[Any] = []
            d.addBoth(results.append)
            if not results:
                self.clock.advance(TIMEOUT)
            self.assertEqual(len(results), 1)
            if isinstance(results[0], Failure):
                errors.append(results[0].value)

        with capturedLogs() as events:
            api = self.make_api(service_key=self.SECRET)
            keep(api.check_api_key(self.SECRET))
            keep(api.send_email(self.SECRET, email()))
            keep(api.authenticate_mailbox("alice@yourdomain.com", self.PASSWORD))
            keep(api.authenticate_mailbox("bob@yourdomain.com", self.PASSWORD))
            not_service = self.make_api(service_key=FULL_KEY)
            keep(not_service.authenticate_mailbox("alice@yourdomain.com", self.PASSWORD))
            api = self.make_api(service_key=SERVICE_KEY)
            keep(api.authenticate_mailbox("alice@yourdomain.com", self.PASSWORD))
            for mode in ("500", "503", "429", "quota", "reset", "hang", "malformed", "noid"):
                self.sandbox.inject_fault(mode, retry_after="2")
                keep(api.send_email(FULL_KEY, email()))
                self.sandbox.inject_fault(mode, path="/emails", method="GET")
                keep(api.check_api_key(FULL_KEY))
                self.sandbox.inject_fault(mode, path="/mailboxes/authenticate")
                keep(api.authenticate_mailbox("alice@yourdomain.com", self.PASSWORD))
            for key in (SCOPED_KEY, FULL_KEY):
                keep(api.send_email(key, email(**{"from": "you@anotherdomain.com", "subject": None})))
            keep(api.send_email(SCOPED_KEY, email(**{"from": "you@anotherdomain.com"})))
            keep(api.send_email(FULL_KEY, email(**{"from": "you@pendingdomain.com"})))
            # An API that echoes the key it was given.
            echo, _ = scripted(
                401, json.dumps({"error": f"Key {self.SECRET} revoked"}).encode()
            )
            api = self.make_api(echo, service_key=SERVICE_KEY)
            keep(api.send_email(self.SECRET, email()))
            echo, _ = scripted(
                403, json.dumps({"error": f"API key {self.SECRET} may not do this"}).encode()
            )
            api = self.make_api(echo, service_key=self.SECRET)
            keep(api.authenticate_mailbox("alice@yourdomain.com", self.PASSWORD))
        return list(events), errors

    def test_no_secret_in_errors(self) -> None:
        """No APIError or APIUnavailable raised shows a key in str() or repr()."""
        _, errors = self.collect()
        self.assertGreater(len(errors), 20)
        self.assertTrue(any(isinstance(e, APIUnavailable) for e in errors))
        self.assertTrue(any(isinstance(e, APIError) for e in errors))
        for error in errors:
            shown = scan(error)
            for secret in (self.SECRET, FULL_KEY, SCOPED_KEY, SERVICE_KEY, self.PASSWORD):
                self.assertNotIn(secret, shown)

    def test_no_secret_in_logs(self) -> None:
        """No log event, formatted or raw, holds a key or a password."""
        events, _ = self.collect()
        relay_events = [e for e in events if str(e.get("log_namespace", "")).startswith("poststack_relay.api")]
        self.assertTrue(any(e.get("event") == "api_service_key_rejected" for e in relay_events))
        self.assertTrue(any(e.get("event") == "api_timeout" for e in relay_events))
        self.assertTrue(any(e.get("event") == "api_network_error" for e in relay_events))
        for event in events:
            shown = (formatEvent(event) or "") + " " + scan(event)
            for secret in (self.SECRET, FULL_KEY, SCOPED_KEY, SERVICE_KEY, self.PASSWORD):
                self.assertNotIn(secret, shown, event)

    def test_echoed_key_redacted(self) -> None:
        """An API message that quotes the key reaches the client with the key blanked out."""
        echo, _ = scripted(401, json.dumps({"error": f"Key {self.SECRET} revoked"}).encode())
        api = self.make_api(echo)
        reply = _reply_of(self, api.send_email(self.SECRET, email()))
        self.assertIn("Key [redacted] revoked", reply.text)


class ReplyForStatusTests(SynchronousTestCase):
    """
    L{reply_for_status} on bodies the sandbox does not produce.
    """

    def test_nested_error(self) -> None:
        """An {"error": {"message", "code"}} body gives its message and code."""
        body = {"error": {"message": "Slow down", "code": "daily_limit_exceeded"}}
        reply = reply_for_status(429, body)
        self.assertIn("Slow down", reply.text)
        self.assertIn("(daily_limit_exceeded)", reply.text)

    def test_every_quota_code(self) -> None:
        """Every quota code is named in a 451 4.7.0 that says waiting will not help."""
        for code in QUOTA_CODES:
            reply = reply_for_status(429, {"error": "Limit", "code": code}, "30")
            self.assertEqual((reply.code, reply.enhanced), (451, "4.7.0"))
            self.assertIn(code, reply.text)
            self.assertNotIn("retry-after", reply.text)

    def test_retry_after_date(self) -> None:
        """A Retry-After HTTP date gives no seconds hint."""
        reply = reply_for_status(429, None, "Wed, 21 Oct 2015 07:28:00 GMT")
        self.assertEqual(reply, Reply(451, "4.7.0", "PostStack rate limit reached"))

    def test_no_body(self) -> None:
        """Without a JSON body the text says the HTTP status."""
        reply = reply_for_status(503, None)
        self.assertEqual(
            reply, Reply(451, "4.3.0", "PostStack API: HTTP 503: temporary API failure, try again later")
        )

    def test_408(self) -> None:
        """408 (not in the contract) is 451 4.3.0."""
        self.assertEqual(reply_for_status(408, None).code, 451)

    def test_text_is_one_ascii_line(self) -> None:
        """A message with CR/LF and non-ASCII becomes one printable line, shortened."""
        reply = reply_for_status(422, {"error": "bad\r\n250 fake\u00e9" + "x" * 500})
        self.assertNotIn("\r", reply.text)
        self.assertNotIn("\n", reply.text)
        self.assertTrue(reply.text.isascii())
        self.assertLess(len(reply.text), 300)
        reply.line()  # encodes without error

    def test_redact_before_shortening(self) -> None:
        """A secret is removed even where shortening would cut it."""
        secret = "sk_live_" + "s" * 40
        reply = reply_for_status(400, {"error": "x" * 180 + secret}, redact=[secret])
        self.assertNotIn("sk_live_", reply.text)


class JSONBodyTests(SynchronousTestCase):
    """
    L{json_body}: large base64 attachment contents stay out of the JSON
    text, and the pieces join to exactly the plain encoding.
    """

    def plain(self, payload: dict[str, Any]) -> bytes:
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def test_small_is_bytes(self) -> None:
        """A payload without large attachments is one bytes object, the plain encoding."""
        payload = {"from": "a@x.com", "to": ["b@x.com"], "attachments": [{"content": "QUJD"}]}
        self.assertEqual(json_body(payload), self.plain(payload))

    def test_large_pieces(self) -> None:
        """Large contents become str pieces (the payload's own objects); joined, the bytes are the plain encoding."""
        big = "QUJD" * (STREAM_MIN_CONTENT // 4)
        other = big + "QQ=="
        payload = {
            "from": 'Tricky "\x00" \u00e9 <a@x.com>',
            "to": ["b@x.com"],
            "attachments": [
                {"filename": "a.bin", "content": big, "content_type": "application/octet-stream"},
                {"filename": "s.txt", "content": "c21hbGw="},
                {"filename": "b.bin", "content": other},
            ],
            "variables": {"x": "\\u0000 \x00"},
        }
        body = json_body(payload)
        self.assertIsInstance(body, list)
        assert isinstance(body, list)
        self.assertEqual([p for p in body if isinstance(p, str)], [big, other])
        self.assertIs([p for p in body if isinstance(p, str)][0], big)
        self.assertEqual(body_bytes(body), self.plain(payload))

    def test_not_base64_stays_in_text(self) -> None:
        """A large content with a character JSON must escape is encoded the plain way."""
        payload = {"attachments": [{"content": "QUJD" * (STREAM_MIN_CONTENT // 4) + '"'}]}
        self.assertEqual(json_body(payload), self.plain(payload))


class BodyProducerTests(SynchronousTestCase):
    """
    L{BodyProducer}: writes slices only while not paused, and finishes
    with the Deferred of C{startProducing}.
    """

    def setUp(self) -> None:
        self.pieces: list[bytes | str] = [b'{"c":"', "QUJD" * 40_000, b'"}']
        self.producer = BodyProducer(self.pieces)
        self.written: list[bytes] = []

    def test_length(self) -> None:
        """The length is the byte length of the joined body."""
        self.assertEqual(self.producer.length, len(body_bytes(self.pieces)))

    def test_pause_resume(self) -> None:
        """A consumer that pauses after each write gets one slice per resume, then the Deferred fires."""
        producer = self.producer

        class Consumer:
            def write(inner, data: bytes) -> None:
                self.written.append(data)
                producer.pauseProducing()

        d = producer.startProducing(Consumer())
        self.assertEqual(len(self.written), 1)
        self.assertNoResult(d)
        for _ in range(100):
            if d.called:
                break
            producer.resumeProducing()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(b"".join(self.written), body_bytes(self.pieces))
        self.assertLessEqual(max(len(w) for w in self.written), 64 * 1024)

    def test_stop(self) -> None:
        """After stopProducing nothing more is written and the Deferred never fires."""
        producer = self.producer

        class Consumer:
            def write(inner, data: bytes) -> None:
                self.written.append(data)
                producer.pauseProducing()

        d = producer.startProducing(Consumer())
        producer.stopProducing()
        producer.resumeProducing()
        self.assertEqual(len(self.written), 1)
        self.assertNoResult(d)

    def test_reentrant_resume(self) -> None:
        """A resume from inside a write does not start a second writing loop."""
        producer = self.producer

        class Consumer:
            def write(inner, data: bytes) -> None:
                self.written.append(data)
                producer.pauseProducing()
                producer.resumeProducing()

        self.successResultOf(producer.startProducing(Consumer()))
        self.assertEqual(b"".join(self.written), body_bytes(self.pieces))

    def test_lets_go_of_the_body(self) -> None:
        """Once written, or stopped, the producer holds neither the body nor the consumer (no large body kept alive by a reference cycle)."""
        import weakref

        class Consumer:
            def write(inner, data: bytes) -> None:
                self.written.append(data)

        consumer = Consumer()
        self.successResultOf(self.producer.startProducing(consumer))
        self.assertEqual(self.producer._pieces, [])
        self.assertIsNone(self.producer._consumer)

        stopped = BodyProducer(list(self.pieces))
        paused = Consumer()
        paused.write = lambda data: stopped.pauseProducing()  # type: ignore[method-assign]
        alive = weakref.ref(paused)
        stopped.startProducing(paused)
        del paused
        self.assertIsNotNone(alive())
        stopped.stopProducing()
        self.assertEqual(stopped._pieces, [])
        self.assertIsNone(alive())
