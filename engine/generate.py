"""Token generation: prefill a prompt, then sample and feed back one token at a time.

``Generator`` is an iterator of ``TokenEvent``s so that the CLI can stream text,
JSON or anything else; its ``stats`` hold the ollama-style timings. "prompt
eval" is the prefill; "eval" is sampling every generated token plus the decode
steps that fed them back (the first token is sampled from the prefill's logits).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence as Seq

import numpy as np

from engine.model import Model, check_fits
from engine.sampling import Sampler, top_logprobs as top_k_logprobs
from kvcache import PagedKVCache, Sequence


@dataclass
class GenStats:
    load_seconds: float = 0.0
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    gen_tokens: int = 0            # tokens generated (sampled)
    eval_seconds: float = 0.0      # sampling every token + the decode steps that fed them back
    stop_reason: str = ""          # "eog" | "length" | "context"

    @property
    def prompt_rate(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def eval_rate(self) -> float:
        return self.gen_tokens / self.eval_seconds if self.eval_seconds > 0 else 0.0

    def summary(self) -> str:
        """ollama's ``--verbose`` block, one figure a line."""
        total = self.load_seconds + self.prompt_seconds + self.eval_seconds
        lines = [
            ("total duration", _dur(total)),
            ("load duration", _dur(self.load_seconds)),
            ("prompt eval count", f"{self.prompt_tokens} token(s)"),
            ("prompt eval duration", _dur(self.prompt_seconds)),
            ("prompt eval rate", f"{self.prompt_rate:.2f} tokens/s"),
            ("eval count", f"{self.gen_tokens} token(s)"),
            ("eval duration", _dur(self.eval_seconds)),
            ("eval rate", f"{self.eval_rate:.2f} tokens/s"),
        ]
        return "\n".join(f"{k + ':':<22}{v}" for k, v in lines)


def _dur(s: float) -> str:
    return f"{s * 1e3:.2f}ms" if s < 1 else f"{s:.3f}s"


@dataclass
class TokenEvent:
    id: int
    text: str                      # newly decodable text (may be empty while a UTF-8 char is incomplete)
    piece: bytes                   # this token's own bytes
    logprob: float                 # log-softmax of the raw logits (NaN when not computed, see want_logprobs)
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    is_eog: bool = False


class Generator:
    """Iterate to generate; ``stats`` fills in as it goes.

    n_predict < 0: until an end-of-generation token or the context is full.
    """

    def __init__(self, model: Model, cache: PagedKVCache, seq: Sequence, prompt_ids: Seq[int],
                 sampler: Sampler, n_predict: int = -1, n_top_logprobs: int = 0, ignore_eos: bool = False,
                 n_batch: int = 512, want_logprobs: bool = True) -> None:
        check_fits(seq.length + len(prompt_ids), seq.capacity)
        if len(prompt_ids) == 0:
            raise ValueError("empty prompt")
        self.model, self.cache, self.seq = model, cache, seq
        self.prompt_ids = list(prompt_ids)
        self.sampler = sampler
        self.n_predict = n_predict
        self.n_top = n_top_logprobs
        self.ignore_eos = ignore_eos
        self.n_batch = n_batch
        self.want_logprobs = want_logprobs   # False: TokenEvent.logprob may be NaN (greedy on the device)
        self.stats = GenStats()
        self.generated: list[int] = []

    def __iter__(self) -> Iterator[TokenEvent]:
        model, tok = self.model, self.model.tokenizer
        eog = tok.eog_ids
        decoder = tok.stream_decoder()
        for t in self.prompt_ids:
            self.sampler.accept(t)

        t0 = time.perf_counter()
        logits = model.prefill(self.cache, self.seq, self.prompt_ids, n_batch=self.n_batch)[-1]
        self.stats.prompt_seconds = time.perf_counter() - t0
        self.stats.prompt_tokens = len(self.prompt_ids)

        # Without logprobs no logits need to come to the host: the decode graph ends in ops.sample
        # (or, where the backend cannot sample, greedy without penalties ends in an argmax) and
        # only the token id comes back, one 4-byte copy per token. The first token comes from the
        # prefill's logits, drawn on the host by the op's twin (the same Philox stream and
        # algorithm), so a seed reproduces the whole generation on either backend.
        p = self.sampler.params
        plain = self.n_top == 0 and not self.want_logprobs
        on_device = plain and model.can_sample_on_device(self.sampler.history_width)
        device_greedy = (not on_device and plain and p.greedy and p.repeat_penalty == 1.0
                         and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0)
        next_id: int | None = None
        while True:
            t0 = time.perf_counter()
            if next_id is None:
                tid = self.sampler.sample_op(logits) if on_device else self.sampler.sample(logits)
                logprob = float(logits[tid]) - logsumexp(logits)
            else:
                tid, logprob = next_id, float("nan")
            self.sampler.accept(tid)
            self.generated.append(tid)
            self.stats.gen_tokens += 1
            is_eog = tid in eog and not self.ignore_eos
            ev = TokenEvent(id=tid, text="" if is_eog else decoder.push(tid), piece=tok.token_to_piece(tid),
                            logprob=logprob, is_eog=is_eog,
                            top_logprobs=top_k_logprobs(logits, self.n_top) if self.n_top > 0 else [])
            self.stats.eval_seconds += time.perf_counter() - t0
            yield ev
            if is_eog:
                self.stats.stop_reason = "eog"
                break
            if 0 <= self.n_predict <= self.stats.gen_tokens:
                self.stats.stop_reason = "length"
                break
            if self.seq.length >= self.seq.capacity:
                self.stats.stop_reason = "context"
                break
            t0 = time.perf_counter()
            if on_device:
                next_id = int(model.forward(self.cache, self.seq, [tid], sample=self.sampler.op_inputs())[-1])
            elif device_greedy:
                next_id = int(model.forward(self.cache, self.seq, [tid], greedy=True)[-1])
            else:
                logits = model.forward(self.cache, self.seq, [tid])[-1]
            self.stats.eval_seconds += time.perf_counter() - t0
        tail = decoder.flush()
        if tail:
            yield TokenEvent(id=-1, text=tail, piece=b"", logprob=0.0)


def logsumexp(logits: np.ndarray) -> float:
    """log(sum(exp(logits))), stable; the logprob of token t is logits[t] - logsumexp(logits)."""
    mx = float(logits.max())
    return mx + float(np.log(np.exp(logits - mx, dtype=np.float32).sum(dtype=np.float64)))


__all__ = ["GenStats", "Generator", "TokenEvent", "logsumexp"]
