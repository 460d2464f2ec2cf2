#!/usr/bin/env python3
"""moe-run against llama.cpp on existing GGUF files (e.g. Hub-style files made by llama-quantize):
prompt and decode speed (`moe-run bench` against `llama-bench`, same file, same threads,
alternating runs so that the machine's drift hits both alike) and, with --ppl-text, perplexity
of the same text scored the same way (`moe-run eval --like-llama-perplexity` against
`llama-perplexity`: the same tokens, windows and scored positions).

    LLAMA_BIN=/path/to/llama.cpp/build/bin MOE_RUN=target/release/moe-run \\
        python3 scripts/bench/bench_file_vs_llamacpp.py FILE.gguf [FILE.gguf ...] \\
        [--threads 1,2] [--rounds 3] [-p 128] [-n 32] [--reps 3] \\
        [--ppl-text TEXT --ppl-window 256 --ppl-chunks 8] [--llama-args "--repack 0"] \\
        [--wrap "CMD"] [--json-out results.json]

llama-bench runs with its defaults (so it repacks the weights it has kernels for, as a user gets
it) unless --llama-args says otherwise; for each run the median of its samples is used, since
its first repetitions may still be paging the file in; the same for `moe-run bench`'s samples
(after its warm-up). llama-perplexity evaluates each window as one batch (-b = -c),
moe-run eval token by token; both score the second half of every window. --wrap prefixes every
timed command (e.g. a script that pauses other work on a shared machine). The table reports
per-round medians and their range.
"""
import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def run(cmd, wrap):
    return subprocess.run(shlex.split(wrap) + cmd if wrap else cmd, capture_output=True, text=True, check=True)


def moe_bench(exe, model, p, n, t, reps, wrap):
    out = run([exe, "bench", "-m", model, "-p", str(p), "-n", str(n), "-t", str(t), "-r", str(reps), "--json"],
              wrap).stdout
    rep = json.loads(out.strip().splitlines()[-1])
    # The median of the samples, as for llama-bench (the first repetitions may still page the file in).
    return {x["test"]: statistics.median(x["samples"]) if x.get("samples") else x["tokens_per_second_mean"]
            for x in rep["tests"]}


def llama_bench(exe, model, p, n, t, reps, extra, wrap):
    out = run([exe, "-m", model, "-p", str(p), "-n", str(n), "-t", str(t), "-r", str(reps), "-o", "json",
               *shlex.split(extra)], wrap).stdout
    rows = json.loads(out)
    res = {("pp" if r["n_gen"] == 0 else "tg"): statistics.median(r["samples_ts"]) for r in rows}
    res["size"], res["params"] = rows[0]["model_size"], rows[0]["model_n_params"]
    res["type"] = rows[0]["model_type"]
    return res


def moe_ppl(exe, model, text, window, chunks, t):
    out = run([exe, "eval", "-m", model, "--text", text, "--window", str(window), "--max-tokens",
               str(window * chunks), "--like-llama-perplexity", "-t", str(t)], None).stdout
    rep = json.loads(out)
    return rep["perplexity"], rep["scored"]


def llama_ppl(exe, model, text, window, chunks, t, extra):
    p = run([exe, "-m", model, "-f", text, "-c", str(window), "-b", str(window), "--chunks", str(chunks),
             "-t", str(t), *shlex.split(extra)], None)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", p.stderr)
    if not m:
        sys.exit(f"llama-perplexity printed no estimate:\n{p.stderr[-2000:]}")
    return float(m.group(1))


