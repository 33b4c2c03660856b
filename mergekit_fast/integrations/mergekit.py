"""mergekit 0.1.5 on mergekit_fast's kernels: ``install()``, ``uninstall()``, and a ``mergekit-yaml`` entry.

``install()`` replaces the entries of mergekit's method registry (``mergekit.merge_methods.registry._METHODS``,
which mergekit's planner, graph executor and in-memory API all read by name at use time) with wrappers
that keep each method's ``spec`` -- its parameters, input contract, optional-tensor policy and
``uses_accelerator`` -- and compute through this package's implementation of the method. So mergekit's
own ``run_merge``, ``mergekit-yaml``, ``merge_tensors`` and ``merge_state_dicts`` plan, load, bind and
write exactly as before, and only the tensor math changes hands. ``uninstall()`` puts mergekit's original
objects back (the very same objects, in the same registry order).

    from mergekit_fast.integrations import mergekit as mkf_mergekit
    mkf_mergekit.install()
    ...  # mergekit's run_merge / merge_state_dicts / merge_tensors, unchanged
    mkf_mergekit.uninstall()

    python -m mergekit_fast.integrations.mergekit CONFIG OUT [mergekit-yaml options]

What a wrapper receives is mergekit's own execution call (``MergeMethod._execute``): the tensor groups
and their bound parameters (shared values, and ``PerInputValues`` keyed by the inputs' ids). It builds
this package's view of each group (inputs keyed by position, the base where mergekit marks one), lets
our method plan it (input order, parameter layout), checks the values our method would refuse in a
config, and calls the method's ``compute`` (``compute_many`` for the small tensors of a batching method,
packed as mergekit packs them, within ``BatchOptions``), on the inputs' device, in the input dtype
mergekit chose, then casts to ``out_dtype`` as mergekit does.

What stays on mergekit's code (said once per method and reason, on the ``mergekit_fast`` logger):

* at ``install()``: a registered method this package does not implement (a user's own method), or
  whose parameters differ in name or scope from ours;
* per tensor group: inputs that are not 16/32/64-bit floats or not on a CPU or CUDA device, inputs that
  require grad while grad mode is on (mergekit's torch code keeps the autograd graph; ours may not), an
  empty group, and values our method refuses (mergekit then raises its own error, or does what it does).

Random methods (dare_ties, dare_linear, della, della_linear; arcee_fusion's sample of large tensors)
draw from this package's counter-based generator (``mergekit_fast.methods.rng``), keyed by the output
tensor's name (``TensorGroup.metadata.name``; "" when mergekit has none, as in ``merge_tensors`` without
``name``) and a seed. mergekit keeps no seed object: ``--random-seed S`` calls ``transformers.set_seed(S)``,
which seeds torch's default generator, so the seed used is ``torch.initial_seed()`` read when the
tensor is merged -- S after ``--random-seed S`` (or ``torch.manual_seed(S)``), else torch's default seed
of the process. With the same seed, ``mergekit-yaml`` with ``install()`` gives the same bytes as
``mergekit-fast merge --random-seed S``. The draws differ from mergekit's torch.bernoulli stream (which
no other generator can reproduce): the results agree with mergekit's statistically, and exactly in
everything that is not drawn.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from mergekit_fast import methods as _methods
from mergekit_fast.config.errors import ConfigError
from mergekit_fast.methods import Context, InputRef, Scope, TensorGroup

log = logging.getLogger("mergekit_fast")

__all__ = [
    "install",
    "uninstall",
    "is_installed",
    "served",
    "main",
]  # and FastMergeMethod (built on first use)

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")

_lock = threading.Lock()
_originals: dict[str, Any] = {}  # name -> mergekit's own method object, while installed
_said: set[tuple[str, str]] = set()


def _say_once(method: str, reason: str) -> None:
    key = (method, reason)
    if key in _said:
        return
    _said.add(key)
    log.warning("mergekit method %s: %s", method, reason)


def _registry():
    try:
        from mergekit.merge_methods import registry
    except ImportError as exc:  # pragma: no cover - mergekit is a test dependency
        raise ImportError(
            "mergekit_fast.integrations.mergekit needs mergekit 0.1.5 (pip install mergekit==0.1.5)"
        ) from exc
    return registry


def _mismatch(spec, ours) -> str | None:
    """Why our method cannot take mergekit's bound parameters of ``spec``, or None."""
    mine = {p.name: p for p in ours.params}
    for p in spec.parameters:
        q = mine.get(p.name)
        if q is None:
            return f"mergekit's parameter {p.name!r} is unknown to mergekit_fast's {ours.name}"
        if q.scope.value != p.scope.value:
            return f"parameter {p.name!r} is {p.scope.value} in mergekit, {q.scope.value} in mergekit_fast"
    names = {p.name for p in spec.parameters}
    for q in ours.params:
        if q.name not in names and q.required:
            return f"mergekit_fast's {ours.name} requires {q.name!r}, which mergekit does not bind"
    return None


def _torch_mergekit_base():
    from mergekit.merge_methods.base import MergeMethod

    return MergeMethod


