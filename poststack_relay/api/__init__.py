# -*- test-case-name: tests.test_api,tests.test_api_retry,tests.test_api_transport -*-
"""
The PostStack API as the relay sees it.

L{IEmailAPI} (in L{poststack_relay.interfaces}) is the seam between the
SMTP side and the network; L{HTTPEmailAPI} implements it over HTTP, and
L{poststack_relay.testing.MemoryEmailAPI} in memory.

One module per job:

 - C{client}: L{HTTPEmailAPI}, thin: a call is a slot, the breaker and
   attempts, and what its answer means.
 - C{attempts}: one call's attempts, each with its time-out and metrics,
   retried within the deadline.
 - C{retry}: the retry policy (which answers, how long to wait) and
   L{parse_retry_after}.
 - C{slots}: L{RequestSlots}, the bound on requests in flight.
 - C{breaker}: L{CircuitBreaker}.
 - C{answers}: an answer's outcome (an email id, a valid key, a mailbox)
   or its L{APIError}; the reply texts are in L{poststack_relay.replies}.
 - C{errors}: the exceptions, and which Twisted errors are network errors.
 - C{body}: the JSON body, and the producer that streams large ones.
 - C{transport}: the one HTTP path, treq over a persistent pool
   (L{make_http_client}), with URLs and headers made once.

Every failed send becomes an L{APIError} that carries the SMTP reply the
client should hear (C{docs/replies.md}); nothing here ever puts a key in
an exception, a reply or a log event.
"""

from ..interfaces import IEmailAPI
from .answers import Answer
from .body import STREAM_MIN_CONTENT, BodyProducer, body_bytes, json_body
from .breaker import CircuitBreaker
from .client import HTTPEmailAPI
from .errors import NETWORK_ERRORS, APIError, APIUnavailable, MailboxSuspended
from .retry import (
    DEFAULT_BACKOFF_BASE,
    DEFAULT_BACKOFF_CAP,
    DEFAULT_MAX_ATTEMPTS,
    RetryPolicy,
    parse_retry_after,
)
from .slots import RequestSlots
from .transport import MAX_ANSWER, USER_AGENT, APIEndpoints, PreparedURL, make_http_client

__all__ = [
    "DEFAULT_BACKOFF_BASE",
    "DEFAULT_BACKOFF_CAP",
    "DEFAULT_MAX_ATTEMPTS",
    "MAX_ANSWER",
    "NETWORK_ERRORS",
    "STREAM_MIN_CONTENT",
    "USER_AGENT",
    "APIEndpoints",
    "APIError",
    "APIUnavailable",
    "Answer",
    "MailboxSuspended",
    "BodyProducer",
    "CircuitBreaker",
    "HTTPEmailAPI",
    "IEmailAPI",
    "PreparedURL",
    "RequestSlots",
    "RetryPolicy",
    "body_bytes",
    "json_body",
    "make_http_client",
    "parse_retry_after",
]
