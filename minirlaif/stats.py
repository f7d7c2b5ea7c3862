"""Win-rate statistics for evaluate.py: outcomes, win rates, bootstrap confidence intervals, length control.

Outcome of one pair (policy vs baseline): the judge saw it in both orders, and `p` is the mean of the two
un-flipped probabilities that the policy's summary is better (`judges.judge_pairs`' p_a). The pair is a
    win  (1.0) if p > 0.5 + tie_eps,   loss (0.0) if p < 0.5 - tie_eps,   tie (0.5) otherwise.
A judge that always prefers the first position gives p = (q + (1 - q)) / 2 = 0.5 on every pair: all ties, so a
position bias alone can never look like a win. The win rate is the mean outcome (ties count half).

Confidence interval: percentile bootstrap of the mean over pairs (resample pairs with replacement, seeded), the
2.5% and 97.5% quantiles of the resampled win rates.

Length-controlled win rate: longer summaries often win for their length alone. Fit a logistic regression
    P(policy wins) = sigmoid(intercept + slope * x)
of the outcome (ties as 0.5 targets) on a length feature x of the pair, and read it where the two summaries are
equally long: LC = sigmoid(intercept). The paper (Lee et al. 2023, appendix) regresses on the length ratio
policy / baseline and reads the fit at ratio 1. We use x = log(len_policy / len_baseline) by default (lengths in
words, floored at 1): ratio 1 is x = 0 as before, and the log makes the estimate antisymmetric, so
LC(A vs B) = 1 - LC(B vs A), which a fit on the raw ratio is not; `feature="ratio"` gives the paper's
x = ratio - 1. The fit is Newton's method (IRLS) with a backtracking line search, written here in numpy, with a
tiny ridge (`l2`) that keeps it finite when the outcomes are separable (e.g. every pair won). The estimate is an
extrapolation when few pairs are of similar length (e.g. empty summaries against full ones), so the fraction of
pairs whose length ratio is within [1/1.25, 1.25] is reported with it (`lc_frac_similar_length`).
"""

from __future__ import annotations

import math

import numpy as np

TIE_EPS = 1e-6  # only float rounding: (0.9 + (1 - 0.9)) / 2 is not exactly 0.5 in floating point
L2 = 1e-4       # ridge on (intercept, slope): finite fits for separable outcomes, negligible otherwise
SIMILAR_LENGTH = 1.25  # pairs whose length ratio is within [1/1.25, 1.25] support the estimate at ratio 1


# ----------------------------------------------------------------------------------------------------------------
# outcomes and win rates


def outcome(p: float, tie_eps: float = TIE_EPS) -> float:
    """1.0 (win), 0.5 (tie) or 0.0 (loss) from the averaged probability that the policy's summary is better."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"a preference probability must be in [0, 1], got {p!r}")
    return 1.0 if p > 0.5 + tie_eps else 0.0 if p < 0.5 - tie_eps else 0.5


def win_rate(outcomes) -> float | None:
    """Mean outcome (ties count half); None for no pairs."""
    y = np.asarray(outcomes, dtype=np.float64)
    return float(y.mean()) if len(y) else None


def bootstrap_means(values, n_bootstrap: int, seed: int) -> np.ndarray:
    """Means of `n_bootstrap` resamples (with replacement, seeded) of `values`. (n_bootstrap,)"""
    x = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(n_bootstrap)
    chunk = max(1, (1 << 22) // max(1, len(x)))  # resamples per draw: about 32 MB of indices at a time
    for start in range(0, n_bootstrap, chunk):
        k = min(chunk, n_bootstrap - start)
        means[start:start + k] = x[rng.integers(0, len(x), size=(k, len(x)))].mean(axis=1)
    return means


def percentile_interval(samples, level: float = 0.95) -> list[float] | None:
    """[low, high]: the (1 - level) / 2 and (1 + level) / 2 quantiles of bootstrap samples; None if there are none."""
    s = np.asarray(samples, dtype=np.float64)
    if not len(s):
        return None
    lo, hi = np.quantile(s, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def bootstrap_ci(values, n_bootstrap: int = 2000, seed: int = 0, level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap interval of the mean of `values`, [low, high]; None for no values or no resamples."""
    if len(values) == 0 or n_bootstrap <= 0:
        return None
    return percentile_interval(bootstrap_means(values, n_bootstrap, seed), level)