def _wrapper_class():
    global _WRAPPER
    if _WRAPPER is None:
        _WRAPPER = _make_wrapper_class(_torch_mergekit_base())
    return _WRAPPER


_WRAPPER = None


def _make_wrapper_class(base):
    class FastMergeMethod(base):
        """A mergekit ``MergeMethod`` with the original's ``spec`` whose execution runs this package's
        method; anything else (``merge_group``, ``merge_batch``, dataclass fields) is the original's."""

        def __init__(self, original, ours, backend: str = "auto"):
            self.original = original
            self.ours = ours
            self.backend = backend
            self.spec = original.spec
            self.supports_batching = original.supports_batching

        def __getattr__(self, name):
            if name in ("original", "ours", "backend", "spec", "supports_batching"):
                raise AttributeError(name)
            return getattr(self.original, name)

        def __repr__(self) -> str:
            return f"<mergekit method {self.spec.name} on mergekit_fast>"

        def validate_inputs(self, input_ids, base_id=None, *, group_name=None):
            return self.original.validate_inputs(input_ids, base_id, group_name=group_name)

        def _execute(self, groups, parameters, options, *, input_dtypes, out_dtype=None):
            return _execute(self, groups, parameters, options, input_dtypes, out_dtype)

    return FastMergeMethod


def __getattr__(name):  # FastMergeMethod is built on first use (it subclasses mergekit's class)
    if name == "FastMergeMethod":
        return _wrapper_class()
    raise AttributeError(name)


# ----------------------------------------------------------------------------- install / uninstall


def install(names: Sequence[str] | None = None, *, backend: str = "auto") -> list[str]:
    """Point mergekit's registered merge methods (all, or ``names``) at this package's kernels; returns the
    names now served. Methods this package cannot serve keep mergekit's code (logged once, with why).
    Calling it again is harmless (already served methods stay as they are)."""
    registry = _registry()
    wrapper = _wrapper_class()
    with _lock:
        wanted = list(registry._METHODS) if names is None else list(names)
        for name in wanted:
            if name not in registry._METHODS:
                raise KeyError(f"mergekit has no merge method {name!r}")
            current = registry._METHODS[name]
            if isinstance(current, wrapper):
                continue
            try:
                ours = _methods.get(name)
            except KeyError:
                _say_once(name, "not implemented by mergekit_fast; mergekit's own code runs it")
                continue
            why = _mismatch(current.spec, ours)
            if why is not None:
                _say_once(name, f"{why}; mergekit's own code runs it")
                continue
            _originals[name] = current
            registry._METHODS[name] = wrapper(current, ours, backend)
        return sorted(n for n, m in registry._METHODS.items() if isinstance(m, wrapper))


def uninstall() -> None:
    """Restore mergekit's own method objects (a method re-registered by someone else since is left alone)."""
    registry = _registry()
    wrapper = _wrapper_class()
    with _lock:
        for name, original in list(_originals.items()):
            if isinstance(registry._METHODS.get(name), wrapper):
                registry._METHODS[name] = original
            del _originals[name]


def is_installed(name: str | None = None) -> bool:
    """Whether ``name`` (or any method, when None) currently computes through mergekit_fast."""
    registry = _registry()
    wrapper = _wrapper_class()
    if name is not None:
        return isinstance(registry._METHODS.get(name), wrapper)
    return any(isinstance(m, wrapper) for m in registry._METHODS.values())


def served() -> list[str]:
    """The mergekit methods computing through mergekit_fast now."""
    registry = _registry()
    wrapper = _wrapper_class()
    return sorted(n for n, m in registry._METHODS.items() if isinstance(m, wrapper))


# ----------------------------------------------------------------------------- execution


class _Fallback(Exception):
    """This group runs on mergekit's own code; the message says why."""


def _group_view(ours, group, bound: dict):
    """Our TensorGroup for one of mergekit's groups: inputs keyed "0", "1", ... in mergekit's order."""
    entries = group.entries
    keys = [str(i) for i in range(len(entries))]
    key_of = {e.id: k for e, k in zip(entries, keys)}
    base = next((k for e, k in zip(entries, keys) if e.is_base), None)
    shared: dict[str, Any] = {}
    per_input: dict[str, dict[str, Any]] = {k: {} for k in keys}
    for p in ours.params:
        if p.name not in bound:
            if p.scope == Scope.SHARED:
                shared[p.name] = p.default
            else:
                for k in keys:
                    per_input[k][p.name] = p.default
            continue
        value = bound[p.name]
        if p.scope == Scope.SHARED:
            shared[p.name] = p.validate(value)
            continue
        for entry_id, v in value.items():  # PerInputValues: the inputs mergekit bound it for
            per_input[key_of[entry_id]][p.name] = p.validate(v)
    name = group.metadata.name or ""
    label = name or "tensor"
    view = TensorGroup(name=label, models=keys, refs=[InputRef(k, label) for k in keys], base=base,
                       shared=shared, per_input=per_input, optional=False)  # fmt: skip
    return view, name


