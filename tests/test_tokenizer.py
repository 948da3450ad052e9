"""engine.tokenizer against llama.cpp.

What is checked, and against what:

* ``tests/reference/*/tokenize.jsonl``: llama.cpp's own output (both modes, both models).
* ``LLAMA_CPP`` at the bottom of this file: more ids produced by llama.cpp built
  from the vendored source (llama-cpp-python 0.3.36, commit 0c1e570, CPU,
  ``llama_tokenize`` / ``llama_detokenize`` on a ``vocab_only`` model) for tricky
  strings (whitespace runs, lone surrogates, control characters, Unicode 15
  characters, emoji sequences, partial special tokens, ...), for 20
  pre-tokenizer types (SmolLM2's vocabulary with ``tokenizer.ggml.pre``
  changed), and for Gemma's vocabulary with ``add_space_prefix`` switched on.
  During development the same harness also compared 23,000 random strings
  per model (both modes), 300-400 per pre-tokenizer type, the whole corpus,
  every token's attributes and pieces, and the detokenization of 3,000 random
  id sequences per model, with no difference.
* Independent implementations: Hugging Face ``tokenizers`` (BPE from the
  GGUF's vocab and merges, SmolLM2's own pre-tokenizer: digits split, then
  byte-level) on SmolLM2, and ``sentencepiece`` (a model proto written from the
  GGUF's pieces, scores and types) on every plain fragment for Gemma.
* First principles: tiny hand-made vocabularies whose merges are worked out in
  the comments.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

from engine.errors import TokenizerError
from engine.tokenizer import ATTR_CONTROL, ATTR_RSTRIP, ATTR_USER_DEFINED, Tokenizer
from tests.conftest import load_jsonl

MODELS = ["smollm2", "gemma3"]


def _metadata(path) -> dict:
    from engine.gguf_file import GGUFFile
    with GGUFFile(path) as gf:
        return dict(gf.metadata)


@pytest.fixture(scope="module")
def metadata(smollm2_path, gemma3_path):
    return {"smollm2": _metadata(smollm2_path), "gemma3": _metadata(gemma3_path)}


@pytest.fixture(scope="module")
def toks(metadata):
    return {name: Tokenizer.from_metadata(md) for name, md in metadata.items()}


# ----------------------------------------------------------------- reference file

@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_reference_file(toks, reference_dir, name):
    tok = toks[name]
    lines = load_jsonl(reference_dir / name / "tokenize.jsonl")
    assert lines
    for line in lines:
        assert tok.encode(line["text"], add_special=True, parse_special=False) == line["plain"], line["text"]
        assert tok.encode(line["text"], add_special=True, parse_special=True) == line["special"], line["text"]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_llama_cpp_extra_strings(toks, name):
    tok = toks[name]
    for text, (plain, special) in zip(LLAMA_CPP["EXTRA"], LLAMA_CPP["extra"][name]):
        assert tok.encode(text) == plain, repr(text)
        assert tok.encode(text, parse_special=True) == special, repr(text)


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["default", "gpt-2", "llama-bpe", "qwen2", "qwen35", "deepseek-llm",
                                 "deepseek-coder", "deepseek-v3", "falcon", "starcoder", "gpt-4o", "tekken",
                                 "chameleon", "poro-chat", "bailingmoe", "seed-coder", "minicpm5", "chatglm-bpe",
                                 "viking", "command-r"])
def test_pre_tokenizer_types(metadata, pre):
    tok = Tokenizer.from_metadata({**metadata["smollm2"], "tokenizer.ggml.pre": pre})
    for text, ids in zip(LLAMA_CPP["PRE_STRINGS"], LLAMA_CPP["pre"][pre]):
        assert tok.encode(text) == ids, (pre, text)


@pytest.mark.slow
def test_clean_up_spaces_gpt2(metadata):
    """pre 'gpt-2' detokenizes with clean_up_tokenization_spaces (llama_detokenize's three passes)."""
    tok = Tokenizer.from_metadata({**metadata["smollm2"], "tokenizer.ggml.pre": "gpt-2"})
    for text, ids, expected in LLAMA_CPP["detok_gpt2"]:
        assert tok.encode(text) == ids
        assert tok.decode(ids) == expected
    # smollm itself does not clean up
    assert toks_decode_roundtrip(Tokenizer.from_metadata(metadata["smollm2"]), LLAMA_CPP["detok_gpt2"][0][0])


def toks_decode_roundtrip(tok, text) -> bool:
    return tok.decode(tok.encode(text, add_special=False)) == text


@pytest.mark.slow
def test_gemma_with_space_prefix(metadata):
    """Llama-2-style add_space_prefix on Gemma's vocabulary: a space goes before the
    first fragment and before every fragment that follows a special (or user-defined)
    token, and decode strips one leading space from the first piece only."""
    tok = Tokenizer.from_metadata({**metadata["gemma3"], "tokenizer.ggml.add_space_prefix": True})
    texts = LLAMA_CPP["PRE_STRINGS"] + ["<start_of_turn>user\nHi<end_of_turn>", "  two"]
    for text, (plain, special, dec, dec_skip) in zip(texts, LLAMA_CPP["gemma_prefix"]):
        assert tok.encode(text) == plain, text
        assert tok.encode(text, parse_special=True) == special, text
        assert tok.decode(special) == dec, text
        assert tok.decode(special, skip_special=True) == dec_skip, text


# ----------------------------------------------------------------- independent implementations

TRICKY = [
    "Hello world", " Hello  world ", "   leading\ttabs\tand\nnewlines\r\n", "I'm sure they'LL say it's 'quoted'",
    "1234567890 3.14159 1,000,000 \u0661\u0662\u0663 \u00b2 \u00bd", "\u6771\u4eac\u306f\u65e5\u672c\u306e\u9996\u90fd\u3067\u3059\u3002",
    "\U0001F642\U0001F680\U0001F44D\U0001F3FD \U0001F468\u200d\U0001F469\u200d\U0001F467 \U0001FAE8",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043a\u0430\u043a \u0434\u0435\u043b\u0430?",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645", "def fib(n):\n    return n if n < 2 else fib(n-1)\n",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 \u201cquotes\u201d", "a\u0301 \u00a0\u2003\u3000 \u200b \ufffd \ue000 \u0378",
    "\x00\x01\x1c\x1f\x7f\x85", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "!!!???...,,,;;;:::", " ", "\n\n\n\n", "",
    "x" + " " * 20 + "y", "\t\t\tz", "<|im_start|>user\nHi<|im_end|>", "<start_of_turn>model\n<end_of_turn>",
    "<|im_sta", "<0x41>", "\u2581\u2581x", "\U0001D518\U0001D52B\U00010348",
]


@pytest.mark.slow
def test_smollm2_matches_hf_tokenizers(metadata, toks, corpus_text):
    """HF tokenizers' BPE with SmolLM2's own pre-tokenizer gives the same ids in plain
    mode (SmolLM2 has no user-defined tokens, and HF is given no added tokens)."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    md = metadata["smollm2"]
    vocab = {t: i for i, t in enumerate(md["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
    hf = HFTokenizer(models.BPE(vocab, merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok = toks["smollm2"]
    for text in TRICKY + [corpus_text]:
        assert tok.encode(text, parse_special=False) == hf.encode(text, add_special_tokens=False).ids, text[:80]


def _sentencepiece_from_metadata(md):
    """A SentencePiece BPE model proto written by hand from GGUF pieces (no protobuf package needed)."""
    import struct

    import sentencepiece as spm

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)

    def msg(num: int, data: bytes) -> bytes:
        return varint(num << 3 | 2) + varint(len(data)) + data

    def uint(num: int, v: int) -> bytes:
        return varint(num << 3) + varint(v)

    pieces = [msg(1, msg(1, t.encode()) + varint(2 << 3 | 5) + struct.pack("<f", s) + uint(3, ty))
              for t, s, ty in zip(md["tokenizer.ggml.tokens"], md["tokenizer.ggml.scores"].tolist(),
                                  md["tokenizer.ggml.token_type"].tolist())]
    trainer = uint(3, 2) + uint(35, 1) + uint(40, 3) + uint(41, 2) + uint(42, 1) + uint(43, 0)  # BPE, byte_fallback
    normalizer = msg(1, b"identity") + uint(3, 0) + uint(4, 0) + uint(5, 1)   # no dummy prefix, escape spaces
    return spm.SentencePieceProcessor(model_proto=b"".join(pieces) + msg(2, trainer) + msg(3, normalizer))


@pytest.mark.slow
def test_gemma3_fragments_match_sentencepiece(metadata, toks, corpus_text):
    """SentencePiece's BPE gives the same ids for every plain-text fragment (the text
    between special / user-defined tokens). Whole texts differ by design: llama.cpp
    cuts user-defined tokens such as "  " out of the raw text first, and makes "</s>"
    a control token (it is on its end-of-generation list), which SentencePiece does not."""
    sp = _sentencepiece_from_metadata(metadata["gemma3"])
    tok = toks["gemma3"]
    checked = 0
    for text in TRICKY + [corpus_text]:
        for frag in tok._partition(text, parse_special=False):
            if isinstance(frag, int):
                continue
            piece = text[frag[0]:frag[1]]
            assert tok.encode(piece, add_special=False) == sp.encode(piece), piece[:80]
            checked += 1
    assert checked > 100


# ----------------------------------------------------------------- decode, pieces, streaming

ROUND_TRIP = [t for t in TRICKY] + ["\U0001F469\u200d\U0001F52C " * 3, "tab\tsep\tvalues\n" * 3, "<|endoftext|> done"]
# SentencePiece vocabularies spell spaces as U+2581, so for Gemma a literal U+2581 in
# the text comes back as a space (llama.cpp does the same): leave those out there.
ROUND_TRIP_SPM = [t for t in ROUND_TRIP if "\u2581" not in t]


@pytest.mark.slow
def test_round_trip_smollm2(toks):
    tok = toks["smollm2"]
    for text in ROUND_TRIP:
        for ps in (False, True):
            assert tok.decode(tok.encode(text, parse_special=ps)) == text, repr(text)


@pytest.mark.slow
def test_round_trip_gemma3(toks):
    """Gemma adds BOS, which decodes as "<bos>" unless special tokens are skipped;
    with add_space_prefix=False nothing else is added or removed."""
    tok = toks["gemma3"]
    for text in ROUND_TRIP_SPM:
        for ps in (False, True):
            ids = tok.encode(text, parse_special=ps)
            assert ids[0] == tok.bos_id
            assert tok.decode(ids) == "<bos>" + text, repr(text)
            assert tok.decode(tok.encode(text, add_special=False, parse_special=ps)) == text, repr(text)
        if "<" not in text:   # no control tokens in the text: skipping specials only drops BOS
            assert tok.decode(tok.encode(text), skip_special=True) == text, repr(text)
    assert tok.decode(tok.encode("\u2581\u2581x", add_special=False)) == "  x"


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_stream_decoder_never_breaks_characters(toks, name):
    tok = toks[name]
    texts = (ROUND_TRIP if name == "smollm2" else ROUND_TRIP_SPM) + ["\U0001F642", "\U0001FAE8\U0001FAAD", "\U0002B739\U00031350 \u0cf3", "\u0378\ue000"]
    split_seen = False
    for text in texts:
        ids = tok.encode(text, add_special=False, parse_special=True)
        dec = tok.stream_decoder()
        pieces = [dec.push(i) for i in ids]
        tail = dec.flush()
        assert "".join(pieces) + tail == text
        if "\ufffd" not in text:
            assert not any("\ufffd" in p for p in pieces)
        # a character split over byte tokens: the first part yields nothing
        split_seen |= any(p == "" and tok.token_to_piece(i) for p, i in zip(pieces, ids))
    assert split_seen


@pytest.mark.slow
def test_stream_decoder_on_truncated_character(toks):
    tok = toks["smollm2"]
    ids = tok.encode("\U0001F642")                     # two byte-level tokens: F0 9F | 99 82
    assert [tok.token_to_piece(i) for i in ids] == [b"\xf0\x9f", b"\x99\x82"]
    dec = tok.stream_decoder()
    assert dec.push(ids[0]) == ""
    assert dec.flush() == "\ufffd"                     # an unfinished character at the very end
    dec = tok.stream_decoder()
    assert dec.push(ids[0]) == "" and dec.push(ids[1]) == "\U0001F642" and dec.flush() == ""


@pytest.mark.slow
def test_token_to_piece(toks):
    sm, ge = toks["smollm2"], toks["gemma3"]
    assert sm.token_to_piece(sm.token_id("\u0120world")) == b" world"        # byte-level alphabet undone
    assert sm.token_to_piece(sm.token_id("\u010a")) == b"\n"
    assert sm.token_to_piece(2) == b"<|im_end|>" and sm.token_to_piece(2, special=False) == b""
    assert ge.token_to_piece(ge.token_id("\u2581Hello")) == b" Hello"         # SPM: U+2581 -> space
    assert ge.token_to_piece(ge.token_id("<0xF0>")) == b"\xf0"                # byte token -> that byte
    assert ge.token_to_piece(ge.token_id("  ")) == b"  "                      # user-defined: as is
    assert ge.token_to_piece(ge.token_id("<end_of_turn>"), special=False) == b""
    assert ge.token_to_piece(ge.token_id("<table>"), special=False) == b"<table>"   # user-defined stays
    with pytest.raises(TokenizerError):
        sm.token_to_piece(sm.n_vocab)
    with pytest.raises(TokenizerError):
        sm.decode([-1])


# ----------------------------------------------------------------- special tokens and EOG

@pytest.mark.slow
def test_special_ids_and_eog(toks):
    sm, ge = toks["smollm2"], toks["gemma3"]
    assert (sm.n_vocab, sm.bos_id, sm.eos_id, sm.add_bos, sm.add_eos) == (49152, 1, 2, False, False)
    assert (ge.n_vocab, ge.bos_id, ge.eos_id, ge.add_bos, ge.add_eos) == (262144, 2, 1, True, False)
    # llama.cpp (printed by the vendored build): <|endoftext|>, <|im_end|>, <reponame> (its FIM repo token)
    assert sm.eog_ids == frozenset({0, 2, 4})
    # <eos>, <end_of_turn>, and "</s>" (an HTML-tag token, but its text is on llama.cpp's EOG list)
    assert ge.eog_ids == frozenset({1, 106, 212})
    assert ge.token_text(106) == "<end_of_turn>" and ge.token_text(212) == "</s>"
    assert all(sm.is_control(i) for i in sm.eog_ids) and all(ge.is_control(i) for i in ge.eog_ids)
    # "</s>" became CONTROL on top of USER_DEFINED, so plain mode no longer cuts it out
    assert ge.token_attr(212) == ATTR_USER_DEFINED | ATTR_CONTROL
    assert 212 not in ge.encode("a</s>b") and 212 in ge.encode("a</s>b", parse_special=True)
    assert not ge.is_control(ge.token_id("<table>"))


@pytest.mark.slow
def test_user_defined_tokens_are_cut_even_in_plain_mode(toks):
    ge = toks["gemma3"]
    assert ge.encode("a  b<table>c", add_special=False) == [
        ge.token_id("a"), ge.token_id("  "), ge.token_id("b"), ge.token_id("<table>"), ge.token_id("c")]
    # longest first: three newlines are one token, not "\n\n" + "\n"
    assert ge.encode("\n\n\n", add_special=False) == [ge.token_id("\n\n\n")]


# ----------------------------------------------------------------- speed

@pytest.fixture(scope="module")
def corpus_text(reference_dir):
    return (reference_dir / "corpus.txt").read_text(encoding="utf-8")


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_load_and_corpus_speed(metadata, corpus_text, name):
    """Loose bounds for a slow 2-core CI machine (typical: load 0.05 s / 0.15 s,
    corpus 0.05 s / 0.15 s for SmolLM2 / Gemma 3)."""
    t0 = time.perf_counter()
    tok = Tokenizer.from_metadata(metadata[name])
    t1 = time.perf_counter()
    ids = tok.encode(corpus_text)
    t2 = time.perf_counter()
    assert t1 - t0 < 2.0
    assert t2 - t1 < 10.0
    assert len(ids) == {"smollm2": 29146, "gemma3": 28752}[name]   # llama.cpp's counts


# ----------------------------------------------------------------- first principles: tiny vocabularies

def _spm_md(pieces: list[tuple[str, float, int]], **extra) -> dict:
    return {"tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [p for p, _, _ in pieces],
            "tokenizer.ggml.scores": np.array([s for _, s, _ in pieces], dtype=np.float32),
            "tokenizer.ggml.token_type": np.array([t for _, _, t in pieces], dtype=np.int32),
            **extra}


def _bytes_pieces() -> list[tuple[str, float, int]]:
    return [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]


def test_spm_merges_by_score_tiny_vocab():
    # ids: 0 <unk>, 1 <s>, 2 </s>, then normal pieces, then the 256 byte tokens
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3),
              ("\u2581", -1.0, 1),        # 3
              ("a", -1.0, 1),             # 4
              ("b", -1.0, 1),             # 5
              ("ab", -2.0, 1),            # 6
              ("\u2581a", -3.0, 1),       # 7
              ("\u2581ab", -4.0, 1),      # 8
              ("ba", -0.5, 1),            # 9
              ] + _bytes_pieces()         # 10.. : <0x00> is 10
    tok = Tokenizer.from_metadata(_spm_md(pieces))
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_space_prefix) == (1, 2, True, True)
    # " ab" -> "▁ab": bigrams "▁a" (-3) and "ab" (-2); "ab" wins, then "▁"+"ab" = "▁ab" (-4).
    assert tok.encode("ab") == [1, 8]
    # "▁aba": "ba" (-0.5) beats "ab" (-2) and "▁a" (-3): ▁ a ba; then "▁a" (-3): ▁a ba
    assert tok.encode("aba", add_special=False) == [7, 9]
    # "c" is no piece: byte fallback <0x63> (= id 10 + 0x63); the space prefix is "▁" (3)
    assert tok.encode("c", add_special=False) == [3, 10 + 0x63]
    # two spaces become "▁▁", which is not a piece: two "▁" tokens
    assert tok.encode(" ", add_special=False) == [3, 3]
    # parse_special: "</s>" is a control token; the fragment after it gets a space prefix too
    assert tok.encode("a</s>a", add_special=False, parse_special=True) == [7, 2, 7]
    assert tok.decode([1, 8, 2, 7]) == "<s> ab</s> a"      # one leading space stripped, from the first piece only
    assert tok.decode([8, 7], skip_special=True) == "ab a"


def test_spm_without_space_prefix_and_eos():
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3), ("\u2581", -1.0, 1), ("a", -1.0, 1),
              ("\u2581a", -0.5, 1), ("<b>", 0.0, 4)] + _bytes_pieces()
    md = _spm_md(pieces, **{"tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.add_eos_token": True})
    tok = Tokenizer.from_metadata(md)
    assert tok.encode("a a") == [1, 4, 5, 2]             # BOS a ▁a EOS
    assert tok.encode("a<b>a") == [1, 4, 6, 4, 2]        # user-defined <b> cut out even in plain mode
    assert tok.encode("") == [1, 2]


def _gpt2_md(tokens: list[str], merges: list[str], pre: str = "gpt-2", **extra) -> dict:
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0,
            **extra}


def test_bpe_merges_by_rank_tiny_vocab():
    # the byte-level alphabet writes " " as "Ġ"
    tokens = ["<|endoftext|>", "a", "b", "c", "\u0120", "ab", "bc", "\u0120a", "\u0120ab", "abc", ","]
    merges = ["b c", "\u0120 a", "a b", "\u0120a b", "ab c"]
    md = _gpt2_md(tokens, merges, **{"tokenizer.ggml.token_type": np.array([3] + [1] * 10, dtype=np.int32)})
    tok = Tokenizer.from_metadata(md)
    # "abc": pairs "a b" (rank 2) and "b c" (rank 0): b+c first -> a bc; no merge "a bc" -> [a, bc]
    assert tok.encode("abc") == [1, 6]
    # " ab" is one piece "Ġab": "Ġ a" (rank 1) beats "a b" (rank 2) -> Ġa b; then "Ġa b" (rank 3) -> Ġab
    assert tok.encode(" ab") == [8]
    # "ab ab": pieces "ab", " ab"
    assert tok.encode("ab ab") == [5, 8]
    # the gpt-2 pre-tokenizer cleans spaces on decode: "a ," -> "a,"
    assert tok.decode([1, 4, 10]) == "a,"
    assert tok.decode([1, 4]) == "a "
    # a symbol with no token: "d" is not in the vocabulary, so it is dropped (llama.cpp does the same)
    assert tok.encode("d") == []
    assert tok.encode("<|endoftext|>a", parse_special=True) == [0, 1]
    assert tok.encode("<|endoftext|>a") == [1]           # plain: "<", "|", ... are not tokens here


def test_bpe_llama3_ignore_merges():
    # llama3 pre: a piece that is already a token is taken whole, even without a merge path
    tokens = ["<|begin_of_text|>", "h", "e", "l", "o", "hello"]
    tok = Tokenizer.from_metadata(_gpt2_md(tokens, ["h e"], pre="llama-bpe"))
    assert tok.add_bos and tok.bos_id == 0                # llama3 defaults to adding BOS
    assert tok.encode("hello") == [0, 5]
    tok2 = Tokenizer.from_metadata(_gpt2_md(tokens, ["h e"], pre="gpt-2"))
    assert tok2.encode("hello") == [1, 2, 3, 3, 4]       # gpt-2: only the merge "h e" exists... and "he" is no token


def test_rstrip_attribute_phi3():
    """phi-3 models: special tokens eat the spaces after them (llama.cpp sets RSTRIP by model name)."""
    tokens = ["<unk>", "<s>", "</s>", "<|user|>", "a", "\u0120", "\u0120a"]
    md = _gpt2_md(tokens, ["\u0120 a"], **{"general.name": "Phi-3 mini",
                                          "tokenizer.ggml.token_type": np.array([2, 3, 3, 3, 1, 1, 1], dtype=np.int32)})
    tok = Tokenizer.from_metadata(md)
    assert tok.token_attr(3) & ATTR_RSTRIP and not tok.token_attr(1) & ATTR_RSTRIP
    assert tok.encode("<|user|>  a", parse_special=True) == [3, 4]
    assert tok.encode("<s>  a", parse_special=True) == [1, 5, 6]


# ----------------------------------------------------------------- bad metadata

def _good_gpt2() -> dict:
    return _gpt2_md(["<|endoftext|>", "a", "b", "ab"], ["a b"])


@pytest.mark.parametrize("change, message", [
    ({"tokenizer.ggml.model": None}, "tokenizer.ggml.model missing"),
    ({"tokenizer.ggml.model": "bert"}, "unsupported tokenizer model 'bert'"),
    ({"tokenizer.ggml.tokens": []}, "tokens is missing or empty"),
    ({"tokenizer.ggml.tokens": "abc"}, "tokens is missing or empty"),
    ({"tokenizer.ggml.tokens": ["a", 3]}, r"tokens\[1\] is not a string"),
    ({"tokenizer.ggml.tokens": ["<|endoftext|>", "a", "b", "a"]}, r"tokens\[3\] = 'a' appears more than once"),
    ({"tokenizer.ggml.merges": None}, "merges is missing"),
    ({"tokenizer.ggml.merges": ["ab"]}, r"merges\[0\] = 'ab' is not two symbols"),
    ({"tokenizer.ggml.merges": [" ab"]}, r"merges\[0\]"),
    ({"tokenizer.ggml.pre": "no-such-pre"}, "unknown pre-tokenizer type 'no-such-pre'"),
    ({"tokenizer.ggml.bos_token_id": 4}, r"bos_token_id = 4 is outside the vocabulary \(0..3\)"),
    ({"tokenizer.ggml.eos_token_id": -1}, "eos_token_id = -1 is outside"),
    ({"tokenizer.ggml.eos_token_id": "1"}, "eos_token_id is not an integer"),
    ({"tokenizer.ggml.scores": np.zeros(3, np.float32)}, "scores has 3 entries for 4 tokens"),
    ({"tokenizer.ggml.scores": np.array([0, math.nan, 0, 0], np.float32)}, "scores contains NaN"),
    ({"tokenizer.ggml.scores": ["x"] * 4}, "scores is not a 1-D numeric array"),
    ({"tokenizer.ggml.token_type": np.ones(2, np.int32)}, "token_type has 2 entries for 4 tokens"),
    ({"tokenizer.ggml.token_type": np.ones((2, 2), np.int32)}, "token_type is not a 1-D integer array"),
    ({"tokenizer.ggml.add_bos_token": "yes"}, "add_bos_token is not a boolean"),
    ({"tokenizer.ggml.bos_token_id": None, "tokenizer.ggml.pre": "chatglm-bpe",
      "tokenizer.ggml.add_bos_token": True}, "asks for a BOS token"),
])
def test_bad_metadata(change, message):
    md = {**_good_gpt2(), **change}
    md = {k: v for k, v in md.items() if v is not None}
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_metadata(md)


def test_unknown_pre_message_names_it_and_is_one_line():
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_metadata({**_good_gpt2(), "tokenizer.ggml.pre": "weird\npre"})
    assert "'weird\\npre'" in str(e.value) and "\n" not in str(e.value)


def test_missing_pre_means_default():
    tok = Tokenizer.from_metadata({k: v for k, v in _good_gpt2().items() if k != "tokenizer.ggml.pre"})
    assert tok.encode("ab") == [3]


def test_empty_token_text_is_renamed():
    md = {**_good_gpt2(), "tokenizer.ggml.tokens": ["<|endoftext|>", "a", "", "ab"]}
    tok = Tokenizer.from_metadata(md)
    assert tok.token_text(2) == "[EMPTY_2]"


def test_encode_rejects_bytes():
    tok = Tokenizer.from_metadata(_good_gpt2())
    with pytest.raises(TypeError):
        tok.encode(b"ab")


# ----------------------------------------------------------------- data from llama.cpp

# Produced by llama.cpp built from the vendored source (see the module docstring); strings are
# written with \u escapes so that no editor normalizes them.
LLAMA_CPP = {
    "EXTRA": [
        '',
        ' ',
        '  ',
        '\n',
        '\n\n\n',
        '\t\t',
        ' \n ',
        '   \t\n\r\n  x',
        'x \n\n y',
        "Hello, world! How's it going? I'LL SEE, we'd've they'Re",
        '3.14159e-10 + 42 = 1,234,567.89 \u0661\u0662\u0663 \xb2\xb3 \xbd \u216b',
        '\u6771\u4eac\u306f\u65e5\u672c\u306e\u9996\u90fd\u3067\u3059\u3002\ud55c\uad6d\uc5b4 \u3053\u3093\u306b\u3061\u306f \u4e2d\u6587',
        '\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 \U0001f44d\U0001f3fd \U0001f1eb\U0001f1f7 \u2764\ufe0f \U0001fae8 \U0001faad',
        'def f(x):\n\treturn x**2  # comment\n\n\nclass A: pass',
        '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n',
        '<|im_start|><|im_start|>x<|im_end|>',
        '<|im_sta',
        '<|im_start',
        'im_start|>',
        '<<|im_end|>>',
        '<|im_end|>|>',
        '<|endoftext|><|endoftext|',
        '<start_of_turn>model\n<end_of_turn><eos><bos><pad>',
        '<start_of_turn',
        '</s><s>',
        '<unused42>',
        '<0x41><0xE2>',
        '[multimodal]',
        '<table><tr><td>x</td></tr></table>',
        'a\u0301e\u0308 \u0378\ue000 \ufffd \x00\x01\x1f\x7f \xa0\u2003\u3000 \u200b\u200d',
        '\ud83d',
        'x\udc80y',
        'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa',
        '                                 ',
        '\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n',
        '\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t',
        '  \t  \t\t \n  \n',
        '\uff21\uff22\uff23\uff11\uff12\uff13\uff01\uff1f',
        '\xdcn\xefc\xf6d\xe9 \xc6\xd8\xc5 \xdf',
        '\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645',
        '\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e',
        '\U0001d518\U0001d52b\U0001d526 \U00010348 \U0001f600\U0001f4a9',
        'https://x.y/z?a=1&b=%20#f',
        'C:\\path\\to\\file.txt',
        "{'a': [1, 2]}",
        '  leading and trailing  ',
        'word\u3000word\xa0word\u2009word\x85word',
        '\u0cf3\u0ece \U00011f50\U00011f51 \U0001e4f0',
    ],
    "PRE_STRINGS": [
        "Hello, world! I'LL see 12345 apples.",
        '  x\n\n\t y  \r\n z   ',
        "\u6771\u4eac 123 \u0661\u0662 CamelCaseWord HTTPServer don't",
        '\xe9t\xe9 \xc9T\xc9 a\u0301b \U0001f600!!?? ...$$$ <tag>',
        '\u0445\u043e\u0440\u043e\u0448\u043e 3.14 \u2014 \xab\xbb \u201cq\u201d',
    ],
    # per model: [plain, special] for each of EXTRA
    "extra": {
        "smollm2": [
            [[], []],
            [[216], [216]],
            [[256], [256]],
            [[198], [198]],
            [[16506], [16506]],
            [[1656], [1656]],
            [[3717, 216], [3717, 216]],
            [[333, 197, 198, 23799, 1792], [333, 197, 198, 23799, 1792]],
            [[104, 38028, 329], [104, 38028, 329]],
            [
                [
                    19556, 28, 905, 17, 1073, 506, 357, 2045, 47, 339, 23, 16421, 334, 8405, 28, 392, 6737, 3543,
                    502, 23, 3733,
                ],
                [
                    19556, 28, 905, 17, 1073, 506, 357, 2045, 47, 339, 23, 16421, 334, 8405, 28, 392, 6737, 3543,
                    502, 23, 3733,
                ],
            ],
            [
                [
                    35, 30, 33, 36, 33, 37, 41, 85, 29, 33, 32, 1232, 216, 36, 34, 446, 216, 33, 28, 34, 35, 36,
                    28, 37, 38, 39, 30, 40, 41, 216, 164, 111, 164, 112, 164, 113, 216, 19133, 39050, 216, 16738,
                    216, 173, 223, 121,
                ],
                [
                    35, 30, 33, 36, 33, 37, 41, 85, 29, 33, 32, 1232, 216, 36, 34, 446, 216, 33, 28, 34, 35, 36,
                    28, 37, 38, 39, 30, 40, 41, 216, 164, 111, 164, 112, 164, 113, 216, 19133, 39050, 216, 16738,
                    216, 173, 223, 121,
                ],
            ],
            [
                [
                    30679, 126, 16736, 122, 7365, 124, 23274, 115, 40993, 26453, 180, 116, 240, 180, 38466, 7365,
                    117, 39958, 19076, 33085, 246, 181, 130, 251, 183, 240, 129, 46673, 237, 10391, 237, 41152,
                    7365, 111, 7365, 124, 216, 28589, 29184,
                ],
                [
                    30679, 126, 16736, 122, 7365, 124, 23274, 115, 40993, 26453, 180, 116, 240, 180, 38466, 7365,
                    117, 39958, 19076, 33085, 246, 181, 130, 251, 183, 240, 129, 46673, 237, 10391, 237, 41152,
                    7365, 111, 7365, 124, 216, 28589, 29184,
                ],
            ],
            [
                [
                    10813, 235, 118, 321, 231, 10813, 235, 119, 321, 231, 10813, 235, 117, 321, 231, 10813, 235,
                    116, 15107, 235, 231, 10813, 233, 138, 15107, 225, 121, 10813, 225, 132, 4636, 247, 114, 31752,
                    15107, 121, 118, 15107, 120, 251,
                ],
                [
                    10813, 235, 118, 321, 231, 10813, 235, 119, 321, 231, 10813, 235, 117, 321, 231, 10813, 235,
                    116, 15107, 235, 231, 10813, 233, 138, 15107, 225, 121, 10813, 225, 132, 4636, 247, 114, 31752,
                    15107, 121, 118, 15107, 120, 251,
                ],
            ],
            [
                [
                    1604, 275, 24, 104, 727, 198, 197, 5406, 1792, 828, 34, 216, 907, 5189, 1116, 198, 2064, 330,
                    42, 1301,
                ],
                [
                    1604, 275, 24, 104, 727, 198, 197, 5406, 1792, 828, 34, 216, 907, 5189, 1116, 198, 2064, 330,
                    42, 1301,
                ],
            ],
            [
                [
                    44, 108, 306, 79, 3738, 108, 46, 4093, 198, 26843, 44, 108, 306, 79, 486, 108, 46, 198, 44,
                    108, 306, 79, 3738, 108, 46, 520, 9531, 198,
                ],
                [1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198],
            ],
            [
                [
                    44, 108, 306, 79, 3738, 108, 21198, 108, 306, 79, 3738, 108, 46, 104, 44, 108, 306, 79, 486,
                    108, 46,
                ],
                [1, 1, 104, 2],
            ],
            [[44, 108, 306, 79, 40966], [44, 108, 306, 79, 40966]],
            [[44, 108, 306, 79, 3738], [44, 108, 306, 79, 3738]],
            [[306, 79, 3738, 108, 46], [306, 79, 3738, 108, 46]],
            [[33691, 108, 306, 79, 486, 108, 7791], [44, 2, 46]],
            [[44, 108, 306, 79, 486, 108, 46, 108, 46], [2, 108, 46]],
            [[44, 108, 486, 1714, 2692, 108, 21198, 108, 486, 1714, 2692, 108], [0, 44, 108, 486, 1714, 2692, 108]],
            [
                [
                    44, 3738, 79, 1714, 79, 20589, 46, 3980, 198, 44, 486, 79, 1714, 79, 20589, 21198, 85, 395,
                    21198, 34761, 21198, 16384, 46,
                ],
                [
                    44, 3738, 79, 1714, 79, 20589, 46, 3980, 198, 44, 486, 79, 1714, 79, 20589, 21198, 85, 395,
                    21198, 34761, 21198, 16384, 46,
                ],
            ],
            [[44, 3738, 79, 1714, 79, 20589], [44, 3738, 79, 1714, 79, 20589]],
            [[9617, 99, 21198, 99, 46], [9617, 99, 21198, 99, 46]],
            [[44, 419, 3447, 36, 34, 46], [44, 419, 3447, 36, 34, 46]],
            [[44, 32, 104, 36, 33, 21198, 32, 104, 53, 34, 46], [44, 32, 104, 36, 33, 21198, 32, 104, 53, 34, 46]],
            [[75, 10593, 306, 32058, 77], [75, 10593, 306, 32058, 77]],
            [
                [44, 6413, 21198, 8489, 21198, 11474, 46, 104, 9617, 11474, 29299, 8489, 29299, 6413, 46],
                [44, 6413, 21198, 8489, 21198, 11474, 46, 104, 9617, 11474, 29299, 8489, 29299, 6413, 46],
            ],
            [
                [
                    81, 151, 219, 85, 151, 226, 216, 152, 133, 185, 218, 218, 216, 24211, 216, 190, 191, 215, 217,
                    3351, 250, 321, 221, 12109, 218, 459, 229, 321, 231,
                ],
                [
                    81, 151, 219, 85, 151, 226, 216, 152, 133, 185, 218, 218, 216, 24211, 216, 190, 191, 215, 217,
                    3351, 250, 321, 221, 12109, 218, 459, 229, 321, 231,
                ],
            ],
            [[184, 250, 138], [184, 250, 138]],
            [[104, 184, 127, 218, 105], [104, 184, 127, 218, 105]],
            [
                [
                    46880, 46880, 46880, 46880, 46880, 46880, 46880, 46880, 46880, 46880, 46880, 46880, 46880,
                    46880, 46880, 46880,
                ],
                [
                    46880, 46880, 46880, 46880, 46880, 46880, 46880, 46880, 46880, 46880, 46880, 46880, 46880,
                    46880, 46880, 46880,
                ],
            ],
            [[12427, 216], [12427, 216]],
            [
                [22342, 22342, 22342, 22342, 22342, 22342, 22342, 22342, 22342, 22342],
                [22342, 22342, 22342, 22342, 22342, 22342, 22342, 22342, 22342, 22342],
            ],
            [[13591, 13591, 13591, 13591, 27655], [13591, 13591, 13591, 13591, 27655]],
            [[256, 197, 256, 1656, 3717, 32057], [256, 197, 256, 1656, 3717, 32057]],
            [
                [8083, 111, 8083, 112, 8083, 113, 8083, 235, 8083, 236, 8083, 237, 8083, 219, 8083, 249],
                [8083, 111, 8083, 112, 8083, 113, 8083, 235, 8083, 236, 8083, 237, 8083, 219, 8083, 249],
            ],
            [
                [142, 246, 94, 25972, 83, 7466, 84, 2756, 44741, 142, 242, 142, 223, 5549, 249],
                [142, 246, 94, 25972, 83, 7466, 84, 2756, 44741, 142, 242, 142, 223, 5549, 249],
            ],
            [
                [21706, 20602, 44626, 31462, 10805, 45726, 22208, 34966, 22208, 21706],
                [21706, 20602, 44626, 31462, 10805, 45726, 22208, 34966, 22208, 21706],
            ],
            [
                [30658, 35090, 38770, 16525, 26293, 30581, 12335, 116, 42990, 30658, 27011, 32932, 18075],
                [30658, 35090, 38770, 16525, 26293, 30581, 12335, 116, 42990, 30658, 27011, 32932, 18075],
            ],
            [
                [
                    23159, 238, 242, 23159, 238, 121, 23159, 238, 116, 216, 187, 234, 231, 226, 40303, 218, 10813,
                    236, 119,
                ],
                [
                    23159, 238, 242, 23159, 238, 121, 23159, 238, 116, 216, 187, 234, 231, 226, 40303, 218, 10813,
                    236, 119,
                ],
            ],
            [
                [4687, 1742, 104, 30, 105, 31, 106, 47, 81, 45, 33, 22, 82, 23446, 34, 32, 19, 86],
                [4687, 1742, 104, 30, 105, 31, 106, 47, 81, 45, 33, 22, 82, 23446, 34, 32, 19, 86],
            ],
            [[51, 19199, 1537, 76, 1141, 76, 2153, 30, 9047], [51, 19199, 1537, 76, 1141, 76, 2153, 30, 9047]],
            [[34026, 81, 1539, 933, 33, 28, 216, 34, 28852], [34026, 81, 1539, 933, 33, 28, 216, 34, 28852]],
            [[216, 2899, 284, 35079, 256], [216, 2899, 284, 35079, 256]],
            [
                [3002, 12109, 218, 3002, 15442, 3002, 321, 227, 3002, 141, 223, 3002],
                [3002, 12109, 218, 3002, 15442, 3002, 321, 227, 3002, 141, 223, 3002],
            ],
            [
                [171, 128, 128, 171, 136, 232, 216, 187, 235, 138, 234, 187, 235, 138, 235, 216, 187, 248, 237, 125],
                [171, 128, 128, 171, 136, 232, 216, 187, 235, 138, 234, 187, 235, 138, 235, 216, 187, 248, 237, 125],
            ],
        ],
        "gemma3": [
            [[2], [2]],
            [[2, 236743], [2, 236743]],
            [[2, 138], [2, 138]],
            [[2, 107], [2, 107]],
            [[2, 109], [2, 109]],
            [[2, 255969], [2, 255969]],
            [[2, 236743, 107, 236743], [2, 236743, 107, 236743]],
            [[2, 139, 255968, 107, 251, 107, 138, 236781], [2, 139, 255968, 107, 251, 107, 138, 236781]],
            [[2, 236781, 236743, 108, 570], [2, 236781, 236743, 108, 570]],
            [
                [
                    2, 9259, 236764, 1902, 236888, 2088, 236789, 236751, 625, 1771, 236881, 564, 236789, 2182,
                    74524, 236764, 692, 236789, 236753, 236789, 560, 901, 236789, 1479,
                ],
                [
                    2, 9259, 236764, 1902, 236888, 2088, 236789, 236751, 625, 1771, 236881, 564, 236789, 2182,
                    74524, 236764, 692, 236789, 236753, 236789, 560, 901, 236789, 1479,
                ],
            ],
            [
                [
                    2, 236800, 236761, 236770, 236812, 236770, 236810, 236819, 236744, 236772, 236770, 236771, 900,
                    236743, 236812, 236778, 578, 236743, 236770, 236764, 236778, 236800, 236812, 236764, 236810,
                    236825, 236832, 236761, 236828, 236819, 115241, 241303, 242044, 145191, 239158, 47041, 236743,
                    464, 371, 409,
                ],
                [
                    2, 236800, 236761, 236770, 236812, 236770, 236810, 236819, 236744, 236772, 236770, 236771, 900,
                    236743, 236812, 236778, 578, 236743, 236770, 236764, 236778, 236800, 236812, 236764, 236810,
                    236825, 236832, 236761, 236828, 236819, 115241, 241303, 242044, 145191, 239158, 47041, 236743,
                    464, 371, 409,
                ],
            ],
            [
                [2, 31414, 237048, 76444, 120211, 3652, 236924, 114216, 237430, 79433, 17346, 237364],
                [2, 31414, 237048, 76444, 120211, 3652, 236924, 114216, 237430, 79433, 17346, 237364],
            ],
            [
                [
                    2, 243874, 237243, 243767, 237243, 244814, 237243, 244990, 103712, 242713, 236743, 246598,
                    242644, 64813, 236743, 478, 397, 409, 406, 236743, 478, 397, 408, 411,
                ],
                [
                    2, 243874, 237243, 243767, 237243, 244814, 237243, 244990, 103712, 242713, 236743, 246598,
                    242644, 64813, 236743, 478, 397, 409, 406, 236743, 478, 397, 408, 411,
                ],
            ],
            [
                [
                    2, 2063, 517, 236769, 236781, 1473, 107, 255968, 2060, 1123, 1018, 236778, 138, 236865, 5739,
                    109, 1999, 562, 236787, 1786,
                ],
                [
                    2, 2063, 517, 236769, 236781, 1473, 107, 255968, 2060, 1123, 1018, 236778, 138, 236865, 5739,
                    109, 1999, 562, 236787, 1786,
                ],
            ],
            [
                [
                    2, 236820, 236909, 548, 236779, 3041, 111038, 2364, 107, 10979, 236820, 236909, 548, 236779,
                    643, 111038, 107, 236820, 236909, 548, 236779, 3041, 111038, 111457, 107,
                ],
                [
                    2, 236820, 236909, 548, 236779, 3041, 111038, 2364, 107, 10979, 236820, 236909, 548, 236779,
                    643, 111038, 107, 236820, 236909, 548, 236779, 3041, 111038, 111457, 107,
                ],
            ],
            [
                [
                    2, 236820, 236909, 548, 236779, 3041, 236909, 1798, 236909, 548, 236779, 3041, 111038, 236781,
                    236820, 236909, 548, 236779, 643, 111038,
                ],
                [
                    2, 236820, 236909, 548, 236779, 3041, 236909, 1798, 236909, 548, 236779, 3041, 111038, 236781,
                    236820, 236909, 548, 236779, 643, 111038,
                ],
            ],
            [[2, 236820, 236909, 548, 236779, 14243], [2, 236820, 236909, 548, 236779, 14243]],
            [[2, 236820, 236909, 548, 236779, 3041], [2, 236820, 236909, 548, 236779, 3041]],
            [[2, 548, 236779, 3041, 111038], [2, 548, 236779, 3041, 111038]],
            [[2, 6143, 236909, 548, 236779, 643, 236909, 6985], [2, 6143, 236909, 548, 236779, 643, 236909, 6985]],
            [
                [2, 236820, 236909, 548, 236779, 643, 111038, 111038],
                [2, 236820, 236909, 548, 236779, 643, 111038, 111038],
            ],
            [
                [2, 236820, 236909, 643, 1340, 1005, 236909, 1798, 236909, 643, 1340, 1005, 236909],
                [2, 236820, 236909, 643, 1340, 1005, 236909, 1798, 236909, 643, 1340, 1005, 236909],
            ],
            [
                [
                    2, 236820, 3041, 236779, 1340, 236779, 887, 236813, 4368, 107, 236820, 643, 236779, 1340,
                    236779, 887, 1798, 211827, 1798, 46757, 1798, 13039, 236813,
                ],
                [2, 105, 4368, 107, 106, 1, 2, 0],
            ],
            [[2, 236820, 3041, 236779, 1340, 236779, 887], [2, 236820, 3041, 236779, 1340, 236779, 887]],
            [[2, 954, 236751, 236813, 203], [2, 212, 203]],
            [[2, 236820, 63634, 236812, 236778, 236813], [2, 48]],
            [
                [2, 236820, 236771, 236781, 236812, 236770, 1798, 236771, 134948, 236778, 236813],
                [2, 236820, 236771, 236781, 236812, 236770, 1798, 236771, 134948, 236778, 236813],
            ],
            [[2, 5], [2, 5]],
            [[2, 168, 173, 175, 236781, 183, 181, 176], [2, 168, 173, 175, 236781, 183, 181, 176]],
            [
                [
                    2, 236746, 238288, 236744, 241151, 236743, 443, 422, 245863, 58588, 236743, 238, 249732,
                    253998, 251541, 236743, 432, 398, 464, 366, 369, 465, 366, 366, 36504, 237243,
                ],
                [
                    2, 236746, 238288, 236744, 241151, 236743, 443, 422, 245863, 58588, 236743, 238, 249732,
                    253998, 251541, 236743, 432, 398, 464, 366, 369, 465, 366, 366, 36504, 237243,
                ],
            ],
            [[2, 475, 398, 427], [2, 475, 398, 427]],
            [[2, 236781, 475, 416, 366, 236762], [2, 236781, 475, 416, 366, 236762]],
            [
                [2, 128820, 128820, 128820, 128820, 128820, 128820, 128820, 128820],
                [2, 128820, 128820, 128820, 128820, 128820, 128820, 128820, 128820],
            ],
            [[2, 167, 138], [2, 167, 138]],
            [[2, 137, 115], [2, 137, 115]],
            [[2, 255998, 255971], [2, 255998, 255971]],
            [
                [2, 138, 255968, 138, 255969, 236743, 107, 138, 107],
                [2, 138, 255968, 138, 255969, 236743, 107, 138, 107],
            ],
            [
                [2, 239549, 241577, 240847, 238254, 238540, 238995, 117573],
                [2, 239549, 241577, 240847, 238254, 238540, 238995, 117573],
            ],
            [
                [2, 238194, 236749, 238527, 236755, 55515, 236859, 129016, 240224, 239685, 114881],
                [2, 238194, 236749, 238527, 236755, 55515, 236859, 129016, 240224, 239685, 114881],
            ],
            [[2, 236873, 150345, 107602, 17193], [2, 236873, 150345, 107602, 17193]],
            [[2, 226767, 19975], [2, 226767, 19975]],
            [
                [2, 478, 395, 386, 390, 478, 395, 386, 409, 254865, 236743, 478, 382, 379, 374, 163543, 245526],
                [2, 478, 395, 386, 390, 478, 395, 386, 409, 254865, 236743, 478, 382, 379, 374, 163543, 245526],
            ],
            [
                [
                    2, 2574, 1411, 236781, 236761, 236762, 236786, 236802, 236881, 236746, 236784, 236770, 236880,
                    236763, 38077, 236778, 236771, 236865, 236760,
                ],
                [
                    2, 2574, 1411, 236781, 236761, 236762, 236786, 236802, 236881, 236746, 236784, 236770, 236880,
                    236763, 38077, 236778, 236771, 236865, 236760,
                ],
            ],
            [
                [2, 236780, 12289, 2337, 236785, 1071, 236785, 2164, 236761, 7090],
                [2, 236780, 12289, 2337, 236785, 1071, 236785, 2164, 236761, 7090],
            ],
            [
                [2, 64735, 236746, 2632, 870, 236770, 236764, 236743, 236778, 21111],
                [2, 64735, 236746, 2632, 870, 236770, 236764, 236743, 236778, 21111],
            ],
            [[2, 138, 26016, 532, 45330, 138], [2, 138, 26016, 532, 45330, 138]],
            [
                [2, 3017, 465, 366, 366, 3017, 432, 398, 3017, 464, 366, 375, 3017, 432, 371, 3017],
                [2, 3017, 465, 366, 366, 3017, 432, 398, 3017, 464, 366, 375, 3017, 432, 371, 3017],
            ],
            [
                [
                    2, 462, 417, 417, 462, 425, 380, 236743, 478, 383, 427, 382, 478, 383, 427, 383, 236743, 478,
                    396, 385, 414,
                ],
                [
                    2, 462, 417, 417, 462, 425, 380, 236743, 478, 383, 427, 382, 478, 383, 427, 383, 236743, 478,
                    396, 385, 414,
                ],
            ],
        ],
    },
    # SmolLM2 vocabulary, tokenizer.ggml.pre replaced: plain ids for each of PRE_STRINGS
    "pre": {
        "default": [
            [19556, 28, 905, 17, 339, 23, 16421, 963, 216, 33, 34, 35, 36, 37, 13855, 30],
            [216, 1792, 14436, 329, 256, 2738, 1892, 333],
            [
                30679, 126, 16736, 122, 216, 33, 34, 35, 216, 164, 111, 164, 112, 5784, 299, 10802, 21268, 43335,
                10740, 1326, 23, 100,
            ],
            [
                19380, 2756, 28239, 68, 39614, 253, 151, 219, 82, 40303, 218, 10095, 16693, 216, 2026, 9212, 20,
                216, 44, 9204, 46,
            ],
            [32122, 33175, 6485, 37123, 6485, 216, 35, 30, 33, 36, 216, 1265, 216, 39969, 20306, 216, 1585, 97, 573],
        ],
        "gpt-2": [
            [19556, 28, 905, 17, 339, 23, 16421, 963, 216, 33, 34, 35, 36, 37, 13855, 30],
            [216, 1792, 14436, 329, 256, 2738, 1892, 333],
            [
                30679, 126, 16736, 122, 216, 33, 34, 35, 16936, 111, 164, 112, 5784, 299, 10802, 21268, 43335,
                10740, 1326, 982,
            ],
            [
                19380, 2756, 28239, 68, 39614, 253, 151, 219, 82, 40303, 218, 10095, 16693, 4563, 9212, 20, 2067,
                9204, 46,
            ],
            [32122, 33175, 6485, 37123, 6485, 216, 35, 30, 33, 36, 1841, 23708, 20306, 619, 97, 573],
        ],
        "llama-bpe": [
            [19556, 28, 905, 17, 339, 23, 16421, 963, 216, 33, 34, 35, 36, 37, 13855, 30],
            [216, 1792, 1116, 197, 329, 256, 2738, 1892, 333],
            [
                30679, 126, 16736, 122, 216, 33, 34, 35, 216, 164, 111, 164, 112, 5784, 299, 10802, 21268, 43335,
                10740, 1326, 982,
            ],
            [
                19380, 2756, 28239, 68, 39614, 253, 151, 219, 82, 40303, 218, 10095, 16693, 4563, 9212, 20, 2067,
                9204, 46,
            ],
            [32122, 33175, 6485, 37123, 6485, 216, 35, 30, 33, 36, 1841, 23708, 20306, 619, 97, 573],
        ],
        "qwen2": [
            [19556, 28, 905, 17, 339, 23, 16421, 963, 216, 33, 34, 35, 36, 37, 13855, 30],
            [216, 1792, 1116, 197, 329, 256, 2738, 1892, 333],
            [
                30679, 126, 16736, 122, 216, 33, 34, 35, 216, 164, 111, 164, 112, 5784, 299, 10802, 21268, 43335,
                10740, 1326, 982,
            ],
            [
                19380, 2756, 28239, 68, 39614, 253, 151, 219, 82, 40303, 218, 10095, 16693, 4563, 9212, 20, 2067,
                9204, 46,
            ],
            [32122, 33175, 6485, 37123, 6485, 216, 35, 30, 33, 36, 1841, 23708, 20306, 619, 97, 573],
        ],
        "qwen35": [
            [19556, 28, 905, 17, 339, 23, 16421, 963, 216, 33, 34, 35, 36, 37, 13855, 30],
            [216, 1792, 1116, 197, 329, 256, 2738, 1892, 333],
            [
                30679, 126, 16736, 122, 216, 33, 34, 35, 216, 164, 111, 164, 112, 5784, 299, 10802, 21268, 43335,
                10740, 1326, 982,
            ],
            [
                19380, 2756, 28239, 68, 39614, 253, 151, 219, 82, 40303, 218, 10095, 16693, 4563, 9212, 20, 2067,
                9204, 46,
            ],
            [32122, 33175, 6485, 37123, 6485, 216, 35, 30, 33, 36, 1841, 23708, 20306, 619, 97, 573],
        ],
        "deepseek-llm": [
            [19556, 28, 905, 17, 339, 23, 16421, 963, 216, 33, 34, 35, 36, 37, 13855, 30],
            [216, 1792, 198, 198, 197, 329, 256, 201, 198, 1892, 333],
            [
                30679, 126, 16736, 122, 216, 33, 34, 35, 216, 164, 111, 164, 112, 5784, 299, 10802, 21268, 43335,
                10740, 1326, 23, 100,
            ],
            [
                2756, 100, 2756, 28239, 68, 39614, 253, 151, 219, 82, 40303, 218, 10095, 16693, 4563, 9212, 20,
                2067, 9204, 46,
            ],
            [32122, 33175, 6485, 37123, 6485, 216, 35, 30, 33, 36, 216, 1265, 23708, 20306, 216, 1585, 97, 573],
        ],
        "deepseek-coder": [
            [19556, 28, 905, 17, 339, 23, 16421, 963, 216, 33, 34, 35, 36, 37, 13855, 30],
            [216, 1792, 198, 198, 197, 329, 256, 201, 198, 1892, 333],
            [
                30679, 126, 16736, 122, 216, 33, 34, 35, 216, 164, 111, 164, 112, 5784, 299, 10802, 21268, 43335,
                10740, 1326, 23, 100,
            ],
            [
                19380, 2756, 28239, 68, 39614, 253, 151, 219, 82, 40303, 218, 10095, 16693, 4563, 9212, 20, 2067,
                9204, 46,
            ],
            [32122, 33175, 6485, 37123, 6485, 216, 35, 30, 33, 36, 216, 1265, 23708, 20306, 216, 1585, 97, 573],
        ],
        "deepseek-v3": [
            [19556, 28, 905, 17, 339, 23, 16421, 963, 216, 33, 34, 35, 36, 37, 13855, 30],
            [216, 1792, 1116, 197, 329, 256, 2738, 1892, 333],
            [
                30679, 126, 16736, 122, 216, 33, 34, 35, 216, 164, 111, 164, 112, 5784, 299, 10802, 21268, 43335,
                10740, 1326, 982,
            ],
            [
                19380, 2756, 28239, 68, 39614, 253, 151, 219, 82, 40303, 218, 10095, 16693, 4563, 9212, 20, 2067,
                9204, 46,
            ],
            [32122, 33175, 6485, 37123, 6485, 216, 35, 30, 33, 36, 1841, 23708, 20306, 619, 97, 573],
        ],
        "falcon": [
            [19556, 28, 905, 17, 339, 23, 16421, 963, 216, 33, 34, 35, 36, 37, 13855, 30],
            [216, 1792, 14436, 329, 256, 2738, 1892, 333],
            [
                30679, 126, 16736, 122, 216, 33, 34, 35, 16936, 111, 164, 112, 5784, 299, 10802, 21268, 43335,
                10740, 1326, 23, 100,
            ],
            [
                19380, 2756, 28239, 68, 39614, 253, 151, 219, 82, 40303, 218, 10095, 16693, 216, 2026, 9212, 20,
                216, 44, 9204, 46,
            ],
            [32122, 33175, 6485, 37123, 6485, 216, 35, 30, 33, 36, 216, 1265, 216, 39969, 20306, 216, 1585, 97, 573],
        ],
        "starcoder": [
            [19556, 28, 905, 17, 339, 23, 16421, 963, 216, 33, 34, 35, 36, 37, 13855, 30],
            [216, 1792, 14436, 329, 256, 2738, 1892, 333],
            [
                30679, 126, 16736, 122, 216, 33, 34, 35, 216, 164, 111, 164, 112, 5784, 299, 10802, 21268, 43335,
                10740, 1326, 982,
            ],
            [
                19380, 2756, 28239, 68, 39614, 253, 151, 219, 82, 40303, 218, 10095, 16693, 4563, 9212, 20, 2067,
                9204, 46,
            ],
            [32122, 33175, 6485, 37123, 6485, 216, 35, 30, 33, 36, 1841, 23708, 20306, 619, 97, 573],
        ],
        "gpt-4o": [
            [19556, 28, 905, 17, 339, 23, 16421, 963, 216, 33, 34, 35, 36, 37, 13855, 30],
            [216, 1792, 1116, 197, 329, 256, 2738, 1892, 333],
            [
                30679, 126, 16736, 122, 216, 33, 34, 35, 216, 164, 111, 164, 112, 5784, 299, 10802, 21268, 43335,
                10740, 1326, 982,
            ],
            [
                19380, 2756, 28239, 68, 39614, 253, 151, 219, 82, 40303, 218, 10095, 16693, 4563, 9212, 20, 2067,
                9204, 46,
            ],
            [32122, 33175, 6485, 37123, 6485, 216, 35, 30, 33, 36, 1841, 23708, 20306, 619, 97, 573],
        ],
        "tekken": [
            [19556, 28, 905, 17, 339, 23, 16421, 963, 216, 33, 34, 35, 36, 37, 13855, 30],
            [216, 1792, 1116, 197, 329, 256, 2738, 1892, 333],
            [
                30679, 126, 16736, 122, 216, 33, 34, 35, 216, 164, 111, 164, 112, 5784, 299, 10802, 21268, 43335,
                10740, 1326, 982,
            ],
            [
                19380, 2756, 28239, 68, 39614, 253, 151, 219, 82, 40303, 218, 10095, 16693, 4563, 9212, 20, 2067,
                9204, 46,
            ],
            [32122, 33175, 6485, 37123, 6485, 216, 35, 30, 33, 36, 1841, 23708, 20306, 619, 97, 573],
        ],
        "chameleon": [
            [19556, 28, 905, 17, 339, 23, 16421, 963, 216, 33, 34, 35, 36, 37, 13855, 30],
            [256, 104, 198, 198, 197, 329, 256, 201, 198, 1892, 256, 216],
            [
                30679, 126, 16736, 122, 216, 33, 34, 35, 216, 164, 111, 164, 112, 5784, 299, 10802, 21268, 43335,
                10740, 1326, 23, 100,
            ],
            [
                19380, 2756, 28239, 68, 39614, 253, 151, 219, 82, 40303, 218, 17, 17, 47, 47, 216, 30, 30, 30, 20,
                20, 20, 216, 44, 9204, 46,
            ],
            [32122, 33175, 6485, 37123, 6485, 216, 35, 30, 33, 36, 216, 1265, 216, 39969, 20306, 216, 1585, 97, 573],
        ],
        "poro-chat": [
            [19556, 28, 905, 17, 339, 23, 16421, 963, 216, 33, 34, 35, 36, 37, 13855, 30],
            [216, 1792, 14436, 329, 256, 2738, 1892, 333],
            [
                30679, 126, 16736, 122, 216, 33, 34, 35, 16936, 111, 164, 112, 5784, 299, 10802, 21268, 43335,
                10740, 1326, 982,
            ],
            [
                19380, 2756, 28239, 68, 39614, 253, 151, 219, 82, 40303, 218, 10095, 16693, 4563, 9212, 20, 2067,
                9204, 46,
            ],
            [32122, 33175, 6485, 37123, 6485, 216, 35, 30, 33, 36, 1841, 23708, 20306, 619, 97, 573],
        ],
        "bailingmoe": [
            [19556, 28, 905, 17, 339, 23, 16421, 963, 216, 33, 34, 35, 36, 37, 13855, 30],
            [216, 1792, 1116, 197, 329, 256, 2738, 1892, 333],
            [
                30679, 126, 16736, 122, 216, 33, 34, 35, 216, 164, 111, 164, 112, 5784, 299, 10802, 21268, 43335,
                10740, 1326, 982,
            ],
            [
                19380, 2756, 28239, 68, 39614, 253, 151, 219, 82, 40303, 218, 10095, 16693, 4563, 9212, 20, 2067,
                9204, 46,
            ],
            [32122, 33175, 6485, 37123, 6485, 216, 35, 30, 33, 36, 1841, 23708, 20306, 619, 97, 573],
        ],
        "seed-coder": [
            [19556, 28, 905, 17, 339, 23, 16421, 963, 216, 33, 34, 35, 36, 37, 13855, 30],
            [216, 1792, 1116, 197, 329, 256, 2738, 1892, 333],
            [
                30679, 126, 16736, 122, 216, 33, 34, 35, 216, 164, 111, 164, 112, 5784, 299, 10802, 21268, 43335,
                10740, 1326, 982,
            ],
            [
                19380, 2756, 28239, 68, 39614, 253, 151, 219, 82, 40303, 218, 10095, 16693, 4563, 9212, 20, 2067,
                9204, 46,
            ],
            [32122, 33175, 6485, 37123, 6485, 216, 35, 30, 33, 36, 1841, 23708, 20306, 619, 97, 573],
        ],
        "minicpm5": [
            [19556, 28, 905, 17, 339, 23, 16421, 963, 216, 33, 34, 35, 36, 37, 13855, 30],
            [216, 1792, 1116, 197, 329, 256, 2738, 1892, 333],
            [
                30679, 126, 16736, 122, 216, 33, 34, 35, 216, 164, 111, 164, 112, 5784, 299, 10802, 21268, 43335,
                10740, 1326, 982,
            ],
            [
                19380, 2756, 28239, 68, 39614, 253, 151, 219, 82, 40303, 218, 10095, 16693, 4563, 9212, 20, 2067,
                9204, 46,
            ],
            [32122, 33175, 6485, 37123, 6485, 216, 35, 30, 33, 36, 1841, 23708, 20306, 619, 97, 573],
        ],
        "chatglm-bpe": [
            [19556, 28, 905, 17, 339, 23, 16421, 963, 216, 33, 34, 35, 36, 37, 13855, 30],
            [216, 1792, 1116, 197, 329, 256, 2738, 1892, 333],
            [
                30679, 126, 16736, 122, 216, 33, 34, 35, 216, 164, 111, 164, 112, 5784, 299, 10802, 21268, 43335,
                10740, 1326, 982,
            ],
            [
                19380, 2756, 28239, 68, 39614, 253, 151, 219, 82, 40303, 218, 10095, 16693, 4563, 9212, 20, 2067,
                9204, 46,
            ],
            [32122, 33175, 6485, 37123, 6485, 216, 35, 30, 33, 36, 1841, 23708, 20306, 619, 97, 573],
        ],
        "viking": [
            [19556, 28, 905, 17, 339, 23, 16421, 963, 216, 33, 34, 35, 36, 37, 13855, 30],
            [216, 1792, 14436, 329, 256, 2738, 1892, 333],
            [
                30679, 126, 16736, 122, 216, 33, 34, 35, 216, 164, 111, 164, 112, 5784, 299, 10802, 21268, 43335,
                10740, 1326, 982,
            ],
            [
                19380, 2756, 28239, 68, 39614, 253, 151, 219, 82, 40303, 218, 10095, 16693, 4563, 9212, 20, 2067,
                9204, 46,
            ],
            [32122, 33175, 6485, 37123, 6485, 216, 35, 30, 33, 36, 1841, 23708, 20306, 619, 97, 573],
        ],
        "command-r": [
            [19556, 28, 905, 17, 339, 23, 16421, 963, 216, 33, 34, 35, 36, 37, 13855, 30],
            [216, 1792, 14436, 329, 256, 2738, 1892, 333],
            [
                30679, 126, 16736, 122, 216, 33, 34, 35, 216, 164, 111, 164, 112, 5784, 299, 10802, 21268, 43335,
                10740, 1326, 982,
            ],
            [
                19380, 2756, 28239, 68, 39614, 253, 151, 219, 82, 40303, 218, 10095, 16693, 4563, 9212, 20, 2067,
                9204, 46,
            ],
            [32122, 33175, 6485, 37123, 6485, 216, 35, 30, 33, 36, 1841, 23708, 20306, 619, 97, 573],
        ],
    },
    # Gemma 3 with add_space_prefix=True: [plain, special, decode(special), decode(special, skip_special)]
    "gemma_prefix": [
        [
            [
                2, 26352, 236764, 1902, 236888, 564, 236789, 2182, 1460, 236743, 236770, 236778, 236800, 236812,
                236810, 36157, 236761,
            ],
            [
                2, 26352, 236764, 1902, 236888, 564, 236789, 2182, 1460, 236743, 236770, 236778, 236800, 236812,
                236810, 36157, 236761,
            ],
            "<bos> Hello, world! I'LL see 12345 apples.",
            " Hello, world! I'LL see 12345 apples.",
        ],
        [
            [2, 138, 1123, 108, 255968, 236743, 570, 138, 236743, 251, 107, 236743, 904, 139],
            [2, 138, 1123, 108, 255968, 236743, 570, 138, 236743, 251, 107, 236743, 904, 139],
            '<bos>   x\n\n\t  y   \r\n  z   ',
            '   x\n\n\t  y   \r\n  z   ',
        ],
        [
            [
                2, 86459, 236743, 236770, 236778, 236800, 115241, 241303, 100711, 9818, 14979, 103099, 43471, 1537,
                236789, 236745,
            ],
            [
                2, 86459, 236743, 236770, 236778, 236800, 115241, 241303, 100711, 9818, 14979, 103099, 43471, 1537,
                236789, 236745,
            ],
            "<bos> \u6771\u4eac 123 \u0661\u0662 CamelCaseWord HTTPServer don't",
            " \u6771\u4eac 123 \u0661\u0662 CamelCaseWord HTTPServer don't",
        ],
        [
            [
                2, 10267, 9848, 236774, 237642, 496, 238288, 236763, 163543, 4329, 10371, 3729, 9873, 236795, 655,
                9088, 236813,
            ],
            [
                2, 10267, 9848, 236774, 237642, 496, 238288, 236763, 163543, 4329, 10371, 3729, 9873, 236795, 655,
                9088, 236813,
            ],
            '<bos> \xe9t\xe9 \xc9T\xc9 a\u0301b \U0001f600!!?? ...$$$ <tag>',
            ' \xe9t\xe9 \xc9T\xc9 a\u0301b \U0001f600!!?? ...$$$ <tag>',
        ],
        [
            [2, 47549, 236743, 236800, 236761, 236770, 236812, 2192, 2789, 237167, 999, 236809, 236919],
            [2, 47549, 236743, 236800, 236761, 236770, 236812, 2192, 2789, 237167, 999, 236809, 236919],
            '<bos> \u0445\u043e\u0440\u043e\u0448\u043e 3.14 \u2014 \xab\xbb \u201cq\u201d',
            ' \u0445\u043e\u0440\u043e\u0448\u043e 3.14 \u2014 \xab\xbb \u201cq\u201d',
        ],
        [
            [
                2, 655, 3041, 236779, 1340, 236779, 887, 236813, 2364, 107, 18428, 236820, 643, 236779, 1340,
                236779, 887, 236813,
            ],
            [2, 105, 2430, 107, 18428, 106],
            '<bos><start_of_turn> user\n Hi<end_of_turn>',
            ' user\n Hi',
        ],
        [[2, 138, 1156], [2, 138, 1156], '<bos>   two', '   two'],
    ],
    # SmolLM2 vocabulary with pre "gpt-2" (clean_spaces on): [text, ids, llama_detokenize(ids)]
    "detok_gpt2": [
        [
            "Hello , world . Isn 't it ? You 're fine , he 's ok ! ' quoted ' x",
            [
                19556, 3297, 905, 1673, 25606, 637, 100, 357, 9148, 1206, 637, 257, 4979, 3297, 384, 637, 99,
                10907, 5728, 637, 16302, 637, 1792,
            ],
            "Hello, world. Isn 't it? You're fine, he's ok!'quoted'x",
        ],
        [
            "a ' b 'll 've 'd 'm 's",
            [81, 637, 278, 637, 764, 637, 307, 637, 84, 637, 93, 637, 99],
            "a'b 'll've 'd'm's",
        ],
    ],
}
