# -*- test-case-name: tests.test_api_retry -*-
"""
When to try an API request again, and how long to wait first: the retry
policy (L{RetryPolicy}) and C{Retry-After} (L{parse_retry_after}).

C{docs/replies.md}, "Retries", has the rules: 5xx, 408, throttling 429s,
network errors, time-outs and a 2xx without an email id are retried with
full-jitter exponential back-off (at least what C{Retry-After} asks);
everything else is final.
"""

from __future__ import annotations

import random
import re
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Optional

import attrs

from ..replies import QUOTA_CODES
from .answers import Answer, email_id

__all__ = [
    "DEFAULT_BACKOFF_BASE",
    "DEFAULT_BACKOFF_CAP",
    "DEFAULT_MAX_ATTEMPTS",
    "RetryPolicy",
    "parse_retry_after",
]

DEFAULT_MAX_ATTEMPTS = 8
"""Most requests for one message (the deadline usually ends retries first)."""
DEFAULT_BACKOFF_BASE = 0.25
"""Seconds: the first retry waits up to this long (full jitter), then it doubles."""
DEFAULT_BACKOFF_CAP = 5.0
"""Seconds: the most one back-off wait grows to (C{Retry-After} may ask for more)."""

_MAX_BACKOFF_EXPONENT = 30
_DIGITS = re.compile(r"[0-9]{1,9}")


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


@attrs.define
class RetryPolicy:
    """
    How many attempts a call gets, which answers are worth another one,
    and the back-off between them.

    @ivar max_attempts: most requests per call (C{1}: no retries).
    @ivar backoff_base: seconds; the n-th retry waits a random time in
        C{[0, min(backoff_cap, backoff_base * 2**(n-1))]} (full jitter),
        and at least what C{Retry-After} asks.
    @ivar backoff_cap: see C{backoff_base}.
    @ivar rng: the random source for the jitter.
    """

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff_base: float = DEFAULT_BACKOFF_BASE
    backoff_cap: float = DEFAULT_BACKOFF_CAP
    rng: random.Random = attrs.field(factory=random.Random)

    def __attrs_post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.backoff_base < 0 or self.backoff_cap < 0:
            raise ValueError("back-off settings must not be negative")

    def reason(
        self, answer: Answer, now: float, needs_id: bool
    ) -> Optional[tuple[str, Optional[float]]]:
        """
        Should this answer be tried again?  C{None} if not, else a short
        description for the log and the C{Retry-After} seconds (if any).

        @param now: POSIX seconds, for a C{Retry-After} date.
        @param needs_id: a 2xx must carry an email id (C{POST /emails}).
        """
        status, body = answer.status, answer.body
        if 200 <= status < 300:
            if needs_id and email_id(body) is None:
                return f"HTTP {status} without an email id", None
            return None
        retry_after = parse_retry_after(answer.header(b"retry-after"), now)
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

    def delay(self, attempt: int, retry_after: Optional[float]) -> float:
        """
        Seconds to wait after attempt number C{attempt} (from 1): full
        jitter, but at least C{retry_after}.
        """
        exponent = min(attempt - 1, _MAX_BACKOFF_EXPONENT)
        jitter = self.rng.uniform(0, min(self.backoff_cap, self.backoff_base * 2**exponent))
        return max(jitter, retry_after or 0.0)


