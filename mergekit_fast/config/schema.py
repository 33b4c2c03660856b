"""mergekit 0.1.5's YAML merge configuration schema (``MergeConfiguration``): structure and scalar
types only; unknown keys are errors (mergekit ignores them silently, so a typo such as ``paramaters:``
would merge with defaults)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator
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


class OutputModuleDefinition(_Strict):
    """One entry of ``modules:``: the slices or models of one module (a text decoder, a vision tower)."""

    slices: list[OutputSliceDefinition] | None = None
    models: list[InputModelDefinition] | None = None
    parameters: Parameters = None


class ModelTokenEmbedding(_Strict):
    """``{kind: model_token, model: M, token_id: N}`` or ``{..., token: "<s>"}``: one model's row."""

    kind: Literal["model_token"]
    model: ModelRef
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_of(self):
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token")
        return self


class ZeroEmbedding(_Strict):
    """``{kind: zero}``: a row of zeros."""

    kind: Literal["zero"]


def _embedding_source(value: Any):
    if value is None or isinstance(value, (ModelTokenEmbedding, ZeroEmbedding)):
        return value
    if isinstance(value, str):
        return _model_ref(value)
    if isinstance(value, dict):
        kind = value.get("kind")
        if kind == "model_token":
            return ModelTokenEmbedding.model_validate(value)
        if kind == "zero":
            return ZeroEmbedding.model_validate(value)
        raise ValueError(f"kind must be 'model_token' or 'zero'; got {show(kind)}")
    raise ValueError(
        f"expected a model path, {{kind: model_token, ...}} or {{kind: zero}}; got {show(value)}"
    )


class TokenEmbeddingConfig(_Strict):
    """Where one token's embedding row comes from (``tokenizer.tokens.<token>``)."""

    source: Annotated[Any, PlainValidator(_embedding_source)] = None
    force: bool = False


class TokenizerConfig(_Strict):
    """The ``tokenizer:`` block: the output vocabulary (``source``), rows for particular tokens, and
    padding of the vocabulary size."""

    source: str = "union"
    tokens: dict[str, TokenEmbeddingConfig] | None = None
    pad_to_multiple_of: int | None = None

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, v):
        if not isinstance(v, str):
            raise ValueError(f"expected 'base', 'union' or a model path; got {show(v)}")
        return _model_ref(v)

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _pad(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"must be a positive integer; got {v}")
        return v


class MergeConfiguration(_Strict):
    """The YAML document as mergekit 0.1.5 reads it (structure and scalar types only)."""

    modules: dict[str, OutputModuleDefinition] | None = None
    slices: list[OutputSliceDefinition] | None = None
    models: list[InputModelDefinition] | None = None
    merge_method: str
    base_model: ModelRef | None = None
    dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
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
        return v if v is None else _model_ref(v)
