"""``ggflat inspect FILE``: what gguf-dump shows, from our validated reader.

Header, every metadata key with its type and (summarised) value, a tensor table
in ggml ``ne`` order, totals, and the architecture's hyper-parameters. ``--json``
prints the same as one JSON object with full (unsummarised) values.

Everything printed that came from the file goes through ``_safe`` (repr-style
escaping), so a hostile string cannot send terminal escape sequences.
"""
from __future__ import annotations

import json
import math
import sys
from collections import Counter
from typing import Any

import click
import numpy as np

from cli.options import verbose_option

# Arrays longer than this are summarised; strings longer than this are truncated.
MAX_ITEMS = 6
MAX_STR = 60

# Hyper-parameters shown in the summary, as "<arch>.<suffix>" keys, with a label.
HPARAMS = [
    ("block_count", "layers"),
    ("context_length", "context length"),
    ("embedding_length", "embedding length"),
    ("feed_forward_length", "feed-forward length"),
    ("attention.head_count", "attention heads"),
    ("attention.head_count_kv", "KV heads"),
    ("attention.key_length", "head dim (K)"),
    ("attention.value_length", "head dim (V)"),
    ("attention.sliding_window", "sliding window"),
    ("attention.layer_norm_rms_epsilon", "RMS norm eps"),
    ("attention.layer_norm_epsilon", "norm eps"),
    ("rope.freq_base", "rope freq base"),
    ("rope.dimension_count", "rope dims"),
    ("rope.scaling.type", "rope scaling"),
    ("rope.scaling.factor", "rope scaling factor"),
    ("expert_count", "experts"),
    ("expert_used_count", "experts used"),
]


def _safe(s: str) -> str:
    """A file-controlled string made printable (no control or escape characters)."""
    return s if s.isprintable() else repr(s)[1:-1]


def _fmt_str(s: str) -> str:
    if len(s) > MAX_STR:
        return f"{s[:MAX_STR]!r}... ({len(s)} chars)"
    return repr(s)


def _fmt_scalar(v: Any, f32: bool = False) -> str:
    if isinstance(v, str):
        return _fmt_str(v)
    if f32 and isinstance(v, float):
        # The exact double of a float32 (9.999999747378752e-06) reads badly; print the
        # shortest string that round-trips as float32 (1e-05), as gguf-dump does.
        x = np.float32(v)
        if x == 0 or 1e-4 <= abs(x) < 1e16:
            return np.format_float_positional(x, unique=True, trim="0")
        return np.format_float_scientific(x, unique=True, trim="-")
    return repr(v) if isinstance(v, (bool, float)) else str(v)


def format_value(value: Any, vtype, etype) -> str:
    """One-line rendering of a metadata value; long arrays and strings summarised."""
    if etype is None:
        return _fmt_scalar(value, f32=vtype.name == "FLOAT32")
    n = len(value)
    if etype.name == "STRING":
        items = [_fmt_str(s) for s in value[:MAX_ITEMS]]
        kind = "strings"
    else:
        items = [_fmt_scalar(x, f32=etype.name == "FLOAT32") for x in value[:MAX_ITEMS].tolist()]
        kind = etype.name.lower()
    if n <= MAX_ITEMS:
        return "[" + ", ".join(items) + "]"
    return f"[{n} {kind}: " + ", ".join(items) + ", ... ]"


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _human_count(n: int) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


def hyperparameters(gf) -> list[tuple[str, str, Any, bool]]:
    """(label, name, value, is_f32) for the architecture keys this file has."""
    arch = gf.architecture
    out = []
    if arch is not None:
        for suffix, label in HPARAMS:
            key = f"{arch}.{suffix}"
            if key in gf.metadata and gf.metadata_types[key][1] is None:
                out.append((label, suffix, gf.metadata[key],
                            gf.metadata_types[key][0].name == "FLOAT32"))
    # The vocabulary is the tokens array; <arch>.vocab_size is optional and rarer.
    tokens = gf.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list):
        out.append(("vocab size", "vocab_size", len(tokens), False))
    elif arch is not None and gf.metadata_types.get(f"{arch}.vocab_size", (None, 0))[1] is None:
        out.append(("vocab size", "vocab_size", gf.metadata[f"{arch}.vocab_size"], False))
    return out


def _totals(gf) -> tuple[int, int, dict[str, int]]:
    params = sum(t.n_elements for t in gf.tensors.values())
    nbytes = sum(t.nbytes for t in gf.tensors.values())
    per_type: Counter[str] = Counter()
    for t in gf.tensors.values():
        per_type[t.type_name] += t.nbytes
    return params, nbytes, dict(per_type.most_common())


