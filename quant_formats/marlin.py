"""The tensor-core layout of 4-bit GGUF weights (after Marlin, arXiv 2408.11743): NumPy reference.

A GGUF matrix W of ``N`` rows (output features) and ``K`` columns (inputs) is stored by
ggml as rows of 32- or 256-element blocks. The Marlin GEMM (``ggml_py/cuda/marlin.cu``)
multiplies ``C = A @ W.T`` with ``mma.sync.m16n8k16`` and wants every thread of a warp to
find its B fragment in ONE 32-bit word. This module defines that layout, repacks GGUF
blocks into it (``repack``), turns it back into the same bytes (``unpack``, exact), and
dequantizes it (``dequantize``) -- the specification the CUDA repack and GEMM kernels are
checked against. The GPU repacks at load with its own kernel; this one is for tests.

Layout of one weight (one contiguous uint8 buffer, sections in this order, each 256-aligned):

* ``qw``: ``NT x KS x 32 x 4`` uint32, ``NT = ceil(N / 64)`` column tiles of 64 output
  features, ``KS = K / 16`` k-steps. Word ``j`` of lane ``t`` at (tile, step) holds the
  eight 4-bit codes that lane needs for the 16x16 (k x n) sub-tile ``j`` (columns
  ``16 j .. 16 j + 15`` of the tile): with ``c0 = 16 j + t // 4``, ``c1 = c0 + 8`` and
  ``k = 16 step + 2 (t % 4)``, nibble ``i`` (bits ``4i .. 4i + 3``) is

      i:  0      1       2      3       4        5        6        7
         (c0,k) (c0,k+8) (c1,k) (c1,k+8) (c0,k+1) (c0,k+9) (c1,k+1) (c1,k+9)

  so ``w & 0x000f000f`` is the f16x2 register ``{B[k][c0], B[k+1][c0]}`` after the
  ``0x6400`` exponent trick, ``w & 0x00f000f0`` its ``k + 8`` partner, and ``w >> 8`` the
  same for ``c1``. Columns past ``N`` hold code 0 with scale 0.
* per-column scales, "lane-permuted": inside a tile, column ``c`` sits at slot
  ``(c % 8) * 8 + (c // 16) * 2 + (c % 16) // 8`` so that lane ``t`` finds the eight columns
  it serves in the 16 bytes (f16) or 8 bytes (u8) of lane group ``t // 4``.

  - Q4_0: ``gs`` = ``NT x G x 64`` f16 (``d``), ``G = K / 32``; ``w = (q - 8) d``.
  - Q4_1: ``gs`` = ``NT x G x [64 d | 64 m]`` f16; ``w = q d + m``.
  - Q4_K: ``gs`` = ``NT x G x 8 x [8 sc | 8 m]`` u8 (the 6-bit sub-block scale and min of
    each 32-element group, per lane group), and ``ss`` = ``NT x (K / 256) x 8 x [8 d | 8 dmin]``
    f16; ``w = d sc q - dmin m``. (The 6-bit values are kept one per byte: 20 bytes a
    column per 256 weights instead of GGUF's 16, +2.8%, to spare the kernel the unpacking;
    ``unpack`` packs them back bit for bit.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .registry import get_format, tensor_nbytes

Q4_0, Q4_1, Q4_K = 2, 3, 12
TYPES = (Q4_0, Q4_1, Q4_K)
TILE_N = 64
GROUP = 32
ALIGN = 256

# lane t, word j, nibble i -> (column in tile, k offset in the 16-step)
_t = np.arange(32).reshape(32, 1, 1)
_j = np.arange(4).reshape(1, 4, 1)
_i = np.arange(8).reshape(1, 1, 8)
_COL = (_j * 16 + _t // 4 + 8 * ((_i % 4) // 2)).astype(np.intp)            # (32, 4, 8)
_KOF = (2 * (_t % 4) + (_i // 4) + 8 * (_i % 2)).astype(np.intp) + 0 * _j   # (32, 4, 8)
_SHIFT = (4 * np.arange(8, dtype=np.uint32))
# column c of a tile -> its lane-permuted slot
_SLOT = np.array([(c % 8) * 8 + (c // 16) * 2 + (c % 16) // 8 for c in range(TILE_N)], np.intp)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class MarlinLayout:
    """Section offsets and sizes (bytes) of one repacked weight."""
    ggml_type: int
    n: int
    k: int

    def __post_init__(self) -> None:
        if self.ggml_type not in TYPES:
            raise ValueError(f"Marlin layout: unsupported ggml type {self.ggml_type}")
        qk = 256 if self.ggml_type == Q4_K else GROUP
        if self.n < 1 or self.k < qk or self.k % qk:
            raise ValueError(f"Marlin layout: K={self.k} must be a positive multiple of {qk}, N={self.n} >= 1")

    @property
    def nt(self) -> int:
        return -(-self.n // TILE_N)

    @property
    def groups(self) -> int:
        return self.k // GROUP

    @property
    def superblocks(self) -> int:
        return self.k // 256

    @property
    def qw_bytes(self) -> int:
        return self.nt * (self.k // 16) * 512

    @property
    def gs_bytes(self) -> int:
        per = {Q4_0: 128, Q4_1: 256, Q4_K: 128}[self.ggml_type]
        return self.nt * self.groups * per

    @property
    def ss_bytes(self) -> int:
        return self.nt * self.superblocks * 256 if self.ggml_type == Q4_K else 0

    @property
    def gs_offset(self) -> int:
        return _align(self.qw_bytes)

    @property
    def ss_offset(self) -> int:
        return self.gs_offset + _align(self.gs_bytes)

    @property
    def nbytes(self) -> int:
        return self.ss_offset + _align(self.ss_bytes)


def _codes_and_scales(raw: np.ndarray, t: int, n: int, k: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """GGUF blocks -> codes (n, k) uint8 0..15 and per-group/superblock scale arrays."""
    fmt = get_format(t)
    blk = np.ascontiguousarray(raw).reshape(-1).view(fmt.np_dtype).reshape(n, -1)
    if t in (Q4_0, Q4_1):
        qs = blk["qs"]                                      # (n, nb, 16): low nibble j, high j + 16
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, k)
        sc = {"d": blk["d"].view(np.uint16)}
        if t == Q4_1:
            sc["m"] = blk["m"].view(np.uint16)
        return codes, sc
    qs = blk["qs"].reshape(n, -1, 4, 32)                     # (n, nb, chunk, 32): low = group 2c, high 2c+1
    codes = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, k)
    from .kquants import _scale_min_k4
    s12 = blk["scales"].reshape(-1, 12)
    scv, mnv = _scale_min_k4(s12)
    nb = k // 256
    return codes, {"d": blk["d"].view(np.uint16), "dmin": blk["dmin"].view(np.uint16),
                   "sc": scv.reshape(n, nb * 8), "m": mnv.reshape(n, nb * 8)}


def _pad_cols(a: np.ndarray, n_pad: int) -> np.ndarray:
    if a.shape[0] == n_pad:
        return a
    out = np.zeros((n_pad,) + a.shape[1:], a.dtype)
    out[:a.shape[0]] = a
    return out


def _permute(a: np.ndarray, nt: int) -> np.ndarray:
    """(n_pad, X) per column -> (nt, X, 64) in lane-permuted slot order."""
    a = a.reshape(nt, TILE_N, -1)
    out = np.empty_like(a)
    out[:, _SLOT, :] = a
    return out.transpose(0, 2, 1)


def _unpermute(a: np.ndarray, n_pad: int) -> np.ndarray:
    """Inverse of _permute: (nt, X, 64) -> (n_pad, X)."""
    a = a.transpose(0, 2, 1)
    return a[:, _SLOT, :].reshape(n_pad, -1)


def repack(raw: np.ndarray, ggml_type: int, shape: tuple[int, int]) -> np.ndarray:
    """GGUF blocks of a (N, K) matrix (NumPy order) -> the Marlin layout, uint8 (nbytes,)."""
    n, k = (int(d) for d in shape)
    lay = MarlinLayout(int(ggml_type), n, k)
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if raw.size != tensor_nbytes(lay.ggml_type, (n, k)):
        raise ValueError(f"Marlin repack: {raw.size} bytes for a {shape} tensor of type {ggml_type}")
    codes, sc = _codes_and_scales(raw, lay.ggml_type, n, k)
    nt, n_pad, ks = lay.nt, lay.nt * TILE_N, k // 16
    out = np.zeros(lay.nbytes, np.uint8)

    q = _pad_cols(codes, n_pad).reshape(nt, TILE_N, ks, 16).transpose(0, 2, 1, 3)   # (nt, ks, 64, 16)
    words = np.zeros((nt, ks, 32, 4), np.uint32)
    for i in range(8):
        words |= q[:, :, _COL[:, :, i], _KOF[:, :, i]].astype(np.uint32) << _SHIFT[i]
    out[:lay.qw_bytes] = words.reshape(-1).view(np.uint8)

    gs = out[lay.gs_offset:lay.gs_offset + lay.gs_bytes]
    if lay.ggml_type == Q4_0:
        gs.view(np.uint16)[:] = _permute(_pad_cols(sc["d"], n_pad), nt).reshape(-1)
    elif lay.ggml_type == Q4_1:
        d = _permute(_pad_cols(sc["d"], n_pad), nt)                    # (nt, G, 64)
        m = _permute(_pad_cols(sc["m"], n_pad), nt)
        gs.view(np.uint16)[:] = np.stack([d, m], axis=2).reshape(-1)
    else:
        s = _permute(_pad_cols(sc["sc"], n_pad), nt).reshape(nt, -1, 8, 8)   # (nt, G, lane group, 8)
        m = _permute(_pad_cols(sc["m"], n_pad), nt).reshape(nt, -1, 8, 8)
        gs[:] = np.stack([s, m], axis=3).reshape(-1)
        d = _permute(_pad_cols(sc["d"], n_pad), nt).reshape(nt, -1, 8, 8)    # (nt, SB, lane group, 8)
        dm = _permute(_pad_cols(sc["dmin"], n_pad), nt).reshape(nt, -1, 8, 8)
        out[lay.ss_offset:lay.ss_offset + lay.ss_bytes].view(np.uint16)[:] = np.stack([d, dm], axis=3).reshape(-1)
    return out


def _read(buf: np.ndarray, lay: MarlinLayout) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The Marlin layout -> codes (n_pad, k) and per-column scale arrays (n_pad, ...)."""
    buf = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
    if buf.size != lay.nbytes:
        raise ValueError(f"Marlin layout: {buf.size} bytes, expected {lay.nbytes}")
    nt, n_pad, k, ks = lay.nt, lay.nt * TILE_N, lay.k, lay.k // 16
    words = buf[:lay.qw_bytes].view(np.uint32).reshape(nt, ks, 32, 4)
    q = np.empty((nt, ks, TILE_N, 16), np.uint8)
    for i in range(8):
        q[:, :, _COL[:, :, i], _KOF[:, :, i]] = ((words >> _SHIFT[i]) & 0xF).astype(np.uint8)
    codes = q.transpose(0, 2, 1, 3).reshape(n_pad, k)
    gs = buf[lay.gs_offset:lay.gs_offset + lay.gs_bytes]
    if lay.ggml_type == Q4_0:
        return codes, {"d": _unpermute(gs.view(np.uint16).reshape(nt, -1, TILE_N), n_pad)}
    if lay.ggml_type == Q4_1:
        dm = gs.view(np.uint16).reshape(nt, -1, 2, TILE_N)
        return codes, {"d": _unpermute(dm[:, :, 0], n_pad), "m": _unpermute(dm[:, :, 1], n_pad)}
    sm = gs.reshape(nt, -1, 8, 2, 8)
    ss = buf[lay.ss_offset:lay.ss_offset + lay.ss_bytes].view(np.uint16).reshape(nt, -1, 8, 2, 8)
    return codes, {"sc": _unpermute(sm[:, :, :, 0].reshape(nt, -1, TILE_N), n_pad),
                   "m": _unpermute(sm[:, :, :, 1].reshape(nt, -1, TILE_N), n_pad),
                   "d": _unpermute(ss[:, :, :, 0].reshape(nt, -1, TILE_N), n_pad),
                   "dmin": _unpermute(ss[:, :, :, 1].reshape(nt, -1, TILE_N), n_pad)}


