"""The algorithm core of minirlaif: masked statistics, log-probs, KL estimators, advantage estimators (GAE,
REINFORCE with a baseline, RLOO, GRPO, REINFORCE++, Dr. GRPO), PPO and reward-model losses.

Everything here is a pure function on tensors (plus two tiny KL-coefficient controllers); no model code.

Conventions used throughout:
  * B = batch size, T = number of response tokens, V = vocabulary size.
  * A `mask` is 1 (or True) at valid tokens and 0 (or False) at padding. It may be bool, int or float.
  * Values at masked positions never reach a valid output or gradient: masked inputs are replaced with
    `torch.where` *before* any arithmetic (multiplying by the mask afterwards would turn inf into NaN, and
    NaN * 0 is still NaN), and masked outputs are exactly 0.

Sources followed (see docs/loss_math.md for the formulas and where the sources differ):
  * OpenAI lm-human-preferences (Ziegler et al. 2019): whitening, adaptive KL controller.
  * "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024) and TRL 0.13's PPOTrainer:
    per-token KL reward, GAE, clipped policy and value losses, clipfrac / approx_kl statistics.
  * "RLAIF vs. RLHF" (Lee et al. 2023): the soft-label Bradley-Terry reward-model loss; REINFORCE with a value
    baseline on a sequence-level reward.
  * Kool et al. 2019 / Ahmadian et al. 2024 ("Back to Basics"): RLOO; Shao et al. 2024 (DeepSeekMath): GRPO's
    group-normalised advantages.
  * Hu 2025 ("REINFORCE++"; OpenRLHF's `reinforce` estimator): the reward-to-go with the KL as a per-token reward;
    Liu et al. 2025 ("Understanding R1-Zero-Like Training"): Dr. GRPO.
  * Schulman, "Approximating KL divergence" (2020): the k1 / k2 / k3 estimators.
"""

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# ----------------------------------------------------------------------------------------------------------
# Masked statistics


def _denominator(mask, dim=None, num_valid=None):
    """Number of valid elements (or the caller's `num_valid`), never below 1 so an empty mask gives 0, not NaN."""
    if num_valid is not None:
        return num_valid
    count = mask.sum() if dim is None else mask.sum(dim)
    return count.clamp(min=1)


def masked_mean(x, mask, dim=None, num_valid=None, all_reduce=None):
    """Mean of `x` over valid positions: sum(x * mask) / sum(mask).

    x, mask: same shape, e.g. (B, T). With dim=None the result is a scalar, otherwise `dim` is reduced.
    num_valid: if given, divide by it instead of this call's number of valid elements. Used to normalise a
        loss over a whole mini-batch that is processed in several micro-batches: pass the mini-batch's total
        number of valid tokens to every micro-batch call and the micro-batch results *sum* to the mini-batch mean.
    all_reduce: a function that sums a tensor over processes (DDP); with it (and dim=None) the mean is over the
        valid positions of every process's `x`. Default: this process only.
    An empty mask gives 0 (the count is clamped to 1). Masked entries of `x` may hold anything, even inf/NaN.
    Follows masked_mean of OpenAI lm-human-preferences / TRL.
    """
    mask = mask.bool()
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))  # masked garbage -> 0
    total = x.sum() if dim is None else x.sum(dim)
    if all_reduce is not None:
        assert dim is None and num_valid is None, "all_reduce is for whole-tensor statistics"
        return all_reduce(total) / all_reduce(mask.sum().to(total.dtype)).clamp(min=1)
    return total / _denominator(mask, dim, num_valid)


