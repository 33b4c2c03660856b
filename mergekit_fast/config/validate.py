"""A merge config checked as mergekit 0.1.5 checks it, with errors that name the key path.

`load_config(path)` / `parse_config(text_or_dict)` return a validated `MergeConfig`, or raise ONE
`ConfigError` (a ValueError) whose message starts with the key path of the problem, for example
`slices[1].sources[0].layer_range: ...`. Everything here is checked before any model is opened; checks
that need the models (layer counts, tensor names and shapes) happen in `plan.py`, still before any
tensor data is read. The merge method's declarations (``mergekit_fast.methods``) say which parameters
exist, their types and scopes, and which inputs the method takes: nothing here names a method.

Semantics follow mergekit 0.1.5 (`mergekit/config.py`, `parameter_resolver.py`, `plan.py`):
- exactly one of `models:` / `slices:`; `models:` becomes one slice per model over all its layers, and a
  `base_model` that is not listed is appended as a source;
- parameter precedence per tensor: the source's own `parameters` (per-input parameters only), then the
  slice's, then the top level; a level whose setting resolves to nothing (no filter matched, empty list)
  falls through to the next one;
- shared parameters never read a model's own `parameters`; per-input parameters do; shared ones match
  filters against the output tensor name, per-input ones against the input tensor name.

Deliberate differences from mergekit (each raises a clear error where mergekit would do something else):
- unknown keys are errors;
- scalar parameter values are type-checked up front (mergekit only when a tensor needs them);
- `layer_range` must satisfy 0 <= start < end (mergekit accepts an empty or reversed range);
- `chat_template` is checked here (mergekit: when the tokenizer is saved, after the merge);
- features not implemented yet raise `NotSupportedError`: `model+lora` references, `path@revision`,
  merge methods not registered.

`modules:` (mergekit's multi-module syntax) maps module names (``text_decoder``, ``vision_tower``, ...;
the names of the model's architecture definition, checked when the models are opened) to their own
`slices:` or `models:` and `parameters:`; a module's parameters sit between its slices' and the top-level
ones. `models:` merges every module of the model, `slices:` needs a model with a single module.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mergekit_fast.config.errors import ConfigError, NotSupportedError, describe, show
from mergekit_fast.config.parameters import ParameterSetting, leaves
from mergekit_fast.config.schema import MergeConfiguration

LOG = logging.getLogger("mergekit_fast.config")

# dtype names mergekit's dtype_from_name accepts (optionally prefixed "torch."), int64 excluded: merging
# needs floating-point tensors.
DTYPE_NAMES = ("bfloat16", "float16", "float32", "float64")


def dtype_from_name(name: str | None):
    """The dtype (mergekit_fast.dtypes.DType) of a config dtype name (`bfloat16`, `torch.float16`,
    ...), None for None."""
    from mergekit_fast import dtypes

    if not name:
        return None
    short = name[len("torch.") :] if name.startswith("torch.") else name
    if short not in DTYPE_NAMES:
        raise KeyError(short)
    return dtypes.BY_NAME[short]


@dataclass(frozen=True)
class SourceSpec:
    """One input of an output slice: layers [start, end) of `model` (a normalised absolute path)."""

    model: str
    start: int
    end: int
    parameters: Mapping[str, ParameterSetting] | None
    where: str  # key path, e.g. "slices[1].sources[0]" or "models[2]"

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SliceSpec:
    sources: tuple[SourceSpec, ...]
    base_model: str | None  # the slice's base_model, else the top-level one (normalised)
    parameters: Mapping[str, ParameterSetting] | None
    where: str
    from_models: bool = False  # built from a `models:` list (mergekit does not touch num_hidden_layers then)
    module_parameters: Mapping[str, ParameterSetting] | None = None  # `modules.<name>.parameters`
    module_where: str | None = None  # `modules.<name>` for a slice of a `modules:` entry

    @property
    def models(self) -> list[str]:
        return [s.model for s in self.sources]

    @property
    def length(self) -> int:
        return self.sources[0].length

    def parameter_scopes(self, model: str | None, global_params) -> list:
        """mergekit's ConfigReader.parameter_sources: highest precedence first. model=None: shared."""
        scopes = []
        if model is not None:
            scopes.extend(s.parameters for s in self.sources if s.model == model)
        scopes.append(self.parameters)
        if self.module_where is not None:
            scopes.append(self.module_parameters)
        scopes.append(global_params)
        return scopes

    def parameter_scope_paths(self, model: str | None) -> list[str]:
        """The key paths of ``parameter_scopes``' entries, for messages."""
        paths = [f"{s.where}.parameters" for s in self.sources if model is not None and s.model == model]
        if self.from_models:
            paths.append(f"{self.module_where}.parameters" if self.module_where else "parameters")
        else:
            paths.append(f"{self.where}.parameters")
        if self.module_where is not None:
            paths.append(f"{self.module_where}.parameters")
        paths.append("parameters")
        return paths


