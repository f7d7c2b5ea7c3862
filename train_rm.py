"""Stage 3, reward model: learn a scalar reward from pairwise preferences, AI (RLAIF) or human (RLHF baseline).

Algorithm: the SFT model plus a new scalar head (`AutoModelForSequenceClassification`, one label) reads
`query + " " + summary + eos` and its reward is the head at the EOS (the last token of the attention mask). For a
pair (a, b) with label p = P(a is better), the loss is the soft-label Bradley-Terry cross-entropy
    -[p log sigmoid(r_a - r_b) + (1 - p) log sigmoid(r_b - r_a)]      (losses.bradley_terry_loss)
plus, optionally, center_coef * mean((r_a + r_b)^2), which keeps rewards near 0. It is averaged over the *global*
batch of pairs (all micro-batches and ranks). AdamW, linear warmup and decay, gradient clipping. The checkpoint
with the lowest validation loss is kept; then every reward is shifted so that the SFT dataset's reference
summaries average 0 (`models.fold_reward_offset`: folded into the weights where that is exact, GPT-2 and GPT-NeoX,
so any loader applies it; else kept in `config.reward_offset_unfolded`, which our loaders subtract and README
"Models" tells outside loaders to subtract), and the model is scored on the test sets
(`minirlaif.reward.evaluate_pairs`).

Feedback (`--feedback`):
- ai (default): label.py's `pairs.jsonl`; soft labels, or `--labels hard` (argmax; ties 0.5 excluded);
  `--drop-inconsistent` drops pairs whose two judge orders disagree. Null labels are skipped and counted. Pairs are
  split by post id (seeded hash) into train / validation / test.
- human: the human comparisons' train split (split by post id into train / validation; `--min-confidence`
  filters it); their validation split is the held-out test set.
- mixed: both together. The mixing rule: the AI pairs' train split (labels as for ai) plus the human train
  comparisons (hard labels 1 / 0), every pair one term of the loss; `--human-frac F` subsamples (seeded) the
  larger source so that human pairs are the fraction F of the train pairs (-1: all of both). Both sources are
  split by the same post-id hash, so a post is in one split for both, and human comparisons of AI-test posts are
  left out (counted); validation is both validation splits together.
All report `acc_ai_test` (the AI test split, argmax of the soft label, ties excluded) and `acc_human_conf8` (the
held-out human comparisons with confidence >= 8), so the two reward models are compared on the same pairs.

Deliberate choices (docs/algorithms.md has the details and their sources):
- the checkpoint is chosen on validation and numbers are reported on test (the seed chose on the split it reported);
- over-long pairs are kept: the post is cut at its last newline (`data.build_query`, as for the SFT and PPO
  queries) and summaries are capped keeping their EOS, all counted (the seed dropped long pairs silently);
- summaries are the token ids label.py sampled (no decode / re-encode round trip);
- soft labels are used as they are (the seed clipped them to [0.4, 0.6]);
- dropout is off, so training and scoring see the same function (and PPO's value model starts from it).

Commands:
  CPU, tiny (default):  python train_rm.py                   (after train_sft.py and label.py)
  RLHF baseline:        python train_rm.py --feedback human
  human + AI labels:    python train_rm.py --feedback mixed [--human-frac 0.5]
  1 GPU:                python train_rm.py --preset gpt2-large [--feedback human]
  torchrun:             torchrun --nproc_per_node 4 train_rm.py --preset gpt2-large
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch

from minirlaif.config import Between, Choice, NonNegative, Positive, PositiveOrAll, Rule, require
from minirlaif.data import load_posts
from minirlaif.losses import bradley_terry_loss
from minirlaif.models import (check_context, check_model, disable_dropout, fold_reward_offset, load_scalar_model,
                              load_tokenizer, set_attention)
from minirlaif.reward import (Encoder, PairRewards, evaluate_pairs, load_ai_pairs,
                              load_human_pairs, mean_reference_reward, padding_invariance, pair_batch, pair_metrics,
                              score_pairs, split_by_id, training_labels)
from minirlaif.run import Run, RunConfig, cli, trained_parameters
from minirlaif.tasks import TaskConfig, get_task
from minirlaif.trace import rm_trace
from minirlaif.utils import autocast, batch_indices, linear_lr


FractionOrAll = Annotated[float, Rule(lambda v: v == -1 or 0 < v < 1, "must be in (0, 1), or -1 for all of both")]


@dataclass
class Config(TaskConfig, RunConfig):  # inherited: --task; --resume, --bf16, --checkpoint-every, --wandb-project, ...
    preset: str = "tiny"
    """tiny: synthetic task on CPU; gpt2-large: the seed's setup (hub data); micro: a few steps, for tests"""
    out_dir: str = ""
    """where the model, metrics.json, manifest.json and the checkpoint go; empty: runs/{preset}/rm for AI
    feedback, runs/{preset}/rm_human for human feedback, runs/{preset}/rm_mixed for mixed"""
    seed: int = 1
    """seeds the head init, the splits, the data order and every RNG"""
    feedback: Choice("ai", "human", "mixed") = "ai"
    """ai: label.py's AI preferences (RLAIF); human: the human comparisons (the RLHF baseline); mixed: both"""
    human_frac: FractionOrAll = -1.0
    """mixed feedback: fraction of the train pairs that are human, by subsampling the larger source (-1: all)"""
    sft_path: str = "runs/{preset}/sft"
    """the SFT checkpoint the reward model starts from (and whose tokenizer it uses); --sft-model: deprecated alias"""
    labels_path: str = "runs/{preset}/labels/pairs.jsonl"
    """label.py's AI-labeled pairs (trains the AI RM; its test split gives acc_ai_test for both feedback kinds; an
    unfinished label.py run is refused)"""
    labels: Choice("soft", "hard") = "soft"
    """ai feedback: soft (the judge's probability) or hard (its argmax; ties p_a == 0.5 excluded)"""
    drop_inconsistent: bool = False
    """ai feedback: drop pairs whose two judge orders prefer different summaries"""
    comparisons: str = "runs/{preset}/data/comparisons"
    """human comparisons (openai/summarize_from_feedback schema): its train split trains the human RM, its
    validation split (CNN/DM dropped) is the held-out human test set"""
    min_confidence: Between(0, 9, int) = 0
    """human feedback: train only on comparisons with confidence >= this (0: all)"""
    n_human_eval: PositiveOrAll[int] = -1
    """score at most this many held-out human comparisons of confidence >= 8 (seeded sample; -1: all)"""
    reference_dataset: str = "runs/{preset}/data/sft"
    """SFT dataset whose train-split reference summaries define reward 0"""
    n_reference: Positive[int] = 256
    """reference summaries (a seeded sample of posts) averaged for the reward offset"""
    val_frac: Between(0, 0.99) = 0.1
    """fraction of post ids in the validation split (checkpoint selection)"""
    test_frac: Between(0, 0.99) = 0.1
    """ai feedback: fraction of post ids in the test split"""
    n_val: PositiveOrAll[int] = -1
    """use at most this many validation pairs (-1: all)"""
    max_query_tokens: Positive[int] = 200
    """queries longer than this are cut at the post's last newline (counted), as in SFT and PPO"""
    max_summary_tokens: Positive[int] = 48
    """summaries longer than this are cut (counted); the EOS is kept"""
    batch_size: Positive[int] = 32
    """pairs per optimizer step, over all ranks and micro-batches"""
    micro_batch_size: Positive[int] = 32
    """pairs per forward pass on one rank (two sequences each)"""
    max_steps: PositiveOrAll[int] = -1
    """optimizer steps; -1: `epochs` epochs"""
    epochs: Positive[int] = 2
    """epochs when max_steps is -1"""
    lr: Positive[float] = 2e-4
    """peak learning rate"""
    warmup_steps: NonNegative[int] = 5
    """linear warmup from 0"""
    min_lr_ratio: Between(0, 1) = 0.0
    """linear decay ends at lr * min_lr_ratio"""
    weight_decay: NonNegative[float] = 0.0
    """AdamW weight decay"""
    grad_clip: Positive[float] = 1.0
    """max gradient norm"""
    center_coef: NonNegative[float] = 0.0
    """adds center_coef * mean((r_a + r_b)^2) to the loss (reward centering; 0: off)"""
    eval_every: Positive[int] = 20
    """steps between validation evaluations (the best one is kept)"""
    eval_batch_size: Positive[int] = 64
    """sequences per forward pass when scoring"""
    checkpoint_every: Positive[int] = 20
    log_every: Positive[int] = 5
    """steps between metric lines"""
    trace: NonNegative[int] = 0
    """write this many test pairs' rewards, margin, label and loss to out_dir/trace (docs/algorithms.md)"""


