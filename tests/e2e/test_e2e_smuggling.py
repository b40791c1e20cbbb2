# -*- test-case-name: tests.e2e.test_e2e_smuggling -*-
"""
SMTP smuggling, end to end: over a real loopback TLS connection, with a
raw C{ssl} socket so every byte is the test's own, the 2023 end-of-data
look-alikes (C{<LF>.<LF>}, C{<CR>.<CR>}, C{<CRLF>.<LF>}...) are each
followed by a smuggled MAIL/RCPT/DATA and a second message, then the one
real C{<CRLF>.<CRLF>}.  The relay must store exactly one email, with the
smuggled commands inside its content, and answer exactly one 250.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
from typing import Any, Callable

from tests.common.keys import FULL_KEY
from tests.common.relay import RelayTestCase

FIRST = (
    b"From: you@yourdomain.com\r\n"
    b"To: user@example.com\r\n"
    b"Subject: smuggling test\r\n"
    b"\r\n"
    b"first message body"
)
SMUGGLED = (
    b"MAIL FROM:<you@yourdomain.com>\r\n"
    b"RCPT TO:<victim@example.com>\r\n"
    b"DATA\r\n"
    b"From: you@yourdomain.com\r\n"
    b"To: victim@example.com\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"smuggled body\r\n"
)

# End-of-data look-alikes (SEC Consult, December 2023, and neighbours).
VARIANTS: dict[str, bytes] = {
    "lf_dot_lf": b"\n.\n",
    "lf_dot_crlf": b"\n.\r\n",
    "cr_dot_cr": b"\r.\r",
    "crlf_dot_lf": b"\r\n.\n",
    "cr_dot_lf": b"\r.\n",
    "crlf_dot_cr": b"\r\n.\r",
    "cr_dot_crlf": b"\r.\r\n",
    "lf_dot_cr": b"\n.\r",
    "crlf_dot_cr_crlf": b"\r\n.\r\r\n",
    "crlf_dotdot_crlf": b"\r\n..\r\n",
}


def converse(port: int, context: ssl.SSLContext, content: bytes) -> list[bytes]:
    """
    Log in, open DATA, then send C{content} and QUIT in one write; the
    reply lines received after DATA's 354, up to the server's close.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            reader = tls.makefile("rb")

            def reply() -> list[bytes]:
                got = []
                while True:
                    line = reader.readline(4096)
                    if not line:
                        raise AssertionError(f"connection closed after {got!r}")
                    got.append(line.rstrip(b"\r\n"))
                    if line[3:4] != b"-":
                        return got

            def command(line: bytes, expected: bytes) -> None:
                tls.sendall(line + b"\r\n")
                last = reply()[-1]
                assert last.startswith(expected), (line, last)

            assert reply()[0].startswith(b"220 ")
            command(b"EHLO client.test", b"250 ")
            credentials = base64.b64encode(b"\0poststack\0" + FULL_KEY.encode())
            command(b"AUTH PLAIN " + credentials, b"235 ")
            command(b"MAIL FROM:<you@yourdomain.com>", b"250 ")
            command(b"RCPT TO:<user@example.com>", b"250 ")
            command(b"DATA", b"354 ")
            tls.sendall(content + b"QUIT\r\n")
            after = []
            for _ in range(100):  # bounded: the server closes after QUIT
                line = reader.readline(4096)
                if not line:
                    break
                after.append(line.rstrip(b"\r\n"))
            return after


class SmugglingTests(RelayTestCase):
    async def check_variant(self, fake: bytes) -> None:
        """One look-alike: one stored email holding the smuggled commands, one 250."""
        content = FIRST + fake + SMUGGLED + b".\r\n"
        after = await self.in_thread(converse, self.port, self.context(), content)
        self.assertEqual(len(after), 2, after)
        self.assertTrue(after[0].startswith(b"250 2.0.0 Ok: queued as em_"), after)
        self.assertEqual(after[1], b"221 2.0.0 Bye")
        stored = self.stored()
        self.assertEqual(len(stored), 1, [e.payload.get("subject") for e in stored])
        payload = stored[0].payload
        self.assertEqual(stored[0].id, after[0].split()[-1].decode())
        self.assertEqual(payload["subject"], "smuggling test")
        self.assertNotIn("victim@example.com", json.dumps([payload.get(k) for k in ("to", "cc", "bcc")]))
        text = payload["text"]
        for smuggled in ("MAIL FROM:<you@yourdomain.com>", "RCPT TO:<victim@example.com>", "DATA",
                         "Subject: smuggled", "smuggled body"):
            self.assertIn(smuggled, text)

    async def test_real_terminator_control(self) -> None:
        """Control: with a real <CRLF>.<CRLF> in place of a look-alike, the second message IS a second transaction (so the checks can fail)."""
        content = FIRST + b"\r\n.\r\n" + SMUGGLED + b".\r\n"
        after = await self.in_thread(converse, self.port, self.context(), content)
        self.assertEqual(
            [line[:3] for line in after], [b"250", b"250", b"250", b"354", b"250", b"221"], after
        )
        self.assertEqual(
            sorted(e.payload["subject"] for e in self.stored()), ["smuggled", "smuggling test"]
        )


def _variant_test(name: str, fake: bytes) -> Callable[[SmugglingTests], Any]:
    async def test(self: SmugglingTests) -> None:
        await self.check_variant(fake)

    test.__name__ = f"test_{name}"
    test.__doc__ = f"{fake!r} followed by a smuggled transaction does not end DATA: one email, one 250."
    return test


for _name, _fake in VARIANTS.items():
    setattr(SmugglingTests, f"test_{_name}", _variant_test(_name, _fake))
