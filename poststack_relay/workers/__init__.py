# -*- test-case-name: tests.test_workers -*-
"""
C{--workers N}: N relay processes on the same listening sockets (Python
runs one core per process).  L{supervisor} binds the sockets and runs the
workers with Twisted's L{ProcessMonitor}; L{worker} is one relay on them;
L{messages} is what passes between the two.
"""

from .messages import VERSION_CHANGED_EXIT
from .supervisor import Supervisor, exit_with

__all__ = ["Supervisor", "VERSION_CHANGED_EXIT", "exit_with"]
