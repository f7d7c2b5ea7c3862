"""Stage 4, RL: fine-tune the SFT policy to maximise the reward, with a KL penalty to the SFT policy.

One update, in main()'s numbered steps (docs/algorithms.md explains each, with the sources):
  1. models: the policy and a frozen reference from SFT; the frozen reward (the RM, or with --reward direct a
     labeler's 1-10 rating: d-RLAIF); a value model from the RM for the estimators with a learned baseline;
  2. rollout: sample up to `response_length` tokens per query at `temperature`, stopping once every row has
     emitted EOS; old and reference log-probs (and values) on the same temperature-scaled logits;
  3. score: the reward of query + response, less `missing_eos_penalty` without EOS; unrated episodes leave, counted;
  4. KL rewards: per token -kl_coef * KL_t, the score added on the last valid token (the EOS itself);
  5. advantages: the `--algo` estimator (ESTIMATORS), then whitened over every valid token of the global batch;
  6. update: `ppo_epochs` passes in mini-batches of micro-batches, the clipped policy loss and vf_coef * the clipped
     value loss, normalised by the mini-batch's valid tokens over all ranks; clipping, AdamW, linear lr decay;
  7. KL controller: fixed, or adaptive on the measured KL.
The math is in minirlaif/losses.py, the run machinery (torchrun, checkpoints, logs) in minirlaif/run.py.

Deliberate deviations from TRL 0.13's PPOTrainer: old log-probs from sampling (one forward pass saved), the score
on the EOS (TRL: one slot later), losses normalised over the mini-batch (TRL: per micro-batch); from the papers:
the paper's REINFORCE's (1 - beta) r - beta KL is our r - kl_coef KL up to a scale whitening removes, and the group
estimators keep the KL in the reward (as TRL's RLOO), not in the loss (GRPO's paper).

Commands (--trace N writes N episodes' numbers token by token into out_dir/trace):
  CPU, tiny (default):  python train_ppo.py            (fp32; --bf16 on a CPU with AVX512-BF16/AMX: ~1.7x)
  RLHF baseline:        python train_ppo.py --rm-path runs/tiny/rm_human --out-dir runs/tiny/ppo_rlhf
  other RL:             python train_ppo.py --algo rloo --out-dir runs/tiny/rloo; d-RLAIF: --reward direct
  GPUs:                 [torchrun --nproc_per_node 4] train_ppo.py --preset gpt2-large [--rollout-backend vllm]
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from minirlaif.config import Between, Choice, NonNegative, Positive, PositiveOrAll, require
from minirlaif.data import load_posts
from minirlaif.generation import row_seeds, rollout_engine
from minirlaif.labelers import LabelerConfig, make_labeler
from minirlaif.lora import adapters_off
from minirlaif.losses import (AdaptiveKLController, FixedKLController, dr_grpo_advantages, entropy_from_logits,
                              explained_variance, gae, grpo_advantages, kl_penalty, logprobs_from_logits, masked_mean,
                              masked_whiten, ppo_policy_loss, ppo_value_loss, reinforce_advantages, reward_to_go,
                              rloo_advantages)
from minirlaif.models import (check_model, disable_dropout, last_index, load_causal_lm, load_scalar_model,
                              load_tokenizer, pad_batch, response_logits, set_attention, token_scores, trim)
from minirlaif.reward import LabelerReward, RMReward, leave_out_unscored, write_samples
from minirlaif.run import Run, RunConfig, cli, trained_parameters
from minirlaif.tasks import get_task
from minirlaif.trace import PPOTrace, traced_updates
from minirlaif.utils import autocast, batch_indices, first_last, linear_lr


@dataclass
class Estimator:
    """One --algo: how advantages are estimated and what that needs."""
    advantages: Callable  # (rewards, values, mask, k, cfg) -> (advantages, returns or None), each (B, R)
    value_model: bool     # learns a baseline V(s): a value model is loaded, trained and checkpointed
    k: int                # samples per query when --samples-per-query is -1
    min_k: int = 1        # the group estimators compare the k samples of one query
    whiten: bool = True   # whiten the advantages over every valid token of the global batch
    token_mean: bool = True  # loss / the mini-batch's valid tokens; False: / (its sequences * response_length)


# step 5: adding an estimator is a function in losses.py and a line here
ESTIMATORS = {
    "ppo": Estimator(lambda r, v, m, k, cfg: gae(r, v, m, cfg.gamma, cfg.lam), value_model=True, k=1),
    "reinforce": Estimator(lambda r, v, m, k, cfg: reinforce_advantages(r, v, m), value_model=True, k=1),
    "rloo": Estimator(lambda r, v, m, k, cfg: (rloo_advantages(r, m, k), None), value_model=False, k=4, min_k=2),
    "grpo": Estimator(lambda r, v, m, k, cfg: (grpo_advantages(r, m, k), None), value_model=False, k=4, min_k=2),
    "reinforce++": Estimator(lambda r, v, m, k, cfg: (reward_to_go(r, m, cfg.gamma), None), value_model=False, k=1),
    # Dr. GRPO divides by no std (so it is not whitened either) and sums each response's tokens over a constant
    "dr-grpo": Estimator(lambda r, v, m, k, cfg: (dr_grpo_advantages(r, m, k), None), value_model=False, k=4,
                         min_k=2, whiten=False, token_mean=False),
}


@dataclass
class Config(LabelerConfig, RunConfig):  # inherited: --labeler and its settings (d-RLAIF's rater), the run settings
    # run
    preset: str = "tiny"
    """tiny: synthetic task on CPU; micro: a smoke run; smol: SmolLM2-135M; gpt2-large: the seed's settings"""
    out_dir: str = "runs/{preset}/ppo"
    """the policy, metrics.json(l), samples.jsonl, manifest.json and the checkpoint go here"""
    seed: int = 1
    """seeds sampling, data order and every RNG"""
    # inputs
    task_dir: str = "runs/{preset}/data"
    """tiny: where the synthetic task's files are written (if missing); empty for real data"""
    sft_path: str = "runs/{preset}/sft"
    """initial policy and frozen reference"""
    rm_path: str = "runs/{preset}/rm"
    """frozen reward model"""
    value_path: str = ""
    """initial value model: an RM, or a causal LM (a new head seeded by --seed); empty: the RM (d-RLAIF: SFT)"""
    dataset: str = "runs/{preset}/data/sft"
    """queries: hub id or local file/dir in any supported schema (prompt-only rows too)"""
    split: str = "train"
    """split of the dataset the queries come from"""
    max_query_tokens: Positive[int] = 200
    """queries longer than this are cut at the post's last newline"""
    # algorithm and reward
    algo: Choice(*ESTIMATORS) = "ppo"
    """advantage estimator (train_ppo.ESTIMATORS); rloo, grpo, reinforce++ and dr-grpo train no value model"""
    samples_per_query: PositiveOrAll[int] = -1
    """k responses per query, in one rank's consecutive rows; -1: the estimator's (4 for rloo, grpo, dr-grpo)"""
    reward: Choice("rm", "direct") = "rm"
    """rm: the reward model's score; direct: d-RLAIF, the labeler's expected 1-10 rating rescaled to [-1, 1]"""
    rule_noise: NonNegative[float] = 1.0  # d-RLAIF's rule labeler is as noisy as label.py's
    # batch sizes
    total_episodes: Positive[int] = 1024
    """episodes (sampled responses) to train on"""
    batch_size: Positive[int] = 64
    """episodes per update, over all ranks"""
    mini_batches: Positive[int] = 1
    """mini-batches per PPO epoch (one optimizer step each)"""
    micro_batch_size: Positive[int] = 16
    """sequences per forward/backward pass on one rank"""
    rollout_batch_size: PositiveOrAll[int] = -1
    """sequences per generation + scoring chunk on one rank; -1: the rank's whole batch at once"""
    ppo_epochs: Positive[int] = 4
    """passes over each batch (1: on-policy, the ratio stays 1)"""
    # sampling
    response_length: Positive[int] = 48
    """max new tokens per response"""
    temperature: Positive[float] = 0.7
    """sampling temperature; every log-prob is computed on logits / temperature"""
    rollout_backend: Choice("hf", "vllm") = "hf"
    """hf: the shared KV-cache sampler; vllm: a vLLM engine per rank, synced before every rollout"""
    rollout_gpu_memory_utilization: Between(0.01, 1) = 0.3
    """--rollout-backend vllm on a GPU: the share of its memory the engine may take (the trainer needs the rest)"""
    # KL
    kl_coef: NonNegative[float] = 0.05
    """initial KL coefficient (beta)"""
    kl_estimator: Choice("k1", "k2", "k3") = "k1"
    """per-token KL estimator in the reward: k1 (logp - ref), k2 ((logp - ref)^2 / 2) or k3"""
    kl_target: NonNegative[float] = 0.0
    """target KL of the adaptive controller; 0: a fixed kl_coef"""
    kl_horizon: Positive[int] = 10000
    """adaptive controller horizon in episodes"""
    # rewards, advantages and clipping
    missing_eos_penalty: float = 1.0
    """subtracted from the score of a response that never emits EOS"""
    whiten_rewards: bool = False
    """whiten the per-token rewards (scale only) before the advantage estimator"""
    gamma: Between(0, 1) = 1.0
    """discount (ppo's GAE, reinforce++'s reward-to-go)"""
    lam: Between(0, 1) = 0.95
    """GAE lambda (ppo)"""
    cliprange: Positive[float] = 0.2
    """policy ratio clip"""
    cliprange_value: Positive[float] = 0.2
    """value clip around the rollout's values"""
    vf_coef: NonNegative[float] = 0.1
    """value loss weight"""
    # optimiser
    lr: Positive[float] = 3e-4
    """policy learning rate (linear decay to 0)"""
    value_lr: PositiveOrAll[float] = -1.0
    """value model learning rate; -1: the same as lr"""
    weight_decay: NonNegative[float] = 0.0
    """AdamW weight decay"""
    grad_clip: Positive[float] = 1.0
    """max gradient norm, per model"""
    # samples
    sample_every: Positive[int] = 5
    """updates between rows of samples.jsonl"""
    n_samples: NonNegative[int] = 4
    """samples per row group in samples.jsonl"""
    trace: NonNegative[int] = 0
    """trace this many episodes (rank 0's first) of each --trace-updates, token by token, into out_dir/trace"""
    trace_updates: str = "first,last"
    """the updates --trace traces: first, last and update numbers, comma-separated"""


