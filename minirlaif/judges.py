"""AI labelers ("judges"): the RLAIF paper's preference prompt, soft labels from next-token probabilities.

A labeler is shown a post and two summaries and says how likely it is that the first one is better. label.py
uses it to label the SFT policy's candidate pairs; evaluate.py reuses it to judge policies against each other.

The prompt (Lee et al. 2023, "RLAIF vs. RLHF"; the wording of the preambles is ours):

    {preamble}

    [k few-shot exemplars, each a sample followed by its answer]
    Text - {text}
    Summary 1 - {summary 1}
    Summary 2 - {summary 2}
    Preferred Summary=

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
un-flips the second, and averages the two probabilities (as the paper does). `position_bias` measures it.

Labeler backends, one class each, all built by `make_labeler(cfg)` from a `JudgeConfig`-like object:
  rule    RuleLabeler: the synthetic task's rule judge (reads the post's `facts`), with noise and position bias
  hf      HFLabeler: any local causal LM through transformers (chat template applied when it has one)
  vllm    VLLMLabeler: a local LM served by vLLM (imported lazily; top-k logprobs)
  openai  OpenAILabeler: any OpenAI-compatible chat-completions endpoint, via http.client (no extra dependency)

Every labeler has `judge(queries) -> verdicts` (one ordered pair each: {"p_first", "mass", "rationale",
"null_reason", "usage"}) and a `usage` dict of counters for this process. The LM labelers also have
`choice_probs(prompts, choices)` (normalised probabilities of single-token answers after each prompt) and
`complete(prompts, max_tokens, temperature, top_k, seeds)` (greedy text at temperature 0, else one seeded sample
per prompt), which is all `lm_judge` and the direct-scoring hook need.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import http.client
import json
import math
import os
import random
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import torch

EXEMPLARS_PATH = Path(__file__).with_name("exemplars.jsonl")

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


def format_sample(text: str, summary_1: str, summary_2: str) -> str:
    return f"Text - {text}\nSummary 1 - {summary_1}\nSummary 2 - {summary_2}\n"


def build_prompt(text: str, summary_1: str, summary_2: str, preamble: str = "detailed",
                 exemplars: list[dict] | tuple = (), cot: bool = False) -> str:
    """The labeling prompt. Without `cot` it ends with "Preferred Summary=" (read "1" / "2" next); with `cot` it
    ends with "Rationale:" (decode a rationale next, then score `cot_scoring_prompt`).

    An exemplar is {"text", "summary_1", "summary_2", "preferred": 1 or 2, "rationale"} (rationale used with cot).
    """
    prompt = PREAMBLES[preamble] + "\n\n"
    for ex in exemplars:
        prompt += format_sample(ex["text"], ex["summary_1"], ex["summary_2"])
        if cot:
            prompt += f"{COT_INSTRUCTION}\n{RATIONALE} {ex['rationale']}\n"
        prompt += f"{ENDING}{ex['preferred']}\n\n"
    prompt += format_sample(text, summary_1, summary_2)
    return prompt + (f"{COT_INSTRUCTION}\n{RATIONALE}" if cot else ENDING)


def cot_scoring_prompt(cot_prompt: str, rationale: str) -> str:
    """Second CoT step: the rationale prompt + the decoded rationale + the original ending."""
    return f"{cot_prompt} {rationale.strip()}\n{ENDING}"


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


# direct RLAIF (d-RLAIF, the paper's App. D): the labeler rates one summary from 1 to 10, and the reward is the
# expected rating sum_i i * P(i), rescaled from [1, 10] to [-1, 1]
RATING_PREAMBLE = ("You are an expert summary rater. Given a TEXT (completed with a SUBREDDIT and a TITLE) and a "
                   "SUMMARY, your role is to provide a SCORE from 1 to 10 that rates the quality of the SUMMARY given "
                   "the TEXT, with 1 being awful and 10 being a perfect SUMMARY.")
RATINGS = tuple(range(1, 11))


def build_rating_prompt(text: str, summary: str) -> str:
    """The paper's rating prompt. It ends with "SCORE:" and the rating is read as " N", so "SCORE: N" is tokenized
    as that text would be (a BPE puts the space in front of the number, not at the end of the prompt)."""
    return f"{RATING_PREAMBLE}\n\nTEXT: {text}\n\nSUMMARY: {summary}\n\nSCORE:"


def rating_reward(probs) -> float:
    """The d-RLAIF reward of a distribution over the ratings 1..10: s = sum_i i * P(i), rescaled to [-1, 1]."""
    expected = sum(i * p for i, p in zip(RATINGS, probs))  # in [1, 10]
    return (expected - 5.5) / 4.5


def direct_scores(labeler, items: list[dict], summary_key: str = "summary") -> list[float | None]:
    """d-RLAIF rewards of {"id", "subreddit", "title", "post", "facts", summary_key} items, in [-1, 1]; None where
    the labeler could not rate (the reason is in its `rating_probs` row). One batched labeler call for all."""
    if isinstance(labeler, RuleLabeler):
        rows = labeler.rating_probs(items, summary_key)
    elif hasattr(labeler, "rating_probs"):
        rows = labeler.rating_probs([build_rating_prompt(judge_text(it), it[summary_key]) for it in items])
    else:
        raise ValueError(f"{type(labeler).__name__} cannot rate single summaries (d-RLAIF needs a labeler with "
                         f"rating_probs: rule, hf, vllm or openai)")
    return [None if r["probs"] is None else rating_reward(r["probs"]) for r in rows]


class DirectRewards:
    """d-RLAIF as a reward function for RL: `rewards(items)` -> one reward (or None) per (post, summary).

    A cache keyed by (post id, summary) makes sure the labeler is never asked twice about the same response: each
    call sends one batch of the not-yet-rated ones. `calls` counts what the labeler was asked, `unrated` the
    responses it could not rate (those get None, never a made-up reward; the trainer leaves them out). The state
    (cache and counters) goes into the trainer's checkpoint, so a resumed run asks and counts what an
    uninterrupted one would.
    """

    def __init__(self, labeler):
        self.labeler, self.cache, self.calls, self.unrated = labeler, {}, 0, 0

    def __call__(self, items: list[dict]) -> list[float | None]:
        keys = [(it["id"], it["summary"]) for it in items]
        todo = {k: it for k, it in zip(keys, items) if k not in self.cache}  # distinct and new, in order
        if todo:
            for k, r in zip(todo, direct_scores(self.labeler, list(todo.values()))):
                self.cache[k] = r
            self.calls += len(todo)
            self.unrated += sum(self.cache[k] is None for k in todo)
        return [self.cache[k] for k in keys]

    def state_dict(self) -> dict:
        return {"cache": [[i, s, r] for (i, s), r in self.cache.items()], "calls": self.calls,
                "unrated": self.unrated}

    def load_state_dict(self, state: dict) -> None:
        self.cache = {(i, s): r for i, s, r in state["cache"]}
        self.calls, self.unrated = state["calls"], state["unrated"]


# ----------------------------------------------------------------------------------------------------------------
# reading the answer: single-token candidates, normalised


def choice_token_ids(tokenizer, choice: str) -> list[int]:
    """Every token id that spells `choice` by itself: "1" and " 1" (and the vocabulary's own "1" when encode
    would split it, as SentencePiece does). Summing them is what makes the label independent of spacing."""
    ids = []
    for variant in (choice, " " + choice):
        enc = tokenizer.encode(variant, add_special_tokens=False)
        if len(enc) == 1 and enc[0] not in ids:
            ids.append(enc[0])
    vocab_id = tokenizer.convert_tokens_to_ids(choice)
    if isinstance(vocab_id, int) and vocab_id != tokenizer.unk_token_id and vocab_id not in ids:
        ids.append(vocab_id)
    if not ids:
        raise ValueError(f"the labeler's tokenizer has no single token for {choice!r} (nor {' ' + choice!r})")
    return ids


def rating_sequences(tokenizer, prompts: list[str], ratings: tuple[int, ...]):
    """d-RLAIF with a local LM: one sequence per (prompt, rating), the prompt's tokens then the rating's, split
    as the text "prompt r" tokenizes (so "10" is one token or "1" + "0", whatever this tokenizer does).
    -> (seqs, conts: each sequence's rating tokens, owner: its prompt's index, rating)."""
    seqs, conts, owner, rating = [], [], [], []
    for n, p in enumerate(prompts):
        ids = encode_prompt(tokenizer, p)
        for r in ratings:
            full = encode_prompt(tokenizer, f"{p} {r}")
            cont = (full[len(ids):] if full[:len(ids)] == ids and len(full) > len(ids)
                    else tokenizer.encode(f" {r}", add_special_tokens=False))
            seqs.append(ids + cont)
            conts.append(cont)
            owner.append(n)
            rating.append(r)
    return seqs, conts, owner, rating


def digit_start(tokenizer, token_id: int) -> bool:
    """Whether a token's text starts with a digit, i.e. would make a number longer."""
    return token_id < len(tokenizer) and tokenizer.decode([token_id])[:1].isdigit()


