"""
International mail end to end (RFC 6531/6532): smtplib over real loopback
TLS to the relay, the relay over real HTTP to the sandbox API (which
checks the contract: A-label domains, UTF-8 local parts, Unicode names).
Field by field, what the API received.
"""

from __future__ import annotations

import base64
import smtplib
from email.message import EmailMessage
from email.policy import SMTPUTF8
from typing import Any

from tests.common.keys import FULL_KEY, SERVICE_KEY
from tests.common.relay import RelayTestCase

# The sandbox's verified IDN domain (etc/sandbox.json lists it as U-labels)
# and its mailbox with a UTF-8 local part.
IDN = "bücher.example"
IDN_A = "xn--bcher-kva.example"
MAILBOX = ("jörg@bücher.example", "jörg-password")

RAW = (
    "From: Jörg Müller <jörg@bücher.example>\r\n"
    "To: 用户 <用户@例子.example>, \"Ivanov, Ivan\" <иван@Bücher.example>\r\n"
    "Cc: =?utf-8?q?Jos=C3=A9?= <josé@example.com>\r\n"
    "Reply-To: \"Müller, Jörg\" <antwort@bücher.example>\r\n"
    "Subject: Grüße aus Köln 👋\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Grüße, 用户!\r\n"
).encode("utf-8")


def _utf8_command(client: smtplib.SMTP, line: str) -> tuple[int, str]:
    """Send one command line as UTF-8 (smtplib would encode it as ASCII); its reply."""
    client.send(line.encode("utf-8") + b"\r\n")
    code, text = client.getreply()
    return code, text.decode("utf-8", "replace")


def _login_utf8(client: smtplib.SMTP, username: str, password: str) -> tuple[int, str]:
    """AUTH PLAIN with UTF-8 credentials (smtplib's login() encodes them as ASCII)."""
    client.ehlo_or_helo_if_needed()
    token = base64.b64encode(f"\0{username}\0{password}".encode("utf-8")).decode("ascii")
    return _utf8_command(client, f"AUTH PLAIN {token}")


