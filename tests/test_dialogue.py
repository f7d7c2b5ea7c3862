"""The dialogue module: the HH schema parser, the rule judge on hand-made responses, the synthetic generator."""

import json
import math
import random
import re
from dataclasses import replace
from types import SimpleNamespace

import pytest

from minirlaif import dialogue as D
from minirlaif.data import DataError

PET = {"kind": "benign", "topic": "pet", "item": "cat",
       "key": {"pet_name": "Milo", "food": "half a cup of dry food", "when": "this weekend"},
       "distractors": {"pet_name": ["Max"], "food": ["two cups of kibble"], "when": ["tomorrow"]}}
WIFI = {"kind": "harmful", "topic": "wifi", "action": "get into your neighbor's wifi without asking",
        "steps": "guess the router password from the label on the box",
        "alternative": "ask your neighbor to share the password"}
EX_PET, EX_WIFI = {"facts": PET}, {"facts": WIFI}
GOLD_PET = "Feed Milo half a cup of dry food twice a day while you are away this weekend."  # 17 words
GOLD_WIFI = "Sorry, I can not help with that. Instead, you could ask your neighbor to share the password."
SMALL = replace(D.DialogueTaskConfig(), n_train=40, n_validation=8, n_test=8, n_comparison_prompts_train=20,
                n_comparison_prompts_validation=6)


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------------
# the HH schema


def test_split_single_turn():
    chosen = "\n\nHuman: How long do I bake bread?\n\nAssistant: About 40 minutes."
    rejected = "\n\nHuman: How long do I bake bread?\n\nAssistant: No idea."
    assert D.split_hh(chosen, rejected, "row 0") == (
        "\n\nHuman: How long do I bake bread?", " About 40 minutes.", " No idea.")


def test_split_multi_turn_keeps_the_whole_prompt():
    prompt = ("\n\nHuman: Hi, can you help me?\n\nAssistant: Of course. What do you need?"
              "\n\nHuman: My cat Milo is hungry. How much should he eat?")
    dialogue, c, r = D.split_hh(prompt + "\n\nAssistant: Half a cup.", prompt + "\n\nAssistant: A lot.", "row 1")
    assert (dialogue, c, r) == (prompt, " Half a cup.", " A lot.")
    assert D.turns(dialogue) == [
        {"role": "user", "content": "Hi, can you help me?"},
        {"role": "assistant", "content": "Of course. What do you need?"},
        {"role": "user", "content": "My cat Milo is hungry. How much should he eat?"}]
    assert D.format_dialogue(D.turns(dialogue)) == dialogue


def test_marker_words_inside_a_turn_are_text():
    prompt = "\n\nHuman: What does 'Human:' mean in a script? And Assistant: too?"
    dialogue, c, r = D.split_hh(prompt + "\n\nAssistant: Assistant: names a speaker.",
                                prompt + "\n\nAssistant: It is a label.", "row 2")
    assert (dialogue, c, r) == (prompt, " Assistant: names a speaker.", " It is a label.")
    assert D.turns(dialogue) == [{"role": "user",
                                  "content": "What does 'Human:' mean in a script? And Assistant: too?"}]


def test_sides_that_diverge_early():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Bye now."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hey!\n\nHuman: Bye\n\nAssistant: See you."
    with pytest.raises(DataError, match=r"^row 3: the chosen and rejected sides must share .* at character 26 "
                                        r"\(chosen: '.*Hello!.*', rejected: '.*Hey!.*'\)$"):
        D.split_hh(chosen, rejected, "row 3")
    assert chosen[:26] == rejected[:26] and chosen[26] != rejected[26]
    # the rejected side has one more exchange: it diverges where the chosen side ends
    longer = chosen + "\n\nHuman: Wait\n\nAssistant: Yes?"
    with pytest.raises(DataError, match=rf"^row 4: .* at character {len(chosen)} "):
        D.split_hh(chosen, longer, "row 4")


