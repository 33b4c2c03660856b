"""The merge plan: every output tensor with its inputs, dtypes and resolved parameters.

`build_plan(config)` opens the input models (headers only: no tensor data is read), checks everything
that can be checked without data, and returns a `MergePlan` for the engine. It reproduces what mergekit
0.1.5's MergePlanner plans for the same config (tests/test_plan.py compares the two tensor by tensor):

- Tensor names follow `<prefix>layers.<i>.<rest>`; the tensors of one layer are whatever the files hold
  for that layer (union over a slice's sources). Output layers are renumbered consecutively over the
  slices; input layer = `layer_range[0] + offset`; gradient position t = offset / (n - 1) inside an output
  slice (t = 1 for a one-layer slice).
- Non-layer tensors are resolved at t = 0. For architectures mergekit knows (its JSON definitions;
  `KNOWN_ARCHITECTURES`), embeddings come from the first slice's sources and everything after the layers
  (final norm, lm_head) from the last slice's; for other architectures mergekit infers the layout and
  takes every non-layer tensor from the first slice, and so does this planner.
- A tied lm_head missing from a model's files is read from that model's embedding (mergekit's
  `tied_names`); an lm_head absent from every input is not written.
- The output order is mergekit's write order: mergekit's scheduler runs tasks sorted by the largest INPUT
  tensor name of each output (so duplicated DUS layers are written next to their source, and a tied
  lm_head next to model.embed_tokens), ties in planning order.

Deliberate differences from mergekit 0.1.5 (documented in the messages or below):
- tensors in the files that mergekit's architecture definition does not list (e.g. the biases of a
  Llama with attention_bias: true) are merged, not dropped; per-layer `rotary_emb.inv_freq` buffers of old
  checkpoints are dropped, as mergekit does;
- num_hidden_layers is also updated for architectures mergekit does not know (mergekit leaves it);
- with no base_model, "the first model" is the first model listed (mergekit: an arbitrary one);
- MoE models and multi-module (vision-language) models are refused as not supported yet.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mergekit_fast import dtypes
from mergekit_fast.architectures import (
    AMBIGUOUS,
    KNOWN_ARCHITECTURES,
    MOE_ARCHITECTURES,
    MOE_KEYS,
    KnownArchitecture,
    is_pre_weight,
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


_LAYER = re.compile(r"(?:^|(?<=\.))layers\.(\d+)\.")
_NUMBERED = re.compile(r"(?:^|\.)\d+(?:\.|$)")
_DROPPED_SUFFIX = "rotary_emb.inv_freq"  # non-persistent buffer in old checkpoints; mergekit drops it


# --------------------------------------------------------------------------------------------------
# Per-model index of tensor names


@dataclass
class _ModelIndex:
    key: str
    source: ModelSource
    where: str
    prefix: str
    layers: dict[int, dict[str, str]]  # layer index -> {rest: full name}
    loose: list[str]  # non-layer tensor names, in file order
    num_layers: int
    arch: str | None

    @classmethod
    def build(cls, key: str, src: ModelSource, where: str) -> _ModelIndex:
        prefixes: dict[str, str] = {}
        layers: dict[int, dict[str, str]] = {}
        loose: list[str] = []
        for name in src.tensors:
            m = _LAYER.search(name)
            if m:
                if name.endswith(_DROPPED_SUFFIX):
                    continue
                prefix = name[: m.start()]
                prefixes.setdefault(prefix, name)
                layers.setdefault(int(m.group(1)), {})[name[m.end() :]] = name
            else:
                if _NUMBERED.search(name):
                    raise ConfigError(
                        f"{where}: model {key}: tensor {name!r} has a numbered part but does not follow "
                        "<prefix>layers.<i>.<rest>; this architecture is not supported"
                    )
                loose.append(name)
        if len(prefixes) > 1:
            a, b = list(prefixes.values())[:2]
            raise NotSupportedError(
                f"{where}: model {key} has several stacks of layers ({a!r}, {b!r}); multi-module models "
                "(vision towers, encoder-decoders) are not supported yet"
            )
        if not prefixes:
            example = next(iter(src.tensors))
            raise ConfigError(
                f"{where}: model {key}: no tensor is named <prefix>layers.<i>.<rest> (e.g. {example!r}); "
                "this architecture is not supported"
            )
        try:
            n = src.num_layers
        except ModelError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        beyond = [i for i in layers if i >= n]
        if beyond:
            raise ConfigError(
                f"{where}: model {key}: its files hold layer {max(beyond)} but config.json says "
                f"num_hidden_layers={n}"
            )
        archs = src.config.get("architectures")
        if isinstance(archs, list) and len(archs) > 1:
            raise ConfigError(f"{where}: model {key}: config.json lists several architectures {archs}")
        arch = archs[0] if isinstance(archs, list) and archs else None
        return cls(key, src, where, next(iter(prefixes)), layers, loose, n, arch)

    def has(self, name: str) -> bool:
        return name in self.source.tensors

    def info(self, name: str) -> TensorInfo:
        return self.source.tensors[name]


def _known(index: _ModelIndex) -> KnownArchitecture | None:
    k = KNOWN_ARCHITECTURES.get(index.arch) if index.arch else None
    if k is not None and index.arch in AMBIGUOUS and index.source.config.get("model_type") != k.model_type:
        return None
    return k


def _check_architectures(indexes: list[_ModelIndex], allow_crimes: bool) -> KnownArchitecture | None:
    """mergekit's get_architecture_info: one JSON definition for all models, else inference."""
    for ix in indexes:
        cfg = ix.source.config
        text = cfg.get("text_config") or {}
        if ix.arch in MOE_ARCHITECTURES or any(
            isinstance(c.get(k), int) and c.get(k) > 0 for c in (cfg, text) for k in MOE_KEYS
        ):
            raise NotSupportedError(
                f"{ix.where}: model {ix.key} is a mixture-of-experts model ({ix.arch}); merging MoE models "
                "is not supported yet"
            )
    known = [_known(ix) for ix in indexes]
    if all(k is not None for k in known):
        first = known[0]
        for ix, k in zip(indexes, known):
            if k.family != first.family and not allow_crimes:
                raise ConfigError(
                    f"{ix.where}: model {ix.key} is a {ix.arch} but {indexes[0].key} is a {indexes[0].arch}; "
                    "mergekit refuses to mix architectures without --allow-crimes"
                )
        return first
    return None


