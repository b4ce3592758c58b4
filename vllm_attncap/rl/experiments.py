"""The experiment grid of docs/experiments.md: does training on the CAGSR attention reward teach anything?

One command runs it, resumes after an interruption (every unit writes ``<out>/<unit>.json`` and is skipped when that
file exists) and respects a time budget (a unit is not started when its estimated wall time would overrun it)::

    python -m vllm_attncap.rl.experiments [--quick] [--budget MIN] [--out runs/experiments-cpu] [--units a,b]
    make experiments            # the same, full size, into runs/experiments-cpu

Units, in priority order (the order the grid runs them):

Reward validity is no longer a unit here: ``python -m experiments.validity`` (selection / confirm splits, baselines,
probes; docs/experiments.md "Reward validity").

2. ``dialogue_untrained``, ``dialogue_full``, ``dialogue_single``, ``dialogue_ngram`` -- GRPO arms on dialogue
   (same training prompts, seed, steps and held-out replies): the untrained policy, the full multi-turn reward,
   single-turn CAGSR, the n-gram-overlap-with-gold heuristic baseline;
   ``is_ratio_{bf16,fp32}_top_p{095,1}`` -- the full arm's first steps in the 2 x 2 of {``top_p=0.95`` (the old
   example default), ``top_p=1.0``} x {bf16 autocast (TRL's default ``bf16=True``), float32 training (the grid's
   setting)}, to measure TRL's vLLM importance-sampling ratio;
   ``dialogue_no_history_coverage``, ``dialogue_no_entropy_floor`` -- the ablations (the uniform-turn-weights
   ablation changes nothing in dialogue GRPO, where every completion is one turn of weight 1, so it runs on CoT).
3. ``cot_untrained``, ``cot_block``, ``cot_completion``, ``cot_uniform_weights`` -- CHAMP chain of thought: block
   advantages vs one advantage per completion (and the uniform-weights ablation with block advantages).
4. ``ppo_full`` -- PPO over turns with the user simulator.

After the units, :func:`write_report` writes ``report.md`` (every table), ``report.json``, ``reward_curves.png`` and
``heldout_bars.png`` into the output folder. Each unit runs in its own Python process (``--in-process`` runs them in
this one, as the CI smoke test does), so a crash or a memory leak stays in its unit.

numpy only at import time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cagsr_reward.config import CAGSRConfig
from cagsr_reward.metrics import bootstrap_ci, ngram_overlap

from .runs import write_json

__all__ = ["SIZES", "UNITS", "run_grid", "run_unit", "write_report", "ngram_reward_func", "main"]

# ----------------------------------------------------------------------------------------------------------------
# sizes
# ----------------------------------------------------------------------------------------------------------------
SIZES: dict[str, dict[str, Any]] = {
    "full": dict(
        heldout_chitchat=24, heldout_tech=8, turns_per_episode=2, eval_max_new_tokens=32,
        validity_dialogue_tokens=48, validity_problems=64, validity_cot_tokens=96,
        steps=10, batch_size=8, num_generations=4, max_new_tokens=24, learning_rate=2e-5, temperature=0.8,
        max_prompt_tokens=256, is_steps=4, train_bf16_autocast=False,
        cot_problems=64, cot_steps=8, cot_max_new_tokens=40, cot_eval_max_new_tokens=64,
        ppo_steps=2, ppo_batch=1, ppo_minibatch=4,
    ),
    "quick": dict(
        heldout_chitchat=2, heldout_tech=2, turns_per_episode=1, eval_max_new_tokens=8,
        validity_dialogue_tokens=12, validity_problems=4, validity_cot_tokens=16,
        steps=1, batch_size=4, num_generations=2, max_new_tokens=8, learning_rate=2e-5, temperature=0.8,
        max_prompt_tokens=256, is_steps=1, train_bf16_autocast=False,
        cot_problems=2, cot_steps=1, cot_max_new_tokens=8, cot_eval_max_new_tokens=8,
        ppo_steps=1, ppo_batch=1, ppo_minibatch=4,
    ),
}

#: unit -> rough wall seconds at full size on 2 cores (what the budget check uses before a unit has run).
ESTIMATE_S = {
    "dialogue_untrained": 90, "dialogue_full": 300,
    "dialogue_single": 300, "dialogue_ngram": 300, "is_ratio_bf16_top_p095": 120, "is_ratio_bf16_top_p1": 120,
    "is_ratio_fp32_top_p1": 160, "is_ratio_fp32_top_p095": 130, "dialogue_no_history_coverage": 300,
    "dialogue_no_entropy_floor": 300, "cot_untrained": 120, "cot_block": 300, "cot_completion": 300,
    "cot_uniform_weights": 300, "ppo_full": 300,
}

DIALOGUE_ARMS: dict[str, dict[str, Any]] = {
    # arm -> training reward ("cagsr" with a config, or "ngram"); every arm is evaluated under the full reward
    "dialogue_full": {"reward": "cagsr", "config": {}},
    "dialogue_single": {"reward": "cagsr", "config": {"mode": "single", "history_coverage": False, "entropy_floor": False}},
    "dialogue_ngram": {"reward": "ngram", "config": {}},
    # the full arm's first steps in the 2 x 2 of {nucleus 0.95, full distribution} x {bf16 autocast (TRL's
    # GRPOConfig default bf16=True, which autocasts even a float32 model on CPU), float32 training}
    "is_ratio_bf16_top_p095": {"reward": "cagsr", "config": {}, "top_p": 0.95, "steps_key": "is_steps",
                               "evaluate": False, "bf16": True},
    "is_ratio_bf16_top_p1": {"reward": "cagsr", "config": {}, "top_p": 1.0, "steps_key": "is_steps",
                             "evaluate": False, "bf16": True},
    "is_ratio_fp32_top_p1": {"reward": "cagsr", "config": {}, "top_p": 1.0, "steps_key": "is_steps", "evaluate": False,
                             "bf16": False},
    "is_ratio_fp32_top_p095": {"reward": "cagsr", "config": {}, "top_p": 0.95, "steps_key": "is_steps",
                               "evaluate": False, "bf16": False},
    "dialogue_no_history_coverage": {"reward": "cagsr", "config": {"history_coverage": False}},
    "dialogue_no_entropy_floor": {"reward": "cagsr", "config": {"entropy_floor": False}},
}
COT_ARMS: dict[str, dict[str, Any]] = {
    "cot_block": {"block_advantages": True, "config": {}},
    "cot_completion": {"block_advantages": False, "config": {}},
    "cot_uniform_weights": {"block_advantages": True, "config": {"uniform_turn_weights": True}},
}
UNITS: tuple[str, ...] = (
    "dialogue_untrained", "dialogue_full", "dialogue_single", "dialogue_ngram",
    "is_ratio_bf16_top_p095", "is_ratio_bf16_top_p1", "is_ratio_fp32_top_p095", "is_ratio_fp32_top_p1",
    "dialogue_no_history_coverage", "dialogue_no_entropy_floor",
    "cot_untrained", "cot_block", "cot_completion", "cot_uniform_weights", "ppo_full",
)
SOURCES = ("chitchat", "tech_support")


# ----------------------------------------------------------------------------------------------------------------
# shared set-up: data, held-out sets, salience
# ----------------------------------------------------------------------------------------------------------------
class Context:
    """What every unit shares: the model, the sizes, the data splits (deterministic from the seed)."""

    def __init__(self, model: str, size: str, seed: int, out: Path):
        self.model, self.size, self.seed, self.out = model, size, seed, out
        self.s = SIZES[size]
        self._dialogue = None
        self._cot = None
        self._tokenizer = None
        self.max_model_len = 2048
        try:  # a small test model may have a shorter context
            cfg = json.loads((Path(model) / "config.json").read_text())
            self.max_model_len = min(2048, int(cfg.get("max_position_embeddings", 2048)))
        except (OSError, ValueError):
            pass

    def dialogue(self):
        """``(train_episodes, heldout_episodes, heldout_items, selector)``: the held-out dialogues are drawn per
        source (``heldout_chitchat`` + ``heldout_tech``), the rest is training data."""
        if self._dialogue is None:
            from cagsr_reward.idf import IDFModel
            from cagsr_reward.integrations.user_sim import UserSimulator
            from cagsr_reward.salient import SalientSelector

            from .evaluation import reply_items

            sim = UserSimulator.from_sources(SOURCES, seed=self.seed, limit_per_source=1000, max_turn_chars=120)
            rng = np.random.default_rng(self.seed)
            train, held = [], []
            for src, k in (("chitchat", self.s["heldout_chitchat"]), ("tech_support", self.s["heldout_tech"])):
                eps = [e for e in sim.episodes if e.source == src]
                perm = rng.permutation(len(eps))
                held += [eps[int(i)] for i in sorted(perm[:k])]
                train += [eps[int(i)] for i in sorted(perm[k:])]
            items = reply_items(held, turns_per_episode=self.s["turns_per_episode"], seed=self.seed)
            selector = SalientSelector(IDFModel.fit([" ".join(e.user_turns) for e in train]))
            self._dialogue = (train, held, items, selector)
        return self._dialogue

    def cot(self):
        """``(train_problems, heldout_problems, selector)``."""
        if self._cot is None:
            from cagsr_reward.idf import IDFModel
            from cagsr_reward.integrations.cot import load_champ, split_problems
            from cagsr_reward.salient import SalientSelector

            train, held = split_problems(load_champ(), self.s["cot_problems"], seed=self.seed)
            self._cot = (train, held, SalientSelector(IDFModel.fit([p.question for p in train])))
        return self._cot

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model)
        return self._tokenizer


def _completion_text(c: Any) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, Sequence) and c and isinstance(c[-1], Mapping):
        return str(c[-1].get("content", ""))
    return str(c)


def ngram_reward_func(max_n: int = 2) -> Callable[..., list[float]]:
    """The heuristic baseline as a TRL reward function: :func:`~cagsr_reward.metrics.ngram_overlap` of each
    completion with the dataset's ``gold`` column (the recorded reply)."""

    def ngram(prompts, completions, completion_ids=None, gold=None, **kwargs):
        if gold is None:
            raise ValueError("ngram reward: the dataset needs a 'gold' column (the recorded reply)")
        return [ngram_overlap(_completion_text(c), g, max_n=max_n) for c, g in zip(completions, gold)]

    ngram.__name__ = "ngram"
    return ngram


