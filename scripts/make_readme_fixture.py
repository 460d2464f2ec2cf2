#!/usr/bin/env python3
"""A tiny Qwen3-MoE routed by a Read-ME decoupled router, plus transformers reference outputs.

Writes tests/fixtures/qwen3_moe_readme/ (config.json, model.safetensors, tokenizer files,
expected.json, logits_<i>.npy). Usage:  python3 scripts/make_readme_fixture.py [--out DIR]

Read-ME (Cai et al., NeurIPS 2024, arXiv 2410.19123; code github.com/VITA-Group/READ-ME,
src/transformers/models/llama/modeling_llama.py, `cluster_predictor_class`) routes every token
with one small causal transformer over token ids that runs before the backbone. Its choice is used
by every MoE layer. This file is the reference implementation of that router
(`ReadMeRouter`, Read-ME's autoregressive variant, full recompute like Read-ME's
`full_input_ids` path) and of a backbone routed by it. transformers has no Read-ME class, so
every Qwen3-MoE layer's `mlp.gate` (Qwen3MoeTopKRouter) is patched: its logits come from the
decoupled router instead of `gate.weight @ x`; softmax, top-k and renormalisation stay the
backbone's own (for Read-ME's top-1 the weight is exactly 1, as in Read-ME's LlamaMLP_moe).

Checkpoint format (Hugging Face folder):
- config.json: the backbone's config (model_type qwen3_moe) plus Read-ME's own keys:
  `add_cluster_predictor` true, `embedding_dim`, `inter_dim` (Read-ME's residuals need them
  equal), `N_cluster` (= the expert count), `n_layer`, `n_head`, `normalizer` (attention scores
  are q.k / normalizer, not / sqrt(head_dim)), `hidden_act_predictor` (silu),
  `max_position_embeddings_predictor`, `nonautoregressive` false. RoPE uses the backbone's
  rope_theta over head_dim = inter_dim / n_head (rotate_half), RMSNorm eps 1e-6 (hard-coded in
  Read-ME).
- model.safetensors: the backbone's tensors and the router's under `cluster_predictor.` with
  Read-ME's names: embed.weight, input_layernorm_{i}.weight, {q,k,v,o}_proj_{i}.{weight,bias},
  post_attention_layernorm_{i}.weight, proj_1_{i}.{weight,bias}, proj_2_{i}.{weight,bias},
  out_layernorm.weight, proj_out.{weight,bias}.
  The backbone keeps its per-layer `mlp.gate.weight` (transformers builds them); they are unused.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
NAME = "qwen3_moe_readme"
BASE_SEED = 9900
N_LAYERS = 2
# Read-ME's router, scaled down: width 32 (Read-ME: 64), 1 block of 2 heads.
ROUTER = dict(embedding_dim=32, inter_dim=32, n_layer=1, n_head=2, normalizer=4.0,
              hidden_act_predictor="silu", max_position_embeddings_predictor=mf.MAX_POS)
INIT_ROUTER_OUT = 3.0  # router logits std: decisive choices (large top-k gaps)


def build_router(cfg, seed: int):
    """Read-ME's `cluster_predictor_class` (autoregressive), full-recompute forward."""
    import torch
    from torch import nn

    class RMSNorm(nn.Module):  # LlamaRMSNorm, eps 1e-6 as Read-ME hard-codes
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            v = x.pow(2).mean(-1, keepdim=True)
            return self.weight * (x * torch.rsqrt(v + 1e-6))

    class ReadMeRouter(nn.Module):
        def __init__(self):
            super().__init__()
            D, I = ROUTER["embedding_dim"], ROUTER["inter_dim"]
            assert D == I, "Read-ME adds the embedding-width residual to the inter_dim output"
            self.n_layer, self.n_head, self.inter_dim = ROUTER["n_layer"], ROUTER["n_head"], I
            self.normalizer = ROUTER["normalizer"]
            self.embed = nn.Embedding(cfg.vocab_size, D)
            for i in range(self.n_layer):
                setattr(self, f"input_layernorm_{i}", RMSNorm(D))
                setattr(self, f"post_attention_layernorm_{i}", RMSNorm(I))
                for p in "qkv":
                    setattr(self, f"{p}_proj_{i}", nn.Linear(D, I, bias=True))
                setattr(self, f"o_proj_{i}", nn.Linear(I, I, bias=True))
                setattr(self, f"proj_1_{i}", nn.Linear(I, I, bias=True))
                setattr(self, f"proj_2_{i}", nn.Linear(I, I, bias=True))
            self.out_layernorm = RMSNorm(I)
            self.proj_out = nn.Linear(I, cfg.num_experts, bias=True)
            hd = I // self.n_head
            theta = cfg.rope_parameters["rope_theta"]
            self.register_buffer("inv_freq", 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd)),
                                 persistent=False)

        def rope(self, x, pos):  # x [b, h, T, hd]; LlamaRotaryEmbedding + apply_rotary_pos_emb
            freqs = pos[:, None].float() * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos()[None, None], emb.sin()[None, None]
            x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
            return x * cos + torch.cat((-x2, x1), dim=-1) * sin

        def forward(self, input_ids):  # [b, T] -> router logits [b, T, N_cluster]
            b, T = input_ids.shape
            h, hd = self.n_head, self.inter_dim // self.n_head
            out = self.embed(input_ids)
            pos = torch.arange(T)
            for i in range(self.n_layer):
                residual = out
                x = getattr(self, f"input_layernorm_{i}")(out)
                q = getattr(self, f"q_proj_{i}")(x).view(b, T, h, hd).transpose(1, 2)
                k = getattr(self, f"k_proj_{i}")(x).view(b, T, h, hd).transpose(1, 2)
                v = getattr(self, f"v_proj_{i}")(x).view(b, T, h, hd).transpose(1, 2)
                q, k = self.rope(q, pos), self.rope(k, pos)
                w = torch.matmul(q, k.transpose(2, 3)) / self.normalizer
                mask = torch.triu(torch.full((T, T), torch.finfo(w.dtype).min), diagonal=1)
                w = torch.softmax(w + mask, dim=-1, dtype=torch.float32)
                a = torch.matmul(w, v).transpose(1, 2).reshape(b, T, -1)
                out = getattr(self, f"o_proj_{i}")(a) + residual
                residual = out
                x = getattr(self, f"post_attention_layernorm_{i}")(out)
                x = getattr(self, f"proj_2_{i}")(nn.functional.silu(getattr(self, f"proj_1_{i}")(x)))
                out = x + residual
            return self.proj_out(self.out_layernorm(out))

    torch.manual_seed(seed)
    r = ReadMeRouter()
    g = torch.Generator().manual_seed(seed + 1)

    def draw(shape, std, mean=0.0):
        return (torch.rand(shape, generator=g) * 2.0 - 1.0) * (std * math.sqrt(3.0)) + mean

    with torch.no_grad():
        for name, p in r.named_parameters():
            if "layernorm" in name:
                p.copy_(draw(p.shape, 0.1, 1.0))
            elif name.endswith(".bias"):
                p.copy_(draw(p.shape, 0.2))
            elif name == "embed.weight":
                p.copy_(draw(p.shape, 1.0))
            elif name == "proj_out.weight":
                p.copy_(draw(p.shape, INIT_ROUTER_OUT / math.sqrt(p.shape[1])))
            else:
                p.copy_(draw(p.shape, 1.0 / math.sqrt(p.shape[1])))
    return r.eval()


