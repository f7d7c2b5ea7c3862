"""Stage 2, AI labels: two summaries per post from the SFT policy, and a labeler's soft preference between them.

Algorithm (Lee et al. 2023, "RLAIF vs. RLHF"):
1. candidates: the unique posts of the human comparisons' train split (only the posts: their human summaries
   and choices are not used), two independent samples per post from the SFT policy at temperature 1;
2. labels: an AI labeler reads the post and both summaries and gives P(summary 1 better) from its next-token
   probabilities of "1" and "2" (minirlaif/judges.py). Each pair is shown in both orders, A/B and B/A, and the
   soft label is the mean of the two un-flipped probabilities: p_a = (p_a_ab + p_a_ba) / 2;
3. analysis: how much the labels depend on position (position_bias.json); for the synthetic task, also how
   often they agree with the gold rule judge. With --align the labeler labels human comparisons instead of
   candidates, and its agreement with the humans is measured (the paper's Table 2).

Outputs in out_dir: candidates.jsonl (the samples, with token ids), pairs.jsonl (one labeled pair per row: the
RM's training data), position_bias.json, metrics.json, manifest.json. Both jsonl files are append-only: a rerun
skips what is written, a kill loses only the rows in flight, and no id is ever written twice.

Deliberate choices (docs/algorithms.md has the details and their sources):
- labels are normalised over {"1", "2"} (the seed used raw probabilities) and never clipped; the mass the two
  answers had is recorded, and a pair whose answer cannot be read gets p_a = null with a reason, not a guess;
- a pair with a null label in either order gets p_a = null: one order alone would bring the position bias back;
- tiny preset: the labeler is the synthetic task's rule judge with noise and a position bias, so that the
  pipeline has an imperfect, position-biased AI labeler to cope with (as LLM labelers are).

Commands:
  CPU, tiny (default; after train_sft.py):   python label.py
  the dialogue task (docs/tasks.md):          python label.py --preset hh-tiny
  labeler-human alignment:                    python label.py --align
  a more position-biased labeler:             python label.py --rule-position-bias 2 --out-dir runs/tiny/labels_bias
  a local HF model as labeler:                python label.py --labeler hf --judge-model Qwen/Qwen2.5-0.5B-Instruct
  an OpenAI-compatible endpoint:              OPENAI_API_KEY=... python label.py --labeler openai \
                                                  --api-model gpt-4o-mini --cot
  gpt2-large (vLLM; Llama-3.3-70B, 4 GPUs):   python label.py --preset gpt2-large --only-candidates
                                              python label.py --preset gpt2-large
"""

from __future__ import annotations

import collections
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minirlaif.config import Between, Choice, NonNegative, Positive, PositiveOrAll, UserError
from minirlaif.data import load_comparisons, load_posts
from minirlaif.judges import PromptConfig, human_agreement, judge_pairs, position_bias, usage_summary
from minirlaif.labelers import LabelerConfig, make_labeler, resolve_device
from minirlaif.models import check_model
from minirlaif.run import Run, cli, progress
from minirlaif.tasks import get_task
from minirlaif.utils import (CANDIDATE_SCHEMA, PAIR_SCHEMA, append_jsonl, read_jsonl, read_jsonl_resumable,
                             unique_ids, write_json)


