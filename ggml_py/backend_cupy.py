"""The CuPy backend: every op of ``ggml_py.ops`` as RawKernel launches on one CUDA stream.

How a graph runs (ggml_py/cuda/DESIGN.md has the interfaces between the pieces):

- ``plan`` does all the work once. It walks the live nodes in order, gives every
  activation a place in one device arena (a buffer whose tensor is dead is reused,
  as ggml-alloc does; elementwise ops write in place over a dying operand; ``reshape``
  is a view), gives every input a fixed place in one device input block with a pinned
  host twin, asks the quant and attention modules for their scratch, and turns every
  node into a *step*: a zero-argument callable with the kernel and all its arguments
  bound (``elementwise_ops.prepare_*``, ``quant_ops.plan_mul_mat(...).bind``,
  ``attention_ops.plan_attention``; DESIGN.md's plain calls when a module has no
  ``plan_*``). Peephole fusions, each saving a launch: a residual ``add`` followed by
  the ``rms_norm`` of its sum (``add_rms_norm_f32``); two ropes in a row at the same
  positions (q and k); two rms_norms in a row (gemma's q/k norms).
- Decode GEMV fusions (``_mm_regions``, n <= 8 rows; ``fuse_mm`` / ``GGFLAT_CUDA_FUSE``): the
  mul_mats that share x and a weight type run as ONE grouped launch
  (``quant_ops.plan_mul_mat_group``: the weights stay separate tensors): q/k/v with the
  normal-mode ropes of q and k in the kernel's epilogue, gate/up with the swiglu/geglu
  (only the product is written). Level 2 also folds a residual ``add`` into the launch of
  the mul_mat it reads (o, down) and the ``rms_norm`` before a group into the group's
  launch; a ``kv_store`` of a q/k/v launch's k and v goes into that launch when it can write
  the cache (``_kv_folds``: Marlin decode kernels). Such a region's nodes are moved next to
  each other in the live list before buffers are placed (still a topological order), and what
  the launch reads stays allocated until its last node. SmolLM2-135M Q4_1 (synthetic) decode
  step on an H100, run() wall time: level 0 395 launches 1.21 ms, level 1 245 launches 0.93 ms, level 2 (the
  default) 186 launches 0.78 ms.
- ``run`` copies the inputs into the pinned block (NumPy), then: one async H2D copy,
  the steps, one async D2H copy per output, one synchronize. The first run of a plan
  is eager; the second captures the whole sequence (copies included) into a CUDA
  graph on the plan's stream and every later run replays it: a decode step is then
  one ``cudaGraphLaunch``, whatever the number of layers (``GGFLAT_CUDA_GRAPHS=0``
  keeps every run eager, for debugging). A plan that cannot be captured (prefill:
  CuPy refuses cuBLAS calls inside a capture) stays eager; ``GGFLAT_CUDA_GRAPHS=debug``
  says why.
- The KV cache is bound at run time: the steps that touch it are made for a storage
  object when the plan first runs with it, and a graph captured against one storage
  is re-captured when the plan runs with another (so is the attention scratch sized,
  which depends on the cache's page size).

Memory: weights stay as their GGUF blocks (``quant_ops.upload_weight``); 1-D weights
(norms, biases) are float32 arrays. The arena, the mul_mat scratch and the attention
scratch are shared by all plans of a backend (they run one after another on its one
stream) and only grow: a plan keeps a reference to the buffers it was built with, so
an old plan (and its captured graph) stays valid when a later plan needs more.

Inputs a kernel would index memory with (token ids, slots, the block table, kv_len)
are range-checked on the host before they are copied, with the NumPy backend's
messages, so a bad id is a ValueError, not a wild read on the GPU.

Not thread-safe, like the NumPy backend.
"""
from __future__ import annotations

import gc
import math
import os
import warnings
import weakref
from typing import Any, Callable, Mapping

import numpy as np

from engine.errors import ContextError, GGFlatError

from .backend import Backend, Plan, WeightSource, bind_leaves, liveness, stage_inputs
from .graph import Graph, Tensor
from .ops import ROPE_NEOX, ROPE_NORMAL

POS_EMPTY = np.iinfo(np.int32).max       # stored position of a never-written slot
_ALIGN = 256                             # byte alignment of every buffer in the arena / input block
FUSE_DEFAULT = 2                         # CupyBackend(fuse_mm=...) when neither it nor GGFLAT_CUDA_FUSE says
ATTN_PREFETCH_MB = 0                     # GGFLAT_ATTN_PF's default (off until measured on the H100; 16 to try)
_F32_OPS = ("add", "mul", "scale", "silu", "gelu", "swiglu", "geglu", "rms_norm", "soft_max", "rope")
# operands whose buffer an op's output may take over when they die at that op (elementwise
# kernels read each element before writing it; see elementwise.cu for the row kernels)
_INPLACE = {"add": (0, 1), "mul": (0, 1), "scale": (0,), "silu": (0,), "gelu": (0,), "swiglu": (0, 1),
            "geglu": (0, 1), "rms_norm": (0,), "soft_max": (0,), "rope": (0,)}

Step = Callable[[], Any]


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


# -- is there a GPU? ---------------------------------------------------------------------------------

_reason_cache: list[str | None] = []


def unavailable_reason() -> str | None:
    """None when CuPy imports and sees a CUDA device; otherwise why not, in a few words.

    Cheap when there is no GPU: CuPy is imported only when a CUDA driver reports a device.
    """
    if _reason_cache:
        return _reason_cache[0]
    reason = _probe()
    _reason_cache.append(reason)
    return reason


def _probe() -> str | None:
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install 'ggflat[cuda]')"
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no CUDA driver (libcuda.so.1 not found)"
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return "no CUDA device found"
    try:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:                      # ImportError, CUDARuntimeError (driver too old), ...
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return None if n > 0 else "no CUDA device found"


# -- the device: the few CUDA services the backend uses ------------------------------------------------
# (tests/test_backend_ops.py runs the host logic on a NumPy stand-in with the same methods)

class CudaDevice:
    def __init__(self) -> None:
        import cupy

        self.cp = cupy
        self._rt = cupy.cuda.runtime
        self._quant = None
        self._attention = None

    # memory
    def alloc(self, nbytes: int) -> Any:
        return self.cp.empty(max(int(nbytes), 1), dtype=self.cp.uint8)

    def upload(self, a: np.ndarray) -> Any:
        return self.cp.asarray(np.ascontiguousarray(a))

    def full(self, shape: tuple[int, ...], value: Any, dtype: Any) -> Any:
        return self.cp.full(shape, value, dtype=dtype)

    def pinned(self, nbytes: int) -> np.ndarray:
        n = max(int(nbytes), 1)
        mem = self.cp.cuda.alloc_pinned_memory(n)
        return np.ndarray((n,), np.uint8, buffer=mem)          # as cupyx.empty_pinned does

    def to_host(self, a: Any) -> np.ndarray:
        return self.cp.asnumpy(a)

    def free_bytes(self) -> int:
        free, _ = self._rt.memGetInfo()
        return int(free) + int(self.cp.get_default_memory_pool().free_bytes())

    # streams, copies, graphs
    def new_stream(self) -> Any:
        return self.cp.cuda.Stream(non_blocking=True)

    def h2d(self, dst: Any, src: np.ndarray, nbytes: int, stream: Any) -> Step:
        args = (int(dst.data.ptr), int(src.ctypes.data), int(nbytes), 1, stream.ptr)   # cudaMemcpyHostToDevice
        return lambda: self._rt.memcpyAsync(*args)

    def d2h(self, dst: np.ndarray, src: Any, nbytes: int, stream: Any) -> Step:
        args = (int(dst.ctypes.data), int(src.data.ptr), int(nbytes), 2, stream.ptr)   # cudaMemcpyDeviceToHost
        return lambda: self._rt.memcpyAsync(*args)

    def synchronize(self, stream: Any = None) -> None:
        if stream is None:
            self.cp.cuda.Device().synchronize()
        else:
            stream.synchronize()

    def begin_capture(self, stream: Any) -> None:
        stream.begin_capture()

    def end_capture(self, stream: Any) -> Any:
        return stream.end_capture()

    def launch_graph(self, graph: Any, stream: Any) -> None:
        graph.launch(stream)

    # the other kernel families (imported lazily: they compile at first use)
    def quant_ops(self) -> Any:
        if self._quant is None:
            from .cuda import quant_ops
            self._quant = quant_ops
        return self._quant

    def attention_ops(self) -> Any:
        if self._attention is None:
            from .cuda import attention_ops
            self._attention = attention_ops
        return self._attention


