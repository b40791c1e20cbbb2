"""
Tests for AUTH failure throttling (L{poststack_relay.auth.AuthThrottle} and
its use in L{poststack_relay.smtp.RelaySMTP}), the credential caches seen
from the SMTP side, and AUTH PLAIN/LOGIN edge cases.

All synchronous: a StringTransport per connection, a Clock, an in-memory API.
"""

from __future__ import annotations

import base64
from typing import Any, Optional

from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.auth import (
    MAILBOX_MEMORY,
    AuthThrottle,
    PostStackChecker,
    RelayRealm,
    throttle_client_key,
    throttle_user_key,
)
from poststack_relay.config import RelayConfig
from poststack_relay.delivery import RelayDelivery
from poststack_relay.service import makeRelayService
from poststack_relay.smtp import MAX_AUTH_LINE, RelayFactory, RelaySMTP
from poststack_relay.testing import MemoryEmailAPI, write_certificate

KEY = "sk_test_valid_key_0123456789"
MAILBOX = "alice@yourdomain.com"
MAILBOX_PASSWORD = "mbpass"
AUTH_OK = b"235 2.7.0 Authentication successful"
AUTH_FAILED = (
    b"535 5.7.8 Authentication credentials invalid: use username poststack with an API key "
    b"(sk_live_...), or your mailbox address with its mailbox password"
)


def throttled(seconds: int) -> bytes:
    """The 454 of a lock-out that ends in C{seconds}."""
    return b"454 4.7.0 Too many failed logins, try again in %d s" % seconds


TOO_MANY_AUTH_FAILURES = b"421 4.7.0 Error: too many authentication failures"


def plain(user: str, password: str, authzid: str = "") -> bytes:
    """An AUTH PLAIN response (base64 of authzid NUL user NUL password)."""
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode("utf-8"))


def b64(text: str) -> bytes:
    """Base64 of the UTF-8 of C{text} (an AUTH LOGIN response)."""
    return base64.b64encode(text.encode("utf-8"))


class Connection:
    """
    One client connection to a L{RelayFactory}, over a StringTransport.
    """

    def __init__(self, factory: RelayFactory, peer: Any) -> None:
        proto = factory.buildProtocol(peer)
        assert isinstance(proto, RelaySMTP)
        self.proto: RelaySMTP = proto
        self.transport = StringTransport(peerAddress=peer)
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> list[bytes]:
        """Feed C{data}; the reply lines it caused at once."""
        self.transport.clear()
        self.proto.dataReceived(data)
        return self.output()

    def output(self) -> list[bytes]:
        """The reply lines written since the last L{send} (or clear)."""
        return self.transport.value().split(b"\r\n")[:-1]

    def close(self) -> None:
        """The client goes away."""
        self.proto.connectionLost(None)


class ThrottleHarness:
    """
    A relay factory with an L{AuthThrottle} made from its config (as
    L{makeRelayService} does), an in-memory API that counts checks, and a
    Clock shared by the throttle, the caches and the sessions.
    """

    def __init__(self, throttled: bool = True, **config: Any) -> None:
        self.api = MemoryEmailAPI(
            api_keys={KEY, "sk_test_other_key_000000"},
            mailboxes={MAILBOX: MAILBOX_PASSWORD, "bob@yourdomain.com": "bobpass"},
        )
        self.clock = Clock()
        self.config = RelayConfig(metrics_listen="off", 
            tls_cert="unused.pem", hostname="relay.test", service_key="sk_test_service", **config
        )
        self.checker = PostStackChecker(
            self.api,
            self.clock,
            self.config.service_key,
            positive_ttl=self.config.auth_cache_ttl,
            negative_ttl=self.config.auth_negative_ttl,
        )
        portal = Portal(RelayRealm(lambda i: RelayDelivery(i, self.api)), [self.checker])
        self.throttle = AuthThrottle(
            self.clock,
            window=self.config.auth_failure_window,
            per_ip=self.config.auth_failures_per_ip,
            per_user=self.config.auth_failures_per_user,
            delay=self.config.auth_failure_delay,
            max_delay=self.config.auth_failure_max_delay,
        )
        self.factory = RelayFactory(
            portal, self.config, self.clock, throttle=self.throttle if throttled else None
        )

    def connect(self, host: str = "192.0.2.7") -> Connection:
        """A new connection from C{host} that has sent EHLO."""
        peer: Any = IPv6Address("TCP", host, 5555) if ":" in host else IPv4Address("TCP", host, 5555)
        conn = Connection(self.factory, peer)
        conn.send(b"EHLO client.test\r\n")
        return conn

    def attempt(self, response: bytes, host: str = "192.0.2.7") -> bytes:
        """
        One AUTH PLAIN on a new connection; waits out any delay on the
        clock and returns the reply line; the connection is then closed.
        """
        conn = self.connect(host)
        out = conn.send(b"AUTH PLAIN " + response + b"\r\n")
        if not out:
            self.clock.advance(self.config.auth_failure_max_delay)
            out = conn.output()
        conn.close()
        assert len(out) == 1, out
        return out[0]


