"""Executors: the shards of one plan written elsewhere (every GPU of a node, a Ray cluster), and many
merges at once (``merge-many``).

The Ray tests start ONE local Ray cluster for this module (2 CPUs, no GPUs, no dashboard, its own
temporary directory, every process on the loopback address; Ray picks free ports in its default
ranges, so two test runs on one machine do not collide) and shut it down at the end. Every output of
an executor is compared byte for byte, file by file, with the local executor's.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from mergekit_fast import cli, methods
from mergekit_fast.config import parse_config
from mergekit_fast.engine import MergeOptions, ShardLayout, run_merge, write_shards
from mergekit_fast.errors import MergeError
from mergekit_fast.executors import MultiGPUExecutor, assign_by_bytes, make_executor
from mergekit_fast.plan import build_plan
from mergekit_fast.testing import make_model, make_synthetic_model

# Every Ray process of this module on the loopback address: without this, Ray resolves 127.0.0.1 to
# the machine's own network address. Set before ray is first imported (the tests import it lazily).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ["HF_HUB_OFFLINE"] = "1"

SLERP = (
    "models:\n  - model: {a}\n  - model: {b}\nmerge_method: slerp\nbase_model: {a}\nparameters: {{t: 0.3}}\n"
)
LINEAR = (
    "models:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n  - model: {b}\n    parameters: {{weight: 0.4}}\n"
    "merge_method: linear\ndtype: float32\nout_dtype: bfloat16\n"
)
TASK_ARITHMETIC = (
    "models:\n  - model: {a}\n  - model: {b}\n    parameters: {{weight: 0.6}}\n  - model: {c}\n"
    "    parameters: {{weight: 0.3}}\nmerge_method: task_arithmetic\nbase_model: {a}\nparameters: {{lambda: 0.9}}\n"
)
DARE_TIES = (
    "models:\n  - model: {b}\n    parameters: {{density: 0.5, weight: 0.6}}\n  - model: {c}\n"
    "    parameters: {{density: 0.5, weight: 0.4}}\nmerge_method: dare_ties\nbase_model: {a}\ndtype: bfloat16\n"
)
SHARD = "60K"  # small shards: several per model, so that the workers split them


def same_dirs(x: Path, y: Path) -> None:
    """Two outputs are the same: the same files with the same bytes (weights, index, config, card)."""
    names = sorted(p.name for p in x.iterdir())
    assert names == sorted(p.name for p in y.iterdir())
    for n in names:
        assert (x / n).read_bytes() == (y / n).read_bytes(), n


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".mergekit_fast-" in p.name)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("exec_models")
    kw = dict(num_layers=4, hidden_size=64, intermediate_size=176, vocab_size=256)
    return [make_synthetic_model(root / n, seed=s, **kw) for s, n in enumerate("abc", start=1)]


def _merge(config: str, out: Path, *extra: str) -> Path:
    cfg = out.parent / f"{out.name}.yml"
    cfg.write_text(config)
    rc = cli.main(["merge", str(cfg), str(out), "--no-progress", "-q", "--out-shard-size", SHARD, *extra])
    assert rc == 0
    return out


# ----------------------------------------------------------------------------- without Ray


def test_assign_by_bytes_is_balanced_and_deterministic():
    sizes = [50, 10, 40, 30, 30, 20, 10]
    groups = assign_by_bytes(sizes, 3)
    assert groups == assign_by_bytes(sizes, 3)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in g) for g in groups]
    assert sorted(loads) == [60, 60, 70]  # the best split of 190 into three
    assert assign_by_bytes([5, 5], 8) == [[0], [1]]  # never an idle worker
    assert assign_by_bytes([], 4) == []
    assert assign_by_bytes([7, 3], 1) == [[0, 1]]


def test_plan_pickles_without_open_files(models, tmp_path):
    """An executor ships the plan: its sources travel without their open files and reopen them."""
    a, b, _ = models
    plan = build_plan(parse_config(SLERP.format(a=a, b=b)), use_transformers=False)
    opt = MergeOptions(out_shard_size=60_000)
    layout = ShardLayout.of(plan, opt.out_shard_size)
    (tmp_path / "x").mkdir()
    write_shards(plan, layout, tmp_path / "x", opt)  # opens readers (mapped files)
    assert any(src._readers for src in plan.sources.values())
    copy = pickle.loads(pickle.dumps((plan, layout)))
    assert all(not src._readers for src in copy[0].sources.values())
    (tmp_path / "y").mkdir()
    write_shards(*copy, tmp_path / "y", opt)
    same_dirs(tmp_path / "x", tmp_path / "y")
    for p in (plan, copy[0]):
        for src in p.sources.values():
            src.close()


def _split_on_cpu(monkeypatch, n: int) -> None:
    """The multi-GPU executor's thread split, on the CPU (n workers), where no GPU is visible."""
    monkeypatch.setattr(MultiGPUExecutor, "gpus", lambda self, device: ["cpu"] * n)


