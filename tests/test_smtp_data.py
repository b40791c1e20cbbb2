# -*- test-case-name: tests.test_smtp_data -*-
"""
DATA through the protocol: the terminator at every chunk boundary,
dot-unstuffing, the size limit, overlong lines and bare LF / lone CR in
message content (what the delivery receives is recorded byte for byte).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.api import APIError
from poststack_relay.replies import Reply, too_many_mime_parts
from poststack_relay.smtp import DATA_HOLD_LIMIT, DataScanner
from poststack_relay.translate import MAX_MIME_PARTS
from poststack_relay.translate import message as translate_message
from tests.common.smtp import MESSAGE, normalised, queued, ready, stuff

TRICKY = [
    b"",
    b"\r\n",
    b".\r\n",
    b"..\r\n",
    b".x\r\n",
    b"\r\n.\r\n",
    b"a\r\n.\r\n.\r\nb\r\n",
    MESSAGE,
    b"Subject: x\r\n\r\n.leading\r\n..two\r\n...\r\n.\r\nend\r\n",
    b"a\n.\nb\r.\rc\r\n.\nd\n.\r\ne\r\r\n.\r\r\n",
    b"\n.\r\n",
    b"x\r\n\r\n.\r\n\r\n",
    b"bin \x00\xff\xfe\x80 \xc3\xa9\r\n.\x00\r\n",
    b"\r\r\n..\r\n",
]


class DataScanningTests(SynchronousTestCase):
    def assertDelivered(self, message: bytes, *pieces: bytes) -> None:
        """Fed C{pieces} after DATA, exactly C{message} (bare LFs made CRLF) is delivered, with one reply (the translation's verdict, not the scanner's)."""
        h = ready()
        h.open_data()
        out = h.feed(*pieces)
        self.assertEqual((len(out), h.raws), (1, [normalised(message)]), (message, pieces, out))
        self.assertTrue(out[0] == queued(1) or out[0][:1] == b"5", out)

    def test_every_single_split(self) -> None:
        """Each tricky message arrives intact and ends exactly at its terminator whichever byte the chunk boundary falls after."""
        for message in TRICKY:
            wire = stuff(message)
            for k in range(len(wire) + 1):
                self.assertDelivered(message, wire[:k], wire[k:])

    def test_every_double_split(self) -> None:
        """Two chunk boundaries anywhere in a short message with stuffed dots next to the terminator change nothing."""
        message = b".a\r\n..\r\n.\r\n"
        wire = stuff(message)
        for i in range(len(wire) + 1):
            for j in range(i, len(wire) + 1):
                self.assertDelivered(message, wire[:i], wire[i:j], wire[j:])

    def test_byte_by_byte(self) -> None:
        """Fed one byte at a time, every tricky message arrives intact with one reply."""
        for message in TRICKY:
            wire = stuff(message)
            self.assertDelivered(message, *[wire[n : n + 1] for n in range(len(wire))])

    def test_empty_message(self) -> None:
        """DATA followed at once by the dot hands an empty message over, with exactly one reply."""
        h = ready()
        h.open_data()
        out = h.feed(b".\r\n")
        self.assertEqual(h.raws, [b""])
        self.assertEqual(len(out), 1, out)

    def test_bare_terminator_lookalikes(self) -> None:
        """\\n.\\n, \\r.\\r, \\r\\n.\\n and \\n.\\r\\n never end DATA, in one chunk or split."""
        for fake in (b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r\n.\r", b"\r\n.\r\r\n"):
            message = b"Subject: x\r\n\r\nbody" + fake + b"more\r\n"
            wire = stuff(message)
            self.assertNotIn(b"\r\n.\r\n", wire[:-3])
            for k in range(len(wire) + 1):
                self.assertDelivered(message, wire[:k], wire[k:])

    def test_input_after_terminator_is_a_command(self) -> None:
        """Bytes after the terminator in the same chunk are commands, however the chunk is cut."""
        wire = stuff(MESSAGE) + b"NOOP\r\n"
        for k in range(len(wire) + 1):
            h = ready()
            h.open_data()
            self.assertEqual(h.feed(wire[:k], wire[k:]), [queued(1), b"250 2.0.0 Ok"])
            self.assertEqual(h.raws, [MESSAGE])

    def test_overlong_line_then_terminator(self) -> None:
        """A line longer than the hold limit, with the terminator split across chunks anywhere, arrives intact."""
        long_line = b"A" * (DATA_HOLD_LIMIT + 5000)
        for message in (
            b"Subject: x\r\n\r\n" + long_line + b"\r\n",
            b"Subject: x\r\n\r\n" + long_line + b"\r\r\n",
            b"." + long_line + b"\r\n.\r\n",
            long_line + b"\r\n" + long_line + b"\r\n",
        ):
            wire = stuff(message)
            for k in list(range(len(wire) - 12, len(wire) + 1)) + [DATA_HOLD_LIMIT, DATA_HOLD_LIMIT + 1]:
                self.assertDelivered(message, wire[:k], wire[k:])
            # In pieces small enough to trip the hold limit several times.
            self.assertDelivered(message, *[wire[n : n + 40000] for n in range(0, len(wire), 40000)])

    def test_overlong_line_holds_little(self) -> None:
        """While a line without CRLF grows, the scanner holds at most the hold limit plus one chunk."""
        h = ready()
        h.open_data()
        chunk = b"x" * 10000
        for _ in range(30):
            h.proto.dataReceived(chunk)
            self.assertLessEqual(h.held, DATA_HOLD_LIMIT + len(chunk))
        self.assertEqual(h.feed(b"\r\n.\r\n"), [queued(1)])
        self.assertEqual(h.raws, [chunk * 30 + b"\r\n"])

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        lines=st.lists(
            st.binary(max_size=12).map(lambda b: b.replace(b"\r\n", b"\r")).flatmap(
                lambda b: st.sampled_from([b, b"." + b, b".", b"..", b"\r" + b, b + b"\n."])
            ),
            max_size=8,
        ),
        cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=6),
    )
    def test_any_message_any_cuts(self, lines: list[bytes], cuts: list[int]) -> None:
        """Any message of CRLF-ended lines (with CR, LF and dots anywhere) cut anywhere arrives byte-for-byte."""
        message = b"".join(line + b"\r\n" for line in lines)
        wire = stuff(message)
        bounds = sorted({0, len(wire), *(c for c in cuts if c < len(wire))})
        pieces = [wire[a:b] for a, b in zip(bounds, bounds[1:])]
        self.assertDelivered(message, *pieces)


class SizeLimitTests(SynchronousTestCase):
    LIMIT = 1000

    def body(self, size: int) -> bytes:
        """A message of exactly C{size} octets whose lines start with dots."""
        line = b".dotted line of text................................................\r\n"
        message = (line * (size // len(line) + 1))[: size - 2] + b"\r\n"
        assert len(message) == size
        return message

    def test_exactly_at_limit(self) -> None:
        """A message of exactly the limit (counted after unstuffing) is delivered."""
        h = ready(max_message_size=self.LIMIT)
        h.open_data()
        message = self.body(self.LIMIT)
        self.assertEqual(h.feed(stuff(message)), [queued(1)])
        self.assertEqual(h.raws, [message])

    def test_one_over_limit(self) -> None:
        """One octet over the limit is refused with 552 5.3.4 after the dot, nothing is delivered and the session goes on."""
        h = ready(max_message_size=self.LIMIT)
        h.open_data()
        out = h.feed(stuff(self.body(self.LIMIT + 1)))
        self.assertEqual(
            out, [b"552 5.3.4 Message size exceeds fixed maximum message size of 1000 octets"]
        )
        self.assertEqual((h.raws, h.api.sent), ([], []))
        self.assertEqual(h.send(b"NOOP\r\n"), [b"250 2.0.0 Ok"])
        h.open_data()
        self.assertEqual(h.feed(stuff(MESSAGE)), [queued(1)])
        self.assertEqual(h.raws, [MESSAGE])

    def test_nothing_kept_past_limit(self) -> None:
        """Streaming far past the limit keeps at most the limit in memory, and the reply still comes at the dot."""
        h = ready(max_message_size=self.LIMIT)
        h.open_data()
        line = b"y" * 98 + b"\r\n"
        for _ in range(2000):
            self.assertEqual(h.feed(line * 5), [])
            self.assertLessEqual(h.kept, self.LIMIT)
            self.assertLessEqual(h.held, DATA_HOLD_LIMIT)
        self.assertTrue(h.feed(b".\r\n")[0].startswith(b"552 5.3.4 "))
        self.assertIsNone(h.proto.state.scanner)

    def test_over_limit_in_one_long_line(self) -> None:
        """One line without CRLF far over the limit is cut off in memory too."""
        h = ready(max_message_size=self.LIMIT)
        h.open_data()
        for _ in range(50):
            h.proto.dataReceived(b"z" * 20000)
            self.assertLessEqual(h.kept, self.LIMIT)
        self.assertTrue(h.feed(b"\r\n.\r\n")[0].startswith(b"552 5.3.4 "))


class LongLineTests(SynchronousTestCase):
    # Ten million octets of body on one line: far past RFC 5321's 1000.
    LINE = (b"0123456789" * 1_000_000)
    MESSAGE = b"From: you@yourdomain.com\r\nTo: user@example.com\r\nSubject: long\r\n\r\n" + LINE + b"\r\n"

    def chunks(self, wire: bytes, size: int = 16384) -> list[bytes]:
        """C{wire} cut as TLS records would cut it."""
        return [wire[n : n + size] for n in range(0, len(wire), size)]

    def test_ten_megabyte_line_relayed_intact(self) -> None:
        """A 10 MB single-line message under the size limit is accepted and handed on byte for byte, while little is held."""
        h = ready()
        h.open_data()
        out: list[bytes] = []
        for chunk in self.chunks(stuff(self.MESSAGE)):
            out += h.feed(chunk)
            self.assertLessEqual(h.held, DATA_HOLD_LIMIT + 16384)
        self.assertEqual(out, [queued(1)])
        self.assertEqual(h.raws, [self.MESSAGE])
        text = h.api.sent[0][1].payload["text"]
        self.assertEqual(text.replace("\r\n", "\n").strip("\n"), self.LINE.decode())

    def test_ten_megabyte_line_over_limit(self) -> None:
        """The same line with a limit one octet smaller gets 552 5.3.4, and nothing past the limit is ever kept."""
        limit = len(self.MESSAGE) - 1
        h = ready(max_message_size=limit)
        h.open_data()
        out: list[bytes] = []
        for chunk in self.chunks(stuff(self.MESSAGE)):
            out += h.feed(chunk)
            self.assertLessEqual(h.kept, limit)
            self.assertLessEqual(h.held, DATA_HOLD_LIMIT + 16384)
        self.assertEqual(
            out, [b"552 5.3.4 Message size exceeds fixed maximum message size of %d octets" % limit]
        )
        self.assertEqual((h.raws, h.api.sent, h.proto.state.scanner), ([], [], None))

    def test_line_of_1001_octets(self) -> None:
        """A line just over RFC 5321's 1000 octets (CRLF included) is accepted unchanged."""
        h = ready()
        h.open_data()
        message = b"Subject: x\r\n\r\n" + b"y" * 999 + b"\r\n"
        self.assertEqual(h.feed(stuff(message)), [queued(1)])
        self.assertEqual(h.raws, [message])


