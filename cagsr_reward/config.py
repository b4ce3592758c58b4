"""`CAGSRConfig`: every hyper-parameter of the CAGSR / CAGSR-vLLM-MTC reward in one frozen dataclass.

The papers (CAGSR, arXiv:2502.10482, and its multi-turn extension CAGSR-vLLM-MTC) name the hyper-parameters but
publish almost no values; where a value is missing the default below is ours and says so. `docs/method.md` lists
every default with its source.
numpy-free on purpose: importing the config must cost nothing.
"""

from __future__ import annotations

import dataclasses
import math
import re
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

__all__ = [
    "CAGSRConfig", "DEFAULT_LAYERS", "ELISION_N_MAX", "ELISION_WINDOW", "MODES", "resolve_layers", "resolve_sink",
]

MODES = ("single", "multi", "cot")
COLUMNS = ("content", "all")
REPETITIONS = ("self_and_copy", "paper")
COT_EPISODES = ("mean", "sum")
COT_ANSWERS = ("sentence", "rest")
COT_GROUNDINGS = ("all", "reasoning")
COT_FLOORS = ("turn", "block")
BLOCK_FOCUS = ("summed", "rows")

#: The long-history elision defaults (MTC §5.1, method.md "Long histories"), defined here once: the history length
#: above which columns are elided, and the most recent positions always kept when eliding.
ELISION_N_MAX = 1024
ELISION_WINDOW = 512

#: Layers of the default band: the last eight decoder layers, all of them for a model with fewer (chosen on the
#: selection split, docs/method.md).
DEFAULT_LAYERS = "last:8"


def resolve_layers(layers: Any, num_layers: int | None) -> Any:
    """A layer selection with ``"last:K"`` turned into model layer ids ``(-K', ..., -1)``, ``K' = min(K,
    num_layers)``; ``"all"`` and tuples are returned unchanged. Needs `num_layers` for ``"last:K"`` unless K is 1.

    Example:
        >>> resolve_layers("last:3", 30), resolve_layers("last:8", 2), resolve_layers((-1,), None)
        ((-3, -2, -1), (-2, -1), (-1,))
    """
    if isinstance(layers, str) and layers.startswith("last:"):
        k = int(layers.split(":", 1)[1])
        if num_layers is None:
            if k == 1:
                return (-1,)
            raise ValueError(f"layers: {layers!r} needs the model's number of layers, which this capture does not give")
        return tuple(range(-min(k, int(num_layers)), 0))
    return layers


LayerSpec = Union[Literal["all"], str, tuple[int, ...]]
SinkSpec = Union[Literal["auto"], int]


def _is_int(value: Any) -> bool:
    # bool is an int subclass; True as a layer index or a sink count is always a mistake.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _index_spec(name: str, value: Any) -> LayerSpec:
    """Normalise a layer/head selection: ``"all"`` or a non-empty tuple of ints (negatives allowed)."""
    if isinstance(value, str):
        if value == "all":
            return "all"
        if name == "layers" and re.fullmatch(r"last:[1-9][0-9]*", value):
            return value
        hint = "'all', 'last:K' (K >= 1)" if name == "layers" else "'all'"
        raise ValueError(f"{name}: expected {hint} or a sequence of ints, got {value!r}")
    if _is_int(value):
        return (int(value),)
    if not isinstance(value, Sequence) or len(value) == 0:
        raise ValueError(f"{name}: expected 'all' or a non-empty sequence of ints, got {value!r}")
    if not all(_is_int(v) for v in value):
        raise ValueError(f"{name}: expected 'all' or a sequence of ints, got {value!r}")
    return tuple(int(v) for v in value)


def resolve_sink(sink: SinkSpec, *, first_token_id: int | None = None, bos_token_id: int | None = None) -> int:
    r"""
    Number of leading history columns to drop as attention sinks.

    ``sink="auto"`` drops position 0 exactly when it is known to hold the BOS token
    (``first_token_id == bos_token_id``, both given); when either id is unknown nothing is dropped (``0``), because
    the method (method.md, "One turn's reward") only names BOS as a sink. An int is returned unchanged.

    Args:
        sink (`"auto"` or `int`):
            The configured sink rule.
        first_token_id (`int` or `None`, *optional*, defaults to `None`):
            Token id at history position 0.
        bos_token_id (`int` or `None`, *optional*, defaults to `None`):
            The tokenizer's BOS id (`None` when the tokenizer has none).

    Returns:
        `int`: the number of sink columns, ``>= 0``.

    Example:
    ```python
    >>> resolve_sink("auto", first_token_id=1, bos_token_id=1)
    1
    >>> resolve_sink("auto", first_token_id=7, bos_token_id=1)
    0
    >>> resolve_sink(2)
    2

    ```
    """
    if sink == "auto":
        if first_token_id is not None and bos_token_id is not None and int(first_token_id) == int(bos_token_id):
            return 1
        return 0
    if not _is_int(sink) or sink < 0:
        raise ValueError(f"sink: expected 'auto' or an int >= 0, got {sink!r}")
    return int(sink)


