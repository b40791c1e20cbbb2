# -*- test-case-name: tests.test_auth,tests.test_auth_throttle -*-
"""
Who may send: credential checking with twisted.cred.

Two kinds of login, both over AUTH PLAIN or LOGIN:

  - username C{poststack} (any case) and an API key as password: an
    API-key identity that sends with that key;
  - a username with C{@} and a mailbox password: a mailbox identity that
    sends with the relay's service key and only from its own address.

Results are cached for a short time, keyed by a keyed SHA-256 digest of
the credentials, never by the secret itself.  L{AuthThrottle} counts
failed logins per client address, per mailbox from an address and per
mailbox, slows guessers down and refuses them per address, never per
mailbox alone (see docs/security-auth.md).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import os
from collections import OrderedDict
from typing import Any, Callable, Optional

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from .addresses import address_key
from .api import APIUnavailable, MailboxSuspended
from .config import mask_secret
from .fleet import LocalState
from .interfaces import IEmailAPI, IFleetState, IRelayDelivery
from .rates import RateLimit

_log = Logger()

API_KEY_USERNAME = "poststack"


class AuthUnavailable(Exception):
    """
    The credentials could not be checked now (API unreachable): answer
    C{454 4.7.0}.
    """


class MailboxLoginsDisabled(Exception):
    """
    A mailbox login on a relay without a service key: about the relay, not
    the password (no check, not a failed guess).
    """


@attrs.frozen
class Identity:
    """
    An authenticated sender.

    @ivar kind: C{"api_key"} or C{"mailbox"}.
    @ivar api_key: the key the relay sends with (the user's own key, or the
        service key for a mailbox); never logged.
    @ivar mailbox: the mailbox address for mailbox identities.
    @ivar label: what logs may show: a key prefix or the mailbox address.
    @ivar credential_digest: a keyed digest of the credential, stable for
        the process's life, for derivations that must not reveal it.
    @ivar account: a stable, non-secret name of the sending account (a
        SHA-256 of the API key, or the mailbox address), the same in every
        relay process, for derived idempotency keys.
    """

    kind: str
    api_key: str = attrs.field(repr=mask_secret)
    mailbox: Optional[str] = None
    label: str = ""
    credential_digest: bytes = attrs.field(default=b"", repr=False)
    account: str = attrs.field(default="", repr=False)


@attrs.define
class _CacheEntry:
    expires: float
    identity: Optional[Identity]
    suspended: bool = False


@implementer(ICredentialsChecker)
class PostStackChecker:
    """
    Checks C{IUsernamePassword} credentials against the PostStack API.

    The avatar id it returns is an L{Identity}.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self,
        api: IEmailAPI,
        clock: IReactorTime,
        service_key: Optional[str],
        positive_ttl: float = 60.0,
        negative_ttl: float = 10.0,
        max_entries: int = 10000,
    ) -> None:
        self._api = api
        self._clock = clock
        self._service_key = service_key
        self._positive_ttl = positive_ttl
        self._negative_ttl = negative_ttl
        self._max_entries = max_entries
        self._cache: OrderedDict[bytes, _CacheEntry] = OrderedDict()
        # A per-process secret so cache keys and digests cannot be
        # reversed by someone who sees them (they never leave memory).
        self._pepper = os.urandom(32)

    def _digest(self, *parts: bytes) -> bytes:
        return hmac.new(self._pepper, b"\0".join(parts), hashlib.sha256).digest()

    # The avatar id is the whole Identity, not the bytes the interface's
    # annotation names: cred passes it through to the realm untouched.
    def requestAvatarId(self, credentials: Any) -> "Deferred[Identity]":  # type: ignore[override]
        username = credentials.username
        password = credentials.password
        if isinstance(username, str):
            username = username.encode("utf-8")
        if isinstance(password, str):
            password = password.encode("utf-8")
        try:
            user = username.decode("utf-8")
            secret = password.decode("utf-8")
        except UnicodeDecodeError:
            return _fail(UnauthorizedLogin("credentials are not UTF-8"))
        if not user or not secret:
            return _fail(UnauthorizedLogin("empty username or password"))

        if user.lower() == API_KEY_USERNAME:
            kind = "api_key"
        elif "@" in user:
            kind = "mailbox"
            if self._service_key is None:
                _log.info("mailbox login refused: no service key configured", event="auth_no_service_key")
                return _fail(MailboxLoginsDisabled())
        else:
            return _fail(UnauthorizedLogin("unknown username"))

        digest = self._digest(kind.encode(), username.lower() if kind == "mailbox" else b"", password)
        now = self._clock.seconds()
        entry = self._cache.get(digest)
        if entry is not None:
            if entry.expires > now:
                if entry.suspended:
                    return _fail(MailboxSuspended())
                if entry.identity is None:
                    return _fail(UnauthorizedLogin("cached failure"))
                return succeed(entry.identity)
            del self._cache[digest]

        if kind == "api_key":
            d: Deferred[Any] = self._api.check_api_key(secret)
            d.addCallback(
                lambda ok: Identity(
                    "api_key",
                    secret,
                    None,
                    mask_secret(secret),
                    digest,
                    "key:" + hashlib.sha256(secret.encode("utf-8")).hexdigest(),
                )
                if ok
                else None
            )
        else:
            d = self._api.authenticate_mailbox(user, secret)
            assert self._service_key is not None
            service_key = self._service_key
            d.addCallback(
                lambda address: Identity(
                    "mailbox", service_key, address, address, digest, "mailbox:" + address.lower()
                )
                if address
                else None
            )

        def remember(identity: Optional[Identity]) -> Identity:
            ttl = self._positive_ttl if identity is not None else self._negative_ttl
            if ttl > 0:
                self._store(digest, _CacheEntry(self._clock.seconds() + ttl, identity))
            if identity is None:
                raise UnauthorizedLogin("invalid credentials")
            return identity

        def unavailable(failure: Any) -> Any:
            if failure.trap(APIUnavailable, MailboxSuspended) is MailboxSuspended:
                # The right password: remembered as long as a failure.
                if self._negative_ttl > 0:
                    self._store(digest, _CacheEntry(self._clock.seconds() + self._negative_ttl, None, True))
                raise MailboxSuspended()
            raise AuthUnavailable()

        d.addCallbacks(remember, unavailable)
        return d

    def _store(self, digest: bytes, entry: _CacheEntry) -> None:
        self._cache[digest] = entry
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)


