# -*- test-case-name: tests.interop.test_postfix -*-
"""
A private Postfix instance that uses the relay as its smarthost, for the
interop tests.

Each L{PostfixInstance} has its own C{config_directory} (its own C{main.cf}
and C{master.cf}), C{queue_directory}, C{data_directory} and log file,
all under one test directory. It is never the system Postfix: every
command gets C{-c}/C{-C} with the instance's directory. Its C{master.cf}
has no C{smtpd} and no other listener, so it opens no port at all: mail
enters with C{sendmail -C DIR} (pickup), goes through cleanup and qmgr,
and leaves through the C{smtp} client to C{relayhost}, the relay on
loopback, with implicit TLS (C{smtp_tls_wrappermode}), a verified
certificate (C{smtp_tls_security_level = secure}) and SASL PLAIN/LOGIN
with the API key (C{smtp_sasl_password_maps}).

Postfix runs its master as root and wants root-owned queue directories,
so these tests need root (CI runs as root). Postfix >= 3.4 writes its log
to C{maillog_file} through C{postlogd}, without syslog: the tests read
delivery status lines from it (L{PostfixInstance.deliveries}).

Every command runs as a child process through a runner with a timeout
(L{tests.common.interop.run_tool}); waits poll with a bound in time. The
instance is stopped with C{postfix -c DIR stop}; if that fails, its master
(identified by PID and by its C{MAIL_CONFIG}) and its process group are
killed with SIGKILL, never anything found by name.
"""

from __future__ import annotations

import glob
import os
import re
import signal
from typing import Callable, NamedTuple, Protocol, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from tests.common.processes import ToolResult

__all__ = [
    "MIN_VERSION",
    "Delivery",
    "PostfixCommands",
    "PostfixInstance",
    "RunTool",
    "parse_deliveries",
    "parse_version",
    "postfix_problem",
    "sasl_plugins",
]

MIN_VERSION = (3, 4)
"""
Oldest Postfix the tests support: C{smtp_tls_wrappermode} needs 3.0,
C{maillog_file} and C{postlogd} (logging without syslog) need 3.4.
"""

MAX_SOCKET_PATH = 107
"""
Longest Unix socket path (C{sun_path} holds 108 bytes with its NUL). Postfix
reaches C{postlogd} by the absolute path C{QUEUE/public/postlog}, so the
instance must live in a short directory (e.g. from C{tempfile.mkdtemp()}),
not in a deep test directory.
"""

POLL_INTERVAL = 0.1
"""Seconds between two looks at the log file or the queue."""

COMMAND_TIMEOUT = 30.0
"""Seconds any one Postfix command may run."""

SASL_PLUGIN_GLOBS = (
    "/usr/lib/*/sasl2/libplain.so*",
    "/usr/lib/*/sasl2/liblogin.so*",
    "/usr/lib/sasl2/libplain.so*",
    "/usr/lib/sasl2/liblogin.so*",
    "/usr/lib64/sasl2/libplain.so*",
    "/usr/lib64/sasl2/liblogin.so*",
)
"""Where Cyrus SASL's PLAIN and LOGIN client plugins (Debian: C{libsasl2-modules}) live."""


class RunTool(Protocol):
    """
    What runs the Postfix commands: the shape of
    L{tests.common.interop.InteropTestCase.run_tool} (a child process,
    fed C{stdin}, killed after C{timeout} seconds).
    """

    def __call__(
        self, argv: Sequence[str], *, stdin: bytes | str | None = None, timeout: float = ...
    ) -> Deferred[ToolResult]:
        """Run C{argv}; fire with how it ended."""


class PostfixCommands(NamedTuple):
    """
    The installed Postfix: its version and the absolute paths of the
    commands the tests run.
    """

    version: tuple[int, ...]
    postfix: str
    postconf: str
    postqueue: str
    sendmail: str


class Delivery(NamedTuple):
    """
    One delivery attempt as logged by Postfix's C{smtp} client, e.g.
    C{ABC123: to=<user@example.com>, relay=localhost[127.0.0.1]:4321, ...,
    dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as em_...)}.
    """

    queue_id: str
    recipient: str
    relay: str
    dsn: str
    status: str
    text: str


_DELIVERY = re.compile(
    r"postfix/smtp\[\d+\]: (?P<queue_id>[0-9A-Za-z]+): to=<(?P<recipient>[^>]*)>,"
    r"(?: orig_to=<[^>]*>,)? relay=(?P<relay>[^,]+), .*?"
    r"dsn=(?P<dsn>\d\.\d{1,3}\.\d{1,3}), status=(?P<status>[a-z]+) \((?P<text>.*)\)$",
    re.M,
)


def parse_deliveries(log: str) -> list[Delivery]:
    """The C{smtp} client's delivery lines in Postfix log text C{log}, in order."""
    return [Delivery(**m.groupdict()) for m in _DELIVERY.finditer(log)]


