"""Hostile and broken inputs, interruption, disk failures and the memory budget.

Every failure must give a clear error naming the file/tensor, exit code 2 (130 for SIGINT), and
leave nothing under OUT: no directory, and no half-written file under a final name.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_fast import _native, cli
from mergekit_fast.testing import make_synthetic_model

SLERP = """
models:
  - model: {a}
  - model: {b}
merge_method: slerp
base_model: {a}
parameters: {{t: 0.4}}
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard")
    return make_synthetic_model(root / "a", seed=1), make_synthetic_model(root / "b", seed=2)


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _merge(tmp_path: Path, a: Path, b: Path, *extra: str) -> tuple[int, Path]:
    cfg = tmp_path / "c.yml"
    cfg.write_text(SLERP.format(a=a, b=b))
    out = tmp_path / "out"
    return cli.main(["merge", str(cfg), str(out), "--no-progress", "-q", *extra]), out


def _leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in ("c.yml", "a", "b", "bad"))


def test_missing_tensor(pair, tmp_path, capsys):
    bad = _copy_model(pair[1], tmp_path / "bad")
    sd = load_file(bad / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, bad / "model.safetensors")
    rc, out = _merge(tmp_path, pair[0], bad)
    err = capsys.readouterr().err
    assert rc == 2 and "model.layers.1.mlp.up_proj.weight" in err and str(bad) in err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_shape_mismatch(pair, tmp_path, capsys):
    bad = _copy_model(pair[1], tmp_path / "bad")
    sd = load_file(bad / "model.safetensors")
    sd["model.norm.weight"] = torch.ones(65, dtype=torch.bfloat16)
    save_file(sd, bad / "model.safetensors")
    rc, out = _merge(tmp_path, pair[0], bad)
    err = capsys.readouterr().err
    assert rc == 2 and "model.norm.weight" in err and "65" in err
    assert not out.exists()


def test_shard_named_in_index_but_absent(pair, tmp_path, capsys):
    bad = _copy_model(pair[1], tmp_path / "bad")
    sd = load_file(bad / "model.safetensors")
    names = sorted(sd)
    half = len(names) // 2
    save_file({k: sd[k] for k in names[:half]}, bad / "model-00001-of-00002.safetensors")
    (bad / "model.safetensors").unlink()
    wm = {
        k: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors")
        for i, k in enumerate(names)
    }
    (bad / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    rc, out = _merge(tmp_path, pair[0], bad)
    err = capsys.readouterr().err
    assert rc == 2 and "model-00002-of-00002.safetensors" in err and "missing" in err
    assert not out.exists()


def test_truncated_shard(pair, tmp_path, capsys):
    bad = _copy_model(pair[1], tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) - 1000])
    rc, out = _merge(tmp_path, pair[0], bad)
    err = capsys.readouterr().err
    assert rc == 2 and "model.safetensors" in err
    assert not out.exists()


@pytest.mark.parametrize("strict", [False, True])
def test_nan_weights_warn_or_fail(pair, tmp_path, caplog, capsys, strict):
    bad = _copy_model(pair[1], tmp_path / "bad")
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.weight"][3, 4] = float("nan")
    save_file(sd, bad / "model.safetensors")
    rc, out = _merge(tmp_path, pair[0], bad, *(["--strict"] if strict else []))
    if strict:
        assert rc == 2 and "model.layers.0.self_attn.q_proj.weight" in capsys.readouterr().err
        assert not out.exists() and _leftovers(tmp_path) == []
    else:
        assert rc == 0 and out.exists()
        assert "model.layers.0.self_attn.q_proj.weight" in caplog.text


def test_unwritable_output(pair, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = tmp_path / "c.yml"
    cfg.write_text(SLERP.format(a=pair[0], b=pair[1]))
    rc = cli.main(["merge", str(cfg), str(blocker / "out"), "--no-progress", "-q"])
    assert rc == 2 and "cannot create the output there (Not a directory)" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["preallocate", "write"])
