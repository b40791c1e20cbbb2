# -*- test-case-name: tests.test_delivery,tests.test_logs -*-
"""
The one place that decides a message's idempotency key.

Every attempt of one message carries one key (the C{Idempotency-Key}
header and the body's C{idempotency_key}), so an attempt whose answer was
lost and its retry are one email at the API.  L{keyed} picks it, in this
order (docs/reliability.md, "Never twice"):

  1. the client's own C{X-PostStack-Idempotency-Key}, as the translation
     read it (L{IDEMPOTENCY_CLIENT});
  2. when derivation is on and the message has a C{Message-ID}, a key
     derived from the account, the envelope and the exact message bytes
     (L{derived_idempotency_key}, L{IDEMPOTENCY_DERIVED});
  3. otherwise a random one for this transaction (L{IDEMPOTENCY_RANDOM}),
     which still makes the relay's own retries safe.

The request L{keyed} returns always has its key, in
C{EmailRequest.idempotency_key} and in the payload, and says which kind it
is (C{EmailRequest.idempotency_kind}); the API client sends it as it is.

Pure: no Twisted, no I/O (but the random source).
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Final

from .addresses import address_key
from .translate import EmailRequest, Envelope

__all__ = [
    "IDEMPOTENCY_CLIENT",
    "IDEMPOTENCY_DERIVED",
    "IDEMPOTENCY_RANDOM",
    "derived_idempotency_key",
    "keyed",
    "random_idempotency_key",
]

IDEMPOTENCY_CLIENT: Final = "client"
"""The message's own C{X-PostStack-Idempotency-Key}."""
IDEMPOTENCY_DERIVED: Final = "derived"
"""Derived from the message (L{derived_idempotency_key})."""
IDEMPOTENCY_RANDOM: Final = "random"
"""None of its own and none derived: a random key for this transaction."""

_DERIVATION_PREFIX: Final = b"poststack-relay idempotency v1\0"


def derived_idempotency_key(account: str, envelope: Envelope, raw: bytes) -> str:
    """
    The idempotency key of a message that carries a Message-ID but no
    X-PostStack-Idempotency-Key: C{psr-} and 40 hex digits of a SHA-256
    over the sending account (C{Identity.account}), the envelope and the
    exact message bytes (which hold the Message-ID).

    A client that sends the same message again (after a 4xx or a dropped
    connection: same Message-ID, same bytes, same credential, same
    envelope) gets the same key, so the API cannot send it twice.  Two
    different messages never share a key: any differing byte, recipient or
    credential changes it.  The same in every relay process and after
    restarts.  Addresses count in their compared form (L{address_key}): a
    domain spelled in Unicode or as its C{xn--} form is one domain (for an
    ASCII address that is just lowercase, as before).
    """
    h = hashlib.sha256(_DERIVATION_PREFIX)
    h.update(account.encode("utf-8"))
    h.update(b"\0")
    h.update(address_key(envelope.mail_from).encode("utf-8", "surrogateescape"))
    h.update(b"\0")
    for rcpt in sorted(address_key(r) for r in envelope.rcpt_to):
        h.update(rcpt.encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    h.update(b"%d\0" % len(raw))
    h.update(raw)
    return "psr-" + h.hexdigest()[:40]


def random_idempotency_key() -> str:
    """A key for one transaction only: C{psr-} and a random UUID (32 hex digits)."""
    return "psr-" + uuid.uuid4().hex


def keyed(
    request: EmailRequest, *, account: str, envelope: Envelope, raw: bytes, derive: bool
) -> EmailRequest:
    """
    C{request} (as the translation made it from C{raw}) with its
    idempotency key decided: the client's, else a derived one (when
    C{derive} and the message has a Message-ID), else a random one; set in
    C{idempotency_key}, in C{payload["idempotency_key"]} and named in
    C{idempotency_kind}.

    @param account: the sending account (C{Identity.account}), part of a
        derived key.
    """
    key = request.idempotency_key
    if key is not None:
        kind = IDEMPOTENCY_CLIENT
    elif derive and request.message_id:
        key, kind = derived_idempotency_key(account, envelope, raw), IDEMPOTENCY_DERIVED
    else:
        key, kind = random_idempotency_key(), IDEMPOTENCY_RANDOM
    payload = request.payload
    if payload.get("idempotency_key") != key:
        payload = dict(payload)
        payload["idempotency_key"] = key
    return EmailRequest(payload, key, request.message_id, kind)
