# -*- test-case-name: tests.test_smtp_envelope,tests.test_smtp_commands -*-
"""
The arguments of C{MAIL FROM:} and C{RCPT TO:}, pure: a path and its
parameters in, the address (route removed) or the reply refusing it out.

Only SMTP syntax is decided here (the path, RFC 5321's length limits and
address syntax, the parameters the relay supports); whether the sender
may be used is the delivery avatar's policy (L{IRelayDelivery.validate_sender}).

RFC 6531: C{MAIL FROM:<path> SMTPUTF8} opens a transaction in which paths
may hold UTF-8 (L{Sender.smtputf8}); without the parameter a path that is
not ASCII gets C{553 5.6.7}.  Either way an internationalized domain must
have an IDNA 2008 A-label form (L{poststack_relay.addresses.api_domain}).
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional, Union

from .. import replies
from ..replies import Reply
from ..addresses import has_domain, path_problem

_PATH = rb"<(?P<path>[^<>]*)>|(?P<bare>[^\s<>]+)"
_MAIL_RE = re.compile(rb"FROM:\s*(?:" + _PATH + rb")(?P<params>(?:\s+\S+)*)\s*$", re.I)
_RCPT_RE = re.compile(rb"TO:\s*(?:" + _PATH + rb")(?P<params>(?:\s+\S+)*)\s*$", re.I)
_ROUTE_RE = re.compile(r"^@[^:]*:")

_BODY_TYPES = (b"7BIT", b"8BITMIME")


class Sender(NamedTuple):
    """A parsed C{MAIL FROM}: the address (C{""} for C{<>}) and whether it declared C{SMTPUTF8}."""

    address: str
    smtputf8: bool


def parse_path(match: "re.Match[bytes]") -> Optional[str]:
    """
    The address of a MAIL/RCPT path: angle brackets and source routes
    removed, C{""} for C{<>}; C{None} if it is not UTF-8.
    """
    raw = match.group("path")
    if raw is None:
        raw = match.group("bare")
    try:
        address = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    return _ROUTE_RE.sub("", address)


def _raw_path(match: "re.Match[bytes]") -> bytes:
    raw: Optional[bytes] = match.group("path")
    if raw is None:
        raw = match.group("bare")
    assert raw is not None
    return raw


def _has_comment(params: bytes) -> bool:
    """
    Does the text after a path hold an RFC 5322 comment (which SMTP
    paths do not allow), e.g. C{MAIL FROM:<a@b.com> (me)}?
    """
    return any(token.startswith(b"(") for token in params.split())


def mail_parameters_problem(params: bytes, max_message_size: int) -> Optional[Reply]:
    """
    The reply refusing the parameters of a C{MAIL} command (C{SIZE},
    C{BODY}, C{AUTH} and C{SMTPUTF8}, which takes no value, are
    understood), or C{None} if they are fine.
    """
    for param in params.split():
        key, _, value = param.partition(b"=")
        key = key.upper()
        if key == b"SIZE":
            if not value.isdigit():
                return replies.BAD_SIZE_PARAMETER
            if int(value) > max_message_size:
                return replies.size_over_limit(max_message_size)
        elif key == b"BODY":
            if value.upper() not in _BODY_TYPES:
                return replies.UNSUPPORTED_BODY
        elif key == b"SMTPUTF8":
            if b"=" in param:
                return replies.unsupported_option(param.upper())
        elif key != b"AUTH":
            return replies.unsupported_option(key)
    return None


def parse_mail(arg: bytes, max_message_size: int) -> Union[Sender, Reply]:
    """
    The sender of C{MAIL FROM:<path> [parameters]} (address C{""} for the
    null sender), or the reply refusing the command's syntax.
    """
    m = _MAIL_RE.match(arg)
    if m is None:
        return replies.MAIL_SYNTAX
    address = parse_path(m)
    if address is None:
        return replies.SENDER_BAD_SYNTAX
    params = m.group("params")
    if _has_comment(params):
        return replies.SENDER_PATH_PROBLEMS["comment"]
    bad = mail_parameters_problem(params, max_message_size)
    if bad is not None:
        return bad
    smtputf8 = bool(params) and b"SMTPUTF8" in params.upper().split()
    if address:
        if not smtputf8 and not _raw_path(m).isascii():
            return replies.SENDER_NEEDS_SMTPUTF8
        problem = path_problem(_raw_path(m), address)
        if problem is not None:
            return replies.SENDER_PATH_PROBLEMS[problem]
        # An address without a domain (the SMTP username, a@localhost,
        # a@.example.com) is left to the sender policy, the one place that
        # refuses it (policy.envelope_sender_reply, logged with its reason).
    return Sender(address, smtputf8)


def parse_rcpt(arg: bytes, smtputf8: bool = False) -> Union[str, Reply]:
    """
    The recipient address of C{RCPT TO:<path>}, or the reply refusing it
    (no C{RCPT} parameter is supported).  C{smtputf8}: the transaction
    declared C{SMTPUTF8}, so the path may hold UTF-8.
    """
    m = _RCPT_RE.match(arg)
    if m is None:
        return replies.RCPT_SYNTAX
    address = parse_path(m)
    if address is None:
        return replies.RECIPIENT_BAD_SYNTAX
    if not smtputf8 and not _raw_path(m).isascii():
        return replies.RECIPIENT_NEEDS_SMTPUTF8
    params = m.group("params")
    problem = "comment" if _has_comment(params) else path_problem(_raw_path(m), address)
    if problem is not None:
        return replies.RECIPIENT_PATH_PROBLEMS[problem]
    if not has_domain(address):
        return replies.RECIPIENT_BAD_SYNTAX
    for param in params.split():
        return replies.unsupported_option(param.partition(b"=")[0].upper())
    return address
