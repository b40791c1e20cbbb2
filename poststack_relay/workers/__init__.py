# -*- test-case-name: tests.test_workers -*-
"""
C{--workers N}: N relay processes on the same listening sockets, under one
supervisor (Python runs one core per process).

  - L{supervisor}: the command's own process.  It binds every listener
    once (before C{twistd} drops privileges; a systemd socket as passed)
    and runs the workers with Twisted's L{ProcessMonitor}: each gets the
    sockets as inherited descriptors, is restarted with back-off when it
    dies, gets SIGTERM (drain) on stop and SIGHUP (TLS reload) when the
    supervisor does.  Systemd hears C{READY=1} once all are ready.
  - L{worker}: a full relay that adopts the sockets and accepts one
    connection per wake-up, so that a burst spreads over the workers; it
    stops when its supervisor is gone (its standard input closes).
  - L{messages}: the start message (settings on standard input, never in
    the environment), the ready line, and the workers' log lines, which
    carry a C{worker} field and reach the supervisor's log.
"""

from .messages import VERSION_CHANGED_EXIT
from .supervisor import Supervisor, exit_with

__all__ = ["Supervisor", "VERSION_CHANGED_EXIT", "exit_with"]
