"""Heatmaps of captured attention and plots of CAGSR rewards (matplotlib, Agg).

Three functions, each returning a :class:`matplotlib.figure.Figure` and writing a PNG when
``out`` is given:

* :func:`plot_attention`: one (generated tokens x context positions) attention block, with
  the prompt/generation boundary, coloured bands for the conversation's turns and markers
  on the salient positions.
* :func:`plot_reward_components`: reward components over training steps.
* :func:`plot_turn_rewards`: per-turn components of one dialogue as grouped bars.

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas, not through pyplot:
nothing is registered globally (no leak when plotting in a loop), the user's pyplot backend
is left alone, and Jupyter still displays a returned figure. matplotlib itself is imported
inside the functions, so ``import vllm_attncap.viz`` costs nothing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["plot_attention", "plot_reward_components", "plot_turn_rewards"]

# Colours per message role (colour-blind friendly "tab" palette); other roles are grey.
ROLE_COLOURS = {
    "system": "#7f7f7f",
    "user": "#1f77b4",
    "assistant": "#ff7f0e",
    "generation_prompt": "#2ca02c",
}
ROLE_LETTERS = {"system": "S", "user": "U", "assistant": "A", "generation_prompt": "G"}
SALIENT_COLOUR = "#d62728"
# Components in the order method.md introduces them; anything else numeric follows.
COMPONENT_ORDER = ("reward", "coverage", "focus", "repetition")
_DPI = 150
_TOKEN_CHARS = 14  # longer token strings are cut with an ellipsis


# --- helpers ---------------------------------------------------------------------------------


def _new_figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out: str | os.PathLike[str] | None) -> None:
    if out is not None:
        fig.savefig(os.fspath(out), dpi=_DPI, bbox_inches="tight")


def _token_label(token: Any) -> str:
    """A token string made printable on one line: byte-level BPE markers become spaces and
    newlines, whitespace is made visible, ``$`` cannot start mathtext, long pieces are cut."""
    text = str(token).replace("Ġ", " ").replace("Ċ", "\n").replace("ĉ", "\t")
    text = text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if text.strip() == "":
        text = "␣" * len(text) if text else "∅"
    if len(text) > _TOKEN_CHARS:
        text = text[: _TOKEN_CHARS - 1] + "…"
    return text.replace("$", r"\$")


def _label_fontsize(axis_points: float, count: int) -> float:
    """Font size that lets ``count`` one-line labels sit side by side along ``axis_points``."""
    return float(np.clip(0.75 * axis_points / max(count, 1), 4.5, 9.0))


def _span_field(span: Any, key: str) -> Any:
    if isinstance(span, Mapping):
        return span[key]
    return getattr(span, key)


def _check_spans(turn_spans: Any, num_columns: int) -> list[tuple[int, int, str, int]]:
    spans = []
    for index, span in enumerate(turn_spans):
        try:
            start, end = int(_span_field(span, "start")), int(_span_field(span, "end"))
            role = str(_span_field(span, "role"))
            turn = int(_span_field(span, "turn"))
        except (KeyError, AttributeError, TypeError, ValueError) as exc:
            raise ValueError(
                f"turn_spans[{index}] must have integer 'start', 'end', 'turn' and a 'role', "
                f"got {span!r}"
            ) from exc
        if not 0 <= start < end <= num_columns:
            raise ValueError(
                f"turn_spans[{index}] covers [{start}, {end}), which is empty or outside the "
                f"{num_columns} context positions of attn"
            )
        spans.append((start, end, role, turn))
    return spans


def _check_labels(labels: Any, expected: int, name: str, axis: str) -> list[str] | None:
    if labels is None:
        return None
    labels = list(labels)
    if len(labels) != expected:
        raise ValueError(f"{name} has {len(labels)} entries but attn has {expected} {axis}")
    return [_token_label(t) for t in labels]


def _set_axis_labels(
    axis, labels: list[str] | None, count: int, max_labels: int, rotate: bool, axis_points: float
) -> bool:
    """Label every position when they fit, else a few integer ticks; True if labelled."""
    from matplotlib.ticker import MaxNLocator

    if labels is not None and count <= max_labels:
        axis.set_ticks(np.arange(count))
        axis.set_ticklabels(
            labels, fontsize=_label_fontsize(axis_points, count), rotation=90 if rotate else 0
        )
        return True
    axis.set_major_locator(MaxNLocator(nbins=12, integer=True))
    return False


# --- attention heatmap -----------------------------------------------------------------------


def plot_attention(
    attn: Any,
    *,
    tokens: Sequence[str] | None = None,
    generated_tokens: Sequence[str] | None = None,
    prompt_len: int | None = None,
    turn_spans: Sequence[Mapping[str, Any]] | None = None,
    salient: Sequence[int] | None = None,
    title: str | None = None,
    out: str | os.PathLike[str] | None = None,
    ax: Any = None,
    log_scale: bool = False,
    max_labels: int = 60,
    cmap: str = "viridis",
):
    """Heatmap of one attention block: generated tokens (rows) over context positions (columns).

    Row ``s`` is the attention of generated token ``s`` over context positions
    ``0..C-1`` (the prompt, i.e. the whole dialogue history in multi-turn mode, possibly
    followed by earlier generated tokens), e.g. ``CapturedOutput.attention`` reduced to 2-D.

    Layout, top to bottom: a band strip with one coloured bar per entry of ``turn_spans``
    (labelled ``S0``, ``U0``, ``A0``, ``U1``, ... = role letter + dialogue turn) and a row of
    red markers over the ``salient`` positions; then the heatmap, with a dashed line
    between position ``prompt_len - 1`` and ``prompt_len``, red outlines around salient
    columns and a colourbar on the right.

    Args:
        attn (array-like, shape ``(T, C)``): attention weights (a numpy array or anything
            ``np.asarray`` takes, e.g. a CPU tensor). NaN cells are drawn blank.
        tokens (sequence of `str`, length ``C``, *optional*): context token strings, used as
            column labels when ``C <= max_labels`` (byte-level markers ``Ġ``/``Ċ`` are shown as
            space / ``\\n``).
        generated_tokens (sequence of `str`, length ``T``, *optional*): row labels, same rule.
        prompt_len (`int`, *optional*): number of prompt positions, ``0 <= prompt_len <= C``.
        turn_spans (sequence of mappings, *optional*): ``{"start", "end", "role", "turn"}`` with
            ``0 <= start < end <= C`` (end exclusive); objects with those attributes (e.g.
            ``vllm_attncap.dialogue.Span``) work too. Roles ``system``, ``user``,
            ``assistant``, ``generation_prompt`` have fixed colours, others are grey.
        salient (sequence of `int`, *optional*): salient context positions in ``[0, C)``.
        title (`str`, *optional*): figure title.
        out (path, *optional*): write a PNG there (dpi 150, tight bounding box).
        ax (matplotlib Axes, *optional*): draw into this Axes (band strip and colourbar are
            carved out of it) instead of a new figure.
        log_scale (`bool`, defaults to `False`): logarithmic colour scale, which shows the
            long tail of small weights; non-positive cells clip to the smallest shown value.
        max_labels (`int`, defaults to 60): most positions on an axis that get one label each.
        cmap (`str`, defaults to ``"viridis"``): matplotlib colour map.

    Returns:
        matplotlib.figure.Figure: the figure drawn into (``ax.figure`` when ``ax`` is given).

    Raises:
        ValueError: naming the argument when ``attn`` is not a non-empty 2-D array, a label
            list has the wrong length, ``prompt_len`` or a ``salient`` position is out of range,
            or a ``turn_spans`` entry is malformed or out of range.

    Example:
        >>> import numpy as np
        >>> attn = np.random.default_rng(0).dirichlet(np.ones(12), size=4)
        >>> fig = plot_attention(attn, prompt_len=10, salient=[3, 5],
        ...                      turn_spans=[{"start": 0, "end": 4, "role": "system", "turn": 0},
        ...                                  {"start": 4, "end": 10, "role": "user", "turn": 0}])
        >>> [a.get_label() for a in fig.axes]
        ['attention', 'bands', 'colorbar']
    """
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.patches import Rectangle
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    block = np.asarray(attn, dtype=np.float64)
    if block.ndim != 2 or block.size == 0:
        raise ValueError(
            f"attn must be a non-empty 2-D array (generated tokens, context positions), "
            f"got shape {block.shape}"
        )
    num_rows, num_cols = block.shape
    if max_labels < 0:
        raise ValueError(f"max_labels must be >= 0, got {max_labels}")
    col_labels = _check_labels(tokens, num_cols, "tokens", "context positions (columns)")
    row_labels = _check_labels(generated_tokens, num_rows, "generated_tokens", "rows")
    if prompt_len is not None and not 0 <= int(prompt_len) <= num_cols:
        raise ValueError(f"prompt_len must be in [0, {num_cols}], got {prompt_len}")
    spans = _check_spans(turn_spans, num_cols) if turn_spans is not None else []
    salient_cols = np.unique(np.asarray(list(salient) if salient is not None else [], dtype=np.int64))
    if salient_cols.size and (salient_cols[0] < 0 or salient_cols[-1] >= num_cols):
        raise ValueError(
            f"salient positions must be in [0, {num_cols}), got min {salient_cols[0]} "
            f"and max {salient_cols[-1]}"
        )

    if ax is None:
        cols_shown = min(num_cols, max_labels) if col_labels is not None else min(num_cols, 40)
        rows_shown = min(num_rows, max_labels) if row_labels is not None else min(num_rows, 30)
        width = float(np.clip(3.5 + 0.17 * cols_shown, 7.0, 20.0))
        height = float(np.clip(2.0 + 0.2 * rows_shown, 3.5, 14.0)) + (0.6 if spans or salient_cols.size else 0)
        fig = _new_figure((width, height))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    ax.set_label("attention")

    finite = block[np.isfinite(block)]
    vmax = float(finite.max()) if finite.size else 1.0
    if log_scale:
        positive = finite[finite > 0]
        vmax = vmax if vmax > 0 else 1.0
        vmin = max(float(positive.min()) if positive.size else vmax * 1e-6, vmax * 1e-6)
        norm = LogNorm(vmin=vmin, vmax=vmax, clip=True)
        shown = np.where(np.isfinite(block), np.maximum(block, vmin), np.nan)
    else:
        vmin = min(0.0, float(finite.min())) if finite.size else 0.0
        norm = Normalize(vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1.0)
        shown = block
    # Past a few thousand columns each pixel covers several positions: let Agg average them
    # rather than drop whole positions.
    interpolation = "nearest" if max(num_rows, num_cols) <= 2000 else "antialiased"
    image = ax.imshow(
        np.ma.masked_invalid(shown), aspect="auto", interpolation=interpolation,
        cmap=cmap, norm=norm, origin="upper",
    )

    # The heatmap's extent in points, before the band strip and colourbar take their share.
    box = ax.get_position()
    width_points = fig.get_size_inches()[0] * box.width * 72.0 * 0.9
    height_points = fig.get_size_inches()[1] * box.height * 72.0 * 0.85
    labelled_cols = _set_axis_labels(
        ax.xaxis, col_labels, num_cols, max_labels, rotate=True, axis_points=width_points
    )
    _set_axis_labels(
        ax.yaxis, row_labels, num_rows, max_labels, rotate=False, axis_points=height_points
    )
    ax.set_xlabel("context position" + ("" if labelled_cols else " (index)"))
    ax.set_ylabel("generated token")

    if prompt_len is not None and 0 < prompt_len < num_cols:
        ax.axvline(prompt_len - 0.5, color="white", linestyle="--", linewidth=1.2, label="prompt_end")
    for start, _end, _role, _turn in spans[1:] if spans else []:
        ax.axvline(start - 0.5, color="white", linewidth=0.6, alpha=0.5, label="span_boundary")
    if salient_cols.size and num_cols <= 400:  # thinner columns than ~2 px: the markers suffice
        for col in salient_cols:
            ax.add_patch(Rectangle(
                (col - 0.5, -0.5), 1.0, num_rows, fill=False, edgecolor=SALIENT_COLOUR,
                linewidth=0.9, label="salient_outline",
            ))
    if labelled_cols and salient_cols.size:
        for col in salient_cols:
            tick = ax.get_xticklabels()[col]
            tick.set_color(SALIENT_COLOUR)
            tick.set_fontweight("bold")

    divider = make_axes_locatable(ax)
    top_ax = ax
    if spans or salient_cols.size:
        rows = (1 if spans else 0) + (1 if salient_cols.size else 0)
        band_ax = divider.append_axes("top", size=0.22 * rows, pad=0.05, sharex=ax)
        band_ax.set_label("bands")
        _draw_bands(band_ax, spans, salient_cols, num_cols, fig, prompt_len)
        top_ax = band_ax
    colourbar_ax = divider.append_axes("right", size=0.18, pad=0.1)
    colourbar_ax.set_label("colorbar")
    colourbar = fig.colorbar(image, cax=colourbar_ax)
    colourbar.set_label("attention" + (" (log)" if log_scale else ""))
    ax.set_xlim(-0.5, num_cols - 0.5)
    if title:
        top_ax.set_title(title)
    _save(fig, out)
    return fig


def _draw_bands(band_ax, spans, salient_cols, num_cols, fig, prompt_len) -> None:
    """Turn bands (upper row) and salient markers (lower row) above the heatmap."""
    from matplotlib.patches import Rectangle

    rows = []
    if spans:
        rows.append("turns")
    if salient_cols.size:
        rows.append("salient")
    band_ax.set_ylim(len(rows), 0)
    band_ax.set_yticks(np.arange(len(rows)) + 0.5)
    band_ax.set_yticklabels(rows, fontsize=7)
    band_ax.tick_params(axis="x", which="both", bottom=False, labelbottom=False)
    band_ax.tick_params(axis="y", length=0)
    for side in ("top", "right", "left", "bottom"):
        band_ax.spines[side].set_visible(False)

    # Width of one position in points, to decide whether a band's label fits inside it.
    width_in = fig.get_size_inches()[0] * band_ax.get_position().width
    points_per_col = width_in * 72.0 / max(num_cols, 1)
    if spans:
        row = rows.index("turns")
        for start, end, role, turn in spans:
            colour = ROLE_COLOURS.get(role, "#bcbd22")
            band_ax.add_patch(Rectangle(
                (start - 0.5, row + 0.1), end - start, 0.8, facecolor=colour, edgecolor="white",
                linewidth=0.8, label=f"band_{role}",
            ))
            label = f"{ROLE_LETTERS.get(role, role[:1].upper() or '?')}{turn}"
            if (end - start) * points_per_col >= 6.0 * len(label):
                band_ax.text((start + end - 1) / 2.0, row + 0.5, label, ha="center", va="center",
                             fontsize=7, color="white", fontweight="bold", clip_on=True)
    if salient_cols.size:
        row = rows.index("salient")
        band_ax.plot(salient_cols, np.full(salient_cols.shape, row + 0.5), linestyle="none",
                     marker="v", markersize=max(2.5, min(6.0, points_per_col * 0.8)),
                     color=SALIENT_COLOUR, label="salient_markers")
    if prompt_len is not None and 0 < prompt_len < num_cols:
        band_ax.axvline(prompt_len - 0.5, color="black", linestyle="--", linewidth=0.8)


# --- reward plots ----------------------------------------------------------------------------


def _numeric(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number


def _components(records: Sequence[Mapping[str, Any]], name: str, skip: tuple[str, ...]) -> list[str]:
    """Keys holding numbers in at least one record: known components first, then the rest."""
    if isinstance(records, Mapping) or not isinstance(records, Sequence) or len(records) == 0:
        raise ValueError(f"{name} must be a non-empty list of dicts, got {type(records).__name__}")
    found: list[str] = []
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise ValueError(f"{name}[{index}] must be a dict, got {type(record).__name__}")  # noqa: TRY004
        for key, value in record.items():
            if key not in skip and key not in found and _numeric(value) is not None:
                found.append(key)
    if not found:
        raise ValueError(f"{name} has no numeric component (e.g. {', '.join(COMPONENT_ORDER)})")
    known = [key for key in COMPONENT_ORDER if key in found]
    return known + [key for key in found if key not in COMPONENT_ORDER]


def _series(records, key) -> np.ndarray:
    values = [_numeric(record.get(key)) for record in records]
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def plot_reward_components(
    history: Sequence[Mapping[str, Any]],
    *,
    out: str | os.PathLike[str] | None = None,
    title: str | None = None,
):
    """Line plot per reward component over a run, one subplot each, sharing the step axis.

    Args:
        history (list of dicts): one dict per logged step, e.g.
            ``{"step": 10, "reward": 0.41, "coverage": 0.62, "focus": -2.3, "repetition": 0.05}``.
            Every numeric key other than ``"step"`` is a component (``reward``, ``coverage``,
            ``focus``, ``repetition`` first, others after in first-seen order); a key missing
            from some steps leaves a gap. The x axis is ``"step"`` when every dict has one,
            else the list index. Past 20 points a moving average is drawn over the raw line.
        out (path, *optional*): write a PNG there (dpi 150, tight bounding box).
        title (`str`, *optional*): figure title.

    Returns:
        matplotlib.figure.Figure: one Axes per component, labelled with its name.

    Raises:
        ValueError: ``history`` is empty, not a list of dicts, or has no numeric component.

    Example:
        >>> fig = plot_reward_components([{"step": 1, "reward": 0.2, "coverage": 0.5},
        ...                               {"step": 2, "reward": 0.3, "coverage": 0.6}])
        >>> [a.get_label() for a in fig.axes]
        ['reward', 'coverage']
    """
    components = _components(history, "history", skip=("step",))
    has_steps = all(_numeric(record.get("step")) is not None for record in history)
    x = _series(history, "step") if has_steps else np.arange(len(history), dtype=np.float64)

    fig = _new_figure((8.0, 1.9 * len(components) + 0.8))
    axes = fig.subplots(len(components), 1, sharex=True, squeeze=False)[:, 0]
    window = max(1, len(history) // 20)
    for index, (ax, key) in enumerate(zip(axes, components)):
        y = _series(history, key)
        colour = f"C{index}"
        smooth = len(history) > 20
        ax.plot(x, y, color=colour, alpha=0.35 if smooth else 1.0, linewidth=1.0,
                marker="o" if len(history) <= 30 else None, markersize=3, label=key)
        if smooth:
            ax.plot(x, _moving_average(y, window), color=colour, linewidth=1.8,
                    label=f"{key} (mean of {window})")
        ax.set_ylabel(key)
        ax.set_label(key)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step" if has_steps else "log entry")
    if title:
        axes[0].set_title(title)
    fig.align_ylabels(axes)
    fig.tight_layout()
    _save(fig, out)
    return fig


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` finite values (NaN gaps are skipped)."""
    finite = np.isfinite(y)
    sums = np.cumsum(np.where(finite, y, 0.0))
    counts = np.cumsum(finite)
    lagged_sums = np.concatenate([np.zeros(window), sums[:-window]])
    lagged_counts = np.concatenate([np.zeros(window), counts[:-window]])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (sums - lagged_sums) / (counts - lagged_counts)
    return np.where(finite, mean, np.nan)