PRESETS = {
    "micro": dict(max_steps=8, batch_size=8, micro_batch_size=4, lr=1e-3, warmup_steps=2, eval_every=4,
                  checkpoint_every=4, log_every=2, n_reference=32, n_human_eval=64, n_val=32, eval_batch_size=16,
                  val_frac=0.2, test_frac=0.2),
    "smol": dict(lora_rank=16, lora_alpha=32.0, max_query_tokens=160, max_summary_tokens=48, batch_size=16,
                 micro_batch_size=8, epochs=3, lr=3e-4, warmup_steps=3, eval_every=16, eval_batch_size=32,
                 checkpoint_every=16, log_every=4, n_reference=64, n_human_eval=200),
    "gpt2-large": dict(labels_path="runs/{preset}/labels/pairs.jsonl", comparisons="openai/summarize_from_feedback",
                       reference_dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered", n_reference=2048,
                       val_frac=0.05, test_frac=0.05, n_val=2048, max_query_tokens=512, max_summary_tokens=128,
                       batch_size=128, micro_batch_size=8, max_steps=-1, epochs=1, lr=1e-4, warmup_steps=0,
                       min_lr_ratio=0.0, eval_every=100, eval_batch_size=32, checkpoint_every=100, log_every=10,
                       bf16=True),
}


