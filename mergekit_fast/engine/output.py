"""Where a merge writes, how it gets there without ever touching an input, and what it writes besides
the weights (config.json, shard index, model card, tokenizer files).

Rules (checked by ``check_target`` before anything is written):

* **Inputs are untouchable.** OUT may not be an input model's directory, contain one, or lie inside
  one -- compared both as written and with symlinks resolved. ``--force`` does not change this. (An
  OUT inside an input directory would touch no input file, but it would turn the input directory
  into something else -- a model repository with a stray sub-model that an upload or a copy then
  carries along -- so it is refused too.)
* **``--force`` replaces only what a merge writes.** An existing OUT is replaced only when it looks
  like a merge output (mergekit's or ours): a directory holding config.json and nothing but the
  files a merge writes. Anything else (a file, a directory with other files) needs
  ``--force-unrecognized`` as well, and the error lists what would be deleted.
* **Every ending is clean.** The merge is written into a hidden temporary directory beside OUT,
  ``.<OUT name>.mergekit_fast-tmp-<pid>-<host>``, and installed by one atomic exchange of the two
  directories (renameat2 RENAME_EXCHANGE; two renames where the filesystem lacks it). A failure or a
  signal removes the temporary directory. A temporary directory left by a SIGKILL is removed by the
  next run that writes anywhere in the same parent directory, once its process is gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import re
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path

from mergekit_fast.errors import MergeError, OutputError

TMP_MARK = ".mergekit_fast-tmp-"
OLD_MARK = ".mergekit_fast-old-"

# Files a merge writes (mergekit-yaml, mergekit-moe, mergekit_fast): weights, index, config, card,
# tokenizer and generation config.
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
    "generation_config.json",
    "chat_template.json",
)
# Files mergekit copies from the donor for some architectures (their definitions' tagalong_files).
TAGALONG_FILES = ("preprocessor_config.json", "processor_config.json", "normalizer.json",
                  "video_preprocessor_config.json")  # fmt: skip
OUTPUT_FILES = frozenset(
    {
        *TAGALONG_FILES,
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "README.md",
        "mergekit_config.yml",
        "mergekit_moe_config.yml",
        *TOKENIZER_FILES,
    }
)
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "localhost"


def tmp_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{_host()}"


def _inside(child: str, parent: str) -> bool:
    """``child`` is ``parent`` or lies under it (both absolute, normalised)."""
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _forms(path: str | os.PathLike) -> set[str]:
    """A path as written (absolute, normalised) and with every symlink resolved."""
    p = os.path.abspath(os.fspath(path))
    return {os.path.normpath(p), os.path.realpath(p)}


def is_merge_file(name: str) -> bool:
    return name in OUTPUT_FILES or bool(_SHARD.match(name))


def unrecognized_entries(out: Path) -> list[str]:
    """What in an existing OUT a merge would not have written, or that is missing for OUT to be a merge
    output (config.json); empty when OUT looks like a merge output (or is an empty directory)."""
    if not out.is_dir():
        return [f"{out} is a file, not a model directory"]
    names = sorted(os.listdir(out))
    if not names:
        return []
    odd = []
    for n in names:
        p = out / n
        if p.is_symlink() or not p.is_file():
            odd.append(
                n + ("/" if p.is_dir() and not p.is_symlink() else " (a link)" if p.is_symlink() else "")
            )
        elif not is_merge_file(n):
            odd.append(n)
    if "config.json" not in names:
        odd.append("no config.json")
    return odd


def check_target(
    out_path: str | os.PathLike,
    inputs: Iterable[str | os.PathLike],
    *,
    force: bool = False,
    force_unrecognized: bool = False,
) -> Path:
    """Check that a merge may be written to ``out_path``; return the directory to install (absolute,
    symlinks resolved). ``inputs``: every model directory the merge reads. Raises OutputError."""
    given = Path(os.path.abspath(os.fspath(out_path)))
    out_forms = _forms(given)
    for model in inputs:
        for m in _forms(model):
            for o in out_forms:
                if o == m:
                    raise OutputError(
                        f"output {given} is the input model {model}: a merge never writes over one of its "
                        "inputs (--force does not change this); choose another output directory"
                    )
                if _inside(m, o):
                    raise OutputError(
                        f"output {given} contains the input model {model}: replacing it would delete that "
                        "input (--force does not change this); choose another output directory"
                    )
                if _inside(o, m):
                    raise OutputError(
                        f"output {given} lies inside the input model {model}: a merge never writes into an "
                        "input's directory; choose a directory outside it"
                    )
    out = Path(os.path.realpath(given))
    if not out.parent.is_dir():
        if os.path.lexists(out.parent):
            raise OutputError(f"{out.parent}: cannot create the output there (Not a directory)")
        raise OutputError(f"{out.parent}: the parent directory of the output does not exist")
    if os.path.lexists(out):
        if not force:
            raise OutputError(f"{given} exists; pass --force to replace it")
        odd = unrecognized_entries(out)
        if odd and not force_unrecognized:
            shown = ", ".join(odd[:8]) + (f" and {len(odd) - 8} more" if len(odd) > 8 else "")
            raise OutputError(
                f"{given} exists and does not look like a merged model ({shown}: not what a merge "
                "writes); --force replaces only merge outputs. To delete everything in it and write the "
                "merge there, add --force-unrecognized"
            )
    return out


def clean_stale(parent: Path) -> list[Path]:
    """Remove the temporary directories (and half-installed old outputs) that runs on this host left in
    ``parent`` when they were killed; returns what was removed."""
    removed = []
    me, host = os.getpid(), _host()
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        name = p.name
        mark = TMP_MARK if TMP_MARK in name else OLD_MARK if OLD_MARK in name else None
        if mark is None or not name.startswith("."):
            continue
        pid_s, _, owner = name.rsplit(mark, 1)[1].partition("-")
        try:
            pid = int(pid_s)
        except ValueError:
            continue
        if (owner and owner != host) or pid == me or _alive(pid):
            continue
        shutil.rmtree(p, ignore_errors=True)
        if not os.path.lexists(p):
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot install {a} as {b}: {os.strerror(err)}")


def install(tmp: Path, out: Path) -> None:
    """Put the finished ``tmp`` directory at ``out``, replacing what is there (already checked)."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    if out.is_dir() and not out.is_symlink() and _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old output
        return
    old = out.parent / f".{out.name}{OLD_MARK}{os.getpid()}-{_host()}"
    os.rename(out, old)
    os.rename(tmp, out)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


