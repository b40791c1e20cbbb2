# -*- test-case-name: tests.test_smtp,tests.test_smtp_review,tests.test_limits,tests.test_shutdown,tests.test_auth_throttle,tests.test_senders,tests.test_metrics -*-
"""
The SMTP side: an ESMTP submission server that only relays for
authenticated users, one transaction at a time, with exact replies.

L{RelaySMTP} subclasses Twisted's C{ESMTP} but replaces its command loop,
because Twisted's (see docs/design.md):

  - builds one message object per recipient and answers C{250 Delivery in
    progress} or C{550} by itself, where the relay needs one API call per
    transaction and the API's own outcome in the reply;
  - has no enhanced status codes, answers malformed AUTH with an exception,
    and tries an anonymous login when nobody authenticated;
  - feeds DATA line by line through Python, where the relay scans chunks
    for the one terminator RFC 5321 allows (C{<CRLF>.<CRLF>}).

Commands are handled strictly in order: while an AUTH check or a delivery
waits on the API, later (pipelined) input is buffered and processed after
the reply is sent, and the idle timer is stopped (the client is silent
because it waits for the relay).

In the message content a bare LF is normalised to CRLF; a lone CR is
data.  Neither ever ends DATA (see docs/design.md, "SMTP smuggling").

L{RelayFactory} enforces the per-relay limits (connections in total and
per client address) and keeps the set of live sessions, which
L{RelayFactory.drain} uses for a graceful shutdown.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import os
import re
from typing import Any, Callable, Optional

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.mail import smtp

from . import replies
from .addresses import has_domain as _has_domain
from .addresses import path_problem
from .auth import AuthThrottle, AuthUnavailable, throttle_user_key
from .config import RelayConfig
from .delivery import IRelayDelivery
from .metrics import RelayMetrics
from .replies import Reply
from .translate import Envelope

_log = Logger()

# Longest command line accepted (Postfix: line_length_limit = 2048), and the
# longest SASL response line (RFC 4954 section 4: 12288 octets).
MAX_COMMAND_LINE = 2048
MAX_AUTH_LINE = 12288
# Input buffered while waiting on the API before the socket is paused.
MAX_PENDING_INPUT = 1024 * 1024
# A partial DATA line held back while looking for the terminator.
DATA_HOLD_LIMIT = 65536

_TERMINATOR = b"\r\n.\r\n"
# A LF not preceded by a CR, in message content.
_BARE_LF = re.compile(rb"(?<!\r)\n")
# Seconds a refused connection may take to receive its 421 (the TLS
# handshake comes first) before it is dropped.
REFUSAL_LINGER = 10.0
# Seconds a connection the relay closed may take to go away.  Twisted's TLS
# closes the TCP connection only once the client answers the close_notify
# (or closes itself); a client that does neither is dropped after this.
CLOSE_LINGER = 5.0

_PATH = rb"<(?P<path>[^<>]*)>|(?P<bare>[^\s<>]+)"
_MAIL_RE = re.compile(rb"FROM:\s*(?:" + _PATH + rb")(?P<params>(?:\s+\S+)*)\s*$", re.I)
_RCPT_RE = re.compile(rb"TO:\s*(?:" + _PATH + rb")(?P<params>(?:\s+\S+)*)\s*$", re.I)
_ROUTE_RE = re.compile(r"^@[^:]*:")
_SESSION_PREFIX = os.urandom(3).hex()
_session_ids = itertools.count(1)

_CHALLENGE_USERNAME = base64.b64encode(b"Username:")
_CHALLENGE_PASSWORD = base64.b64encode(b"Password:")

# Modes of the command loop.
_COMMAND = "command"
_AUTH = "auth"
_DATA = "data"
_WAIT = "wait"
_CLOSED = "closed"


def _b64decode(data: bytes) -> Optional[bytes]:
    if data == b"=":  # RFC 4954: an empty initial response
        return b""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


def parse_path(match: "re.Match[bytes]") -> Optional[str]:
    """
    The address of a MAIL/RCPT path: angle brackets and source routes
    removed, C{""} for C{<>}; C{None} if it is not UTF-8.
    """
    raw = match.group("path")
    if raw is None:
        raw = match.group("bare")
    try:
        address = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    return _ROUTE_RE.sub("", address)


def _raw_path(match: "re.Match[bytes]") -> bytes:
    raw = match.group("path")
    return raw if raw is not None else match.group("bare")


def _has_comment(params: bytes) -> bool:
    """
    Does the text after a path hold an RFC 5322 comment (which SMTP
    paths do not allow), e.g. C{MAIL FROM:<a@b.com> (me)}?
    """
    return any(token.startswith(b"(") for token in params.split())


class RelaySMTP(smtp.ESMTP):
    """
    One SMTP session over an already-encrypted (implicit TLS) transport.
    """

    noisy = False
    factory: "RelayFactory"

    # The session's own state lives in slots: with them the instance
    # dictionary keeps only Twisted's ~17 attributes (a small key-sharing
    # dictionary) instead of 42 (a 1.6 KB one): 1.3 KB less per connection,
    # which idle connections multiply (docs/performance.md, S3).
    __slots__ = (
        "_at_line_start",
        "_auth_delay",
        "_auth_failures",
        "_auth_step",
        "_auth_user",
        "_buf",
        "_chunks",
        "_delivery",
        "_errors",
        "_held",
        "_helo",
        "_linger",
        "_mail_from",
        "_mode",
        "_paused",
        "_processing",
        "_rcpt_keys",
        "_rcpts",
        "_size",
        "_skip_line",
        "_started",
        "_too_big",
        "_transaction_call",
        "client",
        "session",
    )

    def __init__(self, factory: "RelayFactory") -> None:
        smtp.ESMTP.__init__(self, chal={}, contextFactory=None)
        self.factory = factory
        self.portal = factory.portal
        self.host = factory.config.hostname.encode("ascii", "replace")
        self.timeout = factory.config.idle_timeout
        self._mode = _COMMAND
        self._buf = b""
        self._skip_line = False
        self._paused = False
        self._processing = False
        self._errors = 0
        self._auth_failures = 0
        self._transaction_call: Optional[IDelayedCall] = None
        self._auth_delay: Optional[IDelayedCall] = None
        self._linger: Optional[IDelayedCall] = None
        self._helo: Optional[bytes] = None
        self._delivery: Optional[Any] = None
        self._mail_from: Optional[str] = None
        self._rcpts: list[str] = []
        self._rcpt_keys: set[str] = set()
        self._auth_step: Optional[Callable[[bytes], None]] = None
        self._auth_user: Optional[bytes] = None
        self.session = f"{_SESSION_PREFIX}{next(_session_ids):x}"
        self.client = "?"
        self._started: Optional[float] = None
        self._reset_data()

    # -- connection -----------------------------------------------------

    def connectionMade(self) -> None:
        self._started = self.factory.clock.seconds()
        peer = self.transport.getPeer()
        self.client = str(getattr(peer, "host", peer))
        self.setTimeout(self.timeout)
        self.transport.write(b"220 " + self.host + b" ESMTP PostStack relay\r\n")

    def connectionLost(self, reason: Any = None) -> None:
        self._mode = _CLOSED
        self.setTimeout(None)
        self._stop_transaction_timer()
        self._stop_auth_delay()
        self._stop_linger()
        self._chunks = []
        if self._started is not None:
            self.factory.metrics.session_duration_seconds.observe(
                self.factory.clock.seconds() - self._started
            )
            self._started = None
        self.factory.session_closed(self)

    def timeoutConnection(self) -> None:
        if self._mode == _CLOSED:
            return
        self._send(replies.TIMEOUT)
        self._close()

    def _close(self) -> None:
        self._mode = _CLOSED
        self._stop_transaction_timer()
        self._stop_auth_delay()
        self.setTimeout(None)
        if self._linger is None:
            self._linger = self.callLater(CLOSE_LINGER, self._linger_expired)
        self.transport.loseConnection()

    def _linger_expired(self) -> None:
        self._linger = None
        self.transport.abortConnection()

    def _stop_linger(self) -> None:
        call, self._linger = self._linger, None
        if call is not None and call.active():
            call.cancel()

    def _stop_auth_delay(self) -> None:
        call, self._auth_delay = self._auth_delay, None
        if call is not None and call.active():
            call.cancel()

    # -- shutdown -------------------------------------------------------

    @property
    def idle(self) -> bool:
        """
        True between transactions: no MAIL given, not in DATA, not waiting
        on the API.  Only then may a stopping relay close the session.
        """
        return self._mode in (_COMMAND, _AUTH) and self._mail_from is None

    def shutdown(self) -> None:
        """
        The relay is stopping: close the session now with C{421 4.3.2} if
        it is idle; otherwise it is closed the same way as soon as its
        current transaction (and any delivery of it) is answered.
        """
        if self.idle:
            self._say_shutting_down()

    def abort(self) -> None:
        """
        Drop the connection without a reply (the drain deadline passed).
        A delivery still pending is never answered: the client retries.
        """
        if self._mode != _CLOSED:
            _log.info(
                "{session} aborted by shutdown (mode={mode}) client={client}",
                event="shutdown_abort",
                session=self.session,
                mode=self._mode,
                client=self.client,
            )
        self._mode = _CLOSED
        self._stop_transaction_timer()
        self._stop_auth_delay()
        self._stop_linger()
        self.setTimeout(None)
        self.transport.abortConnection()

    def _say_shutting_down(self) -> None:
        self._send(replies.SHUTTING_DOWN, error=False)
        self._close()

    # -- transaction time limit ------------------------------------------

    def _start_transaction_timer(self) -> None:
        self._stop_transaction_timer()
        self._transaction_call = self.callLater(
            self.factory.config.transaction_timeout, self._transaction_expired
        )

    def _stop_transaction_timer(self) -> None:
        call, self._transaction_call = self._transaction_call, None
        if call is not None and call.active():
            call.cancel()

    def _transaction_expired(self) -> None:
        self._transaction_call = None
        # The timer stops at the final dot, before the delivery waits on the
        # API, so it never fires while waiting; the guard is for safety.
        if self._mode in (_CLOSED, _WAIT):
            return
        _log.info(
            "{session} transaction time limit ({limit}s) exceeded in {mode} client={client}",
            event="transaction_timeout",
            session=self.session,
            limit=self.factory.config.transaction_timeout,
            mode=self._mode,
            client=self.client,
        )
        self._send(replies.TRANSACTION_TIMEOUT)
        self._close()

    def _send(self, reply: Reply, error: bool = True) -> None:
        if self._mode == _CLOSED:
            return
        if reply.code >= 400 and error:
            self._errors += 1
        self.transport.write(reply.line())

    def _send_raw(self, line: bytes) -> None:
        if self._mode != _CLOSED:
            self.transport.write(line)

    def lineReceived(self, line: bytes) -> None:  # pragma: no cover
        raise NotImplementedError("RelaySMTP parses its own input")

    # -- input ----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._mode == _CLOSED:
            return
        self.resetTimeout()
        self._buf = self._buf + data if self._buf else data
        if self._mode == _WAIT:
            if len(self._buf) > MAX_PENDING_INPUT and not self._paused:
                self._paused = True
                self.transport.pauseProducing()
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
        if self._mode not in (_WAIT, _CLOSED) and self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def _process_buffer(self) -> None:
        while self._buf and self._mode in (_COMMAND, _AUTH, _DATA):
            if self._mode == _DATA:
                data, self._buf = self._buf, b""
                self._data_feed(data)
                continue
            # Whole lines are taken by offset and the buffer is cut once,
            # so a long pipelined batch costs linear, not quadratic, time.
            buf, self._buf = self._buf, b""
            pos = self._take_lines(buf)
            rest = buf[pos:] if pos else buf
            self._buf = rest + self._buf if self._buf else rest
            if self._mode in (_COMMAND, _AUTH) and b"\n" not in self._buf:
                limit = MAX_AUTH_LINE if self._mode == _AUTH else MAX_COMMAND_LINE
                # A line of exactly `limit` octets may be waiting for its LF.
                if len(self._buf) > limit + 1:
                    self._buf = b""
                    if not self._skip_line:
                        self._skip_line = True
                        self._line_too_long()
                return

    def _take_lines(self, buf: bytes) -> int:
        """
        Handle the complete lines of C{buf} while in command or AUTH mode;
        the offset of the first octet not handled.
        """
        pos = 0
        while self._mode in (_COMMAND, _AUTH):
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
            limit = MAX_AUTH_LINE if self._mode == _AUTH else MAX_COMMAND_LINE
            if len(line) > limit:
                self._line_too_long()
                continue
            if self._mode == _AUTH:
                self._auth_line(line)
            else:
                self._command(line)
            self._check_session()
        return pos

    def _check_session(self) -> None:
        """
        After a reply: close the session if it made too many errors or
        failed AUTH too often, or if the relay is stopping and the session
        is between transactions.
        """
        if self._mode in (_CLOSED, _WAIT):
            # Closed, or a reply is still to come (an API call, or a
            # delayed 535): checked again once it is sent.
            return
        config = self.factory.config
        if self._auth_failures >= config.max_auth_failures:
            _log.info(
                "{session} too many authentication failures ({count}) client={client}",
                event="auth_limit",
                session=self.session,
                count=self._auth_failures,
                client=self.client,
            )
            self._send(replies.TOO_MANY_AUTH_FAILURES)
            self._close()
        elif self._errors > config.max_errors:
            self._send(replies.TOO_MANY_ERRORS)
            self._close()
        elif self.factory.stopping and self.idle:
            self._say_shutting_down()

    def _line_too_long(self) -> None:
        if self._mode == _AUTH:
            self._mode = _COMMAND
            self._auth_step = None
        self._send(replies.LINE_TOO_LONG)

    def _wait(self) -> None:
        """
        Wait on the API: buffer input, and stop the idle timer (the client
        is silent because it waits for us).
        """
        self._mode = _WAIT
        self.setTimeout(None)

    def _resume(self, reply: Optional[Reply] = None) -> None:
        """
        An asynchronous step finished: reply, then go on with buffered input.
        """
        if self._mode == _CLOSED:
            return
        self._mode = _COMMAND
        self.setTimeout(self.timeout)
        if reply is not None:
            self._send(reply)
        self._check_session()
        self._process()

    # -- commands -------------------------------------------------------

    def _command(self, line: bytes) -> None:
        verb, _, arg = line.strip().partition(b" ")
        if not verb:
            self._send(replies.BAD_SYNTAX)
            return
        handler = _COMMANDS.get(verb.upper())
        if handler is None:
            self._send(replies.UNKNOWN_COMMAND)
            return
        handler(self, arg.strip())

    def _reset_transaction(self) -> None:
        self._mail_from = None
        self._rcpts = []
        self._rcpt_keys = set()
        self._stop_transaction_timer()

    def cmd_HELO(self, arg: bytes) -> None:
        if not arg:
            self._send(replies.HELO_REQUIRES_DOMAIN.with_text("Syntax: HELO hostname"))
            return
        self._helo = arg
        self._reset_transaction()
        self._send_raw(b"250 " + self.host + b"\r\n")

    def cmd_EHLO(self, arg: bytes) -> None:
        if not arg:
            self._send(replies.HELO_REQUIRES_DOMAIN)
            return
        self._helo = arg
        self._reset_transaction()
        self._send_raw(self.factory.ehlo_reply)

    def cmd_AUTH(self, arg: bytes) -> None:
        if self._helo is None:
            self._send(replies.SEND_HELO_FIRST)
            return
        if self._delivery is not None:
            self._send(replies.AUTH_ALREADY)
            return
        if self._mail_from is not None:
            self._send(replies.AUTH_IN_TRANSACTION)
            return
        parts = arg.split()
        if not parts or len(parts) > 2:
            self._send(replies.AUTH_SYNTAX)
            return
        mechanism = parts[0].upper()
        initial = parts[1] if len(parts) == 2 else None
        if mechanism == b"PLAIN":
            if initial is None:
                self._challenge(b"", self._auth_plain)
            else:
                self._auth_plain(initial)
        elif mechanism == b"LOGIN":
            if initial is None:
                self._challenge(_CHALLENGE_USERNAME, self._auth_login_user)
            else:
                self._auth_login_user(initial)
        else:
            self._send(replies.AUTH_UNKNOWN_MECHANISM)

    def _challenge(self, challenge: bytes, step: Callable[[bytes], None]) -> None:
        self._mode = _AUTH
        self._auth_step = step
        self._send_raw(b"334 " + challenge + b"\r\n")

    def _auth_line(self, line: bytes) -> None:
        step = self._auth_step
        self._mode = _COMMAND
        self._auth_step = None
        if line.strip() == b"*":
            self._send(replies.AUTH_ABORTED)
            return
        assert step is not None
        step(line.strip())

    def _auth_plain(self, response: bytes) -> None:
        decoded = _b64decode(response)
        if decoded is None:
            self.factory.metrics.auth["malformed"].inc()
            self._send(replies.AUTH_BAD_BASE64)
            return
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            self.factory.metrics.auth["malformed"].inc()
            self._send(replies.AUTH_MALFORMED)
            return
        authzid, authcid, password = parts
        if authzid and authzid != authcid:
            self._auth_failures += 1
            self.factory.metrics.auth["invalid"].inc()
            self._send(replies.AUTH_AUTHZID)
            return
        self._login(authcid, password)

    def _auth_login_user(self, response: bytes) -> None:
        decoded = _b64decode(response)
        if decoded is None:
            self.factory.metrics.auth["malformed"].inc()
            self._send(replies.AUTH_BAD_BASE64)
            return
        self._auth_user = decoded
        self._challenge(_CHALLENGE_PASSWORD, self._auth_login_password)

    def _auth_login_password(self, response: bytes) -> None:
        decoded = _b64decode(response)
        if decoded is None:
            self.factory.metrics.auth["malformed"].inc()
            self._send(replies.AUTH_BAD_BASE64)
            return
        user, self._auth_user = self._auth_user or b"", None
        self._login(user, decoded)

    def _login(self, username: bytes, password: bytes) -> None:
        shown = _username_label(username)
        throttle = self.factory.throttle
        user_key = throttle_user_key(username)
        if throttle is not None:
            refusal = throttle.refusal(self.client, user_key)
            if refusal is not None:
                # Refused before the credentials are checked: no API call,
                # and nothing a guesser could learn from.
                _log.info(
                    "{session} auth refused: too many failures for this {reason} "
                    "user={user} client={client}",
                    event="auth_throttled",
                    session=self.session,
                    reason=refusal,
                    user=shown,
                    client=self.client,
                )
                self.factory.metrics.auth["throttled"].inc()
                self._send(replies.AUTH_THROTTLED)
                return
        self._wait()
        d = self.portal.login(UsernamePassword(username, password), None, IRelayDelivery)

        def succeeded(result: Any) -> None:
            _, avatar, _ = result
            self._delivery = avatar
            self.factory.metrics.auth["ok"].inc()
            # The text is made here, braces doubled: one of these per
            # connection, and a ready-made text costs the log little
            # (poststack_relay.logs.classic_text).
            text = f"{self.session} auth ok user={shown} identity={avatar.identity.label} client={self.client}"
            _log.info(
                text.replace("{", "{{").replace("}", "}}"),
                event="auth_ok",
                session=self.session,
                user=shown,
                identity=avatar.identity.label,
                client=self.client,
            )
            self._resume(replies.AUTH_OK)

        def failed(failure: Any) -> None:
            delay = 0.0
            if failure.check(UnauthorizedLogin):
                reply = replies.AUTH_FAILED
                outcome = "invalid"
                self._auth_failures += 1
                if throttle is not None:
                    delay = throttle.failed(self.client, user_key)
            elif failure.check(AuthUnavailable):
                reply = replies.AUTH_UNAVAILABLE
                outcome = "unavailable"
            else:
                _log.failure("credential check crashed", failure, event="auth_crash")
                reply = replies.AUTH_UNAVAILABLE
                outcome = "error"
            self.factory.metrics.auth[outcome].inc()
            _log.info(
                "{session} auth failed ({outcome}) user={user} client={client}",
                event="auth_failed",
                session=self.session,
                outcome=outcome,
                user=shown,
                client=self.client,
                delay=delay,
            )
            if delay > 0 and self._mode == _WAIT:
                # The reply waits; the session stays in WAIT meanwhile
                # (input is buffered, the idle timer stays stopped).
                self._auth_delay = self.callLater(delay, self._delayed_reply, reply)
            else:
                self._resume(reply)

        d.addCallbacks(succeeded, failed)

    def _delayed_reply(self, reply: Reply) -> None:
        self._auth_delay = None
        self._resume(reply)

    def cmd_MAIL(self, arg: bytes) -> None:
        if self._delivery is None:
            self._send(replies.AUTH_REQUIRED)
            return
        if self._mail_from is not None:
            self._send(replies.NESTED_MAIL)
            return
        m = _MAIL_RE.match(arg)
        if m is None:
            self._send(replies.MAIL_SYNTAX)
            return
        address = parse_path(m)
        if address is None:
            self._send(replies.SENDER_BAD_SYNTAX)
            return
        params = m.group("params")
        if _has_comment(params):
            self._send(replies.SENDER_PATH_PROBLEMS["comment"])
            return
        bad = self._mail_params(params)
        if bad is not None:
            self._send(bad)
            return
        problem = path_problem(_raw_path(m), address) if address else None
        if problem is not None:
            self._send(replies.SENDER_PATH_PROBLEMS[problem])
            return
        if address and not _has_domain(address):
            self._send(replies.SENDER_NO_DOMAIN)
            return
        rejection = self._delivery.validate_sender(address)
        if rejection is not None:
            self._send(rejection)
            return
        self._mail_from = address
        self._rcpts = []
        self._rcpt_keys = set()
        self._start_transaction_timer()
        self._send(replies.SENDER_OK)

    def _mail_params(self, params: bytes) -> Optional[Reply]:
        for param in params.split():
            key, _, value = param.partition(b"=")
            key = key.upper()
            if key == b"SIZE":
                if not value.isdigit():
                    return replies.BAD_SIZE_PARAMETER
                if int(value) > self.factory.config.max_message_size:
                    return replies.MESSAGE_TOO_BIG.with_text(
                        "Message size exceeds fixed limit of %d octets"
                        % self.factory.config.max_message_size
                    )
            elif key == b"BODY":
                if value.upper() not in (b"7BIT", b"8BITMIME"):
                    return replies.UNSUPPORTED_PARAMETER.with_text(
                        "Unsupported BODY type: use 7BIT or 8BITMIME"
                    )
            elif key == b"AUTH":
                continue
            else:
                return replies.UNSUPPORTED_PARAMETER.with_text(
                    "Unsupported option: " + key.decode("ascii", "replace")
                )
        return None

    def cmd_RCPT(self, arg: bytes) -> None:
        if self._mail_from is None:
            self._send(replies.NEED_MAIL if self._delivery else replies.AUTH_REQUIRED)
            return
        m = _RCPT_RE.match(arg)
        if m is None:
            self._send(replies.RCPT_SYNTAX)
            return
        address = parse_path(m)
        if address is None:
            self._send(replies.RECIPIENT_BAD_SYNTAX)
            return
        params = m.group("params")
        problem = "comment" if _has_comment(params) else path_problem(_raw_path(m), address)
        if problem is not None:
            self._send(replies.RECIPIENT_PATH_PROBLEMS[problem])
            return
        if not _has_domain(address):
            self._send(replies.RECIPIENT_BAD_SYNTAX)
            return
        for param in params.split():
            key = param.partition(b"=")[0].upper()
            return self._send(
                replies.UNSUPPORTED_PARAMETER.with_text(
                    "Unsupported option: " + key.decode("ascii", "replace")
                )
            )
        key = address.lower()
        if key not in self._rcpt_keys:
            if len(self._rcpts) >= self.factory.config.max_recipients:
                # Not counted as an error (nor by Postfix, below its
                # smtpd_recipient_overshoot_limit): a client that pipelines
                # more RCPTs than allowed still sends to the accepted ones.
                self._send(
                    replies.TOO_MANY_RECIPIENTS.with_text(
                        "Error: too many recipients (at most %d per message)"
                        % self.factory.config.max_recipients
                    ),
                    error=False,
                )
                return
            self._rcpt_keys.add(key)
            self._rcpts.append(address)
        self._send(replies.RECIPIENT_OK)

    def cmd_DATA(self, arg: bytes) -> None:
        if arg:
            self._send(replies.NO_ARGUMENTS)
            return
        if self._mail_from is None:
            self._send(replies.NEED_MAIL if self._delivery else replies.AUTH_REQUIRED)
            return
        if not self._rcpts:
            self._send(replies.NEED_RCPT)
            return
        self._reset_data()
        self._mode = _DATA
        self._send_raw(b"354 End data with <CR><LF>.<CR><LF>\r\n")

    def cmd_BDAT(self, arg: bytes) -> None:
        self._send(replies.NOT_IMPLEMENTED.with_text("Error: BDAT (CHUNKING) is not supported, use DATA"))

    def cmd_RSET(self, arg: bytes) -> None:
        self._reset_transaction()
        self._send(replies.OK)

    def cmd_NOOP(self, arg: bytes) -> None:
        self._send(replies.OK)

    def cmd_QUIT(self, arg: bytes) -> None:
        self._send(replies.CLOSING)
        self._close()

    def cmd_HELP(self, arg: bytes) -> None:
        self._send(replies.HELP)

    def cmd_VRFY(self, arg: bytes) -> None:
        self._send(replies.VRFY_DISABLED)

    def cmd_EXPN(self, arg: bytes) -> None:
        self._send(replies.VRFY_DISABLED.with_text("EXPN command is disabled"))

    def cmd_STARTTLS(self, arg: bytes) -> None:
        self._send(replies.TLS_ALREADY_ACTIVE)

    # -- DATA -----------------------------------------------------------

    def _reset_data(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._too_big = False
        self._held = b""
        self._at_line_start = True

    def _data_feed(self, data: bytes) -> None:
        """
        Take DATA input; on the terminator, start the delivery and leave
        what followed it in the input buffer.
        """
        if self._held:
            data = self._held + data
            self._held = b""
        prefixed = self._at_line_start
        probe = b"\r\n" + data if prefixed else data
        i = probe.find(_TERMINATOR)
        if i >= 0:
            self._emit(probe[: i + 2], prefixed)
            self._buf = probe[i + 5 :] + self._buf
            self._end_of_data()
            return
        j = probe.rfind(b"\r\n")
        if j >= (2 if prefixed else 0) and j + 2 > (2 if prefixed else 0):
            self._emit(probe[: j + 2], prefixed)
            self._at_line_start = True
            self._held = probe[j + 2 :]
        else:
            self._held = data
        if len(self._held) > DATA_HOLD_LIMIT:
            # An overlong line: pass all but its last byte (which may be
            # the CR of the terminator) on as mid-line content.
            held, self._held = self._held, self._held[-1:]
            if self._at_line_start:
                self._emit(b"\r\n" + held[:-1], True)
            else:
                self._emit(held[:-1], False)
            self._at_line_start = False

    def _emit(self, segment: bytes, prefixed: bool) -> None:
        """
        Take one scanned piece of content: unstuff dots (after CRLF only),
        normalise bare LF to CRLF, count it and keep it unless the message
        is already too big.

        A segment ends with CRLF or is part of an overlong line cut before
        its last octet, and the scanner never holds a CRLF back, so a CR at
        the end of one segment is never followed by a LF at the start of
        the next: a bare LF is found within one segment.
        """
        if b"\r\n." in segment:
            segment = segment.replace(b"\r\n.", b"\r\n")
        if prefixed:
            segment = segment[2:]
        if not segment:
            return
        if segment.count(b"\n") != segment.count(b"\r\n"):
            segment = _BARE_LF.sub(b"\r\n", segment)
        self._size += len(segment)
        if self._too_big:
            return
        if self._size > self.factory.config.max_message_size:
            self._too_big = True
            self._chunks = []
            return
        self._chunks.append(segment)

    def _end_of_data(self) -> None:
        mail_from = self._mail_from if self._mail_from is not None else ""
        rcpts = tuple(self._rcpts)
        self._reset_transaction()
        metrics = self.factory.metrics
        metrics.message_size_bytes.observe(self._size)
        if self._too_big:
            metrics.message(replies.MESSAGE_TOO_BIG.code)
            self._reset_data()
            self._mode = _COMMAND
            self._send(
                replies.MESSAGE_TOO_BIG.with_text(
                    "Message size exceeds fixed maximum message size of %d octets"
                    % self.factory.config.max_message_size
                )
            )
            self._check_session()
            return
        raw = b"".join(self._chunks)
        self._reset_data()
        self._wait()
        assert self._delivery is not None
        d = self._delivery.deliver(Envelope(mail_from, rcpts), raw, self.session, client=self.client)
        # addCallbacks, not addCallback + addErrback: an error in commands
        # pipelined after the dot (run from _delivered) must not produce a
        # second reply for the message.
        d.addCallbacks(self._delivered, self._delivery_crashed)

    def _delivered(self, reply: Reply) -> None:
        self.factory.metrics.message(reply.code)
        if reply.code == 250:
            # As Postfix: the error count starts again after a delivered message.
            self._errors = 0
        self._resume(reply)

    def _delivery_crashed(self, failure: Any) -> None:
        _log.failure("delivery crashed", failure, event="delivery_crash", session=self.session)
        self.factory.metrics.message(replies.LOCAL_ERROR.code)
        self._resume(replies.LOCAL_ERROR)


def _username_label(username: bytes) -> str:
    """
    What a log may say about a login name: the name for mailboxes and
    C{poststack}, a placeholder for anything else (it may be a pasted key).
    """
    try:
        name = username.decode("utf-8")
    except UnicodeDecodeError:
        return "(not UTF-8)"
    if name.lower() == "poststack" or ("@" in name and len(name) <= 254 and " " not in name):
        return replies.clean_text(name, 254)
    return "(other)"


_COMMANDS: dict[bytes, Callable[[RelaySMTP, bytes], None]] = {
    name[4:].encode("ascii"): getattr(RelaySMTP, name)
    for name in dir(RelaySMTP)
    if name.startswith("cmd_")
}


def _client_key(addr: Any) -> str:
    """
    The client address a per-client connection limit counts by.
    """
    host = getattr(addr, "host", None)
    return str(host) if host is not None else str(addr)


class RefusalProtocol(Protocol):
    """
    A connection the relay will not serve: it gets one C{421} reply (inside
    TLS, after the handshake, when wrapped) and is closed.  If the peer does
    not finish the handshake or read the reply within L{REFUSAL_LINGER}
    seconds, the connection is dropped.
    """

    def __init__(self, reply: Reply, clock: IReactorTime) -> None:
        self.reply = reply
        self._clock = clock
        self._linger: Optional[IDelayedCall] = None

    def connectionMade(self) -> None:
        self.transport.write(self.reply.line())
        self.transport.loseConnection()
        self._linger = self._clock.callLater(REFUSAL_LINGER, self._drop)

    def _drop(self) -> None:
        self._linger = None
        self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None


class RelayFactory(smtp.SMTPFactory):
    """
    Builds L{RelaySMTP} sessions, within the connection limits, and keeps
    the set of live ones.

    @param portal: checks AUTH credentials; yields L{IRelayDelivery} avatars.
    @param config: the relay's settings.
    @param clock: for idle, transaction and drain time-outs.
    @param throttle: failed-login bookkeeping shared by all sessions (and
        by every listener of the relay); C{None} disables failure delays
        and refusals (L{makeRelayService} always passes one).
    @param metrics: where sessions, refusals, AUTH results and messages
        are counted; a private L{RelayMetrics} if C{None}.

    @ivar throttle: the L{AuthThrottle}, or C{None}.
    @ivar sessions: the live sessions (built and not yet disconnected).
    @ivar stopping: true once L{drain} was called: new connections get
        C{421 4.3.2} and sessions close between transactions.
    """

    protocol = RelaySMTP  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        portal: Portal,
        config: RelayConfig,
        clock: IReactorTime,
        throttle: Optional[AuthThrottle] = None,
        metrics: Optional[RelayMetrics] = None,
    ) -> None:
        smtp.SMTPFactory.__init__(self, portal)
        self.metrics = metrics if metrics is not None else RelayMetrics()
        self.config = config
        self.clock = clock
        self.throttle = throttle
        self.sessions: set[RelaySMTP] = set()
        self.stopping = False
        self._per_client: dict[str, int] = {}
        self._session_keys: dict[RelaySMTP, str] = {}
        self._drain_waiters: list[Deferred[None]] = []
        self._drain_done = False
        self._drain_call: Optional[IDelayedCall] = None
        host = config.hostname.encode("ascii", "replace")
        extensions = [
            b"AUTH PLAIN LOGIN",
            b"SIZE %d" % config.max_message_size,
            b"8BITMIME",
            b"PIPELINING",
            b"ENHANCEDSTATUSCODES",
        ]
        lines = [host] + extensions
        self.ehlo_reply = b"".join(
            (b"250-" if n < len(lines) - 1 else b"250 ") + line + b"\r\n"
            for n, line in enumerate(lines)
        )

    def connections_from(self, client: str) -> int:
        """
        How many live sessions the client address C{client} has.
        """
        return self._per_client.get(client, 0)

    def _refusal(self, client: str) -> Optional[Reply]:
        if self.stopping:
            return replies.SHUTTING_DOWN
        if len(self.sessions) >= self.config.max_connections:
            return replies.TOO_MANY_CONNECTIONS
        if self._per_client.get(client, 0) >= self.config.max_connections_per_ip:
            return replies.TOO_MANY_CONNECTIONS_FROM_CLIENT
        return None

    def buildProtocol(self, addr: Any) -> Protocol:  # type: ignore[override]
        """
        A new session for a client at C{addr}, or a L{RefusalProtocol} if a
        connection limit is reached or the relay is stopping.
        """
        client = _client_key(addr)
        refusal = self._refusal(client)
        if refusal is not None:
            _log.info(
                "refused connection from {client}: {reason}",
                event="connection_refused",
                client=client,
                reason=refusal.text,
                sessions=len(self.sessions),
                from_client=self._per_client.get(client, 0),
            )
            if refusal is replies.SHUTTING_DOWN:
                self.metrics.refused["stopping"].inc()
            elif refusal is replies.TOO_MANY_CONNECTIONS:
                self.metrics.refused["max_connections"].inc()
            else:
                self.metrics.refused["max_connections_per_ip"].inc()
            return RefusalProtocol(refusal, self.clock)
        p = RelaySMTP(self)
        p.callLater = self.clock.callLater  # type: ignore[method-assign]
        self.sessions.add(p)
        self._session_keys[p] = client
        self._per_client[client] = self._per_client.get(client, 0) + 1
        self.metrics.connections_total.inc()
        self.metrics.connections_open.inc()
        return p

    def session_closed(self, session: RelaySMTP) -> None:
        """
        Release C{session}'s place in the limits (called once its
        connection is lost; calling it again does nothing).
        """
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        self.metrics.connections_open.dec()
        client = self._session_keys.pop(session)
        left = self._per_client[client] - 1
        if left:
            self._per_client[client] = left
        else:
            del self._per_client[client]
        if self.stopping and not self.sessions:
            self._finish_drain()

    def drain(self, timeout: float) -> "Deferred[None]":
        """
        Stop serving: refuse new connections with C{421 4.3.2}, close idle
        sessions with it now, and the others as soon as their current
        transaction is answered.  Fires once every session is gone, or
        after C{timeout} seconds, when the remaining ones are dropped
        without a reply.  Calling it again waits for the same end.
        """
        d: Deferred[None] = Deferred()
        if self._drain_done:
            d.callback(None)
            return d
        self._drain_waiters.append(d)
        if self.stopping:
            return d
        self.stopping = True
        _log.info(
            "draining: {sessions} sessions, {busy} in a transaction; deadline {timeout}s",
            event="drain_started",
            sessions=len(self.sessions),
            busy=sum(1 for s in self.sessions if not s.idle),
            timeout=timeout,
        )
        for session in list(self.sessions):
            session.shutdown()
        if self.sessions:
            self._drain_call = self.clock.callLater(timeout, self._drain_expired)
        else:
            self._finish_drain()
        return d

    def _drain_expired(self) -> None:
        self._drain_call = None
        remaining = list(self.sessions)
        _log.info(
            "drain deadline passed: dropping {count} sessions",
            event="drain_timeout",
            count=len(remaining),
        )
        for session in remaining:
            session.abort()
        self._finish_drain()

    def _finish_drain(self) -> None:
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        self._drain_call = None
        if self._drain_done:
            return
        self._drain_done = True
        _log.info("drained", event="drain_done")
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            waiter.callback(None)