def normalise(raw: list[float], why_empty: str) -> dict:
    """Raw candidate probabilities -> {"probs": normalised or None, "mass": their sum, "null_reason"}."""
    mass = float(sum(raw))
    if not mass > 0 or not math.isfinite(mass):
        return {"probs": None, "mass": mass, "null_reason": why_empty}
    return {"probs": [float(r) / mass for r in raw], "mass": mass, "null_reason": None}


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt as the labeler should see it: inside a user turn when the tokenizer has a chat
    template (instruction-tuned labelers), else as plain text (with the tokenizer's own BOS, if it adds one)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


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
    prompts = [build_prompt(judge_text(q), q["first"], q["second"], spec.preamble, spec.exemplars, spec.cot)
               for q in queries]
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
    outs = labeler.complete(rat_prompts, spec.cot_max_tokens, temperature=T, top_k=spec.sc_top_k,
                            seeds=seeds if T > 0 else None)
    scored = labeler.choice_probs([cot_scoring_prompt(p, o["text"]) for p, o in zip(rat_prompts, outs)], CHOICES)
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


# ----------------------------------------------------------------------------------------------------------------
# backends


class RuleLabeler:
    """The synthetic task's judge as a labeler: P(first better) = sigmoid((s1 - s2) / T + bias + noise).

    `position_bias` (a logit toward the first position) and `noise` simulate an imperfect LLM labeler. The noise
    of each (pair, order) comes from its own RNG seeded by (seed, id, order), so a label does not depend on what
    else is in the batch, and a resumed run writes the labels an uninterrupted one would.
    """

    def __init__(self, temperature: float = 0.1, position_bias: float = 0.0, noise: float = 0.0, seed: int = 0):
        from minirlaif.synthetic import RuleJudge

        self.judge_fn = RuleJudge(temperature=temperature, position_bias=position_bias, noise=noise)
        self.seed, self.usage = seed, {}

    def judge(self, queries: list[dict]) -> list[dict]:
        verdicts = []
        for q in queries:
            if not q.get("facts"):
                raise ValueError(f"{q.get('id')}: the rule labeler reads the synthetic task's `facts`, which this "
                                 f"post does not have; label real data with --labeler hf, vllm or openai")
            rng = random.Random(f"{self.seed}:{q.get('id')}:{q.get('order', '')}")
            p = self.judge_fn.prob_first({"facts": q["facts"]}, q["first"], q["second"], rng)
            verdicts.append({"p_first": p, "mass": None, "rationale": None, "null_reason": None, "usage": None})
        return verdicts

    def rating_probs(self, items: list[dict], summary_key: str = "summary") -> list[dict]:
        """d-RLAIF ratings: the rule score s of each summary, plus Gaussian noise of std `temperature * noise` (the
        pairwise labeler's logit noise in score units), seeded by (seed, id, summary); the rating distribution is
        P(i) ~ exp(-(i - mu)^2 / 2) over 1..10 around mu = 5.5 + 4.5 * clip(s, -1, 1) (a gold summary: 10)."""
        from minirlaif.synthetic import score

        out = []
        for it in items:
            if not it.get("facts"):
                raise ValueError(f"{it.get('id')}: the rule labeler reads the synthetic task's `facts`, which this "
                                 f"post does not have; rate real data with --labeler hf")
            s = score({"facts": it["facts"]}, it[summary_key])
            if self.judge_fn.noise > 0:
                rng = random.Random(f"{self.seed}:{it['id']}:{it[summary_key]}")
                s += self.judge_fn.temperature * rng.gauss(0.0, self.judge_fn.noise)
            mu = 5.5 + 4.5 * min(max(s, -1.0), 1.0)
            w = [math.exp(-((i - mu) ** 2) / 2) for i in RATINGS]
            out.append({"probs": [x / sum(w) for x in w], "mass": None, "null_reason": None})
        return out


class HFLabeler:
    """Any local causal LM through transformers: one forward pass per prompt, P(next token) at its end.

    Prompts are batched in length order with left padding; positions come from the mask, so a padded prompt
    reads the same probabilities as the prompt alone. Rationales are decoded greedily with the shared sampler.
    """

    def __init__(self, model, tokenizer, spec: PromptSpec | None = None, batch_size: int = 8, device="cpu",
                 seed: int = 0):
        self.model, self.tokenizer, self.spec, self.seed = model.eval(), tokenizer, spec or PromptSpec(), seed
        self.batch_size, self.device = batch_size, torch.device(device)
        # padding is masked out, so any id works; the tokenizer is used as saved (adding a [PAD] would need a
        # resized embedding)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        cfg = model.config
        self.max_len = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 10**9
        self.usage = {}

    def judge(self, queries):
        return lm_judge(self, queries)

    def _batches(self, ids: list[list[int]]):
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    @torch.no_grad()
    def choice_probs(self, prompts: list[str], choices: tuple[str, ...]) -> list[dict]:
        from minirlaif.models import causal_lm_logits, pad_batch

        cand = [choice_token_ids(self.tokenizer, c) for c in choices]
        ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        out: list[dict | None] = [None] * len(prompts)
        for idx in self._batches(ids):
            fits = [i for i in idx if len(ids[i]) <= self.max_len]
            for i in idx:
                if len(ids[i]) > self.max_len:
                    out[i] = {"probs": None, "mass": None,
                              "null_reason": f"prompt has {len(ids[i])} tokens, over the labeler's {self.max_len}"}
            if not fits:
                continue
            x, mask = pad_batch([ids[i] for i in fits], self.pad_id, side="left")
            logits, _ = causal_lm_logits(self.model, x.to(self.device), mask.to(self.device), keep=1)
            probs = torch.softmax(logits[:, -1].float(), dim=-1).cpu()  # (B, V) at the ending
            for row, i in enumerate(fits):
                raw = [probs[row, c].sum().item() for c in cand]
                out[i] = {**normalise(raw, f"zero probability on {list(choices)}"),
                          "usage": {"prompt_tokens": len(ids[i]), "completion_tokens": 1}}
        return out

    def _digit_start(self, V: int) -> torch.Tensor:
        """(V,) bool: the tokens whose text starts with a digit, i.e. that would make a number longer."""
        if getattr(self, "_digits", None) is None or len(self._digits) != V:
            self._digits = torch.tensor([digit_start(self.tokenizer, i) for i in range(V)])
        return self._digits

    @torch.no_grad()
    def rating_probs(self, prompts: list[str], ratings: tuple[int, ...] = RATINGS) -> list[dict]:
        """P(rating) after each prompt, each rating read as a whole number (d-RLAIF).

        Rating r is the continuation " r" scored token by token, as the text "prompt r" tokenizes: "10" may be one
        token or "1" + "0", so it is never read as the token "1". P(r) = P(" r" | prompt) * P(the number ends |
        prompt + " r"), the second factor being 1 - P(next token starts with a digit): without it, the mass of
        "1" would include that of "10" (and of "11", which is no rating). Normalised over the ratings; "mass" is
        their sum before normalising. One forward pass per (prompt, rating), batched.
        """
        from minirlaif.models import causal_lm_logits, pad_batch

        seqs, conts, owner, rating = rating_sequences(self.tokenizer, prompts, ratings)
        raw: list[dict] = [{} for _ in prompts]  # prompt -> {rating: P(rating), not normalised}
        too_long = [False] * len(prompts)
        for idx in self._batches(seqs):
            fits = [i for i in idx if len(seqs[i]) <= self.max_len]
            for i in idx:
                too_long[owner[i]] |= len(seqs[i]) > self.max_len
            if not fits:
                continue
            x, mask = pad_batch([seqs[i] for i in fits], self.pad_id, side="left")
            n = max(len(conts[i]) for i in fits)
            logits, _ = causal_lm_logits(self.model, x.to(self.device), mask.to(self.device), keep=n + 1)
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()  # (b, n + 1, V)
            digits = self._digit_start(logp.shape[-1])
            for row, i in enumerate(fits):
                c = conts[i]
                # entry e of logp predicts the token at position len - n + e; c[j] sits at len - len(c) + j
                lp = sum(logp[row, n - len(c) + j, c[j]].item() for j in range(len(c)))
                ends = 1.0 - logp[row, n].exp()[digits].sum().item()  # after the whole rating: no further digit
                raw[owner[i]][rating[i]] = math.exp(lp) * ends
        out = []
        for n in range(len(prompts)):
            if too_long[n]:
                out.append({"probs": None, "mass": None,
                            "null_reason": f"prompt + rating over the labeler's {self.max_len} tokens"})
                continue
            out.append(normalise([raw[n][r] for r in ratings], f"zero probability on the ratings {list(ratings)}"))
        return out

    @torch.no_grad()
    def complete(self, prompts: list[str], max_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 seeds: list[int] | None = None) -> list[dict]:
        """Greedy rationales (temperature 0), or one sample each, prompt i seeded by seeds[i] (its own generator,
        so the sample does not depend on its batch mates)."""
        from minirlaif.generation import generate
        from minirlaif.models import pad_batch

        ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        out: list[dict | None] = [None] * len(prompts)
        eos = self.tokenizer.eos_token_id
        for idx in self._batches(ids):
            n_new = min(max_tokens, self.max_len - max(len(ids[i]) for i in idx))
            if n_new <= 0:  # no room in the context: the scoring step will report the prompt as too long
                for i in idx:
                    out[i] = {"text": "", "usage": {"prompt_tokens": len(ids[i]), "completion_tokens": 0}}
                continue
            x, mask = pad_batch([ids[i] for i in idx], self.pad_id, side="left")
            gen = generate(self.model, x.to(self.device), mask.to(self.device), n_new, eos_id=eos,
                           pad_id=self.pad_id, temperature=temperature or 1.0, greedy=temperature == 0,
                           seeds=None if temperature == 0 else [seeds[i] for i in idx], top_k=top_k)
            for row, i in enumerate(idx):
                toks = gen.tokens[row][gen.mask[row].bool()].tolist()
                out[i] = {"text": self.tokenizer.decode(toks, skip_special_tokens=True),
                          "usage": {"prompt_tokens": len(ids[i]), "completion_tokens": len(toks)}}
        return out


class VLLMLabeler:
    """A local LM served by vLLM. vLLM returns the top-k logprobs of the next token (k = `top_logprobs`, raised
    from vLLM's default cap of 20 via max_logprobs); a candidate outside them counts as probability 0, and a
    prompt where both are outside gets a null label. Prompts are tokenized as for HFLabeler."""

    def __init__(self, model_path: str, spec: PromptSpec | None = None, tensor_parallel_size: int = 1,
                 top_logprobs: int = 20, seed: int = 0, gpu_memory_utilization: float = 0.85):
        from minirlaif.generation import vllm_engine

        self.llm = vllm_engine(model_path, seed, tensor_parallel_size, gpu_memory_utilization,
                               max_logprobs=max(20, top_logprobs))
        self.tokenizer, self.top_logprobs, self.usage = self.llm.get_tokenizer(), top_logprobs, {}
        self.spec, self.seed = spec or PromptSpec(), seed  # seed: also the rationale samples' (lm_judge)
        self._digits: dict[int, bool] = {}  # token id -> starts with a digit (rating_probs), filled as seen

    def judge(self, queries):
        return lm_judge(self, queries)

    def _run(self, prompts, params):
        ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        results = self.llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
        return ids, results

    def choice_probs(self, prompts, choices):
        from vllm import SamplingParams

        cand = [choice_token_ids(self.tokenizer, c) for c in choices]
        ids, results = self._run(prompts, SamplingParams(max_tokens=1, temperature=0.0, logprobs=self.top_logprobs))
        out = []
        for x, res in zip(ids, results):
            top = res.outputs[0].logprobs[0]  # {token id: Logprob} of the first generated position
            raw = [sum(math.exp(top[t].logprob) for t in c if t in top) for c in cand]
            r = normalise(raw, f"neither of {list(choices)} in the top-{self.top_logprobs} logprobs")
            r["usage"] = {"prompt_tokens": len(x), "completion_tokens": 1}
            out.append(r)
        return out

    def rating_probs(self, prompts, ratings=RATINGS):
        """P(rating) after each prompt (d-RLAIF), computed as HFLabeler.rating_probs does: each rating's tokens
        scored as a continuation of the prompt (vLLM's prompt logprobs), times P(the number ends) = 1 - the
        next-token mass on digits, read from the top-`top_logprobs` next tokens (digits outside them count as 0).
        The ten sequences of a prompt share its prefix, which vLLM's prefix cache computes once."""
        from vllm import SamplingParams

        seqs, conts, owner, rating = rating_sequences(self.tokenizer, prompts, ratings)
        max_len = self.llm.llm_engine.model_config.max_model_len
        fits = [i for i, x in enumerate(seqs) if len(x) < max_len]  # room for the one token after the rating
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, logprobs=self.top_logprobs)
        results = self.llm.generate([{"prompt_token_ids": seqs[i]} for i in fits], params, use_tqdm=False)
        raw: list[dict] = [{} for _ in prompts]
        for i, res in zip(fits, results):
            x, c = seqs[i], conts[i]
            # prompt_logprobs[t] holds log p(x[t] | x[:t]) (position 0: None); the rating is x[-len(c):]
            lp = sum(res.prompt_logprobs[len(x) - len(c) + j][t].logprob for j, t in enumerate(c))
            top = res.outputs[0].logprobs[0]  # {token id: Logprob} after the whole rating
            for t in top.keys() - self._digits.keys():
                self._digits[t] = digit_start(self.tokenizer, t)
            ends = 1.0 - sum(math.exp(v.logprob) for t, v in top.items() if self._digits[t])
            raw[owner[i]][rating[i]] = math.exp(lp) * max(ends, 0.0)
        out = []
        for n in range(len(prompts)):
            if len(raw[n]) < len(ratings):
                out.append({"probs": None, "mass": None,
                            "null_reason": f"prompt + rating over the labeler's {max_len} tokens"})
                continue
            out.append(normalise([raw[n][r] for r in ratings], f"zero probability on the ratings {list(ratings)}"))
        return out

    def complete(self, prompts, max_tokens, temperature=0.0, top_k=0, seeds=None):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        if temperature > 0:  # one seeded sample per prompt (top_k -1: all tokens)
            params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k or -1, seed=s)
                      for s in seeds]
        ids, results = self._run(prompts, params)
        # decoded here as HFLabeler decodes: vLLM's incremental detokenizer drops a trailing partial UTF-8
        # character where decode() writes U+FFFD, and the rationale is part of the scoring prompt
        return [{"text": self.tokenizer.decode(r.outputs[0].token_ids, skip_special_tokens=True),
                 "usage": {"prompt_tokens": len(x), "completion_tokens": len(r.outputs[0].token_ids)}}
                for x, r in zip(ids, results)]


