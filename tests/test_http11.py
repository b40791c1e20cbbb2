"""
Tests for L{poststack_relay.http11}: the relay's own HTTP/1.1 client.

Most tests drive the client's connections by hand: a fake endpoint factory
hands out L{StringTransport}s, the tests feed the server's bytes to the
protocol and read what it wrote, on a L{Clock}.  L{SiteClient} connects the
client in memory to a real C{twisted.web} server (through
C{twisted.test.iosim}; C{tests/test_api.py} runs the API tests over it),
and the loopback tests at the end use real TCP (and TLS) on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Optional

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import directlyProvides

from poststack_relay import api
from poststack_relay.api import _NETWORK_ERRORS, APIEndpoints
from poststack_relay.http11 import (
    CLOSE_GRACE,
    MAX_BODY,
    MAX_HEAD,
    MAX_LINE,
    Answer,
    HTTP11Client,
    MalformedResponse,
    parse_url,
)
from poststack_relay.testing import write_certificate
from poststack_relay.tls import load_certificate_options

URL = b"http://api.example.com/emails"
KEY = (b"http", b"api.example.com", 80)
SECRET = b"sk_live_secret_5d1e9c0b7a"
HEADERS = {
    b"Authorization": [b"Bearer " + SECRET],
    b"Content-Type": [b"application/json"],
}


def answer(
    body: bytes = b'{"id":"em_1"}',
    status: bytes = b"200 OK",
    fields: bytes = b"",
    version: bytes = b"HTTP/1.1",
) -> bytes:
    """A complete response with a Content-Length."""
    return b"%s %s\r\nContent-Length: %d\r\n%s\r\n%s" % (version, status, len(body), fields, body)


class RecordingTransport(StringTransport):
    """A L{StringTransport} that keeps each write and notes an abort."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class PausingTransport(RecordingTransport):
    """A transport that pauses its producer after every write (a full socket buffer)."""

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None:
            self.producer.pauseProducing()


class Attempt:
    """One connection attempt made through L{FakeEndpoints}."""

    def __init__(self, factory: Any, cancellable: bool) -> None:
        self.factory = factory
        self.cancelled = False
        self.deferred: Deferred[Any] = Deferred(self._cancel if cancellable else None)

    def _cancel(self, d: "Deferred[Any]") -> None:
        self.cancelled = True
        d.errback(ConnectingCancelledError(IPv4Address("TCP", "127.0.0.1", 80)))

    def succeed(self, transport_class: type[RecordingTransport] = RecordingTransport) -> tuple[Any, RecordingTransport]:
        """Connect over a new C{transport_class}: the protocol and its transport."""
        protocol = self.factory.buildProtocol(None)
        transport = transport_class()
        protocol.makeConnection(transport)
        self.deferred.callback(protocol)
        return protocol, transport


class FakeEndpoints:
    """An endpoint factory whose connection attempts the test completes."""

    def __init__(self, cancellable: bool = True) -> None:
        self.cancellable = cancellable
        self.attempts: list[Attempt] = []
        self.uris: list[tuple[bytes, bytes, int]] = []
        self.connections: list[tuple[Any, RecordingTransport]] = []

    def endpointForURI(self, uri: Any) -> "FakeEndpoints":
        self.uris.append((uri.scheme, uri.host, uri.port))
        return self

    def connect(self, factory: Any) -> "Deferred[Any]":
        attempt = Attempt(factory, self.cancellable)
        self.attempts.append(attempt)
        return attempt.deferred


class ClientMixin:
    """A client over L{FakeEndpoints} on a L{Clock}."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoints = FakeEndpoints()
        self.client = HTTP11Client(self.clock, self.endpoints)

    def request(
        self,
        body: Any = b"{}",
        method: bytes = b"POST",
        url: bytes = URL,
        headers: Optional[dict[bytes, list[bytes]]] = None,
    ) -> "Deferred[Answer]":
        return self.client.request(method, url, HEADERS if headers is None else headers, body)

    def connected(self, body: Any = b"{}", method: bytes = b"POST") -> tuple["Deferred[Answer]", Any, RecordingTransport]:
        """
        A request, on a new connection or on the pooled one it took: its
        Deferred, protocol and transport.
        """
        before = len(self.endpoints.attempts)
        written = [(p, t, len(t.writes)) for p, t in self.endpoints.connections]
        d = self.request(body, method)
        if len(self.endpoints.attempts) > before:
            protocol, transport = self.endpoints.attempts[-1].succeed()
            self.endpoints.connections.append((protocol, transport))
            return d, protocol, transport
        [(protocol, transport)] = [(p, t) for p, t, n in written if len(t.writes) > n]
        return d, protocol, transport


class URLTests(SynchronousTestCase):
    """L{parse_url}: a wire-form URL, parsed once."""

    def test_default_port(self) -> None:
        """The scheme's default port is implied and not in the Host field."""
        target = parse_url(b"https://api.example.com/v1/emails?per_page=1")
        self.assertEqual((target.scheme, target.host, target.port), (b"https", b"api.example.com", 443))
        self.assertEqual(target.request_tail, b" /v1/emails?per_page=1 HTTP/1.1\r\nHost: api.example.com\r\n")

    def test_explicit_port(self) -> None:
        """Another port is in the Host field; a default port given explicitly is not."""
        self.assertEqual(parse_url(b"http://127.0.0.1:8080/x").request_tail, b" /x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n")
        self.assertEqual(parse_url(b"http://h:80/x").request_tail, b" /x HTTP/1.1\r\nHost: h\r\n")

    def test_ipv6(self) -> None:
        """An IPv6 literal connects without brackets and keeps them in the Host field."""
        target = parse_url(b"http://[::1]:8025/emails")
        self.assertEqual((target.host, target.port), (b"::1", 8025))
        self.assertIn(b"Host: [::1]:8025\r\n", target.request_tail)

    def test_empty_path_query_fragment(self) -> None:
        """No path is "/", a bare query gets "/" before it, and a fragment is not sent."""
        self.assertTrue(parse_url(b"http://h").request_tail.startswith(b" / HTTP/1.1"))
        self.assertTrue(parse_url(b"http://h?a=1").request_tail.startswith(b" /?a=1 HTTP/1.1"))
        self.assertTrue(parse_url(b"http://h/p#frag").request_tail.startswith(b" /p HTTP/1.1"))

    def test_case(self) -> None:
        """Scheme and host are case-insensitive (lower-cased)."""
        target = parse_url(b"HTTP://API.Example.COM/Emails")
        self.assertEqual((target.scheme, target.host), (b"http", b"api.example.com"))
        self.assertIn(b" /Emails ", target.request_tail)

    def test_refused(self) -> None:
        """Anything but an absolute http(s) URL in wire form is a ValueError."""
        for url in (
            b"ftp://h/",
            b"http://user:pw@h/",
            b"http://h:0/",
            b"http://h:65536/",
            b"http://h/a b",
            b"http://h/\xc3\xa9",
            b"http://h/a\r\nX: y",
            b"/emails",
            b"http:///x",
        ):
            with self.assertRaises(ValueError, msg=url):
                parse_url(url)

    def test_cached(self) -> None:
        """A URL is parsed on its first request only."""
        endpoints = FakeEndpoints()
        client = HTTP11Client(Clock(), endpoints)
        client.request(b"GET", URL, {})
        target = client._targets[URL]
        client.request(b"GET", URL, {})
        self.assertIs(client._targets[URL], target)
        self.assertEqual(endpoints.uris, [KEY, KEY])

    def test_bad_url_fails(self) -> None:
        """A bad URL fails the request's Deferred; nothing connects."""
        endpoints = FakeEndpoints()
        client = HTTP11Client(Clock(), endpoints)
        self.failureResultOf(client.request(b"GET", b"gopher://h/", {}), ValueError)
        self.assertEqual(endpoints.attempts, [])


