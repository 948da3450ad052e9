"""Every ``ggml_py/cuda/*.cu`` compiles stand-alone with nvcc for sm_90 (DESIGN.md there:
kernels include only what NVRTC ships and are ``extern "C"``), and through NVRTC (CuPy)
the way the backend loads them.

The nvcc check runs wherever ``nvcc`` is on PATH (no GPU needed; CI has no nvcc and skips);
the NVRTC check needs CuPy and a GPU.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).parent.parent / "ggml_py" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))


def test_there_are_kernels():
    assert any(p.name == "elementwise.cu" for p in CU_FILES)


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_nvrtc_source_is_self_contained(cu):
    """What load_module hands to NVRTC includes only toolkit headers: common.cuh is spliced in."""
    from ggml_py.cuda.compile import source_text
    src = source_text(cu.stem)
    local = [ln for ln in src.splitlines() if re.match(r'\s*#\s*include\s*"', ln)]
    assert not local, f"{cu.name}: {local}"
    if '"common.cuh"' in cu.read_text(encoding="utf-8"):
        assert "act_gelu" in src and "PDL_TRIGGER" in src


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(cu, tmp_path):
    out = tmp_path / (cu.stem + ".cubin")
    p = subprocess.run(["nvcc", "-arch=sm_90", "--cubin", "-std=c++17", "-Xptxas", "-v", "-o", str(out), str(cu)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"nvcc failed on {cu.name}:\n{p.stderr[-4000:]}"
    assert out.stat().st_size > 0
    # register spills make kernels slow without failing anything else: say so (not an error)
    spills = [m.group(0) for m in re.finditer(r"(\d+) bytes spill stores, (\d+) bytes spill loads", p.stderr)
              if int(m.group(1)) or int(m.group(2))]
    if spills:
        warnings.warn(f"{cu.name} spills registers: " + "; ".join(spills))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_nvcc_compiles_marlin_sm90a(tmp_path):
    """marlin.cu as the backend builds it on Hopper (sm_90a: its warpgroup kernels' wgmma); ptxas must
    not serialize the wgmmas (the C751x/C752x notes), which would make those kernels several times slower."""
    cu = CUDA_DIR / "marlin.cu"
    out = tmp_path / "marlin.cubin"
    p = subprocess.run(["nvcc", "-arch=sm_90a", "--cubin", "-std=c++17", "-Xptxas", "-v", "-o", str(out), str(cu)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"nvcc -arch=sm_90a failed on marlin.cu:\n{p.stderr[-4000:]}"
    serialized = [ln for ln in p.stderr.splitlines() if "wgmma" in ln and "serialized" in ln]
    assert not serialized, "\n".join(serialized[:5])
    spills = re.findall(r"Compiling entry function '(marlin_q4_\w+_[wx]\d+\w*)'.*?(\d+) bytes spill stores", p.stderr, re.S)
    assert not [name for name, n in spills if int(n)], spills


def _marlin_ptx(tmp_path, *defines: str) -> str:
    """marlin.cu built for sm_90a as PTX with these -D options (the A/B and measurement builds)."""
    out = tmp_path / "marlin.ptx"
    p = subprocess.run(["nvcc", "-arch=sm_90a", "--ptx", "-std=c++17", *defines, "-o", str(out),
                        str(CUDA_DIR / "marlin.cu")], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"nvcc {' '.join(defines)} failed on marlin.cu:\n{p.stderr[-4000:]}"
    return out.read_text()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_nvcc_compiles_marlin_one_warp_epilogue(tmp_path):
    """The A/B builds GGFLAT_MARLIN_PAREPI=0 (MARLIN_PAR_EPI=0: q/k/v's epilogue on one warp a tile, as
    before session 8) and GGFLAT_MARLIN_AGATE=0 (q/k/v's weight stages not held for A, as before
    session 9) still compile."""
    assert "marlin_q4_0_d1" in _marlin_ptx(tmp_path, "-DMARLIN_PAR_EPI=0", "-DMARLIN_AGATE=0")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_nvcc_compiles_marlin_trace_build(tmp_path):
    """The measurement builds (GGFLAT_MARLIN_TRACE=1: MARLIN_TRACE, read by benchmarks/trace_decode.py;
    GGFLAT_MARLIN_XTRACE=1: x64's stage stamps, read by benchmarks/xtrace.py) still compile, and export
    the buffers and counter the tools read."""
    ptx = _marlin_ptx(tmp_path, "-DMARLIN_TRACE=1", "-DMARLIN_XTRACE=1")
    assert "marlin_trace_buf" in ptx and "marlin_trace_n" in ptx and "%globaltimer" in ptx
    assert "marlin_xtrace" in ptx


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_nvcc_compiles_marlin_x_only(tmp_path):
    """benchmarks/xtrace.py's build (GGFLAT_MARLIN_XONLY=1 with XTRACE): the x64 and repack kernels
    only, so that it builds in seconds on the device."""
    ptx = _marlin_ptx(tmp_path, "-DMARLIN_XONLY=1", "-DMARLIN_XTRACE=1")
    assert "marlin_q4_k_x64" in ptx and "marlin_repack_codes" in ptx and "marlin_xtrace" in ptx
    assert "marlin_q4_0_d1" not in ptx and "marlin_q4_0_m2" not in ptx


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_nvrtc_compiles(cu):
    from ggml_py.backend_cupy import unavailable_reason
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no GPU: {reason}")
    from ggml_py.cuda.compile import load_module
    mod = load_module(cu.stem)
    assert mod is not None
