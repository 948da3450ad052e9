"""Entry point of the ``ggflat`` command.

Commands live one per module (``cli/<name>_cmd.py``) and are imported only when
they run, so ``ggflat --help`` and ``ggflat inspect`` never pay for NumPy model
code or CuPy start-up.

Error policy (DESIGN.md §3): a ``GGFlatError`` is printed as one line
``error: <message>`` and exits 1; click's usage errors exit 2; any other
exception is a bug and is reported the same way, with the traceback only under
``--verbose``.
"""
from __future__ import annotations

import importlib
import os
import sys
import traceback

import click

from engine.errors import GGFlatError

# name -> "module:attribute"; the order is the order of ``ggflat --help``.
COMMANDS: dict[str, str] = {
    "generate": "cli.generate_cmd:generate",
    "chat": "cli.chat_cmd:chat",
    "perplexity": "cli.perplexity_cmd:perplexity",
    "bench": "cli.bench_cmd:bench",
    "tokenize": "cli.tokenize_cmd:tokenize",
    "inspect": "cli.inspect_cmd:inspect",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ggflat", prog_name="ggflat")
def cli() -> None:
    """ggflat: run GGUF language models on NumPy or the GPU."""


def _verbose_requested(argv: list[str]) -> bool:
    return "--verbose" in argv or os.environ.get("GGFLAT_VERBOSE") == "1"


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = _verbose_requested(args)
    try:
        rc = cli.main(args=args, prog_name="ggflat", standalone_mode=False)
        code = rc if isinstance(rc, int) else 0
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.ClickException as e:  # usage errors: click's own message, exit 2
        e.show()
        code = e.exit_code
    except click.exceptions.Abort:
        print("\naborted", file=sys.stderr)
        code = 130
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        # `ggflat generate ... | head`: the reader left; not an error of ours.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        code = 0
    except GGFlatError as e:
        if verbose:
            traceback.print_exc()
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        code = 1
    except MemoryError:
        if verbose:
            traceback.print_exc()
        print("error: out of memory", file=sys.stderr)
        code = 1
    except Exception as e:  # a bug: still one line unless --verbose
        if verbose:
            traceback.print_exc()
        print(f"error: internal error: {type(e).__name__}: {_one_line(str(e))} "
              "(run with --verbose for the traceback)", file=sys.stderr)
        code = 1
    sys.exit(code)


def _one_line(msg: str) -> str:
    return " ".join(msg.split()) or "(no message)"


if __name__ == "__main__":
    main()
