"""
bench/messages.py - the test messages of `make bench` (docs/performance.md).

Two builders, both deterministic (same bytes on every run):

* ``small_message()``: a ~1.7 KB multipart/alternative message (text and
  HTML parts, realistic headers) from you@yourdomain.com to
  user@example.com: the message of scenarios S1, S2, S1L50 and S3.
* ``large_message(attachment_bytes)``: the S4 message, a short text part
  plus an attachment of ``attachment_bytes`` random bytes (fixed seed),
  base64-encoded (10 MB in the full run, 1 MB in the smoke run).

``write_messages(directory, attachment_bytes)`` writes both as raw RFC 5322
files with CRLF line ends and returns their paths; the load generator
(bench/loadgen.js --message-file) sends them as they are.

    python bench/messages.py DIR [--attachment-mb 10]
"""

from __future__ import annotations

import argparse
import base64
import os
import random
from email.message import EmailMessage
from email.policy import SMTP

FROM = "Your Company <you@yourdomain.com>"
TO = "A User <user@example.com>"
DATE = "Tue, 04 Mar 2025 09:30:00 +0000"
SEED = 20250304

TEXT = """\
Hello,

your weekly report for the account "Acme Rockets" is ready.

  Emails sent:       12,480
  Delivered:         12,391 (99.3 %)
  Opened:             5,207 (42.0 %)
  Clicked:            1,144 (9.2 %)
  Bounced:               89 (0.7 %)

See the full report: https://yourdomain.com/reports/2025-w10

Thanks,
The Your Company team

You get this email because you subscribed to weekly reports.
"""

HTML = """\
<!doctype html>
<html><body style="font-family: sans-serif">
<p>Hello,</p>
<p>your weekly report for the account <b>Acme Rockets</b> is ready.</p>
<table>
<tr><td>Emails sent</td><td>12,480</td></tr>
<tr><td>Delivered</td><td>12,391 (99.3 %)</td></tr>
<tr><td>Opened</td><td>5,207 (42.0 %)</td></tr>
<tr><td>Clicked</td><td>1,144 (9.2 %)</td></tr>
<tr><td>Bounced</td><td>89 (0.7 %)</td></tr>
</table>
<p><a href="https://yourdomain.com/reports/2025-w10">See the full report</a></p>
<p>Thanks,<br>The Your Company team</p>
<p style="font-size: small">You get this email because you subscribed to weekly reports.</p>
</body></html>
"""


def _headers(msg: EmailMessage, subject: str, message_id: str) -> None:
    msg["From"] = FROM
    msg["To"] = TO
    msg["Subject"] = subject
    msg["Date"] = DATE
    msg["Message-ID"] = message_id
    msg["Reply-To"] = "Support <support@yourdomain.com>"
    msg["X-Mailer"] = "bench/messages.py"
    msg["X-PostStack-Tags"] = "report,weekly"
    msg["List-Unsubscribe"] = "<https://yourdomain.com/unsubscribe?u=8f2a91c7>"


def _fixed_boundaries(raw: bytes) -> bytes:
    """The email package picks random MIME boundaries; make them fixed."""
    out = raw
    for n, boundary in enumerate(_boundaries(raw)):
        out = out.replace(boundary, b"=_bench_boundary_%d" % n)
    return out


def _boundaries(raw: bytes) -> list[bytes]:
    found = []
    for line in raw.split(b"\r\n"):
        if b'boundary="' in line:
            found.append(line.split(b'boundary="', 1)[1].split(b'"', 1)[0])
    return found


def small_message() -> bytes:
    """The ~1.7 KB multipart/alternative message (CRLF line ends)."""
    msg = EmailMessage()
    _headers(msg, "Your weekly report is ready", "<weekly-2025-w10.1@yourdomain.com>")
    msg.set_content(TEXT)
    msg.add_alternative(HTML, subtype="html")
    return _fixed_boundaries(msg.as_bytes(policy=SMTP))


def large_message(attachment_bytes: int) -> bytes:
    """A message with an attachment of C{attachment_bytes} random bytes (fixed seed)."""
    payload = random.Random(SEED).randbytes(attachment_bytes)
    msg = EmailMessage()
    _headers(msg, "Your data export", "<export-2025-w10.1@yourdomain.com>")
    msg.set_content("Hello,\n\nyour data export is attached.\n\nThe Your Company team\n")
    msg.add_attachment(payload, maintype="application", subtype="octet-stream", filename="export.bin")
    raw = _fixed_boundaries(msg.as_bytes(policy=SMTP))
    # Sanity check: the attachment is there, base64, and decodes to the payload.
    assert base64.b64encode(payload[:57]) in raw
    return raw


def write_messages(directory: str, attachment_bytes: int = 10 * 1000 * 1000) -> tuple[str, str]:
    """Write both messages into C{directory}; return (small path, large path)."""
    os.makedirs(directory, exist_ok=True)
    small = os.path.join(directory, "small.eml")
    large = os.path.join(directory, "large.eml")
    with open(small, "wb") as f:
        f.write(small_message())
    with open(large, "wb") as f:
        f.write(large_message(attachment_bytes))
    return small, large


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--attachment-mb", type=float, default=10.0, help="S4 attachment size in MB (10^6 bytes)")
    args = parser.parse_args()
    small, large = write_messages(args.directory, int(args.attachment_mb * 1000 * 1000))
    for path in (small, large):
        print(f"{path}: {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