# How many client addresses and usernames L{AuthThrottle} remembers at most.
DEFAULT_THROTTLE_MAX_KEYS = 100_000


def throttle_user_key(username: bytes) -> Optional[str]:
    """
    The key L{AuthThrottle} counts a login name's failures under: the
    lower-cased mailbox address, or C{None} when the name is not throttled
    per username.

    C{poststack} is shared by every API-key user, so counting its failures
    would let one guesser lock every API-key client out; and the password
    (the key) cannot serve as the key either, since a guesser changes it on
    every try.  A mailbox is counted under its L{address_key}, so that
    respelling it (C{xn--} for a U-label, NFD for NFC) gives no fresh
    count.  API-key logins are throttled per client address only (and
    repeated wrong keys are answered from the negative cache).  Names that
    are neither C{poststack} nor an address can never log in and are not
    worth remembering.
    """
    try:
        name = username.decode("utf-8")
    except UnicodeDecodeError:
        return None
    name = name.strip()
    if name.lower() == API_KEY_USERNAME or "@" not in name:
        return None
    # The mailbox's one comparison form (as the sender policy's): every
    # spelling of one mailbox (case, U-label or A-label domain, local part
    # NFC or not) shares its counts.
    return address_key(name)


def throttle_client_key(client: str) -> str:
    """
    The key L{AuthThrottle} counts a client address's failures under: the
    address itself for IPv4 (and IPv4-mapped IPv6), the /64 network for
    IPv6, since one host usually holds a whole /64 and could otherwise
    change address between guesses.
    """
    try:
        address = ipaddress.ip_address(client.split("%", 1)[0])
    except ValueError:
        return client
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@attrs.frozen
class Lockout:
    """
    Why a login is refused without a check, and for how long.

    @ivar reason: C{"client"} (every login from the address) or
        C{"mailbox"} (this mailbox from this address).
    @ivar seconds: whole seconds (at least 1) until the count that refuses
        it is forgotten, if no failure comes meanwhile.
    @ivar pending: the limit is reached only with checks still in flight
        (their answers unknown): the login waits for them
        (L{AuthThrottle.after_checks}) instead of being refused.
    """

    reason: str
    seconds: int
    pending: bool = False


