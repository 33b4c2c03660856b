"""The select op: exact magnitude selections of the task-arithmetic family, native on the CPU.

``ta_select_cpu`` finds, for each non-base input, the keep rule of mergekit 0.1.5's magnitude
sparsifiers on the delta ``x - base`` (computed in the kernel, never stored): TIES' k largest |delta|
(``torch.argsort(|delta|.float(), descending=True)[:k]`` on the CPU) or breadcrumbs' positions
[start, stop) of ``torch.sort(|delta|.float())``. The result is a threshold rule on the magnitude key
(csrc/common/ta_math.h ``ta_rule_keep``) and, only where equal magnitudes straddle a cut, a tie bitmap
that says which of them torch's sort keeps (libstdc++'s introsort, which the kernel reproduces at the
cuts: ``methods/_task_arithmetic.introsort_select`` is the same model in torch). The combine op
(``ops/combine.py``) applies the rule.

The reference is ``methods._task_arithmetic.magnitude_keep`` / ``outliers_keep`` with ``fast=False``
(torch's own sort). Nothing here imports torch.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from mergekit_fast import _native

SELECT_TOP = 0  # csrc/select/select.h kSelectTop
SELECT_RANGE = 1  # kSelectRange
MAX_NUMEL = (1 << 31) - 1  # element indices are 32-bit in the kernel


@dataclass
class Selection:
    """Per input: (lo, hi, flags) of ta_rule_keep, and the address of its tie bitmap (0: none). ``keep``
    holds the bitmap memory alive."""

    rules: list[tuple[int, int, int]]
    bitmaps: list[int]
    keep: object


def ta_select_cpu(tag: int, n: int, base: int, xs: list[int], modes: list[int], a: list[int], b: list[int],
                  threads: int = 0) -> Selection:  # fmt: skip
    """Selections of ``len(xs)`` inputs (addresses of n elements of dtype ``tag``, like ``base``): mode
    SELECT_TOP keeps the ``a[i]`` largest magnitudes, SELECT_RANGE positions [a[i], b[i]) ascending."""
    if n > MAX_NUMEL:
        raise ValueError(f"ta_select_cpu: {n} elements; the kernel takes at most {MAX_NUMEL}")
    count = len(xs)
    words = (n + 63) // 64
    rules = array("I", [0] * (3 * count))
    bitmaps = array("Q", bytes(8 * max(1, words * count)))
    tables = [array("Q", xs), array("i", modes), array("q", a), array("q", b)]
    px, pm, pa, pb = (t.buffer_info()[0] for t in tables)
    used = _native.C.ta_select_cpu(tag, n, base, count, px, pm, pa, pb, rules.buffer_info()[0],
                                   bitmaps.buffer_info()[0], threads)  # fmt: skip
    if used < 0:
        raise ValueError(f"ta_select_cpu: {n} elements is too many")
    addr = bitmaps.buffer_info()[0]
    out = [addr + 8 * words * i if (used >> i) & 1 else 0 for i in range(count)]
    return Selection([tuple(rules[3 * i : 3 * i + 3]) for i in range(count)], out, bitmaps)