def _train_history(log_history: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """Per logged training step: TRL's reward, the importance-sampling ratio and log-prob gap, the CAGSR components
    of every CAGSR reward named in ``names``."""
    rows = []
    for h in log_history:
        if "loss" not in h and "reward" not in h:
            continue
        row = {
            "step": h.get("step"),
            "loss": h.get("loss"),
            "reward": h.get("reward"),
            "is_ratio_mean": h.get("sampling/importance_sampling_ratio/mean"),
            "is_ratio_min": h.get("sampling/importance_sampling_ratio/min"),
            "is_ratio_max": h.get("sampling/importance_sampling_ratio/max"),
            "logp_diff_mean": h.get("sampling/sampling_logp_difference/mean"),
            "completion_length": h.get("completions/mean_length"),
        }
        for name in names:
            for c in ("reward", "coverage", "focus", "repetition"):
                row[f"{name}/{c}"] = h.get(f"{name}/{c}")
        rows.append(row)
    return rows


def _grpo_config(ctx: Context, run_dir: Path, *, steps: int, max_new_tokens: int, top_p: float, **overrides: Any):
    import torch
    from trl import GRPOConfig

    s = ctx.s
    kwargs: dict[str, Any] = dict(
        output_dir=str(run_dir / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=s["batch_size"],
        num_generations=s["num_generations"],
        max_completion_length=max_new_tokens,
        learning_rate=s["learning_rate"],
        temperature=s["temperature"],
        top_p=top_p,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_max_model_length=ctx.max_model_len,
        use_cpu=True,
        model_init_kwargs={"dtype": torch.float32},
        gradient_checkpointing=False,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=ctx.seed,
        # TRL's GRPOConfig default is bf16=True (bf16 autocast, also for a float32 model on CPU), which moves the
        # trainer's log-probs off the engine's and the IS ratio below 1: the grid trains in float32
        # (SIZES["train_bf16_autocast"]); the is_ratio_bf16_* units measure TRL's default
        bf16=bool(s["train_bf16_autocast"]),
    )
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def _eval_replies(ctx: Context, llm: Any) -> dict[str, Any]:
    from vllm import SamplingParams

    from .evaluation import evaluate_replies

    _, _, items, selector = ctx.dialogue()
    sp = SamplingParams(temperature=0.0, max_tokens=ctx.s["eval_max_new_tokens"])
    return evaluate_replies(llm, items, CAGSRConfig(), selector=selector, sampling_params=sp, seed=ctx.seed)


def _cot_summary(result: Mapping[str, Any], seed: int) -> dict[str, Any]:
    from .evaluation import summarize_rows

    rows = [dict(r, correct=float(r["correct"]), answered=float(r["predicted"] is not None)) for r in result["problems"]]
    keys = ("correct", "answered", "rouge_l", "token_f1", "reward", "coverage", "focus", "repetition")
    return summarize_rows(rows, keys, group="problem_id", seed=seed)


# ----------------------------------------------------------------------------------------------------------------
# units
# ----------------------------------------------------------------------------------------------------------------
def unit_dialogue_untrained(ctx: Context) -> dict[str, Any]:
    from .engine_weights import capture_llm

    llm = capture_llm(ctx.model, dtype="float32", max_model_len=ctx.max_model_len, seed=ctx.seed)
    t0 = time.perf_counter()
    result = _eval_replies(ctx, llm)
    return {"eval": result, "eval_seconds": time.perf_counter() - t0}


def _dialogue_prompts(ctx: Context, steps: int) -> dict[str, list]:
    """The training prompts of every dialogue arm (same for all): recorded histories cut at a random user turn
    that has a recorded reply, at most ``max_prompt_tokens`` long; with the recorded reply as ``gold``."""
    from cagsr_reward.integrations.user_sim import UserSimulator

    train, _, _, _ = ctx.dialogue()
    tok = ctx.tokenizer()
    rng = np.random.default_rng(ctx.seed)
    need = max(1, steps * ctx.s["batch_size"] // ctx.s["num_generations"])
    prompts, gold = [], []
    for i in rng.permutation(len(train)):
        ep = train[int(i)]
        turns = min(ep.num_turns, len(ep.reference_replies))
        if turns == 0:
            continue
        t = int(rng.integers(turns))
        msgs = UserSimulator.reference_prefix(ep, t)
        rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if len(tok(rendered, add_special_tokens=False)["input_ids"]) <= ctx.s["max_prompt_tokens"]:
            prompts.append(msgs)
            gold.append(ep.reference_replies[t])
        if len(prompts) == need:
            break
    return {"prompt": prompts, "gold": gold}


def _dialogue_arm(ctx: Context, name: str) -> dict[str, Any]:
    from datasets import Dataset

    from cagsr_reward.integrations.trl import cagsr_reward_func

    from .trainers import CaptureGRPOTrainer

    arm = DIALOGUE_ARMS[name]
    steps = ctx.s[arm.get("steps_key", "steps")]
    _, _, _, selector = ctx.dialogue()
    tok = ctx.tokenizer()
    train_config = CAGSRConfig(**arm["config"])
    monitor = cagsr_reward_func(CAGSRConfig(), tokenizer=tok, selector=selector, name="cagsr_full")
    if arm["reward"] == "ngram":
        funcs, weights = [ngram_reward_func(), monitor], [1.0, 0.0]
    elif arm["config"]:
        funcs = [cagsr_reward_func(train_config, tokenizer=tok, selector=selector, name="cagsr"), monitor]
        weights = [1.0, 0.0]
    else:
        funcs, weights = [cagsr_reward_func(train_config, tokenizer=tok, selector=selector, name="cagsr_full")], [1.0]
    run_dir = ctx.out / "work" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    data = _dialogue_prompts(ctx, steps)
    extra = {"bf16": arm["bf16"]} if "bf16" in arm else {}
    args = _grpo_config(ctx, run_dir, steps=steps, max_new_tokens=ctx.s["max_new_tokens"],
                        top_p=arm.get("top_p", 1.0), reward_weights=weights, **extra)
    trainer = CaptureGRPOTrainer(model=ctx.model, reward_funcs=funcs, args=args,
                                 train_dataset=Dataset.from_dict(data),
                                 vllm_engine_kwargs={"dtype": "float32", "seed": ctx.seed})
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    history = _train_history(trainer.state.log_history, [f.__name__ for f in funcs if f.__name__.startswith("cagsr")])
    out: dict[str, Any] = {
        "train_reward": arm["reward"], "train_config": train_config.to_dict(), "top_p": arm.get("top_p", 1.0),
        "bf16_autocast": bool(args.bf16),
        "steps": steps, "num_train_prompts": len(data["prompt"]), "train_seconds": train_s,
        "seconds_per_step": train_s / max(1, steps), "history": history,
    }
    if arm.get("evaluate", True):
        trainer.vllm_generation.sync_weights()
        t0 = time.perf_counter()
        out["eval"] = _eval_replies(ctx, trainer.attncap_llm.wrapped_llm)
        out["eval_seconds"] = time.perf_counter() - t0
    return out


def unit_cot_untrained(ctx: Context) -> dict[str, Any]:
    from vllm import SamplingParams

    from .engine_weights import capture_llm
    from .evaluation import evaluate_cot

    _, held, selector = ctx.cot()
    llm = capture_llm(ctx.model, dtype="float32", max_model_len=ctx.max_model_len, seed=ctx.seed)
    sp = SamplingParams(temperature=0.0, max_tokens=ctx.s["cot_eval_max_new_tokens"])
    result = evaluate_cot(llm, held, CAGSRConfig(mode="cot"), selector=selector, sampling_params=sp)
    result["summary_ci"] = _cot_summary(result, ctx.seed)
    return {"eval": result}


def _cot_arm(ctx: Context, name: str) -> dict[str, Any]:
    from datasets import Dataset
    from vllm import SamplingParams

    from cagsr_reward.integrations.cot import cot_dataset_rows, cot_reward_func

    from .evaluation import evaluate_cot
    from .trainers import CaptureGRPOTrainer

    arm = COT_ARMS[name]
    train, held, selector = ctx.cot()
    steps = ctx.s["cot_steps"]
    need = max(1, steps * ctx.s["batch_size"] // ctx.s["num_generations"])
    rng = np.random.default_rng(ctx.seed)
    chosen = [train[int(i)] for i in rng.choice(len(train), size=need, replace=False)]
    config = CAGSRConfig(mode="cot", **arm["config"])
    reward = cot_reward_func(config, tokenizer=ctx.tokenizer(), selector=selector)
    run_dir = ctx.out / "work" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    args = _grpo_config(ctx, run_dir, steps=steps, max_new_tokens=ctx.s["cot_max_new_tokens"], top_p=1.0)
    trainer = CaptureGRPOTrainer(model=ctx.model, reward_funcs=[reward], args=args,
                                 train_dataset=Dataset.from_dict(cot_dataset_rows(chosen)),
                                 vllm_engine_kwargs={"dtype": "float32", "seed": ctx.seed},
                                 block_advantages=arm["block_advantages"])
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    trainer.vllm_generation.sync_weights()
    sp = SamplingParams(temperature=0.0, max_tokens=ctx.s["cot_eval_max_new_tokens"])
    result = evaluate_cot(trainer.attncap_llm.wrapped_llm, held, CAGSRConfig(mode="cot"), selector=selector,
                          sampling_params=sp)
    result["summary_ci"] = _cot_summary(result, ctx.seed)
    return {"train_config": config.to_dict(), "block_advantages": arm["block_advantages"], "steps": steps,
            "top_p": 1.0, "bf16_autocast": bool(args.bf16), "train_seconds": train_s, "seconds_per_step": train_s / max(1, steps),
            "history": _train_history(trainer.state.log_history, [reward.__name__]), "eval": result}


def unit_ppo_full(ctx: Context) -> dict[str, Any]:
    from cagsr_reward.integrations.ppo import PPOConfig
    from cagsr_reward.integrations.user_sim import UserSimulator

    from .ppo import TurnPPOTrainer

    train, _, _, selector = ctx.dialogue()
    s = ctx.s
    cfg = PPOConfig(episodes_per_update=s["ppo_batch"], minibatch_size=s["ppo_minibatch"],
                    max_new_tokens=s["max_new_tokens"], learning_rate=s["learning_rate"], device="cpu",
                    dtype="float32", max_model_len=ctx.max_model_len, seed=ctx.seed)
    trainer = TurnPPOTrainer(ctx.model, UserSimulator(list(train), seed=ctx.seed), CAGSRConfig(), selector=selector,
                             config=cfg)
    t0 = time.perf_counter()
    history = trainer.train(s["ppo_steps"])
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = _eval_replies(ctx, trainer.llm)
    return {"ppo_config": vars(cfg), "steps": s["ppo_steps"], "train_seconds": train_s, "history": history,
            "eval": result, "eval_seconds": time.perf_counter() - t0}


def run_unit(name: str, ctx: Context) -> dict[str, Any]:
    """Run one unit and write ``<out>/<name>.json`` (with its wall time); returns the result."""
    if name not in UNITS:
        raise ValueError(f"unit: unknown unit {name!r}; choose from {', '.join(UNITS)}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    t0 = time.perf_counter()
    if name in DIALOGUE_ARMS:
        result = _dialogue_arm(ctx, name)
    elif name in COT_ARMS:
        result = _cot_arm(ctx, name)
    else:
        result = globals()[f"unit_{name}"](ctx)
    result.update(unit=name, size=ctx.size, seed=ctx.seed, model=ctx.model, wall_seconds=time.perf_counter() - t0,
                  machine={"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                           "python": platform.python_version()},
                  finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_json(ctx.out / f"{name}.json", result)
    return result


def _free_memory(environ: Mapping[str, str]) -> None:
    """Between in-process units: restore the environment (TRL's colocate mode sets the torch.distributed variables),
    reset accelerate's process state and free the engines."""
    import gc

    os.environ.clear()
    os.environ.update(environ)
    try:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    except Exception:  # noqa: BLE001 - best effort
        pass
    gc.collect()
    try:
        from vllm.distributed import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
    except Exception:  # noqa: BLE001 - best effort between in-process units
        pass


def run_grid(
    out: Path, *, model: str, size: str = "full", seed: int = 0, units: Sequence[str] = UNITS,
    budget_min: float | None = None, in_process: bool = False, unit_timeout_s: float = 1200,
) -> dict[str, str]:
    """Run the not-yet-done ``units`` in order within ``budget_min`` minutes; returns ``{unit: status}``
    (``done``, ``skipped (done before)``, ``not run (budget)``, ``failed: ...``)."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    status: dict[str, str] = {}
    ctx = Context(model, size, seed, out) if in_process else None
    scale = 1.0 if size == "full" else 0.15
    for name in units:
        path = out / f"{name}.json"
        if path.exists():
            status[name] = "skipped (done before)"
            continue
        elapsed = time.perf_counter() - start
        estimate = ESTIMATE_S.get(name, 300) * scale
        if budget_min is not None and elapsed + estimate > budget_min * 60:
            status[name] = "not run (budget)"
            print(f"[experiments] {name}: not started, {elapsed:.0f} s used + ~{estimate:.0f} s > budget", flush=True)
            continue
        print(f"[experiments] {name}: running ({size})", flush=True)
        t0 = time.perf_counter()
        try:
            if in_process:
                environ = dict(os.environ)
                try:
                    run_unit(name, ctx)
                finally:
                    _free_memory(environ)
            else:
                cmd = [sys.executable, "-m", "vllm_attncap.rl.experiments", "--unit", name, "--out", str(out),
                       "--model", model, "--seed", str(seed)] + (["--quick"] if size == "quick" else [])
                subprocess.run(cmd, check=True, timeout=unit_timeout_s)
            status[name] = "done"
        except Exception as exc:  # noqa: BLE001 - one failed unit must not stop the grid
            import traceback

            traceback.print_exc()
            status[name] = f"failed: {type(exc).__name__}: {exc}"
        print(f"[experiments] {name}: {status[name]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return status


# ----------------------------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------------------------
def _load(out: Path, name: str, seed: int = 0) -> dict[str, Any] | None:
    """A unit's result; dialogue summaries are recomputed from the stored rows (so the statistics follow the code)."""
    path = out / f"{name}.json"
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    ev = r.get("eval")
    if isinstance(ev, dict) and ev.get("rows") and "reply" in ev["rows"][0]:
        from .evaluation import REPLY_METRICS, summarize_rows

        corpus = ev["summary"].get("corpus_bleu")
        ev["summary"] = summarize_rows(ev["rows"], REPLY_METRICS, group="episode_id", text_key="reply", seed=seed)
        ev["summary"]["corpus_bleu"] = corpus
    return r


def _fmt(x: Any, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def _ci(d: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not d:
        return "–"
    return f"{_fmt(d['mean'], digits)} [{_fmt(d['low'], digits)}, {_fmt(d['high'], digits)}]"


def _paired_delta(rows_a: Sequence[Mapping], rows_b: Sequence[Mapping], key: str, group: str, seed: int):
    """Mean over groups of (arm − untrained) per-group means, with a bootstrap interval (matched groups)."""
    def means(rows):
        by: dict[str, list[float]] = {}
        for r in rows:
            if r.get(key) is not None and np.isfinite(r[key]):
                by.setdefault(r[group], []).append(float(r[key]))
        return {g: float(np.mean(v)) for g, v in by.items()}

    a, b = means(rows_a), means(rows_b)
    common = sorted(set(a) & set(b))
    return bootstrap_ci(np.array([a[g] - b[g] for g in common]), seed=seed)


DIALOGUE_REPORT = ("dialogue_untrained", "dialogue_full", "dialogue_single", "dialogue_ngram",
                   "dialogue_no_history_coverage", "dialogue_no_entropy_floor", "ppo_full")
HELDOUT_KEYS = ("bleu", "ngram_overlap", "embed_sim", "consistency", "reward", "coverage", "reply_words", "distinct_2")
COT_REPORT = ("cot_untrained", "cot_block", "cot_completion", "cot_uniform_weights")


def write_report(out: Path, seed: int = 0) -> dict[str, Any]:
    """``report.md`` + ``report.json`` + plots from whatever unit results exist under ``out``."""
    lines: list[str] = ["# Experiment report", "", f"Results under `{out}`; 95% bootstrap intervals in brackets.", ""]
    report: dict[str, Any] = {}

    base = _load(out, "dialogue_untrained")
    arms = {n: _load(out, n) for n in DIALOGUE_REPORT}
    arms = {n: r for n, r in arms.items() if r is not None and "eval" in r}
    if arms:
        lines += ["## Dialogue: held-out replies (means over dialogues)", "",
                  "| arm | steps | train s | " + " | ".join(HELDOUT_KEYS) + " | corpus BLEU | corpus distinct-2 |",
                  "|---|---|---|" + "---|" * len(HELDOUT_KEYS) + "---|---|"]
        for n, r in arms.items():
            s = r["eval"]["summary"]
            lines.append(f"| {n} | {r.get('steps', 0)} | {_fmt(r.get('train_seconds'), 0)} | "
                         + " | ".join(_ci(s.get(k)) for k in HELDOUT_KEYS) + f" | {_fmt(s.get('corpus_bleu'), 2)} | "
                         f"{_fmt(s.get('corpus_distinct_2'))} |")
        lines.append("")
        if base is not None:
            lines += ["Paired difference arm − untrained (same held-out replies; mean over dialogues):", "",
                      "| arm | " + " | ".join(HELDOUT_KEYS[:-1]) + " |", "|---|" + "---|" * (len(HELDOUT_KEYS) - 1)]
            deltas = {}
            for n, r in arms.items():
                if n == "dialogue_untrained":
                    continue
                cells, deltas[n] = [], {}
                for k in HELDOUT_KEYS[:-1]:
                    est, lo, hi = _paired_delta(r["eval"]["rows"], base["eval"]["rows"], k, "episode_id", seed)
                    deltas[n][k] = (est, lo, hi)
                    cells.append(f"{_fmt(est)} [{_fmt(lo)}, {_fmt(hi)}]")
                lines.append(f"| {n} | " + " | ".join(cells) + " |")
            report["dialogue_deltas"] = deltas
            lines.append("")
        report["dialogue"] = {n: r["eval"]["summary"] for n, r in arms.items()}

    is_rows = []
    for n in ("is_ratio_bf16_top_p095", "is_ratio_bf16_top_p1", "is_ratio_fp32_top_p095", "is_ratio_fp32_top_p1",
              "dialogue_full", "dialogue_single", "dialogue_ngram", "dialogue_no_history_coverage",
              "dialogue_no_entropy_floor", "cot_block", "cot_completion", "cot_uniform_weights"):
        r = _load(out, n)
        if r is None or not r.get("history"):
            continue
        ratios = [h["is_ratio_mean"] for h in r["history"] if h.get("is_ratio_mean") is not None]
        diffs = [h["logp_diff_mean"] for h in r["history"] if h.get("logp_diff_mean") is not None]
        bf16 = r.get("bf16_autocast")  # None: a unit that did not record it
        is_rows.append((n, r.get("top_p", 1.0), bf16, len(ratios), ratios, diffs, r.get("seconds_per_step")))
    if is_rows:
        lines += ["## TRL's vLLM importance-sampling ratio (sequence level, per training step)", "",
                  "| run | top_p | trainer precision | steps | IS ratio mean (per-step values) | "
                  "mean abs log-prob diff per token | s/step |",
                  "|---|---|---|---|---|---|---|"]
        for n, tp, bf16, k, ratios, diffs, sps in is_rows:
            prec = "not recorded" if bf16 is None else ("bf16 autocast" if bf16 else "float32")
            lines.append(f"| {n} | {tp} | {prec} | {k} | {_fmt(np.mean(ratios) if ratios else None)} "
                         f"({', '.join(_fmt(x, 2) for x in ratios)}) | {_fmt(np.mean(diffs) if diffs else None, 4)} | "
                         f"{_fmt(sps, 1)} |")
        lines.append("")
        report["is_ratio"] = {n: {"top_p": tp, "bf16_autocast": b, "ratios": ratios, "logp_diff": diffs}
                              for n, tp, b, _, ratios, diffs, _ in is_rows}

    cots = {n: _load(out, n) for n in COT_REPORT}
    cots = {n: r for n, r in cots.items() if r is not None}
    if cots:
        keys = ("correct", "answered", "rouge_l", "token_f1", "reward")
        lines += ["## CoT on CHAMP: held-out problems (greedy)", "",
                  "| arm | advantages | steps | train s | accuracy | answered | ROUGE-L | token F1 | CoT reward |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for n, r in cots.items():
            s = r["eval"]["summary_ci"]
            adv = "–" if "block_advantages" not in r else ("per block" if r["block_advantages"] else "per completion")
            lines.append(f"| {n} | {adv} | {r.get('steps', 0)} | {_fmt(r.get('train_seconds'), 0)} | "
                         + " | ".join(_ci(s.get(k)) for k in keys) + " |")
        cbase = cots.get("cot_untrained")
        if cbase is not None:
            lines += ["", "Paired difference arm − untrained (same problems):", "",
                      "| arm | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
            for n, r in cots.items():
                if n == "cot_untrained":
                    continue
                rows_a = [dict(x, correct=float(x["correct"]), answered=float(x["predicted"] is not None))
                          for x in r["eval"]["problems"]]
                rows_b = [dict(x, correct=float(x["correct"]), answered=float(x["predicted"] is not None))
                          for x in cbase["eval"]["problems"]]
                cells = []
                for k in keys:
                    est, lo, hi = _paired_delta(rows_a, rows_b, k, "problem_id", seed)
                    cells.append(f"{_fmt(est)} [{_fmt(lo)}, {_fmt(hi)}]")
                lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
        report["cot"] = {n: r["eval"]["summary_ci"] for n, r in cots.items()}

    walls = {n: _load(out, n) for n in UNITS}
    lines += ["## Units and wall times", "", "| unit | status | wall s |", "|---|---|---|"]
    for n, r in walls.items():
        lines.append(f"| {n} | {'done' if r else 'not run'} | {_fmt(r['wall_seconds'], 0) if r else '–'} |")
    lines.append("")
    (out / "report.md").write_text("\n".join(lines))
    write_json(out / "report.json", report)
    _plots(out)
    return report


def _plots(out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the viz extra
        return
    curves = {}
    for n in ("dialogue_full", "dialogue_single", "dialogue_ngram", "dialogue_no_history_coverage",
              "dialogue_no_entropy_floor", "is_ratio_bf16_top_p095"):
        r = _load(out, n)
        if r and r.get("history"):
            ys = [h.get("cagsr_full/reward") for h in r["history"]]
            if any(y is not None for y in ys):
                curves[n] = ([h["step"] for h in r["history"]], ys)
    if curves:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for n, (x, y) in curves.items():
            ax.plot(x, [np.nan if v is None else v for v in y], marker="o", ms=3, label=n.replace("dialogue_", ""))
        ax.set_xlabel("GRPO step")
        ax.set_ylabel("full CAGSR reward (training batch mean)")
        ax.set_title("Dialogue GRPO: full reward of each training batch")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "reward_curves.png", dpi=110)
        plt.close(fig)
    arms = [(n, _load(out, n)) for n in DIALOGUE_REPORT]
    arms = [(n, r) for n, r in arms if r is not None and "eval" in r]
    if arms:
        keys = ("bleu", "embed_sim", "consistency", "reward", "reply_words", "distinct_2")
        fig, axes = plt.subplots(1, len(keys), figsize=(2.3 * len(keys), 3.4))
        for ax, k in zip(axes, keys):
            vals = [r["eval"]["summary"][k] for _, r in arms]
            means = np.array([v["mean"] for v in vals], float)
            err = np.maximum(np.array([[v["mean"] - v["low"], v["high"] - v["mean"]] for v in vals], float).T, 0)
            ax.bar(range(len(arms)), means, yerr=err, capsize=2, color=[f"C{i}" for i in range(len(arms))])
            ax.set_xticks(range(len(arms)), [n.replace("dialogue_", "").replace("no_", "no ") for n, _ in arms],
                          rotation=70, fontsize=7)
            ax.set_title(k, fontsize=9)
        fig.suptitle("Held-out replies (95% bootstrap intervals over dialogues)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "heldout_bars.png", dpi=110)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vllm_attncap.rl.experiments", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (minutes); default: the full CPU-scale grid")
    p.add_argument("--budget", type=float, default=None, help="minutes; no unit is started that would overrun it")
    p.add_argument("--out", default=None, help="output folder (default runs/experiments-cpu, quick: runs/experiments-quick)")
    p.add_argument("--model", default=None, help="model directory (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--units", default=None, help=f"comma-separated subset, in grid order (all: {','.join(UNITS)})")
    p.add_argument("--unit", default=None, help=argparse.SUPPRESS)  # one unit in this process (what the grid calls)
    p.add_argument("--in-process", action="store_true", help="run every unit in this process")
    p.add_argument("--report-only", action="store_true", help="only rebuild report.md and the plots")
    args = p.parse_args(argv)
    size = "quick" if args.quick else "full"
    out = Path(args.out or ("runs/experiments-quick" if args.quick else "runs/experiments-cpu"))
    model = args.model
    if model is None:
        from ..default_model import default_model_path

        model = str(default_model_path())
    if args.unit:
        run_unit(args.unit, Context(model, size, args.seed, out))
        return 0
    if not args.report_only:
        units = UNITS if args.units is None else [u for u in UNITS if u in set(args.units.split(","))]
        unknown = set((args.units or "").split(",")) - set(UNITS) - {""}
        if unknown:
            p.error(f"--units: unknown unit(s) {sorted(unknown)}; choose from {', '.join(UNITS)}")
        status = run_grid(out, model=model, size=size, seed=args.seed, units=units, budget_min=args.budget,
                          in_process=args.in_process)
        write_json(out / "status.json", status)
        for n, s in status.items():
            print(f"[experiments] {n}: {s}")
    write_report(out, seed=args.seed)
    print(f"[experiments] report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
