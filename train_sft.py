"""Stage 1, supervised fine-tuning: teach a policy to write " {summary}<eos>" after a TL;DR query (--task helpful,
harmless, hh: the Assistant's reference response after a dialogue; minirlaif/tasks.py).

Algorithm: next-token cross-entropy on the completion tokens only (the query is context, not a target), averaged
over every completion token of the global batch, AdamW with linear warmup and linear decay, gradient clipping.
The completion ends with EOS and the padding token is a separate `[PAD]`, so the model learns to stop.

Deliberate choices (docs/algorithms.md has the details and their sources):
- the loss is a token mean over the *global* batch (all micro-batches and ranks), so gradient accumulation and
  DDP give the same update as one big batch (the seed averaged per micro-batch);
- over-long queries are cut at the post's last newline and counted, never dropped (`data.build_query`);
- tiny preset: a small GPT-2 trained from scratch with a BPE tokenizer trained here on the synthetic task;
  gpt2-large: the hub's `gpt2-large` plus a new `[PAD]` token (embeddings resized).

Commands:
  CPU, tiny (default):  python train_sft.py
  dialogue, offline:    python train_sft.py --preset hh-tiny     (the synthetic helpful/harmless task)
  1 GPU:                python train_sft.py --preset gpt2-large
  torchrun:             torchrun --nproc_per_node 4 train_sft.py --preset gpt2-large
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minirlaif.config import Between, NonNegative, Positive, PositiveOrAll, require
from minirlaif.data import encode_completion, load_posts
from minirlaif.generation import generate_texts
from minirlaif.models import (causal_lm_logits, check_model, fuse_gelu, grow_embeddings, load_causal_lm, load_tokenizer,
                              pad_batch, set_attention, tiny_gpt2_config, train_bpe_tokenizer)
from minirlaif.run import Run, RunConfig, cli, trained_parameters
from minirlaif.tasks import TaskConfig, get_task
from minirlaif.utils import autocast, batch_indices, linear_lr


@dataclass
class Config(TaskConfig, RunConfig):  # inherited: --task; --resume, --bf16, --checkpoint-every, --wandb-project, ...
    preset: str = "tiny"
    """tiny: synthetic task, small GPT-2 from scratch, CPU; gpt2-large: the seed's setup (hub model and data)"""
    out_dir: str = "runs/{preset}/sft"
    """where the model, metrics.json, manifest.json and the checkpoint go"""
    seed: int = 1
    """seeds the model init, the data order and every RNG"""
    task_dir: str = "runs/{preset}/data"
    """tiny: where the synthetic task's files are written (if missing); empty for real data"""
    dataset: str = "runs/{preset}/data/sft"
    """SFT data: hub id or local file/dir in the tldr_3_filtered or trl-lib/tldr schema"""
    max_train_posts: PositiveOrAll[int] = -1
    """use at most this many training posts (-1: all)"""
    model: str = ""
    """hub id or path of the model to fine-tune; empty: build a tiny GPT-2 from the config below"""
    n_layer: Positive[int] = 4
    """tiny model: transformer blocks"""
    n_head: Positive[int] = 4
    """tiny model: attention heads"""
    n_embd: Positive[int] = 128
    """tiny model: width"""
    n_positions: Positive[int] = 256
    """tiny model: context length"""
    vocab_size: Positive[int] = 1024
    """tiny model: BPE vocabulary size (trained on the task's train split)"""
    max_query_tokens: Positive[int] = 200
    """queries longer than this are cut at the post's last newline (counted)"""
    max_completion_tokens: Positive[int] = 48
    """completions longer than this are cut (counted); the EOS is kept"""
    batch_size: Positive[int] = 32
    """sequences per optimizer step, over all ranks and micro-batches"""
    micro_batch_size: Positive[int] = 32
    """sequences per forward pass on one rank"""
    max_steps: PositiveOrAll[int] = 500
    """optimizer steps; -1: `epochs` epochs"""
    epochs: Positive[int] = 1
    """epochs when max_steps is -1"""
    lr: Positive[float] = 3e-3
    """peak learning rate"""
    warmup_steps: NonNegative[int] = 20
    """linear warmup from 0"""
    min_lr_ratio: Between(0, 1) = 0.05
    """linear decay ends at lr * min_lr_ratio"""
    weight_decay: NonNegative[float] = 0.01
    """AdamW weight decay"""
    grad_clip: Positive[float] = 1.0
    """max gradient norm"""
    eval_every: Positive[int] = 100
    """steps between validation losses"""
    n_val: PositiveOrAll[int] = 256
    """validation examples for the validation loss (-1: the whole validation split)"""
    n_judge: NonNegative[int] = 200
    """tiny: validation posts whose greedy summaries the rule judge scores at the end"""
    checkpoint_every: Positive[int] = 100
    log_every: Positive[int] = 10
    """steps between metric lines"""


