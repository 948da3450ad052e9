"""engine.gguf_file on valid files: the two reference models (cross-checked with
gguf-py's GGUFReader, which is safe on files we trust) and a small file written
by gguf.GGUFWriter; plus the output of ``ggflat inspect``."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from click.testing import CliRunner

from engine.errors import GGUFError, UnknownTypeError
from engine.gguf_file import GGUFFile, GGUFValueType, TensorInfo, UnknownGGMLTypeError
from tests.gguf_builder import GGUFBuilder, Tensor, kv, write_small_gguf

SMOLLM2_VOCAB = 49152
GEMMA3_VOCAB = 262144


# ---------------------------------------------------------------- reference models

def _reader_metadata(reader) -> dict:
    """GGUFReader's metadata as plain Python values, GGUF.* pseudo-fields dropped."""
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        out[name] = (field.types, field.contents())
    return out


@pytest.fixture(scope="module", params=[pytest.param("smollm2", marks=pytest.mark.slow),
                                        pytest.param("gemma3", marks=pytest.mark.slow)])
def model(request):
    """(GGUFFile, GGUFReader) for each reference model."""
    import gguf
    path = request.getfixturevalue(f"{request.param}_path")
    gf = GGUFFile(path)
    reader = gguf.GGUFReader(str(path))
    yield request.param, gf, reader
    gf.close()


def test_header(model):
    name, gf, reader = model
    assert gf.version == 3
    assert gf.alignment == reader.alignment == 32
    assert gf.data_offset == reader.data_offset
    assert gf.data_offset % gf.alignment == 0
    assert gf.file_size == len(reader.data)
    assert gf.architecture == {"smollm2": "llama", "gemma3": "gemma3"}[name]


def test_metadata_matches_gguf_reader(model):
    _, gf, reader = model
    ref = _reader_metadata(reader)
    assert list(gf.metadata) == list(ref)  # same keys, file order
    for key, (types, value) in ref.items():
        vtype, etype = gf.metadata_types[key]
        assert vtype == types[0], key
        ours = gf.metadata[key]
        if vtype == GGUFValueType.ARRAY:
            assert etype == types[-1], key
            if etype == GGUFValueType.STRING:
                assert isinstance(ours, list) and ours == value, key
            else:
                assert isinstance(ours, np.ndarray) and not ours.flags.writeable, key
                np.testing.assert_array_equal(ours, np.asarray(value), err_msg=key)
        else:
            assert etype is None
            assert ours == value and type(ours) is type(value), key


def test_vocab(model):
    name, gf, _ = model
    tokens = gf.get("tokenizer.ggml.tokens")
    assert len(tokens) == {"smollm2": SMOLLM2_VOCAB, "gemma3": GEMMA3_VOCAB}[name]
    assert gf.get("no.such.key", 7) == 7
    tt = gf.metadata["tokenizer.ggml.token_type"]
    assert tt.dtype == np.int32 and tt.shape == (len(tokens),)


def test_tensors_match_gguf_reader(model):
    _, gf, reader = model
    assert [t.name for t in reader.tensors] == list(gf.tensors)
    for rt in reader.tensors:
        t = gf.tensors[rt.name]
        assert isinstance(t, TensorInfo)
        assert t.ggml_type == int(rt.tensor_type)
        assert t.type_name == rt.tensor_type.name
        assert t.ne == tuple(int(d) for d in rt.shape)
        assert t.shape == tuple(reversed(t.ne))
        assert t.n_elements == rt.n_elements
        assert t.nbytes == rt.n_bytes
        assert t.offset == rt.data_offset
        assert t.offset % gf.alignment == 0
        b = gf.tensor_bytes(rt.name)
        assert b.dtype == np.uint8 and b.shape == (t.nbytes,) and not b.flags.writeable
        assert np.array_equal(b, rt.data.reshape(-1).view(np.uint8)), rt.name


def test_types_present(model):
    name, gf, _ = model
    types = {t.type_name for t in gf.tensors.values()}
    if name == "smollm2":
        assert len(gf.tensors) == 272 and {"Q4_1", "F32"} <= types
    else:
        assert len(gf.tensors) == 236 and {"Q4_K", "F32"} <= types


@pytest.mark.slow
def test_gemma_parses_fast(gemma3_path):
    # 262,144 token strings plus float/int arrays: the whole header well under a second.
    t0 = time.perf_counter()
    with GGUFFile(gemma3_path) as gf:
        assert len(gf.metadata["tokenizer.ggml.tokens"]) == GEMMA3_VOCAB
    assert time.perf_counter() - t0 < 0.5


# ---------------------------------------------------------------- GGUFWriter round trip

@pytest.mark.parametrize("alignment", [None, 64, 4096])
def test_gguf_writer_round_trip(tmp_path, alignment):
    path = tmp_path / "small.gguf"
    written = write_small_gguf(path, alignment=alignment)
    with GGUFFile(path) as gf:
        assert gf.alignment == (alignment or 32)
        assert gf.data_offset % gf.alignment == 0
        md = dict(written["metadata"])
        if alignment is not None:
            md["general.alignment"] = alignment
        assert set(gf.metadata) == set(md)
        for key, value in md.items():
            ours = gf.metadata[key]
            if isinstance(ours, np.ndarray):
                np.testing.assert_array_equal(ours, np.asarray(value, dtype=ours.dtype), err_msg=key)
            else:
                assert ours == value, key
        assert gf.metadata_types["t.u64"] == (GGUFValueType.UINT64, None)
        assert gf.metadata_types["tokenizer.ggml.tokens"] == (GGUFValueType.ARRAY, GGUFValueType.STRING)
        assert gf.metadata["t.arr_u16"].dtype == np.uint16
        assert gf.metadata["t.arr_bool"].dtype == np.bool_
        assert gf.metadata["t.f32"] == 0.5 and type(gf.metadata["t.bool"]) is bool
        assert list(gf.tensors) == list(written["tensors"])
        for name, (ne, qtype, raw) in written["tensors"].items():
            t = gf.tensors[name]
            assert (t.ne, t.ggml_type, t.nbytes) == (ne, qtype, len(raw))
            assert gf.tensor_bytes(name).tobytes() == raw
        assert gf.tensors["blk.1.x"].shape == (2, 3, 5)
        assert gf.tensors["blk.0.ffn_up.weight"].type_name == "Q8_0"