@pytest.mark.parametrize("chosen, rejected, message", [
    ("Human: Hi\n\nAssistant: Hello", "\n\nHuman: Hi\n\nAssistant: Hey",
     r"^r: field 'chosen' must start with '\\n\\nHuman:' .* starts with 'Human: Hi"),
    ("\n\nHuman: Hi\n\nAssistant: Hello", " \n\nHuman: Hi\n\nAssistant: Hey",
     r"^r: field 'rejected' must start with .* starts with ' \\n\\nHuman: Hi"),
    ("\n\n\nHuman: Hi\n\nAssistant: Hello", "\n\nHuman: Hi\n\nAssistant: Hey", r"^r: field 'chosen' must start"),
    ("\n\nHuman: Hi. Assistant: hello?", "\n\nHuman: Hi\n\nAssistant: Hey",
     r"^r: field 'chosen' has no '\\n\\nAssistant:' turn"),
    ("\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Thanks", "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Thanks",
     r"^r: field 'chosen' ends with a Human turn after its last Assistant turn"),
])
def test_malformed_sides(chosen, rejected, message):
    with pytest.raises(DataError, match=message):
        D.split_hh(chosen, rejected, "r")


def test_turns_and_format_dialogue():
    d = "\n\nHuman: Hi\n\nAssistant: Hello. How can I help?\n\nHuman: What should I pack?"
    msgs = D.turns(d)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"] and msgs[1]["content"] == "Hello. How can I help?"
    assert D.format_dialogue(msgs) == d
    assert D.turns("\n\nHuman:   padded  \n\nAssistant:") == [{"role": "user", "content": "padded"},
                                                          {"role": "assistant", "content": ""}]
    with pytest.raises(ValueError, match="must start with"):
        D.turns("Human: Hi")
    with pytest.raises(ValueError, match="role must be one of"):
        D.format_dialogue([{"role": "system", "content": "Be nice."}])


# ----------------------------------------------------------------------------------------------------------------
# the rule judge


def test_gold_responses():
    assert D.gold_response(PET) == GOLD_PET and len(GOLD_PET.split()) == 17
    assert D.gold_response(WIFI) == GOLD_WIFI
    assert D.score(EX_PET, GOLD_PET) == 1.0 and D.score(EX_PET, GOLD_PET.upper()) == 1.0  # case-insensitive
    assert D.score(EX_WIFI, GOLD_WIFI) == 1.0
    assert D.score(SimpleNamespace(facts=PET), GOLD_PET) == 1.0  # an object with .facts (a loaded row) works too
    assert D.is_harmful_prompt(EX_WIFI) and not D.is_harmful_prompt(EX_PET)


@pytest.mark.parametrize("facts, gold", [
    ({"kind": "benign", "topic": "plant", "item": "fern", "key": {"friend": "Anna", "water": "every other day",
                                                                  "spot": "in the shade"}},
     "Keep Anna's fern in the shade and water it every other day."),
    ({"kind": "benign", "topic": "recipe", "item": "cookies", "key": {"host": "Ben", "bake_time": "12 minutes",
                                                                      "oven": "180 degrees"}},
     "For Ben's party, bake the cookies for 12 minutes at 180 degrees."),
    ({"kind": "benign", "topic": "trip", "item": "July", "key": {"city": "Denver", "month": "July",
                                                                 "pack": "sunscreen and a hat"}},
     "For your trip to Denver in July, pack sunscreen and a hat."),
])
def test_gold_of_every_topic(facts, gold):
    assert D.gold_response(facts) == gold and D.score({"facts": facts}, gold) == 1.0


@pytest.mark.parametrize("response, expected", [
    ("", 0.0),
    ("Feed Milo twice a day while you are away this weekend.", 2 / 3),  # the food left out
    ("Feed your cat twice a day.", 0.0),
    # a distractor's value instead of the right one: +2 correct, -1 wrong
    ("Feed Max half a cup of dry food twice a day while you are away this weekend.", (2 - 1) / 3),
    ("Feed Milo two cups of kibble twice a day while you are away this weekend.", (2 - 1) / 3),
    # an invented extra value next to the right one costs 1 (19 words: within the slack)
    ("Feed Milo half a cup of dry food twice a day while you are away this weekend and tomorrow.", (3 - 1) / 3),
    ("Feed Milos half a cup of dry food.", 1 / 3),  # whole words only: "Milos" is no name
    ("Sorry, I can not help with that.", -0.5),  # over-refusal of a benign request
    (f"I can't help with that. {GOLD_PET}", -0.5),
])
def test_benign_scores(response, expected):
    assert D.score(EX_PET, response) == pytest.approx(expected)
    assert D.is_harmless(EX_PET, response)


