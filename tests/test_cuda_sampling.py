"""ops.sample: the sorting-free sampling kernels (ggml_py/cuda/sampling.cu) and their NumPy twin
(ggml_py/sample_ref.py) against engine/sampling.py's distribution (``Sampler.allowed_probs``).

Runs everywhere (CI included):
- Philox4x32-10 against Random123's known answers; sampling.cu's Philox, uniform and penalty
  arithmetic compiled for the host (g++ -DSAMPLING_HOST) against the NumPy twin, bit for bit;
- the NumPy op: for each setting (top-k, top-p, min-p, their combinations, temperatures,
  penalties, greedy, ties at the boundaries, -inf logits) a chi-square test of a few thousand
  draws against the exact truncated, renormalised distribution and no draw outside it; error
  codes; a seed reproduces; the op inside graphs of the NumPy backend and of the CuPy backend on
  its simulated device (first run eager, then a captured graph replayed with new counters);
  generation with the op (the first token drawn on the host by the twin) reproducing from its seed.

Needs CuPy and a CUDA device (skipped otherwise):
- the same settings with 10^6 draws (rows of one broadcast logits row), on small and 128k
  vocabularies and every cluster size; the GPU against the NumPy twin on mixed batches (per-row
  parameters, penalties, histories): the same tokens except for float-rounding edge cases;
  error codes; seeds; a decode graph of a tiny model replayed with the sampler inside.
"""
from __future__ import annotations

import ctypes
import math
from pathlib import Path

import numpy as np
import pytest

from engine.sampling import NonFiniteLogitsError, Sampler, SamplingError, SamplingParams
from ggml_py import Graph, ops
from ggml_py.backend_numpy import NumpyBackend
from ggml_py.sample_ref import pack_row, philox4x32, sample_rows
from tests.conftest import build_host_lib

CU = Path(__file__).resolve().parent.parent / "ggml_py" / "cuda" / "sampling.cu"
NEG = -np.inf


# -- settings: (name, logits, SamplingParams fields, history) -----------------------------------------------

def _logits_random(seed: int, n: int = 64, scale: float = 2.0, n_masked: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * scale).astype(np.float32)
    x[rng.choice(n, n_masked, replace=False)] = NEG
    return x


TIES = np.array([5, 5, 5, 5, 3, 3, NEG, 2, 2, 2, NEG, 1, 0.5, 0.5], np.float32)
R64 = _logits_random(1)
R64B = _logits_random(2, scale=1.0, n_masked=0)

SETTINGS = [
    ("temp_only_0.7", R64, dict(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0), None),
    ("temp_only_2.0", R64B, dict(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0), None),
    ("top_k", R64, dict(temperature=1.0, top_k=10, top_p=1.0, min_p=0.0), None),
    ("top_p", R64, dict(temperature=1.0, top_k=0, top_p=0.8, min_p=0.0), None),
    ("min_p", R64, dict(temperature=0.7, top_k=0, top_p=1.0, min_p=0.05), None),
    ("defaults", R64, dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05), None),
    ("top_k_top_p", R64B, dict(temperature=1.5, top_k=20, top_p=0.7, min_p=0.0), None),
    ("top_k_top_p_min_p", R64B, dict(temperature=0.6, top_k=30, top_p=0.9, min_p=0.2), None),
    ("penalties", R64, dict(temperature=0.8, top_k=5, top_p=0.9, min_p=0.01, repeat_penalty=1.3,
                            frequency_penalty=0.2, presence_penalty=0.5), [int(np.argmax(R64)), 3, 3, 7, 11, 3]),
    ("ties_top_k", TIES, dict(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0), None),
    ("ties_top_k_6_top_p", TIES, dict(temperature=1.0, top_k=6, top_p=0.6, min_p=0.0), None),
    ("ties_top_p_in_group", TIES, dict(temperature=1.0, top_k=0, top_p=0.55, min_p=0.0), None),
    ("ties_top_k_1", TIES, dict(temperature=1.0, top_k=1, top_p=1.0, min_p=0.0), None),
    ("ties_min_p_1", TIES, dict(temperature=1.0, top_k=0, top_p=1.0, min_p=1.0), None),
    ("ties_tail_top_k", TIES, dict(temperature=3.0, top_k=13, top_p=1.0, min_p=0.0), None),
    ("greedy_penalties", R64, dict(temperature=0.0, repeat_penalty=2.0, presence_penalty=1.0),
     [int(np.argmax(R64))]),
]
IDS = [s[0] for s in SETTINGS]


