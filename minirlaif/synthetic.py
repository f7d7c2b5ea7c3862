"""The offline synthetic TL;DR task: the `tiny` preset's data, its "human" labels and its gold judge.

Each example has latent facts (who the post is about, what they did, where or when, since when the poster has
known them, what the poster asks). A seeded generator writes a Reddit-style post that states those facts among
distractor sentences (other people, events, places and times), a gold summary that states the key facts briefly,
and a human reference summary. Like real TL;DRs, references are of varied quality (most writers leave out where it
happened and since when, many end with a filler sentence), so a policy that imitates them (SFT) is imperfect in
ways that preferences can fix. Every fact is a phrase from a closed list, so a tiny model can learn to copy it in
a minute, and the rule judge can read it back out of free text. The files use the hub datasets' schemas plus a
`facts` column for the rule judge, so the loaders in `minirlaif.data` read them through the real-data code path.

The rule judge scores a summary by the facts it states: each correct fact +1, each wrong or invented fact -1
(over the 5 key facts), minus a penalty for words beyond the gold length. Gold summaries score exactly 1.0. The
pairwise judge turns two scores into P(first better) = sigmoid((s1 - s2) / temperature + position_bias + noise),
which makes it usable as a soft AI labeler (with knobs to simulate a noisy or position-biased one) and, with no
noise and no bias, as the gold judge of evaluate.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

# ----------------------------------------------------------------------------------------------------------------
# vocabularies (closed sets, so the judge can read facts back out of free text)

RELATIONS = {  # relation -> fixed gender, or None when either is possible
    "boyfriend": "M", "girlfriend": "F", "husband": "M", "wife": "F", "brother": "M", "sister": "F",
    "mom": "F", "dad": "M", "best friend": None, "roommate": None, "coworker": None, "boss": None,
    "neighbor": None, "cousin": None,
}
EVENTS = [
    "lied about money", "cheated on me", "forgot my birthday", "read my texts", "crashed my car",
    "ignored my calls", "posted our photos online", "invited an ex to dinner", "skipped our vacation",
    "yelled at my friends", "broke my laptop", "adopted a dog without asking", "quit without telling me",
    "moved out suddenly", "lied to my parents", "sold my guitar",
]
SETTINGS = [
    "at a party", "over text", "in front of my parents", "at work", "on my birthday", "during a road trip",
    "at dinner", "on the phone",
]
SINCES = [
    "since high school", "since college", "since we were kids", "for a few months", "for a couple of weeks",
    "for about a year", "for almost a decade", "since last summer",
]
ASKS = [
    "should I leave", "am I overreacting", "how do I talk about it", "should I forgive them",
    "what do I do now", "should I ask for the money back", "is this normal", "how do I move on",
]
SUBREDDITS = ["relationships", "relationship_advice", "AskReddit", "tifu", "offmychest", "Advice"]
JOBS = ["nurse", "teacher", "barista", "student", "cashier", "programmer", "driver", "cook"]
PETS = ["cat", "dog", "rabbit", "parrot", "hamster"]
PET_NAMES = ["Milo", "Luna", "Pepper", "Max", "Olive", "Biscuit", "Nala", "Rocky"]
CITIES = ["Denver", "Boston", "Austin", "Seattle", "Chicago", "Portland", "Miami", "Toronto"]
FILLER = [
    "this has been going on for a while now", "i really do not know what to think anymore",
    "anyway thanks for reading all of this", "it is a long story but that is the gist",
    "we will see what happens next i guess",
]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


# ----------------------------------------------------------------------------------------------------------------
# generator


@dataclass
class TaskConfig:
    """Knobs of the synthetic task (difficulty and sizes)."""
    seed: int = 1234
    n_train: int = 8000          # SFT train posts
    n_validation: int = 400      # SFT validation posts (evaluation prompts)
    n_test: int = 400            # SFT test posts
    n_comparison_posts_train: int = 3000   # posts in the human-comparisons train split (label.py's posts)
    n_comparison_posts_validation: int = 2400  # their validation split: the RMs' held-out human test set (674
    #                                          of confidence >= 8: a 95% CI of about +-3.4 points on accuracy)
    comparisons_per_post: int = 1
    min_distractors: int = 1     # distractor sentences per post (other people, events, places and times)
    max_distractors: int = 3
    human_temperature: float = 0.15   # temperature of the simulated human raters' choice
    p_omit_setting: float = 0.55  # reference-summary writers: P(leave out where/when it happened)
    p_omit_since: float = 0.55   # P(leave out "We have been close since ...")
    p_filler: float = 0.55       # P(end with a filler sentence)
    p_wrong_fact: float = 0.05   # human-comparison summaries: P(a key fact is wrong), per fact (the tiny SFT
    #                              policy's samples at temperature 1 get about 5% of facts wrong)
    p_cut: float = 0.08          # P(the summary is cut off)
    version: int = 5             # bump when the generator changes, so cached files are rebuilt


def sample_facts(rng: random.Random) -> dict:
    return {"relation": rng.choice(sorted(RELATIONS)), "event": rng.choice(EVENTS), "setting": rng.choice(SETTINGS),
            "since": rng.choice(SINCES), "ask": rng.choice(ASKS)}


def gold_summary(facts: dict) -> str:
    """The ideal summary: every key fact, nothing else (the rule judge scores it exactly 1.0)."""
    return write_summary(facts)


def write_summary(facts: dict, setting: bool = True, since: bool = True, filler: str = "") -> str:
    """A summary in the task's TL;DR style, optionally leaving facts out or adding a filler sentence."""
    f = facts
    text = f"My {f['relation']} {f['event']}" + (f" {f['setting']}" if setting else "") + "."
    text += (f" We have been close {f['since']}." if since else "") + f" {_cap(f['ask'])}?"
    return text + (f" {filler}" if filler else "")


