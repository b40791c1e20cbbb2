# -*- test-case-name: tests.test_smtp_commands -*-
"""
MAIL, RCPT, DATA, RSET and EHLO through the protocol: the path and
parameter forms accepted and refused, UTF-8 addresses, and how commands
end or keep the transaction.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.translate import Envelope
from tests.common.smtp import MESSAGE, RecordingHarness, queued, ready, stuff

class EnvelopeParsingTests(SynchronousTestCase):
    def deliver(self, h: RecordingHarness) -> Envelope:
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
            (b"MAIL FROM:<you@yourdomain.com> SMTPUTF8=yes", b"555 5.5.4 Unsupported option: SMTPUTF8=YES"),
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

    def test_utf8_addresses_with_smtputf8(self) -> None:
        """
        With SMTPUTF8 on MAIL FROM, UTF-8 local parts and U-label domains
        are accepted and reach the delivery as sent; the same mailbox as
        U-label and A-label (any case) is one recipient.
        """
        h = ready()
        lines = h.send(
            "MAIL FROM:<you@yourdomain.com> SMTPUTF8 BODY=8BITMIME\r\n"
            "RCPT TO:<jos\u00e9@ex\u00e4mple.com>\r\n"
            "RCPT TO:<user@b\u00fccher.example>\r\n"
            "RCPT TO:<USER@xn--bcher-kva.EXAMPLE>\r\n"
            "RCPT TO:<user@B\u00dcCHER.example>\r\n".encode()
        )
        self.assertEqual(lines, [b"250 2.1.0 Ok"] + [b"250 2.1.5 Ok"] * 4)
        self.assertEqual(
            self.deliver(h).rcpt_to, ("jos\u00e9@ex\u00e4mple.com", "user@b\u00fccher.example")
        )

    def test_utf8_addresses_need_smtputf8(self) -> None:
        """
        Without SMTPUTF8, a non-ASCII sender or recipient gets 553 5.6.7
        (RFC 6531 section 3.5) and is not taken; A-labels need nothing;
        RSET ends the SMTPUTF8 transaction.
        """
        h = ready()
        self.assertEqual(
            h.send("MAIL FROM:<j\u00f6rg@yourdomain.com>\r\n".encode()),
            [b"553 5.6.7 Sender address is not ASCII: add SMTPUTF8 to MAIL FROM (RFC 6531)"],
        )
        self.assertEqual(
            h.send(
                "MAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<jos\u00e9@example.com>\r\n"
                "RCPT TO:<user@xn--bcher-kva.example>\r\n".encode()
            ),
            [
                b"250 2.1.0 Ok",
                b"553 5.6.7 Recipient address is not ASCII: add SMTPUTF8 to MAIL FROM (RFC 6531)",
                b"250 2.1.5 Ok",
            ],
        )
        self.assertEqual(self.deliver(h).rcpt_to, ("user@xn--bcher-kva.example",))
        h.send(b"MAIL FROM:<you@yourdomain.com> SMTPUTF8\r\nRSET\r\nMAIL FROM:<you@yourdomain.com>\r\n")
        self.assertEqual(
            h.send("RCPT TO:<jos\u00e9@example.com>\r\n".encode())[0][:9], b"553 5.6.7"
        )

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


class CommandReplyTests(SynchronousTestCase):
    """Each command's reply in each state, byte for byte (docs/replies.md)."""

    def test_informational_commands(self) -> None:
        """HELP, NOOP (with or without an argument), VRFY, EXPN, BDAT and STARTTLS get their fixed replies; none ends the session."""
        h = RecordingHarness()
        out = h.send(b"HELP\r\nNOOP\r\nNOOP hello\r\nVRFY alice\r\nEXPN list\r\nBDAT 10 LAST\r\nSTARTTLS\r\nNOOP\r\n")
        self.assertEqual(
            out,
            [
                b"214 2.0.0 Commands: EHLO HELO AUTH MAIL RCPT DATA RSET NOOP QUIT; see the PostStack SMTP docs",
                b"250 2.0.0 Ok",
                b"250 2.0.0 Ok",
                b"502 5.5.1 VRFY command is disabled",
                b"502 5.5.1 EXPN command is disabled",
                b"502 5.5.1 Error: BDAT (CHUNKING) is not supported, use DATA",
                b"554 5.5.1 Error: TLS already active",
                b"250 2.0.0 Ok",
            ],
        )
        self.assertFalse(h.transport.disconnecting)

    def test_helo(self) -> None:
        """HELO answers with the host name alone; without a name it is a syntax error; verbs are case-insensitive."""
        h = RecordingHarness()
        self.assertEqual(h.send(b"HELO\r\nhelo client.test\r\n"), [b"501 5.5.4 Syntax: HELO hostname", b"250 relay.test"])

    def test_helo_control_characters(self) -> None:
        """EHLO/HELO names holding NUL, TAB, ESC or DEL get 501 5.5.4 and greet nothing (AUTH still needs EHLO); UTF-8 is not a control."""
        refused = b"501 5.5.4 Syntax: EHLO hostname; control characters (NUL, TAB, ...) are not allowed"
        h = RecordingHarness()
        self.assertEqual(
            h.send(b"EHLO a\x00b\r\nHELO a\tb\r\nEHLO a\x1bb\r\nhelo a\x7f\r\nAUTH PLAIN x\r\n"),
            [refused] * 4 + [b"503 5.5.1 Error: send EHLO first"],
        )
        self.assertEqual(h.send("EHLO h\u00e9.example\r\n".encode())[0], b"250-relay.test")

    def test_sequence(self) -> None:
        """Out-of-order commands inside a login get 503 (or 501 for DATA with an argument), and the transaction survives them."""
        h = ready()
        out = h.send(
            b"RCPT TO:<user@example.com>\r\nDATA\r\nMAIL FROM:<you@yourdomain.com>\r\n"
            b"MAIL FROM:<you@yourdomain.com>\r\nAUTH PLAIN x\r\nDATA\r\nDATA now\r\n"
            b"RCPT TO:<user@example.com>\r\nDATA\r\n"
        )
        self.assertEqual(
            out,
            [
                b"503 5.5.1 Error: need MAIL command",
                b"503 5.5.1 Error: need MAIL command",
                b"250 2.1.0 Ok",
                b"503 5.5.1 Error: nested MAIL command",
                b"503 5.5.1 Error: already authenticated",
                b"503 5.5.1 Error: need RCPT command",
                b"501 5.5.4 Syntax: command takes no arguments",
                b"250 2.1.5 Ok",
                b"354 End data with <CR><LF>.<CR><LF>",
            ],
        )
        self.assertEqual(h.feed(stuff(MESSAGE)), [queued(1)])

    def test_quit(self) -> None:
        """QUIT mid-transaction says 221 and closes; pipelined input after it is not answered."""
        h = ready()
        self.assertEqual(h.send(b"MAIL FROM:<you@yourdomain.com>\r\nQUIT\r\nNOOP\r\n"), [b"250 2.1.0 Ok", b"221 2.0.0 Bye"])
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(h.send(b"NOOP\r\n"), [])
