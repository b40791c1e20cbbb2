# -*- test-case-name: tests.test_auth -*-
"""
Who may send: credential checking with twisted.cred.

Two kinds of login, both over AUTH PLAIN or LOGIN:

  - username C{poststack} (any case) and an API key as password: an
    API-key identity that sends with that key;
  - a username with C{@} and a mailbox password: a mailbox identity that
    sends with the relay's service key and only from its own address.

Results are cached for a short time, keyed by a SHA-256 digest of the
credentials, never by the secret itself.
"""

from __future__ import annotations

import hashlib
import hmac
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

from .api import APIUnavailable, IEmailAPI
from .config import mask_secret

_log = Logger()

API_KEY_USERNAME = "poststack"


class AuthUnavailable(Exception):
    """
    The credentials could not be checked now (API unreachable): answer
    C{454 4.7.0}.
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

    def requestAvatarId(self, credentials: Any) -> "Deferred[Identity]":
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
                return _fail(UnauthorizedLogin("mailbox logins are not configured"))
        else:
            return _fail(UnauthorizedLogin("unknown username"))

        digest = self._digest(kind.encode(), username.lower() if kind == "mailbox" else b"", password)
        now = self._clock.seconds()
        entry = self._cache.get(digest)
        if entry is not None:
            if entry.expires > now:
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
                self._cache[digest] = _CacheEntry(self._clock.seconds() + ttl, identity)
                while len(self._cache) > self._max_entries:
                    self._cache.popitem(last=False)
            if identity is None:
                raise UnauthorizedLogin("invalid credentials")
            return identity

        def unavailable(failure: Any) -> Any:
            failure.trap(APIUnavailable)
            raise AuthUnavailable()

        d.addCallbacks(remember, unavailable)
        return d


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
        from .delivery import IRelayDelivery

        if IRelayDelivery not in interfaces:
            raise NotImplementedError("only IRelayDelivery is supported")
        avatar = self.delivery_factory(avatarId)
        return IRelayDelivery, avatar, lambda: None
