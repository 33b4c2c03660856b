"""``mergekit-fast moe CONFIG OUT``: build the MoE model mergekit-moe 0.1.5 builds, through the merge engine.

Steps, all checks before anything is written (and before the expensive gate forward pass):

1. parse and check the config (mergekit's is_bad_config rules, `moe.config`);
2. open every model (headers only), select the output architecture (`moe.arch`), check every tensor the
   output needs (presence, shape, dtype) with a dry plan;
3. compute the router gate vectors (`moe.gates`; the hidden modes run the base model on --device, then free
   it);
4. build a MergePlan -- base tensors as ``passthrough``, fused experts as ``concat`` / ``moe_concat``, gates
   and zero biases as ``moe_constant`` -- and run it with `engine.run_merge` (pipelined, memory-bounded,
   atomic output, sharding, --verify). config.json is what transformers' config classes write for
   mergekit; the tokenizer is the base model's as mergekit-moe saves it (left padding, pad = bos);
   ``--write-model-card`` writes README.md and mergekit_moe_config.yml (mergekit-moe: only the latter).
"""

from __future__ import annotations

import logging
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_fast.config import ConfigError, dtype_from_name
from mergekit_fast.dtypes import DType
from mergekit_fast.engine import MergeOptions, MergeResult, output, resolve_device, run_merge
from mergekit_fast.io.model import ModelSource
from mergekit_fast.moe import methods as _methods  # noqa: F401 - registers moe_concat / moe_constant
from mergekit_fast.moe.arch import BuildContext, OutputArchitecture, select_output_arch
from mergekit_fast.moe.config import (
    HIDDEN_MODES,
    RANDOM_MODES,
    MoEConfig,
    check_moe_config,
    load_moe_config,
    parse_moe_config,
)
from mergekit_fast.moe.gates import compute_gates, load_tokenizer, warn_degenerate_gates
from mergekit_fast.plan import MergePlan

LOG = logging.getLogger(__name__)


@dataclass
class MoEPlan(MergePlan):
    config_file_name: str = "mergekit_moe_config.yml"
    model_card: str | None = None
    architecture: str = ""
    gate_mode: str = ""
    gate_seconds: float = 0.0  # time spent computing the router gates


def _text_config(cfg: dict) -> dict:
    return cfg.get("text_config") or cfg


def _out_dtype(config: MoEConfig, base_cfg: dict) -> DType | None:
    """mergekit's select_dtype: the config's dtype, else the base config's (torch_)dtype, else None."""
    if config.dtype:
        return dtype_from_name(config.dtype)
    name = base_cfg.get("dtype") or base_cfg.get("torch_dtype")
    if isinstance(name, str):
        try:
            return dtype_from_name(name)
        except KeyError:
            LOG.warning("base_model: config dtype %r is not a float dtype; keeping each tensor's dtype", name)
    return None


def _open(config: MoEConfig) -> dict[str, ModelSource]:
    sources: dict[str, ModelSource] = {}
    try:
        for m in config.models():
            sources[m] = ModelSource.open(m)
    except BaseException:
        for s in sources.values():
            s.close()
        raise
    return sources


def _check_models(config: MoEConfig, sources: dict[str, ModelSource]) -> None:
    base = sources[config.base_model]
    base_cfg = _text_config(base.config)
    n = base.num_layers
    for e in config.experts + config.shared_experts:
        src = sources[e.source_model]
        cfg = _text_config(src.config)
        if src.num_layers != n:
            raise ConfigError(
                f"{e.where}.source_model: {src.path} has {src.num_layers} layers, the base model {n}; "
                "all experts need the base model's layer count"
            )
        for key in ("hidden_size", "intermediate_size"):
            if cfg.get(key) != base_cfg.get(key):
                raise ConfigError(
                    f"{e.where}.source_model: {src.path} has {key} {cfg.get(key)}, the base model "
                    f"{base_cfg.get(key)}; experts must have the base model's shapes"
                )


def _model_card(config: MoEConfig, arch: OutputArchitecture) -> str:
    experts = "\n".join(f"* {e.source_model}" for e in config.experts)
    shared = "".join(f"\n### Shared expert\n\n* {e.source_model}\n" for e in config.shared_experts)
    return (
        "---\nlibrary_name: transformers\ntags:\n- mergekit\n- mergekit_fast\n- moe\n- merge\n---\n"
        "# merged model\n\n"
        "A mixture of experts built from dense models with mergekit_fast (mergekit-moe compatible).\n\n"
        f"## Details\n\nOutput architecture: {arch.name}; gate mode: {config.gate_mode}; "
        f"experts per token: {config.experts_per_token}\n\nBase model: {config.base_model}\n\n"
        f"### Experts\n\n{experts}\n{shared}\n"
        f"### Configuration\n\n```yaml\n{config.yaml_text.strip()}\n```\n"
    )


