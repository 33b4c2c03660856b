"""mergekit_fast.config: schema, key-path errors and parameter resolution, against mergekit 0.1.5."""

from __future__ import annotations

import math
import os
import random

import pytest
import yaml
from helpers import DOC_SELF_ATTN

from mergekit_fast import methods
from mergekit_fast.config import (
    ConditionalParameter,
    ConfigError,
    NotSupportedError,
    evaluate_setting,
    load_config,
    parse_config,
    resolve_parameter,
)
from mergekit_fast.testing import slerp_gradient_config

SLERP_GRADIENT = slerp_gradient_config("org/model-a", "org/model-b", 32)


def shared_t(cfg, tensor_name: str, t: float) -> float:
    spec = cfg.method.param("t")
    (s,) = cfg.slices()
    return resolve_parameter(spec, s.parameter_scopes(None, cfg.parameters), tensor_name=tensor_name, t=t)


# --------------------------------------------------------------------------------------------------
# Valid configs


def test_gradient_config_matches_reference_values():
    cfg = parse_config(SLERP_GRADIENT, base_dir="/models")
    assert cfg.merge_method == "slerp"
    assert cfg.base_model == "/models/org/model-a"
    assert cfg.dtype == "bfloat16" and cfg.out_dtype is None
    n = 32
    got_attn = [shared_t(cfg, f"model.layers.{i}.self_attn.q_proj.weight", i / (n - 1)) for i in range(n)]
    got_mlp = [shared_t(cfg, f"model.layers.{i}.mlp.up_proj.weight", i / (n - 1)) for i in range(n)]
    assert [round(v, 3) for v in got_attn] == pytest.approx(DOC_SELF_ATTN, abs=1.5e-3)
    # mlp is the mirror image: value list reversed (1 - x at every anchor)
    assert got_mlp == pytest.approx([1 - v for v in got_attn], abs=1e-12)
    # layernorms match neither filter ("post_attention_layernorm" does not contain "self_attn")
    assert shared_t(cfg, "model.layers.3.post_attention_layernorm.weight", 3 / 31) == 0.5
    assert shared_t(cfg, "model.embed_tokens.weight", 0) == 0.5
    assert shared_t(cfg, "lm_head.weight", 0) == 0.5


def test_models_config_appends_base_and_expands_layers():
    cfg = parse_config(
        "merge_method: linear\nbase_model: c\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
        "  - model: ./b/\n    parameters: {weight: 2}\nparameters: {weight: 0.5}\n",
        base_dir="/m",
    )
    (s,) = cfg.slices(num_layers=lambda m: {"/m/a": 4, "/m/b": 4, "/m/c": 4}[m])
    assert s.models == ["/m/a", "/m/b", "/m/c"]  # base not listed -> appended last
    assert [(x.start, x.end) for x in s.sources] == [(0, 4)] * 3
    assert s.from_models and s.base_model == "/m/c"
    assert cfg.referenced_models() == ["/m/c", "/m/a", "/m/b"]
    assert cfg.donor_model() == "/m/c"


def test_relative_paths_resolve_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "c.yml"
    p.write_text(
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: sub/m\n        layer_range: [0, 2]\n"
    )
    cfg = load_config(p)
    assert cfg.referenced_models() == [os.path.join(str(tmp_path), "sub", "m")]
    assert cfg.yaml_text == p.read_text()


def test_slice_level_base_model_and_dus():
    cfg = parse_config(
        """
merge_method: slerp
slices:
  - sources:
      - {model: a, layer_range: [0, 2]}
      - {model: b, layer_range: [2, 4]}
    base_model: b
    parameters: {t: 0.25}
  - sources:
      - {model: a, layer_range: [2, 3]}
      - {model: b, layer_range: [0, 1]}
    base_model: a
    residual_weight: 0.1
parameters: {t: 0.75}
""",
        base_dir="/r",
    )
    s0, s1 = cfg.slices()
    assert (s0.base_model, s1.base_model) == ("/r/b", "/r/a")
    assert [(x.start, x.end) for x in s0.sources] == [(0, 2), (2, 4)]
    spec = cfg.method.param("t")
    assert resolve_parameter(spec, s0.parameter_scopes(None, cfg.parameters), tensor_name="x") == 0.25
    assert resolve_parameter(spec, s1.parameter_scopes(None, cfg.parameters), tensor_name="x") == 0.75


