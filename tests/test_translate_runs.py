# -*- test-case-name: tests.test_translate_runs -*-
"""
The parser's fast path for long runs of base64 lines
(L{poststack_relay.translate._skeleton} and L{_restore}): the tree it
builds is the tree the plain parse builds, for every message of the MIME
corpus and for generated messages that put runs everywhere a line can be,
and the scan stays linear on hostile input.
"""

from __future__ import annotations

import re
from email.message import Message
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

import poststack_relay.translate.parse as translate_module
from poststack_relay.translate import Envelope, translate
from poststack_relay.translate.parse import _skeleton
from poststack_relay.translate.parse import parse_message as _parse
from tests.common.corpus import MIME_DIR


def dump(message: Message) -> list[Any]:
    """Everything the relay reads from a parsed tree, part by part, in order."""
    out: list[Any] = []
    stack = [message]
    while stack:
        part = stack.pop(0)
        payload = part._payload  # type: ignore[attr-defined]
        out.append(
            (
                list(part.raw_items()),
                part.preamble,
                part.epilogue,
                part.get_unixfrom(),
                [type(d).__name__ for d in part.defects],
                payload if isinstance(payload, str) else len(payload),
            )
        )
        if isinstance(payload, list):
            stack[0:0] = [child for child in payload if isinstance(child, Message)]
    return out


class FastPathMixin:
    """Parse with the fast path on for any size and any run length, or off."""

    patch: Any

    def parse_both(self, raw: bytes) -> tuple[list[Any], list[Any]]:
        self.patch(translate_module, "_RUN_MIN_MESSAGE", 10**12)
        plain = dump(_parse(raw))
        self.patch(translate_module, "_RUN_MIN_MESSAGE", 0)
        self.patch(translate_module, "_RUN_MIN_LINES", 1)
        fast = dump(_parse(raw))
        return plain, fast


class CorpusEquivalenceTests(FastPathMixin, SynchronousTestCase):
    """Every corpus message parses to the same tree either way."""

    def test_corpus(self) -> None:
        """Same tree for all 50 corpus messages, and the fast path really replaced runs in most of them."""
        names = sorted(MIME_DIR.glob("*.eml"))
        self.assertGreaterEqual(len(names), 40)
        replaced = 0
        for path in names:
            raw = path.read_bytes()
            plain, fast = self.parse_both(raw)
            self.assertEqual(plain, fast, path.name)
            if _skeleton(raw)[2]:
                replaced += 1
        self.assertGreater(replaced, len(names) // 2)


LINE_ENDINGS = st.sampled_from([b"\r\n", b"\n", b"\r"])
BASE64_LINE = st.binary(min_size=1, max_size=12).map(
    lambda b: bytes(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="[x % 65] for x in b)
)
OTHER_LINE = st.sampled_from(
    [b"", b"--b1", b"--b1--", b"--b2", b"--b2--", b" folded", b"\tfolded", b"X-H: v", b"From x",
     b"a b", b"Content-Type: text/plain", b"-- ", b"=?utf-8?q?x?=", b"==", b"QUJD"]
)


@st.composite
def messages(draw: Any) -> bytes:
    """A message of structural lines and base64-alphabet lines in any order."""
    head = draw(st.sampled_from([
        b"Content-Type: multipart/mixed; boundary=b1\r\n",
        b"Content-Type: multipart/alternative; boundary=\"b1\"\r\n",
        b"Content-Type: message/rfc822\r\n",
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=b1\r\n",
        b"Content-Type: text/plain\r\n",
        b"",
    ]))
    lines = draw(st.lists(st.one_of(BASE64_LINE, OTHER_LINE, BASE64_LINE, BASE64_LINE), max_size=60))
    ending = draw(LINE_ENDINGS)
    mixed = draw(st.booleans())
    out = [b"From: a@example.com\r\n", head]
    for line in lines:
        out.append(line + (draw(LINE_ENDINGS) if mixed else ending))
    if draw(st.booleans()) and out[-1:]:
        out[-1] = out[-1].rstrip(b"\r\n")  # no final line ending
    return b"".join(out)


class GeneratedEquivalenceTests(FastPathMixin, SynchronousTestCase):
    """Generated messages parse to the same tree either way."""

    @settings(max_examples=300, deadline=None)
    @given(messages())
    def test_generated(self, raw: bytes) -> None:
        """Runs in headers, preambles, epilogues, bodies, before boundaries, with any line endings: same tree."""
        plain, fast = self.parse_both(raw)
        self.assertEqual(plain, fast)

    @settings(max_examples=300, deadline=None)
    @given(messages(), st.integers(1, 200))
    def test_windowed_run_scan(self, raw: bytes, window: int) -> None:
        """The runs found a window at a time (any window size) are those one scan of the whole finds."""
        self.patch(translate_module, "_WINDOW", window)
        whole = [m.span() for m in translate_module._BASE64_RUN.finditer(raw)]
        self.assertEqual(list(translate_module._base64_runs(raw)), whole)
        for start, end in whole:
            lines = len(re.findall(rb"\r\n|\r|\n", raw[start:end]))
            self.assertEqual(translate_module._line_count(raw, start, end, 10**9), lines)

    def test_run_before_boundary(self) -> None:
        """A run right before a boundary: its last line ending goes to the boundary, as in the plain parse."""
        body = b"QUJD\r\n" * 300
        raw = (b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n--b1\r\n"
               b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
               + body + b"--b1--\r\n")
        plain, fast = self.parse_both(raw)
        self.assertEqual(plain, fast)
        self.assertTrue(fast[1][5].endswith("QUJD") and not fast[1][5].endswith("\r\n"))

    def test_token_in_message(self) -> None:
        """Text that looks like a token is left alone (the token has a fresh random part)."""
        raw = b"From: a@example.com\r\n\r\nPSRRUN0000000000000000N0X\r\n" + b"QUJD\r\n" * 300
        plain, fast = self.parse_both(raw)
        self.assertEqual(plain, fast)


class LargeMessageTests(SynchronousTestCase):
    """The default thresholds on real sizes."""

    def attachment_message(self, lines: int) -> bytes:
        return (b"From: a@example.com\r\nTo: b@example.com\r\nSubject: s\r\n"
                b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n--b1\r\n"
                b"Content-Type: text/plain\r\n\r\nhello\r\n--b1\r\n"
                b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
                b"Content-Disposition: attachment; filename=a.bin\r\n\r\n"
                + b"QUJDRA==\r\n" * 0 + (b"A" * 76 + b"\r\n") * lines + b"--b1--\r\n")

    def test_same_request(self) -> None:
        """A 3 MB attachment: the fast path is taken and the API request is the same as without it."""
        raw = self.attachment_message(40_000)
        self.assertEqual(len(_skeleton(raw)[2]), 1)
        envelope = Envelope("a@example.com", ("b@example.com",))
        fast = translate(raw, envelope)
        self.patch(translate_module, "_RUN_MIN_MESSAGE", 10**12)
        self.assertEqual(translate(raw, envelope), fast)
        self.assertEqual(fast.payload["attachments"][0]["content"], "A" * 76 * 40_000)

    def test_hostile_runs_linear(self) -> None:
        """Many runs just below the minimum length: none replaced (the possessive scan reads each once)."""
        chunk = b"QUJD\r\n" * (translate_module._RUN_MIN_LINES - 1) + b"a b\r\n"
        raw = b"From: a@example.com\r\n\r\n" + chunk * 2000
        skeleton, _, runs = _skeleton(raw)
        self.assertEqual((skeleton, runs), (raw, []))


