# -*- test-case-name: tests.test_smtp_session -*-
"""
The SMTP session state machine (L{poststack_relay.smtp.session}) without a
transport: command lines in, replies and requests to a recording shell out,
the shell's answers fed back by hand.
"""

from __future__ import annotations

import base64
from typing import Any, Optional

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from poststack_relay import replies
from poststack_relay.config import RelayConfig
from poststack_relay.interfaces import IRelayDelivery
from poststack_relay.metrics import RelayMetrics
from poststack_relay.replies import Reply
from poststack_relay.smtp.session import AUTH, CLOSED, COMMAND, DATA, WAIT, Session
from poststack_relay.translate import Envelope, MimeScan

HELO_REPLY = b"250 relay.test\r\n"
EHLO_REPLY = b"250-relay.test\r\n250 PIPELINING\r\n"
PLAIN = b"AUTH PLAIN " + base64.b64encode(b"\0poststack\0sk_key")


@implementer(IRelayDelivery)
class FakeDelivery:
    """An avatar whose sender check answers C{rejection}; deliveries go through the shell."""

    identity = None

    def __init__(self, rejection: Optional[Reply] = None) -> None:
        self.rejection = rejection
        self.checked: list[str] = []

    def validate_sender(self, address: str, session: str = "-", client: str = "-") -> Optional[Reply]:
        self.checked.append(address)
        return self.rejection

    def deliver(self, envelope: Envelope, raw: bytes, session: str, client: str) -> Any:
        raise AssertionError("the session asks its shell to deliver")


class RecordingShell:
    """A L{SessionShell} that records each request; C{refusal} answers authenticate()."""

    def __init__(self) -> None:
        self.refusal: Optional[Reply] = None
        self.calls: list[tuple[Any, ...]] = []

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def close(self) -> None:
        self.calls.append(("close",))

    def transaction_started(self) -> None:
        self.calls.append(("transaction_started",))

    def transaction_ended(self) -> None:
        self.calls.append(("transaction_ended",))

    def authenticate(self, username: bytes, password: bytes) -> Optional[Reply]:
        self.calls.append(("authenticate", username, password))
        return self.refusal

    def deliver(
        self, delivery: IRelayDelivery, envelope: Envelope, raw: bytes, scan: Optional[MimeScan]
    ) -> None:
        self.calls.append(("deliver", envelope, raw))

    def take(self) -> list[tuple[Any, ...]]:
        """The calls since the last take()."""
        calls, self.calls = self.calls, []
        return calls

    def written(self) -> list[bytes]:
        """The reply lines written since the last take(), and forget all calls."""
        return b"".join(c[1] for c in self.take() if c[0] == "write").split(b"\r\n")[:-1]


def line(reply: Reply) -> bytes:
    return reply.line()[:-2]


class SessionTestCase(SynchronousTestCase):
    def make(self, **config: Any) -> tuple[Session, RecordingShell]:
        cfg = RelayConfig(
            metrics_listen="off", tls_cert="unused.pem", hostname="relay.test", service_key="sk_test_service", **config
        )
        shell = RecordingShell()
        self.metrics = RelayMetrics()
        session = Session(shell, cfg, self.metrics, HELO_REPLY, EHLO_REPLY, "s1")
        return session, shell

    def logged_in(self, **config: Any) -> tuple[Session, RecordingShell, FakeDelivery]:
        """A session after EHLO and a good AUTH PLAIN."""
        session, shell = self.make(**config)
        session.line_received(b"EHLO c")
        session.line_received(PLAIN)
        delivery = FakeDelivery()
        session.login_result(delivery, failed_login=False)
        session.resume(replies.AUTH_OK)
        shell.take()
        return session, shell, delivery

    def metric(self, name: str, **labels: str) -> Optional[float]:
        return self.metrics.registry.get_sample_value("poststack_relay_" + name, labels)


class GreetingTests(SessionTestCase):
    def test_ehlo_and_helo(self) -> None:
        """EHLO and HELO answer with the ready-made replies and end any transaction."""
        session, shell = self.make()
        session.line_received(b"EHLO client.test")
        self.assertEqual(shell.take(), [("transaction_ended",), ("write", EHLO_REPLY)])
        session.line_received(b"helo client.test")
        self.assertEqual(shell.take(), [("transaction_ended",), ("write", HELO_REPLY)])
        self.assertEqual(session.helo, b"client.test")

    def test_unknown_and_empty(self) -> None:
        """An unknown verb and an empty line are errors; the session goes on."""
        session, shell = self.make()
        session.line_received(b"FOO bar")
        session.line_received(b"   ")
        self.assertEqual(shell.written(), [line(replies.UNKNOWN_COMMAND), line(replies.BAD_SYNTAX)])
        self.assertEqual((session.errors, session.mode), (2, COMMAND))


