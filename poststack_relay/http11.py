# -*- test-case-name: tests.test_http11 -*-
"""
A small, strict HTTP/1.1 client: exactly what the relay needs to call the
PostStack API, and nothing more.

L{HTTP11Client} sends one request per connection at a time (no
pipelining) over a pool of keep-alive connections, and reads the whole
answer into memory (an L{Answer}: status, headers, content of at most
1 MiB).  It costs about a third of the CPU of Twisted's C{Agent} with
its C{HTTPConnectionPool} for the relay's small C{POST /emails}
(C{docs/performance.md}): the URL is parsed once per distinct URL, the
request goes out in one write, and the answer is parsed in one pass with
no C{IResponse}/C{IProtocol} body delivery between.

What it does not do, on purpose: redirects, cookies, content codings,
proxies, C{Expect: 100-continue}, automatic retries.  POST retries are the
relay's decision (L{poststack_relay.api.HTTPEmailAPI} retries network
errors itself, with one idempotency key per message).

Errors are Twisted's, so the relay classifies them as it classified the
agent's: a connection that cannot be made fails as the endpoint fails it
(C{ConnectError} subclasses, C{DNSLookupError}); a connection lost before
any byte of the answer is L{ResponseNeverReceived}; an answer cut short or
malformed is L{ResponseFailed}; a connection lost while a streamed body is
still being written, before any answer, is L{RequestTransmissionFailed}.
No exception text ever holds a header value (the C{Authorization} header
holds an API key) or any byte of the answer; nothing here logs.

The keep-alive race: a request written on a reused idle connection that
the server closes at the same moment fails with L{ResponseNeverReceived},
as with Twisted's pool (which the relay used before, with the same
C{retryAutomatically = False}).  The relay retries such a failure like any
network error.  The client narrows the window by honouring a server's
C{Keep-Alive: timeout=N} hint (an idle connection is not reused after
N - 1 seconds) and by reading idle connections, so a close that has
arrived removes the connection from the pool at once.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web._newclient import (
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

__all__ = ["STREAM_MIN_CONTENT", "Answer", "AnswerHeaders", "HTTP11Client", "MalformedResponse", "parse_url"]

MAX_HEAD = 64 * 1024
"""Bytes: the most a response head (status line and fields) may take."""
MAX_LINE = 16 * 1024
"""Bytes: the most one line of a response head or trailer section may take."""
MAX_CHUNK_LINE = 4096
"""Bytes: the most a chunk-size line (with its extensions) may take."""
MAX_BODY = 1024 * 1024
"""Bytes: the most content an answer may have."""
MAX_INTERIM = 16
"""The most 1xx interim responses skipped before the final one."""
CLOSE_GRACE = 5.0
"""Seconds a politely closed connection may take before it is aborted."""
STREAM_TOTAL = 1024 * 1024
"""Bytes: a request body larger than this is streamed, not written at once."""
STREAM_MIN_CONTENT = 256 * 1024
"""Characters: an attachment content at least this long is not copied into
the JSON text but written from its own string (L{poststack_relay.api.json_body}),
and a body holding such a piece is streamed."""
_STREAM_SLICE = 64 * 1024

Body = Union[bytes, Sequence[Union[bytes, str]]]

_URL = re.compile(
    rb"(https?)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::([0-9]{1,5}))?"
    rb"([/?][\x21-\x22\x24-\x7e]*)?(?:#[\x21-\x7e]*)?",
    re.I,
)
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_STATUS = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: [\t\x20-\x7e\x80-\xff]*)?")
# A line: no control characters but HTAB (CR and LF included: the head is
# split on CRLF, so one left over is a bare CR or LF).
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# A whole head: the same but for CR and LF (counted: only in CRLF pairs).
_BAD_HEAD = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?")
_DIGITS = re.compile(rb"[0-9]+")
# What a request field value may not hold (becomes a space, as Twisted's Headers does).
_UNSAFE_VALUE = re.compile(rb"[\r\n\x00]+")
_KEEP_ALIVE_TIMEOUT = re.compile(rb"(?:^|[,; \t])timeout[ \t]*=[ \t]*([0-9]{1,6})", re.I)

# Request fields the client writes itself.
_OWN_FIELDS = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection"})
_NO_CONTENT_METHODS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE"})

# Lower-case forms of response field names already checked to be tokens.
_NAMES: dict[bytes, bytes] = {}
_NAMES_MAX = 512

# Connection states.
_NEW = 0  # connected, never used
_BUSY = 1  # one request in progress
_IDLE = 2  # in the pool
_CLOSED = 3  # closing or closed; never used again

# Response parsing phases.
_HEAD = 0
_LENGTH = 1
_CHUNK_SIZE_LINE = 2
_CHUNK_DATA = 3
_CHUNK_END = 4
_TRAILER = 5
_UNTIL_CLOSE = 6


class MalformedResponse(Exception):
    """
    The server's answer broke the rules this client keeps (always inside a
    L{ResponseFailed}).  The text names the rule, never the bytes.
    """


class AnswerHeaders:
    """
    The header fields of an L{Answer}, by lower-case name.
    """

    __slots__ = ("_fields",)

    def __init__(self, fields: dict[bytes, list[bytes]]) -> None:
        self._fields = fields

    def getRawHeaders(
        self, name: Union[bytes, str], default: Optional[list[bytes]] = None
    ) -> Optional[list[bytes]]:
        """
        Every value of the field C{name} (any case), in order, or
        C{default} if there is none.
        """
        if isinstance(name, str):
            name = name.encode("latin-1")
        return self._fields.get(name.lower(), default)

    def hasHeader(self, name: Union[bytes, str]) -> bool:
        """Is there a field C{name} (any case)?"""
        return self.getRawHeaders(name) is not None

    def names(self) -> list[bytes]:
        """The lower-case names of the fields, in the order first seen."""
        return list(self._fields)


class Answer:
    """
    A complete HTTP answer.

    @ivar code: the status code.
    @ivar phrase: the reason phrase (bytes, possibly empty).
    @ivar version: C{(1, 0)} or C{(1, 1)}.
    @ivar headers: the fields (L{AnswerHeaders}).
    @ivar content: the whole content (C{b""} for none).
    """

    __slots__ = ("code", "phrase", "version", "headers", "content")

    def __init__(
        self,
        code: int,
        phrase: bytes,
        version: tuple[int, int],
        headers: AnswerHeaders,
        content: bytes,
    ) -> None:
        self.code = code
        self.phrase = phrase
        self.version = version
        self.headers = headers
        self.content = content

    def __repr__(self) -> str:
        return f"<Answer {self.code} {len(self.content)} bytes>"


class _Target:
    """
    A URL parsed once: where to connect and what to write.  Has the
    C{scheme}, C{host} and C{port} an endpoint factory reads.
    """

    __slots__ = ("scheme", "host", "port", "key", "request_tail")

    def __init__(self, scheme: bytes, host: bytes, port: int, path: bytes, host_field: bytes) -> None:
        self.scheme = scheme
        self.host = host
        self.port = port
        self.key = (scheme, host, port)
        # The request line after the method, and the Host field.
        self.request_tail = b" " + path + b" HTTP/1.1\r\nHost: " + host_field + b"\r\n"


def parse_url(url: bytes) -> _Target:
    """
    Parse an absolute C{http} or C{https} URL already in wire form (ASCII,
    host in IDNA, percent-encoded: L{poststack_relay.api._wire_url}).
    A fragment is dropped; user information is refused.

    @raise ValueError: C{url} is not such a URL.
    """
    m = _URL.fullmatch(url)
    if m is None:
        raise ValueError("not an absolute http or https URL in wire form")
    scheme = m.group(1).lower()
    host_field = m.group(2).lower()
    host = host_field[1:-1] if host_field.startswith(b"[") else host_field
    default = 443 if scheme == b"https" else 80
    port = int(m.group(3)) if m.group(3) else default
    if not 0 < port < 65536:
        raise ValueError("URL port out of range")
    path = m.group(4) or b"/"
    if path.startswith(b"?"):
        path = b"/" + path
    if port != default:
        host_field += b":%d" % (port,)
    return _Target(scheme, host, port, path, host_field)


class _Exchange:
    """
    One request, from C{HTTP11Client.request} until its Deferred fires.
    The Deferred is let go of when it fires, so the two do not keep each
    other alive in a reference cycle.
    """

    __slots__ = ("deferred", "connection", "connecting", "done", "head_only")

    def __init__(self, head_only: bool) -> None:
        self.deferred: Optional[Deferred[Answer]] = Deferred(self._cancel)
        self.connection: Optional[_Connection] = None
        self.connecting: Optional[Deferred[Any]] = None
        self.done = False
        self.head_only = head_only

    def succeed(self, answer: Answer) -> None:
        """Fire with C{answer}."""
        d, self.deferred = self.deferred, None
        self.done = True
        self.connection = None
        if d is not None:
            d.callback(answer)

    def fail(self, reason: Failure) -> None:
        """Fail with C{reason}."""
        d, self.deferred = self.deferred, None
        self.done = True
        self.connection = None
        if d is not None:
            d.errback(reason)

    def _cancel(self, d: "Deferred[Answer]") -> None:
        # Deferred.cancel errbacks with CancelledError once this returns.
        self.deferred = None
        if self.done:
            return
        self.done = True
        connecting, self.connecting = self.connecting, None
        if connecting is not None:
            connecting.cancel()
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.abandon()


@implementer(IBodyProducer)
class _PiecesProducer:
    """
    A body of pieces (L{json_body}), written a slice at a time and only as
    fast as the connection takes it (the transport pauses and resumes it).
    """

    def __init__(self, pieces: "list[bytes | str]") -> None:
        self._pieces = pieces
        self.length = sum(len(p) for p in pieces)  # str pieces are ASCII
        self._slices: Optional[Iterator[bytes]] = None
        self._consumer: Any = None
        self._done: Optional[Deferred[None]] = None
        self._paused = False
        self._producing = False

    def _each(self) -> Iterator[bytes]:
        for piece in self._pieces:
            for start in range(0, len(piece), _STREAM_SLICE):
                chunk = piece[start : start + _STREAM_SLICE]
                yield chunk if isinstance(chunk, bytes) else chunk.encode("ascii")

    def startProducing(self, consumer: Any) -> "Deferred[None]":
        self._consumer = consumer
        self._slices = self._each()
        done: Deferred[None] = Deferred()
        self._done = done
        self._produce()  # may finish at once, and fire it
        return done

    def _produce(self) -> None:
        if self._producing:
            return
        self._producing = True
        try:
            while not self._paused and self._slices is not None:
                chunk = next(self._slices, None)
                if chunk is None:
                    self._release()
                    done, self._done = self._done, None
                    if done is not None:
                        done.callback(None)
                    return
                self._consumer.write(chunk)
        finally:
            self._producing = False

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._produce()

    def stopProducing(self) -> None:
        # The request is abandoned: write nothing more, and (as the
        # interface asks) never fire the Deferred.
        self._release()
        self._done = None

    def _release(self) -> None:
        # Written or abandoned: let go of the body and the consumer at
        # once.  The request, its consumer and Deferreds can end up in a
        # reference cycle (a Failure's frames) that only the cyclic garbage
        # collector frees, and with them a large message's body (S4 in
        # docs/performance.md).
        self._slices = None
        self._pieces = []
        self._consumer = None


class _Connection(Protocol):
    """
    One HTTP/1.1 connection of an L{HTTP11Client}: writes a request, parses
    its answer, and goes back to the pool when both are done and the
    connection may be reused.
    """

    def __init__(self, client: "HTTP11Client", key: tuple[bytes, bytes, int]) -> None:
        self._client = client
        self.key = key
        self.state = _NEW
        self.expires = 0.0
        self._lost: Optional[Failure] = None
        self._closed_waiters: list[Deferred[None]] = []
        self._force: Optional[IDelayedCall] = None
        self._exchange: Optional[_Exchange] = None
        self._producer: Any = None
        self._reset()

    def _reset(self) -> None:
        self._phase = _HEAD
        self._buffer = b""
        self._search_from = 0
        self._received = False
        self._interim = 0
        self._code = 0
        self._phrase = b""
        self._version = (1, 1)
        self._fields: dict[bytes, list[bytes]] = {}
        self._keep_alive = True
        self._keep_alive_hint: Optional[int] = None
        self._parts: list[bytes] = []
        self._size = 0
        self._remaining = 0
        self._trailer = 0

    # -- connection events

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        if self._exchange is None:
            # Bytes on a connection with no request: whatever they are, the
            # connection can no longer be trusted to frame the next answer.
            self._drop()
            return
        self._received = True
        self._buffer = self._buffer + data if self._buffer else data
        try:
            self._parse()
        except MalformedResponse as e:
            self._fail(ResponseFailed([Failure(e)]))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        state, self.state = self.state, _CLOSED
        self._lost = reason
        if state == _IDLE:
            self._client._forget(self)
        force, self._force = self._force, None
        if force is not None and force.active():
            force.cancel()
        exchange, self._exchange = self._exchange, None
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()
        if exchange is not None and not exchange.done:
            if self._phase == _UNTIL_CLOSE and reason.check(ConnectionDone):
                answer = self._answer(b"".join(self._parts))
                self._reset()
                exchange.succeed(answer)
            else:
                if not self._received:
                    error: Exception = (
                        RequestTransmissionFailed([reason])
                        if producer is not None
                        else ResponseNeverReceived([reason])
                    )
                else:
                    error = ResponseFailed([reason])
                self._reset()
                exchange.fail(Failure(error))
        self._reset()
        waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # -- requests

    def send(self, exchange: _Exchange, data: bytes, pieces: Optional[list[Union[bytes, str]]]) -> None:
        """
        Write a request (C{data}: the head, and the body unless C{pieces}
        are to be streamed after it) and wait for its answer.
        """
        if self._lost is not None:
            # Lost between connecting and this call.
            exchange.fail(Failure(ResponseNeverReceived([self._lost])))
            return
        self.state = _BUSY
        self._exchange = exchange
        exchange.connection = self
        transport = self.transport
        transport.write(data)
        if pieces is None:
            return
        producer = _PiecesProducer(pieces)
        self._producer = producer
        transport.registerProducer(producer, True)
        try:
            written = producer.startProducing(transport)
        except Exception:
            if self._producer is producer:
                self._fail(RequestTransmissionFailed([Failure()]))
            return
        written.addCallback(self._written, producer)

    def _written(self, _: object, producer: Any) -> None:
        if self._producer is producer:
            self._producer = None
            self.transport.unregisterProducer()

    def _stop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()
            self.transport.unregisterProducer()

    def abandon(self) -> None:
        """
        The request was cancelled: stop writing and abort the connection.
        """
        self._exchange = None
        self.state = _CLOSED
        self._stop_producer()
        self._reset()
        self.transport.abortConnection()

    def _drop(self) -> None:
        """
        Abort a connection that has no request, and forget it.
        """
        if self.state == _IDLE:
            self._client._forget(self)
        if self.state != _CLOSED:
            self.state = _CLOSED
            self.transport.abortConnection()

    def close(self) -> "Deferred[None]":
        """
        Close the connection politely (with TLS, a close_notify first);
        abort it if it is still open L{CLOSE_GRACE} seconds later.  Fires
        once it is closed.
        """
        d: Deferred[None] = Deferred()
        if self._lost is not None:
            d.callback(None)
            return d
        self._closed_waiters.append(d)
        if self.state != _CLOSED:
            self.state = _CLOSED
            self.transport.loseConnection()
            self._force = self._client._reactor.callLater(CLOSE_GRACE, self._abort)
        return d

    def _abort(self) -> None:
        self._force = None
        self.transport.abortConnection()

    def _fail(self, error: Exception) -> None:
        exchange, self._exchange = self._exchange, None
        self.state = _CLOSED
        self._stop_producer()
        self._reset()
        self.transport.abortConnection()
        if exchange is not None and not exchange.done:
            exchange.fail(Failure(error))

    def _finish(self, content: bytes, rest: bytes) -> None:
        """
        The answer is complete: reuse or close the connection, then fire.
        """
        exchange, self._exchange = self._exchange, None
        answer = self._answer(content)
        reusable = self._keep_alive and not rest and self._producer is None
        hint = self._keep_alive_hint
        if self._producer is not None:
            # Answered before the whole body was written (an early 413, say):
            # the rest of the body will never be read.
            self._stop_producer()
            self.state = _CLOSED
            self.transport.abortConnection()
        elif not reusable:
            self.close()
        self._reset()
        if reusable:
            self._client._checkin(self, hint)
        assert exchange is not None
        exchange.succeed(answer)

    def _answer(self, content: bytes) -> Answer:
        return Answer(self._code, self._phrase, self._version, AnswerHeaders(self._fields), content)

    # -- parsing

    def _parse(self) -> None:
        while True:
            phase = self._phase
            buffer = self._buffer
            if phase == _HEAD:
                end = buffer.find(b"\r\n\r\n", self._search_from)
                if end < 0:
                    if len(buffer) > MAX_HEAD + 3:
                        raise MalformedResponse(f"response head over {MAX_HEAD} bytes")
                    if len(buffer) - buffer.rfind(b"\r\n") - 2 > MAX_LINE:
                        raise MalformedResponse(f"response head line over {MAX_LINE} bytes")
                    self._search_from = max(0, len(buffer) - 3)
                    return
                if end > MAX_HEAD:
                    raise MalformedResponse(f"response head over {MAX_HEAD} bytes")
                self._buffer = buffer[end + 4 :]
                self._search_from = 0
                if not self._head(buffer[:end]):
                    continue  # an interim (1xx) response: the next head
                if self._phase == _HEAD:  # no content
                    self._finish(b"", self._buffer)
                    return
            elif phase == _LENGTH:
                remaining = self._remaining
                if len(buffer) < remaining:
                    self._parts.append(buffer)
                    self._remaining = remaining - len(buffer)
                    self._buffer = b""
                    return
                parts = self._parts
                if parts:
                    parts.append(buffer[:remaining])
                    content = b"".join(parts)
                else:
                    content = buffer[:remaining] if len(buffer) > remaining else buffer
                self._finish(content, buffer[remaining:])
                return
            elif phase == _CHUNK_DATA:
                remaining = self._remaining
                if len(buffer) <= remaining:
                    self._parts.append(buffer)
                    self._remaining = remaining - len(buffer)
                    self._buffer = b""
                    if self._remaining:
                        return
                    self._phase = _CHUNK_END
                    return
                self._parts.append(buffer[:remaining])
                self._buffer = buffer[remaining:]
                self._remaining = 0
                self._phase = _CHUNK_END
            elif phase == _CHUNK_END:
                if len(buffer) < 2:
                    if buffer and buffer != b"\r":
                        raise MalformedResponse("chunk data not followed by CRLF")
                    return
                if buffer[:2] != b"\r\n":
                    raise MalformedResponse("chunk data not followed by CRLF")
                self._buffer = buffer[2:]
                self._phase = _CHUNK_SIZE_LINE
            elif phase == _CHUNK_SIZE_LINE:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > MAX_CHUNK_LINE:
                        raise MalformedResponse(f"chunk-size line over {MAX_CHUNK_LINE} bytes")
                    return
                if end > MAX_CHUNK_LINE:
                    raise MalformedResponse(f"chunk-size line over {MAX_CHUNK_LINE} bytes")
                m = _CHUNK_SIZE.fullmatch(buffer, 0, end)
                if m is None:
                    raise MalformedResponse("malformed chunk-size line")
                size = int(m.group(1), 16)
                self._buffer = buffer[end + 2 :]
                if size == 0:
                    self._phase = _TRAILER
                    self._trailer = 0
                    continue
                self._size += size
                if self._size > MAX_BODY:
                    raise MalformedResponse(f"response content over {MAX_BODY} bytes")
                self._remaining = size
                self._phase = _CHUNK_DATA
            elif phase == _TRAILER:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > MAX_LINE or self._trailer + len(buffer) > MAX_HEAD:
                        raise MalformedResponse("trailer section too long")
                    return
                if end > MAX_LINE or self._trailer + end > MAX_HEAD:
                    raise MalformedResponse("trailer section too long")
                if end == 0:
                    self._finish(b"".join(self._parts), buffer[2:])
                    return
                self._trailer += end + 2
                _field(buffer[:end])  # checked, then ignored
                self._buffer = buffer[end + 2 :]
            else:  # _UNTIL_CLOSE
                self._size += len(buffer)
                if self._size > MAX_BODY:
                    raise MalformedResponse(f"response content over {MAX_BODY} bytes")
                self._parts.append(buffer)
                self._buffer = b""
                return

    def _head(self, head: bytes) -> bool:
        """
        Parse one response head and choose how the content is framed.

        @return: C{False} for an interim (1xx) response, to be skipped.
        """
        crlf = head.count(b"\r\n")
        if (
            _BAD_HEAD.search(head) is not None
            or head.count(b"\r") != crlf
            or head.count(b"\n") != crlf
        ):
            raise MalformedResponse("control character (or bare CR or LF) in a response head")
        lines = head.split(b"\r\n")
        if len(head) > MAX_LINE and max(len(line) for line in lines) > MAX_LINE:
            raise MalformedResponse(f"response head line over {MAX_LINE} bytes")
        status_line = lines[0]
        m = _STATUS.fullmatch(status_line)
        if m is None:
            raise MalformedResponse("status line is not HTTP/1.x NNN reason")
        code = int(m.group(2))
        fields: dict[bytes, list[bytes]] = {}
        names = _NAMES
        first = True
        for line in lines:
            if first:
                first = False
                continue
            name, colon, value = line.partition(b":")
            key = names.get(name) if colon else None
            if key is None:
                key = _field_name(line, name, colon)
            value = value.strip(b" \t")
            values = fields.get(key)
            if values is None:
                fields[key] = [value]
            else:
                values.append(value)
        if code < 200:
            if code == 101:
                raise MalformedResponse("101 Switching Protocols was not asked for")
            self._interim += 1
            if self._interim > MAX_INTERIM:
                raise MalformedResponse(f"more than {MAX_INTERIM} interim (1xx) responses")
            return False
        self._code = code
        self._phrase = status_line[13:]
        self._version = (1, 1) if m.group(1) == b"1" else (1, 0)
        self._fields = fields
        keep_alive = m.group(1) == b"1"
        connection = fields.get(b"connection")
        if connection is not None and b"close" in b"".join(connection).lower():
            if b"close" in _tokens(connection):
                keep_alive = False
        hint = fields.get(b"keep-alive")
        if hint is not None:
            found = _KEEP_ALIVE_TIMEOUT.search(b",".join(hint))
            if found is not None:
                self._keep_alive_hint = int(found.group(1))
        exchange = self._exchange
        if code == 204 or code == 304 or (exchange is not None and exchange.head_only):
            self._keep_alive = keep_alive
            return True  # no content; stays in _HEAD
        coding = fields.get(b"transfer-encoding")
        length = fields.get(b"content-length")
        if coding is not None:
            if length is not None:
                raise MalformedResponse("both Transfer-Encoding and Content-Length")
            if self._version == (1, 0):
                raise MalformedResponse("Transfer-Encoding in an HTTP/1.0 response")
            if _tokens(coding) != [b"chunked"]:
                raise MalformedResponse("Transfer-Encoding other than chunked")
            self._phase = _CHUNK_SIZE_LINE
        elif length is not None:
            size = _content_length(length)
            if size == 0:
                self._keep_alive = keep_alive
                return True
            self._remaining = size
            self._phase = _LENGTH
        else:
            keep_alive = False
            self._phase = _UNTIL_CLOSE
        self._keep_alive = keep_alive
        return True


def _field_name(line: bytes, name: bytes, colon: bytes) -> bytes:
    """
    The lower-case name of a field line not seen before, checked (and
    remembered).
    """
    if not colon or _TOKEN.fullmatch(name) is None:
        if line[:1] in (b" ", b"\t"):
            raise MalformedResponse("obsolete line folding in a response field")
        raise MalformedResponse("malformed response field line")
    key = name.lower()
    if len(_NAMES) < _NAMES_MAX:
        _NAMES[name] = key
    return key


def _field(line: bytes) -> tuple[bytes, bytes]:
    """
    A field line's lower-case name and its value, checked (for trailer
    lines; a head's lines are checked by C{_Connection._head}).
    """
    if len(line) > MAX_LINE:
        raise MalformedResponse(f"response head line over {MAX_LINE} bytes")
    if _BAD_VALUE.search(line) is not None:
        raise MalformedResponse("control character (or bare CR or LF) in a trailer field")
    name, colon, value = line.partition(b":")
    key = _NAMES.get(name) if colon else None
    if key is None:
        key = _field_name(line, name, colon)
    return key, value.strip(b" \t")


def _tokens(values: list[bytes]) -> list[bytes]:
    """The comma-separated elements of a list field, lower-case, empty ones dropped."""
    return [t for t in (v.strip(b" \t").lower() for v in b",".join(values).split(b",")) if t]


def _content_length(values: list[bytes]) -> int:
    """
    The one content length of a response's C{Content-Length} fields.

    @raise MalformedResponse: a value is not digits only, two values
        differ, or the length is over L{MAX_BODY}.
    """
    if len(values) == 1:
        value = values[0]
        if value.isdigit() and len(value) <= 7:
            size = int(value)
            if size > MAX_BODY:
                raise MalformedResponse(f"response content over {MAX_BODY} bytes")
            return size
    seen: Optional[bytes] = None
    for value in b",".join(values).split(b","):
        value = value.strip(b" \t")
        if _DIGITS.fullmatch(value) is None:
            raise MalformedResponse("Content-Length is not digits only")
        value = value.lstrip(b"0") or b"0"
        if seen is not None and value != seen:
            raise MalformedResponse("Content-Length values differ")
        seen = value
    assert seen is not None
    if len(seen) > 10 or int(seen) > MAX_BODY:
        raise MalformedResponse(f"response content over {MAX_BODY} bytes")
    return int(seen)


class _ConnectionFactory(Factory):
    """
    Builds the one L{_Connection} of one connection attempt (quietly: no
    "Starting factory" log line for each connection).
    """

    noisy = False

    def __init__(self, client: "HTTP11Client", key: tuple[bytes, bytes, int]) -> None:
        self._client = client
        self._key = key

    def buildProtocol(self, addr: Any) -> _Connection:
        return _Connection(self._client, self._key)


class HTTP11Client:
    """
    HTTP/1.1 requests over a pool of keep-alive connections.

    Idle connections are kept per scheme, host and port, and the one used
    last is used first (LIFO), so under light load the others reach their
    idle time-out and close.  An idle connection keeps reading: a close by
    the server removes it from the pool at once, and any byte arriving on
    it closes it.

    @param reactor: provides C{IReactorTime} (C{seconds}, C{callLater}).
    @param endpoints: makes the endpoint of each new connection: an object
        with C{endpointForURI(uri)}, C{uri} having C{scheme} (bytes),
        C{host} (bytes) and C{port} (int): for the relay,
        L{poststack_relay.api.APIEndpoints} (TLS verified like a browser
        for C{https}).
    @param max_idle_per_host: the most idle connections kept per scheme,
        host and port; the oldest is closed to keep a newer one.
    @param idle_timeout: seconds an idle connection is kept (fewer if the
        server's C{Keep-Alive: timeout=N} asks for less: N - 1).
    """

    def __init__(
        self,
        reactor: Any,
        endpoints: Any,
        max_idle_per_host: int = 64,
        idle_timeout: float = 240.0,
    ) -> None:
        if max_idle_per_host < 0 or idle_timeout < 0:
            raise ValueError("max_idle_per_host and idle_timeout must not be negative")
        self._reactor = reactor
        self._endpoints = endpoints
        self.max_idle_per_host = max_idle_per_host
        self.idle_timeout = idle_timeout
        self._targets: dict[bytes, _Target] = {}
        self._idle: dict[tuple[bytes, bytes, int], deque[_Connection]] = {}
        self._sweeper: Optional[IDelayedCall] = None
        self._checked_names: dict[bytes, bool] = {}
        self._checked_methods: set[bytes] = set()

    # -- the public API

    def request(
        self,
        method: bytes,
        url: bytes,
        headers: Mapping[bytes, Sequence[bytes]],
        body: Optional[Body] = None,
    ) -> "Deferred[Answer]":
        """
        Make one request and read its whole answer.

        @param method: C{b"GET"}, C{b"POST"}, ...
        @param url: the absolute URL in wire form (see L{parse_url}).
        @param headers: field names and their values, written as given
            (CR, LF and NUL in a value become spaces, so a value can never
            add a field).  C{Host}, C{Content-Length}, C{Transfer-Encoding}
            and C{Connection} are the client's and may not be given.
        @param body: the content: bytes, or pieces (bytes, and ASCII
            C{str}) written one after the other
            (L{poststack_relay.api.json_body}).  Small bodies go out with the
            head in one write; a body with a piece of 256 KiB or more, or
            over 1 MiB in all, is streamed 64 KiB at a time as fast as the
            connection takes it.  C{Content-Length} is always sent with a
            body (and for C{None} unless the method is one without content,
            like C{GET}).

        @return: fires with the L{Answer}, or fails (see the module
            docstring).  Cancelling it aborts the request's connection,
            wherever it is (connecting, writing, reading), and fails it
            with C{CancelledError}.
        """
        try:
            target = self._targets.get(url)
            if target is None:
                target = parse_url(url)
                if len(self._targets) < 64:
                    self._targets[url] = target
            data, pieces = self._encode(method, target, headers, body)
        except (ValueError, TypeError) as e:
            return fail(e)
        exchange = _Exchange(method == b"HEAD")
        d = exchange.deferred
        assert d is not None
        stack = self._idle.get(target.key)
        if stack:
            now = self._reactor.seconds()
            while stack:
                connection = stack.pop()
                if connection.expires <= now:
                    connection.close()
                    continue
                connection.send(exchange, data, pieces)
                return d
        self._connect(target, exchange, data, pieces)
        return d

    def close_idle(self) -> "Deferred[None]":
        """
        Close every idle connection (at shutdown); requests in progress
        are not touched.  Fires once they are all closed.
        """
        if self._sweeper is not None:
            if self._sweeper.active():
                self._sweeper.cancel()
            self._sweeper = None
        idle, self._idle = self._idle, {}
        closing = [connection.close() for stack in idle.values() for connection in stack]
        return DeferredList(closing).addCallback(lambda _: None)

    def idle_count(self, scheme: bytes, host: bytes, port: int) -> int:
        """How many idle connections are kept for C{scheme://host:port}."""
        stack = self._idle.get((scheme, host, port))
        return len(stack) if stack else 0

    # -- writing a request

    def _encode(
        self,
        method: bytes,
        target: _Target,
        headers: Mapping[bytes, Sequence[bytes]],
        body: Optional[Body],
    ) -> tuple[bytes, Optional[list[Union[bytes, str]]]]:
        """
        The bytes to write (the head, with the body if it is small), and
        the pieces to stream after them if it is not.
        """
        if method not in self._checked_methods:
            if _TOKEN.fullmatch(method) is None:
                raise ValueError("the method is not a token")
            if len(self._checked_methods) < 16:
                self._checked_methods.add(method)
        checked = self._checked_names
        out: list[bytes] = [method, target.request_tail]
        for name, values in headers.items():
            ok = checked.get(name)
            if ok is None:
                ok = _TOKEN.fullmatch(name) is not None and name.lower() not in _OWN_FIELDS
                if len(checked) < 256:
                    checked[name] = ok
            if not ok:
                raise ValueError("a request field name is not a token, or is the client's own")
            for value in values:
                if b"\r" in value or b"\n" in value or b"\x00" in value:
                    value = _UNSAFE_VALUE.sub(b" ", value)
                out.append(name)
                out.append(b": ")
                out.append(value)
                out.append(b"\r\n")
        pieces: Optional[list[Union[bytes, str]]] = None
        if body is None:
            if method not in _NO_CONTENT_METHODS:
                out.append(b"Content-Length: 0\r\n")
            out.append(b"\r\n")
        elif isinstance(body, bytes):
            out.append(b"Content-Length: %d\r\n\r\n" % (len(body),))
            if len(body) > STREAM_TOTAL:
                pieces = [body]
            else:
                out.append(body)
        else:
            total = 0
            stream = False
            for piece in body:
                if isinstance(piece, str):
                    if not piece.isascii():
                        raise ValueError("a str piece of the body is not ASCII")
                elif not isinstance(piece, bytes):
                    raise TypeError("body pieces must be bytes or str")
                total += len(piece)
                if len(piece) >= STREAM_MIN_CONTENT:
                    stream = True
            out.append(b"Content-Length: %d\r\n\r\n" % (total,))
            if stream or total > STREAM_TOTAL:
                pieces = list(body)
            else:
                for piece in body:
                    out.append(piece if isinstance(piece, bytes) else piece.encode("ascii"))
        return b"".join(out), pieces

    # -- connections

    def _connect(
        self,
        target: _Target,
        exchange: _Exchange,
        data: bytes,
        pieces: Optional[list[Union[bytes, str]]],
    ) -> None:
        try:
            endpoint = self._endpoints.endpointForURI(target)
            connecting = endpoint.connect(_ConnectionFactory(self, target.key))
        except Exception:
            exchange.fail(Failure())
            return

        def connected(connection: _Connection) -> None:
            exchange.connecting = None
            if exchange.done:  # cancelled, but the endpoint connected anyway
                connection.state = _CLOSED
                connection.transport.abortConnection()
                return
            connection.send(exchange, data, pieces)

        def failed(reason: Failure) -> None:
            exchange.connecting = None
            if exchange.done:  # cancelled: the Deferred has failed already
                return
            exchange.fail(reason)

        exchange.connecting = connecting
        connecting.addCallbacks(connected, failed)

    def _checkin(self, connection: _Connection, hint: Optional[int]) -> None:
        """
        Keep a connection whose answer is complete, for the next request.
        """
        timeout = self.idle_timeout
        if hint is not None:
            timeout = min(timeout, hint - 1.0)
        if timeout <= 0 or self.max_idle_per_host == 0:
            connection.close()
            return
        stack = self._idle.get(connection.key)
        if stack is None:
            stack = self._idle[connection.key] = deque()
        elif len(stack) >= self.max_idle_per_host:
            stack.popleft().close()
        connection.state = _IDLE
        expires = connection.expires = self._reactor.seconds() + timeout
        stack.append(connection)
        sweeper = self._sweeper
        if sweeper is None:
            self._sweeper = self._reactor.callLater(timeout, self._sweep)
        elif expires < sweeper.getTime():
            sweeper.reset(timeout)

    def _forget(self, connection: _Connection) -> None:
        """A connection left the pool on its own (closed by the server)."""
        stack = self._idle.get(connection.key)
        if stack is not None:
            try:
                stack.remove(connection)
            except ValueError:
                pass
            if not stack:
                del self._idle[connection.key]

    def _sweep(self) -> None:
        """Close the idle connections whose time is up; plan the next sweep."""
        self._sweeper = None
        now = self._reactor.seconds()
        earliest: Optional[float] = None
        for key in list(self._idle):
            stack = self._idle[key]
            for connection in [c for c in stack if c.expires <= now]:
                stack.remove(connection)
                connection.close()
            for connection in stack:
                if earliest is None or connection.expires < earliest:
                    earliest = connection.expires
            if not stack:
                del self._idle[key]
        if earliest is not None:
            self._sweeper = self._reactor.callLater(max(0.0, earliest - now), self._sweep)
