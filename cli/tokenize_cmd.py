"""``ggflat tokenize``: show how a model tokenizes a text (llama-tokenize).

Like llama-tokenize: special tokens (``<|im_start|>``) are parsed unless
``--no-parse-special``; ``add_special`` is on when the model adds a BOS and
``--no-bos`` is not given (llama-tokenize passes the same flag for both, so a
model that adds no BOS gets no EOS either). The default output is one line per
token, ``<id> -> '<piece>'``, with the id right-aligned in six columns; control
characters in pieces are escaped (``\\n``, ``\\x1b``) so that one token stays one
line and a model file cannot send terminal escape sequences, and bytes that are
not valid UTF-8 on their own (a character split over byte tokens) show as
``\\xNN``. ``--ids`` prints only the ids as a JSON list.
"""
from __future__ import annotations

import json
import sys
import time

import click

from cli.options import model_option, read_text_file, resolve_model, verbose_option


def _show_piece(piece: bytes) -> str:
    text = piece.decode("utf-8", errors="backslashreplace")
    out = []
    for ch in text:
        cp = ord(ch)
        if cp < 0x20 or 0x7F <= cp < 0xA0:
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(ch, f"\\x{cp:02x}"))
        else:
            out.append(ch)
    return "".join(out)


@click.command("tokenize")
@model_option
@click.option("-p", "--prompt", default=None, help="Text to tokenize (used as is, no escape processing).")
@click.option("-f", "--file", "text_file", default=None, help="Tokenize the contents of a UTF-8 file.")
@click.option("--ids", is_flag=True, help="Print only the token ids, as a JSON list.")
@click.option("--no-parse-special", is_flag=True,
              help="Treat special-token text such as <|im_start|> as plain text.")
@click.option("--no-bos", is_flag=True, help="Do not add the BOS token even if the model asks for one.")
@click.option("--show-count", is_flag=True, help="Print the number of tokens at the end.")
@verbose_option
def tokenize(model_path: str | None, prompt: str | None, text_file: str | None, ids: bool,
             no_parse_special: bool, no_bos: bool, show_count: bool, verbose: bool) -> None:
    """Tokenize a prompt with the model's vocabulary (like llama-tokenize)."""
    if (prompt is None) == (text_file is None):
        raise click.UsageError("give the text with exactly one of -p/--prompt or -f/--file")
    from engine.errors import GGFlatError, TokenizerError
    from engine.gguf_file import GGUFFile
    from engine.tokenizer import Tokenizer

    if prompt is not None:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:   # undecodable bytes in argv arrive as lone surrogates
            raise GGFlatError("the prompt is not valid UTF-8") from None
        text = prompt
    else:
        text = read_text_file(text_file)

    t0 = time.perf_counter()
    path = resolve_model(model_path)
    gf = GGUFFile(path)
    try:
        tok = Tokenizer.from_gguf(gf)
    except TokenizerError as e:
        raise TokenizerError(f"{e} ({path})") from None
    finally:
        gf.close()
    t1 = time.perf_counter()
    add_special = tok.add_bos and not no_bos
    tokens = tok.encode(text, add_special=add_special, parse_special=not no_parse_special)
    t2 = time.perf_counter()
    if verbose:
        print(f"{tok!r}\nvocabulary loaded in {t1 - t0:.3f} s, {len(text)} characters tokenized in "
              f"{t2 - t1:.3f} s", file=sys.stderr)

    if ids:
        report = json.dumps(tokens) + "\n"
    else:
        report = "".join(f"{t:6d} -> '{_show_piece(tok.token_to_piece(t))}'\n" for t in tokens)
    if show_count:
        report += f"Total number of tokens: {len(tokens)}\n"
    # UTF-8 whatever the locale says: pieces are UTF-8 text
    buf = getattr(sys.stdout, "buffer", None)
    if buf is not None:
        sys.stdout.flush()
        buf.write(report.encode("utf-8"))
        buf.flush()
    else:
        sys.stdout.write(report)
        sys.stdout.flush()
