# -*- test-case-name: tests.test_addresses,tests.test_smtp_envelope,tests.test_translate,tests.test_senders -*-
"""
The one address validator: what a mail address must look like, on the
SMTP envelope (C{MAIL FROM}/C{RCPT TO} paths, RFC 5321) and in the
message's header fields (C{From}, envelope recipients seen by the
translation, RFC 5322).

Pure: no Twisted, no I/O.  The SMTP protocol asks L{path_problem} and
L{has_domain} about each path; the translation asks
L{header_address_problem} about each address it sends to the API; the
sender policy (L{poststack_relay.policy}) asks L{has_dotted_domain}.

Both sides count the RFC 5321 section 4.5.3.1 limits the same way, in
octets of UTF-8 (an internationalized address, RFC 6531, is measured as it
goes on the wire): a local part of at most L{MAX_LOCAL_PART}, a domain of
at most L{MAX_DOMAIN}, a path of at most L{MAX_PATH} with its angle
brackets, so an address of at most L{MAX_ADDRESS}.

Where the two sides differ, on purpose (each keeps the replies it has
always given):

  - An envelope path follows the RFC 5321 C{Mailbox} grammar
    (L{path_problem}): a dot-atom-ish local part (dots are not policed, as
    by Postfix without C{strict_rfc821_envelopes}) or a quoted string, and
    a domain of letter/digit/hyphen/underscore labels or an address
    literal; comments are named as such (their own reply).  Its length
    problems are told apart (path, local part, domain: three replies).
  - A header address is checked leniently (L{header_address_problem}),
    as mail software writes them: any run of characters that are not
    whitespace or RFC 5322 specials on either side of the C{@} (a quoted
    local part and a domain literal are allowed), no control characters;
    and it has one reply for any length problem.  The envelope rules of
    the SMTP side already applied to the envelope; a header address the
    API would misread is refused all the same.
  - "Has a domain" (L{has_domain}, used at C{MAIL}/C{RCPT}) accepts an
    address literal; a sender's domain must in addition hold a dot
    (L{has_dotted_domain}, the sender rule: a verified sending domain,
    never a bare host or an IPv6 literal).
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "MAX_ADDRESS",
    "MAX_DOMAIN",
    "MAX_LOCAL_PART",
    "MAX_PATH",
    "bare_address",
    "has_domain",
    "has_dotted_domain",
    "header_address_problem",
    "is_header_address",
    "path_problem",
]

# RFC 5321 section 4.5.3.1: the longest local part, domain and path (the
# path counts its angle brackets, so an address may have 254 octets).
MAX_LOCAL_PART: Final = 64
MAX_DOMAIN: Final = 255
MAX_PATH: Final = 256
MAX_ADDRESS: Final = MAX_PATH - 2

# RFC 5321 Mailbox syntax, with RFC 6531's UTF-8 (any non-ASCII character
# but the C1 controls) wherever ASCII letters may stand.  Dots in a local
# part are not policed (as by Postfix without strict_rfc821_envelopes).
_UTF8: Final = "\u00a0-\U0010ffff"
_ATEXT: Final = "A-Za-z0-9!#$%&'*+\\-/=?^_`{|}~" + _UTF8
_LOCAL_RE: Final = re.compile(
    "(?:[" + _ATEXT + ".]+"
    + r'|"(?:[\x20\x21\x23-\x5b\x5d-\x7e' + _UTF8 + r"]|\\[\x20-\x7e])*" + '")'
)
_LABEL: Final = "[A-Za-z0-9_" + _UTF8 + "][A-Za-z0-9_\\-" + _UTF8 + "]*"
_DOMAIN_RE: Final = re.compile(
    "(?:" + _LABEL + r"(?:\." + _LABEL + r")*\.?" + r"|\[[\x21-\x5a\x5e-\x7e]+\])"
)
_QUOTED: Final = re.compile(r'"(?:[^"\\]|\\.)*"')

# A header address: atoms of anything but whitespace and specials, or a
# quoted local part; a domain of such atoms or a domain literal.
_ATOM_PART: Final = r'[^\s<>()\[\],;:\\@"]+'
_HEADER_ADDRESS: Final = re.compile(
    rf'(?:"[^"\r\n]*"|{_ATOM_PART})@(?:{_ATOM_PART}|\[[^\[\]\s\\]+\])'
)
# Control characters never allowed in a header address: C0 (TAB included),
# DEL, C1, and the Unicode line and paragraph separators.
_CONTROLS: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")

NOT_VALID: Final = "not valid; use name@domain"
"""L{header_address_problem} for an address that is not C{local@domain}."""

TOO_LONG: Final = (
    "too long (RFC 5321: local part at most 64 octets, domain at most"
    " 255, address at most 254)"
)
"""L{header_address_problem} for an address over an RFC 5321 limit."""


def _octets(text: str) -> int:
    """The length of C{text} in UTF-8 octets (lone surrogates as one each)."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogateescape"))


