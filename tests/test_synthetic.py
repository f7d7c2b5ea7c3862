"""The synthetic TL;DR task (v3): rule-judge scores, the pairwise judge, summaries, determinism, file schemas."""

import itertools
import json
import math
import random
from dataclasses import replace

import pytest

from minirlaif import synthetic
from minirlaif.data import load_comparisons, load_posts

FACTS = {"relation": "wife", "event": "quit without telling me", "setting": "at dinner", "since": "since high school",
         "ask": "what do I do now",
         "distractors": {"relations": ["sister"], "events": ["crashed my car"], "settings": ["at work"],
                         "sinces": ["since college"]}}
EX = {"facts": FACTS}
GOLD = "My wife quit without telling me at dinner. We have been close since high school. What do I do now?"  # 20 words
SMALL = replace(synthetic.TaskConfig(), n_train=40, n_validation=8, n_test=8, n_comparison_posts_train=10,
                n_comparison_posts_validation=4)


def test_gold_summary_text_and_score():
    assert synthetic.gold_summary(FACTS) == GOLD and len(GOLD.split()) == 20
    assert synthetic.score(EX, GOLD) == 1.0
    assert synthetic.score(EX, GOLD.lower()) == 1.0  # facts are read case-insensitively


@pytest.mark.parametrize("summary, expected", [
    ("", 0.0),
    ("My wife quit without telling me. We have been close since high school. What do I do now?", 4 / 5),  # no setting
    ("My wife quit without telling me. What do I do now?", 3 / 5),  # the usual reference: no setting, no since
    # one wrong fact, a distractor's value: +4 correct, -1 wrong
    ("My wife quit without telling me at work. We have been close since high school. What do I do now?", (4 - 1) / 5),
    ("My sister quit without telling me at dinner. We have been close since high school. What do I do now?",
     (4 - 1) / 5),
    # an invented extra value next to the right one: every distinct wrong value costs 1
    ("My wife quit without telling me at dinner over text. What do I do now?", (4 - 1) / 5),
    # a fact stated twice counts once (20 words: no length penalty)
    ("My wife quit without telling me at dinner. My wife quit without telling me at dinner. What do I do now?", 4 / 5),
    ("My wifey quit without telling me.", 1 / 5),  # whole words only: "wifey" is no relation
])
def test_rule_judge_scores(summary, expected):
    assert synthetic.score(EX, summary) == expected


@pytest.mark.parametrize("summary, expected", [
    # words beyond the gold length (20) + 2 cost 0.05 each
    (f"{GOLD} Thanks all.", 1.0),  # 22 words: free
    (f"{GOLD} Thanks so much.", 0.95),  # 23 words
    (f"{GOLD} Anyway thanks for reading all of this.", 0.75),  # 27 words: 5 * 0.05
    (f"{GOLD.replace('at dinner', 'at work')} Anyway thanks for reading all of this.", 0.6 - 0.25),  # + a wrong fact
])
def test_length_penalty(summary, expected):
    assert synthetic.score(EX, summary) == pytest.approx(expected)


