"""User-facing errors: the CLI prints them as one sentence and exits non-zero, without a traceback."""


class FastdraftError(Exception):
    """An error caused by the user's input (recipe, paths, models), not by a bug in fastdraft."""


class RecipeError(FastdraftError):
    """A recipe that does not parse or validate: names the file and the key."""


class TokenizerMismatchError(FastdraftError):
    """Two artifacts that must share the target's tokenizer do not."""


class StageNotBuiltError(FastdraftError):
    """A pipeline stage whose implementation has not landed yet."""


class MissingDependencyError(FastdraftError):
    """An optional stack (vLLM, Habana's PyTorch bridge, OpenVINO) is needed but not installed."""


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency lazily, or raise a clear MissingDependencyError.

    Args:
        module: the module to import, e.g. "vllm".
        extra: the pip extra / environment that provides it, e.g. "gpu".
        purpose: what it is needed for, for the message.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs the '{module}' package, which is not installed here ({exc}). "
            f"Install it in its own environment: pip install 'fastdraft[{extra}]' (see README, 'Optional stacks')."
        ) from None


class PrefillError(Exception):
    """A prefill pass of the speculative engine's `Run` failed: its sequences (`seqs`) left the run, the rows already
    running are untouched. Not a user error: `cause` is what the forward raised."""

    def __init__(self, seqs: list[int], cause: BaseException):
        super().__init__(f"prefill of sequences {seqs} failed: {type(cause).__name__}: {cause}")
        self.seqs, self.cause = list(seqs), cause
