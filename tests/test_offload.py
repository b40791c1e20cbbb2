"""
L{TranslationPool}: large messages are translated in the relay's own
bounded thread pool, small ones at once; errors from the threads give the
same replies; stopping waits for the work in the threads.  And the early
refusal of a message the MIME scan found over a limit (no full parse).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from poststack_relay import replies
from poststack_relay.auth import Identity
from poststack_relay.delivery import RelayDelivery
from poststack_relay.offload import SWITCH_INTERVAL, TranslationPool
from poststack_relay.replies import Reply
from poststack_relay.testing import MemoryEmailAPI
from poststack_relay.translate import (
    MAX_MIME_PARTS,
    Envelope,
    MimeScan,
    TranslationError,
    translate,
)
from poststack_relay.translate import message as message_module

ALICE = Identity("api_key", "sk_test_a", None, "sk_test_a…", b"", "key:aaa")
MAILBOX = Identity("mailbox", "sk_test_service", "me@yourdomain.com", "me@yourdomain.com", b"", "mb:me")
ENV = Envelope("me@yourdomain.com", ("user@example.com",))
LARGE = 4096


def flat(parts: int, sender: bytes = b"") -> bytes:
    """A multipart/mixed message of C{parts} text parts."""
    head = b"From: me@yourdomain.com\r\nTo: user@example.com\r\n" + sender
    head += b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    return head + b"".join(b"--b\r\n\r\npart %d\r\n" % n for n in range(parts)) + b"--b--\r\n"


def scanned(raw: bytes) -> MimeScan:
    scan = MimeScan()
    scan.feed(raw)
    scan.close()
    return scan


class InlineTests(SynchronousTestCase):
    def test_not_running_runs_at_once(self) -> None:
        """A pool not started runs work at once: its result, or its exception as a failure."""
        pool = TranslationPool(reactor, 2, LARGE)
        self.assertFalse(pool.offloads(10**9))
        self.assertEqual(self.successResultOf(pool.run(lambda x: x * 2, 21)), 42)
        self.failureResultOf(pool.run(lambda: 1 // 0), ZeroDivisionError)


class EarlyRefusalTests(SynchronousTestCase):
    def setUp(self) -> None:
        def full_parse(message: Any) -> None:
            raise AssertionError("the message was parsed in full")

        self.patch(message_module, "check_limits", full_parse)

    def test_refused_without_a_full_parse(self) -> None:
        """A 100,000-part message the scan refused: the parts reply, without parsing the message."""
        raw = flat(100_000)
        with self.assertRaises(TranslationError) as caught:
            translate(raw, ENV, scan=scanned(raw))
        self.assertEqual(caught.exception.reply, replies.too_many_mime_parts(MAX_MIME_PARTS))

    def test_sender_rule_first(self) -> None:
        """The Sender rule still comes before the MIME limits, as in the full translation."""
        raw = flat(MAX_MIME_PARTS + 5, b"Sender: someone@else.example\r\n")
        with self.assertRaises(TranslationError) as early:
            translate(raw, ENV, mailbox="me@yourdomain.com", scan=scanned(raw))
        self.assertEqual(early.exception.reply.code, 550)
        self.assertNotEqual(early.exception.reply, replies.too_many_mime_parts(MAX_MIME_PARTS))

    def test_no_refusal_full_parse(self) -> None:
        """A scan that refused nothing changes nothing: the message is parsed in full."""
        raw = flat(3)
        self.assertRaises(AssertionError, translate, raw, ENV, scan=scanned(raw))


class ThreadTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.pool = TranslationPool(reactor, 2, LARGE)
        self.pool.startService()
        self.addCleanup(self.stop)

    def stop(self) -> "Deferred[None] | None":
        return self.pool.stopService() if self.pool.running else None

    async def test_large_in_a_thread(self) -> None:
        """Work for a large message runs in another thread; a small one is not offloaded."""
        self.assertFalse(self.pool.offloads(LARGE - 1))
        self.assertTrue(self.pool.offloads(LARGE))
        ident = await self.pool.run(threading.get_ident)
        self.assertNotEqual(ident, threading.get_ident())

    async def test_errors_come_back(self) -> None:
        """An exception in the thread fails the Deferred with it."""
        with self.assertRaises(ZeroDivisionError):
            await self.pool.run(lambda: 1 // 0)

    async def test_stop_waits_for_work(self) -> None:
        """Stopping waits until the work in the threads is done (and cancels its result), then stops the threads; the switch interval is short only meanwhile."""
        go = threading.Event()
        self.addCleanup(go.set)
        before = sys.getswitchinterval()
        work = self.pool.run(go.wait, 20)
        self.assertAlmostEqual(sys.getswitchinterval(), min(before, SWITCH_INTERVAL), places=6)
        stopped = self.pool.stopService()
        self.assertNoResult(stopped)
        self.assertEqual(self.pool.busy, 1)
        go.set()
        with self.assertRaises(CancelledError):
            await work  # it ended after stopping began: its result is not used
        await stopped
        self.assertEqual(sys.getswitchinterval(), before)
        self.assertEqual(self.pool.busy, 0)
        self.assertFalse(self.pool.offloads(10**9))

    async def test_delivery_replies_the_same(self) -> None:
        """Delivered through the threads: 250 with the email id, the same refusals, 451 on a crash."""
        api = MemoryEmailAPI()
        delivery = RelayDelivery(ALICE, api, translator=self.pool)
        big = flat(400)
        self.assertGreaterEqual(len(big), LARGE)
        reply: Reply = await delivery.deliver(ENV, big)
        self.assertEqual(reply.code, 250)
        self.assertEqual(len(api.sent), 1)
        hostile = flat(MAX_MIME_PARTS + 1)
        for scan in (None, scanned(hostile)):
            reply = await delivery.deliver(ENV, hostile, scan=scan)
            self.assertEqual(reply, replies.too_many_mime_parts(MAX_MIME_PARTS))
        self.assertEqual(len(api.sent), 1)

        def crash(*args: Any) -> Any:
            raise RuntimeError("boom")

        self.patch(delivery, "_prepare", crash)
        reply = await delivery.deliver(ENV, big)
        self.assertEqual(reply, replies.LOCAL_ERROR)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(api.sent), 1)



class StopDuringTranslationTests(TestCase):
    timeout = 30

    async def test_not_sent_after_stop(self) -> None:
        """A translation that ends after the pool began stopping (the drain gave up): 451, nothing sent."""
        pool = TranslationPool(reactor, 1, LARGE)
        pool.startService()
        api = MemoryEmailAPI()
        delivery = RelayDelivery(ALICE, api, translator=pool)
        go = threading.Event()
        self.addCleanup(go.set)
        blocker = pool.run(go.wait, 20)  # the one thread is busy: the translation waits its turn
        replied = delivery.deliver(ENV, flat(400))
        stopped = pool.stopService()
        go.set()
        with self.assertRaises(CancelledError):
            await blocker
        self.assertEqual(await replied, replies.LOCAL_ERROR)
        await stopped
        self.assertEqual(api.sent, [])

    async def test_not_sent_after_the_drain_deadline(self) -> None:
        """
        A translation that ends after the drain deadline (its session was
        told 421 4.3.2 then) but before the pool stops: 451, nothing sent.
        """
        pool = TranslationPool(reactor, 1, LARGE)
        pool.startService()
        self.addCleanup(pool.stopService)
        api = MemoryEmailAPI()
        delivery = RelayDelivery(ALICE, api, translator=pool)
        go = threading.Event()
        self.addCleanup(go.set)
        blocker = pool.run(go.wait, 20)
        replied = delivery.deliver(ENV, flat(400))
        self.assertFalse(pool.abandoned)
        pool.abandon()
        self.assertTrue(pool.abandoned)
        go.set()
        with self.assertRaises(CancelledError):
            await blocker
        self.assertEqual(await replied, replies.LOCAL_ERROR)
        self.assertEqual(api.sent, [])
