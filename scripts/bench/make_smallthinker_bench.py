#!/usr/bin/env python3
"""A SmallThinker-shaped benchmark checkpoint with text-driven routing, from the trained Qwen3-MoE.

There is no trained SmallThinker small enough to ship. This rewrites models/small-moe (Qwen3-MoE,
24 experts top-4, 6 layers, trained on text) as a `smallthinker` checkpoint and widens its experts
(as scripts/bench/widen_experts.py does), so that expert streaming can be measured on
SmallThinker's schedule (a layer's router runs on the layer input, before attention) with routing
that follows real text and with realistic expert bytes:

    python3 scripts/bench/make_smallthinker_bench.py models/small-moe/hf /work/bench/st-wide --width 2048
    moe-convert /work/bench/st-wide -o /work/bench/st-wide-q8_0.gguf --type q8_0

What carries over and what does not:
- router: SmallThinker applies `primary_router` to the raw layer input x; Qwen3 applies `gate` to
  RMSNorm(h) = g * h / rms(h) of the post-attention state h. Top-k selection ignores the positive
  per-token factor 1 / rms, so `primary_router = gate @ diag(g)` selects, on any vector, exactly
  the experts the trained gate selects on its normalised form. Applied to x instead of h, the
  routes are the trained router's one attention block early: close to the trained model's, driven
  by the text, not identical. Routing uses softmax over the top-k
  (`moe_primary_router_apply_softmax` true), the trained model's rule.
- experts become ReGLU (relu instead of silu) and Qwen3's per-head q/k norms are dropped
  (SmallThinker has none), so the outputs are not the trained model's; the benchmark measures
  reads, stalls and speed, not text quality.
- every expert is widened from moe_intermediate_size to --width hidden units: new gate/up rows are
  small seeded random values, new down columns exact zeros (relu(g) * u * 0 = 0).
- attention: all layers full attention with rope (the 4B-A0.6B's layout).
"""
import argparse
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02)
    args = ap.parse_args()

    cfg = json.load(open(os.path.join(args.src, "config.json")))
    if cfg.get("model_type") != "qwen3_moe":
        sys.exit(f"{args.src}: model_type {cfg.get('model_type')!r}; expected qwen3_moe")
    n_layer, inter = cfg["num_hidden_layers"], cfg["moe_intermediate_size"]
    n_exp = cfg.get("num_experts") or cfg["num_local_experts"]
    if args.width < inter:
        sys.exit(f"--width {args.width} is below moe_intermediate_size {inter}")
    src = {}
    for f in sorted(f for f in os.listdir(args.src) if f.endswith(".safetensors")):
        src.update(load_file(os.path.join(args.src, f)))
    gen = torch.Generator().manual_seed(args.seed)
    out = {"model.embed_tokens.weight": src["model.embed_tokens.weight"],
           "model.norm.weight": src["model.norm.weight"]}
    if "lm_head.weight" in src:
        out["lm_head.weight"] = src["lm_head.weight"]
    for l in range(n_layer):
        p, q = f"model.layers.{l}.", f"model.layers.{l}."
        for name in ["input_layernorm.weight", "post_attention_layernorm.weight",
                     "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                     "self_attn.o_proj.weight"]:
            out[q + name] = src[p + name]
        g = src[p + "post_attention_layernorm.weight"].float()
        gate = src[p + "mlp.gate.weight"].float()
        out[q + "block_sparse_moe.primary_router.weight"] = (gate * g[None, :]).to(gate.dtype)
        for e in range(n_exp):
            sp, dp = f"{p}mlp.experts.{e}.", f"{q}block_sparse_moe.experts.{e}."
            for a, b in [("gate_proj", "gate"), ("up_proj", "up")]:
                t = src[sp + a + ".weight"]
                extra = torch.randn(args.width - inter, t.shape[1], generator=gen) * args.std
                out[dp + b + ".weight"] = torch.cat([t, extra.to(t.dtype)], 0).contiguous()
            t = src[sp + "down_proj.weight"]
            pad = torch.zeros(t.shape[0], args.width - inter, dtype=t.dtype)
            out[dp + "down.weight"] = torch.cat([t, pad], 1).contiguous()
    st = dict(
        architectures=["SmallThinkerForCausalLM"], model_type="smallthinker",
        model_name="smallthinker_bench_from_small_moe", num_hidden_layers=n_layer,
        hidden_size=cfg["hidden_size"], vocab_size=cfg["vocab_size"], rms_norm_eps=cfg["rms_norm_eps"],
        num_attention_heads=cfg["num_attention_heads"], num_key_value_heads=cfg["num_key_value_heads"],
        head_dim=cfg["head_dim"], rope_layout=[1] * n_layer,
        rope_theta=cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"], rope_scaling=None,
        max_position_embeddings=cfg["max_position_embeddings"], sliding_window_layout=[0] * n_layer,
        sliding_window_size=4096, moe_num_primary_experts=n_exp, moe_ffn_hidden_size=args.width,
        moe_primary_router_apply_softmax=True, moe_num_active_primary_experts=cfg["num_experts_per_tok"],
        tie_word_embeddings=cfg.get("tie_word_embeddings", False), bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"), pad_token_id=cfg.get("pad_token_id"), torch_dtype="bfloat16",
    )
    os.makedirs(args.dst, exist_ok=True)
    save_file(out, os.path.join(args.dst, "model.safetensors"), metadata={"format": "pt"})
    json.dump(st, open(os.path.join(args.dst, "config.json"), "w"), indent=2)
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        if os.path.exists(os.path.join(args.src, f)):
            shutil.copy(os.path.join(args.src, f), os.path.join(args.dst, f))
    size = sum(t.numel() * t.element_size() for t in out.values())
    print(f"wrote {args.dst}: {n_layer} layers, {n_exp} experts of width {args.width}, {size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
