"""``attncap capture | plot | score``: one request's capture into a file, and what can be done with the file.

Files are written and read by :meth:`cagsr_reward.attention.CapturedAttention.save` / ``load`` (what
``CapturedOutput.save`` writes too), with the extra fields ``capture`` adds: decoded token strings (plot labels), the
model path, the prompt text and, with ``--chat``, the messages and their token spans.
"""

from __future__ import annotations

import argparse
import sys
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cagsr_reward import CAGSRConfig, CapturedAttention, score_cot, score_turn
from cagsr_reward.encoding import encode_prompt, salient_positions_for_messages
from cagsr_reward.salient import SalientSelector

from .common import (
    UsageError,
    causal,
    check_indices_against_config,
    decode_each,
    int_arg,
    parse_index_list,
    printable,
    resolve_model,
    setup_vllm_env,
    start_engine,
)
from .terminal import Steps, print_table, short

__all__ = ["SavedCapture", "cmd_capture", "cmd_plot", "cmd_score", "load_saved_capture"]


def _npz_path(path: str) -> Path:
    p = Path(path)
    return p if p.suffix == ".npz" else p.with_name(p.name + ".npz")


def cmd_capture(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    from ..spec import CaptureSpec

    spec_fields: dict[str, Any] = {
        "layers": parse_index_list(args.layers, "layers"),
        "heads": parse_index_list(args.heads, "heads"),
        "reduce": args.reduce,
        "mode": args.mode,
        "sink": args.sink,
        "salient": parse_index_list(args.salient, "salient", allow_all=False) or [],
    }
    if args.history_len is not None:
        spec_fields["history_len"] = args.history_len
    if args.max_bytes is not None:
        spec_fields["max_bytes"] = args.max_bytes
    spec = CaptureSpec.from_any(spec_fields)  # ValueError names the field before the engine starts
    out_path = _npz_path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    setup_vllm_env(args.verbose)
    model = resolve_model(args.model)
    check_indices_against_config(model, spec.layers, spec.heads)
    with Steps(2) as steps:
        with steps.step("Starting vLLM (attention_backend='attncap')"):
            llm = start_engine(model, max_model_len=args.max_model_len, seed=args.seed)
            from vllm import SamplingParams

            from ..api import generate_with_attentions
            from ..dialogue import render_with_spans

            tokenizer = llm.get_tokenizer()
        with steps.step("Generating and capturing"):
            messages = spans = None
            if args.chat:
                messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                    {"role": "user", "content": args.prompt}
                ]
                ids, spans = render_with_spans(tokenizer, messages)
                prompt: Any = {"prompt_token_ids": ids}
            else:
                prompt = args.prompt
            sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
            out = generate_with_attentions(llm, prompt, sp, spec=spec, use_tqdm=False)[0]
            if out.error is not None:
                raise UsageError(str(out.error))
    extra: dict[str, Any] = dict(
        spec=spec.to_dict(),
        text=out.text,
        prompt_tokens=decode_each(tokenizer, out.prompt_token_ids),
        generated_tokens=decode_each(tokenizer, out.token_ids),
        model=model,
        prompt_text=args.prompt,
        bos_token_id=-1 if tokenizer.bos_token_id is None else tokenizer.bos_token_id,
    )
    if messages is not None:
        extra.update(messages=json.dumps(messages), spans=json.dumps([s.to_dict() for s in spans]))
    out.captured.save(str(out_path), **extra)
    data = out.stats["coverage"] if spec.mode == "stats" else out.attention
    print(f"captured {len(out.token_ids)} tokens after a {out.prompt_len}-token prompt: {short(out.text, 100)!r}")
    print(f"layers {list(out.layers)}, heads {list(out.heads)}, reduce={spec.reduce}, mode={spec.mode}, "
          f"{'coverage/entropy' if spec.mode == 'stats' else 'attention'} shape {tuple(data.shape)}")
    print(f"saved {out_path}")
    return 0


# --- saved captures ---------------------------------------------------------------------------


@dataclass
class SavedCapture:
    """A capture file: the capture itself and what ``attncap capture`` stored beside it."""

    path: str
    capture: CapturedAttention
    spec: dict[str, Any] = field(default_factory=dict)
    text: str | None = None
    model: str | None = None
    prompt_text: str | None = None
    bos_token_id: int | None = None
    prompt_tokens: list[str] | None = None
    generated_tokens: list[str] | None = None
    messages: list[dict[str, str]] | None = None
    spans: list[dict[str, Any]] | None = None

    def require_rows(self, what: str) -> None:
        if self.capture.mode != "rows":
            raise UsageError(f"{self.path} holds per-row statistics (mode=stats); {what} needs a capture made with "
                             "--mode rows")

    @property
    def prompt_token_ids(self) -> list[int]:
        if self.capture.prompt_token_ids is None:
            raise UsageError(f"{self.path}: the file has no prompt token ids")
        return list(self.capture.prompt_token_ids)

    @property
    def token_ids(self) -> list[int]:
        if self.capture.token_ids is None:
            raise UsageError(f"{self.path}: the file has no generated token ids")
        return list(self.capture.token_ids)


