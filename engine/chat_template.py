"""Chat templates from GGUF files, rendered in a bounded Jinja2 sandbox.

A chat template is Jinja2 source that comes with the model file, so it is
untrusted input (DESIGN.md §4). We render it the way Hugging Face transformers
does (``ImmutableSandboxedEnvironment`` with ``trim_blocks``, ``lstrip_blocks``,
the ``loopcontrols`` extension, a ``{% generation %}`` tag, the ``tojson``
filter and the ``raise_exception`` / ``strftime_now`` globals) and add bounds:

* **escape** — the sandbox refuses ``__globals__``, ``__class__`` and friends
  (``{{ lipsum.__globals__['os'] }}`` is a SecurityError, nothing runs);
* **time** — a trace function checks a deadline on every line the template's
  compiled code (and anything it calls in Python) executes, so loops that
  print nothing are bounded too;
* **size** — output is counted as it is produced (1 MiB by default); every
  operation that can make a value much bigger than its inputs (``*``, ``**``,
  ``%``, ``+``, ``~``, ``center``/``indent``/``join``/``replace``/``format``/
  ``batch``/``slice``/``sum`` and the str methods ``center``, ``ljust``,
  ``rjust``, ``zfill``, ``expandtabs``, ``replace``, ``join``, ``translate``,
  ``format``) is checked *before* it runs, and everything such operations
  produce is charged to a per-render allocation budget, so neither
  ``'a' * 10**9`` nor a loop that keeps doubling a string can exhaust memory.

Any failure — syntax, undefined variable misuse, security, limits, an
exception raised by the template — is a :class:`TemplateError` with a one-line
message.
"""
from __future__ import annotations

import json
import re
import sys
import time
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import TemplateError

DEFAULT_MAX_OUTPUT = 1 << 20        # bytes of rendered text
DEFAULT_TIMEOUT = 2.0               # seconds per render
MAX_TEMPLATE_BYTES = 1 << 20        # size of a template source
_BUDGET_FACTOR = 64                 # allocation budget = this many times max_output
_MAX_INT_BITS = 1 << 16             # integer arithmetic results stay below 2**65536
_MAX_TOJSON_INDENT = 64


class _TemplateRaised(Exception):
    """raise_exception() from inside a template."""


class _Limit(BaseException):
    """A bound was hit. BaseException, so no `except Exception` inside Jinja swallows it."""


