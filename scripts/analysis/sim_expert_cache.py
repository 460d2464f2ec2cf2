"""Offline cache-policy simulation for moe-edge (routed-expert cache, group = a layer's top-4).
Usage: python3 scripts/analysis/sim_expert_cache.py TRACE_PREFIX [FREQ_RATE STICKINESS_RATE]
TRACE_PREFIX is what `moe-run trace --no-probs -o TRACE_PREFIX` wrote (made for the trained
model models/small-moe: 24 experts, top-4, 6 layers; cache sizes 72 and 36 slots = 50%/25%).
Prints misses of online policies against Belady's offline minimum (first half used to fit,
second half reported); the runtime's Belady estimate (runtime/src/moe/cache/policy.rs) uses the
"sticky frequency" rows' formula.
Keys k = layer*24+expert. Step = token*L + layer. Scores: larger = evict first; ties -> older
last use -> lower slot index (as the runtime's `victim`)."""
import json, sys, numpy as np
from collections import OrderedDict

PREFIX = sys.argv[1] if len(sys.argv) > 1 else sys.exit(__doc__)
A = np.load(PREFIX + '.experts.npy'); T, L, K = A.shape
E = json.load(open(PREFIX + '.json'))['n_expert']; N = L * E
HALF = T // 2
KEYS = (np.arange(L)[None, :, None] * E + A)           # [T,L,K]
KLAYER = np.arange(N) // E

def next_use_table():
    """nxt[t,l,j] = step of the next request of KEYS[t,l,j] after (t,l), inf if none."""
    nxt = np.full((T, L, K), np.iinfo(np.int64).max, np.int64); last = np.full(N, np.iinfo(np.int64).max, np.int64)
    for t in range(T - 1, -1, -1):
        for l in range(L - 1, -1, -1):
            ks = KEYS[t, l]; nxt[t, l] = last[ks]; last[ks] = t * L + l
    return nxt
NXT = None

class Policy:
    name = 'base'
    def reset(self): pass
    def visit(self, t, l, ks): pass          # before the group's lookups (record_use)
    def score(self, t, l): raise NotImplementedError
    def admit_low(self, t, l, k): return False   # bypass: mark newcomer evict-first

def simulate(pol, C, count_from=0):
    """Returns misses per token (int array [T]); cache starts empty at token 0."""
    per_tok = np.zeros(T, np.int64)
    pol.reset()
    slot_of = np.full(N, -1); key_in = np.full(C, -1); free = list(range(C))[::-1]
    last_use = np.full(N, -1, np.int64); low = np.zeros(N, bool)
    misses = 0
    resident = np.zeros(N, bool)
    for t in range(T):
        for l in range(L):
            step = t * L + l; ks = KEYS[t, l]
            pol.visit(t, l, ks)
            miss = [k for k in ks if not resident[k]]
            per_tok[t] += len(miss)
            need = len(miss) - len(free)
            if need > 0:
                cand = resident.copy(); cand[ks] = False
                ci = np.nonzero(cand)[0]
                sc = pol.score(t, l)[ci]
                pri = low[ci].astype(np.int8)  # bypass-marked first
                order = np.lexsort((slot_of[ci], last_use[ci], -sc, -pri))
                for k in ci[order[:need]]:
                    s = slot_of[k]; resident[k] = False; slot_of[k] = -1; free.append(s); low[k] = False
                free.sort(reverse=True)
            for k in ks:
                if not resident[k]:
                    s = free.pop(); slot_of[k] = s; key_in[s] = k; resident[k] = True
                    low[k] = pol.admit_low(t, l, k)
                else:
                    low[k] = False
            last_use[ks] = step
            if hasattr(pol, 'after'): pol.after(t, l, ks)
    return per_tok

def next_visit(t, l):
    """step of the next visit of each key's layer, from position (t,l)."""
    return np.where(KLAYER > l, t * L + KLAYER, (t + 1) * L + KLAYER)

class MIN(Policy):
    name = 'MIN (offline, group-constrained)'
    def reset(self):
        self.nu = np.full(N, np.iinfo(np.int64).max, np.int64)
    def visit(self, t, l, ks): pass
    def after(self, t, l, ks): self.nu[ks] = NXT[t, l]
    def score(self, t, l): return self.nu.astype(np.float64)

class LRU(Policy):
    name = 'LRU'
    def reset(self): self.lu = np.full(N, -1.0)
    def after(self, t, l, ks): self.lu[ks] = t * L + l
    def score(self, t, l): return -self.lu

