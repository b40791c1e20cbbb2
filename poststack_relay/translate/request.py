# -*- test-case-name: tests.test_translate,tests.test_delivery -*-
"""
The values a translation takes and gives: the SMTP L{Envelope}, the
L{EmailRequest} for C{POST /emails}, and L{TranslationError}, which carries
the SMTP reply (one of L{poststack_relay.replies}) for a message that cannot
be sent.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from .. import replies
from ..replies import Reply


def _as_tuple(value: Iterable[str]) -> tuple[str, ...]:
    """Freeze any iterable of recipient addresses into a tuple."""
    return tuple(value)


@attrs.frozen
class Envelope:
    """
    The SMTP envelope of one transaction.

    :ivar mail_from: The envelope sender address from ``MAIL FROM``, or
        ``""`` for the null sender ``<>``.
    :ivar rcpt_to: The envelope recipients from ``RCPT TO``, addresses only,
        in the order they were given.
    """

    mail_from: str
    rcpt_to: tuple[str, ...] = attrs.field(converter=_as_tuple)


@attrs.frozen
class EmailRequest:
    """
    One ``POST /emails`` call.

    :ivar payload: The JSON-ready request body.
    :ivar idempotency_key: The idempotency key, or ``None``.  When set it is
        also in ``payload["idempotency_key"]``; the HTTP layer sends it as
        the ``Idempotency-Key`` header.  The translation sets the message's
        own ``X-PostStack-Idempotency-Key``; delivery then decides the key
        of every request it sends (:func:`poststack_relay.idempotency.keyed`),
        so a request that leaves delivery always has one.
    :ivar message_id: The message's ``Message-ID`` (trimmed), or ``None``.
        It is not sent; its presence decides whether a key may be derived
        from the message.
    :ivar idempotency_kind: Where the key comes from: ``"client"``,
        ``"derived"`` or ``"random"`` (the ``IDEMPOTENCY_*`` names of
        :mod:`poststack_relay.idempotency`), or ``None`` when not said.
    """

    payload: dict[str, Any]
    idempotency_key: str | None
    message_id: str | None = None
    idempotency_kind: str | None = None

    @property
    def retry_safe(self) -> bool:
        """
        Would the client's retry of this message carry the same key (its
        own or a derived one), so that it cannot be sent twice?  False
        without a key or with a random one (made for this transaction only).
        """
        return self.idempotency_key is not None and self.idempotency_kind != "random"


class TranslationError(Exception):
    """
    The message cannot be turned into an API call.

    Carries the full SMTP reply to send back for the DATA command.

    :ivar code: The SMTP reply code, e.g. ``554``.
    :ivar enhanced: The RFC 3463 enhanced status code, e.g. ``"5.6.0"``.
    :ivar text: Human-readable ASCII text without CR or LF, saying what to do.
    """

    code: int
    enhanced: str
    text: str

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        """Keep the reply parts; ``text`` is forced to printable ASCII."""
        text = replies.printable(text)
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text

    @classmethod
    def of(cls, reply: Reply) -> TranslationError:
        """The error that answers with ``reply`` (a translation reply of
        :mod:`poststack_relay.replies`)."""
        return cls(reply.code, reply.enhanced, reply.text)

    @property
    def reply(self) -> Reply:
        """The reply for the client: the text on one line of at most 400 characters."""
        return Reply(self.code, self.enhanced, replies.clean_text(self.text))
