"""train_ppo.py: rollout log-probs, score placement, EOS penalty, ratio-1 losses, masking, resume, torchrun."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import make_eos_likely
import torch
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

import train_ppo
from minirlaif import judges, labelers, losses, synthetic
from minirlaif.data import build_query, load_posts
from minirlaif.generation import HFRollout, row_seeds
from minirlaif.models import (pad_batch, response_logits, sequence_rewards, set_attention, tiny_gpt2_config,
                              train_bpe_tokenizer)
from minirlaif.config import parse_config
from minirlaif import run as run_module
from minirlaif.reward import LabelerReward, RMReward
from minirlaif.run import Dist, Run
from minirlaif.utils import batch_indices

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small task, a random tiny policy (sft/) and a reward model from it (rm/), saved like the real stages."""
    root = tmp_path_factory.mktemp("ppo")
    synthetic.write_task(root / "data", synthetic.TaskConfig(n_train=200, n_validation=10, n_test=10,
                                                             n_comparison_posts_train=4,
                                                             n_comparison_posts_validation=4))
    posts, _ = load_posts(root / "data" / "sft", "train")
    tok = train_bpe_tokenizer([p.post + " " + p.summary for p in posts], vocab_size=400)
    torch.manual_seed(0)
    cfg = tiny_gpt2_config(tok, n_layer=2, n_head=2, n_embd=32, n_positions=256)
    policy = make_eos_likely(GPT2LMHeadModel(cfg), tok.eos_token_id)  # some responses end, some do not
    policy.save_pretrained(root / "sft")
    tok.save_pretrained(root / "sft")
    cfg.num_labels = 1
    rm = GPT2ForSequenceClassification(cfg)
    rm.transformer.load_state_dict(policy.transformer.state_dict())
    rm.save_pretrained(root / "rm")
    return {"root": root, "tok": tok, "posts": posts}


def ppo_args(setup, out, *extra):
    r = setup["root"]
    return ["--preset", "micro", "--task-dir", "", "--dataset", str(r / "data" / "sft"), "--sft-path", str(r / "sft"),
            "--rm-path", str(r / "rm"), "--out-dir", str(out), *extra]


def load_models(setup, cfg):
    from minirlaif.models import load_causal_lm, load_scalar_model

    tok = setup["tok"]
    policy = load_causal_lm(cfg.sft_path).eval()
    ref = load_causal_lm(cfg.sft_path).eval()
    value = load_scalar_model(cfg.rm_path, pad_token_id=tok.pad_token_id).eval()
    rm = load_scalar_model(cfg.rm_path, pad_token_id=tok.pad_token_id).eval()
    return policy, ref, value, rm


@pytest.fixture(scope="module")
def batch(setup, tmp_path_factory):
    cfg = parse_config(train_ppo.Config, train_ppo.PRESETS,
                       ppo_args(setup, tmp_path_factory.mktemp("o"), "--response-length", "12"))
    tok = setup["tok"]
    models = load_models(setup, cfg)
    queries = [build_query(tok, p, cfg.max_query_tokens)[1] for p in setup["posts"][:12]]
    policy, ref, value, rm = models
    b = train_ppo.rollout(policy, ref, value, RMReward(rm, tok), queries, row_seeds(5, n=12), tok, cfg,
                          torch.device("cpu"), setup["posts"][:12], HFRollout())
    return {"cfg": cfg, "models": models, "batch": b, "queries": queries}


