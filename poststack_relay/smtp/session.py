# -*- test-case-name: tests.test_smtp_session,tests.test_smtp_commands,tests.test_door -*-
"""
The SMTP session and its mail transaction, as a state machine without a
transport: command lines in, replies and requests to its shell out.

A L{Session} is in one of five modes: L{COMMAND} (reading commands),
L{AUTH} (reading SASL continuation lines), L{DATA} (reading message
content), L{WAIT} (a credential check or a delivery is out; input waits)
and L{CLOSED}.  It writes replies through its L{SessionShell} and asks it
for everything that involves time or I/O: checking credentials,
delivering, the transaction timer, closing.  The shell
(L{poststack_relay.smtp.protocol.RelaySMTP}) answers the asynchronous
requests by calling L{Session.login_result}, L{Session.delivered} and
L{Session.resume}.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

from twisted.logger import Logger

from .. import replies
from ..config import RelayConfig
from ..interfaces import IRelayDelivery
from ..metrics import RelayMetrics
from ..replies import Reply
from ..translate import Envelope, MimeScan
from .commands import COMMANDS
from .data import DataScanner
from .sasl import Challenge, Credentials, SASLExchange, Step

# One namespace for the SMTP side's events, as text logs show it
# ("[poststack_relay.smtp#info]"), whichever module logs them.
_log = Logger(namespace="poststack_relay.smtp")

COMMAND = "command"
AUTH = "auth"
DATA = "data"
WAIT = "wait"
CLOSED = "closed"

_START_DATA = b"354 " + replies.START_DATA.text.encode("ascii") + b"\r\n"


class SessionShell(Protocol):
    """What a L{Session} needs from the connection it runs on."""

    #: Send bytes (whole reply lines) to the client: the transport's own
    #: C{write}, so that a reply costs no call more.
    write: Callable[[bytes], None]

    def close(self) -> None:
        """The session said its last reply: end the connection."""

    def transaction_started(self) -> None:
        """C{MAIL} was accepted: start the transaction time limit."""

    def transaction_ended(self) -> None:
        """No transaction is open any more: stop its time limit."""

    def authenticate(self, username: bytes, password: bytes) -> Optional[Reply]:
        """
        Check the credentials and answer with L{Session.login_result} and
        L{Session.resume}; or return the reply refusing them unchecked.
        """

    def deliver(
        self, delivery: IRelayDelivery, envelope: Envelope, raw: bytes, scan: Optional[MimeScan]
    ) -> None:
        """
        Deliver one message (C{scan}: its MIME scan, for a large one);
        answer with L{Session.delivered} and L{Session.resume}.
        """


def _limit_reached(session: "Session") -> Optional[Reply]:
    """
    The C{421} that closes C{session} if it failed AUTH too often, made
    too many errors, or sent too many commands before a login (logged);
    else C{None}.
    """
    config = session.config
    if session.auth_failures >= config.max_auth_failures:
        _log.info(
            "{session} too many authentication failures ({count}) client={client}",
            event="auth_limit",
            session=session.id,
            count=session.auth_failures,
            client=session.client,
        )
        return replies.TOO_MANY_AUTH_FAILURES
    if session.errors > config.max_errors:
        return replies.TOO_MANY_ERRORS
    if 0 < config.max_junk_commands < session.junk:
        _log.info(
            "{session} too many commands ({count}) before AUTH client={client}",
            event="junk_limit",
            session=session.id,
            count=session.junk,
            client=session.client,
        )
        return replies.TOO_MANY_JUNK_COMMANDS
    return None


class Session:
    """
    One SMTP session's state: greeting, login, transaction, limits.

    @ivar mode: L{COMMAND}, L{AUTH}, L{DATA}, L{WAIT} or L{CLOSED}.
    @ivar delivery: the avatar of the login, C{None} before it.
    @ivar mail_from: the sender of the open transaction, or C{None}.
    @ivar smtputf8: the open transaction declared C{SMTPUTF8} (RFC 6531).
    @ivar errors: error replies since the last delivered message.
    @ivar auth_failures: failed logins in this session.
    @ivar junk: commands before a login (C{AUTH} not counted).
    @ivar stopping: the relay is stopping (L{shutdown}): close the session
        as soon as it is between transactions.
    """

    __slots__ = (
        "_ehlo_reply",
        "_helo_reply",
        "_metrics",
        "_sasl",
        "_shell",
        "auth_failures",
        "client",
        "config",
        "delivery",
        "errors",
        "helo",
        "id",
        "junk",
        "mail_from",
        "mode",
        "rcpt_keys",
        "rcpts",
        "scanner",
        "smtputf8",
        "stopping",
    )

    def __init__(
        self,
        shell: SessionShell,
        config: RelayConfig,
        metrics: RelayMetrics,
        helo_reply: bytes,
        ehlo_reply: bytes,
        session_id: str,
    ) -> None:
        self._shell = shell
        self.config = config
        self._metrics = metrics
        self._helo_reply = helo_reply
        self._ehlo_reply = ehlo_reply
        self.id = session_id
        self.client = "?"
        self.mode = COMMAND
        self.errors = 0
        self.auth_failures = 0
        self.junk = 0
        self.helo: Optional[bytes] = None
        self.delivery: Optional[IRelayDelivery] = None
        self.mail_from: Optional[str] = None
        self.rcpts: list[str] = []
        self.rcpt_keys: set[str] = set()
        self.smtputf8 = False
        self._sasl: Optional[SASLExchange] = None
        self.scanner: Optional[DataScanner] = None
        self.stopping = False

    # -- replies and limits ----------------------------------------------

    def reply(self, reply: Reply, error: bool = True) -> None:
        """Send C{reply}; one with a 4xx/5xx code counts as an error unless C{error} is false."""
        if self.mode == CLOSED:
            return
        if reply.code >= 400 and error:
            self.errors += 1
        self._shell.write(reply.line())

    def _send_raw(self, line: bytes) -> None:
        if self.mode != CLOSED:
            self._shell.write(line)

    def _close(self) -> None:
        self.mode = CLOSED
        self._shell.close()

    def _check(self) -> None:
        """
        After a reply: close the session if it made too many errors or
        failed AUTH too often, or if the relay is stopping and the session
        is between transactions.
        """
        if self.mode == CLOSED or self.mode == WAIT:
            # Closed, or a reply is still to come (an API call, or a
            # delayed 535): checked again once it is sent.
            return
        over = _limit_reached(self)
        if over is not None:
            self.reply(over)
            self._close()
        elif self.stopping and self.idle:
            self.say_shutting_down()

    @property
    def idle(self) -> bool:
        """True between transactions: no MAIL given, not in DATA, not waiting."""
        return (self.mode == COMMAND or self.mode == AUTH) and self.mail_from is None

    def shutdown(self) -> None:
        """
        The relay is stopping: close now with C{421 4.3.2} if idle, else as
        soon as the current transaction (and its delivery) is answered.
        """
        self.stopping = True
        if self.idle:
            self.say_shutting_down()

    def deadline_passed(self) -> bool:
        """The drain deadline passed: if still open, whatever it does (even WAIT), say 421 4.3.2 and close."""
        if self.mode != CLOSED:
            _log.info("{session} told 421 at the drain deadline (mode={mode}) client={client}",
                      event="shutdown_deadline", session=self.id, mode=self.mode, client=self.client)
            self.say_shutting_down()
            return True
        return False

    def say_shutting_down(self) -> None:
        """Close with C{421 4.3.2} (the relay is stopping)."""
        self.reply(replies.SHUTTING_DOWN, error=False)
        self._close()

    def timed_out(self) -> None:
        """The client was silent for the idle time-out."""
        if self.mode != CLOSED:
            self.reply(replies.TIMEOUT)
            self._close()

    def transaction_expired(self) -> None:
        """The transaction time limit passed (it is stopped at the final dot)."""
        if self.mode == CLOSED or self.mode == WAIT:
            return
        _log.info(
            "{session} transaction time limit ({limit}s) exceeded in {mode} client={client}",
            event="transaction_timeout",
            session=self.id,
            limit=self.config.transaction_timeout,
            mode=self.mode,
            client=self.client,
        )
        self.reply(replies.TRANSACTION_TIMEOUT)
        self._close()

    def closed(self) -> None:
        """The connection is gone (or dropped): nothing more is said."""
        self.mode = CLOSED
        self.scanner = None

    # -- input -------------------------------------------------------------

    def line_received(self, line: bytes) -> None:
        """One command or SASL line (without its CRLF, within the length limit)."""
        if self.mode == AUTH:
            self._auth_line(line)
        else:
            verb, _, arg = line.strip().partition(b" ")
            verb = verb.upper()
            if self.delivery is None and verb != b"AUTH":
                self.junk += 1  # Postfix's smtpd_junk_command_limit, before AUTH
            if not verb:
                self.reply(replies.BAD_SYNTAX)
            else:
                handler = COMMANDS.get(verb)
                if handler is None:
                    self.reply(replies.UNKNOWN_COMMAND)
                else:
                    handler(self, arg.strip())
        self._check()

    def line_too_long(self, auth: bool = False) -> None:
        """A command line (C{auth}: an C{AUTH} or SASL line, RFC 4954) over the limit was discarded."""
        if self.mode == AUTH:
            self.mode = COMMAND
            self._sasl = None
        self.reply(replies.AUTH_LINE_TOO_LONG if auth else replies.LINE_TOO_LONG)

    def data_received(self, data: bytes) -> Optional[bytes]:
        """Message content; at its end, the input that followed (see L{end_of_data})."""
        assert self.scanner is not None
        return self.scanner.feed(data)

    def end_of_data(self) -> None:
        """The final dot: reply at once if the message is too big, else deliver it."""
        scanner, self.scanner = self.scanner, None
        assert scanner is not None and self.delivery is not None
        mail_from = self.mail_from if self.mail_from is not None else ""
        rcpts = tuple(self.rcpts)
        self.reset_transaction()
        metrics = self._metrics
        metrics.message_size_bytes.observe(scanner.size)
        raw = scanner.message()
        if raw is None:
            metrics.message(replies.MESSAGE_TOO_BIG.code)
            self.mode = COMMAND
            self.reply(replies.message_over_limit(self.config.max_message_size))
            self._check()
            return
        self.mode = WAIT
        self._shell.deliver(self.delivery, Envelope(mail_from, rcpts), raw, scanner.mime)

    # -- answers to the shell's asynchronous steps ---------------------------

    def resume(self, reply: Reply) -> None:
        """A credential check or a delivery finished (or was refused): send its reply and read on; a 421 closes."""
        self.mode = COMMAND
        self.reply(reply)
        if reply.code == 421:
            self._close()
        self._check()

    def login_result(self, delivery: Optional[IRelayDelivery], failed_login: bool) -> None:
        """The credentials were checked: C{delivery} is the avatar, if they were good."""
        if delivery is not None:
            self.delivery = delivery
        if failed_login:
            self.auth_failures += 1

    def delivered(self, reply: Reply) -> None:
        """A delivery's outcome (before L{resume} sends C{reply})."""
        self._metrics.message(reply.code)
        if reply.code == 250:
            # As Postfix: the error count starts again after a delivered message.
            self.errors = 0

    # -- state changes the commands make ---------------------------------------

    def reset_transaction(self) -> None:
        """Forget the open transaction, if any."""
        self.mail_from = None
        self.rcpts = []
        self.rcpt_keys = set()
        self.smtputf8 = False
        self._shell.transaction_ended()

    def greeted(self, name: bytes, extended: bool) -> None:
        """C{EHLO} (or C{HELO}) C{name}: a new session state, with the greeting reply."""
        self.helo = name
        self.reset_transaction()
        self._send_raw(self._ehlo_reply if extended else self._helo_reply)

    def start_auth(self, mechanism: bytes, initial: Optional[bytes]) -> None:
        """C{AUTH mechanism [initial-response]}, the mechanism one of L{MECHANISMS}."""
        self._sasl = SASLExchange(mechanism)
        self._sasl_step(self._sasl.start(initial))

    def _auth_line(self, line: bytes) -> None:
        assert self._sasl is not None
        self.mode = COMMAND
        self._sasl_step(self._sasl.respond(line))

    def _sasl_step(self, step: Step) -> None:
        if isinstance(step, Challenge):
            self.mode = AUTH
            self._send_raw(b"334 " + step.prompt + b"\r\n")
            return
        self._sasl = None
        if isinstance(step, Credentials):
            self.mode = WAIT
            refusal = self._shell.authenticate(step.username, step.password)
            if refusal is not None:
                self.resume(refusal)  # refused unchecked (the throttle, the AUTH rate)
            return
        if step.outcome is not None:
            self._metrics.auth[step.outcome].inc()
        if step.failed_login:
            self.auth_failures += 1
        self.reply(step.reply)

    def open_transaction(self, sender: str, smtputf8: bool = False) -> None:
        """C{MAIL FROM} C{sender} was accepted (with C{SMTPUTF8} if C{smtputf8})."""
        self.mail_from = sender
        self.rcpts = []
        self.rcpt_keys = set()
        self.smtputf8 = smtputf8
        self._shell.transaction_started()
        self.reply(replies.SENDER_OK)

    def start_data(self) -> None:
        """C{DATA} was accepted: read the message content."""
        self.scanner = DataScanner(self.config.max_message_size, self.config.large_message_size)
        self.mode = DATA
        self._send_raw(_START_DATA)

    def quit(self) -> None:
        """C{QUIT}: say goodbye and close."""
        self.reply(replies.CLOSING)
        self._close()
