"""
Tests for L{poststack_relay.translate}: MIME bytes plus envelope in, one
C{POST /emails} body (or one SMTP error reply) out.

Sample messages in C{tests/mime/} are stored with LF line endings; L{load}
turns them into CRLF lines, as they arrive in DATA.
"""

from __future__ import annotations

import base64
import json
import random
import time
from email.utils import getaddresses
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.translate import (
    MAX_MIME_DEPTH,
    MAX_MIME_PARTS,
    MAX_VARIABLES_DEPTH,
    EmailRequest,
    Envelope,
    TranslationError,
    translate,
)
from poststack_relay.translate.addressing import _simple_addresses  # differential test
from tests.common.corpus import corpus_names, load

_SAMPLE_NAMES = corpus_names()


def _message(*headers: str, body: bytes | str = "Hello.\r\n") -> bytes:
    """Build raw message bytes from header lines and a body."""
    head = "".join(line + "\r\n" for line in headers).encode("utf-8")
    if isinstance(body, str):
        body = body.encode("utf-8")
    return head + b"\r\n" + body


def _envelope(*rcpt: str, mail_from: str = "bounce@yourdomain.com") -> Envelope:
    """An envelope with the given recipients (default: user@example.com)."""
    return Envelope(mail_from=mail_from, rcpt_to=rcpt or ("user@example.com",))


