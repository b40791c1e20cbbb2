"""
Secrets and access control end to end: real SMTP clients over real
loopback TLS, the relay over real HTTP to the sandbox.

  - API keys and mailbox passwords never appear in any log event, reply or
    exception, in clear or in the base64 a client sends; logs show only a
    short key prefix;
  - no open relay: nothing is relayed without AUTH, and a plaintext
    connection never reaches the SMTP session, even with valid credentials;
  - the failure throttle is wired into the running relay;
  - an API-key identity's sender rules are the API's (domain scope), and
    its refusal reaches the client.
"""

from __future__ import annotations

import base64
import random
import re
import smtplib
import socket
import string
from typing import Any, Callable

from twisted.cred.credentials import IUsernamePassword
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, LogEvent, eventAsJSON, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import provider

from tests.common.keys import FULL_KEY, MAILBOX, SCOPED_KEY, forms
from tests.common.relay import RelayTestCase

WRONG_KEY = "sk_live_" + "".join(
    random.SystemRandom().choice(string.ascii_letters + string.digits) for _ in range(30)
)
WRONG_MAILBOX_PASSWORD = "alice-wrong-" + "".join(
    random.SystemRandom().choice(string.ascii_letters + string.digits) for _ in range(20)
)
SHOWN_PREFIX = FULL_KEY[:10] + "\N{HORIZONTAL ELLIPSIS}"


def message(sender: str, tag: str) -> bytes:
    return (
        f"From: {sender}\r\nTo: user@example.com\r\nSubject: {tag}\r\n\r\nbody of {tag}\r\n"
    ).encode()


class RecordingSMTP(smtplib.SMTP_SSL):
    """smtplib's implicit-TLS client, recording every reply it reads in C{replies}."""

    def __init__(self, replies: list[tuple[int, bytes]], *args: Any, **kwargs: Any) -> None:
        self.replies = replies
        super().__init__(*args, **kwargs)

    def getreply(self) -> tuple[int, bytes]:
        code, text = super().getreply()
        self.replies.append((code, text))
        return code, text