def unpack(buf: np.ndarray, ggml_type: int, shape: tuple[int, int]) -> np.ndarray:
    """The Marlin layout -> the original GGUF blocks, uint8 (N, row bytes); exact inverse of repack."""
    n, k = (int(d) for d in shape)
    lay = MarlinLayout(int(ggml_type), n, k)
    codes, sc = _read(buf, lay)
    codes = codes[:n]
    fmt = get_format(lay.ggml_type)
    nb = k // fmt.block_elems
    blk = np.zeros((n, nb), fmt.np_dtype)
    if lay.ggml_type in (Q4_0, Q4_1):
        c = codes.reshape(n, nb, 32)
        blk["qs"] = c[:, :, :16] | (c[:, :, 16:] << 4)
        blk["d"] = sc["d"][:n].view(np.float16)
        if lay.ggml_type == Q4_1:
            blk["m"] = sc["m"][:n].view(np.float16)
    else:
        c = codes.reshape(n, nb, 4, 2, 32)
        blk["qs"] = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).reshape(n, nb, 128)
        blk["d"] = sc["d"][:n].view(np.float16)
        blk["dmin"] = sc["dmin"][:n].view(np.float16)
        s = sc["sc"][:n].reshape(n, nb, 8).astype(np.uint8)
        m = sc["m"][:n].reshape(n, nb, 8).astype(np.uint8)
        p = np.empty((n, nb, 12), np.uint8)             # inverse of get_scale_min_k4
        p[:, :, 0:4] = (s[:, :, :4] & 63) | ((s[:, :, 4:] >> 4) << 6)
        p[:, :, 4:8] = (m[:, :, :4] & 63) | ((m[:, :, 4:] >> 4) << 6)
        p[:, :, 8:12] = (s[:, :, 4:] & 0x0F) | ((m[:, :, 4:] & 0x0F) << 4)
        blk["scales"] = p
    return blk.view(np.uint8).reshape(n, -1)


