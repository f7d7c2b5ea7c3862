"""train_rm.py and minirlaif/reward.py: the loss against the math core, the reward index, label handling, the
reference offset through a plain transformers load, calibration, padding invariance, resume, both feedback kinds,
and torchrun."""

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, GPT2ForSequenceClassification, GPT2LMHeadModel

import train_rm
from minirlaif import reward, synthetic
from minirlaif.data import load_posts
from minirlaif.losses import bradley_terry_loss
from minirlaif.models import last_index, pad_batch, sequence_rewards, tiny_gpt2_config, train_bpe_tokenizer
from minirlaif.reward import Encoder, Pair, PairRewards
from minirlaif.config import parse_config
from minirlaif.run import Run

ROOT = Path(__file__).resolve().parent.parent
TASK = synthetic.TaskConfig(n_train=200, n_validation=20, n_test=4, n_comparison_posts_train=80,
                            n_comparison_posts_validation=40)


# ----------------------------------------------------------------------------------------------------------------
# fixtures: a synthetic task, a tiny "SFT" model with its BPE tokenizer, and label.py-style AI pairs


def write_ai_pairs(path, data_dir, tok, seed=0):
    """pairs.jsonl like label.py's: two corrupted summaries per comparison post, labeled by a RuleJudge in both
    orders; half the rows carry sampled token ids (some without EOS), two rows are null and one is a tie."""
    rng, style = random.Random(seed), synthetic.TaskConfig()
    judge = synthetic.RuleJudge(temperature=0.2)
    posts, _ = load_posts(data_dir / "comparisons", "train")
    with open(path, "w") as fh:
        for i, p in enumerate(posts):
            a, _ = synthetic.policy_sample(rng, p.facts, style)
            b, _ = synthetic.policy_sample(rng, p.facts, style)
            p_ab, p_ba = judge.prob_first(p, a, b), 1 - judge.prob_first(p, b, a)
            row = {"id": p.id, "query": "", "subreddit": p.subreddit, "title": p.title, "post": p.post,
                   "summary_a": a, "summary_b": b, "tokens_a": None, "tokens_b": None,
                   "p_a_ab": p_ab, "p_a_ba": p_ba, "p_a": (p_ab + p_ba) / 2, "null_reason": None}
            if i % 2:
                row["tokens_a"] = tok(" " + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                row["tokens_b"] = tok(" " + b, add_special_tokens=False)["input_ids"]  # did not stop: no EOS
            if i in (3, 4):
                row.update(p_a=None, p_a_ab=None, null_reason="no_answer" if i == 3 else "parse_error")
            if i == 5:
                row.update(p_a=0.5, p_a_ab=0.5, p_a_ba=0.5)
            fh.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm")
    synthetic.write_task(d / "data", TASK)
    posts, _ = load_posts(d / "data" / "sft", "train")
    tok = train_bpe_tokenizer([f"{p.title}\n{p.post}\n{p.summary}" for p in posts], vocab_size=400)
    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_gpt2_config(tok, n_layer=1, n_head=2, n_embd=32, n_positions=256)).save_pretrained(d / "sft")
    tok.save_pretrained(d / "sft")
    write_ai_pairs(d / "pairs.jsonl", d / "data", tok)
    return d, tok


def micro_args(d, out, *extra):
    return ["--preset", "micro", "--sft-path", str(d / "sft"), "--labels-path", str(d / "pairs.jsonl"),
            "--comparisons", str(d / "data" / "comparisons"), "--reference-dataset", str(d / "data" / "sft"),
            "--out-dir", str(out), "--no-bf16", *extra]


@pytest.fixture(scope="module")
def tiny_rm(env):
    _, tok = env
    torch.manual_seed(1)
    cfg = tiny_gpt2_config(tok, n_layer=2, n_head=2, n_embd=32, n_positions=256)
    cfg.num_labels = 1
    return GPT2ForSequenceClassification(cfg).eval()


