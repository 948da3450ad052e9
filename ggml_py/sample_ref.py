"""The ``sample`` op (``ggml_py.ops.sample``) in NumPy: the reference of ggml_py/cuda/sampling.cu.

Same algorithm, same Philox4x32-10 stream, same float32 weights as the kernel, so one seed gives
the same tokens on both backends except where float rounding differs (a running sum within
~1e-12 of the draw, a top-p mass within ~1e-7 of the cut). The *distribution* it draws from is
engine/sampling.py's (``Sampler.allowed_probs``): llama.cpp's chain penalties -> top-k -> top-p ->
min-p -> temperature, every filter a prefix of the order (logit desc, id asc), top-p and min-p
decided on the T = 1 penalised distribution, temperature reshaping only the survivors.

One row (one sequence) per logits row; its parameters are data, never baked into a graph:

    params  (n, 8) f32: [temperature, top_p, log_min_p, repeat_penalty, frequency_penalty,
                         presence_penalty, 0, 0]
            temperature <= 0: greedy (argmax of the penalised logits, ties -> lowest id);
            top_p = 1: off; log_min_p = float32(log(min_p)) (computed in float64), -inf: off
    state   (n, 8) i32: [top_k (0 = off), seed_lo, seed_hi, counter_lo, counter_hi, 0, 0, 0]
            (seed and counter are unsigned 64-bit numbers split into 32-bit words)
    history (n, W) i32 or None: the row's last accepted tokens, -1 (anything outside [0, V))
            = empty; a token seen c times gets llama.cpp's penalties with count c.
    -> (n,) i32 token ids; -1 where the logits are not finite (NaN, +inf, or all -inf before or
       after the penalties), -2 where the penalties overflowed (NaN/+inf), as
       engine.sampling's NonFiniteLogitsError / SamplingError.

The algorithm (FlashInfer's sorting-free rejection sampling with the dual pivot, flashinfer.ai
2025-03-10; /work/shared/PAPERS.md). A *pivot* (v, i) names the prefix of the order of tokens
strictly better than it: ``l > v or (l == v and id < i)``. The allowed set S is a prefix.

    L = the min-p pivot (m + log_min_p, INT_MAX) or (-inf, 0): S is inside cand(L)
    round r = 0, 1, ...:  u = Philox(key=seed, counter=(counter_lo, counter_hi, r, 0)).x / 2^32
        j = the first candidate of L (ascending id) whose running sum of w = exp((l-m)/T)
            passes u * sum(w over cand(L))           (only candidates with w > 0 can be hit)
        no top-k and no top-p: accept j (min-p is already in L)
        P1 = (l_j, j); P2 = (mid, 0), mid = l_j/2 + hi/2 between l_j and the high pivot hi
        count c, T=1 mass M and T mass W of cand(P1) and cand(P2) (one pass)
        j is in S  iff  c1 < k (top-k)  and  M1 < top_p * Z_k (top-p, Z_k = T=1 mass of the
            top-k, or of everything without top-k): accept j
        else L = P1 (j and everything worse is out); and if the best token outside cand(P2) is
            out too (c2 >= k or M2 >= top_p * Z_k) L = P2, else hi = mid
    after MAX_ROUNDS (never seen): the argmax (always allowed)

Z_k needs the exact top-k boundary. Every pass bounds it instead (``_Bounds``: pivots whose
count is known, the first pass adding the thresholds m - 1.5, 4, 8, 16); only a draw the bounds
cannot decide (under 2% of them on a 128k vocabulary, flat or peaked) pins the k-th token (the
kernel: a ternary search on the float order that snaps to data values, ~10-20 passes; here a
sort), and L moves to the top-k.

Exactness: a token of zero allowed probability is never drawn. Candidates are tested with the
same comparisons everywhere, only weighted candidates can be picked, the running sums that pick
are sequential (monotone), and when rounding leaves the total short of the draw the last
weighted candidate is taken.
"""
from __future__ import annotations

import math

from functools import lru_cache

import numpy as np

__all__ = ["PARAMS_WIDTH", "STATE_WIDTH", "ERR_NONFINITE", "ERR_PENALTY", "MAX_ROUNDS",
           "pack_row", "philox4x32", "draw_uniform", "sample_rows"]

