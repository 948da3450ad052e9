"""engine/sampling.py against its definition (llama.cpp's default chain), written out again here.

The reference `ref_probs` below is a separate code path on purpose: plain Python over
lists, one filter per paragraph, straight from the definitions in the sampling.py
docstring — sorted() instead of partitions, probability ratios instead of logit
thresholds, Python sums instead of NumPy cumsum.  Random logits keep every cumulative
sum far (≫ 1e-7) from a cutoff, so the two paths must agree on the set exactly.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from engine.errors import GGFlatError
from engine.sampling import (NonFiniteLogitsError, Sampler, SamplingError, SamplingParams,
                             log_softmax, top_logprobs)

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------- references

def ref_probs(logits, top_k=0, top_p=1.0, min_p=0.0, temperature=1.0) -> np.ndarray:
    """Dense float64 distribution of the chain top-k → top-p → min-p → temperature."""
    v = [float(x) for x in logits]
    n = len(v)
    out = np.zeros(n)
    if temperature <= 0:  # greedy: first maximum
        out[max(range(n), key=lambda i: (v[i], -i))] = 1.0
        return out
    # the total order every filter cuts: logit descending, then id ascending
    keep = sorted((i for i in range(n) if v[i] != NEG_INF), key=lambda i: (-v[i], i))
    mx = v[keep[0]]
    if top_k > 0:
        keep = keep[:top_k]
    if top_p < 1.0:  # probabilities renormalised over the top-k survivors, at T = 1
        z = sum(math.exp(v[i] - mx) for i in keep)
        cum = 0.0
        for j, i in enumerate(keep):
            cum += math.exp(v[i] - mx) / z
            if cum >= top_p:
                keep = keep[: j + 1]
                break
    if min_p > 0.0:  # p_i >= min_p * p_max, p_i / p_max = exp(l_i - l_max)
        keep = [i for i in keep if math.exp(v[i] - mx) >= min_p]
    w = {i: math.exp(v[i] / temperature - mx / temperature) for i in keep}
    z = sum(w.values())
    for i, wi in w.items():
        out[i] = wi / z
    return out


def ref_penalize(logits, history, last_n, repeat, freq, presence) -> np.ndarray:
    """llama_sampler_penalties_apply, element by element in float32."""
    out = np.array(logits, dtype=np.float32)
    window = history[-last_n:] if last_n > 0 else []
    for tok in set(window):
        count = window.count(tok)
        x = np.float32(out[tok])
        x = x * np.float32(repeat) if x <= 0 else x / np.float32(repeat)
        x = x - (np.float32(count) * np.float32(freq) + np.float32(1.0) * np.float32(presence))
        out[tok] = x
    return out


def _gammaincc(a: float, x: float) -> float:
    """Regularised upper incomplete gamma Q(a, x) (series / Lentz continued fraction)."""
    if x <= 0:
        return 1.0
    lg = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        ap = a
        for _ in range(10000):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(lg))
    tiny = 1e-300
    b = x + 1 - a
    c = 1 / tiny
    d = 1 / b
    h = d
    for i in range(1, 10000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return math.exp(lg) * h


def chi2_sf(x: float, df: int) -> float:
    try:
        from scipy.stats import chi2
    except ImportError:  # scipy is not a ggflat dependency
        return _gammaincc(df / 2, x / 2)
    return float(chi2.sf(x, df))


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square of observed counts against probs; cells expecting < 5 pooled."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = list(counts[big]) + ([counts[~big].sum()] if (~big).any() else [])
    exp = list(expected[big]) + ([expected[~big].sum()] if (~big).any() else [])
    obs, exp = np.array(obs, dtype=np.float64), np.array(exp)
    if exp[-1] == 0:  # pooled cell of zero-probability tokens: it must be empty
        assert obs[-1] == 0
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    return chi2_sf(stat, len(exp) - 1)


def make_logits(n, seed, scale=3.0, n_masked=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    l = (rng.standard_normal(n) * scale).astype(np.float32)
    if n_masked:
        l[rng.choice(n, n_masked, replace=False)] = -np.inf
    return l


def plain(**kw) -> SamplingParams:
    """Every filter off unless asked for (the defaults turn top-k/top-p/min-p on)."""
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0)
    base.update(kw)
    return SamplingParams(**base)


def check_against_ref(logits, params: SamplingParams):
    s = Sampler(params, len(logits))
    got = s.allowed_probs(logits)
    want = ref_probs(logits, params.top_k, params.top_p, params.min_p, params.temperature)
    assert got.dtype == np.float64 and got.shape == (len(logits),)
    np.testing.assert_array_equal(np.flatnonzero(got), np.flatnonzero(want), err_msg=str(params))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=0, err_msg=str(params))
    assert abs(got.sum() - 1) < 1e-12
    return got


# ---------------------------------------------------------------------------- helper sanity

def test_chi2_helper_known_values():
    assert _gammaincc(0.5, 3.841458820694124 / 2) == pytest.approx(0.05, rel=1e-9)   # chi2(1) 95%
    assert _gammaincc(5.0, 18.307038053275146 / 2) == pytest.approx(0.05, rel=1e-9)  # chi2(10) 95%
    assert _gammaincc(50.0, 50.0) == pytest.approx(0.48119168452795674, rel=1e-9)  # chi2(100) at x = 100
    assert _gammaincc(3.0, 0.0) == 1.0
    try:
        from scipy.special import gammaincc
    except ImportError:
        return
    for a, x in [(0.5, 0.01), (2.0, 30.0), (20.0, 3.0), (400.0, 380.0), (1.5, 1.5)]:
        assert _gammaincc(a, x) == pytest.approx(gammaincc(a, x), rel=1e-9, abs=1e-300)


# ---------------------------------------------------------------------------- greedy

@pytest.mark.parametrize("temp", [0.0, -1.0])
def test_greedy_is_argmax(temp):
    l = make_logits(1000, 1)
    s = Sampler(SamplingParams(temperature=temp, seed=3), 1000)
    assert s.sample(l) == int(np.argmax(l))
    probs = s.allowed_probs(l)
    assert probs[np.argmax(l)] == 1.0 and probs.sum() == 1.0


def test_greedy_ties_take_lowest_id():
    l = np.zeros(50, dtype=np.float32)
    l[[31, 7, 44]] = 2.5
    l[[0, 1]] = -np.inf
    s = Sampler(SamplingParams(temperature=0, top_k=2, top_p=0.1, min_p=0.9), 50)
    assert all(s.sample(l) == 7 for _ in range(5))


def test_greedy_uses_penalised_logits():
    l = np.array([0.0, 5.0, 4.0, -1.0], dtype=np.float32)
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=2.0), 4)
    assert s.sample(l) == 1
    s.accept(1)  # 5.0 / 2 = 2.5 < 4.0
    assert s.sample(l) == 2


# ---------------------------------------------------------------------------- each filter, then combinations

@pytest.mark.parametrize("k", [1, 2, 5, 40, 299, 300, 301, 1000])
def test_top_k(k):
    check_against_ref(make_logits(300, 11), plain(top_k=k))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_top_p(p, scale):
    check_against_ref(make_logits(600, 12, scale), plain(top_p=p))


@pytest.mark.parametrize("m", [0.01, 0.05, 0.3, 1.0])
def test_min_p(m):
    got = check_against_ref(make_logits(400, 13), plain(min_p=m))
    if m == 1.0:
        assert np.count_nonzero(got) == 1


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0, 2.0, 50.0])
def test_temperature_alone_is_softmax_of_scaled_logits(t):
    l = make_logits(300, 14)
    got = Sampler(plain(temperature=t), 300).allowed_probs(l)
    x = l.astype(np.float64) / t
    want = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    np.testing.assert_allclose(got, want, rtol=1e-9)


@pytest.mark.parametrize("top_k,top_p,min_p", list(itertools.product([0, 1, 7, 40], [1.0, 0.9, 0.5], [0.0, 0.05, 0.3])))
def test_combinations(top_k, top_p, min_p):
    for seed, scale, masked in [(20, 3.0, 0), (21, 0.5, 0), (22, 2.0, 150)]:
        l = make_logits(500, seed, scale, masked)
        for t in [0.5, 1.0, 1.7]:
            check_against_ref(l, plain(top_k=top_k, top_p=top_p, min_p=min_p, temperature=t))


def test_temperature_never_changes_the_allowed_set():
    """llama.cpp applies temp after top-p/min-p: the cut is made on T = 1 probabilities."""
    l = make_logits(500, 23, 1.0)
    sets = [np.flatnonzero(Sampler(plain(top_k=40, top_p=0.8, min_p=0.05, temperature=t), 500).allowed_probs(l))
            for t in (0.2, 1.0, 3.0)]
    assert all(np.array_equal(sets[0], s) for s in sets[1:])
    assert 1 < len(sets[0]) < 40


def test_top_p_uses_probabilities_renormalised_over_top_k():
    # softmax over 3 survivors: [0.665, 0.245, 0.090]; over all 4: [0.644, 0.237, 0.087, 0.032]
    l = np.log(np.array([0.644, 0.237, 0.087, 0.032], dtype=np.float64)).astype(np.float32)
    # cum with top-k 3 renormalisation: 0.665, 0.910 → top_p 0.9 stops at 2 tokens;
    # without it 0.644, 0.881, 0.968 would need 3
    probs = Sampler(plain(top_k=3, top_p=0.9), 4).allowed_probs(l)
    assert np.count_nonzero(probs) == 2


def test_large_vocab_default_chain_matches_reference():
    n = 262_144  # Gemma 3's vocab: exercises the subsampled top-k pre-filter
    l = make_logits(n, 30, 2.0, 1000)
    for params in [SamplingParams(seed=1), plain(top_k=40, temperature=0.7), plain(top_k=1000, top_p=0.7)]:
        check_against_ref(l, params)


def test_large_vocab_top_k_off_matches_reference():
    n = 50_000
    l = make_logits(n, 31, 2.0, 100)
    for params in [plain(top_p=0.95), plain(top_p=0.3), plain(top_p=0.9, min_p=0.01), plain(min_p=0.1)]:
        check_against_ref(l, params)


# ---------------------------------------------------------------------------- ties at the cutoffs

def test_top_k_boundary_tie_keeps_lowest_ids():
    l = np.full(30, -1.0, dtype=np.float32)
    l[[3, 17]] = 5.0
    l[[25, 9, 14, 2]] = 1.0  # k = 4: both 5.0s, then the 2 lowest ids of the four 1.0s
    probs = Sampler(plain(top_k=4), 30).allowed_probs(l)
    assert list(np.flatnonzero(probs)) == [2, 3, 9, 17]


def test_top_k_tie_flood_large_vocab():
    # 70k tied logits: the threshold pre-filter passes everything; exact cut must still hold
    n = 70_000
    l = np.zeros(n, dtype=np.float32)
    top = [69_999, 50_000, 12, 40_000]
    l[top] = 1.0
    probs = Sampler(plain(top_k=40), n).allowed_probs(l)
    want = sorted(set(top) | set(range(37)))  # the 4 tops, then the 36 lowest ids of the zeros
    assert len(want) == 40 and list(np.flatnonzero(probs)) == want


def test_top_p_boundary_tie_keeps_lowest_id():
    l = np.full(12, -3.0, dtype=np.float32)
    l[5] = 2.0
    l[[9, 4, 6]] = 1.0
    z = np.exp(l.astype(np.float64)).sum()
    p0, p1 = math.exp(2.0) / z, math.exp(1.0) / z
    top_p = p0 + 0.5 * p1  # crosses at the first of the three tied tokens
    probs = Sampler(plain(top_p=top_p), 12).allowed_probs(l)
    assert list(np.flatnonzero(probs)) == [4, 5]
    probs = Sampler(plain(top_p=p0 + 1.5 * p1), 12).allowed_probs(l)
    assert list(np.flatnonzero(probs)) == [4, 5, 6]


def test_min_p_keeps_whole_tie():
    l = np.array([1.0, 3.0, 1.0, 3.0, 0.0], dtype=np.float32)
    probs = Sampler(plain(min_p=math.exp(-2.0) * 0.999), 5).allowed_probs(l)
    assert list(np.flatnonzero(probs)) == [0, 1, 2, 3]


# ---------------------------------------------------------------------------- masked tokens

def test_masked_tokens_never_allowed():
    l = make_logits(300, 40, n_masked=290)
    finite = np.flatnonzero(np.isfinite(l))
    for params in [plain(), plain(top_k=40), plain(top_p=0.99), plain(min_p=1e-9), SamplingParams()]:
        got = check_against_ref(l, params)
        assert set(np.flatnonzero(got)) <= set(finite)
        s = Sampler(params, 300)
        assert all(s.sample(l) in finite for _ in range(200))
    one = np.full(100, -np.inf, dtype=np.float32)
    one[42] = -7.0
    s = Sampler(SamplingParams(seed=1), 100)
    assert all(s.sample(one) == 42 for _ in range(20))
    assert top_logprobs(one, 5) == [(42, 0.0)]


def test_zero_probability_member_is_never_drawn():
    # T tiny: only the max has non-zero weight although min-p/top-k keep the others
    l = np.array([1.0, 1.0 - 1e-3, 1.0 - 2e-3, 0.5], dtype=np.float32)
    s = Sampler(plain(temperature=1e-7, top_k=3), 4)
    probs = s.allowed_probs(l)
    assert probs[0] == 1.0 and probs[1] == 0.0
    assert all(s.sample(l) == 0 for _ in range(200))


class _FixedRng:
    def __init__(self, values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def test_draw_extremes_stay_in_support():
    l = np.array([-np.inf, 0.0, -np.inf, 0.5, -np.inf], dtype=np.float32)
    s = Sampler(plain(), 5)
    s._rng = _FixedRng([0.0, np.nextafter(1.0, 0.0)])  # the smallest and largest uniforms
    assert s.sample(l) == 1
    assert s.sample(l) == 3


# ---------------------------------------------------------------------------- empirical distribution

@pytest.mark.parametrize("params,n,n_draws", [
    (SamplingParams(seed=123), 2000, 20_000),                                   # llama.cpp defaults
    (plain(temperature=1.3, seed=7), 30, 20_000),                               # every filter off
    (plain(top_k=10, top_p=0.9, min_p=0.02, temperature=0.6, seed=9), 500, 20_000),
])
def test_draws_follow_allowed_probs(params, n, n_draws):
    l = make_logits(n, 50, 1.5, n // 10)
    s = Sampler(params, n)
    probs = s.allowed_probs(l)
    draws = np.fromiter((s.sample(l) for _ in range(n_draws)), dtype=np.int64, count=n_draws)
    counts = np.bincount(draws, minlength=n)
    assert counts[probs == 0].sum() == 0, "drew a token outside the allowed set"
    p = chi2_pvalue(counts, probs)
    assert p > 1e-4, f"chi-square p = {p:.2e}"


# ---------------------------------------------------------------------------- penalties

def test_penalties_follow_llama_cpp_formula():
    rng = np.random.default_rng(60)
    n = 64
    l = (rng.standard_normal(n) * 4).astype(np.float32)
    l[[1, 2]] = [0.0, -0.0]
    params = SamplingParams(repeat_penalty=1.3, repeat_last_n=8, frequency_penalty=0.25,
                            presence_penalty=0.6, seed=0)
    s = Sampler(params, n)
    history = [1, 2, 5, 5, 7, 9, 5, 11, 3, 3, 3, 20, 1, 44]  # window of 8 drops the first 6
    for t in history:
        s.accept(t)
    got = s.penalized_logits(l)
    want = ref_penalize(l, history, 8, 1.3, 0.25, 0.6)
    np.testing.assert_array_equal(got, want)  # bit-exact float32
    untouched = np.setdiff1d(np.arange(n), history[-8:])
    np.testing.assert_array_equal(got[untouched], l[untouched])
    assert got[2] == l[2] and got[9] == l[9]  # fell out of the window
    # positive logits shrink, negative ones grow more negative
    for t in set(history[-8:]):
        assert got[t] < l[t] or l[t] == 0


def test_penalties_feed_the_distribution_and_prompt_counts():
    l = make_logits(200, 61)
    params = plain(top_k=20, repeat_penalty=1.5, repeat_last_n=16, frequency_penalty=0.1, presence_penalty=0.2)
    s = Sampler(params, 200)
    prompt = list(np.argsort(-l)[:6])  # prompt tokens count, as in llama-cli and llama-server
    for t in prompt:
        s.accept(int(t))
    pen = ref_penalize(l, [int(t) for t in prompt], 16, 1.5, 0.1, 0.2)
    np.testing.assert_allclose(s.allowed_probs(l), ref_probs(pen, top_k=20), rtol=1e-9)
    s.reset()
    np.testing.assert_allclose(s.allowed_probs(l), ref_probs(l, top_k=20), rtol=1e-9)


@pytest.mark.parametrize("kw", [dict(repeat_last_n=0, repeat_penalty=2.0), dict(repeat_penalty=1.0)])
def test_penalties_off(kw):
    l = make_logits(50, 62)
    s = Sampler(SamplingParams(**kw), 50)
    for t in [1, 2, 3, 3]:
        s.accept(t)
    np.testing.assert_array_equal(s.penalized_logits(l), l)


def test_penalty_overflow_is_an_error():
    l = np.array([3e38, 1.0], dtype=np.float32)
    s = Sampler(SamplingParams(frequency_penalty=-3e38, presence_penalty=-3e38), 2)
    s.accept(0)
    with pytest.raises(GGFlatError, match="penalt"):
        s.sample(l)


# ---------------------------------------------------------------------------- seeds

def _run(sampler, l, n=300):
    out = []
    for _ in range(n):
        t = sampler.sample(l)
        sampler.accept(t)
        out.append(t)
    return out


def test_seed_reproduces_run_exactly():
    l = make_logits(1000, 70, 1.0)
    params = SamplingParams(seed=1234, repeat_penalty=1.1)
    a, b = Sampler(params, 1000), Sampler(params, 1000)
    ra = _run(a, l)
    assert ra == _run(b, l)
    assert ra != _run(Sampler(SamplingParams(seed=1235, repeat_penalty=1.1), 1000), l)
    a.reset()
    assert _run(a, l) == ra


def test_random_seed_is_recorded_and_replayable():
    l = make_logits(1000, 71, 1.0)
    s = Sampler(SamplingParams(seed=None), 1000)
    assert isinstance(s.seed, int)
    run = _run(s, l, 100)
    assert _run(Sampler(SamplingParams(seed=s.seed), 1000), l, 100) == run
    assert isinstance(Sampler(SamplingParams(seed=-1), 1000).seed, int)  # llama.cpp's "random"


# ---------------------------------------------------------------------------- bad logits, bad flags

@pytest.mark.parametrize("bad", ["nan", "inf", "all_masked"])
def test_non_finite_logits_raise(bad):
    l = make_logits(100, 80)
    if bad == "nan":
        l[37] = np.nan
    elif bad == "inf":
        l[37] = np.inf
    else:
        l[:] = -np.inf
    for params in [SamplingParams(seed=0), SamplingParams(temperature=0), plain()]:
        s = Sampler(params, 100)
        with pytest.raises(NonFiniteLogitsError):
            s.sample(l)
        with pytest.raises(GGFlatError):
            s.allowed_probs(l)
    with pytest.raises(GGFlatError, match="NaN" if bad == "nan" else None):
        log_softmax(l)
    with pytest.raises(GGFlatError):
        top_logprobs(l, 3)


@pytest.mark.parametrize("field,value,flag", [
    ("temperature", float("nan"), "--temp"),
    ("temperature", float("inf"), "--temp"),
    ("top_k", -1, "--top-k"),
    ("top_k", 2.5, "--top-k"),
    ("top_p", 0.0, "--top-p"),
    ("top_p", 1.5, "--top-p"),
    ("top_p", float("nan"), "--top-p"),
    ("min_p", -0.1, "--min-p"),
    ("min_p", 1.01, "--min-p"),
    ("repeat_penalty", 0.0, "--repeat-penalty"),
    ("repeat_penalty", -1.0, "--repeat-penalty"),
    ("repeat_penalty", float("inf"), "--repeat-penalty"),
    ("repeat_last_n", -1, "--repeat-last-n"),
    ("frequency_penalty", float("nan"), "--frequency-penalty"),
    ("presence_penalty", float("-inf"), "--presence-penalty"),
    ("presence_penalty", 1e39, "--presence-penalty"),
    ("seed", -2, "--seed"),
    ("seed", 2**64, "--seed"),
    ("seed", 1.5, "--seed"),
    ("top_p", "0.9", "--top-p"),
])
def test_invalid_params(field, value, flag):
    params = SamplingParams(**{field: value})
    with pytest.raises(SamplingError) as e:
        params.validate()
    msg = str(e.value)
    assert isinstance(e.value, GGFlatError) and flag in msg and "\n" not in msg
    with pytest.raises(GGFlatError):
        Sampler(params, 10)


def test_valid_edge_params():
    for kw in [dict(top_k=0, top_p=1.0, min_p=0.0), dict(min_p=1.0), dict(temperature=-5.0),
               dict(repeat_last_n=0), dict(seed=0), dict(seed=2**64 - 1), dict(frequency_penalty=-1.0)]:
        SamplingParams(**kw).validate()


# ---------------------------------------------------------------------------- logprobs

def test_log_softmax():
    l = make_logits(1000, 90, 4.0, 10)
    got = log_softmax(l)
    x = l.astype(np.float64)
    m = x[np.isfinite(x)].max()
    want = x - (m + np.log(np.exp(x - m).sum()))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got[np.isfinite(x)], want[np.isfinite(x)], rtol=0, atol=1e-12)
    assert np.all(got[~np.isfinite(x)] == -np.inf)
    assert abs(np.exp(got).sum() - 1) < 1e-12
    np.testing.assert_allclose(log_softmax(l + np.float32(1000)), got, atol=1e-4)  # shift invariant, no overflow


def test_top_logprobs():
    l = np.array([0.5, 2.0, -np.inf, 2.0, 1.0, -np.inf, 2.0], dtype=np.float32)
    lp = log_softmax(l)
    got = top_logprobs(l, 4)
    assert [i for i, _ in got] == [1, 3, 6, 4]  # descending, tie → lower id first
    assert all(v == lp[i] for i, v in got)
    assert [i for i, _ in top_logprobs(l, 100)] == [1, 3, 6, 4, 0]  # -inf never listed
    assert top_logprobs(l, 0) == []
    with pytest.raises(SamplingError, match="--top-logprobs"):
        top_logprobs(l, -1)
    big = make_logits(100_000, 91)
    ids = [i for i, _ in top_logprobs(big, 10)]
    assert ids == list(np.argsort(-big, kind="stable")[:10])


def test_programming_errors_are_not_user_errors():
    s = Sampler(SamplingParams(), 10)
    assert not s.params.greedy and SamplingParams(temperature=0).greedy
    with pytest.raises(ValueError):
        s.sample(np.zeros(11, dtype=np.float32))  # wrong vocab size: a bug in the caller
    with pytest.raises(ValueError):
        s.accept(10)
    with pytest.raises(SamplingError, match="--top-k"):
        SamplingParams(top_k=True).validate()
