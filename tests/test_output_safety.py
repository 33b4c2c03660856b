"""Inputs are untouchable, --force replaces only merge outputs, mergekit-yaml's flags, true messages.

Every test that points OUT at (or around) an input hashes every input file before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from mergekit_fast import cli
from mergekit_fast.engine import output
from mergekit_fast.testing import make_synthetic_model

SLERP = """
models:
  - model: {a}
  - model: {b}
merge_method: slerp
base_model: {a}
parameters: {{t: 0.4}}
"""


@pytest.fixture()
def models(tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    a = make_synthetic_model(root / "A", seed=1, num_layers=2, hidden_size=64, vocab_size=64)
    b = make_synthetic_model(root / "B", seed=2, num_layers=2, hidden_size=64, vocab_size=64)
    for m in (a, b):
        (m / "tokenizer_config.json").write_text('{"model_max_length": 8}')
    cfg = tmp_path / "c.yml"
    cfg.write_text(SLERP.format(a=a, b=b))
    return root, a, b, cfg


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _run(*argv: str) -> int:
    return cli.main([*argv, "--no-progress", "-q"])


@pytest.mark.parametrize("alias", [False, True], ids=["merge --force", "mergekit-fast-yaml"])
def test_out_is_an_input(models, capsys, alias):
    root, a, b, cfg = models
    before = _digest(root)
    if alias:
        rc = cli.yaml_alias_main([str(cfg), str(b), "--quiet"])  # the alias implies --force
    else:
        rc = _run("merge", str(cfg), str(b), "--force")
    err = capsys.readouterr().err
    assert rc == 2 and f"output {b} is the input model {b}" in err
    assert _digest(root) == before


def test_out_contains_an_input(models, capsys):
    root, a, b, cfg = models
    before = _digest(root)
    assert _run("merge", str(cfg), str(root), "--force", "--force-unrecognized") == 2
    err = capsys.readouterr().err
    assert f"output {root} contains the input model {a}" in err and "--force does not change this" in err
    assert _digest(root) == before


def test_out_is_a_symlink_to_an_input(models, tmp_path, capsys):
    root, a, b, cfg = models
    link = tmp_path / "link"
    link.symlink_to(b, target_is_directory=True)
    before = _digest(root)
    assert _run("merge", str(cfg), str(link), "--force", "--force-unrecognized") == 2
    assert f"output {link} is the input model {b}" in capsys.readouterr().err
    assert _digest(root) == before and link.is_symlink()


def test_input_through_a_symlink_inside_out(models, tmp_path, capsys):
    # The config names the input through a symlink that lives inside OUT: replacing OUT would break it.
    root, a, b, cfg = models
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(b, target_is_directory=True)
    cfg.write_text(SLERP.format(a=a, b=out / "link"))
    assert _run("merge", str(cfg), str(out), "--force", "--force-unrecognized") == 2
    assert "contains the input model" in capsys.readouterr().err


def test_out_inside_an_input_is_refused(models, capsys):
    # Decided: refused (it would touch no input file, but it turns the input's directory into
    # something else, which an upload or a copy of that model then carries along).
    root, a, b, cfg = models
    before = _digest(root)
    assert _run("merge", str(cfg), str(b / "merged")) == 2
    assert f"lies inside the input model {b}" in capsys.readouterr().err
    assert _digest(root) == before and not (b / "merged").exists()
    assert not [p for p in b.iterdir() if p.name.startswith(".")]


def test_tokenizer_source_is_protected(tmp_path, capsys):
    from mergekit_fast.testing import make_model

    a, b, tok = (make_model(tmp_path / n, num_layers=2, seed=i, tokenizer=True) for i, n in enumerate("abt"))
    cfg = tmp_path / "c.yml"
    cfg.write_text(SLERP.format(a=a, b=b) + f"tokenizer_source: {tok}\n")
    assert _run("merge", str(cfg), str(tmp_path / "ok")) == 0  # the config itself is fine
    before = _digest(tok)
    assert _run("merge", str(cfg), str(tok), "--force") == 2
    assert "is the input model" in capsys.readouterr().err and _digest(tok) == before


def test_dus_over_its_input(models, capsys):
    root, a, b, cfg = models
    before = _digest(root)
    assert _run("dus", str(a), str(a), "--drop", "1", "--force") == 2
    assert "is the input model" in capsys.readouterr().err and _digest(root) == before


def test_moe_over_an_expert_is_refused_before_gates(models, tmp_path, capsys, monkeypatch):
    from mergekit_fast.moe import build

    root, a, b, cfg = models
    moe = tmp_path / "moe.yml"
    moe.write_text(
        f"base_model: {a}\ngate_mode: random\nexperts:\n  - source_model: {a}\n  - source_model: {b}\n"
    )

    def no_gates(*args, **kwargs):
        raise AssertionError("the gates were computed before OUT was checked")

    monkeypatch.setattr(build, "compute_gates", no_gates)
    before = _digest(root)
    assert cli.moe_alias_main([str(moe), str(b), "-q"]) == 2
    assert "is the input model" in capsys.readouterr().err and _digest(root) == before


def test_force_replaces_only_merge_outputs(models, tmp_path, capsys):
    root, a, b, cfg = models
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    assert _run("merge", str(cfg), str(out), "--force") == 2
    err = capsys.readouterr().err
    assert "does not look like a merged model" in err and "notes.txt" in err and "data/" in err
    assert "no config.json" in err and "--force-unrecognized" in err
    assert (out / "notes.txt").read_text() == "mine"
    # an earlier merge output (ours or mergekit's file names) is replaced by --force alone
    assert _run("merge", str(cfg), str(out), "--force", "--force-unrecognized") == 0
    first = _digest(out)
    assert set(first) <= {n for n in first if output.is_merge_file(n)}
    assert _run("merge", str(cfg), str(out), "--force") == 0
    assert _digest(out) == first
    # a file at OUT is not a model output either
    f = tmp_path / "file"
    f.write_text("x")
    assert _run("merge", str(cfg), str(f), "--force") == 2
    assert "is a file, not a model directory" in capsys.readouterr().err and f.read_text() == "x"
    # --force-unrecognized alone is a usage error
    assert _run("merge", str(cfg), str(tmp_path / "new"), "--force-unrecognized") == 2
    assert "goes with --force" in capsys.readouterr().err


def test_empty_directory_is_replaced_with_force(models, tmp_path):
    root, a, b, cfg = models
    out = tmp_path / "empty"
    out.mkdir()
    assert _run("merge", str(cfg), str(out)) == 2
    assert _run("merge", str(cfg), str(out), "--force") == 0 and (out / "config.json").exists()


def test_stale_tmp_of_a_dead_process_is_removed_beside_any_out(models, tmp_path):
    root, a, b, cfg = models
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f".other{output.TMP_MARK}{dead}-{output._host()}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    foreign = tmp_path / f".other{output.TMP_MARK}{dead}-someotherhost"
    foreign.mkdir()
    live = tmp_path / f".other{output.TMP_MARK}{os.getppid()}-{output._host()}"
    live.mkdir()
    assert _run("merge", str(cfg), str(tmp_path / "out")) == 0
    assert not stale.exists()
    assert foreign.exists() and live.exists()  # another host's run, a live process: kept


# ----------------------------------------------------------------------------- mergekit-yaml's flags

MERGEKIT_SWITCHES = ["allow-crimes", "unsafe-truncate-embeddings", "trust-remote-code", "cuda", "low-cpu-memory",
                     "copy-tokenizer", "clone-tensors", "lazy-unpickle", "write-model-card", "quiet",
                     "read-to-gpu", "multi-gpu", "async-write", "safe-serialization"]  # fmt: skip
MERGEKIT_VALUES = ["transformers-cache", "lora-merge-cache", "lora-merge-dtype", "device", "out-shard-size",
                   "random-seed", "num-threads", "write-threads"]  # fmt: skip


def test_help_lists_every_mergekit_flag(capsys):
    with pytest.raises(SystemExit):
        cli.yaml_alias_main(["--help"])
    text = capsys.readouterr().out
    for name in MERGEKIT_SWITCHES:
        assert f"--{name}" in text and f"--no-{name}" in text, name
    for name in [*MERGEKIT_VALUES, "gpu-rich"]:
        assert f"--{name}" in text, name
    assert "-j" in text and "-v" in text
    with pytest.raises(SystemExit):
        cli.moe_alias_main(["--help"])
    text = capsys.readouterr().out
    for name in (
        "load-in-4bit",
        "load-in-8bit",
        "i-understand-this-is-not-useful-without-training",
        "no-cuda",
    ):
        assert f"--{name}" in text, name


def test_the_mergekit_help_matches_mergekits_own_options():
    """Every field of mergekit 0.1.5's MergeOptions is a flag here (the list above is not a guess)."""
    mergekit_options = pytest.importorskip("mergekit.options")
    ours = set(MERGEKIT_SWITCHES) | set(MERGEKIT_VALUES) | {"gpu-rich", "verbosity"}
    theirs = {f.replace("_", "-") for f in mergekit_options.MergeOptions.model_fields}
    assert theirs == ours


