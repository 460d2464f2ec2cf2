#!/usr/bin/env python3
"""A random-weight LFM2-MoE with LFM2-8B-A1B's layer widths, for timing (not for text).

Writes an HF folder (bf16 safetensors, the fixture's tokenizer): hidden 2048, 32 heads / 8 KV
heads of 64, conv_L_cache 3, expert FFN 1792 with 4 of N experts per token (the 8B-A1B routes
4 of 32; fewer experts here keep the file small, the work per token is the same), and
`--layers` layers in the 8B-A1B's proportion of conv to attention (3 conv : 1 attention).
Usage: python3 scripts/bench/make_lfm2_moe_bench.py OUT [--layers 4] [--experts 4]
"""
import argparse
import shutil
from pathlib import Path

import torch
from transformers import Lfm2MoeConfig, Lfm2MoeForCausalLM

REPO = Path(__file__).resolve().parents[2]

ap = argparse.ArgumentParser()
ap.add_argument("out", type=Path)
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--experts", type=int, default=4)
args = ap.parse_args()
torch.manual_seed(0)
types = ["full_attention" if i % 4 == 2 else "conv" for i in range(args.layers)]
cfg = Lfm2MoeConfig(vocab_size=384, hidden_size=2048, intermediate_size=7168, moe_intermediate_size=1792,
                    num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=8,
                    conv_L_cache=3, num_dense_layers=0, num_experts=args.experts, num_experts_per_tok=4,
                    layer_types=types, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
model = Lfm2MoeForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(str(args.out))
for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
    shutil.copy(REPO / "tests/fixtures/lfm2_moe" / f, args.out / f)
print(f"wrote {args.out}: layers {types}")
