# -*- test-case-name: tests.test_api -*-
"""
The PostStack API as the relay sees it: an interface, and its HTTP client.

L{IEmailAPI} is the seam between the SMTP side and the network.
L{HTTPEmailAPI} implements it with treq over a persistent connection pool;
L{poststack_relay.testing.MemoryEmailAPI} implements it in memory.

Every failed send becomes an L{APIError} that carries the SMTP reply the
client should hear (see L{reply_for_status} and C{docs/replies.md});
nothing here ever puts a key in an exception, a reply or a log event.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable, Mapping, Optional

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, ConnectionClosed, DNSLookupError, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
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

_NETWORK_ERRORS = (
    ConnectError,
    ConnectionClosed,
    DNSLookupError,
    TimeoutError,
    ResponseFailed,
    ResponseNeverReceived,
    RequestTransmissionFailed,
    OSError,
)


class APIUnavailable(Exception):
    """
    The API could not give an answer (network error, time-out, 5xx, 429, or
    the relay's own service key was refused): the caller should answer with
    a temporary failure.  The optional argument is a short reason for logs;
    it never holds a key.
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


def _redact(text: str, secrets: Iterable[Optional[str]]) -> str:
    """
    C{text} with every occurrence of each (non-empty) secret replaced.
    """
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, "[redacted]")
    return text


