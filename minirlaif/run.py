"""The run machinery every stage shares, behind one door, so that each script reads like its algorithm.

    run = Run(cfg, "sft", inputs={"dataset": cfg.dataset})   # skip a finished run; torchrun, seeds, threads
    if run.finished:
        return run.finished
    model = run.prepare(model)                               # the device; --lora-rank adapters; --fsdp shards
    step = run.resume(model=model, optimizer=optimizer)      # what a checkpoint holds; restored if there is one
    for step in run.steps(step, total_steps):                # the loop (a progress bar on a terminal)
        ... loss.backward() ...
        run.sync_grads(model)                                 # gradients summed over the ranks
        run.clip_grad_norm(model, cfg.grad_clip)              # (under --fsdp over every rank's shards)
        run.log(step + 1, metrics)                            # a short line, a metrics.jsonl row
        run.checkpoint(step + 1)                              # every --checkpoint-every steps
    model = run.unwrap(model)                                # one plain model: shards gathered, adapters merged
    run.save(metrics, model, tokenizer)                      # model, metrics.json, manifest.json

What it guarantees (docs/engineering.md "Guarantees"):
- Skip means the same config on the same inputs: a stage is skipped only when its out_dir holds a finished run
  (metrics.json + manifest.json) of the same config whose inputs (files or model dirs, by content: SHA-256) are
  unchanged. Otherwise it runs, and says which input changed.
- A checkpoint is resumed only by the same config on the same inputs. A changed config is refused (rerun with
  the same flags, or --no-resume); changed inputs start the stage over, saying which.
- Every rank's RNG state is in the checkpoint, written before rank 0 writes state.pt (a barrier between), so a
  kill at any moment leaves either the previous complete checkpoint or the new one.
- An input that another stage is still writing (its run.json is there, its metrics.json not) is refused.
- One way to train on several ranks: each rank's loss is normalised by global counts, so the gradient of the
  global batch is the SUM of the ranks' gradients (`sync_grads`; under --fsdp, FSDP2's reduce-scatter sums
  them); no DDP wrapper.
- LoRA (--lora-rank) and FSDP2 (--fsdp) are here only: prepare, gathered, clip_grad_norm, checkpoint / resume
  (DCP shards under --fsdp), unwrap (docs/engineering.md "LoRA and FSDP2").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import subprocess
import sys
import resource
import shutil
import time
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from minirlaif.config import (Between, NonNegative, Positive, UserError, config_dict, config_errors,
                              parse_config, require)
from minirlaif.data import DataError
from minirlaif.lora import add_lora, lora_layers, merge_lora, merged_state_dict, save_adapter
from minirlaif.utils import (append_jsonl, fault_point, read_json, read_jsonl_resumable, save_atomic, sha256_path,
                             truncate_jsonl, write_json)

# ----------------------------------------------------------------------------------------------------------------
# the trainers' run settings (their configs extend this)


@dataclass
class RunConfig:
    """How a training run proceeds and logs (what it computes is the stage's own config)."""
    resume: bool = True
    """continue from out_dir's checkpoint when there is one (--no-resume starts over)"""
    bf16: bool = False
    """bf16 autocast, on GPU or CPU (the CPU presets run fp32; CPU bf16 pays only with AVX512-BF16/AMX)"""
    checkpoint_every: Positive[int] = 10
    """steps between resumable checkpoints"""
    wandb_project: str = ""
    """also log to this wandb project (optional)"""
    tensorboard: bool = False
    """also log to tensorboard (optional)"""
    # bigger models (docs/engineering.md "LoRA and FSDP2"): one place for both, Run.prepare / Run.unwrap
    lora_rank: NonNegative[int] = 0
    """train LoRA adapters of this rank on the backbone's linear layers, not every weight (0: full training)"""
    lora_alpha: Positive[float] = 16.0
    """LoRA's scale is lora_alpha / lora_rank"""
    lora_dropout: Between(0, 0.99) = 0.0
    """dropout on the adapters' input (PPO needs 0: its first ratio must be exactly 1)"""
    lora_targets: str = "all-linear"
    """layers that get adapters: all-linear (every linear layer of the blocks) or comma-separated name suffixes"""
    fsdp: bool = False
    """under torchrun, shard parameters, gradients and optimizer state over the ranks (FSDP2), not replicate them"""


# ----------------------------------------------------------------------------------------------------------------
# torchrun, seeds


@dataclasses.dataclass
class Dist:
    """Where this process sits in a torchrun job (a plain single process is rank 0 of 1)."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (a new tensor); identity in a single process."""
        return all_reduce(x, self)


def setup_dist(device: str = "auto") -> Dist:
    """Join the torchrun process group if launched by torchrun (nccl on GPU, gloo on CPU)."""
    want_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if want_cuda else "cpu"))
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if want_cuda:
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(backend="nccl" if want_cuda else "gloo")
    dev = torch.device(f"cuda:{local_rank}") if want_cuda else torch.device("cpu")
    return Dist(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def cleanup_dist(dist: Dist) -> None:
    """Wait for every rank, then leave the process group (unless something left it already: a vLLM rollout
    engine's shutdown under torchrun destroys the group it joined)."""
    if dist.ddp and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def all_reduce(x: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Sum a tensor over ranks (a new tensor); identity in a single process."""
    if dist.ddp:
        x = x.clone()
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM)
    return x


def set_seed(seed: int) -> None:
    """Seed every global RNG a stage may touch (Python, NumPy, torch CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global RNG's state in types torch.load(weights_only=True) reads (no pickled numpy arrays)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def quiet_transformers() -> None:
    """Silence transformers' load reports and progress bars (a new reward head is expected, not a warning)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# ----------------------------------------------------------------------------------------------------------------
# what a run read: inputs by content


def fingerprint(path: str) -> dict:
    """{"path", "sha256"} of an input: the SHA-256 of a file, or of a model or data dir's top-level content files
    (`utils.sha256_path`: logs and checkpoints left out); sha256 None for a path that is not here (a hub id)."""
    return {"path": str(path), "sha256": sha256_path(path)}


def changed_inputs(saved: dict, current: dict) -> list[str]:
    """The names of the inputs whose path or content differ between two {name: fingerprint} maps."""
    names = sorted(set(saved) | set(current))
    return [n for n in names if (saved.get(n) or {}).get("path") != (current.get(n) or {}).get("path")
            or (saved.get(n) or {}).get("sha256") != (current.get(n) or {}).get("sha256")]


def unfinished_stage(path: str) -> Path | None:
    """The stage dir an input lies in if that stage started a run there and has not finished it, else None."""
    p = Path(path)
    d = p if p.is_dir() else p.parent
    return d if (d / "run.json").is_file() and not (d / "metrics.json").is_file() else None


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("-dirty" if dirty else "")) or None


def package_versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "datasets", "numpy", "einops", "vllm", "openai"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _plain(obj):
    return json.loads(json.dumps(obj, default=str))


def same_config(a: dict, b: dict, ignore=()) -> list[str]:
    """The fields on which two config dicts differ (`ignore`d ones left out); [] when they are the same."""
    a, b = _plain(a), _plain(b)
    return sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))


# ----------------------------------------------------------------------------------------------------------------
# the run


class Run:
    """One run of a stage: skip or start, resume, loop, log, checkpoint, save (see the module docstring).

    `inputs` names what the stage reads ({name: path}, recorded in the manifest with its content hash; never the
    stage's own outputs); `run_control` names config fields that change how a run proceeds, not what it computes
    (label.py's chunk sizes and --max-posts): an unfinished run may be continued with other values. `partial` are
    the files of an unfinished run that a fresh start deletes (a trainer's checkpoint; label.py's rows).
    `out_dir` overrides cfg.out_dir (a stage whose default depends on other flags)."""

    def __init__(self, cfg, name: str, inputs: dict | None = None, run_control=(), partial=None, out_dir=None):
        _current.append(self)
        if errors := config_errors(cfg):  # main(cfg) called from code gets the checks parse_config makes
            raise UserError("\n  ".join([f"{name}: bad config values (one line per field):", *errors]))
        self.cfg, self.name, self.out_dir = cfg, name, Path(out_dir or cfg.out_dir)
        self.fsdp = bool(getattr(cfg, "fsdp", False))
        self.run_control = ("resume", *run_control)
        self.partial = partial if partial is not None else ("checkpoint",)  # a trainer's logs: cut back in resume()
        self.t0, self.step, self.total, self.tracked, self._sinks = time.time(), 0, 0, {}, None
        self.inputs = {k: fingerprint(str(p)) for k, p in (inputs or {}).items()}
        self.finished = self._finished(self._read(self.out_dir / "manifest.json"))
        if self.finished is not None:
            return
        for flag, path in (inputs or {}).items():
            if (d := unfinished_stage(str(path))) is not None:
                raise UserError(f"{name}: its input {flag} {path} is not finished: the run in {d} started "
                                f"({d / 'run.json'}) but wrote no metrics.json; rerun that stage first")
        require(not self.fsdp or "RANK" in os.environ, f"{name}: --fsdp shards over torchrun's ranks: launch it with "
                f"torchrun --nproc_per_node N (N >= 1)")
        quiet_transformers()
        self.dist = setup_dist()
        self.device, self.master = self.dist.device, self.dist.master
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        set_seed(cfg.seed + self.rank)
        if self.device.type == "cpu" and self.dist.ddp:  # share the cores between the ranks
            torch.set_num_threads(max(1, torch.get_num_threads() // self.world_size))
        self.fresh = self._start()

    # -- skip and start --------------------------------------------------------------------------------------

    @staticmethod
    def _read(path: Path) -> dict | None:
        return read_json(path) if path.is_file() else None

    def _finished(self, manifest: dict | None) -> dict | None:
        """metrics.json of a finished run of this config on these inputs, else None (and why, when it matters)."""
        metrics = self._read(self.out_dir / "metrics.json")
        if not self.cfg.resume or metrics is None or manifest is None or same_config(
                manifest["config"], config_dict(self.cfg), ("resume",)):  # --no-resume: start over, always
            return None
        if changed := changed_inputs(manifest["inputs"], self.inputs):
            names = ", ".join(f"{c} ({(self.inputs.get(c) or {}).get('path')})" for c in changed)
            print(f"{self.name}: {self.out_dir} holds a finished run of this config, but its input {names} changed "
                  f"since; running again")
            return None
        print(f"{self.name}: {self.out_dir} is finished with this config on these inputs; skipping (--no-resume "
              f"reruns it)")
        return metrics

    def _start(self) -> bool:
        """Record the start (run.json) and decide whether earlier partial outputs may be continued. Returns True
        when the run starts fresh (no resume, or a run of other inputs was there: its partial files are deleted)."""
        started = self._read(self.out_dir / "run.json")
        fresh = not self.cfg.resume or started is None
        if not fresh:
            if diff := same_config(started["config"], config_dict(self.cfg), self.run_control):
                if any((self.out_dir / p).exists() for p in self.partial):
                    raise UserError(f"{self.name}: {self.out_dir} holds an unfinished run with a different config "
                                    f"({', '.join(diff)} differ); rerun with the same flags to continue it, with "
                                    f"--no-resume to start over, or use another --out-dir")
                fresh = True
            elif changed := changed_inputs(started["inputs"], self.inputs):
                if not (self.out_dir / "metrics.json").is_file():  # (a finished run's change is told by _finished)
                    print(f"{self.name}: the input {', '.join(changed)} changed since the unfinished run in "
                          f"{self.out_dir} started; starting over")
                fresh = True
        if self.master:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.json", "manifest.json"):  # a finished run of other settings is finished no more
                (self.out_dir / name).unlink(missing_ok=True)
            if fresh:
                for p in self.partial:
                    remove(self.out_dir / p)
            write_json(self.out_dir / "run.json", {"config": config_dict(self.cfg), "inputs": self.inputs,
                                                   "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        self.barrier()
        return fresh

    # -- ranks ---------------------------------------------------------------------------------------------

    def barrier(self) -> None:
        if self.dist.ddp and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def all_reduce(self, x) -> torch.Tensor:
        """Sum over ranks (numbers become tensors on the run's device)."""
        return all_reduce(torch.as_tensor(x, dtype=torch.float32, device=self.device) if not torch.is_tensor(x)
                          else x, self.dist)

    def sync_grads(self, *models) -> None:
        """Sum every gradient over the ranks. Losses are normalised by global counts (all micro-batches, all
        ranks), so the sum is the gradient of the global batch: N ranks take the update one process takes.
        (--fsdp: backward has already summed them, reduce-scattered into each rank's shard: fsdp.shard_model.)"""
        if self.dist.ddp and not self.fsdp:
            for model in models:
                for p in model.parameters():
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)

    def clip_grad_norm(self, model, max_norm: float) -> torch.Tensor:
        """Clip `model`'s gradients to a global norm of `max_norm`; returns the norm before clipping (under --fsdp
        over every rank's shards: fsdp.clip_grad_norm_)."""
        if self.fsdp:
            from minirlaif import fsdp

            return fsdp.clip_grad_norm_(model, max_norm)
        return torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)

    # -- the models: LoRA (--lora-rank) and FSDP2 (--fsdp), here and nowhere else ----------------------------

    def prepare(self, model, trained=(), frozen=False, shard_blocks=True):
        """Make `model` what the run trains (or, `frozen`, only uses), on the run's device; returns it. Build the
        optimizer after this call, on the parameters that require grad.

        - --lora-rank (trained models): LoRA adapters on the backbone's linear layers (lora.add_lora), all else
          frozen but the `trained` modules (a reward / value model's "score" head); the adapters are seeded by
          --seed, the same on every rank;
        - under torchrun, a trained model takes rank 0's weights (a model built from a config draws its init from
          each rank's own RNG, seed + rank; without a DDP wrapper nothing else would make the ranks agree);
        - --fsdp: sharded over the ranks (fsdp.shard_model). shard_blocks=False makes the backbone one unit, for a
          model whose gradient crosses forward calls through a KV cache (train_rm.py's shared-prefix pairs).
        """
        if frozen:
            model.eval().requires_grad_(False)
        elif self.cfg.lora_rank:
            try:
                add_lora(model, self.cfg.lora_rank, self.cfg.lora_alpha, self.cfg.lora_dropout, self.cfg.lora_targets,
                         trained=trained, seed=self.cfg.seed)
            except ValueError as e:  # a target that matches no layer: name the flag
                raise UserError(f"{self.name}: --lora-targets {self.cfg.lora_targets}: {e}") from None
        model.to(self.device)
        if self.dist.ddp and not frozen:
            for t in model.state_dict().values():
                torch.distributed.broadcast(t, src=0)
        if self.fsdp:
            from minirlaif import fsdp

            fsdp.shard_model(model, self.device, per_block=shard_blocks)
        return model

    @contextlib.contextmanager
    def gathered(self, model):
        """--fsdp: `model`'s whole weights on every rank inside the block (fsdp.gathered), for a loop whose number
        of forward passes differs between ranks (sampling until EOS, the last batches of a split shared out), on
        which a sharded model's per-forward collectives would hang. Without --fsdp (or a model), nothing to do."""
        if not self.fsdp or model is None:
            yield model
            return
        from minirlaif import fsdp

        with fsdp.gathered(model):
            yield model

    def trained_state(self, model) -> dict:
        """A CPU copy of the parameters of `model` that train (all, or the adapters and head under LoRA): what one
        moment of a run differs from another by, for load_trained_state (train_rm.py's best validation model).
        Under --fsdp gathered on rank 0 ({} on the others)."""
        if self.fsdp:
            from minirlaif import fsdp

            return fsdp.full_model_state_dict(model, rank0_only=True, trained_only=True)
        return {k: p.detach().cpu().clone() for k, p in model.named_parameters() if p.requires_grad}

    def load_trained_state(self, model, state: dict) -> None:
        """Put `trained_state`'s copy back into `model` (its frozen parameters never changed)."""
        if self.fsdp:
            from minirlaif import fsdp

            return fsdp.load_full_model_state_dict(model, state)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(not p.requires_grad for k, p in model.named_parameters() if k in missing)

    def unwrap(self, model, base: str = ""):
        """The trained `model` as one plain transformers model on every rank, for what follows training (evaluation,
        the reward offset, save): --fsdp's shards gathered into an unsharded copy, --lora-rank's adapters folded
        into the weights, after rank 0 writes them to out_dir/adapter in PEFT's format for the base model `base`
        (lora.save_adapter). A plain model comes back as it is."""
        has_lora, sharded = bool(lora_layers(model)), False
        if self.fsdp:
            from minirlaif import fsdp

            sharded = bool(fsdp.fsdp_units(model))
        if not has_lora and not sharded:
            return model
        state = fsdp.full_model_state_dict(model, rank0_only=False) if sharded else model.state_dict()
        if has_lora:
            if self.master:
                save_adapter(model, self.out_dir / "adapter", base, state)
            if not sharded:
                return merge_lora(model)  # in place
            state = merged_state_dict(model, state)
        return fsdp.unsharded_copy(model, state)

    # -- resume and checkpoints ------------------------------------------------------------------------------

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    def resume(self, **tracked) -> int:
        """Name what a checkpoint holds (models, optimizers, objects with state_dict, plain dicts of numbers) and
        restore it from this run's checkpoint when there is one; every rank's RNG state too. Returns the step to
        continue from (0 for a fresh run). metrics.jsonl and samples.jsonl are cut back to that step.
        Under --fsdp the models and their optimizers are a DCP checkpoint of shards (fsdp.load_sharded), which any
        number of ranks can load; the rest is in state.pt, as without."""
        self.tracked = tracked
        path = self.ckpt_dir / "state.pt"
        if not self.fresh and path.is_file():
            state = torch.load(path, map_location=self.device, weights_only=True)
            rng = torch.load(self.ckpt_dir / f"rng_rank{self.rank}_step{state['step']}.pt", weights_only=True)
            set_rng_state(rng["rng"])
            sharded = self._sharded()
            for key, obj in tracked.items():
                if obj is None or key in state.get("sharded", ()):
                    continue
                if isinstance(obj, dict):
                    obj.update(state[key])
                else:
                    obj.load_state_dict(state[key])
            if sharded:
                from minirlaif import fsdp

                fsdp.load_sharded(self.ckpt_dir, state["step"], sharded)
            self.step = state["step"]
            if self.master:
                print(f"{self.name}: resumed from {self.ckpt_dir} at step {self.step}")
        if self.master:
            truncate_jsonl(self.out_dir / "metrics.jsonl", "step", self.step)
            truncate_jsonl(self.out_dir / "samples.jsonl", "update", self.step)
        return self.step

    def _sharded(self) -> dict:
        """--fsdp: {model's name: (model, its optimizer)} of the tracked models, which DCP saves as shards."""
        if not self.fsdp:
            return {}
        optimizers = [o for o in self.tracked.values() if isinstance(o, torch.optim.Optimizer)]
        parts = {}
        for name, model in self.tracked.items():
            if isinstance(model, torch.nn.Module):
                params = {id(p) for p in model.parameters()}
                mine = [o for o in optimizers if any(id(p) in params for g in o.param_groups for p in g["params"])]
                assert len(mine) == 1, f"--fsdp: resume() needs the optimizer of {name} too"
                parts[name] = (model, mine[0])
        return parts

    def checkpoint(self, step: int, force: bool = False) -> None:
        """Every --checkpoint-every steps (never at the last: the saved model supersedes it), save what `resume`
        was given; a state holding a NaN or an infinity is never saved (the run stops, saying what is on disk).

        Every rank writes its RNG state under a step-tagged name first (--fsdp: and its shards of the models and
        optimizers, fsdp.save_sharded); after a barrier (every rank's files are on disk) rank 0 writes state.pt,
        whose presence marks the checkpoint complete. A kill before that leaves the previous state.pt with its own
        files (the two newest per rank are kept)."""
        if not force and (step % self.cfg.checkpoint_every or step >= self.total):
            return
        sharded = self._sharded()
        in_shards = [k for k, v in self.tracked.items() if any(v is x for pair in sharded.values() for x in pair)]
        state = {k: (dict(v) if isinstance(v, dict) else v.state_dict()) for k, v in self.tracked.items()
                 if v is not None and k not in in_shards}
        bad = non_finite_tensors(state)
        if self.dist.ddp:  # every rank must stop, or one would wait in the next collective for a rank that left
            every = [None] * self.world_size
            torch.distributed.all_gather_object(every, bad)
            bad = sorted({name for names in every for name in names})
        if sharded:
            from minirlaif import fsdp

            bad += fsdp.non_finite_shards(sharded)
        if bad:
            self.stop_non_finite(f"values in the state of step {step} ({', '.join(bad[:3])}"
                                 f"{', ...' if len(bad) > 3 else ''})", step)
        save_atomic({"step": step, "rng": rng_state()}, self.ckpt_dir / f"rng_rank{self.rank}_step{step}.pt")
        for old in sorted(self.ckpt_dir.glob(f"rng_rank{self.rank}_step*.pt"),
                          key=lambda p: int(p.stem.rsplit("step", 1)[1]))[:-2]:
            old.unlink()
        fault_point("checkpoint_rng")
        if sharded:
            fsdp.save_sharded(self.ckpt_dir, step, sharded)  # the newest older one is kept, as the RNG files are
        self.barrier()  # state.pt must never name a step whose RNG file (or shard) some rank has not written yet
        if self.master:
            save_atomic({**state, "step": step, **({"sharded": in_shards} if in_shards else {})},
                        self.ckpt_dir / "state.pt")
        fault_point("checkpoint")

    def checkpoint_step(self) -> int | None:
        path = self.ckpt_dir / "state.pt"
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]

    def stop_non_finite(self, what: str, step: int):
        """Stop a run that met a NaN or an infinity, saying truthfully what is on disk (nothing of this step is)."""
        saved = self.checkpoint_step()
        where = (f"the checkpoint of step {saved} in {self.ckpt_dir} is intact (the same command resumes from it and "
                 f"meets the same values again: change the config, e.g. a lower --lr, and use --no-resume)"
                 if saved is not None else f"no checkpoint was saved before it ({self.ckpt_dir} holds none); a rerun "
                 f"starts over")
        raise UserError(f"non-finite {what} at step {step}; stopping without saving it. {where}")

    def check_finite(self, step: int, **values) -> None:
        """Stop before an optimizer step that a NaN or an infinity would spread into the weights."""
        values = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in values.items()}
        if not all(math.isfinite(v) for v in values.values()):
            what = " or ".join(f"{k.replace('_', ' ')} ({v:.4g})" for k, v in values.items())
            self.stop_non_finite(what, step)

    # -- the loop and its log --------------------------------------------------------------------------------

    def steps(self, start: int, total: int):
        """range(start, total), with a progress bar when stderr is a terminal (a log file gets the log lines only,
        no carriage-return frames); the current step is what an interruption reports."""
        self.total = total
        bar = None
        if self.master and sys.stderr.isatty():
            from tqdm import tqdm
            bar = tqdm(total=total, initial=start, desc=self.name, leave=False)
        for step in range(start, total):
            self.step = step
            yield step
            if bar is not None:
                bar.update(1)
        self.step = total
        if bar is not None:
            bar.close()

    def log(self, step: int, metrics: dict, show=()) -> None:
        """Append {"step", **metrics} to metrics.jsonl and print a short line of the `show` keys (all if empty)."""
        if not self.master:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        append_jsonl(self.out_dir / "metrics.jsonl", [row])
        if self._sinks is None:  # optional extras, imported only when asked for
            self._sinks = []
            if getattr(self.cfg, "wandb_project", ""):
                import wandb
                self._sinks.append(wandb.init(project=self.cfg.wandb_project, name=self.name,
                                              config=config_dict(self.cfg)).log)
            if getattr(self.cfg, "tensorboard", False):
                from torch.utils.tensorboard import SummaryWriter
                tb = SummaryWriter(str(self.out_dir / "tb"))
                self._sinks.append(lambda r, step: [tb.add_scalar(k, v, step) for k, v in r.items()])
        for sink in self._sinks:
            sink(row, step=step)
        keys = [k for k in (show or metrics) if k in row]
        line = f"{self.name} {step:>5d}/{self.total} | " + " | ".join(f"{k.split('/')[-1]} {_fmt(row[k])}"
                                                                         for k in keys)
        print(line, flush=True)

    def say(self, text: str) -> None:
        """Print a line on rank 0, with the world and the device."""
        if self.master:
            print(f"{text}; world {self.world_size}, device {self.device}", flush=True)

    def memory(self) -> dict:
        """{"mem/peak_gb": peak CUDA memory allocated so far} on a GPU, {} on the CPU."""
        if self.device.type != "cuda":
            return {}
        return {"mem/peak_gb": torch.cuda.max_memory_allocated(self.device) / 2**30}

    def rows(self) -> list[dict]:
        """Every metrics.jsonl row on disk (a resumed run's earlier rows too)."""
        return read_jsonl_resumable(self.out_dir / "metrics.jsonl")

    # -- the end ---------------------------------------------------------------------------------------------

    def save(self, metrics: dict, model=None, tokenizer=None, headline=(), **manifest_extra) -> dict:
        """Rank 0 writes the model (save_pretrained: safetensors that transformers and vLLM load), metrics.json and
        manifest.json (config, inputs with their hashes, git commit, package versions, argv), then removes the
        checkpoint the model supersedes. Prints a one-line summary of the `headline` metrics. Leaves torchrun."""
        metrics = {**metrics, "peak_rss_gb": peak_rss_gb()}  # this process's (rank 0's) high-water mark, on any device
        if self.master:
            if model is not None:
                model.save_pretrained(self.out_dir)
            if tokenizer is not None:
                tokenizer.save_pretrained(self.out_dir)
            write_json(self.out_dir / "metrics.json", metrics)
            write_json(self.out_dir / "manifest.json", {
                "config": config_dict(self.cfg), "seed": getattr(self.cfg, "seed", None), "git_commit": git_commit(),
                "inputs": self.inputs, "packages": package_versions(), "argv": sys.argv,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **manifest_extra})
            remove(self.ckpt_dir)
            numbers = ", ".join(f"{k} {_fmt(metrics[k])}" for k in headline if isinstance(metrics.get(k), (int, float)))
            print(f"=== {self.name} finished in {time.time() - self.t0:.0f} s"
                  f"{': ' + numbers if numbers else ''} ({self.out_dir})", flush=True)
        self.close()
        return metrics

    def close(self) -> None:
        cleanup_dist(self.dist)


def trained_parameters(model) -> list:
    """The parameters an optimizer gets: those that train (every one, or under --lora-rank the adapters and any
    head `Run.prepare` was told to train)."""
    return [p for p in model.parameters() if p.requires_grad]


def plain_state_dict(model) -> dict:
    """`model`'s weights under its transformers class's own names, on every rank (every rank calls it): --fsdp's
    shards gathered, --lora-rank's adapters folded in (lora.merged_state_dict). What a vLLM engine loads."""
    state = model.state_dict()
    if any(isinstance(t, DTensor) for t in state.values()):
        from minirlaif import fsdp

        state = fsdp.full_model_state_dict(model, rank0_only=False)
    return merged_state_dict(model, state) if lora_layers(model) else state


def peak_rss_gb() -> float:
    """The peak resident memory of this process so far, in GiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def progress(items, desc: str):
    """`items` with a progress bar when stderr is a terminal; plain otherwise, so a log file gets no carriage-return
    frames (what a log needs is in the stages' own lines)."""
    if not sys.stderr.isatty():
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, leave=False)


def remove(path: Path) -> None:
    """Delete a file or a directory (a checkpoint, with --fsdp's shard directories), if it is there."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def non_finite_tensors(obj, prefix: str = "") -> list[str]:
    """Names (dotted paths) of the floating-point tensors in a nested state that hold a NaN or an infinity."""
    if isinstance(obj, torch.Tensor):
        return [prefix or "tensor"] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return [name for k, v in items for name in non_finite_tensors(v, f"{prefix}.{k}" if prefix else str(k))]


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"


# ----------------------------------------------------------------------------------------------------------------
# the command line: a user's mistake is one line, Ctrl-C says how to resume


_current: list[Run] = []  # the stage's Run, for the interruption message


def cli(main, config_cls, presets: dict, argv: list[str] | None = None, renamed: dict | None = None) -> None:
    """Parse the flags and run `main(cfg)`. A user's mistake (a bad flag, a missing or wrong path, a bad row of a
    file: UserError, DataError) is printed as its message, without a traceback, exit 1; Ctrl-C says where the run
    stopped and that the same command resumes it (exit 130). `--debug` (or MINIRLAIF_DEBUG=1) shows tracebacks.
    A bug (any other exception) keeps its traceback. `renamed` maps old flag names to new ones (with a warning)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for old, new in (renamed or {}).items():
        for i, a in enumerate(argv):
            if a.split("=")[0] == old:
                print(f"{Path(sys.argv[0]).name}: {old} is deprecated; use {new}", file=sys.stderr)
                argv[i] = new + a[len(old):]
    debug = "--debug" in argv or os.environ.get("MINIRLAIF_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    try:
        main(parse_config(config_cls, presets, argv))
    except KeyboardInterrupt:
        if debug:
            raise
        run = _current[-1] if _current else None
        where = f" at step {run.step} of {run.total}" if run is not None and run.total else ""
        print(f"\ninterrupted{where}; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except (UserError, DataError) as e:
        if debug:  # a UserError is a SystemExit, which Python prints without its traceback
            traceback.print_exc()
        else:
            print(f"{Path(sys.argv[0]).name}: {e}" if isinstance(e, DataError) else e, file=sys.stderr)
        sys.exit(1)
    finally:
        # leave torchrun's group on every path out, also after an error (no barrier: the other ranks may be gone):
        # a process that exits in it can abort at exit, a gloo thread freeing its tensors (SIGABRT, torch 2.13)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
