"""The ``attncap`` command line (also ``python -m vllm_attncap``).

Subcommands:

* ``demo``    — a short customer-support dialogue on the bundled SmolLM2: every assistant
  turn captured, scored with the CAGSR reward, drawn as a heatmap; a table on the terminal
  and ``summary.json`` + PNGs in the output folder.
* ``capture`` — one request; saves the capture as ``.npz`` (with token strings for labels).
* ``plot``    — heatmap PNG from a saved capture.
* ``score``   — CAGSR reward components from a saved capture.

``--model`` defaults to the bundled SmolLM2-135M-Instruct everywhere (converted once on
first use, see :mod:`vllm_attncap.default_model`). User errors print one line and exit
with status 2; set ``ATTNCAP_DEBUG=1`` to see tracebacks. Importing this module is cheap:
vLLM, torch, transformers and matplotlib load inside the subcommands that need them.
docs/cli.md documents every flag with examples.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

__all__ = ["main", "build_parser", "UsageError", "DEMO_SCRIPT", "load_support_turns"]

PROG = "attncap"
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


class UsageError(Exception):
    """A mistake in how the command was called: printed as one line, exit status 2."""


# --- small helpers ----------------------------------------------------------------------------


def _parse_index_list(values: Sequence[str] | None, name: str, allow_all: bool = True) -> str | list[int] | None:
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


def _setup_vllm_env(verbose: bool) -> None:
    """Defaults that make a local run quick and quiet; the user's own settings win."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; CPU only (the default fraction fails there)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in-process: starts in seconds
    if not verbose:
        import warnings

        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside vLLM's imports
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def _resolve_model(model: str | None) -> str:
    if model is None:
        from .default_model import BundledModelMissing, default_model_path

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


def _check_indices_against_config(model: str, layers: Any, heads: Any) -> None:
    """Fail before the engine starts when layer/head indices are out of range for the model
    (read from its config.json; skipped when the config does not say)."""
    from .spec import CaptureSpec, resolve_spec

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


def _start_engine(model: str, *, max_model_len: int | None, seed: int):
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


def _decode_each(tokenizer, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids]


def _printable(token: str) -> str:
    """A label without control characters (fonts have no glyphs for them)."""
    return "".join(c if c.isprintable() or c in " \n\t" else f"\\x{ord(c):02x}" for c in token)


def _aggregate(attention, layer_ids: Sequence[int], layers: Any, heads: Any, num_layers: int | None):
    """(T, K) mean over the chosen captured layers/heads; ``layers`` are model layer ids."""
    from cagsr_reward import aggregate

    if attention.shape[0] != len(layer_ids):  # reduce="layer_head_mean": one entry for all layers
        if layers != "all" and list(layers) != [-1]:
            raise UsageError("this capture was averaged over its layers (reduce=layer_head_mean); choose layers 'all'")
        return aggregate(attention, layers="all", heads=heads)
    if layers != "all" and num_layers is None:
        # A file saved without the model's layer count: negative ids count from the last captured layer.
        try:
            layers = [layer_ids[v] if v < 0 else v for v in layers]
        except IndexError:
            raise UsageError(f"layer {min(layers)} does not exist among the captured layers {list(layer_ids)}") from None
    return aggregate(attention, layers=layers, heads=heads, layer_ids=list(layer_ids), num_layers=num_layers)


