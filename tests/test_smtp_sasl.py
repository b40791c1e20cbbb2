# -*- test-case-name: tests.test_smtp_sasl -*-
"""
SASL PLAIN and LOGIN decoding (L{poststack_relay.smtp.sasl}), without a
transport: initial responses and continuation lines in, steps out.
"""

from __future__ import annotations

import base64

from twisted.trial.unittest import SynchronousTestCase

from poststack_relay import replies
from poststack_relay.smtp.sasl import MECHANISMS, Challenge, Credentials, Refused, SASLExchange


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


MALFORMED = Refused(replies.AUTH_MALFORMED, "malformed")
BAD_BASE64 = Refused(replies.AUTH_BAD_BASE64, "malformed")
ABORTED = Refused(replies.AUTH_ABORTED)
USERNAME = Challenge(b64(b"Username:"))
PASSWORD = Challenge(b64(b"Password:"))


class PlainTests(SynchronousTestCase):
    def test_initial_response(self) -> None:
        """AUTH PLAIN with an initial response gives its credentials at once."""
        step = SASLExchange(b"PLAIN").start(b64(b"\0poststack\0sk_key"))
        self.assertEqual(step, Credentials(b"poststack", b"sk_key"))

    def test_continuation(self) -> None:
        """Without an initial response the server sends an empty challenge; the next line (whitespace stripped) answers it."""
        sasl = SASLExchange(b"PLAIN")
        self.assertEqual(sasl.start(None), Challenge(b""))
        self.assertEqual(sasl.respond(b"  " + b64(b"\0u@x.com\0pw") + b" "), Credentials(b"u@x.com", b"pw"))

    def test_authzid(self) -> None:
        """An authorization identity equal to the login is accepted; any other is refused as a failed login."""
        self.assertEqual(SASLExchange(b"PLAIN").start(b64(b"u\0u\0pw")), Credentials(b"u", b"pw"))
        self.assertEqual(
            SASLExchange(b"PLAIN").start(b64(b"admin\0u\0pw")),
            Refused(replies.AUTH_AUTHZID, "invalid", failed_login=True),
        )

    def test_malformed(self) -> None:
        """A response that is not three NUL-separated fields is malformed (not a failed login)."""
        for decoded in (b"", b"u\0pw", b"\0u\0pw\0", b"no nul"):
            self.assertEqual(SASLExchange(b"PLAIN").start(b64(decoded)), MALFORMED, decoded)
        # "=" is RFC 4954's empty initial response: empty, so malformed.
        self.assertEqual(SASLExchange(b"PLAIN").start(b"="), MALFORMED)

    def test_bad_base64(self) -> None:
        """A response that is not strict base64 is refused with its own reply."""
        for response in (b"not base64!", b"AAA", b"*"):
            self.assertEqual(SASLExchange(b"PLAIN").start(response), BAD_BASE64, response)
        sasl = SASLExchange(b"PLAIN")
        sasl.start(None)
        self.assertEqual(sasl.respond(b"%%%"), BAD_BASE64)

    def test_abort(self) -> None:
        """A continuation line C{*} aborts the exchange."""
        sasl = SASLExchange(b"PLAIN")
        sasl.start(None)
        self.assertEqual(sasl.respond(b" * "), ABORTED)


class LoginTests(SynchronousTestCase):
    def test_two_prompts(self) -> None:
        """LOGIN asks for the username, then the password, then gives both."""
        sasl = SASLExchange(b"LOGIN")
        self.assertEqual(sasl.start(None), USERNAME)
        self.assertEqual(sasl.respond(b64(b"alice@yourdomain.com")), PASSWORD)
        self.assertEqual(sasl.respond(b64(b"mbpass")), Credentials(b"alice@yourdomain.com", b"mbpass"))

    def test_initial_response_is_the_username(self) -> None:
        """AUTH LOGIN with an initial response skips the username prompt."""
        sasl = SASLExchange(b"LOGIN")
        self.assertEqual(sasl.start(b64(b"poststack")), PASSWORD)
        self.assertEqual(sasl.respond(b64(b"sk_key")), Credentials(b"poststack", b"sk_key"))

    def test_empty_username_and_password(self) -> None:
        """C{=} stands for an empty response at either prompt."""
        sasl = SASLExchange(b"LOGIN")
        sasl.start(None)
        self.assertEqual(sasl.respond(b"="), PASSWORD)
        self.assertEqual(sasl.respond(b"="), Credentials(b"", b""))

    def test_abort_at_each_prompt(self) -> None:
        """C{*} aborts at the username prompt and at the password prompt."""
        sasl = SASLExchange(b"LOGIN")
        sasl.start(None)
        self.assertEqual(sasl.respond(b"*"), ABORTED)
        sasl = SASLExchange(b"LOGIN")
        sasl.start(b64(b"u"))
        self.assertEqual(sasl.respond(b"*"), ABORTED)

    def test_bad_base64_at_each_prompt(self) -> None:
        """Bad base64 as the username or the password is refused."""
        sasl = SASLExchange(b"LOGIN")
        self.assertEqual(sasl.start(b"!!"), BAD_BASE64)
        sasl = SASLExchange(b"LOGIN")
        sasl.start(b64(b"u"))
        self.assertEqual(sasl.respond(b"!!"), BAD_BASE64)


class MechanismTests(SynchronousTestCase):
    def test_offered(self) -> None:
        """PLAIN and LOGIN are the mechanisms, as EHLO advertises them."""
        self.assertEqual(MECHANISMS, (b"PLAIN", b"LOGIN"))

    def test_unknown_mechanism(self) -> None:
        """An exchange is only made for a known mechanism (upper case)."""
        for mechanism in (b"CRAM-MD5", b"plain", b""):
            self.assertRaises(ValueError, SASLExchange, mechanism)
