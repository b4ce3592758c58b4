"""Helpers shared by the ``attncap`` commands: user errors, flag parsing, the engine, token labels."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "PROG", "UsageError", "causal", "check_indices_against_config", "decode_each", "int_arg", "parse_index_list",
    "printable", "resolve_model", "setup_vllm_env", "start_engine",
]

PROG = "attncap"


class UsageError(Exception):
    """A mistake in how the command was called: printed as one line, exit status 2."""


def parse_index_list(values: Sequence[str] | None, name: str, allow_all: bool = True) -> str | list[int] | None:
    """``["all"]`` -> "all"; ``["-1", "3"]`` or ``["0,1,-1"]`` -> ints."""
    if values is None:
        return None
    items = [v for raw in values for v in str(raw).split(",") if v.strip()]
    if allow_all and len(items) == 1 and items[0].strip().lower() == "all":
        return "all"
    try:
        return [int(v) for v in items]
    except ValueError:
        raise UsageError(f"--{name}: expected {'all or ' if allow_all else ''}integers, got {' '.join(values)!r}") from None


def setup_vllm_env(verbose: bool) -> None:
    """Defaults that make a local run quick and quiet; the user's own settings win."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; CPU only (the default fraction fails there)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in-process: starts in seconds
    if not verbose:
        import warnings

        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside vLLM's imports
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def resolve_model(model: str | None) -> str:
    if model is None:
        from ..default_model import BundledModelMissing, default_model_path

        try:
            return default_model_path()
        except BundledModelMissing as e:
            raise UsageError(str(e).replace("\n", " ")) from None
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise UsageError(
            f"--model {model!r} is not a Hugging Face model directory (no config.json there); "
            "omit --model to use the bundled SmolLM2"
        )
    return str(path)


def check_indices_against_config(model: str, layers: Any, heads: Any) -> None:
    """Fail before the engine starts when layer/head indices are out of range for the model
    (read from its config.json; skipped when the config does not say)."""
    from ..spec import CaptureSpec, resolve_spec

    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        num_layers, num_heads = int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    # prompt_len = max_tokens = 1 and no byte cap: only the index checks can fail here.
    resolve_spec(CaptureSpec(layers=layers if layers is not None else "all", heads=heads if heads is not None else "all",
                             max_bytes=2**62),
                 num_layers=num_layers, num_heads=num_heads, prompt_len=1, max_tokens=1)


def start_engine(model: str, *, max_model_len: int | None, seed: int):
    from vllm import LLM

    try:
        return LLM(
            model=model,
            attention_backend="attncap",
            enforce_eager=True,
            max_model_len=max_model_len,
            seed=seed,
        )
    except ValueError as e:
        raise UsageError(f"vLLM could not start on {model}: {e}") from None


def decode_each(tokenizer, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids]


def printable(token: str) -> str:
    """A label without control characters (fonts have no glyphs for them)."""
    return "".join(c if c.isprintable() or c in " \n\t" else f"\\x{ord(c):02x}" for c in token)


def int_arg(value: str, flag: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{flag}: expected an integer, got {value!r}") from None


def causal(attention_2d, prompt_len: int):
    """A float copy with the cells a row cannot see (keys after its query) set to NaN,
    which the heatmap draws blank."""
    import numpy as np

    a = np.array(attention_2d, dtype=np.float64)
    rows, cols = a.shape
    visible = np.arange(cols)[None, :] < (prompt_len + np.arange(rows))[:, None]
    a[~visible] = np.nan
    return a
