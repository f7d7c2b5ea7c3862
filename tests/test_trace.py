"""train_ppo.py --trace and train_rm.py --trace: every column of a micro trace recomputed from its other columns
and the formulas (reward sum, TD residuals, the GAE recursion, whitening, returns = advantages + values, ratio =
exp of the log-prob difference, the clip), to 1e-6; the group estimators' baselines from the group's returns; and
tracing changes nothing of the run (the same weights and metrics with and without it)."""

import json
import math

import pytest
import torch
from helpers import make_eos_likely
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

import train_ppo
import train_rm
from minirlaif import synthetic
from minirlaif.config import parse_config
from minirlaif.data import load_posts
from minirlaif.models import tiny_gpt2_config, train_bpe_tokenizer
from minirlaif.trace import clipped


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trace")
    synthetic.write_task(root / "data", synthetic.TaskConfig(n_train=200, n_validation=10, n_test=10,
                                                             n_comparison_posts_train=60,
                                                             n_comparison_posts_validation=40))
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
    return root


def ppo(setup, out, *extra):
    return train_ppo.main(parse_config(train_ppo.Config, train_ppo.PRESETS, [
        "--preset", "micro", "--task-dir", "", "--dataset", str(setup / "data" / "sft"), "--sft-path",
        str(setup / "sft"), "--rm-path", str(setup / "rm"), "--out-dir", str(out), *extra]))


def close(a, b, tol=1e-6):
    assert len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b)), (a, b)


def check_episode(ep: dict, t: dict, value: bool):
    """Every column of one traced episode against the formulas, from the other columns."""
    n, beta = ep["n_tokens"], t["kl_coef"]
    close(ep["kl"], [lp - ref for lp, ref in zip(ep["logprob"], ep["ref_logprob"])])  # k1
    want = [-beta * kl for kl in ep["kl"]]
    want[-1] += ep["score"]  # 3-4: the score on the last valid token (the EOS, when there is one)
    close(ep["reward"], want)
    assert ep["score"] == pytest.approx(ep["raw_score"] - (0 if ep["has_eos"] else t["missing_eos_penalty"]), abs=1e-6)
    assert (ep["text"][-1] == "<|endoftext|>") == ep["has_eos"]
    if value:
        V = ep["value"] + [0.0]  # the value after the last token is 0
        close(ep["td_residual"], [ep["reward"][i] + t["gamma"] * V[i + 1] - V[i] for i in range(n)])
        gae, nxt = [0.0] * n, 0.0
        for i in reversed(range(n)):
            gae[i] = nxt = ep["td_residual"][i] + t["gamma"] * t["lam"] * nxt
        close(ep["advantage"], gae)
        close(ep["return"], [a + v for a, v in zip(ep["advantage"], ep["value"])])
    w = t["whitening"]  # step 5's global statistics; an estimator that is not whitened (dr-grpo) uses its own
    close(ep["advantage_whitened"], [(a - w["mean"]) / math.sqrt(w["var"] + w["eps"]) if t["whitened"] else a
                                     for a in ep["advantage"]])
    assert len(ep["epochs"]) == 4  # micro: ppo_epochs 4, every epoch sees every row once
    for e in ep["epochs"]:
        ratio = [math.exp(new - old) for new, old in zip(e["logprob_new"], ep["logprob"])]
        if e["epoch"] == 1:  # before the first optimizer step the policy is the sampler: ratio 1
            close(ratio, [1.0] * n, tol=1e-5)
        hit = [clipped(a, r, t["cliprange"]) for a, r in zip(ep["advantage_whitened"], ratio)]
        assert hit == [(a > 0 and r > 1 + t["cliprange"]) or (a < 0 and r < 1 - t["cliprange"])
                       for a, r in zip(ep["advantage_whitened"], ratio)]
        if value:
            assert len(e["value_new"]) == n


def test_a_ppo_trace_is_the_update_in_numbers(setup, tmp_path):
    ppo(setup, tmp_path / "ppo", "--trace", "2", "--trace-updates", "first,last,2")
    for update in (1, 2, 3):
        t = json.loads((tmp_path / "ppo" / "trace" / f"update_{update:04d}.json").read_text())
        assert t["update"] == update and len(t["episodes"]) == 2 and t["whitened"]
        for ep in t["episodes"]:
            check_episode(ep, t, value=True)
        md = (tmp_path / "ppo" / "trace" / f"update_{update:04d}.md").read_text()
        assert "| t | 2. token | 2. logprob (old) |" in md and "5. TD residual" in md and "6. ratio e4" in md
        assert (tmp_path / "ppo" / "trace" / f"update_{update:04d}.png").stat().st_size > 1000
    # the episodes include both EOS cases of this fixture somewhere
    eps = [ep for u in (1, 2, 3) for ep in json.loads((tmp_path / "ppo" / "trace" /
                                                       f"update_{u:04d}.json").read_text())["episodes"]]
    assert any(ep["has_eos"] for ep in eps)


