"""The backend interface: small on purpose (after ggml-backend.h).

A backend holds weights and KV pages in its own memory, says which nodes it
supports, plans a graph once (buffers, kernels; the CuPy backend also captures a
CUDA graph) and runs the plan many times. Inputs and outputs cross as NumPy
arrays; everything else stays inside the backend.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from engine.errors import ModelError

from .graph import Graph, Tensor


@dataclass(frozen=True)
class WeightSource:
    """A weight as stored in the GGUF file: raw bytes of ggml type ``ggml_type`` (an id),
    ``shape`` in NumPy order. ``data`` is usually a zero-copy view of the mmap."""
    name: str
    ggml_type: int
    shape: tuple[int, ...]
    data: np.ndarray


class Plan:
    """What ``Backend.plan`` returns: opaque to callers; ``graph`` is the graph it runs."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph


class Backend(ABC):
    name: str = "?"

    @abstractmethod
    def load_weights(self, weights: Mapping[str, WeightSource]) -> None:
        """Take the model's weights (converting/repacking them as the backend likes)."""

    @abstractmethod
    def alloc_kv(self, spec: Any) -> Any:
        """Storage for a paged KV cache of ``kvcache.KVCacheSpec`` ``spec``."""

    @abstractmethod
    def supports(self, node: Tensor) -> bool:
        """Whether this backend can compute ``node``."""

    @abstractmethod
    def plan(self, graph: Graph) -> Plan:
        """Check support for every live node and prepare to run ``graph`` many times."""

    @abstractmethod
    def run(self, plan: Plan, inputs: Mapping[str, np.ndarray], kv: Any = None) -> dict[str, np.ndarray]:
        """Run a planned graph: feed every input, use ``kv`` storage, return the outputs (host arrays)."""

    def weight_nbytes(self) -> int:
        """Bytes the backend holds for weights (for `bench` and memory messages)."""
        return 0


class MissingWeightError(ModelError, KeyError):
    """A graph names a weight the backend was not given."""

    def __str__(self) -> str:            # KeyError would print the message quoted
        return str(self.args[0])


def bind_leaves(graph: Graph, live: list[Tensor], weights: Mapping[str, tuple[tuple[int, ...], Any]],
                backend_name: str) -> tuple[dict[int, Any], dict[int, tuple[int, int, int]]]:
    """The weight and KV leaves the live nodes (and outputs) use, checked against the backend.

    weights: name -> (shape the backend holds, the backend's value).
    Returns ({leaf index: value} for weights, {layer: (Hkv, dk, dv)} for KV layers).
    """
    vals: dict[int, Any] = {}
    kv_layers: dict[int, tuple[int, int, int]] = {}
    used = {s.index: s for t in live for s in t.src} | {t.index: t for t in graph.outputs.values()}
    for t in used.values():
        if t.op == "weight":
            held = weights.get(t.name)
            if held is None:
                raise MissingWeightError(f"graph {graph.name!r} uses weight {t.name!r}, "
                                         f"which the {backend_name} backend was not given")
            shape, value = held
            if tuple(shape) != t.shape:
                raise ValueError(f"weight {t.name!r} is {tuple(shape)} in the backend, {t.shape} in the graph")
            vals[t.index] = value
        elif t.op == "kv":
            kv_layers[t.params["layer"]] = (t.shape[0], t.shape[1], t.params["head_dim_v"])
    return vals, kv_layers


def liveness(graph: Graph, live: list[Tensor]) -> tuple[dict[int, int], dict[int, int]]:
    """(root, last) for a plan's buffer reuse: ``root[t.index]`` is the tensor whose storage ``t``
    uses (a reshape shares its source's), ``last[root]`` the position in ``live`` of that storage's
    last reader (``len(live)`` for the graph's outputs: they outlive the run)."""
    root: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, t in enumerate(live):
        root[t.index] = root.get(t.src[0].index, t.src[0].index) if t.op == "reshape" else t.index
        for s in t.src:
            last[root.get(s.index, s.index)] = i
    for t in graph.outputs.values():
        last[root.get(t.index, t.index)] = len(live)
    return root, last


def stage_inputs(graph_name: str, slots: list[tuple[str, tuple[int, ...], str, np.ndarray]],
                 inputs: Mapping[str, np.ndarray]) -> None:
    """Copy every declared input into its host buffer, checking names, shapes and dtypes.

    slots: (name, shape, dtype, host buffer) per graph input, as a plan records them.
    """
    for name, shape, dtype, buf in slots:
        try:
            a = inputs[name]
        except KeyError:
            raise ValueError(f"graph {graph_name!r}: missing input {name!r} {shape} {dtype}") from None
        a = np.asarray(a)
        if a.shape != shape:
            raise ValueError(f"input {name!r}: expected shape {shape}, got {a.shape}")
        try:
            np.copyto(buf, a.astype(np.float16) if dtype == "f16" else a, casting="same_kind")
        except TypeError:
            raise ValueError(f"input {name!r}: cannot use {a.dtype} data for a {dtype} input") from None
    if len(inputs) > len(slots):
        extra = sorted(set(inputs) - {s[0] for s in slots})
        raise ValueError(f"graph {graph_name!r} has no input(s) {extra}")


def get_backend(name: str, **kwargs: Any) -> Backend:
    """Backends found by name: ``numpy`` (the reference), ``cupy`` (CUDA GPU through CuPy).

    ``cupy`` without CuPy or a GPU raises a one-line GGFlatError saying why."""
    from engine.errors import GGFlatError
    if name == "numpy":
        from .backend_numpy import NumpyBackend
        return NumpyBackend(**kwargs)
    if name == "cupy":
        from .backend_cupy import CupyBackend     # imports CuPy only when constructed
        return CupyBackend(**kwargs)
    raise GGFlatError(f"unknown backend {name!r} (available: cupy, numpy)")