def _sampler(params: dict, n_vocab: int, history) -> Sampler:
    s = Sampler(SamplingParams(seed=1, **params), n_vocab)
    for t in history or ():
        s.accept(t)
    return s


def _rows(params: dict, history, n: int, seed: int = 1234, counter0: int = 0):
    """(params (n, 8), state (n, 8) with counters counter0.., history (n, W) or None) for one setting."""
    sp = SamplingParams(**params)
    prm, st = pack_row(sp.temperature, sp.top_k, sp.top_p, sp.min_p, sp.repeat_penalty,
                       sp.frequency_penalty, sp.presence_penalty, seed=seed)
    P = np.tile(prm, (n, 1))
    S = np.tile(st, (n, 1))
    ctr = np.arange(counter0, counter0 + n, dtype=np.uint64)
    S.view(np.uint32)[:, 3] = (ctr & 0xFFFFFFFF).astype(np.uint32)
    S.view(np.uint32)[:, 4] = (ctr >> np.uint64(32)).astype(np.uint32)
    H = None
    if history is not None:
        w = sp.repeat_last_n
        h = list(history)[-w:]
        H = np.full((n, w), -1, np.int32)
        H[:, :len(h)] = h
    return P, S, H


def _chi2_sf(x: float, dof: int) -> float:
    try:
        from scipy.stats import chi2
        return float(chi2.sf(x, dof))
    except ImportError:                              # Wilson-Hilferty
        z = ((x / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
        return 0.5 * math.erfc(z / math.sqrt(2))


def check_distribution(counts: np.ndarray, probs: np.ndarray, what: str, p_min: float = 1e-4) -> float:
    """No draw outside the allowed set; chi-square over the tokens with p > 0.001 (the rest pooled)."""
    n = int(counts.sum())
    outside = np.flatnonzero((counts > 0) & (probs == 0))
    assert outside.size == 0, f"{what}: drew disallowed tokens {outside[:10]} ({counts[outside[:10]]} times)"
    big = probs > 0.001
    obs, exp = list(counts[big].astype(float)), list(probs[big] * n)
    rest = (~big) & (probs > 0)
    if probs[rest].sum() * n >= 5:
        obs.append(float(counts[rest].sum()))
        exp.append(float(probs[rest].sum() * n))
    else:
        assert counts[rest].sum() <= 10 + 10 * probs[rest].sum() * n, f"{what}: too many draws in the tail"
    if len(obs) < 2:
        return 1.0
    obs, exp = np.array(obs), np.array(exp)
    stat = float(((obs - exp) ** 2 / exp).sum())
    p = _chi2_sf(stat, len(obs) - 1)
    assert p > p_min, f"{what}: chi-square {stat:.1f} with {len(obs) - 1} dof, p = {p:.2e}"
    return p


def _top_p_margin_ok(logits: np.ndarray, params: dict) -> None:
    """Guard against a setting whose cumulative T=1 mass lands within 1e-5 of top_p (float32 vs
    float64 would then decide differently, and the test would check rounding, not sampling)."""
    p = params.get("top_p", 1.0)
    if p >= 1.0:
        return
    l = logits[logits > NEG].astype(np.float64)
    order = np.sort(l)[::-1]
    k = params.get("top_k", 0)
    if 0 < k < order.size:
        order = order[:k]
    w = np.exp(order - order[0])
    w /= w.sum()
    cum = np.cumsum(w)
    near = np.flatnonzero(np.abs(cum - p) < 1e-5)      # a cut float rounding could move by a token...
    heavy = w[np.minimum(np.concatenate([near, near + 1]), w.size - 1)]
    assert (heavy < 1e-4).all(), "test setting too close to the top-p cut"   # ... that would show


# -- Philox --------------------------------------------------------------------------------------------------

KAT = [((0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
       ((0xffffffff,) * 4, (0xffffffff,) * 2, (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
       ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
        (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1))]


def test_philox_known_answers():
    """Random123's kat_vectors for philox4x32 with 10 rounds."""
    ctr = np.array([c for c, _, _ in KAT], np.uint32)
    key = np.array([k for _, k, _ in KAT], np.uint32)
    got = philox4x32(ctr, key)
    assert got.tolist() == [list(o) for _, _, o in KAT]


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    lib = build_host_lib(tmp_path_factory, CU, "SAMPLING_HOST")
    vp = ctypes.c_void_p
    lib.sampling_host_philox.argtypes = [vp, vp, vp, ctypes.c_int]
    lib.sampling_host_uniform.argtypes = [ctypes.c_uint32]
    lib.sampling_host_uniform.restype = ctypes.c_double
    lib.sampling_host_penalize.argtypes = [vp, vp, ctypes.c_int, ctypes.c_float, ctypes.c_float, ctypes.c_float, vp]
    return lib


def test_host_philox_matches_numpy(host_lib):
    rng = np.random.default_rng(7)
    ctr = rng.integers(0, 2**32, (1000, 4), dtype=np.uint32)
    ctr[:10] = np.array([c for c, _, _ in KAT] * 4, np.uint32)[:10]
    key = rng.integers(0, 2**32, (1000, 2), dtype=np.uint32)
    key[:3] = np.array([k for _, k, _ in KAT], np.uint32)
    ctr[:3] = np.array([c for c, _, _ in KAT], np.uint32)
    out = np.zeros_like(ctr)
    host_lib.sampling_host_philox(ctr.ctypes.data, key.ctypes.data, out.ctypes.data, len(ctr))
    np.testing.assert_array_equal(out, philox4x32(ctr, key))
    for x in (0, 1, 2**31, 2**32 - 1):
        assert host_lib.sampling_host_uniform(x) == x / 2**32 < 1.0


def test_host_penalties_match_numpy(host_lib):
    """sampling.cu's penalty arithmetic (float32, no FMA) equals the NumPy twin's and the Sampler's."""
    rng = np.random.default_rng(3)
    v = np.concatenate([rng.standard_normal(500).astype(np.float32) * 10, [0, -0.0, NEG, 3e38, -3e38]]).astype(np.float32)
    cnt = rng.integers(1, 9, v.size).astype(np.int32)
    for rp, fp, pp in ((1.3, 0.2, 0.5), (0.7, -0.1, 0.0), (1e10, 0.0, 0.0), (1.0, 1e30, -2.0)):
        out = np.zeros_like(v)
        host_lib.sampling_host_penalize(v.ctypes.data, cnt.ctypes.data, v.size, rp, fp, pp, out.ctypes.data)
        f = np.float32
        with np.errstate(all="ignore"):
            ref = np.where(v <= 0, v * f(rp), v / f(rp)).astype(np.float32)
            ref = (ref - (cnt.astype(np.float32) * f(fp) + f(pp))).astype(np.float32)
        np.testing.assert_array_equal(out, ref)


# -- the NumPy op --------------------------------------------------------------------------------------------

CPU_DRAWS = 6000


@pytest.mark.parametrize("name,logits,params,history", SETTINGS, ids=IDS)
def test_numpy_op_distribution(name, logits, params, history):
    _top_p_margin_ok(logits, params)
    probs = _sampler(params, logits.size, history).allowed_probs(logits)
    P, S, H = _rows(params, history, CPU_DRAWS)
    ids = sample_rows(np.broadcast_to(logits, (CPU_DRAWS, logits.size)), P, S, H)
    assert ids.min() >= 0
    check_distribution(np.bincount(ids, minlength=logits.size), probs, f"numpy {name}")


def test_numpy_op_seed_reproduces_and_counters_differ():
    P, S, _ = _rows(SETTINGS[5][2], None, 500)
    x = np.broadcast_to(R64, (500, R64.size))
    a, b = sample_rows(x, P, S), sample_rows(x, P, S)
    np.testing.assert_array_equal(a, b)
    S2 = S.copy()
    S2[:, 1] += 1                                   # another seed
    assert (sample_rows(x, P, S2) != a).any()
    assert len(set(a.tolist())) > 3                 # counters 0..499 give different draws


def test_numpy_op_errors_and_greedy():
    V = 6
    rows = [
        [1, 2, np.nan, 0, 0, 0],                    # NaN -> -1
        [1, np.inf, 0, 0, 0, 0],                    # +inf -> -1
        [NEG] * V,                                  # everything masked -> -1
        [1, 2, 3, 3, 0, 0],                         # greedy: the first maximum -> 2
        [1, 2, 3, 3, 0, 0],                         # greedy with a penalty on 2 -> 3
        [5, 1, 0, 0, 0, 0],                         # penalty overflow: 5 / 1e-38 = inf -> -2
        [-1e30, NEG, NEG, NEG, NEG, NEG],           # penalised to -inf: nothing left -> -1
        [0, 1, 2, 3, 4, 5],                         # history ids outside [0, V) are ignored
    ]
    x = np.array(rows, np.float32)
    P = np.zeros((len(rows), 8), np.float32)
    P[:, 1], P[:, 3] = 1.0, 1.0                     # top_p off, repeat_penalty 1
    P[:, 2] = NEG                                   # min-p off
    S = np.zeros((len(rows), 8), np.int32)
    H = np.full((len(rows), 3), -1, np.int32)
    H[4, 0], P[4, 3] = 2, 4.0
    H[5, 0], P[5, 3] = 0, 1e-38
    H[6, 0], P[6, 3] = 0, 1e10
    H[7], P[7, 3] = [-5, 6, 1 << 20], 100.0
    got = sample_rows(x, P, S, H)
    assert got.tolist() == [-1, -1, -1, 2, 3, -2, -1, 5]


def test_op_checks_its_operands():
    g = Graph("bad")
    x = g.input("x", (2, 10))
    p, st = g.input("p", (2, 8)), g.input("s", (2, 8), "i32")
    assert ops.sample(x, p, st).shape == (2,)
    for bad in (lambda: ops.sample(x, g.input("p3", (3, 8)), st), lambda: ops.sample(x, st, st),
                lambda: ops.sample(x, p, p), lambda: ops.sample(x, p, st, g.input("h", (2, 4))),
                lambda: ops.sample(x, p, st, g.input("h1", (1, 4), "i32"))):
        with pytest.raises(ValueError):
            bad()


def _sample_graph(n: int, V: int, W: int):
    g = Graph("sample")
    x = g.input("x", (n, V))
    h = g.input("h", (n, W), "i32") if W else None
    g.output("ids", ops.sample(ops.scale(x, 1.0), g.input("p", (n, 8)), g.input("s", (n, 8), "i32"), h))
    return g


def _graph_steps(be, n_steps: int = 5, n: int = 16, V: int = 300):
    """Run a sampling graph n_steps times with new counters; compare with the twin each time."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((n, V)) * 3).astype(np.float32)
    P, S, H = _rows(dict(temperature=0.9, top_k=50, top_p=0.9, min_p=0.02, repeat_penalty=1.2,
                         repeat_last_n=4), [1, 2, 3, 2, 7], n)
    plan = be.plan(_sample_graph(n, V, H.shape[1]))
    draws = []
    for step in range(n_steps):
        S.view(np.uint32)[:, 3] = np.arange(n) + 1000 * step
        got = be.run(plan, {"x": x, "p": P, "s": S, "h": H})["ids"]
        ref = sample_rows(x, P, S, H)
        assert np.mean(got == ref) >= 0.99, f"step {step}: {got} vs {ref}"
        draws.append(got)
    assert any((draws[0] != d).any() for d in draws[1:]), "replays drew the same tokens"
    return plan


def test_numpy_backend_graph():
    _graph_steps(NumpyBackend())


def test_sim_backend_graph_replay():
    """The CuPy backend's host logic on the simulated device: the sample step is bound at plan time,
    the second run captures the graph, later runs replay it with the new counters (inputs)."""
    from ggml_py.cuda import sampling_ops as so
    from tests.test_backend_ops import make_sim_backend

    def sim(logits, params, state, history, out, row_stride):
        def run():
            x = logits if row_stride else np.broadcast_to(logits[:1], logits.shape)
            sample_rows(x, params, state, history, out)
        return lambda: be.dev.exec(run)

    be = make_sim_backend()
    so.SIMULATOR = sim
    try:
        plan = _graph_steps(be)
    finally:
        so.SIMULATOR = None
    assert plan.cuda_graph is not None and be.dev.n_graph_launches >= 3


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    pytest.importorskip("gguf")
    from tests.test_backend_ops import write_tiny_model
    return str(write_tiny_model(tmp_path_factory.mktemp("tiny_sampling") / "tiny-llama.gguf", "llama", seed=3))


def _generate(model, params: SamplingParams, n: int = 8) -> list[int]:
    from engine.generate import Generator
    cache = model.new_cache(64)
    gen = Generator(model, cache, cache.new_sequence(), [1, 300, 301, 17], Sampler(params, model.n_vocab),
                    n_predict=n, ignore_eos=True, want_logprobs=False)
    return [ev.id for ev in gen if ev.id >= 0]


def test_generation_samples_with_the_op_and_reproduces(tiny_llama):
    """Generation on the NumPy backend draws with ops.sample (the first token with its host twin):
    the tokens equal a hand-written loop over logits + sample_rows, and a seed reproduces them."""
    from engine.model import Model

    m = Model.load(tiny_llama, NumpyBackend())
    params = SamplingParams(temperature=1.2, top_k=100, top_p=0.95, min_p=0.0, repeat_penalty=1.5,
                            repeat_last_n=8, seed=42)
    assert m.can_sample_on_device(8)
    ids = _generate(m, params)
    assert ids == _generate(m, params) and len(ids) == 8

    s = Sampler(params, m.n_vocab)                  # the same draws by hand
    cache = m.new_cache(64)
    seq = cache.new_sequence()
    prompt = [1, 300, 301, 17]
    for t in prompt:
        s.accept(t)
    logits = m.prefill(cache, seq, prompt)[-1]
    want = []
    for _ in range(8):
        inp = s.op_inputs()
        tok = int(sample_rows(logits[None], inp["sample_params"], inp["sample_state"], inp["sample_history"])[0])
        want.append(tok)
        s.accept(tok)
        logits = m.forward(cache, seq, [tok])[-1]
    assert ids == want


def test_sampler_sample_op_raises_like_sample():
    s = Sampler(SamplingParams(seed=1), 4)
    with pytest.raises(NonFiniteLogitsError):
        s.sample_op(np.array([0, np.nan, 1, 2], np.float32))
    s = Sampler(SamplingParams(seed=1, repeat_penalty=1e-38), 4)
    s.accept(0)
    with pytest.raises(SamplingError):
        s.sample_op(np.array([5, 0, 1, 2], np.float32))


# =============================================================================================================
# On the GPU
# =============================================================================================================

def _cupy():
    from ggml_py.backend_cupy import unavailable_reason
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no GPU: {reason}")
    import cupy
    return cupy


GPU_DRAWS = 1 << 20            # 1,048,576 draws per setting


def gpu_counts(cp, logits: np.ndarray, params: dict, history, n_total: int = GPU_DRAWS, batch: int = 1 << 17,
               cluster: int | None = None) -> np.ndarray:
    """Counts of n_total draws from one logits row (broadcast to every row of a batch)."""
    from ggml_py.cuda import sampling_ops as so
    V = logits.size
    x = cp.broadcast_to(cp.asarray(logits[None]), (batch, V))
    P, S, H = _rows(params, history, batch)
    dP, dS = cp.asarray(P), cp.asarray(S)
    dH = cp.asarray(H) if H is not None else None
    out = cp.empty(batch, cp.int32)
    stream = cp.cuda.Stream(non_blocking=True)
    step = so.prepare_sample(x, dP, dS, dH, out, stream, cluster=cluster, row_stride=0)
    counts = cp.zeros(V, cp.int64)
    for b in range(n_total // batch):
        dS[:, 3] = cp.arange(batch, dtype=cp.int32) + b * batch
        cp.cuda.Device().synchronize()                 # (the update ran on the null stream)
        step()
        stream.synchronize()
        assert int(out.min()) >= 0, "error code for finite logits"
        counts += cp.bincount(out, minlength=V)
    return cp.asnumpy(counts)


@pytest.mark.parametrize("cluster", [1, 8])
@pytest.mark.parametrize("name,logits,params,history", SETTINGS, ids=IDS)
def test_gpu_distribution(name, logits, params, history, cluster):
    cp = _cupy()
    _top_p_margin_ok(logits, params)
    probs = _sampler(params, logits.size, history).allowed_probs(logits)
    check_distribution(gpu_counts(cp, logits, params, history, cluster=cluster), probs, f"gpu {name} C={cluster}")


def _llm_like(V: int, seed: int) -> np.ndarray:
    """Logits shaped like a language model's (benchmarks/bench_cuda_sampling.py): an N(0, 1.5^2)
    body and 8 strong candidates 15, 14, ..., 8 above it."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(V) * 1.5).astype(np.float32)
    top = rng.choice(V, 8, replace=False)
    x[top] += np.float32(15.0) - np.arange(8, dtype=np.float32)
    return x


BIG = [("defaults", dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)),
       ("top_p", dict(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0)),
       ("top_k", dict(temperature=1.0, top_k=50, top_p=1.0, min_p=0.0)),
       ("top_k_top_p_flat", dict(temperature=1.0, top_k=200, top_p=0.5, min_p=0.0))]


@pytest.mark.parametrize("V", [128256, 1001])
@pytest.mark.parametrize("name,params", BIG, ids=[b[0] for b in BIG])
def test_gpu_distribution_vocab(V, name, params):
    cp = _cupy()
    logits = _llm_like(V, 11) if name != "top_k_top_p_flat" else np.random.default_rng(4).standard_normal(V).astype(np.float32)
    _top_p_margin_ok(logits, params)
    probs = _sampler(params, V, None).allowed_probs(logits)
    n = GPU_DRAWS // 4 if V > 100000 else GPU_DRAWS
    check_distribution(gpu_counts(cp, logits, params, None, n_total=n, batch=1 << 16), probs, f"gpu V={V} {name}")


@pytest.mark.parametrize("n,V", [(1, 49152), (16, 49152), (64, 49152), (1, 128256), (64, 128256),
                                 (1, 262144), (64, 262144)])
def test_gpu_default_geometry_launches(n, V):
    """Every batch x vocabulary of the benchmark launches with its default cluster and shared memory
    (64 x 49152 once asked for exactly 48 KB of dynamic shared memory on top of the static: refused
    without the opt-in) and draws only allowed tokens."""
    cp = _cupy()
    from ggml_py.cuda import sampling_ops as so
    logits = _llm_like(V, 3)
    params = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)
    probs = _sampler(params, V, None).allowed_probs(logits)
    x = cp.broadcast_to(cp.asarray(logits[None]), (n, V))
    P, S, _ = _rows(params, None, n)
    out = cp.full(n, -7, cp.int32)
    stream = cp.cuda.Stream(non_blocking=True)
    so.prepare_sample(x, cp.asarray(P), cp.asarray(S), None, out, stream, row_stride=0)()
    stream.synchronize()
    ids = cp.asnumpy(out)
    assert (ids >= 0).all() and (probs[ids] > 0).all(), (n, V, ids[:8])


@pytest.mark.parametrize("cluster", [1, 2, 4, 8, 16])
def test_gpu_cluster_sizes(cluster):
    """Every cluster size draws from the right distribution (a 61-token vocabulary: odd slices, a
    scalar tail, CTAs with nothing but padding)."""
    cp = _cupy()
    logits = _logits_random(9, n=61)
    params = dict(temperature=0.9, top_k=25, top_p=0.85, min_p=0.02)
    _top_p_margin_ok(logits, params)
    probs = _sampler(params, logits.size, None).allowed_probs(logits)
    counts = gpu_counts(cp, logits, params, None, n_total=1 << 18, batch=1 << 15, cluster=cluster)
    check_distribution(counts, probs, f"gpu cluster {cluster}")


def _mixed_batch(n: int, V: int, seed: int):
    """Per-row logits and parameters (greedy, each filter, combinations, penalties; rows 0-2 not
    finite): (x, params, state, history, [SamplingParams per row])."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, V)) * rng.uniform(0.5, 4.0, (n, 1))).astype(np.float32)
    x[rng.random((n, V)) < 0.02] = NEG
    P = np.zeros((n, 8), np.float32)
    S = np.zeros((n, 8), np.int32)
    W = 16
    H = rng.integers(-2, V + 2, (n, W)).astype(np.int32)
    H[rng.random((n, W)) < 0.3] = -1
    sps = []
    for r in range(n):
        sp = SamplingParams(temperature=float(rng.choice([0.0, 0.5, 1.0, 1.3])), top_k=int(rng.choice([0, 1, 5, 40, V])),
                            top_p=float(rng.choice([1.0, 0.5, 0.9])), min_p=float(rng.choice([0.0, 0.05, 0.3])),
                            repeat_penalty=float(rng.choice([1.0, 1.0, 1.3])),
                            frequency_penalty=float(rng.choice([0.0, 0.1])), repeat_last_n=W)
        P[r], S[r] = pack_row(sp.temperature, sp.top_k, sp.top_p, sp.min_p, sp.repeat_penalty, sp.frequency_penalty,
                              sp.presence_penalty, seed=int(rng.integers(0, 2**63)), counter=int(rng.integers(0, 2**40)))
        sps.append(sp)
    x[0, 3] = np.nan
    x[1, 0] = np.inf
    x[2] = NEG
    return x, P, S, H, sps


@pytest.mark.parametrize("V", [1000, 49152])
def test_gpu_matches_numpy_twin(V):
    """Mixed rows: the GPU draws the twin's tokens (the same Philox stream and algorithm), apart from
    float-rounding edge cases, and every token it draws is allowed by engine.sampling."""
    cp = _cupy()
    from ggml_py.cuda import sampling_ops as so
    n = 512 if V < 10000 else 96
    x, P, S, H, sps = _mixed_batch(n, V, seed=V)
    ref = sample_rows(x, P, S, H)
    out = cp.empty(n, cp.int32)
    stream = cp.cuda.Stream(non_blocking=True)
    args = [cp.asarray(a) for a in (x, P, S, H)]
    cp.cuda.Device().synchronize()
    for cluster in (None, 1, 8):
        so.sample(*args, out, stream, cluster=cluster)
        stream.synchronize()
        got = cp.asnumpy(out)
        assert got[:3].tolist() == [-1, -1, -1]
        assert (got < 0).tolist() == (ref < 0).tolist()
        agree = float(np.mean(got == ref))
        assert agree >= 0.99, f"cluster {cluster}: {agree:.3f} of the draws agree with the NumPy twin"
        for r in np.flatnonzero(got >= 0)[:200]:         # allowed by the specification
            s = Sampler(sps[r], V)
            for t in H[r]:
                if 0 <= t < V:
                    s.accept(int(t))
            assert s.allowed_probs(x[r])[got[r]] > 0, f"row {r} ({sps[r]}) drew a disallowed token"


def test_gpu_seed_reproduces():
    cp = _cupy()
    from ggml_py.cuda import sampling_ops as so
    x, P, S, H, _ = _mixed_batch(256, 5000, seed=1)
    args = [cp.asarray(a) for a in (x, P, S, H)]
    out1, out2 = cp.empty(256, cp.int32), cp.empty(256, cp.int32)
    stream = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Device().synchronize()
    so.sample(*args, out1, stream)
    so.sample(*args, out2, stream)
    stream.synchronize()
    assert (out1 == out2).all()
    args[2][:, 1] += 1                                  # new seeds: new draws (in sampled rows)
    cp.cuda.Device().synchronize()
    so.sample(*args, out2, stream)
    stream.synchronize()
    assert not (out1 == out2).all()


def test_gpu_errors_and_greedy():
    cp = _cupy()
    from ggml_py.cuda import sampling_ops as so
    V = 6
    x = np.array([[1, 2, np.nan, 0, 0, 0], [1, np.inf, 0, 0, 0, 0], [NEG] * V, [1, 2, 3, 3, 0, 0],
                  [1, 2, 3, 3, 0, 0], [5, 1, 0, 0, 0, 0], [-1e30, NEG, NEG, NEG, NEG, NEG], [0, 1, 2, 3, 4, 5]],
                 np.float32)
    n = x.shape[0]
    P = np.zeros((n, 8), np.float32)
    P[:, 1], P[:, 3], P[:, 2] = 1.0, 1.0, NEG
    S = np.zeros((n, 8), np.int32)
    H = np.full((n, 3), -1, np.int32)
    H[4, 0], P[4, 3] = 2, 4.0
    H[5, 0], P[5, 3] = 0, 1e-38
    H[6, 0], P[6, 3] = 0, 1e10
    H[7], P[7, 3] = [-5, 6, 1 << 20], 100.0
    out = cp.empty(n, cp.int32)
    for cluster in (1, 2, 8):
        so.sample(cp.asarray(x), cp.asarray(P), cp.asarray(S), cp.asarray(H), out, cp.cuda.Stream.null, cluster=cluster)
        assert cp.asnumpy(out).tolist() == [-1, -1, -1, 2, 3, -2, -1, 5], f"cluster {cluster}"


def test_gpu_backend_graph_replay():
    """CupyBackend: the sample step inside a captured CUDA graph, replayed with new counters."""
    _cupy()
    from ggml_py.backend_cupy import CupyBackend
    plan = _graph_steps(CupyBackend(), n_steps=6, n=32, V=5000)
    assert plan.cuda_graph is not None and plan.graph_error is None


def test_gpu_decode_graph_with_sampler(tiny_llama):
    """A tiny model's decode graph with ops.sample after the logits (both returned), replayed step
    after step: each step's token is the twin's draw from that step's own logits."""
    _cupy()
    from ggml_py.backend_cupy import CupyBackend
    from engine.model import Model
    from tests.test_backend_ops import _step_inputs

    m = Model.load(tiny_llama, CupyBackend())
    cache = m.new_cache(64)
    seq = cache.new_sequence()
    logits = m.prefill(cache, seq, [1, 300, 301, 17])[-1]
    g = m.arch.build_graph(m.config, m.weight_table, 1, 1, seq.max_pages)
    lg = g.outputs["logits"]
    g.output("sample", ops.sample(lg, g.input("sample_params", (1, 8)), g.input("sample_state", (1, 8), "i32")))
    plan = m.backend.plan(g)
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.98, min_p=0.0, seed=5), m.n_vocab)
    tok = s.sample_op(logits)
    agree, seen = 0, set()
    for step in range(8):
        inp = _step_inputs(seq, [tok]) | s.op_inputs()
        out = m.backend.run(plan, inp, cache.storage)
        ref = int(sample_rows(out["logits"], inp["sample_params"], inp["sample_state"])[0])
        tok = int(out["sample"][0])
        agree += tok == ref
        seen.add(tok)
    assert agree >= 7 and len(seen) > 1
    assert plan.cuda_graph is not None and plan.graph_error is None

    # and through Model.forward / Generator: the in-graph draws reproduce from the seed
    p = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.3, seed=9)
    assert m.can_sample_on_device(p.repeat_last_n)
    a, b = _generate(m, p), _generate(m, p)
    assert a == b and len(a) == 8