def masked_var(x, mask, unbiased=False, all_reduce=None):
    """Variance of `x` over all valid positions (a scalar): mean_valid((x - mean_valid(x))^2).

    Biased (divide by n) by default, like OpenAI lm-human-preferences and the N+ details code. With
    unbiased=True the result is multiplied by n / (n - 1) (Bessel's correction), like TRL's masked_var.
    With unbiased=True and a single valid element the correction is skipped (n - 1 is clamped to 1) and the
    result is 0, where torch.var would give NaN. all_reduce: as in masked_mean (statistics over all processes).
    """
    mask = mask.bool()
    mean = masked_mean(x, mask, all_reduce=all_reduce)
    centered = torch.where(mask, x - mean, torch.zeros((), dtype=x.dtype, device=x.device))
    var = masked_mean(centered**2, mask, all_reduce=all_reduce)
    if unbiased:
        n = mask.sum() if all_reduce is None else all_reduce(mask.sum())
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x, mask, shift_mean=True, unbiased=False, eps=1e-8, all_reduce=None):
    """Whiten `x` with statistics of its valid positions: (x - mean) / sqrt(var + eps); 0 at masked positions.

    x, mask: (B, T) -> (B, T). mean and var are scalars over all valid positions of the batch.
    shift_mean=False adds the mean back (rescale only), as in OpenAI lm-human-preferences and TRL.
    Variance is biased by default (OpenAI / N+ details); unbiased=True matches TRL. Advantages are whitened
    with shift_mean=True; both are 'whiten' in OpenAI's code.
    all_reduce: a function summing a tensor over DDP processes, so mean and var are global across ranks (the
    trainer passes it; by default the statistics are this process's).
    """
    mask = mask.bool()
    mean = masked_mean(x, mask, all_reduce=all_reduce)
    var = masked_var(x, mask, unbiased=unbiased, all_reduce=all_reduce)
    whitened = (x - mean) * torch.rsqrt(var + eps)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


def explained_variance(values, returns, mask, all_reduce=None):
    """1 - Var[returns - values] / Var[returns] over valid tokens (a scalar; NaN when Var[returns] == 0).

    values, returns, mask: (B, T). 1 means the critic predicts the returns perfectly, 0 means it does no better
    than a constant, negative means worse. Same definition as cleanrl / the N+ details code
    (`val/explained_variance`), with biased variances. all_reduce: as in masked_mean (over all processes).
    """
    var_returns = masked_var(returns, mask, all_reduce=all_reduce)
    var_residual = masked_var(returns - values, mask, all_reduce=all_reduce)
    nan = torch.full((), float("nan"), dtype=var_returns.dtype, device=var_returns.device)
    return torch.where(var_returns > 0, 1 - var_residual / var_returns, nan)


# ----------------------------------------------------------------------------------------------------------
# Log-probabilities and entropy from logits, without a full (B, T, V) fp32 copy

# Elements (B*T*V) of one fp32 block: 2**25 floats = 128 MiB. Small enough next to a model, large enough that
# the Python loop runs only a few times for GPT-2-sized vocabularies (about 660 tokens per block at V=50257).
_BLOCK_ELEMENTS = 2**25