class AuthTests(SessionTestCase):
    def test_plain(self) -> None:
        """AUTH PLAIN asks the shell to check the credentials and waits; the answer logs in and replies 235."""
        session, shell = self.make()
        session.line_received(b"EHLO c")
        shell.take()
        session.line_received(PLAIN)
        self.assertEqual(shell.take(), [("authenticate", b"poststack", b"sk_key")])
        self.assertEqual(session.mode, WAIT)
        self.assertFalse(session.idle)
        delivery = FakeDelivery()
        session.login_result(delivery, failed_login=False)
        session.resume(replies.AUTH_OK)
        self.assertEqual(shell.written(), [line(replies.AUTH_OK)])
        self.assertIs(session.delivery, delivery)
        self.assertEqual(session.mode, COMMAND)

    def test_refused_unchecked(self) -> None:
        """A login the shell refuses at once (the throttle) is answered at once, counted as an error, and leaves no wait."""
        session, shell = self.make()
        shell.refusal = replies.auth_throttled(30)
        session.line_received(b"EHLO c")
        shell.take()
        session.line_received(PLAIN)
        self.assertEqual(shell.take()[1:], [("write", replies.auth_throttled(30).line())])
        self.assertEqual((session.mode, session.errors, session.delivery), (COMMAND, 1, None))

    def test_refused_with_421_closes(self) -> None:
        """A login refused at once with 421 (the AUTH rate) closes the session after the reply."""
        session, shell = self.make()
        shell.refusal = replies.auth_rate_limited(12)
        session.line_received(b"EHLO c")
        shell.take()
        session.line_received(PLAIN)
        self.assertEqual(shell.take()[1:], [("write", replies.auth_rate_limited(12).line()), ("close",)])
        self.assertEqual(session.mode, CLOSED)

    def test_login_exchange(self) -> None:
        """AUTH LOGIN reads two continuation lines in AUTH mode, then asks for the check."""
        session, shell = self.make()
        session.line_received(b"EHLO c")
        shell.take()
        session.line_received(b"AUTH LOGIN")
        self.assertEqual((session.mode, shell.written()), (AUTH, [b"334 VXNlcm5hbWU6"]))
        self.assertTrue(session.idle)
        session.line_received(base64.b64encode(b"alice@yourdomain.com"))
        self.assertEqual((session.mode, shell.written()), (AUTH, [b"334 UGFzc3dvcmQ6"]))
        session.line_received(base64.b64encode(b"mbpass"))
        self.assertEqual(shell.take(), [("authenticate", b"alice@yourdomain.com", b"mbpass")])

    def test_line_too_long_ends_the_exchange(self) -> None:
        """An overlong SASL line ends the exchange with 500 5.5.2."""
        session, shell = self.make()
        session.line_received(b"EHLO c")
        session.line_received(b"AUTH PLAIN")
        shell.take()
        session.line_too_long()
        self.assertEqual((session.mode, shell.written()), (COMMAND, [line(replies.LINE_TOO_LONG)]))

    def test_malformed_is_counted(self) -> None:
        """A malformed response is answered and counted as malformed, not as a failed login."""
        session, shell = self.make()
        session.line_received(b"EHLO c")
        session.line_received(b"AUTH PLAIN !!")
        self.assertEqual(shell.written()[-1], line(replies.AUTH_BAD_BASE64))
        self.assertEqual((session.auth_failures, self.metric("auth_total", result="malformed")), (0, 1.0))

    def test_failures_close(self) -> None:
        """The third failed login (a wrong authzid counts) closes the session with 421 4.7.0."""
        session, shell = self.make(max_auth_failures=3)
        session.line_received(b"EHLO c")
        shell.take()
        for _ in range(2):
            session.line_received(PLAIN)
            session.login_result(None, failed_login=True)
            session.resume(replies.AUTH_FAILED)
        self.assertEqual(session.mode, COMMAND)
        session.line_received(b"AUTH PLAIN " + base64.b64encode(b"admin\0u\0p"))
        self.assertEqual(shell.written()[-2:], [line(replies.AUTH_AUTHZID), line(replies.TOO_MANY_AUTH_FAILURES)])
        self.assertEqual(session.mode, CLOSED)

    def test_auth_refused_states(self) -> None:
        """AUTH before EHLO, after a login, with bad syntax or an unknown mechanism gets its 5xx."""
        session, shell = self.make()
        session.line_received(b"AUTH PLAIN")
        session.line_received(b"EHLO c")
        session.line_received(b"AUTH")
        session.line_received(b"AUTH PLAIN a b")
        session.line_received(b"AUTH CRAM-MD5")
        self.assertEqual(
            [reply for reply in shell.written() if not reply.startswith(b"250")],
            [line(r) for r in (replies.SEND_HELO_FIRST, replies.AUTH_SYNTAX, replies.AUTH_SYNTAX, replies.AUTH_UNKNOWN_MECHANISM)],
        )
        session, shell, _ = self.logged_in()
        session.line_received(PLAIN)
        self.assertEqual(shell.written(), [line(replies.AUTH_ALREADY)])


