"""`ggflat generate` and `ggflat perplexity` end to end, through the real command line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REFERENCE_DIR, load_jsonl


def ggflat(*args: str, timeout: float = 300, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, input=stdin if stdin is not None else "")


def assert_one_line_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_generate_json_greedy_matches_reference(smollm2_path):
    case = load_jsonl(REFERENCE_DIR / "smollm2" / "greedy.jsonl")[4]     # "1, 2, 3, 4, 5,": no near-ties early
    p = ggflat("generate", "-m", str(smollm2_path), "-p", case["prompt"], "--temp", "0", "-n", "6",
               "--json", "--top-logprobs", "5")
    assert p.returncode == 0, p.stderr
    events = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    assert len(events) == 6
    for ev, ref in zip(events, case["steps"]):
        assert ev["id"] == ref["top5"][0][0]
        assert abs(ev["logprob"] - (ref["top5"][0][1] - ref["lse"])) < 0.1
        tops = {t["id"]: t["logprob"] for t in ev["top_logprobs"]}
        assert len(tops) == 5 and ev["top_logprobs"][0]["logprob"] == ev["logprob"]
        lps = [t["logprob"] for t in ev["top_logprobs"]]
        assert lps == sorted(lps, reverse=True)
        common = [(tops[i], lg - ref["lse"]) for i, lg in ref["top5"] if i in tops]
        assert len(common) >= 4 and all(abs(a - b) < 0.4 for a, b in common)
        assert isinstance(ev["text"], str) and bytes(ev["bytes"]).decode("utf-8", "replace") == ev["text"]
    # the ollama-style summary, one figure a line
    for key in ("prompt eval count:", "prompt eval rate:", "eval count:", "eval rate:"):
        assert key in p.stderr
    assert "prompt eval count:    " + str(len(case["prompt_ids"])) + " token(s)" in p.stderr
    assert "eval count:           6 token(s)" in p.stderr


def test_generate_text_streams_and_seed_reproduces(smollm2_path):
    args = ("generate", "-m", str(smollm2_path), "-p", "Once upon a time", "-n", "12", "-s", "7", "--temp", "0.9")
    a, b = ggflat(*args), ggflat(*args)
    assert a.returncode == 0 and b.returncode == 0, a.stderr
    assert a.stdout == b.stdout and len(a.stdout.strip()) > 0


def test_generate_chat_template_and_system_prompt(smollm2_path):
    p = ggflat("generate", "-m", str(smollm2_path), "-sys", "You answer with one word.", "-p",
               "What is the capital of France?", "--temp", "0", "-n", "8")
    assert p.returncode == 0, p.stderr
    assert "Paris" in p.stdout


def test_prompt_longer_than_context(smollm2_path):
    p = ggflat("generate", "-m", str(smollm2_path), "-c", "16", "-p", "word " * 40, "-n", "4")
    assert_one_line_error(p, "16")
    assert "41" in p.stderr or "40" in p.stderr   # both numbers named


def test_missing_model_and_bad_flags(tmp_path):
    assert_one_line_error(ggflat("generate", "-m", str(tmp_path / "nope.gguf"), "-p", "hi"), "nope.gguf")
    p = ggflat("generate", "-m", str(tmp_path / "nope.gguf"))                 # no prompt: usage error
    assert p.returncode == 2


def test_unknown_architecture_is_named(tmp_path):
    import numpy as np
    import gguf
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b"])
    w.add_token_merges([])
    w.add_tensor("token_embd.weight", np.zeros((2, 8), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    assert_one_line_error(ggflat("generate", "-m", str(path), "-p", "a"), "mamba")


def test_bad_sampling_flag(smollm2_path):
    p = ggflat("generate", "-m", str(smollm2_path), "-p", "hi", "--top-p", "1.5")
    assert p.returncode in (1, 2) and "top-p" in p.stderr and "Traceback" not in p.stderr


def test_perplexity_command_prints_llama_format(smollm2_path, tmp_path):
    p = ggflat("perplexity", "-m", str(smollm2_path), "-f", str(REFERENCE_DIR / "corpus.txt"), "-c", "128",
               "--chunks", "3")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("[1]") and "[3]" in p.stdout
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("Final estimate: PPL = ") and " +/- " in last
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert_one_line_error(ggflat("perplexity", "-m", str(smollm2_path), "-f", str(short)), "2*c")
