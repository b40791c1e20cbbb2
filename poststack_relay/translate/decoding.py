# -*- test-case-name: tests.test_translate,tests.test_translate_hostile,tests.test_policy -*-
"""
Text from the wire: charset labels mapped to codecs (as mail clients mean
them), lenient byte decoding, raw header values, the one RFC 2047 decoder
(L{decode_words}, used for every header the relay reads, the sender
policy's C{From} and C{Sender} included), and header text cleaning.
"""

from __future__ import annotations

import binascii
import codecs
import functools
import re
from typing import Final


_ENCODED_WORD: Final = re.compile(r"=\?([^?\s]*)\?([bBqQ])\?([^?]*)\?=")

# Control characters: C0 but TAB, DEL, C1, and the Unicode line and paragraph
# separators.  Of these, the ones str.splitlines() breaks lines at become a
# space in header values (a consumer splitting lines must never see a new
# header); the others are removed.
_CONTROLS: Final = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_LINE_BREAKING: Final = re.compile("[\n\x0b\x0c\r\x1c-\x1e\x85\u2028\u2029]+")
_OTHER_CONTROLS: Final = re.compile("[\x00-\x08\x0e-\x1b\x1f\x7f-\x84\x86-\x9f]+")
_SURROGATES: Final = re.compile("[\\ud800-\\udfff]")
_BASE64_JUNK: Final = re.compile(rb"[^A-Za-z0-9+/]+")

# Charset labels mapped to the codec that real senders mean by them: the
# Windows or modern superset of the declared charset, as the WHATWG Encoding
# Standard (and so every browser and most mail clients) does.  E.g. mail
# labelled iso-8859-1 with bytes 0x80-0x9F means windows-1252 quotes and
# the euro sign, not C1 control characters.
_CHARSET_ALIASES: Final[dict[str, str]] = {
    "iso-8859-1": "cp1252",
    "iso8859-1": "cp1252",
    "iso_8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "euc-cn": "gb18030",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "ms_kanji": "cp932",
    "tis-620": "cp874",
    "unicode-1-1-utf-7": "utf-7",
}

# Codecs never used for mail text: slow pure-Python decoders (punycode is
# quadratic), escape decoders, and codecs that cannot decode at all.
_REFUSED_CODECS: Final = frozenset(
    {
        "idna",
        "punycode",
        "raw-unicode-escape",
        "raw_unicode_escape",
        "unicode-escape",
        "unicode_escape",
        "undefined",
        "mbcs",
        "oem",
        "charmap",
    }
)

# Codecs whose strict decoding can never produce a lone surrogate.
_SURROGATE_FREE_CODECS: Final = frozenset({"utf-8", "ascii", "latin-1", "cp1252"})


@functools.lru_cache(maxsize=256)
def _codec(charset: str) -> str | None:
    """
    Map a MIME charset label to a Python text codec name.

    Returns ``None`` for an unknown, refused or non-text codec.
    """
    label = charset.strip().strip("\"'").lower()
    star = label.find("*")
    if star >= 0:  # RFC 2231 language suffix inside an encoded-word
        label = label[:star]
    if not label or len(label) > 40:
        return None
    label = _CHARSET_ALIASES.get(label, label)
    try:
        name = codecs.lookup(label).name
        b"".decode(name)  # LookupError for bytes-to-bytes codecs (base64, ...)
    except (LookupError, ValueError, TypeError, UnicodeError):
        return None
    if name in _REFUSED_CODECS:
        return None
    return name


