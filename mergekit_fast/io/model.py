"""Input models: a local directory with config.json and safetensors weights (one file or sharded).

Pickled checkpoints (.bin, .pt, .pth, .ckpt) are refused: loading them can execute code.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from mergekit_fast.io.safetensors import SafetensorsError, ShardReader, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class ModelError(ValueError):
    """An input model is unusable; the message names the model and the file."""


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config


@dataclass
class ModelSource:
    path: Path
    config: dict
    tensors: dict[str, TensorInfo]
    _readers: dict[Path, ShardReader] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __getstate__(self) -> dict:
        """Pickled without its open files (an executor ships the plan to workers): a copy opens its
        readers again, lazily, from the same absolute paths."""
        state = dict(self.__dict__)
        state["_readers"] = {}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path) -> ModelSource:
        path = Path(path).expanduser()
        if not path.is_dir():
            if path.exists():
                raise ModelError(f"{path}: a model must be a directory with config.json and *.safetensors")
            raise ModelError(
                f"{path}: no such directory (models must be local; downloading from the hub is not supported)"
            )
        cfg_path = path / "config.json"
        try:
            config = json.loads(cfg_path.read_text())
        except FileNotFoundError:
            raise ModelError(f"{path}: config.json is missing") from None
        except (OSError, ValueError) as exc:
            raise ModelError(f"{cfg_path}: cannot parse ({exc})") from None
        if not isinstance(config, dict):
            raise ModelError(f"{cfg_path}: must hold a JSON object")
        return cls(path=path, config=config, tensors=_inventory(path))

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def num_layers(self) -> int:
        cfg = _text_config(self.config)
        n = cfg.get("num_hidden_layers", cfg.get("n_layer", cfg.get("num_layers")))
        if not isinstance(n, int):
            raise ModelError(f"{self.path / 'config.json'}: no integer num_hidden_layers")
        return n

    @property
    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    def reader(self, file: Path) -> ShardReader:
        """The reader of one of the model's files, opened on first use (thread-safe: the workers of
        one process may share a plan)."""
        r = self._readers.get(file)
        if r is None:
            with self._lock:
                r = self._readers.get(file)
                if r is None:
                    shard_tensors = {n: t for n, t in self.tensors.items() if t.file == file}
                    r = self._readers[file] = ShardReader(file, shard_tensors)
        return r

    def close(self) -> None:
        with self._lock:
            for r in self._readers.values():
                r.close()
            self._readers.clear()


def _inventory(path: Path) -> dict[str, TensorInfo]:
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{index}: cannot parse the shard index ({exc})") from None
        files = sorted(set(weight_map.values()))
        for f in files:
            if not isinstance(f, str) or "/" in f or f.startswith("."):
                raise ModelError(f"{index}: bad shard file name {f!r}")
            if not (path / f).exists():
                raise ModelError(f"{index}: shard {f} is named in the index but missing from {path}")
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise ModelError(
                    f"{path}: only pickled checkpoints ({', '.join(pickles[:3])}) found; they can execute "
                    "code when loaded and are not supported. Convert the model to safetensors first."
                )
            raise ModelError(f"{path}: no *.safetensors weights found")
        weight_map = None
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        try:
            shard, _ = read_header(path / f)
        except SafetensorsError:
            raise
        for name, info in shard.items():
            if name in tensors:
                raise ModelError(f"{path}: tensor {name!r} appears in both {tensors[name].file.name} and {f}")
            tensors[name] = info
    if weight_map is not None:
        for name, f in weight_map.items():
            info = tensors.get(name)
            if info is None or info.file.name != f:
                raise ModelError(
                    f"{path / f}: tensor {name!r} is named in {INDEX_NAME} but not stored in {f}"
                )
    if not tensors:
        raise ModelError(f"{path}: the model has no tensors")
    return tensors
