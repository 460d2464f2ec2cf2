#!/usr/bin/env python3
"""Distil a pre-gating router (Read-ME style) from a MoE model's routing traces, export it as ONNX.

The predictor is a small causal network over token ids, decoupled from the backbone: after token
t+1 is known (sampled, or read from the prompt) it predicts, for every MoE layer, which experts
the model's own router will pick for token t+1, so the runtime can fetch them before the
backbone runs. The model's routers still decide the output; a wrong guess costs only time.

Architecture (chosen for a tiny per-token cost and O(1) decode state):

    e_t   = Embedding[token_t]                 [De]  initialised from the PCA of the model's
                                                     token embedding (top De components)
    h_t   = GRU(e_t, h_{t-1})                  [H]   one layer, h_{-1} = 0 at a sequence start
    out_t = W [h_t ; e_t] + b                  [L * E] one logit per (MoE layer, expert)

Training: multi-label BCE against each layer's top-k experts, on windows of the traces of the
training text (`moe-run trace`, windows from an empty state like the trace itself).
Evaluation on the held-out trace: per-layer precision/recall of the top-k predicted experts,
next to a frequency baseline (each layer's k most used experts in the training trace) and the
previous token's experts.

Export: one decode step as an ONNX graph (written with onnx.helper, only Gather/MatMul/Add/
Sigmoid/Tanh/Mul/Sub/Concat, so tract runs it without surprises):

    inputs  token int64 [1], h float32 [1, H]
    outputs logits float32 [1, L * E] (layer-major), h_next float32 [1, H]

Metadata props: moe_edge.layers (comma-separated MoE layer indices), moe_edge.n_expert,
moe_edge.top_k, moe_edge.hidden. A fixture (token ids and PyTorch's logits for them) lets the
runtime test that tract reproduces PyTorch.

    moe-run trace -m M.gguf --text train.txt -o /tmp/pregate/train --no-probs
    moe-run trace -m M.gguf --text eval.txt -o /tmp/pregate/eval
    python3 scripts/train/train_pregate.py --train /tmp/pregate/train --eval /tmp/pregate/eval \
        --hf models/small-moe/hf --onnx models/small-moe/small-moe-q8_0.pregate.onnx \
        --fixture runtime/tests/fixtures/pregate --report /tmp/pregate/report.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn


def load_trace(prefix: str):
    meta = json.loads(Path(prefix + ".json").read_text())
    tokens = np.load(prefix + ".tokens.npy").astype(np.int64)
    experts = np.load(prefix + ".experts.npy").astype(np.int64)
    return meta, tokens, experts


def multi_hot(experts: np.ndarray, n_expert: int) -> np.ndarray:
    """[n, L, k] expert ids -> [n, L, E] 0/1 float32."""
    n, L, _ = experts.shape
    y = np.zeros((n, L, n_expert), dtype=np.float32)
    np.put_along_axis(y, experts, 1.0, axis=2)
    return y


class PreGate(nn.Module):
    def __init__(self, vocab: int, d_emb: int, hidden: int, n_layers: int, n_expert: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, d_emb)
        self.gru = nn.GRU(d_emb, hidden, batch_first=True)
        self.head = nn.Linear(hidden + d_emb, n_layers * n_expert)
        self.n_layers, self.n_expert = n_layers, n_expert

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, L, E]."""
        e = self.emb(tokens)
        h, _ = self.gru(e)
        out = self.head(torch.cat([h, e], dim=-1))
        return out.view(*tokens.shape, self.n_layers, self.n_expert)


def pca_embedding(hf_dir: Path, d_emb: int) -> torch.Tensor:
    """The model's token embedding projected on its top d_emb principal components, scaled to
    unit variance per component (a well-conditioned start for the trainable embedding)."""
    from safetensors import safe_open

    idx = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.embed_tokens.weight"
    with safe_open(str(hf_dir / idx[name]), framework="pt") as f:
        w = f.get_tensor(name).float()
    w = w - w.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(w, full_matrices=False)
    z = w @ v[:d_emb].T
    return z / z.std(0, keepdim=True)


