# -*- test-case-name: tests.test_sandbox -*-
"""
Tests for L{poststack_relay.sandbox}: the local PostStack API stand-in.

Unit tests drive L{SandboxResource} through C{treq.testing.StubTreq} with a
L{Clock} and a temporary SQLite file; the pure parts (faults, auth,
validation) are also tested alone, without a request; a few tests use the
real reactor over loopback, and the plugin tests run C{twistd} discovery in
a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from typing import Any

import attrs
import treq
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock, deferLater
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool, ResponseNeverReceived
from twisted.web.iweb import IResponse
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest
from treq.testing import StubTreq

from poststack_relay.sandbox import (
    FAULT_MODES,
    IN_TREE_DATA_PATH,
    SandboxData,
    SandboxResource,
    SandboxService,
    SandboxStore,
    StoredEmail,
    load_sandbox_data,
    makeSandboxService,
)
from poststack_relay.sandbox import tap
from poststack_relay.sandbox.auth import authenticate_key, require_loopback
from poststack_relay.sandbox.exchange import ApiError, Reply
from poststack_relay.sandbox.faults import FaultQueue, fault_reply, make_fault
from poststack_relay.sandbox.validation import (
    a_label_domain,
    canonical_fingerprint,
    domain_problem,
    json_object,
    parse_address,
    query_int,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = "sk_test_full_access"
SENDING = "sk_test_sending_access"
SCOPED = "sk_test_yourdomain_only"
SERVICE = "sk_test_relay_service"
BASE = "http://sandbox.invalid"
_NO_BODY = object()


def _email(**changes: Any) -> dict[str, Any]:
    """A valid POST /emails body, with C{changes} applied (None deletes)."""
    body: dict[str, Any] = {
        "from": "Alice <alice@yourdomain.com>",
        "to": ["user@example.com"],
        "subject": "Hello",
        "text": "Hi there",
    }
    for name, value in changes.items():
        name = name.rstrip("_")
        if value is None:
            body.pop(name, None)
        else:
            body[name] = value
    return body


class _TempPathMixin:
    """
    Make C{mktemp} paths live in a private temporary directory, so running
    under pytest (whose working directory is the checkout) litters nothing.
    """

    def mktemp(self) -> str:
        directory = tempfile.mkdtemp(prefix="sandbox-test-")
        self.addCleanup(shutil.rmtree, directory, True)  # type: ignore[attr-defined]
        return os.path.join(directory, "temp")


class _SandboxCase(_TempPathMixin, SynchronousTestCase):
    """Common set-up: a sandbox on a Clock, a temp SQLite file, a StubTreq."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1700000000)
        self.data = load_sandbox_data(IN_TREE_DATA_PATH)
        self.db_path = self.mktemp()
        self.store = SandboxStore(self.db_path)
        self.addCleanup(self.store.close)
        self.use(self.data)

    def use(self, data: SandboxData) -> None:
        """Serve C{data} from a fresh resource over the same store."""
        self.resource = SandboxResource(self.store, data, self.clock)
        self.client = StubTreq(self.resource)

    def send(
        self,
        method: str,
        path: str,
        body: object = _NO_BODY,
        key: str | None = FULL,
        headers: dict[str, str] | None = None,
    ) -> Deferred[IResponse]:
        """Start a request; the caller decides how to wait for it."""
        all_headers = dict(headers or {})
        if key is not None:
            all_headers["Authorization"] = f"Bearer {key}"
        kwargs: dict[str, Any] = {"headers": all_headers}
        if isinstance(body, bytes):
            kwargs["data"] = body
        elif body is not _NO_BODY:
            kwargs["json"] = body
        return self.client.request(method, BASE + path, **kwargs)

    def call(
        self,
        method: str,
        path: str,
        body: object = _NO_BODY,
        key: str | None = FULL,
        headers: dict[str, str] | None = None,
    ) -> tuple[IResponse, bytes]:
        """Make a request that answers at once; return response and body."""
        response = self.successResultOf(self.send(method, path, body, key, headers))
        content = self.successResultOf(self.client.content(response))
        return response, content

    def post_email(
        self,
        body: object,
        key: str | None = FULL,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """POST /emails; return (status, parsed JSON body)."""
        response, content = self.call("POST", "/emails", body, key, headers)
        return response.code, json.loads(content)

    def assertError(
        self,
        status_and_body: tuple[int, Any],
        status: int,
        code: str,
        message: str | None = None,
    ) -> None:
        """Assert an error answer: status, code, and message (substring)."""
        got_status, body = status_and_body
        self.assertEqual((got_status, body["code"]), (status, code), body)
        self.assertEqual(sorted(body), ["code", "error"])
        if message is not None:
            self.assertIn(message, body["error"])

    def assertRejected(
        self, body: object, fragment: str, key: str = FULL
    ) -> None:
        """Assert a POST /emails answer 400 invalid_request, nothing stored."""
        self.assertError(self.post_email(body, key), 400, "invalid_request", fragment)
        self.assertEqual(self.store.emails(), [])


class DataFileTests(_TempPathMixin, SynchronousTestCase):
    """L{load_sandbox_data} reads the shipped file and rejects bad ones."""

    def write(self, content: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(content)
        return path

    def minimal(self, **extra: Any) -> dict[str, Any]:
        document: dict[str, Any] = {
            "domains": [{"name": "a.example", "status": "verified"}],
            "api_keys": [{"key": "sk_test_x", "permission": "full_access"}],
        }
        document.update(extra)
        return document

    def assertLoadFails(self, document: object, fragment: str) -> None:
        path = self.write(json.dumps(document))
        error = self.assertRaises(ValueError, load_sandbox_data, path)
        self.assertIn(fragment, str(error))
        self.assertIn(path, str(error))
        self.assertNotIn("\n", str(error))

    def test_shipped_file(self) -> None:
        """etc/sandbox.json has every key, domain, mailbox and template the docs promise."""
        data = load_sandbox_data(IN_TREE_DATA_PATH)
        keys = {k.key: k for k in data.keys}
        self.assertEqual(keys[FULL].permission, "full_access")
        self.assertEqual(keys[SENDING].permission, "sending_access")
        self.assertEqual(keys[SCOPED].domains, ("yourdomain.com",))
        self.assertTrue(keys[SERVICE].service)
        self.assertFalse(any(keys[k].service for k in (FULL, SENDING, SCOPED)))
        statuses = {d.name: d.status for d in data.domains}
        self.assertEqual(
            statuses,
            {
                "yourdomain.com": "verified",
                "anotherdomain.com": "verified",
                "pendingdomain.com": "pending",
                # Written as U-labels in the file, kept as A-labels.
                "xn--bcher-kva.example": "verified",
            },
        )
        mailboxes = {m.email_address: m.status for m in data.mailboxes}
        self.assertEqual(
            mailboxes,
            {
                "alice@yourdomain.com": "active",
                "bob@yourdomain.com": "suspended",
                "jörg@bücher.example": "active",
            },
        )
        published = {t.id: t.published for t in data.templates}
        self.assertTrue(published["tpl_abc123def456ghi789"])
        self.assertIn(False, published.values())
        self.assertEqual(data.max_body_bytes, 40 * 1024 * 1024)

    def test_minimal_file(self) -> None:
        """Only domains and api_keys are required; the body limit defaults to 40 MiB."""
        data = load_sandbox_data(self.write(json.dumps(self.minimal())))
        self.assertEqual(data.mailboxes, ())
        self.assertEqual(data.max_body_bytes, 40 * 1024 * 1024)
        self.assertIsNotNone(data.find_key("sk_test_x"))

    def test_missing_file(self) -> None:
        """A missing file is a one-line ValueError naming it."""
        path = self.mktemp()
        error = self.assertRaises(ValueError, load_sandbox_data, path)
        self.assertIn(path, str(error))
        self.assertIn("cannot read", str(error))

    def test_invalid_json(self) -> None:
        """Broken JSON is reported with its line number."""
        path = self.write('{\n  "domains": [,]\n}')
        error = self.assertRaises(ValueError, load_sandbox_data, path)
        self.assertIn("invalid JSON at line 2", str(error))

    def test_not_an_object(self) -> None:
        """The top level must be an object."""
        self.assertLoadFails([1, 2], "top level: must be a JSON object")

    def test_bad_permission(self) -> None:
        """An unknown permission names the key's position."""
        document = self.minimal(
            api_keys=[{"key": "sk_test_x", "permission": "admin"}]
        )
        self.assertLoadFails(document, "api_keys[0].permission: must be one of")

    def test_bad_key_prefix(self) -> None:
        """Keys must look like PostStack keys."""
        document = self.minimal(api_keys=[{"key": "x", "permission": "full_access"}])
        self.assertLoadFails(document, "must start with sk_test_ or sk_live_")

    def test_scope_unknown_domain(self) -> None:
        """A key scoped to a domain missing from 'domains' is a typo, rejected."""
        document = self.minimal(
            api_keys=[
                {
                    "key": "sk_test_x",
                    "permission": "sending_access",
                    "domains": ["nowhere.example"],
                }
            ]
        )
        self.assertLoadFails(document, "unknown domain 'nowhere.example'")

    def test_unknown_field(self) -> None:
        """Unknown fields are rejected, '_'-prefixed ones are comments."""
        self.assertLoadFails(self.minimal(extra=1), "unknown field 'extra'")
        data = load_sandbox_data(self.write(json.dumps(self.minimal(_note="hi"))))
        self.assertEqual(len(data.keys), 1)

    def test_bad_mailbox_status(self) -> None:
        """Mailbox status must be active or suspended."""
        document = self.minimal(
            mailboxes=[
                {"email_address": "x@a.example", "password": "p", "status": "gone"}
            ]
        )
        self.assertLoadFails(document, "mailboxes[0].status")

    def test_bad_body_limit(self) -> None:
        """max_body_bytes must be a positive integer."""
        self.assertLoadFails(self.minimal(max_body_bytes=0), "max_body_bytes")


class StoreTests(_TempPathMixin, SynchronousTestCase):
    """L{SandboxStore} keeps emails in a real SQLite file."""

    def email(self, email_id: str, idempotency_key: str | None = None) -> StoredEmail:
        return StoredEmail(
            id=email_id,
            api_key=FULL,
            payload={"from": "a@yourdomain.com", "n": email_id},
            idempotency_key=idempotency_key,
            request_headers={"user-agent": "t"},
            created_at="2025-01-01T00:00:00.000Z",
        )

    def test_round_trip_and_persistence(self) -> None:
        """Emails come back in insertion order, also after reopening the file."""
        path = self.mktemp()
        store = SandboxStore(path)
        store.add(self.email("em_b"), "f1")
        store.add(self.email("em_a", "k"), "f2")
        store.close()
        reopened = SandboxStore(path)
        self.addCleanup(reopened.close)
        self.assertEqual([e.id for e in reopened.emails()], ["em_b", "em_a"])
        self.assertEqual(reopened.emails()[1], self.email("em_a", "k"))
        found = reopened.find_idempotent(FULL, "k")
        self.assertEqual(found, (self.email("em_a", "k"), "f2"))
        self.assertIsNone(reopened.find_idempotent(SENDING, "k"))

    def test_idempotency_key_unique_per_api_key(self) -> None:
        """The database itself refuses a second row for one (api key, idempotency key)."""
        store = SandboxStore(self.mktemp())
        self.addCleanup(store.close)
        store.add(self.email("em_1", "k"), "f")
        self.assertRaises(sqlite3.IntegrityError, store.add, self.email("em_2", "k"), "f")

    def test_clear(self) -> None:
        """clear() deletes every row and says how many."""
        store = SandboxStore(self.mktemp())
        self.addCleanup(store.close)
        store.add(self.email("em_1"), "f")
        store.add(self.email("em_2"), "f")
        self.assertEqual(store.clear(), 2)
        self.assertEqual(store.emails(), [])

    def test_closed(self) -> None:
        """A closed store refuses use; closing twice is harmless."""
        store = SandboxStore(self.mktemp())
        store.close()
        store.close()
        self.assertRaises(RuntimeError, store.emails)


class AuthTests(_SandboxCase):
    """Bearer-key authentication and request ids."""

    def test_missing_key(self) -> None:
        """No Authorization header: 401 unauthorized."""
        self.assertError(self.post_email(_email(), key=None), 401, "unauthorized")

    def test_unknown_key(self) -> None:
        """An unknown key: 401 unauthorized, nothing stored."""
        self.assertError(
            self.post_email(_email(), key="sk_test_nope"),
            401,
            "unauthorized",
            "Invalid API key",
        )
        self.assertEqual(self.store.emails(), [])

    def test_not_bearer(self) -> None:
        """A non-Bearer scheme is refused even with a valid key."""
        response, content = self.call(
            "POST", "/emails", _email(), key=None, headers={"Authorization": f"Basic {FULL}"}
        )
        self.assertError((response.code, json.loads(content)), 401, "unauthorized")

    def test_request_id_everywhere(self) -> None:
        """Successes, errors, unknown paths and faults all carry a fresh x-request-id."""
        ids = []
        self.resource.inject_fault("503")
        for method, path, body in [
            ("POST", "/emails", _email()),
            ("POST", "/emails", _email()),
            ("POST", "/emails", {}),
            ("GET", "/nowhere", _NO_BODY),
            ("GET", "/emails", _NO_BODY),
        ]:
            response, _ = self.call(method, path, body)
            [request_id] = response.headers.getRawHeaders("x-request-id")
            self.assertRegex(request_id, r"^req_[a-z0-9]{20}$")
            ids.append(request_id)
        self.assertEqual(len(set(ids)), len(ids))


class RoutingTests(_SandboxCase):
    """Unknown paths and methods."""

    def test_unknown_path(self) -> None:
        """An unknown path is a JSON 404 not_found."""
        response, content = self.call("GET", "/v1/emails")
        self.assertError((response.code, json.loads(content)), 404, "not_found")

    def test_wrong_method(self) -> None:
        """A known path with the wrong method is 405 with Allow."""
        response, content = self.call("PUT", "/emails", _email())
        self.assertError(
            (response.code, json.loads(content)), 405, "method_not_allowed"
        )
        self.assertEqual(response.headers.getRawHeaders("allow"), ["POST, GET"])

    def test_trailing_slash(self) -> None:
        """/emails/ is the same endpoint as /emails."""
        response, _ = self.call("POST", "/emails/", _email())
        self.assertEqual(response.code, 202)

    def test_json_content_type(self) -> None:
        """Answers are JSON with an explicit charset and length."""
        response, content = self.call("GET", "/emails")
        self.assertEqual(
            response.headers.getRawHeaders("content-type"),
            ["application/json; charset=utf-8"],
        )
        self.assertEqual(json.loads(content)["object"], "list")


class SendTests(_SandboxCase):
    """Successful POST /emails."""

    def test_accepted_and_stored(self) -> None:
        """A valid send is 202 with an em_ id, and stored with its headers."""
        status, body = self.post_email(
            _email(),
            headers={"User-Agent": "poststack-relay/0.1.0", "X-Extra": "1"},
        )
        self.assertEqual(status, 202)
        self.assertRegex(body["id"], r"^em_[a-z0-9]{20}$")
        self.assertEqual(
            body,
            {
                "id": body["id"],
                "object": "email",
                "from": "Alice <alice@yourdomain.com>",
                "to": ["user@example.com"],
                "created_at": "2023-11-14T22:13:20.000Z",
                "status": "queued",
            },
        )
        [stored] = self.store.emails()
        self.assertEqual(stored.id, body["id"])
        self.assertEqual(stored.api_key, FULL)
        self.assertEqual(stored.payload, _email())
        self.assertIsNone(stored.idempotency_key)
        self.assertEqual(stored.created_at, body["created_at"])
        self.assertEqual(stored.request_headers["user-agent"], "poststack-relay/0.1.0")
        self.assertEqual(stored.request_headers["x-extra"], "1")
        self.assertNotIn("authorization", stored.request_headers)
        self.assertEqual(list(stored.request_headers), [k.lower() for k in stored.request_headers])

    def test_ids_differ(self) -> None:
        """Two sends get two different ids."""
        first = self.post_email(_email())[1]["id"]
        second = self.post_email(_email())[1]["id"]
        self.assertNotEqual(first, second)
        self.assertEqual(len(self.store.emails()), 2)

    def test_bare_from(self) -> None:
        """A bare from address is accepted."""
        self.assertEqual(self.post_email(_email(from_="alice@yourdomain.com"))[0], 202)

    def test_domain_case_insensitive(self) -> None:
        """The sender domain matches case-insensitively."""
        self.assertEqual(self.post_email(_email(from_="a@YourDomain.COM"))[0], 202)

    def test_every_field(self) -> None:
        """A body using every documented field is accepted and stored as sent."""
        body = _email(
            to=["a@example.com", "B <b@example.com>"],
            cc=["c@example.com"],
            bcc=["d@example.com"],
            reply_to="Support <support@yourdomain.com>",
            html="<p>Hi</p>",
            headers={"X-Campaign": "spring", "List-Id": "<x.yourdomain.com>"},
            tags=["welcome", "onboarding"],
            attachments=[
                {
                    "filename": "a.txt",
                    "content": "aGVsbG8=",
                    "content_type": "text/plain",
                },
                {"filename": "b.bin", "content": ""},
            ],
            scheduled_at="2030-01-01T09:00:00Z",
            unsubscribe=True,
            variables={"first_name": "Alice"},
            idempotency_key="every-field",
        )
        self.assertEqual(self.post_email(body)[0], 202)
        self.assertEqual(self.store.emails()[0].payload, body)

    def test_unknown_fields_ignored(self) -> None:
        """Unknown fields are accepted (lenient) and kept in the stored payload."""
        self.assertEqual(self.post_email(_email(colour="blue"))[0], 202)
        self.assertEqual(self.store.emails()[0].payload["colour"], "blue")

    def test_text_only_and_html_only(self) -> None:
        """Either text or html alone is enough."""
        self.assertEqual(self.post_email(_email(text="t"))[0], 202)
        self.assertEqual(self.post_email(_email(text=None, html="<b>h</b>"))[0], 202)

    def test_empty_subject(self) -> None:
        """An empty subject is a subject: accepted."""
        self.assertEqual(self.post_email(_email(subject=""))[0], 202)

    def test_published_template(self) -> None:
        """With a published template, subject and body may be omitted."""
        body = _email(
            subject=None,
            text=None,
            template_id="tpl_abc123def456ghi789",
            variables={"first_name": "Alice"},
        )
        self.assertEqual(self.post_email(body)[0], 202)

    def test_sending_access_key(self) -> None:
        """A sending_access key may send."""
        self.assertEqual(self.post_email(_email(), key=SENDING)[0], 202)

    def test_service_key_sends_for_mailbox(self) -> None:
        """The service key sends from a mailbox address, and the row records it."""
        status, _ = self.post_email(_email(from_="alice@yourdomain.com"), key=SERVICE)
        self.assertEqual(status, 202)
        self.assertEqual(self.store.emails()[0].api_key, SERVICE)

    def test_body_at_limit(self) -> None:
        """A body of exactly max_body_bytes is accepted."""
        encoded = json.dumps(_email()).encode()
        self.use(attrs.evolve(self.data, max_body_bytes=len(encoded)))
        response, _ = self.call("POST", "/emails", encoded)
        self.assertEqual(response.code, 202)


class ValidationTests(_SandboxCase):
    """Each POST /emails validation rule, with its status and code."""

    def test_not_json(self) -> None:
        """A body that is not JSON is 400."""
        self.assertRejected(b"from=a", "valid JSON")

    def test_not_utf8(self) -> None:
        """A body that is not UTF-8 is 400."""
        self.assertRejected(b'{"from": "\xff"}', "valid JSON")

    def test_nan(self) -> None:
        """NaN is not JSON."""
        self.assertRejected(b'{"x": NaN}', "valid JSON")

    def test_nested_too_deep(self) -> None:
        """JSON nested deeper than the parser goes is 400, not a 500."""
        self.assertRejected(b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "valid JSON")

    def test_not_object(self) -> None:
        """A JSON array is 400."""
        self.assertRejected([_email()], "JSON object")

    def test_empty_body(self) -> None:
        """An empty body is 400."""
        self.assertRejected(b"", "valid JSON")

    def test_from_missing(self) -> None:
        """from is required."""
        self.assertRejected(_email(from_=None), "'from' is required")

    def test_from_not_string(self) -> None:
        """from must be a string."""
        self.assertRejected(_email(from_=["a@yourdomain.com"]), "'from' must be a string")

    def test_from_not_address(self) -> None:
        """from must hold an address."""
        for bad in ["alice", "Alice <alice>", "<@yourdomain.com>", "a@", "a b@yourdomain.com"]:
            self.assertRejected(_email(from_=bad), "'from' is not a valid email address")

    def test_international_addresses(self) -> None:
        """
        The relay's contract: UTF-8 local parts, A-label domains and Unicode
        display names are accepted in every address field; the sender's
        IDN domain is looked up by its A-label (verified in the data file).
        """
        body = _email(
            from_="Jörg Müller <jörg@xn--bcher-kva.example>",
            to=["用户 <用户@xn--fsqu00a.example>", "ivan@example.com"],
            cc=["Ünal <ünal@XN--BCHER-KVA.example>"],
            bcc=["josé@example.com"],
            reply_to='"Müller, Jörg" <jörg@xn--bcher-kva.example>',
        )
        status, content = self.post_email(body)
        self.assertEqual(status, 202, content)
        [stored] = self.store.emails()
        self.assertEqual(stored.payload["from"], "Jörg Müller <jörg@xn--bcher-kva.example>")

    def test_u_label_domains_refused(self) -> None:
        """A non-ASCII domain is not the contract's form: 400 naming the field and the fix."""
        for field, value in [
            ("from_", "jörg@bücher.example"),
            ("to", ["user@bücher.example"]),
            ("cc", ["a@例子.example"]),
            ("bcc", ["a@bücher.example"]),
            ("reply_to", "Jörg <jörg@bücher.example>"),
        ]:
            self.assertRejected(_email(**{field: value}), "as IDNA 2008 A-labels (xn--)")

    def test_bad_a_labels_refused(self) -> None:
        """An xn-- label that is not a valid A-label is refused."""
        self.assertRejected(_email(to=["user@xn--zz.example"]), "'to[0]' has an invalid A-label 'xn--zz'")

    def test_to_missing(self) -> None:
        """to is required."""
        self.assertRejected(_email(to=None), "'to' is required")

    def test_to_string(self) -> None:
        """to must be a list: a plain string is refused (documented choice)."""
        self.assertRejected(_email(to="user@example.com"), "'to' must be a list")

    def test_to_empty(self) -> None:
        """to must not be empty."""
        self.assertRejected(_email(to=[]), "at least one address")

    def test_to_bad_entry(self) -> None:
        """Every to entry must be an address string."""
        self.assertRejected(_email(to=["ok@example.com", "nope"]), "'to[1]'")
        self.assertRejected(_email(to=[42]), "'to[0]'")

    def test_cc_bcc(self) -> None:
        """cc and bcc must be lists of addresses."""
        self.assertRejected(_email(cc="c@example.com"), "'cc' must be a list")
        self.assertRejected(_email(bcc=["bad"]), "'bcc[0]'")

    def test_reply_to(self) -> None:
        """reply_to must be one address string."""
        self.assertRejected(_email(reply_to="nobody"), "'reply_to'")
        self.assertRejected(_email(reply_to=["a@example.com"]), "'reply_to' must be a string")

    def test_subject_missing(self) -> None:
        """Without a template, subject is required."""
        self.assertRejected(_email(subject=None), "'subject' is required")

    def test_subject_not_string(self) -> None:
        """subject must be a string."""
        self.assertRejected(_email(subject=3), "'subject' must be a string")

    def test_no_body(self) -> None:
        """Without a template, html or text is required (non-empty)."""
        self.assertRejected(_email(text=None), "'html' or 'text' is required")
        self.assertRejected(_email(text="", html=""), "'html' or 'text' is required")

    def test_html_not_string(self) -> None:
        """html must be a string."""
        self.assertRejected(_email(html=["<p>"]), "'html' must be a string")

    def test_variables(self) -> None:
        """variables must be an object."""
        self.assertRejected(_email(variables=["a"]), "'variables' must be an object")

    def test_tags(self) -> None:
        """tags must be a list of strings."""
        self.assertRejected(_email(tags="a,b"), "'tags'")
        self.assertRejected(_email(tags=["a", 1]), "'tags'")

    def test_headers(self) -> None:
        """headers must map header names to single-line strings."""
        self.assertRejected(_email(headers=["X-A: b"]), "'headers' must be an object")
        self.assertRejected(_email(headers={"X-A": 1}), "'headers.X-A' must be a string")
        self.assertRejected(_email(headers={"X A": "b"}), "invalid header name")
        self.assertRejected(_email(headers={"X-A": "b\r\nBcc: x@y"}), "line breaks")

    def test_attachments_shape(self) -> None:
        """attachments must be a list of objects with filename and content."""
        self.assertRejected(_email(attachments={"filename": "a"}), "'attachments' must be a list")
        self.assertRejected(_email(attachments=["a"]), "'attachments[0]' must be an object")
        self.assertRejected(
            _email(attachments=[{"content": "aGk="}]), "'attachments[0].filename'"
        )
        self.assertRejected(
            _email(attachments=[{"filename": "a"}]), "'attachments[0].content'"
        )

    def test_attachment_base64(self) -> None:
        """Attachment content must be strict base64 (no line breaks)."""
        for bad in ["not base64!", "aGk", "aGVs\nbG8="]:
            self.assertRejected(
                _email(attachments=[{"filename": "a", "content": bad}]),
                "not valid base64",
            )

    def test_attachment_content_type(self) -> None:
        """content_type, if given, must be a MIME type."""
        self.assertRejected(
            _email(attachments=[{"filename": "a", "content": "", "content_type": "text"}]),
            "content_type",
        )

    def test_idempotency_key_type(self) -> None:
        """idempotency_key must be a non-empty string."""
        self.assertRejected(_email(idempotency_key=5), "'idempotency_key'")
        self.assertRejected(_email(idempotency_key=""), "'idempotency_key'")

    def test_scheduled_at(self) -> None:
        """scheduled_at must be ISO 8601."""
        self.assertRejected(_email(scheduled_at="tomorrow"), "'scheduled_at'")

    def test_unsubscribe(self) -> None:
        """unsubscribe must be a boolean."""
        self.assertRejected(_email(unsubscribe="yes"), "'unsubscribe'")

    def test_template_id_type(self) -> None:
        """template_id must be a non-empty string."""
        self.assertRejected(_email(template_id=7), "'template_id' must be a string")
        self.assertRejected(_email(template_id=""), "'template_id' must not be empty")

    def test_unknown_domain(self) -> None:
        """A sender domain the account does not have: 404 Domain not found."""
        self.assertError(
            self.post_email(_email(from_="a@elsewhere.example")),
            404,
            "not_found",
            "Domain not found",
        )

    def test_unverified_domain(self) -> None:
        """A pending domain: 422 Domain not verified."""
        self.assertError(
            self.post_email(_email(from_="a@pendingdomain.com")),
            422,
            "unprocessable_entity",
            "Domain not verified",
        )

    def test_scoped_key_other_domain(self) -> None:
        """A domain-scoped key sending from another verified domain: 403 forbidden."""
        self.assertError(
            self.post_email(_email(from_="a@anotherdomain.com"), key=SCOPED),
            403,
            "forbidden",
            "anotherdomain.com",
        )
        self.assertEqual(self.post_email(_email(), key=SCOPED)[0], 202)
        self.assertEqual(self.post_email(_email(from_="a@anotherdomain.com"))[0], 202)

    def test_scope_checked_before_existence(self) -> None:
        """A scoped key is refused (403) even for an unknown domain: scope comes first."""
        self.assertError(
            self.post_email(_email(from_="a@elsewhere.example"), key=SCOPED),
            403,
            "forbidden",
        )

    def test_template_not_found(self) -> None:
        """An unknown template: 404 Template not found."""
        self.assertError(
            self.post_email(_email(template_id="tpl_nope")),
            404,
            "not_found",
            "Template not found",
        )

    def test_template_not_published(self) -> None:
        """An unpublished template: 422 Template not published."""
        [draft] = [t for t in self.data.templates if not t.published]
        self.assertError(
            self.post_email(_email(template_id=draft.id)),
            422,
            "unprocessable_entity",
            "Template not published",
        )

    def test_too_large(self) -> None:
        """A body over max_body_bytes: 413 payload_too_large, nothing stored."""
        encoded = json.dumps(_email()).encode()
        self.use(attrs.evolve(self.data, max_body_bytes=len(encoded) - 1))
        response, content = self.call("POST", "/emails", encoded)
        self.assertError((response.code, json.loads(content)), 413, "payload_too_large")
        self.assertEqual(self.store.emails(), [])


class IdempotencyTests(_SandboxCase):
    """Idempotency keys: replay, conflict and scope."""

    def test_header_key_replays(self) -> None:
        """Same Idempotency-Key and body: the original id again, one stored row."""
        headers = {"Idempotency-Key": "abc"}
        first = self.post_email(_email(), headers=headers)
        response, content = self.call("POST", "/emails", _email(), headers=headers)
        self.assertEqual(first[0], 202)
        self.assertEqual((response.code, json.loads(content)), first)
        self.assertEqual(response.headers.getRawHeaders("idempotent-replayed"), ["true"])
        [stored] = self.store.emails()
        self.assertEqual(stored.idempotency_key, "abc")
        self.assertEqual(stored.request_headers["idempotency-key"], "abc")

    def test_body_key_replays(self) -> None:
        """Same body idempotency_key and body: the original id again."""
        first = self.post_email(_email(idempotency_key="k1"))
        second = self.post_email(_email(idempotency_key="k1"))
        self.assertEqual(first, second)
        self.assertEqual(len(self.store.emails()), 1)

    def test_key_order_irrelevant(self) -> None:
        """The body comparison is canonical: key order and spacing do not matter."""
        body = _email(idempotency_key="k1", tags=["a"])
        first = self.post_email(body)
        reordered = json.dumps(dict(reversed(list(body.items()))), indent=4).encode()
        self.assertEqual(self.post_email(reordered), first)

    def test_different_body_conflicts(self) -> None:
        """Same key, different body: 409 conflict, still one row."""
        self.post_email(_email(), headers={"Idempotency-Key": "k"})
        self.assertError(
            self.post_email(_email(subject="Other"), headers={"Idempotency-Key": "k"}),
            409,
            "conflict",
        )
        self.assertEqual(len(self.store.emails()), 1)

    def test_body_key_wins_over_header(self) -> None:
        """The body's idempotency_key is used when both are present."""
        self.post_email(_email(idempotency_key="body"), headers={"Idempotency-Key": "h1"})
        self.assertEqual(self.store.emails()[0].idempotency_key, "body")
        status, _ = self.post_email(
            _email(idempotency_key="body"), headers={"Idempotency-Key": "h2"}
        )
        self.assertEqual(status, 202)
        self.assertEqual(len(self.store.emails()), 1)
        status, _ = self.post_email(_email(), headers={"Idempotency-Key": "body"})
        self.assertEqual(status, 202)
        self.assertEqual(len(self.store.emails()), 1)

    def test_scoped_per_api_key(self) -> None:
        """The same key under another API key is a different email."""
        headers = {"Idempotency-Key": "shared"}
        first = self.post_email(_email(), key=FULL, headers=headers)[1]["id"]
        second = self.post_email(_email(), key=SENDING, headers=headers)[1]["id"]
        self.assertNotEqual(first, second)
        self.assertEqual(len(self.store.emails()), 2)

    def test_rejected_request_reserves_nothing(self) -> None:
        """A request refused by validation does not claim its key."""
        headers = {"Idempotency-Key": "k"}
        self.assertEqual(self.post_email(_email(to=None), headers=headers)[0], 400)
        self.assertEqual(self.post_email(_email(), headers=headers)[0], 202)
        self.assertEqual(self.post_email(_email(subject="x"), headers=headers)[0], 409)

    def test_no_key_no_dedup(self) -> None:
        """Without a key, identical bodies are separate emails."""
        self.post_email(_email())
        self.post_email(_email())
        self.assertEqual(len(self.store.emails()), 2)

    def test_survives_restart(self) -> None:
        """Idempotency records live in the SQLite file, across a new store and resource."""
        first = self.post_email(_email(idempotency_key="persist"))
        self.store.close()
        self.store = SandboxStore(self.db_path)
        self.addCleanup(self.store.close)
        self.use(self.data)
        self.assertEqual(self.post_email(_email(idempotency_key="persist")), first)
        self.assertEqual(len(self.store.emails()), 1)


class ListTests(_SandboxCase):
    """GET /emails and GET /emails/{id}."""

    def list(self, query: str = "", key: str = FULL) -> tuple[int, Any]:
        response, content = self.call("GET", "/emails" + query, key=key)
        return response.code, json.loads(content)

    def test_key_check(self) -> None:
        """The relay's key check: GET /emails?per_page=1 is 200 for valid keys, 401 otherwise."""
        for key in (FULL, SENDING, SCOPED, SERVICE):
            self.assertEqual(self.list("?per_page=1", key=key)[0], 200)
        self.assertError(self.list("?per_page=1", key="sk_test_bad"), 401, "unauthorized")
        response, content = self.call("GET", "/emails?per_page=1", key=None)
        self.assertEqual(response.code, 401)

    def test_scoped_to_key(self) -> None:
        """Each key sees only its own sends (the service key too)."""
        mine = self.post_email(_email(), key=SERVICE)[1]["id"]
        self.post_email(_email(), key=FULL)
        status, body = self.list(key=SERVICE)
        self.assertEqual(status, 200)
        self.assertEqual([e["id"] for e in body["data"]], [mine])
        self.assertEqual(body["total"], 1)
        self.assertEqual(self.list(key=SENDING)[1]["data"], [])

    def test_pages_newest_first(self) -> None:
        """per_page and page slice the list, newest first."""
        ids = [self.post_email(_email(subject=str(i)))[1]["id"] for i in range(3)]
        status, first = self.list("?per_page=2")
        self.assertEqual([e["id"] for e in first["data"]], [ids[2], ids[1]])
        self.assertEqual((first["total"], first["has_more"], first["page"]), (3, True, 1))
        _, second = self.list("?per_page=2&page=2")
        self.assertEqual([e["id"] for e in second["data"]], [ids[0]])
        self.assertFalse(second["has_more"])
        self.assertEqual(first["data"][0]["subject"], "2")

    def test_tag_filter(self) -> None:
        """tag keeps only emails carrying that tag."""
        tagged = self.post_email(_email(tags=["welcome"]))[1]["id"]
        self.post_email(_email(tags=["other"]))
        self.post_email(_email())
        _, body = self.list("?tag=welcome")
        self.assertEqual([e["id"] for e in body["data"]], [tagged])

    def test_bad_paging(self) -> None:
        """page and per_page out of range are 400."""
        for query in ("?per_page=0", "?per_page=101", "?per_page=x", "?page=0"):
            self.assertError(self.list(query), 400, "invalid_request")

    def test_get_one(self) -> None:
        """GET /emails/{id} shows the caller's own email, 404 for others'."""
        email_id = self.post_email(_email(tags=["t"]))[1]["id"]
        response, content = self.call("GET", f"/emails/{email_id}")
        self.assertEqual(response.code, 200)
        detail = json.loads(content)
        self.assertEqual(
            (detail["id"], detail["subject"], detail["tags"], detail["status"]),
            (email_id, "Hello", ["t"], "queued"),
        )
        response, content = self.call("GET", f"/emails/{email_id}", key=SENDING)
        self.assertError((response.code, json.loads(content)), 404, "not_found")
        response, content = self.call("GET", "/emails/em_nope")
        self.assertEqual(response.code, 404)

    def test_domains_need_full_access(self) -> None:
        """GET /domains: full_access lists them, sending_access is 403."""
        response, content = self.call("GET", "/domains")
        self.assertEqual(response.code, 200)
        names = [d["name"] for d in json.loads(content)["data"]]
        self.assertIn("pendingdomain.com", names)
        response, content = self.call("GET", "/domains", key=SENDING)
        self.assertError((response.code, json.loads(content)), 403, "forbidden")


class MailboxTests(_SandboxCase):
    """POST /mailboxes/authenticate."""

    def auth(self, body: object, key: str | None = SERVICE) -> tuple[int, Any]:
        response, content = self.call("POST", "/mailboxes/authenticate", body, key=key)
        return response.code, json.loads(content)

    def test_active_mailbox(self) -> None:
        """The right password for an active mailbox: 200 with the mailbox."""
        self.assertEqual(
            self.auth({"email": "alice@yourdomain.com", "password": "alice-password"}),
            (200, {"mailbox": {"email_address": "alice@yourdomain.com", "status": "active"}}),
        )

    def test_email_case_insensitive(self) -> None:
        """The address matches case-insensitively; the canonical one is returned."""
        status, body = self.auth(
            {"email": "Alice@YourDomain.com", "password": "alice-password"}
        )
        self.assertEqual((status, body["mailbox"]["email_address"]), (200, "alice@yourdomain.com"))

    def test_wrong_password_and_unknown_email_look_alike(self) -> None:
        """A wrong password and an unknown address give the same 401."""
        wrong = self.auth({"email": "alice@yourdomain.com", "password": "nope"})
        unknown = self.auth({"email": "carol@yourdomain.com", "password": "alice-password"})
        self.assertError(wrong, 401, "unauthorized", "Invalid email or password")
        self.assertEqual(wrong, unknown)

    def test_suspended(self) -> None:
        """A suspended mailbox with the right password: 403 forbidden; wrong password: 401."""
        self.assertError(
            self.auth({"email": "bob@yourdomain.com", "password": "bob-password"}),
            403,
            "forbidden",
            "suspended",
        )
        self.assertError(
            self.auth({"email": "bob@yourdomain.com", "password": "x"}), 401, "unauthorized"
        )

    def test_needs_service_key(self) -> None:
        """A valid non-service key is 403; unknown or missing key is 401."""
        body = {"email": "alice@yourdomain.com", "password": "alice-password"}
        self.assertError(self.auth(body, key=FULL), 403, "forbidden", "may not authenticate")
        self.assertError(self.auth(body, key="sk_test_nope"), 401, "unauthorized")
        self.assertError(self.auth(body, key=None), 401, "unauthorized")

    def test_bad_body(self) -> None:
        """email and password are required strings."""
        self.assertError(self.auth({"email": "alice@yourdomain.com"}), 400, "invalid_request")
        self.assertError(self.auth({"password": "p"}), 400, "invalid_request")
        self.assertError(self.auth(b"nope"), 400, "invalid_request")


class FaultTests(_SandboxCase):
    """Fault injection, through Python and through /_sandbox/faults."""

    def test_server_errors(self) -> None:
        """500, 502 and 503 answer internal_error once, store nothing, then recover."""
        for mode in ("500", "502", "503"):
            self.resource.inject_fault(mode)
            self.assertError(self.post_email(_email()), int(mode), "internal_error")
            self.assertEqual(self.store.emails(), [])
        self.assertEqual(self.post_email(_email())[0], 202)

    def test_422(self) -> None:
        """422 answers unprocessable_entity."""
        self.resource.inject_fault("422")
        self.assertError(self.post_email(_email()), 422, "unprocessable_entity")

    def test_429_with_retry_after(self) -> None:
        """429 answers rate_limit_exceeded with the given Retry-After."""
        self.resource.inject_fault("429", retry_after="3")
        response, content = self.call("POST", "/emails", _email())
        self.assertError((response.code, json.loads(content)), 429, "rate_limit_exceeded")
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["3"])

    def test_429_without_retry_after(self) -> None:
        """429 without retry_after has no Retry-After header."""
        self.resource.inject_fault("429")
        response, _ = self.call("POST", "/emails", _email())
        self.assertEqual(response.code, 429)
        self.assertIsNone(response.headers.getRawHeaders("retry-after"))

    def test_quota(self) -> None:
        """quota answers 429 monthly_limit_exceeded and never Retry-After."""
        self.resource.inject_fault("quota", retry_after="3")
        response, content = self.call("POST", "/emails", _email())
        self.assertError((response.code, json.loads(content)), 429, "monthly_limit_exceeded")
        self.assertIsNone(response.headers.getRawHeaders("retry-after"))

    def test_slow(self) -> None:
        """slow answers normally after the delay, on the injected clock."""
        self.resource.inject_fault("slow", delay=30)
        d = self.send("POST", "/emails", _email())
        self.client.flush()
        self.assertNoResult(d)
        self.clock.advance(29)
        self.client.flush()
        self.assertNoResult(d)
        self.assertEqual(self.store.emails(), [])
        self.clock.advance(1)
        self.client.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 202)
        body = json.loads(self.successResultOf(self.client.content(response)))
        self.assertEqual([e.id for e in self.store.emails()], [body["id"]])

    def test_slow_client_gone(self) -> None:
        """If the client gives up on a slow answer, the request is still processed later."""
        self.resource.inject_fault("slow", delay=10)
        d = self.send("POST", "/emails", _email())
        d.cancel()
        self.client.flush()
        self.failureResultOf(d, ResponseNeverReceived)
        self.clock.advance(10)
        self.client.flush()
        self.assertEqual(len(self.store.emails()), 1)

    def test_delay_applies_to_other_modes(self) -> None:
        """delay postpones any fault's answer, e.g. a late 503."""
        self.resource.inject_fault("503", delay=5)
        d = self.send("POST", "/emails", _email())
        self.client.flush()
        self.assertNoResult(d)
        self.clock.advance(5)
        self.client.flush()
        self.assertEqual(self.successResultOf(d).code, 503)

    def test_hang(self) -> None:
        """hang never answers and stores nothing, until abort_pending drops it."""
        self.resource.inject_fault("hang")
        d = self.send("POST", "/emails", _email())
        self.clock.advance(3600)
        self.client.flush()
        self.assertNoResult(d)
        self.assertEqual(self.store.emails(), [])
        self.assertEqual(self.resource.pending, 1)
        self.resource.abort_pending()
        self.assertEqual(self.resource.pending, 0)
        self.client.flush()
        self.failureResultOf(d, ResponseNeverReceived)

    def test_reset(self) -> None:
        """reset drops the connection without an answer."""
        self.resource.inject_fault("reset")
        d = self.send("POST", "/emails", _email())
        self.client.flush()
        self.failureResultOf(d, ResponseNeverReceived)
        self.assertEqual(self.store.emails(), [])

    def test_malformed(self) -> None:
        """malformed answers 202 with a body that is not JSON, storing nothing."""
        self.resource.inject_fault("malformed")
        response, content = self.call("POST", "/emails", _email())
        self.assertEqual(response.code, 202)
        self.assertRaises(ValueError, json.loads, content)
        self.assertEqual(self.store.emails(), [])

    def test_noid(self) -> None:
        """noid answers 202 JSON without an id, storing nothing."""
        self.resource.inject_fault("noid")
        status, body = self.post_email(_email())
        self.assertEqual(status, 202)
        self.assertNotIn("id", body)
        self.assertEqual(self.store.emails(), [])

    def test_accept_then_500(self) -> None:
        """accept_then_500 stores the email but answers 500; a keyed retry gets its id."""
        self.resource.inject_fault("accept_then_500")
        headers = {"Idempotency-Key": "lost"}
        self.assertError(self.post_email(_email(), headers=headers), 500, "internal_error")
        [stored] = self.store.emails()
        status, body = self.post_email(_email(), headers=headers)
        self.assertEqual((status, body["id"]), (202, stored.id))
        self.assertEqual(len(self.store.emails()), 1)

    def test_count_and_queue(self) -> None:
        """count N applies N times; queued faults apply in order."""
        self.resource.inject_fault("503", count=2)
        self.resource.inject_fault("429")
        statuses = [self.post_email(_email())[0] for _ in range(4)]
        self.assertEqual(statuses, [503, 503, 429, 202])

    def test_until_cleared(self) -> None:
        """count -1 lasts until clear_faults."""
        self.resource.inject_fault("502", count=-1)
        self.assertEqual([self.post_email(_email())[0] for _ in range(3)], [502] * 3)
        self.assertEqual(self.resource.clear_faults(), 1)
        self.assertEqual(self.post_email(_email())[0], 202)

    def test_before_auth(self) -> None:
        """A fault applies whatever the key (like a failing load balancer)."""
        self.resource.inject_fault("503")
        self.assertEqual(self.post_email(_email(), key="sk_test_bad")[0], 503)

    def test_other_routes_untouched(self) -> None:
        """A POST /emails fault leaves GET /emails and mailbox auth alone."""
        self.resource.inject_fault("503")
        self.assertEqual(self.call("GET", "/emails")[0].code, 200)
        self.assertEqual(self.post_email(_email())[0], 503)

    def test_get_emails_fault(self) -> None:
        """A fault on GET /emails hits the key check, not sends."""
        self.resource.inject_fault("503", path="/emails", method="GET")
        self.assertEqual(self.post_email(_email())[0], 202)
        self.assertEqual(self.call("GET", "/emails?per_page=1")[0].code, 503)
        self.assertEqual(self.call("GET", "/emails?per_page=1")[0].code, 200)

    def test_mailbox_auth_fault(self) -> None:
        """A fault on /mailboxes/authenticate hits mailbox checks."""
        self.resource.inject_fault("hang", path="/mailboxes/authenticate")
        d = self.send(
            "POST",
            "/mailboxes/authenticate",
            {"email": "alice@yourdomain.com", "password": "alice-password"},
            key=SERVICE,
        )
        self.client.flush()
        self.assertNoResult(d)

    def test_bad_injection(self) -> None:
        """inject_fault refuses unknown modes, bad counts, delays and routes."""
        self.assertRaises(ValueError, self.resource.inject_fault, "404")
        self.assertRaises(ValueError, self.resource.inject_fault, "500", count=0)
        self.assertRaises(ValueError, self.resource.inject_fault, "slow", delay=-1)
        self.assertRaises(ValueError, self.resource.inject_fault, "500", path="/nowhere")
        self.assertRaises(ValueError, self.resource.inject_fault, "500", path="/_sandbox/emails", method="GET")
        self.assertEqual(self.resource.clear_faults(), 0)

    def test_every_mode_accepted(self) -> None:
        """Every documented mode can be injected."""
        for mode in FAULT_MODES:
            self.resource.inject_fault(mode)
        self.assertEqual(self.resource.clear_faults(), len(FAULT_MODES))

    def test_http_faults(self) -> None:
        """POST, GET and DELETE /_sandbox/faults manage faults over HTTP."""
        response, content = self.call(
            "POST", "/_sandbox/faults", {"mode": "429", "count": 2, "retry_after": 7}, key=None
        )
        self.assertEqual(response.code, 201)
        self.assertEqual(json.loads(content)["fault"]["retry_after"], "7")
        response, content = self.call("GET", "/_sandbox/faults", key=None)
        [listed] = json.loads(content)["data"]
        self.assertEqual((listed["mode"], listed["count"]), ("429", 2))
        response, _ = self.call("POST", "/emails", _email())
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["7"])
        response, content = self.call("DELETE", "/_sandbox/faults", key=None)
        self.assertEqual(json.loads(content), {"deleted": 1})
        self.assertEqual(self.post_email(_email())[0], 202)

    def test_http_fault_errors(self) -> None:
        """A bad fault over HTTP is 400 invalid_request."""
        for body in (
            {"mode": "explode"},
            {"mode": "500", "count": "2"},
            {"mode": "500", "colour": 1},
            {"mode": "500", "path": "/_sandbox/faults"},
            ["500"],
        ):
            response, content = self.call("POST", "/_sandbox/faults", body, key=None)
            self.assertError((response.code, json.loads(content)), 400, "invalid_request")
        self.assertEqual(self.resource.clear_faults(), 0)

    def test_sandbox_routes_never_faulted(self) -> None:
        """A fault with count -1 does not block the /_sandbox endpoints that clear it."""
        self.resource.inject_fault("hang", count=-1)
        response, _ = self.call("GET", "/_sandbox/emails", key=None)
        self.assertEqual(response.code, 200)


