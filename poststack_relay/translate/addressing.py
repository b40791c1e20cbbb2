# -*- test-case-name: tests.test_translate,tests.test_senders,tests.test_policy -*-
"""
The address header fields: C{From} (with the sender policy), C{To}/C{Cc}
(which only place envelope recipients in the API's lists), C{Reply-To}
and C{Sender} (for the policy), parsed with one fast path and the stdlib
parser, display names decoded with the one RFC 2047 decoder.  The
addresses are checked by L{poststack_relay.addresses}; the rules of who
may send as whom are L{poststack_relay.policy}'s.

Every address the API receives is in its API form (an internationalized
domain as its A-label, L{poststack_relay.addresses.api_address}), display
names stay Unicode; addresses are matched by their
L{poststack_relay.addresses.address_key}.
"""

from __future__ import annotations

import re
from email.message import Message
from email.utils import getaddresses
from typing import Final

from .. import policy, replies
from ..addresses import (
    BAD_DOMAIN,
    address_key,
    api_address,
    bare_address,
    header_address_problem,
    is_header_address,
)
from .decoding import clean, decode_words, raw_header_text, utf8_safe, words_decodable
from .request import Envelope, TranslationError


# obs-route (RFC 5322 section 4.4) right after the "<" of an angle-addr.
_OBS_ROUTE: Final = re.compile(r"<[ \t]*@[^<>:\"]*:")
_SPECIALS: Final = re.compile(r'[][\\()<>@,:;".]')
_ESCAPES: Final = re.compile(r'([\\"])')
_BLANKS: Final = re.compile(r"[ \t]+")
_NOT_SIMPLE: Final = re.compile(r'["()\\:;\[\]]')
_SIMPLE_ADDR: Final = r"[^\s<>(),;:\\\"@\[\]]+@[^\s<>(),;:\\\"@\[\]]+"
_SIMPLE_MAILBOX: Final = re.compile(
    rf"[ \t]*(?:([^<>@]*?)[ \t]*<({_SIMPLE_ADDR})>|({_SIMPLE_ADDR}))[ \t]*"
)


def format_address(name: str, address: str) -> str:
    """Format ``Name <address>``, quoting the name when needed (UTF-8 kept)."""
    if not name:
        return address
    if _SPECIALS.search(name) is not None:
        name = '"' + _ESCAPES.sub(r"\\\1", name) + '"'
    return f"{name} <{address}>"


def _simple_addresses(value: str) -> list[tuple[str, str]] | None:
    """
    Parse the common simple shapes of an address list quickly.

    Handles comma-separated ``addr`` and ``Name <addr>`` entries without
    quotes, comments, groups, brackets or backslashes (the stdlib
    parser is pure Python and the slowest step of a translation).  Returns
    ``None`` for anything else; the result is what ``getaddresses`` gives.
    """
    if _NOT_SIMPLE.search(value) is not None:
        return None
    pairs: list[tuple[str, str]] = []
    for entry in value.split(","):
        match = _SIMPLE_MAILBOX.fullmatch(entry)
        if match is None:
            if entry.strip(" \t"):
                return None
            continue
        name, bracketed, bare = match.groups()
        address = bare if bare is not None else bracketed
        if "=?" in address:  # leave the legacy fully-encoded case to the slow path
            return None
        if bare is not None:
            pairs.append(("", bare))
        else:
            pairs.append((_BLANKS.sub(" ", name).strip(" \t"), bracketed))
    return pairs


def parse_addresses(values: list[str]) -> list[tuple[str, str]]:
    """
    Parse address header values (raw, unfolded) into (name, address) pairs.

    Display names are RFC 2047 decoded after parsing, so that an encoded
    comma cannot split an address.  Empty entries (groups, ``<>``) are
    skipped.
    """
    pairs: list[tuple[str, str]] = []
    for value in values:
        if "<" in value and "@" in value:
            # A source route (<@relay.example:jane@example.com>) is obsolete
            # and ignored (RFC 5321 section 4.1.2); its commas must not
            # split the list.
            value = _OBS_ROUTE.sub("<", value)
        parsed = _simple_addresses(value)
        if parsed is None:
            parsed = getaddresses([value])
            if (
                "=?" in value
                and any("=?" in address for _, address in parsed)
                and words_decodable(value)
            ):
                # Python's legacy API (msg["To"] = "Jörg <j@example.de>")
                # encodes the whole field, addresses included.
                parsed = getaddresses([decode_words(value)])
        for name, address in parsed:
            address = clean(address).strip()
            if address:
                pairs.append((clean(decode_words(name)).strip(), address))
    return pairs