PRESETS = {
    "micro": dict(max_train_posts=512, max_steps=12, n_layer=2, n_embd=64, n_head=2, eval_every=6, checkpoint_every=6,
                  n_val=32, n_judge=16, log_every=2, warmup_steps=2, micro_batch_size=8, batch_size=16),
    # SmolLM2-135M-Instruct (python -m minirlaif.smollm2) on the synthetic task with LoRA, fp32 (bf16 on a CPU
    # without AVX512-BF16/AMX is ~25x slower): README's SmolLM2 result, `RLHF=0 bash run_pipeline.sh smol`
    "smol": dict(model="runs/models/smollm2-135m-instruct", lora_rank=16, lora_alpha=32.0, max_query_tokens=160,
                 max_completion_tokens=48, batch_size=8, micro_batch_size=8, max_steps=40, lr=2e-4, warmup_steps=4,
                 min_lr_ratio=0.1, eval_every=20, n_val=64, n_judge=64, checkpoint_every=20, log_every=5),
    "hh-tiny": dict(task="hh", max_steps=1000),  # the dialogue task: its names and places take longer to copy
    "gpt2-large": dict(task_dir="", dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered", model="gpt2-large",
                       max_query_tokens=512, max_completion_tokens=128, batch_size=64, micro_batch_size=8,
                       max_steps=-1, epochs=1, lr=5e-5, warmup_steps=0, min_lr_ratio=0.0, weight_decay=0.0,
                       eval_every=200, n_val=512, n_judge=0, checkpoint_every=200, log_every=10,
                       bf16=True),
}


# ----------------------------------------------------------------------------------------------------------------
# helpers


def load_or_build(cfg: Config, train_posts, task):
    """(tokenizer, model): a hub or local model with a [PAD] token added, or (tiny) a BPE trained on the task and a
    small GPT-2 built from the config."""
    if cfg.model:
        tokenizer = load_tokenizer(cfg.model)
        model = load_causal_lm(cfg.model)
        grow_embeddings(model, tokenizer)  # room for the new [PAD] token; never shrinks a padded embedding
        model.config.pad_token_id = tokenizer.pad_token_id
        return tokenizer, model
    from transformers import GPT2LMHeadModel

    tokenizer = train_bpe_tokenizer([task.bpe_text(p) for p in train_posts], cfg.vocab_size)
    # built from a config, not loaded, so it gets load_causal_lm's one-kernel GELU here
    config = tiny_gpt2_config(tokenizer, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions)
    return tokenizer, fuse_gelu(GPT2LMHeadModel(config))


def tokenize(posts, tokenizer, cfg: Config, task) -> tuple[list[tuple[list[int], list[int]]], dict]:
    """Posts -> (query ids, completion ids) pairs, with counts of what was cut."""
    examples, n_q, n_c = [], 0, 0
    for p in posts:
        query, q, cut = task.build_query(tokenizer, p, cfg.max_query_tokens)  # q starts with any BOS of the tokenizer
        c = encode_completion(tokenizer, query, task.completion(p.summary, tokenizer))  # split in context
        if len(c) > cfg.max_completion_tokens:  # keep the EOS so the model still learns to stop
            c, n_c = c[: cfg.max_completion_tokens - 1] + [tokenizer.eos_token_id], n_c + 1
        examples.append((q, c))
        n_q += cut
    return examples, {"n_truncated_queries": n_q, "n_truncated_completions": n_c}