PRESETS = {
    "micro": dict(total_episodes=48, batch_size=16, micro_batch_size=8, response_length=16, sample_every=1,
                  n_samples=2, checkpoint_every=1),
    "smol": dict(lora_rank=16, lora_alpha=32.0, max_query_tokens=160, total_episodes=320, batch_size=16,
                 micro_batch_size=8, response_length=48, ppo_epochs=1, lr=5e-5, kl_coef=0.2, checkpoint_every=5),
    "hh-tiny": dict(task="hh", kl_coef=0.2),  # the dialogue task (README): KL coef 0.05 drifted to KL 7 there
    "gpt2-large": dict(task_dir="", dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered", max_query_tokens=512,
                       total_episodes=912 * 128, batch_size=128, micro_batch_size=8, response_length=128, lr=1e-5,
                       sample_every=20, checkpoint_every=50, bf16=True),
}


# ---- steps 1-5: models, rollout, scores, KL rewards, advantages -------------------------------------------------


def load_models(cfg: Config, tokenizer, run, value_path: str):
    """Step 1: policy, frozen reference, frozen reward, and the value model (None for a value-free estimator).
    `run.prepare` puts each on the device; --lora-rank: adapters on the trained ones; --fsdp: all sharded."""
    def load(loader, path, **kw):  # dropout off everywhere: the same weights give the same log-probs, ratio 1
        return set_attention(disable_dropout(loader(path, **kw)), run.device, cfg.bf16)  # CPU bf16: eager attention

    policy = run.prepare(load(load_causal_lm, cfg.sft_path).train())
    # with LoRA the reference is the policy with its adapters off (rollout, step 2): no second copy of the weights
    ref_policy = None if cfg.lora_rank else run.prepare(load(load_causal_lm, cfg.sft_path), frozen=True)
    pad = tokenizer.pad_token_id  # the scalar models' padding id
    if cfg.reward == "rm":
        reward = RMReward(run.prepare(load(load_scalar_model, cfg.rm_path, pad_token_id=pad), frozen=True), tokenizer)
    else:  # d-RLAIF: the labeler's ratings are the reward
        reward = LabelerReward(make_labeler(cfg, cfg.seed), tokenizer)
    # the value model: a new head (from a causal LM) is seeded by --seed, the same on every rank; LoRA: a full head
    value_model = (run.prepare(load(load_scalar_model, value_path, pad_token_id=pad, head_seed=cfg.seed).train(),
                               trained=["score"]) if ESTIMATORS[cfg.algo].value_model else None)
    return policy, ref_policy, value_model, reward