def test_no_forms_are_accepted_with_notes(models, tmp_path, capsys):
    root, a, b, cfg = models
    flags = ["--no-lazy-unpickle", "--no-allow-crimes", "--no-trust-remote-code", "--no-clone-tensors",
             "--no-low-cpu-memory", "--no-read-to-gpu", "--no-multi-gpu", "--no-async-write", "--no-cuda",
             "--no-unsafe-truncate-embeddings", "--safe-serialization", "--copy-tokenizer", "--no-quiet",
             "--write-threads", "3", "--transformers-cache", "/nowhere", "--random-seed", "7", "-j", "1",
             "--out-shard-size", "1B", "-v"]  # fmt: skip
    rc = cli.yaml_alias_main([str(cfg), str(tmp_path / "out"), *flags, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0 and (tmp_path / "out" / "model.safetensors").exists()
    for note in ("--no-lazy-unpickle changes nothing here", "--write-threads changes nothing here",
                 "--transformers-cache changes nothing here"):  # fmt: skip
        assert note in err
    assert err.count("--no-lazy-unpickle changes nothing") == 1
    assert "multi-gpu" not in err  # a real flag now (tests/test_executors.py), off by default


def test_no_safe_serialization_is_a_usage_error(models, tmp_path, capsys):
    root, a, b, cfg = models
    assert cli.yaml_alias_main([str(cfg), str(tmp_path / "out"), "--no-safe-serialization"]) == 2
    assert "--no-safe-serialization" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_allow_crimes_is_wired(tmp_path, capsys):
    from mergekit_fast.testing import make_model

    a = make_model(tmp_path / "a", "llama", num_layers=2, seed=1)
    b = make_model(tmp_path / "b", "mistral", num_layers=2, seed=2)
    cfg = tmp_path / "c.yml"
    cfg.write_text(SLERP.format(a=a, b=b))
    assert _run("merge", str(cfg), str(tmp_path / "o1")) == 2
    assert "--allow-crimes" in capsys.readouterr().err
    assert _run("merge", str(cfg), str(tmp_path / "o2"), "--allow-crimes") == 0


# ----------------------------------------------------------------------------- messages that are true


def test_hidden_size_mismatch_is_not_called_a_vocabulary(tmp_path, capsys):
    a = make_synthetic_model(tmp_path / "a", seed=1, num_layers=2, hidden_size=64, vocab_size=64)
    b = make_synthetic_model(tmp_path / "b", seed=2, num_layers=2, hidden_size=32, vocab_size=64)
    cfg = tmp_path / "c.yml"
    cfg.write_text(SLERP.format(a=a, b=b))
    assert _run("merge", str(cfg), str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "shape mismatch" in err and "vocabulary" not in err and "hidden_size 64 vs 32" in err


def test_vocabulary_mismatch_says_so(tmp_path, capsys):
    a = make_synthetic_model(tmp_path / "a", seed=1, num_layers=2, hidden_size=64, vocab_size=64)
    b = make_synthetic_model(tmp_path / "b", seed=2, num_layers=2, hidden_size=64, vocab_size=72)
    cfg = tmp_path / "c.yml"
    cfg.write_text(SLERP.format(a=a, b=b))
    assert _run("merge", str(cfg), str(tmp_path / "out")) == 2
    assert "different vocabulary sizes" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["broken symlink", "unreadable"])
def test_unreadable_tokenizer_file_is_an_error(models, tmp_path, capsys, how):
    root, a, b, cfg = models
    tok = a / "tokenizer_config.json"
    tok.unlink()
    if how == "broken symlink":
        tok.symlink_to(tmp_path / "gone.json")
        expect = "broken symlink"
    else:
        tok.mkdir()  # open() fails for root too (chmod 000 does not stop root)
        expect = "cannot read the tokenizer file"
    out = tmp_path / "out"
    assert _run("merge", str(cfg), str(out)) == 2
    err = capsys.readouterr().err
    assert str(tok) in err and expect in err and not out.exists()
    assert _run("merge", str(cfg), str(out), "--no-copy-tokenizer") == 0


def test_small_budget_says_what_it_uses(models, tmp_path, caplog):
    root, a, b, cfg = models
    assert cli.main(["merge", str(cfg), str(tmp_path / "out"), "--no-progress", "--max-memory", "1K"]) == 0
    assert "--max-memory 0.0 MiB is below what the largest tensor needs" in caplog.text
    assert "is used instead" in caplog.text


def test_summary_time_covers_the_whole_run(models, tmp_path, capsys):
    root, a, b, cfg = models
    assert cli.main(["merge", str(cfg), str(tmp_path / "out"), "--no-progress"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "(" in line and "plan " in line and "merge " in line
    total = float(line.split(" in ")[1].split(" s")[0])
    parts = line.split("(")[1].split(")")[0].split(", ")
    assert total >= sum(float(p.split()[-2]) for p in parts) - 0.02
    assert json.loads((tmp_path / "out" / "config.json").read_text())
