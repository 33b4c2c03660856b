"""One benchmark config per merge method, for ``bench/bench_merge.py --method NAME``.

Each entry is a YAML template over the models ``{a}`` (the base where the method has one), ``{b}``,
``{c}`` and the layer count ``{n}``; parameters are the ones mergekit's docs and tests use. A method's
file adds its entry here when it lands.
"""

from __future__ import annotations

from mergekit_fast.testing import slerp_gradient_config

DUS = """\
slices:
  - sources:
      - model: {a}
        layer_range: [0, {k}]
  - sources:
      - model: {a}
        layer_range: [{d}, {n}]
merge_method: passthrough
dtype: bfloat16
"""

CONFIGS: dict[str, str] = {
    "linear": """\
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.3}}
  - model: {c}
    parameters: {{weight: 0.2}}
merge_method: linear
dtype: bfloat16
""",
    # the other families of issue 13: {a} is the base where the method has one
    "sce": """\
models:
  - model: {b}
  - model: {c}
merge_method: sce
base_model: {a}
parameters: {{select_topk: 0.1}}
dtype: bfloat16
""",
    "model_stock": """\
models:
  - model: {b}
  - model: {c}
merge_method: model_stock
base_model: {a}
dtype: bfloat16
""",
    "nuslerp": """\
models:
  - model: {b}
    parameters: {{weight: 0.5}}
  - model: {c}
    parameters: {{weight: 0.5}}
merge_method: nuslerp
base_model: {a}
dtype: bfloat16
""",
    "multislerp": """\
models:
  - model: {b}
    parameters: {{weight: 0.6}}
  - model: {c}
    parameters: {{weight: 0.4}}
merge_method: multislerp
base_model: {a}
dtype: bfloat16
""",
    "karcher": """\
models:
  - model: {a}
  - model: {b}
  - model: {c}
merge_method: karcher
parameters: {{max_iter: 10, tol: 1.0e-5}}
dtype: bfloat16
""",
    "nearswap": """\
models:
  - model: {b}
merge_method: nearswap
base_model: {a}
parameters: {{t: 0.0001}}
dtype: bfloat16
""",
    "arcee_fusion": """\
models:
  - model: {b}
merge_method: arcee_fusion
base_model: {a}
dtype: bfloat16
""",
    "ram": """\
models:
  - model: {b}
  - model: {c}
merge_method: ram
base_model: {a}
dtype: bfloat16
""",
    "ramplus_tl": """\
models:
  - model: {b}
  - model: {c}
merge_method: ramplus_tl
base_model: {a}
parameters: {{r: 0.1, alpha: 0.2}}
dtype: bfloat16
""",
    # The task-arithmetic family: base {a}, models {b} and {c}; parameters in the style of mergekit's
    # examples (examples/ties.yml: density and weight gradients, a filter, normalize and int8_mask).
    "task_arithmetic": """\
models:
  - model: {b}
    parameters: {{weight: 0.7}}
  - model: {c}
    parameters: {{weight: [0.2, 0.5]}}
merge_method: task_arithmetic
base_model: {a}
parameters: {{lambda: 0.9}}
dtype: bfloat16
""",
    "ties": """\
models:
  - model: {b}
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: {c}
    parameters:
      density: 0.5
      weight:
        - filter: mlp
          value: 0.5
        - value: 0.3
merge_method: ties
base_model: {a}
parameters: {{normalize: true, int8_mask: true}}
dtype: bfloat16
""",
    "dare_ties": """\
models:
  - model: {b}
    parameters: {{density: 0.53, weight: 0.6}}
  - model: {c}
    parameters: {{density: 0.53, weight: 0.4}}
merge_method: dare_ties
base_model: {a}
parameters: {{int8_mask: true}}
dtype: bfloat16
""",
    "dare_linear": """\
models:
  - model: {b}
    parameters: {{density: 0.5, weight: 0.6}}
  - model: {c}
    parameters: {{density: [0.3, 0.7], weight: 0.4}}
merge_method: dare_linear
base_model: {a}
dtype: bfloat16
""",
    "breadcrumbs": """\
models:
  - model: {b}
    parameters: {{density: 0.9, gamma: 0.01, weight: 0.6}}
  - model: {c}
    parameters: {{density: 0.9, gamma: 0.01, weight: 0.4}}
merge_method: breadcrumbs
base_model: {a}
dtype: bfloat16
""",
    "breadcrumbs_ties": """\
models:
  - model: {b}
    parameters: {{density: 0.9, gamma: 0.01, weight: 0.6}}
  - model: {c}
    parameters: {{density: 0.9, gamma: 0.01, weight: 0.4}}
merge_method: breadcrumbs_ties
base_model: {a}
parameters: {{normalize: true}}
dtype: bfloat16
""",
    "della": """\
models:
  - model: {b}
    parameters: {{density: 0.5, epsilon: 0.1, weight: 0.6}}
  - model: {c}
    parameters: {{density: 0.5, epsilon: 0.1, weight: 0.4}}
merge_method: della
base_model: {a}
parameters: {{lambda: 1.0}}
dtype: bfloat16
""",
    "della_linear": """\
models:
  - model: {b}
    parameters: {{density: 0.5, epsilon: 0.1, weight: 0.6}}
  - model: {c}
    parameters: {{density: 0.5, epsilon: 0.1, weight: 0.4}}
merge_method: della_linear
base_model: {a}
dtype: bfloat16
""",
}


def config(method: str, a, b, c, n: int) -> str:
    """The benchmark config of ``method`` over models a, b, c with n layers each."""
    if method == "slerp":
        return slerp_gradient_config(a, b, n)
    if method == "dus":
        return DUS.format(a=a, k=n - n // 4, d=n // 4, n=n)
    if method not in CONFIGS:
        raise SystemExit(
            f"no benchmark config for {method!r}; known: slerp, dus, {', '.join(sorted(CONFIGS))}"
        )
    return CONFIGS[method].format(a=a, b=b, c=c, n=n)


def inputs(method: str) -> int:
    """How many distinct input models the benchmark config reads (for the input-rate column)."""
    if method == "dus":
        return 1
    if method == "slerp":
        return 2
    text = CONFIGS.get(method, "")
    return sum(1 for key in ("{a}", "{b}", "{c}") if key in text)


def methods() -> list[str]:
    return ["slerp", "dus", *sorted(CONFIGS)]
