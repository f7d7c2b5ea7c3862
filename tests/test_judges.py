"""minirlaif/judges.py: exact prompts, probabilities read from a real forward pass, order un-flipping, the
position-bias analysis, a position-biased rule labeler (the OpenAI-compatible client: tests/test_api_faults.py)."""

import json
import math
import random
from dataclasses import dataclass

import pytest
import torch
from transformers import GPT2LMHeadModel

from minirlaif import config, judges, labelers, synthetic
from minirlaif.judges import CHOICES, PromptSpec
from minirlaif.models import tiny_gpt2_config, train_bpe_tokenizer
from minirlaif.tasks import get_task
from minirlaif.reward import LabelerReward


@dataclass
class LabelCfg(labelers.LabelerConfig, judges.PromptConfig):
    """A pairwise labeler's whole config, as label.py and evaluate.py inherit it."""


ITEM = {"id": "p1", "subreddit": "relationships", "title": "My sister crashed my car",
        "post": "My sister (24F) crashed my car yesterday. Should I forgive her?",
        "summary_a": "My sister (24F) crashed my car. Should I forgive her?", "summary_b": "My car crashed."}
EXEMPLARS = [{"text": "T1", "summary_1": "good one", "summary_2": "bad one", "preferred": 1, "rationale": "R1."},
             {"text": "T2", "summary_1": "meh", "summary_2": "fine", "preferred": 2, "rationale": "R2."}]

BASE = ("Below is a text followed by two summaries of it. Decide which summary is better. Answer 1 if Summary 1 is "
        "better, or 2 if Summary 2 is better.")
DETAILED = (
    "A good summary is a short text that passes on the most important information of a longer text, so that "
    "someone who reads only the summary knows what the text is about and what its author wants. Summaries are "
    "judged on four qualities:\n"
    "Coherence: the summary is easy to follow and reads as one whole, not as a heap of loose pieces.\n"
    "Accuracy: everything the summary says is supported by the text; nothing is wrong, mixed up or invented.\n"
    "Coverage: the summary keeps the key points of the text (who is involved, what happened, what the author "
    "asks) and leaves out nothing essential.\n"
    "Overall quality: all of the above taken together: how useful the summary is to a reader who has not seen "
    "the text.\n"
    "You are given a text and two summaries of it. Answer 1 or 2 to say which summary is better in coherence, "
    "accuracy, coverage and overall quality as described above.")
SAMPLE = ("Text - SUBREDDIT: r/relationships\nTITLE: My sister crashed my car\n"
          "POST: My sister (24F) crashed my car yesterday. Should I forgive her?\n"
          "Summary 1 - My sister (24F) crashed my car. Should I forgive her?\n"
          "Summary 2 - My car crashed.\n")
COT = "Explain which summary is better, weighing the coherence, accuracy, coverage and overall quality of each.\n"


def prompt(preamble="base", exemplars=(), cot=False):
    return judges.build_prompt(judges.judge_text(ITEM), ITEM["summary_a"], ITEM["summary_b"], preamble, exemplars,
                               cot)


# ----------------------------------------------------------------------------------------------------------------
# prompts


def test_base_and_detailed_prompts_are_exact():
    assert prompt("base") == BASE + "\n\n" + SAMPLE + "Preferred Summary="
    assert prompt("detailed") == DETAILED + "\n\n" + SAMPLE + "Preferred Summary="


def test_cot_prompts_are_exact():
    first = prompt("base", cot=True)
    assert first == BASE + "\n\n" + SAMPLE + COT + "Rationale:"
    # the decoded rationale (with its own leading space and trailing newline) is appended, then the ending
    assert judges.cot_scoring_prompt(first, " Summary 1 is accurate.\n") == \
        BASE + "\n\n" + SAMPLE + COT + "Rationale: Summary 1 is accurate.\nPreferred Summary="


def test_few_shot_prompts_are_exact():
    assert prompt("base", EXEMPLARS) == (
        BASE + "\n\n"
        "Text - T1\nSummary 1 - good one\nSummary 2 - bad one\nPreferred Summary=1\n\n"
        "Text - T2\nSummary 1 - meh\nSummary 2 - fine\nPreferred Summary=2\n\n"
        + SAMPLE + "Preferred Summary=")
    assert prompt("base", EXEMPLARS[:1], cot=True) == (
        BASE + "\n\n"
        "Text - T1\nSummary 1 - good one\nSummary 2 - bad one\n" + COT + "Rationale: R1.\nPreferred Summary=1\n\n"
        + SAMPLE + COT + "Rationale:")


