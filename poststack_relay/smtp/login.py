# -*- test-case-name: tests.test_smtp_login,tests.test_smtp_auth,tests.test_auth_throttle -*-
"""
Checking an SMTP login: the failed-login throttle first, then the cred
portal; each outcome logged (without secrets) and counted, and turned into
the reply the session sends.
"""

from __future__ import annotations

from typing import Optional, Union

import attrs
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import replies
from ..auth import AuthThrottle, AuthUnavailable, throttle_user_key
from ..interfaces import IRelayDelivery
from ..metrics import RelayMetrics
from ..replies import Reply

# One namespace for the SMTP side's events, as text logs show it
# ("[poststack_relay.smtp#info]"), whichever module logs them.
_log = Logger(namespace="poststack_relay.smtp")


def username_label(username: bytes) -> str:
    """
    What a log may say about a login name: the name for mailboxes and
    C{poststack}, a placeholder for anything else (it may be a pasted key).
    """
    try:
        name = username.decode("utf-8")
    except UnicodeDecodeError:
        return "(not UTF-8)"
    if name.lower() == "poststack" or ("@" in name and len(name) <= 254 and " " not in name):
        return replies.clean_text(name, 254)
    return "(other)"


@attrs.frozen
class LoginOutcome:
    """
    A checked login.

    @ivar reply: what to answer (after C{delay} seconds).
    @ivar delivery: the avatar, for good credentials.
    @ivar failed_login: were the credentials wrong (not merely unchecked)?
    """

    reply: Reply
    delivery: Optional[IRelayDelivery] = None
    failed_login: bool = False
    delay: float = 0.0


class Authenticator:
    """
    Checks the logins of every session of a relay.

    @param throttle: failed-login bookkeeping, or C{None} for none.
    """

    def __init__(self, portal: Portal, throttle: Optional[AuthThrottle], metrics: RelayMetrics) -> None:
        self._portal = portal
        self._throttle = throttle
        self._metrics = metrics

    def login(
        self, username: bytes, password: bytes, session: str, client: str
    ) -> Union[Reply, "Deferred[LoginOutcome]"]:
        """
        Check a login from the session C{session} of the client address
        C{client}: the reply refusing it at once (too many failures), or a
        Deferred that fires with its L{LoginOutcome} (and never fails).
        """
        shown = username_label(username)
        throttle = self._throttle
        metrics = self._metrics
        user_key = throttle_user_key(username)
        if throttle is not None:
            refusal = throttle.refusal(client, user_key)
            if refusal is not None:
                # Refused before the credentials are checked: no API call,
                # and nothing a guesser could learn from.
                _log.info(
                    "{session} auth refused: too many failures for this {reason} "
                    "user={user} client={client}",
                    event="auth_throttled",
                    session=session,
                    reason=refusal,
                    user=shown,
                    client=client,
                )
                metrics.auth["throttled"].inc()
                return replies.AUTH_THROTTLED
        d = self._portal.login(UsernamePassword(username, password), None, IRelayDelivery)

        def succeeded(result: tuple[object, IRelayDelivery, object]) -> LoginOutcome:
            _, avatar, _ = result
            metrics.auth["ok"].inc()
            # The text is made here, braces doubled: one of these per
            # connection, and a ready-made text costs the log little
            # (poststack_relay.logs.classic_text).
            label = avatar.identity.label
            text = f"{session} auth ok user={shown} identity={label} client={client}"
            _log.info(
                text.replace("{", "{{").replace("}", "}}"),
                event="auth_ok",
                session=session,
                user=shown,
                identity=label,
                client=client,
            )
            return LoginOutcome(replies.AUTH_OK, delivery=avatar)

        def failed(failure: Failure) -> LoginOutcome:
            delay = 0.0
            invalid = False
            if isinstance(failure.value, UnauthorizedLogin):
                reply = replies.AUTH_FAILED
                outcome = "invalid"
                invalid = True
                if throttle is not None:
                    delay = throttle.failed(client, user_key)
            elif isinstance(failure.value, AuthUnavailable):
                reply = replies.AUTH_UNAVAILABLE
                outcome = "unavailable"
            else:
                _log.failure("credential check crashed", failure, event="auth_crash")
                reply = replies.AUTH_UNAVAILABLE
                outcome = "error"
            metrics.auth[outcome].inc()
            _log.info(
                "{session} auth failed ({outcome}) user={user} client={client}",
                event="auth_failed",
                session=session,
                outcome=outcome,
                user=shown,
                client=client,
                delay=delay,
            )
            return LoginOutcome(reply, failed_login=invalid, delay=delay)

        return d.addCallbacks(succeeded, failed)
