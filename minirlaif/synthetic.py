"""The offline synthetic TL;DR task: the `tiny` preset's data, its "human" labels and its gold judge.

Each example has latent facts (the poster's age and gender, a relation with their own age and gender, how long
they have known each other, what happened, what the poster asks). A seeded generator writes a Reddit-style post
that states those facts among distractor sentences (other people with ages, other events, other durations), and a
gold summary that states the key facts briefly. The files it writes use the hub datasets' schemas, plus a `facts`
column the rule judge reads, so the loaders in `minirlaif.data` read them through the same code path as real data.

The rule judge scores a summary by the facts it states: each correct fact +1, each wrong or invented fact -1
(over the 6 key facts), minus a penalty for words beyond the gold length. Gold summaries score exactly 1.0. The
pairwise judge turns two scores into P(first better) = sigmoid((s1 - s2) / temperature + position_bias + noise),
which makes it usable as a soft AI labeler (with knobs to simulate a noisy or position-biased one) and, with no
noise and no bias, as the gold judge of evaluate.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
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


def _duration(n: int, unit: str) -> str:
    return f"{n} {unit if n != 1 else unit[:-1]}"


def _person(age: int, gender: str) -> str:
    return f"({age}{gender})"


# ----------------------------------------------------------------------------------------------------------------
# generator


@dataclass
class TaskConfig:
    """Knobs of the synthetic task (difficulty and sizes)."""
    seed: int = 1234
    n_train: int = 8000          # SFT train posts
    n_validation: int = 400      # SFT validation posts (evaluation prompts)
    n_test: int = 400            # SFT test posts
    n_comparison_posts_train: int = 1200   # posts in the human-comparisons train split (label.py's posts)
    n_comparison_posts_validation: int = 400
    comparisons_per_post: int = 2
    min_distractors: int = 2     # distractor sentences per post (other people, events, numbers)
    max_distractors: int = 4
    human_temperature: float = 0.15   # temperature of the simulated human raters' choice
    p_omit_me: float = 0.4       # reference-summary writers: P(leave out "I am 24F.")
    p_omit_other_age: float = 0.3   # P(leave out the other person's age)
    p_omit_duration: float = 0.2    # P(leave out "of 3 years")
    p_filler: float = 0.3           # P(add a filler sentence)
    version: int = 1             # bump when the generator changes, so cached files are rebuilt


def sample_facts(rng: random.Random) -> dict:
    relation = rng.choice(sorted(RELATIONS))
    other_gender = RELATIONS[relation] or rng.choice("MF")
    unit = rng.choice(["years", "months"])
    return {
        "poster_age": rng.randint(16, 45), "poster_gender": rng.choice("MF"),
        "relation": relation, "other_age": rng.randint(16, 60), "other_gender": other_gender,
        "duration": rng.randint(1, 11), "unit": unit, "event": rng.choice(EVENTS), "ask": rng.choice(ASKS),
    }


def gold_summary(facts: dict) -> str:
    """The ideal summary: every key fact, nothing else (the rule judge scores it exactly 1.0)."""
    return write_summary(facts)


def write_summary(facts: dict, other_age: bool = True, duration: bool = True, me: bool = True,
                  filler: str = "") -> str:
    """A summary in the task's TL;DR style, optionally leaving facts out or adding a filler sentence."""
    f = facts
    text = (f"My {f['relation']}" + (f" {_person(f['other_age'], f['other_gender'])}" if other_age else "")
            + (f" of {_duration(f['duration'], f['unit'])}" if duration else "") + f" {f['event']}.")
    if me:
        text += f" I am {f['poster_age']}{f['poster_gender']}."
    text += f" {f['ask'][0].upper() + f['ask'][1:]}?"
    return text + (f" {filler}" if filler else "")


def reference_summary(rng: random.Random, facts: dict, style: "TaskConfig") -> str:
    """The dataset's human-written TL;DR: like real ones, of varied quality.

    Writers often leave out ages or the duration and sometimes add a filler sentence, so the references (which
    SFT imitates) score below the gold summary, and a policy trained on preferences has room to beat them.
    """
    filler = rng.choice(FILLER).capitalize() + "." if rng.random() < style.p_filler else ""
    return write_summary(facts, other_age=rng.random() >= style.p_omit_other_age,
                         duration=rng.random() >= style.p_omit_duration, me=rng.random() >= style.p_omit_me,
                         filler=filler)


