#!/usr/bin/env python3
"""Speed of moe-run against llama-bench on one existing GGUF file (e.g. a Q4_K_M made by
llama-quantize), alternating the two so that the machine's drift hits both alike.

    LLAMA_BENCH=/work/llama.cpp-build/bin/llama-bench MOE_RUN=target/release/moe-run \\
        python3 scripts/bench/bench_file_vs_llamacpp.py FILE.gguf [--threads 2] [--rounds 3] [-p 64] [-n 32]

llama-bench runs with --repack 0 (same weights in memory as moe-run); for both programs the
median of a round's samples is used (each warms up with one unmeasured run first), since the first
repetitions may still be paging the file in. Which program goes first alternates from round to
round. The load average is printed per round: on a busy machine llama.cpp's spinning threads
collapse, so compare only rounds taken at similar, low load. The summary gives each program's
median and range over the rounds, and the per-round ratios.
"""
import argparse
import json
import os
import statistics
import subprocess

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-p", type=int, default=64)
    ap.add_argument("-n", type=int, default=32)
    args = ap.parse_args()
    ours_bin = os.environ.get("MOE_RUN", f"{ROOT}/target/release/moe-run")
    llama_bin = os.environ["LLAMA_BENCH"]
    common = ["-p", str(args.p), "-n", str(args.n), "-t", str(args.threads), "-r", "3"]

    def ours():
        out = subprocess.run([ours_bin, "bench", "-m", args.model, *common, "--json"],
                             capture_output=True, text=True, check=True).stdout
        return {x["test"]: statistics.median(x["samples"]) for x in json.loads(out)["tests"]}

    def llama():
        out = subprocess.run([llama_bin, "-m", args.model, *common, "--repack", "0", "-o", "json"],
                             capture_output=True, text=True, check=True).stdout
        return {("pp" if r["n_gen"] == 0 else "tg"): statistics.median(r["samples_ts"]) for r in json.loads(out)}

    ratios = {"pp": [], "tg": []}
    speeds = {(who, k): [] for who in ("moe-run", "llama.cpp") for k in ratios}
    for i in range(args.rounds):
        load = os.getloadavg()[0]
        # Alternate which program goes first, so drift within a round hits both alike.
        if i % 2 == 0:
            o, l = ours(), llama()
        else:
            l, o = llama(), ours()
        for k in ratios:
            ratios[k].append(o[k] / l[k])
            speeds[("moe-run", k)].append(o[k])
            speeds[("llama.cpp", k)].append(l[k])
        print(f"round {i + 1} (load {load:.1f}): ours pp {o['pp']:.1f} tg {o['tg']:.1f} | llama.cpp pp {l['pp']:.1f} "
              f"tg {l['tg']:.1f} | ratio pp {o['pp'] / l['pp']:.2f} tg {o['tg'] / l['tg']:.2f}", flush=True)
    for k, rs in ratios.items():
        line = [f"{k}{args.p if k == 'pp' else args.n} t={args.threads}:"]
        for who in ("moe-run", "llama.cpp"):
            v = speeds[(who, k)]
            line.append(f"{who} median {statistics.median(v):.2f} t/s (range {min(v):.2f}-{max(v):.2f});")
        line.append(f"ours/llama.cpp per round {[round(r, 2) for r in rs]}, median {statistics.median(rs):.2f}")
        print(" ".join(line))


if __name__ == "__main__":
    main()