def test_rollout_logprobs_equal_a_fresh_forward_pass(batch):
    b, cfg = batch["batch"], batch["cfg"]
    policy, ref, value, rm = batch["models"]
    ids, mask = torch.cat([b["query"], b["response"]], 1), torch.cat([b["query_mask"], b["response_mask"]], 1)
    R = b["response"].shape[1]
    with torch.no_grad():
        fresh = losses.logprobs_from_logits(response_logits(policy, ids, mask, R), b["response"], cfg.temperature)
        ref_fresh = losses.logprobs_from_logits(response_logits(ref, ids, mask, R), b["response"], cfg.temperature)
    m = b["response_mask"].bool()
    torch.testing.assert_close(b["logprobs"][m], fresh[m], atol=1e-5, rtol=1e-5)
    # the reference is the same network, so at the start old and reference log-probs agree (KL 0)
    torch.testing.assert_close(b["ref_logprobs"][m], ref_fresh[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b["logprobs"][m], b["ref_logprobs"][m], atol=1e-5, rtol=1e-5)
    assert (b["logprobs"][~m] == 0).all()


def test_scores_and_missing_eos_penalty(batch, setup):
    """The RM score is read on the truncated query + response; exactly the EOS-less rows are penalised."""
    b, cfg, tok = batch["batch"], batch["cfg"], setup["tok"]
    rm = batch["models"][3]
    assert 0 < b["has_eos"].sum() < len(b["has_eos"]), "want both kinds of responses in the fixture"
    for i in range(len(batch["queries"])):
        resp = b["response"][i][b["response_mask"][i].bool()].tolist()
        ends = tok.eos_token_id in resp
        assert bool(b["has_eos"][i]) == ends and (not ends or resp[-1] == tok.eos_token_id)
        ids, mask = pad_batch([batch["queries"][i] + resp], tok.pad_token_id)  # alone, unpadded
        with torch.no_grad():
            alone = sequence_rewards(rm, ids, mask).item()
        assert b["raw_scores"][i].item() == pytest.approx(alone, abs=1e-5)
        assert b["scores"][i].item() == pytest.approx(alone - (0.0 if ends else cfg.missing_eos_penalty), abs=1e-5)


def test_score_lands_on_the_last_valid_token():
    cfg = train_ppo.Config(kl_coef=0.1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, -1.0, -1.0], [-3.0, 0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 9.0], [-1.0, -2.0, -1.0, -1.0], [-2.0, 9.0, 9.0, 9.0]])
    batch = {"response_mask": mask, "logprobs": logprobs, "ref_logprobs": ref, "scores": torch.tensor([1.0, 2.0, 3.0]),
             "values": torch.zeros(3, 4)}
    out = train_ppo.kl_rewards_and_advantages(batch, 0.1, 1, cfg, Dist())
    kl = (logprobs - ref) * mask
    expected = -0.1 * kl
    expected[0, 2] += 1.0  # EOS at index 2
    expected[1, 3] += 2.0  # no EOS: the last token
    expected[2, 0] += 3.0  # EOS first
    torch.testing.assert_close(out["rewards"], expected)
    # GAE and whitening are the math core's
    adv, ret = losses.gae(expected, batch["values"], mask, cfg.gamma, cfg.lam)
    torch.testing.assert_close(out["returns"], ret)
    torch.testing.assert_close(out["advantages"], losses.masked_whiten(adv, mask))


def micro_batch(batch):
    b = train_ppo.kl_rewards_and_advantages(batch["batch"], 0.05, 1, batch["cfg"], Dist())
    return train_ppo.trim({k: b[k][:6].clone() for k in train_ppo.UPDATE_KEYS})


