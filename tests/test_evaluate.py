"""evaluate.py: both-orders judging and un-flip, ties, caches and resume, and an end-to-end run on tiny models."""

import json
import math
import random
import shutil
import statistics
from pathlib import Path

import pytest
from helpers import make_eos_likely
import torch
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

import evaluate
from minirlaif import judges, labelers, synthetic
from minirlaif.data import format_query, load_posts
from minirlaif.models import tiny_gpt2_config, train_bpe_tokenizer
from minirlaif.config import parse_config
from minirlaif.utils import read_json, write_json

TASK = synthetic.TaskConfig(n_train=200, n_validation=12, n_test=4, n_comparison_posts_train=30,
                            n_comparison_posts_validation=24)


# ----------------------------------------------------------------------------------------------------------------
# fixtures: a synthetic task and stage dirs as the real stages leave them (random tiny models)


def save_policy(path, tok, seed, eos_logit):
    """A random tiny policy whose EOS logit is about `eos_logit` (the others are near 0): greedy decoding stops
    early on some posts and not on others."""
    torch.manual_seed(seed)
    cfg = tiny_gpt2_config(tok, n_layer=1, n_head=2, n_embd=32, n_positions=256)
    policy = make_eos_likely(GPT2LMHeadModel(cfg), tok.eos_token_id, eos_logit, seed)
    policy.save_pretrained(path)
    tok.save_pretrained(path)
    return policy


def save_rm(path, tok, policy, feedback, labels_path):
    cfg = tiny_gpt2_config(tok, n_layer=1, n_head=2, n_embd=32, n_positions=256)
    cfg.num_labels = 1
    rm = GPT2ForSequenceClassification(cfg)
    rm.transformer.load_state_dict(policy.transformer.state_dict())
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(path)
    tok.save_pretrained(path)
    # what evaluate.py reads from train_rm.py's outputs: the split settings and caps, and its own numbers
    write_json(path / "manifest.json", {"config": {"feedback": feedback, "seed": 1, "val_frac": 0.2, "test_frac": 0.3,
                                                   "labels_path": str(labels_path), "max_query_tokens": 200,
                                                   "max_summary_tokens": 48}})
    write_json(path / "metrics.json", {"acc_ai_test": 0.5, "acc_human_conf8": 0.5, "ece": 0.1, "ece_set": "x"})


def write_labels(labels_dir, data_dir):
    """label.py's outputs: pairs.jsonl (rule-labeled, both orders) and position_bias.json."""
    rng, style = random.Random(0), synthetic.TaskConfig()
    judge = synthetic.RuleJudge(temperature=0.2, position_bias=0.5)
    posts, _ = load_posts(data_dir / "comparisons", "train")
    rows = []
    for p in posts:
        a, _ = synthetic.policy_sample(rng, p.facts, style)
        b, _ = synthetic.policy_sample(rng, p.facts, style)
        p_ab, p_ba = judge.prob_first(p, a, b), 1 - judge.prob_first(p, b, a)
        rows.append({"id": p.id, "subreddit": p.subreddit, "title": p.title, "post": p.post, "summary_a": a,
                     "summary_b": b, "p_a_ab": p_ab, "p_a_ba": p_ba, "p_a": (p_ab + p_ba) / 2, "null_reason": None})
    labels_dir.mkdir(parents=True)
    (labels_dir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_json(labels_dir / "position_bias.json", judges.position_bias(rows))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    synthetic.write_task(root / "data", TASK)
    posts, _ = load_posts(root / "data" / "sft", "train")
    tok = train_bpe_tokenizer([f"{p.title}\n{p.post}\n{p.summary}" for p in posts], vocab_size=400)
    runs = root / "runs"
    # greedy random models: sft never stops (16 tokens), the others stop after a few tokens on most posts
    sft = save_policy(runs / "sft", tok, seed=0, eos_logit=0.0)
    save_policy(runs / "ppo", tok, seed=3, eos_logit=0.4)
    save_policy(runs / "ppo_rlhf", tok, seed=1, eos_logit=0.5)
    for name in ("ppo", "ppo_rlhf"):  # train_ppo.py's log
        (runs / name / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "objective/scores": 0.1 * s, "objective/kl": 0.02 * s,
                        "rollout/response_len": 20 - s}) + "\n" for s in range(1, 6)))
    write_labels(runs / "labels", root / "data")
    save_rm(runs / "rm", tok, sft, "ai", runs / "labels" / "pairs.jsonl")
    save_rm(runs / "rm_human", tok, sft, "human", runs / "labels" / "pairs.jsonl")
    return {"root": root, "runs": runs, "tok": tok}


