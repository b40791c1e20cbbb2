"""
PHPMailer 6.x (C{SMTPSecure = ENCRYPTION_SMTPS}) and the Ruby C{mail} gem
(C{tls: true}/C{ssl: true}, the delivery settings ActionMailer passes on)
against relay + sandbox over loopback implicit TLS, with the scripts in
C{tests/interop/clients/}; each message is checked field by field in what
the sandbox stored, attachments by SHA-256. Also the common mistake of each
(STARTTLS) and what the user then sees. Settings are those docs/interop.md
documents.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tests.common.corpus import sha256
from tests.common.interop import InteropTestCase, attachment_summary
from tests.common.keys import FULL_KEY, MAILBOX, SERVICE_KEY
from tests.common.processes import ROOT, ToolResult, missing

CLIENTS = os.path.join(ROOT, "tests", "interop", "clients")
PHPMAILER = "/usr/share/php/libphp-phpmailer/autoload.php"
"""Where Debian's libphp-phpmailer puts PHPMailer (the script requires it from there)."""
RUBY_MAIL = "/usr/lib/ruby/vendor_ruby/mail.rb"
"""Where Debian's ruby-mail puts the mail gem."""

PDF_BYTES = b"%PDF-1.5\n" + bytes(range(256)) * 3 + b"\r\n.\r\n\n%%EOF\n"
"""Every byte value, and a lone dot line: any 8-bit, newline or dot-stuffing damage shows."""

CSV_BYTES = "id;name\r\n1;Zoë\r\n2;Ånström\r\n".encode("utf-8")

PNG_BYTES = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00"
    b"\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N"
    b"\x00\x00\x00\x00IEND\xaeB`\x82"
)

SUBJECT = "Grüße aus Köln – 報告 №3 ✓"
TEXT = "Hallo Zoë,\nanbei der Bericht.\n\nJörg"
HTML = '<p>Hallo Zoë,<br>anbei der <b>Bericht</b>.</p><img src="cid:logo@yourdomain.com" alt="logo">'


class ClientScriptTestCase(InteropTestCase):
    """Runs one of the C{tests/interop/clients/} scripts and parses its JSON line."""

    interpreter = ""
    script = ""
    body_suffix = ""
    """What the client itself adds at the end of the text and html parts."""
    csv_type = "text/csv"
    """The content type the client gives the CSV attachment."""

    def message_spec(self, sender: str = "you@yourdomain.com") -> str:
        """Write the attachments and the message's JSON description; return its path."""
        pdf = self.write_file("Bericht_März.pdf", PDF_BYTES)
        csv = self.write_file("daten.csv", CSV_BYTES)
        png = self.write_file("logo.png", PNG_BYTES)
        spec = {
            "from": [sender, "Jörg Müller"],
            "to": [["zoe@example.com", "Zoë Ångström"], ["ann@example.com", ""]],
            "cc": [["jane@example.com", "Doe, Jane"]],
            "bcc": ["audit@example.com"],
            "reply_to": ["support@yourdomain.com", "Support Team"],
            "subject": SUBJECT,
            "text": TEXT,
            "html": HTML,
            "tags": "welcome, interop",
            "attachments": [
                {"path": pdf, "name": "Bericht_März.pdf", "type": "application/pdf"},
                {"path": csv, "name": "daten.csv", "type": "text/csv"},
            ],
            "inline": [
                {"path": png, "name": "logo.png", "type": "image/png", "cid": "logo@yourdomain.com"}
            ],
        }
        return self.write_file("message.json", json.dumps(spec))

    async def run_script(self, user: str = "poststack", password: str = FULL_KEY, **env: str) -> dict[str, Any]:
        base = {
            "SMTP_HOST": "localhost",
            "SMTP_PORT": str(self.port),
            "SMTP_CA": self.cafile,
            "SMTP_USER": user,
            "SMTP_PASS": password,
            "MESSAGE": self.message_spec(user if "@" in user else "you@yourdomain.com"),
        }
        result: ToolResult = await self.run_tool(
            [self.tool(self.interpreter), os.path.join(CLIENTS, self.script)],
            env={**base, **env},
            timeout=60,
        )
        self.assertEqual(result.code, 0, result.output)
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        self.assertTrue(lines, result.output)
        parsed: dict[str, Any] = json.loads(lines[-1])
        return parsed

    def assertAllFields(self, p: dict[str, Any], sender: str = "you@yourdomain.com") -> None:
        """Every field of L{message_spec}'s message, as the sandbox stored it."""
        self.assertEqual(p["from"], f"Jörg Müller <{sender}>")
        self.assertEqual(p["to"], ["Zoë Ångström <zoe@example.com>", "ann@example.com"])
        self.assertEqual(p["cc"], ['"Doe, Jane" <jane@example.com>'])
        self.assertEqual(p["bcc"], ["audit@example.com"])
        self.assertEqual(p["reply_to"], "Support Team <support@yourdomain.com>")
        self.assertEqual(p["subject"], SUBJECT)
        self.assertEqual(p["text"], TEXT + self.body_suffix)
        self.assertEqual(p["html"], HTML + self.body_suffix)
        self.assertEqual(p["tags"], ["welcome", "interop"])
        self.assertFalse(
            any(k.lower().startswith("x-poststack") or k.lower() == "bcc" for k in p.get("headers", {})),
            p.get("headers"),
        )
        self.assertNotIn("audit@example.com", json.dumps(p.get("headers", {})))
        self.assertEqual(
            sorted(attachment_summary(p)),
            sorted(
                [
                    ("Bericht_März.pdf", "application/pdf", sha256(PDF_BYTES)),
                    ("daten.csv", self.csv_type, sha256(CSV_BYTES)),
                    ("logo.png", "image/png", sha256(PNG_BYTES)),
                ]
            ),
        )


