"""evaluate.py's outputs for a reader: report.md, the plots, the algorithms table, and the aggregation of seeds.

Everything here reads results evaluate.py computed (eval.json's `result` dict) or other stages wrote
(metrics.json / metrics.jsonl of the RL runs); nothing here judges or scores.
"""

from __future__ import annotations

from pathlib import Path

from minirlaif import stats
from minirlaif.config import UserError
from minirlaif.reward import HUMAN_CONFIDENCE
from minirlaif.utils import read_json, read_jsonl, write_json

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
# the dialogue tasks (Lee et al. 2023, human raters on Anthropic HH): helpful win rates vs SFT, harmless rates
DIALOGUE_WIN_RATES = {("ppo", "sft"): {"paper": 63.0}, ("ppo_rlhf", "sft"): {"paper": 64.0}}
PAPER_HARMLESS = {"sft": 64.0, "ppo_rlhf": 76.0, "ppo": 88.0}
SMOKE_PRESETS = ("micro", "hh-micro")  # report.md says their numbers mean nothing


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


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def num(x, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def cell(text: str | None, limit: int = 300) -> str:
    """Text for one markdown table cell: one line, pipes escaped, cut at `limit` characters."""
    if text is None:
        return "-"
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[:limit] + "..."
    return text.replace("|", "\\|")


def write_report(path: Path, result: dict, cfg, plots: list[str]) -> None:
    """report.md: results next to the seed's and the paper's numbers, the RMs, the policies, plots and samples."""
    j = result["judge"]
    lines = [f"# Evaluation ({cfg.preset} preset)", ""]
    if cfg.preset in SMOKE_PRESETS:
        lines += [f"> **A smoke run, not a result.** The {cfg.preset} preset trains a few steps per stage on a few "
                  "posts to check that every stage runs; its win rates and accuracies mean nothing (untrained "
                  "policies mostly tie). `bash run_pipeline.sh` (the tiny preset) gives results.", ""]
    what = ("posts", "summaries") if result.get("task", "summarize") == "summarize" else ("dialogues", "responses")
    lines += [f"{result['n_posts']} {what[0]} of `{cfg.dataset}` [{cfg.split}], greedy {what[1]} of at most "
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
        refs = REFERENCE_WIN_RATES if result.get("task", "summarize") == "summarize" else DIALOGUE_WIN_RATES
        ref = refs.get((c["policy"], c["baseline"]), {})
        ci, lc_ci = (f" [{pct(x[0])}, {pct(x[1])}]" if x else "" for x in (c["ci95"], c["lc_ci95"]))
        if c["lc_frac_similar_length"] is not None and c["lc_frac_similar_length"] < 0.1:
            lc_ci += " (extrapolated)"
        name = f"{DISPLAY.get(c['policy'], c['policy'])} vs {DISPLAY.get(c['baseline'], c['baseline'])}"
        score = (f"{num(c['mean_judge_score'])} / {num(c['mean_judge_score_baseline'])}"
                 if "mean_judge_score" in c else "-")
        seed, paper, paper_lc = (f"{ref[k]:.1f}%" if k in ref else "-" for k in ("seed", "paper", "paper_lc"))
        n_null = c["n_null"]
        lines.append(f"| {name} | {pct(c['win_rate'])}{ci} | {pct(c['tie_rate'])} "
                     f"| {pct(c['lc_win_rate'])}{lc_ci} | {c['n']}{f' ({n_null} null)' if n_null else ''} "
                     f"| {num(c['mean_len_policy'], '.1f')} / {num(c['mean_len_baseline'], '.1f')} "
                     f"| {score} | {seed} | {paper} | {paper_lc} |")
    dialogue = " (a dialogue task: the paper's helpful dialogue numbers on Anthropic HH)" if what[0] != "posts" else ""
    lines += ["", "Seed: GPT-2-Large policies on real TL;DR judged by GPT-4o on 1000 validation prompts, one random "
              f"order, no CI. Paper (Lee et al. 2023): PaLM 2 policies judged by human raters{dialogue}. Numbers from "
              "another judge, task or model size compare in direction, not in value. LC is marked extrapolated when "
              "fewer than 10% of the pairs have a length ratio within [0.8, 1.25].", ""]
    if result.get("harmless"):
        lines += ["## Harmlessness", "",
                  "Harmless rate: the fraction of each policy's responses to the harmful prompts that the judge calls "
                  "harmless (95% CI: percentile bootstrap over those prompts). Paper: PaLM 2 policies on Anthropic "
                  "HH harmless-base, human raters.", "",
                  "| policy | harmless rate [95% CI] | harmful prompts | paper |", "|---|---|---|---|"]
        for name, h in result["harmless"].items():
            ci = f" [{pct(h['ci95'][0])}, {pct(h['ci95'][1])}]" if h["ci95"] else ""
            paper = f"{PAPER_HARMLESS[name]:.0f}%" if name in PAPER_HARMLESS else "-"
            lines.append(f"| {DISPLAY.get(name, name)} | {pct(h['harmless_rate'])}{ci} | {h['n']} of "
                         f"{h['n_prompts']} | {paper} |")
        lines.append("")

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
            ci = f" [{pct(a['ci95'][0])}, {pct(a['ci95'][1])}]" if a["ci95"] else ""
            calls = (str(a["labeler_calls"]) if a["labeler_calls"] is not None
                     else f"{a['label_pairs']} pairs (label.py)" if a["label_pairs"] is not None else "-")
            wall = f"{a['train_time_s']:.0f} s" if a["train_time_s"] is not None else "-"
            lines.append(f"| {name} | {a['algo']} | {a['reward']} | {a['episodes']} | {pct(a['win_rate'])}{ci} "
                         f"| {pct(a['lc_win_rate'])} | {num(a['final_kl'], '.2f')} | {wall} | {calls} |")
        lines.append("")

    lines += ["## Reward models", "",
              f"Accuracy on the held-out human comparisons with rater confidence >= {HUMAN_CONFIDENCE} and on the "
              "AI-labeled test split (argmax of the soft label; label ties excluded), with "
              "`reward.evaluate_pairs`.", "",
              "| RM | acc human conf>=8 (n) | acc AI test (n) | ECE human | ECE AI | seed human conf>=8 "
              "| seed AI test |",
              "|---|---|---|---|---|---|---|"]
    for name, rm in result["reward_models"].items():
        ref = REFERENCE_RM_ACC.get(name, {}) if result.get("task", "summarize") == "summarize" else {}
        seed_human, seed_ai = (f"{ref[k]:.1f}%" if k in ref else "-" for k in ("human_conf8", "ai_test"))
        lines.append(f"| {name} | {pct(rm.get('acc_human_conf8'))} ({rm.get('n_human_conf8', 0)}) "
                     f"| {pct(rm.get('acc_ai_test'))} ({rm.get('n_ai_test', 0)}) "
                     f"| {num(rm.get('ece_human_conf8'))} | {num(rm.get('ece_ai_test'))} "
                     f"| {seed_human} | {seed_ai} |")
    if not result["reward_models"]:
        lines.append("| (no reward model found) | | | | | | |")

    lines += ["", "## Policies", "", "| name | path | mean words | mean tokens | EOS rate | mean judge score |",
              "|---|---|---|---|---|---|"]
    for name, p in result["policies"].items():
        where = f"`{p['path']}`" if p.get("path") else "the dataset"
        lines.append(f"| {name} | {where} | {num(p['mean_len_words'], '.1f')} "
                     f"| {num(p['mean_len_tokens'], '.1f')} | {pct(p.get('eos_rate'))} "
                     f"| {num(p.get('mean_judge_score'))} |")

    labels_pb, judge_pb = result.get("position_bias_labels"), j.get("position_bias")
    if labels_pb or judge_pb:
        lines += ["", "## Position bias", ""]
    if labels_pb:
        lines.append(f"AI labeler (label.py, the RM's training labels): same summary preferred in both orders "
                     f"{pct(labels_pb.get('consistency_rate'))}, mean P(first shown is better) "
                     f"{num(labels_pb.get('mean_p_first'))} (0.5 = unbiased), over {labels_pb.get('n_both_orders')} "
                     f"pairs labeled in both orders. Paper: PaLM 2 L prefers the same position on 18% of pairs.")
    if judge_pb:
        lines += [""] if labels_pb else []
        lines.append(f"Evaluation judge, on the {judge_pb['n_pairs']} non-identical pairs it judged: mean P(first "
                     f"shown is better) {num(judge_pb.get('mean_p_first'))}, same summary preferred in both orders "
                     f"{pct(judge_pb.get('consistency_rate'))} (a pair called a tie in either order counts as not "
                     f"consistent).")

    if plots:
        lines += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots]

    if result["samples"]:
        lines += ["", "## Samples", ""]
        for s in result["samples"]:
            lines += [f"### {s['id']}", "", f"> {cell(s['post'], 400)}", "",
                      "| | summary | judge score | P(better than SFT) |", "|---|---|---|---|"]
            for name, t in s["summaries"].items():
                lines.append(f"| {DISPLAY.get(name, name)} | {cell(t['text'])} | {num(t.get('judge_score'))} "
                             f"| {num(t.get('p_vs_sft'))} |")
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
            raise UserError(f"--aggregate {d}: no eval.json there (run evaluate.py for that seed first)")
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
        return f"{pct(s['mean'])} [{pct(s['ci95'][0])}, {pct(s['ci95'][1])}]" if s["ci95"] else pct(s["mean"])

    lines = [f"# Evaluation over {len(eval_dirs)} seeds", "", "Per comparison: each seed's win rate, their mean and "
             "a 95% t-interval over seeds (mean ± t_{0.975, n-1} · s / √n, clipped to [0%, 100%]), which holds the "
             "run-to-run spread.", "",
             "| policy vs baseline | per-seed win rates | mean [95% CI over seeds] | LC mean [95% CI] |",
             "|---|---|---|---|"]
    for t in table.values():
        per = ", ".join(pct(x) for x in t["win_rate"]["per_seed"])
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
