"""The report's statistics against scipy, hand computations and published numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from distillab.report import stats

ACCS = [0.912, 0.905, 0.931, 0.920, 0.899]
CANDIDATE = [0.921, 0.915, 0.940, 0.918, 0.911, 0.930]
BASELINE = [0.910, 0.904, 0.925, 0.920, 0.897, 0.921]


# -- interval ---------------------------------------------------------------------------------
def test_interval_matches_scipy_t_interval() -> None:
    result = stats.interval(ACCS)
    array = np.asarray(ACCS)
    low, high = sps.t.interval(0.95, len(ACCS) - 1, loc=array.mean(), scale=sps.sem(array))
    assert result.n == 5
    assert result.mean == pytest.approx(array.mean(), abs=1e-12)
    assert result.std == pytest.approx(array.std(ddof=1), abs=1e-12)
    assert (result.low, result.high) == pytest.approx((low, high), abs=1e-12)


def test_interval_fixed_numbers() -> None:
    # 0.90, 0.92, 0.94: mean 0.92, std 0.02, half width t_{0.975,2} * 0.02 / sqrt(3) = 4.302653 * 0.011547
    result = stats.interval([0.90, 0.92, 0.94])
    assert result.mean == pytest.approx(0.92)
    assert result.std == pytest.approx(0.02)
    assert result.high - result.mean == pytest.approx(4.30265273 * 0.02 / math.sqrt(3), rel=1e-7)
    assert result.mean - result.low == pytest.approx(result.high - result.mean)


def test_interval_other_level() -> None:
    result = stats.interval(ACCS, level=0.99)
    array = np.asarray(ACCS)
    expected = sps.t.interval(0.99, len(ACCS) - 1, loc=array.mean(), scale=sps.sem(array))
    assert (result.low, result.high) == pytest.approx(expected, abs=1e-12)


def test_interval_of_nothing_and_of_one_value() -> None:
    assert stats.interval([]) == stats.Interval(0, None, None, None, None)
    one = stats.interval([0.9])
    assert (one.n, one.mean, one.std, one.low, one.high) == (1, pytest.approx(0.9), None, None, None)


def test_interval_drops_missing_and_non_finite_values() -> None:
    result = stats.interval([0.90, float("nan"), None, 0.92, float("inf"), 0.94, float("-inf")])
    assert result == stats.interval([0.90, 0.92, 0.94])
    assert result.n == 3
    only_one = stats.interval([float("nan"), 0.5, None])
    assert (only_one.n, only_one.mean, only_one.std) == (1, 0.5, None)
    assert stats.interval([float("nan"), None]).n == 0


# -- paired -----------------------------------------------------------------------------------
def test_paired_matches_scipy_ttest_rel() -> None:
    result = stats.paired(CANDIDATE, BASELINE)
    test = sps.ttest_rel(CANDIDATE, BASELINE)
    ci = test.confidence_interval(0.95)
    diffs = np.subtract(CANDIDATE, BASELINE)
    assert result.n == 6
    assert result.mean == pytest.approx(diffs.mean(), abs=1e-9)
    assert result.sd == pytest.approx(diffs.std(ddof=1), rel=1e-6)
    assert result.p == pytest.approx(test.pvalue, rel=1e-6)
    assert (result.low, result.high) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_paired_ci_matches_a_hand_computation() -> None:
    diffs = [c - b for c, b in zip(CANDIDATE, BASELINE)]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = sps.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    t_stat = mean / (sd / math.sqrt(n))
    p = 2 * sps.t.sf(abs(t_stat), n - 1)
    result = stats.paired(CANDIDATE, BASELINE)
    assert (result.low, result.high) == pytest.approx((mean - half, mean + half), abs=1e-9)
    assert result.p == pytest.approx(p, rel=1e-6)


def test_paired_fixed_numbers() -> None:
    # diffs 0.01, 0.02, 0.03: mean 0.02, sd 0.01, t = 0.02 / (0.01 / sqrt 3) = 3.4641, df 2
    result = stats.paired([0.91, 0.92, 0.93], [0.90, 0.90, 0.90])
    assert result.mean == pytest.approx(0.02)
    assert result.sd == pytest.approx(0.01)
    assert result.p == pytest.approx(0.0741799, rel=1e-5)
    assert result.high - result.mean == pytest.approx(4.30265273 * 0.01 / math.sqrt(3), rel=1e-6)


def test_paired_sign_follows_candidate_minus_baseline() -> None:
    forward, backward = stats.paired(CANDIDATE, BASELINE), stats.paired(BASELINE, CANDIDATE)
    assert forward.mean > 0 and backward.mean == pytest.approx(-forward.mean)
    assert backward.p == pytest.approx(forward.p)
    assert (backward.low, backward.high) == pytest.approx((-forward.high, -forward.low))


def test_paired_no_difference_at_all_is_p_one() -> None:
    result = stats.paired([0.9, 0.8, 0.7], [0.9, 0.8, 0.7])
    assert (result.n, result.mean, result.sd, result.low, result.high, result.p) == (3, 0.0, 0.0, 0.0, 0.0, 1.0)


def test_paired_the_same_nonzero_difference_is_p_zero() -> None:
    result = stats.paired([0.75, 0.85, 0.65, 0.55], [0.5, 0.6, 0.4, 0.3])
    assert result.mean == pytest.approx(0.25)
    assert result.sd == 0.0
    assert result.p == 0.0
    assert result.low == result.mean == result.high


@pytest.mark.parametrize(
    ("candidate", "baseline"),
    [
        ([0.91, 0.92, 0.93], [0.90, 0.91, 0.92]),
        # here the float differences are not all equal: scipy alone finds a spread of ~1e-17
        ([0.71, 0.83, 0.94], [0.70, 0.82, 0.93]),
    ],
)
def test_paired_floating_noise_is_zero_spread(candidate: list[float], baseline: list[float]) -> None:
    result = stats.paired(candidate, baseline)
    assert result.mean == pytest.approx(0.01)
    assert result.sd == 0.0
    assert result.p == 0.0
    assert result.low == result.mean == result.high


def test_paired_noise_case_really_has_float_noise() -> None:
    """The second case above is a real test of the rounding: the raw differences differ."""
    diffs = np.subtract([0.71, 0.83, 0.94], [0.70, 0.82, 0.93])
    assert diffs.std(ddof=1) > 0
    assert sps.ttest_rel([0.71, 0.83, 0.94], [0.70, 0.82, 0.93]).pvalue > 0


def test_paired_below_two_pairs_has_no_p() -> None:
    assert stats.paired([], []) == stats.Paired(0, None, None, None, None, None)
    one = stats.paired([0.9], [0.8])
    assert one.n == 1 and one.mean == pytest.approx(0.1)
    assert (one.sd, one.low, one.high, one.p) == (None, None, None, None)


def test_paired_unequal_lengths_raise() -> None:
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired([0.9, 0.8], [0.9])


# -- holm -------------------------------------------------------------------------------------
def holm_reference(p_values: list[float | None]) -> list[float | None]:
    """Holm written another way: for each p, the largest (m - rank_j) * p_j, capped at 1, over
    the p_j sorted at or before it."""
    tested = [p for p in p_values if p is not None]
    m = len(tested)
    ordered = sorted(tested)
    out: list[float | None] = []
    for p in p_values:
        if p is None:
            out.append(None)
            continue
        out.append(max(min(1.0, (m - rank) * q) for rank, q in enumerate(ordered) if q <= p))
    return out


def test_holm_textbook_example() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, max(0.03, 2*0.03), max(0.06, 1*0.04)
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_keeps_none_in_place_and_does_not_count_it() -> None:
    adjusted = stats.holm([0.01, None, 0.04, 0.03, None, 0.005])
    assert adjusted[1] is None and adjusted[4] is None
    assert [adjusted[i] for i in (0, 2, 3, 5)] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([None, None]) == [None, None]
    assert stats.holm([]) == []


def test_holm_single_value_is_unchanged() -> None:
    assert stats.holm([0.03]) == pytest.approx([0.03])


def test_holm_caps_at_one() -> None:
    assert stats.holm([0.5, 0.6, 0.9]) == pytest.approx([1.0, 1.0, 1.0])
    assert stats.holm([0.001, 0.7, 0.8]) == pytest.approx([0.003, 1.0, 1.0])


def test_holm_ties_get_the_same_value() -> None:
    adjusted = stats.holm([0.02, 0.02, 0.5])
    assert adjusted == pytest.approx([0.06, 0.06, 0.5])
    assert adjusted == pytest.approx(holm_reference([0.02, 0.02, 0.5]))


@pytest.mark.parametrize("seed", range(5))
def test_holm_matches_a_reference_on_random_p_values(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p_values: list[float | None] = [float(p) for p in rng.uniform(0, 0.2, size=12)]
    p_values[3] = None
    p_values[7] = None
    adjusted = stats.holm(p_values)
    assert [a is None for a in adjusted] == [p is None for p in p_values]
    expected = holm_reference(p_values)
    assert [a for a in adjusted if a is not None] == pytest.approx([e for e in expected if e is not None])
    # never below the raw p, at most 1, and monotone in the order of the raw p-values
    pairs = sorted((p, a) for p, a in zip(p_values, adjusted) if p is not None)
    assert all(p <= a <= 1.0 for p, a in pairs)
    assert all(a1 <= a2 for (_, a1), (_, a2) in zip(pairs, pairs[1:]))


# -- verdict ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mean", "p_adjusted", "n", "expected"),
    [
        (0.02, 0.01, 6, "better"),
        (-0.02, 0.01, 6, "worse"),
        (0.02, 0.2, 6, "not distinguishable"),
        (-0.02, 0.2, 6, "not distinguishable"),
        (0.02, 0.05, 6, "not distinguishable"),  # at alpha is not below alpha
        (0.0, 0.0, 6, "not distinguishable"),
        (0.02, 0.0, 2, "better"),
        (0.02, None, 1, "fewer than 2 pairs (1)"),
        (None, None, 0, "fewer than 2 pairs (0)"),
        (0.02, None, 5, "fewer than 2 pairs (5)"),
    ],
)
def test_verdict(mean: float | None, p_adjusted: float | None, n: int, expected: str) -> None:
    assert stats.verdict(mean, p_adjusted, n) == expected


def test_verdict_other_alpha() -> None:
    assert stats.verdict(0.02, 0.03, 6, alpha=0.01) == "not distinguishable"
    assert stats.verdict(0.02, 0.03, 6, alpha=0.05) == "better"


# -- power ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("effect", "pairs"), [(0.5, 34), (0.8, 15), (1.0, 10)])
def test_pairs_for_power_matches_published_sample_sizes(effect: float, pairs: int) -> None:
    """Two-sided paired t-test, alpha 0.05, power 0.8 (as in G*Power and Cohen's tables)."""
    assert stats.pairs_for_power(effect, 1.0) == pairs
    # the same effect in accuracy units: 0.01 mean difference with sd 0.01 / effect
    assert stats.pairs_for_power(-0.01, 0.01 / effect) == pairs
    # and it is the fewest such pairs
    assert stats.paired_power(pairs, effect) >= 0.8 > stats.paired_power(pairs - 1, effect)


def test_paired_power_agrees_with_a_simulation() -> None:
    rng = np.random.default_rng(12345)
    trials, n, effect = 20_000, 34, 0.5
    diffs = rng.normal(effect, 1.0, size=(trials, n))
    simulated = float(np.mean(sps.ttest_1samp(diffs, 0.0, axis=1).pvalue < 0.05))
    assert simulated == pytest.approx(stats.paired_power(n, effect), abs=0.02)
    assert simulated == pytest.approx(0.808, abs=0.02)


def test_paired_power_of_no_effect_is_alpha() -> None:
    assert stats.paired_power(10, 0.0) == pytest.approx(0.05)


def test_paired_power_grows_with_n() -> None:
    powers = [stats.paired_power(n, 0.4) for n in range(2, 80)]
    assert all(a < b for a, b in zip(powers, powers[1:]))
    assert powers[0] < 0.1 and powers[-1] > 0.9


def test_pairs_for_power_without_a_difference_is_none() -> None:
    assert stats.pairs_for_power(0.0, 0.01) is None
    assert stats.pairs_for_power(0.0, 0.0) is None
    assert stats.pairs_for_power(None, 0.01) is None
    assert stats.pairs_for_power(0.01, None) is None


def test_pairs_for_power_without_spread_is_two() -> None:
    assert stats.pairs_for_power(0.01, 0.0) == 2
    assert stats.pairs_for_power(-0.003, 0.0) == 2


def test_pairs_for_power_beyond_the_limit_is_none() -> None:
    # effect 1e-4 would need ~8e8 pairs
    assert stats.pairs_for_power(1e-6, 0.01) is None


def test_pairs_for_power_large_effect_needs_few_pairs() -> None:
    n = stats.pairs_for_power(5.0, 1.0)
    assert n is not None and 2 <= n <= 4
    assert stats.paired_power(n, 5.0) >= 0.8
