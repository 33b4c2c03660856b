"""mergekit-moe 0.1.5's YAML configuration (``moe/config.py:MoEMergeConfig``), validated with clear errors.

`load_moe_config(path)` / `parse_moe_config(text)` return a `MoEConfig`, or raise ONE `ConfigError` whose
message starts with the key path of the problem (``experts[1].positive_prompts: ...``). `check_moe_config`
then applies mergekit's ``is_bad_config`` rules (plus a few of ours, below); checks that need the models
(architectures, tensor names and shapes) live in `mergekit_fast.moe.arch` / `build`, still before any
tensor data is read or anything is written.

Schema (mergekit 0.1.5): ``base_model``, ``experts: [{source_model, positive_prompts, negative_prompts,
noise_scale, residual_scale}]``, ``gate_mode`` (default ``hidden``), ``dtype``, ``experts_per_token``
(default 2), ``shared_experts`` (same shape as experts), ``architecture`` (case-insensitive prefix of an
output architecture name).

Deliberate differences from mergekit-moe (each one an error or a documented superset, never a silently
different model):
- unknown keys are errors (mergekit ignores them, so a misspelt ``postive_prompts:`` would build a model
  whose gates ignore the intended prompts);
- ``gate_mode`` must be one of hidden, hidden_avg, hidden_last, cheap_embed, random, uniform_random
  (mergekit crashes with a TypeError on anything else);
- ``uniform_random`` does not need prompts, like ``random`` (mergekit 0.1.5 refuses a uniform_random
  config without prompts -- "Expert 0 has no positive prompts" -- although it never reads them; every
  config mergekit accepts gives the same model here, we merely accept more). As in mergekit, ``random``
  skips the identical-experts check too, ``uniform_random`` does not;
- model references are local paths only (no hub downloads, no ``path@revision``, no ``model+lora``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from mergekit_fast.config import (
    DTYPE_NAMES,
    ConfigError,
    NotSupportedError,
    normalize_model_path,
    read_config_file,
)
from mergekit_fast.config.errors import describe

LOG = logging.getLogger(__name__)

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
HIDDEN_MODES = ("hidden", "hidden_avg", "hidden_last")
RANDOM_MODES = ("random", "uniform_random")
ALLOW_SAME_FLAG = "--i-understand-this-is-not-useful-without-training"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _prompts(v: Any) -> Any:
    if v is None:
        return v
    if isinstance(v, str):
        raise ValueError('must be a list of strings, not a single string (write ["..."])')
    return v


class ExpertDefinition(_Strict):
    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None

    @field_validator("positive_prompts", "negative_prompts", mode="before")
    @classmethod
    def _check_prompts(cls, v):
        return _prompts(v)


class MoEConfiguration(_Strict):
    """The YAML document as mergekit-moe 0.1.5 reads it (structure and scalar types only)."""

    base_model: str
    experts: list[ExpertDefinition]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[ExpertDefinition] | None = None
    architecture: str | None = None


@dataclass(frozen=True)
class Expert:
    source_model: str  # normalised absolute path
    positive_prompts: tuple[str, ...] | None
    negative_prompts: tuple[str, ...] | None
    noise_scale: float | None
    residual_scale: float | None
    where: str  # key path, e.g. "experts[2]" or "shared_experts[0]"

    def prompt_key(self) -> tuple:
        return (tuple(self.positive_prompts or ()), tuple(self.negative_prompts or ()))


@dataclass(frozen=True)
class MoEConfig:
    base_model: str
    experts: tuple[Expert, ...]
    shared_experts: tuple[Expert, ...]
    gate_mode: str
    dtype: str | None
    experts_per_token: int
    architecture: str | None
    yaml_text: str

    def models(self) -> list[str]:
        """Every model the config names, base first, without duplicates."""
        names = [self.base_model] + [e.source_model for e in self.experts + self.shared_experts]
        return list(dict.fromkeys(names))

    def gated_experts(self) -> list[Expert]:
        """The experts that get a gate vector, in mergekit's order (scripts/moe.py:build): the routed
        experts, then the shared experts when they have prompts or the gate mode is random."""
        out = list(self.experts)
        if self.shared_experts:
            has_prompts = any(e.positive_prompts for e in self.shared_experts)
            if has_prompts or self.gate_mode in RANDOM_MODES:
                out.extend(self.shared_experts)
        return out


def _model_path(value: str, key: str, base_dir: str) -> str:
    if not value.strip():
        raise ConfigError(f"{key}: empty model path")
    if "+" in value:
        raise NotSupportedError(f"{key}: {value!r}: LoRA references (model+lora) are not supported yet")
    if "@" in value:
        raise NotSupportedError(
            f"{key}: {value!r}: revisions (path@revision) need the Hugging Face hub, which is not supported; "
            "download the model and use its local path"
        )
    return normalize_model_path(value, base_dir)


def parse_moe_config(source: str, *, base_dir: str | os.PathLike | None = None) -> MoEConfig:
    """Validate a mergekit-moe config given as YAML text. Relative model paths resolve against base_dir
    (default: the current directory, as mergekit-moe does)."""
    try:
        data = yaml.safe_load(source)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a YAML mapping (key: value); got {type(data).__name__}")
    try:
        raw = MoEConfiguration.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None
    base_dir = os.fspath(base_dir) if base_dir is not None else os.getcwd()

    if raw.gate_mode not in GATE_MODES:
        raise ConfigError(
            f"gate_mode: unknown gate mode {raw.gate_mode!r}; use one of {', '.join(GATE_MODES)}"
        )
    if raw.dtype is not None:
        short = raw.dtype[len("torch.") :] if raw.dtype.startswith("torch.") else raw.dtype
        if short not in DTYPE_NAMES:
            raise ConfigError(f"dtype: unknown dtype {raw.dtype!r}; use one of {', '.join(DTYPE_NAMES)}")

    def experts(items, key):
        out = []
        for i, e in enumerate(items or ()):
            where = f"{key}[{i}]"
            out.append(
                Expert(
                    source_model=_model_path(e.source_model, f"{where}.source_model", base_dir),
                    positive_prompts=tuple(e.positive_prompts) if e.positive_prompts is not None else None,
                    negative_prompts=tuple(e.negative_prompts) if e.negative_prompts is not None else None,
                    noise_scale=e.noise_scale,
                    residual_scale=e.residual_scale,
                    where=where,
                )
            )
        return tuple(out)

    return MoEConfig(
        base_model=_model_path(raw.base_model, "base_model", base_dir),
        experts=experts(raw.experts, "experts"),
        shared_experts=experts(raw.shared_experts, "shared_experts"),
        gate_mode=raw.gate_mode,
        dtype=raw.dtype,
        experts_per_token=raw.experts_per_token,
        architecture=raw.architecture,
        yaml_text=source,
    )


def load_moe_config(path: str | os.PathLike, *, base_dir: str | os.PathLike | None = None) -> MoEConfig:
    return read_config_file(path, parse_moe_config, base_dir=base_dir)


def check_moe_config(config: MoEConfig, *, allow_same: bool = False) -> None:
    """mergekit-moe's ``is_bad_config`` as errors (same rules, same order), before any model is opened."""
    n = len(config.experts)
    if n == 0:
        raise ConfigError("experts: at least one expert is required")
    if config.experts_per_token < 1:
        raise ConfigError(f"experts_per_token: must be >= 1; got {config.experts_per_token}")
    if n < config.experts_per_token:
        raise ConfigError(
            f"experts_per_token: {config.experts_per_token} is more than the number of experts ({n}); "
            "include at least as many experts as experts_per_token"
        )
    if config.shared_experts:
        with_prompts = [bool(e.positive_prompts) for e in config.shared_experts]
        if any(with_prompts) and not all(with_prompts):
            raise ConfigError(
                "shared_experts: give positive_prompts to all shared experts or to none, not a mix"
            )
    if config.gate_mode == "random":
        return  # mergekit stops checking here: no prompt rules, and identical experts are allowed
    if config.gate_mode != "uniform_random":
        for e in config.experts:
            if not e.positive_prompts:
                raise ConfigError(
                    f"{e.where}.positive_prompts: gate_mode {config.gate_mode!r} needs positive prompts for "
                    "every expert (they decide what is routed to it); add some, or use gate_mode: random"
                )
        first = config.experts[0].prompt_key()
        if all(e.prompt_key() == first for e in config.experts[1:]):
            raise ConfigError(
                "experts: the positive and negative prompts are identical for all experts, which cannot "
                "produce a functioning MoE; each expert's positive_prompts must reflect what should be "
                "routed to that expert"
            )
    # mergekit counts a single expert as "all the same" too.
    if not allow_same and all(e.source_model == config.experts[0].source_model for e in config.experts):
        what = "there is only one expert" if n == 1 else "all expert models are the same"
        raise ConfigError(
            f"experts: {what} ({config.experts[0].source_model}); the MoE would use more resources and give "
            "the exact same output as that model. If you will train the model after merging, pass "
            f"{ALLOW_SAME_FLAG}"
        )
