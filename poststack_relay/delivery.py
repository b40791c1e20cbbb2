# -*- test-case-name: tests.test_delivery,tests.test_senders,tests.test_logs -*-
"""
Message delivery: one SMTP transaction becomes one C{POST /emails}.

L{RelayDelivery} is the avatar an authenticated session gets from the
cred realm.  The relay's protocol hands it the whole transaction at once
(envelope + raw message) through L{RelayDelivery.deliver}, so there is
exactly one API call per transaction however many recipients it has.
A large message is translated in the relay's L{TranslationPool} (a
thread), off the event loop; a small one at once.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from . import policy, replies
from .api import APIError
from .auth import Identity
from .holds import CredentialHolds
from .idempotency import (  # the kinds are re-exported for tests/test_logs.py (to be moved)
    IDEMPOTENCY_CLIENT,
    IDEMPOTENCY_DERIVED,
    IDEMPOTENCY_RANDOM,
    keyed,
)
from .interfaces import IEmailAPI, IRelayDelivery
from .offload import TranslationPool
from .replies import Reply
from .translate import EmailRequest, Envelope, MimeScan, TranslationError, translate

__all__ = [
    "IDEMPOTENCY_CLIENT",
    "IDEMPOTENCY_DERIVED",
    "IDEMPOTENCY_RANDOM",
    "OUTCOME_DEFERRED",
    "OUTCOME_REJECTED",
    "OUTCOME_RELAYED",
    "REFUSED_NOT_OWNED",
    "REFUSED_NO_DOMAIN",
    "SENDER_REFUSED_EVENT",
    "SENDER_REFUSED_FIELDS",
    "TRANSACTION_EVENT",
    "TRANSACTION_FIELDS",
    "RelayDelivery",
    "log_sender_refusal",
    "log_transaction",
    "transaction_outcome",
]

_log = Logger()


# The outcomes of a transaction, as C{smtp_transaction} logs them.
OUTCOME_RELAYED = "relayed"
"""The API accepted the message; the client got 250 with the email id."""
OUTCOME_DEFERRED = "deferred"
"""The client got a 4xx: nothing was sent, the client should retry."""
OUTCOME_REJECTED = "rejected"
"""The client got a 5xx: the relay or the API refused the message."""

TRANSACTION_EVENT = "smtp_transaction"
"""The C{event} of the one log event per SMTP transaction."""

TRANSACTION_FIELDS = (
    "session",
    "outcome",
    "client",
    "identity",
    "mail_from",
    "rcpt_count",
    "size",
    "api_status",
    "api_ms",
    "email_id",
    "idempotency",
    "reply_code",
    "reply_enhanced",
    "reply_text",
    "total_ms",
)
"""
The fields of every C{smtp_transaction} event besides C{event}, always all
present (C{None} where they do not apply); documented in
C{docs/logging.md}.  Their names are stable: log queries rely on them.
"""


SENDER_REFUSED_EVENT = "smtp_sender_refused"
"""The C{event} of a C{MAIL FROM} refused by the sender policy or a hold."""

SENDER_REFUSED_FIELDS = (
    "session",
    "client",
    "identity",
    "mail_from",
    "reason",
    "reply_code",
    "reply_enhanced",
    "reply_text",
)
"""The fields of every C{smtp_sender_refused} event besides C{event}."""

# Why the sender policy refused a MAIL FROM (the holds' reasons are
# poststack_relay.holds.HELD_*).
REFUSED_NO_DOMAIN = "no_domain"
"""Not an address on a domain (e.g. the SMTP username as the sender)."""
REFUSED_NOT_OWNED = "not_owned"
"""A mailbox login's sender is not its own address."""


def log_sender_refusal(
    *, session: str, client: str, identity: str, mail_from: str, reason: str, reply: Reply
) -> None:
    """
    Emit the C{smtp_sender_refused} event of one refused C{MAIL FROM}
    (fields: L{SENDER_REFUSED_FIELDS}), e.g. C{s1c sender refused
    client=203.0.113.9 identity=sk_live_ab… from=<a@x.com>
    reason=sender_domain reply=550 5.7.1: Sender address rejected: ...}.
    """
    text = (
        f"{session} sender refused client={client} identity={identity} from=<{mail_from}> "
        f"reason={reason} reply={reply.code} {reply.enhanced}: {reply.text}"
    )
    _log.info(
        text.replace("{", "{{").replace("}", "}}"),
        event=SENDER_REFUSED_EVENT,
        session=session,
        client=client,
        identity=identity,
        mail_from=mail_from,
        reason=reason,
        reply_code=reply.code,
        reply_enhanced=reply.enhanced,
        reply_text=reply.text,
    )


