# -*- test-case-name: tests.e2e.test_nodemailer_runner -*-
"""
Run the pinned nodemailer scripts of C{tests/e2e/node/} from trial tests.

The scripts (see C{tests/e2e/node/_harness.mjs}) read C{SMTP_HOST},
C{SMTP_PORT}, C{SMTP_CA} (a PEM file trusted with servername C{localhost}) and
optionally C{SMTP_USER}/C{SMTP_PASS}, and print one JSON line on stdout.

Typical use in a C{twisted.trial.unittest.TestCase}::

    def setUp(self) -> None:
        reason = node_available()
        if reason is not None:
            raise SkipTest(reason)
        ensure_node_modules()

    async def test_send(self) -> None:
        result = await run_node_script(reactor, "page_html_tags.mjs", [], {
            "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(port), "SMTP_CA": pem_path,
        })
        self.assertTrue(result["ok"], result)

The scripts run as child processes of the reactor (L{run_tool}, the
runner the interop clients use too), so the relay under test keeps running
in the same reactor while nodemailer talks to it.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorProcess
from twisted.python.failure import Failure

from tests.common.processes import ToolResult, ToolTimeout, run_tool

__all__ = [
    "NODE_DIR",
    "MINIMUM_NODE_MAJOR",
    "NodeScriptError",
    "node_available",
    "ensure_node_modules",
    "run_node_script",
]

NODE_DIR: Path = Path(__file__).resolve().parent.parent / "e2e" / "node"
"""The directory holding C{package.json}, C{package-lock.json} and the scripts."""

MINIMUM_NODE_MAJOR = 20
"""The oldest Node.js major version the pinned nodemailer supports."""

NPM_CI_TIMEOUT = 300.0
"""Seconds C{npm ci} may take before L{ensure_node_modules} gives up."""

_MAX_OUTPUT = 4 * 1024 * 1024
"""Bytes kept per output stream of a script; more is a harness bug."""

_ensured = False


class NodeScriptError(Exception):
    """
    A script did not produce its JSON line: it timed out, crashed, exited
    with a non-zero status (2 means a harness bug) or printed something else.
    The message includes the script's stderr and stdout.
    """


def _node_major(node: str) -> int | None:
    """Return the major version of the C{node} binary, or L{None} if unknown."""
    try:
        out = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        return int(out.lstrip("v").split(".", 1)[0])
    except ValueError:
        return None


@functools.cache
def node_available() -> str | None:
    """
    Say whether the nodemailer scripts can run here (asked once per process).

    @return: L{None} if C{node} (at least version L{MINIMUM_NODE_MAJOR}) and
        C{npm} are on C{PATH}; otherwise a reason suitable for C{SkipTest}.
    """
    node = shutil.which("node")
    if node is None:
        return "node is not installed (needed for the nodemailer end-to-end tests)"
    if shutil.which("npm") is None:
        return "npm is not installed (needed to install the pinned nodemailer)"
    major = _node_major(node)
    if major is None:
        return f"cannot tell the version of {node}"
    if major < MINIMUM_NODE_MAJOR:
        return f"node {major} is too old: the pinned nodemailer needs node >= {MINIMUM_NODE_MAJOR}"
    return None


def _modules_current() -> bool:
    """
    Whether C{node_modules} was installed from the current lockfile: npm
    writes C{node_modules/.package-lock.json} on every install, so it must
    be at least as new as C{package-lock.json}, and nodemailer must be there.
    """
    marker = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    nodemailer = NODE_DIR / "node_modules" / "nodemailer" / "package.json"
    try:
        return (
            marker.stat().st_mtime >= lock.stat().st_mtime and nodemailer.is_file()
        )
    except FileNotFoundError:
        return False


def _tail(data: bytes | str | None, limit: int = 4000) -> str:
    """
    Some process output as text, at most about C{limit} characters: the start
    (where npm and node put the cause) and the end, with the middle elided.
    """
    if data is None:
        return ""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    if len(text) <= limit:
        return text
    head = limit // 2
    return f"{text[:head]}\n[... {len(text) - limit} characters elided ...]\n{text[-(limit - head):]}"


def ensure_node_modules() -> None:
    """
    Install the pinned nodemailer into C{tests/e2e/node/node_modules} with
    C{npm ci --no-audit --no-fund}, unless it is already installed from the
    current C{package-lock.json}.

    Blocks (at most L{NPM_CI_TIMEOUT} seconds); call it from C{setUp}, not while
    a relay is serving. Concurrent callers (several test processes) are
    serialised with a lock file in the temporary directory.

    @raise RuntimeError: if C{npm ci} fails or times out; the message holds
        the start and end of its output.
    """
    global _ensured
    if _ensured and _modules_current():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed; call node_available() first")
    digest = hashlib.sha256(str(NODE_DIR).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"poststack-relay-npm-ci-{digest}.lock"
    with open(lock_path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            if not _modules_current():
                try:
                    done = subprocess.run(
                        [npm, "ci", "--no-audit", "--no-fund"],
                        cwd=NODE_DIR,
                        capture_output=True,
                        timeout=NPM_CI_TIMEOUT,
                        stdin=subprocess.DEVNULL,
                    )
                except subprocess.TimeoutExpired as e:
                    raise RuntimeError(
                        f"npm ci in {NODE_DIR} did not finish within {NPM_CI_TIMEOUT:.0f} s;"
                        f"\nstdout: {_tail(e.stdout)}\nstderr: {_tail(e.stderr)}"
                    ) from e
                if done.returncode != 0:
                    raise RuntimeError(
                        f"npm ci in {NODE_DIR} failed with exit status {done.returncode};"
                        f"\nstdout: {_tail(done.stdout)}\nstderr: {_tail(done.stderr)}"
                    )
                if not _modules_current():
                    raise RuntimeError(
                        f"npm ci in {NODE_DIR} succeeded but node_modules/nodemailer is missing"
                    )
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    _ensured = True


def _parse_result(description: str, result: ToolResult) -> dict[str, Any]:
    """Turn a finished script's output into its JSON dict, or raise L{NodeScriptError}."""
    details = f"\nstderr: {_tail(result.stderr)}\nstdout: {_tail(result.stdout)}"
    if result.code != 0:
        how = f"exit status {result.code}" if result.code > 0 else f"signal {-result.code}"
        raise NodeScriptError(f"{description} failed ({how}; exit status 2 means a harness bug){details}")
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    if not lines:
        raise NodeScriptError(f"{description} printed nothing on stdout{details}")
    try:
        parsed = json.loads(lines[-1])
    except ValueError as e:
        raise NodeScriptError(f"{description}: last stdout line is not JSON ({e}){details}") from e
    if not isinstance(parsed, dict) or not isinstance(parsed.get("ok"), bool):
        raise NodeScriptError(f'{description}: last stdout line is not a {{"ok": ...}} object{details}')
    return parsed