class SandboxEndpointTests(_SandboxCase):
    """GET and DELETE /_sandbox/emails."""

    def test_list_all(self) -> None:
        """Every stored email, any key, in insertion order, with its details."""
        a = self.post_email(_email(), key=FULL, headers={"Idempotency-Key": "x"})[1]["id"]
        b = self.post_email(_email(), key=SENDING)[1]["id"]
        response, content = self.call("GET", "/_sandbox/emails", key=None)
        data = json.loads(content)["data"]
        self.assertEqual([(e["id"], e["api_key"]) for e in data], [(a, FULL), (b, SENDING)])
        self.assertEqual(data[0]["idempotency_key"], "x")
        self.assertEqual(data[0]["payload"], _email())
        self.assertEqual(data[0], self.store.emails()[0].to_json())

    def test_clear(self) -> None:
        """DELETE empties the store, idempotency records included."""
        self.post_email(_email(), headers={"Idempotency-Key": "x"})
        response, content = self.call("DELETE", "/_sandbox/emails", key=None)
        self.assertEqual(json.loads(content), {"deleted": 1})
        self.assertEqual(self.store.emails(), [])
        self.assertEqual(self.post_email(_email(subject="new"), headers={"Idempotency-Key": "x"})[0], 202)

    def test_loopback_only(self) -> None:
        """A non-loopback client gets 403 from /_sandbox, a loopback one 200."""
        for address, expected in (
            (IPv4Address("TCP", "10.0.0.7", 40000), 403),
            (IPv6Address("TCP", "2001:db8::1", 40000), 403),
            (IPv4Address("TCP", "127.0.0.1", 40000), 200),
            (IPv6Address("TCP", "::1", 40000), 200),
            (IPv6Address("TCP", "::ffff:127.0.0.1", 40000), 200),
        ):
            request = DummyRequest([b"_sandbox", b"emails"])
            request.method = b"GET"
            request.path = b"/_sandbox/emails"
            request.client = address
            self.assertEqual(self.resource.render(request), NOT_DONE_YET)
            self.assertEqual(request.responseCode, expected)
            self.assertEqual(request.finished, 1)


