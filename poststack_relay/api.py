# -*- test-case-name: tests.test_api -*-
"""
The PostStack API as the relay sees it: an interface, and its HTTP client.

L{IEmailAPI} is the seam between the SMTP side and the network.
L{HTTPEmailAPI} implements it with treq over a persistent connection pool;
L{poststack_relay.testing.MemoryEmailAPI} implements it in memory.

Every failure becomes an L{APIError} that carries the SMTP reply the client
should hear (see L{reply_for_status}); nothing here ever puts a key in an
exception, a reply or a log line.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.logger import Logger
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from zope.interface import Interface, implementer

from ._version import __version__
from .replies import Reply, clean_text
from .translate import EmailRequest

_log = Logger()

USER_AGENT = f"poststack-relay/{__version__}"

QUOTA_CODES = frozenset(
    {
        "quota_exceeded",
        "monthly_limit_exceeded",
        "daily_limit_exceeded",
        "daily_cap_exceeded",
        "send_limit_exceeded",
    }
)


class APIUnavailable(Exception):
    """
    The API could not give an answer (network error, time-out, 5xx, 429):
    the caller should answer with a temporary failure.
    """


@attrs.define
class APIError(Exception):
    """
    A send that did not end with an email id.

    @ivar reply: the SMTP reply for the client.
    @ivar status: the HTTP status, or C{None} if no response arrived.
    @ivar code: the API's machine code (C{"unprocessable_entity"}, ...).
    @ivar request_id: the API's C{x-request-id}, for support.
    """

    reply: Reply
    status: Optional[int] = None
    code: Optional[str] = None
    request_id: Optional[str] = None

    def __str__(self) -> str:
        return f"{self.reply.code} {self.reply.enhanced} {self.reply.text}"


class IEmailAPI(Interface):
    """
    What the relay needs from PostStack.
    """

    def check_api_key(api_key: str) -> "Deferred[bool]":
        """
        Is this API key valid?  Fires C{True}/C{False}; fails with
        L{APIUnavailable} when the API cannot tell.
        """

    def authenticate_mailbox(email: str, password: str) -> "Deferred[Optional[str]]":
        """
        Check a mailbox login with the relay's service key.  Fires with the
        mailbox's own address, or C{None} for bad credentials; fails with
        L{APIUnavailable} when the API cannot tell.
        """

    def send_email(api_key: str, request: EmailRequest) -> "Deferred[str]":
        """
        C{POST /emails}.  Fires with the new email's id; fails with
        L{APIError} carrying the SMTP reply.
        """


def _error_text(body: Any, status: int) -> tuple[str, Optional[str]]:
    """
    The API's own message and code from an error body, if it has them.
    """
    message: Optional[str] = None
    code: Optional[str] = None
    if isinstance(body, dict):
        m = body.get("error") or body.get("message")
        if isinstance(m, dict):  # {"error": {"message": ..., "code": ...}}
            code = m.get("code") if isinstance(m.get("code"), str) else None
            m = m.get("message")
        if isinstance(m, str):
            message = m
        c = body.get("code")
        if isinstance(c, str):
            code = c
    if not message:
        message = f"HTTP {status}"
    return clean_text(message, 200), code


def reply_for_status(
    status: int,
    body: Any,
    retry_after: Optional[str] = None,
) -> Reply:
    """
    Map an API error response to the SMTP reply (the table in
    C{docs/replies.md}).

    @param status: the HTTP status (not 2xx).
    @param body: the decoded JSON body, or C{None}.
    @param retry_after: the C{Retry-After} header, if any.
    """
    message, code = _error_text(body, status)
    said = f"PostStack API: {message}"
    if status in (400, 404, 422):
        return Reply(554, "5.6.0", f"{said} (HTTP {status})")
    if status == 401:
        return Reply(
            535, "5.7.8", f"{said}: the API key was rejected; check that it is valid and not revoked"
        )
    if status == 403:
        return Reply(550, "5.7.1", f"{said} (not permitted for this key or sender domain)")
    if status == 409:
        return Reply(
            554,
            "5.6.0",
            f"{said}: this idempotency key was already used for a different message",
        )
    if status == 413:
        return Reply(552, "5.3.4", f"{said}: message too large for the API")
    if status == 429:
        if code in QUOTA_CODES:
            return Reply(
                451,
                "4.7.0",
                f"{said}: PostStack sending quota reached ({code}); "
                "waiting seconds will not help, raise the quota or wait for it to reset",
            )
        hint = ""
        if retry_after and retry_after.strip().isdigit():
            hint = f", retry-after={int(retry_after.strip())}s"
        return Reply(451, "4.7.0", f"PostStack rate limit reached{hint}")
    if status >= 500:
        return Reply(451, "4.3.0", f"{said}: temporary API failure, try again later")
    # Anything else (3xx, 408, other 4xx) is not part of the contract: a
    # temporary failure is the answer that can never lose a message.
    return Reply(451, "4.3.0", f"{said}: unexpected API answer, try again later")


REPLY_NO_ANSWER = Reply(
    451, "4.4.1", "PostStack API unreachable: no answer, try again later"
)
REPLY_TIMEOUT = Reply(451, "4.4.2", "PostStack API did not answer in time, try again later")
REPLY_BAD_ANSWER = Reply(
    451,
    "4.3.0",
    "PostStack API answered without an email id; try again later "
    "(the idempotency key prevents a second send)",
)


def _json_body(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


def _first_header(response: Any, name: bytes) -> Optional[str]:
    values = response.headers.getRawHeaders(name)
    if not values:
        return None
    value = values[0]
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


@implementer(IEmailAPI)
class HTTPEmailAPI:
    """
    L{IEmailAPI} over HTTP with treq.

    @param client: a C{treq.client.HTTPClient} (or C{treq.testing.StubTreq}),
        ideally over a persistent C{HTTPConnectionPool}.
    @param base_url: the API's base URL, without a trailing slash.
    @param timeout: seconds one request may take.
    @param service_key: the relay's key for mailbox logins, or C{None}.
    """

    def __init__(
        self,
        client: Any,
        base_url: str,
        timeout: float,
        service_key: Optional[str] = None,
    ) -> None:
        self._client = client
        base = base_url.rstrip("/")
        self._emails_url = base + "/emails"
        self._check_url = base + "/emails?per_page=1"
        self._mailbox_url = base + "/mailboxes/authenticate"
        self._timeout = timeout
        self._service_key = service_key

    def _headers(self, api_key: str, idempotency_key: Optional[str] = None) -> dict[bytes, list[bytes]]:
        headers = {
            b"Authorization": [b"Bearer " + api_key.encode("ascii", "replace")],
            b"User-Agent": [USER_AGENT.encode("ascii")],
            b"Accept": [b"application/json"],
        }
        if idempotency_key is not None:
            headers[b"Idempotency-Key"] = [idempotency_key.encode("utf-8")]
        return headers

    async def _request(
        self, method: str, url: str, headers: Mapping[bytes, list[bytes]], data: Optional[bytes]
    ) -> tuple[int, Any, Any]:
        """
        One request: (status, decoded JSON body or None, response).
        Raises L{APIError} with a 451 reply when no response arrives.
        """
        if data is not None:
            headers = dict(headers)
            headers[b"Content-Type"] = [b"application/json"]
        try:
            response = await self._client.request(
                method,
                url,
                headers=headers,
                data=data,
                timeout=self._timeout,
                allow_redirects=False,
            )
            content = await response.content()
        except CancelledError:
            raise APIError(REPLY_TIMEOUT) from None
        except (
            ConnectError,
            DNSLookupError,
            TimeoutError,
            ResponseFailed,
            ResponseNeverReceived,
            OSError,
        ) as e:
            _log.warn(
                "PostStack API request failed: {error}",
                error=e.__class__.__name__,
                event="api_network_error",
            )
            raise APIError(REPLY_NO_ANSWER) from None
        return response.code, _json_body(content), response

    async def _check(self, coro: Any) -> int:
        try:
            status, _, _ = await coro
        except APIError:
            raise APIUnavailable() from None
        return status

    def check_api_key(self, api_key: str) -> "Deferred[bool]":
        async def check() -> bool:
            status = await self._check(
                self._request("GET", self._check_url, self._headers(api_key), None)
            )
            if status == 200:
                return True
            if status in (401, 403):
                return False
            raise APIUnavailable()

        return Deferred.fromCoroutine(check())

    def authenticate_mailbox(self, email: str, password: str) -> "Deferred[Optional[str]]":
        async def check() -> Optional[str]:
            if self._service_key is None:
                return None
            data = json.dumps({"email": email, "password": password}).encode("utf-8")
            try:
                status, body, _ = await self._request(
                    "POST", self._mailbox_url, self._headers(self._service_key), data
                )
            except APIError:
                raise APIUnavailable() from None
            if status == 200:
                mailbox = body.get("mailbox") if isinstance(body, dict) else None
                if isinstance(mailbox, dict) and mailbox.get("status", "active") == "active":
                    address = mailbox.get("email_address")
                    return address if isinstance(address, str) and address else email
                return None
            if status in (401, 403, 404):
                return None
            raise APIUnavailable()

        return Deferred.fromCoroutine(check())

    def send_email(self, api_key: str, request: EmailRequest) -> "Deferred[str]":
        async def send() -> str:
            try:
                data = json.dumps(
                    request.payload, ensure_ascii=False, separators=(",", ":")
                ).encode("utf-8")
            except (TypeError, ValueError, UnicodeEncodeError):
                raise APIError(
                    Reply(554, "5.6.0", "Message could not be converted to an API request")
                ) from None
            status, body, response = await self._request(
                "POST", self._emails_url, self._headers(api_key, request.idempotency_key), data
            )
            request_id = _first_header(response, b"x-request-id")
            if 200 <= status < 300:
                email_id = body.get("id") if isinstance(body, dict) else None
                if isinstance(email_id, str) and email_id:
                    return email_id
                raise APIError(REPLY_BAD_ANSWER, status=status, request_id=request_id)
            reply = reply_for_status(status, body, _first_header(response, b"retry-after"))
            code = None
            if isinstance(body, dict) and isinstance(body.get("code"), str):
                code = body["code"]
            raise APIError(reply, status=status, code=code, request_id=request_id)

        return Deferred.fromCoroutine(send())
