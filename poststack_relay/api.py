# -*- test-case-name: tests.test_api,tests.test_metrics -*-
"""
The PostStack API as the relay sees it: an interface, and its HTTP client.

L{IEmailAPI} is the seam between the SMTP side and the network.
L{HTTPEmailAPI} implements it over the relay's own small HTTP/1.1 client
(L{poststack_relay.http11.HTTP11Client}, keep-alive connections), a Twisted
web agent, or a treq client (tests use treq's C{StubTreq});
L{poststack_relay.testing.MemoryEmailAPI} implements it in memory.

Every failed send becomes an L{APIError} that carries the SMTP reply the
client should hear (see L{reply_for_status} and C{docs/replies.md});
nothing here ever puts a key in an exception, a reply or a log event.

L{HTTPEmailAPI} also protects both sides: it retries transient failures
within a per-message deadline with one idempotency key per message, bounds
the requests in flight (L{RequestSlots}), and fails fast while the API is
known to be down (L{CircuitBreaker}).  C{docs/replies.md}, "Retries", has
the rules.
"""

from __future__ import annotations

import json
import math
import random
import re
import uuid
from collections import deque
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Any, Iterable, Mapping, Optional

import attrs
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import (
    ConnectError,
    ConnectionClosed,
    DNSLookupError,
    TimeoutError,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer

from ._version import __version__
from .config import (
    DEFAULT_API_BREAKER_COOLDOWN,
    DEFAULT_API_BREAKER_FAILURES,
    DEFAULT_API_DEADLINE,
    DEFAULT_API_MAX_IN_FLIGHT,
    DEFAULT_API_QUEUE_TIMEOUT,
)
from .http11 import STREAM_MIN_CONTENT, HTTP11Client, _PiecesProducer
from .metrics import RelayMetrics, UpstreamMetrics
from .replies import Reply, clean_text
from .interfaces import IEmailAPI
from .translate import EmailRequest

_log = Logger()

USER_AGENT = f"poststack-relay/{__version__}"

DEFAULT_MAX_ATTEMPTS = 8
"""Most requests for one message (the deadline usually ends retries first)."""
DEFAULT_BACKOFF_BASE = 0.25
"""Seconds: the first retry waits up to this long (full jitter), then it doubles."""
DEFAULT_BACKOFF_CAP = 5.0
"""Seconds: the most one back-off wait grows to (C{Retry-After} may ask for more)."""

_DIGITS = re.compile(r"[0-9]{1,9}")

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
    The API could not give an answer (network error, time-out, 5xx, 429, the
    circuit breaker is open, no request slot came free, or the relay's own
    service key was refused): the caller should answer with a temporary
    failure.  The optional argument is a short reason for logs;
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
        if retry_after and _DIGITS.fullmatch(retry_after.strip()):
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
    " (its idempotency key prevents a second send if the same message is sent again)"
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


def parse_retry_after(value: Optional[str], now: float) -> Optional[float]:
    """
    The seconds a C{Retry-After} header asks to wait: either delay-seconds
    (C{"3"}) or an HTTP date, counted from C{now} (POSIX seconds).

    @return: seconds (never negative), or C{None} if the header is absent
        or is neither form.
    """
    if value is None:
        return None
    value = value.strip()
    if _DIGITS.fullmatch(value):
        return float(int(value))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now)


# ---------------------------------------------------------------------------
# Protecting the API: request slots and the circuit breaker

REPLY_BUSY = Reply(
    451,
    "4.3.2",
    "PostStack relay busy: too many messages waiting for the API, try again later",
)
REPLY_API_DOWN = Reply(
    451,
    "4.3.0",
    "PostStack API temporarily unavailable after repeated failures, try again later",
)


class _NoSlot(Exception):
    """
    No request slot became free in time.
    """


