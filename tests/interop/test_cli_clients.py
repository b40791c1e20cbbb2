"""
Command-line SMTP clients (swaks, curl, msmtp) against relay + sandbox over
loopback implicit TLS; each message is checked field by field in what the
sandbox stored. Settings used here are the ones docs/interop.md documents.
"""

from __future__ import annotations

import base64
import os
import time

from twisted.internet import reactor
from twisted.trial.unittest import FailTest, SkipTest, TestCase

from tests.common.corpus import sha256
from tests.common.interop import InteropTestCase, attachment_summary, skip_unless
from tests.common.keys import FULL_KEY, MAILBOX, SERVICE_KEY
from tests.common.processes import ToolTimeout, run_tool

PDF_BYTES = b"%PDF-1.4\n" + bytes(range(256)) * 4 + b"\n%%EOF\n"
"""A binary attachment: every byte value, so any 8-bit or newline mangling shows."""

CSV_TEXT = "id,name\n1,alice\n2,bob\n"


def mime_message(boundary: str = "=_interop_boundary_1") -> bytes:
    """
    A hand-written multipart/mixed ⊃ alternative message with CRLF line
    endings, a base64 PDF and a quoted-printable UTF-8 text part.
    """
    pdf_b64 = base64.encodebytes(PDF_BYTES).decode("ascii").replace("\n", "\r\n")
    return (
        "From: Curl Sender <you@yourdomain.com>\r\n"
        "To: Ann <ann@example.com>, bob@example.com\r\n"
        "Cc: \"Carol C.\" <carol@example.com>\r\n"
        "Subject: =?utf-8?q?Rapport_trimestriel_=E2=80=93_=C3=A9t=C3=A9?=\r\n"
        "Reply-To: replies@yourdomain.com\r\n"
        "X-PostStack-Tags: curl,  interop\r\n"
        "x-poststack-tags: quarterly\r\n"
        "X-Campaign: q3-report\r\n"
        "List-Unsubscribe: <mailto:unsubscribe@yourdomain.com>\r\n"
        "MIME-Version: 1.0\r\n"
        f"Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n"
        "\r\n"
        "This is a multi-part message in MIME format.\r\n"
        f"--{boundary}\r\n"
        "Content-Type: multipart/alternative; boundary=\"alt-2\"\r\n"
        "\r\n"
        "--alt-2\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n"
        "\r\n"
        "Bonjour, voici le rapport de l'=C3=A9t=C3=A9.\r\n"
        "--alt-2\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n"
        "\r\n"
        "<p>Bonjour, voici le rapport de l'=C3=A9t=C3=A9.</p>\r\n"
        "--alt-2--\r\n"
        f"--{boundary}\r\n"
        "Content-Type: application/pdf; name=\"rapport.pdf\"\r\n"
        "Content-Disposition: attachment; filename=\"rapport.pdf\"\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        "\r\n"
        f"{pdf_b64}"
        f"--{boundary}--\r\n"
    ).encode("utf-8")


