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
  4. reward models: the accuracy of each RM (`rm`: AI feedback, `rm_human`: human feedback, or `--rm NAME=PATH`)
     on the held-out human comparisons with rater confidence >= 8, and on its AI-labeled test split when its
     labels are found, with `reward.evaluate_pairs` (the function train_rm.py reports with);
  5. out_dir: eval.json (everything, incl. per-pair outcomes), metrics.json (headline numbers), report.md (tables
     next to the seed's and the paper's numbers, side-by-side samples), PNG plots, manifest.json.

Deliberate choices (see README "Implementation details"):
- both judge orders, averaged (the seed showed one random order; a position-biased judge then adds noise and, with
  an unseeded order, irreproducibility); a judge that always prefers the first position scores exactly 0.5;
- greedy decoding, as the seed; every number comes with a bootstrap CI over prompts;
- tiny preset: the judge is the synthetic task's rule judge without noise or position bias (the gold judge), so
  the win rates measure real quality differences and not the AI labeler's errors; its scores are reported too.

Commands:
  CPU, tiny (default; after the other stages):  python evaluate.py
  chosen policies:                              python evaluate.py --policy sft=runs/tiny/sft --policy ppo=runs/tiny/ppo
  test split, more prompts:                     python evaluate.py --split test --n 400
  gpt2-large (GPT-4o judge, as the seed):       OPENAI_API_KEY=... python evaluate.py --preset gpt2-large
  gpt2-large, a local judge on vLLM:            python evaluate.py --preset gpt2-large --judge vllm \\
                                                --judge-model meta-llama/Llama-3.3-70B-Instruct --tensor-parallel-size 4
"""

from __future__ import annotations

import collections
import dataclasses
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

import torch
from tqdm import tqdm

from minirlaif import stats, synthetic
from minirlaif.data import build_query, load_posts
from minirlaif.generation import generate_texts, vllm_generate
from minirlaif.judges import JudgeConfig, judge_pairs, make_labeler, position_bias, resolve_device
from minirlaif.models import load_causal_lm, load_scalar_model, load_tokenizer, set_attention
from minirlaif.reward import HUMAN_CONFIDENCE, Encoder, evaluate_pairs, load_ai_pairs, load_human_pairs, split_by_id
from minirlaif.utils import (GENERATION_SCHEMA, JUDGMENT_SCHEMA, append_jsonl, check_reward_model, finished_metrics,
                             parse_config, quiet_transformers, read_json, read_jsonl, read_jsonl_resumable, set_seed,
                             sha256_path, unique_ids, write_json, write_manifest)


@dataclass
class Config:
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
    variants reinforce, rloo, grpo, direct (d-RLAIF) found in runs_dir"""
    rm: list[str] = field(default_factory=list)
    """NAME=PATH of a reward model to score, repeatable; none given: rm (AI feedback) and rm_human in runs_dir"""
    aggregate: list[str] = field(default_factory=list)
    """eval dirs of several seeds' runs, repeatable: only aggregate their eval.json into out_dir (per-seed win
    rates, mean, t-interval over seeds); run_pipeline.sh SEEDS="1 2 3" does this"""
    dataset: str = "runs/{preset}/data/sft"
    """evaluation posts with their reference summaries: hub id or local file/dir (tldr or prompt/completion schema)"""
    split: str = "validation"
    """the held-out split of the dataset (the seed reported on validation; use test for final numbers)"""
    n: int = 400
    """evaluate the first n posts of the split (-1: all)"""
    backend: str = "auto"
    """summaries: auto (vllm when it is installed and a GPU is present, else hf), hf (the shared sampler) or vllm"""
    max_query_tokens: int = 200
    """queries longer than this are cut at the post's last newline, as in training"""
    max_new_tokens: int = 48
    """longest summary in tokens (greedy decoding stops earlier at EOS)"""
    gen_batch_size: int = 64
    """hf backend: sequences per batch"""
    gen_chunk: int = 256
    """hf backend: posts per cache append (a kill loses at most this many summaries)"""
    device: str = "auto"
    """cuda when available, else cpu (or name one)"""
    judge: str = "rule"
    """rule: the synthetic task's gold judge (no noise, no position bias); hf, vllm: a local LM; openai: an
    OpenAI-compatible endpoint"""
    judge_model: str = ""
    """hf / vllm judge: hub id or path of the LM"""
    preamble: str = "detailed"
    """LM judge prompt: base or detailed (minirlaif/judges.py)"""
    shots: int = 0
    """LM judge: few-shot exemplars in the prompt"""
    cot: bool = False
    """LM judge: chain of thought (decode a rationale first)"""
    cot_max_tokens: int = 512
    """LM judge: longest rationale in tokens"""
    rule_temperature: float = 0.1
    """rule judge: P(first better) = sigmoid(score difference / this)"""
    judge_batch_size: int = 8
    """hf judge: prompts per forward pass"""
    top_logprobs: int = 20
    """vllm / openai judge: top next tokens to read "1" and "2" from"""
    tensor_parallel_size: int = 1
    """vllm (summaries and judge): GPUs per model"""
    gpu_memory_utilization: float = 0.85
    """vllm: fraction of GPU memory it may take"""
    api_base: str = "https://api.openai.com/v1"
    """openai judge: base URL (the key is read from OPENAI_API_KEY only)"""
    api_model: str = ""
    """openai judge: model name"""
    max_concurrency: int = 8
    """openai judge: requests in flight at once"""
    max_retries: int = 6
    """openai judge: retries of a failed request before giving up"""
    request_timeout: float = 60.0
    """openai judge: deadline in seconds for a whole request (then a retry)"""
    judge_chunk: int = 64
    """pairs per judging step; each step's rows are appended to the judgment cache"""
    tie_eps: float = stats.TIE_EPS
    """a pair is a tie when the averaged P(policy better) is within this of 0.5"""
    n_bootstrap: int = 2000
    """bootstrap resamples for the 95 percent CIs of the win rate and the length-controlled win rate"""
    lc_feature: str = "log_ratio"
    """length control regressor: log_ratio (log of the word-length ratio) or ratio (the ratio - 1, as the paper)"""
    comparisons: str = "runs/{preset}/data/comparisons"
    """human comparisons (openai/summarize_from_feedback schema); their validation split scores the reward models"""
    labels_path: str = ""
    """AI-labeled pairs for the RMs' AI test split; empty: each RM's own (from its manifest.json)"""
    n_rm_eval: int = -1
    """score the RMs on at most this many human comparisons of confidence >= 8 (seeded sample; -1: all)"""
    rm_batch_size: int = 64
    """RM scoring: sequences per forward pass"""
    bf16: bool = False
    """bf16 autocast for RM scoring, on GPU or CPU (the CPU presets run fp32)"""
    n_samples: int = 4
    """side-by-side samples in report.md and eval.json"""


