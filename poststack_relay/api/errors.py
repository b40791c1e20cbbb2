# -*- test-case-name: tests.test_api,tests.test_api_retry -*-
"""
How an API call fails: the exceptions the relay sees (L{APIError},
L{APIUnavailable}) and the ones the client passes between its parts
(L{Refused}, L{AttemptError}), and which Twisted errors count as "the
network failed" (L{NETWORK_ERRORS}).

No exception here ever holds a key, a header value or a byte of an
answer: an attempt's error is known by its class name only.
"""

from __future__ import annotations

from typing import Optional

import attrs
from twisted.internet.error import ConnectError, ConnectionClosed, DNSLookupError, TimeoutError
from twisted.web.client import RequestNotSent  # type: ignore[attr-defined]  # (imported there, left out of its __all__)
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)

from ..replies import Reply

__all__ = ["NETWORK_ERRORS", "APIError", "APIUnavailable", "AttemptError", "MailboxSuspended", "Refused"]

NETWORK_ERRORS = (
    ConnectError,
    ConnectionClosed,
    DNSLookupError,
    TimeoutError,
    ResponseFailed,
    ResponseNeverReceived,
    RequestTransmissionFailed,
    RequestNotSent,
    OSError,
)
"""What an attempt fails with when the network (or the server) let it
down: a connection not made, reset, or cut short (before the request was
sent, too: a pooled connection no longer fit to send, L{RequestNotSent});
an answer malformed or too large (a L{ResponseFailed}).  Anything else is
the client's own ("client" errors: the relay's bug, not the API's)."""


class APIUnavailable(Exception):
    """
    The API could not give an answer (network error, time-out, 5xx, 429, the
    circuit breaker is open, no request slot came free, or the relay's own
    service key was refused): the caller should answer with a temporary
    failure.  The optional argument is a short reason for logs;
    it never holds a key.
    """


class MailboxSuspended(Exception):
    """
    A mailbox login with the right password, for a mailbox PostStack does
    not let send (suspended): not a wrong password, and not a guess.
    """


@attrs.define
class APIError(Exception):
    """
    A send that did not end with an email id.

    @ivar reply: the SMTP reply for the client.
    @ivar status: the HTTP status, or C{None} if no response arrived.
    @ivar code: the API's machine code (C{"unprocessable_entity"}, ...).
    @ivar request_id: the API's C{x-request-id}, for support.
    @ivar retry_after: seconds the last answer's C{Retry-After} still asked
        for, if any.
    @ivar sender_domain: the domain of the message's C{From} when the
        answer refused it for this credential (not verified, not the
        account's, out of the key's scope), else C{None}.
    """

    reply: Reply
    status: Optional[int] = None
    code: Optional[str] = None
    request_id: Optional[str] = None
    retry_after: Optional[float] = None
    sender_domain: Optional[str] = None

    def __str__(self) -> str:
        return f"{self.reply.code} {self.reply.enhanced} {self.reply.text}"


class Refused(Exception):
    """
    No request was made: C{"busy"} (no slot in time) or C{"breaker"}.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AttemptError(Exception):
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
