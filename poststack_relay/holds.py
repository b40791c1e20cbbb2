# -*- test-case-name: tests.test_holds -*-
"""
What the API said about a credential, remembered: after a send refused
with C{429}, the next C{MAIL FROM} with that credential is answered before
any DATA is uploaded (L{CredentialHolds}).

  - C{429 rate_limit_exceeded} with C{Retry-After}: C{451 4.7.0 PostStack
    rate limit reached, retry-after=Ns} with the seconds left, until then
    (at most L{MAX_RATE_HOLD} seconds);
  - a quota C{429} (C{QUOTA_CODES}, no C{Retry-After}: waiting seconds does
    not lift it): the same C{451 4.7.0} text the client heard after DATA,
    with the API's own reason, for C{quota_hold} seconds (C{--api-quota-hold},
    60 by default), after which the next message asks the API again.

A rate-limit 429 without C{Retry-After} says nothing about how long: it
is not remembered.  The hold is per API key (a mailbox sends with the
relay's service key, so a limit on that key holds every mailbox), and is
shared by the fleet when the fleet state is (L{poststack_relay.fleet}).
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional

from twisted.logger import Logger

from . import replies
from .config import DEFAULT_API_QUOTA_HOLD
from .interfaces import IFleetState
from .replies import QUOTA_CODES, Reply

__all__ = ["MAX_RATE_HOLD", "CredentialHolds"]

_log = Logger()

# The longest Retry-After honoured at MAIL FROM, in seconds.
MAX_RATE_HOLD = 3600.0

_RATE = "rate"
_QUOTA = "quota "


class CredentialHolds:
    """
    Remembers 429s per API key in the fleet state and answers C{MAIL FROM}
    from it.

    @param quota_hold: seconds a quota 429 is remembered (0: not at all).
    """

    def __init__(self, state: IFleetState, quota_hold: float = DEFAULT_API_QUOTA_HOLD) -> None:
        self._state = state
        self.quota_hold = quota_hold

    @staticmethod
    def _subject(api_key: str) -> str:
        # Never the key itself: the state's keys leave the process.
        return "hold:" + hashlib.sha256(api_key.encode("utf-8")).hexdigest()

    def learned(
        self,
        api_key: str,
        status: Optional[int],
        code: Optional[str],
        retry_after: Optional[float],
        reply: Reply,
        label: str,
    ) -> None:
        """
        A send with C{api_key} ended with C{status}: remember a 429.

        @param reply: what the client heard (a quota's text is kept).
        @param label: the identity, for the log.
        """
        if status != 429:
            return
        if code in QUOTA_CODES:
            if self.quota_hold <= 0:
                return
            value, seconds = _QUOTA + reply.text, self.quota_hold
        elif retry_after is not None and retry_after > 0:
            value, seconds = _RATE, min(float(retry_after), MAX_RATE_HOLD)
        else:
            return
        self._hold(api_key, value, seconds, label, code or "HTTP 429")

    def throttled(self, api_key: str, seconds: float) -> None:
        """
        An attempt to send with C{api_key} was answered C{429} with
        C{Retry-After: seconds}: hold it now, while the message that got it
        waits to retry (the other messages would only be refused too).
        """
        held = min(float(seconds), MAX_RATE_HOLD)
        if held <= 0:
            return
        self._hold(api_key, _RATE, held, "a credential", "rate_limit_exceeded")

    def _hold(self, api_key: str, value: str, seconds: float, label: str, code: str) -> None:
        """
        Remember C{value} for C{api_key} for C{seconds}; log a new hold once.
        """
        subject = self._subject(api_key)
        new = self._state.recall(subject) is None
        self._state.remember(subject, value, seconds)
        if new:
            _log.info(
                "PostStack API refused {identity} ({code}): MAIL FROM with this credential is "
                "answered 451 for {seconds}s",
                identity=label,
                code=code,
                seconds=round(seconds, 1),
                event="credential_held",
            )

    def refusal(self, api_key: str) -> Optional[Reply]:
        """
        The reply for a C{MAIL FROM} with C{api_key} while it is held, or
        C{None}.
        """
        note = self._state.recall(self._subject(api_key))
        if note is None:
            return None
        value, left = note
        if value.startswith(_QUOTA):
            return replies.quota_held(value[len(_QUOTA):])
        return replies.rate_limited(max(1, math.ceil(left)))