class NewlineTests(SynchronousTestCase):
    def delivered(self, *pieces: bytes) -> bytes:
        """Feed C{pieces} after DATA; the one message delivered."""
        h = ready()
        h.open_data()
        out = h.feed(*pieces)
        self.assertEqual(out, [queued(1)])
        [raw] = h.raws
        return raw

    def test_bare_lf_normalised(self) -> None:
        """A message written with LF only (as PHP scripts do) is handed on with CRLF."""
        raw = self.delivered(b"From: you@yourdomain.com\nSubject: lf\n\nline one\nline two\n\r\n.\r\n")
        self.assertEqual(raw, b"From: you@yourdomain.com\r\nSubject: lf\r\n\r\nline one\r\nline two\r\n\r\n")

    def test_lone_cr_is_data(self) -> None:
        """A CR not followed by LF is passed on as it is, and CRCRLF keeps its first CR."""
        self.assertEqual(self.delivered(b"a\rb\r\r\nc\r\n.\r\n"), b"a\rb\r\r\nc\r\n")

    def test_lf_dot_lines_are_content(self) -> None:
        """Dot lines ended by a bare LF are content: the dot stays unless it followed a CRLF (RFC 5321 unstuffing)."""
        self.assertEqual(self.delivered(b"a\n.\nb\r\n.\nc\r\n.\r\n"), b"a\r\n.\r\nb\r\n\r\nc\r\n")

    def test_crlf_message_unchanged(self) -> None:
        """A well-formed CRLF message is handed on exactly."""
        message = b"Subject: x\r\n\r\n\r\n\r\nend\r\n"
        self.assertEqual(self.delivered(stuff(message)), message)

    def test_bare_lf_at_every_chunk_boundary(self) -> None:
        """A CR and its LF split across chunks are one CRLF, a lone LF after a split is normalised."""
        message = b"\na\r\nb\nc\r\n\nd\r\r\ne\n\r\n"
        wire = stuff(message)
        for k in range(len(wire) + 1):
            self.assertEqual(self.delivered(wire[:k], wire[k:]), normalised(message), k)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        body=st.lists(st.sampled_from([b"\r", b"\n", b".", b"x", b"\r\n", b"\r\n."]), max_size=30),
        cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=5),
    )
    def test_any_cr_lf_mix_any_cuts(self, body: list[bytes], cuts: list[int]) -> None:
        """Any mix of CR, LF and dots, cut anywhere, is delivered with exactly its bare LFs made CRLF."""
        message = b"".join(body) + b"\r\n"
        wire = stuff(message)
        bounds = sorted({0, len(wire), *(c for c in cuts if c < len(wire))})
        self.assertEqual(
            self.delivered(*[wire[a:b] for a, b in zip(bounds, bounds[1:])]), normalised(message)
        )

    def test_api_failure_reply_kept(self) -> None:
        """A normalised message that the API refuses gets the API's reply, not a 250."""
        h = ready()
        h.api.next_error = APIError(Reply(554, "5.6.0", "PostStack API: refused (HTTP 422)"))
        h.open_data()
        self.assertEqual(h.feed(b"Subject: x\n\nbody\n\r\n.\r\n"), [b"554 5.6.0 PostStack API: refused (HTTP 422)"])


