"""Small-sample statistics for eval reports.

Evals here run on tens to hundreds of items, where a 10-point accuracy gap can
be noise; these helpers let a report say how sure it is.  Exact and
dependency-free (no scipy): McNemar uses integer binomial sums.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import numpy as np

__all__ = ["wilson_interval", "mcnemar_exact", "paired_bootstrap"]


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (95% by default).

    Chosen over the normal interval because it stays inside [0, 1] and keeps
    its coverage at small n and at accuracies near 0 or 1.  n == 0 carries no
    information and gives (0.0, 1.0).
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = (z / denom) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # Clamp float fuzz; at k == 0 or k == n one end is exactly 0 or 1.
    lo = 0.0 if k == 0 else max(0.0, center - half)
    hi = 1.0 if k == n else min(1.0, center + half)
    return lo, hi


def _as_bools(x: Sequence, name: str) -> list[bool]:
    out = []
    for v in x:
        if v not in (True, False, 0, 1):
            raise ValueError(f"{name} must hold booleans (or 0/1), got {v!r}")
        out.append(bool(v))
    return out


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict:
    """Exact McNemar test for two sources judged on the same items.

    Only discordant items carry information: b10 = a right and b wrong, b01 =
    a wrong and b right.  Under "no difference" each discordant item is a fair
    coin, so the two-sided p-value is 2 * P(Binomial(b01 + b10, 1/2) <=
    min(b01, b10)), capped at 1 (1.0 when there are no discordant items).
    """
    a = _as_bools(a_correct, "a_correct")
    b = _as_bools(b_correct, "b_correct")
    if len(a) != len(b):
        raise ValueError(f"paired lists differ in length: {len(a)} vs {len(b)}")
    b10 = sum(1 for x, y in zip(a, b) if x and not y)
    b01 = sum(1 for x, y in zip(a, b) if y and not x)
    n = b01 + b10
    if n == 0:
        p = 1.0
    else:
        tail = sum(math.comb(n, i) for i in range(min(b01, b10) + 1))
        # Exact rational arithmetic: 2**n overflows floats beyond n ~ 1000.
        p = float(min(Fraction(1), Fraction(2 * tail, 2**n)))
    return {"b01": b01, "b10": b10, "p_value": p}


def paired_bootstrap(
    a: Sequence[bool],
    b: Sequence[bool],
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Accuracy difference mean(a) - mean(b) with a paired percentile bootstrap CI.

    Items are resampled together for both sources, so per-item difficulty
    cancels out.  The generator is seeded explicitly so a report is
    reproducible.  Returns dict(diff, lo, hi).
    """
    av = np.asarray(_as_bools(a, "a"), dtype=np.float64)
    bv = np.asarray(_as_bools(b, "b"), dtype=np.float64)
    if av.shape != bv.shape:
        raise ValueError(f"paired lists differ in length: {av.size} vs {bv.size}")
    if av.size == 0:
        raise ValueError("paired_bootstrap needs at least one item")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    d = av - bv
    n = d.size
    rng = np.random.Generator(np.random.PCG64(seed))
    boots = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, 2_000_000 // n)  # bound memory for large evals
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        boots[start:stop] = d[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi)}
