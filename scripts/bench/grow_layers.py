#!/usr/bin/env python3
"""Grows a converted GGUF to more layers of the same shapes: the full-size rehearsal of #23
without the full-size bf16 checkpoint on disk (Qwen3-30B-A3B: 61 GB bf16 beside a 17 GB
Q4_K_M file does not fit a disk of 80 GB).

The input is what moe-convert wrote for a random-weight checkpoint of the real layer shapes
with one or two layers (`make_bench_checkpoint.py --arch qwen3_30b_a3b --layers 2`). Every
output layer is a copy of an input layer whose routed experts are permuted at random (one
permutation per layer, the same for gate, up and down; the router is not permuted), so that
the layers compute different functions and read different bytes for the same expert index.
With two input layers, output layer i copies input layer 1 where llama-quantize's
`use_more_bits(i, n)` rule holds (first and last eighth and every third layer between: the
layers a Q4_K_M or Q3_K_M mix stores ffn_down and attn_v at a higher type, which moe-convert
applies as llama-quantize does; with n = 2 that is layer 1 only) and layer 0 elsewhere, so
the output has the type mix a conversion of the whole model would have. With one input layer
every output layer copies it.

Header, metadata (with `<arch>.block_count` changed), tensor order and the file's alignment
follow the input, so llama.cpp and moe-run load the output as they load the input. Files with
moe-edge's own metadata (calibration, pruning, per-expert layouts) are refused: their arrays
are per layer.

    python3 scripts/bench/grow_layers.py IN.gguf OUT.gguf --layers 48 [--seed 0]
"""
import argparse
import mmap
import re
import struct
import sys

import numpy as np

# GGUF value types: fixed sizes, 8 = string, 9 = array.
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
FIXED = {t: struct.calcsize("<" + f) for t, f in SCALAR_FORMATS.items()}
# ggml types: (block values, block bytes).
GGML_TYPES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18),
    21: (256, 110), 22: (256, 82), 23: (256, 136), 29: (256, 56), 30: (1, 2), 39: (32, 17),
}
EXPERT_STACKS = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)_exps\.weight$")


class Reader:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt):
        vals = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string(self):
        n = self.take("Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return s

    def skip_value(self, vtype):
        """Skips one value; returns it when it is a scalar (for block_count)."""
        if vtype in FIXED:
            return self.take(SCALAR_FORMATS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            item, n = self.take("I"), self.take("Q")
            if item in FIXED:
                self.pos += n * FIXED[item]
            else:
                for _ in range(n):
                    self.skip_value(item)
            return n
        raise SystemExit(f"unknown GGUF value type {vtype} at byte {self.pos}")


def use_more_bits(i, n):
    """llama-quantize's rule for the layers that get more bits in a _M mix."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_bytes(dims, ggml_type):
    if ggml_type not in GGML_TYPES:
        raise SystemExit(f"ggml type {ggml_type}: not known to this script")
    per_block, block_bytes = GGML_TYPES[ggml_type]
    n = int(np.prod(dims))
    return n // per_block * block_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with open(args.input, "rb") as f:
        src = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    r = Reader(src)
    if bytes(src[:4]) != b"GGUF":
        raise SystemExit(f"{args.input}: not a GGUF file")
    r.pos = 4
    version, n_tensors, n_kv = r.take("I"), r.take("Q"), r.take("Q")
    if version != 3:
        raise SystemExit(f"{args.input}: GGUF version {version}, this script reads version 3")

    # Metadata, kept as raw bytes except block_count.
    kvs, arch, alignment = [], None, 32
    for _ in range(n_kv):
        start = r.pos
        key = r.string()
        vtype = r.take("I")
        value_at = r.pos
        value = r.skip_value(vtype)
        if key.startswith("moe_edge."):
            raise SystemExit(f"{args.input} has moe-edge metadata ({key}): grow a plain conversion")
        if key == "general.architecture":
            arch = value
        if key == "general.alignment":
            alignment = value
        kvs.append((key, vtype, bytes(src[start:r.pos]), value_at - start, value))
    if arch is None:
        raise SystemExit(f"{args.input}: no general.architecture")
    block_key = f"{arch}.block_count"
    n_src = next((v for k, _, _, _, v in kvs if k == block_key), None)
    if n_src not in (1, 2):
        raise SystemExit(f"{args.input}: {block_key} = {n_src}; grow a file of one or two layers")

    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.take("I")
        dims = [r.take("Q") for _ in range(n_dims)]
        ggml_type, offset = r.take("I"), r.take("Q")
        tensors.append((name, dims, ggml_type, offset))
    data_start = (r.pos + alignment - 1) // alignment * alignment

    layer_of = lambda name: int(name.split(".")[1]) if name.startswith("blk.") else None  # noqa: E731
    by_layer = [[t for t in tensors if layer_of(t[0]) == layer] for layer in range(n_src)]
    first_blk = next(i for i, t in enumerate(tensors) if t[0].startswith("blk."))
    head = [t for t in tensors[:first_blk] if not t[0].startswith("blk.")]
    tail = [t for t in tensors[first_blk:] if not t[0].startswith("blk.")]

    rng = np.random.default_rng(args.seed)
    # (output name, dims, type, source offset, expert permutation or None)
    out_tensors = [(n, d, ty, off, None) for n, d, ty, off in head]
    for i in range(args.layers):
        source = 1 if n_src == 2 and use_more_bits(i, args.layers) else 0
        perm = None
        for name, dims, ggml_type, offset in by_layer[source]:
            out_name = f"blk.{i}." + name.split(".", 2)[2]
            expert_perm = None
            if EXPERT_STACKS.match(name):
                if perm is None:
                    perm = rng.permutation(dims[-1]) if i >= n_src else np.arange(dims[-1])
                expert_perm = perm
            out_tensors.append((out_name, dims, ggml_type, offset, expert_perm))
    out_tensors += [(n, d, ty, off, None) for n, d, ty, off in tail]

    # The output's header.
    header = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(out_tensors), len(kvs)))
    for key, vtype, raw, value_at, _ in kvs:
        if key == block_key:
            raw = raw[:value_at] + struct.pack("<" + SCALAR_FORMATS[vtype], args.layers)
        header += raw
    offsets, at = [], 0
    for name, dims, ggml_type, _, _ in out_tensors:
        offsets.append(at)
        at += (tensor_bytes(dims, ggml_type) + alignment - 1) // alignment * alignment
    for (name, dims, ggml_type, _, _), offset in zip(out_tensors, offsets):
        enc = name.encode()
        header += struct.pack("<Q", len(enc)) + enc + struct.pack("<I", len(dims))
        header += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ggml_type, offset)
    header += b"\0" * (-len(header) % alignment)

    with open(args.output, "wb") as out:
        out.write(header)
        for (name, dims, ggml_type, src_offset, perm), offset in zip(out_tensors, offsets):
            nbytes = tensor_bytes(dims, ggml_type)
            base = data_start + src_offset
            if perm is None:
                out.write(src[base:base + nbytes])
            else:
                per_expert = nbytes // dims[-1]
                for e in perm:
                    out.write(src[base + e * per_expert:base + (e + 1) * per_expert])
            out.write(b"\0" * (-nbytes % alignment))
        size = out.tell()
    print(f"{args.output}: {args.layers} layers from {n_src}, {len(out_tensors)} tensors, "
          f"{size / 2**30:.2f} GiB", file=sys.stderr)


if __name__ == "__main__":
    main()
