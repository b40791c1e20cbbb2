# -*- test-case-name: tests.test_translate,tests.test_mime_corpus -*-
"""
Translate one SMTP message (raw MIME bytes plus its envelope) into the JSON
body of one ``POST /emails`` call.

This module is pure: it imports nothing from Twisted, does no I/O and keeps no
state between calls.  :func:`translate` either returns an :class:`EmailRequest`
or raises :class:`TranslationError`, which carries the complete SMTP reply
(code, enhanced code, text) the relay must give to the client.

The mapping rules, and the reasons for each choice, are written down in
``docs/mime-mapping.md``.

Speed matters (this runs once per message, possibly on the reactor thread),
so the message is parsed with the stdlib ``compat32`` policy, an order of
magnitude cheaper than ``email.policy.default``, and header values are
decoded here with small precompiled helpers.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import json
import mimetypes
import re
import secrets
from collections.abc import Iterable
from email.message import Message
from email.feedparser import BytesFeedParser
from email.policy import compat32
from email.utils import getaddresses
from typing import Any, Final

import attrs

from . import policy, replies
from .addresses import bare_address, header_address_problem, is_header_address
from .replies import Reply

__all__ = [
    "MAX_FILENAME_LENGTH",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_FIELDS",
    "MAX_ID_LENGTH",
    "MAX_MIME_DEPTH",
    "MAX_MIME_PARTS",
    "MAX_PASSED_HEADERS",
    "MAX_PASSED_HEADER_OCTETS",
    "MAX_TAGS",
    "MAX_TAG_LENGTH",
    "MAX_VARIABLES_DEPTH",
    "EmailRequest",
    "Envelope",
    "TranslationError",
    "translate",
]

#: Deepest allowed nesting of MIME containers (multipart/* and message/*).
MAX_MIME_DEPTH: Final = 20

#: Largest allowed number of MIME parts (containers and leaves) in a message.
MAX_MIME_PARTS: Final = 1000

#: Deepest allowed nesting of objects and arrays in X-PostStack-Variables.
MAX_VARIABLES_DEPTH: Final = 32

#: Most header fields allowed in the message's (top-level) header section.
MAX_HEADER_FIELDS: Final = 1000

#: Largest allowed (top-level) header section, in octets, line breaks included.
MAX_HEADER_BYTES: Final = 1024 * 1024

#: Most distinct headers passed on to the API in ``payload["headers"]``.
MAX_PASSED_HEADERS: Final = 100

#: Longest value (UTF-8 octets, after unfolding and joining) of a header
#: passed on; the RFC 5322 line-length limit.
MAX_PASSED_HEADER_OCTETS: Final = 998

#: Most distinct tags in X-PostStack-Tags (all such headers together).
MAX_TAGS: Final = 50

#: Longest tag, in characters.
MAX_TAG_LENGTH: Final = 256

#: Longest X-PostStack-Template-Id and X-PostStack-Idempotency-Key, in characters.
MAX_ID_LENGTH: Final = 256

#: Longest attachment filename, in characters (longer ones are shortened).
MAX_FILENAME_LENGTH: Final = 255

def _as_tuple(value: Iterable[str]) -> tuple[str, ...]:
    """Freeze any iterable of recipient addresses into a tuple."""
    return tuple(value)


@attrs.frozen
class Envelope:
    """
    The SMTP envelope of one transaction.

    :ivar mail_from: The envelope sender address from ``MAIL FROM``, or
        ``""`` for the null sender ``<>``.
    :ivar rcpt_to: The envelope recipients from ``RCPT TO``, addresses only,
        in the order they were given.
    """

    mail_from: str
    rcpt_to: tuple[str, ...] = attrs.field(converter=_as_tuple)


@attrs.frozen
class EmailRequest:
    """
    One ``POST /emails`` call.

    :ivar payload: The JSON-ready request body.
    :ivar idempotency_key: The idempotency key, or ``None``.  When set it is
        also in ``payload["idempotency_key"]``; the HTTP layer sends it as
        the ``Idempotency-Key`` header.  The translation sets the message's
        own ``X-PostStack-Idempotency-Key``; delivery then decides the key
        of every request it sends (:func:`poststack_relay.idempotency.keyed`),
        so a request that leaves delivery always has one.
    :ivar message_id: The message's ``Message-ID`` (trimmed), or ``None``.
        It is not sent; its presence decides whether a key may be derived
        from the message.
    :ivar idempotency_kind: Where the key comes from: ``"client"``,
        ``"derived"`` or ``"random"`` (the ``IDEMPOTENCY_*`` names of
        :mod:`poststack_relay.idempotency`), or ``None`` when not said.
    """

    payload: dict[str, Any]
    idempotency_key: str | None
    message_id: str | None = None
    idempotency_kind: str | None = None

    @property
    def retry_safe(self) -> bool:
        """
        Would the client's retry of this message carry the same key (its
        own or a derived one), so that it cannot be sent twice?  False
        without a key or with a random one (made for this transaction only).
        """
        return self.idempotency_key is not None and self.idempotency_kind != "random"


class TranslationError(Exception):
    """
    The message cannot be turned into an API call.

    Carries the full SMTP reply to send back for the DATA command.

    :ivar code: The SMTP reply code, e.g. ``554``.
    :ivar enhanced: The RFC 3463 enhanced status code, e.g. ``"5.6.0"``.
    :ivar text: Human-readable ASCII text without CR or LF, saying what to do.
    """

    code: int
    enhanced: str
    text: str

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        """Keep the reply parts; ``text`` is forced to printable ASCII."""
        text = replies.printable(text)
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text

    @classmethod
    def of(cls, reply: Reply) -> TranslationError:
        """The error that answers with ``reply`` (a translation reply of
        :mod:`poststack_relay.replies`)."""
        return cls(reply.code, reply.enhanced, reply.text)

    @property
    def reply(self) -> Reply:
        """The reply for the client: the text on one line of at most 400 characters."""
        return Reply(self.code, self.enhanced, replies.clean_text(self.text))


# ---------------------------------------------------------------------------
# Module-level constants, built once.


class _Part(Message):
    """
    A compat32 message (part) that hands out its payload bytes untouched.

    ``Message.get_payload()`` without ``decode`` re-decodes 8-bit payloads
    with the declared charset (lossy, and it raises on some hostile charset
    parameters), and with ``decode=True`` it applies its own, less lenient
    base64 handling; the relay wants the wire bytes and decodes them itself.
    """

    _payload: Any  # assigned by Message; declared here for type checkers

    def payload_bytes(self) -> bytes:
        """The payload of a leaf part as received (no transfer decoding)."""
        payload = self._payload
        if isinstance(payload, str):
            return payload.encode("utf-8", "surrogateescape")
        if isinstance(payload, bytes):  # pragma: no cover - not from the parser
            return payload
        return b""


_FEED_SLICE: Final = 64 * 1024
# Long runs of base64 lines (see _skeleton): messages this large are
# scanned for runs of at least this many lines.
_RUN_MIN_MESSAGE = 256 * 1024
_RUN_MIN_LINES = 256
_CLEAN_SLICE: Final = 1024 * 1024
_MIMETYPES: Final = mimetypes.MimeTypes()

_ENCODED_WORD: Final = re.compile(r"=\?([^?\s]*)\?([bBqQ])\?([^?]*)\?=")
_NEWLINE: Final = re.compile(r"\r?\n")
# Control characters: C0 but TAB, DEL, C1, and the Unicode line and paragraph
# separators.  Of these, the ones str.splitlines() breaks lines at become a
# space in header values (a consumer splitting lines must never see a new
# header); the others are removed.
_CONTROLS: Final = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_LINE_BREAKING: Final = re.compile("[\n\x0b\x0c\r\x1c-\x1e\x85\u2028\u2029]+")
_OTHER_CONTROLS: Final = re.compile("[\x00-\x08\x0e-\x1b\x1f\x7f-\x84\x86-\x9f]+")
# Control characters refused in X-PostStack-Tags, -Template-Id and
# -Idempotency-Key: any of the above, and TAB.
_ID_CONTROLS: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Control characters refused in X-PostStack-Variables strings (TAB, LF and
# CR are text); NUL also cannot be stored by common databases.
_JSON_CONTROLS: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")
_PRINTABLE_ASCII: Final = re.compile(r"[\x20-\x7e]+")
# The top-level header section as the compat32 feed parser reads it: lines
# (ended by CRLF, CR or LF) that start a field, continue one, or are a
# mbox "From " line.
_HEADER_LINE_START: Final = rb"(?:From |[\x21-\x39\x3b-\x7e]*:|[ \t])"
_HEADER_SECTION: Final = re.compile(
    rb"(?:" + _HEADER_LINE_START + rb"[^\r\n]*+(?:\r\n|\r|\n))*+"
)
_HEADER_LINE: Final = re.compile(_HEADER_LINE_START)
# obs-route (RFC 5322 section 4.4) right after the "<" of an angle-addr.
_OBS_ROUTE: Final = re.compile(r"<[ \t]*@[^<>:\"]*:")
_MSG_ID: Final = re.compile(r"<[^<>]*>")
_SURROGATES: Final = re.compile("[\\ud800-\\udfff]")
_BASE64_JUNK: Final = re.compile(rb"[^A-Za-z0-9+/]+")
_SPECIALS: Final = re.compile(r'[][\\()<>@,:;".]')
_ESCAPES: Final = re.compile(r'([\\"])')
_HEADER_NAME: Final = re.compile(r"[!-9;-~]+")
# RFC 6838 section 4.2: type and subtype names of at most 127 characters.
_CONTENT_TYPE: Final = re.compile(
    r"[a-z0-9!#$&^_.+-]{1,127}/[a-z0-9!#$&^_.+-]{1,127}"
)
_TOKEN: Final = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+")
_BLANKS: Final = re.compile(r"[ \t]+")
_NOT_SIMPLE: Final = re.compile(r'["()\\:;\[\]]')
_SIMPLE_ADDR: Final = r"[^\s<>(),;:\\\"@\[\]]+@[^\s<>(),;:\\\"@\[\]]+"
_SIMPLE_MAILBOX: Final = re.compile(
    rf"[ \t]*(?:([^<>@]*?)[ \t]*<({_SIMPLE_ADDR})>|({_SIMPLE_ADDR}))[ \t]*"
)

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

_EXTENSION_OVERRIDES: Final[dict[str, str]] = {
    "text/calendar": ".ics",
    "application/ics": ".ics",
    "message/rfc822": ".eml",
    "message/global": ".eml",
    "text/plain": ".txt",
    "application/octet-stream": ".bin",
    "image/jpeg": ".jpg",
}

_JSON_KINDS: Final[dict[type, str]] = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}

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

_HEADER_TAGS: Final = "x-poststack-tags"
_HEADER_TEMPLATE: Final = "x-poststack-template-id"
_HEADER_VARIABLES: Final = "x-poststack-variables"
_HEADER_IDEMPOTENCY: Final = "x-poststack-idempotency-key"

# Headers (besides X-*) copied into payload["headers"]: the ones that matter
# to recipients and that the API would not produce itself.  The values of
# structured ones are passed through as written (unfolded, never RFC 2047
# decoded: encoded-words are not allowed in them); unstructured ones are
# decoded like X-* headers.
_PASSED_STRUCTURED: Final = frozenset(
    {
        "in-reply-to",
        "references",
        "list-id",
        "list-unsubscribe",
        "list-unsubscribe-post",
        "list-help",
        "list-subscribe",
        "list-post",
        "list-owner",
        "list-archive",
        "auto-submitted",
        "precedence",
        "importance",
        "priority",
        "sensitivity",
        "disposition-notification-to",
        "thread-index",
        "feedback-id",
    }
)
_PASSED_UNSTRUCTURED: Final = frozenset(
    {"comments", "keywords", "organization", "thread-topic"}
)
# Duplicates of these are joined with a space (they are lists of msg-ids);
# duplicates of every other passed header are joined with ", ".
_SPACE_JOINED: Final = frozenset({"in-reply-to", "references"})


# ---------------------------------------------------------------------------
# Small decoding helpers.


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


def _utf8_safe(text: str) -> str:
    """Replace lone surrogates, which cannot be encoded as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATES.sub("\ufffd", text)
    return text