def parse_version(text: str) -> tuple[int, ...] | None:
    """C{(3, 7, 11)} from C{"3.7.11"} (C{postconf -h mail_version}); L{None} if unreadable."""
    match = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        return None
    return tuple(int(part) for part in match.groups() if part is not None)


def sasl_plugins() -> list[str]:
    """The Cyrus SASL PLAIN/LOGIN plugin files on this machine (none: Postfix cannot log in)."""
    return sorted({path for pattern in SASL_PLUGIN_GLOBS for path in glob.glob(pattern)})


async def postfix_problem(run: RunTool, postconf: str) -> tuple[str | None, PostfixCommands | None]:
    """
    Whether this machine can run a private Postfix that relays through us.

    @param run: runs a command (see L{RunTool}).
    @param postconf: the absolute path of C{postconf}.
    @return: C{(None, commands)} when it can, else C{(reason, None)} with a
        reason that says what to install or change.
    """
    if os.geteuid() != 0:
        return "Postfix needs root to run its master and own its queue (CI runs as root)", None
    result = await run(
        [postconf, "-d", "-h", "mail_version", "command_directory", "sendmail_path"],
        timeout=COMMAND_TIMEOUT,
    )
    lines = result.stdout.splitlines()
    if result.code != 0 or len(lines) != 3:
        return f"postconf -d failed: {result.output}", None
    version = parse_version(lines[0])
    if version is None:
        return f"unreadable Postfix version {lines[0]!r}", None
    if version < MIN_VERSION:
        return (
            f"Postfix {lines[0]} is too old: smtp_tls_wrappermode needs 3.0, maillog_file 3.4",
            None,
        )
    commands = PostfixCommands(
        version=version,
        postfix=os.path.join(lines[1], "postfix"),
        postconf=postconf,
        postqueue=os.path.join(lines[1], "postqueue"),
        sendmail=lines[2],
    )
    for path in (commands.postfix, commands.postqueue, commands.sendmail):
        if not os.access(path, os.X_OK):
            return f"Postfix command {path} is missing", None
    result = await run([postconf, "-A"], timeout=COMMAND_TIMEOUT)
    if "cyrus" not in result.stdout.split():
        return (
            f"this Postfix has no Cyrus SASL client (postconf -A: {result.stdout.strip()!r})",
            None,
        )
    if not sasl_plugins():
        return (
            "Cyrus SASL has no PLAIN/LOGIN plugin: install libsasl2-modules"
            " (without it Postfix logs 'no mechanism available' and defers)",
            None,
        )
    return None, commands


