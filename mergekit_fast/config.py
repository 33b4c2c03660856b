"""mergekit 0.1.5's YAML merge configuration: schema, validation and parameter resolution.

`load_config(path)` / `parse_config(text_or_dict)` return a validated `MergeConfig`, or raise ONE
`ConfigError` (a ValueError) whose message starts with the key path of the problem, for example
`slices[1].sources[0].layer_range: ...`. Everything here is checked before any model is opened; checks
that need the models (layer counts, tensor names and shapes) happen in `plan.py`, still before any
tensor data is read.

Semantics follow mergekit 0.1.5 (`mergekit/config.py`, `parameter_resolver.py`, `plan.py`):
- exactly one of `models:` / `slices:`; `models:` becomes one slice per model over all its layers, and a
  `base_model` that is not listed is appended as a source;
- parameters: a scalar, a gradient (a list of scalars interpolated over the layers of an output slice),
  `{filter, value}` or a list of them (substring match on the tensor name, first match wins, no filter
  or `"*"` matches everything); precedence per tensor: the source's own `parameters` (per-input
  parameters only), then the slice's, then the top level; a level whose setting resolves to nothing
  (no filter matched, empty list) falls through to the next one;
- shared parameters (`t`, `normalize`) never read a model's own `parameters`; per-input parameters
  (`weight`, `scale`) do; shared ones match filters against the output tensor name, per-input ones
  against the input tensor name.

Deliberate differences from mergekit (each raises a clear error where mergekit would do something else):
- unknown keys are errors (mergekit ignores them silently, so a typo such as `paramaters:` would merge
  with defaults);
- scalar parameter values are type-checked up front (mergekit only when a tensor needs them);
- `layer_range` must satisfy 0 <= start < end (mergekit accepts an empty or reversed range);
- features not implemented yet raise `NotSupportedError`: `modules:`, `tokenizer:`, `chat_template:`,
  `tokenizer_source: union`, `model+lora` references, `path@revision`, methods other than slerp, linear
  and passthrough.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, field_validator
from pydantic.functional_validators import PlainValidator

LOG = logging.getLogger(__name__)


class ConfigError(ValueError):
    """The merge configuration is invalid; the message starts with the key path of the problem."""


class NotSupportedError(ConfigError):
    """The configuration is valid for mergekit but uses a feature mergekit_fast does not support yet."""


# --------------------------------------------------------------------------------------------------
# Merge methods: parameters and input contracts (mergekit 0.1.5 merge_methods/{slerp,linear,passthrough}.py)

SHARED, INPUT = "shared", "input"
_MISSING = object()


@dataclass(frozen=True)
class ParamSpec:
    name: str
    value_type: Any
    scope: str  # SHARED or INPUT
    default: Any = _MISSING

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def validate(self, value: Any) -> Any:
        # mergekit validates every scalar with a pydantic TypeAdapter of the parameter's type (lax mode:
        # "1e-5" -> 1e-05, True -> 1.0 for floats, 1 -> True for bools); use the very same conversion.
        return _adapter(self.value_type).validate_python(value)


_ADAPTERS: dict[Any, TypeAdapter] = {}


def _adapter(tp) -> TypeAdapter:
    a = _ADAPTERS.get(tp)
    if a is None:
        a = _ADAPTERS[tp] = TypeAdapter(tp)
    return a


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: tuple[ParamSpec, ...]
    base: str  # "required" | "ignored"
    min_inputs: int
    max_inputs: int | None
    passthrough_singleton: bool  # OptionalTensorPolicy.PASSTHROUGH_SINGLETON

    @property
    def shared_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope == SHARED)

    @property
    def input_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope != SHARED)

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)

    def check_inputs(self, inputs: list[str], base: str | None, where: str) -> None:
        """mergekit's InputContract.validate_ids, with the same rules and clearer messages."""
        if len(set(inputs)) != len(inputs):
            dup = next(m for m in inputs if inputs.count(m) > 1)
            raise ConfigError(f"{where}: model {dup} appears twice among the inputs of one merge")
        if self.base == "ignored":
            base = None
        has_base = base is not None and base in inputs
        if base is not None and not has_base:
            raise ConfigError(
                f"{where}: base_model {base} is not one of the slice's sources {inputs} ({self.name} merges "
                "the base with the other model, so the base must be a source)"
            )
        if self.base == "required" and not has_base:
            raise ConfigError(f"{where}: merge_method {self.name} needs a base_model")
        n = len(inputs)
        if n < self.min_inputs or (self.max_inputs is not None and n > self.max_inputs):
            if self.min_inputs == self.max_inputs:
                want = f"exactly {self.min_inputs}"
            elif self.max_inputs is None:
                want = f"at least {self.min_inputs}"
            else:
                want = f"at most {self.max_inputs}"
            extra = ""
            if self.name == "slerp":
                extra = " (the base_model and exactly one other model)"
            elif self.name == "passthrough":
                extra = " (one source per slice; stack layers with several slices)"
            raise ConfigError(
                f"{where}: merge_method {self.name} needs {want} input model(s){extra}; got {n}: {inputs}"
            )


