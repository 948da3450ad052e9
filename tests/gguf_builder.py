"""A tiny writer of raw GGUF bytes, for crafting malformed files in tests.

Unlike gguf.GGUFWriter it lets a test lie about anything: counts, lengths,
types, offsets, the alignment. Every helper returns plain ``bytes`` so a test
can splice, truncate or corrupt the result.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

T = GGUFValueType
_SCALAR = {T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I",
           T.INT32: "<i", T.UINT64: "<Q", T.INT64: "<q", T.FLOAT32: "<f", T.FLOAT64: "<d",
           T.BOOL: "<B"}


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def i32(v: int) -> bytes:
    return struct.pack("<i", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def gstr(s: str | bytes, length: int | None = None) -> bytes:
    """A GGUF string: u64 length (``length`` overrides it) + the bytes."""
    b = s.encode("utf-8") if isinstance(s, str) else s
    return u64(len(b) if length is None else length) + b


def scalar(vtype: GGUFValueType, value) -> bytes:
    if vtype == T.STRING:
        return gstr(value)
    return struct.pack(_SCALAR[vtype], value)


def kv(key: str | bytes, vtype: GGUFValueType | int, value) -> bytes:
    """A scalar KV pair; ``value`` is raw bytes if it is bytes, else packed for vtype."""
    payload = value if isinstance(value, bytes) else scalar(GGUFValueType(vtype), value)
    return gstr(key) + i32(int(vtype)) + payload


def kv_array(key: str | bytes, etype: GGUFValueType | int, values, count: int | None = None) -> bytes:
    """An array KV pair; ``count`` overrides the stored length."""
    n = len(values) if count is None else count
    if isinstance(values, bytes):
        body = values
    else:
        body = b"".join(scalar(GGUFValueType(etype), v) for v in values)
    return gstr(key) + i32(int(T.ARRAY)) + i32(int(etype)) + u64(n) + body


def tensor_info(name: str | bytes, ne: tuple[int, ...], ggml_type: int, offset: int,
                n_dims: int | None = None) -> bytes:
    return (gstr(name) + u32(len(ne) if n_dims is None else n_dims)
            + b"".join(u64(d) for d in ne) + i32(int(ggml_type)) + u64(offset))


def nbytes(ne: tuple[int, ...], ggml_type: int) -> int:
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except ValueError:  # an unknown type id: pretend 1 byte per element
        block, size = 1, 1
    n = 1
    for d in ne:
        n *= d
    return n // block * size


def pad(n: int, align: int = 32) -> int:
    return (n + align - 1) // align * align


@dataclass
class Tensor:
    name: str | bytes
    ne: tuple[int, ...]
    ggml_type: int = int(GGMLQuantizationType.F32)
    offset: int | None = None   # relative to the data section; None = packed in order
    n_dims: int | None = None


@dataclass
class GGUFBuilder:
    """Assemble a GGUF file. Any field can be set to a lie before ``build()``."""
    kvs: list[bytes] = field(default_factory=list)
    tensors: list[Tensor] = field(default_factory=list)
    magic: bytes = b"GGUF"
    version: int = 3
    n_tensors: int | None = None
    n_kv: int | None = None
    alignment: int = 32          # used to lay out the file (not written as a KV)
    data: bytes | None = None     # tensor data; None = zeros of the right size

    def build(self) -> bytes:
        infos, offset, layout = [], 0, []
        for t in self.tensors:
            size = nbytes(t.ne, t.ggml_type) if all(d > 0 for d in t.ne) and t.ne else 0
            off = offset if t.offset is None else t.offset
            layout.append((off, size))
            infos.append(tensor_info(t.name, t.ne, t.ggml_type, off, t.n_dims))
            offset = pad(max(offset, off + size), self.alignment)
        head = (self.magic + u32(self.version)
                + u64(len(self.tensors) if self.n_tensors is None else self.n_tensors)
                + u64(len(self.kvs) if self.n_kv is None else self.n_kv)
                + b"".join(self.kvs) + b"".join(infos))
        if not self.tensors:
            return head
        head += b"\0" * (pad(len(head), self.alignment) - len(head))
        if self.data is None:
            end = max((o + s for o, s in layout if s < (1 << 24)), default=0)
            data = b"\0" * end
        else:
            data = self.data
        return head + data


def write_small_gguf(path, alignment: int | None = None) -> dict:
    """A small, valid file written by gguf.GGUFWriter: every value type, string and
    numeric arrays, and a few tensors (F32, F16, Q8_0 raw blocks, a 3-D I32).

    Returns what was written: {"metadata": {key: value}, "tensors": {name: (ne, type, bytes)}}.
    """
    import numpy as np
    import gguf

    w = gguf.GGUFWriter(str(path), arch="llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    md: dict = {"general.architecture": "llama"}

    def put(key, value, vtype, sub=None):
        w.add_key_value(key, value, vtype, sub)
        md[key] = value

    put("general.name", "tiny ünïcode 模型", T.STRING)
    put("t.u8", 200, T.UINT8)
    put("t.i8", -100, T.INT8)
    put("t.u16", 60000, T.UINT16)
    put("t.i16", -30000, T.INT16)
    put("t.u32", 4_000_000_000, T.UINT32)
    put("t.i32", -2_000_000_000, T.INT32)
    put("t.u64", 2**64 - 1, T.UINT64)
    put("t.i64", -(2**63), T.INT64)
    put("t.f32", 0.5, T.FLOAT32)
    put("t.f64", 3.141592653589793, T.FLOAT64)
    put("t.bool", True, T.BOOL)
    put("llama.block_count", 2, T.UINT32)
    put("llama.embedding_length", 64, T.UINT32)
    put("llama.attention.head_count", 4, T.UINT32)
    put("tokenizer.ggml.tokens", ["<s>", "</s>", "a", "b", "é", "🙂", "", "hello world"], T.ARRAY, T.STRING)
    put("tokenizer.ggml.scores", [0.0, -1.5, 2.25, 3.0, -4.0, 5.5, 6.0, 7.0], T.ARRAY, T.FLOAT32)
    put("tokenizer.ggml.token_type", [3, 3, 1, 1, 1, 1, 1, 1], T.ARRAY, T.INT32)
    put("t.arr_u8", [0, 1, 255], T.ARRAY, T.UINT8)
    put("t.arr_i64", [-(2**63), 0, 2**63 - 1], T.ARRAY, T.INT64)
    put("t.arr_f64", [1.0, -2.5], T.ARRAY, T.FLOAT64)
    put("t.arr_bool", [True, False, True], T.ARRAY, T.BOOL)
    put("t.arr_u16", [1, 65535], T.ARRAY, T.UINT16)

    rng = np.random.default_rng(0)
    tensors = {}

    def tensor(name, arr, raw_dtype=None, ne=None):
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
        qt = raw_dtype if raw_dtype is not None else {
            np.dtype("float32"): GGMLQuantizationType.F32, np.dtype("float16"): GGMLQuantizationType.F16,
            np.dtype("int32"): GGMLQuantizationType.I32}[arr.dtype]
        tensors[name] = (tuple(ne if ne is not None else reversed(arr.shape)), int(qt), arr.tobytes())

    tensor("token_embd.weight", rng.standard_normal((8, 64)).astype(np.float32))
    tensor("blk.0.attn_norm.weight", rng.standard_normal(64).astype(np.float16))
    # Q8_0: 34-byte blocks of 32 elements; a (4, 64) tensor is 4 rows x 2 blocks = 272 bytes.
    q8 = rng.integers(0, 256, size=(4, 2 * 34), dtype=np.uint8)
    tensor("blk.0.ffn_up.weight", q8, raw_dtype=GGMLQuantizationType.Q8_0, ne=(64, 4))
    tensor("blk.1.x", rng.integers(-5, 5, size=(2, 3, 5), dtype=np.int32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"metadata": md, "tensors": tensors}