PRESETS = {
    "micro": dict(n=8, max_new_tokens=16, gen_batch_size=8, gen_chunk=4, judge_chunk=4, n_bootstrap=100,
                  n_rm_eval=32, rm_batch_size=16, n_samples=2),
    "smol": dict(n=16, max_query_tokens=160, max_new_tokens=40, gen_batch_size=16, n_rm_eval=32, rm_batch_size=16),
    # the seed: 1000 validation prompts, GPT-4o as judge; our gpt2-large PPO responses are up to 128 tokens
    "gpt2-large": dict(task_dir="", dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered", n=1000,
                       max_query_tokens=512, max_new_tokens=128, gen_batch_size=32, gen_chunk=512, judge="openai",
                       api_model="gpt-4o", judge_chunk=256, comparisons="openai/summarize_from_feedback",
                       rm_batch_size=32, n_samples=6,
                       bf16=True),
}

# the numbers to put ours next to (REFERENCE.md): win rates in %, by (policy, baseline)
REFERENCE_WIN_RATES = {
    ("ppo", "sft"): {"seed": 68.1, "paper": 71.0, "paper_lc": 59.0},
    ("ppo", "reference"): {"seed": 47.6},
    ("ppo_rlhf", "sft"): {"seed": 54.9, "paper": 73.0, "paper_lc": 61.0},
    ("ppo_rlhf", "reference"): {"seed": 35.1},
    ("ppo", "ppo_rlhf"): {"paper": 50.0},
}
REFERENCE_RM_ACC = {  # the seed's RM accuracies in %, by RM and test set
    "rm": {"ai_test": 72.9, "human_conf8": 61.0},
    "rm_human": {"human_conf8": 69.3},
}
DISPLAY = {"sft": "SFT", "ppo": "RLAIF", "ppo_rlhf": "RLHF", "reference": "reference"}
# train_ppo.py runs with other estimators or the d-RLAIF reward (run_pipeline.sh ALGOS=...): each is compared with
# SFT and with PPO-RLAIF (`ppo`)
VARIANTS = ("reinforce", "rloo", "grpo", "direct")
REFERENCE = "reference"  # the baseline name of the dataset's human-written summaries
JUDGES = ("rule", "hf", "vllm", "openai")


# ----------------------------------------------------------------------------------------------------------------
# helpers: what to evaluate


