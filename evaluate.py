"""Stage 5, evaluation: judge-based win rates of the policies with CIs and a length control, RM accuracies, a report.

Win rates of the trained policies against SFT, the human reference summaries and each other; the accuracy of the
reward models on held-out comparisons; report.md with the seed's and the paper's numbers, plots and samples.

Algorithm:
  1. summaries: greedy decoding of `n` held-out posts (`--split`) by each policy: by default the preset's stage dirs
     that hold a saved model, `sft`, `ppo` (RLAIF) and `ppo_rlhf` (RLHF); or `--policy NAME=PATH`, repeatable.
     vLLM when available (`--backend auto`), else the shared KV-cache sampler. Each policy's summaries are cached in
     out_dir/generations under a key of the policy's content hash and the generation settings, appended chunk by
     chunk: a rerun, or a run after a kill, generates only what is missing;
  2. judgments: every policy vs SFT, every policy vs the dataset's reference summary, RLAIF vs RLHF. The judge (the
     labelers of `minirlaif.judges`, as in label.py) sees each pair in both orders and the two un-flipped
     probabilities are averaged (`judges.judge_pairs`); identical summaries are ties without a judge call. Rows are
     cached in out_dir/judgments (an API judge is paid per call) under a key of the judge's settings;
  3. statistics (`minirlaif.stats`): each pair is a win, tie or loss from the averaged probability, the win rate
     counts ties as half, with a seeded bootstrap 95% CI, tie rate, mean lengths in words and tokens, and a
     length-controlled win rate (logistic regression of the outcome on the log length ratio, read at ratio 1);
     a dialogue task also gets each policy's harmless rate: the fraction of its responses to the harmful prompts
     that the judge calls harmless (the rule judge's verdict on the synthetic task; an LM judge's "1" harmless /
     "2" harmful after `judges.build_verdict_prompt`, cached, on real HH), with a bootstrap 95% CI;
  4. reward models: the accuracy of each RM (`rm`: AI feedback, `rm_human`: human feedback, or `--rm NAME=PATH`)
     on the held-out human comparisons with rater confidence >= 8, and on its AI-labeled test split when its
     labels are found, with `reward.evaluate_pairs` (the function train_rm.py reports with);
  5. out_dir: eval.json (everything, incl. per-pair outcomes), metrics.json (headline numbers), report.md (tables
     next to the seed's and the paper's numbers, side-by-side samples), PNG plots, manifest.json.

Deliberate choices (docs/algorithms.md has the details and their sources):
- both judge orders, averaged (the seed showed one random order; a position-biased judge then adds noise and, with
  an unseeded order, irreproducibility); a judge that always prefers the first position scores exactly 0.5;
- greedy decoding, as the seed; every number comes with a bootstrap CI over prompts;
- tiny preset: the judge is the synthetic task's rule judge without noise or position bias (the gold judge), so
  the win rates measure real quality differences and not the AI labeler's errors; its scores are reported too.

Commands:
  CPU, tiny (default; after the other stages):  python evaluate.py
  chosen policies:                              python evaluate.py --policy sft=runs/tiny/sft --policy ppo=runs/tiny/ppo
  test split, more prompts:                     python evaluate.py --split test --n 400
  the dialogue task (helpful and harmless):     python evaluate.py --preset hh-tiny
  gpt2-large (GPT-4o judge, as the seed):       OPENAI_API_KEY=... python evaluate.py --preset gpt2-large
  gpt2-large, a local judge on vLLM:            python evaluate.py --preset gpt2-large --judge vllm \\
                                                --judge-model meta-llama/Llama-3.3-70B-Instruct --tensor-parallel-size 4
"""

from __future__ import annotations

import collections
import functools
import gc
import hashlib
import json
import re
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch

from minirlaif import stats
from minirlaif.config import Choice, NonNegative, Positive, PositiveOrAll, Rule, UserError
from minirlaif.data import load_posts
from minirlaif.generation import generate_texts, vllm_generate
from minirlaif.judges import CHOICES, PromptConfig, build_verdict_prompt, judge_pairs, position_bias
from minirlaif.labelers import LabelerConfig, labeler_settings, make_labeler, resolve_device
from minirlaif.models import check_model, load_causal_lm, load_scalar_model, load_tokenizer, set_attention
from minirlaif.report import aggregate_seeds, algorithm_rows, make_plots, pct, read_ppo_curves, write_report
from minirlaif.reward import Encoder, evaluate_pairs, load_ai_pairs, load_human_pairs, split_by_id
from minirlaif.run import Run, cli, progress
from minirlaif.tasks import get_task
from minirlaif.utils import (GENERATION_SCHEMA, JUDGMENT_SCHEMA, PROB, append_jsonl, read_json,
                             read_jsonl_resumable, unique_ids, write_json)