def has_domain(address: str) -> bool:
    """
    Does C{address} have a local part and a domain: a dotted name that
    does not start with a dot, or a non-empty address literal
    (C{[192.0.2.1]})?
    """
    local, at, domain = address.rpartition("@")
    if at and local and domain.startswith("[") and domain.endswith("]"):
        return len(domain) > 2  # an address literal
    return bool(at and local and domain and not domain.startswith(".") and "." in domain.strip("."))


def has_dotted_domain(address: str) -> bool:
    """
    Does C{address} have a local part and a domain that holds a dot other
    than at its ends (the shape of an address on a sending domain; an
    address literal passes only with a dot in it)?
    """
    local, at, domain = address.rpartition("@")
    return bool(at and local and domain and "." in domain.strip("."))


def path_problem(raw_path: bytes, address: str) -> str | None:
    """
    What is wrong with a MAIL/RCPT path whose octets between the angle
    brackets are C{raw_path} and whose address (route removed) is
    C{address}: C{"path"}, C{"local"} or C{"domain"} for an RFC 5321
    length limit (counted in octets, UTF-8 included), C{"comment"} for a
    comment (parentheses outside a quoted local part), C{"syntax"} for
    anything else; C{None} if it is fine.  An address without C{@} is left
    to the caller, and so is one without a domain after its length checks
    (both have their own replies).
    """
    local, at, domain = address.rpartition("@")
    if at and _octets(local) > MAX_LOCAL_PART:
        return "local"
    if at and _octets(domain) > MAX_DOMAIN:
        return "domain"
    if len(raw_path) + 2 > MAX_PATH:
        return "path"
    if not has_domain(address):
        return None
    if "(" in _QUOTED.sub("", local) or "(" in domain or ")" in domain:
        return "comment"
    if _LOCAL_RE.fullmatch(local) is None or _DOMAIN_RE.fullmatch(domain) is None:
        return "syntax"
    return None


def header_address_problem(address: str) -> str | None:
    """
    Why C{address} (from a header, or an envelope address the translation
    puts in the API request) cannot be used as a sender or recipient:
    L{NOT_VALID} or L{TOO_LONG}; C{None} if it can.

    It must be C{local@domain} without whitespace or specials (a quoted
    local part and a domain literal are allowed), without control
    characters, and within the RFC 5321 limits (local part 64 octets,
    domain 255, address 254).  C{address} holds no lone surrogates (the
    translation replaces them first).
    """
    if _HEADER_ADDRESS.fullmatch(address) is None or _CONTROLS.search(address):
        return NOT_VALID
    local, _, domain = address.rpartition("@")
    if (
        _octets(local) > MAX_LOCAL_PART
        or _octets(domain) > MAX_DOMAIN
        or _octets(address) > MAX_ADDRESS
    ):
        return TOO_LONG
    return None


def bare_address(address: str) -> str:
    """C{address} without surrounding whitespace and one pair of angle brackets."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    return address


def is_header_address(address: str) -> bool:
    """
    Is C{address} shaped like a header address (L{header_address_problem}'s
    syntax only, no control or length checks)?  What a C{Reply-To} address
    must be to be passed on.
    """
    return _HEADER_ADDRESS.fullmatch(address) is not None
