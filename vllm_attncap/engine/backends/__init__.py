"""Attention backends: one module per platform backend that attncap wraps.

Modules here import vLLM at import time; they are only imported by vLLM's
backend selector (by class path), never by ``import vllm_attncap``.
"""
