# -*- test-case-name: tests.test_translate_scan -*-
"""
The hostile-input limits, checked while a message streams in.

L{MimeScan} follows the MIME structure of a message as DATA delivers it,
a piece at a time, the way the stdlib feed parser (L{.parse.parse_message})
will build it: header sections, boundaries (an enclosing multipart's
boundary ends every part inside it), C{message/*} parts, the default type
of a C{multipart/digest}'s parts.  It notes the first limit the message
passes: more than C{MAX_MIME_PARTS} parts, a container nested deeper than
C{MAX_MIME_DEPTH}, a top-level header section over C{MAX_HEADER_BYTES} or
with more than C{MAX_HEADER_FIELDS} fields.  The relay can then refuse the
message at the end of DATA without parsing it
(L{.message.translate}'s C{scan}).

It is light: in a part's body only the lines that start with C{--} are
looked at (found with C{bytes.find}), header sections are read line by
line, and it stops at the first limit passed.

It never refuses what the parser accepts.  Where a message does something
it does not follow (a C{message/delivery-status} part, a C{--} line or a
header line over 1 MB, a header the stdlib cannot read), it gives up
(L{MimeScan.unsure}) and leaves the verdict to the full parse.
"""

from __future__ import annotations

import re
from email.feedparser import BytesFeedParser
from email.policy import compat32
from typing import Final, Optional

from .. import replies
from ..replies import Reply
from .parse import (
    MAX_HEADER_BYTES,
    MAX_HEADER_FIELDS,
    MAX_MIME_DEPTH,
    MAX_MIME_PARTS,
    Part,
    _check_header_section,
)
from .request import TranslationError

__all__ = ["MimeScan"]

# The feed parser's own patterns (email.feedparser headerRE, NLCRE and
# boundaryendRE), on bytes: the parser reads bytes as ASCII with
# surrogateescape, so a non-ASCII octet matches none of these classes.
_HEADER_LINE: Final = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")
_FIELD_LINE: Final = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")
_BOUNDARY_END: Final = re.compile(rb"(--)?[ \t]*(?:\r\n|\r|\n)?$")
_LINE_END: Final = re.compile(rb"\r\n|\r|\n")

#: The longest line (a header line, or one that starts with C{--}) held
#: back while waiting for its end; past it the scan gives up.
LINE_LIMIT: Final = MAX_HEADER_BYTES + 2

# Frame kinds: a part's header section, a leaf body, a multipart body,
# a message/* part (its one child is the frame above it).
_HEADERS, _LEAF, _MULTI, _MESSAGE = range(4)
# Phases of a multipart body: before the first boundary, between parts,
# right after a boundary (repeated boundary lines are one), after the
# close boundary (the epilogue).
_PREAMBLE, _PARTS, _DUPS, _DRAIN = range(4)


class _Frame:
    """One part being read: a frame of the feed parser's recursion."""

    __slots__ = ("kind", "depth", "digest", "sep", "phase", "lines")

    def __init__(self, depth: int, digest: bool) -> None:
        self.kind = _HEADERS
        self.depth = depth
        #: The part's parent is a multipart/digest (default type message/rfc822).
        self.digest = digest
        #: A multipart's boundary line prefix (C{--boundary}).
        self.sep = b""
        self.phase = _PREAMBLE
        self.lines: list[bytes] = []


