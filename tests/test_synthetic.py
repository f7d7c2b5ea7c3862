"""The synthetic TL;DR task: determinism, the rule judge's scores, the pairwise judge, file schemas."""

import json
import math
import random

import pytest

from minirlaif import synthetic
from minirlaif.data import load_comparisons, load_posts

FACTS = {"poster_age": 24, "poster_gender": "F", "relation": "boyfriend", "other_age": 26, "other_gender": "M",
         "duration": 3, "unit": "years", "event": "lied about money", "ask": "should I leave",
         "distractors": {"relations": ["sister"], "events": ["crashed my car"], "people": [[31, "F"]],
                         "durations": [[5, "years"]]}}
EX = {"facts": FACTS}


def test_gold_summary_text_and_score():
    gold = synthetic.gold_summary(FACTS)
    assert gold == "My boyfriend (26M) of 3 years lied about money. I am 24F. Should I leave?"
    assert synthetic.score(EX, gold) == 1.0


@pytest.mark.parametrize("summary, expected", [
    ("", 0.0),
    # 5 correct facts, poster's age left out
    ("My boyfriend (26M) of 3 years lied about money. Should I leave?", 5 / 6),
    # a distractor's age instead of the boyfriend's: -1 for the wrong one, +0 for the missing one
    ("My boyfriend (31F) of 3 years lied about money. I am 24F. Should I leave?", (5 - 1) / 6),
    # wrong relation and wrong event (both from distractor sentences)
    ("My sister (26M) of 3 years crashed my car. I am 24F. Should I leave?", (4 - 2) / 6),
    # a fact stated twice counts once
    ("My boyfriend (26M) of 3 years lied about money. I am 24F. I am 24F. Should I leave?", 1.0 - 0.05 * 1),
    # duration in months is a different duration; singular "year" parses
    ("My boyfriend of 3 months lied about money.", (2 - 1) / 6),
])
def test_rule_judge_scores(summary, expected):
    assert synthetic.score(EX, summary) == pytest.approx(expected)


def test_length_penalty():
    gold = synthetic.gold_summary(FACTS)
    n_gold = len(gold.split())
    padded = gold + " " + " ".join(["word"] * 10)
    # 10 extra words, 2 free (slack), 0.05 each
    assert synthetic.score(EX, padded) == pytest.approx(1.0 - 0.05 * (10 - 2))
    assert len(padded.split()) == n_gold + 10


def test_pairwise_judge():
    good, bad = synthetic.gold_summary(FACTS), "My boyfriend lied about money."
    s_good, s_bad = synthetic.score(EX, good), synthetic.score(EX, bad)
    judge = synthetic.RuleJudge(temperature=0.1)
    expected = 1 / (1 + math.exp(-(s_good - s_bad) / 0.1))
    assert judge.prob_first(EX, good, bad) == pytest.approx(expected)
    assert judge.prob_first(EX, bad, good) == pytest.approx(1 - expected)
    assert judge.prob_first(EX, good, good) == 0.5
    biased = synthetic.RuleJudge(temperature=0.1, position_bias=2.0)
    assert biased.prob_first(EX, good, good) == pytest.approx(1 / (1 + math.exp(-2.0)))
    noisy = synthetic.RuleJudge(temperature=0.1, noise=1.0)
    a = [noisy.prob_first(EX, good, good, random.Random(3)) for _ in range(2)]
    assert a[0] == a[1] != 0.5  # seeded noise: reproducible, and really there


def test_generator_is_deterministic(tmp_path):
    cfg = synthetic.TaskConfig(n_train=50, n_validation=10, n_test=10, n_comparison_posts_train=10,
                               n_comparison_posts_validation=5)
    a, b = synthetic.write_task(tmp_path / "a", cfg), synthetic.write_task(tmp_path / "b", cfg)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jsonl"))
    assert len(files) == 5
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes()
    c = synthetic.write_task(tmp_path / "c", synthetic.TaskConfig(**{**cfg.__dict__, "seed": 7}))
    assert (c / "sft/train.jsonl").read_bytes() != (a / "sft/train.jsonl").read_bytes()


def test_files_load_through_the_real_loaders(tmp_path):
    cfg = synthetic.TaskConfig(n_train=40, n_validation=8, n_test=8, n_comparison_posts_train=6,
                               n_comparison_posts_validation=4)
    d = synthetic.write_task(tmp_path, cfg)
    posts, stats = load_posts(d / "sft", "train")
    assert len(posts) == 40 and stats.schema == "tldr"
    for p in posts:
        # every post states its key facts, and the reference is a TL;DR of it
        f = p.facts
        assert f"{f['other_age']}{f['other_gender']}" in p.post and f["event"] in p.post
        assert f["relation"] in p.summary and f["event"] in p.summary
        assert synthetic.score(p, synthetic.gold_summary(f)) == 1.0
    # references are of varied quality (writers leave facts out), never above gold
    ref_scores = [synthetic.score(p, p.summary) for p in posts]
    assert max(ref_scores) <= 1.0 and min(ref_scores) < 1.0
    comps, cstats = load_comparisons(d / "comparisons", "train")
    assert len(comps) == 6 * cfg.comparisons_per_post and cstats.schema == "comparisons"
    for c in comps:
        assert 1 <= c.confidence <= 9 and c.choice in (0, 1) and c.post.facts is not None
    # the simulated raters follow the judge: high-confidence choices agree with the rule scores
    sure = [c for c in comps if c.confidence >= 8]
    agree = [synthetic.score(c.post, c.summaries[c.choice]) > synthetic.score(c.post, c.summaries[1 - c.choice])
             for c in sure]
    assert sure and all(agree)
    raw = json.loads((d / "comparisons/train.jsonl").read_text().splitlines()[0])
    assert set(raw) == {"info", "summaries", "choice", "worker", "batch", "split", "extra"}