def eval_args(env, out, *extra):
    r = env["root"]
    return ["--preset", "micro", "--task-dir", "", "--runs-dir", str(env["runs"]), "--dataset", str(r / "data" / "sft"),
            "--comparisons", str(r / "data" / "comparisons"), "--out-dir", str(out), "--backend", "hf",
            "--device", "cpu", *extra]


def run_eval(env, out, *extra):
    return evaluate.main(parse_config(evaluate.Config, evaluate.PRESETS, eval_args(env, out, *extra)))


# ----------------------------------------------------------------------------------------------------------------
# judging in both orders


class FnLabeler:
    """A labeler whose P(first better) is fn(first, second); records every query it is shown."""

    def __init__(self, fn):
        self.fn, self.queries = fn, []

    def judge(self, queries):
        self.queries += queries
        return [{"p_first": self.fn(q["first"], q["second"]), "mass": None, "rationale": None, "null_reason": None,
                 "usage": None} for q in queries]


def task_posts(env, n=12):
    posts, _ = load_posts(env["root"] / "data" / "sft", "validation")
    return posts[:n]


def cfg_for(*extra):
    return parse_config(evaluate.Config, evaluate.PRESETS, ["--preset", "micro", *extra])


def test_a_judge_that_always_prefers_the_first_position_gives_all_ties(env):
    posts = task_posts(env)
    a = [f"summary a {i}" for i in range(len(posts))]
    b = [f"summary b {i}" for i in range(len(posts))]
    for q in (0.9, 0.7, 0.1):
        labeler = FnLabeler(lambda first, second, q=q: q)
        rows = evaluate.judge_comparison(lambda labeler=labeler: labeler, posts, a, b, cfg_for())
        assert [r["outcome"] for r in rows] == [0.5] * len(posts)
        assert len(labeler.queries) == 2 * len(posts)  # every pair shown in both orders
        lens = {"p": {"words": [3] * len(posts), "tokens": [4] * len(posts)},
                "b": {"words": [3] * len(posts), "tokens": [4] * len(posts)}}
        s = evaluate.summarize_comparison("p", "b", rows, lens, None, cfg_for())
        assert s["win_rate"] == 0.5 and s["tie_rate"] == 1.0 and s["judge_consistency_rate"] == 0.0
        assert s["judge_mean_p_first"] == pytest.approx(q)


def test_a_biased_but_consistent_judge_gives_the_right_outcomes_after_unflipping(env):
    posts = task_posts(env)
    quality = {}
    a, b, want = [], [], []
    for i in range(len(posts)):
        qa, qb = (3.0, 0.0) if i % 3 else (0.0, 3.0)  # A better on 2 of 3 posts
        a.append(f"a{i}"), b.append(f"b{i}")
        quality.update({f"a{i}": qa, f"b{i}": qb})
        want.append(1.0 if qa > qb else 0.0)
    bias = 1.5  # toward the first position, smaller than the quality gap: the same winner in both orders
    labeler = FnLabeler(lambda f, s: 1 / (1 + math.exp(-(quality[f] - quality[s] + bias))))
    rows = evaluate.judge_comparison(lambda: labeler, posts, a, b, cfg_for())
    assert [r["outcome"] for r in rows] == want
    # the orders were really un-flipped: P(A better) in each order is on A's side, not on the first position's
    for r, w in zip(rows, want):
        assert (r["p_a_ab"] > 0.5) == (r["p_a_ba"] > 0.5) == (w == 1.0)
        assert r["p_a_ab"] > r["p_a_ba"]  # A gains from being shown first


