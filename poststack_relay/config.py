# -*- test-case-name: tests.test_config_file,tests.test_listeners,tests.test_workers -*-
"""
The relay's configuration: one frozen attrs value, built once at start-up.

Everything downstream of option parsing takes a L{RelayConfig}.  Secrets
(the service key) are kept out of C{repr()} so a logged config never leaks
them.
"""

from __future__ import annotations

import socket
import tomllib
from typing import Any, Optional, TypeVar

import attrs

from .errors import ConfigError as ConfigError
from .places import (
    DEFAULT_PORT,
    ListenerConfig,
    RedisURL,
    parse_listener,
    parse_metrics_listen,
    parse_redis_url,
    redis_url_repr,
)


# Seconds a call to the shared state's Redis may take (it never delays a reply).
DEFAULT_REDIS_TIMEOUT = 0.25
DEFAULT_API_URL = "https://api.poststack.dev"
# Postfix's message_size_limit is 10240000; PostStack accepts larger emails
# and users send attachments, so the relay defaults to 25 MiB of MIME.
DEFAULT_MAX_MESSAGE_SIZE = 25 * 1024 * 1024
DEFAULT_MAX_RECIPIENTS = 50
# A message at least this large is checked against the MIME limits while it
# streams in and translated in a thread, off the event loop: below it the
# translation costs under about a millisecond, less than the hand-over
# (docs/operations.md, "One large or hostile message").
DEFAULT_LARGE_MESSAGE_SIZE = 16 * 1024
# Threads translating large messages at once (more wait their turn).
DEFAULT_TRANSLATE_THREADS = 2
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_TLS_DETECT_TIMEOUT = 2.0
# One API attempt; the whole message (every attempt and the waits between
# them) is bounded by DEFAULT_API_DEADLINE, well under the 5-10 minutes
# SMTP clients wait for the reply to the final dot.
DEFAULT_API_TIMEOUT = 10.0
DEFAULT_API_DEADLINE = 30.0
DEFAULT_API_MAX_IN_FLIGHT = 64
# 0: a quarter of api_max_in_flight (16 of 64), so one customer's flood
# leaves three quarters of the slots to the others (docs/replies.md).
DEFAULT_API_MAX_IN_FLIGHT_PER_CREDENTIAL = 0
DEFAULT_API_QUEUE_TIMEOUT = 10.0
DEFAULT_API_BREAKER_FAILURES = 5
# While the breaker is open the relay probes the API this often, and closes
# it on the first answer: clients are refused for at most about this long
# (plus one probe's round trip) after the API is back.
DEFAULT_API_BREAKER_COOLDOWN = 0.5
# The shortest probe interval: a down API gets at most 10 probes a second
# from one relay.
MIN_API_BREAKER_COOLDOWN = 0.1
DEFAULT_MAX_CONNECTIONS = 1000
# Postfix: smtpd_client_connection_count_limit = 50.
DEFAULT_MAX_CONNECTIONS_PER_IP = 50
DEFAULT_TRANSACTION_TIMEOUT = 600.0
DEFAULT_MAX_ERRORS = 20
DEFAULT_MAX_AUTH_FAILURES = 3
# A message whose DATA ended just before SIGTERM may wait up to
# DEFAULT_API_QUEUE_TIMEOUT (10 s) for a request slot, then up to
# DEFAULT_API_DEADLINE (30 s) for the API: the drain leaves room for both and
# 5 s for a client finishing its upload.  Whatever is still open at the end
# is told 421 4.3.2 (docs/operations.md, "Stopping under load").
DEFAULT_DRAIN_TIMEOUT = 45.0
# Holding the door (docs/operations.md, "Under abuse"): new connections per
# minute from one address (IPv6: /64; Postfix's
# smtpd_client_connection_rate_limit), commands before AUTH (Postfix's
# smtpd_junk_command_limit), seconds for the whole TLS handshake, and the
# stress mode: past this percentage of max_connections, idle and
# unauthenticated sessions get stress_timeout (Postfix's
# smtpd_timeout = ${stress?{10}:{300}}s) and the oldest idle
# unauthenticated ones make room for new connections.
DEFAULT_MAX_CONNECTION_RATE_PER_IP = 600
DEFAULT_MAX_JUNK_COMMANDS = 100
DEFAULT_TLS_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_STRESS_THRESHOLD = 80
DEFAULT_STRESS_TIMEOUT = 10.0
TLS_PROFILES = ("intermediate", "modern")
DEFAULT_TLS_RELOAD_INTERVAL = 60.0
# AUTH failure throttling, per client address, per mailbox from an address
# and per mailbox: each failure within the window adds a growing delay before
# the 535; past a limit (per address, per mailbox from an address: never per
# mailbox alone) that address gets 454 4.7.0 until the window has passed
# without failures.
DEFAULT_AUTH_FAILURE_WINDOW = 300.0
DEFAULT_AUTH_FAILURES_PER_IP = 10
DEFAULT_AUTH_FAILURES_PER_USER = 5
# AUTH attempts per client address per minute (Postfix's
# smtpd_client_auth_rate_limit), fleet-wide with --redis-url: ten new
# logins a second for a whole minute, far above what an honest sender needs.
DEFAULT_MAX_AUTH_RATE_PER_IP = 600
DEFAULT_AUTH_FAILURE_DELAY = 0.5
DEFAULT_AUTH_FAILURE_MAX_DELAY = 8.0
DEFAULT_AUTH_CACHE_TTL = 60.0
DEFAULT_AUTH_NEGATIVE_TTL = 10.0
# Prometheus metrics, /healthz and /readyz: loopback only unless the operator
# says otherwise.  9587 is "587" for the metrics of the relay on port 587.
DEFAULT_METRICS_LISTEN = "127.0.0.1:9587"
LOG_FORMATS = ("text", "json")
# --workers: processes sharing the listening ports (poststack_relay.workers).
DEFAULT_WORKERS = 1
# Seconds a quota 429 is remembered per credential (poststack_relay.holds).
DEFAULT_API_QUOTA_HOLD = 60.0
# Seconds a sender domain the API refused is remembered per credential
# (poststack_relay.holds): long enough that a client retrying at once is
# answered before DATA, short enough that a domain just verified sends soon.
DEFAULT_SENDER_DOMAIN_HOLD = 60.0
MAX_WORKERS = 256