def _decode_bytes(data: bytes, charset: str | None) -> str:
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
            return _utf8_safe(text)
    if codec != "utf-8":
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass
    if codec is not None and codec != "ascii":
        try:
            return _utf8_safe(data.decode(codec, "replace"))
        except (UnicodeError, LookupError, ValueError, TypeError):
            pass
    return data.decode("latin-1")


def _b64decode(data: bytes) -> bytes:
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


def _raw_header_text(value: object) -> str:
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


def _decode_words(text: str) -> str:
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
                out.append(_decode_bytes(bytes(pending), pending_charset))
                pending.clear()
                pending_charset = None
            out.append(between)
        charset, encoding, encoded = match.groups()
        if encoding in "bB":
            chunk = _b64decode(encoded.encode("ascii", "ignore"))
        else:
            chunk = binascii.a2b_qp(
                encoded.encode("utf-8", "surrogateescape"), header=True
            )
        charset = charset.lower()
        if pending_charset is not None and charset != pending_charset:
            out.append(_decode_bytes(bytes(pending), pending_charset))
            pending.clear()
        pending_charset = charset
        pending += chunk
        position = match.end()
    if pending_charset is not None:
        out.append(_decode_bytes(bytes(pending), pending_charset))
    out.append(text[position:])
    return "".join(out)


