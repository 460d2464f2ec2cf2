#!/usr/bin/env python3
"""Make tests/fixtures/qwen3_moe_q4_k_m: a Q4_K_M GGUF quantized by llama.cpp itself, with
llama.cpp's logits on it and transformers' logits of the unquantized model.

The Q4_K_M file is what a Hub download looks like (Q4_K for most matrices, Q6_K for the output
and some attn_v/ffn_down, F32 norms and routers), so the runtime's k-quant path is judged on
llama.cpp's own encoding, not on ours. Steps:

  1. a tiny random Qwen3-MoE in transformers (every matrix width a multiple of 256 by default,
     so that every matrix is Q4_K or Q6_K; --moe-ff 288 gives Q5_0/Q8_0 expert downs as Hub
     files of such models have), fixed seed, saved as safetensors with the tokenizer of
     tests/fixtures/qwen3_moe;
  2. moe-convert -t f32 (the converter under test writes the llama.cpp-compatible layout);
  3. llama_model_quantize(..., LLAMA_FTYPE_MOSTLY_Q4_K_M) from libllama;
  4. llama.cpp's logits (all positions, f32 KV cache) for a few prompts on the Q4_K_M file and on
     the f32 file, and transformers' logits for the same prompts.

Writes model.gguf, expected.json, llama_logits_<i>.npy (Q4_K_M), llama_f32_logits_<i>.npy and
logits_<i>.npy (transformers, unquantized) to the fixture folder; prints how llama.cpp's Q4_K_M
logits compare to the unquantized ones (the bar for ours).

  LLAMA_CPP_LIB_PATH=/work/llama.cpp-build/bin python3 scripts/make_kquant_fixture.py \\
      --moe-convert target/release/moe-convert
"""
import argparse
import ctypes
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
TOKENIZER_FROM = FIXTURES / "qwen3_moe"
LLAMA_FTYPE_MOSTLY_Q4_K_M = 15  # llama.h
GGML_TYPE_F32 = 0
SEED = 9100
PROMPTS = [[1, 17, 200, 5, 42, 99, 300, 7], list(range(3, 380, 23)), [120] * 4 + [33, 250, 8, 64, 90, 11]]


def build_model(vocab: int, moe_ff: int = 256):
    import torch
    import transformers as tf

    cfg = tf.Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, num_hidden_layers=2, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=moe_ff, intermediate_size=256,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False,
        attention_bias=False, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, rms_norm_eps=1e-6)
    torch.manual_seed(SEED)
    model = tf.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.8, 1.2)  # not all ones, so that a norm read wrongly shows
            elif "mlp.gate" in name and "proj" not in name:
                p.normal_(0.0, 0.3)  # router: decisive but not one-hot
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            elif "lm_head" in name:
                p.normal_(0.0, 0.2)  # logits spread over several units: clear top-1 margins
            else:
                p.normal_(0.0, 0.06)  # wide enough that logits spread over several units
    return model


def transformers_logits(model, ids):
    import torch
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def llama_logits(llama_cpp, path, prompts):
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, n_batch=256,
                          type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    llm.close()
    return out


def fix_alignment_key(path):
    """llama_model_quantize copies every key of its input, general.alignment too (moe-convert
    writes 4096 for page-aligned tensors), but lays out the output with its own 32-byte alignment
    (llama-quant.cpp: `align = GGUF_DEFAULT_ALIGNMENT`; gguf_set_val_u32 does not change the
    context's alignment), so neither llama.cpp ("tensor ... has offset 80640, expected 81920")
    nor the runtime loads the result. The data really is 32-byte aligned: say so in the key (a
    u32 value rewritten in place; nothing moves)."""
    data = bytearray(path.read_bytes())
    key = b"general.alignment"
    at = data.find(len(key).to_bytes(8, "little") + key)
    assert at >= 0, "no general.alignment key"
    at += 8 + len(key)
    assert int.from_bytes(data[at:at + 4], "little") == 4, "general.alignment is a u32 (type 4)"
    old = int.from_bytes(data[at + 4:at + 8], "little")
    if old != 32:
        print(f"general.alignment {old} -> 32 (llama_model_quantize wrote 32-byte alignment)")
        data[at + 4:at + 8] = (32).to_bytes(4, "little")
        path.write_bytes(bytes(data))


