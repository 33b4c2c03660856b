"""The task-arithmetic family: mergekit 0.1.5's GeneralizedTaskArithmeticMerge and its sparsify.py.

Not a method module (the leading underscore keeps the registry from loading it as one): the eight
method files (task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della,
della_linear) subclass ``TaskArithmeticFamily`` and choose a sparsification and a consensus.

Semantics, precisely (mergekit 0.1.5, inputs already in the plan's in_dtype D; "in D" means torch's
arithmetic on D tensors, which for bf16/fp16 computes each op in fp32 and rounds once):

1. No model besides the base: the output is the base.
2. Per non-base model i: delta_i = x_i - base, in D, sparsified (below) with density_i.
3. The deltas are stacked (n, ...) and multiplied by w = tensor(weights, dtype=D) (weights rounded to D).
4. Consensus "sum": majority = +1 where sum_i(w_i delta_i) >= 0, else -1 (the sum: torch's sum over the
   stacked dim, in D); "count": the same on sum_i sign(w_i delta_i). agree_i = sign(w_i delta_i) ==
   majority (zero deltas never agree); mixed = sum_i(w_i delta_i agree_i); divisor = sum_i(w_i agree_i),
   1 where it is 0. Without consensus: mixed = sum_i(w_i delta_i), divisor = sum_i(w_i) (in D), 1 where
   |divisor| < 1e-8.
5. normalize: mixed / divisor; lambda != 1: mixed * lambda (a Python scalar: torch's fp32 opmath);
   the output is base + mixed, in D.

Sparsification of one delta d (n elements; density >= 1 always returns d unchanged, before any rescale):

- magnitude (ties): density <= 0 (or n = 0) gives zeros; else keep k = max(1, int(density * n)) elements
  of largest |d| (as fp32), chosen as ``torch.argsort(|d|.float(), descending=True)[:k]`` does on the CPU.
- magnitude_outliers (breadcrumbs): target = int(density * n), top = int(gamma * n), bot = max(0, n -
  target - top); keep positions [bot, bot + target) (Python slice semantics, negative stops included) of
  ``torch.sort(|d|.float()).indices``. No special case for density <= 0 (it keeps nothing, except for
  the odd negative-stop slices mergekit's arithmetic produces, reproduced).
- random (DARE): work dtype Wd = bf16 for bf16 inputs, else fp32 (mergekit's CPU choice: fp16 is upcast,
  and fp64 is downcast); keep where the counter-based uniform u_j < Wd(density) (rng.py; mergekit draws
  torch.bernoulli from its global generator, so parity is statistical). Density < 0 is refused in the
  config (mergekit fails in torch.bernoulli).
- della_magprune (DELLA): density <= 0 gives zeros. Tensors of fewer than 2 dims are viewed as one row;
  ranks along dim 1 (1 = smallest |d|, |d| in D, order of ``torch.argsort``), in Wd; rank_norm = ((r -
  min r) / (max r - min r)).clamp(0, 1), p = (density - epsilon) + rank_norm * 2 * epsilon, all in Wd;
  keep where u_j < p_j. An epsilon that puts p outside [0, 1] is refused in the config (below).
- rescale (RescaleNorm.l1): the kept values times ||d||_1 / ||kept||_1, with both norms rounded to the
  work dtype and their quotient computed there (no rescale when either norm is below 1e-7).

Deliberate differences (documented in the README):
- L1 norms are summed in fp64 in fixed blocks (then rounded to the work dtype as mergekit's are), so they
  do not depend on the thread count; mergekit's torch sums do (for bf16, torch rounds per-thread
  partials to bf16), so a rescale factor can differ from mergekit's by one ulp of the work dtype.
- Ties in magnitude: see ``introsort_select`` -- the rule is libstdc++'s introsort, reproduced exactly.
- ``precise_sparsify: true`` (an extra parameter mergekit ignores, off by default) fixes three precision
  bugs of mergekit 0.1.5's sparsification: keep probabilities, DELLA's ranks and the rescale factor are
  computed in fp32 (fp64 for fp64 inputs) instead of bf16 for bf16 models (ranks above 256 are not even
  representable in bf16) and instead of fp32 for fp64 models (mergekit's "upcast fp16 to fp32 for
  torch.bernoulli" also downcasts fp64); the factor is applied in fp32/fp64 and rounded to D once.

Nothing here imports torch at import time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from mergekit_fast.config.errors import ConfigError
from mergekit_fast.methods.base import (
    BasePolicy,
    Context,
    Contract,
    MergeMethod,
    OptionalPolicy,
    Param,
    Planned,
    Scope,
    TensorGroup,
    passthrough_of,
)

MAGNITUDE = "magnitude"
RANDOM = "random"
MAGNITUDE_OUTLIERS = "magnitude_outliers"
DELLA = "della_magprune"
SUM = "sum"
COUNT = "count"

RESCALE_EPS = 1e-7  # rescaled_masked_tensor: no rescale when a norm is below this
DIVISOR_EPS = 1e-8  # without consensus: |sum of weights| below this divides by 1
L1_BLOCK = 4096  # L1 norms: fp64 sums of fixed blocks (one thread each), then math.fsum
L1_CHUNK = 1 << 22  # elements converted to fp64 at a time
INSERTION_THRESHOLD = 16  # libstdc++'s _S_threshold
NAN_KEY = 0x7FC00000  # every NaN magnitude sorts as one value above +inf
PARALLEL_MIN_NUMEL = 1 << 16  # smaller tensors: one thread (the pool costs more than it saves)
RNG_CHUNK_BLOCKS = 1 << 13  # Philox blocks per step on the CPU: 4 words each, 32768 per step, under torch's
# parallel grain (larger ops go to the intra-op pool, which stalls when other processes load the cores)


def family_params(*, normalize: bool, rescale: bool, sparsification: str | None) -> tuple[Param, ...]:
    """The parameters mergekit 0.1.5's GeneralizedTaskArithmeticMerge declares, with one method's defaults,
    plus ``precise_sparsify`` for the methods that sparsify."""
    params = [
        Param(
            "int8_mask", bool, Scope.SHARED, False, doc="store the sign mask as int8 (memory only; no effect)"
        ),
        Param("normalize", bool, Scope.SHARED, normalize, doc="divide by the sum of the (agreeing) weights"),
        Param("rescale", bool, Scope.SHARED, rescale, doc="rescale kept deltas to the L1 norm of the delta"),
        Param("lambda", float, Scope.SHARED, 1.0, doc="scale of the merged delta"),
        Param("weight", float, Scope.NON_BASE, doc="the model's weight"),
        Param("density", float, Scope.NON_BASE, 1.0, doc="fraction of the delta kept"),
    ]
    if sparsification == MAGNITUDE_OUTLIERS:
        params.append(Param("gamma", float, Scope.NON_BASE, 0.01, doc="fraction of largest deltas removed"))
    if sparsification == DELLA:
        params.append(
            Param("epsilon", float, Scope.NON_BASE, 0.15, doc="keep probabilities span density +- epsilon")
        )
    if sparsification is not None:
        params.append(
            Param("precise_sparsify", bool, Scope.SHARED, False,
                  doc="mergekit_fast only (mergekit ignores it): sparsify in fp32/fp64, not in bf16")
        )  # fmt: skip
    return tuple(params)


class TaskArithmeticFamily(MergeMethod):
    """A generalized task arithmetic method: the subclass sets ``sparsification`` and ``consensus``."""

    sparsification: ClassVar[str | None] = None
    consensus: ClassVar[str | None] = None
    contract = Contract(BasePolicy.REQUIRED, 1, None)
    optional_policy = OptionalPolicy.ERROR
    # compute and reference share the arithmetic and differ in how masks are found (see compute): on the
    # CPU they agree bit for bit; one ulp of the terms leaves room for other devices' arithmetic.
    tolerance = {"bfloat16": 1.0, "float16": 1.0, "float32": 1.0, "float64": 1.0}

    # -- planning
    def check_values(self, group: TensorGroup, where) -> None:
        """Refuse, in the config, what makes mergekit 0.1.5 fail while merging this tensor."""
        for model, values in group.per_input.items():
            if "density" not in values:
                continue  # the base
            density = float(values["density"])
            if self.sparsification == RANDOM and density < 0:
                raise ConfigError(
                    f"{where('density', model)}: density {density} is negative; {self.name} keeps each element "
                    "with probability density, which must be in [0, 1] (mergekit 0.1.5 fails in torch.bernoulli; "
                    "density 0 keeps nothing, density >= 1 keeps everything)"
                )
            if self.sparsification == DELLA and 0 < density < 1:
                eps = float(values["epsilon"])
                lo, hi = sorted((density - eps, density + eps))
                if eps >= 0 and (density + eps >= 1 or density - eps <= 0):
                    raise ConfigError(
                        f"{where('epsilon', model)}: epsilon {eps} with density {density} "
                        f"({where('density', model)}) gives keep probabilities from {lo:g} to {hi:g}; "
                        'density - epsilon and density + epsilon must be in (0, 1) (mergekit 0.1.5: "Epsilon '
                        'must be chosen such that density +/- epsilon is in (0, 1)")'
                    )
                if eps < 0 and (lo < 0 or hi > 1):
                    raise ConfigError(
                        f"{where('epsilon', model)}: epsilon {eps} with density {density} "
                        f"({where('density', model)}) gives keep probabilities from {lo:g} to {hi:g}, outside "
                        "[0, 1] (mergekit 0.1.5 fails in torch.bernoulli)"
                    )

    def plan(self, group: TensorGroup):
        planned = super().plan(group)
        if planned is None or planned.method != self.name:
            return planned
        if len(planned.inputs) == 1:
            return passthrough_of(planned.inputs[0])  # only the base: mergekit returns it
        params = []
        for name, value in planned.params:
            if isinstance(value, tuple):
                params.append((name, tuple(float(v) for v in value)))
            elif isinstance(value, bool):
                params.append((name, value))
            else:
                params.append((name, float(value)))
        return Planned(self.name, planned.inputs, tuple(params), True)

    # -- math
    def reference(self, inputs, params, ctx: Context):
        """mergekit 0.1.5's semantics in plain torch; masks found as mergekit finds them (torch.argsort for
        magnitudes, rng.bernoulli for draws)."""
        return merge(inputs, params, self.sparsification, self.consensus, ctx, fast=False)

    def compute(self, inputs, params, ctx: Context, out=None):
        """The same arithmetic; masks found faster (an O(n) selection when no tie straddles the threshold,
        the introsort model off the CPU, Philox in cache-sized chunks)."""
        result = merge(inputs, params, self.sparsification, self.consensus, ctx, fast=True)
        if out is not None:
            return out.copy_(result)
        return result

    # -- native CPU path (ops/select.py, ops/combine.py): by address, no torch
    def native_ok(self, tensor) -> bool:
        from mergekit_fast.ops.combine import native_plan

        n = math.prod(tensor.shape)
        why = native_plan(self.sparsification, dict(tensor.params), n, len(tensor.inputs) - 1,
                          tensor.in_dtype.native, tuple(tensor.shape))  # fmt: skip
        return why is None

    def native_cpu(self, tensors, inputs, outs, threads, seed=None):
        """The select and combine kernels on the mapped inputs (the base first), one tensor at a time."""
        from mergekit_fast.ops.combine import ta_merge_cpu

        flags = []
        for t, ins, out in zip(tensors, inputs, outs):
            flags.append(ta_merge_cpu(t.in_dtype.native, math.prod(t.shape), ins[0], list(ins[1:]), out,
                                      dict(t.params), self.sparsification, self.consensus, name=t.name,
                                      seed=seed, threads=threads, shape=tuple(t.shape)))  # fmt: skip
        return flags

    def verify_scale(self, inputs, params):
        """The terms' magnitude: |base| + |lambda| sum_i |w_i| r_i |x_i - base| / s, with r_i a bound of the
        rescale factor (1 / keep probability) and s the smallest divisor normalisation can give."""
        import torch

        base = inputs[0]
        cdt = torch.float64
        weights = params["weight"]
        densities = params.get("density", (1.0,) * len(weights))
        scale = base.to(cdt).abs()
        lam = abs(float(params.get("lambda", 1.0)))
        divisor = 1.0
        if params.get("normalize"):
            candidates = [abs(w) for w in weights if w] + [abs(sum(weights))]
            divisor = max(min(candidates), DIVISOR_EPS) if candidates else 1.0
            divisor = min(divisor, 1.0)
        for i, (x, w, d) in enumerate(zip(inputs[1:], weights, densities)):
            r = 1.0
            if params.get("rescale") and 0 < d < 1:
                eps = abs(float(params["epsilon"][i])) if self.sparsification == DELLA else 0.0
                r = 1.0 / max(d - eps, 1e-3)
            scale = scale + (lam * abs(w) * r / divisor) * (x.to(cdt) - base.to(cdt)).abs()
        return scale


# --------------------------------------------------------------------------------------------------
# The arithmetic


def merge(
    inputs, params: dict, sparsification: str | None, consensus: str | None, ctx: Context, *, fast: bool
):
    """One output tensor of a task-arithmetic method (the module docstring's steps 1-5)."""
    import torch

    base, others = inputs[0], list(inputs[1:])
    if not others:
        return base.clone()
    dtype = base.dtype
    weights = list(params["weight"])
    stacked = torch.empty((len(others), *base.shape), dtype=dtype, device=base.device)
    # The deltas are independent: on the CPU, sparsify them concurrently (torch's sorts are single-threaded),
    # each into its own row, so the result does not depend on the number of threads.
    workers = min(len(others), max(int(ctx.threads), 1)) if fast and sparsification is not None else 1
    if base.device.type != "cpu" or base.numel() < PARALLEL_MIN_NUMEL:
        workers = 1
    sub = ctx if workers == 1 else dataclasses.replace(ctx, threads=max(1, int(ctx.threads) // workers))

    rows = list(stacked.unbind(0))

    def one(i: int) -> None:
        delta = torch.sub(others[i], base, out=rows[i])
        if sparsification is not None:
            rows[i].copy_(sparsify(delta, i, params, sparsification, sub, fast=fast))

    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers, thread_name_prefix="mkf-sparsify") as pool:
            for _ in pool.map(one, range(len(others))):
                pass
    else:
        for i in range(len(others)):
            one(i)
    rows.clear()
    w = torch.tensor(weights, dtype=dtype, device=base.device).view(-1, *([1] * base.dim()))
    stacked.mul_(w)
    if consensus is not None:
        sign = stacked.sign()
        if consensus == SUM:
            vote = stacked.sum(dim=0)
        elif consensus == COUNT:
            vote = sign.sum(dim=0)
        else:
            raise ValueError(f"unknown consensus {consensus!r}")
        majority = torch.where(vote >= 0, 1, -1).to(dtype)
        del vote
        agree = sign == majority
        del sign, majority
        mixed = (stacked * agree).sum(dim=0)
        divisor = None
        if params.get("normalize"):
            divisor = (w * agree).sum(dim=0)
            divisor = torch.where(divisor == 0, 1, divisor)
        del agree
    else:
        mixed = stacked.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor = torch.where(divisor.abs() < DIVISOR_EPS, 1, divisor)
    del stacked
    if params.get("normalize"):
        mixed = mixed / divisor
    lam = float(params.get("lambda", 1.0))
    if lam != 1:
        mixed = mixed * lam
    return (base + mixed).to(dtype)


def work_dtype(dtype, precise: bool):
    """The dtype mergekit's random sparsifiers work in on the CPU (bf16 stays, others become fp32); with
    ``precise``: fp64 for fp64, else fp32."""
    import torch

    if precise:
        return torch.float64 if dtype == torch.float64 else torch.float32
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def sparsify(delta, index: int, params: dict, method: str, ctx: Context, *, fast: bool):
    """The sparsified delta of non-base model ``index`` (its stream of random draws), in delta's dtype."""
    import torch

    density = float(params["density"][index])
    if density >= 1:
        return delta
    rescale = bool(params.get("rescale"))
    precise = bool(params.get("precise_sparsify"))
    dtype = delta.dtype
    n = delta.numel()
    if method == MAGNITUDE:
        if density <= 0 or n == 0:
            return torch.zeros_like(delta)
        k = max(1, int(density * n))
        keep = magnitude_keep(delta, k, fast=fast)
        return _rescaled(delta, keep.view(delta.shape), rescale, precise).to(dtype)
    if method == MAGNITUDE_OUTLIERS:
        target = int(density * n)
        top = int(float(params["gamma"][index]) * n)
        bot = max(0, n - target - top)
        start, stop, _ = slice(bot, bot + target).indices(n)
        keep = outliers_keep(delta, start, stop, fast=fast)
        return _rescaled(delta, keep.view(delta.shape), rescale, precise).to(dtype)
    seed = _seed(ctx)
    wd = work_dtype(dtype, precise)
    if method == RANDOM:
        p = torch.full((), density, dtype=wd)
        keep = _draw(
            float(p), seed, ctx.name, index, delta.shape, delta.device, fast=fast, threads=ctx.threads
        )
        return _rescaled(delta.to(wd), keep, rescale, precise).to(dtype)
    if method == DELLA:
        if density <= 0:
            return torch.zeros_like(delta)
        probs = della_probabilities(delta, density, float(params["epsilon"][index]), wd, ctx.name, fast=fast)
        keep = _draw(probs, seed, ctx.name, index, delta.shape, delta.device, fast=fast, threads=ctx.threads)
        return _rescaled(delta.to(wd), keep, rescale, precise).to(dtype)
    raise ValueError(f"unknown sparsification {method!r}")


def _seed(ctx: Context) -> int:
    if ctx.seed is None:
        raise ValueError(f"{ctx.name}: a random merge method needs a seed (the engine always passes one)")
    return int(ctx.seed)


def _rescaled(t, keep, rescale: bool, precise: bool):
    """t * keep, times ||t||_1 / ||t * keep||_1 when ``rescale`` (mergekit's rescaled_masked_tensor with
    the L1 norm); in t's dtype, or in fp32/fp64 with ``precise`` (the caller rounds to its dtype)."""
    import torch

    masked = t * keep  # keep: bool or 0/1 (a bool factor multiplies as 0/1 in t's dtype)
    if not rescale:
        return masked
    before, after = l1_norm(t), l1_norm(masked)
    if precise:
        if before < RESCALE_EPS or after < RESCALE_EPS:
            return masked
        return masked.to(torch.float64 if t.dtype == torch.float64 else torch.float32) * (before / after)
    b = torch.tensor(before, dtype=torch.float64).to(t.dtype)
    a = torch.tensor(after, dtype=torch.float64).to(t.dtype)
    if bool(b < RESCALE_EPS) or bool(a < RESCALE_EPS):
        return masked
    return masked * (b / a).to(t.device)


def l1_norm(t) -> float:
    """sum |t| in fp64: fixed blocks of L1_BLOCK elements (each summed by one thread), then math.fsum, so
    the value does not depend on the thread count or the device."""
    import torch

    flat = t.reshape(-1)
    n = flat.numel()
    parts: list[float] = []
    for s in range(0, n, L1_CHUNK):
        c = flat[s : s + L1_CHUNK].abs()  # exact in any dtype; accumulated in fp64 below
        m = c.numel() // L1_BLOCK * L1_BLOCK
        if m:
            parts.extend(torch.sum(c[:m].view(-1, L1_BLOCK), dim=1, dtype=torch.float64).tolist())
        if m < c.numel():
            parts.append(float(torch.sum(c[m:], dtype=torch.float64)))
    return math.fsum(parts)


# --------------------------------------------------------------------------------------------------
# Magnitude selection, and the tie rule


def sort_keys(magnitudes):
    """int32 keys that order fp32 magnitudes (>= 0 or NaN) as torch's CPU comparators do: by value, every
    NaN equal to every other and above +inf."""
    import torch

    w = magnitudes.reshape(-1).to(torch.float32)
    keys = w.view(torch.int32).clone()
    keys[torch.isnan(w)] = NAN_KEY
    return keys


def magnitude_keep(delta, k: int, *, fast: bool):
    """Bool mask (flat) of the k elements of largest |delta| that mergekit 0.1.5 keeps: the first k of
    ``torch.argsort(|delta|.float(), descending=True)`` on the CPU."""
    import torch

    w = delta.abs().reshape(-1).float()
    n = w.numel()
    keep = torch.zeros(n, dtype=torch.bool, device=w.device)
    if fast:
        mask = _unambiguous_top(w, k) if _ties_rare(delta) else None
        if mask is not None:
            return mask
        if not sorts_like_mergekit(w.device):
            perm = introsort_select(sort_keys(w), [k], descending=True)
            if perm is not None:
                keep[perm[:k].long()] = True
                return keep
            w = w.cpu()
    order = torch.argsort(w, descending=True)[:k]
    keep[order.to(keep.device)] = True
    return keep


def outliers_keep(delta, start: int, stop: int, *, fast: bool):
    """Bool mask (flat) of positions [start, stop) of ``torch.sort(|delta|.float()).indices`` (CPU)."""
    import torch

    w = delta.abs().reshape(-1).float()
    n = w.numel()
    keep = torch.zeros(n, dtype=torch.bool, device=w.device)
    if stop <= start:
        return keep
    if fast:
        mask = _unambiguous_range(w, start, stop) if _ties_rare(delta) else None
        if mask is not None:
            return mask
        if not sorts_like_mergekit(w.device):
            perm = introsort_select(sort_keys(w), [start, stop], descending=False)
            if perm is not None:
                keep[perm[start:stop].long()] = True
                return keep
            w = w.cpu()
    order = torch.sort(w, descending=False).indices[start:stop]
    keep[order.to(keep.device)] = True
    return keep


def sorts_like_mergekit(device) -> bool:
    """Whether torch.sort on ``device`` orders ties as mergekit 0.1.5's CPU sort (libstdc++'s introsort).
    Elsewhere (CUDA's sorts are radix sorts: stable) selections follow ``introsort_select`` on the device,
    and DELLA's ranks are sorted on the CPU."""
    import torch

    return torch.device(device).type == "cpu"


def _unambiguous_top(w, k: int):
    """The top-k mask by value alone, when no tie straddles the k-th largest value and nothing is NaN;
    None otherwise. O(n). Worth trying only where ties are rare (fp32/fp64 magnitudes)."""
    import torch

    n = w.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=w.device)
    if n < 2 * INSERTION_THRESHOLD or bool(torch.isnan(w).any()):
        return None
    v = torch.kthvalue(w, n - k + 1).values
    mask = w >= v
    if int(mask.sum()) != k:
        return None
    return mask


def _unambiguous_range(w, start: int, stop: int):
    """Positions [start, stop) of the ascending order by value alone, when no tie straddles either cut."""
    import torch

    n = w.numel()
    if n < 2 * INSERTION_THRESHOLD or bool(torch.isnan(w).any()):
        return None
    lo = torch.kthvalue(w, start + 1).values
    hi = torch.kthvalue(w, stop).values
    if start > 0 and int((w < lo).sum()) != start:
        return None
    if stop < n and int((w <= hi).sum()) != stop:
        return None
    return (w >= lo) & (w <= hi)


def _ties_rare(delta) -> bool:
    """Whether an O(n) selection by value is worth trying: magnitudes of 16-bit deltas (256 values per
    octave) tie at almost every threshold of a large tensor, fp32/fp64 ones seldom."""
    import torch

    return delta.dtype in (torch.float32, torch.float64)


def introsort_select(keys, boundaries, *, descending: bool):
    """The order in which libstdc++'s std::sort leaves ``keys``, exact at the ``boundaries`` only: a
    permutation ``perm`` (int32, positions -> original indices) such that, for consecutive boundaries
    a < b (0 and n included), set(perm[a:b]) is exactly the set std::sort puts at positions [a, b).
    None where std::sort would fall back to heapsort (depth limit), which this does not model.

    The tie rule of mergekit 0.1.5's magnitude selections is this one: torch's CPU sort (unstable) is
    libstdc++'s introsort over (key, index) pairs with the comparator ``a > b``, NaN first (descending)
    or ``a < b``, NaN last (ascending). Among equal magnitudes at a threshold neither the lowest nor the
    highest indices are kept: those introsort's partitions leave on the kept side are. Introsort, for
    a range [f, l) of more than 16 elements (depth limit 2 floor(log2 n)): move the median of positions
    f+1, mid = f + (l-f)/2, l-1 to f (__move_median_to_first); Hoare-partition [f+1, l) around it
    (__unguarded_partition: the left scan stops at elements not ordered before the pivot, the right
    scan at elements the pivot is not ordered before, swap, step); recurse on the right part, loop on
    the left; ranges of at most 16 are finished by insertion sort, which is stable. Only the ranges
    that contain a boundary strictly inside matter, so this follows those (an introselect: O(n)
    expected), each partition vectorised: the m-th swap exchanges the m-th left stop with the m-th
    right stop of the unpartitioned range while the former is left of the latter.
    """
    import torch

    n = keys.numel()
    keys = keys.clone()
    perm = torch.arange(n, dtype=torch.int32, device=keys.device)
    cuts = sorted({int(b) for b in boundaries if 0 < b < n})

    def comp(x: int, y: int) -> bool:
        return x > y if descending else x < y

    def inside(f: int, e: int) -> bool:
        return any(f < b < e for b in cuts)

    def finish(f: int, e: int) -> None:  # insertion sort: stable
        seg = keys[f:e].tolist()
        order = sorted(range(e - f), key=(lambda i: -seg[i]) if descending else (lambda i: seg[i]))
        idx = torch.tensor(order, dtype=torch.int64, device=keys.device) + f
        keys[f:e] = keys[idx].clone()
        perm[f:e] = perm[idx].clone()

    if n <= INSERTION_THRESHOLD:
        if inside(0, n):
            finish(0, n)
        return perm
    work = [(0, n, 2 * (n.bit_length() - 1))] if inside(0, n) else []
    while work:
        f, e, depth = work.pop()
        if e - f <= INSERTION_THRESHOLD:
            finish(f, e)
            continue
        if depth == 0:
            return None
        depth -= 1
        mid = f + (e - f) // 2
        a, b, c = int(keys[f + 1]), int(keys[mid]), int(keys[e - 1])
        if comp(a, b):
            m = mid if comp(b, c) else (e - 1 if comp(a, c) else f + 1)
        elif comp(a, c):
            m = f + 1
        elif comp(b, c):
            m = e - 1
        else:
            m = mid
        if m != f:
            kf, pf = int(keys[f]), int(perm[f])
            keys[f], perm[f] = keys[m].clone(), perm[m].clone()
            keys[m], perm[m] = kf, pf
        pivot = int(keys[f])
        seg, pseg = keys[f + 1 : e], perm[f + 1 : e]
        if descending:
            left, right = torch.nonzero(seg <= pivot).view(-1), torch.nonzero(seg >= pivot).view(-1)
        else:
            left, right = torch.nonzero(seg >= pivot).view(-1), torch.nonzero(seg <= pivot).view(-1)
        nl, nr = left.numel(), right.numel()
        lo, hi = 0, min(nl, nr)  # swaps: the largest m with left[m-1] < right[nr-m] (a prefix)
        while lo < hi:
            mm = (lo + hi + 1) // 2
            if int(left[mm - 1]) < int(right[nr - mm]):
                lo = mm
            else:
                hi = mm - 1
        swaps = lo
        cut = f + 1 + min(int(left[swaps]) if swaps < nl else n, int(right[nr - swaps]) if swaps else n)
        if swaps:
            il, ir = left[:swaps], right[nr - swaps :].flip(0)
            kl, kr = seg.index_select(0, il), seg.index_select(0, ir)
            seg.index_copy_(0, il, kr)
            seg.index_copy_(0, ir, kl)
            pl, pr = pseg.index_select(0, il), pseg.index_select(0, ir)
            pseg.index_copy_(0, il, pr)
            pseg.index_copy_(0, ir, pl)
        for ff, ee in ((cut, e), (f, cut)):
            if inside(ff, ee):
                work.append((ff, ee, depth))
    return perm


# --------------------------------------------------------------------------------------------------
# DELLA's keep probabilities


def della_probabilities(delta, density: float, epsilon: float, wd, name: str, *, fast: bool):
    """Per-element keep probabilities (delta's shape, dtype ``wd``) from ranks of |delta| along dim 1."""
    import torch

    t = delta.unsqueeze(0) if delta.dim() < 2 else delta
    if t.shape[1] < 2 and t.numel():
        raise ValueError(
            f"della on {name}: rows of one element have no rank range (0/0); mergekit 0.1.5 fails on them too"
        )
    magnitudes = t.abs()
    if fast and not sorts_like_mergekit(magnitudes.device):
        magnitudes = magnitudes.cpu()  # the CPU sort's tie order (see introsort_select)
    order = torch.argsort(magnitudes, dim=1, descending=False)
    if fast:
        ranks = torch.empty_like(order)
        ranks.scatter_(
            1, order, torch.arange(order.shape[1]).view(1, -1, *([1] * (order.dim() - 2))).expand_as(order)
        )
    else:
        ranks = order.argsort(dim=1)
    ranks = ranks.to(delta.device).to(wd) + 1
    if fast:
        # every row holds the ranks 0 .. m-1, and rounding to wd is monotone: the row minimum is wd(0) + 1 and
        # the maximum wd(m - 1) + 1 (torch's min/max over dim 1 of a 16-bit tensor are slow)
        lo = torch.zeros((), dtype=wd, device=ranks.device) + 1
        hi = torch.tensor(t.shape[1] - 1, dtype=wd, device=ranks.device) + 1
    else:
        lo = ranks.min(dim=1, keepdim=True).values
        hi = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    return probs.reshape(delta.shape)


# --------------------------------------------------------------------------------------------------
# Random draws (methods/rng.py's words; here computed in cache-sized chunks)


def _draw(p, seed: int, name: str, stream: int, shape, device, *, fast: bool, threads: int = 1):
    """Keep mask (bool, ``shape``): element j kept where rng.uniform(seed, name, stream)[j] < p (p a number
    or a tensor of ``shape``, compared in fp32). ``fast``: the words in chunks, on up to ``threads`` threads
    (each chunk writes its own slice, so the result does not depend on them)."""
    import torch

    from mergekit_fast.methods import rng

    if not fast:
        return rng.bernoulli(p, seed, name, stream, tuple(shape), device)
    n = math.prod(shape)
    keep = torch.empty(n, dtype=torch.bool, device=device)
    if isinstance(p, torch.Tensor):
        pf = p.reshape(-1).to(torch.float32)
    else:
        # u = (word >> 8) * 2^-24 < p  <=>  (word >> 8) < ceil(p * 2^24) (p * 2^24 is exact in fp64)
        threshold = math.ceil(float(torch.tensor(p, dtype=torch.float32)) * 2.0**24)
    cpu = torch.device(device).type == "cpu"
    step = RNG_CHUNK_BLOCKS * 4 if cpu else 1 << 24

    def chunk(s: int) -> None:
        e = min(n, s + step)
        bits = philox_words(seed, name, stream, e - s, s, device).bitwise_right_shift_(8)
        if isinstance(p, torch.Tensor):
            keep[s:e] = bits.to(torch.float32).mul_(2.0**-24) < pf[s:e]
        else:
            keep[s:e] = bits < threshold

    starts = range(0, n, step)
    workers = min(max(int(threads), 1), 4) if cpu else 1
    if workers > 1 and len(starts) > 2 * workers:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers, thread_name_prefix="mkf-philox") as pool:
            for _ in pool.map(chunk, starts):
                pass
    else:
        for s in starts:
            chunk(s)
    return keep.view(tuple(shape))


