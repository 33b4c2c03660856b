"""mergekit 0.1.5's YAML merge configuration schema (``MergeConfiguration``): structure and scalar
types only; unknown keys are errors (mergekit ignores them silently, so a typo such as ``paramaters:``
would merge with defaults)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, field_validator
from pydantic.functional_validators import PlainValidator

from mergekit_fast.config.errors import show
from mergekit_fast.config.parameters import Parameters


def _model_ref(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(
            f"a model reference must be a path string; got {show(value)} (the dict form of model references "
            "is not supported yet)"
        )
    if not value.strip():
        raise ValueError("empty model path")
    return value


ModelRef = Annotated[Any, PlainValidator(_model_ref)]


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
                f"expected 'base', 'union' or a model path; got {show(v)} (the dict form is not supported yet)"
            )
        return v
