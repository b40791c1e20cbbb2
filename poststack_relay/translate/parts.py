# -*- test-case-name: tests.test_translate,tests.test_mime_corpus -*-
"""
Reading one parsed MIME part: its structural headers (8-bit values
repaired), the parameters of C{Content-Type}/C{Content-Disposition}
(RFC 2231 included), and its content with the transfer encoding undone
(C{message/*} parts written back out first).
"""

from __future__ import annotations

import binascii
import re
from email.message import Message
from typing import Final

from .decoding import b64decode_lenient, decode_bytes, raw_header_text
from .parse import Part


_NEWLINE: Final = re.compile(r"\r?\n")


def structural_header(part: Message, name: str) -> str | None:
    """
    Return a MIME header of a part as text, repairing 8-bit values in place.

    compat32 returns a ``Header`` object for values holding raw 8-bit bytes;
    such a value is decoded (UTF-8, else ISO-8859-1) and written back, so
    that ``get_param`` then sees real text (e.g. a raw UTF-8 filename).
    """
    value = part.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        for raw_name, raw_value in part.raw_items():
            if raw_name.lower() == name:
                text = raw_header_text(raw_value)
                part.replace_header(name, text)
                return text
        return str(value)  # pragma: no cover - get() found it, so did raw_items()
    return value


def header_params(part: Message, header: str) -> dict[str, str]:
    """
    The parameters of a Content-Type/-Disposition header, parsed once.

    Names are lowercased; RFC 2231 values (also continued ones) are decoded
    with their declared charset; the first of repeated names wins.
    """
    try:
        params = part.get_params(None, header)
    except (ValueError, IndexError, TypeError, LookupError, UnicodeError):
        return {}
    result: dict[str, str] = {}
    for key, value in (params or [])[1:]:
        key = str(key).lower()
        if key in result:
            continue
        if isinstance(value, tuple):  # RFC 2231: (charset, language, value)
            charset, _language, text = value
            text = str(text)
            try:
                raw = text.encode("latin-1")
            except UnicodeEncodeError:
                result[key] = text
                continue
            result[key] = decode_bytes(raw, str(charset) if charset else None)
        else:
            result[key] = str(value)
    return result


def _flatten(part: Message, out: list[bytes]) -> None:
    """
    Write a parsed (sub)message back out as bytes, as close to the received
    bytes as the parser allows: original header folding, original body bytes.

    Used for message/rfc822 attachments, which the parser has split up.  (The
    stdlib generator is not used: on hostile input it re-decodes 8-bit
    payloads through their declared charset and can raise.)
    """
    for name, value in part.raw_items():
        text = _NEWLINE.sub("\r\n", value if isinstance(value, str) else str(value))
        out.append(f"{name}: {text}\r\n".encode("utf-8", "surrogateescape"))
    out.append(b"\r\n")
    if not part.is_multipart():
        if isinstance(part, Part):
            out.append(part.payload_bytes())
        return
    children = [child for child in part.get_payload() if isinstance(child, Message)]
    if part.get_content_maintype() == "message":
        for child in children:
            _flatten(child, out)
        return
    boundary = part.get_boundary() or "=_poststack-relay"
    delimiter = f"--{boundary}".encode("utf-8", "surrogateescape")
    if part.preamble is not None:
        out.append(part.preamble.encode("utf-8", "surrogateescape") + b"\r\n")
    for child in children:
        out.append(delimiter + b"\r\n")
        _flatten(child, out)
        out.append(b"\r\n")
    out.append(delimiter + b"--")
    if part.epilogue is not None:
        out.append(b"\r\n" + part.epilogue.encode("utf-8", "surrogateescape"))


def content_type(part: Message) -> str:
    """
    The part's content type, as C{Message.get_content_type} gives it (the
    default type without a C{Content-Type}; C{text/plain} for one that is
    not C{type/subtype}), with one header lookup and the header's 8-bit
    value repaired (L{structural_header}).
    """
    value = structural_header(part, "content-type")
    if value is None:
        return part.get_default_type()
    ctype = value.partition(";")[0].strip().lower()
    return ctype if ctype.count("/") == 1 else "text/plain"


def transfer_encoding(part: Message) -> str:
    """The part's Content-Transfer-Encoding, trimmed and lowercased (C{""} if none)."""
    return str(part.get("content-transfer-encoding", "")).strip().lower()


def transfer_decoded(part: Message, encoding: str | None = None) -> bytes:
    """
    The bytes of a leaf part, undoing its Content-Transfer-Encoding
    (C{encoding}, from L{transfer_encoding}, when the caller has it).
    """
    if part.is_multipart():  # message/*: the parser split it up, rebuild it
        chunks: list[bytes] = []
        for inner in part.get_payload():
            if isinstance(inner, Message):
                _flatten(inner, chunks)
        data = b"".join(chunks)
    elif isinstance(part, Part):
        data = part.payload_bytes()
    else:  # pragma: no cover - every part comes from the parser
        data = b""
    if encoding is None:
        encoding = transfer_encoding(part)
    if encoding == "base64":
        return b64decode_lenient(data)
    if encoding == "quoted-printable":
        return binascii.a2b_qp(data)
    return data