# -- KV storage ------------------------------------------------------------------------------------------

class CupyKVStorage:
    """A paged KV cache's device arrays, one set per layer (layout: ``kvcache.paged``).

    k[layer]:   (n_pages, page_size, n_kv_heads, head_dim_k)  float16 or float32
    v[layer]:   (n_pages, page_size, n_kv_heads, head_dim_v)
    pos[layer]: (n_pages, page_size) int32, POS_EMPTY (int32 max) where nothing was written
    """

    def __init__(self, spec: Any, device: Any) -> None:
        self.spec = spec
        dt = {"f16": np.float16, "f32": np.float32}[spec.dtype]
        geo = (spec.n_pages, spec.page_size, spec.n_kv_heads)
        self.k = [device.full(geo + (spec.head_dim_k,), 0, dt) for _ in range(spec.n_layers)]
        self.v = [device.full(geo + (spec.head_dim_v,), 0, dt) for _ in range(spec.n_layers)]
        self.pos = [device.full(geo[:2], POS_EMPTY, np.int32) for _ in range(spec.n_layers)]
        self._device = device

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.k + self.v + self.pos)

    def to_numpy(self) -> Any:
        """A host copy as a ``NumpyKVStorage`` (tests, debugging)."""
        from .backend_numpy import NumpyKVStorage

        st = NumpyKVStorage.__new__(NumpyKVStorage)
        st.spec = self.spec
        st.k = [self._device.to_host(a) for a in self.k]
        st.v = [self._device.to_host(a) for a in self.v]
        st.pos = [self._device.to_host(a) for a in self.pos]
        return st


def _quant_supports(qo: Any, type_name: str) -> bool:
    """Whether quant_ops handles ggml type ``type_name`` (its SUPPORTED_TYPES holds ids or names)."""
    types = getattr(qo, "SUPPORTED_TYPES", None)
    if types is None or type_name in types:
        return True
    from quant_formats import FORMATS
    ids = [tid for tid, f in FORMATS.items() if f.name == type_name]
    return bool(ids) and ids[0] in types


def _unbound_kv() -> None:
    raise RuntimeError("a KV-cache step ran before a storage was bound")


# -- the arena allocator ----------------------------------------------------------------------------------

class _ArenaLayout:
    """Offsets in one buffer for tensors with known lifetimes: best fit from a coalescing free list."""

    def __init__(self) -> None:
        self.free: list[list[int]] = []         # [offset, size], sorted by offset
        self.end = 0
        self.peak = 0

    def alloc(self, nbytes: int) -> int:
        size = _align(max(nbytes, 1))
        best = -1
        for i, (_, sz) in enumerate(self.free):
            if sz >= size and (best < 0 or sz < self.free[best][1]):
                best = i
        if best >= 0:
            off, sz = self.free[best]
            if sz == size:
                del self.free[best]
            else:
                self.free[best] = [off + size, sz - size]
            return off
        off = self.end
        self.end += size
        self.peak = max(self.peak, self.end)
        return off

    def release(self, off: int, nbytes: int) -> None:
        size = _align(max(nbytes, 1))
        i = 0
        while i < len(self.free) and self.free[i][0] < off:
            i += 1
        self.free.insert(i, [off, size])
        if i + 1 < len(self.free) and self.free[i][0] + self.free[i][1] == self.free[i + 1][0]:
            self.free[i][1] += self.free[i + 1][1]
            del self.free[i + 1]
        if i > 0 and self.free[i - 1][0] + self.free[i - 1][1] == self.free[i][0]:
            self.free[i - 1][1] += self.free[i][1]
            del self.free[i]
            i -= 1
        if self.free and self.free[-1][0] + self.free[-1][1] == self.end:   # give the top back
            self.end = self.free.pop()[0]


# -- the plan ---------------------------------------------------------------------------------------------------

class CupyPlan(Plan):
    def __init__(self, graph: Graph, backend: "CupyBackend") -> None:
        super().__init__(graph)
        self.backend = backend
        self.stream = backend.stream
        self.steps: list[Step] = []
        self.step_node: list[Tensor | None] = []
        self.inputs: list[tuple[str, tuple[int, ...], str, np.ndarray]] = []   # name, shape, dtype, pinned view
        self.outputs: list[tuple[str, np.ndarray]] = []                       # name, pinned view
        self.h2d: list[Step] = []
        self.d2h: list[Step] = []
        # host-side range checks of the inputs kernels index with, one per (input, bound): a
        # decode step checks each input once, however many layers read it
        self.checks: dict[tuple, Callable[[dict, Any], None]] = {}
        self.kv_layers: dict[int, tuple[int, int, int]] = {}  # layer -> (Hkv, dk, dv)
        # steps that touch the KV cache: (index in steps, factory(storage) -> step), bound to a
        # storage's arrays when the plan first runs with it
        self.kv_steps: list[tuple[int, Callable[[Any], Step]]] = []
        self.kv_bound: Any = None                            # weakref to the storage last bound
        self.attn_shapes: list[tuple[int, int, int]] = []    # (n, H, dv) of every attention node
        self.max_pages = 0                                   # the longest block table
        self.attn_scratch: list[Any] = [None]
        self.mm_scratch: Any = None
        self.cuda_graph: Any = None
        self.graph_error: str | None = None
        self.n_runs = 0
        self.n_fused = 0
        self.n_prefetch = 0                                  # attention nodes given o's weights to prefetch (decode uses them)
        self.fusions: dict[str, int] = {}                    # kind -> launches fused (see CupyBackend.plan)
        self.buffer_bytes = 0                                # arena bytes this plan needs
        self.keep: list[Any] = []                            # device/pinned buffers the steps use


class _Builder:
    """Plan-time state: liveness, arena offsets, then views and steps."""

    def __init__(self, plan: CupyPlan, live: list[Tensor]) -> None:
        self.plan = plan
        self.live = live
        self.root, self.last = liveness(plan.graph, live)
        self.off: dict[int, tuple[int, int]] = {}          # root tensor index -> (offset, nbytes) in the arena
        self.vals: dict[int, Any] = {}
        self.node: Tensor | None = None
        self.outs = {t.index for t in plan.graph.outputs.values()}
        self.extra_die: dict[int, list[int]] = {}          # live position -> roots kept alive until it
        self.pf_next: dict[int, Tensor] = {}               # attention node -> the weight read after it

    def r(self, t: Tensor) -> int:
        return self.root.get(t.index, t.index)

    def same(self, a: Tensor, c: Tensor) -> bool:
        """Whether a's output and c's buffer are the same arena bytes."""
        ra, rc = self.off.get(self.r(a)), self.off.get(self.r(c))
        return ra is not None and ra == rc

    def overlaps(self, a: Tensor, c: Tensor) -> bool:
        """Whether the arena bytes of a's output and c's buffer overlap (inputs, weights: never)."""
        ra, rc = self.off.get(self.r(a)), self.off.get(self.r(c))
        if ra is None or rc is None:
            return False
        return ra[0] < rc[0] + rc[1] and rc[0] < ra[0] + ra[1]

    def layout(self) -> int:
        """Phase 1: an arena offset for every op output; returns the arena size."""
        ar = _ArenaLayout()
        owned: dict[int, tuple[int, int]] = {}
        for i, t in enumerate(self.live):
            if t.op == "reshape":
                continue
            nbytes = 4 * math.prod(t.shape)
            if nbytes:
                got = None
                for k in _INPLACE.get(t.op, ()):
                    r = self.r(t.src[k])
                    if r in owned and self.last.get(r) == i and owned[r][1] == nbytes:
                        got = owned.pop(r)
                        break
                if got is None:
                    got = (ar.alloc(nbytes), nbytes)
                owned[t.index] = got
                self.off[t.index] = got
            for s in t.src:                                # operands that die here
                r = self.r(s)
                if self.last.get(r) == i and r in owned:
                    ar.release(*owned.pop(r))
            for r in self.extra_die.get(i, ()):            # kept alive for a fused region, dying here
                if self.last.get(r) == i and r in owned:
                    ar.release(*owned.pop(r))
            if t.index not in self.last and t.index in owned and t.index not in self.outs:
                ar.release(*owned.pop(t.index))            # nobody reads it
        return ar.peak


