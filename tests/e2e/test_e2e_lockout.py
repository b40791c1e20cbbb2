"""
Logins under abuse, from outside: a real relay and the sandbox API over
real loopback TLS, driven by smtplib from several loopback addresses
(127.0.0.x) so the relay sees several clients.

Issue 18: strangers cannot lock a mailbox user out, the AUTH rate per
address, RFC 4954's 12,288-octet AUTH lines.  Issue 17: the lock-out reply
says when to come back, one smtplib C{login()} with one wrong secret counts
once, and a suspended mailbox or a relay without a service key say so.
"""

from __future__ import annotations

import base64
import re
import smtplib
from typing import Any, Optional

from tests.common.keys import FULL_KEY, MAILBOX
from tests.common.relay import RelayTestCase

ALICE, ALICE_PASSWORD = MAILBOX
FAST = {"auth_failure_delay": 0.01, "auth_failure_max_delay": 0.05}


class Client:
    """One smtplib session over implicit TLS from a chosen loopback address."""

    def __init__(self, case: RelayTestCase, source: str) -> None:
        self.smtp = smtplib.SMTP_SSL(
            "localhost", case.port, context=case.context(), timeout=30, source_address=(source, 0)
        )
        self.smtp.ehlo()

    def login(self, user: str, password: str) -> tuple[int, bytes]:
        """smtplib's own login() (PLAIN, then LOGIN on failure): its last reply."""
        try:
            return self.smtp.login(user, password)
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code, e.smtp_error

    def command(self, line: str) -> tuple[int, bytes]:
        return self.smtp.docmd(line)

    def close(self) -> None:
        try:
            self.smtp.quit()
        except smtplib.SMTPException:
            self.smtp.close()


def login_once(case: RelayTestCase, source: str, user: str, password: str) -> tuple[int, bytes]:
    client = Client(case, source)
    try:
        return client.login(user, password)
    finally:
        client.close()


class LockoutTests(RelayTestCase):
    relay_options = dict(FAST)

    def failures(self, client: Optional[str] = None, user: Optional[str] = None) -> int:
        throttle = self.relay.factory.throttle
        assert throttle is not None
        return throttle.failures(client, user)

    async def test_strangers_cannot_lock_a_mailbox_out(self) -> None:
        """
        Ten wrong passwords for one mailbox from ten addresses (each an
        smtplib login(): PLAIN, then LOGIN), then the right password from
        an address that has not failed: 235.  Each login() counted once.
        """

        def attack() -> list[tuple[int, bytes]]:
            return [login_once(self, f"127.0.0.{10 + n}", ALICE, f"guess-{n}") for n in range(10)]

        replies = await self.in_thread(attack)
        self.assertEqual({code for code, _ in replies}, {535}, replies)
        self.assertEqual(self.failures(user=ALICE.lower()), 10)
        code, text = await self.in_thread(login_once, self, "127.0.0.30", ALICE, ALICE_PASSWORD)
        self.assertEqual((code, text), (235, b"2.7.0 Authentication successful"))

    async def test_lockout_says_when_and_counts_each_login_once(self) -> None:
        """
        Wrong passwords from one address: the 5th login() (after 8 AUTH
        commands) is still checked, since each login() counts once; after
        it, even the right password hears 454 with the seconds left.
        """

        def guesses() -> list[tuple[int, bytes]]:
            return [login_once(self, "127.0.0.40", ALICE, f"wrong-{n}") for n in range(5)]

        replies = await self.in_thread(guesses)
        # The 5th login()'s PLAIN was checked and reached the limit (5):
        # its LOGIN (the same secret) already hears when to come back.
        self.assertEqual([code for code, _ in replies], [535] * 4 + [454], replies)
        self.assertEqual(self.failures("127.0.0.40", ALICE.lower()), 5)
        code, text = await self.in_thread(login_once, self, "127.0.0.40", ALICE, ALICE_PASSWORD)
        for code, text in (replies[4], (code, text)):
            self.assertEqual(code, 454, text)
            match = re.fullmatch(rb"4\.7\.0 Too many failed logins, try again in (\d+) s", text)
            assert match is not None, text
            self.assertTrue(290 <= int(match.group(1)) <= 300, text)
        # The same mailbox from another address, and another login from this one, are not locked.
        self.assertEqual((await self.in_thread(login_once, self, "127.0.0.41", ALICE, ALICE_PASSWORD))[0], 235)
        self.assertEqual((await self.in_thread(login_once, self, "127.0.0.40", "poststack", FULL_KEY))[0], 235)

    async def test_a_second_guess_on_one_connection_counts(self) -> None:
        """On one connection the same wrong secret again is not a new guess; another secret is."""

        def run() -> list[tuple[int, bytes]]:
            client = Client(self, "127.0.0.50")
            try:
                return [client.login(ALICE, "first"), client.login(ALICE, "second")]
            finally:
                client.close()

        replies = await self.in_thread(run)
        self.assertEqual([code for code, _ in replies], [535, 535], replies)
        self.assertEqual(self.failures("127.0.0.50", ALICE.lower()), 2)

    async def test_suspended_mailbox_says_so(self) -> None:
        """The right password of a suspended mailbox: 535 5.7.1 saying so, not counted as a guess."""
        reply = await self.in_thread(login_once, self, "127.0.0.60", "bob@yourdomain.com", "bob-password")
        self.assertEqual(
            reply,
            (535, b"5.7.1 Mailbox is suspended in PostStack: ask your PostStack administrator to reactivate it"),
        )
        self.assertEqual(self.failures("127.0.0.60", "bob@yourdomain.com"), 0)
        # A wrong password for it is an ordinary failed guess.
        reply = await self.in_thread(login_once, self, "127.0.0.60", "bob@yourdomain.com", "nope")
        self.assertEqual(reply[0], 535)
        self.assertTrue(reply[1].startswith(b"5.7.8 Authentication credentials invalid"), reply)
        self.assertEqual(self.failures("127.0.0.60", "bob@yourdomain.com"), 1)

    async def test_long_auth_lines(self) -> None:
        """
        RFC 4954: an AUTH PLAIN initial response making a 12,288-octet
        command line is checked (535 for a wrong password); one octet more
        is 500 5.5.6, and the session goes on.
        """
        # A wrong mailbox password long enough for a 12,288-octet line (the
        # base64 is 12,276 octets; one trailing blank, which the relay
        # ignores, makes the length exact).
        raw = f"\0{ALICE}\0".encode()
        raw += b"p" * (9207 - len(raw))
        line = b"AUTH PLAIN " + base64.b64encode(raw) + b" "
        self.assertEqual(len(line), 12288)
        longer = line + b" "

        def run() -> list[tuple[int, bytes]]:
            client = Client(self, "127.0.0.70")
            try:
                out = [client.command(line.decode())]
                out.append(client.command(longer.decode()))
                out.append(client.command("NOOP"))
                return out
            finally:
                client.close()

        replies = await self.in_thread(run)
        self.assertEqual(replies[0][0], 535, replies[0])
        self.assertEqual(replies[1:], [(500, b"5.5.6 Authentication Exchange line is too long"), (250, b"2.0.0 Ok")])


