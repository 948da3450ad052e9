"""NumPy token sampler: llama.cpp's default chain, and the reference for GPU sampling kernels.

Chain (llama.cpp ``common_params_sampling::samplers`` default order, with the samplers
ggflat has no flag for — DRY, top-n-sigma, typical-p, XTC — left out because they
are off by default there):

    penalties → top-k → top-p → min-p → temperature → draw

Semantics, each with the llama.cpp code it follows (src/llama-sampler.cpp,
common/sampling.cpp of the vendored llama.cpp in llama_cpp_python 0.3.36):

* **penalties** (``llama_sampler_penalties_apply``): for every token seen ``count > 0``
  times among the last ``repeat_last_n`` accepted tokens, in float32::

      logit = logit * repeat_penalty   if logit <= 0   else   logit / repeat_penalty
      logit -= count * frequency_penalty + presence_penalty

  The history holds *every* accepted token, prompt tokens included: llama-cli
  (tools/completion/completion.cpp) and llama-server (server-context.cpp) feed the
  prompt through ``common_sampler_accept`` so the repeat penalty sees it.  The
  caller does the same with :meth:`Sampler.accept`.
* **top-k** (``llama_sampler_top_k_impl``): keep the ``k`` best tokens; ``k = 0`` is off.
* **top-p** (``llama_sampler_top_p_apply``): softmax over the top-k survivors (so the
  probabilities are renormalised over those ``k``), walk them best first and keep up
  to and including the first token whose running sum is ``>= top_p``; ``top_p = 1`` is off.
* **min-p** (``llama_sampler_min_p_apply``): keep ``logit >= max_logit + log(min_p)``
  (float32, i.e. ``p_i >= min_p * p_max``); ``min_p = 0`` is off.
* **temperature** (``llama_sampler_temp_impl``): ``logit / T`` on the survivors only.
  Because temperature comes *last* in llama.cpp's chain, top-p and min-p are decided
  on the T = 1 (penalised, unscaled) distribution; temperature reshapes the
  probabilities inside the surviving set but never changes which tokens are in it.
  (Hugging Face transformers scales first; we follow llama.cpp.)  ``T <= 0`` is
  greedy: llama.cpp's temp sampler keeps only the first maximum, and every filter
  keeps the maximum, so greedy = argmax of the penalised logits, ties → lowest id.
* **draw** (``llama_sampler_dist_apply``): softmax of the scaled survivors, one uniform
  from a seeded PCG64 ``np.random.Generator``, inverse CDF over the survivors in
  ascending id order.  Exactly one uniform per sampled token (as llama.cpp draws even
  when one candidate is left), none in greedy mode.  A seed therefore reproduces a
  run exactly; a GPU kernel with its own (Philox) RNG will pick different tokens
  and is checked against :meth:`Sampler.allowed_probs`, not token by token.

Sampling on the device.  ``ggml_py.ops.sample`` draws inside the decode graph (the CUDA kernels
of ggml_py/cuda/sampling.cu; on the NumPy backend its twin ``ggml_py.sample_ref``): the same
distribution, drawn by FlashInfer-style rejection sampling with a Philox4x32-10 stream keyed by
the seed and counted by draws.  :meth:`Sampler.op_inputs` gives one row of its inputs (the
penalty window travels as a token list) and :meth:`Sampler.sample_op` draws exactly as the op
does on the host, so a generation that samples on the device reproduces from its seed on
either backend.

Ties.  All filters are prefixes of one total order: logit descending, then token id
ascending.  top-k keeps exactly ``k`` tokens and a tie straddling the k-th place is
broken towards the lower id; top-p likewise stops at its crossing token even when
higher-id tokens have the same logit.  llama.cpp's partial sorts leave that order
unspecified; we pin it down so a sorting-free kernel can reproduce it by comparing
``(logit, -id)`` pairs.

Precision.  Penalties and the min-p threshold are float32 like llama.cpp.  top-p's
running sum is float64 over float32 ``exp(logit - max)`` terms (llama.cpp: float32
throughout), the final probabilities are float64.  The two can disagree only when a
cumulative sum lands within ~1e-7 of ``top_p``.

Masked tokens (logit ``-inf``) are never candidates.  NaN anywhere, ``+inf`` anywhere, or
no finite logit at all raise :class:`NonFiniteLogitsError` (DESIGN.md §4: never a
garbage token).

Where the time goes (262,144-token vocab, one core): with top-k set, a partition of a
1/16 subsample gives a threshold that at least ``k`` logits reach, one comparison
pass collects those few hundred candidates, and everything after that is on ``k``
elements.  Measured median per :meth:`Sampler.sample` (Python 3.11, NumPy 2.4, one
core): defaults 0.21–0.23 ms (0.25–0.27 ms with penalties on), greedy 0.05 ms,
top-k off with min-p on 0.1–0.33 ms.  top-k *and* min-p off with top-p < 1 finds the
nucleus by growing a sorted prefix (256, 4096, 65536, ... tokens): 0.7 ms when the
distribution is peaked as LLM outputs usually are, ~11 ms for a broad one (a 23k-token
nucleus).  Every filter off: a float64 softmax + cumsum over the vocab, ~3.4 ms.
"""
from __future__ import annotations

