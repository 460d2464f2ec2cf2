#!/usr/bin/env python3
"""Time to first token for each turn of a growing multi-turn chat: moed (with its prompt-prefix
cache, over its UNIX socket) against llama.cpp's llama-server (prompt caching on, over TCP
loopback), on the same GGUF file, threads and messages (a benchmark, never a test; issue #22).

    LD_LIBRARY_PATH=/work/llama/build/bin python3 scripts/bench/bench_chat_ttft.py \
        -m /work/bench/b512-Q4_K_M.gguf [--turns 10] [--rounds 2] [-t 2] [--ctx 4096] \
        [--moed target/release/moed] [--llama-server /work/llama/build/bin/llama-server]

Each round is a new conversation (its own seeded text): a system message, then per turn a user
message of --user-words words; the assistant turns in the history are fixed text of
--assistant-words words (not what the model answered), so both engines see identical histories
(the defaults keep 10 turns of the benchmark checkpoint, whose vocabulary is small, within 4096
positions). Per turn, each
engine gets the conversation so far with `max_tokens: 1`, streamed; the time to first token is
from sending the request to the first chunk that carries generated text or a finish reason
(moed's role-only first chunk, sent before generation, does not count). Which engine goes first
alternates by turn. Tokens evaluated come from the engines themselves: moed's
`usage.prompt_tokens_details.cached_tokens` and `timings.prompt_n`, llama-server's
`timings.cache_n` and `timings.prompt_n`. Both start once and warm up with an unrelated request
before the first round. Prints a Markdown table (medians over rounds) and the load average.
"""
import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

WORDS = (
    "the a model expert router token layer cache board memory flash read write weight "
    "block quantized prompt answer question history turn user system thread core speed "
    "latency small large fast slow first next last every each other some many few more "
    "less time place city river mountain garden kitchen window letter number colour music "
    "story friend teacher student market journey morning evening winter summer because "
    "although while after before during under over between through around without"
).split()


def text(rng, n_words):
    out, sentence = [], 0
    for _ in range(n_words):
        w = rng.choice(WORDS)
        out.append(w.capitalize() if sentence == 0 else w)
        sentence += 1
        if sentence > 6 and rng.random() < 0.2:
            out[-1] += "."
            sentence = 0
    return " ".join(out) + "."


def conversation(seed, turns, user_words, assistant_words):
    rng = random.Random(seed)
    users = [text(rng, user_words) + " What do you think?" for _ in range(turns)]
    assistants = [text(rng, assistant_words) for _ in range(turns)]
    return users, assistants


def messages_at(users, assistants, turn):
    """The messages of turn `turn` (0-based): the system message, earlier turns with their
    fixed answers, this turn's user message."""
    m = [{"role": "system", "content": "You are a helpful assistant on a small board."}]
    for i in range(turn):
        m += [{"role": "user", "content": users[i]}, {"role": "assistant", "content": assistants[i]}]
    m.append({"role": "user", "content": users[turn]})
    return m


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=600):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.path)
        self.sock = s


class Engine:
    def __init__(self, name, connect, model):
        self.name, self.connect, self.model = name, connect, model

    def ask(self, messages):
        """One streamed request with max_tokens 1: (ttft seconds, prompt tokens, cached, evaluated)."""
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": 1,
                           "temperature": 0, "stream": True, "cache_prompt": True,
                           "stream_options": {"include_usage": True}})
        conn = self.connect()
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"{self.name}: HTTP {resp.status}: {resp.read()[:500]!r}")
        ttft, usage, timings = None, None, None
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                break
            v = json.loads(data)
            if "error" in v:
                raise RuntimeError(f"{self.name}: {v}")
            for c in v.get("choices") or []:
                d = c.get("delta") or {}
                generated = any(d.get(k) for k in ("content", "reasoning_content", "tool_calls"))
                if ttft is None and (generated or c.get("finish_reason")):
                    ttft = time.perf_counter() - t0
            usage = v.get("usage") or usage
            timings = v.get("timings") or timings
        conn.close()
        if usage is None or timings is None:
            raise RuntimeError(f"{self.name}: no usage or timings in the stream")
        cached = timings.get("cache_n", 0)
        return ttft, usage["prompt_tokens"], cached, timings["prompt_n"], usage


