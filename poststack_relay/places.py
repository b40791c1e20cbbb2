# -*- test-case-name: tests.test_listeners,tests.test_metrics,tests.test_fleet_wire -*-
"""
Option values that name a place: a C{listen} spec, the metrics
C{HOST:PORT}, the fleet store's Redis URL.  Each parser turns the text into
a frozen value or raises L{ConfigError} with one line for the operator.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Optional
from urllib.parse import unquote, urlsplit

import attrs

from .errors import ConfigError

DEFAULT_PORT = 587


_LISTEN = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>[0-9]{1,5})$")


def parse_metrics_listen(value: str) -> tuple[str, int]:
    """
    Parse C{HOST:PORT} or C{[IPv6]:PORT}: C{HOST} is an IPv4 address or
    C{localhost} (127.0.0.1), C{PORT} 0 to 65535.

    @return: (IP address, port).
    @raise ConfigError: one line starting with C{metrics-listen}.
    """
    problem = (
        f"metrics-listen must be HOST:PORT or [IPv6]:PORT with an IP address "
        f"(e.g. 127.0.0.1:9587, [::1]:9587, 0.0.0.0:9587), or off to disable it, not {value!r}"
    )
    m = _LISTEN.match(value.strip())
    if m is None:
        raise ConfigError(problem)
    port = int(m.group("port"))
    if port > 65535:
        raise ConfigError(f"metrics-listen port must be between 0 and 65535, not {port}")
    if m.group("v6") is not None:
        try:
            address = ipaddress.IPv6Address(m.group("v6"))
        except ValueError:
            raise ConfigError(problem) from None
        return str(address), port
    host = m.group("host")
    if host.lower() == "localhost":
        return "127.0.0.1", port
    try:
        address4 = ipaddress.IPv4Address(host)
    except ValueError:
        raise ConfigError(problem) from None
    return str(address4), port


LISTEN_OPTIONS = ("proxy-protocol", "tls-cert=", "tls-key=")
_YES = ("yes", "true", "on", "1")
_NO = ("no", "false", "off", "0")


@attrs.frozen
class ListenerConfig:
    """
    One implicit-TLS listener: where it listens, whether a PROXY protocol
    header comes first, and which certificate it serves.

    The main listener comes from C{port}, C{interface}, C{systemd_socket},
    C{proxy_protocol}, C{tls_cert} and C{tls_key} of L{RelayConfig}; each
    C{listen} spec adds one (L{parse_listener}).

    @ivar interface: address to bind; C{""} means all IPv4 interfaces.
    @ivar port: TCP port (0: any free port); unused with C{systemd_socket}.
    @ivar systemd_socket: C{FileDescriptorName=} of a socket passed by
        systemd to listen on instead of C{interface} and C{port}; C{""}:
        none.
    @ivar proxy_protocol: expect a PROXY protocol v1/v2 header before TLS.
    @ivar tls_cert: the PEM certificate (chain) this listener serves.
    @ivar tls_key: its PEM key; C{None} if in C{tls_cert}.
    @ivar spec: the C{listen} spec it was parsed from; C{""} for the main
        listener.
    """

    interface: str = ""
    port: int = DEFAULT_PORT
    systemd_socket: str = ""
    proxy_protocol: bool = False
    tls_cert: str = ""
    tls_key: Optional[str] = None
    spec: str = ""

    @property
    def label(self) -> str:
        """
        A short name for logs: C{*:465}, C{127.0.0.1:587}, C{[::1]:465},
        C{systemd:smtps}.
        """
        if self.systemd_socket:
            return f"systemd:{self.systemd_socket}"
        host = self.interface or "*"
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.port}"

    @property
    def address_key(self) -> tuple[str, str]:
        """
        What two listeners must not share: the systemd socket name, or the
        interface and port (C{""} and C{0.0.0.0} are the same interface).
        """
        if self.systemd_socket:
            return ("systemd", self.systemd_socket)
        return (self.interface or "0.0.0.0", str(self.port))


def _spec_port(spec: str, text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ConfigError(f"listen {spec!r}: port must be a number, not {text!r}")
    port = int(text)
    if port > 65535:
        raise ConfigError(f"listen {spec!r}: port must be between 0 and 65535, not {port}")
    return port


def parse_listener(spec: str, main: ListenerConfig) -> ListenerConfig:
    """
    Parse one C{listen} spec into a listener that inherits from C{main}
    whatever the spec does not say.

    Grammar: C{[INTERFACE:]PORT} (an IPv6 interface in brackets,
    C{[::1]:465}; C{PORT} alone is every IPv4 interface) or
    C{systemd:NAME}, then optional comma-separated options:
    C{proxy-protocol} (same as C{proxy-protocol=yes}),
    C{proxy-protocol=yes|no}, C{tls-cert=PATH} and C{tls-key=PATH}.
    Without C{tls-cert} the listener serves C{main}'s certificate and key;
    with it, its own (the key from C{tls-key}, else from the certificate
    file).  C{proxy-protocol} defaults to C{main}'s.

    @raise ConfigError: one line starting with C{listen 'SPEC':}.
    """
    parts = [part.strip() for part in spec.split(",")]
    address, options = parts[0], parts[1:]
    if not address:
        raise ConfigError(
            f"listen {spec!r}: empty spec (want [INTERFACE:]PORT or systemd:NAME)"
        )
    interface, port, systemd_socket = "", DEFAULT_PORT, ""
    if address.startswith("systemd:"):
        systemd_socket = address[len("systemd:"):]
        if not systemd_socket or ":" in systemd_socket or any(c.isspace() for c in systemd_socket):
            raise ConfigError(
                f"listen {spec!r}: systemd socket name must be a FileDescriptorName=, "
                f"not {systemd_socket!r}"
            )
    elif address.startswith("["):
        end = address.find("]")
        if end < 0:
            raise ConfigError(f"listen {spec!r}: missing ']' after the IPv6 interface")
        interface, rest = address[1:end], address[end + 1 :]
        if not interface:
            raise ConfigError(f"listen {spec!r}: empty interface in brackets")
        if not rest.startswith(":"):
            raise ConfigError(f"listen {spec!r}: want [INTERFACE]:PORT after the brackets")
        port = _spec_port(spec, rest[1:])
    elif ":" in address:
        interface, text = address.rsplit(":", 1)
        if ":" in interface:
            raise ConfigError(f"listen {spec!r}: put an IPv6 interface in brackets, like [::1]:465")
        if not interface:
            raise ConfigError(
                f"listen {spec!r}: empty interface (write just the port for all interfaces)"
            )
        port = _spec_port(spec, text)
    else:
        port = _spec_port(spec, address)
    if any(c.isspace() for c in interface):
        raise ConfigError(f"listen {spec!r}: interface must be an address, not {interface!r}")

    proxy_protocol = main.proxy_protocol
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    seen: set[str] = set()
    for option in options:
        if not option:
            raise ConfigError(f"listen {spec!r}: empty option (a stray comma?)")
        name, equals, value = option.partition("=")
        name = name.strip()
        value = value.strip()
        if name in seen:
            raise ConfigError(f"listen {spec!r}: option {name!r} given twice")
        seen.add(name)
        if name == "proxy-protocol":
            if not equals or value.lower() in _YES:
                proxy_protocol = True
            elif value.lower() in _NO:
                proxy_protocol = False
            else:
                raise ConfigError(
                    f"listen {spec!r}: proxy-protocol must be yes or no, not {value!r}"
                )
        elif name in ("tls-cert", "tls-key") and equals:
            if not value:
                raise ConfigError(f"listen {spec!r}: {name}= needs a path")
            if name == "tls-cert":
                tls_cert = value
            else:
                tls_key = value
        else:
            raise ConfigError(
                f"listen {spec!r}: unknown option {option!r} ({', '.join(LISTEN_OPTIONS)})"
            )
    if tls_key is not None and tls_cert is None:
        raise ConfigError(f"listen {spec!r}: tls-key= needs tls-cert= (its own certificate)")
    return ListenerConfig(
        interface=interface,
        port=port,
        systemd_socket=systemd_socket,
        proxy_protocol=proxy_protocol,
        tls_cert=main.tls_cert if tls_cert is None else tls_cert,
        tls_key=main.tls_key if tls_cert is None else tls_key,
        spec=spec,
    )



# -- the fleet's shared state (--redis-url)

DEFAULT_REDIS_PORT = 6379


@attrs.frozen
class RedisURL:
    """
    A Redis server, as C{redis://[user@]host[:port][/db]} or C{rediss://}
    (TLS, the server's certificate checked against the system's CAs (or
    C{--redis-tls-ca}), and the host name).

    @ivar password: from C{POSTSTACK_RELAY_REDIS_PASSWORD} (or the URL);
        never logged or shown.
    """

    host: str
    port: int = DEFAULT_REDIS_PORT
    db: int = 0
    tls: bool = False
    username: Optional[str] = None
    password: Optional[str] = attrs.field(default=None, repr=False)

    def __str__(self) -> str:
        """The URL as logs may show it: no password."""
        scheme = "rediss" if self.tls else "redis"
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{user}{host}:{self.port}/{self.db}"


def redis_url_repr(url: Optional[str]) -> str:
    """A Redis URL as a repr may show it: never a password it holds."""
    if not url:
        return repr(url)
    try:
        return repr(str(parse_redis_url(url)))
    except ConfigError:
        return "(unusable)"


def parse_redis_url(url: str, password: Optional[str] = None) -> RedisURL:
    """
    Parse C{url}; C{password} (from the environment) wins over one in the
    URL.

    @raise ConfigError: with a text that says what is wrong (never the
        password).
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ConfigError("--redis-url: not a URL (redis://host:port/db or rediss://...)") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError("--redis-url must start with redis:// or rediss://")
    if not parts.hostname:
        raise ConfigError("--redis-url has no host (redis://host:port/db)")
    if parts.query or parts.fragment:
        raise ConfigError("--redis-url takes no query or fragment")
    path = parts.path.strip("/")
    if path and not (path.isdigit() and len(path) <= 5):
        raise ConfigError("--redis-url: the path is the database number (redis://host:port/0)")
    url_password = unquote(parts.password) if parts.password else None
    username = unquote(parts.username) if parts.username else None
    return RedisURL(
        host=parts.hostname,
        port=port if port is not None else DEFAULT_REDIS_PORT,
        db=int(path) if path else 0,
        tls=parts.scheme == "rediss",
        username=username or None,
        password=password if password else url_password,
    )
