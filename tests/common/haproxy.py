"""
Debian's HAProxy as a real load balancer in front of the relay: where it
is (L{HAPROXY}, L{None} if not installed), its configuration for one TCP
frontend and the relay as its one server (L{haproxy_config}) or several
relays round-robin with health checks (L{haproxy_fleet_config}), and a
bounded starter.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from typing import Any, Sequence

__all__ = ["HAPROXY", "haproxy_config", "haproxy_fleet_config", "server_states", "start_haproxy"]

HAPROXY = shutil.which("haproxy")


def haproxy_config(
    front: int,
    relay: int,
    server: str = "",
    backend: Sequence[str] = (),
    global_: Sequence[str] = (),
) -> str:
    """
    A TCP frontend on loopback port C{front} whose one server is the relay
    on loopback port C{relay}; C{server} ends the server line (C{send-proxy},
    health checks), C{backend} and C{global_} are further lines of those
    sections.
    """
    lines = [
        "global",
        "    maxconn 100",
        *(f"    {line}" for line in global_),
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 30s",
        "    timeout server 30s",
        "frontend smtps",
        f"    bind 127.0.0.1:{front}",
        "    default_backend relay",
        "backend relay",
        *(f"    {line}" for line in backend),
        f"    server relay 127.0.0.1:{relay} {server}",
    ]
    return "\n".join(lines) + "\n"


def haproxy_fleet_config(front: int, relays: Sequence[tuple[int, int]], check_interval_ms: int = 200,
                         stats_socket: str | None = None) -> str:
    """
    The configuration docs/operations.md ("A fleet") recommends, on loopback:
    a TCP frontend on port C{front}, the relays C{(smtp port, metrics port)}
    round-robin (servers C{relay1}, C{relay2}, ... of backend C{relays}),
    each sent a PROXY v2 header, each checked with C{GET /readyz} on its
    metrics port every C{check_interval_ms}; a connection refused by a dead
    relay is tried again on another one. C{stats_socket}: a UNIX socket
    path for HAProxy's runtime API (L{server_states}).
    """
    servers = [
        f"    server relay{i} 127.0.0.1:{port} send-proxy-v2 check port {metrics}"
        f" inter {check_interval_ms}ms fall 2 rise 2"
        for i, (port, metrics) in enumerate(relays, 1)
    ]
    lines = [
        "global",
        "    maxconn 2000",
        *([f"    stats socket {stats_socket} mode 600 level user"] if stats_socket else []),
        "defaults",
        "    mode tcp",
        "    timeout connect 2s",
        "    timeout client 60s",
        "    timeout server 60s",
        "    timeout check 1s",
        "    retries 2",
        "    option redispatch",
        "frontend smtps",
        f"    bind 127.0.0.1:{front}",
        "    default_backend relays",
        "backend relays",
        "    balance roundrobin",
        "    option httpchk",
        "    http-check send meth GET uri /readyz",
        "    http-check expect status 200",
        *servers,
    ]
    return "\n".join(lines) + "\n"


def server_states(stats_socket: str) -> dict[str, str]:
    """
    Each server's state from HAProxy's runtime API (C{show stat}): name ->
    C{UP}, C{DOWN}, C{UP 1/2}, ...; C{{}} if the socket does not answer.
    """
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(stats_socket)
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return {}
    states = {}
    for line in data.decode("utf-8", "replace").splitlines():
        fields = line.split(",")
        if len(fields) > 17 and not line.startswith("#") and fields[1] not in ("FRONTEND", "BACKEND"):
            states[fields[1]] = fields[17]
    return states


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
