"""minirlaif/stats.py: outcomes, bootstrap CIs on known samples, the logistic fit, the length-controlled win rate."""

import math

import numpy as np
import pytest

from minirlaif import stats


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


# ----------------------------------------------------------------------------------------------------------------
# outcomes and win rates


def test_outcome_is_win_tie_or_loss_around_a_half():
    assert stats.outcome(0.51) == 1.0 and stats.outcome(0.49) == 0.0 and stats.outcome(0.5) == 0.5
    # a position-only judge averages to a half up to float rounding: a tie, not a win or a loss
    p = (0.9 + (1 - 0.9)) / 2
    assert stats.outcome(p) == 0.5 and stats.outcome(1 - p) == 0.5
    assert stats.outcome(0.55, tie_eps=0.1) == 0.5 and stats.outcome(0.61, tie_eps=0.1) == 1.0
    assert stats.outcome(0.39, tie_eps=0.1) == 0.0
    with pytest.raises(ValueError):
        stats.outcome(1.2)


def test_win_rate_counts_ties_as_half_and_summary_counts():
    y = [1.0, 1.0, 0.5, 0.0]
    assert stats.win_rate(y) == pytest.approx(0.625)
    assert stats.win_rate([]) is None
    s = stats.summarize_outcomes(y, n_bootstrap=50, seed=0)
    assert (s["n"], s["n_win"], s["n_tie"], s["n_loss"]) == (4, 2, 1, 1)
    assert s["tie_rate"] == 0.25 and s["loss_rate"] == 0.25 and s["strict_win_rate"] == 0.5
    assert s["ci95"][0] <= s["win_rate"] <= s["ci95"][1]
    empty = stats.summarize_outcomes([], n_bootstrap=50)
    assert empty["win_rate"] is None and empty["ci95"] is None and empty["n"] == 0


# ----------------------------------------------------------------------------------------------------------------
# bootstrap


def test_bootstrap_ci_on_a_known_bernoulli_sample():
    n, p = 400, 0.6
    y = (np.random.default_rng(0).random(n) < p).astype(float)
    lo, hi = stats.bootstrap_ci(y, n_bootstrap=4000, seed=1)
    assert lo < p < hi
    assert lo < y.mean() < hi
    normal_width = 2 * 1.96 * math.sqrt(p * (1 - p) / n)  # 0.096
    assert hi - lo == pytest.approx(normal_width, rel=0.1)
    # seeded: the same interval again; another seed moves it only by Monte Carlo noise
    assert stats.bootstrap_ci(y, n_bootstrap=4000, seed=1) == [lo, hi]
    lo2, hi2 = stats.bootstrap_ci(y, n_bootstrap=4000, seed=2)
    assert abs(lo2 - lo) < 0.01 and abs(hi2 - hi) < 0.01


def test_bootstrap_ci_covers_the_true_rate_about_95_percent_of_the_time():
    rng = np.random.default_rng(3)
    covered = 0
    for rep in range(200):
        y = (rng.random(100) < 0.6).astype(float)
        lo, hi = stats.bootstrap_ci(y, n_bootstrap=400, seed=rep)
        covered += lo <= 0.6 <= hi
    assert 0.88 <= covered / 200 <= 0.99


def test_bootstrap_edge_cases():
    assert stats.bootstrap_ci([], 100) is None
    assert stats.bootstrap_ci([1.0, 0.0], 0) is None
    assert stats.bootstrap_ci([0.5] * 10, 100) == [0.5, 0.5]
    # many resamples are drawn in chunks: the result does not depend on the chunking
    y = np.arange(5000) % 2
    assert stats.bootstrap_means(y, 3000, seed=0).shape == (3000,)


# ----------------------------------------------------------------------------------------------------------------
# the logistic fit and the length-controlled win rate


def logistic_sample(rng, n, intercept, slope, feature):
    """Pairs whose outcome follows sigmoid(intercept + slope * x) exactly, x the length feature of real lengths."""
    len_b = rng.integers(8, 30, n)
    len_p = np.maximum(1, np.round(len_b * np.exp(rng.normal(0.4, 0.35, n))))  # policies longer on average
    x = stats.length_feature(len_p, len_b, feature)
    y = (rng.random(n) < sigmoid(intercept + slope * x)).astype(float)
    return y, len_p, len_b, x