# -- grouped decode GEMVs ----------------------------------------------------------------------------------

class _Region:
    """Nodes of the live list that run as one grouped GEMV launch (quant_ops.plan_mul_mat_group).

    kind "mm_group": 2-3 mul_mats of one x (q, k, v), each optionally with the rope that alone
    reads it (through one reshape: ``ropes[g] = (reshape, rope)``), all ropes at the same
    positions with the same parameters; kind "mm_glu": gate and up of one x and the
    swiglu/geglu that alone reads them. Either may start with the rms_norm whose output only
    its members read (``norm``: the launch norms x itself). Kind "mm_add": one mul_mat and
    the add of a residual that alone reads it (``add``). ``nodes``: the region's nodes in the
    order they take in the reordered live list (``nodes[0]`` is where the launch goes)."""

    def __init__(self, kind: str, members: list[Tensor], gplan: Any, glu: Tensor | None = None,
                 ropes: dict[int, tuple[Tensor, Tensor]] | None = None, add: Tensor | None = None) -> None:
        self.kind, self.members, self.gplan, self.glu, self.add = kind, members, gplan, glu, add
        self.ropes = ropes or {}
        self.norm: Tensor | None = None
        self.pos = next(iter(self.ropes.values()))[1].src[1] if self.ropes else None
        self.resid = None
        self.kv: Tensor | None = None          # a kv_store of k and v this launch can also do (mm_group)
        self.kv_done = False                   # ... and does: the launch was emitted with it
        if add is not None:
            self.resid = add.src[1] if add.src[0] is members[0] else add.src[0]

    @property
    def x(self) -> Tensor:
        return self.norm.src[0] if self.norm is not None else self.members[0].src[1]

    @property
    def nodes(self) -> list[Tensor]:
        out = ([self.norm] if self.norm is not None else []) + list(self.members)
        out += [u for u in (self.glu, self.add) if u is not None]
        for g in sorted(self.ropes):
            out += list(self.ropes[g])
        return out

    def reads(self) -> list[Tensor]:
        return [self.x] + [t for t in (self.pos, self.resid) if t is not None]

    def outputs(self) -> list[Tensor]:
        """The tensors the launch writes: one per member (its rope's output where it has one), or
        the glu's, or the add's."""
        if self.glu is not None:
            return [self.glu]
        if self.add is not None:
            return [self.add]
        return [self.ropes[g][1] if g in self.ropes else m for g, m in enumerate(self.members)]


def _weights_after_attention(live: list[Tensor]) -> dict[int, Tensor]:
    """attention node index -> the weight of the first mul_mat that follows it in ``live``."""
    out: dict[int, Tensor] = {}
    pending: list[int] = []
    for t in live:
        if t.op == "attention":
            pending.append(t.index)
        elif t.op == "mul_mat" and pending and t.src[0].op == "weight":
            for i in pending:
                out[i] = t.src[0]
            pending = []
    return out


def _reorder(live: list[Tensor], regions: list[_Region]) -> list[Tensor]:
    """``live`` with each region's nodes moved up to its first node, in region order.

    Still a topological order: a member reads only x (the norm's output, or computed before
    the first node) and a weight; a glu reads two members; a rope reads its member's reshape
    and the positions, an add its member and a residual (both computed before the first node:
    _mm_regions checks)."""
    first = {rg.nodes[0].index: rg for rg in regions}
    moved = {t.index for rg in regions for t in rg.nodes}
    out: list[Tensor] = []
    for t in live:
        rg = first.get(t.index)
        if rg is not None:
            out += rg.nodes
        elif t.index not in moved:
            out.append(t)
    return out


