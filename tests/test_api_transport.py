"""
Tests for L{poststack_relay.api.transport}: the relay's one HTTP path
(treq over Twisted's agent and a persistent pool), the work it does once
instead of per request (URLs, endpoints, headers, no cookie jar), and
L{HTTPEmailAPI} over it against the sandbox over real loopback TCP
(kept-alive connections, resets, time-outs, streamed bodies, TLS).
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Any, Optional

from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent, StringStubbingResource, StubTreq
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.endpoints import HostnameEndpoint, SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.protocols.policies import WrappingFactory

from poststack_relay.api import (
    NETWORK_ERRORS,
    USER_AGENT,
    APIEndpoints,
    APIError,
    BodyProducer,
    HTTPEmailAPI,
    PreparedURL,
    make_http_client,
)
from poststack_relay.api.transport import (
    AnswerTooLarge,
    APITransport,
    NoCookies,
    read_body,
    to_body_producer,
)
from poststack_relay.replies import API_NO_ANSWER, API_TIMEOUT
from poststack_relay.sandbox import IN_TREE_DATA_PATH, SandboxResource, SandboxStore, load_sandbox_data
from poststack_relay.testing import write_certificate
from poststack_relay.tls import load_certificate_options
from tests.common.api import attachment_email, email
from tests.common.keys import FULL_KEY, SERVICE_KEY, UNKNOWN_KEY, scan


class PreparedURLTests(SynchronousTestCase):
    """
    L{PreparedURL}: a URL in URI form made once; what treq asks of it on
    every request costs nothing.
    """

    def test_ascii(self) -> None:
        """A plain URL stays as it is, and its to_uri() is itself."""
        url = PreparedURL.prepare("http://127.0.0.1:8080/v1/emails?per_page=1")
        self.assertEqual(url.to_text(), "http://127.0.0.1:8080/v1/emails?per_page=1")
        self.assertIs(url.to_uri(), url)

    def test_idn_host(self) -> None:
        """An internationalised host name is encoded (IDNA) once, when prepared."""
        url = PreparedURL.prepare("https://b\u00fccher.example/emails")
        self.assertEqual(url.to_uri().to_text(), "https://xn--bcher-kva.example/emails")

    def test_treq_sends_it(self) -> None:
        """treq's client requests exactly the prepared URL."""
        seen: list[tuple[str, Any]] = []

        def answer(method: bytes, url: str, params: Any, headers: Any, data: bytes) -> Any:
            seen.append((url, params))
            return 200, {}, b"{}"

        stub = StubTreq(StringStubbingResource(answer))
        url = PreparedURL.prepare("http://api.example/v1/emails?per_page=1")
        response = self.successResultOf(stub.request("GET", url))
        self.assertEqual(response.code, 200)
        self.assertEqual(seen, [("http://api.example/v1/emails", {b"per_page": [b"1"]})])

    def test_idn_api_url_sends(self) -> None:
        """An API URL with a non-ASCII host makes its requests to the IDNA form."""
        seen: list[tuple[str, Any]] = []

        def answer(method: bytes, url: str, params: Any, headers: Any, data: bytes) -> Any:
            seen.append((url, params))
            return 200, {}, b"{}"

        api = HTTPEmailAPI(
            StubTreq(StringStubbingResource(answer)), "https://b\u00fccher.example/v1", 10.0, clock=Clock()
        )
        self.assertIs(self.successResultOf(api.check_api_key(FULL_KEY)), True)
        self.assertEqual(seen, [("https://xn--bcher-kva.example/v1/emails", {b"per_page": [b"1"]})])


