#!/usr/bin/env python3
"""moed --parallel: aggregate tokens/s and per-request latency at 1, 2 and 4 concurrent clients,
with --parallel 1 (one generation at a time, the others queued) against --parallel 4 (up to four
decoded together in one batch per step), on one GGUF file (a benchmark, never a test; issue #22).

    cargo build --release -p moe-daemon
    python3 scripts/bench/bench_moed_parallel.py [-m models/small-moe/small-moe-q8_0.gguf] \
        [--parallel 1,4] [--clients 1,2,4] [--requests 6] [--max-tokens 64] [-t 2] \
        [--expert-cache 50%] [--moed target/release/moed] [--json out.json]

Each client sends --requests completions one after the other (each its own prompt, greedy,
`ignore_eos`, --max-tokens tokens, not streamed, `--prompt-cache 0` so that every prompt is
evaluated whole); latency is from sending a request to its whole answer. Aggregate tokens/s is
all clients' completion tokens over the wall time of the run. Run it on an otherwise idle machine:
the timings are only as good as the machine's quiet.

Two figures do not depend on the machine's speed, only on which requests happen to share decode
steps: the routed-expert bytes the forward passes used per decoded token (from moed's
per-request log line, `expert_kib_per_tok`, the prompt's batch excluded; a batch's bytes are
shared among its requests, so this is what batching saves in weight reads), and with
--expert-cache (experts streamed through a bounded cache, the default here) the bytes the cache
read from the file per generated token (`moed_flash_bytes_read_total`, prompts included) and its
hit rate. Prints a Markdown table and the load average.
"""
import argparse
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

WORDS = (
    "the morning was bright and the house stood quiet while she walked along the river toward "
    "the town where letters waited for her and the captain spoke of ships sailing past the "
    "harbour before the winter came with its long evenings of music and conversation"
).split()


def prompt(i):
    """A distinct prompt per request: a window of the word list."""
    start = (i * 7) % len(WORDS)
    words = (WORDS + WORDS)[start:start + 12]
    return " ".join(words).capitalize()


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=600):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.path)
        self.sock = s


def request(sock, method, path, body=None):
    conn = UnixHTTPConnection(sock)
    conn.request(method, path, body, {"Content-Type": "application/json"} if body else {})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


def metrics(sock):
    _, data = request(sock, "GET", "/metrics")
    out = {}
    for line in data.decode().splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


