"""Capture under vLLM's tensor and pipeline parallelism: what each rank holds and captures.

Under tensor parallelism (TP) each rank runs every layer with a contiguous slice of the query heads (rank ``r`` of
``tp`` holds global heads ``r * H/tp .. (r+1) * H/tp - 1``, and the KV heads those use); under pipeline parallelism
(PP) each stage runs a contiguous range of layers (``vllm.distributed.utils.get_pp_indices``, which honours
``VLLM_PP_LAYER_PARTITION``). Every rank captures what it holds, into a part of the request's record of its own
(:mod:`vllm_attncap.store.parts`); the reader combines the parts into exactly the arrays a single-rank engine gives.

How each reduction splits (``H`` = selected heads, ``L`` = selected layers, all counted over the whole model):

* ``none``: each rank writes its (layer, head) rows or statistics; the parts are disjoint slices.
* ``head_mean``: each rank writes ``sum over its selected heads / H`` per layer (its head mean times its share of
  the heads); the reader adds the parts.
* ``layer_head_mean``: each rank writes ``sum over its selected layers and heads / (L * H)``; the reader adds.
* ``mode="stats"`` of a mean that spans ranks (``head_mean`` at TP > 1, ``layer_head_mean`` at TP*PP > 1): the
  statistics need the whole mean row, so the ranks write their partial rows over the history (after the
  long-history elision, which is linear) and the reader adds them and computes coverage and entropy on the host.
  Per-head statistics, and head means whose heads all live on each stage (TP = 1), are computed on the device.

The combination happens on the host, from per-rank parts, rather than with the TP group's collectives: a
collective inside the attention forward would couple capture to every rank's bookkeeping (a rank that refused or
failed a capture would deadlock the others), and PP stages do not run a layer at the same time at all.

This module only reads vLLM's parallel state; :func:`rank_facts` is called by the backends' metadata builders.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..spec import ResolvedSpec

__all__ = ["RankFacts", "RankShare", "rank_facts", "rank_share", "check_supported"]


@dataclass(frozen=True)
class RankFacts:
    """Where this worker sits in the engine's TP x PP grid, and the model's global counts.

    Attributes:
        tp_rank, tp_size: the rank in the tensor-parallel group and the group's size.
        pp_rank, pp_size: the pipeline stage and the number of stages.
        num_layers, num_heads: the model's layers and query heads (all ranks together).
        layer_start, layer_end: the layers this stage runs, ``layer_start .. layer_end - 1``.
    """

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    num_layers: int = 0
    num_heads: int = 0
    layer_start: int = 0
    layer_end: int = 0

    @property
    def index(self) -> int:
        """This rank's part index, ``pp_rank * tp_size + tp_rank``."""
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def count(self) -> int:
        """Parts per record: ``tp_size * pp_size``."""
        return self.tp_size * self.pp_size

    @property
    def heads_per_rank(self) -> int:
        return self.num_heads // self.tp_size

    @property
    def head_offset(self) -> int:
        """Global index of this rank's first query head."""
        return self.tp_rank * self.heads_per_rank

    def owns_head(self, head: int) -> bool:
        return self.head_offset <= head < self.head_offset + self.heads_per_rank

    def owns_layer(self, layer: int) -> bool:
        return self.layer_start <= layer < self.layer_end


@dataclass(frozen=True)
class RankShare:
    """What one rank captures of one request (global ids, in the order of the request's selection).

    Attributes:
        layers: the selected layers this rank runs; ``layer_pos``: their positions in the selection.
        heads: the selected heads this rank holds; ``head_pos``: their positions; ``local_heads``: their indices
            among the rank's own heads (what the rank's query tensor is indexed with).
        head_share: ``len(heads) / len(selected heads)``: the weight of this rank's head mean in the full mean.
        stats_on_host: the statistics are of a mean that spans ranks, so the rank writes partial rows and the
            reader computes the statistics.
    """

    layers: tuple[int, ...]
    layer_pos: tuple[int, ...]
    heads: tuple[int, ...]
    head_pos: tuple[int, ...]
    local_heads: tuple[int, ...]
    head_share: float
    stats_on_host: bool

    @property
    def empty(self) -> bool:
        """Nothing of the selection lives on this rank (its part is only a completion marker)."""
        return not self.layers or not self.heads