class APIError(RuntimeError):
    """An API request failed for good: a non-retryable status, or the retry budget is spent."""


# statuses worth retrying: rate limits, timeouts and server errors; others (400, 401, 404, ...) will not improve
_RETRY_STATUS = {408, 409, 429}
MAX_BODY_BYTES = 8 * 2**20  # a chat-completions answer of one token or one rationale is a few kB
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "requests", "usage_unknown")


class _Retry(Exception):
    """A failed attempt worth retrying; its message (already redacted) is the last error reported."""


def redact(obj, secret: str):
    """`obj` (str, or dicts / lists of them) with every occurrence of `secret` replaced by [REDACTED]."""
    if not secret:
        return obj
    if isinstance(obj, str):
        return obj.replace(secret, "[REDACTED]")
    if isinstance(obj, dict):
        return {k: redact(v, secret) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v, secret) for v in obj]
    return obj


def _read_usage(answer) -> tuple[dict, bool]:
    """Token counts of a 200 answer, and whether they could be read (a valid answer is kept either way)."""
    usage = answer.get("usage") if isinstance(answer, dict) else None
    try:
        counts = {k: int(usage[k]) for k in ("prompt_tokens", "completion_tokens")}
        if all(v >= 0 for v in counts.values()):
            return counts, True
    except (TypeError, KeyError, ValueError, OverflowError):
        pass
    return {"prompt_tokens": 0, "completion_tokens": 0}, False


