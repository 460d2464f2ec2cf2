#!/usr/bin/env python3
"""Pre-gating router benchmark (a benchmark, never a test): prediction quality per layer and the
end-to-end effect of each expert predictor on decode over held-out text.

    python3 scripts/bench/bench_pregate.py -m models/small-moe/small-moe-q8_0.gguf --text eval.txt \
        [--bin target/release/moe-run] [--budgets 25,50] [--profiles microsd,nvme] \
        [--rounds 3] [-n 64] [-t 2] [--json out.json]

1. Quality: decode --quality-tokens held-out tokens (teacher-forced, one at a time) with every
   expert resident in the cache (100%), the lookahead gate at depth 4 and then the pre-gating
   router, the frequency baseline; per-layer precision/recall of each predictor's guesses against
   the experts the routers chose. Lookahead depth d predicts layer l from layer l-d, so layers
   < d have no depth-d guess.
2. End to end: decode -n tokens of held-out text per repetition through an expert cache of each
   budget (percent of the routed-expert bytes), O_DIRECT reads and an emulated flash profile,
   Belady eviction for every predictor. Configurations alternate within each round (the machine
   is shared and noisy); the table shows the median over rounds of each run's mean.

Any moe-run binary runs the GRU router natively (`--features pregate` only for other networks).
"""
import argparse
import json
import os
import statistics
import subprocess

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

SETUPS = {  # name -> extra moe-run arguments
    "none": ["--lookahead", "0"],
    "lookahead-1": ["--lookahead", "1"],
    "lookahead-2": ["--lookahead", "2"],
    "frequency": ["--predictor", "frequency"],
    "pregate": ["--predictor", "pregate"],
    "pregate-k6": ["--predictor", "pregate", "--predict-k", "6"],
}


def bench(args, extra, n, reps):
    cmd = [args.bin, "bench", "-m", args.model, "-p", "0", "-n", str(n), "-r", str(reps),
           "-t", str(args.threads), "--json", "--text", args.text, "--eviction", "belady"] + extra
    p = subprocess.run(cmd, text=True, capture_output=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\n{p.stderr}")
    return json.loads(p.stdout)


def pr(counts):
    c, p, a = counts
    return (c / p if p else float("nan"), c / a if a else float("nan"))


def quality(args):
    n = args.quality_tokens // 4
    look = bench(args, ["--expert-cache", "100%", "--lookahead", "4", "--predictor", "pregate"], n, 3)
    freq = bench(args, ["--expert-cache", "100%", "--predictor", "frequency"], n, 3)
    rows = {}
    for st in look["predictions"]:
        if st["depth"] in (1, 2, 4):
            rows[f"lookahead d={st['depth']}"] = st
    rows["pregate (top-k)"] = look["predictor"]
    rows["frequency (top-k)"] = freq["predictor"]
    k6 = bench(args, ["--expert-cache", "100%", "--predictor", "pregate", "--predict-k", "6"], n, 3)
    rows["pregate (top-6)"] = k6["predictor"]
    n_layers = max(len(r["by_layer"]) for r in rows.values())
    print(f"\n## Prediction quality, {4 * n} held-out tokens decoded one at a time (precision / recall)\n")
    print("| predictor | " + " | ".join(f"layer {l}" for l in range(n_layers)) + " | all | µs/token |")
    print("|---" * (n_layers + 3) + "|")
    for name, st in rows.items():
        cells = []
        for l in range(n_layers):
            bl = st["by_layer"][l] if l < len(st["by_layer"]) else [0, 0, 0]
            cells.append("-" if bl[1] == 0 else "%.2f / %.2f" % pr(bl))
        allpr = pr([st["correct"], st["predicted"], st["actual"]])
        us = 1e6 * st["seconds"] / (4 * n) if name.startswith("pregate") or name.startswith("freq") or "d=1" in name else float("nan")
        print(f"| {name} | " + " | ".join(cells) + " | %.2f / %.2f | %s |" % (*allpr, "-" if us != us else f"{us:.1f}"))
    tg = look["tests"][0]["tokens_per_second_mean"]
    print(f"\n(all resident, lookahead 4 + pregate: {tg:.1f} t/s decode; "
          f"pre-gate load added {look.get('predictor_rss_bytes', 0) / 1024:.0f} KiB RSS)")
    return {"rows": rows, "tg": tg, "predictor_rss_bytes": look.get("predictor_rss_bytes")}


def end_to_end(args):
    results = {}
    configs = [(b, p, s) for p in args.profiles.split(",") for b in args.budgets.split(",")
               for s in args.setups.split(",")]
    for rnd in range(args.rounds):
        for b, prof, s in configs:
            extra = ["--expert-cache", f"{b}%", "--direct-io", "--flash-profile", prof] + SETUPS[s]
            rep = bench(args, extra, args.n, args.reps)
            t = rep["tests"][0]
            c = t["cache"]
            results.setdefault((b, prof, s), []).append({
                "tps": t["tokens_per_second_mean"],
                "stall_ms": 1e3 * c["stall_seconds_per_token"],
                "read_kib": c["bytes_read_per_token"] / 1024,
                "demand_kib": c["demand_bytes_read_per_token"] / 1024,
                "hit": c["hit_rate"],
                "prefetch_precision": c["prefetch_precision"],
                "min_kib": rep["optimum"]["optimal_bytes"] / 1024 / ((args.reps + 1) * args.n),
            })
            print(f"round {rnd + 1}: {b}% {prof} {s}: {t['tokens_per_second_mean']:.1f} t/s", flush=True)
    print(f"\n## End to end: decode of held-out text, Belady eviction, O_DIRECT + emulated flash "
          f"(median of {args.rounds} alternating rounds, each the mean of {args.reps} x {args.n} tokens)\n")
    print("| budget | flash | predictor | t/s | vs none | stall ms/token | read KiB/token | demand KiB/token "
          "| hit rate | prefetch precision | Belady-min KiB/token |")
    print("|---" * 11 + "|")
    out = []
    for prof in args.profiles.split(","):
        for b in args.budgets.split(","):
            base = statistics.median(r["tps"] for r in results[(b, prof, "none")]) \
                if (b, prof, "none") in results else float("nan")
            for s in args.setups.split(","):
                rs = results[(b, prof, s)]
                med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                out.append({"budget": b, "profile": prof, "setup": s, **med,
                            "samples": [r["tps"] for r in rs]})
                print(f"| {b}% | {prof} | {s} | {med['tps']:.1f} | {med['tps'] / base:.2f}x | "
                      f"{med['stall_ms']:.2f} | {med['read_kib']:.0f} | {med['demand_kib']:.0f} | "
                      f"{100 * med['hit']:.1f}% | {100 * med['prefetch_precision']:.0f}% | {med['min_kib']:.0f} |")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--text", required=True, help="held-out text")
    ap.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", f"{ROOT}/target"),
                                                  "release", "moe-run"))
    ap.add_argument("--budgets", default="25,50")
    ap.add_argument("--profiles", default="microsd,nvme")
    ap.add_argument("--setups", default="none,lookahead-1,frequency,pregate,pregate-k6")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--quality-tokens", type=int, default=2000)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    report = {"load": os.getloadavg()}
    if not args.skip_quality:
        report["quality"] = quality(args)
    if not args.skip_e2e:
        report["end_to_end"] = end_to_end(args)
    report["load_after"] = os.getloadavg()
    print(f"\nload average before {report['load']}, after {report['load_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
