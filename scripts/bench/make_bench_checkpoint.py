#!/usr/bin/env python3
"""Writes a benchmark-sized random-weight MoE checkpoint as a real Hugging Face folder.

--arch qwen3_moe (the project's benchmark model): hidden 1024, 24 layers, 16 heads / 4 KV heads
of dim 64, 64 experts with top-8, expert FFN 384 (`--expert-ff`), vocab 32000 (bf16 about 3.9 GB).
llama-quantize stores a k-quant or i-quant only in tensors whose rows are whole 256-value
blocks, so with FFN 384 the expert down projections fall back to other types (Q5_0, IQ4_NL, ...);
`--expert-ff 512` keeps every expert tensor in the requested type.

--arch qwen3_30b_a3b: Qwen3-30B-A3B's config.json (hidden 2048, 32 query / 4 KV heads of 128, 128
experts top-8 of FFN 768, vocab 151936, 48 layers: bf16 about 61 GB). For the #23 rehearsal
write `--layers 2`, convert, and grow the file to 48 layers with grow_layers.py.

--arch deepseek_v3: Moonlight-16B-A3B's proportions halved in width (hidden 1024, 16 heads, MLA
without q LoRA with kv_lora_rank 256, qk nope/rope/v 64/32/64, 64 experts top-6 of FFN 704 in
one group with sigmoid routing and a correction bias, 2 shared experts, layer 0 dense with FFN
5632, vocab 32000), 12 layers by default: about 1.6 B parameters (Q8_0 about 1.7 GB).

--arch olmoe: OLMoE-1B-7B's full shapes (hidden 2048, 16 layers, 16 heads of 128 without GQA, q/k
norms over the whole projection, 64 experts top-8 of FFN 1024 without top-k renormalisation,
vocab 50304: 6.9 B parameters, bf16 about 13.8 GB; the #23 rehearsal of the 4 GB class). The
tokenizer is the fixture's (384 tokens); moe-convert pads the vocabulary to 50304 as it does
for any checkpoint whose embedding is larger than its tokenizer.

--arch gpt_oss: gpt-oss-20b's layer shapes (hidden 2880, 64 query / 8 KV heads of 64, 32
experts top-4 of FFN 2880, vocab 201088, sliding window 128 on every other layer, YaRN, sinks
and biases) with fewer layers (8 by default: about 3.6 B parameters, Q8_0 with MXFP4 experts
about 4.9 GB). The experts are written as the Hub checkpoint stores them, MXFP4 blocks (random
codes) and scales, everything else bf16.

Weights are random (seeded), so routing is unrealistic: use it for speed in the resident case,
not for caching studies. bf16 on disk by default, written layer by layer into shards so memory
stays small.

    python3 scripts/bench/make_bench_checkpoint.py OUT_DIR [--arch qwen3_moe|deepseek_v3|gpt_oss|olmoe] [--dtype bf16|f32] [--layers N]
        [--expert-ff N]
"""
import argparse
import json
import os
import shutil

import numpy as np
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "..", "tests", "fixtures")
FIXTURE_TOKENIZER = os.path.join(FIXTURES, "qwen3_moe")


