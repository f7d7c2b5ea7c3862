"""FSDP2 for the trainers: shard a transformers model with `torch.distributed.fsdp.fully_shard`, sum its gradients
over ranks, clip them, gather a full state dict on rank 0, save and resume a sharded checkpoint with
`torch.distributed.checkpoint` (DCP), and sample with the shared KV-cache loop on a sharded policy.

Functions, not a framework: the trainers never call them; the run machinery does (minirlaif/run.py, `Run.prepare`,
`gathered`, `clip_grad_norm`, `checkpoint`, `resume`, `unwrap`, when --fsdp), after torchrun's `init_process_group`
(gloo on CPU, nccl on CUDA).

What FSDP2 does to a model: every parameter becomes a DTensor holding this rank's slice of dim 0
(`param.to_local()`); a unit's forward pre-hook all-gathers its full parameters and its post-hook frees them
again; after backward each unit's gradients are reduce-scattered, so `param.grad` is a DTensor shard too, and an
optimizer built on `model.parameters()` keeps only this rank's share of its state: between steps, each rank holds
1 / world_size of the parameters, gradients and optimizer state.

Every unit's forward and backward is a collective: every rank must run the same units the same number of times
(the same number of micro-batches, also through frozen models), as under DDP; the one loop whose length differs
between ranks, sampling, runs inside `gathered`.

Checked on torch 2.13.0 (tests/test_fsdp.py, CPU and gloo) and no older release: FSDP2's API grew across
releases (e.g. `set_force_sum_reduction_for_comms`), so pyproject's torch>=2.4 is not enough for this module.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from minirlaif.run import non_finite_tensors
from minirlaif.utils import fault_point

# ----------------------------------------------------------------------------------------------------------------
# sharding


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: the submodules whose class transformers names in `_no_split_modules`.

    Every transformers architecture lists its block class there (GPT2Block, LlamaDecoderLayer, Qwen2DecoderLayer,
    Gemma2DecoderLayer, GPTNeoXLayer; the *ForSequenceClassification variants inherit it), for the same reason
    FSDP needs it: a block is the unit that must be whole on one device. accelerate and TRL wrap FSDP units by it.
    Matched along the class's MRO, so that it finds them after fully_shard too (it renames GPT2Block FSDPGPT2Block).
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    assert blocks, f"{type(model).__name__}: no module of a class named in _no_split_modules ({sorted(names)})"
    return blocks


def fsdp_units(model: nn.Module) -> list[FSDPModule]:
    """Every module of `model` that fully_shard made a unit (each one all-gathers and reduce-scatters its own)."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def shard_model(model: nn.Module, device: torch.device, per_block: bool = True) -> nn.Module:
    """Shard `model` (in place) over all ranks: each transformer block is a unit, then the rest; returns it.

    The units follow how models.py calls the model. A causal LM is always called whole (`causal_lm_logits`), so
    the root is the model itself: it holds the embeddings, the final norm and the output layer, which GPT-2 and
    Llama-likes tie to the input embedding (tied weights must share a unit). A reward / value model is called
    part by part, `model.base_model(...)` then `model.score(...)` (models.hidden_states, scalar_outputs): a call
    into a submodule runs no hook of its parent, so the backbone and the head are units of their own, and the
    model itself is none.

    per_block=False makes the whole backbone one unit, gathered from its forward to the end of backward: needed
    where a gradient crosses forward calls through a KV cache, as in models.shared_prefix_rewards (the reward
    model's training): FSDP gathers a block's parameters for backward from a hook on the block's outputs, and
    the keys and values a cache carries into a later call are not outputs, so their gradient would reach a block
    whose parameters were freed ("setStorage: ... out of bounds for storage of size 0").

    Gradients are summed over ranks, not averaged (FSDP's default divides by world_size): every loss here is
    normalised by global counts (tokens or pairs over every micro-batch and rank), so the sum is the gradient of
    the global batch, as `Run.sync_grads` sums them without FSDP. The divide factor 1 alone would not run on gloo:
    FSDP then reduce-scatters with ReduceOp.PREMUL_SUM(1.0), which gloo refuses ("Cannot use ReduceOp.PREMUL_SUM
    with Gloo"); forcing SUM reductions makes it a plain SUM on gloo and nccl alike.

    Build the optimizer after this call: fully_shard replaces every parameter with a new (DTensor) one, and an
    optimizer built before would hold the old ones, which the model no longer uses.
    """
    # a backbone unit returns its last hidden state as a view (transformers reshapes it), and FSDP warns at every
    # first call that an in-place op on a view would skip its backward hook: models.py never modifies an output
    # in place (scalar_outputs, the heads and the losses are all out of place), so the warning is only noise
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    model.to(device)
    blocks = transformer_blocks(model) if per_block else []
    score = getattr(model, "score", None)  # models.head: the scalar head of a reward / value model
    roots = [model.base_model, score] if score is not None else [model]
    for unit in [*blocks, *roots]:  # bottom-up: a unit takes the parameters that no unit below it took
        fully_shard(unit, mesh=mesh, reshard_after_forward=_reshards_after_forward(model, unit, blocks))
    for unit in fsdp_units(model):  # per unit: neither setter recurses into sub-units
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return model


