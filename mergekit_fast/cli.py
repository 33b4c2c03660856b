"""Command line: ``mergekit-fast {merge,dus,moe,bench,info}`` and the mergekit-compatible aliases.

``mergekit-fast-yaml CONFIG OUT [mergekit-yaml flags]`` accepts mergekit-yaml's flags: the ones
that mean something here are mapped, the rest are accepted and ignored with a note.
Exit codes: 0 success, 2 bad input (config, model, options), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

log = logging.getLogger("mergekit_fast")

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgGtT]?)(i?[bB])?\s*$")


def parse_size(text: str, *, binary_suffixes: bool = False) -> int:
    """'5B', '500M', '100K', '1.5G', '4GiB' or a plain integer -> bytes.

    Like mergekit's parse_kmb, K/M/B(illion) are decimal; G/T and the 'iB' forms are binary.
    """
    m = _SIZE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 5B, 500M, 4GiB)")
    value, unit, ib = float(m.group(1)), m.group(2).upper(), m.group(3)
    if ib and ib.lower() == "ib" or (binary_suffixes and unit in "KMGT" and unit):
        mult = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "B": 2**30}[unit]
    else:
        mult = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 2**30, "T": 2**40}[unit]
    return int(value * mult)


def _verify_arg(text: str) -> int:
    if text == "all":
        return -1
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("--verify takes a number of tensors or 'all'") from None
    if n < 0:
        raise argparse.ArgumentTypeError("--verify takes a non-negative number or 'all'")
    return n


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (GPU when visible), cpu, cuda or cuda:N")
    p.add_argument("--out-shard-size", type=parse_size, default=parse_size("5B"),
                   help="bytes per output shard, mergekit syntax (5B = 5e9, 500M, 100K)")  # fmt: skip
    p.add_argument("--max-memory", type=lambda s: parse_size(s, binary_suffixes=True), default=4 << 30,
                   help="budget for buffers in flight (default 4G); peak memory stays near it")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--verify", type=_verify_arg, default=0, metavar="N|all",
                   help="cross-check N sampled tensors (or all) against the torch reference on the CPU")  # fmt: skip
    p.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "cpp", "torch"])
    p.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--strict", action="store_true", help="NaN/Inf in a merged tensor is an error, not a warning"
    )
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: only on a terminal)")  # fmt: skip
    p.add_argument("-j", "--num-threads", type=int, default=None, help="CPU threads for the kernels")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true")


def _options(args):
    from mergekit_fast.engine import MergeOptions

    return MergeOptions(
        device=args.device,
        out_shard_size=args.out_shard_size,
        max_memory=args.max_memory,
        force=args.force,
        verify=args.verify,
        backend=args.backend,
        copy_tokenizer=args.copy_tokenizer,
        write_model_card=args.write_model_card,
        strict=args.strict,
        progress=False if args.quiet else args.progress,
        threads=args.num_threads or 0,
    )


def _setup(args) -> None:
    level = logging.WARNING - 10 * min(args.verbose, 2)
    if args.quiet:
        level = logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.num_threads is not None and args.num_threads < 1:
        raise ValueError(f"--num-threads must be at least 1, got {args.num_threads}")


def _run_config(config_source, out: str, args) -> int:
    from mergekit_fast.config import load_config, parse_config
    from mergekit_fast.engine import run_merge
    from mergekit_fast.plan import build_plan

    config = load_config(config_source) if isinstance(config_source, Path) else parse_config(config_source)
    plan = build_plan(config)
    result = run_merge(plan, out, _options(args))
    if not args.quiet:
        print(result.summary())
    return 0


def cmd_merge(args) -> int:
    path = Path(args.config)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    return _run_config(path, args.out, args)


def dus_config(model: str, num_layers: int, drop: int, dtype: str | None = None) -> str:
    """The SOLAR depth up-scaling recipe as a mergekit YAML config: two copies of the model, the
    first without its last ``drop`` layers, the second without its first ``drop``."""
    if not 0 < drop < num_layers:
        raise ValueError(
            f"--drop must be between 1 and {num_layers - 1} for a {num_layers}-layer model, got {drop}"
        )
    lines = [
        "slices:",
        "  - sources:",
        f"      - model: {model}",
        f"        layer_range: [0, {num_layers - drop}]",
        "  - sources:",
        f"      - model: {model}",
        f"        layer_range: [{drop}, {num_layers}]",
        "merge_method: passthrough",
    ]
    if dtype:
        lines.append(f"dtype: {dtype}")
    return "\n".join(lines) + "\n"


def cmd_dus(args) -> int:
    from mergekit_fast.io.model import ModelSource

    model = str(Path(args.model).absolute())
    n = ModelSource.open(model).num_layers
    text = dus_config(model, n, args.drop, args.dtype)
    if not args.quiet:
        print(f"depth up-scaling {n} -> {2 * (n - args.drop)} layers")
    return _run_config(text, args.out, args)


def cmd_moe(args) -> int:
    from mergekit_fast.moe.build import run_moe_cli

    return run_moe_cli(args)


def cmd_info(args) -> int:
    from mergekit_fast.info import main as info_main

    return info_main(["--json"] if args.json else [])


def cmd_bench(args) -> int:
    import runpy

    root = Path(__file__).resolve().parent.parent / "bench" / "run_all.py"
    if not root.exists():
        raise FileNotFoundError(f"{root}: the benchmark suite ships with the source tree, not the wheel")
    sys.argv = [str(root)] + (["--quick"] if args.quick else []) + (["--out", args.out] if args.out else [])
    runpy.run_path(str(root), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mergekit-fast", description="Fast, memory-bounded, mergekit-compatible merging."
    )
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="run a mergekit YAML config (slerp, linear, passthrough/DUS)")
    m.add_argument("config")
    m.add_argument("out")
    _add_common(m)
    m.set_defaults(func=cmd_merge)

    d = sub.add_parser(
        "dus", help="SOLAR depth up-scaling: stack two copies of MODEL, dropping N layers at the seam"
    )
    d.add_argument("model")
    d.add_argument("out")
    d.add_argument("--drop", type=int, required=True, help="layers dropped from each copy at the seam")
    d.add_argument("--dtype", default=None, help="cast to this dtype (e.g. bfloat16)")
    _add_common(d)
    d.set_defaults(func=cmd_dus)

    e = sub.add_parser(
        "moe", help="build a Mixtral / Qwen-MoE model from dense experts (mergekit-moe config)"
    )
    e.add_argument("config")
    e.add_argument("out")
    e.add_argument("--random-seed", type=int, default=None)
    e.add_argument(
        "--i-understand-this-is-not-useful-without-training", action="store_true", dest="allow_same"
    )
    _add_common(e)
    e.set_defaults(func=cmd_moe)

    b = sub.add_parser("bench", help="run the benchmark suite (bench/run_all.py)")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--out", default=None)
    b.set_defaults(func=cmd_bench, quiet=False, verbose=0, num_threads=None)

    i = sub.add_parser("info", help="versions and available backends")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info, quiet=False, verbose=0, num_threads=None)
    return p


def _dispatch(args) -> int:
    from mergekit_fast.backends import BackendUnavailable
    from mergekit_fast.engine import MergeError

    _setup(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("mergekit-fast: interrupted; no output was written", file=sys.stderr)
        return 130
    except (ValueError, OSError, MergeError, BackendUnavailable) as exc:
        if args.verbose:
            raise
        print(f"mergekit-fast: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _dispatch(args)


# ----------------------------------------------------------------------------- mergekit aliases

# mergekit-yaml flags with no effect here, and why (printed once when used).
_IGNORED_FLAGS = {
    "--lazy-unpickle": "only safetensors inputs are read",
    "--low-cpu-memory": "memory is bounded by --max-memory",
    "--clone-tensors": "duplicated layers never share storage here",
    "--async-write": "writing always overlaps compute",
    "--no-async-write": "writing always overlaps compute",
    "--multi-gpu": "one GPU is used",
    "--read-to-gpu": "inputs are always staged through pinned buffers",
    "--trust-remote-code": "no model code is run for merges",
    "--allow-crimes": "architectures are checked by tensor names and shapes",
    "--unsafe-truncate-embeddings": "not supported yet: vocabularies must match",
    "--safe-serialization": "output is always safetensors",
}
_IGNORED_WITH_VALUE = {
    "--write-threads": "writing uses one thread",
    "--transformers-cache": "models must be local",
    "--lora-merge-cache": "LoRA references are not supported yet",
    "--lora-merge-dtype": "LoRA references are not supported yet",
    "--random-seed": "no merge method here is random",
}


def _translate_mergekit_args(argv: list[str], keep: tuple[str, ...] = ()) -> list[str]:
    out: list[str] = []
    it = iter(argv)
    for a in it:
        flag, eq, value = a.partition("=")
        if a in ("--cuda",):
            out += ["--device", "cuda"]
        elif a == "--no-cuda":
            out += ["--device", "cpu"]
        elif a == "--gpu-rich":
            out += ["--device", "cuda"]
            print("mergekit-fast: note: --gpu-rich -> --device cuda", file=sys.stderr)
        elif a == "--no-safe-serialization":
            raise SystemExit(
                "mergekit-fast: error: --no-safe-serialization: only safetensors output is supported"
            )
        elif flag in _IGNORED_FLAGS:
            print(f"mergekit-fast: note: {flag} ignored ({_IGNORED_FLAGS[flag]})", file=sys.stderr)
        elif flag in keep:
            out.append(a)
        elif flag in _IGNORED_WITH_VALUE:
            if not eq:
                next(it, None)
            print(f"mergekit-fast: note: {flag} ignored ({_IGNORED_WITH_VALUE[flag]})", file=sys.stderr)
        else:
            out.append(a)
    return out


def yaml_alias_main(argv: list[str] | None = None) -> int:
    """``mergekit-fast-yaml CONFIG OUT [mergekit-yaml flags]``."""
    argv = sys.argv[1:] if argv is None else argv
    translated = _translate_mergekit_args(argv)
    # mergekit-yaml overwrites an existing OUT; so does the alias.
    if "--force" not in translated:
        translated.append("--force")
    return main(["merge", *translated])


def moe_alias_main(argv: list[str] | None = None) -> int:
    """``mergekit-fast-moe CONFIG OUT [mergekit-moe flags]``."""
    argv = sys.argv[1:] if argv is None else argv
    rest = [a for a in argv if a not in ("--load-in-4bit", "--load-in-8bit")]
    translated = _translate_mergekit_args(rest, keep=("--random-seed",))
    for a in ("--load-in-4bit", "--load-in-8bit"):
        if a in argv:
            print(f"mergekit-fast: note: {a} ignored (the gate model runs in bf16)", file=sys.stderr)
    if "--force" not in translated:
        translated.append("--force")
    return main(["moe", *translated])


if __name__ == "__main__":
    raise SystemExit(main())