def test_precedence_and_fall_through():
    cfg = parse_config(
        """
merge_method: linear
slices:
  - sources:
      - model: a
        layer_range: [0, 2]
        parameters:
          weight: [{filter: mlp, value: 3}]
      - model: b
        layer_range: [0, 2]
    parameters:
      weight: [{filter: self_attn, value: 2}]
      normalize: false
parameters:
  weight: 1
  normalize: true
""",
        base_dir="/p",
    )
    (s,) = cfg.slices()
    w = cfg.method.param("weight")
    norm = cfg.method.param("normalize")

    def weight(model, name):
        return resolve_parameter(w, s.parameter_scopes(model, cfg.parameters), tensor_name=name, model=model)

    assert weight("/p/a", "model.layers.0.mlp.up_proj.weight") == 3  # the source's own block
    assert weight("/p/a", "model.layers.0.self_attn.q_proj.weight") == 2  # falls through to the slice
    assert weight("/p/b", "model.layers.0.mlp.up_proj.weight") == 1  # falls through to the top level
    assert weight("/p/b", "model.layers.0.self_attn.o_proj.weight") == 2
    assert resolve_parameter(norm, s.parameter_scopes(None, cfg.parameters), tensor_name="x") is False


def test_shared_parameter_under_a_model_is_not_read():
    text = (
        "merge_method: slerp\nbase_model: a\nmodels:\n  - model: a\n  - model: b\n    parameters: {t: 0.5}\n"
    )
    # mergekit fails this config at planning; here it fails in the config, with the key path
    with pytest.raises(
        ConfigError, match=r"^parameters\.t: Missing required parameter t .*models\[1\]\.parameters"
    ):
        parse_config(text, base_dir="/q")
    cfg = parse_config(text + "parameters: {t: 0.25}\n", base_dir="/q")
    (s,) = cfg.slices(num_layers=lambda m: 2)
    t = resolve_parameter(cfg.method.param("t"), s.parameter_scopes(None, cfg.parameters), tensor_name="x")
    assert t == 0.25  # the top-level value, never the model's


def test_scale_defaults_to_none_and_scientific_strings_parse():
    cfg = parse_config(
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n"
        "        parameters: {scale: ['1e-3', 1e-1]}\n",
        base_dir="/s",
    )
    (s,) = cfg.slices()
    spec = cfg.method.param("scale")
    scopes = s.parameter_scopes("/s/a", cfg.parameters)
    assert resolve_parameter(spec, scopes, tensor_name="x", t=0) == pytest.approx(1e-3)
    assert resolve_parameter(spec, scopes, tensor_name="x", t=1) == pytest.approx(0.1)
    assert resolve_parameter(spec, [None], tensor_name="x") is None


# --------------------------------------------------------------------------------------------------
# evaluate_setting / resolve_parameter against mergekit's own implementation


def _random_setting(rng: random.Random):
    def scalar():
        return rng.choice(
            [rng.random(), rng.randint(0, 3), rng.choice(["1e-3", "0.5", "2"]), rng.random() * 10]
        )

    def value():
        if rng.random() < 0.5:
            return scalar()
        return [scalar() for _ in range(rng.randint(0, 6))]

    kind = rng.randint(0, 3)
    if kind == 0:
        return value()
    filters = ["self_attn", "mlp", "layers.1.", "norm", "*", None, "nomatch"]
    conds = []
    for _ in range(rng.randint(1, 4)):
        c = {"value": value()}
        f = rng.choice(filters)
        if f is not None:
            c["filter"] = f
        conds.append(c)
    return conds if kind > 1 else conds[0]


