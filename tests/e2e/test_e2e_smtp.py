"""
End to end: real SMTP clients over real loopback TLS to the relay, the
relay over real HTTP to the sandbox API, the sandbox writing a real SQLite
file.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Any

from twisted.internet import reactor

from tests.common.keys import FULL_KEY, MAILBOX, SERVICE_KEY
from tests.common.relay import RelayTestCase


def transaction(client: smtplib.SMTP, sender: str, rcpts: list[str], data: bytes) -> tuple[int, str]:
    """
    MAIL, RCPT..., DATA with smtplib's primitives; returns the final reply.
    """
    code, text = client.mail(sender)
    if code != 250:
        return code, text.decode()
    for r in rcpts:
        code, text = client.rcpt(r)
        if code not in (250, 251):
            return code, text.decode()
    code, text = client.data(data)
    return code, text.decode()


class PageExampleTests(RelayTestCase):
    """The PostStack SMTP page's Python example, as written (host and port aside)."""

    async def test_python_smtplib_example(self) -> None:
        """The page's MIMEMultipart("alternative") example is stored with html and tags."""

        def page_example() -> None:
            # --- as on the page, host/port/key and the trust context aside ---
            msg = MIMEMultipart("alternative")
            msg["From"] = "you@yourdomain.com"
            msg["To"] = "user@example.com"
            msg["Subject"] = "Hello from PostStack SMTP"
            msg["X-PostStack-Tags"] = "welcome,onboarding"
            html = "<p>Sent via SMTP relay!</p>"
            msg.attach(MIMEText(html, "html"))
            with smtplib.SMTP_SSL("localhost", self.port, context=self.context()) as server:
                server.login("poststack", FULL_KEY)
                server.sendmail(
                    "you@yourdomain.com",
                    "user@example.com",
                    msg.as_string(),
                )

        await self.in_thread(page_example)
        [email] = self.stored()
        self.assertEqual(email.api_key, FULL_KEY)
        p = email.payload
        self.assertEqual(p["from"], "you@yourdomain.com")
        self.assertEqual(p["to"], ["user@example.com"])
        self.assertEqual(p["subject"], "Hello from PostStack SMTP")
        self.assertEqual(p["html"], "<p>Sent via SMTP relay!</p>")
        self.assertEqual(p["tags"], ["welcome", "onboarding"])
        self.assertNotIn("headers", p)
        self.assertTrue(email.request_headers["user-agent"].startswith("poststack-relay/"))

    async def test_reply_names_stored_id(self) -> None:
        """The 250 reply names the id the API stored."""

        def send() -> tuple[int, str]:
            with self.smtp() as s:
                s.login("poststack", FULL_KEY)
                return transaction(
                    s, "you@yourdomain.com", ["user@example.com"],
                    b"From: you@yourdomain.com\r\nTo: user@example.com\r\nSubject: x\r\n\r\nhello\r\n",
                )

        code, text = await self.in_thread(send)
        [email] = self.stored()
        self.assertEqual((code, text), (250, f"2.0.0 Ok: queued as {email.id}"))
        self.assertEqual(email.payload["text"], "hello")


