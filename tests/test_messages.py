"""What a user sees when they get something wrong, run as a user runs the scripts (a subprocess in a fresh
directory): one or two lines naming the flag, the path and the stage that makes what is missing, a nonzero exit,
no traceback; a bad row named by file and line; batch sizes that do not divide named by their flags; Ctrl-C saying
how to resume; run_pipeline.sh --help."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

from minirlaif import synthetic
from minirlaif.data import load_posts
from minirlaif.models import tiny_gpt2_config, train_bpe_tokenizer

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
       "MINIRLAIF_DEBUG": ""}


def run(cwd, script, *args, **kw):
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, **kw)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A task, a causal LM (sft/), a reward model (rm/) and a directory with no model (empty/)."""
    root = tmp_path_factory.mktemp("m")
    synthetic.write_task(root / "data", synthetic.TaskConfig(n_train=60, n_validation=8, n_test=4,
                                                             n_comparison_posts_train=8,
                                                             n_comparison_posts_validation=8))
    posts, _ = load_posts(root / "data" / "sft", "train")
    tok = train_bpe_tokenizer([p.post + " " + p.summary for p in posts], vocab_size=300)
    torch.manual_seed(0)
    cfg = tiny_gpt2_config(tok, n_layer=1, n_head=2, n_embd=16, n_positions=256)
    GPT2LMHeadModel(cfg).save_pretrained(root / "sft")
    tok.save_pretrained(root / "sft")
    cfg.num_labels = 1
    GPT2ForSequenceClassification(cfg).save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    (root / "empty").mkdir()
    return root


def one_line(res, code: int = 1) -> str:
    """The run ended with `code` and wrote exactly one line to stderr, no traceback; returns that line."""
    assert res.returncode == code, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert "Traceback" not in res.stderr and len(lines) == 1, res.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("script,flag,extra", [
    ("train_ppo.py", "--sft-path", []), ("label.py", "--sft-path", []), ("train_rm.py", "--sft-path", []),
    ("train_sft.py", "--model", []), ("train_ppo.py", "--rm-path", ["--sft-path", "SFT"])])
def test_a_missing_or_mistyped_model_path_is_one_line_naming_the_flag_and_the_stage(models, tmp_path, script, flag,
                                                                                     extra):
    extra = [str(models / "sft") if a == "SFT" else a for a in extra]
    if script != "train_rm.py":  # the others write the task first (train_rm.py reads the comparisons it names)
        extra += ["--task-dir", str(models / "data")]
    makes = "train_rm.py writes a reward model" if flag == "--rm-path" else "train_sft.py writes a causal LM"
    res = run(tmp_path, script, "--preset", "micro", *extra, flag, "runs/micro/sftt")
    assert one_line(res) == f"{flag} runs/micro/sftt: no such directory; {makes}: run it first, or give the path " \
                            f"of one"
    # a directory with no model in it (it used to end in "You need to have sentencepiece or tiktoken installed")
    res = run(tmp_path, script, "--preset", "micro", *extra, flag, str(models / "empty"))
    assert f"{flag} {models / 'empty'}: no model there (no config.json)" in one_line(res)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("run.json"))  # no work started


def test_the_first_stage_not_run_yet_is_named(tmp_path):
    """`python train_ppo.py` before SFT has run: the path, and the stage that makes it."""
    res = run(tmp_path, "train_ppo.py", "--preset", "micro")
    assert one_line(res).startswith("--sft-path runs/micro/sft: no such directory; train_sft.py writes a causal LM")


@pytest.mark.parametrize("script", ["label.py", "train_ppo.py"])
def test_the_wrong_kind_of_model_is_refused(models, tmp_path, script):
    data = (["--comparisons", str(models / "data" / "comparisons")] if script == "label.py" else
            ["--dataset", str(models / "data" / "sft"), "--rm-path", str(models / "rm")])
    res = run(tmp_path, script, "--preset", "micro", "--task-dir", "", *data, "--sft-path", str(models / "rm"))
    assert one_line(res) == (f"--sft-path {models / 'rm'}: that is a reward model (GPT2ForSequenceClassification, "
                             f"1 labels), not a causal LM; train_sft.py writes a causal LM: run it first, or give the "
                             f"path of one")
    res = run(tmp_path, "train_ppo.py", "--preset", "micro", "--task-dir", "", "--dataset",
              str(models / "data" / "sft"), "--sft-path", str(models / "sft"), "--rm-path", str(models / "sft"))
    assert "--rm-path" in one_line(res) and "that is a causal LM (GPT2LMHeadModel), not a reward model" in res.stderr


