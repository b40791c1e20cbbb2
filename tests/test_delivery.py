"""
Tests for message delivery (L{poststack_relay.delivery}): one API call per
transaction, and the idempotency key every request leaves with
(L{poststack_relay.idempotency}).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.auth import Identity
from poststack_relay.delivery import RelayDelivery
from poststack_relay.idempotency import (
    IDEMPOTENCY_CLIENT,
    IDEMPOTENCY_DERIVED,
    IDEMPOTENCY_RANDOM,
    derived_idempotency_key,
    keyed,
)
from poststack_relay.testing import MemoryEmailAPI
from poststack_relay.translate import EmailRequest, Envelope, translate

ALICE = Identity("api_key", "sk_test_a", None, "sk_test_a…", b"", "key:aaa")
BOB = Identity("api_key", "sk_test_b", None, "sk_test_b…", b"", "key:bbb")
ENV = Envelope("you@yourdomain.com", ("user@example.com",))


def message(message_id: bytes | None = b"<m1@yourdomain.com>", body: bytes = b"hello", extra: bytes = b"") -> bytes:
    head = b"From: you@yourdomain.com\r\nTo: user@example.com\r\nSubject: s\r\n" + extra
    if message_id is not None:
        head += b"Message-ID: " + message_id + b"\r\n"
    return head + b"\r\n" + body + b"\r\n"


RANDOM_KEY = r"^psr-[0-9a-f]{32}$"


class DerivedKeyTests(SynchronousTestCase):
    def sent(self, raw: bytes, identity: Identity = ALICE, env: Envelope = ENV, derive: bool = True) -> EmailRequest:
        """The one request delivery sent for C{raw}: its key always set, in the field and the payload."""
        api = MemoryEmailAPI()
        reply = self.successResultOf(RelayDelivery(identity, api, derive).deliver(env, raw))
        self.assertEqual(reply.code, 250)
        [(_, request)] = api.sent
        self.assertIsInstance(request.idempotency_key, str)
        self.assertEqual(request.payload.get("idempotency_key"), request.idempotency_key)
        return request

    def send(self, raw: bytes, identity: Identity = ALICE, env: Envelope = ENV, derive: bool = True) -> str | None:
        """The key of a derived or client request; C{None} for a random one (made for one transaction)."""
        request = self.sent(raw, identity, env, derive)
        if request.idempotency_kind == IDEMPOTENCY_RANDOM:
            self.assertRegex(request.idempotency_key, RANDOM_KEY)
            self.assertFalse(request.retry_safe)
            return None
        self.assertTrue(request.retry_safe)
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

    def test_domain_spellings_are_one_message(self) -> None:
        """
        A retry that spells an internationalised domain as its C{xn--} form
        (or a local part in another Unicode normal form) is the same
        message: the addresses count in their compared form.
        """
        keys = [
            derived_idempotency_key(ALICE.account, Envelope(sender, (rcpt,)), message())
            for sender, rcpt in [
                ("you@yourdomain.com", "J\u00f6rg@B\u00fccher.example"),
                ("you@yourdomain.com", "j\u00f6rg@xn--bcher-kva.example"),
                ("You@YourDomain.com", "jo\u0308rg@b\u00fccher.example"),
            ]
        ]
        self.assertEqual(len(set(keys)), 1)
        other = derived_idempotency_key(
            ALICE.account, Envelope("you@yourdomain.com", ("jorg@bucher.example",)), message()
        )
        self.assertNotIn(other, keys)

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
        """Without a Message-ID two identical sends may be two intended messages: a random key each."""
        self.assertIsNone(self.send(message(message_id=None)))
        first = self.sent(message(message_id=None)).idempotency_key
        self.assertNotEqual(self.sent(message(message_id=None)).idempotency_key, first)

    def test_client_key_wins(self) -> None:
        """The client's X-PostStack-Idempotency-Key is used as it is."""
        request = self.sent(message(extra=b"X-PostStack-Idempotency-Key: order-7\r\n"))
        self.assertEqual((request.idempotency_key, request.idempotency_kind), ("order-7", IDEMPOTENCY_CLIENT))
        self.assertEqual(request.payload["idempotency_key"], "order-7")

    def test_switch_off(self) -> None:
        """With derivation off, a Message-ID alone gives no key."""
        self.assertIsNone(self.send(message(), derive=False))

    def test_key_is_stable(self) -> None:
        """The derivation is fixed (relay restarts and other instances compute the same key)."""
        self.assertEqual(
            derived_idempotency_key(ALICE.account, ENV, message()),
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


class KeyedTests(SynchronousTestCase):
    """L{keyed}: the one function that decides a request's idempotency key."""

    def request(self, raw: bytes) -> EmailRequest:
        return translate(raw, ENV)

    def test_order(self) -> None:
        """The client's key, else derived (with a Message-ID and derivation on), else random."""
        own = self.request(message(extra=b"X-PostStack-Idempotency-Key: k-1\r\n"))
        for derive in (True, False):
            out = keyed(own, account="key:aaa", envelope=ENV, raw=b"", derive=derive)
            self.assertEqual((out.idempotency_key, out.idempotency_kind), ("k-1", IDEMPOTENCY_CLIENT))
        with_id = self.request(message())
        out = keyed(with_id, account="key:aaa", envelope=ENV, raw=message(), derive=True)
        self.assertEqual(
            (out.idempotency_key, out.idempotency_kind),
            (derived_idempotency_key("key:aaa", ENV, message()), IDEMPOTENCY_DERIVED),
        )
        for request, derive in ((with_id, False), (self.request(message(message_id=None)), True)):
            out = keyed(request, account="key:aaa", envelope=ENV, raw=message(), derive=derive)
            self.assertEqual(out.idempotency_kind, IDEMPOTENCY_RANDOM)
            self.assertRegex(out.idempotency_key, RANDOM_KEY)

    def test_payload_carries_the_key(self) -> None:
        """The payload gets the key; the request it was made from is left alone."""
        request = self.request(message())
        out = keyed(request, account="a", envelope=ENV, raw=message(), derive=True)
        self.assertEqual(out.payload["idempotency_key"], out.idempotency_key)
        self.assertNotIn("idempotency_key", request.payload)
        self.assertEqual({k: v for k, v in out.payload.items() if k != "idempotency_key"}, request.payload)

    def test_retry_safe(self) -> None:
        """Only a client or derived key makes a client's retry safe; a request without a kind but with a key counts as safe."""
        self.assertTrue(EmailRequest({}, "k", None, IDEMPOTENCY_CLIENT).retry_safe)
        self.assertTrue(EmailRequest({}, "k", None, IDEMPOTENCY_DERIVED).retry_safe)
        self.assertTrue(EmailRequest({}, "k").retry_safe)
        self.assertFalse(EmailRequest({}, "k", None, IDEMPOTENCY_RANDOM).retry_safe)
        self.assertFalse(EmailRequest({}, None).retry_safe)


class TenantTests(SynchronousTestCase):
    """
    Delivery names the customer a send is for (its C{tenant}, for the API
    client's fair share of request slots): the sender's account.
    """

    def test_tenant_is_the_account(self) -> None:
        """Each API key is its own tenant; each mailbox too, though all send with the service key."""
        api = MemoryEmailAPI()
        carol = Identity("mailbox", "sk_test_service", "carol@yourdomain.com", "carol@yourdomain.com",
                         b"", "mailbox:carol@yourdomain.com")
        dave = Identity("mailbox", "sk_test_service", "dave@yourdomain.com", "dave@yourdomain.com",
                        b"", "mailbox:dave@yourdomain.com")
        for identity in (ALICE, BOB, carol, dave):
            env = Envelope(identity.mailbox or "you@yourdomain.com", ("user@example.com",))
            raw = message().replace(b"you@yourdomain.com", env.mail_from.encode())
            self.assertEqual(self.successResultOf(RelayDelivery(identity, api).deliver(env, raw)).code, 250)
        self.assertEqual(
            api.tenants,
            ["key:aaa", "key:bbb", "mailbox:carol@yourdomain.com", "mailbox:dave@yourdomain.com"],
        )

    def test_no_account_no_tenant(self) -> None:
        """An identity without an account (built by hand) sends without a tenant: no cap of its own."""
        api = MemoryEmailAPI()
        anonymous = Identity("api_key", "sk_test_x")
        self.successResultOf(RelayDelivery(anonymous, api).deliver(ENV, message()))
        self.assertEqual(api.tenants, [None])