def utf8_safe(text: str) -> str:
    """Replace lone surrogates, which cannot be encoded as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATES.sub("\ufffd", text)
    return text


def decode_bytes(data: bytes, charset: str | None) -> str:
    """
    Decode text bytes leniently; never raises.

    The declared charset is tried strictly first, then UTF-8 strictly (many
    senders mislabel UTF-8), then the declared charset with replacement
    characters, or ISO-8859-1 when the declared charset is unknown or ASCII.
    """
    codec = _codec(charset) if charset else None
    if codec is not None:
        try:
            text = data.decode(codec)
        except (UnicodeError, LookupError, ValueError, TypeError):
            pass
        else:
            if codec in _SURROGATE_FREE_CODECS:
                return text
            return utf8_safe(text)
    if codec != "utf-8":
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass
    if codec is not None and codec != "ascii":
        try:
            return utf8_safe(data.decode(codec, "replace"))
        except (UnicodeError, LookupError, ValueError, TypeError):
            pass
    return data.decode("latin-1")


def b64decode_lenient(data: bytes) -> bytes:
    """Decode base64 leniently: junk is skipped and padding is repaired."""
    try:
        return binascii.a2b_base64(data)
    except binascii.Error:
        pass
    cleaned = _BASE64_JUNK.sub(b"", data)
    extra = len(cleaned) % 4
    if extra == 1:  # a lone trailing character carries no full byte
        cleaned = cleaned[:-1]
    elif extra:
        cleaned += b"=" * (4 - extra)
    try:
        return binascii.a2b_base64(cleaned)
    except binascii.Error:  # pragma: no cover - cleaned input always decodes
        return b""


def _windows_1252_table() -> dict[int, str]:
    """
    Map ISO-8859-1 code points to windows-1252 characters (WHATWG): the
    five bytes windows-1252 leaves undefined keep their C1 code points.
    """
    table: dict[int, str] = {}
    for byte in range(0x80, 0xA0):
        try:
            table[byte] = bytes([byte]).decode("cp1252")
        except UnicodeDecodeError:
            pass
    return table


_WINDOWS_1252: Final = _windows_1252_table()


def raw_header_text(value: object) -> str:
    """
    Turn a raw header value from the compat32 parser into text.

    The parser keeps 8-bit bytes as surrogate escapes; they are decoded as
    UTF-8 (RFC 6532), else as windows-1252 (which never fails: its five
    undefined bytes become C1 controls, which header cleaning removes).
    The value is unfolded.
    """
    text = value if isinstance(value, str) else str(value)
    if not text.isascii():
        raw = text.encode("utf-8", "surrogateescape")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1").translate(_WINDOWS_1252)
    if "\r" in text or "\n" in text:
        text = text.replace("\r", "").replace("\n", "")
    return text


def words_decodable(text: str) -> bool:
    """
    Does every encoded-word of C{text} name a charset the relay knows (or
    none, which every reader takes as ASCII)?

    The address parser decodes a whole field (addresses included, as
    Python's legacy email API writes them) only then.  A word in a charset
    no reader can decode stays as it is, as the stdlib leaves it: so the
    sender policy never accepts an address that only the relay's lenient
    decoding finds (C{=?x-unknown?q?=3C?=alice@example.com} reads as the
    address C{=?x-unknown?q?=3C?=alice@example.com} to everyone else).
    """
    for match in _ENCODED_WORD.finditer(text):
        if match.group(1) and _codec(match.group(1)) is None:
            return False
    return True


def decode_words(text: str) -> str:
    """
    Decode RFC 2047 encoded-words leniently.

    Adjacent encoded-words separated only by whitespace are joined, and
    consecutive words in the same charset are decoded together, so that a
    multi-byte character split over two words survives.
    """
    if "=?" not in text:
        return text
    out: list[str] = []
    pending = bytearray()
    pending_charset: str | None = None
    position = 0
    for match in _ENCODED_WORD.finditer(text):
        between = text[position : match.start()]
        if pending_charset is None or between.strip(" \t"):
            if pending_charset is not None:
                out.append(decode_bytes(bytes(pending), pending_charset))
                pending.clear()
                pending_charset = None
            out.append(between)
        charset, encoding, encoded = match.groups()
        if encoding in "bB":
            chunk = b64decode_lenient(encoded.encode("ascii", "ignore"))
        else:
            chunk = binascii.a2b_qp(
                encoded.encode("utf-8", "surrogateescape"), header=True
            )
        charset = charset.lower()
        if pending_charset is not None and charset != pending_charset:
            out.append(decode_bytes(bytes(pending), pending_charset))
            pending.clear()
        pending_charset = charset
        pending += chunk
        position = match.end()
    if pending_charset is not None:
        out.append(decode_bytes(bytes(pending), pending_charset))
    out.append(text[position:])
    return "".join(out)


def clean(text: str) -> str:
    """
    Make text safe as a header value: no CR, LF, NUL or other controls.

    Every character ``str.splitlines()`` breaks at (CR, LF, VT, FF, FS, GS,
    RS, NEL, U+2028, U+2029) becomes one space, other C0 and C1 controls
    and DEL are removed; TAB is kept.
    """
    if _CONTROLS.search(text) is None:
        return text
    text = _LINE_BREAKING.sub(" ", text)
    return _OTHER_CONTROLS.sub("", text)


def unstructured(raw: object) -> str:
    """Unfold, decode RFC 2047 and sanitize an unstructured header value."""
    return clean(decode_words(raw_header_text(raw))).strip()
