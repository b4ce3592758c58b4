"""`CAGSRConfig`: every hyper-parameter of the CAGSR / CAGSR-vLLM-MTC reward in one frozen dataclass.

The papers (CAGSR, arXiv:2502.10482, and its multi-turn extension CAGSR-vLLM-MTC) name the hyper-parameters but
publish almost no values; where a value is missing the default below is ours and says so. `docs/method.md` lists
every default with its source.
numpy-free on purpose: importing the config must cost nothing.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

__all__ = ["CAGSRConfig", "MODES", "resolve_sink", "ELISION_N_MAX", "ELISION_WINDOW"]

MODES = ("single", "multi", "cot")

#: The long-history elision defaults (MTC §5.1, method.md "Long histories"), defined here once: the history length
#: above which columns are elided, and the most recent positions always kept when eliding.
ELISION_N_MAX = 1024
ELISION_WINDOW = 512

LayerSpec = Union[Literal["all"], tuple[int, ...]]
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
        raise ValueError(f"{name}: expected 'all' or a sequence of ints, got {value!r}")
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
    Hyper-parameters of the turn reward $R_t = \alpha C_t + \beta F_t - \gamma\,\mathrm{rep}_t$ and of the episode
    returns built from it (method.md). All fields are validated on construction; a bad value raises `ValueError`
    naming the field and what it accepts.

    Args:
        alpha (`float`, defaults to `1.0`): weight of coverage $C$. Our choice (papers: "grid search", no value).
        beta (`float`, defaults to `0.1`): weight of focus $F = -\bar h$. Our choice: $F$ lies in
            $[-\ln P, 0]$ (about $-7$ for 1,024 positions), so 0.1 puts it on the scale of $C, \mathrm{rep} \in [0,1]$.
        gamma (`float`, defaults to `0.5`): weight of the repetition penalty. Our choice.
        ngram (`int`, defaults to `3`): n of the repeated n-grams (method.md).
        h0 (`float`, defaults to `0.5`): entropy floor at turn 0, nats (MTC §5.2 names it, gives no value; ours).
        kappa (`float`, defaults to `0.25`): floor increase per turn, nats (MTC §5.2; value ours).
        layers (`"all"` or `tuple[int, ...]`, defaults to `(-1,)`): model layers averaged; `-1` = last layer (MTC §6).
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
    beta: float = 0.1
    gamma: float = 0.5
    ngram: int = 3
    h0: float = 0.5
    kappa: float = 0.25
    layers: LayerSpec = (-1,)
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

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma", "h0", "kappa"):
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