def spread(vals):
    return f"{statistics.median(vals):.1f} ({min(vals):.1f}-{max(vals):.1f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3, help="speed rounds per thread count (0: perplexity only)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--ppl-text", help="also compare perplexity on this text")
    ap.add_argument("--ppl-window", type=int, default=256)
    ap.add_argument("--ppl-chunks", type=int, default=8)
    ap.add_argument("--llama-args", default="", help="extra llama-bench/llama-perplexity arguments")
    ap.add_argument("--wrap", help="command prefix for every timed run")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    moe = os.environ.get("MOE_RUN", f"{ROOT}/target/release/moe-run")
    llama_dir = os.environ.get("LLAMA_BIN")
    if not llama_dir:
        sys.exit("set LLAMA_BIN to the folder holding llama-bench and llama-perplexity")
    lbench, lppl = os.path.join(llama_dir, "llama-bench"), os.path.join(llama_dir, "llama-perplexity")
    threads = [int(t) for t in args.threads.split(",")]

    results = {}
    for model in args.models:
        name = os.path.basename(model)
        r = results.setdefault(name, {"speed": {}})
        if args.ppl_text:
            ours = moe_ppl(moe, model, args.ppl_text, args.ppl_window, args.ppl_chunks, max(threads))
            theirs = llama_ppl(lppl, model, args.ppl_text, args.ppl_window, args.ppl_chunks, max(threads),
                               args.llama_args)
            r["ppl"] = {"moe_run": ours[0], "scored": ours[1], "llama_cpp": theirs}
            print(f"{name}: perplexity moe-run {ours[0]:.2f} llama.cpp {theirs:.2f} ratio {ours[0] / theirs:.4f} "
                  f"({ours[1]} tokens scored)", flush=True)
        for t in threads if args.rounds > 0 else []:
            s = r["speed"].setdefault(str(t), {"moe_pp": [], "moe_tg": [], "llama_pp": [], "llama_tg": []})
            for i in range(args.rounds):
                load = os.getloadavg()[0]
                runs = [("moe", lambda: moe_bench(moe, model, args.p, args.n, t, args.reps, args.wrap)),
                        ("llama", lambda: llama_bench(lbench, model, args.p, args.n, t, args.reps, args.llama_args,
                                                      args.wrap))]
                got = {}
                for who, f in (runs if i % 2 == 0 else runs[::-1]):
                    got[who] = f()
                o, l = got["moe"], got["llama"]
                r.update(size=l["size"], params=l["params"], type=l["type"])
                for k in ("pp", "tg"):
                    s[f"moe_{k}"].append(o[k])
                    s[f"llama_{k}"].append(l[k])
                print(f"{name} t={t} round {i + 1} (load {load:.1f}): moe-run pp {o['pp']:.1f} tg {o['tg']:.1f} | "
                      f"llama.cpp pp {l['pp']:.1f} tg {l['tg']:.1f}", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)

    print("\n| file | llama.cpp type | GiB | BPW | perplexity moe-run / llama.cpp (ratio) | threads "
          "| pp t/s moe-run | pp llama.cpp | pp ratio | tg t/s moe-run | tg llama.cpp | tg ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ppl = r.get("ppl")
        ppl_cell = (f"{ppl['moe_run']:.1f} / {ppl['llama_cpp']:.1f} ({ppl['moe_run'] / ppl['llama_cpp']:.4f})"
                    if ppl else "-")
        if not r["speed"]:
            print(f"| {name} | - | - | - | {ppl_cell} | - | - | - | - | - | - | - |")
            continue
        bpw = r["size"] * 8 / r["params"]
        for t, s in r["speed"].items():
            ratio = {k: [a / b for a, b in zip(s[f"moe_{k}"], s[f"llama_{k}"])] for k in ("pp", "tg")}
            print(f"| {name} | {r['type']} | {r['size'] / 2**30:.2f} | {bpw:.2f} | {ppl_cell} | {t} "
                  f"| {spread(s['moe_pp'])} | {spread(s['llama_pp'])} | {statistics.median(ratio['pp']):.2f}x "
                  f"| {spread(s['moe_tg'])} | {spread(s['llama_tg'])} | {statistics.median(ratio['tg']):.2f}x |")


if __name__ == "__main__":
    main()
