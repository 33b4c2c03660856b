"""Fused MoE top-k routing (Mixtral, Qwen-MoE, DeepSeek-V2/V3 style) on every backend.

``topk_routing(logits, k, ...) -> (weights fp32 [T, k], ids int32 [T, k])``, experts in descending
selection order. The spec is ``topk_routing_ref`` (plain torch); csrc/common/routing_select.h,
triton_kernels/routing.py and the CUDA kernel perform the same fp32 operations in the same order,
so every backend returns bit-identical ids and weights (the tests hold the CPU backends to that).

Semantics, per token (row of E logits, math in fp32):
  * scores: ``softmax`` (over all E experts) or ``sigmoid``. exp is computed by ``exp_f32`` (basic
    operations only, < 2 ulp from the exact value) and the softmax denominator by an exact
    fixed-point sum, which is what makes the backends agree bit for bit.
  * selection: the experts with the k largest selection values, ties to the LOWER expert index.
    The selection value is the score plus ``bias`` (fp32 [E], DeepSeek-V3's
    e_score_correction_bias: it affects selection only, never the weights). Without a bias (and
    without a top-2-sum group stage) the logits themselves are compared: the same order as the
    scores, but free of their rounding ties (two different logits whose fp32 probabilities round
    to the same value are ordered by logit; transformers' torch.topk leaves that order unspecified).
  * groups (DeepSeek): with ``num_groups`` and ``topk_groups`` the experts are split into
    num_groups contiguous groups; a group's score is its best member's value (``"max"``) or the
    sum of its two best (``"top2_sum"``); the ``topk_groups`` best groups are kept (ties to the
    lower group index) and the other groups' experts are excluded (as a -inf mask would; see
    "Masking" below). ``group_score=None`` means "top2_sum" with a bias, else "max" (the official
    DeepSeek rule). The group stage is skipped when topk_groups == num_groups.
  * weights: the unbiased scores of the chosen experts. ``renormalize=True`` divides them by their
    sum (+1e-20, as transformers' DeepSeek-V3; a no-op for softmax, whose top score is the
    largest); for softmax this is computed as the softmax over the chosen logits, which equals
    p_i / sum(p_j) and never underflows. Then ``* scaling`` (routed_scaling_factor).
  * ``return_counts=True`` also returns ``counts`` (int32 [E], slots routed to each expert) and
    ``order`` (int32 [T*k]): the slot indices s = t*k + j sorted by expert, stable. Expert e's slots
    are ``order[offsets[e]:offsets[e] + counts[e]]`` with offsets the exclusive cumsum of counts,
    in increasing s; the token of slot s is s // k and its weight ``weights.view(-1)[s]``.

Non-finite logits (identical on every backend):
  * NaN: the expert's score is 0 and it ranks below every non-NaN expert (also below -inf), so
    NaN never wins and never duplicates an id. A NaN selection value (e.g. a NaN in ``bias``)
    ranks the same way. An all-NaN row picks experts 0..k-1 with weight 0.
  * +inf: softmax gives the +inf experts equal shares of 1 (the limit of equal large logits) and
    the others 0; sigmoid gives 1.
  * -inf: score 0 (sigmoid, or softmax next to a finite logit). An all--inf softmax row is uniform
    (the limit of equal logits): ids 0..k-1, weights 1/k renormalised, 1/E otherwise.
  Weights are always finite (for a finite ``scaling``).

Masking: transformers' DeepSeek-V3 masks dropped groups with -inf (as this op, which excludes them
entirely); its DeepSeek-V2 (softmax) and AXK2 (sigmoid + bias) routers mask with 0.0, which lets
an expert of a dropped group win when the kept groups' selection values are negative (possible
with a bias) -- this op never does (tests/test_routing.py checks the difference).

Inference only: the weights carry no gradient (no autograd formula is registered).

Limits: 1 <= k <= E <= 2**22; the cuda and triton kernels take E <= 16384 and, with a group
stage, num_groups <= 1024 (``auto`` falls back to another backend beyond that).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from mergekit_fast import _native, backends
from mergekit_fast.ops import _verify

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCORINGS = {"softmax": 0, "sigmoid": 1}
GROUP_SCORES = {"max": 0, "top2_sum": 1}
MAX_EXPERTS = 1 << 22
GPU_MAX_EXPERTS = 16384
GPU_MAX_GROUPS = 1024

# Constants of exp_f32, as exact fp32 values (csrc/common/routing_select.h spells them in hex).
_LOG2E = float.fromhex("0x1.715476p+0")
_MAGIC = 12582912.0  # 1.5 * 2**23
_LN2_HI = float.fromhex("0x1.63p-1")
_LN2_LO = float.fromhex("-0x1.bd0106p-13")
_EXP_POLY = tuple(
    float.fromhex(h)
    for h in ("0x1.a0d2cep-13", "0x1.6e879cp-10", "0x1.111210p-7", "0x1.555382p-5", "0x1.555554p-3", "0x1p-1")
)
FIXED_SCALE = 2.0**40
RENORM_EPS = float.fromhex("0x1.79ca1p-67")  # fp32(1e-20)

# verify= tolerance for weights, in fp32 ulps of the reference value. The backends are designed
# (and, on the CPU, tested) to be bit-identical; the slack only keeps a GPU compiler's corner
# case from raising in production. ids, counts and order must match exactly.
VERIFY_MAX_ULPS = 2.0


class RoutingParams(NamedTuple):
    """Validated parameters of one routing call (num_groups 0: no group stage)."""

    T: int
    E: int
    k: int
    scoring: str
    renormalize: bool
    has_bias: bool
    num_groups: int
    topk_groups: int
    group_score: str
    scaling: float

    @property
    def groups_active(self) -> bool:
        return self.num_groups > 0 and self.topk_groups < self.num_groups

    @property
    def select_on_logits(self) -> bool:
        return not self.has_bias and not (self.groups_active and self.group_score == "top2_sum")

    @property
    def need_softmax_stats(self) -> bool:
        return self.scoring == "softmax" and (not self.select_on_logits or not self.renormalize)


# ----------------------------------------------------------------------------- validation


def _check(
    logits, k, scoring, renormalize, bias, num_groups, topk_groups, group_score, scaling
) -> RoutingParams:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"topk_routing: logits must be a tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(
            f"topk_routing: logits must be 2-D [tokens, experts], got shape {tuple(logits.shape)}"
        )
    if logits.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"topk_routing: logits dtype {logits.dtype} is not supported (float32, float16, bfloat16)"
        )
    T, E = logits.shape
    if E < 1:
        raise ValueError("topk_routing: logits has 0 experts (shape [T, 0])")
    if E > MAX_EXPERTS:
        raise ValueError(f"topk_routing: {E} experts is more than the supported {MAX_EXPERTS}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"topk_routing: k must be an int, got {k!r}")
    if k < 1:
        raise ValueError(f"topk_routing: k must be >= 1, got {k}")
    if k > E:
        raise ValueError(f"topk_routing: k={k} is larger than the number of experts E={E}")
    if scoring not in SCORINGS:
        raise ValueError(f"topk_routing: scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    if not isinstance(renormalize, bool):
        raise ValueError(f"topk_routing: renormalize must be a bool, got {renormalize!r}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise ValueError(f"topk_routing: bias must be a tensor or None, got {type(bias).__name__}")
        if bias.dtype != torch.float32:
            raise ValueError(
                f"topk_routing: bias must be float32 (a rounded bias reorders experts), got {bias.dtype}"
            )
        if tuple(bias.shape) != (E,):
            raise ValueError(
                f"topk_routing: bias must have shape ({E},) to match logits, got {tuple(bias.shape)}"
            )
        if bias.device != logits.device:
            raise ValueError(f"topk_routing: bias is on {bias.device}, logits on {logits.device}")
    if (num_groups is None) != (topk_groups is None):
        raise ValueError("topk_routing: num_groups and topk_groups must be given together")
    if group_score is None:
        group_score = "top2_sum" if bias is not None else "max"
    if group_score not in GROUP_SCORES:
        raise ValueError(
            f"topk_routing: group_score must be one of {', '.join(GROUP_SCORES)}, got {group_score!r}"
        )
    ng = tg = 0
    if num_groups is not None:
        for name, v in (("num_groups", num_groups), ("topk_groups", topk_groups)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"topk_routing: {name} must be an int, got {v!r}")
        ng, tg = num_groups, topk_groups
        if ng < 1 or E % ng != 0:
            raise ValueError(f"topk_routing: num_groups={ng} must be >= 1 and divide the {E} experts")
        if not 1 <= tg <= ng:
            raise ValueError(f"topk_routing: topk_groups={tg} must be in [1, num_groups={ng}]")
        if k > tg * (E // ng):
            raise ValueError(
                f"topk_routing: k={k} is larger than the {tg * (E // ng)} experts of the {tg} kept groups"
            )
        if group_score == "top2_sum" and tg < ng and E // ng < 2:
            raise ValueError(
                f"topk_routing: group_score='top2_sum' needs >= 2 experts per group, got {E // ng}"
            )
    try:
        scaling = float(scaling)
    except (TypeError, ValueError):
        raise ValueError(f"topk_routing: scaling must be a number, got {scaling!r}") from None
    if not math.isfinite(scaling):
        raise ValueError(f"topk_routing: scaling must be finite, got {scaling}")
    return RoutingParams(T, E, k, scoring, renormalize, bias is not None, ng, tg, group_score, scaling)


# ----------------------------------------------------------------------------- reference


def exp_f32(x: torch.Tensor) -> torch.Tensor:
    """exp of an fp32 tensor with exactly the operations of csrc/common/routing_select.h."""
    nan = torch.isnan(x)
    xc = torch.where(nan, 0.0, x).clamp(-104.0, 89.0)
    n = (xc * _LOG2E + _MAGIC) - _MAGIC  # rint(x * log2(e))
    r = xc - n * _LN2_HI
    r = r - n * _LN2_LO
    z = r * r
    p = torch.full_like(r, _EXP_POLY[0])
    for c in _EXP_POLY[1:]:
        p = p * r + c
    p = (p * z + r) + 1.0
    ni = n.to(torch.int32)
    n1 = ni >> 1
    n2 = ni - n1
    y = (p * _pow2(n1)) * _pow2(n2)
    y = torch.where(x > 89.0, math.inf, y)
    y = torch.where(x < -104.0, 0.0, y)
    return torch.where(nan, x, y)


def _pow2(n: torch.Tensor) -> torch.Tensor:
    return ((n + 127) << 23).view(torch.float32)


def _softmax_numerator(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """exp(x - m), exactly 1 where x == m (m may be +-inf), 0 for NaN x."""
    e = exp_f32(torch.where(x == m, 0.0, x - m))
    return torch.where(torch.isnan(x), 0.0, e)


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    s = torch.div(torch.ones_like(x), 1.0 + exp_f32(-x))
    return torch.where(torch.isnan(x), 0.0, s)


def _rank(values: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
    """Per row (last dim): indices ordered by category ascending, then value descending, then
    index ascending (two stable sorts). Values of category > 0 are ignored."""
    v = torch.where(category == 0, values, -math.inf)
    v = torch.where(v == 0, 0.0, v)  # -0 and +0 tie
    order = torch.argsort(v, dim=-1, descending=True, stable=True)
    by_cat = torch.argsort(category.gather(-1, order), dim=-1, stable=True)
    return order.gather(-1, by_cat)


def topk_routing_ref(
    logits: torch.Tensor,
    k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    bias: torch.Tensor | None = None,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    group_score: str | None = None,
    scaling: float = 1.0,
    return_counts: bool = False,
):
    """Plain torch routing: the spec, the oracle of every backend and the fallback on any device."""
    p = _check(logits, k, scoring, renormalize, bias, num_groups, topk_groups, group_score, scaling)
    x = logits.float()
    T, E = x.shape
    nan = torch.isnan(x)

    # Scores and their statistics.
    m = torch.where(nan, -math.inf, x).amax(dim=-1, keepdim=True)
    z = torch.zeros_like(m)
    if p.scoring == "softmax":
        e = _softmax_numerator(x, m)
        q = (e * FIXED_SCALE).to(torch.int64).sum(dim=-1, keepdim=True)  # exact, order-free
        z = q.to(torch.float32) * (1.0 / FIXED_SCALE)
        s = torch.where(z > 0, e / z, 0.0)
    else:
        s = _sigmoid(x)

    # Selection values; invalid experts rank below every valid one.
    if p.select_on_logits:
        v = x
    else:
        v = s + bias if bias is not None else s
    bottom = nan | torch.isnan(v)
    category = bottom.to(torch.int64)

    if p.groups_active:
        ng, gs = p.num_groups, E // p.num_groups
        member = torch.where(bottom, -math.inf, v).view(T, ng, gs)
        in_group = _rank(v.view(T, ng, gs), category.view(T, ng, gs))
        gval = member.gather(-1, in_group[..., :1]).squeeze(-1)
        if p.group_score == "top2_sum":
            gval = gval + member.gather(-1, in_group[..., 1:2]).squeeze(-1)
        gorder = _rank(gval, torch.isnan(gval).to(torch.int64))
        kept = torch.zeros(T, ng, dtype=torch.bool, device=x.device)
        kept.scatter_(1, gorder[:, : p.topk_groups], True)
        excluded = ~kept.repeat_interleave(gs, dim=1)
        category = torch.where(excluded, 2, category)

    ids = _rank(v, category)[:, : p.k]

    # Weights from the chosen logits.
    sx = x.gather(1, ids)
    if p.scoring == "softmax" and p.renormalize:
        m_sel = torch.where(torch.isnan(sx), -math.inf, sx).amax(dim=-1, keepdim=True)
        t = _softmax_numerator(sx, m_sel)
    elif p.scoring == "softmax":
        t = torch.where(z > 0, _softmax_numerator(sx, m) / z, 0.0)
    else:
        t = _sigmoid(sx)
    if p.renormalize:
        den = t[:, 0]
        for j in range(1, p.k):  # left to right, as every backend sums
            den = den + t[:, j]
        t = t / (den + RENORM_EPS).unsqueeze(1)
    weights = (t * torch.tensor(p.scaling, dtype=torch.float32)).contiguous()
    ids = ids.to(torch.int32).contiguous()
    if not return_counts:
        return weights, ids
    counts, order = routing_counts_ref(ids, E)
    return weights, ids, counts, order


def routing_counts_ref(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts int32 [E], slot order int32 [T*k] sorted by expert, stable) of an ids tensor."""
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts).to(torch.int32)
    order = torch.argsort(flat, stable=True).to(torch.int32)
    return counts, order


