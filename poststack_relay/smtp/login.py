# -*- test-case-name: tests.test_smtp_login,tests.test_smtp_auth,tests.test_auth_throttle -*-
"""
Checking an SMTP login: the failed-login throttle first, then the cred
portal; each outcome logged (without secrets) and counted, and turned into
the reply the session sends.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Optional, Union

import attrs
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import replies
from ..api import MailboxSuspended
from ..auth import AuthThrottle, AuthUnavailable, Lockout, MailboxLoginsDisabled, throttle_user_key
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
    @ivar failed_login: were the credentials wrong (not merely unchecked),
        a guess not made before on this connection?
    """

    reply: Reply
    delivery: Optional[IRelayDelivery] = None
    failed_login: bool = False
    delay: float = 0.0


class Authenticator:
    """
    Checks the logins of every session of a relay.

    @param throttle: failed-login bookkeeping and the AUTH rate, or
        C{None} for none.
    """

    def __init__(self, portal: Portal, throttle: Optional[AuthThrottle], metrics: RelayMetrics) -> None:
        self._portal = portal
        self._throttle = throttle
        self._metrics = metrics
        # Keys the digests of a connection's failed credentials (never
        # stored anywhere else, never the secrets themselves).
        self._pepper = os.urandom(32)

    def _rate_refusal(self, session: str, client: str) -> Optional[Reply]:
        """The reply refusing a login over the AUTH rate, or C{None}."""
        throttle = self._throttle
        if throttle is None:
            return None
        wait = throttle.rate_limited(client)
        if wait is not None:
            _log.info(
                "{session} auth refused: over the AUTH rate, retry in {seconds}s client={client}",
                event="auth_rate_limited",
                session=session,
                seconds=wait,
                client=client,
            )
            self._metrics.auth["rate_limited"].inc()
            return replies.auth_rate_limited(wait)
        return None

    def _lockout_refusal(self, lockout: Lockout, shown: str, session: str, client: str) -> Reply:
        """The reply refusing a locked-out login, logged and counted."""
        # Refused before the credentials are checked: no API call, and
        # nothing a guesser could learn from.
        _log.info(
            "{session} auth refused: too many failures for this {reason} for {seconds}s "
            "user={user} client={client}",
            event="auth_throttled",
            session=session,
            reason=lockout.reason,
            seconds=lockout.seconds,
            user=shown,
            client=client,
        )
        self._metrics.auth["throttled"].inc()
        return replies.auth_throttled(lockout.seconds)

    def login(
        self,
        username: bytes,
        password: bytes,
        session: str,
        client: str,
        tried: Optional[set[bytes]] = None,
    ) -> Union[Reply, "Deferred[LoginOutcome]"]:
        """
        Check a login from the session C{session} of the client address
        C{client}: the reply refusing it at once (AUTH rate, too many
        failures), or a Deferred that fires with its L{LoginOutcome} (and
        never fails).

        @param tried: the connection's own memory of the credentials that
            failed on it (keyed digests): the same wrong credentials again
            on one connection (smtplib tries PLAIN, then LOGIN) are checked
            but not counted as another guess.
        """
        refusal = self._rate_refusal(session, client)
        if refusal is not None:
            return refusal
        return self._check(username, password, session, client, tried)

    def _check(
        self,
        username: bytes,
        password: bytes,
        session: str,
        client: str,
        tried: Optional[set[bytes]],
    ) -> Union[Reply, "Deferred[LoginOutcome]"]:
        """L{login} past the AUTH rate: the lock-outs, then the check."""
        shown = username_label(username)
        throttle = self._throttle
        metrics = self._metrics
        user_key = throttle_user_key(username)
        if throttle is not None:
            lockout = throttle.refusal(client, user_key)
            if lockout is not None and lockout.pending:
                # Only checks in flight would pass the limit: wait for one
                # of them to answer, then decide again.
                def again(_: None) -> Union[LoginOutcome, "Deferred[LoginOutcome]"]:
                    result = self._check(username, password, session, client, tried)
                    return LoginOutcome(result) if isinstance(result, Reply) else result

                return throttle.after_checks(client, user_key).addCallback(again)
            if lockout is not None:
                return self._lockout_refusal(lockout, shown, session, client)
            throttle.started(client, user_key)
        digest = hmac.new(self._pepper, username + b"\0" + password, hashlib.sha256).digest()
        d = self._portal.login(UsernamePassword(username, password), None, IRelayDelivery)

        def succeeded(result: tuple[object, IRelayDelivery, object]) -> LoginOutcome:
            if throttle is not None:
                throttle.finished(client, user_key)
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
            try:
                return answer(failure)
            finally:
                # After the failure is counted: the logins waiting for this
                # check decide with it.
                if throttle is not None:
                    throttle.finished(client, user_key)

        def answer(failure: Failure) -> LoginOutcome:
            delay = 0.0
            counted = False
            error = failure.value
            if isinstance(error, UnauthorizedLogin):
                reply = replies.AUTH_FAILED
                if tried is not None and digest in tried:
                    # The same guess again on this connection: not a new one.
                    outcome = "repeated"
                else:
                    outcome = "invalid"
                    counted = True
                    if tried is not None:
                        tried.add(digest)
                    if throttle is not None:
                        delay = throttle.failed(client, user_key)
            elif isinstance(error, MailboxSuspended):
                reply, outcome = replies.MAILBOX_SUSPENDED, "suspended"
            elif isinstance(error, MailboxLoginsDisabled):
                reply, outcome = replies.MAILBOX_LOGINS_DISABLED, "disabled"
            elif isinstance(error, AuthUnavailable):
                reply, outcome = replies.AUTH_UNAVAILABLE, "unavailable"
            else:
                _log.failure("credential check crashed", failure, event="auth_crash")
                reply, outcome = replies.AUTH_UNAVAILABLE, "error"
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
            return LoginOutcome(reply, failed_login=counted, delay=delay)

        def crashed(failure: Failure) -> LoginOutcome:
            # Never fail (the session waits for this answer with its idle
            # timer stopped): e.g. an embedder's realm whose avatar has no
            # identity to log.
            _log.failure("credential check crashed", failure, event="auth_crash")
            metrics.auth["error"].inc()
            return LoginOutcome(replies.AUTH_UNAVAILABLE)

        return d.addCallbacks(succeeded, failed).addErrback(crashed)
