"""
bench/run.py - the orchestrator of `make bench` and `make bench-smoke`
(docs/performance.md).

Measures the relay against the baseline bridge (bench/baseline_bridge.py,
aiosmtpd + aiohttp) on this machine, in the same run, and prints one table
of medians and ratios against the goals of issue 8.

Steps:

1. ``sh bench/install.sh`` (skip with ``--no-install``): the bench venv
   ``.venv-bench`` (aiosmtpd, aiohttp) and nginx with its echo module.
2. An ECDSA P-256 certificate for localhost/127.0.0.1 (openssl).
3. The upstream stubs (bench/upstream.py: nginx answering ``POST /emails``
   with 202): one without delay, one with 20 ms; pinned to CPU 1.
4. For each scenario, for each round, relay then baseline: the server is
   started fresh, pinned to CPU 0 (``taskset -c 0``), waited for (a real TLS
   greeting, bounded), warmed up, then measured while bench/loadgen.js
   (pinned to CPU 1) sends the load. Server CPU time (utime + stime of
   /proc/PID/stat) before/after -> ms CPU per message; RSS (VmRSS) and peak
   (VmHWM, reset through /proc/PID/clear_refs) from /proc/PID/status.
5. The table (scenario, metric, relay median, baseline median, ratio, goal,
   met?) on stdout, and every raw figure as JSON in
   ``bench/results/<timestamp>.json``.

Scenarios: S1 (10 persistent connections, 1.7 KB messages, MAIL/RCPT/DATA
pipelined), S1NP (the same without pipelining: one command, one reply, as
PHPMailer, Django, JavaMail, Go, Ruby and smtplib send), S2 (a fresh TLS
connection + AUTH per message, 10 at once), S1L50 (50 persistent connections,
upstream answering after 20 ms), S3 (1,000 then 5,000 idle authenticated
connections: KB per connection, and a message still served), S4 (a message
with a 10 MB attachment: time to 250, peak RSS above the starting RSS).

S1R and S2R (relay only, run with ``--redis`` or named in ``--scenarios``):
S1 and S2 with the relay sharing state through a real ``redis-server``
(``--redis-url``, docs/operations.md "A fleet") that this script starts on
loopback, pinned to CPU 1 with the load, no persistence; the table compares
their server CPU per message with S1's and S2's (goal: within 5 %), and the
Redis server's own CPU per message is in the raw results.

    .venv/bin/python bench/run.py [--smoke] [--rounds 3] [--scenarios S1,S4]
        [--relay-only] [--no-install] [--keep-tmp] [--redis]

``--smoke`` runs tiny counts, one round, both servers, and ends with the line
``bench smoke: N scenarios ran, M failed``. The exit status is 1 when any
scenario failed (a server that did not start or died, a reply other than 250,
a load generator error); goals not met are reported in the table, not in the
exit status. Standard library only (plus bench/upstream.py and
bench/messages.py, which are standard library only too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)

import messages  # noqa: E402  (bench/messages.py)

LOADGEN = os.path.join(BENCH, "loadgen.js")
PY_SPY = os.path.join(ROOT, ".venv-bench", "bin", "py-spy")
PROFILE_DIR: Optional[str] = None
RELAY_TWISTD = os.path.join(ROOT, ".venv", "bin", "twistd")
BENCH_PYTHON = os.path.join(ROOT, ".venv-bench", "bin", "python")
BASELINE = os.path.join(BENCH, "baseline_bridge.py")
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
RESULTS = os.path.join(BENCH, "results")

SERVER_CPU = "0"        # the server under test
CLIENT_CPU = "1"        # load generator, upstream stub, this script
USER, PASSWORD = "poststack", "sk_test_bench"
FD_LIMIT = 20000
KINDS = ("relay", "baseline")

#: The load generator's --pipelining for every run. "yes": MAIL, RCPT and DATA
#: in one write to both servers, so that both get the same bytes. The relay
#: advertises PIPELINING; aiosmtpd 1.4 does not, but reads commands in order
#: from a buffered stream and so serves pipelined clients correctly. Fewer round
#: trips help the baseline if anything. (--pipelining auto on the command line:
#: only where advertised, as a strict client would.)
PIPELINING = "yes"


def log(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------- /proc readings


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process C{pid} (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kb(pid: int, name: str) -> int:
    """A field of /proc/PID/status in kB (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise KeyError(name)


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); True if it worked."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return status_kb(pid, "VmHWM") <= status_kb(pid, "VmRSS") + 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def taskset(cpu: str) -> list[str]:
    """The ``taskset -c CPU`` prefix, or nothing on a one-CPU machine."""
    return ["taskset", "-c", cpu] if PIN else []