def attach(model, router):
    """Routes every MoE layer of `model` by `router`: a forward pre-hook computes the decoupled
    logits from the input ids once per call; each layer's gate uses them instead of its own."""
    import torch
    import torch.nn.functional as F

    stash = {}

    def pre_hook(mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        stash["logits"] = router(ids).reshape(-1, model.config.num_experts)

    def gate_forward(self, hidden_states):  # Qwen3MoeTopKRouter.forward with decoupled logits
        router_logits = stash["logits"]
        assert router_logits.shape[0] == hidden_states.reshape(-1, self.hidden_dim).shape[0]
        router_probs = F.softmax(router_logits, dtype=torch.float, dim=-1)
        top_value, indices = torch.topk(router_probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_value /= top_value.sum(dim=-1, keepdim=True)
        return router_logits, top_value.to(router_logits.dtype), indices

    model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    for _, m in mf.router_modules(model):
        m.forward = gate_forward.__get__(m)
    model.cluster_predictor = router  # state dict keys cluster_predictor.* (Read-ME's)


def main() -> None:
    import torch
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(mf.DEFAULT_OUT))
    args = ap.parse_args()
    torch.set_num_threads(1)
    versions = mf.check_versions(False)
    src = mf.DEFAULT_OUT / "qwen3_moe"  # same tokenizer and prompts as the qwen3_moe fixture
    base = json.loads((src / "expected.json").read_text())
    prompt_ids = [p["ids"] for p in base["prompts"]]
    sp = base["special_tokens"]

    mf.N_LAYERS = N_LAYERS
    seed = BASE_SEED
    while True:
        cfg_sp = dict(generation_bos=sp["generation_bos_token_id"], eos_token_id=sp["eos_token_id"],
                      pad_token_id=sp["pad_token_id"])
        model = mf.build_model({"arch": "qwen3_moe"}, cfg_sp, seed)
        router = build_router(model.config, seed)
        attach(model, router)
        ev = mf.evaluate(model, prompt_ids)
        distinct = len({tuple(p["greedy_ids"]) for p in ev["prompts"]}) == len(prompt_ids)
        print(f"seed {seed}: margin {ev['min_top1_margin']:.3f} gap {ev['min_router_gap']:.2e} distinct {distinct}")
        if ev["min_top1_margin"] >= mf.MIN_TOP1_MARGIN and ev["min_router_gap"] >= mf.MIN_ROUTER_GAP and distinct:
            break
        seed += 1

    out = Path(args.out) / NAME
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        shutil.copy(src / f, out / f)
    model.config.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(add_cluster_predictor=True, train_predictor=False, N_cluster=model.config.num_experts,
               nonautoregressive=False, **ROUTER)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    # Which expert each prompt token goes to (best first), from the decoupled router alone.
    cases = []
    for i, p in enumerate(ev["prompts"]):
        np.save(out / f"logits_{i}.npy", p["logits"].astype(np.float32))
        with torch.no_grad():
            rl = router(torch.tensor([p["ids"]]))[0]
        top = torch.topk(torch.softmax(rl, -1), model.config.num_experts_per_tok, dim=-1).indices
        cases.append(dict(text=base["prompts"][i]["text"], ids=p["ids"], logits_file=f"logits_{i}.npy",
                          greedy_ids=p["greedy_ids"], router_experts=top.tolist(),
                          min_top1_margin=p["min_top1_margin"], min_router_gap=p["min_router_gap"]))
    expected = dict(
        name=NAME, arch="qwen3_moe", model_type="qwen3_moe", seed=seed,
        transformers_version=versions["transformers"], torch_version=versions["torch_full"],
        reference_note="transformers Qwen3MoeForCausalLM in float32 (eager), every layer's gate patched to use "
                       "the Read-ME decoupled router's logits (scripts/make_readme_fixture.py)",
        greedy_steps=mf.GREEDY_STEPS, greedy_method="full recompute, argmax, no EOS stop",
        min_top1_margin=ev["min_top1_margin"], min_router_gap=ev["min_router_gap"], prompts=cases,
    )
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1024:.0f} KiB), seed {seed}")


if __name__ == "__main__":
    main()
