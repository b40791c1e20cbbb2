# -*- test-case-name: tests.interop.test_cli_clients,tests.interop.test_python_clients -*-
"""
Interop harness: relay + sandbox on loopback TLS (from L{tests.common.relay})
plus a way to run real command-line clients against them.

The clients run as child processes started with C{reactor.spawnProcess}:
the relay under test lives in the same reactor, so a blocking
C{subprocess.run} would deadlock it. Every run is bounded by a timeout after
which the child (and only it, by its PID) is killed.

Typical use::

    class SwaksTests(InteropTestCase):
        tools = ("swaks",)

        async def test_send(self) -> None:
            result = await self.run_tool(
                [self.tool("swaks"), "--server", "127.0.0.1", "--port", str(self.port), ...]
            )
            self.assertEqual(result.code, 0, result.output)
            email = self.only_email()

A missing tool skips the test with a reason naming the tool, except when the
environment variable C{CI} is C{true} (or C{1}/C{yes}): there it fails, so CI
cannot pass while silently skipping interop. C{make interop} runs
C{tests/interop/install.sh} first, which installs every tool.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
from typing import Any, Callable, NamedTuple, Sequence

from twisted.internet import reactor as _global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import FailTest, SkipTest

from tests.common.relay import RelayTestCase

__all__ = [
    "DEFAULT_TIMEOUT",
    "InteropTestCase",
    "ToolResult",
    "ToolTimeout",
    "attachment_summary",
    "find_tool",
    "in_ci",
    "run_tool",
    "sha256",
    "skip_unless",
]

DEFAULT_TIMEOUT = 60.0
"""Seconds a client may run before L{run_tool} kills it."""

_KILL_GRACE = 5.0
"""Seconds to wait for a killed child to be reaped before giving up on it."""

_MAX_OUTPUT = 8 * 1024 * 1024
"""Bytes kept per output stream; a client printing more is killed."""

_EXTRA_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
"""Searched after C{PATH}: Postfix's commands live in C{/usr/sbin}."""

