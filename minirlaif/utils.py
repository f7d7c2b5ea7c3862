"""Small shared helpers: files written so that a kill never leaves half of one, the jsonl row schemas and their
checks, content hashes, and three pure helpers of the trainers (data order, learning rate, autocast).

The run machinery (torchrun, seeds, checkpoints, manifests, the metric log) is in `minirlaif.run`, the config
command line in `minirlaif.config`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minirlaif.data import DataError

# ----------------------------------------------------------------------------------------------------------------
# the trainers' pure helpers


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


def autocast(device: torch.device | str, enabled: bool = True):
    """bf16 autocast on `device` when enabled (the `--bf16` flag: on for gpt2-large, off for the CPU presets).

    On CPU it pays only where the CPU has bf16 instructions (AVX512-BF16 or AMX; measured on this project's
    AVX512-BF16 CPU only), and models should then use `models.set_attention` (eager attention) too.
    """
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


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
_VOLATILE = ("manifest.json", "metrics.json", "metrics.jsonl", "samples.jsonl", "run.json")


def content_files(path: Path) -> list[Path]:
    """The files that make a directory's content: top-level files, not per-run logs nor temporary files."""
    return [p for p in sorted(path.iterdir())
            if p.is_file() and p.name not in _VOLATILE and not p.name.endswith((".tmp", ".png", ".log"))]


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
    for p in content_files(path):
        h.update(p.name.encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()