class MimeScan:
    """
    The MIME structure of one message, followed as it arrives.

    Feed it the message (dot-unstuffed, as it will be translated) with
    L{feed}, then call L{close}.

    @ivar refusal: the reply for the first limit passed, or C{None}.
    @ivar unsure: the scan gave up (the message does something it does not
        follow): no refusal will come from it.
    @ivar parts: the MIME parts found so far (the message itself is one).
    @ivar depth: the deepest part's depth (the message is at 0).
    @ivar header_end: once known, the octets of the top-level header
        section (its field lines, without the blank line).
    @ivar fields: the top-level header fields.
    """

    def __init__(
        self,
        max_parts: int = MAX_MIME_PARTS,
        max_depth: int = MAX_MIME_DEPTH,
        max_fields: int = MAX_HEADER_FIELDS,
    ) -> None:
        self._max_parts = max_parts
        self._max_depth = max_depth
        self._max_fields = max_fields
        self.refusal: Optional[Reply] = None
        self.unsure = False
        self.parts = 1
        self.depth = 0
        self.fields = 0
        self.header_end: Optional[int] = None
        self._frames = [_Frame(0, False)]
        self._eof: list[bytes] = []  # the enclosing boundaries, innermost last
        self._carry = b""  # the start of an unfinished line
        self._midline = False  # inside a body line that cannot matter
        self._offset = 0  # octets before the carry
        self._head: Optional[bytearray] = bytearray()  # the start, while the top header is open
        self._done = False

    @property
    def stopped(self) -> bool:
        """Nothing more to find: a refusal, given up, or the structure is complete."""
        return self._done or self.refusal is not None or self.unsure

    def feed(self, data: bytes) -> None:
        """The next piece of the message."""
        if self.stopped or not data:
            return
        if self._head is not None:
            self._watch_head(data)
            if self.stopped:
                return
        buf = self._carry + data if self._carry else data
        self._carry = b""
        pos = 0
        if self._midline:
            found = _LINE_END.search(buf)
            if found is None:
                self._offset += len(buf)
                return
            pos = found.end()
            self._midline = False
        self._run(buf, pos, False)

    def close(self) -> None:
        """The message is complete."""
        if self.stopped:
            return
        buf, self._carry = self._carry, b""
        if buf and not self._midline:
            self._run(buf, 0, True)
        while not self.stopped:
            self._take(None, self._offset)

    # -- the top-level header section -------------------------------------

    def _watch_head(self, data: bytes) -> None:
        """Keep the message's first octets while its header section is open."""
        head = self._head
        assert head is not None
        head += data[: LINE_LIMIT - len(head)]
        if len(head) >= LINE_LIMIT:
            # As many octets as the rule looks at (and one more, so that
            # the message is longer than the rule's window, as it is).
            self._head = None
            try:
                _check_header_section(bytes(head))
            except TranslationError as e:
                self._refuse(e.reply)

    # -- lines ------------------------------------------------------------

    def _run(self, buf: bytes, pos: int, final: bool) -> None:
        """Take the lines of C{buf} from C{pos} (a line start); keep an unfinished one."""
        size = len(buf)
        frames = self._frames
        while pos < size and not self.stopped:
            frame = frames[-1]
            kind = frame.kind
            if kind == _LEAF or (kind == _MULTI and frame.phase != _DUPS):
                # A body: only a line that starts with "--" can matter.
                if not self._eof and (kind == _LEAF or frame.phase == _DRAIN):
                    self._done = True  # nothing can end it before the end
                    return
                if buf.startswith(b"--", pos):
                    start = pos
                else:
                    start = _dash_line(buf, pos)
                    if start < 0:
                        self._tail(buf, pos, final)
                        return
            else:
                start = pos
            found = _LINE_END.search(buf, start)
            if found is None or (not final and found.end() == size and buf[-1:] == b"\r"):
                # Unfinished (a CR at the end may be the first half of CRLF).
                if final:
                    self._take(buf[start:], self._offset + start)
                    self._offset += size
                    return
                if size - start > LINE_LIMIT:
                    self.unsure = True
                    return
                self._offset += start
                self._carry = buf[start:]
                return
            pos = found.end()
            self._take(buf[start:pos], self._offset + start)
        self._offset += size

    def _tail(self, buf: bytes, pos: int, final: bool) -> None:
        """No line that matters in C{buf[pos:]}: keep only what may start one."""
        start = max(buf.rfind(b"\n"), buf.rfind(b"\r")) + 1
        start = max(start, pos)
        tail = buf[start:]
        if tail == b"-" and not final:
            self._carry = tail
            self._offset += start
            return
        self._midline = bool(tail) and not final
        self._offset += len(buf)

    def _take(self, line: Optional[bytes], offset: int) -> None:
        """
        One line (C{None}: the end of the message), as the parser's
        recursion takes it: a line that matches an enclosing boundary is
        the end of every part inside that boundary's multipart.
        """
        frames = self._frames
        while not self.stopped:
            frame = frames[-1]
            if line is None or (self._eof and line.startswith(b"--") and self._at_eof(line)):
                self._end(frame, offset)
                continue
            kind = frame.kind
            if kind == _HEADERS:
                if _HEADER_LINE.match(line):
                    frame.lines.append(line)
                    if len(frames) == 1 and _FIELD_LINE.match(line):
                        self.fields += 1  # refused at the section's end (header_end known)
                    return
                self._headers_done(frame, offset)
                if line in (b"\r\n", b"\n", b"\r"):
                    return  # the blank line after the header section
                continue  # the line is the body's first
            if kind == _MULTI:
                phase = frame.phase
                matched = _matches(frame.sep, line)
                if phase == _DUPS:
                    if matched is not None:
                        return  # a repeated boundary line: no part between
                    self._child(frame)
                    continue
                if matched is not None and phase != _DRAIN:
                    frame.phase = _DRAIN if matched.group(1) else _DUPS
            return

    def _at_eof(self, line: bytes) -> bool:
        return any(_matches(sep, line) is not None for sep in self._eof)

    def _end(self, frame: _Frame, offset: int) -> None:
        """The top frame's part reached its end (its input ended)."""
        if frame.kind == _HEADERS:
            self._headers_done(frame, offset)
            if frame.kind == _MESSAGE:
                return  # its child was just made: it ends first
        elif frame.kind == _MULTI and frame.phase == _DUPS:
            # The parser makes a part even here (an empty one).
            self._child(frame)
            return
        frames = self._frames
        frames.pop()
        if not frames:
            self._done = True
            return
        parent = frames[-1]
        if parent.kind == _MULTI:
            self._eof.pop()
            parent.phase = _PARTS

    def _headers_done(self, frame: _Frame, offset: int) -> None:
        """The header section of C{frame} ended: what kind of body follows."""
        if len(self._frames) == 1:
            self.header_end = offset
            self._head = None
            if offset > MAX_HEADER_BYTES:
                # Complete header lines past the limit: what
                # _check_header_section refuses.
                self._refuse(replies.header_section_too_large(MAX_HEADER_BYTES))
                return
            if self.fields > self._max_fields:
                self._refuse(replies.too_many_header_fields(self._max_fields))
                return
        ctype = _simple_type(frame.lines, frame.digest)
        sep = None
        try:
            if ctype is None:
                # The stdlib reads the header section, as the parser will.
                parser = BytesFeedParser(_factory=Part, policy=compat32)
                parser.feed(b"".join(frame.lines))
                part = parser.close()
                if frame.digest:
                    part.set_default_type("message/rfc822")
                ctype = part.get_content_type()
                if ctype.startswith("multipart/"):
                    boundary = part.get_boundary()
                    if boundary is not None:
                        sep = b"--" + boundary.encode("ascii", "surrogateescape")
        except UnicodeEncodeError:
            sep = None  # a decoded non-ASCII boundary: no line can match it
        except Exception:
            self.unsure = True
            return
        assert ctype is not None  # set before anything that can raise UnicodeEncodeError
        maintype = ctype.split("/")[0]
        frame.lines = []
        if ctype == "message/delivery-status":
            self.unsure = True
        elif maintype == "message":
            frame.kind = _MESSAGE
            self._push(frame.depth + 1, False)
        elif maintype == "multipart" and sep is not None:
            frame.kind = _MULTI
            frame.sep = sep
            frame.digest = ctype == "multipart/digest"
            frame.phase = _PREAMBLE
        else:
            frame.kind = _LEAF

    def _child(self, frame: _Frame) -> None:
        """A multipart's next part starts."""
        frame.phase = _PARTS
        self._eof.append(frame.sep)
        self._push(frame.depth + 1, frame.digest)

    def _push(self, depth: int, digest: bool) -> None:
        self.parts += 1
        self.depth = max(self.depth, depth)
        if depth > self._max_depth:
            self._refuse(replies.mime_nested_too_deep(self._max_depth))
        elif self.parts > self._max_parts:
            self._refuse(replies.too_many_mime_parts(self._max_parts))
        self._frames.append(_Frame(depth, digest))

    def _refuse(self, reply: Reply) -> None:
        if self.refusal is None and not self.unsure:
            self.refusal = reply