class AuthThrottleUnitTests(SynchronousTestCase):
    """L{AuthThrottle} on its own, with a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()

    def throttle(self, **kwargs: Any) -> AuthThrottle:
        return AuthThrottle(self.clock, **kwargs)

    def reason(self, t: AuthThrottle, client: str, user: Optional[str] = None) -> Optional[str]:
        """Why C{t} refuses a login now (C{"client"}, C{"mailbox"}), or C{None}."""
        lockout = t.refusal(client, user)
        return None if lockout is None else lockout.reason

    def test_delays_double_up_to_the_cap(self) -> None:
        """Each failure's delay doubles from auth_failure_delay and stops at the maximum."""
        t = self.throttle(delay=0.5, max_delay=8.0, per_ip=100)
        delays = [t.failed("192.0.2.1", None) for _ in range(7)]
        self.assertEqual(delays, [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0])

    def test_no_delay_when_disabled(self) -> None:
        """A delay of 0 means no delay at all, however many failures."""
        t = self.throttle(delay=0.0, per_ip=100)
        self.assertEqual({t.failed("192.0.2.1", None) for _ in range(20)}, {0.0})

    def test_huge_count_does_not_overflow(self) -> None:
        """A very high count still gives the maximum delay, not an overflow."""
        t = self.throttle(delay=0.5, max_delay=8.0, per_ip=10**6)
        for _ in range(2000):
            delay = t.failed("192.0.2.1", None)
        self.assertEqual(delay, 8.0)

    def test_client_limit(self) -> None:
        """At per_ip failures that address is refused; another address is not."""
        t = self.throttle(per_ip=3)
        for _ in range(2):
            t.failed("192.0.2.1", None)
        self.assertIsNone(t.refusal("192.0.2.1", None))
        t.failed("192.0.2.1", None)
        self.assertEqual(self.reason(t, "192.0.2.1", None), "client")
        self.assertEqual(self.reason(t, "192.0.2.1", "bob@x.com"), "client")
        self.assertIsNone(t.refusal("192.0.2.2", None))

    def test_mailbox_never_locked_by_other_addresses(self) -> None:
        """
        Failures for one mailbox from many addresses never refuse it from
        an address that has not failed; per_user failures for it from one
        address refuse that mailbox from that address only.
        """
        t = self.throttle(per_ip=100, per_user=3)
        for n in range(50):
            t.failed(f"192.0.2.{n}", "alice@x.com")
        self.assertIsNone(t.refusal("198.51.100.9", "alice@x.com"))
        self.assertEqual(t.failures(user="alice@x.com"), 50)
        for _ in range(3):
            t.failed("198.51.100.9", "alice@x.com")
        self.assertEqual(self.reason(t, "198.51.100.9", "alice@x.com"), "mailbox")
        self.assertIsNone(t.refusal("198.51.100.9", "bob@x.com"))
        self.assertIsNone(t.refusal("198.51.100.9", None))
        self.assertIsNone(t.refusal("198.51.100.10", "alice@x.com"))

    def test_mailbox_under_attack(self) -> None:
        """
        Past UNDER_ATTACK * per_user failures for a mailbox, each address
        gets one failure per window for it; an address that has not failed
        for it is still checked, and other mailboxes keep per_user.
        """
        t = self.throttle(per_ip=100, per_user=5, window=300.0)
        for n in range(19):
            t.failed(f"192.0.2.{n}", "alice@x.com")
        self.assertIsNone(t.refusal("192.0.2.1", "alice@x.com"))
        t.failed("192.0.2.19", "alice@x.com")  # the 20th
        lockout = t.refusal("192.0.2.1", "alice@x.com")
        assert lockout is not None
        self.assertEqual((lockout.reason, lockout.seconds), ("mailbox", 300))
        self.assertIsNone(t.refusal("198.51.100.1", "alice@x.com"))
        t.failed("192.0.2.1", "bob@x.com")
        self.assertIsNone(t.refusal("192.0.2.1", "bob@x.com"))
        # Pausing for a window is not enough: the mailbox's count lives
        # MAILBOX_MEMORY windows, so each address still gets one guess.
        self.clock.advance(300)
        self.assertIsNone(t.refusal("192.0.2.1", "alice@x.com"))
        t.failed("192.0.2.1", "alice@x.com")
        self.assertIsNotNone(t.refusal("192.0.2.1", "alice@x.com"))
        # Once the attack is forgotten, per_user again.
        self.clock.advance(300 * MAILBOX_MEMORY)
        t.failed("192.0.2.1", "alice@x.com")
        self.assertIsNone(t.refusal("192.0.2.1", "alice@x.com"))

    def test_lockout_says_when_it_ends(self) -> None:
        """A refusal carries the whole seconds left of the count's window (at least 1)."""
        t = self.throttle(window=300.0, per_ip=2)
        t.failed("192.0.2.1", None)
        self.clock.advance(100)
        t.failed("192.0.2.1", None)
        self.clock.advance(12.5)
        lockout = t.refusal("192.0.2.1", None)
        assert lockout is not None
        self.assertEqual((lockout.reason, lockout.seconds), ("client", 288))
        self.clock.advance(287.4)  # t = 399.9
        lockout = t.refusal("192.0.2.1", None)
        assert lockout is not None
        self.assertEqual(lockout.seconds, 1)
        self.clock.advance(0.1)
        self.assertIsNone(t.refusal("192.0.2.1", None))

    def test_checks_in_flight_count(self) -> None:
        """
        Guesses sent in parallel cannot pass the limit before their
        failures are known: checks in flight count toward it (the login
        waits for their answers: a pending lock-out, not a refusal).
        """
        t = self.throttle(per_ip=100, per_user=2, window=300.0)
        t.started("192.0.2.1", "alice@x.com")
        t.started("192.0.2.1", "alice@x.com")
        lockout = t.refusal("192.0.2.1", "alice@x.com")
        assert lockout is not None
        self.assertEqual((lockout.reason, lockout.pending), ("mailbox", True))
        waiting = t.after_checks("192.0.2.1", "alice@x.com")
        self.assertNoResult(waiting)
        self.assertIsNone(t.refusal("192.0.2.2", "alice@x.com"))
        t.finished("192.0.2.1", "alice@x.com")
        self.successResultOf(waiting)
        self.assertIsNone(t.refusal("192.0.2.1", "alice@x.com"))
        t.finished("192.0.2.1", "alice@x.com")
        t.finished("192.0.2.1", "alice@x.com")  # one too many: harmless
        self.successResultOf(t.after_checks("192.0.2.1", "alice@x.com"))  # none in flight
        self.assertIsNone(t.refusal("192.0.2.1", "alice@x.com"))

    def test_delay_follows_the_larger_count(self) -> None:
        """The delay grows with the username's count even from a fresh address."""
        t = self.throttle(per_ip=100, per_user=100, delay=1.0, max_delay=100.0)
        for n in range(3):
            t.failed(f"192.0.2.{n}", "alice@x.com")
        self.assertEqual(t.failed("198.51.100.9", "alice@x.com"), 8.0)
        self.assertEqual(t.failed("198.51.100.9", None), 2.0)

    def test_window_restarts_at_each_failure(self) -> None:
        """A count is forgotten only after a whole window with no failure; refused attempts do not extend it."""
        t = self.throttle(window=300.0, per_ip=3)
        for _ in range(3):
            t.failed("192.0.2.1", None)
            self.clock.advance(100)
        # Last failure at t=200: refused until t=500.
        self.clock.advance(199)  # t=499
        self.assertEqual(self.reason(t, "192.0.2.1", None), "client")
        self.clock.advance(1)  # t=500
        self.assertIsNone(t.refusal("192.0.2.1", None))
        self.assertEqual(t.failures("192.0.2.1"), 0)
        self.assertEqual(t.failed("192.0.2.1", None), 0.5)

    def test_slow_guesser_keeps_its_count(self) -> None:
        """Failures just inside the window apart keep adding up (not a fixed window that resets)."""
        t = self.throttle(window=300.0, per_ip=5)
        for _ in range(5):
            t.failed("192.0.2.1", None)
            self.clock.advance(299)
        self.assertEqual(self.reason(t, "192.0.2.1", None), "client")

    def test_memory_is_bounded(self) -> None:
        """At most max_keys addresses and usernames are kept; the oldest are forgotten first."""
        t = self.throttle(max_keys=100, per_ip=2)
        t.failed("10.0.0.0", None)
        t.failed("10.0.0.0", None)
        for n in range(1, 1000):
            t.failed(f"10.0.{n // 256}.{n % 256}", f"user{n}@x.com")
        self.assertEqual(len(t), 100)
        self.assertEqual(t.failures("10.0.0.0"), 0)
        self.assertIsNone(t.refusal("10.0.0.0", None))
        self.assertEqual(t.failures("10.0.3.231", "user999@x.com"), 1)

    def test_expired_entries_are_dropped(self) -> None:
        """
        Counts whose window passed are forgotten (the mailboxes' after
        MAILBOX_MEMORY windows) and take no memory once the throttle is
        next used.
        """
        t = self.throttle(window=10.0)
        for n in range(50):
            t.failed(f"192.0.2.{n}", f"u{n}@x.com")
        self.assertEqual(len(t), 150)  # per address, per mailbox from it, per mailbox
        self.clock.advance(10)
        self.assertEqual((t.failures("192.0.2.1"), t.failures(user="u1@x.com")), (0, 1))
        self.clock.advance(10 * (MAILBOX_MEMORY - 1))
        self.assertEqual(t.failures(user="u1@x.com"), 0)
        self.assertIsNone(t.refusal("198.51.100.1", None))
        self.assertEqual(len(t), 0)

    def test_ipv6_counts_by_slash_64(self) -> None:
        """Addresses in one IPv6 /64 share a count; another /64 does not; an IPv4-mapped address is its IPv4."""
        t = self.throttle(per_ip=2)
        t.failed("2001:db8:1:2::1", None)
        t.failed("2001:db8:1:2:ffff:ffff:ffff:ffff", None)
        self.assertEqual(self.reason(t, "2001:db8:1:2::abcd", None), "client")
        self.assertIsNone(t.refusal("2001:db8:1:3::1", None))
        t.failed("::ffff:192.0.2.1", None)
        t.failed("192.0.2.1", None)
        self.assertEqual(self.reason(t, "192.0.2.1", None), "client")

    def test_client_keys(self) -> None:
        """Client keys: IPv4 as is, IPv6 as its /64, anything unparseable as given."""
        self.assertEqual(throttle_client_key("192.0.2.1"), "192.0.2.1")
        self.assertEqual(throttle_client_key("2001:db8::1"), "2001:db8::/64")
        self.assertEqual(throttle_client_key("fe80::1%eth0"), "fe80::/64")
        self.assertEqual(throttle_client_key("unix-socket"), "unix-socket")

    def test_user_keys(self) -> None:
        """Mailbox names are throttled lower-cased; poststack (the shared API-key name) and other names are not."""
        self.assertEqual(throttle_user_key(b"Alice@YourDomain.com"), "alice@yourdomain.com")
        self.assertEqual(throttle_user_key("J\u00f6rg@b\u00fccher.de".encode()), "j\u00f6rg@xn--bcher-kva.de")
        self.assertIsNone(throttle_user_key(b"poststack"))
        self.assertIsNone(throttle_user_key(b"PostStack"))
        self.assertIsNone(throttle_user_key(b"admin"))
        self.assertIsNone(throttle_user_key(b"\xff@x.com"))


    def test_user_key_spellings(self) -> None:
        """
        Every spelling of one mailbox is one key (the policy's address_key):
        U-label or A-label domain, NFC or NFD local part, case, blanks.
        """
        spellings = [
            "J\u00f6rg@B\u00fccher.example",
            "j\u00f6rg@xn--bcher-kva.example",
            "jo\u0308rg@bu\u0308cher.example",
            " JO\u0308RG@XN--BCHER-KVA.EXAMPLE ",
            "j\u00f6rg@b\u00fccher\uff0eexample",
        ]
        keys = {throttle_user_key(name.encode("utf-8")) for name in spellings}
        self.assertEqual(keys, {"j\u00f6rg@xn--bcher-kva.example"})

    def test_respelling_gives_no_fresh_count(self) -> None:
        """A mailbox's failures from an address refuse it from there however it is spelled."""
        throttle = AuthThrottle(Clock(), per_ip=100, per_user=2)
        for _ in range(2):
            throttle.failed("192.0.2.1", throttle_user_key("j\u00f6rg@b\u00fccher.example".encode()))
        other = throttle_user_key(b"j\xc3\xb6rg@xn--bcher-kva.example")
        lockout = throttle.refusal("192.0.2.1", other)
        self.assertIsNotNone(lockout)
        assert lockout is not None
        self.assertEqual(lockout.reason, "mailbox")