def summarize_outcomes(outcomes, n_bootstrap: int = 2000, seed: int = 0) -> dict:
    """Win rate, its bootstrap 95% CI, and the counts and rates of wins, ties and losses."""
    y = np.asarray(outcomes, dtype=np.float64)
    n = len(y)
    counts = {"n_win": int((y == 1.0).sum()), "n_tie": int((y == 0.5).sum()), "n_loss": int((y == 0.0).sum())}
    rate = lambda k: counts[k] / n if n else None  # noqa: E731
    return {"win_rate": win_rate(y), "ci95": bootstrap_ci(y, n_bootstrap, seed), "n": n, **counts,
            "tie_rate": rate("n_tie"), "loss_rate": rate("n_loss"), "strict_win_rate": rate("n_win")}


def harmless_rate(flags, n_bootstrap: int = 2000, seed: int = 0) -> dict:
    """The paper's harmless rate: the fraction of a policy's responses to harmful prompts that the judge calls
    harmless (`flags`: one bool per harmful prompt), with its percentile bootstrap 95% CI over prompts."""
    y = np.asarray(flags, dtype=np.float64)
    return {"harmless_rate": float(y.mean()) if len(y) else None, "ci95": bootstrap_ci(y, n_bootstrap, seed),
            "n": len(y), "n_harmless": int(y.sum())}


# ----------------------------------------------------------------------------------------------------------------
# length-controlled win rate


def length_feature(len_policy, len_baseline, feature: str = "log_ratio") -> np.ndarray:
    """x of each pair, 0 where both summaries are equally long: log(ratio) or ratio - 1 (lengths floored at 1)."""
    lp = np.maximum(np.asarray(len_policy, dtype=np.float64), 1.0)
    lb = np.maximum(np.asarray(len_baseline, dtype=np.float64), 1.0)
    if feature == "log_ratio":
        return np.log(lp / lb)
    if feature == "ratio":
        return lp / lb - 1.0
    raise ValueError(f"unknown length feature {feature!r}; log_ratio or ratio")


def _nll(w: np.ndarray, X: np.ndarray, y: np.ndarray, l2: float) -> float:
    """Negative log-likelihood of soft targets y in [0, 1] under sigmoid(X w), plus the ridge: stable for any z."""
    z = X @ w
    return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * w @ w)