class RequestSlots:
    """
    A counting semaphore for API requests, with timed, first-come
    first-served waits.

    At most C{limit} slots are held at once.  A released slot goes straight
    to the longest waiter.  A waiter whose time runs out, or whose Deferred
    is cancelled, leaves the queue and never takes a slot.

    @ivar limit: the most slots held at once.
    @ivar held: slots held now.
    """

    def __init__(self, limit: int, clock: IReactorTime) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self.limit = limit
        self.held = 0
        self._clock = clock
        self._waiting: deque[tuple["Deferred[None]", IDelayedCall]] = deque()

    @property
    def waiting(self) -> int:
        """
        How many acquirers are queued.
        """
        return len(self._waiting)

    def acquire(self, timeout: float) -> "Deferred[None]":
        """
        Take a slot: fires with C{None} once one is held, or fails with
        C{_NoSlot} after C{timeout} seconds.  Cancelling the Deferred
        leaves the queue.  Every success must be paired with L{release}.
        """
        if self.held < self.limit and not self._waiting:
            self.held += 1
            return succeed(None)
        if timeout <= 0:
            return fail(_NoSlot())

        def cancel(d: "Deferred[None]") -> None:
            self._forget(d)

        waiter: Deferred[None] = Deferred(cancel)

        def expire() -> None:
            if self._forget(waiter):
                waiter.errback(_NoSlot())

        self._waiting.append((waiter, self._clock.callLater(timeout, expire)))
        return waiter

    def _forget(self, waiter: "Deferred[None]") -> bool:
        for entry in self._waiting:
            if entry[0] is waiter:
                self._waiting.remove(entry)
                if entry[1].active():
                    entry[1].cancel()
                return True
        return False

    def release(self) -> None:
        """
        Give a slot back: to the first waiter, if any.
        """
        if self._waiting:
            waiter, timer = self._waiting.popleft()
            if timer.active():
                timer.cancel()
            waiter.callback(None)  # the slot passes on; held is unchanged
        else:
            self.held -= 1


class CircuitBreaker:
    """
    Fail fast while the API is known to be down.

    Closed: requests go through; C{threshold} consecutive transient
    failures (no answer, a full-length time-out, a 5xx) open it.  Open:
    every request is refused for C{cooldown} seconds.  Then half-open: one
    request (the probe) goes through and the others are still refused; if
    the probe gets an answer the breaker closes, if it fails the breaker
    opens again.  Any answer that is not a 5xx (a 2xx, a 4xx, a 429)
    closes the breaker and resets the count, wherever it comes from.

    One event is logged when the breaker opens (C{api_breaker_open}) and
    one when it closes again (C{api_breaker_closed}); re-opening after a
    failed probe logs at debug level only.

    @ivar state: C{"closed"}, C{"open"} or C{"half-open"}.
    @ivar failures: the consecutive transient failures counted.
    """

    def __init__(self, threshold: int, cooldown: float, clock: IReactorTime) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.state = "closed"
        self.failures = 0
        self._clock = clock
        self._open_until = 0.0
        self._opened_at = 0.0
        self._probing = False

    def refuses(self) -> bool:
        """
        Would a request be refused now?  (Changes nothing.)
        """
        if self.state == "closed":
            return False
        if self.state == "open" and self._clock.seconds() < self._open_until:
            return True
        return self._probing

    def admit(self) -> Optional[bool]:
        """
        Let a request through: C{None} if refused, C{True} if it is the
        half-open probe, C{False} otherwise.  Every admitted request must
        be followed by one L{record} with the same C{probe} value.
        """
        if self.state == "closed":
            return False
        if self.state == "open":
            if self._clock.seconds() < self._open_until:
                return None
            self.state = "half-open"
        if self._probing:
            return None
        self._probing = True
        return True

    def record(self, probe: bool, outcome: str) -> None:
        """
        The end of an admitted request: C{"success"} (an answer that is not
        a 5xx), C{"failure"} (a transient failure) or C{"inconclusive"}
        (cancelled, or a time-out cut short by the message's deadline).
        """
        if probe:
            self._probing = False
        if outcome == "success":
            self.failures = 0
            if self.state != "closed":
                self.state = "closed"
                _log.info(
                    "PostStack API answers again; circuit breaker closed after {outage}s",
                    outage=round(self._clock.seconds() - self._opened_at, 1),
                    event="api_breaker_closed",
                )
        elif outcome == "failure":
            if self.state == "closed":
                self.failures += 1
                if self.threshold and self.failures >= self.threshold:
                    self._opened_at = self._clock.seconds()
                    self._open()
                    _log.warn(
                        "PostStack API failed {failures} times in a row; circuit breaker "
                        "open: messages fail at once with 451 for {cooldown}s, then one "
                        "request probes the API",
                        failures=self.failures,
                        cooldown=self.cooldown,
                        event="api_breaker_open",
                    )
            elif probe:
                self._open()
                _log.debug(
                    "PostStack API probe failed; circuit breaker open for {cooldown}s more",
                    cooldown=self.cooldown,
                    event="api_breaker_probe_failed",
                )

    def _open(self) -> None:
        self.state = "open"
        self._open_until = self._clock.seconds() + self.cooldown


