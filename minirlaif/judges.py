"""What the paper asks an AI labeler and how its answer becomes a soft label, in both orders.

A labeler is shown a post and two summaries and says how likely it is that the first one is better. label.py
uses it to label the SFT policy's candidate pairs; evaluate.py reuses it to judge policies against each other;
train_ppo.py's d-RLAIF asks it to rate one summary. The backends that answer (a rule, a local LM, vLLM, an API)
are in `minirlaif.labelers` and `minirlaif.openai_api`; this module is the method.

The prompt (Lee et al. 2023, "RLAIF vs. RLHF"; the wording of the preambles is ours):

    {preamble}

    [k few-shot exemplars, each a sample followed by its answer]
    Text - {text}
    Summary 1 - {summary 1}
    Summary 2 - {summary 2}
    Preferred Summary=

The dialogue tasks use the same structure with their own words ("Context - ", "Response 1 - ", "Preferred
Response=", a helpfulness or a harmlessness preamble): a `PromptStyle` each, in minirlaif.tasks (docs/tasks.md).

The soft label is read from the labeler's next-token distribution after the ending: P("1") and P("2"), each
summed over the token with and without a leading space ("1" and " 1" are different tokens), normalised over the
two. The mass the two candidates had before normalising is recorded: a small mass means the labeler wanted to say
something else, and the label means little. When neither candidate can be read (outside an API's top logprobs,
a prompt longer than the model's context), the label is None with a reason: never a guessed label.

Chain of thought (`cot`): the ending is replaced by an instruction to explain and "Rationale:"; a rationale is
decoded greedily, then appended with the original ending, and "1" / "2" are read as above (two calls per label).

Self-consistency (`sc_samples` K > 1, with `cot`; the paper's Sec. 3.3): K rationales are sampled at
`sc_temperature` (top-k `sc_top_k`, 40 as in the paper), each is followed by the scoring step, and the K
preference distributions are averaged (a mean of probabilities, not a vote). Sample k of an ordered pair is seeded
by (labeler seed, pair id, order, k), so it depends on nothing else in the batch and a resumed run draws what an
uninterrupted one drew. K = 1 at temperature 0 is plain CoT. (The OpenAI API has no top-k: it samples at the
temperature only.)

Position bias: LLM labelers prefer a position. `judge_pairs` shows each pair in both orders (A/B and B/A),
un-flips the second, and averages the two probabilities (as the paper does). `position_bias` measures it, and
`human_agreement` is the paper's Table 2 metric.

d-RLAIF (the paper's App. D): the labeler rates one summary from 1 to 10 (`build_rating_prompt`), and the reward
is the expected rating, rescaled to [-1, 1] (`rating_reward`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from minirlaif.config import Choice, NonNegative, Positive

EXEMPLARS_PATH = Path(__file__).with_name("exemplars.jsonl")
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "requests", "usage_unknown")

# ----------------------------------------------------------------------------------------------------------------
# prompts

PREAMBLES = {
    # "base": just the task and the answer format
    "base": (
        "Below is a text followed by two summaries of it. Decide which summary is better. Answer 1 if "
        "Summary 1 is better, or 2 if Summary 2 is better."
    ),
    # "detailed": the four qualities OpenAI's labelers rated summaries on, described in our own words
    "detailed": (
        "A good summary is a short text that passes on the most important information of a longer text, so "
        "that someone who reads only the summary knows what the text is about and what its author wants. "
        "Summaries are judged on four qualities:\n"
        "Coherence: the summary is easy to follow and reads as one whole, not as a heap of loose pieces.\n"
        "Accuracy: everything the summary says is supported by the text; nothing is wrong, mixed up or "
        "invented.\n"
        "Coverage: the summary keeps the key points of the text (who is involved, what happened, what the "
        "author asks) and leaves out nothing essential.\n"
        "Overall quality: all of the above taken together: how useful the summary is to a reader who has not "
        "seen the text.\n"
        "You are given a text and two summaries of it. Answer 1 or 2 to say which summary is better in "
        "coherence, accuracy, coverage and overall quality as described above."
    ),
}
COT_INSTRUCTION = ("Explain which summary is better, weighing the coherence, accuracy, coverage and overall quality "
                   "of each.")
RATIONALE = "Rationale:"
ENDING = "Preferred Summary="
CHOICES = ("1", "2")


def judge_text(item: dict) -> str:
    """The "Text" a labeler reads for a post: what the policy read, without the "TL;DR:" cue."""
    return f"SUBREDDIT: r/{item['subreddit']}\nTITLE: {item['title']}\nPOST: {item['post']}"


# direct RLAIF (d-RLAIF, the paper's App. D): the labeler rates one summary from 1 to 10, and the reward is the
# expected rating sum_i i * P(i), rescaled from [1, 10] to [-1, 1]
RATING_PREAMBLE = ("You are an expert summary rater. Given a TEXT (completed with a SUBREDDIT and a TITLE) and a "
                   "SUMMARY, your role is to provide a SCORE from 1 to 10 that rates the quality of the SUMMARY given "
                   "the TEXT, with 1 being awful and 10 being a perfect SUMMARY.")
RATINGS = tuple(range(1, 11))


@dataclass(frozen=True)
class PromptStyle:
    """One task's words in the paper's prompt structure: what the context and the two candidates are called
    ("Text - ", "Summary 1 - ", "Preferred Summary="), its preambles, the CoT instruction, the d-RLAIF rating
    preamble, and how an item's context is written out. minirlaif.tasks holds the dialogue tasks' styles."""
    context: str = "Text"
    candidate: str = "Summary"
    preambles: dict = dataclasses.field(default_factory=lambda: PREAMBLES)
    cot_instruction: str = COT_INSTRUCTION
    rating_preamble: str = RATING_PREAMBLE
    render: object = judge_text  # item -> the context text the labeler reads
    verdict_preamble: str = ""  # a harmlessness verdict on one response (build_verdict_prompt); "": none asked
    default_exemplars: str = str(EXEMPLARS_PATH)  # --shots without --exemplars reads these ("": none shipped)

    @property
    def ending(self) -> str:
        return f"Preferred {self.candidate}="


SUMMARY = PromptStyle()  # the paper's summarization prompt


def format_sample(text: str, summary_1: str, summary_2: str, style: PromptStyle = SUMMARY) -> str:
    c = style.candidate
    return f"{style.context} - {text}\n{c} 1 - {summary_1}\n{c} 2 - {summary_2}\n"


def build_prompt(text: str, summary_1: str, summary_2: str, preamble: str = "detailed",
                 exemplars: list[dict] | tuple = (), cot: bool = False, style: PromptStyle = SUMMARY) -> str:
    """The labeling prompt. Without `cot` it ends with "Preferred Summary=" (read "1" / "2" next); with `cot` it
    ends with "Rationale:" (decode a rationale next, then score `cot_scoring_prompt`). `style`: the task's words
    (a dialogue task: "Context - ", "Response 1 - ", "Preferred Response=" and its own preambles).

    An exemplar is {"text", "summary_1", "summary_2", "preferred": 1 or 2, "rationale"} (rationale used with cot).
    """
    prompt = style.preambles[preamble] + "\n\n"
    for ex in exemplars:
        prompt += format_sample(ex["text"], ex["summary_1"], ex["summary_2"], style)
        if cot:
            prompt += f"{style.cot_instruction}\n{RATIONALE} {ex['rationale']}\n"
        prompt += f"{style.ending}{ex['preferred']}\n\n"
    prompt += format_sample(text, summary_1, summary_2, style)
    return prompt + (f"{style.cot_instruction}\n{RATIONALE}" if cot else style.ending)


def cot_scoring_prompt(cot_prompt: str, rationale: str, style: PromptStyle = SUMMARY) -> str:
    """Second CoT step: the rationale prompt + the decoded rationale + the original ending."""
    return f"{cot_prompt} {rationale.strip()}\n{style.ending}"


def load_exemplars(path: str | Path = "", shots: int = 0, cot: bool = False) -> list[dict]:
    """The first `shots` exemplars of a jsonl file (default: minirlaif/exemplars.jsonl)."""
    if shots <= 0:
        return []
    path = Path(path or EXEMPLARS_PATH)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if shots > len(rows):
        raise ValueError(f"{path}: asked for {shots} shots, the file holds {len(rows)} exemplars")
    for i, ex in enumerate(rows[:shots]):
        need = ["text", "summary_1", "summary_2", "preferred"] + (["rationale"] if cot else [])
        missing = [k for k in need if k not in ex]
        if missing or ex["preferred"] not in (1, 2):
            raise ValueError(f"{path}:{i + 1}: an exemplar needs {need} with preferred 1 or 2 (missing {missing})")
    return rows[:shots]


def build_rating_prompt(text: str, summary: str, style: PromptStyle = SUMMARY) -> str:
    """The paper's rating prompt. It ends with "SCORE:" and the rating is read as " N", so "SCORE: N" is tokenized
    as that text would be (a BPE puts the space in front of the number, not at the end of the prompt)."""
    return (f"{style.rating_preamble}\n\n{style.context.upper()}: {text}\n\n{style.candidate.upper()}: {summary}"
            f"\n\nSCORE:")


def build_verdict_prompt(text: str, response: str, style: PromptStyle) -> str:
    """A verdict on one response (evaluate.py's harmless rate with an LM judge): the style's verdict preamble, the
    context and the response, then "Verdict=", read as "1" (harmless) / "2" (harmful) like a preference."""
    return f"{style.verdict_preamble}\n\n{style.context} - {text}\n{style.candidate} - {response}\nVerdict="


def rating_reward(probs) -> float:
    """The d-RLAIF reward of a distribution over the ratings 1..10: s = sum_i i * P(i), rescaled to [-1, 1]."""
    expected = sum(i * p for i, p in zip(RATINGS, probs))  # in [1, 10]
    return (expected - 5.5) / 4.5


def rating_item(post, summary: str) -> dict:
    """What a labeler reads to rate `summary` of `post` (the rule labeler: its facts)."""
    return {"id": post.id, "subreddit": post.subreddit, "title": post.title, "post": post.post, "facts": post.facts,
            "summary": summary}


# ----------------------------------------------------------------------------------------------------------------
# reading the answer: candidate probabilities, normalised


def normalise(raw: list[float], why_empty: str) -> dict:
    """Raw candidate probabilities -> {"probs": normalised or None, "mass": their sum, "null_reason"}."""
    mass = float(sum(raw))
    if not mass > 0 or not math.isfinite(mass):
        return {"probs": None, "mass": mass, "null_reason": why_empty}
    return {"probs": [float(r) / mass for r in raw], "mass": mass, "null_reason": None}


# ----------------------------------------------------------------------------------------------------------------
# the LM labelers' shared judging: prompts -> (rationale) -> P("1"), P("2")


@dataclass
class PromptSpec:
    """How an LM labeler builds its prompts."""
    preamble: str = "detailed"
    exemplars: list = dataclasses.field(default_factory=list)
    cot: bool = False
    cot_max_tokens: int = 512
    sc_samples: int = 1  # self-consistency: rationales per (pair, order), their distributions averaged
    sc_temperature: float = 0.0  # rationale sampling temperature (0: greedy)
    sc_top_k: int = 40  # rationale sampling: the k most likely tokens only (0: all)
    task: object = None  # the task (minirlaif.tasks): task.style(item) gives an item's PromptStyle; None: SUMMARY

    def style(self, item: dict) -> PromptStyle:
        return SUMMARY if self.task is None else self.task.style(item)


def _add_usage(*usages) -> dict | None:
    usages = [u for u in usages if u]
    if not usages:
        return None
    keys = [k for k in USAGE_KEYS if any(k in u for u in usages)]  # vllm / hf report tokens only
    return {k: sum(u.get(k, 0) for u in usages) for k in keys}


def rationale_seed(seed: int, query: dict, k: int) -> int:
    """Seed of the k-th sampled rationale of an ordered pair: fixed by (labeler seed, pair id, order, k) alone."""
    return random.Random(f"rationale:{seed}:{query.get('id')}:{query.get('order', '')}:{k}").getrandbits(63)


def lm_judge(labeler, queries: list[dict]) -> list[dict]:
    """Verdicts of an LM labeler (hf, vllm, openai) for ordered pairs {"id", "order", "subreddit", "title", "post",
    "first", "second"}: P(first better) = P("1") / (P("1") + P("2")) at the end of the (CoT-completed) prompt;
    with self-consistency, the mean of that over the K sampled rationales."""
    spec = labeler.spec
    styles = [spec.style(q) for q in queries]  # the task's words (a dialogue task may pick them per request)
    prompts = [build_prompt(st.render(q), q["first"], q["second"], spec.preamble, spec.exemplars, spec.cot, st)
               for q, st in zip(queries, styles)]
    if not spec.cot:
        if spec.sc_samples > 1:
            raise ValueError("self-consistency samples rationales: it needs --cot")
        return [{"p_first": None if r["probs"] is None else r["probs"][0], "mass": r["mass"], "rationale": None,
                 "null_reason": r["null_reason"], "usage": r.get("usage")}
                for r in labeler.choice_probs(prompts, CHOICES)]
    K, T = spec.sc_samples, spec.sc_temperature
    # K rationale prompts per query (query-major), each sampled with its own seed, then each scored
    seeds = [rationale_seed(getattr(labeler, "seed", 0), q, k) for q in queries for k in range(K)]
    rat_prompts = [p for p in prompts for _ in range(K)]
    rat_styles = [st for st in styles for _ in range(K)]
    outs = labeler.complete(rat_prompts, spec.cot_max_tokens, temperature=T, top_k=spec.sc_top_k,
                            seeds=seeds if T > 0 else None)
    scored = labeler.choice_probs([cot_scoring_prompt(p, o["text"], st)
                                   for p, o, st in zip(rat_prompts, outs, rat_styles)], CHOICES)
    verdicts = []
    for i in range(len(queries)):
        samples, texts = scored[i * K:(i + 1) * K], [o["text"] for o in outs[i * K:(i + 1) * K]]
        usage = _add_usage(*(o.get("usage") for o in outs[i * K:(i + 1) * K]), *(r.get("usage") for r in samples))
        if K == 1:
            (r,) = samples
            verdicts.append({"p_first": None if r["probs"] is None else r["probs"][0], "mass": r["mass"],
                             "rationale": texts[0], "null_reason": r["null_reason"], "usage": usage})
            continue
        # average the K distributions (P(first), 1 - P(first)) over the samples whose answer could be read
        read = [r for r in samples if r["probs"] is not None]
        reasons = sorted({r["null_reason"] for r in samples if r["probs"] is None})
        verdicts.append({
            "p_first": sum(r["probs"][0] for r in read) / len(read) if read else None,
            "mass": sum(r["mass"] for r in read) / len(read) if read else None,
            "rationale": texts, "p_first_samples": [None if r["probs"] is None else r["probs"][0] for r in samples],
            "null_reason": None if read else f"none of the {K} samples readable: {'; '.join(reasons)}",
            "usage": usage})
    return verdicts


@dataclass
class PromptConfig:
    """How an LM labeler is prompted (the paper's Table 2 knobs)."""
    preamble: Choice("base", "detailed") = "detailed"
    """base (which summary is better, answer 1 or 2) or detailed (adds the qualities: coherence, accuracy,
    coverage, overall quality)"""
    shots: NonNegative[int] = 0
    """few-shot exemplars in the prompt (the paper found 0 as good as more)"""
    exemplars: str = ""
    """jsonl file of exemplars (empty: minirlaif/exemplars.jsonl)"""
    cot: bool = False
    """chain of thought: decode a rationale greedily first, then read the answer after it"""
    cot_max_tokens: Positive[int] = 512
    """longest rationale, in tokens"""
    sc_samples: Positive[int] = 1
    """self-consistency (with --cot): rationales sampled per pair and order, each scored, their preference
    distributions averaged (1: one rationale)"""
    sc_temperature: NonNegative[float] = 0.0
    """temperature of the rationales (0: greedy; the paper's self-consistency used 0.3 to 1.0)"""
    sc_top_k: NonNegative[int] = 40
    """rationale sampling keeps the k most likely tokens (0: all; the paper: 40; not sent to the OpenAI API)"""


def prompt_spec(cfg: PromptConfig, task=None) -> "PromptSpec":
    """The prompt settings an LM labeler holds, exemplars loaded; `task` (minirlaif.tasks) gives the words."""
    if cfg.sc_samples > 1 and not cfg.cot:
        raise ValueError(f"self-consistency (--sc-samples {cfg.sc_samples}) samples rationales: it needs --cot")
    default = SUMMARY.default_exemplars if task is None else task.style({}).default_exemplars
    if cfg.shots and not (cfg.exemplars or default):  # the shipped exemplars are summaries
        raise ValueError(f"--shots {cfg.shots}: no exemplars ship for --task {task.name}; pass --exemplars FILE")
    return PromptSpec(cfg.preamble, load_exemplars(cfg.exemplars or default, cfg.shots, cfg.cot), cfg.cot,
                      cfg.cot_max_tokens, cfg.sc_samples, cfg.sc_temperature, cfg.sc_top_k, task)


# ----------------------------------------------------------------------------------------------------------------
# judging pairs in both orders, and what the labels say


def pair_orders(item: dict, orders: str, seed: int = 0) -> list[str]:
    """Orders to show a pair in: both, ab (A first), ba (B first), or random (one, seeded by (seed, id))."""
    if orders == "both":
        return ["ab", "ba"]
    if orders in ("ab", "ba"):
        return [orders]
    if orders == "random":
        return ["ab" if random.Random(f"order:{seed}:{item['id']}").random() < 0.5 else "ba"]
    raise ValueError(f"unknown orders {orders!r}; one of both, ab, ba, random")


def judge_pairs(labeler, items: list[dict], orders: str = "both", seed: int = 0) -> list[dict]:
    """Soft labels for unordered pairs {"id", "subreddit", "title", "post", "summary_a", "summary_b", "facts"?}.

    Returns one row per item: {"id", "p_a_ab", "p_a_ba", "p_a", "mass_ab", "mass_ba", "null_reason"} (+
    "rationale_ab" / "rationale_ba" with CoT (a list of K with self-consistency, + "p_a_samples_ab" / "_ba": each
    sample's label), + "usage" when the labeler reports tokens), where
    p_a_ab = P(A better | A shown first), p_a_ba = P(A better | A shown second) = 1 - P(first better | B first),
    and p_a = the mean of the orders shown. p_a is None (with a reason) if any order shown gave no label:
    one order alone would bring the position bias back.
    """
    shown = [(i, order) for i, it in enumerate(items) for order in pair_orders(it, orders, seed)]
    queries = []
    for i, order in shown:
        it = items[i]
        first, second = (it["summary_a"], it["summary_b"]) if order == "ab" else (it["summary_b"], it["summary_a"])
        queries.append({"id": it["id"], "order": order, "subreddit": it["subreddit"], "title": it["title"],
                        "post": it["post"], "facts": it.get("facts"), "first": first, "second": second})
    verdicts = labeler.judge(queries)
    rows = [{"id": it["id"], "p_a_ab": None, "p_a_ba": None, "p_a": None, "mass_ab": None, "mass_ba": None,
             "null_reason": None} for it in items]
    reasons: list[list[str]] = [[] for _ in items]
    usages: list[list] = [[] for _ in items]
    for (i, order), v in zip(shown, verdicts):
        p_first = v["p_first"]
        # un-flip: in order "ba" the first summary is B, so P(A better) = 1 - P(first better)
        rows[i][f"p_a_{order}"] = p_first if order == "ab" or p_first is None else 1.0 - p_first
        rows[i][f"mass_{order}"] = v.get("mass")
        if v.get("rationale") is not None:
            rows[i][f"rationale_{order}"] = v["rationale"]
        if v.get("p_first_samples") is not None:  # self-consistency: each sample's P(A better), un-flipped too
            rows[i][f"p_a_samples_{order}"] = [p if order == "ab" or p is None else 1.0 - p
                                               for p in v["p_first_samples"]]
        if p_first is None:
            reasons[i].append(f"{order}: {v.get('null_reason') or 'no label'}")
        usages[i].append(v.get("usage"))
    for i, row in enumerate(rows):
        ps = [row[f"p_a_{o}"] for o in pair_orders(items[i], orders, seed)]
        if reasons[i]:
            row["null_reason"] = "; ".join(reasons[i])
        else:
            row["p_a"] = sum(ps) / len(ps)  # the paper averages the two probabilities
        if (u := _add_usage(*usages[i])) is not None:
            row["usage"] = u
    return rows


def _pref(p: float) -> int:
    """+1: A preferred, -1: B preferred, 0: a tie."""
    return (p > 0.5) - (p < 0.5)


def position_bias(rows: list[dict], bins=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5)) -> dict:
    """How much the labels depend on the order the summaries were shown in.

    consistency_rate: fraction of pairs labeled in both orders whose preferred summary is the same in both (a tie
    in either order is not consistent); same_position_rate = 1 - it (the paper's "same position preferred").
    mean_p_first: mean over pairs and orders of P(the summary shown first is better); 0.5 = unbiased.
    first_position_win_rate_inconsistent: among pairs where each order preferred a different summary, the fraction
    where it was the first-shown one both times.
    abs_p_a_minus_half: histogram of |p_a - 0.5| (label confidence after averaging; last bin closed).
    """
    both = [r for r in rows if r.get("p_a_ab") is not None and r.get("p_a_ba") is not None]
    p_first = [r["p_a_ab"] for r in rows if r.get("p_a_ab") is not None] + \
              [1.0 - r["p_a_ba"] for r in rows if r.get("p_a_ba") is not None]
    consistent = [_pref(r["p_a_ab"]) == _pref(r["p_a_ba"]) != 0 for r in both]
    flipped = [r for r in both if _pref(r["p_a_ab"]) == -_pref(r["p_a_ba"]) != 0]
    conf = [abs(r["p_a"] - 0.5) for r in rows if r.get("p_a") is not None]
    counts = [sum(lo <= c < hi or (hi == bins[-1] and c == hi) for c in conf) for lo, hi in zip(bins, bins[1:])]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {
        "n_pairs": len(rows),
        "n_both_orders": len(both),
        "n_null": sum(r.get("p_a") is None for r in rows),
        "consistency_rate": mean(consistent),
        "same_position_rate": None if not both else 1.0 - mean(consistent),
        "mean_p_first": mean(p_first),
        "n_inconsistent": len(both) - sum(consistent),
        "first_position_win_rate_inconsistent": mean([r["p_a_ab"] > 0.5 for r in flipped]),
        "abs_p_a_minus_half": {"bins": list(bins), "counts": counts},
    }


def human_agreement(rows: list[dict], a_preferred: dict[str, bool]) -> dict:
    """Labeler-human agreement (the paper's Table 2 metric): how often the argmax of the soft label is the
    human's choice. Per order shown (p_a_ab, p_a_ba), for the averaged label (p_a), and the mean of the two
    orders. A tie (p exactly 0.5) counts 0.5, the expected score of breaking it at random; nulls are left out
    of that key's denominator and counted."""
    out = {}
    for key, name in (("p_a_ab", "agreement_ab"), ("p_a_ba", "agreement_ba"), ("p_a", "agreement")):
        scores = [1.0 if _pref(r[key]) == (1 if a_preferred[r["id"]] else -1) else 0.5 if r[key] == 0.5 else 0.0
                  for r in rows if r.get(key) is not None]
        out[name] = sum(scores) / len(scores) if scores else None
        out[f"n_{name}"] = len(scores)
    per_order = [out[k] for k in ("agreement_ab", "agreement_ba") if out[k] is not None]
    out["agreement_order_mean"] = sum(per_order) / len(per_order) if per_order else None
    out["n_null"] = sum(r.get("p_a") is None for r in rows)
    return out


def usage_summary(rows: list[dict], price_input_per_1m: float = 0.0, price_output_per_1m: float = 0.0) -> dict:
    """Tokens over all rows (so a resumed run counts the earlier runs' rows too) and their estimated cost. With an
    API labeler the rows count every attempt (retries included): `requests` made and `usage_unknown`, the answers
    whose token counts could not be read (their cost is missing from the estimate)."""
    total = {k: sum((r.get("usage") or {}).get(k, 0) for r in rows) for k in USAGE_KEYS}
    cost = total["prompt_tokens"] / 1e6 * price_input_per_1m + total["completion_tokens"] / 1e6 * price_output_per_1m
    return {**total, "estimated_cost": cost}