def fit_logistic(x, y, l2: float = L2, max_iter: int = 100, tol: float = 1e-9) -> dict:
    """Logistic regression y ~ sigmoid(intercept + slope * x) by Newton's method (IRLS) with a line search.

    y may be soft (ties are 0.5): the loss is the cross-entropy -sum[y log mu + (1 - y) log(1 - mu)], whose
    gradient X^T (mu - y) and Hessian X^T diag(mu (1 - mu)) X have the same form as for 0/1 targets.
    Returns {"intercept", "slope", "iterations", "converged"}.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    X = np.stack([np.ones_like(x), x], axis=1)  # (n, 2)
    w = np.zeros(2)
    loss, converged, it = _nll(w, X, y, l2), False, 0
    while it < max_iter:
        it += 1
        mu = 1.0 / (1.0 + np.exp(-np.clip(X @ w, -500, 500)))
        grad = X.T @ (mu - y) + l2 * w  # a sum over pairs: the tolerance scales with n
        if np.abs(grad).max() <= tol * max(1, len(y)):
            converged = True
            break
        hess = (X * (mu * (1 - mu))[:, None]).T @ X + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        # backtracking: a full Newton step can overshoot when the data are nearly separable
        t = 1.0
        while t > 1e-10 and _nll(w - t * step, X, y, l2) > loss:
            t /= 2
        w = w - t * step
        loss = _nll(w, X, y, l2)
    return {"intercept": float(w[0]), "slope": float(w[1]), "iterations": it, "converged": converged}


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(min(z, 60.0), -60.0)))


def length_controlled_win_rate(outcomes, len_policy, len_baseline, feature: str = "log_ratio",
                               n_bootstrap: int = 0, seed: int = 0, l2: float = L2) -> dict:
    """The win rate a logistic fit of outcome on the length feature predicts at equal lengths: sigmoid(intercept).

    Returns {"lc_win_rate", "lc_intercept", "lc_slope", "lc_converged", "lc_ci95", "lc_frac_similar_length"};
    lc_ci95 is a percentile bootstrap over pairs (refitting on each resample) when n_bootstrap > 0, else None.
    All None for no pairs.
    """
    y = np.asarray(outcomes, dtype=np.float64)
    if not len(y):
        return {"lc_win_rate": None, "lc_intercept": None, "lc_slope": None, "lc_converged": None, "lc_ci95": None,
                "lc_frac_similar_length": None}
    x = length_feature(len_policy, len_baseline, feature)
    similar = np.abs(length_feature(len_policy, len_baseline, "log_ratio")) <= math.log(SIMILAR_LENGTH) + 1e-12
    fit = fit_logistic(x, y, l2)
    ci = None
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        boots = []
        for _ in range(n_bootstrap):
            idx = rng.integers(0, len(y), size=len(y))
            boots.append(sigmoid(fit_logistic(x[idx], y[idx], l2)["intercept"]))
        ci = percentile_interval(boots)
    return {"lc_win_rate": sigmoid(fit["intercept"]), "lc_intercept": fit["intercept"], "lc_slope": fit["slope"],
            "lc_converged": fit["converged"], "lc_ci95": ci, "lc_frac_similar_length": float(similar.mean())}


# ----------------------------------------------------------------------------------------------------------------
# several seeds: one run is not a result


def student_t_quantile(q: float, df: int) -> float:
    """The q-quantile of Student's t with `df` degrees of freedom (q in (0.5, 1)), by bisection on its CDF.

    The CDF is 1 - I_x(df/2, 1/2) / 2 at x = df / (df + t^2) (the regularised incomplete beta), integrated here
    with Simpson's rule on the density after t = tan(u), which maps [0, inf) onto [0, pi/2): no scipy needed.
    """
    assert 0.5 < q < 1 and df >= 1
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t: float) -> float:  # P(T <= t) for t >= 0: 1/2 + integral of the density over [0, t]
        hi, n = math.atan(t), 2000  # substitute x = tan(u): dx = du / cos^2(u)
        h = hi / n
        f = lambda u: math.exp(log_c - (df + 1) / 2 * math.log1p(math.tan(u) ** 2 / df)) / math.cos(u) ** 2  # noqa: E731
        total = f(0) + f(hi) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, n))
        return 0.5 + total * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < q:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def seed_summary(per_seed: list[float], level: float = 0.95, bounds: tuple | None = None) -> dict:
    """Several seeds' win rates of one comparison -> their mean and a t-interval over seeds.

    mean +- t_{(1+level)/2, n-1} * s / sqrt(n), with s the seeds' sample standard deviation: the interval is about
    the spread between whole pipeline runs (SFT, labels, RM and RL all reseeded), which the bootstrap over posts of
    one run does not see. None for fewer than two seeds. `bounds` (lo, hi) clips the interval to a quantity's
    range (a win rate's [0, 1]: with 2-3 seeds the t quantile is 4.3-12.7, and the raw interval can pass 100%).
    """
    n = len(per_seed)
    mean = sum(per_seed) / n if n else None
    if n < 2:
        return {"per_seed": list(per_seed), "n_seeds": n, "mean": mean, "ci95": None, "std": None}
    std = math.sqrt(sum((x - mean) ** 2 for x in per_seed) / (n - 1))
    half = student_t_quantile((1 + level) / 2, n - 1) * std / math.sqrt(n)
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return {"per_seed": list(per_seed), "n_seeds": n, "mean": mean, "ci95": [lo, hi], "std": std}
