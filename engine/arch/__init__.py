"""Forward graphs, one module per architecture (``llama``, ``gemma3``).

Each module has ``build_graph(cfg, weights, n_tokens, n_out, max_pages) -> Graph``:
the graph of one forward step over ``n_tokens`` new tokens of one sequence,
producing logits for ``n_out`` of them (rows chosen by the ``out_ids`` input).
"""
from __future__ import annotations

from types import ModuleType

from engine.errors import ModelError


def get_arch(name: str) -> ModuleType:
    if name == "llama":
        from . import llama
        return llama
    if name == "gemma3":
        from . import gemma3
        return gemma3
    raise ModelError(f"unsupported model architecture {name!r} (supported: llama, gemma3)")