class EMA(Policy):
    """f = (1-a) f + a [used], once per visit of the key's layer (record_use, before lookups)."""
    def __init__(self, a=0.05, mode='current', floor=1/64, name=None):
        self.a, self.mode, self.floor = a, mode, floor
        self.name = name or f'{mode} a={a}'
    def reset(self): self.f = np.zeros(N, np.float32)
    def visit(self, t, l, ks):
        sl = slice(l * E, (l + 1) * E); u = np.zeros(E, np.float32); u[ks - l * E] = 1
        self.f[sl] = np.float32(1 - self.a) * self.f[sl] + np.float32(self.a) * u
    def score(self, t, l):
        if self.mode == 'lfu': return -self.f.astype(np.float64)
        f = np.maximum(self.f, np.float32(self.floor))
        return (next_visit(t, l) + np.floor(L * (1 / f - 1))).astype(np.float64)

class Hazard(Policy):
    """Probability of use at the next visit of the key's layer:
       p = f (EMA, rate a) mixed with recency: p = f + (s - f) * beta**(age-1) where age =
       visits since last use (1 = used at the previous visit), s = EMA of P(used | used last visit).
       Expected next use = next_visit + L*(1/p - 1)."""
    def __init__(self, a=0.05, beta=0.5, sa=0.05, mode='stick', floor=1/64, name=None):
        self.a, self.beta, self.sa, self.mode, self.floor = a, beta, sa, mode, floor
        self.name = name or f'{mode} a={a} beta={beta} sa={sa}'
    def reset(self):
        self.f = np.zeros(N, np.float32); self.s = np.zeros(N, np.float32) + 0.0
        self.lt = np.full(N, -10**9)   # token of last use
    def visit(self, t, l, ks):
        sl = slice(l * E, (l + 1) * E); u = np.zeros(E, np.float32); u[ks - l * E] = 1
        prev = (self.lt[sl] == t - 1)
        # stickiness EMA updated only for experts used at the previous token
        self.s[sl] = np.where(prev, (1 - self.sa) * self.s[sl] + self.sa * u, self.s[sl])
        self.f[sl] = (1 - self.a) * self.f[sl] + self.a * u
        self.lt[ks] = t
    def score(self, t, l):
        nv = next_visit(t, l); ntok = nv // L
        age = ntok - self.lt   # visits between last use and next visit (>=1)
        if self.mode == 'stick':
            p = self.f + (np.maximum(self.s, self.f) - self.f) * self.beta ** np.minimum(age - 1, 60)
        elif self.mode == 'recmix':   # global recency boost, no per-key s
            p = self.f + (1 - self.f) * self.sa * self.beta ** np.minimum(age - 1, 60)
        p = np.maximum(p, self.floor)
        return nv + L * (1 / p - 1)

class Gap(Policy):
    """per-key EMA of inter-use gap (tokens); expected next use token = max(last + g, now + (now-last))."""
    def __init__(self, a=0.2, name=None): self.a = a; self.name = name or f'gap-EMA a={a}'
    def reset(self): self.g = np.full(N, 64.0); self.lt = np.full(N, -1)
    def visit(self, t, l, ks):
        seen = self.lt[ks] >= 0
        gap = t - self.lt[ks]
        self.g[ks] = np.where(seen, (1 - self.a) * self.g[ks] + self.a * gap, self.g[ks])
        self.lt[ks] = t
    def score(self, t, l):
        nv = next_visit(t, l); ntok = nv // L
        pred = np.where(self.lt < 0, ntok + 64, np.maximum(self.lt + self.g, ntok + (ntok - self.lt) - 1))
        return pred * L + KLAYER

class LRU2(Policy):
    name = 'LRU-2'
    def reset(self): self.h = np.full((N, 2), -1e9)
    def after(self, t, l, ks):
        self.h[ks, 1] = self.h[ks, 0]; self.h[ks, 0] = t * L + l
    def score(self, t, l): return -self.h[:, 1]

class WithBypass(Policy):
    """wraps a score policy; a newcomer whose f < thr is marked evict-first until it is hit."""
    def __init__(self, base, thr):
        self.b, self.thr = base, thr; self.name = f'{base.name} +bypass f<{thr}'
    def reset(self): self.b.reset()
    def visit(self, t, l, ks): self.b.visit(t, l, ks)
    def after(self, t, l, ks):
        if hasattr(self.b, 'after'): self.b.after(t, l, ks)
    def score(self, t, l): return self.b.score(t, l)
    def admit_low(self, t, l, k): return bool(self.b.f[k] < self.thr)

