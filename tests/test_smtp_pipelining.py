# -*- test-case-name: tests.test_smtp_pipelining -*-
"""
Pipelined input and flow control: commands handled strictly in order,
input buffered (and the transport paused past a bound) while a credential
check or a delivery waits on the API, and the idle timer stopped meanwhile.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.smtp import MAX_PENDING_INPUT
from tests.common.smtp import (
    AUTH_OK,
    BEGIN,
    KEY,
    MESSAGE,
    START,
    TIMEOUT,
    RecordingHarness,
    plain,
    queued,
    ready,
    stuff,
)

class PipeliningTests(SynchronousTestCase):
    def test_whole_session_byte_by_byte(self) -> None:
        """A whole session sent one byte at a time gets the same replies as sent at once."""
        session = (
            b"EHLO client.test\r\nAUTH PLAIN " + plain("poststack", KEY) + b"\r\n"
            + BEGIN + stuff(MESSAGE) + b"RSET\r\nQUIT\r\n"
        )
        at_once = RecordingHarness()
        expected = at_once.feed(session)
        slow = RecordingHarness()
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
        h = RecordingHarness(max_junk_commands=0)  # 174,762 commands before AUTH
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
        h = RecordingHarness()
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
        h = RecordingHarness()
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
        h = RecordingHarness(idle_timeout=30)
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