def _plan_one(wrapper, group, bound: dict, in_dtype):
    """(planned method, inputs in its order, its params, tensor name) or raise _Fallback."""
    import torch

    ours = wrapper.ours
    if not group.entries:
        raise _Fallback("an empty tensor group")
    tensors = [e.tensor for e in group.entries]
    if in_dtype is None or str(in_dtype).replace("torch.", "") not in _FLOAT_DTYPES:
        raise _Fallback(f"input dtype {in_dtype} (mergekit_fast serves 16, 32 and 64-bit floats)")
    if any(str(t.dtype).replace("torch.", "") not in _FLOAT_DTYPES for t in tensors):
        raise _Fallback(f"input dtypes {sorted({str(t.dtype) for t in tensors})}")
    if any(t.device.type not in ("cpu", "cuda") for t in tensors):
        raise _Fallback(f"inputs on {tensors[0].device.type}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise _Fallback("inputs require grad (mergekit's torch code keeps the autograd graph)")
    try:
        view, name = _group_view(ours, group, bound)
        ours.check_inputs(view.models, view.base, f"{ours.name}({view.name})")
        ours.check_values(
            view, lambda param, model=None: f"{param}" + (f" of input {model}" if model else "")
        )
        planned = ours.plan(view)
    except (ConfigError, ValueError, TypeError) as exc:
        raise _Fallback(f"mergekit_fast refuses these values ({exc})") from None
    if planned is None:
        raise _Fallback("mergekit_fast's plan writes no output for this group")
    method = _methods.get(planned.method)
    ordered = [tensors[int(r.model)] for r in planned.inputs]
    return method, ordered, dict(planned.params), name


def _execute(wrapper, groups, parameters, options, input_dtypes, out_dtype):
    import torch

    results: list = [None] * len(groups)
    fallback: list[int] = []
    calls = []  # (index, method, inputs, params, name, in_dtype)
    for i, (group, bound) in enumerate(zip(groups, parameters)):
        try:
            method, ordered, params, name = _plan_one(wrapper, group, bound, input_dtypes[i])
        except _Fallback as why:
            _say_once(wrapper.spec.name, f"{why}: mergekit's own code merges such tensors")
            fallback.append(i)
            continue
        calls.append((i, method, ordered, params, name, input_dtypes[i]))
    if fallback:
        done = wrapper.original._execute([groups[i] for i in fallback], [parameters[i] for i in fallback],
                                         options, input_dtypes=[input_dtypes[i] for i in fallback],
                                         out_dtype=out_dtype)  # fmt: skip
        for i, r in zip(fallback, done):
            results[i] = r
    seed = None
    if any(c[1].random for c in calls):
        seed = torch.initial_seed()
        _say_once(wrapper.spec.name, f"draws from mergekit_fast's counter-based generator with seed "
                  f"torch.initial_seed() = {seed} and the tensor name (not torch.bernoulli's stream)")  # fmt: skip
    threads = torch.get_num_threads()
    backend = wrapper.backend

    def ctx(name):
        return Context(name=name, seed=seed, backend=backend, threads=threads)

    def cast(inputs, dtype):
        return [t if t.dtype == dtype else t.to(dtype) for t in inputs]

    def finish(r):
        return r if out_dtype is None or r.dtype == out_dtype else r.to(out_dtype)

    # small tensors of a batching method: many per launch, within mergekit's BatchOptions
    buckets: dict[tuple, list] = {}
    for c in calls:
        i, method, inputs, params, name, dtype = c
        if method.batch_max_numel and inputs[0].numel() <= method.batch_max_numel:
            buckets.setdefault((method.name, dtype, inputs[0].device), []).append(c)
            continue
        with torch.no_grad():
            results[i] = finish(method.compute(cast(inputs, dtype), params, ctx(name)))
    for bucket in buckets.values():
        start = 0
        while start < len(bucket):
            end, size = start, 0
            while end < len(bucket) and end - start < options.max_groups:
                nbytes = sum(t.numel() for t in bucket[end][2]) * bucket[end][5].itemsize
                if end > start and size + nbytes > options.max_bytes:
                    break
                size += nbytes
                end += 1
            chunk = bucket[start:end]
            method = chunk[0][1]
            with torch.no_grad():
                out = method.compute_many([cast(c[2], c[5]) for c in chunk], [c[3] for c in chunk],
                                          [ctx(c[4]) for c in chunk])  # fmt: skip
            for c, r in zip(chunk, out):
                results[c[0]] = finish(r)
            start = end
    return tuple(results)


# ----------------------------------------------------------------------------- the mergekit-yaml entry


def main(argv: Sequence[str] | None = None):
    """``mergekit-yaml`` (mergekit's own click command) with every servable method on these kernels."""
    install()
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    return mergekit_yaml.main(args=None if argv is None else list(argv), prog_name="mergekit-yaml")


if __name__ == "__main__":
    # run the canonical module's main, so that its install state is the one mergekit_fast code sees
    from mergekit_fast.integrations import mergekit as _canonical

    _canonical.main()