class TransactionTests(SessionTestCase):
    def test_mail_needs_login(self) -> None:
        """MAIL, RCPT and DATA before AUTH are 530."""
        session, shell = self.make()
        for command in (b"MAIL FROM:<a@b.com>", b"RCPT TO:<a@b.com>", b"DATA"):
            session.line_received(command)
        self.assertEqual(shell.written(), [line(replies.AUTH_REQUIRED)] * 3)

    def test_whole_transaction(self) -> None:
        """MAIL starts the transaction timer, RCPT collects recipients, DATA reads content, the dot asks for delivery."""
        session, shell, delivery = self.logged_in()
        session.line_received(b"MAIL FROM:<you@yourdomain.com>")
        self.assertEqual(shell.take(), [("transaction_started",), ("write", replies.SENDER_OK.line())])
        self.assertEqual(delivery.checked, ["you@yourdomain.com"])
        self.assertFalse(session.idle)
        session.line_received(b"RCPT TO:<a@example.com>")
        session.line_received(b"RCPT TO:<A@Example.com>")
        session.line_received(b"RCPT TO:<b@example.com>")
        session.line_received(b"DATA")
        self.assertEqual(shell.written()[-1], b"354 End data with <CR><LF>.<CR><LF>")
        self.assertEqual(session.mode, DATA)
        self.assertEqual(session.data_received(b"Subject: x\r\n\r\n..hi\r\n.\r\nQUIT\r\n"), b"QUIT\r\n")
        session.end_of_data()
        self.assertEqual(
            shell.take(),
            [
                ("transaction_ended",),
                ("deliver", Envelope("you@yourdomain.com", ("a@example.com", "b@example.com")), b"Subject: x\r\n\r\n.hi\r\n"),
            ],
        )
        self.assertEqual((session.mode, session.mail_from, session.scanner), (WAIT, None, None))
        session.delivered(Reply(250, "2.0.0", "Ok: queued as em_1"))
        session.resume(Reply(250, "2.0.0", "Ok: queued as em_1"))
        self.assertEqual(shell.written(), [b"250 2.0.0 Ok: queued as em_1"])
        self.assertEqual(self.metric("messages_total", code="250"), 1.0)
        self.assertTrue(session.idle)

    def test_sender_policy_is_the_avatars(self) -> None:
        """A sender the avatar refuses gets the avatar's reply and opens no transaction."""
        session, shell, delivery = self.logged_in()
        delivery.rejection = replies.SENDER_NOT_OWNED
        session.line_received(b"MAIL FROM:<other@yourdomain.com>")
        self.assertEqual(shell.take(), [("write", replies.SENDER_NOT_OWNED.line())])
        self.assertIsNone(session.mail_from)

    def test_syntax_checked_before_policy(self) -> None:
        """A MAIL that is bad SMTP syntax is refused without asking the avatar; an address without a domain is the avatar's (policy) to refuse."""
        session, shell, delivery = self.logged_in()
        session.line_received(b"MAIL FROM:<a@b.com> FOO=1")
        session.line_received(b"MAIL FROM:<a@b.com")
        self.assertEqual(delivery.checked, [])
        session.line_received(b"MAIL FROM:<you>")
        self.assertEqual(delivery.checked, ["you"])
        self.assertEqual(
            shell.written(),
            [line(replies.UNSUPPORTED_PARAMETER.with_text("Unsupported option: FOO")), line(replies.MAIL_SYNTAX),
             line(replies.SENDER_OK)],
        )

    def test_recipient_limit_is_not_an_error(self) -> None:
        """Past max_recipients RCPT gets 452 4.5.3, which does not count as an error."""
        session, shell, _ = self.logged_in(max_recipients=1)
        session.line_received(b"MAIL FROM:<you@yourdomain.com>")
        session.line_received(b"RCPT TO:<a@example.com>")
        shell.take()
        session.line_received(b"RCPT TO:<b@example.com>")
        self.assertEqual(shell.written(), [b"452 4.5.3 Error: too many recipients (at most 1 per message)"])
        self.assertEqual((session.errors, session.rcpts), (0, ["a@example.com"]))

    def test_too_big(self) -> None:
        """A message over the size limit is answered at the dot with 552 5.3.4 and never delivered."""
        session, shell, _ = self.logged_in(max_message_size=10)
        for command in (b"MAIL FROM:<you@yourdomain.com>", b"RCPT TO:<a@example.com>", b"DATA"):
            session.line_received(command)
        shell.take()
        self.assertEqual(session.data_received(b"x" * 100 + b"\r\n.\r\n"), b"")
        session.end_of_data()
        calls = shell.take()
        self.assertNotIn("deliver", [c[0] for c in calls])
        self.assertEqual(calls[-1], ("write", b"552 5.3.4 Message size exceeds fixed maximum message size of 10 octets\r\n"))
        self.assertEqual((session.mode, session.errors), (COMMAND, 1))

    def test_rset(self) -> None:
        """RSET ends the transaction (and its timer) and answers 250."""
        session, shell, _ = self.logged_in()
        session.line_received(b"MAIL FROM:<you@yourdomain.com>")
        shell.take()
        session.line_received(b"RSET")
        self.assertEqual(shell.take(), [("transaction_ended",), ("write", replies.OK.line())])
        self.assertTrue(session.idle)


