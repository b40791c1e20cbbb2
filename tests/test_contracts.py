"""
The L{IEmailAPI} contract, run against every implementation: the in-memory
fake L{MemoryEmailAPI} and the real client L{HTTPEmailAPI} talking to the
sandbox API through C{treq.testing.StubTreq}.

What passes here for the fake is what a test written against the fake may
rely on from the real thing: the results of key checks and mailbox logins,
which failures are L{APIUnavailable} and which are L{APIError}s carrying a
permanent or temporary SMTP reply, and that a refused send is not
recorded.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from treq.testing import StubTreq
from zope.interface.verify import verifyObject

from poststack_relay.api import APIError, APIUnavailable, HTTPEmailAPI
from poststack_relay.interfaces import IEmailAPI
from poststack_relay.replies import Reply
from poststack_relay.sandbox import (
    IN_TREE_DATA_PATH,
    SandboxResource,
    SandboxStore,
    load_sandbox_data,
)
from poststack_relay.testing import MemoryEmailAPI
from poststack_relay.translate import EmailRequest

# The sandbox's well-known test values (etc/sandbox.json).
FULL = "sk_test_full_access"
SERVICE = "sk_test_relay_service"
UNKNOWN = "sk_test_not_a_key_0c5a7e19d3"
MAILBOX = "alice@yourdomain.com"
PASSWORD = "alice-password"


def _request(subject: str = "Hello") -> EmailRequest:
    """
    A valid C{POST /emails} request from a verified sandbox domain, with
    its own idempotency key (so every implementation sends this payload
    as it is).
    """
    key = f"contract-{subject.lower()}"
    return EmailRequest(
        payload={
            "from": "You <you@yourdomain.com>",
            "to": ["user@example.com"],
            "subject": subject,
            "text": "Hello there",
            "idempotency_key": key,
        },
        idempotency_key=key,
    )


@attrs.frozen
class Subject:
    """
    One implementation under contract, and the levers a test pulls on it.

    @ivar api: The L{IEmailAPI} provider.
    @ivar go_down: From now on the API cannot answer (every call).
    @ivar refuse_next: The API refuses the next send with an error answer
        of this HTTP status (C{422}).
    @ivar accepted: What the API accepted so far, as C{(key, payload)}.
    @ivar settle: Let time pass until C{d} has a result (retries and
        time-outs run on a clock); does nothing where nothing waits.
    """

    api: Any
    go_down: Callable[[], None]
    refuse_next: Callable[[int], None]
    accepted: Callable[[], list[tuple[str, dict[str, Any]]]]
    settle: Callable[["Deferred[Any]"], None]


class EmailAPIContractMixin:
    """
    The contract of L{IEmailAPI}; a test case mixes it in and says how to
    make the implementation in L{make_subject}.

    The API knows the key C{FULL} (and C{SERVICE}, the relay's service key)
    and the mailbox C{MAILBOX} with C{PASSWORD}; it does not know
    C{UNKNOWN}.
    """

    # Provided by SynchronousTestCase.
    assertEqual: Callable[..., None]
    assertIs: Callable[..., None]
    assertIsNone: Callable[..., None]
    assertIsInstance: Callable[..., None]
    assertNotEqual: Callable[..., None]
    assertNotIn: Callable[..., None]
    assertRaises: Callable[..., Any]
    assertTrue: Callable[..., None]
    successResultOf: Callable[..., Any]
    failureResultOf: Callable[..., Any]

    def make_subject(self) -> Subject:
        raise NotImplementedError()

    def result(self, subject: Subject, d: "Deferred[Any]") -> Any:
        """The result C{d} fires with, once settled."""
        subject.settle(d)
        return self.successResultOf(d)

    def failure(self, subject: Subject, d: "Deferred[Any]", *errors: type) -> Any:
        """The failure C{d} fails with (one of C{errors}), once settled."""
        subject.settle(d)
        return self.failureResultOf(d, *errors).value

    def test_provides(self) -> None:
        """The implementation provides IEmailAPI, every method of it."""
        self.assertTrue(verifyObject(IEmailAPI, self.make_subject().api))

    # -- check_api_key -----------------------------------------------------

    def test_valid_key(self) -> None:
        """A key the API knows checks True, the service key too."""
        subject = self.make_subject()
        self.assertIs(self.result(subject, subject.api.check_api_key(FULL)), True)
        self.assertIs(self.result(subject, subject.api.check_api_key(SERVICE)), True)

    def test_invalid_key(self) -> None:
        """A key the API does not know checks False (not a failure)."""
        subject = self.make_subject()
        self.assertIs(self.result(subject, subject.api.check_api_key(UNKNOWN)), False)

    def test_key_check_unavailable(self) -> None:
        """A key check the API cannot answer fails with APIUnavailable."""
        subject = self.make_subject()
        subject.go_down()
        self.failure(subject, subject.api.check_api_key(FULL), APIUnavailable)

    # -- authenticate_mailbox ------------------------------------------------

    def test_mailbox(self) -> None:
        """The right password gives the mailbox's address."""
        subject = self.make_subject()
        address = self.result(subject, subject.api.authenticate_mailbox(MAILBOX, PASSWORD))
        self.assertEqual(address, MAILBOX)

    def test_mailbox_case(self) -> None:
        """
        The email is matched whatever its case; the answer is the mailbox's
        own address, as the API spells it.
        """
        subject = self.make_subject()
        address = self.result(
            subject, subject.api.authenticate_mailbox(MAILBOX.upper(), PASSWORD)
        )
        self.assertEqual(address, MAILBOX)

    def test_mailbox_wrong_password(self) -> None:
        """A wrong password gives None (not a failure)."""
        subject = self.make_subject()
        self.assertIsNone(
            self.result(subject, subject.api.authenticate_mailbox(MAILBOX, "wrong"))
        )

    def test_mailbox_unknown(self) -> None:
        """An unknown mailbox gives None, like a wrong password."""
        subject = self.make_subject()
        self.assertIsNone(
            self.result(
                subject, subject.api.authenticate_mailbox("nobody@yourdomain.com", PASSWORD)
            )
        )

    def test_mailbox_unavailable(self) -> None:
        """A login the API cannot answer fails with APIUnavailable."""
        subject = self.make_subject()
        subject.go_down()
        self.failure(
            subject, subject.api.authenticate_mailbox(MAILBOX, PASSWORD), APIUnavailable
        )

    # -- send_email ----------------------------------------------------------

    def test_send(self) -> None:
        """
        A send fires with a non-empty id; the API has the request's payload,
        under the key it was sent with.
        """
        subject = self.make_subject()
        request = _request()
        email_id = self.result(subject, subject.api.send_email(FULL, request))
        self.assertIsInstance(email_id, str)
        self.assertTrue(email_id)
        self.assertEqual(subject.accepted(), [(FULL, request.payload)])

    def test_send_with_tenant(self) -> None:
        """
        A send may name its tenant (the customer it is for); that changes
        nothing of what is sent, or of the result.
        """
        subject = self.make_subject()
        request = _request("Tenant")
        email_id = self.result(subject, subject.api.send_email(FULL, request, tenant="key:0123abcd"))
        self.assertIsInstance(email_id, str)
        self.assertTrue(email_id)
        mailbox = _request("Mailbox")
        self.assertTrue(
            self.result(
                subject, subject.api.send_email(SERVICE, mailbox, tenant="mailbox:" + MAILBOX)
            )
        )
        self.assertEqual(subject.accepted(), [(FULL, request.payload), (SERVICE, mailbox.payload)])

    def test_send_twice(self) -> None:
        """Two sends are two emails with two ids."""
        subject = self.make_subject()
        first = self.result(subject, subject.api.send_email(FULL, _request("One")))
        second = self.result(subject, subject.api.send_email(FULL, _request("Two")))
        self.assertNotEqual(first, second)
        self.assertEqual(
            [payload["subject"] for _, payload in subject.accepted()], ["One", "Two"]
        )

    def test_send_needs_decided_key(self) -> None:
        """
        A request whose idempotency key is not decided (none, or another one
        in its payload) is refused at once with ValueError: the caller's
        bug, never a send.
        """
        subject = self.make_subject()
        keyless = attrs.evolve(_request(), idempotency_key=None)
        other = attrs.evolve(_request(), idempotency_key="contract-other")
        for request in (keyless, other):
            with self.assertRaises(ValueError):
                subject.api.send_email(FULL, request)
        self.assertEqual(subject.accepted(), [])

    def assert_refused(self, error: APIError, permanent: bool) -> Reply:
        """
        C{error} carries an SMTP reply, permanent (5xx) or temporary (4xx).
        """
        self.assertIsInstance(error, APIError)
        reply = error.reply
        self.assertIsInstance(reply, Reply)
        self.assertEqual(reply.code // 100, 5 if permanent else 4)
        self.assertEqual(reply.enhanced[:1], "5" if permanent else "4")
        self.assertTrue(reply.text)
        return reply

    def test_send_invalid_key(self) -> None:
        """
        A send with a key the API does not know fails with an APIError
        carrying a permanent reply (HTTP 401); the key is in neither the
        reply nor the error's text, and nothing is sent.
        """
        subject = self.make_subject()
        error = self.failure(subject, subject.api.send_email(UNKNOWN, _request()), APIError)
        reply = self.assert_refused(error, permanent=True)
        self.assertEqual(error.status, 401)
        self.assertNotIn(UNKNOWN, reply.text)
        self.assertNotIn(UNKNOWN, str(error))
        self.assertEqual(subject.accepted(), [])

    def test_send_refused(self) -> None:
        """
        A send the API refuses (HTTP 422) fails with an APIError carrying a
        permanent reply and the HTTP status; nothing is sent.
        """
        subject = self.make_subject()
        subject.refuse_next(422)
        error = self.failure(subject, subject.api.send_email(FULL, _request()), APIError)
        self.assert_refused(error, permanent=True)
        self.assertEqual(error.status, 422)
        self.assertEqual(subject.accepted(), [])

    def test_send_unavailable(self) -> None:
        """
        A send the API cannot take fails with an APIError carrying a
        temporary reply (the client is to try again); nothing is sent.
        """
        subject = self.make_subject()
        subject.go_down()
        error = self.failure(subject, subject.api.send_email(FULL, _request()), APIError)
        self.assert_refused(error, permanent=False)
        self.assertEqual(subject.accepted(), [])


class MemoryEmailAPIContractTests(EmailAPIContractMixin, SynchronousTestCase):
    """
    The contract, against the in-memory fake L{MemoryEmailAPI}.
    """

    def make_subject(self) -> Subject:
        api = MemoryEmailAPI(
            api_keys={FULL, SERVICE},
            mailboxes={MAILBOX: PASSWORD},
            refuse_unknown_keys=True,
        )

        def go_down() -> None:
            api.unavailable = True

        def refuse_next(status: int) -> None:
            api.next_error = APIError(
                Reply(554, "5.6.0", f"PostStack API: Domain not verified (HTTP {status})"),
                status,
                "unprocessable_entity",
            )

        def accepted() -> list[tuple[str, dict[str, Any]]]:
            return [(key, request.payload) for key, request in api.sent]

        return Subject(api, go_down, refuse_next, accepted, lambda d: None)


class HTTPEmailAPIContractTests(EmailAPIContractMixin, SynchronousTestCase):
    """
    The contract, against L{HTTPEmailAPI} over C{StubTreq} and the sandbox
    API (a real SQLite file, a L{Clock} for both sides).
    """

    def make_subject(self) -> Subject:
        directory = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, directory)
        path = os.path.join(directory, "sandbox.sqlite3")
        self.addCleanup(os.remove, path)
        store = SandboxStore(path)
        self.addCleanup(store.close)
        clock = Clock()
        sandbox = SandboxResource(store, load_sandbox_data(IN_TREE_DATA_PATH), clock)
        api = HTTPEmailAPI(
            StubTreq(sandbox), "http://sandbox.invalid/", 10.0, SERVICE, clock=clock
        )

        def go_down() -> None:
            for method, path in (
                ("POST", "/emails"),
                ("GET", "/emails"),
                ("POST", "/mailboxes/authenticate"),
            ):
                sandbox.inject_fault("503", count=-1, path=path, method=method)

        def refuse_next(status: int) -> None:
            sandbox.inject_fault(str(status))

        def accepted() -> list[tuple[str, dict[str, Any]]]:
            return [(email.api_key, email.payload) for email in store.emails()]

        def settle(d: "Deferred[Any]") -> None:
            # Retries and back-off run on the clock: let it run, a second
            # at a time, for at most ten minutes of clock time.
            for _ in range(600):
                if d.called:
                    return
                clock.advance(1)

        return Subject(api, go_down, refuse_next, accepted, settle)
