"""The training grid of docs/experiments.md: can GRPO on a reward move held-out replies, and which way?

One command runs it, resumes after an interruption (every unit writes ``<out>/<unit>.json`` and is skipped when that
file exists) and rebuilds the report from the unit JSONs::

    python -m experiments.training [--quick] [--units a,b] [--budget MIN] [--report-only]
    make experiments            # the same, full size, into experiments/results/training/

A **unit** is one arm trained with one seed (``<arm>_s<seed>``), or the untrained policy (``untrained``; greedy
evaluation of a fixed model, so one unit serves every seed). Units are dispatched through :data:`UNITS`, an explicit
registry ``{name: Unit}``. The arms (:data:`ARMS`) differ only in the training reward:

- ``length`` -- the positive control: ``-|words - 6|``, a reward any working budget must be able to move (the
  held-out reply length is its own metric);
- ``ngram`` -- a weak positive control: n-gram overlap with the recorded gold reply (it sees the answer, but one
  recorded chit-chat reply is a noisy target);
- ``default`` -- the CAGSR reward with ``CAGSRConfig()``'s defaults, whatever they are in this checkout;
- ``paper`` -- ``CAGSRConfig.paper()`` (the literal reading of the papers), resolved by name when the unit runs;
  a checkout without it reports the unit as skipped, with the reason, and writes no JSON;
- ``single`` -- single-turn CAGSR (coverage of the current user turn, self repetition, no floor, no grounding);
- ``random`` -- a seeded random reward with the mean and standard deviation of the default reward on the untrained
  policy's held-out replies (read from the ``untrained`` unit);
- ``self_certainty`` -- a non-attention internal reward (INTUITOR): the mean over reply tokens of
  KL(U || pi_theta(. | history, y_<s)), computed with the policy being trained.

The grounding term of the CAGSR reward (``eta > 0``: the ``default`` arm and the ``monitor_default`` monitor; the
``paper`` and ``single`` arms keep ``eta = 0`` through their configs) is scored by the starting policy, frozen
(:meth:`Context.scorer`: ``HFLikelihood(ctx.reference(), tokenizer)``, the KL reference), beside the attention
captured while generating: in training and in every held-out evaluation alike, so every arm is measured with one
yardstick.

Every unit evaluates the same held-out replies (fixed data seed 0, greedy) at checkpoints during training and at
the end: the metrics of :func:`vllm_attncap.rl.evaluation.evaluate_replies` (BLEU, n-gram overlap, embedding
similarity, consistency, the default reward, reply length), and the KL of the policy to the starting policy on its
own held-out replies. Each unit runs in its own Python process (``--in-process`` runs them in this one, as the CI
test does). The report (:mod:`experiments.report`) needs only the JSONs.

numpy only at import time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cagsr_reward.config import CAGSRConfig
from cagsr_reward.metrics import ngram_overlap
from vllm_attncap.rl.runs import Run, grpo_args, write_json

__all__ = ["ARMS", "SIZES", "UNITS", "Unit", "UnitSkipped", "main", "run_grid", "run_unit"]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "training"
#: the held-out items and the training prompts are drawn with this seed in every unit (arms and seeds pair on items)
DATA_SEED = 0
SOURCES = ("chitchat", "tech_support")

# ----------------------------------------------------------------------------------------------------------------
# sizes (the budget)
# ----------------------------------------------------------------------------------------------------------------
SIZES: dict[str, dict[str, Any]] = {
    "full": dict(
        heldout_chitchat=24, heldout_tech=8, turns_per_episode=2, eval_max_new_tokens=32, max_prompt_tokens=256,
        recall_items=30,
        steps=32, batch_size=32, micro_batch=8, num_generations=4, max_new_tokens=24, learning_rate=2e-5,
        temperature=0.8, checkpoints=(8, 16, 24), seeds=(0, 1, 2),
    ),
    "quick": dict(
        heldout_chitchat=2, heldout_tech=1, turns_per_episode=1, eval_max_new_tokens=8, max_prompt_tokens=256,
        recall_items=3,
        steps=2, batch_size=4, micro_batch=2, num_generations=2, max_new_tokens=8, learning_rate=1e-4, temperature=0.8,
        checkpoints=(1,), seeds=(0,),
    ),
}


class UnitSkipped(Exception):
    """A unit that cannot run in this checkout (a missing preset, a unit it needs first); no JSON is written."""


# ----------------------------------------------------------------------------------------------------------------
# shared set-up: data, held-out set, salience, models
# ----------------------------------------------------------------------------------------------------------------
class Context:
    """What every unit shares: the model, the sizes, the data splits (deterministic from :data:`DATA_SEED`)."""

    def __init__(self, model: str, size: str, out: Path):
        self.model, self.size, self.out = model, size, out
        self.s = SIZES[size]
        self._dialogue = None
        self._tokenizer = None
        self._reference = None
        self._scorer = None
        self._embedder = None
        self.max_model_len = 2048
        try:  # a small test model may have a shorter context
            cfg = json.loads((Path(model) / "config.json").read_text())
            self.max_model_len = min(2048, int(cfg.get("max_position_embeddings", 2048)))
        except (OSError, ValueError):
            pass

    def dialogue(self):
        """``(train_episodes, heldout_items, selector)``: held-out dialogues drawn per source, the rest train."""
        if self._dialogue is None:
            from cagsr_reward.idf import IDFModel
            from cagsr_reward.integrations.user_sim import UserSimulator
            from cagsr_reward.salient import SalientSelector
            from vllm_attncap.rl.evaluation import reply_items

            sim = UserSimulator.from_sources(SOURCES, seed=DATA_SEED, limit_per_source=1000, max_turn_chars=120)
            rng = np.random.default_rng(DATA_SEED)
            train, held = [], []
            for src, k in (("chitchat", self.s["heldout_chitchat"]), ("tech_support", self.s["heldout_tech"])):
                eps = [e for e in sim.episodes if e.source == src]
                perm = rng.permutation(len(eps))
                held += [eps[int(i)] for i in sorted(perm[:k])]
                train += [eps[int(i)] for i in sorted(perm[k:])]
            items = reply_items(held, turns_per_episode=self.s["turns_per_episode"], seed=DATA_SEED)
            selector = SalientSelector(IDFModel.fit([" ".join(e.user_turns) for e in train]))
            self._dialogue = (train, items, selector)
        return self._dialogue

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model)
        return self._tokenizer

    def reference(self):
        """The starting policy as a Hugging Face model (float32, eval mode): the KL reference."""
        if self._reference is None:
            import torch
            from transformers import AutoModelForCausalLM

            self._reference = AutoModelForCausalLM.from_pretrained(self.model, dtype=torch.float32).eval()
        return self._reference

    def scorer(self):
        """The grounding term's scoring model: :meth:`reference` (the starting policy, frozen) as an ``HFLikelihood``
        with a cache (the trained reward and the monitor score the same completions)."""
        if self._scorer is None:
            from cagsr_reward.sources import HFLikelihood

            self._scorer = HFLikelihood(self.reference(), self.tokenizer(), cache_size=4096)
        return self._scorer

    def embedder(self):
        if self._embedder is None:
            from cagsr_reward.integrations.embedding import SentenceEmbedder

            self._embedder = SentenceEmbedder()
        return self._embedder


def prompt_ids(tokenizer: Any, messages: Any) -> list[int]:
    """A chat prompt's ids as TRL and the CAGSR reward tokenise it (template with the generation prompt)."""
    if isinstance(messages, str):
        return list(tokenizer(messages, add_special_tokens=False)["input_ids"])
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _completion_text(c: Any) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, Sequence) and c and isinstance(c[-1], Mapping):
        return str(c[-1].get("content", ""))
    return str(c)


