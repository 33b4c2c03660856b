"""Vocabulary tensors re-indexed to the output vocabulary: the row map of one input, and applying it.

When the output vocabulary differs from a model's (``tokenizer_source: union``, another model's
tokenizer, added tokens, padding) or the vocabularies are cut to the shortest
(``--unsafe-truncate-embeddings``), every input of a vocabulary tensor (embeddings, lm_head) is first
re-indexed along its vocabulary axis, as mergekit 0.1.5's PermutedVocabulary (tokenizer/embed.py) and
TruncatedVocabulary do, and only then merged. The planner describes that per input as a ``RowMap``
(``InputRef.rows``); the engine applies it while it loads the input (``gather``: one gather of the
model's own rows plus the filled rows, into a buffer of the output's shape), so no model is copied as
a whole. ``gather_reference`` is the same thing row by row, independently written, for ``--verify``.

Output row r of input m is, in order of precedence:
- the model's own row ``rows[r]`` (>= 0);
- a filled row, computed from the ORIGINAL inputs exactly as mergekit computes it: the mean of the
  rows of every model that has the token (a running sum in the merge dtype, then one division), another
  model's row, or zeros;
- zeros (a token no model can give a row; mergekit logs an error);
- for the padding rows ``[pad_from, size)`` (``pad_to_multiple_of``): the mean of rows ``[0, pad_from)``
  of the result (torch.mean in the merge dtype, as mergekit).

Nothing here imports torch at module level.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, eq=False)
class Copy:
    """Rows ``out`` of the result are rows ``src`` of input ``ref`` (an InputRef as stored)."""

    out: array
    ref: object
    src: array


@dataclass(frozen=True, eq=False)
class Mean:
    """Rows ``out`` of the result are the mean of rows ``srcs[k][1]`` of inputs ``srcs[k][0]``:
    ``((0 + x_1) + x_2) + ...`` then divided by ``len(srcs)``, in the merge dtype."""

    out: array
    srcs: tuple[tuple[object, array], ...]


@dataclass(frozen=True, eq=False)
class RowMap:
    """How one input of a vocabulary tensor becomes its ``size`` output rows along ``axis``."""

    axis: int
    size: int
    rows: array  # per output row: the input's own row, or -1
    copies: tuple[Copy, ...] = ()
    means: tuple[Mean, ...] = ()
    pad_from: int | None = None  # rows [pad_from, size) are the mean of rows [0, pad_from)
    sources: tuple = field(default=())  # every other input (InputRef) the filled rows read

    def out_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        out = list(shape)
        out[self.axis] = self.size
        return tuple(out)


def _index(values, device=None):
    import torch

    return (
        torch.frombuffer(values, dtype=torch.int64).to(device)
        if len(values)
        else torch.empty(0, dtype=torch.int64, device=device)
    )


def gather(rm: RowMap, src, load: Callable[[object], object], dtype, out=None):
    """Apply ``rm`` to the input ``src`` (a torch tensor as stored): the result in ``dtype`` (written
    into ``out`` when given, a tensor of ``rm.out_shape(src.shape)``). ``load(ref)`` gives the stored
    tensor of another input that filled rows read."""
    import torch

    shape = rm.out_shape(src.shape)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=src.device)
    o = out.movedim(rm.axis, 0)
    x = src.movedim(rm.axis, 0)
    rows = _index(rm.rows, src.device)
    own = (rows >= 0).nonzero().reshape(-1)
    if len(own) == rm.size:
        if x.dtype == dtype and o.is_contiguous():
            torch.index_select(x, 0, rows, out=o)
        else:
            o.copy_(x.index_select(0, rows))
    else:
        o.zero_()
        if len(own):
            o.index_copy_(0, own, x.index_select(0, rows[own]).to(dtype))
    for c in rm.copies:
        y = load(c.ref).movedim(rm.axis, 0)
        o.index_copy_(0, _index(c.out, src.device), y.index_select(0, _index(c.src, src.device)).to(dtype))
    for m in rm.means:
        acc = torch.zeros((len(m.out), *o.shape[1:]), dtype=dtype, device=src.device)
        for ref, idx in m.srcs:
            y = load(ref).movedim(rm.axis, 0)
            acc = acc + y.index_select(0, _index(idx, src.device)).to(dtype)
        acc /= len(m.srcs)
        o.index_copy_(0, _index(m.out, src.device), acc)
    if rm.pad_from is not None and rm.pad_from < rm.size:
        o[rm.pad_from :] = torch.mean(o[: rm.pad_from], dim=0)
    return out


def gather_reference(rm: RowMap, src, load: Callable[[object], object], dtype):
    """``gather`` row by row (plain indexing, no fused index ops): the oracle of --verify and the tests."""
    import torch

    x = src.movedim(rm.axis, 0)
    shape = list(x.shape)
    shape[0] = rm.size
    result = torch.zeros(shape, dtype=dtype)
    for r, s in enumerate(rm.rows):
        if s >= 0:
            result[r] = x[s].to(dtype)
    for c in rm.copies:
        y = load(c.ref).movedim(rm.axis, 0)
        for r, s in zip(c.out, c.src):
            result[r] = y[s].to(dtype)
    for m in rm.means:
        ys = [(load(ref).movedim(rm.axis, 0), idx) for ref, idx in m.srcs]
        for k, r in enumerate(m.out):
            embed = torch.zeros(shape[1:], dtype=dtype)
            for y, idx in ys:
                embed = embed + y[idx[k]].to(dtype)
            embed /= len(ys)
            result[r] = embed
    if rm.pad_from is not None and rm.pad_from < rm.size:
        result[rm.pad_from :] = torch.mean(result[: rm.pad_from], dim=0)
    return result.movedim(0, rm.axis)


def prefix(axis: int, size: int) -> RowMap:
    """The first ``size`` rows along ``axis`` (mergekit's --unsafe-truncate-embeddings)."""
    return RowMap(axis=axis, size=size, rows=array("q", range(size)))
