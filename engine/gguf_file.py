"""A validated, read-only GGUF reader (DESIGN.md §4 "Trust").

A GGUF file is a header followed by a data section::

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv      x  key: str | value type i32 | value            (str = u64 length + UTF-8 bytes)
    n_tensors x  name: str | n_dims u32 | ne[n_dims] u64 | ggml type i32 | offset u64
    padding to `general.alignment` (default 32)
    data section: tensor bytes, each at data_offset + offset

Everything is little-endian. We treat every file as hostile: nothing read from
the file is used as a size, count or offset before it has been checked against
the bytes that are actually there, so a lying header costs at most O(file size)
memory and time. llama.cpp's ``ggml/src/gguf.cpp`` (``gguf_init_from_reader``)
is the model; where we are stricter than it, the comment says so.

gguf-py's ``GGUFReader`` is fine for files we wrote ourselves (the tests use it
as a cross-check) but not for untrusted ones, see DESIGN.md §4.

Shapes: ``TensorInfo.ne`` is ggml order (ne[0] = the contiguous row length);
``TensorInfo.shape`` is NumPy order, i.e. ``tuple(reversed(ne))``.
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from engine.errors import GGUFError, UnknownTypeError

__all__ = ["GGUFFile", "TensorInfo", "GGUFValueType", "UnknownGGMLTypeError",
           "GGUF_MAGIC", "MAX_ALIGNMENT", "MAX_NAME_BYTES", "MAX_DIMS"]

GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
# gguf.cpp: GGML_MAX_NAME is 64 including the NUL terminator, so names must be < 64 bytes.
MAX_NAME_BYTES = 64
# gguf.cpp: GGML_MAX_DIMS.
MAX_DIMS = 4
# gguf.cpp caps strings and arrays at 1 GiB (GGUF_MAX_STRING_LENGTH / GGUF_MAX_ARRAY_ELEMENTS);
# the remaining-bytes checks are usually stronger, these keep parity on huge files.
MAX_STRING_BYTES = 1 << 30
MAX_ARRAY_ELEMENTS = 1 << 30
# gguf.cpp only requires a power of two. We also cap it: alignment exists so that
# mmapped tensors suit SIMD loads (32 is the default) or page-granular I/O (4 KiB,
# 64 KiB pages on some arm64 kernels). 1 MiB is 16x the largest page size anyone
# aligns GGUF data to, yet small enough that padding can never be a meaningful
# share of a model file; anything bigger is a corrupt or hostile header.
MAX_ALIGNMENT = 1 << 20
INT64_MAX = (1 << 63) - 1
# Fixed part of the header: magic, version, n_tensors, n_kv.
HEADER_BYTES = 4 + 4 + 8 + 8
# Smallest possible encodings, used to bound the counts before looping over them:
# a KV pair is key (u64 length + >= 1 byte) + type i32 + smallest value (1 byte);
# a tensor info is name (u64 + >= 1 byte) + n_dims u32 + >= 1 dim u64 + type i32 + offset u64.
MIN_KV_BYTES = 8 + 1 + 4 + 1
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8

# Scalar value types: struct format (little-endian) and byte size.
_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<B",
}
_SCALAR_STRUCTS = {t: struct.Struct(f) for t, f in _SCALAR_FORMATS.items()}
# Numeric array element types -> NumPy dtype (explicitly little-endian).
_ARRAY_DTYPES: dict[GGUFValueType, np.dtype] = {
    t: np.dtype(f) for t, f in _SCALAR_FORMATS.items() if t != GGUFValueType.BOOL}
_ARRAY_DTYPES[GGUFValueType.BOOL] = np.dtype("u1")  # converted with != 0 below

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_KNOWN_VALUE_TYPES = {int(t): t for t in GGUFValueType}
_KNOWN_GGML_TYPES = {int(t): t for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}


class UnknownGGMLTypeError(GGUFError, UnknownTypeError):
    """A tensor's ggml type id is not one gguf-py knows; catchable as either parent."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file, already validated against it."""
    name: str
    ggml_type: int
    ne: tuple[int, ...]      # ggml order: ne[0] is the contiguous (row) dimension
    shape: tuple[int, ...]   # NumPy order: reversed(ne)
    offset: int              # absolute byte offset in the file
    nbytes: int
    n_elements: int

    @property
    def type_name(self) -> str:
        t = _KNOWN_GGML_TYPES.get(self.ggml_type)
        return t.name if t is not None else f"type{self.ggml_type}"