class APIEndpointsTests(SynchronousTestCase):
    """
    L{APIEndpoints}: one endpoint per scheme, host and port, made once.
    """

    def test_http_cached(self) -> None:
        """An http URI gets a plain TCP endpoint, the same one for every request to that host and port."""
        endpoints = APIEndpoints(MemoryReactorClock(), 10)
        first = endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8080/emails"))
        self.assertIsInstance(first, HostnameEndpoint)
        self.assertIs(endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8080/emails?per_page=1")), first)
        self.assertIsNot(endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8081/emails")), first)

    def test_https_wrapped(self) -> None:
        """An https URI gets TLS around TCP (not the bare TCP endpoint), also cached."""
        endpoints = APIEndpoints(MemoryReactorClock(), 10)
        first = endpoints.endpointForURI(URI.fromBytes(b"https://api.example.com/v1/emails"))
        self.assertNotIsInstance(first, HostnameEndpoint)
        self.assertIs(endpoints.endpointForURI(URI.fromBytes(b"https://api.example.com/v1/emails")), first)
        self.assertIsNot(endpoints.endpointForURI(URI.fromBytes(b"http://api.example.com/v1/emails")), first)

    def test_other_scheme(self) -> None:
        """Any other scheme is refused as the standard agent refuses it."""
        with self.assertRaises(SchemeNotSupported):
            APIEndpoints(MemoryReactorClock(), 10).endpointForURI(URI.fromBytes(b"ftp://api.example.com/"))

    def test_connect_timeout(self) -> None:
        """A new connection may take the connect time-out, no more."""
        reactor = MemoryReactorClock()
        endpoint = APIEndpoints(reactor, 7).endpointForURI(URI.fromBytes(b"http://127.0.0.1:8080/"))
        endpoint.connect(Factory.forProtocol(Protocol))
        [(_, _, _, timeout, _)] = reactor.tcpClients
        self.assertEqual(timeout, 7)


class MakeHTTPClientTests(SynchronousTestCase):
    """
    L{make_http_client}: treq over an agent with L{APIEndpoints} and a
    persistent pool that never retries by itself.
    """

    def test_pool(self) -> None:
        """A persistent pool: 64 idle connections per host, kept 50 s, no automatic retries."""
        client, pool = make_http_client(MemoryReactorClock(), connect_timeout=5)
        self.assertIsInstance(client, HTTPClient)
        self.assertTrue(pool.persistent)
        self.assertFalse(pool.retryAutomatically)
        self.assertEqual(pool.maxPersistentPerHost, 64)
        self.assertEqual(pool.cachedConnectionTimeout, 50)

    def test_connects_with_api_endpoints(self) -> None:
        """A request connects through the cached endpoint, with the connect time-out."""
        memory = MemoryReactorClock()
        client, _ = make_http_client(memory, connect_timeout=3)
        client.request("GET", PreparedURL.prepare("http://127.0.0.1:8080/emails"))
        [(host, port, _, timeout, _)] = memory.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 8080, 3))


class ToBodyProducerTests(SynchronousTestCase):
    """
    L{to_body_producer}: bytes are written at once; producers pass.
    """

    def test_bytes(self) -> None:
        """Bytes become a BodyProducer of their length, written in one write."""
        producer = to_body_producer(b'{"a":1}')
        self.assertIsInstance(producer, BodyProducer)
        self.assertEqual(producer.length, 7)
        written: list[bytes] = []

        class Consumer:
            def write(self, data: bytes) -> None:
                written.append(data)

        self.successResultOf(producer.startProducing(Consumer()))  # type: ignore[arg-type]
        self.assertEqual(written, [b'{"a":1}'])

    def test_producer(self) -> None:
        """A producer is used as it is; anything else is refused."""
        producer = BodyProducer([b"x", "QUJD"])
        self.assertIs(to_body_producer(producer), producer)
        self.assertRaises(TypeError, to_body_producer, "text")  # type: ignore[arg-type]


class HeaderTests(SynchronousTestCase):
    """
    L{APITransport.headers}: made once per key, copied per message.
    """

    def setUp(self) -> None:
        self.transport = APITransport(StubTreq(Resource()), "http://api.example/")

    def test_per_key(self) -> None:
        """A key's headers are kept: the same object for a request without a body or an idempotency key."""
        first = self.transport.headers(FULL_KEY)
        self.assertIs(self.transport.headers(FULL_KEY), first)
        self.assertEqual(first.getRawHeaders(b"authorization"), [b"Bearer " + FULL_KEY.encode()])
        self.assertEqual(first.getRawHeaders(b"user-agent"), [USER_AGENT.encode()])
        self.assertEqual(first.getRawHeaders(b"accept"), [b"application/json"])
        self.assertIsNone(self.transport.headers(None).getRawHeaders(b"authorization"))

    def test_message_headers_are_a_copy(self) -> None:
        """The idempotency key and the content type go on a copy: the kept headers do not change."""
        kept = self.transport.headers(FULL_KEY)
        headers = self.transport.headers(FULL_KEY, "k-1", body=True)
        self.assertIsNot(headers, kept)
        self.assertEqual(headers.getRawHeaders(b"idempotency-key"), [b"k-1"])
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertIsNone(kept.getRawHeaders(b"idempotency-key"))
        self.assertIsNone(kept.getRawHeaders(b"content-type"))

    def test_bounded(self) -> None:
        """At most 256 keys' headers are kept."""
        for i in range(300):
            self.transport.headers(f"sk_test_{i}")
        self.assertLessEqual(len(self.transport._by_key), 256)