def test_the_rule_labeler_with_a_position_bias_keeps_gold_outcomes(env):
    """The real labeler path: gold summaries vs corrupted ones, a position-biased rule labeler, both orders."""
    posts = task_posts(env)
    rng, style = random.Random(1), synthetic.TaskConfig()
    gold = [synthetic.gold_summary(p.facts) for p in posts]
    worse = []
    for p, g in zip(posts, gold):
        w = g
        while synthetic.score(p, w) >= synthetic.score(p, g) - 0.15:
            w, _ = synthetic.policy_sample(rng, p.facts, style)
        worse.append(w)
    biased = labelers.RuleLabeler(temperature=0.1, position_bias=1.0)
    rows = evaluate.judge_comparison(lambda: biased, posts, gold, worse, cfg_for())
    assert all(r["outcome"] == 1.0 for r in rows)
    rows = evaluate.judge_comparison(lambda: biased, posts, worse, gold, cfg_for())
    assert all(r["outcome"] == 0.0 for r in rows)
    # evaluate's judge is the gold one by default: no bias and no noise, whatever label.py used
    judge = evaluate.make_labeler(cfg_for(), 0)
    assert judge.judge_fn.position_bias == 0.0 and judge.judge_fn.noise == 0.0


def test_identical_summaries_are_ties_without_a_judge_call(env):
    posts = task_posts(env, 6)
    a = ["same", "x1", "same2", "x3", "same4", "x5"]
    b = ["same", "y1", "same2", "y3", "same4", "y5"]
    labeler = FnLabeler(lambda f, s: 0.8 if f.startswith("x") else 0.2)
    rows = evaluate.judge_comparison(lambda: labeler, posts, a, b, cfg_for())
    assert [r["outcome"] for r in rows] == [0.5, 1.0, 0.5, 1.0, 0.5, 1.0]
    assert [r["identical"] for r in rows] == [True, False] * 3
    assert {q["first"] for q in labeler.queries} == {"x1", "x3", "x5", "y1", "y3", "y5"}
    # nothing to judge: the judge is never even built
    rows = evaluate.judge_comparison(lambda: pytest.fail("judge built"), posts, a, a, cfg_for())
    assert all(r["outcome"] == 0.5 for r in rows)


def test_judgments_are_cached_and_rejudged_only_for_changed_texts(env, tmp_path):
    posts = task_posts(env, 6)
    a, b = [f"a{i}" for i in range(6)], [f"b{i}" for i in range(6)]
    cache = tmp_path / "j.jsonl"
    first = FnLabeler(lambda f, s: 0.8 if f.startswith("a") else 0.3)
    rows = evaluate.judge_comparison(lambda: first, posts, a, b, cfg_for(), cache)
    again = evaluate.judge_comparison(lambda: pytest.fail("judge built"), posts, a, b, cfg_for(), cache)
    assert again == rows
    a[2] = "a2 changed"
    second = FnLabeler(lambda f, s: 0.8 if f.startswith("a") else 0.3)
    evaluate.judge_comparison(lambda: second, posts, a, b, cfg_for(), cache)
    assert {q["id"] for q in second.queries} == {posts[2].id}