def batch_layout(cfg: Config, world_size: int) -> tuple[int, int]:
    """(samples per query k, updates), once the batch is checked to split into groups, mini- and micro-batches."""
    est, local_batch = ESTIMATORS[cfg.algo], cfg.batch_size // world_size
    k = cfg.samples_per_query if cfg.samples_per_query > 0 else est.k
    require(k >= est.min_k, f"--algo {cfg.algo} compares samples of a query: --samples-per-query must be >= "
                            f"{est.min_k}, got {k}")
    require(cfg.batch_size % (k * world_size) == 0, f"--batch-size {cfg.batch_size} must split into whole groups of "
            f"--samples-per-query {k} on each of the {world_size} rank(s)")
    require(local_batch % (cfg.mini_batches * cfg.micro_batch_size) == 0, f"each rank's batch ({local_batch} of "
            f"--batch-size {cfg.batch_size}) must split into --mini-batches {cfg.mini_batches} of whole "
            f"--micro-batch-size {cfg.micro_batch_size} micro-batches")
    require(cfg.total_episodes >= cfg.batch_size, f"--total-episodes {cfg.total_episodes} must be >= --batch-size")
    require(cfg.lora_dropout == 0, "--lora-dropout must be 0 in PPO: dropout off everywhere keeps the first ratio at 1")
    require(cfg.reward == "rm" or cfg.labeler != "vllm" or world_size == 1,
            "--reward direct --labeler vllm runs in one process (one engine); under torchrun rate with hf or openai")
    return k, cfg.total_episodes // cfg.batch_size