def load_saved_capture(path: str) -> SavedCapture:
    """Read a file written by ``attncap capture`` or ``CapturedOutput.save`` (user errors name the file)."""
    if not Path(path).is_file():
        raise UsageError(f"{path}: no such file")
    try:
        capture, extra = CapturedAttention.load(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path}: not a capture saved by 'attncap capture' / CapturedOutput.save ({e})") from None
    kw: dict[str, Any] = {}
    for name in ("text", "model", "prompt_text"):
        if name in extra:
            kw[name] = str(extra[name])
    if "bos_token_id" in extra:
        bos = int(extra["bos_token_id"])
        kw["bos_token_id"] = None if bos < 0 else bos
    for name in ("prompt_tokens", "generated_tokens"):
        if name in extra:
            kw[name] = [str(t) for t in extra[name]]
    for name in ("messages", "spans"):
        if name in extra:
            kw[name] = json.loads(str(extra[name]))
    spec = extra.get("spec")
    return SavedCapture(path, capture, spec=spec if isinstance(spec, dict) else {}, **kw)


def _tokenizer_for(model: str | None, saved: SavedCapture, *, required: bool):
    """A tokenizer from --model, else the model the capture names, else (if required) the bundled one."""
    name = model or (saved.model if saved.model and Path(saved.model).is_dir() else None)
    if name is None:
        if not required:
            return None
        name = resolve_model(None)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load a tokenizer from {name!r}: {e}") from None


def _layers_for(capture: CapturedAttention, layers: Any) -> Any:
    """The layer choice to aggregate with: a capture averaged over its layers on the device accepts the default
    (last layer) as "all of them", as before."""
    if capture.reduce == "layer_head_mean" and layers != "all":
        if isinstance(layers, str) or list(layers) != [-1]:
            raise UsageError("this capture was averaged over its layers (reduce=layer_head_mean); choose layers 'all'")
        return "all"
    return layers