class RequestWritingTests(ClientMixin, SynchronousTestCase):
    """What goes on the wire."""

    def test_one_write(self) -> None:
        """A small request is the head and body in one write, in order, with Content-Length and Host."""
        d, _, transport = self.connected(b'{"a":1}')
        self.assertEqual(
            transport.writes,
            [
                b"POST /emails HTTP/1.1\r\nHost: api.example.com\r\n"
                b"Authorization: Bearer " + SECRET + b"\r\n"
                b"Content-Type: application/json\r\n"
                b"Content-Length: 7\r\n\r\n"
                b'{"a":1}'
            ],
        )
        self.assertNoResult(d)

    def test_pieces_joined(self) -> None:
        """Small pieces (bytes and ASCII str) are joined into the same one write."""
        _, _, transport = self.connected([b'{"c":"', "QUJD", b'"}'])
        [data] = transport.writes
        self.assertTrue(data.endswith(b'Content-Length: 12\r\n\r\n{"c":"QUJD"}'))

    def test_get_without_body(self) -> None:
        """A GET without a body has no Content-Length; a POST without one has Content-Length: 0."""
        _, _, transport = self.connected(None, b"GET")
        self.assertEqual(transport.value(), b"GET /emails HTTP/1.1\r\nHost: api.example.com\r\n"
                         b"Authorization: Bearer " + SECRET + b"\r\nContent-Type: application/json\r\n\r\n")
        _, _, transport = self.connected(None, b"POST")
        self.assertTrue(transport.value().endswith(b"\r\nContent-Length: 0\r\n\r\n"))

    def test_no_connection_field(self) -> None:
        """No Connection field is sent (HTTP/1.1 keeps alive by default)."""
        _, _, transport = self.connected()
        self.assertNotIn(b"connection", transport.value().lower())

    def test_port_in_host(self) -> None:
        """A non-default port is in the Host field."""
        self.client.request(b"GET", b"http://127.0.0.1:8025/emails?per_page=1", {}, None)
        _, transport = self.endpoints.attempts[-1].succeed()
        self.assertEqual(transport.value(), b"GET /emails?per_page=1 HTTP/1.1\r\nHost: 127.0.0.1:8025\r\n\r\n")
        self.assertEqual(self.endpoints.uris, [(b"http", b"127.0.0.1", 8025)])

    def test_line_breaks_in_values(self) -> None:
        """CR, LF and NUL in a value become spaces: a value can never add a field."""
        headers = {b"Authorization": [b"Bearer x\r\nX-Injected: yes\x00z"]}
        self.request(headers=headers)
        _, transport = self.endpoints.attempts[-1].succeed()
        self.assertIn(b"\r\nAuthorization: Bearer x X-Injected: yes z\r\n", transport.value())
        self.assertEqual(transport.value().count(b"\r\n"), 5)

    def test_own_fields_refused(self) -> None:
        """Host, Content-Length, Transfer-Encoding and Connection are the client's: a ValueError, nothing sent."""
        for name in (b"Host", b"content-length", b"Transfer-Encoding", b"CONNECTION"):
            self.failureResultOf(self.request(headers={name: [b"x"]}), ValueError)
        self.assertEqual(self.endpoints.attempts, [])

    def test_bad_names_refused(self) -> None:
        """A field name or method that is not a token is a ValueError whose text has no value in it."""
        failure = self.failureResultOf(
            self.request(headers={b"Bad Name": [SECRET], b"Authorization": [SECRET]}), ValueError
        )
        self.assertNotIn(SECRET.decode(), str(failure.value))
        self.failureResultOf(self.request(method=b"PO ST"), ValueError)
        self.assertEqual(self.endpoints.attempts, [])

    def test_non_ascii_str_piece_refused(self) -> None:
        """A str piece of the body must be ASCII."""
        self.failureResultOf(self.request([b"{", "\u00e9", b"}"]), ValueError)
        self.failureResultOf(self.request([b"{", 1, b"}"]), TypeError)


class ParsingMixin(ClientMixin):
    """Feed an answer to a fresh request."""

    def feed(self, *chunks: bytes, method: bytes = b"POST") -> tuple["Deferred[Answer]", Any, RecordingTransport]:
        d, protocol, transport = self.connected(method=method)
        for chunk in chunks:
            protocol.dataReceived(chunk)
        return d, protocol, transport

    def parsed(self, *chunks: bytes, method: bytes = b"POST") -> Answer:
        d, _, _ = self.feed(*chunks, method=method)
        return self.successResultOf(d)

    def malformed(self, *chunks: bytes) -> str:
        """The answer is refused: ResponseFailed, the connection aborted; the rule's text."""
        d, _, transport = self.feed(*chunks)
        failure = self.failureResultOf(d, ResponseFailed)
        self.assertNotIsInstance(failure.value, ResponseNeverReceived)
        [reason] = failure.value.reasons
        self.assertIsInstance(reason.value, MalformedResponse)
        self.assertTrue(transport.aborted)
        self.assertEqual(self.client.idle_count(*KEY), 0)
        return str(reason.value)

    def bytewise(self, data: bytes) -> list[bytes]:
        return [data[i : i + 1] for i in range(len(data))]


