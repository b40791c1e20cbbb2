"""
The sandbox's credentials (C{etc/sandbox.json}) as the tests use them, and
the forms a secret could leak in.
"""

from __future__ import annotations

import base64

__all__ = ["FULL_KEY", "MAILBOX", "SCOPED_KEY", "SERVICE_KEY", "forms"]

#: An API key with full access.
FULL_KEY = "sk_test_full_access"
#: An API key scoped to yourdomain.com.
SCOPED_KEY = "sk_test_yourdomain_only"
#: The relay's own service key (mailbox logins go through it).
SERVICE_KEY = "sk_test_relay_service"
#: A mailbox and its password.
MAILBOX = ("alice@yourdomain.com", "alice-password")


def forms(secret: str, username: str) -> list[str]:
    """
    A secret as it might leak: itself, one character longer than the
    prefix logs may show, and the base64 a client sends for it in AUTH
    LOGIN and in AUTH PLAIN (with and without an authzid).
    """

    def b64(raw: str) -> str:
        return base64.b64encode(raw.encode()).decode()

    return [
        secret,
        secret[:11],
        b64(secret),
        b64(f"\0{username}\0{secret}"),
        b64(f"{username}\0{username}\0{secret}"),
    ]
