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

Modules: :mod:`~.demo`, :mod:`~.captures` (capture / plot / score), :mod:`~.terminal` (progress, tables),
:mod:`~.common` (errors, flags, the engine).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .captures import cmd_capture, cmd_plot, cmd_score
from .common import PROG, UsageError
from .demo import DEFAULT_SYSTEM, DEMO_SCRIPT, cmd_demo, load_support_turns

__all__ = ["main", "build_parser", "UsageError", "DEMO_SCRIPT", "load_support_turns"]


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
    from .. import __version__

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
            "tokenizer's offsets. A saved capture holds no log-probabilities, so the grounding term of the\n"
            "default reward (eta * G) is left out: CAGSRConfig.attention_only()."
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