def simulate_arc(C, count_from=0):
    """ARC (Megiddo & Modha) with the group constraint: pinned (current group) keys skipped."""
    T1, T2, B1, B2 = OrderedDict(), OrderedDict(), OrderedDict(), OrderedDict(); p = 0.0
    per_tok = np.zeros(T, np.int64)
    def replace(x_in_b2, pinned):
        nonlocal p
        def pop_lru(d):
            for k in d:
                if k not in pinned: del d[k]; return k
            return None
        if T1 and (len(T1) > p or (x_in_b2 and len(T1) == p)):
            k = pop_lru(T1)
            if k is not None: B1[k] = None; return
            k = pop_lru(T2); B2[k] = None
        else:
            k = pop_lru(T2)
            if k is not None: B2[k] = None; return
            k = pop_lru(T1); B1[k] = None
    for t in range(T):
        for l in range(L):
            ks = [int(k) for k in KEYS[t, l]]; pinned = set(ks)
            for x in ks:
                if x in T1: del T1[x]; T2[x] = None; continue
                if x in T2: T2.move_to_end(x); continue
                per_tok[t] += 1
                if x in B1:
                    p = min(C, p + max(len(B2) / len(B1), 1)); replace(False, pinned); del B1[x]; T2[x] = None; continue
                if x in B2:
                    p = max(0, p - max(len(B1) / len(B2), 1)); replace(True, pinned); del B2[x]; T2[x] = None; continue
                if len(T1) + len(B1) == C:
                    if len(T1) < C: B1.popitem(last=False); replace(False, pinned)
                    else:
                        for k in T1:
                            if k not in pinned: del T1[k]; break
                elif len(T1) + len(B1) < C and len(T1) + len(T2) + len(B1) + len(B2) >= C:
                    if len(T1) + len(T2) + len(B1) + len(B2) == 2 * C: B2.popitem(last=False)
                    if len(T1) + len(T2) >= C: replace(False, pinned)
                T1[x] = None
    return per_tok


class TwoEMA(Policy):
    """p = (1-w) f_slow + w f_fast  (mode mix) or max(f_slow, w f_fast) (mode max);
       expected next use = next_visit + L*(1/max(p,floor) - 1)."""
    def __init__(self, a_slow=0.01, a_fast=0.3, w=0.3, mode='mix', floor=1/64, name=None):
        self.as_, self.af, self.w, self.mode, self.floor = a_slow, a_fast, w, mode, floor
        self.name = name or f'2EMA-{mode} slow={a_slow} fast={a_fast} w={w}'
    def reset(self): self.f = np.zeros(N, np.float32); self.g = np.zeros(N, np.float32)
    def visit(self, t, l, ks):
        sl = slice(l * E, (l + 1) * E); u = np.zeros(E, np.float32); u[ks - l * E] = 1
        self.f[sl] = np.float32(1 - self.as_) * self.f[sl] + np.float32(self.as_) * u
        self.g[sl] = np.float32(1 - self.af) * self.g[sl] + np.float32(self.af) * u
    def score(self, t, l):
        if self.mode == 'mix': p = (1 - self.w) * self.f + self.w * self.g
        else: p = np.maximum(self.f, self.w * self.g)
        p = np.maximum(p, np.float32(self.floor))
        return (next_visit(t, l) + np.floor(L * (1 / p - 1))).astype(np.float64)

class Stick(Policy):
    """Frequency + one-token stickiness.
    State per key: f (EMA of use per visit, rate a), s (EMA, rate sa, of [used] over the visits
    that follow a use), used_prev (used at the layer's previous visit).
    p = max(f, s) if the key was used at the previous visit of its layer (i.e. it will be
    at age 1 when its layer comes next) else f;   mode 'const': s replaced by constant S;
    mode 'boost': p = min(1, m*f).
    expected next use = next_visit + L*(1/max(p, floor) - 1); evict largest, ties: older last use."""
    def __init__(self, a=0.01, sa=0.02, mode='key', S=0.35, m=2.0, floor=1/64, s0=0.0, name=None):
        self.a, self.sa, self.mode, self.S, self.m, self.floor, self.s0 = a, sa, mode, S, m, floor, s0
        self.name = name or {'key': f'stick0 a={a} sa={sa}', 'const': f'stick-const a={a} S={S}',
                             'boost': f'stick-boost a={a} m={m}'}[mode]
    def reset(self):
        self.f = np.zeros(N, np.float32); self.s = np.full(N, self.s0, np.float32)
        self.lt = np.full(N, -10**9)
    def visit(self, t, l, ks):
        sl = slice(l * E, (l + 1) * E); u = np.zeros(E, np.float32); u[ks - l * E] = 1
        prev = self.lt[sl] == t - 1
        self.s[sl] = np.where(prev, np.float32(1 - self.sa) * self.s[sl] + np.float32(self.sa) * u, self.s[sl])
        self.f[sl] = np.float32(1 - self.a) * self.f[sl] + np.float32(self.a) * u
        self.lt[ks] = t
    def score(self, t, l):
        nv = next_visit(t, l); ntok = nv // L
        recent = (ntok - self.lt) == 1
        if self.mode == 'key': q = np.maximum(self.f, self.s)
        elif self.mode == 'const': q = np.maximum(self.f, np.float32(self.S))
        else: q = np.minimum(np.float32(1), np.float32(self.m) * self.f)
        p = np.where(recent, q, self.f)
        p = np.maximum(p, np.float32(self.floor))
        return (nv + np.floor(L * (1 / p - 1))).astype(np.float64)