@dataclass(frozen=True)
class TokenSpec:
    """Where one token's embedding row comes from (``tokenizer.tokens.<token>``)."""

    kind: str  # "model" (the model's row for that token), "model_token" (a given row), "zero", "none"
    model: str | None = None  # normalised path
    token_id: int | None = None
    token: str | None = None
    force: bool = False
    where: str = ""


@dataclass(frozen=True)
class TokenizerSpec:
    """The output vocabulary: ``tokenizer_source`` or the ``tokenizer:`` block."""

    source: str  # "union", "base" or a normalised model path
    tokens: Mapping[str, TokenSpec]
    pad_to_multiple_of: int | None
    where: str  # "tokenizer_source" or "tokenizer"


@dataclass(frozen=True)
class MergeConfig:
    """A validated merge configuration. Model paths are normalised absolute paths (strings)."""

    raw: MergeConfiguration
    method: Any  # the merge method (mergekit_fast.methods.MergeMethod)
    base_model: str | None
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None  # None, "base", "union", or a normalised model path
    parameters: Mapping[str, ParameterSetting] | None
    yaml_text: str
    base_dir: str
    _where: Mapping[str, str]  # model path -> first key path that references it
    tokenizer: TokenizerSpec | None = None  # the output vocabulary, when the config asks for one
    chat_template: str | None = None

    @property
    def merge_method(self) -> str:
        return self.method.name

    def where(self, model: str) -> str:
        return self._where.get(model, "base_model")

    def referenced_models(self) -> list[str]:
        """Every model the config names (base_model first, then sources in order), without duplicates."""
        out: list[str] = []
        if self.base_model:
            out.append(self.base_model)
        if self.raw.models:
            out.extend(self._norm(m.model) for m in self.raw.models)
        for s in self.raw.slices or ():
            if s.base_model:
                out.append(self._norm(s.base_model))
            out.extend(self._norm(src.model) for src in s.sources)
        for mod in (self.raw.modules or {}).values():
            out.extend(self._norm(m.model) for m in mod.models or ())
            for s in mod.slices or ():
                if s.base_model:
                    out.append(self._norm(s.base_model))
                out.extend(self._norm(src.model) for src in s.sources)
        return list(dict.fromkeys(out))

    def donor_model(self) -> str:
        """The model whose config.json (and tokenizer) the output starts from: base_model, else the first
        source. (mergekit 0.1.5 takes `list(set(models))[0]` when there is no base_model, which depends on
        string hashing; the first listed model is the deterministic choice.)"""
        if self.base_model:
            return self.base_model
        if self.raw.models:
            return self._norm(self.raw.models[0].model)
        if self.raw.slices:
            return self._norm(self.raw.slices[0].sources[0].model)
        first = next(iter(self.raw.modules.values()))
        return self._norm(first.models[0].model if first.models else first.slices[0].sources[0].model)

    def slices(self, num_layers: Callable[[str], int] | None = None) -> list[SliceSpec]:
        """The output slices, as mergekit's normalize_config builds them.

        For a `models:` config every model becomes a source over [0, num_layers(model)), and a base_model
        not listed is appended; `num_layers` is required then.
        """
        if self.raw.modules is not None:
            raise TypeError("a `modules:` config has slices per module: use module_slices()")
        if self.raw.models:
            if num_layers is None:
                raise TypeError("num_layers is required to expand a `models:` config")
            return self._models_slices(self.raw.models, None, lambda m, _: num_layers(m), None, None)
        return self._slices_of(self.raw.slices, "slices")

    def module_slices(
        self, modules: list[str], num_layers: Callable[[str, str], int], *, what: str = "the model"
    ) -> dict[str, list[SliceSpec]]:
        """The output slices of every module mergekit plans (its normalize_config), by module name.

        ``modules``: the architecture's module names, in order; ``num_layers(model, module)``: a model's
        layer count in a module. `models:` gives every module one slice over all its layers; `slices:`
        needs a single module; `modules:` plans the modules it names, in its order.
        """
        if self.raw.modules is None:
            if self.raw.slices and len(modules) != 1:
                raise ConfigError(
                    f"slices: {what} has several modules ({', '.join(modules)}); slices: applies to a model "
                    "with a single module; use modules: with slices per module (or models:)"
                )
            if self.raw.slices:
                return {modules[0]: self.slices()}
            return {mod: self._models_slices(self.raw.models, mod, num_layers, None, None) for mod in modules}
        out: dict[str, list[SliceSpec]] = {}
        for name, mod in self.raw.modules.items():
            key = f"modules.{name}"
            if name not in modules:
                raise ConfigError(
                    f"{key}: {what} has no module {name!r}; its modules are: {', '.join(modules)}"
                )
            if mod.models:
                out[name] = self._models_slices(mod.models, name, num_layers, mod.parameters, key)
            else:
                out[name] = [
                    replace(s, module_parameters=mod.parameters, module_where=key)
                    for s in self._slices_of(mod.slices, f"{key}.slices")
                ]
        return out

    def _models_slices(self, models, module, num_layers, module_params, module_where) -> list[SliceSpec]:
        prefix = f"{module_where}.models" if module_where else "models"
        sources = [
            SourceSpec(self._norm(m.model), 0, 0, m.parameters, f"{prefix}[{i}]")
            for i, m in enumerate(models)
        ]
        if self.base_model and self.base_model not in [s.model for s in sources]:
            sources.append(SourceSpec(self.base_model, 0, 0, None, "base_model"))
        sources = [
            SourceSpec(s.model, 0, num_layers(s.model, module), s.parameters, s.where) for s in sources
        ]
        return [SliceSpec(tuple(sources), self.base_model, None, prefix, from_models=True,
                          module_parameters=module_params, module_where=module_where)]  # fmt: skip

    def _slices_of(self, slices, prefix: str) -> list[SliceSpec]:
        out = []
        for i, s in enumerate(slices):
            srcs = tuple(
                SourceSpec(
                    self._norm(src.model), *src.layer_range, src.parameters, f"{prefix}[{i}].sources[{j}]"
                )
                for j, src in enumerate(s.sources)
            )
            base = self._norm(s.base_model) if s.base_model else self.base_model
            out.append(SliceSpec(srcs, base, s.parameters, f"{prefix}[{i}]"))
        return out

    def configured_layer_counts(self, modules: list[str]) -> dict[str, int]:
        """The layer count mergekit writes into the output config per module (its _model_out_config):
        the sum of the slices' lengths, for `slices:` and for `modules:` entries given as slices."""
        if self.raw.slices:
            n = sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in self.raw.slices)
            return dict.fromkeys(modules, n)
        out = {}
        for name, mod in (self.raw.modules or {}).items():
            if mod.slices:
                out[name] = sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in mod.slices)
        return out

    def _norm(self, ref: str) -> str:
        return normalize_model_path(ref, self.base_dir)