def _error_text(
    body: Any, status: int, redact: Iterable[Optional[str]] = ()
) -> tuple[str, Optional[str]]:
    """
    The API's own message and code from an error body, if it has them.
    Secrets in C{redact} are removed before the text is shortened, so no
    part of one can survive.
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
    return clean_text(_redact(message, redact), 200), code


def reply_for_status(
    status: int,
    body: Any,
    retry_after: Optional[str] = None,
    redact: Iterable[Optional[str]] = (),
) -> Reply:
    """
    Map an API error response to the SMTP reply (the table in
    C{docs/replies.md}).

    @param status: the HTTP status (not 2xx).
    @param body: the decoded JSON body, or C{None}.
    @param retry_after: the C{Retry-After} header, if any.
    @param redact: secrets (the API key) to blank out of the API's message
        should it ever echo them.
    """
    message, code = _error_text(body, status, redact)
    said = f"PostStack API: {message}"
    if status in (400, 404, 422):
        return Reply(554, "5.6.0", f"{said} (HTTP {status})")
    if status == 401:
        # Not 535: RFC 4954 defines 535 for the AUTH command only, and the
        # replies RFC 5321 (4.3.2) allows after DATA are 250/450/451/452/
        # 550/552/554.  5.7.8 still says "credentials invalid".
        return Reply(
            554, "5.7.8", f"{said}: the API key was rejected; check that it is valid and not revoked"
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
    "PostStack API answered without an email id; the email may have been accepted, "
    "try again later",
)
_BAD_ANSWER_IDEMPOTENT = (
    " (its X-PostStack-Idempotency-Key prevents a second send)"
)
_BAD_ANSWER_NO_KEY = (
    " (set X-PostStack-Idempotency-Key so that a retry cannot send it twice)"
)
REPLY_SERVICE_KEY_REJECTED = Reply(
    451,
    "4.3.5",
    "Relay misconfigured: PostStack rejected the relay's service key; "
    "the message was not sent, try again later",
)
REPLY_CLIENT_ERROR = Reply(
    451, "4.3.0", "PostStack API request failed unexpectedly, try again later"
)
REPLY_NOT_ENCODABLE = Reply(554, "5.6.0", "Message could not be converted to an API request")

# Words by which a 401/403 from POST /mailboxes/authenticate blames the
# bearer key (the relay's service key) rather than the mailbox credentials.
_BLAMES_KEY = re.compile(r"\b(?:api|service)[ _-]?key\b|\bbearer\b|\bauthorization\b", re.I)


def _blames_bearer_key(body: Any) -> Optional[bool]:
    """
    Does a 401/403 answer of C{POST /mailboxes/authenticate} refuse the
    relay's own bearer key (C{True}) or the mailbox login (C{False})?
    C{None} when the body is not an API error at all (no JSON message).

    The rule: both kinds share the status and the code (C{unauthorized},
    C{forbidden}), so only the message tells them apart.  The API (and the
    sandbox) words every bearer-key refusal around the key - "Invalid API
    key", "Missing API key", "Authorization must be 'Bearer <api key>'",
    "This API key may not authenticate mailboxes" - and mailbox refusals
    around the mailbox - "Invalid email or password", "Mailbox is
    suspended".  So a message naming an API/service key, the bearer or the
    Authorization header blames the key; any other message is about the
    mailbox.
    """
    if not isinstance(body, dict):
        return None
    m = body.get("error") or body.get("message")
    if isinstance(m, dict):
        m = m.get("message")
    if not isinstance(m, str) or not m.strip():
        return None
    return _BLAMES_KEY.search(m) is not None


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
    @param timeout: seconds one request may take, from sending it to the
        last byte of the answer.
    @param service_key: the relay's key for mailbox logins, or C{None}.
    @param clock: the clock the time-out runs on; the global reactor if
        C{None}.
    """

    def __init__(
        self,
        client: Any,
        base_url: str,
        timeout: float,
        service_key: Optional[str] = None,
        clock: Optional[IReactorTime] = None,
    ) -> None:
        self._client = client
        base = base_url.rstrip("/")
        self._emails_url = base + "/emails"
        self._check_url = base + "/emails?per_page=1"
        self._mailbox_url = base + "/mailboxes/authenticate"
        self._timeout = timeout
        self._service_key = service_key
        self._clock = clock

    def _headers(self, api_key: str, idempotency_key: Optional[str] = None) -> dict[bytes, list[bytes]]:
        headers = {
            b"Authorization": [b"Bearer " + api_key.encode("ascii", "replace")],
            b"User-Agent": [USER_AGENT.encode("ascii")],
            b"Accept": [b"application/json"],
        }
        if idempotency_key is not None:
            headers[b"Idempotency-Key"] = [idempotency_key.encode("utf-8")]
        return headers

    def _get_clock(self) -> IReactorTime:
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor  # type: ignore[assignment]
        assert self._clock is not None
        return self._clock

    async def _exchange(
        self, method: str, url: str, headers: Mapping[bytes, list[bytes]], data: Optional[bytes]
    ) -> tuple[Any, bytes]:
        response = await self._client.request(
            method, url, headers=headers, data=data, allow_redirects=False
        )
        content = await response.content()
        return response, content

    async def _request(
        self, method: str, path: str, url: str, headers: Mapping[bytes, list[bytes]],
        data: Optional[bytes],
    ) -> tuple[int, Any, Any]:
        """
        One request: (status, decoded JSON body or None, response).
        Raises L{APIError} with a 451 reply when no complete response
        arrives in time.

        The time-out is ours, not treq's: treq's C{timeout=} runs on the
        global reactor (unless given C{reactor=}) and only covers the wait
        for the response headers, while a body that trickles in must not
        hold an SMTP session forever either.
        """
        if data is not None:
            headers = dict(headers)
            headers[b"Content-Type"] = [b"application/json"]
        attempt = Deferred.fromCoroutine(self._exchange(method, url, headers, data))
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            attempt.cancel()

        timer = self._get_clock().callLater(self._timeout, expire)
        try:
            response, content = await attempt
        except Exception as e:
            if expired or isinstance(e, CancelledError):
                _log.warn(
                    "PostStack API {method} {path} timed out after {timeout}s",
                    method=method,
                    path=path,
                    timeout=self._timeout,
                    event="api_timeout",
                )
                raise APIError(REPLY_TIMEOUT) from None
            if isinstance(e, _NETWORK_ERRORS):
                _log.warn(
                    "PostStack API {method} {path} failed: {error}",
                    method=method,
                    path=path,
                    error=e.__class__.__name__,
                    event="api_network_error",
                )
                raise APIError(REPLY_NO_ANSWER) from None
            # Only the class name: an exception's text could quote a header.
            _log.error(
                "PostStack API {method} {path} failed unexpectedly: {error}",
                method=method,
                path=path,
                error=e.__class__.__name__,
                event="api_client_error",
            )
            raise APIError(REPLY_CLIENT_ERROR) from None
        finally:
            if timer.active():
                timer.cancel()
        return response.code, _json_body(content), response

    def check_api_key(self, api_key: str) -> "Deferred[bool]":
        """
        See L{IEmailAPI.check_api_key}: C{GET /emails?per_page=1} with the
        key; 200 is valid, 401/403 invalid, anything else unavailable.
        """

        async def check() -> bool:
            try:
                status, _, _ = await self._request(
                    "GET", "/emails", self._check_url, self._headers(api_key), None
                )
            except APIError:
                raise APIUnavailable("no answer") from None
            if status == 200:
                return True
            if status in (401, 403):
                return False
            _log.warn(
                "PostStack API key check answered HTTP {status}",
                status=status,
                event="api_key_check_unavailable",
            )
            raise APIUnavailable(f"HTTP {status}")

        return Deferred.fromCoroutine(check())

    def authenticate_mailbox(self, email: str, password: str) -> "Deferred[Optional[str]]":
        """
        See L{IEmailAPI.authenticate_mailbox}: C{POST /mailboxes/authenticate}
        with the service key.  A 401/403 that refuses the service key itself
        (see L{_blames_bearer_key}) is the operator's problem, not the
        user's: it is logged as an error and fails with L{APIUnavailable},
        so the user hears a temporary 454 rather than a misleading 535.
        """

        async def check() -> Optional[str]:
            if self._service_key is None:
                return None
            data = json.dumps({"email": email, "password": password}).encode("utf-8")
            try:
                status, body, _ = await self._request(
                    "POST",
                    "/mailboxes/authenticate",
                    self._mailbox_url,
                    self._headers(self._service_key),
                    data,
                )
            except APIError:
                raise APIUnavailable("no answer") from None
            if status == 200:
                mailbox = body.get("mailbox") if isinstance(body, dict) else None
                if not isinstance(mailbox, dict):
                    _log.warn(
                        "PostStack mailbox check answered 200 without a mailbox",
                        event="api_mailbox_bad_answer",
                    )
                    raise APIUnavailable("200 without a mailbox")
                if mailbox.get("status", "active") == "active":
                    address = mailbox.get("email_address")
                    return address if isinstance(address, str) and address else email
                return None
            if status in (401, 403):
                blames_key = _blames_bearer_key(body)
                if blames_key is False:
                    return None
                message, code = _error_text(body, status, (self._service_key, password))
                if blames_key:
                    _log.error(
                        "PostStack refused the relay's service key for mailbox logins "
                        "(HTTP {status} {code}: {api_message}); mailbox users cannot log "
                        "in until the service key setting is fixed",
                        status=status,
                        code=code,
                        api_message=message,
                        event="api_service_key_rejected",
                    )
                    raise APIUnavailable(f"service key refused (HTTP {status})")
                _log.warn(
                    "PostStack mailbox check answered HTTP {status} without an API error body",
                    status=status,
                    event="api_mailbox_bad_answer",
                )
                raise APIUnavailable(f"HTTP {status} without an error message")
            if status == 404:
                return None
            _log.warn(
                "PostStack mailbox check answered HTTP {status}",
                status=status,
                event="api_mailbox_unavailable",
            )
            raise APIUnavailable(f"HTTP {status}")

        return Deferred.fromCoroutine(check())

    def send_email(self, api_key: str, request: EmailRequest) -> "Deferred[str]":
        """
        See L{IEmailAPI.send_email}: C{POST /emails}; the idempotency key,
        if any, also goes in the C{Idempotency-Key} header.
        """

        async def send() -> str:
            try:
                data = json.dumps(
                    request.payload, ensure_ascii=False, separators=(",", ":")
                ).encode("utf-8")
            except (TypeError, ValueError, UnicodeEncodeError):
                raise APIError(REPLY_NOT_ENCODABLE) from None
            status, body, response = await self._request(
                "POST",
                "/emails",
                self._emails_url,
                self._headers(api_key, request.idempotency_key),
                data,
            )
            request_id = _first_header(response, b"x-request-id")
            if 200 <= status < 300:
                email_id = body.get("id") if isinstance(body, dict) else None
                if isinstance(email_id, str) and email_id:
                    return email_id
                _log.warn(
                    "PostStack API answered HTTP {status} without an email id "
                    "(request id {request_id})",
                    status=status,
                    request_id=request_id,
                    event="api_bad_answer",
                )
                hint = _BAD_ANSWER_IDEMPOTENT if request.idempotency_key else _BAD_ANSWER_NO_KEY
                raise APIError(
                    REPLY_BAD_ANSWER.with_text(REPLY_BAD_ANSWER.text + hint),
                    status=status,
                    request_id=request_id,
                )
            code = None
            if isinstance(body, dict) and isinstance(body.get("code"), str):
                code = body["code"]
            if status == 401 and self._service_key is not None and api_key == self._service_key:
                message, _ = _error_text(body, status, (api_key,))
                _log.error(
                    "PostStack refused the relay's service key when sending for a mailbox "
                    "(HTTP 401: {api_message}, request id {request_id}); fix the service "
                    "key setting",
                    api_message=message,
                    request_id=request_id,
                    event="api_service_key_rejected",
                )
                raise APIError(
                    REPLY_SERVICE_KEY_REJECTED, status=status, code=code, request_id=request_id
                )
            reply = reply_for_status(
                status, body, _first_header(response, b"retry-after"), (api_key,)
            )
            raise APIError(reply, status=status, code=code, request_id=request_id)

        return Deferred.fromCoroutine(send())