def transaction_outcome(reply: Reply, email_id: Optional[str]) -> str:
    """
    L{OUTCOME_RELAYED} for a 2xx with an email id, L{OUTCOME_DEFERRED} for
    any 4xx, otherwise L{OUTCOME_REJECTED}.
    """
    if email_id and 200 <= reply.code < 300:
        return OUTCOME_RELAYED
    if 400 <= reply.code < 500:
        return OUTCOME_DEFERRED
    return OUTCOME_REJECTED


def _round_ms(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 1)


def log_transaction(
    *,
    session: str,
    client: str,
    identity: str,
    envelope: Envelope,
    size: int,
    reply: Reply,
    email_id: Optional[str],
    api_status: Optional[int],
    api_ms: Optional[float],
    total_ms: float,
    idempotency: Optional[str],
) -> None:
    """
    Emit the C{smtp_transaction} event of one transaction (fields:
    L{TRANSACTION_FIELDS}).  Its text is one line for people, e.g.
    C{s1c relayed client=203.0.113.9 identity=sk_live_ab… from=<a@x.com>
    rcpts=3 size=1843 api=202 156.2ms id=em_1 idem=derived reply=250 2.0.0
    total=161.0ms}; the parts that do not apply (no API call, no email id)
    are left out of the text, never out of the fields.

    @param identity: the identity's label (a key prefix or the mailbox),
        never a key.
    @param api_ms: upstream latency, retries included; C{None} if the
        message never reached the API client.
    """
    outcome = transaction_outcome(reply, email_id)
    mail_from = envelope.mail_from
    rounded_api_ms = _round_ms(api_ms)
    rounded_total_ms = _round_ms(total_ms)
    # The text is built here, once, with braces escaped, rather than left to
    # the logging system's format-string machinery: one event per message,
    # and formatting its 15 fields that way cost ~5% of a message's CPU.
    # format(value) below is what the format string would do with the field.
    text = (
        f"{session} {outcome} client={client} identity={identity} from=<{mail_from}> "
        f"rcpts={len(envelope.rcpt_to)} size={size}"
    )
    if api_ms is not None:
        text += f" api={api_status if api_status is not None else '-'} {rounded_api_ms}ms"
    if email_id is not None:
        text += f" id={email_id}"
    if idempotency is not None:
        text += f" idem={idempotency}"
    text += f" reply={reply.code} {reply.enhanced} total={rounded_total_ms}ms"
    if outcome != OUTCOME_RELAYED:
        text += f": {reply.text}"
    text = text.replace("{", "{{").replace("}", "}}")
    _log.info(
        text,
        event=TRANSACTION_EVENT,
        session=session,
        outcome=outcome,
        client=client,
        identity=identity,
        mail_from=mail_from,
        rcpt_count=len(envelope.rcpt_to),
        size=size,
        api_status=api_status,
        api_ms=rounded_api_ms,
        email_id=email_id,
        idempotency=idempotency,
        reply_code=reply.code,
        reply_enhanced=reply.enhanced,
        reply_text=reply.text,
        total_ms=rounded_total_ms,
    )