def test_shipped_exemplars_load():
    ex = judges.load_exemplars("", 3, cot=True)
    assert len(ex) == 3 and {e["preferred"] for e in ex} == {1, 2}
    with pytest.raises(ValueError, match="holds 3"):
        judges.load_exemplars("", 4)


# ----------------------------------------------------------------------------------------------------------------
# the hf labeler against a direct forward pass


@pytest.fixture(scope="module")
def tiny_lm():
    texts = ["Preferred Summary=1", "Preferred Summary=2", "Summary 1 - a", "Summary 2 - b", "1 2 1 2 21 12",
             prompt("base"), prompt("detailed")] * 20
    tok = train_bpe_tokenizer(texts, vocab_size=400)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config(tok, n_layer=2, n_head=2, n_embd=32, n_positions=1024)).eval()
    return model, tok


def direct_probs(model, tok, text):
    """P("1" or " 1") and P("2" or " 2") from one unpadded forward pass, at the prompt's last position."""
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([tok(text)["input_ids"]])).logits[0, -1].float(), -1)
    one = p[tok.convert_tokens_to_ids("1")] + p[tok.convert_tokens_to_ids("Ġ1")]
    two = p[tok.convert_tokens_to_ids("2")] + p[tok.convert_tokens_to_ids("Ġ2")]
    return (one / (one + two)).item(), (one + two).item()


def test_candidate_tokens_with_and_without_space(tiny_lm):
    _, tok = tiny_lm
    for c in CHOICES:
        ids = labelers.choice_token_ids(tok, c)
        assert len(set(ids)) == 2 and tok.unk_token_id not in ids
        assert sorted(ids) == sorted([tok.convert_tokens_to_ids(c), tok.convert_tokens_to_ids("Ġ" + c)])


def test_hf_probabilities_equal_a_direct_forward_pass(tiny_lm):
    model, tok = tiny_lm
    labeler = labelers.HFLabeler(model, tok, PromptSpec("base"), batch_size=4)
    # a batch of prompts of different lengths: left padding must not change what is read at the ending
    prompts = [prompt("base"), prompt("detailed"), prompt("base", EXEMPLARS)]
    got = labeler.choice_probs(prompts, CHOICES)
    for text, r in zip(prompts, got):
        p1, mass = direct_probs(model, tok, text)
        assert r["probs"][0] == pytest.approx(p1, abs=1e-5) and sum(r["probs"]) == pytest.approx(1.0)
        assert r["mass"] == pytest.approx(mass, rel=1e-4) and r["null_reason"] is None
    # through judge_pairs: A/B reads P(first) directly, B/A is un-flipped
    row = judges.judge_pairs(labeler, [ITEM])[0]
    p_ab, _ = direct_probs(model, tok, prompt("base"))
    p_ba, _ = direct_probs(model, tok, judges.build_prompt(judges.judge_text(ITEM), ITEM["summary_b"],
                                                           ITEM["summary_a"], "base"))
    assert row["p_a_ab"] == pytest.approx(p_ab, abs=1e-5)
    assert row["p_a_ba"] == pytest.approx(1 - p_ba, abs=1e-5)
    assert row["p_a"] == pytest.approx((p_ab + 1 - p_ba) / 2, abs=1e-5)


def test_hf_cot_decodes_greedily_then_scores_after_the_rationale(tiny_lm):
    model, tok = tiny_lm
    labeler = labelers.HFLabeler(model, tok, PromptSpec("base", cot=True, cot_max_tokens=5))
    first = prompt("base", cot=True)
    ids = tok(first)["input_ids"]
    with torch.no_grad():  # greedy decoding by hand, one token at a time
        for _ in range(5):
            nxt = model(torch.tensor([ids])).logits[0, -1].argmax().item()
            if nxt == tok.eos_token_id:
                break
            ids.append(nxt)
    rationale = tok.decode(ids[len(tok(first)["input_ids"]):])
    row = judges.judge_pairs(labeler, [ITEM], orders="ab")[0]
    assert row["rationale_ab"] == rationale
    p1, _ = direct_probs(model, tok, judges.cot_scoring_prompt(first, rationale))
    assert row["p_a_ab"] == pytest.approx(p1, abs=1e-5)


