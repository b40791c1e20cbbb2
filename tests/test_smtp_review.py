"""
A second look at the SMTP protocol (L{poststack_relay.smtp}): DATA scanning
across every chunk boundary, the size limit, pipelining and flow control,
AUTH edge cases, MAIL/RCPT parsing, and the idle timer around API waits.

All synchronous: a StringTransport (or iosim for real TLS), a Clock and an
in-memory API.  What the delivery avatar receives is recorded byte for byte.
"""

from __future__ import annotations

import base64
import re
import shutil
import tempfile
from typing import Any

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.api import IEmailAPI
from poststack_relay.auth import Identity, PostStackChecker, RelayRealm
from poststack_relay.config import RelayConfig
from poststack_relay.delivery import RelayDelivery
from poststack_relay.replies import Reply
from poststack_relay.smtp import (
    DATA_HOLD_LIMIT,
    MAX_AUTH_LINE,
    MAX_COMMAND_LINE,
    MAX_PENDING_INPUT,
    RelayFactory,
    RelaySMTP,
)
from poststack_relay.testing import MemoryEmailAPI, write_certificate
from poststack_relay.tls import ImplicitTLSFactory, load_certificate_options
from poststack_relay.translate import Envelope
from tests.test_smtp import KEY, MESSAGE, Harness, plain

START = b"354 End data with <CR><LF>.<CR><LF>"
BEGIN = b"MAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n"
AUTH_OK = b"235 2.7.0 Authentication successful"
LINE_TOO_LONG = b"500 5.5.2 Error: line too long"
TIMEOUT = b"421 4.4.2 Error: timeout exceeded, closing connection"
TOO_MANY_ERRORS = b"421 4.7.0 Error: too many errors, closing connection"


def queued(n: int) -> bytes:
    """The reply to the C{n}th message the in-memory API accepted."""
    return b"250 2.0.0 Ok: queued as em_%020d" % n


def normalised(message: bytes) -> bytes:
    """C{message} as the relay hands it on: every bare LF made CRLF."""
    return re.sub(rb"(?<!\r)\n", b"\r\n", message)


def stuff(message: bytes) -> bytes:
    """
    What a client sends for C{message} (which is empty or ends in CRLF):
    dot-stuffed, with the terminator.
    """
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


@attrs.define
class HoldingAPI(MemoryEmailAPI):
    """
    A MemoryEmailAPI whose API-key checks can be held pending too.
    """

    hold_checks: bool = False
    pending_checks: list[tuple["Deferred[bool]", bool]] = attrs.field(factory=list)

    def check_api_key(self, api_key: str) -> "Deferred[bool]":
        if not self.hold_checks:
            return super().check_api_key(api_key)
        self.checks += 1
        d: Deferred[bool] = Deferred()
        self.pending_checks.append((d, api_key in self.api_keys))
        return d

    def release_checks(self) -> None:
        """Answer every held API-key check."""
        pending, self.pending_checks = self.pending_checks, []
        for d, result in pending:
            d.callback(result)


class RecordingDelivery(RelayDelivery):
    """
    A RelayDelivery that records each transaction it is handed.
    """

    def __init__(self, identity: Identity, api: IEmailAPI, record: list[tuple[Envelope, bytes]]) -> None:
        super().__init__(identity, api)
        self.record = record

    def deliver(
        self, envelope: Envelope, raw: bytes, session: str = "-", client: str = "-"
    ) -> "Deferred[Reply]":
        self.record.append((envelope, raw))
        return super().deliver(envelope, raw, session, client)