# ----------------------------------------------------------------------------------------------------------------
# helpers


def pair_loss(rewards_fn, q_ids, q_mask, s_ids, s_mask, prob_a, center_coef: float = 0.0):
    """(loss, r_a, r_b) of a pair batch from `reward.pair_batch`, scored by a `reward.PairRewards`.

    loss = bradley_terry_loss(r_a, r_b, prob_a) + center_coef * mean((r_a + r_b)^2), a mean over this batch's pairs.
    """
    r_a, r_b = rewards_fn(q_ids, q_mask, s_ids, s_mask)  # (B,), (B,)
    loss = bradley_terry_loss(r_a, r_b, prob_a)
    if center_coef:
        loss = loss + center_coef * ((r_a + r_b) ** 2).mean()
    return loss, r_a, r_b


def validation(model, val, cfg: Config, pad_id: int, run) -> dict:
    """Mean loss (as trained: BT + centering) and accuracy on the validation pairs."""
    r_a, r_b = score_pairs(model, val, pad_id, cfg.eval_batch_size, run.device, cfg.bf16, run.dist)
    prob_a = torch.tensor([p.prob_a for p in val])
    m = pair_metrics(r_a, r_b, prob_a)
    loss = m["loss"] + cfg.center_coef * ((r_a.double() + r_b.double()) ** 2).mean().item()
    return {"loss": loss, "acc": m["acc"]}


def mix(ai: list, human: list, human_frac: float, seed: int) -> tuple[list, dict]:
    """Mixed feedback's train (or validation) pairs: all of both, or (0 < human_frac < 1) the larger source
    subsampled, seeded, so that human pairs are `human_frac` of the result."""
    n_ai, n_human = len(ai), len(human)
    if 0 < human_frac < 1 and ai and human:
        want_human = round(n_ai * human_frac / (1 - human_frac))  # human pairs to go with all the AI pairs
        if want_human <= n_human:
            n_human = want_human
        else:
            n_ai = round(n_human * (1 - human_frac) / human_frac)
    rng = random.Random(seed)
    keep = lambda xs, n: [xs[i] for i in sorted(rng.sample(range(len(xs)), n))]  # noqa: E731 (in source order)
    return keep(ai, n_ai) + keep(human, n_human), {"n_ai": n_ai, "n_human": n_human,
                                                   "n_ai_dropped": len(ai) - n_ai,
                                                   "n_human_dropped": len(human) - n_human}