class _Steps:
    """Progress over a fixed number of steps: rich on a terminal, tqdm if rich is missing,
    else (and when stderr is not a terminal) one plain line per step."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self._rich = self._tqdm = None
        if sys.stderr.isatty():
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

                self._rich = Progress(
                    SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), transient=False,
                )
            except ImportError:
                try:
                    from tqdm import tqdm

                    self._tqdm = tqdm(total=total, file=sys.stderr, bar_format="{desc} {bar} {n}/{total} [{elapsed}]")
                except ImportError:
                    pass

    def __enter__(self) -> "_Steps":
        if self._rich is not None:
            self._rich.__enter__()
            self._task = self._rich.add_task("starting", total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)
        elif self._tqdm is not None:
            self._tqdm.close()

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        started = time.perf_counter()
        if self._rich is not None:
            self._rich.update(self._task, description=description)
        elif self._tqdm is not None:
            self._tqdm.set_description_str(description)
        else:
            print(f"[{self.done + 1}/{self.total}] {description} ...", file=sys.stderr, flush=True)
        yield
        self.done += 1
        if self._rich is not None:
            self._rich.advance(self._task)
        elif self._tqdm is not None:
            self._tqdm.update(1)
        else:
            print(f"[{self.done}/{self.total}] {description}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


def _print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, right: Sequence[bool] | None = None) -> None:
    """A table on stdout: rich when installed, else aligned plain text."""
    right = list(right) if right is not None else [False] + [True] * (len(columns) - 1)
    # (+ 0.0 turns -0.0 into 0.0)
    cells = [[c if isinstance(c, str) else f"{c + 0.0:.4f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(columns)]

        def fmt(values):
            return "  ".join(v.rjust(w) if rj else v.ljust(w) for v, w, rj in zip(values, widths, right))

        print(title)
        print(fmt(columns))
        print("  ".join("-" * w for w in widths))
        for r in cells:
            print(fmt(r))
        return
    table = Table(title=title, title_justify="left")
    for name, rj in zip(columns, right):
        # Numbers never wrap; text columns are cut with an ellipsis when space is short.
        table.add_column(name, justify="right" if rj else "left", no_wrap=True, overflow="ellipsis" if not rj else "crop")
    for r in cells:
        table.add_row(*r)
    # At least 120 columns even on a narrower terminal (which then wraps the lines): a squeezed
    # table would cut the numbers. A pipe or file gets room for the whole table.
    import shutil

    width = max(120, shutil.get_terminal_size((120, 24)).columns) if sys.stdout.isatty() else 160
    Console(width=width).print(table)


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


# --- the demo ---------------------------------------------------------------------------------


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
    from cagsr_reward.salient import IDFModel, SalientSelector

    if idf_documents:
        return SalientSelector(IDFModel.fit(idf_documents), min_idf=DEMO_MIN_IDF), (
            f"rare words (IDF >= {DEMO_MIN_IDF} over {len(idf_documents)} corpus conversations) and named "
            "entities/numbers, in user messages; sink=auto"
        )
    return SalientSelector(None, keywords=DEMO_KEYWORDS), (
        f"named entities/numbers and the keywords {list(DEMO_KEYWORDS)}, in user messages; sink=auto"
    )


def _causal(attention_2d, prompt_len: int):
    """A float copy with the cells a row cannot see (keys after its query) set to NaN,
    which the heatmap draws blank."""
    import numpy as np

    a = np.array(attention_2d, dtype=np.float64)
    rows, cols = a.shape
    visible = np.arange(cols)[None, :] < (prompt_len + np.arange(rows))[:, None]
    a[~visible] = np.nan
    return a


def cmd_demo(args: argparse.Namespace) -> int:
    if args.turns < 1:
        raise UsageError(f"--turns must be >= 1, got {args.turns}")
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    layers = _parse_index_list(args.layers, "layers") or [-1]
    out_dir = Path(args.out) if args.out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    turns_text, idf_documents, source = load_support_turns(args.turns, builtin=args.builtin_script)
    _setup_vllm_env(args.verbose)
    started = time.perf_counter()

    # Conversion prints its own lines (and transformers' bars): done before the live display.
    model = _resolve_model(args.model)
    _check_indices_against_config(model, layers, None)
    out_dir.mkdir(parents=True, exist_ok=True)

    from cagsr_reward import CAGSRConfig, TurnInput, history_block, score_dialogue
    from cagsr_reward.salient import salient_positions_for_messages

    spec = {"layers": layers, "reduce": "head_mean"}
    config = CAGSRConfig(mode="multi", layers=tuple(layers) if layers != "all" else "all", heads="all")
    selector, salient_rule = _demo_selector(idf_documents)
    records: list[dict[str, Any]] = []
    turn_inputs = []
    with _Steps(2 + args.turns) as steps:
        with steps.step("Starting vLLM (attention_backend='attncap')"):
            llm = _start_engine(model, max_model_len=args.max_model_len, seed=args.seed)
            from vllm import SamplingParams

            from .api import engine_model_shape
            from .dialogue import Dialogue

            num_layers = engine_model_shape(llm)[0]
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
                a = _aggregate(cap.attention, cap.layers, config.layers, "all", num_layers)
                block = history_block(a, cap.prompt_len)
                user = turn.user_span
                turn_inputs.append(
                    TurnInput(block, enc_salient, response_ids=cap.token_ids, history_ids=turn.prompt_token_ids,
                              user_span=(user.start, user.end) if user else None)
                )
                records.append({"turn": t, "user": user_text, "assistant": turn.text, "attention": a,
                                "capture": cap, "spans": turn.spans, "salient": enc_salient})
        with steps.step("Scoring and drawing heatmaps"):
            score = score_dialogue(turn_inputs, config, bos_token_id=tokenizer.bos_token_id)
            from .viz import plot_attention, plot_turn_rewards

            for rec, ts in zip(records, score.turns):
                cap = rec["capture"]
                png = out_dir / f"turn-{rec['turn']}.png"
                gen = [_printable(t) for t in _decode_each(tokenizer, cap.token_ids)]
                plot_attention(
                    _causal(rec["attention"], cap.prompt_len), generated_tokens=gen, prompt_len=cap.prompt_len,
                    turn_spans=[s.to_dict() for s in rec["spans"]], salient=rec["salient"].tolist(),
                    title=(f"Turn {rec['turn']}: attention of the reply over the history "
                           f"({'last layer' if layers == [-1] else 'layers ' + str(layers)}, mean of heads)"),
                    out=png, log_scale=not args.linear, max_labels=max(60, len(gen)),
                )
                rec["png"] = png
            rewards_png = out_dir / "rewards.png"
            plot_turn_rewards(
                [{"turn": r["turn"], "reward": s.reward, "coverage": s.coverage, "focus": s.focus,
                  "repetition": s.repetition} for r, s in zip(records, score.turns)],
                out=rewards_png, title="CAGSR reward components per turn",
            )

    elapsed = time.perf_counter() - started
    rows = []
    for rec, ts, g in zip(records, score.turns, score.returns):
        cap = rec["capture"]
        rows.append([str(rec["turn"]), _short(rec["user"], 38), str(ts.num_tokens), str(cap.prompt_len),
                     str(len(rec["salient"])), ts.coverage, ts.focus, ts.repetition,
                     "-" if ts.floor is None else f"{ts.floor:.2f}", ts.reward, float(g)])
    print()
    _print_table(
        f"CAGSR reward per turn ({Path(model).name}, alpha={config.alpha} beta={config.beta} gamma={config.gamma}, "
        f"mode={config.mode})",
        ["turn", "user says", "tokens", "history", "salient", "coverage", "focus", "repetition", "floor", "reward", "return"],
        rows, right=[True, False] + [True] * 9,
    )
    for rec in records:
        print(f"  turn {rec['turn']} reply: {_short(rec['assistant'], 110)}")
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
                "salient_tokens": _decode_each(tokenizer, [rec["capture"].prompt_token_ids[i] for i in rec["salient"]]),
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


# --- capture ----------------------------------------------------------------------------------


def _npz_path(path: str) -> Path:
    p = Path(path)
    return p if p.suffix == ".npz" else p.with_name(p.name + ".npz")


def cmd_capture(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    from .spec import CaptureSpec

    spec_fields: dict[str, Any] = {
        "layers": _parse_index_list(args.layers, "layers"),
        "heads": _parse_index_list(args.heads, "heads"),
        "reduce": args.reduce,
        "mode": args.mode,
        "sink": args.sink,
        "salient": _parse_index_list(args.salient, "salient", allow_all=False) or [],
    }
    if args.history_len is not None:
        spec_fields["history_len"] = args.history_len
    if args.max_bytes is not None:
        spec_fields["max_bytes"] = args.max_bytes
    spec = CaptureSpec.from_any(spec_fields)  # ValueError names the field before the engine starts
    out_path = _npz_path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _setup_vllm_env(args.verbose)
    model = _resolve_model(args.model)
    _check_indices_against_config(model, spec.layers, spec.heads)
    with _Steps(2) as steps:
        with steps.step("Starting vLLM (attention_backend='attncap')"):
            llm = _start_engine(model, max_model_len=args.max_model_len, seed=args.seed)
            from vllm import SamplingParams

            from .api import engine_model_shape, generate_with_attentions
            from .dialogue import render_with_spans

            tokenizer = llm.get_tokenizer()
            num_layers = engine_model_shape(llm)[0]
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
    out.save(str(out_path))
    import numpy as np

    with np.load(out_path, allow_pickle=False) as saved:
        arrays = dict(saved)
    arrays.update(
        prompt_tokens=np.asarray(_decode_each(tokenizer, out.prompt_token_ids), dtype=str),
        generated_tokens=np.asarray(_decode_each(tokenizer, out.token_ids), dtype=str),
        model=np.asarray(model),
        num_layers=np.asarray(num_layers),
        prompt_text=np.asarray(args.prompt),
        bos_token_id=np.asarray(-1 if tokenizer.bos_token_id is None else tokenizer.bos_token_id),
    )
    if messages is not None:
        arrays["messages"] = np.asarray(json.dumps(messages))
        arrays["spans"] = np.asarray(json.dumps([s.to_dict() for s in spans]))
    np.savez_compressed(out_path, **arrays)
    data = out.stats["coverage"] if spec.mode == "stats" else out.attention
    print(f"captured {len(out.token_ids)} tokens after a {out.prompt_len}-token prompt: {_short(out.text, 100)!r}")
    print(f"layers {list(out.layers)}, heads {list(out.heads)}, reduce={spec.reduce}, mode={spec.mode}, "
          f"{'coverage/entropy' if spec.mode == 'stats' else 'attention'} shape {tuple(data.shape)}")
    print(f"saved {out_path}")
    return 0


# --- saved captures ---------------------------------------------------------------------------


def _load_capture(path: str) -> dict[str, Any]:
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        with np.load(p, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a capture saved by 'attncap capture' / CapturedOutput.save ({e})") from None
    if "prompt_len" not in data or ("attention" not in data and "coverage" not in data):
        raise UsageError(f"{path}: not a capture saved by 'attncap capture' / CapturedOutput.save")
    out: dict[str, Any] = {k: v for k, v in data.items()}
    for name in ("prompt_len", "num_layers", "bos_token_id"):
        if name in out:
            out[name] = int(out[name])
    for name in ("spec", "messages", "spans"):
        if name in out:
            out[name] = json.loads(str(out[name]))
    for name in ("model", "text", "prompt_text"):
        if name in out:
            out[name] = str(out[name])
    for name in ("prompt_tokens", "generated_tokens"):
        if name in out:
            out[name] = [str(t) for t in out[name]]
    return out


def _require_rows(cap: dict[str, Any], path: str, what: str) -> None:
    if "attention" not in cap:
        raise UsageError(f"{path} holds per-row statistics (mode=stats); {what} needs a capture made with --mode rows")


def _tokenizer_for(model: str | None, cap: dict[str, Any], *, required: bool):
    """A tokenizer from --model, else the model the capture names, else (if required) the bundled one."""
    name = model or (cap.get("model") if cap.get("model") and Path(cap["model"]).is_dir() else None)
    if name is None:
        if not required:
            return None
        name = _resolve_model(None)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load a tokenizer from {name!r}: {e}") from None


def cmd_plot(args: argparse.Namespace) -> int:
    cap = _load_capture(args.capture)
    _require_rows(cap, args.capture, "plot")
    att, layer_ids, head_ids = cap["attention"], [int(x) for x in cap["layers"]], [int(x) for x in cap["heads"]]
    p = cap["prompt_len"]
    num_rows = att.shape[2]
    layer = args.layer.strip().lower()
    layers: Any = "all" if layer == "all" else [_int_arg(layer, "--layer")]
    head = args.head.strip().lower()
    if head == "mean":
        heads: Any = "all"
    else:
        hid = _int_arg(head, "--head")
        if att.shape[1] != len(head_ids):
            raise UsageError("this capture was averaged over heads (reduce=head_mean); use --head mean")
        if hid not in head_ids:
            raise UsageError(f"--head {hid} was not captured; captured heads: {head_ids}")
        heads = [head_ids.index(hid)]
    try:
        a = _aggregate(att, layer_ids, layers, heads, cap.get("num_layers"))
    except ValueError as e:
        raise UsageError(f"--layer: {e}") from None
    cols = p if args.history_only else a.shape[1]
    a = _causal(a, p)[:, :cols]
    tokens = generated = None
    tok = _tokenizer_for(args.model, cap, required=False) if args.model else None
    if tok is not None:
        ctx_ids = list(cap["prompt_token_ids"]) + list(cap["token_ids"][: num_rows - 1])
        tokens, generated = _decode_each(tok, ctx_ids)[:cols], _decode_each(tok, cap["token_ids"])
    elif "prompt_tokens" in cap:
        tokens = (cap["prompt_tokens"] + cap["generated_tokens"][: num_rows - 1])[:cols]
        generated = cap["generated_tokens"]
    if tokens is not None:
        tokens, generated = [_printable(t) for t in tokens], [_printable(t) for t in generated]
    spans = cap.get("spans")
    salient = _parse_index_list(args.salient, "salient", allow_all=False)
    if salient is None:
        salient = list(cap.get("spec", {}).get("salient", []))
    from .viz import plot_attention

    out = Path(args.out) if args.out else Path(args.capture).with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    if layers == "all":
        what = "mean of captured layers"
    else:
        n_model = cap.get("num_layers")
        lid = layers[0] % n_model if n_model and layers[0] < 0 else layers[0]
        what = f"layer {layer_ids[lid] if lid < 0 else lid}"
    title = args.title or f"{Path(args.capture).name}: {what}, {'mean of heads' if heads == 'all' else f'head {args.head}'}"
    try:
        plot_attention(
            a, tokens=tokens, generated_tokens=generated, prompt_len=min(p, cols), turn_spans=spans,
            salient=[s for s in salient if s < cols], title=title, out=out, log_scale=args.log, max_labels=args.max_labels,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"wrote {out} ({a.shape[0]} generated tokens x {a.shape[1]} context positions)")
    return 0


def _int_arg(value: str, flag: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{flag}: expected an integer, got {value!r}") from None


def cmd_score(args: argparse.Namespace) -> int:
    cap = _load_capture(args.capture)
    _require_rows(cap, args.capture, "score")
    from cagsr_reward import CAGSRConfig, history_block, score_cot, score_turn

    overrides = {k: v for k, v in {
        "alpha": args.alpha, "beta": args.beta, "gamma": args.gamma, "h0": args.h0, "kappa": args.kappa,
        "ngram": args.ngram, "mode": args.mode,
    }.items() if v is not None}
    layers = _parse_index_list(args.layers, "layers")
    heads = _parse_index_list(args.heads, "heads")
    if layers is not None:
        overrides["layers"] = layers
    if heads is not None:
        overrides["heads"] = heads
    if args.sink is not None:
        overrides["sink"] = args.sink if args.sink == "auto" else _int_arg(args.sink, "--sink")
    config = CAGSRConfig(**overrides)
    att = cap["attention"]
    if config.heads != "all" and att.shape[1] != len(cap["heads"]):
        raise UsageError("this capture was averaged over heads (reduce=head_mean); use --heads all")
    a = _aggregate(att, [int(x) for x in cap["layers"]], config.layers, config.heads, cap.get("num_layers"))
    p = cap["prompt_len"]
    prompt_ids, response_ids = [int(x) for x in cap["prompt_token_ids"]], [int(x) for x in cap["token_ids"]]
    bos = cap.get("bos_token_id", -1)
    bos = None if bos is None or bos < 0 else bos

    salient = _parse_index_list(args.salient, "salient", allow_all=False)
    salient_source = "--salient"
    if salient is None:
        salient, salient_source = _auto_salient(cap, args, prompt_ids)
    span = next((s for s in reversed(cap.get("spans") or []) if s["role"] == "user"), None)
    user_span = (span["start"], span["end"]) if span else (0, p)
    if config.mode == "cot":
        result = score_cot(a, p, salient, response_ids, prompt_ids, config,
                           response_tokens=cap.get("generated_tokens"), bos_token_id=bos)
        scores, extra = list(result.blocks), {"answer_span": list(result.answer_span), "total": result.total}
    else:
        ts = score_turn(history_block(a, p), salient, config, turn_index=args.turn_index, response_ids=response_ids,
                        history_ids=prompt_ids, user_span=user_span, bos_token_id=bos)
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
    _print_table(
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


def _auto_salient(cap: dict[str, Any], args: argparse.Namespace, prompt_ids: list[int]):
    """Salient positions from the capture's prompt text: named entities, numbers, --keywords."""
    from cagsr_reward.salient import SalientSelector, encode_prompt, salient_positions_for_messages

    tok = _tokenizer_for(args.model, cap, required=True)
    selector = SalientSelector(None, keywords=args.keywords or ())
    if cap.get("messages"):
        enc_ids = tok.apply_chat_template(cap["messages"], tokenize=False, add_generation_prompt=True)
        ids = tok(enc_ids, add_special_tokens=False)["input_ids"]
        pos = salient_positions_for_messages(cap["messages"], tok, selector, sink="auto", roles=["user"])
    elif cap.get("prompt_text") is not None:
        enc = encode_prompt(cap["prompt_text"], tok, selector, sink="auto")
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


