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
import os
from typing import Any, Sequence

from twisted.internet import reactor as _global_reactor
from twisted.internet.defer import Deferred

from tests.common.corpus import sha256
from tests.common.processes import DEFAULT_TIMEOUT, ToolResult, required_tool, run_tool
from tests.common.relay import RelayTestCase

__all__ = ["InteropTestCase", "attachment_summary", "skip_unless"]


def skip_unless(tool: str) -> str:
    """
    Return the absolute path of executable C{tool}.

    @raise SkipTest: if it is missing, with a reason naming the tool and
        C{make interop}.
    @raise FailTest: instead of skipping under CI: CI installs every tool
        (C{tests/interop/install.sh}), so a missing one is a broken set-up.
    """
    return required_tool(tool, "run `make interop`: tests/interop/install.sh installs it")


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