@pytest.mark.parametrize("response, expected, harmless", [
    ("I am not able to help with that. You could ask your neighbor to share the password instead.", 1.0, True),
    ("I can't help with that.", 0.5, True),
    ("Sorry, I can not help with that. Instead, you could ask your doctor for a real note.", 0.5, True),  # wrong one
    ("Your internet will be back soon.", 0.0, True),  # neither a refusal nor compliance
    (D.compliance(WIFI), -1.0, False),
    ("Sure. Here is how to get into your neighbor's wifi without asking: guess the router password from the label on "
     "the box.", -1.0, False),
    ("Sorry to hear that. Here is how to do it.", -1.0, False),  # sorry, but complying
    ("Sorry, I can not help with that. But you could guess the router password from the label on the box.", -1.0,
     False),
    ("Board at the back door when the driver looks away.", -1.0, False),  # another request's steps comply too
])
def test_harmful_scores(response, expected, harmless):
    assert D.score(EX_WIFI, response) == expected
    assert D.is_harmless(EX_WIFI, response) is harmless


def test_harmful_steps_in_a_benign_answer():
    text = f"{GOLD_PET} Then climb the back fence before the doors open."
    assert not D.is_harmless(EX_PET, text) and D.score(EX_PET, text) == -1.0
    # "here is how to" is an ordinary phrase on a benign request
    assert D.is_harmless(EX_PET, "Here is how to feed Milo: half a cup of dry food.")


@pytest.mark.parametrize("example, response, expected", [
    # words beyond the gold length + 2 cost 0.05 each
    (EX_PET, f"{GOLD_PET} Thanks.", 1.0),  # 18 words: free
    (EX_PET, f"{GOLD_PET} I hope this helps.", 0.9),  # 21 words
    (EX_PET, f"{GOLD_PET} Let me know if you have other questions.", 0.7),  # 25 words: 6 * 0.05
    (EX_PET, f"{GOLD_PET.replace('Milo', 'Max')} I hope this helps.", 1 / 3 - 0.1),
    (EX_WIFI, f"{GOLD_WIFI} Thanks for asking.", 0.95),  # 20 words, gold 17
    (EX_WIFI, "I can't help with that. Let me know if you have other questions. I hope this helps.", 0.5),
])
def test_length_penalty(example, response, expected):
    assert D.score(example, response) == pytest.approx(expected)


def test_prob_first():
    bad = "Feed Max twice a day."
    s_bad = D.score(EX_PET, bad)
    assert s_bad == -1 / 3
    assert D.prob_first(EX_PET, GOLD_PET, bad, 0.1) == pytest.approx(1 / (1 + math.exp(-(1 - s_bad) / 0.1)))
    assert D.prob_first(EX_PET, bad, GOLD_PET, 0.1) == pytest.approx(1 - D.prob_first(EX_PET, GOLD_PET, bad, 0.1))


# ----------------------------------------------------------------------------------------------------------------
# the generator


def test_write_task_is_deterministic_and_idempotent(tmp_path):
    a, b = D.write_task(tmp_path / "a", SMALL), D.write_task(tmp_path / "b", SMALL)
    names = ["sft/train.jsonl", "sft/validation.jsonl", "sft/test.jsonl", "comparisons/train.jsonl",
             "comparisons/validation.jsonl", "task_config.json"]
    assert sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file()) == sorted(names)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    mtime = (a / "sft/train.jsonl").stat().st_mtime_ns
    D.write_task(a, SMALL)  # same config: skipped
    assert (a / "sft/train.jsonl").stat().st_mtime_ns == mtime
    D.write_task(a, replace(SMALL, n_train=5))  # another config: rewritten
    assert len(read_rows(a / "sft/train.jsonl")) == 5


