"""Write a random-weight GGUF of any llama shape and quant type, for benchmarks.

The device machine cannot receive multi-GB model files, so benchmarks of large
shapes run on models made there by this tool. THE WEIGHTS ARE RANDOM: the model
produces noise, and only its speed means anything. The file says so in
``general.name`` and this tool says so on stderr.

Blocks are made directly (random quant codes, small random f16 scales), not by
quantizing random floats, so an 8B-shape file takes seconds, not minutes.

    python benchmarks/make_synthetic.py --shape llama3-8b --type Q4_0 -o /tmp/llama8b-q4_0.gguf
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

SHAPES = {
    # name: (n_layer, n_embd, n_ff, n_head, n_head_kv, n_vocab, rope_base, ctx)
    "smollm2-135m": (30, 576, 1536, 9, 3, 49152, 100000.0, 8192),
    "llama3-1b": (16, 2048, 8192, 32, 8, 128256, 500000.0, 131072),
    "llama3-8b": (32, 4096, 14336, 32, 8, 128256, 500000.0, 131072),
    "tiny": (2, 256, 512, 4, 2, 512, 10000.0, 2048),
}


def random_weight(rng: np.random.Generator, type_id: int, rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) weight of type ``type_id``: float arrays for F32/F16, else (rows, row_bytes) blocks."""
    from quant_formats import get_format, random_blocks

    name = get_format(type_id).name
    if name in ("F32", "F16"):
        w = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
        return w if name == "F32" else w.astype(np.float16)
    # ~N(0, 0.02) weights from 4-bit codes need scales near 0.02/8
    return random_blocks(rng, type_id, (rows, cols), 0.5 * 0.02 / 8, 1.5 * 0.02 / 8)


def write_synthetic(path: str, shape: str, type_name: str, seed: int = 0) -> None:
    import gguf

    n_layer, d, ff, nh, nkv, vocab, rope_base, ctx = SHAPES[shape]
    qtype = gguf.GGMLQuantizationType[type_name]
    rng = np.random.default_rng(seed)
    hd = d // nh
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"synthetic {shape} {type_name} (RANDOM WEIGHTS, for speed only)")
    w.add_block_count(n_layer)
    w.add_context_length(ctx)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_freq_base(rope_base)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(int(qtype) if int(qtype) < 32 else 0)
    # a SentencePiece-style vocabulary: <unk> <s> </s>, 256 byte tokens, then fillers
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    toks += [f"\u2581t{i}" for i in range(vocab - len(toks))]
    types = [2, 3, 3] + [6] * 256 + [1] * (vocab - 259)
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(vocab - 259)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)

    def add(name: str, rows: int, cols: int, t=qtype) -> None:
        arr = random_weight(rng, int(t), rows, cols)
        w.add_tensor(name, arr, raw_dtype=t if arr.dtype == np.uint8 else None)   # uint8: (rows, row_bytes)

    add("token_embd.weight", vocab, d)
    ones = np.ones(d, dtype=np.float32)
    for il in range(n_layer):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", ones)
        add(p + "attn_q.weight", nh * hd, d)
        add(p + "attn_k.weight", nkv * hd, d)
        add(p + "attn_v.weight", nkv * hd, d)
        add(p + "attn_output.weight", d, nh * hd)
        w.add_tensor(p + "ffn_norm.weight", ones)
        add(p + "ffn_gate.weight", ff, d)
        add(p + "ffn_up.weight", ff, d)
        add(p + "ffn_down.weight", d, ff)
    w.add_tensor("output_norm.weight", ones)
    add("output.weight", vocab, d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--type", default="Q4_0", help="ggml type of the matrices (Q4_0, Q4_1, Q8_0, Q4_K, F16, ...)")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    print(f"make_synthetic: writing {a.output}: {a.shape} shape, {a.type}, RANDOM WEIGHTS (speed benchmarks only)",
          file=sys.stderr)
    write_synthetic(a.output, a.shape, a.type, a.seed)
    print(f"make_synthetic: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
