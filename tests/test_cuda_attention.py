"""CuPy attention kernels (ggml_py/cuda/attention.cu) against the NumPy backend's kv_store / attention.

Skips without CuPy or a GPU, except the host-side checks at the top (shared-memory budgets,
scratch sizes, and a stand-alone nvcc build when nvcc is on PATH).

Every GPU case: page size 16, a scrambled block table padded with other pages, kv_len not a
multiple of the page size, the whole cache filled with unrelated finite data (other pages, the
table's padding, slots past kv_len), positions with gaps, some never-written slots (INT32_MAX)
inside the sequence, outputs poisoned with NaN first; NMSE <= 5e-4 (f16 pages) / 1e-6 (f32).

The decode is one launch whose split count follows kv_len on the device and whose partials
are merged by the last block(s) to finish (ticket counters in scratch): test_split_geometry_*
and test_combine_groups check the host mirrors of that arithmetic; test_fused_decode_graph_replay
replays one captured decode over kv_len 1..1500 (one split written directly, one- and two-level
combines), then 200 times at one length (a counter that drifted would leave poison), and
checks the counters end at zero. The scratch handed to every decode starts as garbage.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ggml_py import ops
from ggml_py.backend_numpy import NumpyBackend
from ggml_py.cuda import attention_ops as ao
from ggml_py.graph import Graph
from kvcache.paged import KVCacheSpec

POS_EMPTY = np.iinfo(np.int32).max
PAGE = 16
SHAPES = [(9, 3, 64), (4, 1, 256), (32, 8, 128), (8, 8, 64)]       # (H, Hkv, dk): SmolLM2, Gemma-3, Llama-8B, MHA
NS = [1, 2, 7, 64, 300]
NMSE_MAX = {"f16": 5e-4, "f32": 1e-6}
CU = Path(ao.__file__).with_name("attention.cu")
WORST: dict[str, float] = {}             # worst NMSE per kernel family and dtype (ATTN_NMSE_LOG=file dumps it)


# -- host side: no GPU needed --------------------------------------------------------------------

@pytest.mark.parametrize("kvb", [2, 4])
@pytest.mark.parametrize("d", [64, 80, 96, 128, 256])
def test_shared_memory_fits(kvb, d):
    st = ao.decode_stages(kvb, d, d)
    assert 2 <= st <= 4
    for rmax in (4, 8):
        assert ao.decode_smem(kvb, d, d, rmax, st) <= ao.SMEM_LIMIT
    if kvb == 2 and d % 16 == 0:
        assert ao.decode_tc_smem(d, d, ao.decode_tc_stages(d, d)) <= ao.SMEM_LIMIT
    for br in ao.prefill_row_choices("fma", d):
        assert ao.prefill_smem(kvb, d, d, br // 16) <= ao.SMEM_LIMIT
    for br in ao.prefill_row_choices("tc", d):
        assert ao.prefill_tc_smem(d, d, br) <= ao.SMEM_LIMIT


def test_scratch_bytes():
    assert ao.attention_scratch_bytes(512, 32, 128, 8192, 8) == 0
    assert ao.attention_scratch_bytes(7, 32, 128, 8192, 8) == 0        # 28 rows: prefill kernel
    one = ao.attention_scratch_bytes(1, 32, 128, 8192, 8)
    assert one >= ao.num_splits(8, 512) * 32 * 130 * 4
    assert ao.attention_scratch_bytes(1, 32, 128, 8192) >= one         # Hkv unknown: worst case
    assert ao.num_splits(8, 3) == 3                                     # never more splits than pages
    assert one >= ao.COUNTER_BYTES + ao.num_splits(8, 512) * 32 * 130 * 4   # ticket counters first


def test_combine_groups():
    """The two-level combine's groups (attention.cu decode_combine): every split in one group,
    no block merging more than ~sqrt(nsplit) + 1 partials, at most COMBINE_GMAX groups."""
    for flat_max in (1, 2, 16, 4096):
        for ns in range(1, ao.COMBINE_GMAX ** 2 + 1):
            gs, ng = ao.combine_groups(ns, flat_max)
            assert gs >= 1 and ng == -(-ns // gs) and (ng - 1) * gs < ns <= ng * gs
            assert ng <= ao.COMBINE_GMAX
            if ns <= flat_max:
                assert ng == 1
            else:
                assert gs * gs >= ns and (gs - 1) ** 2 < ns and ng <= gs


@pytest.mark.parametrize("page", [1, 16, 48, 64, 256])
def test_split_geometry_covers_the_sequence(page):
    """split_geometry (the kernels' and its Python mirror): the used splits tile the pages below
    kv_len exactly, each split holds keys, short sequences use one split, the grid is never exceeded."""
    for splits in (1, 3, 88, 264):
        for split_keys in (1, 64, 256, 1000):
            mu = ao.split_min_units(split_keys, page)
            for L in (0, 1, 15, 16, 17, 63, 64, 65, 255, 256, 257, 300, 1000, 4097, 8192, 70000):
                ns, ppb = ao.split_geometry(L, splits, mu, page)
                np_used = -(-L // page)
                assert 1 <= ns <= splits and ppb >= 1
                if L == 0:
                    assert ns == 1
                    continue
                assert (ns - 1) * ppb < np_used <= ns * ppb          # the last split holds keys
                if L <= split_keys:
                    assert ns == 1                                   # direct write, no partials
                unit = ao.split_unit(page)
                assert ppb % unit == 0 and (ppb * page >= split_keys or ns == 1 or ppb >= mu * unit)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("opts", [(), ("-DATTN_KV_F16=0", "-DATTN_DK=256", "-DATTN_DEC_STAGES=2"), ("-DATTN_QFIRST=1",)])
def test_nvcc_builds(opts, tmp_path):
    r = subprocess.run(["nvcc", "-arch=sm_90", "--cubin", "-std=c++17", *opts, "-o", str(tmp_path / "a.cubin"),
                        str(CU)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_nvcc_builds_trace(tmp_path):
    """The measurement build (GGFLAT_ATTN_TRACE=1, read by benchmarks/trace_decode.py) compiles and
    exports the record buffer and counter the tool reads."""
    out = tmp_path / "a.ptx"
    r = subprocess.run(["nvcc", "-arch=sm_90", "--ptx", "-std=c++17", "-DATTN_TRACE=1", "-o", str(out), str(CU)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ptx = out.read_text()
    assert "attn_trace_buf" in ptx and "attn_trace_n" in ptx and "%globaltimer" in ptx


# -- GPU ---------------------------------------------------------------------------------------------

def _cupy():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no device")
        return cupy
    except Exception as e:                     # ImportError, CUDARuntimeError, ...
        pytest.skip(f"CuPy with a GPU not available: {e}")


def reference(q, kc, vc, pc, bt, L, qpos, scale, window, softcap):
    """ops.attention on the NumPy backend over host copies of one layer's pages."""
    n, H, dk = q.shape
    n_pages, page, hkv, _ = kc.shape
    dv = vc.shape[3]
    g = Graph("attn")
    qt = g.input("q", q.shape)
    btt = g.input("bt", bt.shape, "i32")
    klt = g.input("kv_len", (1,), "i32")
    qpt = g.input("q_pos", (n,), "i32")
    kv = g.kv_layer(0, hkv, dk, dv)
    g.output("out", ops.attention(qt, kv, btt, klt, qpt, scale, window, softcap))
    be = NumpyBackend()
    st = be.alloc_kv(KVCacheSpec(1, hkv, dk, dv, n_pages, page, "f16" if kc.dtype == np.float16 else "f32"))
    st.k[0][...] = kc
    st.v[0][...] = vc
    st.pos[0][...] = pc
    return be.run(be.plan(g), {"q": q, "bt": bt, "kv_len": np.array([L], np.int32), "q_pos": qpos}, st)["out"]


def nmse(a, b):
    den = float(np.sum(b.astype(np.float64) ** 2))
    num = float(np.sum((a.astype(np.float64) - b) ** 2))
    return num / den if den > 0 else num


def make_case(rng, n, H, hkv, dk, dtype, L, shuffle=False, holes=True, dead_query=True):
    """Host arrays of one layer's cache and a query batch over a sequence of L slots."""
    dv = dk
    max_pages = -(-max(L, 1) // PAGE) + 2                  # padded, as Sequence.block_table does
    n_pages = max_pages + 5
    dt = np.float16 if dtype == "f16" else np.float32
    kc = rng.standard_normal((n_pages, PAGE, hkv, dk)).astype(dt)
    vc = rng.standard_normal((n_pages, PAGE, hkv, dv)).astype(dt)
    pc = rng.integers(0, 10 * L + 10, (n_pages, PAGE)).astype(np.int32)     # unrelated tokens
    pc[rng.random(pc.shape) < 0.1] = POS_EMPTY
    bt = rng.permutation(n_pages)[:max_pages].astype(np.int32)              # scrambled pages
    pos = np.cumsum(rng.integers(1, 4, L)).astype(np.int32) + 5             # gaps
    if shuffle:
        pos = rng.permutation(pos)                                          # slot order != position order
    flat = pc.reshape(-1)
    j = np.arange(L)
    phys = bt[j // PAGE] * PAGE + j % PAGE
    flat[phys] = pos
    if holes and L > 4:
        flat[phys[rng.choice(L, max(1, L // 20), replace=False)]] = POS_EMPTY
    qpos = pos[-n:].copy() if n <= L else np.sort(rng.integers(0, int(pos.max(initial=5)) + 3, n)).astype(np.int32)
    if dead_query and n >= 2:
        qpos[0] = 2                                                         # sees nothing: zeros
    q = rng.standard_normal((n, H, dk)).astype(np.float32)
    return q, kc, vc, pc, bt, qpos.astype(np.int32)


def run_gpu(cp, q, kc, vc, pc, bt, L, qpos, scale, window, softcap, **knobs):
    n, H, dk = q.shape
    dv = vc.shape[3]
    d = {k: cp.asarray(v) for k, v in dict(q=q, kc=kc, vc=vc, pc=pc, bt=bt, qpos=qpos).items()}
    kl = cp.asarray(np.array([L], np.int32))
    out = cp.full((n, H * dv), np.nan, cp.float32)                         # poisoned
    nb = ao.attention_scratch_bytes(n, H, dv, bt.shape[0] * PAGE, kc.shape[2], PAGE)
    if knobs.get("mode") == "decode":
        nb = max(nb, ao._partials_bytes(bt.shape[0], n * H, dv))
    scratch = cp.full(max(nb, 1), 0xA5, cp.uint8)                     # garbage: planning zeroes the counters
    stream = cp.cuda.Stream(non_blocking=True)
    cp.cuda.runtime.deviceSynchronize()
    step = ao.plan_attention(d["q"], d["kc"], d["vc"], d["pc"], d["bt"], kl, d["qpos"], out, scale, window,
                             softcap, stream, scratch, **knobs)
    cp.cuda.runtime.deviceSynchronize()            # the uploads and the poison ran on the null stream
    step()
    stream.synchronize()
    return cp.asnumpy(out)


def check(got, ref, dtype, what, family="?"):
    assert np.isfinite(got).all(), f"{what}: NaN/inf in output (unwritten or broken)"
    e = nmse(got, ref)
    key = f"{family} {dtype}"
    WORST[key] = max(WORST.get(key, 0.0), e)
    log = os.environ.get("ATTN_NMSE_LOG")
    if log:
        Path(log).write_text(json.dumps(WORST, indent=1, sort_keys=True))
    assert e <= NMSE_MAX[dtype], f"{what}: NMSE {e:.3g} > {NMSE_MAX[dtype]}"


def family_of(n, H, hkv, dtype, knobs):
    mode = knobs.get("mode") or ("decode" if n * (H // hkv) <= ao.DECODE_MAX_ROWS else "prefill")
    if mode == "decode":
        return "decode-" + (knobs.get("decode_kernel") or ("tcb" if dtype == "f16" else "fma"))
    return "prefill-" + (knobs.get("prefill_kernel") or ("tc" if dtype == "f16" else "fma"))


@pytest.mark.parametrize("dtype", ["f16", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H%d_Hkv%d_dk%d" % s)
@pytest.mark.parametrize("n", NS)
def test_attention_matches_numpy(n, shape, dtype):
    cp = _cupy()
    H, hkv, dk = shape
    rng = np.random.default_rng(1000 * n + 10 * dk + H + (dtype == "f16"))
    L = n + 45                                                               # not a multiple of 16
    q, kc, vc, pc, bt, qpos = make_case(rng, n, H, hkv, dk, dtype, L, shuffle=(n == 7))
    scale = 1.0 / np.sqrt(dk)
    for window in (0, max(1, L // 3)):
        for softcap in (0.0, 30.0):
            ref = reference(q, kc, vc, pc, bt, L, qpos, scale, window, softcap)
            got = run_gpu(cp, q, kc, vc, pc, bt, L, qpos, scale, window, softcap)
            check(got, ref, dtype, f"n={n} {shape} {dtype} window={window} softcap={softcap}",
                  family_of(n, H, hkv, dtype, {}))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H%d_Hkv%d_dk%d" % s)
@pytest.mark.parametrize("dtype", ["f16", "f32"])
def test_decode_and_prefill_kernels_agree(shape, dtype):
    """Small n through every kernel, several split counts (1, default, 5, one page each)."""
    cp = _cupy()
    H, hkv, dk = shape
    rng = np.random.default_rng(7 + dk)
    n = 1 if H // hkv > 4 else 2
    L = 1000
    q, kc, vc, pc, bt, qpos = make_case(rng, n, H, hkv, dk, dtype, L)
    scale = 0.125
    ref = reference(q, kc, vc, pc, bt, L, qpos, scale, 300, 0.0)
    knob_sets = [dict(mode="prefill")]
    for kern in ("tc", "tcb", "fma") if dtype == "f16" else ("fma",):
        knob_sets += [dict(mode="decode", decode_kernel=kern, splits=s) for s in (1, None, 5, bt.shape[0])]
        knob_sets += [dict(mode="decode", decode_kernel=kern, splits=s, split_keys=k, flat_max=f)  # fused combine
                      for s, k, f in ((None, 64, None), (bt.shape[0], 1, None), (3, 64, None), (None, 4096, None),
                                      (bt.shape[0], 1, 2), (bt.shape[0], 1, 4096))]   # 16, 16, 3, 1 used; 2 levels
    for knobs in knob_sets:
        got = run_gpu(cp, q, kc, vc, pc, bt, L, qpos, scale, 300, 0.0, **knobs)
        check(got, ref, dtype, f"{knobs} {shape} {dtype}", family_of(n, H, hkv, dtype, knobs))
    if dtype == "f16":                       # softcap through the tensor-core decode too
        ref_cap = reference(q, kc, vc, pc, bt, L, qpos, scale, 0, 30.0)
        got = run_gpu(cp, q, kc, vc, pc, bt, L, qpos, scale, 0, 30.0, mode="decode", decode_kernel="tc")
        check(got, ref_cap, dtype, f"decode tc softcap {shape}", "decode-tc")
    for kind in ("tc", "fma") if dtype == "f16" else ("fma",):
        for br in ao.prefill_row_choices(kind, dk):
            got = run_gpu(cp, q, kc, vc, pc, bt, L, qpos, scale, 300, 30.0 if br == 16 else 0.0, mode="prefill",
                          prefill_kernel=kind, prefill_rows=br)
            ref2 = ref if br != 16 else reference(q, kc, vc, pc, bt, L, qpos, scale, 300, 30.0)
            check(got, ref2, dtype, f"prefill {kind} rows={br} {shape} {dtype}", "prefill-" + kind)


@pytest.mark.parametrize("qfirst", ["0", "1"])
@pytest.mark.parametrize("n", [1, 2])
def test_decode_prefetch_changes_nothing(n, qfirst, monkeypatch):
    """The decode kernels' L2 prefetch of another buffer (the backend gives them the o projection's
    weights) leaves every output bit as it was, whether it runs (kv below prefetch_kv_max) or is
    skipped, with a span that is not a multiple of the 4 KB pieces or of the grid; in both builds
    of the q load (GGFLAT_ATTN_QFIRST)."""
    monkeypatch.setenv("GGFLAT_ATTN_QFIRST", qfirst)
    cp = _cupy()
    H, hkv, dk = 32, 8, 128
    rng = np.random.default_rng(41 + n)
    L = 333
    q, kc, vc, pc, bt, qpos = make_case(rng, n, H, hkv, dk, "f16", L)
    other = cp.arange(9_437_184 + 4112, dtype=cp.uint8)            # ~9 MB, as o's weights of an 8B
    ref = reference(q, kc, vc, pc, bt, L, qpos, 0.1, 0, 0.0)
    for kern in ("tc", "tcb", "fma"):
        base = run_gpu(cp, q, kc, vc, pc, bt, L, qpos, 0.1, 0, 0.0, mode="decode", decode_kernel=kern)
        check(base, ref, "f16", f"decode {kern} n={n}", "decode-" + kern)
        for kv_max in (None, 0):
            got = run_gpu(cp, q, kc, vc, pc, bt, L, qpos, 0.1, 0, 0.0, mode="decode", decode_kernel=kern,
                          prefetch=(other.data.ptr, other.nbytes), prefetch_kv_max=kv_max)
            assert np.array_equal(got, base), (kern, kv_max)
    assert int(other[-1]) == (other.size - 1) % 256                # the prefetched bytes are unchanged


@pytest.mark.parametrize("n", [1, 4, 200])
def test_long_sequence_llama(n):
    """Llama-8B geometry over 8000 cached tokens (many splits / tiles), f16 pages."""
    cp = _cupy()
    rng = np.random.default_rng(8000 + n)
    L = 8000
    q, kc, vc, pc, bt, qpos = make_case(rng, n, 32, 8, 128, "f16", L)
    for window, softcap in ((0, 0.0), (4096, 50.0)):
        ref = reference(q, kc, vc, pc, bt, L, qpos, 0.088, window, softcap)
        knob_sets = [{}] if n > 2 else [{}, dict(mode="prefill"), dict(decode_kernel="fma")]
        for knobs in knob_sets:
            got = run_gpu(cp, q, kc, vc, pc, bt, L, qpos, 0.088, window, softcap, **knobs)
            check(got, ref, "f16", f"L=8000 n={n} {knobs}", family_of(n, 32, 8, "f16", knobs))


@pytest.mark.parametrize("n", [1, 7, 300])
def test_empty_sequence_and_nothing_visible(n):
    cp = _cupy()
    rng = np.random.default_rng(n)
    q, kc, vc, pc, bt, qpos = make_case(rng, n, 9, 3, 64, "f16", 40)
    got = run_gpu(cp, q, kc, vc, pc, bt, 0, qpos, 0.125, 0, 0.0)            # kv_len = 0
    assert np.array_equal(got, np.zeros_like(got))
    got = run_gpu(cp, q, kc, vc, pc, bt, 40, np.full(n, -5, np.int32), 0.125, 0, 0.0)   # before every position
    assert np.array_equal(got, np.zeros_like(got))


@pytest.mark.parametrize("dtype", ["f16", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H%d_Hkv%d_dk%d" % s)
def test_kv_store_matches_numpy(shape, dtype):
    cp = _cupy()
    H, hkv, dk = shape
    rng = np.random.default_rng(dk + hkv)
    n_pages, n = 12, 70
    dt = np.float16 if dtype == "f16" else np.float32
    kc = rng.standard_normal((n_pages, PAGE, hkv, dk)).astype(dt)
    vc = rng.standard_normal((n_pages, PAGE, hkv, dk)).astype(dt)
    pc = np.full((n_pages, PAGE), POS_EMPTY, np.int32)
    k = (rng.standard_normal((n, hkv, dk)) * 3).astype(np.float32)
    v = (rng.standard_normal((n, hkv, dk)) * 3).astype(np.float32)
    k[0, 0, :4] = [70000.0, -1e-8, 65519.0, 3.0e-5]                        # overflow, subnormal, rounding
    slots = rng.choice(n_pages * PAGE, n, replace=False).astype(np.int32)
    pos = rng.integers(0, 1000, n).astype(np.int32)
    d = [cp.asarray(a) for a in (k, v, slots, pos, kc, vc, pc)]
    ao.kv_store(*d)
    cp.cuda.runtime.deviceSynchronize()
    kr, vr, pr = kc.copy(), vc.copy(), pc.copy()
    kr.reshape(-1, hkv, dk)[slots] = k
    vr.reshape(-1, hkv, dk)[slots] = v
    pr.reshape(-1)[slots] = pos
    assert np.array_equal(cp.asnumpy(d[4]).view(np.uint8), kr.view(np.uint8))
    assert np.array_equal(cp.asnumpy(d[5]).view(np.uint8), vr.view(np.uint8))
    assert np.array_equal(cp.asnumpy(d[6]), pr)


@pytest.mark.parametrize("window,softcap,split_keys", [(0, 0.0, None), (50, 30.0, None), (0, 0.0, 64)])
def test_cuda_graph_decode_replay(window, softcap, split_keys):
    """Capture kv_store + decode attention once; replay with kv_len growing 1 -> 300 (one split
    written directly, then 2+ splits combined in the kernel: split_keys=64 crosses a split
    boundary every 64 tokens)."""
    cp = _cupy()
    H, hkv, dk = 9, 3, 64
    rng = np.random.default_rng(window)
    max_pages = 20
    n_pages = 24
    kc = np.zeros((n_pages, PAGE, hkv, dk), np.float16)
    vc = np.zeros_like(kc)
    pc = np.full((n_pages, PAGE), POS_EMPTY, np.int32)
    bt = rng.permutation(n_pages)[:max_pages].astype(np.int32)
    dkc, dvc, dpc, dbt = (cp.asarray(a) for a in (kc, vc, pc, bt))
    k_new = cp.zeros((1, hkv, dk), cp.float32)
    v_new = cp.zeros((1, hkv, dk), cp.float32)
    slot = cp.zeros(1, cp.int32)
    pos = cp.zeros(1, cp.int32)
    q = cp.zeros((1, H, dk), cp.float32)
    kv_len = cp.zeros(1, cp.int32)
    out = cp.zeros((1, H * dk), cp.float32)
    scratch = cp.empty(ao.attention_scratch_bytes(1, H, dk, max_pages * PAGE, hkv, PAGE), cp.uint8)
    stream = cp.cuda.Stream(non_blocking=True)
    steps = [ao.plan_kv_store(k_new, v_new, slot, pos, dkc, dvc, dpc, stream),
             ao.plan_attention(q, dkc, dvc, dpc, dbt, kv_len, pos, out, 0.125, window, softcap, stream, scratch,
                               split_keys=split_keys)]
    for s in steps:                                 # load modules, set attributes before capturing
        s()
    stream.synchronize()
    dpc.fill(POS_EMPTY)
    cp.cuda.runtime.deviceSynchronize()
    with stream:
        stream.begin_capture()
        for s in steps:
            s()
        graph = stream.end_capture()
    p = 0
    worst = 0.0
    for t in range(1, 301):
        p += int(rng.integers(1, 3))                                          # position gaps
        j = t - 1
        s_phys = int(bt[j // PAGE]) * PAGE + j % PAGE
        kn = rng.standard_normal((1, hkv, dk)).astype(np.float32)
        vn = rng.standard_normal((1, hkv, dk)).astype(np.float32)
        qn = rng.standard_normal((1, H, dk)).astype(np.float32)
        for dev, host in ((k_new, kn), (v_new, vn), (q, qn), (slot, np.array([s_phys], np.int32)),
                          (pos, np.array([p], np.int32)), (kv_len, np.array([t], np.int32))):
            dev.set(host, stream)
        if t % 7 == 0:
            with stream:
                out.fill(np.nan)                                              # poison now and then
        graph.launch(stream)
        stream.synchronize()
        kc.reshape(-1, hkv, dk)[s_phys] = kn
        vc.reshape(-1, hkv, dk)[s_phys] = vn
        pc.reshape(-1)[s_phys] = p
        ref = reference(qn, kc, vc, pc, bt, t, np.array([p], np.int32), 0.125, window, softcap)
        got = cp.asnumpy(out)
        assert np.isfinite(got).all(), f"step {t}: NaN"
        e = nmse(got, ref)
        worst = max(worst, e)
        assert e <= NMSE_MAX["f16"], f"step {t}: NMSE {e:.3g}"
    check(got, ref, "f16", "graph replay", "decode-graph")
    assert np.array_equal(cp.asnumpy(dpc), pc)
    print(f"graph replay 1..300: worst NMSE {worst:.3g}")


class Reference:
    """ops.attention on the NumPy backend over one layer's host pages, planned once, run per kv_len."""

    def __init__(self, q, kc, vc, pc, bt, qpos, scale, window, softcap):
        n, H, dk = q.shape
        n_pages, page, hkv, _ = kc.shape
        dv = vc.shape[3]
        g = Graph("attn")
        qt = g.input("q", q.shape)
        btt = g.input("bt", bt.shape, "i32")
        klt = g.input("kv_len", (1,), "i32")
        qpt = g.input("q_pos", (n,), "i32")
        kv = g.kv_layer(0, hkv, dk, dv)
        g.output("out", ops.attention(qt, kv, btt, klt, qpt, scale, window, softcap))
        self.be = NumpyBackend()
        self.st = self.be.alloc_kv(KVCacheSpec(1, hkv, dk, dv, n_pages, page, "f16" if kc.dtype == np.float16 else "f32"))
        self.st.k[0][...] = kc
        self.st.v[0][...] = vc
        self.st.pos[0][...] = pc
        self.plan = self.be.plan(g)
        self.inputs = {"q": q, "bt": bt, "q_pos": qpos}

    def __call__(self, L, qpos=None):
        inputs = dict(self.inputs, kv_len=np.array([L], np.int32))
        if qpos is not None:
            inputs["q_pos"] = qpos
        return self.be.run(self.plan, inputs, self.st)["out"]


FUSED_CASES = [  # (decode kernel, H, Hkv, dk, dtype, n, split_keys, flat_max, window, softcap)
    ("tc", 9, 3, 64, "f16", 1, 64, 4096, 0, 0.0),       # one level only
    ("tcb", 9, 3, 64, "f16", 1, 64, 4, 0, 0.0),         # two levels from 5 splits on
    (None, 9, 3, 64, "f16", 1, None, None, 0, 0.0),     # the defaults
    ("tc", 4, 1, 256, "f16", 1, 64, 3, 300, 30.0),
    ("tcb", 4, 1, 256, "f16", 1, 64, None, 300, 30.0),
    (None, 4, 1, 256, "f16", 1, None, None, 0, 0.0),
    ("tc", 32, 8, 128, "f16", 2, 128, None, 0, 0.0),    # 8 query rows per kv head
    ("tcb", 32, 8, 128, "f16", 2, 64, 2, 0, 0.0),
    ("fma", 8, 8, 64, "f32", 1, 64, 3, 0, 0.0),
    ("fma", 32, 8, 128, "f16", 1, 64, None, 0, 50.0),
]


@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "%s_H%d_Hkv%d_dk%d_%s_n%d_sk%s_fm%s" % c[:8])
def test_fused_decode_graph_replay(case):
    """One decode attention captured in a CUDA graph, replayed as kv_len grows 1 -> 300 and on
    past several split boundaries to the whole table: one split writes the output itself, then
    2, 3, ... splits are combined by the last block of each kv head. Then 200 replays in a row at
    a many-split length give the same output every time: the output is poisoned before each
    replay, so a ticket counter that drifted (a combine skipped) shows. The counters end at 0."""
    cp = _cupy()
    kern, H, hkv, dk, dtype, n, split_keys, flat_max, window, softcap = case
    rng = np.random.default_rng(hkv * 1000 + dk + n)
    Lmax = 1500
    q, kc, vc, pc, bt, qpos = make_case(rng, n, H, hkv, dk, dtype, Lmax, dead_query=False)
    ref = Reference(q, kc, vc, pc, bt, qpos, 0.1, window, softcap)
    max_slots = bt.shape[0] * PAGE
    d = {k: cp.asarray(v) for k, v in dict(q=q, kc=kc, vc=vc, pc=pc, bt=bt, qpos=qpos).items()}
    kv_len = cp.zeros(1, cp.int32)
    out = cp.full((n, H * dk), np.nan, cp.float32)
    scratch = cp.full(ao.attention_scratch_bytes(n, H, dk, max_slots, hkv, PAGE), 0xFF, cp.uint8)  # garbage
    stream = cp.cuda.Stream(non_blocking=True)
    cp.cuda.runtime.deviceSynchronize()
    step = ao.plan_attention(d["q"], d["kc"], d["vc"], d["pc"], d["bt"], kv_len, d["qpos"], out, 0.1, window,
                             softcap, stream, scratch, decode_kernel=kern, split_keys=split_keys, flat_max=flat_max)
    step()
    stream.synchronize()
    with stream:
        stream.begin_capture()
        step()
        graph = stream.end_capture()

    j = np.arange(Lmax)
    key_pos = pc.reshape(-1)[bt[j // PAGE] * PAGE + j % PAGE]          # logical slot -> position

    def qpos_at(L):                      # as in decoding: the newest token(s) of the sequence
        live = key_pos[:L][key_pos[:L] != POS_EMPTY]
        top = int(live.max()) if live.size else 0
        return (top - (n - 1) + np.arange(n)).astype(np.int32)

    def replay(L):
        kv_len.set(np.array([L], np.int32), stream)
        d["qpos"].set(qpos_at(L), stream)
        with stream:
            out.fill(np.nan)
        graph.launch(stream)
        stream.synchronize()
        return cp.asnumpy(out)

    kvb = kc.dtype.itemsize
    kind = kern or ("tcb" if dtype == "f16" and ao.bulk_copies_ok(PAGE) else "tc" if dtype == "f16" else "fma")
    grid = ao.default_splits(hkv, bt.shape[0], ao.decode_kernel_smem(kind, kvb, dk, dk, n * H // hkv)[1])
    mu = ao.split_min_units(split_keys or ao.default_split_keys(hkv, n * H // hkv, dk, dk, kvb), PAGE)
    lengths = list(range(1, 301)) + [319, 320, 321, 383, 384, 385, 511, 512, 513, 777, 1024, 1025, 1499, 1500, 1300, 5]
    used, levels = set(), set()
    for L in lengths:
        got = replay(L)
        ns = ao.split_geometry(L, grid, mu, PAGE)[0]
        used.add(ns)
        levels.add(1 if ns == 1 else 2 if ao.combine_groups(ns, flat_max or ao.DEFAULT_FLAT_MAX)[1] == 1 else 3)
        check(got, ref(L, qpos_at(L)), dtype, f"{case} kv_len={L}", f"decode-fused-{kern}")
    assert 1 in used and max(used) >= 3, used                      # direct and combined paths both ran
    if flat_max is not None and flat_max < 8:
        assert 3 in levels, (used, levels)                         # ... and the two-level combine
    L = 1500
    first = replay(L)
    check(first, ref(L, qpos_at(L)), dtype, f"{case} kv_len={L}", f"decode-fused-{kern}")
    for t in range(200):
        assert np.array_equal(replay(L), first), f"replay {t}: output differs (counter drift?)"
    cnt = cp.asnumpy(scratch[: 4 * hkv].view(cp.uint32))
    assert (cnt == 0).all(), f"ticket counters not back to 0: {cnt}"