METHODS: dict[str, MethodSpec] = {
    "slerp": MethodSpec(
        "slerp", (ParamSpec("t", float, SHARED),), "required", 2, 2, passthrough_singleton=True
    ),
    "linear": MethodSpec(
        "linear",
        (ParamSpec("weight", float, INPUT), ParamSpec("normalize", bool, SHARED, True)),
        "ignored",
        1,
        None,
        passthrough_singleton=False,
    ),
    "passthrough": MethodSpec(
        "passthrough", (ParamSpec("scale", float | None, INPUT, None),), "ignored", 1, 1, False
    ),
}

# Methods mergekit 0.1.5 registers that mergekit_fast does not implement yet.
MERGEKIT_ONLY_METHODS = frozenset(
    {
        "arcee_fusion",
        "breadcrumbs",
        "breadcrumbs_ties",
        "dare_linear",
        "dare_ties",
        "della",
        "della_linear",
        "karcher",
        "model_stock",
        "multislerp",
        "nearswap",
        "nuslerp",
        "ram",
        "ramplus_tl",
        "sce",
        "task_arithmetic",
        "ties",
    }
)

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


# --------------------------------------------------------------------------------------------------
# Parameter settings


Scalar = bool | int | float | str


class ConditionalParameter(BaseModel):
    """`{filter: <substring>, value: <scalar or gradient>}`; filter None or "*" matches every tensor."""

    model_config = ConfigDict(frozen=True)
    value: Scalar | tuple[Scalar, ...]
    filter: str | None = None


# A parameter setting as mergekit accepts it: a scalar, a gradient (tuple of scalars), one
# ConditionalParameter, or a tuple of ConditionalParameter (lists become tuples: hashable, immutable).
ParameterSetting = Scalar | tuple[Scalar, ...] | ConditionalParameter | tuple[ConditionalParameter, ...]

_SCALARS = (bool, int, float, str)


def _scalar_or_gradient(value: Any, what: str) -> Scalar | tuple[Scalar, ...]:
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, list):
        for i, v in enumerate(value):
            if not isinstance(v, _SCALARS):
                raise ValueError(
                    f"{what}[{i}]: a gradient is a list of numbers (or booleans/strings); got {_show(v)}"
                )
        return tuple(value)
    raise ValueError(
        f"{what}: expected a number, a list of numbers (gradient) or {{filter, value}}; got {_show(value)}"
    )


def _conditional(value: Any, what: str) -> ConditionalParameter:
    unknown = sorted(set(value) - {"filter", "value"})
    if unknown:
        raise ValueError(f"{what}: unknown key {unknown[0]!r} (a filter entry has only 'filter' and 'value')")
    if "value" not in value:
        raise ValueError(f"{what}: missing 'value'")
    flt = value.get("filter")
    if flt is not None and not isinstance(flt, str):
        raise ValueError(f"{what}.filter: must be a string (a substring of tensor names); got {_show(flt)}")
    return ConditionalParameter(value=_scalar_or_gradient(value["value"], f"{what}.value"), filter=flt)