class SMTPSSLTests(RelayTestCase):
    """smtplib.SMTP_SSL against relay + sandbox."""

    async def test_cc_bcc(self) -> None:
        """To and Cc come from the headers, envelope-only recipients become bcc, Bcc headers never leave."""

        def send() -> tuple[int, str]:
            msg = MIMEText("body")
            msg["From"] = "Team <you@yourdomain.com>"
            msg["To"] = "User <user@example.com>"
            msg["Cc"] = "cc@example.com"
            msg["Bcc"] = "hidden@example.com"
            msg["Subject"] = "cc and bcc"
            with self.smtp() as s:
                s.login("poststack", FULL_KEY)
                return transaction(
                    s, "you@yourdomain.com",
                    ["user@example.com", "cc@example.com", "hidden@example.com"],
                    msg.as_bytes(),
                )

        code, _ = await self.in_thread(send)
        self.assertEqual(code, 250)
        [email] = self.stored()
        p = email.payload
        self.assertEqual(p["from"], "Team <you@yourdomain.com>")
        self.assertEqual(p["to"], ["User <user@example.com>"])
        self.assertEqual(p["cc"], ["cc@example.com"])
        self.assertEqual(p["bcc"], ["hidden@example.com"])
        self.assertNotIn("Bcc", str(p.get("headers", {})))

    async def test_attachments(self) -> None:
        """Attachments arrive with name, type and content."""
        import base64

        def send() -> tuple[int, str]:
            msg = MIMEMultipart()
            msg["From"] = "you@yourdomain.com"
            msg["To"] = "user@example.com"
            msg["Subject"] = "report"
            msg.attach(MIMEText("see attached"))
            part = MIMEApplication(b"%PDF-1.4 fake\x00\xff", "pdf")
            part.add_header("Content-Disposition", "attachment", filename="report.pdf")
            msg.attach(part)
            with self.smtp() as s:
                s.login("poststack", FULL_KEY)
                return transaction(s, "you@yourdomain.com", ["user@example.com"], msg.as_bytes())

        code, _ = await self.in_thread(send)
        self.assertEqual(code, 250)
        [email] = self.stored()
        [att] = email.payload["attachments"]
        self.assertEqual(att["filename"], "report.pdf")
        self.assertEqual(att["content_type"], "application/pdf")
        self.assertEqual(base64.b64decode(att["content"]), b"%PDF-1.4 fake\x00\xff")
        self.assertEqual(email.payload["text"].strip(), "see attached")

    async def test_large_attachment(self) -> None:
        """A 3 MB attachment (the run fast path and the streamed request body) arrives byte for byte."""
        import base64
        import os

        content = os.urandom(3 * 1024 * 1024)

        def send() -> tuple[int, str]:
            msg = MIMEMultipart()
            msg["From"] = "you@yourdomain.com"
            msg["To"] = "user@example.com"
            msg["Subject"] = "big"
            msg.attach(MIMEText("see attached"))
            part = MIMEApplication(content, "octet-stream")
            part.add_header("Content-Disposition", "attachment", filename="big.bin")
            msg.attach(part)
            with self.smtp() as s:
                s.login("poststack", FULL_KEY)
                return transaction(s, "you@yourdomain.com", ["user@example.com"], msg.as_bytes())

        code, _ = await self.in_thread(send)
        self.assertEqual(code, 250)
        [email] = self.stored()
        [att] = email.payload["attachments"]
        self.assertEqual(att["filename"], "big.bin")
        self.assertEqual(base64.b64decode(att["content"]), content)
        self.assertEqual(email.payload["text"].strip(), "see attached")

    async def test_mailbox_user(self) -> None:
        """A mailbox login sends from its own address with the service key, and not from another."""

        def send() -> tuple[tuple[int, str], tuple[int, str]]:
            good = b"From: Alice <alice@yourdomain.com>\r\nTo: user@example.com\r\nSubject: hi\r\n\r\nhi\r\n"
            with self.smtp() as s:
                s.login(*MAILBOX)
                ok = transaction(s, "alice@yourdomain.com", ["user@example.com"], good)
                bad = s.mail("someone@yourdomain.com")
                return ok, (bad[0], bad[1].decode())

        ok, bad = await self.in_thread(send)
        self.assertEqual(ok[0], 250, ok)
        self.assertEqual(bad[0], 550)
        self.assertTrue(bad[1].startswith("5.7.1 "), bad)
        [email] = self.stored()
        self.assertEqual(email.api_key, SERVICE_KEY)
        self.assertEqual(email.payload["from"], "Alice <alice@yourdomain.com>")

    async def test_wrong_credentials(self) -> None:
        """A wrong key is 535 5.7.8 and nothing can be sent."""

        def send() -> Any:
            with self.smtp() as s:
                try:
                    s.login("poststack", "sk_test_not_a_key")
                except smtplib.SMTPAuthenticationError as e:
                    return e.smtp_code, e.smtp_error.decode(), s.mail("you@yourdomain.com")
            return None

        code, text, mail = await self.in_thread(send)
        self.assertEqual(code, 535)
        self.assertTrue(text.startswith("5.7.8 "), text)
        self.assertEqual(mail[0], 530)
        self.assertEqual(self.stored(), [])

    async def test_mail_before_auth(self) -> None:
        """MAIL without AUTH is 530 5.7.0."""

        def send() -> tuple[int, bytes]:
            with self.smtp() as s:
                s.ehlo()
                return s.mail("you@yourdomain.com")

        code, text = await self.in_thread(send)
        self.assertEqual(code, 530)
        self.assertTrue(text.startswith(b"5.7.0 "))

    async def test_invalid_variables(self) -> None:
        """X-PostStack-Variables that is not a JSON object is 554 5.6.0 and nothing is stored."""

        def send() -> tuple[int, str]:
            data = (
                b"From: you@yourdomain.com\r\nTo: user@example.com\r\nSubject: t\r\n"
                b"X-PostStack-Template-Id: tpl_abc123def456ghi789\r\n"
                b"X-PostStack-Variables: {not json\r\n\r\nx\r\n"
            )
            with self.smtp() as s:
                s.login("poststack", FULL_KEY)
                return transaction(s, "you@yourdomain.com", ["user@example.com"], data)

        code, text = await self.in_thread(send)
        self.assertEqual(code, 554)
        self.assertTrue(text.startswith("5.6.0 "), text)
        self.assertIn("X-PostStack-Variables", text)
        self.assertEqual(self.stored(), [])

    async def test_api_422_then_usable(self) -> None:
        """An API 422 (unverified domain) is 550 5.7.1 naming the domain, with the API's text; the session then sends fine."""

        def send() -> tuple[tuple[int, str], tuple[int, str]]:
            with self.smtp() as s:
                s.login("poststack", FULL_KEY)
                bad = transaction(
                    s, "you@pendingdomain.com", ["user@example.com"],
                    b"From: you@pendingdomain.com\r\nTo: user@example.com\r\nSubject: t\r\n\r\nx\r\n",
                )
                good = transaction(
                    s, "you@yourdomain.com", ["user@example.com"],
                    b"From: you@yourdomain.com\r\nTo: user@example.com\r\nSubject: t\r\n\r\nx\r\n",
                )
                return bad, good

        bad, good = await self.in_thread(send)
        self.assertEqual(bad[0], 550, bad)
        self.assertTrue(bad[1].startswith("5.7.1 Sender address rejected: the domain pendingdomain.com "), bad)
        self.assertIn("(PostStack API: Domain not verified, HTTP 422)", bad[1])
        self.assertEqual(good[0], 250)
        self.assertEqual(len(self.stored()), 1)

    async def test_api_500(self) -> None:
        """An API 500 is retried inside the transaction: one 250, one stored email."""
        self.sandbox.resource.inject_fault("500")

        def send() -> tuple[int, str]:
            data = b"From: you@yourdomain.com\r\nTo: user@example.com\r\nSubject: t\r\n\r\nx\r\n"
            with self.smtp() as s:
                s.login("poststack", FULL_KEY)
                return transaction(s, "you@yourdomain.com", ["user@example.com"], data)

        code, text = await self.in_thread(send)
        [email] = self.stored()
        self.assertEqual((code, text), (250, f"2.0.0 Ok: queued as {email.id}"))


