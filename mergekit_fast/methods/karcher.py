"""karcher: the Riemannian (Karcher) mean of the models on the hypersphere, rescaled (mergekit 0.1.5
merge_methods/karcher.py; arXiv 2603.04972).

Every input (the base, if any, is just another input) gets the same weight 1/N. Each tensor, as one
flattened vector, is split into its norm (fp32; fp64 for fp64 inputs) and its direction (in the input
dtype; a zero tensor has a zero direction). Directions of inputs with norm <= ``tol`` are left out
(all left out: the result is zero). Starting from the normalised weighted mean direction (the first
direction when that mean is shorter than ``tol``), up to ``max_iter`` steps of the fixed-point iteration
move the estimate m along the weighted sum of the log maps theta_i / sin(theta_i) (u_i - cos(theta_i) m)
(inputs with theta_i < ``tol`` contribute nothing), stopping when that step is shorter than ``tol``,
and renormalise. The result is (sum_i |x_i| / N) m, in the input dtype.

The iteration is mergekit's, step for step and in the same dtypes (directions, dot products and
angles in the input dtype; norms in fp32), so on the CPU it takes the same branches and gives the same
bits: there is no tolerance of our own. Its per-step host reads (``.item()``) decide branches (skip an
input, stop), which is a synchronisation per step on a GPU, not a difference in the result.
"""

from __future__ import annotations

from mergekit_fast.methods.base import (
    BasePolicy,
    Context,
    Contract,
    MergeMethod,
    Param,
    Planned,
    Scope,
    passthrough_of,
)


class _TorchSums:
    """mergekit's reductions: vector norms in fp32 (fp64 for fp64 tensors), dot products in the dtype."""

    def norms(self, xs, acc):
        import torch

        return [torch.linalg.vector_norm(x.to(acc)) for x in xs]

    def dots(self, mean, dirs):
        import torch

        flat = mean.flatten()
        return [torch.dot(flat, u.flatten()) for u in dirs]


class _GramSums(_TorchSums):
    """The dot products from the gram op: fp64 sums of the exact products of 16-bit values, rounded to
    fp32 then to the dtype. torch.dot adds the unrounded products in fp32 (tests/test_methods_gram.py),
    so the values are torch's except where its fp32 rounding error crosses a rounding boundary of the
    16-bit dtype; and all the dots of a step take one pass over the tensors, instead of one torch.dot
    each (torch.dot of bf16 vectors is slow: 30 ms per 1.5M elements, a third of karcher's time).
    The norms stay torch's: they are fp32 values, and over millions of elements torch's fp32 sum is
    several fp32 ulps from the exact one, which moves 6% of the output elements by an ulp (measured on
    3 x 1.5M bf16 elements); torch's values give mergekit's bits."""

    def __init__(self, threads: int = 0):
        self.threads = threads

    def dots(self, mean, dirs):
        import torch

        from mergekit_fast.ops.gram import gram

        if mean.numel() > 1 << 24:  # torch's fp32 lanes drift by an ulp of the dtype (methods/nuslerp.py)
            return super().dots(mean, dirs)
        g = gram([mean, *dirs], threads=self.threads)[0, 1:]
        return list(g.to(torch.float32).to(mean.dtype).unbind())


