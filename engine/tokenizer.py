"""Tokenizer built from GGUF metadata, matching llama.cpp's ``llama_tokenize``.

Ground truth is llama.cpp's ``src/llama-vocab.cpp`` (vendored copy, commit
0c1e570). What happens to a text, in order:

1. **Special-token partition** (``tokenizer_st_partition``). Every token whose
   type is CONTROL, USER_DEFINED or UNKNOWN is "special". Longest text first
   (by UTF-8 length), each special token's occurrences are cut out of every
   stretch of plain text left so far, leftmost first. With
   ``parse_special=False`` the CONTROL and UNKNOWN ones are skipped, but
   USER_DEFINED tokens are still cut out: that is why Gemma's "  " and "\\n\\n"
   become single tokens even in plain mode.
2. **BOS** when ``add_special`` and the model adds one.
3. Each plain stretch goes through the model's algorithm on its own:
   ``gpt2`` → byte-level BPE (:mod:`engine.tokenizer_bpe`);
   ``llama`` → SentencePiece-style merges by score (:mod:`engine.tokenizer_spm`),
   after a space prefix (``add_space_prefix``, only at the start or right after
   a special token) and replacing " " with "▁".
4. **EOS** when ``add_special`` and the model adds one.

Token attributes, the end-of-generation set and the auto-detected special
tokens follow ``llama_vocab::impl::load`` — including its text-based guesses
(e.g. any token spelled ``<end_of_turn>`` or ``<|im_end|>`` ends generation and
is treated as CONTROL).
"""
from __future__ import annotations

import codecs
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from engine.errors import TokenizerError

# Token types stored in tokenizer.ggml.token_type (llama.h: llama_token_type)
TYPE_UNDEFINED, TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_UNUSED, TYPE_BYTE = range(7)

# Token attributes (llama.h: llama_token_attr), bit flags
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_NORMALIZED = 1 << 6
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8
ATTR_SINGLE_WORD = 1 << 9

_TYPE_TO_ATTR = {TYPE_UNDEFINED: ATTR_UNDEFINED, TYPE_NORMAL: ATTR_NORMAL, TYPE_UNKNOWN: ATTR_UNKNOWN,
                 TYPE_CONTROL: ATTR_CONTROL, TYPE_USER_DEFINED: ATTR_USER_DEFINED,
                 TYPE_UNUSED: ATTR_UNUSED, TYPE_BYTE: ATTR_BYTE}
_SPECIAL_ATTRS = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN

# Texts llama.cpp uses to find special tokens that the metadata does not name.
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_PRE_TEXTS = ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                  "<|code_prefix|>", "<|prefix|>")
_FIM_SUF_TEXTS = ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                  "<|code_suffix|>", "<|suffix|>")
_FIM_MID_TEXTS = ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                  "<|code_middle|>", "<|middle|>")
_FIM_PAD_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
_FIM_REP_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_FIM_SEP_TEXTS = ("<|file_sep|>",)
# Any token spelled like this ends generation (llama.cpp's list).
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
))
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")   # gpt-oss

_KEY = "tokenizer.ggml."
_C_SPACES = " \t\n\v\f\r"   # C isspace(), used by the lstrip/rstrip attributes


