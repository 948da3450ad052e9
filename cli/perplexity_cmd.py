"""``ggflat perplexity``: llama-perplexity's method and output."""
from __future__ import annotations

import sys
import time

import click

from cli.options import backend_option, model_option, read_text_file, resolve_model, verbose_option


@click.command("perplexity")
@model_option
@click.option("-f", "--file", "text_file", required=True, help="UTF-8 text file to score.")
@click.option("-c", "--ctx-size", "n_ctx", type=click.IntRange(min=4), default=512, show_default=True,
              help="Tokens per chunk.")
@click.option("-b", "--batch-size", "n_batch", type=click.IntRange(min=1), default=512, show_default=True,
              help="Tokens per forward pass (at most -c).")
@click.option("--chunks", "max_chunks", type=int, default=-1, show_default=True,
              help="Score at most this many chunks (-1 = all).")
@backend_option
@verbose_option
def perplexity(model_path, text_file, n_ctx, n_batch, max_chunks, backend, verbose):
    """Perplexity of a text: chunks of -c tokens, the second half of each chunk scored."""
    from engine.model import Model
    from engine.perplexity import perplexity as run_perplexity

    text = read_text_file(text_file)
    model = Model.load(resolve_model(model_path), backend)
    t0 = time.perf_counter()
    first = [True]

    def on_chunk(i: int, n: int, ppl: float) -> None:
        if first[0]:
            el = time.perf_counter() - t0
            print(f"perplexity: calculating perplexity over {n} chunks, n_ctx={n_ctx}, "
                  f"batch_size={min(n_batch, n_ctx)}, n_seq=1", file=sys.stderr)
            print(f"perplexity: {el:.2f} seconds per pass - ETA {el * n / 60:.2f} minutes", file=sys.stderr)
            first[0] = False
        sys.stdout.write(f"[{i + 1}]{ppl:.4f},")
        sys.stdout.flush()

    res = run_perplexity(model, text, n_ctx=n_ctx, n_batch=n_batch, max_chunks=max_chunks, on_chunk=on_chunk)
    sys.stdout.write("\n")
    print(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.ppl_err:.5f}")