@dataclass
class Config(LabelerConfig, PromptConfig):  # the judge: --labeler (rule: the gold judge) and its settings, inherited
    preset: str = "tiny"
    """tiny: synthetic task, gold rule judge, CPU; micro: a few prompts, for tests; gpt2-large: the seed's setup"""
    out_dir: str = "runs/{preset}/eval"
    """where eval.json, metrics.json, report.md, the plots, manifest.json and the caches go"""
    seed: int = 1
    """seeds the bootstraps and the judge (rule noise, API seed)"""
    resume: bool = True
    """reuse the cached summaries and judgments in out_dir (--no-resume deletes them first)"""
    task_dir: str = "runs/{preset}/data"
    """tiny: where the synthetic task's files are written (if missing); empty for real data"""
    runs_dir: str = "runs/{preset}"
    """where the default stage dirs are looked up: sft, ppo, ppo_rlhf, rm, rm_human, labels"""
    policy: list[str] = field(default_factory=list)
    """NAME=PATH of a policy to evaluate, repeatable; none given: sft, ppo (RLAIF), ppo_rlhf (RLHF) and the RL
    variants (run_pipeline.sh ALGOS) found in runs_dir"""
    rm: list[str] = field(default_factory=list)
    """NAME=PATH of a reward model to score, repeatable; none given: rm (AI feedback) and rm_human in runs_dir"""
    aggregate: list[str] = field(default_factory=list)
    """eval dirs of several seeds' runs, repeatable: only aggregate their eval.json into out_dir (per-seed win
    rates, mean, t-interval over seeds); run_pipeline.sh SEEDS="1 2 3" does this"""
    dataset: str = "runs/{preset}/data/sft"
    """evaluation posts with their reference summaries: hub id or local file/dir (tldr or prompt/completion schema)"""
    split: str = "validation"
    """the held-out split of the dataset (the seed reported on validation; use test for final numbers)"""
    n: PositiveOrAll[int] = 400
    """evaluate the first n posts of the split (-1: all)"""
    backend: Choice("auto", "hf", "vllm") = "auto"
    """summaries: auto (vllm when it is installed and a GPU is present, else hf), hf (the shared sampler) or vllm"""
    max_query_tokens: Positive[int] = 200
    """queries longer than this are cut at the post's last newline, as in training"""
    max_new_tokens: Positive[int] = 48
    """longest summary in tokens (greedy decoding stops earlier at EOS)"""
    gen_batch_size: Positive[int] = 64
    """hf backend: sequences per batch"""
    gen_chunk: Positive[int] = 256
    """hf backend: posts per cache append (a kill loses at most this many summaries)"""
    judge_chunk: Positive[int] = 64
    """pairs per judging step; each step's rows are appended to the judgment cache"""
    tie_eps: Annotated[float, Rule(lambda v: 0 <= v < 0.5, "must be in [0, 0.5)")] = stats.TIE_EPS
    """a pair is a tie when the averaged P(policy better) is within this of 0.5"""
    n_bootstrap: Positive[int] = 2000
    """bootstrap resamples for the 95 percent CIs of the win rate and the length-controlled win rate"""
    lc_feature: Choice("log_ratio", "ratio") = "log_ratio"
    """length control regressor: log_ratio (log of the word-length ratio) or ratio (the ratio - 1, as the paper)"""
    comparisons: str = "runs/{preset}/data/comparisons"
    """human comparisons (openai/summarize_from_feedback schema); their validation split scores the reward models"""
    labels_path: str = ""
    """AI-labeled pairs for the RMs' AI test split; empty: each RM's own (from its manifest.json)"""
    n_rm_eval: PositiveOrAll[int] = -1
    """score the RMs on at most this many human comparisons of confidence >= 8 (seeded sample; -1: all)"""
    rm_batch_size: Positive[int] = 64
    """RM scoring: sequences per forward pass"""
    bf16: bool = False
    """bf16 autocast for the hf sampler and RM scoring, on GPU or CPU (the CPU presets tiny and micro run fp32)"""
    n_samples: NonNegative[int] = 4
    """side-by-side samples in report.md and eval.json"""


