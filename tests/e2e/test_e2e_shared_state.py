"""
Two relays in this process share one real C{redis-server} (C{--redis-url})
and one sandbox API over real HTTP; clients are smtplib over real loopback
TLS.  What one relay learns, the other acts on: a mailbox's failed logins
(C{454 4.7.0} on the other relay, even with the right password), and an
API rate limit (C{451 4.7.0 ... retry-after} at the other relay's C{MAIL
FROM}, before any DATA).  With Redis stopped, mail still flows, C{/readyz}
stays ready and the fallbacks are counted.
"""

from __future__ import annotations

import re
import smtplib
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater

from poststack_relay import RelayConfig, makeRelayService
from tests.common.keys import FULL_KEY, MAILBOX, SCOPED_KEY, SERVICE_KEY
from tests.common.redis import start_redis
from tests.common.relay import RelayTestCase, http_get

MESSAGE = b"From: you@yourdomain.com\r\nTo: user@example.com\r\nSubject: shared\r\n\r\nhello\r\n"


class SharedStateRelayTests(RelayTestCase):
    def setUp(self) -> Any:
        self.redis = start_redis(self, self.mktemp())
        self.relay_options = {
            "redis_url": self.redis.url,
            "redis_timeout": 0.2,
            # smtplib's login() tries PLAIN, then LOGIN: one failure each
            # (the same secret again on one connection is not a new guess).
            "auth_failures_per_user": 3,
            "auth_failures_per_ip": 100,
            "auth_failure_delay": 0.0,
            "api_deadline": 3.0,
        }
        return super().setUp()

    async def second_relay(self) -> Any:
        config = RelayConfig(
            tls_cert=self.cafile, tls_key=self.keyfile, port=0, interface="127.0.0.1",
            api_url=self.api_url, service_key=SERVICE_KEY, hostname="localhost",
            metrics_listen="127.0.0.1:0", **self.relay_options,
        )
        relay = makeRelayService(config, reactor)
        relay.startService()
        self.addCleanup(relay.stopService)
        port = await relay.port()
        return relay, port.getHost().port

    def client(self, port: int, source: str = "127.0.0.1") -> smtplib.SMTP_SSL:
        return smtplib.SMTP_SSL(
            "localhost", port, context=self.context(), timeout=30, source_address=(source, 0)
        )

    async def both_up(self, *relays: Any) -> None:
        deadline = time.monotonic() + 10
        while not all(getattr(r.fleet_state, "up", False) for r in relays):
            self.assertLess(time.monotonic(), deadline, "Redis not up within 10 s")
            await deferLater(reactor, 0.05, lambda: None)
        await deferLater(reactor, 0.2, lambda: None)  # subscribed too

    async def test_mailbox_lockout_is_shared(self) -> None:
        """
        Three wrong logins (three failures: PLAIN, then LOGIN with the same
        secret, each) from one address on relay A: relay B refuses that
        mailbox from that address with 454 before checking, even with the
        right password; from another address B lets it in.
        """
        b, b_port = await self.second_relay()
        await self.both_up(self.relay, b)
        user, password = MAILBOX

        def guesses() -> list[int]:
            codes = []
            for n in range(3):
                with self.client(self.port) as c:
                    try:
                        c.login(user, f"wrong-{n}")
                    except smtplib.SMTPAuthenticationError as e:
                        codes.append(e.smtp_code)
            return codes

        # The third login()'s PLAIN reached the limit: its LOGIN hears 454.
        self.assertEqual(await self.in_thread(guesses), [535, 535, 454])
        await deferLater(reactor, 0.3, lambda: None)

        def right_on_b(source: str) -> int:
            with self.client(b_port, source) as c:
                try:
                    c.login(user, password)
                except smtplib.SMTPAuthenticationError as e:
                    return e.smtp_code
                return 235

        self.assertEqual(await self.in_thread(right_on_b, "127.0.0.1"), 454)
        self.assertEqual(await self.in_thread(right_on_b, "127.0.0.2"), 235)

    async def test_rate_limit_is_shared(self) -> None:
        """
        A 429 with Retry-After: 30 (past the deadline, so final) learned by
        relay A: relay B answers that key's MAIL FROM with 451 4.7.0 and the
        seconds left; another key still sends on B.
        """
        b, b_port = await self.second_relay()
        await self.both_up(self.relay, b)
        self.sandbox.resource.inject_fault("429", retry_after="30")

        def on_a() -> tuple[int, bytes]:
            with self.client(self.port) as c:
                c.login("poststack", FULL_KEY)
                c.mail("you@yourdomain.com")
                c.rcpt("user@example.com")
                return c.data(MESSAGE)

        code, text = await self.in_thread(on_a)
        self.assertEqual((code, text), (451, b"4.7.0 PostStack rate limit reached, retry-after=30s"))
        await deferLater(reactor, 0.3, lambda: None)

        def on_b() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
            with self.client(b_port) as c:
                c.login("poststack", FULL_KEY)
                held = c.mail("you@yourdomain.com")
            with self.client(b_port) as c:
                c.login("poststack", SCOPED_KEY)
                c.mail("you@yourdomain.com")
                c.rcpt("user@example.com")
                other = c.data(MESSAGE)
            return held, other

        held, other = await self.in_thread(on_b)
        self.assertEqual(held[0], 451)
        self.assertRegex(held[1].decode(), r"^4\.7\.0 PostStack rate limit reached, retry-after=(29|30)s$")
        self.assertEqual(other[0], 250, other)
        self.assertEqual(len(self.stored()), 1)

    async def test_sender_domain_hold_is_shared(self) -> None:
        """
        Relay A's message from the unverified pendingdomain.com gets 550
        5.7.1 after DATA; relay B then refuses that key's MAIL FROM on the
        domain at once, before any DATA, with the same 550 5.7.1.
        """
        b, b_port = await self.second_relay()
        await self.both_up(self.relay, b)
        pending = MESSAGE.replace(b"you@yourdomain.com", b"you@pendingdomain.com")

        def on_a() -> tuple[int, bytes]:
            with self.client(self.port) as c:
                c.login("poststack", FULL_KEY)
                c.mail("you@pendingdomain.com")
                c.rcpt("user@example.com")
                return c.data(pending)

        code, text = await self.in_thread(on_a)
        self.assertEqual(code, 550)
        self.assertIn(b"the domain pendingdomain.com is not verified in PostStack", text)
        await deferLater(reactor, 0.3, lambda: None)

        def on_b() -> tuple[int, bytes]:
            with self.client(b_port) as c:
                c.login("poststack", FULL_KEY)
                return c.mail("you@pendingdomain.com")

        held = await self.in_thread(on_b)
        self.assertEqual(held[0], 550)
        self.assertTrue(held[1].startswith(b"5.7.1 Sender address rejected: the domain pendingdomain.com "), held)
        self.assertTrue(held[1].endswith(b"(PostStack API said HTTP 422 recently)"), held)
        self.assertEqual(self.stored(), [])

    async def test_redis_gone_mail_flows(self) -> None:
        """
        Redis stopped: mail and failed logins are answered as usual, the
        fallbacks are counted, /readyz stays 200.
        """
        await self.both_up(self.relay)
        self.redis.stop()
        assert self.relay.metrics_service is not None
        metrics_port = (await self.relay.metrics_service.port()).getHost().port
        base = f"http://127.0.0.1:{metrics_port}"

        def session() -> tuple[int, float]:
            started = time.monotonic()
            with self.client(self.port) as c:
                try:
                    c.login("poststack", "sk_test_wrong_key")
                except smtplib.SMTPAuthenticationError as e:
                    failed = e.smtp_code
            with self.client(self.port) as c:
                c.login("poststack", FULL_KEY)
                refused = c.sendmail("you@yourdomain.com", ["user@example.com"], MESSAGE)
            self.assertEqual(refused, {})
            return failed, time.monotonic() - started

        failed, took = await self.in_thread(session)
        self.assertEqual(failed, 535)
        self.assertLess(took, 5.0)
        self.assertEqual(len(self.stored()), 1)
        # The failed login's write did not reach Redis: counted, and Redis
        # marked unavailable (at once, or at the next check, 5 s at most).
        deadline = time.monotonic() + 8
        while True:
            _, text = await self.in_thread(http_get, base + "/metrics")
            # Six additions: smtplib's failed login() counted once (its
            # LOGIN repeats the PLAIN's secret; an API-key login has no
            # mailbox count), the AUTH rate counting each of the three AUTH
            # exchanges, and the connection rate each of the two connections.
            if "poststack_relay_fleet_state_up 0.0" in text and re.search(
                r'poststack_relay_fleet_state_fallbacks_total\{operation="add"\} 6\.0', text
            ):
                break
            self.assertLess(time.monotonic(), deadline, text[-800:])
            await deferLater(reactor, 0.2, lambda: None)
        status, _ = await self.in_thread(http_get, base + "/readyz")
        self.assertEqual(status, 200)
