"""The torchrun worker of tests/test_fsdp.py, and the tiny models and steps that test and worker share.

`python -m torch.distributed.run --standalone --nproc-per-node N tests/fsdp_worker.py OUT_DIR` (PYTHONPATH = the
repository root) trains four tiny models sharded with minirlaif.fsdp over N gloo ranks, STEPS optimizer steps on
the same global batches as `train_plain` (one process, no sharding): a GPT-2 LM (Conv1D, tied embeddings, a
vocabulary that 2 ranks cannot split evenly) that samples a rollout before each step, as PPO's policy does; a
Llama LM (Linear); a GPT-2 reward model trained through models.shared_prefix_rewards (a backbone called twice,
then the head); a "LoRA-like" Llama value model (frozen base, trainable adapters inside the blocks, a trainable
score head) trained on per-token values. After every step it saves a sharded checkpoint of all four
(fsdp.save_sharded, then a state.pt that names its step, as Run.checkpoint writes it); a rerun resumes
from the last complete one. Before training it samples from a frozen sharded policy (fsdp.gathered), each rank
its own queries, and runs it under no_grad. Rank 0 writes what the test compares to OUT_DIR/results.pt, and each
rank its samples to OUT_DIR/samples_rank{r}.pt; last, a NaN put into one rank's shard must be reported on every
rank (OUT_DIR/non_finite_rank{r}.pt).
"""

from __future__ import annotations

import faulthandler
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from helpers import make_eos_likely
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, LlamaConfig
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from minirlaif import fsdp
from minirlaif.generation import generate
from minirlaif.losses import bradley_terry_loss
from minirlaif.models import causal_lm_logits, shared_prefix_rewards, token_scores
from minirlaif.utils import fault_point, save_atomic

VOCAB, EOS, PAD = 61, 0, 1  # 61: the embedding's rows do not split evenly over 2 ranks
STEPS, LR, MAX_NORM = 4, 3e-3, 1.1  # MAX_NORM: some steps are clipped, some not (the test checks)
BATCH, MICRO = 8, 2  # global batch (sequences or pairs) and micro-batch: 4 micro-batches on 1 rank, 2 on each of 2
CASES = ("gpt2", "llama", "rm", "lora")


def gpt2_config(**kw):
    return GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD, **kw)


def llama_config(**kw):
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=EOS,
                       eos_token_id=EOS, pad_token_id=PAD, **kw)


