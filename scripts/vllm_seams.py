"""Every vLLM symbol, signature and field the CUDA path uses: the table ``scripts/check_vllm_seams.py`` checks
against each release's source (tests/engine/cuda/test_vllm_seams.py checks our code uses nothing outside it).

One entry per seam: ``(kind, module, name, detail, used_by)``.

- ``module``: the module exists.
- ``class`` / ``function``: defined in (or re-exported by) ``module``.
- ``member``: ``Class.NAME`` is a class attribute, an enum member or a method (searched through the bases).
- ``method``: ``Class.method`` exists; ``detail`` = the parameter names we pass or override with (each must be
  present; the full signature is printed so releases can be compared).
- ``field``: ``Class.NAME`` is a field (class-level annotation, class attribute, property, or ``self.NAME = ...``
  in a method), searched through the bases; ``detail="optional"``: our code reads it with ``getattr(..., None)``
  and copes without it.
- ``any_field``: ``detail`` = a tuple of field names of which at least one must exist (renamed across releases;
  our code reads every spelling).
- ``source``: the source of ``Class.method`` contains one of ``detail``'s strings (a dict label -> text); the
  label found is reported (the KV-cache layout).
"""

from __future__ import annotations

FA = "vllm.v1.attention.backends.flash_attn"
BACKEND = "vllm.v1.attention.backend"
V1_RUNNER = "vllm.v1.worker.gpu_model_runner"
MRV2_RUNNER = "vllm.v1.worker.gpu.model_runner"
FLASH = "vllm_attncap/engine/cuda/backend.py"
HOOKS = "vllm_attncap/engine/runner_hooks.py"
PLAN = "vllm_attncap/engine/plan.py"
COMMON = "vllm_attncap/engine/backend.py"
PARALLEL = "vllm_attncap/engine/parallel.py"
PLUGIN = "vllm_attncap/engine/plugin.py"

#: Modules whose seams are required only where the module exists: vLLM 0.34 removed the V1 GPU model runner
#: (Model Runner V2 only); runner_hooks then installs the MRv2 hooks alone.
IF_MODULE = {V1_RUNNER, "vllm.v1.cudagraph_dispatcher"}