# ----------------------------------------------------------------------------- backends


def _native_args(logits, bias, p: RoutingParams, w, ids):
    return (
        _native.dtype_tag(logits.dtype),
        logits.data_ptr(),
        0 if bias is None else bias.data_ptr(),
        w.data_ptr(),
        ids.data_ptr(),
        p.T,
        p.E,
        p.k,
        SCORINGS[p.scoring],
        p.renormalize,
        p.num_groups,
        p.topk_groups,
        GROUP_SCORES[p.group_score],
        p.scaling,
    )


def _run_cpp(logits, bias, p, w, ids) -> None:
    _native.C.topk_routing_cpu(*_native_args(logits, bias, p, w, ids), torch.get_num_threads())


def _run_cuda(logits, bias, p, w, ids) -> None:
    stream = torch.cuda.current_stream(logits.device).cuda_stream
    _native.C.topk_routing_cuda(*_native_args(logits, bias, p, w, ids), stream)


def _run_triton(logits, bias, p, w, ids) -> None:
    from mergekit_fast.triton_kernels import routing as tk

    tk.topk_routing(logits, bias, p, w, ids)


def _run_torch(logits, bias, p, w, ids) -> None:
    rw, rids = topk_routing_ref(
        logits, p.k, scoring=p.scoring, renormalize=p.renormalize, bias=bias,
        num_groups=p.num_groups or None, topk_groups=p.topk_groups or None,
        group_score=p.group_score, scaling=p.scaling,
    )  # fmt: skip
    w.copy_(rw)
    ids.copy_(rids)