class SwaksTests(InteropTestCase):
    """swaks with --tlsc (implicit TLS), certificate verified against the test CA."""

    tools = ("swaks",)

    def swaks(self, *args: str) -> list[str]:
        """The common part of every swaks command line, then C{args}."""
        return [
            self.tool("swaks"),
            "--server", "127.0.0.1",
            "--port", str(self.port),
            "--tlsc",
            "--tls-verify",
            "--tls-ca-path", self.cafile,
            "--tls-sni", "localhost",
            "--helo", "client.example",
            "--timeout", "30",
            *args,
        ]

    async def test_auth_plain_attachments_tags(self) -> None:
        """AUTH PLAIN with an API key; To/Cc/Bcc, subject, text, tags, X- headers and two attachments arrive intact."""
        csv = self.write_file("report.csv", CSV_TEXT)
        pdf = self.write_file("scan.pdf", PDF_BYTES)
        body = self.write_file("body.txt", "First line.\nSecond line, ünïcödé.\n")
        result = await self.run_tool(
            self.swaks(
                "--auth", "PLAIN",
                "--auth-user", "poststack",
                "--auth-password", FULL_KEY,
                "--from", "you@yourdomain.com",
                "--to", "user@example.com,carol@example.com,hidden@example.com",
                "--header", "From: Swaks Sender <you@yourdomain.com>",
                "--header", "To: user@example.com",
                "--header", "Cc: Carol <carol@example.com>",
                "--header", "Subject: Quarterly numbers",
                "--add-header", "X-PostStack-Tags: swaks, interop",
                "--add-header", "X-Campaign: spring",
                "--attach-type", "text/plain; charset=utf-8",
                "--attach-body", f"@{body}",
                "--attach-type", "text/csv",
                "--attach", f"@{csv}",
                "--attach-type", "application/pdf",
                "--attach", f"@{pdf}",
            )
        )
        self.assertEqual(result.code, 0, result.output)
        email = self.only_email()
        self.assertIn(f"250 2.0.0 Ok: queued as {email.id}", result.stdout)
        self.assertEqual(email.api_key, FULL_KEY)
        p = email.payload
        self.assertEqual(p["from"], "Swaks Sender <you@yourdomain.com>")
        self.assertEqual(p["to"], ["user@example.com"])
        self.assertEqual(p["cc"], ["Carol <carol@example.com>"])
        self.assertEqual(p["bcc"], ["hidden@example.com"])
        self.assertEqual(p["subject"], "Quarterly numbers")
        self.assertEqual(p["text"], "First line.\nSecond line, ünïcödé.\n")
        self.assertNotIn("html", p)
        self.assertEqual(p["tags"], ["swaks", "interop"])
        self.assertHeader(p, "X-Campaign", "spring")
        self.assertTrue(
            any(k.lower() == "x-mailer" and v.startswith("swaks") for k, v in p["headers"].items()),
            p["headers"],
        )
        self.assertFalse(
            any(k.lower().startswith("x-poststack") for k in p["headers"]), p["headers"]
        )
        self.assertEqual(
            attachment_summary(p),
            [
                ("report.csv", "text/csv", sha256(CSV_TEXT.encode())),
                ("scan.pdf", "application/pdf", sha256(PDF_BYTES)),
            ],
        )

    async def test_auth_login_mailbox(self) -> None:
        """AUTH LOGIN with a mailbox user: sent with the relay's service key, from the mailbox address."""
        user, password = MAILBOX
        result = await self.run_tool(
            self.swaks(
                "--auth", "LOGIN",
                "--auth-user", user,
                "--auth-password", password,
                "--from", user,
                "--to", "user@example.com",
                "--header", "Subject: From alice's mailbox",
                "--body", "Hi from Alice.",
            )
        )
        self.assertEqual(result.code, 0, result.output)
        self.assertIn("235 2.7.0", result.stdout)
        email = self.only_email()
        self.assertEqual(email.api_key, SERVICE_KEY)
        p = email.payload
        self.assertEqual(p["from"], user)
        self.assertEqual(p["to"], ["user@example.com"])
        self.assertEqual(p["subject"], "From alice's mailbox")
        # swaks ends DATA with empty lines after --body (its template's newline,
        # then a CRLF of its own before the dot); the relay removes only the
        # one line break that is SMTP framing and keeps the rest, as sent.
        self.assertEqual(p["text"], "Hi from Alice.\n\n")

    async def test_wrong_password(self) -> None:
        """A wrong API key: swaks shows 535 5.7.8 with the relay's hint, exits non-zero, nothing is stored."""
        result = await self.run_tool(
            self.swaks(
                "--auth", "LOGIN",
                "--auth-user", "poststack",
                "--auth-password", "sk_test_not_a_real_key",
                "--from", "you@yourdomain.com",
                "--to", "user@example.com",
            )
        )
        self.assertNotEqual(result.code, 0, result.output)
        self.assertIn("535 5.7.8 Authentication credentials invalid", result.stdout)
        self.assertNotIn("sk_test_not_a_real_key", result.stdout.split("535", 1)[1])
        self.assertEqual(self.stored(), [])

    async def test_starttls_misconfiguration(self) -> None:
        """swaks --tls (STARTTLS, not --tlsc) shows the 554 5.7.0 implicit-TLS text at once; nothing is stored."""
        result = await self.run_tool(
            [
                self.tool("swaks"),
                "--server", "127.0.0.1",
                "--port", str(self.port),
                "--tls",
                "--timeout", "30",
                "--auth", "PLAIN",
                "--auth-user", "poststack",
                "--auth-password", FULL_KEY,
                "--from", "you@yourdomain.com",
                "--to", "user@example.com",
            ]
        )
        self.assertNotEqual(result.code, 0, result.output)
        self.assertIn("<** 554 5.7.0 This port requires TLS from the first byte", result.stdout)
        self.assertEqual(self.stored(), [])