def scan(*pieces: bytes, max_size: int = 10**9) -> tuple[DataScanner, bytes | None]:
    """A scanner fed C{pieces} up to the terminator: the scanner and the input after it (C{None} if there is no terminator)."""
    scanner = DataScanner(max_size)
    for n, piece in enumerate(pieces):
        rest = scanner.feed(piece)
        if rest is not None:
            return scanner, rest + b"".join(pieces[n + 1 :])
    return scanner, None


class DataScannerTests(SynchronousTestCase):
    """The scanner alone (L{poststack_relay.smtp.data}), without a transport."""

    def test_terminator_and_rest(self) -> None:
        """The content ends at CRLF.CRLF; what follows is handed back, not content."""
        scanner, rest = scan(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        self.assertEqual(rest, b"QUIT\r\n")
        self.assertEqual(scanner.message(), b"Subject: x\r\n\r\nbody\r\n")
        self.assertEqual(scanner.size, len(b"Subject: x\r\n\r\nbody\r\n"))

    def test_empty_message(self) -> None:
        """A dot right after the DATA command's CRLF ends an empty message."""
        scanner, rest = scan(b".\r\n")
        self.assertEqual((scanner.message(), rest), (b"", b""))

    def test_needs_more(self) -> None:
        """Until the terminator arrives, feed returns None, whatever the cut."""
        scanner = DataScanner(1000)
        for piece in (b"a\r", b"\n", b".", b"\r"):
            self.assertIsNone(scanner.feed(piece))
        self.assertEqual(scanner.feed(b"\n"), b"")
        self.assertEqual(scanner.message(), b"a\r\n")

    def test_only_crlf_dot_crlf_ends(self) -> None:
        """LF.LF, CR.CR, LF.CRLF and CRLF.LF are content (bare LFs made CRLF), never the end."""
        for lookalike, content in [
            (b"\n.\n", b"\r\n.\r\n"),
            (b"\r.\r", b"\r.\r"),
            (b"\n.\r\n", b"\r\n.\r\n"),
            # After CRLF the dot is a stuffed one: the line is a bare LF.
            (b"\r\n.\n", b"\r\n\r\n"),
        ]:
            scanner, rest = scan(b"a" + lookalike + b"b\r\n.\r\n")
            self.assertEqual(rest, b"", lookalike)
            self.assertEqual(scanner.message(), b"a" + content + b"b\r\n", lookalike)

    def test_dot_unstuffing(self) -> None:
        """A leading dot is removed from each line that has one, the first line included."""
        scanner, _ = scan(b"..first\r\n...\r\nmid.dle\r\n..\r\n.\r\n")
        self.assertEqual(scanner.message(), b".first\r\n..\r\nmid.dle\r\n.\r\n")

    def test_every_cut(self) -> None:
        """Cut anywhere into two chunks, each tricky message comes out the same."""
        for message in TRICKY:
            wire = stuff(message) + b"NOOP\r\n"
            for k in range(len(wire) + 1):
                scanner, rest = scan(wire[:k], wire[k:])
                self.assertEqual((scanner.message(), rest), (normalised(message), b"NOOP\r\n"), (message, k))

    def test_size_limit(self) -> None:
        """At the limit the message is kept; one octet over, nothing is kept and message() is None, but the size is counted to the end."""
        scanner, _ = scan(b"x" * 8 + b"\r\n.\r\n", max_size=10)
        self.assertEqual(scanner.message(), b"x" * 8 + b"\r\n")
        scanner, _ = scan(b"x" * 9 + b"\r\n", b"y" * 100 + b"\r\n.\r\n", max_size=10)
        self.assertTrue(scanner.too_big)
        self.assertEqual(scanner.kept, 0)
        self.assertIsNone(scanner.message())
        self.assertEqual(scanner.size, 113)

    def test_size_counts_normalised_content(self) -> None:
        """The size is that of the content handed on: unstuffed, bare LF made CRLF."""
        scanner, _ = scan(b"..a\nb\r\n.\r\n")
        self.assertEqual((scanner.size, scanner.message()), (7, b".a\r\nb\r\n"))

    def test_hold_limit(self) -> None:
        """A line without CRLF is passed on past the hold limit: little is held, and the line arrives whole."""
        scanner = DataScanner(10**9)
        for _ in range(40):
            self.assertIsNone(scanner.feed(b"z" * 5000))
            self.assertLessEqual(scanner.held, DATA_HOLD_LIMIT + 5000)
        self.assertEqual(scanner.feed(b"\r\n.\r\n"), b"")
        self.assertEqual(scanner.message(), b"z" * 200000 + b"\r\n")

    def test_message_lets_go(self) -> None:
        """After message() the scanner keeps no content."""
        scanner, _ = scan(b"x" * 1000 + b"\r\n.\r\n")
        self.assertEqual(len(scanner.message() or b""), 1002)
        self.assertEqual(scanner.kept, 0)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"\x00", b"\xff"]), max_size=40),
        st.lists(st.integers(min_value=0, max_value=200), max_size=6),
    )
    def test_any_content_any_cuts(self, parts: list[bytes], cuts: list[int]) -> None:
        """Any content, stuffed and cut anywhere, comes out normalised and whole, and the input after the terminator is handed back."""
        content = b"".join(parts)
        if content and not content.endswith(b"\r\n"):
            content += b"\r\n"
        if content.endswith(b"\r\r\n"):
            content = content[:-3] + b"\r\n"
        wire = stuff(content) + b"RSET\r\n"
        positions = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
        scanner, rest = scan(*(wire[a:b] for a, b in zip(positions, positions[1:])))
        self.assertEqual((scanner.message(), rest), (normalised(content), b"RSET\r\n"))