# self-consistency: K sampled rationales, each scored, the K distributions averaged


def test_self_consistency_k1_at_temperature_0_is_plain_cot_and_k3_greedy_averages_to_it(tiny_lm):
    model, tok = tiny_lm
    items = [ITEM, {**ITEM, "id": "p2", "summary_b": "Sister crashed car."}]
    plain = judges.judge_pairs(labelers.HFLabeler(model, tok, PromptSpec("base", cot=True, cot_max_tokens=5)), items)
    k1 = judges.judge_pairs(labelers.HFLabeler(model, tok, PromptSpec("base", cot=True, cot_max_tokens=5, sc_samples=1,
                                                                    sc_temperature=0.0, sc_top_k=40)), items)
    assert k1 == plain
    k3 = judges.judge_pairs(labelers.HFLabeler(model, tok, PromptSpec("base", cot=True, cot_max_tokens=5, sc_samples=3,
                                                                    sc_temperature=0.0)), items)
    for a, b in zip(plain, k3):
        assert b["rationale_ab"] == [a["rationale_ab"]] * 3 and b["p_a_samples_ab"] == pytest.approx([a["p_a_ab"]] * 3)
        assert b["p_a"] == pytest.approx(a["p_a"], abs=1e-6)
        assert b["usage"]["prompt_tokens"] == 3 * a["usage"]["prompt_tokens"]


class SampledStub:
    """An LM labeler whose k-th rationale of a pair is "r{k}" and whose P("1") after rationale "r{k}" is fixed, so
    the averaged label is known by hand. Records the seeds it was asked to sample with."""

    def __init__(self, p_first_of, k, temperature=0.7, seed=5):
        self.p_first_of, self.seed, self.usage, self.seeds = p_first_of, seed, {}, []
        self.spec = PromptSpec("base", cot=True, sc_samples=k, sc_temperature=temperature)

    def complete(self, prompts, max_tokens, temperature=0.0, top_k=0, seeds=None):
        assert temperature == self.spec.sc_temperature and top_k == 40
        self.seeds += seeds
        return [{"text": f"r{i % self.spec.sc_samples}"} for i in range(len(prompts))]  # query-major, K each

    def choice_probs(self, prompts, choices):
        ps = [self.p_first_of[int(p.rsplit(" r", 1)[1].split("\n")[0])] for p in prompts]
        return [{"probs": None if p is None else [p, 1 - p], "mass": 1.0,
                 "null_reason": None if p is not None else "unreadable"} for p in ps]

    def judge(self, queries):
        return judges.lm_judge(self, queries)


def test_self_consistency_averages_distributions_not_votes():
    # P(first) 0.9, 0.4, 0.4: the mean 0.567 prefers the first summary; a majority vote (2 of 3) would not
    (row,) = judges.judge_pairs(SampledStub([0.9, 0.4, 0.4], k=3), [ITEM])
    assert row["p_a_ab"] == pytest.approx(1.7 / 3) and row["p_a_ba"] == pytest.approx(1 - 1.7 / 3)
    assert row["p_a_samples_ab"] == pytest.approx([0.9, 0.4, 0.4])
    assert row["p_a_samples_ba"] == pytest.approx([0.1, 0.6, 0.6])  # un-flipped like p_a_ba
    assert row["rationale_ab"] == ["r0", "r1", "r2"] and row["p_a"] == pytest.approx(0.5)
    # an unreadable sample is left out of the mean; all unreadable is a null label with the reason
    (row,) = judges.judge_pairs(SampledStub([0.9, None, 0.6], k=3), [ITEM], orders="ab")
    assert row["p_a"] == pytest.approx(0.75) and row["p_a_samples_ab"] == [0.9, None, 0.6]
    (row,) = judges.judge_pairs(SampledStub([None, None], k=2), [ITEM], orders="ab")
    assert row["p_a"] is None and row["null_reason"] == "ab: none of the 2 samples readable: unreadable"
    with pytest.raises(ValueError, match="needs --cot"):
        labelers.make_labeler(LabelCfg(labeler="openai", api_model="m", sc_samples=4), seed=0)