def karcher_mean(tensors, alphas, max_iter: int = 10, tol: float = 1e-5, sums=None):
    """The weighted Karcher mean of ``tensors`` (weights ``alphas``) times their weighted mean norm.
    ``sums`` computes the norms and dot products (default: torch, as mergekit)."""
    import torch

    if len(tensors) == 1:
        return tensors[0]
    sums = sums or _TorchSums()
    acc = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = sums.norms(tensors, acc)
    units = [
        torch.zeros_like(x) if nrm.item() == 0.0 else (x / nrm).to(x.dtype) for x, nrm in zip(tensors, norms)
    ]
    keep = [i for i, nrm in enumerate(norms) if nrm.item() > tol]
    if not keep:
        return sum(x * 0 for x in tensors)  # every input vanishes: zero (NaN where an input is not finite)
    kept_sum = sum(alphas[i] for i in keep)
    weights = [alphas[i] / kept_sum for i in keep]
    dirs = [units[i] for i in keep]

    mean = torch.zeros_like(dirs[0])
    for a, u in zip(weights, dirs):
        mean += a * u
    (length,) = sums.norms([mean], acc)
    mean = dirs[0].clone() if length.item() < tol else (mean / length).to(mean.dtype)

    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for a, u, dot in zip(weights, dirs, sums.dots(mean, dirs)):
            cos = torch.clamp(dot, -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue  # already at the estimate: no pull
            step += a * (theta / torch.sin(theta)) * (u - cos * mean)
        (step_len,) = sums.norms([step], acc)
        if step_len.item() < tol:
            break
        mean = (torch.cos(step_len) * mean + torch.sin(step_len) * (step / step_len)).to(mean.dtype)
        (length,) = sums.norms([mean], acc)
        if length.item() > tol:
            mean = (mean / length).to(mean.dtype)

    scale = sum(a * nrm for a, nrm in zip(alphas, norms))
    return scale * mean


def karcher_mean_native(tensors, alphas, max_iter: int, tol: float, sums, threads: int = 0):
    """karcher_mean on 16-bit contiguous CPU tensors, step for step, with each full-size elementwise
    step one native pass (csrc/gram/sphere_cpu.cpp, karcher_pass_cpu: the same roundings as torch's
    ops) and every reduction, branch and scalar still torch's (``sums``; 0-d tensors), so the result
    is karcher_mean's with the same ``sums``, bit for bit. A step's tangent sum is one pass over the
    directions instead of four torch ops per direction."""
    import torch

    from mergekit_fast.ops.gram import native_pass

    numel = tensors[0].numel()

    def native(step: int, ts, scalars=(), n=1) -> int:
        return native_pass("karcher_pass_cpu", ts, numel, step, scalars, n=n, threads=threads)

    acc = torch.float32
    norms = sums.norms(tensors, acc)
    units = [torch.empty_like(x) for x in tensors]
    native(0, [*tensors, *units], [nrm.item() for nrm in norms], n=len(tensors))
    keep = [i for i, nrm in enumerate(norms) if nrm.item() > tol]
    if not keep:
        return sum(x * 0 for x in tensors)
    kept_sum = sum(alphas[i] for i in keep)
    weights = [alphas[i] / kept_sum for i in keep]
    dirs = [units[i] for i in keep]

    mean = torch.empty_like(dirs[0])
    native(1, [*dirs, mean], weights, n=len(dirs))  # mean += a * u, from zeros
    (length,) = sums.norms([mean], acc)
    if length.item() < tol:
        mean = dirs[0].clone()
    else:
        native(2, [mean], [length.item()], n=1)  # mean / length
    step = torch.empty_like(mean)
    for _ in range(max_iter):
        ks, cs, active = [], [], []
        for a, u, dot in zip(weights, dirs, sums.dots(mean, dirs)):
            cos = torch.clamp(dot, -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            ks.append((a * (theta / torch.sin(theta))).item())
            cs.append(cos.item())
            active.append(u)
        if active:
            native(3, [*active, mean, step], [*ks, *cs], n=len(active))  # step += k (u - cos mean)
        else:
            step.zero_()
        (step_len,) = sums.norms([step], acc)
        if step_len.item() < tol:
            break
        native(
            4, [mean, step], [torch.cos(step_len).item(), torch.sin(step_len).item(), step_len.item()], n=1
        )
        (length,) = sums.norms([mean], acc)
        if length.item() > tol:
            native(2, [mean], [length.item()], n=1)

    scale = sum(a * nrm for a, nrm in zip(alphas, norms))
    out = torch.empty_like(mean)
    native(5, [mean, out], [scale.item()], n=1)
    return out


class Karcher(MergeMethod):
    name = "karcher"
    description = "Karcher (Riemannian) mean of the models' directions, times their mean norm"
    params = (
        Param("max_iter", int, Scope.SHARED, 10, doc="at most this many fixed-point steps"),
        Param("tol", float, Scope.SHARED, 1e-5, doc="stop when a step is shorter; skip shorter norms/angles"),
    )
    contract = Contract(BasePolicy.IGNORED, 1, None)
    # CPU: compute is the reference but for the dots of 16-bit inputs (see compute), which can round to
    # the neighbouring value where torch's fp32 sum sits at a rounding boundary. On another device the
    # input-dtype dot products round differently each step; after the iterations the direction moves by a few ulps of the input dtype.
    tolerance = {"bfloat16": 4.0, "float16": 4.0, "float32": 16.0, "float64": 16.0}

    def plan(self, group):
        planned = super().plan(group)
        if planned is None or planned.method != self.name:
            return planned
        if len(planned.inputs) == 1:
            return passthrough_of(planned.inputs[0])
        p = dict(planned.params)
        return Planned(
            self.name, planned.inputs, (("max_iter", int(p["max_iter"])), ("tol", float(p["tol"])))
        )

    def reference(self, inputs, params, ctx: Context):
        n = len(inputs)
        out = karcher_mean(list(inputs), [1.0 / n] * n, params.get("max_iter", 10), params.get("tol", 1e-5))
        return out.clone() if n == 1 else out

    def compute(self, inputs, params, ctx: Context, out=None):
        """The reference with its dot products from the gram op for 16-bit CPU tensors (_GramSums) and
        its elementwise steps native (karcher_mean_native); fp32 and fp64 keep torch's sums, whose order
        of additions no other sum reproduces."""
        from mergekit_fast.ops.gram import native_ready

        if len(inputs) < 2 or inputs[0].itemsize != 2 or not native_ready(inputs, ctx.backend):
            return super().compute(inputs, params, ctx, out)
        from mergekit_fast import _native

        n = len(inputs)
        args = (
            list(inputs),
            [1.0 / n] * n,
            params.get("max_iter", 10),
            params.get("tol", 1e-5),
            _GramSums(ctx.threads),
        )
        if hasattr(_native.C, "karcher_pass_cpu"):
            result = karcher_mean_native(*args, threads=ctx.threads)
        else:
            result = karcher_mean(*args)
        if out is not None:
            return out.copy_(result)
        return result

    def verify_scale(self, inputs, params):
        # the result is a unit direction times the mean norm: its elements are of the inputs' size
        import torch

        return sum(x.to(torch.float64).abs() for x in inputs) / len(inputs)


METHOD = Karcher()