class CurlTests(InteropTestCase):
    """curl's SMTP support: smtps:// is implicit TLS."""

    tools = ("curl",)

    async def test_smtps_upload_mime(self) -> None:
        """smtps:// with several --mail-rcpt and a MIME file: every field, both bodies and the PDF arrive."""
        message = self.write_file("message.eml", mime_message())
        result = await self.run_tool(
            [
                self.tool("curl"),
                "--silent", "--show-error",
                "--max-time", "30",
                f"smtps://127.0.0.1:{self.port}/client.example",
                "--cacert", self.cafile,
                "--user", f"poststack:{FULL_KEY}",
                "--mail-from", "you@yourdomain.com",
                "--mail-rcpt", "ann@example.com",
                "--mail-rcpt", "bob@example.com",
                "--mail-rcpt", "carol@example.com",
                "--mail-rcpt", "dave@example.com",
                "--upload-file", message,
            ]
        )
        self.assertEqual(result.code, 0, result.output)
        email = self.only_email()
        self.assertEqual(email.api_key, FULL_KEY)
        p = email.payload
        self.assertEqual(p["from"], "Curl Sender <you@yourdomain.com>")
        self.assertEqual(p["to"], ["Ann <ann@example.com>", "bob@example.com"])
        self.assertEqual(p["cc"], ['"Carol C." <carol@example.com>'])
        self.assertEqual(p["bcc"], ["dave@example.com"])
        self.assertEqual(p["reply_to"], "replies@yourdomain.com")
        self.assertEqual(p["subject"], "Rapport trimestriel – été")
        self.assertEqual(p["text"], "Bonjour, voici le rapport de l'été.")
        self.assertEqual(p["html"], "<p>Bonjour, voici le rapport de l'été.</p>")
        self.assertEqual(p["tags"], ["curl", "interop", "quarterly"])
        self.assertHeader(p, "X-Campaign", "q3-report")
        self.assertHeader(p, "List-Unsubscribe", "<mailto:unsubscribe@yourdomain.com>")
        self.assertEqual(
            attachment_summary(p), [("rapport.pdf", "application/pdf", sha256(PDF_BYTES))]
        )
        self.assertEqual(
            set(k.lower() for k in p["headers"]), {"x-campaign", "list-unsubscribe"}
        )

    async def test_wrong_key(self) -> None:
        """A wrong key: curl fails with the 535 login-denied error and nothing is stored."""
        message = self.write_file("message.eml", mime_message())
        result = await self.run_tool(
            [
                self.tool("curl"),
                "--silent", "--show-error", "--verbose",
                "--max-time", "30",
                f"smtps://127.0.0.1:{self.port}/client.example",
                "--cacert", self.cafile,
                "--user", "poststack:sk_test_wrong",
                "--mail-from", "you@yourdomain.com",
                "--mail-rcpt", "ann@example.com",
                "--upload-file", message,
            ]
        )
        self.assertEqual(result.code, 67, result.output)  # CURLE_LOGIN_DENIED
        self.assertIn("< 535 5.7.8", result.stderr)
        self.assertEqual(self.stored(), [])

    async def test_plaintext_ssl_reqd(self) -> None:
        """smtp:// --ssl-reqd (the STARTTLS misconfiguration) gets the 554 5.7.0 implicit-TLS text, not a hang."""
        message = self.write_file("message.eml", mime_message())
        result = await self.run_tool(
            [
                self.tool("curl"),
                "--silent", "--show-error", "--verbose",
                "--max-time", "30",
                "--ssl-reqd",
                f"smtp://127.0.0.1:{self.port}/client.example",
                "--user", f"poststack:{FULL_KEY}",
                "--mail-from", "you@yourdomain.com",
                "--mail-rcpt", "ann@example.com",
                "--upload-file", message,
            ]
        )
        self.assertNotEqual(result.code, 0, result.output)
        self.assertNotEqual(result.code, 28, result.output)  # not a time-out
        self.assertIn("< 554 5.7.0 This port requires TLS from the first byte", result.stderr)
        self.assertEqual(self.stored(), [])