class RealHTTPTests(_TempPathMixin, TestCase):
    """The sandbox service over real loopback HTTP and a real SQLite file."""

    timeout = 30

    def setUp(self) -> None:
        self.db_path = self.mktemp()
        self.service = makeSandboxService(
            0, "127.0.0.1", self.db_path, IN_TREE_DATA_PATH, reactor
        )
        self.service.startService()
        self.addCleanup(self.service.stopService)
        assert self.service.port is not None
        self.url = f"http://127.0.0.1:{self.service.port.getHost().port}"
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)

    async def test_send_stored_in_sqlite(self) -> None:
        """A send over loopback is 202 and its row is in the SQLite file."""
        self.assertIsInstance(self.service, SandboxService)
        port = await self.service.when_listening()
        self.assertIs(port, self.service.port)
        response = await treq.post(
            self.url + "/emails",
            json=_email(),
            headers={"Authorization": f"Bearer {FULL}", "User-Agent": "e2e/1"},
            pool=self.pool,
            timeout=10,
        )
        self.assertEqual(response.code, 202)
        self.assertEqual(len(response.headers.getRawHeaders("x-request-id")), 1)
        body = await response.json()
        connection = sqlite3.connect(self.db_path)
        self.addCleanup(connection.close)
        rows = connection.execute("SELECT id, api_key, payload FROM emails").fetchall()
        self.assertEqual(rows, [(body["id"], FULL, json.dumps(_email()))])
        listed = await treq.get(self.url + "/_sandbox/emails", pool=self.pool, timeout=10)
        data = (await listed.json())["data"]
        self.assertEqual(data[0]["request_headers"]["user-agent"], "e2e/1")

    async def test_reset_over_tcp(self) -> None:
        """reset really aborts the TCP connection."""
        self.service.resource.inject_fault("reset")
        with self.assertRaises(ResponseNeverReceived):
            await treq.post(
                self.url + "/emails",
                json=_email(),
                headers={"Authorization": f"Bearer {FULL}"},
                pool=self.pool,
                timeout=10,
            )

    async def test_stop_drops_held_requests(self) -> None:
        """Stopping the service aborts hung and delayed requests instead of leaving them open."""
        resource = self.service.resource
        resource.inject_fault("hang")
        resource.inject_fault("slow", delay=600)
        requests = [
            treq.post(
                self.url + "/emails",
                json=_email(),
                headers={"Authorization": f"Bearer {FULL}"},
                pool=self.pool,
                timeout=10,
            )
            for _ in range(2)
        ]
        for _ in range(500):
            if resource.pending == 2:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(resource.pending, 2)
        await self.service.stopService()
        self.assertEqual(resource.pending, 0)
        for request in requests:
            with self.assertRaises(ResponseNeverReceived) as caught:
                await request
            # Dropped by the server, not given up on by the client's timeout.
            self.assertFalse(any(r.check(CancelledError) for r in caught.exception.reasons))

    def test_bind_failure_is_fatal(self) -> None:
        """Starting a second sandbox on a taken port raises at startService."""
        assert self.service.port is not None
        other = makeSandboxService(
            self.service.port.getHost().port,
            "127.0.0.1",
            self.mktemp(),
            IN_TREE_DATA_PATH,
            reactor,
        )
        self.addCleanup(other.store.close)
        self.assertRaises(CannotListenError, other.startService)
        self.failureResultOf(other.when_listening(), CannotListenError)


