"""A loaded model: config, tokenizer, weights on a backend, and planned graphs.

``Model.forward`` runs one step of one sequence: it claims KV slots for the new
tokens, feeds the step inputs and returns the logits of the rows asked for.
Graphs are built and planned once per (n_tokens, n_out, max_pages) and reused,
so the per-token Python work is a dictionary lookup and ``backend.run``.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence as Seq

import numpy as np

from engine.arch import get_arch
from engine.arch.common import WeightTable
from engine.config import ModelConfig
from engine.errors import ContextError, GGFlatError, ModelError
from ggml_py import Backend, Plan, WeightSource, get_backend, ops
from kvcache import KVCacheSpec, PagedKVCache, Sequence

DEFAULT_CTX = 4096
DEFAULT_BATCH = 512


class Model:
    def __init__(self, gf, backend: Backend) -> None:
        from engine.tokenizer import Tokenizer

        self.gf = gf
        self.backend = backend
        self.arch = get_arch(gf.architecture or "(none)")   # an unknown architecture is the first thing to say
        self.tokenizer = Tokenizer.from_gguf(gf)
        self.config = ModelConfig.from_metadata(gf.metadata, n_vocab=self.tokenizer.n_vocab)
        self.weight_table = WeightTable({name: (ti.shape, ti.type_name) for name, ti in gf.tensors.items()})
        self._plans: dict[tuple, Plan] = {}
        self._can_sample: dict[int, bool] = {}

        # The weights a graph uses are exactly what the backend must hold: build a
        # one-token graph to learn them (building is cheap and checks every shape).
        probe = self.arch.build_graph(self.config, self.weight_table, 1, 1, 1)
        used = {}
        for name in probe.weights:
            ti = gf.tensors[name]
            used[name] = WeightSource(name, ti.ggml_type, ti.shape, gf.tensor_bytes(name))
        self.backend.load_weights(used)
        self.n_params = sum(int(np.prod(w.shape)) for w in used.values())
        self.weight_file_bytes = sum(w.data.nbytes for w in used.values())

    # -- loading ------------------------------------------------------------------
    @classmethod
    def load(cls, path: str, backend: str | Backend = "numpy") -> "Model":
        from engine.gguf_file import GGUFFile

        gf = GGUFFile(path)
        be = get_backend(backend) if isinstance(backend, str) else backend
        return cls(gf, be)

    @property
    def n_vocab(self) -> int:
        return self.config.n_vocab

    # -- KV cache -------------------------------------------------------------------
    def new_cache(self, n_ctx: int | None = None, kv_dtype: str = "f16", page_size: int = 16) -> PagedKVCache:
        """A KV cache for ``n_ctx`` tokens (default: min(4096, training context))."""
        cfg = self.config
        if n_ctx is None or n_ctx <= 0:
            n_ctx = min(DEFAULT_CTX, cfg.n_ctx_train)
        if n_ctx > cfg.n_ctx_train:
            print(f"ggflat: warning: context {n_ctx} is larger than the model's training context "
                  f"{cfg.n_ctx_train}; quality may degrade", file=sys.stderr)
        spec = KVCacheSpec.for_context(n_ctx, n_layers=cfg.n_layers, n_kv_heads=cfg.n_head_kv,
                                       head_dim_k=cfg.head_dim_k, head_dim_v=cfg.head_dim_v,
                                       page_size=page_size, dtype=kv_dtype)
        avail = _available_memory()
        if avail is not None and spec.nbytes > avail:
            raise ContextError(f"a KV cache for {n_ctx} tokens needs {spec.nbytes:,} bytes, "
                               f"only {avail:,} are available; use a smaller -c")
        return PagedKVCache(spec, self.backend.alloc_kv(spec), n_ctx)

    # -- running ----------------------------------------------------------------------
    def _plan(self, n_tokens: int, n_out: int, max_pages: int, greedy: bool = False,
              sample_w: int | None = None) -> Plan:
        key = ((n_tokens, n_out, max_pages) + (("argmax",) if greedy else ())
               + (("sample", sample_w) if sample_w is not None else ()))
        plan = self._plans.get(key)
        if plan is None:
            graph = self.arch.build_graph(self.config, self.weight_table, n_tokens, n_out, max_pages)
            if greedy:      # the argmax runs on the device: 4 bytes a row come back, not the logits
                graph.output("argmax", ops.argmax(graph.outputs.pop("logits")))
            elif sample_w is not None:   # so does the sampler: its settings, seed, counter and history are inputs
                logits = graph.outputs.pop("logits")
                n = logits.shape[0]
                hist = graph.input("sample_history", (n, sample_w), "i32") if sample_w else None
                graph.output("sample", ops.sample(logits, graph.input("sample_params", (n, 8), "f32"),
                                                  graph.input("sample_state", (n, 8), "i32"), hist))
            plan = self._plans[key] = self.backend.plan(graph)
        return plan

    def can_sample_on_device(self, history_width: int = 0) -> bool:
        """Whether the backend runs ops.sample for this vocabulary and penalty window (the CuPy
        kernels hold a row in shared memory and a window of at most 1024 tokens)."""
        ok = self._can_sample.get(history_width)
        if ok is None:
            from ggml_py import Graph
            g = Graph("sample-probe")
            hist = g.input("h", (1, history_width), "i32") if history_width else None
            t = ops.sample(g.input("logits", (1, self.n_vocab)), g.input("p", (1, 8)), g.input("s", (1, 8), "i32"), hist)
            ok = self._can_sample[history_width] = bool(self.backend.supports(t))
        return ok

    def forward(self, cache: PagedKVCache, seq: Sequence, tokens: Seq[int] | np.ndarray,
                out_rows: Seq[int] | np.ndarray | None = None, greedy: bool = False,
                sample: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Append ``tokens`` to ``seq`` and return logits (len(out_rows), n_vocab) f32, or with
        ``greedy`` the argmax token ids (len(out_rows),) int32 (ties: the lowest id), or with
        ``sample`` the ids drawn on the device by ops.sample.

        out_rows: which of the new tokens' logits to return (default: the last one).
        sample: ops.sample's inputs for the out rows, ``{"sample_params": (r, 8) f32,
        "sample_state": (r, 8) i32[, "sample_history": (r, W) i32]}`` (``Sampler.op_inputs``).
        greedy / sample: raise NonFiniteLogitsError when a row's logits are not finite (NaN, +inf,
        all -inf), as the sampler would (SamplingError when the penalties overflow).
        """
        tokens = np.asarray(tokens, dtype=np.int32)
        n = int(tokens.shape[0])
        if n == 0:
            raise ValueError("forward needs at least one token")
        if tokens.min() < 0 or tokens.max() >= self.n_vocab:
            bad = int(tokens[(tokens < 0) | (tokens >= self.n_vocab)][0])
            raise GGFlatError(f"token id {bad} is outside the vocabulary [0, {self.n_vocab})")
        out_ids = np.asarray([n - 1] if out_rows is None else out_rows, dtype=np.int32)
        start = seq.length
        slots = seq.reserve(n)
        pos = np.arange(start, start + n, dtype=np.int32)
        inputs = {
            "tokens": tokens, "pos": pos, "slots": slots,
            "block_table": seq.block_table(), "kv_len": np.array([seq.length], dtype=np.int32),
            "out_ids": out_ids,
        }
        sample_w = None
        if sample is not None and not greedy:
            inputs.update(sample)
            h = sample.get("sample_history")
            sample_w = int(h.shape[1]) if h is not None else 0
        try:
            out = self.backend.run(self._plan(n, len(out_ids), seq.max_pages, greedy, sample_w), inputs, cache.storage)
        except BaseException:
            seq.truncate(start)   # keep the sequence consistent with what the cache holds
            raise
        if greedy:
            ids = out["argmax"]
            if (ids < 0).any():       # ops.argmax: -1 where the row's maximum is not finite
                from engine.sampling import NonFiniteLogitsError
                raise NonFiniteLogitsError("model produced NaN or infinite logits")
            return ids
        if sample_w is not None:
            from engine.sampling import check_sampled
            ids = out["sample"]
            check_sampled(ids)        # ops.sample: -1 non-finite logits, -2 penalties overflowed
            return ids
        return out["logits"]

    def prefill(self, cache: PagedKVCache, seq: Sequence, tokens: Seq[int], n_batch: int = DEFAULT_BATCH,
                all_logits: bool = False) -> np.ndarray:
        """Feed a prompt in batches of ``n_batch``; logits of the last token (or of every token)."""
        tokens = np.asarray(tokens, dtype=np.int32)
        outs = []
        for i in range(0, len(tokens), n_batch):
            chunk = tokens[i:i + n_batch]
            rows = np.arange(len(chunk)) if all_logits else None
            last = self.forward(cache, seq, chunk, rows)
            if all_logits or i + n_batch >= len(tokens):
                outs.append(last)
        return np.concatenate(outs) if all_logits else outs[-1]


def check_fits(n_prompt: int, n_ctx: int) -> None:
    if n_prompt > n_ctx:
        raise ContextError(f"prompt is {n_prompt} tokens, longer than the context of {n_ctx} tokens "
                           f"(use a larger -c or a shorter prompt)")


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def model_summary(model: Model) -> str:
    c = model.config
    return (f"{c.arch} {c.name or ''}: {c.n_layers} layers, d={c.n_embd}, heads {c.n_head}/{c.n_head_kv}, "
            f"vocab {c.n_vocab}, {model.n_params / 1e6:.1f}M params")


__all__ = ["Model", "check_fits", "DEFAULT_CTX", "DEFAULT_BATCH", "ModelError"]