# --------------------------------------------------------------------------------------------------
# Planning


def build_plan(
    config: MergeConfig,
    *,
    sources: dict[str, ModelSource] | None = None,
    allow_crimes: bool = False,
    use_transformers: bool | None = None,
    trust_remote_code: bool = False,
) -> MergePlan:
    """Plan the merge described by `config`.

    sources: already opened models keyed by path (normalised like the config's); the others are opened.
    allow_crimes: allow models of different (known) architectures, like mergekit's --allow-crimes.
    use_transformers: build out_config through transformers' AutoConfig exactly as mergekit does (None:
    when transformers is importable; False: edit config.json's dict directly).
    Raises ConfigError (or ModelError from opening a model) before any tensor data is read.
    """
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

    known = _check_architectures(list(indexes.values()), allow_crimes)
    prefixes = {ix.prefix for ix in indexes.values()}
    if len(prefixes) > 1:
        a, b = list(indexes.values())[:2]
        raise ConfigError(
            f"models {a.key} and {b.key} name their layers differently ({a.prefix!r}layers.N vs "
            f"{b.prefix!r}layers.N); they cannot be merged"
        )

    slices = config.slices(lambda m: indexes[m].num_layers)
    for s in slices:
        if len({src.length for src in s.sources}) > 1:
            counts = ", ".join(f"{src.model}: {src.length}" for src in s.sources)
            raise ConfigError(
                f"{s.where}: all inputs of a slice must have the same number of layers; got {counts}"
            )
        for src in s.sources:
            n = indexes[src.model].num_layers
            if src.end > n:
                raise ConfigError(
                    f"{src.where}.layer_range: [{src.start}, {src.end}] goes past the last layer of "
                    f"{src.model}, which has {n} layers"
                )

    planner = _Planner(config, indexes, known)
    planner.run(slices)
    tensors = [t for _, _, t in sorted(planner.entries, key=lambda e: (e[0], e[1]))]
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"output tensor {dup} would be written twice")

    donor = config.donor_model()
    num_layers = None if slices[0].from_models else sum(s.length for s in slices)
    out_config = _out_config(
        opened[donor],
        config.out_dtype or config.dtype,
        num_layers,
        use_transformers=use_transformers,
        trust_remote_code=trust_remote_code,
    )

    if config.tokenizer_source is None:
        tok_path = Path(donor)
    else:
        tok_path = Path(donor if config.tokenizer_source == "base" else config.tokenizer_source)
        vocab = _check_tokenizer(config, tok_path, indexes, tensors, known)
        out_config["vocab_size"] = len(vocab)

    return MergePlan(
        sources=opened,
        tensors=tensors,
        out_config=out_config,
        tokenizer_source=tok_path,
        config_yaml=config.yaml_text,
    )


