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

Internationalised addresses (RFC 6531/6532), one rule for both sides:

  - The API receives every domain in ASCII (L{api_domain},
    L{api_address}): a U-label becomes its A-label (IDNA 2008, with the
    UTS #46 mapping, non-transitional: case folded, full-width dots
    mapped, C{ß} kept), an A-label (C{xn--}) must decode; a domain that is
    neither is refused (L{BAD_DOMAIN}, the path problem C{"idn"}).  A
    UTF-8 local part cannot be converted and is passed as UTF-8.
  - Two addresses are the same mailbox when their L{address_key}s are
    equal: the local part NFC-normalised and lowercased, the domain in
    its lowercased API form; so C{Jörg@Bücher.example} and
    C{jörg@xn--bcher-kva.example} are one mailbox (the sender policy, the
    envelope's duplicate recipients, To/Cc against the envelope).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

import idna

__all__ = [
    "BAD_DOMAIN",
    "MAX_ADDRESS",
    "MAX_DOMAIN",
    "MAX_LOCAL_PART",
    "MAX_PATH",
    "address_domain",
    "address_key",
    "api_address",
    "api_domain",
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


BAD_DOMAIN: Final = (
    "not valid: its domain is not a valid internationalized domain name (IDNA 2008)"
)
"""The problem of an address whose domain has no A-label form (L{api_domain})."""


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
    comment (parentheses outside a quoted local part), C{"idn"} for a
    domain with no A-label form (L{api_domain}), C{"syntax"} for
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
    if api_domain(domain) is None:
        return "idn"
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


def address_domain(value: str) -> str | None:
    """
    The domain, lower-cased, of an address or of the address in
    C{Name <local@domain>} (the API's C{from}); C{None} without one.
    """
    value = value.strip()
    if value.endswith(">") and "<" in value:
        value = value[value.rindex("<") + 1 : -1]
    _, at, domain = value.rpartition("@")
    domain = domain.strip().rstrip(".")
    if not (at and domain):
        return None
    # The API's form (an internationalised domain as A-labels): the same
    # key for MAIL FROM in UTF-8 and the API's from, and ASCII in replies.
    return (api_domain(domain) or domain).lower()


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


def _is_a_label(label: str) -> bool:
    """Is C{label} (ASCII, starting with C{xn--} in any case) a valid IDNA 2008 A-label?"""
    try:
        idna.ulabel(label)
    except (idna.IDNAError, UnicodeError, ValueError):
        return False
    return True


def api_domain(domain: str) -> str | None:
    """
    C{domain} as the API receives it, or C{None} if it is not a valid
    internationalized domain name.

    An ASCII domain is returned as written, once each of its C{xn--}
    labels is checked to be a valid A-label.  Any other is mapped with
    UTS #46 (non-transitional: case folded, full-width dots mapped,
    C{ß} kept) and each non-ASCII label converted to its IDNA 2008
    A-label (C{bücher.example} -> C{xn--bcher-kva.example}); the ASCII
    labels of such a domain are kept (lowercased by the mapping; an
    underscore stays allowed, as in envelope domains).  An address
    literal must be ASCII.
    """
    if domain.isascii():
        if "xn--" not in domain.lower():
            return domain  # the common case: nothing to convert or check
        labels = domain.split(".")
        if all(_is_a_label(label) for label in labels if label[:4].lower() == "xn--"):
            return domain
        return None
    if domain.startswith("["):
        return None
    try:
        labels = idna.uts46_remap(domain, std3_rules=False, transitional=False).split(".")
        for n, label in enumerate(labels):
            if not label.isascii():
                labels[n] = idna.alabel(label).decode("ascii")
            elif label[:4] == "xn--" and not _is_a_label(label):
                return None
    except (idna.IDNAError, UnicodeError, ValueError):
        return None
    converted = ".".join(labels)
    return converted if len(converted) <= MAX_DOMAIN else None


def api_address(address: str) -> str | None:
    """
    C{address} (C{local@domain}) as the API receives it: the local part
    as written (UTF-8 included), the domain in its API form
    (L{api_domain}); C{None} if the domain has none.
    """
    if address.isascii() and "xn--" not in address.lower():
        return address
    local, at, domain = address.rpartition("@")
    converted = api_domain(domain)
    if converted is None:
        return None
    return address if converted is domain else local + at + converted


def address_key(address: str) -> str:
    """
    The form in which two addresses are compared (the same mailbox when
    equal): the local part NFC-normalised and lowercased, the domain in
    its API form (L{api_domain}), lowercased; a domain without one is
    compared as written, lowercased.
    """
    if address.isascii():
        return address.lower()
    local, at, domain = address.rpartition("@")
    converted = api_domain(domain)
    if converted is None:
        converted = domain
    return unicodedata.normalize("NFC", local).lower() + at + converted.lower()