PARAMS_WIDTH = 8
STATE_WIDTH = 8
P_TEMP, P_TOP_P, P_LOG_MIN_P, P_REPEAT, P_FREQ, P_PRESENCE = range(6)
S_TOP_K, S_SEED_LO, S_SEED_HI, S_CTR_LO, S_CTR_HI = range(5)
ERR_NONFINITE = -1
ERR_PENALTY = -2
MAX_ROUNDS = 96
BOUND_EPS = 1e-5             # relative slack on the Z_k bounds (exp2f is monotone only to ~2 ulp)
BOUND_STEPS = (-1.5, -4.0, -8.0, -16.0)   # pivots m + step counted before the first draw (top-k + top-p)
INT_MAX = 2**31 - 1
LOG2E = np.float32(1.4426950408889634)
F32, F64 = np.float32, np.float64
NEG_INF = F32(-np.inf)

# Philox4x32-10 (Salmon et al., SC'11; Random123's philox4x32 with 10 rounds)
_PH_M0, _PH_M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_PH_W0, _PH_W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
_LO32 = np.uint64(0xFFFFFFFF)


def pack_row(temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
             repeat_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
             seed: int = 0, counter: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One row of ``params`` (8,) f32 and ``state`` (8,) i32 (values as engine.sampling.SamplingParams)."""
    lmp = F32(math.log(min_p)) if min_p > 0 else NEG_INF       # float64 log, then float32: as llama.cpp
    params = np.array([temperature, top_p, lmp, repeat_penalty, frequency_penalty, presence_penalty, 0, 0], F32)
    seed, counter = int(seed) % 2**64, int(counter) % 2**64
    state = np.array([min(max(int(top_k), 0), INT_MAX), seed & 0xFFFFFFFF, seed >> 32,
                      counter & 0xFFFFFFFF, counter >> 32, 0, 0, 0], np.uint32).view(np.int32)
    return params, state


def philox4x32(ctr: np.ndarray, key: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Philox4x32 of counters ``ctr`` (..., 4) and keys ``key`` (..., 2), uint32 -> (..., 4) uint32."""
    c = [np.asarray(ctr, np.uint32)[..., i].astype(np.uint64) for i in range(4)]
    k0 = np.asarray(key, np.uint32)[..., 0].copy()
    k1 = np.asarray(key, np.uint32)[..., 1].copy()
    for r in range(rounds):
        if r:
            k0 = k0 + _PH_W0          # uint32 arithmetic wraps
            k1 = k1 + _PH_W1
        p0 = c[0] * _PH_M0
        p1 = c[2] * _PH_M1
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0.astype(np.uint64), p1 & _LO32,
             (p0 >> np.uint64(32)) ^ c[3] ^ k1.astype(np.uint64), p0 & _LO32]
    return np.stack([x.astype(np.uint32) for x in c], axis=-1)


def draw_uniform(state: np.ndarray, rnd: int) -> np.ndarray:
    """The uniform in [0, 1) of rejection round ``rnd`` for each row of ``state`` (n, 8): float64."""
    st = np.asarray(state).view(np.uint32).reshape(-1, STATE_WIDTH)
    n = st.shape[0]
    ctr = np.stack([st[:, S_CTR_LO], st[:, S_CTR_HI], np.full(n, rnd, np.uint32), np.zeros(n, np.uint32)], -1)
    key = np.stack([st[:, S_SEED_LO], st[:, S_SEED_HI]], -1)
    return philox4x32(ctr, key)[:, 0].astype(F64) * (1.0 / 2**32)


@lru_cache(maxsize=8)
def _ids(V: int) -> np.ndarray:
    """0 .. V-1 (read-only, one array per vocabulary size: its allocation was a tenth of a draw)."""
    a = np.arange(V)
    a.flags.writeable = False
    return a


def _better(l: np.ndarray, gid: np.ndarray, pv: np.ndarray, pid: np.ndarray) -> np.ndarray:
    """cand(pivot): tokens strictly before (pv, pid) in the order (logit desc, id asc)."""
    pv, pid = pv[:, None], pid[:, None]
    return (l > pv) | ((l == pv) & (gid < pid))


def _weight(d: np.ndarray, s: np.ndarray) -> np.ndarray:
    """exp((l - m) / T) as the kernel computes it: exp2f((l - m) * (log2e / T)), 0 -> exactly 1."""
    with np.errstate(over="ignore", invalid="ignore"):
        x = d * s
    return np.exp2(np.where(d == 0, F32(0), x)).astype(F32)


