#!/usr/bin/env python3
"""Quality per byte (#21): moe-convert's --target-size files against llama.cpp's
llama-imatrix + llama-quantize files of the same sizes, from one checkpoint and one calibration
text.

For each of llama.cpp's size classes (Q4_K_M, Q3_K_M, Q2_K, IQ4_XS by default):
  - llama.cpp: `llama-quantize --imatrix` on moe-convert's f16 file, the imatrix from
    `llama-imatrix` over the calibration text;
  - moe-convert, same imatrix and the same text for its own statistics, at exactly that file's
    size: `--type <the class's mix> --target-size BYTES` (the non-expert tensors are then
    llama-quantize's; only the routed experts' types differ) in moe-edge's per-expert layout,
    and with `--stacked-types` (llama.cpp's layout; llama.cpp loads it).
Every file is scored by `moe-run eval --reference F32` on held-out text: mean KL divergence of
the next-token distribution from the f32 model's (as llama-perplexity --kl-divergence), top-1
agreement, perplexity; plus decode speed (`moe-run bench -p 0`) and the expert cache's hit rate
with the cache at 25% and 50% of the class's llama.cpp file's expert bytes.

    LLAMA_BIN=/path/to/llama.cpp/build/bin python3 scripts/bench/quality_per_byte.py \\
        --hf HF_DIR --calib calib.txt --heldout heldout.txt --work DIR \\
        [--types Q4_K_M,Q3_K_M,Q2_K,IQ4_XS] [--eval-tokens 2048] [--threads 2]

Files are made once and reused when present in --work. llama-quantize copies the f16 file's
`general.alignment` (4096) while it writes its data at 32; the key is set back to 32.
"""
import argparse
import json
import os
import shlex
import struct
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def run(cmd, env=None, log=None, may_fail=False):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if log:
        with open(log, "w") as f:
            f.write(p.stdout + p.stderr)
    if p.returncode != 0:
        if may_fail:
            return None
        sys.exit(f"failed: {' '.join(shlex.quote(c) for c in cmd)}\n{p.stderr[-3000:]}")
    return p.stdout


def fix_alignment(path):
    with open(path, "r+b") as f:
        head = f.read(1 << 20)
        key = b"general.alignment"
        i = head.find(struct.pack("<Q", len(key)) + key)
        if i < 0:
            return
        j = i + 8 + len(key)
        ty, _ = struct.unpack("<II", head[j:j + 8])
        assert ty == 4, ty
        f.seek(j + 4)
        f.write(struct.pack("<I", 32))


