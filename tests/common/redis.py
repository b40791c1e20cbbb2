"""
A real C{redis-server} for the fleet tests: Debian's Redis 7 on a free
loopback port, no persistence, in a directory of its own; started, stopped,
paused (C{SIGSTOP}), resumed (C{SIGCONT}) and restarted on the same port by
its own PID, never by name.

Where it is: L{REDIS_SERVER} (L{None} if not installed), and
L{redis_server_or_skip}, which skips a test with a reason when it is
missing, except under CI (C{CI=true}), where the test fails instead: C{.ci/run}
installs C{redis-server} with C{apt-get}, so a missing one is a broken
set-up, not a reason to skip.

Typical use::

    server = start_redis(self, self.mktemp())   # stopped at the test's clean-up
    server.url                                  # redis://127.0.0.1:PORT/0
    server.pause(); ...; server.resume()
    server.stop(); server.start()               # the same port again
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Any

from twisted.protocols import portforward

from tests.common.processes import find_tool, free_port, missing

__all__ = ["REDIS_SERVER", "RedisServer", "SilencingProxy", "ping", "redis_server_or_skip", "start_redis"]

#: Debian's C{redis-server} (in C{/usr/bin}), or L{None} if it is not installed.
REDIS_SERVER = find_tool("redis-server")

#: Seconds to wait for a started server to answer C{PING}.
START_TIMEOUT = 15.0
#: Seconds a stopping server gets after SIGTERM before SIGKILL.
STOP_TIMEOUT = 10.0


def redis_server_or_skip() -> str:
    """
    The path of C{redis-server}.

    @raise SkipTest: if it is not installed (with how to install it).
    @raise FailTest: instead, under CI, where C{.ci/run} installs it.
    """
    if REDIS_SERVER is not None:
        return REDIS_SERVER
    raise missing("redis-server is not installed (apt-get install redis-server; .ci/run installs it)")


def ping(port: int, timeout: float = 1.0) -> bool:
    """
    Whether a Redis server on loopback C{port} answers C{PING} with
    C{+PONG} within C{timeout} seconds (a paused or absent one does not).
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """
    One C{redis-server} process on C{127.0.0.1:port} with its files in
    C{directory}; L{start} again after L{stop} or L{kill} uses the same port.

    @ivar pid: the running server's PID, or L{None} when stopped.
    """

    def __init__(self, directory: str, port: int | None = None, password: str | None = None) -> None:
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.password = password
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        """The URL a relay's C{--redis-url} takes (no password in it)."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def argv(self) -> list[str]:
        """The command line: loopback only, no RDB, no AOF, files in L{directory}."""
        assert REDIS_SERVER is not None
        argv = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.directory,
            "--daemonize", "no",
            "--logfile", os.path.join(self.directory, "redis.log"),
        ]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        return argv

    def start(self) -> None:
        """
        Start the server and wait (at most L{START_TIMEOUT} s) until it
        answers C{PING}; fail with its log if it exits or never answers.
        """
        assert self._process is None, "already running"
        process = subprocess.Popen(
            self.argv(), cwd=self.directory,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self._process = process
        self._paused = False
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._process = None
                raise AssertionError(f"redis-server exited with {process.returncode}: {self.log()[-2000:]}")
            if self._answers():
                return
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"redis-server never answered PING in {START_TIMEOUT} s: {self.log()[-2000:]}")

    def _answers(self) -> bool:
        if self.password is None:
            return ping(self.port, 0.5)
        # With requirepass, an unauthenticated PING gets -NOAUTH: it answers all the same.
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.settimeout(0.5)
                s.sendall(b"PING\r\n")
                return s.recv(64)[:1] in (b"+", b"-")
        except OSError:
            return False

    def log(self) -> str:
        """The server's own log file (empty if it wrote none)."""
        try:
            with open(os.path.join(self.directory, "redis.log"), "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _signal(self, signum: int) -> None:
        assert self._process is not None and self._process.poll() is None, "redis-server is not running"
        self._process.send_signal(signum)

    def pause(self) -> None:
        """C{SIGSTOP}: the server keeps its connections and port but answers nothing."""
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """C{SIGCONT} after L{pause}: it answers again, data intact."""
        self._signal(signal.SIGCONT)
        self._paused = False

    def stop(self) -> None:
        """
        Stop the server (a paused one is resumed first so that it can exit):
        SIGTERM, SIGKILL after L{STOP_TIMEOUT} s. Its port is free again.
        """
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        if self._paused:
            process.send_signal(signal.SIGCONT)
            self._paused = False
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL (works on a paused server too); its port is free again."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(STOP_TIMEOUT)
        self._paused = False

    def restart(self) -> None:
        """L{stop}, then L{start} on the same port."""
        self.stop()
        self.start()

    def __enter__(self) -> "RedisServer":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_redis(test: Any, directory: str, password: str | None = None) -> RedisServer:
    """
    A started L{RedisServer} in C{directory} (created), stopped (by its PID)
    and its directory removed at C{test}'s clean-up; skips or fails as
    L{redis_server_or_skip} says when C{redis-server} is missing.
    """
    redis_server_or_skip()
    server = RedisServer(directory, password=password)
    test.addCleanup(shutil.rmtree, server.directory, True)
    test.addCleanup(server.stop)
    server.start()
    return server


class _SilentClient(portforward.ProxyClient):
    def dataReceived(self, data: bytes) -> None:
        server = self.peer
        if server is not None and not getattr(server, "silent", False):
            super().dataReceived(data)


class _SilentClientFactory(portforward.ProxyClientFactory):
    protocol = _SilentClient


class _SilentServer(portforward.ProxyServer):
    clientProtocolFactory = _SilentClientFactory
    silent = False

    def connectionMade(self) -> None:
        self.factory.connections.append(self)  # type: ignore[attr-defined]  # SilencingProxy's own list
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        if not self.silent:
            super().dataReceived(data)


class SilencingProxy(portforward.ProxyFactory):
    """
    A TCP relay (Twisted's port forwarder, on loopback) to a server, whose
    established connections can be made silent: bytes stop flowing both
    ways and nothing is closed, as with a peer that crashed or a network
    partition; new connections pass.  L{close} (a test's clean-up) drops
    every connection.
    """

    protocol = _SilentServer

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.connections: list[_SilentServer] = []

    def silence(self) -> None:
        """Make every connection made so far silent."""
        for connection in self.connections:
            connection.silent = True

    def close(self) -> None:
        for connection in self.connections:
            if connection.peer is not None and connection.peer.transport is not None:
                connection.peer.transport.abortConnection()
            if connection.transport is not None:
                connection.transport.abortConnection()