@dataclass
class Config(LabelerConfig, PromptConfig):  # --labeler and its settings, --preamble, --cot, ...: inherited
    preset: str = "tiny"
    """tiny: synthetic task, rule labeler, CPU; micro: a 24-post smoke run; gpt2-large: the seed's setup"""
    out_dir: str = ""
    """output directory (default runs/{preset}/labels, or runs/{preset}/align with --align)"""
    seed: int = 1
    """seeds the candidate sampling (per chunk) and the rule labeler's noise (per pair and order)"""
    resume: bool = True
    """continue the jsonl files in out_dir (--no-resume deletes them and starts over)"""
    task_dir: str = "runs/{preset}/data"
    """tiny: where the synthetic task's files are written (if missing); empty for real data"""
    comparisons: str = "runs/{preset}/data/comparisons"
    """human comparisons (openai/summarize_from_feedback schema): hub id or local dir/file"""
    split: str = "train"
    """the comparisons split whose unique posts get candidates"""
    max_posts: PositiveOrAll[int] = -1
    """label at most this many posts (-1: all); raising it later extends a finished run"""
    sft_path: str = "runs/{preset}/sft"
    """the SFT policy that samples the candidates"""
    backend: Choice("hf", "vllm") = "hf"
    """candidate sampler: hf (batched KV-cache sampler, CPU or GPU) or vllm"""
    temperature: NonNegative[float] = 1.0
    """sampling temperature of the candidates (0: greedy, which makes both candidates equal)"""
    max_new_tokens: Positive[int] = 48
    """longest candidate summary in tokens (a summary that hits it has no EOS)"""
    max_query_tokens: Positive[int] = 200
    """queries longer than this are cut at the post's last newline (counted), as in SFT"""
    gen_batch_size: Positive[int] = 64
    """hf sampler: sequences per batch"""
    bf16: bool = False
    """hf sampler: bf16 autocast (on a GPU, or a CPU with AVX512-BF16/AMX)"""
    gen_chunk: Positive[int] = 256
    """posts per seeded sampling chunk; each chunk is appended to candidates.jsonl when done"""
    candidates: str = ""
    """candidates file (default out_dir/candidates.jsonl); another run's, to label its summaries with another labeler
    (read only: it must hold every post's candidates)"""
    only_candidates: bool = False
    """sample the candidates and stop (on a GPU: free it before a large labeler loads)"""
    orders: Choice("both", "ab", "random") = "both"
    """both: label A/B and B/A and average; ab: one order only (biased); random: one seeded random order per pair"""
    label_chunk: Positive[int] = 64
    """pairs per labeling step; each step's rows are appended to pairs.jsonl when done"""
    align: bool = False
    """label human comparisons instead, and report labeler-human agreement"""
    align_split: str = "validation"
    """--align: the comparisons split to label"""
    min_confidence: Between(0, 9, int) = 8
    """--align: keep comparisons whose rater confidence (1-9) is at least this (0: all, also those without one: HH)"""
    max_pairs: PositiveOrAll[int] = -1
    """--align: label at most this many comparisons (-1: all)"""
    grid: bool = False
    """the paper's prompt grid on the --align comparisons: preamble base|detailed x shots 0|1|2 x CoT off|on, plus
    self-consistency (detailed, 0-shot) at each --grid-sc-temperatures; one label run per cell in
    out_dir/<cell>, then grid.md / grid.json (Table 2 layout) from the rows they wrote"""
    grid_cells: str = ""
    """--grid: comma-separated cell names to run (empty: all; names as in grid.md, e.g. detailed-0shot-cot)"""
    grid_sc_samples: Positive[int] = 4
    """--grid: rationales per pair and order in the self-consistency cells (the paper: 16)"""
    grid_sc_temperatures: str = "0.3,1.0"
    """--grid: the self-consistency cells' sampling temperatures"""
    cpu_threads: NonNegative[int] = 1
    """on CPU: torch threads (0: torch's default); a tiny model's small matrix products run faster on one"""
    # tiny: an imperfect, position-biased rule labeler, as LLM labelers are (the docs are LabelerConfig's)
    rule_noise: NonNegative[float] = 1.0
    rule_position_bias: float = 0.5