PIN = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE (inherited by every child) to FD_LIMIT if allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FD_LIMIT if hard == resource.RLIM_INFINITY else min(FD_LIMIT, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---------------------------------------------------------------- servers under test


class ServerFailed(Exception):
    """The server did not start, or died."""


class Server:
    """The relay or the baseline bridge, started fresh and pinned to CPU 0."""

    def __init__(self, kind: str, tmp: str, cert: str, key: str, api_url: str, workers: int = 0,
                 redis_url: Optional[str] = None) -> None:
        self.kind = kind
        self.port = free_port()
        self.cert = cert
        self.log_path = os.path.join(tmp, f"{kind}-{self.port}.log")
        if kind == "relay":
            argv = [RELAY_TWISTD, "-n", "--pidfile=", "--logfile", self.log_path, "poststack-relay",
                    "--port", str(self.port), "--interface", "127.0.0.1",
                    "--tls-cert", cert, "--tls-key", key, "--hostname", "localhost",
                    "--api-url", api_url,
                    "--max-connections", str(FD_LIMIT), "--max-connections-per-ip", str(FD_LIMIT)]
            if RELAY_HAS_METRICS:
                argv += ["--metrics-listen", f"127.0.0.1:{free_port()}"]
            if workers > 1:
                argv += ["--workers", str(workers)]
            if redis_url is not None:
                argv += ["--redis-url", redis_url]
        else:
            argv = [BENCH_PYTHON, BASELINE, "--host", "127.0.0.1", "--port", str(self.port),
                    "--cert", cert, "--key", key, "--api-url", api_url]
        self.workers = workers
        self.argv = (taskset(SERVER_CPU) if not workers else taskset("0,1")) + argv
        self.profiler: Optional[subprocess.Popen[bytes]] = None
        self.out = open(self.log_path + ".out", "wb")
        self.process = subprocess.Popen(
            self.argv, cwd=tmp, stdin=subprocess.DEVNULL, stdout=self.out, stderr=subprocess.STDOUT,
            # S2 opens a connection (and logs in) per message from one address,
            # far past the default connection and AUTH rates: the benchmark
            # measures the message path, not those defences (a relay without
            # the options ignores the variables).
            env=dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1",
                     POSTSTACK_RELAY_MAX_CONNECTION_RATE_PER_IP="0",
                     POSTSTACK_RELAY_MAX_AUTH_RATE_PER_IP="0"),
        )
        self.pid = self.process.pid  # taskset execs the server: same PID

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Wait until a TLS client gets the 220 greeting; return the seconds it took."""
        context = ssl.create_default_context(cafile=self.cert)
        start = time.monotonic()
        last = "no attempt"
        while time.monotonic() - start < timeout:
            self.check_alive()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as raw:
                    with context.wrap_socket(raw, server_hostname="localhost") as tls:
                        greeting = tls.recv(512)
                        if greeting.startswith(b"220"):
                            tls.sendall(b"QUIT\r\n")
                            tls.recv(512)
                            self.start_profiler()
                            return time.monotonic() - start
                        last = greeting[:80].decode("latin-1")
            except (OSError, ssl.SSLError) as e:
                last = str(e)
            time.sleep(0.1)
        raise ServerFailed(f"{self.kind} did not greet within {timeout} s ({last})\n{self.log_tail()}")

    def start_profiler(self) -> None:
        """With --profile: sample the relay with py-spy from CPU 1 (folded stacks, written at stop)."""
        if self.kind != "relay" or not PROFILE_DIR or self.profiler is not None:
            return
        path = os.path.join(PROFILE_DIR, f"relay-{self.port}.folded")
        self.profiler = subprocess.Popen(
            taskset(CLIENT_CPU) + [PY_SPY, "record", "--pid", str(self.pid), "--rate", "250",
                                   "--format", "raw", "--output", path],
            stdin=subprocess.DEVNULL, stdout=self.out, stderr=subprocess.STDOUT)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise ServerFailed(f"{self.kind} exited with status {self.process.returncode}\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        text = b""
        for path in (self.log_path, self.log_path + ".out"):
            try:
                with open(path, "rb") as f:
                    text += f.read()[-4000:]
            except OSError:
                pass
        return "\n".join(text.decode("utf-8", "replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.profiler is not None:  # SIGINT: py-spy writes its file and exits
            self.profiler.send_signal(signal.SIGINT)
            try:
                self.profiler.wait(30)
            except subprocess.TimeoutExpired:
                self.profiler.kill()
                self.profiler.wait(5)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.out.close()


def relay_has_metrics_option() -> bool:
    """Whether this checkout's relay knows --metrics-listen (it then must get a free port)."""
    try:
        out = subprocess.run([RELAY_TWISTD, "poststack-relay", "--help"], capture_output=True, text=True,
                             timeout=60, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT)).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--metrics-listen" in out


