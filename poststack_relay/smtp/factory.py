# -*- test-case-name: tests.test_smtp_limits,tests.test_shutdown,tests.test_smtp_stress,tests.test_door -*-
"""
L{RelayFactory}: builds the SMTP sessions of one relay within its
connection limits (in total, per client address, and new connections per
minute per client address), keeps the set of live ones, sheds idle
unauthenticated ones under stress (L{Stress}), and drains them for a
graceful shutdown.  A connection past a limit gets a L{RefusalProtocol}
(one C{421} reply) instead of a session.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Union

from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from .. import replies
from ..auth import AuthThrottle, throttle_client_key
from ..config import RelayConfig
from ..fleet import LocalState
from ..interfaces import IFleetState
from ..metrics import RelayMetrics
from ..rates import RateLimit
from ..replies import Reply
from .login import Authenticator
from .protocol import RelaySMTP
from .session import CLOSED, WAIT
from .stress import Stress, StressChange

# One namespace for the SMTP side's events, as text logs show it
# ("[poststack_relay.smtp#info]"), whichever module logs them.
_log = Logger(namespace="poststack_relay.smtp")

# Seconds a refused connection may take to receive its 421 (the TLS
# handshake comes first) before it is dropped.
REFUSAL_LINGER = 10.0
# Seconds the sessions told 421 at the drain deadline get to read it (and
# answer TLS's close_notify) before they are dropped and the drain ends:
# a stop takes at most drain_timeout + DRAIN_FAREWELL.
DRAIN_FAREWELL = 2.0

# Connections past the connection rate that are told so (a 421 inside TLS)
# per client address and minute; the others are closed before the TLS
# handshake, without a word, so a flood costs no handshakes.
POLITE_RATE_REFUSALS = 60
# How many client addresses the polite-refusal counts remember.
_POLITE_MAX_KEYS = 10_000

_DROP: Literal["drop"] = "drop"


def _client_key(addr: Any) -> str:
    """
    The client address a per-client connection limit counts by.
    """
    host = getattr(addr, "host", None)
    return str(host) if host is not None else str(addr)


def _log_stress(change: StressChange, high: Optional[int], config: RelayConfig) -> None:
    if change.on:
        _log.info(
            "under stress: {sessions} sessions open (high-water mark {high} of {limit}); "
            "idle time-out {timeout}s for idle and unauthenticated sessions",
            event="stress_on",
            sessions=change.sessions,
            high=high,
            limit=config.max_connections,
            timeout=config.stress_timeout,
            lasted=change.lasted,
        )
    else:
        _log.info(
            "stress over after {lasted:.1f}s: {sessions} sessions open",
            event="stress_off",
            sessions=change.sessions,
            lasted=change.lasted,
        )


def _authenticated(session: RelaySMTP) -> bool:
    return session.state.delivery is not None


def _idle(session: RelaySMTP) -> bool:
    return session.state.idle


class RefusalProtocol(Protocol):
    """
    A connection the relay will not serve: it gets one C{421} reply (inside
    TLS, after the handshake, when wrapped) and is closed.  If the peer does
    not finish the handshake or read the reply within L{REFUSAL_LINGER}
    seconds, the connection is dropped.
    """

    transport: ITCPTransport  # set before connectionMade, never None after

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

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
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
    @param state: where new connections per client address are counted
        (the relay's fleet state, shared with C{--redis-url}); the
        throttle's, else a private L{LocalState}, if C{None}.

    @ivar throttle: the L{AuthThrottle}, or C{None}.
    @ivar sessions: the live sessions (built and not yet disconnected).
    @ivar stopping: true once L{drain} was called: new connections get
        C{421 4.3.2} and sessions close between transactions.
    @ivar stress: the stress policy (L{Stress}): short time-outs and
        shedding past the high-water mark.
    @ivar connection_rate: new connections per minute per client address.
    @ivar deadline_hooks: called when the drain deadline passes, before the
        sessions are told C{421 4.3.2} (the translation pool's
        L{abandon<poststack_relay.offload.TranslationPool.abandon>}).
    """

    # What buildProtocol builds (it does not use this: it passes the factory
    # to RelaySMTP, which is a Protocol, not Twisted's SMTP).
    protocol = RelaySMTP  # type: ignore[assignment]  # not an smtp.SMTP subclass, see above
    noisy = False

    def __init__(
        self,
        portal: Portal,
        config: RelayConfig,
        clock: IReactorTime,
        throttle: Optional[AuthThrottle] = None,
        metrics: Optional[RelayMetrics] = None,
        state: Optional[IFleetState] = None,
    ) -> None:
        smtp.SMTPFactory.__init__(self, portal)  # type: ignore[no-untyped-call]  # Twisted's is untyped
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
        self.authenticator = Authenticator(portal, throttle, self.metrics)
        self.deadline_hooks: list[Callable[[], None]] = []
        if state is None:
            state = throttle.state if throttle is not None else LocalState(clock)
        self.connection_rate = RateLimit(
            state, clock, config.max_connection_rate_per_ip, 60.0, "conn"
        )
        # This relay's own memory: refusals are never shared.
        self._polite = RateLimit(
            LocalState(clock, max_counters=_POLITE_MAX_KEYS), clock, POLITE_RATE_REFUSALS, 60.0, "told"
        )
        self.stress: Stress[RelaySMTP] = Stress(
            clock, config.max_connections, config.stress_threshold
        )
        host = config.hostname.encode("ascii", "replace")
        self.greeting = b"220 " + host + b" ESMTP PostStack relay\r\n"
        self.helo_reply = b"250 " + host + b"\r\n"
        extensions = [
            b"AUTH PLAIN LOGIN",
            b"SIZE %d" % config.max_message_size,
            b"8BITMIME",
            b"PIPELINING",
            b"ENHANCEDSTATUSCODES",
            b"SMTPUTF8",
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

    def _refusal(self, client: str) -> Union[Reply, Literal["drop"], None]:
        if self.stopping:
            return replies.SHUTTING_DOWN
        if self._per_client.get(client, 0) >= self.config.max_connections_per_ip:
            return replies.TOO_MANY_CONNECTIONS_FROM_CLIENT
        full = len(self.sessions) >= self.config.max_connections
        victim = self.stress.victim(_authenticated, _idle) if full else None
        if full and victim is None:
            return replies.TOO_MANY_CONNECTIONS
        # Counted only for a connection that the other limits let in, and
        # before any session is shed for it.
        key = throttle_client_key(client)
        wait = self.connection_rate.hit(key)
        if wait is not None:
            if self._polite.hit(key) is not None:
                return _DROP
            return replies.connection_rate_exceeded(wait)
        if victim is not None:
            self._shed(victim, client)
        return None

    def _refused(self, client: str, refusal: Reply) -> Protocol:
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
        elif refusal is replies.TOO_MANY_CONNECTIONS_FROM_CLIENT:
            self.metrics.refused["max_connections_per_ip"].inc()
        else:
            self.metrics.refused["max_connection_rate_per_ip"].inc()
        return RefusalProtocol(refusal, self.clock)

    def buildProtocol(self, addr: Any) -> Optional[Protocol]:
        """
        A new session for a client at C{addr}, or a L{RefusalProtocol} if a
        connection limit is reached or the relay is stopping.  Under
        stress with every place taken, the oldest idle unauthenticated
        session is shed to make room.  C{None} (close the connection at
        once, before TLS) for a client past the connection rate that was
        already told so L{POLITE_RATE_REFUSALS} times this minute.
        """
        client = _client_key(addr)
        refusal = self._refusal(client)
        if refusal == _DROP:
            self.metrics.refused["max_connection_rate_per_ip_dropped"].inc()
            return None
        if isinstance(refusal, Reply):
            return self._refused(client, refusal)
        p = RelaySMTP(self)
        self.sessions.add(p)
        self._session_keys[p] = client
        self._per_client[client] = self._per_client.get(client, 0) + 1
        self.metrics.connections_total.inc()
        self.metrics.connections_open.inc()
        self._stress_changed(self.stress.opened(p, len(self.sessions)))
        return p

    def _shed(self, victim: RelaySMTP, client: str) -> None:
        _log.info(
            "{session} shed under stress (idle, not authenticated) client={client} for {newcomer}",
            event="session_shed",
            session=victim.session,
            client=victim.client,
            newcomer=client,
        )
        self.metrics.sessions_shed_total.inc()
        victim.state.reply(replies.SHED, error=False)
        victim.state.closed()
        victim.close()
        # Its place is free now, though its connection may linger a moment.
        self.session_closed(victim)

    @property
    def stressed(self) -> bool:
        """
        The relay is under stress (see L{Stress}); C{/readyz} says not ready.
        """
        return self.stress.on

    def _stress_changed(self, change: Optional[StressChange]) -> None:
        if change is None:
            return
        self.metrics.stress.set(1 if change.on else 0)
        _log_stress(change, self.stress.high, self.config)
        timeout = self.session_timeout()
        for session in self.sessions:
            # From now, if its idle timer runs (not while it waits on the API).
            session.timeout = timeout
            if session.state.mode != WAIT and session.state.mode != CLOSED:
                session.set_idle_timer(timeout)

    def session_timeout(self) -> float:
        """
        The idle time-out of sessions now: C{stress_timeout} under stress,
        else C{idle_timeout}.
        """
        return self.config.stress_timeout if self.stress.on else self.config.idle_timeout

    def session_closed(self, session: RelaySMTP) -> None:
        """
        Release C{session}'s place in the limits (called once its
        connection is lost, or when it is shed; calling it again does
        nothing).
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
        self._stress_changed(self.stress.closed(session, len(self.sessions)))
        if self.stopping and not self.sessions:
            self._finish_drain()

    def drain(self, timeout: float) -> "Deferred[None]":
        """
        Stop serving: refuse new connections with C{421 4.3.2}, close idle
        sessions with it now, and the others as soon as their current
        transaction is answered.  Fires once every session is gone.  After
        C{timeout} seconds every session still open is told C{421 4.3.2}
        at once, whatever it is doing (even waiting on the API), and gets
        L{DRAIN_FAREWELL} seconds to go; then the rest are dropped.
        Calling it again waits for the same end.
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
        for hook in self.deadline_hooks:
            hook()
        remaining = list(self.sessions)
        told = [session for session in remaining if session.deadline_passed()]
        _log.info(
            "drain deadline passed: {told} sessions told 421 4.3.2, {count} still open",
            event="drain_timeout",
            count=len(remaining),
            told=len(told),
        )
        # Those that had said their last reply before had their time to go.
        for session in remaining:
            if session not in told:
                session.abort()
        if told and any(session in self.sessions for session in told):
            self._drain_call = self.clock.callLater(DRAIN_FAREWELL, self._farewell_expired)
        else:
            self._finish_drain()

    def _farewell_expired(self) -> None:
        self._drain_call = None
        for session in list(self.sessions):
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
