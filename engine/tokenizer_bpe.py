"""Byte-level BPE (``tokenizer.ggml.model = gpt2``) as llama.cpp runs it.

Three steps, each following llama.cpp (``src/llama-vocab.cpp``, ``src/unicode.cpp``
of the vendored copy, commit 0c1e570):

1. **Pre-tokenize.** ``tokenizer.ggml.pre`` picks a list of regexes; each one
   splits every piece left by the previous one. llama.cpp never runs a Unicode
   regex engine on the text: for the common GPT-2 / Llama-3 / Qwen-2 patterns it
   has hand-written splitters, and for the rest it maps every code point to one
   "collapsed" character that stands for its class (letter, number, ...) and runs
   ``std::regex`` on that. We do the same: the text is translated to the collapsed
   alphabet once, and every pattern (the hand-written ones re-expressed as
   regexes over that alphabet) runs on it with Python's ``re``. Categories come
   from ``unicodedata`` patched to Unicode 15.1, the table llama.cpp ships.
2. **Byte-encode** each piece: UTF-8 bytes mapped to the printable GPT-2 alphabet.
3. **Merge** adjacent symbols by merge rank (lowest rank first, leftmost on
   ties), then look the symbols up in the vocabulary.

Special tokens never reach this module: ``engine.tokenizer`` splits them off first.
"""
from __future__ import annotations

import heapq
import re
import unicodedata
from dataclasses import dataclass
from typing import Mapping, Sequence

from engine.errors import TokenizerError

# ---------------------------------------------------------------------------
# Unicode classes
# ---------------------------------------------------------------------------

# White_Space code points (PropList.txt), the set llama.cpp tests with `is_whitespace`.
# Note what is *not* here: U+001C..U+001F, which Python's str.isspace() accepts.
WHITESPACE = frozenset([0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680,
                        *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000])

# Code points assigned in Unicode 15.0 and 15.1. llama.cpp's category table is
# generated from Unicode 15.1; Python 3.11's unicodedata is 14.0 and reports
# these as unassigned, so we patch them in: (first, last, class).
_UNICODE_15_ADDITIONS = (
    (0x00CF3, 0x00CF3, "M"), (0x00ECE, 0x00ECE, "M"), (0x02FFC, 0x02FFF, "S"), (0x031EF, 0x031EF, "S"),
    (0x10EFD, 0x10EFF, "M"), (0x1123F, 0x11240, "L"), (0x11241, 0x11241, "M"), (0x11B00, 0x11B09, "P"),
    (0x11F00, 0x11F01, "M"), (0x11F02, 0x11F02, "L"), (0x11F03, 0x11F03, "M"), (0x11F04, 0x11F10, "L"),
    (0x11F12, 0x11F33, "L"), (0x11F34, 0x11F3A, "M"), (0x11F3E, 0x11F42, "M"), (0x11F43, 0x11F4F, "P"),
    (0x11F50, 0x11F59, "N"), (0x1342F, 0x1342F, "L"), (0x13439, 0x1343F, "C"), (0x13440, 0x13440, "M"),
    (0x13441, 0x13446, "L"), (0x13447, 0x13455, "M"), (0x1B132, 0x1B132, "L"), (0x1B155, 0x1B155, "L"),
    (0x1D2C0, 0x1D2D3, "N"), (0x1DF25, 0x1DF2A, "L"), (0x1E030, 0x1E06D, "L"), (0x1E08F, 0x1E08F, "M"),
    (0x1E4D0, 0x1E4EB, "L"), (0x1E4EC, 0x1E4EF, "M"), (0x1E4F0, 0x1E4F9, "N"), (0x1F6DC, 0x1F6DC, "S"),
    (0x1F774, 0x1F776, "S"), (0x1F77B, 0x1F77F, "S"), (0x1F7D9, 0x1F7D9, "S"), (0x1FA75, 0x1FA77, "S"),
    (0x1FA87, 0x1FA88, "S"), (0x1FAAD, 0x1FAAF, "S"), (0x1FABB, 0x1FABD, "S"), (0x1FABF, 0x1FABF, "S"),
    (0x1FACE, 0x1FACF, "S"), (0x1FADA, 0x1FADB, "S"), (0x1FAE8, 0x1FAE8, "S"), (0x1FAF7, 0x1FAF8, "S"),
    (0x2B739, 0x2B739, "L"), (0x2EBF0, 0x2EE5D, "L"), (0x31350, 0x323AF, "L"),
)