class StreamDecoder:
    """Turns ids into text as they arrive, holding back incomplete UTF-8.

    ``push(id)`` returns the text that is complete so far (possibly ""), so a
    character split over several byte tokens comes out whole, once. Invalid
    byte sequences become U+FFFD as soon as they are known to be invalid.
    ``flush()`` returns whatever is left (an unfinished character as U+FFFD).
    The text is the concatenation of ``token_to_piece`` — what llama.cpp prints
    while generating (no first-token space stripping, no space cleanup).
    """

    def __init__(self, tok: "Tokenizer", skip_special: bool = False) -> None:
        self._tok = tok
        self._special = not skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tok.token_to_piece(token_id, special=self._special))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """A vocabulary and llama.cpp's tokenize / detokenize rules for it.

    Build it with :meth:`from_metadata` (any mapping of GGUF keys) or
    :meth:`from_gguf`. Ids are plain ints; ``bos_id`` / ``eos_id`` are None when
    the model has none.
    """

    def __init__(self, md: Mapping[str, Any]) -> None:
        self._load(md)

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> "Tokenizer":
        return cls(md)

    @classmethod
    def from_gguf(cls, gf: Any) -> "Tokenizer":
        return cls(gf.metadata)

    # ------------------------------------------------------------------ loading

    def _load(self, md: Mapping[str, Any]) -> None:
        model = md.get(_KEY + "model")
        if not isinstance(model, str):
            raise TokenizerError("no tokenizer in this model (tokenizer.ggml.model missing)")
        if model not in ("gpt2", "llama"):
            raise TokenizerError(f"unsupported tokenizer model {model!r} (tokenizer.ggml.model); "
                                 "supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece)")
        self.model = model
        self.is_spm = model == "llama"

        tokens = md.get(_KEY + "tokens")
        if not isinstance(tokens, (list, tuple)) or not tokens:
            raise TokenizerError("tokenizer.ggml.tokens is missing or empty")
        n = len(tokens)
        if n >= 2**31:
            raise TokenizerError(f"tokenizer.ggml.tokens has {n} entries, more than a token id can hold")
        texts: list[str] = list(tokens)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TokenizerError(f"tokenizer.ggml.tokens[{i}] is not a string")
            if not t:   # llama.cpp renames empty tokens so that they cannot match anything
                texts[i] = f"[EMPTY_{i}]"
        token_to_id = {t: i for i, t in enumerate(texts)}
        if len(token_to_id) != n:
            seen: set[str] = set()
            dup = next(i for i, t in enumerate(texts) if t in seen or seen.add(t))
            raise TokenizerError(f"tokenizer.ggml.tokens[{dup}] = {texts[dup]!r} appears more than once")
        self._texts = texts
        self._token_to_id = token_to_id
        self.n_vocab = n

        self._scores = self._numeric_array(md, "scores", n, float)
        if self._scores is not None and any(math.isnan(s) for s in self._scores):
            raise TokenizerError("tokenizer.ggml.scores contains NaN")
        types = self._numeric_array(md, "token_type", n, int)
        if types is None:
            attrs = [ATTR_NORMAL] * n
        else:
            attrs = [_TYPE_TO_ATTR.get(t, ATTR_UNDEFINED) for t in types]
        self._attrs = attrs

        # --- model-type defaults (llama_vocab::impl::load) ---
        pre_name = md.get(_KEY + "pre")
        if pre_name is not None and not isinstance(pre_name, str):
            raise TokenizerError("tokenizer.ggml.pre is not a string")
        self.pre_name = pre_name
        if self.is_spm:
            defaults = {"bos": 1, "eos": 2, "unk": 0}
            self.add_space_prefix, self.clean_spaces, add_bos, add_eos = True, False, True, False
            self._bpe = None
        else:
            from engine.tokenizer_bpe import BPEModel, build_ranks, pre_tokenizer_for
            pre = pre_tokenizer_for(pre_name)
            defaults = {"bos": None if pre.bos_null else 11, "eos": 11, "unk": None}
            self.add_space_prefix, self.clean_spaces, add_bos, add_eos = False, pre.clean_spaces, pre.add_bos, False
            merges = md.get(_KEY + "merges")
            if not isinstance(merges, (list, tuple)):
                raise TokenizerError("tokenizer.ggml.merges is missing (a gpt2 tokenizer needs its BPE merges)")
            self._bpe = BPEModel(token_to_id, build_ranks(merges), pre)
        self.add_space_prefix = self._flag(md, "add_space_prefix", self.add_space_prefix)

        # --- special token ids: defaults disabled when out of range, metadata must be in range ---
        ids: dict[str, int | None] = {}
        for name in ("bos", "eos", "unk"):
            d = defaults[name]
            ids[name] = d if d is not None and d < n else None
        for name in ("eot", "eom", "sep", "pad", "mask", "fim_pre", "fim_suf", "fim_mid", "fim_pad",
                     "fim_rep", "fim_sep"):
            ids[name] = None
        keys = [("bos", "bos_token_id"), ("eos", "eos_token_id"), ("eot", "eot_token_id"),
                ("eom", "eom_token_id"), ("unk", "unknown_token_id"), ("sep", "seperator_token_id"),
                ("pad", "padding_token_id"), ("mask", "mask_token_id"),
                ("fim_pre", "fim_pre_token_id"), ("fim_suf", "fim_suf_token_id"),
                ("fim_mid", "fim_mid_token_id"), ("fim_pad", "fim_pad_token_id"),
                ("fim_rep", "fim_rep_token_id"), ("fim_sep", "fim_sep_token_id"),
                ("fim_pre", "prefix_token_id"), ("fim_suf", "suffix_token_id"), ("fim_mid", "middle_token_id")]
        for name, key in keys:
            v = md.get(_KEY + key)
            if v is None:
                continue
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise TokenizerError(f"tokenizer.ggml.{key} is not an integer")
            if not 0 <= int(v) < n:
                raise TokenizerError(f"tokenizer.ggml.{key} = {int(v)} is outside the vocabulary (0..{n - 1})")
            ids[name] = int(v)

        self.add_bos = self._flag(md, "add_bos_token", add_bos)
        self.add_eos = self._flag(md, "add_eos_token", add_eos)
        if self.add_bos and ids["bos"] is None:
            raise TokenizerError("the model asks for a BOS token (add_bos_token) but has none")
        if self.add_eos and ids["eos"] is None:
            raise TokenizerError("the model asks for an EOS token (add_eos_token) but has none")

        self._detect_special(ids)
        self.bos_id: int | None = ids["bos"]
        self.eos_id: int | None = ids["eos"]
        self.unk_id: int | None = ids["unk"]
        self.eot_id: int | None = ids["eot"]
        self._apply_strip_attrs(md)

        # special tokens, longest (UTF-8 bytes) first; ties by id so the order is reproducible
        special = [i for i, a in enumerate(self._attrs) if a & _SPECIAL_ATTRS]
        special.sort(key=lambda i: (-len(texts[i].encode("utf-8", "surrogatepass")), i))
        self._special_all = special
        self._special_plain = [i for i in special if not self._attrs[i] & (ATTR_CONTROL | ATTR_UNKNOWN)]

        self._piece_cache: dict[tuple[int, bool], bytes] = {}
        self._byte_ids: list[int | None] = [None] * 256

    @staticmethod
    def _flag(md: Mapping[str, Any], key: str, default: bool) -> bool:
        v = md.get(_KEY + key)
        if v is None:
            return default
        if not isinstance(v, (bool, np.bool_)):
            raise TokenizerError(f"tokenizer.ggml.{key} is not a boolean")
        return bool(v)

    @staticmethod
    def _numeric_array(md: Mapping[str, Any], key: str, n: int, kind: type) -> list | None:
        v = md.get(_KEY + key)
        if v is None:
            return None
        try:
            arr = np.asarray(v)
        except Exception:
            raise TokenizerError(f"tokenizer.ggml.{key} is not a numeric array") from None
        if arr.ndim != 1 or arr.dtype.kind not in ("iu" if kind is int else "iuf"):
            raise TokenizerError(f"tokenizer.ggml.{key} is not a 1-D {'integer' if kind is int else 'numeric'} array")
        if len(arr) < n:   # llama.cpp accepts longer arrays and ignores the rest
            raise TokenizerError(f"tokenizer.ggml.{key} has {len(arr)} entries for {n} tokens")
        return arr[:n].astype(np.float64 if kind is float else np.int64).tolist()

    def _find_text(self, candidates: Iterable[str]) -> int | None:
        # llama.cpp takes the first match in hash-map order; we take the lowest id.
        found = [self._token_to_id[t] for t in candidates if t in self._token_to_id]
        return min(found) if found else None

    def _force_control(self, tid: int) -> None:
        self._attrs[tid] |= ATTR_CONTROL

    def _detect_special(self, ids: dict[str, int | None]) -> None:
        attrs, texts = self._attrs, self._texts
        for name, cands in (("eot", _EOT_TEXTS), ("eom", _EOM_TEXTS), ("fim_pre", _FIM_PRE_TEXTS),
                            ("fim_suf", _FIM_SUF_TEXTS), ("fim_mid", _FIM_MID_TEXTS),
                            ("fim_pad", _FIM_PAD_TEXTS), ("fim_rep", _FIM_REP_TEXTS),
                            ("fim_sep", _FIM_SEP_TEXTS)):
            if ids[name] is None:
                tid = self._find_text(cands)
                if tid is not None:
                    ids[name] = tid
                    self._force_control(tid)

        # control tokens named "...unused..." are unused
        for i, a in enumerate(attrs):
            if a & ATTR_CONTROL and not a & ATTR_UNUSED and "unused" in texts[i]:
                attrs[i] = a | ATTR_UNUSED

        eog: set[int] = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids[k] is not None}
        for t in _EOG_TEXTS:
            tid = self._token_to_id.get(t)
            if tid is not None:
                eog.add(tid)
                self._force_control(tid)
        for t in _ALWAYS_RENDERED:
            tid = self._token_to_id.get(t)
            if tid is not None:
                attrs[tid] = ATTR_USER_DEFINED
        eog.update(ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None)

        # gpt-oss / solar-open: "<|end|>" ends a message, not the generation
        in_eog = {texts[i]: i for i in eog}
        if "<|end|>" in in_eog and (("<|return|>" in in_eog and ("<|call|>" in in_eog or "<|calls|>" in in_eog))
                                    or (("<|call|>" in in_eog or "<|calls|>" in in_eog) and "<|flush|>" in in_eog)):
            end = in_eog["<|end|>"]
            eog.discard(end)
            attrs[end] = ATTR_USER_DEFINED
        # gemma4 / plamo: "</s>" is an ordinary token there
        if "</s>" in in_eog and ("<|tool_response>" in in_eog or "<|plamo:eos|>" in in_eog):
            s = in_eog["</s>"]
            eog.discard(s)
            attrs[s] = ATTR_NORMAL
        self.eog_ids: frozenset[int] = frozenset(eog)

    def _apply_strip_attrs(self, md: Mapping[str, Any]) -> None:
        """The per-model lstrip/rstrip attributes llama.cpp hard-codes by name."""
        name = str(md.get("general.name", "") or "").lower()
        arch = str(md.get("general.architecture", "") or "")
        pre = self.pre_name or ""
        attrs, t2i = self._attrs, self._token_to_id

        def setattr_(text: str, bit: int, on: bool) -> None:
            tid = t2i.get(text)
            if tid is not None:
                attrs[tid] = attrs[tid] | bit if on else attrs[tid] & ~bit

        if any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or \
                any(s in arch for s in ("nomic-bert-moe", "jina-bert-v3")):
            setattr_("<mask>", ATTR_LSTRIP, True)
        elif "phi-3" in name or "phi3" in name:
            for i, a in enumerate(attrs):
                if a & _SPECIAL_ATTRS:
                    attrs[i] = a | ATTR_RSTRIP
            setattr_("</s>", ATTR_RSTRIP, True)
            for t in ("<unk>", "<s>", "<|endoftext|>"):
                setattr_(t, ATTR_RSTRIP, False)
        elif "modern-bert" in name:
            setattr_("[MASK]", ATTR_LSTRIP, True)

    # ------------------------------------------------------------------ queries

    def _check_id(self, token_id: int) -> int:
        if isinstance(token_id, (bool, np.bool_)) or not isinstance(token_id, (int, np.integer)):
            raise TokenizerError(f"token id {token_id!r} is not an integer")
        if not 0 <= token_id < self.n_vocab:
            raise TokenizerError(f"token id {int(token_id)} is outside the vocabulary (0..{self.n_vocab - 1})")
        return int(token_id)

    def token_text(self, token_id: int) -> str:
        """The raw vocabulary string of a token (byte-level alphabet / ▁ not undone)."""
        return self._texts[self._check_id(token_id)]

    def token_attr(self, token_id: int) -> int:
        """llama.cpp's attribute bits (ATTR_*) for a token."""
        return self._attrs[self._check_id(token_id)]

    def is_control(self, token_id: int) -> bool:
        return bool(self._attrs[self._check_id(token_id)] & ATTR_CONTROL)

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eog_ids

    def token_id(self, text: str) -> int | None:
        """The id of the token spelled exactly `text` (raw vocabulary string), or None."""
        return self._token_to_id.get(text)

    def __len__(self) -> int:
        return self.n_vocab

    def __repr__(self) -> str:
        return (f"Tokenizer({self.model}, pre={self.pre_name!r}, n_vocab={self.n_vocab}, bos={self.bos_id}, "
                f"eos={self.eos_id}, add_bos={self.add_bos}, eog={sorted(self.eog_ids)})")

    # ------------------------------------------------------------------ encode

    def _partition(self, text: str, parse_special: bool) -> list[int | tuple[int, int]]:
        """Cut special tokens out of `text`: a list of ids and (start, end) stretches of plain text."""
        frags: list[int | tuple[int, int]] = [(0, len(text))]
        texts, attrs = self._texts, self._attrs
        for sid in (self._special_all if parse_special else self._special_plain):
            st = texts[sid]
            if st not in text:          # cheap test on the whole text first
                continue
            lstrip = attrs[sid] & ATTR_LSTRIP
            rstrip = attrs[sid] & ATTR_RSTRIP
            out: list[int | tuple[int, int]] = []
            for frag in frags:
                if isinstance(frag, int):
                    out.append(frag)
                    continue
                start, end = frag
                while True:
                    m = text.find(st, start, end)
                    if m < 0:
                        if start < end:
                            out.append((start, end))
                        break
                    left_end = m
                    if lstrip:
                        while left_end > start and text[left_end - 1] in _C_SPACES:
                            left_end -= 1
                    if left_end > start:
                        out.append((start, left_end))
                    out.append(sid)
                    start = m + len(st)
                    if rstrip:
                        while start < end and text[start] in _C_SPACES:
                            start += 1
            frags = out
        return frags

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids for `text`, as llama_tokenize(text, add_special, parse_special)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        frags = self._partition(text, parse_special) if text else []
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self.bos_id)  # type: ignore[arg-type]
        if self.is_spm:
            from engine.tokenizer_spm import spm_encode
            prev_special = True      # a space prefix goes at the start and after each special token
            for frag in frags:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                    continue
                piece = text[frag[0]:frag[1]]
                if self.add_space_prefix and prev_special:
                    piece = " " + piece
                spm_encode(piece.replace(" ", "\u2581"), self._token_to_id, self._scores_or_zero(),
                           self._byte_token, out)
                prev_special = False
        else:
            bpe = self._bpe
            for frag in frags:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    bpe.encode(text[frag[0]:frag[1]], out)  # type: ignore[union-attr]
        if add_special and self.add_eos:
            out.append(self.eos_id)  # type: ignore[arg-type]
        return out

    def _scores_or_zero(self) -> Sequence[float]:
        if self._scores is None:
            self._scores = [0.0] * self.n_vocab
        return self._scores

    def _byte_token(self, b: int) -> int:
        """SPM byte fallback: the token <0xNN>, else the one-byte string, else <unk>."""
        tid = self._byte_ids[b]
        if tid is None:
            tid = self._token_to_id.get(f"<0x{b:02X}>")
            if tid is None and b < 0x80:
                tid = self._token_to_id.get(chr(b))
            if tid is None:
                # llama.cpp aborts here; we fall back to <unk> when there is one
                if self.unk_id is None:
                    raise TokenizerError(f"cannot encode byte 0x{b:02X}: the vocabulary has no <0x{b:02X}> "
                                         "token and no <unk>")
                tid = self.unk_id
            self._byte_ids[b] = tid
        return tid

    # ------------------------------------------------------------------ decode

    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        """The bytes a token stands for, as llama_token_to_piece(lstrip=0, special).

        CONTROL/UNKNOWN tokens give b"" unless `special`; special and user-defined
        tokens give their text as is; byte tokens <0xNN> give that byte; normal
        tokens undo the byte-level alphabet (gpt2) or ▁ → space (llama).
        """
        key = (token_id, special)
        piece = self._piece_cache.get(key)
        if piece is not None:
            return piece
        tid = self._check_id(token_id)
        attr = self._attrs[tid]
        text = self._texts[tid]
        if not special and attr & (ATTR_UNKNOWN | ATTR_CONTROL):
            piece = b""
        elif attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED):
            piece = text.encode("utf-8", "surrogatepass")
        elif attr & ATTR_NORMAL:
            if self.is_spm:
                piece = text.replace("\u2581", " ").encode("utf-8", "surrogatepass")
            else:
                from engine.tokenizer_bpe import decode_byte_level
                piece = decode_byte_level(text)
        elif attr & ATTR_BYTE:
            piece = bytes([_strtol_hex(text[3:5])])
        else:                       # unused / undefined types render as nothing
            piece = b""
        self._piece_cache[key] = piece
        return piece

    def decode_bytes(self, ids: Sequence[int], skip_special: bool = False) -> bytes:
        """llama_detokenize(ids, remove_special=False, unparse_special=not skip_special), as bytes."""
        parts: list[bytes] = []
        first = True
        for tid in ids:
            piece = self.token_to_piece(tid, special=not skip_special)
            if first and self.add_space_prefix and piece.startswith(b" "):
                piece = piece[1:]          # the space the SPM prefix added
            first = False
            parts.append(piece)
        data = b"".join(parts)
        if self.clean_spaces and data:
            data = _clean_up_spaces(data)
        return data

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text for `ids` (llama.cpp's common_detokenize); invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special)


def _strtol_hex(s: str) -> int:
    """strtol(s, 16) on the two hex digits of a <0xNN> token: stops at the first non-digit."""
    v = 0
    for c in s:
        d = "0123456789abcdef".find(c.lower())
        if d < 0:
            break
        v = v * 16 + d
    return v & 0xFF


def _clean_up_spaces(data: bytes) -> bytes:
    """llama.cpp's clean_up_tokenization_spaces: three in-place passes over the bytes.

    Done in place like the original (a write index trailing the read index),
    because the second pass overwrites the space after a lone apostrophe with a
    NUL that the next step then sees as its left neighbour.
    """
    t = bytearray(data)
    # pass 1: " ?", " !", " .", " ," lose the space
    n, total = len(t), (1 if t else 0)
    for i in range(1, n):
        x = t[i]
        if t[i - 1] == 0x20 and x in b"?!.,":
            total -= 1
        t[total] = x
        total += 1
    # pass 2: " ' " -> "'"
    n, total, i = total, (1 if total else 0), 1
    while i < n:
        x = t[i]
        if x == 0x27 and i + 1 < n and t[i - 1] == 0x20 and t[i + 1] == 0x20:
            total -= 1
            i += 1
            t[i] = 0
        t[total] = x
        total += 1
        i += 1
    # pass 3: " 's", " 'm", " 're", " 've" lose the space (" 't", " 'd", " 'll" keep it)
    n, total = total, (1 if total else 0)
    for i in range(1, n):
        x = t[i]
        if t[i - 1] == 0x20 and x == 0x27 and i + 1 < n:
            x1 = t[i + 1]
            if x1 in b"sm":
                total -= 1
            elif x1 not in b"td" and i + 2 < n and (x1, t[i + 2]) in ((0x72, 0x65), (0x76, 0x65)):
                total -= 1
        t[total] = x
        total += 1
    return bytes(t[:total])
