# -*- test-case-name: tests.test_translate_scan -*-
"""
L{MimeScan}: the MIME limits followed while a message streams in.  Its part
count and depth are checked against the full parser's tree on the corpus
and on generated hostile structures (boundaries in bodies, nested and
reused boundaries, missing close boundaries, CRLF / LF / lone CR), fed
whole, a byte at a time and in random pieces.
"""

from __future__ import annotations

import random
from email.message import Message
from typing import Optional

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from poststack_relay import replies
from poststack_relay.translate import (
    MAX_HEADER_BYTES,
    MAX_HEADER_FIELDS,
    MAX_MIME_DEPTH,
    MAX_MIME_PARTS,
    Envelope,
    TranslationError,
    translate,
)
from poststack_relay.translate.parse import parse_message
from poststack_relay.translate.scan import MimeScan
from tests.common.corpus import corpus_names, load

UNLIMITED = 10**9


def parsed_shape(raw: bytes) -> tuple[int, int, int]:
    """The parser's tree: its parts, its deepest part's depth, the top-level header fields."""
    root = parse_message(raw)
    stack: list[tuple[Message, int]] = [(root, 0)]
    parts = depth = 0
    while stack:
        part, level = stack.pop()
        parts += 1
        depth = max(depth, level)
        if part.is_multipart():
            stack.extend((c, level + 1) for c in part.get_payload() if isinstance(c, Message))
    return parts, depth, len(root)


def scanned(raw: bytes, pieces: Optional[list[int]] = None, **limits: int) -> MimeScan:
    """C{raw} through a L{MimeScan}, in pieces of the given sizes (the rest at the end)."""
    scan = MimeScan(**limits) if limits else MimeScan(UNLIMITED, UNLIMITED, UNLIMITED)
    at = 0
    for size in pieces or []:
        scan.feed(raw[at : at + size])
        at += size
    scan.feed(raw[at:])
    scan.close()
    return scan


def flat(parts: int, eol: bytes = b"\r\n", close: bool = True) -> bytes:
    """A multipart/mixed message of C{parts} text parts."""
    out = [b"From: a@example.com", b'Content-Type: multipart/mixed; boundary="b"', b""]
    for n in range(parts):
        out += [b"--b", b"Content-Type: text/plain", b"", b"part %d" % n]
    if close:
        out.append(b"--b--")
    return eol.join(out) + eol


def nested(levels: int) -> bytes:
    """Multiparts nested C{levels} deep (the message is the first)."""
    head = b"From: a@example.com\r\n"
    body = b"Content-Type: text/plain\r\n\r\ninnermost\r\n"
    for n in reversed(range(levels)):
        body = (
            b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (n, n)
            + body
            + b"--b%d--\r\n" % n
        )
    return head + body


