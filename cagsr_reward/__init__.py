"""cagsr_reward: CAGSR rewards from attention maps (numpy only at import time).

The reward math lives here and depends on numpy alone; engines, tokenizers and trainers plug in from outside
(`cagsr_reward.sources`, `cagsr_reward.integrations`), never the other way round. The one value that crosses into
the SDK is :class:`~cagsr_reward.attention.CapturedAttention`; this package never imports the capture plugin.
"""

__version__ = "0.2.0"

from .advantages import block_advantages, turn_advantages
from .aggregate import ElidedBlock, aggregate, elide, history_block
from .answers import ANSWER_MARKERS, find_answer_span
from .attention import CapturedAttention, as_captured_attention
from .config import MODES, CAGSRConfig, resolve_sink
from .core import (
    coverage,
    entropy_floor,
    focus,
    grounding,
    history_repetition,
    renormalise,
    repetition,
    returns,
    row_entropy,
)
from .scoring import (
    CoTScore,
    DialogueScore,
    TurnInput,
    TurnScore,
    score_cot,
    score_dialogue,
    score_turn,
)

__all__ = [
    "ANSWER_MARKERS",
    "CAGSRConfig",
    "CapturedAttention",
    "CoTScore",
    "DialogueScore",
    "ElidedBlock",
    "MODES",
    "TurnInput",
    "TurnScore",
    "__version__",
    "aggregate",
    "as_captured_attention",
    "block_advantages",
    "coverage",
    "elide",
    "entropy_floor",
    "find_answer_span",
    "focus",
    "grounding",
    "history_block",
    "history_repetition",
    "renormalise",
    "repetition",
    "resolve_sink",
    "returns",
    "row_entropy",
    "score_cot",
    "score_dialogue",
    "score_turn",
    "turn_advantages",
]
