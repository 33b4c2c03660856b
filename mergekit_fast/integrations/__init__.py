"""Backends for other tools, each with that tool's own signatures and semantics.

- ``mergekit``: ``install()`` points mergekit 0.1.5's registered merge methods at these kernels;
- ``peft``: ``peft.utils.merge_utils``'s functions, and ``install()`` for ``add_weighted_adapter``;
- ``vllm``: vLLM's ``fused_topk`` / ``grouped_topk`` routers on the fused routing op.
Nothing here is imported by ``import mergekit_fast``.
"""
