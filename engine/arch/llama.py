"""The ``llama`` architecture: Llama 2/3, SmolLM2, Mistral-style models.

Pre-norm decoder: x += Wo·attn(rope(Wq·n(x)), rope(Wk·n(x)), Wv·n(x));
x += Wdown·(silu(Wgate·n(x)) * Wup·n(x)); logits = Wout·n(x).
RoPE rotates adjacent pairs ("normal" mode): the GGUF converter already permuted
Wq/Wk from the Hugging Face layout for it.
"""
from __future__ import annotations

from engine.config import ModelConfig
from ggml_py import Graph, ops

from .common import WeightTable, step_inputs, with_bias


def build_graph(cfg: ModelConfig, wt: WeightTable, n_tokens: int, n_out: int, max_pages: int) -> Graph:
    g = Graph(f"llama n={n_tokens} out={n_out}")
    inp = step_inputs(g, n_tokens, n_out, max_pages)
    n, d, hd = n_tokens, cfg.n_embd, cfg.head_dim_k
    q_dim, kv_dim = cfg.n_head * hd, cfg.n_head_kv * hd

    tok_embd = wt.get(g, "token_embd.weight", (cfg.n_vocab, d))
    x = ops.get_rows(tok_embd, inp.tokens)                                   # (n, d)

    for il in range(cfg.n_layers):
        p = f"blk.{il}."
        h = ops.rms_norm(x, cfg.rms_eps, wt.get(g, p + "attn_norm.weight", (d,)))
        q = with_bias(ops.mul_mat(wt.get(g, p + "attn_q.weight", (q_dim, d)), h), wt.optional(g, p + "attn_q.bias"))
        k = with_bias(ops.mul_mat(wt.get(g, p + "attn_k.weight", (kv_dim, d)), h), wt.optional(g, p + "attn_k.bias"))
        v = with_bias(ops.mul_mat(wt.get(g, p + "attn_v.weight", (kv_dim, d)), h), wt.optional(g, p + "attn_v.bias"))
        q = ops.rope(ops.reshape(q, (n, cfg.n_head, hd)), inp.pos, cfg.n_rot, cfg.rope_base,
                     cfg.rope_freq_scale, ops.ROPE_NORMAL)
        k = ops.rope(ops.reshape(k, (n, cfg.n_head_kv, hd)), inp.pos, cfg.n_rot, cfg.rope_base,
                     cfg.rope_freq_scale, ops.ROPE_NORMAL)
        v = ops.reshape(v, (n, cfg.n_head_kv, cfg.head_dim_v))

        kv = g.kv_layer(il, cfg.n_head_kv, hd, cfg.head_dim_v)
        stored = ops.kv_store(kv, k, v, inp.slots, inp.pos)
        a = ops.attention(q, kv, inp.block_table, inp.kv_len, inp.pos, cfg.attn_scale, after=(stored,))
        o = ops.mul_mat(wt.get(g, p + "attn_output.weight", (d, cfg.n_head * cfg.head_dim_v)), a)   # (n, d)

        if il == cfg.n_layers - 1:       # only the rows whose logits are wanted go on
            o = ops.get_rows(o, inp.out_ids)
            x = ops.get_rows(x, inp.out_ids)
        x = ops.add(o, x)

        h = ops.rms_norm(x, cfg.rms_eps, wt.get(g, p + "ffn_norm.weight", (d,)))
        gate = ops.mul_mat(wt.get(g, p + "ffn_gate.weight", (cfg.n_ff, d)), h)
        up = ops.mul_mat(wt.get(g, p + "ffn_up.weight", (cfg.n_ff, d)), h)
        x = ops.add(ops.mul_mat(wt.get(g, p + "ffn_down.weight", (d, cfg.n_ff)), ops.swiglu(gate, up)), x)

    x = ops.rms_norm(x, cfg.rms_eps, wt.get(g, "output_norm.weight", (d,)))
    out_w = wt.optional(g, "output.weight", (cfg.n_vocab, d))
    if out_w is None:                                                       # tied embeddings
        out_w = tok_embd
    g.output("logits", ops.mul_mat(out_w, x))                                # (n_out, n_vocab)
    return g
