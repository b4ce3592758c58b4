"""The capture plan of one engine step: which query rows to capture, for whom.

Built once per step by the metadata builder (``AttnCapMetadataBuilder.build``)
and attached to the attention metadata; every layer's ``Impl.forward`` reads it.

Row semantics (method.md, "Attention that produced a token"): for a request
with P prompt tokens, row ``s`` is the query at position ``P-1+s`` (a top-k
capture with ``prompt_start`` starts its rows earlier, at ``prompt_start-1``:
``RequestCapture.row_origin``). A step
schedules, for batch row ``i``, the query tokens ``qsl[i]:qsl[i+1]`` at
positions ``seq_len[i]-q_len[i] .. seq_len[i]-1``; the captured ones are those
at positions ``>= P-1`` (row 0 comes from the prefill step that holds the last
prompt token, whichever chunk that is). Positions are derived from this step's
metadata only, so chunked prefill, prefix-cache hits (``num_computed > 0`` at
first schedule), preemption with recompute (rows recomputed and rewritten) and
the runner's row reordering are all handled the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .tracker import CaptureTracker, RequestCapture

__all__ = ["RowBatch", "StepPlan", "build_step_plan"]


@dataclass
class RowBatch:
    """The captured rows of one request in one step."""

    rc: RequestCapture
    token_index: torch.Tensor  # (n,) indices into this step's query tokens
    q_pos: torch.Tensor  # (n,) absolute positions of the captured queries
    rows: list[int]  # row index s of each captured query
    ctx_len: int  # keys 0..ctx_len-1 are needed (= max(q_pos) + 1)
    block_table_row: torch.Tensor
    batch_row: int = -1  # this request's row in the step's batch (block table, seq_lens)
    #: ``token_index`` on the device of the queries (set by the first layer that captures this step)
    device_token_index: torch.Tensor | None = None
    #: stats of ``layer_head_mean``: the sum over the layers captured so far this step of the head-mean history rows
    layer_sum: torch.Tensor | None = None


@dataclass
class StepPlan:
    """The captured rows of one step (shared by the backends).

    Attributes:
        batches: one :class:`RowBatch` per captured request.
        layers: every layer some request of the step captures.
        own_layers: the layers of the KV-cache group whose builder made the plan (None = all); set by the CUDA
            builder (a model with several KV-cache groups gets one plan per group).
        block_table: the step's block table (rows indexed by ``RowBatch.batch_row``).

    What one backend decides about the step (the CPU kernel's tables, the CUDA kernel path's choice and row groups)
    is that backend's, on its own metadata subclass (``AttnCapCPUMetadata``, ``AttnCapFlashMetadata``).
    """

    batches: list[RowBatch]
    layers: frozenset[int]
    own_layers: frozenset[int] | None = None
    block_table: torch.Tensor | None = None

    def wants(self, layer_index: int) -> bool:
        return layer_index in self.layers


def _requests_view(runner: Any, num_reqs: int):
    """(req_id, prompt_token_count, sampling_params) per batch row.

    Two runners, told apart by duck typing (:mod:`vllm_attncap.engine.runner_hooks`):
    the V1 runner (``input_batch.req_ids`` + ``requests[rid]``) and a Model
    Runner V2 step view (the step's transient ``InputBatch``, prompt lengths from
    ``req_states.prompt_len`` through ``idx_mapping_np``, sampling params
    stashed by the ``add_requests`` hook; ``None`` for requests without capture).
    """
    if getattr(runner, "is_mrv2_step_view", False):
        yield from _mrv2_requests_view(runner, num_reqs)
        return
    req_ids = runner.input_batch.req_ids[:num_reqs]
    for rid in req_ids:
        st = runner.requests.get(rid)
        if st is None:
            yield rid, 0, None
            continue
        yield rid, st.num_prompt_tokens, st.sampling_params


def _mrv2_requests_view(view: Any, num_reqs: int):
    batch = view.input_batch
    params = view.params
    prompt_len = view.req_states.prompt_len.np
    slots = batch.idx_mapping_np
    for i, rid in enumerate(batch.req_ids[:num_reqs]):
        sp = params.get(rid)
        if sp is None:  # no capture asked: skip the prompt-length lookup
            yield rid, 0, None
            continue
        yield rid, int(prompt_len[slots[i]]), sp


def _real_rows(batch: Any) -> int:
    """Rows of the step's batch that hold a request (MRv2's ``InputBatch.num_reqs``; V1: its request ids)."""
    n = getattr(batch, "num_reqs", None)
    return int(n) if isinstance(n, int) else len(batch.req_ids)


def _seq_lens_host(cm: Any) -> list[int]:
    """The step's sequence lengths on the host without a device sync.

    vLLM 0.25+ gives ``seq_lens_cpu_upper_bound`` (exact without speculative decoding, which the CUDA backend
    refuses); older metadata has a host copy ``_seq_lens_cpu``; only then is the device tensor read (CPU: no sync).
    """
    for name in ("seq_lens_cpu_upper_bound", "_seq_lens_cpu"):
        t = getattr(cm, name, None)
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            return t.tolist()
    return cm.seq_lens.cpu().tolist()


def build_step_plan(
    runner: Any, cm: Any, tracker: CaptureTracker, key_layers: set[int] | None = None
) -> StepPlan | None:
    """Plan this step's captures from the runner's batch and the common metadata.

    Args:
        runner: what executes this step (:func:`runner_hooks.active_runner`):
            the V1 ``GPUModelRunner`` (or its CPU subclass) or a Model Runner
            V2 step view; either maps batch rows to request ids.
        cm: the step's ``CommonAttentionMetadata``.
        tracker: the process's :class:`CaptureTracker`.
        key_layers: when given, receives the layers of every scheduled request that captures, whether or not it
            has rows in this step (a prefill chunk before its last prompt token has none, yet its keys are read
            later). The CPU backend keeps shadow keys of these layers only when no other request can read them.

    Returns:
        ``None`` when no scheduled request asks for capture (the common case,
        which then costs one dict lookup per request).
    """
    if runner is None:
        return None
    if getattr(runner, "is_mrv2_step_view", False) and not runner.params:
        return None  # MRv2: no live request asked for capture (the hook stashes only those): nothing to look at
    # Under FULL graphs Model Runner V2 passes a padded num_reqs: plan over the batch's real rows only.
    num_reqs = min(cm.num_reqs, _real_rows(runner.input_batch))
    qsl = None
    seq_lens = None
    batches: list[RowBatch] = []
    layers: set[int] = set()
    for i, (rid, prompt_len, sp) in enumerate(_requests_view(runner, num_reqs)):
        extra = getattr(sp, "extra_args", None) if sp is not None else None
        if not extra or "attncap" not in extra:
            continue
        if qsl is None:
            qsl = cm.query_start_loc_cpu.tolist()
            seq_lens = _seq_lens_host(cm)
        rc = tracker.lookup(rid, extra["attncap"], prompt_len, getattr(sp, "max_tokens", None))
        if rc is None:
            continue
        if key_layers is not None:
            key_layers.update(rc.resolved.layers)
        q_len = qsl[i + 1] - qsl[i]
        first_pos = seq_lens[i] - q_len
        origin = rc.row_origin  # P - 1, or prompt_start - 1 for a top-k capture with prompt rows
        if origin < prompt_len - 1 and first_pos > origin + rc.rows_planned:
            # prompt rows (top-k prompt_start) before this step's first query were never computed: a prefix-cache
            # hit covered them. Only such requests can miss rows here: vLLM always computes the last prompt token,
            # and reply rows captured inside full CUDA graphs (graph_step) do not pass through this plan.
            tracker.fail(rc.req_id, (
                f"attncap spec field 'prompt_start': rows from position {origin + rc.rows_planned + 1} on "
                f"were asked for, but this engine computed the request from position {first_pos + 1} on (a "
                f"prefix-cache hit covered the positions before); send the request with "
                f"SamplingParams(skip_reading_prefix_cache=True) (the helpers and the server do), or a "
                f"prompt_start >= {first_pos + 1}"))
            continue
        lo = max(first_pos, origin)
        hi = min(seq_lens[i], prompt_len - 1 + rc.resolved.max_tokens)
        if hi <= lo:
            continue
        pos = torch.arange(lo, hi, dtype=torch.long)
        first_row = lo - origin
        rc.rows_planned = max(rc.rows_planned, hi - origin)
        if first_row < rc.writer.rows_written:  # re-prefill after preemption: rows are rewritten
            tracker.recomputed_rows += rc.writer.rows_written - first_row
        batches.append(
            RowBatch(
                rc=rc,
                token_index=pos - first_pos + qsl[i],
                q_pos=pos,
                rows=list(range(first_row, hi - origin)),
                ctx_len=hi,
                block_table_row=cm.block_table_tensor[i],
                batch_row=i,
            )
        )
        layers.update(rc.resolved.layers)
    if not batches:
        return None
    return StepPlan(batches, frozenset(layers), block_table=cm.block_table_tensor)