def _parse_setting(value: Any) -> ParameterSetting:
    """Parse one parameter setting with mergekit's union semantics, with messages that name the spot."""
    if isinstance(value, ConditionalParameter):
        return value
    if isinstance(value, dict):
        return _conditional(value, "")
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return tuple(_conditional(v, f"[{i}]") for i, v in enumerate(value))
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        i = next(i for i, v in enumerate(value) if not isinstance(v, dict))
        raise ValueError(
            f"[{i}]: a list of filters must contain only {{filter, value}} entries; got {_show(value[i])}"
        )
    return _scalar_or_gradient(value, "")


def _setting_validator(value: Any) -> ParameterSetting:
    try:
        return _parse_setting(value)
    except ValueError as exc:
        raise ValueError(str(exc).lstrip(": ")) from None


Setting = Annotated[Any, PlainValidator(_setting_validator)]
Parameters = dict[str, Setting] | None


def evaluate_setting(
    tensor_name: str, setting: ParameterSetting, t: float = 0, *, validate: Callable[[Any], Any]
) -> Any:
    """mergekit 0.1.5 `config.evaluate_setting`, line for line (same arithmetic, so bit-identical values)."""
    if isinstance(setting, ConditionalParameter):
        setting = (setting,)
    if isinstance(setting, _SCALARS):
        return validate(setting)
    if isinstance(setting, (list, tuple)):
        if not setting:
            return None
        if all(isinstance(e, _SCALARS) for e in setting):
            values = [validate(e) for e in setting]
            if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in values):
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            result = (1 - frac) * values[i0] + frac * values[i1]
            return validate(result)
        for cond in setting:
            if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
                return evaluate_setting(tensor_name, cond.value, t, validate=validate)
        return None
    raise TypeError(f"unexpected parameter setting {setting!r}")


def resolve_parameter(
    spec: ParamSpec,
    scopes: Iterable[Mapping[str, ParameterSetting] | None],
    *,
    tensor_name: str,
    t: float = 0,
    model: str | None = None,
) -> Any:
    """mergekit 0.1.5 `parameter_resolver.resolve_parameter`: the first scope that yields a value wins."""
    for scope in scopes:
        if scope is not None and spec.name in scope:
            value = evaluate_setting(tensor_name, scope[spec.name], t, validate=spec.validate)
            if value is not None:
                return value
    if spec.required:
        location = f"{model}.{tensor_name}" if model is not None else tensor_name
        raise ConfigError(f"Missing required parameter {spec.name} for {location}")
    return spec.validate(spec.default)


# --------------------------------------------------------------------------------------------------
# Model references


