"""
The MIME corpus of C{tests/mime/}: its files, read as they arrive in DATA,
and the C{POST /emails} body each must translate to (L{EXPECTATIONS}: the
envelope recipients in C{rcpt}, the corpus features it stands for in
C{covers}, and every field of the payload; an attachment is C{(filename,
content_type, sha256 of the decoded content)}). Used by
C{tests/test_mime_corpus.py} and the nodemailer cross-check
C{tests/e2e/test_mime_crosscheck.py}.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

from poststack_relay.translate import Envelope

__all__ = ["EXPECTATIONS", "MIME_DIR", "PNG_1X1", "TINY_PDF", "corpus_names", "envelope", "load", "sha256"]

MIME_DIR = Path(__file__).resolve().parent.parent / "mime"


def corpus_names() -> list[str]:
    """The file names of the corpus, sorted."""
    return sorted(path.name for path in MIME_DIR.glob("*.eml"))


def load(name: str) -> bytes:
    """
    Read a corpus message with CRLF line endings, as it arrives in DATA.

    Older files are stored with LF line endings, newer ones with CRLF; both
    come out the same way.
    """
    data = (MIME_DIR / name).read_bytes()
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def sha256(data: bytes) -> str:
    """The hex SHA-256 of C{data}."""
    return hashlib.sha256(data).hexdigest()


def envelope(name: str) -> Envelope:
    """The envelope a corpus message is translated with."""
    return Envelope("bounce@yourdomain.com", EXPECTATIONS[name]["rcpt"])


# The 1x1 PNG and the 45-byte PDF that several clients' samples attach.
PNG_1X1 = sha256(
    base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6"
        "kgAAAABJRU5ErkJggg=="
    )
)
TINY_PDF = sha256(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n")

EXPECTATIONS: dict[str, dict[str, Any]] = {
    "apple_mail_inline_image.eml": {
        "covers": ["base64", "inline image"],
        "rcpt": ["friend@example.com"],
        "from": "Sam Example <sam@yourdomain.com>",
        "to": ["friend@example.com"],
        "subject": "Photo",
        "text": "Here it is:\n\n\n",
        "html": "<html><body>Here it is:<img src=\"cid:A1B2C3D4-E5F6-4789-ABCD-EF0123456789\"></body></html>",
        "headers": {"X-Mailer": "Apple Mail (2.3774.400.31)"},
        "attachments": [
            ("IMG_0042.png", "image/png", PNG_1X1),
        ],
    },
    "apple_mail_smime_signed.eml": {
        "covers": ["multipart/signed", "quoted-printable", "charset utf-8"],
        "rcpt": ["legal@example.com"],
        "from": "Sam Example <sam@yourdomain.com>",
        "to": ["Legal <legal@example.com>"],
        "subject": "Signed contract",
        "text": "The signed contract is ready – please countersign by Friday.\n\nSam\n",
        "html": "<html><head><meta http-equiv=\"content-type\" content=\"text/html; charset=utf-8\"></head><body style=\"overflow-wrap: break-word;\">The signed contract is ready – please countersign by Friday.<div><br></div><div>Sam</div></body></html>",
        "headers": {"X-Mailer": "Apple Mail (2.3774.500.171.1.1)"},
    },
    "apple_mail_split_html.eml": {
        "covers": ["base64"],
        "rcpt": ["client@example.com"],
        "from": "Sam Example <sam@yourdomain.com>",
        "to": ["client@example.com"],
        "subject": "Site visit",
        "text": "Before:\n\nAfter: all fixed.\n",
        "html": "<html><head></head><body>Before:<br><br></body></html>",
        "headers": {"X-Mailer": "Apple Mail (2.3774.500.171.1.1)"},
        "attachments": [
            ("IMG_1234.jpeg", "image/jpeg", "553b9176eb8ad4b8a09f0cfc8f1fe9f793b38e35fdc937b720b0eec8ed60219e"),
            ("attachment-2.html", "text/html; charset=us-ascii", sha256(b"<html><head></head><body><br>After: all fixed.</body></html>")),
        ],
    },
    "cron_no_date_no_message_id.eml": {
        "covers": ["no Date", "no Message-ID", "duplicate headers", "text only"],
        "rcpt": ["admin@example.com"],
        "from": "Cron Daemon <root@yourdomain.com>",
        "to": ["admin@example.com"],
        "subject": "Cron <root@web1> /usr/local/bin/backup.sh",
        "text": "backup: 14 files, 2.1 GB, done in 00:03:12",
        "headers": {
            "X-Cron-Env": "<SHELL=/bin/sh>, <HOME=/root>, <PATH=/usr/bin:/bin>, <LOGNAME=root>",
        },
    },
    "django_utf8_8bit.eml": {
        "covers": ["8bit", "charset utf-8", "RFC 2047 subject", "RFC 2047 display name"],
        "rcpt": ["zoe@example.com"],
        "from": "Acme Security <security@yourdomain.com>",
        "to": ["Zoë Adams <zoe@example.com>"],
        "subject": "Security notice — password changed",
        "text": "Hi Zoë,\n\nyour password was changed at 14:02 — if this wasn’t you, reply now.\n",
        "html": "<p>Hi Zoë,</p><p>your password was changed at 14:02 — if this wasn’t you, reply now.</p>\n",
        "tags": ["security"],
    },
    "dotnet_html_only_base64.eml": {
        "covers": ["html only", "base64", "RFC 2047 subject", "no Message-ID"],
        "rcpt": ["kunde@example.de"],
        "from": "Shop <shop@yourdomain.com>",
        "to": ["kunde@example.de"],
        "subject": "Versandbestätigung – Bestellung 30417",
        "html": "<html><body><p>Ihre Bestellung Nr. 30417 wurde versandt.</p><p>Voraussichtliche Zustellung: Dienstag.</p></body></html>",
    },
    "exchange_forward_rfc822_base64.eml": {
        "covers": ["message/rfc822", "base64", "RFC 2047 subject"],
        "rcpt": ["purchasing@example.com"],
        "from": "Pat Lee <pat@yourdomain.com>",
        "to": ["purchasing@example.com"],
        "subject": "FW: Auftragsbestätigung 5521",
        "text": "Confirmation attached, for your records.\n",
        "headers": {"Thread-Topic": "Auftragsbestätigung 5521", "X-MS-Has-Attach": "yes"},
        "attachments": [
            # The forwarded message as the original bytes, base64 undone.
            ("attachment-1.eml", "message/rfc822", "aab8456a2cb2c885507dfa6d7683d3a1d36f8c5815e85e7f50e17b76b00b1988"),
        ],
    },
    "folded_duplicate_headers.eml": {
        "covers": ["folded headers", "duplicate headers", "text only"],
        "rcpt": [
            "team-a@example.com",
            "lead-a@example.com",
            "team-b@example.com",
            "late-addition@example.com",
        ],
        "from": "Build Bot <ci@yourdomain.com>",
        "to": [
            "team-a@example.com",
            "\"Lead, Team A\" <lead-a@example.com>",
            "team-b@example.com",
            "late-addition@example.com",
        ],
        "subject": "Nightly build #4711 failed on branch release/2024.03 after\t 3 retries",
        "text": "Step \"integration\" failed. Logs: https://ci.yourdomain.com/build/4711",
        "headers": {
            "References": "<build-4709@ci.yourdomain.com> <build-4710@ci.yourdomain.com> <build-4710b@ci.yourdomain.com>",
            "Keywords": "ci, nightly, failure",
            "X-Build-Id": "4711, 4711-retry-3",
            "X-Long-Header": "first part of a value that was folded by the sender\tand continues here with a tab",
        },
    },
    "foxmail_gb2312_base64.eml": {
        "covers": ["charset gb2312", "base64", "RFC 2047 subject", "RFC 2047 display name"],
        "rcpt": ["wang@example.cn"],
        "from": "李娜 <lina@yourdomain.com>",
        "to": ["王经理 <wang@example.cn>"],
        "subject": "报价单",
        "text": "王经理：\n\n您好！附件是镕基项目的报价单，请查收。\n\n祝好\n李娜\n",
        "html": "<div>王经理：</div><div><br></div><div>您好！附件是镕基项目的报价单，请查收。</div><div><br></div><div>祝好</div><div>李娜</div>",
        "headers": {
            "X-Priority": "3",
            "X-Has-Attach": "yes",
            "X-Mailer": "Foxmail 7.2.25.228[cn]",
        },
        "attachments": [
            ("报价单.xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", "c7d246def8351c52400740ba81cea7140ba70620ef66f6221083b6366041027c"),
        ],
    },
    "git_send_email_patch.eml": {
        "covers": ["8bit", "charset utf-8", "text only", "folded headers"],
        "rcpt": ["dev@lists.example.org", "kai@yourdomain.com"],
        "from": "Ana Souza <ana@yourdomain.com>",
        "to": ["dev@lists.example.org"],
        "cc": ["Kai Berg <kai@yourdomain.com>"],
        "subject": "[PATCH v2 1/1] docs: fix the café example",
        "text": "The example printed \"cafe\" instead of \"café\".\n\nSigned-off-by: Ana Souza <ana@yourdomain.com>\n---\n docs/example.txt | 2 +-\n 1 file changed, 1 insertion(+), 1 deletion(-)\n\ndiff --git a/docs/example.txt b/docs/example.txt\nindex 3b18e51..a9c3f2d 100644\n--- a/docs/example.txt\n+++ b/docs/example.txt\n@@ -1,3 +1,3 @@\n Order:\n-cafe\n+café\n \n-- \n2.43.0\n",
        "headers": {
            "X-Mailer": "git-send-email 2.43.0",
            "In-Reply-To": "<20240410153456.12345-1-ana@yourdomain.com>",
            "References": "<20240409101010.99999-1-ana@yourdomain.com> <20240410153456.12345-1-ana@yourdomain.com>",
        },
    },
    "gmail_alternative_base64_utf8.eml": {
        "covers": [
            "base64",
            "charset utf-8",
            "RFC 2047 subject",
            "RFC 2047 display name",
            "folded headers",
        ],
        "rcpt": ["tanaka@example.jp"],
        "from": "佐藤 <sato@yourdomain.com>",
        "to": ["田中 <tanaka@example.jp>"],
        "subject": "来週の会議の資料 📎",
        "text": "こんにちは、田中さん。\n\n来週の会議の資料を共有します 📎\n\nよろしくお願いします。\n佐藤\n",
        "html": "<div dir=\"ltr\"><div>こんにちは、田中さん。</div><div><br></div><div>来週の会議の資料を共有します 📎</div><div><br></div><div>よろしくお願いします。</div><div>佐藤</div></div>\n",
    },
    "gmail_amp_alternative.eml": {
        "covers": ["charset utf-8"],
        "rcpt": ["buyer@example.com"],
        "from": "Shop <shop@yourdomain.com>",
        "to": ["buyer@example.com"],
        "subject": "Rate your order",
        "text": "How was your order? https://yourdomain.com/rate/77\n",
        "html": "<p>How was your order? <a href=\"https://yourdomain.com/rate/77\">Rate it</a></p>\n",
    },
    "gmail_forward_as_attachment.eml": {
        "covers": ["message/rfc822", "8bit", "RFC 2047 display name"],
        "rcpt": ["board@example.com"],
        "from": "Jörg Müller <joerg.mueller@yourdomain.com>",
        "to": ["board@example.com"],
        "subject": "Fwd: Quarterly numbers",
        "text": "FYI, original attached.\n",
        "html": "<div dir=\"ltr\">FYI, original attached.</div>\n",
        "attachments": [
            ("Quarterly numbers.eml", "message/rfc822", "58935c86289777f78279e0bf172ad68f15f856f01c629d9f6d0d76a0090e1183"),
        ],
    },
    "headers_only_no_body.eml": {
        "covers": ["empty body", "text only"],
        "rcpt": ["monitor@example.com"],
        "from": "heartbeat@yourdomain.com",
        "to": ["monitor@example.com"],
        "subject": "heartbeat web1",
        "text": "",
    },
    "idn_unicode_addresses.eml": {
        "covers": ["Unicode address", "IDN address", "8bit", "charset utf-8", "text only"],
        "rcpt": [
            "δοκιμή@παράδειγμα.ελ",
            "用户@例子.广告",
            "info@xn--bcher-kva.example",
            "eleni@bücher.example",
        ],
        "from": "Jörg Müller <jörg@yourdomain.com>",
        # The API receives IDN domains as A-labels (docs/mime-mapping.md).
        "to": ["Δοκιμή <δοκιμή@xn--hxajbheg2az3al.xn--qxam>", "用户 <用户@xn--fsqu00a.xn--4rr70v>"],
        "cc": ["Bücher <info@xn--bcher-kva.example>", "Ελένη <eleni@xn--bcher-kva.example>"],
        "subject": "Grüße aus München — 你好",
        "text": "Grüße, 你好, γεια σας.",
    },
    "iso2022jp_7bit.eml": {
        "covers": [
            "charset iso-2022-jp",
            "RFC 2047 subject",
            "RFC 2047 display name",
            "text only",
        ],
        "rcpt": ["yamada@example.co.jp"],
        "from": "佐々木 <sasaki@yourdomain.com>",
        "to": ["yamada@example.co.jp"],
        "subject": "お見積りの件",
        "text": "山田様\n\nお世話になっております。\n見積書を添付いたします。\n\n株式会社サンプル 佐々木",
        "headers": {"X-Mailer": "Becky! ver. 2.81.04"},
    },
    "koi8r_base64.eml": {
        "covers": [
            "charset koi8-r",
            "base64",
            "RFC 2047 subject",
            "RFC 2047 display name",
            "text only",
        ],
        "rcpt": ["client@example.ru"],
        "from": "Бухгалтерия <buh@yourdomain.com>",
        "to": ["client@example.ru"],
        "subject": "Счет на оплату",
        "text": "Здравствуйте!\n\nСчет во вложении.\n",
    },
    "lowercase_header_names.eml": {
        "covers": ["lower-case header names", "8bit", "text only"],
        "rcpt": ["oncall@example.com", "backup-oncall@example.com"],
        "from": "Alerts <alerts@yourdomain.com>",
        "to": ["oncall@example.com"],
        "cc": ["backup-oncall@example.com"],
        "subject": "[FIRING] api latency p99 > 2s",
        "text": "api-gateway p99 latency is 2.4 s (threshold 2 s) since 03:12 UTC — runbook: “API latency”.",
        "headers": {"x-alert-fingerprint": "9f2c1a"},
        "tags": ["alerts", "sev2"],
        "idempotency_key": "alert-8812",
    },
    "mailx_empty_body.eml": {
        "covers": ["empty body", "text only"],
        "rcpt": ["user@example.com"],
        "from": "deploy@yourdomain.com",
        "to": ["user@example.com"],
        "subject": "ping",
        "text": "",
    },
    "mailman_mime_digest.eml": {
        "covers": ["multipart/digest", "message/rfc822", "folded headers"],
        "rcpt": ["announce@lists.yourdomain.com"],
        "from": "announce-request@lists.yourdomain.com",
        "to": ["announce@lists.yourdomain.com"],
        "reply_to": "announce@lists.yourdomain.com",
        "subject": "Announce Digest, Vol 12, Issue 3",
        "text": "Today's Topics:\n\n   1. Release 2.4 (Ana Souza)\n   2. Maintenance window (Kai Berg)\n",
        "headers": {
            "X-BeenThere": "announce@lists.yourdomain.com",
            "X-Mailman-Version": "2.1.39",
            "Precedence": "list",
            "List-Id": "Announcements <announce.lists.yourdomain.com>",
            "List-Unsubscribe": "<https://lists.yourdomain.com/listinfo/announce>, <mailto:announce-request@lists.yourdomain.com?subject=unsubscribe>",
        },
        "attachments": [
            # A digest part without Content-Type is message/rfc822 (RFC 2046 5.1.5).
            (
                "attachment-1.eml",
                "message/rfc822",
                sha256(
                    b"From: Ana Souza <ana@yourdomain.com>\r\nTo: announce@lists.yourdomain.com\r\n"
                    b"Subject: Release 2.4\r\nDate: Mon, 15 Apr 2024 09:00:00 +0000\r\n"
                    b"Message-ID: <rel-2.4@yourdomain.com>\r\n\r\nVersion 2.4 is out.\r\n"
                ),
            ),
            ("attachment-2.eml", "message/rfc822", "46b1718d334849186995c6d132b686eff88026acce2022e56f9f2518ba223ad7"),
            # The list footer: a second text/plain body part.
            ("attachment-3.txt", "text/plain; charset=us-ascii", "0ad5277ccf13d9ae844dd843689e3751e6d0c142d29437729c0e0dba0d1efd09"),
        ],
    },
    "mutt_forward_inline_rfc822.eml": {
        "covers": ["message/rfc822"],
        "rcpt": ["security@example.net"],
        "from": "Kai Berg <kai@yourdomain.com>",
        "to": ["security@example.net"],
        "subject": "Fwd: suspicious login",
        "text": "See below; I did not log in from there.\n",
        "attachments": [
            ("attachment-1.eml", "message/rfc822", "2cb022a2e4b669cab3dbb4f110f4ab88b5245c8f154ce177fe1cba5411e0d549"),
        ],
    },
    "mutt_inline_text_attachment.eml": {
        "covers": ["inline text attachment"],
        "rcpt": ["ops@example.net"],
        "from": "Kai Berg <kai@yourdomain.com>",
        "to": ["ops@example.net"],
        "subject": "notes for tomorrow",
        "text": "My notes are attached.\n",
        "attachments": [
            ("notes.txt", "text/plain; charset=us-ascii", sha256(b"TODO\r\n- renew cert\r\n- rotate keys\r\n")),
        ],
    },
    "mutt_text_only.eml": {
        "covers": ["text only", "charset us-ascii"],
        "rcpt": ["ops@example.net"],
        "from": "Kai Berg <kai@yourdomain.com>",
        "to": ["ops@example.net"],
        "subject": "Re: disk usage on db2",
        "text": "On Thu, Mar 21, 2024 at 09:55:01PM +0100, ops@example.net wrote:\n> /var is at 91%.\n\nRotated the logs, it is at 62% now.\n\n-- \nKai",
        "headers": {
            "References": "<20240321205501.GA1234@example.net>",
            "In-Reply-To": "<20240321205501.GA1234@example.net>",
        },
    },
    "nodemailer_alternative_utf8.eml": {
        "covers": [
            "quoted-printable",
            "charset utf-8",
            "RFC 2047 subject",
            "RFC 2047 display name",
        ],
        "rcpt": ["joerg@example.de", "buchhaltung@yourdomain.com"],
        "from": "Shop Müller <shop@yourdomain.com>",
        "to": ["Jörg Schröder <joerg@example.de>"],
        "cc": ["\"Buchhaltung, Shop\" <buchhaltung@yourdomain.com>"],
        "reply_to": "Kundenservice <service@yourdomain.com>",
        "subject": "Ihre Bestellung ist unterwegs – Nr. 4711",
        "text": "Hallo Jörg,\n\nIhre Bestellung Nr. 4711 ist unterwegs – voraussichtliche Lieferung am Freitag.\n\nViele Grüße\nDas Team",
        "html": "<p>Hallo Jörg,</p><p>Ihre Bestellung <b>Nr. 4711</b> ist unterwegs – voraussichtliche Lieferung am Freitag.</p><p>Viele Grüße<br>Das Team</p>",
        "headers": {"X-Campaign": "spring-2024"},
        "tags": ["bestellung", "größe"],
    },
    "nodemailer_calendar.eml": {
        "covers": ["calendar"],
        "rcpt": ["attendee@example.com"],
        "from": "Planner <planner@yourdomain.com>",
        "to": ["attendee@example.com"],
        "subject": "Invitation: Planning",
        "text": "You are invited.",
        "html": "<p>You are invited.</p>",
        "attachments": [
            ("attachment-1.ics", "text/calendar; charset=utf-8; method=REQUEST", "a2e6c85e234d1922b20a9c08b43def4b96083bd667b6440db4a948a0dba05252"),
            ("invite.ics", "application/ics", "a2e6c85e234d1922b20a9c08b43def4b96083bd667b6440db4a948a0dba05252"),
        ],
    },
    "nodemailer_docs_example.eml": {
        "covers": ["html only"],
        "rcpt": ["user@example.com"],
        "from": "you@yourdomain.com",
        "to": ["user@example.com"],
        "subject": "Hello from PostStack SMTP",
        "html": "<p>Sent via SMTP relay!</p>",
        "tags": ["welcome", "onboarding"],
    },
    "nodemailer_docs_template.eml": {
        "covers": ["template"],
        "rcpt": ["user@example.com"],
        "from": "you@yourdomain.com",
        "to": ["user@example.com"],
        "template_id": "tpl_abc123def456ghi789",
        "variables": {"first_name": "Alice", "company_name": "Acme Inc"},
    },
    "nodemailer_mixed_attachments.eml": {
        "covers": ["RFC 2231 continuation", "inline image", "base64"],
        "rcpt": ["customer@example.com"],
        "from": "Billing <billing@yourdomain.com>",
        "to": ["customer@example.com"],
        "subject": "Your invoice",
        "text": "Invoice attached.",
        "html": "<p>Invoice attached.</p><img src=\"cid:logo@yourdomain.com\">",
        "attachments": [
            ("logo.png", "image/png", PNG_1X1),
            ("Rechnung März 2024 – Kundennummer 123456789.pdf", "application/pdf", TINY_PDF),
        ],
    },
    "outlook_express_latin1_smart_quotes.eml": {
        "covers": ["charset iso-8859-1", "8bit", "text only"],
        "rcpt": ["anne@example.com"],
        "from": "Mike <mike@yourdomain.com>",
        "to": ["anne@example.com"],
        "subject": "early bird",
        "text": "Hi Anne,\n\nthe “early bird” price is 149 € – until Friday.\n\nMike",
        "headers": {
            "X-Mailer": "Microsoft Outlook Express 6.00.2900.5931",
            "X-MimeOLE": "Produced By Microsoft MimeOLE V6.00.2900.6157",
            "X-Priority": "3",
        },
    },
    "outlook_meeting_request.eml": {
        "covers": ["charset iso-8859-1", "quoted-printable", "calendar"],
        "rcpt": ["team@example.com", "anna.schmidt@example.com"],
        "from": "\"Müller, Jörg\" <joerg.mueller@yourdomain.com>",
        "to": ["Team <team@example.com>"],
        "cc": ["\"Schmidt, Anna\" <anna.schmidt@example.com>"],
        "subject": "Quartalsplanung",
        "text": "Hallo zusammen,\n\nbitte nehmt an der Quartalsplanung teil.\n\nGrüße\nJörg\n",
        "html": "<html><head><meta http-equiv=\"Content-Type\" content=\"text/html; charset=iso-8859-1\"></head><body><p>Hallo zusammen,</p><p>bitte nehmt an der Quartalsplanung teil.</p><p>Grüße<br>Jörg</p></body></html>\n",
        "headers": {
            "Thread-Topic": "Quartalsplanung",
            "Thread-Index": "AdpxQ2Vb3c7XyZ1kS0mFz0sE2xT8aw==",
            "x-ms-exchange-calendar-series-instance-id": "BAAAAIIA4AB0xbcQGoLgCAAAAAA=",
        },
        "attachments": [
            ("attachment-1.ics", "text/calendar; charset=utf-8; method=REQUEST", "ede4dd3cc3e65d1a49dfc5bb35aa8e0d0555e8418186006c34c04218e3b142f7"),
        ],
    },
    "outlook_mixed_related_alternative.eml": {
        "covers": [
            "mixed > related > alternative",
            "charset iso-8859-1",
            "quoted-printable",
            "RFC 2047 subject",
            "RFC 2047 display name",
            "inline image",
            "lower-case header names",
        ],
        "rcpt": ["petra.schroeder@example.de", "einkauf@example.de"],
        "from": "Jörg Müller <joerg.mueller@yourdomain.com>",
        "to": ["Petra Schröder <petra.schroeder@example.de>"],
        "cc": ["Einkauf <einkauf@example.de>"],
        "subject": "Angebot Q2 für Sie",
        "text": "Hallo Frau Schröder,\n\nanbei unser Angebot für das 2. Quartal.\n\n[Logo]\n\nMit freundlichen Grüßen\nJörg Müller\n",
        "html": "<html xmlns:o=\"urn:schemas-microsoft-com:office:office\">\n<head>\n<meta http-equiv=\"Content-Type\" content=\"text/html; charset=iso-8859-1\">\n</head>\n<body lang=\"DE\">\n<div class=\"WordSection1\">\n<p class=\"MsoNormal\">Hallo Frau Schröder,<o:p></o:p></p>\n<p class=\"MsoNormal\">anbei unser Angebot für das 2. Quartal.<o:p></o:p></p>\n<p class=\"MsoNormal\"><img width=\"120\" height=\"40\" id=\"Grafik_x0020_1\" src=\"cid:image001.png@01DA76F0.5C3A2B10\" alt=\"Logo\"><o:p></o:p></p>\n</div>\n</body>\n</html>\n",
        "headers": {
            "Thread-Topic": "Angebot Q2 für Sie",
            "Thread-Index": "AdpqWr4NF8bZ1YhVR0+5u0XqAAbZcg==",
            "X-MS-Has-Attach": "yes",
            "x-ms-publictraffictype": "Email",
            "x-ms-exchange-organization-scl": "-1",
            "x-ms-office365-filtering-correlation-id": "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f",
        },
        "attachments": [
            ("image001.png", "image/png", PNG_1X1),
            ("Angebot Q2 für Schröder.docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document", "5562b1346e42c5bf0829f7c78541929504086477260b815df4a4172a5b8b589d"),
        ],
    },
    "outlook_tnef_winmail.eml": {
        "covers": ["base64"],
        "rcpt": ["vendor@example.com"],
        "from": "Pat Lee <pat@yourdomain.com>",
        "to": ["vendor@example.com"],
        "subject": "Purchase order 5521",
        "text": "Please find PO 5521 attached.\n",
        "headers": {
            "X-MS-Has-Attach": "yes",
            "X-MS-TNEF-Correlator": "<SN6PR11MB2832C0FFEE@SN6PR11MB2832.namprd11.prod.outlook.com>",
        },
        "attachments": [
            ("winmail.dat", "application/ms-tnef", "b0432c349c46b05f79205953180b16c8f5d91389c24c3e3e0ce7f10caa607343"),
        ],
    },
    "phpmailer_iso8859_1.eml": {
        "covers": ["charset iso-8859-1", "8bit", "RFC 2047 subject"],
        "rcpt": ["kundin@example.org"],
        "from": "Shop <shop@yourdomain.com>",
        "to": ["Kundin <kundin@example.org>"],
        "reply_to": "Support <support@yourdomain.com>",
        "subject": "Ihre Bestellbestätigung",
        "text": "Sehr geehrte Kundin,\n\nvielen Dank für Ihre Bestellung über 49,90 EUR.\n",
        "html": "<p>Sehr geehrte Kundin,</p><p>vielen Dank für Ihre Bestellung.</p>\n\n",
        "headers": {"X-Mailer": "PHPMailer 6.9.1 (https://github.com/PHPMailer/PHPMailer)"},
        "tags": ["order"],
    },
    "rails_actionmailer_mixed.eml": {
        "covers": ["base64", "charset utf-8"],
        "rcpt": ["growth@example.com"],
        "from": "Reports <reports@yourdomain.com>",
        "to": ["growth@example.com"],
        "reply_to": "no-reply@yourdomain.com",
        "subject": "Weekly signups",
        "text": "2 new signups this week. CSV attached.\n",
        "html": "<!DOCTYPE html>\n<html>\n  <body>\n    <p>2 new signups this week. CSV attached.</p>\n  </body>\n</html>\n",
        "tags": ["reports"],
        "attachments": [
            ("signups.csv", "text/csv; charset=UTF-8", sha256(
                b"id,email,plan\n1,ann@example.com,pro\n2,bob@example.com,free\n"
            )),
        ],
    },
    "rfc2047_display_names.eml": {
        "covers": [
            "RFC 2047 subject",
            "RFC 2047 display name",
            "folded headers",
            "charset utf-8",
            "quoted-printable",
        ],
        "rcpt": [
            "andre@example.fr",
            "francoise@example.fr",
            "lukasz@example.pl",
            "smiley@example.com",
            "li@example.cn",
            "plain.address@example.com",
        ],
        "from": "\"Müller, Jörg\" <joerg@yourdomain.com>",
        "to": [
            "André Legrand <andre@example.fr>",
            "Françoise Dupré <francoise@example.fr>",
            "Łukasz Nowak <lukasz@example.pl>",
            "😂 Smiley <smiley@example.com>",
        ],
        "cc": ["李小龙 <li@example.cn>", "plain.address@example.com"],
        "reply_to": "Support – Team <support@yourdomain.com>",
        "subject": "Réunion du lundi — ordre du jour (révisé)",
        "text": "Bonjour à tous,\nl'ordre du jour révisé suit.",
    },
    "rfc2231_continued_filenames.eml": {
        "covers": ["RFC 2231 continuation", "quoted-printable", "base64"],
        "rcpt": ["mandant@example.de"],
        "from": "Steuerberatung <kanzlei@yourdomain.com>",
        "to": ["mandant@example.de"],
        "subject": "Unterlagen",
        "text": "Anbei zwei Dateien.\n",
        "attachments": [
            ("Übersicht der Änderungen im Jahresabschluss 2023 – finale Fassung nach Prüfung.pdf", "application/pdf", "a65c8a6fa80a5949b448f9a55896a08516e883fe561f4617d987fc84312ce482"),
            ("Notiz für den Mandanten.txt", "text/plain; charset=iso-8859-1", sha256(b"Zeile 1\r\nZeile 2\r\n")),
        ],
    },
    "scanner_attachment_only.eml": {
        "covers": ["attachment only"],
        "rcpt": ["archive@example.com"],
        "from": "scanner@yourdomain.com",
        "to": ["archive@example.com"],
        "subject": "Scanned from MFC-L2750DW",
        "text": "",
        "headers": {"X-Mailer": "Brother MFC-L2750DW"},
        "attachments": [
            ("Scan_20240326_091500.pdf", "application/pdf", "47ea45456138d0344e7c4d4b82d002f614d498cf544eb9b67c1de89fef6e1eed"),
        ],
    },
    "several_tags_headers.eml": {
        "covers": ["several X-PostStack-Tags", "lower-case header names", "html only"],
        "rcpt": ["reader@example.com"],
        "from": "Newsletter <news@yourdomain.com>",
        "to": ["reader@example.com"],
        "subject": "March digest",
        "html": "<h1>March digest</h1><p>Three things happened.</p>",
        "headers": {
            "List-Unsubscribe": "<https://yourdomain.com/u/abc123>, <mailto:unsubscribe@yourdomain.com?subject=abc123>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        },
        "tags": ["newsletter", "digest", "march-2024", "café-readers", "segment-b"],
    },
    "shift_jis_8bit.eml": {
        "covers": ["charset shift_jis", "8bit", "text only"],
        "rcpt": ["tanaka@example.jp"],
        "from": "鈴木 <suzuki@yourdomain.com>",
        "to": ["tanaka@example.jp"],
        "subject": "会議資料",
        "text": "田中様\n\nいつもお世話になっております。①会議の資料を送付します。",
    },
    "singlepart_attachment_only.eml": {
        "covers": ["attachment only"],
        "rcpt": ["cfo@example.com"],
        "from": "reports@yourdomain.com",
        "to": ["cfo@example.com"],
        "subject": "Monthly report",
        "text": "",
        "attachments": [
            ("report-2024-03.pdf", "application/pdf", "5c4dce11c04b034d4ad65e3a3c697e7569a334a93c2fa7437b90d1ffa6fd918e"),
        ],
    },
    "stdlib_docs_example.eml": {
        "covers": ["charset us-ascii"],
        "rcpt": ["user@example.com"],
        "from": "you@yourdomain.com",
        "to": ["user@example.com"],
        "subject": "Hello from PostStack SMTP",
        "html": "<p>Sent via SMTP relay!</p>",
        "tags": ["welcome", "onboarding"],
    },
    "stdlib_emailmessage_undisclosed.eml": {
        "covers": ["RFC 2231 filename", "8bit", "RFC 2047 subject", "RFC 2047 display name"],
        "rcpt": ["hidden@example.com", "other@example.net"],
        "from": "Zoë Sender <zoe@yourdomain.com>",
        "to": ["hidden@example.com", "other@example.net"],
        "reply_to": "Équipe <team@yourdomain.com>, ops@yourdomain.com",
        "subject": "Rapport trimestriel – été 2024",
        "text": "Bonjour,\n\nvoici le rapport de l'été.\n",
        "attachments": [
            ("données été.csv", "text/csv", sha256(b"col1;col2\n1;2\n")),
        ],
        "idempotency_key": "order-4711-confirmation",
    },
    "stdlib_legacy_nonascii_headers.eml": {
        "covers": ["RFC 2047 display name", "RFC 2047 subject"],
        "rcpt": ["user@example.com"],
        "from": "Shop Müller <shop@yourdomain.com>",
        "to": ["user@example.com"],
        "subject": "Grüße aus Köln",
        "text": "Grüße!",
        "html": "<p>Grüße!</p>",
    },
    "symfony_mailer_qp.eml": {
        "covers": [
            "quoted-printable",
            "charset utf-8",
            "RFC 2047 subject",
            "RFC 2047 display name",
        ],
        "rcpt": ["kunde@example.at"],
        "from": "Müller & Söhne <shop@yourdomain.com>",
        "to": ["kunde@example.at"],
        "subject": "Zahlungsbestätigung",
        "text": "Vielen Dank für Ihre Bestellung bei Müller & Söhne – wir haben Ihre Zahlung erhalten und bereiten den Versand vor. Ihre Rechnung finden Sie im Anhang.   \n\nBei Fragen antworten Sie einfach auf diese E-Mail.",
        "html": "<!DOCTYPE html><html><body><p>Vielen Dank für Ihre Bestellung bei Müller &amp; Söhne – wir haben Ihre Zahlung erhalten und bereiten den Versand vor.</p><p>Ihre Rechnung finden Sie im Anhang.</p></body></html>",
        "tags": ["order", "payment"],
        "attachments": [
            ("Rechnung-2024-0042.pdf", "application/pdf", "64395d46e05b7753fcff812168ba041bbf24c17fa615533efab911354461a2cd"),
        ],
    },
    "thebat_koi8r_qp_html.eml": {
        "covers": [
            "charset koi8-r",
            "quoted-printable",
            "RFC 2047 subject",
            "RFC 2047 display name",
        ],
        "rcpt": ["olga@example.ru"],
        "from": "Игорь <igor@yourdomain.com>",
        "to": ["Ольга <olga@example.ru>"],
        "reply_to": "Бухгалтерия <buh@yourdomain.com>",
        "subject": "Счёт оплачен",
        "text": "Здравствуйте, Ольга!\n\nСчёт N118 оплачен, спасибо.\n\n-- \nС уважением,\nИгорь\n",
        "html": "<html><body><p>Здравствуйте, Ольга!</p><p>Счёт N118 оплачен, спасибо.</p></body></html>",
        "headers": {"X-Mailer": "The Bat! (v10.5.3) Professional"},
    },
    "thunderbird_forward_as_attachment.eml": {
        "covers": ["message/rfc822"],
        "rcpt": ["colleague@example.com"],
        "from": "Me <me@yourdomain.com>",
        "to": ["colleague@example.com"],
        "subject": "Fwd: Original subject",
        "text": "See the forwarded message.\n",
        "attachments": [
            ("Original subject.eml", "message/rfc822", "0c198f70f11ccad132b8ab9f951d3425d198cbb7567b5f1b17441dde2c70b5bb"),
        ],
    },
    "thunderbird_pgp_mime_signed.eml": {
        "covers": ["multipart/signed", "quoted-printable", "RFC 2047 subject"],
        "rcpt": ["buchhaltung@example.org"],
        "from": "Lena Vogel <lena@yourdomain.com>",
        "to": ["buchhaltung@example.org"],
        "subject": "Belege März",
        "text": "Hallo,\n\nanbei die Belege für März als CSV. Bitte kurz bestätigen, dass alles angekommen ist.\n\nViele Grüße\nLena\n",
        "attachments": [
            ("belege-2024-03.csv", "text/csv; charset=UTF-8", sha256("Datum;Betrag\n2024-03-01;12,50\n".encode())),
        ],
    },
    "thunderbird_rfc2231_attachment.eml": {
        "covers": ["8bit", "charset utf-8"],
        "rcpt": ["recruteur@example.fr"],
        "from": "Anaïs Lefèvre <anais@yourdomain.com>",
        "to": ["recruteur@example.fr"],
        "subject": "Candidature – développeuse",
        "text": "Bonjour,\n\nveuillez trouver mon CV ci-joint. Très cordialement,\nAnaïs\n",
        "attachments": [
            ("CV Anaïs Lefèvre.pdf", "application/pdf", TINY_PDF),
        ],
    },
    "windows1252_qp.eml": {
        "covers": ["charset windows-1252", "quoted-printable", "RFC 2047 subject"],
        "rcpt": ["buyer@example.com"],
        "from": "Promo <promo@yourdomain.com>",
        "to": ["buyer@example.com"],
        "subject": "“Deals” – 5 €",
        "text": "“Quoted” prices start at 5 € – don’t miss it…",
        "headers": {"X-Mailer": "Microsoft Outlook Express 6.00.2900.5512"},
    },
}
