"""The gram op: the k x k dot products of k same-shaped tensors, or of their deltas to a base.

``gram(xs, base)`` returns G (fp64) with G[i, j] = sum_e d_i[e] d_j[e] over the elements of the
flattened tensors (``row_len`` > 0: over each row of ``row_len`` elements, one k x k matrix per row),
where d_i = x_i, or x_i - base with a base. Every sum accumulates in fp64 in a fixed order
(csrc/gram/gram_blocks.h): the result does not depend on the thread count or the CPU level.
bf16/fp16 values are converted inside the loop (no upcast copy).

Two roundings of the terms (csrc/common/gram_math.h):
  * ``"fp64"``: d_i = x_i - base and every product in fp64 (the Gram matrix of the values);
  * ``"input"``: the terms torch adds when it computes these sums in the input dtype, as mergekit's
    methods do: d_i = x_i - base rounded to the dtype, off-diagonal terms d_i * d_j rounded to the
    dtype (``(d_i * d_j).sum()``), diagonal terms d_i^2 unrounded (``torch.norm(d_i)`` squares in
    its fp32 accumulation type). Rounding the fp64 sum to the dtype then gives torch's value except
    where torch's own fp32 accumulation error moves it across a rounding boundary of the dtype.

Backends: ``cpp`` (the C++ kernel, CPU tensors) and ``torch`` (``gram_ref``: the oracle, any device,
and any k). With 16-bit inputs every term is exact in fp64, so the two differ only by fp64
accumulation error: at most n * 2^-53 * sum_e |term_e| per entry (tests/test_ops_gram.py).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import torch

from mergekit_fast import _native, backends

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ROUNDINGS = {"fp64": 0, "input": 1}
MAX_INPUTS = 16  # the native kernels' largest k (mkf::kGramMaxInputs); more go through the reference
_CHUNK = 1 << 20


def _rows(x: torch.Tensor, row_len: int) -> int:
    return x.numel() // row_len if row_len > 0 else 1


def gram_ref(xs: Sequence[torch.Tensor], base: torch.Tensor | None = None, *, row_len: int = 0,
             rounding: str = "fp64") -> torch.Tensor:  # fmt: skip
    """Plain torch gram: (k, k) fp64, or (rows, k, k) with ``row_len`` > 0 (module docstring)."""
    k = len(xs)
    n = xs[0].numel()
    rows = _rows(xs[0], row_len)
    seg = row_len if row_len > 0 else max(n, 1)
    out = torch.zeros(rows, k, k, dtype=torch.float64)
    if n == 0:
        return out if row_len > 0 else out[0]
    flat = [x.detach().reshape(rows, seg).cpu() for x in xs]
    b = None if base is None else base.detach().reshape(rows, seg).cpu()
    step = max(1, _CHUNK // seg)
    for r0 in range(0, rows, step):
        sl = slice(r0, r0 + step)
        if rounding == "input":
            ds = [x[sl] - b[sl] if b is not None else x[sl] for x in flat]  # in the input dtype
            for i in range(k):
                di = ds[i].double()
                out[sl, i, i] += (di * di).sum(-1)
                for j in range(i + 1, k):
                    v = (ds[i] * ds[j]).double().sum(-1)  # the product rounded to the dtype
                    out[sl, i, j] += v
                    out[sl, j, i] += v
        else:
            ds = [x[sl].double() - b[sl].double() if b is not None else x[sl].double() for x in flat]
            d = torch.stack(ds, 1)  # (rows, k, seg)
            out[sl] += d @ d.transpose(1, 2)
    return out if row_len > 0 else out[0]


def _check(xs, base, row_len, rounding) -> None:
    if not xs:
        raise ValueError("gram: needs at least one input")
    x0 = xs[0]
    for i, x in enumerate([*xs, *([base] if base is not None else [])]):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"gram: input {i} is not a tensor")
        if x.shape != x0.shape or x.dtype != x0.dtype or x.device != x0.device:
            raise ValueError(
                f"gram: input {i} is {tuple(x.shape)} {x.dtype} on {x.device}; input 0 is "
                f"{tuple(x0.shape)} {x0.dtype} on {x0.device}"
            )
    if x0.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"gram: dtype {x0.dtype} is not supported (float32, float16, bfloat16, float64)")
    if rounding not in ROUNDINGS:
        raise ValueError(f"gram: rounding must be one of {sorted(ROUNDINGS)}, got {rounding!r}")
    if row_len < 0 or (row_len > 0 and x0.numel() % row_len != 0):
        raise ValueError(f"gram: row_len {row_len} does not divide the {x0.numel()} elements")


def _run_cpp(groups, bases, row_lens, rounding, threads) -> list[torch.Tensor]:
    """One native call for tensors of one dtype and one k (all with a base or none)."""
    k = len(groups[0])
    ptrs, numels, rls, outs = [], [], [], []
    for xs, b, rl in zip(groups, bases, row_lens):
        ptrs += [x.data_ptr() for x in xs] + [b.data_ptr() if b is not None else 0]
        numels.append(xs[0].numel())
        rls.append(rl if 0 < rl < xs[0].numel() else 0)
        outs.append(_rows(xs[0], rl))
    total = sum(outs)
    out = torch.empty(total, k, k, dtype=torch.float64)
    tables = (array("Q", ptrs), array("q", numels), array("q", rls))
    p, nm, rl = (t.buffer_info()[0] for t in tables)
    _native.C.gram_cpu(_native.dtype_tag(groups[0][0].dtype), k, len(groups), p, nm, rl, ROUNDINGS[rounding],
                       out.data_ptr(), threads)  # fmt: skip
    return list(torch.split(out, outs))


def gram_many(groups: Sequence[Sequence[torch.Tensor]], bases: Sequence[torch.Tensor | None] | None = None, *,
              row_lens: Sequence[int] | None = None, rounding: str = "fp64", backend: str = "auto",
              threads: int = 0) -> list[torch.Tensor]:  # fmt: skip
    """``gram`` of many tensor groups (each group: k same-shaped tensors) in as few native calls as
    possible (groups of one dtype, k and base presence share a call). Returns one result per group."""
    bases = list(bases) if bases is not None else [None] * len(groups)
    row_lens = list(row_lens) if row_lens is not None else [0] * len(groups)
    if not groups:
        return []
    for xs, b, rl in zip(groups, bases, row_lens):
        _check(list(xs), b, int(rl), rounding)
    device = groups[0][0].device
    name = backends.select("gram", device, backend, implemented=("cpp", "torch"))
    results: list[torch.Tensor | None] = [None] * len(groups)
    batches: dict[tuple, list[int]] = {}
    for i, (xs, b, rl) in enumerate(zip(groups, bases, row_lens)):
        if name == "torch" or len(xs) > MAX_INPUTS or xs[0].device != device:
            results[i] = gram_ref(xs, b, row_len=rl, rounding=rounding)
        elif xs[0].numel() == 0:
            results[i] = torch.zeros(*((_rows(xs[0], rl),) if rl > 0 else ()), len(xs), len(xs),
                                     dtype=torch.float64)  # fmt: skip
        else:
            batches.setdefault((xs[0].dtype, len(xs), b is not None), []).append(i)
    for idx in batches.values():
        gs = [[x.contiguous() for x in groups[i]] for i in idx]
        bs = [bases[i].contiguous() if bases[i] is not None else None for i in idx]
        outs = _run_cpp(gs, bs, [row_lens[i] for i in idx], rounding, threads or torch.get_num_threads())
        for i, o in zip(idx, outs):
            results[i] = o if row_lens[i] > 0 else o[0]
    return results  # type: ignore[return-value]


def gram(xs: Sequence[torch.Tensor], base: torch.Tensor | None = None, *, row_len: int = 0,
         rounding: str = "fp64", backend: str = "auto", threads: int = 0) -> torch.Tensor:  # fmt: skip
    """The k x k fp64 dot products of ``xs`` (or of ``x - base``); see the module docstring.

    Arguments:
        xs: k >= 1 tensors of one shape, dtype (bf16, fp16, fp32, fp64) and device.
        base: optional tensor like them; the sums are then of the deltas x_i - base.
        row_len: 0 sums over the whole flattened tensor (result (k, k)); > 0 sums over each row of
            that many elements (it must divide the size; result (rows, k, k)).
        rounding: "fp64" or "input" (module docstring).
        backend: "auto", "cpp" or "torch".
        threads: CPU threads (0: torch's thread count); the result does not depend on it.
    """
    return gram_many([list(xs)], [base], row_lens=[row_len], rounding=rounding, backend=backend,
                     threads=threads)[0]  # fmt: skip


# ----------------------------------------------------------------------------- the methods' apply steps


def native_pass(
    kernel: str, tensors, numel: int, step: int, scalars=(), *, n: int | None = None, threads: int = 0
) -> int:
    """One elementwise pass of a gram-based method's kernel (``multislerp_pass_cpu``, ``nuslerp_pass_cpu``,
    ``karcher_pass_cpu``: csrc/gram) on torch tensors of one 16-bit dtype: their addresses (None: 0) in a
    table, ``scalars`` as doubles, ``n`` the model count for the kernels that take one."""
    ptrs = array("Q", [0 if t is None else t.data_ptr() for t in tensors])
    vals = array("d", [float(v) for v in scalars] or [0.0])
    dtype = next(t.dtype for t in tensors if t is not None)
    lead = (_native.dtype_tag(dtype), step) if n is None else (_native.dtype_tag(dtype), step, n)
    return getattr(_native.C, kernel)(*lead, numel, ptrs.buffer_info()[0], vals.buffer_info()[0], threads)


def native_ready(tensors: Sequence[torch.Tensor], backend: str = "auto") -> bool:
    """Whether the C++ kernels serve these tensors: CPU, one dtype the kernels take, contiguous, the
    native module built, and ``backend`` (a method's Context.backend) auto or cpp."""
    if not tensors or (backend or "auto") not in ("auto", "cpp") or _native.C is None:
        return False
    if not hasattr(_native.C, "model_stock_apply_cpu"):
        return False
    x0 = tensors[0]
    return (
        x0.device.type == "cpu"
        and x0.dtype in SUPPORTED_DTYPES
        and all(x.dtype == x0.dtype and x.device == x0.device and x.is_contiguous() for x in tensors)
        and all(x.shape == x0.shape for x in tensors)
    )


def model_stock_apply(models: Sequence[torch.Tensor], base: torch.Tensor, t: torch.Tensor, *, row_len: int = 0,
                      out: torch.Tensor | None = None, threads: int = 0) -> torch.Tensor:  # fmt: skip
    """mergekit's ``t * (sum(models) / n) + (1 - t) * base`` op by op in the dtype, in one native pass.

    ``t`` holds one value of the dtype per row of ``row_len`` elements (row_len 0: one value); the
    tensors are contiguous CPU tensors of one dtype (``native_ready``)."""
    out = torch.empty_like(base) if out is None else out
    ts = t.detach().reshape(-1).to(torch.float64).contiguous()
    rows = base.numel() // row_len if row_len > 0 else 1
    if ts.numel() != rows:
        raise ValueError(f"model_stock_apply: {ts.numel()} values of t for {rows} rows")
    ptrs = array("Q", [x.data_ptr() for x in models] + [base.data_ptr(), out.data_ptr()])
    _native.C.model_stock_apply_cpu(_native.dtype_tag(base.dtype), len(models), ptrs.buffer_info()[0], base.numel(),
                                    row_len, ts.data_ptr(), threads or torch.get_num_threads())  # fmt: skip
    return out
