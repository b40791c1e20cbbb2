# -*- test-case-name: tests.test_fleet -*-
"""
The relay as a fleet, tested as a fleet: real processes on loopback, as
production runs them (docs/operations.md, "A fleet").

  - L{RedisServerTests}: the real C{redis-server} the fleet tests share
    state through (L{tests.common.redis}) starts, pauses, resumes and
    restarts on its port.
"""

from __future__ import annotations

import os
import socket
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.common.redis import RedisServer, ping, redis_server_or_skip, start_redis


class RedisServerTests(SynchronousTestCase):
    """The harness's C{redis-server}: a real one, driven by its PID."""

    def test_start_pause_resume_restart(self) -> None:
        """It answers PING once started, not while paused (SIGSTOP), again after SIGCONT, and after a restart on the same port."""
        server = start_redis(self, self.mktemp())
        self.assertTrue(ping(server.port))
        self.assertEqual(server.url, f"redis://127.0.0.1:{server.port}/0")
        first = server.pid
        server.pause()
        started = time.monotonic()
        self.assertFalse(ping(server.port, timeout=0.3))
        self.assertLess(time.monotonic() - started, 5)
        server.resume()
        self.assertTrue(ping(server.port))
        server.stop()
        self.assertIsNone(server.pid)
        self.assertFalse(ping(server.port, timeout=0.3))
        server.start()
        self.assertTrue(ping(server.port))
        self.assertNotEqual(server.pid, first)

    def test_loopback_only_and_no_persistence(self) -> None:
        """It listens on 127.0.0.1 only and writes no RDB/AOF file into its directory."""
        server = start_redis(self, self.mktemp())
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
            s.sendall(b"SET k v\r\nCONFIG GET save\r\nCONFIG GET appendonly\r\nCONFIG GET bind\r\n")
            data = b""
            deadline = time.monotonic() + 5
            while b"bind" not in data or not data.endswith(b"\r\n") or data.count(b"\r\n") < 13:
                if time.monotonic() > deadline:
                    break
                data += s.recv(4096)
        self.assertIn(b"+OK", data)
        self.assertIn(b"$4\r\nsave\r\n$0\r\n\r\n", data)
        self.assertIn(b"$10\r\nappendonly\r\n$2\r\nno\r\n", data)
        self.assertIn(b"$4\r\nbind\r\n$9\r\n127.0.0.1\r\n", data)
        server.stop()
        self.assertEqual(
            sorted(f for f in os.listdir(server.directory) if f != "redis.log"), []
        )

    def test_paused_server_stops(self) -> None:
        """A paused server is stopped all the same (resumed, then SIGTERM): nothing outlives a test."""
        redis_server_or_skip()
        server = RedisServer(self.mktemp())
        server.start()
        self.addCleanup(server.kill)
        server.pause()
        started = time.monotonic()
        server.stop()
        self.assertLess(time.monotonic() - started, 15)
        self.assertIsNone(server.pid)
        self.assertFalse(ping(server.port, timeout=0.3))
