#!/usr/bin/env python3
"""Which texts llama.cpp's own GBNF matcher accepts, for moe-edge's GBNF -> Lark converter test.

runtime/tests/fixtures/gbnf_cases.json lists grammars (llama.cpp's grammars/*.gbnf by file name,
fetched into tests/fixtures/grammars by scripts/fixtures/fetch_llama_cpp_files.sh, or written
inline) with texts; each text maps to whether llama.cpp accepts it. This script runs every text
through llama.cpp's grammar sampler, token by token (the vocabulary is llama.cpp's
ggml-vocab-llama-bpe.gguf; `<[N]>` in a text is token N), and checks the recorded verdicts or,
with --update, rewrites them. runtime/tests/gbnf.rs then checks that llguidance, given the
converted grammar, agrees on every text.

A text is accepted when every token passes the grammar and end of generation is then allowed
(llama.cpp allows it only once the grammar is complete).

    PYTHONPATH=llama_cpp_python-0.3.36 LLAMA_CPP_LIB_PATH=build/bin \\
        python3 scripts/check/gbnf_llamacpp.py [--update]

(the bindings from llama-cpp-python's source package and the libllama built from its vendored
tree, as for scripts/check/llamacpp_parity.py).
"""
import argparse
import ctypes
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CASES = ROOT / "runtime" / "tests" / "fixtures" / "gbnf_cases.json"
GRAMMARS = Path(os.environ.get("MOE_EDGE_GRAMMAR_DIR", ROOT / "tests" / "fixtures" / "grammars"))
VOCAB = Path(os.environ.get("MOE_EDGE_VOCAB_DIR", ROOT / "tests" / "fixtures" / "vocab")) / "ggml-vocab-llama-bpe.gguf"
TOKEN = re.compile(r"<\[(\d+)\]>")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--update", action="store_true", help="rewrite the verdicts instead of checking them")
    args = ap.parse_args()

    import llama_cpp as L

    L.llama_backend_init()
    params = L.llama_model_default_params()
    params.vocab_only = True
    model = L.llama_model_load_from_file(str(VOCAB).encode(), params)
    if not model:
        sys.exit(f"could not load {VOCAB}")
    vocab = L.llama_model_get_vocab(model)
    eos = L.llama_vocab_eos(vocab)

    def tokens(text):
        out = []
        pos = 0
        for m in list(TOKEN.finditer(text)) + [None]:
            piece = text[pos:m.start() if m else len(text)].encode()
            if piece:
                buf = (L.llama_token * (len(piece) + 8))()
                n = L.llama_tokenize(vocab, piece, len(piece), buf, len(buf), False, False)
                out.extend(buf[:n])
            if m:
                out.append(int(m.group(1)))
                pos = m.end()
        return out

    def allowed(smpl, tok):
        data = (L.llama_token_data * 1)(L.llama_token_data(tok, 0.0, 0.0))
        arr = L.llama_token_data_array(data, 1, -1, False)
        L.llama_sampler_apply(smpl, ctypes.byref(arr))
        return data[0].logit != float("-inf")

    doc = json.loads(CASES.read_text())
    mismatches = 0
    for g in doc["grammars"]:
        text = g["gbnf"] if "gbnf" in g else (GRAMMARS / g["file"]).read_text()
        smpl = L.llama_sampler_init_grammar(vocab, text.encode(), b"root")
        if not smpl:
            sys.exit(f"llama.cpp refuses grammar {g.get('file') or g['name']}")
        for case in g["cases"]:
            L.llama_sampler_reset(smpl)
            ok = True
            for t in tokens(case["text"]):
                if not allowed(smpl, t):
                    ok = False
                    break
                L.llama_sampler_accept(smpl, t)
            ok = ok and allowed(smpl, eos)
            if args.update:
                case["accepted"] = ok
            elif case.get("accepted") != ok:
                mismatches += 1
                print(f"{g.get('file') or g['name']}: {case['text']!r}: llama.cpp says {ok}, the fixture {case.get('accepted')}")
        L.llama_sampler_free(smpl)
    if args.update:
        CASES.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {CASES}")
    elif mismatches:
        sys.exit(1)
    else:
        print(f"{sum(len(g['cases']) for g in doc['grammars'])} texts: llama.cpp agrees with the fixture")


if __name__ == "__main__":
    main()
