"""A conversation with a model: messages, the KV cache they fill, and one turn at a time.

``ChatSession`` is what ``ggflat chat`` drives; it knows nothing about terminals,
so tests can run a whole conversation without one.

Incremental prefill. Every turn renders the *whole* conversation with the chat
template and tokenizes it (templates are free to rewrite earlier turns, so
nothing else is safe), then compares those ids with the ids the KV cache holds
(``_kv``, one per slot of the sequence). The cache is rolled back to the longest
common prefix (``Sequence.truncate``) and only the rest is prefilled — usually
the end of the last answer (``<|im_end|>`` and friends), the new user message
and the assistant header. Where the model's own tokens of its answer differ
from how the rendered text tokenizes (BPE is not unique), the prefix simply ends
there and the rest is prefilled again: correct first, fast where possible.

Context overflow. Before a turn, if the rendered conversation plus room for
the answer (``-n``, or a quarter of the context when ``-n`` is -1) does not
fit, the oldest exchanges (a user message and the answers up to the next user
message) are dropped until it does; the system prompt is never dropped. The
first time this happens the turn's ``notice`` says so. A single message that
cannot fit even alone is a :class:`ContextError` and leaves the conversation as
it was.

Interrupting. ``ask``/``regen`` take ``should_stop``, checked between tokens;
when it returns True the turn ends and the partial answer is *kept* in the
conversation (it is what the user saw, so the model's context matches the
screen; ``/regen`` replaces it). An exception during a turn (NaN logits, a hard
Ctrl-C) restores the conversation as it was before the turn.

Seeds. Each generation gets its own sampler. With a fixed seed ``s`` the
k-th generation of the session uses seed ``s + k``, so a scripted session
reproduces exactly and ``/regen`` still gets a new draw; without one every
generation draws a random seed.

Saved conversations are JSON: ``{"format": "ggflat-chat", "version": 1,
"system": str | null, "messages": [{"role": "user" | "assistant", "content": str}, ...]}``.
Loading validates all of it (size, UTF-8, JSON, shape, types, roles) and a bad
file is a one-line :class:`ChatError`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import stat
from dataclasses import dataclass
from typing import Any, Callable

from engine.chat_template import ChatTemplate
from engine.errors import ContextError, GGFlatError
from engine.generate import GenStats, Generator
from engine.model import Model
from engine.sampling import Sampler, SamplingParams

FORMAT = "ggflat-chat"
VERSION = 1
MAX_FILE_BYTES = 16 << 20          # a saved conversation; far more than any context holds
MAX_MESSAGES = 100_000
ROLES = ("user", "assistant")

# /set NAME VALUE: name -> (SamplingParams field, parser)
SETTABLE: dict[str, tuple[str, Callable[[str], Any]]] = {
    "temp": ("temperature", float),
    "top-k": ("top_k", int),
    "top-p": ("top_p", float),
    "min-p": ("min_p", float),
    "repeat-penalty": ("repeat_penalty", float),
    "seed": ("seed", int),
}


class ChatError(GGFlatError):
    """A chat command cannot be done (nothing to regenerate, a bad conversation file, ...)."""


@dataclass
class TurnResult:
    text: str                      # the answer as streamed (partial when stopped)
    stats: GenStats                # prompt_tokens = tokens prefilled this turn
    stop_reason: str               # "eog" | "length" | "context" | "interrupted"
    seed: int                      # the sampler's seed for this generation
    dropped: int = 0               # messages dropped to fit the context
    notice: str | None = None      # say this to the user (once per session: the first overflow)

    @property
    def interrupted(self) -> bool:
        return self.stop_reason == "interrupted"


class ChatSession:
    def __init__(self, model: Model, template: ChatTemplate, *, n_ctx: int = 0, kv_dtype: str = "f16",
                 params: SamplingParams | None = None, n_predict: int = -1, system: str | None = None,
                 n_batch: int = 512) -> None:
        self.model = model
        self.tok = model.tokenizer
        self.template = template
        self.cache = model.new_cache(n_ctx or None, kv_dtype=kv_dtype)
        self.n_ctx = self.cache.n_ctx
        self.seq = self.cache.new_sequence()
        self._kv: list[int] = []           # the token id in each slot of self.seq
        self.messages: list[dict[str, str]] = []   # user / assistant turns; the system prompt lives apart
        self.system = system
        self.params = params if params is not None else SamplingParams()
        self.params.validate()
        self.n_predict = n_predict
        self.n_batch = n_batch
        self.last: TurnResult | None = None
        self._n_generations = 0
        self._overflow_said = False

    # -- state -----------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        """Tokens the KV cache holds now (of ``n_ctx``)."""
        return self.seq.length

    def full_messages(self, messages: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        msgs = self.messages if messages is None else messages
        return ([{"role": "system", "content": self.system}] if self.system is not None else []) + list(msgs)

    def render_ids(self, messages: list[dict[str, str]] | None = None) -> list[int]:
        """The conversation as the model sees it, ending with the assistant header."""
        text = self.template.render(self.full_messages(messages), add_generation_prompt=True)
        ids = self.tok.encode(text, add_special=False, parse_special=True)
        # the template writes BOS itself when the model wants it; add it when it did not (as generate does)
        if self.tok.add_bos and self.tok.bos_id is not None and (not ids or ids[0] != self.tok.bos_id):
            ids.insert(0, self.tok.bos_id)
        return ids

    def check_template(self) -> None:
        """Render a probe conversation, so a broken or hostile template fails before the first turn."""
        self.render_ids([{"role": "user", "content": "Hello"}])

    def clear(self) -> None:
        """A new conversation (the system prompt stays; the cache keeps what still matches)."""
        self.messages = []

    def set_system(self, text: str | None) -> None:
        self.system = text if text else None

    def set_param(self, name: str, value: str) -> SamplingParams:
        """``/set NAME VALUE``; raises ChatError / SamplingError with a one-line message."""
        if name not in SETTABLE:
            raise ChatError(f"unknown setting {name!r} (settable: {', '.join(SETTABLE)})")
        field, parse = SETTABLE[name]
        try:
            v = parse(value)
        except ValueError:
            raise ChatError(f"{name} needs {'an integer' if parse is int else 'a number'}, got {value!r}") from None
        if field == "seed":
            v = None if v == -1 else v
            self._n_generations = 0
        p = dataclasses.replace(self.params, **{field: v})
        p.validate()
        self.params = p
        return p

    # -- turns -------------------------------------------------------------------------
    def ask(self, text: str, on_text: Callable[[str], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> TurnResult:
        """Add a user message and generate the answer, streaming its text to ``on_text``."""
        before = list(self.messages)
        self.messages.append({"role": "user", "content": text})
        return self._respond(before, on_text, should_stop)

    def regen(self, on_text: Callable[[str], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> TurnResult:
        """Generate the last answer again (with a new seed)."""
        before = list(self.messages)
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages or self.messages[-1]["role"] != "user":
            self.messages = before
            raise ChatError("nothing to regenerate yet")
        return self._respond(before, on_text, should_stop)

    def _reserve(self) -> int:
        """Room left for the answer when deciding whether the conversation fits."""
        want = self.n_predict if self.n_predict >= 0 else self.n_ctx // 4
        return max(1, min(want, self.n_ctx // 2))

    def _fit(self) -> tuple[list[int], int]:
        """Render, dropping the oldest exchanges while the conversation and its answer do not fit."""
        alone = self.render_ids(self.messages[-1:])
        if len(alone) >= self.n_ctx:
            raise ContextError(f"the message is {len(alone)} tokens with the template, the context holds "
                               f"{self.n_ctx} (use a larger -c or a shorter message)")
        ids, dropped, reserve = self.render_ids(), 0, self._reserve()
        while len(ids) + reserve > self.n_ctx:
            nxt = next((k for k in range(1, len(self.messages)) if self.messages[k]["role"] == "user"), None)
            if nxt is None:
                break               # only the current question is left
            del self.messages[:nxt]
            dropped += nxt
            ids = self.render_ids()
        return ids, dropped

    def _sampler(self) -> Sampler:
        p = self.params
        if p.seed is not None and p.seed != -1:
            p = dataclasses.replace(p, seed=(p.seed + self._n_generations) % 2**64)
        self._n_generations += 1
        return Sampler(p, self.model.n_vocab)

    def _respond(self, before: list[dict[str, str]], on_text: Callable[[str], None] | None,
                 should_stop: Callable[[], bool] | None) -> TurnResult:
        try:
            ids, dropped = self._fit()
        except BaseException:
            self.messages = before
            raise
        notice = None
        if dropped and not self._overflow_said:
            self._overflow_said = True
            notice = (f"the conversation no longer fits the context of {self.n_ctx} tokens: "
                      f"dropping the oldest turns (the system prompt is kept)")

        # the longest common prefix of what the cache holds and what this turn needs;
        # at least one token is prefilled, since its logits give the first answer token
        common = 0
        for a, b in zip(self._kv, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)
        self.seq.truncate(common)
        del self._kv[common:]

        sampler = self._sampler()
        last_n = self.params.repeat_last_n
        for t in ids[max(0, common - last_n):common] if last_n > 0 else ():
            sampler.accept(t)           # the penalty window sees the cached context too (Generator adds the rest)
        gen: Generator | None = None
        pieces: list[str] = []
        reason = ""
        try:
            # no logprobs: the token is drawn on the device (ops.sample in the decode graph)
            gen = Generator(self.model, self.cache, self.seq, ids[common:], sampler, n_predict=self.n_predict,
                            n_batch=self.n_batch, want_logprobs=False)
            it = iter(gen)
            try:
                for ev in it:
                    if ev.is_eog:
                        continue
                    if ev.text:
                        pieces.append(ev.text)
                        if on_text is not None:
                            on_text(ev.text)
                    if should_stop is not None and should_stop():
                        reason = "interrupted"
                        break
            finally:
                it.close()
        except BaseException:
            self.messages = before
            raise
        finally:
            # what the cache holds now: the prompt and every sampled token that was fed back
            self._kv = (ids + (gen.generated if gen is not None else []))[:self.seq.length]
        text = "".join(pieces)
        self.messages.append({"role": "assistant", "content": text})
        self.last = TurnResult(text=text, stats=gen.stats, stop_reason=reason or gen.stats.stop_reason,
                               seed=sampler.seed, dropped=dropped, notice=notice)
        return self.last

    # -- saving and loading ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "system": self.system,
                "messages": [dict(m) for m in self.messages]}

    def save(self, path: str) -> None:
        data = json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n"
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(data)
        except OSError as e:
            raise ChatError(f"cannot write {path}: {e.strerror or e}") from None

    def load(self, path: str) -> None:
        """Replace the conversation (and system prompt) with a saved one."""
        system, messages = parse_conversation(read_conversation_file(path), path)
        self.system, self.messages = system, messages


def read_conversation_file(path: str) -> bytes:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ChatError(f"no such file: {path}") from None
    except OSError as e:
        raise ChatError(f"cannot read {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):     # a FIFO or a device would block or never end
        raise ChatError(f"{path} is not a regular file")
    if st.st_size > MAX_FILE_BYTES:
        raise ChatError(f"{path} is {st.st_size} bytes, more than a conversation file may be ({MAX_FILE_BYTES})")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ChatError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ChatError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
    return data


def parse_conversation(data: bytes, where: str = "conversation") -> tuple[str | None, list[dict[str, str]]]:
    """Validate a saved conversation; returns (system, messages)."""
    def bad(why: str) -> ChatError:
        return ChatError(f"{where} is not a ggflat conversation: {why}")

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"not valid UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(text)
    except RecursionError:
        raise bad("JSON nested too deeply") from None
    except ValueError as e:          # JSONDecodeError, and ints longer than Python converts
        raise bad(f"invalid JSON ({' '.join(str(e).split())})") from None
    if not isinstance(obj, dict):
        raise bad("expected a JSON object")
    if obj.get("format") != FORMAT:
        raise bad(f'"format" must be "{FORMAT}"')
    version = obj.get("version")
    if type(version) is not int or version != VERSION:
        raise bad(f'unsupported "version" {version!r} (this ggflat reads version {VERSION})')
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise bad('"system" must be a string or null')
    msgs = obj.get("messages")
    if not isinstance(msgs, list):
        raise bad('"messages" must be a list')
    if len(msgs) > MAX_MESSAGES:
        raise bad(f"more than {MAX_MESSAGES} messages")
    out: list[dict[str, str]] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise bad(f'message {i} must be an object with exactly "role" and "content"')
        if m["role"] not in ROLES:
            raise bad(f'message {i} has role {str(m["role"])[:20]!r} (expected "user" or "assistant")')
        if not isinstance(m["content"], str):
            raise bad(f'message {i} content must be a string')
        out.append({"role": m["role"], "content": m["content"]})
    return system, out


__all__ = ["ChatSession", "ChatError", "TurnResult", "parse_conversation", "SETTABLE", "FORMAT", "VERSION"]
