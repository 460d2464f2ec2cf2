#!/usr/bin/env python3
"""Checks that the code's layout tells its architecture (run by scripts/test.sh):

- no import cycle between the files of a crate (`use crate::..`, `super::..` paths; a parent
  module declaring or re-exporting its children does not count as using them);
- in moe-runtime, no module imports a higher layer (see LAYERS);
- no source file over MAX_LINES lines unless its module docs say why ("This file is long
  because ...").

    python3 scripts/check/check_layout.py      # exit 1 and a report when something is wrong
"""
import re, sys, os
from pathlib import Path

def modfiles(src):
    mods = {}
    for p in Path(src).rglob('*.rs'):
        rel = p.relative_to(src)
        parts = list(rel.with_suffix('').parts)
        if parts[0] == 'bin': continue
        if parts[-1] in ('mod', 'lib', 'main'): parts = parts[:-1]
        mods[tuple(parts)] = p
    return mods

def strip_comments(t):
    # Unit-test modules sit at the end of a file; their `super::` is the file itself.
    at = t.find('#[cfg(test)]')
    if at >= 0:
        t = t[:at]
    t = re.sub(r'//[^\n]*', '', t)
    t = re.sub(r'/\*.*?\*/', '', t, flags=re.S)
    t = re.sub(r'"(\\.|[^"\\])*"', '""', t)
    return t

def paths_in(text):
    # expand `use a::{b, c::{d}}` roughly: collect every crate::/super:: path prefix
    out = []
    for m in re.finditer(r'\b(pub(?:\([^)]*\))?\s+)?use\s+([^;]+);', text):
        is_pub = bool(m.group(1))
        body = m.group(2)
        def expand(prefix, s):
            s = s.strip()
            i = s.find('{')
            if i < 0:
                for part in s.split(','):
                    part = part.strip().split(' as ')[0].strip()
                    if part: yield prefix + part
                return
            head = s[:i]
            # find matching brace
            depth = 0; j = i
            for j in range(i, len(s)):
                if s[j] == '{': depth += 1
                elif s[j] == '}':
                    depth -= 1
                    if depth == 0: break
            inner = s[i+1:j]
            # split inner at top-level commas
            items, depth, cur = [], 0, ''
            for ch in inner:
                if ch == '{': depth += 1
                if ch == '}': depth -= 1
                if ch == ',' and depth == 0:
                    items.append(cur); cur = ''
                else: cur += ch
            items.append(cur)
            for it in items:
                if it.strip(): yield from expand(prefix + head, it)
        for p in expand('', body):
            out.append((p.replace(' ', ''), is_pub))
    for m in re.finditer(r'\b((?:crate|super)(?:::\w+)+)', text):
        out.append((m.group(1), False))
    return out

def resolve(path, here, mods):
    parts = path.split('::')
    base = list(here)
    if parts[0] == 'crate':
        base = []; parts = parts[1:]
    elif parts[0] == 'self':
        parts = parts[1:]
    while parts and parts[0] == 'super':
        base = base[:-1]; parts = parts[1:]
    full = base + parts
    for n in range(len(full), -1, -1):
        if tuple(full[:n]) in mods:
            return tuple(full[:n])
    return None

# moe-runtime's top-level modules, lowest first: a module may use its own layer and lower ones.
LAYERS = [
    ["units", "threads", "npy", "onnx"],
    ["gguf"],
    ["tensor"],
    ["tokenizer", "sampling"],
    ["grammar"],
    ["moe"],
    ["model"],
    ["board"],
    ["engine"],
    ["cli"],
    [""],  # lib.rs
]
MAX_LINES = 700
LONG_REASON = "This file is long because"


def graph_of(src):
    mods = modfiles(src)
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        text = strip_comments(p.read_text())
        is_modfile = p.name in ('mod.rs', 'lib.rs')
        for path, is_pub in paths_in(text):
            t = resolve(path, m, mods)
            if t is None or t == m:
                continue
            # a parent re-exporting its children is a facade, not a dependency
            if is_modfile and is_pub and t[:len(m)] == m:
                continue
            graph[m].add(t)
    return mods, graph


def cycles(graph):
    index, low, stack, on, sccs = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(comp)

    for v in graph:
        if v not in index:
            strong(v)
    return sccs


def name(m):
    return '::'.join(m) or 'lib'


def check(src, layered):
    problems = []
    mods, graph = graph_of(src)
    for c in cycles(graph):
        edges = [f'{name(a)} -> {name(b)}' for a in c for b in sorted(graph[a]) if b in c]
        problems.append(f'{src}: import cycle between {", ".join(sorted(map(name, c)))}: '
                        + '; '.join(edges))
    if layered:
        rank = {mod: i for i, layer in enumerate(LAYERS) for mod in layer}
        for a, targets in graph.items():
            for b in targets:
                ra, rb = rank.get(a[0] if a else ''), rank.get(b[0] if b else '')
                if ra is None or rb is None:
                    problems.append(f'{src}: module {name(a if ra is None else b)} is in no layer of LAYERS')
                elif rb > ra:
                    problems.append(f'{src}: {name(a)} (layer {ra}) uses {name(b)} (layer {rb}), a higher layer')
    for p in sorted(Path(src).rglob('*.rs')):
        lines = p.read_text().count('\n')
        if lines > MAX_LINES and LONG_REASON not in p.read_text():
            problems.append(f'{p}: {lines} lines; split it by concern or say why at its top '
                            f'("{LONG_REASON} ...")')
    return sorted(set(problems))


def main():
    root = Path(__file__).resolve().parents[2]
    crates = [('runtime/src', True), ('convert/src', False), ('daemon/src', False)]
    problems = [p for src, layered in crates for p in check(str(root / src), layered)]
    for p in problems:
        print(p)
    if problems:
        print(f'check_layout: {len(problems)} problem(s)')
        return 1
    print('check_layout: no import cycles, layers respected, no overlong files')
    return 0


if __name__ == '__main__':
    sys.exit(main())
