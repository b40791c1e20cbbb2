# -*- test-case-name: tests.test_api,tests.test_api_transport -*-
"""
The relay's one HTTP path to the API: a treq C{HTTPClient} over Twisted's
C{Agent} and a persistent C{HTTPConnectionPool} (L{make_http_client}), and
the per-request work done once, at start-up, instead of on every request
(L{APITransport}).

What treq's C{HTTPClient.request} would otherwise do on every call, and
what this module does instead:

 - URL: C{EncodedURL.to_uri().to_text()} (IDNA-encoding the host, a few
   tens of microseconds): the API's URLs are L{PreparedURL}s, made once,
   whose C{to_uri()} is themselves and whose text is kept.
 - Endpoint: Twisted's standard endpoint factory builds a new
   C{HostnameEndpoint} (IDNA again) per request: L{APIEndpoints} keeps one
   per scheme, host and port, with the connect time-out.
 - Cookies: a C{CookieJar} scanned before and after every request:
   L{NoCookies} keeps none (the API sets none the relay should send back).
 - Body: C{bytes} become a C{FileBodyProducer} driven by a cooperator
   task (one more reactor turn): L{to_body_producer} writes them at once,
   and streams large bodies (L{BodyProducer}).
 - Headers: a dict becomes a new C{Headers} per request: L{APITransport}
   keeps one C{Headers} per API key and copies it.

Answers come as they are: treq's C{HTTPClient} asks for gzip and inflates
it with no bound (a 64 KiB read can become 64 MiB before the L{MAX_ANSWER}
check sees a byte of it), so the agent under treq's wrappers
(L{IdentityAgent}) asks for C{Accept-Encoding: identity} instead and fails
an answer that comes in a content coding anyway, before treq's decoder
sees it.

Requests never follow redirects (C{allow_redirects=False}), are never
retried by the pool (C{retryAutomatically = False}: retrying is the
relay's decision, with one idempotency key per message), and read at most
L{MAX_ANSWER} bytes of an answer.  Time-outs are the caller's
(L{poststack_relay.api.attempts}).  Nothing here puts a header value or a
byte of an answer in an exception.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from hyperlink import EncodedURL
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    URI,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from .._version import __version__
from ..interfaces import IRelayReactor
from .answers import Answer
from .body import Body, BodyProducer

__all__ = [
    "MAX_ANSWER",
    "USER_AGENT",
    "APIEndpoints",
    "APITransport",
    "AnswerTooLarge",
    "IdentityAgent",
    "NoCookies",
    "PreparedURL",
    "UnexpectedContentCoding",
    "make_http_client",
    "read_body",
    "to_body_producer",
]

USER_AGENT = f"poststack-relay/{__version__}"

MAX_ANSWER = 1024 * 1024
"""Bytes: the most content an answer may have (the API's are a few hundred)."""

DEFAULT_MAX_PER_HOST = 64
"""Idle keep-alive connections kept to the API (the pool's C{maxPersistentPerHost})."""
DEFAULT_IDLE_TIMEOUT = 50
"""Seconds an idle connection is kept: under the common 60 s idle time-out of
load balancers, so the relay, not the server, closes an idle connection."""


@implementer(IAgentEndpointFactory)
class APIEndpoints:
    """
    Where the agent connects for a URI, as Twisted's standard agent does it
    (TCP for C{http}, TLS verified like a browser for C{https}), but one
    endpoint per scheme, host and port, made once: the standard factory
    builds a new C{HostnameEndpoint} (and IDNA-encodes the host) for every
    request, even when the pool then reuses a connection.

    @param reactor: what the endpoints connect with.
    @param connect_timeout: seconds a new connection may take.
    """

    def __init__(self, reactor: IRelayReactor, connect_timeout: float) -> None:
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._policy = BrowserLikePolicyForHTTPS()  # type: ignore[no-untyped-call]  # (untyped in Twisted)
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
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


class NoCookies(IndexableCookieJar):
    """
    A cookie jar that keeps nothing and adds nothing: the API sets no
    cookie the relay should send back, and treq would otherwise scan its
    jar before and extract cookies after every request.
    """

    def add_cookie_header(self, request: Any) -> None:
        """Add no C{Cookie} header."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        """Keep no cookie."""

    def set_cookie(self, cookie: Any) -> None:
        """Keep no cookie."""


class PreparedURL(EncodedURL):
    """
    A URL already in its URI form (ASCII, host in IDNA, percent-encoded),
    made once: treq turns every URL it is given into text with
    C{to_uri().to_text()} on every request, and for this one both are
    free.  Make one with L{prepare}.
    """

    _text: str

    @classmethod
    def prepare(cls, text: str) -> "PreparedURL":
        """C{text} (an absolute URL, IRI or URI) as a L{PreparedURL}."""
        uri_text: str = EncodedURL.from_text(text).to_uri().to_text()
        prepared = cls.from_text(uri_text)
        assert isinstance(prepared, PreparedURL)
        prepared._text = uri_text
        return prepared

    def to_uri(self) -> "PreparedURL":
        """This URL: it is a URI already."""
        return self

    def to_text(self, with_password: bool = False) -> str:
        """The URI's text (made once)."""
        return self._text


def to_body_producer(data: Union[bytes, IBodyProducer]) -> IBodyProducer:
    """
    treq's C{data_to_body_producer} for the relay's client: bytes become a
    L{BodyProducer} (written at once if small, streamed if large), and a
    producer is used as it is.
    """
    if isinstance(data, bytes):
        return BodyProducer(data)
    if IBodyProducer.providedBy(data):
        return data
    raise TypeError("a request body is bytes or an IBodyProducer")


def make_http_client(
    reactor: IRelayReactor,
    connect_timeout: float = 10.0,
    max_per_host: int = DEFAULT_MAX_PER_HOST,
    idle_timeout: int = DEFAULT_IDLE_TIMEOUT,
) -> tuple[HTTPClient, HTTPConnectionPool]:
    """
    The relay's HTTP client: treq's C{HTTPClient} over an C{Agent} with
    L{APIEndpoints} and a persistent C{HTTPConnectionPool} that never
    retries a request by itself.  Close the pool
    (C{closeCachedConnections()}) when the relay stops.

    @param reactor: the relay's reactor (L{IRelayReactor}); the client uses
        its C{IReactorTCP}, C{IReactorTime} and
        C{IReactorPluggableNameResolver} (for a host name).
    @param connect_timeout: seconds a new connection may take.
    @param max_per_host: idle connections kept per host.
    @param idle_timeout: seconds an idle connection is kept.
    @return: the client and its pool.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]  # (untyped in Twisted)
    pool.maxPersistentPerHost = max_per_host
    pool.cachedConnectionTimeout = idle_timeout
    pool.retryAutomatically = False
    endpoints = APIEndpoints(reactor, connect_timeout)
    agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)  # type: ignore[no-untyped-call]  # (untyped in Twisted)
    client = HTTPClient(
        IdentityAgent(agent), cookiejar=NoCookies(), data_to_body_producer=to_body_producer
    )
    return client, pool


class UnexpectedContentCoding(ResponseFailed):
    """
    An answer came in a content coding (gzip, ...) although the request
    asked for C{identity}: a C{ResponseFailed}, so a network error for the
    relay.  The text names no header value.
    """

    def __init__(self) -> None:
        Exception.__init__(self, "answer in a content coding that was not accepted")
        self.reasons: list[Failure] = []
        self.response = None


def _identity_only(response: IResponse) -> Union[IResponse, "Deferred[IResponse]"]:
    """
    C{response} itself if it has no content coding; else a failure
    (L{UnexpectedContentCoding}) once its body is read (at most
    L{MAX_ANSWER} raw bytes) and dropped, so that its connection ends
    clean (back to the pool if the answer was whole).
    """
    codings = response.headers.getRawHeaders(b"content-encoding")
    if not codings or all(
        coding.strip().lower() in (b"", b"identity") for value in codings for coding in value.split(b",")
    ):
        return response

    def refuse(_: bytes) -> IResponse:
        raise UnexpectedContentCoding()

    return read_body(response).addCallback(refuse)


@implementer(IAgent)
class IdentityAgent:
    """
    An agent, under treq's own wrappers, that asks for answers without a
    content coding (C{Accept-Encoding: identity}, in place of the C{gzip}
    that treq's C{ContentDecoderAgent} adds) and fails an answer that
    comes in one anyway (L{UnexpectedContentCoding}) before treq's decoder
    can inflate it: that decoder has no bound on the inflated size, which
    the relay's L{MAX_ANSWER} limit only meets after it.  Such an answer's
    body is read raw (within L{MAX_ANSWER}) and dropped.
    """

    def __init__(self, agent: IAgent) -> None:
        self._agent = agent

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Optional[Headers] = None,
        bodyProducer: Optional[IBodyProducer] = None,
    ) -> "Deferred[IResponse]":
        """Make the request through the wrapped agent, asking for identity."""
        headers = Headers() if headers is None else headers.copy()
        headers.setRawHeaders(b"Accept-Encoding", [b"identity"])
        d = self._agent.request(method, uri, headers, bodyProducer)
        return d.addCallback(_identity_only)


class AnswerTooLarge(ResponseFailed):
    """
    An answer's content went over its limit: a C{ResponseFailed}, so a
    network error for the relay.  The text names the limit, never a byte.
    """

    def __init__(self, limit: int) -> None:
        Exception.__init__(self, f"answer over {limit} bytes")
        self.reasons: list[Failure] = []
        self.response = None


class _BodyReader(Protocol):
    """
    Collects a response body of at most C{limit} bytes.  Cancelling its
    Deferred, or a body over the limit, stops the transport, so the
    connection is closed rather than left reading (and never goes back to
    the pool).
    """

    def __init__(self, limit: int) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._limit = limit
        self.finished: Optional[Deferred[bytes]] = Deferred(self._cancel)

    def _cancel(self, d: "Deferred[bytes]") -> None:
        self.finished = None
        self._stop()

    def _stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]  # (an IPushProducer here)

    def dataReceived(self, data: bytes) -> None:
        if self.finished is None:
            return
        self._size += len(data)
        if self._size > self._limit:
            d, self.finished = self.finished, None
            self._parts = []
            self._stop()
            d.errback(AnswerTooLarge(self._limit))
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        d, self.finished = self.finished, None
        if d is None:
            return
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            d.callback(b"".join(self._parts))
        else:
            d.errback(reason)


def read_body(response: IResponse, limit: int = MAX_ANSWER) -> "Deferred[bytes]":
    """
    The whole content of C{response}, at most C{limit} bytes (else it
    fails with L{AnswerTooLarge}).  Cancelling
    it closes the connection.
    """
    reader = _BodyReader(limit)
    d = reader.finished
    assert d is not None
    response.deliverBody(reader)  # type: ignore[no-untyped-call]  # (untyped in IResponse)
    return d


def _host_value(url: PreparedURL) -> bytes:
    """
    The C{Host} field of requests to C{url}, as Twisted's agent computes
    it: the host (in brackets if IPv6), with the port unless it is the
    scheme's default.
    """
    host: str = url.host
    if isIPv6Address(host):
        host = f"[{host}]"
    port: Optional[int] = url.port
    if port is None or (url.scheme, port) in (("http", 80), ("https", 443)):
        return host.encode("ascii")
    return f"{host}:{port}".encode("ascii")


class APITransport:
    """
    The API's URLs and request headers, made once, and one request over a
    treq client (the relay's, from L{make_http_client}, or C{StubTreq} in
    tests).

    @param client: provides treq's C{HTTPClient.request}.
    @param base_url: the API's base URL.
    @param max_answer: the most bytes of content an answer may have.
    """

    def __init__(self, client: Any, base_url: str, max_answer: int = MAX_ANSWER) -> None:
        self._client = client
        self._base = base_url.rstrip("/")
        self._max_answer = max_answer
        self._urls: dict[str, PreparedURL] = {}
        self._by_key: dict[Optional[str], Headers] = {}
        self._host = _host_value(PreparedURL.prepare(self._base or "/"))
        # An empty jar to merge: treq would make (and merge) a new one per request.
        self._no_cookies = NoCookies()

    def url(self, path: str) -> PreparedURL:
        """The prepared URL of C{path} (with its query) under the base URL."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = PreparedURL.prepare(self._base + path)
        return url

    def headers(
        self, api_key: Optional[str], idempotency_key: Optional[str] = None, body: bool = False
    ) -> Headers:
        """
        The headers of one request: C{Host} (as the agent would write it,
        but made once), C{Authorization} with C{api_key} (none if C{None}),
        our C{User-Agent}, C{Accept: application/json}, the
        C{Idempotency-Key} if given, and C{Content-Type: application/json}
        for a request with a body.  Made from a copy of the headers kept
        for the key (at most 256 keys are kept).
        """
        base = self._by_key.get(api_key)
        if base is None:
            base = Headers(
                {
                    b"Host": [self._host],
                    b"User-Agent": [USER_AGENT.encode("ascii")],
                    b"Accept": [b"application/json"],
                }
            )
            if api_key is not None:
                base.setRawHeaders(b"Authorization", [b"Bearer " + api_key.encode("ascii", "replace")])
            if len(self._by_key) >= 256:
                self._by_key.clear()
            self._by_key[api_key] = base
        if idempotency_key is None and not body:
            return base  # never changed: the agents copy before adding to it
        headers = base.copy()
        if idempotency_key is not None:
            headers.setRawHeaders(b"Idempotency-Key", [idempotency_key.encode("utf-8")])
        if body:
            headers.setRawHeaders(b"Content-Type", [b"application/json"])
        return headers

    def send(
        self, method: str, url: PreparedURL, headers: Headers, data: Optional[Body]
    ) -> "Deferred[IResponse]":
        """
        Make one request: no redirects followed, the answer not buffered.
        A body of pieces (L{poststack_relay.api.body.json_body}) is
        streamed by a L{BodyProducer}; bytes go as they are.
        """
        payload: Union[None, bytes, BodyProducer] = None
        if data is not None:
            payload = data if isinstance(data, bytes) else BodyProducer(data)
        d: Deferred[IResponse] = self._client.request(
            method,
            url,
            headers=headers,
            data=payload,
            cookies=self._no_cookies,
            allow_redirects=False,
            unbuffered=True,
        )
        return d

    async def exchange(
        self, method: str, url: PreparedURL, headers: Headers, data: Optional[Body]
    ) -> Answer:
        """Make one request and read its whole answer."""
        response = await self.send(method, url, headers, data)
        content = await read_body(response, self._max_answer)
        return Answer.of(response.code, response.headers, content)