def windows(tokens: np.ndarray, y: np.ndarray, window: int):
    """Full windows as the trace ran them (state reset at each window start)."""
    n = (len(tokens) // window) * window
    return (torch.from_numpy(tokens[:n].reshape(-1, window)),
            torch.from_numpy(y[:n].reshape(-1, window, *y.shape[1:])))


def topk_sets(scores: np.ndarray, k: int) -> np.ndarray:
    """[n, L, E] scores -> [n, L, E] bool mask of the k best per (token, layer)."""
    idx = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    m = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(m, idx, True, axis=-1)
    return m


def per_layer_pr(pred: np.ndarray, actual: np.ndarray) -> list[dict]:
    """pred, actual [n, L, E] bool -> per layer precision and recall."""
    out = []
    for l in range(pred.shape[1]):
        p, a = pred[:, l], actual[:, l]
        c = (p & a).sum()
        out.append({"precision": float(c / max(p.sum(), 1)), "recall": float(c / max(a.sum(), 1))})
    return out


@torch.no_grad()
def predict_all(model: PreGate, tokens: np.ndarray, window: int) -> np.ndarray:
    """Logits [n, L, E] over a trace, state reset at each window start (as traced)."""
    outs = []
    for s in range(0, len(tokens), window):
        t = torch.from_numpy(tokens[s:s + window])[None]
        outs.append(model(t)[0].numpy())
    return np.concatenate(outs)


def model_weights(model: PreGate) -> dict:
    g = model.gru
    return {"emb": model.emb.weight, "W_ih": g.weight_ih_l0, "W_hh": g.weight_hh_l0,
            "b_ih": g.bias_ih_l0, "b_hh": g.bias_hh_l0, "head_w": model.head.weight,
            "head_b": model.head.bias}


def onnx_weights(path: Path) -> dict:
    """The weights of an exported predictor, back in PyTorch's layout (for re-exporting)."""
    import onnx
    from onnx import numpy_helper

    init = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    if "W_ih_T" in init:  # first export format, one [., 3H] matrix per input
        return {"emb": init["emb"], "W_ih": init["W_ih_T"].T, "W_hh": init["W_hh_T"].T,
                "b_ih": init["b_ih"], "b_hh": init["b_hh"], "head_w": init["head_T"].T,
                "head_b": init["head_b"]}
    cat = lambda p: np.concatenate([init[f"{p}_{g}"] for g in "rzn"], axis=1).T
    return {"emb": init["emb"], "W_ih": cat("Wi"), "W_hh": cat("Wh"),
            "b_ih": np.concatenate([init[f"bi_{g}"] for g in "rzn"]),
            "b_hh": np.concatenate([init[f"bh_{g}"] for g in "rzn"]),
            "head_w": init["head_T"].T, "head_b": init["head_b"]}


def export_onnx(w: dict, path: Path, layers: list[int], n_expert: int, top_k: int) -> None:
    """One decode step as ONNX, each GRU gate with its own matrices (plain MatMul/Add, no
    Split)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = {k: (v.detach().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)).astype(np.float32)
         for k, v in w.items()}
    H = w["W_hh"].shape[1]
    inits = {"emb": w["emb"], "head_T": w["head_w"].T, "head_b": w["head_b"]}
    for i, g in enumerate("rzn"):  # PyTorch's gate order in the fused weights: r, z, n
        inits[f"Wi_{g}"] = w["W_ih"][i * H:(i + 1) * H].T
        inits[f"Wh_{g}"] = w["W_hh"][i * H:(i + 1) * H].T
        inits[f"bi_{g}"] = w["b_ih"][i * H:(i + 1) * H]
        inits[f"bh_{g}"] = w["b_hh"][i * H:(i + 1) * H]
    N = helper.make_node
    nodes = [N("Gather", ["emb", "token"], ["e"], axis=0)]  # [1, De]
    for g in "rzn":
        nodes += [N("MatMul", ["e", f"Wi_{g}"], [f"ei_{g}"]), N("Add", [f"ei_{g}", f"bi_{g}"], [f"i_{g}"]),
                  N("MatMul", ["h", f"Wh_{g}"], [f"hh_{g}"]), N("Add", [f"hh_{g}", f"bh_{g}"], [f"h_{g}"])]
    nodes += [
        N("Add", ["i_r", "h_r"], ["r0"]), N("Sigmoid", ["r0"], ["r"]),
        N("Add", ["i_z", "h_z"], ["z0"]), N("Sigmoid", ["z0"], ["z"]),
        N("Mul", ["r", "h_n"], ["rn"]), N("Add", ["i_n", "rn"], ["n0"]), N("Tanh", ["n0"], ["n"]),
        # h' = (1 - z) * n + z * h, written n + z * (h - n): tract 0.21.10's optimiser fuses
        # `(one - z) * n` wrongly (a broadcast constant), this form it runs exactly.
        N("Sub", ["h", "n"], ["hmn"]), N("Mul", ["z", "hmn"], ["zd"]), N("Add", ["n", "zd"], ["h_next"]),
        N("Concat", ["h_next", "e"], ["he"], axis=1),                       # [1, H + De]
        N("MatMul", ["he", "head_T"], ["l0"]), N("Add", ["l0", "head_b"], ["logits"]),
    ]
    L = len(layers)
    graph = helper.make_graph(
        nodes, "pregate_step",
        [helper.make_tensor_value_info("token", TensorProto.INT64, [1]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, H])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, L * n_expert]),
         helper.make_tensor_value_info("h_next", TensorProto.FLOAT, [1, H])],
        [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in inits.items()],
    )
    m = helper.make_model(graph, producer_name="moe-edge train_pregate.py",
                          opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    for k, v in {"moe_edge.layers": ",".join(map(str, layers)), "moe_edge.n_expert": str(n_expert),
                 "moe_edge.top_k": str(top_k), "moe_edge.hidden": str(H),
                 "moe_edge.embedding": str(w["emb"].shape[1])}.items():
        m.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(m)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(path))


def numpy_step_check(model: PreGate, tokens: np.ndarray) -> float:
    """Max |difference| between the exported step formula (numpy) and nn.GRU on `tokens`."""
    g = model.gru
    W_ih, W_hh = g.weight_ih_l0.detach().numpy(), g.weight_hh_l0.detach().numpy()
    b_ih, b_hh = g.bias_ih_l0.detach().numpy(), g.bias_hh_l0.detach().numpy()
    emb = model.emb.weight.detach().numpy()
    hw, hb = model.head.weight.detach().numpy(), model.head.bias.detach().numpy()
    H = g.hidden_size
    h = np.zeros(H, np.float32)
    sig = lambda x: 1 / (1 + np.exp(-x))
    outs = []
    for t in tokens:
        e = emb[t]
        gi, gh = W_ih @ e + b_ih, W_hh @ h + b_hh
        r, z = sig(gi[:H] + gh[:H]), sig(gi[H:2 * H] + gh[H:2 * H])
        n = np.tanh(gi[2 * H:] + r * gh[2 * H:])
        h = (1 - z) * n + z * h
        outs.append(hw @ np.concatenate([h, e]) + hb)
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens)[None])[0].reshape(len(tokens), -1).numpy()
    return float(np.abs(np.stack(outs) - ref).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, help="trace prefix of the training text")
    ap.add_argument("--eval", required=True, help="trace prefix of the held-out text")
    ap.add_argument("--hf", type=Path, required=True, help="HF checkpoint (for the embedding)")
    ap.add_argument("--onnx", type=Path, required=True)
    ap.add_argument("--fixture", type=Path, help="folder for the tract-vs-PyTorch test fixture")
    ap.add_argument("--report", type=Path)
    ap.add_argument("--d-emb", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reexport", type=Path, help="only rewrite --onnx from this exported predictor's weights")
    args = ap.parse_args()
    if args.reexport:
        import onnx
        props = {p.key: p.value for p in onnx.load(str(args.reexport)).metadata_props}
        export_onnx(onnx_weights(args.reexport), args.onnx, [int(x) for x in props["moe_edge.layers"].split(",")],
                    int(props["moe_edge.n_expert"]), int(props["moe_edge.top_k"]))
        print(f"re-exported {args.reexport} -> {args.onnx}")
        return
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    meta, tr_tok, tr_exp = load_trace(args.train)
    emeta, ev_tok, ev_exp = load_trace(args.eval)
    L, E, K, window = len(meta["moe_layers"]), meta["n_expert"], meta["n_expert_used"], meta["window"]
    assert emeta["moe_layers"] == meta["moe_layers"] and emeta["window"] == window
    tr_y, ev_y = multi_hot(tr_exp, E), multi_hot(ev_exp, E)
    X, Y = windows(tr_tok, tr_y, window)
    print(f"train: {len(tr_tok)} tokens, {len(X)} windows of {window}; eval {len(ev_tok)} tokens; "
          f"{L} MoE layers, {E} experts, top-{K}", flush=True)

    vocab = 4096
    emb0 = pca_embedding(args.hf, args.d_emb)
    vocab = emb0.shape[0]
    model = PreGate(vocab, args.d_emb, args.hidden, L, E)
    with torch.no_grad():
        model.emb.weight.copy_(emb0)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    steps = args.epochs * ((len(X) + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.05)
    lossf = nn.BCEWithLogitsLoss()
    ev_actual = ev_y.astype(bool)
    history = []
    t0 = time.time()
    for ep in range(args.epochs):
        model.train()
        perm = torch.randperm(len(X))
        tot = 0.0
        for i in range(0, len(X), args.batch):
            b = perm[i:i + args.batch]
            loss = lossf(model(X[b]), Y[b])
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            tot += loss.item() * len(b)
        model.eval()
        pr = per_layer_pr(topk_sets(predict_all(model, ev_tok, window), K), ev_actual)
        mean_p = float(np.mean([p["precision"] for p in pr]))
        history.append({"epoch": ep + 1, "train_bce": tot / len(X), "eval_precision": mean_p,
                        "seconds": time.time() - t0})
        print(f"epoch {ep + 1}: train BCE {tot / len(X):.4f}, held-out top-{K} precision {mean_p:.3f} "
              f"({time.time() - t0:.0f} s)", flush=True)

    model.eval()
    scores = predict_all(model, ev_tok, window)
    pregate = per_layer_pr(topk_sets(scores, K), ev_actual)
    # Frequency baseline: each layer's K most used experts in the training trace.
    freq = tr_y.sum(0)  # [L, E]
    freq_pred = np.broadcast_to(topk_sets(freq[None], K), ev_actual.shape)
    frequency = per_layer_pr(freq_pred, ev_actual)
    # Previous token's experts (same layer).
    prev = np.concatenate([np.zeros_like(ev_actual[:1]), ev_actual[:-1]])
    previous = per_layer_pr(prev, ev_actual)
    # Recall when predicting more than K experts (prefetch budget trade-off).
    wider = {k2: per_layer_pr(topk_sets(scores, k2), ev_actual) for k2 in (K + 2, 2 * K)}

    export_onnx(model_weights(model), args.onnx, meta["moe_layers"], E, K)
    torch.save(model.state_dict(), args.onnx.with_suffix(".pt"))
    size = args.onnx.stat().st_size
    rng = np.random.default_rng(args.seed)
    fx_tokens = ev_tok[:24].copy()
    fx_tokens[-4:] = rng.integers(0, vocab, 4)  # also arbitrary ids, not only text
    step_err = numpy_step_check(model, fx_tokens)
    print(f"exported {args.onnx} ({size / 1024:.0f} KiB, {n_params:,} parameters); numpy step vs "
          f"nn.GRU max |diff| {step_err:.2e}", flush=True)
    assert step_err < 1e-4, step_err
    if args.fixture:
        args.fixture.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            ref = model(torch.from_numpy(fx_tokens)[None])[0].reshape(len(fx_tokens), -1).numpy()
        # 2-D float32 .npy (what the runtime's reader takes): ids as floats are exact below 2^24.
        np.save(args.fixture / "tokens.npy", fx_tokens.astype(np.float32)[None])
        np.save(args.fixture / "expected_logits.npy", ref.astype(np.float32))

    report = {"params": n_params, "onnx_bytes": size, "d_emb": args.d_emb, "hidden": args.hidden,
              "epochs": args.epochs, "history": history, "layers": meta["moe_layers"], "top_k": K,
              "train_tokens": int(len(tr_tok)), "eval_tokens": int(len(ev_tok)),
              "per_layer": {"pregate": pregate, "frequency": frequency, "previous_token": previous,
                            **{f"pregate_top{k2}": v for k2, v in wider.items()}}}
    if args.report:
        args.report.write_text(json.dumps(report, indent=1))
    print("layer | pregate P/R | frequency P/R | previous-token P/R | " +
          " | ".join(f"pregate top-{k2} P/R" for k2 in wider))
    for l in range(L):
        row = [pregate[l], frequency[l], previous[l]] + [wider[k2][l] for k2 in wider]
        print(f"{meta['moe_layers'][l]} | " + " | ".join(f"{r['precision']:.3f}/{r['recall']:.3f}" for r in row))


if __name__ == "__main__":
    main()