class NoServiceKeyTests(RelayTestCase):
    relay_options: dict[str, Any] = dict(FAST, service_key=None)

    async def test_mailbox_logins_not_enabled(self) -> None:
        """A mailbox login on a relay without --service-key: 454 about the relay, not a failed guess."""
        reply = await self.in_thread(login_once, self, "127.0.0.80", ALICE, ALICE_PASSWORD)
        self.assertEqual(
            reply,
            (454, b"4.7.0 Mailbox logins are not enabled on this relay: use username poststack with an API key"),
        )
        throttle = self.relay.factory.throttle
        assert throttle is not None
        self.assertEqual(throttle.failures("127.0.0.80", ALICE.lower()), 0)
        self.assertEqual((await self.in_thread(login_once, self, "127.0.0.80", "poststack", FULL_KEY))[0], 235)


class AuthRateTests(RelayTestCase):
    relay_options: dict[str, Any] = dict(FAST, max_auth_rate_per_ip=3)

    async def test_rate_per_address(self) -> None:
        """
        The 4th AUTH in a minute from one address: 421 4.7.0 with a
        retry-after hint, and the connection is closed; another address is
        not affected.
        """

        def run() -> list[Any]:
            out: list[Any] = [login_once(self, "127.0.0.90", "poststack", FULL_KEY)[0] for _ in range(3)]
            client = Client(self, "127.0.0.90")
            out.append(client.command("AUTH PLAIN " + base64.b64encode(f"\0poststack\0{FULL_KEY}".encode()).decode()))
            try:
                out.append(client.command("NOOP"))
            except smtplib.SMTPServerDisconnected:
                out.append("closed")
            out.append(login_once(self, "127.0.0.91", "poststack", FULL_KEY)[0])
            return out

        out = await self.in_thread(run)
        self.assertEqual(out[:3], [235, 235, 235])
        code, text = out[3]
        self.assertEqual(code, 421, text)
        match = re.fullmatch(rb"4\.7\.0 Too many AUTH attempts from your address, retry-after=(\d+)s", text)
        assert match is not None, text
        # The sliding window: up to a minute for the current bucket to end,
        # plus the part of the next one it takes to slide out.
        self.assertTrue(1 <= int(match.group(1)) <= 120, text)
        self.assertEqual(out[4:], ["closed", 235])
