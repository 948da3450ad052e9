"""The ``gemma3`` architecture (Gemma 3 text models).

Differences from llama (after llama.cpp's gemma3 graph and gemma_pytorch):
- token embeddings are scaled by sqrt(n_embd);
- Q and K get their own RMS norm (over the head dimension) before RoPE;
- RoPE rotates halves ("neox" mode); sliding-window layers use their own base
  (10,000) and every ``pattern``-th layer is global with the long-context base;
- attention and FFN outputs are RMS-normed again ("post-norms") before the residual add;
- the FFN is GELU(tanh)-gated;
- logits come from the tied token embedding (final soft-capping, which Gemma 3
  checkpoints do not use, is refused by ModelConfig).
The GGUF converter has already folded Gemma's ``(1 + w)`` norm scale into the stored weights.
"""
from __future__ import annotations

from engine.config import ModelConfig
from ggml_py import Graph, ops

from .common import WeightTable, step_inputs


def build_graph(cfg: ModelConfig, wt: WeightTable, n_tokens: int, n_out: int, max_pages: int) -> Graph:
    g = Graph(f"gemma3 n={n_tokens} out={n_out}")
    inp = step_inputs(g, n_tokens, n_out, max_pages)
    n, d, hd, hdv = n_tokens, cfg.n_embd, cfg.head_dim_k, cfg.head_dim_v
    eps = cfg.rms_eps

    tok_embd = wt.get(g, "token_embd.weight", (cfg.n_vocab, d))
    x = ops.scale(ops.get_rows(tok_embd, inp.tokens), cfg.embed_scale)        # (n, d)

    for il in range(cfg.n_layers):
        p = f"blk.{il}."
        h = ops.rms_norm(x, eps, wt.get(g, p + "attn_norm.weight", (d,)))
        q = ops.mul_mat(wt.get(g, p + "attn_q.weight", (cfg.n_head * hd, d)), h)
        k = ops.mul_mat(wt.get(g, p + "attn_k.weight", (cfg.n_head_kv * hd, d)), h)
        v = ops.mul_mat(wt.get(g, p + "attn_v.weight", (cfg.n_head_kv * hdv, d)), h)
        q = ops.rms_norm(ops.reshape(q, (n, cfg.n_head, hd)), eps, wt.get(g, p + "attn_q_norm.weight", (hd,)))
        k = ops.rms_norm(ops.reshape(k, (n, cfg.n_head_kv, hd)), eps, wt.get(g, p + "attn_k_norm.weight", (hd,)))
        base, fscale = cfg.layer_rope_base(il), cfg.layer_rope_scale(il)
        q = ops.rope(q, inp.pos, cfg.n_rot, base, fscale, ops.ROPE_NEOX)
        k = ops.rope(k, inp.pos, cfg.n_rot, base, fscale, ops.ROPE_NEOX)
        v = ops.reshape(v, (n, cfg.n_head_kv, hdv))

        kv = g.kv_layer(il, cfg.n_head_kv, hd, hdv)
        stored = ops.kv_store(kv, k, v, inp.slots, inp.pos)
        a = ops.attention(q, kv, inp.block_table, inp.kv_len, inp.pos, cfg.attn_scale,
                          window=cfg.layer_window(il), after=(stored,))
        o = ops.mul_mat(wt.get(g, p + "attn_output.weight", (d, cfg.n_head * hdv)), a)

        if il == cfg.n_layers - 1:
            o = ops.get_rows(o, inp.out_ids)
            x = ops.get_rows(x, inp.out_ids)
        o = ops.rms_norm(o, eps, wt.get(g, p + "post_attention_norm.weight", (d,)))
        x = ops.add(o, x)

        h = ops.rms_norm(x, eps, wt.get(g, p + "ffn_norm.weight", (d,)))
        gate = ops.mul_mat(wt.get(g, p + "ffn_gate.weight", (cfg.n_ff, d)), h)
        up = ops.mul_mat(wt.get(g, p + "ffn_up.weight", (cfg.n_ff, d)), h)
        f = ops.mul_mat(wt.get(g, p + "ffn_down.weight", (d, cfg.n_ff)), ops.geglu(gate, up))
        f = ops.rms_norm(f, eps, wt.get(g, p + "post_ffw_norm.weight", (d,)))
        x = ops.add(f, x)

    x = ops.rms_norm(x, eps, wt.get(g, "output_norm.weight", (d,)))
    out_w = wt.optional(g, "output.weight", (cfg.n_vocab, d))
    g.output("logits", ops.mul_mat(tok_embd if out_w is None else out_w, x))   # (n_out, n_vocab)
    return g