def bf16_bits(a):
    """float32 -> bfloat16 bit patterns (round to nearest even), as uint16."""
    u = a.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--arch", choices=["qwen3_moe", "qwen3_30b_a3b", "deepseek_v3", "gpt_oss", "olmoe"],
                    default="qwen3_moe")
    ap.add_argument("--layers", type=int, default=None, help="default 24 (qwen3_moe), 48 (qwen3_30b_a3b), 12 (deepseek_v3), 8 (gpt_oss), 16 (olmoe)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--expert-ff", type=int, default=None,
                    help="expert FFN width (moe_intermediate_size); default 384 (qwen3_moe) or 704 (deepseek_v3)")
    args = ap.parse_args()
    if args.layers is None:
        args.layers = {"qwen3_moe": 24, "qwen3_30b_a3b": 48, "deepseek_v3": 12, "gpt_oss": 8,
                       "olmoe": 16}[args.arch]
    if args.arch == "deepseek_v3":
        return deepseek_v3(args)
    if args.arch == "gpt_oss":
        return gpt_oss(args)
    if args.arch == "olmoe":
        return olmoe(args)

    if args.arch == "qwen3_30b_a3b":
        d, n_head, n_kv, hd, n_exp, top_k, vocab, dense_ff, ctx = 2048, 32, 4, 128, 128, 8, 151936, 6144, 40960
        ff = args.expert_ff or 768
    else:
        d, n_head, n_kv, hd, n_exp, top_k, vocab, dense_ff, ctx = 1024, 16, 4, 64, 64, 8, 32000, 3072, 4096
        ff = args.expert_ff or 384
    os.makedirs(args.out, exist_ok=True)
    w = Writer(args.out, args.dtype, args.seed)
    tensor, ones = w.tensor, w.ones
    config = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": d,
        "num_hidden_layers": args.layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": hd,
        "num_experts": n_exp,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": ff,
        "intermediate_size": dense_ff,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "vocab_size": vocab,
        "max_position_embeddings": ctx,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16" if args.dtype == "bf16" else "float32",
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


    std = 0.02
    w.write("model-embed.safetensors", {
        "model.embed_tokens.weight": tensor((vocab, d), std),
        "model.norm.weight": ones(d),
        "lm_head.weight": tensor((vocab, d), std),
    })
    for l in range(args.layers):
        p = f"model.layers.{l}"
        t = {
            f"{p}.input_layernorm.weight": ones(d),
            f"{p}.post_attention_layernorm.weight": ones(d),
            f"{p}.self_attn.q_proj.weight": tensor((n_head * hd, d), std),
            f"{p}.self_attn.k_proj.weight": tensor((n_kv * hd, d), std),
            f"{p}.self_attn.v_proj.weight": tensor((n_kv * hd, d), std),
            f"{p}.self_attn.o_proj.weight": tensor((d, n_head * hd), std),
            f"{p}.self_attn.q_norm.weight": ones(hd),
            f"{p}.self_attn.k_norm.weight": ones(hd),
            f"{p}.mlp.gate.weight": tensor((n_exp, d), std),
        }
        for e in range(n_exp):
            t[f"{p}.mlp.experts.{e}.gate_proj.weight"] = tensor((ff, d), std)
            t[f"{p}.mlp.experts.{e}.up_proj.weight"] = tensor((ff, d), std)
            t[f"{p}.mlp.experts.{e}.down_proj.weight"] = tensor((d, ff), std)
        w.write(f"model-layer-{l:03d}.safetensors", t)
        print(f"layer {l + 1}/{args.layers}", flush=True)
    w.finish()