def reference_summary(rng: random.Random, facts: dict, style: "TaskConfig") -> str:
    """The dataset's human-written TL;DR: like real ones, of varied quality.

    Most writers leave out where it happened and since when, and many end with a filler sentence, so the
    references (which SFT imitates) score below the gold summary, and a policy trained on preferences has room to
    beat them.
    """
    setting, since = rng.random() >= style.p_omit_setting, rng.random() >= style.p_omit_since
    filler = _cap(rng.choice(FILLER)) + "." if rng.random() < style.p_filler else ""
    return write_summary(facts, setting=setting, since=since, filler=filler)


def _distractors(rng: random.Random, facts: dict, lo: int, hi: int) -> tuple[list[str], dict]:
    """Sentences about other people, events, places and times, so copying the right ones takes reading."""
    other = lambda vocab, key: rng.choice([v for v in vocab if v != facts[key]])  # noqa: E731
    used = {"relations": [], "events": [], "settings": [], "sinces": []}

    def person():
        rel = other(RELATIONS, "relation")
        used["relations"].append(rel)
        return rng.choice([f"My {rel}, who is {rng.randint(16, 70)}, says I should just wait.",
                           f"I have not told my {rel} about any of this yet."])

    def event():
        rel, ev, where = other(RELATIONS, "relation"), other(EVENTS, "event"), other(SETTINGS, "setting")
        used["relations"].append(rel)
        used["events"].append(ev)
        used["settings"].append(where)
        return f"My {rel} once {ev} {where}, but that was a different story."

    def place():
        since = other(SINCES, "since")
        used["sinces"].append(since)
        return f"I have lived in {rng.choice(CITIES)} {since}."

    makers = [person, event, place,
              lambda: f"I work as a {rng.choice(JOBS)} so I am busy most days.",
              lambda: f"We have a {rng.choice(PETS)} called {rng.choice(PET_NAMES)}.",
              lambda: "It has been a long week and I can not sleep."]
    return [rng.choice(makers)() for _ in range(rng.randint(lo, hi))], used


