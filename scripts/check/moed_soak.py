#!/usr/bin/env python3
"""Soak test of moed: mixed traffic for a bounded time over its UNIX socket (no network), with
the daemon's memory, open file descriptors and latencies sampled at a fixed interval.

    scripts/check/moed_soak.py [--minutes 30] [--interval 60] [--clients 6] [--moed PATH]

Starts `moed` on the bundled model (models/small-moe/small-moe-q8_0.gguf) with a small queue
(--max-queue 3), a short header timeout and a small body limit, then runs client threads that
each pick from a mix: completions and chats, streamed and not; streams cancelled after a few
events; whole-response requests abandoned before the answer; bad requests (malformed JSON, a
wrong type, an unknown model, a wrong method, an unknown path, a body over the limit,
`max_tokens` beyond the context); slow clients that send their head byte by byte (served) or stall
past the header timeout (408); /health, /metrics and /v1/models; and bursts that overflow the
queue (503). Every request has the answers it may get (a 503 only where the queue may be full,
408 only for a stalled client, ...); anything else, or a connection error where an answer was
due, is a failure.

Each interval it samples moed's RSS (/proc/PID/status), its live heap (`moed_heap_bytes` in
/metrics, counted by moed's allocator: the figure that means the same under emulation), its
open file descriptors (/proc/PID/fd) and threads, and the latency percentiles of the
generations completed in that interval; at the end it prints the table (Markdown) with the
least-squares slope of each memory and fd series after the first interval (warm-up), and exits
1 if a request failed unexpectedly, the daemon died, or its fds grew.

Python standard library only.
"""
import argparse
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models/small-moe/small-moe-q8_0.gguf"
MAX_QUEUE = 3
HEADER_TIMEOUT = 2
MAX_BODY = 64 * 1024


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=120):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.path)
        self.sock = s


PROMPTS = ["Once upon a time", "It is a truth universally acknowledged", "Call me Ishmael.",
           "The sea was calm", "Mr. Darcy said", "In the morning"]


def gen_body(rng, chat, stream, max_tokens=None):
    body = {"max_tokens": max_tokens or rng.randint(4, 24), "seed": rng.randint(0, 1 << 30),
            "temperature": rng.choice([0, 0.7, 1.0])}
    if stream:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    if chat:
        body["messages"] = [{"role": "user", "content": rng.choice(PROMPTS)}]
    else:
        body["prompt"] = rng.choice(PROMPTS)
    return body


class Result:
    __slots__ = ("kind", "status", "latency", "ok", "detail", "t", "generation")

    def __init__(self, kind, status, latency, ok, detail="", generation=False):
        self.kind, self.status, self.latency, self.ok = kind, status, latency, ok
        self.detail, self.t, self.generation = detail, time.monotonic(), generation


