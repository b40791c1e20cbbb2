"""
bench/loop_stall.py - does one session wait on another's message?
(issue 18, "No session waits on another's message"; docs/operations.md,
"One large or hostile message").

Starts the relay (this checkout, or the one given with --root) pinned to
CPU 0, with the nginx upstream stub of bench/upstream.py; then, from CPU 1,
for --seconds:

  - two sender processes relay, each over its own TLS connection, again and
    again: a message with a 10 MB attachment (13.7 MB of MIME, answered 250)
    and a 9 MB message of 100,000 MIME parts (answered 554 5.6.0);
  - a probe process, logged in on a third connection, sends NOOP every
    --interval ms and times each reply: the round trip (send to reply), and
    the delay from the moment the NOOP was due (open loop: a stall counts
    for every NOOP it holds back, not just the one in flight).

Prints the NOOP figures (p50, p99, max; ms) and what the senders got.
Standard library only (plus bench/run.py, bench/messages.py, bench/upstream.py).

    .venv/bin/python bench/loop_stall.py [--seconds 20] [--root DIR]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import messages  # noqa: E402  (bench/messages.py)
import run  # noqa: E402  (bench/run.py)


def many_parts(parts: int = 100_000, size: int = 9_000_000) -> bytes:
    """A multipart/mixed message of C{parts} small text parts, about C{size} octets."""
    filler = b"x" * max(1, size // parts - 9)
    head = (
        b"From: sender@yourdomain.com\r\nTo: user@example.com\r\nSubject: many parts\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
    )
    return head + b"".join(b"--b\r\n\r\n" + filler + b"\r\n" for _ in range(parts)) + b"--b--\r\n"


def login(port: int, ca: str) -> ssl.SSLSocket:
    """A TLS connection past EHLO and AUTH PLAIN, read line by line."""
    context = ssl.create_default_context(cafile=ca)
    tls = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30),
                              server_hostname="localhost")
    tls.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = tls.makefile("rb")

    def command(line: bytes) -> bytes:
        tls.sendall(line + b"\r\n")
        while True:
            reply = reader.readline()
            if reply[3:4] != b"-":
                return reply

    reader.readline()
    command(b"EHLO probe.example")
    token = base64.b64encode(b"\0" + run.USER.encode() + b"\0" + run.PASSWORD.encode())
    reply = command(b"AUTH PLAIN " + token)
    if not reply.startswith(b"235"):
        raise SystemExit(f"probe: AUTH failed: {reply!r}")
    tls.reader = reader  # type: ignore[attr-defined]
    return tls


def probe(port: int, ca: str, seconds: float, interval: float, out: str) -> None:
    """NOOP every C{interval} s for C{seconds}: round trips and delays from the due time."""
    tls = login(port, ca)
    reader = tls.reader  # type: ignore[attr-defined]
    rtts, delays = [], []
    start = time.monotonic()
    due = start
    while due - start < seconds:
        now = time.monotonic()
        if now < due:
            time.sleep(due - now)
        sent = time.monotonic()
        tls.sendall(b"NOOP\r\n")
        reply = reader.readline()
        got = time.monotonic()
        if not reply.startswith(b"250"):
            raise SystemExit(f"probe: NOOP got {reply!r}")
        rtts.append((got - sent) * 1000)
        delays.append((got - due) * 1000)
        due += interval
        if due < got - interval:  # far behind: the next ones are due now
            due = got
    tls.sendall(b"QUIT\r\n")
    with open(out, "w") as f:
        json.dump({"rtt_ms": rtts, "delay_ms": delays}, f)


def sender(port: int, ca: str, path: str, seconds: float, out: str) -> None:
    """Send the message at C{path} again and again for C{seconds}; count the replies."""
    with open(path, "rb") as f:
        raw = f.read()
    context = ssl.create_default_context(cafile=ca)
    replies: dict[str, int] = {}
    times: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        # A new session when the relay closes this one (after --max-errors
        # refusals: the 100,000-part message is refused each time).
        with smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=120) as client:
            client.ehlo("sender.example")
            client.login(run.USER, run.PASSWORD)
            while time.monotonic() < end:
                began = time.monotonic()
                try:
                    client.sendmail("sender@yourdomain.com", ["user@example.com"], raw)
                    key = "250"
                except smtplib.SMTPDataError as e:
                    key = str(e.smtp_code)
                except smtplib.SMTPServerDisconnected:
                    break
                times.append(time.monotonic() - began)
                replies[key] = replies.get(key, 0) + 1
    with open(out, "w") as f:
        json.dump({"replies": replies, "seconds_each": times}, f)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=5.0, help="ms between NOOPs [5]")
    parser.add_argument("--root", default=run.ROOT, help="the checkout whose relay runs [this one]")
    parser.add_argument("--quiet-only", action="store_true", help="the probe alone (no senders)")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        values = json.loads(args.args)
        {"probe": probe, "sender": sender}[args.role](**values)
        return 0

    from upstream import Upstream  # bench/upstream.py

    run.ROOT = os.path.abspath(args.root)
    tmp = tempfile.mkdtemp(prefix="poststack-stall-")
    upstream = server = None
    children: list[subprocess.Popen[bytes]] = []
    try:
        cert, key = run.make_certificate(tmp)
        large = os.path.join(tmp, "large.eml")
        hostile = os.path.join(tmp, "hostile.eml")
        with open(large, "wb") as f:
            f.write(messages.large_message(10 * 1000 * 1000))
        with open(hostile, "wb") as f:
            f.write(many_parts())
        upstream = Upstream(delay_ms=0, cpus=run.CLIENT_CPU).start()
        # run.Server starts twistd with PYTHONPATH=run.ROOT: the relay of --root.
        server = run.Server("relay", tmp, cert, key, upstream.url)
        server.wait_ready()
        me = [sys.executable, os.path.abspath(__file__)]

        def spawn(role: str, **values: Any) -> None:
            children.append(subprocess.Popen(
                run.taskset(run.CLIENT_CPU) + me + ["--role", role, "--args", json.dumps(values)]))

        outs = {name: os.path.join(tmp, name + ".json") for name in ("probe", "large", "hostile")}
        if not args.quiet_only:
            spawn("sender", port=server.port, ca=cert, path=large, seconds=args.seconds, out=outs["large"])
            spawn("sender", port=server.port, ca=cert, path=hostile, seconds=args.seconds,
                  out=outs["hostile"])
            time.sleep(1.0)  # the senders are under way
        spawn("probe", port=server.port, ca=cert, seconds=args.seconds - (0 if args.quiet_only else 2),
              interval=args.interval / 1000, out=outs["probe"])
        for child in children:
            child.wait(timeout=args.seconds + 300)
        server.check_alive()
        with open(outs["probe"]) as f:
            result = json.load(f)
        print(f"relay of {run.ROOT}; NOOP every {args.interval:g} ms for {args.seconds:g} s"
              + (" (probe alone)" if args.quiet_only else ""))
        for name in ("rtt_ms", "delay_ms"):
            values = result[name]
            print(f"  NOOP {name}: n={len(values)} p50={statistics.median(values):.2f} "
                  f"p99={percentile(values, 0.99):.2f} max={max(values):.2f}")
        for name in ("large", "hostile"):
            if os.path.exists(outs[name]):
                with open(outs[name]) as f:
                    sent = json.load(f)
                each = sent["seconds_each"]
                print(f"  {name}: replies {sent['replies']}, median {statistics.median(each):.2f} s each")
        return 0
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        if server is not None:
            server.stop()
        if upstream is not None:
            upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
