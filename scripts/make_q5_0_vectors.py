#!/usr/bin/env python3
"""Q5_0 test vectors from gguf-py (llama.cpp's Python reference of its block formats): the
runtime only decodes Q5_0 (llama.cpp's k-quant files use it for tensors whose rows are not whole
256-value blocks), and its unit test checks the decoding against these bytes and values.

    python3 scripts/make_q5_0_vectors.py   # writes runtime/tests/fixtures/q5_0/
"""
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

out = Path(__file__).resolve().parent.parent / "runtime/tests/fixtures/q5_0"
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(5)
rows = [
    rng.standard_normal(64),
    rng.standard_normal(64) * 1e-3,                 # small scales
    np.linspace(-3.0, 3.0, 64),                     # every 5-bit level, both extremes
    np.where(np.arange(64) % 2 == 0, 5.0, -5.0),    # alternating signs at the block maximum
]
x = np.stack(rows).astype(np.float32)
q = quants.quantize(x, T.Q5_0)
d = quants.dequantize(q, T.Q5_0).astype("<f4")
(out / "blocks.bin").write_bytes(q.tobytes())
(out / "values.f32").write_bytes(d.tobytes())
print(f"{x.shape[0]} rows of {x.shape[1]}: {q.nbytes} bytes of Q5_0, max |x - dequant| {np.abs(x - d).max():.3g}")