def checked_from(from_values: list[str], envelope: Envelope, mailbox: str | None) -> str:
    """Work out the API ``from`` value, enforcing the mailbox rule."""
    if from_values:
        pairs = parse_addresses(from_values)
        if len(pairs) != 1:
            raise TranslationError.of(replies.from_address_count(len(pairs)))
        name, address = pairs[0]
        problem = header_address_problem(address)
        sent = api_address(address) if problem is None else None
        if sent is None:
            raise TranslationError.of(replies.from_address_invalid(problem or BAD_DOMAIN))
        formatted = format_address(name, sent)
    else:
        address = bare_address(utf8_safe(envelope.mail_from))
        if not address:
            raise TranslationError.of(replies.NO_FROM_EMPTY_ENVELOPE)
        sent = api_address(address) if header_address_problem(address) is None else None
        if sent is None:
            raise TranslationError.of(replies.NO_FROM_BAD_ENVELOPE)
        formatted = sent
    rejection = policy.from_header_reply(mailbox, address)
    if rejection is not None:
        raise TranslationError.of(rejection)
    return formatted


def check_sender_fields(message: Message, mailbox: str | None) -> None:
    """
    Apply the sender policy to the message's C{Sender} fields: for a
    mailbox login each must name the mailbox's own address.
    """
    if mailbox is not None:
        rejection = policy.sender_header_reply(mailbox, sender_fields(message))
        if rejection is not None:
            raise TranslationError.of(rejection)


def reply_to(values: list[str]) -> str | None:
    """
    The API's C{reply_to}: the C{Reply-To} addresses (any address: it
    claims no authorship) that are valid, in their API form, joined;
    C{None} if none is.
    """
    found = []
    for name, address in parse_addresses(values):
        sent = api_address(address) if is_header_address(address) else None
        if sent is not None:
            found.append(format_address(name, sent))
    return ", ".join(found) if found else None


def sender_fields(message: Message) -> list[list[str]]:
    """
    The addresses of each C{Sender} field of the message that is not empty
    (parsed and RFC 2047 decoded like C{From}), for the sender policy.
    """
    fields: list[list[str]] = []
    for name, value in message.raw_items():
        if name.lower() == "sender":
            text = raw_header_text(value).strip()
            if text:
                fields.append([address for _, address in parse_addresses([text])])
    return fields


def split_recipients(
    to_values: list[str], cc_values: list[str], envelope: Envelope
) -> tuple[list[str], list[str], list[str]]:
    """
    Split the envelope recipients into API ``to``, ``cc`` and ``bcc``.

    The envelope decides who receives the message; the To and Cc headers
    only decide in which list (and with which display name) a recipient
    appears, matched by L{address_key} (so C{bücher.example} in To is the
    envelope's C{xn--bcher-kva.example}).  Header addresses that are not
    envelope recipients are dropped.
    """
    envelope_keys: dict[str, str] = {}
    for recipient in envelope.rcpt_to:
        address = bare_address(utf8_safe(recipient))
        if address:
            problem = header_address_problem(address)
            sent = api_address(address) if problem is None else None
            if sent is None:
                # The SMTP layer checks RCPT TO; this is the last line of
                # defence: the API gets no recipient it would misread.
                raise TranslationError.of(
                    replies.envelope_recipient_invalid(problem or BAD_DOMAIN)
                )
            envelope_keys.setdefault(address_key(address), sent)
    if not envelope_keys:
        raise TranslationError.of(replies.NO_VALID_RECIPIENTS)
    placed: set[str] = set()
    lists: list[list[str]] = []
    for values in (to_values, cc_values):
        found: list[str] = []
        for name, address in parse_addresses(values):
            key = address_key(address)
            if key in envelope_keys and key not in placed:
                placed.add(key)
                found.append(format_address(name, api_address(address) or envelope_keys[key]))
        lists.append(found)
    to, cc = lists
    bcc = [address for key, address in envelope_keys.items() if key not in placed]
    if not to:
        if cc:
            to, cc = cc, []
        else:
            to, bcc = bcc, []
    return to, cc, bcc
