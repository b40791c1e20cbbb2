# -*- test-case-name: tests.test_smtp_protocol,tests.test_smtp_pipelining,tests.test_smtp_limits,tests.test_shutdown -*-
"""
L{RelaySMTP}: the SMTP server protocol as a thin shell over a
L{Session}.  It owns the bytes and the time: it splits input into lines
(or hands DATA content over in chunks), buffers pipelined input while the
session waits on the API (pausing the transport past a bound), runs the
idle, transaction, linger and AUTH-delay timers, and calls the
authenticator and the delivery avatar, feeding their results back.

Commands are handled strictly in order: while an AUTH check or a delivery
waits on the API, later (pipelined) input is buffered and processed after
the reply is sent, and the idle timer is stopped (the client is silent
because it waits for the relay).
"""

from __future__ import annotations

import itertools
import os
from typing import TYPE_CHECKING, Callable, Optional, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import replies
from ..interfaces import IRelayDelivery
from ..replies import Reply
from ..translate import Envelope, MimeScan
from .login import LoginOutcome
from .session import AUTH, CLOSED, COMMAND, DATA, WAIT, Session

if TYPE_CHECKING:
    from .factory import RelayFactory

# One namespace for the SMTP side's events, as text logs show it
# ("[poststack_relay.smtp#info]"), whichever module logs them.
_log = Logger(namespace="poststack_relay.smtp")

# Longest command line accepted (Postfix: line_length_limit = 2048), and the
# longest AUTH command line and SASL response line (RFC 4954 sections 3 and
# 4: 12288 octets).
MAX_COMMAND_LINE = 2048
MAX_AUTH_LINE = 12288
# Input buffered while waiting on the API before the socket is paused.
MAX_PENDING_INPUT = 1024 * 1024
# Seconds a connection the relay closed may take to go away.  Twisted's TLS
# closes the TCP connection only once the client answers the close_notify
# (or closes itself); a client that does neither is dropped after this.
CLOSE_LINGER = 5.0

_SESSION_PREFIX = os.urandom(3).hex()
_session_ids = itertools.count(1)


def _limit(mode: str, line: bytes) -> int:
    """The longest line allowed: RFC 4954's for an C{AUTH} command (C{line} starts it) or SASL line."""
    if mode == AUTH or line[:16].lstrip()[:5].upper() == b"AUTH ":
        return MAX_AUTH_LINE
    return MAX_COMMAND_LINE