def test_a_bad_row_is_one_line_naming_file_and_line(models, tmp_path):
    bad = tmp_path / "comparisons"
    shutil.copytree(models / "data" / "comparisons", bad)
    lines = (bad / "train.jsonl").read_text().splitlines(keepends=True)
    (bad / "train.jsonl").write_text("".join(lines[:2]) + "{not json\n" + "".join(lines[2:]))
    res = run(tmp_path, "label.py", "--preset", "micro", "--task-dir", "", "--comparisons", str(bad),
              "--sft-path", str(models / "sft"))
    assert one_line(res).startswith(f"label.py: {bad / 'train.jsonl'}:3: ")


@pytest.mark.parametrize("script,args,message", [
    ("train_sft.py", ["--batch-size", "7", "--micro-batch-size", "4"],
     "--batch-size 7 must be a multiple of --micro-batch-size 4 times the 1 rank(s)"),
    ("train_ppo.py", ["--batch-size", "16", "--micro-batch-size", "5", "--sft-path", "SFT", "--rm-path", "RM"],
     "each rank's batch (16 of --batch-size 16) must split into --mini-batches 1 of whole --micro-batch-size 5 "
     "micro-batches"),
    ("train_ppo.py", ["--algo", "rloo", "--samples-per-query", "3", "--sft-path", "SFT", "--rm-path", "RM"],
     "--batch-size 16 must split into whole groups of --samples-per-query 3 on each of the 1 rank(s)"),
])
def test_batch_sizes_that_do_not_divide_are_one_line_naming_the_flags(models, tmp_path, script, args, message):
    args = [str(models / "sft") if a == "SFT" else str(models / "rm") if a == "RM" else a for a in args]
    res = run(tmp_path, script, "--preset", "micro", "--task-dir", "", "--dataset", str(models / "data" / "sft"),
              *args)
    assert one_line(res) == message


def test_ctrl_c_says_where_it_stopped_and_that_the_same_command_resumes(models, tmp_path):
    args = ["--preset", "micro", "--task-dir", "", "--dataset", str(models / "data" / "sft"), "--max-steps", "400",
            "--log-every", "1", "--checkpoint-every", "2", "--out-dir", str(tmp_path / "sft")]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_sft.py"), *args], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "sft" / "checkpoint" / "state.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted at step ") and line.endswith(" of 400; rerun the same command to resume")
    again = run(tmp_path, "train_sft.py", *args, "--max-steps", "400", timeout=600)
    assert again.returncode == 0 and "sft: resumed from" in again.stdout


def test_debug_shows_the_traceback(tmp_path):
    res = run(tmp_path, "train_ppo.py", "--preset", "micro", "--debug")
    assert res.returncode == 1 and "Traceback" in res.stderr and "UserError: --sft-path runs/micro/sft" in res.stderr


def test_run_pipeline_help_prints_its_usage_and_runs_nothing(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "run_pipeline.sh"), "--help"], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr == ""
    assert res.stdout.startswith("The whole pipeline in one command") and "SEEDS=" in res.stdout
    assert list(tmp_path.iterdir()) == []


def test_the_evaluation_names_untrained_variants_once(models, tmp_path):
    runs = tmp_path / "runs"
    (runs / "sft").mkdir(parents=True)
    for f in (models / "sft").iterdir():
        shutil.copy(f, runs / "sft" / f.name)
    res = run(tmp_path, "evaluate.py", "--preset", "micro", "--task-dir", "", "--runs-dir", str(runs), "--dataset",
              str(models / "data" / "sft"), "--comparisons", str(models / "data" / "comparisons"), "--n", "4")
    assert res.returncode == 0, res.stderr[-3000:]
    printed = [line for line in res.stdout.splitlines() if "not trained" in line]
    assert printed == [f"policy: not trained in {runs}, left out: ppo, ppo_rlhf, reinforce, rloo, grpo, reinforce++, "
                       f"dr-grpo, direct", f"rm: not trained in {runs}, left out: rm, rm_human"]
    report = json.loads((tmp_path / "runs" / "micro" / "eval" / "eval.json").read_text())
    assert report["comparisons"][0]["policy"] == "sft"
    assert "**A smoke run, not a result.**" in (tmp_path / "runs" / "micro" / "eval" / "report.md").read_text()
