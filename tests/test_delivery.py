"""
Tests for message delivery (L{poststack_relay.delivery}): one API call per
transaction, and derived idempotency keys.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.auth import Identity
from poststack_relay.delivery import RelayDelivery, derived_idempotency_key
from poststack_relay.testing import MemoryEmailAPI
from poststack_relay.translate import Envelope

ALICE = Identity("api_key", "sk_test_a", None, "sk_test_a…", b"", "key:aaa")
BOB = Identity("api_key", "sk_test_b", None, "sk_test_b…", b"", "key:bbb")
ENV = Envelope("you@yourdomain.com", ("user@example.com",))


def message(message_id: bytes | None = b"<m1@yourdomain.com>", body: bytes = b"hello", extra: bytes = b"") -> bytes:
    head = b"From: you@yourdomain.com\r\nTo: user@example.com\r\nSubject: s\r\n" + extra
    if message_id is not None:
        head += b"Message-ID: " + message_id + b"\r\n"
    return head + b"\r\n" + body + b"\r\n"


class DerivedKeyTests(SynchronousTestCase):
    def send(self, raw: bytes, identity: Identity = ALICE, env: Envelope = ENV, derive: bool = True) -> str | None:
        api = MemoryEmailAPI()
        reply = self.successResultOf(RelayDelivery(identity, api, derive).deliver(env, raw))
        self.assertEqual(reply.code, 250)
        [(_, request)] = api.sent
        self.assertEqual(request.payload.get("idempotency_key"), request.idempotency_key)
        return request.idempotency_key

    def test_same_message_same_key(self) -> None:
        """The same bytes, envelope and credential give the same key (a client retry)."""
        first = self.send(message())
        self.assertIsNotNone(first)
        self.assertTrue(first.startswith("psr-"))  # type: ignore[union-attr]
        self.assertEqual(self.send(message()), first)

    def test_recipient_order_irrelevant(self) -> None:
        """A retry that lists the same recipients in another order or case is the same message."""
        a = Envelope("you@yourdomain.com", ("a@example.com", "b@example.com"))
        b = Envelope("you@yourdomain.com", ("B@example.com", "a@example.com"))
        self.assertEqual(self.send(message(), env=a), self.send(message(), env=b))

    def test_never_merges_different_messages(self) -> None:
        """Any difference (one body byte, Message-ID, credential, sender, recipients) gives another key."""
        base = self.send(message())
        variants = [
            self.send(message(body=b"hellp")),
            self.send(message(message_id=b"<m2@yourdomain.com>")),
            self.send(message(), identity=BOB),
            self.send(message(), env=Envelope("other@yourdomain.com", ("user@example.com",))),
            self.send(message(), env=Envelope("you@yourdomain.com", ("user@example.com", "x@example.com"))),
        ]
        self.assertEqual(len({base, *variants}), 6)

    def test_no_message_id_no_derivation(self) -> None:
        """Without a Message-ID two identical sends may be two intended messages: no derived key."""
        self.assertIsNone(self.send(message(message_id=None)))

    def test_client_key_wins(self) -> None:
        """The client's X-PostStack-Idempotency-Key is used as it is."""
        key = self.send(message(extra=b"X-PostStack-Idempotency-Key: order-7\r\n"))
        self.assertEqual(key, "order-7")

    def test_switch_off(self) -> None:
        """With derivation off, a Message-ID alone gives no key."""
        self.assertIsNone(self.send(message(), derive=False))

    def test_key_is_stable(self) -> None:
        """The derivation is fixed (relay restarts and other instances compute the same key)."""
        self.assertEqual(
            derived_idempotency_key(ALICE, ENV, message()),
            "psr-" + __import__("hashlib").sha256(
                b"poststack-relay idempotency v1\0key:aaa\0you@yourdomain.com\0user@example.com\0"
                + b"%d\0" % len(message()) + message()
            ).hexdigest()[:40],
        )

    def test_one_call_for_many_recipients(self) -> None:
        """A transaction with three recipients makes exactly one API call."""
        api = MemoryEmailAPI()
        env = Envelope("you@yourdomain.com", ("user@example.com", "b@example.com", "c@example.com"))
        self.successResultOf(RelayDelivery(ALICE, api).deliver(env, message()))
        self.assertEqual(len(api.sent), 1)
        self.assertEqual(api.sent[0][1].payload["bcc"], ["b@example.com", "c@example.com"])