class ParsingTests(ParsingMixin, SynchronousTestCase):
    """The strict response parser."""

    def test_content_length(self) -> None:
        """Status, reason, version, fields and content of a Content-Length answer."""
        result = self.parsed(answer(b'{"id":"em_1"}', b"202 Accepted", b"X-Request-Id: req_1\r\n"))
        self.assertEqual((result.code, result.phrase, result.version), (202, b"Accepted", (1, 1)))
        self.assertEqual(result.content, b'{"id":"em_1"}')
        self.assertEqual(result.headers.getRawHeaders(b"x-request-id"), [b"req_1"])

    def test_byte_by_byte(self) -> None:
        """An answer that arrives one byte at a time is the same answer."""
        data = answer(b"x" * 100, fields=b"Retry-After: 3\r\n")
        result = self.parsed(*self.bytewise(data))
        self.assertEqual((result.code, result.content), (200, b"x" * 100))

    def test_headers_case_insensitive(self) -> None:
        """Field names are matched in any case (bytes or str); repeated fields keep their order; values lose OWS."""
        result = self.parsed(answer(fields=b"RETRY-AFTER:  3 \r\nVary: a\r\nvary:b\r\nEmpty:\r\n"))
        self.assertEqual(result.headers.getRawHeaders(b"Retry-After"), [b"3"])
        self.assertEqual(result.headers.getRawHeaders("retry-after"), [b"3"])
        self.assertEqual(result.headers.getRawHeaders(b"VARY"), [b"a", b"b"])
        self.assertEqual(result.headers.getRawHeaders(b"empty"), [b""])
        self.assertIsNone(result.headers.getRawHeaders(b"missing"))
        self.assertEqual(result.headers.getRawHeaders(b"missing", [b"d"]), [b"d"])
        self.assertTrue(result.headers.hasHeader(b"Vary"))

    def test_no_reason_phrase(self) -> None:
        """A status line without a reason phrase (with or without its space) is accepted."""
        for status in (b"HTTP/1.1 200\r\n", b"HTTP/1.1 200 \r\n"):
            result = self.parsed(status + b"Content-Length: 2\r\n\r\nok")
            self.assertEqual((result.code, result.phrase, result.content), (200, b"", b"ok"))

    def test_malformed_status(self) -> None:
        """A status line that is not HTTP/1.x NNN reason is refused."""
        for line in (
            b"HTTP/2 200 OK",
            b"HTTP/1.2 200 OK",
            b"HTTP/1.1 20 OK",
            b"HTTP/1.1 2000 OK",
            b"HTTP/1.1 200OK",
            b"HTTP/1.1  200 OK",
            b"HTTP/1.1 600 Weird",
            b"HTTP/1.1 099 Low",
            b"ICY 200 OK",
            b"http/1.1 200 OK",
            b"garbage",
            b"",
        ):
            text = self.malformed(line + b"\r\nContent-Length: 0\r\n\r\n")
            self.assertIn("status line", text, line)

    def test_leading_empty_line(self) -> None:
        """An empty line before the status line is refused."""
        self.malformed(b"\r\n" + answer())

    def test_obs_fold(self) -> None:
        """A folded field line (obs-fold) is refused."""
        text = self.malformed(b"HTTP/1.1 200 OK\r\nX-A: a\r\n  continued\r\nContent-Length: 0\r\n\r\n")
        self.assertIn("folding", text)
        self.malformed(b"HTTP/1.1 200 OK\r\n\tX-A: a\r\nContent-Length: 0\r\n\r\n")

    def test_bad_field_lines(self) -> None:
        """A line without a colon, a name that is not a token, whitespace before the colon, a control character or a bare CR or LF is refused."""
        for fields in (
            b"NoColon\r\n",
            b"Content-Type\r\n",
            b"Bad Name: x\r\n",
            b"X-A : x\r\n",
            b": empty name\r\n",
            b"X-A: a\x00b\r\n",
            b"X-A: a\x1bb\r\n",
            b"X-A: a\rb\r\n",
            b"X-A: a\nb\r\n",
        ):
            self.malformed(b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 0\r\n\r\n")

    def test_head_limits(self) -> None:
        """A head over 64 KiB, or a line over 16 KiB, is refused; lines at the limit are fine."""
        at_limit = b"X-A: " + b"a" * (MAX_LINE - 5) + b"\r\n"
        result = self.parsed(b"HTTP/1.1 200 OK\r\n" + at_limit + b"Content-Length: 0\r\n\r\n")
        self.assertEqual(len(result.headers.getRawHeaders(b"x-a")[0]), MAX_LINE - 5)
        over = b"X-A: " + b"a" * (MAX_LINE - 4) + b"\r\n"
        self.assertIn("line over", self.malformed(b"HTTP/1.1 200 OK\r\n" + over + b"Content-Length: 0\r\n\r\n"))
        many = b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000) for i in range(70))
        self.assertGreater(len(many), MAX_HEAD)
        self.assertIn("head over", self.malformed(b"HTTP/1.1 200 OK\r\n" + many + b"\r\n"))

    def test_head_limit_before_end(self) -> None:
        """A head that never ends is refused as soon as it passes a limit, without waiting for more."""
        d, protocol, transport = self.feed(b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * MAX_LINE)
        self.failureResultOf(d, ResponseFailed)
        d, protocol, transport = self.feed(b"HTTP/1.1 200 OK\r\n", *[b"X-A: b\r\n" * 1000] * 10)
        self.failureResultOf(d, ResponseFailed)
        self.assertTrue(transport.aborted)

    def test_interim_skipped(self) -> None:
        """100 Continue and other 1xx answers (with fields) are skipped; the final answer counts."""
        result = self.parsed(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
            + answer(b"done", b"202 Accepted")
        )
        self.assertEqual((result.code, result.content), (202, b"done"))
        self.assertIsNone(result.headers.getRawHeaders(b"link"))

    def test_interim_split(self) -> None:
        """A 1xx answer and the final one split across reads anywhere."""
        data = b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"done")
        self.assertEqual(self.parsed(*self.bytewise(data)).content, b"done")

    def test_switching_protocols(self) -> None:
        """101 was not asked for: refused."""
        self.assertIn("101", self.malformed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"))

    def test_endless_interim(self) -> None:
        """More than 16 interim answers are refused."""
        self.malformed(b"HTTP/1.1 100 Continue\r\n\r\n" * 17 + answer())

    def test_no_content_statuses(self) -> None:
        """204 and 304 have no content, whatever their fields say; the connection is reused."""
        for status in (b"204 No Content", b"304 Not Modified"):
            result = self.parsed(b"HTTP/1.1 " + status + b"\r\nContent-Length: 5\r\n\r\n")
            self.assertEqual(result.content, b"")
            self.assertEqual(self.client.idle_count(*KEY), 1)
        self.assertEqual(len(self.endpoints.attempts), 1)

    def test_head_request(self) -> None:
        """The answer to HEAD has no content, even with a Content-Length; reused."""
        result = self.parsed(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", method=b"HEAD")
        self.assertEqual((result.code, result.content), (200, b""))
        self.assertEqual(result.headers.getRawHeaders(b"content-length"), [b"1234"])
        self.assertEqual(self.client.idle_count(*KEY), 1)

    def test_content_length_duplicates(self) -> None:
        """Equal Content-Length values (one field or several) are one length."""
        for fields in (b"Content-Length: 2, 2\r\n", b"Content-Length: 2\r\nContent-Length: 02\r\n"):
            result = self.parsed(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\nok")
            self.assertEqual(result.content, b"ok")

    def test_content_length_invalid(self) -> None:
        """Differing or non-digit Content-Length values are refused."""
        for value in (b"2, 3", b"+2", b"-1", b"0x2", b"2.0", b"", b"2 2", b"\xd9\xa2"):
            self.malformed(b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n\r\nok")
        self.malformed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok")

    def test_content_length_zero(self) -> None:
        """Content-Length: 0 is an empty answer, complete at once."""
        result = self.parsed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(result.content, b"")

    def test_body_limit(self) -> None:
        """A Content-Length over 1 MiB is refused before any content is read; 1 MiB exactly is fine."""
        self.assertIn("over", self.malformed(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)))
        self.malformed(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n")
        result = self.parsed(answer(b"a" * MAX_BODY))
        self.assertEqual(len(result.content), MAX_BODY)

    def test_chunked(self) -> None:
        """Chunked content, with chunk extensions and trailer fields, is joined; trailers are not fields."""
        result = self.parsed(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4;name=value\r\nabcd\r\n"
            b"A ; a=1;b=\"q\"\r\n0123456789\r\n"
            b"0\r\nX-Trailer: t\r\n\r\n"
        )
        self.assertEqual(result.content, b"abcd0123456789")
        self.assertIsNone(result.headers.getRawHeaders(b"x-trailer"))
        self.assertEqual(self.client.idle_count(*KEY), 1)

    def test_chunked_bytewise(self) -> None:
        """Chunked content split at every byte is the same content."""
        data = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n"
            b"3;x=y\r\nabc\r\n10\r\n" + b"z" * 16 + b"\r\n0\r\nT: 1\r\n\r\n"
        )
        result = self.parsed(*self.bytewise(data))
        self.assertEqual(result.content, b"abc" + b"z" * 16)
        self.assertEqual(self.client.idle_count(*KEY), 1)

    def test_chunked_malformed(self) -> None:
        """Bad chunk sizes, data not followed by CRLF and bad trailers are refused."""
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        for body in (
            b"g\r\n",
            b"-1\r\n",
            b"\r\n",
            b" 1\r\nx\r\n0\r\n\r\n",
            b"0x1\r\nx\r\n",
            b"11111111111111111\r\n",
            b"1\r\nxy\r\n0\r\n\r\n",
            b"1\r\nx\n0\r\n\r\n",
            b"1;\x00\r\nx\r\n0\r\n\r\n",
            b"0\r\n folded: t\r\n\r\n",
            b"0\r\nno colon\r\n\r\n",
        ):
            self.malformed(head + body)

    def test_chunked_limits(self) -> None:
        """Chunked content over 1 MiB in all, or a chunk-size line over 4 KiB, is refused."""
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        self.malformed(head + b"%x\r\n" % (MAX_BODY + 1,))
        chunk = b"%x\r\n%s\r\n" % (MAX_BODY // 2, b"a" * (MAX_BODY // 2))
        self.malformed(head + chunk + chunk + b"1\r\n")
        self.malformed(head + b"1;" + b"x" * 5000)
        self.malformed(head + b"0\r\n" + b"X-T: a\r\n" * 10000)

    def test_transfer_encoding_rules(self) -> None:
        """Only plain chunked is understood; with Content-Length, or in HTTP/1.0, it is refused."""
        for fields in (
            b"Transfer-Encoding: gzip\r\n",
            b"Transfer-Encoding: gzip, chunked\r\n",
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
        ):
            self.malformed(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n0\r\n\r\n")
        self.malformed(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")

    def test_until_close(self) -> None:
        """Without framing fields the content runs until the server closes; that connection is not reused."""
        d, protocol, transport = self.feed(b"HTTP/1.1 200 OK\r\n\r\nsome ", b"content")
        self.assertNoResult(d)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.successResultOf(d).content, b"some content")
        self.assertEqual(self.client.idle_count(*KEY), 0)

    def test_until_close_reset(self) -> None:
        """Content until close cut by a reset (not a clean close) is a ResponseFailed."""
        d, protocol, _ = self.feed(b"HTTP/1.1 200 OK\r\n\r\nsome ")
        protocol.connectionLost(Failure(ConnectionLost()))
        failure = self.failureResultOf(d, ResponseFailed)
        self.assertNotIsInstance(failure.value, ResponseNeverReceived)

    def test_until_close_limit(self) -> None:
        """Content until close over 1 MiB is refused."""
        self.malformed(b"HTTP/1.0 200 OK\r\n\r\n", b"a" * MAX_BODY, b"a")

    def test_errors_name_no_bytes(self) -> None:
        """A refused answer's error text never quotes it (a server may echo a key back)."""
        for data in (
            b"HTTP/1.1 200 " + SECRET + b"\x00\r\n\r\n",
            b"HTTP/9 200 " + SECRET + b"\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n Authorization: " + SECRET + b"\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nAuthorization " + SECRET + b"\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: " + SECRET + b"\r\n\r\n",
        ):
            d, _, _ = self.feed(data)
            failure = self.failureResultOf(d, ResponseFailed)
            shown = str(failure.value) + repr(failure.value) + failure.getTraceback()
            for reason in failure.value.reasons:
                shown += str(reason.value) + repr(reason.value) + reason.getTraceback()
            self.assertNotIn(SECRET.decode(), shown)


class ReuseTests(ParsingMixin, SynchronousTestCase):
    """Which connections go back to the pool, and how the pool keeps them."""

    def test_reused(self) -> None:
        """A complete HTTP/1.1 answer puts the connection back; the next request uses it without connecting."""
        d, protocol, transport = self.feed(answer())
        self.successResultOf(d)
        self.assertEqual(self.client.idle_count(*KEY), 1)
        transport.clear()
        d2 = self.request(b"{}")
        self.assertEqual(len(self.endpoints.attempts), 1)
        self.assertTrue(transport.value().startswith(b"POST /emails HTTP/1.1\r\n"))
        self.assertEqual(self.client.idle_count(*KEY), 0)
        protocol.dataReceived(answer(b"second"))
        self.assertEqual(self.successResultOf(d2).content, b"second")
        self.assertFalse(transport.disconnecting)

    def test_reused_from_callback(self) -> None:
        """A request made from the previous answer's callback reuses the connection cleanly."""
        d, protocol, transport = self.connected()
        seconds: list[Deferred[Answer]] = []
        d.addCallback(lambda _: seconds.append(self.request(b"{}")))
        transport.clear()
        protocol.dataReceived(answer(b"first"))
        [d2] = seconds
        self.assertEqual(len(self.endpoints.attempts), 1)
        self.assertTrue(transport.value().startswith(b"POST /emails"))
        protocol.dataReceived(answer(b"second"))
        self.assertEqual(self.successResultOf(d2).content, b"second")

    def test_not_reused(self) -> None:
        """Connection: close, HTTP/1.0 (even with keep-alive), content until close and bytes past the answer: closed, not kept."""
        for data in (
            answer(fields=b"Connection: close\r\n"),
            answer(fields=b"Connection: Keep-Alive, CLOSE\r\n"),
            answer(version=b"HTTP/1.0", fields=b"Connection: keep-alive\r\n"),
            answer() + b"HTTP/1.1 200 OK\r\n",
            answer() + b"\r\n",
        ):
            d, _, transport = self.feed(data)
            self.successResultOf(d)
            self.assertTrue(transport.disconnecting, data)
            self.assertEqual(self.client.idle_count(*KEY), 0)

    def test_bytes_on_idle(self) -> None:
        """Any byte on an idle connection closes it and takes it out of the pool."""
        d, protocol, transport = self.feed(answer())
        self.successResultOf(d)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(transport.aborted)
        self.assertEqual(self.client.idle_count(*KEY), 0)
        self.request()
        self.assertEqual(len(self.endpoints.attempts), 2)

    def test_server_closes_idle(self) -> None:
        """An idle connection the server closes leaves the pool; the next request connects anew."""
        d, protocol, _ = self.feed(answer())
        self.successResultOf(d)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.client.idle_count(*KEY), 0)
        self.request()
        self.assertEqual(len(self.endpoints.attempts), 2)

    def test_lifo(self) -> None:
        """The connection that went idle last is used first."""
        d1, p1, t1 = self.connected()
        d2, p2, t2 = self.connected()
        p1.dataReceived(answer())
        p2.dataReceived(answer())
        t1.clear()
        t2.clear()
        self.request()
        self.assertEqual((t1.value(), bool(t2.value())), (b"", True))

    def test_max_idle(self) -> None:
        """At most max_idle_per_host idle connections are kept: the oldest is closed to keep the newest."""
        self.client = HTTP11Client(self.clock, self.endpoints, max_idle_per_host=2)
        connections = [self.connected() for _ in range(3)]
        for _, protocol, _ in connections:
            protocol.dataReceived(answer())
        self.assertEqual(self.client.idle_count(*KEY), 2)
        self.assertEqual([t.disconnecting for _, _, t in connections], [True, False, False])

    def test_no_idle(self) -> None:
        """max_idle_per_host=0 keeps nothing."""
        self.client = HTTP11Client(self.clock, self.endpoints, max_idle_per_host=0)
        d, _, transport = self.feed(answer())
        self.successResultOf(d)
        self.assertTrue(transport.disconnecting)

    def test_per_host(self) -> None:
        """Pools are per scheme, host and port."""
        d, protocol, _ = self.feed(answer())
        self.client.request(b"POST", b"http://api.example.com:8080/emails", HEADERS, b"{}")
        self.client.request(b"POST", b"https://api.example.com/emails", HEADERS, b"{}")
        self.assertEqual(len(self.endpoints.attempts), 3)
        self.assertEqual(self.endpoints.uris[1:], [(b"http", b"api.example.com", 8080), (b"https", b"api.example.com", 443)])

    def test_idle_timeout(self) -> None:
        """An idle connection is closed idle_timeout seconds after its answer, not before."""
        self.client = HTTP11Client(self.clock, self.endpoints, idle_timeout=30)
        d, protocol, transport = self.feed(answer())
        self.clock.advance(29.9)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.client.idle_count(*KEY), 1)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.client.idle_count(*KEY), 0)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idle_timeout_restarts_on_use(self) -> None:
        """A connection used again gets a new idle time; each expires on its own."""
        self.client = HTTP11Client(self.clock, self.endpoints, idle_timeout=30)
        d1, p1, t1 = self.connected()
        d2, p2, t2 = self.connected()
        p1.dataReceived(answer())
        p2.dataReceived(answer())
        self.clock.advance(20)
        self.request()  # takes p2 (LIFO)
        p2.dataReceived(answer())
        self.clock.advance(10)
        self.assertEqual((t1.disconnecting, t2.disconnecting), (True, False))
        self.clock.advance(19.9)
        self.assertFalse(t2.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(t2.disconnecting)

    def test_keep_alive_hint(self) -> None:
        """A server's Keep-Alive: timeout=N shortens the idle time to N - 1 seconds; timeout=1 keeps nothing."""
        d, _, transport = self.feed(answer(fields=b"Keep-Alive: timeout=5, max=100\r\n"))
        self.clock.advance(3.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        d, _, transport = self.feed(answer(fields=b"Keep-Alive: timeout=1\r\n"))
        self.assertTrue(transport.disconnecting)

    def test_expired_not_used(self) -> None:
        """An idle connection past its time is never used, even if the sweep has not run yet."""
        d1, p1, t1 = self.connected()
        p1.dataReceived(answer(fields=b"Keep-Alive: timeout=300\r\n"))  # sweep planned at 240
        d2, p2, t2 = self.connected()
        p2.dataReceived(answer(fields=b"Keep-Alive: timeout=3\r\n"))  # expires at 2
        self.clock.rightNow += 2.5  # time passes, no timer runs
        self.request()
        self.assertTrue(t2.disconnecting)
        self.assertEqual(len(self.endpoints.attempts), 2)
        self.assertEqual(t1.value().count(b"POST /emails"), 2)

    def test_close_idle(self) -> None:
        """close_idle closes every idle connection, leaves requests in progress alone, and fires once they are closed."""
        d2, p2, t2 = self.connected()
        d1, p1, t1 = self.feed(answer())
        done = self.client.close_idle()
        self.assertTrue(t1.disconnecting)
        self.assertFalse(t2.disconnecting)
        self.assertNoResult(done)
        p1.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(done)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        p2.dataReceived(answer(b"late"))
        self.assertEqual(self.successResultOf(d2).content, b"late")

    def test_close_grace(self) -> None:
        """A politely closed connection that stays open is aborted after CLOSE_GRACE seconds."""
        d, _, transport = self.feed(answer())
        done = self.client.close_idle()
        self.clock.advance(CLOSE_GRACE - 0.1)
        self.assertFalse(transport.aborted)
        self.clock.advance(0.1)
        self.assertTrue(transport.aborted)
        self.assertNoResult(done)


class StreamingTests(ParsingMixin, SynchronousTestCase):
    """Large bodies are streamed with back-pressure."""

    def setUp(self) -> None:
        super().setUp()
        self.big = "QUJD" * (api.STREAM_MIN_CONTENT // 4)
        self.pieces: list[bytes | str] = [b'{"c":"', self.big, b'"}']
        self.expected = b'{"c":"' + self.big.encode() + b'"}'

    def start(self) -> tuple["Deferred[Answer]", Any, RecordingTransport]:
        d = self.request(self.pieces)
        protocol, transport = self.endpoints.attempts[-1].succeed()
        return d, protocol, transport

    def test_streamed(self) -> None:
        """The head is written alone, then the body in slices of at most 64 KiB; Content-Length is the total."""
        d, protocol, transport = self.start()
        head = transport.writes[0]
        self.assertTrue(head.endswith(b"Content-Length: %d\r\n\r\n" % (len(self.expected),)))
        self.assertGreater(len(transport.writes), 3)
        self.assertLessEqual(max(len(w) for w in transport.writes[1:]), 64 * 1024)
        self.assertEqual(b"".join(transport.writes[1:]), self.expected)
        self.assertIsNone(transport.producer)  # unregistered once written
        protocol.dataReceived(answer())
        self.successResultOf(d)
        self.assertEqual(self.client.idle_count(*KEY), 1)

    def test_pause_resume(self) -> None:
        """A paused body writes nothing until resumed, then goes on where it stopped."""
        d = self.request(self.pieces)
        protocol, transport = self.endpoints.attempts[-1].succeed(PausingTransport)
        self.assertEqual(len(transport.writes), 2)  # the head, one slice
        for _ in range(100):
            if transport.producer is None:
                break
            transport.producer.resumeProducing()
        self.assertEqual(b"".join(transport.writes[1:]), self.expected)
        protocol.dataReceived(answer())
        self.successResultOf(d)

    def test_large_total_streamed(self) -> None:
        """Small pieces over 1 MiB in all, or one bytes body over 1 MiB, are streamed too."""
        for body in ([b"a" * 600_000, b"b" * 600_000], b"c" * (MAX_BODY + 1)):
            d = self.request(body)
            protocol, transport = self.endpoints.attempts[-1].succeed()
            self.assertLess(len(transport.writes[0]), 1000)
            self.assertEqual(b"".join(transport.writes[1:]), b"".join(body) if isinstance(body, list) else body)

    def test_early_answer(self) -> None:
        """An answer complete while the body is still streaming: the body stops, the connection is aborted, not reused, and the answer is delivered."""
        d = self.request(self.pieces)
        protocol, transport = self.endpoints.attempts[-1].succeed(PausingTransport)
        producer = transport.producer
        protocol.dataReceived(answer(b'{"error":"too large"}', b"413 Payload Too Large"))
        result = self.successResultOf(d)
        self.assertEqual(result.code, 413)
        self.assertTrue(transport.aborted)
        self.assertIsNone(transport.producer)
        written = len(transport.writes)
        producer.resumeProducing()
        self.assertEqual(len(transport.writes), written)
        self.assertEqual(self.client.idle_count(*KEY), 0)

    def test_head_before_body_done(self) -> None:
        """An answer's head may arrive early; if the body is all written before the answer ends, the connection is reused."""
        d = self.request(self.pieces)
        protocol, transport = self.endpoints.attempts[-1].succeed(PausingTransport)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no")
        for _ in range(100):
            if transport.producer is None:
                break
            transport.producer.resumeProducing()
        protocol.dataReceived(b"k")
        self.assertEqual(self.successResultOf(d).content, b"ok")
        self.assertEqual(self.client.idle_count(*KEY), 1)

    def test_lost_while_streaming(self) -> None:
        """A connection lost while the body is streaming, before any answer: RequestTransmissionFailed."""
        d = self.request(self.pieces)
        protocol, transport = self.endpoints.attempts[-1].succeed(PausingTransport)
        producer = transport.producer
        protocol.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(d, RequestTransmissionFailed)
        producer.resumeProducing()
        self.assertEqual(len(transport.writes), 2)


class CancellationTests(ParsingMixin, SynchronousTestCase):
    """Cancelling a request's Deferred, in every state."""

    def test_connecting(self) -> None:
        """Cancelled while connecting: the connection attempt is cancelled; CancelledError."""
        d = self.request()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(self.endpoints.attempts[0].cancelled)

    def test_connecting_no_canceller(self) -> None:
        """An endpoint that cannot cancel its attempt: still CancelledError at once."""
        self.endpoints.cancellable = False
        d = self.request()
        d.cancel()
        self.failureResultOf(d, CancelledError)

    def test_connect_fires_after_cancel(self) -> None:
        """A connection that completes as its request is cancelled is aborted, never used or pooled."""
        made: list[RecordingTransport] = []

        class Racing(FakeEndpoints):
            def connect(inner, factory: Any) -> "Deferred[Any]":
                def connect_anyway(d: "Deferred[Any]") -> None:
                    protocol = factory.buildProtocol(None)
                    transport = RecordingTransport()
                    protocol.makeConnection(transport)
                    made.append(transport)
                    d.callback(protocol)

                return Deferred(connect_anyway)

        client = HTTP11Client(self.clock, Racing())
        d = client.request(b"POST", URL, HEADERS, b"{}")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        [transport] = made
        self.assertTrue(transport.aborted)
        self.assertEqual(transport.writes, [])
        self.assertEqual(client.idle_count(*KEY), 0)

    def test_sending(self) -> None:
        """Cancelled while the body is streaming: the body stops, the connection is aborted."""
        d = self.request(["x" * api.STREAM_MIN_CONTENT])
        protocol, transport = self.endpoints.attempts[-1].succeed(PausingTransport)
        producer = transport.producer
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(transport.aborted)
        self.assertIsNone(transport.producer)
        producer.resumeProducing()
        self.assertEqual(len(transport.writes), 2)
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.client.idle_count(*KEY), 0)

    def test_waiting_for_head(self) -> None:
        """Cancelled after the request was written: aborted; a late answer or loss changes nothing."""
        d, protocol, transport = self.feed(b"HTTP/1.1 200")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(transport.aborted)
        protocol.dataReceived(b" OK\r\nContent-Length: 0\r\n\r\n")
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.client.idle_count(*KEY), 0)

    def test_reading_body(self) -> None:
        """Cancelled while the content arrives: aborted, never pooled."""
        for first in (
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
            b"HTTP/1.1 200 OK\r\n\r\nabc",
        ):
            d, protocol, transport = self.feed(first)
            d.cancel()
            self.failureResultOf(d, CancelledError)
            self.assertTrue(transport.aborted)
            protocol.connectionLost(Failure(ConnectionDone()))
            self.assertEqual(self.client.idle_count(*KEY), 0)

    def test_cancel_after_answer(self) -> None:
        """Cancelling a request that already has its answer changes nothing (the connection stays pooled)."""
        d, _, transport = self.feed(answer())
        d.cancel()
        self.successResultOf(d)
        self.assertFalse(transport.aborted)
        self.assertEqual(self.client.idle_count(*KEY), 1)


class ConnectionLostTests(ParsingMixin, SynchronousTestCase):
    """Each way a connection can end, and the error it gives."""

    def test_connect_errors_as_they_are(self) -> None:
        """A refused connection or a failed lookup fails with the endpoint's own error (a network error for the relay)."""
        for error in (ConnectionRefusedError(), DNSLookupError("api.example.com")):
            d = self.request()
            self.endpoints.attempts[-1].deferred.errback(error)
            failure = self.failureResultOf(d, type(error))
            self.assertIsInstance(failure.value, _NETWORK_ERRORS)

    def test_endpoint_raises(self) -> None:
        """An endpoint factory that raises fails the request with its error."""

        class Raising(FakeEndpoints):
            def endpointForURI(inner, uri: Any) -> Any:
                raise DNSLookupError("no")

        client = HTTP11Client(self.clock, Raising())
        self.failureResultOf(client.request(b"GET", URL, {}), DNSLookupError)

    def test_before_any_byte(self) -> None:
        """Lost after the request, before any answer byte: ResponseNeverReceived, with the reason."""
        d, protocol, _ = self.feed()
        protocol.connectionLost(Failure(ConnectionLost()))
        failure = self.failureResultOf(d, ResponseNeverReceived)
        self.assertTrue(failure.value.reasons[0].check(ConnectionLost))

    def test_keep_alive_race(self) -> None:
        """A request on a reused connection that the server closes before answering: ResponseNeverReceived, no retry."""
        d, protocol, _ = self.feed(answer())
        self.successResultOf(d)
        d2 = self.request()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d2, ResponseNeverReceived)
        self.assertEqual(len(self.endpoints.attempts), 1)

    def test_mid_answer(self) -> None:
        """Lost in the head, in Content-Length content or in chunked content: ResponseFailed (not NeverReceived)."""
        for partial in (
            b"HTTP/1.1 200 OK\r\nContent-Le",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n",
        ):
            for reason in (ConnectionDone(), ConnectionLost()):
                d, protocol, _ = self.feed(partial)
                protocol.connectionLost(Failure(reason))
                failure = self.failureResultOf(d, ResponseFailed)
                self.assertNotIsInstance(failure.value, ResponseNeverReceived)
                self.assertIsInstance(failure.value, _NETWORK_ERRORS)

    def test_lost_before_send(self) -> None:
        """A connection lost between connecting and writing: ResponseNeverReceived."""
        d = self.request()
        attempt = self.endpoints.attempts[-1]
        protocol = attempt.factory.buildProtocol(None)
        protocol.makeConnection(RecordingTransport())
        protocol.connectionLost(Failure(ConnectionLost()))
        attempt.deferred.callback(protocol)
        self.failureResultOf(d, ResponseNeverReceived)

    def test_secrets_not_in_errors(self) -> None:
        """No error of any kind shows the Authorization value."""
        failures = []
        d, protocol, _ = self.feed()
        protocol.connectionLost(Failure(ConnectionLost()))
        failures.append(self.failureResultOf(d))
        d, protocol, _ = self.feed(b"HTTP/1.1 200 OK\r\nBad Line\r\n\r\n")
        failures.append(self.failureResultOf(d))
        d = self.request()
        self.endpoints.attempts[-1].deferred.errback(ConnectionRefusedError())
        failures.append(self.failureResultOf(d))
        d = self.request()
        d.cancel()
        failures.append(self.failureResultOf(d))
        for failure in failures:
            shown = repr(failure.value) + str(failure.value) + failure.getTraceback()
            for reason in getattr(failure.value, "reasons", []):
                shown += repr(reason.value) + reason.getTraceback()
            self.assertNotIn(SECRET.decode(), shown)


class SiteClient(HTTP11Client):
    """
    An L{HTTP11Client} connected in memory (C{twisted.test.iosim}) to a
    C{twisted.web} L{Site} serving C{resource}: real HTTP bytes both ways,
    synchronously.  L{request} pumps the bytes before it returns; L{flush}
    pumps them again (after a resource writes late).  Its own memory
    reactor holds the pool's timers.

    @ivar connections: how many connections were made.
    """

    def __init__(self, resource: Resource, **options: Any) -> None:
        self.memory = MemoryReactorClock()
        self.site = Site(resource, reactor=self.memory)
        self.pumps: list[iosim.IOPump] = []
        self.connections = 0
        super().__init__(self.memory, self, **options)

    def endpointForURI(self, uri: Any) -> "_SiteEndpoint":
        return _SiteEndpoint(self, uri.scheme, uri.port)

    def request(self, *args: Any, **kwargs: Any) -> "Deferred[Answer]":
        d = super().request(*args, **kwargs)
        self.flush()
        return d

    def flush(self) -> None:
        """Move bytes between client and server until none are left."""
        for pump in list(self.pumps):
            pump.flush()
            if pump.clientIO.disconnected and pump.serverIO.disconnected:
                self.pumps.remove(pump)


class _SiteEndpoint:
    def __init__(self, owner: SiteClient, scheme: bytes, port: int) -> None:
        self._owner = owner
        self._scheme = scheme
        self._port = port

    def connect(self, factory: Any) -> "Deferred[Any]":
        owner = self._owner
        owner.connections += 1
        server_address = IPv4Address("TCP", "127.0.0.1", self._port)
        client_address = IPv4Address("TCP", "127.0.0.1", 31337)
        server = owner.site.buildProtocol(client_address)
        client = factory.buildProtocol(server_address)
        server_io = iosim.FakeTransport(server, isServer=True, hostAddress=server_address, peerAddress=client_address)
        client_io = iosim.FakeTransport(client, isServer=False, hostAddress=client_address, peerAddress=server_address)
        if self._scheme == b"https":
            directlyProvides(server_io, ISSLTransport)
            directlyProvides(client_io, ISSLTransport)
        owner.pumps.append(iosim.connect(server, server_io, client, client_io, greet=False, clock=owner.memory))
        return succeed(client)


class Echo(Resource):
    """Answers with what it got: method, path, the Host field and the body's SHA-256."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        body = request.content.read()
        self.bodies.append(body)
        request.setHeader(b"content-type", b"text/plain")
        return b"%s %s %s %s" % (
            request.method,
            request.uri,
            request.getHeader(b"host") or b"-",
            hashlib.sha256(body).hexdigest().encode(),
        )


class Chunks(Resource):
    """Writes its answer in parts, without a length (chunked)."""

    isLeaf = True

    def render(self, request: Request) -> Any:
        request.write(b"part one, ")
        request.write(b"part two")
        request.finish()
        return NOT_DONE_YET


class SiteTests(SynchronousTestCase):
    """The client against twisted.web's server, in memory."""

    def test_keep_alive(self) -> None:
        """Several requests, one connection; twisted.web sees the method, path, Host and body."""
        echo = Echo()
        client = SiteClient(echo)
        for i in range(3):
            result = self.successResultOf(client.request(b"POST", b"http://api.example.com/emails?x=1", HEADERS, b"body %d" % i))
            self.assertEqual(result.code, 200)
            self.assertEqual(
                result.content,
                b"POST /emails?x=1 api.example.com " + hashlib.sha256(b"body %d" % i).hexdigest().encode(),
            )
        self.assertEqual(client.connections, 1)
        self.assertEqual(echo.bodies, [b"body 0", b"body 1", b"body 2"])

    def test_chunked_from_twisted_web(self) -> None:
        """twisted.web's chunked answers are read, and the connection reused."""
        client = SiteClient(Chunks())
        for _ in range(2):
            result = self.successResultOf(client.request(b"GET", URL, {}))
            self.assertEqual(result.content, b"part one, part two")
        self.assertEqual(client.connections, 1)

    def test_streamed_body(self) -> None:
        """A streamed body arrives whole at twisted.web."""
        echo = Echo()
        client = SiteClient(echo)
        big = "QUJD" * (api.STREAM_MIN_CONTENT // 2)
        result = self.successResultOf(client.request(b"POST", URL, HEADERS, [b"[", big, b"]"]))
        self.assertEqual(echo.bodies, [b"[" + big.encode() + b"]"])
        self.assertEqual(result.code, 200)

    def test_not_found(self) -> None:
        """A 404 from twisted.web is an answer like any other."""
        result = self.successResultOf(SiteClient(notFound()).request(b"GET", URL, {}))
        self.assertEqual(result.code, 404)


# ---------------------------------------------------------------------------
# Real loopback


class RawServer(Protocol):
    """
    A tiny HTTP/1.1 server: reads each request (head, Content-Length body)
    and writes C{factory.answer(head, body)}; closes after it if
    C{factory.close_after}.
    """

    factory: "RawFactory"

    def connectionMade(self) -> None:
        self.buffer = b""
        self.lost: Deferred[None] = Deferred()
        self.factory.protocols.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            self.factory.requests.append((head, body))
            self.transport.write(self.factory.answer(head, body))
            if self.factory.close_after:
                self.transport.loseConnection()
                return

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.lost.callback(None)


class RawFactory(Factory):
    """Makes L{RawServer}s; counts them."""

    protocol = RawServer
    noisy = False

    def __init__(self, answer: Callable[[bytes, bytes], bytes]) -> None:
        self.answer = answer
        self.close_after = False
        self.protocols: list[RawServer] = []
        self.requests: list[tuple[bytes, bytes]] = []


class LoopbackTests(TestCase):
    """The client over real TCP on 127.0.0.1 (and one TLS server)."""

    timeout = 30

    async def serve(self, factory: Factory, endpoint: Any = None) -> int:
        """Listen on 127.0.0.1:0 until the test ends; the port."""
        endpoint = endpoint or TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port = await endpoint.listen(factory)
        self.addCleanup(port.stopListening)
        return port.getHost().port  # type: ignore[no-any-return]

    def make_client(self, endpoints: Any = None, **options: Any) -> HTTP11Client:
        client = HTTP11Client(reactor, endpoints or APIEndpoints(reactor, 5), **options)
        self.addCleanup(client.close_idle)
        return client

    async def raw(self, answer_with: Callable[[bytes, bytes], bytes]) -> tuple[RawFactory, bytes]:
        factory = RawFactory(answer_with)

        async def close_server_side() -> None:
            for protocol in factory.protocols:
                protocol.transport.loseConnection()
                await protocol.lost

        self.addCleanup(lambda: Deferred.fromCoroutine(close_server_side()))
        port = await self.serve(factory)
        return factory, b"http://127.0.0.1:%d/emails" % (port,)

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        for _ in range(500):
            if condition():
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail("condition not reached in 5 s")

    async def test_reuse(self) -> None:
        """Sequential requests to a keep-alive server use one connection."""
        factory, url = await self.raw(lambda head, body: answer(b"got " + body))
        client = self.make_client()
        for i in range(5):
            result = await client.request(b"POST", url, HEADERS, b"%d" % i)
            self.assertEqual(result.content, b"got %d" % i)
        self.assertEqual(len(factory.protocols), 1)
        self.assertEqual(client.idle_count(b"http", b"127.0.0.1", int(url.split(b":")[2].split(b"/")[0])), 1)

    async def test_concurrent_then_capped(self) -> None:
        """Three requests at once use three connections; with at most 2 idle, one is closed."""
        factory, url = await self.raw(lambda head, body: answer())
        client = self.make_client(max_idle_per_host=2)
        results = [client.request(b"POST", url, HEADERS, b"{}") for _ in range(3)]
        for d in results:
            self.assertEqual((await d).code, 200)
        self.assertEqual(len(factory.protocols), 3)
        port = int(url.split(b":")[2].split(b"/")[0])
        self.assertEqual(client.idle_count(b"http", b"127.0.0.1", port), 2)
        await self.wait_for(lambda: sum(p.lost.called for p in factory.protocols) == 1)

    async def test_server_closes_idle(self) -> None:
        """A server that closes idle connections: each leaves the pool, and the next request succeeds on a new one."""
        factory, url = await self.raw(lambda head, body: answer())
        factory.close_after = True
        client = self.make_client()
        port = int(url.split(b":")[2].split(b"/")[0])
        for _ in range(3):
            self.assertEqual((await client.request(b"POST", url, HEADERS, b"{}")).code, 200)
            await self.wait_for(lambda: client.idle_count(b"http", b"127.0.0.1", port) == 0)
        self.assertEqual(len(factory.protocols), 3)

    async def test_streamed_body(self) -> None:
        """A 2.5 MB body of pieces (a 2 MB str) arrives byte for byte; the connection is reused after it."""
        factory, url = await self.raw(lambda head, body: answer(hashlib.sha256(body).hexdigest().encode()))
        client = self.make_client()
        big = "QUJD" * 500_000
        pieces: list[bytes | str] = [b'{"c":"', big, b'","d":"' + b"x" * 500_000 + b'"}']
        expected = b"".join(p if isinstance(p, bytes) else p.encode() for p in pieces)
        result = await client.request(b"POST", url, HEADERS, pieces)
        self.assertEqual(result.content, hashlib.sha256(expected).hexdigest().encode())
        self.assertEqual(factory.requests[0][1], expected)
        self.assertEqual((await client.request(b"POST", url, HEADERS, b"{}")).code, 200)
        self.assertEqual(len(factory.protocols), 1)

    async def test_refused(self) -> None:
        """A port nobody listens on: ConnectionRefusedError, a network error for the relay."""
        listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
        closed = listening.getHost().port
        await listening.stopListening()
        client = self.make_client()
        with self.assertRaises(ConnectionRefusedError) as caught:
            await client.request(b"GET", b"http://127.0.0.1:%d/" % (closed,), {})
        self.assertIsInstance(caught.exception, _NETWORK_ERRORS)

    async def test_site(self) -> None:
        """twisted.web over TCP: chunked answers, kept alive."""
        site = Site(Chunks())
        port = await self.serve(site)
        client = self.make_client()
        for _ in range(2):
            result = await client.request(b"GET", b"http://127.0.0.1:%d/" % (port,), {})
            self.assertEqual(result.content, b"part one, part two")
        self.assertEqual(client.idle_count(b"http", b"127.0.0.1", port), 1)
        await client.close_idle()

    async def tls_server(self) -> tuple[int, bytes]:
        directory = os.path.abspath(self.mktemp())
        cert_path, key_path = write_certificate(directory)
        with open(cert_path, "rb") as f:
            cert_pem = f.read()
        server_options = load_certificate_options(cert_path, key_path)
        port = await self.serve(Site(Echo()), SSL4ServerEndpoint(reactor, 0, server_options, interface="127.0.0.1"))
        return port, cert_pem

    async def test_tls(self) -> None:
        """https with a trusted certificate: answers over one kept-alive TLS connection."""
        port, cert_pem = await self.tls_server()
        trust = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(cert_pem))

        class Trusting:
            def endpointForURI(inner, uri: Any) -> Any:
                return wrapClientTLS(trust, HostnameEndpoint(reactor, "127.0.0.1", uri.port, timeout=5))

        client = self.make_client(Trusting())
        url = b"https://localhost:%d/x" % (port,)
        for _ in range(2):
            result = await client.request(b"POST", url, HEADERS, b"secret body")
            self.assertEqual(result.code, 200)
            self.assertTrue(result.content.startswith(b"POST /x localhost:%d " % (port,)))
        self.assertEqual(client.idle_count(b"https", b"localhost", port), 1)

    async def test_tls_untrusted(self) -> None:
        """https through APIEndpoints to a self-signed certificate fails verification: ResponseNeverReceived."""
        port, _ = await self.tls_server()
        client = self.make_client()
        with self.assertRaises(ResponseNeverReceived):
            await client.request(b"GET", b"https://127.0.0.1:%d/" % (port,), {})
        self.assertEqual(client.idle_count(b"https", b"127.0.0.1", port), 0)


class ServiceWiringTests(SynchronousTestCase):
    """makeRelayService calls the API through this client by default."""

    def test_default_client(self) -> None:
        """The relay's HTTPEmailAPI uses an HTTP11Client (64 idle connections kept) that the service closes at stop."""
        from poststack_relay import RelayConfig, makeRelayService
        from poststack_relay.service import _PoolService

        cert, key = write_certificate(os.path.abspath(self.mktemp()))
        memory = MemoryReactorClock()
        service = makeRelayService(
            RelayConfig(metrics_listen="off", tls_cert=cert, tls_key=key, hostname="relay.test"), memory
        )
        [pool] = [child for child in service if isinstance(child, _PoolService)]
        self.assertIsInstance(pool.client, HTTP11Client)
        self.assertEqual(pool.client.max_idle_per_host, 64)
        checker = service.factory.portal.checkers[next(iter(service.factory.portal.checkers))]
        self.assertIs(checker._api._client, pool.client)
        self.assertIs(checker._api._http11, pool.client)
        self.assertIsInstance(pool.client._endpoints, APIEndpoints)
        closed: list[bool] = []
        pool.client.close_idle = lambda: closed.append(True) or succeed(None)  # type: ignore[method-assign]
        service.startService()
        self.successResultOf(service.stopService())
        self.assertEqual(closed, [True])