def make_example(rng: random.Random, cfg: "TaskConfig") -> dict:
    """One post: facts -> intro, event and ask sentences with distractors between them."""
    f = facts = sample_facts(rng)
    intro = rng.choice([
        f"My {f['relation']} and I have known each other {f['since']}.",
        f"I have been close with my {f['relation']} {f['since']}.",
        f"Some background: my {f['relation']} and I have been friends {f['since']}.",
    ])
    happened = rng.choice([
        f"Last week {f['setting']} my {f['relation']} {f['event']}.",
        f"Yesterday my {f['relation']} {f['event']} {f['setting']} and did not even say sorry.",
        f"A few days ago, {f['setting']}, my {f['relation']} {f['event']}.",
    ])
    ask = rng.choice([f"So Reddit, {f['ask']}?", f"{_cap(f['ask'])}?", f"Honestly, {f['ask']}?"])
    distract, used = _distractors(rng, facts, cfg.min_distractors, cfg.max_distractors)
    # intro before the event, the ask last; distractors anywhere before the ask
    body = [intro, happened]
    for d in distract:
        body.insert(rng.randint(0, len(body)), d)
    sentences = body + [ask]
    post = " ".join(sentences) if rng.random() < 0.5 else "\n".join(sentences)  # some posts have newlines
    title = rng.choice([f"My {f['relation']} {f['event']}", f"Need advice about my {f['relation']}",
                        "Not sure what to do", f"{_cap(f['ask'])}?"])
    facts["distractors"] = used
    return {"subreddit": rng.choice(SUBREDDITS), "title": title, "post": post,
            "summary": reference_summary(rng, facts, cfg), "facts": facts}


# ----------------------------------------------------------------------------------------------------------------
# the rule judge

KEY_FACTS = {"relation": RELATIONS, "event": EVENTS, "setting": SETTINGS, "since": SINCES, "ask": ASKS}


def _found(text: str, phrases) -> set[str]:
    low = text.lower()
    return {p for p in phrases if re.search(r"\b" + re.escape(p.lower()) + r"\b", low)}


def score(example, summary: str, length_slack: int = 2, length_penalty: float = 0.05) -> float:
    """Rule-judge score of `summary` for `example` (a Post or dict with `facts`): gold scores 1.0.

    (#correct key facts - #wrong or invented facts) / 5, minus `length_penalty` per word beyond the gold
    summary's length + `length_slack`. A fact stated twice counts once; every distinct wrong value counts.
    """
    f = example["facts"] if isinstance(example, dict) else example.facts
    correct = wrong = 0
    for key, vocab in KEY_FACTS.items():
        hits = _found(summary, vocab)
        correct += f[key] in hits
        wrong += len(hits - {f[key]})
    n_words, n_gold = len(summary.split()), len(gold_summary(f).split())
    penalty = length_penalty * max(0, n_words - n_gold - length_slack)
    return (correct - wrong) / len(KEY_FACTS) - penalty


@dataclass
class RuleJudge:
    """Pairwise judge on rule scores: P(first better) = sigmoid((s1 - s2) / temperature + bias + noise).

    `position_bias` is an added logit toward the summary shown first (negative: toward the second); `noise` is the
    std of Gaussian noise on the logit, drawn from the generator passed in (seeded by the caller). With both 0 this
    is the gold judge.
    """
    temperature: float = 0.1
    position_bias: float = 0.0
    noise: float = 0.0
    score: object = None  # the rule score (example, text) -> float; None: this task's `score` (the dialogue task's
    #                       judge plugs in here)

    def prob_first(self, example, first: str, second: str, rng: random.Random | None = None) -> float:
        s = self.score or score
        logit = (s(example, first) - s(example, second)) / self.temperature + self.position_bias
        if self.noise > 0:
            logit += (rng or random).gauss(0.0, self.noise)
        return 1.0 / (1.0 + math.exp(-max(min(logit, 60.0), -60.0)))


# ----------------------------------------------------------------------------------------------------------------
# summaries of varied quality, for the simulated human comparisons


def policy_sample(rng: random.Random, facts: dict, style: "TaskConfig") -> tuple[str, str]:
    """A summary like the ones a policy writes: reference style, sometimes a wrong fact or a cut-off end.

    The real human comparisons compare samples of the policies OpenAI trained, so ours compare summaries with the
    errors such models make: each key fact is, with probability `style.p_wrong_fact`, one copied from a distractor
    sentence (or made up), and with probability `style.p_cut` the summary stops early. Returns (text, the edits).
    """
    f = {k: v for k, v in facts.items() if k != "distractors"}
    d, edits = facts["distractors"], []
    for key, vocab in KEY_FACTS.items():
        if rng.random() < style.p_wrong_fact:  # a value from a distractor sentence when there is one, else any
            f[key] = rng.choice(d.get(key + "s") or [v for v in vocab if v != f[key]])
            edits.append(f"wrong_{key}")
    text = reference_summary(rng, f, style)
    if rng.random() < style.p_cut:
        words = text.split()
        text = " ".join(words[: rng.randint(3, len(words) - 2)])
        edits.append("cut")
    # a wrong value the writer left out (or the cut removed) is no error in the text: name only what it shows
    edits = [e for e in edits if e == "cut" or _found(text, [f[e[len("wrong_"):]]])]
    return text, "+".join(edits) or "reference"


