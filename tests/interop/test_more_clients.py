"""
s-nail (C{mta=smtps://...}) and aiosmtplib (C{use_tls=True}) against relay +
sandbox over loopback implicit TLS, field by field in what the sandbox
stored (attachments by SHA-256), and each one's STARTTLS mistake. Settings
are those docs/interop.md documents.
"""

from __future__ import annotations

import asyncio
import ssl
from email.message import EmailMessage
from email.utils import formataddr
from typing import Any

from tests.common.corpus import sha256
from tests.common.interop import InteropTestCase, attachment_summary
from tests.common.keys import FULL_KEY, MAILBOX, SERVICE_KEY
from tests.common.processes import missing

PDF_BYTES = b"%PDF-1.6\n" + bytes(range(256)) * 2 + b"\r\n.\r\n%%EOF\n"
CSV_BYTES = "id;name\r\n1;Zoë\r\n".encode("utf-8")
PNG_BYTES = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00"
    b"\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N"
    b"\x00\x00\x00\x00IEND\xaeB`\x82"
)
SUBJECT = "Grüße aus Köln – 報告 №3 ✓"


class SNailTests(InteropTestCase):
    """s-nail 14.9 (Debian's s-nail) with v15-compat and mta=smtps://."""

    tools = ("s-nail",)

    def env(self) -> dict[str, str]:
        """A UTF-8 locale, and this test's directory as HOME (s-nail writes nothing else there)."""
        return {"LC_ALL": "C.UTF-8", "HOME": self.workdir()}

    def s_nail(self, mta: str, *args: str, user: str = "poststack") -> list[str]:
        """The documented command line (no configuration files: -:/), then C{args}."""
        return [
            # -Snosave: a failed send is not saved to ~/dead.letter.
            self.tool("s-nail"), "-:/", "-Sv15-compat", "-Snosave", "-Sttycharset=utf-8",
            "-Sexpandaddr=fail,-all,failinvaddr", "-Sfullnames",
            f"-Smta={mta}", "-Ssmtp-auth=plain", f"-Stls-ca-file={self.cafile}",
            f"-Sfrom={formataddr(('Jörg Müller', user if '@' in user else 'you@yourdomain.com'))}",
            *args,
        ]

    async def test_smtps_every_field(self) -> None:
        """mta=smtps://: names, cc, envelope-only bcc, reply-to, UTF-8 subject, tags and two attachments."""
        pdf = self.write_file("Bericht_März.pdf", PDF_BYTES)
        csv = self.write_file("daten.csv", CSV_BYTES)
        result = await self.run_tool(
            self.s_nail(
                f"smtps://poststack:{FULL_KEY}@localhost:{self.port}",
                "-Sreply-to=Support Team <support@yourdomain.com>",
                "-C", "X-PostStack-Tags: snail, interop",
                "-s", SUBJECT,
                "-a", pdf, "-a", csv,
                "-c", "Doe, Jane <jane@example.com>",
                "-b", "audit@example.com",
                "-.", "Zoë Ångström <zoe@example.com>", "ann@example.com",
            ),
            stdin="Hallo Zoë,\nanbei der Bericht.\n",
            env=self.env(),
        )
        self.assertEqual(result.code, 0, result.output)
        email = self.only_email()
        self.assertEqual(email.api_key, FULL_KEY)
        p = email.payload
        self.assertEqual(p["from"], "Jörg Müller <you@yourdomain.com>")
        self.assertEqual(p["to"], ["Zoë Ångström <zoe@example.com>", "ann@example.com"])
        self.assertEqual(p["cc"], ['"Doe, Jane" <jane@example.com>'])
        self.assertEqual(p["bcc"], ["audit@example.com"])
        self.assertEqual(p["reply_to"], "Support Team <support@yourdomain.com>")
        self.assertEqual(p["subject"], SUBJECT)
        self.assertEqual(p["text"], "Hallo Zoë,\nanbei der Bericht.\n")
        self.assertEqual(p["tags"], ["snail", "interop"])
        self.assertNotIn("audit@example.com", str(p.get("headers", {})))
        self.assertEqual(
            attachment_summary(p),
            [
                ("Bericht_März.pdf", "application/pdf", sha256(PDF_BYTES)),
                # s-nail detects the type and the charset (of a text file) itself.
                ("daten.csv", "text/csv; charset=utf-8", sha256(CSV_BYTES)),
            ],
        )

    async def test_mailbox_login(self) -> None:
        """A mailbox login in the URL (the @ of the address encoded as %40): sent with the service key."""
        user, password = MAILBOX
        result = await self.run_tool(
            self.s_nail(
                f"smtps://{user.replace('@', '%40')}:{password}@localhost:{self.port}",
                "-s", "From the mailbox", "-.", "bob@example.com",
                user=user,
            ),
            stdin="Hi Bob.\n",
            env=self.env(),
        )
        self.assertEqual(result.code, 0, result.output)
        email = self.only_email()
        self.assertEqual(email.api_key, SERVICE_KEY)
        self.assertEqual(email.payload["from"], f"Jörg Müller <{user}>")

    async def test_starttls_mistake(self) -> None:
        """smtp:// with smtp-use-starttls: s-nail fails and prints the relay's 554 line; nothing is stored."""
        result = await self.run_tool(
            self.s_nail(
                f"smtp://poststack:{FULL_KEY}@localhost:{self.port}",
                "-Ssmtp-use-starttls", "-s", "never", "-.", "bob@example.com",
            ),
            stdin="Hi.\n",
            env=self.env(),
        )
        self.assertNotEqual(result.code, 0, result.output)
        self.assertIn("s-nail: SMTP server: 554 5.7.0 This port requires TLS from the first byte", result.stderr)
        self.assertIn("smtps:// (curl, s-nail)", result.stderr)
        self.assertNotIn("dead.letter", result.output)
        self.assertEqual(self.stored(), [])