# ----------------------------------------------------------------------------------------------------------------
# rewards that are not CAGSR
# ----------------------------------------------------------------------------------------------------------------
def ngram_reward_func(max_n: int = 2) -> Callable[..., list[float]]:
    """The positive control as a TRL reward function: :func:`~cagsr_reward.metrics.ngram_overlap` of each
    completion with the dataset's ``gold`` column (the recorded reply)."""

    def ngram(prompts, completions, completion_ids=None, gold=None, **kwargs):
        if gold is None:
            raise ValueError("ngram reward: the dataset needs a 'gold' column (the recorded reply)")
        return [ngram_overlap(_completion_text(c), g, max_n=max_n) for c, g in zip(completions, gold)]

    ngram.__name__ = "ngram"
    return ngram


def random_reward_func(mean: float, std: float, seed: int) -> Callable[..., list[float]]:
    """A reward that ignores its input: independent draws from N(mean, std^2), seeded with
    ``zlib.crc32(f"random:{seed}")`` (the same sequence of draws for the same seed)."""
    if not np.isfinite(mean) or not np.isfinite(std) or std < 0:
        raise ValueError(f"random reward: mean and std must be finite, std >= 0; got mean={mean!r}, std={std!r}")
    rng = np.random.default_rng(zlib.crc32(f"random:{seed}".encode()))

    def random_reward(prompts, completions, **kwargs):
        return [float(x) for x in rng.normal(mean, std, size=len(completions))]

    random_reward.__name__ = "random"
    return random_reward