@pytest.mark.parametrize("knobs, expected", [
    ({"p_omit_setting": 0, "p_omit_since": 0, "p_filler": 0}, GOLD),
    ({"p_omit_setting": 1, "p_omit_since": 1, "p_filler": 0}, "My wife quit without telling me. What do I do now?"),
    ({"p_omit_setting": 0, "p_omit_since": 1, "p_filler": 0},
     "My wife quit without telling me at dinner. What do I do now?"),
])
def test_reference_summary_knobs(knobs, expected):
    assert synthetic.reference_summary(random.Random(0), FACTS, replace(SMALL, **knobs)) == expected
    with_filler = synthetic.reference_summary(random.Random(0), FACTS, replace(SMALL, **{**knobs, "p_filler": 1}))
    assert with_filler[len(expected):] in {f" {f[0].upper()}{f[1:]}." for f in synthetic.FILLER}


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_pairwise_judge():
    good, bad = GOLD, "My sister crashed my car. What do I do now?"
    s_good, s_bad = synthetic.score(EX, good), synthetic.score(EX, bad)
    assert (s_good, s_bad) == (1.0, (1 - 2) / 5)
    judge = synthetic.RuleJudge(temperature=0.1)
    assert judge.prob_first(EX, good, bad) == sigmoid((s_good - s_bad) / 0.1)
    assert judge.prob_first(EX, good, bad) + judge.prob_first(EX, bad, good) == pytest.approx(1.0, abs=1e-12)
    assert judge.prob_first(EX, good, good) == 0.5
    # position bias: an added logit toward the first summary, in either order
    biased = synthetic.RuleJudge(temperature=0.1, position_bias=0.7)
    assert biased.prob_first(EX, good, good) == sigmoid(0.7)
    assert biased.prob_first(EX, bad, good) == sigmoid((s_bad - s_good) / 0.1 + 0.7)
    # seeded logit noise: reproducible, really there, and exactly one gauss(0, noise) draw
    noisy = synthetic.RuleJudge(temperature=0.1, noise=1.0)
    a = [noisy.prob_first(EX, good, bad, random.Random(3)) for _ in range(2)]
    expected = sigmoid((s_good - s_bad) / 0.1 + random.Random(3).gauss(0.0, 1.0))
    assert a[0] == a[1] == expected != judge.prob_first(EX, good, bad)
    # a near-zero temperature saturates instead of overflowing
    assert synthetic.RuleJudge(temperature=1e-9).prob_first(EX, bad, good) == sigmoid(-60.0)


def reference_variants(facts):
    fillers = [""] + [f"{f[0].upper()}{f[1:]}." for f in synthetic.FILLER]
    return {synthetic.write_summary(facts, setting=a, since=b, filler=c)
            for a, b, c in itertools.product([True, False], [True, False], fillers)}


def test_policy_sample_edits():
    rng, left_out = random.Random(0), 0
    for _ in range(20):
        text, edits = synthetic.policy_sample(rng, FACTS, replace(SMALL, p_wrong_fact=0.0, p_cut=0.0))
        assert edits == "reference" and text in reference_variants(FACTS)
        assert all(synthetic._found(text, vocab) <= {FACTS[k]} for k, vocab in synthetic.KEY_FACTS.items())
        text, edits = synthetic.policy_sample(rng, FACTS, replace(SMALL, p_wrong_fact=1.0, p_cut=0.0))
        # every fact is wrong, but only the wrong values the text states are named (setting and since may be left out)
        stated = [k for k, vocab in synthetic.KEY_FACTS.items() if synthetic._found(text, vocab)]
        assert edits == "+".join(f"wrong_{k}" for k in stated) and {"relation", "event", "ask"} <= set(stated)
        left_out += len(stated) < 5
        for key, vocab in synthetic.KEY_FACTS.items():
            found = synthetic._found(text, vocab)
            assert FACTS[key] not in found and len(found) <= 1
            if key != "ask":  # wrong values are copied from the post's distractor sentences when there are some
                assert found <= set(FACTS["distractors"][key + "s"])
        # relation, event and ask are always stated, each wrong
        assert synthetic.score(EX, text) <= -3 / 5
        text, edits = synthetic.policy_sample(rng, FACTS, replace(SMALL, p_wrong_fact=0.0, p_cut=1.0))
        words, full = text.split(), [v.split() for v in reference_variants(FACTS)]  # a prefix, 2+ words short
        assert edits == "cut" and any(3 <= len(words) <= len(w) - 2 and w[:len(words)] == words for w in full)
    assert left_out > 0  # some wrong settings / sinces were left out of the text, and so not named


def test_a_config_with_one_possible_summary_fails_clearly(tmp_path):
    # a comparison needs two different summaries of a post: a clear error, not an endless loop
    one_text = replace(SMALL, p_wrong_fact=0.0, p_cut=0.0, p_omit_setting=0.0, p_omit_since=0.0, p_filler=0.0)
    with pytest.raises(ValueError, match="only one summary"):
        synthetic.write_task(tmp_path, one_text)


