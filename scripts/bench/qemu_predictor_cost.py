#!/usr/bin/env python3
"""The pre-gating router's cost next to one backbone layer, under qemu-user (or natively).

Runs `moe-run bench` (decode, 1 thread, all experts resident) alternately with --predictor none
and --predictor pregate, per emulated CPU, and prints per token: the predictor's own time (as the
session times it: one network step + top-k per layer), one backbone layer's time (from the none runs:
decode time minus the output projection, over the layer count), their ratio, and the RSS the
predictor added. QEMU timings are not ARM timings; the ratio is what carries over, roughly.

  scripts/bench/qemu_predictor_cost.py --bin target/aarch64-unknown-linux-gnu/release/moe-run \\
      -m models/small-moe/small-moe-q8_0.gguf --cpus cortex-a72,cortex-a76 --rounds 3
  (any build runs the GRU router natively; --cpus native runs the binary directly)
"""

import argparse
import json
import statistics
import subprocess


def bench(binary, model, cpu, predictor, n_gen, reps):
    cmd = [binary, "bench", "-m", model, "-p", "0", "-n", str(n_gen), "-r", str(reps), "-t", "1",
           "--json", "--profile", "--predictor", predictor]
    if cpu != "native":
        cmd = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", "-cpu", cpu] + cmd
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--cpus", default="cortex-a72,cortex-a76")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("-r", type=int, default=3)
    a = ap.parse_args()
    n_layer = block_count(a.model)
    print("| cpu | predictor ms/token | backbone layer ms | predictor / layer | decode ms/token none | "
          "decode ms/token pregate | predictor RSS MiB | peak RSS MiB none / pregate |")
    print("|---|---|---|---|---|---|---|---|")
    for cpu in a.cpus.split(","):
        pred_ms, layer_ms, tok_none, tok_pre, rss, peak_n, peak_p = [], [], [], [], [], [], []
        for _ in range(a.rounds):
            for predictor in ["none", "pregate"]:
                d = bench(a.bin, a.model, cpu, predictor, a.n, a.r)
                t = d["tests"][0]
                ms = 1000.0 / t["tokens_per_second_mean"]
                if predictor == "none":
                    out_ms = sum(p["ms_per_token"] for p in t["profile"] if p["phase"] == "output projection")
                    layer_ms.append((ms - out_ms) / n_layer)
                    tok_none.append(ms)
                    peak_n.append(d["peak_rss_bytes"] / 2**20)
                else:
                    tokens = (a.r + 1) * a.n  # warm-up + measured runs
                    pred_ms.append(1000.0 * d["predictor"]["seconds"] / tokens)
                    tok_pre.append(ms)
                    rss.append(d["predictor_rss_bytes"] / 2**20)
                    peak_p.append(d["peak_rss_bytes"] / 2**20)
        med = statistics.median
        print(f"| {cpu} | {med(pred_ms):.3f} | {med(layer_ms):.3f} | {med(pred_ms) / med(layer_ms):.2f} | "
              f"{med(tok_none):.2f} | {med(tok_pre):.2f} | {med(rss):.1f} | {med(peak_n):.1f} / {med(peak_p):.1f} |",
              flush=True)
        print(f"<!-- {cpu} samples: predictor ms {[round(x, 3) for x in pred_ms]}, layer ms "
              f"{[round(x, 3) for x in layer_ms]} -->", flush=True)


def block_count(model):
    from gguf import GGUFReader  # llama.cpp's gguf-py

    r = GGUFReader(model)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    return int(r.fields[f"{arch}.block_count"].parts[-1][0])

if __name__ == "__main__":
    main()
