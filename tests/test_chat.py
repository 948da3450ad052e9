"""`ggflat chat`: ChatSession (KV reuse between turns, overflow, /regen, save/load) and the REPL
driven through a real pseudo-terminal, the pipe mode, and hostile chat templates."""
from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.chat import ChatError, ChatSession, parse_conversation
from engine.errors import ContextError, TemplateError
from engine.sampling import SamplingError, SamplingParams
from tests.gguf_builder import T, kv, pad, u32, u64

GREEDY = SamplingParams(temperature=0.0)
ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def model(smollm2_path):
    from engine.model import Model
    return Model.load(str(smollm2_path))


@pytest.fixture(scope="module")
def template(model):
    from engine.chat_template import load_chat_template
    return load_chat_template(model.gf.metadata)


def session(model, template, **kw) -> ChatSession:
    kw.setdefault("n_ctx", 512)
    kw.setdefault("n_predict", 8)
    kw.setdefault("params", GREEDY)
    return ChatSession(model, template, **kw)


def consistent(s: ChatSession) -> None:
    """What the session believes the cache holds is what the sequence holds."""
    assert len(s._kv) == s.seq.length <= s.n_ctx


# ------------------------------------------------------------------------ ChatSession (no terminal)

def test_each_turn_prefills_only_the_new_tokens(model, template):
    s = session(model, template)
    r1 = s.ask("What is 2+2?")
    assert r1.stats.prompt_tokens == len(s.render_ids([{"role": "user", "content": "What is 2+2?"}]))
    consistent(s)
    n_before = s.n_tokens
    ids2 = s.render_ids(s.messages + [{"role": "user", "content": "And 3+3?"}])
    r2 = s.ask("And 3+3?")
    # everything the cache held was reused: only the rest of the conversation was prefilled, i.e. the
    # answer's last token (sampled, never fed back), the template's glue and the new message
    assert r2.stats.prompt_tokens == len(ids2) - n_before
    new_msg = len(model.tokenizer.encode("And 3+3?", add_special=False))
    glue = len(model.tokenizer.encode("<|im_end|>\n<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n",
                                      add_special=False, parse_special=True))
    assert r2.stats.prompt_tokens == 1 + glue + new_msg < len(ids2) // 2
    consistent(s)
    # reusing the cache changes nothing: a fresh session given the same history answers the same
    fresh = session(model, template)
    fresh.messages = [dict(m) for m in s.messages[:-2]]
    r3 = fresh.ask("And 3+3?")
    assert r3.text == r2.text
    assert r3.stats.prompt_tokens > 3 * r2.stats.prompt_tokens


def test_regen_prefills_one_token_and_uses_a_new_seed(model, template):
    s = session(model, template, params=SamplingParams(temperature=1.0, seed=7), n_predict=6)
    r1 = s.ask("Tell me a fun fact.")
    r2 = s.regen()
    assert r2.stats.prompt_tokens == 1          # the prompt is all cached; its last token gives the logits
    assert r2.seed != r1.seed and r2.text != r1.text
    assert [m["role"] for m in s.messages] == ["user", "assistant"] and s.messages[1]["content"] == r2.text
    consistent(s)
    # a fixed seed reproduces the whole session
    t = session(model, template, params=SamplingParams(temperature=1.0, seed=7), n_predict=6)
    assert t.ask("Tell me a fun fact.").text == r1.text and t.regen().text == r2.text


def test_regen_with_nothing_to_redo(model, template):
    s = session(model, template)
    with pytest.raises(ChatError, match="nothing to regenerate"):
        s.regen()
    assert s.messages == []


def test_clear_and_system_prompt(model, template):
    # (that the model then forgets, and follows the system prompt, is checked through the REPL below)
    s = session(model, template, n_predict=2)
    s.ask("My name is Zorblax.")
    s.clear()
    assert s.messages == []
    r = s.ask("What is my name?")
    assert r.stats.prompt_tokens < len(s.render_ids()) // 2     # the (default) system part stayed cached
    s.set_system("You are a pirate.")
    assert s.full_messages()[0] == {"role": "system", "content": "You are a pirate."}
    r = s.ask("Hello!")
    assert r.stats.prompt_tokens > len(s.render_ids([])) - 10   # a new system prompt: prefilled from the start
    s.set_system("")
    assert s.system is None and s.full_messages()[0]["role"] == "user"


def test_should_stop_keeps_the_partial_answer(model, template):
    s = session(model, template, n_predict=64)
    seen = []
    r = s.ask("Write a story about a dragon.", on_text=seen.append, should_stop=lambda: len(seen) >= 3)
    assert r.interrupted and r.stop_reason == "interrupted" and r.stats.gen_tokens <= 4
    assert s.messages[-1] == {"role": "assistant", "content": "".join(seen)} == {"role": "assistant",
                                                                                  "content": r.text}
    consistent(s)
    s.n_predict = 4
    assert s.ask("Thanks.").text         # and the conversation goes on