_FAST_OK: dict[str, bool] = {}


def philox_words(seed: int, name: str, stream: int, n: int, start: int = 0, device="cpu"):
    """rng.words(seed, name, stream, n, start), bit for bit, with one 64-bit product per multiply (int64
    products wrap modulo 2^64 in torch) and in-place updates. Checked against rng.words once per device
    type; rng.words itself is used where the check fails."""
    import torch

    from mergekit_fast.methods import rng

    kind = torch.device(device).type
    ok = _FAST_OK.get(kind)
    if ok is None:
        probe = (0x0123456789ABCDEF, "probe", 3, 37, 5)
        ok = _FAST_OK[kind] = bool(
            torch.equal(_philox_words(*probe, device), rng.words(*probe, device=device))
        )
        if not ok:
            import logging

            logging.getLogger("mergekit_fast").warning(
                "fast Philox disagrees with rng.words on %s; using rng.words", kind
            )
    if not ok:
        return rng.words(seed, name, stream, n, start, device)
    return _philox_words(seed, name, stream, n, start, device)


def _philox_words(seed: int, name: str, stream: int, n: int, start: int, device):
    import torch

    from mergekit_fast.methods import rng

    if n <= 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    mask = rng.MASK32
    k0, k1 = rng.seed_key(seed)
    h = rng.stream_hash(name, stream)
    first, last = start // 4, (start + n - 1) // 4
    c0 = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    c1 = torch.bitwise_right_shift(c0, 32)
    c0.bitwise_and_(mask)
    c2 = torch.full_like(c0, h & mask)
    c3 = torch.full_like(c0, h >> 32)
    p0, p1, t = torch.empty_like(c0), torch.empty_like(c0), torch.empty_like(c0)
    for r in range(rng.ROUNDS):
        torch.mul(c0, rng.M0, out=p0)
        torch.mul(c2, rng.M1, out=p1)
        torch.bitwise_right_shift(p1, 32, out=t)
        t.bitwise_and_(mask).bitwise_xor_(c1).bitwise_xor_(k0)  # c0' = hi(c2 M1) ^ c1 ^ k0
        c0, t = t, c0
        torch.bitwise_and(p1, mask, out=c1)  # c1' = lo(c2 M1)
        torch.bitwise_right_shift(p0, 32, out=t)
        t.bitwise_and_(mask).bitwise_xor_(c3).bitwise_xor_(k1)  # c2' = hi(c0 M0) ^ c3 ^ k1
        c2, t = t, c2
        torch.bitwise_and(p0, mask, out=c3)  # c3' = lo(c0 M0)
        if r + 1 < rng.ROUNDS:
            k0 = (k0 + rng.W0) & mask
            k1 = (k1 + rng.W1) & mask
    flat = torch.stack((c0, c1, c2, c3), dim=1).reshape(-1)
    off = start - first * 4
    return flat[off : off + n]
