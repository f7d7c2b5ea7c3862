"""The paper's prompt grid (Table 2) in one command: `python label.py --grid`.

The same --align comparisons (human comparisons with confidence >= --min-confidence) are labeled once per cell:
preamble base|detailed x shots 0|1|2 x CoT off|on, plus self-consistency (detailed, 0-shot, --grid-sc-samples
rationales) at each of --grid-sc-temperatures. Each cell is an ordinary, resumable label.py run in out_dir/<cell>;
--grid-cells picks some. The table (grid.md, grid.json) is computed from the pairs.jsonl rows the cells wrote: per
cell, alignment with the (simulated) humans (ties count half) and with the gold rule judge, each with a bootstrap
95% CI over pairs, the same-position rate, mean P(first), the null rate, tokens and seconds per pair, next to the
paper's numbers (PaLM 2 L). The rule labeler reads no prompt, so with it every cell is the same labeler: the grid
then tests only the mechanics. Results: docs/labeling.md.
"""

from __future__ import annotations

import dataclasses

from minirlaif.config import UserError
from minirlaif.judges import position_bias
from minirlaif.tasks import get_task
from minirlaif.utils import PAIR_SCHEMA, write_json

# the paper's alignment (%) with human preferences, PaLM 2 L on TL;DR (Table 2; self-consistency: 16 samples)
PAPER_ALIGNMENT = {"base-0shot": 76.1, "detailed-0shot": 77.4, "base-1shot": 76.0, "detailed-1shot": 76.2,
                   "base-2shot": 75.7, "detailed-2shot": 76.3, "base-0shot-cot": 77.5, "detailed-0shot-cot": 78.0,
                   "detailed-1shot-cot": 77.4, "detailed-2shot-cot": 76.8, "detailed-0shot-cot-sc-T0.3": 76.2,
                   "detailed-0shot-cot-sc-T0.5": 75.1, "detailed-0shot-cot-sc-T0.7": 74.0,
                   "detailed-0shot-cot-sc-T1": 72.8}
PAPER_SAME_POSITION = 18.0  # PaLM 2 L after swapping the order (S: 21%, XS: 56%), reported per labeler, not prompt