def build_moe_plan(
    config: MoEConfig,
    *,
    allow_same: bool = False,
    random_seed: int | None = None,
    device: str = "auto",
    progress: bool | None = None,
    tokenizer_dir: str | Path | None = None,
    copy_tokenizer: bool = True,
    trust_remote_code: bool = False,
) -> MoEPlan:
    """Everything checked, the gates computed, the plan ready for run_merge. When ``tokenizer_dir`` is given
    and ``copy_tokenizer`` is set, the tokenizer mergekit-moe would save is saved there (the plan's
    tokenizer_source)."""
    check_moe_config(config, allow_same=allow_same)
    dev = resolve_device(device)
    sources = _open(config)
    try:
        types = {}
        for m, src in sources.items():
            t = _text_config(src.config).get("model_type")
            if not isinstance(t, str):
                raise ConfigError(f"{src.path / 'config.json'}: no model_type")
            types[m] = t
        arch = select_output_arch(config, types)
        _check_models(config, sources)
        base = sources[config.base_model]
        base_cfg = _text_config(base.config)
        out_dtype = _out_dtype(config, base_cfg)
        gated = config.gated_experts()
        n_routed = len(config.experts)
        L, H = base.num_layers, base_cfg.get("hidden_size")

        def context(gates: torch.Tensor, seed: int) -> BuildContext:
            g = gates if out_dtype is None else gates.to(out_dtype.torch)
            return BuildContext(config, sources, base_cfg, out_dtype, g[:, :n_routed], g[:, n_routed:], seed)

        # A dry plan with placeholder gates checks every tensor before the gates cost anything.
        arch.plan_tensors(context(torch.zeros(L, len(gated), H), 0))
        out_config = arch.out_config(str(base.path), config, out_dtype)

        need_tok = config.gate_mode not in RANDOM_MODES
        tokenizer = (
            load_tokenizer(config.base_model, required=need_tok, trust_remote_code=trust_remote_code)
            if (need_tok or copy_tokenizer)
            else None
        )
        if config.gate_mode in HIDDEN_MODES:
            LOG.info("computing hidden-state gates with %s on %s", config.base_model, dev)
        t_gates = time.perf_counter()
        gates = compute_gates(config.gate_mode, gated, base, tokenizer, device=dev, seed=random_seed,
                              progress=progress, trust_remote_code=trust_remote_code)  # fmt: skip
        t_gates = time.perf_counter() - t_gates
        warn_degenerate_gates(gates)
        noise_seed = random_seed if random_seed is not None else secrets.randbits(63)
        if random_seed is None and any(
            e.noise_scale is not None for e in config.experts + config.shared_experts
        ):
            LOG.info("noise seed %d (pass --random-seed to make the noise reproducible)", noise_seed)
        tensors = arch.plan_tensors(context(gates, noise_seed))

        tok_source = None
        if copy_tokenizer and tokenizer is not None and tokenizer_dir is not None:
            tokenizer.save_pretrained(str(tokenizer_dir))
            tok_source = Path(tokenizer_dir)
        return MoEPlan(
            sources=sources,
            tensors=tensors,
            out_config=out_config,
            tokenizer_source=tok_source,
            config_yaml=config.yaml_text,
            model_card=_model_card(config, arch),
            architecture=arch.name,
            gate_mode=config.gate_mode,
            gate_seconds=t_gates,
        )
    except BaseException:
        for s in sources.values():
            s.close()
        raise


def run_moe(
    config: MoEConfig | str | Path,
    out: str | Path,
    options: MergeOptions | None = None,
    *,
    allow_same: bool = False,
    random_seed: int | None = None,
    started: float | None = None,
    executor=None,
) -> MergeResult:
    """Build the MoE described by ``config`` (a MoEConfig, a config file path or YAML text) into ``out``.
    ``random_seed`` defaults to ``options.random_seed``. ``executor`` writes the shards
    (``mergekit_fast.executors``; default: this process); the gates are computed here, and travel with
    the plan."""
    t0 = time.perf_counter()
    opt = options or MergeOptions()
    if random_seed is None:
        random_seed = opt.random_seed
    if isinstance(config, Path) or (
        isinstance(config, str) and "\n" not in config and config.endswith((".yml", ".yaml"))
    ):
        config = load_moe_config(config)
    elif isinstance(config, str):
        config = parse_moe_config(config)
    # OUT is checked now, before the (possibly long) gate computation; run_merge checks it again.
    output.check_target(out, config.models(), force=opt.force, force_unrecognized=opt.force_unrecognized)
    if opt.threads:  # the gates run torch models outside the engine
        torch.set_num_threads(opt.threads)
    tok_dir = tempfile.mkdtemp(prefix="mergekit_fast-moe-tokenizer-")
    try:
        plan = build_moe_plan(
            config,
            allow_same=allow_same,
            random_seed=random_seed,
            device=opt.device,
            progress=opt.progress,
            tokenizer_dir=tok_dir,
            copy_tokenizer=opt.copy_tokenizer,
            trust_remote_code=opt.trust_remote_code,
        )
        planned = time.perf_counter() - t0
        phases = {"plan": planned - plan.gate_seconds, "gates": plan.gate_seconds}
        return run_merge(plan, out, opt, started=t0 if started is None else started, phases=phases,
                         executor=executor)  # fmt: skip
    finally:
        shutil.rmtree(tok_dir, ignore_errors=True)
