"""
CPU time per message: the pure translation, and one whole relayed message
(TLS + SMTP + translation + HTTP POST) measured on the relay process.

    PYTHONPATH=. .venv/bin/python bench/cpu_per_message.py [--messages N]

The relay runs as `twistd -n poststack-relay` against bench/stub_api.py;
one smtplib client sends N messages over one persistent implicit-TLS
connection; the relay's CPU time (user + system, from /proc) is divided
by N.  Loopback only; bounded in count and time.
"""

from __future__ import annotations

import argparse
import os
import signal
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from poststack_relay.testing import write_certificate  # noqa: E402
from poststack_relay.translate import Envelope, translate  # noqa: E402


def message_2k() -> bytes:
    msg = MIMEMultipart("alternative")
    msg["From"] = "Sender Name <you@yourdomain.com>"
    msg["To"] = "User <user@example.com>"
    msg["Subject"] = "Your weekly report is ready"
    msg["X-PostStack-Tags"] = "report,weekly"
    msg["Message-ID"] = "<bench-1@yourdomain.com>"
    text = ("Hello, this is the weekly report. " * 18).strip()
    html = "<html><body><p>" + ("Hello, this is the <b>weekly</b> report. " * 16) + "</p></body></html>"
    msg.attach(MIMEText(text, "plain"))
    msg.attach(MIMEText(html, "html"))
    return msg.as_bytes().replace(b"\n", b"\r\n")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, deadline: float = 20) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} did not open")


def bench_translate(raw: bytes, rounds: int = 5, n: int = 2000) -> float:
    env = Envelope("you@yourdomain.com", ("user@example.com",))
    results = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(n):
            translate(raw, env)
        results.append((time.process_time() - start) / n)
    return statistics.median(results)


def bench_relay(raw: bytes, messages: int) -> float:
    tmp = tempfile.mkdtemp(prefix="psr-bench-")
    cert, key = write_certificate(tmp)
    api_port, smtp_port = free_port(), free_port()
    procs = []
    try:
        stub = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "stub_api.py"), str(api_port)])
        procs.append(stub)
        env = dict(os.environ, PYTHONPATH=ROOT)
        relay = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=",
             "--logfile", os.path.join(tmp, "relay.log"), "poststack-relay",
             "--port", str(smtp_port), "--interface", "127.0.0.1", "--tls-cert", cert, "--tls-key", key,
             "--api-url", f"http://127.0.0.1:{api_port}", "--hostname", "localhost"],
            env=env, cwd=tmp,
        )
        procs.append(relay)
        wait_port(api_port)
        wait_port(smtp_port)
        ctx = ssl.create_default_context(cafile=cert)
        deadline = time.monotonic() + 300
        with smtplib.SMTP_SSL("localhost", smtp_port, context=ctx, timeout=30) as s:
            s.login("poststack", "sk_test_bench")
            for _ in range(20):  # warm up
                s.sendmail("you@yourdomain.com", ["user@example.com"], raw)
            before = cpu_seconds(relay.pid)
            sent = 0
            while sent < messages and time.monotonic() < deadline:
                s.sendmail("you@yourdomain.com", ["user@example.com"], raw)
                sent += 1
            after = cpu_seconds(relay.pid)
        return (after - before) / sent
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    raw = message_2k()
    t = bench_translate(raw)
    r = bench_relay(raw, args.messages)
    print(f"message size: {len(raw)} bytes")
    print(f"translate(): {t * 1e3:.3f} ms CPU per message (median of 5 x 2000)")
    print(f"whole relayed message: {r * 1e3:.3f} ms relay CPU per message ({args.messages} messages, one connection)")


if __name__ == "__main__":
    main()