class ReviewHarness(Harness):
    """
    The byte-level harness of test_smtp, with an API whose checks can be
    held and a delivery that records the raw bytes it is handed.
    """

    def __init__(self, **config: Any) -> None:
        self.api = HoldingAPI(api_keys={KEY}, mailboxes={"alice@yourdomain.com": "mbpass"})
        self.clock = Clock()
        self.record: list[tuple[Envelope, bytes]] = []
        cfg = RelayConfig(metrics_listen="off", 
            tls_cert="unused.pem", hostname="relay.test", service_key="sk_test_service", **config
        )
        checker = PostStackChecker(self.api, self.clock, cfg.service_key)
        realm = RelayRealm(lambda i: RecordingDelivery(i, self.api, self.record))
        self.factory = RelayFactory(Portal(realm, [checker]), cfg, self.clock)
        self.proto: RelaySMTP = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 5555))
        self.proto.makeConnection(self.transport)

    @property
    def raws(self) -> list[bytes]:
        """The raw messages handed to the delivery, in order."""
        return [raw for _, raw in self.record]

    @property
    def held(self) -> int:
        """Octets the DATA scanner holds back (0 outside DATA)."""
        scanner = self.proto.state.scanner
        return 0 if scanner is None else scanner.held

    @property
    def kept(self) -> int:
        """Octets of message content kept so far (0 outside DATA)."""
        scanner = self.proto.state.scanner
        return 0 if scanner is None else scanner.kept

    def feed(self, *pieces: bytes) -> list[bytes]:
        """
        Deliver C{pieces} as separate chunks; the reply lines they caused.
        """
        self.transport.clear()
        for piece in pieces:
            self.proto.dataReceived(piece)
        return self.transport.value().split(b"\r\n")[:-1]

    def open_data(self) -> None:
        """MAIL, RCPT and DATA, checking that DATA mode began."""
        assert self.send(BEGIN) == [b"250 2.1.0 Ok", b"250 2.1.5 Ok", START]


def ready(**config: Any) -> ReviewHarness:
    """A session that has sent EHLO and logged in with the API key."""
    h = ReviewHarness(**config)
    h.login()
    return h


# Messages that exercise the scanner: leading dots, lines that are only
# dots, lone CR and LF next to dots, 8-bit and NUL bytes.
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


