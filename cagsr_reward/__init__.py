"""cagsr_reward: CAGSR rewards from attention maps (numpy only at import time).

The reward math lives here and depends on numpy alone; engines, tokenizers and trainers plug in from outside
(`cagsr_reward.sources`, `cagsr_reward.integrations`), never the other way round.
"""

__version__ = "0.1.0"

from .aggregate import ElidedBlock, aggregate, elide, history_block
from .config import MODES, CAGSRConfig, resolve_sink
from .core import (
    coverage,
    entropy_floor,
    focus,
    history_repetition,
    renormalise,
    repetition,
    returns,
    row_entropy,
)
from .scoring import (
    ANSWER_MARKERS,
    CoTScore,
    DialogueScore,
    TurnInput,
    TurnScore,
    find_answer_span,
    score_cot,
    score_dialogue,
    score_turn,
)

__all__ = [
    "ANSWER_MARKERS",
    "CAGSRConfig",
    "CoTScore",
    "DialogueScore",
    "ElidedBlock",
    "MODES",
    "TurnInput",
    "TurnScore",
    "__version__",
    "aggregate",
    "coverage",
    "elide",
    "entropy_floor",
    "find_answer_span",
    "focus",
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
]