def grid_cells(cfg) -> dict[str, dict]:
    """{cell name: the label-config fields it sets}, in the table's order."""
    cells = {}
    for cot in (False, True):
        for shots in (0, 1, 2):
            for preamble in ("base", "detailed"):
                cells[f"{preamble}-{shots}shot{'-cot' if cot else ''}"] = dict(
                    preamble=preamble, shots=shots, cot=cot, sc_samples=1, sc_temperature=0.0)
    try:
        temperatures = [float(x) for x in cfg.grid_sc_temperatures.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--grid-sc-temperatures: comma-separated numbers, got {cfg.grid_sc_temperatures!r}") from None
    if any(not t > 0 for t in temperatures):
        raise UserError(f"--grid-sc-temperatures must be > 0 (a self-consistency cell samples), got {temperatures}")
    for t in temperatures:
        cells[f"detailed-0shot-cot-sc-T{t:g}"] = dict(
            preamble="detailed", shots=0, cot=True, sc_samples=cfg.grid_sc_samples, sc_temperature=t)
    if cfg.grid_cells:
        want = [c.strip() for c in cfg.grid_cells.split(",") if c.strip()]
        if unknown := [c for c in want if c not in cells]:
            raise UserError(f"--grid-cells: unknown cells {unknown}; the grid's cells are {list(cells)}")
        cells = {c: cells[c] for c in want}
    return cells


def grid_row(name: str, rows: list[dict], items: list[dict], time_s: float | None, seed: int, score=None) -> dict:
    """One line of the table, from the rows a cell wrote: alignment with the simulated humans (ties count half)
    and with the gold rule judge (ties left out), each with a bootstrap 95% CI over pairs, position bias, nulls,
    tokens and time per pair. `score`: the task's rule judge (default TL;DR's)."""
    from minirlaif.stats import bootstrap_ci

    score = score or get_task("summarize").score
    by_id = {it["id"]: it for it in items}
    human, gold = [], []
    for r in rows:
        if r.get("p_a") is None:
            continue
        pref = (r["p_a"] > 0.5) - (r["p_a"] < 0.5)  # +1: A, -1: B, 0: tie
        human.append(0.5 if pref == 0 else float(pref == (1 if r["human_choice"] == 0 else -1)))
        it = by_id[r["id"]]
        if it.get("facts"):
            g = score(it, it["summary_a"]) - score(it, it["summary_b"])
            if g != 0 and pref != 0:
                gold.append(float((pref > 0) == (g > 0)))
    pb = position_bias(rows)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    n = len(rows)
    tokens = {k: sum((r.get("usage") or {}).get(k, 0) for r in rows) if any(r.get("usage") for r in rows) else None
              for k in ("prompt_tokens", "completion_tokens")}  # None: the labeler reports no tokens (rule)
    return {"cell": name, "n_pairs": n, "paper_alignment": PAPER_ALIGNMENT.get(name),
            "alignment_human": mean(human), "alignment_human_ci95": bootstrap_ci(human, seed=seed),
            "n_alignment_human": len(human), "alignment_gold": mean(gold),
            "alignment_gold_ci95": bootstrap_ci(gold, seed=seed), "n_alignment_gold": len(gold),
            "same_position_rate": pb["same_position_rate"], "mean_p_first": pb["mean_p_first"],
            "null_rate": pb["n_null"] / n if n else None,
            **{f"{k}_per_pair": v / n if n and v is not None else None for k, v in tokens.items()},
            "seconds_per_pair": time_s / n if n and time_s is not None else None}


def grid_table(lines: list[dict], title: str) -> str:
    """The grid as a markdown table in the paper's Table 2 layout (one line per prompt setting)."""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    ci = lambda v, c: "-" if v is None else f"{100 * v:.1f} [{100 * c[0]:.1f}, {100 * c[1]:.1f}]"  # noqa: E731
    num = lambda v, f="{:.0f}": "-" if v is None else f.format(v)  # noqa: E731
    out = [title, "",
           "| prompt | alignment, humans conf>=8 (%) [95% CI] | paper | alignment, gold judge (%) [95% CI] | "
           "same position (%) | paper | mean P(first) | null (%) | prompt tok / pair | completion tok / pair | "
           "s / pair |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in lines:
        out.append(f"| {r['cell']} | {ci(r['alignment_human'], r['alignment_human_ci95'])} | "
                   f"{num(r['paper_alignment'], '{:.1f}')} | {ci(r['alignment_gold'], r['alignment_gold_ci95'])} | "
                   f"{pct(r['same_position_rate'])} | {PAPER_SAME_POSITION:.0f} | {num(r['mean_p_first'], '{:.3f}')} | "
                   f"{pct(r['null_rate'])} | {num(r['prompt_tokens_per_pair'])} | "
                   f"{num(r['completion_tokens_per_pair'])} | {num(r['seconds_per_pair'], '{:.2f}')} |")
    return "\n".join(out) + "\n"


def run_grid(cfg, label_main) -> dict:
    """Label the same --align comparisons once per grid cell (each a resumable run of `label_main`, label.py's
    main, into out_dir/<cell>), then build the table from the pairs.jsonl rows each cell wrote (not from its
    metrics), and write grid.json / grid.md."""
    from label import align_items, default_out_dir, read_unique

    out_dir = default_out_dir(cfg)
    base = dataclasses.replace(cfg, grid=False, align=True)
    if cfg.task_dir:  # tiny: the synthetic task (deterministic, skipped when present)
        get_task(cfg.task).write_synthetic(cfg.task_dir)
    items, _ = align_items(base)  # the fixed set every cell labels
    lines = []
    for name, fields in grid_cells(cfg).items():
        cell = dataclasses.replace(base, out_dir=str(out_dir / name), **fields)
        print(f"=== grid cell {name}")
        metrics = label_main(cell)
        rows = list(read_unique(out_dir / name / "pairs.jsonl", PAIR_SCHEMA, resumable=False).values())
        lines.append(grid_row(name, rows, items, metrics.get("label_time_s"), cfg.seed, get_task(cfg.task).score))
    what = cfg.judge_model or cfg.api_model or "rule labeler (reads no prompt: every cell is the same labeler)"
    title = (f"Prompt grid, labeler {cfg.labeler} {what}: {len(items)} human comparisons of confidence >= "
             f"{cfg.min_confidence} ({cfg.align_split} split); alignment = argmax of the label agrees (ties 1/2); "
             f"paper = PaLM 2 L on TL;DR (Table 2; self-consistency with 16 samples)")
    table = grid_table(lines, title)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "grid.json", {"title": title, "cells": lines})
    (out_dir / "grid.md").write_text(table)
    print(table)
    return {"cells": lines}
