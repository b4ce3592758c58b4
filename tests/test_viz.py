"""Heatmaps and reward plots: PNGs are written, highlights are drawn, bad input is named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vllm_attncap.viz import plot_attention, plot_reward_components, plot_turn_rewards

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk of a PNG file."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def dialogue_spans(num_columns: int) -> list[dict]:
    """System, two user/assistant exchanges and a third user turn, covering all columns."""
    cuts = np.linspace(0, num_columns, 7).astype(int)
    roles = [("system", 0), ("user", 0), ("assistant", 0), ("user", 1), ("assistant", 1), ("user", 2)]
    return [
        {"start": int(cuts[i]), "end": int(cuts[i + 1]), "role": role, "turn": turn}
        for i, (role, turn) in enumerate(roles)
    ]


def _artists(fig) -> tuple[int, int, int]:
    """(patches, lines, texts) over all axes of a figure."""
    return (
        sum(len(ax.patches) for ax in fig.axes),
        sum(len(ax.lines) for ax in fig.axes),
        sum(len(ax.texts) for ax in fig.axes),
    )


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# --- plot_attention ---------------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "cols"), [(8, 40), (64, 3000)])
def test_attention_png_has_sensible_size(tmp_path, rng, rows, cols):
    attn = rng.dirichlet(np.full(cols, 0.2), size=rows)
    out = tmp_path / "attn.png"
    fig = plot_attention(attn, prompt_len=cols - rows, turn_spans=dialogue_spans(cols - rows),
                         salient=rng.choice(cols - rows, 5, replace=False), title="t", out=out)
    assert out.stat().st_size > 5_000
    width, height = png_size(out)
    assert 900 <= width <= 3200 and 450 <= height <= 2300, (width, height)
    assert [ax.get_label() for ax in fig.axes] == ["attention", "bands", "colorbar"]


def test_attention_labels_tokens_when_they_fit_and_sparse_ticks_otherwise(rng):
    tokens = [f"Ġw{i}" for i in range(30)] + ["\n", "$x$"]
    generated = [f"g{i}" for i in range(5)]
    fig = plot_attention(rng.random((5, 32)), tokens=tokens, generated_tokens=generated)
    ax = fig.axes[0]
    xlabels = [t.get_text() for t in ax.get_xticklabels()]
    assert len(xlabels) == 32
    assert xlabels[0] == " w0" and xlabels[30] == "\\n" and xlabels[31] == r"\$x\$"
    assert [t.get_text() for t in ax.get_yticklabels()] == generated

    fig = plot_attention(rng.random((5, 32)), tokens=tokens, max_labels=10)
    assert len(fig.axes[0].get_xticks()) < 20  # sparse integer ticks instead of 32 labels


def test_spans_and_salient_add_artists(rng):
    attn = rng.random((6, 50))
    plain = _artists(plot_attention(attn))
    spans = dialogue_spans(50)
    with_spans = _artists(plot_attention(attn, turn_spans=spans))
    assert with_spans[0] >= plain[0] + len(spans)  # one band per span
    assert with_spans[2] >= plain[2] + len(spans)  # labels "S0", "U0", "A0", ...
    band_labels = {t.get_text() for ax in plot_attention(attn, turn_spans=spans).axes for t in ax.texts}
    assert {"S0", "U0", "A0", "U1", "A1", "U2"} <= band_labels

    salient = [3, 17, 42]
    with_salient = _artists(plot_attention(attn, salient=salient))
    assert with_salient[0] >= plain[0] + len(salient)  # column outlines
    assert with_salient[1] > plain[1]  # marker row

    with_boundary = _artists(plot_attention(attn, prompt_len=40))
    assert with_boundary[1] == plain[1] + 1


def test_span_objects_with_attributes_are_accepted(rng):
    from dataclasses import dataclass

    @dataclass
    class Span:
        start: int
        end: int
        role: str
        turn: int

    fig = plot_attention(rng.random((3, 10)), turn_spans=[Span(0, 4, "user", 0),
                                                           Span(4, 10, "generation_prompt", 0)])
    assert {"U0", "G0"} <= {t.get_text() for t in fig.axes[1].texts}


def test_draws_into_given_axes_and_log_scale(rng, tmp_path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    left, _right = fig.subplots(1, 2)
    returned = plot_attention(rng.random((4, 20)) ** 4, ax=left, log_scale=True, salient=[2])
    assert returned is fig
    assert left.images and left.images[0].norm.__class__.__name__ == "LogNorm"


def test_attention_accepts_nan_and_constant_blocks(tmp_path):
    attn = np.zeros((3, 5))
    attn[0, 0] = np.nan
    out = tmp_path / "flat.png"
    plot_attention(attn, out=out)
    plot_attention(np.zeros((2, 4)), log_scale=True)
    assert png_size(out)[0] > 0


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"attn": np.zeros((2, 3, 4))}, "attn"),
        ({"attn": np.zeros(5)}, "attn"),
        ({"attn": np.zeros((0, 4))}, "attn"),
        ({"turn_spans": [{"start": 0, "end": 11, "role": "user", "turn": 0}]}, "turn_spans"),
        ({"turn_spans": [{"start": 4, "end": 4, "role": "user", "turn": 0}]}, "turn_spans"),
        ({"turn_spans": [{"start": 0, "end": 3, "role": "user"}]}, "turn_spans"),
        ({"salient": [10]}, "salient"),
        ({"salient": [-1]}, "salient"),
        ({"prompt_len": 11}, "prompt_len"),
        ({"tokens": ["a"] * 9}, "tokens"),
        ({"generated_tokens": ["a"] * 2}, "generated_tokens"),
    ],
)
def test_attention_invalid_input_names_the_argument(kwargs, argument):
    kwargs = {"attn": np.ones((3, 10)) / 10, **kwargs}
    with pytest.raises(ValueError, match=argument):
        plot_attention(kwargs.pop("attn"), **kwargs)


# --- reward plots -----------------------------------------------------------------------------


def test_reward_components_one_subplot_per_present_key(tmp_path, rng):
    history = [
        {"step": i, "reward": float(rng.normal()), "coverage": float(rng.random()),
         "focus": -2.0 + 0.01 * i, "repetition": float(rng.random() * 0.1), "lr": 1e-6}
        for i in range(50)
    ]
    history[7].pop("coverage")  # a gap, not an error
    out = tmp_path / "history.png"
    fig = plot_reward_components(history, out=out, title="run")
    assert [ax.get_label() for ax in fig.axes] == ["reward", "coverage", "focus", "repetition", "lr"]
    assert all(len(ax.lines) == 2 for ax in fig.axes)  # raw + moving average past 20 points
    width, height = png_size(out)
    assert 900 <= width <= 1600 and 1000 <= height <= 2200, (width, height)

    short = plot_reward_components([{"coverage": 0.5}, {"coverage": 0.7}])
    assert [ax.get_label() for ax in short.axes] == ["coverage"]
    assert list(short.axes[0].lines[0].get_xdata()) == [0, 1]  # no "step": list index


def test_turn_rewards_bars(tmp_path):
    scores = [{"turn": t, "coverage": 0.5 + 0.1 * t, "focus": -1.5, "repetition": 0.05 * t,
               "reward": 0.2 * t - 0.1} for t in range(4)]
    out = tmp_path / "turns.png"
    fig = plot_turn_rewards(scores, out)
    ax = fig.axes[0]
    assert len(ax.containers) == 4 and all(len(c) == 4 for c in ax.containers)
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"turn {t}" for t in range(4)]
    width, height = png_size(out)
    assert 800 <= width <= 2600 and 400 <= height <= 900, (width, height)


@pytest.mark.parametrize(
    ("function", "argument", "bad"),
    [
        (plot_reward_components, "history", []),
        (plot_reward_components, "history", [{"step": 1}]),
        (plot_reward_components, "history", {"reward": [1, 2]}),
        (plot_reward_components, "history", [{"reward": 1.0}, 3.0]),
        (plot_turn_rewards, "turn_scores", []),
        (plot_turn_rewards, "turn_scores", [{"turn": 0, "role": "user"}]),
    ],
)
def test_reward_plots_reject_bad_input(function, argument, bad):
    with pytest.raises(ValueError, match=argument):
        function(bad)


def test_import_is_light():
    code = "import sys, vllm_attncap.viz; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