def test_update_at_ratio_one_reproduces_the_math_core(batch):
    """With old = current log-probs and values, the policy loss is -mean(A) and the value loss 0.5 mean (V-R)^2."""
    cfg = batch["cfg"]
    policy, _, value, _ = batch["models"]
    mb = micro_batch(batch)
    m = mb["response_mask"]
    cpu = torch.device("cpu")
    (pg_loss, pg_stats, _), (vf_loss, vf_stats, _) = (train_ppo.policy_loss(policy, mb, m.sum().float(), cfg, cpu),
                                                      train_ppo.value_loss(value, mb, m.sum().float(), cfg, cpu))
    stats = {**pg_stats, **vf_stats}
    loss = pg_loss + cfg.vf_coef * vf_loss
    A, V, R = mb["advantages"], mb["values"], mb["returns"]
    pg = -(A * m).sum() / m.sum()
    vf = 0.5 * (((V - R) ** 2) * m).sum() / m.sum()
    assert stats["ppo/policy_loss"].item() == pytest.approx(pg.item(), abs=1e-5)
    assert stats["ppo/value_loss"].item() == pytest.approx(vf.item(), abs=1e-5)
    assert stats["ppo/clipfrac"].item() == 0 and stats["ppo/approx_kl"].item() == pytest.approx(0, abs=1e-10)
    assert loss.item() == pytest.approx(pg.item() + cfg.vf_coef * vf.item(), abs=1e-5)
    # and its gradient is the policy gradient -A * grad logp (token mean) plus the value term
    policy.zero_grad()
    loss.backward()
    got = policy.transformer.wte.weight.grad.clone()
    policy.zero_grad()
    ids = torch.cat([mb["query"], mb["response"]], 1)
    mask = torch.cat([mb["query_mask"], m], 1)
    logp = losses.logprobs_from_logits(response_logits(policy, ids, mask, m.shape[1]), mb["response"], cfg.temperature)
    (-(A * logp * m).sum() / m.sum()).backward()
    torch.testing.assert_close(got, policy.transformer.wte.weight.grad, atol=1e-6, rtol=1e-4)
    policy.zero_grad()
    value.zero_grad()