class MsmtpTests(InteropTestCase):
    """msmtp with tls_starttls off (implicit TLS), auth plain, a config file, the message on stdin."""

    tools = ("msmtp",)

    def config(self, user: str, password: str, starttls: str = "off") -> str:
        """Write an msmtp configuration (mode 0600, as msmtp demands) for this relay; return its path."""
        return self.write_file(
            f"msmtprc-{starttls}",
            "defaults\n"
            "tls on\n"
            f"tls_starttls {starttls}\n"
            f"tls_trust_file {self.cafile}\n"
            "timeout 30\n"
            "\n"
            "account relay\n"
            "host localhost\n"
            f"port {self.port}\n"
            "domain client.example\n"
            "auth plain\n"
            f"user {user}\n"
            f"password {password}\n"
            f"from {user if '@' in user else 'you@yourdomain.com'}\n"
            "\n"
            "account default : relay\n",
        )

    async def test_mailbox_login(self) -> None:
        """A mailbox login with recipients on the command line: stored with the service key, fields intact."""
        user, password = MAILBOX
        message = (
            f"From: Alice <{user}>\n"
            "To: Bob <bob@example.com>\n"
            "Subject: Lunch?\n"
            "X-PostStack-Tags: msmtp\n"
            "Content-Type: text/plain; charset=utf-8\n"
            "Content-Transfer-Encoding: 8bit\n"
            "\n"
            "Lunch at noon? Café on the corner.\n"
        )
        result = await self.run_tool(
            [self.tool("msmtp"), "-C", self.config(user, password), "-a", "relay",
             "bob@example.com", "eve@example.com"],
            stdin=message,
        )
        self.assertEqual(result.code, 0, result.output)
        email = self.only_email()
        self.assertEqual(email.api_key, SERVICE_KEY)
        p = email.payload
        self.assertEqual(p["from"], f"Alice <{user}>")
        self.assertEqual(p["to"], ["Bob <bob@example.com>"])
        self.assertEqual(p["bcc"], ["eve@example.com"])
        self.assertNotIn("cc", p)
        self.assertEqual(p["subject"], "Lunch?")
        self.assertEqual(p["text"], "Lunch at noon? Café on the corner.")
        self.assertEqual(p["tags"], ["msmtp"])

    async def test_api_key_read_recipients(self) -> None:
        """An API-key login with -t: recipients from To/Cc/Bcc, the Bcc header never reaches the API."""
        message = mime_message().replace(b"Cc: ", b"Bcc: secret@example.com\r\nCc: ", 1)
        result = await self.run_tool(
            [self.tool("msmtp"), "-C", self.config("poststack", FULL_KEY), "-t"],
            stdin=message,
        )
        self.assertEqual(result.code, 0, result.output)
        email = self.only_email()
        self.assertEqual(email.api_key, FULL_KEY)
        p = email.payload
        self.assertEqual(p["from"], "Curl Sender <you@yourdomain.com>")
        self.assertEqual(p["to"], ["Ann <ann@example.com>", "bob@example.com"])
        self.assertEqual(p["cc"], ['"Carol C." <carol@example.com>'])
        self.assertEqual(p["bcc"], ["secret@example.com"])
        self.assertEqual(p["subject"], "Rapport trimestriel – été")
        self.assertEqual(p["html"], "<p>Bonjour, voici le rapport de l'été.</p>")
        self.assertEqual(p["tags"], ["curl", "interop", "quarterly"])
        self.assertEqual(
            attachment_summary(p), [("rapport.pdf", "application/pdf", sha256(PDF_BYTES))]
        )
        self.assertNotIn("secret@example.com", repr(p.get("headers", {})))

    async def test_starttls_default_misconfiguration(self) -> None:
        """msmtp's default tls_starttls on: it prints the relay's 554 5.7.0 implicit-TLS text and exits non-zero."""
        result = await self.run_tool(
            [self.tool("msmtp"), "-C", self.config("poststack", FULL_KEY, starttls="on"),
             "-a", "relay", "bob@example.com"],
            stdin="From: you@yourdomain.com\nTo: bob@example.com\nSubject: x\n\nx\n",
        )
        self.assertNotEqual(result.code, 0, result.output)
        self.assertIn(
            "server message: 554 5.7.0 This port requires TLS from the first byte", result.stderr
        )
        self.assertEqual(self.stored(), [])

    async def test_wrong_mailbox_password(self) -> None:
        """A wrong mailbox password: msmtp reports the 535 and exits non-zero; nothing is stored."""
        user, _ = MAILBOX
        result = await self.run_tool(
            [self.tool("msmtp"), "-C", self.config(user, "not-alice-password"), "-a", "relay",
             "bob@example.com"],
            stdin=f"From: {user}\nTo: bob@example.com\nSubject: x\n\nx\n",
        )
        self.assertNotEqual(result.code, 0, result.output)
        self.assertIn("535 5.7.8", result.stderr)
        self.assertEqual(self.stored(), [])


