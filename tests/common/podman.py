"""
The relay's container image under podman, for C{tests/test_container.py}:
where podman is (L{podman_or_skip}: a skip with a reason locally, a failure
under CI, where C{.ci/run} installs podman and builds the image), the flags
this kind of machine needs (L{PODMAN}, L{ULIMITS}: docs/deployment.md,
"Containers"), and L{Container}, one container started by a test and removed
by its own name at the test's clean-up.

The image is C{poststack-relay:VERSION} as C{make image} tags it.
"""

from __future__ import annotations

import json
import resource
import subprocess
import time
from typing import Any, Sequence


from poststack_relay._version import __version__
from tests.common.processes import find_tool, missing

__all__ = ["IMAGE", "PODMAN", "ULIMITS", "Container", "image_or_skip", "podman", "podman_or_skip"]

#: The image C{make image} builds.
IMAGE = f"poststack-relay:{__version__}"

_PODMAN = find_tool("podman")

#: podman and its global flags here: runc, cgroupfs (no systemd), events to a file.
PODMAN = [_PODMAN or "podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]


def _ulimits() -> list[str]:
    """Explicit ulimits within this process's hard limits (the defaults are refused here)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 65536 if hard == resource.RLIM_INFINITY else hard
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=4096:4096"]


#: The C{--ulimit} flags of every C{podman run}.
ULIMITS = _ulimits()


def podman_or_skip() -> None:
    """
    @raise SkipTest: podman is not installed (locally).
    @raise FailTest: instead, under CI, where C{.ci/run} installs it.
    """
    if _PODMAN is None:
        raise missing("podman is not installed (apt-get install podman runc mmdebstrap; .ci/run does)")


def podman(*args: str, timeout: float = 60.0, check: bool = True) -> "subprocess.CompletedProcess[str]":
    """Run C{podman ARGS} with L{PODMAN}'s flags (bounded in time); fail with its output if it fails."""
    done = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")
    return done


def image_or_skip() -> dict[str, Any]:
    """
    C{podman image inspect} of L{IMAGE}.

    @raise SkipTest: podman or the image is missing (locally; C{make image} builds it).
    @raise FailTest: instead, under CI.
    """
    podman_or_skip()
    done = podman("image", "inspect", IMAGE, check=False)
    if done.returncode != 0:
        raise missing(f"image {IMAGE} is not built (make image)")
    inspected: list[dict[str, Any]] = json.loads(done.stdout)
    return inspected[0]


class Container:
    """
    One detached container of L{IMAGE} named C{name}, run with C{options}
    (its C{--read-only} root, network, mounts and variables) and the
    C{--ulimit}s; L{remove} is registered as the test's clean-up.
    """

    def __init__(self, test: Any, name: str, options: Sequence[str]) -> None:
        self.name = name
        # Registered first: a container that was created but failed to start is removed too.
        test.addCleanup(self.remove)
        # No systemd here: the health check's timer is off, the check is run by hand.
        podman("run", "--detach", "--name", name, "--health-interval", "disable", *ULIMITS, *options, IMAGE)

    def logs(self) -> str:
        """What the relay wrote so far (stdout and stderr)."""
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def inspect(self) -> dict[str, Any]:
        """C{podman container inspect} of this container."""
        inspected: list[dict[str, Any]] = json.loads(podman("container", "inspect", self.name).stdout)
        return inspected[0]

    def wait_for_log(self, text: str, deadline: float = 30.0) -> None:
        """Wait (at most C{deadline} s) until the logs contain C{text}; fail if the container stops first."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if text in self.logs():
                return
            if not self.inspect()["State"]["Running"]:
                raise AssertionError(f"container {self.name} stopped:\n{self.logs()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"{text!r} not logged by {self.name} within {deadline} s:\n{self.logs()[-3000:]}")

    def wait(self, timeout: float = 60.0) -> int:
        """Wait until the container has exited; its exit code."""
        return int(podman("wait", self.name, timeout=timeout).stdout.strip())

    def remove(self) -> None:
        """Remove this container (stopping it first if it still runs)."""
        podman("rm", "--force", "--time", "5", self.name, check=False)