def _clean(text: str) -> str:
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


def _unstructured(raw: object) -> str:
    """Unfold, decode RFC 2047 and sanitize an unstructured header value."""
    return _clean(_decode_words(_raw_header_text(raw))).strip()


def _format_address(name: str, address: str) -> str:
    """Format ``Name <address>``, quoting the name when needed (UTF-8 kept)."""
    if not name:
        return address
    if _SPECIALS.search(name) is not None:
        name = '"' + _ESCAPES.sub(r"\\\1", name) + '"'
    return f"{name} <{address}>"


def _simple_addresses(value: str) -> list[tuple[str, str]] | None:
    """
    Parse the common simple shapes of an address list quickly.

    Handles comma-separated ``addr`` and ``Name <addr>`` entries without
    quotes, comments, groups, brackets or backslashes (the stdlib
    parser is pure Python and the slowest step of a translation).  Returns
    ``None`` for anything else; the result is what ``getaddresses`` gives.
    """
    if _NOT_SIMPLE.search(value) is not None:
        return None
    pairs: list[tuple[str, str]] = []
    for entry in value.split(","):
        match = _SIMPLE_MAILBOX.fullmatch(entry)
        if match is None:
            if entry.strip(" \t"):
                return None
            continue
        name, bracketed, bare = match.groups()
        address = bare if bare is not None else bracketed
        if "=?" in address:  # leave the legacy fully-encoded case to the slow path
            return None
        if bare is not None:
            pairs.append(("", bare))
        else:
            pairs.append((_BLANKS.sub(" ", name).strip(" \t"), bracketed))
    return pairs


def _parse_addresses(values: list[str]) -> list[tuple[str, str]]:
    """
    Parse address header values (raw, unfolded) into (name, address) pairs.

    Display names are RFC 2047 decoded after parsing, so that an encoded
    comma cannot split an address.  Empty entries (groups, ``<>``) are
    skipped.
    """
    pairs: list[tuple[str, str]] = []
    for value in values:
        if "<" in value and "@" in value:
            # A source route (<@relay.example:jane@example.com>) is obsolete
            # and ignored (RFC 5321 section 4.1.2); its commas must not
            # split the list.
            value = _OBS_ROUTE.sub("<", value)
        parsed = _simple_addresses(value)
        if parsed is None:
            parsed = getaddresses([value])
            if "=?" in value and any("=?" in address for _, address in parsed):
                # Python's legacy API (msg["To"] = "Jörg <j@example.de>")
                # encodes the whole field, addresses included.
                parsed = getaddresses([_decode_words(value)])
        for name, address in parsed:
            address = _clean(address).strip()
            if address:
                pairs.append((_clean(_decode_words(name)).strip(), address))
    return pairs