def test_logistic_fit_solves_the_score_equations():
    rng = np.random.default_rng(0)
    y, _, _, x = logistic_sample(rng, 500, 0.2, 1.0, "log_ratio")
    y[:50] = 0.5  # soft targets (ties) too
    fit = stats.fit_logistic(x, y, l2=0.0)
    assert fit["converged"] and fit["iterations"] < 20
    mu = sigmoid(fit["intercept"] + fit["slope"] * x)
    # at the maximum likelihood: sum(y - mu) = 0 and sum(x (y - mu)) = 0
    assert abs(np.sum(y - mu)) < 1e-6 and abs(np.sum(x * (y - mu))) < 1e-6


def test_length_controlled_win_rate_recovers_the_intercept_while_the_raw_rate_is_biased():
    rng = np.random.default_rng(1)
    a, b = 0.3, 1.5
    y, len_p, len_b, _ = logistic_sample(rng, 6000, a, b, "log_ratio")
    lc = stats.length_controlled_win_rate(y, len_p, len_b, "log_ratio", n_bootstrap=200, seed=0)
    assert lc["lc_win_rate"] == pytest.approx(sigmoid(a), abs=0.025)  # 0.574
    assert lc["lc_slope"] == pytest.approx(b, abs=0.3)
    assert lc["lc_converged"]
    assert lc["lc_ci95"][0] < sigmoid(a) < lc["lc_ci95"][1]
    raw = stats.win_rate(y)
    assert raw - sigmoid(a) > 0.08  # the longer policy's raw win rate overstates it (about 0.70)


def test_ratio_feature_recovers_a_model_on_the_raw_ratio():
    rng = np.random.default_rng(2)
    a, b = -0.2, 1.2
    y, len_p, len_b, _ = logistic_sample(rng, 6000, a, b, "ratio")
    lc = stats.length_controlled_win_rate(y, len_p, len_b, "ratio")
    assert lc["lc_win_rate"] == pytest.approx(sigmoid(a), abs=0.03)
    assert lc["lc_ci95"] is None  # no bootstrap asked
    with pytest.raises(ValueError):
        stats.length_feature([1], [1], "chars")


def test_a_tie_target_counts_as_one_win_and_one_loss():
    rng = np.random.default_rng(4)
    y, len_p, len_b, _ = logistic_sample(rng, 300, 0.0, 1.0, "log_ratio")
    y[:100] = 0.5
    tied = stats.length_controlled_win_rate(y, len_p, len_b)
    # the same pairs with each tie written as a win plus a loss at the same lengths (half weight each)
    y2 = np.concatenate([np.where(y == 0.5, 1.0, y), np.where(y == 0.5, 0.0, y)])
    dup = stats.length_controlled_win_rate(y2, np.concatenate([len_p, len_p]), np.concatenate([len_b, len_b]),
                                           l2=2 * stats.L2)
    assert tied["lc_win_rate"] == pytest.approx(dup["lc_win_rate"], abs=1e-9)
    assert tied["lc_slope"] == pytest.approx(dup["lc_slope"], abs=1e-9)
    # all ties: a half whatever the lengths
    assert stats.length_controlled_win_rate([0.5] * 20, len_p[:20], len_b[:20])["lc_win_rate"] == pytest.approx(0.5)


def test_log_ratio_estimate_is_antisymmetric():
    rng = np.random.default_rng(5)
    y, len_p, len_b, _ = logistic_sample(rng, 400, 0.4, 0.8, "log_ratio")
    ab = stats.length_controlled_win_rate(y, len_p, len_b)["lc_win_rate"]
    ba = stats.length_controlled_win_rate(1 - y, len_b, len_p)["lc_win_rate"]
    assert ab + ba == pytest.approx(1.0, abs=1e-9)


