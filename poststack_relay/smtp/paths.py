# -*- test-case-name: tests.test_smtp_envelope -*-
"""
RFC 5321 address syntax for C{MAIL}/C{RCPT} paths: length limits,
comments, the Mailbox grammar (with RFC 6531's UTF-8).

(Moved here unchanged from the former C{smtp.py}; the one RFC 5321/5322
validator is to live in C{poststack_relay.addresses}.)
"""

from __future__ import annotations

import re
from typing import Optional


def has_domain(address: str) -> bool:
    local, at, domain = address.rpartition("@")
    if at and local and domain.startswith("[") and domain.endswith("]"):
        return len(domain) > 2  # an address literal
    return bool(at and local and domain and not domain.startswith(".") and "." in domain.strip("."))


# RFC 5321 section 4.5.3.1: the longest local part, domain and path (the
# path counts its angle brackets, so an address may have 254 octets).
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

# RFC 5321 Mailbox syntax, with RFC 6531's UTF-8 (any non-ASCII character
# but the C1 controls) wherever ASCII letters may stand.  Dots in a local
# part are not policed (as by Postfix without strict_rfc821_envelopes).
_UTF8 = "\u00a0-\U0010ffff"
_ATEXT = "A-Za-z0-9!#$%&'*+\\-/=?^_`{|}~" + _UTF8
_LOCAL_RE = re.compile(
    "(?:[" + _ATEXT + ".]+"
    + r'|"(?:[\x20\x21\x23-\x5b\x5d-\x7e' + _UTF8 + r"]|\\[\x20-\x7e])*" + '")'
)
_LABEL = "[A-Za-z0-9_" + _UTF8 + "][A-Za-z0-9_\\-" + _UTF8 + "]*"
_DOMAIN_RE = re.compile(
    "(?:" + _LABEL + r"(?:\." + _LABEL + r")*\.?" + r"|\[[\x21-\x5a\x5e-\x7e]+\])"
)
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def path_problem(raw_path: bytes, address: str) -> Optional[str]:
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
    if at and len(local.encode("utf-8", "surrogateescape")) > MAX_LOCAL_PART:
        return "local"
    if at and len(domain.encode("utf-8", "surrogateescape")) > MAX_DOMAIN:
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