def test_self_consistency_seeds_are_per_pair_order_and_sample(tiny_lm):
    stub = SampledStub([0.5] * 4, k=4)
    judges.judge_pairs(stub, [ITEM, {**ITEM, "id": "p2"}])
    q = {"id": "p2", "order": "ba"}
    assert stub.seeds[-1] == judges.rationale_seed(5, q, 3) and len(set(stub.seeds)) == 16
    model, tok = tiny_lm
    spec = PromptSpec("base", cot=True, cot_max_tokens=6, sc_samples=3, sc_temperature=1.0, sc_top_k=40)
    items = [ITEM, {**ITEM, "id": "p2", "summary_b": "Sister crashed car."}]
    rows = judges.judge_pairs(labelers.HFLabeler(model, tok, spec, batch_size=4, seed=1), items)
    assert judges.judge_pairs(labelers.HFLabeler(model, tok, spec, batch_size=4, seed=1), items) == rows  # a rerun
    # a resumed run labels only what is missing, in other batches: the same rows
    # (the rationales exactly; the probabilities up to float noise: padding changes the summation order)
    (alone,) = judges.judge_pairs(labelers.HFLabeler(model, tok, spec, batch_size=1, seed=1), items[1:])
    for key, value in rows[1].items():
        assert alone[key] == (pytest.approx(value, abs=1e-6) if key.startswith(("p_a", "mass")) else value), key
    assert len(set(rows[0]["rationale_ab"])) > 1  # sampled, not greedy
    other = judges.judge_pairs(labelers.HFLabeler(model, tok, spec, batch_size=4, seed=2), items)
    assert other[0]["rationale_ab"] != rows[0]["rationale_ab"]


def test_vllm_self_consistency_sends_one_seeded_top_k_sampling_request_per_rationale(tiny_lm, monkeypatch):
    """Against a stand-in `vllm` module (the real one needs a GPU): the rationale requests carry the sampling
    settings and each its own seed; the scoring requests stay greedy with logprobs."""
    import math
    import sys
    import types

    _, tok = tiny_lm
    calls = []

    class FakeLLM:
        def __init__(self, model, **kw):
            pass

        def get_tokenizer(self):
            return tok

        def generate(self, prompts, params, use_tqdm=False):
            calls.append(params)
            if isinstance(params, list):  # rationales: one text per prompt
                # VLLMLabeler decodes the token ids itself (as HFLabeler does)
                return [types.SimpleNamespace(outputs=[types.SimpleNamespace(
                    token_ids=tok(f"r{p.seed % 7}", add_special_tokens=False)["input_ids"])]) for p in params]
            one, two = tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("2")
            top = {one: types.SimpleNamespace(logprob=math.log(0.6)),
                   two: types.SimpleNamespace(logprob=math.log(0.2))}
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(logprobs=[top])]) for _ in prompts]

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = FakeLLM, lambda **kw: types.SimpleNamespace(**kw)
    platforms = types.ModuleType("vllm.platforms")  # generation.vllm_engine asks for the platform
    platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: False)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    spec = PromptSpec("base", cot=True, cot_max_tokens=9, sc_samples=3, sc_temperature=0.5)
    (row,) = judges.judge_pairs(labelers.VLLMLabeler("m", spec, seed=8), [ITEM], orders="ab")
    rationale_params, scoring_params = calls
    want = [judges.rationale_seed(8, {"id": "p1", "order": "ab"}, k) for k in range(3)]
    assert [p.seed for p in rationale_params] == want
    assert all((p.temperature, p.top_k, p.max_tokens) == (0.5, 40, 9) for p in rationale_params)
    assert scoring_params.temperature == 0.0 and scoring_params.max_tokens == 1
    assert row["rationale_ab"] == [f"r{s % 7}" for s in want] and row["p_a"] == pytest.approx(0.75)


