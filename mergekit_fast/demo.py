"""``python -m mergekit_fast.demo`` (``make demo``): the main job on built-in demo inputs.

1. builds two random Mistral-shaped models with transformers (cached under .demo/models);
2. runs the SLERP op on real-sized tensors on every available backend, cross-checked against
   the torch reference, with its speed;
3. merges the two models with a classic gradient SLERP config and, separately, depth up-scales
   one of them (SOLAR recipe), through the same engine as `mergekit-fast merge`;
4. loads both outputs with transformers and runs a forward pass.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def _models(root: Path, layers: int, hidden: int) -> tuple[Path, Path]:
    from mergekit_fast.testing import make_model

    paths = []
    for name, seed in (("model_a", 1), ("model_b", 2)):
        path = root / f"{name}-h{hidden}-l{layers}"
        if not (path / "config.json").exists():
            print(f"building random Mistral-shaped model {path.name}")
            make_model(path, "mistral", num_layers=layers, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                       vocab_size=8192, num_heads=8, num_kv_heads=4, seed=seed, tokenizer=True)  # fmt: skip
        paths.append(path)
    return paths[0], paths[1]


def _op_check() -> None:
    import mergekit_fast as mk
    from mergekit_fast import backends

    a = torch.randn(4096, 4096).bfloat16()
    b = torch.randn(4096, 4096).bfloat16()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print("SLERP op, 4096x4096 bf16, cross-checked against the torch reference:")
    for dev in devices:
        x, y = a.to(dev), b.to(dev)
        for name in backends.BACKENDS:
            why = backends.unavailable_reason(name, dev)
            if why or (name == "triton" and dev.type == "cpu"):
                continue
            mk.slerp(0.3, x, y, backend=name, verify=True)  # raises on disagreement
            out = torch.empty_like(x)
            reps = 5
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                mk.slerp(0.3, x, y, backend=name, out=out)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            sec = (time.perf_counter() - t0) / reps
            gbps = 5 * x.numel() * x.element_size() / sec / 1e9
            print(f"  {dev.type:4s} {name:6s} verify ok   {sec * 1e3:8.2f} ms   {gbps:6.1f} GB/s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path(".demo"))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    args = p.parse_args(argv)

    from mergekit_fast import cli
    from mergekit_fast.info import main as info
    from mergekit_fast.testing import slerp_gradient_config

    info([])
    print()
    _op_check()
    a, b = _models(args.workdir / "models", args.layers, args.hidden)
    out = args.workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    cfg = out / "slerp.yml"
    cfg.write_text(slerp_gradient_config(a.absolute(), b.absolute(), args.layers))
    print(f"\n$ mergekit-fast merge {cfg} {out / 'slerp'} --force --verify 16")
    rc = cli.main(["merge", str(cfg), str(out / "slerp"), "--force", "--verify", "16", "--no-progress"])
    if rc:
        return rc
    print(f"\n$ mergekit-fast dus {a} {out / 'dus'} --drop 2 --force")
    rc = cli.main(
        ["dus", str(a), str(out / "dus"), "--drop", "2", "--force", "--no-progress", "--verify", "all"]
    )
    if rc:
        return rc

    import transformers

    ids = torch.randint(0, 8192, (1, 16))
    print()
    for name in ("slerp", "dus"):
        model = transformers.AutoModelForCausalLM.from_pretrained(out / name, dtype=torch.float32)
        with torch.no_grad():
            logits = model(ids).logits
        assert torch.isfinite(logits).all()
        print(f"transformers loaded {out / name}: {model.config.num_hidden_layers} layers, "
              f"logits {tuple(logits.shape)}, finite")  # fmt: skip
    print("\ndemo finished")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