def mask_secret(value: Optional[str]) -> str:
    """
    Show only a short prefix of a secret: C{sk_live_ab…}.
    """
    if not value:
        return "(unset)"
    return value[:10] + "\N{HORIZONTAL ELLIPSIS}"


def read_config_file(path: str) -> dict[str, Any]:
    """
    Read a TOML configuration file (see C{docs/configuration.md}) into its
    top-level table, without checking its keys or types.

    @raise ConfigError: with one line naming C{path} when the file cannot be
        read or is not valid TOML.
    """
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path!r}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        reason = " ".join(str(e).split())
        raise ConfigError(f"config file {path!r} is not valid TOML: {reason}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path!r} is not valid TOML: not UTF-8") from None


def _default_hostname() -> str:
    try:
        return socket.getfqdn() or "localhost"
    except OSError:  # pragma: no cover - depends on the host
        return "localhost"


_Number = TypeVar("_Number", int, float)


def _positive(instance: object, attribute: "attrs.Attribute[_Number]", value: _Number) -> None:
    if value <= 0:
        raise ConfigError(f"{attribute.name.replace('_', '-')} must be positive, not {value}")


def _not_negative(instance: object, attribute: "attrs.Attribute[_Number]", value: _Number) -> None:
    if value < 0:
        raise ConfigError(f"{attribute.name.replace('_', '-')} must not be negative, not {value}")


def _percentage(instance: object, attribute: "attrs.Attribute[int]", value: int) -> None:
    if not 0 <= value <= 100:
        raise ConfigError(f"{attribute.name.replace('_', '-')} must be 0 to 100, not {value}")


