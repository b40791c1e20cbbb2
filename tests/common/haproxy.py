"""
Debian's HAProxy as a real load balancer in front of the relay: where it
is (L{HAPROXY}, L{None} if not installed) and a bounded starter.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

__all__ = ["HAPROXY", "start_haproxy"]

HAPROXY = shutil.which("haproxy")


def start_haproxy(test: Any, directory: str, config: str) -> "subprocess.Popen[bytes]":
    """
    Run Debian's HAProxy in the foreground with C{config} (written into
    C{directory}); C{test} stops it (by its PID, bounded) in its cleanup.
    """
    assert HAPROXY is not None
    path = os.path.join(directory, "haproxy.cfg")
    with open(path, "w") as f:
        f.write(config)
    process = subprocess.Popen(
        [HAPROXY, "-db", "-f", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def stop() -> None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    test.addCleanup(stop)
    return process