def test_overflow_drops_oldest_turns_keeps_system_and_says_so_once(model, template):
    s = session(model, template, n_ctx=128, n_predict=4, system="You are terse.")
    notices, dropped = [], 0
    for i in range(6):
        r = s.ask(f"Question number {i}: tell me something about the number {i} and about cats.")
        consistent(s)
        dropped += r.dropped
        if r.notice:
            notices.append(r.notice)
        assert len(s.render_ids()) <= s.n_ctx
    assert dropped > 0 and len(notices) == 1 and "128" in notices[0]
    assert s.full_messages()[0] == {"role": "system", "content": "You are terse."}
    assert s.messages[0]["role"] == "user" and s.messages[-1]["role"] == "assistant"
    assert "number 5" in s.messages[-2]["content"] and len(s.messages) < 12


def test_a_message_longer_than_the_context_leaves_the_conversation_alone(model, template):
    s = session(model, template, n_ctx=64)
    s.ask("Hi.")
    before = [dict(m) for m in s.messages]
    with pytest.raises(ContextError, match="64"):
        s.ask("word " * 200)
    assert s.messages == before
    consistent(s)


def test_set_params(model, template):
    s = session(model, template)
    assert s.set_param("temp", "0.7").temperature == 0.7
    assert s.set_param("top-k", "5").top_k == 5
    assert s.set_param("seed", "-1").seed is None
    assert s.set_param("seed", "42").seed == 42
    with pytest.raises(SamplingError):
        s.set_param("top-p", "1.5")
    with pytest.raises(ChatError, match="integer"):
        s.set_param("top-k", "many")
    with pytest.raises(ChatError, match="unknown setting"):
        s.set_param("warp", "9")
    assert s.params.top_k == 5


def test_save_and_load_round_trip(model, template, tmp_path):
    s = session(model, template, system="Be brief.")
    s.ask("My name is Zorblax. Say hi to me.")
    path = tmp_path / "conv.json"
    s.save(str(path))
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["format"] == "ggflat-chat" and saved["version"] == 1 and saved["system"] == "Be brief."
    t = session(model, template)
    t.load(str(path))
    assert t.system == "Be brief." and t.messages == s.messages
    # the loaded conversation continues exactly as the original would
    assert t.ask("What is my name?").text == s.ask("What is my name?").text


def _doc(**over):
    d = {"format": "ggflat-chat", "version": 1, "system": None,
         "messages": [{"role": "user", "content": "hi"}]}
    d.update(over)
    return json.dumps(d).encode()


@pytest.mark.parametrize("data, needle", [
    (b"", "invalid JSON"),
    (b"{not json", "invalid JSON"),
    (b"\xff\xfe{}", "UTF-8"),
    (b"[" * 200_000 + b"]" * 200_000, "nested"),
    (b'{"version": ' + b"9" * 10_000 + b"}", "invalid JSON"),
    (b"[]", "object"),
    (_doc(format="other"), "format"),
    (_doc(version=2), "version"),
    (_doc(version=True), "version"),
    (_doc(version="1"), "version"),
    (_doc(system=["x"]), "system"),
    (_doc(messages={"role": "user"}), "list"),
    (_doc(messages=[{"role": "system", "content": "x"}]), "role"),
    (_doc(messages=[{"role": ["user"], "content": "x"}]), "role"),
    (_doc(messages=[{"role": "user", "content": 5}]), "content"),
    (_doc(messages=[{"role": "user", "content": "x", "extra": 1}]), "exactly"),
    (_doc(messages=["hi"]), "exactly"),
])
def test_malformed_conversation_files_are_one_line_errors(data, needle):
    with pytest.raises(ChatError) as e:
        parse_conversation(data, "conv.json")
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and len(msg) < 300


def test_conversation_file_kinds(model, template, tmp_path):
    s = session(model, template)
    with pytest.raises(ChatError, match="no such file"):
        s.load(str(tmp_path / "missing.json"))
    with pytest.raises(ChatError, match="not a regular file"):
        s.load(str(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ChatError, match="not a regular file"):      # would block forever if opened
        s.load(str(fifo))
    with pytest.raises(ChatError, match="not a regular file"):
        s.load("/dev/zero")
    with pytest.raises(ChatError, match="cannot write"):
        s.save(str(tmp_path / "no" / "such" / "dir.json"))
    assert s.messages == []


def test_hostile_template_raises_before_any_turn(model, tmp_path):
    from engine.chat_template import ChatTemplate
    marker = tmp_path / "pwned"
    t = ChatTemplate("{{ lipsum.__globals__['os'].popen('touch %s').read() }}" % marker)
    s = ChatSession(model, t, n_ctx=64)
    with pytest.raises(TemplateError):
        s.check_template()
    assert not marker.exists()


# -------------------------------------------------------------------------- through the command line

def ggflat(*args: str, stdin: str | bytes | None = "", timeout: float = 180, env: dict | None = None):
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, timeout=timeout,
                          input=stdin.encode() if isinstance(stdin, str) else stdin, cwd=ROOT,
                          env=env if env is not None else os.environ)