def collate(batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, loss_mask), all (B, T), right-padded; loss_mask marks the completion's tokens."""
    ids, mask = pad_batch([q + c for q, c in batch], pad_id, side="right")
    loss_mask = torch.zeros_like(mask)
    for i, (q, c) in enumerate(batch):
        loss_mask[i, len(q): len(q) + len(c)] = 1
    return ids, mask, loss_mask


def completion_loss_sum(model, ids, mask, loss_mask) -> torch.Tensor:
    """Sum over completion tokens of -log p(token | prefix); the caller divides by the global token count."""
    logits, _ = causal_lm_logits(model, ids, mask)  # (B, T, V); a token past the tokenizer has probability 0
    targets = ids[:, 1:].masked_fill(loss_mask[:, 1:] == 0, -100)  # (B, T-1), -100: not a target
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                           reduction="sum")


@torch.no_grad()
def validation_loss(model, examples, cfg: Config, pad_id: int, run) -> float:
    """The completion-token mean of the loss over the validation examples (each rank scores its share)."""
    model.eval()
    total, count = torch.zeros((), device=run.device), torch.zeros((), device=run.device)
    for i in range(run.rank * cfg.micro_batch_size, len(examples), run.world_size * cfg.micro_batch_size):
        ids, mask, loss_mask = (t.to(run.device) for t in collate(examples[i: i + cfg.micro_batch_size], pad_id))
        with autocast(run.device, cfg.bf16):
            total += completion_loss_sum(model, ids, mask, loss_mask)
        count += loss_mask[:, 1:].sum()
    model.train()
    return (run.all_reduce(total) / run.all_reduce(count)).item()


def judge_scores(model, tokenizer, posts, cfg: Config, device, task) -> dict:
    """Tiny preset: rule-judge scores of greedy summaries vs the references, the gold and a random baseline."""
    queries = [task.build_query(tokenizer, p, cfg.max_query_tokens)[1] for p in posts]
    outs = generate_texts(model, tokenizer, queries, cfg.max_completion_tokens, batch_size=64, greedy=True,
                          device=device, bf16=cfg.bf16)
    shuffled = posts[1:] + posts[:1]  # random baseline: another post's reference (right format, wrong facts)
    return {
        "judge_score_sft_greedy": statistics.mean(task.score(p, o["text"]) for p, o in zip(posts, outs)),
        "judge_score_reference": statistics.mean(task.score(p, p.summary) for p in posts),
        "judge_score_gold": statistics.mean(task.score(p, task.gold(p.facts)) for p in posts),
        "judge_score_random": statistics.mean(task.score(p, o.summary) for p, o in zip(posts, shuffled)),
        "samples": [{"id": p.id, "reference": p.summary, "sft": o["text"]} for p, o in zip(posts[:5], outs)],
    }


# ----------------------------------------------------------------------------------------------------------------