def test_separable_or_degenerate_outcomes_give_a_finite_fit():
    all_wins = stats.length_controlled_win_rate([1.0] * 30, [12] * 30, [10] * 30)
    assert all_wins["lc_converged"] and 0.99 < all_wins["lc_win_rate"] <= 1.0
    # equal lengths everywhere: the slope is not identified, the estimate is the raw win rate
    same = stats.length_controlled_win_rate([1.0, 0.0, 1.0, 0.5], [5, 7, 9, 4], [5, 7, 9, 4])
    assert same["lc_win_rate"] == pytest.approx(0.625, abs=1e-3) and same["lc_slope"] == pytest.approx(0.0)
    # perfectly separated by length: finite, and read at equal length in between
    sep = stats.length_controlled_win_rate([1.0, 1.0, 0.0, 0.0], [20, 18, 5, 6], [10, 10, 10, 10])
    assert sep["lc_converged"] and math.isfinite(sep["lc_slope"]) and 0.0 < sep["lc_win_rate"] < 1.0
    assert stats.length_controlled_win_rate([], [], [])["lc_win_rate"] is None
    # empty summaries have length 0: floored at 1 word, never log(0)
    assert np.isfinite(stats.length_feature([0, 3], [4, 0])).all()


# ----------------------------------------------------------------------------------------------------------------
# several seeds


@pytest.mark.parametrize("df,want", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_student_t_quantile_matches_the_table(df, want):
    """97.5% quantiles of Student's t from any statistics table."""
    assert stats.student_t_quantile(0.975, df) == pytest.approx(want, abs=2e-4)


def test_seed_summary_by_hand():
    """Three made-up seeds: 0.80, 0.70, 0.75 -> mean 0.75, s = 0.05, half-width 4.3027 * 0.05 / sqrt(3)."""
    got = stats.seed_summary([0.80, 0.70, 0.75])
    half = 4.302653 * 0.05 / math.sqrt(3)  # = 0.124207
    assert got["mean"] == pytest.approx(0.75) and got["std"] == pytest.approx(0.05)
    assert got["ci95"] == pytest.approx([0.75 - half, 0.75 + half], abs=1e-5)
    assert got["per_seed"] == [0.80, 0.70, 0.75] and got["n_seeds"] == 3
    one = stats.seed_summary([0.6])
    assert one["mean"] == 0.6 and one["ci95"] is None


def test_seed_summary_clips_to_bounds():
    raw = stats.seed_summary([0.90, 1.00])  # 0.95 +- 12.706 * 0.0707 / sqrt(2) = 0.95 +- 0.635
    assert raw["ci95"] == pytest.approx([0.95 - 0.6353, 0.95 + 0.6353], abs=1e-3)
    clipped = stats.seed_summary([0.90, 1.00], bounds=(0.0, 1.0))
    assert clipped["ci95"] == pytest.approx([0.95 - 0.6353, 1.0], abs=1e-3) and clipped["mean"] == raw["mean"]


def test_harmless_rate_and_its_ci_against_a_direct_computation():
    flags = [True] * 13 + [False] * 7  # 13 of 20 responses harmless
    h = stats.harmless_rate(flags, n_bootstrap=3000, seed=4)
    assert h["harmless_rate"] == 13 / 20 and h["n"] == 20 and h["n_harmless"] == 13
    # the same resamples drawn by hand, one loop per resample, and their 2.5% / 97.5% quantiles
    rng = np.random.default_rng(4)
    x = np.array(flags, dtype=float)
    means = [x[rng.integers(0, 20, size=20)].mean() for _ in range(3000)]
    lo, hi = np.quantile(means, [0.025, 0.975])
    assert h["ci95"] == pytest.approx([lo, hi])
    # the normal approximation's interval, as a sanity bound: p +- 1.96 sqrt(p (1 - p) / n) = [0.441, 0.859]
    assert abs(h["ci95"][0] - 0.441) < 0.06 and abs(h["ci95"][1] - 0.859) < 0.06
    empty = stats.harmless_rate([], n_bootstrap=10)
    assert empty["harmless_rate"] is None and empty["ci95"] is None and empty["n"] == 0