def test_generator_is_deterministic_and_cached(tmp_path):
    a, b = synthetic.write_task(tmp_path / "a", SMALL), synthetic.write_task(tmp_path / "b", SMALL)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert [str(f) for f in files] == ["comparisons/train.jsonl", "comparisons/validation.jsonl", "sft/test.jsonl",
                                       "sft/train.jsonl", "sft/validation.jsonl", "task_config.json"]
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes()
    c = synthetic.write_task(tmp_path / "c", replace(SMALL, seed=7))
    assert (c / "sft/train.jsonl").read_bytes() != (a / "sft/train.jsonl").read_bytes()
    # same config again: nothing is rewritten; a changed config rebuilds
    (a / "sft/train.jsonl").write_text("sentinel\n")
    synthetic.write_task(a, SMALL)
    assert (a / "sft/train.jsonl").read_text() == "sentinel\n"
    synthetic.write_task(a, replace(SMALL, n_train=41))
    assert len((a / "sft/train.jsonl").read_text().splitlines()) == 41
    assert json.loads((a / "task_config.json").read_text())["n_train"] == 41


def test_sft_files_solvable_and_load(tmp_path):
    d = synthetic.write_task(tmp_path, SMALL)
    posts, stats = load_posts(d / "sft", "train")
    assert len(posts) == 40 and stats.schema == "tldr" and posts[0].id == "syn-train-000000"
    first = json.loads((d / "sft/train.jsonl").read_text().splitlines()[0])
    assert (posts[0].facts, posts[0].summary, posts[0].post) == (first["facts"], first["summary"], first["post"])
    for p in posts:
        f, other = p.facts, p.facts["distractors"]
        assert p.post.rstrip().endswith("?") and p.subreddit in synthetic.SUBREDDITS
        for key, vocab in synthetic.KEY_FACTS.items():
            # the post states every key fact (solvable), and the only other values are the recorded distractors
            assert synthetic._found(p.post, vocab) == {f[key], *other.get(key + "s", [])}
            assert f[key] not in other.get(key + "s", [])
            # references leave facts out but never get one wrong
            assert synthetic._found(p.summary, vocab) <= {f[key]}
        assert synthetic.score(p, synthetic.gold_summary(f)) == 1.0
    # references are of varied quality, never above gold
    ref_scores = [synthetic.score(p, p.summary) for p in posts]
    assert max(ref_scores) <= 1.0 and min(ref_scores) < 1.0


def test_comparisons_schema_and_loader(tmp_path):
    d = synthetic.write_task(tmp_path, SMALL)
    raw = [json.loads(line) for line in (d / "comparisons/train.jsonl").read_text().splitlines()]
    assert len(raw) == 10 * SMALL.comparisons_per_post
    for r in raw:
        assert set(r) == {"info", "summaries", "choice", "worker", "batch", "split", "extra"}
        assert {"id", "post", "title", "subreddit"} <= set(r["info"]) and r["info"]["id"].startswith("syn-cmp-train-")
        assert [set(s) for s in r["summaries"]] == [{"text", "policy", "note"}] * 2
        assert r["summaries"][0]["text"] != r["summaries"][1]["text"]
        edits = {"reference", "cut", *(f"wrong_{k}" for k in synthetic.KEY_FACTS)}
        assert all(set(s["policy"].split("+")) <= edits for s in r["summaries"])
        assert r["choice"] in (0, 1) and isinstance(r["worker"], str)
        assert (r["batch"], r["split"]) == ("synthetic_train", "train")
        assert isinstance(r["extra"]["confidence"], int) and 1 <= r["extra"]["confidence"] <= 9
    comps, stats = load_comparisons(d / "comparisons", "train")
    assert len(comps) == len(raw) and stats.schema == "comparisons"
    for c, r in zip(comps, raw):
        assert c.post.facts == r["info"]["facts"] and c.summaries == tuple(s["text"] for s in r["summaries"])
        assert (c.choice, c.confidence, c.split) == (r["choice"], r["extra"]["confidence"], "train")
    # the simulated raters follow the judge: high-confidence choices agree with the rule scores
    sure = [c for c in comps if c.confidence >= 8]
    scores = [[synthetic.score(c.post, s) for s in c.summaries] for c in sure]
    assert sure and all(s[c.choice] > s[1 - c.choice] for c, s in zip(sure, scores))