def _category_class(cp: int) -> str:
    """One letter for the general category of `cp`: L N M P S Z C, or U (unassigned)."""
    cat = unicodedata.category(chr(cp))
    if cat == "Cn":
        for lo, hi, cls in _UNICODE_15_ADDITIONS:
            if lo <= cp <= hi:
                return cls
        return "U"
    return cat[0]


# The collapsed alphabet (llama.cpp's, see `unicode_regex_split`): ASCII stays
# itself, any other whitespace becomes \x0b, any other code point becomes one
# byte naming its class. Every code point stays exactly one character, so
# offsets in the collapsed text are offsets in the original text.
_COLLAPSED = {"N": "\xd1", "L": "\xd2", "P": "\xd3", "M": "\xd4", "S": "\xd5"}
_OTHER = "\xd0"   # control, format, private use, surrogate, unassigned, non-space separators

# Class contents inside a regex character class, over the collapsed alphabet.
_CLASS_CONTENT = {
    "N": r"\xd10-9",
    "L": r"\xd2A-Za-z",
    "P": r"\xd3\x21-\x23\x25-\x2a\x2c-\x2f\x3a\x3b\x3f\x40\x5b-\x5d\x5f\x7b\x7d",
    "M": r"\xd4",
    "S": r"\xd5\x24\x2b\x3c-\x3e\x5e\x60\x7c\x7e",
}
# llama.cpp treats the letter sub-categories as plain letters in the collapsed text.
_PROPERTY_CLASS = {"N": "N", "L": "L", "P": "P", "M": "M", "S": "S",
                   "Lu": "L", "Ll": "L", "Lt": "L", "Lm": "L", "Lo": "L"}


_TABLE_LIMIT = 1 << 16    # remember at most this many code points per table


class _CollapseTable(dict):
    """str.translate table code point -> collapsed character, filled lazily."""

    def __missing__(self, cp: int) -> str:
        if cp < 128:
            ch = chr(cp)
        elif cp in WHITESPACE:
            ch = "\x0b"
        else:
            ch = _COLLAPSED.get(_category_class(cp), _OTHER)
        if len(self) < _TABLE_LIMIT:
            self[cp] = ch
        return ch


class _WideTable(dict):
    """str.translate table for patterns without \\p{..}: only non-ASCII whitespace changes."""

    def __missing__(self, cp: int) -> str:
        ch = "\x0b" if cp >= 128 and cp in WHITESPACE else chr(cp)
        if len(self) < _TABLE_LIMIT:
            self[cp] = ch
        return ch


_COLLAPSE = _CollapseTable()
_WIDE = _WideTable()

# ---------------------------------------------------------------------------
# Pre-tokenizer patterns
# ---------------------------------------------------------------------------

