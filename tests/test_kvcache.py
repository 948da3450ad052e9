"""Paged KV cache bookkeeping (kvcache.paged): pages, block tables, slots, errors.

Layout under test: logical slot j of a sequence lives at physical slot
``pages[j // page_size] * page_size + j % page_size``.
"""
from __future__ import annotations

import numpy as np
import pytest

from engine.errors import ContextError, GGFlatError
from ggml_py import Graph, ops
from ggml_py.backend_numpy import NumpyBackend
from kvcache import KVCacheSpec, PageAllocator, PagedKVCache, Sequence


def logical_to_physical(seq: Sequence) -> np.ndarray:
    j = np.arange(seq.length)
    bt = seq.block_table()
    return bt[j // seq.page_size] * seq.page_size + j % seq.page_size


# -- spec ------------------------------------------------------------------------------------

def test_spec_geometry():
    spec = KVCacheSpec(n_layers=2, n_kv_heads=3, head_dim_k=64, head_dim_v=32, n_pages=5, page_size=16, dtype="f16")
    assert spec.capacity == 80
    assert spec.nbytes == 2 * 80 * (3 * (64 + 32) * 2 + 4)
    assert KVCacheSpec(1, 1, 8, 8, 5, 16, "f32").nbytes == 80 * (16 * 4 + 4)
    s = KVCacheSpec.for_context(100, n_layers=1, n_kv_heads=1, head_dim_k=8, head_dim_v=8, page_size=16)
    assert s.n_pages == 7 and s.capacity >= 100
    with pytest.raises(GGFlatError, match="q3"):
        KVCacheSpec(1, 1, 8, 8, 4, 16, "q3")
    with pytest.raises(GGFlatError):
        KVCacheSpec(1, 0, 8, 8, 4, 16, "f16")


# -- allocator -----------------------------------------------------------------------------------

def test_allocator_lowest_first_and_full():
    a = PageAllocator(4)
    assert a.n_free == 4
    assert a.alloc(2) == [0, 1]
    a.free([0])
    assert a.alloc(1) == [0]                                 # freed pages come back, lowest first
    with pytest.raises(ContextError, match="full"):
        a.alloc(3)
    assert a.n_free == 2                                     # a refused alloc takes nothing
    assert sorted(a.alloc(2)) == [2, 3]
    assert a.n_free == 0


# -- sequences -------------------------------------------------------------------------------

def test_reserve_across_page_boundaries():
    a = PageAllocator(8)
    s = Sequence(a, page_size=4, max_pages=5)
    np.testing.assert_array_equal(s.reserve(3), [0, 1, 2])
    np.testing.assert_array_equal(s.reserve(3), [3, 4, 5])   # crosses into page 1
    assert s.pages == [0, 1] and s.length == 6
    np.testing.assert_array_equal(s.reserve(6), [6, 7, 8, 9, 10, 11])
    assert s.pages == [0, 1, 2]
    bt = s.block_table()
    assert bt.dtype == np.int32 and bt.shape == (5,)
    np.testing.assert_array_equal(bt, [0, 1, 2, 0, 0])      # padded; kv_len bounds what is read
    assert s.reserve(0).shape == (0,)
    assert a.n_free == 5


def test_interleaved_sequences_never_share_slots():
    a = PageAllocator(16)
    s1, s2 = Sequence(a, 4, 8), Sequence(a, 4, 8)
    got = {1: [], 2: []}
    rng = np.random.default_rng(0)
    for _ in range(12):                                      # random interleaving of small reservations
        for k, s in ((1, s1), (2, s2)):
            got[k].extend(s.reserve(int(rng.integers(0, 4))).tolist())
    assert not set(got[1]) & set(got[2])
    assert not set(s1.pages) & set(s2.pages)
    for k, s in ((1, s1), (2, s2)):                           # slots agree with the block table
        assert len(set(got[k])) == len(got[k]) == s.length
        np.testing.assert_array_equal(got[k], logical_to_physical(s))
    assert any(np.diff(s.pages).max() > 1 for s in (s1, s2))  # the interleaving scattered the pages


def test_truncate_frees_pages_and_slots_are_reused():
    a = PageAllocator(6)
    s = Sequence(a, 4, 6)
    first = s.reserve(10)                                    # pages 0, 1, 2
    assert a.n_free == 3
    s.truncate(5)                                            # keeps 2 pages (slots 0..4 of 8)
    assert s.length == 5 and s.pages == [0, 1] and a.n_free == 4
    np.testing.assert_array_equal(s.reserve(5), first[5:10])   # the same physical slots again
    s.truncate(8)
    assert s.pages == [0, 1] and a.n_free == 4              # 8 slots fill exactly 2 pages
    s.truncate(8)                                            # idempotent
    with pytest.raises(ValueError):
        s.truncate(9)                                        # beyond the length
    with pytest.raises(ValueError):
        s.truncate(-1)
    s.clear()
    assert s.length == 0 and s.pages == [] and a.n_free == 6


def test_cache_full_leaves_the_sequence_unchanged():
    a = PageAllocator(3)
    other = Sequence(a, 4, 3)
    other.reserve(8)                                         # 2 of 3 pages
    s = Sequence(a, 4, 3)
    s.reserve(3)
    with pytest.raises(ContextError, match="full"):
        s.reserve(3)                                         # needs a second page: none left
    assert s.length == 3 and s.pages == [2] and a.n_free == 0
    other.clear()
    np.testing.assert_array_equal(s.reserve(3), [11, 0, 1])  # page 2 then the lowest freed page


def test_context_overflow():
    a = PageAllocator(10)
    s = Sequence(a, 4, 2)
    s.reserve(6)
    with pytest.raises(ContextError, match="8"):
        s.reserve(3)                                         # 9 > 2 pages of 4
    assert s.length == 6 and a.n_free == 8
    s.reserve(2)
    with pytest.raises(ContextError):
        s.reserve(1)


def test_paged_cache_sequences():
    spec = KVCacheSpec(1, 1, 4, 4, n_pages=4, page_size=4, dtype="f32")
    storage = NumpyBackend().alloc_kv(spec)
    cache = PagedKVCache(spec, storage)
    assert cache.storage is storage
    s1 = cache.new_sequence(6)                               # 2 pages; 6 tokens
    assert s1.max_pages == 2
    with pytest.raises(ContextError):
        s1.reserve(7)
    s2 = cache.new_sequence()                                # the whole cache
    assert s2.max_pages == 4
    s1.reserve(5)
    with pytest.raises(ContextError, match="full"):
        s2.reserve(16)


# -- the cache through the backend: two sequences in one cache -----------------------------------

def test_two_sequences_attend_only_to_their_own_tokens():
    """Interleaved prefill/decode of two sequences in one paged cache: each step's
    attention output must equal a dense attention over that sequence's tokens alone."""
    rng = np.random.default_rng(1)
    Hkv, H, d, P = 1, 2, 8, 4
    spec = KVCacheSpec(1, Hkv, d, d, n_pages=8, page_size=P, dtype="f32")
    be = NumpyBackend()
    cache = PagedKVCache(spec, be.alloc_kv(spec))
    plans = {}

    def plan(n, max_pages):
        if (n, max_pages) not in plans:
            g = Graph()
            kv = g.kv_layer(0, Hkv, d, d)
            st = ops.kv_store(kv, g.input("k", (n, Hkv, d)), g.input("v", (n, Hkv, d)),
                              g.input("slots", (n,), "i32"), g.input("pos", (n,), "i32"))
            g.output("a", ops.attention(g.input("q", (n, H, d)), kv, g.input("bt", (max_pages,), "i32"),
                                        g.input("kv_len", (1,), "i32"), g.input("pos2", (n,), "i32"), 1.0,
                                        after=(st,)))
            plans[n, max_pages] = be.plan(g)
        return plans[n, max_pages]

    seqs = [cache.new_sequence(16), cache.new_sequence(16)]
    hist = [([], []), ([], [])]
    for step, (which, n) in enumerate([(0, 5), (1, 3), (0, 1), (1, 6), (0, 4), (1, 1), (0, 1)]):
        s = seqs[which]
        start = s.length
        slots = s.reserve(n)
        q = rng.standard_normal((n, H, d)).astype(np.float32)
        k = rng.standard_normal((n, Hkv, d)).astype(np.float32)
        v = rng.standard_normal((n, Hkv, d)).astype(np.float32)
        pos = np.arange(start, start + n, dtype=np.int32)
        out = be.run(plan(n, s.max_pages), {"q": q, "k": k, "v": v, "slots": slots, "pos": pos, "pos2": pos,
                                            "bt": s.block_table(), "kv_len": np.array([s.length], np.int32)},
                     cache.storage)["a"]
        hist[which][0].append(k)
        hist[which][1].append(v)
        K, V = np.concatenate(hist[which][0])[:, 0], np.concatenate(hist[which][1])[:, 0]   # (L, d)
        sc = np.einsum("nhd,ld->nhl", q.astype(np.float64), K)
        sc = np.where(np.arange(s.length)[None, None, :] <= pos[:, None, None], sc, -np.inf)
        p = np.exp(sc - sc.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ref = np.einsum("nhl,ld->nhd", p, V).reshape(n, H * d)
        err = ((out - ref) ** 2).sum() / (ref ** 2).sum()
        assert err < 1e-10, f"step {step}: nmse {err}"
    assert not set(seqs[0].pages) & set(seqs[1].pages)
