"""Run helpers shared by the RL examples and the experiment runner: the common flags and preamble, run folders,
GRPO arguments, training histories and JSON results.

>>> parser = argparse.ArgumentParser(); add_run_flags(parser, "dialogue-grpo")   # doctest: +SKIP
>>> run = start_run("dialogue-grpo", parser.parse_args())                       # doctest: +SKIP
>>> run.log("model", run.model); write_json(run.dir / "summary.json", run.summary(...))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cagsr_reward.config import CAGSRConfig

__all__ = [
    "Run",
    "add_ablation_flags",
    "add_run_flags",
    "config_from_flags",
    "grpo_args",
    "new_run_dir",
    "reward_history",
    "start_run",
    "write_json",
]


def add_run_flags(parser: argparse.ArgumentParser, name: str) -> None:
    """The flags every RL example has: model, device, dtype, engine context, seed, run folder, saving, ablations."""
    parser.add_argument("--model", default=None, help="HF model directory (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="policy and engine dtype")
    parser.add_argument("--max-model-len", type=int, default=2048, help="engine context length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", default=None, help=f"output directory (default runs/{name}-<timestamp>)")
    parser.add_argument("--save-model", action="store_true", help="save the trained policy under <run-dir>/policy")
    add_ablation_flags(parser)


@dataclasses.dataclass
class Run:
    """One example run: its name, folder, model, arguments and start time."""

    name: str
    dir: Path
    model: str
    args: argparse.Namespace
    started: float

    def log(self, *parts: Any) -> None:
        """A progress line, ``[name] ...``, flushed."""
        print(f"[{self.name}]", *parts, flush=True)

    def summary(self, **fields: Any) -> dict[str, Any]:
        """The summary every example writes: command, arguments, model, total seconds, plus ``fields``."""
        return {
            "example": self.name.replace("-", "_"),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "args": vars(self.args),
            "model": self.model,
            **fields,
            "total_seconds": time.perf_counter() - self.started,
        }


def start_run(name: str, args: argparse.Namespace) -> Run:
    """The common preamble: CPU engine defaults, the run folder, the model (default: the bundled SmolLM2)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default fraction fails (docs/capture.md)
    started = time.perf_counter()
    run_dir = new_run_dir(name, getattr(args, "run_dir", None))
    model = getattr(args, "model", None)
    if model is None:
        from ..default_model import default_model_path

        model = default_model_path()
    run = Run(name, run_dir, str(model), args, started)
    run.log(f"model {run.model}")
    run.log(f"run directory {run.dir}")
    return run


def grpo_args(run: Run, **overrides: Any):
    """TRL ``GRPOConfig`` for a colocated capturing engine, from the run's flags (``overrides`` win)."""
    import torch
    from trl import GRPOConfig

    args = run.args
    kwargs: dict[str, Any] = dict(
        output_dir=str(run.dir / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens,
        learning_rate=args.learning_rate,
        temperature=args.temperature,
        top_p=getattr(args, "top_p", 1.0),  # < 1 biases TRL's vLLM importance-sampling ratio (issue #6789)
        use_vllm=True,
        vllm_mode="colocate",
        vllm_max_model_length=args.max_model_len,
        use_cpu=args.device == "cpu",
        model_init_kwargs={"dtype": getattr(torch, args.dtype)},
        # TRL's GRPOConfig defaults to bf16=True: bf16 autocast even for a float32 policy, which (on CPU, against a
        # float32 vLLM engine) puts TRL's importance-sampling ratio off 1 (docs/experiments.md)
        bf16=args.dtype == "bfloat16",
        gradient_checkpointing=False,  # TRL's default recomputes activations; memory is not the limit here
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=args.seed,
    )
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def reward_history(log_history: list[dict[str, Any]], reward_name: str) -> list[dict[str, Any]]:
    """Per logged step of a TRL trainer: the CAGSR reward's components (``<name>/reward`` ...) and the loss."""
    return [
        {
            "step": h["step"],
            "reward": h.get(f"{reward_name}/reward"),
            "coverage": h.get(f"{reward_name}/coverage"),
            "focus": h.get(f"{reward_name}/focus"),
            "repetition": h.get(f"{reward_name}/repetition"),
            "grounding": h.get(f"{reward_name}/grounding"),
            "loss": h.get("loss"),
        }
        for h in log_history
        if f"{reward_name}/reward" in h
    ]


def add_ablation_flags(parser: argparse.ArgumentParser) -> None:
    """``--no-history-coverage``, ``--no-entropy-floor``, ``--uniform-turn-weights`` (the MTC §6.3 ablations)."""
    group = parser.add_argument_group("ablations (MTC §6.3)")
    group.add_argument("--no-history-coverage", action="store_true", help="coverage over the current user turn only")
    group.add_argument("--no-entropy-floor", action="store_true", help="no entropy clamping (H_min)")
    group.add_argument("--uniform-turn-weights", action="store_true", help="w_t = 1 for every turn (CoT answer too)")


def config_from_flags(args: argparse.Namespace, **overrides: Any) -> CAGSRConfig:
    """A :class:`CAGSRConfig` with the ablation flags of ``args`` applied (plus ``overrides``)."""
    return CAGSRConfig(
        history_coverage=not getattr(args, "no_history_coverage", False),
        entropy_floor=not getattr(args, "no_entropy_floor", False),
        uniform_turn_weights=getattr(args, "uniform_turn_weights", False),
        **overrides,
    )


def new_run_dir(name: str, run_dir: str | None = None, root: str = "runs") -> Path:
    """``run_dir`` if given, else ``<root>/<name>-<YYYYmmdd-HHMMSS>``; created."""
    path = Path(run_dir) if run_dir else Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (non-finite floats become ``null``; other objects their ``str``)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not np.isfinite(x):
            return None
        if isinstance(x, (np.floating, np.integer)):
            return clean(x.item())
        if isinstance(x, np.ndarray):
            return clean(x.tolist())
        if isinstance(x, Mapping):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    Path(path).write_text(json.dumps(clean(obj), indent=2, default=str))

