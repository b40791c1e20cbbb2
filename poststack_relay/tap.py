# -*- test-case-name: tests.test_tap,tests.test_config_file,tests.test_shutdown,tests.test_tls_reload,tests.test_workers,tests.test_command,tests.test_startup_lines -*-
"""
The C{twistd poststack-relay} command: options in, service out.

Every option may also come from the environment as C{POSTSTACK_RELAY_}
followed by the option's name in capitals with C{_} for C{-} (for example
C{POSTSTACK_RELAY_SERVICE_KEY}), so secrets stay off the command line, and
from a TOML file given with C{--config} (or C{POSTSTACK_RELAY_CONFIG}) whose
keys are the option names with C{_} for C{-} (C{max_message_size = 26214400}).
Precedence: command line, then environment, then the file, then the defaults.
C{--check-config} validates everything and prints the effective settings.
With C{--workers N} above 1 the command runs a supervisor of N relay
processes (L{poststack_relay.workers}) instead of the relay itself.
"""

from __future__ import annotations

import json
import os
import signal
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Protocol, Sequence, cast

from twisted.application.service import IService
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger
from twisted.python import usage

from . import config as _config
from .config import ConfigError, RelayConfig, mask_secret, read_config_file
from .helptext import NO_BREAK_HYPHEN, describe, nearest_option
from .interfaces import IRelayReactor
from .places import DEFAULT_PORT

if TYPE_CHECKING:
    from .service import RelayService
    from .workers import Supervisor

ENV_PREFIX = "POSTSTACK_RELAY_"

_log = Logger()


def _boolean(value: str) -> bool:
    """
    yes/no, true/false, on/off, 1/0.
    """
    lowered = value.strip().lower()
    if lowered in ("yes", "true", "on", "1"):
        return True
    if lowered in ("no", "false", "off", "0"):
        return False
    raise ValueError(value)


_boolean.__name__ = "yes/no value"


def _listen_specs(value: "str | list[str] | tuple[str, ...]") -> tuple[str, ...]:
    """
    Listener specs: from the environment one string of specs separated by
    white space, from the command line and the config file a list.
    """
    if isinstance(value, str):
        return tuple(value.split())
    return tuple(value)


_listen_specs.__name__ = "list of listener specs"

