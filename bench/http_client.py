"""
CPU time per API request of the relay's HTTP client paths, on one core.

    PYTHONPATH=. .venv/bin/python bench/http_client.py [--count N] [--rounds R]
        [--modes api,treq-default,agent] [--profile MODE]

Sequential keep-alive ``POST /emails`` requests with a ~1.6 KB JSON body to
a local loopback stub of the API (bench/upstream.py's nginx when
/usr/sbin/nginx exists (bench/install.sh), else a small twisted.web server
in a child process).  For each mode, N requests are made one after the
other over one kept-alive connection (after a few warm-up requests), and
the CPU time (user + system) of *this* process, the client, is divided by
N; the table shows the median of R rounds, in microseconds.  The server
runs in another process, so its CPU time is not counted.

Modes (each one only when the code it needs exists in this tree):

- ``api``: the whole relay path, ``HTTPEmailAPI.send_email`` over the
  client the relay builds (``poststack_relay.api.make_http_client``; on
  older trees, the relay's own ``HTTP11Client``): JSON encoding, request
  slot, breaker, attempt time-out, answer classification included.
- ``api-raw``: one request of the relay's prepared client path without the
  retry/slot/breaker layer (``poststack_relay.api.transport``), when present.
- ``http11``: the removed hand-written client (``poststack_relay.http11``),
  request and whole answer, when present.
- ``agent``: Twisted's ``Agent`` over a persistent ``HTTPConnectionPool``,
  the body as a ``FileBodyProducer``, the answer read with ``readBody``.
- ``treq-default``: ``treq.client.HTTPClient`` over that ``Agent``, used as
  the treq documentation shows (``client.post(url, data=..., headers=dict)``
  and ``response.content()``).

``--profile MODE`` runs MODE under cProfile and prints the top functions by
cumulative and by internal time instead of the table.

Loopback only; every loop is bounded in count and in time (--max-seconds
per round).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import socket
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any, Awaitable, Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

KEY = "sk_test_full_access"


def payload() -> dict[str, Any]:
    """A payload like an S1 message's: about 1.6 KB of JSON."""
    text = ("Hello, this is the weekly report. " * 18).strip()
    html = "<html><body><p>" + ("Hello, this is the <b>weekly</b> report. " * 16) + "</p></body></html>"
    return {
        "from": "Sender Name <you@yourdomain.com>",
        "to": ["User <user@example.com>"],
        "subject": "Your weekly report is ready",
        "text": text,
        "html": html,
        "tags": [{"name": "report"}, {"name": "weekly"}],
        "headers": {"Message-ID": "<bench-1@yourdomain.com>"},
        "idempotency_key": "psr-0123456789abcdef0123456789abcdef",
    }


BODY = json.dumps(payload(), separators=(",", ":")).encode("utf-8")

_TWISTED_WEB_SERVER = r"""
import sys
from twisted.internet import reactor, endpoints
from twisted.web.resource import Resource
from twisted.web.server import Site

class Emails(Resource):
    isLeaf = True
    n = 0
    def render_POST(self, request):
        request.content.read()
        Emails.n += 1
        request.setResponseCode(202)
        request.setHeader(b"content-type", b"application/json")
        return b'{"id":"em_%032d","object":"email"}' % (Emails.n,)
    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        return b'{"object":"list","data":[]}'

site = Site(Emails())
site.noisy = False
site.logRequest = lambda *a: None
port = int(sys.argv[1])
endpoints.TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(site)
print("ready", flush=True)
reactor.run()
"""


class Server:
    """The loopback API stub: nginx if installed, else twisted.web in a child process."""

    def __init__(self) -> None:
        self.kind = ""
        self.url = ""
        self._upstream: Any = None
        self._process: Optional[subprocess.Popen[bytes]] = None

    def __enter__(self) -> "Server":
        from upstream import NGINX, Upstream

        if os.access(NGINX, os.X_OK):
            self._upstream = Upstream(cpus=None).start()
            self.kind, self.url = "nginx", self._upstream.url
            return self
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._process = subprocess.Popen(
            [sys.executable, "-c", _TWISTED_WEB_SERVER, str(port)], stdout=subprocess.PIPE
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()  # bounded: the child prints or dies
        if line.strip() != b"ready":
            raise RuntimeError("the twisted.web stub did not start")
        self.kind, self.url = "twisted.web", f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._upstream is not None:
            self._upstream.stop()
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)


