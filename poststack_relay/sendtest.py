# -*- test-case-name: tests.e2e.test_e2e_smtp -*-
"""
Send one test email through a relay with Python's smtplib.SMTP_SSL.

    python -m poststack_relay.sendtest --port 8587 --cafile .run/cert.pem

Defaults match C{make run}: the sandbox's test key and a verified sandbox
domain.
"""

from __future__ import annotations

import argparse
import smtplib
import ssl
import sys
from email.message import EmailMessage
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    Parse arguments, send one message, print the server's reply.
    """
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=587)
    parser.add_argument("--cafile", help="PEM file to trust (self-signed certificates)")
    parser.add_argument("--user", default="poststack")
    parser.add_argument("--password", default="sk_test_full_access")
    parser.add_argument("--from", dest="sender", default="you@yourdomain.com")
    parser.add_argument("--to", default="user@example.com")
    parser.add_argument("--subject", default="Hello from poststack-relay")
    parser.add_argument("--tags", default="test")
    args = parser.parse_args(argv)

    context = ssl.create_default_context(cafile=args.cafile)
    msg = EmailMessage()
    msg["From"] = args.sender
    msg["To"] = args.to
    msg["Subject"] = args.subject
    msg["X-PostStack-Tags"] = args.tags
    msg.set_content("Sent through poststack-relay.")
    msg.add_alternative("<p>Sent through <b>poststack-relay</b>.</p>", subtype="html")
    try:
        with smtplib.SMTP_SSL(args.host, args.port, context=context, timeout=60) as server:
            server.login(args.user, args.password)
            for code, text in (server.mail(args.sender), server.rcpt(args.to)):
                if code >= 400:
                    print(f"refused: {code} {text.decode()}", file=sys.stderr)
                    return 1
            code, text = server.data(msg.as_bytes())
    except (smtplib.SMTPException, OSError) as e:
        print(f"failed: {e}", file=sys.stderr)
        return 1
    print(f"{code} {text.decode()}")
    return 0 if code == 250 else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