PRESETS = {
    "micro": dict(max_posts=24, gen_chunk=8, label_chunk=8, max_new_tokens=24, gen_batch_size=16, max_pairs=24),
    # the SFT policy of train_sft.py --preset smol (SmolLM2-135M-Instruct): 320 posts, the rule labeler
    "smol": dict(max_posts=320, max_query_tokens=160, max_new_tokens=48, gen_batch_size=64, gen_chunk=64),
    # the seed's labeler: Llama-3.3-70B-Instruct on vLLM (tensor parallel 4), detailed preamble, 0-shot, CoT
    "gpt2-large": dict(task_dir="", comparisons="openai/summarize_from_feedback", backend="vllm",
                       max_new_tokens=53, max_query_tokens=512, labeler="vllm",
                       judge_model="meta-llama/Llama-3.3-70B-Instruct", tensor_parallel_size=4, cot=True,
                       gen_chunk=4096, label_chunk=512, cpu_threads=0),
}

# fields that change how a run proceeds, not what its rows hold: a resumed run may change them
RUN_CONTROL = {"resume", "max_posts", "max_pairs", "only_candidates", "label_chunk", "judge_batch_size",
               "max_concurrency", "max_retries", "retry_base_delay", "retry_max_delay", "request_timeout",
               "price_input_per_1m", "price_output_per_1m", "gpu_memory_utilization", "device", "cpu_threads"}


# ----------------------------------------------------------------------------------------------------------------
# helpers


def default_out_dir(cfg: Config) -> Path:
    return Path(cfg.out_dir or f"runs/{cfg.preset}/{'grid' if cfg.grid else 'align' if cfg.align else 'labels'}")


def chunk_seed(seed: int, k: int) -> int:
    """Chunk k's sampling seed: a chunk regenerated after a kill draws exactly what it drew before."""
    return seed * 1_000_003 + k


def candidate_row(post, query: str, truncated: bool, a: dict, b: dict) -> dict:
    return {"id": post.id, "subreddit": post.subreddit, "title": post.title, "post": post.post, "query": query,
            "query_truncated": truncated, "summary_a": a["text"], "summary_b": b["text"],
            "tokens_a": a["token_ids"], "tokens_b": b["token_ids"]}


def sample_candidates(cfg: Config, posts, have: set, path: Path) -> None:
    """Two samples per post missing from `path`, appended chunk by chunk (hf) or after one vLLM call."""
    from minirlaif.generation import generate_texts, row_seeds, vllm_generate
    from minirlaif.models import load_causal_lm, load_tokenizer, set_attention

    tokenizer, task = load_tokenizer(cfg.sft_path), get_task(cfg.task)
    chunks = [posts[i:i + cfg.gen_chunk] for i in range(0, len(posts), cfg.gen_chunk)]
    todo = [(k, chunk) for k, chunk in enumerate(chunks) if any(p.id not in have for p in chunk)]
    greedy = cfg.temperature == 0
    if cfg.backend == "vllm":
        # one call for every missing post; each request's seed is fixed by the post's place in `posts`, so its
        # samples depend neither on the batch nor on what a killed run had finished; a kill loses the whole call
        place = {p.id: i for i, p in enumerate(posts)}
        missing = [p for _, chunk in todo for p in chunk if p.id not in have]
        seeds = row_seeds(cfg.seed, n=len(posts))
        built = [task.build_query(tokenizer, p, cfg.max_query_tokens) for p in missing]
        outs = vllm_generate(cfg.sft_path, [q[1] for q in built], n=2, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, seed=cfg.seed,
                             tensor_parallel_size=cfg.tensor_parallel_size,
                             gpu_memory_utilization=cfg.gpu_memory_utilization,
                             seeds=[seeds[place[p.id]] for p in missing])
        rows = [candidate_row(p, q[0], q[2], o[0], o[1]) for p, q, o in zip(missing, built, outs)]
        for i in range(0, len(rows), cfg.gen_chunk):
            append_jsonl(path, rows[i:i + cfg.gen_chunk])
        return
    device = resolve_device(cfg.device)
    model = set_attention(load_causal_lm(cfg.sft_path).to(device).eval(), device, cfg.bf16)  # CPU bf16: eager
    for k, chunk in progress(todo, "candidates"):
        built = [task.build_query(tokenizer, p, cfg.max_query_tokens) for p in chunk]
        # each query twice: two independent samples per post, drawn in one seeded pass over the chunk
        outs = generate_texts(model, tokenizer, [q[1] for q in built for _ in range(2)], cfg.max_new_tokens,
                              cfg.gen_batch_size, temperature=cfg.temperature, greedy=greedy,
                              seed=chunk_seed(cfg.seed, k), device=device, bf16=cfg.bf16)
        append_jsonl(path, [candidate_row(p, q[0], q[2], outs[2 * j], outs[2 * j + 1])
                            for j, (p, q) in enumerate(zip(chunk, built)) if p.id not in have])