def test_hf_too_long_prompt_is_null_not_guessed(tiny_lm):
    model, tok = tiny_lm
    labeler = labelers.HFLabeler(model, tok, PromptSpec("base"))
    labeler.max_len = 20
    row = judges.judge_pairs(labeler, [ITEM])[0]
    assert row["p_a"] is None and row["p_a_ab"] is None and "over the labeler's 20" in row["null_reason"]


def test_chat_template_wraps_the_prompt_in_a_user_turn(tiny_lm):
    _, tok = tiny_lm
    tok.chat_template = ("{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}"
                         "{% if add_generation_prompt %}<a>{% endif %}")
    try:
        assert labelers.encode_prompt(tok, "hi") == tok("<u>hi</u><a>", add_special_tokens=False)["input_ids"]
    finally:
        tok.chat_template = None


# ----------------------------------------------------------------------------------------------------------------
# d-RLAIF: ratings 1..10


RATED = {**ITEM, "summary": ITEM["summary_a"]}


def test_rating_prompt_is_the_papers():
    text = judges.build_rating_prompt(judges.judge_text(ITEM), ITEM["summary_a"])
    assert text == ("You are an expert summary rater. Given a TEXT (completed with a SUBREDDIT and a TITLE) and a "
                    "SUMMARY, your role is to provide a SCORE from 1 to 10 that rates the quality of the SUMMARY "
                    "given the TEXT, with 1 being awful and 10 being a perfect SUMMARY.\n\n"
                    "TEXT: SUBREDDIT: r/relationships\nTITLE: My sister crashed my car\n"
                    "POST: My sister (24F) crashed my car yesterday. Should I forgive her?\n\n"
                    "SUMMARY: My sister (24F) crashed my car. Should I forgive her?\n\nSCORE:")


class StubRater:
    """An LM labeler that gives each prompt a fixed distribution over the ratings 1..10, and counts prompts."""

    def __init__(self, probs, fail_on=()):
        self.probs, self.fail_on, self.asked, self.usage = probs, fail_on, [], {}

    def rating_probs(self, prompts):
        self.asked += prompts
        return [{"probs": None, "mass": None, "null_reason": "API error"} if any(f in p for f in self.fail_on)
                else {"probs": self.probs, "mass": 1.0, "null_reason": None} for p in prompts]


@pytest.mark.parametrize("probs,want", [
    ([0] * 9 + [1], 1.0),  # certainly 10: the top of the scale
    ([1] + [0] * 9, -1.0),  # certainly 1
    ([0.1] * 10, 0.0),  # uniform: 5.5
    ([0.5] + [0] * 8 + [0.5], 0.0),  # half 1, half 10: 5.5 (a "10" read as "1" would give -1)
    ([0] * 6 + [0.25, 0, 0, 0.75], (0.25 * 7 + 0.75 * 10 - 5.5) / 4.5),  # 9.25 -> 0.8333...
])
def test_d_rlaif_reward_of_a_known_distribution_is_exact(probs, want):
    assert judges.rating_reward(probs) == pytest.approx(want, abs=1e-12)
    (got,) = labelers.direct_scores(StubRater(probs), [RATED])
    assert got == pytest.approx(want, abs=1e-12)


def brute_rating_probs(model, tok, prompt_text):
    """P(" r" as a whole number) for r = 1..10 from unpadded forward passes, one rating at a time."""
    ids = tok(prompt_text)["input_ids"]
    digit = torch.tensor([tok.decode([i])[:1].isdigit() for i in range(model.config.vocab_size)])
    raw = []
    for r in range(1, 11):
        full = tok(f"{prompt_text} {r}")["input_ids"]
        assert full[:len(ids)] == ids
        with torch.no_grad():
            p = torch.softmax(model(torch.tensor([full])).logits[0].double(), -1)
        prob = 1.0
        for pos in range(len(ids), len(full)):
            prob *= p[pos - 1, full[pos]].item()
        raw.append(prob * (1 - p[-1][digit].sum().item()))
    return [x / sum(raw) for x in raw], raw


@pytest.fixture(scope="module")
def lm_with_a_ten_token():
    """A tiny LM whose tokenizer has " 10" as one token (the tiny_lm's spells it " 1" + "0")."""
    texts = [f"SCORE: {r}" for r in range(1, 11)] * 50 + [prompt("base")] * 5
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    torch.manual_seed(1)
    return GPT2LMHeadModel(tiny_gpt2_config(tok, n_layer=2, n_head=2, n_embd=32, n_positions=1024)).eval(), tok


