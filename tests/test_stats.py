"""Report statistics pinned against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from remedi.evaluation.stats import mcnemar_exact, paired_bootstrap, wilson_interval


def test_wilson_36_of_50_by_hand():
    # p = 0.72, z^2 = 3.8414588, z^2/n = 0.0768292, denom = 1.0768292
    # centre = (0.72 + 0.0384146) / 1.0768292 = 0.7043035
    # half   = 1.959964 / 1.0768292 * sqrt(0.2016/50 + 3.8414588/10000)
    #        = 1.8201254 * sqrt(0.0044161459) = 1.8201254 * 0.0664541 = 0.1209552
    lo, hi = wilson_interval(36, 50)
    assert lo == pytest.approx(0.5833488, abs=1e-6)
    assert hi == pytest.approx(0.8252583, abs=1e-6)


def test_wilson_is_root_of_score_equation():
    # The Wilson bounds are the p0 with |phat - p0| = z * sqrt(p0 (1 - p0) / n).
    z = 1.959963984540054
    for k, n in [(36, 50), (1, 7), (130, 500), (49, 50)]:
        for p0 in wilson_interval(k, n):
            assert abs(k / n - p0) == pytest.approx(z * math.sqrt(p0 * (1 - p0) / n), abs=1e-12)


def test_wilson_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(z2 := 3.8414588206941236 / (10 + 3.8414588206941236), abs=1e-12)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(1 - z2, abs=1e-12)
    lo, hi = wilson_interval(5, 10)
    assert lo + hi == pytest.approx(1.0)  # symmetric at p = 1/2
    # Wider z, wider interval.
    lo99, hi99 = wilson_interval(36, 50, z=2.5758293035489)
    assert lo99 < 0.5833 and hi99 > 0.8253
    for bad in [(-1, 5), (6, 5), (1, -1)]:
        with pytest.raises(ValueError):
            wilson_interval(*bad)


def _pairs(b11, b10, b01, b00):
    """Build paired lists with the given 2x2 table (a first, b second)."""
    a = [True] * b11 + [True] * b10 + [False] * b01 + [False] * b00
    b = [True] * b11 + [False] * b10 + [True] * b01 + [False] * b00
    return a, b


@pytest.mark.parametrize(
    "table,b01,b10,p",
    [
        # n = 7 discordant, min = 1: 2 * (C(7,0) + C(7,1)) / 2^7 = 2 * 8 / 128
        ((20, 6, 1, 23), 1, 6, 0.125),
        # n = 10, min = 2: 2 * (1 + 10 + 45) / 1024 = 112 / 1024
        ((5, 2, 8, 5), 8, 2, 0.109375),
        # n = 5, min = 0: 2 / 32
        ((3, 5, 0, 2), 0, 5, 0.0625),
        # n = 6, min = 3: 2 * (1 + 6 + 15 + 20) / 64 > 1, capped
        ((1, 3, 3, 1), 3, 3, 1.0),
        # no discordant pairs: no evidence either way
        ((4, 0, 0, 6), 0, 0, 1.0),
    ],
)
def test_mcnemar_by_hand(table, b01, b10, p):
    a, b = _pairs(*table)
    res = mcnemar_exact(a, b)
    assert res["b01"] == b01 and res["b10"] == b10
    assert res["p_value"] == pytest.approx(p, abs=1e-15)
    # Swapping the sources swaps the counts and keeps the p-value.
    sw = mcnemar_exact(b, a)
    assert (sw["b01"], sw["b10"], sw["p_value"]) == (b10, b01, res["p_value"])


def test_mcnemar_large_counts_do_not_overflow():
    a, b = _pairs(0, 600, 600, 0)
    assert mcnemar_exact(a, b)["p_value"] == 1.0
    a, b = _pairs(0, 1100, 0, 0)
    p = mcnemar_exact(a, b)["p_value"]
    assert 0.0 <= p < 1e-300
    # Moderate imbalance: b10 = 60, b01 = 40 -> p about 0.0569 (continuity-corrected normal approx 0.0574).
    a, b = _pairs(0, 60, 40, 0)
    assert mcnemar_exact(a, b)["p_value"] == pytest.approx(0.05688793364098079, rel=1e-12)


def test_mcnemar_bad_input():
    with pytest.raises(ValueError):
        mcnemar_exact([True], [True, False])
    with pytest.raises(ValueError):
        mcnemar_exact([2], [1])
    assert mcnemar_exact(np.array([1, 0]), np.array([0, 0]))["b10"] == 1


def test_bootstrap_degenerate_cases_exact():
    a = [True, False, True, True]
    res = paired_bootstrap(a, a, n_boot=200, seed=1)
    assert res == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    res = paired_bootstrap([True] * 5, [False] * 5, n_boot=200)
    assert res == {"diff": 1.0, "lo": 1.0, "hi": 1.0}


def test_bootstrap_seeded_and_sensible():
    rng = np.random.default_rng(123)
    n = 400
    a = rng.random(n) < 0.6
    b = rng.random(n) < 0.5
    r1 = paired_bootstrap(a.tolist(), b.tolist(), n_boot=2000, seed=7)
    r2 = paired_bootstrap(a.tolist(), b.tolist(), n_boot=2000, seed=7)
    r3 = paired_bootstrap(a.tolist(), b.tolist(), n_boot=2000, seed=8)
    assert r1 == r2  # explicit seed: reproducible
    assert r1 != r3
    d = a.astype(float) - b.astype(float)
    assert r1["diff"] == pytest.approx(d.mean())
    assert r1["lo"] < r1["diff"] < r1["hi"]
    # The percentile interval should be close to the normal one for n = 400.
    half = 1.959964 * d.std(ddof=0) / math.sqrt(n)
    assert (r1["hi"] - r1["lo"]) / 2 == pytest.approx(half, rel=0.1)
    assert r1["diff"] - r1["lo"] == pytest.approx(half, rel=0.15)


def test_bootstrap_bad_input():
    with pytest.raises(ValueError):
        paired_bootstrap([], [])
    with pytest.raises(ValueError):
        paired_bootstrap([True], [True, False])
    with pytest.raises(ValueError):
        paired_bootstrap([True], [True], n_boot=0)