def test_multi_gpu_split_equals_local(models, tmp_path, monkeypatch):
    a, b, _ = models
    ref = _merge(SLERP.format(a=a, b=b), tmp_path / "ref")
    _split_on_cpu(monkeypatch, 3)
    plan = build_plan(parse_config(SLERP.format(a=a, b=b)))
    opt = MergeOptions(out_shard_size=60_000, progress=False)
    run_merge(plan, tmp_path / "multi", opt, executor=MultiGPUExecutor())
    same_dirs(ref, tmp_path / "multi")


def test_multi_gpu_failure_stops_every_worker_and_leaves_nothing(models, tmp_path, monkeypatch):
    import mergekit_fast.engine as engine

    a, b, _ = models
    _split_on_cpu(monkeypatch, 2)
    real = engine.write_shards
    seen = []

    def flaky(plan, layout, tmp, opt, device="cpu", *, only=None, progress=None):
        seen.append(list(only))
        if 0 in only:
            raise MergeError("disk on fire")
        return real(plan, layout, tmp, opt, device, only=only, progress=progress)

    monkeypatch.setattr(engine, "write_shards", flaky)
    plan = build_plan(parse_config(SLERP.format(a=a, b=b)))
    with pytest.raises(MergeError, match="disk on fire"):
        run_merge(plan, tmp_path / "out", MergeOptions(out_shard_size=60_000), executor=MultiGPUExecutor())
    assert len(seen) == 2 and not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_multi_gpu_flag_without_gpu_says_it_changes_nothing(models, tmp_path, capsys):
    a, b, _ = models
    _merge(SLERP.format(a=a, b=b), tmp_path / "out", "--multi-gpu", "--device", "cpu")
    assert "--multi-gpu changes nothing here (no GPU is used" in capsys.readouterr().err
    same_dirs(tmp_path / "out", _merge(SLERP.format(a=a, b=b), tmp_path / "ref"))


def test_flag_combinations_are_usage_errors(models, tmp_path, capsys):
    a, b, _ = models
    cfg = tmp_path / "c.yml"
    cfg.write_text(SLERP.format(a=a, b=b))
    for flags, msg in [
        (["--ray-address", "127.0.0.1:1"], "--ray-address goes with --executor ray"),
        (["--workers", "2"], "--workers goes with --executor ray or --multi-gpu"),
        (["--workers", "0", "--executor", "ray"], "--workers must be at least 1"),
    ]:
        assert cli.main(["merge", str(cfg), str(tmp_path / "out"), "-q", *flags]) == 2
        assert msg in capsys.readouterr().err
    with pytest.raises(MergeError, match="--multi-gpu runs on one node"):
        make_executor("ray", multi_gpu=True)
    assert not (tmp_path / "out").exists()