class OracleFreq(EMA):
    """reference, NOT online: current formula with the true frequency of the whole text."""
    def __init__(self):
        EMA.__init__(self, 0.0, 'current', name='oracle static freq (not online)')
        U = np.zeros(N); np.add.at(U, KEYS.reshape(-1), 1); self.F = (U / T).astype(np.float32)
    def reset(self): self.f = self.F.copy()
    def visit(self, t, l, ks): pass

class Trans(Policy):
    """EXPLORATORY (O(n_expert^2) state per layer): M[l][j,e] = EMA(rate b) of P(e used at the
    next visit | j used at this visit); p_e = mean over j in the layer's last set of M[j,e];
    p = max(f, p_e) (mode max) or p_e (mode pure)."""
    def __init__(self, a=0.01, b=0.02, mode='max', floor=1/64):
        self.a, self.b, self.mode, self.floor = a, b, mode, floor
        self.name = f'trans-{mode} a={a} b={b} (n^2 state)'
    def reset(self):
        self.f = np.zeros(N, np.float32); self.M = np.zeros((L, E, E), np.float32)
        self.last = [None] * L; self.lt = np.full(N, -10**9)
    def visit(self, t, l, ks):
        sl = slice(l * E, (l + 1) * E); u = np.zeros(E, np.float32); u[ks - l * E] = 1
        if self.last[l] is not None:
            j = self.last[l]; self.M[l][j] = (1 - self.b) * self.M[l][j] + self.b * u
        self.last[l] = ks - l * E
        self.f[sl] = (1 - self.a) * self.f[sl] + self.a * u
        self.lt[ks] = t
    def score(self, t, l):
        nv = next_visit(t, l)
        pt = np.concatenate([self.M[x][self.last[x]].mean(0) if self.last[x] is not None else np.zeros(E, np.float32) for x in range(L)])
        p = np.maximum(self.f, pt) if self.mode == 'max' else pt
        p = np.maximum(p, np.float32(self.floor))
        return (nv + np.floor(L * (1 / p - 1))).astype(np.float64)

def table(best_a=0.005, best_sa=0.02):
    global NXT
    NXT = next_use_table()
    H = HALF
    rows = [('MIN (offline optimum, group-constrained)', lambda C: simulate(MIN(), C)),
            ('LRU', lambda C: simulate(LRU(), C)),
            ('LRU-2', lambda C: simulate(LRU2(), C)),
            ('ARC (pinned group skipped)', lambda C: simulate_arc(C)),
            ('LFU (runtime `lfu`, EMA a=0.05)', lambda C: simulate(EMA(0.05, 'lfu'), C)),
            ('current `belady` estimate (a=0.05, floor 1/64)', lambda C: simulate(EMA(0.05, 'current'), C)),
            ('current formula, a=0.01', lambda C: simulate(EMA(0.01, 'current'), C)),
            ('gap-EMA a=0.1', lambda C: simulate(Gap(0.1), C)),
            ('two EMAs mixed (0.9*f[0.005] + 0.1*f[0.5])', lambda C: simulate(TwoEMA(0.005, 0.5, 0.1), C)),
            (f'**sticky-frequency a={best_a} sa={best_sa}** (proposed)', lambda C: simulate(Stick(best_a, best_sa), C)),
            ('(exploratory, 24x24 state/layer) transition a=0.01 b=0.02', lambda C: simulate(Trans(0.01, 0.02, 'pure'), C)),
            ('(reference, not online) static true frequency', lambda C: simulate(OracleFreq(), C)),
            ]
    res = {}
    for C in (72, 36):
        for name, f in rows:
            res[(name, C)] = f(C)
    print('| policy | C=72 2nd half | ratio | C=72 whole | ratio | C=36 2nd half | ratio | C=36 whole | ratio |')
    print('|---|---|---|---|---|---|---|---|---|')
    for name, _ in rows:
        cells = []
        for C in (72, 36):
            m, mn = res[(name, C)], res[(rows[0][0], C)]
            cells += [f'{m[H:].sum()}', f'{m[H:].sum()/mn[H:].sum():.3f}', f'{m.sum()}', f'{m.sum()/mn.sum():.3f}']
        print(f'| {name} | ' + ' | '.join(cells) + ' |', flush=True)

if __name__ == '__main__':
    a = float(sys.argv[2]) if len(sys.argv) > 2 else 1 / 128
    sa = float(sys.argv[3]) if len(sys.argv) > 3 else 1 / 64
    table(a, sa)
