# -*- test-case-name: tests.test_smtp_sasl -*-
"""
SASL PLAIN and LOGIN (RFC 4616, and the LOGIN draft), pure: the
mechanism, its initial response and the client's continuation lines in;
a challenge to send, the credentials to check, or the reply refusing the
exchange out.
"""

from __future__ import annotations

import base64
import binascii
from typing import Optional, Union

import attrs

from .. import replies
from ..replies import Reply

#: The mechanisms offered (C{250-AUTH PLAIN LOGIN}).
MECHANISMS = (b"PLAIN", b"LOGIN")

_USERNAME_PROMPT = base64.b64encode(b"Username:")
_PASSWORD_PROMPT = base64.b64encode(b"Password:")


@attrs.frozen
class Challenge:
    """Send C{334 <prompt>} and wait for the client's next line."""

    prompt: bytes


@attrs.frozen
class Credentials:
    """The exchange is complete: check these."""

    username: bytes
    password: bytes


@attrs.frozen
class Refused:
    """
    The exchange ended without credentials to check.

    @ivar reply: what to answer.
    @ivar outcome: the C{auth} metric it counts as (C{"malformed"},
        C{"invalid"}), or C{None} (the client aborted).
    @ivar failed_login: does it count as a failed login (toward the
        per-connection AUTH failure limit)?
    """

    reply: Reply
    outcome: Optional[str] = None
    failed_login: bool = False


Step = Union[Challenge, Credentials, Refused]

_BAD_BASE64 = Refused(replies.AUTH_BAD_BASE64, "malformed")
_MALFORMED = Refused(replies.AUTH_MALFORMED, "malformed")
_AUTHZID = Refused(replies.AUTH_AUTHZID, "invalid", failed_login=True)
_ABORTED = Refused(replies.AUTH_ABORTED)


def _b64decode(data: bytes) -> Optional[bytes]:
    if data == b"=":  # RFC 4954: an empty initial response
        return b""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


def _plain(response: bytes) -> Step:
    decoded = _b64decode(response)
    if decoded is None:
        return _BAD_BASE64
    parts = decoded.split(b"\0")
    if len(parts) != 3:
        return _MALFORMED
    authzid, authcid, password = parts
    if authzid and authzid != authcid:
        return _AUTHZID
    return Credentials(authcid, password)


class SASLExchange:
    """
    One C{AUTH} exchange.  L{start} takes the command's initial response
    (or C{None}); while the last step was a L{Challenge}, L{respond} takes
    each line the client sends.
    """

    __slots__ = ("_mechanism", "_user")

    def __init__(self, mechanism: bytes) -> None:
        """
        @param mechanism: one of L{MECHANISMS}, upper case.
        """
        if mechanism not in MECHANISMS:
            raise ValueError(mechanism)
        self._mechanism = mechanism
        self._user: Optional[bytes] = None

    def start(self, initial: Optional[bytes]) -> Step:
        """The first step, given the initial response if the command had one."""
        if self._mechanism == b"PLAIN":
            return Challenge(b"") if initial is None else _plain(initial)
        if initial is None:
            return Challenge(_USERNAME_PROMPT)
        return self._login_step(initial)

    def respond(self, line: bytes) -> Step:
        """The next step, given a continuation line (C{*} aborts)."""
        response = line.strip()
        if response == b"*":
            return _ABORTED
        if self._mechanism == b"PLAIN":
            return _plain(response)
        return self._login_step(response)

    def _login_step(self, response: bytes) -> Step:
        decoded = _b64decode(response)
        if decoded is None:
            return _BAD_BASE64
        if self._user is None:
            self._user = decoded
            return Challenge(_PASSWORD_PROMPT)
        user, self._user = self._user, None
        return Credentials(user, decoded)
