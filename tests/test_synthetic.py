"""The synthetic-model tool writes a loadable, runnable GGUF that says its weights are random."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.model import Model

TOOL = Path(__file__).parent.parent / "benchmarks" / "make_synthetic.py"


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q4_K"])
def test_synthetic_model_loads_and_runs(tmp_path, qtype):
    out = tmp_path / f"tiny-{qtype}.gguf"
    p = subprocess.run([sys.executable, str(TOOL), "--shape", "tiny", "--type", qtype, "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "RANDOM WEIGHTS" in p.stderr
    m = Model.load(str(out))
    assert "RANDOM WEIGHTS" in m.config.name
    assert m.gf.tensors["blk.0.ffn_up.weight"].type_name == qtype
    cache = m.new_cache(32)
    logits = m.prefill(cache, cache.new_sequence(), m.tokenizer.encode("hello world"))
    assert logits.shape == (1, 512) and np.isfinite(logits).all() and logits.std() > 0
