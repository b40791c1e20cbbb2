# -*- test-case-name: tests.test_sandbox -*-
"""
The request rules of the sandbox: what a C{POST /emails} body must look
like (fields, types, addresses, base64, headers), how a JSON body is read,
how query numbers are checked, and the canonical body fingerprint that
idempotency compares. Each refusal is an L{ApiError}, C{400
invalid_request} with a message naming the field, or C{413} for a body over
the limit, as C{docs/sandbox.md} lists them.

Addresses follow the relay's contract for international mail
(C{docs/mime-mapping.md}, "International addresses"): a local part may be
UTF-8, a domain must be ASCII, an internationalized one written as IDNA
2008 A-labels (C{xn--}) that decode (L{domain_problem}); display names
are Unicode.  The rule is written here again, not imported from the
relay: the sandbox stands for the API and checks what the relay sends.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from datetime import datetime
from typing import Any, Mapping, NoReturn

import attrs
import idna

from .exchange import ApiError, invalid

_ADDRESS = re.compile(
    r"\s*(?:(?P<name>[^<>]*?)\s*<(?P<bracketed>[^<>\s]+)>|(?P<bare>[^<>\s]+))\s*"
)
_DOMAIN = re.compile(r"[^\s.@<>\"]+(?:\.[^\s.@<>\"]+)*")
_HEADER_NAME = re.compile(r"[!-9;-~]+")


def parse_address(value: str) -> str | None:
    """
    Return the bare address in C{"Name <local@domain>"} or C{local@domain},
    or L{None} if C{value} is not of that shape.
    """
    match = _ADDRESS.fullmatch(value)
    if match is None:
        return None
    address = match.group("bracketed") or match.group("bare")
    local, at, domain = address.rpartition("@")
    if not at or not local or _DOMAIN.fullmatch(domain) is None:
        return None
    return address


def domain_problem(domain: str) -> str | None:
    """
    Why the domain of an address is not in the form the API takes, or
    L{None}: it must be ASCII (an internationalized domain as A-labels),
    and each C{xn--} label must be a valid IDNA 2008 A-label.
    """
    if not domain.isascii():
        return (
            f"has a non-ASCII domain {domain!r}: send an internationalized domain"
            " as IDNA 2008 A-labels (xn--)"
        )
    for label in domain.split("."):
        if label[:4].lower() == "xn--":
            try:
                idna.ulabel(label)
            except (idna.IDNAError, UnicodeError, ValueError):
                return f"has an invalid A-label {label!r} (IDNA 2008)"
    return None


def a_label_domain(name: str) -> str | None:
    """
    A domain name of the data file in the form requests use: lowercased
    ASCII, a U-label as its IDNA 2008 A-label (C{bücher.example} ->
    C{xn--bcher-kva.example}); L{None} if it has none.
    """
    if name.isascii():
        return name.lower()
    try:
        return idna.encode(name, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return None


def _checked_address(value: str, name: str) -> str:
    """The bare address of C{value}; an L{ApiError} naming C{name} if it is not valid."""
    address = parse_address(value)
    if address is None:
        raise invalid(f"'{name}' is not a valid email address")
    problem = domain_problem(address.rpartition("@")[2])
    if problem is not None:
        raise invalid(f"'{name}' {problem}")
    return address


def _optional_string(payload: Mapping[str, Any], name: str) -> str | None:
    value = payload.get(name)
    if value is not None and not isinstance(value, str):
        raise invalid(f"'{name}' must be a string")
    return value


def _address_list(
    payload: Mapping[str, Any], name: str, required: bool
) -> list[str]:
    value = payload.get(name)
    if value is None:
        if required:
            raise invalid(f"'{name}' is required")
        return []
    if not isinstance(value, list):
        raise invalid(f"'{name}' must be a list of email addresses")
    if required and not value:
        raise invalid(f"'{name}' must contain at least one address")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise invalid(f"'{name}[{i}]' is not a valid email address")
        _checked_address(item, f"{name}[{i}]")
    return value


def canonical_fingerprint(payload: Mapping[str, Any]) -> str:
    """
    Digest of the request body with keys sorted and C{idempotency_key}
    removed: two bodies that differ only in key order or whitespace match.
    """
    canonical = {k: v for k, v in payload.items() if k != "idempotency_key"}
    encoded = json.dumps(
        canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


@attrs.frozen
class ValidEmail:
    """The facts of a validated C{POST /emails} body the handler needs."""

    sender_domain: str
    template_id: str | None


def validate_email(payload: Mapping[str, Any]) -> ValidEmail:
    """
    Check the shape of a C{POST /emails} body (the 400 rules).

    @raise ApiError: C{400 invalid_request} naming the first bad field.
    """
    sender = payload.get("from")
    if sender is None:
        raise invalid("'from' is required")
    if not isinstance(sender, str):
        raise invalid("'from' must be a string")
    sender_address = _checked_address(sender, "from")
    _address_list(payload, "to", required=True)
    _address_list(payload, "cc", required=False)
    _address_list(payload, "bcc", required=False)
    reply_to = _optional_string(payload, "reply_to")
    if reply_to is not None:
        _checked_address(reply_to, "reply_to")

    template_id = _optional_string(payload, "template_id")
    if template_id is not None and not template_id:
        raise invalid("'template_id' must not be empty")
    subject = _optional_string(payload, "subject")
    html = _optional_string(payload, "html")
    text = _optional_string(payload, "text")
    if template_id is None:
        if subject is None:
            raise invalid("'subject' is required unless 'template_id' is given")
        if not html and not text:
            raise invalid(
                "'html' or 'text' is required unless 'template_id' is given"
            )

    variables = payload.get("variables")
    if variables is not None and not isinstance(variables, dict):
        raise invalid("'variables' must be an object")

    tags = payload.get("tags")
    if tags is not None and (
        not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)
    ):
        raise invalid("'tags' must be a list of strings")

    headers = payload.get("headers")
    if headers is not None:
        if not isinstance(headers, dict):
            raise invalid("'headers' must be an object of strings")
        for name, value in headers.items():
            if not isinstance(value, str):
                raise invalid(f"'headers.{name}' must be a string")
            if _HEADER_NAME.fullmatch(name) is None:
                raise invalid(f"'headers' has an invalid header name {name!r}")
            if "\r" in value or "\n" in value:
                raise invalid(f"'headers.{name}' must not contain line breaks")

    attachments = payload.get("attachments")
    if attachments is not None:
        if not isinstance(attachments, list):
            raise invalid("'attachments' must be a list")
        for i, attachment in enumerate(attachments):
            where = f"attachments[{i}]"
            if not isinstance(attachment, dict):
                raise invalid(f"'{where}' must be an object")
            filename = attachment.get("filename")
            if not isinstance(filename, str) or not filename:
                raise invalid(f"'{where}.filename' is required")
            content = attachment.get("content")
            if not isinstance(content, str):
                raise invalid(f"'{where}.content' is required (base64)")
            try:
                base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError):
                raise invalid(f"'{where}.content' is not valid base64") from None
            content_type = attachment.get("content_type")
            if content_type is not None and (
                not isinstance(content_type, str) or "/" not in content_type
            ):
                raise invalid(f"'{where}.content_type' must be a MIME type")

    idempotency_key = payload.get("idempotency_key")
    if idempotency_key is not None and (
        not isinstance(idempotency_key, str) or not idempotency_key
    ):
        raise invalid("'idempotency_key' must be a non-empty string")

    scheduled_at = _optional_string(payload, "scheduled_at")
    if scheduled_at is not None:
        try:
            datetime.fromisoformat(scheduled_at)
        except ValueError:
            raise invalid("'scheduled_at' must be an ISO 8601 date-time") from None

    unsubscribe = payload.get("unsubscribe")
    if unsubscribe is not None and not isinstance(unsubscribe, bool):
        raise invalid("'unsubscribe' must be true or false")

    return ValidEmail(
        sender_domain=sender_address.rpartition("@")[2].lower(),
        template_id=template_id,
    )

def json_object(body: bytes | None, body_size: int, limit: int) -> dict[str, Any]:
    """
    The request body as a JSON object.

    @param body: The body, or L{None} if it was over C{limit} bytes.
    @raise ApiError: C{413 payload_too_large} for a body over the limit;
        C{400 invalid_request} for a body that is not UTF-8 JSON (NaN and
        Infinity refused) or not a JSON object.
    """
    if body is None:
        raise ApiError(
            413,
            "payload_too_large",
            f"Request body is {body_size} bytes; the limit is {limit}",
        )
    try:
        document = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nested too deep
        raise invalid("Request body must be valid JSON") from None
    if not isinstance(document, dict):
        raise invalid("Request body must be a JSON object")
    return document


def query_int(raw: str | None, name: str, default: int, low: int, high: int) -> int:
    """
    The query parameter C{name} (its text C{raw}, L{None} if absent) as an
    integer from C{low} to C{high}.

    @raise ApiError: C{400 invalid_request} if it is not such an integer.
    """
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise invalid(f"'{name}' must be an integer from {low} to {high}")
    return value