class _Cursor:
    """Bounds-checked little-endian reads from the header; every failure is a GGUFError."""

    def __init__(self, buf: memoryview, end: int, path: str) -> None:
        self.buf = buf
        self.pos = 0
        self.end = end
        self.path = path

    def fail(self, msg: str) -> NoReturn:
        raise GGUFError(f"{msg} ({self.path})")

    @property
    def left(self) -> int:
        return self.end - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.end - self.pos:
            self.fail(f"truncated file: {what} at byte {self.pos} needs {n} bytes, "
                      f"only {self.end - self.pos} left")

    def unpack(self, s: struct.Struct, what: str) -> Any:
        self.need(s.size, what)
        (v,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return v

    def u32(self, what: str) -> int:
        return self.unpack(_U32, what)

    def i32(self, what: str) -> int:
        return self.unpack(_I32, what)

    def u64(self, what: str) -> int:
        return self.unpack(_U64, what)

    def string(self, what: str) -> str:
        start = self.pos
        n = self.u64(f"length of {what}")
        if n > MAX_STRING_BYTES or n > self.left:
            self.fail(f"{what}: string length {n} at byte {start} exceeds the "
                      f"{self.left} bytes left in the file")
        raw = self.buf[self.pos:self.pos + n]
        try:
            s = str(raw, "utf-8")
        except UnicodeDecodeError as e:
            self.fail(f"{what}: invalid UTF-8 at byte {self.pos + e.start}")
        self.pos += n
        return s

    def string_array(self, n: int, what: str) -> list[str]:
        # Each element is a u64 length + bytes, so n strings need >= 8n bytes;
        # checking that first bounds the list we build by the file size.
        if n * 8 > self.left:
            self.fail(f"{what}: array of {n} strings at byte {self.pos} cannot fit in the "
                      f"{self.left} bytes left in the file")
        # The hot loop of the whole parser (Gemma-3 has 262,144 tokens): locals only.
        buf, pos, end = self.buf, self.pos, self.end
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        try:
            for _ in range(n):
                if pos + 8 > end:
                    break
                (ln,) = unpack(buf, pos)
                pos += 8
                if ln > end - pos:
                    self.pos = pos - 8
                    self.fail(f"{what}: element {len(out)} has string length {ln} at byte "
                              f"{pos - 8}, exceeding the {end - pos} bytes left in the file")
                append(str(buf[pos:pos + ln], "utf-8"))
                pos += ln
        except UnicodeDecodeError as e:
            self.fail(f"{what}: element {len(out)} is not valid UTF-8 "
                      f"(byte {pos + e.start})")
        if len(out) != n:
            self.pos = pos
            self.need(8, f"{what} element {len(out)}")
        self.pos = pos
        return out

    def numeric_array(self, vtype: GGUFValueType, n: int, what: str) -> np.ndarray:
        dt = _ARRAY_DTYPES[vtype]
        if n * dt.itemsize > self.left:
            self.fail(f"{what}: array of {n} {vtype.name} at byte {self.pos} needs "
                      f"{n * dt.itemsize} bytes, only {self.left} left in the file")
        view = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos)
        # A copy (not a view into the mmap) so metadata outlives close();
        # these arrays are small next to the tensors. Native byte order for users.
        arr = (view != 0) if vtype == GGUFValueType.BOOL else view.astype(dt.newbyteorder("="))
        arr.setflags(write=False)
        self.pos += n * dt.itemsize
        return arr