def self_certainty(logits: Any) -> float:
    r"""INTUITOR's self-certainty of one reply: $\frac{1}{T}\sum_s \mathrm{KL}(U \,\|\, p_s)
    = \frac{1}{T}\sum_s \left(-\log V - \frac{1}{V}\sum_v \log p_s(v)\right)$, from the ``(T, V)`` logits that
    predicted the reply's tokens. 0 for a uniform prediction, larger for a more certain one.

    Example:
        >>> import torch
        >>> round(self_certainty(torch.zeros(3, 4)), 6)   # uniform over 4 tokens at every step
        0.0
        >>> round(self_certainty(torch.tensor([[0.0, float(torch.log(torch.tensor(3.0)))]])), 4)  # p = (1/4, 3/4)
        0.1438
    """
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    vocab = logp.shape[-1]
    return float((-np.log(vocab) - logp.mean(dim=-1)).mean())


class SelfCertaintyReward:
    """A TRL reward function: :func:`self_certainty` of each completion under ``model`` (set :attr:`model` to the
    policy being trained once the trainer has built it; INTUITOR scores with the current policy)."""

    __name__ = "self_certainty"

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.model: Any = None

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float | None]:
        import torch

        if self.model is None:
            raise RuntimeError("self_certainty: set .model to the policy before training")
        if completion_ids is None:
            raise ValueError("self_certainty: needs completion_ids (TRL passes them)")
        was_training = self.model.training
        self.model.eval()
        out: list[float | None] = []
        device = next(self.model.parameters()).device
        with torch.no_grad():
            for p, ids in zip(prompts, completion_ids):
                ids = list(ids)
                if not ids:
                    out.append(None)
                    continue
                pids = prompt_ids(self.tokenizer, p)
                logits = self.model(torch.tensor([pids + ids], device=device)).logits[0]
                out.append(self_certainty(logits[len(pids) - 1 : len(pids) - 1 + len(ids)]))
        if was_training:
            self.model.train()
        return out


# ----------------------------------------------------------------------------------------------------------------
# evaluation at a checkpoint
# ----------------------------------------------------------------------------------------------------------------
#: per held-out reply, what a unit JSON keeps (the report's statistics are recomputed from these)
ROW_KEYS = ("item_id", "episode_id", "source", "reply", "bleu", "ngram_overlap", "embed_sim", "consistency", "reward",
            "coverage", "grounding", "reply_words", "reply_tokens")


def reply_kl(policy: Any, reference: Any, tokenizer: Any, messages: Any, reply: str) -> float | None:
    """Mean over the reply's token positions of the full-vocabulary KL(pi_policy || pi_reference), teacher-forced on
    the reply (re-tokenised) after the chat prompt; None for an empty reply."""
    import torch

    ids = list(tokenizer(reply, add_special_tokens=False)["input_ids"])
    if not ids:
        return None
    pids = prompt_ids(tokenizer, messages)
    x = torch.tensor([pids + ids])
    sl = slice(len(pids) - 1, len(pids) - 1 + len(ids))
    def reply_logprobs(model: Any) -> Any:
        # the backbone over the whole sequence, the (large-vocabulary) head only where a reply token is predicted
        backbone = getattr(model, model.base_model_prefix)
        hidden = backbone(input_ids=x.to(next(model.parameters()).device)).last_hidden_state[0, sl]
        return torch.log_softmax(model.get_output_embeddings()(hidden).float().cpu(), -1)

    with torch.no_grad():
        lp, lq = reply_logprobs(policy), reply_logprobs(reference)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def evaluate_checkpoint(ctx: Context, llm: Any, step: int, policy: Any = None) -> dict[str, Any]:
    """The held-out replies of the policy served by ``llm`` (greedy) with their metrics, and (when ``policy``, the
    Hugging Face model being trained, is given) the KL to the starting policy; ``policy=None`` is the start (KL 0)."""
    from vllm import SamplingParams

    from vllm_attncap.rl.evaluation import evaluate_replies
    from vllm_attncap.rl.trainers import capture_spec_for
    from cagsr_reward.integrations.trl import cagsr_reward_func

    _, items, selector = ctx.dialogue()
    config = CAGSRConfig()
    spec = capture_spec_for([cagsr_reward_func(config, tokenizer=ctx.tokenizer(), selector=selector)])
    t0 = time.perf_counter()
    sp = SamplingParams(temperature=0.0, max_tokens=ctx.s["eval_max_new_tokens"])
    result = evaluate_replies(llm, items, config, selector=selector, sampling_params=sp, spec=spec,
                              embedder=ctx.embedder(), seed=DATA_SEED, likelihood=ctx.scorer())
    rows = [{k: r.get(k) for k in ROW_KEYS} for r in result["rows"]]
    by_id = {it.item_id: it for it in items}
    if policy is None:
        for r in rows:
            r["kl_to_start"] = 0.0
    else:
        was_training = policy.training
        policy.eval()
        for r in rows:
            r["kl_to_start"] = reply_kl(policy, ctx.reference(), ctx.tokenizer(), by_id[r["item_id"]].messages,
                                        r["reply"])
        if was_training:
            policy.train()
    return {"step": step, "rows": rows, "corpus_bleu": result["summary"]["corpus_bleu"], "reward_config": result["config"],
            "recall": recall_task_result(ctx, llm), "seconds": time.perf_counter() - t0}