class APIDownTests(RelayTestCase):
    """The API keeps failing: the client hears a 4xx, nothing is stored."""

    relay_options = {"api_timeout": 1.0, "api_deadline": 2.0, "api_breaker_failures": 0}

    async def test_api_500_until_deadline(self) -> None:
        """A 500 on every attempt ends in 451 4.3.0 within the deadline and nothing stored."""
        self.sandbox.resource.inject_fault("500", count=-1)

        def send() -> tuple[int, str]:
            data = b"From: you@yourdomain.com\r\nTo: user@example.com\r\nSubject: t\r\n\r\nx\r\n"
            with self.smtp() as s:
                s.login("poststack", FULL_KEY)
                return transaction(s, "you@yourdomain.com", ["user@example.com"], data)

        code, text = await self.in_thread(send)
        self.assertEqual(code, 451, text)
        self.assertTrue(text.startswith("4.3.0 "), text)
        self.assertEqual(self.stored(), [])


class IdempotencyTests(RelayTestCase):
    """X-PostStack-Idempotency-Key end to end."""

    async def test_same_key_sent_twice(self) -> None:
        """Sending the same message with the same key twice yields one stored email and the same id twice."""
        data = (
            b"From: you@yourdomain.com\r\nTo: user@example.com\r\nSubject: once\r\n"
            b"X-PostStack-Idempotency-Key: order-1234-confirmation\r\n\r\nonly once\r\n"
        )

        def send() -> list[tuple[int, str]]:
            results = []
            for _ in range(2):
                with self.smtp() as s:
                    s.login("poststack", FULL_KEY)
                    results.append(transaction(s, "you@yourdomain.com", ["user@example.com"], data))
            return results

        first, second = await self.in_thread(send)
        [email] = self.stored()
        self.assertEqual(first, (250, f"2.0.0 Ok: queued as {email.id}"))
        self.assertEqual(second, first)
        self.assertEqual(email.idempotency_key, "order-1234-confirmation")
        self.assertEqual(email.request_headers["idempotency-key"], "order-1234-confirmation")