@pytest.mark.parametrize("lm", ["tiny_lm", "lm_with_a_ten_token"])
def test_hf_ratings_read_10_as_a_whole_number(lm, request):
    model, tok = request.getfixturevalue(lm)
    ten = tok.encode(" 10", add_special_tokens=False)
    assert len(ten) == (2 if lm == "tiny_lm" else 1)  # both spellings of "10" are covered
    labeler = labelers.HFLabeler(model, tok, batch_size=4)
    items = [RATED, {**RATED, "id": "p2", "summary": ITEM["summary_b"]}]
    prompts = [judges.build_rating_prompt(judges.judge_text(it), it["summary"]) for it in items]
    rows = labeler.rating_probs(prompts)
    for text, row in zip(prompts, rows):
        want, raw = brute_rating_probs(model, tok, text)
        assert row["probs"] == pytest.approx(want, rel=1e-4, abs=1e-9)
        assert row["mass"] == pytest.approx(sum(raw), rel=1e-4)
    got = labelers.direct_scores(labeler, items)
    want = [judges.rating_reward(brute_rating_probs(model, tok, p)[0]) for p in prompts]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-7)
    if lm == "tiny_lm":  # "1" is not its first token's probability: the mass going on to "10" is taken out
        with torch.no_grad():
            p = torch.softmax(model(torch.tensor([tok(prompts[0])["input_ids"]])).logits[0, -1].double(), -1)
        first = [p[tok.encode(f" {r}", add_special_tokens=False)[0]].item() for r in range(1, 11)]
        assert rows[0]["mass"] < sum(first[:9])  # P(" 1") counted "10" and "11".. as well


def test_rule_ratings_follow_the_rule_score_with_seeded_noise():
    FACTS = synthetic.make_example(random.Random(0), synthetic.TaskConfig())["facts"]
    gold = synthetic.gold_summary(FACTS)
    item = {"id": "q1", "facts": FACTS, "summary": gold}
    (row,) = labelers.RuleLabeler(noise=0.0).rating_probs([item])
    w = [math.exp(-((i - 10.0) ** 2) / 2) for i in range(1, 11)]  # gold scores 1.0 -> mu = 10
    assert row["probs"] == pytest.approx([x / sum(w) for x in w], abs=1e-12)
    bad = {"id": "q1", "facts": FACTS, "summary": "nothing"}
    s = synthetic.score({"facts": FACTS}, "nothing")
    (row,) = labelers.RuleLabeler(noise=0.0).rating_probs([bad])
    w = [math.exp(-((i - (5.5 + 4.5 * s)) ** 2) / 2) for i in range(1, 11)]
    assert row["probs"] == pytest.approx([x / sum(w) for x in w], abs=1e-12)
    # noise: std temperature * noise in score units, seeded by (seed, id, summary), not by the batch
    noisy = labelers.RuleLabeler(temperature=0.1, noise=1.0, seed=3)
    alone = labelers.direct_scores(noisy, [bad])
    assert labelers.direct_scores(noisy, [item, bad])[1] == alone[0]
    assert labelers.direct_scores(labelers.RuleLabeler(temperature=0.1, noise=1.0, seed=4), [bad]) != alone
    eps = random.Random("3:q1:nothing").gauss(0.0, 1.0) * 0.1
    w = [math.exp(-((i - (5.5 + 4.5 * (s + eps))) ** 2) / 2) for i in range(1, 11)]
    assert alone[0] == pytest.approx(judges.rating_reward([x / sum(w) for x in w]), abs=1e-12)


