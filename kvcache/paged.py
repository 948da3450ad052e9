"""Paged KV cache bookkeeping: fixed-size pages, a free list, per-sequence page tables.

Storage (the arrays that hold keys and values) belongs to a backend
(``Backend.alloc_kv``); this module decides *where* each token goes. Layout of
one layer's storage, whatever the backend:

    k:   (n_pages, page_size, n_kv_heads, head_dim_k)   # storage dtype of the spec
    v:   (n_pages, page_size, n_kv_heads, head_dim_v)
    pos: (n_pages, page_size) i32                        # position of the token in each slot

A sequence's logical slot j lives in page ``pages[j // page_size]`` at offset
``j % page_size``; its physical slot number is ``page * page_size + offset``.
Attention reads a sequence through its block table (the page list, padded to
``max_pages``) and masks by the stored positions, so quantized pages, CQ and
KV-Compress eviction change the storage and the slot order, not attention's
interface.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.errors import ContextError, GGFlatError

KV_DTYPES = {"f32": 4, "f16": 2}


@dataclass(frozen=True)
class KVCacheSpec:
    n_layers: int
    n_kv_heads: int
    head_dim_k: int
    head_dim_v: int
    n_pages: int
    page_size: int = 16
    dtype: str = "f16"

    def __post_init__(self) -> None:
        if self.dtype not in KV_DTYPES:
            raise GGFlatError(f"unsupported KV cache type {self.dtype!r} (supported: {', '.join(KV_DTYPES)})")
        if min(self.n_layers, self.n_kv_heads, self.head_dim_k, self.head_dim_v, self.n_pages, self.page_size) < 1:
            raise GGFlatError(f"invalid KV cache geometry {self}")

    @property
    def capacity(self) -> int:
        """Tokens the whole cache can hold."""
        return self.n_pages * self.page_size

    @property
    def nbytes(self) -> int:
        per_slot = self.n_kv_heads * (self.head_dim_k + self.head_dim_v) * KV_DTYPES[self.dtype] + 4
        return self.n_layers * self.capacity * per_slot

    @classmethod
    def for_context(cls, n_ctx: int, *, n_layers: int, n_kv_heads: int, head_dim_k: int, head_dim_v: int,
                    page_size: int = 16, dtype: str = "f16") -> "KVCacheSpec":
        n_pages = max(1, -(-n_ctx // page_size))
        return cls(n_layers, n_kv_heads, head_dim_k, head_dim_v, n_pages, page_size, dtype)


class PageAllocator:
    """Free list of page numbers; lowest pages first, so a fresh sequence's pages are contiguous."""

    def __init__(self, n_pages: int) -> None:
        self.n_pages = n_pages
        self._free = list(range(n_pages - 1, -1, -1))   # pop() takes the lowest

    @property
    def n_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise ContextError(f"KV cache is full: need {n} more pages, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(sorted(pages, reverse=True))
        self._free.sort(reverse=True)


class Sequence:
    """One sequence's view of the cache: its pages and how many logical slots hold tokens."""

    def __init__(self, allocator: PageAllocator, page_size: int, max_pages: int,
                 max_tokens: int | None = None) -> None:
        self._alloc = allocator
        self.page_size = page_size
        self.max_pages = max_pages
        self.max_tokens = max_pages * page_size if max_tokens is None else max_tokens
        if self.max_tokens > max_pages * page_size:
            raise ValueError(f"{self.max_tokens} tokens do not fit in {max_pages} pages of {page_size}")
        self.pages: list[int] = []
        self.length = 0

    @property
    def capacity(self) -> int:
        """Tokens this sequence may hold (its context)."""
        return self.max_tokens

    def reserve(self, n: int) -> np.ndarray:
        """Claim the next ``n`` logical slots; returns their physical slot numbers, (n,) i32."""
        new_len = self.length + n
        if new_len > self.capacity:
            raise ContextError(f"sequence needs {new_len} KV slots, the context holds {self.capacity}")
        need = -(-new_len // self.page_size) - len(self.pages)
        if need > 0:
            self.pages.extend(self._alloc.alloc(need))
        j = np.arange(self.length, new_len, dtype=np.int64)
        pages = np.asarray(self.pages, dtype=np.int64)
        slots = pages[j // self.page_size] * self.page_size + j % self.page_size
        self.length = new_len
        return slots.astype(np.int32)

    def truncate(self, n: int) -> None:
        """Forget every token from logical slot ``n`` on (chat /regen, speculative rollback)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"truncate({n}) on a sequence of {self.length}")
        self.length = n
        keep = -(-n // self.page_size)
        if keep < len(self.pages):
            self._alloc.free(self.pages[keep:])
            del self.pages[keep:]

    def clear(self) -> None:
        self.truncate(0)

    def block_table(self) -> np.ndarray:
        """(max_pages,) i32: the page list padded with page 0 (padding is never read: kv_len bounds it)."""
        bt = np.zeros(self.max_pages, dtype=np.int32)
        bt[:len(self.pages)] = self.pages
        return bt


class PagedKVCache:
    """A cache's geometry, its page allocator and the backend storage that holds the pages."""

    def __init__(self, spec: KVCacheSpec, storage: object, n_ctx: int | None = None) -> None:
        self.spec = spec
        self.storage = storage
        self.allocator = PageAllocator(spec.n_pages)
        self.n_ctx = spec.capacity if n_ctx is None else n_ctx   # the context users asked for (<= capacity)

    def new_sequence(self, max_tokens: int | None = None) -> Sequence:
        """A sequence of at most ``max_tokens`` (default: the cache's context)."""
        max_tokens = self.n_ctx if max_tokens is None else max_tokens
        max_pages = -(-max_tokens // self.spec.page_size)
        return Sequence(self.allocator, self.spec.page_size, max_pages, max_tokens)