class AiosmtplibTests(InteropTestCase):
    """aiosmtplib (a test requirement) with use_tls=True, in its own event loop in a thread."""

    def setUp(self) -> Any:
        try:
            import aiosmtplib  # noqa: F401
        except ImportError:
            raise missing("aiosmtplib is not installed (pip install -e '.[test]'; make venv)")
        return super().setUp()

    def send(self, message: EmailMessage, **options: Any) -> Any:
        """C{aiosmtplib.send(message, **options)} to the relay, in a thread; fires with its result."""
        import aiosmtplib

        settings = dict(hostname="localhost", port=self.port, timeout=20)
        settings.update(options)
        return self.in_thread(lambda: asyncio.run(aiosmtplib.send(message, **settings)))

    def rich_message(self) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = formataddr(("Jörg Müller", "you@yourdomain.com"))
        msg["To"] = [formataddr(("Zoë Ångström", "zoe@example.com")), "ann@example.com"]
        msg["Cc"] = formataddr(("Doe, Jane", "jane@example.com"))
        msg["Reply-To"] = formataddr(("Support Team", "support@yourdomain.com"))
        msg["Subject"] = SUBJECT
        msg["X-PostStack-Tags"] = "aiosmtplib, interop"
        msg.set_content("Hallo Zoë,\nanbei der Bericht.\n")
        msg.add_alternative(
            '<p>Hallo Zoë,<br>anbei der Bericht.</p><img src="cid:logo@yourdomain.com">\n', subtype="html"
        )
        msg.get_payload()[1].add_related(
            PNG_BYTES, "image", "png", cid="<logo@yourdomain.com>", filename="logo.png"
        )
        msg.add_attachment(PDF_BYTES, maintype="application", subtype="pdf", filename="Bericht_März.pdf")
        return msg

    async def test_use_tls_every_field(self) -> None:
        """use_tls=True: names, cc, envelope-only bcc, reply-to, UTF-8 subject, tags, attachment and inline image."""
        errors, response = await self.send(
            self.rich_message(),
            username="poststack",
            password=FULL_KEY,
            use_tls=True,
            tls_context=ssl.create_default_context(cafile=self.cafile),
            recipients=["zoe@example.com", "ann@example.com", "jane@example.com", "audit@example.com"],
        )
        self.assertEqual(errors, {})
        email = self.only_email()
        self.assertEqual(response, f"2.0.0 Ok: queued as {email.id}")
        self.assertEqual(email.api_key, FULL_KEY)
        p = email.payload
        self.assertEqual(p["from"], "Jörg Müller <you@yourdomain.com>")
        self.assertEqual(p["to"], ["Zoë Ångström <zoe@example.com>", "ann@example.com"])
        self.assertEqual(p["cc"], ['"Doe, Jane" <jane@example.com>'])
        self.assertEqual(p["bcc"], ["audit@example.com"])
        self.assertEqual(p["reply_to"], "Support Team <support@yourdomain.com>")
        self.assertEqual(p["subject"], SUBJECT)
        self.assertEqual(p["text"], "Hallo Zoë,\nanbei der Bericht.\n")
        self.assertEqual(p["html"], '<p>Hallo Zoë,<br>anbei der Bericht.</p><img src="cid:logo@yourdomain.com">\n')
        self.assertEqual(p["tags"], ["aiosmtplib", "interop"])
        self.assertEqual(
            sorted(attachment_summary(p)),
            sorted(
                [
                    ("Bericht_März.pdf", "application/pdf", sha256(PDF_BYTES)),
                    ("logo.png", "image/png", sha256(PNG_BYTES)),
                ]
            ),
        )

    async def test_mailbox_login(self) -> None:
        """A mailbox login with use_tls=True: sent with the service key."""
        user, password = MAILBOX
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = user, "bob@example.com", "Hi"
        msg.set_content("Hi Bob.\n")
        errors, _ = await self.send(
            msg, username=user, password=password, use_tls=True,
            tls_context=ssl.create_default_context(cafile=self.cafile),
        )
        self.assertEqual(errors, {})
        self.assertEqual(self.only_email().api_key, SERVICE_KEY)

    async def test_start_tls_mistake(self) -> None:
        """start_tls=True (STARTTLS) instead of use_tls: SMTPConnectError with the relay's 554 text; nothing stored."""
        import aiosmtplib

        with self.assertRaises(aiosmtplib.SMTPException) as caught:
            await self.send(
                self.rich_message(), username="poststack", password=FULL_KEY, start_tls=True,
                tls_context=ssl.create_default_context(cafile=self.cafile),
            )
        self.assertIn("This port requires TLS from the first byte", str(caught.exception))
        self.assertIn("use_tls=True (aiosmtplib)", str(caught.exception))
        self.assertEqual(self.stored(), [])
