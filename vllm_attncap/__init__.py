"""vllm_attncap: per-request attention capture for vLLM."""
__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point (placeholder until the backend lands)."""