# (name, converter, RelayConfig field, help)
_OPTIONS: list[tuple[str, Callable[[str], Any], str, str]] = [
    ("port", int, "port", f"TCP port for implicit TLS [default: {DEFAULT_PORT}]"),
    ("interface", str, "interface",
     "address to listen on; :: for IPv6 (on Linux IPv4 too) [default: all IPv4 interfaces]"),
    ("proxy-protocol", _boolean, "proxy_protocol",
     "expect a PROXY protocol v1/v2 header before TLS (behind HAProxy or a TCP load balancer) "
     "(yes/no) [default: no]"),
    ("systemd-socket", str, "systemd_socket",
     "FileDescriptorName= of a socket passed by systemd to listen on instead of --port and "
     "--interface (socket activation) [default: none]"),
    ("listen", _listen_specs, "listen",
     "one more listener, [INTERFACE:]PORT or systemd:NAME, optionally followed by "
     ",proxy-protocol ,tls-cert=PATH ,tls-key=PATH; may be given several times "
     "(environment: specs separated by spaces) [default: none]"),
    ("tls-cert", str, "tls_cert", "PEM certificate, may hold the full chain (required)"),
    ("tls-key", str, "tls_key", "PEM private key [default: read from --tls-cert]"),
    ("api-url", str, "api_url", f"PostStack API base URL [default: {_config.DEFAULT_API_URL}]"),
    ("service-key", str, "service_key", "the relay's own API key, for mailbox logins (prefer the environment)"),
    ("hostname", str, "hostname", "name in the greeting and EHLO reply [default: this host's FQDN]"),
    ("max-message-size", int, "max_message_size",
     f"largest message in octets [default: {_config.DEFAULT_MAX_MESSAGE_SIZE}]"),
    ("max-recipients", int, "max_recipients",
     f"most recipients per message [default: {_config.DEFAULT_MAX_RECIPIENTS}]"),
    ("large-message-size", int, "large_message_size",
     "octets from which a message is checked against the MIME limits while it arrives and "
     f"translated in a thread, off the event loop [default: {_config.DEFAULT_LARGE_MESSAGE_SIZE}]"),
    ("translate-threads", int, "translate_threads",
     f"threads translating large messages at once [default: {_config.DEFAULT_TRANSLATE_THREADS}]"),
    ("idle-timeout", float, "idle_timeout",
     f"seconds a client may stay silent [default: {_config.DEFAULT_IDLE_TIMEOUT:g}]"),
    ("tls-detect-timeout", float, "tls_detect_timeout",
     "seconds to wait for a TLS ClientHello before telling a plaintext client the port "
     f"needs TLS; 0 disables [default: {_config.DEFAULT_TLS_DETECT_TIMEOUT:g}]"),
    ("api-timeout", float, "api_timeout",
     f"seconds one API attempt may take [default: {_config.DEFAULT_API_TIMEOUT:g}]"),
    ("api-deadline", float, "api_deadline",
     "seconds all attempts for one message may take, retries included "
     f"[default: {_config.DEFAULT_API_DEADLINE:g}]"),
    ("api-max-in-flight", int, "api_max_in_flight",
     f"most API requests at once [default: {_config.DEFAULT_API_MAX_IN_FLIGHT}]"),
    ("api-max-in-flight-per-credential", int, "api_max_in_flight_per_credential",
     "most API sends at once for one API key or mailbox; 0: a quarter of --api-max-in-flight "
     f"[default: {_config.DEFAULT_API_MAX_IN_FLIGHT_PER_CREDENTIAL}]"),
    ("api-queue-timeout", float, "api_queue_timeout",
     "seconds a message may wait for a free API request slot "
     f"[default: {_config.DEFAULT_API_QUEUE_TIMEOUT:g}]"),
    ("api-breaker-failures", int, "api_breaker_failures",
     "API calls in a row failing transiently (each message counted once) before failing fast; "
     f"0 disables [default: {_config.DEFAULT_API_BREAKER_FAILURES}]"),
    ("api-breaker-cooldown", float, "api_breaker_cooldown",
     "seconds between the relay's own API probes while failing fast; the first answer ends it "
     f"[default: {_config.DEFAULT_API_BREAKER_COOLDOWN:g}]"),
    ("derive-idempotency-keys", _boolean, "derive_idempotency_keys",
     "derive an idempotency key for messages with a Message-ID (yes/no) [default: yes]"),
    ("max-connections", int, "max_connections",
     f"most client connections at once [default: {_config.DEFAULT_MAX_CONNECTIONS}]"),
    ("max-connections-per-ip", int, "max_connections_per_ip",
     f"most client connections from one address [default: {_config.DEFAULT_MAX_CONNECTIONS_PER_IP}]"),
    ("transaction-timeout", float, "transaction_timeout",
     f"seconds from MAIL to the end of DATA [default: {_config.DEFAULT_TRANSACTION_TIMEOUT:g}]"),
    ("max-errors", int, "max_errors",
     f"error replies per session before disconnecting [default: {_config.DEFAULT_MAX_ERRORS}]"),
    ("max-auth-failures", int, "max_auth_failures",
     f"failed AUTH attempts per connection [default: {_config.DEFAULT_MAX_AUTH_FAILURES}]"),
    ("max-connection-rate-per-ip", int, "max_connection_rate_per_ip",
     "new connections per minute from one address (IPv6: its /64), fleet-wide with --redis-url; "
     f"0: no limit [default: {_config.DEFAULT_MAX_CONNECTION_RATE_PER_IP}]"),
    ("max-junk-commands", int, "max_junk_commands",
     "commands a client may send before it authenticates (NOOP, RSET, EHLO...); 0: no limit "
     f"[default: {_config.DEFAULT_MAX_JUNK_COMMANDS}]"),
    ("tls-handshake-timeout", float, "tls_handshake_timeout",
     "seconds a connection may take to finish its TLS handshake; 0: no limit "
     f"[default: {_config.DEFAULT_TLS_HANDSHAKE_TIMEOUT:g}]"),
    ("stress-threshold", int, "stress_threshold",
     "percent of --max-connections open at which the relay is under stress: short time-outs, "
     "oldest idle unauthenticated sessions shed, /readyz not ready; 0: never "
     f"[default: {_config.DEFAULT_STRESS_THRESHOLD}]"),
    ("stress-timeout", float, "stress_timeout",
     "idle time-out of unauthenticated and idle sessions under stress "
     f"[default: {_config.DEFAULT_STRESS_TIMEOUT:g}]"),
    ("tls-profile", str, "tls_profile",
     "intermediate (TLS 1.2 + 1.3) or modern (TLS 1.3 only) [default: intermediate]"),
    ("tls-reload-interval", float, "tls_reload_interval",
     "seconds between checks of the certificate files for changes; 0: only on SIGHUP "
     f"[default: {_config.DEFAULT_TLS_RELOAD_INTERVAL:g}]"),
    ("auth-failure-window", float, "auth_failure_window",
     f"seconds AUTH failures are remembered [default: {_config.DEFAULT_AUTH_FAILURE_WINDOW:g}]"),
    ("auth-failures-per-ip", int, "auth_failures_per_ip",
     "AUTH failures from one address in the window before 454 "
     f"[default: {_config.DEFAULT_AUTH_FAILURES_PER_IP}]"),
    ("auth-failures-per-user", int, "auth_failures_per_user",
     "AUTH failures for one mailbox from one address in the window before 454 for that "
     f"mailbox from that address [default: {_config.DEFAULT_AUTH_FAILURES_PER_USER}]"),
    ("auth-failure-delay", float, "auth_failure_delay",
     "seconds before the first 535, doubling per failure "
     f"[default: {_config.DEFAULT_AUTH_FAILURE_DELAY:g}]"),
    ("auth-failure-max-delay", float, "auth_failure_max_delay",
     f"longest delay of a 535 [default: {_config.DEFAULT_AUTH_FAILURE_MAX_DELAY:g}]"),
    ("drain-timeout", float, "drain_timeout",
     "seconds a stopping relay lets transactions in flight finish; then each still open "
     f"is told 421 4.3.2 [default: {_config.DEFAULT_DRAIN_TIMEOUT:g}]"),
    ("auth-cache-ttl", float, "auth_cache_ttl",
     f"seconds a good credential check is reused [default: {_config.DEFAULT_AUTH_CACHE_TTL:g}]"),
    ("max-auth-rate-per-ip", int, "max_auth_rate_per_ip",
     "AUTH attempts per client address per minute before 421; 0: no limit "
     f"[default: {_config.DEFAULT_MAX_AUTH_RATE_PER_IP}]"),
    ("metrics-listen", str, "metrics_listen",
     "HOST:PORT of the HTTP listener for /metrics (Prometheus), /healthz and /readyz; "
     f"off disables it [default: {_config.DEFAULT_METRICS_LISTEN}]"),
    ("log-format", str, "log_format",
     "text (for people) or json (one object per line, for log shippers) [default: text]"),
    ("workers", int, "workers",
     "relay processes sharing the listening ports, for several CPU cores, supervised by this "
     f"process; 1: the relay runs in this process [default: {_config.DEFAULT_WORKERS}]"),
    ("api-quota-hold", float, "api_quota_hold",
     "seconds a credential's quota 429 is remembered: its next MAIL FROMs get that 451 before "
     f"any DATA; 0: not remembered [default: {_config.DEFAULT_API_QUOTA_HOLD:g}]"),
    ("sender-domain-hold", float, "sender_domain_hold",
     "seconds a sender domain the API refused (e.g. not verified) is remembered per credential: "
     "MAIL FROM on it gets 550 5.7.1 before any DATA; 0: not remembered "
     f"[default: {_config.DEFAULT_SENDER_DOMAIN_HOLD:g}]"),
    ("redis-url", str, "redis_url",
     "redis://HOST:PORT/DB or rediss://...: share AUTH failure counts and what the API said "
     "about a credential with the other relays of a fleet [default: none, each relay alone]"),
    ("redis-password", str, "redis_password",
     "the Redis password (prefer the environment: POSTSTACK_RELAY_REDIS_PASSWORD)"),
    ("redis-tls-ca", str, "redis_tls_ca",
     "PEM file of the CAs that sign the Redis server's certificate (rediss://) "
     "[default: the system's CAs]"),
    ("redis-timeout", float, "redis_timeout",
     "seconds a Redis call may take before the relay decides alone "
     f"[default: {_config.DEFAULT_REDIS_TIMEOUT:g}]"),
]