def _probe_interval(instance: object, attribute: "attrs.Attribute[float]", value: float) -> None:
    if value < MIN_API_BREAKER_COOLDOWN:
        raise ConfigError(
            f"api-breaker-cooldown (seconds between the breaker's probes) must be at least "
            f"{MIN_API_BREAKER_COOLDOWN:g}, not {value}"
        )


def _workers(instance: object, attribute: "attrs.Attribute[int]", value: int) -> None:
    if not 1 <= value <= MAX_WORKERS:
        raise ConfigError(f"workers must be between 1 and {MAX_WORKERS}, not {value}")


def _port(instance: object, attribute: "attrs.Attribute[int]", value: int) -> None:
    if not 0 <= value <= 65535:
        raise ConfigError(f"port must be between 0 and 65535, not {value}")


@attrs.frozen
class RelayConfig:
    """
    Everything the relay needs to run.

    @ivar port: TCP port of the implicit-TLS listener (0: any free port).
    @ivar interface: address to bind; C{""} means all IPv4 interfaces.
    @ivar tls_cert: path of a PEM file with the certificate, optionally
        followed by its chain (and optionally the key).
    @ivar tls_key: path of the PEM private key; C{None} if in C{tls_cert}.
    @ivar api_url: base URL of the PostStack API.
    @ivar service_key: the relay's own key, used for mailbox logins and
        mailbox users' sends; C{None} disables mailbox logins.
    @ivar hostname: the name in the greeting and the EHLO reply.
    @ivar max_message_size: largest message accepted, in octets (SIZE).
    @ivar max_recipients: most RCPT TO per message.
    @ivar large_message_size: octets from which a message is checked
        against the MIME limits while it streams in, and translated in a
        thread (off the event loop).
    @ivar translate_threads: threads translating large messages at once.
    @ivar idle_timeout: seconds a client may stay silent.
    @ivar tls_detect_timeout: seconds to wait for a TLS ClientHello before
        telling a plaintext client that the port needs TLS; 0 disables.
    @ivar api_timeout: seconds one API attempt may take.
    @ivar api_deadline: seconds all attempts for one message may take,
        waits between retries included.
    @ivar api_max_in_flight: most API requests at once.
    @ivar api_max_in_flight_per_credential: most API sends at once for one
        API key or one mailbox; C{0}: a quarter of C{api_max_in_flight}
        (at least 1); C{api_max_in_flight} or more: no cap of its own.
    @ivar api_queue_timeout: seconds a message may wait for a free request
        slot before it gets a temporary failure.
    @ivar api_breaker_failures: API calls in a row that failed transiently
        (each message or AUTH check counted once) after which messages fail
        fast until the API answers again; C{0} disables the breaker.
    @ivar api_breaker_cooldown: seconds between the relay's own probes of
        the API while the breaker is open (at least 0.1).
    @ivar derive_idempotency_keys: give messages that carry a Message-ID but
        no X-PostStack-Idempotency-Key a key derived from the credential,
        the envelope and the exact bytes, so a client's retry cannot send
        twice.
    @ivar max_connections: most client connections at once.
    @ivar max_connections_per_ip: most client connections from one address.
    @ivar transaction_timeout: seconds from MAIL to the end of DATA.
    @ivar max_errors: error replies tolerated per session without a
        delivered message.
    @ivar max_auth_failures: failed AUTH attempts per connection.
    @ivar max_connection_rate_per_ip: new connections per minute from one
        client address (IPv6: its /64), counted fleet-wide with
        C{redis_url}; 0: no limit.
    @ivar max_junk_commands: commands a client may send before it
        authenticates (AUTH itself not counted); 0: no limit.
    @ivar tls_handshake_timeout: seconds from TCP connect (or the PROXY
        header) to the end of the TLS handshake; 0: no limit.
    @ivar stress_threshold: percentage of C{max_connections} open at which
        the relay is under stress (short time-outs, shedding, C{/readyz}
        not ready); 0: never.
    @ivar stress_timeout: the idle time-out of unauthenticated and idle
        sessions under stress.
    @ivar drain_timeout: seconds a stopping relay lets transactions in
        flight finish; then every session still open is told C{421 4.3.2}.
    @ivar tls_profile: C{"intermediate"} (TLS 1.2 and 1.3, Mozilla's
        intermediate profile) or C{"modern"} (TLS 1.3 only).
    @ivar tls_reload_interval: seconds between checks of the certificate
        and key files for changes (0: only on SIGHUP).
    @ivar auth_failure_window: seconds AUTH failures are remembered.
    @ivar auth_failures_per_ip: failures from one address within the window
        before AUTH is refused with 454 4.7.0.
    @ivar auth_failures_per_user: failures for one mailbox from one address
        within the window before that mailbox's AUTH from that address is
        refused with 454 4.7.0 (failures for a mailbox from every address
        only make the delays grow).
    @ivar max_auth_rate_per_ip: AUTH attempts per client address per
        minute before 421 4.7.0 (0: no limit).
    @ivar auth_failure_delay: seconds of delay before the first 535; it
        doubles with each further failure.
    @ivar auth_failure_max_delay: the most a 535 is delayed.
    @ivar auth_cache_ttl: seconds a successful credential check is reused.
    @ivar auth_negative_ttl: seconds a failed credential check is reused.
    @ivar proxy_protocol: expect a PROXY protocol v1 or v2 header (HAProxy,
        TCP load balancers) before TLS on every connection; the header's
        source address is then the client address everywhere.
    @ivar systemd_socket: the C{FileDescriptorName=} of a listening socket
        passed by systemd (socket activation) to listen on instead of
        C{port} and C{interface}; C{""}: none.
    @ivar listen: further listeners beside the main one, each a spec
        string C{[INTERFACE:]PORT[,option...]} or C{systemd:NAME[,option...]}
        (see C{docs/configuration.md}).
    @ivar metrics_listen: C{HOST:PORT} of the HTTP listener serving
        C{/metrics}, C{/healthz} and C{/readyz}; C{"off"} (or C{""})
        disables it.
    @ivar log_format: C{"text"} (for people) or C{"json"} (one object per
        line, for log shippers).
    @ivar workers: how many relay processes share the listening ports
        under C{twistd}/C{twist} (L{poststack_relay.workers}); 1: the relay
        runs in the command's own process.  L{makeRelayService
        <poststack_relay.service.makeRelayService>} always builds one relay
        and ignores it.
    @ivar redis_url: C{redis://host:port/db} or C{rediss://...}: the relays
        of a fleet share failed-login counts and what the API said about a
        credential there (L{poststack_relay.fleet}); C{None}: each relay
        keeps its own (C{docs/shared-state.md}).
    @ivar redis_password: the Redis password (prefer the environment,
        C{POSTSTACK_RELAY_REDIS_PASSWORD}); never logged.
    @ivar redis_timeout: seconds each Redis call may take before the relay
        decides with its own memory.
    @ivar redis_tls_ca: a PEM file of the CA certificates that sign the
        Redis server's certificate, for C{rediss://} with a private CA;
        C{None}: the system's CAs.
    @ivar api_quota_hold: seconds a credential's quota 429 is remembered:
        its next C{MAIL FROM}s are answered with that 429's C{451 4.7.0}
        before any DATA (L{poststack_relay.holds}); 0: not remembered.
    @ivar sender_domain_hold: seconds a sender domain the API refused for
        a credential (not verified, not the account's, out of the key's
        scope) is remembered: C{MAIL FROM} on it with that credential gets
        C{550 5.7.1} before any DATA (L{poststack_relay.holds}); 0: not
        remembered.
    """

    tls_cert: str
    tls_key: Optional[str] = None
    port: int = attrs.field(default=DEFAULT_PORT, validator=_port)
    interface: str = ""
    api_url: str = DEFAULT_API_URL
    service_key: Optional[str] = attrs.field(default=None, repr=mask_secret)
    hostname: str = attrs.field(factory=_default_hostname)
    max_message_size: int = attrs.field(default=DEFAULT_MAX_MESSAGE_SIZE, validator=_positive)
    max_recipients: int = attrs.field(default=DEFAULT_MAX_RECIPIENTS, validator=_positive)
    large_message_size: int = attrs.field(default=DEFAULT_LARGE_MESSAGE_SIZE, validator=_positive)
    translate_threads: int = attrs.field(default=DEFAULT_TRANSLATE_THREADS, validator=_positive)
    idle_timeout: float = attrs.field(default=DEFAULT_IDLE_TIMEOUT, validator=_positive)
    tls_detect_timeout: float = attrs.field(
        default=DEFAULT_TLS_DETECT_TIMEOUT, validator=_not_negative
    )
    api_timeout: float = attrs.field(default=DEFAULT_API_TIMEOUT, validator=_positive)
    api_deadline: float = attrs.field(default=DEFAULT_API_DEADLINE, validator=_positive)
    api_max_in_flight: int = attrs.field(default=DEFAULT_API_MAX_IN_FLIGHT, validator=_positive)
    api_max_in_flight_per_credential: int = attrs.field(
        default=DEFAULT_API_MAX_IN_FLIGHT_PER_CREDENTIAL, validator=_not_negative
    )
    api_queue_timeout: float = attrs.field(default=DEFAULT_API_QUEUE_TIMEOUT, validator=_positive)
    api_breaker_failures: int = attrs.field(
        default=DEFAULT_API_BREAKER_FAILURES, validator=_not_negative
    )
    api_breaker_cooldown: float = attrs.field(
        default=DEFAULT_API_BREAKER_COOLDOWN, validator=_probe_interval
    )
    derive_idempotency_keys: bool = True
    max_connections: int = attrs.field(default=DEFAULT_MAX_CONNECTIONS, validator=_positive)
    max_connections_per_ip: int = attrs.field(
        default=DEFAULT_MAX_CONNECTIONS_PER_IP, validator=_positive
    )
    transaction_timeout: float = attrs.field(
        default=DEFAULT_TRANSACTION_TIMEOUT, validator=_positive
    )
    max_errors: int = attrs.field(default=DEFAULT_MAX_ERRORS, validator=_positive)
    max_auth_failures: int = attrs.field(default=DEFAULT_MAX_AUTH_FAILURES, validator=_positive)
    max_connection_rate_per_ip: int = attrs.field(
        default=DEFAULT_MAX_CONNECTION_RATE_PER_IP, validator=_not_negative
    )
    max_junk_commands: int = attrs.field(default=DEFAULT_MAX_JUNK_COMMANDS, validator=_not_negative)
    tls_handshake_timeout: float = attrs.field(
        default=DEFAULT_TLS_HANDSHAKE_TIMEOUT, validator=_not_negative
    )
    stress_threshold: int = attrs.field(default=DEFAULT_STRESS_THRESHOLD, validator=_percentage)
    stress_timeout: float = attrs.field(default=DEFAULT_STRESS_TIMEOUT, validator=_positive)
    drain_timeout: float = attrs.field(default=DEFAULT_DRAIN_TIMEOUT, validator=_not_negative)
    tls_profile: str = attrs.field(default="intermediate")
    tls_reload_interval: float = attrs.field(
        default=DEFAULT_TLS_RELOAD_INTERVAL, validator=_not_negative
    )
    auth_failure_window: float = attrs.field(
        default=DEFAULT_AUTH_FAILURE_WINDOW, validator=_positive
    )
    auth_failures_per_ip: int = attrs.field(
        default=DEFAULT_AUTH_FAILURES_PER_IP, validator=_positive
    )
    auth_failures_per_user: int = attrs.field(
        default=DEFAULT_AUTH_FAILURES_PER_USER, validator=_positive
    )
    auth_failure_delay: float = attrs.field(
        default=DEFAULT_AUTH_FAILURE_DELAY, validator=_not_negative
    )
    auth_failure_max_delay: float = attrs.field(
        default=DEFAULT_AUTH_FAILURE_MAX_DELAY, validator=_not_negative
    )
    auth_cache_ttl: float = attrs.field(default=DEFAULT_AUTH_CACHE_TTL, validator=_not_negative)
    auth_negative_ttl: float = attrs.field(
        default=DEFAULT_AUTH_NEGATIVE_TTL, validator=_not_negative
    )
    max_auth_rate_per_ip: int = attrs.field(
        default=DEFAULT_MAX_AUTH_RATE_PER_IP, validator=_not_negative
    )
    proxy_protocol: bool = False
    systemd_socket: str = ""
    listen: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    metrics_listen: str = DEFAULT_METRICS_LISTEN
    log_format: str = "text"
    workers: int = attrs.field(default=DEFAULT_WORKERS, validator=_workers)
    redis_url: Optional[str] = attrs.field(default=None, repr=redis_url_repr)
    redis_password: Optional[str] = attrs.field(
        default=None, repr=lambda v: "(set)" if v else "(unset)"
    )
    redis_timeout: float = attrs.field(default=DEFAULT_REDIS_TIMEOUT, validator=_positive)
    api_quota_hold: float = attrs.field(default=DEFAULT_API_QUOTA_HOLD, validator=_not_negative)
    sender_domain_hold: float = attrs.field(
        default=DEFAULT_SENDER_DOMAIN_HOLD, validator=_not_negative
    )
    redis_tls_ca: Optional[str] = None

    def __attrs_post_init__(self) -> None:
        if not self.api_url.startswith(("https://", "http://")):
            raise ConfigError(f"api-url must start with https:// or http://, not {self.api_url!r}")
        if self.tls_profile not in TLS_PROFILES:
            raise ConfigError(
                f"tls-profile must be one of {', '.join(TLS_PROFILES)}, not {self.tls_profile!r}"
            )
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(
                f"log-format must be one of {', '.join(LOG_FORMATS)}, not {self.log_format!r}"
            )
        if not self.hostname or any(c.isspace() for c in self.hostname):
            raise ConfigError(f"hostname must be a host name, not {self.hostname!r}")
        if self.metrics_enabled:
            _, metrics_port = parse_metrics_listen(self.metrics_listen)
            last = metrics_port + self.workers - 1
            if metrics_port != 0 and last > 65535:
                # Worker k serves its metrics on the metrics port + k.
                raise ConfigError(
                    f"workers {self.workers} need metrics ports {metrics_port} to {last}, "
                    "past 65535: lower the metrics-listen port"
                )
        self.listeners()
        self.redis()

    def redis(self) -> Optional[RedisURL]:
        """
        The Redis server of the fleet's shared state (C{redis_url}, with
        C{redis_password}), or C{None} without one.

        @raise ConfigError: the URL cannot be used.
        """
        if not self.redis_url:
            return None
        return parse_redis_url(self.redis_url, self.redis_password)

    @property
    def metrics_enabled(self) -> bool:
        """
        Whether the metrics listener runs: C{metrics_listen} is neither
        C{"off"} nor empty (empty is what an embedder may pass; from the
        command line, environment or file, empty means the default).
        """
        return self.metrics_listen.strip().lower() not in ("", "off")

    def main_listener(self) -> ListenerConfig:
        """
        The listener from C{port}, C{interface}, C{systemd_socket},
        C{proxy_protocol}, C{tls_cert} and C{tls_key}.
        """
        return ListenerConfig(
            interface=self.interface,
            port=self.port,
            systemd_socket=self.systemd_socket,
            proxy_protocol=self.proxy_protocol,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
        )

    def listeners(self) -> tuple[ListenerConfig, ...]:
        """
        Every listener: the main one first, then one per C{listen} spec in
        order (L{parse_listener}).

        @raise ConfigError: a spec cannot be parsed, or two listeners
            share an interface and port (port 0 excepted) or a systemd
            socket; the message starts with C{listen}.
        """
        main = self.main_listener()
        result = [main]
        for spec in self.listen:
            listener = parse_listener(spec, main)
            if listener.port != 0 or listener.systemd_socket:
                for other in result:
                    if other.address_key == listener.address_key:
                        which = "listener" if other.spec else "main listener"
                        raise ConfigError(
                            f"listen {spec!r}: the same address as the {which} {other.label}"
                        )
            result.append(listener)
        return tuple(result)