class GGUFFile:
    """A GGUF file, opened read-only and memory-mapped, validated before use.

    Raises GGUFError("<what> (<path>)") for anything that is not a well-formed
    GGUF v2/v3 file. See the module docstring for the layout.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path: str = os.fspath(path)
        if isinstance(self.path, bytes):
            self.path = os.fsdecode(self.path)
        self._mm: mmap.mmap | None = None
        self.version = 0
        self.alignment = GGUF_DEFAULT_ALIGNMENT
        self.data_offset = 0
        self.file_size = 0
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._mm = self._open()
        buf = memoryview(self._mm)
        try:
            self._parse(_Cursor(buf, self.file_size, self.path))
        except BaseException:
            self.close()
            raise
        finally:
            try:
                buf.release()
            except BufferError:  # a traceback still holds a view; GC will release it
                pass

    # ---------------------------------------------------------------- open

    def _fail(self, msg: str) -> NoReturn:
        raise GGUFError(f"{msg} ({self.path})")

    def _open(self) -> mmap.mmap:
        # stat first: opening a FIFO for reading blocks until a writer shows up,
        # and /dev/zero or a directory would "read" forever or not at all.
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._fail("no such file")
        except NotADirectoryError:
            self._fail("no such file (a parent is not a directory)")
        except PermissionError:
            self._fail("permission denied")
        except OSError as e:
            self._fail(f"cannot stat file: {e.strerror or e}")
        except ValueError:  # e.g. an embedded NUL byte
            self._fail("invalid file name")
        self._check_regular(st.st_mode)
        # O_NONBLOCK too: if the path is swapped for a FIFO after the stat, the
        # open still returns at once and the fstat below refuses it.
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) \
            | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            self._fail("no such file")
        except PermissionError:
            self._fail("permission denied")
        except OSError as e:
            self._fail(f"cannot open file: {e.strerror or e}")
        try:
            st = os.fstat(fd)
            self._check_regular(st.st_mode)
            self.file_size = size = st.st_size
            if size == 0:
                self._fail("empty file, not a GGUF file")
            try:
                # mmap dups the descriptor, so ours can be closed right away.
                return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                self._fail(f"cannot map file: {getattr(e, 'strerror', None) or e}")
        finally:
            os.close(fd)

    def _check_regular(self, mode: int) -> None:
        if stat.S_ISREG(mode):
            return
        if stat.S_ISDIR(mode):
            self._fail("is a directory, not a GGUF file")
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
                else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a special file")
        self._fail(f"not a regular file ({kind}), not a GGUF file")

    # ---------------------------------------------------------------- parse

    def _parse(self, c: _Cursor) -> None:
        size = self.file_size
        # Magic first, so "hello" gives "not a GGUF file" rather than "truncated".
        magic = bytes(c.buf[:4])  # fewer than 4 bytes if the file is that short
        if magic != GGUF_MAGIC[:len(magic)]:
            c.fail(f"not a GGUF file: bad magic {magic!r} (expected b'GGUF')")
        if size < HEADER_BYTES:
            c.fail(f"truncated file: {size} bytes, a GGUF header needs at least {HEADER_BYTES}")
        c.pos = 4

        version = c.u32("version")
        # gguf.cpp: a version whose low 16 bits are zero is most likely a
        # big-endian file read on a little-endian host (3 reads as 0x03000000).
        if version != 0 and version & 0xFFFF == 0:
            c.fail(f"unsupported GGUF version {version:#x}: the file looks big-endian, "
                   "only little-endian files are supported")
        if version == 1:
            c.fail("GGUF version 1 is no longer supported (re-convert the model)")
        if version not in (2, 3):
            c.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
        self.version = version

        n_tensors = c.u64("tensor count")
        n_kv = c.u64("metadata key/value count")
        # Bound the counts by what the remaining bytes could possibly hold before
        # looping over them (gguf.cpp only bounds them by SIZE_MAX / sizeof(struct)).
        if n_tensors * MIN_TENSOR_INFO_BYTES > c.left:
            c.fail(f"tensor count {n_tensors} is impossible: {n_tensors} tensor infos need at "
                   f"least {n_tensors * MIN_TENSOR_INFO_BYTES} bytes, the file has {c.left} left")
        if n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES > c.left:
            c.fail(f"metadata key/value count {n_kv} is impossible: {n_kv} pairs and {n_tensors} "
                   f"tensor infos need at least "
                   f"{n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES} bytes, "
                   f"the file has {c.left} left")

        for i in range(n_kv):
            self._read_kv(c, i)
        self.alignment = self._alignment(c)

        seen: set[str] = set()
        infos = [self._read_tensor_info(c, i, seen) for i in range(n_tensors)]

        # gguf.cpp: the data section starts at the end of the header padded to the alignment.
        header_end = c.pos
        self.data_offset = _pad(header_end, self.alignment)
        if n_tensors and self.data_offset > size:
            c.fail(f"truncated file: the data section would start at byte {self.data_offset} "
                   f"(header ends at {header_end}, alignment {self.alignment}) but the file "
                   f"has {size} bytes")
        self._place_tensors(c, infos)

    def _read_kv(self, c: _Cursor, i: int) -> None:
        key_pos = c.pos
        key = c.string(f"key #{i}")
        if not key:
            c.fail(f"key #{i} at byte {key_pos} is empty")
        if key in self.metadata:
            c.fail(f"duplicate key {key!r} at byte {key_pos}")
        what = f"key {key!r}"
        vtype = self._value_type(c, what)
        if vtype == GGUFValueType.ARRAY:
            etype = self._value_type(c, f"{what} array element")
            if etype == GGUFValueType.ARRAY:
                # gguf.cpp refuses arrays of arrays; gguf-py would recurse without limit.
                c.fail(f"{what}: nested arrays are not supported (byte {c.pos - 4})")
            n = c.u64(f"{what} array length")
            if n > MAX_ARRAY_ELEMENTS:
                c.fail(f"{what}: array length {n} exceeds the limit of {MAX_ARRAY_ELEMENTS}")
            if etype == GGUFValueType.STRING:
                value: Any = c.string_array(n, what)
            else:
                value = c.numeric_array(etype, n, what)
            self.metadata_types[key] = (GGUFValueType.ARRAY, etype)
        else:
            if vtype == GGUFValueType.STRING:
                value = c.string(f"value of {what}")
            else:
                value = c.unpack(_SCALAR_STRUCTS[vtype], f"value of {what}")
                if vtype == GGUFValueType.BOOL:
                    value = value != 0  # gguf.cpp: any non-zero byte is true
            self.metadata_types[key] = (vtype, None)
        self.metadata[key] = value

    def _value_type(self, c: _Cursor, what: str) -> GGUFValueType:
        pos = c.pos
        t = c.i32(f"{what} type")
        vt = _KNOWN_VALUE_TYPES.get(t)
        if vt is None:
            c.fail(f"{what} has unknown value type {t} at byte {pos}")
        return vt

    def _alignment(self, c: _Cursor) -> int:
        if "general.alignment" not in self.metadata:
            return GGUF_DEFAULT_ALIGNMENT
        vtype, etype = self.metadata_types["general.alignment"]
        if vtype != GGUFValueType.UINT32:
            shown = f"array of {etype.name}" if etype is not None else vtype.name
            c.fail(f"key 'general.alignment' must be UINT32, not {shown}")
        a = self.metadata["general.alignment"]
        if a == 0 or a & (a - 1):
            c.fail(f"general.alignment {a} is not a power of two")
        if a > MAX_ALIGNMENT:
            c.fail(f"general.alignment {a} exceeds the limit of {MAX_ALIGNMENT}")
        return a

    def _read_tensor_info(self, c: _Cursor, i: int, seen: set[str]) -> tuple:
        """(name, type id, ne, n_elements, nbytes, relative offset), all checked but placement."""
        pos = c.pos
        name = c.string(f"tensor #{i} name")
        if not name:
            c.fail(f"tensor #{i} at byte {pos} has an empty name")
        if len(name.encode("utf-8")) >= MAX_NAME_BYTES:
            c.fail(f"tensor #{i} name {name[:32]!r}... is {len(name.encode('utf-8'))} bytes, "
                   f"names must be shorter than {MAX_NAME_BYTES}")
        if name in seen:
            c.fail(f"duplicate tensor name {name!r} at byte {pos}")
        what = f"tensor {name!r}"
        n_dims = c.u32(f"{what} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            c.fail(f"{what} has {n_dims} dimensions, must be 1..{MAX_DIMS}")
        ne = tuple(c.u64(f"{what} dimension {j}") for j in range(n_dims))
        # gguf.cpp allows empty (ne = 0) tensors; no model has one, so we refuse them,
        # which also keeps offsets strictly increasing below.
        n_elements = 1
        for j, d in enumerate(ne):
            if d < 1 or d > INT64_MAX:
                c.fail(f"{what} dimension {j} is {d}, must be in 1..{INT64_MAX}")
            n_elements *= d
        if n_elements > INT64_MAX:  # gguf.cpp: the element count must fit int64
            c.fail(f"{what} shape {list(ne)} has {n_elements} elements, overflowing int64")
        type_pos = c.pos
        type_id = c.i32(f"{what} type")
        qtype = _KNOWN_GGML_TYPES.get(type_id)
        if qtype is None:
            raise UnknownGGMLTypeError(f"{what} has unknown ggml type {type_id} "
                                       f"at byte {type_pos} ({self.path})")
        block, type_size = GGML_QUANT_SIZES[qtype]
        if ne[0] % block:
            c.fail(f"{what} of type {qtype.name} has {ne[0]} elements per row, "
                   f"not a multiple of the block size {block}")
        nbytes = n_elements // block * type_size
        if nbytes > self.file_size:  # cheap early bound; exact in-file check below
            c.fail(f"{what} shape {list(ne)} needs {nbytes} bytes, more than the "
                   f"whole file ({self.file_size})")
        offset = c.u64(f"{what} offset")
        seen.add(name)
        return name, int(qtype), ne, n_elements, nbytes, offset

    def _place_tensors(self, c: _Cursor, infos: list[tuple]) -> None:
        size, base, align = self.file_size, self.data_offset, self.alignment
        for name, type_id, ne, n_elements, nbytes, offset in infos:
            what = f"tensor {name!r}"
            if offset % align:
                c.fail(f"{what} offset {offset} is not a multiple of the alignment {align}")
            start = base + offset
            if start + nbytes > size:
                c.fail(f"{what} data [{start}, {start + nbytes}) extends past the end of "
                       f"the file ({size} bytes)")
            self.tensors[name] = TensorInfo(name=name, ggml_type=type_id, ne=ne,
                                            shape=tuple(reversed(ne)), offset=start,
                                            nbytes=nbytes, n_elements=n_elements)
        # gguf.cpp insists that tensors are packed in file order with exactly the
        # padding between them; we accept any order (other writers exist) but no
        # two tensors may share a byte.
        prev: TensorInfo | None = None
        for t in sorted(self.tensors.values(), key=lambda t: t.offset):
            if prev is not None and t.offset < prev.offset + prev.nbytes:
                c.fail(f"tensor {t.name!r} at byte {t.offset} overlaps tensor {prev.name!r} "
                       f"[{prev.offset}, {prev.offset + prev.nbytes})")
            prev = t

    # ---------------------------------------------------------------- API

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The tensor's raw bytes: a read-only uint8 view into the mmap (no copy)."""
        if self._mm is None:
            raise ValueError(f"GGUF file is closed ({self.path})")
        t = self.tensors[name]
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def close(self) -> None:
        mm, self._mm = self._mm, None
        if mm is None:
            return
        try:
            mm.close()
        except BufferError:
            # tensor_bytes() views are still alive; the map is unmapped when the last
            # one is garbage-collected (what numpy.memmap does too).
            pass

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({self.path!r}, version={self.version}, "
                f"tensors={len(self.tensors)}, kv={len(self.metadata)})")


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align
