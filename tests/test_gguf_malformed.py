"""Hostile and broken GGUF files (DESIGN.md §4): each one must give a one-line
GGUFError naming what is wrong and where, in bounded time and memory, both
in-process and through the CLI (``ggflat inspect`` and ``ggflat tokenize``).

Each case is (id, maker, match): ``maker(tmp_path) -> path`` and ``match`` a
regex the error message must contain, so we know the intended check fired and
not some later, accidental one.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from engine.errors import GGUFError
from engine.gguf_file import GGUFFile
from tests.gguf_builder import (GGUFBuilder, Tensor, gstr, i32, kv, kv_array, u32, u64)

T = __import__("gguf").GGUFValueType
F32, F16, Q8_0 = 0, 1, 8
REPO = Path(__file__).resolve().parent.parent
HAVE_TOKENIZE = importlib.util.find_spec("cli.tokenize_cmd") is not None
CLI_TIMEOUT_S = 5.0


def base(**kw) -> GGUFBuilder:
    """A valid file; cases change one thing."""
    args = dict(
        kvs=[kv("general.architecture", T.STRING, "llama"),
             kv("llama.block_count", T.UINT32, 2),
             kv_array("tokenizer.ggml.tokens", T.STRING, ["alpha", "beta", "gamma"]),
             kv_array("tokenizer.ggml.scores", T.FLOAT32, [0.0, 1.0, 2.0])],
        tensors=[Tensor("weight_a", (32, 2)), Tensor("weight_q", (64,), Q8_0)])
    args.update(kw)
    return GGUFBuilder(**args)


VALID = base().build()
NO_TENSORS = base(tensors=[]).build()


def _at(marker: bytes, delta: int = 0) -> int:
    return VALID.index(marker) + delta


def raw(data: bytes):
    def make(tmp: Path) -> Path:
        p = tmp / "bad.gguf"
        p.write_bytes(data)
        return p
    return make


def built(**kw):
    return lambda tmp: raw(base(**kw).build())(tmp)


def with_kvs(*extra: bytes, replace: bool = False):
    kvs = list(extra) if replace else base().kvs + list(extra)
    return built(kvs=kvs)


def with_tensors(*tensors: Tensor, **kw):
    return built(tensors=list(tensors), **kw)


def header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + u32(version) + u64(n_tensors) + u64(n_kv)


def patched(offset: int, new: bytes):
    return raw(VALID[:offset] + new + VALID[offset + len(new):])


def special(path: str):
    return lambda tmp: Path(path)


def fifo(tmp: Path) -> Path:
    p = tmp / "fifo.gguf"
    os.mkfifo(p)
    return p


def symlink_to_dev_zero(tmp: Path) -> Path:
    p = tmp / "zero.gguf"
    p.symlink_to("/dev/zero")
    return p


BIG = 1 << 62
TOKENS_LEN_AT = _at(b"tokenizer.ggml.tokens", len("tokenizer.ggml.tokens") + 8)  # u64 array length
BETA_LEN_AT = _at(b"beta", -8)
TENSOR_A_NDIMS_AT = _at(b"weight_a", 8)

CASES = [
    # --- not a GGUF file at all
    ("empty-file", raw(b""), r"empty file"),
    ("bad-magic", patched(0, b"GGUG"), r"bad magic"),
    ("text-file", raw(b"hello, world\n" * 4), r"bad magic"),
    ("directory", lambda tmp: tmp, r"is a directory"),
    ("fifo", fifo, r"not a regular file \(a FIFO\)"),
    ("dev-zero", special("/dev/zero"), r"not a regular file \(a character device\)"),
    ("symlink-to-dev-zero", symlink_to_dev_zero, r"character device"),
    ("missing-file", lambda tmp: tmp / "missing.gguf", r"^no such file"),
    # --- truncations at several points
    ("trunc-in-magic", raw(b"GGU"), r"truncated file: 3 bytes"),
    ("trunc-in-header", raw(VALID[:10]), r"truncated file: 10 bytes"),
    ("trunc-in-key", raw(NO_TENSORS[:NO_TENSORS.index(b"llama.block_count") + 5]), r"key #1: string length 17"),
    ("trunc-counts-too-big", raw(VALID[:_at(b"llama.block_count", 5)]), r"tensor count 2 is impossible"),
    ("trunc-in-string-array", raw(VALID[:_at(b"beta", 2)]), r"key 'tokenizer.ggml.tokens'"),
    ("trunc-in-float-array", raw(VALID[:_at(b"tokenizer.ggml.scores", 40)]), r"tokenizer.ggml.scores"),
    ("trunc-in-tensor-info", raw(VALID[:TENSOR_A_NDIMS_AT + 2]), r"truncated file: tensor 'weight_a' n_dims"),
    ("trunc-in-padding", raw(VALID[:_at(b"weight_q") + 40]), r"data section would start"),
    ("trunc-in-data", raw(VALID[:-5]), r"tensor 'weight_q' data .* extends past the end"),
    # --- versions
    ("version-0", patched(4, u32(0)), r"unsupported GGUF version 0"),
    ("version-1", patched(4, u32(1)), r"version 1 is no longer supported"),
    ("version-4", patched(4, u32(4)), r"unsupported GGUF version 4"),
    ("version-big-endian", patched(4, u32(3 << 24)), r"big-endian"),
    # --- counts
    ("absurd-tensor-count", patched(8, u64(2**63)), r"tensor count \d+ is impossible"),
    ("absurd-kv-count", patched(16, u64(2**64 - 1)), r"key/value count \d+ is impossible"),
    ("kv-count-plus-one", patched(16, u64(5)), r"tensor #0 name: string length \d+ at byte"),
    ("many-kv-tiny-file", raw(header(0, 10**6) + b"\0" * 64), r"key/value count 1000000 is impossible"),
    # --- strings and arrays
    ("absurd-key-length", raw(header(0, 1) + gstr(b"k", BIG) + b"x" * 32), r"key #0: string length \d+ at byte 24"),
    ("absurd-string-value-length", with_kvs(gstr("k") + i32(T.STRING) + gstr(b"v", BIG)), r"value of key 'k': string length"),
    ("absurd-numeric-array-length", patched(_at(b"tokenizer.ggml.scores", 21 + 4 + 4), u64(2**29)), r"tokenizer.ggml.scores.*array of \d+ FLOAT32"),
    ("absurd-string-array-length", patched(TOKENS_LEN_AT, u64(2**29)), r"array of \d+ strings .* cannot fit"),
    ("array-longer-than-limit", patched(TOKENS_LEN_AT, u64(2**31)), r"exceeds the limit"),
    ("absurd-string-in-array", patched(BETA_LEN_AT, u64(BIG)), r"element 1 has string length"),
    ("unknown-value-type", with_kvs(gstr("k") + i32(13) + u32(0)), r"key 'k' type|unknown value type 13"),
    ("negative-value-type", with_kvs(gstr("k") + i32(-1) + u32(0)), r"unknown value type -1"),
    ("unknown-array-element-type", with_kvs(gstr("k") + i32(T.ARRAY) + i32(99) + u64(1) + u32(0)), r"unknown value type 99"),
    ("nested-array", with_kvs(gstr("k") + i32(T.ARRAY) + i32(T.ARRAY) + u64(1) + i32(T.UINT8) + u64(1) + b"\1"), r"nested arrays"),
    ("deeply-nested-array", with_kvs(gstr("k") + (i32(T.ARRAY) * 2 + u64(1)) * 1000), r"nested arrays"),
    ("empty-key", with_kvs(kv("", T.UINT32, 1)), r"key #4 at byte \d+ is empty"),
    ("duplicate-key", with_kvs(kv("llama.block_count", T.UINT32, 3)), r"duplicate key 'llama.block_count'"),
    ("invalid-utf8-key", with_kvs(kv(b"bad\xff", T.UINT32, 1)), r"key #4: invalid UTF-8"),
    ("invalid-utf8-value", with_kvs(kv("k", T.STRING, b"\x04\0\0\0\0\0\0\0\xc3\x28ab")), r"value of key 'k': invalid UTF-8"),
    ("invalid-utf8-in-string-array", patched(_at(b"beta"), b"b\xedt"), r"element 1 is not valid UTF-8"),
    ("surrogate-utf8", with_kvs(kv("k", T.STRING, gstr(b"\xed\xa0\x80"))), r"invalid UTF-8"),
    # --- alignment
    ("alignment-0", with_kvs(kv("general.alignment", T.UINT32, 0)), r"alignment 0 is not a power of two"),
    ("alignment-3", with_kvs(kv("general.alignment", T.UINT32, 3)), r"alignment 3 is not a power of two"),
    ("alignment-2^31", with_kvs(kv("general.alignment", T.UINT32, 2**31)), r"alignment 2147483648 exceeds the limit"),
    ("alignment-u64", with_kvs(kv("general.alignment", T.UINT64, 32)), r"must be UINT32, not UINT64"),
    ("alignment-string", with_kvs(kv("general.alignment", T.STRING, "32")), r"must be UINT32, not STRING"),
    ("alignment-array", with_kvs(kv_array("general.alignment", T.UINT32, [32])), r"must be UINT32, not array"),
    # --- tensor infos
    ("duplicate-tensor-name", with_tensors(Tensor("w", (32,)), Tensor("w", (32,))), r"duplicate tensor name 'w'"),
    ("tensor-name-64-bytes", with_tensors(Tensor("n" * 64, (32,))), r"is 64 bytes, names must be shorter than 64"),
    ("tensor-name-empty", with_tensors(Tensor("", (32,))), r"tensor #0 at byte \d+ has an empty name"),
    ("tensor-name-invalid-utf8", with_tensors(Tensor(b"w\xfe", (32,))), r"tensor #0 name: invalid UTF-8"),
    ("n-dims-0", with_tensors(Tensor("w", (), n_dims=0), data=b"\0" * 64), r"tensor 'w' has 0 dimensions"),
    ("n-dims-5", with_tensors(Tensor("w", (1, 1, 1, 1, 1))), r"tensor 'w' has 5 dimensions"),
    ("n-dims-huge", with_tensors(Tensor("w", (32,), n_dims=2**32 - 1)), r"has 4294967295 dimensions"),
    ("dim-0", with_tensors(Tensor("w", (32, 0)), data=b"\0" * 64), r"dimension 1 is 0"),
    ("dim-over-int64", with_tensors(Tensor("w", (2**64 - 1,)), data=b"\0" * 64), r"dimension 0 is 18446744073709551615"),
    ("dims-overflow-2^62x2^62", with_tensors(Tensor("w", (2**62, 2**62)), data=b"\0" * 64), r"overflowing int64"),
    ("tensor-bigger-than-file", with_tensors(Tensor("w", (2**20, 2**20)), data=b"\0" * 64), r"more than the whole file"),
    ("ne0-not-block-multiple", with_tensors(Tensor("w", (33, 2), Q8_0), data=b"\0" * 128), r"33 elements per row, not a multiple of the block size 32"),
    ("unknown-ggml-type-4", with_tensors(Tensor("w", (32,), 4)), r"tensor 'w' has unknown ggml type 4"),
    ("unknown-ggml-type-9999", with_tensors(Tensor("w", (32,), 9999)), r"unknown ggml type 9999"),
    ("negative-ggml-type", with_tensors(Tensor("w", (32,), -1)), r"unknown ggml type -1"),
    # --- tensor placement
    ("misaligned-offset", with_tensors(Tensor("w", (32,), offset=4), data=b"\0" * 256), r"offset 4 is not a multiple of the alignment 32"),
    ("overlapping-tensors", with_tensors(Tensor("a", (32,), offset=0), Tensor("b", (32,), offset=64)), r"tensor 'b' at byte \d+ overlaps tensor 'a'"),
    ("same-offset-tensors", with_tensors(Tensor("a", (8,), offset=0), Tensor("b", (8,), offset=0)), r"overlaps"),
    ("offset-out-of-file", with_tensors(Tensor("w", (32,), offset=1 << 20), data=b"\0" * 128), r"extends past the end of the file"),
    ("offset-2^64-1", with_tensors(Tensor("w", (32,), offset=2**64 - 32), data=b"\0" * 128), r"extends past the end"),
]
IDS = [c[0] for c in CASES]


@pytest.fixture
def case_path(request, tmp_path):
    _id, make, _match = request.param
    return make(tmp_path)


def _error(path) -> str:
    with pytest.raises(GGUFError) as e:
        GGUFFile(path)
    return str(e.value)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_in_process(case, tmp_path):
    _id, make, match = case
    path = make(tmp_path)
    t0 = time.perf_counter()
    msg = _error(path)
    assert time.perf_counter() - t0 < 1.0
    assert "\n" not in msg
    assert msg.endswith(f"({path})"), msg
    assert re.search(match, msg), msg


# Small files only: the bound is the brief's "never allocate more than the file".
MEMORY_FLOOR = 64 * 1024
MEMORY_SLACK = 16 * 1024


def test_memory_bounded(tmp_path):
    _error(tmp_path / "warm-up-missing")  # first-use caches out of the measurement
    GGUFFile(raw(VALID)(tmp_path)).close()
    peaks = {}
    for i, (cid, make, _match) in enumerate(CASES):
        d = tmp_path / f"m{i}"
        d.mkdir()
        path = make(d)
        size = path.stat().st_size if path.is_file() else 0
        tracemalloc.start()
        try:
            try:
                GGUFFile(path)
            except GGUFError:
                pass
            _cur, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        peaks[cid] = peak
        assert peak <= max(size, MEMORY_FLOOR) + MEMORY_SLACK, (cid, size, peak)


def test_every_truncation_fails():
    # Cutting the valid file anywhere gives a GGUFError (it has tensors, so even a
    # cut in the last tensor's bytes is detected).
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "t.gguf"
        for n in range(len(VALID)):
            p.write_bytes(VALID[:n])
            with pytest.raises(GGUFError):
                GGUFFile(p)
        p.write_bytes(VALID)
        GGUFFile(p).close()


def test_base_is_valid(tmp_path):
    with GGUFFile(raw(VALID)(tmp_path)) as gf:
        assert gf.metadata["tokenizer.ggml.tokens"] == ["alpha", "beta", "gamma"]
        assert list(gf.tensors) == ["weight_a", "weight_q"]


def test_nul_in_path():
    assert _error("bad\0name.gguf").startswith("invalid file name")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read anything")
def test_permission_denied(tmp_path):
    p = raw(VALID)(tmp_path)
    p.chmod(0)
    assert "permission denied" in _error(p)


# ---------------------------------------------------------------- through the CLI

def run_cli(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), GGFLAT_VERBOSE="0")
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=REPO, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace")


def finish(proc: subprocess.Popen, t0: float) -> tuple[int, str, str, float]:
    try:
        out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{proc.args} did not finish within {CLI_TIMEOUT_S} s")
    return proc.returncode, out, err, time.perf_counter() - t0


def assert_one_line_error(result, what: str) -> None:
    rc, _out, err, elapsed = result
    assert rc == 1, (what, rc, err)
    assert "Traceback" not in err, (what, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (what, err)
    # A GGFlatError, not an exception that main() had to catch as a bug.
    assert "internal error" not in err, (what, err)
    assert elapsed < CLI_TIMEOUT_S, (what, elapsed)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cli(case, tmp_path):
    """`ggflat inspect F` and `ggflat tokenize -m F -p hi`, run side by side."""
    _id, make, _match = case
    path = str(make(tmp_path))
    t0 = time.perf_counter()
    inspect = run_cli(["inspect", path])
    tokenize = run_cli(["tokenize", "-m", path, "-p", "hi"])
    r_inspect = finish(inspect, t0)
    r_tokenize = finish(tokenize, t0)
    assert_one_line_error(r_inspect, "inspect")
    if not HAVE_TOKENIZE:
        # cli/tokenize_cmd.py is being written; this case checks it once it lands.
        pytest.xfail("cli/tokenize_cmd.py not there yet (inspect part passed)")
    assert_one_line_error(r_tokenize, "tokenize")