class PostfixInstance:
    """
    One private Postfix whose C{relayhost} is the relay.

    @ivar directory: the instance's top directory (absolute).
    @ivar config_directory: holds C{main.cf}, C{master.cf}, C{sasl_passwd}.
    @ivar queue_directory: the mail queue (root-owned, created by
        C{postfix check}).
    @ivar data_directory: Postfix's own data (owned by C{mail_owner}).
    @ivar maillog: the log file written by C{postlogd}.
    """

    def __init__(
        self,
        directory: str,
        commands: PostfixCommands,
        run: RunTool,
        clock: IReactorTime,
        *,
        relay_port: int,
        cafile: str,
        password: str,
        username: str = "poststack",
        relay_host: str = "localhost",
        settings: dict[str, str] | None = None,
    ) -> None:
        """
        @param directory: a short directory for this instance (see
            L{MAX_SOCKET_PATH}); it is created if missing.
        @param commands: from L{postfix_problem}.
        @param run: runs a command (see L{RunTool}).
        @param clock: for the waits.
        @param relay_port: the relay's port on loopback.
        @param cafile: the PEM certificate(s) Postfix trusts for the relay.
        @param password: the SASL password (the API key).
        @param username: the SASL username.
        @param relay_host: the relay's name: Postfix connects to it and
            matches it against the certificate.
        @param settings: C{main.cf} settings added to (or replacing) the
            defaults of L{main_cf}.
        """
        self.directory = os.path.abspath(directory)
        self.commands = commands
        self._run = run
        self._clock = clock
        self.relay_port = relay_port
        self.cafile = cafile
        self.username = username
        self.password = password
        self.relay_host = relay_host
        self.settings = dict(settings or {})
        self.config_directory = os.path.join(self.directory, "conf")
        self.queue_directory = os.path.join(self.directory, "queue")
        self.data_directory = os.path.join(self.directory, "data")
        self.maillog = os.path.join(self.directory, "maillog")
        self._started = False
        longest = os.path.join(self.queue_directory, "public", "postlog")
        if len(os.fsencode(longest)) > MAX_SOCKET_PATH:
            raise ValueError(
                f"{longest} is too long for a Unix socket: give Postfix a shorter directory"
            )

    @property
    def nexthop(self) -> str:
        """The C{relayhost} value: C{[localhost]:PORT} (brackets: no MX lookup)."""
        return f"[{self.relay_host}]:{self.relay_port}"

    def main_cf(self) -> dict[str, str]:
        """The instance's C{main.cf} settings, in order."""
        compatibility = "3.6" if self.commands.version >= (3, 6) else "2"
        settings = {
            "compatibility_level": compatibility,
            "config_directory": self.config_directory,
            "queue_directory": self.queue_directory,
            "data_directory": self.data_directory,
            # Logging to a file, without syslog (Postfix >= 3.4, via postlogd).
            "maillog_file": self.maillog,
            "maillog_file_prefixes": self.directory,
            # No listener in master.cf; and nothing is delivered locally.
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "myhostname": "localhost",
            "mydomain": "localhost",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_transport": "error:local delivery is disabled",
            "alias_maps": "",
            "alias_database": "",
            # The relay as smarthost.
            "relayhost": self.nexthop,
            # Resolve relay_host with /etc/hosts, never with DNS.
            "smtp_dns_support_level": "disabled",
            # Implicit TLS (RFC 8314), with the relay's certificate verified
            # against smtp_tls_CAfile and matched against relay_host.
            "smtp_tls_wrappermode": "yes",
            "smtp_tls_security_level": "secure",
            "smtp_tls_secure_cert_match": "nexthop",
            "smtp_tls_CAfile": self.cafile,
            "smtp_tls_loglevel": "1",
            # SASL with the API key; texthash needs no postmap.
            "smtp_sasl_auth_enable": "yes",
            "smtp_sasl_password_maps": f"texthash:{self.sasl_passwd}",
            "smtp_sasl_security_options": "noanonymous",
            "smtp_sasl_tls_security_options": "noanonymous",
            # Short retry timers, for the tests only.
            "queue_run_delay": "2s",
            "minimal_backoff_time": "2s",
            "maximal_backoff_time": "4s",
        }
        settings.update(self.settings)
        return settings

    @property
    def sasl_passwd(self) -> str:
        """The path of the SASL password map (C{texthash:} format)."""
        return os.path.join(self.config_directory, "sasl_passwd")

    def master_cf(self) -> str:
        """
        The instance's C{master.cf}: the services of the pickup -> cleanup ->
        qmgr -> smtp path and what they call, with no chroot and no
        C{inet} (listening) service at all.
        """
        services = [
            ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
            ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
            ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
            ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"),
            ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
            ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
            ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
            ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
            ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
            ("error", "unix", "-", "-", "n", "-", "-", "error"),
            ("retry", "unix", "-", "-", "n", "-", "-", "error"),
            ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
            ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
            ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
            ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
        ]
        return "".join(
            " ".join(f"{field:<10}" for field in row).rstrip() + "\n" for row in services
        )

    def write_config(self) -> None:
        """Write C{main.cf}, C{master.cf} and the SASL password map."""
        os.makedirs(self.config_directory, mode=0o755, exist_ok=True)
        with open(os.path.join(self.config_directory, "main.cf"), "w", encoding="utf-8") as f:
            for name, value in self.main_cf().items():
                f.write(f"{name} = {value}\n")
        with open(os.path.join(self.config_directory, "master.cf"), "w", encoding="utf-8") as f:
            f.write(self.master_cf())
        fd = os.open(self.sasl_passwd, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{self.nexthop} {self.username}:{self.password}\n")

    async def _command(self, argv: Sequence[str], stdin: bytes | None = None) -> ToolResult:
        return await self._run(list(argv), stdin=stdin, timeout=COMMAND_TIMEOUT)

    async def start(self) -> None:
        """
        Write the configuration, create the queue (C{postfix check}) and
        start the master (C{postfix start}, which returns once it runs).

        @raise RuntimeError: if a step fails, with its output.
        """
        self.write_config()
        # Postfix's daemons run as mail_owner and open files in
        # data_directory by absolute path: every directory above must be
        # searchable by it (tempfile.mkdtemp() makes 0700 ones).
        os.chmod(self.directory, 0o755)
        os.makedirs(self.queue_directory, mode=0o755, exist_ok=True)
        os.chmod(self.queue_directory, 0o755)
        for action in ("check", "start"):
            result = await self._command(
                [self.commands.postfix, "-c", self.config_directory, action]
            )
            if result.code != 0:
                raise RuntimeError(
                    f"postfix {action} failed ({result.code}):\n{result.output}\n"
                    f"--- maillog ---\n{self.log()}"
                )
            if action == "start":
                self._started = True
        if self.master_pid() is None:
            raise RuntimeError(f"postfix start succeeded but no master runs\n{self.log()}")

    def master_pid(self) -> int | None:
        """
        The PID of this instance's running master, or L{None}: the PID in
        its C{pid/master.pid}, if that process runs with this instance's
        C{MAIL_CONFIG} (so a reused PID is never taken for ours).
        """
        try:
            with open(
                os.path.join(self.queue_directory, "pid", "master.pid"), encoding="ascii"
            ) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except (OSError, ValueError):
            return None
        if b"MAIL_CONFIG=" + os.fsencode(self.config_directory) not in environ:
            return None
        return pid

    async def stop(self) -> None:
        """
        Stop the master with C{postfix stop} (it waits up to 5 s, then kills
        its process group); if a master still runs after that, or the
        command fails or times out, kill its process group by PID.
        """
        if not self._started:
            return
        try:
            await self._command([self.commands.postfix, "-c", self.config_directory, "stop"])
        except Exception:
            pass
        deadline = self._clock.seconds() + 10.0
        while self.master_pid() is not None and self._clock.seconds() < deadline:
            await deferLater(self._clock, POLL_INTERVAL, lambda: None)
        pid = self.master_pid()
        if pid is not None:
            # The master runs in its own session, so its process group is
            # this instance's processes, and only them.
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._started = False

    async def sendmail(
        self, message: bytes, sender: str, recipients: Sequence[str], *options: str
    ) -> ToolResult:
        """
        Submit C{message} with C{sendmail -C DIR -i -f sender -- recipients}
        (what an application on the host does); returns how it ended.
        """
        argv = [self.commands.sendmail, "-C", self.config_directory, "-i", *options, "-f", sender]
        return await self._command([*argv, "--", *recipients], stdin=message)

    async def flush(self) -> ToolResult:
        """Ask for an immediate delivery attempt of the whole queue (C{postqueue -f})."""
        return await self._command([self.commands.postqueue, "-c", self.config_directory, "-f"])

    async def queue_listing(self) -> str:
        """What C{postqueue -p} shows (C{Mail queue is empty} when it is)."""
        result = await self._command([self.commands.postqueue, "-c", self.config_directory, "-p"])
        if result.code != 0:
            raise RuntimeError(f"postqueue -p failed:\n{result.output}")
        return result.stdout

    async def wait_not_active(self, queue_id: str, timeout: float = 60.0) -> None:
        """
        Wait until message C{queue_id} sits in the queue with no delivery
        under way (C{postqueue -p} shows it without the active-queue C{*}).

        @raise AssertionError: after C{timeout} seconds, with the queue.
        """
        deadline = self._clock.seconds() + timeout
        pattern = re.compile(rf"^{re.escape(queue_id)}\s", re.M)
        while True:
            listing = await self.queue_listing()
            if pattern.search(listing):
                return
            if self._clock.seconds() >= deadline:
                raise AssertionError(
                    f"{queue_id} not waiting in the queue after {timeout} s:\n{listing}"
                )
            await deferLater(self._clock, 0.25, lambda: None)

    def log(self) -> str:
        """The whole log so far ('' before the first line)."""
        try:
            with open(self.maillog, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def deliveries(self) -> list[Delivery]:
        """Every delivery attempt logged so far, in order."""
        return parse_deliveries(self.log())

    async def wait_for_deliveries(
        self, predicate: Callable[[list[Delivery]], bool], timeout: float = 60.0
    ) -> list[Delivery]:
        """
        Poll the log until C{predicate(deliveries)} holds; return the
        deliveries then.

        @raise AssertionError: after C{timeout} seconds, with the log.
        """
        deadline = self._clock.seconds() + timeout
        while True:
            deliveries = self.deliveries()
            if predicate(deliveries):
                return deliveries
            if self._clock.seconds() >= deadline:
                raise AssertionError(
                    f"Postfix did not log the expected deliveries within {timeout} s;"
                    f" log:\n{self.log()}"
                )
            await deferLater(self._clock, POLL_INTERVAL, lambda: None)

    async def wait_for_status(
        self, status: str, count: int = 1, timeout: float = 60.0
    ) -> list[Delivery]:
        """Wait until at least C{count} deliveries ended with C{status}; return those."""
        found = await self.wait_for_deliveries(
            lambda ds: sum(d.status == status for d in ds) >= count, timeout
        )
        return [d for d in found if d.status == status]

    async def wait_queue_empty(self, timeout: float = 60.0) -> None:
        """
        Wait until the queue is empty (every message delivered, bounced or
        discarded, bounce notices included).

        @raise AssertionError: after C{timeout} seconds, with the queue and the log.
        """
        deadline = self._clock.seconds() + timeout
        while True:
            listing = await self.queue_listing()
            if "Mail queue is empty" in listing:
                return
            if self._clock.seconds() >= deadline:
                raise AssertionError(
                    f"Postfix queue not empty after {timeout} s:\n{listing}\nlog:\n{self.log()}"
                )
            await deferLater(self._clock, 0.25, lambda: None)