def _not_run(reason: Failure) -> Failure:
    """A script killed (timed out or printing too much) fails with L{NodeScriptError}."""
    if reason.check(ToolTimeout):
        return Failure(NodeScriptError(_tail(str(reason.value), 8000)))
    return reason


def run_node_script(
    reactor: IReactorProcess,
    script: str,
    args: list[str],
    env: dict[str, str],
    timeout: float = 60,
) -> Deferred[dict[str, Any]]:
    """
    Run C{node <script> <args...>} in C{tests/e2e/node} without blocking the
    reactor (with L{run_tool}, the one child-process runner).

    @param reactor: provides L{IReactorProcess} and L{IReactorTime}.
    @param script: a file name in C{tests/e2e/node}, e.g. C{"rich.mjs"}.
    @param args: further arguments, e.g. C{["full"]}.
    @param env: the script's environment (C{SMTP_HOST}, C{SMTP_PORT},
        C{SMTP_CA}, optionally C{SMTP_USER}/C{SMTP_PASS}), added to C{PATH},
        C{HOME}, C{TMPDIR} and the locale of this process; nothing else of
        this process's environment is passed on. A relative C{SMTP_CA} is
        made absolute against this process's working directory.
    @param timeout: seconds before the script is killed (by its own PID).

    @return: a L{Deferred} firing with the script's JSON line as a dict
        (C{{"ok": True, ...}} or C{{"ok": False, ...}}), or failing with
        L{NodeScriptError} (timeout, non-zero exit, no JSON line; the message
        holds stderr). Cancelling it kills the script.
    """
    node = shutil.which("node")
    if node is None:
        return fail(NodeScriptError("node is not installed; call node_available() first"))
    path = NODE_DIR / script
    if not path.is_file() or path.parent != NODE_DIR:
        return fail(NodeScriptError(f"no script {script!r} in {NODE_DIR}"))
    description = f"node {script} {' '.join(args)}".rstrip()
    child_env = dict(env)
    if "SMTP_CA" in child_env:
        # The script runs in NODE_DIR: make a relative path (e.g. from
        # TestCase.mktemp()) mean what it means here.
        child_env["SMTP_CA"] = os.path.abspath(child_env["SMTP_CA"])
    running = run_tool(
        reactor, [node, str(path), *args], env=child_env, timeout=timeout, cwd=str(NODE_DIR),
        max_output=_MAX_OUTPUT,
    )
    result: Deferred[dict[str, Any]] = running.addCallbacks(
        lambda done: _parse_result(description, done), _not_run
    )
    return result
