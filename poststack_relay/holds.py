# -*- test-case-name: tests.test_holds -*-
"""
What the API said about a credential, remembered: after a send refused
with C{429}, or refused for its sender's domain, the next C{MAIL FROM}
with that credential (and that domain) is answered before any DATA is
uploaded (L{CredentialHolds}).

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

  - a sender domain the API refused for the key (C{422} not verified,
    C{404} not the account's, C{403} outside the key's scope: the
    L{APIError} names the domain): C{MAIL FROM} on that domain with that
    key gets the same C{550 5.7.1}, naming the domain, for
    C{sender_domain_hold} seconds (C{--sender-domain-hold}, 60 by
    default; 0: not remembered).  Held per (key, domain): other domains
    and other keys are not; the state holds digests and the status only,
    never the domain.
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional

from twisted.logger import Logger

from . import replies
from .addresses import address_domain
from .config import DEFAULT_API_QUOTA_HOLD, DEFAULT_SENDER_DOMAIN_HOLD
from .interfaces import IFleetState
from .replies import QUOTA_CODES, Reply

__all__ = ["HELD_QUOTA", "HELD_RATE", "HELD_SENDER_DOMAIN", "MAX_RATE_HOLD", "CredentialHolds"]

# Why a MAIL FROM is held (the reason smtp_sender_refused logs).
HELD_RATE = "rate_limited"
HELD_QUOTA = "quota"
HELD_SENDER_DOMAIN = "sender_domain"

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
    @param sender_domain_hold: seconds a refused sender domain is
        remembered per key (0: not at all).
    """

    def __init__(
        self,
        state: IFleetState,
        quota_hold: float = DEFAULT_API_QUOTA_HOLD,
        sender_domain_hold: float = DEFAULT_SENDER_DOMAIN_HOLD,
    ) -> None:
        self._state = state
        self.quota_hold = quota_hold
        self.sender_domain_hold = sender_domain_hold

    @staticmethod
    def _subject(api_key: str) -> str:
        # Never the key itself: the state's keys leave the process.
        return "hold:" + hashlib.sha256(api_key.encode("utf-8")).hexdigest()

    @staticmethod
    def _domain_subject(api_key: str, domain: str) -> str:
        digest = hashlib.sha256(api_key.encode("utf-8") + b"\0" + domain.encode("utf-8", "replace"))
        return "sender:" + digest.hexdigest()

    def learned(
        self,
        api_key: str,
        status: Optional[int],
        code: Optional[str],
        retry_after: Optional[float],
        reply: Reply,
        label: str,
        sender_domain: Optional[str] = None,
    ) -> None:
        """
        A send with C{api_key} ended with C{status}: remember a 429, or a
        refused sender domain.

        @param reply: what the client heard (a quota's text is kept).
        @param label: the identity, for the log.
        @param sender_domain: the domain the answer refused
            (L{APIError.sender_domain <poststack_relay.api.APIError>}).
        """
        if sender_domain is not None and status is not None:
            self._hold_domain(api_key, sender_domain, status, label)
            return
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

    def _hold_domain(self, api_key: str, domain: str, status: int, label: str) -> None:
        seconds = self.sender_domain_hold
        if seconds <= 0:
            return
        subject = self._domain_subject(api_key, domain)
        new = self._state.recall(subject) is None
        # The status only: the shared state never holds the domain.
        self._state.remember(subject, str(status), seconds)
        if new:
            _log.info(
                "PostStack API refused the sender domain {domain} for {identity} (HTTP {status}): "
                "MAIL FROM on it with this credential is answered 550 for {seconds}s",
                domain=domain,
                identity=label,
                status=status,
                seconds=round(seconds, 1),
                event="sender_domain_held",
            )

    def refusal(self, api_key: str, sender: Optional[str] = None) -> Optional[Reply]:
        """
        The reply for a C{MAIL FROM} of C{sender} with C{api_key} while
        either is held, or C{None} (L{held} without the reason).
        """
        found = self.held(api_key, sender)
        return None if found is None else found[1]

    def held(self, api_key: str, sender: Optional[str] = None) -> Optional[tuple[str, Reply]]:
        """
        Why and how a C{MAIL FROM} of C{sender} with C{api_key} is refused
        while held: L{HELD_RATE} or L{HELD_QUOTA} for the credential, else
        L{HELD_SENDER_DOMAIN} for the sender's domain; C{None} if neither.
        """
        state = self._state
        note = state.recall(self._subject(api_key))
        if note is not None:
            value, left = note
            if value.startswith(_QUOTA):
                return HELD_QUOTA, replies.quota_held(value[len(_QUOTA):])
            return HELD_RATE, replies.rate_limited(max(1, math.ceil(left)))
        domain = address_domain(sender) if sender else None
        if domain is not None:
            note = state.recall(self._domain_subject(api_key, domain))
            if note is not None and note[0].isdigit():
                return HELD_SENDER_DOMAIN, replies.sender_domain_refused(domain, int(note[0]))
        return None
