"""The Python API: the CLI's merge as a function, and mergekit 0.1.5's in-memory entry points.

- ``merge(config, out_path, **options) -> MergeResult``: ``mergekit-fast merge`` as a function; the
  config is a path, YAML text or a dict; ``sources`` feeds models already in memory (state dicts or
  any TensorSource) in place of the directories the config names.
- ``merge_tensors(tensors, method, ...)`` and ``merge_state_dicts(models, method, ...)``: the same
  signatures and results as mergekit 0.1.5's (``mergekit.merge_methods.api``), for every merge method
  registered here, on tensors on any device. Small tensors of a batching method run in one launch.
  ``name`` (the tensor's name) keys the random draws, so a random method gives the same result as a
  file-based merge of the same tensors under the same ``seed``.

Parameter values follow mergekit: a scalar broadcasts; a per-input parameter also takes a sequence in
input order or a mapping keyed by the input ids; ``PerTensorValues([...])`` (or mergekit's
``PerGroupValues``) gives one value per output tensor.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_fast import methods
from mergekit_fast.methods import Context, InputRef, MergeMethod, Scope, TensorGroup

log = logging.getLogger("mergekit_fast")

# Batches of small tensors: at most this many tensors / bytes per launch (mergekit's BatchOptions).
BATCH_MAX_TENSORS = 256
BATCH_MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class PerTensorValues:
    """Explicit values of a parameter, one per output tensor (mergekit's PerGroupValues)."""

    values: tuple

    def __init__(self, values: Sequence):
        object.__setattr__(self, "values", tuple(values))


def _per_group(value) -> bool:
    return isinstance(value, PerTensorValues) or type(value).__name__ == "PerGroupValues"


# ----------------------------------------------------------------------------- merge()


def _is_path(config) -> bool:
    return isinstance(config, os.PathLike) or (
        isinstance(config, str) and "\n" not in config and config.endswith((".yml", ".yaml"))
    )


def _load(config):
    from mergekit_fast.config import load_config, parse_config

    if isinstance(config, Mapping):
        return parse_config(config)
    if _is_path(config):
        return load_config(Path(config))
    return parse_config(str(config))


def _merge_options(options: dict):
    from mergekit_fast.cli import parse_size
    from mergekit_fast.engine import MergeOptions

    options = dict(options)
    for key in ("out_shard_size", "max_memory"):
        if isinstance(options.get(key), str):
            options[key] = parse_size(options[key], binary_suffixes=key == "max_memory")
    return MergeOptions(**options)


def _executor_of(executor, multi_gpu: bool, ray_address: str | None, workers: int | None):
    """(the executor, whether this call owns it and closes it)."""
    from mergekit_fast.executors import make_executor

    if executor is None or isinstance(executor, str):
        return make_executor(executor, multi_gpu=multi_gpu, ray_address=ray_address, workers=workers), True
    return executor, False


def merge(config, out_path: str | os.PathLike, *, sources: Mapping[str, Any] | None = None, executor=None,
          multi_gpu: bool = False, ray_address: str | None = None, workers: int | None = None, **options):  # fmt: skip
    """Run a mergekit YAML merge config (a path, YAML text or a dict) and write the model to ``out_path``.

    ``options`` are ``mergekit_fast.engine.MergeOptions`` fields (device, out_shard_size (bytes or
    "5B"), max_memory (bytes or "4G"), force, verify, backend, random_seed, allow_crimes, ...).
    ``sources`` maps a model reference of the config to a model in memory: a state dict (name ->
    tensor), a (state dict, config.json dict) pair, or any TensorSource.
    ``executor``: "local" (default), "ray" (the shards written by Ray tasks; ``ray_address``, ``workers``)
    or an executor object (``mergekit_fast.executors``, e.g. a ``RayExecutor`` kept open across merges);
    ``multi_gpu``: split the shards across every visible GPU of this node (``workers``: at most that
    many). A Ray connection this call starts, it closes; one the caller opened (``ray.init``) is used.
    """
    import time

    from mergekit_fast.engine import run_merge
    from mergekit_fast.io.source import MemorySource
    from mergekit_fast.plan import build_plan

    t0 = time.perf_counter()
    cfg = _load(config)
    opt = _merge_options(options)
    ex, owned = _executor_of(executor, multi_gpu, ray_address, workers)
    try:
        opened = {}
        for ref, src in (sources or {}).items():
            if isinstance(src, tuple):
                src = MemorySource(src[0], src[1], key=str(ref))
            elif isinstance(src, Mapping):
                src = MemorySource(src, key=str(ref))
            opened[ref] = src
        # defer_config: the transformers step (the output config.json) overlaps the merge, as in the CLI
        plan = build_plan(cfg, sources=opened, allow_crimes=opt.allow_crimes,
                          trust_remote_code=opt.trust_remote_code, defer_config=True)  # fmt: skip
        return run_merge(
            plan, out_path, opt, started=t0, phases={"plan": time.perf_counter() - t0}, executor=ex
        )
    finally:
        if owned:
            ex.close()


def merge_many(jobs, *, executor=None, ray_address: str | None = None, multi_gpu: bool = False,
               return_exceptions: bool = False, on_result=None, **options) -> list:  # fmt: skip
    """Run independent merges: ``jobs`` is a sequence of (config, out_path) pairs (config: a path, YAML
    text or a dict, as for ``merge``); ``options`` apply to every merge. Each result is the same as
    ``merge(config, out_path, **options)``'s.

    ``executor="ray"``: every merge is one Ray task (one GPU each where the cluster has GPUs, else one
    CPU slot), planned and written on its worker, so a sweep or a search keeps every GPU busy; inputs
    and outputs must be on storage every node shares. Default: one after another in this process
    (``multi_gpu``: each over every GPU of this node).

    Returns the MergeResults in the order of ``jobs``. A merge that fails leaves nothing at its OUT and
    the others still run; then a MergeError naming every failure is raised, unless
    ``return_exceptions`` (then a failed merge's entry is its exception). ``on_result(i, result)`` is
    called as each merge ends.
    """
    from mergekit_fast.errors import MergeError

    jobs = [(config, os.fspath(out)) for config, out in jobs]
    outs = [os.path.abspath(out) for _, out in jobs]
    dup = next((o for o in outs if outs.count(o) > 1), None)
    if dup is not None:
        raise MergeError(f"{dup}: two merges would write the same output")
    opt = _merge_options(options)
    results: list = [None] * len(jobs)

    def done(i: int, result) -> None:
        results[i] = result
        if on_result is not None:
            on_result(i, result)

    if executor == "ray":
        from mergekit_fast.executors import require_ray

        if multi_gpu:
            raise MergeError("multi_gpu runs on one node without Ray; on Ray every merge gets its own GPU")
        require_ray()
        from mergekit_fast.executors.ray import run_many

        ready, where = [], []
        for i, (config, _) in enumerate(jobs):
            try:
                source, base_dir = _portable(config)
            except Exception as exc:  # noqa: BLE001 - a bad config fails its merge only
                done(i, exc)
                continue
            ready.append((source, base_dir, outs[i]))
            where.append(i)
        run_many(ready, opt, address=ray_address, on_result=lambda k, r: done(where[k], r))
    else:
        ex, owned = _executor_of(executor, multi_gpu, None, None)
        try:
            for i, (config, out) in enumerate(jobs):
                try:
                    r = merge(config, out, executor=ex, **options)
                except KeyboardInterrupt:
                    raise
                except Exception as exc:  # noqa: BLE001 - one failed merge does not stop the others
                    r = exc
                done(i, r)
        finally:
            if owned:
                ex.close()
    failed = [(jobs[i][1], r) for i, r in enumerate(results) if isinstance(r, BaseException)]
    if failed and not return_exceptions:
        lines = "; ".join(f"{out}: {exc}" for out, exc in failed)
        raise MergeError(f"{len(failed)} of {len(jobs)} merges failed: {lines}")
    return results


def _portable(config) -> tuple:
    """A config as a Ray task receives it: (YAML text or dict, the directory relative model paths resolve
    against), checked here first so that a bad config fails before any task starts."""
    from mergekit_fast.config import parse_config
    from mergekit_fast.config.validate import read_config_file

    base_dir = os.getcwd()
    if isinstance(config, Mapping):
        source = dict(config)
    elif _is_path(config):
        source = Path(config).read_text(encoding="utf-8")
        read_config_file(Path(config), parse_config, base_dir=base_dir)  # errors name the file
        return source, base_dir
    else:
        source = str(config)
    parse_config(source, base_dir=base_dir)
    return source, base_dir


# ----------------------------------------------------------------------------- in memory


def _method(method: str | MergeMethod) -> MergeMethod:
    if isinstance(method, MergeMethod):
        return method
    try:
        m = methods.get(method)
    except KeyError:
        raise ValueError(
            f"unknown merge method {method!r}; registered: {', '.join(methods.names())}"
        ) from None
    return m


def _bind(method: MergeMethod, keys: list[str], base: str | None, ids: list, supplied: Mapping[str, Any],
          index: int, count: int) -> tuple[dict, dict]:  # fmt: skip
    """mergekit's parameter binding for one output tensor: (shared values, per-input values by key)."""
    shared: dict[str, Any] = {}
    per_input: dict[str, dict[str, Any]] = {k: {} for k in keys}
    has_base = base is not None and method.contract.base != methods.BasePolicy.IGNORED
    for p in method.params:
        if p.name in supplied:
            value = supplied[p.name]
        elif p.scope == Scope.NON_BASE and len(keys) == int(has_base):
            value = {}
        elif p.required:
            raise TypeError(f"Missing required parameter {p.name} for {method.name}")
        else:
            value = p.default
        if _per_group(value):
            if len(value.values) != count:
                raise ValueError(
                    f"Parameter {p.name} expects {count} per-tensor values; got {len(value.values)}"
                )
            value = value.values[index]
        if p.scope == Scope.SHARED:
            shared[p.name] = p.validate(value)
            continue
        who = [k for k in keys if p.scope == Scope.INPUT or not (has_base and k == base)]
        who_ids = [i for i, k in zip(ids, keys) if k in who]
        if isinstance(value, Mapping):
            missing = [i for i in who_ids if i not in value]
            if missing:
                raise ValueError(f"Missing {p.name} for input(s): {missing}")
            raw = [value[i] for i in who_ids]
        elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            if len(value) != len(who):
                raise ValueError(f"Parameter {p.name} expects {len(who)} values; got {len(value)}")
            raw = list(value)
        else:
            raw = [value] * len(who)
        for k, v in zip(who, raw):
            per_input[k][p.name] = p.validate(v)
    return shared, per_input


@dataclass
class _Call:
    index: int
    name: str | None
    method: str
    inputs: list  # tensors in the planned order
    params: dict
    in_dtype: object
    out_dtype: object


def _prepare(method: MergeMethod, tensors: Sequence, ids: list, base_index: int | None, name: str | None,
             supplied: Mapping, dtype, out_dtype, index: int, count: int) -> _Call | object:  # fmt: skip
    import torch

    keys = [str(i) for i in range(len(tensors))]
    base = keys[base_index] if base_index is not None else None
    if len(set(ids)) != len(ids):
        raise ValueError("Duplicate input IDs")
    shared, per_input = _bind(method, keys, base, ids, supplied, index, count)
    label = name or "tensor"
    group = TensorGroup(name=label, models=keys, refs=[InputRef(k, label) for k in keys], base=base,
                        shared=shared, per_input=per_input, optional=False)  # fmt: skip
    try:
        method.check_inputs(keys, base, f"{method.name}({label})")
    except ValueError as exc:
        raise ValueError(str(exc).replace(f"{method.name}({label}): ", "")) from None
    first = tensors[0]
    if any(t.shape != first.shape for t in tensors[1:]) and method.same_shape:
        raise ValueError(f"Tensor size mismatch for {name}: {[tuple(t.shape) for t in tensors]}")
    if any(t.device != first.device for t in tensors[1:]):
        raise ValueError(f"Inputs for {name} must have the same device")
    planned = method.plan(group)
    if planned is None:
        return None
    ordered = [tensors[int(r.model)] for r in planned.inputs]
    in_dtype = dtype
    if in_dtype is None:
        in_dtype = ordered[0].dtype
        for t in ordered[1:]:
            in_dtype = torch.promote_types(in_dtype, t.dtype)
    return _Call(index, name, planned.method, ordered, dict(planned.params), in_dtype, out_dtype)


def _run(calls: list[_Call], seed: int | None, backend: str) -> dict[int, object]:
    """Execute prepared calls: batching methods per (method, dtype, device) in launches of small tensors."""
    out: dict[int, object] = {}
    groups: dict[tuple, list[_Call]] = {}
    for c in calls:
        m = methods.get(c.method)
        numel = c.inputs[0].numel() if c.inputs else 0
        if m.batch_max_numel and numel <= m.batch_max_numel:
            groups.setdefault((c.method, c.in_dtype, c.inputs[0].device), []).append(c)
        else:
            out[c.index] = _finish(c, m.compute(_cast(c), c.params, _ctx(c, seed, backend)))
    for (name, _, _), cs in groups.items():
        m = methods.get(name)
        start = 0
        while start < len(cs):
            end, size = start, 0
            while (
                end < len(cs) and end - start < BATCH_MAX_TENSORS and (end == start or size < BATCH_MAX_BYTES)
            ):
                size += sum(t.numel() * t.element_size() for t in cs[end].inputs)
                end += 1
            chunk = cs[start:end]
            results = m.compute_many([_cast(c) for c in chunk], [c.params for c in chunk],
                                     [_ctx(c, seed, backend) for c in chunk])  # fmt: skip
            for c, r in zip(chunk, results):
                out[c.index] = _finish(c, r)
            start = end
    return out


def _cast(c: _Call) -> list:
    return [t if t.dtype == c.in_dtype else t.to(c.in_dtype) for t in c.inputs]


def _ctx(c: _Call, seed: int | None, backend: str) -> Context:
    return Context(name=c.name or "", seed=seed, backend=backend)


def _finish(c: _Call, result):
    return result if c.out_dtype is None or result.dtype == c.out_dtype else result.to(c.out_dtype)


def _seed(seed: int | None, method: MergeMethod) -> int | None:
    if seed is None and method.random:
        seed = secrets.randbits(63)
        log.warning(
            "%s draws random numbers: random seed %d (pass seed=%d to repeat)", method.name, seed, seed
        )
    return seed


def _check_dtype(name: str, value) -> None:
    import torch

    if value is not None and (not isinstance(value, torch.dtype) or not value.is_floating_point):
        raise ValueError(f"{name} must be a floating-point torch.dtype")


def merge_tensors(
    tensors: Sequence,
    method: str | MergeMethod,
    *,
    parameters: Mapping[str, Any] | None = None,
    ids: Sequence[Hashable] | None = None,
    base_index: int | None = None,
    name: str | None = None,
    dtype=None,
    out_dtype=None,
    seed: int | None = None,
    backend: str = "auto",
):
    """Merge the inputs of one output tensor (mergekit 0.1.5's ``merge_tensors``). ``name`` keys the random
    draws of random methods; ``seed`` is their seed (a fresh one, logged, when None)."""
    m = _method(method)
    _check_dtype("dtype", dtype)
    _check_dtype("out_dtype", out_dtype)
    tensors = list(tensors)
    if not tensors:
        raise ValueError("At least one tensor is required")
    if base_index is not None and not 0 <= base_index < len(tensors):
        raise ValueError("base_index is out of range")
    ids = list(range(len(tensors))) if ids is None else list(ids)
    if len(ids) != len(tensors):
        raise ValueError("ids and tensors must have the same length")
    _unknown(m, parameters)
    call = _prepare(m, tensors, ids, base_index, name, parameters or {}, dtype, out_dtype, 0, 1)
    if call is None:
        raise ValueError(f"{m.name} writes no output for {name}")
    return _run([call], _seed(seed, m), backend)[0]


def merge_state_dicts(
    models,
    method: str | MergeMethod,
    *,
    parameters: Mapping[str, Any] | None = None,
    base: Hashable | None = None,
    strict: bool = True,
    dtype=None,
    out_dtype=None,
    seed: int | None = None,
    backend: str = "auto",
) -> dict:
    """Merge in-memory state dicts or modules (mergekit 0.1.5's ``merge_state_dicts``): ``models`` is a
    mapping of ids to state dicts or a sequence of them; non-floating buffers are copied when every
    input agrees exactly; ``strict=False`` merges only the names every input has."""
    import torch

    m = _method(method)
    _check_dtype("dtype", dtype)
    _check_dtype("out_dtype", out_dtype)
    items = list(models.items()) if isinstance(models, Mapping) else list(enumerate(models))
    if not items:
        raise ValueError("At least one model is required")
    sds = [(i, _as_state_dict(sd)) for i, sd in items]
    ids = [i for i, _ in sds]
    if len(set(ids)) != len(ids):
        raise ValueError("Duplicate model IDs")
    if base is not None and base not in ids:
        raise ValueError(f"Unknown base input: {base!r}")
    key_sets = [set(sd) for _, sd in sds]
    union = set().union(*key_sets)
    if strict and any(k != key_sets[0] for k in key_sets[1:]):
        missing = {i: sorted(union - k) for (i, _), k in zip(sds, key_sets) if k != union}
        raise ValueError(f"State dictionaries have different tensor keys: {missing}")
    names = list(sds[0][1]) if strict else [n for n in sds[0][1] if all(n in k for k in key_sets)]
    _unknown(m, parameters)
    base_index = ids.index(base) if base is not None else None
    keys = [str(i) for i in range(len(ids))]
    m.check_inputs(keys, None if base_index is None else keys[base_index], "merge_state_dicts")
    copied, merged_names = {}, []
    for n in names:
        ts = [sd[n] for _, sd in sds]
        if all(t.is_floating_point() for t in ts):
            merged_names.append(n)
            continue
        if any(t.dtype != ts[0].dtype or not torch.equal(t, ts[0]) for t in ts[1:]):
            raise ValueError(
                f"Non-floating buffer {n!r} differs between inputs; resolve it explicitly before merging"
            )
        copied[n] = ts[0].clone()
    supplied = dict(parameters or {})
    for key, value in supplied.items():
        if _per_group(value):
            if len(value.values) != len(names):
                raise ValueError(f"Parameter {key} expects {len(names)} group values")
            supplied[key] = PerTensorValues([value.values[names.index(n)] for n in merged_names])
    calls, skipped = [], {}
    for i, n in enumerate(merged_names):
        call = _prepare(m, [sd[n] for _, sd in sds], ids, base_index, n, supplied, dtype, out_dtype, i,
                        len(merged_names))  # fmt: skip
        if call is None:
            skipped[n] = True
        else:
            calls.append(call)
    results = _run(calls, _seed(seed, m), backend)
    out = {merged_names[i]: r for i, r in results.items()}
    out.update(copied)
    return {n: out[n] for n in names if n in out}


def _unknown(m: MergeMethod, parameters) -> None:
    unknown = set(parameters or {}) - {p.name for p in m.params}
    if unknown:
        raise TypeError(f"Unknown parameter(s) for {m.name}: {', '.join(sorted(unknown))}")


def _as_state_dict(model):
    import torch

    if isinstance(model, torch.nn.Module):
        model = model.state_dict(keep_vars=True)
    if not isinstance(model, Mapping):
        raise TypeError(f"Expected a module or state dict, got {type(model).__name__}")
    if not all(isinstance(k, str) for k in model):
        raise TypeError("State dictionary keys must be strings")
    if not all(isinstance(t, torch.Tensor) for t in model.values()):
        raise TypeError("State dictionary values must be tensors")
    return model