#: the hypothesis task's episodes of the training grid's evaluation are drawn with this seed (the validity protocol
#: draws its own with seed 0)
RECALL_SEED = 1


def recall_task_result(ctx: Context, llm: Any) -> dict[str, Any]:
    """Exact-match recall on the hypothesis task (``cagsr_reward.integrations.recall_task``: the last user turn asks
    for a fact stated in the first), greedy replies of the policy served by ``llm``; one row per episode."""
    from vllm import SamplingParams

    from cagsr_reward.integrations.recall_task import recall_correct, recall_episodes

    episodes = recall_episodes(ctx.s["recall_items"], seed=RECALL_SEED)
    tok = ctx.tokenizer()
    sp = SamplingParams(temperature=0.0, max_tokens=ctx.s["eval_max_new_tokens"])
    outs = llm.generate([{"prompt_token_ids": prompt_ids(tok, ep.messages)} for ep in episodes], sp, use_tqdm=False)
    rows = [{"episode_id": ep.episode_id, "kind": ep.kind, "fact": ep.fact, "reply": o.outputs[0].text,
             "correct": float(recall_correct(o.outputs[0].text, ep.fact))} for ep, o in zip(episodes, outs)]
    return {"n": len(rows), "rate": float(np.mean([r["correct"] for r in rows])) if rows else float("nan"),
            "rows": rows}


# ----------------------------------------------------------------------------------------------------------------
# arms and units
# ----------------------------------------------------------------------------------------------------------------
def paper_config() -> CAGSRConfig:
    """``CAGSRConfig.paper()``, resolved by name (a checkout without the preset skips the arm)."""
    preset = getattr(CAGSRConfig, "paper", None)
    if preset is None:
        raise UnitSkipped("CAGSRConfig.paper() is not in this checkout")
    return preset()


def _cagsr(config: Callable[[], CAGSRConfig], name: str):
    def build(ctx: Context, seed: int):
        from cagsr_reward.integrations.trl import cagsr_reward_func

        cfg = config()
        likelihood = ctx.scorer() if cfg.eta > 0 else None  # eta = 0 (paper, single): no log-probabilities needed
        reward = cagsr_reward_func(cfg, tokenizer=ctx.tokenizer(), selector=ctx.dialogue()[2], name=name,
                                   likelihood=likelihood)
        return reward, cfg.to_dict()

    return build


def _ngram(ctx: Context, seed: int):
    return ngram_reward_func(), {"max_n": 2}


#: the length control's target: replies of about this many words (the untrained policy's held-out replies have ~17)
TARGET_WORDS = 6


def length_reward_func(target: int = TARGET_WORDS) -> Callable[..., list[float]]:
    """The positive control as a TRL reward function: ``-|words - target|`` of each completion (whitespace words).
    A reward with a strong, easily learnt signal: if a budget cannot move the held-out reply length with it, no arm
    can show anything in that budget.

    Example:
        >>> length_reward_func(3)(prompts=None, completions=["a b c", "a b c d e f"])
        [0, -3]
    """
    def length(prompts, completions, **kwargs):
        return [-abs(len(_completion_text(c).split()) - target) for c in completions]

    length.__name__ = "length"
    return length


def _length(ctx: Context, seed: int):
    return length_reward_func(), {"kind": "length", "target_words": TARGET_WORDS}