# A mailbox with this many times auth_failures_per_user failures (from
# every address) in the window is under attack: each address then gets one
# failure for it per window instead of auth_failures_per_user.
UNDER_ATTACK = 4
# The per-mailbox count lives this many windows after its last failure.
MAILBOX_MEMORY = 12


class AuthThrottle:
    """
    Remembers failed logins, shared by every session of a relay, and by
    every relay of a fleet when its C{state} is shared
    (L{poststack_relay.fleet}).  Three counts:

      - per client address (IPv6: its /64), every username: C{per_ip}
        failures refuse every login from it;
      - per mailbox and client address: C{per_user} failures refuse that
        mailbox's logins from that address only;
      - per mailbox, from every address: never refuses by itself (a
        stranger who knows the address must not lock its user out); it
        makes the delays grow, and past C{UNDER_ATTACK * per_user} failures
        each address gets one failure per window for that mailbox (an
        address that has not failed for it is always checked).  It lives
        C{MAILBOX_MEMORY} windows after its last failure, so pausing for a
        window does not end the attack's count.

    A count is forgotten once C{window} seconds (the mailbox's own count:
    C{MAILBOX_MEMORY} windows) pass with no new failure for it (the window
    restarts at each failure, so a slow guesser never gets a fresh count).  Each failure delays its C{535} reply by
    C{delay * 2 ** (n - 1)} seconds, at most C{max_delay}, where C{n} is the
    largest of the three counts.  A refused attempt (L{refusal}) is not a
    failure and does not extend the window.  Checks still in flight count
    toward the limits (L{started}, L{finished}), so guesses sent in
    parallel cannot pass a limit before their failures are known.

    A successful login resets nothing: an attacker with a valid account of
    its own could otherwise clear its address's count between guesses.

    Memory is bounded by the state (L{LocalState}'s C{max_counters}: the
    counts whose last failure is oldest are forgotten first).

    @param clock: the time source of the state made when none is given.
    @param window: seconds a count lives after its last failure.
    @param per_ip: failures from one client address (IPv6: /64) before
        its logins are refused.
    @param per_user: failures for one mailbox from one client address
        before that mailbox's logins from that address are refused.
    @param delay: seconds of delay before the first failure's reply.
    @param max_delay: the longest delay.
    @param max_keys: most counts remembered (for the state made when none
        is given).
    @param state: where the counts live; a relay-local L{LocalState} if
        C{None}.
    @param rate: AUTH attempts per client address per minute
        (C{--max-auth-rate-per-ip}), or C{None} for no limit.
    """

    def __init__(
        self,
        clock: Optional[IReactorTime],
        window: float = 300.0,
        per_ip: int = 10,
        per_user: int = 5,
        delay: float = 0.5,
        max_delay: float = 8.0,
        max_keys: int = DEFAULT_THROTTLE_MAX_KEYS,
        state: Optional[IFleetState] = None,
        rate: Optional[RateLimit] = None,
    ) -> None:
        self.window = window
        self.per_ip = per_ip
        self.per_user = per_user
        self.delay = delay
        self.max_delay = max_delay
        if state is None:
            if clock is None:
                raise ValueError("AuthThrottle needs a clock or a state")
            state = LocalState(clock, max_counters=max_keys)
        self.state: IFleetState = state
        self.rate = rate
        # Checks in flight in this relay, per limited key, and the logins
        # waiting for one of them to answer.
        self._in_flight: dict[str, int] = {}
        self._waiting: dict[str, list[Deferred[None]]] = {}

    def __len__(self) -> int:
        """
        How many counts are remembered.
        """
        return len(self.state)

    def _keys(self, client: Optional[str], user: Optional[str]) -> list[str]:
        """The limited keys (address, mailbox from it), then the mailbox's own."""
        keys = []
        where = throttle_client_key(client) if client is not None else None
        if where is not None:
            keys.append("ip:" + where)
        if user is not None:
            if where is not None:
                keys.append(f"pair:{where} {user}")
            keys.append("user:" + user)
        return keys

    def failures(self, client: Optional[str] = None, user: Optional[str] = None) -> int:
        """
        The largest current failure count of a client address, of a
        mailbox from it, or of a mailbox from every address.
        """
        return max([0, *self.state.counts(self._keys(client, user))])

    def rate_limited(self, client: str) -> Optional[int]:
        """
        One more AUTH attempt from C{client}: C{None} if the rate allows it
        (and counts it), else the whole seconds to wait.
        """
        if self.rate is None:
            return None
        return self.rate.hit(throttle_client_key(client))

    def refusal(self, client: str, user: Optional[str]) -> Optional[Lockout]:
        """
        The L{Lockout} refusing a login from C{client} for C{user} (a
        L{throttle_user_key}) now, or C{None} if it may be checked.
        """
        keys = self._keys(client, user)
        counts = self.state.counts(keys)
        per_user = self.per_user
        if len(counts) == 3 and counts[2] >= UNDER_ATTACK * per_user:
            # The mailbox is being guessed from many addresses: one guess
            # per window for it from each.
            per_user = 1
        for key, count, limit, reason in zip(keys[:2], counts, (self.per_ip, per_user), ("client", "mailbox")):
            if count >= limit:
                left = self.state.seconds_left([key])[0]
                return Lockout(reason, max(1, math.ceil(left if left > 0 else self.window)))
            if count + self._in_flight.get(key, 0) >= limit:
                # Only checks in flight would pass the limit: this login
                # waits for their answers (a burst of correct logins from
                # one address is not refused; parallel guesses cannot
                # overshoot the limit).
                return Lockout(reason, 1, pending=True)
        return None

    def after_checks(self, client: str, user: Optional[str]) -> "Deferred[None]":
        """
        A Deferred that fires when one of the checks in flight for
        C{client} (and C{user}) has answered; then ask L{refusal} again.
        """
        waiter: Deferred[None] = Deferred()
        keys = [key for key in self._keys(client, user)[:2] if self._in_flight.get(key)]
        if not keys:
            waiter.callback(None)
        else:
            self._waiting.setdefault(keys[0], []).append(waiter)
        return waiter

    def started(self, client: str, user: Optional[str]) -> None:
        """A login passed L{refusal} and is being checked."""
        for key in self._keys(client, user)[:2]:
            self._in_flight[key] = self._in_flight.get(key, 0) + 1

    def finished(self, client: str, user: Optional[str]) -> None:
        """The check of a login L{started} gave its answer."""
        woken: list[Deferred[None]] = []
        for key in self._keys(client, user)[:2]:
            left = self._in_flight.get(key, 0) - 1
            if left > 0:
                self._in_flight[key] = left
            else:
                self._in_flight.pop(key, None)
            woken += self._waiting.pop(key, [])
        for waiter in woken:
            waiter.callback(None)

    def failed(self, client: str, user: Optional[str]) -> float:
        """
        Record a failed login; return the seconds to wait before replying.
        """
        keys = self._keys(client, user)
        counts = self.state.add(keys[:2], self.window)
        if user is not None:
            # The mailbox's own count lives longer: a guesser who pauses
            # for one window must not find the mailbox no longer under
            # attack (and each address with its per_user guesses back).
            counts += self.state.add(keys[-1:], self.window * MAILBOX_MEMORY)
        highest = max(counts)
        if self.delay <= 0:
            return 0.0
        return float(min(self.delay * 2 ** min(highest - 1, 62), self.max_delay))


def _fail(exc: Exception) -> "Deferred[Any]":
    d: Deferred[Any] = Deferred()
    d.errback(exc)
    return d


@implementer(IRealm)
@attrs.frozen
class RelayRealm:
    """
    Turns an L{Identity} into the message-delivery avatar for the session.

    @ivar delivery_factory: called with the identity, returns an
        C{IMessageDelivery} provider.
    """

    delivery_factory: Callable[[Identity], Any]

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        if IRelayDelivery not in interfaces:
            raise NotImplementedError("only IRelayDelivery is supported")
        avatar = self.delivery_factory(avatarId)
        return IRelayDelivery, avatar, lambda: None
