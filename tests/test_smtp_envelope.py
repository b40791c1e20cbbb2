# -*- test-case-name: tests.test_smtp_envelope -*-
"""
The arguments of MAIL FROM and RCPT TO (L{poststack_relay.smtp.envelope}),
without a transport: the address, or the reply refusing the syntax.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from poststack_relay import replies
from poststack_relay.smtp.envelope import mail_parameters_problem, parse_mail, parse_rcpt

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
            (b"FROM:<j\xc3\xb6rg@b\xc3\xbccher.example>", "j\u00f6rg@b\u00fccher.example"),
        ]:
            self.assertEqual(parse_mail(arg, LIMIT), address, arg)

    def test_syntax(self) -> None:
        """Without C{FROM:} and a path the command is a syntax error; a path that is not UTF-8 is a bad address."""
        for arg in (b"", b"<a@b.com>", b"FROM", b"TO:<a@b.com>", b"FROM:<a@b.com"):
            self.assertEqual(parse_mail(arg, LIMIT), replies.MAIL_SYNTAX, arg)
        self.assertEqual(parse_mail(b"FROM:<\xff@b.com>", LIMIT), replies.SENDER_BAD_SYNTAX)

    def test_no_domain(self) -> None:
        """A sender without a usable domain gets the reply that says what a sender must be."""
        for address in (b"you", b"you@", b"you@localhost", b"you@.example.com", b"you@[]"):
            self.assertEqual(parse_mail(b"FROM:<" + address + b">", LIMIT), replies.SENDER_NO_DOMAIN, address)

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
        """SIZE within the limit, BODY=7BIT/8BITMIME and AUTH are accepted, in any case."""
        for params in (b"", b"SIZE=1000", b"size=10 body=8bitmime", b"BODY=7BIT AUTH=<>", b"AUTH=x@y.com"):
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
            mail_parameters_problem(b"SMTPUTF8", LIMIT),
            replies.UNSUPPORTED_PARAMETER.with_text("Unsupported option: SMTPUTF8"),
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
        ]:
            self.assertEqual(parse_rcpt(arg), address, arg)

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