def test_padding_tokens_get_no_gradient(batch):
    """Garbage in masked (padding) positions changes no gradient."""
    cfg = batch["cfg"]
    policy, _, value, _ = batch["models"]

    def grads(mb):
        policy.zero_grad()
        value.zero_grad()
        n, cpu = mb["response_mask"].sum().float(), torch.device("cpu")
        train_ppo.policy_loss(policy, mb, n, cfg, cpu)[0].backward()
        train_ppo.value_loss(value, mb, n, cfg, cpu)[0].backward()
        return [p.grad.clone() for p in [*policy.parameters(), *value.parameters()] if p.grad is not None]

    mb = micro_batch(batch)
    assert (mb["response_mask"] == 0).any()
    clean = grads(mb)
    dirty = {k: v.clone() for k, v in mb.items()}
    pad = dirty["response_mask"] == 0
    g = torch.Generator().manual_seed(0)
    dirty["response"][pad] = torch.randint(0, 300, (int(pad.sum()),), generator=g)
    for k in ("logprobs", "values", "advantages", "returns"):
        dirty[k][pad] = torch.randn(int(pad.sum()), generator=g) * 1e3
    for a, b in zip(clean, grads(dirty)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    policy.zero_grad()
    value.zero_grad()


def run(args):
    return subprocess.run([sys.executable, "train_ppo.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True)


def metric_rows(d):
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(rows_a, rows_b, rel=1e-4, skip=()):
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        for k in ra:
            if not k.startswith(("time/", "eps", *skip)):
                assert ra[k] == pytest.approx(rb[k], rel=rel, abs=1e-6), (ra["step"], k)


def test_micro_run_learns_nothing_silly_and_saves(setup, tmp_path):
    out = tmp_path / "ppo"
    metrics = train_ppo.main(parse_config(train_ppo.Config, train_ppo.PRESETS, ppo_args(setup, out)))
    assert metrics["updates"] == 3
    assert (metrics["n_queries"], metrics["n_skipped_empty"]) == (len(setup["posts"]), 0)
    rows = metric_rows(out)
    for key in ("objective/scores", "objective/kl", "objective/entropy", "objective/rlhf_reward", "ppo/policy_loss",
                "ppo/clipfrac", "ppo/approx_kl", "ppo/value_loss", "val/clipfrac", "val/explained_variance",
                "rollout/eos_rate", "rollout/response_len", "time/rollout_s", "time/update_s", "eps"):
        assert all(key in r for r in rows), key
    assert rows[0]["objective/kl"] == pytest.approx(0, abs=1e-5)  # the first batch is sampled from the reference
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["update"] for s in samples} == {1, 2, 3} and all("reference_score" in s for s in samples)
    assert (out / "model.safetensors").exists() and (out / "manifest.json").exists()


def test_empty_posts_are_skipped_and_counted(setup, tmp_path):
    """A query dataset with empty (whitespace-only) posts: they are left out of the queries and counted."""
    data = tmp_path / "data"
    shutil.copytree(setup["root"] / "data" / "sft", data)
    rows = (data / "train.jsonl").read_text().splitlines()
    empty = [json.dumps({**json.loads(rows[i]), "id": f"empty-{i}", "post": " \n "}) for i in range(2)]
    (data / "train.jsonl").write_text("\n".join(rows + empty) + "\n")
    args = ppo_args(setup, tmp_path / "o", "--total-episodes", "16")
    args[args.index("--dataset") + 1] = str(data)
    metrics = train_ppo.main(parse_config(train_ppo.Config, train_ppo.PRESETS, args))
    assert (metrics["n_queries"], metrics["n_skipped_empty"]) == (len(setup["posts"]), 2)


def test_a_causal_lm_given_as_the_reward_model_is_refused(setup, tmp_path):
    """A causal LM as --rm-path is refused; as --value-path it is allowed (a value model may start from SFT, as in
    the paper; tests/test_architectures.py runs that, and test_two_process_torchrun_update_matches_one_process
    checks that every rank draws the same new head)."""
    with pytest.raises(SystemExit, match="--rm-path .*not a reward model"):
        train_ppo.main(parse_config(train_ppo.Config, train_ppo.PRESETS,
                                    ppo_args(setup, tmp_path / "o", "--rm-path", str(setup["root"] / "sft"))))
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_bf16_on_cpu_runs_and_stays_close_to_fp32(setup, tmp_path, monkeypatch):
    """`--bf16` on CPU (autocast, eager attention) trains, and its first update is fp32's to bf16 accuracy."""
    attention = []  # the attention each of train_ppo's models ends up with
    def recorded(model, device, bf16):
        attention.append(set_attention(model, device, bf16).config._attn_implementation)
        return model

    monkeypatch.setattr(train_ppo, "set_attention", recorded)
    rows = {}
    for name, extra in (("fp32", ()), ("bf16", ("--bf16",))):
        metrics = train_ppo.main(parse_config(train_ppo.Config, train_ppo.PRESETS,
                                              ppo_args(setup, tmp_path / name, "--total-episodes", "32", *extra)))
        assert metrics["updates"] == 2
        rows[name] = metric_rows(tmp_path / name)
    manifest = json.loads((tmp_path / "bf16" / "manifest.json").read_text())
    assert manifest["config"]["bf16"] is True
    assert attention == ["sdpa"] * 4 + ["eager"] * 4  # policy, reference, value and reward model of each run
    assert all(torch.isfinite(torch.tensor(v)) for r in rows["bf16"] for v in r.values())
    fp32, bf16 = rows["fp32"][0], rows["bf16"][0]
    # the same seeds sample the same first batch; bf16 moves the numbers by its rounding only (about 1e-3 here)
    assert bf16["objective/entropy"] != fp32["objective/entropy"]  # autocast really ran
    for k in ("objective/entropy", "objective/scores", "ppo/policy_loss", "ppo/approx_kl", "ppo/value_loss"):
        assert bf16[k] == pytest.approx(fp32[k], rel=0.02), k
    assert bf16["rollout/response_len"] == fp32["rollout/response_len"]
    assert bf16["objective/kl"] == pytest.approx(0, abs=1e-3)


ALGO_ARGS = {"ppo": [], "reinforce": ["--algo", "reinforce"], "rloo": ["--algo", "rloo"],
             "grpo": ["--algo", "grpo", "--samples-per-query", "2"], "reinforce++": ["--algo", "reinforce++"],
             "dr-grpo": ["--algo", "dr-grpo"],
             "d-rlaif": ["--reward", "direct", "--algo", "rloo"]}


@pytest.mark.parametrize("algo", ALGO_ARGS)
def test_kill_and_resume_reproduces_the_uninterrupted_metrics(setup, tmp_path, algo):
    args = ["--total-episodes", "64", *ALGO_ARGS[algo]]
    ref = run(ppo_args(setup, tmp_path / "ref", *args))
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train_ppo.py", *ppo_args(setup, out, *args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint" / "state.pt").exists() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
    resumed = run(ppo_args(setup, out, *args))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_same_metrics(metric_rows(tmp_path / "ref"), metric_rows(out))
    samples = [json.loads(line)["update"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples == sorted(samples) and len(samples) == len(set(samples)) * 2  # n_samples=2 per update, once
    # metrics.json's first / last numbers cover every update, not only the resumed process's
    final = {d: json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "ref", out)}
    assert final[out]["updates_this_run"] < final[out]["updates"]
    summary = [k for k in final[out] if k.endswith(("_first", "_last")) and not k.startswith("eps")]
    assert len(summary) == 10
    for k in summary:
        assert final[out][k] == pytest.approx(final[tmp_path / "ref"][k], rel=1e-4, abs=1e-6), k
    assert final[out]["objective/kl_first"] == pytest.approx(0, abs=1e-5)  # update 1: sampled from the reference


@pytest.mark.parametrize("algo", [*ALGO_ARGS, "ppo-value-from-sft"])
def test_two_process_torchrun_update_matches_one_process(setup, tmp_path, algo):
    """Every estimator. With --value-path sft the value model gets a new head: every rank must draw the same one
    (seeded by --seed, not by the rank's seed + rank), or the ranks would train different value models."""
    args = ["--total-episodes", "32", "--batch-size", "16", "--micro-batch-size", "4"]
    if algo == "ppo-value-from-sft":
        args += ["--value-path", str(setup["root"] / "sft")]
    else:
        args += ALGO_ARGS[algo]
    one = run(ppo_args(setup, tmp_path / "one", *args))
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "train_ppo.py", *ppo_args(setup, tmp_path / "two", *args)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    # each rank caches its own ratings, so the labeler's call count may differ (a response rated on both ranks)
    assert_same_metrics(metric_rows(tmp_path / "one"), metric_rows(tmp_path / "two"), rel=1e-3, skip=("labeler/",))


# ----------------------------------------------------------------------------------------------------------------
# the estimator switch (--algo) and the optional value model


@pytest.mark.parametrize("k,world", [(1, 1), (1, 2), (4, 1), (4, 2), (2, 4)])
def test_episode_layout_keeps_groups_on_one_rank_and_seeds_per_row(k, world):
    """Each query's k samples are consecutive rows of one rank; over the ranks, the rows (query, seed) are the
    one-process batch's; k = 1 is the strided split of the batch that the seeds and data order always had."""
    cfg = train_ppo.Config(batch_size=16, seed=3)
    one_q, one_s = train_ppo.episode_layout(5, 100, k, cfg, Dist())
    assert one_s == row_seeds(3, 5, n=16) and len(one_q) == 16
    assert one_q == [q for q in batch_indices(5, 100, 16 // k, 3) for _ in range(k)]
    rows = []
    for rank in range(world):
        q, sd = train_ppo.episode_layout(5, 100, k, cfg, Dist(rank=rank, world_size=world))
        assert len(q) == 16 // world
        for start in range(0, len(q), k):  # whole groups: one query, k different seeds
            assert len(set(q[start: start + k])) == 1 and len(set(sd[start: start + k])) == k
        rows += list(zip(q, sd))
    assert sorted(rows) == sorted(zip(one_q, one_s))
    if k == 1 and world == 2:
        q, sd = train_ppo.episode_layout(5, 100, 1, cfg, Dist(rank=1, world_size=2))
        assert q == batch_indices(5, 100, 16, 3)[1::2] and sd == row_seeds(3, 5, n=16)[1::2]


@pytest.mark.parametrize("algo", train_ppo.ESTIMATORS)
def test_the_estimator_is_the_math_cores(algo):
    """kl_rewards_and_advantages hands the KL-shaped rewards to exactly the --algo estimator, then whitens (all but
    Dr. GRPO, whose point is to divide by no std)."""
    cfg = train_ppo.Config(algo=algo, kl_coef=0.1)
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(5)[None] < torch.tensor([5, 3, 1, 4])[:, None]).long()
    batch = {"response_mask": mask, "logprobs": torch.randn(4, 5, generator=g) * mask,
             "ref_logprobs": torch.randn(4, 5, generator=g) * mask, "scores": torch.tensor([1.0, -2.0, 0.5, 3.0])}
    if train_ppo.ESTIMATORS[algo].value_model:
        batch["values"] = torch.randn(4, 5, generator=g) * mask
    out = train_ppo.kl_rewards_and_advantages(batch, 0.1, 2, cfg, Dist())
    r = out["rewards"]
    ref = {"ppo": lambda: losses.gae(r, batch["values"], mask, cfg.gamma, cfg.lam),
           "reinforce": lambda: losses.reinforce_advantages(r, batch["values"], mask),
           "rloo": lambda: (losses.rloo_advantages(r, mask, 2), None),
           "grpo": lambda: (losses.grpo_advantages(r, mask, 2), None),
           "reinforce++": lambda: (losses.reward_to_go(r, mask, cfg.gamma), None),
           "dr-grpo": lambda: (losses.dr_grpo_advantages(r, mask, 2), None)}[algo]
    adv, ret = ref()
    torch.testing.assert_close(out["advantages"], adv if algo == "dr-grpo" else losses.masked_whiten(adv, mask))
    assert ("returns" in out) == (ret is not None)
    if ret is not None:
        torch.testing.assert_close(out["returns"], ret)


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_value_free_run_loads_trains_and_saves_no_value_model(setup, tmp_path, monkeypatch, algo):
    """Checked, not assumed: the scalar-model loader is called for the RM only, only the policy gets an
    optimizer, and every checkpoint holds the policy and its optimizer only."""
    loaded, checkpoints, optimized = [], [], []
    real_load, real_save, real_adamw = train_ppo.load_scalar_model, Run.checkpoint, torch.optim.AdamW
    monkeypatch.setattr(train_ppo, "load_scalar_model", lambda path, **kw: loaded.append(path) or real_load(path, **kw))

    def checkpoint(self, step, **kw):  # what each saved checkpoint holds
        real_save(self, step, **kw)
        if (self.ckpt_dir / "state.pt").exists() and torch.load(self.ckpt_dir / "state.pt")["step"] == step:
            checkpoints.append(torch.load(self.ckpt_dir / "state.pt"))

    monkeypatch.setattr(Run, "checkpoint", checkpoint)

    def adamw(params, **kw):
        params = list(params)
        optimized.append(sum(p.numel() for p in params))
        return real_adamw(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    cfg = parse_config(train_ppo.Config, train_ppo.PRESETS, ppo_args(setup, tmp_path / algo, "--algo", algo))
    metrics = train_ppo.main(cfg)
    assert metrics["updates"] == 3 and metrics["algo"] == algo
    assert loaded == [cfg.rm_path]  # the reward model, nothing else
    policy_params = sum(p.numel() for p in train_ppo.load_causal_lm(cfg.sft_path).parameters())
    assert optimized == [policy_params]
    assert len(checkpoints) == 2 and all(set(c) == {"policy", "policy_optimizer", "kl_ctl", "reward", "counts", "step"}
                                      for c in checkpoints)
    rows = metric_rows(tmp_path / algo)
    assert all("ppo/value_loss" not in r and "val/explained_variance" not in r for r in rows)
    assert rows[0]["objective/kl"] == pytest.approx(0, abs=1e-5) and "value" not in json.loads(
        (tmp_path / algo / "manifest.json").read_text())["inputs"]


def test_reinforce_trains_a_value_model(setup, tmp_path):
    train_ppo.main(parse_config(train_ppo.Config, train_ppo.PRESETS,
                                ppo_args(setup, tmp_path / "r", "--algo", "reinforce")))
    rows = metric_rows(tmp_path / "r")
    assert all(r["ppo/value_loss"] > 0 and "val/explained_variance" in r for r in rows)


def test_bad_algo_settings_are_refused(setup, tmp_path):
    for extra, msg in ((["--algo", "dpo"], "--algo must be one of"), (["--reward", "x"], "--reward must be one of"),
                       (["--reward", "direct", "--labeler", "palm"], "--labeler must be one of rule, hf, vllm")):
        with pytest.raises(SystemExit, match=msg):
            parse_config(train_ppo.Config, train_ppo.PRESETS, ppo_args(setup, tmp_path / "x", *extra))
    for extra, msg in ((["--algo", "rloo", "--samples-per-query", "1"], "--samples-per-query must be >= 2, got 1"),
                       (["--algo", "rloo", "--samples-per-query", "3"], "--batch-size 16 must split into whole groups "
                                                                       "of --samples-per-query 3"),
                       (["--batch-size", "16", "--micro-batch-size", "5"], "--micro-batch-size 5"),
                       (["--total-episodes", "8"], "--total-episodes 8 must be >= --batch-size")):
        with pytest.raises(SystemExit, match=msg):
            train_ppo.main(parse_config(train_ppo.Config, train_ppo.PRESETS, ppo_args(setup, tmp_path / "x", *extra)))


def test_d_rlaif_with_a_vllm_labeler_is_refused_under_torchrun(setup, tmp_path, monkeypatch):
    """--reward direct --labeler vllm needs one engine called in step by every rank; under torchrun it stops with
    the message before any model or engine is loaded (a 2-rank world, faked)."""
    monkeypatch.setattr(run_module, "setup_dist", lambda: Dist(rank=0, world_size=2))
    monkeypatch.setattr(train_ppo, "load_causal_lm", lambda *a, **k: pytest.fail("loaded a model"))
    cfg = parse_config(train_ppo.Config, train_ppo.PRESETS,
                       ppo_args(setup, tmp_path / "x", "--reward", "direct", "--labeler", "vllm", "--judge-model", "m"))
    with pytest.raises(SystemExit, match="runs in one process"):
        train_ppo.main(cfg)


# ----------------------------------------------------------------------------------------------------------------
# d-RLAIF: the labeler's rating is the reward


def test_d_rlaif_scores_are_the_labelers_ratings_and_no_rm_is_loaded(setup, tmp_path, monkeypatch):
    loaded = []
    real_load = train_ppo.load_scalar_model
    monkeypatch.setattr(train_ppo, "load_scalar_model", lambda path, **kw: loaded.append(path) or real_load(path, **kw))
    asked = []
    real_rate = LabelerReward.rate
    monkeypatch.setattr(LabelerReward, "rate", lambda self, items: asked.append(items) or real_rate(self, items))
    out = tmp_path / "direct"
    cfg = parse_config(train_ppo.Config, train_ppo.PRESETS,
                       ppo_args(setup, out, "--reward", "direct", "--algo", "rloo", "--rm-path", "/nonexistent"))
    metrics = train_ppo.main(cfg)
    assert loaded == []  # no reward model, no value model
    rows = metric_rows(out)
    # the scores of every update are the rule labeler's d-RLAIF rewards of its (post, response) pairs
    labeler = labelers.RuleLabeler(cfg.rule_temperature, 0.0, cfg.rule_noise, seed=cfg.seed)
    distinct = set()
    for items, row in zip(asked, rows):
        want = labelers.direct_scores(labeler, items)
        assert all(-1 <= w <= 1 for w in want)
        assert row["objective/rm_score"] == pytest.approx(sum(want) / len(want), abs=1e-5)
        distinct |= {(it["id"], it["summary"]) for it in items}
        assert row["labeler/calls"] == len(distinct)  # each distinct (post, response) asked once
        assert row["rollout/left_out"] == 0
    assert metrics["labeler_calls"] == len(distinct) < metrics["episodes"]  # repeats were not asked again
    assert "rm" not in json.loads((out / "manifest.json").read_text())["inputs"]


def test_d_rlaif_through_an_openai_compatible_api_leaves_failed_ratings_out(setup, tmp_path):
    """--reward direct --labeler openai against the fake server of test_api_faults: every rating request carries
    the paper's rating prompt, each distinct (post, response) is asked once, and the one request that fails for
    good (401: not retryable) makes an unrated episode whose whole group (k = 4) leaves the update, counted."""
    from test_api_faults import FakeAPI

    api = FakeAPI()
    api.positions = [(" 8", [(" 8", math.log(0.6)), (" 9", math.log(0.3)), ("10", math.log(0.1))]),
                     (None, [("\n", 0.0)])]
    api.plan = ["401"]
    try:
        metrics = train_ppo.main(parse_config(train_ppo.Config, train_ppo.PRESETS, ppo_args(
            setup, tmp_path / "api", "--reward", "direct", "--algo", "rloo", "--rm-path", "/nonexistent",
            "--labeler", "openai", "--api-base", api.url, "--api-model", "fake", "--max-retries", "0",
            "--total-episodes", "16")))
    finally:
        api.close()
    bodies = [r["body"] for r in api.requests]
    assert all(b["messages"][0]["content"].startswith(judges.RATING_PREAMBLE) for b in bodies)
    assert all(b["messages"][0]["content"].endswith("SCORE:") for b in bodies)
    assert len(bodies) == len({b["messages"][0]["content"] for b in bodies})  # nothing asked twice
    # the samples table's reference ratings (logging only) are the requests labeler_calls does not count
    samples = [json.loads(x) for x in (tmp_path / "api" / "samples.jsonl").read_text().splitlines()]
    assert metrics["labeler_calls"] == len(bodies) - len({r["id"] for r in samples}) > 0
    assert metrics["left_out_episodes"] == 4
    (row,) = metric_rows(tmp_path / "api")
    assert row["rollout/left_out"] == 4
    # every rated response has the same known distribution; the mean is over the kept episodes only
    assert row["objective/rm_score"] == pytest.approx((0.6 * 8 + 0.3 * 9 + 0.1 * 10 - 5.5) / 4.5, abs=1e-5)


def test_unrated_episodes_leave_the_update_with_their_group():
    batch = {"scores": torch.tensor([1.0, float("nan"), 0.5, 0.2, 0.3, 0.4]),
             "raw_scores": torch.tensor([1.0, float("nan"), 0.5, 0.2, 0.3, 0.4]),
             "response_mask": torch.ones(6, 3, dtype=torch.long)}
    assert train_ppo.leave_out_unscored(batch, 2) == 2  # the group of the unrated row, rows 0-1
    assert batch["response_mask"].sum(1).tolist() == [0, 0, 3, 3, 3, 3]
    assert batch["scores"].tolist() == pytest.approx([0, 0, 0.5, 0.2, 0.3, 0.4])
    assert train_ppo.leave_out_unscored(batch, 1) == 0
    # and an unrated row's tokens change nothing downstream: its advantages are 0, the others' as without it
    cfg = train_ppo.Config(algo="rloo")
    batch["logprobs"] = batch["ref_logprobs"] = torch.zeros(6, 3)
    out = train_ppo.kl_rewards_and_advantages(batch, 0.1, 2, cfg, Dist())
    assert (out["advantages"][:2] == 0).all()
    kept = {key: v[2:] for key, v in batch.items()}
    torch.testing.assert_close(out["advantages"][2:], train_ppo.kl_rewards_and_advantages(kept, 0.1, 2, cfg,
                                                                                         Dist())["advantages"])
