"""``ggflat bench``: llama-bench's interface and table."""
from __future__ import annotations

import json
import os
import sys

import click

from cli.options import backend_option, model_option, resolve_model, verbose_option


@click.command("bench")
@model_option
@click.option("-p", "--n-prompt", "n_prompt", type=click.IntRange(min=0), default=512, show_default=True,
              help="Prompt tokens of the pp test (0 = skip).")
@click.option("-n", "--n-gen", "n_gen", type=click.IntRange(min=0), default=128, show_default=True,
              help="Generated tokens of the tg test (0 = skip).")
@click.option("-d", "--n-depth", "depth", type=click.IntRange(min=0), default=0, show_default=True,
              help="Tokens already in the KV cache before each test.")
@click.option("-r", "--repetitions", "reps", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("-b", "--batch-size", "n_batch", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("-o", "--output", "fmt", type=click.Choice(["md", "json"]), default="md", show_default=True)
@backend_option
@verbose_option
def bench(model_path, n_prompt, n_gen, depth, reps, n_batch, fmt, backend, verbose):
    """Measure prompt processing (ppN) and generation (tgN) speed, like llama-bench."""
    from engine.bench import bench as run_bench
    from engine.model import Model

    path = resolve_model(model_path)
    model = Model.load(path, backend)
    results = []
    for kind, n in (("pp", n_prompt), ("tg", n_gen)):
        if n:
            results.append(run_bench(model, kind, n, depth=depth, reps=reps, n_batch=n_batch))
    name = model.config.name or os.path.basename(path)
    size = model.weight_file_bytes
    if fmt == "json":
        out = [{"model": name, "model_type": model.config.arch, "model_size": size, "model_n_params": model.n_params,
                "backend": backend, "n_batch": n_batch, "n_prompt": r.n_tokens if r.test.startswith("pp") else 0,
                "n_gen": r.n_tokens if r.test.startswith("tg") else 0, "n_depth": r.depth,
                "avg_ts": r.mean, "stddev_ts": r.std, "samples_ts": r.samples_ts} for r in results]
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    rows = [(name, f"{size / 2**20:.2f} MiB", f"{model.n_params / 1e6:.2f} M", backend, r.test,
             f"{r.mean:.2f} ± {r.std:.2f}") for r in results]
    header = ("model", "size", "params", "backend", "test", "t/s")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    right = (False, True, True, False, True, True)

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)) + " |"
    print(line(header))
    print("| " + " | ".join(("-" * (w - 1) + ":") if r else "-" * w for w, r in zip(widths, right)) + " |")
    for r in rows:
        print(line(r))
