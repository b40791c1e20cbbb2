"""
Peak memory of the relay process while relaying one large message.

    PYTHONPATH=. .venv/bin/python bench/memory_large.py [--mb 25]

Starts `twistd -n poststack-relay` against bench/stub_api.py, sends one
message of about N MB (a base64 attachment) over implicit TLS, and reports
the relay's RSS before, its peak (VmHWM) after, and the time to the 250.
Loopback only.
"""

from __future__ import annotations

import argparse
import os
import signal
import smtplib
import ssl
import subprocess
import sys
import tempfile
import time
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from cpu_per_message import free_port, wait_port  # noqa: E402

from poststack_relay.testing import write_certificate  # noqa: E402


def status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def big_message(megabytes: float) -> bytes:
    msg = MIMEMultipart()
    msg["From"] = "you@yourdomain.com"
    msg["To"] = "user@example.com"
    msg["Subject"] = "large"
    msg["Message-ID"] = "<large-1@yourdomain.com>"
    msg.attach(MIMEText("see attachment"))
    payload = os.urandom(int(megabytes * 1024 * 1024 * 3 / 4))
    part = MIMEApplication(payload, "octet-stream")
    part.add_header("Content-Disposition", "attachment", filename="blob.bin")
    msg.attach(part)
    return msg.as_bytes().replace(b"\n", b"\r\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=25.0)
    args = parser.parse_args()
    raw = big_message(args.mb * 0.97)
    tmp = tempfile.mkdtemp(prefix="psr-mem-")
    cert, key = write_certificate(tmp)
    api_port, smtp_port = free_port(), free_port()
    procs = []
    try:
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "stub_api.py"), str(api_port)]))
        relay = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=",
             "--logfile", os.path.join(tmp, "relay.log"), "poststack-relay",
             "--port", str(smtp_port), "--interface", "127.0.0.1", "--tls-cert", cert, "--tls-key", key,
             "--api-url", f"http://127.0.0.1:{api_port}", "--hostname", "localhost",
             "--max-message-size", str(int((args.mb + 1) * 1024 * 1024))],
            env=dict(os.environ, PYTHONPATH=ROOT), cwd=tmp,
        )
        procs.append(relay)
        wait_port(api_port)
        wait_port(smtp_port)
        ctx = ssl.create_default_context(cafile=cert)
        with smtplib.SMTP_SSL("localhost", smtp_port, context=ctx, timeout=120) as s:
            s.login("poststack", "sk_test_bench")
            s.sendmail("you@yourdomain.com", ["user@example.com"], b"Subject: warm\r\n\r\nwarm\r\n")
            time.sleep(0.5)
            before = status(relay.pid, "VmRSS")
            peak_before = status(relay.pid, "VmHWM")
            s.mail("you@yourdomain.com")
            s.rcpt("user@example.com")
            start = time.monotonic()
            code, text = s.data(raw)
            elapsed = time.monotonic() - start
        peak = status(relay.pid, "VmHWM")
        print(f"message: {len(raw) / 1e6:.1f} MB; reply: {code} {text.decode()[:60]}")
        print(f"relay RSS before: {before / 1e6:.1f} MB; peak: {peak / 1e6:.1f} MB "
              f"(peak before the message {peak_before / 1e6:.1f} MB); "
              f"peak above start: {(peak - before) / 1e6:.1f} MB; DATA->250: {elapsed:.2f} s")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