def normalize_model_path(ref: str, base_dir: str | os.PathLike) -> str:
    """Absolute, normalised path of a model reference (relative paths resolve against base_dir)."""
    return os.path.normpath(os.path.join(os.fspath(base_dir), os.path.expanduser(ref)))


# --------------------------------------------------------------------------------------------------
# Loading


def read_config_file(path: str | os.PathLike, parse: Callable, **kw):
    """Read a YAML config file and ``parse`` its text; errors are prefixed with the file's path."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the config ({exc.strerror or exc})") from None
    try:
        return parse(text, **kw)
    except ConfigError as exc:
        raise type(exc)(f"{p}: {exc}") from None


def load_config(path: str | os.PathLike, *, base_dir: str | os.PathLike | None = None) -> MergeConfig:
    """Read and validate a YAML merge config. Relative model paths resolve against base_dir (default: the
    current directory, as mergekit does)."""
    return read_config_file(path, parse_config, base_dir=base_dir)


def parse_config(source: str | Mapping, *, base_dir: str | os.PathLike | None = None) -> MergeConfig:
    """Validate a merge config given as YAML text or as an already parsed mapping."""
    if isinstance(source, str):
        text = source
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid YAML: {exc}") from None
    else:
        data = source
        text = yaml.safe_dump(dict(source), sort_keys=False)
    if not isinstance(data, Mapping):
        raise ConfigError(f"the config must be a YAML mapping (key: value); got {show(data)}")
    try:
        raw = MergeConfiguration.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None
    return _check(raw, text, os.fspath(base_dir) if base_dir is not None else os.getcwd())


def _check(raw: MergeConfiguration, text: str, base_dir: str) -> MergeConfig:
    # Exactly one of models / slices / modules (mergekit tests truthiness: an empty one counts as absent).
    given = [k for k in ("models", "slices", "modules") if getattr(raw, k)]
    if len(given) != 1:
        which = " and ".join(given) if given else "none of them"
        raise ConfigError(
            f"models/slices/modules: exactly one of 'models', 'slices' or 'modules' must be given; got {which}"
        )
    if raw.tokenizer_source and raw.tokenizer:
        raise ConfigError(
            "tokenizer: give either tokenizer_source or a tokenizer: block (its source: key), not both"
        )

    method = lookup_method(raw.merge_method)

    for key in ("dtype", "out_dtype"):
        v = getattr(raw, key)
        if v is not None:
            short = v[len("torch.") :] if v.startswith("torch.") else v
            if short not in DTYPE_NAMES:
                raise ConfigError(f"{key}: unknown dtype {v!r}; use one of {', '.join(DTYPE_NAMES)}")

    # Model references.
    where: dict[str, str] = {}

    def ref(value: str, key: str, *, record: bool = True) -> str:
        if "+" in value:
            raise NotSupportedError(f"{key}: {value!r}: LoRA references (model+lora) are not supported yet")
        if "@" in value:
            if value.count("@") > 1:
                raise ConfigError(f"{key}: {value!r}: invalid model path, more than one '@'")
            raise NotSupportedError(
                f"{key}: {value!r}: revisions (path@revision) need the Hugging Face hub, which is not supported; "
                "download the model and use its local path"
            )
        path = normalize_model_path(value, base_dir)
        if record:
            where.setdefault(path, key)
        return path

    base = ref(raw.base_model, "base_model") if raw.base_model else None

    # Parameters: names and scalar types, everywhere they appear.
    _check_parameters(raw.parameters, method, "parameters")

    def check_models(models, key: str) -> None:
        for i, m in enumerate(models):
            ref(m.model, f"{key}[{i}].model")
            _check_parameters(m.parameters, method, f"{key}[{i}].parameters", per_model=True)

    def check_slices(slices, key: str) -> None:
        for i, s in enumerate(slices):
            k_slice = f"{key}[{i}]"
            if not s.sources:
                raise ConfigError(f"{k_slice}.sources: a slice needs at least one source")
            if s.base_model:
                ref(s.base_model, f"{k_slice}.base_model")
            _check_parameters(s.parameters, method, f"{k_slice}.parameters")
            for j, src in enumerate(s.sources):
                k = f"{k_slice}.sources[{j}]"
                ref(src.model, f"{k}.model")
                start, end = src.layer_range
                if not 0 <= start < end:
                    raise ConfigError(
                        f"{k}.layer_range: [{start}, {end}] is not a half-open range [start, end) with "
                        "0 <= start < end"
                    )
                _check_parameters(src.parameters, method, f"{k}.parameters", per_model=True)
            lengths = [src.layer_range[1] - src.layer_range[0] for src in s.sources]
            if len(set(lengths)) > 1:
                ranges = ", ".join(f"{list(src.layer_range)}" for src in s.sources)
                raise ConfigError(
                    f"{k_slice}.sources: all sources of a slice must have the same number of layers; got {ranges}"
                )

    if raw.models:
        check_models(raw.models, "models")
    elif raw.slices:
        check_slices(raw.slices, "slices")
    else:
        for name, mod in raw.modules.items():
            key = f"modules.{name}"
            if bool(mod.models) == bool(mod.slices):
                which = "both" if mod.models else "neither"
                raise ConfigError(f"{key}: exactly one of 'models' or 'slices' must be given; got {which}")
            _check_parameters(mod.parameters, method, f"{key}.parameters")
            if mod.models:
                check_models(mod.models, f"{key}.models")
            else:
                check_slices(mod.slices, f"{key}.slices")

    tok = raw.tokenizer_source
    if tok is not None and tok not in ("base", "union"):
        tok = ref(tok, "tokenizer_source", record=False)
    tokenizer = _tokenizer_spec(raw, tok, lambda v, k: ref(v, k, record=False))
    chat_template = _check_chat_template(raw.chat_template)

    cfg = MergeConfig(
        raw=raw,
        method=method,
        base_model=base,
        dtype=raw.dtype,
        out_dtype=raw.out_dtype,
        tokenizer_source=tok,
        parameters=raw.parameters,
        yaml_text=text,
        base_dir=base_dir,
        _where=where,
        tokenizer=tokenizer,
        chat_template=chat_template,
    )

    # The method's input contract, per slice (mergekit checks it in normalize_config, before any tensor).
    # The model list of a `models:` slice does not depend on layer counts, so it is checked here too.
    if raw.modules is not None:
        slices = [s for ss in cfg.module_slices(list(raw.modules), lambda m, mod: 1).values() for s in ss]
    else:
        slices = cfg.slices(num_layers=lambda m: 1) if raw.models else cfg.slices()
    for s in slices:
        method.check_inputs(s.models, s.base_model, s.where)
        _check_required(method, s, raw.parameters)
    return cfg


def _tokenizer_spec(raw: MergeConfiguration, tokenizer_source: str | None, ref) -> TokenizerSpec | None:
    """The output vocabulary the config asks for (tokenizer_source, or the tokenizer: block), normalised."""
    if raw.tokenizer is None:
        if tokenizer_source is None:
            return None
        return TokenizerSpec(tokenizer_source, {}, None, "tokenizer_source")
    block = raw.tokenizer
    source = block.source if block.source in ("union", "base") else ref(block.source, "tokenizer.source")
    tokens = {}
    for tok, cfg in (block.tokens or {}).items():
        key = f"tokenizer.tokens.{tok}"
        src = cfg.source
        if src is None:
            spec = TokenSpec("none", force=cfg.force, where=key)
        elif isinstance(src, str):
            spec = TokenSpec("model", ref(src, f"{key}.source"), force=cfg.force, where=key)
        elif src.kind == "zero":
            spec = TokenSpec("zero", force=cfg.force, where=key)
        else:
            spec = TokenSpec("model_token", ref(src.model, f"{key}.source.model"), token_id=src.token_id,
                             token=src.token, force=cfg.force, where=key)  # fmt: skip
        tokens[tok] = spec
    return TokenizerSpec(source, tokens, block.pad_to_multiple_of, "tokenizer")


def _check_chat_template(value: str | None) -> str | None:
    """mergekit's accepted chat_template values: "auto", the name of one of its templates, or a Jinja
    template (20 characters or more, with a ``{``). Anything else fails here, not after the merge."""
    if value is None or value == "" or value == "auto":
        return value or None
    from mergekit_fast.architectures import chat_templates

    named = len(value) < 256 and "\n" not in value and "{" not in value
    if named and value in chat_templates():
        return value
    if len(value) < 20 or "{" not in value:
        raise ConfigError(
            f"chat_template: {show(value)} is neither 'auto', one of mergekit's templates "
            f"({', '.join(sorted(chat_templates()))}) nor a Jinja template"
        )
    return value


def _check_required(method, s: SliceSpec, global_params) -> None:
    """A required parameter that no applicable scope sets at all fails here, with its key path (mergekit
    fails the same config when it plans the first tensor). One set through filters that match no
    tensor still fails later, at planning, naming the tensor."""
    from mergekit_fast.methods import Scope

    for p in method.params:
        if not p.required:
            continue
        if p.scope == Scope.SHARED:
            if any(sc and p.name in sc for sc in (s.parameters, global_params)):
                continue
            per_model = [src.where for src in s.sources if src.parameters and p.name in src.parameters]
            extra = (
                f"; {per_model[0]}.parameters sets it, but a model's own parameters are never read for a "
                "shared parameter"
                if per_model
                else ""
            )
            raise ConfigError(
                f"{'parameters' if s.from_models else s.where + '.parameters'}.{p.name}: Missing required "
                f"parameter {p.name} (merge_method {method.name} needs it in the slice's or the top-level "
                f"parameters{extra})"
            )
        for src in s.sources:
            if p.scope == Scope.NON_BASE and src.model == s.base_model:
                continue
            if any(sc and p.name in sc for sc in s.parameter_scopes(src.model, global_params)):
                continue
            raise ConfigError(
                f"{src.where}.parameters.{p.name}: Missing required parameter {p.name} for model {src.model} "
                f"(merge_method {method.name} needs it per model: set it there, in the slice's or in the "
                "top-level parameters)"
            )


def lookup_method(name: str):
    """The registered merge method called ``name``, or a ConfigError at ``merge_method``."""
    from mergekit_fast import methods

    try:
        method = methods.get(name)
    except KeyError:
        method = None
    if method is None or method.internal:
        here = methods.names()
        if name in methods.MERGEKIT_METHODS:
            raise NotSupportedError(
                f"merge_method: {name!r} is not supported yet (supported: {', '.join(here)})"
            ) from None
        known = sorted(set(here) | set(methods.MERGEKIT_METHODS))
        raise ConfigError(
            f"merge_method: unknown method {name!r}; known here and in mergekit 0.1.5: {', '.join(known)}"
        ) from None
    return method


def _check_parameters(params, method, where: str, *, per_model: bool = False) -> None:
    from mergekit_fast.methods import Scope

    if not params:
        return
    for name, setting in params.items():
        spec = method.param(name)
        key = f"{where}.{name}"
        if spec is None:
            LOG.warning(
                "%s: merge_method %s has no parameter %r; it is ignored (as mergekit does)",
                key,
                method.name,
                name,
            )
            continue
        if per_model and spec.scope == Scope.SHARED:
            LOG.warning(
                "%s: %r is shared by all models of a slice, so mergekit never reads it from a model's own "
                "parameters; set it in the slice's or the top-level parameters",
                key,
                name,
            )
        for path, value in leaves(setting):
            try:
                spec.validate(value)
            except ValidationError:
                raise ConfigError(
                    f"{key}{path}: {show(value)} is not a valid value for {name} ({spec.type_name})"
                ) from None
