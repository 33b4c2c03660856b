"""Command line: ``mergekit-fast {merge,merge-many,dus,moe,bench,info}`` and the mergekit-compatible aliases.

``mergekit-fast-yaml CONFIG OUT [mergekit-yaml flags]`` accepts mergekit-yaml's flags: the ones
that mean something here are mapped, the rest are accepted and ignored with a note.
Exit codes: 0 success, 2 bad input (config, model, options), 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import signal
import sys
import time
from pathlib import Path

_T0 = time.perf_counter()  # the run's start, for the summary's time (imports and planning included)
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
    p.add_argument("--device", default=None, help="auto (GPU when visible; the default), cpu, cuda or cuda:N")
    p.add_argument("--out-shard-size", type=parse_size, default=parse_size("5B"),
                   help="bytes per output shard, mergekit syntax (5B = 5e9, 500M, 100K)")  # fmt: skip
    p.add_argument("--max-memory", type=lambda s: parse_size(s, binary_suffixes=True), default=4 << 30,
                   help="budget for buffers in flight (default 4G); peak memory stays near it")  # fmt: skip
    p.add_argument("--force", action="store_true",
                   help="replace OUT if it holds an earlier merge output (never an input model)")  # fmt: skip
    p.add_argument("--force-unrecognized", action="store_true",
                   help="with --force: replace OUT even if it does not look like a merge output")  # fmt: skip
    p.add_argument("--verify", type=_verify_arg, default=0, metavar="N|all",
                   help="cross-check N sampled tensors (or all) against the torch reference on the CPU")  # fmt: skip
    p.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "cpp", "torch"])
    p.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the tokenizer to the output (default: yes)")  # fmt: skip
    p.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True,
                   help="write README.md and the merge config (default: yes)")  # fmt: skip
    p.add_argument(
        "--strict", action="store_true", help="NaN/Inf in a merged tensor is an error, not a warning"
    )
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: only on a terminal)")  # fmt: skip
    p.add_argument("--direct-io", action=argparse.BooleanOptionalAction, default=True,
                   help="native CPU merges read and write the weights with O_DIRECT, past the page cache, where "
                        "the filesystem allows (default: yes; faster at 7B, see mergekit_fast/io/direct.py)")  # fmt: skip
    p.add_argument("-j", "--num-threads", type=int, default=None, help="CPU threads for the kernels")
    p.add_argument("--random-seed", type=int, default=None,
                   help="seed of the random draws (MoE random gates and noise)")  # fmt: skip
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action=argparse.BooleanOptionalAction, default=False,
                   help="no progress bar, no summary")  # fmt: skip
    _add_executor_flags(p)
    _add_mergekit_flags(p)


def _add_executor_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where the merge runs", "this process (the default), every GPU of this node "
                             "(--multi-gpu), or a Ray cluster (--executor ray; pip install 'mergekit_fast[ray]')")  # fmt: skip
    g.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: this process; ray: the output shards are written by Ray tasks (one GPU each "
                   "where the cluster has GPUs), from storage every node shares")  # fmt: skip
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --executor ray: the cluster to use (`ray start --head` prints it; default: "
                   "$RAY_ADDRESS, else the cluster last started on this machine, else a new local one)")  # fmt: skip
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="with --executor ray or --multi-gpu: how many workers split the shards (default: one "
                   "per GPU; on a Ray cluster without GPUs, one per node); --max-memory applies to each")  # fmt: skip


# ----------------------------------------------------------------------------- mergekit's flags

# mergekit 0.1.5's merge options (mergekit/options.py) that mergekit_fast takes with mergekit's meaning
# (--device, --out-shard-size, -j, --copy-tokenizer, --write-model-card, --random-seed, -v, --quiet:
# above; --cuda, --gpu-rich, --allow-crimes, --trust-remote-code: below), and the ones that change
# nothing here, with the reason printed once when given.
_NO_EFFECT_SWITCHES = {
    "lazy-unpickle": "only safetensors inputs are read; pickles are refused",
    "low-cpu-memory": "memory is bounded by --max-memory whatever the device",
    "clone-tensors": "duplicated layers never share storage here",
    "async-write": "writing always overlaps compute",
    "read-to-gpu": "on a GPU, inputs are always staged to it through pinned buffers",
}
_NO_EFFECT_VALUES = {
    "transformers-cache": "models must be local directories",
    "lora-merge-cache": "LoRA references (model+lora) are not supported yet",
    "lora-merge-dtype": "LoRA references (model+lora) are not supported yet",
    "write-threads": "one writer thread writes every shard in place",
}
_MOE_NO_EFFECT = {
    "load-in-4bit": "the gate model runs in bf16",
    "load-in-8bit": "the gate model runs in bf16",
}


def _add_mergekit_flags(p: argparse.ArgumentParser, moe: bool = False) -> None:
    g = p.add_argument_group(
        "mergekit-yaml's flags",
        "accepted with mergekit 0.1.5's meaning, or with a note that they change nothing",
    )
    g.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=None,
                   help="--cuda: --device cuda; --no-cuda: --device cpu")  # fmt: skip
    g.add_argument("--gpu-rich", action="store_true",
                   help="as --cuda --multi-gpu (the rest of mergekit's alias has no effect)")  # fmt: skip
    g.add_argument("--multi-gpu", action=argparse.BooleanOptionalAction, default=False,
                   help="split the output shards across every visible GPU of this node, one worker each "
                   "(no cluster needed)")  # fmt: skip
    g.add_argument("--allow-crimes", action=argparse.BooleanOptionalAction, default=False,
                   help="allow mixing architectures mergekit defines separately")  # fmt: skip
    g.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False,
                   help="let transformers run a model's own code when it loads a config or the gate model")  # fmt: skip
    g.add_argument("--unsafe-truncate-embeddings", action=argparse.BooleanOptionalAction, default=False,
                   help="cut vocabulary tensors of different sizes to the smallest (no tokenizer needed)")  # fmt: skip
    g.add_argument("--safe-serialization", action=argparse.BooleanOptionalAction, default=True,
                   help="output is always safetensors; --no-safe-serialization is refused")  # fmt: skip
    for name, why in _NO_EFFECT_SWITCHES.items():
        g.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None,
                       dest=f"mk_{name.replace('-', '_')}", help=f"no effect: {why}")  # fmt: skip
    for name, why in _NO_EFFECT_VALUES.items():
        g.add_argument(f"--{name}", default=None, metavar="X", dest=f"mk_{name.replace('-', '_')}",
                       help=f"no effect: {why}")  # fmt: skip


def _notes(args) -> None:
    """One line per given mergekit flag that changes nothing here."""
    table = {**_NO_EFFECT_SWITCHES, **_NO_EFFECT_VALUES, **_MOE_NO_EFFECT}
    for name, why in table.items():
        value = getattr(args, f"mk_{name.replace('-', '_')}", None)
        if value is not None:
            flag = f"--{name}" if value is not False else f"--no-{name}"
            print(f"mergekit-fast: note: {flag} changes nothing here ({why})", file=sys.stderr)
    if getattr(args, "gpu_rich", False):
        print("mergekit-fast: note: --gpu-rich is --device cuda --multi-gpu here (--low-cpu-memory and "
              "--read-to-gpu change nothing)", file=sys.stderr)  # fmt: skip


def _device(args) -> str:
    if args.device:
        return args.device
    if getattr(args, "gpu_rich", False) or getattr(args, "cuda", None):
        return "cuda"
    if getattr(args, "cuda", None) is False:
        return "cpu"
    return "auto"


def _options(args):
    from mergekit_fast.engine import MergeOptions

    return MergeOptions(
        device=_device(args),
        out_shard_size=args.out_shard_size,
        max_memory=args.max_memory,
        direct_io=args.direct_io,
        force=args.force,
        force_unrecognized=args.force_unrecognized,
        verify=args.verify,
        backend=args.backend,
        copy_tokenizer=args.copy_tokenizer,
        write_model_card=args.write_model_card,
        strict=args.strict,
        progress=False if args.quiet else args.progress,
        threads=args.num_threads or 0,
        random_seed=args.random_seed,
        allow_crimes=args.allow_crimes,
        trust_remote_code=args.trust_remote_code,
    )


def _executor(args):
    """The executor the flags ask for (a context manager: a Ray connection it starts, it closes)."""
    from mergekit_fast.executors import LocalExecutor, make_executor

    multi = bool(getattr(args, "multi_gpu", False) or getattr(args, "gpu_rich", False))
    if multi and args.executor == "local":
        why = _multi_gpu_no_effect(_device(args))
        if why:
            print(f"mergekit-fast: note: --multi-gpu changes nothing here ({why})", file=sys.stderr)
            return LocalExecutor()
    return make_executor(args.executor, multi_gpu=multi, ray_address=args.ray_address, workers=args.workers)


def _multi_gpu_no_effect(device: str) -> str | None:
    """Why --multi-gpu would run one worker here, or None."""
    from mergekit_fast.engine import resolve_device

    if device.startswith("cuda:"):
        return None  # MultiGPUExecutor says what to do instead
    if resolve_device(device) == "cpu":
        return "no GPU is used: --device cpu, or none is visible"
    import torch

    if torch.cuda.device_count() < 2:
        return "one GPU is visible"
    return None


def _setup(args) -> None:
    level = logging.WARNING - 10 * min(args.verbose, 2)
    if args.quiet:
        level = logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.num_threads is not None and args.num_threads < 1:
        raise ValueError(f"--num-threads must be at least 1, got {args.num_threads}")
    if getattr(args, "safe_serialization", True) is False:
        raise _UsageError(
            "--no-safe-serialization: output is always safetensors (pickled .bin is never written)"
        )
    if getattr(args, "force_unrecognized", False) and not args.force:
        raise _UsageError("--force-unrecognized goes with --force")
    _notes(args)


class _UsageError(ValueError):
    """A flag combination that cannot be served (exit 2, like argparse's usage errors)."""


def _run_config(config_source, out: str, args) -> int:
    from mergekit_fast.config import load_config, parse_config
    from mergekit_fast.engine import run_merge
    from mergekit_fast.plan import build_plan

    t0 = time.perf_counter()
    config = load_config(config_source) if isinstance(config_source, Path) else parse_config(config_source)
    opt = _options(args)
    with _executor(args) as executor:
        plan = build_plan(config, allow_crimes=opt.allow_crimes, trust_remote_code=opt.trust_remote_code,
                          unsafe_truncate_embeddings=getattr(args, "unsafe_truncate_embeddings", False),
                          defer_config=True)  # fmt: skip
        result = run_merge(plan, out, opt, started=_T0, phases={"plan": time.perf_counter() - t0},
                           executor=executor)  # fmt: skip
    if not args.quiet:
        print(result.summary())
    return 0


def cmd_merge(args) -> int:
    path = Path(args.config)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    return _run_config(path, args.out, args)


def cmd_merge_many(args) -> int:
    from mergekit_fast.api import merge_many

    if args.workers is not None:
        raise _UsageError("--workers: merge-many runs each merge as one worker (as many at once as the cluster "
                          "has GPUs, or CPU slots)")  # fmt: skip
    out_dir = Path(args.out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"{out_dir}: --out-dir must be an existing directory")
    jobs = []
    for c in args.configs:
        path = Path(c)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such config file")
        jobs.append((path, out_dir / path.stem))
    stems = [p.stem for p, _ in jobs]
    dup = next((s for s in stems if stems.count(s) > 1), None)
    if dup is not None:
        raise _UsageError(f"two configs are named {dup}: each merge writes --out-dir/<config name>")
    opt = _options(args)
    options = {f.name: getattr(opt, f.name) for f in dataclasses.fields(opt)}

    def report(i: int, result) -> None:
        if isinstance(result, BaseException):
            print(f"mergekit-fast: error: {jobs[i][0]}: {result}", file=sys.stderr)
        elif not args.quiet:
            print(result.summary())

    multi = bool(args.multi_gpu or args.gpu_rich)
    executor = args.executor
    if multi and executor == "local":
        why = _multi_gpu_no_effect(_device(args))
        if why:
            print(f"mergekit-fast: note: --multi-gpu changes nothing here ({why})", file=sys.stderr)
            multi = False
    results = merge_many(jobs, executor=executor, ray_address=args.ray_address, multi_gpu=multi,
                         return_exceptions=True, on_result=report, **options)  # fmt: skip
    failed = sum(isinstance(r, BaseException) for r in results)
    if not args.quiet or failed:
        print(f"mergekit-fast: {len(results) - failed} of {len(results)} merges written to {out_dir}"
              + (f", {failed} failed (nothing written for them)" if failed else ""), file=sys.stderr)  # fmt: skip
    return 2 if failed else 0


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
    from mergekit_fast.moe.build import run_moe

    path = Path(args.config)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    with _executor(args) as executor:
        result = run_moe(path, args.out, _options(args), allow_same=args.allow_same,
                         random_seed=args.random_seed, started=_T0, executor=executor)  # fmt: skip
    if not args.quiet:
        print(result.summary())
    return 0


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


def _configure_merge(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("config", help="a mergekit YAML merge config")
    p.add_argument("out", help="the output model directory")
    _add_common(p)
    p.set_defaults(func=cmd_merge)
    return p


def _configure_moe(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("config", help="a mergekit-moe YAML config")
    p.add_argument("out", help="the output model directory")
    p.add_argument(
        "--i-understand-this-is-not-useful-without-training", action="store_true", dest="allow_same",
        help="build even when every expert is the same model (mergekit-moe's flag)",
    )  # fmt: skip
    _add_common(p)
    g = next(g for g in p._action_groups if g.title == "mergekit-yaml's flags")
    for name, why in _MOE_NO_EFFECT.items():
        g.add_argument(f"--{name}", action="store_const", const=True, default=None,
                       dest=f"mk_{name.replace('-', '_')}", help=f"no effect: {why}")  # fmt: skip
    p.set_defaults(func=cmd_moe)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mergekit-fast", description="Fast, memory-bounded, mergekit-compatible merging."
    )
    sub = p.add_subparsers(dest="command", required=True)

    _configure_merge(sub.add_parser("merge", help="run a mergekit YAML config (mergekit-yaml)"))

    mm = sub.add_parser(
        "merge-many",
        help="run independent merge configs (a sweep, a search): one after another, or as Ray tasks",
        description="Run every CONFIG as its own merge into OUT_DIR/<config file name without .yml>. "
        "With --executor ray each merge is one Ray task (one GPU each where the cluster has GPUs), so "
        "the cluster's GPUs stay busy; each result is the same as `mergekit-fast merge CONFIG OUT`'s. "
        "A merge that fails leaves nothing at its OUT and the others still run (exit 2 at the end).",
    )
    mm.add_argument("configs", nargs="+", metavar="CONFIG", help="mergekit YAML merge configs")
    mm.add_argument("--out-dir", required=True, help="where the outputs go, one directory per config")
    _add_common(mm)
    mm.set_defaults(func=cmd_merge_many)

    d = sub.add_parser(
        "dus", help="SOLAR depth up-scaling: stack two copies of MODEL, dropping N layers at the seam"
    )
    d.add_argument("model")
    d.add_argument("out")
    d.add_argument("--drop", type=int, required=True, help="layers dropped from each copy at the seam")
    d.add_argument("--dtype", default=None, help="cast to this dtype (e.g. bfloat16)")
    _add_common(d)
    d.set_defaults(func=cmd_dus)

    _configure_moe(sub.add_parser(
        "moe", help="build a Mixtral / Qwen-MoE model from dense experts (mergekit-moe config)"
    ))  # fmt: skip

    b = sub.add_parser("bench", help="run the benchmark suite (bench/run_all.py)")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--out", default=None)
    b.set_defaults(func=cmd_bench, quiet=False, verbose=0, num_threads=None)

    i = sub.add_parser("info", help="versions and available backends")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info, quiet=False, verbose=0, num_threads=None)
    return p


# ----------------------------------------------------------------------------- signals and exit codes

_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


class _SignalsEndTheRun:
    """SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` in the main thread, once: the merge then unwinds
    like a Ctrl-C (temporary directory removed) and the process exits 128 + the signal's number. Later
    signals are ignored while cleaning up, so a second Ctrl-C cannot leave debris (SIGKILL still ends it)."""

    def __enter__(self):
        import threading

        self.saved = {}
        self.signum = None
        if threading.current_thread() is not threading.main_thread():
            return self
        self.fired = False
        for sig in _SIGNALS:
            try:
                self.saved[sig] = signal.signal(sig, self._handle)
            except (OSError, ValueError):
                pass
        return self

    def _handle(self, signum, frame):
        from mergekit_fast.errors import Interrupted

        if self.fired:
            return
        self.fired = True
        self.signum = (
            signum  # a library that turns the exception into a plain KeyboardInterrupt (Ray) loses it
        )
        raise Interrupted(signum)

    def __exit__(self, *exc):
        for sig, old in self.saved.items():
            signal.signal(sig, old)
        return False


def _dispatch(args) -> int:
    from mergekit_fast.backends import BackendUnavailable
    from mergekit_fast.errors import MergeError

    with _SignalsEndTheRun() as signals:
        try:
            _setup(args)
            return args.func(args)
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", None) or signals.signum or signal.SIGINT
            name = signal.Signals(signum).name
            print(f"mergekit-fast: interrupted ({name}); no output was written", file=sys.stderr)
            return 128 + int(signum)
        except (ValueError, OSError, MergeError, BackendUnavailable) as exc:
            if args.verbose:
                raise
            print(f"mergekit-fast: error: {exc}", file=sys.stderr)
            return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _dispatch(args)


# ----------------------------------------------------------------------------- mergekit aliases


def yaml_alias_main(argv: list[str] | None = None) -> int:
    """``mergekit-fast-yaml CONFIG OUT [mergekit-yaml flags]``: mergekit-yaml's command line. Like
    mergekit-yaml it replaces an earlier output at OUT (``--force`` is implied), but only one that looks
    like a merge output, and never an input."""
    p = _configure_merge(argparse.ArgumentParser(
        prog="mergekit-fast-yaml",
        description="mergekit-yaml's command line on mergekit_fast (--force is implied, as mergekit-yaml "
        "replaces OUT; inputs are never touched).",
    ))  # fmt: skip
    p.set_defaults(force=True)
    return _dispatch(p.parse_args(sys.argv[1:] if argv is None else argv))


def moe_alias_main(argv: list[str] | None = None) -> int:
    """``mergekit-fast-moe CONFIG OUT [mergekit-moe flags]`` (``--force`` implied, as for the yaml alias)."""
    p = _configure_moe(argparse.ArgumentParser(
        prog="mergekit-fast-moe",
        description="mergekit-moe's command line on mergekit_fast (--force is implied, as mergekit-moe "
        "replaces OUT; inputs are never touched).",
    ))  # fmt: skip
    p.set_defaults(force=True)
    return _dispatch(p.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
