"""Where a plan's shards get written: this process (the default), or elsewhere.

An executor has one method, ``write(plan, layout, tmp, options, device, progress) -> ShardStats``: it
writes every shard of ``layout`` (``mergekit_fast.engine.ShardLayout``) into the directory ``tmp``,
complete and closed, and returns what was moved. The driver (``engine.run_merge``) does everything
else: the checks, the temporary directory, the index and config, --verify and the atomic install. The
plan knows every output tensor and its shard before any byte moves, so shards are independent units
of work, and a shard's bytes do not depend on who writes it.
"""

from __future__ import annotations


class LocalExecutor:
    """Every shard in this process, through the engine's pipeline."""

    def write(self, plan, layout, tmp, options, device, progress):
        from mergekit_fast.engine import write_shards

        return write_shards(plan, layout, tmp, options, device, progress=progress)