@pytest.mark.mergekit
def test_evaluate_setting_matches_mergekit_exactly():
    from mergekit.config import ConditionalParameter as MkCond
    from mergekit.config import evaluate_setting as mk_evaluate
    from pydantic import TypeAdapter

    from mergekit_fast.config import _parse_setting

    names = [
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.norm.weight",
        "",
    ]
    validate_float = TypeAdapter(float).validate_python
    rng = random.Random(1234)
    checked = 0
    for _ in range(400):
        raw = _random_setting(rng)
        ours = _parse_setting(raw)
        theirs = (
            MkCond.model_validate(raw)
            if isinstance(raw, dict)
            else [MkCond.model_validate(c) for c in raw]
            if isinstance(raw, list) and raw and isinstance(raw[0], dict)
            else raw
        )
        for name in names:
            for t in (0, 1, 0.25, 1 / 3, 7 / 31, 0.999):
                a = evaluate_setting(name, ours, t, validate=validate_float)
                b = mk_evaluate(name, theirs, t, validate=validate_float)
                assert (a is None and b is None) or a == b, (raw, name, t, a, b)  # bit-identical floats
                checked += 1
    assert checked == 400 * len(names) * 6


@pytest.mark.mergekit
def test_resolve_parameter_matches_mergekit():
    from mergekit.merge_methods import get
    from mergekit.parameter_resolver import resolve_parameter as mk_resolve

    scopes = [
        {"weight": [{"filter": "mlp", "value": [1, 2]}]},
        None,
        {"weight": [], "normalize": "false"},
        {"weight": 0.3, "normalize": True, "t": [0, 1]},
    ]
    ours_scopes = [None if s is None else {k: _parse(v) for k, v in s.items()} for s in scopes]
    mk_scopes = [None if s is None else {k: _mk_setting(v) for k, v in s.items()} for s in scopes]
    for method, pname in (
        ("linear", "weight"),
        ("linear", "normalize"),
        ("slerp", "t"),
        ("passthrough", "scale"),
    ):
        mk_spec = next(p for p in get(method).spec.parameters if p.name == pname)
        spec = methods.get(method).param(pname)
        for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
            for t in (0, 0.5, 1):
                a = resolve_parameter(spec, ours_scopes, tensor_name=name, t=t)
                b = mk_resolve(mk_spec, mk_scopes, tensor_name=name, t=t)
                assert a == b and type(a) is type(b), (method, pname, name, t, a, b)


def _parse(v):
    from mergekit_fast.config import _parse_setting

    return _parse_setting(v)


def _mk_setting(v):
    from mergekit.config import ConditionalParameter as MkCond

    if isinstance(v, list) and v and isinstance(v[0], dict):
        return [MkCond.model_validate(c) for c in v]
    return v


def test_conditional_parameter_is_hashable_and_frozen():
    c = ConditionalParameter(value=(0.0, 1.0), filter="mlp")
    assert hash(c) == hash(ConditionalParameter(value=(0.0, 1.0), filter="mlp"))
    assert evaluate_setting("x.mlp.y", (c,), 0.5, validate=float) == 0.5
    assert evaluate_setting("x.attn.y", (c,), 0.5, validate=float) is None


# --------------------------------------------------------------------------------------------------
# Errors: one ConfigError naming the key path

BASE = "merge_method: {m}\n"
TWO = "models:\n  - model: a\n  - model: b\n"

