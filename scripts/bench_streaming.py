#!/usr/bin/env python3
"""Expert streaming benchmark: generation speed and reads per token for expert-cache sizes,
predictors, eviction policies and emulated flash speeds (a benchmark, never a test).

    python3 scripts/bench_streaming.py -m MODEL.gguf [--budgets 100,75,50,25] \
        [--profiles microsd,usb-ssd,nvme] [--setups lru:0,lfu:0,belady:1,belady:2] [-n 32] [-t 2]

Each run uses O_DIRECT reads (the page cache cannot hide the flash) plus the named flash
emulator. "min MiB/tok" is what Belady's offline optimum would read with the same number of
slots: the misses no policy could avoid.

With LLAMA_BENCH set, llama.cpp is run on the same file inside a cgroup (v1 memory controller)
limited to the same total memory as moe-run's peak, page cache dropped first (root only).
"""
import argparse
import json
import os
import subprocess

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def moe_bench(model, budget, eviction, lookahead, predictor, profile, n, threads, reps):
    cmd = [f"{ROOT}/target/release/moe-run", "bench", "-m", model, "-p", "0", "-n", str(n),
           "-r", str(reps), "-t", str(threads), "--json",
           "--expert-cache", f"{budget}%", "--eviction", eviction, "--lookahead", str(lookahead),
           "--predictor", predictor, "--direct-io", "--flash-profile", profile]
    rep = json.loads(subprocess.run(cmd, check=True, text=True, capture_output=True).stdout)
    return rep


def drop_caches():
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def llama_limited(binary, model, limit_bytes, n, threads):
    """llama-bench tg in a memory cgroup; returns t/s or the reason it failed."""
    cg = "/sys/fs/cgroup/memory/moe-edge-bench"
    try:
        os.makedirs(cg, exist_ok=True)
        with open(f"{cg}/memory.limit_in_bytes", "w") as f:
            f.write(str(limit_bytes))
    except OSError as e:
        return f"no cgroup ({e})"
    drop_caches()
    cmd = ["sh", "-c", f"echo $$ > {cg}/cgroup.procs && exec {binary} -m {model} -p 0 -n {n} "
           f"-t {threads} -r 1 --repack 0 -lm mmap -o json"]
    p = subprocess.run(cmd, text=True, capture_output=True)
    if p.returncode != 0:
        return f"failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}"
    rows = json.loads(p.stdout)
    return rows[0]["avg_ts"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--budgets", default="100,75,50,25")
    ap.add_argument("--profiles", default="microsd,usb-ssd,nvme")
    # eviction:lookahead[:predictor], predictor one of none (default), frequency, pregate
    ap.add_argument("--setups", default="lru:0,lfu:0,belady:0,belady:1,belady:2,belady:0:frequency")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=1)
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "moe-runtime"], cwd=ROOT, check=True)
    llama = os.environ.get("LLAMA_BENCH")

    print("| flash | cache | policy | lookahead | predictor | tg t/s | hit % | MiB read/tok | min MiB/tok | stall ms/tok | prefetch prec % | prediction precision/recall | peak RSS MiB |")
    # MiB read/tok and min MiB/tok are over the whole run (warm-up included), the rest over the
    # measured repetitions.
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for profile in args.profiles.split(","):
        for budget in args.budgets.split(","):
            peak = 0
            for setup in args.setups.split(","):
                eviction, lookahead, *rest = setup.split(":")
                predictor = rest[0] if rest else "none"
                rep = moe_bench(args.model, budget, eviction, lookahead, predictor, profile, args.n,
                                args.threads, args.reps)
                preds = [dict(p, label=f"depth {p['depth']}")
                         for p in rep.get("predictions", []) if p.get("predicted")]
                if rep.get("predictor") and rep["predictor"].get("predicted"):
                    preds.append(dict(rep["predictor"], label=predictor))
                pr = ", ".join(f"{p['label']} {p['correct'] / p['predicted']:.2f}/{p['correct'] / max(p['actual'], 1):.2f}"
                               for p in preds) or "-"
                tg = rep["tests"][0]
                c = tg["cache"] or {}
                o = rep["optimum"]
                toks = (args.reps + 1) * args.n
                peak = max(peak, rep["peak_rss_bytes"] or 0)
                print(f"| {profile} | {budget}% | {eviction} | {lookahead} | {predictor} | {tg['tokens_per_second_mean']:.2f} "
                      f"| {100 * c.get('hit_rate', 0):.1f} | {o['bytes_read'] / toks / 2**20:.1f} "
                      f"| {o['optimal_bytes'] / toks / 2**20:.1f} | {1e3 * c.get('stall_seconds_per_token', 0):.1f} "
                      f"| {100 * c.get('prefetch_precision', 0):.0f} | {pr} | {(rep['peak_rss_bytes'] or 0) / 2**20:.0f} |", flush=True)
            if llama and profile == args.profiles.split(",")[0]:
                r = llama_limited(llama, args.model, peak, args.n, args.threads)
                print(f"| (llama.cpp, --repack 0 -lm mmap, cgroup limit {peak / 2**20:.0f} MiB, real disk) | {budget}% | - | - | - | {r if isinstance(r, str) else f'{r:.2f}'} | | | | | | | |", flush=True)


if __name__ == "__main__":
    main()
