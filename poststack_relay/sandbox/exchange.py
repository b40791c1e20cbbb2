# -*- test-case-name: tests.test_sandbox -*-
"""
One HTTP exchange of the sandbox: the request read once, the answer written
once.

L{Exchange} wraps a C{twisted.web} request: it reads the body at once (a
delayed answer may still need it after the connection is gone), gives the
endpoints typed access to headers, query and client address, and writes a
L{Reply} unless the client left. L{ApiError} is how an endpoint refuses a
request; L{Reply.error} turns it into PostStack's error shape,
C{{"error": "<message>", "code": "<code>"}}. L{log} is the logger of all
the sandbox's modules.
"""

from __future__ import annotations

import json
import os
import secrets
import string
from typing import Mapping, Protocol, cast

import attrs
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

log = Logger(namespace="poststack_relay.sandbox.resource")
"""
The sandbox's logger; its namespace is the one the sandbox's log lines have
always carried (before its modules were split).
"""


class ApiError(Exception):
    """An error answer: status, stable code, message and extra headers."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def invalid(message: str) -> ApiError:
    """A C{400 invalid_request} error saying C{message}."""
    return ApiError(400, "invalid_request", message)


_ID_ALPHABET = string.ascii_lowercase + string.digits


def new_id(prefix: str) -> str:
    """A fresh id: C{prefix} and 20 random lowercase letters and digits."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(20))


@attrs.frozen
class Reply:
    """A response to write: status, body bytes, content type, headers."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = attrs.field(factory=dict)

    @classmethod
    def json(
        cls, status: int, obj: object, headers: Mapping[str, str] | None = None
    ) -> Reply:
        """A JSON answer (UTF-8, non-ASCII kept as is)."""
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return cls(status, body, "application/json", dict(headers or {}))

    @classmethod
    def error(cls, error: ApiError) -> Reply:
        """The answer for C{error}: its status, headers and error body."""
        return cls.json(
            error.status, {"error": error.message, "code": error.code}, error.headers
        )


class _Answering(Protocol):
    """
    The calls of C{twisted.web.server.Request} the sandbox uses that Twisted
    leaves unannotated, with their types (a C{Request} provides them).
    """

    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def getClientAddress(self) -> IAddress: ...


class Exchange:
    """
    One request being answered; remembers whether the client went away so a
    delayed answer is not written to a closed connection.

    @ivar body: The request body, or L{None} if it is larger than the limit.
    @ivar body_size: The body's size in bytes.
    """

    def __init__(self, request: Request, max_body_bytes: int) -> None:
        self.request = request
        self._answering: _Answering = request
        self.gone = False
        request.notifyFinish().addErrback(self._lost)
        # Read the body now: twisted.web closes request.content when the
        # connection is lost, and a delayed answer may still need it.
        # (getattr: twisted.web's DummyRequest has no content attribute.)
        content = getattr(request, "content", None)
        self.body_size = 0
        self.body: bytes | None = b""
        if content is not None:
            content.seek(0, os.SEEK_END)
            self.body_size = content.tell()
            content.seek(0)
            self.body = (
                content.read() if self.body_size <= max_body_bytes else None
            )

    def _lost(self, failure: Failure) -> None:
        self.gone = True

    def header(self, name: bytes) -> bytes | None:
        """The request header C{name} (last value), or L{None}."""
        return self.request.getHeader(name)

    def stored_headers(self) -> dict[str, str]:
        """
        The request headers as the sandbox stores them: names lower-cased,
        repeated values joined with C{", "}, never C{authorization} or
        C{proxy-authorization}.
        """
        return {
            name.decode("latin-1").lower(): ", ".join(
                v.decode("latin-1") for v in values
            )
            for name, values in self.request.requestHeaders.getAllRawHeaders()
            if name.lower() not in (b"authorization", b"proxy-authorization")
        }

    def query(self, name: str) -> str | None:
        """The first value of the query parameter C{name}, or L{None}."""
        values: list[bytes] | None = (self.request.args or {}).get(
            name.encode("ascii")
        )
        if not values:
            return None
        return values[0].decode("utf-8", "replace")

    def client_host(self) -> object:
        """The client's address C{host} (a string for IP clients), or L{None}."""
        return getattr(self._answering.getClientAddress(), "host", None)

    def abort(self) -> None:
        """Drop the connection without a byte (the C{reset} fault)."""
        abort_connection(self.request)

    def write(self, reply: Reply) -> None:
        """Write C{reply} and finish the request, unless the client left."""
        request = self.request
        if self.gone or request.finished:
            return
        request.setResponseCode(reply.status)
        headers = request.responseHeaders
        for name, value in reply.headers.items():
            headers.setRawHeaders(name.encode("latin-1"), [value.encode("latin-1")])
        content_type = reply.content_type
        if content_type == "application/json":
            content_type += "; charset=utf-8"
        headers.setRawHeaders(b"content-type", [content_type.encode("ascii")])
        headers.setRawHeaders(
            b"content-length", [str(len(reply.body)).encode("ascii")]
        )
        self._answering.write(reply.body)
        self._answering.finish()


class _Abortable(Protocol):
    def abortConnection(self) -> None: ...


def abort_connection(request: Request) -> None:
    """
    Abort C{request}'s connection without a byte, if it still has one.
    """
    transport = request.transport
    if transport is not None:
        # Request types its transport as a plain ITransport; every transport
        # twisted.web serves on (TCP, TLS, StubTreq's in-memory one) aborts.
        cast(_Abortable, transport).abortConnection()