class LimitTests(SessionTestCase):
    def test_errors_close(self) -> None:
        """One error more than max_errors closes the session with 421 4.7.0."""
        session, shell = self.make(max_errors=2)
        for _ in range(2):
            session.line_received(b"BOGUS")
        self.assertEqual(session.mode, COMMAND)
        session.line_received(b"BOGUS")
        self.assertEqual(shell.written(), [line(replies.UNKNOWN_COMMAND)] * 3 + [line(replies.TOO_MANY_ERRORS)])
        self.assertEqual(session.mode, CLOSED)

    def test_delivered_message_resets_errors(self) -> None:
        """A 250 for a message resets the error count; another reply does not."""
        session, _, _ = self.logged_in()
        session.errors = 5
        session.delivered(Reply(451, "4.3.0", "later"))
        self.assertEqual(session.errors, 5)
        session.delivered(Reply(250, "2.0.0", "Ok"))
        self.assertEqual(session.errors, 0)

    def test_stopping_closes_between_transactions(self) -> None:
        """Told the relay stops inside a transaction, a session says nothing until the transaction ends, then closes with 421 4.3.2."""
        session, shell, _ = self.logged_in()
        session.line_received(b"MAIL FROM:<you@yourdomain.com>")
        shell.take()
        session.shutdown()
        self.assertEqual(shell.take(), [])
        session.line_received(b"RCPT TO:<a@example.com>")
        self.assertEqual(session.mode, COMMAND)
        session.line_received(b"RSET")
        self.assertEqual(shell.take()[-2:], [("write", line(replies.SHUTTING_DOWN) + b"\r\n"), ("close",)])
        self.assertEqual(session.mode, CLOSED)

    def test_shutdown_when_idle(self) -> None:
        """Told the relay stops between transactions (mid-AUTH exchange too), a session closes at once."""
        session, shell = self.make()
        session.line_received(b"EHLO c")
        session.line_received(b"AUTH LOGIN")
        shell.take()
        session.shutdown()
        self.assertEqual(shell.take(), [("write", replies.SHUTTING_DOWN.line()), ("close",)])

    def test_timers(self) -> None:
        """The idle time-out closes with 421 4.4.2; the transaction limit does so too, except while waiting on the API."""
        session, shell = self.make()
        session.timed_out()
        self.assertEqual(shell.take(), [("write", replies.TIMEOUT.line()), ("close",)])
        session.timed_out()
        self.assertEqual(shell.take(), [])
        session, shell = self.make()
        session.mode = WAIT
        session.transaction_expired()
        self.assertEqual(shell.take(), [])
        session.mode = DATA
        session.transaction_expired()
        self.assertEqual(shell.take(), [("write", replies.TRANSACTION_TIMEOUT.line()), ("close",)])

    def test_nothing_said_when_closed(self) -> None:
        """After QUIT (or a lost connection) nothing more is written."""
        session, shell = self.make()
        session.line_received(b"QUIT")
        self.assertEqual(shell.take(), [("write", replies.CLOSING.line()), ("close",)])
        session.reply(replies.OK)
        session.say_shutting_down()
        self.assertEqual(shell.take(), [("close",)])
        session, shell = self.make()
        session.closed()
        session.reply(replies.OK)
        self.assertEqual((session.mode, shell.take()), (CLOSED, []))