@dataclasses.dataclass(frozen=True)
class CAGSRConfig:
    r"""
    Hyper-parameters of the turn reward $R_t = \alpha C_t + \beta F_t - \gamma\,\mathrm{rep}_t + \eta G_t$ and of the
    episode returns built from it (method.md). All fields are validated on construction; a bad value raises `ValueError`
    naming the field and what it accepts.

    Args:
        alpha (`float`, defaults to `1.0`): weight of coverage $C$. Our choice (papers: "grid search", no value).
        beta (`float`, defaults to `0.0`): weight of focus $F = -\bar h$. Chosen on the selection split (0 and 0.1
            tied at the chosen span; the tie went to 0, docs/method.md §6); `paper()` keeps 0.1.
        gamma (`float`, defaults to `0.5`): weight of the repetition penalty (0.5 and 1.0 tried on the selection
            split; 0.5 kept).
        eta (`float`, defaults to `4.0`): weight of grounding $G$, the reply's pointwise mutual information with its
            history per token, $\frac{1}{T + T_0}\sum_s [\log p(y_s \mid \text{history}, y_{<s}) - \log p(y_s \mid
            \text{nothing}, y_{<s})]$, under the scoring model (ours, not the papers'; chosen with `grounding_tokens`
            and `cot_grounding` on the selection split, docs/method.md §6). With ``eta > 0`` every scoring call needs both
            log-probability vectors (``score_turn(..., logprobs=, prior_logprobs=)``; the TRL reward computes them
            with ``likelihood=HFLikelihood(model)`` or a source's ``logprobs``, or reads its ``attncap_logprobs`` /
            ``attncap_prior_logprobs`` columns); `CAGSRConfig.attention_only()` and `paper()` set it to 0.
        grounding_tokens (`float`, defaults to `128.0`): $T_0$ of the grounding term, pseudo-tokens of zero PMI
            added to its mean, $G = \sum_s \mathrm{PMI}_s / (T + T_0)$ (`core.grounding`): with 0 (the mean PMI) a
            reply cut after a few tokens scores above the whole reply; chosen on the selection split (docs/method.md
            §6). At 128 and replies of 10-50 tokens, $\eta G$ is close to the whole reply's PMI over 32.
        cot_grounding (`str`, defaults to `"all"`): the CoT tokens the grounding term covers: `"all"`, or
            `"reasoning"` = every block but the answer span's (the answer's PMI with the problem pays most when the
            answer comes before any reasoning); chosen on the selection split (docs/method.md §6).
        ngram (`int`, defaults to `3`): n of the repeated n-grams (method.md).
        h0 (`float`, defaults to `1.64`): entropy floor at turn 0, nats (MTC §5.2 names it, gives no value).
        kappa (`float`, defaults to `0.65`): floor increase per turn, nats (MTC §5.2). Both calibrated on observed
            entropies of real replies on the selection split (`cagsr_reward.validity.calibrate_entropy_floor`, 10%
            quantile per turn); they only matter when ``beta > 0``.
        layers (`"all"`, `"last:K"` or `tuple[int, ...]`, defaults to `DEFAULT_LAYERS`): model layers averaged
            (negative ids count from the last layer; ``"last:K"`` = the last K layers, all of a smaller model). CAGSR: "the final decoder layers (averaging per-layer and per-head)"; the band
            width was chosen on the selection split (docs/method.md). `CAGSRConfig.paper()` uses `(-1,)` (MTC §6).
        heads (`"all"` or `tuple[int, ...]`, defaults to `"all"`): query heads averaged (MTC §3: all heads).
        sink (`"auto"` or `int`, defaults to `"auto"`): leading sink columns dropped; `"auto"` = position 0 when it is
            the BOS token (method.md), see `resolve_sink`.
        mode (`str`, defaults to `"multi"`): `"single"` (CAGSR: self repetition), `"multi"` (MTC dialogue: history
            repetition) or `"cot"` (MTC §5.3). Ours: the MTC formulation, of which one turn is a special case.
        cot_block (`int`, defaults to `5`): CoT tokens per block/turn (MTC §5.3: "every 5 tokens").
        final_answer_weight (`float`, defaults to `2.0`): $w$ of the CoT answer turn, must be > 1 (MTC §5.3/§6 say
            "higher", no value; 2.0 is ours).
        n_max (`int`, defaults to `1024`): history length above which columns are elided (MTC §5.1).
        window (`int`, defaults to `512`): most recent positions always kept when eliding (MTC §5.1).
        discount (`float`, defaults to `1.0`): $\delta$ of the return-to-go (MTC §6: 1.0).
        history_coverage (`bool`, defaults to `True`): `False` is the "No History Coverage" ablation (MTC §6.3):
            coverage counts only salient positions inside the current user turn.
        entropy_floor (`bool`, defaults to `True`): `False` is the "No Entropy-Clamping" ablation (MTC §6.3).
        uniform_turn_weights (`bool`, defaults to `False`): `True` is the uniform-weights ablation (MTC §6.3): every
            turn, the CoT answer included, gets $w_t = 1$. The non-ablated default is the paper's (§6): $w_t = 1$ for
            dialogue turns and CoT reasoning blocks, `final_answer_weight` for the CoT answer turn.
        salient_roles (`tuple[str, ...]` or `None`, defaults to `("user", "assistant")`): chat roles whose message
            content holds the salient positions (and, with ``columns="content"``, the attention distribution). `None`
            = every message (the papers' literal "the full history"). Ours: the system prompt is instructions, not
            conversation (docs/method.md).
        columns (`str`, defaults to `"content"`): history columns of the attention distribution. `"content"`: the
            content tokens of the `salient_roles` messages only; sinks, chat-template tokens and the system prompt are
            dropped and each row is renormalised over the rest. `"all"`: every column but the sinks (papers).
        repetition (`str`, defaults to `"self_and_copy"`): `"self_and_copy"`: self repetition (n = `ngram`) in every
            mode plus, in multi/cot mode, copying of `copy_ngram`-token spans of the history; `"paper"`: history
            repetition (n = `ngram`) in multi/cot mode and self repetition in single mode only (MTC §3 as written).
        copy_ngram (`int`, defaults to `8`): span length, tokens, of the history-copy term (6 and 8 tried on the
            selection split; reusing a content word, a shorter span, is free).
        cot_episode (`str`, defaults to `"mean"`): CoT episode reward: `"mean"` = the weighted mean
            $\sum_b w_b R_b / \sum_b w_b$ (does not grow with the number of blocks); `"sum"` = $\sum_b w_b R_b$.
        cot_answer (`str`, defaults to `"sentence"`): CoT answer span: `"sentence"` = from the first answer marker to
            the end of its sentence; `"rest"` = every token after the last marker.
        cot_floor (`str`, defaults to `"turn"`): the CoT entropy floor's index: `"turn"` = the dialogue turn (a chain
            of thought is one turn, so every block gets $H_0$); `"block"` = the block index (rises every 5 tokens).
        block_focus (`str`, defaults to `"summed"`): CoT block focus: `"summed"` = minus the entropy of the block's
            summed (renormalised) attention (MTC §5.3: "we sum the attention weights produced over the preceding
            block"); `"rows"` = minus the mean row entropy (0.2).

    Example:
    ```python
    >>> cfg = CAGSRConfig(alpha=2.0, layers=[-2, -1])
    >>> cfg.layers, cfg.replace(mode="cot").mode
    ((-2, -1), 'cot')
    >>> CAGSRConfig.from_dict(cfg.to_dict()) == cfg
    True

    ```
    """

    alpha: float = 1.0
    beta: float = 0.0
    gamma: float = 0.5
    eta: float = 4.0
    ngram: int = 3
    h0: float = 1.64
    kappa: float = 0.65
    layers: LayerSpec = DEFAULT_LAYERS
    heads: LayerSpec = "all"
    sink: SinkSpec = "auto"
    mode: str = "multi"
    cot_block: int = 5
    final_answer_weight: float = 2.0
    n_max: int = ELISION_N_MAX
    window: int = ELISION_WINDOW
    discount: float = 1.0
    history_coverage: bool = True
    entropy_floor: bool = True
    uniform_turn_weights: bool = False
    salient_roles: Union[tuple[str, ...], None] = ("user", "assistant")
    columns: str = "content"
    repetition: str = "self_and_copy"
    copy_ngram: int = 8
    cot_episode: str = "mean"
    cot_answer: str = "sentence"
    cot_floor: str = "turn"
    block_focus: str = "summed"
    grounding_tokens: float = 128.0
    cot_grounding: str = "all"

    @classmethod
    def paper(cls, **changes: Any) -> CAGSRConfig:
        """The papers' literal reading (the 0.2 defaults): last layer, every history column but the BOS sink, every
        message salient, history repetition replacing self repetition in multi/cot mode, CoT blocks summed with the
        floor indexed per block and the answer after the last marker; block focus is the entropy of the block's summed
        attention, as MTC §5.3 writes. Keyword arguments override fields.

        Example:
            >>> CAGSRConfig.paper().layers, CAGSRConfig.paper(gamma=1.0).gamma
            ((-1,), 1.0)
        """
        base = dict(
            alpha=1.0, beta=0.1, gamma=0.5, eta=0.0, ngram=3, h0=0.5, kappa=0.25, layers=(-1,), salient_roles=None,
            columns="all", repetition="paper", cot_episode="sum", cot_answer="rest", cot_floor="block",
            block_focus="summed",
        )
        base.update(changes)
        return cls(**base)

    @classmethod
    def attention_only(cls, **changes: Any) -> CAGSRConfig:
        """The defaults without the grounding term (``eta=0``): a reward computed from the attention and the token
        ids alone, for a caller that has no log-probabilities. Keyword arguments override fields.

        Example:
            >>> CAGSRConfig.attention_only().eta, CAGSRConfig().eta
            (0.0, 4.0)
        """
        return cls(**{"eta": 0.0, **changes})

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma", "eta", "h0", "kappa", "grounding_tokens"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: expected a finite float >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        for name, low in (("ngram", 1), ("cot_block", 1), ("n_max", 1), ("window", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.window > self.n_max:
            raise ValueError(f"window: expected an int in [1, n_max={self.n_max}], got {self.window!r}")
        w = self.final_answer_weight
        if not _is_real(w) or not math.isfinite(w) or w <= 1:
            raise ValueError(f"final_answer_weight: expected a finite float > 1, got {w!r}")
        object.__setattr__(self, "final_answer_weight", float(w))
        d = self.discount
        if not _is_real(d) or not (0.0 <= d <= 1.0):
            raise ValueError(f"discount: expected a float in [0, 1], got {d!r}")
        object.__setattr__(self, "discount", float(d))
        object.__setattr__(self, "layers", _index_spec("layers", self.layers))
        object.__setattr__(self, "heads", _index_spec("heads", self.heads))
        if self.sink != "auto" and (not _is_int(self.sink) or self.sink < 0):
            raise ValueError(f"sink: expected 'auto' or an int >= 0, got {self.sink!r}")
        if self.sink != "auto":
            object.__setattr__(self, "sink", int(self.sink))
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        for name, allowed in (("columns", COLUMNS), ("repetition", REPETITIONS), ("cot_episode", COT_EPISODES),
                              ("cot_answer", COT_ANSWERS), ("cot_floor", COT_FLOORS), ("block_focus", BLOCK_FOCUS),
                              ("cot_grounding", COT_GROUNDINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        if not _is_int(self.copy_ngram) or self.copy_ngram < 1:
            raise ValueError(f"copy_ngram: expected an int >= 1, got {self.copy_ngram!r}")
        object.__setattr__(self, "copy_ngram", int(self.copy_ngram))
        roles = self.salient_roles
        if roles is not None:
            if isinstance(roles, str) or not isinstance(roles, Sequence) or not roles or not all(
                isinstance(r, str) and r for r in roles
            ):
                raise ValueError(f"salient_roles: expected None or a non-empty sequence of role names, got {roles!r}")
            object.__setattr__(self, "salient_roles", tuple(roles))
        for name in ("history_coverage", "entropy_floor", "uniform_turn_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CAGSRConfig:
        """Build a config from a mapping (e.g. parsed JSON/YAML); unknown keys raise `ValueError` naming them."""
        if not isinstance(data, Mapping):
            raise ValueError(f"data: expected a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"data: unknown CAGSRConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict (tuples become lists); `from_dict(to_dict())` round-trips."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes: Any) -> CAGSRConfig:
        """A copy with `changes` applied (validated like a new config)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"changes: unknown CAGSRConfig field(s) {unknown}")
        return dataclasses.replace(self, **changes)