_CONTENT_TYPE: Final = b"content-type:"


def _simple_type(lines: list[bytes], digest: bool) -> Optional[str]:
    """
    The content type L{Part.get_content_type} gives a part with these
    header lines, when it is plain to see: no Content-Type field (the
    default type), or an ASCII one that is not C{multipart/*} (whose
    boundary the stdlib must read).  C{None} otherwise.
    """
    first = -1
    for index, line in enumerate(lines):
        if line[:13].lower() == _CONTENT_TYPE:
            first = index
            break
    if first < 0:
        return "message/rfc822" if digest else "text/plain"
    # compat32's header_source_parse: the first line's value, left-stripped,
    # its continuation lines, the line end stripped.
    value = lines[first][13:].lstrip(b" \t")
    for line in lines[first + 1 :]:
        if line[:1] not in (b" ", b"\t"):
            break
        value += line
    value = value.rstrip(b"\r\n")
    if not value.isascii():
        return None
    ctype = value.decode("ascii").partition(";")[0].strip().lower()
    if ctype.count("/") != 1:
        return "text/plain"
    return None if ctype.startswith("multipart/") else ctype


def _matches(sep: bytes, line: bytes) -> Optional[re.Match[bytes]]:
    """The feed parser's boundary test: C{sep}, then C{--}, blanks and the line end only."""
    if not line.startswith(sep):
        return None
    return _BOUNDARY_END.match(line, len(sep))


def _dash_line(buf: bytes, pos: int) -> int:
    """The start of the first line after C{pos} that starts with C{--}, or -1."""
    lf = buf.find(b"\n--", pos)
    cr = buf.find(b"\r--", pos, lf + 1 if lf >= 0 else len(buf))
    if cr >= 0:
        return cr + 1
    return lf + 1 if lf >= 0 else -1