class _Planner:
    def __init__(self, config: MergeConfig, indexes: dict[str, _ModelIndex], known: KnownArchitecture | None):
        self.config = config
        self.ix = indexes
        self.known = known
        self.method = config.method
        self.in_dtype = dtype_from_name(config.dtype)
        self.out_dtype = dtype_from_name(config.out_dtype)
        self.entries: list[tuple[str, int, OutputTensor]] = []

    def run(self, slices: list[SliceSpec]) -> None:
        first, last = slices[0], slices[-1]
        out_prefix = self.ix[self.config.donor_model()].prefix

        def loose_names(models: list[str], pre: bool | None) -> list[str]:
            names: dict[str, None] = {}
            for m in models:
                for n in self.ix[m].loose:
                    if pre is None or is_pre_weight(n) == pre:
                        names[n] = None
            return list(names)

        # Weights before the layers: from the first slice's sources (mergekit: pre_weights).
        pre = None if self.known is None else True
        for name in loose_names(first.models, pre):
            self.plan_tensor(name, [name] * len(first.models), first.models, first, 0, layer_rest=None)

        out_layer = 0
        for s in slices:
            n = s.length
            for offset in range(n):
                t = offset / (n - 1) if n > 1 else 1
                rests: dict[str, None] = {}
                in_layers = []
                for src in s.sources:
                    idx = src.start + offset
                    layer = self.ix[src.model].layers.get(idx)
                    if not layer:
                        raise ConfigError(f"{src.where}: model {src.model} has no tensors for layer {idx}")
                    in_layers.append(idx)
                    rests.update(dict.fromkeys(layer))
                for rest in rests:
                    in_names = [
                        f"{self.ix[src.model].prefix}layers.{i}.{rest}"
                        for src, i in zip(s.sources, in_layers)
                    ]
                    out_name = f"{out_prefix}layers.{out_layer}.{rest}"
                    self.plan_tensor(out_name, in_names, s.models, s, t, layer_rest=rest)
                out_layer += 1

        # Weights after the layers: from the last slice's sources, as many as the first slice has
        # (mergekit zips the last slice's models with a list sized by the first slice).
        if self.known is not None:
            post_models = last.models[: len(first.models)]
            for name in loose_names(post_models, False):
                self.plan_tensor(name, [name] * len(post_models), post_models, last, 0, layer_rest=None)

    def _optional(self, name: str, layer_rest: str | None) -> bool:
        if self.known is None:
            return True  # mergekit's inferred architectures mark weights missing from some model optional
        if layer_rest is not None:
            return layer_rest in self.known.optional_layer
        return name in self.known.optional or name in self.known.tied

    def _shape_hint(self, m0: str, m1: str, name: str, s0, s1) -> str:
        """Why two inputs' shapes differ, in the models' own terms (config keys), where that is clear."""
        c0 = self.ix[m0].source.config
        c1 = self.ix[m1].source.config
        c0, c1 = c0.get("text_config") or c0, c1.get("text_config") or c1
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim")  # fmt: skip
        diff = [f"{k} {c0.get(k)} vs {c1.get(k)}" for k in keys if c0.get(k) != c1.get(k)]
        vocab_axis_only = len(s0) == len(s1) and s0[0] != s1[0] and tuple(s0[1:]) == tuple(s1[1:])
        if (
            vocab_axis_only
            and (is_pre_weight(name) or "lm_head" in name)
            and all(d.startswith("vocab_size") for d in diff)
        ):
            return (
                " (different vocabulary sizes: mergekit needs a tokenizer config or "
                "--unsafe-truncate-embeddings, neither is supported yet)"
            )
        return f" (the models differ: {', '.join(diff)})" if diff else ""

    def plan_tensor(
        self,
        out_name: str,
        in_names: list[str],
        models: list[str],
        s: SliceSpec,
        t: float,
        *,
        layer_rest: str | None,
    ) -> None:
        """Plan one output tensor: resolve its inputs, resolve its parameters, check, then let the method
        plan the computation (its ``plan`` hook)."""
        resolved = self._resolve_inputs(out_name, in_names, models, layer_rest)
        if resolved is None:
            return  # an optional weight absent from every input is skipped
        group = self._resolve_parameters(out_name, in_names, models, resolved, s, t, layer_rest)
        self._check(group, s, t, in_names)
        planned = self.method.plan(group)
        if planned is None:
            return
        infos = [self.ix[r.model].info(r.tensor) for r in planned.inputs]
        shape = tuple(infos[0].shape) if infos else ()
        in_dtype = self.in_dtype
        if in_dtype is None:
            in_dtype = infos[0].dtype
            for info in infos[1:]:
                in_dtype = dtypes.promote(in_dtype, info.dtype)
        tensor = OutputTensor(
            name=out_name,
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
        self.entries.append((label, len(self.entries), tensor))

    def _resolve_inputs(self, out_name, in_names, models, layer_rest) -> list[str | None] | None:
        """Per model, the tensor it contributes (a tied weight's fallback included), None where it has none;
        None when no model has it. A weight that is not optional must be in every model."""
        resolved: list[str | None] = []
        for m, name in zip(models, in_names):
            ix = self.ix[m]
            if ix.has(name):
                resolved.append(name)
            elif layer_rest is None and self.known is not None and ix.has(self.known.tied.get(name, "\0")):
                resolved.append(self.known.tied[name])
            else:
                resolved.append(None)
        present = [i for i, r in enumerate(resolved) if r is not None]
        if not present:
            return None
        if len(present) < len(models) and not self._optional(in_names[0], layer_rest):
            i_missing = next(i for i, r in enumerate(resolved) if r is None)
            i_has = present[0]
            raise ConfigError(
                f"tensor {in_names[i_missing]} (for output {out_name}) is missing from model "
                f"{models[i_missing]} ({self.config.where(models[i_missing])}) but present in "
                f"{models[i_has]} as {resolved[i_has]}"
            )
        return resolved

    def _resolve_parameters(
        self, out_name, in_names, models, resolved, s: SliceSpec, t, layer_rest
    ) -> TensorGroup:
        """The method's parameters for this tensor, as mergekit resolves them at planning time: shared ones
        against the output name, per-input ones per model against its input name (non-base ones skip the
        base)."""
        method: MergeMethod = self.method
        gparams = self.config.parameters
        shared = {
            p.name: resolve_parameter(p, s.parameter_scopes(None, gparams), tensor_name=out_name, t=t)
            for p in method.shared_params
        }
        per_input = {
            m: {
                p.name: resolve_parameter(p, s.parameter_scopes(m, gparams), tensor_name=name, t=t, model=m)
                for p in method.input_params
                if p.scope == Scope.INPUT or m != s.base_model
            }
            for m, name in zip(models, in_names)
        }
        refs = [None if r is None else InputRef(m, r) for m, r in zip(models, resolved)]
        return TensorGroup(
            name=out_name,
            models=list(models),
            refs=refs,
            base=s.base_model,
            shared=shared,
            per_input=per_input,
            optional=self._optional(in_names[0], layer_rest),
            where=self.config.where,
        )

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

        infos = [(group.models[i], group.refs[i].tensor, self.ix[group.models[i]].info(group.refs[i].tensor))
                 for i in group.present]  # fmt: skip
        if method.same_shape:
            m0, n0, i0 = infos[0]
            for m, n, info in infos[1:]:
                if tuple(info.shape) != tuple(i0.shape):
                    raise ConfigError(
                        f"tensor {group.name}: shape mismatch between {m0} ({n0}: {tuple(i0.shape)}) and "
                        f"{m} ({n}: {tuple(info.shape)}){self._shape_hint(m0, m, n0, i0.shape, info.shape)}"
                    )
        for m, n, info in infos:
            if not info.dtype.is_float:
                raise NotSupportedError(
                    f"tensor {n} of {m} has dtype {info.dtype}; merging non-floating-point tensors is not "
                    "supported yet"
                )


# --------------------------------------------------------------------------------------------------
# Output config.json


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def _out_config(
    donor: ModelSource,
    dtype_name: str | None,
    num_layers: int | None,
    *,
    use_transformers: bool | None,
    trust_remote_code: bool = False,
) -> dict:
    """The config.json mergekit writes: the donor's config with dtype and the layer count set.

    mergekit loads it with transformers' AutoConfig, sets `torch_dtype` (out_dtype, else dtype) and
    `num_hidden_layers`, and saves it with save_pretrained, which normalises the file (transformers 5
    writes `dtype`, converts legacy rope keys, stamps its own version). With transformers available this
    does the same; without it, it edits the dict: `torch_dtype` becomes `dtype`, nothing else changes.
    """
    if use_transformers is None and _saved_by_installed_transformers(donor.config):
        # transformers would load and save this file unchanged: skip its ~2 s import.
        use_transformers = False
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
                    if num_layers is not None:
                        setattr(cfg, _layer_key(cfg.to_dict()), num_layers)
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
    if num_layers is not None:
        out[_layer_key(out)] = num_layers
    return out


def _saved_by_installed_transformers(config: dict) -> bool:
    from importlib import metadata

    try:
        return config.get("transformers_version") == metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return False


def _layer_key(cfg: dict) -> str:
    return next((k for k in _LAYER_KEYS if k in cfg), "num_hidden_layers")


# --------------------------------------------------------------------------------------------------
# tokenizer_source: base / a model path


def read_vocab(model_dir: str | os.PathLike) -> dict[str, int] | None:
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


_VOCAB_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "word_embeddings.weight", "embed_in.weight")


