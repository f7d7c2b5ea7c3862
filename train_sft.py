"""Stage 1, supervised fine-tuning: teach a policy to write " {summary}<eos>" after a TL;DR query.

Algorithm: next-token cross-entropy on the completion tokens only (the query is context, not a target), averaged
over every completion token of the global batch, AdamW with linear warmup and linear decay, gradient clipping.
The completion ends with EOS and the padding token is a separate `[PAD]`, so the model learns to stop.

Deliberate choices (see README "Implementation details"):
- the loss is a token mean over the *global* batch (all micro-batches and ranks), so gradient accumulation and
  DDP give the same update as one big batch (the seed averaged per micro-batch);
- over-long queries are cut at the post's last newline and counted, never dropped (`data.build_query`);
- tiny preset: a small GPT-2 trained from scratch with a BPE tokenizer trained here on the synthetic task;
  gpt2-large: the hub's `gpt2-large` plus a new `[PAD]` token (embeddings resized).

Commands:
  CPU, tiny (default):  python train_sft.py
  1 GPU:                python train_sft.py --preset gpt2-large
  torchrun:             torchrun --nproc_per_node 4 train_sft.py --preset gpt2-large
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minirlaif import synthetic
from minirlaif.data import build_query, encode_completion, format_completion, load_posts
from minirlaif.generation import generate_texts
from minirlaif.models import (fuse_gelu, grow_embeddings, load_causal_lm, load_tokenizer, pad_batch, position_ids,
                              set_attention, tiny_gpt2_config, train_bpe_tokenizer)
from minirlaif.utils import (MetricLogger, all_reduce, autocast, batch_indices, cleanup_dist, clear_checkpoint,
                             config_dict, finished_metrics, linear_lr, load_checkpoint, parse_config,
                             quiet_transformers, save_checkpoint, set_seed, setup_dist, stop_non_finite, write_json,
                             write_manifest)


@dataclass
class Config:
    preset: str = "tiny"
    """tiny: synthetic task, small GPT-2 from scratch, CPU; gpt2-large: the seed's setup (hub model and data)"""
    out_dir: str = "runs/{preset}/sft"
    """where the model, metrics.json, manifest.json and the checkpoint go"""
    seed: int = 1
    """seeds the model init, the data order and every RNG"""
    resume: bool = True
    """continue from out_dir's checkpoint when there is one (--no-resume starts over)"""
    task_dir: str = "runs/{preset}/data"
    """tiny: where the synthetic task's files are written (if missing); empty for real data"""
    dataset: str = "runs/{preset}/data/sft"
    """SFT data: hub id or local file/dir in the tldr_3_filtered or trl-lib/tldr schema"""
    max_train_posts: int = -1
    """use at most this many training posts (-1: all)"""
    model: str = ""
    """hub id or path of the model to fine-tune; empty: build a tiny GPT-2 from the config below"""
    n_layer: int = 4
    """tiny model: transformer blocks"""
    n_head: int = 4
    """tiny model: attention heads"""
    n_embd: int = 128
    """tiny model: width"""
    n_positions: int = 256
    """tiny model: context length"""
    vocab_size: int = 1024
    """tiny model: BPE vocabulary size (trained on the task's train split)"""
    max_query_tokens: int = 200
    """queries longer than this are cut at the post's last newline (counted)"""
    max_completion_tokens: int = 48
    """completions longer than this are cut (counted); the EOS is kept"""
    batch_size: int = 32
    """sequences per optimizer step, over all ranks and micro-batches"""
    micro_batch_size: int = 32
    """sequences per forward pass on one rank"""
    max_steps: int = 500
    """optimizer steps; -1: `epochs` epochs"""
    epochs: int = 1
    """epochs when max_steps is -1"""
    lr: float = 3e-3
    """peak learning rate"""
    warmup_steps: int = 20
    """linear warmup from 0"""
    min_lr_ratio: float = 0.05
    """linear decay ends at lr * min_lr_ratio"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    grad_clip: float = 1.0
    """max gradient norm"""
    bf16: bool = False
    """bf16 autocast, on GPU or CPU (the CPU presets run fp32; CPU bf16 pays only with AVX512-BF16/AMX)"""
    eval_every: int = 100
    """steps between validation losses"""
    n_val: int = 256
    """validation examples for the validation loss (-1: the whole validation split)"""
    n_judge: int = 200
    """tiny: validation posts whose greedy summaries the rule judge scores at the end"""
    checkpoint_every: int = 100
    """steps between resumable checkpoints"""
    log_every: int = 10
    """steps between metric lines"""
    wandb_project: str = ""
    """log to this wandb project (optional)"""
    tensorboard: bool = False
    """also log to tensorboard (optional)"""


PRESETS = {
    "micro": dict(max_train_posts=512, max_steps=12, n_layer=2, n_embd=64, n_head=2, eval_every=6, checkpoint_every=6,
                  n_val=32, n_judge=16, log_every=2, warmup_steps=2, micro_batch_size=8, batch_size=16),
    # SmolLM2-135M-Instruct (python -m minirlaif.smollm2) on the synthetic task, sized for a 2-core CPU
    "smol": dict(model="runs/models/smollm2-135m-instruct", max_query_tokens=160, max_completion_tokens=40,
                 batch_size=4, micro_batch_size=4, max_steps=8, lr=3e-5, warmup_steps=1, min_lr_ratio=0.1,
                 eval_every=8, n_val=8, n_judge=8, checkpoint_every=4, log_every=1),
    "gpt2-large": dict(task_dir="", dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered", model="gpt2-large",
                       max_query_tokens=512, max_completion_tokens=128, batch_size=64, micro_batch_size=8,
                       max_steps=-1, epochs=1, lr=5e-5, warmup_steps=0, min_lr_ratio=0.0, weight_decay=0.0,
                       eval_every=200, n_val=512, n_judge=0, checkpoint_every=200, log_every=10,
                       bf16=True),
}


# ----------------------------------------------------------------------------------------------------------------
# helpers


def tokenize(posts, tokenizer, cfg: Config) -> tuple[list[tuple[list[int], list[int]]], dict]:
    """Posts -> (query ids, completion ids) pairs, with counts of what was cut."""
    examples, n_q, n_c = [], 0, 0
    for p in posts:
        query, q, cut = build_query(tokenizer, p, cfg.max_query_tokens)  # q starts with the tokenizer's BOS, if any
        c = encode_completion(tokenizer, query, format_completion(p.summary, tokenizer.eos_token))  # split in context
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
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits  # (B, T, V)
    targets = ids[:, 1:].masked_fill(loss_mask[:, 1:] == 0, -100)  # (B, T-1), -100: not a target
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                           reduction="sum")


@torch.no_grad()
def validation_loss(model, examples, cfg: Config, pad_id: int, device, dist) -> float:
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for i in range(dist.rank * cfg.micro_batch_size, len(examples), dist.world_size * cfg.micro_batch_size):
        ids, mask, loss_mask = (t.to(device) for t in collate(examples[i: i + cfg.micro_batch_size], pad_id))
        with autocast(device, cfg.bf16):
            total += completion_loss_sum(model, ids, mask, loss_mask)
        count += loss_mask[:, 1:].sum()
    model.train()
    return (all_reduce(total, dist) / all_reduce(count, dist)).item()


def judge_scores(model, tokenizer, posts, cfg: Config, device) -> dict:
    """Tiny preset: rule-judge scores of greedy summaries vs the references, the gold and a random baseline."""
    queries = [build_query(tokenizer, p, cfg.max_query_tokens)[1] for p in posts]
    outs = generate_texts(model, tokenizer, queries, cfg.max_completion_tokens, batch_size=64, greedy=True,
                          device=device)
    shuffled = posts[1:] + posts[:1]  # random baseline: another post's reference (right format, wrong facts)
    return {
        "judge_score_sft_greedy": statistics.mean(synthetic.score(p, o["text"]) for p, o in zip(posts, outs)),
        "judge_score_reference": statistics.mean(synthetic.score(p, p.summary) for p in posts),
        "judge_score_gold": statistics.mean(synthetic.score(p, synthetic.gold_summary(p.facts)) for p in posts),
        "judge_score_random": statistics.mean(synthetic.score(p, o.summary) for p, o in zip(posts, shuffled)),
        "samples": [{"id": p.id, "reference": p.summary, "sft": o["text"]} for p, o in zip(posts[:5], outs)],
    }


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
    if device.type == "cpu" and dist.ddp:  # share the cores between the ranks
        torch.set_num_threads(max(1, torch.get_num_threads() // dist.world_size))
    assert cfg.batch_size % (dist.world_size * cfg.micro_batch_size) == 0, \
        "batch_size must be a multiple of world_size * micro_batch_size"
    grad_accum = cfg.batch_size // (dist.world_size * cfg.micro_batch_size)

    # data (the tiny preset writes its synthetic task first; deterministic and skipped when present)
    if cfg.task_dir and master:
        synthetic.write_task(cfg.task_dir)
    if dist.ddp:
        torch.distributed.barrier()
    train_posts, train_stats = load_posts(cfg.dataset, "train")
    train_posts = train_posts[: cfg.max_train_posts] if cfg.max_train_posts > 0 else train_posts
    val_posts, val_stats = load_posts(cfg.dataset, "validation")

    # tokenizer and model
    if cfg.model:
        tokenizer = load_tokenizer(cfg.model)
        model = load_causal_lm(cfg.model)
        grow_embeddings(model, tokenizer)  # room for the new [PAD] token; never shrinks a padded embedding
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        texts = [f"{p.title}\n{p.post}\n{p.summary}" for p in train_posts]
        tokenizer = train_bpe_tokenizer(texts, cfg.vocab_size)
        from transformers import GPT2LMHeadModel
        # built from a config, not loaded, so it gets load_causal_lm's one-kernel GELU here
        model = fuse_gelu(GPT2LMHeadModel(tiny_gpt2_config(tokenizer, cfg.n_layer, cfg.n_head, cfg.n_embd,
                                                           cfg.n_positions)))
    set_attention(model, device, cfg.bf16).to(device).train()
    train, train_cuts = tokenize(train_posts, tokenizer, cfg)
    val, _ = tokenize(val_posts[: cfg.n_val] if cfg.n_val > 0 else val_posts, tokenizer, cfg)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * (len(train) // cfg.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.95), fused=device.type == "cuda")
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if dist.ddp else model

    # resume: model, optimizer, step (which fixes the data position), RNG
    step, ckpt_dir = 0, out_dir / "checkpoint"
    if cfg.resume and (state := load_checkpoint(ckpt_dir, cfg, dist, map_location=device)) is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        if master:
            print(f"resumed from {ckpt_dir} at step {step}")
    logger = MetricLogger(out_dir, enabled=master, wandb_project=cfg.wandb_project, tensorboard=cfg.tensorboard,
                          config=config_dict(cfg), name="sft")
    logger.truncate_after(step)
    if master:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"sft: {len(train)} train / {len(val)} val examples, {n_params / 1e6:.2f}M params, {total_steps} steps, "
              f"grad_accum {grad_accum}, world {dist.world_size}, device {device}")

    # the loop: one global batch per step
    t0, start_step, last_loss = time.time(), step, float("nan")
    bar = tqdm(range(step, total_steps), initial=step, total=total_steps, desc="sft", disable=not master)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = linear_lr(step, total_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        batch = [train[i] for i in batch_indices(step, len(train), cfg.batch_size, cfg.seed)]
        mine = batch[dist.rank::dist.world_size]  # this rank's share of the global batch
        micro = [collate(mine[i: i + cfg.micro_batch_size], tokenizer.pad_token_id)
                 for i in range(0, len(mine), cfg.micro_batch_size)]
        # normalise by the completion tokens of the whole global batch (all micro-batches, all ranks)
        n_tokens = all_reduce(sum(lm[:, 1:].sum() for _, _, lm in micro).to(device).float(), dist)
        loss_sum = torch.zeros((), device=device)
        for k, (ids, mask, loss_mask) in enumerate(micro):
            ids, mask, loss_mask = ids.to(device), mask.to(device), loss_mask.to(device)
            sync = k == len(micro) - 1  # DDP all-reduces gradients only on the last micro-batch
            ctx = ddp_model.no_sync() if dist.ddp and not sync else torch.enable_grad()
            with ctx, autocast(device, cfg.bf16):
                loss = completion_loss_sum(ddp_model, ids, mask, loss_mask) / n_tokens
                (loss * dist.world_size).backward()  # DDP averages over ranks; undo it to get the global sum
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        last_loss = all_reduce(loss_sum, dist).item()
        if not (math.isfinite(last_loss) and math.isfinite(grad_norm.item())):  # before the step can spread it
            stop_non_finite(f"loss ({last_loss:.4g}) or gradient norm ({grad_norm.item():.4g})", step + 1, ckpt_dir)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        metrics = {"sft/loss": last_loss, "sft/lr": optimizer.param_groups[0]["lr"], "sft/grad_norm": grad_norm.item()}
        if done % cfg.eval_every == 0 or done == total_steps:
            metrics["sft/val_loss"] = validation_loss(model, val, cfg, tokenizer.pad_token_id, device, dist)
        if done % cfg.log_every == 0 or "sft/val_loss" in metrics:
            metrics["sft/seq_per_s"] = (done - start_step) * cfg.batch_size / (time.time() - t0)
            logger.log(done, metrics, echo=tqdm.write)
        if done % cfg.checkpoint_every == 0 and done < total_steps:
            save_checkpoint(ckpt_dir, done, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                             "config": config_dict(cfg)}, dist)
    bar.close()

    # final numbers and save
    metrics = {"val_loss": validation_loss(model, val, cfg, tokenizer.pad_token_id, device, dist),
               "train_loss": last_loss, "steps": total_steps, "train_time_s": time.time() - t0,
               "n_train": len(train), "n_val": len(val), **train_cuts,
               "n_skipped_empty": train_stats.n_skipped_empty + val_stats.n_skipped_empty}
    if master:
        model.eval()
        if cfg.n_judge and val_posts[0].facts is not None:
            metrics.update(judge_scores(model, tokenizer, val_posts[: cfg.n_judge], cfg, device))
            for s in metrics["samples"][:3]:
                print(f"  reference: {s['reference']}\n  sft:       {s['sft']}")
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        write_json(out_dir / "metrics.json", metrics)
        write_manifest(out_dir, cfg, {"dataset": cfg.dataset, "model": cfg.model or "(tiny, from scratch)"})
        clear_checkpoint(ckpt_dir)  # the saved model supersedes it
        print({k: v for k, v in metrics.items() if k != "samples"})
    cleanup_dist(dist)
    return metrics


if __name__ == "__main__":
    main(parse_config(Config, PRESETS))