def dequantize(buf: np.ndarray, ggml_type: int, shape: tuple[int, int]) -> np.ndarray:
    """The Marlin layout -> float32 (N, K), equal to quant_formats.dequantize of the GGUF blocks."""
    n, k = (int(d) for d in shape)
    lay = MarlinLayout(int(ggml_type), n, k)
    codes, sc = _read(buf, lay)
    codes = codes[:n].astype(np.float32).reshape(n, -1, GROUP)
    f16 = lambda a: a[:n].view(np.float16).astype(np.float32)      # noqa: E731
    if lay.ggml_type == Q4_0:
        w = (codes - 8.0) * f16(sc["d"])[:, :, None]
    elif lay.ggml_type == Q4_1:
        w = codes * f16(sc["d"])[:, :, None] + f16(sc["m"])[:, :, None]
    else:
        d = np.repeat(f16(sc["d"]), 8, axis=1)
        dm = np.repeat(f16(sc["dmin"]), 8, axis=1)
        s = d * sc["sc"][:n].astype(np.float32)
        mm = dm * sc["m"][:n].astype(np.float32)
        w = codes * s[:, :, None] - mm[:, :, None]
    return np.ascontiguousarray(w.reshape(n, k), dtype=np.float32)


__all__ = ["MarlinLayout", "TYPES", "TILE_N", "GROUP", "repack", "unpack", "dequantize"]