class PHPMailerTests(ClientScriptTestCase):
    """PHPMailer 6.x from Debian's libphp-phpmailer, run by php-cli."""

    tools = ("php",)
    interpreter = "php"
    script = "phpmailer_send.php"
    # PHPMailer ends each body part with a line break of its own before the
    # boundary's (MIME: the last CRLF before a boundary is the boundary's), so
    # the line break is content, and the relay keeps it.
    body_suffix = "\n"

    def setUp(self) -> Any:
        if not os.path.exists(PHPMAILER):
            raise missing(f"PHPMailer is not installed ({PHPMAILER}: apt-get install libphp-phpmailer; run `make interop`)")
        return super().setUp()

    async def test_smtps_every_field(self) -> None:
        """ENCRYPTION_SMTPS: names, cc, envelope-only bcc, reply-to, UTF-8 subject, tags, attachments and the inline image."""
        result = await self.run_script(SMTP_SECURE="smtps", SMTP_DEBUG="2")
        self.assertTrue(result["ok"], result)
        email = self.only_email()
        self.assertEqual(email.api_key, FULL_KEY)
        self.assertIn(f"SERVER -> CLIENT: 250 2.0.0 Ok: queued as {email.id}", result["debug"])
        self.assertAllFields(email.payload)
        headers = {k.lower(): v for k, v in email.payload["headers"].items()}
        self.assertTrue(headers.get("x-mailer", "").startswith("PHPMailer 6."), headers)

    async def test_mailbox_login(self) -> None:
        """A mailbox login (the address and its password): sent with the relay's service key, fields intact."""
        user, password = MAILBOX
        result = await self.run_script(user, password, SMTP_SECURE="smtps", SMTP_DEBUG="0")
        self.assertTrue(result["ok"], result)
        email = self.only_email()
        self.assertEqual(email.api_key, SERVICE_KEY)
        self.assertAllFields(email.payload, sender=user)

    async def test_starttls_mistake_hidden_without_debug(self) -> None:
        """ENCRYPTION_STARTTLS with SMTPDebug off: only PHPMailer's generic error, the relay's 554 text is hidden."""
        result = await self.run_script(SMTP_SECURE="starttls", SMTP_DEBUG="0")
        self.assertFalse(result["ok"], result)
        self.assertNotIn("554", result["error"])
        self.assertNotIn("implicit TLS", result["error"])
        self.assertEqual(result["debug"], [])
        self.assertEqual(self.stored(), [])

    async def test_starttls_mistake_shown_with_debug(self) -> None:
        """ENCRYPTION_STARTTLS with SMTPDebug = DEBUG_SERVER: the 554 line naming ENCRYPTION_SMTPS is in the debug output."""
        result = await self.run_script(SMTP_SECURE="starttls", SMTP_DEBUG="2")
        self.assertFalse(result["ok"], result)
        transcript = "\n".join(result["debug"])
        self.assertIn("554 5.7.0 This port requires TLS from the first byte", transcript)
        self.assertIn("ENCRYPTION_SMTPS (PHPMailer)", transcript)
        self.assertEqual(self.stored(), [])

    async def test_wrong_key(self) -> None:
        """A wrong key: 'Could not authenticate' without debug; the 535 only in the debug output."""
        result = await self.run_script(password="sk_test_wrong_key", SMTP_SECURE="smtps", SMTP_DEBUG="2")
        self.assertFalse(result["ok"], result)
        self.assertIn("Could not authenticate", result["error"])
        self.assertIn("535 5.7.8", "\n".join(result["debug"]))
        self.assertEqual(self.stored(), [])


class RubyMailTests(ClientScriptTestCase):
    """The Ruby mail gem (Debian's ruby-mail) over Net::SMTP."""

    tools = ("ruby",)
    interpreter = "ruby"
    script = "mail_gem_send.rb"
    # The mail gem gives a text/* attachment the message's charset.
    csv_type = "text/csv; charset=UTF-8"

    def setUp(self) -> Any:
        if not os.path.exists(RUBY_MAIL):
            raise missing("the Ruby mail gem is not installed (apt-get install ruby-mail; run `make interop`)")
        return super().setUp()

    async def test_tls_true_every_field(self) -> None:
        """tls: true: names, cc, envelope-only bcc, reply-to, UTF-8 subject, tags, attachments and the inline image."""
        result = await self.run_script(SMTP_SECURE="tls")
        self.assertTrue(result["ok"], result)
        email = self.only_email()
        self.assertEqual(result["response"], f"250 2.0.0 Ok: queued as {email.id}")
        self.assertEqual(email.api_key, FULL_KEY)
        self.assertAllFields(email.payload)

    async def test_ssl_true_mailbox_login(self) -> None:
        """ssl: true (the alias) with a mailbox login: sent with the service key, fields intact."""
        user, password = MAILBOX
        result = await self.run_script(user, password, SMTP_SECURE="ssl")
        self.assertTrue(result["ok"], result)
        email = self.only_email()
        self.assertEqual(email.api_key, SERVICE_KEY)
        self.assertAllFields(email.payload, sender=user)

    async def test_default_starttls_mistake(self) -> None:
        """Neither tls nor ssl (enable_starttls_auto, the default): Net::SMTP raises with the relay's 554 text."""
        result = await self.run_script(SMTP_SECURE="default")
        self.assertFalse(result["ok"], result)
        self.assertIn("554 5.7.0 This port requires TLS from the first byte", result["error"])
        self.assertIn("tls: true (Ruby, Rails)", result["error"])
        self.assertEqual(self.stored(), [])