class ShapeTests(SynchronousTestCase):
    def assertSameShape(self, raw: bytes) -> None:
        """Whole, a byte at a time and in random pieces, the scan finds the parser's tree."""
        expected = parsed_shape(raw)
        rnd = random.Random(raw)
        for pieces in ([], [1] * len(raw), [rnd.randint(1, 40) for _ in range(len(raw) // 8)]):
            scan = scanned(raw, pieces)
            self.assertFalse(scan.unsure, raw[:200])
            self.assertEqual((scan.parts, scan.depth, scan.fields), expected, raw[:300])

    def test_corpus(self) -> None:
        """Every corpus message: the same parts, depth and header fields as the parser's."""
        for name in corpus_names():
            self.assertSameShape(load(name))

    def test_line_endings(self) -> None:
        """CRLF, LF and lone CR line ends are all line ends, as for the parser."""
        for eol in (b"\r\n", b"\n", b"\r"):
            self.assertSameShape(flat(5, eol))

    def test_boundary_in_a_body(self) -> None:
        """A boundary line inside a text body ends the part; one that only starts like it does not."""
        raw = flat(2).replace(b"part 0", b"text\r\n--b\r\nmore\r\n--bx\r\n-- b\r\n--b --x")
        self.assertSameShape(raw)
        self.assertEqual(scanned(raw).parts, 4)

    def test_missing_close_boundaries(self) -> None:
        """No close boundary, at any level: the parts are still counted as the parser counts them."""
        self.assertSameShape(flat(3, close=False))
        self.assertSameShape(nested(4).replace(b"--b2--\r\n", b"").replace(b"--b0--\r\n", b""))

    def test_outer_boundary_ends_inner_parts(self) -> None:
        """An enclosing multipart's boundary ends every part inside it (RFC 2046 5.1.2)."""
        raw = (
            b'Content-Type: multipart/mixed; boundary="o"\r\n\r\n--o\r\n'
            b'Content-Type: multipart/alternative; boundary="i"\r\n\r\n--i\r\n\r\na\r\n'
            b"--o\r\n\r\nb\r\n--i\r\n\r\nnot a part of i\r\n--o--\r\n"
        )
        self.assertSameShape(raw)

    def test_same_boundary_nested(self) -> None:
        """A nested multipart reusing its parent's boundary gets no parts of its own."""
        raw = (
            b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
            b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n'
        )
        self.assertSameShape(raw)

    def test_repeated_boundary_lines(self) -> None:
        """Consecutive boundary lines (a close one too) make one part, as in the parser."""
        raw = flat(2).replace(b"--b\r\n", b"--b\r\n--b  \r\n--b--\r\n", 1)
        self.assertSameShape(raw)

    def test_message_parts_and_digest(self) -> None:
        """message/rfc822 parts, and a digest's parts that default to message/rfc822."""
        raw = (
            b'Content-Type: multipart/digest; boundary="d"\r\n\r\n--d\r\n\r\n'
            b"Subject: one\r\n\r\nbody\r\n--d\r\nContent-Type: message/rfc822\r\n\r\n"
            b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\n\r\ny\r\n--x--\r\n'
            b"--d\r\n--d--\r\n"
        )
        self.assertSameShape(raw)

    def test_header_fields_and_from_lines(self) -> None:
        """Header fields are counted as the parser counts them (continuations, From lines, ':' lines)."""
        raw = (
            b"From someone\r\nA: 1\r\n  more\r\n:no name\r\nFrom x\r\nB: 2\r\n\tc\r\nFrom y\r\n\r\nbody\r\n"
        )
        self.assertSameShape(raw)
        self.assertEqual(scanned(raw).header_end, raw.index(b"\r\n\r\n") + 2)

    def test_odd_boundary_parameters(self) -> None:
        """Quoted, folded, RFC 2231 and empty boundaries are read by the stdlib itself."""
        for param in (b'boundary="a b"', b"boundary=\r\n  q", b"boundary*=''x", b'boundary=""'):
            sep = b"--" + {b'boundary="a b"': b"a b", b"boundary=\r\n  q": b"q",
                           b"boundary*=''x": b"x", b'boundary=""': b""}[param]
            raw = b"Content-Type: multipart/mixed; " + param + b"\r\n\r\n" + sep + b"\r\n\r\nx\r\n" + sep + b"--\r\n"
            self.assertSameShape(raw)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def test_generated_structures(self, data: st.DataObject) -> None:
        """Random hostile structures: the scan agrees with the parser or gives up, never counts more."""
        raw = data.draw(_messages())
        pieces = data.draw(st.lists(st.integers(1, 30), max_size=40))
        expected = parsed_shape(raw)
        scan = scanned(raw, pieces)
        if scan.unsure:
            self.assertLessEqual(scan.parts, expected[0])
        else:
            self.assertEqual((scan.parts, scan.depth, scan.fields), expected, raw)


_BOUNDARIES = [b"a", b"b", b"ab", b"a b", b""]
_LEAF_TYPES = [
    b"Content-Type: text/plain",
    b"CONTENT-TYPE:\ttext/html; charset=x",
    b"Content-Type:\r\n  text/plain;\r\n\tformat=flowed",
    b"Content-Type: bogus",
    b"Content-Type: text/plain\xe9",
    b"Content-Type: message/delivery-status",
    b"Content-Type: text/plain\r\nContent-Type: multipart/mixed; boundary=a",
]
_EOLS = [b"\r\n", b"\n", b"\r"]


@st.composite
def _messages(draw: st.DrawFn) -> bytes:
    """A message built from random MIME pieces: multiparts, message parts, boundaries anywhere."""
    eol = draw(st.sampled_from(_EOLS + [b"\r\n"] * 3))

    def line() -> bytes:
        return draw(st.sampled_from(_EOLS)) if draw(st.booleans()) else eol

    def part(level: int) -> bytes:
        kind = draw(st.sampled_from(["text", "multi", "message", "digest", "bare"] if level < 4 else ["text"]))
        out = b""
        if draw(st.integers(0, 4)) == 0:
            out += b"X-Junk: " + draw(st.sampled_from([b"1", b"--a", b"x\r\n  folded"])) + line()
        if kind == "text":
            out += draw(st.sampled_from(_LEAF_TYPES)) + line() + line()
            for _ in range(draw(st.integers(0, 3))):
                out += draw(st.sampled_from([b"text", b"--a", b"--b--", b"--ab ", b"-", b"--", b""])) + line()
            return out
        if kind == "bare":
            return out + line() + b"bare" + line()
        if kind == "message":
            out += draw(st.sampled_from([b"Content-Type: message/rfc822", b"content-type:\tMESSAGE/news",
                                         b"Content-Type:\r\n message/rfc822; x=1"]))
            return out + line() + line() + part(level + 1)
        boundary = draw(st.sampled_from(_BOUNDARIES))
        subtype = b"digest" if kind == "digest" else b"mixed"
        spelling = draw(st.sampled_from([b"Content-Type: multipart/", b"content-type:Multipart/",
                                         b"Content-Type:\r\n\tmultipart/"]))
        out += spelling + subtype + b'; boundary="' + boundary + b'"' + line() + line()
        if draw(st.booleans()):
            out += b"preamble" + line()
        for _ in range(draw(st.integers(0, 3))):
            out += b"--" + boundary + draw(st.sampled_from([b"", b" ", b"\t "])) + line()
            out += part(level + 1)
        if draw(st.booleans()):
            out += b"--" + boundary + b"--" + line()
            if draw(st.booleans()):
                out += b"epilogue" + line() + b"--" + boundary + line()
        return out

    return b"From: a@example.com" + eol + part(0)


class LimitTests(SynchronousTestCase):
    def test_too_many_parts(self) -> None:
        """The part over the limit is refused with the parser's reply; the limit itself is not."""
        self.assertIsNone(scanned(flat(MAX_MIME_PARTS - 1), max_parts=MAX_MIME_PARTS).refusal)
        scan = scanned(flat(MAX_MIME_PARTS), max_parts=MAX_MIME_PARTS)
        self.assertEqual(scan.refusal, replies.too_many_mime_parts(MAX_MIME_PARTS))
        self.assertTrue(scan.stopped)

    def test_refused_early_and_then_idle(self) -> None:
        """A 100,000-part message is refused at its 1,001st part; what follows is not read."""
        raw = flat(100_000)
        scan = MimeScan()
        scan.feed(raw[:60_000])
        self.assertEqual(scan.refusal, replies.too_many_mime_parts(MAX_MIME_PARTS))
        self.assertEqual(scan.parts, MAX_MIME_PARTS + 1)
        scan.feed(raw[60_000:])
        scan.close()
        self.assertEqual(scan.parts, MAX_MIME_PARTS + 1)

    def test_too_deep(self) -> None:
        """MAX_MIME_DEPTH nested containers pass, one more is refused."""
        self.assertIsNone(scanned(nested(MAX_MIME_DEPTH), max_depth=MAX_MIME_DEPTH).refusal)
        self.assertEqual(
            scanned(nested(MAX_MIME_DEPTH + 1), max_depth=MAX_MIME_DEPTH).refusal,
            replies.mime_nested_too_deep(MAX_MIME_DEPTH),
        )

    def test_header_fields(self) -> None:
        """More than MAX_HEADER_FIELDS top-level fields; fields of inner parts do not count."""
        many = b"".join(b"X-%d: v\r\n" % n for n in range(MAX_HEADER_FIELDS + 1))
        self.assertEqual(
            MimeScan().refusal, None
        )
        self.assertEqual(scanned(many + b"\r\nbody\r\n", max_fields=MAX_HEADER_FIELDS).refusal,
                         replies.too_many_header_fields(MAX_HEADER_FIELDS))
        inner = flat(1).replace(b"Content-Type: text/plain\r\n", many)
        self.assertIsNone(scanned(inner, max_fields=MAX_HEADER_FIELDS).refusal)

    def test_header_section_size(self) -> None:
        """The header section rule of the parser: over MAX_HEADER_BYTES, or a header line running past it."""
        line = b"X-A: " + b"v" * 1000 + b"\r\n"
        fits = line * (MAX_HEADER_BYTES // len(line))
        big = fits + line
        for head, refused in [(fits, False), (big, True), (fits + b"X-B: " + b"w" * 3000, True)]:
            raw = head + (b"\r\nbody\r\n" if head.endswith(b"\n") else b"\r\n")
            expected = replies.header_section_too_large(MAX_HEADER_BYTES) if refused else None
            for pieces in ([], [65536] * 20, [7, 1000003]):
                self.assertEqual(scanned(raw, pieces, max_fields=UNLIMITED).refusal, expected)

    def test_long_dash_line_gives_up(self) -> None:
        """A '--' line over the line limit inside a multipart: the scan gives up, it does not guess."""
        raw = flat(1).replace(b"part 0", b"--b" + b" " * (MAX_HEADER_BYTES + 200_000))
        scan = scanned(raw, [65536] * 40)
        self.assertTrue(scan.unsure)
        self.assertIsNone(scan.refusal)

    def test_delivery_status_gives_up(self) -> None:
        """message/delivery-status (header blocks as parts) is left to the parser."""
        raw = flat(1).replace(b"Content-Type: text/plain", b"Content-Type: message/delivery-status")
        self.assertTrue(scanned(raw).unsure)

    def test_same_reply_as_the_parser(self) -> None:
        """Whatever the scan refuses, the full translation refuses with the same reply."""
        envelope = Envelope("a@example.com", ("b@example.com",))
        for raw in (flat(MAX_MIME_PARTS), nested(MAX_MIME_DEPTH + 1)):
            scan = scanned(raw, max_parts=MAX_MIME_PARTS, max_depth=MAX_MIME_DEPTH)
            self.assertIsNotNone(scan.refusal)
            with self.assertRaises(TranslationError) as caught:
                translate(raw, envelope)
            self.assertEqual(caught.exception.reply, scan.refusal)