class SetCookie(Resource):
    """Sets a cookie and records the Cookie header of every request."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.cookies: list[Optional[list[bytes]]] = []

    def render(self, request: Request) -> bytes:
        self.cookies.append(request.requestHeaders.getRawHeaders(b"cookie"))
        request.addCookie(b"session", b"abc", path=b"/")
        return b"{}"


class BigAnswer(Resource):
    """Answers 202 with C{size} bytes."""

    isLeaf = True

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def render(self, request: Request) -> bytes:
        request.setResponseCode(202)
        return b'{"id": "em_1", "x": "' + b"x" * self.size + b'"}'


class GzipAnswer(Resource):
    """
    Answers 202 with a gzip-coded email id (and, with C{padding}, that
    many spaces more once inflated), whatever the request accepts; records
    each request's C{Accept-Encoding}.
    """

    isLeaf = True

    def __init__(self, padding: int = 0) -> None:
        super().__init__()
        self.padding = padding
        self.accepted: list[Optional[list[bytes]]] = []

    def render(self, request: Request) -> bytes:
        self.accepted.append(request.requestHeaders.getRawHeaders(b"accept-encoding"))
        request.setResponseCode(202)
        request.setHeader(b"content-encoding", b"gzip")
        return gzip.compress(b'{"id": "em_1"}' + b" " * self.padding)


class InMemoryTests(SynchronousTestCase):
    """
    The relay's client shape (L{NoCookies}, L{to_body_producer}) over
    treq's in-memory agent.
    """

    def client(self, resource: Resource) -> tuple[HTTPClient, RequestTraversalAgent]:
        agent = RequestTraversalAgent(resource)
        return HTTPClient(agent, cookiejar=NoCookies(), data_to_body_producer=to_body_producer), agent

    def test_no_cookies(self) -> None:
        """A cookie the server sets is never sent back."""
        resource = SetCookie()
        client, _ = self.client(resource)
        url = PreparedURL.prepare("http://api.example/emails")
        for _ in range(2):
            self.successResultOf(client.request("GET", url))
        self.assertEqual(resource.cookies, [None, None])

    def test_streamed_body(self) -> None:
        """A message with a large attachment arrives whole through a BodyProducer."""
        store = SandboxStore(self.mktemp())
        self.addCleanup(store.close)
        sandbox = SandboxResource(store, load_sandbox_data(IN_TREE_DATA_PATH), Clock())
        client, _ = self.client(sandbox)
        api = HTTPEmailAPI(client, "http://api.example", 10.0, clock=Clock(), max_attempts=1)
        request = attachment_email()
        self.assertTrue(self.successResultOf(api.send_email(FULL_KEY, request)).startswith("em_"))
        [stored] = store.emails()
        self.assertEqual(
            stored.payload["attachments"][0]["content"], request.payload["attachments"][0]["content"]
        )

    def test_answer_too_large(self) -> None:
        """An answer over the limit fails as a network error (AnswerTooLarge), and the API says 451 4.4.1."""
        client, _ = self.client(BigAnswer(2 * 1024 * 1024))
        transport = APITransport(client, "http://api.example")
        response = self.successResultOf(client.request("GET", transport.url("/x"), unbuffered=True))
        failure = self.failureResultOf(read_body(response, 1024 * 1024), AnswerTooLarge)
        self.assertIsInstance(failure.value, NETWORK_ERRORS)
        api = HTTPEmailAPI(client, "http://api.example", 10.0, clock=Clock(), max_attempts=1)
        error = self.failureResultOf(api.send_email(FULL_KEY, email()), APIError).value
        self.assertEqual(error.reply, API_NO_ANSWER)

    def test_answer_at_limit(self) -> None:
        """An answer within the limit is read whole."""
        client, _ = self.client(BigAnswer(1000))
        transport = APITransport(client, "http://api.example")
        response = self.successResultOf(client.request("GET", transport.url("/x"), unbuffered=True))
        content = self.successResultOf(read_body(response, 2000))
        self.assertEqual(json.loads(content)["id"], "em_1")


class CountingSite(WrappingFactory):
    """A Site, wrapped to keep the protocol of each connection it was given."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(Site(resource))
        self.built: list[Any] = []

    @property
    def connections(self) -> int:
        return len(self.built)

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self.built.append(protocol)
        return protocol