class RefusalTests(RelayTestCase):
    """Clients that do not speak implicit TLS 1.2+."""

    relay_options = {"tls_detect_timeout": 1.0}

    async def test_smtplib_plaintext(self) -> None:
        """smtplib.SMTP (STARTTLS-style) gets the 554 5.7.0 implicit-TLS explanation instead of a banner."""

        def connect() -> Any:
            try:
                smtplib.SMTP("127.0.0.1", self.port, timeout=10)
            except smtplib.SMTPConnectError as e:
                return e.smtp_code, e.smtp_error.decode()
            return None

        code, text = await self.in_thread(connect)
        self.assertEqual(code, 554)
        self.assertTrue(text.startswith("5.7.0 This port requires TLS from the first byte"), text)
        self.assertIn("SMTP_SSL", text)

    async def test_raw_socket_command(self) -> None:
        """A raw socket that types EHLO gets the same single line, then EOF."""

        def talk() -> bytes:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                sock.sendall(b"EHLO me\r\n")
                data = b""
                while True:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return data
                    data += chunk

        data = await self.in_thread(talk)
        self.assertTrue(data.startswith(b"554 5.7.0 This port requires TLS"), data)
        self.assertEqual(data.count(b"\r\n"), 1)
        self.assertNotIn(b"220", data)

    async def test_tls11_refused(self) -> None:
        """A client limited to TLS 1.1 fails the handshake with a protocol-version alert."""

        def connect() -> str:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
            ctx.set_ciphers("ALL:@SECLEVEL=0")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                    with ctx.wrap_socket(sock, server_hostname="localhost"):
                        return "connected"
            except ssl.SSLError as e:
                return str(e)

        result = await self.in_thread(connect)
        self.assertIn("VERSION", result.upper(), result)

    async def test_tls12_and_13_accepted(self) -> None:
        """TLS 1.2 and TLS 1.3 clients both get the banner."""

        def banner(version: ssl.TLSVersion) -> tuple[str, str]:
            ctx = self.context()
            ctx.minimum_version = version
            ctx.maximum_version = version
            with smtplib.SMTP_SSL("localhost", self.port, context=ctx, timeout=10) as s:
                return s.sock.version(), s.sock.cipher()[0]  # type: ignore[union-attr]

        v12, c12 = await self.in_thread(banner, ssl.TLSVersion.TLSv1_2)
        v13, _ = await self.in_thread(banner, ssl.TLSVersion.TLSv1_3)
        self.assertEqual((v12, v13), ("TLSv1.2", "TLSv1.3"))
        self.assertTrue(c12.startswith("ECDHE-") and ("GCM" in c12 or "CHACHA20" in c12), c12)