def hand_pairs(tok):
    eos = tok.eos_token_id
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [Pair("p1", enc("SUBREDDIT: r/tifu TITLE: my dad POST: he sold my guitar TL;DR:"),
                 enc(" My dad sold my guitar.") + [eos], enc(" My mom.") + [eos], prob_a=0.9),
            Pair("p2", enc("TITLE: help TL;DR:"), enc(" I am 24F.") + [eos],
                 enc(" My boyfriend (25M) of 3 years lied about money.") + [eos], prob_a=0.2),
            Pair("p3", enc("POST: long story TL;DR:"), enc(" Should I leave?") + [eos], enc(" Is this normal?") + [eos],
                 prob_a=0.5),
            Pair("p4", enc("POST: x TL;DR:"), enc(" Yes.") + [eos], enc(" No no no.") + [eos], prob_a=1.0)]


def alone(rm, seq):
    """The reward of one unpadded sequence by a plain transformers forward (pooled at its last token)."""
    with torch.no_grad():
        return rm(input_ids=torch.tensor([seq])).logits[0, 0]


# ----------------------------------------------------------------------------------------------------------------
# the loss and the reward index


def test_soft_and_hard_losses_equal_the_math_core_on_independent_rewards(env, tiny_rm):
    _, tok = env
    pairs = hand_pairs(tok)
    r_a = torch.stack([alone(tiny_rm, p.query + p.a) for p in pairs])
    r_b = torch.stack([alone(tiny_rm, p.query + p.b) for p in pairs])
    prob = torch.tensor([p.prob_a for p in pairs])
    with torch.no_grad():
        soft, got_a, got_b = train_rm.pair_loss(PairRewards(tiny_rm), *reward.pair_batch(pairs, tok.pad_token_id))
    torch.testing.assert_close(torch.stack([got_a, got_b]), torch.stack([r_a, r_b]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(soft, bradley_terry_loss(r_a, r_b, prob), atol=1e-6, rtol=1e-5)
    want = -(prob * torch.sigmoid(r_a - r_b).log() + (1 - prob) * torch.sigmoid(r_b - r_a).log()).mean()
    torch.testing.assert_close(soft, want, atol=1e-6, rtol=1e-5)
    # hard labels: the tie (p3) is excluded, the rest is -log sigmoid(r_chosen - r_rejected)
    hard, stats = reward.training_labels(pairs, "hard")
    assert [p.id for p in hard] == ["p1", "p2", "p4"] and stats["n_label_ties"] == 1
    with torch.no_grad():
        got, _, _ = train_rm.pair_loss(PairRewards(tiny_rm), *reward.pair_batch(hard, tok.pad_token_id))
    keep = [0, 1, 3]
    chosen = torch.where(prob[keep] > 0.5, r_a[keep], r_b[keep])
    rejected = torch.where(prob[keep] > 0.5, r_b[keep], r_a[keep])
    torch.testing.assert_close(got, bradley_terry_loss(chosen, rejected), atol=1e-6, rtol=1e-5)
    # reward centering adds coef * mean((r_a + r_b)^2)
    with torch.no_grad():
        centered, _, _ = train_rm.pair_loss(PairRewards(tiny_rm), *reward.pair_batch(pairs, tok.pad_token_id), 0.1)
    torch.testing.assert_close(centered, soft + 0.1 * ((r_a + r_b) ** 2).mean(), atol=1e-6, rtol=1e-5)


def test_shared_prefix_rewards_and_gradients_equal_separate_sequences(env, tiny_rm):
    """PairRewards encodes each query once: same rewards and same parameter gradients as scoring every
    query + summary as its own padded sequence (queries and summaries of different lengths)."""
    _, tok = env
    pairs = hand_pairs(tok)
    pairs[1].query = pairs[1].query[:-3]  # ragged queries, so a query's padding sits before its summaries
    prob = torch.tensor([p.prob_a for p in pairs])

    def grads_of(loss):
        tiny_rm.zero_grad()
        loss.backward()
        return [q.grad.clone() for q in tiny_rm.parameters()]

    r_a, r_b = PairRewards(tiny_rm)(*reward.pair_batch(pairs, tok.pad_token_id)[:4])
    shared = grads_of(bradley_terry_loss(r_a, r_b, prob))
    ids, mask = pad_batch([p.query + p.a for p in pairs] + [p.query + p.b for p in pairs], tok.pad_token_id)
    want_a, want_b = sequence_rewards(tiny_rm, ids, mask).chunk(2)
    separate = grads_of(bradley_terry_loss(want_a, want_b, prob))
    torch.testing.assert_close(torch.stack([r_a, r_b]), torch.stack([want_a, want_b]), atol=1e-5, rtol=1e-5)
    for got, want in zip(shared, separate):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in shared[:2])  # the embeddings get gradient through the shared cache


def test_reward_is_read_at_the_eos_under_left_and_right_padding(env, tiny_rm):
    _, tok = env
    eos = tok.eos_token_id
    pairs = hand_pairs(tok)
    # an EOS inside the query: the reward must still come from the final EOS, not the first one
    seqs = [p.query + p.a for p in pairs] + [pairs[0].query + [eos] + pairs[0].b]
    want = torch.stack([alone(tiny_rm, s) for s in seqs])
    for side in ("left", "right"):
        ids, mask = pad_batch(seqs, tok.pad_token_id, side=side)
        idx = last_index(mask)
        assert ids[torch.arange(len(seqs)), idx].tolist() == [eos] * len(seqs)
        assert idx.tolist() == ([ids.shape[1] - 1] * len(seqs) if side == "left" else [len(s) - 1 for s in seqs])
        with torch.no_grad():
            torch.testing.assert_close(sequence_rewards(tiny_rm, ids, mask), want, atol=1e-5, rtol=1e-5)


def test_padding_invariance(env, tiny_rm):
    _, tok = env
    seqs = [s for p in hand_pairs(tok) for s in (p.query + p.a, p.query + p.b)]
    assert reward.padding_invariance(tiny_rm, seqs, tok.pad_token_id, "cpu") < 1e-5
    # and through score_sequences (length-sorted batches) the rewards come back in input order
    r = reward.score_sequences(tiny_rm, seqs, tok.pad_token_id, batch_size=3, device="cpu")
    torch.testing.assert_close(r, torch.stack([alone(tiny_rm, s) for s in seqs]), atol=1e-5, rtol=1e-5)


def test_score_pairs_encodes_queries_once_and_keeps_the_input_order(env, tiny_rm):
    _, tok = env
    pairs = hand_pairs(tok)
    pairs = pairs + [dataclasses.replace(p, query=p.query[3:]) for p in pairs]  # other query lengths
    for batch_size in (2, 3, 64):  # one pair per batch, a batch with a leftover sequence, everything at once
        r_a, r_b = reward.score_pairs(tiny_rm, pairs, tok.pad_token_id, batch_size, "cpu")
        torch.testing.assert_close(r_a, torch.stack([alone(tiny_rm, p.query + p.a) for p in pairs]), atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(r_b, torch.stack([alone(tiny_rm, p.query + p.b) for p in pairs]), atol=1e-5,
                                   rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# data: labels, cuts, splits


def test_ai_pairs_skip_nulls_exclude_ties_and_keep_long_pairs(env, tmp_path):
    d, tok = env
    enc = Encoder(tok, max_query_tokens=110, max_summary_tokens=12)  # forces post cuts and summary caps
    pairs, stats = reward.load_ai_pairs(d / "pairs.jsonl", enc)
    n_rows = len((d / "pairs.jsonl").read_text().splitlines())
    assert stats["n_read"] == n_rows and stats["n_null"] == 2 and len(pairs) == n_rows - 2
    assert stats["null_reasons"] == {"no_answer": 1, "parse_error": 1}
    assert enc.n_truncated_queries > 0 and enc.n_capped_summaries > 0  # cut, never dropped
    assert enc.n_eos_appended == (n_rows // 2) - 1  # odd rows store tokens_b without EOS (row 3 is null)
    for p in pairs:
        assert len(p.query) <= 110 and max(len(p.a), len(p.b)) <= 12
        assert p.a[-1] == p.b[-1] == tok.eos_token_id
    hard, hs = reward.training_labels(pairs, "hard")
    n_ties = sum(p.prob_a == 0.5 for p in pairs)  # row 5, and pairs the rule judge scores equal
    assert n_ties >= 1 and hs["n_label_ties"] == n_ties and len(hard) == len(pairs) - n_ties
    assert {p.prob_a for p in hard} == {0.0, 1.0}
    # a pair whose two judge orders disagree is dropped only with drop_inconsistent
    flipped = [Pair("x", [1], [2], [3], prob_a=0.55, p_a_ab=0.9, p_a_ba=0.2)]
    assert reward.training_labels(flipped)[0] and not reward.training_labels(flipped, drop_inconsistent=True)[0]
    # splits group by post id, are seeded, and do not depend on row order
    split = reward.split_by_id(pairs, seed=1, val_frac=0.2, test_frac=0.2)
    ids = {k: {p.id for p in v} for k, v in split.items()}
    assert not (ids["train"] & ids["test"]) and not (ids["validation"] & ids["test"]) and all(ids.values())
    again = reward.split_by_id(pairs[::-1], seed=1, val_frac=0.2, test_frac=0.2)
    assert {p.id for p in again["test"]} == ids["test"]
    # a malformed row is reported with its file and line
    bad = tmp_path / "bad.jsonl"
    bad.write_text((d / "pairs.jsonl").read_text().splitlines()[0] + "\n{\"id\": 1}\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        reward.load_ai_pairs(bad, enc)


def test_calibration_error_by_hand():
    # confidences 0.92, 0.83, 0.74 (the last predicts b) in three bins; the predicted winner is right, wrong, right
    p_pred, label = torch.tensor([0.92, 0.83, 0.26]), torch.tensor([1.0, 0.0, 0.0])
    assert reward.expected_calibration_error(p_pred, label) == pytest.approx((0.08 + 0.83 + 0.26) / 3)
    # calibrated: in the 0.7-0.75 bin, 7 of 10 predicted winners win (any mix of orders)
    p = torch.tensor([0.72, 0.28] * 5)
    lab = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    assert reward.expected_calibration_error(p, lab) == pytest.approx(0.02)
    m = reward.pair_metrics(torch.tensor([1.0, 0.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 2.0, 0.0]),
                            torch.tensor([1.0, 1.0, 0.0, 0.5]))
    assert m["acc"] == pytest.approx((1 + 0 + 0.5) / 3) and m["n"] == 3 and m["n_label_ties"] == 1


# ----------------------------------------------------------------------------------------------------------------
# runs: micro AI run (reference offset via a plain load), resume, human feedback


@pytest.fixture(scope="module")
def ai_run(env, tmp_path_factory):
    d, _ = env
    out = tmp_path_factory.mktemp("ai") / "rm"
    cfg = parse_config(train_rm.Config, train_rm.PRESETS, micro_args(d, out))
    return cfg, train_rm.main(cfg)


def test_micro_ai_run_metrics_and_reference_offset(env, ai_run):
    d, tok = env
    cfg, metrics = ai_run
    out = cfg.out_dir
    for key in ("acc_ai_test", "n_ai_test", "acc_human_conf8", "acc_human_conf8_ci95", "n_human_conf8", "ece",
                "ece_set", "best_step", "padding_invariance_max_abs_diff", "reward_offset", "n_truncated_queries",
                "n_capped_summaries"):
        assert key in metrics, key
    assert metrics["n_ai_test"] > 0 and metrics["n_human_conf8"] > 0 and 0 <= metrics["acc_human_conf8"] <= 1
    assert metrics["counts"]["ai_labels"]["n_null"] == 2
    assert metrics["padding_invariance_max_abs_diff"] < 1e-4
    assert Path(out, "reliability.png").exists()
    # a plain transformers load, scored with our sequence_rewards: the reference summaries average 0
    rm = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert rm.config.reward_offset == pytest.approx(metrics["reward_offset"])
    posts, _ = load_posts(d / "data" / "sft", "train")
    posts = random.Random(cfg.seed).sample(posts, cfg.n_reference)
    enc = Encoder(tok, cfg.max_query_tokens, cfg.max_summary_tokens)
    ids, mask = pad_batch([enc.query(p) + enc.summary(p.summary, post=p) for p in posts], tok.pad_token_id, side="left")
    with torch.no_grad():
        r = sequence_rewards(rm, ids, mask)
    assert abs(r.mean().item()) < 1e-4 and r.std().item() > 0
    assert metrics["reference_reward_mean_after"] == pytest.approx(0.0, abs=1e-4)
    # a rerun of the finished config is skipped
    assert train_rm.main(cfg)["acc_ai_test"] == metrics["acc_ai_test"]


class Stop(Exception):
    pass


def test_stop_after_a_checkpoint_and_resume_matches_an_uninterrupted_run(env, ai_run, tmp_path, monkeypatch):
    d, _ = env
    ref_cfg, ref_metrics = ai_run
    out = tmp_path / "stopped"
    real_save = Run.checkpoint

    def save_then_stop(self, *args, **kw):  # the first complete checkpoint is on disk, then the process "dies"
        real_save(self, *args, **kw)
        if (self.ckpt_dir / "state.pt").exists():
            raise Stop

    monkeypatch.setattr(Run, "checkpoint", save_then_stop)
    cfg = parse_config(train_rm.Config, train_rm.PRESETS, micro_args(d, out))
    with pytest.raises(Stop):
        train_rm.main(cfg)
    assert (out / "checkpoint" / "state.pt").exists() and not (out / "metrics.json").exists()
    monkeypatch.setattr(Run, "checkpoint", real_save)
    resumed = train_rm.main(cfg)
    a, b = load_file(f"{ref_cfg.out_dir}/model.safetensors"), load_file(out / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    rows = lambda p: [json.loads(line) for line in open(p)]  # noqa: E731
    ref_rows, res_rows = rows(f"{ref_cfg.out_dir}/metrics.jsonl"), rows(out / "metrics.jsonl")
    assert [r["step"] for r in res_rows] == [r["step"] for r in ref_rows]
    for r1, r2 in zip(ref_rows, res_rows):
        assert r1["rm/loss"] == pytest.approx(r2["rm/loss"], rel=1e-5)
    for k in ("acc_ai_test", "acc_human_conf8", "ece", "best_step", "reward_offset"):
        assert resumed[k] == pytest.approx(ref_metrics[k], rel=1e-5, abs=1e-6), k


def test_a_non_finite_loss_stops_without_saving_non_finite_weights(env, tmp_path, capsys):
    """lr 1e10: no checkpoint (its model, nor the best model it keeps) ever holds a NaN, and the message says what
    is on disk."""
    d, _ = env
    out = tmp_path / "nan"
    cfg = parse_config(train_rm.Config, train_rm.PRESETS,
                       micro_args(d, out, "--lr", "1e10", "--warmup-steps", "0", "--checkpoint-every", "1",
                                  "--eval-every", "1"))
    with pytest.raises(SystemExit, match="non-finite") as stop:
        train_rm.main(cfg)
    if (out / "checkpoint" / "state.pt").exists():
        saved = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
        for weights in (saved["model"], saved["best"]["model"] or {}):
            assert all(torch.isfinite(v).all() for v in weights.values())
        step = torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"]
        assert f"the checkpoint of step {step} in" in str(stop.value)
    else:
        assert "no checkpoint was saved" in str(stop.value)
    assert not (out / "metrics.json").exists()


def test_human_feedback_run_with_default_out_dir(env, tmp_path, monkeypatch):
    d, _ = env
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(train_rm.Config, train_rm.PRESETS,
                       micro_args(d, "", "--feedback", "human", "--max-steps", "4", "--min-confidence", "2"))
    metrics = train_rm.main(cfg)
    assert (tmp_path / "runs" / "micro" / "rm_human" / "metrics.json").exists()
    assert metrics["feedback"] == "human" and metrics["n_human_test"] >= metrics["n_human_conf8"] > 0
    assert metrics["n_ai_test"] > 0  # the AI test split scores the human RM too
    assert metrics["counts"]["human_train"]["n_dropped_confidence"] > 0
    assert metrics["ece_set"].startswith("human_test")


def test_labels_label_py_is_still_writing_are_refused(env, tmp_path):
    """A pairs.jsonl whose label.py run has not finished (its run.json, no metrics.json) is never read, so an RM's
    numbers cannot depend on how far the labeling got."""
    d, _ = env
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "pairs.jsonl").write_text("".join((d / "pairs.jsonl").read_text().splitlines(keepends=True)[:10]))
    (labels / "run.json").write_text("{}")
    for feedback in ("human", "ai"):
        args = micro_args(d, tmp_path / feedback, "--feedback", feedback, "--labels-path", str(labels / "pairs.jsonl"))
        with pytest.raises(SystemExit, match="labels .*pairs.jsonl is not finished: the run in .*labels started"):
            train_rm.main(parse_config(train_rm.Config, train_rm.PRESETS, args))


def test_two_process_torchrun_matches_one_process(env, ai_run, tmp_path):
    d, _ = env
    ref_cfg, ref_metrics = ai_run
    env_vars = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "train_rm.py", *micro_args(d, tmp_path / "two")], cwd=ROOT, env=env_vars,
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    losses = lambda p: [json.loads(line)["rm/loss"] for line in open(p)]  # noqa: E731
    assert losses(tmp_path / "two" / "metrics.jsonl") == pytest.approx(losses(f"{ref_cfg.out_dir}/metrics.jsonl"),
                                                                       rel=1e-4)
    two_metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for k in ("acc_ai_test", "acc_human_conf8", "best_step"):
        assert two_metrics[k] == pytest.approx(ref_metrics[k], rel=1e-4), k


def test_mix_keeps_all_of_both_or_subsamples_the_larger_source_to_the_human_fraction():
    ai, human = [f"a{i}" for i in range(30)], [f"h{i}" for i in range(50)]
    assert train_rm.mix(ai, human, -1, seed=0) == (ai + human, {"n_ai": 30, "n_human": 50, "n_ai_dropped": 0,
                                                               "n_human_dropped": 0})
    out, c = train_rm.mix(ai, human, 0.25, seed=0)  # 30 AI + 10 human: human is 1/4
    assert out[:30] == ai and c["n_human"] == 10 == len(out) - 30 and set(out[30:]) <= set(human)
    assert out[30:] == sorted(out[30:], key=human.index)  # source order kept
    out, c = train_rm.mix(ai, human, 0.75, seed=0)  # too few human pairs for 3/4: 17 AI (50 / 67 = 0.746) + all 50
    assert c == {"n_ai": 17, "n_human": 50, "n_ai_dropped": 13, "n_human_dropped": 0} and out[17:] == human
    assert train_rm.mix(ai, human, 0.75, seed=0) == (out, c) and train_rm.mix(ai, human, 0.75, seed=1)[0] != out


def test_mixed_feedback_trains_on_both_and_is_scored_on_the_same_test_sets(env, ai_run, tmp_path, monkeypatch):
    d, _ = env
    cfg_ai, ai_metrics = ai_run
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(train_rm.Config, train_rm.PRESETS, micro_args(d, "", "--feedback", "mixed", "--max-steps", "4"))
    metrics = train_rm.main(cfg)
    assert (tmp_path / "runs" / "micro" / "rm_mixed" / "metrics.json").exists()
    assert metrics["feedback"] == "mixed" and metrics["labels"] == "soft (AI) + hard (human choice)"
    # the train pairs: the AI RM's own train pairs, plus the human train comparisons of the posts in the same
    # (post-id hashed) train split; those of AI-test posts are left out
    comps, _ = reward.load_human_pairs(str(d / "data" / "comparisons"), "train", Encoder(env[1], 200, 48))
    where = [reward.split_of(p.id, cfg.seed, cfg.val_frac, cfg.test_frac) for p in comps]
    mixed = metrics["counts"]["mixed_train"]
    assert mixed["n_ai"] == ai_metrics["n_train"] and mixed["n_human"] == where.count("train") > 0
    assert metrics["n_train"] == mixed["n_ai"] + mixed["n_human"]
    assert metrics["counts"]["mixed_human_in_ai_test_posts"] == where.count("test") > 0
    n_val = metrics["counts"]["mixed_validation"]["n_ai"] + where.count("validation")
    assert metrics["n_val"] == min(cfg.n_val, n_val) and where.count("validation") > 0
    # the same held-out sets as the AI RM (and the human RM's own test set)
    for k in ("n_ai_test", "n_human_conf8"):
        assert metrics[k] == ai_metrics[k]
    assert metrics["n_human_test"] >= metrics["n_human_conf8"] > 0 and 0 <= metrics["acc_human_conf8"] <= 1
    with pytest.raises(SystemExit, match="--human-frac"):
        train_rm.main(dataclasses.replace(cfg, human_frac=1.0, out_dir=str(tmp_path / "bad")))
