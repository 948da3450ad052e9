"""Options shared by the model commands (DESIGN.md §3 flag names)."""
from __future__ import annotations

import click

verbose_option = click.option(
    "--verbose", is_flag=True, default=False,
    help="Show tracebacks and extra detail on errors.")

model_option = click.option(
    "-m", "--model", "model_path", type=click.Path(dir_okay=True, path_type=str), default=None,
    help="GGUF model file (default: SmolLM2-135M-Instruct Q4_1, fetched once into the cache).")


def resolve_model(model_path: str | None) -> str:
    """The model file a command should open: the one given, or the default model."""
    if model_path is not None:
        return model_path
    from engine.model_cache import default_model_path
    return str(default_model_path())

BACKENDS = ("cupy", "numpy")


def _resolve_backend(ctx: click.Context, param: click.Parameter, value: str | None) -> str:
    """--backend: "cupy" when CuPy finds a CUDA GPU, else "numpy"; decided here, at parse time
    (never for --help), and cheaply: CuPy is imported only when a CUDA driver reports a device."""
    from ggml_py.backend_cupy import unavailable_reason
    if value is None:
        return "cupy" if unavailable_reason() is None else "numpy"
    if value == "cupy":
        reason = unavailable_reason()
        if reason is not None:
            from engine.errors import GGFlatError
            raise GGFlatError(f"the cupy backend needs CuPy and a CUDA GPU: {reason}")
    return value


backend_option = click.option(
    "--backend", type=click.Choice(BACKENDS), default=None, callback=_resolve_backend,
    show_default="cupy when a CUDA GPU is usable, else numpy",
    help="Compute backend: cupy (CUDA GPU through CuPy) or numpy (the reference).")

ctx_option = click.option(
    "-c", "--ctx-size", "n_ctx", type=click.IntRange(min=0), default=0,
    help="Context size in tokens (0: min(4096, the model's training context)).")


def sampling_options(f):
    """llama.cpp's sampling flags (defaults as llama.cpp's)."""
    opts = [
        click.option("--temp", "temperature", type=float, default=0.8, show_default=True,
                     help="Temperature; 0 = greedy."),
        click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True, help="Top-k (0 = off)."),
        click.option("--top-p", type=float, default=0.95, show_default=True, help="Top-p / nucleus (1.0 = off)."),
        click.option("--min-p", type=float, default=0.05, show_default=True, help="Min-p (0.0 = off)."),
        click.option("--repeat-penalty", type=float, default=1.0, show_default=True,
                     help="Penalty for repeated tokens (1.0 = off)."),
        click.option("--repeat-last-n", type=click.IntRange(min=-1), default=64, show_default=True,
                     help="Tokens the repeat penalties look back over (-1 = context)."),
        click.option("--presence-penalty", type=float, default=0.0, show_default=True),
        click.option("--frequency-penalty", type=float, default=0.0, show_default=True),
        click.option("-s", "--seed", type=int, default=-1, show_default=True, help="RNG seed (-1 = random)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def sampling_params(kw: dict, n_ctx: int):
    """Build SamplingParams from the sampling options in ``kw`` (popping them)."""
    from engine.sampling import SamplingParams
    last_n = kw.pop("repeat_last_n")
    seed = kw.pop("seed")
    p = SamplingParams(temperature=kw.pop("temperature"), top_k=kw.pop("top_k"), top_p=kw.pop("top_p"),
                       min_p=kw.pop("min_p"), repeat_penalty=kw.pop("repeat_penalty"),
                       repeat_last_n=n_ctx if last_n == -1 else last_n,
                       frequency_penalty=kw.pop("frequency_penalty"), presence_penalty=kw.pop("presence_penalty"),
                       seed=None if seed < 0 else seed)
    p.validate()
    return p


def read_text_file(path: str) -> str:
    """A UTF-8 text file for -f, with one-line errors."""
    from engine.errors import GGFlatError
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise GGFlatError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise GGFlatError(f"{path} is a directory, not a text file") from None
    except OSError as e:
        raise GGFlatError(f"cannot read {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GGFlatError(f"{path} is not valid UTF-8 (byte {e.start})") from None