# Options that may be given several times on the command line.
REPEATABLE_OPTIONS = ("listen",)


# Options whose values are secrets: masked by --check-config.
SECRET_OPTIONS = ("service-key", "redis-password")

# Where a setting came from, as --check-config prints it.
SOURCE_COMMAND_LINE = "command line"
SOURCE_ENVIRONMENT = "environment"
SOURCE_FILE = "file"
SOURCE_DEFAULT = "default"

# The TOML type each converter expects in the config file.
_FILE_TYPES: dict[Callable[[str], Any], tuple[tuple[type, ...], str]] = {
    int: ((int,), "an integer"),
    float: ((int, float), "a number"),
    str: ((str,), "a string"),
    _boolean: ((bool,), "true or false"),
    _listen_specs: ((list,), "an array of strings"),
}


def file_key(option: str) -> str:
    """
    The config file key of an option: C{max-message-size} -> C{max_message_size}.
    """
    return option.replace("-", "_")


def _file_values(path: str, table: Mapping[str, Any]) -> dict[str, Any]:
    """
    The settings of a config file's top-level C{table}, by option name,
    converted like the command line's.

    @raise ConfigError: one line for an unknown key or a value of the
        wrong TOML type.
    """
    by_key = {file_key(name): (name, convert) for name, convert, _, _ in _OPTIONS}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in by_key:
            hint = f" (write {file_key(key)})" if file_key(key) in by_key else ""
            raise ConfigError(f"config file {path!r}: unknown key {key!r}{hint}")
        name, convert = by_key[key]
        types, wanted = _FILE_TYPES[convert]
        # bool is an int in Python, but true is not a number in TOML.
        if (
            isinstance(value, bool) != (convert is _boolean)
            or not isinstance(value, types)
            or (isinstance(value, list) and not all(isinstance(v, str) for v in value))
        ):
            raise ConfigError(f"config file {path!r}: {key} must be {wanted}, not {value!r}")
        if value == "":
            continue  # as in the environment: empty means unset
        if convert is _listen_specs:
            values[name] = _listen_specs(cast("list[str]", value))
        elif convert is float:
            values[name] = float(cast(float, value))
        else:
            values[name] = value
    return values


