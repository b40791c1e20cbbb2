# -*- test-case-name: tests.test_translate_runs,tests.test_translate_hostile -*-
"""
Parsing a message, within the hostile-input limits.

L{parse_message} refuses an oversized header section before parsing, then
feeds the stdlib C{compat32} parser in slices; in a large message, long runs
of base64 lines are first replaced by one token line each and put back into
the parsed tree afterwards (L{_skeleton}, L{_restore}), so a 25 MB
attachment is neither split into lines by Python nor copied needlessly.
L{check_limits} refuses too many header fields or too large a MIME tree.
"""

from __future__ import annotations

import re
import secrets
from email.feedparser import BytesFeedParser
from email.message import Message
from email.policy import compat32
from typing import Any, Final, Iterator

from .. import replies
from .request import TranslationError


#: Deepest allowed nesting of MIME containers (multipart/* and message/*).
MAX_MIME_DEPTH: Final = 20

#: Largest allowed number of MIME parts (containers and leaves) in a message.
MAX_MIME_PARTS: Final = 1000

#: Most header fields allowed in the message's (top-level) header section.
MAX_HEADER_FIELDS: Final = 1000

#: Largest allowed (top-level) header section, in octets, line breaks included.
MAX_HEADER_BYTES: Final = 1024 * 1024


class Part(Message):
    """
    A compat32 message (part) that hands out its payload bytes untouched.

    ``Message.get_payload()`` without ``decode`` re-decodes 8-bit payloads
    with the declared charset (lossy, and it raises on some hostile charset
    parameters), and with ``decode=True`` it applies its own, less lenient
    base64 handling; the relay wants the wire bytes and decodes them itself.
    """

    # Message's own slots (not in the type stubs), declared for type checkers.
    _payload: Any
    _headers: list[tuple[str, Any]]

    # The parser and the walk look headers up often (the parser alone asks
    # each part for its content type about five times): the two lookups
    # below give what Message's do, with fewer calls.

    def get(self, name: str, failobj: Any = None) -> Any:
        """
        C{Message.get}: the first value of header C{name}; an ASCII value
        is returned as it is stored (what the compat32 policy's
        C{header_fetch_parse} returns for it), any other value as the
        policy makes it.
        """
        name = name.lower()
        for key, value in self._headers:
            if key.lower() == name:
                if value.__class__ is str and value.isascii() and self.policy is compat32:
                    return value
                return self.policy.header_fetch_parse(key, value)
        return failobj

    def get_content_type(self) -> str:
        """C{Message.get_content_type}, without its helper calls."""
        value = self.get("content-type")
        if value is None:  # values are never None: the header is absent
            return self.get_default_type()
        ctype = str(value).partition(";")[0].strip().lower()
        return ctype if ctype.count("/") == 1 else "text/plain"

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

# The top-level header section as the compat32 feed parser reads it: lines
# (ended by CRLF, CR or LF) that start a field, continue one, or are a
# mbox "From " line.
_HEADER_LINE_START: Final = rb"(?:From |[\x21-\x39\x3b-\x7e]*:|[ \t])"
_HEADER_SECTION: Final = re.compile(
    rb"(?:" + _HEADER_LINE_START + rb"[^\r\n]*+(?:\r\n|\r|\n))*+"
)

_HEADER_LINE: Final = re.compile(_HEADER_LINE_START)


def _measure(root: Message) -> None:
    """
    Reject a MIME tree that is nested too deeply or has too many parts.

    The parts are visited in document order (as L{.scan.MimeScan} meets
    them while the message streams in), so that a message over both limits
    is refused for the same one either way.
    """
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
            children = [c for c in part.get_payload() if isinstance(c, Message)]
            stack.extend((child, depth + 1) for child in reversed(children))


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
# More lines of a run (from where the last window ended it).
_BASE64_LINES: Final = re.compile(rb"(?:[A-Za-z0-9+/=]++(?:\r\n|\r|\n))++")

# The scans below look at this much of a message per call: a call into the
# regular expression engine or a bytes method holds the interpreter lock
# for all of its length, and the translation may run in a thread beside
# the event loop (poststack_relay.offload).
_WINDOW: Final = 64 * 1024


def _window_end(raw: bytes, start: int) -> int:
    """The end of the window from C{start}: after a LF (never inside a CRLF), or the end."""
    limit = start + _WINDOW
    if limit >= len(raw):
        return len(raw)
    cut = raw.rfind(b"\n", start, limit)
    if cut < 0:
        cut = raw.find(b"\n", limit)
        if cut < 0:
            return len(raw)
    return cut + 1


def _base64_runs(raw: bytes) -> "Iterator[tuple[int, int]]":
    """
    The spans of L{_BASE64_RUN} in C{raw}, as C{finditer} finds them, but
    found a window at a time (windows end after a LF, so no line or CRLF
    is cut; a run reaching a window's end is followed into the next ones).
    """
    pos, size = 0, len(raw)
    while pos < size:
        end = _window_end(raw, pos)
        found = _BASE64_RUN.search(raw, pos, end)
        if found is None:
            pos = end
            continue
        start, stop = found.span()
        while stop == end and end < size:
            end = _window_end(raw, stop)
            more = _BASE64_LINES.match(raw, stop, end)
            if more is None:
                break
            stop = more.end()
        yield start, stop
        pos = stop


def _line_count(raw: bytes, start: int, end: int, enough: int) -> int:
    """
    The lines of C{raw[start:end]}, each ended by CRLF, CR or LF (counted
    without a copy, a window at a time), or any number at least C{enough}
    once that many are found.
    """
    count = 0
    while start < end and count < enough:
        stop = min(end, start + _WINDOW)
        if raw[stop - 1 : stop] == b"\r" and raw[stop : stop + 1] == b"\n":
            stop += 1
        count += raw.count(b"\n", start, stop) + raw.count(b"\r", start, stop)
        count -= raw.count(b"\r\n", start, stop)
        start = stop
    return count


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
    for start, end in _base64_runs(raw):
        if (
            end - start < 2 * _RUN_MIN_LINES
            or _line_count(raw, start, end, _RUN_MIN_LINES) < _RUN_MIN_LINES
        ):
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
            # The parser's own payload slot (not in the stubs), as it left it.
            payload = part._payload  # type: ignore[attr-defined]
            if isinstance(payload, list):
                stack.extend(child for child in payload if isinstance(child, Message))
            else:
                part._payload = put_back(payload)  # type: ignore[attr-defined]  # the same slot, written back
    finally:
        view.release()


def parse_message(raw: bytes) -> Message:
    """Parse the message, after checking the size of its header section."""
    _check_header_section(raw)
    runs: list[tuple[int, int]] = []
    prefix = b""
    text = raw
    if len(raw) >= _RUN_MIN_MESSAGE:
        text, prefix, runs = _skeleton(raw)
    try:
        # Fed in slices: the parser then never holds the whole message as
        # one decoded string plus a list of all its lines at once (for a
        # 25 MB message that is the difference between about 8 and 4 copies).
        parser = BytesFeedParser(_factory=Part, policy=compat32)
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


def check_limits(message: Message) -> None:
    """Refuse too many top-level header fields, or a MIME tree too large."""
    if len(message) > MAX_HEADER_FIELDS:
        raise TranslationError.of(replies.too_many_header_fields(MAX_HEADER_FIELDS))
    _measure(message)