def _check_tokenizer(
    config: MergeConfig,
    tok_path: Path,
    indexes: dict[str, _ModelIndex],
    tensors: list[OutputTensor],
    known: KnownArchitecture | None,
) -> dict[str, int]:
    """mergekit re-indexes embeddings to the output tokenizer when tokenizer_source is set. Accept the
    configs where that re-indexing is the identity (every model's vocabulary agrees with the output
    tokenizer's, and embeddings have exactly one row per token), so the merge is unchanged."""
    what = f"tokenizer_source ({config.raw.tokenizer_source})"
    donor = config.donor_model()
    base_vocab = read_vocab(donor)
    if base_vocab is None:
        raise NotSupportedError(
            f"{what}: {donor} has no tokenizer.json; only fast tokenizers can be checked, others are not "
            "supported yet"
        )
    # mergekit's get_stripped_tokenizer drops the base tokens at or beyond its config's vocab_size
    size = indexes[donor].source.config.get("vocab_size")
    if isinstance(size, int):
        base_vocab = {k: v for k, v in base_vocab.items() if v < size}
    if config.tokenizer_source == "base":
        vocab_out = base_vocab
    else:
        vocab_out = read_vocab(tok_path)
        if vocab_out is None:
            raise NotSupportedError(
                f"{what}: {tok_path} has no tokenizer.json; only fast tokenizers can be checked, others are "
                "not supported yet"
            )
    n = len(vocab_out)
    for key, ix in indexes.items():
        # a model whose tokenizer cannot be loaded is assumed to share the base's (as mergekit does)
        vocab = base_vocab if key == donor else (read_vocab(key) or base_vocab)
        size = ix.source.config.get("vocab_size", len(vocab))
        for tok, i in vocab_out.items():
            if vocab.get(tok) != i or i >= size:
                raise NotSupportedError(
                    f"{what}: model {key} gives token {tok!r} a different id than the output tokenizer "
                    f"({vocab.get(tok)} vs {i}); re-indexing embeddings to a new vocabulary is not supported yet"
                )
    vocab_tensors = set(known.tied) | set(known.tied.values()) if known else set()
    for t in tensors:
        if t.name in vocab_tensors or t.name.endswith(_VOCAB_SUFFIXES):
            if t.shape[0] != n:
                raise NotSupportedError(
                    f"{what}: {t.name} has {t.shape[0]} rows but the output tokenizer has {n} tokens; mergekit "
                    "would resize the embeddings, which is not supported yet"
                )
    return vocab_out
