"""train_sft.py: the completion-only loss, a micro run, kill-and-resume, DDP equivalence, the gpt2-large path."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

import train_sft
from minirlaif import synthetic
from minirlaif.data import DataError
from minirlaif.models import tiny_gpt2_config, train_bpe_tokenizer
from minirlaif.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A small synthetic task shared by this module's runs."""
    d = tmp_path_factory.mktemp("task")
    synthetic.write_task(d, synthetic.TaskConfig(n_train=600, n_validation=40, n_test=10,
                                                 n_comparison_posts_train=4, n_comparison_posts_validation=4))
    return d


def micro_args(task, out, *extra):
    return ["--preset", "micro", "--task-dir", "", "--dataset", str(task / "sft"), "--out-dir", str(out), *extra]


def test_completion_loss_equals_brute_force():
    tok = train_bpe_tokenizer(["the cat sat on the mat", "a dog ran far away"] * 20, vocab_size=120)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config(tok, 2, 2, 32, 64)).eval()
    batch = [(tok("the cat")["input_ids"], tok(" sat on")["input_ids"] + [tok.eos_token_id]),
             (tok("a dog ran far")["input_ids"], tok(" away")["input_ids"] + [tok.eos_token_id]),
             (tok("the")["input_ids"], tok(" mat the cat")["input_ids"] + [tok.eos_token_id])]
    ids, mask, loss_mask = train_sft.collate(batch, tok.pad_token_id)
    got = train_sft.completion_loss_sum(model, ids, mask, loss_mask)
    want = 0.0
    for q, c in batch:  # one unpadded sequence at a time, one completion token at a time
        seq = torch.tensor([q + c])
        logp = torch.log_softmax(model(seq).logits[0], -1)
        for t in range(len(q), len(q) + len(c)):
            want -= logp[t - 1, seq[0, t]].item()
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert loss_mask.sum().item() == sum(len(c) for _, c in batch)


def test_micro_run_saves_a_loadable_model(task, tmp_path):
    cfg = parse_config(train_sft.Config, train_sft.PRESETS, micro_args(task, tmp_path / "sft"))
    metrics = train_sft.main(cfg)
    for key in ("val_loss", "judge_score_sft_greedy", "judge_score_reference", "judge_score_gold",
                "judge_score_random", "n_truncated_queries"):
        assert key in metrics
    assert metrics["judge_score_gold"] == 1.0
    manifest = json.loads((tmp_path / "sft" / "manifest.json").read_text())
    assert manifest["config"]["preset"] == "micro" and manifest["inputs"]["dataset"]["sha256"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    tok = AutoTokenizer.from_pretrained(tmp_path / "sft")
    assert tok.pad_token == "[PAD]" and tok.pad_token_id != tok.eos_token_id
    out = model.generate(**tok("TL;DR:", return_tensors="pt"), max_new_tokens=3, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert out.shape[1] >= 3
    assert not (tmp_path / "sft" / "checkpoint" / "state.pt").exists()
    # a rerun of a finished config is skipped and returns the same metrics
    assert train_sft.main(cfg)["val_loss"] == metrics["val_loss"]


def run(args, **kw):
    return subprocess.run([sys.executable, "train_sft.py", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, **kw)


def test_kill_and_resume_ends_where_an_uninterrupted_run_ends(task, tmp_path):
    args = ["--checkpoint-every", "4", "--n-judge", "0"]
    ref = run(micro_args(task, tmp_path / "ref", *args))
    assert ref.returncode == 0, ref.stderr
    # start, SIGKILL as soon as the first checkpoint is on disk, then rerun the same command
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train_sft.py", *micro_args(task, out, *args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint" / "state.pt").exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
    resumed = run(micro_args(task, out, *args))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    rows = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    ref_rows, res_rows = rows(tmp_path / "ref"), rows(out)
    assert [r["step"] for r in res_rows] == [r["step"] for r in ref_rows]  # no step lost or logged twice
    for r1, r2 in zip(ref_rows, res_rows):
        assert r1["sft/loss"] == pytest.approx(r2["sft/loss"], rel=1e-5)


def test_a_non_finite_loss_stops_without_saving_non_finite_weights(task, tmp_path):
    """lr 1e10 blows the weights up: no checkpoint with a NaN is ever written, and the message says what is on disk."""
    out = tmp_path / "nan"
    res = run(micro_args(task, out, "--lr", "1e10", "--checkpoint-every", "1", "--warmup-steps", "0", "--n-judge",
                         "0"))
    assert res.returncode != 0 and "non-finite" in res.stderr, res.stderr[-2000:]
    state = out / "checkpoint" / "state.pt"
    if state.exists():
        saved = torch.load(state, weights_only=True)
        assert all(torch.isfinite(v).all() for v in saved["model"].values())
        assert f"the checkpoint of step {saved['step']} in" in res.stderr
    else:
        assert "no checkpoint was saved" in res.stderr
    assert not (out / "model.safetensors").exists()


def test_two_process_torchrun_matches_one_process(task, tmp_path):
    args = ["--n-judge", "0", "--max-steps", "6", "--log-every", "1", "--batch-size", "16",
            "--micro-batch-size", "4"]
    one = run(micro_args(task, tmp_path / "one", *args))
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "train_sft.py", *micro_args(task, tmp_path / "two", *args)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    losses = lambda d: [json.loads(line)["sft/loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(l1) == len(l2) == 6
    assert l1 == pytest.approx(l2, rel=1e-4)
    assert l1[-1] < l1[0]  # and it learns


def gpt2_like_tokenizer(texts):
    """A byte-level BPE with <|endoftext|> only: no pad token, as GPT-2's tokenizer on the hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer, t.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def test_gpt2_large_code_path_with_a_tiny_stand_in(task, tmp_path):
    """The hub path: a GPT-2 tokenizer without a pad token gets [PAD], embeddings are resized."""
    hub = tmp_path / "fake-gpt2-large"
    posts = [json.loads(line) for line in (task / "sft" / "train.jsonl").read_text().splitlines()]
    tok = gpt2_like_tokenizer([p["post"] + p["summary"] for p in posts])
    tok.save_pretrained(hub)
    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_gpt2_config(tok, 1, 2, 32, 256)).save_pretrained(hub)
    n_vocab = len(tok)
    args = ["--preset", "gpt2-large", "--model", str(hub), "--dataset", str(task / "sft"), "--out-dir",
            str(tmp_path / "sft"), "--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "2",
            "--max-query-tokens", "200", "--n-val", "4", "--eval-every", "1", "--no-bf16"]
    metrics = train_sft.main(parse_config(train_sft.Config, train_sft.PRESETS, args))
    assert metrics["steps"] == 2 and metrics["val_loss"] > 0
    saved_tok = AutoTokenizer.from_pretrained(tmp_path / "sft")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    assert saved_tok.pad_token == "[PAD]" and len(saved_tok) == n_vocab + 1
    assert model.get_input_embeddings().weight.shape[0] >= n_vocab + 1


def test_bad_dataset_line_is_reported_with_file_and_line(task, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    lines = (task / "sft" / "train.jsonl").read_text().splitlines()
    (bad / "train.jsonl").write_text("\n".join(lines[:3] + ["{not json"] + lines[3:10]) + "\n")
    (bad / "validation.jsonl").write_text("\n".join(lines[:4]) + "\n")
    cfg = parse_config(train_sft.Config, train_sft.PRESETS,
                       ["--preset", "micro", "--task-dir", "", "--dataset", str(bad), "--out-dir", str(tmp_path / "o")])
    with pytest.raises(DataError, match=r"train\.jsonl:4"):
        train_sft.main(cfg)
