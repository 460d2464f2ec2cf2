#!/usr/bin/env python3
"""Check that GGUF files written by moe-convert load and run correctly in llama.cpp.

For every prompt in tests/fixtures/<fixture>/expected.json the GGUF is run in
llama.cpp (through the llama-cpp-python bindings) and compared with the
transformers reference:

  rel      max |llama.cpp logit - transformers logit| / max |transformers logit|
  top1     fraction of prompt positions whose argmax agrees
  cos      worst per-position cosine similarity of the two logit vectors
  greedy   llama.cpp's 16-token greedy continuation (argmax, no EOS stop) == greedy_ids

Usage:
  python scripts/check/llamacpp_parity.py /tmp/out                 # folder of <fixture>.gguf
  python scripts/check/llamacpp_parity.py a.gguf qwen3_moe_q8_0.gguf  # explicit files

With --no-repack, llama.cpp loads the files without its extra buffer types (weight repacking and
AMX), as `llama-bench --repack 0` runs: on a machine whose CPU lists AMX it cannot execute, the
native build's AMX Q8_0 kernel raises SIGILL.

With --moe-run BIN, every prompt is also run by moe-run on the same file (`--dump-logits`, f32 KV
cache) and the largest |moe-run - llama.cpp| / max |llama.cpp logit| is printed ("vs moe-run"):
the two engines compared directly, whatever transformers says.

A file maps to the fixture whose name is its stem, or the longest fixture name
that prefixes the stem followed by "_", "-" or "." (qwen3_moe_q8_0.gguf ->
qwen3_moe; name a bf16 conversion qwen3_moe.bf16.gguf, since qwen3_moe_bf16 is a fixture).
Files with float tensors only (f32/f16/bf16) must pass (rel <= --tol, or
--half-tol for f16/bf16 files; top1 = 100%; greedy equal) or the script exits 1.
Quantized files are reported only. The KV cache is kept in f32 so that f32
files compare to ~1e-6. Fixtures listed in KNOWN_UNSUPPORTED may
fail to load without failing the run; their llama.cpp error is still printed.

The bindings load libllama from LLAMA_CPP_LIB_PATH when set, so a llama.cpp
built elsewhere can be used with a pure-Python install of llama-cpp-python:
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip install llama-cpp-python
  LLAMA_CPP_LIB_PATH=/path/to/llama.cpp/build/bin python scripts/check/llamacpp_parity.py ...
or, without installing, with the bindings from the unpacked llama-cpp-python source package
(pip install diskcache first) and the libllama built from its vendored tree:
  PYTHONPATH=llama_cpp_python-0.3.36 LLAMA_CPP_LIB_PATH=build/bin python scripts/check/llamacpp_parity.py ...
"""
import argparse
import ctypes
import json
import sys
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"

# Fixtures whose model shape llama.cpp cannot represent (not converter bugs):
# fixture -> (part of llama.cpp's load error, reason). Any other load error fails the run.
KNOWN_UNSUPPORTED = {
    "qwen2_moe": ("tensor 'blk.1.ffn_gate_inp.weight' not found",
                  "dense MLP layer (mlp_only_layers); llama.cpp's qwen2moe wants experts in every layer"),
    "olmoe": ("tensor 'blk.0.attn_k_norm.weight' has wrong shape",
              "GQA k_norm; llama.cpp's olmoe wants n_head_kv == n_head (and ignores clip_qkv)"),
}
# Fixtures that load but that llama.cpp's graph computes differently from transformers (not converter
# bugs): fixture -> (largest rel diff accepted, reason). Top-1 and greedy must still agree.
KNOWN_GRAPH_DIFFERENCES = {
    "deepseek_v2": (0.05, "llama.cpp scores expert groups by the sum of their best two experts (DeepSeek-V3's "
                          "rule) also for V2's group_limited_greedy, which takes the best expert; moe-edge "
                          "reads moe-edge's deepseek2.expert_group_score=max, llama.cpp ignores it"),
    "gpt_oss_bf16": (5e-3, "llama.cpp rounds YaRN's correction range to whole dimensions (ggml_rope_yarn_corr_dims); "
                           "gpt-oss's config says truncate=false, which transformers (and moe-edge, from "
                           "gpt-oss.rope.scaling.yarn_truncate) honour: positions > 0 rotate slightly differently"),
}
KNOWN_GRAPH_DIFFERENCES["gpt_oss"] = KNOWN_GRAPH_DIFFERENCES["gpt_oss_bf16"]
FLOAT_TYPES = {"F32", "F16", "BF16"}
GGML_TYPE_F32 = 0
WARN, ERROR, CONT = 3, 4, 5  # ggml_log_level (ggml.h)


