# -*- test-case-name: tests.test_memory -*-
"""
A process-wide memory setting for processes the relay owns (C{twistd
poststack-relay} and each C{--workers} worker); an embedder decides for
its own process and may call L{return_large_blocks} itself.

glibc's C{malloc} serves a block of at least its "mmap threshold" (128 KiB
at first) with a mapping of its own, returned to the system when freed;
but each time such a block is freed it raises the threshold to that
block's size (up to 32 MiB), and the trim threshold to twice that.  After
one large message the copies of the next come from the heap, and the
heap keeps what it got: after three 10 MB attachments the relay held
about 50 MB more than before them.  A fixed threshold stops that: blocks
of 1 MiB and more (a large message, its parsed parts, its request body)
are given back as soon as they are freed.  It costs page faults on the
next large message (measured in S4: 0.135 s -> 0.175 s from the end of a
13.7 MB message to its 250, peak above the starting RSS 51 -> 42 MB) and
nothing for the small ones, whose blocks stay below the threshold.
"""

from __future__ import annotations

import ctypes
import gc
import os
from typing import Any, Mapping, Optional

MMAP_THRESHOLD = 1024 * 1024
"""Blocks of at least this many bytes get their own mapping."""

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
ENVIRONMENT_SETTING = "MALLOC_MMAP_THRESHOLD_"
"""glibc's own environment setting; when present it is left alone."""


def _libc() -> Any:
    return ctypes.CDLL(None)  # the process's own symbols, libc's among them


def return_large_blocks(
    threshold: int = MMAP_THRESHOLD,
    environ: Optional[Mapping[str, str]] = None,
    libc: Optional[Any] = None,
) -> bool:
    """
    Fix glibc's mmap threshold at C{threshold} bytes (see the module).

    @param environ: the environment (default C{os.environ}): when it sets
        C{MALLOC_MMAP_THRESHOLD_}, the administrator chose; nothing is done.
    @param libc: the C library (default: the process's own).
    @return: whether the threshold was set; C{False} without glibc's
        C{mallopt} (musl, macOS) or when C{mallopt} refuses.
    """
    if ENVIRONMENT_SETTING in (os.environ if environ is None else environ):
        return False
    try:
        mallopt = (libc if libc is not None else _libc()).mallopt
    except (AttributeError, OSError):
        return False
    try:
        return bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    except (ctypes.ArgumentError, TypeError, OSError):
        return False


def freeze_start_up_objects() -> int:
    """
    Collect once, then move every object alive (modules, classes,
    functions, the configuration: what start-up made) into the garbage
    collector's permanent generation (C{gc.freeze}): later full
    collections no longer walk them.  The relay's imports alone leave some
    55,000 objects, a 12 ms walk on the benchmark machine; full
    collections paused SMTP sessions for up to 20 ms in S1
    (docs/performance.md).  Called once the reactor runs.

    @return: how many objects were frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


__all__ = ["ENVIRONMENT_SETTING", "MMAP_THRESHOLD", "freeze_start_up_objects", "return_large_blocks"]