def test_close_and_views(tmp_path):
    path = tmp_path / "small.gguf"
    write_small_gguf(path)
    gf = GGUFFile(str(path))
    view = gf.tensor_bytes("token_embd.weight")
    tokens = gf.metadata["tokenizer.ggml.tokens"]
    scores = gf.metadata["tokenizer.ggml.scores"]
    gf.close()
    gf.close()  # idempotent
    # Views and metadata outlive close(): the map goes away with the last view.
    assert view.sum() is not None and tokens[5] == "🙂" and scores[2] == 2.25
    with pytest.raises(ValueError):
        gf.tensor_bytes("token_embd.weight")
    with pytest.raises(ValueError):
        scores[0] = 1.0  # metadata arrays are read-only
    with pytest.raises(KeyError):
        GGUFFile(path).tensor_bytes("nope")


def test_no_tensors_and_v2(tmp_path):
    # A vocab-only file (no tensors, no padding) is valid; so is version 2.
    p = tmp_path / "v.gguf"
    p.write_bytes(GGUFBuilder(kvs=[kv("a", GGUFValueType.UINT32, 1)], version=2).build())
    with GGUFFile(p) as gf:
        assert gf.version == 2 and gf.metadata == {"a": 1} and gf.tensors == {}


def test_tensors_in_any_order(tmp_path):
    # Offsets need not follow file order (gguf.cpp insists they do; we only forbid overlap).
    p = tmp_path / "o.gguf"
    p.write_bytes(GGUFBuilder(tensors=[Tensor("b", (8,), offset=32), Tensor("a", (8,), offset=0)]).build())
    with GGUFFile(p) as gf:
        assert [t.offset - gf.data_offset for t in gf.tensors.values()] == [32, 0]


def test_unknown_type_error_is_both(tmp_path):
    p = tmp_path / "u.gguf"
    p.write_bytes(GGUFBuilder(tensors=[Tensor("w", (32,), ggml_type=4)]).build())
    with pytest.raises(UnknownGGMLTypeError) as e:
        GGUFFile(p)
    assert isinstance(e.value, GGUFError) and isinstance(e.value, UnknownTypeError)
    assert "'w'" in str(e.value) and "4" in str(e.value)


# ---------------------------------------------------------------- ggflat inspect

def _inspect(*args) -> str:
    from cli.inspect_cmd import inspect
    r = CliRunner().invoke(inspect, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.slow
def test_inspect_smollm2(smollm2_path):
    out = _inspect(smollm2_path)
    lines = out.splitlines()
    for expected in ["version:      3", "tensors:      272", "kv pairs:     33", "alignment:    32",
                     "data offset:  1785664", "file size:    98362432 (93.81 MiB)",
                     "* 272 tensor(s)", "* architecture: llama",
                     "  layers:               30", "  embedding length:     576",
                     "  feed-forward length:  1536", "  attention heads:      9",
                     "  KV heads:             3", "  context length:       8192",
                     "  rope freq base:       100000.0", "  vocab size:           49152",
                     "  RMS norm eps:         1e-05"]:
        assert expected in lines, expected
    assert "= [49152 strings: '<|endoftext|>', '<|im_start|>', " in out
    assert "[INT32]   | tokenizer.ggml.token_type" in out
    assert "(368 chars)" in out  # chat template truncated with its length
    assert any(l.split()[:3] == ["0", "token_embd.weight", "Q8_0"] and "576,  49152" in l for l in lines)
    assert any("Q4_1" in l and "bytes" in l for l in lines)
    assert "  parameters:   " in out and "  tensor bytes: " in out


@pytest.mark.slow
def test_inspect_gemma3_json(gemma3_path):
    d = json.loads(_inspect("--json", gemma3_path))
    assert d["version"] == 3 and d["tensor_count"] == 236 and d["architecture"] == "gemma3"
    assert d["hyperparameters"]["block_count"] == 18
    assert d["hyperparameters"]["vocab_size"] == GEMMA3_VOCAB
    assert d["metadata"]["tokenizer.ggml.tokens"]["array_type"] == "STRING"
    assert len(d["metadata"]["tokenizer.ggml.tokens"]["value"]) == GEMMA3_VOCAB
    assert d["totals"]["parameters"] == sum(t["n_elements"] for t in d["tensors"])
    assert sum(d["totals"]["bytes_per_type"].values()) == d["totals"]["bytes"]


def test_inspect_escapes_hostile_strings(tmp_path):
    # Terminal escape sequences in keys/values/tensor names are printed escaped.
    p = tmp_path / "esc.gguf"
    p.write_bytes(GGUFBuilder(kvs=[kv("k\x1b[2J", GGUFValueType.STRING, "v\x1b]0;pwned\x07")],
                              tensors=[Tensor("t\x1b[31m", (4,))]).build())
    out = _inspect(p)
    assert "\x1b" not in out and "\\x1b[2J" in out and "\\x1b[31m" in out