BAD_CONFIGS = [
    # (yaml, exception type, substring that must appear (the key path first))
    (
        "merge_method: passthrough\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 4]}\n"
        "  - sources:\n      - {model: a, layer_range: [4, 2]}\n",
        ConfigError,
        "slices[1].sources[0].layer_range: [4, 2]",
    ),
    (
        "merge_method: passthrough\nslices:\n  - sources:\n      - {model: a, layer_range: [0, x]}\n",
        ConfigError,
        "slices[0].sources[0].layer_range[1]: ",
    ),
    (
        "merge_method: passthrough\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 1, 2]}\n",
        ConfigError,
        "slices[0].sources[0].layer_range: ",
    ),
    (
        "merge_method: passthrough\nslices:\n  - sources:\n      - {model: a}\n",
        ConfigError,
        "slices[0].sources[0].layer_range: required key is missing",
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\n    paramaters: {weight: 1}\n",
        ConfigError,
        "models[0].paramaters: unknown key",
    ),
    ("merge_method: linear\nmodel:\n  - model: a\n", ConfigError, "model: unknown key"),
    ("models:\n  - model: a\n", ConfigError, "merge_method: required key is missing"),
    (
        "merge_method: slerp\nbase_model: a\n" + TWO + "parameters:\n  t: [0, abc]\n",
        ConfigError,
        "parameters.t[1]: 'abc' is not a valid value for t",
    ),
    (
        "merge_method: slerp\nbase_model: a\n" + TWO + "parameters:\n  t:\n    - filter: 5\n      value: 1\n",
        ConfigError,
        "parameters.t[0].filter: must be a string",
    ),
    (
        "merge_method: slerp\nbase_model: a\n"
        + TWO
        + "parameters:\n  t:\n    - {filter: x, value: [0, oops]}\n",
        ConfigError,
        "parameters.t[0].value[1]: 'oops' is not a valid value for t",
    ),
    (
        "merge_method: slerp\nbase_model: a\n"
        + TWO
        + "parameters:\n  t:\n    - {filter: x, value: 1}\n    - 0.5\n",
        ConfigError,
        "parameters.t[1]: a list of filters must contain only {filter, value} entries",
    ),
    (
        "merge_method: slerp\nbase_model: a\n" + TWO + "parameters:\n  t: [[0, 1]]\n",
        ConfigError,
        "parameters.t[0]: a gradient is a list of numbers",
    ),
    (
        "merge_method: slerp\nbase_model: a\n" + TWO + "parameters:\n  t: {filter: x}\n",
        ConfigError,
        "parameters.t: missing 'value'",
    ),
    (
        "merge_method: slerp\nbase_model: a\n" + TWO + "parameters:\n  t: {filter: x, value: 1, when: 2}\n",
        ConfigError,
        "parameters.t: unknown key 'when'",
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\nparameters: {weight: null}\n",
        ConfigError,
        "parameters.weight: ",
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {normalize: maybe}\n",
        ConfigError,
        "models[0].parameters.normalize: 'maybe' is not a valid value for normalize",
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 1]}\n",
        ConfigError,
        "models/slices/modules: exactly one of 'models', 'slices' or 'modules' must be given; got models and slices",
    ),
    ("merge_method: linear\nmodels: []\n", ConfigError, "models/slices/modules: exactly one"),
    ("merge_method: foo\nmodels:\n  - model: a\n", ConfigError, "merge_method: unknown method 'foo'"),
    (
        "merge_method: linear\nmodels:\n  - model: a+lora\n",
        NotSupportedError,
        "models[0].model: 'a+lora': LoRA",
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a@main\n",
        NotSupportedError,
        "models[0].model: 'a@main': revisions",
    ),
    ("merge_method: linear\nmodels:\n  - model: a@b@c\n", ConfigError, "models[0].model: 'a@b@c': invalid"),
    (
        "merge_method: linear\nmodels:\n  - model: {path: a}\n",
        ConfigError,
        "models[0].model: a model reference must be",
    ),
    (
        "merge_method: linear\nbase_model: x+y\nmodels:\n  - model: a\n",
        NotSupportedError,
        "base_model: 'x+y'",
    ),
    (
        "merge_method: linear\ndtype: bf16\nmodels:\n  - model: a\n",
        ConfigError,
        "dtype: unknown dtype 'bf16'",
    ),
    (
        "merge_method: linear\nout_dtype: int64\nmodels:\n  - model: a\n",
        ConfigError,
        "out_dtype: unknown dtype 'int64'",
    ),
    (
        "merge_method: passthrough\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 4]}\n"
        "      - {model: b, layer_range: [0, 4]}\n",
        ConfigError,
        "slices[0]: merge_method passthrough needs exactly 1 input model(s)",
    ),
    (
        "merge_method: slerp\n" + TWO + "parameters: {t: 0.5}\n",
        ConfigError,
        "models: merge_method slerp needs a base_model",
    ),
    (
        "merge_method: slerp\nbase_model: c\n" + TWO + "parameters: {t: 0.5}\n",
        ConfigError,
        "models: merge_method slerp needs exactly 2 input model(s)",
    ),
    (
        "merge_method: slerp\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 2]}\n"
        "      - {model: b, layer_range: [0, 2]}\n    base_model: c\nparameters: {t: 0.5}\n",
        ConfigError,
        "slices[0]: base_model /b/c is not one of the slice's sources",
    ),
    (
        "merge_method: linear\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 2]}\n"
        "      - {model: a, layer_range: [2, 4]}\nparameters: {weight: 1}\n",
        ConfigError,
        "slices[0]: model /b/a appears twice",
    ),
    (
        "merge_method: linear\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 4]}\n"
        "      - {model: b, layer_range: [0, 3]}\nparameters: {weight: 1}\n",
        ConfigError,
        "slices[0].sources: all sources of a slice must have the same number of layers",
    ),
    (
        "merge_method: linear\nslices:\n  - sources: []\n",
        ConfigError,
        "slices[0].sources: a slice needs at least one source",
    ),
    (
        "merge_method: linear\nmodules: {text: {models: [{model: a}], slices: [{sources: [{model: a, "
        "layer_range: [0, 1]}]}]}}\nparameters: {weight: 1}\n",
        ConfigError,
        "modules.text: exactly one of 'models' or 'slices' must be given; got both",
    ),
    (
        "merge_method: linear\nmodules: {text: {models: [{model: a, parameters: {weight: x}}]}}\n",
        ConfigError,
        "modules.text.models[0].parameters.weight: 'x' is not a valid value",
    ),
    (
        "merge_method: linear\nmodules: {text: {slices: [{sources: [{model: a, layer_range: [2, 1]}]}]}}\n"
        "parameters: {weight: 1}\n",
        ConfigError,
        "modules.text.slices[0].sources[0].layer_range: [2, 1] is not a half-open range",
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\nparameters: {weight: 1}\ntokenizer_source: base\n"
        "tokenizer: {source: base}\n",
        ConfigError,
        "tokenizer: give either tokenizer_source or a tokenizer: block",
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\nparameters: {weight: 1}\nchat_template: chatmlx\n",
        ConfigError,
        "chat_template: 'chatmlx' is neither 'auto', one of mergekit's templates (alpaca, chatml,",
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\nparameters: {weight: 1}\n"
        "tokenizer: {tokens: {'<x>': {source: {kind: other}}}}\n",
        ConfigError,
        "tokenizer.tokens.<x>.source: kind must be 'model_token' or 'zero'",
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\nparameters: {weight: 1}\n"
        "tokenizer: {tokens: {'<x>': {source: {kind: model_token, model: a}}}}\n",
        ConfigError,
        "tokenizer.tokens.<x>.source: give exactly one of token_id or token",
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\nparameters: {weight: 1}\ntokenizer: {pad_to_multiple_of: 0}\n",
        ConfigError,
        "tokenizer.pad_to_multiple_of: must be a positive integer",
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\ntokenizer_source: {a: 1}\n",
        ConfigError,
        "tokenizer_source: ",
    ),
    ("merge_method: [\n", ConfigError, "invalid YAML"),
    ("- a\n- b\n", ConfigError, "the config must be a YAML mapping"),
]