def _logprob(x) -> float:
    """A top-logprob value, checked: a number <= 0 (-inf allowed). Raises ValueError on anything else (NaN, a
    positive "logprob" of 1000 that math.exp would overflow on)."""
    lp = float(x)  # raises on non-numbers
    if math.isnan(lp) or lp > 1e-4:  # 1e-4: rounding of a probability of 1
        raise ValueError(f"invalid logprob {x!r}")
    return min(lp, 0.0)


class OpenAILabeler:
    """Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM's server, llama.cpp, ...), via http.client.

    Each prompt is one user message. Scoring requests ask for one token with `logprobs` and `top_logprobs` and
    read "1" / "2" from the top list; rationales are greedy (temperature 0) completions. Requests run
    `max_concurrency` at a time; 429 / 5xx / timeouts / connection errors / malformed bodies are retried with
    exponential backoff and full jitter (honouring Retry-After), then raise APIError. `request_timeout` is a
    deadline for the whole request (connect, send, every byte of the answer), not for each read. Invalid
    logprobs (NaN, positive) give a null label with the reason, not a retry and not a guess. Every attempt's
    tokens are counted in the row's usage (failed but billed attempts too), with the number of attempts
    (`requests`, answered or not) and of answers whose usage could not be read (`usage_unknown`).

    The key comes from the environment variable OPENAI_API_KEY only, is never printed or stored, and is redacted
    from everything a server sends back (error bodies that echo the request headers, answers) before it is
    raised, returned or written.
    """

    def __init__(self, api_base: str, model: str, spec: PromptSpec | None = None, top_logprobs: int = 20,
                 max_concurrency: int = 8, max_retries: int = 6, retry_base_delay: float = 1.0,
                 retry_max_delay: float = 60.0, request_timeout: float = 60.0, seed: int = 0):
        if not model:
            raise ValueError("the openai labeler needs --api-model")
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.model, self.spec, self.top_logprobs, self.seed = model, spec or PromptSpec(), top_logprobs, seed
        self.max_concurrency, self.max_retries = max_concurrency, max_retries
        self.base_delay, self.max_delay, self.timeout = retry_base_delay, retry_max_delay, request_timeout
        self._key = os.environ.get("OPENAI_API_KEY", "")
        self._lock, self._jitter = threading.Lock(), random.Random()
        self.usage = {"requests": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0, "usage_unknown": 0}

    def judge(self, queries):
        return lm_judge(self, queries)

    def __repr__(self):  # never show the key
        return f"OpenAILabeler(url={self.url!r}, model={self.model!r})"

    def _count(self, **kw):
        with self._lock:
            for k, v in kw.items():
                self.usage[k] += v

    def _request(self, data: bytes, headers: dict) -> tuple[int, object, bytes]:
        """One POST -> (status, headers, body), all of it within `self.timeout` seconds.

        Why a timer: a socket timeout bounds each read only, so a server sending a byte every 0.4 s would hold
        a request for ever at timeout 1. At the deadline the timer shuts the socket down, which wakes the
        blocked read; what was read by then is thrown away.
        """
        url = urllib.parse.urlsplit(self.url)
        conn_cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(url.hostname, url.port, timeout=self.timeout)
        expired, sock = threading.Event(), []

        def expire():
            expired.set()
            for s in sock:  # the plain socket's shutdown (an SSL socket's own would drop its state under the read)
                try:
                    socket.socket.shutdown(s, socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(self.timeout, expire)
        timer.start()
        try:
            try:
                conn.connect()
                sock.append(conn.sock)  # kept: the connection drops its reference once the response is read
                if expired.is_set():  # the deadline passed while connecting, before there was a socket to shut
                    raise TimeoutError
                conn.request("POST", url.path + (f"?{url.query}" if url.query else ""), body=data, headers=headers)
                resp = conn.getresponse()
                body = resp.read(MAX_BODY_BYTES + 1)
            except (OSError, http.client.HTTPException):
                if expired.is_set():
                    raise TimeoutError(f"no complete answer within the {self.timeout} s request timeout") from None
                raise
            if expired.is_set():  # a read cut by the shutdown can look like the end of a body without a length
                raise TimeoutError(f"no complete answer within the {self.timeout} s request timeout")
            if len(body) > MAX_BODY_BYTES:
                raise ValueError(f"answer longer than {MAX_BODY_BYTES} bytes")
            return resp.status, resp.headers, body
        finally:
            timer.cancel()
            conn.close()

    def _post(self, body: dict, parse):
        """POST a request and parse its JSON answer with `parse` (which raises on a malformed body), retrying.
        -> (parsed answer, usage of all attempts: {prompt_tokens, completion_tokens, requests, usage_unknown})."""
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = "Bearer " + self._key
        spent = dict.fromkeys(USAGE_KEYS, 0)  # over every attempt of this request
        last, retry_after = "", 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count(retries=1)
                delay = self._jitter.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))
                time.sleep(max(delay, min(retry_after, self.max_delay)) if retry_after else delay)
            retry_after = 0.0
            spent["requests"] += 1  # every attempt, answered or not (a timed-out request may be billed too)
            self._count(requests=1)
            try:
                try:
                    status, resp_headers, raw = self._request(data, headers)
                except (TimeoutError, ConnectionError, OSError, http.client.HTTPException, ValueError) as e:
                    raise _Retry(f"{type(e).__name__}: {e}") from None
                if status != 200:
                    detail = redact(raw[:4096].decode("utf-8", "replace"), self._key)[:300]
                    if status not in _RETRY_STATUS and status < 500:
                        raise APIError(f"{self.url}: HTTP {status} (not retryable): {detail}")
                    try:
                        retry_after = float(resp_headers.get("Retry-After") or 0)
                    except ValueError:
                        retry_after = 0.0
                    raise _Retry(f"HTTP {status}: {detail}")
                try:
                    answer = json.loads(raw)
                except ValueError as e:  # incl. JSONDecodeError and bad UTF-8: an HTML page, a cut body
                    raise _Retry(f"malformed response: {type(e).__name__}: {e}") from None
                usage, known = _read_usage(answer)
                for k, v in {**usage, "usage_unknown": int(not known)}.items():  # billed even if malformed
                    spent[k] += v
                self._count(**usage, usage_unknown=int(not known))
                try:
                    return redact(parse(answer), self._key), spent
                except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
                    raise _Retry(f"malformed response: {type(e).__name__}: {e}") from None
            except _Retry as e:
                last = redact(str(e), self._key)
        raise APIError(f"{self.url}: giving up after {self.max_retries + 1} attempts ({spent['prompt_tokens']} "
                       f"prompt and {spent['completion_tokens']} completion tokens billed); last error: {last}")

    def _map(self, fn, xs):
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, self.max_concurrency))
        try:
            return list(pool.map(fn, xs))
        finally:  # on an error, requests not yet started are cancelled; those in flight finish
            pool.shutdown(wait=True, cancel_futures=True)

    def _body(self, prompt: str, **kw) -> dict:
        return {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0.0,
                "seed": self.seed, **kw}

    def choice_probs(self, prompts, choices):
        variants = [(c, " " + c) for c in choices]

        def parse(answer):
            first = answer["choices"][0]["logprobs"]["content"][0]
            top = [(t["token"], t["logprob"]) for t in first["top_logprobs"]]
            try:
                top = [(tok, _logprob(lp)) for tok, lp in top]
            except ValueError as e:  # a broken server, not a flaky one: no retry, and no made-up label
                return {"probs": None, "mass": None, "null_reason": f"the API returned an {e}"}
            raw = [sum(math.exp(lp) for tok, lp in top if tok in v) for v in variants]
            best = max(top, key=lambda t: t[1])[0] if top else None
            return normalise(raw, f"neither of {list(choices)} in the top-{len(top)} logprobs (top token {best!r})")

        def one(prompt):
            result, usage = self._post(self._body(prompt, max_tokens=1, logprobs=True,
                                                  top_logprobs=self.top_logprobs), parse)
            return {**result, "usage": usage}

        return self._map(one, prompts)

    def rating_probs(self, prompts, ratings=RATINGS):
        """P(rating) after each prompt (d-RLAIF), from a greedy answer of two tokens with their top logprobs.

        The first position's top list gives every rating the API's tokenizer spells as one token (" 7", "10").
        The second position's list is conditional on the token the model chose first; when that is a rating
        ("1"), it gives P(no digit follows), so "1" counts as 1 only that often, and P("1" + "0") goes to 10.
        Exact for tokenizers that spell 1..10 as single tokens (OpenAI's since cl100k, Llama 3). Where "10" is
        split and the answer does not begin with "1", P("0" | "1") is not in the answer and rating 1 keeps all of
        P("1"): for such models use the hf or vllm labeler, which score every rating as a continuation. A
        request that fails for good (APIError) gives a null rating with the reason, never a made-up one."""
        names = {str(r): r for r in ratings}

        def parse(answer):
            content = answer["choices"][0]["logprobs"]["content"]
            try:
                tops = [[(t["token"], _logprob(t["logprob"])) for t in pos["top_logprobs"]] for pos in content[:2]]
            except ValueError as e:  # a broken server, not a flaky one: no retry, and no made-up rating
                return {"probs": None, "mass": None, "null_reason": f"the API returned an {e}"}
            raw = dict.fromkeys(ratings, 0.0)
            for tok, lp in tops[0]:
                if tok.strip() in names:
                    raw[names[tok.strip()]] += math.exp(lp)
            chosen = content[0]["token"]
            if len(tops) > 1 and chosen.strip() in names:  # what follows the chosen rating token
                p_chosen = sum(math.exp(lp) for tok, lp in tops[0] if tok == chosen)
                digits = [(tok, math.exp(lp)) for tok, lp in tops[1] if tok[:1].isdigit()]
                raw[names[chosen.strip()]] -= p_chosen * sum(p for _, p in digits)  # a longer number, not this one
                for tok, p in digits:
                    if chosen.strip() + tok in names:  # "1" + "0"
                        raw[names[chosen.strip() + tok]] += p_chosen * p
            best = max(tops[0], key=lambda t: t[1])[0] if tops[0] else None
            return normalise([max(raw[r], 0.0) for r in ratings],
                             f"no rating among the top-{len(tops[0])} logprobs (top token {best!r})")

        def one(prompt):
            try:
                result, usage = self._post(self._body(prompt, max_tokens=2, logprobs=True,
                                                      top_logprobs=self.top_logprobs), parse)
            except APIError as e:
                return {"probs": None, "mass": None, "null_reason": str(e), "usage": None}
            return {**result, "usage": usage}

        return self._map(one, prompts)

    def complete(self, prompts, max_tokens, temperature=0.0, top_k=0, seeds=None):
        """Greedy rationales, or one sample each at `temperature` seeded by seeds[i] (the chat-completions API has
        no top-k: `top_k` is not sent)."""
        def parse(answer):
            text = answer["choices"][0]["message"]["content"]
            if not isinstance(text, str):
                raise TypeError(f"message content is {type(text).__name__}, not text")
            return text

        def one(i):
            sampling = {"temperature": temperature, "seed": seeds[i]} if temperature > 0 else {}
            text, usage = self._post(self._body(prompts[i], max_tokens=max_tokens, **sampling), parse)
            return {"text": text, "usage": usage}

        return self._map(one, range(len(prompts)))