RELAY_HAS_METRICS = False


# ---------------------------------------------------------------- the load generator


class LoadgenFailed(Exception):
    """The load generator could not run or reported failures."""


class Redis:
    """
    A real redis-server for S1R/S2R: loopback, a free port, no RDB/AOF, its
    files in the run's temporary directory, pinned with the load (CPU 1);
    stopped by its PID.
    """

    def __init__(self, tmp: str) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        directory = os.path.join(tmp, f"redis-{self.port}")
        os.makedirs(directory)
        self.process = subprocess.Popen(
            taskset(CLIENT_CPU) + [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no", "--dir", directory,
                                   "--logfile", os.path.join(directory, "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.process.pid  # taskset execs redis-server: same PID

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Wait until it answers PING (bounded)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise ServerFailed(f"redis-server exited with status {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise ServerFailed(f"redis-server did not answer PING within {timeout} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def loadgen_argv(port: int, ca: str, message_file: str, time_limit: float, **options: Any) -> list[str]:
    pipelining = options.pop("pipelining", PIPELINING)
    argv = taskset(options.pop("cpus", CLIENT_CPU)) + ["node", LOADGEN, "--host", "127.0.0.1", "--port", str(port), "--ca", ca,
                                  "--user", USER, "--password", PASSWORD, "--message-file", message_file,
                                  "--time-limit", str(int(time_limit)), "--pipelining", pipelining]
    for name, value in options.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


def parse_result(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{") and '"sent"' in line:
            return json.loads(line)
    raise LoadgenFailed(f"no result line from the load generator: {stdout[-500:]!r}")


def run_loadgen(port: int, ca: str, message_file: str, time_limit: float, **options: Any) -> dict[str, Any]:
    """Run loadgen.js to the end; return its result (with its own CPU time added)."""
    argv = loadgen_argv(port, ca, message_file, time_limit, **options)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=time_limit + 30)
    except subprocess.TimeoutExpired as e:
        raise LoadgenFailed(f"load generator still running {time_limit + 30:.0f} s after its start") from e
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 1):
        raise LoadgenFailed(f"load generator exit status {done.returncode}: {done.stderr[-1000:]}")
    result = parse_result(done.stdout)
    result["loadgen_cpu_s"] = round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 3)
    return result


def check_all_ok(result: dict[str, Any], what: str) -> None:
    if result["ok"] != result["requested"] or result["failed"] or result.get("timed_out"):
        raise LoadgenFailed(f"{what}: {result['ok']} of {result['requested']} got 250, codes {result['codes']}, "
                            f"errors {result['errors'][:3]}")


# ---------------------------------------------------------------- scenarios


@dataclass
class Context:
    """What every scenario run needs."""

    tmp: str
    cert: str
    key: str
    small: str
    large: str
    upstream_fast: str
    upstream_slow: str
    upstream_pids: list[int]
    smoke: bool
    warmup: int
    redis: Optional[Redis] = None


@dataclass
class Scenario:
    name: str
    title: str
    run: Callable[[Context, Server, dict[str, Any]], None]
    slow_upstream: bool = False
    workers: int = 0  # > 0: relay only, with --workers N, nothing pinned (multi-core scaling)
    redis: bool = False  # relay only, with --redis-url to the run's redis-server


@dataclass
class Counts:
    s1: int
    s2: int
    s1l50: int
    s3_stages: list[int]
    s4_messages: int
    s4_attachment: int


FULL = Counts(s1=20000, s2=3000, s1l50=20000, s3_stages=[1000, 5000], s4_messages=3,
              s4_attachment=10 * 1000 * 1000)
SMOKE = Counts(s1=50, s2=20, s1l50=50, s3_stages=[50], s4_messages=1, s4_attachment=1000 * 1000)
COUNTS = FULL


def time_limit_for(messages: int, rate_floor: float = 50.0) -> float:
    """A generous bound for sending C{messages}, assuming at least C{rate_floor} msg/s."""
    return 60 + messages / rate_floor


def upstream_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass
    return total


def tree_cpu(pid: int) -> float:
    """CPU seconds of C{pid} and its children (a --workers supervisor and its workers)."""
    total = cpu_seconds(pid)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                total += cpu_seconds(int(entry))
    return total


def throughput_run(ctx: Context, server: Server, record: dict[str, Any],
                   messages_: int, connections: int, mode: str, pipelining: Optional[str] = None) -> None:
    """S1, S2, S1L50, S1NP: send C{messages_} small messages; server CPU per message."""
    cpu0, up0 = tree_cpu(server.pid), upstream_cpu(ctx.upstream_pids)
    extra: dict[str, Any] = {"cpus": "0,1"} if server.workers else {}
    if pipelining is not None:
        extra["pipelining"] = pipelining
    result = run_loadgen(server.port, ctx.cert, ctx.small, time_limit_for(messages_),
                         connections=connections, messages=messages_, mode=mode, **extra)
    cpu1, up1 = tree_cpu(server.pid), upstream_cpu(ctx.upstream_pids)
    server.check_alive()
    metrics = {
        "msgs_per_s": result["msgs_per_s"],
        "cpu_ms_per_msg": round((cpu1 - cpu0) * 1000 / max(1, result["ok"]), 4),
        "p50_ms": result["latency_ms"]["p50"],
        "p99_ms": result["latency_ms"]["p99"],
        "rss_mb": round(status_kb(server.pid, "VmRSS") / 1024, 1),
    }
    record.update({"loadgen": result, "metrics": metrics, "server_cpu_s": round(cpu1 - cpu0, 3),
                   "upstream_cpu_s": round(up1 - up0, 3)})
    check_all_ok(result, "load")


def s1(ctx: Context, server: Server, record: dict[str, Any]) -> None:
    throughput_run(ctx, server, record, COUNTS.s1, 10, "persistent")


def s1np(ctx: Context, server: Server, record: dict[str, Any]) -> None:
    """S1 as the clients users run send it: one command, one reply, no pipelining."""
    throughput_run(ctx, server, record, COUNTS.s1, 10, "persistent", pipelining="no")


def s2(ctx: Context, server: Server, record: dict[str, Any]) -> None:
    throughput_run(ctx, server, record, COUNTS.s2, 10, "fresh")


def s1l50(ctx: Context, server: Server, record: dict[str, Any]) -> None:
    throughput_run(ctx, server, record, COUNTS.s1l50, 50, "persistent")


def s3(ctx: Context, server: Server, record: dict[str, Any]) -> None:
    """Idle connections in stages; RSS per connection; one message served at each stage."""
    stages = COUNTS.s3_stages
    time.sleep(0.5)
    rss0 = status_kb(server.pid, "VmRSS")
    argv = loadgen_argv(server.port, ctx.cert, ctx.small, time_limit_for(sum(stages) * 2),
                        connections=1, messages=1, idle=",".join(map(str, stages)))
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    lines: "queue.Queue[Optional[str]]" = queue.Queue()

    def reader() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    stage_results: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {"rss0_mb": round(rss0 / 1024, 1)}
    record.update({"stages": stage_results, "metrics": metrics})
    final: Optional[dict[str, Any]] = None
    deadline = time.monotonic() + time_limit_for(sum(stages) * 2) + 30
    try:
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            data = json.loads(line) if line.startswith("{") else None
            if data is None:
                continue
            if "idle_ready" in data:
                time.sleep(1.0)  # let the server settle
                server.check_alive()
                rss = status_kb(server.pid, "VmRSS")
                data["rss_mb"] = round(rss / 1024, 1)
                data["kb_per_conn"] = round((rss - rss0) / max(1, data["idle_ready"]), 2)
                stage_results.append(data)
                n = data["target"]
                metrics[f"kb_per_conn_{n}"] = data["kb_per_conn"]
                metrics[f"rss_mb_{n}"] = data["rss_mb"]
                metrics[f"served_{n}"] = 1 if data["messages_ok"] == data["messages"] else 0
                assert process.stdin is not None
                process.stdin.write("go\n")
                process.stdin.flush()
            elif "sent" in data:
                final = data
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    record["loadgen"] = final
    if final is None:
        stderr = process.stderr.read()[-500:] if process.stderr else ""
        raise LoadgenFailed(f"S3: no result from the load generator ({stderr})")
    if len(stage_results) != len(stages):
        raise LoadgenFailed(f"S3: {len(stage_results)} of {len(stages)} stages reached; errors {final['errors'][:3]}")
    for stage in stage_results:
        if stage["open"] != stage["target"]:
            raise LoadgenFailed(f"S3: only {stage['open']} of {stage['target']} idle connections opened; "
                                f"errors {final['errors'][:3]}")
    check_all_ok(final, "S3")


def s4(ctx: Context, server: Server, record: dict[str, Any]) -> None:
    """The large message: time to 250 and peak RSS above the starting RSS."""
    time.sleep(0.5)
    rss0 = status_kb(server.pid, "VmRSS")
    reset_ok = reset_peak(server.pid)
    peak0 = status_kb(server.pid, "VmHWM")
    result = run_loadgen(server.port, ctx.cert, ctx.large, 120 + 30 * COUNTS.s4_messages,
                         connections=1, messages=COUNTS.s4_messages)
    server.check_alive()
    peak = status_kb(server.pid, "VmHWM")
    metrics = {
        "seconds_to_250": round(result["latency_ms"]["p50"] / 1000, 3) if result["latency_ms"]["p50"] else None,
        "peak_above_start_mb": round((peak - rss0) / 1024, 1),
        "rss0_mb": round(rss0 / 1024, 1),
    }
    record.update({"loadgen": result, "metrics": metrics, "peak_reset": reset_ok, "peak0_kb": peak0})
    if not reset_ok:
        raise ServerFailed("could not reset VmHWM through /proc/PID/clear_refs")
    check_all_ok(result, "S4")


SCENARIOS = [
    Scenario("S1", "10 persistent connections, 1.7 KB messages", s1),
    Scenario("S1NP", "S1 without pipelining (one command, one reply)", s1np),
    Scenario("S2", "fresh TLS connection + AUTH per message, 10 at once", s2),
    Scenario("S1L50", "50 persistent connections, API answering after 20 ms", s1l50, slow_upstream=True),
    Scenario("S3", "idle authenticated connections", s3),
    Scenario("S4", "one message with a large attachment", s4),
    # Multi-core: S1 with the relay unpinned, 1 and 2 worker processes (the
    # load generator shares the 2 cores; relay only).
    Scenario("S1W1", "S1 unpinned, 1 worker", s1, workers=1),
    Scenario("S1W2", "S1 unpinned, --workers 2", s1, workers=2),
    # Shared state: S1 and S2 with --redis-url (relay only; --redis adds them).
    Scenario("S1R", "S1 with --redis-url (redis-server on CPU 1)", s1, redis=True),
    Scenario("S2R", "S2 with --redis-url (redis-server on CPU 1)", s2, redis=True),
]
#: Not run unless named in --scenarios or asked for with --redis.
OPTIONAL_SCENARIOS = ("S1R", "S2R")


def run_one(ctx: Context, scenario: Scenario, kind: str, round_: int) -> dict[str, Any]:
    """Start the server fresh, warm it up, run the scenario, stop the server."""
    record: dict[str, Any] = {"scenario": scenario.name, "kind": kind, "round": round_}
    api_url = ctx.upstream_slow if scenario.slow_upstream else ctx.upstream_fast
    redis_url = None
    if scenario.redis:
        if ctx.redis is None:
            record["error"] = "no redis-server (apt-get install redis-server)"
            return record
        redis_url = ctx.redis.url
    server = Server(kind, ctx.tmp, ctx.cert, ctx.key, api_url, workers=scenario.workers, redis_url=redis_url)
    try:
        record["start_s"] = round(server.wait_ready(), 2)
        warm = run_loadgen(server.port, ctx.cert, ctx.small, time_limit_for(ctx.warmup),
                           connections=10 if scenario.name != "S1L50" else 50, messages=ctx.warmup)
        record["warmup"] = {k: warm[k] for k in ("ok", "failed", "codes", "msgs_per_s", "errors")}
        check_all_ok(warm, "warm-up")
        redis0 = cpu_seconds(ctx.redis.pid) if scenario.redis and ctx.redis else 0.0
        scenario.run(ctx, server, record)
        server.check_alive()
        if scenario.redis and ctx.redis is not None:
            ok = max(1, record.get("loadgen", {}).get("ok", 0))
            record["redis_cpu_s"] = round(cpu_seconds(ctx.redis.pid) - redis0, 3)
            record["metrics"]["redis_cpu_ms_per_msg"] = round(record["redis_cpu_s"] * 1000 / ok, 4)
    except (ServerFailed, LoadgenFailed, OSError, AssertionError, ValueError) as e:
        record["error"] = f"{type(e).__name__}: {e}"
    finally:
        server.stop()
    return record


# ---------------------------------------------------------------- the table


@dataclass
class Row:
    scenario: str
    metric: str
    key: str
    unit_format: str = "{:.1f}"
    goal: Optional[tuple[str, float]] = None  # ("ratio>=", 3.5), ("ratio<=", 0.2), ("relay<=", 25)
    note: str = ""
    versus: str = ""  # compare with this scenario's relay (its figure in the baseline column)


ROWS = [
    Row("S1", "throughput (msg/s)", "msgs_per_s", "{:.0f}", ("ratio>=", 3.5)),
    Row("S1", "server CPU (ms/msg)", "cpu_ms_per_msg", "{:.3f}", ("relay<=", 0.65)),
    Row("S1", "p50 end of data -> 250 (ms)", "p50_ms", "{:.2f}"),
    Row("S1", "p99 end of data -> 250 (ms)", "p99_ms", "{:.2f}", ("ratio<=", 0.2)),
    Row("S1NP", "throughput (msg/s)", "msgs_per_s", "{:.0f}"),
    Row("S1NP", "server CPU (ms/msg)", "cpu_ms_per_msg", "{:.3f}"),
    Row("S1NP", "p50 end of data -> 250 (ms)", "p50_ms", "{:.2f}"),
    Row("S2", "throughput (msg/s)", "msgs_per_s", "{:.0f}", ("ratio>=", 2.2)),
    Row("S2", "server CPU (ms/msg)", "cpu_ms_per_msg", "{:.3f}"),
    Row("S1L50", "throughput (msg/s)", "msgs_per_s", "{:.0f}", ("ratio>=", 3.5)),
    Row("S1L50", "p50 end of data -> 250 (ms)", "p50_ms", "{:.2f}", ("relay<=", 25)),
    Row("S1L50", "server CPU (ms/msg)", "cpu_ms_per_msg", "{:.3f}"),
    Row("S1W1", "throughput, unpinned (msg/s)", "msgs_per_s", "{:.0f}"),
    Row("S1W2", "throughput, 2 workers (msg/s)", "msgs_per_s", "{:.0f}"),
    Row("S1W2", "server CPU, all processes (ms/msg)", "cpu_ms_per_msg", "{:.3f}"),
    Row("S1R", "throughput, Redis vs S1 (msg/s)", "msgs_per_s", "{:.0f}", versus="S1"),
    Row("S1R", "server CPU, Redis vs S1 (ms/msg)", "cpu_ms_per_msg", "{:.3f}", ("ratio<=", 1.05), versus="S1"),
    Row("S1R", "redis-server CPU (ms/msg)", "redis_cpu_ms_per_msg", "{:.4f}"),
    Row("S2R", "throughput, Redis vs S2 (msg/s)", "msgs_per_s", "{:.0f}", versus="S2"),
    Row("S2R", "server CPU, Redis vs S2 (ms/msg)", "cpu_ms_per_msg", "{:.3f}", ("ratio<=", 1.05), versus="S2"),
    Row("S2R", "redis-server CPU (ms/msg)", "redis_cpu_ms_per_msg", "{:.4f}"),
]


def s3_rows(stages: list[int]) -> list[Row]:
    rows = []
    last = stages[-1]
    for n in stages:
        goal = ("ratio<=", 0.12) if n == last else None
        rows.append(Row("S3", f"memory per idle connection at {n} (KB)", f"kb_per_conn_{n}", "{:.1f}", goal))
    rows.append(Row("S3", f"RSS with {last} idle connections (MB)", f"rss_mb_{last}", "{:.1f}",
                    ("relay<=", 200) if last >= 5000 else None))
    rows.append(Row("S3", f"message served with {last} idle (1 = yes)", f"served_{last}", "{:.0f}",
                    ("relay>=", 1)))
    return rows


def s4_rows() -> list[Row]:
    return [
        Row("S4", "time to 250 (s)", "seconds_to_250", "{:.2f}", ("ratio<=", 0.4)),
        Row("S4", "peak RSS above start (MB)", "peak_above_start_mb", "{:.1f}", ("relay<=", 50)),
    ]


def median_of(records: list[dict[str, Any]], scenario: str, kind: str, key: str) -> Optional[float]:
    values = [r["metrics"][key] for r in records
              if r["scenario"] == scenario and r["kind"] == kind and r.get("metrics", {}).get(key) is not None]
    return statistics.median(values) if values else None


def evaluate(goal: Optional[tuple[str, float]], relay: Optional[float], ratio: Optional[float]) -> str:
    if goal is None:
        return "-"
    op, value = goal
    subject = ratio if op.startswith("ratio") else relay
    if subject is None:
        return "?"
    ok = subject >= value if op.endswith(">=") else subject <= value
    return "yes" if ok else "NO"


def goal_text(goal: Optional[tuple[str, float]]) -> str:
    if goal is None:
        return "-"
    op, value = goal
    if op.startswith("ratio"):
        return f"{op[5:]} {value:g}x"
    return f"relay {op[5:]} {value:g}"


def build_table(records: list[dict[str, Any]], scenario_names: list[str]) -> list[dict[str, Any]]:
    rows = [r for r in ROWS + s3_rows(COUNTS.s3_stages) + s4_rows() if r.scenario in scenario_names]
    table = []
    for row in rows:
        relay = median_of(records, row.scenario, "relay", row.key)
        if row.versus:
            baseline = median_of(records, row.versus, "relay", row.key)
        else:
            baseline = median_of(records, row.scenario, "baseline", row.key)
        ratio = relay / baseline if relay is not None and baseline not in (None, 0) else None
        table.append({
            "scenario": row.scenario, "metric": row.metric, "key": row.key,
            "relay": relay, "baseline": baseline, "ratio": ratio,
            "goal": goal_text(row.goal), "met": evaluate(row.goal, relay, ratio),
            "format": row.unit_format,
        })
    return table


def print_table(table: list[dict[str, Any]]) -> None:
    def fmt(value: Optional[float], spec: str) -> str:
        return "-" if value is None else spec.format(value)

    header = ("scenario", "metric", "relay", "baseline", "ratio", "goal", "met?")
    lines = [header]
    for t in table:
        lines.append((t["scenario"], t["metric"], fmt(t["relay"], t["format"]), fmt(t["baseline"], t["format"]),
                      "-" if t["ratio"] is None else f"{t['ratio']:.2f}x", t["goal"], t["met"]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    aligns = ["<", "<", ">", ">", ">", "<", "<"]
    for n, line in enumerate(lines):
        log("  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(line, aligns, widths)).rstrip())
        if n == 0:
            log("  ".join("-" * w for w in widths))


# ---------------------------------------------------------------- main


def make_certificate(directory: str) -> tuple[str, str]:
    """A self-signed ECDSA P-256 certificate for localhost and 127.0.0.1."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "30", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    os.chmod(key, 0o600)
    return cert, key


def load_average() -> float:
    """The 1-minute load average (to warn about a busy machine)."""
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def versions() -> dict[str, str]:
    def out(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            return (done.stdout + done.stderr).strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired, IndexError):
            return "?"

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    return {
        "cpu": cpu, "cpus": str(os.cpu_count()), "kernel": platform.release(),
        "python": platform.python_version(), "node": out(["node", "--version"]),
        "nginx": out(["/usr/sbin/nginx", "-v"]), "openssl": out(["openssl", "version"]),
        "relay_git": out(["git", "-C", ROOT, "describe", "--always", "--dirty"]),
    }


def main(argv: Optional[list[str]] = None) -> int:
    global COUNTS, RELAY_HAS_METRICS, PIPELINING, PROFILE_DIR
    parser = argparse.ArgumentParser(
        description="Benchmark the relay against the baseline bridge (docs/performance.md).")
    parser.add_argument("--smoke", action="store_true", help="tiny counts, one round (CI)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per scenario (default 3; smoke 1)")
    parser.add_argument("--scenarios", default=",".join(s.name for s in SCENARIOS if s.name not in OPTIONAL_SCENARIOS),
                        help="comma-separated subset of S1,S1NP,S2,S1L50,S3,S4,S1W1,S1W2 (and S1R,S2R)")
    parser.add_argument("--relay-only", action="store_true", help="do not run the baseline bridge")
    parser.add_argument("--no-install", action="store_true", help="skip bench/install.sh")
    parser.add_argument("--pipelining", choices=("yes", "no", "auto"), default=PIPELINING,
                        help="load generator's PIPELINING use (default yes: same traffic to both servers)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory (logs)")
    parser.add_argument("--output", default=RESULTS, help="directory for the JSON results")
    parser.add_argument("--redis", action="store_true",
                        help="also run S1R and S2R: S1 and S2 with --redis-url to a redis-server this run starts")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="run the relay under py-spy, folded stacks into DIR (figures then not comparable)")
    args = parser.parse_args(argv)
    if args.profile:
        PROFILE_DIR = os.path.abspath(args.profile)
        os.makedirs(PROFILE_DIR, exist_ok=True)

    COUNTS = SMOKE if args.smoke else FULL
    PIPELINING = args.pipelining
    rounds = args.rounds or (1 if args.smoke else 3)
    wanted = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    if args.redis:
        wanted += [n for n in OPTIONAL_SCENARIOS if n not in wanted]
    unknown = set(wanted) - {s.name for s in SCENARIOS}
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    scenarios = [s for s in SCENARIOS if s.name in wanted]
    kinds = ("relay",) if args.relay_only else KINDS

    if PIN:
        os.sched_setaffinity(0, {int(CLIENT_CPU)})
    else:
        log("warning: fewer than 2 CPUs (or no taskset): nothing is pinned, figures are not comparable")
    fd_limit = raise_fd_limit()
    if "S3" in wanted and fd_limit < max(COUNTS.s3_stages) + 200:
        log(f"warning: open-file limit {fd_limit} is below what S3 needs")

    if not args.no_install:
        log("== bench/install.sh")
        if subprocess.run(["sh", os.path.join(BENCH, "install.sh")]).returncode != 0:
            log("bench: install.sh failed")
            return 1
    missing = [p for p in [RELAY_TWISTD, "/usr/sbin/nginx"] + ([] if args.relay_only else [BENCH_PYTHON, BASELINE])
               if not os.path.exists(p)]
    if missing or shutil.which("node") is None:
        log(f"bench: missing {', '.join(missing) or 'node'} (make venv; sh bench/install.sh)")
        return 1
    RELAY_HAS_METRICS = relay_has_metrics_option()
    load0 = load_average()
    if load0 > 0.5:
        log(f"warning: load average {load0:.2f}: other processes are running, figures may be disturbed")

    from upstream import Upstream  # bench/upstream.py

    tmp = tempfile.mkdtemp(prefix="poststack-bench-")
    started = time.time()
    records: list[dict[str, Any]] = []
    upstreams: list[Any] = []
    servers_to_stop: list[Redis] = []
    try:
        cert, key = make_certificate(tmp)
        small, large = messages.write_messages(tmp, COUNTS.s4_attachment)
        fast = Upstream(delay_ms=0, cpus=CLIENT_CPU if PIN else None).start()
        upstreams.append(fast)
        slow = None
        if any(s.slow_upstream for s in scenarios):
            slow = Upstream(delay_ms=20, cpus=CLIENT_CPU if PIN else None).start()
            upstreams.append(slow)
        redis = None
        if any(s.redis for s in scenarios) and os.path.exists(REDIS_SERVER):
            redis = Redis(tmp)
            servers_to_stop.append(redis)
            redis.wait_ready()
        elif any(s.redis for s in scenarios):
            log(f"warning: {REDIS_SERVER} not found (apt-get install redis-server): S1R/S2R will fail")
        ctx = Context(tmp=tmp, cert=cert, key=key, small=small, large=large, upstream_fast=fast.url,
                      upstream_slow=slow.url if slow else fast.url,
                      upstream_pids=[p for u in upstreams for p in u.pids()],
                      smoke=args.smoke, warmup=20 if args.smoke else 200, redis=redis)
        log(f"== {'smoke' if args.smoke else 'full'} run: {', '.join(s.name for s in scenarios)}; "
            f"{rounds} round(s) of {' + '.join(kinds)}; server on CPU {SERVER_CPU}, load on CPU {CLIENT_CPU}; "
            f"message {os.path.getsize(small)} B, large {os.path.getsize(large) / 1e6:.1f} MB")
        for scenario in scenarios:
            for round_ in range(1, rounds + 1):
                for kind in kinds:
                    if (scenario.workers or scenario.redis) and kind != "relay":
                        continue
                    t0 = time.monotonic()
                    record = run_one(ctx, scenario, kind, round_)
                    record["wall_s"] = round(time.monotonic() - t0, 1)
                    record["load_average"] = load_average()
                    records.append(record)
                    shown = ", ".join(f"{k} {v}" for k, v in record.get("metrics", {}).items())
                    status = f"FAILED: {record['error']}" if "error" in record else "ok"
                    log(f"{scenario.name} round {round_} {kind}: {shown} [{record['wall_s']} s] {status}")
    finally:
        for r in servers_to_stop:
            r.stop()
        for u in upstreams:
            u.stop()
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"temporary files kept in {tmp}")

    names = [s.name for s in scenarios]
    table = build_table(records, names)
    log("")
    log(f"== results: medians of {rounds} round(s); ratio = relay / baseline"
        + ("; in rows 'vs S1'/'vs S2' the baseline column is that scenario's relay"
           if any(s.redis for s in scenarios) else ""))
    print_table(table)
    failed = sorted({r["scenario"] for r in records if "error" in r}, key=names.index)
    os.makedirs(args.output, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    path = os.path.join(args.output, f"{stamp}{'-smoke' if args.smoke else ''}.json")
    with open(path, "w") as f:
        json.dump({
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "duration_s": round(time.time() - started, 1),
            "smoke": args.smoke, "rounds": rounds, "kinds": list(kinds), "scenarios": names,
            "counts": COUNTS.__dict__, "pinned": PIN, "pipelining": PIPELINING,
            "load_average_at_start": load0, "machine": versions(),
            "table": [{k: v for k, v in t.items() if k != "format"} for t in table],
            "runs": records,
        }, f, indent=1)
    log(f"raw results: {os.path.relpath(path, ROOT)}")
    for r in records:
        if "error" in r:
            log(f"failure: {r['scenario']} round {r['round']} {r['kind']}: {r['error']}")
    label = "bench smoke" if args.smoke else "bench"
    log(f"{label}: {len(names)} scenarios ran, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