# ----------------------------------------------------------------------------- the files beside the weights


def model_card(plan) -> str:
    models = "\n".join(f"* {name}" for name in plan.sources)
    methods_used = sorted({t.method for t in plan.tensors})
    return (
        "---\nlibrary_name: transformers\ntags:\n- mergekit\n- mergekit_fast\n- merge\n---\n"
        "# merged model\n\n"
        "This is a merge of pre-trained language models created with "
        "[mergekit_fast](https://github.com/) (mergekit-compatible).\n\n"
        f"## Merge details\n\nMerge method(s): {', '.join(methods_used)}\n\n"
        f"### Models merged\n\n{models}\n\n"
        f"### Configuration\n\n```yaml\n{plan.config_yaml.strip()}\n```\n"
    )


def check_tokenizer_files(plan, copy_tokenizer: bool) -> None:
    """Every tokenizer file the output will copy can be read: a broken symlink or a file without read
    permission is an error now, before any work, never a silently missing tokenizer."""
    if not copy_tokenizer or plan.tokenizer_source is None or getattr(plan, "tokenizer", None) is not None:
        return  # (a tokenizer the plan builds is loaded by transformers, which reports its own errors)
    src = Path(plan.tokenizer_source)
    for name in TOKENIZER_FILES:
        path = src / name
        if not os.path.lexists(path):
            continue
        if not path.exists():
            raise MergeError(f"{path}: tokenizer file is a broken symlink (to {os.readlink(path)})")
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise MergeError(f"{path}: cannot read the tokenizer file ({exc.strerror})") from None


def finalize_files(
    plan,
    tmp: Path,
    shard_files: list[str],
    weight_map: dict,
    total: int,
    *,
    write_model_card: bool,
    copy_tokenizer: bool,
) -> None:
    """Everything but the weights: the shard index, config.json, the model card and merge config, the
    tokenizer files (copied, or the plan's own tokenizer: a merged vocabulary, a chat template) and the
    architecture's tagalong files (a vision model's preprocessor_config.json)."""
    if len(shard_files) > 1:
        index = {"metadata": {"total_size": total, "mergekit_version": "0.1.5"}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(plan.out_config, indent=2, sort_keys=True) + "\n")
    if write_model_card:
        # A plan may bring its own card and config file name (the MoE builder: mergekit_moe_config.yml).
        (tmp / "README.md").write_text(getattr(plan, "model_card", None) or model_card(plan))
        (tmp / getattr(plan, "config_file_name", "mergekit_config.yml")).write_text(plan.config_yaml)
    tokenizer = getattr(plan, "tokenizer", None)
    if tokenizer is not None:
        try:
            tokenizer.write(tmp, copy_tokenizer)
        except Exception as exc:  # noqa: BLE001 - transformers' many ways to fail
            raise MergeError(f"cannot write the tokenizer: {type(exc).__name__}: {exc}") from None
    elif copy_tokenizer and plan.tokenizer_source is not None:
        src = Path(plan.tokenizer_source)
        for name in TOKENIZER_FILES:
            if os.path.lexists(src / name):
                try:
                    shutil.copyfile(src / name, tmp / name)
                except OSError as exc:
                    raise MergeError(
                        f"{src / name}: cannot copy the tokenizer file ({exc.strerror})"
                    ) from None
    for path in getattr(plan, "tagalong", ()):
        try:
            shutil.copyfile(path, tmp / Path(path).name)
        except OSError as exc:
            raise MergeError(f"{path}: cannot copy it to the output ({exc.strerror})") from None