# ---------------------------------------------------------------------------
# The HTTP client


class _Refused(Exception):
    """
    No request was made: C{"busy"} (no slot in time) or C{"breaker"}.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _AttemptError(Exception):
    """
    One attempt ended without an HTTP answer.

    @ivar kind: C{"timeout"}, C{"network"} or C{"client"} (unexpected).
    @ivar error: the exception's class name (never its text).
    @ivar reply: the SMTP reply should this be the last attempt.
    @ivar timeout: the attempt's time limit.
    """

    def __init__(self, kind: str, error: str, reply: Reply, timeout: float) -> None:
        super().__init__(kind)
        self.kind = kind
        self.error = error
        self.reply = reply
        self.timeout = timeout


@attrs.frozen
class _Answer:
    """
    The HTTP answer a request ended with, after any retries.

    @ivar retry_after: the answer's C{Retry-After} in seconds, if any.
    @ivar attempts: how many requests were made.
    """

    status: int
    body: Any
    response: Any
    retry_after: Optional[float]
    attempts: int


class _BodyReader(Protocol):
    """
    Collects a response body.  Cancelling its Deferred stops the transport,
    so an abandoned connection is closed rather than left reading (and
    never goes back to the pool).
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.finished: Optional[Deferred[bytes]] = Deferred(self._cancel)

    def _cancel(self, d: "Deferred[bytes]") -> None:
        self.finished = None
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        self._parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        d, self.finished = self.finished, None
        if d is None:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            d.callback(b"".join(self._parts))
        else:
            d.errback(reason)


def _wire_url(url: str) -> bytes:
    """
    C{url} as an agent takes it: ASCII, the host in IDNA, the rest
    percent-encoded (what treq does to every URL, on every request).
    """
    from hyperlink import URL

    return URL.from_text(url).to_uri().to_text().encode("ascii")


@implementer(IAgentEndpointFactory)
class APIEndpoints:
    """
    Where an agent connects for a URI, as Twisted's standard agent does it
    (TCP for C{http}, TLS verified like a browser for C{https}), but one
    endpoint per scheme, host and port, made once: the standard factory
    builds a new C{HostnameEndpoint} (and IDNA-encodes the host) for every
    request, even when the pool then reuses a connection.

    @param reactor: what the endpoints connect with.
    @param connect_timeout: seconds a new connection may take.
    """

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._policy = BrowserLikePolicyForHTTPS()
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        """The endpoint for C{uri} (an agent's parsed C{URI})."""
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if uri.scheme not in (b"http", b"https"):
                raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")
            endpoint = HostnameEndpoint(
                self._reactor, uri.host.decode("ascii"), uri.port, timeout=self._connect_timeout
            )
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), endpoint)
            if len(self._endpoints) < 16:  # one API host in practice
                self._endpoints[key] = endpoint
        return endpoint


_BASE64_TEXT = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


def _is_base64_text(text: str) -> bool:
    """Only base64 characters (so it stands in JSON as it is), checked a slice at a time."""
    if not text.isascii():
        return False
    step = 1024 * 1024
    return not any(
        text[i : i + step].encode("ascii").translate(None, _BASE64_TEXT)
        for i in range(0, len(text), step)
    )