class SecretsTests(RelayTestCase):
    """Every log event, reply and exception of a varied session, searched for secrets."""

    relay_options = {
        "api_timeout": 1.0,
        "api_deadline": 2.0,
        "api_breaker_failures": 0,
        "auth_failure_delay": 0.01,
        "auth_failure_max_delay": 0.05,
    }

    def setUp(self) -> "Deferred[None]":
        self.events: list[LogEvent] = []

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            self.events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.replies: list[tuple[int, bytes]] = []
        self.errors: list[BaseException] = []
        d = super().setUp()
        d.addCallback(lambda _: self._record_exceptions())
        return d

    def _record_exceptions(self) -> None:
        """Record every exception the relay's checker and API client produce."""
        checker = self.relay.factory.portal.checkers[IUsernamePassword]
        api = checker._api

        def recording(f: Callable[..., "Deferred[Any]"]) -> Callable[..., "Deferred[Any]"]:
            def call(*args: Any, **kwargs: Any) -> "Deferred[Any]":
                def record(failure: Failure) -> Failure:
                    self.errors.append(failure.value)
                    return failure

                return f(*args, **kwargs).addErrback(record)

            return call

        checker.requestAvatarId = recording(checker.requestAvatarId)
        api.check_api_key = recording(api.check_api_key)
        api.authenticate_mailbox = recording(api.authenticate_mailbox)
        api.send_email = recording(api.send_email)

    def client(self) -> RecordingSMTP:
        return RecordingSMTP(self.replies, "localhost", self.port, context=self.context(), timeout=30)

    def session(self, user: str, password: str, sender: str = "", tag: str = "", mechanism: str = "") -> tuple[int, str]:
        """
        Log in (by default as smtplib chooses: PLAIN) and, if C{sender} is
        given, send one message; (code, text) of the last reply.
        """
        with self.client() as s:
            s.ehlo()
            try:
                if mechanism == "LOGIN":
                    s.user, s.password = user, password
                    s.auth("LOGIN", s.auth_login, initial_response_ok=False)
                else:
                    s.login(user, password)
            except smtplib.SMTPAuthenticationError as e:
                self.errors.append(e)
                return e.smtp_code, e.smtp_error.decode()
            if not sender:
                return 235, ""
            code, text = s.mail(sender)
            if code == 250:
                code, text = s.rcpt("user@example.com")
            if code == 250:
                code, text = s.data(message(sender, tag))
            return code, text.decode()

    async def test_no_secret_anywhere(self) -> None:
        """Good and bad logins, sends, API errors and an API outage leave no key or password in logs, replies or exceptions."""
        resource = self.sandbox.resource
        run = self.in_thread
        user, password = MAILBOX

        # The API is down: AUTH checks fail (454) and are not cached.
        for method, path in (("GET", "/emails"), ("POST", "/mailboxes/authenticate")):
            resource.inject_fault("reset", count=-1, method=method, path=path)
        self.assertEqual((await run(self.session, "poststack", FULL_KEY))[0], 454)
        self.assertEqual((await run(self.session, "poststack", WRONG_KEY))[0], 454)
        self.assertEqual((await run(self.session, user, password))[0], 454)
        resource.clear_faults()

        # Good and bad logins, over PLAIN and LOGIN, and deliveries.
        code, text = await run(self.session, "poststack", FULL_KEY, "you@yourdomain.com", "key-plain")
        self.assertEqual(code, 250, text)
        code, text = await run(
            self.session, "poststack", FULL_KEY, "you@yourdomain.com", "key-login", "LOGIN"
        )
        self.assertEqual(code, 250, text)
        self.assertEqual((await run(self.session, "poststack", WRONG_KEY))[0], 535)
        self.assertEqual((await run(self.session, "poststack", WRONG_KEY, "", "", "LOGIN"))[0], 535)
        self.assertEqual((await run(self.session, user, WRONG_MAILBOX_PASSWORD))[0], 535)
        code, text = await run(self.session, user, password, user, "mailbox")
        self.assertEqual(code, 250, text)

        # The API refuses a message, then is unreachable for sends.
        resource.inject_fault("422")
        code, text = await run(self.session, "poststack", FULL_KEY, "you@yourdomain.com", "refused")
        self.assertEqual(code, 554, text)
        resource.inject_fault("reset", count=-1)
        code, text = await run(self.session, "poststack", FULL_KEY, "you@yourdomain.com", "down")
        self.assertTrue(400 <= code < 500, (code, text))
        resource.clear_faults()
        self.assertEqual(len(self.stored()), 3)

        secrets = (
            forms(FULL_KEY, "poststack")
            + forms(WRONG_KEY, "poststack")
            + forms(password, user)
            + forms(WRONG_MAILBOX_PASSWORD, user)
        )
        self.assertGreater(len(self.events), 10)
        logs = [self.event_text(event) for event in self.events]
        self.assertNoSecret("log event", logs, secrets)
        # Logs name the key by its short prefix only.
        self.assertTrue(any(SHOWN_PREFIX in text for text in logs))

        replies = [f"{code} {text.decode('utf-8', 'replace')}" for code, text in self.replies]
        for expected in ("235 2.7.0", "454 4.7.0", "535 5.7.8", "554 5.6.0"):
            self.assertTrue(any(r.startswith(expected) for r in replies), expected)
        self.assertNoSecret("reply", replies, secrets)

        kinds = {type(e).__name__ for e in self.errors}
        self.assertTrue(
            {"APIError", "APIUnavailable", "AuthUnavailable", "UnauthorizedLogin", "SMTPAuthenticationError"}
            <= kinds,
            kinds,
        )
        errors = [
            f"{type(e).__name__}: {e!s} {e!r} {e.args!r} {getattr(e, 'reply', '')!r}" for e in self.errors
        ]
        self.assertNoSecret("exception", errors, secrets)

    def event_text(self, event: LogEvent) -> str:
        """An event: formatted, as JSON, each value's repr, and any traceback."""
        parts = [formatEvent(event)]
        try:
            parts.append(eventAsJSON(event))
        except (TypeError, ValueError):
            parts.append("(not JSON-serialisable)")
        for key, value in event.items():
            parts.append(f"{key}={value!r}")
            if isinstance(value, Failure):
                parts.append(value.getTraceback())
        return "\n".join(parts)

    def assertNoSecret(self, what: str, texts: list[str], secrets: list[str]) -> None:
        """No text holds any secret form; a failure names the text, briefly."""
        for text in texts:
            for n, secret in enumerate(secrets):
                if secret in text:
                    self.fail(f"{what} holds secret form #{n}: {text[:300]!r}")


