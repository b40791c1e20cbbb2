# -*- test-case-name: tests.test_translate,tests.test_mime_corpus,tests.test_translate_hostile -*-
"""
One API attachment object from one MIME leaf: its filename (decoded,
sanitized, shortened), its content type, and its content as one line of
base64 (passed through without a decode when it already is canonical).
"""

from __future__ import annotations

import base64
import functools
import mimetypes
import re
from email.message import Message
from typing import Final

from .decoding import clean, decode_words
from .parse import Part
from .parts import transfer_decoded, transfer_encoding


#: Longest attachment filename, in characters (longer ones are shortened).
MAX_FILENAME_LENGTH: Final = 255
_CLEAN_SLICE: Final = 256 * 1024
_MIMETYPES: Final = mimetypes.MimeTypes()
_TOKEN: Final = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+")
_EXTENSION_OVERRIDES: Final[dict[str, str]] = {
    "text/calendar": ".ics",
    "application/ics": ".ics",
    "message/rfc822": ".eml",
    "message/global": ".eml",
    "text/plain": ".txt",
    "application/octet-stream": ".bin",
    "image/jpeg": ".jpg",
}


def part_filename(
    type_params: dict[str, str], disposition_params: dict[str, str]
) -> str | None:
    """The decoded, sanitized filename of a part; ``None`` when it has none."""
    value = disposition_params.get("filename")
    if value is None:
        value = type_params.get("name")
        if value is None:
            return None
    value = clean(decode_words(value)).strip()
    # Keep the last path component only: "C:\\x\\a.pdf" -> "a.pdf".
    value = value.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if value in (".", ".."):
        return ""
    if len(value) > MAX_FILENAME_LENGTH:
        # Shorten the stem and keep a short extension, so the type stays
        # recognisable: "aaaa…aaaa.pdf" -> 255 characters ending in ".pdf".
        stem, dot, extension = value.rpartition(".")
        if dot and stem and 0 < len(extension) <= 16:
            keep = MAX_FILENAME_LENGTH - len(extension) - 1
            value = stem[:keep].rstrip() + "." + extension
        else:
            value = value[:MAX_FILENAME_LENGTH].rstrip()
    return value


def _extension(content_type: str) -> str:
    """A filename extension for a content type (``.bin`` when unknown)."""
    extension = _EXTENSION_OVERRIDES.get(content_type)
    if extension is None:
        extension = _guess_extension(content_type)
    return extension


@functools.lru_cache(maxsize=128)
def _guess_extension(content_type: str) -> str:
    """Ask the built-in (machine-independent) mimetypes table, once per type."""
    return _MIMETYPES.guess_extension(content_type, strict=False) or ".bin"


def attachment(
    part: Message,
    content_type: str,
    params: dict[str, str],
    filename: str | None,
    index: int,
) -> dict[str, str]:
    """Build one API attachment object from a leaf part."""
    full_type = content_type
    if content_type.startswith("text/"):
        charset = params.get("charset", "").strip()
        if charset and len(charset) <= 64 and _TOKEN.fullmatch(charset):
            full_type += f"; charset={charset}"
        if content_type == "text/calendar":
            method = params.get("method", "").strip()
            if method and len(method) <= 64 and _TOKEN.fullmatch(method):
                full_type += f"; method={method.upper()}"
    if not filename:
        filename = f"attachment-{index}{_extension(content_type)}"
    return {
        "filename": filename,
        "content": _attachment_base64(part),
        "content_type": full_type,
    }


_BASE64_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

# The characters that may precede "=" (2 unused bits) and "==" (4 unused
# bits) in canonical base64: those whose unused low bits are zero.
_CANONICAL_LAST: Final[dict[int, frozenset[bytes]]] = {
    1: frozenset(_BASE64_ALPHABET[i : i + 1] for i in range(0, 64, 4)),
    2: frozenset(_BASE64_ALPHABET[i : i + 1] for i in range(0, 64, 16)),
}


def _is_strict_base64(data: bytes | bytearray) -> bool:
    """
    Is C{data} canonical one-line base64 (alphabet, length a multiple of
    4, padding only at the end)?  Checked without a regular expression or a
    decode, and a slice at a time (translate() allocates the full length of
    what it is given), so a 25 MB attachment costs no extra copy.
    """
    if len(data) % 4:
        return False
    pad = 2 if data.endswith(b"==") else 1 if data.endswith(b"=") else 0
    if pad and bytes(data[-pad - 1 : -pad]) not in _CANONICAL_LAST[pad]:
        # The bits after the last full byte must be zero, or strict
        # decoders (e.g. Go's Strict, Rust's base64 crate) refuse it.
        return False
    if data.count(b"=") != pad:
        return False
    body = len(data) - pad
    return not any(
        data[i : min(i + _CLEAN_SLICE, body)].translate(None, _BASE64_ALPHABET)
        for i in range(0, body, _CLEAN_SLICE)
    )


def _attachment_base64(part: Message) -> str:
    """
    The part's content as one line of base64.

    A part that is already valid base64 is passed on with its line breaks
    removed instead of being decoded and encoded again: for a 25 MB
    attachment that saves two full-size copies.
    """
    encoding = transfer_encoding(part)
    if isinstance(part, Part) and not part.is_multipart() and encoding == "base64":
        payload = part._payload
        cleaned: bytes | bytearray
        if isinstance(payload, str) and payload.isascii() and len(payload) > _CLEAN_SLICE:
            # A large body is cleaned a slice at a time, and the part lets
            # go of its text before the result is decoded: at most three
            # copies of the attachment are alive at once (the message, the
            # payload or the result, and the cleaned bytes), not five.  The
            # tree is translate()'s own and this part is not read again.
            # Allocated once at the most it can need: growing it step by
            # step could copy it (old and new size alive at once).
            cleaned = bytearray(len(payload))
            end = 0
            for i in range(0, len(payload), _CLEAN_SLICE):
                piece = payload[i : i + _CLEAN_SLICE].encode("ascii").translate(None, b"\r\n\t ")
                cleaned[end : end + len(piece)] = piece
                end += len(piece)
            del cleaned[end:]
            if not _is_strict_base64(cleaned):
                return base64.b64encode(transfer_decoded(part, encoding)).decode("ascii")
            del payload
            part._payload = ""
            return cleaned.decode("ascii")
        cleaned = part.payload_bytes().translate(None, b"\r\n\t ")
        if _is_strict_base64(cleaned):
            return cleaned.decode("ascii")
    return base64.b64encode(transfer_decoded(part, encoding)).decode("ascii")