class RelaySMTP(Protocol):
    """
    One SMTP session over an already-encrypted (implicit TLS) transport.

    @ivar state: the session's L{Session} (commands, transaction, limits).
    """

    noisy = False
    factory: RelayFactory
    transport: ITCPTransport  # set before connectionMade, never None after
    #: The transport's C{write} (from connectionMade on): the session writes its replies with it.
    write: Callable[[bytes], None]

    # Slots: idle connections are many (docs/performance.md, S3).
    __slots__ = ("_auth_delay", "_buf", "_idle", "_linger", "_paused", "_processing", "_skip_line",
                 "_started", "_transaction_call", "_tried", "factory", "state", "timeout", "write")

    def __init__(self, factory: "RelayFactory") -> None:
        self.factory = factory
        self.timeout: float = factory.session_timeout()
        self._buf = b""
        self._skip_line = False
        self._paused = False
        self._processing = False
        self._idle: Optional[IDelayedCall] = None
        self._transaction_call: Optional[IDelayedCall] = None
        self._auth_delay: Optional[IDelayedCall] = None
        self._linger: Optional[IDelayedCall] = None
        self._started: Optional[float] = None
        self._tried: Optional[set[bytes]] = None  # digests of failed credentials, from the 1st check
        self.state = Session(self, factory.config, factory.metrics, factory.helo_reply,
                             factory.ehlo_reply, f"{_SESSION_PREFIX}{next(_session_ids):x}")

    @property
    def session(self) -> str:
        """The session's id in the logs."""
        return self.state.id

    @property
    def client(self) -> str:
        """The client's address (C{"?"} before the connection is made)."""
        return self.state.client

    # -- connection and timers ---------------------------------------------
    #
    # Each timer attribute (_idle, _transaction_call, _auth_delay, _linger)
    # is None or a pending call: its callback sets it to None first.

    def connectionMade(self) -> None:
        self._started = self.factory.clock.seconds()
        peer = self.transport.getPeer()
        self.state.client = str(getattr(peer, "host", peer))
        self.set_idle_timer(self.timeout)
        self.write = self.transport.write
        self.transport.write(self.factory.greeting)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.state.closed()
        self.set_idle_timer(None)
        self.transaction_ended()
        self._stop_auth_delay()
        self._stop_linger()
        if self._started is not None:
            self.factory.metrics.session_duration_seconds.observe(self.factory.clock.seconds() - self._started)
            self._started = None
        self.factory.session_closed(self)

    def _stop_auth_delay(self) -> None:
        call, self._auth_delay = self._auth_delay, None
        if call is not None:
            call.cancel()

    def _stop_linger(self) -> None:
        call, self._linger = self._linger, None
        if call is not None:
            call.cancel()

    def set_idle_timer(self, seconds: Optional[float]) -> None:
        """Close the session after C{seconds} without input (C{None}: never)."""
        call = self._idle
        if seconds is None:
            self._idle = None
            if call is not None:
                call.cancel()
        elif call is not None:
            call.reset(seconds)
        else:
            self._idle = self.factory.clock.callLater(seconds, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle = None
        self.state.timed_out()

    def close(self) -> None:
        """L{SessionShell.close}: lose the connection, dropped if it lingers."""
        self.transaction_ended()
        self._stop_auth_delay()
        self.set_idle_timer(None)
        if self._linger is None:
            self._linger = self.factory.clock.callLater(CLOSE_LINGER, self._linger_expired)
        self.transport.loseConnection()

    def _linger_expired(self) -> None:
        self._linger = None
        self.transport.abortConnection()

    def transaction_started(self) -> None:
        """L{SessionShell.transaction_started}: the transaction time limit."""
        self.transaction_ended()
        self._transaction_call = self.factory.clock.callLater(self.factory.config.transaction_timeout, self._transaction_expired)

    def transaction_ended(self) -> None:
        """L{SessionShell.transaction_ended}."""
        call, self._transaction_call = self._transaction_call, None
        if call is not None:
            call.cancel()

    def _transaction_expired(self) -> None:
        self._transaction_call = None
        self.state.transaction_expired()

    # -- shutdown ----------------------------------------------------------

    @property
    def idle(self) -> bool:
        """
        True between transactions: no MAIL given, not in DATA, not waiting
        on the API.  Only then may a stopping relay close the session.
        """
        return self.state.idle

    def shutdown(self) -> None:
        """
        The relay is stopping: close the session now with C{421 4.3.2} if
        it is idle; otherwise it is closed the same way as soon as its
        current transaction (and any delivery of it) is answered.
        """
        self.state.shutdown()

    def deadline_passed(self) -> bool:
        """The drain deadline passed: L{Session.deadline_passed}."""
        return self.state.deadline_passed()

    def abort(self) -> None:
        """Drop the connection (it is still there after its last reply, or the drain's)."""
        state = self.state
        if state.mode != CLOSED:
            _log.info("{session} aborted by shutdown (mode={mode}) client={client}", event="shutdown_abort",
                      session=state.id, mode=state.mode, client=state.client)
        state.closed()
        self.transaction_ended()
        self._stop_auth_delay()
        self._stop_linger()
        self.set_idle_timer(None)
        self.transport.abortConnection()

    # -- input -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        mode = self.state.mode
        if mode == CLOSED:
            return
        if self._idle is not None:
            self._idle.reset(self.timeout)
        self._buf = self._buf + data if self._buf else data
        if mode == WAIT:
            if len(self._buf) > MAX_PENDING_INPUT and not self._paused:
                self._paused = True
                cast(IPushProducer, self.transport).pauseProducing()
            return
        self._process()

    def _process(self) -> None:
        if self._processing:
            # Called back synchronously from inside the loop (an AUTH check
            # or a delivery that answered at once): the loop goes on.
            return
        self._processing = True
        try:
            self._process_buffer()
        finally:
            self._processing = False
        mode = self.state.mode
        if mode != WAIT and mode != CLOSED and self._paused:
            self._paused = False
            cast(IPushProducer, self.transport).resumeProducing()

    def _process_buffer(self) -> None:
        state = self.state
        while self._buf:
            mode = state.mode
            if mode == DATA:
                data, self._buf = self._buf, b""
                rest = state.data_received(data)
                if rest is not None:
                    self._buf = rest + self._buf
                    state.end_of_data()
                continue
            if mode != COMMAND and mode != AUTH:
                return
            # Whole lines are taken by offset and the buffer is cut once,
            # so a long pipelined batch costs linear, not quadratic, time.
            buf, self._buf = self._buf, b""
            pos = self._take_lines(buf)
            rest = buf[pos:] if pos else buf
            self._buf = rest + self._buf if self._buf else rest
            mode = state.mode
            if (mode == COMMAND or mode == AUTH) and b"\n" not in self._buf:
                limit = _limit(mode, self._buf)
                # A line of exactly `limit` octets may be waiting for its LF.
                if len(self._buf) > limit + 1:
                    self._buf = b""
                    if not self._skip_line:
                        self._skip_line = True
                        state.line_too_long(limit == MAX_AUTH_LINE)
                return

    def _take_lines(self, buf: bytes) -> int:
        """
        Hand the complete lines of C{buf} to the session while it reads
        commands or SASL lines; the offset of the first octet not handled.
        """
        state = self.state
        pos = 0
        while state.mode == COMMAND or state.mode == AUTH:
            i = buf.find(b"\n", pos)
            if i < 0:
                break
            line = buf[pos:i]
            pos = i + 1
            if self._skip_line:
                self._skip_line = False
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > MAX_COMMAND_LINE and len(line) > (limit := _limit(state.mode, line)):
                state.line_too_long(limit == MAX_AUTH_LINE)
                continue
            state.line_received(line)
        return pos

    def _resume(self, reply: Reply) -> None:
        """An asynchronous step finished: reply, then go on with buffered input."""
        if self.state.mode == CLOSED:
            return
        self.set_idle_timer(self.timeout)
        self.state.resume(reply)
        self._process()

    # -- the session's asynchronous requests ---------------------------------

    def authenticate(self, username: bytes, password: bytes) -> Optional[Reply]:
        """L{SessionShell.authenticate}: through the factory's L{Authenticator}."""
        tried = self._tried = self._tried if self._tried is not None else set()
        result = self.factory.authenticator.login(username, password, self.state.id, self.state.client, tried)
        if isinstance(result, Reply):
            return result
        self.set_idle_timer(None)
        result.addCallback(self._authenticated)
        return None

    def _authenticated(self, outcome: LoginOutcome) -> None:
        self.state.login_result(outcome.delivery, outcome.failed_login)
        if outcome.delay > 0 and self.state.mode == WAIT:
            # The reply waits; the session stays in WAIT meanwhile (input
            # is buffered, the idle timer stays stopped).
            self._auth_delay = self.factory.clock.callLater(outcome.delay, self._delayed_reply, outcome.reply)
        else:
            self._resume(outcome.reply)

    def _delayed_reply(self, reply: Reply) -> None:
        self._auth_delay = None
        self._resume(reply)

    def deliver(
        self, delivery: IRelayDelivery, envelope: Envelope, raw: bytes, scan: Optional[MimeScan]
    ) -> None:
        """L{SessionShell.deliver}: the avatar's delivery, its reply fed back."""
        self.set_idle_timer(None)
        state = self.state
        d: Deferred[Reply]
        if scan is None:
            d = delivery.deliver(envelope, raw, state.id, state.client)
        else:
            d = delivery.deliver(envelope, raw, state.id, state.client, scan=scan)
        # addCallbacks, not addCallback + addErrback: an error in commands
        # pipelined after the dot (run from _delivered) must not produce a
        # second reply for the message.
        d.addCallbacks(self._delivered, self._delivery_crashed)

    def _delivered(self, reply: Reply) -> None:
        self.state.delivered(reply)
        self._resume(reply)

    def _delivery_crashed(self, failure: Failure) -> None:
        _log.failure("delivery crashed", failure, event="delivery_crash", session=self.state.id)
        self.state.delivered(replies.LOCAL_ERROR)
        self._resume(replies.LOCAL_ERROR)

