"""quant_formats: layouts, bit-exact dequantizers, quantizers, validation, real model tensors.

The references: gguf.quants (dequantize for every type, quantize for the legacy ones)
and, for our own Q4_K / Q6_K quantizers, SHA-256 digests of ggml's C
quantize_row_q4_K_ref / quantize_row_q6_K_ref output on a deterministic input
(ggml-quants.c compiled with gcc -O2 for baseline x86-64, i.e. without FMA contraction).
"""
from __future__ import annotations

import hashlib
import struct

import gguf
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

import quant_formats as qf
from engine.errors import GGFlatError, UnknownTypeError
from quant_formats import FORMATS, Field, QuantFormat

ALL_TYPES = sorted(FORMATS)
REQUIRED = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
            "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"}


def _ids(types):
    return [FORMATS[t].name for t in types]


def random_blocks(fmt: QuantFormat, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random block bytes whose f16 fields are finite: normal, subnormal, zero, negative and extreme."""
    raw = rng.integers(0, 256, size=(n_blocks, fmt.block_bytes), dtype=np.uint8)
    blk = raw.view(fmt.np_dtype).reshape(n_blocks)
    for f in fmt.fields:
        if f.dtype == "float16":
            mag = rng.choice(np.array([1e-7, 1e-5, 1e-3, 0.05, 1.0, 300.0]), size=n_blocks)
            v = (rng.standard_normal(n_blocks) * mag).astype(np.float16)
            v[::17] = 0
            v[5::23] = np.float16(65504)
            v[7::29] = np.float16(-6e-8)        # smallest subnormal
            blk[f.name] = v
    return raw.reshape(-1)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a = np.ascontiguousarray(a, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def gguf_dequant(raw: np.ndarray, type_id: int, shape: tuple[int, ...]) -> np.ndarray:
    rows = raw.reshape(-1, qf.row_nbytes(type_id, shape[-1]))
    return gguf.quants.dequantize(rows, GGMLQuantizationType(type_id)).reshape(shape)


def rel_rmse(x: np.ndarray, y: np.ndarray) -> float:
    x = x.astype(np.float64)
    return float(np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2)))


# ---------------------------------------------------------------------------------------------
# layouts

def test_required_types_present():
    assert {f.name for f in FORMATS.values()} == REQUIRED


@pytest.mark.parametrize("type_id", ALL_TYPES, ids=_ids(ALL_TYPES))
def test_layout_matches_ggml(type_id):
    fmt = qf.get_format(type_id)
    assert isinstance(fmt, QuantFormat) and all(isinstance(f, Field) for f in fmt.fields)
    gt = GGMLQuantizationType(type_id)
    assert fmt.type_id == type_id and fmt.name == gt.name
    assert (fmt.block_elems, fmt.block_bytes) == GGML_QUANT_SIZES[gt]
    assert sum(f.nbytes for f in fmt.fields) == fmt.block_bytes
    assert fmt.np_dtype.itemsize == fmt.block_bytes
    assert len({f.name for f in fmt.fields}) == len(fmt.fields)
    assert fmt.doc and "\n" not in fmt.doc and all(f.doc for f in fmt.fields)


def test_layout_examples():
    q41 = qf.get_format(3)
    assert [(f.name, f.dtype, f.count) for f in q41.fields] == [
        ("d", "float16", 1), ("m", "float16", 1), ("qs", "uint8", 16)]
    q4k = qf.get_format(12)
    assert [f.name for f in q4k.fields] == ["d", "dmin", "scales", "qs"]
    assert q4k.field_offset("qs") == 16 and q4k.bits_per_weight == 4.5
    assert [f.name for f in qf.get_format(14).fields] == ["ql", "qh", "scales", "d"]
    with pytest.raises(ValueError):
        QuantFormat("BAD", 2, 32, 19, q41.fields, doc="x")     # fields sum to 20, not 19


# ---------------------------------------------------------------------------------------------
# dequantize == gguf.quants bit for bit

@pytest.mark.parametrize("type_id", ALL_TYPES, ids=_ids(ALL_TYPES))
def test_dequantize_bit_exact_random_blocks(type_id):
    fmt = qf.get_format(type_id)
    rng = np.random.default_rng(type_id)
    be = fmt.block_elems
    # 1-D, multi-row, 3-D, and one spanning several dequantize chunks
    n_big = 3 * qf.registry.CHUNK_ELEMS // be + 7
    shapes = [(be,), (3, 2 * be), (2, 3, 4 * be), (n_big * be,)]
    if be == 1:
        shapes.append((5, 7))
    for shape in shapes:
        n_blocks = int(np.prod(shape)) // be
        raw = random_blocks(fmt, n_blocks, rng)
        ours = qf.dequantize(raw, type_id, shape)
        assert ours.dtype == np.float32 and ours.shape == shape
        assert same_bits(ours, gguf_dequant(raw, type_id, shape)), (fmt.name, shape)


def test_dequantize_input_kinds():
    fmt = qf.get_format(2)
    raw = random_blocks(fmt, 8, np.random.default_rng(0))
    want = qf.dequantize(raw, 2, (2, 128))
    assert same_bits(qf.dequantize(raw.tobytes(), 2, (2, 128)), want)
    assert same_bits(qf.dequantize(memoryview(raw.tobytes()), 2, (2, 128)), want)
    assert same_bits(qf.dequantize(raw.reshape(2, 72), 2, (2, 128)), want)       # GGUFReader's (rows, row_bytes)
    ro = raw.copy()
    ro.flags.writeable = False
    assert same_bits(qf.dequantize(ro, 2, [np.int64(2), np.uint64(128)]), want)
    # F32: any buffer; a view of a float32 array comes back unchanged
    x = np.arange(12, dtype=np.float32)
    assert same_bits(qf.dequantize(x, 0, (3, 4)), x.reshape(3, 4))
    # empty tensor
    assert qf.dequantize(b"", 12, (0, 256)).shape == (0, 256)
    # decoding into a caller's buffer
    buf = np.full(256, np.nan, np.float32)
    res = qf.dequantize(raw, 2, (2, 128), out=buf)
    assert np.shares_memory(res, buf) and same_bits(res, want)
    assert same_bits(qf.dequantize(x, 0, (12,), out=np.empty(12, np.float32)), x)
    with pytest.raises(GGFlatError, match="out must be"):
        qf.dequantize(raw, 2, (2, 128), out=np.empty(255, np.float32))
    with pytest.raises(GGFlatError, match="out must be"):
        qf.dequantize(raw, 2, (2, 128), out=np.empty(256, np.float64))


def test_dequantize_rejects_bad_sizes():
    raw = np.zeros(36, np.uint8)
    with pytest.raises(GGFlatError, match=r"Q4_0 tensor of shape \(64,\) needs 36 bytes, got 35"):
        qf.dequantize(raw[:35], 2, (64,))
    with pytest.raises(GGFlatError, match="needs 36 bytes, got 54"):
        qf.dequantize(np.zeros(54, np.uint8), 2, (64,))
    with pytest.raises(GGFlatError, match="not a multiple of the Q4_0 block size 32"):
        qf.dequantize(raw, 2, (2, 36))
    with pytest.raises(GGFlatError, match="not a multiple of the Q4_K block size 256"):
        qf.dequantize(np.zeros(144, np.uint8), 12, (128,))
    with pytest.raises(GGFlatError, match="at least one dimension"):
        qf.dequantize(raw, 2, ())
    with pytest.raises(GGFlatError, match=">= 0"):
        qf.dequantize(raw, 2, (-1, 64))
    with pytest.raises(GGFlatError):
        qf.dequantize(raw, 2, (64.0,))
    with pytest.raises(GGFlatError):
        qf.dequantize(12345, 2, (64,))


# ---------------------------------------------------------------------------------------------
# type ids, sizes

@pytest.mark.parametrize("bad", [99, -1, 2**31, 2**64, 4, 31, 1000])
def test_unknown_type_ids(bad):
    msg = f"unknown ggml type id {bad}"
    for call in (lambda: qf.get_format(bad), lambda: qf.dequantize(b"", bad, (0,)),
                 lambda: qf.quantize(np.zeros(32, np.float32), bad), lambda: qf.row_nbytes(bad, 32),
                 lambda: qf.tensor_nbytes(bad, (32,))):
        with pytest.raises(UnknownTypeError) as e:
            call()
        assert str(e.value) == msg
    assert qf.type_name(bad) == f"type {bad}"


@pytest.mark.parametrize("bad", ["Q4_0", 2.0, None])
def test_non_integer_type_ids(bad):
    with pytest.raises(UnknownTypeError, match="unknown ggml type id"):
        qf.get_format(bad)


@pytest.mark.parametrize("tid,name", [(16, "IQ2_XXS"), (9, "Q8_1"), (15, "Q8_K"), (24, "I8"), (28, "F64"),
                                      (39, "MXFP4"), (29, "IQ1_M")])
def test_known_unsupported_types(tid, name):
    with pytest.raises(UnknownTypeError) as e:
        qf.get_format(tid)
    assert str(e.value) == f"ggml type {name} ({tid}) is not supported"
    assert isinstance(e.value, GGFlatError)
    assert qf.type_name(tid) == name
    with pytest.raises(UnknownTypeError, match="is not supported"):
        qf.dequantize(b"", tid, (0,))


def test_type_names_match_gguf():
    for t in GGMLQuantizationType:
        assert qf.type_name(int(t)) == t.name


def test_sizes_and_names():
    assert qf.row_nbytes(12, 512) == 288
    assert qf.row_nbytes(0, 7) == 28 and qf.row_nbytes(30, 3) == 6
    assert qf.tensor_nbytes(2, (3, 64)) == 3 * 36
    assert qf.tensor_nbytes(8, (2**40, 32)) == 2**40 * 34               # no int64 wrap
    assert qf.tensor_nbytes(GGMLQuantizationType.Q6_K, (2, 3, 256)) == 6 * 210
    assert qf.get_format(GGMLQuantizationType.Q4_K) is qf.get_format(np.int32(12))
    with pytest.raises(GGFlatError, match="row length 100 is not a multiple of the Q8_0 block size 32"):
        qf.row_nbytes(8, 100)
    assert [qf.type_name(t) for t in (0, 2, 12, 30, 20)] == ["F32", "Q4_0", "Q4_K", "BF16", "IQ4_NL"]


# ---------------------------------------------------------------------------------------------
# quantize

# Relative RMSE on N(0, 1) data, seed 0, 64 x 4096 (measured: F16 2.2e-4, BF16 1.7e-3,
# Q8_0 5.4e-3, Q4_0 0.086, Q4_1 0.078, Q5_0 0.043, Q5_1 0.038, Q4_K 0.071, Q6_K 0.018).
ERROR_BOUNDS = {"F16": 3e-4, "BF16": 2e-3, "Q8_0": 6e-3, "Q4_0": 0.095, "Q4_1": 0.086, "Q5_0": 0.048,
                "Q5_1": 0.042, "Q4_K": 0.078, "Q6_K": 0.02}
_BY_NAME = {f.name: t for t, f in FORMATS.items()}


@pytest.fixture(scope="module")
def gauss() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((64, 4096)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(ERROR_BOUNDS))
def test_quantize_error_bound(gauss, name):
    tid = _BY_NAME[name]
    q = qf.quantize(gauss, tid)
    assert q.dtype == np.uint8 and q.shape == (64, qf.row_nbytes(tid, 4096))
    y = qf.dequantize(q, tid, gauss.shape)
    err = rel_rmse(gauss, y)
    assert err < ERROR_BOUNDS[name], f"{name}: {err:.5f}"
    assert err > ERROR_BOUNDS[name] / 3, f"{name}: {err:.5f} suspiciously small"


@pytest.mark.parametrize("name", ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K"])
def test_quantize_dequantize_fixed_point(gauss, name):
    # dequantized values are representable, so quantizing them again gives the same bytes
    tid = _BY_NAME[name]
    x = gauss[:16]
    q = qf.quantize(x, tid)
    q2 = qf.quantize(qf.dequantize(q, tid, x.shape), tid)
    if name == "Q4_K":      # the scale search may pick another optimum; almost never does
        blocks_same = (q.reshape(-1, 144) == q2.reshape(-1, 144)).all(axis=1)
        assert blocks_same.mean() > 0.99
    else:
        assert np.array_equal(q, q2)


def test_q4_k_beats_naive_q4_1(gauss):
    # Q4_K (4.5 bpw) searches scale and min per 32 values and still wins over Q4_1's
    # min/max fit (5 bpw) despite quantizing its scales and mins to 6 bits
    k = rel_rmse(gauss, qf.dequantize(qf.quantize(gauss, 12), 12, gauss.shape))
    q41 = rel_rmse(gauss, qf.dequantize(qf.quantize(gauss, 3), 3, gauss.shape))
    assert k < 0.95 * q41


def _det_input(n_rows: int, n_cols: int) -> np.ndarray:
    """Platform-independent test data: integer hashing and IEEE basic arithmetic only."""
    i = np.arange(n_rows * n_cols, dtype=np.uint64)
    h = (i * np.uint64(2654435761) + np.uint64(12345)) % np.uint64(2**32)
    u = (h % np.uint64(65536)).astype(np.float64) / 32768.0 - 1.0
    v = u * u * u + 0.25 * u
    v = np.where(h % np.uint64(97) == 0, v * 8.0, v)
    v = v.reshape(n_rows, n_cols) * (2.0 ** (np.arange(n_rows) % 7 - 3))[:, None]
    v[1] = 0.0             # all-zero blocks
    v[2] = 0.75            # constant blocks (max == min)
    v[3] = np.abs(v[3]) + 0.5  # all-positive blocks (min clamped to 0)
    return v.astype(np.float32)


# sha256 of ggml's quantize_row_q4_K_ref / quantize_row_q6_K_ref output on _det_input(128, 2048)
# (1024 super-blocks: large enough that even dropping the last of the 21 Q4_K scale trials
# changes 4 blocks, and the digest)
GGML_DIGESTS = {
    12: "ec586f4f1e0b2f7c8188cfa7c249144b6a240a514dfa80b4d96eef448f9557b4",
    14: "efafaee5a592c36edeeb62e6b05017e9d94ac9bd4f9300b0f44b2cb26446717f",
}


@pytest.mark.parametrize("tid", sorted(GGML_DIGESTS), ids=["Q4_K", "Q6_K"])
def test_k_quantize_matches_ggml_reference(tid):
    q = qf.quantize(_det_input(128, 2048), tid)
    assert hashlib.sha256(q.tobytes()).hexdigest() == GGML_DIGESTS[tid]


def test_q4_k_block_structure(gauss):
    x = gauss[:8]
    q = qf.quantize(x, 12)
    blk = q.reshape(-1).view(qf.get_format(12).np_dtype)
    d = blk["d"].astype(np.float32)
    dmin = blk["dmin"].astype(np.float32)
    assert np.all(d > 0) and np.all(dmin >= 0) and np.all(np.isfinite(d))
    s = blk["scales"]
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    # d = max_scale / 63: the largest sub-block scale is stored as 63 (same for the mins)
    assert np.all(sc.max(axis=1) == 63) and np.all(mn.max(axis=1) == 63)
    # every value lies within the block's representable range [-dmin*m, d*sc*15 - dmin*m]
    lo = -(dmin[:, None] * mn)
    hi = d[:, None] * sc * 15 - dmin[:, None] * mn
    xs = x.reshape(-1, 8, 32)
    step = (d[:, None] * sc)[..., None]
    assert np.all(xs >= lo[..., None] - step) and np.all(xs <= hi[..., None] + step)


def test_q6_k_zero_and_tiny_blocks():
    x = np.zeros((2, 256), np.float32)
    x[1, :] = 1e-20
    q = qf.quantize(x, 14)
    assert not q[0].any()                                      # ggml memsets an all-zero super-block
    assert np.array_equal(qf.dequantize(q, 14, x.shape), np.zeros_like(x))


def test_own_quantizers_match_gguf():
    # BF16 and F16 are ours; compare with gguf.quants.quantize, NaN/Inf/ties/subnormals included
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**32, size=4096, dtype=np.uint64).astype(np.uint32)
    special = np.array([0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x00000001,
                        0x80000000, 0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF], np.uint32)
    x = np.concatenate([bits, special, np.zeros(32 - len(special) % 32, np.uint32)]).view(np.float32)
    x = x.reshape(-1, 32)
    with np.errstate(all="ignore"):
        want = gguf.quants.quantize(x, GGMLQuantizationType.BF16)
        assert np.array_equal(qf.quantize(x, 30).view(np.uint16), want.view(np.uint16))
        assert np.array_equal(qf.quantize(x, 1), gguf.quants.quantize(x, GGMLQuantizationType.F16).view(np.uint8))


def test_quantize_shapes_and_errors():
    x = np.random.default_rng(1).standard_normal((2, 3, 256)).astype(np.float32)
    assert qf.quantize(x, 12).shape == (2, 3, 144)
    assert qf.quantize(x, 2).shape == (2, 3, 8 * 18)
    assert qf.quantize(x.astype(np.float64), 8).shape == (2, 3, 8 * 34)
    assert qf.quantize(np.zeros((0, 256), np.float32), 12).shape == (0, 144)
    assert same_bits(qf.dequantize(qf.quantize(x, 0), 0, x.shape), x)
    with pytest.raises(GGFlatError, match="row length 100 is not a multiple of the Q4_0 block size 32"):
        qf.quantize(np.zeros(100, np.float32), 2)
    with pytest.raises(GGFlatError, match="quantizing to Q2_K is not supported"):
        qf.quantize(np.zeros(256, np.float32), 10)
    with pytest.raises(GGFlatError, match="NaN or Inf"):
        qf.quantize(np.full(256, np.inf, np.float32), 12)
    with pytest.raises(GGFlatError, match="at least one dimension"):
        qf.quantize(np.float32(1.0), 1)
    with pytest.raises(UnknownTypeError):
        qf.quantize(np.zeros(32, np.float32), 16)


# ---------------------------------------------------------------------------------------------
# the real models: a few tensors of every type present, against gguf.quants

def _tensor_table(path) -> tuple[np.memmap, list[tuple[str, int, tuple[int, ...], int]]]:
    """Minimal GGUF v3 walk: (name, type, NumPy shape, absolute offset) per tensor.

    gguf.GGUFReader needs ~10 s for gemma-3's 262k-token vocabulary; we only skip it.
    """
    data = np.memmap(path, dtype=np.uint8, mode="r")
    buf = memoryview(data)
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v[0] if len(v) == 1 else v

    def string():
        nonlocal pos
        n = take("<Q")
        s = bytes(buf[pos:pos + n])
        pos += n
        return s

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def skip_value(vtype):
        nonlocal pos
        if vtype == 8:
            string()
        elif vtype == 9:
            etype, n = take("<IQ")
            if etype == 8:
                for _ in range(n):
                    string()
            else:
                pos += sizes[etype] * n
        else:
            pos += sizes[vtype]

    magic, version, n_tensors, n_kv = take("<4sIQQ")
    assert magic == b"GGUF" and version == 3
    alignment = 32
    for _ in range(n_kv):
        key = string()
        vtype = take("<I")
        if key == b"general.alignment":
            alignment = take("<I")
        else:
            skip_value(vtype)
    infos = []
    for _ in range(n_tensors):
        name = string().decode()
        n_dims = take("<I")
        ne = [take("<Q") for _ in range(n_dims)]
        ttype, offset = take("<IQ")
        infos.append((name, ttype, tuple(reversed(ne)), offset))
    base = (pos + alignment - 1) // alignment * alignment
    return data, [(n, t, s, base + o) for n, t, s, o in infos]


def _check_model(path, expect_types):
    data, infos = _tensor_table(path)
    by_type: dict[int, list] = {}
    for info in infos:
        by_type.setdefault(info[1], []).append(info)
    assert {FORMATS[t].name for t in by_type} == expect_types
    for tid, infos_t in by_type.items():
        for name, _, shape, off in infos_t[:3]:
            rows = min(shape[0], 64) if len(shape) > 1 else shape[0]
            sub = (rows, *shape[1:]) if len(shape) > 1 else shape
            raw = data[off:off + qf.tensor_nbytes(tid, sub)]
            ours = qf.dequantize(raw, tid, sub)
            assert same_bits(ours, gguf_dequant(np.asarray(raw), tid, sub)), name
            assert np.isfinite(ours).all(), name


def test_smollm2_tensors(smollm2_path):
    _check_model(smollm2_path, {"F32", "Q4_1", "Q8_0"})


def test_gemma3_tensors(gemma3_path):
    _check_model(gemma3_path, {"F32", "Q8_0", "Q5_0", "Q4_K", "Q6_K"})