def _parts(count: int) -> bytes:
    """A multipart/mixed message of C{count} small text parts."""
    head = b'From: you@yourdomain.com\r\nTo: user@example.com\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
    return head + b"".join(b"--b\r\n\r\npart %d\r\n" % n for n in range(count)) + b"--b--\r\n"


class MimeScanWhileReceivingTests(SynchronousTestCase):
    """The MIME limits followed while DATA arrives (L{poststack_relay.translate.MimeScan})."""

    def test_only_large_messages_scanned(self) -> None:
        """A message under C{scan_from} octets is not scanned; a larger one is, from its first octet."""
        small = DataScanner(10**9, scan_from=10_000)
        small.feed(stuff(_parts(3)))
        self.assertIsNone(small.mime)
        raw = _parts(MAX_MIME_PARTS - 1)
        large = DataScanner(10**9, scan_from=10_000)
        wire = stuff(raw)
        for start in range(0, len(wire), 1000):
            large.feed(wire[start : start + 1000])
        self.assertEqual(large.message(), raw)
        assert large.mime is not None
        self.assertEqual((large.mime.parts, large.mime.refusal), (MAX_MIME_PARTS, None))

    def test_hostile_message_refused_before_its_end(self) -> None:
        """Past the part limit, the scan has its refusal while the message is still arriving."""
        scanner = DataScanner(10**9, scan_from=10_000)
        scanner.feed(stuff(_parts(5000))[:100_000])
        assert scanner.mime is not None
        self.assertEqual(scanner.mime.refusal, too_many_mime_parts(MAX_MIME_PARTS))

    def test_refused_at_the_end_without_a_full_parse(self) -> None:
        """Through the protocol: the parts refusal at the dot, and the message never parsed in full."""

        def full_parse(message: object) -> None:
            raise AssertionError("parsed in full")

        self.patch(translate_message, "check_limits", full_parse)
        h = ready()
        h.open_data()
        out = h.feed(stuff(_parts(20_000)))
        reply = too_many_mime_parts(MAX_MIME_PARTS)
        self.assertEqual(out, [b"%d %s %s" % (reply.code, reply.enhanced.encode(), reply.text.encode())])
