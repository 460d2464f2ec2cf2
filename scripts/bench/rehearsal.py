#!/usr/bin/env python3
"""The full-size rehearsal of #23: a model file larger than the memory it runs in, decoded under
a cgroup v1 memory limit (root only), moe-run streaming its experts against llama.cpp's mmap.

For each file, each --limits value (e.g. 8G,4G) and each storage (`disk`: the real disk with
O_DIRECT; `nvme`, `microsd`: moe-run's flash emulator on top), moe-run runs `bench -p 0 -n N`
with `--mem-budget` equal to the limit, inside a cgroup with that limit, the page cache dropped
first; once with the model's own routing and, with --replay PREFIX, once more with each token's
experts taken from that routing trace (`--route-replay`, labelled "replay": a random-weight
file routes almost uniformly, a trained model does not). With its own routing moe-run decodes
pseudo-random ids as llama-bench does (`--gen-tokens random`); a replay continues the trace
from the warm-up run to the measured one. llama.cpp (`llama-bench -p 0 --repack
0 -lm mmap`, from $LLAMA_BENCH) runs under the same limit at each --readahead value (the disk's
read_ahead_kb, restored afterwards) with the model's own routing; it has no replay.

With --rounds R each limit's runs repeat R times, the engines alternating within each round,
and a last table gives each setup's median.

Reported per run: tokens/s, where a token's time goes (moe-run's --profile: waiting for
expert reads, expert products, the rest), stall per token, MiB read per token and expert loads against Belady's
offline minimum for the same slots (moe-run's cache statistics), the block device's MiB read per token (both
engines; device-wide), and the cgroup's peak (RSS plus charged page cache).

    LLAMA_BENCH=.../llama-bench python3 scripts/bench/rehearsal.py olmoe-q4_k_m.gguf \
        --limits 4G,2G --replay olmoe-trace -n 32 -t 2 [--readahead 16,128] [--rounds 2] [--json-out r.json]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_streaming as bs  # noqa: E402

UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}


def size(s):
    s = s.strip().upper().rstrip("IB")
    return int(float(s[:-1]) * UNITS[s[-1]]) if s[-1] in UNITS else int(s)


def moe_run(model, limit, storage, replay, n, threads, timeout, dev):
    bs.cgroup_reset(limit)
    before = bs.disk_read_bytes(dev)
    cmd = [bs.moe_run_path(), "bench", "-m", model, "-p", "0", "-n", str(n), "-r", "1",
           "-t", str(threads), "--json", "--profile", "--mem-budget", str(limit), "--direct-io"]
    if storage != "disk":
        cmd += ["--flash-profile", storage]
    if replay:
        cmd += ["--route-replay", replay]
    else:
        # llama-bench's input: a pseudo-random id per step (a random-weight model's greedy
        # output repeats one token, whose experts then stay cached).
        cmd += ["--gen-tokens", "random"]
    cmd = ["sh", "-c", f"echo $$ > {bs.CG}/cgroup.procs && exec \"$@\"", "sh"] + cmd
    try:
        p = subprocess.run(cmd, text=True, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"note": f"timeout {timeout} s", "peak": bs.cgroup_peak()}
    if p.returncode != 0:
        tail = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
        return {"note": f"failed rc={p.returncode}: {tail}", "peak": bs.cgroup_peak()}
    rep = json.loads(p.stdout)
    tg = rep["tests"][0]
    cache = tg.get("cache") or {}
    opt = rep.get("optimum") or {}
    tokens = 2 * n  # the warm-up run and the measured one
    return {
        "tps": tg["tokens_per_second_mean"],
        "stall_ms": 1e3 * cache.get("stall_seconds_per_token", 0.0),
        "hit": cache.get("hit_rate"),
        "read_mib": cache.get("bytes_read_per_token", 0.0) / 2**20,
        # Expert loads against Belady's offline minimum for the same slots (loads, not bytes:
        # a mix's experts differ in size).
        "misses_vs_min": opt["actual_misses"] / opt["optimal_misses"] if opt.get("optimal_misses") else None,
        "optimum": opt,
        "disk_mib": (bs.disk_read_bytes(dev) - before) / tokens / 2**20,
        "peak": bs.cgroup_peak(),
        "rss": rep.get("peak_rss_bytes"),
        "setup": rep.get("setup"),
        "time": where_time_goes(tg.get("profile") or []),
    }


def where_time_goes(profile):
    """ms per token: I/O wait for experts, expert products, the rest of the forward pass."""
    ms = {p["phase"]: p["ms_per_token"] for p in profile}
    wait = ms.pop("expert I/O wait", 0.0)
    experts = ms.pop("expert matmuls", 0.0)
    return {"io_wait": wait, "experts": experts, "rest": sum(ms.values())}


def llama(binary, model, limit, n, threads, timeout, dev):
    tps, note, peak = bs.llama_limited(binary, model, limit, n, threads, timeout, reps=1, dev=dev)
    return {"tps": tps, "note": note, "peak": peak}


def fmt(v, f="{:.2f}"):
    return "-" if v is None else f.format(v)


def run_round(args, binary, model, lim, rnd, dev, ra0, rows):
    """One round at one limit: every moe-run setup, then llama.cpp at each readahead."""
    limit = size(lim)
    for storage in args.storages.split(","):
        for replay in ([None, args.replay] if args.replay else [None]):
            r = moe_run(model, limit, storage, replay, args.n, args.threads, args.timeout, dev)
            r.update(model=os.path.basename(model), limit=lim, engine="moe-run", storage=storage,
                     routing="replay" if replay else "own", round=rnd)
            rows.append(r)
            print(json.dumps(r), flush=True)
    if args.no_llama:
        return
    for ra in [int(x) for x in args.readahead.split(",")]:
        bs.readahead(dev, ra)
        r = llama(binary, model, limit, args.n, args.threads, args.timeout, dev)
        bs.readahead(dev, ra0)
        r.update(model=os.path.basename(model), limit=lim, engine=f"llama.cpp ra={ra}",
                 storage="disk", routing="own", round=rnd)
        rows.append(r)
        print(json.dumps(r), flush=True)


def medians(rows):
    """Median tokens/s per setup over the rounds (runs that failed or timed out left out)."""
    groups = {}
    for r in rows:
        key = (r["model"], r["limit"], r["engine"], r["storage"], r["routing"])
        groups.setdefault(key, []).append(r.get("tps"))
    print("\n| file | limit | engine | storage | routing | rounds | median t/s | t/s per round |")
    print("|---|---|---|---|---|---:|---:|---|")
    for key, tps in groups.items():
        ok = [t for t in tps if t is not None]
        med = statistics.median(ok) if ok else None
        print("| " + " | ".join(key) + f" | {len(tps)} | {fmt(med)} | " + ", ".join(fmt(t) for t in tps) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--limits", default="8G,4G")
    ap.add_argument("--storages", default="disk,nvme,microsd")
    ap.add_argument("--replay", help="routing trace PREFIX for moe-run's replay runs")
    ap.add_argument("--readahead", default="16,128", help="read_ahead_kb values for llama.cpp")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat each limit's runs, the engines alternating within each round")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    binary = os.environ.get("LLAMA_BENCH")
    if not args.no_llama and not binary:
        sys.exit("set LLAMA_BENCH to llama-bench's path, or pass --no-llama")
    rows = []
    dev = bs.block_device(args.models[0])
    ra0 = bs.readahead(dev)
    with bs.machine_restored(dev, ra0):
        for model in args.models:
            for lim in args.limits.split(","):
                for rnd in range(args.rounds):
                    run_round(args, binary, model, lim, rnd, dev, ra0, rows)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)
    print("\n| file | limit | round | engine | storage | routing | t/s | stall ms/tok | hit | MiB read/tok | expert loads / Belady min | disk MiB/tok | cgroup peak MiB | ms/tok: I/O wait / experts / rest |")
    print("|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        tps = fmt(r.get("tps")) if r.get("tps") is not None else r.get("note", "-")
        tm = r.get("time")
        split = f"{tm['io_wait']:.1f} / {tm['experts']:.1f} / {tm['rest']:.1f}" if tm else "-"
        disk = fmt(r.get("disk_mib")) if "disk_mib" in r else (r.get("note") or "-")
        print(f"| {r['model']} | {r['limit']} | {r['round']} | {r['engine']} | {r['storage']} | {r['routing']} | {tps} | "
              f"{fmt(r.get('stall_ms'), '{:.1f}')} | {fmt(r.get('hit'), '{:.2f}')} | {fmt(r.get('read_mib'))} | "
              f"{fmt(r.get('misses_vs_min'))} | {disk} | {fmt(r['peak'] / 2**20, '{:.0f}')} | {split} |")
    if args.rounds > 1:
        medians(rows)


if __name__ == "__main__":
    main()