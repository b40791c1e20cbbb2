"""
Builders for the API client's tests (L{poststack_relay.api}): a valid
C{POST /emails} request, one with a large attachment, and resources that
record or script what the client sees behind C{treq.testing.StubTreq}.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
from treq.testing import StringStubbingResource
from twisted.web.resource import Resource
from twisted.web.server import Request

from poststack_relay.api import STREAM_MIN_CONTENT
from poststack_relay.idempotency import IDEMPOTENCY_CLIENT, IDEMPOTENCY_RANDOM, random_idempotency_key
from poststack_relay.translate import EmailRequest

__all__ = ["BASE", "Recorder", "Seen", "attachment_email", "email", "scripted"]

#: The API's base URL behind StubTreq (never resolved).
BASE = "http://sandbox.invalid"


def email(**changes: Any) -> EmailRequest:
    """
    A valid C{POST /emails} request, its idempotency key decided as
    delivery decides it: C{idempotency_key} sets the client's own key,
    else the message gets a random one (as a message with neither a key
    nor a Message-ID does).  Other C{changes} edit the payload (C{None}
    deletes a field).
    """
    payload: dict[str, Any] = {
        "from": "You <you@yourdomain.com>",
        "to": ["user@example.com"],
        "subject": "Hello",
        "text": "Hello there",
    }
    idempotency_key = changes.pop("idempotency_key", None)
    kind = IDEMPOTENCY_CLIENT if idempotency_key is not None else IDEMPOTENCY_RANDOM
    if idempotency_key is None:
        idempotency_key = random_idempotency_key()
    for name, value in changes.items():
        if value is None:
            payload.pop(name, None)
        else:
            payload[name] = value
    payload["idempotency_key"] = idempotency_key
    return EmailRequest(payload=payload, idempotency_key=idempotency_key, idempotency_kind=kind)


def attachment_email(size: int = STREAM_MIN_CONTENT + 4096) -> EmailRequest:
    """An email with one base64 attachment of C{size} characters (streamed when large)."""
    content = "QUJD" * (size // 4)
    return email(attachments=[{"filename": "a.bin", "content": content}])


@attrs.define
class Seen:
    """One request a L{Recorder} saw."""

    method: bytes
    path: bytes
    headers: dict[bytes, list[bytes]]
    body: bytes


class Recorder(Resource):
    """
    A leaf resource that records each request, then lets C{inner} answer.
    """

    isLeaf = True

    def __init__(self, inner: Resource) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[Seen] = []

    def render(self, request: Request) -> Any:
        content = request.content
        body = b""
        if content is not None:
            content.seek(0)
            body = content.read()
            content.seek(0)
        self.seen.append(
            Seen(
                request.method,
                request.path,
                {k.lower(): list(v) for k, v in request.requestHeaders.getAllRawHeaders()},
                body,
            )
        )
        return self.inner.render(request)


def scripted(
    status: int, body: bytes, headers: Optional[dict[bytes, bytes]] = None
) -> tuple[StringStubbingResource, list[tuple[bytes, str]]]:
    """
    A resource answering every request with C{status}/C{body}, and the
    list of (method, url) it was called with.
    """
    calls: list[tuple[bytes, str]] = []

    def answer(
        method: bytes, url: str, params: Any, request_headers: Any, data: bytes
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        calls.append((method, url))
        return status, dict(headers or {b"content-type": b"application/json"}), body

    return StringStubbingResource(answer), calls