def test_direct_rewards_never_ask_twice_and_never_make_up_a_reward():
    stub = StubRater([0] * 9 + [1], fail_on=("broken",))
    rewards = LabelerReward(stub, tokenizer=None)
    items = [RATED, RATED, {**RATED, "summary": "broken"}, {**RATED, "id": "p2"}]
    assert rewards.rate(items) == [1.0, 1.0, None, 1.0]
    assert len(stub.asked) == 3 and rewards.calls == 3 and rewards.unrated == 1  # the duplicate asked once
    assert rewards.rate(items[::-1]) == [1.0, None, 1.0, 1.0] and len(stub.asked) == 3  # all cached
    again = LabelerReward(stub, tokenizer=None)
    again.load_state_dict(json.loads(json.dumps(rewards.state_dict())))  # as through a checkpoint
    assert again.rate(items) == [1.0, 1.0, None, 1.0] and len(stub.asked) == 3 and again.calls == 3


# ----------------------------------------------------------------------------------------------------------------
# orders, un-flipping, position bias


class StubLabeler:
    """Answers with a fixed rule of the (first, second) texts: a labeler we know the labels of."""

    def __init__(self, rule):
        self.rule, self.usage = rule, {}

    def judge(self, queries):
        return [{"p_first": self.rule(q), "mass": 1.0, "rationale": None,
                 "null_reason": None if self.rule(q) is not None else "stub said nothing", "usage": None}
                for q in queries]


def pairs(n):
    return [{**ITEM, "id": f"p{i}", "summary_a": "good" if i % 2 else "bad", "summary_b": "bad" if i % 2 else "good"}
            for i in range(n)]


def test_first_position_labeler_averages_to_a_half_and_is_never_consistent():
    rows = judges.judge_pairs(StubLabeler(lambda q: 1.0), pairs(6))
    assert all(r["p_a_ab"] == 1.0 and r["p_a_ba"] == 0.0 and r["p_a"] == 0.5 for r in rows)
    pb = judges.position_bias(rows)
    assert pb["consistency_rate"] == 0.0 and pb["same_position_rate"] == 1.0
    assert pb["mean_p_first"] == 1.0 and pb["first_position_win_rate_inconsistent"] == 1.0
    assert pb["abs_p_a_minus_half"]["counts"] == [6, 0, 0, 0, 0]
    # and against humans it scores exactly chance (ties count a half)
    agree = judges.human_agreement(rows, {r["id"]: True for r in rows})
    assert agree["agreement"] == 0.5 and agree["agreement_ab"] == 1.0 and agree["agreement_ba"] == 0.0


def test_unflip_keeps_the_better_summary_in_both_orders():
    # prefers whichever summary says "good", wherever it is shown
    rows = judges.judge_pairs(StubLabeler(lambda q: 0.9 if q["first"] == "good" else 0.1), pairs(6))
    for i, r in enumerate(rows):
        want = 0.9 if i % 2 else 0.1  # A is "good" for odd i
        assert r["p_a_ab"] == pytest.approx(want) and r["p_a_ba"] == pytest.approx(want)
        assert r["p_a"] == pytest.approx(want)
    pb = judges.position_bias(rows)
    assert pb["consistency_rate"] == 1.0 and pb["mean_p_first"] == pytest.approx(0.5)
    assert pb["first_position_win_rate_inconsistent"] is None
    assert pb["abs_p_a_minus_half"]["counts"] == [0, 0, 0, 0, 6]  # 0.4 lands in the closed last bin


def test_a_null_order_makes_the_pair_null_with_its_reason():
    rows = judges.judge_pairs(StubLabeler(lambda q: None if q["order"] == "ba" else 0.7), pairs(2))
    assert all(r["p_a"] is None and r["p_a_ab"] == 0.7 and r["null_reason"] == "ba: stub said nothing"
               for r in rows)
    assert judges.position_bias(rows)["n_null"] == 2


def test_one_order_and_random_order():
    rows = judges.judge_pairs(StubLabeler(lambda q: 0.8), pairs(4), orders="ab")
    assert all(r["p_a"] == 0.8 and r["p_a_ba"] is None for r in rows)
    assert judges.position_bias(rows)["consistency_rate"] is None
    rows = judges.judge_pairs(StubLabeler(lambda q: 0.8), pairs(40), orders="random", seed=3)
    shown_ab = [r["p_a_ab"] is not None for r in rows]
    assert 5 < sum(shown_ab) < 35 and all((r["p_a_ab"] is None) != (r["p_a_ba"] is None) for r in rows)
    again = judges.judge_pairs(StubLabeler(lambda q: 0.8), pairs(40), orders="random", seed=3)
    assert again == rows