def test_null_judgments_are_left_out_and_counted(env):
    posts = task_posts(env, 4)
    labeler = FnLabeler(lambda f, s: None if f in ("a0", "b0") else (0.9 if f.startswith("a") else 0.2))
    rows = evaluate.judge_comparison(lambda: labeler, posts, ["a0", "a1", "a2", "a3"], ["b0", "b1", "b2", "b3"],
                                     cfg_for())
    assert rows[0]["p_a"] is None and rows[0]["outcome"] is None and rows[0]["null_reason"]
    lens = {k: {"words": [2, 3, 4, 5], "tokens": [3, 4, 5, 6]} for k in ("p", "b")}
    s = evaluate.summarize_comparison("p", "b", rows, lens, None, cfg_for())
    assert s["n"] == 3 and s["n_null"] == 1 and s["win_rate"] == 1.0
    assert s["mean_len_policy"] == pytest.approx(4.0)  # the null pair's lengths are left out too


def test_comparisons_and_names():
    assert evaluate.comparison_pairs(["sft", "ppo", "ppo_rlhf"], True) == [
        ("ppo", "sft"), ("ppo_rlhf", "sft"), ("sft", "reference"), ("ppo", "reference"), ("ppo_rlhf", "reference"),
        ("ppo", "ppo_rlhf")]
    assert evaluate.comparison_pairs(["ppo"], False) == []
    # RL variants: each vs SFT, the reference and PPO-RLAIF
    assert evaluate.comparison_pairs(["sft", "ppo", "rloo"], False) == [("ppo", "sft"), ("rloo", "sft"),
                                                                       ("rloo", "ppo")]
    assert evaluate.parse_named(["a=x", "b=y/z"], "policy") == {"a": "x", "b": "y/z"}
    for bad in (["a"], ["=x"], ["a=x", "a=y"], ["reference=x"]):
        with pytest.raises(SystemExit):
            evaluate.parse_named(bad, "policy")
    cfg = parse_config(evaluate.Config, evaluate.PRESETS, ["--policy", "a=x", "--policy", "b=y", "--rm", "r=z"])
    assert cfg.policy == ["a=x", "b=y"] and cfg.rm == ["r=z"] and cfg.out_dir == "runs/tiny/eval"


# ----------------------------------------------------------------------------------------------------------------
# end to end