# ---------------------------------------------------------------------------
# MIME structure.


def _measure(root: Message) -> None:
    """Reject a MIME tree that is nested too deeply or has too many parts."""
    stack: list[tuple[Message, int]] = [(root, 0)]
    count = 0
    while stack:
        part, depth = stack.pop()
        count += 1
        if count > MAX_MIME_PARTS:
            raise TranslationError.of(replies.too_many_mime_parts(MAX_MIME_PARTS))
        if part.is_multipart():
            if depth >= MAX_MIME_DEPTH:
                raise TranslationError.of(replies.mime_nested_too_deep(MAX_MIME_DEPTH))
            for child in part.get_payload():
                if isinstance(child, Message):
                    stack.append((child, depth + 1))


def _structural_header(part: Message, name: str) -> str | None:
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
                text = _raw_header_text(raw_value)
                part.replace_header(name, text)
                return text
        return str(value)  # pragma: no cover - get() found it, so did raw_items()
    return value


def _params(part: Message, header: str) -> dict[str, str]:
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
            result[key] = _decode_bytes(raw, str(charset) if charset else None)
        else:
            result[key] = str(value)
    return result


def _filename(
    type_params: dict[str, str], disposition_params: dict[str, str]
) -> str | None:
    """The decoded, sanitized filename of a part; ``None`` when it has none."""
    value = disposition_params.get("filename")
    if value is None:
        value = type_params.get("name")
        if value is None:
            return None
    value = _clean(_decode_words(value)).strip()
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
        if isinstance(part, _Part):
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


def _transfer_decoded(part: Message) -> bytes:
    """The bytes of a leaf part, undoing its Content-Transfer-Encoding."""
    if part.is_multipart():  # message/*: the parser split it up, rebuild it
        chunks: list[bytes] = []
        for inner in part.get_payload():
            if isinstance(inner, Message):
                _flatten(inner, chunks)
        data = b"".join(chunks)
    elif isinstance(part, _Part):
        data = part.payload_bytes()
    else:  # pragma: no cover - every part comes from the parser
        data = b""
    encoding = part.get("content-transfer-encoding")
    if encoding is None:
        return data
    encoding = str(encoding).strip().lower()
    if encoding == "base64":
        return _b64decode(data)
    if encoding == "quoted-printable":
        return binascii.a2b_qp(data)
    return data


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
    part: Message, content_type: str, params: dict[str, str], whole_message: bool
) -> str:
    """
    Decode a text/plain or text/html body part to text with LF newlines.

    In a single-part message (``whole_message``) the line break that ends
    the last line of DATA is SMTP framing, not content (nodemailer and
    smtplib add it to ``html: '<p>x</p>'``); it is removed, as the MIME
    parser removes the one before a boundary in multipart messages.  Base64
    content is exempt: its framing line break is outside the decoded data.
    """
    text = _decode_bytes(_transfer_decoded(part), params.get("charset") or "us-ascii")
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    if (
        whole_message
        and text.endswith("\n")
        and str(part.get("content-transfer-encoding", "")).strip().lower() != "base64"
    ):
        text = text[:-1]
    if (
        content_type == "text/plain"
        and params.get("format", "").strip().lower() == "flowed"
    ):
        delsp = params.get("delsp", "").strip().lower() == "yes"
        text = _unflow(text, delsp)
    return text


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


@attrs.define
class _Body:
    """What the walk over the MIME tree collects."""

    text: str | None = None
    html: str | None = None
    attachments: list[dict[str, str]] = attrs.field(factory=list)


