"""Architecture facts: mergekit 0.1.5's definitions, and its inference for the architectures it lacks.

The definitions are data generated from mergekit/_data/architectures/*.json (``data/architectures.json``,
written by scripts/gen_architectures.py; tests/test_architectures.py checks it against the installed
mergekit), read without importing mergekit, transformers or torch. A definition has one or more
**modules** (a language model; or a vision tower, a projector and a text decoder; or an encoder and a
decoder), each with its weight prefix, the config key that holds its layer count (dotted for nested
configs, ``vision_config.depth``) or a fixed count, and its weights before the layers (``pre``), per
layer (templates with ``${layer_index}``) and after the layers (``post``). A weight may be optional, have
aliases (other names it may be stored under), tied names (tensors read in its place when it is missing,
the tied lm_head) and a vocabulary axis (the axis indexed by token ids: embeddings and heads).

``lookup(arch_name, model_type)`` picks the definition mergekit picks (``arch_info_for_config``): the only
one for that name, else the one whose model_type matches, else none (then the layout is inferred).
``infer(names)`` is mergekit's inference (architecture/auto.py) on the tensor names in the files: every
``.<i>.`` (the first numbered component of a name) marks a stack of layers; one stack gives one module
holding every other tensor too, several stacks give one module per stack plus one (``default``) for the
tensors outside every stack.

Names kept for older callers: ``KNOWN_ARCHITECTURES`` (the single-module, dense definitions whose layers
are named ``<prefix>layers.<i>.<rest>``, as ``KnownArchitecture``), ``is_pre_weight``, ``AMBIGUOUS``,
``MOE_ARCHITECTURES``, ``MOE_KEYS``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "architectures.json"
CHAT_TEMPLATES = Path(__file__).resolve().parent / "data" / "chat_templates.json"

LAYER_INDEX = "${layer_index}"
# mergekit's RE_LAYER_INDEX: the first numbered component of a tensor name starts a stack of layers.
STACK = re.compile(r"\.(\d+)\.")
# mergekit's TemplateWithArithmetic: $name or ${name}, where name may end in +1 or -1.
_TEMPLATE = re.compile(r"\$(?:\$|\{([_a-z][_a-z0-9]*(?:[+-]1)?)\}|([_a-z][_a-z0-9]*(?:[+-]1)?))")


def substitute(template: str, num_layers: int | None, layer_index: int | None = None) -> str:
    """mergekit's _template_substitution: ``${num_layers}``, ``${layer_index}`` and their +1/-1 forms.
    A template without ``{`` is returned as is (as in mergekit); an unknown name raises KeyError."""
    if "{" not in template:
        return template
    values: dict[str, int] = {}
    if num_layers is not None:
        values.update(
            {"num_layers": num_layers, "num_layers+1": num_layers + 1, "num_layers-1": num_layers - 1}
        )
    if layer_index is not None:
        values.update({"layer_index": layer_index, "layer_index+1": layer_index + 1,
                       "layer_index-1": layer_index - 1})  # fmt: skip

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return str(values[m.group(1) or m.group(2)])

    return _TEMPLATE.sub(one, template)


def needs_num_layers(template: str) -> bool:
    return "{" in template and "num_layers" in template


@dataclass(frozen=True)
class WeightDef:
    """One weight of a definition (mergekit's WeightInfo)."""

    name: str
    vocabulary_axis: int | None = None
    optional: bool = False
    aliases: tuple[str, ...] = ()
    tied_names: tuple[str, ...] = ()
    force_dtype: str | None = None

    @classmethod
    def from_json(cls, d: Mapping) -> WeightDef:
        return cls(
            name=d["name"],
            vocabulary_axis=d.get("vocabulary_axis"),
            optional=bool(d.get("optional", False)),
            aliases=tuple(d.get("aliases") or ()),
            tied_names=tuple(d.get("tied_names") or ()),
            force_dtype=d.get("force_dtype"),
        )

    def substituted(self, num_layers: int | None, layer_index: int | None = None) -> WeightDef:
        def s(x: str) -> str:
            return substitute(x, num_layers, layer_index)

        return replace(self, name=s(self.name), aliases=tuple(map(s, self.aliases)),
                       tied_names=tuple(map(s, self.tied_names)))  # fmt: skip

    def prefixed(self, prefix: str | None) -> WeightDef:
        if not prefix:
            return self
        return replace(self, name=prefix + self.name, aliases=tuple(prefix + a for a in self.aliases),
                       tied_names=tuple(prefix + t for t in self.tied_names))  # fmt: skip

    @property
    def names(self) -> tuple[str, ...]:
        """The names it may be stored under (name, then aliases): what mergekit looks for to decide whether
        an optional weight is present at all."""
        return (self.name, *self.aliases)

    @property
    def lookup_names(self) -> tuple[str, ...]:
        """What mergekit reads for it, in order: its name, its aliases, its tied names."""
        return (self.name, *self.aliases, *self.tied_names)


@dataclass(frozen=True)
class ModuleDef:
    """One module of a definition: weights before, per layer (templates) and after its layers."""

    name: str
    weight_prefix: str | None
    model_type: str
    num_layers_config_key: str | None
    override_num_layers: int | None
    pre: tuple[WeightDef, ...]
    layers: tuple[WeightDef, ...]
    post: tuple[WeightDef, ...]
    inferred: bool = False

    @classmethod
    def from_json(cls, d: Mapping) -> ModuleDef:
        return cls(
            name=d["name"],
            weight_prefix=d.get("weight_prefix"),
            model_type=d.get("model_type") or "",
            num_layers_config_key=d.get("num_layers_config_key"),
            override_num_layers=d.get("override_num_layers"),
            pre=tuple(map(WeightDef.from_json, d["pre_weights"])),
            layers=tuple(map(WeightDef.from_json, d["layer_templates"])),
            post=tuple(map(WeightDef.from_json, d["post_weights"])),
        )

    @property
    def prefix(self) -> str:
        """The weight prefix, prepended to every name. A prefix that does not end in ``.`` gets one:
        whisper.json's decoder says ``model.decoder``, with which mergekit 0.1.5 looks for
        ``model.decoderembed_tokens.weight`` and fails."""
        p = self.weight_prefix or ""
        return p if not p or p.endswith(".") else p + "."

    def pre_weights(self, num_layers: int | None) -> list[WeightDef]:
        return [w.substituted(num_layers).prefixed(self.prefix) for w in self.pre]

    def layer_weights(self, index: int, num_layers: int | None) -> list[WeightDef]:
        return [w.substituted(num_layers, index).prefixed(self.prefix) for w in self.layers]

    def post_weights(self, num_layers: int | None) -> list[WeightDef]:
        return [w.substituted(num_layers).prefixed(self.prefix) for w in self.post]

    @property
    def uses_num_layers(self) -> bool:
        """Whether any pre or post weight name depends on the module's layer count (phi-1's head)."""
        return any(needs_num_layers(n) for w in self.pre + self.post for n in w.lookup_names)

    @functools.cached_property
    def stacks(self) -> tuple[str, ...]:
        """The layer stacks of the module as full-name prefixes ending in ``.``: ``model.layers.`` for
        ``model.layers.${layer_index}.mlp.up_proj.weight``."""
        out: dict[str, None] = {}
        for w in self.layers:
            i = w.name.find(LAYER_INDEX)
            if i >= 0 and w.name[i + len(LAYER_INDEX) :].startswith("."):
                out[self.prefix + w.name[:i]] = None
        return tuple(out)

    @functools.cached_property
    def layer_rests(self) -> dict[str, frozenset[str]]:
        """Per stack, the ``<rest>`` parts its templates name (after ``<stack><i>.``)."""
        out: dict[str, set[str]] = {}
        for w in self.layers:
            i = w.name.find(LAYER_INDEX)
            if i < 0:
                continue
            stack = self.prefix + w.name[:i]
            for n in w.names:
                j = n.find(LAYER_INDEX)
                if j >= 0:
                    out.setdefault(stack, set()).add(n[j + len(LAYER_INDEX) + 1 :])
        return {k: frozenset(v) for k, v in out.items()}


@dataclass(frozen=True)
class Definition:
    """An architecture: one JSON definition of mergekit's, or one inferred from tensor names."""

    family: str  # the JSON file's stem ("" when inferred): merging needs one family, unless --allow-crimes
    architectures: tuple[str, ...]
    model_type: str
    modules: tuple[ModuleDef, ...]
    tagalong_files: tuple[str, ...] = ()
    vocab_size_config_key: str | None = None
    kind: str = "module"  # "module", "modular" or "inferred"

    @classmethod
    def from_json(cls, d: Mapping) -> Definition:
        return cls(
            family=d["family"],
            architectures=tuple(d["architectures"]),
            model_type=d["model_type"],
            modules=tuple(map(ModuleDef.from_json, d["modules"])),
            tagalong_files=tuple(d.get("tagalong_files") or ()),
            vocab_size_config_key=d.get("vocab_size_config_key"),
            kind=d.get("kind", "module"),
        )

    @property
    def inferred(self) -> bool:
        return self.kind == "inferred"

    def module(self, name: str) -> ModuleDef:
        return next(m for m in self.modules if m.name == name)

    @property
    def module_names(self) -> list[str]:
        return [m.name for m in self.modules]

    def all_names(self, num_layers: Mapping[str, int | None]) -> set[str]:
        """Every name (with aliases and tied names) the definition can read, for the given layer counts."""
        out: set[str] = set()
        for m in self.modules:
            n = num_layers.get(m.name)
            for w in m.pre_weights(n) + m.post_weights(n):
                out.update(w.lookup_names)
            for i in range(n or 0):
                for w in m.layer_weights(i, n):
                    out.update(w.lookup_names)
        return out


@functools.lru_cache(maxsize=1)
def definitions() -> tuple[Definition, ...]:
    """Every JSON definition of mergekit 0.1.5, in file-name order."""
    data = json.loads(DATA.read_text(encoding="utf-8"))
    return tuple(Definition.from_json(d) for d in data["definitions"])


@functools.lru_cache(maxsize=1)
def by_name() -> dict[str, tuple[Definition, ...]]:
    out: dict[str, list[Definition]] = {}
    for d in definitions():
        for name in d.architectures:
            out.setdefault(name, []).append(d)
    return {k: tuple(v) for k, v in out.items()}


def lookup(arch_name: str | None, model_type: str | None) -> Definition | None:
    """The definition mergekit uses for a config.json's architecture (its arch_info_for_config): the
    only one of that name, else the one whose model_type matches; None: mergekit infers the layout."""
    cands = by_name().get(arch_name or "", ())
    if len(cands) == 1:
        return cands[0]
    return next((c for c in cands if c.model_type == model_type), None)


@functools.lru_cache(maxsize=1)
def chat_templates() -> dict[str, str]:
    """mergekit's named chat templates (``chat_template: chatml``)."""
    return dict(json.loads(CHAT_TEMPLATES.read_text(encoding="utf-8"))["templates"])


# --------------------------------------------------------------------------------------------------
# Inference (mergekit's architecture/auto.py), from the names in the files


def split_stack(name: str) -> tuple[str, int, str] | None:
    """``(stack, index, rest)`` of a name inside a stack of layers (``stack`` ends in ``.``), else None."""
    m = STACK.search(name)
    if m is None:
        return None
    return name[: m.start() + 1], int(m.group(1)), name[m.end() :]


def infer(names: Iterable[str], *, optional: bool = True) -> Definition:
    """The layout mergekit infers from tensor names: one module per stack of layers (``<stack><i>.<rest>``
    templates, layer count = highest index + 1), and the other tensors as pre weights of the module of the
    single stack, or of a ``default`` module when there are several stacks. Every weight is optional
    (mergekit marks the weights some model lacks optional; a weight present in every model behaves the
    same either way)."""
    templates: dict[str, dict[str, None]] = {}
    counts: dict[str, int] = {}
    loose: dict[str, None] = {}
    for name in names:
        hit = split_stack(name)
        if hit is None:
            loose[name] = None
            continue
        stack, i, rest = hit
        templates.setdefault(stack, {})[f"{stack}{LAYER_INDEX}.{rest}"] = None
        counts[stack] = max(counts.get(stack, 0), i + 1)

    def weights(ns) -> tuple[WeightDef, ...]:
        return tuple(WeightDef(n, optional=optional) for n in ns)

    def module(name, pre, layers, n) -> ModuleDef:
        return ModuleDef(name=name, weight_prefix=None, model_type="", num_layers_config_key=None,
                         override_num_layers=n, pre=weights(pre), layers=weights(layers), post=(), inferred=True)  # fmt: skip

    if len(templates) <= 1:
        stack = next(iter(templates), None)
        mods = [module("default", loose, templates.get(stack, {}), counts.get(stack, 0))]
    else:
        mods = [module(stack[:-1], (), templates[stack], counts[stack]) for stack in sorted(templates)]
        if loose:
            mods.insert(0, module("default", loose, (), 0))
    return Definition(family="", architectures=(), model_type="", modules=tuple(mods), kind="inferred")


def vocabulary_axes(
    model_dir, config: Mapping, shapes: Mapping[str, Sequence[int]], *, trust_remote_code: bool = False
) -> dict[str, int]:
    """The token-indexed tensors of an architecture without a definition, as mergekit's inference finds
    them: transformers builds the model on the meta device (no memory, no weights) and its input and output
    embeddings (weights and biases) are the vocabulary tensors. transformers 5 may name them differently
    from the checkpoint (LLaVA: ``model.language_model.embed_tokens.weight`` for the stored
    ``language_model.model.embed_tokens.weight``), so each is matched to the stored tensor of the same name,
    else to the only one of its shape whose name ends the same way. Returns {stored name: axis}; empty
    when transformers cannot build the model. Imports torch and transformers."""
    archs = config.get("architectures") or []
    if len(archs) != 1:
        return {}
    try:
        import torch
        import transformers

        cls = getattr(transformers, archs[0], None)
        if cls is None:
            return {}
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            cfg = transformers.AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
            with torch.device("meta"):
                model = cls(cfg)
        finally:
            transformers.logging.set_verbosity(verbosity)
    except Exception:  # noqa: BLE001 - mergekit: "tied/ignored weights will not be detected"
        return {}
    wanted: dict[int, int] = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        for p in (getattr(module, "weight", None), getattr(module, "bias", None)):
            if p is not None:
                wanted[id(p)] = 0
    out: dict[str, int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in wanted:
            continue
        if name in shapes:
            out[name] = wanted[id(p)]
            continue
        tail = ".".join(name.split(".")[-2:])
        cands = [
            n
            for n, sh in shapes.items()
            if (n == tail or n.endswith("." + tail)) and tuple(sh) == tuple(p.shape)
        ]
        if len(cands) == 1:
            out[cands[0]] = wanted[id(p)]
    return out


# --------------------------------------------------------------------------------------------------
# Config values by dotted key (mergekit's get_config_value / set_config_value on the config.json dict)


_MISSING = object()


def config_value(config: Mapping, key: str, default=_MISSING):
    """The value at a dotted key of a config.json dict (``text_config.num_hidden_layers``)."""
    obj = config
    for part in key.split("."):
        if not isinstance(obj, Mapping) or part not in obj:
            if default is _MISSING:
                raise KeyError(key)
            return default
        obj = obj[part]
    return obj


def has_config_value(config: Mapping, key: str) -> bool:
    return config_value(config, key, None) is not None


def set_config_value(config: dict, key: str, value) -> None:
    parts = key.split(".")
    obj = config
    for part in parts[:-1]:
        obj = obj[part]
    obj[parts[-1]] = value


# --------------------------------------------------------------------------------------------------
# Names kept for older callers


@dataclass(frozen=True)
class KnownArchitecture:
    family: str  # the JSON definition's file stem: two models may be merged only within one family
    model_type: str  # mergekit picks among several definitions of one name by model_type
    tied: Mapping[str, str]  # optional output weight -> tensor read in its place when it is missing
    optional: tuple[str, ...] = ()  # optional non-layer weights (no tied fallback)
    optional_layer: tuple[str, ...] = ()  # optional per-layer weights (the <rest> part)
    definition: Definition | None = field(default=None, compare=False, repr=False)


# Names mergekit maps to more than one JSON definition (chosen by model_type; none matching: inferred).
AMBIGUOUS = frozenset(n for n, ds in by_name().items() if len(ds) > 1)

MOE_ARCHITECTURES = frozenset(
    {
        "MixtralForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen3MoeForCausalLM",
        "Qwen3VLMoeForConditionalGeneration",
        "Glm4MoeForCausalLM",
        "GraniteMoeHybridForCausalLM",
        "_AfmoePartialForCausalLM",
        "DeepseekV2ForCausalLM",
        "DeepseekV3ForCausalLM",
    }
)
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")

_LAYERS_TEMPLATE = re.compile(r"(?:^|\.)layers\.\$\{layer_index\}\.")


def _known_view() -> dict[str, KnownArchitecture]:
    """The dense single-module definitions named ``<prefix>layers.<i>.<rest>`` (the table this module held
    before it read every definition)."""
    out: dict[str, KnownArchitecture] = {}
    for d in definitions():
        if len(d.modules) != 1 or d.kind != "module":
            continue
        (m,) = d.modules
        if not m.layers or not all(_LAYERS_TEMPLATE.search(w.name) for w in m.layers):
            continue
        loose = m.pre + m.post
        if any("${" in w.name for w in loose):
            continue
        for name in d.architectures:
            if name in MOE_ARCHITECTURES:
                continue
            out[name] = KnownArchitecture(
                family=d.family,
                model_type=d.model_type,
                tied={w.name: w.tied_names[0] for w in loose if w.tied_names},
                optional=tuple(sorted(w.name for w in loose if w.optional and not w.tied_names)),
                optional_layer=tuple(
                    sorted(_LAYERS_TEMPLATE.split(w.name)[-1] for w in m.layers if w.optional)
                ),
                definition=d,
            )
    return dict(sorted(out.items()))


KNOWN_ARCHITECTURES: dict[str, KnownArchitecture] = _known_view()

# Markers of a non-layer tensor that sits before the layers (embeddings): what the planner uses for
# tensors in the files that a definition does not list. Checked against every definition in tests.
_PRE_MARKERS = ("embed", "wte", "wpe", "rotary_pos_emb", "position_ids", "relative_pe")


def is_pre_weight(name: str) -> bool:
    """True for a non-layer tensor mergekit plans before the layers (taken from the first slice)."""
    return any(m in name for m in _PRE_MARKERS) and "embed_out" not in name