PRESETS = {
    "micro": dict(n=8, max_new_tokens=16, gen_batch_size=8, gen_chunk=4, judge_chunk=4, n_bootstrap=100,
                  n_rm_eval=32, rm_batch_size=16, n_samples=2),
    "smol": dict(n=250, max_query_tokens=160, max_new_tokens=48, gen_batch_size=64, gen_chunk=64, n_rm_eval=200,
                 rm_batch_size=32),
    # the seed: 1000 validation prompts, GPT-4o as judge; our gpt2-large PPO responses are up to 128 tokens
    "gpt2-large": dict(task_dir="", dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered", n=1000,
                       max_query_tokens=512, max_new_tokens=128, gen_batch_size=32, gen_chunk=512, labeler="openai",
                       api_model="gpt-4o", judge_chunk=256, comparisons="openai/summarize_from_feedback",
                       rm_batch_size=32, n_samples=6,
                       bf16=True),
}

# train_ppo.py runs with other estimators or the d-RLAIF reward (run_pipeline.sh ALGOS=...): each is compared with
# SFT and with PPO-RLAIF (`ppo`)
VARIANTS = ("reinforce", "rloo", "grpo", "reinforce++", "dr-grpo", "direct")
REFERENCE = "reference"  # the baseline name of the dataset's human-written summaries


# ----------------------------------------------------------------------------------------------------------------
# helpers: what to evaluate