def _distractors(rng: random.Random, facts: dict, lo: int, hi: int) -> tuple[list[str], dict]:
    """Sentences that mention other people, events and numbers, so copying the right ones takes reading."""
    others = [r for r in RELATIONS if r != facts["relation"]]
    used = {"relations": [], "events": [], "people": [], "durations": []}
    makers = []

    def person():
        rel = rng.choice(others)
        age, g = rng.randint(16, 70), RELATIONS[rel] or rng.choice("MF")
        used["relations"].append(rel)
        used["people"].append([age, g])
        return rng.choice([f"My {rel} {_person(age, g)} says I should just wait.",
                           f"I have not told my {rel} {_person(age, g)} about any of this yet."])

    def event():
        rel, ev = rng.choice(others), rng.choice([e for e in EVENTS if e != facts["event"]])
        used["relations"].append(rel)
        used["events"].append(ev)
        return f"My {rel} once {ev}, but that was a different story."

    def number():
        n, unit = rng.randint(1, 11), rng.choice(["years", "months"])
        used["durations"].append([n, unit])
        return f"{_duration(n, unit)} ago I moved to {rng.choice(CITIES)} for work."

    makers += [person, event, number,
               lambda: f"I work as a {rng.choice(JOBS)} so I am busy most days.",
               lambda: f"We have a {rng.choice(PETS)} called {rng.choice(PET_NAMES)}.",
               lambda: "It has been a long week and I can not sleep."]
    k = rng.randint(lo, hi)
    return [rng.choice(makers)() for _ in range(k)], used


def make_example(rng: random.Random, cfg: "TaskConfig") -> dict:
    """One post: facts -> intro, event and ask sentences with distractors between them."""
    facts = sample_facts(rng)
    f, me, them = facts, _person(facts["poster_age"], facts["poster_gender"]), \
        _person(facts["other_age"], facts["other_gender"])
    dur = _duration(f["duration"], f["unit"])
    intro = rng.choice([
        f"My {f['relation']} {them} and I {me} have known each other for {dur}.",
        f"I {me} have been close with my {f['relation']} {them} for {dur} now.",
        f"So I am {f['poster_age']}{f['poster_gender']} and my {f['relation']} is {f['other_age']}{f['other_gender']}, "
        f"and we go back {dur}.",
    ])
    happened = rng.choice([
        f"Last week I found out that my {f['relation']} {f['event']}.",
        f"Yesterday my {f['relation']} {f['event']} and did not even say sorry.",
        f"A few days ago my {f['relation']} {f['event']}.",
    ])
    ask = rng.choice([f"So Reddit, {f['ask']}?", f"{f['ask'][0].upper() + f['ask'][1:]}?",
                      f"Honestly, {f['ask']}?"])
    distract, used = _distractors(rng, facts, cfg.min_distractors, cfg.max_distractors)
    # intro before the event, the ask last; distractors anywhere before the ask
    body = [intro, happened]
    for d in distract:
        body.insert(rng.randint(0, len(body)), d)
    sentences = body + [ask]
    post = " ".join(sentences) if rng.random() < 0.5 else "\n".join(sentences)  # some posts have newlines
    title = rng.choice([f"My {f['relation']} {f['event']}", f"Need advice about my {f['relation']}",
                        "Not sure what to do", f"{f['ask'][0].upper() + f['ask'][1:]}?"])
    facts["distractors"] = used
    return {"subreddit": rng.choice(SUBREDDITS), "title": title, "post": post,
            "summary": reference_summary(rng, facts, cfg), "facts": facts}


# ----------------------------------------------------------------------------------------------------------------
# the rule judge

_AGE = re.compile(r"(\d+)\s*([MF])\b")
_DUR = re.compile(r"\b(\d+)\s+(year|month)s?\b", re.I)
_N_FACTS = 6  # poster age+gender, other age+gender, relation, duration, event, ask


def _found(text: str, phrases) -> set[str]:
    low = text.lower()
    return {p for p in phrases if re.search(r"\b" + re.escape(p.lower()) + r"\b", low)}


def score(example, summary: str, length_slack: int = 2, length_penalty: float = 0.05) -> float:
    """Rule-judge score of `summary` for `example` (a Post or dict with `facts`): gold scores 1.0.

    (#correct key facts - #wrong or invented facts) / 6, minus `length_penalty` per word beyond the gold
    summary's length + `length_slack`. A fact stated twice counts once; every distinct wrong value counts.
    """
    facts = example["facts"] if isinstance(example, dict) else example.facts
    f = facts
    correct = wrong = 0
    ages = {(int(a), g) for a, g in _AGE.findall(summary)}
    for person in [(f["poster_age"], f["poster_gender"]), (f["other_age"], f["other_gender"])]:
        correct += person in ages
    wrong += len(ages - {(f["poster_age"], f["poster_gender"]), (f["other_age"], f["other_gender"])})
    durations = {(int(n), u.lower()) for n, u in _DUR.findall(summary)}
    correct += (f["duration"], f["unit"][:-1]) in durations
    wrong += len(durations - {(f["duration"], f["unit"][:-1])})
    for key, vocab in (("relation", RELATIONS), ("event", EVENTS), ("ask", ASKS)):
        hits = _found(summary, vocab)
        correct += f[key] in hits
        wrong += len(hits - {f[key]})
    n_words, n_gold = len(summary.split()), len(gold_summary(f).split())
    penalty = length_penalty * max(0, n_words - n_gold - length_slack)
    return (correct - wrong) / _N_FACTS - penalty


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

    def prob_first(self, example, first: str, second: str, rng: random.Random | None = None) -> float:
        logit = (score(example, first) - score(example, second)) / self.temperature + self.position_bias
        if self.noise > 0:
            logit += (rng or random).gauss(0.0, self.noise)
        return 1.0 / (1.0 + math.exp(-max(min(logit, 60.0), -60.0)))