# Regexes as llama.cpp writes them (\p{..} names a class). The four that llama.cpp
# splits with hand-written code are given again below as collapsed-alphabet
# regexes that make the same decisions, including at the end of a piece, where
# the hand-written code treats "nothing follows" as "not \S".
_RX_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS_CI = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_RX_LLAMA3 = _CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_RX_QWEN2 = _CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_RX_QWEN35 = (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Whitespace in the collapsed alphabet is exactly \t..\r and space (all other
# whitespace was mapped to \x0b). Python's \s would also take \x1c..\x1f.
_WS = r"\t-\r "
_L, _N, _M = _CLASS_CONTENT["L"], _CLASS_CONTENT["N"], _CLASS_CONTENT["M"]
_HANDWRITTEN = {
    # unicode_regex_split_custom_gpt2: every code point is letter, number,
    # whitespace or "other", so some branch always matches.
    _RX_GPT2: (rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{_L}]+| ?[{_N}]+| ?[^{_WS}{_L}{_N}]+"
               rf"|[{_WS}]+(?![^{_WS}])|[{_WS}]+"),
    # unicode_regex_split_custom_llama3 (case-insensitive contractions: only
    # ASCII letters lower-case to s, t, r, e, v, m, l, d in UnicodeData).
    _RX_LLAMA3: (_CONTRACTIONS_CI + rf"|[^\r\n{_L}{_N}]?[{_L}]+|[{_N}]{{1,3}}| ?[^{_WS}{_L}{_N}]+[\r\n]*"
                 rf"|[{_WS}]*[\r\n]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"),
    _RX_QWEN2: (_CONTRACTIONS_CI + rf"|[^\r\n{_L}{_N}]?[{_L}]+|[{_N}]| ?[^{_WS}{_L}{_N}]+[\r\n]*"
                rf"|[{_WS}]*[\r\n]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"),
    _RX_QWEN35: (_CONTRACTIONS_CI + rf"|[^\r\n{_L}{_N}]?[{_L}{_M}]+|[{_N}]| ?[^{_WS}{_L}{_M}{_N}]+[\r\n]*"
                 rf"|[{_WS}]*[\r\n]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"),
}

_RX_STARCODER = (r"\p{N}", _RX_GPT2)
_RX_PORO = (r" ?[^(\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+",)
_RX_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + _CONTRACTIONS_CI + "?"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + _CONTRACTIONS_CI + "?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_RX_DEEPSEEK3 = (
    r"\p{N}{1,3}",
    r"[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)


@dataclass(frozen=True)
class PreTokenizer:
    """What `tokenizer.ggml.pre` selects in llama.cpp (llama_vocab::impl::load)."""
    regexes: tuple[str, ...]
    clean_spaces: bool = True      # clean_up_tokenization_spaces when detokenizing
    ignore_merges: bool = False    # a piece that is already a token is not merged
    add_bos: bool = False          # default for tokenizer.ggml.add_bos_token
    bos_null: bool = False         # the model has no BOS at all (ChatGLM)


def _pre(regexes: Sequence[str], **kw) -> PreTokenizer:
    return PreTokenizer(tuple(regexes), **kw)


_P_DEFAULT = _pre((r"[\p{P}\$\+<=>\^~\|]+", _RX_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))
_P_LLAMA3 = _pre((_RX_LLAMA3,), ignore_merges=True, add_bos=True)
_P_GPT2 = _pre((_RX_GPT2,))
_P_GPT2_NOCLEAN = _pre((_RX_GPT2,), clean_spaces=False)
_P_STARCODER = _pre(_RX_STARCODER)
_P_QWEN2 = _pre((_RX_QWEN2,), clean_spaces=False)
_P_GPT4O = _pre(_RX_GPT4O, clean_spaces=False)
_P_CHATGLM4 = _pre((_RX_LLAMA3,), bos_null=True)

PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _P_DEFAULT,
    **{n: _P_LLAMA3 for n in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                              "midm-2.0", "lfm2", "jina-v5-nano")},
    "deepseek-llm": _pre((
        r"[\r\n]",
        r"\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
        r"\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
        r"\s+$",
        r"[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
        r"\p{N}+",
    ), clean_spaces=False),
    "deepseek-coder": _pre((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", r"\p{N}"),
                           clean_spaces=False),
    **{n: _pre(_RX_DEEPSEEK3, clean_spaces=False) for n in ("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4")},
    "falcon": _pre((r"[\p{P}\$\+<=>\^~\|`]+",
                    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
                    r"[0-9][0-9][0-9]")),
    "mpt": _P_GPT2,
    "starcoder": _P_STARCODER,
    **{n: _P_GPT2 for n in ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
                            "a.x-4.0", "mellum", "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe",
                            "olmo", "jais", "exaone4")},
    "refact": _P_STARCODER,
    "command-r": _pre(_RX_STARCODER, clean_spaces=False),
    **{n: _P_QWEN2 for n in ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "grok-2", "solar-open")},
    "qwen35": _pre((_RX_QWEN35,), clean_spaces=False),
    "stablelm2": _pre((_RX_QWEN2,)),
    "megrez": _pre((_RX_QWEN2,)),
    "dbrx": _pre((_RX_LLAMA3,)),
    "smaug-bpe": _pre((_RX_LLAMA3,)),
    "poro-chat": _pre(_RX_PORO, clean_spaces=False),
    "chatglm-bpe": _P_CHATGLM4,
    "glm4": _pre((_RX_LLAMA3,), bos_null=True, ignore_merges=True),
    "glm5": _pre((_RX_LLAMA3,), bos_null=True, ignore_merges=True),
    "viking": _pre(_RX_PORO + (r"\p{N}",), clean_spaces=False),
    "tekken": _pre((
        r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+"
        r"((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ), clean_spaces=False, ignore_merges=True, add_bos=True),
    "smollm": _pre(_RX_STARCODER, clean_spaces=False),
    "codeshell": _P_STARCODER,
    "bloom": _pre(_RX_PORO),
    "gpt3-finnish": _pre(_RX_PORO),
    "exaone": _P_STARCODER,
    "minerva-7b": _P_STARCODER,
    "mellum2": _P_STARCODER,
    "chameleon": _pre((r"<sentinel:[0-9]+>", r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", r"([\t\n]|    |  )",
                       r"\p{N}", r"[\p{P}!-/:-@\[-`{-~]", _RX_GPT2), add_bos=True, clean_spaces=False),
    **{n: _P_GPT4O for n in ("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2")},
    "trillion": _P_GPT2_NOCLEAN,
    "granite-docling": _P_GPT2_NOCLEAN,
    **{n: _pre((r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",), clean_spaces=False)
       for n in ("bailingmoe", "bailingmoe2", "llada-moe")},
    "seed-coder": _pre((_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
                        r"|\s*[\r\n]+|\s+(?!\S)|\s+",), clean_spaces=False),
    "ufakzeka": _pre((r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
                     clean_spaces=False),
    "minicpm5": _pre((r"\p{N}{1,3}", _CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+"
                      r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), ignore_merges=True),
}


def _collapse_pattern(rx: str) -> str:
    """Rewrite \\p{X} into collapsed-alphabet classes, as llama.cpp does before std::regex.

    Outside brackets \\p{X} becomes a bracket of its own; inside one it adds its
    contents. The collapsed alphabet has no non-ASCII literals, so a pattern with
    both is refused (llama.cpp refuses it too).
    """
    if any(ord(c) >= 128 for c in rx):
        raise TokenizerError("pre-tokenizer regex mixes \\p{..} classes with non-ASCII characters")
    out: list[str] = []
    inside = False
    i = 0
    while i < len(rx):
        c = rx[i]
        if c == "\\" and rx.startswith("p{", i + 1):
            close = rx.find("}", i + 3)
            name = rx[i + 3:close] if close > 0 else ""
            if name in _PROPERTY_CLASS:
                body = _CLASS_CONTENT[_PROPERTY_CLASS[name]]
                out.append(body if inside else f"[{body}]")
                i = close + 1
                continue
        if c == "\\" and i + 1 < len(rx):       # keep escapes whole: \[ is no bracket
            out.append(rx[i:i + 2])
            i += 2
            continue
        if c == "[" and not inside:
            inside = True
        elif c == "]" and inside:
            inside = False
        out.append(c)
        i += 1
    return "".join(out)


def _ecma_to_python(rx: str) -> str:
    """The few ECMAScript-vs-Python differences that occur in these patterns.

    ECMAScript `$` (no multiline flag) is end of input; Python's also matches
    before a final newline, so use \\Z.
    """
    out: list[str] = []
    inside = False
    i = 0
    while i < len(rx):
        c = rx[i]
        if c == "\\" and i + 1 < len(rx):
            out.append(rx[i:i + 2])
            i += 2
            continue
        if c == "[" and not inside:
            inside = True
        elif c == "]" and inside:
            inside = False
        elif c == "$" and not inside:
            c = r"\Z"
        out.append(c)
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class _Splitter:
    regex: re.Pattern
    collapsed: bool           # run on the collapsed text (else on the "wide" text)


def _compile(rx: str) -> _Splitter:
    if rx in _HANDWRITTEN:
        return _Splitter(re.compile(_HANDWRITTEN[rx]), True)
    uses_classes = "\\p{" in rx
    py = _collapse_pattern(rx) if uses_classes else rx
    # re.ASCII: \s and \d are the C locale's (std::regex's) ASCII classes.
    return _Splitter(re.compile(_ecma_to_python(py), re.ASCII), uses_classes)


_SPLITTER_CACHE: dict[tuple[str, ...], tuple[_Splitter, ...]] = {}


def splitters_for(pre: PreTokenizer) -> tuple[_Splitter, ...]:
    key = pre.regexes
    if key not in _SPLITTER_CACHE:
        _SPLITTER_CACHE[key] = tuple(_compile(rx) for rx in key)
    return _SPLITTER_CACHE[key]


def pre_tokenize(text: str, splitters: Sequence[_Splitter]) -> list[str]:
    """Split `text` into the pieces BPE merges within (llama.cpp: unicode_regex_split).

    Each regex runs over every piece from the previous one; text between matches
    stays a piece of its own. Lookarounds never see past the end of a piece.
    """
    n = len(text)
    if n == 0:
        return []
    collapsed = wide = None
    pieces = [(0, n)]
    for sp in splitters:
        if sp.collapsed:
            if collapsed is None:
                collapsed = text.translate(_COLLAPSE)
            subject = collapsed
        else:
            if wide is None:
                wide = text.translate(_WIDE)
            subject = wide
        finditer = sp.regex.finditer
        new: list[tuple[int, int]] = []
        add = new.append
        for start, end in pieces:
            last = start
            for m in finditer(subject, start, end):
                s, e = m.span()
                if s > last:
                    add((last, s))
                if e > s:
                    add((s, e))
                last = e
            if last < end:
                add((last, end))
        pieces = new
    return [text[s:e] for s, e in pieces]


# ---------------------------------------------------------------------------
# GPT-2 byte <-> unicode alphabet
# ---------------------------------------------------------------------------

def _byte_alphabet() -> list[str]:
    """GPT-2's map of the 256 bytes to printable code points (printable Latin-1
    bytes stand for themselves; the rest are moved to U+0100 onwards, in order)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = [""] * 256
    for b in keep:
        table[b] = chr(b)
    extra = 0
    for b in range(256):
        if not table[b]:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_UNICODE: list[str] = _byte_alphabet()
UNICODE_TO_BYTE: dict[str, int] = {ch: b for b, ch in enumerate(BYTE_TO_UNICODE)}
# bytes.decode("latin-1") gives one char per byte; this table then moves each to the alphabet.
_LATIN1_TO_ALPHABET = {b: ch for b, ch in enumerate(BYTE_TO_UNICODE)}


def byte_encode(word: str) -> str:
    # surrogatepass: a lone surrogate in a Python str is the 3 bytes llama.cpp would see.
    return word.encode("utf-8", "surrogatepass").decode("latin-1").translate(_LATIN1_TO_ALPHABET)


def decode_byte_level(text: str) -> bytes:
    """Token text in the GPT-2 alphabet -> raw bytes (llama.cpp: llama_decode_text)."""
    try:
        return bytes(UNICODE_TO_BYTE[ch] for ch in text)
    except KeyError:
        pass
    out = bytearray()
    for ch in text:
        b = UNICODE_TO_BYTE.get(ch)
        if b is not None:
            out.append(b)
        else:   # not in the alphabet: llama.cpp writes a marker naming the char and the token
            out += b"[UNK_BYTE_0x" + ch.encode("utf-8", "surrogatepass").hex().encode() \
                + text.encode("utf-8", "surrogatepass") + b"]"
    return bytes(out)


# ---------------------------------------------------------------------------
# Merges
# ---------------------------------------------------------------------------

def build_ranks(merges: Sequence[str]) -> dict[str, int]:
    """Merge rank keyed by the merge line itself ("left right").

    llama.cpp splits each line at its first space after position 0 and keeps the
    first rank of a duplicated pair. Symbols contain no spaces (the byte alphabet
    has none), so looking up `left + " " + right` finds exactly that pair.
    """
    n = len(merges)
    for i, m in enumerate(merges):
        if not isinstance(m, str) or m.find(" ", 1) <= 0 or m.find(" ", 1) == len(m) - 1:
            raise TokenizerError(f"tokenizer.ggml.merges[{i}] = {m!r} is not two symbols separated by a space")
    # reversed, so a pair listed twice keeps its first (lowest) rank
    return dict(zip(reversed(merges), range(n - 1, -1, -1)))


class BPEModel:
    """Merges + vocabulary lookups for one vocabulary; caches merged pieces."""

    CACHE_LIMIT = 200_000

    def __init__(self, token_to_id: Mapping[str, int], ranks: Mapping[str, int],
                 pre: PreTokenizer) -> None:
        self.token_to_id = token_to_id
        self.ranks = ranks
        self.pre = pre
        self.splitters = splitters_for(pre)
        self._cache: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str, out: list[int]) -> None:
        cache = self._cache
        for word in pre_tokenize(text, self.splitters):
            ids = cache.get(word)
            if ids is None:
                ids = self._encode_word(byte_encode(word))
                if len(cache) >= self.CACHE_LIMIT:
                    cache.clear()
                cache[word] = ids
            out.extend(ids)

    def _encode_word(self, word: str) -> tuple[int, ...]:
        vocab = self.token_to_id
        if self.pre.ignore_merges:
            tid = vocab.get(word)
            if tid is not None:
                return (tid,)
        out: list[int] = []
        for sym in self._merge(word):
            tid = vocab.get(sym)
            if tid is not None:
                out.append(tid)
                continue
            # No token for a merged symbol: llama.cpp looks up each UTF-8 byte of
            # the symbol as a one-byte string. Only ASCII bytes can be tokens then.
            for b in sym.encode("utf-8", "surrogatepass"):
                if b < 0x80:
                    tid = vocab.get(chr(b))
                    if tid is not None:
                        out.append(tid)
        return tuple(out)

    def _merge(self, word: str) -> list[str]:
        n = len(word)
        if n < 2:
            return [word] if n else []
        ranks = self.ranks
        sym = list(word)                     # symbol texts; "" once merged into the left
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap: list[tuple[int, int, int, str]] = []
        for i in range(n - 1):
            r = ranks.get(sym[i] + " " + sym[i + 1])
            if r is not None:
                heap.append((r, i, i + 1, sym[i] + sym[i + 1]))
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            _, left, right, merged = pop(heap)   # lowest rank, then leftmost
            lt, rt = sym[left], sym[right]
            if not lt or not rt or lt + rt != merged:
                continue                          # stale: one side changed since
            sym[left] = merged
            sym[right] = ""
            after = nxt[right]
            nxt[left] = after
            if after != -1:
                prv[after] = left
            before = prv[left]
            if before != -1:
                r = ranks.get(sym[before] + " " + merged)
                if r is not None:
                    push(heap, (r, before, left, sym[before] + merged))
            if after != -1:
                r = ranks.get(merged + " " + sym[after])
                if r is not None:
                    push(heap, (r, left, after, merged + sym[after]))
        return [s for s in sym if s]


def pre_tokenizer_for(name: str | None) -> PreTokenizer:
    if name is None or name == "":
        return _P_DEFAULT        # llama.cpp warns ("generation quality will be degraded") and goes on
    try:
        return PRE_TOKENIZERS[name]
    except KeyError:
        raise TokenizerError(f"unknown pre-tokenizer type {name!r} (tokenizer.ggml.pre); "
                             f"supported: {', '.join(sorted(PRE_TOKENIZERS))}") from None