def _counts_cpp(ids, E, counts, order) -> None:
    _native.C.routing_counts_cpu(ids.data_ptr(), ids.numel(), E, counts.data_ptr(), order.data_ptr(),
                                 torch.get_num_threads())  # fmt: skip


def _counts_cuda(ids, E, counts, order) -> None:
    C = _native.C
    n = ids.numel()
    ws = torch.empty(C.routing_counts_cuda_workspace_bytes(n, E), dtype=torch.uint8, device=ids.device)
    stream = torch.cuda.current_stream(ids.device).cuda_stream
    C.routing_counts_cuda(ids.data_ptr(), n, E, counts.data_ptr(), order.data_ptr(), ws.data_ptr(), stream)


def _counts_triton(ids, E, counts, order) -> None:
    from mergekit_fast.triton_kernels import routing as tk

    tk.routing_counts(ids, E, counts, order)


def _counts_torch(ids, E, counts, order) -> None:
    c, o = routing_counts_ref(ids, E)
    counts.copy_(c)
    order.copy_(o)


_RUNNERS = {"cpp": _run_cpp, "cuda": _run_cuda, "triton": _run_triton, "torch": _run_torch}
_COUNTERS = {"cpp": _counts_cpp, "cuda": _counts_cuda, "triton": _counts_triton, "torch": _counts_torch}