# ----------------------------------------------------------------------------------------------------------------
# summaries of varied quality, for the simulated human comparisons


def corrupt(rng: random.Random, facts: dict, style: "TaskConfig") -> tuple[str, str]:
    """A summary a writer or a model might produce: a reference-style draw with 0-3 errors.

    Errors are the ones small models make: a wrong value copied from a distractor sentence (or made up), or a
    summary cut short. Returns (text, a name of the edits) for the comparisons' `policy` field.
    """
    f = {k: v for k, v in facts.items() if k != "distractors"}
    d = facts["distractors"]
    ops = rng.sample(["wrong_age", "wrong_my_age", "wrong_rel", "wrong_event", "wrong_dur", "cut"],
                     k=rng.choice([0, 1, 1, 2, 2, 3]))
    if "wrong_age" in ops:
        f["other_age"], f["other_gender"] = rng.choice(d["people"]) if d["people"] else \
            (rng.randint(16, 70), rng.choice("MF"))
    if "wrong_my_age" in ops:
        f["poster_age"] = rng.choice([a for a in range(16, 46) if a != f["poster_age"]])
    if "wrong_rel" in ops:
        f["relation"] = rng.choice(d["relations"] or [r for r in RELATIONS if r != f["relation"]])
    if "wrong_event" in ops:
        f["event"] = rng.choice(d["events"] or [e for e in EVENTS if e != f["event"]])
    if "wrong_dur" in ops:
        f["duration"], f["unit"] = rng.choice(d["durations"]) if d["durations"] else \
            (rng.choice([n for n in range(1, 12) if n != f["duration"]]), f["unit"])
    text = reference_summary(rng, f, style)
    if "cut" in ops:
        words = text.split()
        text = " ".join(words[: rng.randint(3, len(words) - 2)])
    return text, "+".join(sorted(ops)) or "reference"


def make_comparisons(rng: random.Random, example: dict, split: str, post_id: str, cfg: "TaskConfig") -> list[dict]:
    """`n` human comparisons of one post in the openai/summarize_from_feedback `comparisons` schema."""
    rows = []
    for _ in range(cfg.comparisons_per_post):
        (s0, pol0), (s1, pol1) = corrupt(rng, example["facts"], cfg), corrupt(rng, example["facts"], cfg)
        while s1 == s0:
            s1, pol1 = corrupt(rng, example["facts"], cfg)
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


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def write_task(data_dir: str | Path, cfg: TaskConfig = TaskConfig()) -> Path:
    """Write the task's files (idempotent: skipped when data_dir already holds this exact config).

    data_dir/sft/{train,validation,test}.jsonl          rows: id, subreddit, title, post, summary, facts
    data_dir/comparisons/{train,validation}.jsonl       openai/summarize_from_feedback `comparisons` rows
    """
    data_dir = Path(data_dir)
    stamp = data_dir / "task_config.json"
    want = dataclasses.asdict(cfg)
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return data_dir
    rng = random.Random(cfg.seed)
    for split, n in (("train", cfg.n_train), ("validation", cfg.n_validation), ("test", cfg.n_test)):
        rows = []
        for i in range(n):
            ex = make_example(rng, cfg)
            rows.append({"id": f"syn-{split}-{i:06d}", **ex})
        _write_jsonl(data_dir / "sft" / f"{split}.jsonl", rows)
    for split, n in (("train", cfg.n_comparison_posts_train), ("validation", cfg.n_comparison_posts_validation)):
        rows = []
        for i in range(n):
            ex = make_example(rng, cfg)
            rows += make_comparisons(rng, ex, split, f"syn-cmp-{split}-{i:06d}", cfg)
        _write_jsonl(data_dir / "comparisons" / f"{split}.jsonl", rows)
    stamp.write_text(json.dumps(want, indent=2) + "\n")
    return data_dir
