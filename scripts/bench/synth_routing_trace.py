#!/usr/bin/env python3
"""Synthesises a routing trace for a model shape from a trained model's recorded trace, for
`moe-run --route-replay` on random-weight full-size files (#23's rehearsal).

A random-weight checkpoint routes almost uniformly, with no stickiness: streaming it says
nothing about a trained model. This script writes a trace of the target shape (`--layers`,
`--experts`, `--top-k`) whose routing has the recorded model's statistics, by construction:

- each target layer l follows one recorded layer (l mod L_src) at a token offset of its own
  (so repeated layers do not move in lockstep);
- each recorded expert owns a fixed group of target experts (a per-layer permutation, group
  sizes differing by at most one), and a token that used recorded expert e uses top_k / k_src
  members of e's group, the same members for as long as e stays in use (re-drawn when e comes
  back after a pause).

So skew (how much the most used experts carry), stickiness (how many of a token's experts
the previous token used) and co-activation (which experts are used together) carry over at
the group level; what cannot carry over is said by the table this script prints: the same
statistics for the recorded and the synthetic trace.

    moe-run trace -m models/small-moe/small-moe-q8_0.gguf --text TEXT -o /tmp/small --no-probs
    python3 scripts/bench/synth_routing_trace.py /tmp/small OUT --layers 16 --experts 64 --top-k 8

writes OUT.experts.npy (int32 [tokens, layers, top_k]) and OUT.json; `moe-run --route-replay
OUT` replays it.
"""
import argparse
import json

import numpy as np


def stats(tr, n_expert):
    """Per-trace statistics, averaged over layers: share of uses by the top 10% / 25% of
    experts, reuse (|S_t & S_t-1| / k), mean lift of the 10 most frequent expert pairs
    (P(i and j) / P(i) P(j)), and distinct experts per 32 consecutive tokens (share of E)."""
    n, L, k = tr.shape
    top10, top25, reuse, lift, window = [], [], [], [], []
    for l in range(L):
        x = tr[:, l, :]
        onehot = np.zeros((n, n_expert), np.float32)
        np.put_along_axis(onehot, x.astype(np.int64), 1.0, axis=1)
        f = np.sort(onehot.sum(0))[::-1] / (n * k)
        top10.append(f[: max(1, round(0.10 * n_expert))].sum())
        top25.append(f[: max(1, round(0.25 * n_expert))].sum())
        reuse.append((onehot[1:] * onehot[:-1]).sum(1).mean() / k)
        p = onehot.mean(0)
        pair = onehot.T @ onehot / n
        np.fill_diagonal(pair, 0)
        iu = np.triu_indices(n_expert, 1)
        best = np.argsort(pair[iu])[::-1][:10]
        i, j = iu[0][best], iu[1][best]
        lift.append(float(np.mean(pair[i, j] / (p[i] * p[j]))))
        w = [len(np.unique(x[t:t + 32])) / n_expert for t in range(0, n - 32, 32)]
        window.append(np.mean(w) if w else float("nan"))
    return dict(top10=float(np.mean(top10)), top25=float(np.mean(top25)), reuse=float(np.mean(reuse)),
                pair_lift=float(np.mean(lift)), distinct_per_32=float(np.mean(window)))


def groups_of(n_src, n_tgt, rng):
    """A random partition of the target experts into n_src groups of near-equal size."""
    perm = rng.permutation(n_tgt)
    sizes = [n_tgt // n_src + (1 if g < n_tgt % n_src else 0) for g in range(n_src)]
    out, at = [], 0
    for s in rng.permutation(sizes):
        out.append(perm[at:at + s])
        at += s
    return out


def synthesise(src, n_src_expert, layers, experts, top_k, seed):
    n, L_src, k_src = src.shape
    if experts < n_src_expert or top_k % k_src:
        raise SystemExit(f"target {experts} experts top-{top_k} must have at least the recorded "
                         f"{n_src_expert} experts and a multiple of its top-{k_src}")
    per = top_k // k_src
    if experts // n_src_expert < per:
        raise SystemExit(f"groups of {experts // n_src_expert} target experts cannot give {per} per recorded expert")
    rng = np.random.default_rng(seed)
    out = np.zeros((n, layers, top_k), np.int32)
    for l in range(layers):
        sl = l % L_src
        offset = (l // L_src) * 997 % n
        groups = groups_of(n_src_expert, experts, rng)
        members = {}  # recorded expert -> its chosen members while in use
        prev = set()
        for t in range(n):
            cur = src[(t + offset) % n, sl]
            row = []
            for e in cur:
                e = int(e)
                if e not in prev or e not in members:
                    members[e] = rng.choice(groups[e], per, replace=False)
                row.extend(int(m) for m in members[e])
            out[t, l] = row
            prev = set(int(e) for e in cur)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recorded", help="PREFIX of a `moe-run trace` output (PREFIX.experts.npy, PREFIX.json)")
    ap.add_argument("out", help="output PREFIX")
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--experts", type=int, required=True)
    ap.add_argument("--top-k", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    src = np.load(args.recorded + ".experts.npy")
    with open(args.recorded + ".json") as f:
        meta = json.load(f)
    n_src_expert = int(meta["n_expert"])
    out = synthesise(src, n_src_expert, args.layers, args.experts, args.top_k, args.seed)
    np.save(args.out + ".experts.npy", out)
    a, b = stats(src, n_src_expert), stats(out, args.experts)
    with open(args.out + ".json", "w") as f:
        json.dump({"synthesised_from": args.recorded, "recorded_model": meta.get("model"),
                   "tokens": int(out.shape[0]), "layers": args.layers, "experts": args.experts,
                   "top_k": args.top_k, "seed": args.seed, "recorded_stats": a, "synthetic_stats": b},
                  f, indent=1)
    print(f"wrote {args.out}.experts.npy: {out.shape[0]} tokens x {args.layers} layers x top-{args.top_k} of {args.experts}")
    print("| trace | top 10% experts' share of uses | top 25% | reuse from previous token | lift of top 10 pairs | distinct experts per 32 tokens (share) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, s in (("recorded", a), ("synthetic", b)):
        print(f"| {name} | {s['top10']:.3f} | {s['top25']:.3f} | {s['reuse']:.3f} | {s['pair_lift']:.2f} | {s['distinct_per_32']:.3f} |")


if __name__ == "__main__":
    main()