def _penalize(l: np.ndarray, hist: np.ndarray, rows: np.ndarray, prm: np.ndarray) -> np.ndarray:
    """llama.cpp's penalties on ``rows`` of ``l`` in place (float32, each distinct token of a row's
    history once, with its count); returns the rows whose penalised logits overflowed (NaN/+inf)."""
    V = l.shape[1]
    h = hist[rows].astype(np.int64)
    r = np.broadcast_to(rows[:, None], h.shape)
    ok = (h >= 0) & (h < V)
    keys, cnt = np.unique(r[ok] * V + h[ok], return_counts=True)   # (row, token) pairs, counted
    rr, tt = keys // V, keys % V
    rp, fp, pp = prm[rr, P_REPEAT], prm[rr, P_FREQ], prm[rr, P_PRESENCE]
    v = l[rr, tt]
    with np.errstate(over="ignore", invalid="ignore"):
        v = np.where(v <= 0, v * rp, v / rp).astype(F32)
        v = (v - (cnt.astype(F32) * fp + pp)).astype(F32)
    l[rr, tt] = v
    return np.unique(rr[np.isnan(v) | (v == np.inf)])


def sample_rows(logits: np.ndarray, params: np.ndarray, state: np.ndarray, history: np.ndarray | None = None,
                out: np.ndarray | None = None) -> np.ndarray:
    """ops.sample on the host: (n,) int32 token ids (see the module docstring)."""
    x = np.asarray(logits, F32)
    n, V = x.shape
    prm = np.asarray(params, F32).reshape(n, PARAMS_WIDTH)
    st = np.asarray(state).view(np.int32).reshape(n, STATE_WIDTH)
    res = np.full(n, ERR_NONFINITE, np.int32)
    with np.errstate(invalid="ignore"):
        rmax = x.max(1) if V else np.full(n, -np.inf, F32)           # NaN propagates
    ok = np.isfinite(rmax)                                           # no NaN, no +inf, something finite
    l = x.copy()
    rp, fp, pp = prm[:, P_REPEAT], prm[:, P_FREQ], prm[:, P_PRESENCE]
    if history is not None and history.shape[1] > 0:
        hist = np.asarray(history, np.int32).reshape(n, -1)
        pen = np.flatnonzero(ok & ((rp != 1) | (fp != 0) | (pp != 0)))
        if pen.size:
            bad = _penalize(l, hist, pen, prm)
            res[bad] = ERR_PENALTY
            ok[bad] = False
    ok &= (l > -np.inf).any(1)
    T = prm[:, P_TEMP]
    greedy = ok & ~(T > 0)
    if greedy.any():
        res[greedy] = np.argmax(l[greedy], 1)
    rows = np.flatnonzero(ok & (T > 0))
    if rows.size:
        res[rows] = _sample_core(l[rows], prm[rows], st[rows])
    if out is not None:
        np.copyto(out, res)
        return out
    return res


class _Bounds:
    """Bounds on Z_k (the T=1 mass of the top-k) from pivots of known count c and mass M.

    X: a pivot with c <= k (cand(X) is inside the top-k; every token outside it has l <= v_X);
    Y: a pivot with c >= k (the top-k is inside cand(Y); every token in it has l >= v_Y). Then
    Z_k >= M_X + (k - c_X) e(v_Y) and Z_k <= min(M_Y, M_X + (k - c_X) e(v_X)). c == k: exact."""

    def __init__(self, n, m, nfin, Z, vmin):
        self.Xc, self.XM, self.Xv = np.zeros(n, F64), np.zeros(n, F64), m.copy()
        self.Yc, self.YM, self.Yv = nfin.astype(F64), Z.copy(), vmin.copy()

    def update(self, mask, k, c, M, v):
        x = mask & (c <= k) & (c > self.Xc)
        self.Xc[x], self.XM[x], self.Xv[x] = c[x], M[x], v[x]
        y = mask & (c >= k) & (c < self.Yc)
        self.Yc[y], self.YM[y], self.Yv[y] = c[y], M[y], v[y]
        return mask & (c == k)

    def lo_hi(self, a, k, m):
        """(lower, upper) bound of Z_k for rows ``a`` (with the relative slack)."""
        ey = _e_of(self.Yv[a], m)
        ex = _e_of(self.Xv[a], m)
        rest = k - self.Xc[a]
        lo = (self.XM[a] + rest * ey) * (1.0 - BOUND_EPS)
        hi = np.minimum(self.YM[a], self.XM[a] + rest * ex) * (1.0 + BOUND_EPS)
        return lo, hi