def parse_named(specs: list[str], flag: str) -> dict[str, str]:
    """["NAME=PATH", ...] -> {NAME: PATH}, with a clear error for a malformed or repeated name."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--{flag} expects NAME=PATH, got {spec!r}")
        if name in out or name == REFERENCE:
            raise SystemExit(f"--{flag}: the name {name!r} is {'reserved' if name == REFERENCE else 'given twice'}")
        out[name] = path
    return out


def find_models(specs: list[str], defaults: dict[str, Path], flag: str) -> dict[str, str]:
    """The models named on the command line (each must exist), else the default stage dirs that hold a saved model."""
    if specs:
        named = parse_named(specs, flag)
        for name, path in named.items():
            if not (Path(path) / "config.json").is_file():
                raise SystemExit(f"--{flag} {name}={path}: no saved model there (config.json missing)")
        return named
    found = {}
    for name, path in defaults.items():
        if (path / "config.json").is_file():
            found[name] = str(path)
        else:  # not trained yet, or a run still in progress (a checkpoint, no final model)
            print(f"{flag} {name}: no saved model in {path}; skipped")
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


def algorithm_rows(policies: dict[str, str], comparisons: list[dict], runs: Path) -> dict[str, dict]:
    """One row per RL policy (a dir with train_ppo.py's metrics.json): its estimator and reward, win rate and LC win
    rate vs SFT, final KL (mean of the last 20% of updates), training wall time and labeler calls (d-RLAIF: the
    ratings asked during RL; an RM-based run: the pairs label.py labeled for its RM, when found)."""
    vs_sft = {c["policy"]: c for c in comparisons if c["baseline"] == "sft"}
    labels = runs / "labels" / "metrics.json"
    n_pairs = read_json(labels).get("n_pairs") if labels.is_file() else None
    rows = {}
    for name, path in policies.items():
        m_path = Path(path) / "metrics.json"
        m = read_json(m_path) if m_path.is_file() else {}
        if "episodes" not in m or "objective/kl_last" not in m:
            continue  # not a train_ppo.py run
        c = vs_sft.get(name, {})
        direct = m.get("reward") == "direct"
        rows[name] = {"algo": m.get("algo", "ppo"), "reward": m.get("reward", "rm"), "episodes": m["episodes"],
                      "win_rate": c.get("win_rate"), "ci95": c.get("ci95"), "lc_win_rate": c.get("lc_win_rate"),
                      "final_kl": m["objective/kl_last"], "train_time_s": m.get("train_time_s"),
                      "labeler_calls": m.get("labeler_calls") if direct else None,
                      "label_pairs": None if direct or name == "ppo_rlhf" else n_pairs}
    return rows


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
    keys = ["judge", "seed"] + {
        "rule": ["rule_temperature"],
        "hf": ["judge_model", "preamble", "shots", "cot", "cot_max_tokens"],
        "vllm": ["judge_model", "preamble", "shots", "cot", "cot_max_tokens", "top_logprobs"],
        "openai": ["api_base", "api_model", "preamble", "shots", "cot", "cot_max_tokens", "top_logprobs"],
    }.get(cfg.judge, [])
    return {k: getattr(cfg, k) for k in keys}


def build_judge(cfg: Config):
    """A labeler of minirlaif.judges; the rule judge without noise or position bias is the gold judge."""
    jc = JudgeConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(JudgeConfig)
                        if hasattr(cfg, f.name) and f.name != "labeler"})
    jc = dataclasses.replace(jc, labeler=cfg.judge, rule_position_bias=0.0, rule_noise=0.0)
    return make_labeler(jc, seed=cfg.seed)


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
        raise SystemExit(f"--backend must be auto, hf or vllm, got {backend!r}")
    return backend


def generate_policy(name: str, path: str, sha256: str, posts, cfg: Config, backend: str, device: str,
                    cache_dir: Path) -> list[dict]:
    """Greedy summaries of `posts` by one policy, in post order: [{"id", "text", "token_ids"}].

    Cached in cache_dir/{name}.{key}.jsonl, key = hash of the policy's content (`sha256`, utils.sha256_path) and
    the generation settings; rows missing from the cache are generated and appended chunk by chunk (hf) or after
    one call (vllm).
    """
    key = short_hash({"policy_sha256": sha256, "dataset": cfg.dataset, "split": cfg.split,
                      "max_query_tokens": cfg.max_query_tokens, "max_new_tokens": cfg.max_new_tokens,
                      "backend": backend})
    cache = cache_dir / f"{name}.{key}.jsonl"
    cache.parent.mkdir(parents=True, exist_ok=True)
    have = unique_ids(read_jsonl_resumable(cache, GENERATION_SCHEMA), cache)
    todo = [p for p in posts if p.id not in have]
    if not todo:
        print(f"{name}: {len(posts)} summaries from the cache {cache}")
    elif backend == "vllm":
        tokenizer = load_tokenizer(path)
        queries = [build_query(tokenizer, p, cfg.max_query_tokens)[1] for p in todo]
        outs = vllm_generate(path, queries, n=1, max_new_tokens=cfg.max_new_tokens, temperature=0.0, seed=cfg.seed,
                             tensor_parallel_size=cfg.tensor_parallel_size,
                             gpu_memory_utilization=cfg.gpu_memory_utilization)
        append_jsonl(cache, [{"id": p.id, **o[0]} for p, o in zip(todo, outs)])
        gc.collect()  # vLLM holds GPU memory until its engine is collected
    else:
        tokenizer = load_tokenizer(path)
        model = load_causal_lm(path).to(device).eval()
        chunks = [todo[i:i + cfg.gen_chunk] for i in range(0, len(todo), cfg.gen_chunk)]
        for chunk in tqdm(chunks, desc=f"summaries {name}", unit="chunk"):
            queries = [build_query(tokenizer, p, cfg.max_query_tokens)[1] for p in chunk]
            outs = generate_texts(model, tokenizer, queries, cfg.max_new_tokens, cfg.gen_batch_size, greedy=True,
                                  device=device)
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
                  rm_cfg.get("max_summary_tokens", cfg.max_new_tokens))
    sets, info = {}, {}
    sets["human_conf8"], info["human_conf8"] = load_human_pairs(
        cfg.comparisons, "validation", enc, min_confidence=HUMAN_CONFIDENCE, max_pairs=cfg.n_rm_eval, seed=cfg.seed)
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


# ----------------------------------------------------------------------------------------------------------------
# report: plots and markdown


def read_ppo_curves(path: str) -> dict[str, list] | None:
    """step, objective/scores, objective/kl, rollout/response_len from a PPO dir's metrics.jsonl (None if absent)."""
    path = Path(path) / "metrics.jsonl"  # another stage's file: read only
    rows = [r for r in read_jsonl(path) if "objective/scores" in r] if path.is_file() else []
    if not rows:
        return None
    return {k: [r.get(k) for r in rows] for k in ("step", "objective/scores", "objective/kl", "rollout/response_len")}


def make_plots(out_dir: Path, result: dict, position_bias_labels: dict | None) -> list[str]:
    """PNG plots next to report.md; none (with a message) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plots skipped (pip install matplotlib)")
        return []
    made = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        made.append(name)

    # PPO training curves of every policy that has them (RLAIF and RLHF)
    curves = {n: c for n, c in result["ppo_curves"].items() if c}
    if curves:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        for ax, key, title in zip(axes, ("objective/scores", "objective/kl", "rollout/response_len"),
                                  ("RM score (with EOS penalty)", "KL to SFT (sum over tokens)", "response length")):
            for name, c in curves.items():
                ax.plot(c["step"], c[key], label=f"{DISPLAY.get(name, name)} ({name})")
            ax.set_title(title)
            ax.set_xlabel("PPO update")
        axes[0].legend(fontsize=8)
        save(fig, "ppo_curves.png")

    # win rates with their 95% CIs, and the length-controlled estimates
    comps = [c for c in result["comparisons"] if c["win_rate"] is not None]
    if comps:
        fig, ax = plt.subplots(figsize=(7, 0.5 * len(comps) + 1.2))
        ys = list(range(len(comps)))[::-1]
        for y, c in zip(ys, comps):
            lo, hi = c["ci95"] or (c["win_rate"], c["win_rate"])
            ax.errorbar(c["win_rate"], y, xerr=[[c["win_rate"] - lo], [hi - c["win_rate"]]], fmt="o", c="C0",
                        capsize=3, label="win rate, 95% CI" if y == ys[0] else None)
            if c.get("lc_win_rate") is not None:
                ax.plot(c["lc_win_rate"], y, "x", c="C3", label="length-controlled" if y == ys[0] else None)
        ax.axvline(0.5, ls="--", c="gray", lw=1)
        ax.set_yticks(ys)
        ax.set_yticklabels([f"{DISPLAY.get(c['policy'], c['policy'])} vs {DISPLAY.get(c['baseline'], c['baseline'])}"
                            for c in comps])
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"win rate (ties half), judge: {result['judge']['judge']}")
        ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
        save(fig, "win_rates.png")

    # position bias: the AI labeler that made the RM's training labels, and the evaluation judge
    bars = {}
    if position_bias_labels:
        bars["AI labeler (label.py)"] = position_bias_labels
    if result["judge"].get("position_bias"):
        bars[f"eval judge ({result['judge']['judge']})"] = result["judge"]["position_bias"]
    if bars:
        keys = ["consistency_rate", "same_position_rate", "mean_p_first"]
        fig, ax = plt.subplots(figsize=(6.5, 3.4))
        width = 0.8 / len(bars)
        for k, (label, pb) in enumerate(bars.items()):
            ax.bar([i + k * width for i in range(len(keys))], [pb.get(key) or 0.0 for key in keys], width,
                   label=label)
        ax.axhline(0.5, ls="--", c="gray", lw=1)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))])
        ax.set_xticklabels(keys)
        ax.set_ylim(0, 1)
        ax.set_title("position bias (mean_p_first 0.5 = unbiased)")
        ax.legend(fontsize=8)
        save(fig, "position_bias.png")

    # reward-model calibration on the shared test sets
    calibration = {f"{name}: {s}": bins for name, rm in result["reward_models"].items()
                   for s, bins in rm["calibration"].items()}
    if calibration:
        from minirlaif.reward import reliability_diagram
        reliability_diagram(calibration, out_dir / "rm_calibration.png", title="reward models: reliability")
        made.append("rm_calibration.png")
    return made


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _cell(text: str | None, limit: int = 300) -> str:
    """Text for one markdown table cell: one line, pipes escaped, cut at `limit` characters."""
    if text is None:
        return "-"
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[:limit] + "..."
    return text.replace("|", "\\|")


def write_report(path: Path, result: dict, cfg: Config, plots: list[str]) -> None:
    """report.md: results next to the seed's and the paper's numbers, the RMs, the policies, plots and samples."""
    j = result["judge"]
    lines = [f"# Evaluation ({cfg.preset} preset)", "",
             f"{result['n_posts']} posts of `{cfg.dataset}` [{cfg.split}], greedy summaries of at most "
             f"{cfg.max_new_tokens} tokens. Judge: **{j['description']}**, every pair in both orders, the two "
             f"un-flipped probabilities averaged; a pair is a win or a loss when the average is more than "
             f"{cfg.tie_eps:g} from 0.5, else a tie (ties count half). 95% CIs: percentile bootstrap over posts "
             f"({cfg.n_bootstrap} resamples, seed {cfg.seed}). LC: length-controlled win rate (logistic fit of the "
             f"outcome on the {'log ' if cfg.lc_feature == 'log_ratio' else ''}word-length ratio, read at ratio 1).",
             "", "## Win rates", "",
             "| policy vs baseline | win rate [95% CI] | ties | LC win rate [95% CI] | n | words (policy / baseline) "
             "| judge score (policy / baseline) | seed | paper | paper LC |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["comparisons"]:
        ref = REFERENCE_WIN_RATES.get((c["policy"], c["baseline"]), {})
        ci, lc_ci = (f" [{_pct(x[0])}, {_pct(x[1])}]" if x else "" for x in (c["ci95"], c["lc_ci95"]))
        if c["lc_frac_similar_length"] is not None and c["lc_frac_similar_length"] < 0.1:
            lc_ci += " (extrapolated)"
        name = f"{DISPLAY.get(c['policy'], c['policy'])} vs {DISPLAY.get(c['baseline'], c['baseline'])}"
        score = (f"{_num(c['mean_judge_score'])} / {_num(c['mean_judge_score_baseline'])}"
                 if "mean_judge_score" in c else "-")
        seed, paper, paper_lc = (f"{ref[k]:.1f}%" if k in ref else "-" for k in ("seed", "paper", "paper_lc"))
        n_null = c["n_null"]
        lines.append(f"| {name} | {_pct(c['win_rate'])}{ci} | {_pct(c['tie_rate'])} "
                     f"| {_pct(c['lc_win_rate'])}{lc_ci} | {c['n']}{f' ({n_null} null)' if n_null else ''} "
                     f"| {_num(c['mean_len_policy'], '.1f')} / {_num(c['mean_len_baseline'], '.1f')} "
                     f"| {score} | {seed} | {paper} | {paper_lc} |")
    lines += ["", "Seed: GPT-2-Large policies on real TL;DR judged by GPT-4o on 1000 validation prompts, one random "
              "order, no CI. Paper (Lee et al. 2023): PaLM 2 policies judged by human raters. Numbers from another "
              "judge, task or model size compare in direction, not in value. LC is marked extrapolated when fewer than "
              "10% of the pairs have a length ratio within [0.8, 1.25].", ""]

    if result.get("algorithms"):
        lines += ["## Algorithms", "",
                  "Each RL policy (train_ppo.py's `--algo` and `--reward`) against SFT under the judge above. Final "
                  "KL: mean summed KL to SFT over the last 20% of updates. Wall time: train_ppo.py's training time "
                  "(measured on whatever else the machine ran). Labeler calls: d-RLAIF's ratings during RL, or "
                  "the pairs label.py labeled for an RM-based run's reward model.", "",
                  "| policy | algorithm | reward | episodes | win rate vs SFT [95% CI] | length-controlled | final KL "
                  "| wall time | labeler calls |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, a in result["algorithms"].items():
            ci = f" [{_pct(a['ci95'][0])}, {_pct(a['ci95'][1])}]" if a["ci95"] else ""
            calls = (str(a["labeler_calls"]) if a["labeler_calls"] is not None
                     else f"{a['label_pairs']} pairs (label.py)" if a["label_pairs"] is not None else "-")
            wall = f"{a['train_time_s']:.0f} s" if a["train_time_s"] is not None else "-"
            lines.append(f"| {name} | {a['algo']} | {a['reward']} | {a['episodes']} | {_pct(a['win_rate'])}{ci} "
                         f"| {_pct(a['lc_win_rate'])} | {_num(a['final_kl'], '.2f')} | {wall} | {calls} |")
        lines.append("")

    lines += ["## Reward models", "",
              f"Accuracy on the held-out human comparisons with rater confidence >= {HUMAN_CONFIDENCE} and on the "
              "AI-labeled test split (argmax of the soft label; label ties excluded), with "
              "`reward.evaluate_pairs`.", "",
              "| RM | acc human conf>=8 (n) | acc AI test (n) | ECE human | ECE AI | seed human conf>=8 "
              "| seed AI test |",
              "|---|---|---|---|---|---|---|"]
    for name, rm in result["reward_models"].items():
        ref = REFERENCE_RM_ACC.get(name, {})
        seed_human, seed_ai = (f"{ref[k]:.1f}%" if k in ref else "-" for k in ("human_conf8", "ai_test"))
        lines.append(f"| {name} | {_pct(rm.get('acc_human_conf8'))} ({rm.get('n_human_conf8', 0)}) "
                     f"| {_pct(rm.get('acc_ai_test'))} ({rm.get('n_ai_test', 0)}) "
                     f"| {_num(rm.get('ece_human_conf8'))} | {_num(rm.get('ece_ai_test'))} "
                     f"| {seed_human} | {seed_ai} |")
    if not result["reward_models"]:
        lines.append("| (no reward model found) | | | | | | |")

    lines += ["", "## Policies", "", "| name | path | mean words | mean tokens | EOS rate | mean judge score |",
              "|---|---|---|---|---|---|"]
    for name, p in result["policies"].items():
        where = f"`{p['path']}`" if p.get("path") else "the dataset"
        lines.append(f"| {name} | {where} | {_num(p['mean_len_words'], '.1f')} "
                     f"| {_num(p['mean_len_tokens'], '.1f')} | {_pct(p.get('eos_rate'))} "
                     f"| {_num(p.get('mean_judge_score'))} |")

    labels_pb, judge_pb = result.get("position_bias_labels"), j.get("position_bias")
    if labels_pb or judge_pb:
        lines += ["", "## Position bias", ""]
    if labels_pb:
        lines.append(f"AI labeler (label.py, the RM's training labels): same summary preferred in both orders "
                     f"{_pct(labels_pb.get('consistency_rate'))}, mean P(first shown is better) "
                     f"{_num(labels_pb.get('mean_p_first'))} (0.5 = unbiased), over {labels_pb.get('n_both_orders')} "
                     f"pairs labeled in both orders. Paper: PaLM 2 L prefers the same position on 18% of pairs.")
    if judge_pb:
        lines += [""] if labels_pb else []
        lines.append(f"Evaluation judge, on the {judge_pb['n_pairs']} non-identical pairs it judged: mean P(first "
                     f"shown is better) {_num(judge_pb.get('mean_p_first'))}, same summary preferred in both orders "
                     f"{_pct(judge_pb.get('consistency_rate'))} (a pair called a tie in either order counts as not "
                     f"consistent).")

    if plots:
        lines += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots]

    if result["samples"]:
        lines += ["", "## Samples", ""]
        for s in result["samples"]:
            lines += [f"### {s['id']}", "", f"> {_cell(s['post'], 400)}", "",
                      "| | summary | judge score | P(better than SFT) |", "|---|---|---|---|"]
            for name, t in s["summaries"].items():
                lines.append(f"| {DISPLAY.get(name, name)} | {_cell(t['text'])} | {_num(t.get('judge_score'))} "
                             f"| {_num(t.get('p_vs_sft'))} |")
            lines.append("")
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------------------


def aggregate_seeds(eval_dirs: list[str], out_dir: Path) -> dict:
    """Several seeds' evaluations -> per comparison: each seed's win rate, the mean and a 95% t-interval over
    seeds (`stats.seed_summary`: the run-to-run spread, which one run's bootstrap over posts does not see), the
    same for the LC win rate and, per RL policy, the final KL. Writes seeds.json, report.md and metrics.json."""
    results = []
    for d in eval_dirs:
        path = Path(d) / "eval.json"
        if not path.is_file():
            raise SystemExit(f"--aggregate {d}: no eval.json there (run evaluate.py for that seed first)")
        results.append(read_json(path))
    keys = list(dict.fromkeys((c["policy"], c["baseline"]) for r in results for c in r["comparisons"]))
    table = {}
    for policy, baseline in keys:
        found = [next((c for c in r["comparisons"] if (c["policy"], c["baseline"]) == (policy, baseline)), None)
                 for r in results]
        rows = [c for c in found if c is not None]
        table[f"{policy}_vs_{baseline}"] = {
            "policy": policy, "baseline": baseline, "seeds": [d for d, c in zip(eval_dirs, found) if c is not None],
            "win_rate": stats.seed_summary([c["win_rate"] for c in rows], bounds=(0.0, 1.0)),
            "lc_win_rate": stats.seed_summary([c["lc_win_rate"] for c in rows if c["lc_win_rate"] is not None],
                                              bounds=(0.0, 1.0))}
    kl = {}
    for r in results:
        for name, a in (r.get("algorithms") or {}).items():
            kl.setdefault(name, []).append(a["final_kl"])
    out = {"eval_dirs": eval_dirs, "comparisons": table, "final_kl": {n: stats.seed_summary(v) for n, v in kl.items()}}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "seeds.json", out)

    def interval(s):
        return f"{_pct(s['mean'])} [{_pct(s['ci95'][0])}, {_pct(s['ci95'][1])}]" if s["ci95"] else _pct(s["mean"])

    lines = [f"# Evaluation over {len(eval_dirs)} seeds", "", "Per comparison: each seed's win rate, their mean and "
             "a 95% t-interval over seeds (mean ± t_{0.975, n-1} · s / √n, clipped to [0%, 100%]), which holds the "
             "run-to-run spread.", "",
             "| policy vs baseline | per-seed win rates | mean [95% CI over seeds] | LC mean [95% CI] |",
             "|---|---|---|---|"]
    for t in table.values():
        per = ", ".join(_pct(x) for x in t["win_rate"]["per_seed"])
        name = f"{DISPLAY.get(t['policy'], t['policy'])} vs {DISPLAY.get(t['baseline'], t['baseline'])}"
        lines.append(f"| {name} | {per} | {interval(t['win_rate'])} | {interval(t['lc_win_rate'])} |")
    if kl:
        lines += ["", "| RL policy | per-seed final KL | mean |", "|---|---|---|"]
        lines += [f"| {n} | {', '.join(f'{x:.2f}' for x in v)} | {sum(v) / len(v):.2f} |" for n, v in kl.items()]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    metrics = {f"win_rate_mean/{k}": t["win_rate"]["mean"] for k, t in table.items()}
    metrics.update({f"win_rate_ci95_seeds/{k}": t["win_rate"]["ci95"] for k, t in table.items()})
    write_json(out_dir / "metrics.json", metrics)
    print(f"wrote {out_dir / 'report.md'} and seeds.json ({len(eval_dirs)} seeds)")
    return metrics


def main(cfg: Config) -> dict:
    out_dir = Path(cfg.out_dir)
    if cfg.aggregate:
        return aggregate_seeds(cfg.aggregate, out_dir)
    runs = Path(cfg.runs_dir)
    if cfg.judge not in JUDGES:
        raise SystemExit(f"--judge must be one of {', '.join(JUDGES)}, got {cfg.judge!r}")
    policies = find_models(cfg.policy, {n: runs / n for n in ("sft", "ppo", "ppo_rlhf", *VARIANTS)}, "policy")
    rms = find_models(cfg.rm, {n: runs / n for n in ("rm", "rm_human")}, "rm")
    for name, path in rms.items():
        check_reward_model(path, f"--rm {name}=")
    if not policies:
        raise SystemExit(f"no policy to evaluate: none of sft, ppo, ppo_rlhf in {runs} holds a saved model, and no "
                         f"--policy NAME=PATH was given")
    pb_path = runs / "labels" / "position_bias.json"
    inputs = {**{f"policy/{n}": p for n, p in policies.items()}, **{f"rm/{n}": p for n, p in rms.items()},
              "dataset": cfg.dataset, "comparisons": cfg.comparisons}
    # finished: the same config on inputs of the same content (a retrained policy is evaluated again)
    if cfg.resume and (done := finished_metrics(out_dir, cfg)) is not None:
        saved = read_json(out_dir / "manifest.json")["inputs"]
        if saved == {k: {"path": str(p), "sha256": sha256_path(p)} for k, p in inputs.items()}:
            print(f"{out_dir} already holds a finished evaluation of these models and this config; skipping "
                  f"(delete it to rerun)")
            return done
    if not cfg.resume:
        for sub in ("generations", "judgments"):
            shutil.rmtree(out_dir / sub, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    quiet_transformers()
    set_seed(cfg.seed)
    if cfg.task_dir:  # tiny: the synthetic task (deterministic, skipped when present)
        synthetic.write_task(cfg.task_dir)
    device = resolve_device(cfg.device)
    backend = resolve_backend(cfg.backend)

    # 1. posts and greedy summaries of every policy (cached by policy content)
    loaded, load_stats = load_posts(cfg.dataset, cfg.split)
    posts = unique_by_id(loaded)
    # what was left out of the split, counted (before the first n are taken)
    skipped = {"n_skipped_empty": load_stats.n_skipped_empty, "n_duplicate_ids": len(loaded) - len(posts)}
    posts = posts[:cfg.n] if cfg.n > 0 else posts
    has_reference = all(p.summary is not None for p in posts)
    has_facts = all(p.facts is not None for p in posts)
    if cfg.judge == "rule" and not has_facts:  # fail before spending time on summaries
        raise SystemExit(f"the rule judge reads the synthetic task's facts, which {cfg.dataset} does not have; "
                         f"use --judge hf, vllm or openai")
    print(f"evaluate: {len(policies)} policies ({', '.join(policies)}), {len(rms)} reward models, {len(posts)} posts "
          f"of {cfg.dataset}[{cfg.split}] (skipped: {skipped['n_skipped_empty']} empty, {skipped['n_duplicate_ids']} "
          f"repeated ids), backend {backend}, judge {cfg.judge}, device {device}")
    hashes = {name: sha256_path(path) for name, path in policies.items()}
    gens = {name: generate_policy(name, path, hashes[name], posts, cfg, backend, device, out_dir / "generations")
            for name, path in policies.items()}
    texts = {name: [g["text"] for g in rows] for name, rows in gens.items()}
    if has_reference:
        texts[REFERENCE] = [p.summary for p in posts]
    tokenizer = load_tokenizer(policies.get("sft", next(iter(policies.values()))))
    lens = {name: dict(zip(("words", "tokens"), length_stats(t, tokenizer))) for name, t in texts.items()}
    scores = None  # synthetic task: the rule judge's score of every summary (its gold quality)
    if has_facts:
        scores = {name: [synthetic.score(p, t) for p, t in zip(posts, ts)] for name, ts in texts.items()}

    # 2-3. judgments (both orders, cached) and their statistics
    judge_key = short_hash(judge_settings(cfg))
    make_judge = functools.cache(lambda: build_judge(cfg))  # built once, on first need (an LM judge is costly)
    comparisons, per_pair = [], {}
    for policy, baseline in comparison_pairs(list(policies), has_reference):
        cache = out_dir / "judgments" / f"{policy}_vs_{baseline}.{judge_key}.jsonl"
        rows = judge_comparison(make_judge, posts, texts[policy], texts[baseline], cfg, cache)
        comparisons.append(summarize_comparison(policy, baseline, rows, lens, scores, cfg))
        per_pair[f"{policy}_vs_{baseline}"] = rows
        c = comparisons[-1]
        ci = f"[{_pct(c['ci95'][0])}, {_pct(c['ci95'][1])}]" if c["ci95"] else "-"
        print(f"  {policy:>10s} vs {baseline:<10s} win {_pct(c['win_rate'])} {ci}, ties {_pct(c['tie_rate'])}, "
              f"LC {_pct(c['lc_win_rate'])}, n {c['n']}")
        if c["n_null"]:
            print(f"    {c['n_null']} pairs without a judgment, left out: {c['null_reasons']}")
    judged_rows = [r for rows in per_pair.values() for r in rows if not r["identical"]]
    judge_desc = (f"rule (gold: RuleJudge(temperature={cfg.rule_temperature}, position_bias=0, noise=0))"
                  if cfg.judge == "rule" else f"{cfg.judge} ({cfg.judge_model or cfg.api_model})")

    # 4. reward models on the shared test sets
    reward_models = {name: rm_accuracy(name, path, cfg, device) for name, path in rms.items()}
    for name, rm in reward_models.items():
        print(f"  rm {name}: acc human conf>=8 {_pct(rm.get('acc_human_conf8'))} (n {rm.get('n_human_conf8')}), "
              f"acc AI test {_pct(rm.get('acc_ai_test'))} (n {rm.get('n_ai_test', 0)})")

    # 5. results, report, plots
    policy_info = {}
    for name in texts:
        info = {"path": policies.get(name), "sha256": hashes.get(name),
                "mean_len_words": statistics.fmean(lens[name]["words"]),
                "mean_len_tokens": statistics.fmean(lens[name]["tokens"])}
        if name in gens:  # stopped before max_new_tokens: the summary ends with EOS
            info["eos_rate"] = statistics.fmean(bool(g["token_ids"]) and g["token_ids"][-1] == tokenizer.eos_token_id
                                                for g in gens[name])
        if scores is not None:
            info["mean_judge_score"] = statistics.fmean(scores[name])
        policy_info[name] = info
    samples = []
    for i, p in enumerate(posts[:cfg.n_samples]):
        summaries = {}
        for name in [REFERENCE, *policies] if has_reference else list(policies):
            vs_sft = per_pair.get(f"{name}_vs_sft")
            summaries[name] = {"text": texts[name][i], "judge_score": scores[name][i] if scores else None,
                               "p_vs_sft": vs_sft[i]["p_a"] if vs_sft else None}
        samples.append({"id": p.id, "post": p.post, "summaries": summaries})
    position_bias_labels = read_json(pb_path) if pb_path.is_file() else None
    result = {
        "preset": cfg.preset, "dataset": cfg.dataset, "split": cfg.split, "n_posts": len(posts), **skipped,
        "backend": backend,
        "judge": {"judge": cfg.judge, "description": judge_desc, "settings": judge_settings(cfg),
                  "tie_eps": cfg.tie_eps, "orders": "both",
                  "position_bias": position_bias(judged_rows) if judged_rows else None},
        "comparisons": comparisons,
        "policies": policy_info,
        "algorithms": algorithm_rows(policies, comparisons, runs),
        "reward_models": reward_models,
        "position_bias_labels": position_bias_labels,
        "ppo_curves": {name: read_ppo_curves(path) for name, path in policies.items()},
        "samples": samples,
        "per_pair": {k: [{"id": p.id, **{f: r[f] for f in ("p_a", "p_a_ab", "p_a_ba", "identical", "outcome")}}
                         for p, r in zip(posts, rows)] for k, rows in per_pair.items()},
    }
    plots = make_plots(out_dir, result, position_bias_labels)
    result["plots"] = plots
    write_json(out_dir / "eval.json", result)
    write_report(out_dir / "report.md", result, cfg, plots)

    metrics = {"n_posts": len(posts), **skipped, "judge": cfg.judge, "time_s": time.time() - t0}
    for c in comparisons:
        key = f"{c['policy']}_vs_{c['baseline']}"
        metrics.update({f"win_rate/{key}": c["win_rate"], f"ci95/{key}": c["ci95"], f"tie_rate/{key}": c["tie_rate"],
                        f"lc_win_rate/{key}": c["lc_win_rate"]})
    for name, rm in reward_models.items():
        metrics.update({f"rm_acc_human_conf8/{name}": rm.get("acc_human_conf8"),
                        f"rm_acc_ai_test/{name}": rm.get("acc_ai_test")})
    for name, info in policy_info.items():
        if "mean_judge_score" in info:
            metrics[f"judge_score/{name}"] = info["mean_judge_score"]
    write_json(out_dir / "metrics.json", metrics)
    write_manifest(out_dir, cfg, inputs, position_bias=str(pb_path) if position_bias_labels else None)
    print(f"wrote {out_dir / 'report.md'}, eval.json, metrics.json{', ' + ', '.join(plots) if plots else ''}")
    return metrics


if __name__ == "__main__":
    main(parse_config(Config, PRESETS))
