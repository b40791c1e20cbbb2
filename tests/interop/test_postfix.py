# -*- test-case-name: tests.interop.test_postfix -*-
"""
Postfix as a smarthost client of the relay: a private Postfix instance
(L{tests.common.postfix}) whose C{relayhost} is the relay on loopback,
with implicit TLS (C{smtp_tls_wrappermode}), a verified certificate and a
SASL password map holding the API key. Mail is submitted with Postfix's
C{sendmail}, goes through Postfix's queue and leaves through its C{smtp}
client; the tests check what the sandbox stored and what Postfix logged
(C{status=sent}, C{deferred}, C{bounced}), including how Postfix's queue
handles our 4xx replies: kept, retried, delivered exactly once.

Skipped (with the reason) when Postfix, its SASL modules or root are
missing, except under C{CI=true}, where that fails.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.testing import write_certificate
from tests.common.interop import InteropTestCase, skip_unless
from tests.common.keys import FULL_KEY
from tests.common.postfix import (
    Delivery,
    PostfixCommands,
    PostfixInstance,
    parse_deliveries,
    parse_version,
    postfix_problem,
)
from tests.common.processes import ToolResult, missing

SENDER = "you@yourdomain.com"


def message(subject: str, body: str, headers: str = "To: user@example.com\n") -> bytes:
    """
    A message as an application hands it to C{sendmail}: LF line ends, no
    Message-ID and no Date (Postfix's cleanup adds both).
    """
    return (
        f"From: You <{SENDER}>\n{headers}Subject: {subject}\n"
        "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
        f"Content-Transfer-Encoding: 8bit\n\n{body}"
    ).encode("utf-8")


class PostfixSmarthostTests(InteropTestCase):
    """
    A private Postfix relays through the relay; each test has its own
    instance, started by L{start_postfix} and stopped in cleanup.
    """

    timeout = 120
    # A message whose API call keeps failing gets its 451 after 3 s (not
    # 30 s), and the circuit breaker stays out of the way.
    relay_options = {
        **InteropTestCase.relay_options,
        "api_timeout": 1.0,
        "api_deadline": 3.0,
        "api_breaker_failures": 0,
        # A quota 429 is remembered for 1 s (MAIL FROM answered 451 until then).
        "api_quota_hold": 1.0,
    }

    def setUp(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._set_up())

    async def _set_up(self) -> None:
        postconf = skip_unless("postconf")
        problem, commands = await postfix_problem(self.run_tool, postconf)
        if problem is not None or commands is None:
            raise missing(f"cannot run Postfix: {problem}")
        self.commands: PostfixCommands = commands
        await super().setUp()

    async def start_postfix(
        self, password: str = FULL_KEY, settings: dict[str, str] | None = None
    ) -> PostfixInstance:
        """A running private Postfix relaying through this test's relay; stopped in cleanup."""
        # Not under the deep trial directory: Postfix's socket paths must be short.
        directory = tempfile.mkdtemp(prefix="poststack-postfix-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        postfix = PostfixInstance(
            directory,
            self.commands,
            self.run_tool,
            IReactorTime(reactor),
            relay_port=self.port,
            cafile=self.cafile,
            password=password,
            settings=settings,
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(postfix.stop()))
        await postfix.start()
        return postfix

    async def submit(
        self, postfix: PostfixInstance, data: bytes, sender: str, *recipients: str
    ) -> None:
        """Submit with Postfix's C{sendmail}; it must accept the message."""
        result = await postfix.sendmail(data, sender, recipients)
        self.assertEqual(result.code, 0, result.output)

    def assertQueued(self, delivery: Delivery, email: Any) -> None:
        """C{delivery} is a C{status=sent} with the relay's 250 naming C{email}'s id."""
        self.assertEqual(delivery.status, "sent", delivery)
        self.assertEqual(delivery.dsn, "2.0.0", delivery)
        self.assertEqual(delivery.text, f"250 2.0.0 Ok: queued as {email.id}")
        self.assertEqual(delivery.relay, f"localhost[127.0.0.1]:{self.port}")

    async def test_relays_one_message(self) -> None:
        """sendmail -> Postfix queue -> relay (verified implicit TLS, SASL) -> one stored email."""
        postfix = await self.start_postfix()
        body = "Hello from Postfix.\n.a line that starts with a dot\nGrüße, ½ € ✓\n"
        await self.submit(postfix, message("Postfix smarthost", body), SENDER, "user@example.com")
        [delivery] = await postfix.wait_for_status("sent")
        await postfix.wait_queue_empty()

        email = self.only_email()
        self.assertQueued(delivery, email)
        self.assertEqual(delivery.recipient, "user@example.com")
        self.assertEqual(email.api_key, FULL_KEY)
        payload = email.payload
        self.assertEqual(payload["from"], f"You <{SENDER}>")
        self.assertEqual(payload["to"], ["user@example.com"])
        self.assertEqual(payload["subject"], "Postfix smarthost")
        self.assertEqual(payload["text"].rstrip("\n"), body.rstrip("\n"))
        self.assertNotIn("cc", payload)
        self.assertNotIn("bcc", payload)
        # Postfix added a Message-ID, so the relay derived the idempotency key.
        self.assertRegex(email.idempotency_key or "", r"^psr-[0-9a-f]{40}$")
        # The certificate was checked, not just used for encryption.
        self.assertRegex(
            postfix.log(),
            rf"Verified TLS connection established to localhost\[127\.0\.0\.1\]:{self.port}:"
            r" TLSv1\.[23]",
        )
        self.assertEqual([d.status for d in postfix.deliveries()], ["sent"])

    async def test_several_recipients_one_api_call(self) -> None:
        """To + Cc + a Bcc-only envelope recipient: one transaction, one API call, right fields."""
        postfix = await self.start_postfix()
        headers = "To: To Person <to@example.com>\nCc: cc@example.com\n"
        await self.submit(
            postfix,
            message("three recipients", "one message, three recipients\n", headers),
            SENDER,
            "to@example.com",
            "cc@example.com",
            "hidden@example.com",
        )
        sent = await postfix.wait_for_status("sent", count=3)
        await postfix.wait_queue_empty()

        email = self.only_email()
        self.assertEqual(
            sorted(d.recipient for d in sent),
            ["cc@example.com", "hidden@example.com", "to@example.com"],
        )
        for delivery in sent:
            self.assertQueued(delivery, email)
        self.assertEqual(len({d.queue_id for d in sent}), 1)
        payload = email.payload
        self.assertEqual(payload["to"], ["To Person <to@example.com>"])
        self.assertEqual(payload["cc"], ["cc@example.com"])
        self.assertEqual(payload["bcc"], ["hidden@example.com"])
        self.assertEqual(payload["subject"], "three recipients")
        self.assertNotIn("hidden@example.com", repr(payload.get("headers", {})))

    async def test_smtputf8_international_mail(self) -> None:
        """
        Postfix with smtputf8_enable = yes relays UTF-8 envelope addresses
        (it needs SMTPUTF8 offered, else it bounces "SMTPUTF8 is required");
        the API gets A-label domains, UTF-8 local parts, Unicode names,
        Reply-To and subject (RFC 6532 headers), the envelope-only Bcc.
        """
        postfix = await self.start_postfix(settings={"smtputf8_enable": "yes"})
        data = (
            "From: Jörg Müller <jörg@bücher.example>\n"
            "To: 用户 <用户@例子.example>, \"Ivanov, Ivan\" <иван@Bücher.example>\n"
            "Reply-To: \"Müller, Jörg\" <antwort@bücher.example>\n"
            "Subject: Grüße aus Köln 👋\n"
            "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
            "Content-Transfer-Encoding: 8bit\n\nGrüße, 用户!\n"
        ).encode("utf-8")
        recipients = ("用户@例子.example", "иван@bücher.example", "hidden@bücher.example")
        await self.submit(postfix, data, "jörg@bücher.example", *recipients)
        sent = await postfix.wait_for_status("sent", count=3)
        await postfix.wait_queue_empty()

        email = self.only_email()
        for delivery in sent:
            self.assertQueued(delivery, email)
        self.assertEqual(sorted(d.recipient for d in sent), sorted(recipients))
        self.assertEqual(email.api_key, FULL_KEY)
        payload = email.payload
        self.assertEqual(payload["from"], "Jörg Müller <jörg@xn--bcher-kva.example>")
        self.assertEqual(
            payload["to"],
            ["用户 <用户@xn--fsqu00a.example>", '"Ivanov, Ivan" <иван@xn--bcher-kva.example>'],
        )
        self.assertEqual(payload["bcc"], ["hidden@xn--bcher-kva.example"])
        self.assertNotIn("cc", payload)
        self.assertEqual(payload["reply_to"], '"Müller, Jörg" <antwort@xn--bcher-kva.example>')
        self.assertEqual(payload["subject"], "Grüße aus Köln 👋")
        self.assertEqual(payload["text"].rstrip("\n"), "Grüße, 用户!")

    async def test_lost_response_retried_exactly_once(self) -> None:
        """The API accepted but its answer was lost: 451, Postfix retries, one email in the end."""
        self.sandbox.resource.inject_fault("accept_then_500", count=-1)
        postfix = await self.start_postfix()
        await self.submit(
            postfix, message("lost answer", "sent once only\n"), SENDER, "user@example.com"
        )
        [deferred, *_] = await postfix.wait_for_status("deferred")

        self.assertEqual(deferred.dsn, "4.3.0")
        self.assertRegex(
            deferred.text,
            r"^host localhost\[127\.0\.0\.1\] said: 451 4\.3\.0 PostStack API: .+: "
            r"temporary API failure, try again later \(in reply to end of DATA command\)$",
        )
        # The API did store it: only its answer was lost.
        [first] = self.stored()
        self.assertTrue(first.id.startswith("em_"), first)
        self.assertIn(deferred.queue_id, await postfix.queue_listing())

        self.sandbox.resource.clear_faults()
        await deferLater(reactor, 1.2, lambda: None)  # past the relay's quota hold
        flushed = await postfix.flush()
        self.assertEqual(flushed.code, 0, flushed.output)
        [sent] = await postfix.wait_for_status("sent")
        await postfix.wait_queue_empty()

        # Postfix sent the same bytes again, the relay derived the same key,
        # and the API answered with the original id instead of sending twice.
        email = self.only_email()
        self.assertEqual(email.id, first.id)
        self.assertEqual(sent.queue_id, deferred.queue_id)
        self.assertQueued(sent, email)
        self.assertRegex(email.idempotency_key or "", r"^psr-[0-9a-f]{40}$")
        statuses = [d.status for d in postfix.deliveries()]
        self.assertEqual(statuses[-1], "sent")
        self.assertEqual(set(statuses[:-1]), {"deferred"})

    async def test_quota_deferred_then_delivered(self) -> None:
        """A quota 429 is a 451 Postfix queues with our text; delivered once the quota lifts."""
        self.sandbox.resource.inject_fault("quota", count=-1)
        postfix = await self.start_postfix()
        await self.submit(
            postfix, message("over quota", "wait for the quota\n"), SENDER, "user@example.com"
        )
        [deferred, *_] = await postfix.wait_for_status("deferred")

        self.assertEqual(deferred.dsn, "4.7.0")
        self.assertRegex(
            deferred.text,
            r"^host localhost\[127\.0\.0\.1\] said: 451 4\.7\.0 PostStack API: .+: "
            r"PostStack sending quota reached \(monthly_limit_exceeded\); "
            r"waiting seconds will not help",
        )
        self.assertEqual(self.stored(), [])

        self.sandbox.resource.clear_faults()
        flushed = await postfix.flush()
        self.assertEqual(flushed.code, 0, flushed.output)
        [sent] = await postfix.wait_for_status("sent")
        await postfix.wait_queue_empty()
        email = self.only_email()
        self.assertQueued(sent, email)
        self.assertEqual(email.payload["subject"], "over quota")

    async def test_permanent_failure_bounces(self) -> None:
        """A 5xx (sender domain not verified) makes Postfix bounce with our text; nothing stored."""
        postfix = await self.start_postfix()
        sender = "you@pendingdomain.com"
        data = f"From: {sender}\nTo: user@example.com\nSubject: pending\n\nnot sent\n".encode()
        await self.submit(postfix, data, sender, "user@example.com")
        [bounced, *_] = await postfix.wait_for_status("bounced")
        await postfix.wait_queue_empty()

        self.assertEqual(bounced.recipient, "user@example.com")
        self.assertEqual(bounced.dsn, "5.7.1")
        self.assertEqual(
            bounced.text,
            "host localhost[127.0.0.1] said: 550 5.7.1 Sender address rejected: the domain"
            " pendingdomain.com is not verified in PostStack; verify it (PostStack dashboard, Domains),"
            " or send from a verified domain (PostStack API: Domain not verified, HTTP 422)"
            " (in reply to end of DATA command)",
        )
        # Postfix's own bounce notice to the sender (from MAILER-DAEMON@localhost)
        # goes the same way and is refused too: nothing at all is stored.
        self.assertEqual({d.status for d in postfix.deliveries()}, {"bounced"})
        self.assertEqual(self.stored(), [])

    async def test_bounce_notice_reaches_sender(self) -> None:
        """With myorigin on a verified domain, Postfix's bounce notice goes out via the API."""
        postfix = await self.start_postfix(settings={"myorigin": "yourdomain.com"})
        sender = "you@pendingdomain.com"
        data = f"From: {sender}\nTo: user@example.com\nSubject: pending\n\nnot sent\n".encode()
        await self.submit(postfix, data, sender, "user@example.com")
        [bounced] = await postfix.wait_for_status("bounced")
        [notice] = await postfix.wait_for_status("sent")
        await postfix.wait_queue_empty()

        self.assertEqual(bounced.recipient, "user@example.com")
        self.assertEqual(notice.recipient, sender)
        email = self.only_email()
        self.assertQueued(notice, email)
        payload = email.payload
        self.assertEqual(payload["from"], "Mail Delivery System <MAILER-DAEMON@yourdomain.com>")
        self.assertEqual(payload["to"], [sender])
        self.assertEqual(payload["subject"], "Undelivered Mail Returned to Sender")
        # The sender reads our reply in the notice.
        self.assertRegex(
            payload["text"],
            r"<user@example\.com>: host localhost\[127\.0\.0\.1\] said: 550 5\.7\.1 Sender address"
            r"\s+rejected:\s+the\s+domain\s+pendingdomain\.com\s+is\s+not\s+verified\s+in\s+PostStack;\s+verify\s+it",
        )
        self.assertEqual(
            [a["content_type"] for a in payload.get("attachments", [])],
            ["message/delivery-status", "message/rfc822"],
        )

    async def test_untrusted_certificate_defers(self) -> None:
        """A relay certificate Postfix cannot verify: deferred before AUTH, the key never sent."""
        other_ca, _ = write_certificate(self.workdir() + "/other-ca")
        postfix = await self.start_postfix(settings={"smtp_tls_CAfile": other_ca})
        await self.submit(postfix, message("untrusted", "not sent\n"), SENDER, "user@example.com")
        [deferred, *_] = await postfix.wait_for_status("deferred")

        self.assertEqual(
            (deferred.dsn, deferred.text), ("4.7.5", "Server certificate not verified")
        )
        self.assertIn(
            f"Untrusted TLS connection established to localhost[127.0.0.1]:{self.port}",
            postfix.log(),
        )
        self.assertNotIn("Verified TLS connection", postfix.log())
        self.assertNotIn("SASL", postfix.log())
        self.assertEqual(self.stored(), [])

    async def test_wrong_key_keeps_mail_queued(self) -> None:
        """A refused API key defers, nothing bounced or stored; a fixed map + reload delivers."""
        # No retry of its own before the flush: a reload while a delivery
        # runs would leave the message in the active queue until qmgr restarts.
        backoff = {"minimal_backoff_time": "300s", "maximal_backoff_time": "300s"}
        postfix = await self.start_postfix(password="sk_test_not_a_key", settings=backoff)
        await self.submit(
            postfix, message("wrong key", "kept in the queue\n"), SENDER, "user@example.com"
        )
        [deferred, *_] = await postfix.wait_for_status("deferred")

        self.assertTrue(
            deferred.text.startswith(
                "SASL authentication failed; server localhost[127.0.0.1] said:"
                " 535 5.7.8 Authentication credentials invalid"
            ),
            deferred,
        )
        self.assertEqual(self.stored(), [])
        await postfix.wait_not_active(deferred.queue_id)

        postfix.password = FULL_KEY
        postfix.write_config()
        reloaded = await self.run_tool(
            [self.commands.postfix, "-c", postfix.config_directory, "reload"], timeout=30
        )
        self.assertEqual(reloaded.code, 0, reloaded.output)
        flushed = await postfix.flush()
        self.assertEqual(flushed.code, 0, flushed.output)
        [sent] = await postfix.wait_for_status("sent")
        await postfix.wait_queue_empty()
        self.assertQueued(sent, self.only_email())
        self.assertNotIn("bounced", {d.status for d in postfix.deliveries()})
        self.assertIsNone(re.search(r"sk_test_not_a_key|sk_test_full_access", postfix.log()))


SAMPLE_LOG = """\
Nov 24 21:40:50 localhost postfix/smtp[26332]: Verified TLS connection established to localhost[127.0.0.1]:18587: TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)
Nov 24 21:40:50 localhost postfix/smtp[26332]: E774621C1A9: to=<user@example.com>, relay=localhost[127.0.0.1]:18587, delay=0.04, delays=0.01/0.02/0.01/0, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as em_qvvs0ain9ex3g5j6szt4)
Nov 24 21:40:50 localhost postfix/qmgr[26307]: E774621C1A9: removed
Nov 24 21:46:46 localhost postfix/smtp[3838]: E1BB821C8C7: to=<b@example.com>, orig_to=<B@example.com>, relay=localhost[127.0.0.1]:36807, delay=0.54, delays=0.01/0.02/0.51/0, dsn=4.7.8, status=deferred (SASL authentication failed; server localhost[127.0.0.1] said: 535 5.7.8 Authentication credentials invalid)
Nov 24 21:40:57 localhost postfix/smtp[26332]: 2565521C1D3: to=<user@example.com>, relay=localhost[127.0.0.1]:18587, delay=0.01, delays=0/0/0.01/0, dsn=5.6.0, status=bounced (host localhost[127.0.0.1] said: 554 5.6.0 PostStack API: Domain not verified (HTTP 422) (in reply to end of DATA command))
"""


def fake_runner(answers: dict[str, ToolResult]) -> Any:
    """A L{RunTool} answering by the command's last argument, at once."""

    def run(argv: Any, *, stdin: Any = None, timeout: float = 0.0) -> Deferred[ToolResult]:
        return succeed(answers[argv[-1]])

    return run


class PostfixHelperTests(SynchronousTestCase):
    """
    The parts of L{tests.common.postfix} that need no Postfix: log parsing,
    version checks, the generated configuration.
    """

    def commands(self, version: tuple[int, ...] = (3, 7, 11)) -> PostfixCommands:
        return PostfixCommands(version, "/x/postfix", "/x/postconf", "/x/postqueue", "/x/sendmail")

    def instance(self, version: tuple[int, ...] = (3, 7, 11)) -> PostfixInstance:
        return PostfixInstance(
            "/tmp/pfx-test",
            self.commands(version),
            fake_runner({}),
            IReactorTime(reactor),
            relay_port=4321,
            cafile="/c/cert.pem",
            password="sk_test_x",
        )

    def test_parse_deliveries(self) -> None:
        """Sent, deferred (with orig_to) and bounced lines parse; other lines are ignored."""
        self.assertEqual(
            parse_deliveries(SAMPLE_LOG),
            [
                Delivery(
                    "E774621C1A9",
                    "user@example.com",
                    "localhost[127.0.0.1]:18587",
                    "2.0.0",
                    "sent",
                    "250 2.0.0 Ok: queued as em_qvvs0ain9ex3g5j6szt4",
                ),
                Delivery(
                    "E1BB821C8C7",
                    "b@example.com",
                    "localhost[127.0.0.1]:36807",
                    "4.7.8",
                    "deferred",
                    "SASL authentication failed; server localhost[127.0.0.1] said:"
                    " 535 5.7.8 Authentication credentials invalid",
                ),
                Delivery(
                    "2565521C1D3",
                    "user@example.com",
                    "localhost[127.0.0.1]:18587",
                    "5.6.0",
                    "bounced",
                    "host localhost[127.0.0.1] said: 554 5.6.0 PostStack API: Domain"
                    " not verified (HTTP 422) (in reply to end of DATA command)",
                ),
            ],
        )

    def test_parse_version(self) -> None:
        """mail_version strings become comparable tuples; junk gives None."""
        self.assertEqual(parse_version("3.7.11\n"), (3, 7, 11))
        self.assertEqual(parse_version("3.10"), (3, 10))
        self.assertIsNone(parse_version("unknown"))

    def test_too_old(self) -> None:
        """A Postfix older than 3.4 is refused with a reason naming the version."""
        self.patch(os, "geteuid", lambda: 0)
        run = fake_runner(
            {"sendmail_path": ToolResult(0, "3.3.2\n/usr/sbin\n/usr/sbin/sendmail\n", "")}
        )
        problem, commands = self.successResultOf(
            Deferred.fromCoroutine(postfix_problem(run, "/x/postconf"))
        )
        self.assertIsNone(commands)
        self.assertIn("Postfix 3.3.2 is too old", problem or "")

    def test_not_root(self) -> None:
        """Without root there is a reason, and no command is run."""
        self.patch(os, "geteuid", lambda: 1000)
        problem, commands = self.successResultOf(
            Deferred.fromCoroutine(postfix_problem(fake_runner({}), "/x/postconf"))
        )
        self.assertIsNone(commands)
        self.assertIn("root", problem or "")

    def test_no_listener(self) -> None:
        """master.cf has no inet (listening) service and no smtpd; postlogd is there."""
        rows = [line.split() for line in self.instance().master_cf().splitlines()]
        self.assertNotIn("inet", [row[1] for row in rows])
        self.assertNotIn("smtpd", [row[-1] for row in rows])
        self.assertIn(["postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"], rows)

    def test_main_cf(self) -> None:
        """main.cf: relay as smarthost, verified implicit TLS, SASL; compatibility by version."""
        settings = self.instance().main_cf()
        self.assertEqual(settings["relayhost"], "[localhost]:4321")
        self.assertEqual(settings["smtp_tls_wrappermode"], "yes")
        self.assertEqual(settings["smtp_tls_security_level"], "secure")
        self.assertEqual(settings["smtp_tls_CAfile"], "/c/cert.pem")
        self.assertEqual(
            settings["smtp_sasl_password_maps"], "texthash:/tmp/pfx-test/conf/sasl_passwd"
        )
        self.assertEqual(settings["mydestination"], "")
        self.assertEqual(settings["compatibility_level"], "3.6")
        self.assertEqual(self.instance((3, 5, 9)).main_cf()["compatibility_level"], "2")

    def test_long_directory_refused(self) -> None:
        """A directory too deep for Postfix's Unix socket paths is refused up front."""
        with self.assertRaises(ValueError):
            PostfixInstance(
                "/tmp/" + "d" * 120,
                self.commands(),
                fake_runner({}),
                IReactorTime(reactor),
                relay_port=1,
                cafile="c",
                password="p",
            )
