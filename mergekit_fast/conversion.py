"""Checkpoint layouts -> the model layout mergekit's definitions name (MoE experts, old names).

mergekit 0.1.5's definitions of MoE models (mixtral.json, qwen3_moe.json, ...) name transformers 5's
fused expert tensors (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I],
``mlp.gate.weight``), and mergekit converts other checkpoint layouts to them while loading, with the
conversion rules transformers 5 registers per model_type (``get_checkpoint_conversion_mapping``):
renamings (``block_sparse_moe.`` -> ``mlp.``) and stacks of per-expert tensors, concatenated per expert
(``experts.<e>.w1`` and ``w3`` -> gate_up_proj, ``experts.<e>.w2`` -> down_proj).

Every such stack is a concatenation of whole input tensors in a fixed order (expert 0's parts, expert
1's, ...): ``converted_layout`` says, for a model's tensor names, which fused tensor is which ordered
list of file tensors. The engine then reads a fused input as those parts, one after another (no
conversion pass, no whole-tensor copy for a file-to-file copy), and the planner treats it as the tensor
the definition names. The rules come from the installed transformers (imported only when a model's
files lack a name its definition lists); a rule this module cannot express as a concatenation is refused
with a clear error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


class ConversionError(ValueError):
    """A checkpoint layout the conversion rules cannot map to the model layout."""


@dataclass(frozen=True)
class Fused:
    """A model-layout tensor made of file tensors: ``parts`` concatenated in order, shape ``stack`` x the
    per-expert shape with dim 0 summed over the ``per_expert`` parts of one expert."""

    name: str
    parts: tuple[str, ...]
    experts: int
    per_expert: int  # parts per expert (2 for gate_up_proj, 1 for down_proj)


def _natural(value: str):
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"([0-9]+)", value))


def _rules(model_type: str | None):
    if not model_type:
        return None
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return None
    return get_checkpoint_conversion_mapping(model_type) or None


def converted_layout(model_type: str | None, names: Iterable[str]) -> tuple[dict[str, str], dict[str, Fused]]:
    """For a model's file tensor names: (renamed -> file name for tensors that are only renamed, fused name
    -> Fused), following transformers' conversion rules for ``model_type`` in order. Empty when there are
    no rules or nothing applies."""
    rules = _rules(model_type)
    if not rules:
        return {}, {}
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    current = {n: n for n in sorted(names, key=_natural)}  # model-layout name -> file name
    fused: dict[str, Fused] = {}
    for rule in rules:
        if isinstance(rule, WeightRenaming):
            renamed = {}
            for name, file in current.items():
                new, pattern = rule.rename_source_key(name)
                renamed[new if pattern is not None else name] = file
            current = renamed
            continue
        if not isinstance(rule, WeightConverter):
            continue
        ops = [(type(o).__name__, getattr(o, "dim", None)) for o in rule.operations]
        if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
            continue  # not a concatenation of whole tensors: leave those names to fail clearly later
        groups: dict[str, dict[int, dict[str, str]]] = {}
        for name in list(current):
            new, pattern = rule.rename_source_key(name)
            if pattern is None:
                continue
            wild = _wildcard(pattern, name)
            if wild is None:
                continue
            groups.setdefault(new, {}).setdefault(wild, {})[pattern] = current.pop(name)
        for target, experts in groups.items():
            order = sorted(experts)
            patterns = list(rule.source_patterns)
            parts: list[str] = []
            for e in order:
                missing = [p for p in patterns if p not in experts[e]]
                if missing:
                    raise ConversionError(
                        f"{target}: expert {e} lacks the checkpoint tensor matching {missing[0]!r}"
                    )
                parts.extend(experts[e][p] for p in patterns)
            if order != list(range(len(order))):
                raise ConversionError(f"{target}: the experts are numbered {order}, not 0..{len(order) - 1}")
            fused[target] = Fused(target, tuple(parts), len(order), len(patterns))
    renamed_only = {new: file for new, file in current.items() if new != file}
    return renamed_only, fused


def _wildcard(pattern: str, name: str) -> int | None:
    """The expert index the ``*`` of ``pattern`` matches in ``name``."""
    escaped = re.escape(pattern).replace(r"\*", r"(\d+)")
    m = re.search(escaped, name)
    return int(m.group(1)) if m else None


def fused_shape(f: Fused, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The fused tensor's shape from its parts' shapes (all experts alike; dim 0 summed per expert)."""
    first = [shapes[p] for p in f.parts[: f.per_expert]]
    rest = first[0][1:]
    for p in f.parts:
        if tuple(shapes[p][1:]) != tuple(rest):
            raise ConversionError(f"{f.name}: part {p} has shape {shapes[p]}, the others ..., {rest}")
    for e in range(f.experts):
        got = [shapes[p][0] for p in f.parts[e * f.per_expert : (e + 1) * f.per_expert]]
        if got != [s[0] for s in first]:
            raise ConversionError(
                f"{f.name}: expert {e}'s parts have {got} rows, expert 0's {[s[0] for s in first]}"
            )
    rows = sum(s[0] for s in first)
    return (f.experts, rows, *rest)
