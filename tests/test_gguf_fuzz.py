"""Seeded fuzzing of engine.gguf_file: random byte flips, truncations, insertions,
deletions and "interesting" integers written over a small valid GGUF file.

Contract: every mutant either parses (and is then fully usable: metadata,
tensor_bytes, the inspect report) or raises GGUFError; never another
exception, never more than a second. A subset goes through ``ggflat inspect``
to check the CLI's one-line-error / exit-1 contract.
"""
from __future__ import annotations

import io
import random
import time
from pathlib import Path

import pytest

from engine.errors import GGUFError
from engine.gguf_file import GGUFFile
from tests.gguf_builder import write_small_gguf
from tests.test_gguf_malformed import assert_one_line_error, finish, run_cli

SEED = 20240611
N_CASES = 400
N_CLI = 20
# Values that trip length/count/offset arithmetic when written over a field.
INTERESTING = [0, 1, 2**7, 2**8 - 1, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
               2**62, 2**63 - 1, 2**63, 2**64 - 1, 9, 13, 63, 64, 65]


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> tuple[bytes, int]:
    p = tmp_path_factory.mktemp("fuzz") / "base.gguf"
    write_small_gguf(p)
    with GGUFFile(p) as gf:
        header_end = gf.data_offset
    return p.read_bytes(), header_end


def mutate(data: bytes, header_end: int, rng: random.Random) -> tuple[str, bytes]:
    """One random mutation; 90% of them hit the header, where the parsing happens."""
    b = bytearray(data)
    limit = header_end if rng.random() < 0.9 else len(b)
    kind = rng.choice(["flip", "flip", "truncate", "insert", "delete", "int", "int"])
    pos = rng.randrange(limit)
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(limit)] = rng.randrange(256)
    elif kind == "truncate":
        del b[pos:]
    elif kind == "insert":
        b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == "delete":
        del b[pos:pos + rng.randint(1, 16)]
    else:  # an interesting little-endian integer of 1, 2, 4 or 8 bytes
        width = rng.choice([1, 2, 4, 8])
        value = rng.choice(INTERESTING) % (1 << (8 * width))
        b[pos:pos + width] = value.to_bytes(width, "little")
    return kind, bytes(b)


def mutants(base: bytes, header_end: int) -> list[tuple[str, bytes]]:
    rng = random.Random(SEED)
    return [mutate(base, header_end, rng) for _ in range(N_CASES)]


def exercise(gf: GGUFFile) -> None:
    """A mutant that parsed must be fully usable."""
    from cli.inspect_cmd import print_report, report_json
    import json
    for name, t in gf.tensors.items():
        view = gf.tensor_bytes(name)
        assert len(view) == t.nbytes and t.offset + t.nbytes <= gf.file_size
    buf = io.StringIO()
    print_report(gf, out=buf)
    json.dumps(report_json(gf))


def test_fuzz_in_process(base_file, tmp_path):
    base, header_end = base_file
    p = tmp_path / "mutant.gguf"
    outcomes = {"ok": 0, "error": 0}
    for i, (kind, data) in enumerate(mutants(base, header_end)):
        p.write_bytes(data)
        t0 = time.perf_counter()
        try:
            with GGUFFile(p) as gf:
                exercise(gf)
            outcomes["ok"] += 1
        except GGUFError as e:
            msg = str(e)
            assert "\n" not in msg and msg.endswith(f"({p})"), (i, kind, msg)
            outcomes["error"] += 1
        except Exception as e:  # pragma: no cover - the failure report
            pytest.fail(f"mutant {i} ({kind}) raised {type(e).__name__}: {e}")
        assert time.perf_counter() - t0 < 1.0, (i, kind)
    # Both outcomes are exercised (a fuzzer that only ever errors tests little).
    assert outcomes["ok"] > 20 and outcomes["error"] > 100, outcomes


def test_fuzz_cli(base_file, tmp_path):
    """~20 mutants through `ggflat inspect`: exit 1 with one `error:` line, or exit 0."""
    base, header_end = base_file
    cases = []
    for i, (kind, data) in enumerate(mutants(base, header_end)):
        p = tmp_path / f"m{i}.gguf"
        p.write_bytes(data)
        try:
            GGUFFile(p).close()
            ok = True
        except GGUFError:
            ok = False
        # Mostly failing mutants, a few that parse.
        if not ok or sum(c[2] for c in cases) < 3:
            cases.append((i, p, ok))
        if len(cases) == N_CLI:
            break
    for pair in range(0, len(cases), 2):  # two at a time: CI has 2 cores
        batch = cases[pair:pair + 2]
        t0 = time.perf_counter()
        procs = [run_cli(["inspect", str(p)]) for _i, p, _ok in batch]
        for (i, p, ok), proc in zip(batch, procs):
            rc, out, err, elapsed = result = finish(proc, t0)
            if ok:
                assert rc == 0 and err == "" and "* architecture:" in out, (i, rc, err)
            else:
                assert_one_line_error(result, f"inspect mutant {i}")
