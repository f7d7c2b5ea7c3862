"""The labelers that answer the paper's prompt: one class per backend, built by `make_labeler`.

  rule    RuleLabeler: the synthetic task's rule judge (reads the post's `facts`), with noise and position bias
  hf      HFLabeler: any local causal LM through transformers (chat template applied when it has one)
  vllm    VLLMLabeler: a local LM served by vLLM (imported lazily; top-k logprobs)
  openai  OpenAILabeler (minirlaif.openai_api): any OpenAI-compatible chat-completions endpoint

Every labeler has `judge(queries) -> verdicts` (one ordered pair each: {"p_first", "mass", "rationale",
"null_reason", "usage"}), `rating_probs` (d-RLAIF: P(rating 1..10) of one summary) and a `usage` dict of counters
for this process. The LM labelers also have `choice_probs(prompts, choices)` (normalised probabilities of
single-token answers after each prompt) and `complete(prompts, max_tokens, temperature, top_k, seeds)` (greedy text
at temperature 0, else one seeded sample per prompt), which is all `judges.lm_judge` needs. What the prompt says
and how labels are averaged over orders is in `minirlaif.judges`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Annotated

import torch

from minirlaif.config import Choice, NonNegative, Positive, Rule
from minirlaif.judges import (RATINGS, PromptConfig, PromptSpec, build_rating_prompt, lm_judge, normalise,
                              prompt_spec, rating_reward)
from minirlaif.openai_api import OpenAILabeler
from minirlaif.tasks import TaskConfig, get_task

LABELERS = ("rule", "hf", "vllm", "openai")


@dataclass
class LabelerConfig(TaskConfig):
    """Which labeler answers, and its backend's settings (label.py, evaluate.py and d-RLAIF extend this); --task
    gives what it is asked (the prompt's words) and, for the rule labeler, the judge that scores."""
    labeler: Choice(*LABELERS) = "rule"
    """rule: the synthetic task's judge (needs its facts); hf: a local causal LM; vllm: a local LM via vLLM;
    openai: an OpenAI-compatible chat-completions endpoint"""
    judge_model: str = ""
    """hf / vllm labeler: hub id or path of the LM"""
    rule_temperature: Positive[float] = 0.1
    """rule labeler: P(first better) = sigmoid(score difference / this + bias + noise)"""
    rule_position_bias: float = 0.0
    """rule labeler, pairs: logit added toward the summary shown first (negative: the second), as LLMs are biased"""
    rule_noise: NonNegative[float] = 0.0
    """rule labeler: std of Gaussian noise on the logit, seeded per (pair, order) (d-RLAIF: per response, times
    rule_temperature in score units)"""
    judge_batch_size: Positive[int] = 8
    """hf labeler: prompts per forward pass"""
    device: str = "auto"
    """hf labeler (and label.py / evaluate.py's sampler): cuda when available, else cpu (or name one)"""
    top_logprobs: Positive[int] = 20
    """vllm / openai: how many top next tokens to read the answer from (OpenAI allows at most 20)"""
    tensor_parallel_size: Positive[int] = 1
    """vllm: GPUs per model"""
    gpu_memory_utilization: Annotated[float, Rule(lambda v: 0 < v <= 1, "must be in (0, 1]")] = 0.85
    """vllm labeler (and label.py / evaluate.py's vLLM sampling): fraction of GPU memory it may take"""
    api_base: str = "https://api.openai.com/v1"
    """openai: base URL of the chat-completions endpoint (the key is read from OPENAI_API_KEY only)"""
    api_model: str = ""
    """openai: model name sent with each request"""
    max_concurrency: Positive[int] = 8
    """openai: requests in flight at once"""
    max_retries: NonNegative[int] = 6
    """openai: retries of a request (429, 5xx, timeout, malformed body) before giving up"""
    retry_base_delay: NonNegative[float] = 1.0
    """openai: first backoff delay in seconds (doubled per retry, full jitter)"""
    retry_max_delay: NonNegative[float] = 60.0
    """openai: longest backoff delay in seconds"""
    request_timeout: Positive[float] = 60.0
    """openai: deadline in seconds for a whole request (connect, send, the last byte of the answer), then a retry"""
    price_input_per_1m: NonNegative[float] = 0.0
    """openai / vllm: price per million prompt tokens, for the cost estimate in metrics.json"""
    price_output_per_1m: NonNegative[float] = 0.0
    """openai / vllm: price per million completion tokens"""


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def make_labeler(cfg: LabelerConfig, seed: int):
    """The labeler `cfg` names. A config that is also a PromptConfig (label.py's, evaluate.py's) prompts with its
    settings; one that is not (d-RLAIF's: the rating prompt has no knobs) with the defaults."""
    c, task = cfg, get_task(cfg.task)
    if c.labeler == "rule":
        return RuleLabeler(c.rule_temperature, c.rule_position_bias, c.rule_noise, seed=seed, score=task.score)
    spec = prompt_spec(cfg if isinstance(cfg, PromptConfig) else PromptConfig(), task)
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
    if c.top_logprobs > 20:
        raise ValueError(f"--top-logprobs {c.top_logprobs}: OpenAI-compatible APIs return at most 20")
    return OpenAILabeler(c.api_base, c.api_model, spec, c.top_logprobs, c.max_concurrency, c.max_retries,
                         c.retry_base_delay, c.retry_max_delay, c.request_timeout, seed)


def labeler_settings(cfg: LabelerConfig) -> dict:
    """The fields that change what `cfg`'s labeler answers (a cache of its answers is keyed by them)."""
    prompt = ["preamble", "shots", "exemplars", "cot", "cot_max_tokens", "sc_samples", "sc_temperature", "sc_top_k"]
    keys = {"rule": ["rule_temperature", "rule_position_bias", "rule_noise"],
            "hf": ["judge_model", *prompt],
            "vllm": ["judge_model", *prompt, "top_logprobs"],
            "openai": ["api_base", "api_model", *prompt, "top_logprobs"]}[cfg.labeler]
    return {k: getattr(cfg, k) for k in keys if hasattr(cfg, k)}


def direct_scores(labeler, items: list[dict], summary_key: str = "summary") -> list[float | None]:
    """d-RLAIF rewards of {"id", "subreddit", "title", "post", "facts", summary_key} items, in [-1, 1]; None where
    the labeler could not rate (the reason is in its `rating_probs` row). One batched labeler call for all."""
    if isinstance(labeler, RuleLabeler):
        rows = labeler.rating_probs(items, summary_key)
    elif hasattr(labeler, "rating_probs"):
        spec = getattr(labeler, "spec", None) or PromptSpec()  # the task's words (a bare rater: TL;DR's)
        styles = [spec.style(it) for it in items]
        rows = labeler.rating_probs([build_rating_prompt(st.render(it), it[summary_key], st)
                                     for it, st in zip(items, styles)])
    else:
        raise ValueError(f"{type(labeler).__name__} cannot rate single summaries (d-RLAIF needs a labeler with "
                         f"rating_probs: rule, hf, vllm or openai)")
    return [None if r["probs"] is None else rating_reward(r["probs"]) for r in rows]


# ----------------------------------------------------------------------------------------------------------------
# tokens of an answer


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


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt as the labeler should see it: inside a user turn when the tokenizer has a chat
    template (instruction-tuned labelers), else as plain text (with the tokenizer's own BOS, if it adds one)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


# ----------------------------------------------------------------------------------------------------------------
# backends


class RuleLabeler:
    """The synthetic task's judge as a labeler: P(first better) = sigmoid((s1 - s2) / T + bias + noise).

    `position_bias` (a logit toward the first position) and `noise` simulate an imperfect LLM labeler. The noise
    of each (pair, order) comes from its own RNG seeded by (seed, id, order), so a label does not depend on what
    else is in the batch, and a resumed run writes the labels an uninterrupted one would.
    """

    def __init__(self, temperature: float = 0.1, position_bias: float = 0.0, noise: float = 0.0, seed: int = 0,
                 score=None):
        from minirlaif.synthetic import RuleJudge, score as summary_score

        # `score`: the task's rule judge (minirlaif.tasks; default the synthetic TL;DR task's)
        self.score = score or summary_score
        self.judge_fn = RuleJudge(temperature=temperature, position_bias=position_bias, noise=noise, score=self.score)
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
        out = []
        for it in items:
            if not it.get("facts"):
                raise ValueError(f"{it.get('id')}: the rule labeler reads the synthetic task's `facts`, which this "
                                 f"post does not have; rate real data with --labeler hf")
            s = self.score({"facts": it["facts"]}, it[summary_key])
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