def expert_bytes(path):
    from gguf import GGUFReader
    r = GGUFReader(path)
    return sum(int(t.n_bytes) for t in r.tensors if "_exps" in t.name)


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--types", default="Q4_K_M,Q3_K_M,Q2_K,IQ4_XS")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--cache-tokens", type=int, default=512, help="tokens for the cache hit rates")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--calib-kl-tokens", type=int, default=256)
    ap.add_argument("--imatrix-chunk", type=int, default=256)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--stacked", default="yes", choices=["yes", "no"],
                    help="also make the --stacked-types file of every class")
    ap.add_argument("--other-type", default="mix",
                    help="--type of moe-convert's files, for the non-expert tensors: `mix` (the class's "
                         "own mix, so those tensors are llama-quantize's) or a type such as q8_0")
    ap.add_argument("--llama-quantize-args", default="",
                    help="extra llama-quantize arguments, e.g. to give its non-expert tensors the same types")
    ap.add_argument("--json-out")
    a = ap.parse_args()
    llama = os.environ.get("LLAMA_BIN")
    if not llama:
        sys.exit("set LLAMA_BIN to llama.cpp's build/bin (llama-imatrix, llama-quantize)")
    env = dict(os.environ, LD_LIBRARY_PATH=llama)
    mc = os.environ.get("MOE_CONVERT", f"{ROOT}/target/release/moe-convert")
    mr = os.environ.get("MOE_RUN", f"{ROOT}/target/release/moe-run")
    os.makedirs(a.work, exist_ok=True)
    w = lambda name: os.path.join(a.work, name)

    for ty in ("f32", "f16"):
        if not os.path.exists(w(f"{ty}.gguf")):
            run([mc, a.hf, "-o", w(f"{ty}.gguf"), "--type", ty, "--quiet"])
    imatrix = w("imatrix.gguf")
    if not os.path.exists(imatrix):
        run([f"{llama}/llama-imatrix", "-m", w("f16.gguf"), "-f", a.calib, "-o", imatrix,
             "-c", str(a.imatrix_chunk), "-t", str(a.threads)], env=env, log=w("imatrix.log"))

    variants = []  # (class, label, path)
    for t in a.types.split(","):
        lf = w(f"llama-{t}.gguf")
        if not os.path.exists(lf):
            run([f"{llama}/llama-quantize", "--imatrix", imatrix, *shlex.split(a.llama_quantize_args),
                 w("f16.gguf"), lf, t, str(a.threads)],
                env=env, log=w(f"llama-{t}.log"))
            fix_alignment(lf)
        size = os.path.getsize(lf)
        variants.append((t, "llama.cpp imatrix", lf))
        ours = [("moe-convert --target-size, per-expert", f"ours-pe-{t}.gguf", [])]
        if a.stacked == "yes":
            ours.append(("moe-convert --target-size --stacked-types", f"ours-st-{t}.gguf", ["--stacked-types"]))
        for label, name, extra in ours:
            if not os.path.exists(w(name)):
                # A budget below what the layout needs (per-expert tensors are page-aligned) is
                # refused; the table says so.
                other = t.lower() if a.other_type == "mix" else a.other_type
                run([mc, a.hf, "-o", w(name), "--type", other, "--calib", a.calib,
                     "--calib-tokens", str(a.calib_tokens), "--calib-kl-tokens", str(a.calib_kl_tokens),
                     "--imatrix", imatrix, "--target-size", str(size), "--quiet", *extra],
                    log=w(name.replace(".gguf", ".log")), may_fail=True)
            variants.append((t, label, w(name)))

    ref = w("f32.gguf")
    n_params = None
    rows = []
    for cls, label, path in variants:
        if not os.path.exists(path):
            with open(path.replace(".gguf", ".log")) as f:
                why = f.read().strip().splitlines()[-1]
            rows.append({"class": cls, "variant": label, "file": os.path.basename(path), "refused": why})
            print(json.dumps(rows[-1]), flush=True)
            continue
        ev = last_json(run([mr, "eval", "-m", path, "--text", a.heldout, "--max-tokens", str(a.eval_tokens),
                            "--reference", ref, "-t", str(a.threads)]))
        if n_params is None:
            from gguf import GGUFReader
            n_params = sum(int(t.n_elements) for t in GGUFReader(ref).tensors)
        row = {"class": cls, "variant": label, "file": os.path.basename(path),
               "bytes": os.path.getsize(path), "bpw": os.path.getsize(path) * 8 / n_params,
               "mean_kl": ev["reference"]["mean_kl"], "top1": ev["reference"]["top1_agreement"],
               "ppl": ev["perplexity"]}
        llama_experts = expert_bytes(w(f"llama-{cls}.gguf"))
        for share in (25, 50):
            c = last_json(run([mr, "eval", "-m", path, "--text", a.heldout, "--max-tokens", str(a.cache_tokens),
                               "--expert-cache", str(llama_experts * share // 100), "-t", str(a.threads)]))
            st = c["expert_cache"]
            row[f"hit{share}"] = st["demand_hits"] / max(1, st["demand_hits"] + st["demand_misses"])
            row[f"slots{share}"] = st["slots"]
        if not a.no_speed:
            b = last_json(run([mr, "bench", "-m", path, "-p", "0", "-n", "32", "-r", "3", "-t", "1", "--json"]))
            row["tg"] = next(x["tokens_per_second_mean"] for x in b["tests"] if x["test"].startswith("tg"))
        rows.append(row)
        print(json.dumps(row), flush=True)

    print("\n| class | variant | MiB | bpw | mean KL | top-1 % | ppl | cache 25%: slots / hit % | 50% | tg t/s (1 thread) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "refused" in r:
            print(f"| {r['class']} | {r['variant']} | refused: {r['refused']} |||||||")
            continue
        print(f"| {r['class']} | {r['variant']} | {r['bytes'] / 2**20:.2f} | {r['bpw']:.3f} | {r['mean_kl']:.5f} | "
              f"{r['top1'] * 100:.2f} | {r['ppl']:.3f} | {r['slots25']} / {r['hit25'] * 100:.1f} | "
              f"{r['slots50']} / {r['hit50'] * 100:.1f} | {r.get('tg', float('nan')):.1f} |")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
