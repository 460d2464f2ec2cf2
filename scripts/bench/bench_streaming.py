#!/usr/bin/env python3
"""Expert streaming benchmark (a benchmark, never a test).

1. Grid: generation speed, hit rate, stall time and reads per token for expert-cache sizes,
   eviction policies, lookahead depths and predictors at emulated flash speeds:

    python3 scripts/bench/bench_streaming.py grid -m MODEL.gguf [--text heldout.txt] \
        [--budgets 100,75,50,25] [--profiles microsd,usb-ssd,nvme] \
        [--setups lru:0,lfu:0,belady:0,belady:1,belady:2,belady:0:frequency] [-n 32] [-r 2]

   Every run uses O_DIRECT reads (the page cache cannot hide the flash) plus the named flash
   emulator. Repetitions are interleaved: repetition 1 of every cell, then repetition 2, so a
   load change on the machine spreads over all setups instead of hitting one. "min MiB/tok" is
   what Belady's offline optimum would read with the same number of slots (the misses no policy
   could avoid); "read/min" is the ratio. Over the whole run, warm-up included.

2. Side by side with llama.cpp on the real disk (root only; cgroup v1 memory controller):

    LLAMA_BENCH=/work/llama.cpp-build/bin/llama-bench python3 scripts/bench/bench_streaming.py vs-llama \
        -m MODEL.gguf --text heldout.txt --budgets 50,25 --readahead 128,8192 -n 8 -r 2 -t 1 \
        [--rounds 2] [--timeout 240]

   For each budget, moe-run (that expert cache, O_DIRECT, no flash emulation) runs once without
   a limit; its peak RSS is limit (a), "the same memory". Limit (b) is llama.cpp's own footprint
   when fully resident (cgroup peak with the file read in first) minus the expert bytes the
   budget leaves out: the same expert budget on top of each engine's fixed overhead. Then, in
   alternating rounds, both engines run in a child cgroup of /sys/fs/cgroup/memory with
   memory.limit_in_bytes at each limit and each --readahead value (the model's block device
   read_ahead_kb, restored afterwards): llama-bench `-p 0 --repack 0 -lm mmap` (random tokens, as
   its tg test does) and moe-run bench. The page cache is dropped before every run. A run that
   hits the timeout is reported as "< X t/s". "disk MiB/tok" is the block device's read counter
   (/sys/block/DEV/stat) over the run divided by the tokens decoded, loading included; it is
   device-wide, so other processes' reads inflate it. Use -t 1 on a busy machine: ggml's spinning thread
   pool collapses when the cores are oversubscribed (0.16 t/s instead of 10 seen here).
"""
import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# One cgroup per run of this script, so that concurrent benchmarks do not share limits.
CG = f"/sys/fs/cgroup/memory/moe-edge-bench-{os.getpid()}"


def moe_run_path():
    target = os.environ.get("CARGO_TARGET_DIR", f"{ROOT}/target")
    return os.path.join(target, "release", "moe-run")


def moe_bench(model, budget, eviction, lookahead, predictor, profile, n, threads, reps, text=None,
              cgroup=False, timeout=None):
    cmd = [moe_run_path(), "bench", "-m", model, "-p", "0", "-n", str(n),
           "-r", str(reps), "-t", str(threads), "--json",
           "--expert-cache", cache_arg(model, budget), "--eviction", eviction, "--lookahead", str(lookahead),
           "--predictor", predictor, "--direct-io"]
    if profile:
        cmd += ["--flash-profile", profile]
    if text:
        cmd += ["--text", text]
    if cgroup:
        cmd = ["sh", "-c", f"echo $$ > {CG}/cgroup.procs && exec \"$@\"", "sh"] + cmd
    return json.loads(subprocess.run(cmd, check=True, text=True, capture_output=True, timeout=timeout).stdout)


def cache_arg(model, budget):
    """--expert-cache value for a budget: "50" = 50% of the expert bytes; "50s" = slots for 50%
    of the routed experts (differs when slabs are not page multiples: each slot is padded)."""
    b = str(budget)
    if not b.endswith("s"):
        return f"{b}%"
    _, n, slot = gguf_experts(model)
    return str(round(float(b[:-1]) / 100 * n) * slot)