def _attachment(
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
    if (
        isinstance(part, _Part)
        and not part.is_multipart()
        and str(part.get("content-transfer-encoding", "")).strip().lower() == "base64"
    ):
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
                return base64.b64encode(_transfer_decoded(part)).decode("ascii")
            del payload
            part._payload = ""
            return cleaned.decode("ascii")
        cleaned = part.payload_bytes().translate(None, b"\r\n\t ")
        if _is_strict_base64(cleaned):
            return cleaned.decode("ascii")
    return base64.b64encode(_transfer_decoded(part)).decode("ascii")


def _is_signature(part: Message) -> bool:
    """Whether a part of a multipart/signed is its detached signature."""
    _structural_header(part, "content-type")
    return part.get_content_type() in _SIGNATURE_TYPES


def _walk(root: Message) -> _Body:
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
        _structural_header(part, "content-type")
        content_type = part.get_content_type()
        main_type = content_type.partition("/")[0]
        if main_type == "multipart" and part.is_multipart():
            alternative = content_type == "multipart/alternative"
            children = [c for c in part.get_payload() if isinstance(c, Message)]
            if content_type == "multipart/signed":
                children[1:] = [c for c in children[1:] if not _is_signature(c)]
            stack.extend((child, alternative) for child in reversed(children))
            continue
        if main_type == "multipart":
            # A multipart without a usable boundary: its body is plain text.
            content_type = "text/plain"
        elif _CONTENT_TYPE.fullmatch(content_type) is None:
            content_type = "application/octet-stream"
        type_params = _params(part, "content-type")
        disposition = _structural_header(part, "content-disposition")
        if disposition is None:
            filename = _filename(type_params, {})
            is_attachment = bool(filename)
        else:
            filename = _filename(type_params, _params(part, "content-disposition"))
            is_attachment = bool(filename) or (
                disposition.partition(";")[0].strip().lower() == "attachment"
            )
        if not is_attachment:
            if content_type == "text/plain" and body.text is None:
                body.text = _body_text(part, content_type, type_params, part is root)
                continue
            if content_type == "text/html" and body.html is None:
                body.html = _body_text(part, content_type, type_params, part is root)
                continue
            if (
                in_alternative
                and content_type.startswith("text/")
                and content_type not in ("text/plain", "text/html", "text/calendar")
            ):
                continue
        body.attachments.append(
            _attachment(
                part, content_type, type_params, filename, len(body.attachments) + 1
            )
        )
    return body


# ---------------------------------------------------------------------------
# Headers.


def _single(values: list[str], header: str) -> str | None:
    """The one value of a header that may appear once; ``None`` if absent."""
    distinct = list(dict.fromkeys(value for value in values if value))
    if len(distinct) > 1:
        raise TranslationError.of(replies.header_repeated(header))
    return distinct[0] if distinct else None


def _checked_id(text: str, header: str, *, ascii_only: bool = False) -> str:
    """
    Check an X-PostStack-Template-Id or -Idempotency-Key value (decoded and
    trimmed): no control characters, at most ``MAX_ID_LENGTH`` characters,
    and for the idempotency key printable ASCII only (it is also sent as
    the HTTP ``Idempotency-Key`` header).
    """
    if _ID_CONTROLS.search(text) is not None:
        raise TranslationError.of(replies.header_has_controls(header))
    if len(text) > MAX_ID_LENGTH:
        raise TranslationError.of(replies.header_value_too_long(header, MAX_ID_LENGTH))
    if ascii_only and text and _PRINTABLE_ASCII.fullmatch(text) is None:
        raise TranslationError.of(replies.header_not_printable_ascii(header))
    return text


def _add_tags(tags: dict[str, None], text: str) -> None:
    """
    Add the tags of one X-PostStack-Tags value (decoded) to ``tags``.

    Tags are split on commas and trimmed; empty ones are skipped and
    repeated ones kept once.  A tag with a control character, a tag longer
    than ``MAX_TAG_LENGTH`` and more than ``MAX_TAGS`` distinct tags are
    refused.
    """
    for tag in text.split(","):
        tag = tag.strip(" \t")
        if not tag:
            continue
        if _ID_CONTROLS.search(tag) is not None:
            raise TranslationError.of(replies.header_has_controls("X-PostStack-Tags"))
        if len(tag) > MAX_TAG_LENGTH:
            raise TranslationError.of(replies.tag_too_long(MAX_TAG_LENGTH))
        tags.setdefault(tag, None)
        if len(tags) > MAX_TAGS:
            raise TranslationError.of(replies.too_many_tags(MAX_TAGS))


def _pass_header(
    passed: dict[str, tuple[str, list[str]]], key: str, name: str, text: str
) -> None:
    """Collect one header value to pass on; refuse too many distinct headers."""
    entry = passed.get(key)
    if entry is None:
        if len(passed) >= MAX_PASSED_HEADERS:
            raise TranslationError.of(replies.too_many_passed_headers(MAX_PASSED_HEADERS))
        entry = passed[key] = (name, [])
    entry[1].append(text)


def _trim_msg_ids(value: str) -> str | None:
    """
    Shorten a References/In-Reply-To value to ``MAX_PASSED_HEADER_OCTETS``:
    keep the first message id (the thread's root) and as many of the most
    recent ones as fit, as news software does (RFC 5537 section 3.4.4).
    ``None`` if even the first id alone does not fit, or there is none.
    """
    ids = _MSG_ID.findall(value)
    if not ids:
        return None
    size = len(ids[0].encode("utf-8"))
    if size > MAX_PASSED_HEADER_OCTETS:
        return None
    recent: list[str] = []
    for msg_id in reversed(ids[1:]):
        size += 1 + len(msg_id.encode("utf-8"))
        if size > MAX_PASSED_HEADER_OCTETS:
            break
        recent.append(msg_id)
    return " ".join([ids[0], *reversed(recent)])


def _passed_headers(passed: dict[str, tuple[str, list[str]]]) -> dict[str, str]:
    """
    Join the collected header values (``", "``, or a space for lists of
    message ids) and bound each to ``MAX_PASSED_HEADER_OCTETS``: References
    and In-Reply-To are trimmed, any other longer value is refused.
    """
    headers: dict[str, str] = {}
    for key, (name, values) in passed.items():
        value = (" " if key in _SPACE_JOINED else ", ").join(values)
        if len(value) * 4 > MAX_PASSED_HEADER_OCTETS and (
            len(value.encode("utf-8")) > MAX_PASSED_HEADER_OCTETS
        ):
            trimmed = _trim_msg_ids(value) if key in _SPACE_JOINED else None
            if trimmed is None:
                raise TranslationError.of(
                    replies.passed_header_too_long(name, MAX_PASSED_HEADER_OCTETS)
                )
            value = trimmed
        headers[name] = value
    return headers


def _json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value nests containers deeper than ``limit``."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _json_control(value: Any) -> str | None:
    """The first refused control character in any key or string of ``value``."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found = _JSON_CONTROLS.search(item)
            if found is not None:
                return found.group()
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _variables(value: str) -> dict[str, Any]:
    """Parse X-PostStack-Variables, which must hold one JSON object."""

    def refuse_constant(name: str) -> Any:
        """Refuse NaN and Infinity, which json accepts but JSON forbids."""
        raise ValueError(f"{name} is not valid JSON")

    try:
        variables = json.loads(value, parse_constant=refuse_constant)
    except RecursionError:
        reason = "nested too deeply"
    except ValueError as error:  # includes json.JSONDecodeError
        reason = str(error)
    else:
        if not isinstance(variables, dict):
            kind = _JSON_KINDS.get(type(variables), "value")
            reason = f"got a JSON {kind}"
        elif _json_depth_exceeds(variables, MAX_VARIABLES_DEPTH):
            reason = f"nested more than {MAX_VARIABLES_DEPTH} levels deep"
        elif (control := _json_control(variables)) is not None:
            reason = (
                f"a string holds the control character U+{ord(control):04X}"
                " (only TAB, LF and CR are allowed)"
            )
        else:
            try:
                json.dumps(variables, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                reason = "it contains invalid Unicode"
            else:
                return variables
    raise TranslationError.of(replies.variables_not_an_object(reason))


def _sender(from_values: list[str], envelope: Envelope, mailbox: str | None) -> str:
    """Work out the API ``from`` value, enforcing the mailbox rule."""
    if from_values:
        pairs = _parse_addresses(from_values)
        if len(pairs) != 1:
            raise TranslationError.of(replies.from_address_count(len(pairs)))
        name, address = pairs[0]
        problem = header_address_problem(address)
        if problem is not None:
            raise TranslationError.of(replies.from_address_invalid(problem))
        formatted = _format_address(name, address)
    else:
        address = bare_address(_utf8_safe(envelope.mail_from))
        if not address:
            raise TranslationError.of(replies.NO_FROM_EMPTY_ENVELOPE)
        if header_address_problem(address) is not None:
            raise TranslationError.of(replies.NO_FROM_BAD_ENVELOPE)
        formatted = address
    rejection = policy.from_header_reply(mailbox, address)
    if rejection is not None:
        raise TranslationError.of(rejection)
    return formatted


def _sender_fields(message: Message) -> list[list[str]]:
    """
    The addresses of each C{Sender} field of the message that is not empty
    (parsed and RFC 2047 decoded like C{From}), for the sender policy.
    """
    fields: list[list[str]] = []
    for name, value in message.raw_items():
        if name.lower() == "sender":
            text = _raw_header_text(value).strip()
            if text:
                fields.append([address for _, address in _parse_addresses([text])])
    return fields


def _recipients(
    to_values: list[str], cc_values: list[str], envelope: Envelope
) -> tuple[list[str], list[str], list[str]]:
    """
    Split the envelope recipients into API ``to``, ``cc`` and ``bcc``.

    The envelope decides who receives the message; the To and Cc headers
    only decide in which list (and with which display name) a recipient
    appears.  Header addresses that are not envelope recipients are dropped.
    """
    envelope_keys: dict[str, str] = {}
    for recipient in envelope.rcpt_to:
        address = bare_address(_utf8_safe(recipient))
        if address:
            problem = header_address_problem(address)
            if problem is not None:
                # The SMTP layer checks RCPT TO; this is the last line of
                # defence: the API gets no recipient it would misread.
                raise TranslationError.of(replies.envelope_recipient_invalid(problem))
            envelope_keys.setdefault(address.lower(), address)
    if not envelope_keys:
        raise TranslationError.of(replies.NO_VALID_RECIPIENTS)
    placed: set[str] = set()
    lists: list[list[str]] = []
    for values in (to_values, cc_values):
        found: list[str] = []
        for name, address in _parse_addresses(values):
            key = address.lower()
            if key in envelope_keys and key not in placed:
                placed.add(key)
                found.append(_format_address(name, address))
        lists.append(found)
    to, cc = lists
    bcc = [address for key, address in envelope_keys.items() if key not in placed]
    if not to:
        if cc:
            to, cc = cc, []
        else:
            to, bcc = bcc, []
    return to, cc, bcc


def _check_header_section(raw: bytes) -> None:
    """
    Refuse a top-level header section larger than ``MAX_HEADER_BYTES``,
    before parsing it (parsing 20 MB of header lines takes seconds).

    Only the first ``MAX_HEADER_BYTES + 1`` octets are scanned.
    """
    match = _HEADER_SECTION.match(raw, 0, MAX_HEADER_BYTES + 1)
    end = match.end() if match is not None else 0  # it always matches
    if end <= MAX_HEADER_BYTES and len(raw) <= MAX_HEADER_BYTES + 1:
        return
    if end <= MAX_HEADER_BYTES:
        window = raw[end : MAX_HEADER_BYTES + 1]
        if b"\r" in window or b"\n" in window or _HEADER_LINE.match(raw, end) is None:
            return  # the section ended inside the window
        # Otherwise a header line starts at `end` and ends past the window.
    raise TranslationError.of(replies.header_section_too_large(MAX_HEADER_BYTES))


# A run of base64 lines, matched possessively: a scan continues after
# each match, so the whole message is read once (linear time, whatever
# it holds).
_BASE64_RUN: Final = re.compile(rb"(?:(?<=[\r\n])|^)(?:[A-Za-z0-9+/=]++(?:\r\n|\r|\n))++")


def _line_count(raw: bytes, start: int, end: int) -> int:
    """The lines of C{raw[start:end]}, each ended by CRLF, CR or LF (counted without a copy)."""
    return raw.count(b"\n", start, end) + raw.count(b"\r", start, end) - raw.count(b"\r\n", start, end)


def _skeleton(raw: bytes) -> tuple[bytes, bytes, list[tuple[int, int]]]:
    """
    C{raw} with every long run of base64 lines replaced by one token line.

    An attachment is mostly lines of base64, and the stdlib parser handles
    a message line by line in Python: for a 10 MB attachment, 175,000 lines
    and most of the parse time and memory.  Such a line (only
    C{A-Za-z0-9+/=}, at least one of them) can never be a header line, a
    header continuation, a C{From } line, a blank line or a boundary, so
    the parser treats every line of a run, and a token line of the same
    alphabet, exactly alike: as content of whatever it is in.  Replacing the
    run (but its last line ending, which a following boundary may claim)
    by a token line and putting the run back into the parsed tree
    (L{_restore}) gives the tree the parser would have built from C{raw}.

    @return: the skeleton, the token prefix, and the runs in order as
        offsets into C{raw} (token C{prefix + b"%dX" % index}).
    """
    nonce = secrets.token_hex(8).encode("ascii")
    while nonce in raw:  # pragma: no cover - 2**-64
        nonce = secrets.token_hex(8).encode("ascii")
    prefix = b"PSRRUN" + nonce + b"N"
    pieces: list[bytes] = []
    runs: list[tuple[int, int]] = []
    last = 0
    for match in _BASE64_RUN.finditer(raw):
        start, end = match.span()
        if end - start < 2 * _RUN_MIN_LINES or _line_count(raw, start, end) < _RUN_MIN_LINES:
            continue
        ending = 2 if raw[end - 2 : end] == b"\r\n" else 1
        pieces.append(raw[last:start])
        pieces.append(prefix + b"%dX" % len(runs))
        pieces.append(raw[end - ending : end])
        runs.append((start, end - ending))
        last = end
    if not runs:
        return raw, prefix, runs
    pieces.append(raw[last:])
    return b"".join(pieces), prefix, runs


def _restore(root: Message, raw: bytes, prefix: bytes, runs: list[tuple[int, int]]) -> None:
    """Put the runs that L{_skeleton} took out back where the parser put their tokens."""
    text_prefix = prefix.decode("ascii")
    token = re.compile(re.escape(text_prefix) + r"(\d+)X")
    view = memoryview(raw)

    def run(index: int) -> str:
        start, end = runs[index]
        return str(view[start:end], "ascii")  # decoded straight from raw, no bytes copy

    def put_back(text: Any) -> Any:
        if not isinstance(text, str) or text_prefix not in text:
            return text
        found = token.search(text)
        assert found is not None
        head, tail = text[: found.start()], text[found.end() :]
        if len(head) + len(tail) <= _FEED_SLICE and text_prefix not in tail:
            # One run with a little text around it (an attachment's body
            # and its line ending): if that text is what surrounds the run
            # in raw, the whole is decoded from raw at once, as the parser
            # decodes (ASCII, surrogateescape), with no second copy.
            start, end = runs[int(found.group(1))]
            before = head.encode("ascii", "surrogateescape")
            after = tail.encode("ascii", "surrogateescape")
            first, last = start - len(before), end + len(after)
            if first >= 0 and raw[first:start] == before and raw[end:last] == after:
                return str(view[first:last], "ascii", "surrogateescape")
        return token.sub(lambda m: run(int(m.group(1))), text)

    try:
        stack = [root]
        while stack:
            part = stack.pop()
            part.preamble = put_back(part.preamble)
            part.epilogue = put_back(part.epilogue)
            payload = part._payload  # type: ignore[attr-defined]
            if isinstance(payload, list):
                stack.extend(child for child in payload if isinstance(child, Message))
            else:
                part._payload = put_back(payload)  # type: ignore[attr-defined]
    finally:
        view.release()


def _parse(raw: bytes) -> Message:
    """Parse the message, after checking the size of its header section."""
    _check_header_section(raw)
    runs: list[bytes] = []
    text = raw
    if len(raw) >= _RUN_MIN_MESSAGE:
        text, prefix, runs = _skeleton(raw)
    try:
        # Fed in slices: the parser then never holds the whole message as
        # one decoded string plus a list of all its lines at once (for a
        # 25 MB message that is the difference between about 8 and 4 copies).
        parser = BytesFeedParser(_factory=_Part, policy=compat32)
        for start in range(0, len(text), _FEED_SLICE):
            parser.feed(text[start : start + _FEED_SLICE])
        del text
        message = parser.close()
        if runs:
            _restore(message, raw, prefix, runs)
    except RecursionError:
        raise TranslationError.of(replies.mime_nested_too_deep(MAX_MIME_DEPTH)) from None
    except MemoryError:  # pragma: no cover - not a property of the message
        raise
    except Exception:
        # The stdlib parser is lenient, but a few hostile header parameters
        # still make it raise (e.g. boundary*=undefined''x raises
        # UnicodeError).  Whatever it raises, the message is malformed.
        raise TranslationError.of(replies.MESSAGE_NOT_MIME) from None
    return message


def _check_limits(message: Message) -> None:
    """Refuse too many top-level header fields, or a MIME tree too large."""
    if len(message) > MAX_HEADER_FIELDS:
        raise TranslationError.of(replies.too_many_header_fields(MAX_HEADER_FIELDS))
    _measure(message)


def translate(
    raw: bytes, envelope: Envelope, *, mailbox: str | None = None
) -> EmailRequest:
    """
    Translate one received message into one ``POST /emails`` request.

    :param raw: The message as received in DATA, dot-unstuffed, with CRLF
        (or bare LF) line endings.
    :param envelope: The SMTP envelope of the transaction.
    :param mailbox: When the client authenticated as a mailbox, its address:
        the From address must then be that mailbox.
    :raises TranslationError: When the message cannot be sent; the error
        carries the SMTP reply for the DATA command.
    :return: The request to make.
    """
    message = _parse(raw)
    if mailbox is not None:
        # The Sender rule comes before any other refusal of the message,
        # as it always has (a message that claims another author is told so).
        rejection = policy.sender_header_reply(mailbox, _sender_fields(message))
        if rejection is not None:
            raise TranslationError.of(rejection)
    _check_limits(message)

    from_values: list[str] = []
    to_values: list[str] = []
    cc_values: list[str] = []
    reply_to_values: list[str] = []
    subject: str | None = None
    tags: dict[str, None] = {}
    template_values: list[str] = []
    variables_values: list[str] = []
    idempotency_values: list[str] = []
    message_id: str | None = None
    passed: dict[str, tuple[str, list[str]]] = {}

    for name, value in message.raw_items():
        key = name.lower()
        if key == "from":
            from_values.append(_raw_header_text(value))
        elif key == "to":
            to_values.append(_raw_header_text(value))
        elif key == "cc":
            cc_values.append(_raw_header_text(value))
        elif key == "reply-to":
            reply_to_values.append(_raw_header_text(value))
        elif key == "subject":
            if subject is None:
                subject = _unstructured(value)
        elif key == "message-id":
            if message_id is None:
                message_id = _clean(_raw_header_text(value)).strip() or None
        elif key.startswith("x-poststack-"):
            # Not cleaned like other headers: a control character in one of
            # these values is refused rather than silently removed.
            text = _decode_words(_raw_header_text(value)).strip(" \t")
            if key == _HEADER_TAGS:
                _add_tags(tags, text)
            elif key == _HEADER_TEMPLATE:
                template_values.append(_checked_id(text, "X-PostStack-Template-Id"))
            elif key == _HEADER_VARIABLES:
                variables_values.append(text)
            elif key == _HEADER_IDEMPOTENCY:
                idempotency_values.append(
                    _checked_id(text, "X-PostStack-Idempotency-Key", ascii_only=True)
                )
            # Any other X-PostStack-* header is ours and is not passed on.
        elif (
            key.startswith("x-") or key in _PASSED_UNSTRUCTURED
        ) and _HEADER_NAME.fullmatch(name):
            text = _unstructured(value)
            if text:
                _pass_header(passed, key, name, text)
        elif key in _PASSED_STRUCTURED:
            text = _clean(_raw_header_text(value)).strip()
            if text:
                _pass_header(passed, key, name, text)

    template_id = _single(template_values, "X-PostStack-Template-Id")
    variables_text = _single(variables_values, "X-PostStack-Variables")
    idempotency_key = _single(idempotency_values, "X-PostStack-Idempotency-Key")
    variables = _variables(variables_text) if variables_text is not None else None

    sender = _sender(from_values, envelope, mailbox)
    to, cc, bcc = _recipients(to_values, cc_values, envelope)
    body = _walk(message)

    payload: dict[str, Any] = {"from": sender, "to": to}
    if cc:
        payload["cc"] = cc
    if bcc:
        payload["bcc"] = bcc
    reply_to = [
        _format_address(name, address)
        for name, address in _parse_addresses(reply_to_values)
        if is_header_address(address)
    ]
    if reply_to:
        payload["reply_to"] = ", ".join(reply_to)

    if template_id is None:
        payload["subject"] = subject or ""
        if body.text is not None:
            payload["text"] = body.text
        if body.html is not None:
            payload["html"] = body.html
        if body.text is None and body.html is None:
            payload["text"] = ""
    else:
        # Blank fields are left out so that the template's own apply (a
        # client cannot always omit them: nodemailer writes text: '' as an
        # empty text/plain part).
        if subject:
            payload["subject"] = subject
        if body.text is not None and body.text.strip():
            payload["text"] = body.text
        if body.html is not None and body.html.strip():
            payload["html"] = body.html

    if passed:
        payload["headers"] = _passed_headers(passed)
    if tags:
        payload["tags"] = list(tags)
    if body.attachments:
        payload["attachments"] = body.attachments
    if template_id is not None:
        payload["template_id"] = template_id
    if variables is not None:
        payload["variables"] = variables
    if idempotency_key is not None:
        payload["idempotency_key"] = idempotency_key
    return EmailRequest(
        payload=payload,
        idempotency_key=idempotency_key,
        message_id=message_id,
        idempotency_kind=None if idempotency_key is None else "client",
    )