def default_reward_scale(ctx: Context) -> tuple[float, float]:
    """Mean and standard deviation of the default reward on the untrained policy's held-out replies."""
    path = ctx.out / "untrained.json"
    if not path.exists():
        raise UnitSkipped("the random arm takes its scale from the 'untrained' unit, which has not run")
    checkpoint = json.loads(path.read_text())["checkpoints"][-1]
    if checkpoint.get("reward_config") != json.loads(json.dumps(CAGSRConfig().to_dict())):
        raise UnitSkipped("the 'untrained' unit scored its replies with another reward config than CAGSRConfig()'s "
                          "defaults; delete untrained.json and rerun it first")
    rows = checkpoint["rows"]
    vals = np.array([r["reward"] for r in rows if r.get("reward") is not None], np.float64)
    return float(vals.mean()), float(vals.std())


def _random(ctx: Context, seed: int):
    mean, std = default_reward_scale(ctx)
    return random_reward_func(mean, std, seed), {"mean": mean, "std": std, "seed_key": f"random:{seed}"}


def _self_certainty(ctx: Context, seed: int):
    return SelfCertaintyReward(ctx.tokenizer()), {"formula": "mean_s KL(U || pi_theta(.|H, y_<s))"}


@dataclasses.dataclass(frozen=True)
class Arm:
    """One training reward: ``build(ctx, seed) -> (reward function, description for the JSON)``."""

    name: str
    what: str
    build: Callable[[Context, int], tuple[Any, dict[str, Any]]]


ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("length", f"positive control: -|words - {TARGET_WORDS}| (trivially learnable)", _length),
        Arm("ngram", "weak positive control: n-gram overlap with the gold reply", _ngram),
        Arm("default", "CAGSR, CAGSRConfig() defaults", _cagsr(CAGSRConfig, "cagsr")),
        Arm("paper", "CAGSR, CAGSRConfig.paper() preset", _cagsr(paper_config, "cagsr")),
        Arm("single", "single-turn CAGSR", _cagsr(  # the papers' single-turn reward: attention only (eta = 0)
            lambda: CAGSRConfig.attention_only(mode="single", history_coverage=False, entropy_floor=False), "cagsr")),
        Arm("random", "random, matched to the default reward's mean and std", _random),
        Arm("self_certainty", "self-certainty (INTUITOR), no attention", _self_certainty),
    )
}