def synthetic_pairs(n, seed=0):
    rng, tc = random.Random(seed), synthetic.TaskConfig()
    items = []
    for i in range(n):
        ex = synthetic.make_example(rng, tc)
        a, b = synthetic.policy_sample(rng, ex["facts"], tc)[0], synthetic.policy_sample(rng, ex["facts"], tc)[0]
        items.append({"id": f"s{i}", **ex, "summary_a": a, "summary_b": b})
    return items


def test_position_biased_rule_labeler_is_biased_but_its_averaged_labels_are_not():
    items = synthetic_pairs(300)
    gold = labelers.RuleLabeler(temperature=0.1)
    biased = labelers.RuleLabeler(temperature=0.1, position_bias=3.0)
    rows = judges.judge_pairs(biased, items)
    pb = judges.position_bias(rows)
    assert pb["mean_p_first"] > 0.7 and pb["consistency_rate"] < 0.8
    gold_rows = judges.judge_pairs(gold, items, orders="ab")
    decided = [(r, g) for r, g in zip(rows, gold_rows) if abs(g["p_a"] - 0.5) > 1e-9]
    agree = lambda key: sum((r[key] > 0.5) == (g["p_a"] > 0.5) for r, g in decided) / len(decided)  # noqa: E731
    # mean(sigmoid(x + b), sigmoid(x - b)) is above 1/2 exactly when x > 0: averaging cancels the bias
    assert agree("p_a") == 1.0
    assert agree("p_a_ab") < 0.9 and agree("p_a_ba") < 0.9
    assert judges.position_bias(judges.judge_pairs(gold, items))["mean_p_first"] == pytest.approx(0.5)


def test_rule_labeler_noise_is_seeded_per_pair_and_order():
    items = synthetic_pairs(20)
    lab = lambda seed: labelers.RuleLabeler(noise=1.0, seed=seed)  # noqa: E731
    rows = judges.judge_pairs(lab(1), items)
    assert rows == judges.judge_pairs(lab(1), items)
    assert judges.judge_pairs(lab(1), items[5:6]) == rows[5:6]  # independent of the rest of the batch
    assert judges.judge_pairs(lab(2), items) != rows
    with pytest.raises(ValueError, match="facts"):
        judges.judge_pairs(lab(1), [ITEM])


def test_make_labeler_builds_what_the_config_names():
    """A stage's config inherits LabelerConfig (and PromptConfig for pairs): the labeler is built from its fields; a
    labeler the config does not know is refused when the flags are parsed, naming the flag."""
    lab = labelers.make_labeler(labelers.LabelerConfig(labeler="rule", rule_position_bias=1.5), seed=7)
    assert isinstance(lab, labelers.RuleLabeler) and lab.judge_fn.position_bias == 1.5 and lab.seed == 7
    with pytest.raises(SystemExit, match="--labeler must be one of rule, hf, vllm, openai"):
        config.parse_config(LabelCfg, {}, ["--labeler", "gpt"])
    with pytest.raises(ValueError, match="--api-model"):
        labelers.make_labeler(LabelCfg(labeler="openai"), seed=0)
    # d-RLAIF's config is no PromptConfig: its labeler prompts with the defaults (the rating prompt has no knobs)
    lab = labelers.make_labeler(labelers.LabelerConfig(labeler="openai", api_model="m"), seed=0)
    assert lab.spec == judges.prompt_spec(judges.PromptConfig(), get_task("summarize"))  # --task's words


def test_top_logprobs_over_20_is_for_vllm_only():
    """vLLM reads any number of top logprobs (VLLMLabeler raises max_logprobs); OpenAI-compatible APIs cap it at 20."""
    import label
    from minirlaif.config import parse_config

    assert parse_config(label.Config, label.PRESETS, ["--labeler", "vllm", "--top-logprobs", "400"]).top_logprobs == 400
    with pytest.raises(SystemExit, match="top-logprobs"):
        parse_config(label.Config, label.PRESETS, ["--top-logprobs", "0"])
    with pytest.raises(ValueError, match="at most 20"):
        labelers.make_labeler(LabelCfg(labeler="openai", api_model="m", top_logprobs=21), seed=0)