def fmt_preds(rep, predictor):
    preds = [dict(p, label=f"d{p['depth']}") for p in rep.get("predictions", []) if p.get("predicted")]
    if rep.get("predictor") and rep["predictor"].get("predicted"):
        preds.append(dict(rep["predictor"], label=predictor))
    return ", ".join(f"{p['label']} {p['correct'] / p['predicted']:.2f}/{p['correct'] / max(p['actual'], 1):.2f}"
                     for p in preds) or "-"


def parse_setups(text):
    """"belady:1,belady:0:pregate" -> [(eviction, lookahead, predictor)]."""
    out = []
    for item in text.split(","):
        parts = item.split(":")
        out.append((parts[0], int(parts[1]) if len(parts) > 1 else 0, parts[2] if len(parts) > 2 else "none"))
    return out


def setup_name(setup):
    eviction, lookahead, predictor = setup
    return f"{eviction}:{lookahead}" + (f":{predictor}" if predictor != "none" else "")


def grid(args):
    setups = parse_setups(args.setups)
    cells = [(p, b, s) for p in args.profiles.split(",") for b in args.budgets.split(",") for s in setups]
    runs = {c: [] for c in cells}
    raw = []
    for r in range(args.reps):
        for c in cells:
            profile, budget, (ev, la, pred) = c
            rep = moe_bench(args.model, budget, ev, la, pred, profile, args.n, args.threads, 1, args.text)
            runs[c].append(rep)
            raw.append({"rep": r, "profile": profile, "budget": budget, "eviction": ev,
                        "lookahead": la, "predictor": pred, "report": rep})
            print(f"rep {r} {profile} {budget}% {ev}:{la}:{pred} "
                  f"{rep['tests'][0]['tokens_per_second_mean']:.2f} t/s", file=sys.stderr, flush=True)
            if args.json_out:  # after every run, so an interrupted grid still has its data
                with open(args.json_out, "w") as f:
                    json.dump({"args": vars(args), "runs": raw}, f)
    table(args, cells, runs)


def table_from_json(args):
    """Re-print the table of a (possibly interrupted) grid from its --json-out file."""
    with open(args.json) as f:
        d = json.load(f)
    a = argparse.Namespace(**d["args"])
    cells, runs = [], {}
    for r in d["runs"]:
        c = (r["profile"], r["budget"], (r["eviction"], r["lookahead"], r["predictor"]))
        if c not in runs:
            cells.append(c)
            runs[c] = []
        runs[c].append(r["report"])
    a.reps = max(len(v) for v in runs.values())
    table(a, cells, runs)


def slots(rep):
    m = re.search(r"expert cache: (\d+) slots", rep.get("setup", ""))
    return int(m.group(1)) if m else None