def read_unique(path: Path, schema: dict, resumable: bool = True) -> dict[str, dict]:
    """{id: row} of one of our jsonl files (resumable: ours to cut after a kill; else an input, read only)."""
    rows = read_jsonl_resumable(path, schema) if resumable else read_jsonl(path, schema)
    return unique_ids(rows, path)


def candidate_items(cfg: Config, cand_path: Path, external: bool) -> tuple[list[dict], dict]:
    """Candidate pairs for the unique posts of the comparisons split (sampling the missing ones first, unless the
    candidates are another run's file: an input, never written to)."""
    posts, stats = load_posts(cfg.comparisons, cfg.split)
    if stats.schema not in ("comparisons", "hh"):
        raise UserError(f"{cfg.comparisons}: expected human comparisons (openai/summarize_from_feedback or "
                         f"Anthropic/hh-rlhf schema), found the {stats.schema!r} schema")
    posts = posts[:cfg.max_posts] if cfg.max_posts > 0 else posts
    have = read_unique(cand_path, CANDIDATE_SCHEMA, resumable=not external)
    if missing := [p.id for p in posts if p.id not in have]:
        if external:
            raise UserError(f"{cand_path} (--candidates) holds no candidates for {len(missing)} of the "
                             f"{len(posts)} posts (e.g. {missing[:3]}); it is an input and is never written to: "
                             f"lower --max-posts, or extend it with the run that wrote it")
        sample_candidates(cfg, posts, set(have), cand_path)
        have = read_unique(cand_path, CANDIDATE_SCHEMA)
    items = [{**have[p.id], "facts": p.facts} for p in posts]
    return items, {"n_posts": len(posts), "n_comparison_rows": stats.n_read,
                   "n_skipped_empty": stats.n_skipped_empty, **candidate_stats(items)}


def candidate_stats(items: list[dict]) -> dict:
    toks = [it[k] for it in items for k in ("tokens_a", "tokens_b")]
    eos = [t[-1] for t in toks if t]
    eos_id = collections.Counter(eos).most_common(1)[0][0] if eos else None  # the policy's stop token
    return {"candidate_mean_tokens": statistics.mean(len(t) for t in toks) if toks else 0.0,
            "candidate_frac_eos": sum(bool(t) and t[-1] == eos_id for t in toks) / max(1, len(toks)),
            "n_truncated_queries": sum(it["query_truncated"] for it in items),
            "n_identical_pairs": sum(it["summary_a"] == it["summary_b"] for it in items)}


def align_items(cfg: Config) -> tuple[list[dict], dict]:
    """Human comparisons as pairs: summary_a / summary_b are the comparison's summaries 0 / 1."""
    comps, stats = load_comparisons(cfg.comparisons, cfg.align_split, min_confidence=cfg.min_confidence or None)
    comps = comps[:cfg.max_pairs] if cfg.max_pairs > 0 else comps
    items = [{"id": f"{c.post.id}/{i}", "subreddit": c.post.subreddit, "title": c.post.title, "post": c.post.post,
              "summary_a": c.summaries[0], "summary_b": c.summaries[1], "human_choice": c.choice,
              "confidence": c.confidence, "facts": c.post.facts} for i, c in enumerate(comps)]
    return items, {"n_comparisons": len(items), "comparison_load_stats": stats.to_dict()}