def test_without_ray_the_error_says_how_to_install_it(models, tmp_path, monkeypatch, capsys):
    a, b, _ = models
    cfg = tmp_path / "c.yml"
    cfg.write_text(SLERP.format(a=a, b=b))
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert cli.main(["merge", str(cfg), str(tmp_path / "out"), "-q", "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert "--executor ray needs Ray" in err and "pip install 'mergekit_fast[ray]'" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_local_runs_never_import_ray(models, tmp_path):
    a, b, _ = models
    cfg = tmp_path / "c.yml"
    cfg.write_text(SLERP.format(a=a, b=b))
    code = (
        "import sys, mergekit_fast; from mergekit_fast import cli; "
        f"rc = cli.main(['merge', {str(cfg)!r}, {str(tmp_path / 'out')!r}, '-q', '--no-progress']); "
        "print(rc, 'ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["0", "False"], out.stderr


def test_merge_many_locally(models, tmp_path, capsys):
    a, b, c = models
    (tmp_path / "out").mkdir()
    cfgs = []
    for name, text in [("slerp", SLERP.format(a=a, b=b)), ("lin", LINEAR.format(a=b, b=c)),
                       ("bad", SLERP.format(a=a, b=tmp_path / "nowhere"))]:  # fmt: skip
        (tmp_path / f"{name}.yml").write_text(text)
        cfgs.append(str(tmp_path / f"{name}.yml"))
    rc = cli.main(["merge-many", *cfgs, "--out-dir", str(tmp_path / "out"), "-q", "--no-progress",
                   "--out-shard-size", SHARD])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "nowhere" in err and "2 of 3 merges written" in err and "1 failed" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lin", "slerp"]
    same_dirs(tmp_path / "out" / "slerp", _merge(SLERP.format(a=a, b=b), tmp_path / "ref_slerp"))
    same_dirs(tmp_path / "out" / "lin", _merge(LINEAR.format(a=b, b=c), tmp_path / "ref_lin"))


# ----------------------------------------------------------------------------- on a local Ray cluster


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module; yields its address (for drivers in other processes)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("Ray is already initialized in this process")
    # A short private directory: Ray's socket paths must stay under the 107-character limit, and Ray
    # must not find (or be found as) another cluster of this machine through /tmp/ray.
    temp = tempfile.mkdtemp(prefix="mkf-ray-", dir="/tmp")
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, _temp_dir=temp,
             object_store_memory=256 << 20, logging_level="warning")  # fmt: skip
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _configs(models) -> dict[str, str]:
    a, b, c = models
    return {
        "slerp": SLERP.format(a=a, b=b),
        "linear": LINEAR.format(a=a, b=b),
        "task_arithmetic": TASK_ARITHMETIC.format(a=a, b=b, c=c),
        "dare_ties": DARE_TIES.format(a=a, b=b, c=c),
    }


@pytest.mark.parametrize("method", ["slerp", "linear", "task_arithmetic", "dare_ties"])
def test_ray_equals_local(cluster, models, tmp_path, method):
    """Byte-identical outputs; a random method too (dare_ties: counter-based draws keyed by the seed
    and the tensor's name, so which worker draws them does not matter)."""
    if method not in methods.names():
        pytest.skip(f"{method} is not a registered merge method in this tree yet")
    config = _configs(models)[method]
    seed = ["--random-seed", "11"] if methods.get(method).random else []
    ref = _merge(config, tmp_path / "ref", *seed)
    out = _merge(config, tmp_path / "ray", "--executor", "ray", "--workers", "2", *seed)
    same_dirs(ref, out)
    assert leftovers(tmp_path) == []
    assert len(list(out.glob("*.safetensors"))) >= 4


def test_ray_dus_equals_local(cluster, models, tmp_path):
    a = models[0]
    base = ["dus", str(a), "--drop", "1", "--no-progress", "-q", "--out-shard-size", SHARD]
    assert cli.main([base[0], base[1], str(tmp_path / "ref"), *base[2:]]) == 0
    assert cli.main([base[0], base[1], str(tmp_path / "ray"), *base[2:], "--executor", "ray"]) == 0
    same_dirs(tmp_path / "ref", tmp_path / "ray")


def test_ray_moe_build_equals_local(cluster, tmp_path):
    """The gates are computed on the driver (moe_constant tensors in the plan) and the experts carry
    seeded noise and a residual scale (moe_concat): both travel to the workers."""
    from mergekit_fast.moe.build import run_moe

    m = [make_model(tmp_path / f"m{i}", "mistral", seed=i, tokenizer=True) for i in range(3)]
    config = (
        f"base_model: {m[0]}\ngate_mode: cheap_embed\ndtype: bfloat16\nexperts:\n"
        f"  - source_model: {m[1]}\n    positive_prompts: ['w5 w6']\n    noise_scale: 0.01\n"
        f"  - source_model: {m[2]}\n    positive_prompts: ['w7']\n    residual_scale: 0.5\n"
    )
    opt = MergeOptions(out_shard_size=30_000, progress=False, random_seed=5)
    run_moe(config, tmp_path / "ref", opt)
    with make_executor("ray", workers=2) as ex:
        run_moe(config, tmp_path / "ray", opt, executor=ex)
    same_dirs(tmp_path / "ref", tmp_path / "ray")
    assert len(list((tmp_path / "ray").glob("*.safetensors"))) >= 2


def test_api_merge_on_ray_keeps_the_callers_connection(cluster, models, tmp_path):
    import ray

    import mergekit_fast

    a, b, _ = models
    r = mergekit_fast.merge(SLERP.format(a=a, b=b), tmp_path / "out", executor="ray", workers=2,
                            out_shard_size=SHARD, progress=False)  # fmt: skip
    assert r.shards >= 4 and ray.is_initialized()
    same_dirs(tmp_path / "out", _merge(SLERP.format(a=a, b=b), tmp_path / "ref"))


def test_ray_progress_counts_every_byte_once(cluster, models, tmp_path):
    from mergekit_fast.executors.ray import RayExecutor

    a, b, _ = models
    plan = build_plan(parse_config(SLERP.format(a=a, b=b)))
    opt = MergeOptions(out_shard_size=60_000, progress=False)
    layout = ShardLayout.of(plan, opt.out_shard_size)
    seen = []
    (tmp_path / "t").mkdir()
    with RayExecutor(workers=2) as ex:
        stats = ex.write(plan, layout, tmp_path / "t", opt, ex.resolve_device("auto"), seen.append)
    assert sum(seen) == layout.total == stats.bytes_written
    assert stats.peak_rss > 0  # the workers' peak RSS comes back (the summary reports the largest)


def _record_cancels(monkeypatch) -> list:
    """The driver's ray.cancel calls, recorded (and still made)."""
    import ray

    calls: list = []
    real = ray.cancel
    monkeypatch.setattr(ray, "cancel", lambda ref, **kw: (calls.append(ref), real(ref, **kw))[1])
    return calls


def test_ray_missing_input_names_the_path_and_the_node(cluster, models, tmp_path, monkeypatch):
    """An input the driver planned from but a worker cannot read (here: moved away after planning).
    Both tasks fail at once; the driver stops them by its mark and never calls ray.cancel on a task
    that is ending (that race aborts the driver process inside Ray)."""
    from mergekit_fast.executors.ray import RayExecutor

    cancels = _record_cancels(monkeypatch)

    a, _, _ = models
    b = tmp_path / "b"
    shutil.copytree(models[1], b)
    plan = build_plan(parse_config(SLERP.format(a=a, b=b)))
    b.rename(tmp_path / "b_moved")
    with RayExecutor(workers=2) as ex, pytest.raises(MergeError) as info:
        run_merge(plan, tmp_path / "out", MergeOptions(out_shard_size=60_000, progress=False), executor=ex)
    msg = str(info.value)
    assert str(b / "model.safetensors") in msg and "127.0.0.1" in msg and "worker on node" in msg
    assert "No such file" in msg and "same absolute paths" in msg and msg.count("127.0.0.1") == 1
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert cancels == []


@pytest.fixture(scope="module")
def big_models(tmp_path_factory):
    # Large enough (~2 x 100 MB) that a Ray task runs for a while on a 2-core machine.
    root = tmp_path_factory.mktemp("exec_big")
    kw = dict(num_layers=24, hidden_size=512, intermediate_size=1408, vocab_size=4096)
    return make_synthetic_model(root / "a", seed=1, **kw), make_synthetic_model(root / "b", seed=2, **kw)


def _task_pids(name: str) -> list[int]:
    """Ray workers started by THIS process's cluster that are running task ``name`` (their process
    title is ``ray::<task>``): never another user's processes."""
    parents: dict[int, int] = {}
    titles: dict[int, str] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                titles[int(d)] = f.read().split(b"\0")[0].decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
    me = os.getpid()

    def mine(pid: int) -> bool:
        for _ in range(32):
            pid = parents.get(pid, 0)
            if pid == me:
                return True
            if pid <= 1:
                return False
        return False

    return [p for p, t in titles.items() if t.startswith(f"ray::{name}") and mine(p)]


@pytest.mark.slow
def test_ray_worker_killed_mid_merge_is_retried(cluster, big_models, tmp_path):
    """SIGKILL one task's worker while it writes its shards: Ray retries the task, which writes its
    shards again from scratch, and the output equals the local one (or, if the retries were exhausted,
    the merge fails cleanly: exit 2, nothing at OUT)."""
    a, b = big_models
    config = SLERP.format(a=a, b=b)
    flags = ["--out-shard-size", "20M", "--backend", "torch"]
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set() and not killed:
            tmps = list(tmp_path.glob(".ray.mergekit_fast-tmp-*"))
            pids = _task_pids("_write_shards_task") if tmps and any(tmps[0].iterdir()) else []
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.005)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    cfg = tmp_path / "c.yml"
    cfg.write_text(config)
    try:
        rc = cli.main(["merge", str(cfg), str(tmp_path / "ray"), "--no-progress", "-q", "--executor", "ray",
                       "--workers", "2", *flags])  # fmt: skip
    finally:
        stop.set()
        t.join()
    assert killed, "the merge ended before a worker could be killed"
    if rc == 0:
        ref = _merge(config, tmp_path / "ref", *flags)
        same_dirs(ref, tmp_path / "ray")
    else:
        assert rc == 2 and not (tmp_path / "ray").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_ray_tasks_stop_at_the_drivers_mark(cluster, big_models, tmp_path, monkeypatch):
    """The driver stops running tasks by the mark in the temporary directory, not by ray.cancel: a task
    that starts after the mark ends at once, and one that is writing ends within STOP_GRACE_S, with
    _Stopped, its shards left for the driver to remove."""
    import ray

    from mergekit_fast.executors import ray as rx

    a, b = big_models
    plan = build_plan(parse_config(SLERP.format(a=a, b=b)))
    opt = MergeOptions(out_shard_size=20 << 20, progress=False, backend="torch")
    layout = ShardLayout.of(plan, opt.out_shard_size)
    cancels = _record_cancels(monkeypatch)

    def submit(tmp: Path, shards: list[int]):
        return rx._write_shards_task.remote((plan, layout), shards, "cpu", str(tmp), opt, ("r", 0), None, {})

    def stopped(ref) -> bool:
        with pytest.raises(ray.exceptions.RayTaskError) as info:
            ray.get(ref, timeout=60)
        return isinstance(info.value.cause, rx._Stopped)

    early = tmp_path / "early"
    early.mkdir()
    (early / rx.CANCEL_MARK).touch()
    assert stopped(submit(early, [0])) and not list(early.glob("*.safetensors"))

    tmp = tmp_path / "late"
    tmp.mkdir()
    ref = submit(tmp, list(range(len(layout.names))))
    deadline = time.time() + 60
    while not any(f.stat().st_size for f in tmp.glob("*.safetensors")) and time.time() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    rx._cancel([ref], tmp)
    assert time.monotonic() - t0 < rx.STOP_GRACE_S
    assert stopped(ref) and cancels == []


@pytest.mark.slow
def test_ray_driver_sigterm_leaves_nothing(cluster, big_models, tmp_path):
    """SIGTERM to a driver (its own process, connected to the cluster by address) while the workers
    write: the CLI's handling wins over Ray's, the tasks are cancelled, exit 143, nothing at OUT."""
    a, b = big_models
    cfg = tmp_path / "c.yml"
    cfg.write_text(SLERP.format(a=a, b=b))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mergekit_fast.cli", "merge", str(cfg), str(out), "--no-progress",
                             "--executor", "ray", "--ray-address", cluster, "--workers", "2", "--backend", "torch",
                             "--out-shard-size", "20M"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline:
        tmps = list(tmp_path.glob(".out.mergekit_fast-tmp-*"))
        if tmps and any(f.stat().st_size for f in tmps[0].glob("*.safetensors")):
            break
        if proc.poll() is not None:
            pytest.fail(f"the merge ended before it could be interrupted: {proc.communicate()}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "mergekit-fast: interrupted (SIGTERM); no output was written" in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_ray_merge_many_equals_single_merges(cluster, models, tmp_path, capsys):
    a, b, c = models
    (tmp_path / "out").mkdir()
    texts = {"s1": SLERP.format(a=a, b=b), "s2": SLERP.format(a=b, b=c), "lin": LINEAR.format(a=a, b=c)}
    for name, text in texts.items():
        (tmp_path / f"{name}.yml").write_text(text)
    rc = cli.main(["merge-many", *(str(tmp_path / f"{n}.yml") for n in texts), "--out-dir", str(tmp_path / "out"),
                   "--executor", "ray", "--no-progress", "--out-shard-size", SHARD])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.count("merged ") == 3 and "3 of 3 merges written" in captured.err
    for name, text in texts.items():
        same_dirs(tmp_path / "out" / name, _merge(text, tmp_path / f"ref_{name}"))


def test_ray_merge_many_api_reports_each_failure(cluster, models, tmp_path):
    import mergekit_fast

    a, b, _ = models
    jobs = [(SLERP.format(a=a, b=b), tmp_path / "good"), ({"merge_method": "slerp"}, tmp_path / "bad")]
    with pytest.raises(MergeError, match=r"1 of 2 merges failed: .*bad"):
        mergekit_fast.merge_many(jobs, executor="ray", progress=False)
    results = mergekit_fast.merge_many([(SLERP.format(a=a, b=b), tmp_path / "good2"), jobs[1]],
                                       executor="ray", progress=False, return_exceptions=True)  # fmt: skip
    assert results[0].out_path == tmp_path / "good2" and isinstance(results[1], Exception)
    same_dirs(tmp_path / "good", tmp_path / "good2")
    assert not (tmp_path / "bad").exists()