def raw(sock_path, data, read=True, timeout=30):
    """Sends raw bytes; returns the status code of the answer (0 if none)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(sock_path)
    try:
        s.sendall(data)
        if not read:
            return 0
        buf = b""
        while b"\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        m = re.match(rb"HTTP/1\.1 (\d{3})", buf)
        return int(m.group(1)) if m else 0
    finally:
        s.close()


class Client:
    def __init__(self, sock_path, rng, results, lock):
        self.sock, self.rng, self.results, self.lock = sock_path, rng, results, lock

    def record(self, kind, status, t0, allowed, detail="", generation=False):
        r = Result(kind, status, time.monotonic() - t0, status in allowed, detail, generation)
        with self.lock:
            self.results.append(r)

    def request(self, kind, method, path, body, allowed, generation=False):
        t0 = time.monotonic()
        c = UnixConnection(self.sock)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            c.request(method, path, body=data, headers=headers)
            resp = c.getresponse()
            payload = resp.read()
            status = resp.status
            detail = "" if status in allowed else payload[:200].decode(errors="replace")
            if status == 200 and generation and body and json.loads(body if isinstance(body, bytes) else json.dumps(body)).get("stream"):
                if not payload.rstrip().endswith(b"data: [DONE]"):
                    status, detail = -1, "stream did not end with [DONE]"
            self.record(kind, status, t0, allowed, detail, generation and status == 200)
        except Exception as e:  # a connection error where an answer was due
            self.record(kind, -1, t0, allowed, repr(e))
        finally:
            c.close()

    def cancel_stream(self):
        t0 = time.monotonic()
        body = json.dumps(gen_body(self.rng, self.rng.random() < 0.5, True, 32)).encode()
        path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
        c = UnixConnection(self.sock)
        try:
            c.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            resp = c.getresponse()
            if resp.status == 200:
                for _ in range(2):
                    resp.fp.readline()
            self.record("stream-cancel", resp.status, t0, {200, 503})
        except Exception as e:
            self.record("stream-cancel", -1, t0, {200, 503}, repr(e))
        finally:
            c.close()  # hang up mid-stream

    def abandon(self):
        t0 = time.monotonic()
        body = json.dumps(gen_body(self.rng, False, False, 24)).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(self.sock)
            s.sendall(head + body)
            time.sleep(self.rng.uniform(0.01, 0.2))
            s.close()  # hang up before the answer
            self.record("abandon", 0, t0, {0})
        except Exception as e:
            self.record("abandon", -1, t0, {0}, repr(e))

    def slow_head(self):
        t0 = time.monotonic()
        data = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(30)
            s.connect(self.sock)
            for i in range(0, len(data), 4):
                s.sendall(data[i:i + 4])
                time.sleep(0.05)
            buf = s.recv(4096)
            s.close()
            m = re.match(rb"HTTP/1\.1 (\d{3})", buf)
            self.record("slow-head", int(m.group(1)) if m else 0, t0, {200})
        except Exception as e:
            self.record("slow-head", -1, t0, {200}, repr(e))

    def stall(self):
        t0 = time.monotonic()
        try:
            status = raw(self.sock, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n", timeout=HEADER_TIMEOUT + 20)
            self.record("stall", status, t0, {408})
        except Exception as e:
            self.record("stall", -1, t0, {408}, repr(e))

    def burst(self):
        # Enough at once to overflow the queue: the surplus gets 503 queue_full.
        threads = [threading.Thread(target=self.request, args=(
            "burst", "POST", "/v1/completions", gen_body(random.Random(self.rng.random()), False, False, 6),
            {200, 503}, True)) for _ in range(MAX_QUEUE + 4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def one(self):
        r = self.rng.random()
        chat = self.rng.random() < 0.5
        path = "/v1/chat/completions" if chat else "/v1/completions"
        busy = {200, 503}
        if r < 0.30:
            self.request("generate", "POST", path, gen_body(self.rng, chat, False), busy, True)
        elif r < 0.50:
            self.request("stream", "POST", path, gen_body(self.rng, chat, True), busy, True)
        elif r < 0.57:
            self.cancel_stream()
        elif r < 0.62:
            self.abandon()
        elif r < 0.77:
            bad = self.rng.choice([
                ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": ', {400}),
                ("POST", "/v1/completions", {"prompt": "x", "max_tokens": "many"}, {400}),
                ("POST", "/v1/chat/completions", {"messages": "hi"}, {400}),
                ("POST", "/v1/completions", {"prompt": "x", "model": "nope"}, {404}),
                ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 10 ** 6}, {400}),
                ("GET", "/v1/completions", None, {405}),
                ("GET", "/nowhere", None, {404}),
                ("POST", "/v1/completions", b"{" + b" " * (MAX_BODY + 10) + b"}", {413}),
                ("POST", "/v1/completions", {"prompt": "x", "n": 3}, {400}),
            ])
            self.request("bad", bad[0], bad[1], bad[2], bad[3])
        elif r < 0.82:
            self.slow_head()
        elif r < 0.84:
            self.stall()
        elif r < 0.86:
            self.burst()
        else:
            path = self.rng.choice(["/health", "/metrics", "/v1/models"])
            self.request("info", "GET", path, None, {200})


def proc_status(pid, key):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        return None


def heap_bytes(sock_path):
    c = UnixConnection(sock_path, timeout=30)
    try:
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
    finally:
        c.close()
    m = re.search(r"^moed_heap_bytes (\S+)$", text, re.M)
    return int(float(m.group(1))) if m else None


def slope(xs, ys):
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def pct(v, p):
    if not v:
        return float("nan")
    v = sorted(v)
    return v[min(len(v) - 1, round((len(v) - 1) * p))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--interval", type=float, default=60, help="seconds between samples")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--moed", default=str(ROOT / "target/release/moed"))
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--threads", type=int, default=1, help="moed's forward-pass threads")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if not Path(args.moed).exists():
        sys.exit(f"{args.moed} not found: cargo build --release -p moe-daemon (or pass --moed)")

    tmp = Path(tempfile.mkdtemp(prefix="moed-soak-"))
    os.chmod(tmp, 0o750)
    sock = str(tmp / "moed.sock")
    log = open(tmp / "moed.log", "w")
    cmd = [args.moed, "-m", args.model, "--socket", sock, "--max-queue", str(MAX_QUEUE),
           "--header-timeout", str(HEADER_TIMEOUT), "--max-body", str(MAX_BODY),
           "--threads", str(args.threads), "--ctx", "256"]
    daemon = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "RUST_LOG": "warn"})
    deadline = time.monotonic() + 120
    while not os.path.exists(sock) or raw(sock, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n") != 200:
        if daemon.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"moed did not start: {open(tmp / 'moed.log').read()[-2000:]}")
        time.sleep(0.2)

    results, lock, stop = [], threading.Lock(), threading.Event()
    end = time.monotonic() + args.minutes * 60

    def client(i):
        c = Client(sock, random.Random(args.seed * 1000 + i), results, lock)
        while not stop.is_set() and time.monotonic() < end:
            c.one()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    t_start = time.monotonic()
    for t in threads:
        t.start()
    rows = []
    sampled = 0
    print(f"soak: {args.minutes:g} min, {args.clients} clients, sample every {args.interval:g} s, "
          f"moed pid {daemon.pid}: {' '.join(cmd[1:])}", flush=True)
    while time.monotonic() < end and daemon.poll() is None:
        time.sleep(min(args.interval, max(0.0, end - time.monotonic())))
        now = time.monotonic()
        with lock:
            window = results[sampled:]
            sampled = len(results)
        lat = [r.latency for r in window if r.generation]
        try:
            fds = len(os.listdir(f"/proc/{daemon.pid}/fd"))
        except OSError:
            fds = None
        row = {
            "minute": (now - t_start) / 60,
            "rss": (proc_status(daemon.pid, "VmRSS:") or 0) * 1024,
            "heap": heap_bytes(sock) if daemon.poll() is None else None,
            "fds": fds,
            "threads": proc_status(daemon.pid, "Threads:"),
            "requests": len(window),
            "generations": len(lat),
            "p50": pct(lat, 0.5), "p99": pct(lat, 0.99),
            "4xx": sum(1 for r in window if 400 <= r.status < 500),
            "503": sum(1 for r in window if r.status == 503),
            "unexpected": sum(1 for r in window if not r.ok),
        }
        rows.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    died = daemon.poll() is not None
    if not died:
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            code = "killed after 30 s"
    else:
        code = daemon.returncode

    mib = lambda b: b / (1 << 20)
    print("\n| minute | requests | generations | p50 ms | p99 ms | 4xx | 503 | unexpected | RSS MiB | heap MiB | fds | threads |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        heap = f"{mib(r['heap']):.2f}" if r["heap"] is not None else "-"
        print(f"| {r['minute']:.1f} | {r['requests']} | {r['generations']} | {r['p50'] * 1e3:.0f} | "
              f"{r['p99'] * 1e3:.0f} | {r['4xx']} | {r['503']} | {r['unexpected']} | {mib(r['rss']):.1f} | "
              f"{heap} | {r['fds']} | {r['threads']} |")
    steady = rows[1:] if len(rows) > 2 else rows
    xs = [r["minute"] for r in steady]
    s_rss = slope(xs, [r["rss"] for r in steady])
    s_heap = slope(xs, [r["heap"] or 0 for r in steady])
    s_fds = slope(xs, [r["fds"] or 0 for r in steady])
    p50s = [r["p50"] for r in steady if r["generations"]]
    p99s = [r["p99"] for r in steady if r["generations"]]
    by_kind = {}
    for r in results:
        k = by_kind.setdefault(r.kind, {})
        k[r.status] = k.get(r.status, 0) + 1
    print(f"\nslopes after the first sample: RSS {s_rss / 1024:+.1f} KiB/min, heap {s_heap / 1024:+.2f} KiB/min, "
          f"fds {s_fds:+.3f}/min")
    if p50s:
        print(f"latency of completed generations: p50 {min(p50s) * 1e3:.0f}-{max(p50s) * 1e3:.0f} ms, "
              f"p99 {min(p99s) * 1e3:.0f}-{max(p99s) * 1e3:.0f} ms across samples")
    print(f"requests: {len(results)}; by kind and status: {json.dumps(by_kind, sort_keys=True)}")
    bad = [r for r in results if not r.ok]
    for r in bad[:20]:
        print(f"  unexpected: {r.kind} -> {r.status}: {r.detail}")
    print(f"moed exit: {code}{' (died during the soak)' if died else ''}")
    fd_growth = len(steady) >= 3 and s_fds * max(xs) > 2
    ok = not bad and not died and code == 0 and not fd_growth
    print("soak: " + ("passed" if ok else "FAILED"))
    if ok:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"moed's log: {tmp / 'moed.log'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
