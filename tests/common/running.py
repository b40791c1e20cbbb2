"""
The relay's programs as an operator starts them, for the tests of the
C{poststack-relay} command and of the installed wheel: the sandbox API as
its own process, a program started with its output kept in a file (stopped
by its own PID at the test's clean-up), and the relay's TLS greeting read
as a client reads it.

Blocking calls: for L{SynchronousTestCase}s.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from tests.common.processes import DATA, ROOT, TWISTD, free_port, stop_process, wait_for_port

__all__ = [
    "COMMAND",
    "COMMAND_LINE",
    "Started",
    "read_banner",
    "relay_environment",
    "start_program",
    "start_sandbox",
]

#: The C{poststack-relay} command of the Python running the tests (C{make
#: venv} installs it), or the Python itself where there is none.
COMMAND = Path(sys.executable).with_name("poststack-relay")
#: How to run that command: the script, or the same entry point.
COMMAND_LINE = (
    [str(COMMAND)]
    if COMMAND.is_file()
    else [sys.executable, "-c", "import sys; from poststack_relay.command import main; "
          "sys.argv[0] = 'poststack-relay'; main()"]
)


class Started:
    """
    A program started by L{start_program}: its process and its output file.
    """

    def __init__(self, process: "subprocess.Popen[bytes]", log: str) -> None:
        self.process = process
        self.log = log

    def output(self) -> str:
        """What the program wrote (standard output and error) so far."""
        with open(self.log, "rb") as f:
            return f.read().decode("utf-8", "replace")


def start_program(
    test: Any, directory: str, name: str, args: Sequence[str], env: Mapping[str, str]
) -> Started:
    """
    Start C{args} in C{directory} with the environment C{env} (as it is),
    its output in C{directory}/C{name}.log; the test's clean-up stops it
    (SIGTERM, then SIGKILL: L{stop_process}).
    """
    log = os.path.join(directory, f"{name}.log")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            list(args), cwd=directory, env=dict(env), stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    test.addCleanup(stop_process, process)
    return Started(process, log)


def start_sandbox(test: Any, directory: str) -> str:
    """
    The sandbox API (C{twistd -n poststack-sandbox} of the tests' own
    Python and tree) on a free loopback port, ready; returns its URL.
    """
    port = free_port()
    sandbox = start_program(
        test, directory, "sandbox",
        [TWISTD, "-n", "--pidfile=", "poststack-sandbox", "--port", str(port), "--interface", "127.0.0.1",
         "--db", "sandbox.sqlite3", "--data", DATA],
        dict(os.environ, PYTHONPATH=ROOT),
    )
    wait_for_port(port, sandbox.process)
    return f"http://127.0.0.1:{port}"


def relay_environment(base: Mapping[str, str], port: int, cert: str, key: str, api_url: str) -> dict[str, str]:
    """
    C{base} plus the settings of C{make run}'s relay, as
    C{POSTSTACK_RELAY_*} variables: loopback C{port}, the certificate,
    the sandbox's URL and service key, C{localhost} as the name, and the
    metrics listener on a port of the system's choice.
    """
    return dict(
        base,
        POSTSTACK_RELAY_PORT=str(port),
        POSTSTACK_RELAY_INTERFACE="127.0.0.1",
        POSTSTACK_RELAY_TLS_CERT=cert,
        POSTSTACK_RELAY_TLS_KEY=key,
        POSTSTACK_RELAY_API_URL=api_url,
        POSTSTACK_RELAY_SERVICE_KEY="sk_test_relay_service",
        POSTSTACK_RELAY_HOSTNAME="localhost",
        POSTSTACK_RELAY_METRICS_LISTEN="127.0.0.1:0",
    )


def read_banner(port: int, cafile: str, timeout: float = 10.0) -> bytes:
    """
    The first line the relay on loopback C{port} sends over TLS, the
    certificate checked against C{cafile} for C{localhost}.
    """
    context = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            line = b""
            while not line.endswith(b"\n") and len(line) < 1024:
                chunk = tls.recv(1024)
                if not chunk:
                    break
                line += chunk
            return line
