"""``attncap demo``: a short customer-support dialogue, every assistant turn captured, scored and drawn.

The reward is ``CAGSRConfig(mode="multi")``'s, grounding included: each reply's log-probabilities after its history
and after the empty conversation come from the same engine (:func:`vllm_attncap.api.token_logprobs`, one batched
prefill after the dialogue)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from cagsr_reward import CAGSRConfig, TurnInput, score_dialogue
from cagsr_reward.encoding import prior_prompt_ids, salient_positions_for_messages
from cagsr_reward.idf import IDFModel
from cagsr_reward.salient import SalientSelector

from .common import (
    UsageError,
    causal,
    check_indices_against_config,
    decode_each,
    parse_index_list,
    printable,
    resolve_model,
    setup_vllm_env,
    start_engine,
)
from .terminal import Steps, print_table, short

__all__ = ["DEFAULT_SYSTEM", "DEMO_SCRIPT", "cmd_demo", "load_support_turns"]

DEFAULT_SYSTEM = (
    "You are a friendly support agent for a computer shop. Answer in two or three short, concrete sentences."
)
#: User turns of the demo when chatterbot-corpus is not installed: one customer, one problem.
DEMO_SCRIPT = (
    "Hi, my laptop stopped connecting to the office Wi-Fi after yesterday's Windows update.",
    "I restarted the router and the laptop, but the network OfficeNet still does not show up.",
    "Device Manager shows error code 10 on the Intel Wi-Fi adapter. Should I reinstall the driver?",
    "I installed driver version 22.1 and it works again. Is there anything else I should check?",
    "Thanks! Can you sum up what fixed it so I can tell my colleague Maria?",
)
_CORPUS_FILE = ("data", "english", "tech_support.yml")
DEMO_MIN_IDF = 3.0
DEMO_KEYWORDS = ("Wi-Fi", "router", "driver", "update", "adapter", "error code")


def load_support_turns(n: int, *, builtin: bool = False) -> tuple[list[str], list[str] | None, str]:
    """``n`` user turns for the demo, and documents to fit the salient-word IDF on.

    With chatterbot-corpus installed: the distinct user lines of its tech_support set in file
    order, and every English conversation of the corpus as IDF documents (about 2,000 of them, so
    support words such as "overheating" are rare and "my", "is" are common). Otherwise
    :data:`DEMO_SCRIPT` and no IDF documents. The corpus package is located with importlib and
    its YAML files read directly, without importing the package.

    Args:
        n: number of user turns.
        builtin: use :data:`DEMO_SCRIPT` even when the corpus is installed.

    Returns:
        ``(turns, idf_documents or None, source)``.
    """
    import importlib.util

    spec = None if builtin else importlib.util.find_spec("chatterbot_corpus")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location).joinpath(*_CORPUS_FILE)
        if not path.is_file():
            continue
        try:
            import yaml

            def conversations(file: Path) -> list[list[str]]:
                data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
                return [[str(m) for m in c] for c in data.get("conversations", []) if isinstance(c, list) and c]

            users = list(dict.fromkeys(c[0].strip() for c in conversations(path)))
            docs = [" ".join(c) for f in sorted(path.parent.glob("*.yml")) for c in conversations(f)]
        except Exception:  # noqa: BLE001 - any trouble with the optional corpus: use the script
            break
        if len(users) >= n:
            return users[:n], docs, f"chatterbot-corpus {path.name}"
        break
    if n > len(DEMO_SCRIPT):
        raise UsageError(f"--turns: the built-in script has {len(DEMO_SCRIPT)} user turns, got {n}")
    return list(DEMO_SCRIPT[:n]), None, "built-in script"


def _demo_selector(idf_documents: list[str] | None):
    """Salient words of the demo: rare words (IDF >= 3, i.e. in fewer than ~1 in 7 corpus
    conversations) and named entities/numbers; for the built-in script, named entities,
    numbers and a few support keywords."""
    if idf_documents:
        return SalientSelector(IDFModel.fit(idf_documents), min_idf=DEMO_MIN_IDF), (
            f"rare words (IDF >= {DEMO_MIN_IDF} over {len(idf_documents)} corpus conversations) and named "
            "entities/numbers, in user messages; sink=auto"
        )
    return SalientSelector(None, keywords=DEMO_KEYWORDS), (
        f"named entities/numbers and the keywords {list(DEMO_KEYWORDS)}, in user messages; sink=auto"
    )


def cmd_demo(args: argparse.Namespace) -> int:
    if args.turns < 1:
        raise UsageError(f"--turns must be >= 1, got {args.turns}")
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    layers = parse_index_list(args.layers, "layers") or [-1]
    out_dir = Path(args.out) if args.out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    turns_text, idf_documents, source = load_support_turns(args.turns, builtin=args.builtin_script)
    setup_vllm_env(args.verbose)
    started = time.perf_counter()

    # Conversion prints its own lines (and transformers' bars): done before the live display.
    model = resolve_model(args.model)
    check_indices_against_config(model, layers, None)
    out_dir.mkdir(parents=True, exist_ok=True)

    spec = {"layers": layers, "reduce": "head_mean"}
    config = CAGSRConfig(mode="multi", layers=tuple(layers) if layers != "all" else "all", heads="all")
    selector, salient_rule = _demo_selector(idf_documents)
    records: list[dict[str, Any]] = []
    with Steps(2 + args.turns) as steps:
        with steps.step("Starting vLLM (attention_backend='attncap')"):
            llm = start_engine(model, max_model_len=args.max_model_len, seed=args.seed)
            from vllm import SamplingParams

            from ..dialogue import Dialogue

            tokenizer = llm.get_tokenizer()
            dialogue = Dialogue(
                llm, SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed),
                spec=spec, system=args.system,
            )
        for t, user_text in enumerate(turns_text):
            with steps.step(f"Turn {t + 1}/{args.turns}: generating and capturing"):
                history = [dict(m) for m in dialogue.messages] + [{"role": "user", "content": user_text}]
                turn = dialogue.say(user_text)
                cap = turn.captured
                enc_salient = salient_positions_for_messages(
                    history, tokenizer, selector, sink="auto", roles=["user"]
                )
                a = cap.captured.aggregate(config.layers, config.heads)
                user = turn.user_span
                records.append({"turn": t, "user": user_text, "assistant": turn.text, "attention": a,
                                "capture": cap, "spans": turn.spans, "salient": enc_salient, "history": history,
                                "user_span": (user.start, user.end) if user else None})
        with steps.step("Scoring and drawing heatmaps"):
            from ..api import token_logprobs

            # the grounding term: each reply after its history and after the empty conversation, same engine
            replies = [list(rec["capture"].token_ids) for rec in records]
            contexts = [list(rec["capture"].prompt_token_ids) for rec in records]
            priors = [prior_prompt_ids(tokenizer, rec["history"]) for rec in records]
            both = token_logprobs(llm, contexts + priors, replies + replies)
            turn_inputs = [
                TurnInput(rec["capture"].captured, rec["salient"], user_span=rec["user_span"], logprobs=lp,
                          prior_logprobs=lp0)
                for rec, lp, lp0 in zip(records, both[: len(records)], both[len(records):])
            ]
            score = score_dialogue(turn_inputs, config, bos_token_id=tokenizer.bos_token_id)
            from ..viz import plot_attention, plot_turn_rewards

            for rec, ts in zip(records, score.turns):
                cap = rec["capture"]
                png = out_dir / f"turn-{rec['turn']}.png"
                gen = [printable(t) for t in decode_each(tokenizer, cap.token_ids)]
                plot_attention(
                    causal(rec["attention"], cap.prompt_len), generated_tokens=gen, prompt_len=cap.prompt_len,
                    turn_spans=[s.to_dict() for s in rec["spans"]], salient=rec["salient"].tolist(),
                    title=(f"Turn {rec['turn']}: attention of the reply over the history "
                           f"({'last layer' if layers == [-1] else 'layers ' + str(layers)}, mean of heads)"),
                    out=png, log_scale=not args.linear, max_labels=max(60, len(gen)),
                )
                rec["png"] = png
            rewards_png = out_dir / "rewards.png"
            plot_turn_rewards(
                [{"turn": r["turn"], "reward": s.reward, "coverage": s.coverage, "focus": s.focus,
                  "repetition": s.repetition, "grounding": s.grounding} for r, s in zip(records, score.turns)],
                out=rewards_png, title="CAGSR reward components per turn",
            )

    elapsed = time.perf_counter() - started
    rows = []
    for rec, ts, g in zip(records, score.turns, score.returns):
        cap = rec["capture"]
        rows.append([str(rec["turn"]), short(rec["user"], 38), str(ts.num_tokens), str(cap.prompt_len),
                     str(len(rec["salient"])), ts.coverage, ts.focus, ts.repetition, ts.grounding,
                     "-" if ts.floor is None else f"{ts.floor:.2f}", ts.reward, float(g)])
    print()
    print_table(
        f"CAGSR reward per turn ({Path(model).name}, alpha={config.alpha} beta={config.beta} gamma={config.gamma} "
        f"eta={config.eta}, mode={config.mode})",
        ["turn", "user says", "tokens", "history", "salient", "coverage", "focus", "repetition", "grounding", "floor",
         "reward", "return"],
        rows, right=[True, False] + [True] * 10,
    )
    for rec in records:
        print(f"  turn {rec['turn']} reply: {short(rec['assistant'], 110)}")
    summary = {
        "model": model,
        "turn_source": source,
        "system": args.system,
        "capture_spec": spec,
        "sampling": {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed},
        "config": config.to_dict(),
        "salient_rule": salient_rule,
        "turns": [
            {
                "turn": rec["turn"],
                "user": rec["user"],
                "assistant": rec["assistant"],
                "prompt_len": rec["capture"].prompt_len,
                "num_tokens": len(rec["capture"].token_ids),
                "layers": list(rec["capture"].layers),
                "spans": [s.to_dict() for s in rec["spans"]],
                "salient": rec["salient"].tolist(),
                "salient_tokens": decode_each(tokenizer, [rec["capture"].prompt_token_ids[i] for i in rec["salient"]]),
                "score": ts.as_dict(),
                "components": ts.components(),
                "return": float(g),
                "heatmap": str(rec["png"]),
            }
            for rec, ts, g in zip(records, score.turns, score.returns)
        ],
        "total_reward": score.total,
        "rewards_plot": str(rewards_png),
        "seconds": round(elapsed, 1),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nUser turns from the {source}; {len(records)} turns in {elapsed:.0f} s.")
    print(f"Wrote to {out_dir}/:")
    for rec in records:
        print(f"  {rec['png'].name:<14} attention heatmap of turn {rec['turn']}")
    print(f"  {'rewards.png':<14} reward components per turn")
    print(f"  {'summary.json':<14} texts, spans, salient positions, scores")
    return 0
