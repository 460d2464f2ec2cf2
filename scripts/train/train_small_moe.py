#!/usr/bin/env python3
"""Train the small Qwen3-MoE model shipped in models/small-moe/ (and a dense baseline), on CPU.

Everything comes from package registries, nothing from a model or data hub:

* corpus: Jane Austen's six novels (Debian package `r-cran-janeaustenr`) and Herman Melville's
  "Moby Dick" (Debian package `r-cran-tokenizers`, its `mobydick` data set). Both packages are
  MIT-licensed R packages; the texts are Project Gutenberg transcriptions of public-domain books.
  The .deb files are fetched with `apt-get download` (no installation, R is not needed): the R
  lazy-load databases inside are decoded by the small R-serialization reader below.
* a byte-level BPE tokenizer (vocab 4096, `tokenizers`), trained on the training split;
* `transformers.Qwen3MoeForCausalLM` (fine-grained experts, router aux loss) and a dense
  `Qwen3ForCausalLM` with the same active parameter count, trained with the same recipe and
  token budget.

Stages (default: all, in this order):

  corpus     fetch the two .deb files, extract and clean the books, split train / held-out (5%)
  tokenizer  train the BPE tokenizer on the training split
  train      train the MoE (`--arch moe`) and the dense model (`--arch dense`), or both
  export     write the HF checkpoint (bf16) + tokenizer files to models/small-moe/hf, verify the
             Hub tensor layout and that AutoModelForCausalLM reloads it
  reference  float32 (eager) reference logits + greedy ids for the parity test (tests/trained.rs)
  report     held-out perplexities, routing statistics, sample generations -> REPORT.md, report.json
  convert    moe-convert to Q8_0 and a moe-run sample (needs the Rust binaries, see --bin-dir)

Usage (2 cores, ~1 h in total):

  pip install -r scripts/train/requirements-train.txt
  apt-get update    # apt-get download needs the package lists
  nice -n 10 python3 scripts/train/train_small_moe.py            # all stages
  nice -n 10 python3 scripts/train/train_small_moe.py --stage report

Reproducibility: fixed seeds, a fixed number of optimizer steps, torch.set_num_threads(2)
(float results can differ in the last bits on another CPU or thread count).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import hashlib
import json
import math
import os
import random
import re
import shlex
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

# OpenMP threads that spin-wait collapse when the 2 cores are shared with other work.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "models" / "small-moe"
DEFAULT_WORK = Path(os.environ.get("MOE_TRAIN_WORK", "/tmp/moe-edge-small-moe"))

SEED = 1234
THREADS = int(os.environ.get("TRAIN_THREADS", "2"))  # the committed model: 1 (MoE and dense ran side by side)

# ---- corpus
DEBS = {
    "r-cran-janeaustenr": "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx",
    "r-cran-tokenizers": "usr/lib/R/site-library/tokenizers/data/Rdata.rdx",
}
BOOKS = [  # (package, R object, title)
    ("r-cran-janeaustenr", "sensesensibility", "Sense and Sensibility (Jane Austen, 1811)"),
    ("r-cran-janeaustenr", "prideprejudice", "Pride and Prejudice (Jane Austen, 1813)"),
    ("r-cran-janeaustenr", "mansfieldpark", "Mansfield Park (Jane Austen, 1814)"),
    ("r-cran-janeaustenr", "emma", "Emma (Jane Austen, 1815)"),
    ("r-cran-janeaustenr", "northangerabbey", "Northanger Abbey (Jane Austen, 1817)"),
    ("r-cran-janeaustenr", "persuasion", "Persuasion (Jane Austen, 1817)"),
    ("r-cran-tokenizers", "mobydick", "Moby Dick; or The Whale (Herman Melville, 1851)"),
]
HELDOUT_FRACTION = 0.05

# ---- tokenizer
VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# ---- models
SEQ_LEN = 512
MAX_POS = 512
COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=256,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=MAX_POS,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
    attention_bias=False,
    use_sliding_window=False,
    initializer_range=0.02,
)
MOE = dict(num_experts=24, num_experts_per_tok=4, moe_intermediate_size=32, norm_topk_prob=True,
           decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.02,
           output_router_logits=False, intermediate_size=128)
DENSE_FFN = MOE["num_experts_per_tok"] * MOE["moe_intermediate_size"]  # same active FFN width

# ---- training recipe (identical for both models)
TRAIN = dict(batch=4, seq_len=SEQ_LEN, steps=900, warmup=60, lr=3e-3, min_lr_frac=0.1,
             betas=(0.9, 0.95), weight_decay=0.1, grad_clip=1.0, eval_every=100, eval_windows=16)

# Prompts for samples / the parity reference.
SAMPLE_PROMPTS = [
    "It is a truth universally acknowledged, that",
    "Emma Woodhouse was",
    "Call me Ishmael. Some years ago,",
    "\"My dear Mr. Bennet,\" said his lady to him one day,",
    "The captain",
]


def log(*a):
    print(*a, flush=True)


# ==============================================================================================
# R serialization (XDR, version 2/3) reader: just enough for character vectors in the lazy-load
# databases (data/Rdata.rdx + Rdata.rdb) of R packages.
# ==============================================================================================

class RReader:
    def __init__(self, b: bytes):
        self.b, self.p, self.refs = b, 0, []

    def i(self) -> int:
        v = struct.unpack_from(">i", self.b, self.p)[0]
        self.p += 4
        return v

    def length(self) -> int:
        n = self.i()
        if n == -1:
            hi, lo = self.i(), self.i()
            n = (hi << 32) + lo
        return n

    def top(self):
        if self.b[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.p = 2
        version = self.i()
        self.i(), self.i()
        if version == 3:
            n = self.i()  # native encoding name
            self.p += n
        return self.item()

    def item(self):
        flags = self.i()
        t = flags & 0xFF
        has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
        if t in (254, 253, 252, 251, 250, 242, 241):  # NULL, environments, markers
            return None
        if t == 255:  # reference
            idx = (flags >> 8) or self.i()
            return self.refs[idx - 1]
        if t in (249, 248, 247):  # namespace / package / persistent name
            self.i()
            v = ("ns", [self.item() for _ in range(self.i())])
            self.refs.append(v)
            return v
        if t == 1:  # symbol
            v = ("sym", self.item())
            self.refs.append(v)
            return v
        if t == 4:  # environment
            env = {"type": "env"}
            self.refs.append(env)
            self.i()
            for k in ("enclos", "frame", "hashtab", "attr"):
                env[k] = self.item()
            return env
        if t in (2, 3, 5, 6, 17, 239, 240):  # pairlist-like
            attr = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            return {"type": "pair", "tag": tag, "car": self.item(), "cdr": self.item(), "attr": attr}
        if t == 9:  # CHARSXP
            n = self.i()
            if n == -1:
                return None
            s = self.b[self.p:self.p + n]
            self.p += n
            return s.decode("utf-8")
        if t in (10, 13):
            n = self.length()
            val = list(struct.unpack_from(">%di" % n, self.b, self.p))
            self.p += 4 * n
        elif t == 14:
            n = self.length()
            val = list(struct.unpack_from(">%dd" % n, self.b, self.p))
            self.p += 8 * n
        elif t in (16, 19, 20):
            val = [self.item() for _ in range(self.length())]
        elif t == 238:  # ALTREP
            self.item()
            state = self.item()
            self.item()
            return {"type": "altrep", "state": state}
        else:
            raise ValueError(f"unsupported R SEXP type {t}")
        attr = self.item() if has_attr else None
        return {"type": "vec", "val": val, "attr": attr} if attr is not None else val


def _pairlist(pl) -> dict:
    out = {}
    while isinstance(pl, dict) and pl.get("type") == "pair":
        out[pl["tag"][1] if pl["tag"] else None] = pl["car"]
        pl = pl["cdr"]
    return out


def read_lazyload_db(rdx: Path) -> dict:
    idx = RReader(gzip.decompress(rdx.read_bytes())).top()
    top = dict(zip(_pairlist(idx["attr"])["names"], idx["val"]))
    variables = top["variables"]
    names = _pairlist(variables["attr"])["names"]
    rdb = rdx.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (start, length) in zip(names, variables["val"]):
        chunk = rdb[int(start):int(start) + int(length)]
        out[name] = RReader(zlib.decompress(chunk[4:])).top()  # 4-byte length, then zlib
    return out


# ==============================================================================================
# Corpus
# ==============================================================================================

def fetch_debs(work: Path) -> dict:
    debdir = work / "debs"
    debdir.mkdir(parents=True, exist_ok=True)
    info = {}
    for pkg in DEBS:
        found = sorted(debdir.glob(f"{pkg}_*.deb"))
        if not found:
            log(f"apt-get download {pkg}")
            subprocess.run(["apt-get", "download", pkg], cwd=debdir, check=True)
            found = sorted(debdir.glob(f"{pkg}_*.deb"))
        deb = found[-1]
        dest = debdir / pkg
        if not dest.exists():
            subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
        info[pkg] = {"deb": deb.name, "sha256": hashlib.sha256(deb.read_bytes()).hexdigest()}
    return info


def clean_paragraphs(lines: list[str]) -> list[str]:
    """Hard-wrapped Gutenberg lines -> one string per paragraph (blank-line separated)."""
    paras, cur = [], []
    for line in lines + [""]:
        line = line.replace("\r", "").replace("\ufeff", "").rstrip()
        if line.strip():
            cur.append(line.strip())
        elif cur:
            p = " ".join(cur)
            p = re.sub(r"_([^_]+)_", r"\1", p)  # _italics_
            p = p.replace("_", "")
            p = re.sub(r"\s+", " ", p).strip()
            if p:
                paras.append(p)
            cur = []
    return paras


def book_paragraphs(pkg_dirs: dict) -> list[tuple[str, str, list[str]]]:
    dbs = {pkg: read_lazyload_db(pkg_dirs[pkg] / rel) for pkg, rel in DEBS.items()}
    out = []
    for pkg, obj, title in BOOKS:
        v = dbs[pkg][obj]
        if isinstance(v, dict):  # mobydick: one named string
            lines = v["val"][0].split("\n")
            text = "\n".join(lines)
            start = text.index("*** START OF THIS PROJECT GUTENBERG EBOOK")
            end = text.index("End of Project Gutenberg")
            lines = text[start:end].split("\n")[1:]
            paras = clean_paragraphs(lines)
            paras = [p for p in paras if not p.startswith("Produced by")]
        else:  # janeaustenr: character vector of lines
            paras = clean_paragraphs(v)
        out.append((obj, title, paras))
    return out


def split_heldout(name: str, paras: list[str], seed: int) -> tuple[list[list[str]], list[str]]:
    """One contiguous ~5% block of paragraphs per book is held out (seeded position, never the
    first or last 5%); the training part is the text before and after it (two documents)."""
    sizes = np.array([len(p) + 2 for p in paras])
    cum = np.cumsum(sizes)
    total = int(cum[-1])
    rng = random.Random(f"{seed}-{name}")
    start_char = rng.randint(int(0.05 * total), int(0.90 * total))
    i0 = int(np.searchsorted(cum, start_char))
    i1 = i0
    while i1 < len(paras) and cum[i1] - (cum[i0 - 1] if i0 else 0) < HELDOUT_FRACTION * total:
        i1 += 1
    return [paras[:i0], paras[i1 + 1:]], paras[i0:i1 + 1]


def stage_corpus(args) -> None:
    work = args.work
    info = fetch_debs(work)
    pkg_dirs = {pkg: work / "debs" / pkg for pkg in DEBS}
    train_docs, eval_docs, books = [], [], []
    for name, title, paras in book_paragraphs(pkg_dirs):
        tr, ev = split_heldout(name, paras, args.seed)
        train_docs += ["\n\n".join(d) for d in tr if d]
        eval_docs.append("\n\n".join(ev))
        books.append({"name": name, "title": title, "paragraphs": len(paras),
                      "chars": sum(len(p) + 2 for p in paras), "heldout_chars": len(eval_docs[-1]),
                      "heldout_starts_with": ev[0][:80]})
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    corpus = {"train": train_docs, "eval": eval_docs, "books": books, "debs": info}
    (work / "corpus" / "corpus.json").write_text(json.dumps(corpus))
    tr_chars, ev_chars = sum(map(len, train_docs)), sum(map(len, eval_docs))
    digest = hashlib.sha256(json.dumps([train_docs, eval_docs]).encode()).hexdigest()[:16]
    meta = {"books": books, "debs": info, "train_chars": tr_chars, "eval_chars": ev_chars,
            "train_bytes": sum(len(d.encode()) for d in train_docs),
            "eval_bytes": sum(len(d.encode()) for d in eval_docs), "sha256_16": digest}
    (work / "corpus" / "meta.json").write_text(json.dumps(meta, indent=2))
    log(f"corpus: {len(books)} books, train {tr_chars / 1e6:.2f} M chars, held-out {ev_chars / 1e6:.3f} M chars, "
        f"digest {digest}")


def load_corpus(work: Path) -> dict:
    return json.loads((work / "corpus" / "corpus.json").read_text())


# ==============================================================================================
# Tokenizer
# ==============================================================================================

def stage_tokenizer(args) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = load_corpus(args.work)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(corpus["train"], trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i
    (args.work / "tokenizer").mkdir(parents=True, exist_ok=True)
    tok.save(str(args.work / "tokenizer" / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    streams = {}
    for split in ("train", "eval"):
        ids = []
        for enc in tok.encode_batch(corpus[split]):
            ids += enc.ids + [eos]
        streams[split] = np.array(ids, dtype=np.int16)
        np.save(args.work / "tokenizer" / f"{split}_ids.npy", streams[split])
    nb = {s: sum(len(d.encode()) for d in corpus[s]) for s in ("train", "eval")}
    log(f"tokenizer: vocab {VOCAB_SIZE}; train {len(streams['train'])} tokens "
        f"({nb['train'] / len(streams['train']):.2f} bytes/token), eval {len(streams['eval'])} tokens")


def load_tokenizer(work: Path):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(work / "tokenizer" / "tokenizer.json"))


# ==============================================================================================
# Models and training
# ==============================================================================================

def build_config(arch: str):
    import transformers as tf
    if arch == "moe":
        return tf.Qwen3MoeConfig(**COMMON, **MOE)
    return tf.Qwen3Config(**COMMON, intermediate_size=DENSE_FFN)


def model_class(arch: str):
    import transformers as tf
    return tf.Qwen3MoeForCausalLM if arch == "moe" else tf.Qwen3ForCausalLM


def build_model(arch: str, seed: int, fast: bool = True):
    import torch
    torch.manual_seed(seed)
    kw = {"attn_implementation": "sdpa" if fast else "eager"}
    if arch == "moe":
        kw["experts_implementation"] = "grouped_mm" if fast else "eager"
    return model_class(arch)._from_config(build_config(arch), dtype=torch.float32, **kw)


def load_checkpoint(path: Path, arch: str, fast: bool = False):
    import torch
    kw = {"attn_implementation": "sdpa" if fast else "eager"}
    if arch == "moe":
        kw["experts_implementation"] = "grouped_mm" if fast else "eager"
    return model_class(arch).from_pretrained(str(path), dtype=torch.float32, **kw).eval()


def param_counts(model, arch: str) -> dict:
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    emb = model.model.embed_tokens.weight.numel()
    out = {"total": total, "embedding (tied with lm_head)": emb, "non_embedding": total - emb}
    if arch == "moe":
        c = model.config
        per_expert = 3 * c.hidden_size * c.moe_intermediate_size
        experts = c.num_hidden_layers * c.num_experts * per_expert
        out["experts"] = experts
        out["active"] = total - experts + c.num_hidden_layers * c.num_experts_per_tok * per_expert
        out["active_non_embedding"] = out["active"] - emb
    else:
        out["active"] = total
        out["active_non_embedding"] = total - emb
    return out


def eval_windows(stream: np.ndarray, n: int | None, seq_len: int) -> np.ndarray:
    """Non-overlapping windows of seq_len+1 tokens (the last token of one is the first of the
    next, so every held-out token after the first is predicted exactly once)."""
    count = (len(stream) - 1) // seq_len
    if n is not None:
        count = min(count, n)
    return np.stack([stream[i * seq_len:i * seq_len + seq_len + 1] for i in range(count)]).astype(np.int64)


def mean_nll(model, windows: np.ndarray, batch: int = 8) -> float:
    import torch
    import torch.nn.functional as F
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            w = torch.from_numpy(windows[i:i + batch])
            logits = model(input_ids=w[:, :-1]).logits.float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum")
            tot += nll.item()
            n += w[:, 1:].numel()
    return tot / n


def stage_train(args, arch: str) -> None:
    import torch

    torch.set_num_threads(THREADS)
    R = dict(TRAIN)
    if args.steps:
        R["steps"] = args.steps
    train = np.load(args.work / "tokenizer" / "train_ids.npy").astype(np.int64)
    evalw = eval_windows(np.load(args.work / "tokenizer" / "eval_ids.npy"), R["eval_windows"], R["seq_len"])
    model = build_model(arch, args.seed)
    counts = param_counts(model, arch)
    log(f"[{arch}] parameters: {counts}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": R["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=R["lr"], betas=R["betas"])

    def lr_at(step):
        if step < R["warmup"]:
            return R["lr"] * (step + 1) / R["warmup"]
        t = (step - R["warmup"]) / max(1, R["steps"] - R["warmup"])
        return R["lr"] * (R["min_lr_frac"] + (1 - R["min_lr_frac"]) * 0.5 * (1 + math.cos(math.pi * t)))

    gen = torch.Generator().manual_seed(args.seed)  # same batches for both models
    data = torch.from_numpy(train)
    T, B = R["seq_len"], R["batch"]
    hist = {"step": [], "train_loss": [], "aux_loss": [], "eval": []}
    best = (float("inf"), -1, None)
    t0 = time.time()
    model.train()
    for step in range(R["steps"]):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        starts = torch.randint(0, len(data) - T - 1, (B,), generator=gen)
        x = torch.stack([data[s:s + T + 1] for s in starts.tolist()])
        kw = {"output_router_logits": True} if arch == "moe" else {}
        out = model(input_ids=x[:, :-1], **kw)  # next-token targets are x[:, 1:]
        logits = out.logits
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss = ce
        aux = None
        if arch == "moe":
            aux = out.aux_loss
            loss = ce + model.config.router_aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), R["grad_clip"])
        opt.step()
        hist["step"].append(step)
        hist["train_loss"].append(round(ce.item(), 4))
        hist["aux_loss"].append(round(aux.item(), 4) if aux is not None else None)
        if step % 25 == 0:
            el = time.time() - t0
            log(f"[{arch}] step {step}/{R['steps']} loss {ce.item():.3f}"
                + (f" aux {aux.item():.3f}" if aux is not None else "")
                + f" lr {lr_at(step):.2e} {el / 60:.1f} min ({(step + 1) * B * T / el:.0f} tok/s)")
        if (step + 1) % R["eval_every"] == 0 or step + 1 == R["steps"]:
            model.eval()
            ev = mean_nll(model, evalw)
            model.train()
            hist["eval"].append({"step": step + 1, "nll": round(ev, 4), "ppl": round(math.exp(ev), 2),
                                 "minutes": round((time.time() - t0) / 60, 2)})
            log(f"[{arch}] eval after {step + 1} steps: nll {ev:.4f} ppl {math.exp(ev):.2f}")
            if ev < best[0]:
                best = (ev, step + 1, copy.deepcopy(model.state_dict()))
    minutes = (time.time() - t0) / 60
    model.load_state_dict(best[2])
    model.eval()
    dest = args.work / f"ckpt-{arch}"
    if dest.exists():
        shutil.rmtree(dest)
    model.save_pretrained(str(dest))
    info = {"arch": arch, "recipe": R, "seed": args.seed, "minutes": round(minutes, 2),
            "tokens_seen": R["steps"] * B * T, "best_step": best[1], "best_eval_nll_subset": round(best[0], 4),
            "params": counts, "torch_threads": THREADS, "history": hist}
    (dest / "train_log.json").write_text(json.dumps(info))
    log(f"[{arch}] done in {minutes:.1f} min; best eval nll {best[0]:.4f} at step {best[1]} -> {dest}")


# ==============================================================================================
# Export: the committed HF checkpoint (bf16, Hub tensor layout) + tokenizer files
# ==============================================================================================

def write_tokenizer_files(dest: Path, work: Path) -> None:
    tok = load_tokenizer(work)
    tok.save(str(dest / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POS,
        "chat_template": CHATML_TEMPLATE,
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def write_generation_config(dest: Path) -> None:
    import transformers
    gen = {
        "bos_token_id": 0,
        "eos_token_id": [SPECIAL_TOKENS.index("<|im_end|>"), SPECIAL_TOKENS.index("<|endoftext|>")],
        "pad_token_id": 0,
        "transformers_version": transformers.__version__,
    }
    (dest / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def expected_hub_names(cfg) -> dict:
    H, I, E, V = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.vocab_size
    hd = cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    names = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}  # tied: no lm_head
    for L in range(cfg.num_hidden_layers):
        p = f"model.layers.{L}."
        names.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
            p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate.weight": (E, H),
        })
        for e in range(E):
            names[p + f"mlp.experts.{e}.gate_proj.weight"] = (I, H)
            names[p + f"mlp.experts.{e}.up_proj.weight"] = (I, H)
            names[p + f"mlp.experts.{e}.down_proj.weight"] = (H, I)
    return names


def dir_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def stage_export(args) -> None:
    import torch
    import transformers
    from safetensors import safe_open

    src = args.work / "ckpt-moe"
    model = load_checkpoint(src, "moe")
    with torch.no_grad():  # the committed weights are bf16: round once, evaluate those
        for prm in model.parameters():
            prm.copy_(prm.to(torch.bfloat16).to(torch.float32))
    dest = args.out / "hf"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(str(dest), max_shard_size="6MB")
    # transformers 5 writes only the `num_local_experts` alias; Hub Qwen3-MoE configs (and
    # llama.cpp's converter) use `num_experts`: write both, as the Hub-style fixtures do.
    cj = json.loads((dest / "config.json").read_text())
    cj["num_experts"] = cj.get("num_local_experts", model.config.num_experts)
    (dest / "config.json").write_text(json.dumps(dict(sorted(cj.items())), indent=2) + "\n")
    write_tokenizer_files(dest, args.work)
    write_generation_config(dest)

    # Hub layout on disk: per-expert tensors, equal to the slices of the fused parameters.
    cfg = model.config
    with safe_open(str(dest / "model.safetensors"), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    exp = expected_hub_names(cfg)
    if got != exp:
        raise AssertionError(f"layout mismatch: missing {sorted(set(exp) - set(got))[:5]}, "
                             f"extra {sorted(set(got) - set(exp))[:5]}")
    assert {str(t.dtype) for t in tensors.values()} == {"torch.bfloat16"}
    sd = model.state_dict()
    I = cfg.moe_intermediate_size
    for L in range(cfg.num_hidden_layers):
        p = f"model.layers.{L}."
        gu, dn = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]
        for e in range(cfg.num_experts):
            q = p + f"mlp.experts.{e}."
            assert torch.equal(tensors[q + "gate_proj.weight"].float(), gu[e, :I])
            assert torch.equal(tensors[q + "up_proj.weight"].float(), gu[e, I:])
            assert torch.equal(tensors[q + "down_proj.weight"].float(), dn[e])
    for k, v in tensors.items():
        if k in sd:
            assert torch.equal(v.float(), sd[k]), k

    # Reload through the Auto classes; identical logits.
    re_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(dest), dtype=torch.float32, attn_implementation="eager", experts_implementation="eager").eval()
    assert type(re_model).__name__ == "Qwen3MoeForCausalLM"
    tok = transformers.AutoTokenizer.from_pretrained(str(dest))
    ids = tok(SAMPLE_PROMPTS[0], return_tensors="pt").input_ids
    assert ids[0].tolist() == load_tokenizer(args.work).encode(SAMPLE_PROMPTS[0]).ids
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = re_model(input_ids=ids).logits
    d = float((a - b).abs().max())
    assert d < 1e-4, d
    chat = tok.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", chat
    log(f"export: {dest} ({dir_size(dest) / 1e6:.2f} MB, {len(tensors)} tensors, Hub layout verified, "
        f"AutoModelForCausalLM reload max |diff| {d:.2e})")


# ==============================================================================================
# Parity reference for tests/trained.rs
# ==============================================================================================

def router_top_gap(probs, k: int) -> float:
    v = probs.topk(k + 1, dim=-1).values
    return float((v[..., k - 1] - v[..., k]).min())


def stage_reference(args) -> None:
    import torch

    torch.set_num_threads(THREADS)
    hf = args.out / "hf"
    model = load_checkpoint(hf, "moe", fast=False)  # float32, eager attention, eager experts
    tok = load_tokenizer(args.work)
    corpus = load_corpus(args.work)
    k = model.config.num_experts_per_tok
    n_greedy = 32
    # Candidate texts: paragraphs of the held-out split with 40-64 tokens; the first one whose
    # exactness margins are comfortable for an f32 runtime is used.
    cands = []
    for doc in corpus["eval"]:
        for para in doc.split("\n\n"):
            n = len(tok.encode(para).ids)
            if 40 <= n <= 64:
                cands.append(para)
    # A trained router has near-ties (24 experts, ~550 routing decisions per candidate): among the
    # candidates whose greedy steps have a top-1 margin >= 0.01, take the one whose smallest
    # k-th vs (k+1)-th router probability gap is largest.
    best = None
    for text in cands[:40]:
        ids = tok.encode(text).ids
        gaps = []
        hooks = [m.register_forward_hook(lambda mod, inp, out: gaps.append(
            router_top_gap(torch.softmax(out[0].float(), -1), k))) for m in router_modules(model)]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            seq, greedy, margins = list(ids), [], []
            for _ in range(n_greedy):  # full forward each step, no KV cache, no processors
                last = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
                top2 = last.topk(2).values
                margins.append(float(top2[0] - top2[1]))
                nxt = int(last.argmax())
                greedy.append(nxt)
                seq.append(nxt)
        for h in hooks:
            h.remove()
        t2 = logits.topk(2, dim=-1).values
        m = dict(min_greedy_margin=min(margins), min_prompt_top1_margin=float((t2[:, 0] - t2[:, 1]).min()),
                 min_router_gap=min(gaps))
        log(f"reference candidate ({len(ids)} ids): {m}")
        if m["min_greedy_margin"] >= 0.01 and (best is None or m["min_router_gap"] > best[4]["min_router_gap"]):
            best = (text, ids, logits.numpy(), greedy, m)
    chosen = best
    if chosen is None:
        raise RuntimeError("no held-out paragraph with comfortable margins")
    text, ids, logits, greedy, m = chosen
    np.save(args.out / "reference_logits.npy", logits.astype(np.float32))
    ref = {
        "checkpoint": "hf",
        "note": "transformers float32 forward (attn_implementation=eager, experts_implementation=eager) "
                "of the committed bf16 weights upcast to float32; text is a held-out paragraph",
        "text": text,
        "ids": ids,
        "logits_file": "reference_logits.npy",
        "greedy_ids": greedy,
        "greedy_text": tok.decode(greedy),
        "greedy_method": "full forward over the sequence per step, argmax of the last position, "
                         "no EOS stop, no logits processors",
        **{k2: round(v, 6) for k2, v in m.items()},
        "tolerance_rel_to_max_logit": 1e-4,
        "versions": versions(),
    }
    (args.out / "reference.json").write_text(json.dumps(ref, indent=2) + "\n")
    log(f"reference: {len(ids)} ids, greedy {greedy[:8]}..., margins {m}")


def router_modules(model):
    return [m for _, m in model.named_modules() if type(m).__name__.endswith("TopKRouter")]


def versions() -> dict:
    import safetensors
    import tokenizers
    import torch
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0]}


# ==============================================================================================
# Convert with moe-convert, sample with moe-run
# ==============================================================================================

def find_bin(args, name: str) -> str:
    dirs = [args.bin_dir] if args.bin_dir else []
    if os.environ.get("CARGO_TARGET_DIR"):
        dirs.append(Path(os.environ["CARGO_TARGET_DIR"]) / "release")
    dirs.append(REPO / "target" / "release")
    for d in dirs:
        if d and (d / name).exists():
            return str(d / name)
    found = shutil.which(name)
    if not found:
        sys.exit(f"{name} not found: cargo build --release -p moe-convert -p moe-runtime, or pass --bin-dir")
    return found


def stage_convert(args) -> None:
    conv, run = find_bin(args, "moe-convert"), find_bin(args, "moe-run")
    gguf = args.out / "small-moe-q8_0.gguf"
    t0 = time.time()
    subprocess.run([conv, str(args.out / "hf"), "-o", str(gguf), "--type", "q8_0"], check=True)
    runs = []
    for prompt, extra in [(SAMPLE_PROMPTS[0], ["--temp", "0"]), (SAMPLE_PROMPTS[0], ["--seed", "7"]),
                          (SAMPLE_PROMPTS[2], ["--seed", "7"]), (SAMPLE_PROMPTS[3], ["--temp", "0"])]:
        cmd = [run, "-m", str(gguf), "-p", prompt, "-n", "64", "--threads", "2"] + extra
        r = subprocess.run(cmd, check=True, capture_output=True, text=True)
        shown = ["moe-run", "-m", "models/small-moe/small-moe-q8_0.gguf", "-p", prompt, "-n", "64"] + extra
        runs.append({"command": shlex.join(shown),
                     "stdout": r.stdout, "stderr_tail": r.stderr.strip().splitlines()[-3:]})
        log(r.stdout)
    # Q8_0 perplexity on the first held-out windows (moe-run --dump-logits).
    ev = eval_windows(np.load(args.work / "tokenizer" / "eval_ids.npy"), 8, SEQ_LEN)
    tot, n = 0.0, 0
    for w in ev:
        out = args.work / "q8_logits.npy"
        subprocess.run([run, "-m", str(gguf), "--tokens", ",".join(map(str, w[:-1])), "-n", "0",
                        "--dump-logits", str(out), "--threads", "2"], check=True, capture_output=True)
        lg = np.load(out).astype(np.float64)
        lg -= lg.max(-1, keepdims=True)
        lp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
        tot -= lp[np.arange(len(w) - 1), w[1:]].sum()
        n += len(w) - 1
    info = {"gguf_bytes": gguf.stat().st_size, "runs": runs, "q8_0_eval_nll_first8": tot / n,
            "q8_0_eval_tokens": n, "seconds": round(time.time() - t0, 1)}
    (args.work / "convert.json").write_text(json.dumps(info, indent=2))
    log(f"convert: {gguf} {gguf.stat().st_size / 2**20:.2f} MiB; Q8_0 held-out nll (first {n} tokens) {tot / n:.4f}")


# ==============================================================================================
# Report: perplexities, routing statistics, samples
# ==============================================================================================

def unigram_nll(train: np.ndarray, windows: np.ndarray, vocab: int) -> float:
    counts = np.bincount(train.astype(np.int64), minlength=vocab).astype(np.float64) + 1.0  # add-one
    logp = np.log(counts / counts.sum())
    targets = windows[:, 1:].reshape(-1)  # exactly the tokens the models are scored on
    return float(-logp[targets].mean())


def routing_stats(model, windows: np.ndarray) -> dict:
    """Expert load, router entropy, consecutive-token overlap and early-router precision."""
    import torch

    cfg = model.config
    L, E, k = cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok
    layers = model.model.layers
    counts = np.zeros((L, E), np.int64)
    ent_sum = np.zeros(L)
    overlap_sum = np.zeros(L)
    any_overlap = np.zeros(L)
    n_pairs = 0
    early_hits = np.zeros(L - 1)
    early_top1 = np.zeros(L - 1)
    n_tok = 0
    cap = {}
    hooks = []
    for l, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(lambda m, i, o, l=l: cap.__setitem__(("out", l), o[0] if isinstance(o, tuple) else o)))
        hooks.append(layer.mlp.gate.register_forward_hook(lambda m, i, o, l=l: cap.__setitem__(("logits", l), o[0])))
    with torch.no_grad():
        for w in windows:
            x = torch.from_numpy(w[None, :-1])
            model(input_ids=x)
            T = x.shape[1]
            sel = []
            for l in range(L):
                lg = cap[("logits", l)].float().reshape(T, E)
                p = torch.softmax(lg, -1)
                top = p.topk(k, -1).indices
                sel.append(top)
                counts[l] += np.bincount(top.reshape(-1).numpy(), minlength=E)
                ent_sum[l] += float(-(p * torch.log2(p.clamp_min(1e-30))).sum(-1).sum())
                a = torch.zeros(T, E, dtype=torch.bool).scatter_(1, top, True)
                inter = (a[1:] & a[:-1]).sum(-1).float()
                overlap_sum[l] += float(inter.sum() / k)
                any_overlap[l] += float((inter > 0).float().sum())
            for l in range(L - 1):  # layer l+1's router applied to layer l's output
                h = cap[("out", l)].float().reshape(T, -1)
                nxt = layers[l + 1]
                pred_logits = nxt.mlp.gate(nxt.post_attention_layernorm(h))[0].float().reshape(T, E)
                pred = pred_logits.topk(k, -1).indices
                a = torch.zeros(T, E, dtype=torch.bool).scatter_(1, pred, True)
                b = torch.zeros(T, E, dtype=torch.bool).scatter_(1, sel[l + 1], True)
                early_hits[l] += float((a & b).sum()) / k
                early_top1[l] += float((pred[:, 0] == sel[l + 1][:, 0]).float().sum())
            n_tok += T
            n_pairs += T - 1
    for h in hooks:
        h.remove()
    load = counts / counts.sum(1, keepdims=True)
    load_entropy = -(load * np.log2(np.clip(load, 1e-30, None))).sum(1)
    return {
        "tokens": n_tok,
        "experts": E, "top_k": k,
        "load": load.round(5).tolist(),
        "load_min_max": [[round(float(r.min()), 4), round(float(r.max()), 4)] for r in load],
        "load_cv": [round(float(r.std() / r.mean()), 4) for r in load],
        "load_entropy_bits": [round(float(x), 4) for x in load_entropy],
        "router_entropy_bits": [round(float(x / n_tok), 4) for x in ent_sum],
        "max_entropy_bits": round(math.log2(E), 4),
        "overlap_prev_token": [round(float(x / n_pairs), 4) for x in overlap_sum],
        "any_overlap_prev_token": [round(float(x / n_pairs), 4) for x in any_overlap],
        "overlap_random": round(k / E, 4),
        "early_router_precision": [round(float(x / n_tok), 4) for x in early_hits],
        "early_router_top1_match": [round(float(x / n_tok), 4) for x in early_top1],
    }


def sample_generations(model, tok, n_new: int = 48) -> list[dict]:
    import torch

    out = []
    for i, prompt in enumerate(SAMPLE_PROMPTS):
        ids = torch.tensor([tok.encode(prompt).ids])
        with torch.no_grad():
            g = model.generate(ids, max_new_tokens=n_new, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
            torch.manual_seed(1000 + i)
            s = model.generate(ids, max_new_tokens=n_new, do_sample=True, temperature=0.8, top_k=40,
                               top_p=0.95, eos_token_id=None, pad_token_id=0)
        out.append({"prompt": prompt,
                    "greedy": tok.decode(g[0, ids.shape[1]:].tolist()),
                    "sampled": tok.decode(s[0, ids.shape[1]:].tolist()),
                    "sampling": f"temperature 0.8, top_k 40, top_p 0.95, torch.manual_seed({1000 + i})"})
    return out


def stage_report(args) -> None:
    import torch

    torch.set_num_threads(THREADS)
    tok = load_tokenizer(args.work)
    train = np.load(args.work / "tokenizer" / "train_ids.npy")
    ev = np.load(args.work / "tokenizer" / "eval_ids.npy")
    windows = eval_windows(ev, args.eval_limit, SEQ_LEN)
    meta = json.loads((args.work / "corpus" / "meta.json").read_text())
    eval_bytes = meta["eval_bytes"]
    n_scored = windows[:, 1:].size

    res = {"versions": versions(), "seed": args.seed, "corpus": meta, "eval_tokens_scored": int(n_scored),
           "train_tokens": int(len(train)), "eval_tokens": int(len(ev))}
    res["unigram"] = {"nll": unigram_nll(train, windows, VOCAB_SIZE)}
    moe = load_checkpoint(args.out / "hf", "moe", fast=True)
    moe_f32 = load_checkpoint(args.work / "ckpt-moe", "moe", fast=True)
    dense = load_checkpoint(args.work / "ckpt-dense", "dense", fast=True)
    t0 = time.time()
    res["moe"] = {"nll": mean_nll(moe, windows)}
    res["moe_f32_training_checkpoint"] = {"nll": mean_nll(moe_f32, windows)}
    res["dense"] = {"nll": mean_nll(dense, windows)}
    log(f"report: perplexities in {time.time() - t0:.0f} s")
    # bits per byte over the scored tokens ~ all held-out bytes (windows cover all but < 1 window)
    frac = n_scored / max(1, len(ev) - 1)
    for key in ("unigram", "moe", "moe_f32_training_checkpoint", "dense"):
        r = res[key]
        r["ppl"] = math.exp(r["nll"])
        r["bits_per_byte"] = r["nll"] * n_scored / math.log(2) / (eval_bytes * frac)
    conv = args.work / "convert.json"
    if conv.exists():
        c = json.loads(conv.read_text())
        res["q8_0"] = {"nll_first8_windows": c["q8_0_eval_nll_first8"], "tokens": c["q8_0_eval_tokens"],
                       "ppl_first8_windows": math.exp(c["q8_0_eval_nll_first8"]),
                       "gguf_bytes": c["gguf_bytes"], "moe_run": c["runs"]}
        sub = eval_windows(ev, 8, SEQ_LEN)
        res["q8_0"]["bf16_same_windows_ppl"] = math.exp(mean_nll(moe, sub))
    t0 = time.time()
    res["routing"] = routing_stats(moe, windows)
    log(f"report: routing statistics in {time.time() - t0:.0f} s")
    res["samples_moe"] = sample_generations(moe, tok)
    res["samples_dense"] = sample_generations(dense, tok)
    for arch in ("moe", "dense"):
        tl = json.loads((args.work / f"ckpt-{arch}" / "train_log.json").read_text())
        tl.pop("history")
        tl["eval_curve"] = json.loads((args.work / f"ckpt-{arch}" / "train_log.json").read_text())["history"]["eval"]
        res[f"train_{arch}"] = tl
    res["files"] = {"hf_bytes": dir_size(args.out / "hf")}
    gguf = args.out / "small-moe-q8_0.gguf"
    if gguf.exists():
        res["files"]["gguf_q8_0_bytes"] = gguf.stat().st_size
    res["config_moe"] = json.loads((args.out / "hf" / "config.json").read_text())
    res["config_dense"] = json.loads((args.work / "ckpt-dense" / "config.json").read_text())
    (args.out / "report.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "REPORT.md").write_text(render_report(res))
    log(f"report: {args.out / 'REPORT.md'}")


def render_report(r: dict) -> str:
    """REPORT.md from report.json (kept in the script so the two never disagree)."""
    tm, td = r["train_moe"], r["train_dense"]
    cm = r["config_moe"]
    rt = r["routing"]
    L = len(rt["load"])
    lines = []
    w = lines.append
    w("# small-moe: a small trained Qwen3-MoE model")
    w("")
    w("Generated by `scripts/train/train_small_moe.py` (do not edit by hand; `--stage report` rewrites it "
      "from the checkpoints). Machine-readable: `report.json`.")
    w("")
    w(f"A real trained model for benchmarks (realistic routing) and the demo (real text). It is tiny "
      f"({tm['params']['total'] / 1e6:.1f} M parameters, {tm['params']['active'] / 1e6:.1f} M active) and saw only "
      f"{tm['tokens_seen'] / 1e6:.1f} M tokens ({tm['minutes']:.0f} min on a shared 2-core CPU), so expect "
      "19th-century-flavoured English that is locally plausible but wanders.")
    w("")
    w("## Files")
    w("")
    w("| file | what | size |")
    w("|---|---|---|")
    if "gguf_q8_0_bytes" in r["files"]:
        w(f"| `small-moe-q8_0.gguf` | `moe-convert hf -o small-moe-q8_0.gguf --type q8_0` | "
          f"{r['files']['gguf_q8_0_bytes'] / 2**20:.2f} MiB |")
    w(f"| `hf/` | Hugging Face checkpoint (bf16 safetensors, Hub per-expert tensor layout, tokenizer, "
      f"ChatML chat template, generation config); loads with `AutoModelForCausalLM.from_pretrained` | "
      f"{r['files']['hf_bytes'] / 1e6:.2f} MB |")
    w("| `reference.json`, `reference_logits.npy` | transformers float32 (eager) logits and 32 greedy ids for a "
      "held-out paragraph, computed from the bf16 weights upcast to f32; used by `tests/trained.rs` | |")
    w("| `report.json`, `REPORT.md` | this report | |")
    w("")
    w("## Corpus")
    w("")
    c = r["corpus"]
    w("English prose, 7 public-domain novels (Project Gutenberg transcriptions), taken from two Debian packages "
      "(fetched with `apt-get download`, never installed; the R lazy-load data files are decoded by the script):")
    w("")
    w("| book | package | chars | held-out chars |")
    w("|---|---|---|---|")
    for b in c["books"]:
        pkg = "r-cran-tokenizers (`mobydick`)" if b["name"] == "mobydick" else f"r-cran-janeaustenr (`{b['name']}`)"
        w(f"| {b['title']} | {pkg} | {b['chars']:,} | {b['heldout_chars']:,} |")
    w("")
    debs = ", ".join(f"`{v['deb']}` (sha256 {v['sha256'][:16]}...)" for v in c["debs"].values())
    w(f"- Packages: {debs} from Debian 12 (bookworm) main.")
    w("- Licenses: the texts are in the public domain (the novels were published 1811-1851; Project Gutenberg's "
      "header/footer and trademark text are stripped from Moby Dick, the janeaustenr texts carry none). The "
      "packages themselves are MIT-licensed (janeaustenr: Copyright 2016-2017 Julia Silge; tokenizers: Copyright "
      "2016-2018 Lincoln Mullen et al.).")
    w("- Cleaning: hard-wrapped lines joined into one line per paragraph, paragraphs separated by a blank line, "
      "`_italics_` markers removed, whitespace collapsed; `<|endoftext|>` between documents.")
    w(f"- Split: one contiguous block of ~5% of the paragraphs of every book (seeded position) is held out; "
      f"train {c['train_bytes'] / 1e6:.2f} MB, held-out {c['eval_bytes'] / 1e6:.3f} MB "
      f"(digest `{c['sha256_16']}`).")
    w(f"- Tokenizer: byte-level BPE (`tokenizers`, ByteLevel pre-tokenizer, GPT-2 regex, no prefix space), vocab "
      f"{cm['vocab_size']} = 3 special tokens (`<|endoftext|>`=0, `<|im_start|>`=1, `<|im_end|>`=2) + 256 bytes + "
      f"merges, trained on the training split only; ~3.9 bytes per token.")
    w("")
    w("## Models")
    w("")
    pm, pd = tm["params"], td["params"]
    w("| | MoE (`Qwen3MoeForCausalLM`, committed) | dense (`Qwen3ForCausalLM`, baseline, not committed) |")
    w("|---|---|---|")
    w(f"| layers / hidden / heads (kv) x head_dim | {cm['num_hidden_layers']} / {cm['hidden_size']} / "
      f"{cm['num_attention_heads']} ({cm['num_key_value_heads']}) x {cm['head_dim']} | same |")
    w(f"| feed-forward | {cm['num_local_experts'] if 'num_local_experts' in cm else cm['num_experts']} experts of "
      f"width {cm['moe_intermediate_size']}, top-{cm['num_experts_per_tok']}, softmax then renormalised top-k "
      f"(`norm_topk_prob`), every layer sparse | SwiGLU of width {r['config_dense']['intermediate_size']} "
      f"(= {cm['num_experts_per_tok']} x {cm['moe_intermediate_size']}) |")
    w(f"| embeddings | tied input/output, vocab {cm['vocab_size']} | same |")
    w(f"| context | {cm['max_position_embeddings']} positions (RoPE theta 10000), trained on {SEQ_LEN}-token windows | same |")
    w(f"| parameters, total | {pm['total']:,} | {pd['total']:,} |")
    w(f"| parameters, active per token | {pm['active']:,} | {pd['active']:,} |")
    w(f"| of which embedding | {pm['embedding (tied with lm_head)']:,} | {pd['embedding (tied with lm_head)']:,} |")
    w(f"| expert parameters | {pm['experts']:,} | - |")
    w("")
    w("## Training")
    w("")
    rec = tm["recipe"]
    w(f"Identical recipe and token budget for both: AdamW (betas {tuple(rec['betas'])}, weight decay {rec['weight_decay']} "
      f"on matrices except the embedding), peak lr {rec['lr']}, {rec['warmup']} warm-up steps then cosine to "
      f"{rec['min_lr_frac']} x peak, gradient clipping {rec['grad_clip']}, batch {rec['batch']} x {rec['seq_len']} "
      f"tokens (random windows of the training stream), {rec['steps']} steps = {tm['tokens_seen']:,} tokens "
      f"(~{tm['tokens_seen'] / r['train_tokens']:.1f} epochs of the {r['train_tokens']:,} training tokens), float32, "
      f"seed {r['seed']}, `torch.set_num_threads({tm['torch_threads']})`. The MoE adds transformers' "
      f"load-balancing loss with `router_aux_loss_coef` {cm['router_aux_loss_coef']}. The held-out loss is measured "
      f"every {rec['eval_every']} steps on {rec['eval_windows']} windows and the best checkpoint is kept.")
    w("")
    w(f"| | wall time | best step | held-out ppl over training (step: ppl) |")
    w(f"|---|---|---|---|")
    for name, t in (("MoE", tm), ("dense", td)):
        curve = ", ".join(f"{e['step']}: {e['ppl']:.1f}" for e in t["eval_curve"])
        w(f"| {name} | {t['minutes']:.1f} min | {t['best_step']} | {curve} |")
    w("")
    w("Both held-out curves were still falling at the last step (the best checkpoint is the final one), so a longer "
      "run would give a better model; the budget was set by the shared machine. ")
    w("Wall times are on a shared 2-core machine (other builds were running; the two models trained side by side, "
      "one torch thread each), so they are upper bounds. Training and the evaluations below use transformers' "
      "`grouped_mm` experts implementation and SDPA attention; the parity reference uses `eager` for both.")
    w("")
    w("## Held-out perplexity")
    w("")
    w(f"All {r['eval_tokens_scored']:,} scored held-out tokens ({SEQ_LEN}-token windows, each token predicted once).")
    w("")
    w("| model | perplexity | nats/token | bits/byte |")
    w("|---|---|---|---|")
    for key, name in (("unigram", "unigram (add-one, training-split counts)"),
                      ("dense", "dense, same active parameters"),
                      ("moe_f32_training_checkpoint", "MoE, float32 training checkpoint"),
                      ("moe", "**MoE, committed bf16 weights**")):
        x = r[key]
        w(f"| {name} | {x['ppl']:.2f} | {x['nll']:.4f} | {x['bits_per_byte']:.3f} |")
    w("")
    d, m_ = r["dense"]["ppl"], r["moe"]["ppl"]
    w(f"The MoE's perplexity is {100 * (1 - m_ / d):.1f}% lower than the dense model's at the same active parameter "
      "count and the same batches; bf16 rounding of the committed weights changes it by less than 0.01. "
      "(The per-step training curve above is on the first 16 held-out windows, from Sense and Sensibility, which "
      "are easier than the held-out average.)")
    if "q8_0" in r:
        q = r["q8_0"]
        w("")
        w(f"Q8_0 GGUF through moe-run (first {q['tokens']:,} held-out tokens): perplexity "
          f"{q['ppl_first8_windows']:.2f}, vs {q['bf16_same_windows_ppl']:.2f} for the bf16 weights in "
          "transformers on the same tokens.")
    w("")
    w("## Routing on held-out text")
    w("")
    w(f"Committed MoE, {rt['tokens']:,} held-out tokens, {rt['experts']} experts, top-{rt['top_k']}. "
      f"Per layer: expert load = fraction of all top-{rt['top_k']} picks going to each expert (uniform = "
      f"{1 / rt['experts']:.4f}); router entropy = mean entropy of the full softmax over experts per token (max "
      f"{rt['max_entropy_bits']} bits); load entropy = entropy of the load distribution; overlap = mean fraction of "
      f"a token's {rt['top_k']} experts that the previous token also used (random routing: {rt['overlap_random']}); "
      f"early precision = the next layer's router applied to this layer's output (normalised by the next layer's "
      f"post_attention_layernorm) vs the next layer's real top-{rt['top_k']}: |predicted ∩ real| / {rt['top_k']}.")
    w("")
    w("| layer | load min / max | load CV | load entropy (bits) | router entropy (bits) | overlap with prev. token | any shared expert | early precision for next layer | early top-1 match |")
    w("|---|---|---|---|---|---|---|---|---|")
    for l in range(L):
        ep = f"{rt['early_router_precision'][l]:.3f}" if l < L - 1 else "-"
        e1 = f"{rt['early_router_top1_match'][l]:.3f}" if l < L - 1 else "-"
        mn, mx = rt["load_min_max"][l]
        w(f"| {l} | {mn:.3f} / {mx:.3f} | {rt['load_cv'][l]:.2f} | {rt['load_entropy_bits'][l]:.3f} | "
          f"{rt['router_entropy_bits'][l]:.3f} | {rt['overlap_prev_token'][l]:.3f} | "
          f"{rt['any_overlap_prev_token'][l]:.3f} | {ep} | {e1} |")
    w("")
    w("Full per-expert loads: `report.json` -> `routing.load` ([layer][expert]).")
    w("")
    w("## Samples")
    w("")
    w("transformers, committed MoE weights, 48 new tokens; greedy, and sampled (temperature 0.8, top-k 40, top-p "
      "0.95, seed as listed). Dense baseline greedy for comparison.")
    w("")
    for sm, sd in zip(r["samples_moe"], r["samples_dense"]):
        w(f"**Prompt:** `{sm['prompt']}`")
        w("")
        w(f"- MoE greedy: {json.dumps(sm['greedy'])}")
        w(f"- MoE sampled ({sm['sampling'].split(', ')[-1]}): {json.dumps(sm['sampled'])}")
        w(f"- dense greedy: {json.dumps(sd['greedy'])}")
        w("")
    if "q8_0" in r:
        w("### moe-run, Q8_0")
        w("")
        for run in r["q8_0"]["moe_run"]:
            w(f"```\n$ {run['command']}\n{run['stdout'].strip()}\n```")
            w("")
    w("## Reproduce")
    w("")
    w("```sh")
    w("pip install -r scripts/train/requirements-train.txt      # CPU torch is enough")
    w("apt-get update                                     # apt-get download needs package lists")
    w("cargo build --release -p moe-convert -p moe-runtime  # for the convert stage")
    w(f"TRAIN_THREADS={tm['torch_threads']} nice -n 10 python3 scripts/train/train_small_moe.py  # all stages; scratch in /tmp/moe-edge-small-moe")
    w("# or stage by stage: --stage corpus|tokenizer|train|export|reference|convert|report (--arch moe|dense);")
    w("# the committed model trained MoE and dense side by side: --stage train --arch moe & --stage train --arch dense")
    w("cargo test -p moe-e2e --test trained")
    w("```")
    w("")
    v = r["versions"]
    w(f"Versions: torch {v['torch']}, transformers {v['transformers']}, tokenizers {v['tokenizers']}, "
      f"safetensors {v['safetensors']}, numpy {v['numpy']}, Python {v['python']}.")
    w("")
    return "\n".join(lines)


# ==============================================================================================
# main
# ==============================================================================================

STAGES = ["corpus", "tokenizer", "train", "export", "reference", "convert", "report"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=STAGES + ["all"], default="all")
    ap.add_argument("--arch", choices=["moe", "dense", "both"], default="both", help="for --stage train")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="scratch folder (debs, corpus, checkpoints)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="committed output folder")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--steps", type=int, default=0, help="override the number of training steps (testing only)")
    ap.add_argument("--eval-limit", type=int, default=None, help="report on the first N held-out windows only (testing)")
    ap.add_argument("--bin-dir", type=Path, default=None,
                    help="folder with moe-convert and moe-run (default: target/release, then PATH)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    stages = STAGES if args.stage == "all" else [args.stage]
    for st in stages:
        log(f"=== {st}")
        if st == "train":
            for arch in (["moe", "dense"] if args.arch == "both" else [args.arch]):
                stage_train(args, arch)
        else:
            globals()[f"stage_{st}"](args)


if __name__ == "__main__":
    main()
