"""``ggflat chat``: talk to a model, as ``ollama run`` and ``llama-cli -cnv`` do.

The conversation itself (template, KV reuse between turns, overflow, /regen,
save/load) is ``engine.chat.ChatSession``; this module is the terminal around it:

* stdin a terminal: a REPL with stdlib ``readline`` (line editing, and history
  kept in ``<cache dir>/chat_history``), ``\"\"\"`` … ``\"\"\"`` for multi-line
  input, slash commands (``/help``), replies streamed token by token.
* stdin not a terminal (a pipe, a file, /dev/null): all of stdin is one user
  message; the reply is printed and the command exits — it never prompts.

Ctrl-C while a reply streams stops that reply (SIGINT only sets a flag that is
checked between tokens; a second Ctrl-C stops at once) and keeps the partial
answer in the conversation; ``/regen`` redoes it. Ctrl-C at the prompt asks
before leaving; Ctrl-D or ``/exit`` leaves with status 0.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import click

from cli.options import (backend_option, ctx_option, model_option, resolve_model, sampling_options,
                         sampling_params, verbose_option)

MAX_STDIN_BYTES = 64 << 20
PROMPT, CONTINUATION = ">>> ", "... "
FENCE = '"""'

HELP = """\
Commands:
  /help                  this help (also /?)
  /exit, /bye            leave (also Ctrl-D)
  /clear                 start a new conversation (the system prompt stays)
  /regen                 generate the last answer again, with a new seed
  /system [TEXT]         set the system prompt (no TEXT: show it; /system --clear: remove it)
  /set NAME VALUE        sampling: temp, top-k, top-p, min-p, repeat-penalty, seed (-1 = random)
  /save FILE             save the conversation as JSON
  /load FILE             load a conversation saved with /save
  /stats                 context used, last turn's token counts and rates
Multi-line input: start with \"\"\" and end with \"\"\".
Ctrl-C stops a reply; Ctrl-C at the prompt asks before leaving."""


@click.command("chat")
@model_option
@ctx_option
@click.option("-n", "--n-predict", type=click.IntRange(min=-1), default=-1, show_default=True,
              help="Most tokens per answer (-1 = until end of generation or a full context).")
@sampling_options
@click.option("-sys", "--system-prompt", default=None, help="System prompt.")
@click.option("--chat-template-file", default=None, help="Jinja chat template to use instead of the model's.")
@click.option("-b", "--batch-size", "n_batch", type=click.IntRange(min=1), default=512, show_default=True,
              help="Prompt tokens per forward pass.")
@backend_option
@verbose_option
def chat(model_path, n_ctx, n_predict, system_prompt, chat_template_file, n_batch, backend, verbose, **kw):
    """Chat with a model (reads one message from stdin when it is not a terminal)."""
    from engine.chat import ChatSession
    from engine.chat_template import load_chat_template
    from engine.errors import GGFlatError
    from engine.model import Model

    interactive = sys.stdin is not None and sys.stdin.isatty()
    message = None if interactive else _read_stdin()   # before the model: a bad input fails fast

    t_load = time.perf_counter()
    model = Model.load(resolve_model(model_path), backend)
    template = load_chat_template(model.gf.metadata, chat_template_file)
    session = ChatSession(model, template, n_ctx=n_ctx, n_predict=n_predict, system=system_prompt,
                          n_batch=n_batch, params=None)
    session.params = sampling_params(kw, session.n_ctx)
    session.check_template()        # a broken or hostile template fails here, before any prompt
    load_seconds = time.perf_counter() - t_load

    if not interactive:
        out = sys.stdout
        res = session.ask(message, on_text=lambda t: (out.write(t), out.flush()))
        if res.notice:
            print(f"ggflat: {res.notice}", file=sys.stderr)
        out.write("\n")
        out.flush()
        if verbose:
            res.stats.load_seconds = load_seconds
            print(res.stats.summary(), file=sys.stderr)
        return 0

    repl = Repl(session, verbose, GGFlatError)
    repl.load_seconds = load_seconds
    return repl.run()


def _read_stdin() -> str:
    from engine.errors import GGFlatError
    data = sys.stdin.buffer.read(MAX_STDIN_BYTES + 1) if sys.stdin is not None else b""
    if len(data) > MAX_STDIN_BYTES:
        raise GGFlatError(f"stdin holds more than {MAX_STDIN_BYTES} bytes; that is no chat message")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GGFlatError(f"stdin is not valid UTF-8 (byte {e.start})") from None
    text = text.strip()
    if not text:
        raise GGFlatError("stdin is empty: pipe a message into ggflat chat, or run it in a terminal")
    return text


class _Exit(Exception):
    pass


