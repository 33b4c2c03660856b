"""mergekit_fast: fast, memory-bounded LLM merging with fused Triton, CUDA and C++ kernels.

Public API (imported lazily, so ``import mergekit_fast`` stays cheap):
    merge                                    the CLI's merge as a function (config path, YAML or dict)
    merge_many                               independent merges, one after another or as Ray tasks
    merge_tensors, merge_state_dicts         mergekit 0.1.5's in-memory API, every registered method
    PerTensorValues, MemorySource            per-tensor parameter values; a model in memory
    slerp, slerp_batched, slerp_ref          SLERP op (mergekit 0.1.5 semantics)
    topk_routing, topk_routing_ref           fused MoE top-k routing
    BackendUnavailable, VerificationError
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "merge": "mergekit_fast.api",
    "merge_many": "mergekit_fast.api",
    "merge_tensors": "mergekit_fast.api",
    "merge_state_dicts": "mergekit_fast.api",
    "PerTensorValues": "mergekit_fast.api",
    "MemorySource": "mergekit_fast.io.source",
    "slerp": "mergekit_fast.ops.slerp",
    "slerp_batched": "mergekit_fast.ops.slerp",
    "slerp_ref": "mergekit_fast.ops.slerp",
    "topk_routing": "mergekit_fast.ops.routing",
    "topk_routing_ref": "mergekit_fast.ops.routing",
    "BackendUnavailable": "mergekit_fast.backends",
    "VerificationError": "mergekit_fast.ops._verify",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mergekit_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