_BASE_ENV_KEYS = ("PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
"""Variables of this process's environment handed to clients; nothing else leaks in."""


def in_ci() -> bool:
    """Whether we run under CI (C{CI} is C{true}, C{1} or C{yes}): missing tools then fail."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def find_tool(tool: str) -> str | None:
    """
    The absolute path of executable C{tool}, searched on C{PATH} and then in
    the sbin directories (C{postfix}, C{postmap} live there), or L{None}.
    """
    found = shutil.which(tool)
    if found is None:
        found = shutil.which(tool, path=os.pathsep.join(_EXTRA_DIRS))
    return os.path.abspath(found) if found is not None else None


def skip_unless(tool: str) -> str:
    """
    Return the absolute path of executable C{tool}.

    @raise SkipTest: if it is missing, with a reason naming the tool and
        C{make interop}.
    @raise FailTest: instead of skipping when L{in_ci}: CI installs every tool
        (C{tests/interop/install.sh}), so a missing one is a broken set-up.
    """
    path = find_tool(tool)
    if path is not None:
        return path
    reason = (
        f"{tool} is not installed: run `make interop` (tests/interop/install.sh installs it)"
    )
    if in_ci():
        raise FailTest(f"{reason}; CI=true, so this is a failure, not a skip")
    raise SkipTest(reason)


class ToolResult(NamedTuple):
    """
    How a client run ended; unpacks as C{(code, stdout, stderr)}.

    @ivar code: the exit status, or minus the signal number if a signal
        ended the process.
    @ivar stdout: what it printed on stdout (UTF-8, undecodable bytes replaced).
    @ivar stderr: the same for stderr.
    """

    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """stdout and stderr together, for assertions and failure messages."""
        return f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"


class ToolTimeout(Exception):
    """A client did not exit within its timeout and was killed; the message holds its output."""


class _Collector(ProcessProtocol):
    """Feeds stdin, collects stdout/stderr and reports the end of the process."""

    def __init__(self, stdin: bytes | None, ended: Callable[[Failure], None]) -> None:
        self.stdin = stdin
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.overflow = False
        self._ended = ended

    def connectionMade(self) -> None:
        assert self.transport is not None
        if self.stdin:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def _keep(self, buffer: bytearray, data: bytes) -> None:
        if len(buffer) + len(data) > _MAX_OUTPUT:
            if not self.overflow and self.transport is not None:
                _kill(self.transport)
            self.overflow = True
            return
        buffer.extend(data)

    def outReceived(self, data: bytes) -> None:
        self._keep(self.stdout, data)

    def errReceived(self, data: bytes) -> None:
        self._keep(self.stderr, data)

    def processEnded(self, reason: Failure) -> None:
        self._ended(reason)


def _kill(transport: IProcessTransport) -> None:
    """Send SIGKILL to the one process behind C{transport}, if it still runs."""
    try:
        transport.signalProcess("KILL")
    except ProcessExitedAlready:
        pass


def _exit_code(reason: Failure) -> int:
    if reason.check(ProcessDone):
        return 0
    if reason.check(ProcessTerminated):
        value = reason.value
        if value.exitCode is not None:
            return int(value.exitCode)
        if value.signal is not None:
            return -int(value.signal)
    return -int(signal.SIGKILL)


def run_tool(
    reactor: IReactorProcess,
    argv: Sequence[str],
    *,
    stdin: bytes | str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    cwd: str | None = None,
) -> Deferred[ToolResult]:
    """
    Run C{argv} as a child process without blocking the reactor.

    @param reactor: provides L{IReactorProcess} and L{IReactorTime}.
    @param argv: the command; C{argv[0]} is an absolute path (see
        L{skip_unless}) or a name found by L{find_tool}.
    @param stdin: bytes (or text, encoded as UTF-8) written to the child's
        stdin, which is then closed; L{None} closes it at once.
    @param env: variables added to C{PATH}, C{HOME}, C{TMPDIR}, C{TZ} and the
        locale of this process; nothing else of this environment is passed.
    @param timeout: seconds before the child is killed with SIGKILL.
    @param cwd: the child's working directory (default: this process's).

    @return: a L{Deferred} firing with a L{ToolResult} whatever the exit
        status (non-zero is not an error here: tests assert on it), or
        failing with L{ToolTimeout} (output included) if the child ran too
        long or printed more than 8 MiB per stream. Cancelling it kills the child.
    """
    program = argv[0]
    if not os.path.isabs(program):
        found = find_tool(program)
        if found is None:
            raise FileNotFoundError(f"{program} is not installed")
        program = found
    clock = IReactorTime(reactor)
    description = " ".join(argv)
    child_env = {k: os.environ[k] for k in _BASE_ENV_KEYS if k in os.environ}
    if env:
        child_env.update(env)
    data = stdin.encode("utf-8") if isinstance(stdin, str) else stdin

    result: Deferred[ToolResult] = Deferred(lambda _: _kill(transport))
    calls: list[IDelayedCall] = []
    timed_out: list[bool] = []

    def ended(reason: Failure) -> None:
        for call in calls:
            if call.active():
                call.cancel()
        if result.called:
            return
        out = proto.stdout.decode("utf-8", "replace")
        err = proto.stderr.decode("utf-8", "replace")
        if timed_out or proto.overflow:
            why = f"timed out after {timeout} s" if timed_out else "printed too much"
            result.errback(
                ToolTimeout(f"{description} {why} and was killed\nstdout: {out}\nstderr: {err}")
            )
            return
        result.callback(ToolResult(_exit_code(reason), out, err))

    proto = _Collector(data, ended)
    transport = reactor.spawnProcess(
        proto, program, [program, *argv[1:]], env=child_env, path=cwd
    )
    pid = transport.pid

    def give_up() -> None:
        if not result.called:
            result.errback(
                ToolTimeout(
                    f"{description} (pid {pid}) timed out after {timeout} s"
                    f" and did not exit {_KILL_GRACE} s after SIGKILL"
                )
            )

    def on_timeout() -> None:
        timed_out.append(True)
        _kill(transport)
        calls.append(clock.callLater(_KILL_GRACE, give_up))

    calls.append(clock.callLater(timeout, on_timeout))
    return result


def sha256(data: bytes) -> str:
    """The hex SHA-256 of C{data}."""
    return hashlib.sha256(data).hexdigest()


def attachment_summary(payload: dict[str, Any]) -> list[tuple[str, str, str]]:
    """
    The attachments of a stored API request as C{(filename, content_type,
    sha256 of the decoded content)}, in request order; C{[]} if none.
    """
    return [
        (a["filename"], a["content_type"], sha256(base64.b64decode(a["content"], validate=True)))
        for a in payload.get("attachments", [])
    ]


class InteropTestCase(RelayTestCase):
    """
    Relay + sandbox on loopback TLS (see L{RelayTestCase}: C{self.port},
    C{self.cafile} (certificate for C{localhost} and C{127.0.0.1}),
    C{self.api_url}, C{self.sandbox}, C{self.stored()}), plus real clients.

    Set C{tools} to the executables a class needs: C{setUp} checks them with
    L{skip_unless} before starting anything, and L{tool} returns their paths.
    The relay has the sandbox's service key, so mailbox logins
    (L{MAILBOX}) work.
    """

    tools: tuple[str, ...] = ()
    relay_options: dict[str, Any] = {"tls_detect_timeout": 1.0}

    def setUp(self) -> Deferred[None]:
        self._tool_paths = {tool: skip_unless(tool) for tool in self.tools}
        self._workdir: str | None = None
        return super().setUp()

    def tool(self, name: str) -> str:
        """The absolute path of C{name}, which must be listed in C{tools}."""
        return self._tool_paths[name]

    def workdir(self) -> str:
        """This test's own scratch directory (absolute, created once, removed by trial)."""
        if self._workdir is None:
            self._workdir = os.path.abspath(self.mktemp())
            os.makedirs(self._workdir)
        return self._workdir

    def write_file(self, name: str, data: bytes | str, mode: int = 0o600) -> str:
        """Write C{data} to C{name} in L{workdir} with permissions C{mode}; return its path."""
        path = os.path.join(self.workdir(), name)
        with open(path, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(path, mode)
        return path

    def run_tool(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        cwd: str | None = None,
    ) -> Deferred[ToolResult]:
        """L{run_tool} with the global reactor (the one the relay runs in)."""
        return run_tool(
            _global_reactor,  # type: ignore[arg-type]
            argv,
            stdin=stdin,
            env=env,
            timeout=timeout,
            cwd=cwd,
        )

    def only_email(self) -> Any:
        """The one email the sandbox stored; fails the test if there is not exactly one."""
        emails = self.stored()
        self.assertEqual(len(emails), 1, [e.payload for e in emails])
        return emails[0]

    def assertHeader(self, payload: dict[str, Any], name: str, value: str) -> None:
        """C{payload["headers"]} has C{name} (case-insensitively) with exactly C{value}."""
        headers = {k.lower(): v for k, v in payload.get("headers", {}).items()}
        self.assertEqual(headers.get(name.lower()), value, payload.get("headers"))
