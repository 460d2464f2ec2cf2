#!/usr/bin/env python3
"""Compares two importance-matrix files in llama.cpp's GGUF format (`llama-imatrix -o`, or
`moe-convert --calib TEXT --imatrix-out`): the same tensors, equal counts, and sums within a
relative tolerance (the two runtimes' activations differ by float rounding).

    python3 scripts/check/compare_imatrix.py ours.imatrix.gguf llama.imatrix.gguf [--rtol 1e-4]

Prints the chunk keys of both, per tensor the largest relative difference of its sums (against
the tensor's largest sum), and a summary; exit 1 when a tensor is missing, a count differs or
a sum is out of tolerance.
"""
import sys

import numpy as np
from gguf import GGUFReader


def load(path: str):
    r = GGUFReader(path)
    keys = {}
    for k in ("imatrix.chunk_count", "imatrix.chunk_size"):
        f = r.fields.get(k)
        keys[k] = int(f.parts[f.data[0]][0]) if f else None
    sums, counts = {}, {}
    for t in r.tensors:
        a = np.asarray(t.data, dtype=np.float32)
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = a.reshape(-1, int(t.shape[0]))
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = a.reshape(-1)
    return keys, sums, counts


def main() -> int:
    args = sys.argv[1:]
    rtol = 1e-4
    if "--rtol" in args:
        i = args.index("--rtol")
        rtol = float(args[i + 1])
        del args[i:i + 2]
    (ka, sa, ca), (kb, sb, cb) = load(args[0]), load(args[1])
    print(f"ours: {ka}\ntheirs: {kb}")
    bad = 0
    worst = 0.0
    for name in sorted(set(sa) | set(sb)):
        if name not in sa or name not in sb:
            print(f"{name}: only in {'theirs' if name not in sa else 'ours'}")
            bad += 1
            continue
        a, b = sa[name], sb[name]
        if a.shape != b.shape:
            print(f"{name}: shapes {a.shape} and {b.shape}")
            bad += 1
            continue
        if not np.array_equal(ca[name], cb[name]):
            diff = np.nonzero(ca[name] != cb[name])[0]
            print(f"{name}: counts differ at {diff.tolist()}: {ca[name][diff]} vs {cb[name][diff]}")
            bad += 1
        # Relative to each matrix's (expert's) largest sum.
        scale = np.maximum(np.abs(b).max(axis=1, keepdims=True), 1e-30)
        rel = float((np.abs(a - b) / scale).max())
        worst = max(worst, rel)
        flag = "" if rel <= rtol else "  OUT OF TOLERANCE"
        bad += rel > rtol
        print(f"{name}: {a.shape[0]} x {a.shape[1]}, counts {int(ca[name].sum())}, max rel diff {rel:.3g}{flag}")
    print(f"{len(sa)} tensors; worst relative difference {worst:.3g}; {bad} problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