@pytest.mark.parametrize("text,exc,needle", BAD_CONFIGS, ids=[f"bad{i}" for i in range(len(BAD_CONFIGS))])
def test_bad_config_raises_one_clear_error(text, exc, needle):
    with pytest.raises(exc) as info:
        parse_config(text, base_dir="/b")
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(needle) or needle in str(info.value), str(info.value)


# Configs that mergekit 0.1.5 itself rejects when it validates the YAML or normalises the slices:
# mergekit must reject them too (so the error is not an invention of ours).
MERGEKIT_ALSO_REJECTS = [
    i
    for i, (text, _, needle) in enumerate(BAD_CONFIGS)
    if needle.startswith(
        ("slices[", "merge_method: required", "parameters.", "models/slices", "invalid YAML")
    )
    and "unknown key" not in needle
    or "'a@b@c'" in needle
    or "a model reference must be" in needle
]


@pytest.mark.mergekit
@pytest.mark.parametrize("i", MERGEKIT_ALSO_REJECTS)
def test_mergekit_also_rejects(i):
    from mergekit.config import MergeConfiguration
    from mergekit.merge_methods import get
    from pydantic import TypeAdapter

    text = BAD_CONFIGS[i][0]
    with pytest.raises((ValueError, RuntimeError, yaml.YAMLError, TypeError, IndexError)):
        data = yaml.safe_load(text)
        cfg = MergeConfiguration.model_validate(data)
        method = get(cfg.merge_method)
        for s in cfg.slices or []:  # what MergePlanner.normalize_config and plan_slice check
            method.validate_inputs([src.model for src in s.sources], s.base_model or cfg.base_model)
            lengths = [src.layer_range[1] - src.layer_range[0] for src in s.sources]
            if not all(n == lengths[0] for n in lengths):
                raise RuntimeError("All inputs to a slice must contain the same number of layers")
        # mergekit validates numeric values only when a tensor needs them: emulate that use
        validate = TypeAdapter(float).validate_python
        for src in [cfg.parameters] + [m.parameters for m in cfg.models or []]:
            for v in (src or {}).values():
                for t in (0, 0.5, 1):
                    evaluate_setting("x", _parse(_plain(v)), t, validate=validate)
        for s in cfg.slices or []:
            for src in s.sources:
                a, b = src.layer_range
                if not 0 <= a < b:
                    raise ValueError("empty range")  # mergekit plans nothing for it: reject is our choice