def label_items(cfg: Config, items: list[dict], path: Path) -> tuple[list[dict], object]:
    """Label the items missing from pairs.jsonl, appending after each chunk; all rows of `items`, in order."""
    done = read_unique(path, PAIR_SCHEMA)
    todo = [it for it in items if it["id"] not in done]
    labeler = None
    if todo:
        labeler = make_labeler(cfg, cfg.seed)
        for i in progress(range(0, len(todo), cfg.label_chunk), "label"):
            chunk = todo[i:i + cfg.label_chunk]
            judged = judge_pairs(labeler, chunk, cfg.orders, cfg.seed)
            append_jsonl(path, [pair_row(it, j) for it, j in zip(chunk, judged)])
    rows = read_unique(path, PAIR_SCHEMA)
    return [rows[it["id"]] for it in items], labeler


def pair_row(item: dict, judged: dict) -> dict:
    """A pairs.jsonl row: the labels after the texts they are about, token ids last (long)."""
    row = {k: v for k, v in item.items() if k not in ("facts", "tokens_a", "tokens_b")}
    row.update({k: v for k, v in judged.items() if k != "id"})
    row["identical"] = item["summary_a"] == item["summary_b"]
    for k in ("tokens_a", "tokens_b"):
        if k in item:
            row[k] = item[k]
    return row


def gold_agreement(rows: list[dict], items: list[dict], score) -> dict:
    """Synthetic task: how often the labels prefer the summary the gold rule judge (`score`, the task's) scores
    higher (gold ties left out), for each order shown and for the averaged label."""
    gold = {it["id"]: score(it, it["summary_a"]) - score(it, it["summary_b"])
            for it in items if it.get("facts")}
    out = {}
    for key in ("p_a_ab", "p_a_ba", "p_a"):
        hits = [(r[key] > 0.5) == (gold[r["id"]] > 0) for r in rows
                if r.get(key) is not None and r["id"] in gold and gold[r["id"]] != 0 and r[key] != 0.5]
        out[f"gold_agreement{key[3:]}"] = sum(hits) / len(hits) if hits else None
    out["n_gold_ties"] = sum(g == 0 for g in gold.values())
    return out


def null_reasons(rows: list[dict]) -> dict:
    """Counts of why labels are null, with per-row details (in parentheses) removed."""
    return dict(collections.Counter(re.sub(r" \(.*?\)", "", r["null_reason"]) for r in rows if r["null_reason"]))


def print_report(pb: dict, metrics: dict) -> None:
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    print(f"\nposition bias ({pb['n_pairs']} pairs, {pb['n_both_orders']} labeled in both orders, "
          f"{pb['n_null']} null)")
    for key, what in (("consistency_rate", "same summary preferred in both orders"),
                      ("mean_p_first", "P(first shown is better); 0.5 = unbiased"),
                      ("first_position_win_rate_inconsistent", "inconsistent pairs: the first shown won both"),
                      ("n_inconsistent", "pairs preferred differently in the two orders")):
        print(f"  {key:38s} {fmt(pb[key]):>7s}   {what}")
    hist = pb["abs_p_a_minus_half"]
    print("  |p_a - 0.5|  " + "  ".join(f"[{lo:.1f},{hi:.1f}{']' if hi == hist['bins'][-1] else ')'}: {n}"
                                        for lo, hi, n in zip(hist["bins"], hist["bins"][1:], hist["counts"])))
    for key in ("agreement_ab", "agreement_ba", "agreement", "agreement_order_mean", "gold_agreement_ab",
                "gold_agreement_ba", "gold_agreement"):
        if metrics.get(key) is not None:
            print(f"  {key:38s} {fmt(metrics[key]):>7s}")


# ----------------------------------------------------------------------------------------------------------------