def plot_turn_rewards(
    turn_scores: Sequence[Mapping[str, Any]],
    out: str | os.PathLike[str] | None = None,
    *,
    title: str | None = None,
):
    """Grouped bars of each turn's reward components for one dialogue.

    Args:
        turn_scores (list of dicts): one dict per turn, e.g.
            ``{"turn": 0, "coverage": 0.6, "focus": -2.1, "repetition": 0.0, "reward": 0.3}``.
            Every numeric key other than ``"turn"`` is a component (``reward``, ``coverage``,
            ``focus``, ``repetition`` first); ``"turn"`` labels the groups (list index when
            absent). Missing values leave an empty slot.
        out (path, *optional*): write a PNG there (dpi 150, tight bounding box).
        title (`str`, *optional*): figure title.

    Returns:
        matplotlib.figure.Figure: one Axes (label ``"turn_rewards"``) holding one bar
        container per component.

    Raises:
        ValueError: ``turn_scores`` is empty, not a list of dicts, or has no numeric component.

    Example:
        >>> fig = plot_turn_rewards([{"turn": 0, "coverage": 0.6, "reward": 0.3},
        ...                          {"turn": 1, "coverage": 0.4, "reward": 0.1}])
        >>> len(fig.axes[0].containers)
        2
    """
    components = _components(turn_scores, "turn_scores", skip=("turn",))
    turns = [record.get("turn", index) for index, record in enumerate(turn_scores)]
    num_turns, num_components = len(turn_scores), len(components)

    fig = _new_figure((float(np.clip(2.0 + 0.45 * num_turns * num_components, 6.0, 16.0)), 4.0))
    ax = fig.add_subplot()
    ax.set_label("turn_rewards")
    group = 0.8
    width = group / num_components
    positions = np.arange(num_turns, dtype=np.float64)
    for index, key in enumerate(components):
        offset = (index - (num_components - 1) / 2.0) * width
        values = _series(turn_scores, key)
        bars = ax.bar(positions + offset, np.nan_to_num(values, nan=0.0), width * 0.95,
                      label=key, color=f"C{index}")
        for bar, value in zip(bars, values):
            if math.isnan(value):
                bar.set_visible(False)
        if num_turns * num_components <= 40:
            ax.bar_label(bars, labels=[("" if math.isnan(v) else f"{v:.2f}") for v in values],
                         fontsize=6.5, padding=1.5)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(positions)
    ax.set_xticklabels([f"turn {t}" for t in turns])
    ax.set_ylabel("value")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(num_components, 6), loc="upper center",
              bbox_to_anchor=(0.5, -0.1), frameon=False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    _save(fig, out)
    return fig