def episode_layout(update: int, n_queries: int, k: int, cfg: Config, dist) -> tuple[list[int], list[int]]:
    """This rank's (query index, sampling seed) per row of update `update`'s global batch: batch_size / k queries,
    each sampled k times in consecutive rows (a group); group g goes to rank g % world_size, so a group estimator
    sees all of a query's samples on one rank. A row's seed depends only on (seed, update, its place in the global
    batch): any number of ranks samples what one process samples."""
    n_groups = cfg.batch_size // k
    queries = batch_indices(update, n_queries, n_groups, cfg.seed)  # (n_groups,): a seeded epoch permutation
    seeds = row_seeds(cfg.seed, update, n=cfg.batch_size)  # (batch_size,), row g * k + j: sample j of group g
    mine = range(dist.rank, n_groups, dist.world_size)
    return [queries[g] for g in mine for _ in range(k)], [seeds[g * k + j] for g in mine for j in range(k)]


def response_values(value_model, ids, mask, n_response: int) -> torch.Tensor:
    """V(s_t) for each response token t: the value head at the position just before the token. (B, R)
        position:  ... q_last  r_0  r_1 ... r_{R-1}
        value:         V(r_0) V(r_1) ...  V(r_{R-1})   (the state before the token is sampled)"""
    return token_scores(value_model, ids, mask)[:, -n_response - 1:-1]


