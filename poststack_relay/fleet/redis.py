# -*- test-case-name: tests.test_fleet_redis -*-
"""
L{RedisState}: the fleet's state shared through a Redis-protocol server
(Redis, Valkey), with the relay's own memory (a L{LocalState}) as the
mirror that answers every read.

No reply ever waits for Redis:

  - reads (is this address locked out? is this credential held?) are
    answered from the mirror;
  - writes (a failed login, a 429 learned) change the mirror at once, then
    run an atomic server-side script in the background, which announces
    the change on one channel;
  - every relay subscribes to that channel and writes what it hears into
    its mirror, so each one knows what the fleet counted.  A relay that
    (re)subscribes loads the live notes it missed.

Redis slow, paused or gone is not an outage: each call has a time budget
(C{timeout}); past it, or on any error, the relay has already decided with
its mirror, counts the fallback (C{fleet_state_fallbacks_total}), logs
once that the shared state is unavailable, and checks the server every
second until it answers again (then logs once more), one C{PING} waiting at
a time on each connection.  The client reconnects by itself: after a lost
connection, after one that left a reply unanswered for the client's reply
time-out (4 budgets, at least 2 s), which it drops, and with new
connections when txredisapi gives up (L{RedisState._gave_up}).

The client is txredisapi (an optional extra: C{pip install
poststack-relay[redis]}); it is imported only when a Redis URL is
configured.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..interfaces import IFleetState
from ..metrics import RelayMetrics
from .local import LocalState
from ..places import RedisURL
from .wire import (
    ADD_SCRIPT,
    LOAD_NOTES_SCRIPT,
    REMEMBER_SCRIPT,
    CountEvent,
    FleetKeys,
    NoteEvent,
    loaded_notes,
    milliseconds,
    parse_event,
)

import txredisapi  # type: ignore[import-untyped]  # (txredisapi ships no type information)

__all__ = ["DEFAULT_REDIS_TIMEOUT", "RedisState"]

_log = Logger(namespace="poststack_relay.fleet")

# Seconds a Redis call may take before the relay stops waiting for it.
DEFAULT_REDIS_TIMEOUT = 0.25
# Seconds between health checks while Redis answers, and while it does not.
CHECK_INTERVAL_UP = 5.0
CHECK_INTERVAL_DOWN = 1.0
# The most background calls waiting for Redis at once; past it, more are
# decided locally only (a slow server must not grow the relay's memory).
MAX_PENDING = 1000
# The most notes loaded when (re)subscribing.
MAX_LOADED_NOTES = 10_000
# Seconds between reconnection attempts, at most.
RECONNECT_MAX_DELAY = 2.0


class _Subscriber(txredisapi.SubscriberProtocol):  # type: ignore[misc]  # (untyped base class)
    """
    The subscription connection: tells L{RedisState} when it is ready
    (again) and what it hears.
    """

    def connectionMade(self) -> Any:
        d = super().connectionMade()
        self.whenConnected().addCallback(lambda _: self.factory.state._subscriber_ready(self))
        return d

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.state._heard(message)


class _SubscriberFactory(txredisapi.RedisFactory):  # type: ignore[misc]  # (untyped base class)
    protocol = _Subscriber
    maxDelay = RECONNECT_MAX_DELAY
    state: "RedisState"


def _endpoint(
    reactor: IReactorTCP, url: RedisURL, timeout: float, trust: Any = None
) -> IStreamClientEndpoint:
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, url.host, url.port, timeout=timeout)
    if url.tls:
        # The server's certificate is checked: against C{trust} (from
        # --redis-tls-ca) or the system's CAs, and for the URL's host name.
        endpoint = wrapClientTLS(optionsForClientTLS(url.host, trustRoot=trust), endpoint)
    return endpoint


def _factory(cls: Any, url: RedisURL, reply_timeout: float) -> Any:
    factory = cls(
        f"{url.host}:{url.port}",
        # Database 0 is where a connection starts: no SELECT (one step less
        # that can fail while connecting).
        url.db or None,
        1,
        False,  # not lazy: txredisapi would log each refused connection itself
        txredisapi.ConnectionHandler,
        "utf-8",
        url.password,
        reply_timeout,
        True,
        url.username,
    )
    factory.reconnect = True
    factory.maxDelay = RECONNECT_MAX_DELAY
    # Fails when a connection is refused its AUTH or SELECT; the relay tells
    # that by its own checks (fleet_state_down), not as an unhandled error.
    factory.deferred.addErrback(lambda _: None)
    return factory


@implementer(IFleetState)
class RedisState:
    """
    L{IFleetState} shared through Redis (see the module's text).

    @param url: the server.
    @param reactor: for connections and timers.
    @param keys: the key names (their digest key is the fleet's).
    @param timeout: seconds each Redis call may take.
    @param metrics: where fallbacks and the server's state are counted.
    @param mirror: the relay's own memory; a new L{LocalState} if C{None}.
    @param trust: the trust root for C{rediss://} (L{poststack_relay.tls.trust_root});
        the system's CAs if C{None}.

    @ivar up: does Redis answer (as far as the last call or check knows)?
    """

    def __init__(
        self,
        url: RedisURL,
        reactor: Any,
        keys: FleetKeys,
        timeout: float = DEFAULT_REDIS_TIMEOUT,
        metrics: Optional[RelayMetrics] = None,
        mirror: Optional[LocalState] = None,
        trust: Any = None,
    ) -> None:
        self.url = url
        self._trust = trust
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        self.keys = keys
        self.timeout = timeout
        self.mirror = mirror if mirror is not None else LocalState(reactor)
        self.metrics = metrics if metrics is not None else RelayMetrics()
        self.metrics.fleet_state_up.set_function(lambda: 1 if self.up else 0)
        self._fallbacks = {
            op: self.metrics.fleet_state_fallbacks_total.labels(op) for op in ("add", "remember", "load")
        }
        self.up = False
        self._known: Optional[bool] = None  # the state last logged
        self._pending = 0
        self._client: Any = None
        self._subscriber: Any = None
        self._checker: Optional[LoopingCall] = None
        self._interval = CHECK_INTERVAL_DOWN
        self._stopped = False
        self._ping: "Optional[Deferred[object]]" = None  # the PING waiting, if any
        self._subscriber_ping: "Optional[Deferred[object]]" = None  # on the subscription
        # The channel: per database, as Redis's channels are per server.
        self.channel = keys.channel if url.db == 0 else f"{keys.channel}:{url.db}"

    # -- IFleetState: reads from the mirror, writes to both ---------------

    def __len__(self) -> int:
        return len(self.mirror)

    def counts(self, keys: Sequence[str]) -> list[int]:
        """See L{IFleetState.counts}: from the mirror."""
        return self.mirror.counts([self.keys.counter(k) for k in keys])

    def add(self, keys: Sequence[str], window: float) -> list[int]:
        """
        See L{IFleetState.add}: counted in the mirror now, in Redis in the
        background (whose announcement then sets the mirror to the fleet's
        count).
        """
        names = [self.keys.counter(k) for k in keys]
        counts = self.mirror.add(names, window)
        self._call("add", ADD_SCRIPT, names, [milliseconds(window), self.channel])
        return counts

    def seconds_left(self, keys: Sequence[str]) -> list[float]:
        """See L{IFleetState.seconds_left}: from the mirror."""
        return self.mirror.seconds_left([self.keys.counter(k) for k in keys])

    def remember(self, subject: str, value: str, seconds: float) -> None:
        """See L{IFleetState.remember}: in the mirror now, in Redis in the background."""
        name = self.keys.note(subject)
        self.mirror.remember(name, value, seconds)
        if seconds > 0:
            self._call("remember", REMEMBER_SCRIPT, [name], [value, milliseconds(seconds), self.channel])

    def recall(self, subject: str) -> Optional[tuple[str, float]]:
        """See L{IFleetState.recall}: from the mirror."""
        return self.mirror.recall(self.keys.note(subject))

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """
        Connect (in the background: the relay serves at once, deciding
        locally until Redis answers).
        """
        self._stopped = False
        self._connect()
        _log.info("shared state: connecting to {url}", url=str(self.url), event="fleet_state_connecting")
        self._schedule(CHECK_INTERVAL_DOWN, now=True)

    def _connect(self) -> None:
        # PINGs left waiting belong to the old connections (one on a client
        # that gave up would wait for ever and stop every later check).
        self._ping = self._subscriber_ping = None
        reply_timeout = max(2.0, self.timeout * 4)
        self._client = _factory(txredisapi.RedisFactory, self.url, reply_timeout)
        self._client.startConnecting(_endpoint(self._reactor, self.url, reply_timeout, self._trust))
        subscriber = _factory(_SubscriberFactory, self.url, reply_timeout)
        subscriber.state = self
        subscriber.startConnecting(_endpoint(self._reactor, self.url, reply_timeout, self._trust))
        self._subscriber = subscriber

    def _gave_up(self) -> bool:
        """
        Has the client stopped reconnecting by itself?  (txredisapi does
        when a connection is refused its AUTH or SELECT, or is lost in the
        middle of them, as when Redis restarts.)
        """
        return any(
            factory is not None and factory.stopped for factory in (self._client, self._subscriber)
        )

    def stop(self) -> "Deferred[object]":
        """
        Stop checking and close both connections.
        """
        self._stopped = True
        if self._checker is not None and self._checker.running:
            self._checker.stop()
        ends = []
        for factory in (self._client, self._subscriber):
            if factory is not None:
                ends.append(factory.disconnect())
        self._client = self._subscriber = None
        return gatherResults(ends, consumeErrors=True).addErrback(lambda _: None)

    # -- calls with a budget --------------------------------------------

    def _budget(self, d: "Deferred[Any]") -> "Deferred[Any]":
        return d.addTimeout(self.timeout, self._clock)

    def _call(self, operation: str, script: str, keys: list[str], args: list[str]) -> None:
        if not self.up or self._client is None or self._pending >= MAX_PENDING:
            self._fallbacks[operation].inc()
            return
        self._pending += 1
        d = self._budget(self._client.handler.eval(script, keys, args))

        def done(result: object) -> object:
            self._pending -= 1
            return result

        def failed(failure: Failure) -> None:
            self._fallbacks[operation].inc()
            self._changed(False, failure)
            if isinstance(failure.value, txredisapi.ResponseError) and str(failure.value).startswith("READONLY"):
                self._reconnect()

        d.addBoth(done).addErrback(failed)

    def _reconnect(self) -> None:
        """
        Drop the client's connection; it is made again (after the
        client's short back-off).  For a server that refuses writes
        (C{READONLY}): a master demoted by a failover, still answering
        C{PING}, while the URL (a Sentinel-aware proxy, a service name)
        now leads to the new one.
        """
        if self._client is not None:
            for connection in list(self._client.pool):
                connection.transport.abortConnection()

    # -- health ------------------------------------------------------------

    def _schedule(self, interval: float, now: bool = False) -> None:
        if self._stopped:
            return
        if self._checker is not None and self._checker.running:
            if self._interval == interval:
                return
            self._checker.stop()
        self._interval = interval
        self._checker = LoopingCall(self._check)
        self._checker.clock = self._clock
        self._checker.start(interval, now=now).addErrback(
            lambda f: _log.failure("shared state check crashed", f, event="fleet_state_crash")
        )

    def _check(self) -> "Optional[Deferred[None]]":
        """
        One C{PING}, judged within the budget.  The budget does not cancel
        it: it waits on (for a connection, or for the server's reply, until
        the client's own reply time-out drops a connection that does not
        answer), and no other is sent meanwhile, so a long outage keeps one
        request waiting, not one more each check.
        """
        if self._client is None:
            return None
        if self._gave_up():
            # Start again with new connections (at most once per check).
            for factory in (self._client, self._subscriber):
                factory.disconnect().addErrback(lambda _: None)
            self._connect()
        self._check_subscription()
        if self._ping is not None:
            return None
        ping: "Deferred[object]" = self._client.handler.ping()
        self._ping = ping
        d: "Deferred[object]" = Deferred()

        def answered(result: object) -> None:
            if self._ping is ping:
                self._ping = None
            # After the budget's time-out (which cancelled d), ignored.
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

        ping.addBoth(answered)
        self._budget(d).addCallbacks(lambda _: self._changed(True), lambda f: self._changed(False, f))
        return None

    def _check_subscription(self) -> None:
        """
        A C{PING} on the subscription's connection too (one at a time): it
        sends nothing else, so without it a peer gone silent (a crashed
        host, a partition) would leave it open and deaf for good.  Its
        reply time-out drops such a connection; the new one subscribes and
        loads the notes again.
        """
        subscriber = self._subscriber
        if subscriber is None or self._subscriber_ping is not None or not subscriber.size:
            return
        ping: "Deferred[object]" = subscriber.handler.ping()
        self._subscriber_ping = ping

        def answered(_: object) -> None:
            if self._subscriber_ping is ping:
                self._subscriber_ping = None

        ping.addBoth(answered)

    def _changed(self, up: bool, failure: Optional[Failure] = None) -> None:
        if self._stopped:
            return  # calls cut short by stop() say nothing about Redis
        self.up = up
        if up == self._known:
            return
        self._known = up
        if up:
            _log.info("shared state available at {url}", url=str(self.url), event="fleet_state_up")
            self._schedule(CHECK_INTERVAL_UP)
            self._load()
        else:
            why = failure.value.__class__.__name__ if failure is not None else "unknown"
            _log.warn(
                "shared state unavailable at {url} ({why}): each relay decides with its own "
                "memory until it answers again",
                url=str(self.url),
                why=why,
                event="fleet_state_down",
            )
            self._schedule(CHECK_INTERVAL_DOWN)

    # -- the subscription ------------------------------------------------

    def _subscriber_ready(self, protocol: Any) -> None:
        protocol.subscribe(self.channel).addErrback(lambda _: None)
        if self.up:
            self._load()

    def _load(self) -> None:
        if self._client is None:
            return
        d = self._budget(
            self._client.handler.eval(LOAD_NOTES_SCRIPT, [], [self.keys.note_pattern, str(MAX_LOADED_NOTES)])
        )

        def loaded(reply: Any) -> None:
            for note in loaded_notes(reply if isinstance(reply, list) else []):
                self.mirror.remember(note.key, note.value, note.seconds)

        def failed(failure: Failure) -> None:
            self._fallbacks["load"].inc()

        d.addCallbacks(loaded, failed)

    def _heard(self, message: Any) -> None:
        event = parse_event(message)
        if isinstance(event, CountEvent):
            for key, count in event.counts:
                self.mirror.put_count(key, count, event.window)
        elif isinstance(event, NoteEvent):
            self.mirror.remember(event.key, event.value, event.seconds)