class Writer:
    """Random tensors of the checkpoint's dtype from one seeded generator, and its shards."""

    def __init__(self, out, dtype, seed):
        self.out, self.dtype, self.weight_map = out, dtype, {}
        self.rng = np.random.default_rng(seed)

    def tensor(self, shape, std):
        a = self.rng.standard_normal(shape, dtype=np.float32) * std
        return bf16_bits(a) if self.dtype == "bf16" else a

    def ones(self, n):
        a = np.ones(n, np.float32)
        return bf16_bits(a) if self.dtype == "bf16" else a

    def write(self, name, tensors):
        # safetensors.numpy has no bfloat16 dtype: store the bits as uint16 and patch the header.
        path = os.path.join(self.out, name)
        save_file(tensors, path)
        if self.dtype == "bf16":
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = f.read(n).decode().replace('"U16"', '"BF16"').encode()
                data = f.read()
            header += b" " * (-len(header) % 8)
            with open(path, "wb") as f:
                f.write(len(header).to_bytes(8, "little") + header + data)
        for k in tensors:
            self.weight_map[k] = name

    def finish(self, tokenizer_dir=FIXTURE_TOKENIZER):
        with open(os.path.join(self.out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": self.weight_map}, f, indent=1)
        for name in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
            shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(self.out, name))
        print(f"wrote {self.out}")


def olmoe(args):
    """OLMoE-1B-7B-0924's config.json, layer count and expert FFN as asked."""
    d, n_head, hd, n_exp, top_k, vocab = 2048, 16, 128, 64, 8, 50304
    ff = args.expert_ff or 1024
    os.makedirs(args.out, exist_ok=True)
    w = Writer(args.out, args.dtype, args.seed)
    tensor, ones = w.tensor, w.ones
    config = {
        "architectures": ["OlmoeForCausalLM"],
        "model_type": "olmoe",
        "hidden_size": d,
        "num_hidden_layers": args.layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head,
        "num_experts": n_exp,
        "num_experts_per_tok": top_k,
        "intermediate_size": ff,
        "norm_topk_prob": False,
        "clip_qkv": None,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16" if args.dtype == "bf16" else "float32",
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
    }
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


    std = 0.02
    w.write("model-embed.safetensors", {
        "model.embed_tokens.weight": tensor((vocab, d), std),
        "model.norm.weight": ones(d),
        "lm_head.weight": tensor((vocab, d), std),
    })
    for l in range(args.layers):
        p = f"model.layers.{l}"
        a = f"{p}.self_attn"
        t = {
            f"{p}.input_layernorm.weight": ones(d),
            f"{p}.post_attention_layernorm.weight": ones(d),
            f"{a}.q_proj.weight": tensor((n_head * hd, d), std),
            f"{a}.k_proj.weight": tensor((n_head * hd, d), std),
            f"{a}.v_proj.weight": tensor((n_head * hd, d), std),
            f"{a}.o_proj.weight": tensor((d, n_head * hd), std),
            f"{a}.q_norm.weight": ones(n_head * hd),
            f"{a}.k_norm.weight": ones(n_head * hd),
            f"{p}.mlp.gate.weight": tensor((n_exp, d), std),
        }
        for e in range(n_exp):
            t[f"{p}.mlp.experts.{e}.gate_proj.weight"] = tensor((ff, d), std)
            t[f"{p}.mlp.experts.{e}.up_proj.weight"] = tensor((ff, d), std)
            t[f"{p}.mlp.experts.{e}.down_proj.weight"] = tensor((d, ff), std)
        w.write(f"model-layer-{l:03d}.safetensors", t)
        print(f"layer {l + 1}/{args.layers}", flush=True)
    w.finish(os.path.join(FIXTURES, "olmoe"))


def deepseek_v3(args):
    d, n_head, vocab = 1024, 16, 32000
    rank, nope, rope, vd = 256, 64, 32, 64
    n_exp, top_k, n_shared, dense_ff = 64, 6, 2, 5632
    ff = args.expert_ff or 704
    os.makedirs(args.out, exist_ok=True)
    w = Writer(args.out, args.dtype, args.seed)
    rng, tensor, ones = w.rng, w.tensor, w.ones
    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": d,
        "num_hidden_layers": args.layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head,
        "q_lora_rank": None,
        "kv_lora_rank": rank,
        "qk_nope_head_dim": nope,
        "qk_rope_head_dim": rope,
        "v_head_dim": vd,
        "n_routed_experts": n_exp,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": ff,
        "n_shared_experts": n_shared,
        "first_k_dense_replace": 1,
        "intermediate_size": dense_ff,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.446,
        "rope_interleave": True,
        "vocab_size": vocab,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 50000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16" if args.dtype == "bf16" else "float32",
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


    std = 0.02
    w.write("model-embed.safetensors", {
        "model.embed_tokens.weight": tensor((vocab, d), std),
        "model.norm.weight": ones(d),
        "lm_head.weight": tensor((vocab, d), std),
    })
    for l in range(args.layers):
        p = f"model.layers.{l}"
        a = f"{p}.self_attn"
        t = {
            f"{p}.input_layernorm.weight": ones(d),
            f"{p}.post_attention_layernorm.weight": ones(d),
            f"{a}.q_proj.weight": tensor((n_head * (nope + rope), d), std),
            f"{a}.kv_a_proj_with_mqa.weight": tensor((rank + rope, d), std),
            f"{a}.kv_a_layernorm.weight": ones(rank),
            f"{a}.kv_b_proj.weight": tensor((n_head * (nope + vd), rank), std),
            f"{a}.o_proj.weight": tensor((d, n_head * vd), std),
        }
        if l == 0:
            for n, shape in (("gate_proj", (dense_ff, d)), ("up_proj", (dense_ff, d)), ("down_proj", (d, dense_ff))):
                t[f"{p}.mlp.{n}.weight"] = tensor(shape, std)
        else:
            t[f"{p}.mlp.gate.weight"] = tensor((n_exp, d), std)
            bias = rng.standard_normal(n_exp, dtype=np.float32) * 0.01
            t[f"{p}.mlp.gate.e_score_correction_bias"] = bf16_bits(bias) if args.dtype == "bf16" else bias
            for e in range(n_exp):
                t[f"{p}.mlp.experts.{e}.gate_proj.weight"] = tensor((ff, d), std)
                t[f"{p}.mlp.experts.{e}.up_proj.weight"] = tensor((ff, d), std)
                t[f"{p}.mlp.experts.{e}.down_proj.weight"] = tensor((d, ff), std)
            sf = ff * n_shared
            for n, shape in (("gate_proj", (sf, d)), ("up_proj", (sf, d)), ("down_proj", (d, sf))):
                t[f"{p}.mlp.shared_experts.{n}.weight"] = tensor(shape, std)
        w.write(f"model-layer-{l:03d}.safetensors", t)
        print(f"layer {l + 1}/{args.layers}", flush=True)
    w.finish()


def gpt_oss(args):
    d, n_head, n_kv, hd, n_exp, top_k, ff, vocab, window = 2880, 64, 8, 64, 32, 4, 2880, 201088, 128
    os.makedirs(args.out, exist_ok=True)
    w = Writer(args.out, args.dtype, args.seed)
    rng, tensor, ones = w.rng, w.tensor, w.ones
    config = {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "hidden_size": d,
        "num_hidden_layers": args.layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": hd,
        "num_local_experts": n_exp,
        "num_experts_per_tok": top_k,
        "intermediate_size": ff,
        "vocab_size": vocab,
        "sliding_window": window,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(args.layers)],
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 150000,
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": False, "original_max_position_embeddings": 4096},
        "attention_bias": True,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16" if args.dtype == "bf16" else "float32",
        "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


    def mxfp4(rows, cols):
        # Random E2M1 codes; exponents around 2^-7, so values have a std near 0.02 like the rest.
        blocks = rng.integers(0, 256, (n_exp, rows, cols // 32, 16), dtype=np.uint8)
        scales = rng.integers(119, 122, (n_exp, rows, cols // 32), dtype=np.uint8)
        return blocks, scales

    std = 0.02
    w.write("model-embed.safetensors", {
        "model.embed_tokens.weight": tensor((vocab, d), std),
        "model.norm.weight": ones(d),
        "lm_head.weight": tensor((vocab, d), std),
    })
    for l in range(args.layers):
        p = f"model.layers.{l}"
        a = f"{p}.self_attn"
        e = f"{p}.mlp.experts"
        t = {
            f"{p}.input_layernorm.weight": ones(d),
            f"{p}.post_attention_layernorm.weight": ones(d),
            f"{a}.q_proj.weight": tensor((n_head * hd, d), std),
            f"{a}.q_proj.bias": tensor((n_head * hd,), std),
            f"{a}.k_proj.weight": tensor((n_kv * hd, d), std),
            f"{a}.k_proj.bias": tensor((n_kv * hd,), std),
            f"{a}.v_proj.weight": tensor((n_kv * hd, d), std),
            f"{a}.v_proj.bias": tensor((n_kv * hd,), std),
            f"{a}.o_proj.weight": tensor((d, n_head * hd), std),
            f"{a}.o_proj.bias": tensor((d,), std),
            f"{a}.sinks": tensor((n_head,), 1.0),
            f"{p}.mlp.router.weight": tensor((n_exp, d), std),
            f"{p}.mlp.router.bias": tensor((n_exp,), std),
            f"{e}.gate_up_proj_bias": tensor((n_exp, 2 * ff), std),
            f"{e}.down_proj_bias": tensor((n_exp, d), std),
        }
        # The MXFP4 bytes go in their own shard: safetensors.numpy writes them as U8 as they are.
        blocks, scales = mxfp4(2 * ff, d)
        down_blocks, down_scales = mxfp4(d, ff)
        save_file({f"{e}.gate_up_proj_blocks": blocks, f"{e}.gate_up_proj_scales": scales,
                   f"{e}.down_proj_blocks": down_blocks, f"{e}.down_proj_scales": down_scales},
                  os.path.join(args.out, f"model-experts-{l:03d}.safetensors"))
        for k in ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"):
            w.weight_map[f"{e}.{k}"] = f"model-experts-{l:03d}.safetensors"
        w.write(f"model-layer-{l:03d}.safetensors", t)
        print(f"layer {l + 1}/{args.layers}", flush=True)
    w.finish()


if __name__ == "__main__":
    main()