def _gpu_kernel_limit(p: RoutingParams) -> str | None:
    if p.E > GPU_MAX_EXPERTS:
        return f"E={p.E} experts (the kernel takes up to {GPU_MAX_EXPERTS})"
    if p.groups_active and p.num_groups > GPU_MAX_GROUPS:
        return f"num_groups={p.num_groups} (the kernel takes up to {GPU_MAX_GROUPS})"
    return None


_SELECT_CACHE: dict = {}


def _select_backend(device: torch.device, requested: str | None, p: RoutingParams) -> str:
    limit = _gpu_kernel_limit(p)
    # Availability does not change within a process; the environment variables that steer the
    # choice may, and are part of the key (read only when they matter: this is per call).
    env = os.environ.get(backends.ENV_BACKEND) if requested in (None, "auto") else None
    interp = os.environ.get("TRITON_INTERPRET") if "triton" in (requested, env) else None
    key = (device.type, requested, limit is None, env, interp)
    name = _SELECT_CACHE.get(key)
    if name is not None:
        return name
    implemented = backends.BACKENDS
    if limit is not None:
        req = (requested or backends.default_backend()).lower()
        if req in ("cuda", "triton"):
            raise backends.BackendUnavailable(f"topk_routing: the {req} backend cannot route {limit}")
        implemented = ("cpp", "torch")
    name = backends.select("topk_routing", device, requested, implemented=implemented)
    _SELECT_CACHE[key] = name
    return name