def _plain(v):
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if hasattr(v, "model_dump"):
        return {k: x for k, x in v.model_dump().items() if x is not None}
    return v


@pytest.mark.mergekit
def test_every_mergekit_method_is_here():
    from mergekit.merge_methods import registered_methods

    from mergekit_fast import methods

    theirs = {m.spec.name for m in registered_methods()}
    assert theirs == set(methods.MERGEKIT_METHODS)
    assert theirs <= set(methods.names())
    for name in theirs:  # the same parameter names, scopes and defaults
        ours = methods.get(name)
        mk = next(m for m in registered_methods() if m.spec.name == name)
        for p in mk.spec.parameters:
            q = ours.param(p.name)
            assert q is not None, (name, p.name)
            assert q.scope.value == p.scope.value, (name, p.name)
            if not p.required:
                assert q.default == p.default, (name, p.name, q.default, p.default)
            else:
                assert q.required, (name, p.name)


def test_layer_range_checks_do_not_need_models():
    # layer_range past the model's end is checked in plan.py (it needs the model); here only the shape
    cfg = parse_config(
        "merge_method: passthrough\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 400]}\n",
        base_dir="/z",
    )
    (s,) = cfg.slices()
    assert (s.sources[0].start, s.sources[0].end, s.length) == (0, 400, 400)


def test_unknown_parameter_is_ignored_like_mergekit(caplog):
    cfg = parse_config(
        "merge_method: linear\nmodels:\n  - model: a\nparameters: {weight: 1, density: 0.5}\n", base_dir="/u"
    )
    assert "density" in caplog.text
    assert cfg.parameters["density"] == 0.5


def test_load_config_prefixes_the_file(tmp_path):
    p = tmp_path / "bad.yml"
    p.write_text("merge_method: linear\nmodels:\n  - model: a\n    weight: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert str(info.value).startswith(f"{p}: models[0].weight: unknown key")
    with pytest.raises(ConfigError, match="cannot read the config"):
        load_config(tmp_path / "missing.yml")


def test_gradient_single_layer_slice_uses_t_equals_one():
    # mergekit: t = 1 for a one-layer slice, so a gradient gives its LAST value there
    setting = (0.0, 0.25, 1.0)
    assert evaluate_setting("x", setting, 1, validate=float) == 1.0
    assert math.isclose(evaluate_setting("x", setting, 0.75, validate=float), 0.625)


def test_shared_parameter_under_a_model_warns(caplog):
    parse_config(
        "merge_method: slerp\nbase_model: a\nmodels:\n  - model: a\n  - model: b\n    parameters: {t: 0.1}\n"
        "parameters: {t: 0.5}\n",
        base_dir="/w",
    )
    assert "models[1].parameters.t" in caplog.text and "never reads it" in caplog.text
