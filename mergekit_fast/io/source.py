"""Where the engine reads models from: the TensorSource protocol, and its in-memory implementation.

The planner and the engine see a model only through this surface (``ModelSource`` in io/model.py
implements it for a safetensors directory, ``MemorySource`` below for tensors already in memory):

    path          the model's directory, or None (memory)
    config        its config.json as a dict
    tensors       name -> TensorInfo (dtype, shape, a file key and byte offsets: the engine orders its
                  reads by (file, start))
    num_layers    the layer count from the config
    reader(file)  a TensorReader for the tensors of one file key
    close()

A TensorReader gives a tensor's data in the forms the engine's staging strategies use:
``view(name)`` (a torch tensor, zero-copy where possible), ``address(name)`` (for the native CPU
kernels, where ``addressable(name)``), ``raw(name)`` (its bytes), ``fileno()`` (file-to-file copies;
OSError when there is no file), and the page hints ``prefault``, ``release`` and ``willneed`` (no-ops in memory).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from mergekit_fast import dtypes
from mergekit_fast.io.safetensors import TensorInfo


@runtime_checkable
class TensorReader(Protocol):
    def view(self, name: str): ...
    def address(self, name: str) -> int: ...
    def raw(self, name: str) -> memoryview: ...
    def fileno(self) -> int: ...
    def addressable(self, name: str) -> bool: ...
    def prefault(self, name: str) -> None: ...
    def release(self, name: str) -> None: ...
    def willneed(self, name: str) -> int: ...


@runtime_checkable
class TensorSource(Protocol):
    path: Path | None
    config: dict
    tensors: dict[str, TensorInfo]

    @property
    def num_layers(self) -> int: ...

    def reader(self, file) -> TensorReader: ...

    def close(self) -> None: ...


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


class _MemoryReader:
    def __init__(self, tensors: Mapping[str, object]):
        self._tensors = tensors

    def view(self, name: str):
        return self._tensors[name]

    def address(self, name: str) -> int:
        t = self._tensors[name]
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"tensor {name!r} is not a contiguous CPU tensor")
        return t.data_ptr()

    def raw(self, name: str) -> memoryview:
        import torch

        t = self._tensors[name].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())

    def fileno(self) -> int:
        raise OSError("an in-memory tensor has no file")

    def addressable(self, name: str) -> bool:
        t = self._tensors[name]
        return t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad

    def prefault(self, name: str) -> None:
        pass

    def release(self, name: str) -> None:
        pass

    def willneed(self, name: str) -> int:
        return 0


class MemorySource:
    """A model whose tensors are already in memory (a state dict, on any device), for the planner and
    the engine. ``config`` is the model's config.json as a dict; without one, a minimal config with
    the layer count inferred from the tensor names (``...layers.<i>.``) is used."""

    def __init__(self, tensors: Mapping[str, object], config: dict | None = None, key: str = "memory"):
        import torch

        for name, t in tensors.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise TypeError(f"a state dict maps names to tensors; got {name!r}: {type(t).__name__}")
        self._tensors = dict(tensors)
        self.path = None
        self.key = key
        self.config = dict(config) if config is not None else self._infer_config()
        file = Path(f"<memory:{key}>")
        self.tensors: dict[str, TensorInfo] = {}
        pos = 0
        for name, t in self._tensors.items():
            d = dtypes.of(t.dtype)
            n = math.prod(t.shape) * d.itemsize
            self.tensors[name] = TensorInfo(name, d, tuple(t.shape), file, pos, pos + n)
            pos += n
        self._reader = _MemoryReader(self._tensors)

    def _infer_config(self) -> dict:
        layers = {int(m.group(1)) for name in self._tensors for m in [_LAYER.search(name)] if m}
        return {"num_hidden_layers": max(layers) + 1 if layers else 0}

    @property
    def name(self) -> str:
        return f"<memory:{self.key}>"

    @property
    def num_layers(self) -> int:
        cfg = self.config.get("text_config") or self.config
        n = cfg.get("num_hidden_layers", cfg.get("n_layer", cfg.get("num_layers")))
        if not isinstance(n, int):
            raise ValueError(f"{self.name}: no integer num_hidden_layers in its config")
        return n

    @property
    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    def reader(self, file) -> _MemoryReader:
        return self._reader

    def close(self) -> None:
        pass