@pytest.mark.parametrize("algo", ["rloo", "grpo", "dr-grpo", "reinforce++"])
def test_a_value_free_trace_shows_what_the_estimator_computes(setup, tmp_path, algo):
    ppo(setup, tmp_path / algo, "--algo", algo, "--trace", "4", "--trace-updates", "last")
    t = json.loads((tmp_path / algo / "trace" / "update_0003.json").read_text())
    k = t["samples_per_query"]
    assert "value" not in t["episodes"][0] and t["whitened"] == (algo != "dr-grpo")
    for ep in t["episodes"]:
        check_episode(ep, t, value=False)
        R = sum(ep["reward"])
        if algo == "reinforce++":  # the reward-to-go: the rewards from each token on
            close(ep["advantage"], [sum(ep["reward"][i:]) for i in range(ep["n_tokens"])])
            continue
        group = ep["group_returns"]
        assert group[ep["row"] % k] == pytest.approx(R, abs=1e-6) and len(group) == k
        mean = sum(group) / k
        if algo == "rloo":
            want = R - (sum(group) - R) / (k - 1)
        elif algo == "grpo":
            want = (R - mean) / (math.sqrt(sum((x - mean) ** 2 for x in group) / (k - 1)) + 1e-4)
        else:
            want = R - mean
        close(ep["advantage"], [want] * ep["n_tokens"])


def test_tracing_changes_nothing_of_the_run(setup, tmp_path):
    rows = {}
    for name, extra in (("plain", ()), ("traced", ("--trace", "3", "--trace-updates", "first,2,last"))):
        ppo(setup, tmp_path / name, *extra)
        rows[name] = [{k: v for k, v in json.loads(x).items() if not k.startswith(("time/", "eps"))}
                      for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert (tmp_path / "plain" / "model.safetensors").read_bytes() == \
        (tmp_path / "traced" / "model.safetensors").read_bytes()
    assert rows["plain"] == rows["traced"] and not (tmp_path / "plain" / "trace").exists()


def test_a_reward_model_trace(setup, tmp_path):
    """train_rm.py --trace N: both rewards after the offset, the margin, the label, sigmoid(margin), the BT loss."""
    d = setup / "data"
    # labels for the AI test split: the rule labeler's own, on two summaries per comparison post
    rows = []
    for line in (d / "comparisons" / "train.jsonl").read_text().splitlines():
        c = json.loads(line)
        info = c["info"]
        rows.append({"id": info["id"], "subreddit": info["subreddit"], "title": info["title"], "post": info["post"],
                     "summary_a": c["summaries"][0]["text"], "summary_b": c["summaries"][1]["text"],
                     "p_a": 0.8 if c["choice"] == 0 else 0.3})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = train_rm.main(parse_config(train_rm.Config, train_rm.PRESETS, [
        "--preset", "micro", "--sft-path", str(setup / "sft"), "--labels-path", str(tmp_path / "pairs.jsonl"),
        "--comparisons", str(d / "comparisons"), "--reference-dataset", str(d / "sft"), "--out-dir",
        str(tmp_path / "rm"), "--trace", "5"]))
    t = json.loads((tmp_path / "rm" / "trace" / "pairs.json").read_text())
    assert len(t["pairs"]) == 5 and t["offset"] == pytest.approx(metrics["reward_offset"])
    for p in t["pairs"]:
        assert p["margin"] == pytest.approx(p["r_a"] - p["r_b"], abs=1e-9)
        assert p["p_a"] == pytest.approx(1 / (1 + math.exp(-p["margin"])), abs=1e-9)
        s = p["p_a"]
        assert p["bt_loss"] == pytest.approx(-(p["label"] * math.log(s) + (1 - p["label"]) * math.log(1 - s)),
                                             abs=1e-6)
        assert p["label"] in (0.8, 0.3)
    assert "| pair | r_a | r_b | margin m | label p |" in (tmp_path / "rm" / "trace" / "pairs.md").read_text()