def cmd_plot(args: argparse.Namespace) -> int:
    saved = load_saved_capture(args.capture)
    saved.require_rows("plot")
    cap = saved.capture
    head_ids = list(cap.head_ids or range(cap.attention.shape[1]))
    p = cap.prompt_len
    num_rows = cap.num_tokens
    layer = args.layer.strip().lower()
    layers: Any = "all" if layer == "all" else [int_arg(layer, "--layer")]
    head = args.head.strip().lower()
    if head == "mean":
        heads: Any = "all"
    else:
        hid = int_arg(head, "--head")
        if cap.reduce != "none":
            raise UsageError("this capture was averaged over heads (reduce=head_mean); use --head mean")
        if hid not in head_ids:
            raise UsageError(f"--head {hid} was not captured; captured heads: {head_ids}")
        heads = [head_ids.index(hid)]
    try:
        a = cap.aggregate(_layers_for(cap, layers), heads)
    except ValueError as e:
        raise UsageError(f"--layer: {e}") from None
    cols = p if args.history_only else a.shape[1]
    a = causal(a, p)[:, :cols]
    tokens = generated = None
    tok = _tokenizer_for(args.model, saved, required=False) if args.model else None
    if tok is not None:
        ctx_ids = saved.prompt_token_ids + saved.token_ids[: num_rows - 1]
        tokens, generated = decode_each(tok, ctx_ids)[:cols], decode_each(tok, saved.token_ids)
    elif saved.prompt_tokens is not None and saved.generated_tokens is not None:
        tokens = (saved.prompt_tokens + saved.generated_tokens[: num_rows - 1])[:cols]
        generated = saved.generated_tokens
    if tokens is not None:
        tokens, generated = [printable(t) for t in tokens], [printable(t) for t in generated]
    salient = parse_index_list(args.salient, "salient", allow_all=False)
    if salient is None:
        salient = list(saved.spec.get("salient", []))
    from ..viz import plot_attention

    out = Path(args.out) if args.out else Path(args.capture).with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    if layers == "all" or cap.reduce == "layer_head_mean":
        what = "mean of captured layers"
    else:
        lid = layers[0] % cap.num_layers if cap.num_layers and layers[0] < 0 else layers[0]
        what = f"layer {cap.layer_ids[lid] if lid < 0 and cap.layer_ids else lid}"
    title = args.title or f"{Path(args.capture).name}: {what}, {'mean of heads' if heads == 'all' else f'head {args.head}'}"
    try:
        plot_attention(
            a, tokens=tokens, generated_tokens=generated, prompt_len=min(p, cols), turn_spans=saved.spans,
            salient=[s for s in salient if s < cols], title=title, out=out, log_scale=args.log, max_labels=args.max_labels,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"wrote {out} ({a.shape[0]} generated tokens x {a.shape[1]} context positions)")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    saved = load_saved_capture(args.capture)
    saved.require_rows("score")
    cap = saved.capture
    overrides = {k: v for k, v in {
        "alpha": args.alpha, "beta": args.beta, "gamma": args.gamma, "h0": args.h0, "kappa": args.kappa,
        "ngram": args.ngram, "mode": args.mode,
    }.items() if v is not None}
    layers = parse_index_list(args.layers, "layers")
    heads = parse_index_list(args.heads, "heads")
    if layers is not None:
        overrides["layers"] = layers
    if heads is not None:
        overrides["heads"] = heads
    if args.sink is not None:
        overrides["sink"] = args.sink if args.sink == "auto" else int_arg(args.sink, "--sink")
    # a saved capture holds attention and token ids, no log-probabilities: the attention terms only (eta = 0)
    config = CAGSRConfig.attention_only(**overrides)
    if config.heads != "all" and cap.reduce != "none":
        raise UsageError("this capture was averaged over heads (reduce=head_mean); use --heads all")
    if layers is None and cap.reduce == "layer_head_mean":
        config = config.replace(layers="all")  # averaged over its layers on the device: that mean is the choice
    elif layers is None:
        # no --layers: the reward's default band when this capture holds it, else every layer it holds (said)
        try:
            cap.aggregate(config.layers, config.heads)
        except ValueError:
            print(f"attncap score: note: this capture does not hold the reward's default layers {config.layers!r}; "
                  f"scoring the mean of the layers it holds (choose others with --layers)", file=sys.stderr)
            config = config.replace(layers="all")
    config = config.replace(layers=_layers_for(cap, config.layers))
    p = cap.prompt_len
    prompt_ids = saved.prompt_token_ids
    bos = saved.bos_token_id

    salient = parse_index_list(args.salient, "salient", allow_all=False)
    salient_source = "--salient"
    if salient is None:
        salient, salient_source = _auto_salient(saved, args, prompt_ids)
    span = next((s for s in reversed(saved.spans or []) if s["role"] == "user"), None)
    user_span = (span["start"], span["end"]) if span else (0, p)
    # a layer/head choice the capture cannot honour is a ValueError naming it (main prints it, exit 2)
    if config.mode == "cot":
        result = score_cot(cap, None, salient, None, None, config, response_tokens=saved.generated_tokens,
                           bos_token_id=bos)
        scores, extra = list(result.blocks), {"answer_span": list(result.answer_span), "total": result.total}
    else:
        ts = score_turn(cap, salient, config, turn_index=args.turn_index, user_span=user_span, bos_token_id=bos)
        scores, extra = [ts], {}
    report = {
        "capture": str(args.capture),
        "config": config.to_dict(),
        "salient": [int(s) for s in salient],
        "salient_source": salient_source,
        "turns": [dict(s.as_dict(), components=s.components()) for s in scores],
        **extra,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    rows = []
    for i, s in enumerate(scores):
        w = s.components()
        rows.append([str(i), str(s.num_tokens), s.coverage, s.focus, s.repetition,
                     "-" if s.floor is None else f"{s.floor:.2f}", w["coverage"], w["focus"], w["repetition"], s.reward])
    print_table(
        f"CAGSR reward of {Path(args.capture).name} (mode={config.mode}, alpha={config.alpha} beta={config.beta} "
        f"gamma={config.gamma})",
        ["block" if config.mode == "cot" else "turn", "tokens", "coverage", "focus", "repetition", "floor",
         "alpha*C", "beta*F", "-gamma*rep", "reward"],
        rows,
    )
    if config.mode == "cot":
        print(f"answer span {tuple(result.answer_span)}; total (weighted) {result.total:.4f}")
    print(f"{len(salient)} salient history positions ({salient_source}); sink={scores[0].sink}; "
          f"history {p} tokens")
    return 0


def _auto_salient(saved: SavedCapture, args: argparse.Namespace, prompt_ids: list[int]):
    """Salient positions from the capture's prompt text: named entities, numbers, --keywords."""
    tok = _tokenizer_for(args.model, saved, required=True)
    selector = SalientSelector(None, keywords=args.keywords or ())
    if saved.messages:
        enc_ids = tok.apply_chat_template(saved.messages, tokenize=False, add_generation_prompt=True)
        ids = tok(enc_ids, add_special_tokens=False)["input_ids"]
        pos = salient_positions_for_messages(saved.messages, tok, selector, sink="auto", roles=["user"])
    elif saved.prompt_text is not None:
        enc = encode_prompt(saved.prompt_text, tok, selector, sink="auto")
        ids, pos = enc.input_ids, enc.salient
    else:
        raise UsageError("this capture has no prompt text; give the salient positions with --salient")
    if list(ids) != prompt_ids:
        raise UsageError(
            "the tokenizer does not reproduce the captured prompt's token ids; pass --model (the captured model) "
            "or --salient"
        )
    kw = " and --keywords" if args.keywords else ""
    return [int(x) for x in pos], f"named entities and numbers{kw} in the prompt"
