#!/usr/bin/env python3
"""A pre-gating router that is NOT the GRU of train_pregate.py (the native predictor must refuse
it; tract, with `--features pregate`, runs it): logits = emb[token] W + b, h passed through.
Metadata for models/small-moe (6 MoE layers, 24 experts, top-4). Writes
runtime/tests/fixtures/pregate/foreign.onnx (~35 KB).

    python3 scripts/make_foreign_pregate.py
"""
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB, D, H, L, E = 4096, 2, 4, 6, 24
rng = np.random.default_rng(7)
# A 2-wide embedding of 8 distinct rows repeated over the vocabulary.
emb = np.tile(rng.standard_normal((8, D)).astype(np.float32), (VOCAB // 8, 1))
inits = {"emb": emb, "W": rng.standard_normal((D, L * E)).astype(np.float32),
         "b": rng.standard_normal(L * E).astype(np.float32)}
N = helper.make_node
nodes = [N("Gather", ["emb", "token"], ["e"], axis=0), N("MatMul", ["e", "W"], ["l0"]),
         N("Add", ["l0", "b"], ["logits"]), N("Identity", ["h"], ["h_next"])]
graph = helper.make_graph(
    nodes, "foreign_pregate",
    [helper.make_tensor_value_info("token", TensorProto.INT64, [1]),
     helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, H])],
    [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, L * E]),
     helper.make_tensor_value_info("h_next", TensorProto.FLOAT, [1, H])],
    [numpy_helper.from_array(v, k) for k, v in inits.items()],
)
m = helper.make_model(graph, producer_name="moe-edge make_foreign_pregate.py",
                      opset_imports=[helper.make_opsetid("", 13)])
m.ir_version = 8
for k, v in {"moe_edge.layers": "0,1,2,3,4,5", "moe_edge.n_expert": str(E), "moe_edge.top_k": "4",
             "moe_edge.hidden": str(H)}.items():
    m.metadata_props.add(key=k, value=v)
onnx.checker.check_model(m)
out = Path(__file__).resolve().parent.parent / "runtime/tests/fixtures/pregate/foreign.onnx"
onnx.save(m, str(out))
print(f"wrote {out} ({out.stat().st_size} bytes)")