def wait_ready(engine, proc, log, timeout=600):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            sys.exit(f"{engine.name} exited: {open(log).read()[-2000:]}")
        try:
            conn = engine.connect()
            conn.request("GET", "/v1/models")
            r = conn.getresponse()
            r.read()
            conn.close()
            if r.status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"{engine.name} did not start")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=4096)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    ap.add_argument("--moed", default=os.path.join(target, "release", "moed"))
    ap.add_argument("--llama-server", default="/work/llama/build/bin/llama-server")
    ap.add_argument("--port", type=int, default=18931)
    ap.add_argument("--json", help="write every measurement here")
    ap.add_argument("--user-words", type=int, default=35)
    ap.add_argument("--assistant-words", type=int, default=20)
    a = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="ttft-")
    sock = os.path.join(tmp, "moed.sock")
    moed_log, llama_log = os.path.join(tmp, "moed.log"), os.path.join(tmp, "llama.log")
    procs = []
    try:
        procs.append(subprocess.Popen(
            [a.moed, "-m", a.model, "--socket", sock, "--socket-mode", "600", "-t", str(a.threads),
             "--ctx", str(a.ctx), "--prompt-cache", "1", "--target-profile", "none"],
            stdout=open(moed_log, "w"), stderr=subprocess.STDOUT))
        moed = Engine("moed", lambda: UnixHTTPConnection(sock), "moed")
        # moed checks the model id: the file name without .gguf.
        moed.model = os.path.basename(a.model).removesuffix(".gguf")
        procs.append(subprocess.Popen(
            [a.llama_server, "-m", a.model, "-t", str(a.threads), "-tb", str(a.threads),
             "-c", str(a.ctx), "-np", "1", "--host", "127.0.0.1", "--port", str(a.port), "--jinja"],
            stdout=open(llama_log, "w"), stderr=subprocess.STDOUT))
        llama = Engine("llama-server", lambda: http.client.HTTPConnection("127.0.0.1", a.port, timeout=600),
                       "x")
        wait_ready(moed, procs[0], moed_log)
        wait_ready(llama, procs[1], llama_log)
        for e in (moed, llama):
            e.ask([{"role": "user", "content": "Warm up: say hello."}])

        rows = []
        load = [os.getloadavg()[0]]
        for r in range(a.rounds):
            users, assistants = conversation(1000 + r, a.turns, a.user_words, a.assistant_words)
            for turn in range(a.turns):
                msgs = messages_at(users, assistants, turn)
                order = (moed, llama) if (turn + r) % 2 == 0 else (llama, moed)
                got = {}
                for e in order:
                    got[e.name] = e.ask(msgs)
                rows.append({"round": r, "turn": turn + 1,
                             **{f"{k}_{f}": v for k, res in got.items()
                                for f, v in zip(("ttft", "prompt", "cached", "evaluated"), res[:4])}})
                m, l = got["moed"], got["llama-server"]
                print(f"round {r + 1} turn {turn + 1:2}: moed {m[0] * 1e3:8.1f} ms ({m[1]} tok, "
                      f"{m[2]} cached, {m[3]} new)  llama-server {l[0] * 1e3:8.1f} ms ({l[1]} tok, "
                      f"{l[2]} cached, {l[3]} new)", file=sys.stderr)
                load.append(os.getloadavg()[0])
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"rows": rows, "load": load}, f, indent=1)

        print(f"\nload average (1 min) during the run: {min(load):.1f}-{max(load):.1f}, "
              f"median {statistics.median(load):.1f}; {a.rounds} round(s), medians shown\n")
        print("| turn | prompt tokens (moed / llama) | moed cached + new | llama cache_n + prompt_n "
              "| moed TTFT ms | llama-server TTFT ms | moed / llama |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for turn in range(1, a.turns + 1):
            rs = [x for x in rows if x["turn"] == turn]
            med = lambda k: statistics.median(x[k] for x in rs)
            mt, lt = med("moed_ttft") * 1e3, med("llama-server_ttft") * 1e3
            print(f"| {turn} | {rs[0]['moed_prompt']} / {rs[0]['llama-server_prompt']} "
                  f"| {rs[0]['moed_cached']} + {rs[0]['moed_evaluated']} "
                  f"| {rs[0]['llama-server_cached']} + {rs[0]['llama-server_evaluated']} "
                  f"| {mt:.0f} | {lt:.0f} | {mt / lt:.2f} |")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
