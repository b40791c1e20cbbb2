# -*- test-case-name: tests.test_translate,tests.test_mime_corpus,tests.test_senders -*-
"""
L{translate}: one received message in, one C{POST /emails} request out,
or a L{TranslationError}.  It parses the message, applies the sender
policy, reads the header fields once, and puts the parts together.
"""

from __future__ import annotations

from typing import Any

from .. import replies

from .addressing import check_sender_fields, checked_from, reply_to, split_recipients
from .body import walk
from .decoding import clean, raw_header_text, unstructured
from .fields import PASSED_NAMES, PostStackFields
from .parse import (
    MAX_HEADER_FIELDS,
    MAX_MIME_DEPTH,
    MAX_MIME_PARTS,
    _check_header_section,
    check_limits,
    parse_message,
)
from .request import EmailRequest, Envelope, TranslationError
from .scan import MimeScan

__all__ = ["translate"]


def translate(
    raw: bytes,
    envelope: Envelope,
    *,
    mailbox: str | None = None,
    scan: MimeScan | None = None,
) -> EmailRequest:
    """
    Translate one received message into one ``POST /emails`` request.

    :param raw: The message as received in DATA, dot-unstuffed, with CRLF
        (or bare LF) line endings.
    :param envelope: The SMTP envelope of the transaction.
    :param mailbox: When the client authenticated as a mailbox, its address:
        the From and Sender addresses must then be that mailbox.
    :param scan: What L{MimeScan} found while the message streamed in:
        when it passed a limit, the message is refused without a full
        parse, with the reply the full parse would give.
    :raises TranslationError: When the message cannot be sent; the error
        carries the SMTP reply for the DATA command.
    :return: The request to make.
    """
    if scan is not None and scan.refusal is not None:
        refuse_early(raw, scan, mailbox)
    message = parse_message(raw)
    # The Sender rule comes before any other refusal of the parsed message,
    # as it always has (a message that claims another author is told so).
    check_sender_fields(message, mailbox)
    check_limits(message)

    from_values: list[str] = []
    to_values: list[str] = []
    cc_values: list[str] = []
    reply_to_values: list[str] = []
    subject: str | None = None
    message_id: str | None = None
    fields = PostStackFields()

    for name, value in message.raw_items():
        key = name.lower()
        if key == "from":
            from_values.append(raw_header_text(value))
        elif key == "to":
            to_values.append(raw_header_text(value))
        elif key == "cc":
            cc_values.append(raw_header_text(value))
        elif key == "reply-to":
            reply_to_values.append(raw_header_text(value))
        elif key == "subject":
            if subject is None:
                subject = unstructured(value)
        elif key == "message-id":
            if message_id is None:
                message_id = clean(raw_header_text(value)).strip() or None
        elif key.startswith("x-") or key in PASSED_NAMES:
            fields.read(key, name, value)

    template_id, variables, idempotency_key = fields.settle()
    sender = checked_from(from_values, envelope, mailbox)
    to, cc, bcc = split_recipients(to_values, cc_values, envelope)
    body = walk(message)

    payload: dict[str, Any] = {"from": sender, "to": to}
    if cc:
        payload["cc"] = cc
    if bcc:
        payload["bcc"] = bcc
    replies_to = reply_to(reply_to_values)
    if replies_to is not None:
        payload["reply_to"] = replies_to

    if template_id is None:
        payload["subject"] = subject or ""
        if body.text is not None:
            payload["text"] = body.text
        if body.html is not None:
            payload["html"] = body.html
        if body.text is None and body.html is None:
            payload["text"] = ""
    else:
        # Blank fields are left out so that the template's own apply (a
        # client cannot always omit them: nodemailer writes text: '' as an
        # empty text/plain part).
        if subject:
            payload["subject"] = subject
        if body.text is not None and body.text.strip():
            payload["text"] = body.text
        if body.html is not None and body.html.strip():
            payload["html"] = body.html

    if fields.passed:
        payload["headers"] = fields.headers()
    if fields.tags:
        payload["tags"] = list(fields.tags)
    if body.attachments:
        payload["attachments"] = body.attachments
    if template_id is not None:
        payload["template_id"] = template_id
    if variables is not None:
        payload["variables"] = variables
    if idempotency_key is not None:
        payload["idempotency_key"] = idempotency_key
    return EmailRequest(
        payload=payload,
        idempotency_key=idempotency_key,
        message_id=message_id,
        idempotency_kind=None if idempotency_key is None else "client",
    )


def refuse_early(raw: bytes, scan: MimeScan, mailbox: str | None) -> None:
    """
    Refuse a message that C{scan} found over a limit, parsing only its
    header section, with the checks in L{translate}'s order: the header
    section's size, the Sender rule, the header field count, the MIME tree.
    Returns (and the full parse decides) only if the header section does
    not confirm a header-field refusal.
    """
    _check_header_section(raw)
    if scan.header_end is None:  # pragma: no cover - the scan refused while reading it
        return
    headers = parse_message(raw[: scan.header_end])
    check_sender_fields(headers, mailbox)
    if len(headers) > MAX_HEADER_FIELDS:
        raise TranslationError.of(replies.too_many_header_fields(MAX_HEADER_FIELDS))
    if scan.refusal in (
        replies.too_many_mime_parts(MAX_MIME_PARTS),
        replies.mime_nested_too_deep(MAX_MIME_DEPTH),
    ):
        raise TranslationError.of(scan.refusal)