def _payload(
    raw: bytes, envelope: Envelope | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Translate and return the payload."""
    return translate(raw, envelope or _envelope(), **kwargs).payload


def _simple(
    *headers: str, body: bytes | str = "Hello.\r\n", **kwargs: Any
) -> dict[str, Any]:
    """Translate a message with From/To already set plus the given headers."""
    raw = _message(
        "From: sender@yourdomain.com", "To: user@example.com", *headers, body=body
    )
    return _payload(raw, **kwargs)


def _attachment_bytes(attachment: dict[str, str]) -> bytes:
    """Decode an attachment's content."""
    return base64.b64decode(attachment["content"], validate=True)


def _assert_valid(testcase: SynchronousTestCase, request: EmailRequest) -> None:
    """Assert the request is a well-formed, JSON-able, UTF-8-encodable body."""
    payload = request.payload
    json.dumps(payload, ensure_ascii=False).encode("utf-8")
    testcase.assertIsInstance(payload["from"], str)
    testcase.assertTrue(payload["from"])
    testcase.assertIsInstance(payload["to"], list)
    testcase.assertTrue(payload["to"])
    for key in ("to", "cc", "bcc", "tags"):
        for item in payload.get(key, []):
            testcase.assertIsInstance(item, str)
    for key in ("subject", "text", "html", "reply_to", "template_id"):
        if key in payload:
            testcase.assertIsInstance(payload[key], str)
    for name, value in payload.get("headers", {}).items():
        for char in "\r\n\x00":
            testcase.assertNotIn(char, name)
            testcase.assertNotIn(char, value)
    for attachment in payload.get("attachments", []):
        testcase.assertEqual(
            sorted(attachment), ["content", "content_type", "filename"]
        )
        testcase.assertTrue(attachment["filename"])
        _attachment_bytes(attachment)
    testcase.assertEqual(request.idempotency_key, payload.get("idempotency_key"))
    if "text" not in payload and "html" not in payload:
        testcase.assertIn("template_id", payload)


class PublicPageExampleTests(SynchronousTestCase):
    """The three examples of the public SMTP relay page, as clients send them."""

    def test_python_smtplib_example(self) -> None:
        """The smtplib/MIMEMultipart example becomes exactly the documented API call."""
        request = translate(load("stdlib_docs_example.eml"), _envelope())
        self.assertEqual(
            request.payload,
            {
                "from": "you@yourdomain.com",
                "to": ["user@example.com"],
                "subject": "Hello from PostStack SMTP",
                "html": "<p>Sent via SMTP relay!</p>",
                "tags": ["welcome", "onboarding"],
            },
        )
        self.assertIsNone(request.idempotency_key)

    def test_nodemailer_example(self) -> None:
        """The nodemailer sendMail example becomes the same call (7bit single part)."""
        self.assertEqual(
            _payload(load("nodemailer_docs_example.eml")),
            {
                "from": "you@yourdomain.com",
                "to": ["user@example.com"],
                "subject": "Hello from PostStack SMTP",
                "html": "<p>Sent via SMTP relay!</p>",
                "tags": ["welcome", "onboarding"],
            },
        )

    def test_nodemailer_template_example(self) -> None:
        """The template example carries template_id and variables, no subject or text."""
        self.assertEqual(
            _payload(load("nodemailer_docs_template.eml")),
            {
                "from": "you@yourdomain.com",
                "to": ["user@example.com"],
                "template_id": "tpl_abc123def456ghi789",
                "variables": {"first_name": "Alice", "company_name": "Acme Inc"},
            },
        )


class SampleClientTests(SynchronousTestCase):
    """Messages in the shapes real clients and libraries produce."""

    def test_nodemailer_utf8_alternative(self) -> None:
        """nodemailer text+html in quoted-printable UTF-8 with encoded names and subject."""
        payload = _payload(
            load("nodemailer_alternative_utf8.eml"),
            _envelope("joerg@example.de", "buchhaltung@yourdomain.com"),
        )
        self.assertEqual(payload["from"], "Shop Müller <shop@yourdomain.com>")
        self.assertEqual(payload["to"], ["Jörg Schröder <joerg@example.de>"])
        self.assertEqual(
            payload["cc"], ['"Buchhaltung, Shop" <buchhaltung@yourdomain.com>']
        )
        self.assertNotIn("bcc", payload)
        self.assertEqual(payload["reply_to"], "Kundenservice <service@yourdomain.com>")
        self.assertEqual(payload["subject"], "Ihre Bestellung ist unterwegs – Nr. 4711")
        self.assertEqual(
            payload["text"],
            "Hallo Jörg,\n\nIhre Bestellung Nr. 4711 ist unterwegs – voraussichtliche"
            " Lieferung am Freitag.\n\nViele Grüße\nDas Team",
        )
        self.assertTrue(payload["html"].startswith("<p>Hallo Jörg,</p>"))
        self.assertIn("<b>Nr. 4711</b>", payload["html"])
        self.assertEqual(payload["tags"], ["bestellung", "größe"])
        self.assertEqual(payload["headers"], {"X-Campaign": "spring-2024"})

    def test_nodemailer_mixed_related(self) -> None:
        """Inline cid image and an RFC 2231 continued UTF-8 filename become attachments."""
        payload = _payload(
            load("nodemailer_mixed_attachments.eml"), _envelope("customer@example.com")
        )
        self.assertEqual(payload["text"], "Invoice attached.")
        self.assertEqual(
            payload["html"],
            '<p>Invoice attached.</p><img src="cid:logo@yourdomain.com">',
        )
        logo, invoice = payload["attachments"]
        self.assertEqual(logo["filename"], "logo.png")
        self.assertEqual(logo["content_type"], "image/png")
        self.assertTrue(_attachment_bytes(logo).startswith(b"\x89PNG\r\n"))
        self.assertEqual(
            invoice["filename"], "Rechnung März 2024 – Kundennummer 123456789.pdf"
        )
        self.assertEqual(invoice["content_type"], "application/pdf")
        self.assertTrue(_attachment_bytes(invoice).startswith(b"%PDF-1.4"))

    def test_nodemailer_calendar(self) -> None:
        """The calendar alternative keeps its method; the .ics attachment keeps its name."""
        payload = _payload(
            load("nodemailer_calendar.eml"), _envelope("attendee@example.com")
        )
        self.assertEqual(payload["text"], "You are invited.")
        self.assertEqual(payload["html"], "<p>You are invited.</p>")
        calendar, invite = payload["attachments"]
        self.assertEqual(calendar["filename"], "attachment-1.ics")
        self.assertEqual(
            calendar["content_type"], "text/calendar; charset=utf-8; method=REQUEST"
        )
        self.assertIn(b"METHOD:REQUEST\r\n", _attachment_bytes(calendar))
        self.assertEqual(invite["filename"], "invite.ics")
        self.assertEqual(invite["content_type"], "application/ics")
        self.assertEqual(_attachment_bytes(invite), _attachment_bytes(calendar))

    def test_thunderbird_rfc2231_and_flowed(self) -> None:
        """Thunderbird's filename*=UTF-8'' wins over name=; format=flowed is unflowed."""
        payload = _payload(
            load("thunderbird_rfc2231_attachment.eml"),
            _envelope("recruteur@example.fr"),
        )
        self.assertEqual(payload["from"], "Anaïs Lefèvre <anais@yourdomain.com>")
        self.assertEqual(payload["subject"], "Candidature – développeuse")
        self.assertEqual(
            payload["text"],
            "Bonjour,\n\nveuillez trouver mon CV ci-joint. Très cordialement,\nAnaïs\n",
        )
        [cv] = payload["attachments"]
        self.assertEqual(cv["filename"], "CV Anaïs Lefèvre.pdf")
        self.assertEqual(cv["content_type"], "application/pdf")

    def test_outlook_meeting_request(self) -> None:
        """Outlook: iso-8859-1 QP bodies, quoted encoded name, calendar part, Thread-* headers."""
        payload = _payload(
            load("outlook_meeting_request.eml"),
            _envelope("team@example.com", "anna.schmidt@example.com"),
        )
        self.assertEqual(
            payload["from"], '"Müller, Jörg" <joerg.mueller@yourdomain.com>'
        )
        self.assertEqual(payload["to"], ["Team <team@example.com>"])
        self.assertEqual(payload["cc"], ['"Schmidt, Anna" <anna.schmidt@example.com>'])
        self.assertEqual(
            payload["text"],
            "Hallo zusammen,\n\nbitte nehmt an der Quartalsplanung teil.\n\nGrüße\nJörg\n",
        )
        self.assertIn("<p>Grüße<br>Jörg</p>", payload["html"])
        [calendar] = payload["attachments"]
        self.assertEqual(
            calendar["content_type"], "text/calendar; charset=utf-8; method=REQUEST"
        )
        self.assertEqual(calendar["filename"], "attachment-1.ics")
        self.assertEqual(
            payload["headers"],
            {
                "Thread-Topic": "Quartalsplanung",
                "Thread-Index": "AdpxQ2Vb3c7XyZ1kS0mFz0sE2xT8aw==",
                "x-ms-exchange-calendar-series-instance-id": "BAAAAIIA4AB0xbcQGoLgCAAAAAA=",
            },
        )

    def test_phpmailer_iso_8859_1_8bit(self) -> None:
        """PHPMailer's 8bit iso-8859-1 bodies and Q-encoded subject decode correctly."""
        payload = _payload(
            load("phpmailer_iso8859_1.eml"), _envelope("kundin@example.org")
        )
        self.assertEqual(payload["subject"], "Ihre Bestellbestätigung")
        self.assertEqual(
            payload["text"],
            "Sehr geehrte Kundin,\n\nvielen Dank für Ihre Bestellung über 49,90 EUR.\n",
        )
        self.assertEqual(
            payload["html"],
            "<p>Sehr geehrte Kundin,</p><p>vielen Dank für Ihre Bestellung.</p>\n\n",
        )
        self.assertEqual(payload["reply_to"], "Support <support@yourdomain.com>")
        self.assertEqual(payload["tags"], ["order"])
        self.assertEqual(
            payload["headers"],
            {"X-Mailer": "PHPMailer 6.9.1 (https://github.com/PHPMailer/PHPMailer)"},
        )

    def test_windows_1252(self) -> None:
        """windows-1252 smart quotes and euro sign decode in subject and body."""
        payload = _payload(load("windows1252_qp.eml"), _envelope("buyer@example.com"))
        self.assertEqual(payload["subject"], "“Deals” – 5 €")
        self.assertEqual(
            payload["text"], "“Quoted” prices start at 5 € – don’t miss it…"
        )

    def test_shift_jis(self) -> None:
        """Shift_JIS 8bit body (with a Windows-only character) and B-encoded headers decode."""
        payload = _payload(load("shift_jis_8bit.eml"), _envelope("tanaka@example.jp"))
        self.assertEqual(payload["from"], "鈴木 <suzuki@yourdomain.com>")
        self.assertEqual(payload["subject"], "会議資料")
        self.assertEqual(
            payload["text"],
            "田中様\n\nいつもお世話になっております。①会議の資料を送付します。",
        )

    def test_koi8_r(self) -> None:
        """KOI8-R base64 body and B-encoded headers decode."""
        payload = _payload(load("koi8r_base64.eml"), _envelope("client@example.ru"))
        self.assertEqual(payload["from"], "Бухгалтерия <buh@yourdomain.com>")
        self.assertEqual(payload["subject"], "Счет на оплату")
        self.assertEqual(payload["text"], "Здравствуйте!\n\nСчет во вложении.\n")

    def test_forward_as_attachment(self) -> None:
        """A message/rfc822 part becomes an .eml attachment holding the original bytes."""
        payload = _payload(
            load("thunderbird_forward_as_attachment.eml"),
            _envelope("colleague@example.com"),
        )
        self.assertEqual(payload["text"], "See the forwarded message.\n")
        [forwarded] = payload["attachments"]
        self.assertEqual(forwarded["filename"], "Original subject.eml")
        self.assertEqual(forwarded["content_type"], "message/rfc822")
        self.assertEqual(
            _attachment_bytes(forwarded),
            b"From: Someone <someone@example.org>\r\n"
            b"To: Me <me@yourdomain.com>\r\n"
            b"Subject: Original subject\r\n"
            b"Date: Tue, 12 Mar 2024 18:00:00 +0100\r\n"
            b"Message-ID: <orig-1@example.org>\r\n"
            b"MIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=UTF-8\r\n"
            b"Content-Transfer-Encoding: 7bit\r\n"
            b"\r\n"
            b"The original body.\r\n",
        )

    def test_apple_mail_inline_image(self) -> None:
        """Apple Mail's inline image (disposition inline with filename) is an attachment."""
        payload = _payload(
            load("apple_mail_inline_image.eml"), _envelope("friend@example.com")
        )
        self.assertEqual(payload["text"], "Here it is:\n\n\n")
        self.assertIn('src="cid:A1B2C3D4-E5F6-4789-ABCD-EF0123456789"', payload["html"])
        [image] = payload["attachments"]
        self.assertEqual(image["filename"], "IMG_0042.png")
        self.assertEqual(image["content_type"], "image/png")
        self.assertEqual(payload["headers"], {"X-Mailer": "Apple Mail (2.3774.400.31)"})

    def test_emailmessage_undisclosed_recipients(self) -> None:
        """policy.default output: group syntax To, Bcc header, RFC 2231 name, idempotency key."""
        request = translate(
            load("stdlib_emailmessage_undisclosed.eml"),
            _envelope("hidden@example.com", "other@example.net"),
        )
        payload = request.payload
        self.assertEqual(payload["from"], "Zoë Sender <zoe@yourdomain.com>")
        self.assertEqual(payload["to"], ["hidden@example.com", "other@example.net"])
        self.assertNotIn("bcc", payload)
        self.assertNotIn("headers", payload)
        self.assertEqual(payload["subject"], "Rapport trimestriel – été 2024")
        self.assertEqual(
            payload["reply_to"], "Équipe <team@yourdomain.com>, ops@yourdomain.com"
        )
        self.assertEqual(payload["text"], "Bonjour,\n\nvoici le rapport de l'été.\n")
        [csv] = payload["attachments"]
        self.assertEqual(csv["filename"], "données été.csv")
        self.assertEqual(csv["content_type"], "text/csv")
        self.assertEqual(_attachment_bytes(csv), b"col1;col2\n1;2\n")
        self.assertEqual(request.idempotency_key, "order-4711-confirmation")
        self.assertEqual(payload["idempotency_key"], "order-4711-confirmation")

    def test_legacy_api_fully_encoded_addresses(self) -> None:
        """Python's legacy API encodes whole address fields; they are still understood."""
        payload = _payload(
            load("stdlib_legacy_nonascii_headers.eml"),
            _envelope("joerg@example.de", "other@example.com"),
        )
        self.assertEqual(payload["from"], "Shop Müller <shop@yourdomain.com>")
        self.assertEqual(
            payload["to"], ["Jörg <joerg@example.de>", "other@example.com"]
        )
        self.assertEqual(payload["subject"], "Grüße aus Köln")
        self.assertEqual(
            (payload["text"], payload["html"]), ("Grüße!", "<p>Grüße!</p>")
        )

    def test_every_sample_is_valid(self) -> None:
        """Every sample message translates into a well-formed payload."""
        self.assertGreaterEqual(len(_SAMPLE_NAMES), 16)
        everyone = _envelope(
            "user@example.com", "friend@example.com", "team@example.com"
        )
        for name in _SAMPLE_NAMES:
            _assert_valid(self, translate(load(name), everyone))

    def test_bare_lf_line_endings(self) -> None:
        """Messages with bare LF line endings translate like their CRLF form."""
        everyone = _envelope(
            "user@example.com", "customer@example.com", "attendee@example.com"
        )

        def normalized(raw: bytes) -> dict[str, Any]:
            """Translate, with attachment contents decoded and LF-only."""
            # Attachments keep their bytes as received: compare them LF-only.
            payload = translate(raw, everyone).payload
            for attachment in payload.get("attachments", []):
                attachment["content"] = _attachment_bytes(attachment).replace(
                    b"\r\n", b"\n"
                )
            return payload

        for name in _SAMPLE_NAMES:
            crlf = normalized(load(name))
            lf = normalized(load(name).replace(b"\r\n", b"\n"))
            self.assertEqual(lf, crlf, name)


class SenderTests(SynchronousTestCase):
    """The From header becomes the API's from."""

    def test_bare_address(self) -> None:
        """A bare From address is sent bare."""
        self.assertEqual(_simple()["from"], "sender@yourdomain.com")

    def test_display_name_kept(self) -> None:
        """The display name is kept, unquoted when it has no specials."""
        raw = _message("From: Jane Doe <jane@yourdomain.com>", "To: user@example.com")
        self.assertEqual(_payload(raw)["from"], "Jane Doe <jane@yourdomain.com>")

    def test_display_name_quoted_when_needed(self) -> None:
        """A display name with specials is quoted, with quotes and backslashes escaped."""
        raw = _message(
            r'From: "Doe, Jane \"JD\"" <jane@yourdomain.com>', "To: user@example.com"
        )
        self.assertEqual(
            _payload(raw)["from"], '"Doe, Jane \\"JD\\"" <jane@yourdomain.com>'
        )

    def test_encoded_display_name_not_reencoded(self) -> None:
        """An RFC 2047 name is decoded and sent as UTF-8, never re-encoded."""
        raw = _message(
            "From: =?utf-8?b?SsO8cmdlbg==?= <j@yourdomain.com>", "To: user@example.com"
        )
        self.assertEqual(_payload(raw)["from"], "Jürgen <j@yourdomain.com>")

    def test_encoded_comma_does_not_split(self) -> None:
        """An encoded comma in a display name stays in the name (quoted)."""
        raw = _message(
            "From: =?utf-8?q?Doe=2C_Jane?= <jane@yourdomain.com>",
            "To: user@example.com",
        )
        self.assertEqual(_payload(raw)["from"], '"Doe, Jane" <jane@yourdomain.com>')

    def test_raw_utf8_display_name(self) -> None:
        """An unencoded 8-bit UTF-8 display name (RFC 6532) is decoded."""
        raw = _message("From: Zoë <zoe@yourdomain.com>", "To: user@example.com")
        self.assertEqual(_payload(raw)["from"], "Zoë <zoe@yourdomain.com>")

    def test_latin1_8bit_display_name(self) -> None:
        """An 8-bit display name that is not UTF-8 is read as ISO-8859-1."""
        raw = b"From: Zo\xeb <zoe@yourdomain.com>\r\nTo: user@example.com\r\n\r\nHi\r\n"
        self.assertEqual(_payload(raw)["from"], "Zoë <zoe@yourdomain.com>")

    def test_missing_from_uses_envelope_sender(self) -> None:
        """Without a From header the envelope sender is used, bare."""
        raw = _message("To: user@example.com")
        self.assertEqual(
            _payload(raw, _envelope(mail_from="app@yourdomain.com"))["from"],
            "app@yourdomain.com",
        )

    def test_missing_from_and_null_sender(self) -> None:
        """No From header and the null envelope sender: 554 5.6.0."""
        raw = _message("To: user@example.com")
        error = self.assertRaises(
            TranslationError, translate, raw, _envelope(mail_from="")
        )
        self.assertEqual((error.code, error.enhanced), (554, "5.6.0"))
        self.assertIn("From", error.text)

    def test_missing_from_and_bad_envelope_sender(self) -> None:
        """No From header and an envelope sender that is no address: 554 5.6.0."""
        raw = _message("To: user@example.com")
        error = self.assertRaises(
            TranslationError, translate, raw, _envelope(mail_from="postmaster")
        )
        self.assertEqual((error.code, error.enhanced), (554, "5.6.0"))

    def test_several_from_addresses(self) -> None:
        """A From with two addresses is refused with 554 5.6.0."""
        raw = _message(
            "From: a@yourdomain.com, b@yourdomain.com", "To: user@example.com"
        )
        error = self.assertRaises(TranslationError, translate, raw, _envelope())
        self.assertEqual((error.code, error.enhanced), (554, "5.6.0"))
        self.assertIn("exactly one address", error.text)

    def test_two_from_headers(self) -> None:
        """Two From headers (two addresses) are refused too."""
        raw = _message(
            "From: a@yourdomain.com", "From: b@yourdomain.com", "To: user@example.com"
        )
        error = self.assertRaises(TranslationError, translate, raw, _envelope())
        self.assertEqual(error.code, 554)

    def test_empty_from_header(self) -> None:
        """A From header with no address at all is refused, not replaced by the envelope."""
        for value in ("", "undisclosed:;", "<>"):
            raw = _message(f"From: {value}", "To: user@example.com")
            error = self.assertRaises(TranslationError, translate, raw, _envelope())
            self.assertEqual((error.code, error.enhanced), (554, "5.6.0"), value)

    def test_invalid_from_address(self) -> None:
        """A From address without a domain is refused."""
        raw = _message("From: root", "To: user@example.com")
        error = self.assertRaises(TranslationError, translate, raw, _envelope())
        self.assertEqual((error.code, error.enhanced), (554, "5.6.0"))
        self.assertIn("not valid", error.text)

    def test_mailbox_match_is_case_insensitive(self) -> None:
        """A mailbox user may send as their own address, in any letter case."""
        payload = _simple(mailbox="Sender@YourDomain.com")
        self.assertEqual(payload["from"], "sender@yourdomain.com")

    def test_mailbox_mismatch(self) -> None:
        """A mailbox user sending as another address gets 550 5.7.1 naming the mailbox."""
        raw = _message("From: Boss <boss@yourdomain.com>", "To: user@example.com")
        error = self.assertRaises(
            TranslationError, translate, raw, _envelope(), mailbox="me@yourdomain.com"
        )
        self.assertEqual((error.code, error.enhanced), (550, "5.7.1"))
        self.assertIn(
            "From must be your mailbox address <me@yourdomain.com>", error.text
        )

    def test_mailbox_checks_envelope_fallback(self) -> None:
        """Without a From header the envelope sender is what the mailbox rule checks."""
        raw = _message("To: user@example.com")
        envelope = _envelope(mail_from="other@yourdomain.com")
        error = self.assertRaises(
            TranslationError, translate, raw, envelope, mailbox="me@yourdomain.com"
        )
        self.assertEqual(error.code, 550)
        envelope = _envelope(mail_from="ME@yourdomain.com")
        self.assertEqual(
            _payload(raw, envelope, mailbox="me@yourdomain.com")["from"],
            "ME@yourdomain.com",
        )


class RecipientTests(SynchronousTestCase):
    """The envelope decides who receives the message; headers decide the lists."""

    def _recipients(self, headers: tuple[str, ...], *rcpt: str) -> dict[str, Any]:
        """Translate with the given headers and envelope; return to/cc/bcc."""
        raw = _message("From: s@yourdomain.com", *headers)
        payload = _payload(raw, _envelope(*rcpt))
        return {key: payload[key] for key in ("to", "cc", "bcc") if key in payload}

    def test_to_and_cc_split(self) -> None:
        """Envelope recipients in To and Cc keep their list and display names."""
        self.assertEqual(
            self._recipients(
                ("To: A <a@example.com>", "Cc: B <b@example.com>"),
                "a@example.com",
                "b@example.com",
            ),
            {"to": ["A <a@example.com>"], "cc": ["B <b@example.com>"]},
        )

    def test_envelope_only_recipients_are_bcc(self) -> None:
        """An envelope recipient in neither To nor Cc is a bare bcc."""
        self.assertEqual(
            self._recipients(
                ("To: A <a@example.com>",), "a@example.com", "Secret@Example.com"
            ),
            {"to": ["A <a@example.com>"], "bcc": ["Secret@Example.com"]},
        )

    def test_header_recipients_not_in_envelope_dropped(self) -> None:
        """To/Cc addresses that are not envelope recipients are not sent to."""
        self.assertEqual(
            self._recipients(
                ("To: a@example.com, b@example.com", "Cc: c@example.com"),
                "b@example.com",
            ),
            {"to": ["b@example.com"]},
        )

    def test_split_transactions_do_not_duplicate(self) -> None:
        """One message split by an MTA over two transactions sends each recipient once."""
        headers = ("To: a@example.com, b@example.com", "Cc: c@example.com")
        first = self._recipients(headers, "a@example.com", "c@example.com")
        second = self._recipients(headers, "b@example.com")
        self.assertEqual(first, {"to": ["a@example.com"], "cc": ["c@example.com"]})
        self.assertEqual(second, {"to": ["b@example.com"]})

    def test_case_insensitive_match(self) -> None:
        """Header and envelope addresses match regardless of letter case."""
        self.assertEqual(
            self._recipients(("To: Ann <Ann@Example.COM>",), "ann@example.com"),
            {"to": ["Ann <Ann@Example.COM>"]},
        )

    def test_cc_moves_to_to(self) -> None:
        """When no To recipient is in the envelope, the Cc recipients become to."""
        self.assertEqual(
            self._recipients(
                ("To: gone@example.com", "Cc: c@example.com"),
                "c@example.com",
                "x@example.com",
            ),
            {"to": ["c@example.com"], "bcc": ["x@example.com"]},
        )

    def test_bcc_moves_to_to(self) -> None:
        """With neither To nor Cc recipients, the blind recipients become to."""
        self.assertEqual(
            self._recipients(
                ("To: undisclosed-recipients:;",), "x@example.com", "y@example.com"
            ),
            {"to": ["x@example.com", "y@example.com"]},
        )

    def test_no_to_header(self) -> None:
        """A message without To or Cc headers goes to its envelope recipients."""
        self.assertEqual(
            self._recipients((), "x@example.com"), {"to": ["x@example.com"]}
        )

    def test_group_syntax(self) -> None:
        """Addresses inside a named group are found."""
        self.assertEqual(
            self._recipients(
                ("To: Team: a@example.com, B <b@example.com>;",),
                "a@example.com",
                "b@example.com",
            ),
            {"to": ["a@example.com", "B <b@example.com>"]},
        )

    def test_duplicates_collapse(self) -> None:
        """An address in To twice, in Cc too and twice in the envelope is sent once, in to."""
        self.assertEqual(
            self._recipients(
                (
                    "To: a@example.com, A <a@example.com>",
                    "Cc: a@example.com, c@example.com",
                ),
                "a@example.com",
                "A@example.com",
                "c@example.com",
            ),
            {"to": ["a@example.com"], "cc": ["c@example.com"]},
        )

    def test_several_to_headers(self) -> None:
        """Several To headers are all read."""
        self.assertEqual(
            self._recipients(
                ("To: a@example.com", "To: b@example.com"),
                "a@example.com",
                "b@example.com",
            ),
            {"to": ["a@example.com", "b@example.com"]},
        )

    def test_folded_to_header(self) -> None:
        """A folded To header is unfolded before parsing."""
        self.assertEqual(
            self._recipients(
                ("To: A <a@example.com>,\r\n\tB\r\n <b@example.com>",),
                "a@example.com",
                "b@example.com",
            ),
            {"to": ["A <a@example.com>", "B <b@example.com>"]},
        )

    def test_angle_brackets_in_envelope(self) -> None:
        """Envelope recipients given with angle brackets still match."""
        self.assertEqual(
            self._recipients(("To: a@example.com",), "<a@example.com>"),
            {"to": ["a@example.com"]},
        )

    def test_bcc_header_never_sent(self) -> None:
        """A Bcc header decides nothing and never reaches the API."""
        raw = _message(
            "From: s@yourdomain.com",
            "To: a@example.com",
            "Bcc: b@example.com, c@example.com",
        )
        payload = _payload(raw, _envelope("a@example.com", "b@example.com"))
        self.assertEqual(payload["bcc"], ["b@example.com"])
        self.assertNotIn("headers", payload)

    def test_no_recipients(self) -> None:
        """An envelope without recipients is refused with 554 5.5.1."""
        raw = _message("From: s@yourdomain.com", "To: a@example.com")
        error = self.assertRaises(
            TranslationError, translate, raw, Envelope("s@yourdomain.com", ())
        )
        self.assertEqual((error.code, error.enhanced), (554, "5.5.1"))

    def test_reply_to(self) -> None:
        """Reply-To becomes one string; several addresses are comma-joined."""
        self.assertEqual(
            _simple("Reply-To: Help <help@yourdomain.com>")["reply_to"],
            "Help <help@yourdomain.com>",
        )
        self.assertEqual(
            _simple(
                "Reply-To: a@yourdomain.com, =?utf-8?q?B=C3=A9?= <b@yourdomain.com>"
            )["reply_to"],
            "a@yourdomain.com, Bé <b@yourdomain.com>",
        )

    def test_reply_to_invalid_dropped(self) -> None:
        """Reply-To entries that are not addresses are left out."""
        self.assertEqual(
            _simple("Reply-To: nobody, ok@yourdomain.com")["reply_to"],
            "ok@yourdomain.com",
        )
        self.assertNotIn("reply_to", _simple("Reply-To: undisclosed:;"))


class SubjectTests(SynchronousTestCase):
    """Subject decoding."""

    def _subject(self, value: str | bytes) -> Any:
        """Translate a message with this raw Subject value; return the subject."""
        if isinstance(value, str):
            value = value.encode("utf-8")
        raw = (
            b"From: s@yourdomain.com\r\nTo: user@example.com\r\nSubject: "
            + value
            + b"\r\n\r\nHi\r\n"
        )
        return _payload(raw).get("subject")

    def test_plain(self) -> None:
        """A plain subject is kept."""
        self.assertEqual(self._subject("Hello there"), "Hello there")

    def test_q_and_b(self) -> None:
        """Q and B encoded-words decode; whitespace between encoded-words disappears."""
        self.assertEqual(
            self._subject("=?utf-8?Q?Gr=C3=BC=C3=9Fe_aus?= =?UTF-8?B?S8O2bG4=?="),
            "Grüße ausKöln",
        )

    def test_mixed_plain_and_encoded(self) -> None:
        """Plain words around encoded-words keep their spaces."""
        self.assertEqual(
            self._subject("Re: =?iso-8859-1?q?Caf=E9?= meeting"), "Re: Café meeting"
        )

    def test_multibyte_split_over_words(self) -> None:
        """A UTF-8 character split across two encoded-words survives."""
        self.assertEqual(self._subject("=?utf-8?q?=E2=80?= =?utf-8?q?=93?="), "–")

    def test_different_charsets(self) -> None:
        """Adjacent encoded-words in different charsets decode separately."""
        self.assertEqual(self._subject("=?iso-8859-1?q?=E9?= =?koi8-r?b?8w==?="), "éС")

    def test_folded(self) -> None:
        """A folded subject is unfolded (the CRLF goes, the whitespace stays)."""
        self.assertEqual(
            self._subject("a long\r\n subject\r\n\tline"), "a long subject\tline"
        )

    def test_bad_base64_padding(self) -> None:
        """A B-word with missing padding still decodes."""
        self.assertEqual(self._subject("=?utf-8?b?SGVsbG8?="), "Hello")

    def test_unknown_charset(self) -> None:
        """An unknown charset falls back to UTF-8, then ISO-8859-1."""
        self.assertEqual(self._subject("=?x-nonsense?q?caf=C3=A9?="), "café")
        self.assertEqual(self._subject("=?x-nonsense?q?caf=E9?="), "café")

    def test_invalid_bytes_replaced(self) -> None:
        """Bytes invalid in the declared charset become replacement characters."""
        self.assertEqual(self._subject("=?utf-8?q?ok=FF?="), "ok\ufffd")

    def test_language_suffix(self) -> None:
        """RFC 2231 language suffixes on encoded-word charsets are ignored."""
        self.assertEqual(self._subject("=?utf-8*en?q?hi?="), "hi")

    def test_encoded_linebreaks_removed(self) -> None:
        """CR/LF/NUL hidden in encoded-words cannot inject anything."""
        self.assertEqual(
            self._subject("=?utf-8?q?a=0D=0ABcc:_x@example.com=00?="),
            "a Bcc: x@example.com",
        )

    def test_raw_utf8(self) -> None:
        """A raw 8-bit UTF-8 subject decodes."""
        self.assertEqual(self._subject("Ünïcödé ✓"), "Ünïcödé ✓")

    def test_raw_latin1(self) -> None:
        """A raw 8-bit subject that is not UTF-8 is read as ISO-8859-1."""
        self.assertEqual(self._subject(b"caf\xe9"), "café")

    def test_missing_subject(self) -> None:
        """Without a Subject header, and without a template, the subject is empty."""
        self.assertEqual(_simple()["subject"], "")

    def test_first_subject_wins(self) -> None:
        """With two Subject headers the first is used."""
        self.assertEqual(_simple("Subject: one", "Subject: two")["subject"], "one")

    def test_unsafe_charsets_not_used(self) -> None:
        """Slow or escape-decoding codecs named as charsets are not used for decoding."""
        self.assertEqual(self._subject("=?punycode?q?abc-?="), "abc-")
        self.assertEqual(self._subject("=?unicode_escape?q?=5Cu0041?="), "\\u0041")
        self.assertEqual(self._subject("=?base64?q?YQ=3D=3D?="), "YQ==")


class BodyTests(SynchronousTestCase):
    """text and html bodies."""

    def test_no_content_type(self) -> None:
        """A single-part message without Content-Type is text/plain."""
        payload = _simple(body="Line 1\r\nLine 2\r\n")
        self.assertEqual(payload["text"], "Line 1\nLine 2")
        self.assertNotIn("html", payload)

    def test_final_line_break_is_framing(self) -> None:
        """A single part loses only the line break that ends DATA; base64 loses none."""
        self.assertEqual(_simple(body="Hello\r\n\r\n")["text"], "Hello\n")
        self.assertEqual(_simple(body="Hello")["text"], "Hello")
        encoded = base64.b64encode(b"Hello\r\n").decode() + "\r\n"
        payload = _simple("Content-Transfer-Encoding: base64", body=encoded)
        self.assertEqual(payload["text"], "Hello\n")

    def test_html_only(self) -> None:
        """A single text/html part is the html body, with no text."""
        payload = _simple("Content-Type: text/html; charset=utf-8", body="<b>hi</b>")
        self.assertEqual(payload["html"], "<b>hi</b>")
        self.assertNotIn("text", payload)

    def test_quoted_printable(self) -> None:
        """Quoted-printable soft breaks and escapes are decoded."""
        payload = _simple(
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: quoted-printable",
            body="caf=C3=A9 is a very long line that =\r\ncontinues=3D\r\n",
        )
        self.assertEqual(payload["text"], "café is a very long line that continues=")

    def test_quoted_printable_encoded_cr(self) -> None:
        """The Ruby mail gem's quoted-printable (=0D before each hard line break) gives LF line breaks."""
        payload = _simple(
            "Content-Type: text/plain; charset=UTF-8",
            "Content-Transfer-Encoding: quoted-printable",
            body="Hallo Zo=C3=AB,=0D\r\n=0D\r\nJ=C3=B6rg=\r\n",
        )
        self.assertEqual(payload["text"], "Hallo Zoë,\n\nJörg")

    def test_base64(self) -> None:
        """Base64 bodies are decoded; their CRLFs become LF."""
        encoded = base64.encodebytes("Grüße\r\nzwei\r\n".encode()).decode()
        payload = _simple(
            "Content-Type: text/plain; charset=UTF-8",
            "Content-Transfer-Encoding: BASE64",
            body=encoded,
        )
        self.assertEqual(payload["text"], "Grüße\nzwei\n")

    def test_base64_garbage_is_lenient(self) -> None:
        """Junk characters and broken padding in base64 do not fail the message."""
        payload = _simple(
            "Content-Type: text/plain",
            "Content-Transfer-Encoding: base64",
            body="SGVs!!bG8g\r\nd29y*bGQh\r\nQ",
        )
        self.assertEqual(payload["text"], "Hello world!")

    def test_iso_8859_1(self) -> None:
        """An iso-8859-1 body is decoded (as its windows-1252 superset)."""
        payload = _simple(
            "Content-Type: text/plain; charset=ISO-8859-1", body=b"Caf\xe9 \x80\r\n"
        )
        self.assertEqual(payload["text"], "Café €")

    def test_unknown_charset_utf8_bytes(self) -> None:
        """An unknown charset with UTF-8 bytes decodes as UTF-8."""
        payload = _simple(
            "Content-Type: text/plain; charset=x-unknown", body="Grüße".encode()
        )
        self.assertEqual(payload["text"], "Grüße")

    def test_unknown_charset_other_bytes(self) -> None:
        """An unknown charset with non-UTF-8 bytes decodes as ISO-8859-1."""
        payload = _simple(
            "Content-Type: text/plain; charset=x-unknown", body=b"Gr\xfc\xdfe"
        )
        self.assertEqual(payload["text"], "Grüße")

    def test_ascii_label_utf8_content(self) -> None:
        """A body labelled us-ascii that holds UTF-8 is decoded as UTF-8."""
        payload = _simple(
            "Content-Type: text/plain; charset=us-ascii", body="naïve".encode()
        )
        self.assertEqual(payload["text"], "naïve")

    def test_invalid_utf8_replaced(self) -> None:
        """A UTF-8 body with invalid bytes keeps its valid text around replacement characters."""
        payload = _simple(
            "Content-Type: text/plain; charset=utf-8", body=b"ok \xff\xfe ok \xc3\xa9"
        )
        self.assertEqual(payload["text"], "ok \ufffd\ufffd ok é")

    def test_rfc2231_charset_parameter(self) -> None:
        """A charset given in RFC 2231 form is understood."""
        payload = _simple(
            "Content-Type: text/plain; charset*=''koi8-r",
            body=b"\xf0\xd2\xc9\xd7\xc5\xd4",
        )
        self.assertEqual(payload["text"], "Привет")

    def test_alternative_inside_mixed(self) -> None:
        """The first text/plain and text/html anywhere in the tree are the bodies."""
        body = (
            "--m\r\nContent-Type: multipart/alternative; boundary=a\r\n\r\n"
            "--a\r\nContent-Type: text/plain\r\n\r\nplain\r\n"
            "--a\r\nContent-Type: multipart/related; boundary=r\r\n\r\n"
            "--r\r\nContent-Type: text/html\r\n\r\n<p>html</p>\r\n--r--\r\n"
            "--a--\r\n"
            "--m\r\nContent-Type: text/plain; name=notes.txt\r\n\r\nnotes\r\n"
            "--m--\r\n"
        )
        payload = _simple("Content-Type: multipart/mixed; boundary=m", body=body)
        self.assertEqual((payload["text"], payload["html"]), ("plain", "<p>html</p>"))
        [notes] = payload["attachments"]
        self.assertEqual(
            (notes["filename"], _attachment_bytes(notes)), ("notes.txt", b"notes")
        )

    def test_attachment_disposition_text_is_not_body(self) -> None:
        """A text/plain part with Content-Disposition: attachment is an attachment."""
        body = (
            "--m\r\nContent-Type: text/plain\r\nContent-Disposition: attachment\r\n\r\nlog\r\n"
            "--m\r\nContent-Type: text/plain\r\n\r\nreal body\r\n--m--\r\n"
        )
        payload = _simple("Content-Type: multipart/mixed; boundary=m", body=body)
        self.assertEqual(payload["text"], "real body")
        self.assertEqual(payload["attachments"][0]["filename"], "attachment-1.txt")
        self.assertEqual(payload["attachments"][0]["content_type"], "text/plain")

    def test_further_text_parts_are_attachments(self) -> None:
        """A second inline text/plain part becomes an attachment, not lost."""
        body = (
            "--m\r\nContent-Type: text/plain\r\n\r\nfirst\r\n"
            "--m\r\nContent-Type: image/gif\r\nContent-Transfer-Encoding: base64\r\n\r\nR0lGODlh\r\n"
            "--m\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nsecond\r\n--m--\r\n"
        )
        payload = _simple("Content-Type: multipart/mixed; boundary=m", body=body)
        self.assertEqual(payload["text"], "first")
        self.assertEqual(
            [(a["filename"], a["content_type"]) for a in payload["attachments"]],
            [
                ("attachment-1.gif", "image/gif"),
                ("attachment-2.txt", "text/plain; charset=utf-8"),
            ],
        )

    def test_other_alternatives_dropped(self) -> None:
        """AMP and watch-html alternatives are dropped; they are renderings of the body."""
        body = (
            "--a\r\nContent-Type: text/plain\r\n\r\nplain\r\n"
            "--a\r\nContent-Type: text/x-amp-html\r\n\r\n<html amp4email></html>\r\n"
            "--a\r\nContent-Type: text/watch-html\r\n\r\n<b>w</b>\r\n"
            "--a\r\nContent-Type: text/html\r\n\r\n<p>html</p>\r\n--a--\r\n"
        )
        payload = _simple("Content-Type: multipart/alternative; boundary=a", body=body)
        self.assertEqual((payload["text"], payload["html"]), ("plain", "<p>html</p>"))
        self.assertNotIn("attachments", payload)

    def test_format_flowed(self) -> None:
        """format=flowed soft breaks are joined, quotes and signatures respected."""
        body = (
            "One long \r\nparagraph.\r\n\r\n> quoted \r\n> text\r\n \r\n-- \r\nSig\r\n"
        )
        payload = _simple(
            "Content-Type: text/plain; charset=utf-8; format=flowed", body=body
        )
        self.assertEqual(
            payload["text"], "One long paragraph.\n\n> quoted text\n\n-- \nSig"
        )

    def test_format_flowed_delsp(self) -> None:
        """With DelSp=yes the soft-break space is removed, and stuffed lines unstuffed."""
        body = "Zusammen \r\ngesetzt\r\n From here\r\n"
        payload = _simple(
            "Content-Type: text/plain; format=flowed; delsp=yes", body=body
        )
        self.assertEqual(payload["text"], "Zusammengesetzt\nFrom here")

    def test_missing_closing_boundary(self) -> None:
        """A multipart without its closing boundary still yields its parts."""
        body = "--b\r\nContent-Type: text/plain\r\n\r\nplain\r\n--b\r\nContent-Type: text/html\r\n\r\n<i>x</i>\r\n"
        payload = _simple("Content-Type: multipart/alternative; boundary=b", body=body)
        self.assertEqual(payload["text"], "plain")
        self.assertTrue(payload["html"].startswith("<i>x</i>"))

    def test_multipart_without_boundary(self) -> None:
        """A multipart whose boundary never appears is read as plain text."""
        payload = _simple(
            "Content-Type: multipart/mixed; boundary=nowhere", body="just text\r\n"
        )
        self.assertEqual(payload["text"], "just text")

    def test_empty_multipart(self) -> None:
        """A multipart with no parts gives an empty text body."""
        payload = _simple("Content-Type: multipart/mixed; boundary=b", body="--b--\r\n")
        self.assertEqual(payload["text"], "")

    def test_nul_bytes(self) -> None:
        """NUL bytes in a body survive as text, not as a failure."""
        payload = _simple(body=b"a\x00b\r\n")
        self.assertEqual(payload["text"], "a\x00b")


class AttachmentTests(SynchronousTestCase):
    """Leaf parts that are not the text or html body."""

    def _attachments(self, *parts: str) -> list[dict[str, str]]:
        """Translate a mixed message of a text body plus these parts."""
        body = "--m\r\nContent-Type: text/plain\r\n\r\nbody\r\n"
        body += "".join("--m\r\n" + part + "\r\n" for part in parts) + "--m--\r\n"
        payload = _simple("Content-Type: multipart/mixed; boundary=m", body=body)
        self.assertEqual(payload["text"], "body")
        attachments: list[dict[str, str]] = payload["attachments"]
        return attachments

    def test_content_is_base64_without_newlines(self) -> None:
        """Content is the base64 of the decoded bytes, on one line."""
        data = bytes(range(256)) * 4
        encoded = base64.encodebytes(data).decode()
        [attachment] = self._attachments(
            "Content-Type: application/octet-stream; name=blob.bin\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + encoded
        )
        self.assertNotIn("\n", attachment["content"])
        self.assertEqual(_attachment_bytes(attachment), data)
        self.assertEqual(attachment["content_type"], "application/octet-stream")

    def test_rfc2231_continuations(self) -> None:
        """RFC 2231 encoded, continued filenames are joined and decoded."""
        [attachment] = self._attachments(
            "Content-Type: application/pdf\r\n"
            "Content-Disposition: attachment;\r\n filename*0*=iso-8859-1''r%E9sum;\r\n filename*1=\"e final.pdf\"\r\n"
            "\r\nx"
        )
        self.assertEqual(attachment["filename"], "résume final.pdf")

    def test_rfc2047_filename(self) -> None:
        """An RFC 2047 encoded filename (as Outlook and Gmail send) is decoded."""
        [attachment] = self._attachments(
            'Content-Type: application/pdf; name="=?utf-8?B?w5xiZXJzaWNodC5wZGY=?="\r\n'
            'Content-Disposition: attachment; filename="=?utf-8?B?w5xiZXJzaWNodC5wZGY=?="\r\n\r\nx'
        )
        self.assertEqual(attachment["filename"], "Übersicht.pdf")

    def test_raw_utf8_filename(self) -> None:
        """A raw 8-bit UTF-8 filename is decoded as UTF-8."""
        [attachment] = self._attachments(
            'Content-Type: text/csv\r\nContent-Disposition: attachment; filename="tëst.csv"\r\n\r\na;b'
        )
        self.assertEqual(attachment["filename"], "tëst.csv")

    def test_name_parameter_fallback(self) -> None:
        """Without a disposition filename, the Content-Type name is used."""
        [attachment] = self._attachments(
            "Content-Type: image/jpeg; name=photo.jpg\r\n\r\nx"
        )
        self.assertEqual(attachment["filename"], "photo.jpg")

    def test_path_components_removed(self) -> None:
        """Directory parts of a filename are dropped."""
        [first, second] = self._attachments(
            'Content-Type: text/plain; name="C:\\\\Users\\\\me\\\\a.txt"\r\n\r\nx',
            'Content-Type: text/plain; name="../../etc/passwd"\r\n\r\nx',
        )
        self.assertEqual((first["filename"], second["filename"]), ("a.txt", "passwd"))

    def test_generated_names(self) -> None:
        """Parts without a filename get attachment-N plus an extension for their type."""
        attachments = self._attachments(
            "Content-Type: image/png\r\nContent-ID: <img1@x>\r\nContent-Disposition: inline\r\n\r\nx",
            'Content-Type: text/calendar; method="cancel"\r\n\r\nBEGIN:VCALENDAR',
            "Content-Type: application/x-unheard-of\r\n\r\nx",
            "Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner body",
            'Content-Type: application/pdf\r\nContent-Disposition: attachment; filename=""\r\n\r\nx',
        )
        self.assertEqual(
            [(a["filename"], a["content_type"]) for a in attachments],
            [
                ("attachment-1.png", "image/png"),
                ("attachment-2.ics", "text/calendar; method=CANCEL"),
                ("attachment-3.bin", "application/x-unheard-of"),
                ("attachment-4.eml", "message/rfc822"),
                ("attachment-5.pdf", "application/pdf"),
            ],
        )
        self.assertEqual(
            _attachment_bytes(attachments[3]), b"Subject: inner\r\n\r\ninner body"
        )

    def test_content_type_parameters_dropped(self) -> None:
        """Only type/subtype is kept (plus charset for text); case is normalised."""
        [image, text] = self._attachments(
            "Content-Type: IMAGE/PNG; name=a.png; x-unix-mode=0644\r\n\r\nx",
            'Content-Type: text/csv; charset="windows-1252"; header=present\r\nContent-Disposition: attachment\r\n\r\nx',
        )
        self.assertEqual(image["content_type"], "image/png")
        self.assertEqual(text["content_type"], "text/csv; charset=windows-1252")

    def test_invalid_content_type(self) -> None:
        """A content type with forbidden characters becomes application/octet-stream."""
        [attachment] = self._attachments("Content-Type: image/p{n}g; name=a\r\n\r\nx")
        self.assertEqual(attachment["content_type"], "application/octet-stream")

    def test_nested_message_rebuilt(self) -> None:
        """A multipart message/rfc822 attachment is rebuilt byte for byte."""
        inner = (
            'From: a@example.org\r\nContent-Type: multipart/alternative;\r\n boundary="in"\r\n\r\n'
            "preamble\r\n--in\r\nContent-Type: text/plain\r\n\r\nx\r\n"
            "--in\r\nContent-Type: text/html\r\n\r\n<b>x</b>\r\n--in--\r\nepilogue"
        )
        [attachment] = self._attachments(
            "Content-Type: message/rfc822\r\nContent-Disposition: attachment; filename=fwd.eml\r\n\r\n"
            + inner
        )
        self.assertEqual(_attachment_bytes(attachment), inner.encode())

    def test_nested_message_bodies_not_used(self) -> None:
        """Text inside an attached message is not taken as the outer body."""
        payload = _simple(
            "Content-Type: multipart/mixed; boundary=m",
            body="--m\r\nContent-Type: message/rfc822\r\n\r\nSubject: x\r\n\r\ninner\r\n--m--\r\n",
        )
        self.assertEqual(payload["text"], "")
        self.assertEqual(len(payload["attachments"]), 1)

    def test_attachment_only_message(self) -> None:
        """A single-part attachment message gets an empty text body and its attachment."""
        raw = _message(
            "From: s@yourdomain.com",
            "To: user@example.com",
            "Content-Type: application/pdf",
            "Content-Disposition: attachment; filename=report.pdf",
            "Content-Transfer-Encoding: base64",
            body="JVBERi0=\r\n",
        )
        payload = _payload(raw)
        self.assertEqual(payload["text"], "")
        self.assertEqual(_attachment_bytes(payload["attachments"][0]), b"%PDF-")

    def test_quoted_printable_attachment(self) -> None:
        """A quoted-printable attachment is decoded before base64 encoding."""
        [attachment] = self._attachments(
            "Content-Type: text/plain; name=a.txt\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\na=3Db=\r\nc"
        )
        self.assertEqual(_attachment_bytes(attachment), b"a=bc")


class CustomHeaderTests(SynchronousTestCase):
    """The X-PostStack-* headers."""

    def test_tags_merged(self) -> None:
        """Tags from several headers are split, trimmed, de-duplicated, in order."""
        payload = _simple(
            "X-PostStack-Tags: b, a,, ",
            "x-poststack-tags: c,a , d",
            "X-POSTSTACK-TAGS: ,",
        )
        self.assertEqual(payload["tags"], ["b", "a", "c", "d"])

    def test_tags_encoded_and_folded(self) -> None:
        """Encoded and folded tag headers are decoded and unfolded first."""
        payload = _simple("X-PostStack-Tags: =?utf-8?q?caf=C3=A9,_news?=,\r\n letter")
        self.assertEqual(payload["tags"], ["café", "news", "letter"])

    def test_no_tags(self) -> None:
        """An empty tags header gives no tags field."""
        self.assertNotIn("tags", _simple("X-PostStack-Tags:  , "))

    def test_template_id_trimmed(self) -> None:
        """The template id is trimmed."""
        self.assertEqual(
            _simple("X-PostStack-Template-Id:   tpl_abc  ")["template_id"], "tpl_abc"
        )

    def test_template_id_conflict(self) -> None:
        """Two different template ids are refused; a repeated identical one is fine."""
        self.assertEqual(
            _simple("X-PostStack-Template-Id: t1", "X-PostStack-Template-Id: t1")[
                "template_id"
            ],
            "t1",
        )
        raw = _message(
            "From: s@yourdomain.com",
            "X-PostStack-Template-Id: t1",
            "X-PostStack-Template-Id: t2",
        )
        error = self.assertRaises(TranslationError, translate, raw, _envelope())
        self.assertEqual((error.code, error.enhanced), (554, "5.6.0"))
        self.assertIn("X-PostStack-Template-Id", error.text)

    def test_variables(self) -> None:
        """Variables are parsed JSON, also when folded by the client."""
        payload = _simple(
            'X-PostStack-Variables: {"first_name": "Alice",\r\n "n": [1, 2.5, true, null]}'
        )
        self.assertEqual(
            payload["variables"], {"first_name": "Alice", "n": [1, 2.5, True, None]}
        )

    def test_variables_encoded(self) -> None:
        """RFC 2047 encoded variables (nodemailer for non-ASCII values) are decoded."""
        encoded = base64.b64encode('{"name":"Zoë"}'.encode()).decode()
        self.assertEqual(
            _simple(f"X-PostStack-Variables: =?UTF-8?B?{encoded}?=")["variables"],
            {"name": "Zoë"},
        )

    def test_variables_invalid(self) -> None:
        """Invalid JSON, non-objects and NaN are refused with 554 5.6.0 and a reason."""
        for value, reason in [
            ("{first_name: Alice}", "Expecting property name"),
            ('["a"]', "got a JSON array"),
            ('"text"', "got a JSON string"),
            ("42", "got a JSON number"),
            ('{"x": NaN}', "NaN"),
            ('{"x": "\\ud800"}', "invalid Unicode"),
            ("[" * 100000, "nested too deeply"),
        ]:
            raw = _message(
                "From: s@yourdomain.com",
                "To: user@example.com",
                f"X-PostStack-Variables: {value}",
            )
            error = self.assertRaises(TranslationError, translate, raw, _envelope())
            self.assertEqual((error.code, error.enhanced), (554, "5.6.0"))
            self.assertTrue(
                error.text.startswith("X-PostStack-Variables must be a JSON object: "),
                error.text,
            )
            self.assertIn(reason, error.text)
            self.assertLess(len(error.text), 200)

    def test_variables_depth_limit(self) -> None:
        """Variables nested up to MAX_VARIABLES_DEPTH pass; one level more is refused."""
        fits = "[" * (MAX_VARIABLES_DEPTH - 1) + "]" * (MAX_VARIABLES_DEPTH - 1)
        payload = _simple(f'X-PostStack-Variables: {{"x": {fits}}}')
        self.assertIn("x", payload["variables"])
        too_deep = "[" * MAX_VARIABLES_DEPTH + "]" * MAX_VARIABLES_DEPTH
        raw = _message(
            "From: s@yourdomain.com", f'X-PostStack-Variables: {{"x": {too_deep}}}'
        )
        error = self.assertRaises(TranslationError, translate, raw, _envelope())
        self.assertIn(f"nested more than {MAX_VARIABLES_DEPTH} levels", error.text)

    def test_idempotency_key(self) -> None:
        """The idempotency key goes into the payload and onto the request."""
        request = translate(
            _message(
                "From: s@yourdomain.com",
                "To: user@example.com",
                "X-PostStack-Idempotency-Key:  order-1 ",
            ),
            _envelope(),
        )
        self.assertEqual(request.idempotency_key, "order-1")
        self.assertEqual(request.payload["idempotency_key"], "order-1")

    def test_no_idempotency_key(self) -> None:
        """Without the header there is no key anywhere."""
        request = translate(
            _message("From: s@yourdomain.com", "To: user@example.com"), _envelope()
        )
        self.assertIsNone(request.idempotency_key)
        self.assertNotIn("idempotency_key", request.payload)

    def test_poststack_headers_not_passed_on(self) -> None:
        """No X-PostStack-* header, known or not, ends up in headers."""
        payload = _simple(
            "X-PostStack-Tags: a",
            "X-PostStack-Template-Id: t",
            "X-PostStack-Variables: {}",
            "X-PostStack-Idempotency-Key: k",
            "X-PostStack-Something-New: s",
            "X-Other: kept",
        )
        self.assertEqual(payload["headers"], {"X-Other": "kept"})
        self.assertEqual(payload["variables"], {})


class PassedHeaderTests(SynchronousTestCase):
    """Which other headers reach payload["headers"], and how."""

    def test_allow_list(self) -> None:
        """X-*, List-*, threading and a few recipient-facing headers are kept; the rest not."""
        payload = _simple(
            "Subject: s",
            "Date: Mon, 1 Jan 2024 00:00:00 +0000",
            "Message-ID: <m@x>",
            "MIME-Version: 1.0",
            "Received: from a by b",
            "Return-Path: <r@x>",
            "DKIM-Signature: v=1; a=rsa-sha256",
            "Sender: other@yourdomain.com",
            "User-Agent: Mutt",
            "X-Mailer: Mailer 1.0",
            "In-Reply-To: <parent@x>",
            "References: <root@x> <parent@x>",
            "List-Unsubscribe: <mailto:unsub@yourdomain.com?subject=unsubscribe>, <https://yourdomain.com/u?id=1>",
            "List-Unsubscribe-Post: List-Unsubscribe=One-Click",
            "List-Id: News <news.yourdomain.com>",
            "Auto-Submitted: auto-generated",
            "Precedence: bulk",
            "Importance: high",
            "Organization: ACME",
        )
        self.assertEqual(
            payload["headers"],
            {
                "X-Mailer": "Mailer 1.0",
                "In-Reply-To": "<parent@x>",
                "References": "<root@x> <parent@x>",
                "List-Unsubscribe": "<mailto:unsub@yourdomain.com?subject=unsubscribe>, <https://yourdomain.com/u?id=1>",
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
                "List-Id": "News <news.yourdomain.com>",
                "Auto-Submitted": "auto-generated",
                "Precedence": "bulk",
                "Importance": "high",
                "Organization": "ACME",
            },
        )

    def test_x_header_decoded_and_unfolded(self) -> None:
        """X-* values are unfolded and RFC 2047 decoded."""
        payload = _simple("X-Campaign: =?utf-8?q?Fr=C3=BChling?=\r\n 2024")
        self.assertEqual(payload["headers"], {"X-Campaign": "Frühling 2024"})

    def test_structured_not_decoded(self) -> None:
        """Encoded-word lookalikes in structured headers are passed through as written."""
        payload = _simple("List-Id: =?utf-8?q?x?= <l.example.com>")
        self.assertEqual(
            payload["headers"], {"List-Id": "=?utf-8?q?x?= <l.example.com>"}
        )

    def test_duplicates_joined(self) -> None:
        """Repeated headers are joined: ", " in general, a space for References."""
        payload = _simple(
            "X-Tag: a", "x-tag: b", "References: <a@x>", "References: <b@x>"
        )
        self.assertEqual(
            payload["headers"], {"X-Tag": "a, b", "References": "<a@x> <b@x>"}
        )

    def test_empty_values_dropped(self) -> None:
        """Headers with empty values are left out."""
        self.assertNotIn("headers", _simple("X-MS-Has-Attach:", "X-Empty:   "))

    def test_no_header_injection(self) -> None:
        """Encoded CR, LF and NUL never reach a header value."""
        payload = _simple(
            "X-Note: =?utf-8?b?"
            + base64.b64encode(b"a\r\nBcc: x@example.com\x00").decode()
            + "?="
        )
        self.assertEqual(payload["headers"], {"X-Note": "a Bcc: x@example.com"})


class TemplateTests(SynchronousTestCase):
    """Empty subject and bodies with and without a template."""

    def test_template_with_empty_subject_and_text(self) -> None:
        """With a template, an empty Subject header and an empty text part are left out."""
        raw = _message(
            "From: s@yourdomain.com",
            "To: user@example.com",
            "Subject: ",
            "X-PostStack-Template-Id: tpl_1",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 7bit",
            body="",
        )
        payload = _payload(raw)
        self.assertEqual(
            payload,
            {
                "from": "s@yourdomain.com",
                "to": ["user@example.com"],
                "template_id": "tpl_1",
            },
        )

    def test_template_with_blank_html(self) -> None:
        """With a template, a body part holding only line breaks counts as empty."""
        payload = _simple(
            "X-PostStack-Template-Id: tpl_1",
            "Content-Type: text/html",
            body="\r\n\r\n",
        )
        self.assertNotIn("html", payload)
        self.assertNotIn("text", payload)

    def test_template_keeps_non_empty_fields(self) -> None:
        """With a template, a real subject and body are still sent."""
        payload = _simple("Subject: Hi", "X-PostStack-Template-Id: tpl_1", body="text")
        self.assertEqual((payload["subject"], payload["text"]), ("Hi", "text"))

    def test_no_template_empty_message(self) -> None:
        """Without a template, an empty message gets subject "" and text ""."""
        payload = _simple(body="")
        self.assertEqual((payload["subject"], payload["text"]), ("", ""))
        self.assertNotIn("html", payload)

    def test_no_template_html_only_has_no_text(self) -> None:
        """Without a template, an html-only message gets no empty text."""
        payload = _simple("Content-Type: text/html", body="")
        self.assertEqual(payload["html"], "")
        self.assertNotIn("text", payload)


_HEADER_NAMES = [
    b"From",
    b"To",
    b"Cc",
    b"Reply-To",
    b"Subject",
    b"Content-Type",
    b"Content-Disposition",
    b"Content-Transfer-Encoding",
    b"X-PostStack-Tags",
    b"X-PostStack-Variables",
    b"X-PostStack-Template-Id",
    b"X-PostStack-Idempotency-Key",
    b"X-Custom",
    b"References",
]

_TOKENS = [
    b"=?",
    b"?=",
    b"=?utf-8?b?",
    b"=?iso-8859-1?q?",
    b"=?undefined?q?",
    b"multipart/mixed",
    b"multipart/alternative",
    b"message/rfc822",
    b"text/plain",
    b"text/html",
    b"text/calendar",
    b"; boundary=b",
    b"; boundary*=undefined''b",
    b"; charset=",
    b"; charset*=",
    b"; filename*0*=utf-8''",
    b"; name=",
    b"base64",
    b"quoted-printable",
    b"attachment",
    b"\r\n--b\r\n",
    b"\r\n--b--\r\n",
    b"\r\n\r\n",
    b"\r\n ",
    b"\x00",
    b"\xff",
    b"\xc3\xa9",
    b'"',
    b"\\",
    b"<a@b.c>",
    b"user@example.com",
    b"you@yourdomain.com",
    b",",
    b";",
    b":",
    b"{",
    b"}",
    b"%",
    b"'",
]


def _mutate(data: bytes, rnd: random.Random, count: int) -> bytes:
    """Apply random byte-level and token-level mutations to a message."""
    buffer = bytearray(data)
    for _ in range(count):
        position = rnd.randint(0, len(buffer))
        operation = rnd.randint(0, 4)
        if operation == 0:
            del buffer[position : position + rnd.randint(1, 20)]
        elif operation == 1:
            buffer[position:position] = rnd.choice(_TOKENS)
        elif operation == 2 and position < len(buffer):
            buffer[position] = rnd.randint(0, 255)
        elif operation == 3:
            buffer[position:position] = bytes(
                rnd.randint(0, 255) for _ in range(rnd.randint(1, 5))
            )
        else:
            start = rnd.randint(0, len(buffer))
            buffer[position:position] = buffer[start : start + rnd.randint(1, 40)]
    return bytes(buffer)


class HostileInputTests(SynchronousTestCase):
    """Malformed input gives a clean payload or a TranslationError, nothing else."""

    def test_empty_input(self) -> None:
        """Empty bytes become a message from the envelope sender with an empty text."""
        self.assertEqual(
            _payload(b""),
            {
                "from": "bounce@yourdomain.com",
                "to": ["user@example.com"],
                "subject": "",
                "text": "",
            },
        )

    def test_invalid_utf8_header(self) -> None:
        """Invalid UTF-8 in headers is read as ISO-8859-1."""
        raw = b"From: s@yourdomain.com\r\nTo: user@example.com\r\nX-Bad: \xff\xfe\xc3\r\n\r\nx"
        self.assertEqual(_payload(raw)["headers"], {"X-Bad": "ÿþÃ"})

    def test_nul_in_headers(self) -> None:
        """NUL bytes in header values are removed."""
        raw = b"From: s@yourdomain.com\r\nTo: user@example.com\r\nSubject: a\x00b\r\nX-N: c\x00d\r\n\r\nx"
        payload = _payload(raw)
        self.assertEqual(
            (payload["subject"], payload["headers"]), ("ab", {"X-N": "cd"})
        )

    def test_deep_nesting_refused(self) -> None:
        """More than MAX_MIME_DEPTH nested multiparts is refused with 554 5.6.0."""
        for depth, refused in [
            (MAX_MIME_DEPTH, False),
            (MAX_MIME_DEPTH + 1, True),
            (5000, True),
        ]:
            body = "".join(
                f"--b{i}\r\nContent-Type: multipart/mixed; boundary=b{i + 1}\r\n\r\n"
                for i in range(depth - 1)
            )
            body += f"--b{depth - 1}\r\nContent-Type: text/plain\r\n\r\ndeep\r\n"
            raw = _message(
                "From: s@yourdomain.com",
                "Content-Type: multipart/mixed; boundary=b0",
                body=body,
            )
            if refused:
                error = self.assertRaises(TranslationError, translate, raw, _envelope())
                self.assertEqual((error.code, error.enhanced), (554, "5.6.0"))
                self.assertIn("nested", error.text)
            else:
                self.assertEqual(_payload(raw)["text"], "deep")

    def test_deep_nested_messages_refused(self) -> None:
        """Deeply nested message/rfc822 attachments count towards the depth limit."""
        inner = "Subject: core\r\n\r\ncore"
        for _ in range(MAX_MIME_DEPTH + 2):
            inner = "Content-Type: message/rfc822\r\n\r\n" + inner
        raw = ("From: s@yourdomain.com\r\n" + inner).encode()
        error = self.assertRaises(TranslationError, translate, raw, _envelope())
        self.assertEqual((error.code, error.enhanced), (554, "5.6.0"))

    def test_too_many_parts_refused(self) -> None:
        """More than MAX_MIME_PARTS parts is refused with 554 5.6.0."""
        part = "--b\r\nContent-Type: application/octet-stream\r\n\r\nx\r\n"
        for count, refused in [(MAX_MIME_PARTS - 1, False), (MAX_MIME_PARTS, True)]:
            raw = _message(
                "From: s@yourdomain.com",
                "Content-Type: multipart/mixed; boundary=b",
                body=part * count + "--b--\r\n",
            )
            if refused:
                error = self.assertRaises(TranslationError, translate, raw, _envelope())
                self.assertEqual((error.code, error.enhanced), (554, "5.6.0"))
                self.assertIn("MIME parts", error.text)
            else:
                self.assertEqual(len(_payload(raw)["attachments"]), count)

    def test_parser_exception_becomes_554(self) -> None:
        """A boundary parameter that makes the stdlib parser raise gives 554 5.6.0."""
        raw = _message(
            "From: s@yourdomain.com",
            "Content-Type: multipart/mixed; boundary*=undefined''abc",
            body="--abc\r\n\r\nx\r\n--abc--\r\n",
        )
        error = self.assertRaises(TranslationError, translate, raw, _envelope())
        self.assertEqual((error.code, error.enhanced), (554, "5.6.0"))

    def test_hostile_charset_parameters(self) -> None:
        """Charset parameters naming odd codecs never break 8-bit bodies."""
        for charset in (
            "undefined",
            "rot13",
            "base64",
            "punycode",
            "utf-16",
            "idna",
            "*",
            "x" * 100,
        ):
            for header in (f"charset*={charset}''", f'charset="{charset}"'):
                payload = _simple(
                    f"Content-Type: text/plain; {header}", body=b"caf\xc3\xa9"
                )
                self.assertEqual(payload["text"], "café", header)

    def test_surrogate_producing_charset(self) -> None:
        """Text that decodes to lone surrogates is made UTF-8 safe."""
        # Python's UTF-7 decoder turns "+2AA-" into a lone U+D800.
        payload = _simple(
            "Content-Type: text/plain; charset=utf-7",
            "Subject: =?utf-7?q?+2AA-?=",
            body=b"a+2AA-b",
        )
        self.assertEqual((payload["text"], payload["subject"]), ("a\ufffdb", "\ufffd"))
        json.dumps(payload, ensure_ascii=False).encode("utf-8")

    def test_long_unclosed_encoded_words(self) -> None:
        """Many unclosed encoded-word starts do not take quadratic time."""
        subject = "=?utf-8?q?" * 20000
        started = time.process_time()
        payload = _simple(f"Subject: {subject}")
        # Linear work takes milliseconds; a quadratic scan takes minutes.
        self.assertLess(time.process_time() - started, 2.0)
        self.assertEqual(payload["subject"], subject)

    def test_surrogates_in_envelope(self) -> None:
        """Envelope addresses carrying surrogate escapes are made UTF-8 safe."""
        raw = _message("From: s@yourdomain.com")
        payload = _payload(raw, Envelope("x@yourdomain.com", ("a\udcff@example.com",)))
        json.dumps(payload, ensure_ascii=False).encode("utf-8")

    @settings(
        max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(
        raw=st.binary(max_size=2000),
        mailbox=st.sampled_from([None, "s@yourdomain.com"]),
    )
    def test_arbitrary_bytes(self, raw: bytes, mailbox: str | None) -> None:
        """Any bytes give a valid request or a TranslationError, nothing else."""
        self._check(raw, mailbox)

    @settings(
        max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(
        name=st.sampled_from(_SAMPLE_NAMES),
        seed=st.integers(min_value=0, max_value=2**32 - 1),
        mutations=st.integers(min_value=1, max_value=10),
        mailbox=st.sampled_from([None, "you@yourdomain.com"]),
    )
    def test_mutated_samples(
        self, name: str, seed: int, mutations: int, mailbox: str | None
    ) -> None:
        """Mutated real messages give a valid request or a TranslationError, nothing else."""
        self._check(_mutate(load(name), random.Random(seed), mutations), mailbox)

    @settings(
        max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(
        headers=st.lists(
            st.tuples(
                st.sampled_from(_HEADER_NAMES),
                st.lists(
                    st.one_of(st.sampled_from(_TOKENS), st.binary(max_size=8)),
                    max_size=12,
                ).map(b"".join),
            ),
            max_size=12,
        ),
        body=st.lists(
            st.one_of(st.sampled_from(_TOKENS), st.binary(max_size=8)), max_size=30
        ).map(b"".join),
    )
    def test_generated_headers(
        self, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        """Messages built from MIME-ish tokens give a valid request or a TranslationError."""
        raw = (
            b"".join(name + b": " + value + b"\r\n" for name, value in headers)
            + b"\r\n"
            + body
        )
        self._check(raw, None)

    def _check(self, raw: bytes, mailbox: str | None) -> None:
        """Assert the raw bytes give a valid request or a well-formed error."""
        envelope = Envelope(
            "you@yourdomain.com", ("user@example.com", "other@example.com")
        )
        try:
            request = translate(raw, envelope, mailbox=mailbox)
        except TranslationError as error:
            self.assertIn(error.code, (550, 554))
            self.assertRegex(error.enhanced, r"^5\.\d\.\d$")
            self.assertRegex(error.text, r"^[\x20-\x7e]+$")
        else:
            _assert_valid(self, request)


class AddressFastPathTests(SynchronousTestCase):
    """The quick parser for simple address lists agrees with the stdlib parser."""

    @settings(max_examples=1500, deadline=None)
    @given(
        value=st.text(
            alphabet=st.sampled_from(list('ab.+-_=?@<>, \t"()\\:;[]!%\xa0é\x00')),
            max_size=40,
        )
    )
    def test_agrees_with_getaddresses(self, value: str) -> None:
        """Whenever the fast path answers, it answers what getaddresses answers."""
        fast = _simple_addresses(value)
        if fast is not None:
            slow = [pair for pair in getaddresses([value]) if pair != ("", "")]
            self.assertEqual(fast, slow)

    def test_common_shapes_take_the_fast_path(self) -> None:
        """Plain, named and encoded-name lists are handled by the fast path."""
        self.assertEqual(
            _simple_addresses(
                "a@x.org, Ann  Lee <ann@x.org>,=?utf-8?q?J=C3=B6rg?= <j@x.org>, "
            ),
            [
                ("", "a@x.org"),
                ("Ann Lee", "ann@x.org"),
                ("=?utf-8?q?J=C3=B6rg?=", "j@x.org"),
            ],
        )
        self.assertIsNone(_simple_addresses('"Doe, J" <j@x.org>'))
        self.assertIsNone(_simple_addresses("=?utf-8?b?SsO2cmcgPGpAeC5vcmc+?="))


class TypesTests(SynchronousTestCase):
    """The small public value types."""

    def test_envelope_freezes_recipients(self) -> None:
        """Envelope turns a recipient list into a tuple and is hashable."""
        envelope = Envelope("a@b.c", ["x@y.z"])
        self.assertEqual(envelope.rcpt_to, ("x@y.z",))
        self.assertEqual(hash(envelope), hash(Envelope("a@b.c", ("x@y.z",))))

    def test_translation_error_fields(self) -> None:
        """TranslationError keeps its reply parts and renders them as one line."""
        error = TranslationError(554, "5.6.0", "Bad thing; fix it")
        self.assertEqual(
            (error.code, error.enhanced, error.text),
            (554, "5.6.0", "Bad thing; fix it"),
        )
        self.assertEqual(str(error), "554 5.6.0 Bad thing; fix it")

    def test_translation_error_text_sanitized(self) -> None:
        """Non-ASCII and control characters cannot reach the SMTP reply text."""
        error = TranslationError(550, "5.7.1", "From must be <zoë@x>\r\n250 ok")
        self.assertEqual(error.text, "From must be <zo?@x>?250 ok")


class Base64PassThroughTests(SynchronousTestCase):
    """Already-base64 attachments are passed on without decoding and encoding again."""

    def test_strict_check(self) -> None:
        """Only canonical base64 passes the check."""
        from poststack_relay.translate.attachments import _is_strict_base64

        for good in (b"", b"QUJD", b"QUI=", b"QQ==", b"QUJDRA=="):
            self.assertTrue(_is_strict_base64(good), good)
        for bad in (b"QUJ", b"QU=D", b"QQ==QUJD", b"QUJ!", b"Q===", b"QUJD\n"):
            self.assertFalse(_is_strict_base64(bad), bad)

    def test_folded_base64_unfolded(self) -> None:
        """A folded base64 attachment arrives as the same base64 on one line, decoding to the same bytes."""
        import base64 as b64
        import os as _os

        data = _os.urandom(3000)
        folded = b64.encodebytes(data).replace(b"\n", b"\r\n")
        raw = (
            b"From: you@yourdomain.com\r\nTo: user@example.com\r\nSubject: a\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
            b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
            b"--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=x.bin\r\n\r\n" + folded + b"--b--\r\n"
        )
        request = translate(raw, Envelope("you@yourdomain.com", ("user@example.com",)))
        [attachment] = request.payload["attachments"]
        self.assertEqual(b64.b64decode(attachment["content"], validate=True), data)

    def test_sloppy_base64_repaired(self) -> None:
        """Base64 with junk or missing padding is decoded leniently and re-encoded canonically."""
        import base64 as b64

        raw = (
            b"From: you@yourdomain.com\r\nTo: user@example.com\r\nSubject: a\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
            b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
            b"--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=x.bin\r\n\r\nQUJD!RA\r\n--b--\r\n"
        )
        request = translate(raw, Envelope("you@yourdomain.com", ("user@example.com",)))
        [attachment] = request.payload["attachments"]
        self.assertEqual(b64.b64decode(attachment["content"], validate=True), b"ABCD")


class PurityTests(SynchronousTestCase):
    """Translation and the rule modules stay pure (no Twisted)."""

    def test_pure(self) -> None:
        """Translation and the rule modules import nothing from Twisted, nor any module that does."""
        import ast

        root = Path(__file__).resolve().parent.parent / "poststack_relay"
        pure = {"addresses", "idempotency", "policy", "replies", "translate"}
        files = [root / f"{name}.py" for name in sorted(pure - {"translate"})]
        files += sorted((root / "translate").glob("*.py"))
        for path in files:
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module or ""]
                elif isinstance(node, ast.ImportFrom):
                    # .x inside translate/ is a sibling; ..x (or .x at the top) a package module.
                    inside = path.parent.name == "translate"
                    if inside and node.level == 1:
                        continue
                    top = (node.module or "").split(".")[0]
                    targets = [top] if top else [alias.name for alias in node.names]
                    for target in targets:
                        self.assertIn(target, pure, f"{path.name} imports {target}")
                    continue
                else:
                    continue
                for name in names:
                    self.assertFalse(name.split(".")[0] in ("twisted", "zope", "treq"), f"{path.name}: {name}")
