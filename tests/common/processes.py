"""
Ports and processes for the tests that start real programs on loopback:
the tree's root, the venv's C{twistd}, the sandbox's data file, a free
port, a bounded wait until a port accepts, and a bounded stop by PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

__all__ = ["DATA", "ROOT", "TWISTD", "free_port", "stop_process", "wait_for_port"]

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
