"""
The image's HEALTHCHECK: GET /healthz on the relay's monitoring listener
(POSTSTACK_RELAY_METRICS_LISTEN, default 127.0.0.1:9587; a wildcard address
is asked on loopback).  Exit 0 on 200, 1 otherwise.  Standard library only.
"""

import os
import sys
import urllib.request


def healthz_url(listen: str) -> str | None:
    """The /healthz URL for a C{HOST:PORT} listen address, or None if it is off."""
    listen = listen.strip()
    if listen.lower() in ("", "off"):
        return None
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


def main() -> int:
    url = healthz_url(os.environ.get("POSTSTACK_RELAY_METRICS_LISTEN", "127.0.0.1:9587"))
    if url is None:
        print("POSTSTACK_RELAY_METRICS_LISTEN is off: no /healthz to ask", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as e:
        print(f"{url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
