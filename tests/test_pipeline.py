"""End to end: `ALGOS=direct bash run_pipeline.sh micro` runs all seven stages and the d-RLAIF variant in a fresh
directory, with one short line per finished stage on the terminal and no carriage returns in its logs; a rerun
skips them all; and after SFT is retrained with other flags, every stage downstream of it runs again instead of
keeping what it made from the old model."""

import json
import os
import subprocess
import sys
from pathlib import Path

from minirlaif.utils import sha256_path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["sft", "labels", "rm", "ppo", "rm_human", "ppo_rlhf", "eval"]


def run_pipeline(cwd: Path, preset: str = "micro", algos: str = "direct") -> str:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "ALGOS": algos}
    # the timeout is generous: about 45-65 s on an idle 2-core machine, over 500 s when other jobs share the cores
    out = subprocess.run(["bash", str(ROOT / "run_pipeline.sh"), preset], cwd=cwd, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=1800)
    assert out.returncode == 0, out.stdout[-4000:]
    return out.stdout


def test_micro_pipeline_runs_every_stage_then_skips_them(tmp_path):
    log = run_pipeline(tmp_path)
    runs = tmp_path / "runs" / "micro"
    for stage in STAGES:  # every stage finished and wrote its metrics and manifest
        assert (runs / stage / "metrics.json").is_file(), stage
        assert (runs / stage / "manifest.json").is_file(), stage
    for model_dir in ("sft", "rm", "ppo", "rm_human", "ppo_rlhf"):  # loadable save_pretrained checkpoints
        assert (runs / model_dir / "model.safetensors").is_file(), model_dir
    # the RLHF stages read the human RM, not the AI one
    ppo_rlhf = json.loads((runs / "ppo_rlhf" / "manifest.json").read_text())
    assert ppo_rlhf["config"]["rm_path"].endswith("rm_human")
    rm_human = json.loads((runs / "rm_human" / "manifest.json").read_text())
    assert rm_human["config"]["feedback"] == "human"
    # the labels are finished before the RLHF branch starts: rm_human always scores itself on the AI test split
    assert json.loads((runs / "rm_human" / "metrics.json").read_text())["acc_ai_test"] is not None
    assert "labels" in rm_human["inputs"]

    report = json.loads((runs / "eval" / "eval.json").read_text())
    pairs = {(c["policy"], c["baseline"]) for c in report["comparisons"]}
    assert {("ppo", "sft"), ("ppo_rlhf", "sft"), ("ppo", "ppo_rlhf")} <= pairs
    for c in report["comparisons"]:
        assert 0.0 <= c["ci95"][0] <= c["win_rate"] <= c["ci95"][1] <= 1.0 and c["n"] > 0
    assert (runs / "eval" / "report.md").is_file()
    done = sorted(line.split()[1] for line in log.splitlines() if " done in " in line)
    assert done == [f"{i}/7" for i in range(1, 8)] + ["variant/direct"]  # each stage ran once
    # the d-RLAIF variant: rated by the labeler (no RM), compared with SFT and PPO-RLAIF, in the algorithms table
    direct = json.loads((runs / "direct" / "metrics.json").read_text())
    assert direct["reward"] == "direct" and direct["algo"] == "rloo" and direct["labeler_calls"] > 0
    assert {("direct", "sft"), ("direct", "ppo")} <= pairs
    assert set(report["algorithms"]) == {"ppo", "ppo_rlhf", "direct"}
    assert report["algorithms"]["direct"]["labeler_calls"] == direct["labeler_calls"]
    assert "| direct | rloo | direct |" in (runs / "eval" / "report.md").read_text()

    # the terminal: every stage's end is one line (with its headline numbers, also for the branches that ran side
    # by side into log files), no line over 160 characters, no carriage-return frames in the logs
    ended = [line for line in log.splitlines() if " done in " in line]
    assert any(line.startswith("=== 3/7 RLAIF reward model done in ") and "acc_human_conf8 " in line for line in ended)
    for text in (log, *(p.read_text() for p in (runs / "logs").glob("*.log"))):
        assert "\r" not in text and max(len(line) for line in text.splitlines()) <= 160

    # a rerun finds every stage finished with the same config and redoes no work
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("metrics.json")}
    run_pipeline(tmp_path)
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("metrics.json")} == before

    # SFT retrained with another learning rate: label.py, train_rm.py and train_ppo.py run again (their input
    # changed), each saying so, instead of skipping as "a finished run of this config"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stage = lambda *args: subprocess.run([sys.executable, str(ROOT / args[0]), "--preset", "micro", *args[1:]],  # noqa
                                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert stage("train_sft.py", "--lr", "0.001").returncode == 0
    for script, stage_dir, changed in (("label.py", "labels", "sft_model"), ("train_rm.py", "rm", "sft_model"),
                                       ("train_ppo.py", "ppo", "sft")):
        out = stage(script)
        assert out.returncode == 0, out.stderr[-3000:]
        said = out.stdout.splitlines()[0]  # names every changed input, the retrained SFT among them
        assert said.endswith("changed since; running again") and f"{changed} (runs/micro/sft)" in said, said
        assert "skipping" not in out.stdout
        assert (runs / stage_dir / "metrics.json").stat().st_mtime_ns > before[runs / stage_dir / "metrics.json"]
    # the new labels are the retrained SFT's: their manifest holds its content hash
    assert json.loads((runs / "labels" / "manifest.json").read_text())["inputs"]["sft_model"]["sha256"] == \
        sha256_path(runs / "sft")


def test_hh_micro_pipeline_runs_the_dialogue_task(tmp_path):
    """`bash run_pipeline.sh hh-micro`: every stage on the offline dialogue task (--task hh), HH-schema files, and an
    evaluation with helpfulness win rates and harmless rates (each with its CI) for SFT, RLHF and RLAIF."""
    log = run_pipeline(tmp_path, "hh-micro", algos="")
    runs = tmp_path / "runs" / "hh-micro"
    first = json.loads((runs / "data" / "comparisons" / "train.jsonl").read_text().splitlines()[0])
    assert {"chosen", "rejected"} <= set(first) and first["chosen"].startswith("\n\nHuman:")
    for stage in STAGES:
        manifest = json.loads((runs / stage / "manifest.json").read_text())
        assert manifest["config"]["task"] == "hh", stage
    candidates = [json.loads(line) for line in (runs / "labels" / "candidates.jsonl").read_text().splitlines()]
    assert candidates[0]["query"].endswith("\n\nAssistant:") and candidates[0]["post"].startswith("\n\nHuman:")
    report = json.loads((runs / "eval" / "eval.json").read_text())
    assert report["task"] == "hh"
    assert {("ppo", "sft"), ("ppo_rlhf", "sft"), ("ppo", "ppo_rlhf")} <= {(c["policy"], c["baseline"])
                                                                        for c in report["comparisons"]}
    assert set(report["harmless"]) == {"sft", "ppo", "ppo_rlhf", "reference"}
    for h in report["harmless"].values():
        assert h["n"] > 0 and 0.0 <= h["ci95"][0] <= h["harmless_rate"] <= h["ci95"][1] <= 1.0
    assert "## Harmlessness" in (runs / "eval" / "report.md").read_text()
    assert "=== pipeline finished" in log
