"""Parameter settings as mergekit 0.1.5 writes and evaluates them: scalars, gradients and filters.

A setting is a scalar, a gradient (a list of scalars interpolated over the layers of an output slice),
``{filter, value}`` or a list of them (substring match on the tensor name, first match wins; no filter
or ``"*"`` matches everything). ``evaluate_setting`` and ``resolve_parameter`` are mergekit's
``config.evaluate_setting`` and ``parameter_resolver.resolve_parameter``, line for line, so values are
bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict
from pydantic.functional_validators import PlainValidator

from mergekit_fast.config.errors import ConfigError, show

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
                    f"{what}[{i}]: a gradient is a list of numbers (or booleans/strings); got {show(v)}"
                )
        return tuple(value)
    raise ValueError(
        f"{what}: expected a number, a list of numbers (gradient) or {{filter, value}}; got {show(value)}"
    )


def _conditional(value: Any, what: str) -> ConditionalParameter:
    unknown = sorted(set(value) - {"filter", "value"})
    if unknown:
        raise ValueError(f"{what}: unknown key {unknown[0]!r} (a filter entry has only 'filter' and 'value')")
    if "value" not in value:
        raise ValueError(f"{what}: missing 'value'")
    flt = value.get("filter")
    if flt is not None and not isinstance(flt, str):
        raise ValueError(f"{what}.filter: must be a string (a substring of tensor names); got {show(flt)}")
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
            f"[{i}]: a list of filters must contain only {{filter, value}} entries; got {show(value[i])}"
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
    spec,
    scopes: Iterable[Mapping[str, ParameterSetting] | None],
    *,
    tensor_name: str,
    t: float = 0,
    model: str | None = None,
) -> Any:
    """mergekit 0.1.5 `parameter_resolver.resolve_parameter`: the first scope that yields a value wins.
    ``spec`` is a mergekit_fast.methods.Param."""
    for scope in scopes:
        if scope is not None and spec.name in scope:
            value = evaluate_setting(tensor_name, scope[spec.name], t, validate=spec.validate)
            if value is not None:
                return value
    if spec.required:
        location = f"{model}.{tensor_name}" if model is not None else tensor_name
        raise ConfigError(f"Missing required parameter {spec.name} for {location}")
    return spec.validate(spec.default)


def resolving_scope(
    spec, scopes: Iterable[Mapping[str, ParameterSetting] | None], *, tensor_name: str, t: float = 0
) -> int | None:
    """The index of the scope ``resolve_parameter`` takes the value from (None: the default), for messages."""
    for i, scope in enumerate(scopes):
        if scope is not None and spec.name in scope:
            if evaluate_setting(tensor_name, scope[spec.name], t, validate=spec.validate) is not None:
                return i
    return None


def leaves(setting) -> Iterable[tuple[str, Any]]:
    """(key path suffix, scalar) for every scalar written in a setting."""
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
