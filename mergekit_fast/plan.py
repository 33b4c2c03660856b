"""The merge plan: every output tensor with its inputs, dtypes and resolved parameters.

`build_plan(config)` opens the input models (headers only: no tensor data is read), checks everything
that can be checked without data, and returns a `MergePlan` for the engine. It reproduces what mergekit
0.1.5's MergePlanner plans for the same config (tests/test_plan.py and tests/test_architectures.py
compare the two tensor by tensor):

- The layout comes from mergekit's architecture definition of the models (mergekit_fast.architectures):
  its modules (one for a language model; text decoder, projector and vision tower for a vision-language
  model; encoder and decoder), each with weights before its layers (from the first slice's sources),
  layer templates (``${layer_index}``) and weights after its layers (from the last slice's sources, as
  many as the first slice has). Architectures without a definition get mergekit's inferred layout:
  every ``.<i>.`` in a name marks a stack of layers, one module per stack, every other tensor from the
  first slice.
- `models:` merges every module; `slices:` needs a single module; `modules:` merges the modules it
  names, each with its own slices or models and parameters. Output layers are renumbered consecutively
  over a module's slices; input layer = ``layer_range[0] + offset``; gradient position
  t = offset / (n - 1) inside an output slice (t = 1 for a one-layer slice); weights outside the layers
  are resolved at t = 0.
- A weight is read under its name, else its aliases, else its tied names (a tied lm_head missing from a
  model's files is read from that model's embedding); an optional weight that no model stores under its
  name or aliases is not written.
- With a vocabulary (`tokenizer_source`, `tokenizer:`) or `--unsafe-truncate-embeddings`, every input
  of a weight with a vocabulary axis is re-indexed first (``InputRef.rows``, mergekit_fast.tokenizer).
- The output order is mergekit's write order: mergekit's scheduler runs tasks sorted by the largest INPUT
  tensor name of each output (so duplicated DUS layers are written next to their source, and a tied
  lm_head next to model.embed_tokens), ties in planning order.

Deliberate differences from mergekit 0.1.5 (each documented in the README):
- tensors in the files that the definition does not list (the biases of a Llama with attention_bias:
  true, a vision tower stored under other names) are merged, not dropped: with their layer when they sit
  in a stack of layers of a module, else as weights before (embeddings) or after the layers; per-layer
  `rotary_emb.inv_freq` buffers of old checkpoints are dropped, as mergekit does;
- a weight the definition lists that no input has at all (buffers transformers no longer saves, e.g.
  GPT-NeoX's attention.bias) is not written; mergekit fails ("required but not present");
- a layer count the definition reads from a key the config does not have at the top level is read from
  text_config (Qwen2-VL under transformers 5; mergekit fails), and whisper's decoder prefix gets its dot;
- inferred layouts are read from the tensor names in the files, so the output keeps the files' names; a
  multi-module model whose checkpoint names differ from transformers 5's module names (LLaVA) is written
  complete and loadable (mergekit 0.1.5 drops its language model and renames its vision tower);
- num_hidden_layers is also updated for single-module architectures mergekit does not know (mergekit
  leaves it);
- with no base_model, "the first model" is the first model listed (mergekit: an arbitrary one);
- MoE models are refused as not supported yet.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from mergekit_fast import architectures as archs
from mergekit_fast import dtypes
from mergekit_fast.architectures import (
    KNOWN_ARCHITECTURES,
    LAYER_INDEX,
    MOE_ARCHITECTURES,
    MOE_KEYS,
    Definition,
    ModuleDef,
    WeightDef,
    is_pre_weight,
    split_stack,
)
from mergekit_fast.config import (
    ConfigError,
    MergeConfig,
    NotSupportedError,
    SliceSpec,
    dtype_from_name,
    normalize_model_path,
    resolve_parameter,
    resolving_scope,
)
from mergekit_fast.conversion import ConversionError, Fused, converted_layout, fused_shape
from mergekit_fast.dtypes import DType
from mergekit_fast.io.model import ModelError, ModelSource
from mergekit_fast.io.safetensors import TensorInfo
from mergekit_fast.methods import InputRef, MergeMethod, Scope, TensorGroup
from mergekit_fast.methods import get as get_method

LOG = logging.getLogger(__name__)

__all__ = [
    "InputRef", "KNOWN_ARCHITECTURES", "MOE_ARCHITECTURES", "MergePlan", "OutputTensor", "build_plan",
    "is_pre_weight", "read_vocab",
]  # fmt: skip


# --------------------------------------------------------------------------------------------------
# The contract with the engine


@dataclass(frozen=True)
class OutputTensor:
    name: str  # output tensor name
    shape: tuple[int, ...]
    in_dtype: DType  # inputs are cast to this before the math (config dtype, else promoted)
    out_dtype: DType  # dtype written (config out_dtype, else the method's result_dtype(in_dtype))
    method: str  # the registered merge method that computes it (mergekit_fast.methods.get)
    inputs: tuple[InputRef, ...]  # in the order the method reads them (the base first when has_base)
    params: tuple[tuple[str, object], ...]  # the method's planned parameters (methods/base.py)
    has_base: bool = False  # inputs[0] is the base model


@dataclass
class MergePlan:
    sources: dict[str, ModelSource]
    tensors: list[OutputTensor]  # in mergekit's write order
    out_config: dict  # the output config.json (write with json.dumps(indent=2, sort_keys=True) + "\n")
    tokenizer_source: Path | None  # where tokenizer files come from (base model, else first model)
    config_yaml: str  # the raw YAML text, for mergekit_config.yml
    # the tokenizer to write instead of copying tokenizer_source's files (a merged vocabulary or a chat
    # template): mergekit_fast.tokenizer.TokenizerOutput
    tokenizer: object | None = None
    tagalong: tuple[Path, ...] = ()  # files copied from the donor as they are (preprocessor_config.json)
    architecture: str = ""  # the definition used ("" when inferred), for messages
    extra_inputs: tuple[str, ...] = ()  # other directories the merge reads (a tokenizer's model)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_out_config"] = self.out_config  # a deferred config is computed before it travels
        return state


def _get_out_config(self) -> dict:
    value = self.__dict__["_out_config"]
    if isinstance(value, DeferredConfig):
        value = self.__dict__["_out_config"] = value.result()
    return value


def _set_out_config(self, value) -> None:
    self.__dict__["_out_config"] = value


# The output config.json may still be being computed when the plan is returned (DeferredConfig: a
# donor's config normalised through transformers, whose import takes seconds, overlapped with the
# merge); reading plan.out_config waits for it. Set after the class so the dataclass keeps the field.
MergePlan.out_config = property(_get_out_config, _set_out_config)  # type: ignore[assignment]


class DeferredConfig:
    """A config computed on a background thread: ``result()`` waits for it (and raises its error)."""

    def __init__(self, fn):
        import threading

        self._value: dict | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="mkf-out-config", daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # noqa: BLE001 - raised by result()
            self._error = exc

    def result(self) -> dict:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


_DROPPED_SUFFIX = "rotary_emb.inv_freq"  # non-persistent buffer in old checkpoints; mergekit drops it


# --------------------------------------------------------------------------------------------------
# Per-model index of tensor names


@dataclass
class _ModelIndex:
    key: str
    source: ModelSource
    where: str
    arch: str | None
    files: list[str]  # tensor names in file order, without dropped buffers
    num_layers_cache: dict[str, int] = field(default_factory=dict)
    # an MoE checkpoint in another layout than transformers 5's (mergekit_fast.conversion): model-layout
    # name -> file name (renamed tensors), and model-layout name -> its parts (fused expert tensors)
    renamed: dict[str, str] = field(default_factory=dict)
    fused: dict[str, Fused] = field(default_factory=dict)
    fused_infos: dict[str, TensorInfo] = field(default_factory=dict)

    @classmethod
    def build(cls, key: str, src: ModelSource, where: str) -> _ModelIndex:
        archs_ = src.config.get("architectures")
        if isinstance(archs_, list) and len(archs_) > 1:
            raise ConfigError(f"{where}: model {key}: config.json lists several architectures {archs_}")
        arch = archs_[0] if isinstance(archs_, list) and archs_ else None
        names = [n for n in src.tensors if not n.endswith(_DROPPED_SUFFIX)]
        ix = cls(key, src, where, arch, names)
        if _is_moe(arch, src.config):
            ix._convert()
        return ix

    def _convert(self) -> None:
        """mergekit loads an MoE checkpoint through transformers' conversion rules (per-expert tensors
        stacked into the fused ones its definitions name); so does this index, without copying anything."""
        try:
            self.renamed, self.fused = converted_layout(self.model_type, self.files)
            for name, f in self.fused.items():
                parts = [self.source.tensors[p] for p in f.parts]
                dts = {i.dtype for i in parts}
                if len(dts) > 1:
                    raise ConversionError(f"{name}: its parts have different dtypes {sorted(map(str, dts))}")
                shape = fused_shape(f, {i.name: tuple(i.shape) for i in parts})
                first = parts[0]
                nbytes = sum(i.nbytes for i in parts)
                self.fused_infos[name] = TensorInfo(name, first.dtype, shape, first.file, first.start,
                                                    first.start + nbytes)  # fmt: skip
        except ConversionError as exc:
            raise ConfigError(f"{self.where}: model {self.key}: {exc}") from None

    @property
    def names(self) -> list[str]:
        """The tensor names in the model layout (fused and renamed tensors under their model-layout names)."""
        if not self.fused and not self.renamed:
            return self.files
        consumed = {p for f in self.fused.values() for p in f.parts} | set(self.renamed.values())
        out = [n for n in self.files if n not in consumed]
        return out + list(self.renamed) + list(self.fused)

    @property
    def config(self) -> dict:
        return self.source.config

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    def has(self, name: str) -> bool:
        return name in self.source.tensors or name in self.renamed or name in self.fused

    def info(self, name: str) -> TensorInfo:
        if name in self.fused_infos:
            return self.fused_infos[name]
        return self.source.tensors[self.renamed.get(name, name)]

    def ref(self, name: str) -> InputRef:
        """The engine's reference to the tensor called ``name`` in the model layout."""
        if name in self.fused:
            return InputRef(self.key, name, parts=self.fused[name].parts)
        return InputRef(self.key, self.renamed.get(name, name))

    def config_int(self, key: str, what: str) -> int:
        """mergekit's get_config_value on this model's config: the dotted key in config.json, else under
        text_config (a multi-modal config whose text keys moved there: Qwen2-VL), else as transformers'
        config object gives it (attribute maps: T5's num_hidden_layers is its num_layers)."""
        value = archs.config_value(self.config, key, None)
        if value is None and "." not in key:
            value = archs.config_value(self.config, f"text_config.{key}", None)
        if value is None:
            value = _transformers_config_value(self.source.path, key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{self.where}: model {self.key}: config.json has no integer {key} ({what})")
        return value


def _transformers_config_value(path: Path, key: str):
    try:
        import transformers
    except ImportError:
        return None
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        obj = transformers.AutoConfig.from_pretrained(str(path))
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return None
    finally:
        transformers.logging.set_verbosity(verbosity)


# --------------------------------------------------------------------------------------------------
# Which layout: a definition of mergekit's, or its inference


def _is_moe(arch: str | None, cfg: dict) -> bool:
    text = cfg.get("text_config") or {}
    return arch in MOE_ARCHITECTURES or any(
        isinstance(c.get(k), int) and c.get(k) > 0 for c in (cfg, text) for k in MOE_KEYS
    )


def _definition(indexes: list[_ModelIndex], allow_crimes: bool) -> Definition:
    """mergekit's get_architecture_info: one JSON definition for all models, else inference."""
    found = [archs.lookup(ix.arch, ix.model_type) for ix in indexes]
    if all(d is not None for d in found):
        first = found[0]
        for ix, d in zip(indexes, found):
            if d.family != first.family and not allow_crimes:
                raise ConfigError(
                    f"{ix.where}: model {ix.key} is a {ix.arch} but {indexes[0].key} is a {indexes[0].arch}; "
                    "mergekit refuses to mix architectures without --allow-crimes"
                )
        return first
    names: dict[str, None] = {}
    for ix in indexes:
        names.update(dict.fromkeys(ix.names))
    return archs.infer(names)


def _common_components(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        n += 1
    return n


@dataclass
class _Module:
    """A module of the layout with the file tensors its definition does not list ("extras")."""

    d: ModuleDef
    stacks: dict[str, None]  # layer stacks planned per layer: the definition's and extra ones
    loose_pre: dict[str, None] = field(default_factory=dict)  # extra non-layer tensors before the layers
    loose_post: dict[str, None] = field(default_factory=dict)  # ... and after them

    @property
    def name(self) -> str:
        return self.d.name


class _Layout:
    """The definition's modules, each model's layer count per module, and where the extras go."""

    def __init__(self, d: Definition, indexes: dict[str, _ModelIndex]):
        self.d = d
        self.ix = indexes
        self.single_inferred = d.inferred and len(d.modules) == 1
        self.modules = {m.name: _Module(m, dict.fromkeys(m.stacks)) for m in d.modules}
        self.extra_layers: dict[str, dict[str, dict[int, dict[str, str]]]] = {}  # model -> stack -> i -> rest
        for key, ix in indexes.items():
            self._extras(key, ix)

    def num_layers(self, model: str, module: str) -> int:
        ix = self.ix[model]
        cached = ix.num_layers_cache.get(module)
        if cached is not None:
            return cached
        m = self.modules[module].d
        if self.single_inferred:
            try:
                n = ix.source.num_layers
            except ModelError:
                n = self._file_layers(ix, m)
        elif m.override_num_layers is not None and not m.inferred:
            n = m.override_num_layers
        elif m.inferred:
            n = self._file_layers(ix, m)
        elif m.num_layers_config_key:
            n = ix.config_int(m.num_layers_config_key, f"the layer count of module {m.name}")
        else:
            n = 0
        ix.num_layers_cache[module] = n
        return n

    @staticmethod
    def _file_layers(ix: _ModelIndex, m: ModuleDef) -> int:
        n = 0
        for name in ix.names:
            hit = split_stack(name)
            if hit and hit[0] in m.stacks:
                n = max(n, hit[1] + 1)
        return n

    def _module_of(self, name: str) -> _Module:
        """The module an extra tensor belongs to: the one whose names share the longest dotted prefix with
        it (ties: the first module)."""
        mods = list(self.modules.values())
        if len(mods) == 1:
            return mods[0]
        best, score = mods[0], -1
        for mod in mods:
            names = [mod.d.prefix + w.name for w in mod.d.pre + mod.d.layers + mod.d.post] + list(mod.stacks)
            s = max((_common_components(name, n) for n in names), default=0)
            if s > score:
                best, score = mod, s
        return best

    def _extras(self, key: str, ix: _ModelIndex) -> None:
        per_stack: dict[str, dict[int, dict[str, str]]] = {}
        self.extra_layers[key] = per_stack
        if self.d.inferred:
            return  # the layout was inferred from these very names (layers past the count: see below)
        counts = {m: self.num_layers(key, m) for m in self.modules}
        claimed = self.d.all_names(counts)
        for name in ix.names:
            if name in claimed:
                continue
            hit = split_stack(name)
            if hit is None:
                mod = self._module_of(name)
                (mod.loose_pre if is_pre_weight(name) else mod.loose_post)[name] = None
                continue
            stack, i, rest = hit
            mod = next((m for m in self.modules.values() if stack in m.stacks), None) or self._module_of(name)
            mod.stacks.setdefault(stack, None)
            n = counts[mod.name]
            if i >= n:
                what = (
                    f"config.json says {mod.d.num_layers_config_key}={n}" if mod.d.num_layers_config_key
                    else f"module {mod.name} has {n} layers"
                )  # fmt: skip
                raise ConfigError(f"{ix.where}: model {key}: its files hold layer {i} ({name}) but {what}")
            per_stack.setdefault(stack, {}).setdefault(i, {})[rest] = name

    def check_layer_counts(self, key: str) -> None:
        """Files holding layers beyond the configured count (in the definition's own stacks)."""
        ix = self.ix[key]
        for mod in self.modules.values():
            n = self.num_layers(key, mod.name)
            for name in ix.names:
                hit = split_stack(name)
                if hit and hit[0] in mod.d.stacks and hit[1] >= n:
                    what = (
                        f"config.json says {mod.d.num_layers_config_key or 'num_hidden_layers'}={n}"
                        if not mod.d.inferred or self.single_inferred
                        else f"module {mod.name} has {n} layers"
                    )
                    raise ConfigError(f"{ix.where}: model {key}: its files hold layer {hit[1]} but {what}")


# --------------------------------------------------------------------------------------------------
# Planning


def build_plan(
    config: MergeConfig,
    *,
    sources: dict[str, ModelSource] | None = None,
    allow_crimes: bool = False,
    use_transformers: bool | None = None,
    trust_remote_code: bool = False,
    unsafe_truncate_embeddings: bool = False,
    defer_config: bool = False,
) -> MergePlan:
    """Plan the merge described by `config`.

    sources: already opened models keyed by path (normalised like the config's); the others are opened.
    allow_crimes: allow models of different (known) architectures, like mergekit's --allow-crimes.
    use_transformers: build out_config through transformers' AutoConfig exactly as mergekit does (None:
    when transformers is importable; False: edit config.json's dict directly).
    unsafe_truncate_embeddings: mergekit's --unsafe-truncate-embeddings (vocabulary tensors of
    different sizes are cut to the smallest, without a tokenizer).
    defer_config: where use_transformers is None and the donor's config.json must go through
    transformers (not saved by the installed version), do that on a background thread: the plan comes
    back at once, and ``plan.out_config`` waits for it (the CLI reads it only once the weights are
    written, so transformers' import overlaps the merge). A failure there falls back to the dict, as
    without deferral.
    Raises ConfigError (or ModelError from opening a model) before any tensor data is read.
    """
    opened, indexes = _open_models(config, sources)

    definition = _definition(list(indexes.values()), allow_crimes)
    if definition.inferred and (config.tokenizer is not None or unsafe_truncate_embeddings):
        definition = _with_vocabulary_axes(definition, indexes[config.base_model or config.referenced_models()[0]],
                                           trust_remote_code)  # fmt: skip
    layout = _Layout(definition, indexes)
    for key in indexes:
        layout.check_layer_counts(key)
    module_slices = _module_slices(config, definition, layout)

    donor = config.donor_model()
    vocab = None
    if config.tokenizer is not None:
        from mergekit_fast.tokenizer import build_vocab

        vocab = build_vocab(
            config.tokenizer,
            base=config.base_model or config.referenced_models()[0],
            models=config.referenced_models(),
            configs={k: ix.config for k, ix in indexes.items()},
            trust_remote_code=trust_remote_code,
        )

    configured = config.configured_layer_counts(definition.module_names)
    out_layers = {mod: configured.get(mod, layout.num_layers(donor, mod)) for mod in definition.module_names}
    planner = _Planner(config, indexes, layout, vocab, unsafe_truncate_embeddings, out_layers)
    for mod, slices in module_slices.items():
        planner.plan_module(layout.modules[mod], slices)
    tensors = planner.tensors()
    if vocab is not None and not any(r.rows is not None for t in tensors for r in t.inputs):
        raise ConfigError(
            f"{config.tokenizer.where}: no tensor of these models is known to be indexed by token ids (the "
            "architecture has no definition in mergekit and transformers cannot build it), so the embeddings "
            "cannot be re-indexed to the new vocabulary (mergekit would leave them as they are)"
        )

    settings = _layer_settings(configured, layout, indexes[donor], vocab, definition)
    out_config = _out_config(
        opened[donor],
        config.out_dtype or config.dtype,
        settings,
        use_transformers=use_transformers,
        trust_remote_code=trust_remote_code,
        defer=defer_config,
    )

    tok_out = None
    extra_inputs: list[str] = []
    if vocab is not None or config.chat_template:
        from mergekit_fast.tokenizer import TokenizerOutput, resolve_chat_template

        template = resolve_chat_template(config.chat_template, config.referenced_models(),
                                         trust_remote_code=trust_remote_code)  # fmt: skip
        tok_out = TokenizerOutput(vocab, template, donor, trust_remote_code)
    tok_path = Path(donor)
    if config.tokenizer is not None and config.tokenizer.source not in ("base", "union"):
        extra_inputs.append(config.tokenizer.source)
        tok_path = Path(config.tokenizer.source)
    tagalong = tuple(Path(donor) / f for f in definition.tagalong_files if (Path(donor) / f).is_file())

    return MergePlan(
        sources=opened,
        tensors=tensors,
        out_config=out_config,
        tokenizer_source=tok_path,
        config_yaml=config.yaml_text,
        tokenizer=tok_out,
        tagalong=tagalong,
        architecture=definition.family,
        extra_inputs=tuple(extra_inputs),
    )


def _open_models(config: MergeConfig, sources) -> tuple[dict[str, ModelSource], dict[str, _ModelIndex]]:
    """Every model the config names, opened (headers only) and indexed; ``sources`` are already open."""
    given = {normalize_model_path(k, config.base_dir): v for k, v in (sources or {}).items()}
    opened: dict[str, ModelSource] = {}
    indexes: dict[str, _ModelIndex] = {}
    for key in config.referenced_models():
        where = config.where(key)
        src = given.get(key)
        if src is None:
            try:
                src = ModelSource.open(key)
            except ModelError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        opened[key] = src
        indexes[key] = _ModelIndex.build(key, src, where)
    return opened, indexes


def _module_slices(
    config: MergeConfig, definition: Definition, layout: _Layout
) -> dict[str, list[SliceSpec]]:
    """The config's slices per module of the layout, with their layer ranges checked against the models."""
    what = f"the model ({definition.family or 'inferred layout'})"
    module_slices = config.module_slices(definition.module_names, layout.num_layers, what=what)
    for mod, slices in module_slices.items():
        for s in slices:
            if len({src.length for src in s.sources}) > 1:
                counts = ", ".join(f"{src.model}: {src.length}" for src in s.sources)
                raise ConfigError(
                    f"{s.where}: all inputs of a slice must have the same number of layers; got {counts}"
                )
            for src in s.sources:
                n = layout.num_layers(src.model, mod)
                if src.end > n:
                    raise ConfigError(
                        f"{src.where}.layer_range: [{src.start}, {src.end}] goes past the last layer of "
                        f"{src.model}, which has {n} layers"
                        + (
                            ""
                            if len(module_slices) == 1 and len(definition.modules) == 1
                            else f" in module {mod}"
                        )
                    )

    return module_slices


def _layer_settings(
    configured: dict[str, int], layout: _Layout, donor: _ModelIndex, vocab, definition
) -> dict:
    """The config.json keys the output sets: each module's layer count, and the merged vocabulary's size."""
    settings: dict[str, int] = {}
    for mod, n in configured.items():
        mdef = layout.modules[mod].d
        key = mdef.num_layers_config_key
        if key is None and layout.single_inferred:
            key = _layer_key(donor.config)  # mergekit leaves it; see the module docstring
        if key is None:
            if n > 0:
                LOG.warning("module %s has no config key for its number of layers; %d is not written", mod, n)
            continue
        settings[key] = n
    if vocab is not None:
        settings[definition.vocab_size_config_key or "vocab_size"] = vocab.size
    return settings


def _with_vocabulary_axes(d: Definition, ix: _ModelIndex, trust_remote_code: bool) -> Definition:
    """An inferred layout with the vocabulary axes transformers gives (mergekit's inference does the same
    on the base model)."""
    shapes = {n: tuple(info.shape) for n, info in ix.source.tensors.items()}
    axes = archs.vocabulary_axes(ix.source.path, ix.config, shapes, trust_remote_code=trust_remote_code)
    if not axes:
        return d

    def mark(ws):
        return tuple(replace(w, vocabulary_axis=axes.get(w.name)) for w in ws)

    return replace(d, modules=tuple(replace(m, pre=mark(m.pre), post=mark(m.post)) for m in d.modules))


class _Planner:
    def __init__(self, config: MergeConfig, indexes: dict[str, _ModelIndex], layout: _Layout, vocab,
                 truncate: bool, out_layers: dict[str, int | None]):  # fmt: skip
        self.config = config
        self.ix = indexes
        self.layout = layout
        self.vocab = vocab
        self.truncate = truncate
        self.out_layers = out_layers
        self.method = config.method
        self.in_dtype = dtype_from_name(config.dtype)
        self.out_dtype = dtype_from_name(config.out_dtype)
        self.entries: dict[str, tuple[str, int, OutputTensor]] = {}
        self.seq = 0
        self.absent: list[str] = []  # weights of the definition that no input has

    def tensors(self) -> list[OutputTensor]:
        if self.absent:
            LOG.info("%d weight(s) of the architecture definition are in no input and are not written: %s",
                     len(self.absent), ", ".join(self.absent[:5]))  # fmt: skip
        return [t for _, _, t in sorted(self.entries.values(), key=lambda e: (e[0], e[1]))]

    # -- mergekit's plan_module / plan_slice / plan_layer

    def plan_module(self, mod: _Module, slices: list[SliceSpec]) -> None:
        first, last = slices[0], slices[-1]
        n_out = self.out_layers.get(mod.name)
        pre = mod.d.pre_weights(n_out if mod.d.uses_num_layers else None)
        for w in pre:
            self.plan_tensor(w, [w] * len(first.models), first.models, first, 0)
        for name in mod.loose_pre:
            w = WeightDef(name)
            self.plan_tensor(w, [w] * len(first.models), first.models, first, 0, extra=True)

        out_layer = 0
        for s in slices:
            n = s.length
            for offset in range(n):
                t = offset / (n - 1) if n > 1 else 1
                self.plan_layer(mod, s, offset, out_layer, t)
                out_layer += 1

        post_models = last.models[: len(first.models)]
        post = mod.d.post_weights(n_out if mod.d.uses_num_layers else None)
        for w in post:
            self.plan_tensor(w, [w] * len(post_models), post_models, last, 0)
        for name in mod.loose_post:
            w = WeightDef(name)
            self.plan_tensor(w, [w] * len(post_models), post_models, last, 0, extra=True)

    def plan_layer(self, mod: _Module, s: SliceSpec, offset: int, out_layer: int, t: float) -> None:
        n_out = self.out_layers.get(mod.name)
        outs = mod.d.layer_weights(out_layer, n_out if mod.d.uses_num_layers else None)
        ins = [
            mod.d.layer_weights(src.start + offset, self.layout.num_layers(src.model, mod.name) if
                                mod.d.uses_num_layers else None)
            for src in s.sources
        ]  # fmt: skip
        for k, w in enumerate(outs):
            repeat = LAYER_INDEX not in mod.d.layers[k].name
            self.plan_tensor(w, [ws[k] for ws in ins], s.models, s, t, replaces=repeat)
        # the tensors of this layer the definition does not list
        for stack in mod.stacks:
            rests: dict[str, None] = {}
            for src in s.sources:
                layer = self.layout.extra_layers[src.model].get(stack, {}).get(src.start + offset, {})
                rests.update(dict.fromkeys(layer))
            for rest in rests:
                w_out = WeightDef(f"{stack}{out_layer}.{rest}")
                w_ins = [WeightDef(f"{stack}{src.start + offset}.{rest}") for src in s.sources]
                self.plan_tensor(w_out, w_ins, s.models, s, t, extra=True)

    def _optional(self, w: WeightDef) -> bool:
        return w.optional or self.layout.d.inferred

    def _shape_hint(self, m0: str, m1: str, name: str, s0, s1) -> str:
        """Why two inputs' shapes differ, in the models' own terms (config keys), where that is clear."""
        c0 = self.ix[m0].config
        c1 = self.ix[m1].config
        c0, c1 = c0.get("text_config") or c0, c1.get("text_config") or c1
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim")  # fmt: skip
        diff = [f"{k} {c0.get(k)} vs {c1.get(k)}" for k in keys if c0.get(k) != c1.get(k)]
        vocab_axis_only = len(s0) == len(s1) and s0[0] != s1[0] and tuple(s0[1:]) == tuple(s1[1:])
        if vocab_axis_only and all(d.startswith("vocab_size") for d in diff) and diff:
            return (
                " (different vocabulary sizes: merge them into one vocabulary with tokenizer_source: union, "
                "base or a model path (or a tokenizer: block), or cut them to the smallest with "
                "--unsafe-truncate-embeddings, as in mergekit)"
            )
        return f" (the models differ: {', '.join(diff)})" if diff else ""

    def plan_tensor(
        self,
        w_out: WeightDef,
        w_ins: list[WeightDef],
        models: list[str],
        s: SliceSpec,
        t: float,
        *,
        extra: bool = False,
        replaces: bool = False,
    ) -> None:
        """Plan one output tensor: resolve its inputs, resolve its parameters, check, then let the method
        plan the computation (its ``plan`` hook)."""
        resolved = self._resolve_inputs(w_out, w_ins, models)
        if resolved is None:
            return
        group = self._resolve_parameters(w_out, w_ins, models, resolved, s, t)
        self._vocabulary(group, w_out, s)
        self._check(group, s, t, [w.name for w in w_ins])
        planned = self.method.plan(group)
        if planned is None:
            return
        shapes = [self._shape(r) for r in planned.inputs]
        shape = shapes[0] if shapes else ()
        in_dtype = self.in_dtype
        if in_dtype is None:
            infos = [self.ix[r.model].info(r.tensor) for r in planned.inputs]
            in_dtype = infos[0].dtype
            for info in infos[1:]:
                in_dtype = dtypes.promote(in_dtype, info.dtype)
        tensor = OutputTensor(
            name=w_out.name,
            shape=shape,
            in_dtype=in_dtype,
            out_dtype=self.out_dtype
            or get_method(planned.method).result_dtype(in_dtype, dict(planned.params)),
            method=planned.method,
            inputs=planned.inputs,
            params=planned.params,
            has_base=planned.has_base,
        )
        label = max(r for r in resolved if r is not None)
        if w_out.name in self.entries and not replaces:
            raise ConfigError(f"output tensor {w_out.name} would be written twice")
        # mergekit writes a weight planned twice (a layer template without ${layer_index}) twice: the
        # last write wins
        self.entries[w_out.name] = (label, self.seq, tensor)
        self.seq += 1

    def _shape(self, ref: InputRef) -> tuple[int, ...]:
        shape = tuple(self.ix[ref.model].info(ref.tensor).shape)
        return ref.rows.out_shape(shape) if ref.rows is not None else shape

    def _resolve_inputs(self, w_out: WeightDef, w_ins, models) -> list[str | None] | None:
        """Per model, the tensor it contributes (name, aliases, tied names), None where it has none; None
        when the weight is not written. A weight that is not optional must be in every model that has it."""
        if w_out.optional and not any(any(self.ix[m].has(n) for n in w.names) for m, w in zip(models, w_ins)):
            return None  # mergekit skips an optional weight no model stores under its name or aliases
        resolved: list[str | None] = []
        for m, w in zip(models, w_ins):
            ix = self.ix[m]
            resolved.append(next((n for n in w.lookup_names if ix.has(n)), None))
        present = [i for i, r in enumerate(resolved) if r is not None]
        if not present:
            if not self._optional(w_out):
                self.absent.append(w_out.name)
            return None
        if len(present) < len(models) and not self._optional(w_out):
            i_missing = next(i for i, r in enumerate(resolved) if r is None)
            i_has = present[0]
            raise ConfigError(
                f"tensor {w_ins[i_missing].name} (for output {w_out.name}) is missing from model "
                f"{models[i_missing]} ({self.config.where(models[i_missing])}) but present in "
                f"{models[i_has]} as {resolved[i_has]}"
            )
        return resolved

    def _resolve_parameters(self, w_out, w_ins, models, resolved, s: SliceSpec, t) -> TensorGroup:
        """The method's parameters for this tensor, as mergekit resolves them at planning time: shared ones
        against the output name, per-input ones per model against its input name (non-base ones skip the
        base)."""
        method: MergeMethod = self.method
        gparams = self.config.parameters
        out_name = w_out.name
        shared = {
            p.name: resolve_parameter(p, s.parameter_scopes(None, gparams), tensor_name=out_name, t=t)
            for p in method.shared_params
        }
        per_input = {
            m: {
                p.name: resolve_parameter(p, s.parameter_scopes(m, gparams), tensor_name=w.name, t=t, model=m)
                for p in method.input_params
                if p.scope == Scope.INPUT or m != s.base_model
            }
            for m, w in zip(models, w_ins)
        }
        refs = [None if r is None else self.ix[m].ref(r) for m, r in zip(models, resolved)]
        return TensorGroup(
            name=out_name,
            models=list(models),
            refs=refs,
            base=s.base_model,
            shared=shared,
            per_input=per_input,
            optional=self._optional(w_out),
            where=self.config.where,
        )

    def _vocabulary(self, group: TensorGroup, w_out: WeightDef, s: SliceSpec) -> None:
        """Re-index the inputs of a vocabulary tensor (mergekit's PermutedVocabulary, TruncatedVocabulary)."""
        axis = w_out.vocabulary_axis
        if axis is None or (self.vocab is None and not self.truncate):
            return
        refs = group.refs
        infos = {i: self.ix[r.model].info(r.tensor) for i, r in enumerate(refs) if r is not None}
        for i, info in infos.items():
            if axis >= len(info.shape) or info.shape[axis] == 0:
                raise ConfigError(f"tensor {refs[i].tensor} of {refs[i].model}: no vocabulary axis {axis} in "
                                  f"shape {tuple(info.shape)}")  # fmt: skip
        others = {tuple(d for k, d in enumerate(info.shape) if k != axis) for info in infos.values()}
        if len(others) > 1 and self.method.same_shape:
            i0, i1 = list(infos)[:2]
            raise ConfigError(
                f"tensor {group.name}: the non-vocabulary dimensions of {group.models[i0]} "
                f"({tuple(infos[i0].shape)}) and {group.models[i1]} ({tuple(infos[i1].shape)}) differ"
            )
        if self.vocab is not None:
            maps = self.vocab.row_maps(
                group.name,
                refs,
                group.models,
                axis,
                lambda r: self.ix[r.model].info(r.tensor).shape[axis],
                s.base_model,
            )
            group.refs = [None if r is None else replace(r, rows=rm) for r, rm in zip(refs, maps)]
        elif self.truncate:
            from mergekit_fast.vocabulary import prefix

            sizes = {i: info.shape[axis] for i, info in infos.items()}
            n = min(sizes.values())
            if all(v == n for v in sizes.values()):
                return
            LOG.warning(
                "UNSAFE vocabulary truncation for %s: %s -> %d rows along axis %d (--unsafe-truncate-embeddings: "
                "this assumes the models' token ids agree on the rows kept)",
                group.name, [tuple(info.shape) for info in infos.values()], n, axis,
            )  # fmt: skip
            rm = prefix(axis, n)
            group.refs = [None if r is None else replace(r, rows=rm) for r in refs]

    def _check(self, group: TensorGroup, s: SliceSpec, t: float, in_names: list[str]) -> None:
        """The method's contract and value checks, then the inputs' shapes and dtypes."""
        method: MergeMethod = self.method
        method.check_inputs(group.models, group.base, f"output tensor {group.name}")
        names = dict(zip(group.models, in_names))
        gparams = self.config.parameters

        def where(param: str, model: str | None) -> str:
            """The key path of the setting that gave ``param`` its value (for ``model``; None: shared)."""
            spec = method.param(param)
            tensor = group.name if model is None else names[model]
            i = resolving_scope(spec, s.parameter_scopes(model, gparams), tensor_name=tensor, t=t)
            if i is None:
                return f"{param} (the default, {spec.default!r})"
            return f"{s.parameter_scope_paths(model)[i]}.{param}"

        method.check_values(group, where)

        refs = [(group.models[i], group.refs[i]) for i in group.present]
        if method.same_shape:
            m0, r0 = refs[0]
            s0 = self._shape(r0)
            for m, r in refs[1:]:
                sh = self._shape(r)
                if sh != s0:
                    raise ConfigError(
                        f"tensor {group.name}: shape mismatch between {m0} ({r0.tensor}: {s0}) and "
                        f"{m} ({r.tensor}: {sh}){self._shape_hint(m0, m, r0.tensor, s0, sh)}"
                    )
        for m, r in refs:
            info = self.ix[m].info(r.tensor)
            if not info.dtype.is_float:
                raise NotSupportedError(
                    f"tensor {r.tensor} of {m} has dtype {info.dtype}; merging non-floating-point tensors is "
                    "not supported yet"
                )


# --------------------------------------------------------------------------------------------------
# Output config.json


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def _out_config(
    donor: ModelSource,
    dtype_name: str | None,
    settings: dict[str, int] | int | None,
    *,
    use_transformers: bool | None,
    trust_remote_code: bool = False,
    defer: bool = False,
) -> dict | DeferredConfig:
    """The config.json mergekit writes: the donor's config with dtype, layer counts and vocabulary size set.

    mergekit loads it with transformers' AutoConfig, sets `torch_dtype` (out_dtype, else dtype), the
    layer count of every module it merged from slices (`num_hidden_layers`, `text_config.num_hidden_layers`,
    ...) and the vocabulary size, and saves it with save_pretrained, which normalises the file
    (transformers 5 writes `dtype`, converts legacy rope keys, stamps its own version). With transformers
    available this does the same; without it (or when the file would come back unchanged), it edits the
    dict: `torch_dtype` becomes `dtype`, nothing else changes. ``settings``: dotted key -> value (an int:
    the layer count under the donor's layer key, as older callers pass it).
    """
    if isinstance(settings, int):
        settings = {_layer_key(donor.config): settings}
    settings = dict(settings or {})
    in_dict = all(
        _parent_exists(donor.config, k) and archs.has_config_value(donor.config, k) for k in settings
    )
    if use_transformers is None and _saved_by_installed_transformers(donor.config) and in_dict:
        # transformers would load and save this file unchanged: skip its ~2 s import.
        use_transformers = False
    if use_transformers is None and defer:
        # transformers' import (2 to 4 s, torch's included) on a background thread, off the critical path
        return DeferredConfig(lambda: _out_config(donor, dtype_name, settings, use_transformers=None,
                                                  trust_remote_code=trust_remote_code))  # fmt: skip
    if use_transformers is not False:
        try:
            import transformers
        except ImportError:
            if use_transformers:
                raise
        else:
            verbosity = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()
            try:
                cfg = transformers.AutoConfig.from_pretrained(
                    str(donor.path), trust_remote_code=trust_remote_code
                )
            except Exception as exc:
                if use_transformers:
                    raise ConfigError(
                        f"{donor.path / 'config.json'}: transformers cannot load it ({exc})"
                    ) from None
                cfg = None
            try:
                if cfg is not None:
                    if dtype_name:
                        cfg.torch_dtype = dtype_name
                    for key, value in settings.items():
                        _set_attr(cfg, key, value)
                    if "transformers_weights" in cfg:  # save_pretrained drops it
                        delattr(cfg, "transformers_weights")
                    return json.loads(cfg.to_json_string(use_diff=True))
            finally:
                transformers.logging.set_verbosity(verbosity)
    out = json.loads(json.dumps(donor.config))
    if "torch_dtype" in out:
        out.setdefault("dtype", out.pop("torch_dtype"))
    if dtype_name:
        out["dtype"] = dtype_name
    for key, value in settings.items():
        if not _parent_exists(out, key):
            LOG.warning("cannot set %s in the output config.json; set it by hand to %s", key, value)
            continue
        if "." not in key and key not in out and isinstance(out.get("text_config"), dict) \
                and key in out["text_config"]:  # fmt: skip
            key = f"text_config.{key}"
        archs.set_config_value(out, key, value)
    return out


def _parent_exists(config: dict, key: str) -> bool:
    parts = key.split(".")
    return len(parts) == 1 or isinstance(archs.config_value(config, ".".join(parts[:-1]), None), dict)


def _set_attr(cfg, key: str, value) -> None:
    """mergekit's set_config_value on a transformers config; a key missing at the top level of a
    multi-modal config goes to its text_config when that has it (see the module docstring)."""
    parts = key.split(".")
    obj = cfg
    for part in parts[:-1]:
        obj = getattr(obj, part)
    leaf = parts[-1]
    text = getattr(obj, "text_config", None) if len(parts) == 1 else None
    try:
        getattr(obj, leaf)
        has = True
    except AttributeError:
        has = False
    if not has and text is not None and hasattr(text, leaf):
        obj = text
    setattr(obj, leaf, value)


def _saved_by_installed_transformers(config: dict) -> bool:
    from importlib import metadata

    try:
        return config.get("transformers_version") == metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return False


def _layer_key(cfg: dict) -> str:
    return next((k for k in _LAYER_KEYS if k in cfg), "num_hidden_layers")


# --------------------------------------------------------------------------------------------------
# Vocabularies


def read_vocab(model_dir) -> dict[str, int] | None:
    """The vocabulary of a fast tokenizer (tokenizer.json: model vocab plus added tokens), or None."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data["model"]
        vocab = model.get("vocab")
        if isinstance(vocab, dict):
            out = {str(k): int(v) for k, v in vocab.items()}
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            out = {str(item[0]): i for i, item in enumerate(vocab)}
        else:
            return None
        for tok in data.get("added_tokens") or ():
            out[str(tok["content"])] = int(tok["id"])
        return out
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ConfigError(f"{path}: cannot read the tokenizer ({exc})") from None