@implementer(IRelayDelivery)
class RelayDelivery:
    """
    The delivery avatar of one authenticated identity.

    @param identity: who logged in.
    @param api: where the emails go.
    @param derive_keys: derive idempotency keys from messages with a
        Message-ID (L{poststack_relay.idempotency.keyed}).
    @param translator: where large messages are translated (off the event
        loop); C{None}: every message at once.
    """

    def __init__(
        self,
        identity: Identity,
        api: IEmailAPI,
        derive_keys: bool = True,
        holds: Optional[CredentialHolds] = None,
        translator: Optional[TranslationPool] = None,
    ) -> None:
        self.identity = identity
        self._api = api
        self._derive_keys = derive_keys
        self._holds = holds
        self._translator = translator

    def validate_sender(self, address: str, session: str = "-", client: str = "-") -> Optional[Reply]:
        """
        Is C{address} (from C{MAIL FROM}) an acceptable envelope sender for
        this identity?  C{None} if so, else the rejection, logged
        (L{log_sender_refusal}): the sender policy
        (L{poststack_relay.policy.envelope_sender_reply}), else what the
        API said about this credential or this sender's domain while it
        is remembered (L{poststack_relay.holds}).
        """
        identity = self.identity
        rejection = policy.envelope_sender_reply(identity.mailbox, address)
        if rejection is not None:
            reason = REFUSED_NOT_OWNED if rejection == replies.SENDER_NOT_OWNED else REFUSED_NO_DOMAIN
        else:
            held = None if self._holds is None else self._holds.held(identity.api_key, address)
            if held is None:
                return None
            reason, rejection = held
        log_sender_refusal(session=session, client=client, identity=identity.label,
                           mail_from=address, reason=reason, reply=rejection)
        return rejection

    def _prepare(self, raw: bytes, envelope: Envelope, scan: Optional[MimeScan]) -> EmailRequest:
        """
        The request for C{raw}, its idempotency key decided; raises
        L{TranslationError}.  Pure: may run in a translation thread.
        """
        identity = self.identity
        return keyed(
            translate(raw, envelope, mailbox=identity.mailbox, scan=scan),
            account=identity.account,
            envelope=envelope,
            raw=raw,
            derive=self._derive_keys,
        )

    def deliver(
        self,
        envelope: Envelope,
        raw: bytes,
        session: str = "-",
        client: str = "-",
        scan: Optional[MimeScan] = None,
    ) -> "Deferred[Reply]":
        """
        Translate and send one message.  Always fires with the reply for the
        client (never fails): 250 only when the API returned an email id.
        A large message is translated off the event loop (C{translator}).
        """
        started = time.monotonic()
        identity = self.identity
        size = len(raw)
        idempotency: Optional[str] = None

        def log(reply: Reply, email_id: Optional[str] = None, status: Optional[int] = None,
                api_ms: Optional[float] = None) -> None:
            log_transaction(
                session=session,
                client=client,
                identity=identity.label,
                envelope=envelope,
                size=size,
                reply=reply,
                email_id=email_id,
                api_status=status,
                api_ms=api_ms,
                total_ms=(time.monotonic() - started) * 1000,
                idempotency=idempotency,
            )

        def untranslated(failure: Any) -> Reply:
            # Never crash on input; never a wrong 250.
            if failure.check(TranslationError):
                reply: Reply = failure.value.reply
            elif failure.check(CancelledError):
                reply = replies.LOCAL_ERROR  # the relay stopped meanwhile: not sent
            else:
                _log.failure(
                    "translation failed unexpectedly", failure, event="translate_crash", session=session
                )
                reply = replies.LOCAL_ERROR
            log(reply)
            return reply

        def send(request: EmailRequest) -> "Deferred[Reply]":
            nonlocal idempotency
            idempotency = request.idempotency_kind
            api_started = time.monotonic()
            # The tenant: each API key, and each mailbox (though all mailboxes
            # send with the service key), is its own customer for the API
            # client's fair share of request slots.
            d = self._api.send_email(identity.api_key, request, tenant=identity.account or None)

            def sent(email_id: str) -> Reply:
                reply = replies.queued(email_id)
                log(reply, email_id, 202, (time.monotonic() - api_started) * 1000)
                return reply

            def failed(failure: Any) -> Reply:
                api_ms = (time.monotonic() - api_started) * 1000
                if failure.check(APIError):
                    err: APIError = failure.value
                    log(err.reply, None, err.status, api_ms)
                    if self._holds is not None:
                        self._holds.learned(
                            identity.api_key, err.status, err.code, err.retry_after, err.reply,
                            identity.label, err.sender_domain,
                        )
                    return err.reply
                _log.failure(
                    "API call failed unexpectedly", failure, event="api_crash", session=session
                )
                log(replies.LOCAL_ERROR, None, None, api_ms)
                return replies.LOCAL_ERROR

            return d.addCallbacks(sent, failed)

        translator = self._translator
        if translator is not None and translator.offloads(size):
            # A large message: translated in a thread, off the event loop.
            prepared = translator.run(self._prepare, raw, envelope, scan)
            del raw  # the thread has it
            return prepared.addCallbacks(send, untranslated)
        try:
            request = self._prepare(raw, envelope, scan)
            # Nothing below needs the raw message: let it go before the
            # request body is built.
            del raw
        except TranslationError as e:
            log(e.reply)
            return succeed(e.reply)
        except Exception:  # never crash on input; never a wrong 250
            _log.failure("translation failed unexpectedly", event="translate_crash", session=session)
            log(replies.LOCAL_ERROR)
            return succeed(replies.LOCAL_ERROR)
        return send(request)
