"""mergekit 0.1.5's YAML merge configuration: schema, parameter evaluation, validation, errors.

- ``errors``: ConfigError / NotSupportedError (messages start with the key path);
- ``schema``: the YAML document's structure (pydantic; unknown keys are errors);
- ``parameters``: settings (scalars, gradients, filters) and their evaluation, as mergekit's;
- ``validate``: ``load_config`` / ``parse_config`` -> a checked ``MergeConfig`` with normalised slices.
The merge methods' parameters and input contracts come from ``mergekit_fast.methods``.
"""

from mergekit_fast.config.errors import ConfigError, NotSupportedError
from mergekit_fast.config.parameters import (
    ConditionalParameter,
    ParameterSetting,
    _parse_setting,
    evaluate_setting,
    resolve_parameter,
    resolving_scope,
)
from mergekit_fast.config.schema import MergeConfiguration
from mergekit_fast.config.validate import (
    DTYPE_NAMES,
    MergeConfig,
    SliceSpec,
    SourceSpec,
    TokenizerSpec,
    TokenSpec,
    dtype_from_name,
    load_config,
    lookup_method,
    normalize_model_path,
    parse_config,
    read_config_file,
)

__all__ = [
    "DTYPE_NAMES", "ConditionalParameter", "ConfigError", "MergeConfig", "MergeConfiguration", "NotSupportedError",
    "ParameterSetting", "SliceSpec", "SourceSpec", "TokenSpec", "TokenizerSpec", "_parse_setting", "dtype_from_name", "evaluate_setting",
    "load_config", "lookup_method", "normalize_model_path", "parse_config", "read_config_file",
    "resolve_parameter", "resolving_scope",
]  # fmt: skip
