"""
The benchmark's baseline: the SMTP-to-PostStack bridge a developer would
write by hand with aiosmtpd and aiohttp on plain asyncio.

It does the relay's job in the simplest honest way: implicit TLS from the
first byte, AUTH PLAIN/LOGIN as ``poststack`` with the API key as password,
then for each message: parse it with ``email.policy.default``, build the JSON
of ``POST /emails`` (from, to, cc, bcc, reply_to, subject, text, html,
attachments, tags, idempotency_key) and POST it with the key as Bearer
through one shared keep-alive aiohttp session.  The reply is
``250 2.0.0 Ok: queued as <id>`` on a 2xx answer carrying an id,
``451 4.3.0 ...`` otherwise.  Messages up to 25 MiB (the relay's default).

    .venv-bench/bin/python bench/baseline_bridge.py --port P --cert CERT \\
        --key KEY --api-url http://127.0.0.1:PORT

It prints ``listening on HOST:PORT`` once it accepts connections and stops on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import email
import email.policy
import logging
import signal
import ssl
import warnings
from email.message import EmailMessage
from typing import Any

import aiohttp
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

MAX_MESSAGE_SIZE = 25 * 1024 * 1024
USERNAME = b"poststack"


def authenticator(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    """Accept user ``poststack`` with any non-empty password (the API key)."""
    if isinstance(auth_data, LoginPassword) and auth_data.login == USERNAME and auth_data.password:
        return AuthResult(success=True, auth_data=auth_data.password.decode("utf-8", "replace"))
    return AuthResult(success=False, handled=False)


def addresses(message: EmailMessage, name: str) -> list[str]:
    """The addresses of every ``name`` header, as ``Name <addr>`` strings."""
    return [str(address) for header in message.get_all(name, []) for address in header.addresses]


def build_payload(raw: bytes, mail_from: str, rcpt_tos: list[str]) -> dict[str, Any]:
    """The ``POST /emails`` body for one message and its envelope."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    senders = addresses(message, "From")
    to, cc = addresses(message, "To"), addresses(message, "Cc")
    # Envelope recipients named in no header are Bcc recipients; with no To
    # header at all (undisclosed recipients) they are sent to directly.
    shown = {a.rpartition("<")[2].rstrip(">").lower() for a in to + cc}
    bcc = [r for r in rcpt_tos if r.lower() not in shown]
    if not to:
        to, bcc = bcc, []
    payload: dict[str, Any] = {"from": senders[0] if senders else mail_from, "to": to}
    if cc:
        payload["cc"] = cc
    if bcc:
        payload["bcc"] = bcc
    reply_to = addresses(message, "Reply-To")
    if reply_to:
        payload["reply_to"] = reply_to[0]
    if message["Subject"] is not None:
        payload["subject"] = str(message["Subject"])
    for kind in ("plain", "html"):
        part = message.get_body(preferencelist=(kind,))
        if part is not None:
            payload["text" if kind == "plain" else "html"] = part.get_content()
    attachments = []
    for part in message.iter_attachments():
        data = part.get_payload(decode=True)
        if not isinstance(data, bytes):  # e.g. an attached message/rfc822
            data = part.as_bytes()
        attachments.append({
            "filename": part.get_filename() or "attachment",
            "content": base64.b64encode(data).decode("ascii"),
            "content_type": part.get_content_type(),
        })
    if attachments:
        payload["attachments"] = attachments
    if message["X-PostStack-Tags"] is not None:
        payload["tags"] = [t.strip() for t in str(message["X-PostStack-Tags"]).split(",") if t.strip()]
    if message["X-PostStack-Idempotency-Key"] is not None:
        payload["idempotency_key"] = str(message["X-PostStack-Idempotency-Key"]).strip()
    return payload


class PostStackHandler:
    """aiosmtpd handler: each message becomes one ``POST /emails``."""

    def __init__(self, api_url: str, http: aiohttp.ClientSession) -> None:
        self.url = api_url.rstrip("/") + "/emails"
        self.http = http

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        try:
            payload = build_payload(raw, envelope.mail_from or "", list(envelope.rcpt_tos))
        except Exception as exc:  # a message email.policy.default cannot take
            return f"554 5.6.0 Cannot parse message: {exc.__class__.__name__}"
        headers = {"Authorization": f"Bearer {session.auth_data}"}
        try:
            async with self.http.post(self.url, json=payload, headers=headers) as response:
                status = response.status
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            return f"451 4.3.0 PostStack API unreachable ({exc.__class__.__name__}), try again later"
        email_id = body.get("id") if isinstance(body, dict) else None
        if 200 <= status < 300 and isinstance(email_id, str) and email_id:
            return f"250 2.0.0 Ok: queued as {email_id}"
        return f"451 4.3.0 PostStack API answered HTTP {status}, try again later"


async def serve(host: str, port: int, cert: str, key: str, api_url: str) -> None:
    """Serve until SIGTERM or SIGINT."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=100, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        handler = PostStackHandler(api_url, http)

        def factory() -> SMTP:
            # Implicit TLS: the whole connection is TLS, but aiosmtpd only knows
            # about STARTTLS and would refuse AUTH ("538 Encryption required")
            # with auth_require_tls=True; hence False.  hostname is given so
            # that aiosmtpd does not call socket.getfqdn() per connection.
            return SMTP(
                handler,
                hostname="localhost",
                data_size_limit=MAX_MESSAGE_SIZE,
                authenticator=authenticator,
                auth_required=True,
                auth_require_tls=False,
                loop=loop,
            )

        server = await loop.create_server(factory, host, port, ssl=context)
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        print(f"listening on {host}:{port}", flush=True)
        await stop.wait()
        server.close()
        await server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description="aiosmtpd + aiohttp baseline bridge")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True, help="PEM certificate chain")
    parser.add_argument("--key", required=True, help="PEM private key")
    parser.add_argument("--api-url", required=True, help="PostStack API base URL")
    args = parser.parse_args()
    # aiosmtpd warns (log line per connection, and a UserWarning) that AUTH
    # is allowed without STARTTLS: right, the whole connection is TLS.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
    asyncio.run(serve(args.host, args.port, args.cert, args.key, args.api_url))


if __name__ == "__main__":
    main()