def load_data(cfg: Config, enc: Encoder, master: bool) -> tuple[dict, dict]:
    """(sets, counts): train / validation pairs of the chosen feedback, and the test sets every RM is scored on."""
    counts, sets = {}, {}
    ai_path = Path(cfg.labels_path)
    ai = None
    if cfg.feedback in ("ai", "mixed") or ai_path.is_file():
        ai_pairs, ai_stats = load_ai_pairs(ai_path, enc)
        ai = split_by_id(ai_pairs, cfg.seed, cfg.val_frac, cfg.test_frac)
        counts["ai_labels"] = ai_stats
    elif master:
        print(f"no AI labels at {ai_path}: acc_ai_test is not computed")
    if cfg.feedback in ("ai", "mixed"):
        train, train_stats = training_labels(ai["train"], cfg.labels, cfg.drop_inconsistent)
        val, val_stats = training_labels(ai["validation"], cfg.labels, cfg.drop_inconsistent)
        counts["excluded"] = {k: train_stats[k] + val_stats[k] for k in train_stats}  # train + validation
    if cfg.feedback in ("human", "mixed"):
        human, human_stats = load_human_pairs(cfg.comparisons, "train", enc, min_confidence=cfg.min_confidence or None)
        # mixed: the AI pairs' split (same hash, same fractions), so no AI-test post is trained on
        split = split_by_id(human, cfg.seed, cfg.val_frac, cfg.test_frac if cfg.feedback == "mixed" else 0.0)
        counts["human_train"] = human_stats
        if cfg.feedback == "human":
            train, val = split["train"], split["validation"]
        else:
            train, counts["mixed_train"] = mix(train, split["train"], cfg.human_frac, cfg.seed)
            val, counts["mixed_validation"] = mix(val, split["validation"], cfg.human_frac, cfg.seed + 1)
            counts["mixed_human_in_ai_test_posts"] = len(split["test"])
    if cfg.feedback == "mixed" and 0 < cfg.n_val < len(val):  # a seeded sample of both sources, not AI's first
        val = [val[i] for i in sorted(random.Random(cfg.seed).sample(range(len(val)), cfg.n_val))]
    sets["train"], sets["validation"] = train, val[: cfg.n_val] if cfg.n_val > 0 else val
    # test sets: the AI test split (soft labels) and the held-out human comparisons
    sets["ai_test"] = ai["test"] if ai is not None else []
    # confidence >= 8 where the task's raters give one (TL;DR, the synthetic tasks); the hub's HH rows: all of them
    conf8, conf8_stats = load_human_pairs(cfg.comparisons, "validation", enc, min_confidence=enc.task.human_confidence,
                                          max_pairs=cfg.n_human_eval, seed=cfg.seed)
    sets["human_conf8"] = conf8
    counts["human_conf8"] = conf8_stats
    if cfg.feedback in ("human", "mixed"):  # the human RM's own test set: every held-out comparison
        sets["human_test"], counts["human_test"] = load_human_pairs(cfg.comparisons, "validation", enc)
    return sets, counts


# ----------------------------------------------------------------------------------------------------------------