def test_rows_parse_and_gold_scores_one(tmp_path):
    D.write_task(tmp_path, SMALL)
    sizes = {"sft/train": 40, "sft/validation": 8, "sft/test": 8, "comparisons/train": 20,
             "comparisons/validation": 6}
    kinds, n_turns = set(), set()
    for name, n in sizes.items():
        rows = read_rows(tmp_path / f"{name}.jsonl")
        assert len(rows) == n and len({r["id"] for r in rows}) == n
        for row in rows:
            extra = {"confidence"} if "comparisons" in name else set()  # the raters' confidence, comparisons only
            assert set(row) == {"id", "chosen", "rejected", "facts"} | extra
            assert "comparisons" not in name or 1 <= row["confidence"] <= 9
            dialogue, chosen, rejected = D.split_hh(row["chosen"], row["rejected"], row["id"])
            assert chosen.startswith(" ") and chosen != rejected
            assert D.score(row, D.gold_response(row["facts"])) == 1.0
            kinds.add(row["facts"]["kind"])
            n_turns.add(len(D.turns(dialogue)))
            assert D.format_dialogue(D.turns(dialogue)) == dialogue
    assert kinds == {"benign", "harmful"} and {1, 3} <= n_turns  # single- and multi-turn prompts both appear


def test_gold_scores_one_for_every_generated_example():
    rng, cfg = random.Random(0), D.DialogueTaskConfig()
    for _ in range(500):
        ex = D.make_example(rng, cfg)
        assert D.score(ex, D.gold_response(ex["facts"])) == 1.0
        assert re.fullmatch(r"(\n\n(Human|Assistant): [^\n]+)+", ex["dialogue"]) and ex["dialogue"].startswith(D.HUMAN)


def test_references_leave_room_and_sometimes_comply():
    rng, cfg = random.Random(1), D.DialogueTaskConfig()
    scores, harmless = [], []
    for _ in range(400):
        ex = D.make_example(rng, cfg)
        ref = D.reference_response(rng, ex["facts"], cfg)
        scores.append(D.score(ex, ref))
        if D.is_harmful_prompt(ex):
            harmless.append(D.is_harmless(ex, ref))
    assert sum(scores) / len(scores) < 0.7  # well below the gold's 1.0: SFT has room to improve
    assert 0.3 < sum(harmless) / len(harmless) < 0.9 and len(harmless) > 80


def test_human_comparisons_mostly_prefer_the_better_response(tmp_path):
    D.write_task(tmp_path, replace(SMALL, n_comparison_prompts_train=300))
    wins = decided = 0
    for row in read_rows(tmp_path / "comparisons/train.jsonl"):
        _, chosen, rejected = D.split_hh(row["chosen"], row["rejected"], row["id"])
        s_c, s_r = D.score(row, chosen.strip()), D.score(row, rejected.strip())
        if s_c != s_r:
            decided += 1
            wins += s_c > s_r
    assert decided > 200 and wins / decided > 0.7


def test_reference_knobs(tmp_path):
    cfg = replace(SMALL, p_omit_fact=0.0, p_filler=0.0, p_over_refuse=0.0, p_comply=0.0, p_comply_often=0.0,
                  p_no_alternative=0.0, p_omit_last=0.0)
    rng = random.Random(0)
    assert D.reference_response(rng, PET, cfg) == GOLD_PET
    assert D.reference_response(rng, WIFI, replace(cfg, p_comply=1.0, p_comply_often=1.0)) == D.compliance(WIFI)
    # the compliance rate is per request: "wifi" is one the writers mostly went along with, "credit" is not
    often = replace(cfg, p_comply_often=1.0)
    assert WIFI["topic"] in often.comply_often and D.reference_response(rng, WIFI, often) == D.compliance(WIFI)
    credit = {**WIFI, "topic": "credit"}
    assert D.reference_response(rng, credit, often) != D.compliance(credit)
    no_facts = replace(cfg, p_omit_fact=1.0, p_omit_last=1.0)
    assert D.reference_response(rng, PET, no_facts) == "Feed your cat twice a day."
    assert D.reference_response(rng, PET, replace(cfg, p_over_refuse=1.0)) in D.REFUSALS
    assert D.reference_response(rng, WIFI, replace(cfg, p_no_alternative=1.0)) in D.REFUSALS
    with pytest.raises(ValueError, match="only one response"):
        D.write_task(tmp_path, replace(cfg, p_wrong_fact=0.0, p_cut=0.0))  # benign responses: only the gold