def modes(reactor: Any, base: str) -> dict[str, Callable[[], Awaitable[Any]]]:
    """Each available mode: a function making one request and reading its answer."""
    from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
    from twisted.web.http_headers import Headers

    from poststack_relay import api as api_module
    from poststack_relay.api import HTTPEmailAPI
    from poststack_relay.translate import EmailRequest

    url = base + "/emails"
    found: dict[str, Callable[[], Awaitable[Any]]] = {}
    request = EmailRequest(payload=payload(), idempotency_key=payload()["idempotency_key"])

    def new_pool() -> Any:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.retryAutomatically = False
        pool.maxPersistentPerHost = 64
        return pool

    make_http_client = getattr(api_module, "make_http_client", None)
    if make_http_client is not None:
        client, _closer = make_http_client(reactor, connect_timeout=10)
        relay_api = HTTPEmailAPI(client, base, 10.0, clock=reactor, max_attempts=1)
    else:
        from poststack_relay.http11 import HTTP11Client

        client = HTTP11Client(reactor, api_module.APIEndpoints(reactor, 10), max_idle_per_host=64)
        relay_api = HTTPEmailAPI(client, base, 10.0, clock=reactor, max_attempts=1)
    found["api"] = lambda: relay_api.send_email(KEY, request)

    transport = getattr(api_module, "transport", None)
    if transport is not None and make_http_client is not None:
        raw_client, _ = make_http_client(reactor, connect_timeout=10)
        prepared = transport.APITransport(raw_client, base)
        target = prepared.url("/emails")
        headers = prepared.headers(KEY, "psr-0123456789abcdef0123456789abcdef", body=True)
        found["api-raw"] = lambda: prepared.exchange("POST", target, headers, BODY)

    try:
        from poststack_relay.http11 import HTTP11Client as _Client
    except ImportError:
        pass
    else:
        http11 = _Client(reactor, api_module.APIEndpoints(reactor, 10), max_idle_per_host=64)
        http11_headers = {
            b"Authorization": [b"Bearer " + KEY.encode()],
            b"Content-Type": [b"application/json"],
        }
        wire = url.encode("ascii")
        found["http11"] = lambda: http11.request(b"POST", wire, http11_headers, BODY)

    agent = Agent(reactor, pool=new_pool())

    async def via_agent() -> Any:
        response = await agent.request(
            b"POST",
            url.encode("ascii"),
            Headers({b"Authorization": [b"Bearer " + KEY.encode()], b"Content-Type": [b"application/json"]}),
            FileBodyProducer(io.BytesIO(BODY)),
        )
        return await readBody(response)

    found["agent"] = via_agent

    from treq.client import HTTPClient

    treq_client = HTTPClient(Agent(reactor, pool=new_pool()))

    async def via_treq() -> Any:
        response = await treq_client.post(
            url,
            data=BODY,
            headers={b"Authorization": [b"Bearer " + KEY.encode()], b"Content-Type": [b"application/json"]},
        )
        return await response.content()

    found["treq-default"] = via_treq
    return found


def cpu() -> float:
    """CPU seconds (user + system) of this process, to the nanosecond clock."""
    return time.process_time()


async def measure(
    call: Callable[[], Awaitable[Any]], count: int, rounds: int, max_seconds: float
) -> list[float]:
    """Microseconds of CPU per request, one figure per round."""
    for _ in range(20):  # warm up: connect, fill caches
        await call()
    figures = []
    for _ in range(rounds):
        started, wall = cpu(), time.monotonic()
        done = 0
        while done < count and time.monotonic() - wall < max_seconds:
            await call()
            done += 1
        figures.append((cpu() - started) / done * 1e6)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000, help="requests per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per mode (default 5)")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="most seconds per round")
    parser.add_argument("--modes", default="", help="comma-separated modes (default: all available)")
    parser.add_argument("--profile", default="", help="profile this mode with cProfile instead")
    args = parser.parse_args()
    warnings.simplefilter("ignore", DeprecationWarning)
    if not (0 < args.count <= 100_000 and 0 < args.rounds <= 50):
        parser.error("--count in 1..100000, --rounds in 1..50")

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    results: dict[str, list[float]] = {}
    failure: list[BaseException] = []

    with Server() as server:
        available = modes(reactor, server.url)
        wanted = [m for m in args.modes.split(",") if m] or list(available)
        unknown = [m for m in wanted + ([args.profile] if args.profile else []) if m not in available]
        if unknown:
            parser.error(f"not available here: {unknown}; available: {sorted(available)}")

        async def run() -> None:
            try:
                if args.profile:
                    call = available[args.profile]
                    for _ in range(20):
                        await call()
                    profile = cProfile.Profile()
                    profile.enable()
                    for _ in range(args.count):
                        await call()
                    profile.disable()
                    for order in ("cumulative", "tottime"):
                        out = io.StringIO()
                        pstats.Stats(profile, stream=out).sort_stats(order).print_stats(30)
                        print(out.getvalue())
                    return
                for mode in wanted:
                    results[mode] = await measure(available[mode], args.count, args.rounds, args.max_seconds)
            except BaseException as e:  # report after the reactor stops
                failure.append(e)
            finally:
                reactor.callLater(0, reactor.stop)

        reactor.callWhenRunning(lambda: Deferred.fromCoroutine(run()))
        reactor.run()

    if failure:
        raise failure[0]
    if args.profile:
        return
    print(f"server: {server.kind}; body {len(BODY)} bytes; {args.count} requests x {args.rounds} rounds; "
          f"python {sys.version.split()[0]}")
    print(f"{'mode':<14} {'median us/request':>18} {'min':>8} {'max':>8}")
    for mode, figures in results.items():
        print(f"{mode:<14} {statistics.median(figures):>18.1f} {min(figures):>8.1f} {max(figures):>8.1f}")


if __name__ == "__main__":
    main()
