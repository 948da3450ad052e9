"""Pieces every architecture's graph shares: the weight table and the step inputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from engine.errors import ModelError
from ggml_py import Graph, Tensor, ops


class WeightTable:
    """GGUF tensor name -> (shape in NumPy order, ggml type name), with clear errors for missing ones."""

    def __init__(self, entries: Mapping[str, tuple[tuple[int, ...], str]]) -> None:
        self.entries = dict(entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, g: Graph, name: str, shape: tuple[int, ...] | None = None) -> Tensor:
        """The weight leaf ``name``; ``shape``, when given, is what the architecture expects."""
        try:
            got, type_name = self.entries[name]
        except KeyError:
            raise ModelError(f"model file has no tensor {name!r}") from None
        if shape is not None and tuple(got) != tuple(shape):
            raise ModelError(f"tensor {name!r} has shape {tuple(got)}, expected {tuple(shape)}")
        return g.weight(name, got, type_name)

    def optional(self, g: Graph, name: str, shape: tuple[int, ...] | None = None) -> Tensor | None:
        return self.get(g, name, shape) if name in self.entries else None


@dataclass
class StepInputs:
    """The per-run inputs of a forward step (all i32).

    tokens (n,)        token ids
    pos (n,)           their positions
    slots (n,)         physical KV slots they are written to
    block_table (P,)   the sequence's pages
    kv_len (1,)        logical KV length after this step's writes
    out_ids (n_out,)   rows (0..n-1) whose logits are wanted
    """
    tokens: Tensor
    pos: Tensor
    slots: Tensor
    block_table: Tensor
    kv_len: Tensor
    out_ids: Tensor


def step_inputs(g: Graph, n_tokens: int, n_out: int, max_pages: int) -> StepInputs:
    if not 1 <= n_out <= n_tokens:
        raise ValueError(f"n_out {n_out} must be in [1, {n_tokens}]")
    return StepInputs(
        tokens=g.input("tokens", (n_tokens,), "i32"),
        pos=g.input("pos", (n_tokens,), "i32"),
        slots=g.input("slots", (n_tokens,), "i32"),
        block_table=g.input("block_table", (max_pages,), "i32"),
        kv_len=g.input("kv_len", (1,), "i32"),
        out_ids=g.input("out_ids", (n_out,), "i32"),
    )


def with_bias(t: Tensor, bias: Tensor | None) -> Tensor:
    return t if bias is None else ops.add(t, bias)