class NoOpenRelayTests(RelayTestCase):
    """Nothing is relayed without AUTH, and AUTH needs TLS."""

    relay_options = {"tls_detect_timeout": 1.0}

    def setUp(self) -> "Deferred[None]":
        self.checks: list[object] = []
        d = super().setUp()

        def count_checks(_: object) -> None:
            checker = self.relay.factory.portal.checkers[IUsernamePassword]
            check = checker.requestAvatarId

            def counted(credentials: Any) -> Any:
                self.checks.append(credentials)
                return check(credentials)

            checker.requestAvatarId = counted

        d.addCallback(count_checks)
        return d

    async def test_unauthenticated_over_tls(self) -> None:
        """Over real TLS, MAIL, RCPT and DATA without AUTH get 530 5.7.0 and nothing reaches the API."""

        def talk() -> list[tuple[int, bytes]]:
            with smtplib.SMTP_SSL("localhost", self.port, context=self.context(), timeout=30) as s:
                s.ehlo()
                out = [s.mail("you@yourdomain.com"), s.rcpt("user@example.com"), s.docmd("DATA")]
                out.append(s.noop())
                return out

        out = await self.in_thread(talk)
        self.assertEqual([code for code, _ in out[:3]], [530, 530, 530], out)
        self.assertTrue(all(text.startswith(b"5.7.0 Authentication required") for _, text in out[:3]))
        self.assertEqual(out[-1][0], 250)  # still in command mode: DATA never started
        self.assertEqual(self.stored(), [])
        self.assertEqual(self.checks, [])

    async def test_plaintext_never_reaches_smtp(self) -> None:
        """A plaintext client sending valid credentials and a whole message gets only the 554 TLS line; nothing is checked or stored."""
        dialogue = (
            b"EHLO me\r\nAUTH PLAIN "
            + base64.b64encode(b"\0poststack\0" + FULL_KEY.encode())
            + b"\r\nMAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n"
            + message("you@yourdomain.com", "plain")
            + b".\r\nQUIT\r\n"
        )

        def talk() -> bytes:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                sock.sendall(dialogue)
                data = b""
                for _ in range(100):
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                return data

        data = await self.in_thread(talk)
        self.assertTrue(data.startswith(b"554 5.7.0 This port requires TLS"), data)
        self.assertEqual(data.count(b"\r\n"), 1)
        self.assertNotIn(b"235", data)
        self.assertEqual(self.checks, [])
        self.assertEqual(self.stored(), [])

    async def test_same_dialogue_over_tls_works(self) -> None:
        """The control: the same credentials and message over TLS are checked and sent."""

        def talk() -> tuple[int, bytes]:
            with smtplib.SMTP_SSL("localhost", self.port, context=self.context(), timeout=30) as s:
                s.login("poststack", FULL_KEY)
                s.sendmail("you@yourdomain.com", ["user@example.com"], message("you@yourdomain.com", "tls"))
                return s.noop()

        self.assertEqual((await self.in_thread(talk))[0], 250)
        self.assertEqual(len(self.checks), 1)
        self.assertEqual(len(self.stored()), 1)


class ThrottleEndToEndTests(RelayTestCase):
    """The running relay throttles failed logins per client address."""

    relay_options = {
        "auth_failures_per_ip": 2,
        "auth_failure_delay": 0.05,
        "auth_failure_max_delay": 0.1,
    }

    async def test_refused_after_failures(self) -> None:
        """After 2 failures from 127.0.0.1, even the right key gets 454 4.7.0."""

        def login(key: str) -> tuple[int, bytes]:
            # One AUTH PLAIN (smtplib's login() would go on to try LOGIN).
            with smtplib.SMTP_SSL("localhost", self.port, context=self.context(), timeout=30) as s:
                s.ehlo()
                s.user, s.password = "poststack", key
                try:
                    return s.auth("PLAIN", s.auth_plain)
                except smtplib.SMTPAuthenticationError as e:
                    return e.smtp_code, e.smtp_error

        self.assertEqual((await self.in_thread(login, WRONG_KEY))[0], 535)
        self.assertEqual((await self.in_thread(login, WRONG_KEY + "x"))[0], 535)
        code, text = await self.in_thread(login, FULL_KEY)
        # The reply says when to come back: the window (300 s) from the last failure.
        self.assertEqual(code, 454, text)
        match = re.fullmatch(rb"4\.7\.0 Too many failed logins, try again in (\d+) s", text)
        assert match is not None, text
        self.assertTrue(290 <= int(match.group(1)) <= 300, text)


class APIKeyScopeEndToEndTests(RelayTestCase):
    """An API-key identity's sender rules are the API's."""

    async def test_scoped_key_other_domain(self) -> None:
        """A key scoped to yourdomain.com sending from anotherdomain.com gets 550 5.7.1 naming the domain, with the API's text."""

        def send(sender: str) -> tuple[int, str]:
            with smtplib.SMTP_SSL("localhost", self.port, context=self.context(), timeout=30) as s:
                s.login("poststack", SCOPED_KEY)
                code, text = s.mail(sender)
                assert code == 250, (code, text)
                s.rcpt("user@example.com")
                code, text = s.data(message(sender, "scope"))
                return code, text.decode()

        self.assertEqual(
            await self.in_thread(send, "you@anotherdomain.com"),
            (
                550,
                "5.7.1 Sender address rejected: this API key may not send from anotherdomain.com; use a key "
                "allowed to send from it, or send from a verified domain (PostStack API: API key is not "
                "allowed to send from anotherdomain.com, HTTP 403)",
            ),
        )
        self.assertEqual(self.stored(), [])
        code, _ = await self.in_thread(send, "you@yourdomain.com")
        self.assertEqual(code, 250)