def test_disk_full_cleans_up(pair, tmp_path, monkeypatch, capsys, where):
    # A full disk shows when the shards are preallocated (before any work: the native path then
    # writes through a mapping, which could only fail with SIGBUS), or in a later write (the
    # torch path's pwrite, here after 5 writes).
    from mergekit_fast.io import safetensors as st

    extra: tuple[str, ...] = ()
    if where == "preallocate":

        def no_space(fd, offset, length):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(st.os, "posix_fallocate", no_space)
    else:
        calls = {"n": 0}
        real = os.pwrite

        def failing_pwrite(fd, data, offset):
            calls["n"] += 1
            if calls["n"] > 5:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, data, offset)

        monkeypatch.setattr(st.os, "pwrite", failing_pwrite)
        monkeypatch.setattr("mergekit_fast.engine.os.copy_file_range", None, raising=False)
        extra = ("--backend", "torch")
    rc, out = _merge(tmp_path, *pair, *extra)
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_filesystem_without_fallocate_still_merges(pair, tmp_path, monkeypatch):
    # No preallocation (EOPNOTSUPP): nothing is written through a mapping; pwrite gives the same bytes.
    from mergekit_fast.io import safetensors as st

    rc, out = _merge(tmp_path, *pair)
    assert rc == 0
    expected = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    shutil.rmtree(out)

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(st.os, "posix_fallocate", unsupported)
    rc, out = _merge(tmp_path, *pair)
    assert rc == 0 and {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == expected


# ----------------------------------------------------------------------------- interruption


def _start(cfg: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mergekit_fast.cli", "merge", str(cfg), str(out), "--no-progress",
                             "--max-memory", "8M", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _wait_for_tmp(parent: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        tmps = list(parent.glob(".out.mergekit_fast-tmp-*"))
        if tmps and any(f.stat().st_size for f in tmps[0].glob("*.safetensors")):
            return
        if proc.poll() is not None:
            pytest.fail(f"merge finished before it could be interrupted: {proc.communicate()}")
        time.sleep(0.01)
    pytest.fail("no temporary output appeared")


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    # Large enough (~2 x 100 MB) that a merge runs for a while on a 2-core machine.
    root = tmp_path_factory.mktemp("big")
    kw = dict(num_layers=24, hidden_size=512, intermediate_size=1408, vocab_size=4096)
    return make_synthetic_model(root / "a", seed=1, **kw), make_synthetic_model(root / "b", seed=2, **kw)


@pytest.mark.slow
def test_sigkill_leaves_no_output_and_rerun_matches(big_pair, tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(SLERP.format(a=big_pair[0], b=big_pair[1]))
    out = tmp_path / "out"
    proc = _start(cfg, out)
    _wait_for_tmp(tmp_path, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert list(tmp_path.glob(".out.mergekit_fast-tmp-*"))
    # A run to ANOTHER output in the same directory removes the dead run's temporary directory.
    assert cli.main(["merge", str(cfg), str(tmp_path / "other"), "--no-progress", "-q"]) == 0
    assert not list(tmp_path.glob(".out.mergekit_fast-*"))
    # Rerun: succeeds and equals an uninterrupted run.
    assert cli.main(["merge", str(cfg), str(out), "--no-progress", "-q"]) == 0
    ref = tmp_path / "ref"
    assert cli.main(["merge", str(cfg), str(ref), "--no-progress", "-q", "--max-memory", "1G"]) == 0
    a, b = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_signal_cleans_up(big_pair, tmp_path, sig):
    """SIGINT (Ctrl-C), SIGTERM (timeout, systemd, Slurm) and SIGHUP (a closed terminal) all end the merge
    with one line, no temporary directory and exit code 128 + the signal's number."""
    signum = getattr(signal, sig)
    cfg = tmp_path / "c.yml"
    cfg.write_text(SLERP.format(a=big_pair[0], b=big_pair[1]))
    out = tmp_path / "out"
    proc = _start(cfg, out)
    _wait_for_tmp(tmp_path, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert err.strip() == f"mergekit-fast: interrupted ({sig}); no output was written"
    assert not out.exists() and not list(tmp_path.glob(".out.mergekit_fast-*"))


# ----------------------------------------------------------------------------- memory budget

_RSS = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
    "print(r, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
)


def _peak_rss(cfg: Path, out: Path, budget: str) -> int:
    cmd = [sys.executable, "-m", "mergekit_fast.cli", "merge", str(cfg), str(out), "--no-progress", "-q", "--force",
           "--max-memory", budget]  # fmt: skip
    rc, rss = subprocess.run(
        [sys.executable, "-c", _RSS, *cmd], capture_output=True, text=True
    ).stdout.split()
    assert rc == "0"
    return int(rss)


@pytest.mark.slow
@pytest.mark.skipif(
    _native.C is None,
    reason="the bound holds on the native CPU path; on a pure-Python install the torch path's peak RSS "
    f"grows with the model (about half of it here): {_native.import_error()}",
)
def test_max_memory_bounds_peak_rss(big_pair, tmp_path):
    """Peak RSS of a merge of 2 x 100 MB models under a 16 MiB budget stays within the budget plus a
    fixed overhead, measured as the RSS of the same merge of a tiny model (interpreter, torch,
    transformers, mappings): it does not grow with the model."""
    small = [make_synthetic_model(tmp_path / f"s{i}", seed=i, num_layers=2, hidden_size=512,
                                  intermediate_size=1408, vocab_size=4096) for i in (1, 2)]  # fmt: skip
    cfg_small = tmp_path / "small.yml"
    cfg_small.write_text(SLERP.format(a=small[0], b=small[1]))
    cfg_big = tmp_path / "big.yml"
    cfg_big.write_text(SLERP.format(a=big_pair[0], b=big_pair[1]))
    model_bytes = sum(f.stat().st_size for p in big_pair for f in p.glob("*.safetensors"))
    base = _peak_rss(cfg_small, tmp_path / "o1", "16M")
    big = _peak_rss(cfg_big, tmp_path / "o2", "16M")
    # Largest tensor here is 4 MiB; the budget covers outputs in flight, inputs are released after use.
    allowance = 16 << 20
    slack = 24 << 20  # allocator and page-table noise between two runs
    print(
        f"peak RSS: tiny model {base / 2**20:.0f} MiB, {model_bytes / 2**20:.0f} MiB of models {big / 2**20:.0f} MiB"
    )
    assert big - base <= allowance + slack, (big - base, model_bytes)
    assert model_bytes > 6 * (allowance + slack)  # the test means something: the model is far larger
