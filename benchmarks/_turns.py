"""One timed ``generate`` turn with capture, shared by the capture benchmarks (``cpu_capture.py``, ``capture_overhead.py``)."""

from __future__ import annotations

import time
import uuid


def random_prompts(rng, batch: int, prompt: int, vocab: int) -> list[dict]:
    """``batch`` prompts of ``prompt`` random token ids (fresh each turn, so prefix caching cannot help)."""
    return [{"prompt_token_ids": rng.integers(10, vocab - 10, size=prompt).tolist()} for _ in range(batch)]


def timed_turn(llm, rng, *, batch: int, prompt: int, vocab: int, spec: dict | None, max_tokens: int,
               check: bool = False) -> tuple[float, bool | None]:
    """Generate one batch (every request capturing with ``spec``, or none when ``spec`` is None).

    Returns the wall seconds of ``llm.generate`` and, with ``check``, whether the first request's capture came back
    without an error and holds finite, non-zero values (None without ``check`` or without capture). The captures
    are discarded after the turn.
    """
    import numpy as np
    from vllm import SamplingParams

    from vllm_attncap.store import discard_capture, read_capture

    keys, sps = [], []
    for _ in range(batch):
        extra = None
        if spec is not None:
            key = f"bench-{uuid.uuid4().hex}"
            keys.append(key)
            extra = {"attncap": {**spec, "key": key}}
        sps.append(SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0, detokenize=False,
                                  extra_args=extra))
    ps = random_prompts(rng, batch, prompt, vocab)
    t = time.perf_counter()
    outs = llm.generate(ps, sps, use_tqdm=False)
    dt = time.perf_counter() - t
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
    ok = None
    if check and keys:
        rec = read_capture(keys[0], max_tokens, delete=False)[0]
        a = rec.array
        ok = rec.error is None and a is not None and bool(np.isfinite(a).any()) and bool((a != 0).any())
    for k in keys:
        discard_capture(k)
    return dt, ok
