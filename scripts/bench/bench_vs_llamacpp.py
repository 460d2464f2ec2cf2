#!/usr/bin/env python3
"""Speed of moe-run against llama.cpp on the same GGUF files, same threads, same machine.

Builds the benchmark checkpoint (scripts/bench/make_bench_checkpoint.py) if needed, converts it with
moe-convert to each type, then alternates `moe-run bench` and `llama-bench` runs (llama-bench
is used only when the LLAMA_BENCH environment variable names its binary) and prints the ratios.
Alternating matters: this machine's speed drifts 10-30% between passes.

    LLAMA_BENCH=/path/to/llama-bench python3 scripts/bench/bench_vs_llamacpp.py \
        [--types q4_0,q8_0] [--threads 1,2] [--rounds 3] [-p 128] [-n 64]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


def ours(model, p, n, t, reps):
    out = run([f"{ROOT}/target/release/moe-run", "bench", "-m", model, "-p", str(p), "-n", str(n),
               "-t", str(t), "-r", str(reps), "--json"])
    rep = json.loads(out)
    res = {x["test"]: x["tokens_per_second_mean"] for x in rep["tests"]}
    return res.get("pp"), res.get("tg"), rep


def llama(binary, model, p, n, t, reps):
    out = run([binary, "-m", model, "-p", str(p), "-n", str(n), "-t", str(t), "-r", str(reps),
               "-o", "json"])
    rows = json.loads(out)
    pp = next((r["avg_ts"] for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0), None)
    tg = next((r["avg_ts"] for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0), None)
    return pp, tg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="q4_0,q8_0")
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-out"))
    args = ap.parse_args()

    ckpt = os.path.join(args.out, "qwen3moe-bench")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        print("making the benchmark checkpoint ...", flush=True)
        run([sys.executable, f"{ROOT}/scripts/bench/make_bench_checkpoint.py", ckpt])
    run(["cargo", "build", "--release", "--quiet", "-p", "moe-runtime", "-p", "moe-convert"], cwd=ROOT)
    llama_bench = os.environ.get("LLAMA_BENCH")
    if not llama_bench:
        print("LLAMA_BENCH is not set: measuring moe-run only (no ratios)")

    rows = []
    for ty in args.types.split(","):
        model = os.path.join(args.out, f"bench-{ty}.gguf")
        if not os.path.exists(model):
            run([f"{ROOT}/target/release/moe-convert", ckpt, "-o", model, "--type", ty, "--quiet"])
        for t in [int(x) for x in args.threads.split(",")]:
            m = {"pp": [], "tg": [], "lpp": [], "ltg": []}
            for r in range(args.rounds):
                pp, tg, rep = ours(model, args.p, args.n, t, args.reps)
                m["pp"].append(pp)
                m["tg"].append(tg)
                if llama_bench:
                    lpp, ltg = llama(llama_bench, model, args.p, args.n, t, args.reps)
                    m["lpp"].append(lpp)
                    m["ltg"].append(ltg)
                print(f"  {ty} t={t} round {r + 1}: moe-run pp {pp:.1f} tg {tg:.1f}"
                      + (f" | llama.cpp pp {lpp:.1f} tg {ltg:.1f}" if llama_bench else ""), flush=True)
            rows.append((ty, t, m, rep))

    print()
    print(f"| type | threads | pp{args.p} moe-run | pp{args.p} llama.cpp | ratio | tg{args.n} moe-run | tg{args.n} llama.cpp | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for ty, t, m, rep in rows:
        med = lambda xs: statistics.median(xs) if xs else float("nan")
        pp, tg, lpp, ltg = med(m["pp"]), med(m["tg"]), med(m["lpp"]), med(m["ltg"])
        print(f"| {ty} | {t} | {pp:.1f} | {lpp:.1f} | {pp / lpp:.2f} | {tg:.1f} | {ltg:.1f} | {tg / ltg:.2f} |")
    print(f"\nkernels: {rows[0][3]['kernels']}; medians of {args.rounds} alternating rounds of {args.reps} repetitions")


if __name__ == "__main__":
    main()