def _total_layers(mc) -> int:
    fn = getattr(mc, "get_total_num_hidden_layers", None)
    if fn is not None:
        return int(fn())
    return int(mc.hf_text_config.num_hidden_layers)


def global_counts(vllm_config) -> tuple[int, int]:
    """(layers, query heads) of the whole model, whatever the parallelism (vLLM's ``get_num_layers`` /
    ``get_num_attention_heads`` count one rank's share)."""
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    return _total_layers(mc), int(mc.get_num_attention_heads(pc)) * int(pc.tensor_parallel_size)


def check_supported(vllm_config) -> None:
    """Refuse, at engine start-up, the settings capture does not support yet, naming the setting.

    Raises:
        ValueError: for ``data_parallel_size > 1``, ``decode_context_parallel_size > 1``, a ``speculative_config``,
            the ``external_launcher`` executor at TP/PP > 1, or an MLA model.
    """
    pc = vllm_config.parallel_config
    if int(getattr(pc, "data_parallel_size", 1) or 1) > 1:
        raise ValueError(
            "attention_backend='attncap' does not support data_parallel_size > 1 yet "
            f"(got {pc.data_parallel_size}); run one engine per data-parallel replica, each with its own "
            "tensor_parallel_size / pipeline_parallel_size"
        )
    if int(getattr(pc, "decode_context_parallel_size", 1) or 1) > 1:
        raise ValueError(
            "attention_backend='attncap' does not support decode_context_parallel_size > 1 "
            f"(got {pc.decode_context_parallel_size}): the KV cache of one request is split across ranks"
        )
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise ValueError(
            "attention_backend='attncap' does not support speculative decoding (speculative_config is set): "
            "draft tokens that are rejected would be captured as rows"
        )
    backend = getattr(pc, "distributed_executor_backend", None)
    if backend == "external_launcher" and int(pc.tensor_parallel_size) * int(pc.pipeline_parallel_size) > 1:
        raise ValueError(
            "attention_backend='attncap' does not support distributed_executor_backend='external_launcher' with "
            "tensor/pipeline parallelism (each launched process would keep its rank's part of a capture in a store "
            "of its own); use the 'mp' or 'ray' executor"
        )
    if getattr(vllm_config.model_config, "use_mla", False):
        raise ValueError("attention_backend='attncap' does not support MLA models (model_config.use_mla): "
                         "their latent KV cache holds no per-head keys")


def rank_facts(vllm_config) -> RankFacts:
    """This worker's :class:`RankFacts`, from vLLM's initialised parallel groups (TP = PP = 1 before them)."""
    num_layers, num_heads = global_counts(vllm_config)
    pc = vllm_config.parallel_config
    tp_size, pp_size = int(pc.tensor_parallel_size), int(pc.pipeline_parallel_size)
    tp_rank = pp_rank = 0
    start, end = 0, num_layers
    if tp_size * pp_size > 1:
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank
        from vllm.distributed.utils import get_pp_indices

        tp_rank = int(get_tensor_model_parallel_rank())
        pp = get_pp_group()
        pp_rank = int(pp.rank_in_group)
        start, end = get_pp_indices(num_layers, pp_rank, pp_size)
    return RankFacts(tp_rank, tp_size, pp_rank, pp_size, num_layers, num_heads, int(start), int(end))


def rank_share(facts: RankFacts, resolved: ResolvedSpec) -> RankShare:
    """What ``facts``'s rank captures of a request resolved against the whole model."""
    lp = [i for i, l in enumerate(resolved.layers) if facts.owns_layer(l)]
    hp = [i for i, h in enumerate(resolved.heads) if facts.owns_head(h)]
    heads = tuple(resolved.heads[i] for i in hp)
    reduce, mode = resolved.spec.reduce, resolved.spec.mode
    spans = (reduce == "head_mean" and facts.tp_size > 1) or (reduce == "layer_head_mean" and facts.count > 1)
    return RankShare(
        layers=tuple(resolved.layers[i] for i in lp),
        layer_pos=tuple(lp),
        heads=heads,
        head_pos=tuple(hp),
        local_heads=tuple(h - facts.head_offset for h in heads),
        head_share=len(heads) / len(resolved.heads),
        stats_on_host=mode == "stats" and spans,
    )