import math
import numbers
import operator
from collections import deque
from dataclasses import dataclass

import numpy as np

from engine.errors import GGFlatError

__all__ = [
    "SamplingParams", "Sampler", "SamplingError", "NonFiniteLogitsError",
    "log_softmax", "top_logprobs", "check_sampled",
]


class SamplingError(GGFlatError):
    """A sampling flag is out of range."""


class NonFiniteLogitsError(GGFlatError):
    """The model produced NaN/Inf logits (or masked every token): generation must stop."""


_FLT_MAX = float(np.finfo(np.float32).max)
_FLT_MIN_INV = 1.0 / _FLT_MAX  # smallest penalty whose float32 reciprocal is finite


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SamplingError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise SamplingError(f"{name} must be finite, got {value}")
    return value


def _int(name: str, value) -> int:
    if isinstance(value, bool):
        raise SamplingError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise SamplingError(f"{name} must be an integer, got {value!r}") from None


@dataclass(frozen=True)
class SamplingParams:
    """Sampling flags; defaults are llama.cpp's (common/common.h ``common_params_sampling``)."""
    temperature: float = 0.8        # --temp; <= 0 → greedy
    top_k: int = 40                 # --top-k; 0 = off
    top_p: float = 0.95             # --top-p; 1 = off
    min_p: float = 0.05             # --min-p; 0 = off
    repeat_penalty: float = 1.0     # --repeat-penalty; 1 = off
    repeat_last_n: int = 64         # --repeat-last-n; 0 = penalties off
    frequency_penalty: float = 0.0  # --frequency-penalty
    presence_penalty: float = 0.0   # --presence-penalty
    seed: int | None = None         # -s/--seed; None (or -1, as in llama.cpp) → random

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def validate(self) -> None:
        """Raise :class:`SamplingError` (one line, naming the flag) on an out-of-range value."""
        _real("--temp", self.temperature)  # any finite value; <= 0 means greedy
        if _int("--top-k", self.top_k) < 0:
            raise SamplingError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        top_p = _real("--top-p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise SamplingError(f"--top-p must be in (0, 1] (1 = off), got {self.top_p}")
        min_p = _real("--min-p", self.min_p)
        if not 0.0 <= min_p <= 1.0:
            raise SamplingError(f"--min-p must be in [0, 1] (0 = off), got {self.min_p}")
        rp = _real("--repeat-penalty", self.repeat_penalty)
        # llama.cpp common_sampler_init: finite, > 0 and 1/penalty finite — as float32
        if not _FLT_MIN_INV <= rp <= _FLT_MAX:
            raise SamplingError(f"--repeat-penalty must be > 0 and finite (1 = off), got {self.repeat_penalty}")
        if _int("--repeat-last-n", self.repeat_last_n) < 0:
            raise SamplingError(f"--repeat-last-n must be >= 0 (0 = off), got {self.repeat_last_n}")
        for flag, v in (("--frequency-penalty", self.frequency_penalty),
                        ("--presence-penalty", self.presence_penalty)):
            if not abs(_real(flag, v)) <= _FLT_MAX:
                raise SamplingError(f"{flag} must be finite, got {v}")
        if self.seed is not None:
            seed = _int("--seed", self.seed)
            if not (seed == -1 or 0 <= seed < 2**64):
                raise SamplingError(f"--seed must be in [0, 2**64) or -1 for a random seed, got {self.seed}")


# ---------------------------------------------------------------------------- helpers

def _as_logits(logits, n_vocab: int | None = None) -> np.ndarray:
    """``logits`` as a 1-D float32 array (no copy when it already is one)."""
    l = np.asarray(logits, dtype=np.float32)
    if l.ndim != 1 or (n_vocab is not None and l.shape[0] != n_vocab):
        raise ValueError(f"logits must have shape ({n_vocab if n_vocab is not None else 'n_vocab'},), got {l.shape}")
    if l.size == 0:
        raise ValueError("logits are empty")
    return l


def _check_max(l: np.ndarray) -> np.float32:
    lmax = l.max()  # propagates NaN: one pass checks NaN, +inf and "everything masked"
    if np.isnan(lmax):
        raise NonFiniteLogitsError("model produced NaN logits")
    if lmax == np.inf:
        raise NonFiniteLogitsError("model produced +Inf logits")
    if lmax == -np.inf:
        raise NonFiniteLogitsError("every logit is -Inf: no token can be sampled")
    return lmax


def _sort_desc(ids: np.ndarray, l: np.ndarray) -> np.ndarray:
    """``ids`` (ascending) reordered by logit descending, ties → lower id first."""
    return ids[np.argsort(-l[ids], kind="stable")]


def _top_m(l: np.ndarray, m: int) -> np.ndarray:
    """The ``m`` best token ids by (logit desc, id asc), in that order; -inf tokens left out.

    Instead of partitioning the whole vocab (~2.4 ms for 262k), partition a 1/16
    subsample: its m-th largest value t is reached by at least m logits of the full
    array (those m subsample entries), and typically by only ~16·m of them.
    """
    n = l.shape[0]
    if m >= n:
        order = np.argsort(-l, kind="stable")
    else:
        stride = max(1, min(16, n // (4 * m)))
        sub = l[::stride]
        t = np.partition(sub, sub.shape[0] - m)[sub.shape[0] - m]
        cand = np.flatnonzero(l >= t)  # ascending ids, len >= m
        if cand.shape[0] > 4 * m + 4096:  # adversarial layout (e.g. sorted logits): exact cut first
            lc = l[cand]
            v = np.partition(lc, lc.shape[0] - m)[lc.shape[0] - m]  # the m-th largest value
            gt = cand[lc > v]
            eq = cand[lc == v][: m - gt.shape[0]]  # boundary ties → lowest ids
            cand = np.sort(np.concatenate([gt, eq]))
        order = _sort_desc(cand, l)[:m]
    if l[order[-1]] == -np.inf:
        order = order[l[order] > -np.inf]
    return order


def _nucleus_len(w: np.ndarray, z: float, top_p: float) -> int:
    """top-p cut on weights ``w`` (best first) of total ``z``: keep through the first
    running sum >= top_p (llama.cpp ``cum_sum >= p``), or everything if none reaches it."""
    cum = np.cumsum(w) / z
    return min(int(np.searchsorted(cum, top_p, side="left")) + 1, w.shape[0])


def _logsumexp64(l: np.ndarray, lmax) -> float:
    return float(lmax) + math.log(float(np.exp(l.astype(np.float64) - float(lmax)).sum()))


# ---------------------------------------------------------------------------- sampler

class Sampler:
    """Stateful sampler for one sequence: penalty history + seeded RNG.

    Typical use::

        s = Sampler(params, n_vocab)
        for t in prompt_ids: s.accept(t)      # prompt feeds the repeat penalty (llama.cpp does)
        tok = s.sample(logits); s.accept(tok) # sample() does not accept by itself
    """

    def __init__(self, params: SamplingParams, n_vocab: int):
        params.validate()
        n_vocab = operator.index(n_vocab)
        if n_vocab < 1:
            raise ValueError(f"n_vocab must be >= 1, got {n_vocab}")
        self.params = params
        self.n_vocab = n_vocab
        self._penalties_on = params.repeat_last_n > 0 and not (
            params.repeat_penalty == 1.0 and params.frequency_penalty == 0.0 and params.presence_penalty == 0.0)
        self._history: deque[int] = deque()        # last repeat_last_n accepted tokens
        self._counts: dict[int, int] = {}          # token id → occurrences in _history
        self.seed: int = 0                         # the seed in use (printable, like llama.cpp's)
        self._rng: np.random.Generator
        self.reset()

    # -- state

    def reset(self) -> None:
        """Forget the token history and reseed: the same seed again, or a new random one (as llama.cpp)."""
        self._history.clear()
        self._counts.clear()
        seed = self.params.seed
        if seed is None or seed == -1:
            seed = int(np.random.SeedSequence().generate_state(1, np.uint32)[0])
        self.seed = int(seed)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self.n_draws = 0                           # ops.sample draws so far: the Philox counter

    def accept(self, token_id: int) -> None:
        """Push an accepted token (prompt or generated) into the penalty window."""
        t = operator.index(token_id)
        if not 0 <= t < self.n_vocab:
            raise ValueError(f"token id {t} outside vocab [0, {self.n_vocab})")
        last_n = self.params.repeat_last_n
        if last_n == 0:
            return
        self._counts[t] = self._counts.get(t, 0) + 1
        self._history.append(t)
        if len(self._history) > last_n:
            old = self._history.popleft()
            c = self._counts[old] - 1
            if c:
                self._counts[old] = c
            else:
                del self._counts[old]

    # -- sampling with ops.sample (the device path)

    @property
    def history_width(self) -> int:
        """Width of ops.sample's history input: ``repeat_last_n`` with penalties on, else 0 (none)."""
        return self.params.repeat_last_n if self._penalties_on else 0

    def op_inputs(self) -> dict[str, np.ndarray]:
        """One row of ops.sample's inputs for the next draw, and count the draw.

        ``{"sample_params": (1, 8) f32, "sample_state": (1, 8) i32}`` plus, with penalties on,
        ``"sample_history": (1, repeat_last_n) i32`` (the accepted tokens, -1 padded)."""
        from ggml_py.sample_ref import pack_row

        p = self.params
        prm, st = pack_row(p.temperature, p.top_k, p.top_p, p.min_p, p.repeat_penalty, p.frequency_penalty,
                           p.presence_penalty, seed=self.seed, counter=self.n_draws)
        self.n_draws += 1
        out = {"sample_params": prm[None], "sample_state": st[None]}
        w = self.history_width
        if w:
            h = np.full((1, w), -1, np.int32)
            h[0, :len(self._history)] = list(self._history)
            out["sample_history"] = h
        return out

    def sample_op(self, logits) -> int:
        """Draw the next token on the host exactly as ops.sample would (its Philox stream and
        rejection sampling, ``ggml_py.sample_ref``); raises as :meth:`sample` does."""
        from ggml_py.sample_ref import sample_rows

        l = _as_logits(logits, self.n_vocab)
        inp = self.op_inputs()
        ids = sample_rows(l[None], inp["sample_params"], inp["sample_state"], inp.get("sample_history"))
        check_sampled(ids)
        return int(ids[0])

    # -- the chain

    def penalized_logits(self, logits) -> np.ndarray:
        """float32 [n_vocab] logits after the repeat/frequency/presence penalties (a copy when changed)."""
        l = _as_logits(logits, self.n_vocab)
        _check_max(l)
        return self._penalize(l)

    def _penalize(self, l: np.ndarray) -> np.ndarray:
        if not self._penalties_on or not self._counts:
            return l
        p = self.params
        ids = np.fromiter(self._counts.keys(), dtype=np.int64, count=len(self._counts))
        cnt = np.fromiter(self._counts.values(), dtype=np.float32, count=len(self._counts))
        v = l[ids]                                   # float32, like llama.cpp
        rp = np.float32(p.repeat_penalty)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked just below
            v = np.where(v <= 0, v * rp, v / rp)
            v = v - (cnt * np.float32(p.frequency_penalty) + np.float32(p.presence_penalty))
        if np.isnan(v).any() or (v == np.inf).any():
            raise SamplingError("repeat/frequency/presence penalties overflowed the logits; use smaller penalties")
        l = l.copy()
        l[ids] = v
        return l

    def distribution(self, logits) -> tuple[np.ndarray, np.ndarray]:
        """The sparse distribution the next draw uses: (ids int64 ascending, probs float64 summing to 1)."""
        l = _as_logits(logits, self.n_vocab)
        _check_max(l)
        l = self._penalize(l)
        lmax = _check_max(l)
        p = self.params
        if p.temperature <= 0:
            return np.array([int(np.argmax(l))], dtype=np.int64), np.ones(1)

        n = self.n_vocab
        # Every filter keeps a prefix of one order (logit desc, id asc), so the chain is a
        # series of truncations of `prefix`; None means "every finite token, not yet sorted".
        prefix = None
        if 0 < p.top_k < n:
            prefix = _top_m(l, p.top_k)
        thr = None
        if p.min_p > 0.0:
            thr = np.float32(lmax) + np.float32(math.log(p.min_p))  # float32, as llama.cpp

        if p.top_p < 1.0:
            # softmax over the top-k survivors at T = 1 (llama.cpp: top-p runs before temp)
            if prefix is not None:
                w = np.exp(l[prefix] - lmax).astype(np.float64)
                z = w.sum()
                prefix = prefix[: _nucleus_len(w, z, p.top_p)]
            else:
                z = np.add.reduce(np.exp(l - lmax), dtype=np.float64)
                if thr is not None:
                    # min-p's set is a prefix too, and the shorter prefix wins: walk it only
                    prefix = _sort_desc(np.flatnonzero(l >= thr), l)
                    prefix = prefix[: _nucleus_len(np.exp(l[prefix] - lmax).astype(np.float64), z, p.top_p)]
                else:
                    m = 256
                    while True:  # adaptive, as llama.cpp: the nucleus is usually small
                        cand = _top_m(l, m)
                        j = _nucleus_len(np.exp(l[cand] - lmax).astype(np.float64), z, p.top_p)
                        if j < cand.shape[0] or cand.shape[0] < m or m >= n:
                            prefix = cand[:j]
                            break
                        m *= 16

        if thr is not None:
            if prefix is not None:
                prefix = prefix[: int(np.count_nonzero(l[prefix] >= thr))]  # sorted → a leading block
            else:
                prefix = np.flatnonzero(l >= thr)
        # (every filter keeps the maximum, so the set is never empty)

        ids = np.flatnonzero(l > -np.inf) if prefix is None else np.sort(prefix)
        with np.errstate(over="ignore"):  # tiny T: (l - max) / T → -inf → weight 0
            w = np.exp((l[ids].astype(np.float64) - float(lmax)) / p.temperature)  # max → exp(0) = 1
        return ids, w / w.sum()

    def allowed_probs(self, logits) -> np.ndarray:
        """float64 [n_vocab]: the exact truncated, renormalised distribution :meth:`sample` draws from."""
        ids, probs = self.distribution(logits)
        out = np.zeros(self.n_vocab, dtype=np.float64)
        out[ids] = probs
        return out

    def sample(self, logits) -> int:
        """Draw the next token id from raw float32 logits [n_vocab] (does not :meth:`accept` it)."""
        ids, probs = self.distribution(logits)
        if self.params.temperature <= 0:
            return int(ids[0])
        u = self._rng.random()  # exactly one uniform per token
        if ids.shape[0] == 1:
            return int(ids[0])
        cdf = np.cumsum(probs)
        # side="right": the first cdf entry strictly above the target, so a zero-probability
        # token (flat cdf step) can never be hit
        i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
        if i >= ids.shape[0]:  # u * total rounded up to the total
            i = int(np.flatnonzero(probs)[-1])
        return int(ids[i])


def check_sampled(ids: np.ndarray) -> None:
    """Raise the sampler's errors for ops.sample's error codes (-1 non-finite logits, -2 penalties
    that overflowed)."""
    if ids.size and int(ids.min()) < 0:
        if (ids == -2).any():
            raise SamplingError("repeat/frequency/presence penalties overflowed the logits; use smaller penalties")
        raise NonFiniteLogitsError("model produced NaN or infinite logits (or masked every token)")


# ---------------------------------------------------------------------------- logprobs

def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax of raw logits (before penalties/temperature): ``--json`` logprobs.

    Masked (-inf) logits give -inf; NaN / +Inf / all -inf raise :class:`NonFiniteLogitsError`.
    """
    l = _as_logits(logits)
    lmax = _check_max(l)
    return l.astype(np.float64) - _logsumexp64(l, lmax)


def top_logprobs(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely tokens as (id, logprob), best first, ties → lower id first.

    Logprobs are :func:`log_softmax` values.  Masked (-inf) tokens are never listed
    (``-Infinity`` is not valid JSON), so fewer than ``k`` come back when fewer are finite.
    """
    k = _int("--top-logprobs", k)
    if k < 0:
        raise SamplingError(f"--top-logprobs must be >= 0, got {k}")
    l = _as_logits(logits)
    lmax = _check_max(l)
    if k == 0:
        return []
    ids = _top_m(l, min(k, l.shape[0]))
    lse = _logsumexp64(l, lmax)
    return [(int(i), float(np.float64(l[i]) - lse)) for i in ids]