class _Guard:
    """The limits of one render: a deadline and an allocation budget."""

    def __init__(self, max_value: int, budget: int | None, deadline: float | None) -> None:
        self.max_value = max_value      # biggest single string/list one operation may make
        self.budget = budget            # total chars/items all checked operations may make
        self.deadline = deadline

    def charge(self, n: int, what: str) -> None:
        if n > self.max_value:
            raise _Limit(f"{what} would make a value of {n} characters/items (limit {self.max_value})")
        if self.budget is not None:
            self.budget -= n
            if self.budget < 0:
                raise _Limit(f"chat template allocates too much ({what})")

    def check_time(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise _Limit("chat template took too long to render")


_CURRENT: ContextVar[_Guard | None] = ContextVar("ggflat_template_guard", default=None)
# Outside a render (Jinja folds constant expressions at compile time) the same
# per-operation limits apply, without a budget or deadline.
_COMPILE_GUARD = _Guard(DEFAULT_MAX_OUTPUT, None, None)


def _guard() -> _Guard:
    return _CURRENT.get() or _COMPILE_GUARD


def _size(x: Any) -> int:
    return len(x) if isinstance(x, (str, bytes, list, tuple)) else 0


# A %-conversion's flags, width and precision; a {}-field's format spec.
_PERCENT_SPEC = re.compile(r"%[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*?:([^{}]*)\}")
_DIGITS = re.compile(r"\d+")
_NESTED_FIELD = re.compile(r"\{[^{}]*:[^{}]*\{")     # "{:{w}}": the width is an argument


def _check_format(fmt: str, args: Iterable[Any], what: str) -> None:
    """Width and precision can ask for any amount of padding: refuse big ones before formatting.

    Checks the numbers written in the conversion specs and, when a width comes
    from the arguments instead (``%*d``, ``{:{w}}``), the integer arguments.
    """
    g = _guard()
    percent = [n for m in _PERCENT_SPEC.finditer(fmt) for n in m.groups() if n]
    numbers = [n for n in percent if n != "*"]
    numbers += [d for m in _BRACE_SPEC.finditer(fmt) for d in _DIGITS.findall(m.group(1))]
    for d in numbers:
        if len(d) > 9 or int(d) > g.max_value:
            raise _Limit(f"{what}: field width {d} is too large")
    if "*" in percent or _NESTED_FIELD.search(fmt):
        for a in args:
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > g.max_value:
                raise _Limit(f"{what}: width argument {a} is too large")


def _format_args(right: Any) -> list:
    if isinstance(right, tuple):
        return list(right)
    if isinstance(right, Mapping):
        return list(right.values())
    return [right]


# ---------------------------------------------------------------------------
# the environment
# ---------------------------------------------------------------------------

class _GenerationTag(jinja2.ext.Extension):
    """transformers' {% generation %}...{% endgeneration %} marks assistant text; it renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment whose growth operations are checked first."""

    intercepted_binops = frozenset(("*", "**", "+", "%", "//"))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        g = _guard()
        if operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                    raise _Limit("integer multiplication result is too large")
            elif isinstance(right, int) and _size(left) or isinstance(left, int) and _size(right):
                seq, k = (left, right) if isinstance(right, int) else (right, left)
                g.charge(len(seq) * max(k, 0), "repetition")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                if left.bit_length() * right > _MAX_INT_BITS:
                    raise _Limit("power result is too large")
        elif operator == "+":
            if _size(left) or _size(right):
                g.charge(_size(left) + _size(right), "concatenation")
        elif operator == "%":
            if isinstance(left, str):
                _check_format(left, _format_args(right), "%-format")
                result = self.binop_table[operator](left, right)
                g.charge(len(result), "%-format")
                return result
        return self.binop_table[operator](left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        g = _guard()
        g.check_time()
        est = _estimate_method(__obj, args, kwargs)
        if est is not None:
            g.charge(est, f"str.{getattr(__obj, '__name__', '?')}")
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__

        def checked(*args: Any, **kwargs: Any) -> str:
            _check_format(fmt, [*args, *kwargs.values()], "str.format")
            out = wrapped(*args, **kwargs)
            _guard().charge(len(out), "str.format")
            return out
        return checked


def _estimate_method(obj: Any, args: tuple, kwargs: dict) -> int | None:
    """Upper bound on the size a str method call would produce, for the ones that can grow."""
    s = getattr(obj, "__self__", None)
    if not isinstance(s, str):
        return None
    name = getattr(obj, "__name__", "")
    n = len(s)

    def arg(i: int, key: str, default: Any) -> Any:
        return args[i] if len(args) > i else kwargs.get(key, default)

    if name in ("center", "ljust", "rjust", "zfill"):
        w = arg(0, "width", 0)
        return max(n, w) if isinstance(w, int) else None
    if name == "expandtabs":
        tab = arg(0, "tabsize", 8)
        return n + s.count("\t") * max(tab, 0) if isinstance(tab, int) else None
    if name == "replace":
        old, new = arg(0, "old", None), arg(1, "new", None)
        if isinstance(old, str) and isinstance(new, str):
            hits = s.count(old) if old else n + 1
            return n + hits * len(new)
        return None
    if name == "join":
        items = arg(0, "iterable", None)
        if isinstance(items, (list, tuple)):
            return sum(len(x) if isinstance(x, str) else 0 for x in items) + n * max(len(items) - 1, 0)
        return None
    if name == "translate":
        table = arg(0, "table", None)
        if isinstance(table, Mapping):
            longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1)
            return n * max(longest, 1)
        return None
    return None


def _checked_str_join(seq: Iterable[Any]) -> str:
    """The `~` operator: joins values that already exist, so charge after joining."""
    out = "".join(map(str, seq))
    _guard().charge(len(out), "~ concatenation")
    return out


def _wrap_filters(env: jinja2.Environment) -> None:
    f = dict(env.filters)

    def width_filter(name: str, pos: int, key: str, default: int, per_line: bool = False) -> None:
        orig = f[name]

        def filt(value: Any, *args: Any, **kwargs: Any) -> Any:
            w = args[pos] if len(args) > pos else kwargs.get(key, default)
            if isinstance(w, (int, str)):
                text = str(value)
                lines = text.count("\n") + 1 if per_line else 1
                width = len(w) if isinstance(w, str) else max(w, 0)
                _guard().charge(len(text) + width * lines, f"|{name}")
            return orig(value, *args, **kwargs)
        env.filters[name] = filt

    width_filter("center", 0, "width", 80)
    width_filter("indent", 0, "width", 4, per_line=True)

    def count_filter(name: str, key: str) -> None:
        orig = f[name]

        def filt(value: Any, *args: Any, **kwargs: Any) -> Any:
            k = args[0] if args else kwargs.get(key, 0)
            if isinstance(k, int):
                _guard().charge(max(k, 0), f"|{name}")
            return orig(value, *args, **kwargs)
        env.filters[name] = filt

    count_filter("batch", "linecount")
    count_filter("slice", "slices")

    orig_join = f["join"]

    def join(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> Any:
        items = list(value)
        sep = len(str(d)) * max(len(items) - 1, 0)
        _guard().charge(sep + sum(len(x) if isinstance(x, str) else 0 for x in items), "|join")
        out = orig_join(eval_ctx, items, d, attribute)
        _guard().charge(len(out), "|join")
        return out
    join.jinja_pass_arg = orig_join.jinja_pass_arg  # type: ignore[attr-defined]
    env.filters["join"] = join

    orig_replace = f["replace"]

    def replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: Any = None) -> Any:
        text, o, nw = str(s), str(old), str(new)
        hits = (text.count(o) if o else len(text) + 1)
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        _guard().charge(len(text) + hits * len(nw), "|replace")
        return orig_replace(eval_ctx, s, old, new, count)
    replace.jinja_pass_arg = orig_replace.jinja_pass_arg  # type: ignore[attr-defined]
    env.filters["replace"] = replace

    orig_format = f["format"]

    def format_(value: Any, *args: Any, **kwargs: Any) -> Any:
        _check_format(str(value), [*args, *kwargs.values()], "|format")
        out = orig_format(value, *args, **kwargs)
        _guard().charge(len(out), "|format")
        return out
    env.filters["format"] = format_

    orig_sum = f["sum"]

    def sum_(environment: Any, iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
        items = list(iterable)
        if attribute is None and _size(start) or any(_size(x) for x in items):
            _guard().charge(_size(start) + sum(_size(x) for x in items), "|sum")
        return orig_sum(environment, items, attribute, start)
    sum_.jinja_pass_arg = orig_sum.jinja_pass_arg  # type: ignore[attr-defined]
    env.filters["sum"] = sum_

    env.filters["tojson"] = _tojson


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' tojson: json.dumps with ensure_ascii=False by default, no HTML escaping."""
    if isinstance(indent, int) and indent > _MAX_TOJSON_INDENT:
        raise _Limit(f"tojson indent {indent} is too large")
    if isinstance(indent, str) and len(indent) > _MAX_TOJSON_INDENT:
        raise _Limit("tojson indent is too large")
    out = json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    _guard().charge(len(out), "tojson")
    return out


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(str(fmt))


def _make_environment() -> _BoundedEnvironment:
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                              extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    _wrap_filters(env)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split()) or "(no message)"


def _describe(e: BaseException) -> str:
    if isinstance(e, _TemplateRaised):
        return f"chat template raised an error: {_one_line(str(e))}"
    if isinstance(e, _Limit):
        return _one_line(str(e))
    if isinstance(e, jinja2.TemplateSyntaxError):
        return f"chat template syntax error at line {e.lineno}: {_one_line(e.message or '')}"
    if isinstance(e, jinja2.exceptions.SecurityError):
        return f"chat template tried something unsafe: {_one_line(str(e))}"
    if isinstance(e, jinja2.UndefinedError):
        return f"chat template uses an undefined value: {_one_line(str(e))}"
    if isinstance(e, RecursionError):
        return "chat template recursed too deeply"
    if isinstance(e, MemoryError):
        return "chat template ran out of memory"
    return f"chat template failed: {type(e).__name__}: {_one_line(str(e))}"


class ChatTemplate:
    """A compiled chat template. ``render(messages)`` gives the prompt text."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", *,
                 max_output: int = DEFAULT_MAX_OUTPUT, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not isinstance(source, str):
            raise TemplateError("chat template is not a string")
        if len(source.encode("utf-8", "surrogatepass")) > MAX_TEMPLATE_BYTES:
            raise TemplateError(f"chat template is larger than {MAX_TEMPLATE_BYTES} bytes")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.max_output = max_output
        self.timeout = timeout
        self._env = _make_environment()
        try:
            self._template = self._env.from_string(source)
        except (Exception, _Limit) as e:
            raise TemplateError(_describe(e)) from None
        # `~` compiles to a call of str_join from the template module's namespace.
        self._template.root_render_func.__globals__["str_join"] = _checked_str_join

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        ctx = {"bos_token": self.bos_token, "eos_token": self.eos_token, **extra,
               "messages": messages, "add_generation_prompt": add_generation_prompt}
        deadline = time.monotonic() + self.timeout
        guard = _Guard(self.max_output, self.max_output * _BUDGET_FACTOR, deadline)
        token = _CURRENT.set(guard)
        parts: list[str] = []
        size = 0

        def tracer(frame: Any, event: str, arg: Any) -> Any:
            if time.monotonic() > deadline:
                raise _Limit("chat template took too long to render")
            return tracer

        old_trace = sys.gettrace()
        sys.settrace(tracer)
        try:
            for chunk in self._template.generate(**ctx):
                size += len(chunk.encode("utf-8", "surrogatepass"))
                if size > self.max_output:
                    raise _Limit(f"chat template output exceeds {self.max_output} bytes")
                parts.append(chunk)
        except (Exception, _Limit) as e:
            raise TemplateError(_describe(e)) from None
        finally:
            sys.settrace(old_trace)
            _CURRENT.reset(token)
        return "".join(parts)

    def __repr__(self) -> str:
        return f"ChatTemplate({len(self.source)} chars, bos={self.bos_token!r}, eos={self.eos_token!r})"


def _token_text(metadata: Mapping[str, Any], key: str) -> str:
    tokens = metadata.get("tokenizer.ggml.tokens")
    tid = metadata.get(key)
    if isinstance(tokens, (list, tuple)) and isinstance(tid, int) and not isinstance(tid, bool) \
            and 0 <= tid < len(tokens) and isinstance(tokens[tid], str):
        return tokens[tid]
    return ""


def load_chat_template(metadata: Mapping[str, Any], override_path: str | None = None) -> ChatTemplate:
    """The model's chat template (``tokenizer.chat_template``), or the file given instead.

    ``bos_token`` / ``eos_token`` are the texts of the model's BOS / EOS tokens,
    as llama.cpp passes them.
    """
    if override_path is not None:
        p = Path(override_path)
        try:
            if not p.is_file():
                raise TemplateError(f"chat template file {override_path} does not exist or is not a file")
            if p.stat().st_size > MAX_TEMPLATE_BYTES:
                raise TemplateError(f"chat template file {override_path} is larger than {MAX_TEMPLATE_BYTES} bytes")
            source = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise TemplateError(f"chat template file {override_path} is not valid UTF-8 (byte {e.start})") from None
        except OSError as e:
            raise TemplateError(f"cannot read chat template file {override_path}: {e.strerror or e}") from None
    else:
        source = metadata.get("tokenizer.chat_template")
        if not isinstance(source, str) or not source.strip():
            raise TemplateError("model has no chat template; pass --chat-template-file")
    return ChatTemplate(source, _token_text(metadata, "tokenizer.ggml.bos_token_id"),
                        _token_text(metadata, "tokenizer.ggml.eos_token_id"))
