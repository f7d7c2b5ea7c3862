"""Tests for minirlaif.losses.

Every check compares against something computed independently: hand-worked numbers (REFERENCE.md), plain
per-sequence Python loops over the valid tokens only, or torch's own ops (torch.var, log_softmax,
Categorical.entropy, binary_cross_entropy_with_logits).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from minirlaif import losses
from minirlaif.losses import (AdaptiveKLController, FixedKLController, bradley_terry_loss, dr_grpo_advantages,
                              entropy_from_logits, explained_variance, gae, grpo_advantages, kl_penalty,
                              logprobs_from_logits, masked_mean, masked_var, masked_whiten, ppo_policy_loss,
                              ppo_value_loss, reinforce_advantages, reward_to_go, rloo_advantages, truncate_after_eos)

# ----------------------------------------------------------------------------------------------------------
# helpers


def ragged_batch(B=5, T=7, seed=0, dtype=torch.float64):
    """Random (B, T) data and a prefix mask with ragged lengths 1..T (at least one full and one short row)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[-1] = T, 1
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T) bool
    x = torch.randn(B, T, generator=g, dtype=dtype)
    return x, mask, lengths.tolist(), g


def valid(x, mask):
    """Python list of per-row lists holding only the valid entries."""
    return [[v for v, m in zip(row, mrow) if m] for row, mrow in zip(x.tolist(), mask.tolist())]


GARBAGE = [1e30, -1e30, float("inf"), float("-inf"), 3e4, -7e3]


def with_garbage(x, mask, seed=1):
    """Copy of x whose masked entries are replaced by huge or infinite values."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(GARBAGE), x.shape, generator=g)
    junk = torch.tensor(GARBAGE, dtype=x.dtype)[idx]
    return torch.where(mask, x, junk)


# ----------------------------------------------------------------------------------------------------------
# GAE


def test_gae_hand_checked():
    rewards = torch.tensor([[-0.005, -0.01, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.4, 0.3]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(advantages, torch.tensor([[0.42225, 0.555, 0.7]], dtype=torch.float64))
    torch.testing.assert_close(returns, torch.tensor([[0.92225, 0.955, 1.0]], dtype=torch.float64))

    # An extra padded position with garbage reward and value changes nothing and outputs 0 there.
    rewards_p = torch.tensor([[-0.005, -0.01, 1.0, 123.0]], dtype=torch.float64)
    values_p = torch.tensor([[0.5, 0.4, 0.3, -1e6]], dtype=torch.float64)
    mask_p = torch.tensor([[1, 1, 1, 0]])
    advantages_p, returns_p = gae(rewards_p, values_p, mask_p, gamma=1.0, lam=0.95)
    torch.testing.assert_close(advantages_p, torch.tensor([[0.42225, 0.555, 0.7, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(returns_p, torch.tensor([[0.92225, 0.955, 1.0, 0.0]], dtype=torch.float64))

    # A masked position cuts the recursion even inside a row (not expected in practice, but nothing may leak):
    # the last token is its own segment, A = 3 - 2 = 1, and the first three keep their values.
    rewards_h = torch.tensor([[-0.005, -0.01, 1.0, 123.0, 3.0]], dtype=torch.float64)
    values_h = torch.tensor([[0.5, 0.4, 0.3, -1e6, 2.0]], dtype=torch.float64)
    advantages_h, returns_h = gae(rewards_h, values_h, torch.tensor([[1, 1, 1, 0, 1]]), gamma=1.0, lam=0.95)
    torch.testing.assert_close(advantages_h, torch.tensor([[0.42225, 0.555, 0.7, 0.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(returns_h, torch.tensor([[0.92225, 0.955, 1.0, 0.0, 3.0]], dtype=torch.float64))


def test_td_residuals_match_per_sequence_loop():
    """delta_t = r_t + gamma V_{t+1} - V_t on each sequence's own valid tokens, V = 0 after its last one; padding
    (garbage here) never leaks in; 0 at padding. GAE at lam = 0 is exactly these residuals."""
    rewards, mask, lengths, g = ragged_batch(B=6, T=7, seed=14)
    values = torch.randn(rewards.shape, generator=g, dtype=torch.float64)
    got = losses.td_residuals(with_garbage(rewards, mask), with_garbage(values, mask, seed=2), mask, 0.9)
    for b, n in enumerate(lengths):
        for t in range(mask.shape[1]):
            nxt = values[b, t + 1].item() if t + 1 < n else 0.0
            want = rewards[b, t].item() + 0.9 * nxt - values[b, t].item() if t < n else 0.0
            assert got[b, t].item() == pytest.approx(want, abs=1e-12), (b, t)
    torch.testing.assert_close(got, gae(rewards, values, mask, 0.9, 0.0)[0])


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_matches_per_sequence_loop(gamma, lam):
    rewards, mask, lengths, g = ragged_batch(B=6, T=8, seed=3)
    values = torch.randn(rewards.shape, generator=g, dtype=torch.float64)
    advantages, returns = gae(with_garbage(rewards, mask), with_garbage(values, mask, seed=2), mask, gamma, lam)
    for b, n in enumerate(lengths):
        r, v = rewards[b, :n].tolist(), values[b, :n].tolist()
        expected_adv, running = [0.0] * n, 0.0
        for t in reversed(range(n)):
            next_v = v[t + 1] if t + 1 < n else 0.0
            running = r[t] + gamma * next_v - v[t] + gamma * lam * running
            expected_adv[t] = running
        for t in range(8):
            if t < n:
                assert advantages[b, t].item() == pytest.approx(expected_adv[t], abs=1e-12)
                assert returns[b, t].item() == pytest.approx(expected_adv[t] + v[t], abs=1e-12)
            else:
                assert advantages[b, t].item() == 0.0 and returns[b, t].item() == 0.0


# ----------------------------------------------------------------------------------------------------------
# sequence-level estimators: REINFORCE with a baseline, RLOO, GRPO (per-sequence loops as the reference)


def assert_on_valid_tokens(advantages, mask, lengths, per_sequence):
    """advantages holds per_sequence[b] on each of row b's valid tokens and exactly 0 on its padding."""
    for b, n in enumerate(lengths):
        for t in range(mask.shape[1]):
            want = per_sequence[b] if t < n else 0.0
            assert advantages[b, t].item() == pytest.approx(want, abs=1e-12), (b, t)