def _dialogue_prompts(ctx: Context, steps: int) -> dict[str, list]:
    """The training prompts of every arm (the same for all arms and seeds): recorded histories cut at a random user
    turn that has a recorded reply, at most ``max_prompt_tokens`` long; with the recorded reply as ``gold``."""
    from cagsr_reward.integrations.user_sim import UserSimulator

    train, _, _ = ctx.dialogue()
    tok = ctx.tokenizer()
    rng = np.random.default_rng(DATA_SEED)
    need = max(1, steps * ctx.s["batch_size"] // ctx.s["num_generations"])
    prompts, gold = [], []
    for i in rng.permutation(len(train)):
        ep = train[int(i)]
        turns = min(ep.num_turns, len(ep.reference_replies))
        if turns == 0:
            continue
        t = int(rng.integers(turns))
        msgs = UserSimulator.reference_prefix(ep, t)
        if len(prompt_ids(tok, msgs)) <= ctx.s["max_prompt_tokens"]:
            prompts.append(msgs)
            gold.append(ep.reference_replies[t])
        if len(prompts) == need:
            break
    return {"prompt": prompts, "gold": gold}


def _history(log_history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per logged training step: the training reward, each reward function's mean, reply length, the IS ratio."""
    rows = []
    for h in log_history:
        if "reward" not in h:
            continue
        row = {"step": h.get("step"), "loss": h.get("loss"), "reward": h.get("reward"), "reward_std": h.get("reward_std"),
               "completion_length": h.get("completions/mean_length"),
               "is_ratio_mean": h.get("sampling/importance_sampling_ratio/mean")}
        row.update({k[len("rewards/"):-len("/mean")]: v for k, v in h.items()
                    if k.startswith("rewards/") and k.endswith("/mean")})
        rows.append(row)
    return rows


def train_arm(ctx: Context, arm: Arm, seed: int) -> dict[str, Any]:
    """GRPO on ``arm``'s reward with ``seed``; the held-out set evaluated at the size's checkpoints and at the end.
    Every arm also logs the default CAGSR reward and the n-gram overlap of its training batches (weight 0)."""
    from datasets import Dataset
    from transformers import TrainerCallback

    from cagsr_reward.integrations.trl import cagsr_reward_func
    from vllm_attncap.rl.trainers import CaptureGRPOTrainer

    s = ctx.s
    reward, described = arm.build(ctx, seed)
    monitors = [cagsr_reward_func(CAGSRConfig(), tokenizer=ctx.tokenizer(), selector=ctx.dialogue()[2],
                                  name="monitor_default", likelihood=ctx.scorer())]
    if arm.name != "ngram":
        monitors.append(ngram_reward_func())
        monitors[-1].__name__ = "monitor_ngram"
    funcs, weights = [reward, *monitors], [1.0] + [0.0] * len(monitors)
    run_dir = ROOT / "runs" / "training-work" / ctx.size / f"{arm.name}_s{seed}"  # TRL's output (ignored by git)
    run_dir.mkdir(parents=True, exist_ok=True)
    flags = argparse.Namespace(
        steps=s["steps"], batch_size=s["batch_size"], num_generations=s["num_generations"],
        max_new_tokens=s["max_new_tokens"], learning_rate=s["learning_rate"], temperature=s["temperature"],
        top_p=1.0, max_model_len=ctx.max_model_len, device="cpu", dtype="float32", seed=seed,
    )
    # one optimizer step = batch_size completions generated together, its loss and gradients taken micro_batch at a
    # time (gradient accumulation: the same update, a quarter of the activation memory at 32 / 8)
    args = grpo_args(Run(f"{arm.name}_s{seed}", run_dir, ctx.model, flags, time.perf_counter()),
                     reward_weights=weights, per_device_train_batch_size=s["micro_batch"],
                     gradient_accumulation_steps=s["batch_size"] // s["micro_batch"])
    data = _dialogue_prompts(ctx, s["steps"])
    trainer = CaptureGRPOTrainer(model=ctx.model, reward_funcs=funcs, args=args, train_dataset=Dataset.from_dict(data),
                                 vllm_engine_kwargs={"dtype": "float32", "seed": seed})
    policy = trainer.accelerator.unwrap_model(trainer.model)
    if isinstance(reward, SelfCertaintyReward):
        reward.model = policy
    checkpoints: list[dict[str, Any]] = []
    eval_seconds = [0.0]

    def evaluate(step: int) -> None:
        trainer.vllm_generation.sync_weights()
        # the policy at this checkpoint (under runs/, ignored by git; ~0.5 GB at full size): a later change of the
        # default reward can re-score the held-out replies of this unit without training it again (rescore_unit)
        policy.save_pretrained(policy_dir(ctx, f"{arm.name}_s{seed}", step), safe_serialization=True)
        checkpoints.append(evaluate_checkpoint(ctx, trainer.attncap_llm.wrapped_llm, step, policy))
        eval_seconds[0] += checkpoints[-1]["seconds"]

    class Checkpoints(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step in s["checkpoints"] and state.global_step < s["steps"]:
                evaluate(state.global_step)

    trainer.add_callback(Checkpoints())
    t0 = time.perf_counter()
    trainer.train()
    evaluate(s["steps"])
    train_s = time.perf_counter() - t0 - eval_seconds[0]
    return {"arm": arm.name, "reward": described, "steps": s["steps"], "num_train_prompts": len(data["prompt"]),
            "train_seconds": train_s, "seconds_per_step": train_s / max(1, s["steps"]),
            "history": _history(trainer.state.log_history), "checkpoints": checkpoints}


def policy_dir(ctx: Context, unit: str, step: int) -> Path:
    """Where a trained unit keeps its policy at a checkpoint (under ``runs/``, ignored by git)."""
    return ROOT / "runs" / "training-work" / ctx.size / unit / f"policy-step{step}"


def rescore_unit(name: str, ctx: Context) -> dict[str, Any]:
    """Evaluate a trained unit's checkpoints again from its saved policies (:func:`policy_dir`), with this
    checkout's default reward: for a unit trained before the default changed. Greedy decoding of the same weights
    gives the same replies, and ``replies_as_trained`` (the share of held-out replies equal to the stored ones) says
    whether it did. The training history (its ``monitor_default``) stays as it was logged. Rewrites
    ``<out>/<name>.json`` with a ``rescored`` record."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_attncap.rl.engine_weights import capture_llm, sync_engine_weights

    path = ctx.out / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no result to re-score")
    result = json.loads(path.read_text())
    if result.get("arm") == "untrained":
        raise ValueError("rescore: the untrained unit has no saved policy; run it again (--units untrained)")
    dirs = {cp["step"]: policy_dir(ctx, name, cp["step"]) for cp in result["checkpoints"]}
    missing = [str(d) for d in dirs.values() if not d.exists()]
    if missing:
        raise FileNotFoundError(f"rescore {name}: no saved policy at {', '.join(missing)}; train the unit again")
    llm = capture_llm(ctx.model, dtype="float32", max_model_len=ctx.max_model_len, seed=DATA_SEED)
    t0 = time.perf_counter()
    checkpoints = []
    for old in result["checkpoints"]:
        policy = AutoModelForCausalLM.from_pretrained(dirs[old["step"]], dtype=torch.float32).eval()
        sync_engine_weights(llm, policy.named_parameters())
        new = evaluate_checkpoint(ctx, llm, old["step"], policy)
        same = [a["reply"] == b["reply"] for a, b in zip(old["rows"], new["rows"])]
        new["replies_as_trained"] = float(np.mean(same)) if same else float("nan")
        checkpoints.append(new)
    result["checkpoints"] = checkpoints
    result["rescored"] = {"commit": _commit(), "seconds": time.perf_counter() - t0,
                          "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                          "note": "checkpoints evaluated again from the saved policies; training history as logged"}
    tmp = ctx.out / f".{name}.json.tmp"
    write_json(tmp, result)
    os.replace(tmp, path)
    return result


def evaluate_untrained(ctx: Context, seed: int) -> dict[str, Any]:
    from vllm_attncap.rl.engine_weights import capture_llm

    llm = capture_llm(ctx.model, dtype="float32", max_model_len=ctx.max_model_len, seed=DATA_SEED)
    return {"arm": "untrained", "steps": 0, "checkpoints": [evaluate_checkpoint(ctx, llm, 0, None)]}


@dataclasses.dataclass(frozen=True)
class Unit:
    """One resumable piece of the grid: ``run(ctx)`` returns the JSON-able result."""

    name: str
    arm: str
    seed: int
    run: Callable[[Context], dict[str, Any]]


#: the order of the arms within a round of seeds (the brief's priorities: the default reward against its controls)
ARM_ORDER = ("default", "random", "self_certainty", "single", "paper")


def _units(seeds: Sequence[int]) -> dict[str, Unit]:
    """The untrained policy, then the positive control (the length reward, one seed: its effect is many times its
    interval) and the weak positive control (n-gram overlap, seed 0), then the other arms one round of seeds at a
    time, then the weak control's other seeds."""
    def unit(arm: Arm, seed: int) -> Unit:
        return Unit(f"{arm.name}_s{seed}", arm.name, seed, lambda ctx: train_arm(ctx, arm, seed))

    units = {"untrained": Unit("untrained", "untrained", DATA_SEED, lambda ctx: evaluate_untrained(ctx, DATA_SEED))}
    units.update((u.name, u) for u in (unit(ARMS["length"], seeds[0]), unit(ARMS["ngram"], seeds[0])))
    units.update((u.name, u) for s in seeds for u in (unit(ARMS[a], s) for a in ARM_ORDER))
    units.update((u.name, u) for u in (unit(ARMS["ngram"], s) for s in seeds[1:]))
    return units


#: every unit of the full grid, in the order the grid runs them
UNITS: dict[str, Unit] = _units(SIZES["full"]["seeds"])
#: the quick grid (CI): the untrained policy and one seed of the positive control
QUICK_UNITS = ("untrained", "length_s0")


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_unit(name: str, ctx: Context) -> dict[str, Any]:
    """Run one unit and write ``<out>/<name>.json`` (with its wall time and budget); returns the result."""
    unit = UNITS.get(name)
    if unit is None:
        raise ValueError(f"unit: unknown unit {name!r}; choose from {', '.join(UNITS)}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    t0 = time.perf_counter()
    result = unit.run(ctx)
    result.update(unit=name, seed=unit.seed, size=ctx.size, model=Path(ctx.model).name,
                  budget={k: (list(v) if isinstance(v, tuple) else v) for k, v in ctx.s.items()},
                  wall_seconds=time.perf_counter() - t0, commit=_commit(),
                  machine={"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                           "python": platform.python_version()},
                  finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    ctx.out.mkdir(parents=True, exist_ok=True)
    tmp = ctx.out / f".{name}.json.tmp"  # written whole, then renamed: a killed unit leaves no JSON that looks done
    write_json(tmp, result)
    os.replace(tmp, ctx.out / f"{name}.json")
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


def run_grid(out: Path, *, model: str, size: str = "full", units: Sequence[str] | None = None,
             budget_min: float | None = None, in_process: bool = False, unit_timeout_s: float | None = None) -> dict[str, str]:
    """Run the not-yet-done ``units`` in order; returns ``{unit: status}`` (``done``, ``skipped (done before)``,
    ``skipped: <reason>``, ``not run (budget)``, ``failed: ...``). With ``budget_min`` no unit starts after that many
    minutes; ``unit_timeout_s`` (default none) stops a unit's process after that many seconds. On the shared 2-core
    machine a full-size unit took more than an hour (3-4 minutes per GRPO step, ~20 minutes per checkpoint evaluation
    at a load average of 15-29), so a timeout that looked generous killed one."""
    out.mkdir(parents=True, exist_ok=True)
    units = list(units if units is not None else (QUICK_UNITS if size == "quick" else UNITS))
    start = time.perf_counter()
    status: dict[str, str] = {}
    ctx = Context(model, size, out) if in_process else None
    for name in units:
        if (out / f"{name}.json").exists():
            status[name] = "skipped (done before)"
            continue
        if budget_min is not None and time.perf_counter() - start > budget_min * 60:
            status[name] = "not run (budget)"
            continue
        print(f"[training] {name}: running ({size})", flush=True)
        t0 = time.perf_counter()
        try:
            if in_process:
                environ = dict(os.environ)
                try:
                    run_unit(name, ctx)
                finally:
                    _free_memory(environ)
            else:
                cmd = [sys.executable, "-m", "experiments.training", "--unit", name, "--out", str(out), "--model", model]
                cmd += ["--quick"] if size == "quick" else []
                env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                                                  if p))
                proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=unit_timeout_s)
                if proc.returncode == SKIP_EXIT:
                    raise UnitSkipped(_skip_note(name).read_text())
                if proc.returncode != 0:
                    raise RuntimeError(f"exit status {proc.returncode}")
            status[name] = "done"
        except UnitSkipped as exc:
            status[name] = f"skipped: {exc}"
        except Exception as exc:  # noqa: BLE001 - one failed unit must not stop the grid
            import traceback

            traceback.print_exc()
            status[name] = f"failed: {type(exc).__name__}: {exc}"
        print(f"[training] {name}: {status[name]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return status


#: the exit status of a unit's process that skipped (its reason in :func:`_skip_note`)
SKIP_EXIT = 3


def _skip_note(unit: str) -> Path:
    return ROOT / "runs" / "training-work" / f"{unit}.skipped"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.training", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (the CI form); default: the CPU-scale grid")
    p.add_argument("--out", default=None,
                   help=f"unit JSON folder (default {RESULTS.relative_to(ROOT)}; quick: runs/training-quick)")
    p.add_argument("--model", default=None, help="model directory (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--units", default=None, help="comma-separated subset, in grid order (default: all)")
    p.add_argument("--budget", type=float, default=None, help="minutes; no unit starts after that")
    p.add_argument("--unit-timeout", type=float, default=None, help="seconds; stop a unit's process after that")
    p.add_argument("--unit", default=None, help=argparse.SUPPRESS)  # one unit in this process (what the grid calls)
    p.add_argument("--in-process", action="store_true", help="run every unit in this process")
    p.add_argument("--report-only", action="store_true", help="only rebuild docs/experiments.md's training section")
    p.add_argument("--rescore", default=None,
                   help="comma-separated trained units: evaluate their checkpoints again from the saved policies with "
                        "this checkout's default reward (after the default changed)")
    p.add_argument("--doc", default=str(ROOT / "docs" / "experiments.md"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    size = "quick" if args.quick else "full"
    out = Path(args.out) if args.out else (ROOT / "runs" / "training-quick" if args.quick else RESULTS)
    if not args.report_only:
        model = args.model
        if model is None:
            from vllm_attncap.default_model import default_model_path

            model = str(default_model_path())
        if args.rescore:
            for name in (u for u in args.rescore.split(",") if u):
                if name not in UNITS:
                    p.error(f"--rescore: unknown unit {name!r}; choose from {', '.join(UNITS)}")
                rescore_unit(name, Context(model, size, out))
                print(f"[training] {name}: re-scored")
        elif args.unit:
            try:
                run_unit(args.unit, Context(model, size, out))
            except UnitSkipped as exc:
                _skip_note(args.unit).parent.mkdir(parents=True, exist_ok=True)
                _skip_note(args.unit).write_text(str(exc))
                return SKIP_EXIT
            return 0
        else:
            chosen = None
            if args.units:
                wanted = [u for u in args.units.split(",") if u]
                unknown = sorted(set(wanted) - set(UNITS))
                if unknown:
                    p.error(f"--units: unknown unit(s) {unknown}; choose from {', '.join(UNITS)}")
                chosen = [u for u in UNITS if u in set(wanted)]
            status = run_grid(out, model=model, size=size, units=chosen, budget_min=args.budget,
                              in_process=args.in_process, unit_timeout_s=args.unit_timeout)
            for n, st in status.items():
                print(f"[training] {n}: {st}")
    if out == RESULTS:
        from .report import update_doc

        update_doc(Path(args.doc), out)
        print(f"[training] report: {args.doc}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