def _blocks(logits):
    """Yield (batch slice, time slice) pairs that tile a (B, T, V) tensor into blocks of ~_BLOCK_ELEMENTS.

    We slice along B and T (instead of flattening to (B*T, V)) so every block is a view even when `logits` is a
    non-contiguous slice such as model_logits[:, context_length - 1 : -1]; flattening that would copy it.
    """
    B, T, V = logits.shape
    t_step = max(1, min(T, _BLOCK_ELEMENTS // V))  # whole vocabulary rows, as many time steps as fit
    b_step = max(1, _BLOCK_ELEMENTS // (t_step * V))
    for b in range(0, B, b_step):
        for t in range(0, T, t_step):
            yield slice(b, b + b_step), slice(t, t + t_step)


def _compute_dtype(dtype):
    """At least fp32: bf16/fp16 logits are upcast per block; fp64 stays fp64 (useful for tests)."""
    return torch.promote_types(dtype, torch.float32)


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits / temperature) gathered at `tokens`, computed block by block in fp32.

    Forward saves nothing but references to its inputs: plain autograd would keep every block's fp32
    log-softmax for backward, which adds up to the full (B, T, V) fp32 copy we are avoiding. Backward recomputes
    the softmax block by block instead: d logp(tok) / d logit_j = (1[j == tok] - softmax_j) / temperature.
    """

    @staticmethod
    def forward(ctx, logits, tokens, temperature):
        dtype = _compute_dtype(logits.dtype)
        logprobs = torch.empty(tokens.shape, dtype=dtype, device=logits.device)  # (B, T)
        for bs, ts in _blocks(logits):
            z = logits[bs, ts].to(dtype) / temperature  # (b, t, V), one block in fp32
            # log_softmax computes (z - max) - log(sum(exp(z - max))), exact where logits are large and close;
            # z[tok] - logsumexp(z) would lose ~ulp(max logit) to rounding the logsumexp
            block_logprobs = torch.log_softmax(z, dim=-1)  # (b, t, V)
            logprobs[bs, ts] = block_logprobs.gather(-1, tokens[bs, ts].unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(logits, tokens)
        ctx.temperature = temperature
        return logprobs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs):
        logits, tokens = ctx.saved_tensors
        dtype = _compute_dtype(logits.dtype)
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # (B, T, V)
        for bs, ts in _blocks(logits):
            probs = torch.softmax(logits[bs, ts].to(dtype) / ctx.temperature, dim=-1)  # (b, t, V)
            g = grad_logprobs[bs, ts].unsqueeze(-1).to(dtype)  # (b, t, 1)
            block = -g * probs
            block.scatter_add_(-1, tokens[bs, ts].unsqueeze(-1), g)  # + g at the chosen token
            grad_logits[bs, ts] = (block / ctx.temperature).to(logits.dtype)
        return grad_logits, None, None


def logprobs_from_logits(logits, tokens, temperature=1.0):
    """Log-probability of each token under softmax(logits / temperature).

    logits: (B, T, V), any float dtype (bf16 is upcast one block at a time); tokens: (B, T) long.
    Returns (B, T) in fp32 (fp64 for fp64 logits): z[tok] - logsumexp(z) with z = logits / temperature.
    Logits must already be aligned with the tokens (the logits at position t predict tokens[:, t]).
    Dividing by the sampling temperature matches how the responses were sampled (N+ details, TRL); use the
    same temperature for the old, new and reference log-probs.
    Memory: never builds a full (B, T, V) fp32 log-softmax; differentiable w.r.t. logits with the same bound
    (backward recomputes each block's softmax). Stable for large logits (log_softmax subtracts the max).
    """
    return _TokenLogprobs.apply(logits, tokens, float(temperature))


def entropy_from_logits(logits, temperature=1.0, mask=None):
    """Entropy of softmax(logits / temperature) at every position: -sum_j p_j log p_j.

    logits: (B, T, V) -> (B, T) in fp32 (fp64 for fp64 logits); 0 at masked positions if `mask` is given.
    Computed block by block as -sum(p * log p) with log p = log_softmax(z), which avoids the cancellation
    of the equivalent logsumexp(z) - sum(p * z) for large logits. Meant for the `objective/entropy` metric
    (call under torch.no_grad(); gradients work, but autograd then keeps each block's fp32 intermediates).
    """
    dtype = _compute_dtype(logits.dtype)
    entropy = torch.empty(logits.shape[:-1], dtype=dtype, device=logits.device)  # (B, T)
    for bs, ts in _blocks(logits):
        z = logits[bs, ts].to(dtype) / temperature  # (b, t, V)
        logp = torch.log_softmax(z, dim=-1)  # (b, t, V)
        # a masked token (logit -inf: models.limit_vocab) has p = 0 and log p = -inf: 0 * -inf is NaN, 0 * min is 0
        entropy[bs, ts] = -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)
    if mask is not None:
        entropy = torch.where(mask.bool(), entropy, torch.zeros((), dtype=dtype, device=entropy.device))
    return entropy


# ----------------------------------------------------------------------------------------------------------
# KL penalty and advantage estimation


def kl_penalty(logprobs, ref_logprobs, estimator="k1"):
    """Per-token estimate of KL(policy || reference) from log-probs of the *sampled* tokens (elementwise).

    With d = logprobs - ref_logprobs (log pi - log pi_ref at the sampled token):
      k1 = d                          unbiased, can be negative per token; used by OpenAI, TRL and the N+ details.
      k2 = 0.5 * d^2                  biased, always >= 0, low variance.
      k3 = (exp(-d) - 1) + d          unbiased and always >= 0 (Schulman 2020); TRL's kl_estimator="k3".
    Any shape in, same shape out. Raises ValueError for an unknown estimator.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return (torch.exp(-log_ratio) - 1) + log_ratio  # = (exp(ref - logp) - 1) - (ref - logp)
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")


def td_residuals(rewards, values, mask, gamma):
    """TD residuals over response tokens: delta_t = r_t + gamma * V_{t+1} - V_t, with V = 0 after a sequence's last
    valid token (the episode ends with the response). rewards, values, mask: (B, T) -> (B, T), 0 at padding, at
    least fp32. GAE sums them (`gae`); train_ppo.py --trace shows them."""
    mask = mask.bool()
    dtype = _compute_dtype(torch.promote_types(rewards.dtype, values.dtype))
    zero = torch.zeros((), dtype=dtype, device=values.device)
    rewards = torch.where(mask, rewards.to(dtype), zero)  # (B, T), masked garbage -> 0
    values = torch.where(mask, values.to(dtype), zero)  # (B, T)
    next_values = F.pad(values[:, 1:], (0, 1))  # (B, T): V_{t+1}, 0 beyond the end and at padding
    return torch.where(mask, rewards + gamma * next_values - values, zero)


def gae(rewards, values, mask, gamma, lam):
    """Generalised Advantage Estimation (Schulman et al. 2016) over response tokens.

      delta_t = r_t + gamma * V_{t+1} - V_t          (td_residuals)
      A_t     = delta_t + gamma * lam * A_{t+1}
      returns = A + V
    rewards, values, mask: (B, T). The value and advantage after a sequence's last valid token are 0 (the
    episode ends with the response), so with ragged masks every sequence bootstraps from 0 at its own end.
    Masks are expected to be contiguous prefixes (valid tokens, then padding); the recursion is cut at every
    masked position, so masked rewards/values never leak into valid outputs. Returns (advantages, returns),
    both (B, T), 0 at masked positions, in at least fp32. Not whitened: see masked_whiten. Call under no_grad.
    Same recursion as the N+ details code and TRL 0.13 (which loop over reversed t the same way).
    """
    mask = mask.bool()
    deltas = td_residuals(rewards, values, mask, gamma)  # (B, T)
    values = torch.where(mask, values.to(deltas.dtype), torch.zeros((), dtype=deltas.dtype, device=deltas.device))
    zero = torch.zeros((), dtype=deltas.dtype, device=deltas.device)
    advantages = torch.zeros_like(deltas)  # (B, T)
    next_advantage = torch.zeros(deltas.shape[0], dtype=deltas.dtype, device=deltas.device)  # A_{t+1}
    for t in reversed(range(deltas.shape[1])):
        advantage = deltas[:, t] + gamma * lam * next_advantage  # (B,)
        advantage = torch.where(mask[:, t], advantage, zero)  # padding: A = 0, cutting the recursion
        advantages[:, t] = advantage
        next_advantage = advantage
    returns = torch.where(mask, advantages + values, zero)
    return advantages, returns


def sequence_returns(rewards, mask):
    """Undiscounted return of each whole response: the sum of its valid per-token rewards. (B, T) -> (B,), fp32+."""
    dtype = _compute_dtype(rewards.dtype)
    return torch.where(mask.bool(), rewards.to(dtype), torch.zeros((), dtype=dtype, device=rewards.device)).sum(1)


def _broadcast(per_sequence, mask):
    """A (B,) per-sequence advantage on every valid token of its row, 0 at padding. -> (B, T)"""
    zero = torch.zeros((), dtype=per_sequence.dtype, device=per_sequence.device)
    return torch.where(mask.bool(), per_sequence[:, None], zero)


def reinforce_advantages(rewards, values, mask):
    """REINFORCE with a learned value baseline, on a sequence-level reward (the RLAIF paper's estimator).

      R   = sum_t r_t                    (the response is one action: score - kl_coef * sum_t KL_t)
      A_t = R - V(x)                      on every valid token, V(x) = values[:, 0], the value before the first
                                          response token (it has seen only the query)
      returns_t = R                       every value position is trained toward the sequence's return
    rewards, values, mask: (B, T). Returns (advantages, returns), (B, T), 0 at padding, at least fp32. Unlike GAE
    (lam < 1) nothing is bootstrapped from later values: the baseline only lowers the variance, the expected
    gradient is the plain policy gradient's. Call under no_grad.
    """
    R = sequence_returns(rewards, mask)  # (B,)
    baseline = values[:, 0].to(R.dtype)  # (B,) V(x)
    return _broadcast(R - baseline, mask), _broadcast(R, mask)


def _groups(per_sequence, k):
    """(B,) -> (B / k, k): the k samples of each query are consecutive rows (the trainer lays batches out so)."""
    if k < 2 or per_sequence.shape[0] % k:
        raise ValueError(f"group estimators need k >= 2 samples per query and a batch of whole groups; got k={k}, "
                         f"batch {per_sequence.shape[0]}")
    return per_sequence.view(-1, k)


def rloo_advantages(rewards, mask, k):
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): no value model.

    Rows i = g*k .. g*k + k - 1 are k samples of the same query g. With R_i = sum_t r_t of sample i:
      A_i = R_i - (sum_{j in group, j != i} R_j) / (k - 1)
    i.e. the baseline of each sample is the mean return of the *other* samples of its query, so it does not
    depend on the sample itself and the gradient stays unbiased. A_i is put on every valid token of row i.
    rewards, mask: (B, T) with B a multiple of k >= 2. Returns advantages (B, T), 0 at padding. Call under no_grad.
    """
    R = _groups(sequence_returns(rewards, mask), k)  # (G, k)
    baseline = (R.sum(1, keepdim=True) - R) / (k - 1)  # (G, k), leave-one-out mean
    return _broadcast((R - baseline).flatten(), mask)


def grpo_advantages(rewards, mask, k, eps=1e-4):
    """GRPO-style group-normalised advantages (Shao et al. 2024): no value model.

      A_i = (R_i - mean_group(R)) / (std_group(R) + eps)
    with the mean and the (unbiased, as TRL's GRPOTrainer) std over the k samples of sample i's own query only;
    R_i = sum_t r_t. A_i is put on every valid token of row i. A group whose samples all score alike gets A = 0.
    rewards, mask: (B, T) with B a multiple of k >= 2. Returns advantages (B, T), 0 at padding. Call under no_grad.
    """
    R = _groups(sequence_returns(rewards, mask), k)  # (G, k)
    A = (R - R.mean(1, keepdim=True)) / (R.std(1, keepdim=True) + eps)  # (G, k)
    return _broadcast(A.flatten(), mask)


def reward_to_go(rewards, mask, gamma=1.0):
    """REINFORCE++'s advantage (Hu 2025; OpenRLHF's `--advantage_estimator reinforce`): no value model, no group.

      A_t = sum_{s >= t} gamma^(s - t) r_s        over the valid tokens of the response
    i.e. the return from token t on, with the per-token KL penalty inside r (so a token is charged for the KL of
    the tokens after it, not only for its own) and the score on the last token. The variance is tamed by the
    trainer's global whitening of the advantages over every valid token of the batch (biased, as OpenRLHF's;
    verl's divides by n - 1), not by a baseline. This is GAE with V = 0 and lam = 1.
    rewards, mask: (B, T). Returns (B, T), 0 at padding, at least fp32. Call under no_grad.
    """
    mask = mask.bool()
    dtype = _compute_dtype(rewards.dtype)
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    rewards = torch.where(mask, rewards.to(dtype), zero)  # (B, T)
    out = torch.zeros_like(rewards)  # (B, T)
    running = torch.zeros(rewards.shape[0], dtype=dtype, device=rewards.device)  # (B,) the return from t + 1 on
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, zero)  # padding cuts the sum
        out[:, t] = running
    return out


def dr_grpo_advantages(rewards, mask, k):
    """Dr. GRPO's advantage (Liu et al. 2025, "Understanding R1-Zero-Like Training"): the group mean baseline.

      A_i = R_i - mean_group(R)
    GRPO without the division by the group's std, which up-weights queries whose samples score alike (too easy or
    too hard). The paper's other fix is in the loss: each response's token sum is divided by a constant (the
    length budget), not by its own length (the trainer's `token_mean=False`). The trainer does not whiten these
    advantages either (whitening would divide by a std again). A_i is put on every valid token of row i.
    rewards, mask: (B, T) with B a multiple of k >= 2. Returns advantages (B, T), 0 at padding. Call under no_grad.
    """
    R = _groups(sequence_returns(rewards, mask), k)  # (G, k)
    return _broadcast((R - R.mean(1, keepdim=True)).flatten(), mask)


# ----------------------------------------------------------------------------------------------------------
# PPO losses


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange, num_valid=None):
    """PPO clipped surrogate policy loss, averaged over valid tokens.

      ratio   = exp(logprobs - old_logprobs)
      pg_loss = mean_valid( max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c)) )
    logprobs, old_logprobs, advantages, mask: (B, T); c = cliprange. Returns (pg_loss, stats).
    stats (detached scalars): clipfrac = fraction of valid tokens where the clipped term is strictly larger
    (TRL / N+ details); approx_kl = 0.5 * mean_valid((logprobs - old_logprobs)^2) (the k2 estimator, as in
    TRL / N+ details); ratio_mean = mean_valid(ratio).
    num_valid: divide by this instead of this call's valid-token count (see masked_mean). The loss and every stat
    then become this micro-batch's share of the mini-batch mean: *sum* them over micro-batches.
    Under torchrun, pass the global count (every rank's tokens) and sum the gradients over ranks.
    Masked positions get ratio 1 and advantage 0 via torch.where before exp, so garbage log-probs there
    produce no NaN/inf and exactly zero gradient.
    """
    mask = mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio = torch.where(mask, logprobs - old_logprobs, zero)  # (B, T), 0 at padding
    advantages = torch.where(mask, advantages, torch.zeros_like(advantages))  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    pg_losses = -advantages * ratio  # (B, T)
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)  # (B, T)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask, num_valid=num_valid)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_losses_clipped > pg_losses).to(pg_losses.dtype), mask, num_valid=num_valid),
            "approx_kl": 0.5 * masked_mean(log_ratio**2, mask, num_valid=num_valid),
            "ratio_mean": masked_mean(ratio, mask, num_valid=num_valid),
        }
    return pg_loss, stats


def ppo_value_loss(values, old_values, returns, mask, cliprange_value, num_valid=None):
    """PPO clipped value loss, averaged over valid tokens.

      values_clipped = clip(values, old_values - c, old_values + c)
      vf_loss        = 0.5 * mean_valid( max((values - R)^2, (values_clipped - R)^2) )
    values (new predictions), old_values (from the rollout), returns R, mask: (B, T); c = cliprange_value.
    Returns (vf_loss, stats) with stats["clipfrac"] = fraction of valid tokens where the clipped term is strictly
    larger (detached). Same formula as TRL 0.13 / N+ details. num_valid: as in ppo_policy_loss (sum over
    micro-batches). Masked inputs are replaced by 0 before any arithmetic: no NaN and zero gradient there.
    """
    mask = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = torch.where(mask, values, zero)  # (B, T)
    old_values = torch.where(mask, old_values, zero)  # (B, T)
    returns = torch.where(mask, returns, zero)  # (B, T)
    # clamp with tensor bounds returns `values` bit for bit when inside the range, so an unclipped token can never
    # count as clipped through rounding (old + clamp(v - old, -c, c) can differ from v in the last bit)
    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)  # (B, T)
    vf_losses = (values - returns) ** 2  # (B, T)
    vf_losses_clipped = (values_clipped - returns) ** 2  # (B, T)
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses_clipped), mask, num_valid=num_valid)
    with torch.no_grad():
        clipped = (vf_losses_clipped > vf_losses).to(vf_losses.dtype)  # (B, T)
        stats = {"clipfrac": masked_mean(clipped, mask, num_valid=num_valid)}
    return vf_loss, stats


# ----------------------------------------------------------------------------------------------------------
# Reward model loss


def bradley_terry_loss(rewards_a, rewards_b, prob_a=None):
    """Bradley-Terry reward-model loss with optional soft labels, averaged over the batch.

      loss = mean( -[p * log sigmoid(r_a - r_b) + (1 - p) * log sigmoid(r_b - r_a)] )
    rewards_a, rewards_b: (B,) scalar rewards of the two responses; prob_a: (B,) probability that a is preferred
    (the AI labeler's soft label, RLAIF paper Sec. 2.2), or None for hard labels where a is the preferred one
    (p = 1, i.e. -log sigmoid(r_chosen - r_rejected) as in InstructGPT / TRL). This is the cross-entropy
    between the label and softmax([r_a, r_b]). F.logsigmoid keeps it finite for reward gaps of any size.
    """
    diff = rewards_a - rewards_b  # (B,)
    if prob_a is None:
        return -F.logsigmoid(diff).mean()
    prob_a = prob_a.to(diff.dtype)
    return -(prob_a * F.logsigmoid(diff) + (1 - prob_a) * F.logsigmoid(-diff)).mean()


# ----------------------------------------------------------------------------------------------------------
# KL coefficient controllers


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, OpenAI lm-human-preferences).

    After each update with measured KL (per sequence, summed over tokens) and n_steps episodes:
      e      = clip(KL / target - 1, -0.2, 0.2)
      value *= 1 + e * n_steps / horizon
    so the coefficient grows when the KL is above target and shrinks when below, by at most 20% per horizon.
    """

    def __init__(self, init_kl_coef, target, horizon):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl, n_steps):
        current_kl = float(current_kl)  # accepts a 0-d tensor
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self):
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state):
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


class FixedKLController:
    """Constant KL coefficient with the same interface as AdaptiveKLController (update is a no-op)."""

    def __init__(self, kl_coef):
        self.value = float(kl_coef)

    def update(self, current_kl, n_steps):
        return self.value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = float(state["value"])


# ----------------------------------------------------------------------------------------------------------
# Response post-processing


def truncate_after_eos(tokens, eos_id, pad_id):
    """Replace every token after the first EOS with pad; return (tokens, mask). The input is not modified.

    tokens: (B, T) long response tokens, generated without stopping at EOS (N+ details: generate a fixed length,
    then truncate). Returns new tokens (B, T) and mask (B, T) long: 1 up to and including the first EOS, 0 after.
    A row without EOS stays fully valid (the trainer penalises it separately). The mask comes only from the EOS
    position, never from comparing with pad_id, so it is right even when pad_id == eos_id (GPT-2's default)
    and whatever the generator wrote after EOS.
    """
    is_eos = tokens == eos_id  # (B, T)
    eos_seen_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0  # (B, T), strictly after the first EOS
    truncated = torch.where(eos_seen_before, torch.full_like(tokens, pad_id), tokens)
    mask = (~eos_seen_before).long()
    return truncated, mask