def print_report(gf, out=None) -> None:
    echo = (lambda s="": click.echo(s, file=out))
    echo(f"file:         {_safe(gf.path)}")
    echo(f"version:      {gf.version}")
    echo(f"tensors:      {len(gf.tensors)}")
    echo(f"kv pairs:     {len(gf.metadata)}")
    echo(f"alignment:    {gf.alignment}")
    echo(f"data offset:  {gf.data_offset}")
    echo(f"file size:    {gf.file_size} ({_human_bytes(gf.file_size)})")
    echo()
    echo(f"* {len(gf.metadata)} key/value pair(s)")
    width = max((len(_safe(k)) for k in gf.metadata), default=0)
    for i, (key, value) in enumerate(gf.metadata.items(), 1):
        vtype, etype = gf.metadata_types[key]
        tname = f"[{etype.name}]" if etype is not None else vtype.name
        echo(f"  {i:4}: {tname:9} | {_safe(key):{width}} = {format_value(value, vtype, etype)}")
    echo()
    echo(f"* {len(gf.tensors)} tensor(s)")
    if gf.tensors:
        nw = max(len(_safe(n)) for n in gf.tensors)
        echo(f"  {'#':>4}  {'name':{nw}}  {'type':7}  {'ne (ggml order)':>28}  "
             f"{'elements':>12}  {'bytes':>12}")
        for i, t in enumerate(gf.tensors.values()):
            ne = ", ".join(f"{d:6}" for d in t.ne + (1,) * (4 - len(t.ne)))
            echo(f"  {i:4}  {_safe(t.name):{nw}}  {t.type_name:7}  {ne:>28}  "
                 f"{t.n_elements:12}  {t.nbytes:12}")
    params, nbytes, per_type = _totals(gf)
    echo()
    echo("* totals")
    echo(f"  parameters:   {params} ({_human_count(params)})")
    echo(f"  tensor bytes: {nbytes} ({_human_bytes(nbytes)})")
    for tname, b in per_type.items():
        n = sum(1 for t in gf.tensors.values() if t.type_name == tname)
        echo(f"    {tname:8} {b:14} bytes  {n:5} tensor(s)")
    hp = hyperparameters(gf)
    echo()
    arch = gf.architecture
    echo(f"* architecture: {_safe(arch) if arch is not None else '(none)'}")
    for label, _name, value, f32 in hp:
        echo(f"  {label + ':':22}{_fmt_scalar(value, f32)}")


def _json_value(v: Any) -> Any:
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, list):
        return [_json_value(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf
    return v


def report_json(gf) -> dict[str, Any]:
    params, nbytes, per_type = _totals(gf)
    return {
        "file": gf.path, "version": gf.version, "tensor_count": len(gf.tensors),
        "kv_count": len(gf.metadata), "alignment": gf.alignment,
        "data_offset": gf.data_offset, "file_size": gf.file_size,
        "metadata": {
            k: {"type": vt.name, **({"array_type": et.name} if et is not None else {}),
                "value": _json_value(gf.metadata[k])}
            for k, (vt, et) in gf.metadata_types.items()},
        "tensors": [
            {"name": t.name, "type": t.type_name, "ggml_type": t.ggml_type, "ne": list(t.ne),
             "offset": t.offset, "n_elements": t.n_elements, "nbytes": t.nbytes}
            for t in gf.tensors.values()],
        "totals": {"parameters": params, "bytes": nbytes, "bytes_per_type": per_type},
        "architecture": gf.architecture,
        "hyperparameters": {name: _json_value(v) for _label, name, v, _f32 in hyperparameters(gf)},
    }


@click.command("inspect")
@click.argument("file", type=str)
@click.option("--json", "as_json", is_flag=True, default=False,
              help="Print one JSON object with full metadata values.")
@verbose_option
def inspect(file: str, as_json: bool, verbose: bool) -> None:
    """Show a GGUF file's header, metadata, tensors and hyper-parameters."""
    from engine.gguf_file import GGUFFile

    # A strange locale must not turn a token into a UnicodeEncodeError.
    if hasattr(sys.stdout, "reconfigure"):
        try:
            sys.stdout.reconfigure(errors="backslashreplace")
        except (ValueError, OSError):
            pass
    with GGUFFile(file) as gf:
        if as_json:
            json.dump(report_json(gf), sys.stdout, ensure_ascii=False)
            sys.stdout.write("\n")
        else:
            print_report(gf)