def main(cfg: Config) -> dict:
    task = get_task(cfg.task)  # what a prompt and a response are (minirlaif/tasks.py)
    if cfg.task_dir:  # the tiny presets' synthetic task (deterministic; skipped when present)
        task.write_synthetic(cfg.task_dir)
    if cfg.model:  # a wrong path is one line naming the flag, before any work
        check_model(cfg.model, "causal-lm", "--model")
    run = Run(cfg, "sft", inputs={"dataset": cfg.dataset, "model": cfg.model or "(tiny, from scratch)"})
    if run.finished:
        return run.finished
    require(cfg.batch_size % (run.world_size * cfg.micro_batch_size) == 0, f"--batch-size {cfg.batch_size} must be "
            f"a multiple of --micro-batch-size {cfg.micro_batch_size} times the {run.world_size} rank(s)")

    # data
    train_posts, train_stats = load_posts(cfg.dataset, "train")
    train_posts = train_posts[: cfg.max_train_posts] if cfg.max_train_posts > 0 else train_posts
    val_posts, val_stats = load_posts(cfg.dataset, "validation")

    # tokenizer and model
    tokenizer, model = load_or_build(cfg, train_posts, task)
    set_attention(model, run.device, cfg.bf16).train()  # eager attention under CPU bf16 (faster)
    model = run.prepare(model)  # on the device; --lora-rank: adapters; --fsdp: sharded (run.py, the one place)
    train, train_cuts = tokenize(train_posts, tokenizer, cfg, task)
    val, _ = tokenize(val_posts[: cfg.n_val] if cfg.n_val > 0 else val_posts, tokenizer, cfg, task)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * (len(train) // cfg.batch_size)
    optimizer = torch.optim.AdamW(trained_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay,  # LoRA: adapters
                                  betas=(0.9, 0.95), fused=run.device.type == "cuda")  # betas of GPT pretraining
    start = run.resume(model=model, optimizer=optimizer)  # the step fixes the data position and the learning rate
    run.say(f"sft: {len(train)} train / {len(val)} val examples, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}"
            f"M params, {total_steps} steps")

    # the loop: one global batch per step
    t0, last_loss = time.time(), float("nan")
    for step in run.steps(start, total_steps):
        for group in optimizer.param_groups:  # a function of the step: a resumed run needs no scheduler state
            group["lr"] = linear_lr(step, total_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        # the global batch is a pure function of (step, seed): one process and N ranks, killed or not, see the same
        batch = [train[i] for i in batch_indices(step, len(train), cfg.batch_size, cfg.seed)]
        mine = batch[run.rank::run.world_size]  # this rank's share of the global batch
        micro = [collate(mine[i: i + cfg.micro_batch_size], tokenizer.pad_token_id)
                 for i in range(0, len(mine), cfg.micro_batch_size)]
        # every micro-batch's loss is divided by the completion tokens of the whole global batch (all micro-batches,
        # all ranks), so the summed gradients are the gradient of one token mean over the global batch
        n_tokens = run.all_reduce(sum(lm[:, 1:].sum() for _, _, lm in micro).to(run.device).float())
        loss_sum = torch.zeros((), device=run.device)
        for ids, mask, loss_mask in micro:
            with autocast(run.device, cfg.bf16):
                loss = completion_loss_sum(model, ids.to(run.device), mask.to(run.device),
                                           loss_mask.to(run.device)) / n_tokens
            loss.backward()
            loss_sum += loss.detach()
        run.sync_grads(model)  # the sum over ranks of the shares above: the global batch's gradient
        grad_norm = run.clip_grad_norm(model, cfg.grad_clip)  # the norm before clipping
        last_loss = run.all_reduce(loss_sum).item()
        run.check_finite(step + 1, loss=last_loss, gradient_norm=grad_norm)  # before the step can spread it
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        metrics = {"sft/loss": last_loss, "sft/lr": optimizer.param_groups[0]["lr"], "sft/grad_norm": grad_norm.item()}
        if done % cfg.eval_every == 0 or done == total_steps:  # the held-out loss: is it still learning the task?
            with run.gathered(model):  # --fsdp: the ranks' shares of the split may differ by a micro-batch
                metrics["sft/val_loss"] = validation_loss(model, val, cfg, tokenizer.pad_token_id, run)
        if done % cfg.log_every == 0 or "sft/val_loss" in metrics:
            metrics["sft/seq_per_s"] = (done - start) * cfg.batch_size / (time.time() - t0)
            run.log(done, metrics)
        run.checkpoint(done)

    # final numbers and save, on one plain model: --fsdp's shards gathered, --lora-rank's adapters folded in (and
    # written to out_dir/adapter in PEFT's format)
    model = run.unwrap(model, base=cfg.model)
    metrics = {"val_loss": validation_loss(model, val, cfg, tokenizer.pad_token_id, run),
               "train_loss": last_loss, "steps": total_steps, "train_time_s": time.time() - t0,
               "n_train": len(train), "n_val": len(val), **train_cuts,
               "n_skipped_empty": train_stats.n_skipped_empty + val_stats.n_skipped_empty}
    if run.master and cfg.n_judge and val_posts[0].facts is not None:  # synthetic task: the gold judge reads facts
        model.eval()
        metrics.update(judge_scores(model, tokenizer, val_posts[: cfg.n_judge], cfg, run.device, task))
        for s in metrics["samples"][:3]:
            print(f"  reference: {s['reference']}\n  sft:       {s['sft']}")
    return run.save(metrics, model, tokenizer, headline=("val_loss", "judge_score_sft_greedy"))


if __name__ == "__main__":
    cli(main, Config, PRESETS)