SEAMS: list[tuple[str, str, str, object, str]] = [
    # --- the backend (subclassed)
    ("class", FA, "FlashAttentionBackend", None, FLASH),
    ("class", FA, "FlashAttentionImpl", None, FLASH),
    ("class", FA, "FlashAttentionMetadata", None, FLASH),
    ("class", FA, "FlashAttentionMetadataBuilder", None, FLASH),
    ("member", FA, "FlashAttentionBackend.get_name", None, FLASH),
    ("member", FA, "FlashAttentionBackend.get_impl_cls", None, FLASH),
    ("member", FA, "FlashAttentionBackend.get_builder_cls", None, FLASH),
    ("member", FA, "FlashAttentionBackend.supports_kv_cache_dtype", None, FLASH),
    ("member", FA, "FlashAttentionBackend.supported_kv_cache_dtypes", None, FLASH),
    ("method", FA, "FlashAttentionImpl.forward",
     ("layer", "query", "key", "value", "kv_cache", "attn_metadata", "output", "output_scale",
      "output_block_scale"), FLASH),
    ("method", FA, "FlashAttentionMetadataBuilder.__init__",
     ("kv_cache_spec", "layer_names", "vllm_config", "device"), FLASH),
    ("method", FA, "FlashAttentionMetadataBuilder.build",
     ("common_prefix_len", "common_attn_metadata", "fast_build"), FLASH),
    ("method", FA, "FlashAttentionMetadataBuilder.build_for_cudagraph_capture", ("common_attn_metadata",), FLASH),
    ("method", FA, "FlashAttentionMetadataBuilder.get_cudagraph_support", ("vllm_config", "kv_cache_spec"), FLASH),
    ("member", FA, "FlashAttentionMetadataBuilder._cudagraph_support", None, FLASH),
    ("field", FA, "FlashAttentionMetadataBuilder.device", None, FLASH),
    # the KV-cache layout (vllm_attncap/engine/kv_layout.py reads it from the cache; this tells which release has which)
    ("source", FA, "FlashAttentionImpl.forward",
     {"kv_first": "kv_cache.unbind(1)", "head_major": "kv_cache.transpose(1, 2).split("}, FLASH),
    ("member", FA, "FlashAttentionBackend.get_kv_cache_shape", "optional", "vllm_attncap/engine/cuda/kv_layout.py"),
    # FlashAttentionImpl state the capture reads
    ("field", FA, "FlashAttentionImpl.scale", None, FLASH),
    ("field", FA, "FlashAttentionImpl.logits_soft_cap", None, FLASH),
    ("field", FA, "FlashAttentionImpl.alibi_slopes", None, FLASH),
    ("field", FA, "FlashAttentionImpl.sinks", None, FLASH),
    ("field", FA, "FlashAttentionImpl.sliding_window", None, FLASH),
    ("field", FA, "FlashAttentionImpl.attn_type", None, FLASH),
    ("field", FA, "FlashAttentionImpl.num_kv_heads", None, FLASH),
    ("field", FA, "FlashAttentionImpl.head_size", None, FLASH),
    ("field", FA, "FlashAttentionImpl.dcp_world_size", "optional", FLASH),
    # FlashAttentionMetadata fields
    ("field", FA, "FlashAttentionMetadata.block_table", None, FLASH),
    ("field", FA, "FlashAttentionMetadata.seq_lens", None, FLASH),
    ("field", FA, "FlashAttentionMetadata.causal", None, FLASH),
    ("field", FA, "FlashAttentionMetadata.sliding_window", "optional", FLASH),
    ("field", FA, "FlashAttentionMetadata.rswa_prefix_lens", "optional", FLASH),
    ("any_field", FA, "FlashAttentionMetadata", ("mm_prefix_range_tensor", "mm_prefix_query_range_tensor"), FLASH),
    # attention interface
    ("class", BACKEND, "AttentionCGSupport", None, FLASH),
    ("member", BACKEND, "AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE", None, FLASH),
    ("class", BACKEND, "AttentionType", None, FLASH),
    ("member", BACKEND, "AttentionType.DECODER", None, FLASH),
    ("class", BACKEND, "CommonAttentionMetadata", None, PLAN),
    ("field", BACKEND, "CommonAttentionMetadata.num_reqs", None, PLAN),
    ("field", BACKEND, "CommonAttentionMetadata.max_query_len", None, FLASH),
    ("field", BACKEND, "CommonAttentionMetadata.query_start_loc_cpu", None, PLAN),
    ("field", BACKEND, "CommonAttentionMetadata.seq_lens", None, PLAN),
    ("field", BACKEND, "CommonAttentionMetadata.block_table_tensor", None, PLAN),
    ("function", "vllm.model_executor.models.utils", "extract_layer_index", ("layer_name",), FLASH),
    # registration
    ("class", "vllm.v1.attention.backends.registry", "AttentionBackendEnum", None, PLUGIN),
    ("member", "vllm.v1.attention.backends.registry", "AttentionBackendEnum.CUSTOM", None, PLUGIN),
    ("member", "vllm.v1.attention.backends.registry", "AttentionBackendEnum.FLASH_ATTN", None, PLUGIN),
    ("function", "vllm.v1.attention.backends.registry", "register_backend", None, PLUGIN),
    ("name", "vllm.v1.attention.backends.registry", "_ATTN_OVERRIDES", None, PLUGIN),
    ("name", "vllm.platforms", "current_platform", None, PLUGIN),
    # the V1 runner
    ("class", V1_RUNNER, "GPUModelRunner", None, HOOKS),
    ("method", V1_RUNNER, "GPUModelRunner.execute_model", ("scheduler_output",), HOOKS),
    ("member", V1_RUNNER, "GPUModelRunner.sample_tokens", None, HOOKS),
    ("field", V1_RUNNER, "GPUModelRunner.input_batch", None, PLAN),
    ("field", V1_RUNNER, "GPUModelRunner.requests", None, PLAN),
    ("method", "vllm.v1.cudagraph_dispatcher", "CudagraphDispatcher.dispatch", ("uniform_decode",), HOOKS),
    # Model Runner V2
    ("class", MRV2_RUNNER, "GPUModelRunner", None, HOOKS),
    ("method", MRV2_RUNNER, "GPUModelRunner.add_requests", ("scheduler_output",), HOOKS),
    ("method", MRV2_RUNNER, "GPUModelRunner.finish_requests", ("scheduler_output",), HOOKS),
    ("member", MRV2_RUNNER, "GPUModelRunner.prepare_inputs", None, HOOKS),
    ("method", MRV2_RUNNER, "GPUModelRunner.execute_model", ("scheduler_output",), HOOKS),
    ("member", MRV2_RUNNER, "GPUModelRunner.sample_tokens", None, HOOKS),
    ("field", MRV2_RUNNER, "GPUModelRunner.req_states", None, HOOKS),
    ("field", "vllm.v1.worker.gpu.states", "RequestState.prompt_len", None, PLAN),
    ("field", "vllm.v1.worker.gpu.input_batch", "InputBatch.req_ids", None, PLAN),
    ("field", "vllm.v1.worker.gpu.input_batch", "InputBatch.idx_mapping_np", None, PLAN),
    ("field", "vllm.v1.worker.gpu.input_batch", "InputBatch.num_reqs", None, PLAN),
    ("method", "vllm.v1.worker.gpu.cudagraph_utils", "CudaGraphManager.dispatch", ("uniform_token_count",), HOOKS),
    # scheduler output
    ("field", "vllm.v1.core.sched.output", "SchedulerOutput.finished_req_ids", None, HOOKS),
    ("field", "vllm.v1.core.sched.output", "SchedulerOutput.num_scheduled_tokens", None, HOOKS),
    ("field", "vllm.v1.core.sched.output", "SchedulerOutput.scheduled_new_reqs", None, HOOKS),
    ("field", "vllm.v1.core.sched.output", "NewRequestData.req_id", None, HOOKS),
    ("field", "vllm.v1.core.sched.output", "NewRequestData.sampling_params", None, HOOKS),
    # configuration
    ("field", "vllm.config.parallel", "ParallelConfig.tensor_parallel_size", None, FLASH),
    ("field", "vllm.config.parallel", "ParallelConfig.pipeline_parallel_size", None, FLASH),
    ("field", "vllm.config.parallel", "ParallelConfig.data_parallel_size", None, PARALLEL),
    ("field", "vllm.config.parallel", "ParallelConfig.decode_context_parallel_size", None, PARALLEL),
    ("field", "vllm.config.parallel", "ParallelConfig.distributed_executor_backend", None, PARALLEL),
    ("method", "vllm.config.model", "ModelConfig.get_num_kv_heads", ("parallel_config",), COMMON),
    ("member", "vllm.config.model", "ModelConfig.get_head_size", None, COMMON),
    ("method", "vllm.config.model", "ModelConfig.get_num_attention_heads", ("parallel_config",), PARALLEL),
    ("field", "vllm.config.model", "ModelConfig.max_model_len", None, COMMON),
    ("field", "vllm.config.model", "ModelConfig.dtype", None, FLASH),
    ("field", "vllm.config.model", "ModelConfig.enforce_eager", None, FLASH),
    ("field", "vllm.config.compilation", "CompilationConfig.static_forward_context", None, FLASH),
    ("field", "vllm.config.compilation", "CompilationConfig.cudagraph_mode", None, FLASH),
    ("member", "vllm.config.compilation", "CUDAGraphMode.has_full_cudagraphs", None, FLASH),
    ("class", "vllm.config", "CUDAGraphMode", None, "vllm_attncap/engine/cuda/graph_dispatch.py"),
    # the two graph sets (graph_dispatch.wrap_graph_manager): MRv2's capture loop and replay
    ("method", "vllm.v1.worker.gpu.cudagraph_utils", "CudaGraphManager.capture", ("create_forward_fn",),
     "vllm_attncap/engine/cuda/graph_dispatch.py"),
    ("method", "vllm.v1.worker.gpu.cudagraph_utils", "CudaGraphManager.run_fullgraph", ("desc",),
     "vllm_attncap/engine/cuda/graph_dispatch.py"),
    ("field", "vllm.v1.worker.gpu.cudagraph_utils", "CudaGraphManager.graphs", None,
     "vllm_attncap/engine/cuda/graph_dispatch.py"),
    ("field", "vllm.v1.worker.gpu.cudagraph_utils", "CudaGraphManager._capture_descs", None,
     "vllm_attncap/engine/cuda/graph_dispatch.py"),
    ("field", "vllm.v1.worker.gpu.cudagraph_utils", "BatchExecutionDescriptor.cg_mode", None,
     "vllm_attncap/engine/cuda/graph_dispatch.py"),
    ("field", "vllm.config.scheduler", "SchedulerConfig.max_num_seqs", None, FLASH),
    ("field", "vllm.config.vllm", "VllmConfig.speculative_config", None, FLASH),
    # parallel state (engine/parallel.py)
    ("function", "vllm.distributed.parallel_state", "get_pp_group", None, PARALLEL),
    ("function", "vllm.distributed.parallel_state", "get_tensor_model_parallel_rank", None, PARALLEL),
    ("function", "vllm.distributed.utils", "get_pp_indices", None, PARALLEL),
]


def imported_names() -> set[tuple[str, str]]:
    """(module, name) pairs the table allows a ``from module import name`` of."""
    out = set()
    for kind, module, name, _detail, _used in SEAMS:
        if kind in ("class", "function", "name"):
            out.add((module, name))
    return out
