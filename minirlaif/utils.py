"""Small shared helpers: config parsing, seeding, distributed setup, files, manifests, logging.

Every stage script uses these, so they are the one place for: how a dataclass config becomes a CLI, how a
stage records what it did (`metrics.json`, `manifest.json`), how files are written so that a kill never leaves
a half-written one, and how torchrun processes find each other.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import numpy as np
import torch

from minirlaif.data import DataError

# ----------------------------------------------------------------------------------------------------------------
# config: a @dataclass with one docstring per field becomes an argparse CLI


def field_docs(cls) -> dict[str, str]:
    """Read the string literal written under each field of a dataclass (cleanrl / tyro style docs)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(klass)))
        body = tree.body[0].body
        for stmt, nxt in zip(body, body[1:] + [None]):
            is_doc = isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
            if isinstance(stmt, ast.AnnAssign) and is_doc and isinstance(nxt.value.value, str):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _cli_type(tp):
    """Map a field annotation to (argparse type, nargs-action). Supports bool, int, float, str, list[str]."""
    if get_origin(tp) is list:
        return get_args(tp)[0], "append"
    args = [a for a in get_args(tp) if a is not type(None)]  # Optional[X] -> X
    return (args[0] if args else tp), None


def parse_config(cls, presets: dict[str, dict[str, Any]], argv: list[str] | None = None):
    """Build `cls` from preset defaults overridden by command-line flags.

    Order: dataclass defaults (the tiny preset) -> `presets[--preset]` -> flags given on the command line. String
    fields may contain `{preset}` (e.g. `runs/{preset}/sft`), filled in last, so stage paths chain per preset.
    """
    docs, hints = field_docs(cls), get_type_hints(cls)
    defaults = cls()
    parser = argparse.ArgumentParser(description=(sys.modules[cls.__module__].__doc__ or "").split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp, action = _cli_type(hints[f.name])
        default = getattr(defaults, f.name)
        overrides = [f"{p}: {v[f.name]}" for p, v in presets.items() if f.name in v]
        help_ = docs.get(f.name, "") + (f" [{'; '.join(overrides)}]" if overrides else "")
        # argparse %-formats help strings: a literal % (in a doc, an override or a default) must be doubled
        kw = dict(default=argparse.SUPPRESS, help=(help_ + f" (default: {default})").replace("%", "%%"))
        if f.name == "preset":
            kw["choices"] = ["tiny", *[p for p in presets if p != "tiny"]]
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif action == "append":
            parser.add_argument(flag, type=tp, action="append", **kw)
        else:
            parser.add_argument(flag, type=tp, **kw)
    given = vars(parser.parse_args(argv))
    preset = given.get("preset", getattr(defaults, "preset", "tiny"))
    cfg = resolve_paths(dataclasses.replace(defaults, **{**presets.get(preset, {}), **given}))
    if errors := config_errors(cfg):
        raise SystemExit("\n  ".join([f"{parser.prog}: bad flag values (one line per field):", *errors]))
    return cfg


# Every stage's numeric and choice fields are checked once, at parse time, by name: one name means one thing across
# the scripts (README), so one table holds the rules. A Config may override a rule with a class attribute
# `FIELD_RULES: ClassVar[dict]` (label.py: a temperature of 0 means greedy; PPO's log-probs need one > 0).
POSITIVE = (lambda v: v > 0, "must be > 0")
NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
POSITIVE_OR_ALL = (lambda v: v == -1 or v > 0, "must be > 0, or -1 for all / the default")


def between(lo: float, hi: float) -> tuple:
    return (lambda v: lo <= v <= hi, f"must be in [{lo}, {hi}]")


def one_of(*choices: str) -> tuple:
    return (lambda v: v in choices, f"must be one of {', '.join(choices)}")


FIELD_RULES: dict[str, tuple] = {
    **{name: POSITIVE for name in (
        "batch_size", "micro_batch_size", "mini_batches", "eval_batch_size", "rm_batch_size", "gen_batch_size",
        "judge_batch_size", "gen_chunk", "label_chunk", "judge_chunk", "checkpoint_every", "eval_every", "log_every",
        "sample_every", "epochs", "ppo_epochs", "total_episodes", "response_length", "max_new_tokens",
        "max_query_tokens", "max_completion_tokens", "max_summary_tokens", "cot_max_tokens", "max_concurrency",
        "n_bootstrap", "n_reference", "n_layer", "n_head", "n_embd", "n_positions", "vocab_size",
        "tensor_parallel_size", "kl_horizon", "request_timeout", "lr", "grad_clip", "cliprange", "cliprange_value",
        "rule_temperature", "temperature", "sc_samples", "grid_sc_samples")},
    **{name: NON_NEGATIVE for name in (
        "warmup_steps", "weight_decay", "center_coef", "kl_coef", "kl_target", "vf_coef", "shots", "max_retries",
        "retry_base_delay", "retry_max_delay", "price_input_per_1m", "price_output_per_1m", "rule_noise", "n_judge",
        "n_samples", "cpu_threads", "sc_temperature", "sc_top_k")},
    **{name: POSITIVE_OR_ALL for name in (
        "max_steps", "max_train_posts", "max_posts", "max_pairs", "n_val", "n_human_eval", "n_rm_eval", "n",
        "rollout_batch_size", "value_lr", "samples_per_query")},
    "min_lr_ratio": between(0, 1), "gamma": between(0, 1), "lam": between(0, 1), "val_frac": between(0, 0.99),
    "test_frac": between(0, 0.99), "gpu_memory_utilization": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "min_confidence": between(0, 9), "tie_eps": (lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"),
    "top_logprobs": POSITIVE,  # vllm reads any k (max_logprobs is raised to it); openai: make_labeler caps it at 20
    "human_frac": (lambda v: v == -1 or 0 < v < 1, "must be in (0, 1), or -1 for all of both"),
    "kl_estimator": one_of("k1", "k2", "k3"), "feedback": one_of("ai", "human", "mixed"),
    "labels": one_of("soft", "hard"),
    "orders": one_of("both", "ab", "random"), "lc_feature": one_of("log_ratio", "ratio"),
    "preamble": one_of("base", "detailed"), "labeler": one_of("rule", "hf", "vllm", "openai"),
    "judge": one_of("rule", "hf", "vllm", "openai"), "algo": one_of("ppo", "reinforce", "rloo", "grpo"),
    "reward": one_of("rm", "direct"),
    "rollout_backend": one_of("hf", "vllm"),
}


def config_errors(cfg) -> list[str]:
    """One message per field of `cfg` whose value breaks its rule in FIELD_RULES (or the Config's FIELD_RULES)."""
    rules = {**FIELD_RULES, **getattr(type(cfg), "FIELD_RULES", {})}
    errors = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in rules and not isinstance(v, bool):
            ok, text = rules[f.name]
            if not ok(v) or (isinstance(v, float) and not np.isfinite(v)):
                errors.append(f"--{f.name.replace('_', '-')} {text}, got {v!r}")
    return errors


def resolve_paths(cfg):
    """Fill `{preset}` in every string field (idempotent)."""
    updates = {f.name: getattr(cfg, f.name).format(preset=cfg.preset) for f in dataclasses.fields(cfg)
               if isinstance(getattr(cfg, f.name), str) and "{preset}" in getattr(cfg, f.name)}
    return dataclasses.replace(cfg, **updates)


# ----------------------------------------------------------------------------------------------------------------
# randomness and devices


def quiet_transformers() -> None:
    """Silence transformers' load reports and progress bars (a new reward head is expected, not a warning)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


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
    def master_process(self) -> bool:
        return self.rank == 0


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


def all_reduce(x: torch.Tensor, dist: Dist, op: str = "sum") -> torch.Tensor:
    """Sum (or mean) a tensor over ranks; identity in a single process."""
    if dist.ddp:
        x = x.clone()
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM)
        if op == "mean":
            x /= dist.world_size
    return x


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Indices of the global batch of `step`: a seeded permutation per epoch, the last partial batch dropped.

    A pure function of (step, seed), so a resumed run continues exactly where the killed one was in the data.
    """
    per_epoch = n // batch_size
    assert per_epoch > 0, f"the dataset ({n}) is smaller than one batch ({batch_size})"
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return perm[k * batch_size: (k + 1) * batch_size].tolist()


def linear_lr(step: int, total: int, lr: float, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> float:
    """The learning rate of every trainer at optimizer step `step` (0-based) of `total`: linear warmup from 0 over
    `warmup_steps` steps, then linear decay from `lr` to `lr * min_lr_ratio` at the last step's end.

    A pure function of the step, so a resumed run needs no scheduler state to continue on the same schedule.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    frac = (step - warmup_steps) / max(1, total - warmup_steps)
    return lr * (1 - (1 - min_lr_ratio) * frac)


def all_reduce_grads(model: torch.nn.Module, dist: Dist) -> None:
    """Sum gradients over ranks (losses are already normalised by global counts, so the sum is the gradient)."""
    if dist.ddp:
        for p in model.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)


def autocast(device: torch.device | str, enabled: bool = True):
    """bf16 autocast on `device` when enabled (the `--bf16` flag: on for gpt2-large, off for the CPU presets).

    On CPU it pays only where the CPU has bf16 instructions (AVX512-BF16 or AMX; measured on this project's
    AVX512-BF16 CPU only), and models should then use `models.set_attention` (eager attention) too.
    """
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# files: atomic writes, jsonl, hashes


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename): a kill leaves the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save through a temp file + rename, so a checkpoint on disk is always complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# Row schemas of the jsonl files the pipeline writes and reads back: field -> kind or tuple of kinds (None: null
# allowed); a field name ending in "?" may be absent. Kinds: a Python type (int excludes bool; float takes an int
# too, but no NaN or infinity), TOKENS or PROB.
TOKENS = "a list of token ids"  # non-negative ints: a float or bool id is an error, never truncated
PROB = "a probability"  # a finite number in [0, 1]
CANDIDATE_SCHEMA = {"id": str, "subreddit": (str, None), "title": (str, None), "post": str, "query": str,
                    "query_truncated": bool, "summary_a": str, "summary_b": str, "tokens_a": TOKENS,
                    "tokens_b": TOKENS}
PAIR_SCHEMA = {"id": str, "subreddit": (str, None), "title": (str, None), "post": str, "summary_a": str,
               "summary_b": str, "p_a": (PROB, None), "p_a_ab?": (PROB, None), "p_a_ba?": (PROB, None),
               "null_reason?": (str, None), "tokens_a?": (TOKENS, None), "tokens_b?": (TOKENS, None)}

GENERATION_SCHEMA = {"id": str, "text": str, "token_ids": TOKENS}  # evaluate.py's summary cache
JUDGMENT_SCHEMA = {"id": str, "sha": str, "p_a": (PROB, None), "p_a_ab": (PROB, None), "p_a_ba": (PROB, None),
                   "identical": bool, "null_reason": (str, None)}  # evaluate.py's judgment cache


def _is_kind(v, kind) -> bool:
    if kind is None:
        return v is None
    if kind is TOKENS:
        return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v)
    if kind is PROB:
        return _is_kind(v, float) and 0.0 <= v <= 1.0
    if kind is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
    if kind is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, kind)


def check_row(row, schema: dict, loc: str) -> dict:
    """`row` if it matches `schema` (see CANDIDATE_SCHEMA); else a DataError naming `loc` (path:line) and the field."""
    if not isinstance(row, dict):
        raise DataError(f"{loc}: expected a JSON object per line, got {type(row).__name__}")
    for key, kinds in schema.items():
        name = key.rstrip("?")
        if name not in row:
            if key.endswith("?"):
                continue
            raise DataError(f"{loc}: missing required field '{name}'")
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if not any(_is_kind(row[name], k) for k in kinds):
            want = " or ".join("null" if k is None else k if isinstance(k, str) else k.__name__ for k in kinds)
            raise DataError(f"{loc}: field '{name}' must be {want}, got {type(row[name]).__name__} "
                            f"{str(row[name])[:40]!r}")
    return row


def read_jsonl(path: str | Path, schema: dict | None = None) -> list[dict]:
    """Rows of a jsonl file that is an input (another stage's, or given by flag): read only, never changed.

    Unlike read_jsonl_resumable, a complete last line without a trailing newline is a row; any bad line raises a
    DataError naming path:line.
    """
    rows = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if raw.strip():
                try:
                    row = json.loads(raw)
                except ValueError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON line ({e})") from None
                rows.append(check_row(row, schema or {}, f"{path}:{lineno}"))
    return rows


def unique_ids(rows: list[dict], path: str | Path, key: str = "id") -> dict:
    """{row[key]: row}; an id written twice is an error (naming the file), never a row counted twice."""
    out = {}
    for i, r in enumerate(rows):
        if r[key] in out:
            raise DataError(f"{path}: id {r[key]!r} is written more than once (rows {list(out).index(r[key]) + 1} "
                            f"and {i + 1}); was the file appended to by two runs at once?")
        out[r[key]] = r
    return out


def read_jsonl_resumable(path: str | Path, schema: dict | None = None) -> list[dict]:
    """Rows of an append-only jsonl this stage writes, which a kill may have cut mid-line.

    A partial last line (no trailing newline, or not valid JSON) is the row that was in flight: it is cut off the
    file so appending continues cleanly. A bad line anywhere else is real corruption and raises, naming the line;
    so does a row that does not match `schema` (check_row).
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    rows, good_bytes = [], 0
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if last and line == b"":
            break
        try:
            if last:  # no newline after it: written only partly
                raise ValueError("unterminated")
            row = json.loads(line)
        except ValueError:
            if not last:
                raise DataError(f"{path}:{i + 1}: malformed JSON line in a resumable output file") from None
            with open(path, "r+b") as fh:
                fh.truncate(good_bytes)
            break
        rows.append(check_row(row, schema or {}, f"{path}:{i + 1}"))
        good_bytes += len(line) + 1
    return rows


def append_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Append rows and fsync, so a row on disk survives a kill of the process."""
    with open(path, "a") as fh:
        for row in rows:
            line = json.dumps(row, ensure_ascii=False, default=_json_default) + "\n"
            if fault_due("append"):  # tests/test_faults.py: die with half a row on disk, as a kill mid-write would
                fh.write(line[: len(line) // 2])
                fh.flush()
                os.fsync(fh.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


# Fault injection for tests/test_faults.py (off unless the variable is set): MINIRLAIF_KILL_AT="EVENT:N" makes the
# process SIGKILL itself at the Nth EVENT: "append" (a jsonl row, half written), "checkpoint" (a checkpoint just
# completed), "checkpoint_rng" (RNG files written, state.pt not yet).
_fault_counts: dict[str, int] = {}


def fault_due(event: str) -> bool:
    spec = os.environ.get("MINIRLAIF_KILL_AT", "")
    if not spec.startswith(event + ":"):
        return False
    _fault_counts[event] = _fault_counts.get(event, 0) + 1
    return _fault_counts[event] == int(spec.rsplit(":", 1)[1])


def fault_point(event: str) -> None:
    if fault_due(event):
        os.kill(os.getpid(), signal.SIGKILL)


def truncate_jsonl(path: str | Path, key: str, last: int) -> None:
    """Keep the rows of a jsonl log whose `key` is <= last (a resumed run rewrites what came after)."""
    path = Path(path)
    if path.exists():
        rows = [r for r in read_jsonl_resumable(path) if r[key] <= last]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in rows))
        os.replace(tmp, path)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# files in a stage dir that change on every run and say nothing about its content
_VOLATILE = ("manifest.json", "metrics.json", "metrics.jsonl", "samples.jsonl")


def sha256_path(path: str | Path) -> str | None:
    """Hash of a file, or of a directory's top-level content files (models, data); None if missing.

    Sub-directories (checkpoints) and per-run logs are left out, so a directory's hash names its content.
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for p in sorted(path.iterdir()):
        if p.is_file() and p.name not in _VOLATILE and not p.name.endswith((".tmp", ".png", ".log")):
            h.update(p.name.encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: model/optimizer state from the master, RNG state from every rank


def save_checkpoint(ckpt_dir: str | Path, step: int, state: dict, dist: Dist, generators=()) -> None:
    """Write a resumable checkpoint of `step`, unless its state holds a non-finite number (then stop, saving none).

    Every rank writes its RNG state (global RNGs plus the given torch.Generators) under a step-tagged name first;
    after a barrier (every rank's file is on disk) the master writes state.pt, whose presence marks the checkpoint
    complete. A kill before that leaves the previous state.pt with its own RNG files (the two newest per rank are
    kept). Everything is saved in types that `torch.load(weights_only=True)` reads back.
    """
    ckpt_dir = Path(ckpt_dir)
    if (bad := non_finite_tensors(state)) and dist.master_process:
        stop_non_finite(f"values in the state of step {step} ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})",
                        step, ckpt_dir)
    elif bad:
        raise SystemExit(f"non-finite values in the state of step {step}; stopping (rank {dist.rank})")
    save_atomic({"step": step, "rng": rng_state(), "generators": [g.get_state() for g in generators]},
                ckpt_dir / f"rng_rank{dist.rank}_step{step}.pt")
    for old in sorted(ckpt_dir.glob(f"rng_rank{dist.rank}_step*.pt"),
                      key=lambda p: int(p.stem.rsplit("step", 1)[1]))[:-2]:
        old.unlink()
    fault_point("checkpoint_rng")
    if dist.ddp:  # state.pt must never name a step whose RNG file some rank has not written yet
        torch.distributed.barrier()
    if dist.master_process:
        save_atomic({**state, "step": step}, ckpt_dir / "state.pt")
    fault_point("checkpoint")


def non_finite_tensors(obj, prefix: str = "") -> list[str]:
    """Names (dotted paths) of the floating-point tensors in a nested state that hold a NaN or an infinity."""
    if isinstance(obj, torch.Tensor):
        return [prefix or "tensor"] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return [name for k, v in items for name in non_finite_tensors(v, f"{prefix}.{k}" if prefix else str(k))]


def checkpoint_step(ckpt_dir: str | Path) -> int | None:
    """The step of the complete checkpoint in ckpt_dir, or None when there is none."""
    path = Path(ckpt_dir) / "state.pt"
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]


def stop_non_finite(what: str, step: int, ckpt_dir: str | Path):
    """Stop a run that met a NaN or an infinity, saying truthfully what is on disk (nothing of this step is)."""
    saved = checkpoint_step(ckpt_dir)
    where = (f"the checkpoint of step {saved} in {ckpt_dir} is intact (the same command resumes from it and meets "
             f"the same values again: change the config, e.g. a lower --lr, and use --no-resume)" if saved is not None
             else f"no checkpoint was saved before it ({ckpt_dir} holds none); a rerun starts over")
    raise SystemExit(f"non-finite {what} at step {step}; stopping without saving it. {where}")


def check_reward_model(path: str | Path, flag: str) -> None:
    """Refuse a model that is not a reward model (a causal LM would silently get a random score head)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    arch = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in arch) or config.num_labels != 1:
        raise SystemExit(f"{flag} {path}: not a reward model (architectures {arch}, {config.num_labels} labels); "
                         f"give one train_rm.py saved (a *ForSequenceClassification with one label): a causal LM "
                         f"would be scored by a new, random head")


def load_checkpoint(ckpt_dir: str | Path, cfg, dist: Dist, generators=(), map_location=None) -> dict | None:
    """The state saved by save_checkpoint (RNGs restored as a side effect), or None when there is none."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "state.pt").exists():
        return None
    state = torch.load(ckpt_dir / "state.pt", map_location=map_location, weights_only=True)
    check_resume_config(state["config"], cfg, str(ckpt_dir))
    rng = torch.load(ckpt_dir / f"rng_rank{dist.rank}_step{state['step']}.pt", weights_only=True)
    set_rng_state(rng["rng"])
    for g, g_state in zip(generators, rng["generators"]):
        g.set_state(g_state)
    return state


def clear_checkpoint(ckpt_dir: str | Path) -> None:
    """Remove a checkpoint once the final model is saved (it supersedes it)."""
    for f in Path(ckpt_dir).glob("*"):
        f.unlink()


# ----------------------------------------------------------------------------------------------------------------
# manifests: what a stage ran with, so a result can be traced and a rerun skipped


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


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def write_manifest(out_dir: str | Path, cfg, inputs: dict[str, str], **extra) -> None:
    """manifest.json: config, git commit, inputs with their hashes, package versions, seed, command line."""
    write_json(Path(out_dir) / "manifest.json", {
        "config": config_dict(cfg),
        "seed": getattr(cfg, "seed", None),
        "git_commit": git_commit(),
        "inputs": {name: {"path": str(p), "sha256": sha256_path(p)} for name, p in inputs.items()},
        "packages": package_versions(),
        "argv": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    })


# config fields that control how a run proceeds, not what it computes
RUN_CONTROL_FIELDS = ("resume",)


def same_config(a: dict, b: dict) -> bool:
    strip = lambda d: {k: v for k, v in d.items() if k not in RUN_CONTROL_FIELDS}  # noqa: E731
    return strip(a) == strip(json.loads(json.dumps(b, default=_json_default)))


def finished_metrics(out_dir: str | Path, cfg) -> dict | None:
    """The metrics of a finished run of this exact config in out_dir, else None (run_pipeline.sh's skip test)."""
    out_dir = Path(out_dir)
    if not (out_dir / "metrics.json").exists() or not (out_dir / "manifest.json").exists():
        return None
    if not same_config(read_json(out_dir / "manifest.json")["config"], config_dict(cfg)):
        return None
    return read_json(out_dir / "metrics.json")


def check_resume_config(saved: dict, cfg, where: str) -> None:
    """Refuse to resume a checkpoint made with another config: its state would not mean the same thing."""
    cur = json.loads(json.dumps(config_dict(cfg), default=_json_default))
    diff = sorted(k for k in set(saved) | set(cur)
                  if k not in RUN_CONTROL_FIELDS and saved.get(k) != cur.get(k))
    if diff:
        raise SystemExit(f"{where} was written with a different config ({', '.join(diff)} differ); "
                         f"rerun with --no-resume to start over, or with the same flags to continue")


# ----------------------------------------------------------------------------------------------------------------
# logging: one dense line per step, a metrics.jsonl row, optional wandb / tensorboard


class MetricLogger:
    """Prints one line per logged step and appends it to out_dir/metrics.jsonl; wandb / tensorboard if asked."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, wandb_project: str = "", tensorboard: bool = False,
                 config: dict | None = None, name: str = ""):
        self.enabled, self.path = enabled, Path(out_dir) / "metrics.jsonl"
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.wandb = self.tb = None
        if enabled and wandb_project:
            import wandb  # optional, lazy
            self.wandb = wandb.init(project=wandb_project, name=name or None, config=config)
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional, lazy
            self.tb = SummaryWriter(str(Path(out_dir) / "tb"))

    def log(self, step: int, metrics: dict[str, float], echo=print) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        append_jsonl(self.path, [row])
        echo(f"step {step:5d} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in row.items() if k != "step"))
        if self.wandb is not None:
            self.wandb.log(row, step=step)
        if self.tb is not None:
            for k, v in row.items():
                self.tb.add_scalar(k, v, step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint, so no step appears twice."""
        if self.enabled:
            truncate_jsonl(self.path, "step", step)


def first_last(rows: list[dict], keys) -> dict[str, float]:
    """{key_first: the first row's value, key_last: the mean over the last 20% of the rows} for each key.

    Read from a run's whole metrics.jsonl, so a run resumed after a kill reports what an uninterrupted one does.
    """
    out = {}
    rows = [r for r in rows if all(k in r for k in keys)]
    if rows:
        tail = rows[-max(1, len(rows) // 5):]
        for key in keys:
            out[f"{key}_first"], out[f"{key}_last"] = rows[0][key], sum(r[key] for r in tail) / len(tail)
    return out


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
