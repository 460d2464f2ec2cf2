#!/usr/bin/env python3
"""A random-weight Granite-4.0-H with Granite-4.0-H-Tiny's layer widths, for timing (not for text).

Writes an HF folder (bf16 safetensors, the fixture's tokenizer): hidden 1536, Mamba-2 layers of
48 heads of 64 (d_inner 3072), d_state 128, 1 group, conv kernel 4; attention 12 heads / 4 KV
heads of 128 without positional embedding; expert FFN 512 with 6 of N experts per token (the
Tiny routes 6 of 64; fewer experts here keep the file small, the work per token is the same)
plus a shared expert of 1024; `--layers` layers with one attention layer in ten as the Tiny has
(4 of 40), the attention layer in the middle.
Usage: python3 scripts/bench/make_granite_hybrid_bench.py OUT [--layers 4] [--experts 6]
"""
import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

REPO = Path(__file__).resolve().parents[2]

ap = argparse.ArgumentParser()
ap.add_argument("out", type=Path)
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--experts", type=int, default=6)
args = ap.parse_args()
torch.manual_seed(0)
types = ["attention" if i == args.layers // 2 else "mamba" for i in range(args.layers)]
cfg = GraniteMoeHybridConfig(
    vocab_size=384, hidden_size=1536, intermediate_size=512, shared_intermediate_size=1024,
    num_hidden_layers=args.layers, num_attention_heads=12, num_key_value_heads=4,
    num_local_experts=args.experts, num_experts_per_tok=6, layer_types=types, position_embedding_type="nope",
    mamba_n_heads=48, mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2,
    embedding_multiplier=12.0, attention_multiplier=0.0078125, residual_multiplier=0.22, logits_scaling=6.0,
    tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
model = GraniteMoeHybridForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(str(args.out))
config = json.loads((args.out / "config.json").read_text())
config["layer_types"] = types  # the Hub's names
(args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
    shutil.copy(REPO / "tests/fixtures/granite_hybrid" / f, args.out / f)
print(f"wrote {args.out}: layers {types}")