def _model_ref(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(
            f"a model reference must be a path string; got {_show(value)} (the dict form of model references "
            "is not supported yet)"
        )
    if not value.strip():
        raise ValueError("empty model path")
    return value


ModelRef = Annotated[Any, PlainValidator(_model_ref)]


# --------------------------------------------------------------------------------------------------
# Schema (mirrors mergekit 0.1.5 MergeConfiguration; unknown keys are errors)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSliceDefinition(_Strict):
    model: ModelRef
    layer_range: tuple[int, int]
    parameters: Parameters = None


class InputModelDefinition(_Strict):
    model: ModelRef
    parameters: Parameters = None


class OutputSliceDefinition(_Strict):
    sources: list[InputSliceDefinition]
    base_model: ModelRef | None = None
    residual_weight: float | None = None  # accepted and unused, as in mergekit
    parameters: Parameters = None


class MergeConfiguration(_Strict):
    """The YAML document as mergekit 0.1.5 reads it (structure and scalar types only)."""

    modules: Any | None = None
    slices: list[OutputSliceDefinition] | None = None
    models: list[InputModelDefinition] | None = None
    merge_method: str
    base_model: ModelRef | None = None
    dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: Any | None = None
    chat_template: str | None = None
    out_dtype: str | None = None
    parameters: Parameters = None

    @field_validator("tokenizer_source", mode="before")
    @classmethod
    def _tokenizer_source(cls, v):
        if v is not None and not isinstance(v, str):
            raise ValueError(
                f"expected 'base', 'union' or a model path; got {_show(v)} (the dict form is not supported yet)"
            )
        return v


# --------------------------------------------------------------------------------------------------
# The validated configuration and its normalised slices


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
        scopes.append(global_params)
        return scopes


@dataclass(frozen=True)
class MergeConfig:
    """A validated merge configuration. Model paths are normalised absolute paths (strings)."""

    raw: MergeConfiguration
    method: MethodSpec
    base_model: str | None
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None  # None, "base", or a normalised model path
    parameters: Mapping[str, ParameterSetting] | None
    yaml_text: str
    base_dir: str
    _where: Mapping[str, str]  # model path -> first key path that references it

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
        return list(dict.fromkeys(out))

    def donor_model(self) -> str:
        """The model whose config.json (and tokenizer) the output starts from: base_model, else the first
        source. (mergekit 0.1.5 takes `list(set(models))[0]` when there is no base_model, which depends on
        string hashing; the first listed model is the deterministic choice.)"""
        if self.base_model:
            return self.base_model
        if self.raw.models:
            return self._norm(self.raw.models[0].model)
        return self._norm(self.raw.slices[0].sources[0].model)

    def slices(self, num_layers: Callable[[str], int] | None = None) -> list[SliceSpec]:
        """The output slices, as mergekit's normalize_config builds them.

        For a `models:` config every model becomes a source over [0, num_layers(model)), and a base_model
        not listed is appended; `num_layers` is required then.
        """
        if self.raw.models:
            if num_layers is None:
                raise TypeError("num_layers is required to expand a `models:` config")
            sources = [
                SourceSpec(self._norm(m.model), 0, 0, m.parameters, f"models[{i}]")
                for i, m in enumerate(self.raw.models)
            ]
            if self.base_model and self.base_model not in [s.model for s in sources]:
                sources.append(SourceSpec(self.base_model, 0, 0, None, "base_model"))
            sources = [SourceSpec(s.model, 0, num_layers(s.model), s.parameters, s.where) for s in sources]
            return [SliceSpec(tuple(sources), self.base_model, None, "models", from_models=True)]
        out = []
        for i, s in enumerate(self.raw.slices):
            srcs = tuple(
                SourceSpec(
                    self._norm(src.model), *src.layer_range, src.parameters, f"slices[{i}].sources[{j}]"
                )
                for j, src in enumerate(s.sources)
            )
            base = self._norm(s.base_model) if s.base_model else self.base_model
            out.append(SliceSpec(srcs, base, s.parameters, f"slices[{i}]"))
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
        raise ConfigError(f"the config must be a YAML mapping (key: value); got {_show(data)}")
    try:
        raw = MergeConfiguration.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    return _check(raw, text, os.fspath(base_dir) if base_dir is not None else os.getcwd())


def _check(raw: MergeConfiguration, text: str, base_dir: str) -> MergeConfig:
    # Features that parse but are not implemented yet.
    if raw.modules is not None:
        raise NotSupportedError(
            "modules: multi-module merges (modules:) are not supported yet; use models: or slices:"
        )
    if raw.tokenizer is not None:
        raise NotSupportedError(
            "tokenizer: the tokenizer: block is not supported yet (tokenizer_source: base or a model path is)"
        )
    if raw.chat_template is not None:
        raise NotSupportedError("chat_template: setting a chat template is not supported yet")
    if raw.tokenizer_source == "union":
        raise NotSupportedError("tokenizer_source: 'union' (a merged vocabulary) is not supported yet")

    # Exactly one of models / slices (mergekit tests truthiness: an empty list counts as absent).
    if bool(raw.models) == bool(raw.slices):
        which = "both" if raw.models else "neither"
        raise ConfigError(f"models/slices: exactly one of 'models' or 'slices' must be given; got {which}")

    name = raw.merge_method
    if name not in METHODS:
        if name in MERGEKIT_ONLY_METHODS:
            raise NotSupportedError(
                f"merge_method: {name!r} is not supported yet (supported: {', '.join(sorted(METHODS))})"
            )
        known = sorted(METHODS) + sorted(MERGEKIT_ONLY_METHODS)
        raise ConfigError(f"merge_method: unknown method {name!r}; mergekit 0.1.5 knows {', '.join(known)}")
    method = METHODS[name]

    for key in ("dtype", "out_dtype"):
        v = getattr(raw, key)
        if v is not None:
            short = v[len("torch.") :] if v.startswith("torch.") else v
            if short not in DTYPE_NAMES:
                raise ConfigError(f"{key}: unknown dtype {v!r}; use one of {', '.join(DTYPE_NAMES)}")

    # Model references.
    where: dict[str, str] = {}

    def ref(value: str, key: str) -> str:
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
        where.setdefault(path, key)
        return path

    base = ref(raw.base_model, "base_model") if raw.base_model else None
    tok = raw.tokenizer_source
    if tok is not None and tok != "base":
        tok = ref(tok, "tokenizer_source")

    # Parameters: names and scalar types, everywhere they appear.
    _check_parameters(raw.parameters, method, "parameters")
    if raw.models:
        for i, m in enumerate(raw.models):
            ref(m.model, f"models[{i}].model")
            _check_parameters(m.parameters, method, f"models[{i}].parameters", per_model=True)
    else:
        for i, s in enumerate(raw.slices):
            key = f"slices[{i}]"
            if not s.sources:
                raise ConfigError(f"{key}.sources: a slice needs at least one source")
            if s.base_model:
                ref(s.base_model, f"{key}.base_model")
            _check_parameters(s.parameters, method, f"{key}.parameters")
            for j, src in enumerate(s.sources):
                k = f"{key}.sources[{j}]"
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
                    f"{key}.sources: all sources of a slice must have the same number of layers; got {ranges}"
                )

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
    )

    # The method's input contract, per slice (mergekit checks it in normalize_config, before any tensor).
    # The model list of a `models:` slice does not depend on layer counts, so it is checked here too.
    slices = cfg.slices(num_layers=lambda m: 1) if raw.models else cfg.slices()
    for s in slices:
        method.check_inputs(s.models, s.base_model, s.where)
    return cfg