def test_reinforce_baseline_matches_per_sequence_loop():
    rewards, mask, lengths, g = ragged_batch(B=6, T=8, seed=4)
    values = torch.randn(rewards.shape, generator=g, dtype=torch.float64)
    advantages, returns = reinforce_advantages(with_garbage(rewards, mask), values, mask)
    R = [sum(rewards[b, :n].tolist()) for b, n in enumerate(lengths)]  # the sequence's return
    assert_on_valid_tokens(advantages, mask, lengths, [R[b] - values[b, 0].item() for b in range(6)])
    assert_on_valid_tokens(returns, mask, lengths, R)
    # hand-checked row: rewards (-0.1, -0.2, 1.5), V(x) = 0.4 -> R = 1.2, A = 0.8 on every token
    a, r = reinforce_advantages(torch.tensor([[-0.1, -0.2, 1.5, 9.0]]), torch.tensor([[0.4, 7.0, 7.0, 7.0]]),
                                torch.tensor([[1, 1, 1, 0]]))
    torch.testing.assert_close(a, torch.tensor([[0.8, 0.8, 0.8, 0.0]]))
    torch.testing.assert_close(r, torch.tensor([[1.2, 1.2, 1.2, 0.0]]))


@pytest.mark.parametrize("k", [2, 3])
def test_rloo_matches_per_sequence_loop(k):
    rewards, mask, lengths, _ = ragged_batch(B=4 * k, T=7, seed=5)
    advantages = rloo_advantages(with_garbage(rewards, mask), mask, k)
    R = [sum(rewards[b, :n].tolist()) for b, n in enumerate(lengths)]
    expected = []
    for i in range(len(R)):
        group = range(i // k * k, i // k * k + k)
        others = [R[j] for j in group if j != i]
        expected.append(R[i] - sum(others) / len(others))
    assert_on_valid_tokens(advantages, mask, lengths, expected)


def test_rloo_baseline_excludes_the_sample_itself():
    """Changing sample i's own return moves A_i one for one (its baseline does not see it), and moves every other
    sample of its group by -1/(k-1) (their baselines do); other groups do not move at all."""
    k, T = 4, 5
    rewards, mask, lengths, _ = ragged_batch(B=2 * k, T=T, seed=6)
    before = rloo_advantages(rewards, mask, k)
    bumped = rewards.clone()
    bumped[1, 0] += 3.0  # sample 1 of group 0 gets +3 return
    after = rloo_advantages(bumped, mask, k)
    delta = (after - before)[:, 0]  # every row has its first token valid
    torch.testing.assert_close(delta, torch.tensor([-1.0, 3.0, -1.0, -1.0, 0, 0, 0, 0], dtype=torch.float64))
    # hand-checked: returns (1, 2, 3, 6) -> baselines (11/3, 10/3, 3, 2)
    r = torch.tensor([[1.0], [2.0], [3.0], [6.0]], dtype=torch.float64)
    torch.testing.assert_close(rloo_advantages(r, torch.ones(4, 1), 4)[:, 0],
                               torch.tensor([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0], dtype=torch.float64))


@pytest.mark.parametrize("k", [2, 4])
def test_grpo_matches_per_sequence_loop(k):
    rewards, mask, lengths, _ = ragged_batch(B=3 * k, T=6, seed=7)
    advantages = grpo_advantages(with_garbage(rewards, mask), mask, k, eps=1e-4)
    R = [sum(rewards[b, :n].tolist()) for b, n in enumerate(lengths)]
    expected = []
    for i in range(len(R)):
        group = [R[j] for j in range(i // k * k, i // k * k + k)]
        mean = sum(group) / k
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (k - 1))  # unbiased, like TRL
        expected.append((R[i] - mean) / (std + 1e-4))
    assert_on_valid_tokens(advantages, mask, lengths, expected)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_reward_to_go_matches_per_sequence_loop(gamma):
    """REINFORCE++: A_t = sum_{s >= t} gamma^(s - t) r_s over each sequence's own valid tokens (padding never
    leaks in: it holds garbage here), 0 at padding; then whitened over every valid token of the batch with the
    biased variance (OpenRLHF's choice), which the trainer does with masked_whiten."""
    rewards, mask, lengths, _ = ragged_batch(B=6, T=7, seed=11)
    got = reward_to_go(with_garbage(rewards, mask), mask, gamma)
    for b, n in enumerate(lengths):
        row = rewards[b, :n].tolist()
        for t in range(mask.shape[1]):
            want = sum(gamma ** (s - t) * row[s] for s in range(t, n)) if t < n else 0.0
            assert got[b, t].item() == pytest.approx(want, abs=1e-12), (b, t)
    # hand-checked: r = (-0.1, -0.2, 1.0), gamma 1 -> (0.7, 0.8, 1.0); and it is GAE with V = 0 and lam = 1
    r = torch.tensor([[-0.1, -0.2, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(reward_to_go(r, torch.ones(1, 3)), torch.tensor([[0.7, 0.8, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(got, gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)[0])
    # the global whitening over all valid tokens of the batch, by hand (divide by n)
    a = [v for row in valid(got, mask) for v in row]
    mean = sum(a) / len(a)
    std = math.sqrt(sum((v - mean) ** 2 for v in a) / len(a))
    white = masked_whiten(got, mask)
    assert [v for row in valid(white, mask) for v in row] == pytest.approx([(v - mean) / std for v in a], abs=1e-6)


@pytest.mark.parametrize("k", [2, 4])
def test_dr_grpo_matches_per_sequence_loop(k):
    """Dr. GRPO: A_i = R_i - the mean return of its group (no std division), on each valid token."""
    rewards, mask, lengths, _ = ragged_batch(B=3 * k, T=6, seed=12)
    advantages = dr_grpo_advantages(with_garbage(rewards, mask), mask, k)
    R = [sum(rewards[b, :n].tolist()) for b, n in enumerate(lengths)]
    expected = [R[i] - sum(R[j] for j in range(i // k * k, i // k * k + k)) / k for i in range(len(R))]
    assert_on_valid_tokens(advantages, mask, lengths, expected)
    # a group whose samples all score alike gets 0, as GRPO; but the scale is the rewards', not 1 / std
    r = torch.tensor([[1.0], [1.0], [0.0], [4.0]], dtype=torch.float64)
    torch.testing.assert_close(dr_grpo_advantages(r, torch.ones(4, 1), 2)[:, 0],
                               torch.tensor([0.0, 0.0, -2.0, 2.0], dtype=torch.float64))


def test_dr_grpo_loss_is_token_sums_over_a_constant_per_sequence():
    """Dr. GRPO's loss aggregation, as train_ppo.py computes it (token_mean=False): num_valid = sequences x the
    length budget L, so the loss is mean_i(sum_t loss_it / L): a long response's tokens weigh what a short one's do,
    unlike the per-sequence mean of GRPO (1 / |o_i|). Checked against the per-sequence loop at ratio 1."""
    _, mask, lengths, g = ragged_batch(B=6, T=5, seed=13)
    adv = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    logp = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    L = mask.shape[1]
    loss, _ = ppo_policy_loss(logp, logp.detach(), adv, mask, 0.2, num_valid=mask.shape[0] * L)
    want = sum(-sum(adv[b, :n].tolist()) / L for b, n in enumerate(lengths)) / mask.shape[0]
    assert loss.item() == pytest.approx(want, abs=1e-12)


def test_grpo_normalises_within_the_group_only():
    """Shifting or scaling one group's returns leaves every group's advantages as they were; a group whose
    samples score alike gets 0 (not NaN)."""
    k = 3
    r = torch.tensor([[1.0], [2.0], [4.0], [10.0], [10.0], [10.0], [-5.0], [0.0], [5.0]], dtype=torch.float64)
    m = torch.ones(9, 1)
    base = grpo_advantages(r, m, k)
    moved = r.clone()
    moved[6:] = moved[6:] * 100 + 7  # the third group only
    torch.testing.assert_close(grpo_advantages(moved, m, k), base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base[3:6], torch.zeros(3, 1, dtype=torch.float64))
    # group 1: mean 7/3, unbiased std sqrt(7/3)
    std = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    torch.testing.assert_close(base[:3, 0], (r[:3, 0] - 7 / 3) / (std + 1e-4))


def test_group_estimators_reject_partial_groups():
    r, m = torch.zeros(6, 2), torch.ones(6, 2)
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(r, m, 4)
    with pytest.raises(ValueError, match="k >= 2"):
        grpo_advantages(r, m, 1)


# ----------------------------------------------------------------------------------------------------------
# masked statistics


def test_whiten_hand_checked():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    torch.testing.assert_close(
        masked_whiten(x, mask), torch.tensor([[-1.2247449, 0.0, 1.2247449, 0.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        masked_whiten(x, mask, unbiased=True), torch.tensor([[-1.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    )
    # shift_mean=False adds the mean (2) back; the masked position stays 0.
    torch.testing.assert_close(
        masked_whiten(x, mask, shift_mean=False),
        torch.tensor([[2 - 1.2247449, 2.0, 2 + 1.2247449, 0.0]], dtype=torch.float64),
    )


def test_masked_stats_match_torch_on_valid_elements():
    x, mask, lengths, _ = ragged_batch(B=6, T=9, seed=4)
    x_garbage = with_garbage(x, mask)
    flat = x[mask]  # only the valid elements
    torch.testing.assert_close(masked_mean(x_garbage, mask), flat.mean())
    torch.testing.assert_close(masked_var(x_garbage, mask), torch.var(flat, unbiased=False))
    torch.testing.assert_close(masked_var(x_garbage, mask, unbiased=True), torch.var(flat, unbiased=True))
    # float and int masks behave like bool masks
    torch.testing.assert_close(masked_var(x_garbage, mask.double(), unbiased=True), torch.var(flat))
    torch.testing.assert_close(masked_mean(x_garbage, mask.long()), flat.mean())

    # per-row mean along dim=1 against a Python loop
    row_means = masked_mean(x_garbage, mask, dim=1)
    for b, row in enumerate(valid(x, mask)):
        assert row_means[b].item() == pytest.approx(sum(row) / len(row), abs=1e-12)

    # whitening against a loop over valid elements with statistics from torch.var
    for unbiased in (False, True):
        mean, var = flat.mean().item(), torch.var(flat, unbiased=unbiased).item()
        white = masked_whiten(x_garbage, mask, unbiased=unbiased)
        for b, n in enumerate(lengths):
            for t in range(x.shape[1]):
                expected = (x[b, t].item() - mean) / math.sqrt(var + 1e-8) if t < n else 0.0
                assert white[b, t].item() == pytest.approx(expected, abs=1e-10)


def test_masked_mean_empty_mask_is_zero():
    x = torch.randn(2, 3)
    assert masked_mean(x, torch.zeros(2, 3)).item() == 0.0


def test_explained_variance():
    returns, mask, _, g = ragged_batch(B=6, T=8, seed=5)
    values = returns + 0.3 * torch.randn(returns.shape, generator=g, dtype=torch.float64)
    r, v = returns[mask], values[mask]
    expected = 1 - torch.var(r - v, unbiased=False) / torch.var(r, unbiased=False)
    torch.testing.assert_close(explained_variance(with_garbage(values, mask), returns, mask), expected)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert math.isnan(explained_variance(values, torch.ones_like(returns), mask).item())


# ----------------------------------------------------------------------------------------------------------
# KL estimators


def test_kl_penalty_hand_checked():
    logprobs = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    ref_logprobs = torch.tensor([-1.5, -1.0], dtype=torch.float64)
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs), torch.tensor([0.5, -1.0], dtype=torch.float64))
    torch.testing.assert_close(
        kl_penalty(logprobs, ref_logprobs, "k2"), torch.tensor([0.125, 0.5], dtype=torch.float64)
    )
    torch.testing.assert_close(
        kl_penalty(logprobs, ref_logprobs, "k3"),
        torch.tensor([0.1065307, 0.7182818], dtype=torch.float64),
        rtol=0,
        atol=1e-7,
    )
    with pytest.raises(ValueError):
        kl_penalty(logprobs, ref_logprobs, "k4")


def test_kl_estimators_average_to_true_kl():
    # k1 and k3 are unbiased estimators of KL(p || q) for samples from p: check on two categoricals.
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    true_kl = (p * (p / q).log()).sum()
    logp, logq = p.log(), q.log()
    for estimator in ("k1", "k3"):
        expectation = (p * kl_penalty(logp, logq, estimator)).sum()  # exact expectation under p
        torch.testing.assert_close(expectation, true_kl)


# ----------------------------------------------------------------------------------------------------------
# log-probs and entropy from logits


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Force many small blocks (2 vocab rows, a B/T split that does not divide evenly) to test the tiling."""
    monkeypatch.setattr(losses, "_BLOCK_ELEMENTS", 2 * 11)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("small_blocks", [False, True])
def test_logprobs_match_log_softmax_gather(temperature, small_blocks, monkeypatch):
    if small_blocks:
        monkeypatch.setattr(losses, "_BLOCK_ELEMENTS", 2 * 11)
    g = torch.Generator().manual_seed(6)
    B, T, V = 3, 5, 11
    logits = torch.randn(B, T + 2, V, generator=g, dtype=torch.float64)[:, 1:-1]  # non-contiguous slice
    tokens = torch.randint(V, (B, T), generator=g)
    expected = torch.log_softmax(logits / temperature, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    out = logprobs_from_logits(logits, tokens, temperature)
    assert out.shape == (B, T) and out.dtype == torch.float64
    torch.testing.assert_close(out, expected)

    out32 = logprobs_from_logits(logits.float(), tokens, temperature)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, expected.float())


def test_logprobs_gradient(tiny_blocks):
    g = torch.Generator().manual_seed(7)
    small = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)  # gradcheck is O(numel^2)
    small_tokens = torch.randint(5, (2, 3), generator=g)
    assert torch.autograd.gradcheck(lambda z: logprobs_from_logits(z, small_tokens, 0.7), (small,))

    logits = torch.randn(2, 4, 11, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(11, (2, 4), generator=g)

    # same gradient as autograd through log_softmax + gather, for an arbitrary upstream gradient
    weights = torch.randn(2, 4, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((logprobs_from_logits(logits, tokens, 0.7) * weights).sum(), logits)
    reference = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens[..., None]).squeeze(-1)
    (expected,) = torch.autograd.grad((reference * weights).sum(), logits)
    torch.testing.assert_close(grad, expected)


def test_logprobs_large_logits_and_bf16(tiny_blocks):
    g = torch.Generator().manual_seed(8)
    B, T, V = 2, 3, 11
    tokens = torch.randint(V, (B, T), generator=g)

    big = torch.randn(B, T, V, generator=g) * 1e4  # fp32 logits spread over +-1e4
    reference = torch.log_softmax(big.double(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    out = logprobs_from_logits(big, tokens)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), reference, rtol=1e-6, atol=1e-5)

    # Large but close logits (1e4 + O(1)): log-probs are O(1) and must keep fp32 accuracy, which a
    # z[tok] - logsumexp(z) formula would lose (rounding the logsumexp near 1e4 costs ~1e-3).
    close = 1e4 + 3 * torch.randn(B, T, V, generator=g)
    reference = torch.log_softmax(close.double(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(close, tokens).double(), reference, rtol=0, atol=1e-5)

    low = (torch.randn(B, T, V, generator=g) * 30).to(torch.bfloat16).requires_grad_()
    reference = torch.log_softmax(low.double() / 0.7, -1).gather(-1, tokens[..., None]).squeeze(-1)
    out = logprobs_from_logits(low, tokens, 0.7)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-4)  # fp32 accuracy, not bf16's
    out.sum().backward()
    assert low.grad.dtype == torch.bfloat16 and torch.isfinite(low.grad.float()).all()


def test_logprobs_backward_keeps_no_fp32_copy_of_the_logits(tiny_blocks):
    # Record every tensor autograd saves for backward: only the bf16 logits and the tokens may be kept, not fp32
    # log-softmax blocks (which, summed over blocks, would be a full (B, T, V) fp32 copy).
    g = torch.Generator().manual_seed(17)
    logits = torch.randn(2, 3, 11, generator=g).to(torch.bfloat16).requires_grad_()
    tokens = torch.randint(11, (2, 3), generator=g)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = logprobs_from_logits(logits, tokens, 0.7)
    saved_fp32 = sum(t.numel() for t in saved if t.is_floating_point() and t.dtype != torch.bfloat16)
    assert saved_fp32 < logits.numel()
    assert any(t is logits or t.data_ptr() == logits.data_ptr() for t in saved)
    out.sum().backward()  # and backward still works from what was kept
    assert torch.isfinite(logits.grad.float()).all()


def test_entropy_matches_categorical(tiny_blocks):
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 4, 11, generator=g, dtype=torch.float64) * 3
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    for temperature in (1.0, 0.7):
        expected = torch.distributions.Categorical(logits=logits / temperature).entropy()
        torch.testing.assert_close(entropy_from_logits(logits, temperature), expected)
        torch.testing.assert_close(entropy_from_logits(logits, temperature, mask=mask), expected * mask)

    for big in (torch.randn(3, 4, 11, generator=g) * 1e4, 1e4 + 3 * torch.randn(3, 4, 11, generator=g)):
        expected = torch.distributions.Categorical(logits=big.double()).entropy()
        out = entropy_from_logits(big)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)

    low = (torch.randn(3, 4, 11, generator=g) * 5).to(torch.bfloat16)
    expected = torch.distributions.Categorical(logits=low.double()).entropy()
    torch.testing.assert_close(entropy_from_logits(low).double(), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# PPO losses


def policy_loss_loop(logprobs, old_logprobs, advantages, mask, cliprange):
    """Brute force: loop over valid tokens only, plain Python math."""
    terms, clipped = [], []
    for lp_row, old_row, a_row, m_row in zip(
        logprobs.tolist(), old_logprobs.tolist(), advantages.tolist(), mask.tolist()
    ):
        for lp, old, a, m in zip(lp_row, old_row, a_row, m_row):
            if not m:
                continue
            ratio = math.exp(lp - old)
            unclipped_term = -a * ratio
            clipped_term = -a * min(max(ratio, 1 - cliprange), 1 + cliprange)
            terms.append(max(unclipped_term, clipped_term))
            clipped.append(clipped_term > unclipped_term)
    return sum(terms) / len(terms), sum(clipped) / len(clipped)


def test_policy_loss_matches_loop():
    old_logprobs, mask, _, g = ragged_batch(B=6, T=8, seed=10)
    logprobs = old_logprobs + 0.3 * torch.randn(old_logprobs.shape, generator=g, dtype=torch.float64)
    advantages = torch.randn(old_logprobs.shape, generator=g, dtype=torch.float64)
    loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    expected_loss, expected_clipfrac = policy_loss_loop(logprobs, old_logprobs, advantages, mask, 0.2)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(expected_clipfrac, abs=1e-12)
    assert 0 < expected_clipfrac < 1  # the batch exercises both branches

    diffs = [lp - old for lp, old in zip(sum(valid(logprobs, mask), []), sum(valid(old_logprobs, mask), []))]
    assert stats["approx_kl"].item() == pytest.approx(0.5 * sum(d * d for d in diffs) / len(diffs), abs=1e-12)
    assert stats["ratio_mean"].item() == pytest.approx(sum(math.exp(d) for d in diffs) / len(diffs), abs=1e-12)
    assert all(not s.requires_grad for s in stats.values())


def value_loss_loop(values, old_values, returns, mask, c):
    terms, clipped = [], []
    for v_row, o_row, r_row, m_row in zip(values.tolist(), old_values.tolist(), returns.tolist(), mask.tolist()):
        for v, o, r, m in zip(v_row, o_row, r_row, m_row):
            if not m:
                continue
            v_clipped = min(max(v, o - c), o + c)
            unclipped_term, clipped_term = (v - r) ** 2, (v_clipped - r) ** 2
            terms.append(max(unclipped_term, clipped_term))
            clipped.append(clipped_term > unclipped_term)
    return 0.5 * sum(terms) / len(terms), sum(clipped) / len(clipped)


def test_value_loss_matches_loop():
    old_values, mask, _, g = ragged_batch(B=6, T=8, seed=11)
    values = old_values + 0.4 * torch.randn(old_values.shape, generator=g, dtype=torch.float64)
    returns = old_values + torch.randn(old_values.shape, generator=g, dtype=torch.float64)
    loss, stats = ppo_value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    expected_loss, expected_clipfrac = value_loss_loop(values, old_values, returns, mask, 0.2)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(expected_clipfrac, abs=1e-12)
    assert 0 < expected_clipfrac < 1


def test_policy_gradient_at_ratio_one_is_vanilla_policy_gradient():
    old_logprobs, mask, _, g = ragged_batch(B=5, T=6, seed=12)
    advantages = torch.randn(old_logprobs.shape, generator=g, dtype=torch.float64)
    logprobs = old_logprobs.clone().requires_grad_()
    loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    loss.backward()
    # d/d logp of mean_valid(-A * exp(logp - old)) at logp == old is -A / n_valid, and 0 at padding.
    expected = torch.where(mask, -advantages / mask.sum(), torch.zeros_like(advantages))
    torch.testing.assert_close(logprobs.grad, expected)
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0


def test_policy_clipping_switches_gradient_off_exactly_where_expected():
    c = 0.2
    # columns: (A > 0, r > 1+c) (A > 0, r < 1-c) (A < 0, r < 1-c) (A < 0, r > 1+c) (A > 0, r inside) (A < 0, inside)
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.1, 0.9]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0, -2.0]], dtype=torch.float64)
    gradient_off = [True, False, True, False, False, False]
    old_logprobs = torch.full_like(ratios, -2.0)
    logprobs = (old_logprobs + ratios.log()).requires_grad_()
    mask = torch.ones_like(ratios, dtype=torch.bool)
    loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=c)
    loss.backward()
    for t, off in enumerate(gradient_off):
        if off:
            assert logprobs.grad[0, t].item() == 0.0
        else:  # unclipped branch: d/dlogp (-A r) / n = -A r / n
            expected = -advantages[0, t].item() * ratios[0, t].item() / 6
            assert logprobs.grad[0, t].item() == pytest.approx(expected, rel=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(2 / 6)


def test_value_clipping_switches_gradient_off_exactly_where_expected():
    c = 0.2
    old_values = torch.zeros(1, 4, dtype=torch.float64)
    # v=0.5,R=0.4: clipped (0.2-0.4)^2 larger -> off. v=0.5,R=0: unclipped larger -> on.
    # v=-0.5,R=1: unclipped (1.5^2) larger -> on. v=0.1 (inside the clip range), R=1 -> on (branches equal).
    values = torch.tensor([[0.5, 0.5, -0.5, 0.1]], dtype=torch.float64, requires_grad=True)
    returns = torch.tensor([[0.4, 0.0, 1.0, 1.0]], dtype=torch.float64)
    loss, stats = ppo_value_loss(values, old_values, returns, torch.ones(1, 4), cliprange_value=c)
    loss.backward()
    # gradient of 0.5 * mean((v - R)^2) is (v - R) / n where the unclipped branch is active
    expected = torch.tensor([[0.0, 0.5 / 4, -1.5 / 4, -0.9 / 4]], dtype=torch.float64)
    torch.testing.assert_close(values.grad, expected)
    assert stats["clipfrac"].item() == pytest.approx(1 / 4)


def test_masked_positions_never_leak_into_outputs_or_gradients():
    old_logprobs, mask, _, g = ragged_batch(B=6, T=8, seed=13)
    logprobs = old_logprobs + 0.3 * torch.randn(old_logprobs.shape, generator=g, dtype=torch.float64)
    advantages = torch.randn(old_logprobs.shape, generator=g, dtype=torch.float64)
    values = torch.randn(old_logprobs.shape, generator=g, dtype=torch.float64)
    old_values = values + 0.3 * torch.randn(old_logprobs.shape, generator=g, dtype=torch.float64)
    returns = torch.randn(old_logprobs.shape, generator=g, dtype=torch.float64)

    def run(lp, old, adv, v, old_v, ret):
        lp, v = lp.clone().requires_grad_(), v.clone().requires_grad_()
        pg_loss, pg_stats = ppo_policy_loss(lp, old, adv, mask, 0.2)
        vf_loss, vf_stats = ppo_value_loss(v, old_v, ret, mask, 0.2)
        (pg_loss + vf_loss).backward()
        white = masked_whiten(adv, mask)
        adv_gae, ret_gae = gae(adv, v.detach(), mask, 1.0, 0.95)
        outputs = [pg_loss, vf_loss, *pg_stats.values(), *vf_stats.values(), white, adv_gae, ret_gae]
        outputs += [masked_mean(v.detach(), mask), masked_var(ret, mask), explained_variance(v.detach(), ret, mask)]
        return [o.detach() for o in outputs], lp.grad, v.grad

    clean = run(logprobs, old_logprobs, advantages, values, old_values, returns)
    dirty = run(*(with_garbage(x, mask, seed=i) for i, x in enumerate(
        [logprobs, old_logprobs, advantages, values, old_values, returns])))
    for a, b in zip(clean[0], dirty[0]):
        assert torch.equal(a, b)
    for grad_clean, grad_dirty in zip(clean[1:], dirty[1:]):
        assert torch.equal(grad_clean, grad_dirty)
        assert torch.isfinite(grad_dirty).all()
        assert (grad_dirty[~mask] == 0).all()
        assert (grad_dirty[mask] != 0).any()


# ----------------------------------------------------------------------------------------------------------
# micro-batch normalisation


def test_num_valid_micro_batches_sum_to_full_batch():
    old_logprobs, mask, _, g = ragged_batch(B=6, T=8, seed=14)
    logprobs = old_logprobs + 0.3 * torch.randn(old_logprobs.shape, generator=g, dtype=torch.float64)
    advantages = torch.randn(old_logprobs.shape, generator=g, dtype=torch.float64)
    old_values = torch.randn(old_logprobs.shape, generator=g, dtype=torch.float64)
    values = old_values + 0.3 * torch.randn(old_logprobs.shape, generator=g, dtype=torch.float64)
    returns = torch.randn(old_logprobs.shape, generator=g, dtype=torch.float64)

    lp_full = logprobs.clone().requires_grad_()
    v_full = values.clone().requires_grad_()
    pg_full, pg_stats_full = ppo_policy_loss(lp_full, old_logprobs, advantages, mask, 0.2)
    vf_full, vf_stats_full = ppo_value_loss(v_full, old_values, returns, mask, 0.2)
    (pg_full + vf_full).backward()

    num_valid = mask.sum()
    lp_micro = logprobs.clone().requires_grad_()
    v_micro = values.clone().requires_grad_()
    pg_sum = vf_sum = mean_sum = 0.0
    stats_sum = {"clipfrac": 0.0, "approx_kl": 0.0, "ratio_mean": 0.0, "vf_clipfrac": 0.0}
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):  # unequal micro-batches with different token counts
        pg, pg_stats = ppo_policy_loss(
            lp_micro[rows], old_logprobs[rows], advantages[rows], mask[rows], 0.2, num_valid=num_valid
        )
        vf, vf_stats = ppo_value_loss(
            v_micro[rows], old_values[rows], returns[rows], mask[rows], 0.2, num_valid=num_valid
        )
        (pg + vf).backward()  # gradients accumulate, as in gradient accumulation
        pg_sum, vf_sum = pg_sum + pg.item(), vf_sum + vf.item()
        mean_sum += masked_mean(values[rows], mask[rows], num_valid=num_valid).item()
        for k in ("clipfrac", "approx_kl", "ratio_mean"):
            stats_sum[k] += pg_stats[k].item()
        stats_sum["vf_clipfrac"] += vf_stats["clipfrac"].item()

    assert pg_sum == pytest.approx(pg_full.item(), abs=1e-12)
    assert vf_sum == pytest.approx(vf_full.item(), abs=1e-12)
    assert mean_sum == pytest.approx(masked_mean(values, mask).item(), abs=1e-12)
    for k in ("clipfrac", "approx_kl", "ratio_mean"):
        assert stats_sum[k] == pytest.approx(pg_stats_full[k].item(), abs=1e-12)
    assert stats_sum["vf_clipfrac"] == pytest.approx(vf_stats_full["clipfrac"].item(), abs=1e-12)
    torch.testing.assert_close(lp_micro.grad, lp_full.grad)
    torch.testing.assert_close(v_micro.grad, v_full.grad)

    # The naive per-micro-batch mean would differ here (ragged token counts), so the test is not vacuous.
    naive = sum(ppo_policy_loss(logprobs[r], old_logprobs[r], advantages[r], mask[r], 0.2)[0].item()
                for r in (slice(0, 1), slice(1, 4), slice(4, 6))) / 3
    assert abs(naive - pg_full.item()) > 1e-6


# ----------------------------------------------------------------------------------------------------------
# reward model loss


def test_bradley_terry_matches_bce_with_logits():
    g = torch.Generator().manual_seed(15)
    rewards_a = torch.randn(16, generator=g, dtype=torch.float64)
    rewards_b = torch.randn(16, generator=g, dtype=torch.float64)
    prob_a = torch.rand(16, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        bradley_terry_loss(rewards_a, rewards_b, prob_a),
        F.binary_cross_entropy_with_logits(rewards_a - rewards_b, prob_a),
    )
    torch.testing.assert_close(
        bradley_terry_loss(rewards_a, rewards_b),
        F.binary_cross_entropy_with_logits(rewards_a - rewards_b, torch.ones_like(prob_a)),
    )
    # swapping the pair and the label gives the same loss
    torch.testing.assert_close(
        bradley_terry_loss(rewards_b, rewards_a, 1 - prob_a), bradley_terry_loss(rewards_a, rewards_b, prob_a)
    )
    # p = 0.5 with equal rewards: log 2
    assert bradley_terry_loss(torch.zeros(3), torch.zeros(3), torch.full((3,), 0.5)).item() == pytest.approx(
        math.log(2)
    )


def test_bradley_terry_huge_gaps_are_finite():
    rewards_a = torch.tensor([1e4, -1e4, 1e4], requires_grad=True)
    rewards_b = torch.tensor([-1e4, 1e4, -1e4])
    prob_a = torch.tensor([1.0, 1.0, 0.7])
    loss = bradley_terry_loss(rewards_a, rewards_b, prob_a)
    # row 0: correct with certainty -> 0; row 1: wrong by 2e4 -> 2e4; row 2: 0.3 * 2e4 = 6e3
    assert loss.item() == pytest.approx((0 + 2e4 + 6e3) / 3, rel=1e-6)
    loss.backward()
    # d/dr_a = -(p - sigmoid(d)) / B
    torch.testing.assert_close(rewards_a.grad, torch.tensor([0.0, -1.0, 0.3]) / 3)


# ----------------------------------------------------------------------------------------------------------
# KL controllers


def test_adaptive_kl_controller_hand_computed():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # KL 3: error 3/6 - 1 = -0.5, clipped to -0.2; 0.1 * (1 - 0.2 * 512 / 10000) = 0.1 * 0.98976
    ctl.update(3.0, 512)
    assert ctl.value == pytest.approx(0.098976, rel=1e-12)
    # KL 6.6: error +0.1 (no clipping); multiply by 1 + 0.1 * 0.0512 = 1.00512
    ctl.update(torch.tensor(6.6, dtype=torch.float64), 512)  # a 0-d tensor is accepted
    assert ctl.value == pytest.approx(0.098976 * 1.00512, rel=1e-12)
    assert ctl.value == pytest.approx(0.0994827571, rel=1e-9)
    # KL 100: error clipped to +0.2; multiply by 1.01024
    ctl.update(100.0, 512)
    assert ctl.value == pytest.approx(0.0994827571 * 1.01024, rel=1e-9)
    # KL on target: unchanged
    before = ctl.value
    ctl.update(6.0, 512)
    assert ctl.value == pytest.approx(before, rel=1e-15)

    resumed = AdaptiveKLController(init_kl_coef=1.0, target=1.0, horizon=1)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.state_dict() == ctl.state_dict()
    assert resumed.update(7.0, 64) == ctl.update(7.0, 64)


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 512) == 0.05 and ctl.value == 0.05
    resumed = FixedKLController(1.0)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == 0.05


# ----------------------------------------------------------------------------------------------------------
# EOS truncation


@pytest.mark.parametrize("pad_id", [0, 9])  # pad_id 9 == eos_id, as with GPT-2's default
def test_truncate_after_eos_matches_loop(pad_id):
    eos_id = 9
    g = torch.Generator().manual_seed(16)
    tokens = torch.randint(0, 9, (8, 10), generator=g)  # no EOS yet
    tokens[0, 0] = eos_id  # EOS first
    tokens[1, 9] = eos_id  # EOS last
    tokens[2, 3] = tokens[2, 6] = eos_id  # two EOS
    tokens[3, 4] = eos_id
    tokens[3, 5:] = pad_id  # generator already padded after EOS
    tokens[4, 2], tokens[4, 7] = eos_id, eos_id
    # rows 5..7 have no EOS
    original = tokens.clone()
    out, mask = truncate_after_eos(tokens, eos_id, pad_id)
    assert torch.equal(tokens, original)  # input untouched
    assert mask.dtype == torch.long and out.dtype == tokens.dtype
    for b, row in enumerate(tokens.tolist()):
        first = row.index(eos_id) if eos_id in row else len(row)
        expected_tokens = row[: first + 1] + [pad_id] * (len(row) - first - 1)
        expected_mask = [1] * min(first + 1, len(row)) + [0] * (len(row) - first - 1)
        assert out[b].tolist() == expected_tokens
        assert mask[b].tolist() == expected_mask
    assert mask[5:].eq(1).all()