@torch.no_grad()
def rollout(policy, ref_policy, value_model, reward, queries: list[list[int]], seeds: list[int], tokenizer,
            cfg: Config, device, posts, engine) -> dict:
    """Steps 2-3: sample responses with `engine` (the rollout backend) and score them. Returns the tensors the
    update needs, (B, R) unless noted; "values" only with a value model."""
    q_ids, q_mask = (t.to(device) for t in pad_batch(queries, tokenizer.pad_token_id, side="left"))  # (B, Q)
    out = {k: [] for k in ("query", "query_mask", "response", "response_mask", "logprobs", "ref_logprobs", "scores",
                           *(("values",) if value_model is not None else ()))}
    chunk = cfg.rollout_batch_size if cfg.rollout_batch_size > 0 else len(queries)
    for i in range(0, len(queries), chunk):
        q, qm = q_ids[i: i + chunk], q_mask[i: i + chunk]
        with autocast(device, cfg.bf16):
            # 2. sample; it stops once every row has emitted EOS and pads after each row's first EOS: the response
            # mask comes from EOS positions, never from comparing ids with the pad id. Its log-probs are the old ones
            gen = engine.generate(policy, q, qm, cfg.response_length, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                  cfg.temperature, seeds[i: i + chunk])
            ids, mask, R = torch.cat([q, gen.tokens], 1), torch.cat([qm, gen.mask], 1), gen.tokens.shape[1]  # (b, Q+R)
            # the reference on the same temperature-scaled logits as the sampler: else the first KL would not be 0,
            # and it would measure the distance to another policy (N+ details, TRL). --lora-rank: the reference is
            # the policy with its adapters off, the SFT model's outputs exactly (lora.adapters_off), no second copy
            with adapters_off(policy) if ref_policy is None else nullcontext():
                ref_logits = response_logits(policy if ref_policy is None else ref_policy, ids, mask, R)
            ref_logprobs = logprobs_from_logits(ref_logits, gen.tokens, cfg.temperature)
            per_token = {"response_mask": gen.mask, "logprobs": gen.logprobs, "ref_logprobs": ref_logprobs * gen.mask}
            if value_model is not None:
                per_token["values"] = response_values(value_model, ids, mask, R) * gen.mask
            # 3. score the truncated query + response: NaN where a labeler could not (never a made-up reward)
            scores = reward(ids, mask, R, posts[i: i + chunk])  # (b,)
        pad = (0, cfg.response_length - R)  # each chunk's responses padded to response_length, so that chunks stack
        out["response"].append(F.pad(gen.tokens, pad, value=tokenizer.pad_token_id))
        for key, v in per_token.items():
            out[key].append(F.pad(v, pad))
        for key, v in (("query", q), ("query_mask", qm), ("scores", scores)):
            out[key].append(v)
    batch = {key: torch.cat(v) for key, v in out.items()}
    batch["has_eos"] = ((batch["response"] == tokenizer.eos_token_id) & batch["response_mask"].bool()).any(1)  # (B,)
    batch["raw_scores"] = batch["scores"]
    # the N+ details' "EOS trick", as TRL's missing_eos_penalty: a response cut at response_length scores lower
    batch["scores"] = batch["scores"] - cfg.missing_eos_penalty * (~batch["has_eos"]).float()
    return batch


@torch.no_grad()
def kl_rewards_and_advantages(batch: dict, kl_coef: float, k: int, cfg: Config, dist) -> dict:
    """Steps 4-5: per-token rewards with the KL penalty, the estimator's advantages (whitened) and returns.

        token:     r_0      r_1      ...  r_last (EOS)        pad
        reward:   -b KL_0  -b KL_1   ...  -b KL_last + score   0
    """
    mask = batch["response_mask"]
    # 4. the KL the reward uses (and objective/kl logs), and the score on the last valid token: the EOS itself, so
    # the response mask is the only mask (TRL and the N+ details put it one slot later, on padding)
    kl = kl_penalty(batch["logprobs"], batch["ref_logprobs"], cfg.kl_estimator) * mask  # (B, R)
    rewards = -kl_coef * kl  # (B, R)
    rewards[torch.arange(mask.shape[0], device=mask.device), last_index(mask)] += batch["scores"]
    # 5. advantages; whitening's mean and variance are over every rank's valid tokens, so N ranks whiten like one
    est = ESTIMATORS[cfg.algo]
    if cfg.whiten_rewards:  # scale only: the mean reward is kept (OpenAI, TRL)
        rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=dist.all_reduce)
    raw_advantages, returns = est.advantages(rewards, batch.get("values"), mask, k, cfg)
    # returns are not whitened: the value model learns the returns' own scale
    advantages = masked_whiten(raw_advantages, mask, all_reduce=dist.all_reduce) if est.whiten else raw_advantages
    return {**batch, "kl": kl, "rewards": rewards, "raw_advantages": raw_advantages, "advantages": advantages,
            **({"returns": returns} if returns is not None else {})}


# ---- step 6: the update -----------------------------------------------------------------------------------------


UPDATE_KEYS = ("query", "query_mask", "response", "response_mask", "logprobs", "values", "advantages", "returns")


