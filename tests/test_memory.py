"""
Tests for L{poststack_relay.memory}: glibc's mmap threshold fixed so that
large blocks go back to the system when freed.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from poststack_relay.memory import MMAP_THRESHOLD, freeze_start_up_objects, return_large_blocks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates and frees a 20 MiB block three times; prints how much more
# memory the process holds afterwards (kB).
_SCRIPT = """
import sys
from poststack_relay.memory import return_large_blocks

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

if sys.argv[1] == "fixed" and not return_large_blocks():
    sys.exit("not set")
before = rss()
for _ in range(3):
    block = b"x" * (20 * 1024 * 1024)
    del block
print(rss() - before)
"""


class FakeLibc:
    def __init__(self, answer: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.answer = answer

    def mallopt(self, option: int, value: int) -> int:
        self.calls.append((option, value))
        return self.answer


class ReturnLargeBlocksTests(SynchronousTestCase):
    """
    L{return_large_blocks}: when it sets the threshold, and what that does.
    """

    def test_sets_threshold(self) -> None:
        """mallopt(M_MMAP_THRESHOLD, 1 MiB) is called and its success is the result."""
        libc = FakeLibc()
        self.assertTrue(return_large_blocks(environ={}, libc=libc))
        self.assertEqual(libc.calls, [(-3, MMAP_THRESHOLD)])
        self.assertFalse(return_large_blocks(environ={}, libc=FakeLibc(answer=0)))

    def test_environment_wins(self) -> None:
        """With MALLOC_MMAP_THRESHOLD_ in the environment nothing is changed."""
        libc = FakeLibc()
        self.assertFalse(return_large_blocks(environ={"MALLOC_MMAP_THRESHOLD_": "65536"}, libc=libc))
        self.assertEqual(libc.calls, [])

    def test_no_mallopt(self) -> None:
        """A C library without mallopt (musl, macOS) is no error: nothing is set."""
        self.assertFalse(return_large_blocks(environ={}, libc=object()))

    def _held_after(self, mode: str) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env["PYTHONPATH"] = ROOT
        out = subprocess.run(
            [sys.executable, "-c", _SCRIPT, mode],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return int(out.stdout.strip())

    def test_memory_goes_back(self) -> None:
        """With the threshold fixed, freed 20 MiB blocks leave no memory held; with glibc's default, they do."""
        if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
            raise SkipTest("glibc's malloc only")
        held: dict[str, Any] = {mode: self._held_after(mode) for mode in ("default", "fixed")}
        self.assertGreater(held["default"], 15 * 1024, held)
        self.assertLess(held["fixed"], 4 * 1024, held)


class FreezeTests(SynchronousTestCase):
    """
    L{freeze_start_up_objects}: what exists is left out of later collections.
    """

    def test_frozen(self) -> None:
        """Objects alive when it runs are frozen (counted), and a cycle made later is still collected."""
        import gc
        import weakref

        self.addCleanup(gc.unfreeze)
        self.assertGreater(freeze_start_up_objects(), 1000)

        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a  # type: ignore[attr-defined]
        alive = weakref.ref(a)
        del a, b
        gc.collect()
        self.assertIsNone(alive())