class LoopbackTests(TestCase):
    """
    L{HTTPEmailAPI} over L{make_http_client}, as the relay builds it, to
    the sandbox over real loopback TCP.
    """

    timeout = 30

    async def start(self, **options: Any) -> HTTPEmailAPI:
        self.store = SandboxStore(self.mktemp())
        self.addCleanup(self.store.close)
        self.sandbox = SandboxResource(self.store, load_sandbox_data(IN_TREE_DATA_PATH), reactor)
        self.site = CountingSite(self.sandbox)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.site)
        self.addCleanup(port.stopListening)
        client, self.pool = make_http_client(reactor, connect_timeout=5)
        self.addCleanup(self.pool.closeCachedConnections)
        options.setdefault("max_attempts", 1)
        timeout = options.pop("timeout", 5.0)
        service_key = options.pop("service_key", SERVICE_KEY)
        api = HTTPEmailAPI(
            client, f"http://127.0.0.1:{port.getHost().port}", timeout, service_key, clock=reactor, **options
        )
        self.addCleanup(api.stop)  # the breaker's probing, if a test opened it
        return api

    async def wait_for(self, condition: Any) -> None:
        for _ in range(500):
            if condition():
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail("condition not reached in 5 s")

    async def test_calls(self) -> None:
        """Key checks, a mailbox login and sends work over one kept-alive connection."""
        api = await self.start()
        self.assertIs(await api.check_api_key(FULL_KEY), True)
        self.assertIs(await api.check_api_key(UNKNOWN_KEY), False)
        self.assertEqual(
            await api.authenticate_mailbox("alice@yourdomain.com", "alice-password"),
            "alice@yourdomain.com",
        )
        ids = [await api.send_email(FULL_KEY, email()) for _ in range(3)]
        self.assertEqual(sorted(ids), sorted(e.id for e in self.store.emails()))
        self.assertEqual(self.site.connections, 1)

    async def test_api_errors(self) -> None:
        """A 422 and a 429 arrive as their SMTP replies."""
        api = await self.start()
        with self.assertRaises(APIError) as caught:
            await api.send_email(FULL_KEY, email(**{"from": "you@pendingdomain.com"}))
        self.assertEqual((caught.exception.status, caught.exception.reply.code), (422, 550))
        self.sandbox.inject_fault("429", retry_after="3")
        with self.assertRaises(APIError) as caught:
            await api.send_email(FULL_KEY, email())
        self.assertEqual(caught.exception.reply.text, "PostStack rate limit reached, retry-after=3s")

    async def test_reset(self) -> None:
        """A reset connection is 451 4.4.1; the next send succeeds on a new connection."""
        api = await self.start()
        await api.send_email(FULL_KEY, email())
        self.sandbox.inject_fault("reset")
        with self.assertRaises(APIError) as caught:
            await api.send_email(FULL_KEY, email())
        self.assertEqual(caught.exception.reply, API_NO_ANSWER)
        await api.send_email(FULL_KEY, email())
        self.assertEqual(len(self.store.emails()), 2)
        self.assertEqual(self.site.connections, 2)

    async def test_timeout(self) -> None:
        """A hanging API is 451 4.4.2 after the time-out; the held request's connection is closed, not reused."""
        api = await self.start(timeout=0.3)
        self.sandbox.inject_fault("hang")
        with self.assertRaises(APIError) as caught:
            await api.send_email(FULL_KEY, email())
        self.assertEqual(caught.exception.reply, API_TIMEOUT)
        await self.wait_for(lambda: self.sandbox.pending == 0)
        await api.send_email(FULL_KEY, email())
        self.assertEqual(self.site.connections, 2)

    async def test_large_attachment(self) -> None:
        """A 3 MB attachment is streamed and stored byte for byte; the connection is kept."""
        api = await self.start()
        request = attachment_email(3 * 1024 * 1024)
        await api.send_email(FULL_KEY, request)
        [stored] = self.store.emails()
        self.assertEqual(
            stored.payload["attachments"][0]["content"], request.payload["attachments"][0]["content"]
        )
        await api.send_email(FULL_KEY, email())
        self.assertEqual(self.site.connections, 1)

    async def test_server_closes_idle(self) -> None:
        """A connection the server closed while idle is not used again: the next send connects anew."""
        api = await self.start(max_attempts=3)
        await api.send_email(FULL_KEY, email())
        [protocol] = self.site.built
        protocol.transport.loseConnection()
        await self.wait_for(lambda: protocol.transport.disconnected)
        await deferLater(reactor, 0.05, lambda: None)  # the client reads the close
        await api.send_email(FULL_KEY, email())
        self.assertEqual(len(self.store.emails()), 2)
        self.assertEqual(self.site.connections, 2)

    async def serve(self, resource: Resource, **options: Any) -> HTTPEmailAPI:
        """An HTTPEmailAPI over make_http_client to C{resource} over loopback TCP."""
        self.site = CountingSite(resource)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.site)
        self.addCleanup(port.stopListening)
        client, pool = make_http_client(reactor, connect_timeout=5)
        self.addCleanup(pool.closeCachedConnections)
        options.setdefault("max_attempts", 1)
        service_key = options.pop("service_key", None)
        return HTTPEmailAPI(
            client, f"http://127.0.0.1:{port.getHost().port}", 5.0, service_key, clock=reactor, **options
        )

    async def test_asks_for_identity(self) -> None:
        """Requests ask for answers without a content coding (treq would ask for gzip)."""
        resource = SetCookie()
        api = await self.serve(resource)
        seen: list[Optional[list[bytes]]] = []
        original = resource.render

        def render(request: Request) -> bytes:
            seen.append(request.requestHeaders.getRawHeaders(b"accept-encoding"))
            return original(request)

        resource.render = render  # type: ignore[method-assign]
        await api.probe()
        self.assertEqual(seen, [[b"identity"]])

    async def test_gzip_answer_refused(self) -> None:
        """
        An answer in gzip although identity was asked for is never inflated
        (no bound on the inflated size): a network error, 451 4.4.1, not a
        250 for the id inside it.  Its body is read (raw) and dropped, so
        the connection is kept.
        """
        resource = GzipAnswer()
        api = await self.serve(resource)
        with self.assertRaises(APIError) as caught:
            await api.send_email(FULL_KEY, email())
        self.assertEqual(caught.exception.reply, API_NO_ANSWER)
        self.assertEqual(resource.accepted, [[b"identity"]])
        with self.assertRaises(APIError):
            await api.send_email(FULL_KEY, email())
        self.assertEqual(self.site.connections, 1)

    async def test_gzip_bomb_not_inflated(self) -> None:
        """A gzip answer that would inflate to 64 MiB fails without being inflated."""
        api = await self.serve(GzipAnswer(padding=64 * 1024 * 1024))
        with self.assertRaises(APIError) as caught:
            await api.send_email(FULL_KEY, email())
        self.assertEqual(caught.exception.reply, API_NO_ANSWER)
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_answer_too_large(self) -> None:
        """An answer over 1 MiB is 451 4.4.1; its connection is closed, not reused, and nothing is left logged."""
        api = await self.serve(BigAnswer(2 * 1024 * 1024))
        for _ in range(2):
            with self.assertRaises(APIError) as caught:
                await api.send_email(FULL_KEY, email())
            self.assertEqual(caught.exception.reply, API_NO_ANSWER)
        self.assertEqual(self.site.connections, 2)
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_no_secret_over_the_wire(self) -> None:
        """
        Over real connections (Twisted's own errors: resets, time-outs,
        malformed and oversized answers, a refused connection), no log
        event, failure or exception holds the API key, the service key or
        a mailbox password.
        """
        secret, password = "sk_test_secret_5f0e2b7d9c41", "pw-secret-0c3a9e"
        events: list[dict[str, Any]] = []
        errors: list[BaseException] = []

        async def keep(d: "Any") -> None:
            try:
                await d
            except Exception as e:
                errors.append(e)

        with capturedLogs() as captured:
            api = await self.start(service_key=secret, timeout=0.3)
            for mode in ("reset", "hang", "malformed", "503", "accept_then_500"):
                self.sandbox.inject_fault(mode)
                await keep(api.send_email(secret, email()))
                self.sandbox.inject_fault(mode, path="/mailboxes/authenticate")
                await keep(api.authenticate_mailbox("alice@yourdomain.com", password))
                self.sandbox.inject_fault(mode, path="/emails", method="GET")
                await keep(api.check_api_key(secret))
            big = await self.serve(BigAnswer(2 * 1024 * 1024), service_key=secret)
            await keep(big.send_email(secret, email()))
            await keep(big.authenticate_mailbox("alice@yourdomain.com", password))
            gzipped = await self.serve(GzipAnswer(), service_key=secret)
            await keep(gzipped.send_email(secret, email()))
            await self.wait_for(lambda: self.sandbox.pending == 0)
            events.extend(captured)
        self.assertGreater(len(errors), 15)
        self.assertTrue(any(e.get("event") == "api_network_error" for e in events))
        self.assertTrue(any(e.get("event") == "api_timeout" for e in events))
        for item in [*events, *errors]:
            shown = scan(item) + (" " + (formatEvent(item) or "") if isinstance(item, dict) else "")
            self.assertNotIn(secret, shown)
            self.assertNotIn(password, shown)

    async def test_refused(self) -> None:
        """A port nobody listens on is 451 4.4.1 (a network error)."""
        listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(Protocol)
        )
        closed = listening.getHost().port
        await listening.stopListening()
        client, pool = make_http_client(reactor, connect_timeout=5)
        self.addCleanup(pool.closeCachedConnections)
        api = HTTPEmailAPI(client, f"http://127.0.0.1:{closed}", 5.0, clock=reactor, max_attempts=1)
        with self.assertRaises(APIError) as caught:
            await api.send_email(FULL_KEY, email())
        self.assertEqual(caught.exception.reply, API_NO_ANSWER)

    async def test_tls_untrusted(self) -> None:
        """https to a self-signed certificate fails verification: 451 4.4.1, never a send."""
        cert_path, key_path = write_certificate(os.path.abspath(self.mktemp()))
        store = SandboxStore(self.mktemp())
        self.addCleanup(store.close)
        sandbox = SandboxResource(store, load_sandbox_data(IN_TREE_DATA_PATH), reactor)
        port = await SSL4ServerEndpoint(
            reactor, 0, load_certificate_options(cert_path, key_path), interface="127.0.0.1"
        ).listen(Site(sandbox))
        self.addCleanup(port.stopListening)
        client, pool = make_http_client(reactor, connect_timeout=5)
        self.addCleanup(pool.closeCachedConnections)
        api = HTTPEmailAPI(
            client, f"https://127.0.0.1:{port.getHost().port}", 5.0, clock=reactor, max_attempts=1
        )
        with self.assertRaises(APIError) as caught:
            await api.send_email(FULL_KEY, email())
        self.assertEqual(caught.exception.reply, API_NO_ANSWER)
        self.assertEqual(store.emails(), [])


class ServiceWiringTests(SynchronousTestCase):
    """
    makeRelayService calls the API through treq over its own pool, and
    closes the pool when it stops.
    """

    def test_default_client(self) -> None:
        """The relay's HTTPEmailAPI uses a persistent pool that the service closes at stop."""
        from poststack_relay import RelayConfig, makeRelayService
        from poststack_relay.service import _APIClientService

        cert, key = write_certificate(os.path.abspath(self.mktemp()))
        memory = MemoryReactorClock()
        service = makeRelayService(
            RelayConfig(metrics_listen="off", tls_cert=cert, tls_key=key, hostname="relay.test"), memory
        )
        [pool_service] = [child for child in service if isinstance(child, _APIClientService)]
        pool = pool_service.pool
        assert pool is not None
        self.assertTrue(pool.persistent)
        self.assertFalse(pool.retryAutomatically)
        closed: list[bool] = []
        pool.closeCachedConnections = lambda: closed.append(True) or succeed(None)  # type: ignore[method-assign]
        service.startService()
        self.successResultOf(service.stopService())
        self.assertEqual(closed, [True])