def _check_parameters(params, method: MethodSpec, where: str, *, per_model: bool = False) -> None:
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
        if per_model and spec.scope == SHARED:
            LOG.warning(
                "%s: %r is shared by all models of a slice, so mergekit never reads it from a model's own "
                "parameters; set it in the slice's or the top-level parameters",
                key,
                name,
            )
        for path, value in _leaves(setting):
            try:
                spec.validate(value)
            except ValidationError:
                raise ConfigError(
                    f"{key}{path}: {_show(value)} is not a valid value for {name} "
                    f"({_type_name(spec.value_type)})"
                ) from None


def _leaves(setting) -> Iterable[tuple[str, Any]]:
    if isinstance(setting, ConditionalParameter):
        setting = (setting,)
        single = True
    else:
        single = False
    if isinstance(setting, _SCALARS):
        yield "", setting
        return
    for i, item in enumerate(setting):
        idx = "" if single else f"[{i}]"
        if isinstance(item, ConditionalParameter):
            if isinstance(item.value, tuple):
                for j, v in enumerate(item.value):
                    yield f"{idx}.value[{j}]", v
            else:
                yield f"{idx}.value", item.value
        else:
            yield f"[{i}]", item


def _type_name(tp) -> str:
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if tp == (float | None):
        return "a number"
    return str(tp)


def _show(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def _describe(exc: ValidationError) -> str:
    """The first pydantic error as `key.path[i]: message`."""
    err = exc.errors()[0]
    parts: list[str] = []
    for item in err["loc"]:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    loc = "".join(parts) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        return (
            f"{loc}: unknown key (not part of mergekit 0.1.5's config schema; mergekit would silently ignore "
            "it, mergekit_fast refuses it so a misspelt key cannot change the merge)"
        )
    if kind == "missing":
        return f"{loc}: required key is missing"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        sub = msg.split(": ", 1)
        if sub[0].startswith("[") or sub[0].startswith("."):
            # a message from _parse_setting that names a spot inside the setting
            return f"{loc}{sub[0]}: {sub[1]}" if len(sub) == 2 else f"{loc}: {msg}"
        return f"{loc}: {msg}"
    if "input" in err and kind not in ("dict_type", "list_type", "model_type"):
        return f"{loc}: {msg} (got {_show(err['input'])})"
    return f"{loc}: {msg}"
