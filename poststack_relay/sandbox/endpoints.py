# -*- test-case-name: tests.test_sandbox -*-
"""
What each sandbox endpoint does, once routed and past any fault.

L{PostStackEndpoints} implements PostStack's API over the data file and the
store (C{POST /emails} with its checks in the documented order and
idempotency, C{GET /emails}, C{GET /emails/{id}}, C{GET /domains},
C{POST /mailboxes/authenticate}); L{InspectionEndpoints} the test-only
C{/_sandbox/...} ones (stored emails and faults, loopback clients only).
Every handler takes the L{Exchange} and the route's match and returns a
L{Reply}, or raises the L{ApiError} to answer.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime

from .auth import (
    authenticate_key,
    authenticate_mailbox,
    require_full_access,
    require_loopback,
    require_sender_scope,
    require_service_key,
)
from .data import SandboxData
from .exchange import ApiError, Exchange, Reply, invalid, log, new_id
from .faults import Fault, FaultQueue, make_fault
from .store import SandboxStore, StoredEmail
from .validation import (
    canonical_fingerprint,
    json_object,
    query_int,
    validate_email,
)

_DETAIL_FIELDS = (
    "cc",
    "bcc",
    "reply_to",
    "subject",
    "html",
    "text",
    "tags",
    "template_id",
    "scheduled_at",
)
"""The fields C{GET /emails} adds to the C{202} answer's."""


def _email_created(stored: StoredEmail) -> dict[str, Any]:
    return {
        "id": stored.id,
        "object": "email",
        "from": stored.payload.get("from"),
        "to": stored.payload.get("to"),
        "created_at": stored.created_at,
        "status": "queued",
    }


def _email_detail(stored: StoredEmail) -> dict[str, Any]:
    detail = _email_created(stored)
    for field in _DETAIL_FIELDS:
        detail[field] = stored.payload.get(field)
    return detail


class PostStackEndpoints:
    """
    The PostStack API of the sandbox.
    """

    def __init__(
        self, store: SandboxStore, data: SandboxData, clock: IReactorTime
    ) -> None:
        """
        @param store: Where accepted emails go.
        @param data: Keys, domains, mailboxes, templates and limits.
        @param clock: Gives C{created_at}.
        """
        self.store = store
        self.data = data
        self._clock = clock

    def _json_body(self, exchange: Exchange) -> dict[str, Any]:
        return json_object(exchange.body, exchange.body_size, self.data.max_body_bytes)

    def _now(self) -> str:
        moment = datetime.fromtimestamp(self._clock.seconds(), tz=timezone.utc)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def post_email(self, exchange: Exchange, match: re.Match[str]) -> Reply:
        """C{POST /emails}: check, then store (or replay) one email."""
        key = authenticate_key(self.data, exchange.header(b"authorization"))
        payload = self._json_body(exchange)
        email = validate_email(payload)

        require_sender_scope(key, email.sender_domain)
        domain = self.data.find_domain(email.sender_domain)
        if domain is None:
            raise ApiError(404, "not_found", "Domain not found")
        if domain.status != "verified":
            raise ApiError(422, "unprocessable_entity", "Domain not verified")
        if email.template_id is not None:
            template = self.data.find_template(email.template_id)
            if template is None:
                raise ApiError(404, "not_found", "Template not found")
            if not template.published:
                raise ApiError(422, "unprocessable_entity", "Template not published")

        idempotency_key = payload.get("idempotency_key")
        if idempotency_key is None:
            header = exchange.header(b"idempotency-key")
            if header is not None and header.strip():
                idempotency_key = header.decode("latin-1").strip()
        fingerprint = canonical_fingerprint(payload)
        if idempotency_key is not None:
            earlier = self.store.find_idempotent(key.key, idempotency_key)
            if earlier is not None:
                stored, stored_fingerprint = earlier
                if stored_fingerprint != fingerprint:
                    raise ApiError(
                        409,
                        "conflict",
                        "Idempotency key already used with a different request body",
                    )
                return Reply.json(
                    202, _email_created(stored), {"Idempotent-Replayed": "true"}
                )

        stored = StoredEmail(
            id=new_id("em_"),
            api_key=key.key,
            payload=payload,
            idempotency_key=idempotency_key,
            request_headers=exchange.stored_headers(),
            created_at=self._now(),
        )
        self.store.add(stored, fingerprint)
        log.info(
            "sandbox stored {email_id} from {sender} via key {key_name}",
            email_id=stored.id,
            sender=payload["from"],
            key_name=key.name,
        )
        return Reply.json(202, _email_created(stored))

    def list_emails(self, exchange: Exchange, match: re.Match[str]) -> Reply:
        """C{GET /emails}: the key's own emails, newest first, a page."""
        key = authenticate_key(self.data, exchange.header(b"authorization"))
        page = query_int(exchange.query("page"), "page", 1, 1, 1_000_000)
        per_page = query_int(exchange.query("per_page"), "per_page", 20, 1, 100)
        tag = exchange.query("tag")
        status = exchange.query("status")
        emails = list(reversed(self.store.emails_for_key(key.key)))
        if tag is not None:
            emails = [e for e in emails if tag in (e.payload.get("tags") or [])]
        if status is not None and status != "queued":
            emails = []
        start = (page - 1) * per_page
        chosen = emails[start : start + per_page]
        return Reply.json(
            200,
            {
                "object": "list",
                "data": [_email_detail(e) for e in chosen],
                "page": page,
                "per_page": per_page,
                "total": len(emails),
                "has_more": start + per_page < len(emails),
            },
        )

    def get_email(self, exchange: Exchange, match: re.Match[str]) -> Reply:
        """C{GET /emails/{id}}: one of the key's own emails."""
        key = authenticate_key(self.data, exchange.header(b"authorization"))
        stored = self.store.get(match.group("id"))
        if stored is None or stored.api_key != key.key:
            raise ApiError(404, "not_found", "Email not found")
        return Reply.json(200, _email_detail(stored))

    def list_domains(self, exchange: Exchange, match: re.Match[str]) -> Reply:
        """C{GET /domains}: every domain, for C{full_access} keys."""
        key = authenticate_key(self.data, exchange.header(b"authorization"))
        require_full_access(key)
        return Reply.json(
            200,
            {
                "object": "list",
                "data": [
                    {"object": "domain", "name": d.name, "status": d.status}
                    for d in self.data.domains
                ],
            },
        )

    def authenticate_mailbox(self, exchange: Exchange, match: re.Match[str]) -> Reply:
        """C{POST /mailboxes/authenticate}, for the service key."""
        key = authenticate_key(self.data, exchange.header(b"authorization"))
        require_service_key(key)
        mailbox = authenticate_mailbox(self.data, self._json_body(exchange))
        return Reply.json(
            200,
            {
                "mailbox": {
                    "email_address": mailbox.email_address,
                    "status": mailbox.status,
                }
            },
        )


