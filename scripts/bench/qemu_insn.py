#!/usr/bin/env python3
"""Instructions per prompt token and per generated token on emulated ARM CPUs: moe-run against
llama.cpp on the same GGUF files, counted by QEMU's `insn` TCG plugin. Deterministic (the same
binary, file and arguments give the same count on every run and every host), so it shows kernel
differences that timing noise on a shared machine hides, and it measures the NEON paths without a
board. It is a cost measure, not a speed: it does not see memory stalls, cache misses or how wide
each instruction is.

Each figure is a difference of two runs of the same tool, so loading the model and the warm-up
cancel out:
  per generated token = (I(-n N2) - I(-n N1)) / (runs x (N2 - N1)),
  per prompt token    = (I(-p P2) - I(-p P1)) / (runs x (P2 - P1)),
where runs is 2 for `moe-run bench -r 1` (it decodes a warm-up run first) and 1 for
`llama-bench -r 1 --no-warmup`. One thread each, all weights resident.

    scripts/bench/qemu_insn.py --plugin ../qemu-plugins/libinsn.so \\
        --moe-run target/aarch64-unknown-linux-gnu/release/moe-run \\
        --llama-bench cortex-a72=../llama-a72/bin/llama-bench,cortex-a76=../llama-a76/bin/llama-bench \\
        FILE.gguf [FILE.gguf ...]

Build the plugin with scripts/bench/build_qemu_insn_plugin.sh and llama.cpp for aarch64 as
docs/BENCHMARKS.md describes (one build per CPU: -march=armv8-a for cortex-a72,
armv8.2-a+dotprod+fp16 for cortex-a76), beside the project.
"""
import argparse
import os
import re
import subprocess
import sys


def count(cmd, cpu, plugin, ld_prefix):
    """Instructions the guest executed running cmd, all threads."""
    full = ["qemu-aarch64", "-L", ld_prefix, "-cpu", cpu, "-d", "plugin",
            "-plugin", f"{plugin},inline=on"] + cmd
    res = subprocess.run(full, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"failed ({res.returncode}): {' '.join(full)}\n{res.stderr[-2000:]}")
    m = re.findall(r"insns: (\d+)", res.stderr)
    if not m:
        sys.exit(f"no instruction count in the output of {' '.join(full)}: is {plugin} QEMU's insn plugin?")
    return int(m[-1])


def moe_run_cmd(binary, model, p, n):
    return [binary, "bench", "-m", model, "-p", str(p), "-n", str(n), "-r", "1", "-t", "1", "--json"]


def llama_cmd(binary, model, p, n):
    return [binary, "-m", model, "-p", str(p), "-n", str(n), "-r", "1", "-t", "1", "--no-warmup",
            "-o", "json"]


def per_token(binary, make_cmd, runs, model, cpu, plugin, ld_prefix, a):
    c = lambda p, n: count(make_cmd(binary, model, p, n), cpu, plugin, ld_prefix)
    gen = (c(0, a.n2) - c(0, a.n1)) / (runs * (a.n2 - a.n1))
    prompt = (c(a.p2, 0) - c(a.p1, 0)) / (runs * (a.p2 - a.p1))
    return prompt, gen


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--plugin", required=True, help="QEMU's libinsn.so")
    ap.add_argument("--moe-run", required=True, help="moe-run built for aarch64")
    ap.add_argument("--llama-bench", default="",
                    help="CPU=PATH[,CPU=PATH]: llama-bench built for aarch64, one per emulated CPU")
    ap.add_argument("--cpus", default="cortex-a72,cortex-a76")
    ap.add_argument("--ld-prefix", default=os.environ.get("QEMU_LD_PREFIX", "/usr/aarch64-linux-gnu"))
    ap.add_argument("--p1", type=int, default=32)
    ap.add_argument("--p2", type=int, default=64)
    ap.add_argument("--n1", type=int, default=4)
    ap.add_argument("--n2", type=int, default=12)
    a = ap.parse_args()
    llama = dict(kv.split("=", 1) for kv in a.llama_bench.split(",") if kv)
    print("| file | CPU | moe-run insns/prompt token | llama.cpp | ratio | "
          "moe-run insns/generated token | llama.cpp | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for f in a.files:
        for cpu in a.cpus.split(","):
            ours = per_token(a.moe_run, moe_run_cmd, 2, f, cpu, a.plugin, a.ld_prefix, a)
            theirs = None
            if cpu in llama:
                theirs = per_token(llama[cpu], llama_cmd, 1, f, cpu, a.plugin, a.ld_prefix, a)
            cells = []
            for i in range(2):
                cells.append(f"{ours[i] / 1e6:.2f} M")
                if theirs:
                    cells += [f"{theirs[i] / 1e6:.2f} M", f"{ours[i] / theirs[i]:.3f}"]
                else:
                    cells += ["-", "-"]
            print(f"| {os.path.basename(f)} | {cpu} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
