"""Paged KV cache: fixed-size pages and per-sequence page tables (see ``kvcache.paged``)."""
from .paged import KV_DTYPES, KVCacheSpec, PageAllocator, PagedKVCache, Sequence

__all__ = ["KV_DTYPES", "KVCacheSpec", "PageAllocator", "PagedKVCache", "Sequence"]