def _toml_value(value: Any) -> str:
    """
    A setting as TOML would write it; C{(unset)} for C{None}.
    """
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def describe_settings(config: RelayConfig, sources: Mapping[str, str]) -> list[str]:
    """
    The effective settings, one C{name = value  # source} line per option,
    with secrets masked: what C{--check-config} prints.

    @param sources: option name -> where its value came from; options not
        in it came from the defaults.
    """
    lines: list[str] = []
    for name, _, field, _ in _OPTIONS:
        value = getattr(config, field)
        if name == "redis-url" and value:
            value = str(config.redis())  # a password in the URL is never shown
        shown = (
            _toml_value(mask_secret(value) if value else None)
            if name in SECRET_OPTIONS
            else _toml_value(value)
        )
        lines.append(f"{file_key(name)} = {shown}  # {sources.get(name, SOURCE_DEFAULT)}")
    return lines


def env_name(option: str) -> str:
    """
    The environment variable for an option: C{tls-cert} -> C{POSTSTACK_RELAY_TLS_CERT}.
    """
    return ENV_PREFIX + option.upper().replace("-", "_")


class Options(usage.Options):
    """
    Options of C{twistd poststack-relay}; C{postOptions} builds
    C{self.config}, a L{RelayConfig}.
    """

    synopsis = "[options]"
    # Empty, not None: usage.Options would show __main__'s docstring instead.
    # getUsage shows DESCRIPTION, wrapped paragraph by paragraph.
    longdesc = ""
    DESCRIPTION = """\
PostStack SMTP relay: implicit-TLS SMTP submission (RFC 8314) in, one
PostStack POST /emails per message out.

Every option can also be set in the environment, e.g.
POSTSTACK_RELAY_TLS_CERT=/etc/poststack-relay/fullchain.pem or
POSTSTACK_RELAY_SERVICE_KEY=sk_live_..., or in a TOML file given with
--config, keys written with _ for - (max_message_size = 26214400).
Precedence: command line, environment, file, defaults. --check-config
validates the settings and prints them (secrets masked) without starting.

Example (the same as twistd -n --pidfile= poststack-relay with these options):

    poststack-relay --tls-cert fullchain.pem --tls-key privkey.pem \\
        --hostname smtp.example.com
"""

    optFlags = [
        ["check-config", None,
         "validate the settings (certificate and key included), print them and exit"],
    ]
    optParameters = [
        ["config", None, None,
         f"TOML file of settings, keys like max_message_size (env {ENV_PREFIX}CONFIG)"],
    ] + [[name, None, None, help] for name, _, _, help in _OPTIONS if name not in REPEATABLE_OPTIONS]

    config: RelayConfig
    sources: dict[str, str]

    def __init__(self, environ: Optional[Mapping[str, str]] = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # usage.Options: unannotated in Twisted
        self._environ = os.environ if environ is None else environ
        self["listen"] = None

    def getUsage(self, width: Optional[int] = None) -> str:
        """
        The option table, then L{DESCRIPTION}.  usage.Options wraps each
        help text with textwrap's defaults, which cut words at hyphens
        (C{--tls-} / C{cert}) and keep the indentation of a docstring as
        runs of spaces, and wraps the long description as one paragraph:
        here each help text is one line of words joined by single spaces,
        with hyphens that do not break while it is wrapped, and the
        description is wrapped paragraph by paragraph, its indented
        example lines shown as written.
        """
        if not width:
            width = int(os.environ.get("COLUMNS", "80"))
        docs = self.docs
        self.docs = {
            name: " ".join(doc.split()).replace("-", NO_BREAK_HYPHEN) if doc else doc
            for name, doc in docs.items()
        }
        try:
            table = super().getUsage(width).replace(NO_BREAK_HYPHEN, "-")
        finally:
            self.docs = docs
        return table + describe(self.DESCRIPTION, width)

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        """
        Parse the command line (see L{postOptions}).  A mistaken option
        ends the command with one line naming it and the nearest option
        (C{did you mean --metrics-listen?}), exit status 1, instead of
        twistd's whole usage text.
        """
        try:
            super().parseOptions(options)  # type: ignore[no-untyped-call]  # usage.Options: unannotated in Twisted
        except usage.UsageError as e:
            names = [name.rstrip("=") for name in self.longOpt]
            raise SystemExit(f"poststack-relay: error: {e}{nearest_option(str(e), names)} "
                             "(--help lists the options)")

    def opt_version(self) -> None:
        """
        Display the relay's version and exit.
        """
        from twisted.copyright import version as twisted_version

        from ._version import __version__

        print(f"poststack-relay {__version__} (Twisted {twisted_version})", flush=True)
        raise SystemExit(0)

    def opt_listen(self, spec: str) -> None:
        """
        (Its help is the C{listen} entry of the option table, set below.)
        """
        self["listen"] = [*(self["listen"] or []), spec]

    opt_listen.__doc__ = next(help for name, _, _, help in _OPTIONS if name == "listen")

    def postOptions(self) -> None:
        """
        Build C{self.config} from the command line, the environment, the
        config file and the defaults, and C{self.sources}, where each
        option came from.  Any bad setting (command line, environment or
        file) ends the command with one line (L{SystemExit}, status 1);
        C{--check-config} prints the settings and exits 0.
        """
        check = bool(self["check-config"])
        try:
            self._build()
        except ConfigError as e:
            raise SystemExit(f"poststack-relay: error: {e}")
        except usage.UsageError as e:
            # One line, not twistd's whole usage text: the operator needs
            # the bad setting, not the list of every option.
            raise SystemExit(f"poststack-relay: error: {e}")
        if check:
            try:
                check_certificates(self.config)
            except ConfigError as e:
                raise SystemExit(f"poststack-relay: error: {e}")
            print("\n".join(describe_settings(self.config, self.sources)), flush=True)
            raise SystemExit(0)

    def _build(self) -> None:
        """
        Set C{self.config} and C{self.sources}.

        @raise ConfigError: the config file cannot be used (one line).
        @raise usage.UsageError: a bad value on the command line or in the
            environment, or a setting L{RelayConfig} refuses.
        """
        path = self["config"] or self._environ.get(ENV_PREFIX + "CONFIG") or None
        from_file = _file_values(path, read_config_file(path)) if path else {}
        values: dict[str, Any] = {}
        self.sources = {}
        for name, convert, field, _ in _OPTIONS:
            raw = self[name]
            source, where = SOURCE_COMMAND_LINE, f"--{name}"
            if raw is None:
                raw = self._environ.get(env_name(name))
                source, where = SOURCE_ENVIRONMENT, env_name(name)
            if raw is None or raw == "":
                if name in from_file:
                    values[field] = from_file[name]
                    self.sources[name] = SOURCE_FILE
                continue
            try:
                values[field] = convert(raw)
            except ValueError:
                raise usage.UsageError(f"{where}: not a valid {convert.__name__}: {raw!r}")
            self.sources[name] = source
        if "tls_cert" not in values:
            raise usage.UsageError(
                f"--tls-cert (or {env_name('tls-cert')}, or tls_cert in the config file) is required: "
                "implicit TLS needs a certificate"
            )
        try:
            self.config = RelayConfig(**values)
        except ConfigError as e:
            # RelayConfig's messages start with the option's name.
            culprit = str(e).split(" ", 1)[0]
            if self.sources.get(culprit) == SOURCE_FILE:
                raise ConfigError(f"config file {path!r}: {e}")
            raise usage.UsageError(str(e))


def load_config(environ: Optional[Mapping[str, str]] = None) -> RelayConfig:
    """
    The settings C{poststack-relay} would run with given no command-line
    options: the C{POSTSTACK_RELAY_*} variables of C{environ} (default:
    this process's environment), then the TOML file C{POSTSTACK_RELAY_CONFIG}
    names, then the defaults, read and checked by the same code as the
    plugin's.  For embedding (C{etc/poststack-relay.tac}).

    @raise ConfigError: a bad setting, in the command's one line.
    """
    options = Options(environ)
    try:
        options._build()
    except usage.UsageError as e:
        raise ConfigError(str(e)) from None
    return options.config


def with_log_format(
    service: IService, config: RelayConfig, runner_options: Optional[Any] = None
) -> IService:
    """
    C{service} made to log as C{config.log_format} says under the runner
    whose options are C{runner_options} (C{twistd}'s or C{twist}'s; C{None}
    in a C{.tac}: standard output, as C{twistd -n}), see
    L{poststack_relay.logs.use_log_observer}.  Add the result to the
    application.
    """
    from .logs import use_json_logs, use_text_logs

    if config.log_format == "json":
        return use_json_logs(service, runner_options)
    return use_text_logs(service, runner_options)


def check_certificates(config: RelayConfig) -> None:
    """
    Load every listener's certificate and key once, as start-up does
    (what C{--check-config} checks, and the supervisor of C{--workers}
    before it starts any worker).

    @raise ConfigError: one line, starting with C{listen 'SPEC':} for the
        certificate of a C{listen} spec.
    """
    from .tls import load_certificate_options

    checked: set[tuple[str, Optional[str]]] = set()
    for listener in config.listeners():
        files = (listener.tls_cert, listener.tls_key)
        if files in checked:
            continue
        checked.add(files)
        try:
            load_certificate_options(files[0], files[1], config.tls_profile)
        except ConfigError as e:
            if not listener.spec:
                raise
            raise ConfigError(f"listen {listener.spec!r}: {e}") from None


def stop_on_sigterm(reactor: IRelayReactor) -> None:
    """
    Make SIGTERM stop C{reactor} as a normal, successful stop.

    Twisted's own SIGTERM handler also stops the reactor, but records the
    signal, and C{twistd}/C{twist} then kill themselves with it after the
    clean shutdown (exit status -15, "terminated by signal").  SIGTERM is
    how systemd and container runtimes ask a service to stop, and the
    relay drains gracefully on it, so it ends with status 0.  Call this
    once the reactor runs (after Twisted installed its handlers).
    """

    def stop() -> None:
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass  # a second SIGTERM while already stopping

    def handler(signum: int, frame: Any) -> None:
        _log.info("Received SIGTERM, shutting down gracefully", event="sigterm")
        reactor.callFromThread(stop)

    signal.signal(signal.SIGTERM, handler)


class Reloadable(Protocol):
    """
    A service whose TLS certificates SIGHUP reloads: the relay
    (L{poststack_relay.service.RelayService}) or the C{--workers}
    supervisor.
    """

    def reload_tls(self, trigger: str = ...) -> object:
        """
        Load the certificate and key files again; C{trigger} is for the log.
        """


def reload_tls_on_sighup(reactor: IRelayReactor, service: Reloadable) -> None:
    """
    Make SIGHUP reload the TLS certificate and key: C{service.reload_tls}
    (L{poststack_relay.service.RelayService.reload_tls}) runs on the
    reactor thread.  This is what C{systemctl reload} does with
    C{ExecReload=/bin/kill -HUP $MAINPID}, for example from an ACME deploy
    hook.  Call this once the reactor runs.
    """

    def handler(signum: int, frame: Any) -> None:
        _log.info("Received SIGHUP, reloading the TLS certificate", event="sighup")
        reactor.callFromThread(service.reload_tls, "SIGHUP")

    signal.signal(signal.SIGHUP, handler)


def makeService(options: Options) -> IService:
    """
    Build the relay for twistd.  A certificate or key that cannot be used
    ends the command with one line on stderr and exit status 1.  SIGTERM
    stops the relay gracefully with exit status 0 (L{stop_on_sigterm});
    SIGHUP reloads the TLS certificate and key (L{reload_tls_on_sighup}).

    With C{--workers N} above 1 the service is a
    L{poststack_relay.workers.Supervisor} of N relay processes instead
    (the certificates are loaded once here first, so a bad one is the same
    one-line error); SIGTERM stops them all, SIGHUP is passed on to each,
    and workers that cannot start make the command exit with status 1.

    A listener that cannot bind ends the command with one line and exit
    status 1 (L{poststack_relay.listening.report_listen_failures}).

    The relay is wrapped so that the runner logs through the relay's own
    observer: with C{--log-format text} (the default) twistd's own lines,
    written for less CPU (L{poststack_relay.logs.use_text_logs}); with
    C{--log-format json} one JSON object per line
    (L{poststack_relay.logs.use_json_logs}).  Under twistd the result is a
    L{poststack_relay.logs.LogObserverService} whose C{service} is the
    relay (or the supervisor).
    """
    from twisted.internet import reactor as global_reactor

    # The global reactor provides everything the relay needs of one
    # (IRelayReactor); nothing declares that combination, hence the cast.
    reactor = cast(IRelayReactor, global_reactor)
    from .memory import freeze_start_up_objects, return_large_blocks

    # This process is the relay's own: large blocks go back to the system
    # when freed, and what start-up made is left out of full garbage
    # collections (poststack_relay.memory; docs/performance.md).
    from .listening import report_listen_failures

    return_large_blocks()
    reactor.callWhenRunning(freeze_start_up_objects)
    report_listen_failures()
    service: RelayService | Supervisor
    if options.config.workers > 1:
        from .workers import Supervisor, exit_with

        try:
            check_certificates(options.config)
            service = Supervisor(options.config, reactor)
        except ConfigError as e:
            raise SystemExit(f"poststack-relay: error: {e}")
        supervisor = service
        reactor.addSystemEventTrigger(
            "after", "shutdown", lambda: exit_with(supervisor.exit_status)
        )
    else:
        from .service import makeRelayService

        try:
            service = makeRelayService(options.config, reactor)
        except ConfigError as e:
            raise SystemExit(f"poststack-relay: error: {e}")
    reactor.callWhenRunning(stop_on_sigterm, reactor)
    reactor.callWhenRunning(reload_tls_on_sighup, reactor, service)
    return with_log_format(service, options.config, getattr(options, "parent", None))