class PluginTests(_TempPathMixin, SynchronousTestCase):
    """The twistd plugin and its options."""

    def run_python(self, *argv: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO_ROOT
        for name in tap.ENVIRONMENT.values():
            env.pop(name, None)
        return subprocess.run(
            [sys.executable, *argv],
            env=env,
            cwd=tempfile.gettempdir(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    def test_discovered(self) -> None:
        """getPlugins(IServiceMaker) finds poststack-sandbox with PYTHONPATH set to the checkout."""
        result = self.run_python(
            "-c",
            "from twisted.plugin import getPlugins\n"
            "from twisted.application.service import IServiceMaker\n"
            "for p in getPlugins(IServiceMaker):\n"
            "    if p.tapname == 'poststack-sandbox': print(p.module, p.name)\n",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(
            result.stdout.strip(), "poststack_relay.sandbox.tap PostStack sandbox API"
        )

    def test_twistd_bad_data(self) -> None:
        """twistd with a missing data file exits 1 with a one-line error, no traceback."""
        missing = self.mktemp()
        result = self.run_python(
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "poststack-sandbox",
            "--data",
            missing,
        )
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, output)
        self.assertNotIn("Traceback", output)
        [line] = [l for l in output.splitlines() if "cannot read" in l]
        self.assertIn(missing, line)

    def test_options_flags(self) -> None:
        """Flags are parsed and validated; the data file is loaded."""
        db = self.mktemp()
        options = tap.Options(environ={})
        options.parseOptions(
            ["--port", "0", "--interface", "::1", "--db", db, "--data", IN_TREE_DATA_PATH]
        )
        self.assertEqual(
            (options["port"], options["interface"], options["db"]), (0, "::1", db)
        )
        self.assertIsInstance(options["sandbox_data"], SandboxData)

    def test_options_environment_and_defaults(self) -> None:
        """Environment variables fill unset options; flags win; the rest default."""
        options = tap.Options(
            environ={
                "POSTSTACK_SANDBOX_PORT": "9999",
                "POSTSTACK_SANDBOX_DATA": IN_TREE_DATA_PATH,
            }
        )
        options.parseOptions([])
        self.assertEqual(
            (options["port"], options["interface"], options["db"], options["data"]),
            (9999, "127.0.0.1", "sandbox.sqlite3", IN_TREE_DATA_PATH),
        )
        options = tap.Options(environ={"POSTSTACK_SANDBOX_PORT": "9999"})
        options.parseOptions(["-p", "1234", "--data", IN_TREE_DATA_PATH])
        self.assertEqual(options["port"], 1234)
        self.assertEqual(tap.DEFAULTS["data"], os.path.join("etc", "sandbox.json"))

    def test_bad_data_is_usage_error(self) -> None:
        """A missing or invalid --data file is a one-line UsageError."""
        bad = self.mktemp()
        with open(bad, "w") as f:
            f.write("{nope")
        for path in (self.mktemp(), bad):
            options = tap.Options(environ={})
            error = self.assertRaises(
                usage.UsageError, options.parseOptions, ["--data", path]
            )
            self.assertIn(path, str(error))
            self.assertNotIn("\n", str(error))

    def test_bad_port_and_db(self) -> None:
        """A bad port or a --db in a missing directory is a UsageError."""
        for argv in (
            ["--port", "http"],
            ["--port", "70000"],
            ["--db", os.path.join(self.mktemp(), "x", "db.sqlite3")],
        ):
            options = tap.Options(environ={})
            self.assertRaises(
                usage.UsageError,
                options.parseOptions,
                argv + ["--data", IN_TREE_DATA_PATH],
            )

    def test_make_service(self) -> None:
        """makeService builds a stopped SandboxService for the parsed options."""
        options = tap.Options(environ={})
        options.parseOptions(["--port", "0", "--db", self.mktemp(), "--data", IN_TREE_DATA_PATH])
        service = tap.makeService(options)
        assert isinstance(service, SandboxService)
        self.addCleanup(service.store.close)
        self.assertFalse(service.running)
        self.assertIsNone(service.port)
        self.assertEqual(service.resource.data, options["sandbox_data"])


class FaultPartsTests(SynchronousTestCase):
    """
    The fault parts without a request: L{make_fault}, L{FaultQueue} and
    L{fault_reply}.
    """

    def test_make_fault_normalises(self) -> None:
        """The method is upper-cased, the path loses its trailing slash, a
        number of seconds to retry after becomes text."""
        fault = make_fault("429", retry_after=3, path="/emails/", method="post")
        self.assertEqual(
            (fault.method, fault.path, fault.retry_after, fault.remaining, fault.delay),
            ("POST", "/emails", "3", 1, 0.0),
        )

    def test_make_fault_refuses(self) -> None:
        """Each bad argument is a ValueError naming the problem."""
        for kwargs, message in [
            ({"mode": "teapot"}, "unknown fault mode 'teapot'"),
            ({"mode": "503", "count": 0}, "count must be a positive integer or -1"),
            ({"mode": "503", "count": True}, "count must be a positive integer or -1"),
            ({"mode": "503", "delay": -1}, "delay must be a number of seconds >= 0"),
            ({"mode": "503", "retry_after": " "}, "retry_after must be a string (seconds or HTTP date)"),
            ({"mode": "503", "path": 5}, "method and path must be strings"),
        ]:
            with self.assertRaises(ValueError) as raised:
                make_fault(**kwargs)
            self.assertEqual(str(raised.exception), message)

    def test_queue_order_and_counts(self) -> None:
        """A request takes one count of the first matching fault; -1 lasts."""
        queue = FaultQueue()
        queue.add(make_fault("503", count=2))
        queue.add(make_fault("429", count=-1))
        queue.add(make_fault("500", method="GET"))
        taken = [queue.take("POST", "/emails") for _ in range(4)]
        self.assertEqual(
            [f.mode if f else None for f in taken], ["503", "503", "429", "429"]
        )
        self.assertEqual([f.remaining for f in taken if f], [1, 1, 1, 1])
        self.assertIsNone(queue.take("POST", "/domains"))
        self.assertEqual([f["mode"] for f in queue.to_json()], ["429", "500"])
        self.assertEqual(queue.clear(), 2)
        self.assertIsNone(queue.take("GET", "/emails"))

    def test_replies(self) -> None:
        """Each mode's answer, and when the normal answer is computed."""
        answered: list[int] = []
        aborted: list[int] = []

        def answer() -> Reply:
            answered.append(1)
            return Reply.json(202, {"id": "em_1"})

        def reply(mode: str, retry_after: str | None = None) -> Reply | None:
            fault = make_fault(mode, retry_after=retry_after)
            return fault_reply(fault, answer, 202, lambda: aborted.append(1))

        for mode, status in [("500", 500), ("502", 502), ("503", 503), ("422", 422), ("quota", 429)]:
            result = reply(mode)
            assert result is not None
            self.assertEqual(result.status, status)
            self.assertEqual(dict(result.headers), {})
        limited = reply("429", retry_after="7")
        assert limited is not None
        self.assertEqual((limited.status, dict(limited.headers)), (429, {"Retry-After": "7"}))
        self.assertEqual(json.loads(limited.body)["code"], "rate_limit_exceeded")
        self.assertEqual(answered, [])

        malformed = reply("malformed")
        assert malformed is not None
        self.assertEqual((malformed.status, malformed.content_type), (202, "text/html"))
        noid = reply("noid")
        assert noid is not None
        self.assertEqual(json.loads(noid.body), {"object": "email", "status": "queued"})
        self.assertIsNone(reply("reset"))
        self.assertEqual(aborted, [1])
        self.assertEqual(answered, [])

        slow = reply("slow")
        assert slow is not None
        self.assertEqual(slow.status, 202)
        lost = reply("accept_then_500")
        assert lost is not None
        self.assertEqual(lost.status, 500)
        self.assertEqual(answered, [1, 1])


class AuthPartsTests(SynchronousTestCase):
    """
    The key and loopback checks of L{poststack_relay.sandbox.auth}, without
    a request.
    """

    def setUp(self) -> None:
        self.data = load_sandbox_data(IN_TREE_DATA_PATH)

    def refused(self, header: bytes | None) -> tuple[int, str]:
        with self.assertRaises(ApiError) as raised:
            authenticate_key(self.data, header)
        return raised.exception.status, raised.exception.message

    def test_bearer(self) -> None:
        """A Bearer header naming a known key gives that key."""
        key = authenticate_key(self.data, b"bearer  " + FULL.encode() + b" ")
        self.assertEqual(key.key, FULL)

    def test_refused(self) -> None:
        """A missing header, another scheme, or an unknown key is a 401."""
        self.assertEqual(self.refused(None), (401, "Missing API key"))
        self.assertEqual(
            self.refused(b"Basic " + FULL.encode()),
            (401, "Authorization must be 'Bearer <api key>'"),
        )
        self.assertEqual(self.refused(b"Bearer sk_test_nope"), (401, "Invalid API key"))

    def test_loopback(self) -> None:
        """Loopback hosts pass; any other host, or none, is a 403."""
        for host in ("127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.2"):
            require_loopback(host)
        for other in ("10.0.0.1", "::ffff:10.0.0.1", "localhost", None, "/tmp/socket"):
            with self.assertRaises(ApiError) as raised:
                require_loopback(other)
            self.assertEqual(raised.exception.status, 403)


class ValidationPartsTests(SynchronousTestCase):
    """
    The request rules of L{poststack_relay.sandbox.validation}, without a
    request.
    """

    def test_parse_address(self) -> None:
        """The bare address of the two accepted shapes, else None."""
        self.assertEqual(parse_address("A B <a@b.example>"), "a@b.example")
        self.assertEqual(parse_address(" a@b.example "), "a@b.example")
        for bad in ("a", "@b.example", "a@", "a@b..example", "<a@b> c", "a b@c"):
            self.assertIsNone(parse_address(bad), bad)

    def test_domain_forms(self) -> None:
        """ASCII and valid A-labels pass; U-labels and bad A-labels do not; data-file names become A-labels."""
        for domain in ("example.com", "xn--bcher-kva.example", "XN--BCHER-KVA.example", "a_b.example"):
            self.assertIsNone(domain_problem(domain), domain)
        for domain in ("bücher.example", "xn--zz.example", "a.xn--.example"):
            self.assertIsNotNone(domain_problem(domain), domain)
        self.assertEqual(a_label_domain("Bücher.Example"), "xn--bcher-kva.example")
        self.assertEqual(a_label_domain("YourDomain.com"), "yourdomain.com")
        self.assertIsNone(a_label_domain("\u2603.example"))

    def test_json_object(self) -> None:
        """A body over the limit is a 413; not a JSON object, a 400."""
        self.assertEqual(json_object(b'{"a": 1}', 8, 8), {"a": 1})
        for body, status in [(None, 413), (b"NaN", 400), (b"[]", 400), (b"\xff", 400)]:
            with self.assertRaises(ApiError) as raised:
                json_object(body, 9, 8)
            self.assertEqual(raised.exception.status, status)

    def test_query_int(self) -> None:
        """Absent gives the default; out of range or not a number, a 400."""
        self.assertEqual(query_int(None, "page", 1, 1, 5), 1)
        self.assertEqual(query_int("5", "page", 1, 1, 5), 5)
        for raw in ("0", "6", "x", ""):
            with self.assertRaises(ApiError) as raised:
                query_int(raw, "page", 1, 1, 5)
            self.assertEqual(
                raised.exception.message, "'page' must be an integer from 1 to 5"
            )

    def test_fingerprint(self) -> None:
        """Key order and the idempotency key do not change the fingerprint."""
        self.assertEqual(
            canonical_fingerprint({"a": 1, "b": [2], "idempotency_key": "k"}),
            canonical_fingerprint({"b": [2], "a": 1}),
        )
        self.assertNotEqual(
            canonical_fingerprint({"a": 1}), canonical_fingerprint({"a": 2})
        )