_FAULT_FIELDS = frozenset({"mode", "count", "delay", "retry_after", "path", "method"})


class InspectionEndpoints:
    """
    The test-only C{/_sandbox/...} endpoints: stored emails and faults.
    """

    def __init__(
        self,
        store: SandboxStore,
        faults: FaultQueue,
        add_fault: Callable[[Fault], None],
        max_body_bytes: int,
    ) -> None:
        """
        @param add_fault: Checks that a fault hits an API route (raising
            L{ValueError} if not) and queues it.
        """
        self.store = store
        self.faults = faults
        self._add_fault = add_fault
        self._max_body_bytes = max_body_bytes

    def emails(self, exchange: Exchange, match: re.Match[str]) -> Reply:
        """C{GET /_sandbox/emails}: every stored email, in insertion order."""
        require_loopback(exchange.client_host())
        return Reply.json(
            200,
            {"object": "list", "data": [e.to_json() for e in self.store.emails()]},
        )

    def clear_emails(self, exchange: Exchange, match: re.Match[str]) -> Reply:
        """C{DELETE /_sandbox/emails}: forget every email and idempotency key."""
        require_loopback(exchange.client_host())
        return Reply.json(200, {"deleted": self.store.clear()})

    def list_faults(self, exchange: Exchange, match: re.Match[str]) -> Reply:
        """C{GET /_sandbox/faults}: the pending faults."""
        require_loopback(exchange.client_host())
        return Reply.json(200, {"object": "list", "data": self.faults.to_json()})

    def add_fault(self, exchange: Exchange, match: re.Match[str]) -> Reply:
        """C{POST /_sandbox/faults}: queue a fault."""
        require_loopback(exchange.client_host())
        body = json_object(exchange.body, exchange.body_size, self._max_body_bytes)
        unknown = sorted(set(body) - _FAULT_FIELDS)
        if unknown:
            raise invalid(f"unknown fault field {unknown[0]!r}")
        try:
            fault = make_fault(
                body.get("mode"),
                count=body.get("count", 1),
                delay=body.get("delay", 0.0),
                retry_after=body.get("retry_after"),
                path=body.get("path", "/emails"),
                method=body.get("method", "POST"),
            )
            self._add_fault(fault)
        except ValueError as e:
            raise invalid(str(e)) from None
        return Reply.json(201, {"fault": fault.to_json()})

    def clear_faults(self, exchange: Exchange, match: re.Match[str]) -> Reply:
        """C{DELETE /_sandbox/faults}: remove every pending fault."""
        require_loopback(exchange.client_host())
        return Reply.json(200, {"deleted": self.faults.clear()})