def make_comparisons(rng: random.Random, example: dict, split: str, post_id: str, cfg: "TaskConfig") -> list[dict]:
    """`n` human comparisons of one post in the openai/summarize_from_feedback `comparisons` schema."""
    rows = []
    for _ in range(cfg.comparisons_per_post):
        (s0, pol0), (s1, pol1) = policy_sample(rng, example["facts"], cfg), policy_sample(rng, example["facts"], cfg)
        for _ in range(100):  # a second, different summary (bounded: some configs allow only one text)
            if s1 != s0:
                break
            s1, pol1 = policy_sample(rng, example["facts"], cfg)
        else:
            raise ValueError("policy_sample gives only one summary for this config; raise p_wrong_fact, p_cut, "
                             "p_filler or move p_omit_* away from 0 and 1")
        p0 = RuleJudge(temperature=cfg.human_temperature).prob_first(example, s0, s1)
        choice = 0 if rng.random() < p0 else 1  # raters are noisy: they follow the judge's probability
        p_chosen = p0 if choice == 0 else 1 - p0
        confidence = 1 + round(8 * max(0.0, 2 * p_chosen - 1))  # 9: sure; 1: a coin flip or against the judge
        rows.append({
            "info": {"id": post_id, "post": example["post"], "title": example["title"],
                     "subreddit": example["subreddit"], "site": None, "article": None, "facts": example["facts"]},
            "summaries": [{"text": s0, "policy": pol0, "note": None}, {"text": s1, "policy": pol1, "note": None}],
            "choice": choice, "worker": f"w{rng.randint(0, 19)}", "batch": f"synthetic_{split}", "split": split,
            "extra": {"confidence": confidence},
        })
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    """JSON Lines through a temp file of this process's own: every torchrun rank may write a task at once (the same
    bytes), and a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def write_stamped(data_dir: str | Path, cfg, write_files) -> Path:
    """A synthetic task's files (this one's and minirlaif.dialogue's): skipped when data_dir's stamp holds exactly
    `cfg`; else `write_files(data_dir, rng)` with the config's seeded RNG, then the stamp, written last and
    atomically, so a kill before it redoes the task."""
    data_dir = Path(data_dir)
    stamp = data_dir / "task_config.json"
    want = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as the stamp reads back (a tuple is a list there)
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return data_dir
    write_files(data_dir, random.Random(cfg.seed))
    tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(want, indent=2) + "\n")
    os.replace(tmp, stamp)
    return data_dir


def write_task(data_dir: str | Path, cfg: TaskConfig = TaskConfig()) -> Path:
    """Write the task's files (idempotent: skipped when data_dir already holds this exact config).

    data_dir/sft/{train,validation,test}.jsonl          rows: id, subreddit, title, post, summary, facts
    data_dir/comparisons/{train,validation}.jsonl       openai/summarize_from_feedback `comparisons` rows
    """
    def write_files(data_dir: Path, rng: random.Random) -> None:
        for split, n in (("train", cfg.n_train), ("validation", cfg.n_validation), ("test", cfg.n_test)):
            rows = []
            for i in range(n):
                ex = make_example(rng, cfg)
                rows.append({"id": f"syn-{split}-{i:06d}", **ex})
            write_rows(data_dir / "sft" / f"{split}.jsonl", rows)
        for split, n in (("train", cfg.n_comparison_posts_train), ("validation", cfg.n_comparison_posts_validation)):
            rows = []
            for i in range(n):
                ex = make_example(rng, cfg)
                rows += make_comparisons(rng, ex, split, f"syn-cmp-{split}-{i:06d}", cfg)
            write_rows(data_dir / "comparisons" / f"{split}.jsonl", rows)

    return write_stamped(data_dir, cfg, write_files)