def main(cfg: Config) -> dict:
    if cfg.grid:  # the paper's prompt grid: one label run per cell (minirlaif/grid.py)
        from minirlaif.grid import run_grid
        return run_grid(cfg, main)
    if cfg.task_dir:  # tiny: the synthetic task (deterministic, skipped when present)
        get_task(cfg.task).write_synthetic(cfg.task_dir)
    out_dir = default_out_dir(cfg)
    own = out_dir / "candidates.jsonl"
    cand_path = Path(cfg.candidates) if cfg.candidates else own
    external = cand_path.resolve() != own.resolve()  # another run's file: read only
    inputs = {"comparisons": cfg.comparisons}
    if not cfg.align:
        inputs.update(sft_model=cfg.sft_path, **({"candidates": str(cand_path)} if external else {}))
    if cfg.labeler in ("hf", "vllm"):
        inputs["judge_model"] = cfg.judge_model
    # our own rows are append-only and resumable: a rerun continues them unless the config (other than how the run
    # proceeds: RUN_CONTROL) or an input changed; then they are deleted (but never another run's candidates)
    partial = ("pairs.jsonl", "position_bias.json", *(() if external else ("candidates.jsonl",)))
    if not cfg.align and not external:  # the policy that samples the candidates (a reward model would not do)
        check_model(cfg.sft_path, "causal-lm", "--sft-path")
    run = Run(cfg, "label", inputs, run_control=RUN_CONTROL, partial=partial, out_dir=out_dir)
    if run.finished:
        return run.finished
    if cfg.cpu_threads > 0 and resolve_device(cfg.device) == "cpu":
        torch.set_num_threads(cfg.cpu_threads)
    t0 = time.time()

    # 1. the pairs to label: fresh samples from the SFT policy, or (--align) human comparisons
    if cfg.align:
        items, info = align_items(cfg)
    else:
        items, info = candidate_items(cfg, cand_path, external)
        if cfg.only_candidates:
            print(f"{len(items)} candidate pairs in {cand_path}; stopping (--only-candidates)")
            return run.save({"mode": "candidates", **info, "time_s": time.time() - t0})
    t_items = time.time() - t0

    # 2. soft labels, both orders
    rows, labeler = label_items(cfg, items, out_dir / "pairs.jsonl")
    t_label = time.time() - t0 - t_items

    # 3. analysis
    pb = position_bias(rows)
    labeled = [r["p_a"] for r in rows if r["p_a"] is not None]
    metrics = {
        "mode": "align" if cfg.align else "label",
        "n_pairs": len(rows), "n_labeled": len(labeled), "n_null": len(rows) - len(labeled),
        "null_reasons": null_reasons(rows),
        "mean_p_a": statistics.mean(labeled) if labeled else None,
        "frac_a_preferred": sum(p > 0.5 for p in labeled) / len(labeled) if labeled else None,
        "mean_abs_p_a_minus_half": statistics.mean(abs(p - 0.5) for p in labeled) if labeled else None,
        **info,
        "consistency_rate": pb["consistency_rate"], "mean_p_first": pb["mean_p_first"],
        **gold_agreement(rows, items, get_task(cfg.task).score),
        **usage_summary(rows, cfg.price_input_per_1m, cfg.price_output_per_1m),
        "api_this_run": {k: v for k, v in (getattr(labeler, "usage", None) or {}).items()
                         if k in ("requests", "retries")},
        "time_s": time.time() - t0, "items_time_s": t_items, "label_time_s": t_label,
    }
    if cfg.align:
        metrics.update(human_agreement(rows, {it["id"]: it["human_choice"] == 0 for it in items}))
    write_json(out_dir / "position_bias.json", pb)
    print_report(pb, metrics)
    return run.save(metrics, headline=("consistency_rate", "gold_agreement", "agreement"))


if __name__ == "__main__":
    cli(main, Config, PRESETS)
