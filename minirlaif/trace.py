"""`train_ppo.py --trace N` and `train_rm.py --trace N`: a few episodes' numbers, token by token, for a reader.

A PPO trace is written from the tensors the update used: the rollout batch after steps 4-5 (log-probs, the KL,
the rewards, values, advantages before and after whitening, returns) and, for each PPO epoch, the log-probs (and
values) the loss itself computed. Nothing is recomputed by a second forward pass; the TD residuals come from
`losses.td_residuals`, the function GAE sums. Per traced update: trace/update_NNNN.md (a table per episode, tokens
as text, the step numbers of train_ppo.py heading the columns), .json (the same numbers; tests recompute every
column from the others) and .png (reward, value, advantage and return over positions, clipped tokens marked).
docs/algorithms.md walks through one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minirlaif.losses import masked_mean, masked_var, sequence_returns, td_residuals
from minirlaif.utils import write_json

BASELINES = {"rloo": "the mean return of the query's other k - 1 samples", "grpo": "the group's mean return, "
             "divided by its std (+1e-4)", "dr-grpo": "the group's mean return (no std)", "reinforce":
             "V(x), the value before the first response token", "reinforce++": "none: the reward-to-go, whitened"}


def traced_updates(spec: str, num_updates: int) -> set[int]:
    """The 1-based updates "first,last,5" names (--trace-updates)."""
    out = set()
    for word in (w.strip() for w in spec.split(",") if w.strip()):
        out.add(1 if word == "first" else num_updates if word == "last" else int(word))
    return out


class PPOTrace:
    """The numbers of batch rows 0..n-1 of one update (rank 0's first episodes), gathered as the update runs."""

    def __init__(self, batch: dict, n: int, update: int, kl_coef: float, k: int, whiten: bool, cfg, dist, tokenizer,
                 posts):
        self.rows, self.update, self.cfg, self.tokenizer = list(range(min(n, len(posts)))), update, cfg, tokenizer
        mask = batch["response_mask"]
        self.batch, self.posts, self.kl_coef, self.k, self.whiten = batch, posts, kl_coef, k, whiten
        self.master = dist.master  # every rank takes the whitening statistics (a collective); rank 0 writes
        # the whitening statistics of step 5: the mean and (biased) variance over every rank's valid tokens
        raw = batch["raw_advantages"]
        self.white = {"mean": masked_mean(raw, mask, all_reduce=dist.all_reduce).item(),
                      "var": masked_var(raw, mask, all_reduce=dist.all_reduce).item(), "eps": 1e-8}
        self.epochs: dict[int, list] = {r: [] for r in self.rows}  # row -> one dict per PPO epoch

    def record(self, epoch: int, rows: torch.Tensor, mb: dict, logprobs, values, num_valid) -> None:
        """One micro-batch of step 6: keep the traced rows' new log-probs (and values) the loss used."""
        for j, r in enumerate(rows.tolist() if self.master else ()):
            if r in self.epochs:
                n = int(mb["response_mask"][j].sum())
                e = {"epoch": epoch + 1, "logprob_new": logprobs[j, :n].tolist(), "num_valid": float(num_valid)}
                if values is not None:
                    e["value_new"] = values[j, :n].tolist()
                self.epochs[r].append(e)

    def episode(self, r: int) -> dict:
        b, cfg = self.batch, self.cfg
        n = int(b["response_mask"][r].sum())
        cut = lambda key: b[key][r, :n].tolist()  # noqa: E731 (the row's valid positions)
        tokens = b["response"][r, :n].tolist()
        ep = {"row": r, "id": self.posts[r].id, "n_tokens": n, "tokens": tokens,
              "text": [self.tokenizer.decode([t]) for t in tokens], "logprob": cut("logprobs"),
              "ref_logprob": cut("ref_logprobs"), "kl": cut("kl"), "reward": cut("rewards"),
              "advantage": cut("raw_advantages"), "advantage_whitened": cut("advantages"),
              "score": b["scores"][r].item(), "raw_score": b["raw_scores"][r].item(),
              "has_eos": bool(b["has_eos"][r]), "kept": bool(b["kept"][r]), "epochs": self.epochs[r]}
        if "values" in b:
            ep["value"] = cut("values")
            deltas = td_residuals(b["rewards"][r: r + 1], b["values"][r: r + 1], b["response_mask"][r: r + 1],
                                  cfg.gamma)  # (1, R): what GAE summed
            ep["td_residual"] = deltas[0, :n].tolist()
            ep["return"] = cut("returns")
        if self.k > 1:  # the returns of the row's group, whose baseline its advantage is against
            g0 = r // self.k * self.k
            ep["group_returns"] = sequence_returns(b["rewards"], b["response_mask"])[g0: g0 + self.k].tolist()
        return ep

    def write(self, out_dir: Path) -> dict | None:
        """trace/update_NNNN.{json,md,png} (rank 0); returns the JSON."""
        if not self.master:
            return None
        cfg = self.cfg
        out = {"update": self.update, "algo": cfg.algo, "kl_coef": self.kl_coef, "kl_estimator": cfg.kl_estimator,
               "gamma": cfg.gamma, "lam": cfg.lam, "cliprange": cfg.cliprange, "cliprange_value": cfg.cliprange_value,
               "missing_eos_penalty": cfg.missing_eos_penalty, "temperature": cfg.temperature,
               "samples_per_query": self.k, "whitened": self.whiten, "whitening": self.white,
               "episodes": [self.episode(r) for r in self.rows]}
        path = Path(out_dir) / "trace" / f"update_{self.update:04d}"
        write_json(path.with_suffix(".json"), out)
        path.with_suffix(".md").write_text(markdown(out))
        figure(out, path.with_suffix(".png"))
        return out


def clipped(advantage: float, ratio: float, c: float) -> bool:
    """The clip is active: -A * clip(ratio, 1 - c, 1 + c) > -A * ratio (losses.ppo_policy_loss's clipfrac)."""
    return -advantage * min(max(ratio, 1 - c), 1 + c) > -advantage * ratio


def markdown(t: dict) -> str:
    """One table per episode: a row per response position, train_ppo.py's step numbers over the columns."""
    import math

    f = lambda x: f"{x:.4f}"  # noqa: E731
    lines = [f"# PPO trace: update {t['update']} (`--algo {t['algo']}`)", "",
             f"kl_coef {t['kl_coef']:g} ({t['kl_estimator']}), gamma {t['gamma']:g}, lam {t['lam']:g}, cliprange "
             f"{t['cliprange']:g}, temperature {t['temperature']:g}. Step 5's whitening over every valid token of the "
             f"batch: mean {t['whitening']['mean']:.4f}, std {math.sqrt(t['whitening']['var']):.4f}"
             f"{'' if t['whitened'] else ' (not applied: this estimator is not whitened)'}.", ""]
    for ep in t["episodes"]:
        value = "value" in ep
        head = ["t", "2. token", "2. logprob (old)", "2. ref logprob", "4. KL", "4. reward"]
        head += ["1. value V", "5. TD residual", "5. advantage", "5. whitened", "5. return"] if value else \
            ["5. advantage", "5. whitened"]
        head += [f"6. ratio e{e['epoch']}" for e in ep["epochs"]]
        lines += [f"## episode {ep['row']} (post {ep['id']})", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        for i in range(ep["n_tokens"]):
            tok = ep["text"][i].replace("|", "\\|").replace("\n", "\\n") or " "
            cells = [str(i), f"`{tok}`", f(ep["logprob"][i]), f(ep["ref_logprob"][i]), f(ep["kl"][i]),
                     f(ep["reward"][i])]
            if value:
                cells += [f(ep["value"][i]), f(ep["td_residual"][i]), f(ep["advantage"][i]),
                          f(ep["advantage_whitened"][i]), f(ep["return"][i])]
            else:
                cells += [f(ep["advantage"][i]), f(ep["advantage_whitened"][i])]
            for e in ep["epochs"]:
                ratio = math.exp(e["logprob_new"][i] - ep["logprob"][i])
                mark = " **clip**" if clipped(ep["advantage_whitened"][i], ratio, t["cliprange"]) else ""
                cells.append(f"{ratio:.4f}{mark}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append(f"| {ep['n_tokens']}.. | (padding: mask 0, no reward, advantage or loss) |" + " |" *
                     (len(head) - 2))
        eos = (f"ends with EOS (token {ep['n_tokens'] - 1}): no penalty" if ep["has_eos"] else
               f"no EOS in {ep['n_tokens']} tokens: missing_eos_penalty {t['missing_eos_penalty']:g} subtracted")
        R = sum(ep["reward"])
        lines += ["", f"- 3. score {ep['score']:.4f} (reward {ep['raw_score']:.4f}; {eos}), on the last valid token, "
                      f"t = {ep['n_tokens'] - 1}.",
                  f"- 4. return R = sum of the rewards = score - kl_coef * sum KL = {R:.4f} (sum KL "
                  f"{sum(ep['kl']):.4f}).",
                  f"- 5. baseline: {BASELINES.get(t['algo'], 'GAE: the values above (gamma, lam)')}"
                  + (f"; the group's returns {', '.join(f'{x:.4f}' for x in ep['group_returns'])}"
                     if "group_returns" in ep else "") + "."]
        for e in ep["epochs"]:
            share = sum(max(-a * math.exp(lp - old), -a * min(max(math.exp(lp - old), 1 - t["cliprange"]),
                                                               1 + t["cliprange"]))
                        for a, lp, old in zip(ep["advantage_whitened"], e["logprob_new"], ep["logprob"]))
            lines.append(f"- 6. epoch {e['epoch']}: its share of the mini-batch's policy loss "
                         f"{share / e['num_valid']:.6f} ({ep['n_tokens']} of the {e['num_valid']:.0f} tokens the loss "
                         f"is averaged over)")
        lines.append("")
    return "\n".join(lines) + "\n"


def figure(t: dict, path: Path) -> None:
    """Reward, value, advantage (raw and whitened) and return over positions, one panel per episode; the tokens
    the ratio clip caught in any epoch marked. Skipped (with a message) without matplotlib."""
    import math

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: the trace's figure is skipped")
        return
    eps = t["episodes"]
    fig, axes = plt.subplots(len(eps), 1, figsize=(8, 2.6 * len(eps)), squeeze=False)
    for ax, ep in zip(axes[:, 0], eps):
        x = range(ep["n_tokens"])
        ax.plot(x, ep["reward"], "o-", ms=3, label="4. reward")
        for key, label in (("value", "1. value"), ("return", "5. return")):
            if key in ep:
                ax.plot(x, ep[key], ".-", label=label)
        ax.plot(x, ep["advantage"], "s-", ms=2, label="5. advantage")
        ax.plot(x, ep["advantage_whitened"], "^-", ms=2, label="5. whitened")
        hit = [i for i in x for e in ep["epochs"] if clipped(ep["advantage_whitened"][i], math.exp(
            e["logprob_new"][i] - ep["logprob"][i]), t["cliprange"])]
        if hit:
            ax.plot(sorted(set(hit)), [0.0] * len(set(hit)), "rx", ms=8, label="6. clipped")
        ax.axhline(0, c="gray", lw=0.5)
        ax.set_title(f"update {t['update']}, episode {ep['row']}: {ep['n_tokens']} tokens", fontsize=9)
        ax.set_xlabel("response position")
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rm_trace(out_dir: Path, model, pairs, pad_id: int, offset_info: dict) -> dict:
    """train_rm.py --trace N: for N test pairs, both rewards (after the reference offset), the margin, the soft
    label, P(a better) = sigmoid(margin) and the pair's Bradley-Terry loss; trace/pairs.{json,md}."""
    import math

    from minirlaif.reward import score_pairs

    r_a, r_b = score_pairs(model, pairs, pad_id, 64, next(model.parameters()).device)  # as train_rm.py scores
    offset, rows = offset_info["reward_offset"], []
    for p, a, b in zip(pairs, r_a.tolist(), r_b.tolist()):
        m = a - b
        loss = -(p.prob_a * -math.log1p(math.exp(-m)) + (1 - p.prob_a) * -math.log1p(math.exp(m)))
        rows.append({"id": p.id, "r_a": a, "r_b": b, "offset": offset, "margin": m, "label": p.prob_a,
                     "p_a": 1 / (1 + math.exp(-m)), "bt_loss": loss})
    out = {"offset": offset, "pairs": rows}
    d = Path(out_dir) / "trace"
    write_json(d / "pairs.json", out)
    lines = ["# Reward model trace", "",
             f"Rewards after the reference offset ({offset:.4f} subtracted from every reward: references average 0).",
             "Loss = -[p log sigmoid(m) + (1 - p) log sigmoid(-m)], m = r_a - r_b, p = the label P(a is better).", "",
             "| pair | r_a | r_b | margin m | label p | sigmoid(m) | BT loss |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['id']} | {r['r_a']:.4f} | {r['r_b']:.4f} | {r['margin']:.4f} | {r['label']:.3f} | {r['p_a']:.3f} "
              f"| {r['bt_loss']:.4f} |" for r in rows]
    (d / "pairs.md").write_text("\n".join(lines) + "\n")
    return json.loads(json.dumps(out))