def policy_loss(policy, mb: dict, num_valid, cfg: Config, device) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Step 6, policy half, on one micro-batch: its share of the mini-batch's clipped policy loss (the shares sum to
    the mean: `num_valid` counts the whole mini-batch), its statistics, and the new log-probs (b, R) it used."""
    ids, mask = torch.cat([mb["query"], mb["response"]], 1), torch.cat([mb["query_mask"], mb["response_mask"]], 1)
    m = mb["response_mask"]
    with autocast(device, cfg.bf16):
        logits = response_logits(policy, ids, mask, m.shape[1])  # (b, R, V): the head on response positions only
        logprobs = logprobs_from_logits(logits, mb["response"], cfg.temperature)  # (b, R)
    pg_loss, stats = ppo_policy_loss(logprobs, mb["logprobs"], mb["advantages"], m, cfg.cliprange, num_valid=num_valid)
    with torch.no_grad():
        entropy = masked_mean(entropy_from_logits(logits, cfg.temperature), m, num_valid=num_valid)
    return pg_loss, {"objective/entropy": entropy, "ppo/policy_loss": pg_loss.detach(),
                     **{f"ppo/{k}": v for k, v in stats.items()}}, logprobs.detach()


def value_loss(value_model, mb: dict, num_valid, cfg: Config, device) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Step 6, value half, on one (trimmed) micro-batch: its share of the mini-batch's clipped value loss, its
    statistics, and the new values (b, R) it used."""
    ids, mask = torch.cat([mb["query"], mb["response"]], 1), torch.cat([mb["query_mask"], mb["response_mask"]], 1)
    with autocast(device, cfg.bf16):
        values = response_values(value_model, ids, mask, mb["response"].shape[1])  # (b, R)
    vf_loss, stats = ppo_value_loss(values, mb["values"], mb["returns"], mb["response_mask"], cfg.cliprange_value,
                                    num_valid=num_valid)
    return vf_loss, {"ppo/value_loss": vf_loss.detach(), "val/clipfrac": stats["clipfrac"]}, values.detach()


def ppo_update(policy, value_model, optimizers: dict, batch: dict, update: int, cfg: Config, run, trace=None) -> dict:
    """Step 6: `ppo_epochs` passes over this rank's batch, each a fresh seeded permutation, in `mini_batches`
    mini-batches (one optimizer step each) of micro-batches. Returns each statistic summed over micro-batches."""
    local_batch = cfg.batch_size // run.world_size
    local_mini, est, sums = local_batch // cfg.mini_batches, ESTIMATORS[cfg.algo], {}
    perm_gen = torch.Generator().manual_seed(cfg.seed * 104729 + update * 31 + run.rank)  # resumes exactly
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(local_batch, generator=perm_gen)
        for start in range(0, local_batch, local_mini):
            mini = perm[start: start + local_mini]
            # the loss is a mean over the valid tokens of the whole mini-batch over all ranks (Dr. GRPO: its
            # sequences times the length budget), not per micro-batch, which would weigh tokens unequally
            n = batch["response_mask"][mini].sum() if est.token_mean else len(mini) * cfg.response_length
            num_valid = run.all_reduce(torch.as_tensor(n, device=run.device).float())
            for m_start in range(0, local_mini, cfg.micro_batch_size):
                rows = mini[m_start: m_start + cfg.micro_batch_size]
                mb = trim({key: batch[key][rows] for key in UPDATE_KEYS if key in batch})  # the same numbers, cheaper
                # the policy's graph is freed by its backward before the value model's forward: half the
                # activation memory of one combined loss, the same gradients
                pg_loss, stats, logprobs = policy_loss(policy, mb, num_valid, cfg, run.device)
                run.check_finite(update + 1, policy_loss=pg_loss)  # stop before a NaN reaches the weights
                pg_loss.backward()
                values = None
                if value_model is not None:
                    vf_loss, vf_stats, values = value_loss(value_model, mb, num_valid, cfg, run.device)
                    run.check_finite(update + 1, value_loss=vf_loss)
                    (cfg.vf_coef * vf_loss).backward()
                    stats.update(vf_stats)
                if trace is not None:  # --trace: the log-probs (values) these very losses used, per epoch
                    trace.record(epoch, rows, mb, logprobs, values, num_valid)
                for key, v in stats.items():
                    sums[key] = sums.get(key, 0.0) + v
            for model, opt in zip((policy, value_model), optimizers.values()):  # the policy's, the value's if any
                run.sync_grads(model)  # each rank's loss is normalised by global counts: the sum is the gradient
                run.clip_grad_norm(model, cfg.grad_clip)  # per model (TRL 0.13: none)
                opt.step()
                opt.zero_grad(set_to_none=True)
    return sums


