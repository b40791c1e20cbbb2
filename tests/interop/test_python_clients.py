"""
Python's own mail stack against relay + sandbox over loopback implicit TLS:
C{smtplib.SMTP_SSL} with messages composed by C{email.message.EmailMessage}
(the modern API) and by the legacy C{email.mime} classes, checked field by
field in what the sandbox stored.
"""

from __future__ import annotations

import smtplib
from email.header import Header
from email.message import EmailMessage
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formataddr, make_msgid
from typing import Any

from tests.common.corpus import sha256
from tests.common.interop import InteropTestCase, attachment_summary
from tests.common.keys import FULL_KEY, MAILBOX, SERVICE_KEY

PNG_BYTES = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00"
    b"\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N"
    b"\x00\x00\x00\x00IEND\xaeB`\x82"
)
"""A 1x1 PNG: binary with CR, LF and NUL bytes inside."""

PDF_BYTES = b"%PDF-1.7\n" + bytes(range(255, -1, -1)) * 3 + b"\n%%EOF"


class SMTPSSLTests(InteropTestCase):
    """smtplib.SMTP_SSL, certificate verified against the test CA for C{localhost}."""

    def send(self, message: Any, user: str, password: str, **kwargs: Any) -> Any:
        """Log in and C{send_message} in a thread; fire with its refused-recipients dict."""

        def blocking() -> Any:
            with self.smtp() as client:
                client.ehlo("client.example")
                client.login(user, password)
                return client.send_message(message, **kwargs)

        return self.in_thread(blocking)

    async def test_email_message_rich(self) -> None:
        """EmailMessage with text + html alternative, two attachments and non-ASCII subject and names."""
        msg = EmailMessage()
        msg["From"] = formataddr(("Jörg Müller", "you@yourdomain.com"))
        msg["To"] = [formataddr(("Zoë Ångström", "zoe@example.com")), "ann@example.com"]
        msg["Cc"] = formataddr(("Doe, Jane", "jane@example.com"))
        msg["Subject"] = "Grüße aus Köln – 報告 №3"
        msg["Reply-To"] = "support@yourdomain.com"
        msg["Message-ID"] = make_msgid(domain="yourdomain.com")
        msg["X-PostStack-Tags"] = "python, email-message"
        msg["X-Priority"] = "1"
        msg["Organization"] = "Ümlaut GmbH"
        msg.set_content("Hallo Zoë,\nanbei der Bericht.\n\n-- \nJörg\n")
        msg.add_alternative(
            "<html><body><p>Hallo Zoë,<br>anbei der <b>Bericht</b>.</p></body></html>\n",
            subtype="html",
        )
        msg.add_attachment(
            PDF_BYTES, maintype="application", subtype="pdf", filename="Bericht_März_2025.pdf"
        )
        msg.add_attachment(PNG_BYTES, maintype="image", subtype="png", filename="pixel.png")

        refused = await self.send(
            msg,
            "poststack",
            FULL_KEY,
            to_addrs=["zoe@example.com", "ann@example.com", "jane@example.com", "audit@example.com"],
        )

        self.assertEqual(refused, {})
        email = self.only_email()
        self.assertEqual(email.api_key, FULL_KEY)
        p = email.payload
        self.assertEqual(p["from"], "Jörg Müller <you@yourdomain.com>")
        self.assertEqual(p["to"], ["Zoë Ångström <zoe@example.com>", "ann@example.com"])
        self.assertEqual(p["cc"], ['"Doe, Jane" <jane@example.com>'])
        self.assertEqual(p["bcc"], ["audit@example.com"])
        self.assertEqual(p["reply_to"], "support@yourdomain.com")
        self.assertEqual(p["subject"], "Grüße aus Köln – 報告 №3")
        self.assertEqual(p["text"], "Hallo Zoë,\nanbei der Bericht.\n\n-- \nJörg\n")
        self.assertEqual(
            p["html"],
            "<html><body><p>Hallo Zoë,<br>anbei der <b>Bericht</b>.</p></body></html>\n",
        )
        self.assertEqual(p["tags"], ["python", "email-message"])
        self.assertEqual(
            {k.lower(): v for k, v in p["headers"].items()},
            {"x-priority": "1", "organization": "Ümlaut GmbH"},
        )
        self.assertEqual(
            attachment_summary(p),
            [
                ("Bericht_März_2025.pdf", "application/pdf", sha256(PDF_BYTES)),
                ("pixel.png", "image/png", sha256(PNG_BYTES)),
            ],
        )

    async def test_mailbox_reply_threading(self) -> None:
        """A mailbox login replying in a thread: service key, In-Reply-To/References kept, html only."""
        user, password = MAILBOX
        msg = EmailMessage()
        msg["From"] = formataddr(("Alice Ä.", user))
        msg["To"] = "bob@example.com"
        msg["Subject"] = "Re: Planung"
        msg["In-Reply-To"] = "<orig-1@example.com>"
        msg["References"] = "<root-0@example.com> <orig-1@example.com>"
        msg.set_content("<p>Einverstanden.</p>", subtype="html")

        self.assertEqual(await self.send(msg, user, password), {})

        email = self.only_email()
        self.assertEqual(email.api_key, SERVICE_KEY)
        p = email.payload
        # "." is an RFC 5322 special: the relay quotes the name (docs/mime-mapping.md).
        self.assertEqual(p["from"], f'"Alice Ä." <{user}>')
        self.assertEqual(p["to"], ["bob@example.com"])
        self.assertEqual(p["subject"], "Re: Planung")
        # set_content ends the body with a newline; in a single-part message it is
        # indistinguishable from the line break before the final dot, which the
        # relay removes as SMTP framing (docs/mime-mapping.md, "Bodies").
        self.assertEqual(p["html"], "<p>Einverstanden.</p>")
        self.assertNotIn("text", p)
        self.assertNotIn("attachments", p)
        self.assertHeader(p, "In-Reply-To", "<orig-1@example.com>")
        self.assertHeader(p, "References", "<root-0@example.com> <orig-1@example.com>")

    async def test_legacy_mime_classes(self) -> None:
        """email.mime with Header-encoded names and a latin-1 body: decoded names, text and attachment."""
        msg = MIMEMultipart("mixed")
        msg["From"] = str(Header("Renée Légère <you@yourdomain.com>", "utf-8"))
        msg["To"] = formataddr((str(Header("Zoë", "utf-8")), "zoe@example.com"))
        msg["Subject"] = Header("Café crème", "iso-8859-1")
        msg["X-PostStack-Tags"] = "legacy"
        msg.attach(MIMEText("Voilà le café.\n", "plain", "iso-8859-1"))
        attachment = MIMEApplication(PDF_BYTES, "pdf")
        attachment.add_header("Content-Disposition", "attachment", filename=("utf-8", "", "menu é.pdf"))
        msg.attach(attachment)

        def blocking() -> Any:
            with self.smtp() as client:
                client.login("poststack", FULL_KEY)
                return client.sendmail("you@yourdomain.com", ["zoe@example.com"], msg.as_string())

        refused = await self.in_thread(blocking)
        self.assertEqual(refused, {})
        p = self.only_email().payload
        self.assertEqual(p["from"], "Renée Légère <you@yourdomain.com>")
        self.assertEqual(p["to"], ["Zoë <zoe@example.com>"])
        self.assertEqual(p["subject"], "Café crème")
        self.assertEqual(p["text"], "Voilà le café.\n")
        self.assertEqual(p["tags"], ["legacy"])
        self.assertEqual(
            attachment_summary(p), [("menu é.pdf", "application/pdf", sha256(PDF_BYTES))]
        )

    async def test_wrong_key(self) -> None:
        """smtplib raises SMTPAuthenticationError with 535 and the relay's hint; nothing is stored."""

        def blocking() -> Any:
            with self.smtp() as client:
                try:
                    client.login("poststack", "sk_test_wrong")
                except smtplib.SMTPAuthenticationError as e:
                    return e.smtp_code, e.smtp_error
                return None

        result = await self.in_thread(blocking)
        self.assertIsNotNone(result)
        code, text = result
        self.assertEqual(code, 535)
        self.assertIn(b"5.7.8 Authentication credentials invalid", text)
        self.assertEqual(self.stored(), [])
