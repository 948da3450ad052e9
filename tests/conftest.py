"""Shared fixtures: the two reference models (fetched once into the ggflat cache) and llama.cpp's reference data."""
from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

REFERENCE_DIR = Path(__file__).parent / "reference"


def _model(name: str) -> Path:
    from engine.errors import GGFlatError
    from engine.model_cache import model_path
    try:
        return model_path(name, quiet=True)
    except GGFlatError as e:  # offline machine without a cached copy
        pytest.skip(f"model {name} unavailable: {e}")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return _model("smollm2")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return _model("gemma3")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE_DIR


def load_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised MSE sum((a-b)^2) / sum(b^2) of a result ``a`` against a reference ``b``
    (ggml's test-backend-ops measure); NaN on either side fails."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert not np.isnan(a).any(), "result has NaN"
    assert not np.isnan(b).any(), "reference has NaN"
    den = float(np.sum(b * b))
    num = float(np.sum((a - b) ** 2))
    return num / den if den > 0 else num


def build_host_lib(tmp_path_factory, cu: Path, define: str) -> ctypes.CDLL:
    """The host part of a kernel file (compiled with ``-D<define>``) built by g++ as plain C++ into a
    shared library, for checking its arithmetic against NumPy bit for bit; skips without a compiler."""
    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        pytest.skip(f"no C++ compiler for the host build of {cu.name}")
    so = tmp_path_factory.mktemp(cu.stem + "_host") / f"lib{cu.stem}_host.so"
    subprocess.run([gxx, "-std=c++17", "-O2", "-ffp-contract=off", f"-D{define}", "-shared", "-fPIC",
                    "-x", "c++", str(cu), "-o", str(so)], check=True, capture_output=True)
    return ctypes.CDLL(str(so))