class PipeliningTests(SynchronousTestCase):
    def test_whole_session_byte_by_byte(self) -> None:
        """A whole session sent one byte at a time gets the same replies as sent at once."""
        session = (
            b"EHLO client.test\r\nAUTH PLAIN " + plain("poststack", KEY) + b"\r\n"
            + BEGIN + stuff(MESSAGE) + b"RSET\r\nQUIT\r\n"
        )
        at_once = ReviewHarness()
        expected = at_once.feed(session)
        slow = ReviewHarness()
        self.assertEqual(slow.feed(*[session[n : n + 1] for n in range(len(session))]), expected)
        self.assertEqual(expected[-3:], [queued(1), b"250 2.0.0 Ok", b"221 2.0.0 Bye"])
        self.assertEqual(slow.raws, [MESSAGE])

    def test_many_transactions_in_one_chunk(self) -> None:
        """300 pipelined transactions in one chunk, delivered synchronously, all get their replies in order."""
        h = ready()
        count = 300
        out = h.send((BEGIN + stuff(MESSAGE)) * count + b"QUIT\r\n")
        expected = [b"250 2.1.0 Ok", b"250 2.1.5 Ok", START]
        self.assertEqual(
            out,
            [line for n in range(1, count + 1) for line in expected + [queued(n)]] + [b"221 2.0.0 Bye"],
        )
        self.assertEqual(h.raws, [MESSAGE] * count)

    def test_long_batch_answered(self) -> None:
        """1 MiB of pipelined NOOPs in one chunk is answered line for line (its cost is a benchmark matter, not a unit test's)."""
        data = b"NOOP\r\n" * (1024 * 1024 // 6)
        h = ReviewHarness()
        h.proto.dataReceived(data)
        self.assertEqual(h.transport.value().count(b"250 2.0.0 Ok\r\n"), 1024 * 1024 // 6)
        self.assertEqual(h.proto._buf, b"")

    def test_recipients_over_limit_are_not_errors(self) -> None:
        """A pipelined batch of RCPTs far over the limit gets 452 for the excess, is not closed, and the message goes to the accepted ones."""
        h = ready(max_recipients=2)
        rcpts = b"".join(b"RCPT TO:<r%d@example.com>\r\n" % n for n in range(30))
        out = h.send(b"MAIL FROM:<you@yourdomain.com>\r\n" + rcpts + b"DATA\r\n" + stuff(MESSAGE))
        self.assertEqual(out[:3], [b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"250 2.1.5 Ok"])
        self.assertEqual(
            out[3:31], [b"452 4.5.3 Error: too many recipients (at most 2 per message)"] * 28
        )
        self.assertEqual(out[31:], [START, queued(1)])
        self.assertEqual(h.record[0][0].rcpt_to, ("r0@example.com", "r1@example.com"))
        self.assertFalse(h.transport.disconnecting)

    def test_input_while_auth_pending(self) -> None:
        """Commands that arrive while the API checks the key are answered after the AUTH reply, in order."""
        h = ReviewHarness()
        h.api.hold_checks = True
        h.send(b"EHLO x\r\n")
        self.assertEqual(h.send(b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\nMAIL FROM:<you@yourdomain.com>\r\n"), [])
        self.assertEqual(h.send(b"RCPT TO:<user@example.com>\r\nDA"), [])
        h.transport.clear()
        h.api.release_checks()
        self.assertEqual(
            h.transport.value().split(b"\r\n")[:-1], [AUTH_OK, b"250 2.1.0 Ok", b"250 2.1.5 Ok"]
        )
        self.assertEqual(h.feed(b"TA\r\n"), [START])

    def test_pause_while_delivery_pending(self) -> None:
        """Over 1 MiB of pipelined input during a delivery pauses the transport; the reply resumes it and everything is answered in order."""
        h = ready()
        h.api.hold = True
        h.open_data()
        self.assertEqual(h.feed(stuff(MESSAGE)), [])
        noops = b"NOOP\r\n" * (MAX_PENDING_INPUT // 6 + 10)
        self.assertEqual(h.feed(noops[: MAX_PENDING_INPUT // 2]), [])
        self.assertEqual(h.transport.producerState, "producing")
        self.assertEqual(h.feed(noops[MAX_PENDING_INPUT // 2 :]), [])
        self.assertEqual(h.transport.producerState, "paused")
        h.transport.clear()
        h.api.pending[0].callback(None)
        out = h.transport.value().split(b"\r\n")[:-1]
        self.assertEqual(out[0], queued(1))
        self.assertEqual(out[1:], [b"250 2.0.0 Ok"] * (MAX_PENDING_INPUT // 6 + 10))
        self.assertEqual(h.transport.producerState, "producing")

    def test_quit_after_dot_while_pending(self) -> None:
        """QUIT pipelined after the dot waits for the delivery's reply, then closes."""
        h = ready()
        h.api.hold = True
        self.assertEqual(h.send(BEGIN + stuff(MESSAGE) + b"QUIT\r\n")[-1], START)
        self.assertFalse(h.transport.disconnecting)
        h.transport.clear()
        h.api.pending[0].callback(None)
        self.assertEqual(h.transport.value(), queued(1) + b"\r\n221 2.0.0 Bye\r\n")
        self.assertTrue(h.transport.disconnecting)

    def test_connection_lost_while_delivery_pending(self) -> None:
        """If the client goes away during a delivery, its outcome is written nowhere and raises nothing."""
        h = ready()
        h.api.hold = True
        h.send(BEGIN + stuff(MESSAGE) + b"NOOP\r\n")
        h.transport.clear()
        h.proto.connectionLost(None)
        h.proto.dataReceived(b"NOOP\r\n")
        h.api.pending[0].callback(None)
        self.assertEqual(h.transport.value(), b"")
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_connection_lost_while_auth_pending(self) -> None:
        """If the client goes away during an AUTH check, nothing is written and nothing raises."""
        h = ReviewHarness()
        h.api.hold_checks = True
        h.send(b"EHLO x\r\nAUTH PLAIN " + plain("poststack", KEY) + b"\r\nNOOP\r\n")
        h.transport.clear()
        h.proto.connectionLost(None)
        h.api.release_checks()
        self.assertEqual(h.transport.value(), b"")
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_command_split_mid_line(self) -> None:
        """A command split anywhere, even between CR and LF, is one command."""
        h = ready()
        line = b"MAIL FROM:<you@yourdomain.com>\r\n"
        for k in range(1, len(line)):
            self.assertEqual(h.feed(line[:k], line[k:], b"RSET\r\n"), [b"250 2.1.0 Ok", b"250 2.0.0 Ok"])


class AuthEdgeTests(SynchronousTestCase):
    def helo(self, **config: Any) -> ReviewHarness:
        """A session that has sent EHLO."""
        h = ReviewHarness(**config)
        h.send(b"EHLO x\r\n")
        return h

    def test_plain_empty_initial_response(self) -> None:
        """PLAIN with '=' (an empty initial response) is malformed: 501 5.5.2."""
        h = self.helo()
        self.assertEqual(h.send(b"AUTH PLAIN =\r\n"), [b"501 5.5.2 Malformed authentication response"])
        self.assertEqual(h.send(b"AUTH PLAIN\r\n"), [b"334 "])
        self.assertEqual(h.send(b"=\r\n"), [b"501 5.5.2 Malformed authentication response"])

    def test_login_with_initial_response(self) -> None:
        """AUTH LOGIN with the username as initial response goes straight to the password prompt."""
        h = self.helo()
        self.assertEqual(
            h.send(b"AUTH LOGIN " + base64.b64encode(b"poststack") + b"\r\n"), [b"334 UGFzc3dvcmQ6"]
        )
        self.assertEqual(h.send(base64.b64encode(KEY.encode()) + b"\r\n"), [AUTH_OK])

    def test_cancel_at_each_login_step(self) -> None:
        """'*' at the username or the password prompt aborts with 501 5.7.0; a later AUTH still works."""
        h = self.helo()
        h.send(b"AUTH LOGIN\r\n")
        self.assertEqual(h.send(b"*\r\n"), [b"501 5.7.0 Authentication aborted"])
        h.send(b"AUTH LOGIN\r\n")
        h.send(base64.b64encode(b"poststack") + b"\r\n")
        self.assertEqual(h.send(b"*\r\n"), [b"501 5.7.0 Authentication aborted"])
        self.assertEqual(h.send(b"NOOP\r\n"), [b"250 2.0.0 Ok"])
        self.assertEqual(h.send(b"AUTH PLAIN\r\n"), [b"334 "])
        self.assertEqual(h.send(b"*\r\n"), [b"501 5.7.0 Authentication aborted"])
        self.assertEqual(h.send(b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\n"), [AUTH_OK])

    def sasl_line(self, length: int) -> bytes:
        """A PLAIN response of exactly C{length} base64 octets (a wrong key)."""
        raw = (b"\0poststack\0sk_" + b"k" * length)[: length * 3 // 4]
        line = base64.b64encode(raw)
        assert len(line) == length, len(line)
        return line

    def test_longest_sasl_line(self) -> None:
        """A SASL response of exactly 12288 octets is checked (535), however the CRLF arrives; one more octet is too long (500)."""
        line = self.sasl_line(MAX_AUTH_LINE)
        for pieces in (
            [line + b"\r\n"],
            [line, b"\r\n"],
            [line + b"\r", b"\n"],
            [line[:5000], line[5000:] + b"\r", b"\n"],
        ):
            h = self.helo()
            h.send(b"AUTH PLAIN\r\n")
            out = h.feed(*pieces)
            self.assertEqual(len(out), 1, pieces)
            self.assertTrue(out[0].startswith(b"535 5.7.8 "), (out, [len(p) for p in pieces]))
        for pieces in (
            [line + b"A\r\n"],
            [line + b"A", b"\r\n"],
            [line + b"A\r", b"\n"],
            [line + b"AB", b"CD\r\n"],
        ):
            h = self.helo()
            h.send(b"AUTH PLAIN\r\n")
            self.assertEqual(h.feed(*pieces), [LINE_TOO_LONG])
            self.assertEqual(h.send(b"NOOP\r\n"), [b"250 2.0.0 Ok"])

    def test_longest_command_line(self) -> None:
        """A command line of exactly 2048 octets is a command, however the CRLF arrives; 2049 is too long."""
        line = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 5)
        for pieces in ([line + b"\r\n"], [line, b"\r\n"], [line + b"\r", b"\n"]):
            self.assertEqual(ReviewHarness().feed(*pieces), [b"250 2.0.0 Ok"], [len(p) for p in pieces])
        for pieces in ([line + b"x\r\n"], [line + b"x", b"\r\n"], [line + b"x\r", b"\n"]):
            self.assertEqual(ReviewHarness().feed(*pieces, b"NOOP\r\n"), [LINE_TOO_LONG, b"250 2.0.0 Ok"])

    def test_non_utf8_credentials(self) -> None:
        """A username or password that is not UTF-8 is an invalid login (535), never a crash."""
        h = self.helo()
        out = h.send(b"AUTH PLAIN " + base64.b64encode(b"\0poststack\0\xff\xfe") + b"\r\n")
        self.assertTrue(out[0].startswith(b"535 5.7.8 "), out)
        h.send(b"AUTH LOGIN\r\n")
        h.send(base64.b64encode(b"\xc3(@x.com") + b"\r\n")
        out = h.send(base64.b64encode(b"pw") + b"\r\n")
        self.assertTrue(out[0].startswith(b"535 5.7.8 "), out)

    def test_auth_after_failed_auth(self) -> None:
        """A failed AUTH does not prevent a later good one."""
        h = self.helo()
        self.assertTrue(h.send(b"AUTH PLAIN " + plain("poststack", "sk_bad") + b"\r\n")[0].startswith(b"535 "))
        self.assertEqual(h.send(b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\n"), [AUTH_OK])

    def test_pipelined_auth_failures_hit_error_limit(self) -> None:
        """Pipelined failing AUTHs count as errors: after the 21st comes 421 and nothing more is checked."""
        h = self.helo(max_auth_failures=1000)
        out = h.send(b"AUTH PLAIN " + plain("poststack", "sk_bad") + b"\r\n" * 1)
        out += h.send((b"AUTH PLAIN " + plain("poststack", "sk_bad") + b"\r\n") * 500)
        self.assertEqual(len(out), 22, out[-3:])
        self.assertTrue(all(line.startswith(b"535 5.7.8 ") for line in out[:21]))
        self.assertEqual(out[21], TOO_MANY_ERRORS)
        self.assertTrue(h.transport.disconnecting)

    def test_async_auth_failure_hits_error_limit(self) -> None:
        """An AUTH failure that is the 21st error closes the session at once, before the next command is served."""
        h = self.helo()
        h.send(b"BOGUS\r\n" * 20)
        h.api.hold_checks = True
        h.send(b"AUTH PLAIN " + plain("poststack", "sk_bad") + b"\r\nNOOP\r\n")
        h.transport.clear()
        h.api.release_checks()
        out = h.transport.value().split(b"\r\n")[:-1]
        self.assertEqual(len(out), 2, out)
        self.assertTrue(out[0].startswith(b"535 5.7.8 "))
        self.assertEqual(out[1], TOO_MANY_ERRORS)
        self.assertTrue(h.transport.disconnecting)


class EnvelopeParsingTests(SynchronousTestCase):
    def deliver(self, h: ReviewHarness) -> Envelope:
        """Send DATA and a message; the envelope the delivery got."""
        self.assertEqual(h.send(b"DATA\r\n" + stuff(MESSAGE))[-1], queued(len(h.record)))
        return h.record[-1][0]

    def test_sender_forms(self) -> None:
        """A space after FROM:, a bare address, a source route, a quoted local part and lower case are all read alike."""
        for line, address in [
            (b"MAIL FROM: <you@yourdomain.com>", "you@yourdomain.com"),
            (b"MAIL FROM:you@yourdomain.com", "you@yourdomain.com"),
            (b"mail from:<you@yourdomain.com>   ", "you@yourdomain.com"),
            (b"MAIL FROM:<@relay.example,@other.example:you@yourdomain.com>", "you@yourdomain.com"),
            (b'MAIL FROM:<"you two"@yourdomain.com>', '"you two"@yourdomain.com'),
            (b"MAIL FROM:<you@yourdomain.com> BODY=8BITMIME size=100", "you@yourdomain.com"),
            (b"MAIL FROM:<you@yourdomain.com> AUTH=<>", "you@yourdomain.com"),
            (b"MAIL FROM:<>", ""),
        ]:
            h = ready()
            self.assertEqual(h.send(line + b"\r\n"), [b"250 2.1.0 Ok"], line)
            h.send(b"rcpt to: <User@Example.com> \r\n")
            self.assertEqual(self.deliver(h), Envelope(address, ("User@Example.com",)), line)

    def test_bad_parameters(self) -> None:
        """Non-numeric SIZE is 501, unknown BODY and unknown parameters 555; the transaction is not opened."""
        h = ready()
        for line, reply in [
            (b"MAIL FROM:<you@yourdomain.com> SIZE=ten", b"501 5.5.4 Bad message size syntax"),
            (b"MAIL FROM:<you@yourdomain.com> SIZE=", b"501 5.5.4 Bad message size syntax"),
            (b"MAIL FROM:<you@yourdomain.com> SIZE=-1", b"501 5.5.4 Bad message size syntax"),
            (b"MAIL FROM:<you@yourdomain.com> BODY=BINARYMIME", b"555 5.5.4 Unsupported BODY type: use 7BIT or 8BITMIME"),
            (b"MAIL FROM:<you@yourdomain.com> SMTPUTF8", b"555 5.5.4 Unsupported option: SMTPUTF8"),
            (b"MAIL FROM:<you@yourdomain.com> RET=HDRS", b"555 5.5.4 Unsupported option: RET"),
            (b"MAIL FROM:<you@yourdomain.com>SIZE=1", b"501 5.5.4 Syntax: MAIL FROM:<address>"),
            (b"MAIL FROM:", b"501 5.5.4 Syntax: MAIL FROM:<address>"),
            (b"MAIL TO:<you@yourdomain.com>", b"501 5.5.4 Syntax: MAIL FROM:<address>"),
        ]:
            self.assertEqual(h.send(line + b"\r\n"), [reply], line)
        self.assertEqual(h.send(b"RCPT TO:<a@example.com>\r\n"), [b"503 5.5.1 Error: need MAIL command"])
        h.send(b"MAIL FROM:<you@yourdomain.com>\r\n")
        self.assertEqual(
            h.send(b"RCPT TO:<a@example.com> NOTIFY=NEVER\r\n"), [b"555 5.5.4 Unsupported option: NOTIFY"]
        )
        self.assertEqual(h.send(b"RCPT TO:<>\r\n"), [b"501 5.1.3 Bad recipient address syntax"])
        self.assertEqual(h.send(b"RCPT TO:<\xff@example.com>\r\n"), [b"501 5.1.3 Bad recipient address syntax"])

    def test_utf8_addresses_accepted(self) -> None:
        """UTF-8 (internationalised) addresses are taken as UTF-8 and passed on, though SMTPUTF8 is not advertised."""
        h = ready()
        h.send("MAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<jos\u00e9@ex\u00e4mple.com>\r\n".encode())
        self.assertEqual(self.deliver(h).rcpt_to, ("jos\u00e9@ex\u00e4mple.com",))

    def test_rset_and_ehlo_end_transaction(self) -> None:
        """RSET, HELO and EHLO in a transaction drop it: DATA then needs MAIL again, and AUTH stays."""
        for reset in (b"RSET", b"HELO again", b"EHLO again"):
            h = ready()
            h.send(b"MAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<a@example.com>\r\n")
            h.send(reset + b"\r\n")
            self.assertEqual(h.send(b"DATA\r\n"), [b"503 5.5.1 Error: need MAIL command"], reset)
            h.send(b"MAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<b@example.com>\r\n")
            self.assertEqual(self.deliver(h).rcpt_to, ("b@example.com",))

    def test_data_after_failed_recipients(self) -> None:
        """DATA after only failed RCPTs is 503 5.5.1 need RCPT and does not enter DATA mode."""
        h = ready(max_recipients=1)
        h.send(b"MAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<nodomain>\r\nRCPT TO:<a@b@>\r\n")
        self.assertEqual(h.send(b"DATA\r\n"), [b"503 5.5.1 Error: need RCPT command"])
        self.assertEqual(h.send(b"NOOP\r\n"), [b"250 2.0.0 Ok"])
        self.assertEqual(h.send(b"DATA extra\r\n"), [b"501 5.5.4 Syntax: command takes no arguments"])


class IdleTimerTests(SynchronousTestCase):
    def test_any_input_resets(self) -> None:
        """Any input, even part of a line or of a DATA line, restarts the idle timer."""
        h = ready(idle_timeout=100)
        h.transport.clear()
        for piece in (b"NO", b"OP\r\n", b"MAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<a@example.com>\r\nDATA\r\n", b"Subj", b"ect: x\r\n"):
            h.clock.advance(99)
            h.proto.dataReceived(piece)
        h.clock.advance(99)
        self.assertFalse(h.transport.disconnecting)
        h.transport.clear()
        h.clock.advance(1)
        self.assertEqual(h.transport.value(), TIMEOUT + b"\r\n")
        self.assertTrue(h.transport.disconnecting)

    def test_no_timeout_while_delivery_pending(self) -> None:
        """A client waiting for the delivery's reply is not timed out; the timer runs again from the reply."""
        h = ready(idle_timeout=30)
        h.api.hold = True
        h.send(BEGIN + stuff(MESSAGE))
        h.transport.clear()
        h.clock.advance(1000)
        self.assertEqual(h.transport.value(), b"")
        self.assertFalse(h.transport.disconnecting)
        h.api.pending[0].callback(None)
        self.assertEqual(h.transport.value(), queued(1) + b"\r\n")
        h.transport.clear()
        h.clock.advance(29)
        self.assertEqual(h.transport.value(), b"")
        h.clock.advance(1)
        self.assertEqual(h.transport.value(), TIMEOUT + b"\r\n")

    def test_no_timeout_while_auth_pending(self) -> None:
        """A client waiting for the AUTH reply is not timed out either."""
        h = ReviewHarness(idle_timeout=30)
        h.api.hold_checks = True
        h.send(b"EHLO x\r\nAUTH PLAIN " + plain("poststack", KEY) + b"\r\n")
        h.transport.clear()
        h.clock.advance(1000)
        self.assertFalse(h.transport.disconnecting)
        h.api.release_checks()
        self.assertEqual(h.transport.value(), AUTH_OK + b"\r\n")
        h.clock.advance(30)
        self.assertTrue(h.transport.disconnecting)

    def test_pipelined_after_pending_delivery(self) -> None:
        """Input pipelined during a delivery still ends with the timer running after the replies."""
        h = ready(idle_timeout=30)
        h.api.hold = True
        h.send(BEGIN + stuff(MESSAGE) + BEGIN + stuff(MESSAGE))
        h.clock.advance(100)
        h.api.pending[0].callback(None)
        h.clock.advance(100)
        self.assertFalse(h.transport.disconnecting)
        h.transport.clear()
        h.api.pending[1].callback(None)
        self.assertEqual(h.transport.value(), queued(2) + b"\r\n")
        h.clock.advance(30)
        self.assertTrue(h.transport.disconnecting)


class Collector(Protocol):
    """
    A client application protocol that keeps what it receives.
    """

    received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class TLSStackTests(SynchronousTestCase):
    def connect(self, h: ReviewHarness) -> tuple[Any, Collector, iosim.IOPump]:
        """
        A real TLS client connected through ImplicitTLSFactory to a fresh
        session of C{h}'s factory, handshake done.  Pauses and resumes of
        the server's TCP transport are noted in C{self.flow}.
        """
        self.flow: list[str] = []
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        cert_path, key_path = write_certificate(directory)
        with open(cert_path, "rb") as f:
            trust = Certificate.loadPEM(f.read())
        server_factory = ImplicitTLSFactory(load_certificate_options(cert_path, key_path), h.factory, 2.0, h.clock)
        client_factory = TLSMemoryBIOFactory(
            optionsForClientTLS("localhost", trustRoot=trust), True, Factory.forProtocol(Collector), h.clock
        )
        address = IPv4Address("TCP", "127.0.0.1", 1)
        server = server_factory.buildProtocol(address)
        client = client_factory.buildProtocol(address)
        server_io = iosim.makeFakeServer(server)
        server_io.pauseProducing = lambda: self.flow.append("pause")
        server_io.resumeProducing = lambda: self.flow.append("resume")
        pump = iosim.connect(server, server_io, client, iosim.makeFakeClient(client), clock=h.clock)
        return client, client.wrappedProtocol, pump

    def test_session_over_tls(self) -> None:
        """Through real TLS, written in small records, a pipelined session gets the banner and its replies, and the message arrives intact."""
        h = ReviewHarness()
        client, app, pump = self.connect(h)
        self.assertEqual(app.received, b"220 relay.test ESMTP PostStack relay\r\n")
        message = b"Subject: tls\r\n\r\n.dot\r\n\xff\xfe\r\n" + b"x" * 70000 + b"\r\n"
        session = (
            b"EHLO c\r\nAUTH PLAIN " + plain("poststack", KEY) + b"\r\n" + BEGIN + stuff(message) + b"QUIT\r\n"
        )
        for n in range(0, len(session), 997):
            client.write(session[n : n + 997])
            pump.flush()
        lines = app.received.split(b"\r\n")[:-1]
        self.assertEqual(lines[-6:], [AUTH_OK, b"250 2.1.0 Ok", b"250 2.1.5 Ok", START, queued(1), b"221 2.0.0 Bye"])
        self.assertEqual(h.raws, [message])

    def test_pipelined_input_during_delivery_over_tls(self) -> None:
        """Over TLS, more than 1 MiB pipelined during a delivery pauses and resumes the TCP transport and all of it is answered."""
        h = ReviewHarness()
        h.api.hold = True
        client, app, pump = self.connect(h)
        client.write(b"EHLO c\r\nAUTH PLAIN " + plain("poststack", KEY) + b"\r\n" + BEGIN + stuff(MESSAGE))
        pump.flush()
        count = MAX_PENDING_INPUT // 6 + 100
        client.write(b"NOOP\r\n" * count)
        pump.flush()
        self.assertEqual(app.received.count(b"250 2.0.0 Ok\r\n"), 0)
        self.assertEqual(self.flow, ["pause"])
        h.api.pending[0].callback(None)
        pump.flush()
        self.assertEqual(self.flow, ["pause", "resume"])
        self.assertIn(queued(1) + b"\r\n", app.received)
        self.assertEqual(app.received.count(b"250 2.0.0 Ok\r\n"), count)


class ErrorResetTests(SynchronousTestCase):
    def test_errors_reset_after_delivery(self) -> None:
        """The error count restarts after a delivered message, as in Postfix."""
        h = ready()
        h.send(b"BOGUS\r\n" * 15)
        out = h.send(
            b"MAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n" + stuff(MESSAGE)
        )
        self.assertEqual(out[-1], queued(1))
        out = h.send(b"BOGUS\r\n" * 15)
        self.assertEqual(len(out), 15)
        self.assertFalse(h.transport.disconnecting)
