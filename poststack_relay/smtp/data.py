# -*- test-case-name: tests.test_smtp_data -*-
"""
The DATA scanner, pure: message content in chunks as they arrive, the
message (dot-unstuffed, bare LF made CRLF, within the size limit) out.

It looks for the one terminator RFC 5321 allows, C{<CRLF>.<CRLF>} (with
the CRLF that ended the C{DATA} command counting as the first), in whole
chunks: no Python loop per line.  A bare LF never ends the message and is
normalised to CRLF; a lone CR is data (docs/design.md, "SMTP smuggling").

A message that grows past C{scan_from} octets is also followed by a
L{MimeScan} (the MIME limits, checked as it arrives), so that one over
them is refused at its end without a full parse; smaller ones cost
little to parse and are not scanned.
"""

from __future__ import annotations

import re
from typing import Optional

from ..translate import MimeScan

# A partial DATA line held back while looking for the terminator.
DATA_HOLD_LIMIT = 65536

_TERMINATOR = b"\r\n.\r\n"
# A LF not preceded by a CR, in message content.
_BARE_LF = re.compile(rb"(?<!\r)\n")


class DataScanner:
    """
    The content of one C{DATA} command.

    Feed it what the client sends after the C{354} reply with L{feed}
    until that returns the input that followed the terminator; then
    L{size} is the message's size and L{message} its content (C{None} if
    it was larger than C{max_size}: nothing is kept past the limit).

    At most L{DATA_HOLD_LIMIT} octets of an unfinished line are held back;
    an overlong line is passed on as content, all but its last octet
    (which may be the CR of the terminator).

    @ivar size: octets of content so far, after unstuffing and
        normalisation.
    @ivar too_big: true once C{size} exceeded C{max_size}.
    @ivar mime: the MIME scan of the content, once it passed C{scan_from}
        octets (C{None} before, and for a smaller message).
    """

    __slots__ = (
        "_max_size", "_chunks", "size", "too_big", "_held", "_at_line_start", "_scan_from", "mime",
    )

    def __init__(self, max_size: int, scan_from: Optional[int] = None) -> None:
        self._max_size = max_size
        self._chunks: list[bytes] = []
        self.size = 0
        self.too_big = False
        self._held = b""
        self._at_line_start = True
        self._scan_from = scan_from
        self.mime: Optional[MimeScan] = None

    @property
    def held(self) -> int:
        """Octets held back (an unfinished line), for memory bounds."""
        return len(self._held)

    @property
    def kept(self) -> int:
        """Octets of content kept so far (0 once the message is too big)."""
        return sum(map(len, self._chunks))

    def feed(self, data: bytes) -> Optional[bytes]:
        """
        Take the next chunk of input.  C{None} while the message goes on;
        at the terminator, the input that followed it (possibly C{b""}),
        which is not content.
        """
        if self._held:
            data = self._held + data
            self._held = b""
        prefixed = self._at_line_start
        probe = b"\r\n" + data if prefixed else data
        i = probe.find(_TERMINATOR)
        if i >= 0:
            self._emit(probe[: i + 2], prefixed)
            return probe[i + 5 :]
        j = probe.rfind(b"\r\n")
        if j >= (2 if prefixed else 0) and j + 2 > (2 if prefixed else 0):
            self._emit(probe[: j + 2], prefixed)
            self._at_line_start = True
            self._held = probe[j + 2 :]
        else:
            self._held = data
        if len(self._held) > DATA_HOLD_LIMIT:
            # An overlong line: pass all but its last byte (which may be
            # the CR of the terminator) on as mid-line content.
            held, self._held = self._held, self._held[-1:]
            if self._at_line_start:
                self._emit(b"\r\n" + held[:-1], True)
            else:
                self._emit(held[:-1], False)
            self._at_line_start = False
        return None

    def message(self) -> Optional[bytes]:
        """
        The whole content, once the terminator was found; C{None} if the
        message was too big.  The scanner lets go of its pieces.
        """
        chunks, self._chunks = self._chunks, []
        if self.too_big:
            self.mime = None
            return None
        if self.mime is not None:
            self.mime.close()
        return b"".join(chunks)

    def _emit(self, segment: bytes, prefixed: bool) -> None:
        """
        Take one scanned piece of content: unstuff dots (after CRLF only),
        normalise bare LF to CRLF, count it and keep it unless the message
        is already too big.

        A segment ends with CRLF or is part of an overlong line cut before
        its last octet, and the scanner never holds a CRLF back, so a CR at
        the end of one segment is never followed by a LF at the start of
        the next: a bare LF is found within one segment.
        """
        if b"\r\n." in segment:
            segment = segment.replace(b"\r\n.", b"\r\n")
        if prefixed:
            segment = segment[2:]
        if not segment:
            return
        if segment.count(b"\n") != segment.count(b"\r\n"):
            segment = _BARE_LF.sub(b"\r\n", segment)
        self.size += len(segment)
        if self.too_big:
            return
        if self.size > self._max_size:
            self.too_big = True
            self._chunks = []
            self.mime = None
            return
        self._chunks.append(segment)
        mime = self.mime
        if mime is not None:
            mime.feed(segment)
        elif self._scan_from is not None and self.size >= self._scan_from:
            self.mime = mime = MimeScan()
            for chunk in self._chunks:
                mime.feed(chunk)
