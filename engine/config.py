"""ModelConfig: the hyper-parameters of a model, read once from GGUF metadata.

Every value an architecture's graph needs is here, checked against the others
(DESIGN.md §4: metadata the model reads is range-checked), so graph builders can
trust it. Keys follow llama.cpp's ``<arch>.<name>`` convention; defaults follow
llama.cpp's loader (``llama_model_loader`` / ``load_hparams``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from engine.errors import ModelError

SUPPORTED_ARCHS = ("llama", "gemma3")

# Sanity bounds: far above any real model, low enough that a hostile file cannot
# make us plan absurd buffers from its metadata.
_MAX_LAYERS = 1024
_MAX_DIM = 1 << 20
_MAX_HEADS = 4096


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    n_ctx_train: int
    rms_eps: float
    rope_base: float
    rope_freq_scale: float            # 1 / linear scaling factor
    n_rot: int
    rope_mode: str                    # "normal" (llama) | "neox" (gemma3)
    attn_scale: float                 # applied to q.k
    embed_scale: float = 1.0          # token embeddings are multiplied by this (gemma: sqrt(n_embd))
    sliding_window: int = 0           # 0: none
    swa_layers: tuple[bool, ...] = ()  # per layer: does it use the sliding window?
    rope_base_swa: float = 10000.0    # gemma3: local (sliding-window) layers use their own base
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv

    def layer_window(self, il: int) -> int:
        return self.sliding_window if self.swa_layers and self.swa_layers[il] else 0

    def layer_rope_base(self, il: int) -> float:
        return self.rope_base_swa if self.swa_layers and self.swa_layers[il] else self.rope_base

    def layer_rope_scale(self, il: int) -> float:
        # llama.cpp: sliding-window layers keep freq_scale 1 (rope_freq_scale_train_swa)
        return 1.0 if self.swa_layers and self.swa_layers[il] else self.rope_freq_scale

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], n_vocab: int | None = None) -> "ModelConfig":
        arch = md.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise ModelError("general.architecture is missing")
        if arch not in SUPPORTED_ARCHS:
            raise ModelError(f"unsupported model architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")

        def key(name: str, default: Any = ..., kind: type = int) -> Any:
            full = f"{arch}.{name}"
            v = md.get(full, default)
            if v is ...:
                raise ModelError(f"metadata key {full} is missing")
            if kind is int:
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                    raise ModelError(f"metadata key {full} must be an integer, got {type(v).__name__}")
                return int(v)
            if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool):
                raise ModelError(f"metadata key {full} must be a number, got {type(v).__name__}")
            v = float(v)
            if not math.isfinite(v):
                raise ModelError(f"metadata key {full} is not finite")
            return v

        n_layers = key("block_count")
        n_embd = key("embedding_length")
        n_ff = key("feed_forward_length")
        n_head = key("attention.head_count")
        n_head_kv = key("attention.head_count_kv", n_head)
        _check_range("block_count", n_layers, 1, _MAX_LAYERS)
        _check_range("embedding_length", n_embd, 1, _MAX_DIM)
        _check_range("feed_forward_length", n_ff, 1, _MAX_DIM)
        _check_range("attention.head_count", n_head, 1, _MAX_HEADS)
        _check_range("attention.head_count_kv", n_head_kv, 1, n_head)
        if n_head % n_head_kv:
            raise ModelError(f"attention.head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
        if n_embd % n_head and f"{arch}.attention.key_length" not in md:
            raise ModelError(f"embedding_length {n_embd} is not a multiple of head_count {n_head}")
        head_dim_k = key("attention.key_length", n_embd // n_head)
        head_dim_v = key("attention.value_length", n_embd // n_head)
        _check_range("attention.key_length", head_dim_k, 1, 4096)
        _check_range("attention.value_length", head_dim_v, 1, 4096)
        n_rot = key("rope.dimension_count", head_dim_k)
        if not (0 < n_rot <= head_dim_k and n_rot % 2 == 0):
            raise ModelError(f"rope.dimension_count {n_rot} must be even and at most the head size {head_dim_k}")
        n_ctx_train = key("context_length", 4096)
        _check_range("context_length", n_ctx_train, 1, 1 << 24)
        rms_eps = key("attention.layer_norm_rms_epsilon", kind=float)
        if not 0 < rms_eps < 1:
            raise ModelError(f"attention.layer_norm_rms_epsilon {rms_eps} out of range")
        rope_base = key("rope.freq_base", 10000.0, kind=float)
        factor = key("rope.scaling.factor", 0.0, kind=float)
        scaling_type = md.get(f"{arch}.rope.scaling.type", "linear")
        if scaling_type not in ("linear", "none") and factor not in (0.0, 1.0):
            raise ModelError(f"rope scaling type {scaling_type!r} is not supported")
        rope_freq_scale = 1.0 if factor == 0.0 else 1.0 / factor
        if rope_base <= 0:
            raise ModelError(f"rope.freq_base {rope_base} must be positive")
        if n_vocab is None:
            n_vocab = key("vocab_size", 0)
        _check_range("vocab size", n_vocab, 1, 1 << 24)

        common = dict(arch=arch, n_layers=n_layers, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
                      head_dim_k=head_dim_k, head_dim_v=head_dim_v, n_vocab=n_vocab, n_ctx_train=n_ctx_train,
                      rms_eps=rms_eps, rope_base=rope_base, rope_freq_scale=rope_freq_scale, n_rot=n_rot,
                      name=str(md.get("general.name", "")))
        if arch == "llama":
            return cls(rope_mode="normal", attn_scale=1.0 / math.sqrt(head_dim_k), **common)

        # gemma3 (llama.cpp: llama_model_gemma3::load_arch_hparams and its graph)
        window = key("attention.sliding_window", 0)
        _check_range("attention.sliding_window", window, 0, 1 << 24)
        swa_layers: tuple[bool, ...] = ()
        if window > 0:
            pattern = md.get(f"{arch}.attention.sliding_window_pattern", 6)
            if hasattr(pattern, "__len__"):   # per-layer booleans
                if len(pattern) != n_layers:
                    raise ModelError("attention.sliding_window_pattern has the wrong length")
                swa_layers = tuple(bool(x) for x in pattern)
            else:
                p = int(pattern)
                # every p-th layer (the last of each group) is global; p == 0: all sliding
                swa_layers = tuple(p == 0 or (il % p) < p - 1 for il in range(n_layers))
        final_softcap = key("final_logit_softcapping", 0.0, kind=float)
        if final_softcap != 0.0:
            raise ModelError(f"gemma3.final_logit_softcapping = {final_softcap} is not supported")
        return cls(rope_mode="neox",
                   # gemma_pytorch: query_pre_attn_scalar = head_dim for every size but 27B
                   attn_scale=(1.0 / math.sqrt(n_embd / n_head)) if n_layers == 62 else 1.0 / math.sqrt(head_dim_k),
                   embed_scale=math.sqrt(n_embd), sliding_window=window, swa_layers=swa_layers,
                   rope_base_swa=key("rope.freq_base_swa", 10000.0, kind=float),
                   **common)


def _check_range(what: str, v: int, lo: int, hi: int) -> None:
    if not lo <= v <= hi:
        raise ModelError(f"{what} = {v} is out of range [{lo}, {hi}]")