def update_metrics(batch: dict, sums: dict, kl_coef: float, n_left_out: int, reward, cfg: Config, run) -> dict:
    """The update's metrics.jsonl row: loss statistics (means over mini-batches, epochs and ranks), episode means."""
    metrics = {key: run.all_reduce(v / (cfg.ppo_epochs * cfg.mini_batches)).item() for key, v in sums.items()}
    mask, kept = batch["response_mask"], batch["kept"].float()  # (B, R), (B,)
    n_kept = run.all_reduce(kept.sum()).clamp(min=1)
    per_seq = {"objective/scores": batch["scores"], "objective/kl": batch["kl"].sum(1),
               "objective/rlhf_reward": batch["scores"] - kl_coef * batch["kl"].sum(1),
               "objective/rm_score": batch["raw_scores"], "rollout/eos_rate": batch["has_eos"].float(),
               "rollout/response_len": mask.sum(1).float()}  # each (B,)
    metrics.update({key: (run.all_reduce((v * kept).sum()) / n_kept).item() for key, v in per_seq.items()})
    if "values" in batch:
        metrics["val/explained_variance"] = explained_variance(batch["values"], batch["returns"], mask,
                                                               all_reduce=run.all_reduce).item()
    if reward.calls is not None:  # a labeler: its calls so far over all ranks (each rank caches its own ratings)
        metrics.update({"labeler/calls": run.all_reduce(reward.calls).item(), "rollout/left_out": n_left_out})
    return metrics


# ---- main: data, models, the loop of steps 1-7, save ------------------------------------------------------------


