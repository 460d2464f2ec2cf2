#!/usr/bin/env python3
"""Streamed decoding with and without router-time reads (models whose router reads the layer
input, SmallThinker): tokens/s, stall ms/token and bytes read per token, per expert budget and
emulated flash profile, the two setups alternating within each round.

    python3 scripts/bench/bench_router_prefetch.py -m st-wide-q8_0.gguf --text heldout.txt \
        --budgets 25,50 --profiles microsd,nvme --rounds 3 -n 32 -t 1

`--moe-run` names the binary (default target/release/moe-run). Prints a Markdown table of
medians over the rounds; --json-out keeps every run's report.
"""
import argparse
import json
import statistics
import subprocess
import sys


def run(args, budget, profile, prefetch):
    cmd = [args.moe_run, "bench", "-m", args.model, "-p", "0", "-n", str(args.n_gen), "-r", str(args.reps),
           "-t", str(args.threads), "--json", "--text", args.text, "--expert-cache", f"{budget}%",
           "--flash-profile", profile, "--eviction", "belady"]
    if not prefetch:
        cmd.append("--no-router-prefetch")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rep = json.loads(out.strip().splitlines()[-1])
    tg = next(t for t in rep["tests"] if t["test"] == "tg")
    c = tg["cache"]
    return dict(tps=tg["tokens_per_second_mean"], stall_ms=1e3 * c["stall_seconds_per_token"],
                mib=c["bytes_read_per_token"] / 2**20, report=rep)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--budgets", default="25,50")
    ap.add_argument("--profiles", default="microsd,nvme")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-n", "--n-gen", type=int, default=32)
    ap.add_argument("-r", "--reps", type=int, default=2)
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--moe-run", default="target/release/moe-run")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    rows, raw = [], []
    for budget in [int(b) for b in args.budgets.split(",")]:
        for profile in args.profiles.split(","):
            res = {False: [], True: []}
            for r in range(args.rounds):
                for prefetch in ([False, True] if r % 2 == 0 else [True, False]):
                    x = run(args, budget, profile, prefetch)
                    res[prefetch].append(x)
                    raw.append(dict(budget=budget, profile=profile, router_prefetch=prefetch, round=r, **x))
                    print(f"{budget}% {profile} prefetch={prefetch} round {r}: {x['tps']:.2f} t/s, "
                          f"stall {x['stall_ms']:.1f} ms/token, {x['mib']:.2f} MiB/token", file=sys.stderr)
            med = {p: {k: statistics.median(x[k] for x in v) for k in ("tps", "stall_ms", "mib")}
                   for p, v in res.items()}
            rows.append((budget, profile, med))
    print("| budget | flash | t/s demand / router-time | stall ms/token demand / router-time "
          "| MiB read/token demand / router-time | speed-up |")
    print("|---|---|---|---|---|---|")
    for budget, profile, m in rows:
        off, on = m[False], m[True]
        print(f"| {budget}% | {profile} | {off['tps']:.2f} / {on['tps']:.2f} | {off['stall_ms']:.1f} / "
              f"{on['stall_ms']:.1f} | {off['mib']:.2f} / {on['mib']:.2f} | {on['tps'] / off['tps']:.2f}x |")
    if args.json_out:
        for x in raw:
            x["report"] = {k: v for k, v in x["report"].items() if k in ("setup", "tests", "router_prefetch")}
        json.dump(raw, open(args.json_out, "w"), indent=1)


if __name__ == "__main__":
    main()