def _topk_routing_impl(logits, bias, p: RoutingParams, backend: str, return_counts: bool):
    """(weights, ids), plus (counts, order) with return_counts."""
    if not logits.is_contiguous():
        logits = logits.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    name = _select_backend(logits.device, backend, p)
    w = logits.new_empty((p.T, p.k), dtype=torch.float32)  # new_empty: the cheapest allocation
    ids = logits.new_empty((p.T, p.k), dtype=torch.int32)
    if p.T > 0:
        _RUNNERS[name](logits, bias, p, w, ids)
    if not return_counts:
        return w, ids
    counts = torch.zeros(p.E, dtype=torch.int32, device=logits.device)
    order = torch.empty(p.T * p.k, dtype=torch.int32, device=logits.device)
    if p.T > 0:
        _COUNTERS[name](ids, p.E, counts, order)
    return w, ids, counts, order


# ----------------------------------------------------------------------------- torch.library op


@torch.library.custom_op("mergekit_fast::topk_routing", mutates_args=())
def _topk_routing_op(
    logits: torch.Tensor,
    k: int,
    scoring: str,
    renormalize: bool,
    bias: torch.Tensor | None,
    num_groups: int,
    topk_groups: int,
    group_score: str,
    scaling: float,
    backend: str,
    return_counts: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routing op for torch.compile / CUDA graphs: num_groups 0 means no group stage; counts
    and order are empty tensors unless return_counts."""
    p = _check(logits, k, scoring, renormalize, bias, num_groups or None, topk_groups if num_groups else None,
               group_score, scaling)  # fmt: skip
    out = _topk_routing_impl(logits, bias, p, backend, return_counts)
    if not return_counts:
        empty = torch.empty(0, dtype=torch.int32, device=logits.device)
        out = (*out, empty, empty.clone())
    return out


@_topk_routing_op.register_fake
def _topk_routing_fake(logits, k, scoring, renormalize, bias, num_groups, topk_groups, group_score, scaling,
                       backend, return_counts):  # fmt: skip
    T, E = logits.shape
    w = logits.new_empty((T, k), dtype=torch.float32)
    ids = logits.new_empty((T, k), dtype=torch.int32)
    counts = logits.new_empty((E,) if return_counts else (0,), dtype=torch.int32)
    order = logits.new_empty((T * k,) if return_counts else (0,), dtype=torch.int32)
    return w, ids, counts, order


# ----------------------------------------------------------------------------- public API


def _verify_routing(name, logits, bias, p: RoutingParams, out) -> None:
    ref = topk_routing_ref(
        logits.detach().cpu(), p.k, scoring=p.scoring, renormalize=p.renormalize,
        bias=None if bias is None else bias.detach().cpu(), num_groups=p.num_groups or None,
        topk_groups=p.topk_groups or None, group_score=p.group_score, scaling=p.scaling,
        return_counts=len(out) == 4,
    )  # fmt: skip
    label = f"topk_routing[{name}]"
    if not torch.equal(out[1].cpu(), ref[1]):
        bad = (out[1].cpu() != ref[1]).any(dim=1).nonzero().flatten()
        raise _verify.VerificationError(
            f"{label}: expert ids differ from the torch reference in {bad.numel()} of {p.T} tokens "
            f"(first: token {int(bad[0])})"
        )
    _verify.check(f"{label} weights", out[0].cpu(), ref[0], max_ulps=VERIFY_MAX_ULPS)
    if len(out) == 4 and not (torch.equal(out[2].cpu(), ref[2]) and torch.equal(out[3].cpu(), ref[3])):
        raise _verify.VerificationError(f"{label}: counts/order differ from the torch reference")


def topk_routing(
    logits: torch.Tensor,
    k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    bias: torch.Tensor | None = None,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    group_score: str | None = None,
    scaling: float = 1.0,
    backend: str = "auto",
    verify: bool = False,
    return_counts: bool = False,
):
    """Top-k expert routing of ``logits`` [T, E] (fp32, bf16 or fp16; math in fp32).

    Arguments (see the module docstring for the exact semantics):
        k: experts per token, 1 <= k <= E.
        scoring: "softmax" or "sigmoid".
        renormalize: divide the k weights by their sum (Mixtral always; Qwen-MoE iff norm_topk_prob).
        bias: fp32 [E], added to the scores for selection only (DeepSeek-V3 e_score_correction_bias).
        num_groups, topk_groups: group-limited routing (DeepSeek n_group / topk_group).
        group_score: "max" or "top2_sum" (None: top2_sum with a bias, else max).
        scaling: multiplies the final weights (routed_scaling_factor).
        backend: "auto", "cuda", "triton", "cpp" or "torch" (default from MERGEKIT_FAST_BACKEND).
        verify: recompute with the torch reference on the CPU and raise VerificationError on a
            difference (also enabled by MERGEKIT_FAST_VERIFY=1).
        return_counts: also return counts int32 [E] and the expert-sorted slot order int32 [T*k].
    Returns:
        (weights fp32 [T, k], ids int32 [T, k]) in descending selection order, plus
        (counts, order) with return_counts=True.
    """
    p = _check(logits, k, scoring, renormalize, bias, num_groups, topk_groups, group_score, scaling)
    if torch.compiler.is_compiling():
        out = torch.ops.mergekit_fast.topk_routing(
            logits, k, p.scoring, p.renormalize, bias, p.num_groups, p.topk_groups, p.group_score,
            p.scaling, backend or "auto", return_counts,
        )  # fmt: skip
    else:
        out = _topk_routing_impl(logits, bias, p, backend, return_counts)
        if _verify.verify_enabled(verify):
            _verify_routing(_select_backend(logits.device, backend, p), logits, bias, p, out)
    return tuple(out) if return_counts else (out[0], out[1])
