"""Fault injection: every stage, SIGKILLed at seeded moments and rerun, writes the files an uninterrupted run wrote.

The reference is one uninterrupted `bash run_pipeline.sh micro`. Each stage is then rerun in a copy of that tree
(its own output removed) and killed by `MINIRLAIF_KILL_AT=EVENT:N` (minirlaif/utils.py) at seeded moments: in
the middle of writing a jsonl row ("append", half the row on disk), between a checkpoint's RNG files and its
state.pt ("checkpoint_rng"), right after a checkpoint ("checkpoint"); each rerun resumes and may be killed again;
the last one finishes. Then every output file is compared with the reference: weights by hash, JSON and jsonl row
by row (only wall-clock fields left out), everything else byte for byte. Finally the whole pipeline is killed from
outside (SIGKILL to its process group) at seeded random times and rerun, and must give the same files again.

Slow (several minutes on 2 cores): marked `slow`; `python -m pytest -m "not slow"` leaves it out.
"""

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
ENV.pop("MINIRLAIF_KILL_AT", None)
# each stage as run_pipeline.sh runs it (same relative paths, so the same config and the same files)
STAGES = {
    "sft": ["train_sft.py"],
    "labels": ["label.py"],
    "rm": ["train_rm.py"],
    "rm_human": ["train_rm.py", "--feedback", "human"],
    "ppo": ["train_ppo.py"],
    "eval": ["evaluate.py"],
}
TRAINERS = ("sft", "rm", "rm_human", "ppo")
# fields that hold wall-clock time, throughput or this process's peak memory, or name the moment of the run: the only
# ones allowed to differ
VOLATILE = ("time", "_s", "eps", "per_s", "updates_this_run", "api_this_run", "peak_rss_gb")


def volatile(key: str) -> bool:
    # git_commit: the same code, but a commit made while the suite runs (development) would change it
    return key in ("time", "git_commit") or key.startswith(("time/", "eps")) or key.endswith(VOLATILE)


def strip(obj):
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if not volatile(k)}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def outputs(d: Path) -> dict[str, Path]:
    """Every file a stage left in its dir (logs and tensorboard left out)."""
    return {str(p.relative_to(d)): p for p in sorted(d.rglob("*")) if p.is_file() and p.suffix != ".log"}


def assert_same_outputs(ref: Path, got: Path) -> None:
    a, b = outputs(ref), outputs(got)
    assert sorted(a) == sorted(b), f"{got}: only in the reference {set(a) - set(b)}, only here {set(b) - set(a)}"
    for name, pa in a.items():
        pb = b[name]
        if pa.suffix == ".json":
            assert strip(json.loads(pa.read_text())) == strip(json.loads(pb.read_text())), f"{got / name} differs"
        elif pa.suffix == ".jsonl":
            ra = [strip(json.loads(x)) for x in pa.read_text().splitlines()]
            rb = [strip(json.loads(x)) for x in pb.read_text().splitlines()]
            assert len(ra) == len(rb), f"{got / name}: {len(rb)} rows, the reference has {len(ra)}"
            for i, (x, y) in enumerate(zip(ra, rb)):
                assert x == y, f"{got / name}: row {i + 1} differs"
        elif pa.suffix == ".png":  # plots: drawn from the compared JSON; matplotlib's bytes are not the point
            assert pb.stat().st_size > 0
        elif pa.suffix == ".md":  # report.md: everything but its wall-time cells (train_ppo.py's training time)
            wall = re.compile(r"\| \d+ s \|")
            assert wall.sub("| - |", pa.read_text()) == wall.sub("| - |", pb.read_text()), f"{got / name} differs"
        else:  # weights (safetensors), tokenizer files: byte for byte (weights compared by hash)
            ha, hb = (hashlib.sha256(p.read_bytes()).hexdigest() for p in (pa, pb))
            assert ha == hb, f"{got / name} differs from the uninterrupted run's"


def run_pipeline(cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(ROOT / "run_pipeline.sh"), "micro"], cwd=cwd, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted micro pipeline (also the inputs of each stage's killed runs)."""
    d = tmp_path_factory.mktemp("reference")
    proc = run_pipeline(d)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    return d


def n_appends(stage_dir: Path) -> int:
    """jsonl rows the stage appends in one uninterrupted run (every such row is a kill point)."""
    return sum(len(p.read_text().splitlines()) for p in stage_dir.rglob("*.jsonl"))


def run_stage(cwd: Path, stage: str, kill_at: str | None) -> subprocess.CompletedProcess:
    env = {**ENV, **({"MINIRLAIF_KILL_AT": kill_at} if kill_at else {})}
    return subprocess.run([sys.executable, str(ROOT / STAGES[stage][0]), "--preset", "micro", *STAGES[stage][1:]],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def kill_plan(stage: str, total_appends: int, seed: int) -> list[str]:
    """Seeded kill moments, one per run until the last (which finishes)."""
    rng = random.Random(f"{stage}-{seed}")
    plan = [f"append:{rng.randint(1, max(1, total_appends // 3))}"]  # mid-row, early
    if stage in TRAINERS:
        plan += ["checkpoint_rng:1", "checkpoint:1"]  # before state.pt is written, then just after it
    else:
        plan += [f"append:{rng.randint(1, max(1, total_appends // 3))}"]  # mid-row again, further on
    return plan


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stage_killed_at_seeded_moments_and_rerun_writes_the_uninterrupted_files(reference, stage, tmp_path):
    ref_runs = reference / "runs" / "micro"
    shutil.copytree(reference / "runs", tmp_path / "runs", ignore=shutil.ignore_patterns("logs"))
    shutil.rmtree(tmp_path / "runs" / "micro" / stage)
    plan = kill_plan(stage, n_appends(ref_runs / stage), seed=1)
    for kill_at in plan:
        res = run_stage(tmp_path, stage, kill_at)
        assert res.returncode == -signal.SIGKILL, f"{stage} with {kill_at}: rc {res.returncode}\n{res.stderr[-3000:]}"
        assert not (tmp_path / "runs" / "micro" / stage / "metrics.json").exists()
    res = run_stage(tmp_path, stage, None)
    assert res.returncode == 0, res.stderr[-3000:]
    if stage in ("sft", "rm", "rm_human", "ppo"):
        assert "resumed from" in res.stdout  # the last kill came after a complete checkpoint
    assert_same_outputs(ref_runs / stage, tmp_path / "runs" / "micro" / stage)


def test_the_pipeline_killed_at_random_moments_and_rerun_gives_the_same_files(reference, tmp_path):
    """`bash run_pipeline.sh micro`, SIGKILLed (its whole process group) at seeded random times, then rerun to the
    end: every stage's files (rm_human's included) are the uninterrupted pipeline's."""
    rng = random.Random(18)
    kills = 0
    for _ in range(3):
        proc = run_pipeline(tmp_path)
        time.sleep(rng.uniform(4.0, 20.0))
        if proc.poll() is not None:
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        kills += 1
    assert kills >= 1
    proc = run_pipeline(tmp_path)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    for stage in ("sft", "labels", "rm", "ppo", "rm_human", "ppo_rlhf", "eval"):
        assert_same_outputs(reference / "runs" / "micro" / stage, tmp_path / "runs" / "micro" / stage)