def _reshards_after_forward(model: nn.Module, unit: nn.Module, blocks: list[nn.Module]) -> bool:
    """Blocks free their full parameters after forward (and gather them again in backward): that is where the
    memory goes. The roots keep theirs until backward, which needs them at once (FSDP's default for a root),
    unless nothing in the model trains (a frozen reference or reward model): no backward would ever free them."""
    return unit in blocks or not any(p.requires_grad for p in model.parameters())


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients of `model` to a global norm of `max_norm`; returns the norm before clipping (a plain
    0-d tensor, the same on every rank).

    torch's clip_grad_norm_ on DTensor gradients already computes the norm over every rank's shards (each shard's
    norm is a partial result that DTensor all-reduces) and scales each shard by the same factor; it returns a
    DTensor, made a plain tensor here for logging.
    """
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# ----------------------------------------------------------------------------------------------------------------
# sampling


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Hold every unit of a sharded model gathered (full parameters on every rank) inside the block.

    For the sampling loop (generation.generate), which calls model(...) once per token: left sharded, each forward
    would all-gather every block again, and the loop stops when this rank's rows have all emitted EOS, so ranks
    would run different numbers of forwards, i.e. of collectives, and hang. Gathered once before the loop, no
    forward inside it communicates. Costs the full model's parameters on every rank while it lasts, as DDP does.
    """
    units, blocks = fsdp_units(model), transformer_blocks(model)
    for unit in units:  # the same units in the same order on every rank: the all-gathers match
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for unit in units:
            unit.set_reshard_after_forward(_reshards_after_forward(model, unit, blocks), recurse=False)
            unit.reshard()


# ----------------------------------------------------------------------------------------------------------------
# full state dicts on rank 0 (the final model, written with save_pretrained)

FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state_dict(model: nn.Module, rank0_only: bool = True, trained_only: bool = False) -> dict:
    """The whole model's state dict as plain tensors; every rank must call it.

    rank0_only: on rank 0, in CPU memory ({} on the others): DCP's get_model_state_dict gathers one tensor at a
    time, so the device never holds more than one extra full parameter. Else on every rank, on the device (a
    rank's own vLLM engine, an unsharded copy to evaluate). trained_only: only the parameters that train (e.g. the
    adapters and the head: all that differs between two checkpoints of one run).
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only, ignore_frozen_params=trained_only)
    return get_model_state_dict(model, options=options)


def load_full_model_state_dict(model: nn.Module, state: dict) -> None:
    """Load a full state dict held by rank 0 (`full_model_state_dict`'s, {} elsewhere) into a sharded model: rank 0
    broadcasts it, each rank keeps its shards; missing keys (frozen parameters left out) keep their values."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                strict=False))


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state for the whole model on rank 0 ({} on the others), keyed by parameter name."""
    return get_optimizer_state_dict(model, optimizer, options=FULL_ON_RANK0)


def unsharded_copy(model: nn.Module, state: dict) -> nn.Module:
    """A plain model of `model`'s transformers class holding `state` (full tensors on every rank, the class's own
    keys: LoRA adapters already folded in), on `model`'s device, frozen, in `model`'s train / eval mode: what a
    run evaluates and saves after training (Run.unwrap).

    Built on the meta device (no memory, no init) and then given the tensors of `state`; what a state dict does not
    hold comes from `model`: its buffers (non-persistent ones, such as rotary frequencies, are in no state dict),
    the modules models.py swapped in (fuse_gelu's GELU, disable_dropout's p = 0) and the vocabulary limit.
    """
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # fully_shard subclassed it
    with torch.device("meta"):
        plain = cls(model.config)
    plain.load_state_dict(state, assign=True)
    names = dict(plain.named_modules())
    for name, m in model.named_modules():
        if isinstance(m, (nn.Dropout, nn.GELU)) and name in names:
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, copy.deepcopy(m))
    for name, buf in model.named_buffers():
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent), child, buf.detach().clone())
    plain.tie_weights()  # a tied output layer (GPT-2, SmolLM2) is the embedding again, not a copy of it
    if hasattr(model, "vocab_limit"):
        plain.vocab_limit = model.vocab_limit
    return plain.to(next(model.parameters()).device).requires_grad_(False).train(model.training)


def save_pretrained(model: nn.Module, out_dir: str | Path) -> None:
    """`model.save_pretrained(out_dir)` of a sharded model: gathered on rank 0, written by it; every rank calls it.

    What it writes is what an unsharded model writes: plain transformers loads it (the config's architectures
    name the original class: transformers strips the "FSDP" prefix fully_shard puts on the class name).
    """
    state = full_model_state_dict(model)
    if dist.get_rank() == 0:
        model.save_pretrained(out_dir, state_dict=state)
    dist.barrier()  # the directory is complete when any rank returns


# ----------------------------------------------------------------------------------------------------------------
# sharded checkpoints (DCP): each rank writes its own shards, in parallel, and reads back only those


def sharded_dir(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"sharded_step{step}"


def _sharded_state(parts: dict[str, tuple[nn.Module, torch.optim.Optimizer]]) -> dict:
    """{name: {"model": ..., "optim": ...}} of DTensor shards, with names DCP can match across world sizes."""
    return {name: dict(zip(("model", "optim"), get_state_dict(model, optimizer)))
            for name, (model, optimizer) in parts.items()}


def save_sharded(ckpt_dir: str | Path, step: int, parts: dict[str, tuple[nn.Module, torch.optim.Optimizer]]) -> Path:
    """Write the models and optimizers of `parts` (e.g. {"policy": (policy, opt), "value": (value, value_opt)})
    as the DCP checkpoint `ckpt_dir/sharded_step{step}`; every rank calls it. Returns that directory.

    The caller's marker says which step to resume (Run.checkpoint's state.pt, written after this returns:
    its barrier comes after every rank's write here). Two rules make a kill at any moment safe:
    - `sharded_step{N}` only ever names a whole checkpoint. DCP writes into `sharded_step{N}.tmp` (every rank its
      shards, then rank 0 the `.metadata` that names them, once all have written), and rank 0 renames it. A rerun
      that resumed from an older step writes again over what the killed run left of later ones; written in
      place, a half-rewritten directory would still hold the old `.metadata` and look whole to DCP.
    - The newest older checkpoint is kept: the marker names it until the caller replaces the marker, and a kill
      in between resumes from it. Every other one goes (those of later steps were never named by a marker).
    """
    ckpt_dir, rank = Path(ckpt_dir), dist.get_rank()
    final, tmp = sharded_dir(ckpt_dir, step), Path(ckpt_dir) / f"sharded_step{step}.tmp"
    if rank == 0:  # what a killed run left of this write: nothing of it may mix with this one
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(_sharded_state(parts), checkpoint_id=tmp)  # returns once .metadata is written, on every rank
    if rank == 0:
        fault_point("sharded_checkpoint")  # tests: a kill with the whole checkpoint under its temporary name
        shutil.rmtree(final, ignore_errors=True)  # this step, written by a run killed before its marker
        os.rename(tmp, final)
        keep = {step, max((s for s in _saved_steps(ckpt_dir) if s < step), default=step)}
        for s in set(_saved_steps(ckpt_dir)) - keep:
            shutil.rmtree(sharded_dir(ckpt_dir, s))
    dist.barrier()  # every rank sees the final directory on return
    return final


def _saved_steps(ckpt_dir: Path) -> list[int]:
    return [int(p.name.removeprefix("sharded_step")) for p in ckpt_dir.glob("sharded_step*")
            if p.is_dir() and not p.name.endswith(".tmp")]


def non_finite_shards(parts: dict[str, tuple[nn.Module, torch.optim.Optimizer]]) -> list[str]:
    """Names of the model and optimizer tensors of `parts` that hold a NaN or an infinity on any rank: the same
    list on every rank (every rank calls it), so that all stop together before save_sharded.

    run.non_finite_tensors on the sharded state sees only this rank's shards: ranks would disagree about stopping,
    and one that went on to save would wait in the checkpoint's collectives for a rank that had left.
    """
    bad = non_finite_tensors(_local(_sharded_state(parts)))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, bad)
    return sorted({name for names in every for name in names})


def _local(obj):
    """`obj` (nested dicts and lists) with every DTensor replaced by this rank's shard of it."""
    if isinstance(obj, DTensor):
        return obj.to_local()
    if isinstance(obj, dict):
        return {k: _local(v) for k, v in obj.items()}
    return type(obj)(_local(v) for v in obj) if isinstance(obj, (list, tuple)) else obj


def load_sharded(ckpt_dir: str | Path, step: int, parts: dict[str, tuple[nn.Module, torch.optim.Optimizer]]) -> None:
    """Load `save_sharded`'s checkpoint of `step` into the (already sharded) models and optimizers of `parts`.

    Each rank reads the slices it holds; DCP matches them by name and offset, so a checkpoint written by another
    number of ranks loads too. The optimizers may be fresh: get_state_dict first gives them state to load into
    (one step with zero gradients at lr 0, which changes no parameter).
    """
    state = _sharded_state(parts)
    dcp.load(state, checkpoint_id=sharded_dir(ckpt_dir, step))
    for name, (model, optimizer) in parts.items():
        set_state_dict(model, optimizer, model_state_dict=state[name]["model"], optim_state_dict=state[name]["optim"])
