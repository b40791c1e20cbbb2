# -*- test-case-name: tests.test_translate,tests.test_mime_corpus -*-
"""
The walk over the MIME tree: the first text/plain and text/html leaves
that are not attachments become the bodies (format=flowed undone); every
other leaf becomes an attachment, except alternative renderings and
detached signatures, which are dropped.
"""

from __future__ import annotations

import re
from email.message import Message
from typing import Final

import attrs

from .attachments import attachment, part_filename
from .decoding import decode_bytes
from .parts import content_type, header_params, structural_header, transfer_decoded, transfer_encoding


_LINE_BREAK: Final = re.compile("\r+\n")
"""CRLF, and the CR CR LF of the Ruby mail gem 2.7, whose quoted-printable
writes each CRLF's CR as C{=0D} before the hard line break: one LF each."""

# RFC 6838 section 4.2: type and subtype names of at most 127 characters.
_CONTENT_TYPE: Final = re.compile(
    r"[a-z0-9!#$&^_.+-]{1,127}/[a-z0-9!#$&^_.+-]{1,127}"
)

# The detached signature part of a multipart/signed (RFC 1847): S/MIME
# (RFC 8551, with the pre-standard x- spelling) and OpenPGP (RFC 3156).  It
# signs the exact bytes of the first part, which the API's rebuilt message
# never reproduces, so it is dropped rather than sent as an attachment that
# can only ever fail to verify.
_SIGNATURE_TYPES: Final = frozenset(
    {
        "application/pkcs7-signature",
        "application/x-pkcs7-signature",
        "application/pgp-signature",
    }
)


def _unflow(text: str, delsp: bool) -> str:
    """
    Undo RFC 3676 format=flowed soft line breaks.

    A line ending in a space continues on the next line of the same quote
    depth; a leading space is space-stuffing; ``"-- "`` (the signature
    separator) is never flowed.  With DelSp=yes the trailing space of a
    flowed line belongs to the encoding and is removed.
    """
    out: list[str] = []
    pending: list[str] | None = None
    pending_depth = 0
    for line in text.split("\n"):
        stripped = line.lstrip(">")
        depth = len(line) - len(stripped)
        if stripped.startswith(" "):
            stripped = stripped[1:]
        if pending is not None and depth != pending_depth:
            out.append(_quoted(pending_depth, "".join(pending)))
            pending = None
        flowed = stripped.endswith(" ") and stripped != "-- "
        if flowed:
            piece = stripped[:-1] if delsp else stripped
            if pending is None:
                pending, pending_depth = [piece], depth
            else:
                pending.append(piece)
            continue
        if pending is not None:
            pending.append(stripped)
            out.append(_quoted(depth, "".join(pending)))
            pending = None
        else:
            out.append(_quoted(depth, stripped))
    if pending is not None:
        out.append(_quoted(pending_depth, "".join(pending)))
    return "\n".join(out)


def _quoted(depth: int, content: str) -> str:
    """Rebuild a quoted line: quote markers, then one space, then content."""
    if not depth:
        return content
    return ">" * depth + (" " + content if content else "")


def _body_text(
    part: Message, ctype: str, params: dict[str, str], whole_message: bool
) -> str:
    """
    Decode a text/plain or text/html body part to text with LF newlines.

    In a single-part message (``whole_message``) the line break that ends
    the last line of DATA is SMTP framing, not content (nodemailer and
    smtplib add it to ``html: '<p>x</p>'``); it is removed, as the MIME
    parser removes the one before a boundary in multipart messages.  Base64
    content is exempt: its framing line break is outside the decoded data.
    """
    encoding = transfer_encoding(part)
    text = decode_bytes(transfer_decoded(part, encoding), params.get("charset") or "us-ascii")
    if "\r" in text:
        text = _LINE_BREAK.sub("\n", text)
    if (
        whole_message
        and text.endswith("\n")
        and encoding != "base64"
    ):
        text = text[:-1]
    if (
        ctype == "text/plain"
        and params.get("format", "").strip().lower() == "flowed"
    ):
        delsp = params.get("delsp", "").strip().lower() == "yes"
        text = _unflow(text, delsp)
    return text


@attrs.define
class _Body:
    """What the walk over the MIME tree collects."""

    text: str | None = None
    html: str | None = None
    attachments: list[dict[str, str]] = attrs.field(factory=list)


def _is_signature(part: Message) -> bool:
    """Whether a part of a multipart/signed is its detached signature."""
    return content_type(part) in _SIGNATURE_TYPES


def walk(root: Message) -> _Body:
    """
    Collect the text body, the html body and the attachments, in order.

    The first text/plain and the first text/html leaf that are not
    attachments are the bodies; any other leaf is an attachment, except
    alternative renderings (text/* other than plain, html and calendar
    directly inside multipart/alternative, e.g. AMP or watch-html) and the
    detached signature of a multipart/signed (after its first part), which
    are dropped.
    """
    body = _Body()
    stack: list[tuple[Message, bool]] = [(root, False)]
    while stack:
        part, in_alternative = stack.pop()
        ctype = content_type(part)
        main_type = ctype.partition("/")[0]
        if main_type == "multipart" and part.is_multipart():
            alternative = ctype == "multipart/alternative"
            children = [c for c in part.get_payload() if isinstance(c, Message)]
            if ctype == "multipart/signed":
                children[1:] = [c for c in children[1:] if not _is_signature(c)]
            stack.extend((child, alternative) for child in reversed(children))
            continue
        if main_type == "multipart":
            # A multipart without a usable boundary: its body is plain text.
            ctype = "text/plain"
        elif _CONTENT_TYPE.fullmatch(ctype) is None:
            ctype = "application/octet-stream"
        type_params = header_params(part, "content-type")
        disposition = structural_header(part, "content-disposition")
        if disposition is None:
            filename = part_filename(type_params, {})
            is_attachment = bool(filename)
        else:
            filename = part_filename(type_params, header_params(part, "content-disposition"))
            is_attachment = bool(filename) or (
                disposition.partition(";")[0].strip().lower() == "attachment"
            )
        if not is_attachment:
            if ctype == "text/plain" and body.text is None:
                body.text = _body_text(part, ctype, type_params, part is root)
                continue
            if ctype == "text/html" and body.html is None:
                body.html = _body_text(part, ctype, type_params, part is root)
                continue
            if (
                in_alternative
                and ctype.startswith("text/")
                and ctype not in ("text/plain", "text/html", "text/calendar")
            ):
                continue
        body.attachments.append(
            attachment(
                part, ctype, type_params, filename, len(body.attachments) + 1
            )
        )
    return body
