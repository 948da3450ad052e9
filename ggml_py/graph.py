"""Tensors and graphs: what a model *is*, before any backend computes it.

Shape rule, stated once for the whole package: shapes are in **NumPy order**
(outermost first, the contiguous dimension last). ggml's ``ne`` is the same
list reversed, so a GGUF weight with ``ne = (n_embd, n_ff)`` is a ``(n_ff,
n_embd)`` array here and ``x @ W.T`` multiplies it.

A ``Graph`` is built once per shape by pure constructor functions
(``ggml_py.ops``): they check shapes, record a node and return its tensor;
nothing is computed. A backend then plans buffers for the graph once and runs it
many times with new inputs (the CuPy backend captures it as a CUDA graph). So a
graph must be *static*: every shape is fixed when it is built, and whatever
changes from one run to the next (token ids, positions, the KV length, the page
table) is an ``input`` tensor, never a Python value baked into a node.

Leaves:
- ``input``: fed on every run (``i32`` token ids, positions, ...).
- ``weight``: a model tensor the backend holds; ``dtype`` is the ggml type name
  of the stored data (``"Q4_1"``, ``"F32"``...), the backend chooses how to keep it.
- ``kv``: one layer's pages of a paged KV cache (see ``kvcache``), read by
  ``attention`` and written by ``kv_store``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# dtypes of activations and inputs
ACT_DTYPES = ("f32", "f16", "i32")


@dataclass(eq=False, repr=False)
class Tensor:
    graph: "Graph"
    op: str                      # "input" | "weight" | "kv" | an op name from ggml_py.ops
    shape: tuple[int, ...]       # NumPy order
    dtype: str                   # "f32" | "f16" | "i32" for activations; ggml type name for weights
    src: tuple["Tensor", ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    index: int = -1              # position in graph.nodes (topological order)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_leaf(self) -> bool:
        return self.op in ("input", "weight", "kv")

    def __repr__(self) -> str:
        nm = f" {self.name!r}" if self.name else ""
        return f"Tensor({self.op}{nm}, {self.shape}, {self.dtype})"


class Graph:
    """A static computation: leaves, op nodes in topological order, named outputs."""

    def __init__(self, name: str = "graph") -> None:
        self.name = name
        self.nodes: list[Tensor] = []          # every tensor, leaves included, in creation order
        self.inputs: dict[str, Tensor] = {}
        self.weights: dict[str, Tensor] = {}
        self.kv: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}

    # -- leaves -------------------------------------------------------------
    def input(self, name: str, shape: tuple[int, ...], dtype: str = "f32") -> Tensor:
        if name in self.inputs:
            raise ValueError(f"duplicate input {name!r}")
        if dtype not in ACT_DTYPES:
            raise ValueError(f"input dtype must be one of {ACT_DTYPES}, got {dtype!r}")
        t = self._add(Tensor(self, "input", _shape(shape), dtype, name=name))
        self.inputs[name] = t
        return t

    def weight(self, name: str, shape: tuple[int, ...], ggml_type: str) -> Tensor:
        """A model weight; the same name twice returns the same leaf (tied embeddings)."""
        t = self.weights.get(name)
        if t is not None:
            if t.shape != _shape(shape):
                raise ValueError(f"weight {name!r} used with shapes {t.shape} and {shape}")
            return t
        t = self._add(Tensor(self, "weight", _shape(shape), ggml_type, name=name))
        self.weights[name] = t
        return t

    def kv_layer(self, layer: int, n_kv_heads: int, head_dim_k: int, head_dim_v: int) -> Tensor:
        """Layer ``layer`` of the paged KV cache the graph runs against.

        Its shape is the per-token geometry ``(n_kv_heads, head_dim_k)``; the
        pages themselves (count, size, storage type) belong to the backend's
        cache, so one graph serves any cache length.
        """
        name = f"kv.{layer}"
        t = self.kv.get(name)
        if t is None:
            t = self._add(Tensor(self, "kv", (n_kv_heads, head_dim_k), "kv", name=name,
                                 params={"layer": layer, "head_dim_v": head_dim_v}))
            self.kv[name] = t
        return t

    def output(self, name: str, t: Tensor) -> Tensor:
        if t.graph is not self:
            raise ValueError("output tensor belongs to another graph")
        self.outputs[name] = t
        return t

    # -- internals ------------------------------------------------------------
    def _add(self, t: Tensor) -> Tensor:
        t.index = len(self.nodes)
        self.nodes.append(t)
        return t

    def op_nodes(self) -> list[Tensor]:
        return [t for t in self.nodes if not t.is_leaf]

    def live_nodes(self) -> list[Tensor]:
        """Op nodes that an output or a side effect (``kv_store``) depends on, in order."""
        roots = list(self.outputs.values()) + [t for t in self.nodes if t.op == "kv_store"]
        seen: set[int] = set()
        stack = list(roots)
        while stack:
            t = stack.pop()
            if t.index in seen:
                continue
            seen.add(t.index)
            stack.extend(t.src)
        return [t for t in self.nodes if t.index in seen and not t.is_leaf]

    def __repr__(self) -> str:
        return (f"Graph({self.name!r}: {len(self.op_nodes())} ops, inputs={list(self.inputs)}, "
                f"outputs={list(self.outputs)})")


def _shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    s = tuple(int(d) for d in shape)
    if any(d < 0 for d in s):
        raise ValueError(f"negative dimension in {s}")
    return s