class HarnessTests(TestCase):
    """The interop harness itself: missing tools, child processes, time-outs."""

    timeout = 30

    def test_missing_tool_skips_locally(self) -> None:
        """Without CI, a missing tool is a skip whose reason names the tool and make interop."""
        self.patch(os, "environ", {**os.environ, "CI": ""})
        with self.assertRaises(SkipTest) as caught:
            skip_unless("no-such-smtp-client-xyz")
        self.assertIn("no-such-smtp-client-xyz", str(caught.exception))
        self.assertIn("make interop", str(caught.exception))

    def test_missing_tool_fails_in_ci(self) -> None:
        """Under CI=true a missing tool fails the test instead of skipping it."""
        self.patch(os, "environ", {**os.environ, "CI": "true"})
        with self.assertRaises(FailTest) as caught:
            skip_unless("no-such-smtp-client-xyz")
        self.assertIn("CI=true", str(caught.exception))

    def test_present_tool_path(self) -> None:
        """A present tool is returned as an absolute path, found in sbin even when PATH lacks it."""
        self.patch(os, "environ", {**os.environ, "PATH": "/usr/bin:/bin"})
        self.assertTrue(os.path.isabs(skip_unless("sh")))
        found = skip_unless("ldconfig")  # in /usr/sbin or /sbin on every Debian
        self.assertIn(os.path.dirname(found), ("/usr/local/sbin", "/usr/sbin", "/sbin"))

    async def test_stdin_and_exit_code(self) -> None:
        """stdin reaches the child, stdout and stderr are kept apart, the exit status is reported."""
        result = await run_tool(
            reactor,  # type: ignore[arg-type]
            ["sh", "-c", "cat; echo oops >&2; exit 3"],
            stdin="héllo\n",
        )
        self.assertEqual(result, (3, "héllo\n", "oops\n"))

    async def test_timeout_kills(self) -> None:
        """A child that outlives its timeout is killed and reported as ToolTimeout, promptly."""
        started = time.monotonic()
        with self.assertRaises(ToolTimeout) as caught:
            await run_tool(
                reactor,  # type: ignore[arg-type]
                ["sh", "-c", "echo started; exec sleep 30"],
                timeout=0.5,
            )
        self.assertLess(time.monotonic() - started, 10)
        self.assertIn("timed out after 0.5 s", str(caught.exception))
        self.assertIn("started", str(caught.exception))
