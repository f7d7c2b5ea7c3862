"""Stage 4, PPO: fine-tune the SFT policy to maximise the reward model's score, with a KL penalty to the SFT policy.

One update (the numbers match the README's "Implementation details" list):
  1. models: policy and frozen reference from the SFT checkpoint, value model from the RM (head included), frozen
     RM; dropout off in all of them, so old and new log-probs agree exactly at ratio 1;
  2. rollout: sample `response_length` tokens per left-padded query at `temperature` with a KV cache, stopping
     once every row has emitted EOS; the old log-probs are those of the sampling logits (no second policy pass);
     reference log-probs and values come from one forward pass each on the same temperature-scaled logits;
  3. truncate after the first EOS and score `query + response` with the RM at its last real token; a response
     without EOS gets `missing_eos_penalty` subtracted (TRL's variant of the N+ details' "EOS trick");
  4. per-token reward -kl_coef * KL (k1 or k3), the score added on the last valid response token (the EOS
     itself; TRL puts it one slot later, on padding); fixed or adaptive KL coefficient;
  5. optional reward whitening, GAE (gamma, lam), advantages whitened over valid tokens, with the statistics
     taken over every rank's batch;
  6. `ppo_epochs` passes over the batch in `mini_batches` mini-batches of micro-batches: clipped policy loss +
     vf_coef * clipped value loss, normalised by the mini-batch's valid tokens over all ranks, gradient clipping,
     AdamW for policy and value, linear learning-rate decay.
All math is in `minirlaif.losses`. Deliberate deviations from TRL 0.13's PPOTrainer: old log-probs from sampling
(one forward pass saved), the head applied only to response positions, losses normalised over the mini-batch
rather than averaged per micro-batch, gradients summed over ranks by hand (two models, no DDP wrappers).

Commands:
  CPU, tiny (default):  python train_ppo.py            (fp32; add --bf16 on a CPU with AVX512-BF16/AMX: ~1.7x)
  RLHF baseline:        python train_ppo.py --rm-path runs/tiny/rm_human --out-dir runs/tiny/ppo_rlhf
  1 GPU:                python train_ppo.py --preset gpt2-large
  torchrun:             torchrun --nproc_per_node 4 train_ppo.py --preset gpt2-large
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
from minirlaif.generation import decode_summary, generate, row_seeds
from minirlaif.losses import (AdaptiveKLController, FixedKLController, entropy_from_logits, explained_variance, gae,
                              kl_penalty, logprobs_from_logits, masked_mean, masked_whiten, ppo_policy_loss,
                              ppo_value_loss)
from minirlaif.models import (disable_dropout, last_index, load_causal_lm, load_scalar_model, load_tokenizer, pad_batch,
                              response_logits, sequence_rewards, set_attention, token_scores)
from minirlaif.utils import (MetricLogger, all_reduce, all_reduce_grads, append_jsonl, autocast, batch_indices,
                             check_reward_model, cleanup_dist, clear_checkpoint, config_dict, finished_metrics,
                             first_last, load_checkpoint, parse_config, quiet_transformers, read_jsonl_resumable,
                             save_checkpoint, set_seed, setup_dist, stop_non_finite, truncate_jsonl, write_json,
                             write_manifest)


@dataclass
class Config:
    preset: str = "tiny"
    """tiny: synthetic task on CPU; gpt2-large: the seed's settings"""
    out_dir: str = "runs/{preset}/ppo"
    """where the policy, metrics.json(l), samples.jsonl, manifest.json and the checkpoint go"""
    seed: int = 1
    """seeds sampling, data order and every RNG"""
    resume: bool = True
    """continue from out_dir's checkpoint when there is one (--no-resume starts over)"""
    task_dir: str = "runs/{preset}/data"
    """tiny: where the synthetic task's files are written (if missing); empty for real data"""
    sft_path: str = "runs/{preset}/sft"
    """initial policy and frozen reference"""
    rm_path: str = "runs/{preset}/rm"
    """frozen reward model"""
    value_path: str = ""
    """initial value model: a reward model (head included), or a causal LM (a new head seeded by --seed); empty: the
    reward model"""
    dataset: str = "runs/{preset}/data/sft"
    """queries: hub id or local file/dir in any supported schema (prompt-only jsonl rows too)"""
    split: str = "train"
    """split of the dataset to draw queries from"""
    max_query_tokens: int = 200
    """queries longer than this are cut at the post's last newline"""
    total_episodes: int = 1024
    """queries (episodes) to train on"""
    batch_size: int = 64
    """episodes per update, over all ranks"""
    mini_batches: int = 1
    """mini-batches per PPO epoch (one optimizer step each)"""
    micro_batch_size: int = 16
    """sequences per forward/backward pass on one rank"""
    rollout_batch_size: int = -1
    """sequences per generation + scoring chunk on one rank; -1: the rank's whole batch at once"""
    ppo_epochs: int = 4
    """passes over each batch"""
    response_length: int = 48
    """max new tokens per response"""
    temperature: float = 0.7
    """sampling temperature; every log-prob is computed on logits / temperature"""
    kl_coef: float = 0.05
    """initial KL coefficient (beta)"""
    kl_estimator: str = "k1"
    """per-token KL estimator in the reward: k1 (logp - ref), k2 ((logp - ref)^2 / 2) or k3"""
    kl_target: float = 0.0
    """target KL for the adaptive controller; 0: fixed kl_coef"""
    kl_horizon: int = 10000
    """adaptive controller horizon in episodes"""
    missing_eos_penalty: float = 1.0
    """subtracted from the score of a response that never emits EOS"""
    whiten_rewards: bool = False
    """whiten the per-token rewards (scale only) before GAE"""
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE lambda"""
    cliprange: float = 0.2
    """policy ratio clip"""
    cliprange_value: float = 0.2
    """value clip around the rollout's values"""
    vf_coef: float = 0.1
    """value loss weight"""
    lr: float = 3e-4
    """policy learning rate (linear decay to 0)"""
    value_lr: float = -1.0
    """value model learning rate; -1: same as lr"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    grad_clip: float = 1.0
    """max gradient norm, per model"""
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


PRESETS = {
    "micro": dict(total_episodes=48, batch_size=16, micro_batch_size=8, response_length=16, sample_every=1,
                  n_samples=2, checkpoint_every=1),
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


@torch.no_grad()
def rollout(policy, ref_policy, value_model, reward_model, queries: list[list[int]], seeds: list[int], tokenizer,
            cfg: Config, device) -> dict:
    """Steps 2-3: sample responses, score them; the tensors PPO needs, all (B, R) unless noted."""
    q_ids, q_mask = (t.to(device) for t in pad_batch(queries, tokenizer.pad_token_id, side="left"))  # (B, Q)
    out = {"query": [], "query_mask": [], "response": [], "response_mask": [], "logprobs": [], "ref_logprobs": [],
           "values": [], "scores": []}
    chunk = cfg.rollout_batch_size if cfg.rollout_batch_size > 0 else len(queries)
    for i in range(0, len(queries), chunk):
        q, qm = q_ids[i: i + chunk], q_mask[i: i + chunk]
        with autocast(device, cfg.bf16):
            # 2. sample; generation stops once every row has emitted EOS, and pads after each row's first EOS
            gen = generate(policy, q, qm, cfg.response_length, tokenizer.eos_token_id, tokenizer.pad_token_id,
                           temperature=cfg.temperature, seeds=seeds[i: i + chunk])
            ids, mask = torch.cat([q, gen.tokens], 1), torch.cat([qm, gen.mask], 1)  # (b, Q + R)
            R = gen.tokens.shape[1]
            ref_logits = response_logits(ref_policy, ids, mask, R)  # (b, R, V)
            ref_logprobs = logprobs_from_logits(ref_logits, gen.tokens, cfg.temperature)
            values = response_values(value_model, ids, mask, R)
            # 3. score the truncated query + response at its last real token (the EOS when there is one)
            scores = sequence_rewards(reward_model, ids, mask)  # (b,)
        # pad each chunk's responses to response_length so that the chunks stack
        pad = (0, cfg.response_length - R)
        out["response"].append(F.pad(gen.tokens, pad, value=tokenizer.pad_token_id))
        for k, v in (("response_mask", gen.mask), ("logprobs", gen.logprobs), ("ref_logprobs", ref_logprobs * gen.mask),
                     ("values", values * gen.mask)):
            out[k].append(F.pad(v, pad))
        for k, v in (("query", q), ("query_mask", qm), ("scores", scores)):
            out[k].append(v)
    batch = {k: torch.cat(v) for k, v in out.items()}
    has_eos = ((batch["response"] == tokenizer.eos_token_id) & batch["response_mask"].bool()).any(1)  # (B,)
    batch["has_eos"] = has_eos
    batch["raw_scores"] = batch["scores"]
    batch["scores"] = batch["scores"] - cfg.missing_eos_penalty * (~has_eos).float()
    return batch


@torch.no_grad()
def kl_rewards_and_advantages(batch: dict, kl_coef: float, cfg: Config, dist) -> dict:
    """Steps 4-5: per-token rewards with the KL penalty, GAE, whitened advantages."""
    mask = batch["response_mask"]
    # 4. the KL penalty the reward uses, and the score on the last valid response token
    kl = kl_penalty(batch["logprobs"], batch["ref_logprobs"], cfg.kl_estimator) * mask  # (B, R)
    rewards = -kl_coef * kl  # (B, R)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last_index(mask)] += batch["scores"]
    # 5. GAE with statistics over all ranks' tokens
    reduce = partial(all_reduce, dist=dist)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=reduce)
    advantages, returns = gae(rewards, batch["values"], mask, cfg.gamma, cfg.lam)
    advantages = masked_whiten(advantages, mask, all_reduce=reduce)
    return {**batch, "kl": kl, "rewards": rewards, "advantages": advantages, "returns": returns}


# what the update reads from a rollout batch
UPDATE_KEYS = ("query", "query_mask", "response", "response_mask", "logprobs", "values", "advantages", "returns")


def ppo_losses(policy, value_model, mb: dict, num_valid, cfg: Config, device, stats: dict):
    """Step 6 on one micro-batch: yields (name, loss) for the clipped policy loss, then vf_coef * value loss.

    The caller runs backward on each as it comes, so the policy's graph is freed before the value model's forward
    (half the activation memory of one combined loss). Both are this micro-batch's share of the mini-batch mean
    (`num_valid` = the mini-batch's valid tokens over all ranks). Their statistics are written into `stats`.
    """
    mb = trim(mb)
    ids = torch.cat([mb["query"], mb["response"]], 1)  # (b, Q + R)
    mask = torch.cat([mb["query_mask"], mb["response_mask"]], 1)  # (b, Q + R)
    m, R = mb["response_mask"], mb["response"].shape[1]
    with autocast(device, cfg.bf16):
        logits = response_logits(policy, ids, mask, R)  # (b, R, V)
        logprobs = logprobs_from_logits(logits, mb["response"], cfg.temperature)  # (b, R)
    pg_loss, pg_stats = ppo_policy_loss(logprobs, mb["logprobs"], mb["advantages"], m, cfg.cliprange,
                                        num_valid=num_valid)
    with torch.no_grad():
        stats["objective/entropy"] = masked_mean(entropy_from_logits(logits, cfg.temperature), m, num_valid=num_valid)
    stats.update({"ppo/policy_loss": pg_loss.detach(), "ppo/clipfrac": pg_stats["clipfrac"],
                  "ppo/approx_kl": pg_stats["approx_kl"], "ppo/ratio_mean": pg_stats["ratio_mean"]})
    yield "policy", pg_loss
    with autocast(device, cfg.bf16):
        values = response_values(value_model, ids, mask, R)  # (b, R)
    vf_loss, vf_stats = ppo_value_loss(values, mb["values"], mb["returns"], m, cfg.cliprange_value,
                                       num_valid=num_valid)
    stats.update({"ppo/value_loss": vf_loss.detach(), "val/clipfrac": vf_stats["clipfrac"]})
    yield "value", cfg.vf_coef * vf_loss


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
    assert cfg.batch_size % dist.world_size == 0, "batch_size must divide over the ranks"
    local_batch = cfg.batch_size // dist.world_size
    assert local_batch % cfg.mini_batches == 0, "each rank's batch must split into mini_batches"
    local_mini = local_batch // cfg.mini_batches
    assert local_mini % cfg.micro_batch_size == 0, "each mini-batch must split into micro-batches"
    num_updates = cfg.total_episodes // cfg.batch_size
    assert num_updates > 0, "total_episodes must be at least one batch"
    assert cfg.kl_estimator in ("k1", "k2", "k3"), f"--kl-estimator must be k1, k2 or k3, not {cfg.kl_estimator!r}"

    # data: queries (and the reference summaries, for the samples table)
    if cfg.task_dir and master:
        synthetic.write_task(cfg.task_dir)
    if dist.ddp:
        torch.distributed.barrier()
    # the RM must be one (a causal LM would be scored by a random head); the value model may start from a causal LM
    # (the paper initialises it from SFT): it then gets a new head seeded by cfg.seed, the same on every rank
    check_reward_model(cfg.rm_path, "--rm-path")
    tokenizer = load_tokenizer(cfg.sft_path)
    posts, post_stats = load_posts(cfg.dataset, cfg.split)
    queries = [build_query(tokenizer, p, cfg.max_query_tokens)[1] for p in posts]

    # 1. models: dropout off everywhere; reference and reward model frozen
    policy = disable_dropout(load_causal_lm(cfg.sft_path)).to(device).train()
    ref_policy = disable_dropout(load_causal_lm(cfg.sft_path)).to(device).eval().requires_grad_(False)
    # a value model started from a causal LM gets a new head seeded by cfg.seed, the same on every rank
    value_model = disable_dropout(load_scalar_model(cfg.value_path or cfg.rm_path, pad_token_id=tokenizer.pad_token_id,
                                                    head_seed=cfg.seed))
    value_model = value_model.to(device).train()
    reward_model = load_scalar_model(cfg.rm_path, pad_token_id=tokenizer.pad_token_id)
    reward_model = disable_dropout(reward_model).to(device).eval().requires_grad_(False)
    for model in (policy, ref_policy, value_model, reward_model):
        set_attention(model, device, cfg.bf16)  # eager attention under CPU bf16, the faster kernel there
    value_lr = cfg.lr if cfg.value_lr < 0 else cfg.value_lr
    optimizers = [torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=cfg.weight_decay, eps=1e-5)
                  for m, lr in ((policy, cfg.lr), (value_model, value_lr))]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda u: 1.0 - u / num_updates) for o in optimizers]
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target > 0
              else FixedKLController(cfg.kl_coef))

    # resume: both models, optimizers and schedulers, the KL controller, every RNG; the update fixes the data
    update, ckpt_dir = 0, out_dir / "checkpoint"
    state = load_checkpoint(ckpt_dir, cfg, dist, map_location=device) if cfg.resume else None
    if state is not None:
        policy.load_state_dict(state["policy"])
        value_model.load_state_dict(state["value"])
        for obj, s in zip([*optimizers, *schedulers], [*state["optimizers"], *state["schedulers"]]):
            obj.load_state_dict(s)
        kl_ctl.load_state_dict(state["kl_ctl"])
        update = state["step"]
        if master:
            print(f"resumed from {ckpt_dir} at update {update}")
    logger = MetricLogger(out_dir, enabled=master, wandb_project=cfg.wandb_project, tensorboard=cfg.tensorboard,
                          config=config_dict(cfg), name="ppo")
    logger.truncate_after(update)
    samples_path = out_dir / "samples.jsonl"
    if master:
        truncate_jsonl(samples_path, "update", update)
    if master:
        print(f"ppo: {len(queries)} queries, {num_updates} updates of {cfg.batch_size} episodes, "
              f"world {dist.world_size}, device {device}")

    t_start, start_update = time.time(), update
    bar = tqdm(range(update, num_updates), initial=update, total=num_updates, desc="ppo", disable=not master)
    for update in bar:
        # 2-3. rollout on this rank's share of the global batch
        t0 = time.time()
        # each episode's sample depends only on (seed, update, its place in the global batch), on any rank
        idx = batch_indices(update, len(queries), cfg.batch_size, cfg.seed)[dist.rank::dist.world_size]
        seeds = row_seeds(cfg.seed, update, n=cfg.batch_size)[dist.rank::dist.world_size]
        policy.eval()
        batch = rollout(policy, ref_policy, value_model, reward_model, [queries[i] for i in idx], seeds, tokenizer,
                        cfg, device)
        # 4-5. KL rewards, GAE, whitening
        batch = kl_rewards_and_advantages(batch, kl_ctl.value, cfg, dist)
        t_rollout = time.time() - t0

        # 6. PPO epochs over mini-batches of micro-batches
        t0 = time.time()
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
                    mb = {k: batch[k][rows] for k in UPDATE_KEYS}
                    stats = {}
                    for name, loss in ppo_losses(policy, value_model, mb, num_valid, cfg, device, stats):
                        if not torch.isfinite(loss):
                            stop_non_finite(f"{name} loss", update + 1, ckpt_dir)
                        loss.backward()
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v
                for model, opt in ((policy, optimizers[0]), (value_model, optimizers[1])):
                    all_reduce_grads(model, dist)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
        for s in schedulers:
            s.step()
        t_update = time.time() - t0

        # metrics: sums of per-micro-batch shares -> means over mini-batches, epochs and ranks
        n_steps = cfg.ppo_epochs * cfg.mini_batches
        mask = batch["response_mask"]
        kl_sum = batch["kl"].sum(1).mean()
        metrics = {k: all_reduce(v / n_steps, dist).item() for k, v in sums.items()}
        per_seq = {"objective/scores": batch["scores"].mean(), "objective/kl": kl_sum,
                   "objective/rlhf_reward": (batch["scores"] - kl_ctl.value * batch["kl"].sum(1)).mean(),
                   "objective/rm_score": batch["raw_scores"].mean(),
                   "rollout/eos_rate": batch["has_eos"].float().mean(),
                   "rollout/response_len": mask.sum(1).float().mean()}
        metrics.update({k: all_reduce(torch.as_tensor(v, dtype=torch.float, device=device), dist, "mean").item()
                        for k, v in per_seq.items()})
        metrics["val/explained_variance"] = explained_variance(batch["values"], batch["returns"], mask,
                                                               all_reduce=partial(all_reduce, dist=dist)).item()
        metrics.update({"objective/kl_coef": kl_ctl.value, "ppo/lr": schedulers[0].get_last_lr()[0],
                        "time/rollout_s": t_rollout, "time/update_s": t_update,
                        "eps": cfg.batch_size / (t_rollout + t_update)})
        if device.type == "cuda":
            metrics["mem/peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        kl_ctl.update(metrics["objective/kl"], cfg.batch_size)
        logger.log(update + 1, metrics, echo=tqdm.write)

        if master and (update + 1) % cfg.sample_every == 0:
            write_samples(samples_path, update + 1, batch, posts, idx, tokenizer, reward_model, cfg, device)
        if (update + 1) % cfg.checkpoint_every == 0 and update + 1 < num_updates:
            save_checkpoint(ckpt_dir, update + 1, {
                "policy": policy.state_dict(), "value": value_model.state_dict(),
                "optimizers": [o.state_dict() for o in optimizers], "schedulers": [s.state_dict() for s in schedulers],
                "kl_ctl": kl_ctl.state_dict(), "config": config_dict(cfg)}, dist)
    bar.close()

    # final numbers and save
    metrics = {"updates": num_updates, "episodes": num_updates * cfg.batch_size,
               "train_time_s": time.time() - t_start, "updates_this_run": num_updates - start_update,
               "n_queries": len(queries), "n_skipped_empty": post_stats.n_skipped_empty}
    if master:  # first / last from every update's row on disk, not only this process's (a resumed run's)
        metrics.update(first_last(read_jsonl_resumable(logger.path), (
            "objective/scores", "objective/kl", "objective/rlhf_reward", "rollout/eos_rate", "rollout/response_len",
            "eps")))
    if master:
        policy.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        write_json(out_dir / "metrics.json", metrics)
        write_manifest(out_dir, cfg, {"sft": cfg.sft_path, "rm": cfg.rm_path, "value": cfg.value_path or cfg.rm_path,
                                      "dataset": cfg.dataset})
        clear_checkpoint(ckpt_dir)  # the saved policy supersedes it
        print(metrics)
    cleanup_dist(dist)
    return metrics


@torch.no_grad()
def write_samples(path: Path, update: int, batch: dict, posts, idx: list[int], tokenizer, reward_model, cfg,
                  device) -> None:
    """A few (query, response, score, reference score) rows, to read how the policy changes over training."""
    rows = []
    for i in range(min(cfg.n_samples, len(idx))):
        post = posts[idx[i]]
        query = batch["query"][i][batch["query_mask"][i].bool()].tolist()
        response = batch["response"][i][batch["response_mask"][i].bool()].tolist()
        ref_score = None
        if post.summary is not None:  # the RM's score of the dataset's reference summary, for scale
            ref = encode_completion(tokenizer, build_query(tokenizer, post, cfg.max_query_tokens)[0],
                                    format_completion(post.summary, tokenizer.eos_token))
            # capped like a response, so it fits the context the rollouts fit in
            ids, mask = pad_batch([query + ref[: cfg.response_length]], tokenizer.pad_token_id)
            ref_score = sequence_rewards(reward_model, ids.to(device), mask.to(device)).item()
        rows.append({"update": update, "id": post.id, "query": tokenizer.decode(query),
                     "response": decode_summary(tokenizer, response), "score": batch["scores"][i].item(),
                     "reference": post.summary, "reference_score": ref_score})
    append_jsonl(path, rows)


if __name__ == "__main__":
    main(parse_config(Config, PRESETS))