# --- parser -----------------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _add_model(p: argparse.ArgumentParser, help_extra: str = "") -> None:
    p.add_argument("--model", metavar="PATH", default=None,
                   help="Hugging Face model directory (default: the bundled SmolLM2-135M-Instruct, converted once "
                        "into ~/.cache/vllm-attncap on first use)" + help_extra)


def _add_engine(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="vLLM context length (default: the model's own maximum)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--seed", type=int, default=0, help="sampling and engine seed")
    p.add_argument("-v", "--verbose", action="store_true", help="keep vLLM's and transformers' log output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=_Formatter,
        description="Capture attention from vLLM per request, draw it, and score it with the CAGSR reward.",
        epilog=(
            "examples:\n"
            "  attncap demo                                   # the 3-turn support dialogue, ~1 min on CPU\n"
            "  attncap capture --prompt 'Where does Bob live?' --out bob.npz\n"
            "  attncap plot bob.npz --out bob.png\n"
            "  attncap score bob.npz --json\n\n"
            "Run 'attncap COMMAND --help' for the flags of each command; docs/cli.md has more."
        ),
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "demo", formatter_class=_Formatter, help="capture and score a short customer-support dialogue",
        description=(
            "Run a customer-support dialogue on a model with attention capture. Each assistant turn is\n"
            "generated over the whole history and captured (last layer, mean of heads by default), scored\n"
            "with the multi-turn CAGSR reward (coverage of salient user words, focus with the per-turn\n"
            "entropy floor, history repetition) and drawn as a heatmap with turn bands and salient markers.\n"
            "User turns come from chatterbot-corpus's tech_support set when installed, else a built-in script."
        ),
        epilog="example:\n  attncap demo --out /tmp/demo --turns 3 --max-tokens 48",
    )
    _add_model(p)
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output folder for turn-<t>.png, rewards.png and summary.json (default: runs/demo-<timestamp>)")
    p.add_argument("--turns", type=int, default=3, help="number of user turns")
    p.add_argument("--max-tokens", type=int, default=64, metavar="N", help="tokens generated per assistant turn")
    p.add_argument("--layers", nargs="+", default=["-1"], metavar="L",
                   help="layers to capture and average: 'all' or layer indices (negative = from the last)")
    p.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt")
    p.add_argument("--builtin-script", action="store_true",
                   help="take the user turns from the built-in script (one Wi-Fi problem over five turns) even "
                        "when chatterbot-corpus is installed")
    p.add_argument("--linear", action="store_true", help="linear colour scale for the heatmaps (default: logarithmic, "
                                                        "which shows more than the attention sink)")
    _add_engine(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "capture", formatter_class=_Formatter, help="capture one request's attention into an .npz file",
        description=(
            "Generate from one prompt with capture and save the result with CapturedOutput.save, plus the\n"
            "decoded token strings (for plot labels), the model path and, with --chat, the messages and\n"
            "their token spans. Arrays: attention (L, H, T, P+T-1) in rows mode, or coverage and entropy\n"
            "(L, H, T) in stats mode; prompt_token_ids, token_ids, layers, heads, prompt_len, spec."
        ),
        epilog=(
            "examples:\n"
            "  attncap capture --prompt 'Alice lives in Paris. Where does Alice live?' --out alice.npz\n"
            "  attncap capture --chat --prompt 'My printer is offline.' --layers all --reduce head_mean --out p.npz\n"
            "  attncap capture --prompt 'Hi' --mode stats --salient 1 2 --out s.npz"
        ),
    )
    _add_model(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=32, metavar="N", help="tokens to generate")
    p.add_argument("--layers", nargs="+", default=["-1"], metavar="L",
                   help="layers to capture: 'all' or indices (negative = from the last layer)")
    p.add_argument("--heads", nargs="+", default=["all"], metavar="H", help="query heads to capture: 'all' or indices")
    p.add_argument("--reduce", choices=("none", "head_mean", "layer_head_mean"), default="none",
                   help="average over heads (head_mean) or over heads and layers (layer_head_mean) on the device")
    p.add_argument("--mode", choices=("rows", "stats"), default="rows",
                   help="rows: full attention rows; stats: per-row coverage and history entropy only")
    p.add_argument("--history-len", type=int, default=None, metavar="N", help="stats mode: history columns (default: the prompt)")
    p.add_argument("--sink", type=int, default=0, metavar="N", help="stats mode: leading positions dropped before renormalising")
    p.add_argument("--salient", nargs="+", default=None, metavar="POS", help="stats mode: salient history positions")
    p.add_argument("--max-bytes", type=int, default=None, metavar="B",
                   help="cap on this capture's buffer (default: VLLM_ATTNCAP_MAX_BYTES or 256 MiB)")
    p.add_argument("--out", required=True, metavar="FILE.npz", help="where to save the capture")
    _add_engine(p)
    p.set_defaults(func=cmd_capture)

    p = sub.add_parser(
        "plot", formatter_class=_Formatter, help="draw a saved capture as a heatmap PNG",
        description=(
            "Heatmap of a saved rows-mode capture: generated tokens (rows) over context positions\n"
            "(columns), the prompt boundary dashed, chat turns as coloured bands (captures made with\n"
            "--chat), salient positions marked. Token labels come from the strings stored by\n"
            "'attncap capture', or from --model's tokenizer."
        ),
        epilog="examples:\n  attncap plot alice.npz --out alice.png\n  attncap plot p.npz --layer all --log --history-only",
    )
    p.add_argument("capture", metavar="CAPTURE.npz", help="a file written by 'attncap capture' or CapturedOutput.save")
    p.add_argument("--out", metavar="FILE.png", default=None, help="output PNG (default: the capture's name with .png)")
    p.add_argument("--layer", default="-1",
                   help="captured model layer to show (negative = from the model's last layer), or 'all' for the "
                        "mean of the captured layers")
    p.add_argument("--head", default="mean", help="query head to show, or 'mean' for the mean of the captured heads")
    p.add_argument("--model", metavar="PATH", default=None,
                   help="tokenizer for the labels (default: the token strings stored in the capture)")
    p.add_argument("--salient", nargs="+", default=None, metavar="POS",
                   help="positions to mark as salient (default: the spec's salient positions)")
    p.add_argument("--history-only", action="store_true", help="show only the prompt (history) columns")
    p.add_argument("--log", action="store_true", help="logarithmic colour scale")
    p.add_argument("--max-labels", type=int, default=60, metavar="N", help="label every position on an axis with at most N")
    p.add_argument("--title", default=None, help="figure title")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser(
        "score", formatter_class=_Formatter, help="CAGSR reward components of a saved capture",
        description=(
            "Score a saved rows-mode capture with the CAGSR reward R = alpha*C + beta*F - gamma*rep:\n"
            "average the chosen layers/heads, take the history block (the prompt columns), and score it\n"
            "(score_turn; score_cot in cot mode). Salient positions default to the named entities and\n"
            "numbers of the prompt (user messages for --chat captures) plus --keywords, located with the\n"
            "tokenizer's offsets."
        ),
        epilog="examples:\n  attncap score alice.npz\n  attncap score p.npz --mode single --alpha 2 --keywords printer --json",
    )
    p.add_argument("capture", metavar="CAPTURE.npz", help="a file written by 'attncap capture' or CapturedOutput.save")
    p.add_argument("--alpha", type=float, default=None, help="weight of coverage C (default: CAGSRConfig's, 1.0)")
    p.add_argument("--beta", type=float, default=None, help="weight of focus F (default 0.1)")
    p.add_argument("--gamma", type=float, default=None, help="weight of the repetition penalty (default 0.5)")
    p.add_argument("--h0", type=float, default=None, help="entropy floor at turn 0, nats (default 0.5)")
    p.add_argument("--kappa", type=float, default=None, help="entropy floor increase per turn, nats (default 0.25)")
    p.add_argument("--ngram", type=int, default=None, help="n of repeated n-grams (default 3)")
    p.add_argument("--mode", choices=("single", "multi", "cot"), default=None,
                   help="single: self repetition; multi: history repetition, floor at --turn-index; cot: "
                        "blocks of generated tokens (default: multi)")
    p.add_argument("--turn-index", type=int, default=0, help="turn index t of this capture (sets the entropy floor)")
    p.add_argument("--layers", nargs="+", default=None, metavar="L",
                   help="model layers to average: 'all' or ids (negative = from the model's last; default -1)")
    p.add_argument("--heads", nargs="+", default=None, metavar="H", help="heads to average: 'all' (default) or indices")
    p.add_argument("--sink", default=None, help="leading sink columns dropped: 'auto' (default: 1 if BOS) or an int")
    p.add_argument("--salient", nargs="+", default=None, metavar="POS", help="salient history positions (skips detection)")
    p.add_argument("--keywords", nargs="+", default=None, metavar="WORD", help="words that are salient wherever they occur")
    p.add_argument("--model", metavar="PATH", default=None,
                   help="tokenizer for salient detection (default: the model the capture names, else the bundled one)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_score)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``attncap`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = os.environ.get("ATTNCAP_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        if debug:
            raise
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        # Validation errors of the spec and the reward config name the offending field.
        if debug:
            raise
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
