"""SentencePiece-style BPE (``tokenizer.ggml.model = llama``) as llama.cpp runs it.

llama.cpp (``llm_tokenizer_spm_session``) does not call SentencePiece: it starts
from one symbol per UTF-8 character of the whole fragment (no word splitting;
spaces were already replaced by U+2581) and repeatedly merges the adjacent pair
whose concatenation is a vocabulary token with the highest score, the leftmost
pair on ties. Any token text counts, whatever its type. Symbols that end up as
no token are emitted byte by byte as ``<0xNN>`` tokens.

The heap holds (-score, left index, right index, length); an entry is stale when
either side has changed length since it was pushed, as in llama.cpp.
"""
from __future__ import annotations

import heapq
from typing import Callable, Mapping, Sequence


def spm_encode(text: str, token_to_id: Mapping[str, int], scores: Sequence[float],
               byte_token: Callable[[int], int], out: list[int]) -> None:
    n = len(text)
    if n == 0:
        return
    get = token_to_id.get
    length = [1] * n               # symbol i covers text[i : i + length[i]]; 0 once merged away
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))

    heap: list[tuple[float, int, int, int]] = []
    for i in range(n - 1):
        tid = get(text[i:i + 2])
        if tid is not None:
            heap.append((-scores[tid], i, i + 1, 2))
    heapq.heapify(heap)
    pop, push = heapq.heappop, heapq.heappush

    while heap:
        _, left, right, size = pop(heap)
        ll, rl = length[left], length[right]
        if ll == 0 or rl == 0 or ll + rl != size:
            continue
        ll += rl
        length[left] = ll
        length[right] = 0
        after = nxt[right]
        nxt[left] = after
        if after != -1:
            prv[after] = left
        before = prv[left]
        if before != -1:
            bl = length[before]
            tid = get(text[before:before + bl + ll])
            if tid is not None:
                push(heap, (-scores[tid], before, left, bl + ll))
        if after != -1:
            al = length[after]
            tid = get(text[left:left + ll + al])
            if tid is not None:
                push(heap, (-scores[tid], left, after, ll + al))

    i = 0
    while i != -1:
        piece = text[i:i + length[i]]
        tid = get(piece)
        if tid is not None:
            out.append(tid)
        else:
            # surrogatepass: a lone surrogate is the 3 bytes llama.cpp would see
            for b in piece.encode("utf-8", "surrogatepass"):
                out.append(byte_token(b))
        i = nxt[i]
