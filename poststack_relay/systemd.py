# -*- test-case-name: tests.test_systemd,tests.test_listeners -*-
"""
systemd integration: readiness notification (C{Type=notify}) and the
socket-activated listener (C{poststack-relay.socket}).

Readiness uses the C{sd_notify} protocol with the standard library only:
one datagram of C{NAME=value} lines over an C{AF_UNIX} C{SOCK_DGRAM}
socket at the path in C{NOTIFY_SOCKET} (C{@name}: an abstract socket).
Without C{NOTIFY_SOCKET} nothing is sent.
"""

from __future__ import annotations

import os
import socket
from typing import Mapping, Optional, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorSocket, IStreamServerEndpoint
from twisted.logger import Logger

from .config import ConfigError

_log = Logger()


class SystemdNotifier:
    """
    Sends C{sd_notify} state lines to the service manager.

    @ivar address: the C{NOTIFY_SOCKET} address as C{socket} takes it, or
        C{None} when not run by systemd with C{Type=notify}.
    """

    def __init__(self, environ: Optional[Mapping[str, str]] = None) -> None:
        value = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
        self.address: Optional[str] = None
        if value.startswith("@"):
            self.address = "\0" + value[1:]
        elif value.startswith("/"):
            self.address = value

    def notify(self, state: str) -> bool:
        """
        Send C{state} (newline-separated C{NAME=value} lines) as one datagram.

        @return: C{True} if it was sent; C{False} without C{NOTIFY_SOCKET}
            or when sending failed (logged, never raised).
        """
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(state.encode("utf-8"), self.address)
        except OSError as e:
            _log.warn(
                "cannot notify systemd at {address}: {error}",
                address=self.address.replace("\0", "@"),
                error=e,
                event="systemd_notify_failed",
            )
            return False
        return True


class Listening(Protocol):
    """
    What L{ReadinessService} needs of the relay
    (L{poststack_relay.service.RelayService}).
    """

    def ports(self) -> "Optional[Deferred[list[Optional[IListeningPort]]]]":
        """
        A Deferred firing with every listening port (C{None} for one that
        could not bind) once all are settled; C{None} before the listeners
        start.
        """


def _describe(port: IListeningPort) -> str:
    host = port.getHost()
    address = getattr(host, "host", None)
    number = getattr(host, "port", None)
    if address is None or number is None:
        return str(host)
    return f"[{address}]:{number}" if ":" in address else f"{address}:{number}"


class ReadinessService(Service):
    """
    Tells systemd C{READY=1} once every listener of the relay is bound and
    C{STOPPING=1} when the relay begins to stop.

    @ivar notifier: where the state goes.
    """

    def __init__(self, notifier: SystemdNotifier, relay: Listening) -> None:
        """
        @param relay: the L{poststack_relay.service.RelayService}; its
            C{ports()} Deferred fires with every listening port once all
            are bound.
        """
        self.notifier = notifier
        self._relay = relay

    def startService(self) -> None:
        """
        Send C{READY=1} once every listener is bound.
        """
        Service.startService(self)  # type: ignore[no-untyped-call]  # Service: unannotated in Twisted
        if self.notifier.address is None:
            return
        d = self._relay.ports()
        if d is not None:
            d.addCallback(self._ready)

    def _ready(self, ports: list[Optional[IListeningPort]]) -> list[Optional[IListeningPort]]:
        bound = [port for port in ports if port is not None]
        if len(bound) != len(ports):
            return ports  # a listener failed to bind (logged): not ready
        where = ", ".join(_describe(port) for port in bound)
        self.notifier.notify(f"READY=1\nSTATUS=listening on {where}")
        return ports

    def stopping(self) -> None:
        """
        The relay begins to stop: C{STOPPING=1}.
        """
        self.notifier.notify("STOPPING=1\nSTATUS=stopping")


def socketEndpoint(reactor: IReactorSocket, name: str) -> IStreamServerEndpoint:
    """
    The listening socket systemd passed with C{FileDescriptorName=name}
    (C{LISTEN_FDS}, C{LISTEN_FDNAMES}, C{LISTEN_PID}) as Twisted's
    C{systemd:domain=INET:name=...} server endpoint, C{INET6} for an IPv6
    socket (systemd's C{ListenStream=587} makes a dual-stack IPv6 one).

    Twisted reads (and removes) the C{LISTEN_*} variables once, when
    C{twisted.internet.endpoints} is imported.

    @raise ConfigError: if no such TCP socket was passed.
    """
    try:
        endpoint: AdoptedStreamServerEndpoint = serverFromString(  # type: ignore[no-untyped-call]  # endpoints: unannotated in Twisted
            reactor, f"systemd:domain=INET:name={name}"
        )
    except KeyError:
        raise ConfigError(
            f"systemd-socket {name!r}: systemd passed no socket of that name "
            "(FileDescriptorName= in the .socket unit)"
        ) from None
    fileno: int = endpoint.fileno
    try:
        probe = socket.socket(fileno=os.dup(fileno))
    except OSError as e:
        raise ConfigError(f"systemd-socket {name!r}: {e.strerror or e}") from None
    try:
        family, kind = probe.family, probe.type
    finally:
        probe.close()
    if kind != socket.SOCK_STREAM or family not in (socket.AF_INET, socket.AF_INET6):
        raise ConfigError(f"systemd-socket {name!r} is not a TCP listening socket")
    if family == socket.AF_INET6:
        inet6: AdoptedStreamServerEndpoint = serverFromString(  # type: ignore[no-untyped-call]  # endpoints: unannotated in Twisted
            reactor, f"systemd:domain=INET6:name={name}"
        )
        return inet6
    return endpoint
