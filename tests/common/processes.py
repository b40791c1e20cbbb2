"""
Ports and processes for the tests that start real programs on loopback:
the tree's root, the venv's C{twistd}, the sandbox's data file, a free
port, a bounded wait until a port accepts, and a bounded stop by PID; and
L{run_tool}, the one runner of child programs (real clients, Postfix's
commands, the nodemailer scripts) from the reactor the relay under test
runs in, bounded in time and output, killed by their own PID.

The children run with C{reactor.spawnProcess}: the relay under test lives
in the same reactor, so a blocking C{subprocess.run} would deadlock it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, NamedTuple, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import FailTest, SkipTest

__all__ = [
    "DATA",
    "DEFAULT_TIMEOUT",
    "MAX_OUTPUT",
    "ROOT",
    "TWISTD",
    "ToolResult",
    "ToolTimeout",
    "find_tool",
    "in_ci",
    "missing",
    "required_tool",
    "free_port",
    "run_tool",
    "stop_process",
    "wait_for_port",
]

#: The repository's root (the directory holding C{tests/}).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: The C{twistd} of the Python running the tests.
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
#: The sandbox's in-tree data: its API keys, mailboxes and domains.
DATA = os.path.join(ROOT, "etc", "sandbox.json")


def free_port() -> int:
    """A loopback port free right now (for programs that cannot report the one they chose)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: "subprocess.Popen[bytes]") -> None:
    """
    Stop a process this test started (by its own PID): SIGTERM, then SIGKILL
    if it has not exited within 20 s.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def wait_for_port(port: int, proc: "subprocess.Popen[bytes]", deadline: float = 30.0) -> None:
    """
    Wait (at most C{deadline} seconds) until something accepts on loopback
    C{port}; fail at once if C{proc} exits first.
    """
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            program = proc.args[0] if isinstance(proc.args, (list, tuple)) else proc.args
            raise AssertionError(f"{os.path.basename(str(program))} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"port {port} never opened ({deadline} s)")


# -- child programs from the reactor -----------------------------------------

DEFAULT_TIMEOUT = 60.0
"""Seconds a child may run before L{run_tool} kills it (by default)."""

_KILL_GRACE = 5.0
"""Seconds to wait for a killed child to be reaped before giving up on it."""

MAX_OUTPUT = 8 * 1024 * 1024
"""Bytes kept per output stream by default; a child printing more is killed."""

_EXTRA_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
"""Searched after C{PATH}: Postfix's commands live in C{/usr/sbin}."""

_BASE_ENV_KEYS = ("PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "SYSTEMROOT")
"""Variables of this process's environment handed to children; nothing else leaks in."""



def in_ci() -> bool:
    """Whether we run under CI (C{CI} is C{true}, C{1} or C{yes}): what a test needs must be there."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(reason: str) -> SkipTest | FailTest:
    """
    The exception for a test whose tool or set-up is missing: a skip with
    C{reason}, or, under CI (L{in_ci}: C{.ci/run} installs everything), a
    failure, since a missing piece there is a broken set-up.
    """
    if in_ci():
        return FailTest(f"{reason}; CI=true, so this is a failure, not a skip")
    return SkipTest(reason)


def required_tool(tool: str, install: str) -> str:
    """
    The absolute path of executable C{tool} (L{find_tool}).

    @param install: how to install it, for the reason (C{"apt-get install
        haproxy; .ci/run installs it"}).
    @raise SkipTest: it is missing (L{missing}).
    @raise FailTest: instead, under CI.
    """
    path = find_tool(tool)
    if path is None:
        raise missing(f"{tool} is not installed ({install})")
    return path


def find_tool(tool: str) -> str | None:
    """
    The absolute path of executable C{tool}, searched on C{PATH} and then in
    the sbin directories (C{postfix}, C{postmap} live there), or L{None}.
    """
    found = shutil.which(tool)
    if found is None:
        found = shutil.which(tool, path=os.pathsep.join(_EXTRA_DIRS))
    return os.path.abspath(found) if found is not None else None


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

    def __init__(self, stdin: bytes | None, ended: Callable[[Failure], None], max_output: int) -> None:
        self.stdin = stdin
        self.max_output = max_output
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
        if len(buffer) + len(data) > self.max_output:
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
    max_output: int = MAX_OUTPUT,
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
    @param max_output: bytes kept per output stream; a child printing more
        is killed.

    @return: a L{Deferred} firing with a L{ToolResult} whatever the exit
        status (non-zero is not an error here: tests assert on it), or
        failing with L{ToolTimeout} (output included) if the child ran too
        long or printed more than C{max_output} bytes on a stream. Cancelling it kills the child.
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

    proto = _Collector(data, ended, max_output)
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