def json_body(payload: Mapping[str, Any]) -> "bytes | list[bytes | str]":
    """
    The JSON request body of C{payload}: bytes, or for a payload with large
    attachments, a list of pieces: UTF-8 bytes of JSON text, and between
    them the attachments' base64 contents as the very C{str} objects of the
    payload, written a slice at a time by L{_PiecesProducer}.  Joined, the
    pieces are exactly the bytes of the plain encoding; but a 10 MB
    attachment is not copied three more times (into the JSON text, into
    its UTF-8 encoding, into the transport's buffer).

    @raise ValueError: (or C{TypeError}, C{UnicodeEncodeError}) if the
        payload cannot be encoded.
    """
    attachments = payload.get("attachments")
    large: list[str] = []
    if isinstance(attachments, list):
        for attachment in attachments:
            content = attachment.get("content") if isinstance(attachment, dict) else None
            if isinstance(content, str) and len(content) >= STREAM_MIN_CONTENT and _is_base64_text(content):
                large.append(content)
    if not large:
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    marker = "\x00" + uuid.uuid4().hex
    slots: dict[int, int] = {id(content): index for index, content in enumerate(large)}
    stand_in = dict(payload)
    stand_in["attachments"] = [
        dict(a, content=f"{marker}{slots[id(a['content'])]}\x00")
        if isinstance(a, dict) and id(a.get("content")) in slots
        else a
        for a in attachments  # type: ignore[union-attr]
    ]
    text = json.dumps(stand_in, ensure_ascii=False, separators=(",", ":"))
    escaped = json.dumps(marker)[1:-1]  # the marker as it stands in the JSON text
    pieces: list[bytes | str] = []
    rest = text
    while True:
        head, found, rest = rest.partition(escaped)
        pieces.append(head.encode("utf-8"))
        if not found:
            break
        index, _, rest = rest.partition("\\u0000")
        pieces.append(large[int(index)])
    return pieces


def body_bytes(body: "bytes | list[bytes | str]") -> bytes:
    """C{body} as one bytes object."""
    if isinstance(body, bytes):
        return body
    return b"".join(p if isinstance(p, bytes) else p.encode("ascii") for p in body)


def _read_body(response: Any) -> "Deferred[bytes]":
    reader = _BodyReader()
    d = reader.finished
    assert d is not None
    response.deliverBody(reader)
    return d


_MAX_BACKOFF_EXPONENT = 30

# The metrics' "call" label of each API path.
_CALLS = {
    ("POST", "/emails"): "send",
    ("GET", "/emails"): "key_check",
    ("POST", "/mailboxes/authenticate"): "mailbox_check",
}