# ----------------------------------------------------------------------------------------------------------------
# configuration and construction


@dataclass
class JudgeConfig:
    """Labeler settings; label.py's Config extends it, and any object with these attributes works."""
    labeler: str = "rule"
    """rule: the synthetic task's judge (needs its facts); hf: a local causal LM; vllm: a local LM via vLLM;
    openai: an OpenAI-compatible chat-completions endpoint"""
    judge_model: str = ""
    """hf / vllm labeler: hub id or path of the LM"""
    preamble: str = "detailed"
    """base (which summary is better, answer 1 or 2) or detailed (adds the qualities: coherence, accuracy,
    coverage, overall quality)"""
    shots: int = 0
    """few-shot exemplars in the prompt (the paper found 0 as good as more)"""
    exemplars: str = ""
    """jsonl file of exemplars (empty: minirlaif/exemplars.jsonl)"""
    cot: bool = False
    """chain of thought: decode a rationale greedily first, then read the answer after it"""
    cot_max_tokens: int = 512
    """longest rationale, in tokens"""
    sc_samples: int = 1
    """self-consistency (with --cot): rationales sampled per pair and order, each scored, their preference
    distributions averaged (1: one rationale)"""
    sc_temperature: float = 0.0
    """temperature of the rationales (0: greedy; the paper's self-consistency used 0.3 to 1.0)"""
    sc_top_k: int = 40
    """rationale sampling keeps the k most likely tokens (0: all; the paper: 40; not sent to the OpenAI API)"""
    rule_temperature: float = 0.1
    """rule labeler: P(first better) = sigmoid(score difference / this + bias + noise)"""
    rule_position_bias: float = 0.0
    """rule labeler: logit added toward the summary shown first (negative: the second), simulating LLM position bias"""
    rule_noise: float = 0.0
    """rule labeler: std of Gaussian noise on the logit, seeded per (pair, order)"""
    judge_batch_size: int = 8
    """hf labeler: prompts per forward pass"""
    device: str = "auto"
    """hf labeler and sampler: cuda when available, else cpu (or name one)"""
    top_logprobs: int = 20
    """vllm / openai: how many top next tokens to read "1" and "2" from (OpenAI allows at most 20)"""
    tensor_parallel_size: int = 1
    """vllm: GPUs per model"""
    gpu_memory_utilization: float = 0.85
    """vllm: fraction of GPU memory it may take"""
    api_base: str = "https://api.openai.com/v1"
    """openai: base URL of the chat-completions endpoint (the key is read from OPENAI_API_KEY only)"""
    api_model: str = ""
    """openai: model name sent with each request"""
    max_concurrency: int = 8
    """openai: requests in flight at once"""
    max_retries: int = 6
    """openai: retries of a request (429, 5xx, timeout, malformed body) before giving up with an error"""
    retry_base_delay: float = 1.0
    """openai: first backoff delay in seconds (doubled per retry, full jitter)"""
    retry_max_delay: float = 60.0
    """openai: longest backoff delay in seconds"""
    request_timeout: float = 60.0
    """openai: deadline in seconds for a whole request (connect, send, the last byte of the answer), then a retry"""
    price_input_per_1m: float = 0.0
    """openai / vllm: price per million prompt tokens, for the cost estimate in metrics.json"""
    price_output_per_1m: float = 0.0
    """openai / vllm: price per million completion tokens"""


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def make_labeler(cfg, seed: int | None = None):
    """A labeler from a JudgeConfig or any object with some of its attributes (the others take its defaults)."""
    c = JudgeConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(JudgeConfig) if hasattr(cfg, f.name)})
    seed = getattr(cfg, "seed", 0) if seed is None else seed
    if c.labeler == "rule":
        return RuleLabeler(c.rule_temperature, c.rule_position_bias, c.rule_noise, seed=seed)
    if c.preamble not in PREAMBLES:
        raise ValueError(f"unknown preamble {c.preamble!r}; one of {sorted(PREAMBLES)}")
    if c.sc_samples < 1 or c.sc_temperature < 0 or c.sc_top_k < 0 or (c.sc_samples > 1 and not c.cot):
        raise ValueError(f"self-consistency needs --cot, --sc-samples >= 1, --sc-temperature >= 0 and --sc-top-k >= 0 "
                         f"(got {c.sc_samples}, {c.sc_temperature}, {c.sc_top_k}, cot {c.cot})")
    spec = PromptSpec(c.preamble, load_exemplars(c.exemplars, c.shots, c.cot), c.cot, c.cot_max_tokens,
                      c.sc_samples, c.sc_temperature, c.sc_top_k)
    if c.labeler == "hf":
        from transformers import AutoTokenizer

        from minirlaif.models import load_causal_lm

        if not c.judge_model:
            raise ValueError("the hf labeler needs --judge-model")
        device = resolve_device(c.device)
        dtype = torch.bfloat16 if device.startswith("cuda") else None
        model = load_causal_lm(c.judge_model, dtype=dtype).to(device)
        return HFLabeler(model, AutoTokenizer.from_pretrained(c.judge_model), spec, c.judge_batch_size, device,
                         seed)
    if c.labeler == "vllm":
        if not c.judge_model:
            raise ValueError("the vllm labeler needs --judge-model")
        return VLLMLabeler(c.judge_model, spec, c.tensor_parallel_size, c.top_logprobs, seed,
                           c.gpu_memory_utilization)
    if c.labeler == "openai":
        if c.top_logprobs > 20:
            raise ValueError(f"--top-logprobs {c.top_logprobs}: OpenAI-compatible APIs return at most 20")
        return OpenAILabeler(c.api_base, c.api_model, spec, c.top_logprobs, c.max_concurrency, c.max_retries,
                             c.retry_base_delay, c.retry_max_delay, c.request_timeout, seed)
    raise ValueError(f"unknown labeler {c.labeler!r}; one of rule, hf, vllm, openai")


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