class LoraLike(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: base(x) + x A^T B^T (LoRA's shape, B not zero, so
    that A gets a gradient from the first step)."""

    def __init__(self, base: nn.Linear, rank: int, gen: torch.Generator):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(rank, base.in_features, generator=gen) * 0.1)
        self.B = nn.Parameter(torch.randn(base.out_features, rank, generator=gen) * 0.1)

    def forward(self, x):
        return self.base(x) + (x @ self.A.T) @ self.B.T


def build(case: str) -> nn.Module:
    """The case's model, the same weights in every process (seeded here)."""
    torch.manual_seed(0)
    if case == "gpt2":
        return GPT2LMHeadModel(gpt2_config())
    if case == "llama":
        return LlamaForCausalLM(llama_config())
    if case == "rm":
        return GPT2ForSequenceClassification(gpt2_config(num_labels=1))
    model = LlamaForSequenceClassification(llama_config(num_labels=1))
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        layer.self_attn.q_proj = LoraLike(layer.self_attn.q_proj, 4, gen)
        layer.self_attn.v_proj = LoraLike(layer.self_attn.v_proj, 4, gen)
    model.score.requires_grad_(True)
    return model


def sampling_policy() -> nn.Module:
    """A frozen GPT-2 whose EOS is likely enough that rows stop at different steps (a PPO rollout's policy)."""
    torch.manual_seed(2)
    with torch.no_grad():
        return make_eos_likely(GPT2LMHeadModel(gpt2_config()), EOS, eos_logit=1.5).requires_grad_(False)


def random_rows(gen: torch.Generator, n: int, lo: int, hi: int) -> list[list[int]]:
    return [torch.randint(2, VOCAB, (int(torch.randint(lo, hi + 1, (), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


def pad_right(rows: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) (n, width), padded on the right to one width for the whole global batch, so that every
    micro-batch has the same shape however the batch is split."""
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


def global_batch(case: str, step: int) -> dict[str, torch.Tensor]:
    """The step's global batch: sequences for an LM, (query, two summaries, soft label) pairs for a reward model."""
    gen = torch.Generator().manual_seed(1000 * CASES.index(case) + step)
    if case in ("gpt2", "llama", "lora"):
        ids, mask = pad_right(random_rows(gen, BATCH, 5, 14), 14)
        targets = {"target": torch.randn(ids.shape, generator=gen)} if case == "lora" else {}  # per-token values
        return {"ids": ids, "mask": mask, **targets}
    q_ids, q_mask = pad_right(random_rows(gen, BATCH, 3, 9), 9)
    s_ids, s_mask = pad_right(random_rows(gen, 2 * BATCH, 2, 6), 6)  # rows 2i, 2i + 1: the summaries of query i
    return {"q_ids": q_ids, "q_mask": q_mask, "s_ids": s_ids, "s_mask": s_mask, "p": torch.rand(BATCH, generator=gen)}


def rows_of(batch: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    """Rows lo..hi of a batch (sequences, or pairs: a pair's two summaries come with it)."""
    return {k: v[2 * lo:2 * hi] if k.startswith("s_") else v[lo:hi] for k, v in batch.items()}


def loss_sum(case: str, model: nn.Module, mb: dict[str, torch.Tensor], n_global: torch.Tensor) -> torch.Tensor:
    """The micro-batch's share of the global batch's loss, normalised by the global count (tokens or pairs):
    summed over every micro-batch of every rank, the shares are the global batch's mean loss."""
    if "target" in mb:  # a value model's regression on every token (train_ppo's value loss, unclipped)
        err = (token_scores(model, mb["ids"], mb["mask"]) - mb["target"]) ** 2  # (b, T)
        return (err * mb["mask"]).sum() / n_global
    if "ids" in mb:
        logits, _ = causal_lm_logits(model, mb["ids"], mb["mask"])  # (b, T, V)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), mb["ids"][:, 1:].flatten(), reduction="none")
        return (nll * mb["mask"][:, 1:].flatten()).sum() / n_global
    r = shared_prefix_rewards(model, mb["q_ids"], mb["q_mask"], mb["s_ids"], mb["s_mask"]).view(-1, 2)  # (b, 2)
    return bradley_terry_loss(r[:, 0], r[:, 1], mb["p"]) * r.shape[0] / n_global


def global_count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if "target" in batch:
        return batch["mask"].sum()
    return batch["mask"][:, 1:].sum() if "ids" in batch else torch.tensor(len(batch["p"]))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.1)


def train_step(case: str, model: nn.Module, opt: torch.optim.Optimizer, step: int, rank: int, world: int) -> float:
    """One optimizer step on this rank's share of the global batch, in micro-batches; returns the clipped norm."""
    batch = global_batch(case, step)
    n_global, per_rank = global_count(batch), BATCH // world
    for lo in range(rank * per_rank, (rank + 1) * per_rank, MICRO):
        loss_sum(case, model, rows_of(batch, lo, lo + MICRO), n_global).backward()
    norm = fsdp.clip_grad_norm_(model, MAX_NORM)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


def train_plain() -> dict:
    """The reference: every case's STEPS steps in one process, unsharded, on the whole global batch."""
    out = {}
    for case in CASES:
        model = build(case)
        opt = make_optimizer(model)
        norms = [train_step(case, model, opt, step, 0, 1) for step in range(STEPS)]
        out[case] = {"norms": norms, "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
                     "optim": {name: opt.state[p] for name, p in model.named_parameters() if p in opt.state}}
    return out


def sample_queries(rank: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """This rank's left-padded queries and row seeds (each rank its own: their samples end at different steps)."""
    gen = torch.Generator().manual_seed(50 + rank)
    rows = random_rows(gen, 3, 2, 6)
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, [7 + 10 * rank + i for i in range(len(rows))]


def save_marker(ckpt: Path, step: int, norms: dict) -> None:
    """state.pt, the marker of a complete checkpoint (as Run.checkpoint's): rank 0 writes it once every rank has
    written its shards (save_sharded's barrier); a kill before leaves the previous marker ("checkpoint_rng", as
    Run.checkpoint names the moment after its per-rank files)."""
    fault_point("checkpoint_rng")
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        save_atomic({"step": step, "norms": norms}, ckpt / "state.pt")


def load_marker(ckpt: Path) -> dict | None:
    return torch.load(ckpt / "state.pt", weights_only=True) if (ckpt / "state.pt").is_file() else None


def main(out: Path) -> None:
    faulthandler.enable()  # a rank that dies of a signal (SIGABRT) prints where each of its threads was
    # a short timeout: a collective that one rank never joins fails the test in 2 minutes instead of 30
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=120))
    try:
        run(out)
        torch.distributed.barrier()
    finally:
        # leave the group before the interpreter exits, even after an error: at exit, a gloo worker thread that
        # still holds its last collective's tensors frees them without the GIL and aborts the process (SIGABRT,
        # "terminate called without an active exception"): 6 of 140 2-rank runs that skipped this, on torch 2.13
        torch.distributed.destroy_process_group()


def run(out: Path) -> None:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device, ckpt = torch.device("cpu"), out / "checkpoint"

    # sampling and a frozen model's forward, before any training step (as a PPO run's first rollout)
    policy = fsdp.shard_model(sampling_policy(), device)
    ids, mask, seeds = sample_queries(rank)
    with fsdp.gathered(policy):
        gen = generate(policy, ids, mask, max_new_tokens=12, eos_id=EOS, pad_id=PAD, seeds=seeds)
    with torch.no_grad():
        frozen_logits, _ = causal_lm_logits(policy, ids, mask)
    resharded = all(isinstance(p, DTensor) for p in policy.parameters())  # nothing left gathered
    torch.save({"tokens": gen.tokens, "logprobs": gen.logprobs, "frozen_logits": frozen_logits,
                "resharded": resharded}, out / f"samples_rank{rank}.pt")

    # the reward model trains through shared_prefix_rewards: its backbone is one unit (fsdp.shard_model)
    models = {case: fsdp.shard_model(build(case), device, per_block=case != "rm") for case in CASES}
    parts = {case: (model, make_optimizer(model)) for case, model in models.items()}
    state = load_marker(ckpt)
    start, norms = (state["step"], state["norms"]) if state else (0, {case: [] for case in CASES})
    if state:
        fsdp.load_sharded(ckpt, start, parts)
        print(f"resumed from step {start}", flush=True)
    for step in range(start, STEPS):
        for case, (model, opt) in parts.items():
            if case == "gpt2":  # a rollout from the policy in training, then its update (PPO's order)
                with fsdp.gathered(model):
                    generate(model, ids, mask, max_new_tokens=12, eos_id=EOS, pad_id=PAD, seeds=seeds)
            norms[case].append(train_step(case, model, opt, step, rank, world))
        fsdp.save_sharded(ckpt, step + 1, parts)
        save_marker(ckpt, step + 1, norms)

    results = {case: {"norms": norms[case], "weights": fsdp.full_model_state_dict(model),
                      "optim": fsdp.full_optimizer_state_dict(model, parts[case][1]).get("state")}
               for case, model in models.items()}
    for case in ("gpt2", "rm"):
        fsdp.save_pretrained(models[case], out / f"pretrained_{case}")
    if rank == 0:
        torch.save({"world": world, "resumed_from": start, **results}, out / "results.pt")

    # a NaN in one rank's shard only (last rank, second row of its shard): every rank must learn of it
    with torch.no_grad():
        if rank == world - 1:
            models["llama"].model.layers[1].mlp.up_proj.weight.to_local()[1, 0] = float("nan")
    torch.save(fsdp.non_finite_shards(parts), out / f"non_finite_rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
