"""
systemd's side of the relay's process tests: a notify socket to read
C{sd_notify} datagrams from, and a launcher that hands a listening socket
over as systemd's socket activation does.
"""

from __future__ import annotations

import os
import socket

__all__ = ["LAUNCHER", "notify_receiver", "pending_datagrams"]

# Dup the listening socket passed as fd argv[1] to fd 3, describe it the way
# systemd does, and become twistd (same PID, so LISTEN_PID matches).
LAUNCHER = """\
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="smtps", LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[2], sys.argv[2:])
"""


def notify_receiver(directory: str) -> socket.socket:
    """A bound datagram socket standing in for systemd's notify socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.path.join(directory, "notify"))
    sock.settimeout(0)
    return sock


def pending_datagrams(sock: socket.socket) -> list[bytes]:
    """The datagrams waiting on C{sock}."""
    found = []
    while True:
        try:
            found.append(sock.recv(4096))
        except BlockingIOError:
            return found