class CupyBackend(Backend):
    name = "cupy"
    # op -> method emitting its steps (names, not bound methods: a dict of bound methods would make
    # every backend a reference cycle, freed only by the cyclic GC at an arbitrary moment)
    _OPS = {"get_rows": "_get_rows", "mul_mat": "_mul_mat", "add": "_binary", "mul": "_binary",
            "scale": "_scale", "silu": "_unary", "gelu": "_unary", "swiglu": "_glu", "geglu": "_glu",
            "rms_norm": "_rms_norm", "soft_max": "_soft_max", "rope": "_rope", "kv_store": "_kv_store",
            "attention": "_attention", "argmax": "_argmax", "sample": "_sample"}

    def __init__(self, cuda_graphs: bool | None = None, graph_io: bool = True, device: Any = None,
                 fuse_mm: bool | int | None = None) -> None:
        """cuda_graphs: capture and replay (default: on unless GGFLAT_CUDA_GRAPHS=0);
        graph_io: put the input/output copies inside the captured graph (else around it);
        fuse_mm: decode GEMV fusions (see _mm_regions): 0 none, 1 (True) q/k/v + ropes and gate/up +
        glu as one launch each, 2 also the residual adds and the rms_norms that feed the groups
        (default: GGFLAT_CUDA_FUSE, else FUSE_DEFAULT)."""
        if device is None:
            reason = unavailable_reason()
            if reason is not None:
                raise GGFlatError(f"the cupy backend needs CuPy and a CUDA GPU: {reason}")
            device = CudaDevice()
        self.dev = device
        env = os.environ.get("GGFLAT_CUDA_GRAPHS", "1").strip().lower()
        if cuda_graphs is None:
            cuda_graphs = env not in ("0", "false", "no", "off")
        self.cuda_graphs = bool(cuda_graphs)
        self.graph_debug = env == "debug"           # say why a plan could not be captured
        self.graph_io = bool(graph_io)
        if fuse_mm is None:
            env_f = os.environ.get("GGFLAT_CUDA_FUSE", "").strip().lower()
            fuse_mm = (0 if env_f in ("0", "false", "no", "off") else int(env_f) if env_f.isdigit()
                       else FUSE_DEFAULT)
        self.fuse_level = max(0, min(2, int(fuse_mm)))
        self.fuse_mm = self.fuse_level > 0
        self.stream = device.new_stream()
        # GGFLAT_ATTN_PF: MB of the o projection's weights that decode attention prefetches into
        # L2 (0: none; default ATTN_PREFETCH_MB)
        env_pf = os.environ.get("GGFLAT_ATTN_PF", "").strip()
        self.attn_prefetch = int(float(env_pf) * (1 << 20)) if env_pf else ATTN_PREFETCH_MB << 20
        self._w: dict[str, Any] = {}              # name -> DeviceWeight (2-D) or float32 array (1-D)
        self._src: dict[str, WeightSource] = {}   # name -> the file's bytes (for a dense copy on demand)
        self._dense: dict[str, Any] = {}          # name -> float32 device copy of a quantized weight
        self._shared: dict[str, Any] = {}         # "arena" / "mm" / "attn" -> grow-only uint8 buffers

    # -- memory ---------------------------------------------------------------------------------
    def load_weights(self, weights: Mapping[str, WeightSource]) -> None:
        """1-D weights become float32 device arrays; matrices are uploaded as their GGUF blocks."""
        from quant_formats import dequantize

        held = {}
        for name, ws in weights.items():
            if len(ws.shape) <= 1:
                raw = np.ascontiguousarray(ws.data).reshape(-1).view(np.uint8)
                try:
                    w = dequantize(raw, ws.ggml_type, tuple(int(d) for d in ws.shape))
                except GGFlatError as e:
                    raise type(e)(f"weight {name!r}: {e}") from None
                held[name] = self.dev.upload(np.asarray(w, np.float32))
            else:
                held[name] = self.dev.quant_ops().upload_weight(ws)
            self._src[name] = ws
            self._dense.pop(name, None)
        self._w.update(held)
        self.dev.synchronize()

    def weight_nbytes(self) -> int:
        return sum(int(getattr(w, "nbytes", 0)) for w in self._w.values())

    def alloc_kv(self, spec: Any) -> CupyKVStorage:
        need = int(spec.nbytes)
        try:
            free = self.dev.free_bytes()
        except Exception:
            free = None
        if free is not None and need > free:
            raise ContextError(f"a KV cache of {spec.capacity} tokens needs {need:,} bytes of GPU memory, "
                               f"only {free:,} are free; use a smaller -c")
        try:
            st = CupyKVStorage(spec, self.dev)
        except Exception as e:
            if "OutOfMemory" in type(e).__name__:
                raise ContextError(f"a KV cache of {spec.capacity} tokens needs {need:,} bytes of GPU memory: "
                                   f"out of memory; use a smaller -c") from None
            raise
        self.dev.synchronize()
        return st

    def _shared_buffer(self, key: str, nbytes: int) -> Any:
        """A grow-only device buffer shared by all plans (they run one at a time on one stream)."""
        buf = self._shared.get(key)
        if buf is None or buf.size < nbytes:
            size = max(_align(nbytes), int(1.5 * buf.size) if buf is not None else 0)
            buf = self._shared[key] = self.dev.alloc(size)
        return buf

    def _dense_weight(self, name: str) -> Any:
        """A float32 device array of a weight (1-D weights already are; others dequantized once)."""
        w = self._w[name]
        if not (isinstance(getattr(w, "dtype", None), np.dtype) and w.dtype == np.float32
                and tuple(w.shape) == tuple(self._src[name].shape)):
            d = self._dense.get(name)
            if d is None:
                from quant_formats import dequantize
                ws = self._src[name]
                raw = np.ascontiguousarray(ws.data).reshape(-1).view(np.uint8)
                d = self._dense[name] = self.dev.upload(
                    np.asarray(dequantize(raw, ws.ggml_type, tuple(ws.shape)), np.float32))
            return d
        return w

    # -- support --------------------------------------------------------------------------------------
    def supports(self, node: Tensor) -> bool:
        if node.is_leaf or node.op == "reshape":
            return True
        op = node.op
        if op == "mul_mat" or op == "get_rows" and node.src[0].op == "weight":
            try:
                qo = self.dev.quant_ops()
            except ImportError:
                return False
            w = node.src[0]
            return w.op != "weight" or _quant_supports(qo, w.dtype)
        if op in ("kv_store", "attention"):
            try:
                self.dev.attention_ops()
            except ImportError:
                return False
            return True
        if op in ("add", "mul"):
            from .cuda.elementwise_ops import broadcast_layout
            try:
                broadcast_layout(node.src[0].shape, node.src[1].shape)
            except ValueError:
                return False
            return True
        if op == "rope":
            return node.params.get("mode") in (ROPE_NORMAL, ROPE_NEOX)
        if op == "soft_max":
            return 1 <= node.ndim <= 4
        if op == "argmax":
            return node.src[0].ndim == 2
        if op == "sample":                  # a vocabulary that fits the kernels' shared memory
            from .cuda import sampling_ops
            return sampling_ops.supported(node.src[0].shape[1], node.src[3].shape[1] if len(node.src) > 3 else 0)
        if op == "get_rows":
            return True
        return op in self._OPS

    # -- planning -------------------------------------------------------------------------------------
    def plan(self, graph: Graph) -> CupyPlan:
        live = graph.live_nodes()
        for t in live:
            if not self.supports(t):
                raise ValueError(f"cupy backend does not support op {t.op!r} ({t}, graph {graph.name!r})")
        plan = CupyPlan(graph, self)
        regions = self._mm_regions(live, graph) if self.fuse_mm else []
        if regions:
            live = _reorder(live, regions)
        b = _Builder(plan, live)
        dev, stream = self.dev, self.stream

        # inputs: one device block and its pinned twin, one copy per run
        offs, total = [], 0
        for t in graph.inputs.values():
            offs.append(total)
            total += _align(4 * math.prod(t.shape))
        in_dev, in_host = dev.alloc(total), dev.pinned(total)
        plan.keep += [in_dev, in_host]
        for (name, t), off in zip(graph.inputs.items(), offs):
            n = math.prod(t.shape)
            dt = np.int32 if t.dtype == "i32" else np.float32
            host = in_host[off:off + 4 * n].view(dt).reshape(t.shape)
            host.fill(0)
            b.vals[t.index] = in_dev[off:off + 4 * n].view(dt).reshape(t.shape)
            plan.inputs.append((name, t.shape, t.dtype, host))
        if total:
            plan.h2d.append(dev.h2d(in_dev, in_host, total, stream))

        # weights and kv leaves
        held = {n: (self._src[n].shape, w) for n, w in self._w.items()}
        vals, kv_layers = bind_leaves(graph, live, held, "cupy")
        b.vals.update(vals)
        plan.kv_layers.update(kv_layers)

        # a region runs as one launch at its first node: what it reads (x, positions) must stay
        # allocated until its last node, so that nothing placed inside it shares their bytes
        at = {t.index: i for i, t in enumerate(live)}
        for rg in regions:
            end = at[rg.nodes[-1].index]
            for s in rg.reads():
                r = b.r(s)
                if b.last.get(r, -1) < end:
                    b.last[r] = end
                    b.extra_die.setdefault(end, []).append(r)
        first = {rg.nodes[0].index: rg for rg in regions}
        kv_folded = self._kv_folds(b, live, regions)
        if self.attn_prefetch:
            b.pf_next = _weights_after_attention(live)

        # activations: offsets, then views into the shared arena
        size = b.layout()
        plan.buffer_bytes = size
        arena = self._shared_buffer("arena", size) if size else dev.alloc(1)
        plan.keep.append(arena)
        for t in live:
            if t.op == "reshape":
                b.vals[t.index] = b.vals[t.src[0].index].reshape(t.shape)
            elif t.index in b.off:
                off, nbytes = b.off[t.index]
                dt = np.int32 if t.dtype == "i32" else np.float32
                b.vals[t.index] = arena[off:off + nbytes].view(dt).reshape(t.shape)
            else:                                            # zero-sized (kv_store tokens, empty tensors)
                b.vals[t.index] = None

        # mul_mat scratch: the largest any node asks for, shared by all of them
        mm = 0
        for t in live:
            if t.op == "mul_mat" and math.prod(t.shape):
                mm = max(mm, int(dev.quant_ops().mul_mat_scratch_bytes(self._mm_weight(b, t.src[0]), t.shape[0])))
        plan.mm_scratch = self._shared_buffer("mm", mm) if mm else dev.alloc(_ALIGN)
        plan.keep.append(plan.mm_scratch)

        # steps, with peephole fusions: a residual add + the rms_norm of its sum; two ropes (q, k)
        # or two rms_norms (gemma's q/k norms) in a row -> one launch each
        skip: set[int] = set()
        for i, t in enumerate(live):
            if t.index in skip or t.op == "reshape":
                continue
            b.node = t
            rg = first.get(t.index)
            if rg is not None and self._fuse_region(b, rg):
                skip.update(u.index for u in rg.nodes[1:])
                plan.n_fused += 1
                plan.fusions[rg.kind] = plan.fusions.get(rg.kind, 0) + 1
                if rg.norm is not None:
                    plan.fusions["mm_norm"] = plan.fusions.get("mm_norm", 0) + 1
                if rg.kv_done:
                    plan.fusions["mm_kv_store"] = plan.fusions.get("mm_kv_store", 0) + 1
                continue
            nxt = live[i + 1] if i + 1 < len(live) else None
            if t.op == "add" and nxt is not None and self._fuse_add_norm(b, t, nxt):
                skip.add(nxt.index)
                plan.n_fused += 1
                plan.fusions["add_rms_norm"] = plan.fusions.get("add_rms_norm", 0) + 1
                continue
            nxt = next((u for u in live[i + 1:] if u.op != "reshape"), None)
            if t.op in ("rope", "rms_norm") and nxt is not None and self._fuse_pair(b, t, nxt):
                skip.add(nxt.index)
                plan.n_fused += 1
                plan.fusions[t.op + "_pair"] = plan.fusions.get(t.op + "_pair", 0) + 1
                continue
            if t.index in kv_folded and kv_folded[t.index].kv_done:    # written by its q/k/v launch
                continue
            if math.prod(t.shape) == 0 and t.op != "kv_store":
                continue
            getattr(self, self._OPS[t.op])(b, t)

        # outputs: pinned host views, one D2H copy each
        outs = [(name, t) for name, t in graph.outputs.items()]
        total = sum(_align(4 * math.prod(t.shape)) for _, t in outs)
        out_host = dev.pinned(total)
        plan.keep.append(out_host)
        off = 0
        for name, t in outs:
            n = math.prod(t.shape)
            dt = np.int32 if t.dtype == "i32" else np.float32
            host = out_host[off:off + 4 * n].view(dt).reshape(t.shape)
            src = b.vals.get(t.index)
            if n:
                if src is None or not hasattr(src, "dtype") or np.dtype(src.dtype) != np.dtype(dt):
                    if t.op == "weight" and t.dtype in ("F32",):
                        src = self._dense_weight(t.name)
                    else:
                        raise ValueError(f"cupy backend cannot return {t} as output {name!r}")
                plan.d2h.append(dev.d2h(host, src, 4 * n, stream))
            plan.outputs.append((name, host))
            off += _align(4 * n)
        return plan

    def _emit(self, b: _Builder, *steps: Step) -> None:
        for s in steps:
            b.plan.steps.append(s)
            b.plan.step_node.append(b.node)

    def _emit_kv(self, b: _Builder, make: Callable[[Any], Step]) -> None:
        """A step bound to the KV storage: made when the plan runs with a storage (see _bind_kv)."""
        b.plan.kv_steps.append((len(b.plan.steps), make))
        self._emit(b, _unbound_kv)

    def _input_root(self, b: _Builder, t: Tensor) -> str | None:
        """The graph-input name whose buffer ``t`` is (through reshapes), or None."""
        while t.op == "reshape":
            t = t.src[0]
        return t.name if t.op == "input" else None

    # -- running ----------------------------------------------------------------------------------------
    def run(self, plan: Plan, inputs: Mapping[str, np.ndarray], kv: Any = None) -> dict[str, np.ndarray]:
        if not isinstance(plan, CupyPlan) or plan.backend is not self:
            raise ValueError("run: the plan was not made by this backend")
        stage_inputs(plan.graph.name, plan.inputs, inputs)      # into the pinned host twins
        host_in = {name: buf for name, _shape, _dtype, buf in plan.inputs}
        st = self._bind_kv(plan, kv) if plan.kv_layers else None
        for check in plan.checks.values():
            check(host_in, st)

        try:
            if self.cuda_graphs and plan.graph_error is None and plan.n_runs >= 1 and plan.cuda_graph is None:
                self._capture(plan)
            g = plan.cuda_graph
            if g is not None:
                if not self.graph_io:
                    for f in plan.h2d:
                        f()
                self.dev.launch_graph(g, plan.stream)
                if not self.graph_io:
                    for f in plan.d2h:
                        f()
            else:
                for f in plan.h2d:
                    f()
                self._run_steps(plan)
                for f in plan.d2h:
                    f()
            self.dev.synchronize(plan.stream)
        except Exception as e:
            e.add_note(f"(cupy backend, graph {plan.graph.name!r})")
            raise
        plan.n_runs += 1
        return {name: np.array(buf) for name, buf in plan.outputs}

    def _run_steps(self, plan: CupyPlan) -> None:
        steps = plan.steps
        i = -1
        try:
            for i, f in enumerate(steps):
                f()
        except Exception as e:
            if 0 <= i < len(steps):
                e.add_note(f"(cupy backend, while launching {plan.step_node[i]} in graph {plan.graph.name!r})")
            raise

    def _capture(self, plan: CupyPlan) -> None:
        """Record the plan's steps (and, with graph_io, its copies) as one CUDA graph."""
        dev, stream = self.dev, plan.stream
        dev.synchronize(stream)
        # No cyclic GC while capturing: it could free another plan's graph, stream or buffers right
        # now, and the CUDA calls that makes (implicit synchronisations) would invalidate the capture.
        gc_on = gc.isenabled()
        gc.disable()
        try:
            dev.begin_capture(stream)
            try:
                if self.graph_io:
                    for f in plan.h2d:
                        f()
                for f in plan.steps:
                    f()
                if self.graph_io:
                    for f in plan.d2h:
                        f()
            except Exception as e:
                try:
                    dev.end_capture(stream)
                except Exception:
                    pass
                self._capture_failed(plan, e)
                return
            try:
                plan.cuda_graph = dev.end_capture(stream)
            except Exception as e:
                self._capture_failed(plan, e)
        finally:
            if gc_on:
                gc.enable()

    def _capture_failed(self, plan: CupyPlan, e: Exception) -> None:
        """The plan runs eagerly from now on. Expected for prefill plans whose GEMMs go through
        cuBLAS (CuPy refuses cuBLAS calls inside a capture); GGFLAT_CUDA_GRAPHS=debug says so."""
        plan.graph_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if self.graph_debug:
            warnings.warn(f"cupy backend: graph {plan.graph.name!r} runs eagerly, it cannot be captured "
                          f"({plan.graph_error})", RuntimeWarning, stacklevel=4)

    def _bind_kv(self, plan: CupyPlan, kv: Any) -> CupyKVStorage:
        if kv is not None and not isinstance(kv, CupyKVStorage) and isinstance(getattr(kv, "storage", None),
                                                                               CupyKVStorage):
            kv = kv.storage                                  # a PagedKVCache was passed
        if plan.kv_bound is not None and plan.kv_bound() is kv:
            return kv
        if not isinstance(kv, CupyKVStorage):
            raise ValueError(f"graph {plan.graph.name!r} reads the KV cache: run() needs the storage "
                             f"from alloc_kv, got {type(kv).__name__}")
        for layer, (hkv, dk, dv) in plan.kv_layers.items():
            if layer >= len(kv.k):
                raise ValueError(f"graph uses KV layer {layer}, the cache has {len(kv.k)} layers")
            if tuple(kv.k[layer].shape[2:]) != (hkv, dk) or tuple(kv.v[layer].shape[2:]) != (hkv, dv):
                raise ValueError(f"KV layer {layer}: cache holds (heads, dk, dv) = "
                                 f"{tuple(kv.k[layer].shape[2:]) + tuple(kv.v[layer].shape[3:])}, "
                                 f"graph wants {(hkv, dk, dv)}")
        if plan.attn_shapes:
            ao = self.dev.attention_ops()
            psz = kv.spec.page_size
            need = 0
            for n, h, hkv, dv in plan.attn_shapes:
                try:
                    b = ao.attention_scratch_bytes(n, h, dv, plan.max_pages * psz, n_kv_heads=hkv, page_size=psz)
                except TypeError:                            # the DESIGN.md signature
                    b = ao.attention_scratch_bytes(n, h, dv, plan.max_pages * psz)
                need = max(need, int(b))
            cur = plan.attn_scratch[0]
            if cur is None or cur.size < max(need, 1):
                plan.attn_scratch[0] = self._shared_buffer("attn", need) if need else self.dev.alloc(_ALIGN)
        for i, make in plan.kv_steps:
            plan.steps[i] = make(kv)
        plan.kv_bound = weakref.ref(kv)
        plan.cuda_graph = None                               # captured against another storage: re-capture
        return kv

    # -- ops --------------------------------------------------------------------------------------------------
    # Each takes the builder and the node and emits the node's steps (outputs are already placed).

    def _mm_weight(self, b: _Builder, w: Tensor) -> Any:
        return b.vals[w.index]

    def _get_rows(self, b: _Builder, t: Tensor) -> None:
        a_t, ids_t = t.src
        a, ids, y = b.vals[a_t.index], b.vals[ids_t.index], b.vals[t.index]
        rows = a_t.shape[0]
        name = self._input_root(b, ids_t)
        if name is not None:
            def check(host: dict, st: Any, name=name, rows=rows) -> None:
                v = host[name]
                if v.size:
                    lo, hi = int(v.min()), int(v.max())
                    if lo < 0 or hi >= rows:
                        raise ValueError(f"get_rows: id {lo if lo < 0 else hi} outside [0, {rows})")
            b.plan.checks[("get_rows", name, rows)] = check
        if a_t.op == "weight":
            qo = self.dev.quant_ops()
            stream = self.stream
            if hasattr(qo, "plan_get_rows"):
                self._emit(b, qo.plan_get_rows(a, ids, y, stream))
            else:
                self._emit(b, lambda: qo.get_rows(a, ids, y, stream))
        else:
            from .cuda import elementwise_ops as ew
            self._emit(b, ew.prepare_get_rows(a, ids, y, self.stream))

    def _mul_mat(self, b: _Builder, t: Tensor) -> None:
        w, x, y = self._mm_weight(b, t.src[0]), b.vals[t.src[1].index], b.vals[t.index]
        qo, stream, scratch = self.dev.quant_ops(), self.stream, b.plan.mm_scratch
        if hasattr(qo, "plan_mul_mat"):                      # chosen and bound once
            self._emit(b, qo.plan_mul_mat(w, t.shape[0], scratch).bind(x, y, stream))
        else:
            self._emit(b, lambda: qo.mul_mat(w, x, y, stream, scratch))

    def _operand(self, b: _Builder, s: Tensor) -> Any:
        """An elementwise operand: an activation view or a float32 weight array."""
        return self._dense_weight(s.name) if s.op == "weight" else b.vals[s.index]

    def _binary(self, b: _Builder, t: Tensor) -> None:
        from .cuda import elementwise_ops as ew
        x, z = self._operand(b, t.src[0]), self._operand(b, t.src[1])
        self._emit(b, ew.prepare_binary(t.op, x, z, b.vals[t.index], self.stream))

    def _fuse_add_norm(self, b: _Builder, t: Tensor, nxt: Tensor) -> bool:
        """add(a, b) (same shapes) immediately followed by rms_norm of its result: one kernel."""
        if nxt.op != "rms_norm" or nxt.src[0] is not t or t.src[0].shape != t.src[1].shape or not t.shape:
            return False
        if t.src[0].op in ("weight", "kv") or t.src[1].op in ("weight", "kv"):
            return False
        from .cuda import elementwise_ops as ew
        a, z = self._operand(b, t.src[0]), self._operand(b, t.src[1])
        w = self._dense_weight(nxt.src[1].name) if len(nxt.src) > 1 and nxt.src[1].op == "weight" else (
            b.vals[nxt.src[1].index] if len(nxt.src) > 1 else None)
        self._emit(b, ew.prepare_add_rms_norm(a, z, b.vals[t.index], w, b.vals[nxt.index],
                                              nxt.params["eps"], self.stream))
        return True

    def _fuse_pair(self, b: _Builder, t: Tensor, u: Tensor) -> bool:
        """Two independent ropes (same positions and parameters) or rms_norms (same last dim and
        eps) in a row: one launch. Refused when either output overlaps the other's input."""
        if u.op != t.op or not math.prod(t.shape) or not math.prod(u.shape):
            return False
        if any(b.r(v) == t.index for v in u.src):         # u reads t (through a reshape): not independent
            return False
        if t.op == "rope":
            if (u.src[1] is not t.src[1] or u.params != t.params or u.shape[0] != t.shape[0]
                    or u.shape[2] != t.shape[2]):
                return False
        elif u.shape[-1] != t.shape[-1] or u.params["eps"] != t.params["eps"]:
            return False
        # both run at once: neither output may share bytes with the other's input or output
        if b.overlaps(u, t.src[0]) or b.overlaps(t, u.src[0]) or b.overlaps(u, t):
            return False
        from .cuda import elementwise_ops as ew
        x, y, x2, y2 = (b.vals[v.index] for v in (t.src[0], t, u.src[0], u))
        if t.op == "rope":
            p = t.params
            step = ew.prepare_rope(x, b.vals[t.src[1].index], y, p["n_rot"], p["base"], p["freq_scale"],
                                   p["mode"] == ROPE_NEOX, self.stream, x2=x2, out2=y2)
        else:
            w = self._operand(b, t.src[1]) if len(t.src) > 1 else None
            w2 = self._operand(b, u.src[1]) if len(u.src) > 1 else None
            step = ew.prepare_rms_norm(x, w, y, t.params["eps"], self.stream, x2=x2, w2=w2, out2=y2)
        self._emit(b, step)
        return True

    # -- grouped decode GEMVs -------------------------------------------------------------------------------

    def _mm_regions(self, live: list[Tensor], graph: Graph) -> list[_Region]:
        """Decode mul_mats (n <= 8 rows of x) fused into grouped GEMV launches.

        Level 1 (fuse_level), per x and weight type, in graph order: first every gate/up pair
        whose outputs feed only one swiglu/geglu (gate = its first operand) -> "mm_glu"; the
        rest in runs of up to quant_ops.GROUP_MAX -> "mm_group", each member taking along the
        normal-mode rope that alone reads it (llama's q and k).
        Level 2 also: a mul_mat read only by an add of a residual of its shape -> "mm_add" (the
        launch adds it: llama's o and down projections); and a group or glu region whose x is an
        rms_norm read only by its members takes the norm in (each CTA norms x), unless the norm
        would otherwise fuse with the add before it (add_rms_norm: nothing to gain).
        quant_ops decides whether a kernel fits (plan_mul_mat_group returns None when not);
        prefill-sized n never fuses."""
        qo = self.dev.quant_ops()
        if not hasattr(qo, "plan_mul_mat_group"):
            return []
        max_n = int(getattr(qo, "DECODE_MAX_N", 8))
        group_max = int(getattr(qo, "GROUP_MAX", 3))
        at = {t.index: i for i, t in enumerate(live)}
        users: dict[int, list[Tensor]] = {}
        for t in live:
            for s in t.src:
                users.setdefault(s.index, []).append(t)
        outs = {t.index for t in graph.outputs.values()}

        def only_user(t: Tensor) -> Tensor | None:
            us = users.get(t.index, [])
            return us[0] if len(us) == 1 and t.index not in outs else None

        def ready(t: Tensor, before: Tensor) -> bool:          # computed before ``before`` runs
            return t.is_leaf or at.get(t.index, len(at)) < at[before.index]

        def norm_of(m: Tensor) -> Tensor | None:                # the rms_norm a level-2 region may take in
            h = m.src[1]
            return h if self.fuse_level >= 2 and h.op == "rms_norm" else None

        def mm_ok(t: Tensor) -> bool:
            return (t.op == "mul_mat" and t.src[0].op == "weight" and t.src[0].ndim == 2
                    and 1 <= t.shape[0] <= max_n and t.src[0].name in self._w)

        classes: dict[tuple[int, str], list[Tensor]] = {}
        for t in live:
            if mm_ok(t):
                classes.setdefault((t.src[1].index, t.src[0].dtype), []).append(t)
        regions: list[_Region] = []
        grouped: set[int] = set()
        for mms in classes.values():
            if len(mms) < 2:
                continue
            n = mms[0].shape[0]
            rest = list(mms)
            for a in mms:                                      # gate/up pairs first
                u = only_user(a)
                if a not in rest or u is None or u.op not in ("swiglu", "geglu") or u.src[0] is not a:
                    continue
                c = u.src[1]
                if c is a or c not in rest or only_user(c) is not u:
                    continue
                gp = qo.plan_mul_mat_group([self._w[a.src[0].name], self._w[c.src[0].name]], n, glu=u.op)
                if gp is not None:
                    regions.append(_Region("mm_glu", [a, c], gp, glu=u))
                    rest.remove(a)
                    rest.remove(c)
            while len(rest) >= 2:
                members, rest = rest[:group_max], rest[group_max:]
                start = norm_of(members[0]) or members[0]      # where the launch may go
                ropes = self._member_ropes(members, only_user, lambda t: ready(t, start))
                ws = [self._w[m.src[0].name] for m in members]
                gp = None
                if ropes:
                    p = next(iter(ropes.values()))[1]
                    spec = {"members": tuple(sorted(ropes)), "head_dim": p.shape[2], "n_rot": p.params["n_rot"],
                            "base": p.params["base"], "freq_scale": p.params["freq_scale"]}
                    gp = qo.plan_mul_mat_group(ws, n, rope=spec)
                    if gp is None:
                        ropes = {}
                if gp is None:
                    gp = qo.plan_mul_mat_group(ws, n)
                if gp is not None:
                    regions.append(_Region("mm_group", members, gp, ropes=ropes))
        for rg in regions:
            grouped.update(m.index for m in rg.members)
        if self.fuse_level < 2:
            return regions

        added: set[int] = set()                                # adds that mm_add regions compute
        for t in live:
            if not mm_ok(t) or t.index in grouped:
                continue
            u = only_user(t)
            if u is None or u.op != "add" or u.src[0] is u.src[1]:
                continue
            r = u.src[1] if u.src[0] is t else u.src[0]
            if r.op in ("weight", "kv") or r.shape != t.shape or r.dtype != "f32" or not ready(r, t):
                continue
            gp = qo.plan_mul_mat_group([self._w[t.src[0].name]], t.shape[0], residual=True)
            if gp is not None:
                regions.append(_Region("mm_add", [t], gp, add=u))
                added.add(u.index)
        for rg in regions:
            if rg.kind == "mm_add":
                continue
            h = norm_of(rg.members[0])
            if h is None or sorted(u.index for u in users.get(h.index, [])) != sorted(m.index for m in rg.members):
                continue
            if h.index in outs or h.src[0].ndim != 2 or (h.src[0].op == "add" and h.src[0].index not in added):
                continue
            if len(h.src) > 1 and (h.src[1].op != "weight" or h.src[1].name not in self._w):
                continue
            ws = [self._w[m.src[0].name] for m in rg.members]
            spec = None
            if rg.ropes:
                p = next(iter(rg.ropes.values()))[1]
                spec = {"members": tuple(sorted(rg.ropes)), "head_dim": p.shape[2], "n_rot": p.params["n_rot"],
                        "base": p.params["base"], "freq_scale": p.params["freq_scale"]}
            gp = qo.plan_mul_mat_group(ws, rg.members[0].shape[0], glu=rg.glu.op if rg.glu is not None else None,
                                       rope=spec, norm=h.params["eps"])
            if gp is not None:
                rg.norm, rg.gplan = h, gp
        return regions

    @staticmethod
    def _member_ropes(members: list[Tensor], only_user: Callable, ready: Callable) -> dict:
        """{g: (reshape, rope)} for the members whose only reader is a reshape to (n, H, d) whose
        only reader is a normal-mode rope; all of one positions tensor and parameters (the first's)."""
        found: dict[int, tuple[Tensor, Tensor]] = {}
        key = None
        for g, m in enumerate(members):
            rs = only_user(m)
            if rs is None or rs.op != "reshape":
                continue
            u = only_user(rs)
            if (u is None or u.op != "rope" or u.src[0] is not rs or u.params.get("mode") != ROPE_NORMAL
                    or u.shape[0] != m.shape[0]):
                continue
            pos = u.src[1]
            if not ready(pos):
                continue                                   # the positions must be ready at the launch
            k = (pos.index, u.shape[0], u.shape[2], tuple(sorted(u.params.items())))
            if key is None:
                key = k
            if k == key:
                found[g] = (rs, u)
        return found

    def _fuse_region(self, b: _Builder, rg: _Region) -> bool:
        """One grouped launch for the region, unless a buffer it writes shares bytes with what it
        reads (an add may write over its residual, element by element) or with another of its
        outputs: then its nodes run one by one, still in a valid order."""
        outs = rg.outputs()
        for i, o in enumerate(outs):
            for r in rg.reads():
                if b.overlaps(o, r) and not (r is rg.resid and b.same(o, r)):
                    return False
            if any(b.overlaps(o, p) for p in outs[:i]):
                return False
        n = rg.members[0].shape[0]
        bufs = []
        for o in outs:
            v = b.vals[o.index]
            bufs.append(v.reshape(n, -1) if v.ndim != 2 else v)
        kw: dict[str, Any] = {}
        if rg.pos is not None:
            kw["pos"] = b.vals[rg.pos.index]
        # positions and KV slots that are graph inputs (copied in before the first kernel, written by
        # none) may be read before PDL's wait
        ins = ([rg.pos] if rg.pos is not None else []) + (list(rg.kv.src[3:5]) if rg.kv is not None else [])
        kw["early"] = all(self._input_root(b, t) is not None for t in ins)
        if rg.norm is not None:
            kw["norm_w"] = self._dense_weight(rg.norm.src[1].name) if len(rg.norm.src) > 1 else None
        if rg.resid is not None:
            kw["resid"] = b.vals[rg.resid.index]
        x = b.vals[rg.x.index]
        x = x.reshape(n, -1) if x.ndim != 2 else x
        if rg.kv is None:
            self._emit(b, rg.gplan.bind(x, bufs, self.stream, **kw))
            return True
        kvl, _, _, slots_t, pos_t = rg.kv.src
        layer, S, P = kvl.params["layer"], b.vals[slots_t.index], b.vals[pos_t.index]
        self._kv_slot_check(b, rg.kv)
        gplan, stream = rg.gplan, self.stream

        def make(st: CupyKVStorage) -> Step:
            return gplan.bind(x, bufs, stream, kv=(st.k[layer], st.v[layer], st.pos[layer], S, P), **kw)
        self._emit_kv(b, make)
        rg.kv_done = True
        return True

    def _kv_folds(self, b: _Builder, live: list[Tensor], regions: list[_Region]) -> dict[int, _Region]:
        """The kv_store nodes whose k and v are the k and v outputs (through reshapes) of a q/k/v
        launch that can write the cache itself (quant_ops: a Marlin decode launch over the whole
        k range), their slots and positions graph inputs, each with its region (rg.kv): when the
        region runs as one launch (rg.kv_done) the kv_store is left out of the steps, else it runs
        as usual. The unfused k and v outputs are still written."""
        out_of: dict[int, tuple[_Region, int]] = {}
        for rg in regions:
            if rg.kind == "mm_group" and len(rg.members) == 3 and getattr(rg.gplan, "kv_fold_ok", False):
                for g, o in enumerate(rg.outputs()):
                    out_of[o.index] = (rg, g)
        if not out_of:
            return {}

        def strip(t: Tensor) -> Tensor:
            while t.op == "reshape":
                t = t.src[0]
            return t
        folded: dict[int, _Region] = {}
        for t in live:
            if t.op != "kv_store":
                continue
            _, k, v, slots, pos = t.src
            ka, va = out_of.get(strip(k).index), out_of.get(strip(v).index)
            if (ka is None or va is None or ka[0] is not va[0] or (ka[1], va[1]) != (1, 2) or ka[0].kv is not None
                    or self._input_root(b, slots) is None or self._input_root(b, pos) is None):
                continue
            ka[0].kv = t
            folded[t.index] = ka[0]
        return folded

    def _kv_slot_check(self, b: _Builder, t: Tensor) -> None:
        """The host-side range check of a kv_store's slots (an input): each run, before launching."""
        name = self._input_root(b, t.src[3])
        if name is None:
            return

        def check(host: dict, st: Any, name=name) -> None:
            s = host[name]
            cap = st.spec.n_pages * st.spec.page_size
            lo, hi = int(s.min()), int(s.max())
            if lo < 0 or hi >= cap:
                raise ValueError(f"kv_store: slot {lo if lo < 0 else hi} outside the cache's [0, {cap})")
        b.plan.checks[("kv_store", name)] = check

    def _scale(self, b: _Builder, t: Tensor) -> None:
        from .cuda import elementwise_ops as ew
        self._emit(b, ew.prepare_scale(b.vals[t.src[0].index], b.vals[t.index], t.params["s"], self.stream))

    def _unary(self, b: _Builder, t: Tensor) -> None:
        from .cuda import elementwise_ops as ew
        self._emit(b, ew.prepare_unary(t.op, b.vals[t.src[0].index], b.vals[t.index], self.stream))

    def _glu(self, b: _Builder, t: Tensor) -> None:
        from .cuda import elementwise_ops as ew
        self._emit(b, ew.prepare_glu(t.op, b.vals[t.src[0].index], b.vals[t.src[1].index], b.vals[t.index],
                                     self.stream))

    def _rms_norm(self, b: _Builder, t: Tensor) -> None:
        from .cuda import elementwise_ops as ew
        w = self._operand(b, t.src[1]) if len(t.src) > 1 else None
        self._emit(b, ew.prepare_rms_norm(b.vals[t.src[0].index], w, b.vals[t.index], t.params["eps"],
                                          self.stream))

    def _soft_max(self, b: _Builder, t: Tensor) -> None:
        from .cuda import elementwise_ops as ew
        mask = self._operand(b, t.src[1]) if len(t.src) > 1 else None
        self._emit(b, ew.prepare_soft_max(b.vals[t.src[0].index], mask, b.vals[t.index], t.params["scale"],
                                          self.stream))

    def _rope(self, b: _Builder, t: Tensor) -> None:
        from .cuda import elementwise_ops as ew
        p = t.params
        self._emit(b, ew.prepare_rope(b.vals[t.src[0].index], b.vals[t.src[1].index], b.vals[t.index],
                                      p["n_rot"], p["base"], p["freq_scale"], p["mode"] == ROPE_NEOX,
                                      self.stream))

    def _argmax(self, b: _Builder, t: Tensor) -> None:
        from .cuda import elementwise_ops as ew
        self._emit(b, ew.prepare_argmax(b.vals[t.src[0].index], b.vals[t.index], self.stream))

    def _sample(self, b: _Builder, t: Tensor) -> None:
        from .cuda import sampling_ops as so           # parameters, seed, counter, history: device inputs
        x, prm, st = (b.vals[s.index] for s in t.src[:3])
        hist = b.vals[t.src[3].index] if len(t.src) > 3 else None
        self._emit(b, so.prepare_sample(x, prm, st, hist, b.vals[t.index], self.stream))

    def _kv_store(self, b: _Builder, t: Tensor) -> None:
        kv, k, v, slots, pos = t.src
        layer = kv.params["layer"]
        K, V, S, P = (b.vals[s.index] for s in (k, v, slots, pos))
        if k.shape[0] == 0:
            return
        self._kv_slot_check(b, t)
        ao, stream = self.dev.attention_ops(), self.stream

        def make(st: CupyKVStorage) -> Step:
            if hasattr(ao, "plan_kv_store"):
                return ao.plan_kv_store(K, V, S, P, st.k[layer], st.v[layer], st.pos[layer], stream)
            return lambda: ao.kv_store(K, V, S, P, st.k[layer], st.v[layer], st.pos[layer], stream)
        self._emit_kv(b, make)

    def _attention(self, b: _Builder, t: Tensor) -> None:
        q_t, kv_t, bt_t, len_t, qpos_t = t.src[:5]
        layer = kv_t.params["layer"]
        n, H, _ = q_t.shape
        hkv, dv = kv_t.shape[0], kv_t.params["head_dim_v"]
        Q, BT, KL, QP, out = (b.vals[s.index] for s in (q_t, bt_t, len_t, qpos_t, t))
        p = b.plan
        p.attn_shapes.append((n, H, hkv, dv))
        p.max_pages = max(p.max_pages, bt_t.shape[0])
        max_slots = bt_t.shape[0]
        bt_name, len_name = self._input_root(b, bt_t), self._input_root(b, len_t)
        if bt_name is not None and len_name is not None:
            def check(host: dict, st: Any, bt_name=bt_name, len_name=len_name) -> None:
                psz, n_pages = st.spec.page_size, st.spec.n_pages
                L = int(host[len_name][0])
                if not 0 <= L <= max_slots * psz:
                    raise ValueError(f"attention: kv_len {L} outside [0, {max_slots * psz}] "
                                     f"(block table of {max_slots} pages of {psz})")
                pages = host[bt_name][:-(-L // psz)]
                if pages.size:
                    lo, hi = int(pages.min()), int(pages.max())
                    if lo < 0 or hi >= n_pages:
                        raise ValueError(f"attention: block table names page {lo if lo < 0 else hi}, "
                                         f"the cache has {n_pages}")
            p.checks[("attention", bt_name, len_name, max_slots)] = check
        ao, stream, scratch = self.dev.attention_ops(), self.stream, p.attn_scratch
        scale, window, softcap = t.params["scale"], t.params["window"], t.params["softcap"]
        knobs = {}
        span = self._prefetch_span(b, t)
        if span is not None:
            knobs["prefetch"] = span
            p.n_prefetch += 1

        def make(st: CupyKVStorage) -> Step:
            args = (Q, st.k[layer], st.v[layer], st.pos[layer], BT, KL, QP, out, scale, window, softcap,
                    stream, scratch[0])
            if hasattr(ao, "plan_attention"):
                return ao.plan_attention(*args, **knobs)
            return lambda: ao.attention(*args)
        self._emit_kv(b, make)

    def _prefetch_span(self, b: _Builder, t: Tensor) -> tuple[int, int] | None:
        """(address, nbytes) for the decode attention kernel to bring into L2 while it runs: the
        weights of the first mul_mat after it (the o projection), at most attn_prefetch bytes.
        Attention is the one decode launch during which DRAM idles, and o is launched after it
        without PDL (attention.cu ATTN_PREFETCH; benchmarks/RESULTS.md, session 11)."""
        w_t = b.pf_next.get(t.index)
        qo = self.dev.quant_ops()
        if w_t is None or not hasattr(qo, "weight_span"):
            return None
        addr, nbytes = qo.weight_span(self._mm_weight(b, w_t))
        return (addr, min(nbytes, self.attn_prefetch)) if nbytes else None