def main(cfg: Config) -> dict:
    if cfg.task_dir:  # the tiny presets' synthetic task (deterministic; skipped when present)
        get_task(cfg.task).write_synthetic(cfg.task_dir)
    # the value model starts from the RM (head included); d-RLAIF has no RM: from SFT with a new head (the paper)
    value_path = cfg.value_path or (cfg.rm_path if cfg.reward == "rm" else cfg.sft_path)
    inputs = {"sft": cfg.sft_path, "dataset": cfg.dataset, **({"rm": cfg.rm_path} if cfg.reward == "rm" else {}),
              **({"value": value_path} if ESTIMATORS[cfg.algo].value_model else {})}
    check_model(cfg.sft_path, "causal-lm", "--sft-path")  # a wrong path is one line naming the flag, before any work
    if cfg.reward == "rm":  # a causal LM as the reward model would be scored by a new, random head
        check_model(cfg.rm_path, "reward-model", "--rm-path")
    run = Run(cfg, "ppo", inputs)  # skip a finished run; torchrun, seeds, threads
    if run.finished:
        return run.finished
    k, num_updates = batch_layout(cfg, run.world_size)  # derived sizes, checked once
    est, traced = ESTIMATORS[cfg.algo], traced_updates(cfg.trace_updates, num_updates)

    # data: the queries (and their posts, for a labeler and the samples table)
    tokenizer, task = load_tokenizer(cfg.sft_path), get_task(cfg.task)  # --task: what a query is
    posts, post_stats = load_posts(cfg.dataset, cfg.split)
    queries = [task.build_query(tokenizer, p, cfg.max_query_tokens)[1] for p in posts]

    # 1. models, optimizers, the KL controller; resumed from the checkpoint if there is one
    policy, ref_policy, value_model, reward = load_models(cfg, tokenizer, run, value_path)
    lrs = {"policy": cfg.lr, "value": cfg.lr if cfg.value_lr < 0 else cfg.value_lr}
    optimizers = {name: torch.optim.AdamW(trained_parameters(m), lr=lrs[name], weight_decay=cfg.weight_decay, eps=1e-5)
                  for name, m in (("policy", policy), ("value", value_model)) if m is not None}  # LoRA: adapters, head
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target > 0
              else FixedKLController(cfg.kl_coef))
    counts = {"left_out": 0}  # episodes left out so far (checkpointed with the rest)
    start = run.resume(policy=policy, value=value_model, policy_optimizer=optimizers["policy"],
                       value_optimizer=optimizers.get("value"), kl_ctl=kl_ctl, reward=reward, counts=counts)
    # the rollout engine, made once; vllm: loaded from sft_path, then synced with the policy before every rollout
    engine = rollout_engine(cfg.rollout_backend, cfg.sft_path, cfg.seed + run.rank, cfg.rollout_gpu_memory_utilization)
    run.say(f"{cfg.algo}: {len(queries)} queries, {num_updates} updates of {cfg.batch_size} episodes ({k} per query), "
            f"value model: {value_model is not None}")

    t_start = time.time()
    for update in run.steps(start, num_updates):
        # 2-3. rollout on this rank's share of the global batch, scored
        t0 = time.time()
        idx, seeds = episode_layout(update, len(queries), k, cfg, run)  # whole groups; a seed per row
        policy.eval()  # sampling builds no graph; train() again for the update
        engine.sync(policy)  # vllm: the engine samples from the weights of the last update (or of the checkpoint)
        ep_posts = [posts[i] for i in idx]
        with run.gathered(policy):  # --fsdp: ranks stop sampling at different lengths; whole weights, no collectives
            batch = rollout(policy, ref_policy, value_model, reward, [queries[i] for i in idx], seeds, tokenizer, cfg,
                            run.device, ep_posts, engine)
        n_left_out = int(run.all_reduce(leave_out_unscored(batch, k)).item())  # d-RLAIF: unrated episodes, counted
        counts["left_out"] += n_left_out
        # 4-5. KL rewards, advantages
        batch = kl_rewards_and_advantages(batch, kl_ctl.value, k, cfg, run)
        t_rollout, t0 = time.time() - t0, time.time()
        trace = (PPOTrace(batch, cfg.trace, update + 1, kl_ctl.value, k, est.whiten, cfg, run, tokenizer, ep_posts)
                 if cfg.trace and update + 1 in traced else None)  # --trace: a reader's token-by-token view

        # 6. the update; the learning rate is a function of the update index (no scheduler state to checkpoint)
        lr_scale = linear_lr(update, num_updates, 1.0)  # linear decay to 0
        for name, opt in optimizers.items():  # one parameter group each (run.trained_parameters)
            opt.param_groups[0]["lr"] = lrs[name] * lr_scale
        policy.train()
        sums = ppo_update(policy, value_model, optimizers, batch, update, cfg, run, trace)  # epochs x mini x micro
        t_update = time.time() - t0

        # 7. log, then the KL controller sees the KL this batch was sampled with
        metrics = update_metrics(batch, sums, kl_ctl.value, n_left_out, reward, cfg, run)
        metrics.update({"objective/kl_coef": kl_ctl.value, "ppo/lr": cfg.lr * lr_scale, "time/rollout_s": t_rollout,
                        "time/update_s": t_update, "eps": cfg.batch_size / (t_rollout + t_update), **engine.stats(),
                        **run.memory()})
        kl_ctl.update(metrics["objective/kl"], cfg.batch_size)
        run.log(update + 1, metrics, show=("objective/scores", "objective/kl", "objective/entropy", "ppo/policy_loss",
                                           "ppo/clipfrac", "rollout/eos_rate", "rollout/response_len", "eps"))
        if trace is not None:
            trace.write(run.out_dir)
        if (update + 1) % cfg.sample_every == 0:  # rank 0's samples.jsonl rows, for a reader
            write_samples(run, update + 1, batch, ep_posts, tokenizer, reward, cfg)
        run.checkpoint(update + 1)

    # final numbers and save
    metrics = {"algo": cfg.algo, "reward": cfg.reward, "updates": num_updates, "episodes": num_updates * cfg.batch_size,
               "train_time_s": time.time() - t_start, "updates_this_run": num_updates - start,
               "n_queries": len(queries), "n_skipped_empty": post_stats.n_skipped_empty,
               "left_out_episodes": counts["left_out"], "labeler_calls": int(run.all_reduce(reward.calls or 0).item())}
    if run.master:  # first / last from every update's row on disk, not only this process's (a resumed run's)
        metrics.update(first_last(run.rows(), ("objective/scores", "objective/kl", "objective/rlhf_reward",
                                               "rollout/eos_rate", "rollout/response_len", "eps")))
    policy = run.unwrap(policy, base=cfg.sft_path)  # --fsdp: gathered; --lora-rank: merged, adapter to out_dir/adapter
    engine.close()  # before leaving torchrun: a vLLM engine's shutdown ends the process group it joined
    return run.save(metrics, policy, tokenizer, headline=("objective/scores_last", "objective/kl_last"))


if __name__ == "__main__":
    cli(main, Config, PRESETS)