def _e_of(v: np.ndarray, m: np.ndarray) -> np.ndarray:
    """e(v) = exp2f((v - m) * log2e) in float64, for bounds."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.exp2((v - m).astype(F32) * LOG2E).astype(F32).astype(F64)


def _sample_core(l: np.ndarray, prm: np.ndarray, st: np.ndarray) -> np.ndarray:
    """The rejection loop for rows with T > 0 and at least one finite (penalised) logit.

    Every pivot after the first is a candidate of the first, so after the first pass the work is
    on the columns that are a candidate in some row (the min-p set with llama.cpp's defaults)."""
    n, V = l.shape
    fin = l > -np.inf
    nfin = fin.sum(1).astype(np.int64)
    m = l.max(1)
    arg = l.argmax(1)
    vmin = np.where(fin, l, F32(np.inf)).min(1).astype(F32)
    T, top_p, lmp = prm[:, P_TEMP], prm[:, P_TOP_P], prm[:, P_LOG_MIN_P]
    k = st[:, S_TOP_K].astype(np.int64)
    p64 = top_p.astype(F64)
    with np.errstate(over="ignore", invalid="ignore"):
        d = (l - m[:, None]).astype(F32)
        s = (LOG2E / T).astype(F32)

    topk = (k > 0) & (k < nfin)
    topp = top_p < 1
    minp = lmp > -np.inf
    bounds = topk & topp
    thr = (m + lmp).astype(F32)
    Lv = np.where(minp, thr, NEG_INF).astype(F32)
    Lid = np.where(minp, INT_MAX, 0).astype(np.int64)
    cand = _better(l, _ids(V), Lv, Lid)
    cols = np.flatnonzero(cand.any(0))                                # every later candidate is here
    gid = cols.astype(np.int64)
    lc, dc, cand = l[:, cols], d[:, cols], cand[:, cols]
    e_all = np.exp2(d * LOG2E).astype(F32) if topp.any() else None  # T=1 weights: top-p needs Z
    ec = e_all[:, cols] if e_all is not None else np.exp2(dc * LOG2E).astype(F32)
    e64, w64 = ec.astype(F64), _weight(dc, s[:, None]).astype(F64)
    Z = e_all.sum(1, dtype=F64) if e_all is not None else np.zeros(n)
    cntL = cand.sum(1).astype(F64)
    ML = (e64 * cand).sum(1)
    WL = (w64 * cand).sum(1)
    bd = _Bounds(n, m, nfin, Z, vmin)
    zk_known = ~topk
    Zk = Z.copy()
    hit = bd.update(bounds & minp, k, cntL, ML, thr)
    zk_known |= hit
    Zk[hit] = ML[hit]
    if bounds.any():
        for step in BOUND_STEPS:
            t = (m + F32(step)).astype(F32)
            above = l > t[:, None]
            c, M = above.sum(1).astype(F64), np.where(above, e_all, F32(0)).sum(1, dtype=F64)
            hit = bd.update(bounds, k, c, M, t) & ~zk_known
            zk_known |= hit
            Zk[hit] = M[hit]
    pk_ok = np.zeros(n, bool)
    pk_v, pk_id, pk_W = np.zeros(n, F32), np.zeros(n, np.int64), np.zeros(n, F64)
    vH = m.copy()
    res = np.full(n, -1, np.int64)
    live = np.ones(n, bool)
    nc = cols.size

    for rnd in range(MAX_ROUNDS):
        a = np.flatnonzero(live)
        if a.size == 0:
            break
        u = draw_uniform(st[a], rnd)
        target = u * WL[a]
        la, wa = lc[a], w64[a]
        cand = _better(la, gid, Lv[a], Lid[a]) & (wa > 0)
        cum = np.cumsum(np.where(cand, wa, 0.0), 1)
        over = cand & (cum > target[:, None])
        anyo = over.any(1)
        last = nc - 1 - np.argmax(cand[:, ::-1], 1)                    # rounding: the last candidate
        jl = np.where(anyo, np.argmax(over, 1), last)
        j = gid[jl]
        v1 = la[np.arange(a.size), jl]

        free = ~topk[a] & ~topp[a]                                     # min-p (or nothing): accept
        res[a[free]] = j[free]
        live[a[free]] = False
        keep = ~free
        a, j, v1, la = a[keep], j[keep], v1[keep], la[keep]
        if a.size == 0:
            continue
        hi = np.where(vH[a] > v1, vH[a], m[a]).astype(F32)
        mid = np.maximum((v1 * F32(0.5) + hi * F32(0.5)).astype(F32), v1)
        b1 = _better(la, gid, v1, j)
        b2 = la > mid[:, None]
        ea, wa = e64[a], w64[a]
        c1, M1, W1 = b1.sum(1).astype(F64), (ea * b1).sum(1), (wa * b1).sum(1)
        c2, M2, W2 = b2.sum(1).astype(F64), (ea * b2).sum(1), (wa * b2).sum(1)
        ka, pa = k[a], p64[a]

        # bounds on Z_k (rows with top-k and top-p), exact where a pivot holds exactly k tokens
        bmask = np.zeros(n, bool)
        bmask[a] = bounds[a]
        ej = _e_of(v1, m[a])
        for c, M, v in ((c1, M1, v1), (c1 + 1, M1 + ej, v1), (c2, M2, mid)):   # before j, through j, P2
            cc, MM, vv = np.zeros(n), np.zeros(n), np.zeros(n, F32)
            cc[a], MM[a], vv[a] = c, M, v
            hit = bd.update(bmask, k, cc, MM, vv) & ~zk_known
            zk_known |= hit
            Zk[hit] = MM[hit]

        rej = topk[a] & (c1 >= ka)
        need_p = topp[a] & ~rej
        keep_p = np.ones(a.size, bool)
        if need_p.any():
            kn = zk_known[a]
            lo, hi_b = bd.lo_hi(a, k[a], m[a])
            dec_keep = np.where(kn, M1 < pa * Zk[a], M1 < pa * lo)
            dec_rej = np.where(kn, ~(M1 < pa * Zk[a]), M1 >= pa * hi_b)
            undecided = need_p & ~dec_keep & ~dec_rej
            for i in np.flatnonzero(undecided):                        # exact top-k boundary
                r = a[i]
                _exact_topk(r, l[r], int(k[r]), m[r], s[r], e_all[r], Zk, pk_v, pk_id, pk_W)
                zk_known[r] = pk_ok[r] = True
                dec_keep[i] = M1[i] < pa[i] * Zk[r]
            keep_p = ~need_p | dec_keep
        acc = ~rej & keep_p
        res[a[acc]] = j[acc]
        live[a[acc]] = False

        rj = ~acc
        a, j, v1, mid = a[rj], j[rj], v1[rj], mid[rj]
        c1, W1, c2, M2, W2, ka, pa = c1[rj], W1[rj], c2[rj], M2[rj], W2[rj], ka[rj], pa[rj]
        Lv[a], Lid[a], cntL[a], WL[a] = v1, j, c1, W1                  # j and everything worse: out
        zr = np.where(zk_known[a], Zk[a], bd.lo_hi(a, k[a], m[a])[1])
        mv = (c2 > 0) & ((topk[a] & (c2 >= ka)) | (topp[a] & (M2 >= pa * zr)))
        Lv[a[mv]], Lid[a[mv]], cntL[a[mv]], WL[a[mv]] = mid[mv], 0, c2[mv], W2[mv]
        vH[a[~mv]] = mid[~mv]
        pk = pk_ok[a] & (cntL[a] > k[a])                               # the exact top-k is shorter
        b = a[pk]
        Lv[b], Lid[b], cntL[b], WL[b] = pk_v[b], pk_id[b], k[b].astype(F64), pk_W[b]

    res[live] = arg[live]
    return res.astype(np.int32)


def _exact_topk(r, l, k, m, s, e, Zk, pk_v, pk_id, pk_W) -> None:
    """Z_k and the pivot right after the k-th token (logit desc, id asc) of one row, exactly.

    e: the row's T=1 weights (float32); the top-k's T-mass as the kernel sums it: W(l > v_k) plus
    the ties of v_k that make up k."""
    fin = np.flatnonzero(l > -np.inf)
    order = fin[np.lexsort((fin, -l[fin]))]
    vk = l[order[k - 1]]
    gt = l > vk
    need = k - int(gt.sum())
    eq = np.flatnonzero(l == vk)
    dk = F32(vk - m)
    ek = float(np.exp2(dk * LOG2E).astype(F32))
    wk = float(_weight(np.array([dk], F32), s)[0])
    Zk[r] = float(e[gt].sum(dtype=F64)) + need * ek
    pk_W[r] = float(_weight((l[gt] - m).astype(F32), s).sum(dtype=F64)) + need * wk
    pk_v[r] = vk
    pk_id[r] = INT_MAX if need >= eq.size else int(eq[need - 1]) + 1
