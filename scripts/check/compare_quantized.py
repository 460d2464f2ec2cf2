#!/usr/bin/env python3
"""Compares a moe-convert k-quant file with llama-quantize's from the same checkpoint, tensor by
tensor: the type of each and whether the bytes are identical (tensors in either order).

    moe-convert HF -o m-f32.gguf --type f32
    llama-quantize m-f32.gguf llq.gguf Q4_K_M        # then: compare_quantized.py --fix-alignment llq.gguf
    moe-convert HF -o ours.gguf --type q4_k_m
    python3 scripts/check/compare_quantized.py ours.gguf llq.gguf [--types-out types.tsv]

`--fix-alignment FILE` sets FILE's `general.alignment` to 32 in place: llama-quantize copies the
key from its (page-aligned) source but writes the data at its default alignment of 32.
`--types-out` writes llama-quantize's type per tensor (`name<TAB>type`, sorted);
`--hashes-out` its type and the FNV-1a 64 hash of its bytes (`name<TAB>type<TAB>hash`), the
fixtures convert/tests/llama_mixes.rs reads. Exit 1 when a type differs.
"""
import sys

import numpy as np
from gguf import GGUFReader


def fix_alignment(path: str) -> None:
    # Patched in the raw header: gguf-py cannot open the file while the key is wrong.
    import struct
    key = b"general.alignment"
    with open(path, "r+b") as fh:
        head = fh.read(1 << 20)
        at = head.find(struct.pack("<Q", len(key)) + key)
        if at < 0:
            return
        at += 8 + len(key)
        ty, = struct.unpack_from("<I", head, at)
        assert ty == 4, "general.alignment is a u32"
        fh.seek(at + 4)
        fh.write(struct.pack("<I", 32))


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def tensors(path: str) -> dict:
    r = GGUFReader(path)
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in r.tensors}


def main() -> int:
    args = sys.argv[1:]
    if args and args[0] == "--fix-alignment":
        fix_alignment(args[1])
        return 0
    types_out = hashes_out = None
    if "--types-out" in args:
        i = args.index("--types-out")
        types_out = args[i + 1]
        del args[i:i + 2]
    if "--hashes-out" in args:
        i = args.index("--hashes-out")
        hashes_out = args[i + 1]
        del args[i:i + 2]
    ours, theirs = tensors(args[0]), tensors(args[1])
    bad_types = 0
    same_bytes = 0
    for name in sorted(set(ours) | set(theirs)):
        a, b = ours.get(name), theirs.get(name)
        if a is None or b is None:
            print(f"{name}: only in {'theirs' if a is None else 'ours'}")
            bad_types += 1
            continue
        if a[0] != b[0]:
            bad_types += 1
            print(f"{name}: ours {a[0]}, llama-quantize {b[0]}")
        elif a[1] != b[1]:
            n = sum(x != y for x, y in zip(a[1], b[1]))
            print(f"{name}: {a[0]}, {n} of {len(a[1])} bytes differ")
        else:
            same_bytes += 1
    print(f"{len(theirs)} tensors: {len(theirs) - bad_types} of the same type, "
          f"{same_bytes} byte-identical")
    if types_out:
        with open(types_out, "w") as fh:
            for name in sorted(theirs):
                fh.write(f"{name}\t{theirs[name][0].lower()}\n")
    if hashes_out:
        with open(hashes_out, "w") as fh:
            for name in sorted(theirs):
                fh.write(f"{name}\t{theirs[name][0].lower()}\t{fnv1a64(theirs[name][1]):016x}\n")
    return 1 if bad_types else 0


if __name__ == "__main__":
    sys.exit(main())
