# -*- test-case-name: tests.test_senders,tests.test_policy -*-
"""
The sender policy: who may send as whom.  Each rule is decided here and
nowhere else.

  - An envelope sender (C{MAIL FROM}) is the null sender C{<>} or an
    address on a domain (L{envelope_sender_reply}).
  - A mailbox login sends only as itself: its envelope sender
    (L{envelope_sender_reply}), its message's C{From} address
    (L{from_header_reply}) and every C{Sender} field (L{sender_header_reply})
    name its own address, compared in one canonical form (L{owns}: case
    ignored, an internationalized domain as its A-label, the local part
    NFC-normalised; L{poststack_relay.addresses.address_key}).
    C{Reply-To} is free: it names where answers go and claims no authorship.
  - An API-key login is not checked here: the API enforces a key's domain
    scope on the C{From} address it receives.

Pure rules over parsed values: the SMTP layer passes the path's address;
the translation passes the addresses it parsed from the message's header
fields, with its one header parser and its one RFC 2047 decoder
(L{poststack_relay.translate}), so the address the rule checks is the one
that is sent.  Every rejection is a reply from L{poststack_relay.replies}.
"""

from __future__ import annotations

from collections.abc import Iterable

from . import replies
from .addresses import address_key, has_domain, has_dotted_domain
from .replies import Reply

__all__ = ["envelope_sender_reply", "from_header_reply", "owns", "sender_header_reply"]


def owns(mailbox: str, address: str) -> bool:
    """
    Is C{address} the mailbox's own?  Surrounding blanks ignored, compared
    by L{address_key} (case ignored, U-label and A-label domains equal).
    """
    return address_key(address.strip()) == address_key(mailbox.strip())


def envelope_sender_reply(mailbox: str | None, address: str) -> Reply | None:
    """
    Is C{address} (from C{MAIL FROM}, route removed) an acceptable envelope
    sender for a login with C{mailbox} (C{None} for an API key)?  C{None}
    if so, else the rejection.
    """
    if address == "":
        # The null sender: permitted; the From header then names the sender.
        return None
    if not (has_domain(address) and has_dotted_domain(address)):
        # Not an address on a domain: the username, a@localhost,
        # a@.example.com, no @ at all (RFC 5321 has no Mailbox without a
        # Domain; MAIL's syntax check leaves these to this rule).
        return replies.SENDER_NO_DOMAIN
    if mailbox is not None and not owns(mailbox, address):
        return replies.SENDER_NOT_OWNED
    return None


def from_header_reply(mailbox: str | None, address: str) -> Reply | None:
    """
    The rule for the message's author: for a mailbox login, C{address}
    (the C{From} address, or the envelope sender when the message has no
    C{From}) must be the mailbox's own.  C{None} if it may be sent.
    """
    if mailbox is not None and not owns(mailbox, address):
        return replies.from_header_not_owned(mailbox.strip())
    return None


def sender_header_reply(mailbox: str | None, fields: Iterable[list[str]]) -> Reply | None:
    """
    The rule for a mailbox login's C{Sender} header fields: C{fields} holds,
    for each C{Sender} field that is not empty, the addresses it names.
    Each must name exactly one address, the mailbox's own; otherwise the
    550 5.7.1 rejection.  C{None} if the message may be sent.
    """
    if mailbox is None:
        return None
    for addresses in fields:
        if len(addresses) != 1 or not owns(mailbox, addresses[0]):
            return replies.sender_header_not_owned(mailbox.strip())
    return None