def main(cfg: Config) -> dict:
    if not cfg.out_dir:
        name = {"ai": "rm", "human": "rm_human", "mixed": "rm_mixed"}[cfg.feedback]
        cfg = dataclasses.replace(cfg, out_dir=f"runs/{cfg.preset}/{name}")
    inputs = {"sft_model": cfg.sft_path, "reference_dataset": cfg.reference_dataset, "comparisons": cfg.comparisons}
    if cfg.feedback != "human" or Path(cfg.labels_path).is_file():  # the RLHF RM scores itself on the AI test split
        inputs["labels"] = cfg.labels_path
    check_model(cfg.sft_path, "causal-lm", "--sft-path")  # a wrong path is one line naming the flag, before any work
    run = Run(cfg, "rm", inputs)  # skip a finished run; torchrun, seeds, threads
    if run.finished:
        return run.finished
    require(cfg.batch_size % (run.world_size * cfg.micro_batch_size) == 0, f"--batch-size {cfg.batch_size} must be "
            f"a multiple of --micro-batch-size {cfg.micro_batch_size} times the {run.world_size} rank(s)")

    # the SFT backbone plus a new scalar head, seeded by --seed alone so that every rank starts from the same one
    tokenizer = load_tokenizer(cfg.sft_path)
    pad_id = tokenizer.pad_token_id
    model = load_scalar_model(cfg.sft_path, pad_token_id=pad_id, head_seed=cfg.seed)
    # dropout off: training and scoring see one function, and PPO's value model (started from it) too
    model = set_attention(disable_dropout(model).train(), run.device, cfg.bf16)
    # --lora-rank: adapters, the head in full; --fsdp: the backbone one unit (shared prefixes: fsdp.shard_model)
    model = run.prepare(model, trained=["score"], shard_blocks=False)
    check_context(model, cfg.max_query_tokens + cfg.max_summary_tokens, "--max-query-tokens + --max-summary-tokens")

    # data: train / validation pairs of the chosen feedback, and the test sets every RM is scored on
    enc = Encoder(tokenizer, cfg.max_query_tokens, cfg.max_summary_tokens, get_task(cfg.task))  # --task: its queries
    sets, counts = load_data(cfg, enc, run.master)
    train, val = sets["train"], sets["validation"]
    require(len(train) >= cfg.batch_size and val, f"too few pairs: {len(train)} train (--batch-size "
            f"{cfg.batch_size}), {len(val)} validation")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * (len(train) // cfg.batch_size)
    optimizer = torch.optim.AdamW(trained_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.95), fused=run.device.type == "cuda")
    rewards_fn = PairRewards(model)  # each query encoded once for its two summaries: about half the compute
    best = {"loss": math.inf, "step": -1, "acc": None, "model": None}  # the lowest validation loss so far
    start = run.resume(model=model, optimizer=optimizer, best=best)
    run.say(f"rm ({cfg.feedback} feedback, {cfg.labels if cfg.feedback != 'human' else 'hard'} labels): {len(train)} "
            f"train / {len(val)} val pairs, test {len(sets['ai_test'])} ai / {len(sets['human_conf8'])} human conf>="
            f"{enc.task.human_confidence}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
            f"{total_steps} steps")

    # the loop: one global batch of pairs per step
    t0, last_loss = time.time(), float("nan")
    for step in run.steps(start, total_steps):
        for group in optimizer.param_groups:  # a function of the step: a resumed run needs no scheduler state
            group["lr"] = linear_lr(step, total_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        # the global batch is a pure function of (step, seed): one process and N ranks, killed or not, see the same
        batch = [train[i] for i in batch_indices(step, len(train), cfg.batch_size, cfg.seed)]
        mine = batch[run.rank::run.world_size]  # this rank's share of the global batch
        sums = torch.zeros(4, device=run.device)  # loss, correct, decided pairs, reward sum
        for i in range(0, len(mine), cfg.micro_batch_size):
            pairs = mine[i: i + cfg.micro_batch_size]
            *inputs, prob_a = (t.to(run.device) for t in pair_batch(pairs, pad_id))
            with autocast(run.device, cfg.bf16):
                loss, r_a, r_b = pair_loss(rewards_fn, *inputs, prob_a, cfg.center_coef)
                # a mean over this micro-batch -> its share of the mean over the global batch of pairs
                loss = loss * len(pairs) / cfg.batch_size
            loss.backward()
            decided = prob_a != 0.5  # a tie says nothing about which summary is better
            correct = ((r_a > r_b) == (prob_a > 0.5)) & decided
            sums += torch.stack([loss.detach(), correct.sum().float(), decided.sum().float(),
                                 (r_a + r_b).detach().sum()])
        run.sync_grads(model)  # the sum over ranks of the shares above: the global batch's gradient
        grad_norm = run.clip_grad_norm(model, cfg.grad_clip)  # the norm before clipping
        sums = run.all_reduce(sums)  # the logged loss and accuracy are the global batch's
        last_loss = sums[0].item()
        run.check_finite(step + 1, loss=last_loss, gradient_norm=grad_norm)  # before the step can spread it
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        metrics = {"rm/loss": last_loss, "rm/acc": (sums[1] / sums[2].clamp(min=1)).item(),
                   "rm/reward_mean": (sums[3] / (2 * cfg.batch_size)).item(),
                   "rm/lr": optimizer.param_groups[0]["lr"], "rm/grad_norm": grad_norm.item()}
        if done % cfg.eval_every == 0 or done == total_steps:
            with run.gathered(model):  # --fsdp: the ranks' shares of the split may differ by a batch
                v = validation(model, val, cfg, pad_id, run)
            metrics.update({"rm/val_loss": v["loss"], "rm/val_acc": v["acc"]})
            if v["loss"] < best["loss"]:  # the model is chosen on validation, and reported on test
                best.update(loss=v["loss"], step=done, acc=v["acc"], model=run.trained_state(model))
        if done % cfg.log_every == 0 or "rm/val_loss" in metrics:
            metrics["rm/pairs_per_s"] = (done - start) * cfg.batch_size / (time.time() - t0)
            run.log(done, metrics)
        run.checkpoint(done)
    train_time = time.time() - t0

    # the best validation checkpoint, shifted so that reference summaries score 0 on average
    run.load_trained_state(model, best["model"])  # chosen on validation, reported on test (the seed chose on its test)
    # one plain model: shards gathered, adapters merged (out_dir/adapter, PEFT's format: rewards before the offset)
    model = run.unwrap(model, base=cfg.sft_path).eval()
    offset_info = center_on_references(model, tokenizer, cfg, run)  # in the weights where exact, else in the config

    # test numbers (--trace: a few test pairs' numbers, for a reader)
    metrics = test_metrics(model, sets, cfg, pad_id, run)
    if cfg.trace and run.master:
        rm_trace(run.out_dir, model, (sets["ai_test"] or sets["human_conf8"])[: cfg.trace], pad_id, offset_info)
    metrics.update({
        "feedback": cfg.feedback,
        "labels": {"ai": cfg.labels, "human": "hard (human choice)",
                   "mixed": f"{cfg.labels} (AI) + hard (human choice)"}[cfg.feedback],
        "n_null_labels": counts.get("ai_labels", {}).get("n_null", 0),
        "n_excluded_label_ties": counts.get("excluded", {}).get("n_label_ties", 0),
        "n_excluded_inconsistent": counts.get("excluded", {}).get("n_inconsistent", 0),
        "best_step": best["step"], "val_loss_best": best["loss"], "val_acc_best": best["acc"],
        **invariance(model, sets, cfg, pad_id, run),
        **offset_info, "train_loss": last_loss, "steps": total_steps, "train_time_s": train_time,
        "total_time_s": time.time() - run.t0, "n_train": len(train), "n_val": len(val),
        **enc.counts(), "counts": counts,
    })
    return run.save(metrics, model, tokenizer, headline=("acc_human_conf8", "acc_ai_test"))


def center_on_references(model, tokenizer, cfg: Config, run) -> dict:
    """Shift every reward so that the mean of `n_reference` reference summaries is 0 (`models.fold_reward_offset`:
    into the weights where that is exact, GPT-2 and GPT-NeoX, else into config.reward_offset_unfolded); the numbers
    for metrics.json."""
    ref_posts, _ = load_posts(cfg.reference_dataset, "train")
    ref_posts = random.Random(cfg.seed).sample(ref_posts, min(cfg.n_reference, len(ref_posts)))
    enc = Encoder(tokenizer, cfg.max_query_tokens, cfg.max_summary_tokens, get_task(cfg.task))  # not the pairs' cuts
    offset, std = mean_reference_reward(model, enc, ref_posts, cfg.eval_batch_size, run.device, cfg.bf16, run.dist)
    where = fold_reward_offset(model, offset)  # "ln_f.bias" (GPT-2) ... or "config" (RMSNorm models)
    after, _ = mean_reference_reward(model, enc, ref_posts, cfg.eval_batch_size, run.device, cfg.bf16, run.dist)
    return {"reward_offset": offset, "reward_offset_in": where, "reference_reward_std": std,
            "reference_reward_mean_after": after, "n_reference": len(ref_posts)}


def test_metrics(model, sets: dict, cfg: Config, pad_id: int, run) -> dict:
    """Accuracy, loss and ECE on every test set (the headline numbers first), reliability.png on rank 0."""
    test_sets = {k: sets[k] for k in ("ai_test", "human_conf8", "human_test") if k in sets}
    metrics = evaluate_pairs(model, test_sets, pad_id, cfg.eval_batch_size, run.device, cfg.bf16, run.dist,
                             reliability_png=run.out_dir / "reliability.png" if run.master else None,
                             title=f"{run.out_dir.name}: {cfg.feedback} feedback, reliability on the test sets")
    own = "ai_test" if cfg.feedback == "ai" else "human_test"
    headline = [f"{k}{s}" for s in ("ai_test", "human_conf8") for k in ("acc_", "n_")]  # first in metrics.json
    return {**{k: metrics.pop(k) for k in headline}, "ece": metrics.get(f"ece_{own}"),
            "ece_set": f"{own} ({'soft AI labels' if own == 'ai_test' else 'human choices'}), 10 confidence bins",
            **metrics}


def invariance(model, sets: dict, cfg: Config, pad_id: int, run) -> dict:
    """The largest change of a reward when the same sequences are scored alone, right- and left-padded."""
    own = "ai_test" if cfg.feedback == "ai" else "human_test"
    some = (sets.get(own) or sets["human_conf8"])[:32]
    seqs = [s for p in some for s in (p.query + p.a, p.query + p.b)]
    return {"padding_invariance_max_abs_diff": padding_invariance(model, seqs, pad_id, run.device, cfg.bf16, cfg.seed),
            "padding_invariance_n": len(seqs)}


if __name__ == "__main__":
    cli(main, Config, PRESETS, renamed={"--sft-model": "--sft-path"})
