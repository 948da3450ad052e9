"""Perplexity exactly as llama-perplexity computes it (tests/reference/README.md).

The text is tokenized once (special tokens not parsed, BOS added when the model
adds one) and cut into chunks of ``n_ctx`` tokens (a tail shorter than a chunk is
dropped); with BOS, each chunk's first token is replaced by BOS. Each chunk runs
from an empty cache, and only its second half is scored: the logits at positions
n_ctx/2 … n_ctx-2 predict tokens n_ctx/2+1 … n_ctx-1, each seeing everything
before it in the chunk. PPL = exp(mean NLL); ± = PPL * sqrt(var(NLL) / (count-1)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from engine.errors import GGFlatError
from engine.model import Model


@dataclass
class PerplexityResult:
    n_chunks: int
    n_scored: int
    ppl: float
    ppl_err: float
    running: list[float]           # PPL after each chunk


def chunk_nll(model: Model, cache, chunk: np.ndarray, n_batch: int) -> np.ndarray:
    """NLL (float64) of tokens n/2+1 … n-1 of ``chunk``, run from an empty sequence."""
    n = len(chunk)
    first = n // 2
    seq = cache.new_sequence()
    try:
        rows_logits = []
        for b in range(0, n, n_batch):
            part = chunk[b:b + n_batch]
            # positions b..b+len-1 of the chunk; we need logits at first..n-2
            lo, hi = max(first, b), min(n - 1, b + len(part))
            if lo < hi:
                logits = model.forward(cache, seq, part, np.arange(lo - b, hi - b))
            else:
                logits = model.forward(cache, seq, part, [len(part) - 1])[:0]
            rows_logits.append(logits)
        logits = np.concatenate(rows_logits).astype(np.float64)      # (n-1-first, vocab)
    finally:
        seq.clear()
    if not np.isfinite(logits).all():
        raise GGFlatError("model produced NaN or infinite logits")
    targets = chunk[first + 1:n]
    mx = logits.max(axis=1)
    lse = mx + np.log(np.exp(logits - mx[:, None]).sum(axis=1))
    return lse - logits[np.arange(len(targets)), targets]


def perplexity(model: Model, text: str, n_ctx: int = 512, n_batch: int = 512, max_chunks: int = -1,
               on_chunk: Callable[[int, int, float], None] | None = None) -> PerplexityResult:
    if n_ctx < 4 or n_ctx % 2:
        raise GGFlatError(f"perplexity needs an even context of at least 4 tokens, got -c {n_ctx}")
    tok = model.tokenizer
    ids = np.asarray(tok.encode(text, add_special=True, parse_special=False), dtype=np.int32)
    if len(ids) < 2 * n_ctx:
        raise GGFlatError(f"the text is {len(ids)} tokens; perplexity needs at least 2*c = {2 * n_ctx} "
                          f"(use a smaller -c or a longer text)")
    n_chunks = len(ids) // n_ctx
    if max_chunks > 0:
        n_chunks = min(n_chunks, max_chunks)
    cache = model.new_cache(n_ctx)
    nll_all: list[np.ndarray] = []
    running: list[float] = []
    for i in range(n_chunks):
        chunk = ids[i * n_ctx:(i + 1) * n_ctx].copy()
        if tok.add_bos:
            chunk[0] = tok.bos_id
        nll_all.append(chunk_nll(model, cache, chunk, min(n_batch, n_ctx)))
        cur = np.concatenate(nll_all)
        running.append(math.exp(cur.mean()))
        if on_chunk is not None:
            on_chunk(i, n_chunks, running[-1])
    nll = np.concatenate(nll_all)
    mean = nll.mean()
    ppl = math.exp(mean)
    var = (nll ** 2).mean() - mean ** 2
    err = ppl * math.sqrt(max(var, 0.0) / (len(nll) - 1)) if len(nll) > 1 else 0.0
    return PerplexityResult(n_chunks, len(nll), ppl, err, running)