def assert_one_line_error(p, *needles: str) -> str:
    err = p.stderr.decode()
    assert p.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_pipe_reads_stdin_as_one_message_and_exits(smollm2_path):
    # exactly the command: the default model (the fixture makes sure it is cached)
    t0 = time.monotonic()
    p = subprocess.run(f"echo 'What is 2+2?' | {sys.executable} -m cli.main chat -n 32", shell=True,
                       capture_output=True, timeout=180, cwd=ROOT)
    assert p.returncode == 0, p.stderr.decode()
    out = p.stdout.decode()
    assert out.strip() and ">>>" not in out and out.endswith("\n")   # an answer (sampled: any answer)
    assert time.monotonic() - t0 < 180


def test_pipe_empty_or_invalid_stdin_is_an_error_not_a_prompt(smollm2_path):
    assert_one_line_error(ggflat("chat", "-m", str(smollm2_path), stdin=""), "stdin is empty")
    assert_one_line_error(ggflat("chat", "-m", str(smollm2_path), stdin=b"\xff hi"), "UTF-8")
    with open(os.devnull, "rb") as devnull:
        p = subprocess.run([sys.executable, "-m", "cli.main", "chat", "-m", str(smollm2_path)], stdin=devnull,
                           capture_output=True, timeout=60, cwd=ROOT)
    assert_one_line_error(p, "stdin is empty")


def _rewrite_chat_template(src: Path, dst: Path, template: str | None) -> None:
    """Copy a GGUF file with ``tokenizer.chat_template`` replaced (None: removed); tensors unchanged."""
    data = src.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        v = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v[0]

    def skip_string() -> str:
        nonlocal pos
        n = take("<Q")
        s = data[pos:pos + n].decode("utf-8")
        pos += n
        return s

    sizes = {T.UINT8: 1, T.INT8: 1, T.BOOL: 1, T.UINT16: 2, T.INT16: 2, T.UINT32: 4, T.INT32: 4,
             T.FLOAT32: 4, T.UINT64: 8, T.INT64: 8, T.FLOAT64: 8}

    def skip_value(vtype: int) -> None:
        nonlocal pos
        if vtype == T.STRING:
            skip_string()
        elif vtype == T.ARRAY:
            etype, n = take("<i"), take("<Q")
            if etype == T.STRING:
                for _ in range(n):
                    skip_string()
            else:
                pos += sizes[T(etype)] * n
        else:
            pos += sizes[T(vtype)]

    assert data[:4] == b"GGUF"
    pos = 4
    version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
    kvs, alignment = [], 32
    for _ in range(n_kv):
        start = pos
        key = skip_string()
        vtype = take("<i")
        vstart = pos
        skip_value(vtype)
        if key == "general.alignment":
            alignment = struct.unpack_from("<I", data, vstart)[0]
        if key != "tokenizer.chat_template":
            kvs.append(data[start:pos])
    if template is not None:
        kvs.append(kv("tokenizer.chat_template", T.STRING, template))
    infos_start = pos
    for _ in range(n_tensors):
        skip_string()
        n_dims = take("<I")
        pos += 8 * n_dims + 4 + 8
    infos = data[infos_start:pos]
    data_start = pad(pos, alignment)
    head = b"GGUF" + u32(version) + u64(n_tensors) + u64(len(kvs)) + b"".join(kvs) + infos
    head += b"\0" * (pad(len(head), alignment) - len(head))
    with open(dst, "wb") as f:
        f.write(head)
        f.write(memoryview(data)[data_start:])


def test_hostile_template_in_gguf_is_a_one_line_error_and_runs_nothing(smollm2_path, tmp_path):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.gguf"
    _rewrite_chat_template(smollm2_path, hostile,
                           "{{ lipsum.__globals__['os'].popen('touch %s').read() }}" % marker)
    assert_one_line_error(ggflat("chat", "-m", str(hostile), "-n", "4", stdin="hi"), "template")
    assert not marker.exists()


