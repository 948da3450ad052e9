"""llama-bench's method: prompt processing (ppN) and token generation (tgN) throughput.

ppN: N tokens in one batch (``n_batch`` per forward) after ``depth`` tokens already
in the cache; tgN: N single-token forward steps after ``depth`` tokens. Token ids
are random (as llama-bench's), nothing is sampled or detokenized, and the model
load and the depth fill are outside the timed region, as are two warm-up runs (planning,
CUDA-graph capture).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np

from engine.model import Model


@dataclass
class BenchResult:
    test: str                  # "pp512", "tg128", "pp512 @ d8192"
    n_tokens: int
    depth: int
    samples_ts: list[float]    # tokens/s of each repetition

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples_ts)

    @property
    def std(self) -> float:
        return statistics.stdev(self.samples_ts) if len(self.samples_ts) > 1 else 0.0


def _run_once(model: Model, cache, kind: str, n: int, depth: int, n_batch: int, rng: np.random.Generator) -> float:
    seq = cache.new_sequence()
    try:
        if depth:
            model.prefill(cache, seq, rng.integers(0, model.n_vocab, depth), n_batch=n_batch)
        toks = rng.integers(0, model.n_vocab, n)
        t0 = time.perf_counter()
        if kind == "pp":
            model.prefill(cache, seq, toks, n_batch=n_batch)
        else:
            for t in toks:
                model.forward(cache, seq, [int(t)])
        return time.perf_counter() - t0
    finally:
        seq.clear()


def bench(model: Model, kind: str, n: int, depth: int = 0, reps: int = 5, n_batch: int = 512,
          seed: int = 0) -> BenchResult:
    if kind not in ("pp", "tg"):
        raise ValueError(kind)
    cache = model.new_cache(depth + n + 1)
    rng = np.random.default_rng(seed)
    # warm-up twice: the first run plans the graphs, the second is where a backend captures them
    for _ in range(2):
        _run_once(model, cache, kind, min(n, 16 if kind == "tg" else n), depth and min(depth, 16), n_batch, rng)
    samples = [n / _run_once(model, cache, kind, n, depth, n_batch, rng) for _ in range(reps)]
    name = f"{kind}{n}" + (f" @ d{depth}" if depth else "")
    return BenchResult(name, n, depth, samples)