def with_gold_summaries(real_generate, posts, policy_name):
    """generate_texts, except that the policy saved as `policy_name` writes the gold summary of every other post
    (random models write no facts, so this gives the judge real wins and losses to find)."""
    # a query may be cut to fit max_query_tokens: its post's first words identify it
    heads = {format_query(p.subreddit, p.title, p.post)[:120]: p for p in posts}

    def generate(model, tokenizer, queries, *args, **kwargs):
        outs = real_generate(model, tokenizer, queries, *args, **kwargs)
        if Path(model.name_or_path).name == policy_name:
            for i, q in enumerate(queries):
                post = heads[tokenizer.decode(q)[:120]]
                if int(post.id[-1]) % 2 == 0:
                    text = synthetic.gold_summary(post.facts)
                    ids = tokenizer(" " + text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                    outs[i] = {"text": text, "token_ids": ids}
        return outs

    return generate


@pytest.fixture(scope="module")
def first_run(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "eval"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate, "generate_texts", with_gold_summaries(evaluate.generate_texts, task_posts(env), "ppo"))
        metrics = run_eval(env, out)
    return out, metrics


def cached_texts(out, name):
    rows = [json.loads(line) for f in (out / "generations").glob(f"{name}.*.jsonl")
            for line in f.read_text().splitlines()]
    return {r["id"]: r["text"] for r in rows}


def test_end_to_end_writes_eval_json_report_plots_and_metrics(env, first_run):
    out, metrics = first_run
    result = read_json(out / "eval.json")
    posts = {p.id: p for p in task_posts(env, 8)}
    texts = {name: cached_texts(out, name) for name in ("sft", "ppo", "ppo_rlhf")}
    texts["reference"] = {i: p.summary for i, p in posts.items()}
    pairs = [(c["policy"], c["baseline"]) for c in result["comparisons"]]
    assert pairs == evaluate.comparison_pairs(["sft", "ppo", "ppo_rlhf"], True)
    for c in result["comparisons"]:
        for key in ("policy", "baseline", "win_rate", "ci95", "n", "tie_rate", "lc_win_rate", "mean_len_policy",
                    "mean_len_baseline", "mean_judge_score", "mean_len_policy_tokens"):
            assert key in c, key
        assert c["n"] == 8 and 0.0 <= c["win_rate"] <= 1.0 and 0.0 <= c["tie_rate"] <= 1.0
        assert len(c["ci95"]) == 2 and c["ci95"][0] <= c["win_rate"] <= c["ci95"][1]
        # every outcome is what the gold judge's scores of the two summaries say
        rows = result["per_pair"][f"{c['policy']}_vs_{c['baseline']}"]
        for r in rows:
            post = posts[r["id"]]
            s_p, s_b = (synthetic.score(post, texts[name][r["id"]]) for name in (c["policy"], c["baseline"]))
            assert r["outcome"] == (1.0 if s_p > s_b else 0.0 if s_p < s_b else 0.5)
            assert r["identical"] == (texts[c["policy"]][r["id"]] == texts[c["baseline"]][r["id"]])
        assert c["win_rate"] == pytest.approx(sum(r["outcome"] for r in rows) / len(rows))
        assert c["mean_len_policy"] == pytest.approx(statistics.fmean(len(texts[c["policy"]][r["id"]].split())
                                                                      for r in rows))
    by_pair = {(c["policy"], c["baseline"]): c for c in result["comparisons"]}
    assert by_pair["ppo", "sft"]["win_rate"] >= 0.75 and by_pair["ppo", "sft"]["n_win"] >= 4  # the gold half
    assert by_pair["sft", "reference"]["win_rate"] < 0.5
    assert sum(not r["identical"] for r in result["per_pair"]["ppo_rlhf_vs_sft"]) > 0  # the judge really ran
    assert result["judge"]["position_bias"]["mean_p_first"] == pytest.approx(0.5)  # unbiased gold judge
    # reward models: both, on the human conf >= 8 comparisons and the AI test split
    for name in ("rm", "rm_human"):
        rm = result["reward_models"][name]
        assert rm["n_human_conf8"] > 0 and rm["n_ai_test"] > 0
        assert 0.0 <= rm["acc_human_conf8"] <= 1.0 and 0.0 <= rm["acc_ai_test"] <= 1.0
    assert result["position_bias_labels"]["mean_p_first"] > 0.5  # label.py's biased labeler, read back
    assert set(result["ppo_curves"]) == {"sft", "ppo", "ppo_rlhf"} and result["ppo_curves"]["sft"] is None
    assert len(result["samples"]) == 2 and set(result["samples"][0]["summaries"]) == {"reference", "sft", "ppo",
                                                                                        "ppo_rlhf"}
    # report, plots, headline metrics, manifest
    report = (out / "report.md").read_text()
    for text in ("| RLAIF vs SFT |", "68.1%", "71.0%", "59.0%", "| RLHF vs reference |", "35.1%", "| rm_human |",
                 "69.3%", "## Samples", "win_rates.png"):
        assert text in report, text
    for png in ("ppo_curves.png", "win_rates.png", "position_bias.png", "rm_calibration.png"):
        assert (out / png).stat().st_size > 1000, png
    assert metrics["win_rate/ppo_vs_sft"] == result["comparisons"][0]["win_rate"]
    assert "rm_acc_human_conf8/rm_human" in metrics and "lc_win_rate/ppo_vs_ppo_rlhf" in metrics
    manifest = read_json(out / "manifest.json")
    assert manifest["inputs"]["policy/ppo"]["sha256"] and manifest["config"]["n"] == 8


def test_rerun_skips_a_finished_run_and_resumes_from_the_caches(env, first_run, monkeypatch, capsys):
    out, metrics = first_run
    # unchanged config and models: skipped
    assert run_eval(env, out) == metrics
    assert "skipping" in capsys.readouterr().out
    # not finished (metrics.json gone, as after a kill): nothing is generated or judged again
    (out / "metrics.json").unlink()
    monkeypatch.setattr(evaluate, "generate_texts", lambda *a, **k: pytest.fail("regenerated"))
    monkeypatch.setattr(evaluate, "make_labeler", lambda *a: pytest.fail("re-judged"))
    again = run_eval(env, out)
    assert again["win_rate/ppo_vs_sft"] == metrics["win_rate/ppo_vs_sft"]
    assert again["ci95/ppo_vs_sft"] == metrics["ci95/ppo_vs_sft"]


def test_a_run_killed_mid_policy_generates_only_the_missing_summaries(env, first_run, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    shutil.copytree(first_run[0] / "generations", out / "generations")
    shutil.copytree(first_run[0] / "judgments", out / "judgments")
    cache = next((out / "generations").glob("sft.*.jsonl"))
    lines = cache.read_text().splitlines(keepends=True)
    cache.write_text("".join(lines[:3]) + lines[3][:10])  # killed while writing the 4th row
    queries = []
    real = evaluate.generate_texts
    monkeypatch.setattr(evaluate, "generate_texts",
                        lambda m, t, q, *a, **k: queries.extend(q) or real(m, t, q, *a, **k))
    monkeypatch.setattr(evaluate, "make_labeler", lambda *a: pytest.fail("re-judged"))  # greedy: the same texts
    metrics = run_eval(env, out)
    assert len(queries) == 5  # 8 posts, 3 cached
    assert metrics["win_rate/ppo_vs_sft"] == first_run[1]["win_rate/ppo_vs_sft"]
    assert len(cache.read_text().splitlines()) == 8


def test_a_changed_policy_is_generated_again(env, tmp_path, monkeypatch):
    """The cache is keyed by the policy's content: new weights under the same name are not served old summaries."""
    out = tmp_path / "eval"
    policy = tmp_path / "pol"
    save_policy(policy, env["tok"], seed=5, eos_logit=3.0)
    args = ("--policy", f"sft={env['runs'] / 'sft'}", "--policy", f"mine={policy}", "--rm", f"rm={env['runs'] / 'rm'}",
            "--n-bootstrap", "10")
    run_eval(env, out, *args)
    assert len(list((out / "generations").glob("mine.*.jsonl"))) == 1
    save_policy(policy, env["tok"], seed=6, eos_logit=3.0)  # retrained
    calls = []
    real = evaluate.generate_texts
    monkeypatch.setattr(evaluate, "generate_texts", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_eval(env, out, *args)
    assert calls and len(list((out / "generations").glob("mine.*.jsonl"))) == 2
    result = read_json(out / "eval.json")
    assert [(c["policy"], c["baseline"]) for c in result["comparisons"]] == [
        ("mine", "sft"), ("sft", "reference"), ("mine", "reference")]


def test_missing_default_dirs_are_skipped_with_a_message(env, tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "sft").symlink_to(env["runs"] / "sft")
    (runs / "ppo").mkdir()  # a PPO run still in progress: no saved model yet
    run_eval(env, tmp_path / "eval", "--runs-dir", str(runs), "--n-bootstrap", "10")
    printed = capsys.readouterr().out
    # one line per kind, naming every default that is not trained (yet): a note, not a failure
    assert f"policy: not trained in {runs}, left out: ppo, ppo_rlhf, reinforce, rloo, grpo, reinforce++, dr-grpo, " \
           f"direct\n" in printed
    assert f"rm: not trained in {runs}, left out: rm, rm_human\n" in printed
    result = read_json(tmp_path / "eval" / "eval.json")
    assert [(c["policy"], c["baseline"]) for c in result["comparisons"]] == [("sft", "reference")]
    assert result["reward_models"] == {}
    with pytest.raises(SystemExit):
        run_eval(env, tmp_path / "eval2", "--runs-dir", str(tmp_path / "nothing"))


def test_an_lm_judge_that_cannot_read_the_prompts_gives_nulls_not_guesses(env, tmp_path):
    """The hf judge path end to end: a tiny LM with a 256-token context cannot read the judge prompts."""
    out = tmp_path / "eval"
    run_eval(env, out, "--policy", f"sft={env['runs'] / 'sft'}", "--policy", f"ppo={env['runs'] / 'ppo'}",
             "--rm", f"rm={env['runs'] / 'rm'}", "--labeler", "hf", "--judge-model", str(env["runs"] / "sft"))
    c = read_json(out / "eval.json")["comparisons"][0]
    assert (c["n"], c["n_null"], c["win_rate"], c["ci95"], c["lc_win_rate"]) == (0, 8, None, None, None)
    assert list(c["null_reasons"]) == ["ab: prompt has N tokens, over the labeler's N; "
                                       "ba: prompt has N tokens, over the labeler's N"]
    assert "| 0 (8 null) |" in (out / "report.md").read_text()


def test_bad_judge_settings_fail_before_any_work(env, tmp_path):
    with pytest.raises(SystemExit, match="--labeler must be one of rule, hf, vllm, openai"):
        run_eval(env, tmp_path / "a", "--labeler", "gpt")
    real = tmp_path / "real"  # real data has no facts for the rule judge to read
    real.mkdir()
    posts = task_posts(env, 3)
    (real / "validation.jsonl").write_text("".join(json.dumps(
        {"id": p.id, "subreddit": p.subreddit, "title": p.title, "post": p.post, "summary": p.summary}) + "\n"
        for p in posts))
    with pytest.raises(SystemExit, match="rule judge reads the synthetic task's facts"):
        run_eval(env, tmp_path / "b", "--dataset", str(real))
    assert not (tmp_path / "b" / "generations").exists()


def test_repeated_ids_and_empty_posts_are_counted_not_dropped_silently(env, tmp_path):
    lines = (env["root"] / "data" / "sft" / "validation.jsonl").read_text().splitlines(keepends=True)[:10]
    empty = {**json.loads(lines[0]), "id": "empty-one", "post": "   "}
    data = tmp_path / "data"
    data.mkdir()
    (data / "validation.jsonl").write_text("".join(lines + lines[3:5]) + json.dumps(empty) + "\n")  # 13 rows
    metrics = run_eval(env, tmp_path / "out", "--dataset", str(data), "--n", "-1", "--policy",
                       f"sft={env['runs'] / 'sft'}", "--rm", f"rm={env['runs'] / 'rm'}")
    assert (metrics["n_posts"], metrics["n_duplicate_ids"], metrics["n_skipped_empty"]) == (10, 2, 1)
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["n_duplicate_ids"] == 2


def test_a_causal_lm_given_as_a_reward_model_is_refused(env, tmp_path):
    with pytest.raises(SystemExit, match="not a reward model"):
        run_eval(env, tmp_path / "a", "--rm", f"rm={env['runs'] / 'sft'}")
    assert not (tmp_path / "a" / "generations").exists()


def test_the_algorithms_table_reads_each_rl_runs_metrics(tmp_path):
    """algorithm | win rate vs SFT [CI] | LC | final KL | wall time | labeler calls, from each policy dir's
    train_ppo.py metrics.json and the comparisons; SFT (no RL metrics) gets no row."""
    runs = tmp_path / "runs"
    for name, m in {"sft": {"steps": 5}, "ppo": {"algo": "ppo", "reward": "rm", "labeler_calls": 0},
                    "direct": {"algo": "rloo", "reward": "direct", "labeler_calls": 777}}.items():
        (runs / name).mkdir(parents=True)
        if name != "sft":
            m.update({"episodes": 1024, "objective/kl_last": 4.5, "train_time_s": 321.0})
        (runs / name / "metrics.json").write_text(json.dumps(m))
    (runs / "labels").mkdir()
    (runs / "labels" / "metrics.json").write_text(json.dumps({"n_pairs": 2000}))
    comps = [{"policy": "ppo", "baseline": "sft", "win_rate": 0.8, "ci95": [0.75, 0.85], "lc_win_rate": 0.6},
             {"policy": "direct", "baseline": "sft", "win_rate": 0.7, "ci95": [0.65, 0.75], "lc_win_rate": 0.55},
             {"policy": "direct", "baseline": "ppo", "win_rate": 0.4, "ci95": [0.35, 0.45], "lc_win_rate": 0.5}]
    rows = evaluate.algorithm_rows({n: str(runs / n) for n in ("sft", "ppo", "direct")}, comps, runs)
    assert set(rows) == {"ppo", "direct"}
    assert rows["direct"] == {"algo": "rloo", "reward": "direct", "episodes": 1024, "win_rate": 0.7,
                              "ci95": [0.65, 0.75], "lc_win_rate": 0.55, "final_kl": 4.5, "train_time_s": 321.0,
                              "labeler_calls": 777, "label_pairs": None}
    assert rows["ppo"]["labeler_calls"] is None and rows["ppo"]["label_pairs"] == 2000


def test_seeds_aggregate_to_the_mean_and_a_t_interval_by_hand(tmp_path):
    """Three made-up seeds' eval.json: 0.80, 0.70, 0.75 for ppo vs sft -> mean 0.75 and
    0.75 +- 4.3027 * 0.05 / sqrt(3); a comparison in two seeds only uses those two."""
    dirs = []
    for seed, (w, lc) in enumerate([(0.80, 0.6), (0.70, 0.5), (0.75, 0.7)]):
        comps = [{"policy": "ppo", "baseline": "sft", "win_rate": w, "lc_win_rate": lc}]
        if seed < 2:
            comps.append({"policy": "rloo", "baseline": "sft", "win_rate": 0.6 + 0.1 * seed, "lc_win_rate": None})
        d = tmp_path / f"seed{seed}"
        d.mkdir()
        algorithms = {"ppo": {"final_kl": 4.0 + seed}}
        (d / "eval.json").write_text(json.dumps({"comparisons": comps, "algorithms": algorithms}))
        dirs.append(str(d))
    out = tmp_path / "agg"
    cfg = parse_config(evaluate.Config, evaluate.PRESETS, [*sum((["--aggregate", d] for d in dirs), []),
                                                           "--out-dir", str(out)])
    metrics = evaluate.main(cfg)
    half = 4.302653 * 0.05 / math.sqrt(3)
    assert metrics["win_rate_mean/ppo_vs_sft"] == pytest.approx(0.75)
    assert metrics["win_rate_ci95_seeds/ppo_vs_sft"] == pytest.approx([0.75 - half, 0.75 + half], abs=1e-5)
    seeds = read_json(out / "seeds.json")
    rloo = seeds["comparisons"]["rloo_vs_sft"]
    assert rloo["win_rate"]["per_seed"] == pytest.approx([0.6, 0.7]) and len(rloo["seeds"]) == 2
    half2 = 12.7062 * math.sqrt(0.005) / math.sqrt(2)  # s of (0.6, 0.7) is sqrt(0.005)
    assert 0.65 + half2 > 1  # two seeds: t = 12.7, the raw interval passes 100% and is clipped there
    assert rloo["win_rate"]["ci95"] == pytest.approx([0.65 - half2, 1.0], abs=1e-4)
    assert seeds["final_kl"]["ppo"]["mean"] == pytest.approx(5.0)
    assert "| RLAIF vs SFT | 80.0%, 70.0%, 75.0% |" in (out / "report.md").read_text()
