# -*- test-case-name: tests.test_endpoints,tests.test_listeners,tests.test_proxy_protocol -*-
"""
Where the relay listens, as Twisted server endpoints.

One listener of the relay is a stack of endpoints, bottom to top::

    TCP (IPv4 or IPv6), a systemd socket, or a supervisor's shared socket
      -> PROXY protocol header, when configured     (ProxyProtocolEndpoint)
        -> implicit TLS with plaintext detection    (ImplicitTLSEndpoint)
          -> the SMTP factory

L{relay_endpoint} builds that stack for one L{ListenerConfig}.  The same
implicit-TLS endpoint is also reachable from an endpoint description, as
C{serverFromString} reads them (the C{twisted/plugins/poststack_relay_endpoints.py}
plugin points here, L{parse_implicit_tls})::

    implicittls:tcp\\:587\\:interface\\=127.0.0.1:certificate=fullchain.pem:key=privkey.pem

The first argument (its colons and equals signs escaped) is the endpoint to
listen on; then C{certificate=} (PEM, the chain may follow the leaf),
C{key=} (default: in the certificate file), C{profile=} (C{intermediate} or
C{modern}), C{detectTimeout=} (seconds before a silent client is told
the port needs TLS; 0: never) and C{handshakeTimeout=} (seconds the whole
TLS handshake may take; 0: no limit).  A simple endpoint needs no escaping:
C{implicittls:tcp:465:certificate=cert.pem}.
"""

from __future__ import annotations

import os
import socket
from typing import Optional

from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    IReactorCore,
    IReactorSocket,
    IReactorTime,
    IStreamServerEndpoint,
)

from .config import DEFAULT_TLS_DETECT_TIMEOUT, DEFAULT_TLS_HANDSHAKE_TIMEOUT, ConfigError
from .places import ListenerConfig
from .implicittls import ImplicitTLSEndpoint
from .interfaces import IRelayReactor
from .metrics import RelayMetrics
from .proxyprotocol import ProxyProtocolEndpoint
from .systemd import socketEndpoint


def listening_endpoint(listener: ListenerConfig, reactor: IRelayReactor) -> IStreamServerEndpoint:
    """
    Where C{listener} listens: its systemd socket, else TCP over IPv6 or
    IPv4 by the interface (no TLS yet: see L{relay_endpoint}).

    @raise ConfigError: the systemd socket was not passed.
    """
    if listener.systemd_socket:
        try:
            return socketEndpoint(reactor, listener.systemd_socket)
        except ConfigError as e:
            if not listener.spec:
                raise
            raise ConfigError(f"listen {listener.spec!r}: {e}") from None
    if ":" in listener.interface:
        return TCP6ServerEndpoint(  # type: ignore[no-untyped-call]  # endpoints: unannotated in Twisted
            reactor, listener.port, interface=listener.interface
        )
    return TCP4ServerEndpoint(  # type: ignore[no-untyped-call]  # endpoints: unannotated in Twisted
        reactor, listener.port, interface=listener.interface
    )


def adopted_endpoint(reactor: IReactorSocket, fd: int) -> IStreamServerEndpoint:
    """
    An endpoint that takes over the listening socket C{fd} (a supervisor's
    shared socket, L{poststack_relay.workers}); C{fd} is closed once the
    port has its own copy, so the port's C{stopListening} really closes
    this process's hold on the socket.
    """
    probe = socket.socket(fileno=os.dup(fd))
    try:
        family = probe.family
    finally:
        probe.close()
    return AdoptedStreamServerEndpoint(reactor, fd, family)  # type: ignore[no-untyped-call]  # endpoints: unannotated in Twisted


def relay_endpoint(
    where: IStreamServerEndpoint,
    listener: ListenerConfig,
    tls: IOpenSSLServerConnectionCreator,
    clock: IReactorTime,
    detect_timeout: float,
    metrics: Optional[RelayMetrics] = None,
    handshake_timeout: float = 0.0,
) -> ImplicitTLSEndpoint:
    """
    One listener of the relay: implicit TLS (with plaintext detection) on
    C{where}, behind a PROXY protocol header first if C{listener} says so.

    @param where: the bare endpoint (L{listening_endpoint},
        L{adopted_endpoint}, or an embedder's).
    @param tls: the listener's certificate
        (L{poststack_relay.tls.ReloadableTLS}).
    @param detect_timeout: see L{ImplicitTLSEndpoint.detectTimeout}.
    @param metrics: where TLS handshake failures are counted.
    @param handshake_timeout: see L{ImplicitTLSEndpoint.handshakeTimeout}.
    """
    if listener.proxy_protocol:
        # The PROXY header comes before the TLS ClientHello.
        where = ProxyProtocolEndpoint(where, clock)
    return ImplicitTLSEndpoint(where, tls, clock, detect_timeout, metrics, handshake_timeout)


def parse_implicit_tls(
    reactor: IReactorCore, *args: str, **kwargs: str
) -> ImplicitTLSEndpoint:
    """
    An L{ImplicitTLSEndpoint} from the arguments of an C{implicittls:}
    endpoint description (see the module): what the endpoint plugin's
    C{parseStreamServer} returns.

    @param reactor: the reactor C{serverFromString} was given; it must also
        provide C{IReactorTime} (and what the wrapped endpoint needs).
    @raise ValueError: a missing endpoint or certificate, an unknown
        argument, or a bad C{detectTimeout}.
    @raise ConfigError: the certificate or key cannot be used.
    """
    from .tls import load_certificate_options

    known = {"certificate", "key", "profile", "detectTimeout", "handshakeTimeout"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(
            f"implicittls: unknown argument {unknown[0]!r} (want {', '.join(sorted(known))})"
        )
    if not args:
        raise ValueError("implicittls: which endpoint to listen on? (implicittls:tcp\\:587:...)")
    if not kwargs.get("certificate"):
        raise ValueError("implicittls: certificate= is required")
    detect_timeout = _seconds(kwargs, "detectTimeout", DEFAULT_TLS_DETECT_TIMEOUT)
    handshake_timeout = _seconds(kwargs, "handshakeTimeout", DEFAULT_TLS_HANDSHAKE_TIMEOUT)
    if not IReactorTime.providedBy(reactor):
        raise ValueError("implicittls: the reactor does not provide IReactorTime")
    options = load_certificate_options(
        kwargs["certificate"], kwargs.get("key") or None, kwargs.get("profile", "intermediate")
    )
    description = ":".join(args)
    wrapped: IStreamServerEndpoint = serverFromString(reactor, description)  # type: ignore[no-untyped-call]  # endpoints: unannotated in Twisted
    return ImplicitTLSEndpoint(
        wrapped, options, reactor, detect_timeout, handshakeTimeout=handshake_timeout
    )


def _seconds(kwargs: dict[str, str], name: str, default: float) -> float:
    try:
        seconds = float(kwargs.get(name, default))
    except ValueError:
        raise ValueError(f"implicittls: {name} must be a number, not {kwargs[name]!r}") from None
    if not seconds >= 0:
        raise ValueError(f"implicittls: {name} must not be negative, not {seconds}")
    return seconds


__all__ = [
    "adopted_endpoint",
    "listening_endpoint",
    "parse_implicit_tls",
    "relay_endpoint",
]