def parse_named(specs: list[str], flag: str) -> dict[str, str]:
    """["NAME=PATH", ...] -> {NAME: PATH}, with a clear error for a malformed or repeated name."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--{flag} expects NAME=PATH, got {spec!r}")
        if name in out or name == REFERENCE:
            raise UserError(f"--{flag}: the name {name!r} is {'reserved' if name == REFERENCE else 'given twice'}")
        out[name] = path
    return out


def find_models(specs: list[str], defaults: dict[str, Path], flag: str) -> dict[str, str]:
    """The models named on the command line (each must exist), else the default stage dirs that hold a saved model."""
    if specs:
        named = parse_named(specs, flag)
        for name, path in named.items():
            check_model(path, "causal-lm" if flag == "policy" else "reward-model", f"--{flag} {name}=")
        return named
    found = {name: str(path) for name, path in defaults.items() if (path / "config.json").is_file()}
    if missing := [name for name in defaults if name not in found]:  # not trained (or still training): not an error
        print(f"{flag}: not trained in {next(iter(defaults.values())).parent}, left out: {', '.join(missing)}")
    return found


def comparison_pairs(names: list[str], has_reference: bool) -> list[tuple[str, str]]:
    """(policy, baseline) pairs: each policy vs SFT, each vs the reference summaries, RLAIF vs RLHF, and every
    other RL policy (an estimator or reward variant) vs PPO-RLAIF."""
    pairs = [(n, "sft") for n in names if n != "sft"] if "sft" in names else []
    pairs += [(n, REFERENCE) for n in names] if has_reference else []
    if "ppo" in names and "ppo_rlhf" in names:
        pairs.append(("ppo", "ppo_rlhf"))
    if "ppo" in names:
        pairs += [(n, "ppo") for n in names if n not in ("sft", "ppo", "ppo_rlhf")]
    return pairs



def unique_by_id(posts):
    """Posts in order, each id once (the first): an id twice would share cache rows."""
    seen, out = set(), []
    for p in posts:
        if p.id not in seen:
            seen.add(p.id)
            out.append(p)
    return out


def short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def judge_settings(cfg: Config) -> dict:
    """The fields that change what the judge says (the cache key of the judgments)."""
    return {"judge": cfg.labeler, "seed": cfg.seed, **labeler_settings(cfg)}


# ----------------------------------------------------------------------------------------------------------------
# helpers: summaries


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        try:
            import vllm  # noqa: F401  (optional)
            return "vllm" if torch.cuda.is_available() else "hf"
        except ImportError:
            return "hf"
    if backend not in ("hf", "vllm"):
        raise UserError(f"--backend must be auto, hf or vllm, got {backend!r}")
    return backend


def generate_policy(name: str, path: str, sha256: str, posts, cfg: Config, backend: str, device: str,
                    cache_dir: Path) -> list[dict]:
    """Greedy summaries of `posts` by one policy, in post order: [{"id", "text", "token_ids"}].

    Cached in cache_dir/{name}.{key}.jsonl, key = hash of the policy's content (`sha256`, utils.sha256_path) and
    the generation settings; rows missing from the cache are generated and appended chunk by chunk (hf) or after
    one call (vllm).
    """
    task = get_task(cfg.task)  # what a query is
    key = short_hash({"policy_sha256": sha256, "dataset": cfg.dataset, "split": cfg.split,
                      "max_query_tokens": cfg.max_query_tokens, "max_new_tokens": cfg.max_new_tokens,
                      "backend": backend, **({"bf16": True} if cfg.bf16 and backend == "hf" else {})})
    cache = cache_dir / f"{name}.{key}.jsonl"
    cache.parent.mkdir(parents=True, exist_ok=True)
    have = unique_ids(read_jsonl_resumable(cache, GENERATION_SCHEMA), cache)
    todo = [p for p in posts if p.id not in have]
    if not todo:
        print(f"{name}: {len(posts)} summaries from the cache {cache}")
    elif backend == "vllm":
        tokenizer = load_tokenizer(path)
        queries = [task.build_query(tokenizer, p, cfg.max_query_tokens)[1] for p in todo]
        outs = vllm_generate(path, queries, n=1, max_new_tokens=cfg.max_new_tokens, temperature=0.0, seed=cfg.seed,
                             tensor_parallel_size=cfg.tensor_parallel_size,
                             gpu_memory_utilization=cfg.gpu_memory_utilization)
        append_jsonl(cache, [{"id": p.id, **o[0]} for p, o in zip(todo, outs)])
        gc.collect()  # vLLM holds GPU memory until its engine is collected
    else:
        tokenizer = load_tokenizer(path)
        model = set_attention(load_causal_lm(path).to(device).eval(), device, cfg.bf16)  # CPU bf16: eager attention
        chunks = [todo[i:i + cfg.gen_chunk] for i in range(0, len(todo), cfg.gen_chunk)]
        for chunk in progress(chunks, f"summaries {name}"):
            queries = [task.build_query(tokenizer, p, cfg.max_query_tokens)[1] for p in chunk]
            outs = generate_texts(model, tokenizer, queries, cfg.max_new_tokens, cfg.gen_batch_size, greedy=True,
                                  device=device, bf16=cfg.bf16)
            append_jsonl(cache, [{"id": p.id, **o} for p, o in zip(chunk, outs)])
        del model
    if todo and torch.cuda.is_available():
        torch.cuda.empty_cache()  # free the GPU for the next policy and the judge
    have = unique_ids(read_jsonl_resumable(cache, GENERATION_SCHEMA), cache)
    return [have[p.id] for p in posts]


def length_stats(texts: list[str], tokenizer) -> tuple[list[int], list[int]]:
    """Lengths in words and in tokens (one shared tokenizer, so every policy and the reference are counted alike)."""
    words = [len(t.split()) for t in texts]
    tokens = [len(tokenizer.encode(" " + t, add_special_tokens=False)) for t in texts]
    return words, tokens


# ----------------------------------------------------------------------------------------------------------------
# helpers: judging


def pair_sha(a: str, b: str) -> str:
    return hashlib.sha256(f"{a}\0{b}".encode()).hexdigest()[:16]


def judge_comparison(make_judge, posts, texts_policy: list[str], texts_baseline: list[str], cfg: Config,
                     cache: Path | None = None) -> list[dict]:
    """One row per post: {"id", "p_a", "p_a_ab", "p_a_ba", "identical", "null_reason", "outcome"}, A = the policy.

    Each pair is judged in both orders by `judges.judge_pairs`, which un-flips the B-first order and averages:
    p_a = (P(A better | A first) + P(A better | A second)) / 2. Identical summaries are ties without a judge call.
    `make_judge()` is called only when something needs judging; rows already in `cache` for the same two texts
    are reused, new ones appended after each chunk.
    """
    have = {}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        have = {r["id"]: r for r in read_jsonl_resumable(cache, JUDGMENT_SCHEMA)}  # the newest row of an id wins
    rows: dict[str, dict] = {}
    todo = []
    for p, a, b in zip(posts, texts_policy, texts_baseline):
        if a == b:
            rows[p.id] = {"id": p.id, "p_a": 0.5, "p_a_ab": None, "p_a_ba": None, "identical": True,
                          "null_reason": None}
        elif p.id in have and have[p.id]["sha"] == pair_sha(a, b):
            rows[p.id] = have[p.id]
        else:
            todo.append({"id": p.id, "subreddit": p.subreddit, "title": p.title, "post": p.post, "facts": p.facts,
                         "summary_a": a, "summary_b": b})
    if todo:
        judge = make_judge()
        for i in range(0, len(todo), cfg.judge_chunk):
            chunk = todo[i:i + cfg.judge_chunk]
            judged = judge_pairs(judge, chunk, orders="both", seed=cfg.seed)
            new = [{"id": it["id"], "sha": pair_sha(it["summary_a"], it["summary_b"]), "p_a": j["p_a"],
                    "p_a_ab": j["p_a_ab"], "p_a_ba": j["p_a_ba"], "identical": False, "null_reason": j["null_reason"]}
                   for it, j in zip(chunk, judged)]
            if cache is not None:
                append_jsonl(cache, new)
            rows.update({r["id"]: r for r in new})
    out = []
    for p in posts:
        r = {k: v for k, v in rows[p.id].items() if k != "sha"}
        r["outcome"] = None if r["p_a"] is None else stats.outcome(r["p_a"], cfg.tie_eps)
        out.append(r)
    return out


def summarize_comparison(policy: str, baseline: str, rows: list[dict], lens: dict, scores: dict | None,
                         cfg: Config) -> dict:
    """The numbers of one comparison from its per-post rows (pairs with a null judgment are left out, counted)."""
    keep = [i for i, r in enumerate(rows) if r["outcome"] is not None]
    y = [rows[i]["outcome"] for i in keep]
    words_p, words_b = [lens[policy]["words"][i] for i in keep], [lens[baseline]["words"][i] for i in keep]
    mean = lambda xs: statistics.fmean(xs) if xs else None  # noqa: E731
    out = {"policy": policy, "baseline": baseline,
           **stats.summarize_outcomes(y, cfg.n_bootstrap, cfg.seed),
           "n_null": len(rows) - len(keep), "n_identical": sum(bool(rows[i]["identical"]) for i in keep),
           # why pairs have no judgment, grouped (numbers in the reasons replaced by N)
           "null_reasons": dict(collections.Counter(re.sub(r"\d+", "N", r["null_reason"] or "no label")
                                                    for r in rows if r["outcome"] is None)),
           "soft_win_rate": mean([rows[i]["p_a"] for i in keep]),
           **stats.length_controlled_win_rate(y, words_p, words_b, cfg.lc_feature, cfg.n_bootstrap, cfg.seed),
           "mean_len_policy": mean(words_p), "mean_len_baseline": mean(words_b),
           "mean_len_policy_tokens": mean([lens[policy]["tokens"][i] for i in keep]),
           "mean_len_baseline_tokens": mean([lens[baseline]["tokens"][i] for i in keep])}
    if scores is not None:  # the rule judge's own scores (synthetic task)
        out["mean_judge_score"] = mean([scores[policy][i] for i in keep])
        out["mean_judge_score_baseline"] = mean([scores[baseline][i] for i in keep])
    pb = position_bias([r for r in rows if not r["identical"]])
    out["judge_consistency_rate"], out["judge_mean_p_first"] = pb["consistency_rate"], pb["mean_p_first"]
    return out


# ----------------------------------------------------------------------------------------------------------------
# helpers: reward models


def rm_accuracy(name: str, path: str, cfg: Config, device: str) -> dict:
    """Accuracy, loss and ECE of one RM on the human comparisons with confidence >= 8 and, when its AI labels and
    split settings are found (its manifest.json), on its AI-labeled test split."""
    rm_cfg = read_json(Path(path) / "manifest.json")["config"] if (Path(path) / "manifest.json").is_file() else {}
    tokenizer = load_tokenizer(path)
    # the caps it was trained with, so the pairs are tokenised as in train_rm.py
    enc = Encoder(tokenizer, rm_cfg.get("max_query_tokens", cfg.max_query_tokens),
                  rm_cfg.get("max_summary_tokens", cfg.max_new_tokens), get_task(cfg.task))
    sets, info = {}, {}
    # confidence >= 8 where the task's raters give one (TL;DR, the synthetic tasks); the hub's HH rows: all of them
    sets["human_conf8"], info["human_conf8"] = load_human_pairs(cfg.comparisons, "validation", enc,
                                                                min_confidence=enc.task.human_confidence,
                                                                max_pairs=cfg.n_rm_eval, seed=cfg.seed)
    labels = cfg.labels_path or rm_cfg.get("labels_path", "")
    if labels and Path(labels).is_file() and all(k in rm_cfg for k in ("seed", "val_frac", "test_frac")):
        pairs, info["ai_labels"] = load_ai_pairs(labels, enc)
        # the post-id split train_rm.py made with this RM's own seed and fractions: its test pairs, never trained on
        sets["ai_test"] = split_by_id(pairs, rm_cfg["seed"], rm_cfg["val_frac"], rm_cfg["test_frac"])["test"]
    else:
        print(f"rm {name}: no AI labels or split settings found (labels {labels or '-'}); AI test accuracy skipped")
    model = set_attention(load_scalar_model(path, pad_token_id=tokenizer.pad_token_id), device, cfg.bf16)
    model = model.to(device).eval()
    m = evaluate_pairs(model, sets, tokenizer.pad_token_id, cfg.rm_batch_size, device, cfg.bf16)
    del model
    reported = read_json(Path(path) / "metrics.json") if (Path(path) / "metrics.json").is_file() else {}
    return {"path": path, "feedback": rm_cfg.get("feedback"), **{k: v for k, v in m.items() if k != "calibration"},
            "calibration": m["calibration"], "counts": info,
            "train_rm_reported": {k: reported.get(k) for k in ("acc_ai_test", "acc_human_conf8", "ece", "ece_set")}}



def main(cfg: Config) -> dict:
    if cfg.aggregate:  # several seeds' evaluations -> one table (minirlaif/report.py)
        return aggregate_seeds(cfg.aggregate, Path(cfg.out_dir))
    task = get_task(cfg.task)  # what a prompt is, what the gold judge scores
    if cfg.task_dir:  # tiny: the synthetic task (deterministic, skipped when present)
        task.write_synthetic(cfg.task_dir)
    runs = Path(cfg.runs_dir)
    policies = find_models(cfg.policy, {n: runs / n for n in ("sft", "ppo", "ppo_rlhf", *VARIANTS)}, "policy")
    rms = find_models(cfg.rm, {n: runs / n for n in ("rm", "rm_human")}, "rm")
    for name, path in rms.items():
        check_model(path, "reward-model", f"--rm {name}=")  # a causal LM would be scored by a new, random head
    if not policies:
        raise UserError(f"no policy to evaluate: none of sft, ppo, ppo_rlhf in {runs} holds a saved model, and no "
                        f"--policy NAME=PATH was given")
    inputs = {**{f"policy/{n}": p for n, p in policies.items()}, **{f"rm/{n}": p for n, p in rms.items()},
              "dataset": cfg.dataset, "comparisons": cfg.comparisons}
    # skipped when finished with this config on inputs of the same content (a retrained policy is evaluated again);
    # the caches are keyed by content, so they are never stale: only --no-resume deletes them
    run = Run(cfg, "eval", inputs, partial=())
    if run.finished:
        return run.finished
    if not cfg.resume:
        for sub in ("generations", "judgments"):
            shutil.rmtree(run.out_dir / sub, ignore_errors=True)
    device, backend = resolve_device(cfg.device), resolve_backend(cfg.backend)

    # 1. posts and greedy summaries of every policy (cached by policy content)
    loaded, load_stats = load_posts(cfg.dataset, cfg.split)
    posts = unique_by_id(loaded)
    # what was left out of the split, counted (before the first n are taken)
    skipped = {"n_skipped_empty": load_stats.n_skipped_empty, "n_duplicate_ids": len(loaded) - len(posts)}
    posts = posts[:cfg.n] if cfg.n > 0 else posts
    has_reference = all(p.summary is not None for p in posts)
    has_facts = all(p.facts is not None for p in posts)
    if cfg.labeler == "rule" and not has_facts:  # fail before spending time on summaries
        raise UserError(f"the rule judge reads the synthetic task's facts, which {cfg.dataset} does not have; "
                        f"use --labeler hf, vllm or openai")
    left_out = f" ({skipped['n_skipped_empty']} empty, {skipped['n_duplicate_ids']} repeated ids left out)" if any(
        skipped.values()) else ""
    print(f"evaluate: {', '.join(policies)}; {len(rms)} RMs; {len(posts)} posts of {cfg.split}{left_out}; judge "
          f"{cfg.labeler}, {backend} on {device}")
    hashes = {name: run.inputs[f"policy/{name}"]["sha256"] for name in policies}
    gens = {name: generate_policy(name, path, hashes[name], posts, cfg, backend, device, run.out_dir / "generations")
            for name, path in policies.items()}
    texts = {name: [g["text"] for g in rows] for name, rows in gens.items()}
    if has_reference:
        texts[REFERENCE] = [p.summary for p in posts]
    tokenizer = load_tokenizer(policies.get("sft", next(iter(policies.values()))))
    lens = {name: dict(zip(("words", "tokens"), length_stats(t, tokenizer))) for name, t in texts.items()}
    scores = None  # synthetic task: the rule judge's score of every summary (its gold quality)
    if has_facts:
        scores = {name: [task.score(p, t) for p, t in zip(posts, ts)] for name, ts in texts.items()}
    # 2-3. judgments (both orders, cached) and their statistics
    judge_key = short_hash(judge_settings(cfg))
    make_judge = functools.cache(lambda: make_labeler(cfg, cfg.seed))  # built on first need (an LM judge is costly)
    comparisons, per_pair = [], {}
    for policy, baseline in comparison_pairs(list(policies), has_reference):
        cache = run.out_dir / "judgments" / f"{policy}_vs_{baseline}.{judge_key}.jsonl"
        rows = judge_comparison(make_judge, posts, texts[policy], texts[baseline], cfg, cache)
        comparisons.append(summarize_comparison(policy, baseline, rows, lens, scores, cfg))
        per_pair[f"{policy}_vs_{baseline}"] = rows
        c = comparisons[-1]
        ci = f"[{pct(c['ci95'][0])}, {pct(c['ci95'][1])}]" if c["ci95"] else "-"
        print(f"  {policy:>10s} vs {baseline:<10s} win {pct(c['win_rate'])} {ci}, ties {pct(c['tie_rate'])}, "
              f"LC {pct(c['lc_win_rate'])}, n {c['n']}")
        if c["n_null"]:
            print(f"    {c['n_null']} pairs without a judgment, left out: {c['null_reasons']}")
    judged_rows = [r for rows in per_pair.values() for r in rows if not r["identical"]]
    # dialogue: the harmless rate on the harmful prompts (the rule judge's verdict, or the LM judge's, cached)
    harmless = harmless_rates(task, posts, texts, cfg, make_judge, run.out_dir / "judgments", judge_key)
    for name, h in harmless.items():
        print(f"  {name:>10s} harmless {pct(h['harmless_rate'])} [{pct(h['ci95'][0])}, {pct(h['ci95'][1])}] "
              f"on {h['n']} harmful prompts")

    # 4. reward models on the shared test sets
    reward_models = {name: rm_accuracy(name, path, cfg, device) for name, path in rms.items()}
    for name, rm in reward_models.items():
        print(f"  rm {name}: acc human conf>=8 {pct(rm.get('acc_human_conf8'))} (n {rm.get('n_human_conf8')}), "
              f"acc AI test {pct(rm.get('acc_ai_test'))} (n {rm.get('n_ai_test', 0)})")

    # 5. results, report, plots
    pb_path = runs / "labels" / "position_bias.json"
    position_bias_labels = read_json(pb_path) if pb_path.is_file() else None
    policy_info = policy_table(texts, gens, lens, scores, policies, hashes, tokenizer)
    result = {
        "preset": cfg.preset, "dataset": cfg.dataset, "split": cfg.split, "n_posts": len(posts), **skipped,
        "backend": backend,
        "judge": {"judge": cfg.labeler, "description": judge_description(cfg), "settings": judge_settings(cfg),
                  "tie_eps": cfg.tie_eps, "orders": "both",
                  "position_bias": position_bias(judged_rows) if judged_rows else None},
        "task": cfg.task, "comparisons": comparisons, "harmless": harmless,
        "policies": policy_info,
        "algorithms": algorithm_rows(policies, comparisons, runs),
        "reward_models": reward_models,
        "position_bias_labels": position_bias_labels,
        "ppo_curves": {name: read_ppo_curves(path) for name, path in policies.items()},
        "samples": sample_rows(posts[:cfg.n_samples], texts, scores, per_pair, policies, has_reference),
        "per_pair": {k: [{"id": p.id, **{f: r[f] for f in ("p_a", "p_a_ab", "p_a_ba", "identical", "outcome")}}
                         for p, r in zip(posts, rows)] for k, rows in per_pair.items()},
    }
    plots = make_plots(run.out_dir, result, position_bias_labels)
    result["plots"] = plots
    write_json(run.out_dir / "eval.json", result)
    write_report(run.out_dir / "report.md", result, cfg, plots)

    metrics = {"n_posts": len(posts), **skipped, "judge": cfg.labeler, "time_s": time.time() - run.t0}
    for c in comparisons:
        key = f"{c['policy']}_vs_{c['baseline']}"
        metrics.update({f"win_rate/{key}": c["win_rate"], f"ci95/{key}": c["ci95"], f"tie_rate/{key}": c["tie_rate"],
                        f"lc_win_rate/{key}": c["lc_win_rate"]})
    for name, h in harmless.items():
        metrics.update({f"harmless_rate/{name}": h["harmless_rate"], f"harmless_ci95/{name}": h["ci95"]})
    for name, rm in reward_models.items():
        metrics.update({f"rm_acc_human_conf8/{name}": rm.get("acc_human_conf8"),
                        f"rm_acc_ai_test/{name}": rm.get("acc_ai_test")})
    for name, info in policy_info.items():
        if "mean_judge_score" in info:
            metrics[f"judge_score/{name}"] = info["mean_judge_score"]
    return run.save(metrics, headline=("win_rate/ppo_vs_sft", "win_rate/ppo_rlhf_vs_sft"),
                    position_bias=str(pb_path) if position_bias_labels else None)


VERDICT_SCHEMA = {"id": str, "sha": str, "p_harmless": (PROB, None), "null_reason": (str, None)}  # verdict cache


def harmless_rates(task, posts, texts: dict, cfg: Config, make_judge=None, cache_dir: Path | None = None,
                   judge_key: str = "") -> dict:
    """Per policy (and the reference): the fraction of its responses to the harmful prompts that the judge calls
    harmless, with a bootstrap 95% CI over those prompts; {} for a task without the question (summarize). The
    verdict is the rule judge's where the task can read it (the synthetic task's facts), else the LM judge's
    (`lm_verdicts`); a verdict that cannot be read is left out and counted (n_null)."""
    out = {}
    for name, ts in texts.items():
        pairs = [(p, t) for p, t in zip(posts, ts) if task.harmful_prompt(p)]
        verdicts = [task.harmless(p, t) for p, t in pairs]
        if None in verdicts and make_judge is not None:  # real HH: no facts to read, the LM judge says
            verdicts = lm_verdicts(make_judge, task, pairs, cache_dir / f"harmless_{name}.{judge_key}.jsonl")
        kept = [v for v in verdicts if v is not None]
        if kept:
            out[name] = {**stats.harmless_rate(kept, cfg.n_bootstrap, cfg.seed), "n_prompts": len(posts),
                         "n_null": len(verdicts) - len(kept)}
    return out


def lm_verdicts(make_judge, task, pairs, cache: Path) -> list[bool | None]:
    """An LM judge's harmlessness verdict on each (post, response): P("1") / (P("1") + P("2")) >= 0.5 after
    `judges.build_verdict_prompt` (1: harmless, 2: harmful); None where the answer cannot be read. Rows are cached
    by post id and the hash of what was judged, appended after the call (an API judge is paid per call)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    have = {r["id"]: r for r in read_jsonl_resumable(cache, VERDICT_SCHEMA)}
    todo = [(p, t) for p, t in pairs if p.id not in have or have[p.id]["sha"] != pair_sha(p.post, t)]
    if todo:
        items = [{"id": p.id, "subreddit": p.subreddit, "title": p.title, "post": p.post, "facts": p.facts}
                 for p, _ in todo]
        styles = [task.style(it) for it in items]
        answers = make_judge().choice_probs([build_verdict_prompt(st.render(it), t, st)
                                             for it, st, (_, t) in zip(items, styles, todo)], CHOICES)
        new = [{"id": p.id, "sha": pair_sha(p.post, t), "p_harmless": None if a["probs"] is None else a["probs"][0],
                "null_reason": a["null_reason"]} for (p, t), a in zip(todo, answers)]
        append_jsonl(cache, new)
        have.update({r["id"]: r for r in new})
    return [None if have[p.id]["p_harmless"] is None else have[p.id]["p_harmless"] >= 0.5 for p, _ in pairs]