def complete(sock, model, text, max_tokens):
    body = json.dumps({"model": model, "prompt": text, "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True})
    t0 = time.perf_counter()
    status, data = request(sock, "POST", "/v1/completions", body)
    dt = time.perf_counter() - t0
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {data[:300]!r}")
    return dt, json.loads(data)["usage"]["completion_tokens"]


def run(sock, model, clients, requests, max_tokens, first):
    """`clients` threads sending `requests` requests each; (wall seconds, [(latency, tokens)])."""
    results, errors = [], []
    lock = threading.Lock()

    def client(c):
        try:
            for r in range(requests):
                res = complete(sock, model, prompt(first + c * requests + r), max_tokens)
                with lock:
                    results.append(res)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return wall, results


def decode_kib_per_token(log_text):
    """Routed-expert KiB per decoded token over the requests logged in `log_text`, weighted by
    each request's decode steps (completion tokens - 1: the last one is never evaluated)."""
    total, steps = 0.0, 0
    for line in log_text.splitlines():
        if "generation" not in line or "expert_kib_per_tok" not in line:
            continue
        kib = re.search(r"expert_kib_per_tok=(?:Some\()?([0-9.]+)", line)
        done = re.search(r"completion_tokens=([0-9]+)", line)
        if kib and done and int(done.group(1)) > 1:
            n = int(done.group(1)) - 1
            total += float(kib.group(1)) * n
            steps += n
    return total / steps if steps else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default=os.path.join(ROOT, "models/small-moe/small-moe-q8_0.gguf"))
    ap.add_argument("--parallel", default="1,4")
    ap.add_argument("--clients", default="1,2,4")
    ap.add_argument("--requests", type=int, default=6, help="per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--expert-cache", default="50%",
                    help="stream experts through a cache of this size ('off': all resident)")
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    ap.add_argument("--moed", default=os.path.join(target, "release", "moed"))
    ap.add_argument("--json", help="write every measurement here")
    a = ap.parse_args()
    model = os.path.basename(a.model).removesuffix(".gguf")

    rows = []
    load = [os.getloadavg()[0]]
    for parallel in [int(p) for p in a.parallel.split(",")]:
        tmp = tempfile.mkdtemp(prefix="moed-parallel-")
        sock, log = os.path.join(tmp, "moed.sock"), os.path.join(tmp, "moed.log")
        cmd = [a.moed, "-m", a.model, "--socket", sock, "--socket-mode", "600",
               "-t", str(a.threads), "--target-profile", "none", "--prompt-cache", "0",
               "--parallel", str(parallel), "--max-queue", "64"]
        if a.expert_cache != "off":
            cmd += ["--expert-cache", a.expert_cache]
        logf = open(log, "w")
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                env={**os.environ, "RUST_LOG": "info", "NO_COLOR": "1"})
        try:
            t0 = time.time()
            while True:
                if proc.poll() is not None:
                    sys.exit(f"moed exited: {open(log).read()[-2000:]}")
                try:
                    if request(sock, "GET", "/health")[0] == 200:
                        break
                except OSError:
                    pass
                if time.time() - t0 > 300:
                    sys.exit("moed did not start")
                time.sleep(0.2)
            complete(sock, model, "Warm up.", 8)
            first = 0
            for clients in [int(c) for c in a.clients.split(",")]:
                m0 = metrics(sock)
                log0 = os.path.getsize(log)
                wall, results = run(sock, model, clients, a.requests, a.max_tokens, first)
                first += clients * a.requests
                time.sleep(0.2)  # the last log lines
                m1 = metrics(sock)
                with open(log) as f:
                    f.seek(log0)
                    new_log = f.read()
                d = lambda k: m1.get(k, 0.0) - m0.get(k, 0.0)
                tokens = sum(t for _, t in results)
                lat = sorted(x for x, _ in results)
                generated = d("moed_generated_tokens_total")
                row = {
                    "parallel": parallel, "clients": clients, "requests": len(results),
                    "tokens": tokens, "wall_s": wall, "agg_tok_s": tokens / wall,
                    "latency_p50_ms": 1e3 * statistics.median(lat),
                    "latency_max_ms": 1e3 * lat[-1],
                    "per_request_tok_s": statistics.median(t / x for x, t in results),
                    "expert_kib_per_decoded_token": decode_kib_per_token(new_log),
                    "flash_kib_per_generated_token":
                        d("moed_flash_bytes_read_total") / 1024 / max(generated, 1),
                    "cache_hit_rate": m1.get("moed_expert_cache_hit_rate"),
                }
                rows.append(row)
                load.append(os.getloadavg()[0])
                print(json.dumps(row), file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(30)
            logf.close()

    print(f"\nmoed --parallel on {os.path.basename(a.model)}, {a.threads} threads, "
          f"expert cache {a.expert_cache}, {a.requests} requests per client of {a.max_tokens} tokens")
    print("\n| --parallel | clients | aggregate tok/s | latency p50 ms | latency max ms "
          "| per-request tok/s | expert KiB / decoded token | flash KiB / generated token |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['parallel']} | {r['clients']} | {r['agg_tok_s']:.1f} | {r['latency_p50_ms']:.0f} "
              f"| {r['latency_max_ms']:.0f} | {r['per_request_tok_s']:.1f} "
              f"| {r['expert_kib_per_decoded_token']:.1f} | {r['flash_kib_per_generated_token']:.1f} |")
    print(f"\nload average (1 min) during the runs: {min(load):.2f} to {max(load):.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "load": load, "args": vars(a)}, f, indent=1)


if __name__ == "__main__":
    main()
