"""
Tests for the credential checker and realm (L{poststack_relay.auth}).
"""

from __future__ import annotations

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.api import MailboxSuspended
from poststack_relay.auth import AuthUnavailable, Identity, MailboxLoginsDisabled, PostStackChecker
from poststack_relay.testing import MemoryEmailAPI

KEY = "sk_live_abcdefghijklmnop"


def checker(api: MemoryEmailAPI, clock: Clock, service_key: str | None = "sk_live_service") -> PostStackChecker:
    return PostStackChecker(api, clock, service_key, positive_ttl=60, negative_ttl=10)


class CheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.api = MemoryEmailAPI(api_keys={KEY}, mailboxes={"alice@yourdomain.com": "pw"})
        self.clock = Clock()
        self.checker = checker(self.api, self.clock)

    def login(self, user: bytes, password: bytes):  # type: ignore[no-untyped-def]
        return self.checker.requestAvatarId(UsernamePassword(user, password))

    def test_api_key(self) -> None:
        """poststack + a valid key gives an API-key identity that sends with that key."""
        identity = self.successResultOf(self.login(b"poststack", KEY.encode()))
        self.assertIsInstance(identity, Identity)
        self.assertEqual((identity.kind, identity.api_key, identity.mailbox), ("api_key", KEY, None))
        self.assertEqual(identity.label, "sk_live_ab\N{HORIZONTAL ELLIPSIS}")
        self.assertNotIn(KEY, repr(identity))

    def test_username_case(self) -> None:
        """The username poststack is matched case-insensitively."""
        self.successResultOf(self.login(b"PostStack", KEY.encode()))

    def test_wrong_key(self) -> None:
        """A wrong key is UnauthorizedLogin."""
        self.failureResultOf(self.login(b"poststack", b"sk_live_wrong"), UnauthorizedLogin)

    def test_other_username(self) -> None:
        """A username that is neither poststack nor an address is refused without an API call."""
        self.failureResultOf(self.login(b"admin", KEY.encode()), UnauthorizedLogin)
        self.assertEqual(self.api.checks, 0)

    def test_empty_password(self) -> None:
        """An empty password is refused without an API call."""
        self.failureResultOf(self.login(b"poststack", b""), UnauthorizedLogin)
        self.assertEqual(self.api.checks, 0)

    def test_mailbox(self) -> None:
        """A mailbox login sends with the service key and names its mailbox."""
        identity = self.successResultOf(self.login(b"Alice@yourdomain.com", b"pw"))
        self.assertEqual(
            (identity.kind, identity.api_key, identity.mailbox),
            ("mailbox", "sk_live_service", "alice@yourdomain.com"),
        )

    def test_mailbox_without_service_key(self) -> None:
        """Without a service key, mailbox logins are refused as not enabled (not as a wrong password)."""
        c = checker(self.api, self.clock, service_key=None)
        self.failureResultOf(
            c.requestAvatarId(UsernamePassword(b"alice@yourdomain.com", b"pw")), MailboxLoginsDisabled
        )
        self.assertEqual(self.api.checks, 0)

    def test_suspended_mailbox(self) -> None:
        """The right password of a suspended mailbox is MailboxSuspended, also from the cache."""
        self.api.suspended.add("alice@yourdomain.com")
        c = checker(self.api, self.clock, service_key="sk_test_service")
        for _ in range(2):
            self.failureResultOf(
                c.requestAvatarId(UsernamePassword(b"alice@yourdomain.com", b"pw")), MailboxSuspended
            )
        self.assertEqual(self.api.checks, 1)

    def test_api_down(self) -> None:
        """An unreachable API is AuthUnavailable, not a failed login."""
        self.api.unavailable = True
        self.failureResultOf(self.login(b"poststack", KEY.encode()), AuthUnavailable)

    def test_positive_cache(self) -> None:
        """A good login is reused for the TTL, then checked again."""
        self.successResultOf(self.login(b"poststack", KEY.encode()))
        self.successResultOf(self.login(b"poststack", KEY.encode()))
        self.assertEqual(self.api.checks, 1)
        self.clock.advance(61)
        self.api.api_keys.clear()  # revoked
        self.failureResultOf(self.login(b"poststack", KEY.encode()), UnauthorizedLogin)
        self.assertEqual(self.api.checks, 2)

    def test_negative_cache(self) -> None:
        """Repeated wrong keys within the negative TTL make one API call."""
        for _ in range(5):
            self.failureResultOf(self.login(b"poststack", b"sk_live_wrong"), UnauthorizedLogin)
        self.assertEqual(self.api.checks, 1)

    def test_unavailable_not_cached(self) -> None:
        """An API outage is not cached: the next login asks again."""
        self.api.unavailable = True
        self.failureResultOf(self.login(b"poststack", KEY.encode()), AuthUnavailable)
        self.api.unavailable = False
        self.successResultOf(self.login(b"poststack", KEY.encode()))

    def test_cache_keys_hold_no_secret(self) -> None:
        """The cache is keyed by digests, never by the key itself."""
        self.successResultOf(self.login(b"poststack", KEY.encode()))
        for k in self.checker._cache:
            self.assertNotIn(KEY.encode(), k)
