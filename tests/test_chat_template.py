"""engine.chat_template: rendering like transformers, and the sandbox's bounds."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from engine.chat_template import ChatTemplate, load_chat_template
from engine.errors import TemplateError

CHATML_SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\n")


@pytest.fixture(scope="module")
def smollm2_metadata(smollm2_path):
    from engine.gguf_file import GGUFFile
    with GGUFFile(smollm2_path) as gf:
        return dict(gf.metadata)


@pytest.mark.slow
def test_smollm2_template_renders_chatml(smollm2_metadata):
    t = load_chat_template(smollm2_metadata)
    assert (t.bos_token, t.eos_token) == ("<|im_start|>", "<|im_end|>")   # texts of ids 1 and 2
    user = [{"role": "user", "content": "What is 2+2?"}]
    assert t.render(user) == CHATML_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert t.render(user, add_generation_prompt=False) == \
        CHATML_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    assert t.render(conv) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                              "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                              "<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_rendered_prompt_tokenizes_to_control_tokens(smollm2_metadata):
    from engine.tokenizer import Tokenizer
    tok = Tokenizer.from_metadata(smollm2_metadata)
    text = load_chat_template(smollm2_metadata).render([{"role": "user", "content": "Hi"}])
    ids = tok.encode(text, add_special=False, parse_special=True)
    assert ids.count(1) == 3 and ids.count(2) == 2
    assert ids[-4:] == [1, 520, 9531, 198]      # "<|im_start|>assistant\n", as in tokenize.jsonl


def test_missing_template_and_override(tmp_path):
    with pytest.raises(TemplateError, match="model has no chat template; pass --chat-template-file"):
        load_chat_template({})
    f = tmp_path / "t.jinja"
    f.write_text("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant] {% endif %}", encoding="utf-8")
    md = {"tokenizer.chat_template": "ignored", "tokenizer.ggml.tokens": ["<s>", "</s>"],
          "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1}
    t = load_chat_template(md, str(f))          # the file wins over the metadata
    assert t.render([{"role": "user", "content": "hi"}]) == "<s>[user] hi\n[assistant] "
    with pytest.raises(TemplateError, match="does not exist"):
        load_chat_template(md, str(tmp_path / "missing.jinja"))
    bad = tmp_path / "bad.jinja"
    bad.write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(TemplateError, match="not valid UTF-8"):
        load_chat_template(md, str(bad))


def test_transformers_conventions():
    """trim_blocks / lstrip_blocks, loopcontrols, tojson (non-ASCII kept), raise_exception,
    strftime_now, {% generation %}, extra variables."""
    src = ("{% for m in messages %}\n"
           "    {% if m['role'] == 'skip' %}{% continue %}{% endif %}\n"
           "{{ m['content'] | tojson }}\n"
           "{% endfor %}\n"
           "{% generation %}{{ tools | tojson(indent=2) }}{% endgeneration %}|{{ strftime_now('%Y') | length }}")
    out = ChatTemplate(src).render([{"role": "user", "content": "h\u00e9 \"x\""}, {"role": "skip", "content": "no"}],
                                   tools=[{"a": 1}])
    assert out == '"h\u00e9 \\"x\\""\n[\n  {\n    "a": 1\n  }\n]|4'
    with pytest.raises(TemplateError, match="chat template raised an error: Only user and assistant"):
        ChatTemplate("{{ raise_exception('Only user and assistant roles are supported!') }}").render([])


def test_errors_are_one_line_template_errors():
    for src, pattern in [("{% for m in messages %}", "syntax error at line 1"),
                         ("{{ x.y }}", "undefined value: 'x' is undefined"),
                         ("{{ messages.append(1) }}", "unsafe"),
                         ("{{ 1 / 0 }}", "ZeroDivisionError"),
                         ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed too deeply")]:
        with pytest.raises(TemplateError, match=pattern) as e:
            ChatTemplate(src).render([{"role": "user", "content": "x"}])
        assert "\n" not in str(e.value)


def test_sandbox_escape_runs_nothing(tmp_path):
    sentinel = tmp_path / "pwned"
    attacks = [
        "{{ lipsum.__globals__['os'].popen('touch %s').read() }}",
        "{{ cycler.__init__.__globals__.os.system('touch %s') }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}{{ namespace.__init__.__globals__['os'].system('touch %s') }}",
        "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('touch %s') }}",
        "{% set x = messages.__class__ %}{{ x.__base__.__subclasses__() }}",
        "{{ (messages|attr('__class__')).__mro__ }}{{ raise_exception.__globals__['os'].system('touch %s') }}",
    ]
    for a in attacks:
        src = a.replace("%s", str(sentinel))
        with pytest.raises(TemplateError):
            ChatTemplate(src).render([{"role": "user", "content": "x"}])
    assert not sentinel.exists()


@pytest.mark.parametrize("src", [
    "{{ 'a' * 10**9 }}",
    "{% set n = 1000000000 %}{{ 'a' * n }}",
    "{{ ([1] * 100000000) | length }}",
    "{{ 10 ** (10 ** 8) }}",
    "{{ 'x' | center(1000000000) }}",
    "{{ 'x'.center(1000000000) }}",
    "{{ 'x'.ljust(10 ** 9) }}",
    "{{ '%0999999999d' % 1 }}",
    "{{ '%*d' % (999999999, 1) }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ '%999999999s' | format('a') }}",
    "{% set s = 'a' * 1000000 %}{{ ([s] * 100000) | join | length }}",
    "{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% set ns = namespace(s='aa') %}{% for i in range(40) %}{% set ns.s = ns.s | replace('a', 'aaaa') %}"
    "{% endfor %}",
    "{{ range(100000) | map('center', 1000000) | list | length }}",
    "{% set s = '\t' * 100000 %}{{ s.expandtabs(100000) | length }}",
    "{{ [1] | batch(1000000000, 'x') | list | length }}",
    "{{ ([[1] * 10000] * 10000) | sum(start=[]) | length }}",
    "{{ messages | tojson(indent=1000000000) }}",
    "{{ range(10 ** 9) | length }}",
])
def test_memory_bombs_are_refused_quickly(src):
    t0 = time.monotonic()
    with pytest.raises(TemplateError):
        ChatTemplate(src).render([{"role": "user", "content": "x"}])
    assert time.monotonic() - t0 < 1.5


def test_output_limit():
    with pytest.raises(TemplateError, match="output exceeds 1048576 bytes"):
        ChatTemplate("{% for i in range(100000) %}{{ 'a' * 1000 }}{% endfor %}").render([])
    t = ChatTemplate("{% for i in range(10) %}{{ '\u00e9' * 10 }}{% endfor %}", max_output=150)
    with pytest.raises(TemplateError, match="exceeds 150 bytes"):     # counted in UTF-8 bytes
        t.render([])
    assert len(ChatTemplate("{{ 'a' * 1000 }}").render([])) == 1000


def test_time_limit_without_output():
    """Nested loops that print nothing still stop at the deadline."""
    t = ChatTemplate("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x",
                     timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(TemplateError, match="took too long"):
        t.render([])
    assert time.monotonic() - t0 < 2.0


def test_render_restores_tracing_and_is_reusable():
    import sys
    before = sys.gettrace()
    t = ChatTemplate("{{ messages | length }}")
    assert t.render([{}, {}]) == "2"
    with pytest.raises(TemplateError):
        ChatTemplate("{{ x.y }}").render([])
    assert sys.gettrace() is before
    assert t.render([{}]) == "1"


def test_override_file_too_large(tmp_path):
    f = tmp_path / "big.jinja"
    f.write_bytes(b"x" * ((1 << 20) + 1))
    with pytest.raises(TemplateError, match="larger than"):
        load_chat_template({}, str(f))
    assert os.path.getsize(f) > 0 and Path(f).exists()


def test_big_numbers_still_format():
    """The width checks look at format specs, not at the values being formatted."""
    src = "{{ '{}'.format(1234567890) }} {{ '%d' % 1234567890 }} {{ '%s' | format(99999999999) }} {{ 2 ** 100 }}"
    assert ChatTemplate(src).render([]) == "1234567890 1234567890 99999999999 1267650600228229401496703205376"