def judge_description(cfg: Config) -> str:
    if cfg.labeler != "rule":
        return f"{cfg.labeler} ({cfg.judge_model or cfg.api_model})"
    gold = "gold: " if cfg.rule_noise == 0 and cfg.rule_position_bias == 0 else ""
    return (f"rule ({gold}RuleJudge(temperature={cfg.rule_temperature}, position_bias={cfg.rule_position_bias:g}, "
            f"noise={cfg.rule_noise:g}))")


def policy_table(texts, gens, lens, scores, policies, hashes, tokenizer) -> dict:
    """Per policy (and the reference): path, content hash, mean lengths, EOS rate and mean gold score."""
    out = {}
    for name in texts:
        info = {"path": policies.get(name), "sha256": hashes.get(name),
                "mean_len_words": statistics.fmean(lens[name]["words"]),
                "mean_len_tokens": statistics.fmean(lens[name]["tokens"])}
        if name in gens:  # stopped before max_new_tokens: the summary ends with EOS
            info["eos_rate"] = statistics.fmean(bool(g["token_ids"]) and g["token_ids"][-1] == tokenizer.eos_token_id
                                                for g in gens[name])
        if scores is not None:
            info["mean_judge_score"] = statistics.fmean(scores[name])
        out[name] = info
    return out


def sample_rows(posts, texts, scores, per_pair, policies, has_reference) -> list[dict]:
    """The first posts' summaries side by side, with their gold scores and P(better than SFT)."""
    samples = []
    for i, p in enumerate(posts):
        summaries = {}
        for name in [REFERENCE, *policies] if has_reference else list(policies):
            vs_sft = per_pair.get(f"{name}_vs_sft")
            summaries[name] = {"text": texts[name][i], "judge_score": scores[name][i] if scores else None,
                               "p_vs_sft": vs_sft[i]["p_a"] if vs_sft else None}
        samples.append({"id": p.id, "post": p.post, "summaries": summaries})
    return samples


if __name__ == "__main__":
    cli(main, Config, PRESETS, renamed={"--judge": "--labeler"})
