"""The ``attncap`` command line, run as users run it: in subprocesses.

The engine-backed tests use a tiny random Llama (fp32, head_dim 32) and the in-process
engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``); each CLI call starts its own engine
(~30 s on 2 cores). The demo on the bundled SmolLM2 is the README's command, not a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))

from vllm_attncap.cli import DEMO_SCRIPT, build_parser, load_support_turns  # noqa: E402

CLI = [sys.executable, "-m", "vllm_attncap"]
SUBCOMMANDS = ("demo", "capture", "plot", "score")
TIMEOUT_S = 300
NUM_LAYERS, NUM_HEADS = 3, 4


def run_cli(*args: str, env: dict | None = None, timeout: int = TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env or dict(os.environ)
    )


# --- no engine --------------------------------------------------------------------------------


def test_help_of_every_subcommand_explains_every_flag():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(SUBCOMMANDS)
    top = run_cli("--help", timeout=60)
    assert top.returncode == 0 and all(c in top.stdout for c in SUBCOMMANDS)
    for name, subparser in sub.choices.items():
        res = run_cli(name, "--help", timeout=60)
        assert res.returncode == 0, res.stderr
        for action in subparser._actions:
            if action.dest == "help":
                continue
            assert action.help and len(action.help) > 10, f"{name} {action.option_strings or action.dest}: no help"
            flag = action.option_strings[-1] if action.option_strings else action.metavar
            assert flag in res.stdout, f"{name} --help does not show {flag}"


def test_console_script_matches_module():
    script = Path(sys.executable).parent / "attncap"
    if not script.exists():
        pytest.skip("the attncap console script is not installed in this environment")
    res = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("attncap ")


@pytest.mark.parametrize(
    "args, words",
    [
        (["capture", "--model", "/nonexistent/model", "--prompt", "hi", "--out", "x.npz"], "config.json"),
        (["capture", "--prompt", "hi", "--layers", "last", "--out", "x.npz"], "--layers"),
        (["capture", "--prompt", "hi", "--mode", "stats", "--salient", "-3", "--out", "x.npz"], "salient"),
        (["plot", "missing.npz"], "no such file"),
        (["score", "missing.npz"], "no such file"),
        (["demo", "--turns", "0"], "--turns"),
        (["capture", "--prompt", "hi", "--reduce", "max", "--out", "x.npz"], "invalid choice"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, args, words):
    res = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert words in res.stderr
    assert "Traceback" not in res.stderr


def test_not_a_capture_file(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros(3))
    res = run_cli("score", bad)
    assert res.returncode == 2 and "not a capture" in res.stderr and "Traceback" not in res.stderr


def test_demo_turn_sources(monkeypatch):
    turns, docs, source = load_support_turns(3, builtin=True)
    assert turns == list(DEMO_SCRIPT[:3]) and docs is None and source == "built-in script"
    import importlib.util

    if importlib.util.find_spec("chatterbot_corpus") is not None:
        turns, docs, source = load_support_turns(3)
        assert len(set(turns)) == 3 and "tech_support" in source and len(docs) > 100
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert load_support_turns(2)[2] == "built-in script"
    from vllm_attncap.cli import UsageError

    with pytest.raises(UsageError, match="--turns"):
        load_support_turns(len(DEMO_SCRIPT) + 1)


# --- with the engine --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("vllm")
    from tiny_model import make_tiny_llama

    root = tmp_path_factory.mktemp("attncap-cli")
    model = make_tiny_llama(root / "model", num_layers=NUM_LAYERS, heads=NUM_HEADS, kv_heads=2, head_dim=32)
    env = dict(
        os.environ,
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_ATTNCAP_STORE=str(root / "store"),
    )
    return {"model": str(model), "root": root, "env": env}


def _ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"exit {res.returncode}\nstdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}"
    return res


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


@pytest.mark.engine
@pytest.mark.slow
def test_capture_plot_score_round_trip(tiny):
    out = tiny["root"] / "alice.npz"
    prompt = "Alice sent 42 emails to Bob about the Paris meeting"
    _ok(run_cli("capture", "--model", tiny["model"], "--prompt", prompt, "--max-tokens", 8, "--out", out,
                env=tiny["env"]))
    with np.load(out) as f:
        att, p = f["attention"], int(f["prompt_len"])
        t = len(f["token_ids"])
        assert 1 <= t <= 8 and p == len(f["prompt_token_ids"]) == len(f["prompt_tokens"])
        assert len(f["generated_tokens"]) == t and str(f["model"]) == tiny["model"]
        assert list(f["layers"]) == [NUM_LAYERS - 1] and att.shape == (1, NUM_HEADS, t, p + t - 1)
    for s in range(t):  # each row: a distribution over its causal context
        np.testing.assert_allclose(att[0, :, s, : p + s].sum(-1), 1.0, atol=1e-4)
        assert np.all(att[0, :, s, p + s:] == 0)

    png = tiny["root"] / "alice.png"
    res = _ok(run_cli("plot", out, "--out", png, "--head", 1, env=tiny["env"]))
    assert _is_png(png) and f"{t} generated tokens x {p + t - 1} context positions" in res.stdout
    hist_png = tiny["root"] / "alice-history.png"
    _ok(run_cli("plot", out, "--out", hist_png, "--history-only", "--log", env=tiny["env"]))
    assert _is_png(hist_png)
    res = run_cli("plot", out, "--head", 7, env=tiny["env"])
    assert res.returncode == 2 and "--head 7 was not captured" in res.stderr

    table = _ok(run_cli("score", out, env=tiny["env"]))
    assert "coverage" in table.stdout and "reward" in table.stdout
    res = _ok(run_cli("score", out, "--json", "--alpha", 2.0, "--gamma", 0.0, "--mode", "single", env=tiny["env"]))
    report = json.loads(res.stdout)
    assert report["config"]["alpha"] == 2.0 and report["config"]["mode"] == "single"
    assert report["config"]["eta"] == 0.0  # a saved capture has no log-probabilities: the attention terms only
    turn = report["turns"][0]
    assert turn["num_tokens"] == t and 0.0 <= turn["coverage"] <= 1.0 and turn["focus"] <= 0.0
    assert turn["reward"] == pytest.approx(sum(turn["components"].values()), abs=1e-9)
    # salient positions found from the prompt text: "Alice", "42", "Bob", "Paris" are entities/numbers
    assert report["salient"] and report["salient_source"].startswith("named entities")
    # given positions win, and coverage follows them: all history positions -> C = 1
    res = _ok(run_cli("score", out, "--json", "--sink", 0, "--salient", *range(p), env=tiny["env"]))
    assert json.loads(res.stdout)["turns"][0]["coverage"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.engine
@pytest.mark.slow
def test_chat_capture_all_layers_and_stats_mode(tiny):
    out = tiny["root"] / "chat.npz"
    _ok(run_cli("capture", "--model", tiny["model"], "--chat", "--system", "You help with printers.",
                "--prompt", "My printer does not work after the update", "--layers", "all", "--reduce", "head_mean",
                "--max-tokens", 6, "--out", out, env=tiny["env"]))
    with np.load(out) as f:
        assert f["attention"].shape[:2] == (NUM_LAYERS, 1)
        spans = json.loads(str(f["spans"]))
        assert [s["role"] for s in spans][:2] == ["system", "user"] and spans[-1]["end"] == int(f["prompt_len"])
    png = tiny["root"] / "chat.png"
    _ok(run_cli("plot", out, "--layer", "all", "--out", png, env=tiny["env"]))
    assert _is_png(png)
    res = run_cli("plot", out, "--head", 0, env=tiny["env"])
    assert res.returncode == 2 and "head_mean" in res.stderr
    res = _ok(run_cli("score", out, "--mode", "cot", "--json", "--layers", "all", env=tiny["env"]))
    report = json.loads(res.stdout)
    assert len(report["turns"]) >= 1 and "answer_span" in report

    stats = tiny["root"] / "stats.npz"
    _ok(run_cli("capture", "--model", tiny["model"], "--prompt", "the quick brown fox", "--mode", "stats",
                "--salient", 1, 2, "--max-tokens", 4, "--out", stats, env=tiny["env"]))
    with np.load(stats) as f:
        assert "attention" not in f and f["coverage"].shape[:2] == (1, NUM_HEADS)
    for cmd in ("plot", "score"):
        res = run_cli(cmd, stats, env=tiny["env"])
        assert res.returncode == 2 and "mode=stats" in res.stderr and "Traceback" not in res.stderr
    # an index the model does not have fails before the engine starts
    res = run_cli("capture", "--model", tiny["model"], "--prompt", "hi", "--heads", 0, NUM_HEADS,
                  "--out", tiny["root"] / "never.npz", env=tiny["env"], timeout=120)
    assert res.returncode == 2 and "'heads'" in res.stderr and "out of range" in res.stderr


@pytest.mark.engine
@pytest.mark.slow
def test_demo_writes_heatmaps_and_summary(tiny):
    out = tiny["root"] / "demo"
    res = _ok(run_cli("demo", "--model", tiny["model"], "--turns", 2, "--max-tokens", 8, "--out", out,
                      env=tiny["env"]))
    for name in ("turn-0.png", "turn-1.png", "rewards.png"):
        assert _is_png(out / name), name
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["turns"]) == 2
    for t, turn in enumerate(summary["turns"]):
        score = turn["score"]
        assert score["turn_index"] == t and 1 <= turn["num_tokens"] <= 8
        assert np.isfinite([score["reward"], score["coverage"], score["focus"], score["repetition"],
                            score["grounding"]]).all()  # the default grounds each reply, with the engine's log-probs
        from cagsr_reward.config import CAGSRConfig

        assert score["eta"] == summary["config"]["eta"] == CAGSRConfig().eta
        assert score["reward"] == pytest.approx(sum(turn["components"].values()), abs=1e-9)
        roles = [s["role"] for s in turn["spans"]]
        assert roles[0] == "system" and roles.count("user") == t + 1 and roles.count("assistant") == t
        user = [s for s in turn["spans"] if s["role"] == "user"]
        assert all(any(u["start"] <= p < u["end"] for u in user) for p in turn["salient"])
    # the entropy floor rises with the turn index (multi-turn mode)
    floors = [turn["score"]["floor"] for turn in summary["turns"]]
    assert floors[1] > floors[0]
    assert summary["turns"][1]["return"] == pytest.approx(summary["turns"][1]["score"]["reward"])
    assert "turn" in res.stdout and "reward" in res.stdout and str(out) in res.stdout


@pytest.mark.engine
@pytest.mark.slow
def test_readme_demo_on_the_bundled_model(smollm2_path, tmp_path):
    """The README's command as written (no --model): ~45 s on 2 idle cores."""
    import importlib.util

    pytest.importorskip("vllm")
    env = dict(os.environ, VLLM_ATTNCAP_STORE=str(tmp_path / "store"))
    out = tmp_path / "demo"
    res = _ok(run_cli("demo", "--out", out, env=env, timeout=600))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == smollm2_path and len(summary["turns"]) == 3
    for t, turn in enumerate(summary["turns"]):
        assert _is_png(out / f"turn-{t}.png")
        words = turn["assistant"].split()
        assert len(words) >= 5 and sum(w.isalpha() for w in words) >= 3, turn["assistant"]  # real text
        assert 1 <= turn["num_tokens"] <= 64 and turn["layers"] == [29]
        assert 0.0 < turn["score"]["coverage"] < 1.0
    if importlib.util.find_spec("chatterbot_corpus") is not None:
        assert summary["turns"][0]["user"] == "My system is overheating."
        assert " overheating" in summary["turns"][0]["salient_tokens"]
    assert "CAGSR reward per turn" in res.stdout and str(out) in res.stdout
