"""``ggflat generate``: complete a prompt, streaming the text (llama-cli / llama-simple style)."""
from __future__ import annotations

import json
import sys
import time

import click

from cli.options import (backend_option, ctx_option, model_option, read_text_file, resolve_model,
                         sampling_options, sampling_params, verbose_option)


@click.command("generate")
@model_option
@click.option("-p", "--prompt", default=None, help="Prompt text (special tokens such as <|im_start|> are parsed).")
@click.option("-f", "--file", "prompt_file", default=None, help="Read the prompt from a UTF-8 file.")
@click.option("-n", "--n-predict", type=click.IntRange(min=-1), default=256, show_default=True,
              help="Tokens to generate (-1 = until end of generation or a full context).")
@ctx_option
@sampling_options
@click.option("-sys", "--system-prompt", default=None,
              help="System prompt; implies --chat (the prompt becomes a user turn of the chat template).")
@click.option("--chat", "use_chat", is_flag=True, help="Wrap the prompt in the model's chat template as a user turn.")
@click.option("--chat-template-file", default=None, help="Jinja chat template to use instead of the model's.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per generated token.")
@click.option("--top-logprobs", type=click.IntRange(min=0, max=100), default=0,
              help="With --json: include the K most likely tokens and their logprobs.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-generation tokens.")
@click.option("-ctk", "--cache-type-k", type=click.Choice(["f16", "f32"]), default="f16", show_default=True,
              help="KV cache storage type (keys).")
@click.option("-ctv", "--cache-type-v", type=click.Choice(["f16", "f32"]), default="f16", show_default=True,
              help="KV cache storage type (values); must equal -ctk for now.")
@click.option("-b", "--batch-size", "n_batch", type=click.IntRange(min=1), default=512, show_default=True,
              help="Prompt tokens per forward pass.")
@backend_option
@verbose_option
def generate(model_path, prompt, prompt_file, n_predict, n_ctx, system_prompt, use_chat, chat_template_file,
             as_json, top_logprobs, ignore_eos, cache_type_k, cache_type_v, n_batch, backend, verbose, **kw):
    """Generate text from a prompt and stream it to stdout; timings go to stderr."""
    from engine.errors import GGFlatError
    from engine.generate import Generator
    from engine.model import Model
    from engine.sampling import Sampler

    if (prompt is None) == (prompt_file is None):
        raise click.UsageError("give the prompt with exactly one of -p/--prompt or -f/--file")
    if cache_type_k != cache_type_v:
        raise click.UsageError("-ctk and -ctv must be the same type for now")
    text = prompt if prompt is not None else read_text_file(prompt_file)

    t_load = time.perf_counter()
    model = Model.load(resolve_model(model_path), backend)
    tok = model.tokenizer
    if system_prompt is not None or use_chat or chat_template_file is not None:
        from engine.chat_template import load_chat_template
        template = load_chat_template(model.gf.metadata, chat_template_file)
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else [])
        messages.append({"role": "user", "content": text})
        text = template.render(messages, add_generation_prompt=True)
        # the template writes BOS itself when the model wants it (llama.cpp does the same)
        prompt_ids = tok.encode(text, add_special=False, parse_special=True)
        if tok.add_bos and (not prompt_ids or prompt_ids[0] != tok.bos_id):
            prompt_ids.insert(0, tok.bos_id)
    else:
        prompt_ids = tok.encode(text, add_special=True, parse_special=True)
    if not prompt_ids:
        raise GGFlatError("the prompt is empty after tokenization")

    cache = model.new_cache(n_ctx or None, kv_dtype=cache_type_k)
    params = sampling_params(kw, cache.n_ctx)
    gen = Generator(model, cache, cache.new_sequence(), prompt_ids, Sampler(params, model.n_vocab),
                    n_predict=n_predict, n_top_logprobs=top_logprobs if as_json else 0,
                    ignore_eos=ignore_eos, n_batch=n_batch, want_logprobs=as_json)
    gen.stats.load_seconds = time.perf_counter() - t_load

    out = sys.stdout
    for ev in gen:
        if as_json:
            if ev.id < 0:
                continue   # the stream decoder's flush: the pieces already carried these bytes
            obj = {"id": ev.id, "text": ev.piece.decode("utf-8", errors="replace"), "bytes": list(ev.piece),
                   "logprob": round(ev.logprob, 6)}
            if top_logprobs:
                obj["top_logprobs"] = [{"id": i, "logprob": round(lp, 6)} for i, lp in ev.top_logprobs]
            out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        else:
            out.write(ev.text)
        out.flush()
    if not as_json:
        out.write("\n")
        out.flush()
    print(gen.stats.summary(), file=sys.stderr)
