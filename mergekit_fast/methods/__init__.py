"""Merge methods: the protocol (``base``), one file per method, and the registry.

``get(name)`` returns a registered ``MergeMethod``; ``names()`` lists the ones a config may name.
Built-ins are the modules of this package (every module but ``base`` and ``rng`` and those whose
name starts with ``_``): each defines its ``MergeMethod`` instances at module level, and importing it
must not import torch. Other installed packages add methods through the entry-point group
``mergekit_fast.methods`` (the entry point names a MergeMethod instance, a MergeMethod subclass, or
an iterable of either), loaded the first time the registry is consulted. See the README ("Adding a
merge method") for a complete example.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable

from mergekit_fast.methods.base import (
    MISSING,
    BasePolicy,
    Context,
    Contract,
    InputRef,
    MergeMethod,
    OptionalPolicy,
    Param,
    Planned,
    Scope,
    TensorGroup,
    passthrough_of,
)

__all__ = [
    "MISSING", "BasePolicy", "Context", "Contract", "InputRef", "MergeMethod", "OptionalPolicy", "Param",
    "Planned", "Scope", "TensorGroup", "passthrough_of", "get", "names", "register", "MERGEKIT_METHODS",
    "ENTRY_POINT_GROUP",
]  # fmt: skip

log = logging.getLogger("mergekit_fast")

ENTRY_POINT_GROUP = "mergekit_fast.methods"

# The merge methods mergekit 0.1.5 registers (mergekit.merge_methods.registered_methods()).
MERGEKIT_METHODS = (
    "arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della", "della_linear",
    "karcher", "linear", "model_stock", "multislerp", "nearswap", "nuslerp", "passthrough", "ram",
    "ramplus_tl", "sce", "slerp", "task_arithmetic", "ties",
)  # fmt: skip

_NOT_METHODS = frozenset({"base", "rng"})


def _builtin_modules() -> list[str]:
    import pkgutil

    return sorted(
        m.name
        for m in pkgutil.iter_modules(__path__)
        if not m.name.startswith("_") and m.name not in _NOT_METHODS
    )


_REGISTRY: dict[str, MergeMethod] = {}
_loaded = False


def register(method: MergeMethod) -> MergeMethod:
    """Make ``method`` available by its name; a name registered twice is an error."""
    if not isinstance(method, MergeMethod):
        raise TypeError(f"register() takes a MergeMethod instance, got {method!r}")
    if not method.name:
        raise ValueError(f"{type(method).__name__} has no name")
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"merge method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def _register_module(module) -> None:
    for value in vars(module).values():
        if isinstance(value, MergeMethod):
            register(value)


def _register_plugin(obj, where: str) -> None:
    if isinstance(obj, type) and issubclass(obj, MergeMethod):
        obj = obj()
    if isinstance(obj, MergeMethod):
        register(obj)
    elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        for item in obj:
            _register_plugin(item, where)
    elif callable(obj):
        _register_plugin(obj(), where)
    else:
        raise TypeError(f"entry point {where} gives {obj!r}, not a MergeMethod")


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in _builtin_modules():
        _register_module(importlib.import_module(f"mergekit_fast.methods.{name}"))
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        where = f"{ep.name} = {ep.value} ({ENTRY_POINT_GROUP})"
        try:
            _register_plugin(ep.load(), where)
        except Exception as exc:  # noqa: BLE001 - a broken plug-in must not break the built-ins
            log.warning("merge method plug-in %s could not be loaded: %s: %s", where, type(exc).__name__, exc)


def get(name: str) -> MergeMethod:
    """The registered method called ``name`` (KeyError if none)."""
    _load()
    return _REGISTRY[name]


def names(*, internal: bool = False) -> list[str]:
    """The names of the registered methods (those a config may name, unless ``internal``)."""
    _load()
    return sorted(n for n, m in _REGISTRY.items() if internal or not m.internal)