def table(args, cells, runs):
    toks = 2 * args.n  # one warm-up + one measured repetition per run
    n_exp = gguf_experts(args.model)[1]
    print(f"\nmodel {os.path.basename(args.model)}, -n {args.n}, {args.reps} interleaved runs per cell "
          f"(each: 1 warm-up + 1 measured), threads {args.threads}, text {args.text or 'greedy from pseudo-random tokens'}\n")
    print("cache = expert budget as a share of expert bytes; slots = experts it holds (each slot is "
          "padded to whole pages per slab for O_DIRECT), as a share of all routed experts\n")
    print("| flash | cache (slots) | eviction | lookahead | predictor | tg t/s (runs) | hit % | stall ms/tok | "
          "MiB read/tok | min MiB/tok | read/min | prefetch prec % | prediction prec/recall | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in cells:
        profile, budget, (ev, la, pred) = c
        reps = runs[c]
        tps = [rep["tests"][0]["tokens_per_second_mean"] for rep in reps]
        caches = [rep["tests"][0]["cache"] or {} for rep in reps]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        hit = mean([x.get("hit_rate", 0) for x in caches])
        stall = mean([x.get("stall_seconds_per_token", 0) for x in caches])
        pprec = mean([x.get("prefetch_precision", 0) for x in caches])
        read = mean([rep["optimum"]["bytes_read"] for rep in reps]) / toks / 2**20
        opt = mean([rep["optimum"]["optimal_bytes"] for rep in reps]) / toks / 2**20
        ratio = f"{read / opt:.2f}" if opt > 0 else "-"
        rss = max(rep["peak_rss_bytes"] or 0 for rep in reps) / 2**20
        sl = slots(reps[0])
        label = f"{budget[:-1]}% of experts" if str(budget).endswith("s") else f"{budget}%"
        print(f"| {profile} | {label} ({100 * sl / n_exp:.0f}%) | {ev} | {la} | {pred} | {statistics.median(tps):.1f} "
              f"({', '.join(f'{t:.1f}' for t in tps)}) | {100 * hit:.1f} | {1e3 * stall:.2f} | {read:.2f} | {opt:.2f} "
              f"| {ratio} | {100 * pprec:.0f} | {fmt_preds(reps[-1], pred)} | {rss:.0f} |", flush=True)


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def cgroup_reset(limit_bytes):
    """(Re)create the bench cgroup with this limit (None = unlimited), drop the page cache (which
    also uncharges the previous run's file pages) and start a fresh peak counter."""
    os.makedirs(CG, exist_ok=True)
    with open(f"{CG}/memory.limit_in_bytes", "w") as f:
        f.write(str(limit_bytes) if limit_bytes else "-1")
    drop_caches()
    # Writing 0 restarts the peak at the current usage: only meaningful after the drop.
    with open(f"{CG}/memory.max_usage_in_bytes", "w") as f:
        f.write("0")
    with open(f"{CG}/memory.failcnt", "w") as f:
        f.write("0")


def cgroup_peak():
    with open(f"{CG}/memory.max_usage_in_bytes") as f:
        return int(f.read())


def block_device(path):
    """The /sys/block name holding path (partitions resolved to their disk)."""
    dev = os.stat(path).st_dev
    sysdev = os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if os.path.exists(os.path.join(sysdev, "partition")):
        sysdev = os.path.dirname(sysdev)
    return os.path.basename(sysdev)


def disk_read_bytes(dev):
    """Bytes read from the whole block device so far (/sys/block/DEV/stat, field 3 = sectors of
    512 bytes). Device-wide: other processes' reads count too, so this is an upper bound."""
    with open(f"/sys/block/{dev}/stat") as f:
        return int(f.read().split()[2]) * 512


def readahead(dev, kb=None):
    p = f"/sys/block/{dev}/queue/read_ahead_kb"
    if kb is not None:
        with open(p, "w") as f:
            f.write(str(kb))
    with open(p) as f:
        return int(f.read())


def read_note(dev, before, tokens):
    """Disk bytes read since `before`, per decoded token (loading included), as a note."""
    if dev is None:
        return ""
    return f", disk {(disk_read_bytes(dev) - before) / tokens / 2**20:.2f} MiB/tok"


def moe_limited(args, setup, budget, limit_bytes, dev=None):
    """moe-run bench with setup (eviction, lookahead, predictor) on the real disk (O_DIRECT, no
    flash emulation) in the memory cgroup: (t/s or None, note, cgroup peak bytes, report or
    None). With dev, the note gives the block device's bytes read per decoded token (a warm-up
    run plus reps runs of n tokens)."""
    cgroup_reset(limit_bytes)
    before = disk_read_bytes(dev) if dev else 0
    eviction, lookahead, predictor = setup
    try:
        rep = moe_bench(args.model, budget, eviction, lookahead, predictor, None, args.n,
                        args.threads, args.reps, args.text, cgroup=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return None, f"< {(args.reps + 1) * args.n / args.timeout:.3f} t/s (timeout {args.timeout} s)", cgroup_peak(), None
    except subprocess.CalledProcessError as e:
        return None, f"failed rc={e.returncode}", cgroup_peak(), None
    tg = rep["tests"][0]
    note = f"hit {100 * (tg['cache'] or {}).get('hit_rate', 1):.1f}%" + read_note(dev, before, (args.reps + 1) * args.n)
    return tg["tokens_per_second_mean"], note, cgroup_peak(), rep


def llama_limited(binary, model, limit_bytes, n, threads, timeout, preload=False, reps=2, dev=None):
    """llama-bench tg in the memory cgroup: (t/s or None, note, cgroup peak bytes). preload reads
    the whole file into the page cache from inside the cgroup first, so the peak is llama.cpp's
    fully resident footprint (file + its own overhead). With dev, the note gives the block
    device's bytes read per decoded token (llama-bench: 1 warm-up token plus reps runs of n)."""
    cgroup_reset(limit_bytes)
    before = disk_read_bytes(dev) if dev else 0
    cat = f"cat {model} > /dev/null && " if preload else ""
    cmd = ["sh", "-c", f"echo $$ > {CG}/cgroup.procs && {cat}exec {binary} -m {model} -p 0 -n {n} "
           f"-t {threads} -r {reps} --repack 0 -lm mmap -o json"]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, text=True, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"< {(reps + 1) * n / timeout:.3f} t/s (timeout {timeout} s)", cgroup_peak()
    if p.returncode != 0:
        last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
        return None, f"failed rc={p.returncode} after {time.time() - t0:.0f} s {last}", cgroup_peak()
    return json.loads(p.stdout)[0]["avg_ts"], read_note(dev, before, reps * n + 1).lstrip(", "), cgroup_peak()


def llama_setup(args, var, tool):
    """(llama.cpp tool from environment variable var, block device of the model, its current
    read_ahead_kb, the read_ahead_kb values to measure)."""
    binary = os.environ.get(var)
    if not binary:
        sys.exit(f"set {var} to {tool}'s path")
    dev = block_device(args.model)
    ra0 = readahead(dev)
    return binary, dev, ra0, [int(x) for x in args.readahead.split(",")] if args.readahead else [ra0]


@contextlib.contextmanager
def machine_restored(dev, ra0):
    """Whatever happens inside (also SIGTERM): the block device's read_ahead_kb goes back to ra0
    and the bench cgroup is removed."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        yield
    finally:
        readahead(dev, ra0)
        if os.path.isdir(CG):
            os.rmdir(CG)


def vs_llama(args):
    binary, dev, ra0, ras = llama_setup(args, "LLAMA_BENCH", "llama-bench")
    print(f"\nmodel {os.path.basename(args.model)}, block device {dev}, read_ahead_kb was {ra0}; "
          f"llama.cpp: llama-bench -p 0 -n {args.n} -t {args.threads} -r {args.reps} --repack 0 -lm mmap; "
          f"moe-run: bench -p 0 -n {args.n} -r {args.reps} --direct-io {'--text ' + args.text if args.text else ''}, "
          f"no flash emulation; "
          f"page cache dropped before every run\n", flush=True)
    rows = []
    setups = parse_setups(args.setups) if args.setups else [(args.eviction, args.lookahead, "none")]
    with machine_restored(dev, ra0):
        exp_total = expert_total_from_gguf(args.model)
        tps, note, full = llama_limited(binary, args.model, None, args.n, args.threads, args.timeout, preload=True, reps=args.reps)
        rows.append(("llama.cpp", "100% (file preloaded, no limit)", ra0, "none", tps, note, full))
        print(f"llama.cpp fully resident: {tps} t/s {note} peak {full / 2**20:.1f} MiB, experts "
              f"{exp_total / 2**20:.1f} MiB", file=sys.stderr, flush=True)
        for ra in ras:
            readahead(dev, ra)
            tps, note, peak = llama_limited(binary, args.model, None, args.n, args.threads, args.timeout, reps=args.reps)
            rows.append(("llama.cpp", "100% (cold, no limit)", ra, "none", tps, note, peak))
            print(f"llama.cpp cold unlimited ra={ra}: {tps} t/s {note} peak {peak / 2**20:.1f} MiB", file=sys.stderr, flush=True)
        readahead(dev, ra0)
        # Disk bytes per decoded token, loading included: moe-run decodes a warm-up run plus
        # reps runs of n tokens, llama-bench 1 warm-up token plus reps runs.
        compare_under_limits(
            args, setups, ras, dev, full, exp_total,
            lambda setup, budget, lim: moe_limited(args, setup, budget, lim, dev if lim else None),
            lambda lim: llama_limited(binary, args.model, lim, args.n, args.threads, args.timeout,
                                      reps=args.reps, dev=dev),
            rows)
    print_vs_tables(rows, setups)


def in_cgroup(cmd):
    return ["sh", "-c", f"echo $$ > {CG}/cgroup.procs && exec \"$@\"", "sh"] + cmd


def moe_eval_limited(args, setup, budget, limit_bytes, dev):
    """moe-run eval (teacher-forced decoding of args.text, one token per step, --window tokens
    per context) in the cgroup: (t/s or None, note, cgroup peak, report or None)."""
    cgroup_reset(limit_bytes)
    before = disk_read_bytes(dev) if dev else 0
    eviction, lookahead, predictor = setup
    cmd = [moe_run_path(), "eval", "-m", args.model, "--text", args.text, "--max-tokens", str(args.tokens),
           "--window", str(args.window), "-t", str(args.threads), "--expert-cache", cache_arg(args.model, budget),
           "--eviction", eviction, "--lookahead", str(lookahead), "--predictor", predictor, "--direct-io"]
    try:
        p = subprocess.run(in_cgroup(cmd), text=True, capture_output=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return None, f"timeout {args.timeout} s", cgroup_peak(), None
    if p.returncode != 0:
        return None, f"failed rc={p.returncode}", cgroup_peak(), None
    rep = json.loads(p.stdout)
    note = f"ppl {rep['perplexity']:.4f}" + read_note(dev, before, rep["tokens"])
    return rep["tokens"] / rep["seconds"], note, cgroup_peak(), rep


def llama_ppl_limited(binary, args, limit_bytes, dev, preload=False):
    """llama-perplexity with one token per decode call (-b 1: the same teacher-forced decoding
    as moe-run eval) over the same text and context length, in the cgroup: (t/s or None, note,
    cgroup peak). Speed from llama.cpp's own "prompt eval time" line (load excluded)."""
    cgroup_reset(limit_bytes)
    before = disk_read_bytes(dev) if dev else 0
    chunks = args.tokens // args.window
    cat = f"cat {args.model} > /dev/null && " if preload else ""
    cmd = ["sh", "-c", f"echo $$ > {CG}/cgroup.procs && {cat}exec {binary} -m {args.model} -f {args.text} "
           f"-c {args.window} -b 1 -ub 1 --chunks {chunks} -t {args.threads} --no-repack --perf -lv 4"]
    try:
        p = subprocess.run(cmd, text=True, capture_output=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return None, f"timeout {args.timeout} s", cgroup_peak()
    # llama.cpp counts a single-token batch after the first of a context as "eval": decode
    # time is both lines together.
    timed = re.findall(r"(?:prompt eval|eval) time =\s*([0-9.]+) ms /\s*(\d+) (?:tokens|runs)", p.stderr)
    if p.returncode != 0 or len(timed) != 2:
        last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
        return None, f"failed rc={p.returncode} {last}", cgroup_peak()
    ms, tokens = sum(float(t) for t, _ in timed), sum(int(n) for _, n in timed)
    ppl = re.search(r"Final estimate: PPL = ([0-9.]+)", p.stderr)
    note = (f"ppl {float(ppl.group(1)):.4f} (2nd halves)" if ppl else "") + read_note(dev, before, tokens)
    return tokens / (ms / 1e3), note, cgroup_peak()


def vs_llama_text(args):
    binary, dev, ra0, ras = llama_setup(args, "LLAMA_PERPLEXITY", "llama-perplexity")
    setups = parse_setups(args.setups)
    print(f"\nmodel {os.path.basename(args.model)}, block device {dev}, read_ahead_kb was {ra0}; both engines "
          f"decode the first {args.tokens} tokens of {os.path.basename(args.text)} one token per step, "
          f"teacher-forced, in contexts of {args.window}; llama.cpp: llama-perplexity -c {args.window} -b 1 -ub 1 "
          f"-t {args.threads} --no-repack (mmap); moe-run: eval --window {args.window} -t {args.threads} "
          f"--direct-io; page cache dropped before every run; load time excluded\n", flush=True)
    rows = []
    with machine_restored(dev, ra0):
        exp_total = expert_total_from_gguf(args.model)
        tps, note, full = llama_ppl_limited(binary, args, None, dev, preload=True)
        rows.append(("llama.cpp", "100% (file preloaded, no limit)", ra0, "none", tps, note, full))
        print(f"llama.cpp resident: {tps} t/s {note} peak {full / 2**20:.1f} MiB", file=sys.stderr, flush=True)
        compare_under_limits(
            args, setups, ras, dev, full, exp_total,
            lambda setup, budget, lim: moe_eval_limited(args, setup, budget, lim, dev),
            lambda lim: llama_ppl_limited(binary, args, lim, dev),
            rows)
    print_vs_tables(rows, setups)


def compare_under_limits(args, setups, ras, dev, full, exp_total, run_moe, run_llama, rows):
    """Per budget: every moe-run setup without a limit (its largest peak RSS is limit (a)), then
    rounds alternating the engines under limit (a) and limit (b) = llama.cpp's resident
    footprint minus the expert bytes the budget leaves out, at every readahead (moe-run's dense
    weights are mapped too). run_moe(setup, budget, limit) -> (t/s, note, cgroup peak, report);
    run_llama(limit) -> (t/s, note, cgroup peak). Appends to rows."""
    ra0 = readahead(dev)
    for budget in [int(b) for b in args.budgets.split(",")]:
        # moe-run's peak RSS, not its cgroup peak: that also holds reclaimable page cache (e.g.
        # of the file's metadata), which a limit takes back without slowing it down.
        moe_rss = 0
        for setup in setups:
            tps, note, peak, rep = run_moe(setup, budget, None)
            rss = rep["peak_rss_bytes"] if rep else 0
            moe_rss = max(moe_rss, rss)
            rows.append((f"moe-run {setup_name(setup)}", f"{budget}%", ra0, "none", tps,
                         f"{note}, peak RSS {rss / 2**20:.1f} MiB", peak))
            print(f"moe-run {setup_name(setup)} {budget}% unlimited: {tps} t/s {note}, peak RSS "
                  f"{rss / 2**20:.1f} MiB, cgroup peak {peak / 2**20:.1f} MiB", file=sys.stderr, flush=True)
        limits = [("(a) moe-run peak RSS", moe_rss),
                  ("(b) llama.cpp resident - left-out experts", int(full - (1 - budget / 100) * exp_total))]
        for rnd in range(args.rounds):
            for label, lim in limits:
                for ra in ras:
                    readahead(dev, ra)
                    for setup in setups:
                        tps, note, peak, _ = run_moe(setup, budget, lim)
                        rows.append((f"moe-run {setup_name(setup)}", f"{budget}%", ra,
                                     f"{label}: {lim / 2**20:.1f} MiB", tps, note, peak))
                        print(f"moe-run {setup_name(setup)} {budget}% ra={ra} {label} {lim / 2**20:.1f} MiB: "
                              f"{tps} {note}", file=sys.stderr, flush=True)
                    tps, note, peak = run_llama(lim)
                    readahead(dev, ra0)
                    rows.append(("llama.cpp", f"{budget}%", ra, f"{label}: {lim / 2**20:.1f} MiB", tps, note, peak))
                    print(f"llama {budget}% ra={ra} {label} {lim / 2**20:.1f} MiB: {tps} {note}",
                          file=sys.stderr, flush=True)


def print_vs_tables(rows, setups):
    """Every run, then per budget, limit, readahead and moe-run setup the medians over rounds."""
    print("| engine | expert budget | read_ahead_kb | cgroup limit | t/s | note | cgroup peak MiB |", flush=True)
    print("|---|---|---|---|---|---|---|")
    for eng, b, ra, lim, tps, note, peak in rows:
        print(f"| {eng} | {b} | {ra} | {lim} | {f'{tps:.2f}' if tps is not None else '-'} | {note} | {peak / 2**20:.1f} |")
    cells, reads = {}, {}
    for eng, b, ra, lim, tps, note, peak in rows:
        if lim != "none":
            cells.setdefault((b, lim, ra), {}).setdefault(eng, []).append(tps if tps is not None else 0.0)
            m = re.search(r"disk ([0-9.]+) MiB/tok", note)
            if m:
                reads.setdefault((b, lim, ra), {}).setdefault(eng, []).append(float(m.group(1)))
    print("\n| expert budget | cgroup limit | read_ahead_kb | moe-run setup | moe-run t/s | llama.cpp t/s "
          "| ratio | disk MiB/tok moe-run | disk MiB/tok llama.cpp |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (b, lim, ra), e in cells.items():
        ll = statistics.median(e.get("llama.cpp", [0]))
        r = reads.get((b, lim, ra), {})
        rl = f"{statistics.median(r['llama.cpp']):.2f}" if r.get("llama.cpp") else "-"
        for setup in setups:
            eng = f"moe-run {setup_name(setup)}"
            m = statistics.median(e.get(eng, [0]))
            rm = f"{statistics.median(r[eng]):.2f}" if r.get(eng) else "-"
            print(f"| {b} | {lim} | {ra} | {setup_name(setup)} | {m:.2f} | {ll:.2f} "
                  f"| {f'{m / ll:.1f}x' if ll > 0 else 'llama.cpp failed'} | {rm} | {rl} |")


def gguf_experts(model):
    """(bytes of all routed experts, number of routed experts over all layers), read with the
    gguf package (pip install gguf, or llama.cpp's gguf-py on PYTHONPATH)."""
    import gguf  # noqa: E402
    r = gguf.GGUFReader(model)
    exps = [t for t in r.tensors if t.name.endswith("_exps.weight")]
    n = sum(int(t.shape[-1]) for t in exps if t.name.endswith("ffn_gate_exps.weight"))
    # One cache slot, as runtime/src/moe/cache/layout.rs sizes it: per slab kind, the largest slab of
    # any layer, plus a page when it is not page-aligned, rounded up to whole pages.
    page, spans = 4096, {}
    for t in exps:
        kind = t.name.split(".")[-2]
        slab = int(t.n_bytes) // int(t.shape[-1])
        worst = slab if slab % page == 0 and t.data_offset % page == 0 else slab + page
        spans[kind] = max(spans.get(kind, 0), -(-worst // page) * page)
    return sum(int(t.n_bytes) for t in exps), n, sum(spans.values())


def expert_total_from_gguf(model):
    return gguf_experts(model)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("grid")
    g.add_argument("-m", "--model", required=True)
    g.add_argument("--budgets", default="100,75,50,25")
    g.add_argument("--profiles", default="microsd,usb-ssd,nvme")
    # eviction:lookahead[:predictor], predictor one of none (default), frequency, pregate
    g.add_argument("--setups", default="lru:0,lfu:0,belady:0,belady:1,belady:2,belady:0:frequency")
    g.add_argument("--text", help="decode this text teacher-forced (real routing) instead of greedy")
    g.add_argument("-n", type=int, default=32)
    g.add_argument("-t", "--threads", type=int, default=2)
    g.add_argument("-r", "--reps", type=int, default=2, help="interleaved runs per cell")
    g.add_argument("--json-out", help="write every run's moe-run JSON here")
    # budgets: "50" = 50% of the expert bytes, "50s" = room for 50% of the experts
    tj = sub.add_parser("table", help="re-print a grid's table from its --json-out file")
    tj.add_argument("json")
    v = sub.add_parser("vs-llama")
    v.add_argument("-m", "--model", required=True)
    v.add_argument("--budgets", default="50")
    v.add_argument("--eviction", default="belady")
    v.add_argument("--lookahead", type=int, default=0)
    v.add_argument("--setups", help="moe-run setups to compare, each EVICTION:LOOKAHEAD[:PREDICTOR] "
                   "(e.g. belady:0,belady:1,belady:0:pregate); default: --eviction and --lookahead")
    v.add_argument("--readahead", help="comma-separated read_ahead_kb values for llama.cpp runs")
    v.add_argument("-n", type=int, default=8)
    v.add_argument("-r", "--reps", type=int, default=2,
                   help="measured repetitions of both engines' tg test (each also warms up once)")
    v.add_argument("--text", help="moe-run decodes this text (llama-bench always feeds random tokens)")
    v.add_argument("--rounds", type=int, default=2, help="alternating rounds of both engines per limit")
    v.add_argument("-t", "--threads", type=int, default=2)
    v.add_argument("--timeout", type=int, default=300)
    vt = sub.add_parser("vs-llama-text", help="like vs-llama, but both engines decode the same text "
                        "teacher-forced (moe-run eval against llama-perplexity -b 1), so both see real routing")
    vt.add_argument("-m", "--model", required=True)
    vt.add_argument("--text", required=True)
    vt.add_argument("--budgets", default="50")
    vt.add_argument("--setups", default="belady:0")
    vt.add_argument("--readahead", help="comma-separated read_ahead_kb values")
    vt.add_argument("--tokens", type=int, default=512, help="tokens decoded (whole contexts of --window)")
    vt.add_argument("--window", type=int, default=128)
    vt.add_argument("--rounds", type=int, default=2)
    vt.add_argument("-t", "--threads", type=int, default=1)
    vt.add_argument("--timeout", type=int, default=600)
    args = ap.parse_args()
    if args.cmd != "table" and not os.path.exists(moe_run_path()):
        sys.exit(f"{moe_run_path()} missing: cargo build --release -p moe-runtime --bin moe-run")
    {"grid": grid, "table": table_from_json, "vs-llama": vs_llama,
     "vs-llama-text": vs_llama_text}[args.cmd](args)


if __name__ == "__main__":
    main()