def test_model_without_template(smollm2_path, tmp_path):
    bare = tmp_path / "bare.gguf"
    _rewrite_chat_template(smollm2_path, bare, None)
    assert_one_line_error(ggflat("chat", "-m", str(bare), "-n", "4", stdin="hi"), "--chat-template-file")
    tpl = tmp_path / "chatml.jinja"
    tpl.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    p = ggflat("chat", "-m", str(bare), "--chat-template-file", str(tpl), "-n", "8", "--temp", "0",
               "-c", "256", stdin="What is 2+2?")
    assert p.returncode == 0 and p.stdout.decode().strip(), p.stderr.decode()


# ------------------------------------------------------------------------------- the REPL, in a pty

pexpect = pytest.importorskip("pexpect")


def spawn(smollm2_path, tmp_path, *args: str):
    env = dict(os.environ, GGFLAT_CACHE_DIR=str(tmp_path / "cache"), TERM="xterm")  # history goes there
    child = pexpect.spawn(sys.executable, ["-m", "cli.main", "chat", "-m", str(smollm2_path), "-c", "512", *args],
                          cwd=str(ROOT), env=env, encoding="utf-8", timeout=120, dimensions=(40, 250))
    child.expect_exact(">>> ")
    return child


def say(child, line: str) -> str:
    """Send one line, wait for the next prompt; what was printed after the echoed line."""
    child.sendline(line)
    child.expect_exact(">>> ")
    out = child.before.replace("\r\n", "\n")
    assert out.startswith(line) or line in out.split("\n", 1)[0], out
    return out.split("\n", 1)[1] if "\n" in out else ""


def test_repl_session(smollm2_path, tmp_path):
    c = spawn(smollm2_path, tmp_path, "-n", "12", "--temp", "0", "-s", "3")
    try:
        assert "4" in say(c, "What is 2+2?")

        # /regen with sampling on: every regeneration draws with a new seed
        assert "temp" in say(c, "/set temp 0.9")
        a = say(c, "/regen")
        b = say(c, "/regen")
        assert a.strip() and b.strip() and a != b
        seeds = re.findall(r"seed (\d+), stopped", say(c, "/stats"))
        assert seeds
        say(c, "/set temp 0")

        # memory, /save, /clear forgets, /load restores
        say(c, "/clear")
        say(c, "My name is Zorblax. Say hi to me.")
        assert "Zorblax" in say(c, "What is my name?")
        conv = tmp_path / "conv.json"
        assert "saved 4 messages" in say(c, f"/save {conv}")
        assert json.loads(conv.read_text())["messages"][0]["content"] == "My name is Zorblax. Say hi to me."
        say(c, "/clear")
        assert "Zorblax" not in say(c, "What is my name?")
        assert "loaded 4 messages" in say(c, f"/load {conv}")
        assert "Zorblax" in say(c, "What is my name?")

        # /system takes effect
        say(c, "/clear")
        assert "set" in say(c, "/system You are a pirate. Always say Arrr.")
        assert re.search(r"aye|arr", say(c, "Hello, who are you?"), re.I)
        assert "context:" in say(c, "/stats")

        # multi-line input
        c.sendline('"""')
        c.expect_exact("... ")
        c.sendline("What is")
        c.expect_exact("... ")
        c.sendline('2+2?"""')
        c.expect_exact(">>> ")

        # unknown commands and bad values are one-line errors; the REPL goes on
        assert "unknown command" in say(c, "/frobnicate")
        assert "top-p" in say(c, "/set top-p 7")
        assert "/regen" in say(c, "/help")

        # Ctrl-C at the prompt asks first; "n" stays
        c.sendintr()
        c.expect_exact("Leave the chat? [y/N] ")
        c.sendline("n")
        c.expect_exact(">>> ")

        # Ctrl-D leaves with status 0
        c.sendeof()
        c.expect(pexpect.EOF)
    finally:
        c.close(force=True)
    assert c.exitstatus == 0, c.before
    assert (tmp_path / "cache" / "chat_history").exists()


def test_repl_ctrl_c_stops_a_long_reply(smollm2_path, tmp_path):
    c = spawn(smollm2_path, tmp_path, "-n", "400", "--temp", "0")
    try:
        c.sendline("Write a long story about a dragon who loves books.")
        c.expect(r"dragon who loves books\.\r\n")    # the echo
        c.expect(r"\w+ \w+ \w+ \w+")                  # the reply is streaming
        t0 = time.monotonic()
        c.sendintr()
        c.expect_exact("[stopped]", timeout=20)
        c.expect_exact(">>> ")
        assert time.monotonic() - t0 < 20             # 400 tokens would take far longer
        st = say(c, "/stats")
        assert "stopped by interrupted" in st
        used = int(re.search(r"context: +(\d+) /", st).group(1))
        assert used < 300
        c.sendline("/exit")
        c.expect(pexpect.EOF)
    finally:
        c.close(force=True)
    assert c.exitstatus == 0
