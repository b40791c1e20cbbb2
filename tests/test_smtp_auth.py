# -*- test-case-name: tests.test_smtp_auth -*-
"""
AUTH PLAIN and LOGIN through the protocol: good, bad and malformed
credentials, the API down, cancels, the longest SASL line, pipelined and
asynchronous failures.
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.smtp import MAX_AUTH_LINE, MAX_COMMAND_LINE
from tests.common.smtp import (
    AUTH_LINE_TOO_LONG,
    AUTH_OK,
    KEY,
    LINE_TOO_LONG,
    TOO_MANY_ERRORS,
    Harness,
    RecordingHarness,
    plain,
)

class AuthTests(SynchronousTestCase):
    def test_mail_before_auth(self) -> None:
        """MAIL before AUTH is refused with 530 5.7.0."""
        h = Harness()
        h.send(b"EHLO x\r\n")
        self.assertTrue(h.send(b"MAIL FROM:<you@yourdomain.com>\r\n")[0].startswith(b"530 5.7.0 "))
        self.assertTrue(h.send(b"RCPT TO:<a@b.com>\r\n")[0].startswith(b"530 5.7.0 "))

    def test_auth_plain_ok(self) -> None:
        """AUTH PLAIN with poststack + valid key succeeds."""
        h = Harness()
        h.login()

    def test_auth_plain_continuation(self) -> None:
        """AUTH PLAIN without initial response gets an empty 334 challenge."""
        h = Harness()
        h.send(b"EHLO x\r\n")
        self.assertEqual(h.send(b"AUTH PLAIN\r\n"), [b"334 "])
        self.assertEqual(
            h.send(plain("poststack", KEY) + b"\r\n"), [b"235 2.7.0 Authentication successful"]
        )

    def test_auth_login(self) -> None:
        """AUTH LOGIN uses the standard Username:/Password: prompts."""
        h = Harness()
        h.send(b"EHLO x\r\n")
        self.assertEqual(h.send(b"AUTH LOGIN\r\n"), [b"334 VXNlcm5hbWU6"])
        self.assertEqual(h.send(base64.b64encode(b"poststack") + b"\r\n"), [b"334 UGFzc3dvcmQ6"])
        self.assertEqual(
            h.send(base64.b64encode(KEY.encode()) + b"\r\n"),
            [b"235 2.7.0 Authentication successful"],
        )

    def test_auth_bad_key(self) -> None:
        """A wrong key gets 535 5.7.8 with a hint, and MAIL stays refused."""
        h = Harness()
        h.send(b"EHLO x\r\n")
        out = h.send(b"AUTH PLAIN " + plain("poststack", "sk_test_wrong") + b"\r\n")
        self.assertTrue(out[0].startswith(b"535 5.7.8 Authentication credentials invalid"), out)
        self.assertTrue(h.send(b"MAIL FROM:<you@yourdomain.com>\r\n")[0].startswith(b"530 "))

    def test_auth_api_down(self) -> None:
        """When the API cannot be reached, AUTH gets 454 4.7.0."""
        h = Harness()
        h.api.unavailable = True
        h.send(b"EHLO x\r\n")
        out = h.send(b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\n")
        self.assertTrue(out[0].startswith(b"454 4.7.0 "), out)

    def test_auth_mailbox(self) -> None:
        """A mailbox login may only use its own address as sender."""
        h = Harness()
        h.send(b"EHLO x\r\n")
        self.assertEqual(
            h.send(b"AUTH PLAIN " + plain("alice@yourdomain.com", "mbpass") + b"\r\n"),
            [b"235 2.7.0 Authentication successful"],
        )
        out = h.send(b"MAIL FROM:<bob@yourdomain.com>\r\n")
        self.assertTrue(out[0].startswith(b"550 5.7.1 "), out)
        self.assertEqual(h.send(b"MAIL FROM:<Alice@YourDomain.com>\r\n"), [b"250 2.1.0 Ok"])

    def test_auth_ok_logged(self) -> None:
        """A login is logged once with its text ready made: braces in the address stay text, the fields are kept."""
        from twisted.logger import capturedLogs, formatEvent

        h = Harness()
        h.api.mailboxes["{x}@yourdomain.com"] = "mbpass"
        h.send(b"EHLO x\r\n")
        with capturedLogs() as events:
            out = h.send(b"AUTH PLAIN " + plain("{x}@yourdomain.com", "mbpass") + b"\r\n")
        self.assertEqual(out, [b"235 2.7.0 Authentication successful"])
        [event] = [e for e in events if e.get("event") == "auth_ok"]
        self.assertEqual(
            formatEvent(event),
            f"{h.proto.session} auth ok user={{x}}@yourdomain.com identity={{x}}@yourdomain.com client=192.0.2.7",
        )
        self.assertEqual((event["user"], event["client"]), ("{x}@yourdomain.com", "192.0.2.7"))

    def test_auth_bad_base64(self) -> None:
        """Undecodable base64 gets 501 5.5.2."""
        h = Harness()
        h.send(b"EHLO x\r\n")
        self.assertEqual(
            h.send(b"AUTH PLAIN !!!notbase64\r\n"),
            [b"501 5.5.2 Cannot decode response: not valid base64"],
        )

    def test_auth_malformed_plain(self) -> None:
        """A PLAIN response without two NULs gets 501 5.5.2, not a crash."""
        h = Harness()
        h.send(b"EHLO x\r\n")
        self.assertEqual(
            h.send(b"AUTH PLAIN " + base64.b64encode(b"justone") + b"\r\n"),
            [b"501 5.5.2 Malformed authentication response"],
        )

    def test_auth_cancel(self) -> None:
        """'*' cancels AUTH with 501 5.7.0."""
        h = Harness()
        h.send(b"EHLO x\r\n")
        h.send(b"AUTH LOGIN\r\n")
        self.assertEqual(h.send(b"*\r\n"), [b"501 5.7.0 Authentication aborted"])

    def test_auth_unknown_mechanism(self) -> None:
        """CRAM-MD5 is not offered: 504 5.5.4."""
        h = Harness()
        h.send(b"EHLO x\r\n")
        self.assertTrue(h.send(b"AUTH CRAM-MD5\r\n")[0].startswith(b"504 5.5.4 "))

    def test_auth_twice(self) -> None:
        """A second AUTH gets 503 5.5.1."""
        h = Harness()
        h.login()
        self.assertEqual(
            h.send(b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\n"),
            [b"503 5.5.1 Error: already authenticated"],
        )

    def test_auth_before_ehlo(self) -> None:
        """AUTH before EHLO gets 503 5.5.1."""
        self.assertEqual(
            Harness().send(b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\n"),
            [b"503 5.5.1 Error: send EHLO first"],
        )

    def test_auth_cache(self) -> None:
        """A repeated login within the TTL does not ask the API again."""
        h1 = Harness()
        h1.login()
        self.assertEqual(h1.api.checks, 1)


class AuthEdgeTests(SynchronousTestCase):
    def helo(self, **config: Any) -> RecordingHarness:
        """A session that has sent EHLO."""
        h = RecordingHarness(**config)
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
        """A SASL response of exactly 12288 octets is checked (535), however the CRLF arrives; one more octet is too long (500 5.5.6, RFC 4954)."""
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
            self.assertEqual(h.feed(*pieces), [AUTH_LINE_TOO_LONG])
            self.assertEqual(h.send(b"NOOP\r\n"), [b"250 2.0.0 Ok"])

    def test_longest_auth_command_line(self) -> None:
        """
        RFC 4954: an AUTH command line with its initial response may have
        12288 octets (not the 2048 of other commands), however the CRLF
        arrives; one more octet is 500 5.5.6, and the session goes on.
        """
        command = b"AUTH PLAIN "
        line = command + self.sasl_line(MAX_AUTH_LINE - len(command) - 1) + b"="
        self.assertEqual(len(line), MAX_AUTH_LINE)
        for pieces in ([line + b"\r\n"], [line, b"\r\n"], [line[:3000], line[3000:] + b"\r", b"\n"]):
            out = self.helo().feed(*pieces)
            self.assertEqual(len(out), 1, pieces)
            self.assertTrue(out[0].startswith(b"535 5.7.8 "), (out, [len(p) for p in pieces]))
        for pieces in ([line + b"A\r\n"], [line + b"A", b"\r\n"], [line + b"AB", b"CD\r\n"]):
            h = self.helo()
            self.assertEqual(h.feed(*pieces), [AUTH_LINE_TOO_LONG])
            self.assertEqual(h.send(b"NOOP\r\n"), [b"250 2.0.0 Ok"])
        # Other commands keep their 2048 octets.
        h = self.helo()
        self.assertEqual(h.feed(b"NOOP " + b"x" * 3000 + b"\r\n"), [LINE_TOO_LONG])

    def test_longest_command_line(self) -> None:
        """A command line of exactly 2048 octets is a command, however the CRLF arrives; 2049 is too long."""
        line = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 5)
        for pieces in ([line + b"\r\n"], [line, b"\r\n"], [line + b"\r", b"\n"]):
            self.assertEqual(RecordingHarness().feed(*pieces), [b"250 2.0.0 Ok"], [len(p) for p in pieces])
        for pieces in ([line + b"x\r\n"], [line + b"x", b"\r\n"], [line + b"x\r", b"\n"]):
            self.assertEqual(RecordingHarness().feed(*pieces, b"NOOP\r\n"), [LINE_TOO_LONG, b"250 2.0.0 Ok"])

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