class Repl:
    def __init__(self, session, verbose: bool, error_type: type) -> None:
        self.s = session
        self.verbose = verbose
        self.Error = error_type
        self.load_seconds = 0.0
        self._stop = False
        self._history_file: str | None = None

    # -- input ------------------------------------------------------------------------------
    def _setup_readline(self) -> None:
        try:
            import readline
        except ImportError:          # no readline on this platform: plain input() still works
            return
        from engine.model_cache import cache_dir
        path = str(cache_dir() / "chat_history")
        try:
            readline.read_history_file(path)
        except (OSError, ValueError):
            pass
        readline.set_history_length(1000)
        self._history_file = path

    def _save_history(self) -> None:
        if self._history_file is None:
            return
        try:
            import readline
            os.makedirs(os.path.dirname(self._history_file), exist_ok=True)
            readline.write_history_file(self._history_file)
            os.chmod(self._history_file, 0o600)      # what people type to a model is theirs alone
        except (OSError, ImportError):
            pass

    def read_message(self) -> str:
        """One message: a line, or the lines between \"\"\" fences. EOFError / KeyboardInterrupt pass up."""
        line = input(PROMPT)
        if not line.lstrip().startswith(FENCE):
            return line
        first = line.lstrip()[len(FENCE):]
        if first.rstrip().endswith(FENCE) and first.strip():
            return first.rstrip()[:-len(FENCE)]
        lines = [first] if first else []
        while True:
            nxt = input(CONTINUATION)
            if nxt.rstrip().endswith(FENCE):
                lines.append(nxt.rstrip()[:-len(FENCE)])
                return "\n".join(lines).strip("\n")
            lines.append(nxt)

    def confirm_exit(self) -> bool:
        print()
        try:
            ans = input("Leave the chat? [y/N] ")
        except (EOFError, KeyboardInterrupt):
            print()
            return True
        return ans.strip().lower() in ("y", "yes")

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> int:
        self._setup_readline()
        print(f"ggflat chat: {self.s.model.config.name or 'model'}, context {self.s.n_ctx} tokens. "
              f"/help for commands, /exit or Ctrl-D to leave.", flush=True)
        try:
            while True:
                try:
                    line = self.read_message()
                except EOFError:
                    print()
                    return 0
                except KeyboardInterrupt:
                    if self.confirm_exit():
                        return 0
                    continue
                if line.startswith("/"):
                    try:
                        self.command(line)
                    except _Exit:
                        return 0
                    except self.Error as e:
                        self._error(e)
                    continue
                if not line.strip():
                    continue
                self.turn(lambda on_text, should_stop: self.s.ask(line, on_text, should_stop))
        finally:
            self._save_history()

    def _error(self, e: BaseException) -> None:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)

    def turn(self, fn) -> None:
        self._stop = False

        def on_sigint(signum, frame):
            if self._stop:                   # a second Ctrl-C: stop now, even inside a forward pass
                raise KeyboardInterrupt
            self._stop = True

        out = sys.stdout
        wrote: list[str] = []

        def on_text(t: str) -> None:
            wrote.append(t)
            out.write(t)
            out.flush()

        old = signal.signal(signal.SIGINT, on_sigint)
        try:
            res = fn(on_text, lambda: self._stop)
        except KeyboardInterrupt:
            out.write("\n[stopped]\n")
            out.flush()
            return
        except self.Error as e:
            if wrote:
                out.write("\n")
            self._error(e)
            return
        finally:
            signal.signal(signal.SIGINT, old)
        text = "".join(wrote)
        if res.interrupted:
            out.write("\n[stopped]\n")
        elif not text.endswith("\n"):
            out.write("\n")
        out.flush()
        if res.notice:
            print(f"({res.notice})", file=sys.stderr, flush=True)
        if res.stop_reason == "context":
            print(f"(the reply filled the context of {self.s.n_ctx} tokens; the oldest turns will make room "
                  f"for the next one)", file=sys.stderr, flush=True)
        if self.verbose:
            res.stats.load_seconds, self.load_seconds = self.load_seconds, 0.0
            print(res.stats.summary(), file=sys.stderr, flush=True)

    # -- slash commands --------------------------------------------------------------------------
    def command(self, line: str) -> None:
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        s = self.s
        if name in ("/help", "/?"):
            print(HELP)
        elif name in ("/exit", "/bye", "/quit"):
            raise _Exit
        elif name == "/clear":
            s.clear()
            print("(new conversation)")
        elif name == "/regen":
            self.turn(lambda on_text, should_stop: s.regen(on_text, should_stop))
        elif name == "/system":
            if not arg:
                print(f"system prompt: {s.system!r}" if s.system is not None
                      else "(no system prompt: the template's default)")
            elif arg == "--clear":
                s.set_system(None)
                print("(system prompt removed)")
            else:
                s.set_system(arg)
                print("(system prompt set)")
        elif name == "/set":
            key, _, value = arg.partition(" ")
            if not key or not value.strip():
                from engine.chat import SETTABLE
                raise self.Error(f"usage: /set NAME VALUE (NAME: {', '.join(SETTABLE)})")
            s.set_param(key, value.strip())
            print(f"({key} = {value.strip()})")
        elif name == "/save":
            if not arg:
                raise self.Error("usage: /save FILE")
            s.save(os.path.expanduser(arg))
            print(f"(saved {len(s.messages)} messages to {arg})")
        elif name == "/load":
            if not arg:
                raise self.Error("usage: /load FILE")
            s.load(os.path.expanduser(arg))
            print(f"(loaded {len(s.messages)} messages from {arg})")
        elif name == "/stats":
            self.stats()
        else:
            raise self.Error(f"unknown command {name} (/help lists them)")
        sys.stdout.flush()

    def stats(self) -> None:
        s = self.s
        pct = 100.0 * s.n_tokens / s.n_ctx if s.n_ctx else 0.0
        print(f"context:   {s.n_tokens} / {s.n_ctx} tokens used ({pct:.0f}%), {len(s.messages)} messages")
        p = s.params
        print(f"sampling:  temp {p.temperature:g}, top-k {p.top_k}, top-p {p.top_p:g}, min-p {p.min_p:g}, "
              f"seed {'random' if p.seed is None else p.seed}")
        if s.last is None:
            print("last turn: none yet")
            return
        st = s.last.stats
        print(f"last turn: prompt eval {st.prompt_tokens} token(s), {st.prompt_rate:.2f} tokens/s; "
              f"eval {st.gen_tokens} token(s), {st.eval_rate:.2f} tokens/s; "
              f"seed {s.last.seed}, stopped by {s.last.stop_reason}")
