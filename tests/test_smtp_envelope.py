# -*- test-case-name: tests.test_smtp_envelope -*-
"""
The arguments of MAIL FROM and RCPT TO (L{poststack_relay.smtp.envelope}),
without a transport: the address, or the reply refusing the syntax.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from poststack_relay import replies
from poststack_relay.policy import envelope_sender_reply
from poststack_relay.smtp.envelope import Sender, mail_parameters_problem, parse_mail, parse_rcpt

LIMIT = 1000


class ParseMailTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """Brackets, case, spaces, a bare path, the null sender and a source route all give the address."""
        for arg, address in [
            (b"FROM:<you@yourdomain.com>", "you@yourdomain.com"),
            (b"from: <you@yourdomain.com> ", "you@yourdomain.com"),
            (b"FROM:you@yourdomain.com", "you@yourdomain.com"),
            (b"FROM:<>", ""),
            (b"FROM:<@relay.example,@other.example:you@yourdomain.com>", "you@yourdomain.com"),
        ]:
            self.assertEqual(parse_mail(arg, LIMIT), Sender(address, False), arg)

    def test_smtputf8(self) -> None:
        """
        SMTPUTF8 (no value, any case, with or without BODY=8BITMIME) opens
        the transaction for UTF-8 paths (RFC 6531); the address is kept as
        sent (the A-label conversion is the translation's).
        """
        for arg, address in [
            (b"FROM:<j\xc3\xb6rg@b\xc3\xbccher.example> SMTPUTF8", "j\u00f6rg@b\u00fccher.example"),
            (b"FROM:<you@yourdomain.com> BODY=8BITMIME SMTPUTF8", "you@yourdomain.com"),
            (b"FROM:<\xe7\x94\xa8\xe6\x88\xb7@\xe4\xbe\x8b\xe5\xad\x90.example> smtputf8 BODY=8BITMIME", "\u7528\u6237@\u4f8b\u5b50.example"),
            (b"FROM:<> SMTPUTF8", ""),
        ]:
            self.assertEqual(parse_mail(arg, LIMIT), Sender(address, True), arg)

    def test_non_ascii_needs_smtputf8(self) -> None:
        """Without SMTPUTF8, a UTF-8 local part or U-label domain gets 553 5.6.7 (RFC 6531 section 3.5)."""
        for path in (b"j\xc3\xb6rg@yourdomain.com", b"you@b\xc3\xbccher.example", b"@h\xc3\xb6p:a@b.com"):
            self.assertEqual(
                parse_mail(b"FROM:<" + path + b"> BODY=8BITMIME", LIMIT),
                replies.SENDER_NEEDS_SMTPUTF8,
                path,
            )
        self.assertEqual(replies.SENDER_NEEDS_SMTPUTF8.code, 553)
        self.assertEqual(replies.SENDER_NEEDS_SMTPUTF8.enhanced, "5.6.7")
        # An A-label domain is ASCII: no SMTPUTF8 needed.
        self.assertEqual(
            parse_mail(b"FROM:<you@xn--bcher-kva.example>", LIMIT),
            Sender("you@xn--bcher-kva.example", False),
        )

    def test_bad_idn(self) -> None:
        """A domain without an IDNA 2008 A-label form, or a bad A-label, is refused as such."""
        for path in (
            "you@\u2603.example",  # a symbol: DISALLOWED in IDNA 2008
            "you@\u0301b.example",  # starts with a combining mark
            "you@xn--zz.example",  # not valid punycode
        ):
            self.assertEqual(
                parse_mail(b"FROM:<" + path.encode() + b"> SMTPUTF8", LIMIT),
                replies.SENDER_PATH_PROBLEMS["idn"],
                path,
            )

    def test_syntax(self) -> None:
        """Without C{FROM:} and a path the command is a syntax error; a path that is not UTF-8 is a bad address."""
        for arg in (b"", b"<a@b.com>", b"FROM", b"TO:<a@b.com>", b"FROM:<a@b.com"):
            self.assertEqual(parse_mail(arg, LIMIT), replies.MAIL_SYNTAX, arg)
        self.assertEqual(parse_mail(b"FROM:<\xff@b.com>", LIMIT), replies.SENDER_BAD_SYNTAX)

    def test_no_domain(self) -> None:
        """A sender without a usable domain is left to the sender policy, which refuses it with the reply that says what a sender must be."""
        for address in (b"you", b"you@", b"you@localhost", b"you@.example.com", b"you@[]"):
            parsed = parse_mail(b"FROM:<" + address + b">", LIMIT)
            self.assertEqual(parsed, Sender(address.decode(), False), address)
            assert isinstance(parsed, Sender)
            self.assertEqual(envelope_sender_reply(None, parsed.address), replies.SENDER_NO_DOMAIN, address)

    def test_path_problems(self) -> None:
        """Comments, RFC 5321 length limits and bad characters have their own replies."""
        problems = replies.SENDER_PATH_PROBLEMS
        self.assertEqual(parse_mail(b"FROM:<a@b.com> (me)", LIMIT), problems["comment"])
        self.assertEqual(parse_mail(b"FROM:<a(me)@b.com>", LIMIT), problems["comment"])
        self.assertEqual(parse_mail(b"FROM:<" + b"a" * 65 + b"@b.com>", LIMIT), problems["local"])
        self.assertEqual(parse_mail(b"FROM:<a@" + b"b" * 252 + b".com>", LIMIT), problems["domain"])
        self.assertEqual(parse_mail(b"FROM:<a b@b.com>", LIMIT), problems["syntax"])

    def test_comment_before_parameters(self) -> None:
        """A comment is reported before an unsupported parameter after it."""
        self.assertEqual(
            parse_mail(b"FROM:<a@b.com> (me) FOO=1", LIMIT), replies.SENDER_PATH_PROBLEMS["comment"]
        )


class MailParameterTests(SynchronousTestCase):
    def test_accepted(self) -> None:
        """SIZE within the limit, BODY=7BIT/8BITMIME, AUTH and SMTPUTF8 are accepted, in any case."""
        for params in (
            b"", b"SIZE=1000", b"size=10 body=8bitmime", b"BODY=7BIT AUTH=<>", b"AUTH=x@y.com",
            b"SMTPUTF8", b"smtputf8 BODY=8BITMIME",
        ):
            self.assertIsNone(mail_parameters_problem(params, LIMIT), params)

    def test_refused(self) -> None:
        """Each refused parameter gets its reply, with the limit or the option named."""
        self.assertEqual(mail_parameters_problem(b"SIZE=big", LIMIT), replies.BAD_SIZE_PARAMETER)
        self.assertEqual(mail_parameters_problem(b"SIZE=", LIMIT), replies.BAD_SIZE_PARAMETER)
        self.assertEqual(
            mail_parameters_problem(b"SIZE=1001", LIMIT),
            replies.MESSAGE_TOO_BIG.with_text("Message size exceeds fixed limit of 1000 octets"),
        )
        self.assertEqual(
            mail_parameters_problem(b"BODY=BINARYMIME", LIMIT),
            replies.UNSUPPORTED_PARAMETER.with_text("Unsupported BODY type: use 7BIT or 8BITMIME"),
        )
        self.assertEqual(
            mail_parameters_problem(b"SMTPUTF8=yes", LIMIT),
            replies.UNSUPPORTED_PARAMETER.with_text("Unsupported option: SMTPUTF8=YES"),
        )

    def test_through_mail(self) -> None:
        """parse_mail refuses the parameters after a good path."""
        self.assertEqual(parse_mail(b"FROM:<a@b.com> SIZE=x", LIMIT), replies.BAD_SIZE_PARAMETER)


class ParseRcptTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """The recipient forms accepted, case kept."""
        for arg, address in [
            (b"TO:<User@Example.com>", "User@Example.com"),
            (b"to: <user@example.com> ", "user@example.com"),
            (b"TO:user@example.com", "user@example.com"),
            (b"TO:<@hop.example:user@example.com>", "user@example.com"),
            (b"TO:<user@xn--bcher-kva.example>", "user@xn--bcher-kva.example"),
        ]:
            self.assertEqual(parse_rcpt(arg), address, arg)

    def test_utf8_with_smtputf8(self) -> None:
        """In a SMTPUTF8 transaction UTF-8 local parts and U-labels are accepted, as sent; without, 553 5.6.7."""
        for path, address in [
            (b"j\xc3\xb6rg@b\xc3\xbccher.example", "j\u00f6rg@b\u00fccher.example"),
            (b"user@B\xc3\x9cCHER.example", "user@B\u00dcCHER.example"),
            (b"\xd0\xb8\xd0\xb2\xd0\xb0\xd0\xbd@example.com", "\u0438\u0432\u0430\u043d@example.com"),
        ]:
            self.assertEqual(parse_rcpt(b"TO:<" + path + b">", smtputf8=True), address, path)
            self.assertEqual(parse_rcpt(b"TO:<" + path + b">"), replies.RECIPIENT_NEEDS_SMTPUTF8, path)
        self.assertEqual(
            parse_rcpt("TO:<a@\u2603.example>".encode(), smtputf8=True),
            replies.RECIPIENT_PATH_PROBLEMS["idn"],
        )
        self.assertEqual(parse_rcpt(b"TO:<a@xn--zz.example>"), replies.RECIPIENT_PATH_PROBLEMS["idn"])
        # Bytes that are not UTF-8 are bad syntax, with or without SMTPUTF8.
        self.assertEqual(parse_rcpt(b"TO:<\xff@b.com>", smtputf8=True), replies.RECIPIENT_BAD_SYNTAX)

    def test_refused(self) -> None:
        """Syntax, a missing domain, the null path, comments, limits and any parameter are refused."""
        self.assertEqual(parse_rcpt(b"<a@b.com>"), replies.RCPT_SYNTAX)
        self.assertEqual(parse_rcpt(b"TO:<\xff@b.com>"), replies.RECIPIENT_BAD_SYNTAX)
        for path in (b"<>", b"<user>", b"<user@localhost>"):
            self.assertEqual(parse_rcpt(b"TO:" + path), replies.RECIPIENT_BAD_SYNTAX, path)
        problems = replies.RECIPIENT_PATH_PROBLEMS
        self.assertEqual(parse_rcpt(b"TO:<a@b.com> (you)"), problems["comment"])
        self.assertEqual(parse_rcpt(b"TO:<" + b"a" * 65 + b"@b.com>"), problems["local"])
        self.assertEqual(
            parse_rcpt(b"TO:<a@b.com> NOTIFY=NEVER"),
            replies.UNSUPPORTED_PARAMETER.with_text("Unsupported option: NOTIFY"),
        )