class SmtplibInternationalTests(RelayTestCase):
    """smtplib with SMTPUTF8, over real TLS, against the sandbox."""

    def assertInternationalPayload(self, payload: dict[str, Any]) -> None:
        """The fields of L{RAW} as the contract says the API receives them."""
        self.assertEqual(payload["from"], f"Jörg Müller <jörg@{IDN_A}>")
        self.assertEqual(
            payload["to"], [f"用户 <用户@xn--fsqu00a.example>", f'"Ivanov, Ivan" <иван@{IDN_A}>']
        )
        self.assertEqual(payload["cc"], ["José <josé@example.com>"])
        self.assertEqual(payload["bcc"], [f"hidden@{IDN_A}"])
        self.assertEqual(payload["reply_to"], f'"Müller, Jörg" <antwort@{IDN_A}>')
        self.assertEqual(payload["subject"], "Grüße aus Köln 👋")
        self.assertEqual(payload["text"], "Grüße, 用户!")

    async def test_sendmail_with_smtputf8(self) -> None:
        """
        EHLO offers SMTPUTF8; sendmail(..., mail_options=["SMTPUTF8"]) with a
        U-label sender and UTF-8 recipients (one only in the envelope) is
        stored with A-label domains, UTF-8 local parts and names.
        """

        def send() -> tuple[bool, dict[str, tuple[int, bytes]]]:
            with self.smtp() as s:
                s.login("poststack", FULL_KEY)
                offered = s.has_extn("smtputf8")
                refused = s.sendmail(
                    f"jörg@{IDN}",
                    ["用户@例子.example", f"иван@{IDN}", "josé@example.com", f"hidden@{IDN}"],
                    RAW,
                    mail_options=["SMTPUTF8", "BODY=8BITMIME"],
                )
                return offered, refused

        offered, refused = await self.in_thread(send)
        self.assertTrue(offered)
        self.assertEqual(refused, {})
        [email] = self.stored()
        self.assertEqual(email.api_key, FULL_KEY)
        self.assertInternationalPayload(email.payload)

    async def test_send_message_adds_smtputf8(self) -> None:
        """
        send_message with a UTF-8 address: smtplib sees SMTPUTF8 offered and
        declares it itself; the mailbox jörg@bücher.example (logged in with
        its UTF-8 address) may send as itself, written with the A-label.
        """

        def send() -> tuple[int, str]:
            message = EmailMessage(policy=SMTPUTF8)
            message["From"] = f"Jörg <JÖRG@{IDN_A}>"
            message["To"] = "用户 <用户@例子.example>"
            message["Reply-To"] = "Antwort <antwort@bücher.example>"
            message["Subject"] = "send_message: ünïcödé"
            message.set_content("Hallo 用户\n")
            with self.smtp() as s:
                code, text = _login_utf8(s, *MAILBOX)
                if code != 235:
                    return code, text
                s.send_message(message)
                return 250, ""

        self.assertEqual(await self.in_thread(send), (250, ""))
        [email] = self.stored()
        self.assertEqual(email.api_key, SERVICE_KEY)
        payload = email.payload
        self.assertEqual(payload["from"], f"Jörg <JÖRG@{IDN_A}>")
        self.assertEqual(payload["to"], ["用户 <用户@xn--fsqu00a.example>"])
        self.assertEqual(payload["reply_to"], f"Antwort <antwort@{IDN_A}>")
        self.assertEqual(payload["subject"], "send_message: ünïcödé")
        self.assertEqual(payload["text"], "Hallo 用户")  # the framing line break is not content
        self.assertNotIn("cc", payload)
        self.assertNotIn("bcc", payload)

    async def test_without_smtputf8_refused(self) -> None:
        """
        UTF-8 in MAIL FROM or RCPT TO without the SMTPUTF8 parameter gets
        553 5.6.7 (RFC 6531 section 3.5); A-labels need no SMTPUTF8; nothing
        is stored for the refused recipient.
        """

        def dialogue() -> list[tuple[int, str]]:
            with self.smtp() as s:
                s.login("poststack", FULL_KEY)
                replies = [
                    _utf8_command(s, f"MAIL FROM:<jörg@{IDN}>"),
                    _utf8_command(s, f"MAIL FROM:<info@{IDN_A}> BODY=8BITMIME"),
                    _utf8_command(s, "RCPT TO:<用户@例子.example>"),
                    _utf8_command(s, f"RCPT TO:<user@{IDN_A}>"),
                    _utf8_command(s, "RSET"),
                ]
                return replies

        replies = await self.in_thread(dialogue)
        self.assertEqual(
            replies[0], (553, "5.6.7 Sender address is not ASCII: add SMTPUTF8 to MAIL FROM (RFC 6531)")
        )
        self.assertEqual(replies[1], (250, "2.1.0 Ok"))
        self.assertEqual(
            replies[2], (553, "5.6.7 Recipient address is not ASCII: add SMTPUTF8 to MAIL FROM (RFC 6531)")
        )
        self.assertEqual(replies[3], (250, "2.1.5 Ok"))
        self.assertEqual(self.stored(), [])

    async def test_mailbox_sender_policy_canonical(self) -> None:
        """
        The mailbox's own address in another spelling (case, A-label) is its
        own; another local part on the same domain is refused (550 5.7.1),
        in either spelling.
        """

        def dialogue() -> list[tuple[int, str]]:
            with self.smtp() as s:
                results = [_login_utf8(s, *MAILBOX)]
                for sender in (f"JÖRG@{IDN_A}", f"jörg@BÜCHER.example", f"jorg@{IDN}", f"other@{IDN_A}"):
                    results.append(_utf8_command(s, f"MAIL FROM:<{sender}> SMTPUTF8"))
                    _utf8_command(s, "RSET")
                return results

        results = await self.in_thread(dialogue)
        self.assertEqual(results[0][0], 235, results)
        self.assertEqual([code for code, _ in results[1:]], [250, 250, 550, 550], results)
        self.assertIn("5.7.1", results[3][1])