@implementer(IEmailAPI)
class HTTPEmailAPI:
    """
    L{IEmailAPI} over HTTP, with retries, a bound on requests in flight
    and a circuit breaker (see C{docs/replies.md}, "Retries").

    @param client: an L{HTTP11Client} (the relay's), given the URLs encoded
        once and the body as it is; or an C{IAgent} (such as a
        C{twisted.web.client.Agent} over a persistent
        C{HTTPConnectionPool}), used the same way; or a
        C{treq.client.HTTPClient} (C{treq.testing.StubTreq} in tests), used
        through its C{request}.
    @param base_url: the API's base URL.
    @param timeout: seconds one attempt may take, from sending the request
        to the last byte of the answer.
    @param service_key: the relay's key for mailbox logins, or C{None}.
    @param clock: the clock for time-outs, back-off and the breaker; the
        global reactor if C{None}.
    @param deadline: seconds all attempts for one message may take, queue
        waits and back-off included.  AUTH-time checks get C{timeout} in all.
    @param max_in_flight: most API requests (sends and checks) at once.
    @param queue_timeout: seconds a request may wait for a free slot.
    @param breaker_failures: consecutive transient failures that open the
        circuit breaker; C{0} disables it.
    @param breaker_cooldown: seconds the breaker stays open.
    @param max_attempts: most requests per message (C{1}: no retries).
    @param backoff_base: seconds; the n-th retry waits a random time in
        C{[0, min(backoff_cap, backoff_base * 2**(n-1))]} (full jitter), and
        at least what C{Retry-After} asks.
    @param backoff_cap: see C{backoff_base}.
    @param rng: the random source for the jitter.
    @param metrics: where attempts, retries, requests in flight, the queue
        and the breaker are counted (C{docs/metrics.md}); a private
        L{RelayMetrics} if C{None}.  Its C{upstream_in_flight},
        C{upstream_queue}, C{api_breaker_open} and
        C{api_last_reachable_timestamp_seconds} gauges read this client.

    @ivar last_reachable: clock seconds of the last HTTP answer that was not
        a 5xx (any call, the probe included), or C{None}.
    """

    def __init__(
        self,
        client: Any,
        base_url: str,
        timeout: float,
        service_key: Optional[str] = None,
        clock: Optional[IReactorTime] = None,
        *,
        deadline: float = DEFAULT_API_DEADLINE,
        max_in_flight: int = DEFAULT_API_MAX_IN_FLIGHT,
        queue_timeout: float = DEFAULT_API_QUEUE_TIMEOUT,
        breaker_failures: int = DEFAULT_API_BREAKER_FAILURES,
        breaker_cooldown: float = DEFAULT_API_BREAKER_COOLDOWN,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff_base: float = DEFAULT_BACKOFF_BASE,
        backoff_cap: float = DEFAULT_BACKOFF_CAP,
        rng: Optional[random.Random] = None,
        metrics: Optional[RelayMetrics] = None,
    ) -> None:
        if timeout <= 0 or deadline <= 0 or queue_timeout < 0:
            raise ValueError("timeout and deadline must be positive, queue_timeout not negative")
        if max_attempts < 1 or breaker_failures < 0 or breaker_cooldown < 0:
            raise ValueError(
                "max_attempts must be at least 1, breaker settings not negative"
            )
        if backoff_base < 0 or backoff_cap < 0:
            raise ValueError("back-off settings must not be negative")
        self._client = client
        self._http11: Optional[HTTP11Client] = client if isinstance(client, HTTP11Client) else None
        self._agent: Optional[IAgent] = client if IAgent.providedBy(client) else None
        base = base_url.rstrip("/")
        self._emails_url = base + "/emails"
        self._check_url = base + "/emails?per_page=1"
        self._mailbox_url = base + "/mailboxes/authenticate"
        self._wire_urls = {
            url: _wire_url(url) for url in (self._emails_url, self._check_url, self._mailbox_url)
        }
        self._timeout = timeout
        self._deadline = deadline
        self._service_key = service_key
        self._clock = clock
        self._max_in_flight = max_in_flight
        self._queue_timeout = queue_timeout
        self._breaker_failures = breaker_failures
        self._breaker_cooldown = breaker_cooldown
        self._max_attempts = max_attempts
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._rng = rng if rng is not None else random.Random()
        self._slots_: Optional[RequestSlots] = None
        self._breaker_: Optional[CircuitBreaker] = None
        self.last_reachable: Optional[float] = None
        self.metrics = metrics if metrics is not None else RelayMetrics()
        self._upstream = self.metrics.upstream
        self.metrics.upstream_in_flight.set_function(
            lambda: self._slots_.held if self._slots_ is not None else 0
        )
        self.metrics.upstream_queue.set_function(
            lambda: self._slots_.waiting if self._slots_ is not None else 0
        )
        self.metrics.api_breaker_open.set_function(
            lambda: 0 if self._breaker_ is None or self._breaker_.state == "closed" else 1
        )
        self.metrics.api_last_reachable_timestamp_seconds.set_function(
            lambda: self.last_reachable or 0.0
        )

    def reachable_within(self, seconds: float) -> bool:
        """
        Did the API give an answer that is not a 5xx (to any call, the
        probe included) within the last C{seconds} seconds?
        """
        last = self.last_reachable
        return last is not None and self._get_clock().seconds() - last <= seconds

    def probe(self, timeout: Optional[float] = None) -> "Deferred[bool]":
        """
        One cheap request, C{GET /emails?per_page=1} without a key, to learn
        whether the API answers: fires C{True} for any answer that is not a
        5xx (a 401 is the expected one), C{False} for a 5xx, a network
        error or a time-out.  No retries; the request slots and the
        circuit breaker are bypassed.  Cancelling it cancels the request.

        @param timeout: seconds; the attempt time-out if C{None}.
        """
        headers = {
            b"User-Agent": [USER_AGENT.encode("ascii")],
            b"Accept": [b"application/json"],
        }

        async def probe() -> bool:
            try:
                status, _, _ = await self._request(
                    "GET",
                    self._check_url,
                    headers,
                    None,
                    timeout if timeout is not None else self._timeout,
                    self._upstream["probe"],
                )
            except _AttemptError:
                return False
            return status < 500

        return Deferred.fromCoroutine(probe())

    def _headers(
        self, api_key: str, idempotency_key: Optional[str] = None
    ) -> dict[bytes, list[bytes]]:
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

    @property
    def slots(self) -> RequestSlots:
        """
        The request slots (shared by sends and checks).
        """
        if self._slots_ is None:
            self._slots_ = RequestSlots(self._max_in_flight, self._get_clock())
        return self._slots_

    @property
    def breaker(self) -> CircuitBreaker:
        """
        The circuit breaker (shared by sends and checks).
        """
        if self._breaker_ is None:
            self._breaker_ = CircuitBreaker(
                self._breaker_failures, self._breaker_cooldown, self._get_clock()
            )
        return self._breaker_

    async def _exchange(
        self, method: str, url: str, headers: Mapping[bytes, list[bytes]], data: "Optional[bytes | list[bytes | str]]"
    ) -> tuple[Any, bytes]:
        if self._http11 is not None:
            # The whole answer is read by the client (at most 1 MiB).
            answer = await self._http11.request(
                method.encode("ascii"), self._wire_urls.get(url) or _wire_url(url), headers, data
            )
            return answer, answer.content
        if self._agent is not None:
            # The agent follows no redirects, buffers nothing, and takes
            # the URL as bytes, encoded once per URL (IDNA, percent-encoding).
            response = await self._agent.request(
                method.encode("ascii"),
                self._wire_urls.get(url) or _wire_url(url),
                Headers(headers),
                None if data is None else _PiecesProducer([data] if isinstance(data, bytes) else data),
            )
        else:
            response = await self._client.request(
                method,
                url,
                headers=headers,
                data=None if data is None else body_bytes(data),
                allow_redirects=False,
                unbuffered=True,
            )
        content = await _read_body(response)
        return response, content

    async def _request(
        self,
        method: str,
        url: str,
        headers: Mapping[bytes, list[bytes]],
        data: "Optional[bytes | list[bytes | str]]",
        timeout: float,
        upstream: UpstreamMetrics,
    ) -> tuple[int, Any, Any]:
        """
        One attempt: (status, decoded JSON body or None, response), counted
        in C{upstream} (status and duration).
        Raises L{_AttemptError} when no complete answer arrives in
        C{timeout} seconds; a cancellation from outside stays a
        C{CancelledError}.

        The time-out is ours, not treq's: treq's C{timeout=} only covers the
        wait for the response headers, while a body that trickles in must
        not hold an SMTP session forever either.  When it expires, the
        request is cancelled, which closes its connection (L{HTTP11Client}
        aborts it in any state; with an agent, before the headers Twisted
        aborts it, after them L{_BodyReader} stops it), so a half-used
        connection never returns to the pool.
        """
        if data is not None:
            headers = dict(headers)
            headers[b"Content-Type"] = [b"application/json"]
        attempt = Deferred.fromCoroutine(self._exchange(method, url, headers, data))
        expired: list[bool] = []
        cancelled: list[bool] = []

        def expire() -> None:
            expired.append(True)
            attempt.cancel()

        def cancel(_: object) -> None:
            # Cancelled from outside (the message was abandoned).  What the
            # attempt then fails with (often ResponseNeverReceived) says
            # nothing about the API.
            cancelled.append(True)
            attempt.cancel()

        outcome: Deferred[tuple[Any, bytes]] = Deferred(cancel)
        attempt.chainDeferred(outcome)
        clock = self._get_clock()
        started = clock.seconds()
        timer = clock.callLater(timeout, expire)
        try:
            response, content = await outcome
        except Exception as e:
            name = e.__class__.__name__
            ended = clock.seconds() - started
            if expired:
                upstream.attempt("timeout", ended)
                raise _AttemptError("timeout", "timeout", REPLY_TIMEOUT, timeout) from None
            if cancelled:
                upstream.attempt("cancelled", ended)
                raise CancelledError() from None
            if isinstance(e, _NETWORK_ERRORS):
                upstream.attempt("network_error", ended)
                raise _AttemptError("network", name, REPLY_NO_ANSWER, timeout) from None
            upstream.attempt("client_error", ended)
            # Only the class name: an exception's text could quote a header.
            raise _AttemptError("client", name, REPLY_CLIENT_ERROR, timeout) from None
        finally:
            if timer.active():
                timer.cancel()
        status = response.code
        now = clock.seconds()
        upstream.attempt(status, now - started)
        if status < 500:
            self.last_reachable = now
        return status, _json_body(content), response

    def _retry_reason(
        self, status: int, body: Any, response: Any, needs_id: bool
    ) -> Optional[tuple[str, Optional[float]]]:
        """
        Should this answer be tried again?  C{None} if not, else a short
        description for the log and the C{Retry-After} seconds (if any).
        """
        if 200 <= status < 300:
            if needs_id and _email_id(body) is None:
                return f"HTTP {status} without an email id", None
            return None
        retry_after = parse_retry_after(
            _first_header(response, b"retry-after"), self._get_clock().seconds()
        )
        if status >= 500 or status == 408:
            return f"HTTP {status}", retry_after
        if status == 429:
            code = body.get("code") if isinstance(body, dict) else None
            if code in QUOTA_CODES:
                return None
            # rate_limit_exceeded is throttling; an unknown code counts as
            # throttling only if the API says when to come back.
            if code == "rate_limit_exceeded" or retry_after is not None:
                return "HTTP 429", retry_after
        return None

    async def _call(
        self,
        method: str,
        path: str,
        url: str,
        headers: Mapping[bytes, list[bytes]],
        data: "Optional[bytes | list[bytes | str]]",
        deadline_at: float,
        needs_id: bool = False,
    ) -> _Answer:
        """
        Make the request, retrying transient failures until C{deadline_at}
        (clock seconds) or C{max_attempts}; return the last answer.

        @raise _Refused: the breaker is open, or no slot was free in time.
        @raise _AttemptError: the last attempt got no answer.
        """
        clock = self._get_clock()
        slots, breaker = self.slots, self.breaker
        upstream = self._upstream[_CALLS.get((method, path), "send")]
        # The least time worth starting an attempt with.
        window = min(self._timeout, self._deadline, 1.0)
        attempt = 0
        while True:
            attempt += 1
            if breaker.refuses():
                raise _Refused("breaker")
            wait = min(self._queue_timeout, deadline_at - clock.seconds() - window)
            try:
                await slots.acquire(max(0.0, wait))
            except _NoSlot:
                raise _Refused("busy") from None
            error: Optional[_AttemptError] = None
            try:
                probe = breaker.admit()
                if probe is None:
                    raise _Refused("breaker")
                attempt_timeout = min(self._timeout, deadline_at - clock.seconds())
                outcome = "inconclusive"
                try:
                    status, body, response = await self._request(
                        method, url, headers, data, attempt_timeout, upstream
                    )
                except _AttemptError as e:
                    error = e
                    if e.kind == "network" or (
                        e.kind == "timeout" and attempt_timeout >= self._timeout
                    ):
                        outcome = "failure"
                else:
                    outcome = "failure" if status >= 500 else "success"
                finally:
                    breaker.record(probe, outcome)
            finally:
                slots.release()

            if error is not None:
                if error.kind == "client":
                    reason: Optional[tuple[str, Optional[float]]] = None
                else:
                    reason = (error.error, None)
            else:
                reason = self._retry_reason(status, body, response, needs_id)
                if reason is None:
                    return _Answer(status, body, response, None, attempt)

            if reason is not None and attempt < self._max_attempts:
                what, retry_after = reason
                exponent = min(attempt - 1, _MAX_BACKOFF_EXPONENT)
                jitter = self._rng.uniform(
                    0, min(self._backoff_cap, self._backoff_base * 2**exponent)
                )
                delay = max(jitter, retry_after or 0.0)
                if clock.seconds() + delay + window <= deadline_at:
                    _log.info(
                        "PostStack API {method} {path} attempt {attempt} failed ({what}); "
                        "retrying in {delay}s",
                        method=method,
                        path=path,
                        attempt=attempt,
                        status=None if error is not None else status,
                        error=error.error if error is not None else None,
                        what=what,
                        delay=round(delay, 3),
                        event="api_retry",
                    )
                    upstream.retries.inc()
                    await deferLater(clock, delay)
                    continue

            # The last attempt.
            if error is not None:
                self._log_attempt_error(method, path, error, attempt)
                raise error
            return _Answer(status, body, response, reason[1] if reason else None, attempt)

    def _log_attempt_error(
        self, method: str, path: str, error: _AttemptError, attempts: int
    ) -> None:
        if error.kind == "timeout":
            _log.warn(
                "PostStack API {method} {path} timed out after {timeout}s "
                "({attempts} attempt(s))",
                method=method,
                path=path,
                timeout=round(error.timeout, 3),
                attempts=attempts,
                event="api_timeout",
            )
        elif error.kind == "network":
            _log.warn(
                "PostStack API {method} {path} failed: {error} ({attempts} attempt(s))",
                method=method,
                path=path,
                error=error.error,
                attempts=attempts,
                event="api_network_error",
            )
        else:
            _log.error(
                "PostStack API {method} {path} failed unexpectedly: {error}",
                method=method,
                path=path,
                error=error.error,
                attempts=attempts,
                event="api_client_error",
            )

    async def _check(
        self,
        method: str,
        path: str,
        url: str,
        headers: Mapping[bytes, list[bytes]],
        data: "Optional[bytes | list[bytes | str]]",
    ) -> _Answer:
        """
        An AUTH-time request: retried like a send, within one C{timeout}.
        Raises L{APIUnavailable} instead of an answer-less ending.
        """
        deadline_at = self._get_clock().seconds() + min(self._timeout, self._deadline)
        try:
            return await self._call(method, path, url, headers, data, deadline_at)
        except _Refused as e:
            reason = "breaker open" if e.reason == "breaker" else "relay busy"
            raise APIUnavailable(reason) from None
        except _AttemptError:
            raise APIUnavailable("no answer") from None

    def check_api_key(self, api_key: str) -> "Deferred[bool]":
        """
        See L{IEmailAPI.check_api_key}: C{GET /emails?per_page=1} with the
        key; 200 is valid, 401/403 invalid, anything else unavailable.
        """

        async def check() -> bool:
            answer = await self._check(
                "GET", "/emails", self._check_url, self._headers(api_key), None
            )
            status = answer.status
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
            answer = await self._check(
                "POST",
                "/mailboxes/authenticate",
                self._mailbox_url,
                self._headers(self._service_key),
                data,
            )
            status, body = answer.status, answer.body
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
        See L{IEmailAPI.send_email}: C{POST /emails}, retried on transient
        failures within the deadline.  Every attempt carries the same
        idempotency key, in the C{Idempotency-Key} header and the body's
        C{idempotency_key}: the request's own, or, when it has none, one
        made for this message (C{psr-} and 32 hex digits), so a retry after
        a lost answer cannot send twice.
        """

        async def send() -> str:
            deadline_at = self._get_clock().seconds() + self._deadline
            payload = request.payload
            key = request.idempotency_key
            if key is None and isinstance(payload.get("idempotency_key"), str):
                key = payload["idempotency_key"]
            if key is None:
                key = "psr-" + uuid.uuid4().hex
            if payload.get("idempotency_key") is None:
                payload = dict(payload)
                payload["idempotency_key"] = key
            try:
                data = json_body(payload)
            except (TypeError, ValueError, UnicodeEncodeError):
                raise APIError(REPLY_NOT_ENCODABLE) from None
            try:
                answer = await self._call(
                    "POST",
                    "/emails",
                    self._emails_url,
                    self._headers(api_key, key),
                    data,
                    deadline_at,
                    needs_id=True,
                )
            except _Refused as e:
                raise APIError(REPLY_API_DOWN if e.reason == "breaker" else REPLY_BUSY) from None
            except _AttemptError as e:
                raise APIError(e.reply) from None
            return self._result(api_key, request, answer)

        return Deferred.fromCoroutine(send())

    def _result(self, api_key: str, request: EmailRequest, answer: _Answer) -> str:
        """
        The email id of a final answer, or the L{APIError} for it.
        """
        status, body, response = answer.status, answer.body, answer.response
        request_id = _first_header(response, b"x-request-id")
        if 200 <= status < 300:
            email_id = _email_id(body)
            if email_id is not None:
                return email_id
            _log.warn(
                "PostStack API answered HTTP {status} without an email id "
                "(request id {request_id}, {attempts} attempt(s))",
                status=status,
                request_id=request_id,
                attempts=answer.attempts,
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
        retry_after = None
        if answer.retry_after is not None and answer.retry_after > 0:
            retry_after = str(max(1, math.ceil(answer.retry_after)))
        reply = reply_for_status(status, body, retry_after, (api_key,))
        raise APIError(reply, status=status, code=code, request_id=request_id)


_EMAIL_ID = re.compile(r"[A-Za-z0-9_.:-]{1,100}")


def _email_id(body: Any) -> Optional[str]:
    """
    The email id of a 2xx body, if it is one that can stand in a reply
    line as it is; anything else counts as "no email id".
    """
    email_id = body.get("id") if isinstance(body, dict) else None
    if isinstance(email_id, str) and _EMAIL_ID.fullmatch(email_id):
        return email_id
    return None
