"""
A sender domain PostStack refuses, end to end: real smtplib clients over
real loopback TLS, the relay in this process, the sandbox API over real
HTTP with its data file's C{pendingdomain.com} (status C{pending}: every
send from it is answered C{422 Domain not verified}).

The first message from the domain is refused after DATA with a
C{550 5.7.1} that names the domain and says to verify it; within
C{--sender-domain-hold} the next C{MAIL FROM} on that domain with that key
is refused at once, before any DATA, and logged; a verified domain and
another key still send.
"""

from __future__ import annotations

import time

from twisted.logger import globalLogPublisher

from tests.common.keys import FULL_KEY, SCOPED_KEY
from tests.common.relay import RelayTestCase

PENDING = b"From: you@pendingdomain.com\r\nTo: user@example.com\r\nSubject: pending\r\n\r\nnot sent\r\n"
VERIFIED = b"From: you@yourdomain.com\r\nTo: user@example.com\r\nSubject: verified\r\n\r\nsent\r\n"
UNVERIFIED = (
    "5.7.1 Sender address rejected: the domain pendingdomain.com is not verified in PostStack; "
    "verify it (PostStack dashboard, Domains), or send from a verified domain"
)


class SenderDomainTests(RelayTestCase):
    relay_options = {"sender_domain_hold": 3.0}

    async def test_unverified_domain_refused_then_held_before_data(self) -> None:
        """
        DATA from pendingdomain.com: 550 5.7.1 naming the domain; the next
        MAIL FROM on it: 550 5.7.1 at once (no DATA); yourdomain.com still
        relays on the same connection; another key is not held; after the
        hold the API is asked again.
        """
        events: list[dict] = []  # type: ignore[type-arg]  # log events
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def first() -> tuple[int, bytes]:
            with self.smtp() as c:
                c.login("poststack", FULL_KEY)
                c.mail("you@pendingdomain.com")
                c.rcpt("user@example.com")
                return c.data(PENDING)

        code, text = await self.in_thread(first)
        self.assertEqual(code, 550)
        self.assertEqual(text.decode(), UNVERIFIED + " (PostStack API: Domain not verified, HTTP 422)")

        def again() -> tuple[tuple[int, bytes], tuple[int, bytes], float]:
            with self.smtp() as c:
                c.login("poststack", FULL_KEY)
                started = time.monotonic()
                held = c.mail("Someone.Else@PendingDomain.com")
                took = time.monotonic() - started
                c.mail("you@yourdomain.com")
                c.rcpt("user@example.com")
                return held, c.data(VERIFIED), took

        held, sent, took = await self.in_thread(again)
        self.assertEqual(held, (550, (UNVERIFIED + " (PostStack API said HTTP 422 recently)").encode()))
        self.assertEqual(sent[0], 250, sent)
        self.assertLess(took, 2.0)
        self.assertEqual([e.payload["subject"] for e in self.stored()], ["verified"])
        refused = [e for e in events if e.get("event") == "smtp_sender_refused"]
        self.assertEqual(
            [(e["reason"], e["mail_from"], e["reply_code"]) for e in refused],
            [("sender_domain", "Someone.Else@PendingDomain.com", 550)],
        )
        self.assertNotIn(FULL_KEY, repr(refused))

        def other_key() -> tuple[int, bytes]:
            with self.smtp() as c:
                c.login("poststack", SCOPED_KEY)
                return c.mail("you@pendingdomain.com")

        self.assertEqual((await self.in_thread(other_key))[0], 250)

        def after_hold() -> tuple[int, bytes]:
            time.sleep(3.1)
            with self.smtp() as c:
                c.login("poststack", FULL_KEY)
                return c.mail("you@pendingdomain.com")

        self.assertEqual((await self.in_thread(after_hold))[0], 250)
