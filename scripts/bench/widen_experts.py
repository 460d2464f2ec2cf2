#!/usr/bin/env python3
"""Widen every routed expert of a trained Qwen3-MoE checkpoint without changing what it computes.

The trained models/small-moe is smaller (6.5 MiB) than either engine's fixed footprint, so a
memory-limited comparison on it measures nothing. This makes a checkpoint with the same trained
routers and the same outputs but large experts (realistic routing, realistic expert bytes):

    python3 scripts/bench/widen_experts.py models/small-moe/hf /work/bench/small-moe-wide --width 2048 --verify
    moe-convert /work/bench/small-moe-wide -o /work/bench/small-moe-wide-q8_0.gguf --type q8_0

Every expert's FFN goes from moe_intermediate_size I to W hidden units:
- gate_proj / up_proj [I, H] -> [W, H]: the W - I new rows are small random values (seeded), so
  the new hidden units are active (an engine cannot skip them as zeros);
- down_proj [H, I] -> [H, W]: the W - I new columns are exact zeros, so the new units contribute
  exactly 0 to the output: down @ (silu(gate x) * up x) is unchanged.
Routers, attention, norms, embeddings are copied bit for bit. With W a multiple of 32 the padded
down_proj columns are whole zero Q8_0/Q4_0 blocks, so quantized engines compute the same function
too (the original 32-value blocks are quantized identically).

--verify loads both checkpoints with transformers (float32, eager) and compares logits on a few
prompts; it exits non-zero if they differ by more than --tol.
"""
import argparse
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file


def widen(src, dst, width, seed, std):
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("model_type") != "qwen3_moe":
        sys.exit(f"{src}: model_type {cfg.get('model_type')!r}; this script handles qwen3_moe only")
    inter = cfg["moe_intermediate_size"]
    if width <= inter:
        sys.exit(f"--width {width} must exceed moe_intermediate_size {inter}")
    files = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    gen = torch.Generator().manual_seed(seed)
    out, n_exp = {}, 0
    for fname in files:
        for name, t in load_file(os.path.join(src, fname)).items():
            if ".mlp.experts." in name and name.endswith(("gate_proj.weight", "up_proj.weight")):
                assert t.shape[0] == inter, (name, t.shape)
                extra = torch.randn(width - inter, t.shape[1], generator=gen) * std
                t = torch.cat([t, extra.to(t.dtype)], dim=0)  # [W, H]
                n_exp += name.endswith("gate_proj.weight")
            elif ".mlp.experts." in name and name.endswith("down_proj.weight"):
                assert t.shape[1] == inter, (name, t.shape)
                t = torch.cat([t, torch.zeros(t.shape[0], width - inter, dtype=t.dtype)], dim=1)  # [H, W]
            out[name] = t.contiguous()
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(dst):  # do not leave shards of an earlier run next to the new file
        if f.endswith(".safetensors") or f == "model.safetensors.index.json":
            os.remove(os.path.join(dst, f))
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    cfg["moe_intermediate_size"] = width
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for f in os.listdir(src):
        if not f.endswith(".safetensors") and f not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))
    exp_params = n_exp * 3 * width * cfg["hidden_size"]
    print(f"{dst}: {n_exp} experts widened {inter} -> {width}; expert params {exp_params / 1e6:.1f} M "
          f"(Q8_0 {exp_params * 34 / 32 / 2**20:.1f} MiB)")


def verify(src, dst, text, tol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(src)
    kw = dict(dtype=torch.float32, attn_implementation="eager")
    a = AutoModelForCausalLM.from_pretrained(src, **kw).eval()
    b = AutoModelForCausalLM.from_pretrained(dst, **kw).eval()
    try:  # transformers 5: per-expert loop, as the fixtures use
        a.set_experts_implementation("eager")
        b.set_experts_implementation("eager")
    except AttributeError:
        pass
    prompts = ["The", "Once upon a time", "In the beginning there was"]
    if text:
        with open(text) as f:
            body = f.read()
        prompts += [body[:400], body[len(body) // 2:len(body) // 2 + 400]]
    worst = 0.0
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            la, lb = a(ids).logits, b(ids).logits
            d = (la - lb).abs().max().item()
            same = bool((la.argmax(-1) == lb.argmax(-1)).all())
            worst = max(worst, d)
            print(f"  {ids.shape[1]:4d} tokens: max |logit diff| {d:.3g} (logit scale {la.abs().max().item():.3g}), "
                  f"argmax identical at every position: {same}")
    ok = worst <= tol
    print(f"verify: worst max |logit diff| {worst:.3g} {'<=' if ok else '>'} tol {tol}: {'OK' if ok else 'FAILED'}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="Hugging Face Qwen3-MoE checkpoint directory")
    ap.add_argument("dst", help="output directory (created)")
    ap.add_argument("--width", type=int, default=2048, help="new moe_intermediate_size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02, help="std of the new gate/up rows")
    ap.add_argument("--verify", action="store_true", help="compare logits with transformers")
    ap.add_argument("--text", help="also verify on two 400-character slices of this text")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    widen(args.src, args.dst, args.width, args.seed, args.std)
    if args.verify and not verify(args.src, args.dst, args.text, args.tol):
        sys.exit(1)


if __name__ == "__main__":
    main()