def tensor_types(path):
    from gguf import GGUFReader
    return {t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def fixture_for(path, names):
    stem = path.stem
    if stem in names:
        return stem
    prefixes = [n for n in names if any(stem.startswith(n + sep) for sep in "_-.")]
    return max(prefixes, key=len) if prefixes else None


def moe_run_logits(moe_run, path, ids):
    """moe-run's logits of every position of `ids` on `path` (f32 KV cache, like llama.cpp's here)."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "logits.npy"
        subprocess.run([moe_run, "-m", str(path), "--tokens", ",".join(map(str, ids)), "-n", "0", "--dump-logits",
                        str(out), "--kv-type", "f32", "--target-profile", "none"], check=True, capture_output=True)
        return np.load(out)


def run_file(llama_cpp, path, exp, fixture_dir, log, moe_run=None):
    """Per-prompt results and llama.cpp's load warnings; RuntimeError with llama.cpp's error if it won't load."""
    log.clear()
    try:
        llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, n_batch=256,
                              type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)
    except Exception as e:  # llama.cpp's reason is in its log, the exception only says "Failed to load"
        errors = [m.strip() for lvl, m in log if lvl == ERROR] or [str(e)]
        raise RuntimeError(" | ".join(errors)) from None
    warnings = [m.strip() for lvl, m in log if lvl == WARN]
    results = []
    for p in exp["prompts"]:
        ids = p["ids"]
        ref = np.load(fixture_dir / p["logits_file"]).astype(np.float32)
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float32)
        greedy = []
        for _ in range(len(p["greedy_ids"])):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            greedy.append(tok)
            llm.eval([tok])
        vs_ours = None
        if moe_run:
            ours = moe_run_logits(moe_run, path, ids)
            vs_ours = float(np.abs(ours - got).max() / np.abs(got).max())
        results.append({
            "vs_moe_run": vs_ours,
            "rel": float(np.abs(got - ref).max() / np.abs(ref).max()),
            "top1": float((got.argmax(-1) == ref.argmax(-1)).mean()),
            "cos": float(((got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)).min()),
            "greedy": greedy == p["greedy_ids"],
        })
    llm.close()
    return results, warnings


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, help="folder with <fixture>.gguf files, or .gguf paths")
    ap.add_argument("--fixtures", type=Path, default=FIXTURES)
    ap.add_argument("--tol", type=float, default=1e-4, help="max rel diff for f32 files")
    ap.add_argument("--half-tol", type=float, default=2e-2, help="max rel diff for files with f16/bf16 tensors")
    ap.add_argument("--moe-run", help="moe-run binary: also compare llama.cpp with moe-run on each file")
    ap.add_argument("--no-repack", action="store_true",
                    help="load without llama.cpp's extra buffer types (weight repacking, AMX), as llama-bench "
                         "--repack 0: a native build on a CPU that lists AMX but cannot run it (the development "
                         "VM) raises SIGILL in the AMX Q8_0 kernel on multi-token batches")
    args = ap.parse_args()

    try:
        import llama_cpp
    except (ImportError, OSError, FileNotFoundError) as e:  # no package, or no libllama found
        print(f"skipped: llama_cpp not installed ({type(e).__name__}: {e})")
        return 0

    if args.no_repack:
        # Llama() takes no such argument; it builds its parameters from llama_model_default_params.
        import llama_cpp.llama_cpp as low_level
        defaults = low_level.llama_model_default_params

        def no_extra_bufts():
            params = defaults()
            params.use_extra_bufts = False
            return params

        low_level.llama_model_default_params = no_extra_bufts

    log = []  # (ggml log level, message) of the current file, filled by llama.cpp

    @llama_cpp.llama_log_callback
    def on_log(level, text, _user):
        msg = text.decode("utf-8", "replace")
        if level == CONT and log:
            log[-1] = (log[-1][0], log[-1][1] + msg)
        else:
            log.append((level, msg))

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))

    files = []
    for p in args.paths:
        files += sorted(p.glob("*.gguf")) if p.is_dir() else [p]
    names = sorted(d.name for d in args.fixtures.iterdir() if (d / "expected.json").is_file())

    passed, failed, skipped = [], [], []
    print(f"{'file':<26} {'fixture':<20} {'types':<10} {'prompt':>6} {'rel diff':>10} {'top1':>6} {'cos':>8} {'greedy':>6}  verdict")
    for path in files:
        fx = fixture_for(path, names)
        if fx is None:
            print(f"{path.name:<26} no matching fixture: skipped")
            skipped.append(path.name)
            continue
        try:
            types = tensor_types(path)
        except Exception:  # unreadable file: let llama.cpp say why
            types = {"?"}
        quantized = not types <= FLOAT_TYPES
        tol = args.tol if types == {"F32"} else args.half_tol
        kind = "quant" if quantized and "?" not in types else "/".join(sorted(t.lower() for t in types))
        exp = json.loads((args.fixtures / fx / "expected.json").read_text())
        try:
            results, warnings = run_file(llama_cpp, path, exp, args.fixtures / fx, log, args.moe_run)
        except RuntimeError as e:
            needle, reason = KNOWN_UNSUPPORTED.get(fx, (None, None))
            known = needle is not None and needle in str(e)
            print(f"{path.name:<26} {fx:<20} {kind:<10} {'-':>6} {'-':>10} {'-':>6} {'-':>8} {'-':>6}  "
                  + (f"LOAD FAILED, known llama.cpp limitation: {reason}" if known else "LOAD FAILED"))
            print(f"    llama.cpp: {e}")
            (skipped if known else failed).append(path.name)
            continue
        file_ok = True
        known_tol, known_reason = KNOWN_GRAPH_DIFFERENCES.get(fx, (None, None))
        for i, r in enumerate(results):
            ok = r["rel"] <= tol and r["top1"] == 1.0 and r["greedy"]
            known = (not ok and known_tol is not None and r["rel"] <= known_tol and r["top1"] == 1.0
                     and r["greedy"])
            file_ok &= ok or known or quantized
            verdict = ("ok" if ok else "differs, known llama.cpp graph difference" if known
                       else "differs (quantized: informational)" if quantized else "MISMATCH")
            vs = "" if r["vs_moe_run"] is None else f"  (vs moe-run {r['vs_moe_run']:.2e})"
            print(f"{path.name:<26} {fx:<20} {kind:<10} {i:>6} {r['rel']:>10.2e} {r['top1']:>6.0%} {r['cos']:>8.5f} "
                  f"{'yes' if r['greedy'] else 'no':>6}  {verdict}{vs}")
        for w in warnings:
            print(f"    llama.cpp warning: {w}")
        if known_reason and any(not (r["rel"] <= tol) for r in results):
            print(f"    known difference: {known_reason}")
        (passed if file_ok else failed).append(path.name)

    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    print(f"\nllamacpp_parity: {len(passed)} passed, {len(failed)} failed, {len(skipped)} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
