"""
End to end with nodemailer (pinned in tests/e2e/node): the PostStack SMTP
page's Node examples as written, host and port aside, and nodemailer's
richer message shapes, against relay + sandbox over loopback TLS.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import SkipTest

from tests.common.keys import FULL_KEY
from tests.common.relay import RelayTestCase
from tests.common.node import ensure_node_modules, node_available, run_node_script


class NodemailerTests(RelayTestCase):
    relay_options = {"tls_detect_timeout": 1.0}

    def setUp(self) -> Any:
        reason = node_available()
        if reason is not None:
            raise SkipTest(reason)
        ensure_node_modules()
        return super().setUp()

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(self.port),
            "SMTP_CA": self.cafile,
            "SMTP_PASS": FULL_KEY,
        }
        env.update(extra)
        return env

    async def node(self, script: str, *args: str, **env: str) -> dict[str, Any]:
        return await run_node_script(reactor, script, list(args), self.env(**env), timeout=60)

    async def test_page_html_tags(self) -> None:
        """The page's first Node example: html and X-PostStack-Tags reach the API; the reply names the id."""
        result = await self.node("page_html_tags.mjs")
        self.assertTrue(result["ok"], result)
        [email] = self.stored()
        self.assertEqual(result["response"], f"250 2.0.0 Ok: queued as {email.id}")
        p = email.payload
        self.assertEqual(p["from"], "you@yourdomain.com")
        self.assertEqual(p["to"], ["user@example.com"])
        self.assertEqual(p["subject"], "Hello from PostStack SMTP")
        self.assertEqual(p["html"], "<p>Sent via SMTP relay!</p>")
        self.assertEqual(p["tags"], ["welcome", "onboarding"])
        self.assertNotIn("X-Poststack-Tags", str(p.get("headers", {})))

    async def test_page_template(self) -> None:
        """The page's template example: template id and variables, no empty subject or text."""
        result = await self.node("page_template.mjs")
        self.assertTrue(result["ok"], result)
        [email] = self.stored()
        p = email.payload
        self.assertEqual(p["template_id"], "tpl_abc123def456ghi789")
        self.assertEqual(p["variables"], {"first_name": "Alice", "company_name": "Acme Inc"})
        self.assertNotIn("subject", p)
        self.assertNotIn("text", p)
        self.assertNotIn("html", p)

    async def test_rich_full(self) -> None:
        """html + text + attachments (non-ASCII name) + cid image arrive with names, types and bytes."""
        result = await self.node("rich.mjs", "full")
        self.assertTrue(result["ok"], result)
        [email] = self.stored()
        p = email.payload
        self.assertEqual(p["text"], "Plain-text part.\nSecond line.")
        self.assertIn('src="cid:logo@yourdomain.com"', p["html"])
        by_name = {a["filename"]: a for a in p["attachments"]}
        self.assertEqual(set(by_name), {"notes.txt", "Übersicht_été_報告.pdf", "logo.png"})
        sent = {a["filename"]: a for a in result["sent"]["attachments"]}
        for name, attachment in by_name.items():
            content = sent[name]["content"]
            expected = (
                base64.b64decode(content["base64"]) if isinstance(content, dict) else content.encode()
            )
            self.assertEqual(
                hashlib.sha256(base64.b64decode(attachment["content"])).hexdigest(),
                hashlib.sha256(expected).hexdigest(),
                name,
            )
            self.assertEqual(attachment["content_type"], sent[name]["contentType"])

    async def test_rich_calendar(self) -> None:
        """A calendar invitation keeps its text/calendar part as an attachment."""
        result = await self.node("rich.mjs", "calendar")
        self.assertTrue(result["ok"], result)
        [email] = self.stored()
        types = [a["content_type"] for a in email.payload["attachments"]]
        self.assertTrue(any(t.startswith("text/calendar") for t in types), types)
        self.assertIn("kick-off", email.payload["text"])

    async def test_rich_list_headers(self) -> None:
        """List-Unsubscribe and List-ID go on as headers."""
        result = await self.node("rich.mjs", "list")
        self.assertTrue(result["ok"], result)
        [email] = self.stored()
        headers = {k.lower(): v for k, v in email.payload["headers"].items()}
        self.assertIn("list-unsubscribe", headers)
        self.assertIn("list-id", headers)

    async def test_rich_cc_bcc(self) -> None:
        """to, cc with display names and an envelope-only bcc."""
        result = await self.node("rich.mjs", "ccbcc")
        self.assertTrue(result["ok"], result)
        [email] = self.stored()
        p = email.payload
        self.assertTrue(p["to"] and p["cc"] and p["bcc"], p)
        self.assertTrue(all("<" not in b for b in p["bcc"]))

    async def test_rich_international(self) -> None:
        """
        UTF-8 addresses (RFC 6531): nodemailer sees SMTPUTF8 offered and
        declares it; the API gets A-label domains, UTF-8 local parts and
        Unicode names, subject and Reply-To, and the envelope-only Bcc.
        """
        result = await self.node("rich.mjs", "intl")
        self.assertTrue(result["ok"], result)
        [email] = self.stored()
        self.assertEqual(result["response"], f"250 2.0.0 Ok: queued as {email.id}")
        p = email.payload
        self.assertEqual(p["from"], "Jörg Müller <jörg@xn--bcher-kva.example>")
        self.assertEqual(
            p["to"], ["用户 <用户@xn--fsqu00a.example>", '"Ivanov, Ivan" <иван@xn--bcher-kva.example>']
        )
        self.assertEqual(p["cc"], ["José <josé@example.com>"])
        self.assertEqual(p["bcc"], ["hidden@xn--bcher-kva.example"])
        self.assertEqual(p["reply_to"], '"Müller, Jörg" <antwort@xn--bcher-kva.example>')
        self.assertEqual(p["subject"], "Grüße aus Köln 👋")
        self.assertEqual(p["text"], "Grüße, 用户!")

    async def test_secure_false_is_explained(self) -> None:
        """nodemailer with secure: false hears the 554 5.7.0 implicit-TLS explanation, not a time-out."""
        result = await self.node("plaintext_misconfig.mjs")
        self.assertFalse(result["ok"])
        self.assertEqual(result["code"], 554, result)
        self.assertIn("This port requires TLS from the first byte", result["error"])
        self.assertEqual(self.stored(), [])

    async def test_wrong_key(self) -> None:
        """A wrong key is reported by nodemailer as a 535 with the relay's hint."""
        result = await self.node("page_html_tags.mjs", SMTP_PASS="sk_test_wrong")
        self.assertFalse(result["ok"])
        self.assertEqual(result["code"], 535, result)
        self.assertEqual(self.stored(), [])
