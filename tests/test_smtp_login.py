# -*- test-case-name: tests.test_smtp_login -*-
"""
The credential check of an SMTP login (L{poststack_relay.smtp.login}),
without a session: the throttle, the portal's answers turned into
outcomes, the metrics and the log lines (which never show a secret).
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from poststack_relay import replies
from poststack_relay.api import MailboxSuspended
from poststack_relay.auth import AuthThrottle, AuthUnavailable, MailboxLoginsDisabled
from poststack_relay.fleet import LocalState
from poststack_relay.metrics import RelayMetrics
from poststack_relay.rates import RateLimit
from poststack_relay.smtp.login import Authenticator, LoginOutcome, username_label

SECRET = b"sk_live_secret_0123456789"


class Avatar:
    class identity:
        label = "api-key:abcd"


@implementer(ICredentialsChecker)
class Checker:
    """Answers every check with C{answer} (a callable of the credentials)."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self) -> None:
        self.answer: Any = lambda c: succeed(c.username)
        self.checked = 0

    def requestAvatarId(self, credentials: Any) -> "Deferred[Any]":
        self.checked += 1
        result: Deferred[Any] = self.answer(credentials)
        return result


@implementer(IRealm)
class Realm:
    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        return interfaces[0], Avatar(), lambda: None


class AuthenticatorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.checker = Checker()
        self.clock = Clock()
        self.metrics = RelayMetrics()
        self.throttle: Optional[AuthThrottle] = AuthThrottle(self.clock, per_ip=2)
        self.authenticator = Authenticator(Portal(Realm(), [self.checker]), self.throttle, self.metrics)

    def login(self, username: bytes = b"poststack", password: bytes = SECRET) -> Any:
        return self.authenticator.login(username, password, "s1", "192.0.2.7")

    def counted(self, result: str) -> Optional[float]:
        return self.metrics.registry.get_sample_value("poststack_relay_auth_total", {"result": result})

    def test_good(self) -> None:
        """Good credentials give the avatar and 235, counted and logged with the identity."""
        with capturedLogs() as events:
            outcome = self.successResultOf(self.login())
        self.assertIsInstance(outcome.delivery, Avatar)
        self.assertEqual(outcome, LoginOutcome(replies.AUTH_OK, delivery=outcome.delivery))
        self.assertEqual(self.counted("ok"), 1.0)
        [event] = [e for e in events if e.get("event") == "auth_ok"]
        self.assertEqual((event["user"], event["identity"], event["client"]), ("poststack", "api-key:abcd", "192.0.2.7"))

    def test_bad(self) -> None:
        """Wrong credentials are a failed login with 535 and the throttle's delay."""
        self.checker.answer = lambda c: fail(UnauthorizedLogin())
        outcome = self.successResultOf(self.login())
        self.assertEqual((outcome.reply, outcome.delivery, outcome.failed_login), (replies.AUTH_FAILED, None, True))
        self.assertGreater(outcome.delay, 0)
        self.assertEqual(self.counted("invalid"), 1.0)

    def test_unavailable(self) -> None:
        """The API being down is 454, not a failed login, with no delay."""
        self.checker.answer = lambda c: fail(AuthUnavailable())
        outcome = self.successResultOf(self.login())
        self.assertEqual(outcome, LoginOutcome(replies.AUTH_UNAVAILABLE))
        self.assertEqual(self.counted("unavailable"), 1.0)

    def test_crash(self) -> None:
        """A checker that crashes is logged as a failure and answered 454."""
        self.checker.answer = lambda c: fail(ZeroDivisionError())
        outcome = self.successResultOf(self.login())
        self.assertEqual(outcome, LoginOutcome(replies.AUTH_UNAVAILABLE))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(self.counted("error"), 1.0)

    def test_avatar_crash_is_an_answer(self) -> None:
        """
        A realm whose avatar cannot be logged (an embedder's) still gives
        an outcome (454, logged), never a failed Deferred that would leave
        the session waiting with its idle timer stopped; the check is no
        longer in flight.
        """

        @implementer(IRealm)
        class NoIdentityRealm:
            def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
                return interfaces[0], object(), lambda: None

        authenticator = Authenticator(Portal(NoIdentityRealm(), [self.checker]), self.throttle, self.metrics)
        outcome = self.successResultOf(authenticator.login(b"poststack", SECRET, "s1", "192.0.2.7"))
        self.assertEqual(outcome, LoginOutcome(replies.AUTH_UNAVAILABLE))
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)
        self.assertEqual(self.counted("error"), 1.0)
        assert self.throttle is not None
        self.assertIsNone(self.throttle.refusal("192.0.2.7", None))

    def test_throttled(self) -> None:
        """Past the client's failure limit a login is refused unchecked with 454 4.7.0."""
        self.checker.answer = lambda c: fail(UnauthorizedLogin())
        for _ in range(2):
            self.successResultOf(self.login())
        checked = self.checker.checked
        self.assertEqual(self.login(), replies.auth_throttled(300))
        self.assertEqual(self.checker.checked, checked)
        self.assertEqual(self.counted("throttled"), 1.0)

    def test_burst_of_good_logins_waits_not_refused(self) -> None:
        """
        More logins at once from one address than the failure limit, all
        correct: the ones past the limit wait for the checks in flight
        (which might have been failures) and then succeed; none is refused.
        """
        pending: list[Deferred[Any]] = []

        def answer(credentials: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            pending.append(d)
            return d

        self.checker.answer = answer
        results = [self.login() for _ in range(4)]  # per_ip=2
        self.assertFalse([r for r in results if isinstance(r, replies.Reply)])
        self.assertEqual(self.checker.checked, 2)
        while pending:
            pending.pop(0).callback(b"poststack")
        self.assertEqual(self.checker.checked, 4)
        for result in results:
            self.assertEqual(self.successResultOf(result).reply, replies.AUTH_OK)
        self.assertFalse(self.counted("throttled"))

    def test_waiting_login_refused_once_checks_in_flight_fail(self) -> None:
        """
        Parallel guesses cannot overshoot the limit: a login waiting for
        checks in flight is refused without a check when they fail.
        """
        pending: list[Deferred[Any]] = []

        def answer(credentials: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            pending.append(d)
            return d

        self.checker.answer = answer
        results = [self.login(password=b"sk_live_wrong_%d" % n) for n in range(3)]
        self.assertEqual(self.checker.checked, 2)
        while pending:
            pending.pop(0).errback(UnauthorizedLogin())
        self.assertEqual(self.checker.checked, 2)
        third = self.successResultOf(results[2])
        self.assertEqual(third.reply.code, 454)
        self.assertFalse(third.failed_login)

    def test_same_guess_again_counts_once(self) -> None:
        """
        The same wrong credentials again with the connection's memory: 535
        at once, counted as repeated, not failed; other credentials count.
        """
        assert self.throttle is not None
        self.checker.answer = lambda c: fail(UnauthorizedLogin())
        tried: set[bytes] = set()
        first = self.successResultOf(self.authenticator.login(b"a@x.com", b"pw1", "s1", "192.0.2.7", tried))
        again = self.successResultOf(self.authenticator.login(b"a@x.com", b"pw1", "s1", "192.0.2.7", tried))
        self.assertEqual((first.failed_login, again.failed_login, again.delay), (True, False, 0.0))
        self.assertEqual(again.reply, replies.AUTH_FAILED)
        self.assertEqual(self.throttle.failures("192.0.2.7", "a@x.com"), 1)
        self.assertEqual((self.counted("invalid"), self.counted("repeated")), (1.0, 1.0))
        # Nothing secret is kept: digests only.
        self.assertEqual(len(tried), 1)
        self.assertNotIn(b"pw1", next(iter(tried)))
        other = self.successResultOf(self.authenticator.login(b"a@x.com", b"pw2", "s1", "192.0.2.7", tried))
        self.assertTrue(other.failed_login)
        self.assertEqual(self.throttle.failures("192.0.2.7", "a@x.com"), 2)

    def test_suspended_and_disabled_are_not_guesses(self) -> None:
        """A suspended mailbox (535 5.7.1) and mailbox logins not enabled (454) are not failed guesses."""
        assert self.throttle is not None
        for error, reply, result in (
            (MailboxSuspended(), replies.MAILBOX_SUSPENDED, "suspended"),
            (MailboxLoginsDisabled(), replies.MAILBOX_LOGINS_DISABLED, "disabled"),
        ):
            self.checker.answer = lambda c, error=error: fail(error)
            outcome = self.successResultOf(self.login(b"a@x.com"))
            self.assertEqual(outcome, LoginOutcome(reply))
            self.assertEqual(self.counted(result), 1.0)
        self.assertEqual(self.throttle.failures("192.0.2.7", "a@x.com"), 0)

    def test_rate_limited(self) -> None:
        """Past the AUTH rate a login is refused with 421 and a retry-after hint, unchecked."""
        throttle = AuthThrottle(self.clock, rate=RateLimit(LocalState(self.clock), self.clock, 2))
        authenticator = Authenticator(Portal(Realm(), [self.checker]), throttle, self.metrics)
        self.clock.advance(30)
        for _ in range(2):
            self.successResultOf(authenticator.login(b"poststack", SECRET, "s1", "192.0.2.7"))
        with capturedLogs() as events:
            reply = authenticator.login(b"poststack", SECRET, "s1", "192.0.2.7")
        # Both in the bucket that started at 0: allowed again once it slides out.
        self.assertEqual(reply, replies.auth_rate_limited(60))
        self.assertEqual(self.checker.checked, 2)
        self.assertEqual(self.counted("rate_limited"), 1.0)
        [event] = [e for e in events if e.get("event") == "auth_rate_limited"]
        self.assertEqual((event["seconds"], event["client"]), (60, "192.0.2.7"))
        # Another address is not affected.
        self.successResultOf(authenticator.login(b"poststack", SECRET, "s1", "192.0.2.8"))

    def test_no_throttle(self) -> None:
        """Without a throttle failures are never delayed nor refused."""
        authenticator = Authenticator(Portal(Realm(), [self.checker]), None, self.metrics)
        self.checker.answer = lambda c: fail(UnauthorizedLogin())
        for _ in range(5):
            outcome = self.successResultOf(authenticator.login(b"poststack", SECRET, "s1", "192.0.2.7"))
            self.assertEqual((outcome.failed_login, outcome.delay), (True, 0.0))

    def test_no_secret_logged(self) -> None:
        """Neither the password nor a key pasted as the username reaches any log event."""
        self.checker.answer = lambda c: fail(UnauthorizedLogin())
        with capturedLogs() as events:
            self.successResultOf(self.login(SECRET, SECRET))
            self.successResultOf(self.login(b"poststack", SECRET))
        self.assertTrue(events)
        for event in events:
            self.assertNotIn(SECRET.decode(), repr(event))


class UsernameLabelTests(SynchronousTestCase):
    def test_labels(self) -> None:
        """Mailboxes and poststack are shown; anything else (maybe a key) is not."""
        self.assertEqual(username_label(b"Alice@Example.com"), "Alice@Example.com")
        self.assertEqual(username_label(b"PostStack"), "PostStack")
        self.assertEqual(username_label(SECRET), "(other)")
        self.assertEqual(username_label(b"a b@c.com"), "(other)")
        self.assertEqual(username_label(b"\xff@x.com"), "(not UTF-8)")
