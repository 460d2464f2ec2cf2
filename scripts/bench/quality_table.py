#!/usr/bin/env python3
"""Quality and speed of pruned, mixed-precision and lossy-routing variants of a model.

For each variant: perplexity on held-out text and next-token agreement with the unpruned f32
model (`moe-run eval`, decoded token by token), next to file size, expert bytes used and read
per token, and generation speed with the expert cache limited to the same number of bytes for
every variant (a share of the unpruned q8_0 file's expert bytes) under an emulated flash
profile (`moe-run bench`).

Files come from moe-convert (see --models for the names expected; REPORT in the issue 8 report):

  moe-convert HF -o DIR/f32.gguf --type f32
  moe-convert HF -o DIR/q8_0.gguf --type q8_0 --calib CALIB.txt
  moe-convert HF -o DIR/top18-q8_0.gguf --type q8_0 --calib CALIB.txt --prune-experts top:18
  ...  (top12: top:12, mass90: mass:0.9, mixed25/50: --expert-types hot=q8_0,cold=q4_0
        --hot-fraction 0.25/0.5, perexpert-q8_0: --expert-types hot=q8_0,cold=q8_0)

Usage:
  python3 scripts/bench/quality_table.py --dir /tmp/calib/m --text heldout.txt [--budget 0.5]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# (label, file, extra moe-run flags, what it is)
VARIANTS = [
    ("f32 (reference)", "f32.gguf", [], "unpruned f32"),
    ("q8_0", "q8_0.gguf", [], "unpruned, calibrated"),
    ("q4_0", "q4_0.gguf", [], "unpruned"),
    ("prune 75% (top:18)", "top18-q8_0.gguf", [], "q8_0"),
    ("prune 50% (top:12)", "top12-q8_0.gguf", [], "q8_0"),
    ("prune mass:0.9", "mass90-q8_0.gguf", [], "q8_0"),
    ("per-expert layout, all q8_0", "perexpert-q8_0.gguf", [], "--expert-types hot=q8_0,cold=q8_0"),
    ("mixed 25% q8_0 / 75% q4_0", "mixed25.gguf", [], "per-expert layout"),
    ("mixed 50% q8_0 / 50% q4_0", "mixed50.gguf", [], "per-expert layout"),
    ("top:12 + mixed 25%", "top12-mixed25.gguf", [], "per-expert layout"),
    ("q8_0 + top-p 0.9", "q8_0.gguf", ["--route-top-p", "0.9"], "lossy"),
    ("q8_0 + top-p 0.7", "q8_0.gguf", ["--route-top-p", "0.7"], "lossy"),
    ("q8_0 + skip-uncached < 0.1", "q8_0.gguf", ["--skip-uncached-below", "0.1"], "lossy, needs cache"),
    ("q8_0 + skip-uncached < 0.2", "q8_0.gguf", ["--skip-uncached-below", "0.2"], "lossy, needs cache"),
    ("q8_0 + pin-hot 0.5", "q8_0.gguf", ["--pin-hot", "0.5"], "lossless cache policy"),
]


def expert_bytes(path: Path) -> int:
    from gguf import GGUFReader
    r = GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in r.tensors if "_exps" in t.name)


def run_json(cmd: list[str]) -> dict:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True, help="folder with the converted variants")
    ap.add_argument("--text", type=Path, required=True, help="held-out text")
    ap.add_argument("--moe-run", default="target/release/moe-run")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--budget", type=float, default=0.5, help="expert cache as a share of the q8_0 file's expert bytes")
    ap.add_argument("--flash", default="microsd")
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma separated labels to run")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()

    cache_bytes = int(args.budget * expert_bytes(args.dir / "q8_0.gguf"))
    cache = ["--expert-cache", str(cache_bytes)]
    print(f"expert cache for every variant: {cache_bytes / 2**20:.2f} MiB "
          f"({100 * args.budget:.0f}% of the q8_0 file's expert bytes), flash profile {args.flash}", file=sys.stderr)
    rows, ref = [], None
    for label, fname, flags, what in VARIANTS:
        if args.only and label not in args.only.split(","):
            continue
        path = args.dir / fname
        if not path.exists():
            print(f"skip {label}: {path} missing", file=sys.stderr)
            continue
        # Quality: token by token; options that act on the cache get the same cache.
        needs_cache = any(f in flags for f in ("--skip-uncached-below", "--pin-hot"))
        ev = run_json([args.moe_run, "eval", "-m", str(path), "--text", str(args.text),
                       "--max-tokens", str(args.max_tokens), "-t", str(args.threads)]
                      + flags + (cache if needs_cache else []))
        if ref is None:
            ref = ev  # the first variant is the f32 reference
        agree = sum(a == b for a, b in zip(ev["argmax"], ref["argmax"])) / len(ref["argmax"])
        bench = run_json([args.moe_run, "bench", "-m", str(path), "-p", "0", "-n", str(args.n_gen),
                          "-r", str(args.reps), "-t", str(args.threads), "--json",
                          "--flash-profile", args.flash] + cache + flags)
        tg = next(t for t in bench["tests"] if t["test"] == "tg")
        row = dict(
            label=label, what=what, file=fname, flags=flags,
            file_mib=ev["file_bytes"] / 2**20,
            ppl=ev["perplexity"], agree=agree,
            used_kib_per_token=tg["expert_bytes_per_token"] / 1024,
            read_kib_per_token=(tg["cache"] or {}).get("bytes_read_per_token", 0) / 1024,
            hit_rate=(tg["cache"] or {}).get("hit_rate", 0),
            tg_mean=tg["tokens_per_second_mean"], tg_std=tg["tokens_per_second_stddev"],
            lossy=ev.get("lossy_routing"),
        )
        rows.append(row)
        print(f"{label}: ppl {row['ppl']:.2f} agree {100 * agree:.1f}% read {row['read_kib_per_token']:.0f} KiB/t "
              f"tg {row['tg_mean']:.1f} t/s", file=sys.stderr)

    print(f"| variant | file MiB | held-out ppl | top-1 agreement with f32 | expert KiB used/token | "
          f"KiB read/token ({args.flash}, cache {cache_bytes / 2**20:.2f} MiB) | cache hit rate | gen t/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['file_mib']:.2f} | {r['ppl']:.2f} | {100 * r['agree']:.1f}% | "
              f"{r['used_kib_per_token']:.0f} | {r['read_kib_per_token']:.0f} | {100 * r['hit_rate']:.0f}% | "
              f"{r['tg_mean']:.1f} ± {r['tg_std']:.1f} |")
    if args.json_out:
        args.json_out.write_text(json.dumps(dict(cache_bytes=cache_bytes, rows=rows), indent=1))


if __name__ == "__main__":
    main()