class ThrottledSessionTests(SynchronousTestCase):
    """The throttle as the SMTP session uses it."""

    def test_failure_reply_is_delayed(self) -> None:
        """A 535 waits auth_failure_delay; meanwhile pipelined input waits and the idle timer is stopped."""
        h = ThrottleHarness(auth_failure_delay=4.0, idle_timeout=2.0)
        conn = h.connect()
        out = conn.send(b"AUTH PLAIN " + plain("poststack", "sk_test_wrong") + b"\r\nNOOP\r\n")
        self.assertEqual(out, [])
        h.clock.advance(3.9)
        self.assertEqual(conn.output(), [])
        self.assertFalse(conn.transport.disconnecting)
        h.clock.advance(0.1)
        self.assertEqual(conn.output(), [AUTH_FAILED, b"250 2.0.0 Ok"])
        # The idle timer runs again after the reply.
        h.clock.advance(2.0)
        self.assertEqual(
            conn.output()[-1], b"421 4.4.2 Error: timeout exceeded, closing connection"
        )

    def test_delays_grow_across_connections(self) -> None:
        """The second and third failures from one address wait 1 s and 2 s, even on new connections."""
        h = ThrottleHarness()
        for expected in (0.5, 1.0, 2.0):
            conn = h.connect()
            self.assertEqual(conn.send(b"AUTH PLAIN " + plain("poststack", "sk_test_x") + b"\r\n"), [])
            h.clock.advance(expected - 0.01)
            self.assertEqual(conn.output(), [], expected)
            h.clock.advance(0.01)
            self.assertEqual(conn.output(), [AUTH_FAILED], expected)
            conn.close()

    def test_success_is_not_delayed(self) -> None:
        """After failures from the address, a good login is answered at once and the counts stay."""
        h = ThrottleHarness()
        for _ in range(3):
            self.assertEqual(h.attempt(plain("poststack", "sk_test_x")), AUTH_FAILED)
        conn = h.connect()
        self.assertEqual(conn.send(b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\n"), [AUTH_OK])
        self.assertEqual(h.throttle.failures("192.0.2.7"), 3)

    def test_success_does_not_reset_the_address(self) -> None:
        """Good logins between failures do not reset the address's count: the limit still comes."""
        h = ThrottleHarness(auth_failures_per_ip=4)
        for _ in range(4):
            self.assertEqual(h.attempt(plain("poststack", KEY)), AUTH_OK)
            self.assertEqual(h.attempt(plain("poststack", "sk_test_guess")), AUTH_FAILED)
        # The last failure's 8 s delay was waited out: 292 s of its window are left.
        self.assertEqual(h.attempt(plain("poststack", KEY)), throttled(292))

    def test_refusal_makes_no_api_call(self) -> None:
        """At the per-address limit even a good key gets 454 4.7.0, without any API call."""
        h = ThrottleHarness(auth_failures_per_ip=10)
        for n in range(10):
            self.assertEqual(h.attempt(plain("poststack", f"sk_test_guess_{n}")), AUTH_FAILED)
        checks = h.api.checks
        self.assertEqual(h.attempt(plain("poststack", KEY)), throttled(292))
        self.assertEqual(h.attempt(plain(MAILBOX, MAILBOX_PASSWORD)), throttled(292))
        self.assertEqual(h.api.checks, checks)
        # Another address is not affected.
        self.assertEqual(h.attempt(plain("poststack", KEY), host="198.51.100.1"), AUTH_OK)

    def test_refusal_over_login(self) -> None:
        """AUTH LOGIN is refused the same way, after the password, with no API call."""
        h = ThrottleHarness(auth_failures_per_ip=1)
        self.assertEqual(h.attempt(plain("poststack", "sk_test_x")), AUTH_FAILED)
        checks = h.api.checks
        conn = h.connect()
        self.assertEqual(conn.send(b"AUTH LOGIN " + b64("poststack") + b"\r\n"), [b"334 UGFzc3dvcmQ6"])
        self.assertEqual(conn.send(b64(KEY) + b"\r\n"), [throttled(292)])
        self.assertEqual(h.api.checks, checks)
        self.assertEqual(conn.send(b"NOOP\r\n"), [b"250 2.0.0 Ok"])

    def test_refusal_ends_after_quiet_window(self) -> None:
        """Once a whole window passes with no new failure, the address may log in again."""
        h = ThrottleHarness(auth_failures_per_ip=2, auth_failure_window=300.0)
        for _ in range(2):
            h.attempt(plain("poststack", "sk_test_x"))
        h.clock.advance(250)
        # The last failure was at t=8 (after the first one's delay), now t=266.
        self.assertEqual(h.attempt(plain("poststack", KEY)), throttled(42))
        h.clock.advance(50)
        self.assertEqual(h.attempt(plain("poststack", KEY)), AUTH_OK)

    def test_mailbox_not_locked_by_strangers(self) -> None:
        """
        Issue 18: wrong passwords for one mailbox from many addresses never
        lock its user out: the right password from an address that has not
        failed gets 235 (after the failures' delays grew to the maximum).
        """
        h = ThrottleHarness(auth_failures_per_user=5, auth_failures_per_ip=10)
        for n in range(100):
            reply = h.attempt(plain("Alice@YourDomain.com", f"guess{n}"), host=f"10.1.0.{n}")
            self.assertEqual(reply, AUTH_FAILED, n)
        self.assertEqual(h.api.checks, 100)
        # The mailbox's count makes each failure wait the longest delay.
        conn = h.connect("10.1.1.1")
        conn.send(b"AUTH PLAIN " + plain(MAILBOX, "guess-again") + b"\r\n")
        h.clock.advance(h.config.auth_failure_max_delay - 0.01)
        self.assertEqual(conn.output(), [])
        h.clock.advance(0.01)
        self.assertEqual(conn.output(), [AUTH_FAILED])
        conn = h.connect("10.2.0.1")
        self.assertEqual(conn.send(b"AUTH PLAIN " + plain(MAILBOX, MAILBOX_PASSWORD) + b"\r\n"), [AUTH_OK])

    def test_mailbox_locked_from_one_address(self) -> None:
        """
        auth_failures_per_user failures for one mailbox from one address
        lock that mailbox from that address only, without API calls.
        """
        h = ThrottleHarness(auth_failures_per_user=5, auth_failures_per_ip=10)
        for n in range(5):
            self.assertEqual(h.attempt(plain(MAILBOX, f"guess{n}")), AUTH_FAILED)
        checks = h.api.checks
        self.assertEqual(h.attempt(plain(MAILBOX, MAILBOX_PASSWORD)), throttled(292))
        self.assertEqual(h.api.checks, checks)
        self.assertEqual(h.attempt(plain("bob@yourdomain.com", "bobpass")), AUTH_OK)
        self.assertEqual(h.attempt(plain(MAILBOX, MAILBOX_PASSWORD), host="10.2.0.1"), AUTH_OK)

    def test_poststack_is_not_a_throttled_username(self) -> None:
        """Failures for poststack from many addresses never lock out API-key users elsewhere."""
        h = ThrottleHarness(auth_failures_per_user=3)
        for n in range(20):
            self.assertEqual(h.attempt(plain("poststack", f"sk_test_g{n}"), host=f"10.1.0.{n}"), AUTH_FAILED)
        self.assertEqual(h.attempt(plain("poststack", KEY), host="10.2.0.1"), AUTH_OK)

    def test_thousand_distinct_wrong_keys_few_api_calls(self) -> None:
        """1000 different wrong keys from one address cost at most auth_failures_per_ip (10) API calls."""
        # 1000 connections at once from one address: past the connection
        # rate, which is not what this test is about.
        h = ThrottleHarness(max_connection_rate_per_ip=0)
        replies = [h.attempt(plain("poststack", "sk_live_guess%06d" % n)) for n in range(1000)]
        self.assertLessEqual(h.api.checks, 10)
        self.assertEqual(replies[:10], [AUTH_FAILED] * 10)
        self.assertEqual(set(replies[10:]), {throttled(292)})

    def test_thousand_same_wrong_key_one_api_call(self) -> None:
        """Without the throttle, the negative cache alone turns 1000 tries of one wrong key into 1 API call per TTL."""
        h = ThrottleHarness(throttled=False, max_auth_failures=2000, max_errors=2000)
        conn = h.connect()
        out = conn.send((b"AUTH PLAIN " + plain("poststack", "sk_live_wrong") + b"\r\n") * 1000)
        self.assertEqual(out, [AUTH_FAILED] * 1000)
        self.assertEqual(h.api.checks, 1)
        h.clock.advance(h.config.auth_negative_ttl)
        conn.send(b"AUTH PLAIN " + plain("poststack", "sk_live_wrong") + b"\r\n")
        self.assertEqual(h.api.checks, 2)

    def test_pipelined_guesses_in_one_connection(self) -> None:
        """Guesses pipelined on one connection are answered one by one, each after its delay; the third closes it."""
        h = ThrottleHarness()
        conn = h.connect()
        guesses = b"".join(
            b"AUTH PLAIN " + plain("poststack", f"sk_test_{n}") + b"\r\n" for n in range(10)
        )
        self.assertEqual(conn.send(guesses), [])
        h.clock.advance(0.5)
        self.assertEqual(conn.output(), [AUTH_FAILED])
        h.clock.advance(1.0)
        self.assertEqual(conn.output(), [AUTH_FAILED] * 2)
        h.clock.advance(2.0)
        self.assertEqual(conn.output(), [AUTH_FAILED] * 3 + [TOO_MANY_AUTH_FAILURES])
        self.assertTrue(conn.transport.disconnecting)
        self.assertEqual(h.api.checks, 3)

    def test_connection_lost_during_delay(self) -> None:
        """A client that leaves while its 535 is delayed leaves no timer behind."""
        h = ThrottleHarness()
        conn = h.connect()
        conn.send(b"AUTH PLAIN " + plain("poststack", "sk_test_x") + b"\r\n")
        self.assertTrue(h.clock.getDelayedCalls())
        conn.close()
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_drain_waits_for_a_delayed_reply(self) -> None:
        """A stopping relay lets a delayed 535 be sent, then closes the session with 421 4.3.2."""
        h = ThrottleHarness()
        conn = h.connect()
        conn.send(b"AUTH PLAIN " + plain("poststack", "sk_test_x") + b"\r\n")
        h.factory.drain(30)
        self.assertEqual(conn.output(), [])
        h.clock.advance(0.5)
        self.assertEqual(
            conn.output(), [AUTH_FAILED, b"421 4.3.2 Service shutting down, try again later"]
        )

    def test_api_outage_is_not_a_failure(self) -> None:
        """454 for an unreachable API is neither delayed nor counted."""
        h = ThrottleHarness()
        h.api.unavailable = True
        conn = h.connect()
        out = conn.send(b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\n")
        self.assertTrue(out[0].startswith(b"454 4.7.0 Temporary authentication failure"), out)
        self.assertEqual(h.throttle.failures("192.0.2.7"), 0)

    def test_cancel_is_not_a_failure(self) -> None:
        """Cancelled exchanges ('*') are neither delayed nor counted."""
        h = ThrottleHarness()
        conn = h.connect()
        for _ in range(5):
            conn.send(b"AUTH LOGIN\r\n")
            self.assertEqual(conn.send(b"*\r\n"), [b"501 5.7.0 Authentication aborted"])
        self.assertEqual(h.throttle.failures("192.0.2.7"), 0)
        self.assertEqual(conn.send(b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\n"), [AUTH_OK])

    def test_without_throttle_nothing_is_delayed(self) -> None:
        """A factory without a throttle answers 535 at once (the throttle is what delays)."""
        h = ThrottleHarness(throttled=False)
        conn = h.connect()
        self.assertEqual(
            conn.send(b"AUTH PLAIN " + plain("poststack", "sk_test_x") + b"\r\n"), [AUTH_FAILED]
        )

    def test_service_builds_the_throttle(self) -> None:
        """makeRelayService gives its factory one throttle with the configured settings."""
        cert, key = write_certificate(self.mktemp())
        config = RelayConfig(metrics_listen="off", 
            tls_cert=cert,
            tls_key=key,
            port=0,
            auth_failure_window=120.0,
            auth_failures_per_ip=7,
            auth_failures_per_user=5,
            auth_failure_delay=0.25,
            auth_failure_max_delay=4.0,
        )
        service = makeRelayService(config, MemoryReactorClock(), api=MemoryEmailAPI())
        throttle = service.factory.throttle
        assert throttle is not None
        self.assertEqual(
            (throttle.window, throttle.per_ip, throttle.per_user, throttle.delay, throttle.max_delay),
            (120.0, 7, 5, 0.25, 4.0),
        )


class CacheFromSMTPTests(SynchronousTestCase):
    """The positive and negative credential caches, seen through SMTP."""

    def test_revoked_key_stops_within_ttl(self) -> None:
        """A revoked key still logs in from the cache until auth_cache_ttl has passed, then gets 535."""
        h = ThrottleHarness(auth_cache_ttl=60.0)
        self.assertEqual(h.attempt(plain("poststack", KEY)), AUTH_OK)
        h.api.api_keys.discard(KEY)
        h.clock.advance(59.9)
        self.assertEqual(h.attempt(plain("poststack", KEY)), AUTH_OK)
        self.assertEqual(h.api.checks, 1)
        h.clock.advance(0.1)
        self.assertEqual(h.attempt(plain("poststack", KEY)), AUTH_FAILED)
        self.assertEqual(h.api.checks, 2)

    def test_changed_mailbox_password_stops_within_ttl(self) -> None:
        """A mailbox whose password changed stops working with the old one once the cache entry expires."""
        h = ThrottleHarness(auth_cache_ttl=60.0)
        self.assertEqual(h.attempt(plain(MAILBOX, MAILBOX_PASSWORD)), AUTH_OK)
        h.api.mailboxes[MAILBOX] = "new-password"
        h.clock.advance(60.0)
        self.assertEqual(h.attempt(plain(MAILBOX, MAILBOX_PASSWORD)), AUTH_FAILED)


class AuthEdgeCaseTests(SynchronousTestCase):
    """AUTH PLAIN and LOGIN edge cases not covered by test_smtp/test_smtp_review."""

    def setUp(self) -> None:
        self.h = ThrottleHarness(throttled=False)
        self.h.api.mailboxes["j\u00f6rg@b\u00fccher.de"] = "p\u00e4ssw\u00f6rd \u2713"
        self.conn = self.h.connect()

    def send(self, data: bytes) -> list[bytes]:
        return self.conn.send(data)

    def test_bad_base64_at_each_step(self) -> None:
        """Invalid base64 at the PLAIN prompt and at both LOGIN prompts gets 501 5.5.2; the session goes on."""
        bad = [b"501 5.5.2 Cannot decode response: not valid base64"]
        self.assertEqual(self.send(b"AUTH PLAIN\r\n"), [b"334 "])
        self.assertEqual(self.send(b"%%%\r\n"), bad)
        self.assertEqual(self.send(b"AUTH LOGIN\r\n"), [b"334 VXNlcm5hbWU6"])
        self.assertEqual(self.send(b"cG9zdHN0YWNr!\r\n"), bad)
        self.assertEqual(self.send(b"AUTH LOGIN " + b64("poststack") + b"\r\n"), [b"334 UGFzc3dvcmQ6"])
        self.assertEqual(self.send(b"c2s\r\n"), bad)  # missing padding
        self.assertEqual(self.send(b"AUTH LOGIN cG9z dHN0\r\n"), [b"501 5.5.4 Syntax: AUTH mechanism [initial-response]"])
        self.assertEqual(self.send(b"AUTH LOGIN cG9zdHN0YWNr\x00\r\n"), bad)
        self.assertEqual(self.h.api.checks, 0)
        self.assertEqual(self.send(b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\n"), [AUTH_OK])

    def test_authzid_equal_to_username(self) -> None:
        """A PLAIN authzid equal to the username is accepted."""
        self.assertEqual(
            self.send(b"AUTH PLAIN " + plain("poststack", KEY, authzid="poststack") + b"\r\n"), [AUTH_OK]
        )

    def test_authzid_different(self) -> None:
        """A PLAIN authzid different from the username is 535 5.7.8, without an API call, even with a good key."""
        out = self.send(b"AUTH PLAIN " + plain("poststack", KEY, authzid="admin") + b"\r\n")
        self.assertEqual(
            out,
            [b"535 5.7.8 Authentication failed: authorization identity must be empty or equal the username"],
        )
        self.assertEqual(self.h.api.checks, 0)

    def test_empty_password(self) -> None:
        """An empty password (PLAIN, or LOGIN with an empty line or '=') is 535 without an API call."""
        self.assertEqual(self.send(b"AUTH PLAIN " + plain("poststack", "") + b"\r\n"), [AUTH_FAILED])
        self.send(b"AUTH LOGIN " + b64("poststack") + b"\r\n")
        self.assertEqual(self.send(b"\r\n"), [AUTH_FAILED])
        conn = self.h.connect()
        conn.send(b"AUTH LOGIN " + b64(MAILBOX) + b"\r\n")
        self.assertEqual(conn.send(b"=\r\n"), [AUTH_FAILED])
        self.assertEqual(self.h.api.checks, 0)

    def test_empty_username(self) -> None:
        """An empty username is 535 without an API call."""
        self.assertEqual(self.send(b"AUTH PLAIN " + plain("", KEY) + b"\r\n"), [AUTH_FAILED])
        self.assertEqual(self.h.api.checks, 0)

    def test_utf8_credentials(self) -> None:
        """A UTF-8 mailbox address and password log in, over PLAIN and over LOGIN."""
        self.assertEqual(
            self.send(b"AUTH PLAIN " + plain("J\u00f6rg@B\u00fccher.de", "p\u00e4ssw\u00f6rd \u2713") + b"\r\n"),
            [AUTH_OK],
        )
        conn = self.h.connect()
        conn.send(b"AUTH LOGIN\r\n")
        conn.send(b64("j\u00f6rg@b\u00fccher.de") + b"\r\n")
        self.assertEqual(conn.send(b64("p\u00e4ssw\u00f6rd \u2713") + b"\r\n"), [AUTH_OK])
        self.assertEqual(
            conn.send("MAIL FROM:<j\u00f6rg@b\u00fccher.de> SMTPUTF8\r\n".encode()), [b"250 2.1.0 Ok"]
        )

    def test_utf8_password_compared_exactly(self) -> None:
        """A password differing only in Unicode normalisation or case is wrong (no folding of secrets)."""
        nfd = "pa\u0308ssw\u00f6rd \u2713"  # a + combining diaeresis
        self.assertEqual(
            self.send(b"AUTH PLAIN " + plain("j\u00f6rg@b\u00fccher.de", nfd) + b"\r\n"), [AUTH_FAILED]
        )
        conn = self.h.connect()
        self.assertEqual(
            conn.send(b"AUTH PLAIN " + plain("j\u00f6rg@b\u00fccher.de", "P\u00c4SSW\u00d6RD \u2713") + b"\r\n"),
            [AUTH_FAILED],
        )

    def test_overlong_login_password_line(self) -> None:
        """An over-long LOGIN password line is 500 5.5.6, leaves AUTH, and the username is forgotten."""
        self.send(b"AUTH LOGIN " + b64("poststack") + b"\r\n")
        self.assertEqual(
            self.send(b"A" * (MAX_AUTH_LINE + 4) + b"\r\n"), [b"500 5.5.6 Authentication Exchange line is too long"]
        )
        self.assertEqual(self.send(b"NOOP\r\n"), [b"250 2.0.0 Ok"])
        # A new LOGIN starts from the username prompt.
        self.assertEqual(self.send(b"AUTH LOGIN\r\n"), [b"334 VXNlcm5hbWU6"])
        self.assertEqual(self.h.api.checks, 0)

    def test_auth_after_mail(self) -> None:
        """AUTH in a transaction is 503 5.5.1 and the transaction goes on."""
        self.send(b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\n")
        self.assertEqual(self.send(b"MAIL FROM:<you@yourdomain.com>\r\n"), [b"250 2.1.0 Ok"])
        self.assertEqual(
            self.send(b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\n"),
            [b"503 5.5.1 Error: already authenticated"],
        )
        self.assertEqual(self.send(b"RCPT TO:<user@example.com>\r\n"), [b"250 2.1.5 Ok"])

    def test_auth_twice_with_other_identity(self) -> None:
        """A second AUTH with other (valid) credentials is 503 and does not switch identity."""
        self.send(b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\n")
        self.assertEqual(
            self.send(b"AUTH PLAIN " + plain(MAILBOX, MAILBOX_PASSWORD) + b"\r\n"),
            [b"503 5.5.1 Error: already authenticated"],
        )
        delivery = self.conn.proto.state.delivery
        assert delivery is not None
        self.assertEqual(delivery.identity.kind, "api_key")

    def test_auth_before_ehlo(self) -> None:
        """AUTH before EHLO (and before HELO) is 503 5.5.1 and checks nothing."""
        h = ThrottleHarness(throttled=False)
        conn = Connection(h.factory, IPv4Address("TCP", "192.0.2.7", 1))
        self.assertEqual(
            conn.send(b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\n"),
            [b"503 5.5.1 Error: send EHLO first"],
        )
        self.assertEqual(h.api.checks, 0)
        self.assertEqual(
            conn.send(b"MAIL FROM:<you@yourdomain.com>\r\n")[0][:10], b"530 5.7.0 "
        )

    def test_cancel_with_spaces(self) -> None:
        """'*' with surrounding blanks still cancels."""
        self.send(b"AUTH PLAIN\r\n")
        self.assertEqual(self.send(b" * \r\n"), [b"501 5.7.0 Authentication aborted"])
