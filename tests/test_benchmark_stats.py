"""The benchmark's statistics (issue 19): paired tests, case means, the hierarchical bootstrap, Holm, the tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from mosmos.benchmark.comparisons import format_interval_table, interval_table
from mosmos.benchmark.stats import (
    MIN_NONZERO_PAIRS,
    case_matrix,
    case_means,
    compare,
    hierarchical_bootstrap,
    holm,
    paired_wilcoxon,
)


# ------------------------------------------------------------------------------------- statistics
def test_wilcoxon_matches_scipy_on_paired_samples():
    rng = np.random.default_rng(3)
    a = rng.uniform(0.4, 0.9, 25)
    b = a - rng.normal(0.03, 0.05, 25)
    b[[2, 7]] = a[[2, 7]]  # two zero differences, dropped by both
    ours = paired_wilcoxon(a, b)
    ref = scipy.stats.wilcoxon(a, b, alternative="two-sided")
    assert ours.p == pytest.approx(ref.pvalue) and ours.statistic == pytest.approx(ref.statistic)
    assert ours.n == 25 and ours.n_nonzero == 23
    assert ours.median_diff == pytest.approx(np.median(a - b))
    assert ours.format_p() == f"p={ref.pvalue:.3g}"


def test_wilcoxon_drops_nan_pairs_before_testing():
    a = [0.9, 0.8, math.nan, 0.7, 0.6, 0.75, 0.85, 0.65, 0.95]
    b = [0.5, 0.6, 0.7, math.nan, 0.55, 0.5, 0.6, 0.7, 0.4]
    keep = [i for i in range(len(a)) if not (math.isnan(a[i]) or math.isnan(b[i]))]
    ref = scipy.stats.wilcoxon([a[i] for i in keep], [b[i] for i in keep])
    ours = paired_wilcoxon(a, b)
    assert ours.n == len(keep) == 7 and ours.p == pytest.approx(ref.pvalue)


@pytest.mark.parametrize(
    ("a", "b", "reason"),
    [
        ([], [], "no pairs"),
        ([0.5, 0.6, 0.7], [0.5, 0.6, 0.7], "all 3 differences are zero"),
        ([0.9, 0.8, 0.7, 0.1], [0.5, 0.5, 0.5, 0.1], "only 3 non-zero differences"),
    ],
)
def test_wilcoxon_degenerate_cases_give_no_p_value_and_say_why(a, b, reason):
    res = paired_wilcoxon(a, b)
    assert res.p is None and res.statistic is None
    assert reason in res.reason and res.format_p().startswith("p n/a (")


def test_wilcoxon_needs_enough_nonzero_pairs_to_reach_005():
    a = np.arange(1, MIN_NONZERO_PAIRS + 1) / 10
    res = paired_wilcoxon(a, np.zeros_like(a))
    assert res.p == pytest.approx(scipy.stats.wilcoxon(a, np.zeros_like(a)).pvalue) and res.p < 0.05
    with pytest.raises(ValueError, match="equal length"):
        paired_wilcoxon([1.0, 2.0], [1.0])


def _rows(strategy, fraction, seed, per_case):
    """per_case: {case: {organ: dice}} -> benchmark case rows."""
    return [
        {
            "strategy": strategy,
            "budget": f"f{fraction:g}",
            "fraction": fraction,
            "seed": seed,
            "dataset": "T",
            "case": case,
            "organ": organ,
            "dice": dice,
            "hd95": 1.0,
        }
        for case, organs in per_case.items()
        for organ, dice in organs.items()
    ]


@pytest.fixture
def hand_rows():
    rows = []
    # random at 0.5: seed 0 organ means liver 0.5, spleen 0.3 -> 0.4; seed 1 -> 0.6
    rows += _rows(
        "random", 0.5, 0, {"c1": {"liver": 0.4, "spleen": 0.2}, "c2": {"liver": 0.6, "spleen": 0.4}}
    )
    rows += _rows(
        "random", 0.5, 1, {"c1": {"liver": 0.6, "spleen": 0.6}, "c2": {"liver": 0.6, "spleen": 0.6}}
    )
    # mosmos at 0.5: seed 0 -> 0.7, seed 1 -> 0.5
    rows += _rows(
        "mosmos", 0.5, 0, {"c1": {"liver": 0.8, "spleen": 0.6}, "c2": {"liver": 0.8, "spleen": 0.6}}
    )
    rows += _rows(
        "mosmos", 0.5, 1, {"c1": {"liver": 0.5, "spleen": 0.5}, "c2": {"liver": 0.5, "spleen": 0.5}}
    )
    # at 1.0 one seed each: random 0.9, mosmos 0.8
    rows += _rows("random", 1.0, 0, {"c1": {"liver": 0.9, "spleen": 0.9}})
    rows += _rows("mosmos", 1.0, 0, {"c1": {"liver": 0.8, "spleen": 0.8}})
    return rows


def test_case_means_average_the_organs_of_each_case(hand_rows):
    means = case_means(hand_rows)
    assert means[("random", "f0.5", 0)] == pytest.approx({("T", "c1"): 0.3, ("T", "c2"): 0.5})
    assert means[("mosmos", "f0.5", 1)] == pytest.approx({("T", "c1"): 0.5, ("T", "c2"): 0.5})
    seeds, cases, diff = case_matrix(hand_rows, "mosmos", "f0.5", "random")
    assert seeds == [0, 1] and cases == [("T", "c1"), ("T", "c2")]
    np.testing.assert_allclose(diff, [[0.4, 0.2], [-0.1, -0.1]])
    # a case missing in one seed leaves the paired matrix
    rows = [r for r in hand_rows if not (r["strategy"] == "random" and r["seed"] == 1 and r["case"] == "c2")]
    assert case_matrix(rows, "mosmos", "f0.5", "random")[1] == [("T", "c1")]


def _exact_hierarchical_distribution(values):
    """Every equally likely outcome of one two-level bootstrap replicate, enumerated by hand:
    seeds drawn with replacement, then cases within each drawn seed."""
    import itertools

    n_seeds, n_cases = values.shape
    outcomes = []
    for seed_draw in itertools.product(range(n_seeds), repeat=n_seeds):
        per_seed = [
            [
                np.mean([values[s, c] for c in case_draw])
                for case_draw in itertools.product(range(n_cases), repeat=n_cases)
            ]
            for s in seed_draw
        ]
        outcomes += [float(np.mean(combo)) for combo in itertools.product(*per_seed)]
    return np.array(outcomes)


def test_hierarchical_bootstrap_matches_the_enumerated_distribution():
    values = np.array([[0.0, 1.0], [0.2, 0.6]])
    exact = _exact_hierarchical_distribution(values)  # 4 seed draws x 4 x 4 case draws = 64 outcomes
    assert len(exact) == 64
    ci = hierarchical_bootstrap(values, n_boot=40_000, seed=1)
    assert ci.estimate == pytest.approx(values.mean()) and (ci.n_seeds, ci.n_cases) == (2, 2)
    # the exact distribution is discrete: each sampled bound lies between the exact quantiles 1 % of
    # probability either side of its level (sampling error at 40 000 replicates is ~0.08 %)
    band = lambda q: np.quantile(exact, [q - 0.01, q + 0.01], method="inverted_cdf")  # noqa: E731
    assert band(0.025)[0] - 1e-9 <= ci.low <= band(0.025)[1] + 1e-9
    assert band(0.975)[0] - 1e-9 <= ci.high <= band(0.975)[1] + 1e-9
    assert band(0.025)[1] < band(0.975)[0]  # the check is not vacuous: the bands are apart
    # one seed, two cases [0, 1]: replicates 0, 0.5, 1 with probability 1/4, 1/2, 1/4
    one = hierarchical_bootstrap(np.array([[0.0, 1.0]]), n_boot=20_000)
    assert (one.low, one.high) == (0.0, 1.0)
    # seed-level spread widens the interval beyond what pooling all values as independent gives
    spread = np.array([[0.1] * 8, [0.5] * 8, [0.9] * 8])
    wide = hierarchical_bootstrap(spread)
    assert wide.low < 0.3 and wide.high > 0.7  # one level would give ~0.5 +- 0.13


def test_hierarchical_bootstrap_rejects_incomplete_matrices():
    with pytest.raises(ValueError, match="complete"):
        hierarchical_bootstrap(np.array([[0.1, np.nan]]))
    empty = hierarchical_bootstrap(np.zeros((0, 0)))
    assert math.isnan(empty.estimate) and empty.format() == "-"


def test_holm_adjusts_step_down_and_keeps_missing_tests_out():
    # p sorted: 0.01 (x3), 0.03 (x2), 0.04 (x1); monotone; None stays None and does not count
    assert holm([0.04, None, 0.01, 0.03]) == pytest.approx([0.06, None, 0.03, 0.06])
    assert holm([0.5, 0.9]) == [1.0, 1.0]
    assert holm([]) == []


def test_compare_uses_one_value_per_test_case(hand_rows):
    c = compare(hand_rows, "mosmos", "random", "f0.5", n_boot=2000)
    assert c.diff.estimate == pytest.approx(np.mean([0.4, 0.2, -0.1, -0.1]))
    assert (c.diff.n_seeds, c.diff.n_cases) == (2, 2)
    # the test sees the 2 per-case differences averaged over seeds (0.15, 0.05), not 8 pseudo-pairs
    assert c.test.n == 2 and c.test.p is None


def test_interval_table_marks_the_best_mean_per_budget(hand_rows):
    table = interval_table(hand_rows, ["random", "mosmos", "tags_only"], ["f0.5", "f1"])
    assert table[("random", "f0.5")].estimate == pytest.approx(np.mean([0.3, 0.5, 0.6, 0.6]))
    text = format_interval_table(table, ["random", "mosmos", "tags_only"], ["f0.5", "f1"])
    lines = text.splitlines()
    assert lines[0] == "| strategy | fraction 0.5 | fraction 1 |"
    assert (
        lines[2].startswith("| random | 0.500 [") and "**0.900" in lines[2] and lines[2].endswith("(1x1) |")
    )
    assert lines[3].startswith("| mosmos | **0.600 [") and "(2x2)" in lines[3]
    assert lines[4] == "| tags_only | - | - |"


# ------------------------------------------------------------------------------ grid bookkeeping