def compare(name, a, b):
    """top-1 agreement, worst cosine, mean KL(b || a) of softmaxes, max |a - b|."""
    agree = np.mean(a.argmax(-1) == b.argmax(-1))
    cos = ((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min()

    def logsm(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    la, lb = logsm(a.astype(np.float64)), logsm(b.astype(np.float64))
    kl = (np.exp(lb) * (lb - la)).sum(-1).mean()
    print(f"  {name}: top1 {agree:.1%}  worst cos {cos:.5f}  mean KL {kl:.2e}  max|diff| {np.abs(a - b).max():.3e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe-convert", type=Path, default=ROOT / "target" / "release" / "moe-convert")
    ap.add_argument("--out", type=Path, default=FIXTURES / "qwen3_moe_q4_k_m")
    ap.add_argument("--moe-ff", type=int, default=256,
                    help="expert FFN width; one that is not a multiple of 256 (e.g. 288) makes "
                         "llama.cpp fall back to Q5_0/Q8_0 for the expert down projections, as "
                         "Hub Q4_K_M files of such models have. The committed fixture uses 256: "
                         "with 288 (seed 9100) the aarch64 NEON run is 1e-2 from llama.cpp's x86 "
                         "logits while x86 and aarch64's scalar reference match to 7e-7 and every "
                         "NEON product agrees with the scalar one on each tensor, i.e. this model "
                         "amplifies float-order differences (not investigated further)")
    args = ap.parse_args()

    import llama_cpp
    from gguf import GGUFReader

    vocab = json.loads((TOKENIZER_FROM / "config.json").read_text())["vocab_size"]
    model = build_model(vocab, args.moe_ff)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf = tmp / "hf"
        model.save_pretrained(hf, safe_serialization=True)
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            shutil.copy(TOKENIZER_FROM / f, hf / f)
        f32 = tmp / "model-f32.gguf"
        subprocess.run([str(args.moe_convert), str(hf), "-o", str(f32), "-t", "f32", "--quiet"],
                       check=True)
        args.out.mkdir(parents=True, exist_ok=True)
        q4 = args.out / "model.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_FTYPE_MOSTLY_Q4_K_M
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(q4).encode(), ctypes.byref(params))
        if rc != 0:
            sys.exit(f"llama_model_quantize failed with {rc}")
        fix_alignment_key(q4)
        types = {}
        for t in GGUFReader(str(q4)).tensors:
            types.setdefault(t.tensor_type.name, []).append(t.name)
        print("tensor types:", {k: len(v) for k, v in types.items()})
        for k, v in types.items():
            print(f"  {k}: {', '.join(v[:6])}{' ...' if len(v) > 6 else ''}")

        ref = [transformers_logits(model, ids) for ids in PROMPTS]
        lq = llama_logits(llama_cpp, q4, PROMPTS)
        lf = llama_logits(llama_cpp, f32, PROMPTS)

    prompts = []
    for i, ids in enumerate(PROMPTS):
        np.save(args.out / f"logits_{i}.npy", ref[i])
        np.save(args.out / f"llama_logits_{i}.npy", lq[i])
        np.save(args.out / f"llama_f32_logits_{i}.npy", lf[i])
        prompts.append({"ids": ids, "logits_file": f"logits_{i}.npy", "llama_logits_file": f"llama_logits_{i}.npy",
                        "llama_f32_logits_file": f"llama_f32_logits_{i}.npy"})
    (args.out / "expected.json").write_text(json.dumps({
        "about": "made by scripts/make_kquant_fixture.py: model.gguf is llama.cpp's Q4_K_M of a random "
                 "Qwen3-MoE (seed %d); logits_* transformers (unquantized), llama_logits_* llama.cpp on "
                 "model.gguf, llama_f32_logits_* llama.cpp on the f32 conversion" % SEED,
        "tensor_types": {k: len(v) for k, v in types.items()},
        "prompts": prompts}, indent=1) + "\n")
    a, b, c = (np.concatenate(x) for x in (lq, lf, ref))
    print("llama.cpp f32 file vs transformers (conversion check):")
    compare("f32", b, c)
    print("llama.cpp Q4_K_M vs transformers (the quantization loss our runtime must match):")
    compare("q4_k_m", a, c)
    print(f"wrote {args.out} ({sum(f.stat().st_size for f in args.out.iterdir()) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
