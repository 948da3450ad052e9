"""User-facing errors.

Anything a user can cause with a bad file, flag or prompt raises a subclass of
``GGFlatError``; the CLI prints it as one line ``error: <message>`` and exits 1.
Any other exception is a bug in ggflat and is shown with its traceback only
under ``--verbose``.
"""


class GGFlatError(Exception):
    """An error the user can act on; its message is one line."""


class GGUFError(GGFlatError):
    """A GGUF file is malformed, truncated or not a GGUF file at all."""


class UnknownTypeError(GGFlatError):
    """A ggml tensor type id that ggflat does not know or does not support."""


class TokenizerError(GGFlatError):
    """Tokenizer metadata is missing or inconsistent."""


class TemplateError(GGFlatError):
    """A chat template failed to render or tried to leave its sandbox."""


class ModelError(GGFlatError):
    """A model file is readable but cannot be run (unknown architecture, missing tensors, ...)."""


class ContextError(GGFlatError):
    """A prompt or conversation does not fit the context."""
