"""``ggflat tokenize``: two real subprocess runs, the rest in-process through cli.main.main."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from cli.main import main
from tests.conftest import load_jsonl


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """cli.main.main in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out, err = capsys.readouterr()
    return e.value.code, out, err


def run_subprocess(*argv: str) -> tuple[int, str, str, float]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "cli.main", *argv], capture_output=True, timeout=120)
    return p.returncode, p.stdout.decode("utf-8"), p.stderr.decode("utf-8"), time.perf_counter() - t0


@pytest.mark.slow
def test_subprocess_smollm2_pieces(smollm2_path):
    rc, out, err, _ = run_subprocess("tokenize", "-m", str(smollm2_path), "-p", "<|im_start|>Hi\n\U0001F642",
                                     "--show-count")
    assert rc == 0, err
    # llama-tokenize's layout: id right-aligned in 6 columns; control characters escaped;
    # the emoji is two byte-level tokens, each not valid UTF-8 alone
    assert out == ("     1 -> '<|im_start|>'\n"
                   " 26843 -> 'Hi'\n"
                   "   198 -> '\\n'\n"
                   " 10813 -> '\\xf0\\x9f'\n"
                   " 38887 -> '\\x99\\x82'\n"
                   "Total number of tokens: 5\n")


@pytest.mark.slow
def test_subprocess_gemma3_ids_from_file(gemma3_path, reference_dir, tmp_path):
    line = load_jsonl(reference_dir / "gemma3" / "tokenize.jsonl")[15]   # the <start_of_turn> chat line
    f = tmp_path / "prompt.txt"
    f.write_text(line["text"], encoding="utf-8")
    rc, out, err, seconds = run_subprocess("tokenize", "-m", str(gemma3_path), "-f", str(f), "--ids")
    assert rc == 0, err
    assert json.loads(out) == line["special"]          # specials parsed, BOS added
    assert seconds < 20                                 # the whole process, on a slow CI machine


@pytest.mark.slow
def test_flags(capsys, gemma3_path, reference_dir):
    line = load_jsonl(reference_dir / "gemma3" / "tokenize.jsonl")[15]
    rc, out, _ = run_main(capsys, "tokenize", "-m", str(gemma3_path), "-p", line["text"], "--ids",
                          "--no-parse-special")
    assert rc == 0 and json.loads(out) == line["plain"]
    rc, out, _ = run_main(capsys, "tokenize", "-m", str(gemma3_path), "-p", line["text"], "--ids", "--no-bos")
    assert rc == 0 and json.loads(out) == line["special"][1:]
    rc, out, _ = run_main(capsys, "tokenize", "-m", str(gemma3_path), "-p", "", "--ids", "--show-count")
    assert rc == 0 and out == "[2]\nTotal number of tokens: 1\n"


def test_usage_errors_exit_2(capsys, tmp_path):
    rc, _, err = run_main(capsys, "tokenize", "-m", str(tmp_path / "x.gguf"))
    assert rc == 2 and "exactly one of -p/--prompt or -f/--file" in err
    rc, _, err = run_main(capsys, "tokenize", "-m", str(tmp_path / "x.gguf"), "-p", "a", "-f", "b")
    assert rc == 2


def test_bad_model_file_is_one_error_line(capsys, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    rc, out, err = run_main(capsys, "tokenize", "-m", str(bad), "-p", "hi")
    assert rc == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.slow
def test_text_file_errors(capsys, tmp_path, smollm2_path):
    rc, _, err = run_main(capsys, "tokenize", "-m", str(smollm2_path), "-f", str(tmp_path / "missing.txt"))
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1 and "missing.txt" in err
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9".encode("latin-1"))
    rc, _, err = run_main(capsys, "tokenize", "-m", str(smollm2_path), "-f", str(latin1))
    assert rc == 1 and "not valid UTF-8" in err and err.count("\n") == 1
    rc, _, err = run_main(capsys, "tokenize", "-m", str(smollm2_path), "-p", "a\udcffb")   # undecodable argv byte
    assert rc == 1 and err == "error: the prompt is not valid UTF-8\n"
