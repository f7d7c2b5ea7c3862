"""Reward-model data, scoring and evaluation, shared by train_rm.py, train_ppo.py and evaluate.py, and RL's reward.

A comparison becomes a `Pair`: the query's token ids, the two summaries' token ids (each ending with EOS) and the
label P(a is better). The reward of a summary is the scalar head at the EOS of `query + " " + summary + eos`,
read at the last token whose attention mask is 1 (`models.sequence_rewards`), so padding side and batch mates do
not change it (`padding_invariance` measures that).

Tokenisation (`Encoder`, for its `task`: minirlaif/tasks.py, TL;DR by default): queries are built by the task's
`build_query` (an over-long post is cut at its last newline, a dialogue loses its oldest turns, as for the SFT and
PPO queries), summaries are the sampled token ids when the labels carry them (EOS appended when the sample did not
stop) or the task's `completion(text)` tokenised as it follows the query (`data.encode_completion`), and capped at
`max_summary_tokens` keeping the EOS. Every cut is counted; no pair is dropped for its length.

Evaluation (`evaluate_pairs`): accuracy against the label's argmax (label ties excluded, reward ties count as half),
the mean Bradley-Terry loss, and the expected calibration error (ECE) of sigmoid(r_a - r_b) against the labels:
pairs are binned by the confidence max(p, 1 - p) of the predicted winner into 10 equal bins over [0.5, 1], and
ECE = sum over bins of (bin size / n) * |mean confidence - mean label probability of the predicted winner|. With
hard labels that is the usual ECE (confidence vs accuracy); with soft AI labels it compares with the label
probability. The same bins give the reliability diagram (`reliability_diagram`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from minirlaif.data import DataError, Post, encode_completion, load_comparisons
from minirlaif.losses import bradley_terry_loss
from minirlaif.models import pad_batch, sequence_rewards, shared_prefix_rewards
from minirlaif.stats import bootstrap_ci
from minirlaif.run import all_reduce
from minirlaif.tasks import get_task
from minirlaif.utils import PAIR_SCHEMA, autocast, check_row

HUMAN_CONFIDENCE = 8  # the "high-confidence" human comparisons of the paper and the seed (acc_human_conf8)


# ----------------------------------------------------------------------------------------------------------------
# pairs and their tokenisation


@dataclass
class Pair:
    """One comparison of two summaries of a post, tokenised."""
    id: str                 # post id: splits group by it, so a post's pairs never straddle train and test
    query: list[int]        # query token ids (post cut to fit max_query_tokens)
    a: list[int]            # summary a: " summary" token ids ending with EOS
    b: list[int]
    prob_a: float           # label: P(a is better); AI: the soft (or hard) label, human: 1.0 or 0.0
    confidence: int | None = None  # human rater confidence (1-9); None for AI labels
    p_a_ab: float | None = None    # AI: P(a better) with a shown first, and with a shown second (for consistency)
    p_a_ba: float | None = None


@dataclass
class Encoder:
    """Token ids of queries and summaries under the length caps, counting every cut."""
    tokenizer: object
    max_query_tokens: int
    max_summary_tokens: int
    task: object = dataclasses.field(default_factory=lambda: get_task("summarize"))  # queries and completions
    n_truncated_queries: int = 0     # pairs (or references) whose post was cut to fit
    n_capped_summaries: int = 0      # summaries cut to max_summary_tokens (EOS kept)
    n_eos_appended: int = 0          # stored samples that had not stopped: EOS appended
    _queries: dict = field(default_factory=dict, repr=False)  # (id, subreddit, title, post) -> (text, ids, cut)

    def _built(self, post: Post) -> tuple[str, list[int], bool]:
        key = (post.id, post.subreddit, post.title, post.post)
        if key not in self._queries:
            self._queries[key] = self.task.build_query(self.tokenizer, post, self.max_query_tokens)
        return self._queries[key]

    def query(self, post: Post) -> list[int]:
        _, ids, cut = self._built(post)
        self.n_truncated_queries += cut
        return ids

    def summary(self, text: str | None = None, token_ids: list[int] | None = None,
                post: Post | None = None) -> list[int]:
        """A summary's ids: the stored sampled ids when given, else the reference-style completion tokenised as it
        follows the post's query (`data.encode_completion`)."""
        eos = self.tokenizer.eos_token_id
        if token_ids is not None:
            ids = list(token_ids)
            if not ids or ids[-1] != eos:
                ids, self.n_eos_appended = ids + [eos], self.n_eos_appended + 1
        else:
            ids = encode_completion(self.tokenizer, self._built(post)[0], self.task.completion(text, self.tokenizer))
        if len(ids) > self.max_summary_tokens:  # keep the EOS: the reward is read there
            ids, self.n_capped_summaries = ids[: self.max_summary_tokens - 1] + [eos], self.n_capped_summaries + 1
        return ids

    def counts(self) -> dict:
        return {"n_truncated_queries": self.n_truncated_queries, "n_capped_summaries": self.n_capped_summaries,
                "n_eos_appended": self.n_eos_appended}


def hard_label(p: float) -> float | None:
    """The argmax of a soft label as 1.0 / 0.0; None for a tie (p == 0.5), which says nothing about the order."""
    return None if p == 0.5 else float(p > 0.5)


def load_ai_pairs(path: str | Path, enc: Encoder) -> tuple[list[Pair], dict]:
    """label.py's pairs.jsonl -> Pairs with the soft label p_a, with counts of what was left out and why.

    A null p_a (the judge gave no usable answer) is skipped and counted by its null_reason. Training-label options
    (hard labels, dropping inconsistent pairs) are applied afterwards by `training_labels`, so the test set is
    the same whatever the training options.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no AI labels; run label.py first (or pass --labels-path)")
    pairs, stats = [], {"n_read": 0, "n_null": 0, "null_reasons": {}}
    vocab = len(enc.tokenizer)
    seen: dict[str, str] = {}  # id -> where it was first read: an id twice would count its pair twice
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            loc = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError as e:
                raise DataError(f"{loc}: malformed JSON line ({e})") from None
            check_row(row, PAIR_SCHEMA, loc)  # types too: an int token id, a probability, strings
            if row["id"] in seen:
                raise DataError(f"{loc}: id {row['id']!r} already on {seen[row['id']]}; each pair must appear once")
            seen[row["id"]] = loc
            stats["n_read"] += 1
            p = row["p_a"]
            if p is None:
                reason = row.get("null_reason") or "unknown"
                stats["n_null"] += 1
                stats["null_reasons"][reason] = stats["null_reasons"].get(reason, 0) + 1
                continue
            for k in ("tokens_a", "tokens_b"):
                toks = row.get(k)
                if toks is not None and any(t >= vocab for t in toks):
                    raise DataError(f"{loc}: field '{k}' must be token ids of the SFT tokenizer (0..{vocab - 1})")
            post = Post(id=str(row["id"]), subreddit=row["subreddit"], title=row["title"], post=row["post"], source=loc)
            pairs.append(Pair(id=post.id, query=enc.query(post),
                              a=enc.summary(row["summary_a"], row.get("tokens_a"), post),
                              b=enc.summary(row["summary_b"], row.get("tokens_b"), post), prob_a=float(p),
                              p_a_ab=row.get("p_a_ab"), p_a_ba=row.get("p_a_ba")))
    stats["n_kept"] = len(pairs)
    return pairs, stats


def training_labels(pairs: list[Pair], labels: str = "soft",
                    drop_inconsistent: bool = False) -> tuple[list[Pair], dict]:
    """The pairs an RM trains on, with counts of what was excluded.

    labels: "soft" keeps p_a; "hard" uses its argmax, and the ties p_a == 0.5 are excluded.
    drop_inconsistent: drop pairs whose two judge orders prefer different summaries (p_a_ab and p_a_ba on opposite
    sides of 0.5); pairs missing an order are kept.
    """
    if labels not in ("soft", "hard"):
        raise ValueError(f"labels must be 'soft' or 'hard', got {labels!r}")
    out, stats = [], {"n_label_ties": 0, "n_inconsistent": 0}
    for p in pairs:
        if drop_inconsistent and p.p_a_ab is not None and p.p_a_ba is not None and \
                (p.p_a_ab - 0.5) * (p.p_a_ba - 0.5) < 0:
            stats["n_inconsistent"] += 1
            continue
        if labels == "hard":
            hard = hard_label(p.prob_a)
            if hard is None:
                stats["n_label_ties"] += 1
                continue
            p = dataclasses.replace(p, prob_a=hard)
        out.append(p)
    return out, stats


def load_human_pairs(source: str, split: str, enc: Encoder, min_confidence: int | None = None,
                     max_pairs: int = -1, seed: int = 0) -> tuple[list[Pair], dict]:
    """Human comparisons (openai schema; CNN/DM dropped) -> Pairs with label 1.0 / 0.0 (choice 0 / 1).

    max_pairs > 0 keeps a seeded sample of that many (in source order)."""
    comparisons, load_stats = load_comparisons(source, split, min_confidence=min_confidence)
    if 0 < max_pairs < len(comparisons):
        keep = sorted(random.Random(seed).sample(range(len(comparisons)), max_pairs))
        comparisons = [comparisons[i] for i in keep]
    pairs = [Pair(id=c.post.id, query=enc.query(c.post), a=enc.summary(c.summaries[0], post=c.post),
                  b=enc.summary(c.summaries[1], post=c.post),
                  prob_a=1.0 if c.choice == 0 else 0.0, confidence=c.confidence) for c in comparisons]
    return pairs, {"n_read": load_stats.n_read, "n_dropped_cnndm": load_stats.n_dropped_cnndm,
                   "n_dropped_confidence": load_stats.n_dropped_confidence,
                   "n_skipped_empty": load_stats.n_skipped_empty, "n_kept": len(pairs)}


def split_of(post_id: str, seed: int, val_frac: float, test_frac: float) -> str:
    """"train", "validation" or "test" from a seeded hash of the post id: stable across runs, machines and row order."""
    u = int.from_bytes(hashlib.sha256(f"{seed}/{post_id}".encode()).digest()[:8], "big") / 2**64
    return "test" if u < test_frac else "validation" if u < test_frac + val_frac else "train"


def split_by_id(pairs: list[Pair], seed: int, val_frac: float, test_frac: float) -> dict[str, list[Pair]]:
    out = {"train": [], "validation": [], "test": []}
    for p in pairs:
        out[split_of(p.id, seed, val_frac, test_frac)].append(p)
    return out


# ----------------------------------------------------------------------------------------------------------------
# scoring


class PairRewards(nn.Module):
    """nn.Module whose forward gives (r_a, r_b) of a `pair_batch`, so DDP can wrap the reward computation.

    Each pair's query is encoded once and shared by its two summaries (`models.shared_prefix_rewards`): the same
    rewards as scoring query + a and query + b separately, with about half the compute on the tiny task.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, q_ids, q_mask, s_ids, s_mask) -> tuple[torch.Tensor, torch.Tensor]:
        r = shared_prefix_rewards(self.model, q_ids, q_mask, s_ids, s_mask).view(-1, 2)  # (B, 2)
        return r[:, 0], r[:, 1]


def pair_batch(pairs: list[Pair], pad_id: int) -> tuple[torch.Tensor, ...]:
    """(q_ids, q_mask, s_ids, s_mask, prob_a): the B queries (B, Tq), and the summaries a_0, b_0, a_1, b_1, ...
    (2B, Ts), all right-padded; the input of `PairRewards`."""
    q_ids, q_mask = pad_batch([p.query for p in pairs], pad_id)
    s_ids, s_mask = pad_batch([s for p in pairs for s in (p.a, p.b)], pad_id)
    return q_ids, q_mask, s_ids, s_mask, torch.tensor([p.prob_a for p in pairs], dtype=torch.float32)


@torch.no_grad()
def _rewards_of(model, seqs, batches, pad_id, device, bf16, side) -> torch.Tensor:
    """Rewards of seqs[i] for i in each batch of indices; positions not in any batch stay 0. (N,)"""
    device = torch.device(device)
    out = torch.zeros(len(seqs), dtype=torch.float32, device=device)
    for idx in batches:
        ids, mask = pad_batch([seqs[i] for i in idx], pad_id, side=side)
        with autocast(device, bf16):
            out[torch.tensor(idx, device=device)] = sequence_rewards(model, ids.to(device), mask.to(device)).float()
    return out


@torch.no_grad()
def score_sequences(model, seqs: list[list[int]], pad_id: int, batch_size: int, device, bf16: bool = False,
                    dist=None) -> torch.Tensor:
    """Rewards of token sequences (query + summary), in input order, as a float32 CPU tensor. (N,)

    Batches are formed in length order (less padding). Under torchrun (`dist`), each rank scores every
    world_size-th batch and the results are summed over ranks, so every rank gets all rewards.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    out = _rewards_of(model, seqs, batches[rank::world], pad_id, device, bf16, "right")
    if dist is not None:
        out = all_reduce(out, dist)
    model.train(was_training)
    return out.cpu()


@torch.no_grad()
def score_pairs(model, pairs: list[Pair], pad_id: int, batch_size: int, device, bf16: bool = False,
                dist=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_a, r_b), each (N,) float32 on the CPU: the rewards of both summaries of every pair.

    Scored as in training (`PairRewards`: each query encoded once for its two summaries), `batch_size` sequences
    (batch_size // 2 pairs) per forward pass, pairs batched in query-length order. Under torchrun each rank scores
    every world_size-th batch and the sums over ranks give every rank all rewards.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    rewards_fn = PairRewards(model)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].query))
    per_batch = max(1, batch_size // 2)
    batches = [order[i: i + per_batch] for i in range(0, len(order), per_batch)]
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    out = torch.zeros(len(pairs), 2, dtype=torch.float32, device=device)  # (N, 2): r_a, r_b
    for idx in batches[rank::world]:
        *inputs, _ = (t.to(device) for t in pair_batch([pairs[i] for i in idx], pad_id))
        with autocast(device, bf16):
            out[torch.tensor(idx, device=device)] = torch.stack(rewards_fn(*inputs), dim=1).float()
    if dist is not None:
        out = all_reduce(out, dist)
    model.train(was_training)
    out = out.cpu()
    return out[:, 0], out[:, 1]


def mean_reference_reward(model, enc: Encoder, posts: list[Post], batch_size: int, device, bf16: bool = False,
                          dist=None) -> tuple[float, float]:
    """(mean, std) of the rewards of the posts' reference summaries: the offset that makes references score 0."""
    seqs = [enc.query(p) + enc.summary(p.summary, post=p) for p in posts]
    r = score_sequences(model, seqs, enc.tokenizer.pad_token_id, batch_size, device, bf16, dist).double()
    return r.mean().item(), r.std().item() if len(r) > 1 else 0.0


@torch.no_grad()
def padding_invariance(model, seqs: list[list[int]], pad_id: int, device, bf16: bool = False, seed: int = 0) -> float:
    """Max |reward difference| of the same sequences scored three ways: each alone (no padding), right-padded in
    length-sorted batches of 8, and left-padded in shuffled batches of 5 (other neighbours, other padding)."""
    was_training = model.training
    model.eval()
    n = len(seqs)
    alone = _rewards_of(model, seqs, [[i] for i in range(n)], pad_id, device, bf16, "right")
    order = sorted(range(n), key=lambda i: len(seqs[i]))
    right = _rewards_of(model, seqs, [order[i: i + 8] for i in range(0, n, 8)], pad_id, device, bf16, "right")
    shuffled = random.Random(seed).sample(range(n), n)
    left = _rewards_of(model, seqs, [shuffled[i: i + 5] for i in range(0, n, 5)], pad_id, device, bf16, "left")
    model.train(was_training)
    return max((right - alone).abs().max().item(), (left - alone).abs().max().item()) if n else 0.0


# ----------------------------------------------------------------------------------------------------------------
# metrics


def calibration_bins(p_pred: torch.Tensor, p_label: torch.Tensor, n_bins: int = 10) -> list[dict]:
    """Reliability bins over the predicted winner's confidence max(p, 1 - p) in [0.5, 1].

    Each bin: its range, count, mean confidence, and the mean label probability of the predicted winner
    (its accuracy, for hard labels)."""
    p_pred, p_label = p_pred.double(), p_label.double()
    conf = torch.maximum(p_pred, 1 - p_pred)
    label_of_winner = torch.where(p_pred >= 0.5, p_label, 1 - p_label)
    k = ((conf - 0.5) * 2 * n_bins).long().clamp(0, n_bins - 1)  # bin index; conf 1.0 goes to the last bin
    bins = []
    for b in range(n_bins):
        sel = k == b
        n = int(sel.sum())
        bins.append({"lo": 0.5 + b / (2 * n_bins), "hi": 0.5 + (b + 1) / (2 * n_bins), "n": n,
                     "confidence": conf[sel].mean().item() if n else None,
                     "accuracy": label_of_winner[sel].mean().item() if n else None})
    return bins


def expected_calibration_error(p_pred: torch.Tensor, p_label: torch.Tensor, n_bins: int = 10) -> float:
    """sum over bins of (n_bin / n) * |mean confidence - mean label probability of the predicted winner|."""
    bins = calibration_bins(p_pred, p_label, n_bins)
    n = sum(b["n"] for b in bins)
    return sum(b["n"] / n * abs(b["confidence"] - b["accuracy"]) for b in bins if b["n"]) if n else float("nan")


def pair_metrics(r_a: torch.Tensor, r_b: torch.Tensor, prob_a: torch.Tensor) -> dict:
    """Accuracy vs the label's argmax (label ties excluded, reward ties count 1/2) with a bootstrap 95% interval,
    mean BT loss (all pairs), ECE and reliability bins."""
    r_a, r_b, prob_a = r_a.double(), r_b.double(), prob_a.double()
    decided = prob_a != 0.5
    label_a = prob_a[decided] > 0.5
    diff = (r_a - r_b)[decided]
    correct = torch.where(diff == 0, 0.5, ((diff > 0) == label_a).double())
    p_pred = torch.sigmoid(r_a - r_b)
    n = int(decided.sum())
    return {
        "acc": correct.mean().item() if n else float("nan"),
        "acc_ci95": bootstrap_ci(correct.numpy()),  # percentile bootstrap over pairs
        "n": n,
        "n_label_ties": int((~decided).sum()),
        "loss": bradley_terry_loss(r_a, r_b, prob_a).item() if len(r_a) else float("nan"),
        "ece": expected_calibration_error(p_pred, prob_a),
        "bins": calibration_bins(p_pred, prob_a),
    }


def evaluate_pairs(model, sets: dict[str, list[Pair]], pad_id: int, batch_size: int, device, bf16: bool = False,
                   dist=None, reliability_png: str | Path | None = None, title: str = "") -> dict:
    """Score each named set of pairs; flat metrics acc_<name> (and its bootstrap acc_<name>_ci95), n_<name>,
    n_label_ties_<name>, loss_<name>, ece_<name>.

    `calibration` holds each set's reliability bins; when `reliability_png` is given (rank 0 only) the reliability
    diagram of every set is drawn there. Empty sets give acc None and n 0.
    """
    out, calibration = {}, {}
    for name, pairs in sets.items():
        if not pairs:
            out.update({f"acc_{name}": None, f"n_{name}": 0})
            continue
        r_a, r_b = score_pairs(model, pairs, pad_id, batch_size, device, bf16, dist)
        m = pair_metrics(r_a, r_b, torch.tensor([p.prob_a for p in pairs]))
        out.update({f"acc_{name}": m["acc"], f"acc_{name}_ci95": m["acc_ci95"], f"n_{name}": m["n"],
                    f"n_label_ties_{name}": m["n_label_ties"], f"loss_{name}": m["loss"], f"ece_{name}": m["ece"]})
        calibration[name] = m["bins"]
    out["calibration"] = calibration
    if reliability_png is not None and calibration and (dist is None or dist.master):
        reliability_diagram(calibration, reliability_png, title)
    return out


def reliability_diagram(calibration: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """Plot mean label probability of the predicted winner against confidence, one line per set (matplotlib Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot([0.5, 1], [0.5, 1], ls="--", c="gray", lw=1, label="perfect calibration")
    for name, bins in calibration.items():
        used = [b for b in bins if b["n"]]
        n = sum(b["n"] for b in used)
        ece = sum(b["n"] / n * abs(b["confidence"] - b["accuracy"]) for b in used) if n else math.nan
        x, y = [b["confidence"] for b in used], [b["accuracy"] for b in used]
        line, = ax.plot(x, y, lw=1, label=f"{name} (n={n}, ECE={ece:.3f})")
        ax.scatter(x, y, s=[8 + 200 * b["n"] / n for b in used], color=line.get_color())  # area ~ pairs in the bin
    ax.set_xlim(0.5, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence max(p, 1 - p), p = sigmoid(r_a - r_b)")
    ax.set_ylabel("label probability of the predicted winner")
    ax.set_title(title or "reward model reliability", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------
# RL's reward, one interface for both kinds: the reward model (RLAIF / RLHF) or a labeler's rating (d-RLAIF)
#
#   reward(ids, mask, n_response, posts) -> (B,) scores of query + response, NaN where none could be given
#   reward.reference(post, query_ids, max_query_tokens, max_tokens, task) -> the score of the post's reference
#   reward.calls: labeler calls so far (None: no labeler); reward.state_dict() / load_state_dict(): checkpoints


class RMReward:
    """The reward model's score at the last real token of query + response (the EOS when there is one): where
    train_rm.py trained it to read."""

    calls = None

    def __init__(self, model: nn.Module, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @torch.no_grad()
    def __call__(self, ids, mask, n_response: int, posts) -> torch.Tensor:
        return sequence_rewards(self.model, ids, mask)  # (B,)

    @torch.no_grad()
    def reference(self, post: Post, query_ids: list[int], max_query_tokens: int, max_tokens: int, task) -> float:
        """The RM's score of the dataset's reference summary after the query, capped like a response."""
        ref = encode_completion(self.tokenizer, task.build_query(self.tokenizer, post, max_query_tokens)[0],
                                task.completion(post.summary, self.tokenizer))
        ids, mask = pad_batch([query_ids + ref[:max_tokens]], self.tokenizer.pad_token_id)
        device = next(self.model.parameters()).device
        return sequence_rewards(self.model, ids.to(device), mask.to(device)).item()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def leave_out_unscored(batch: dict, k: int) -> int:
    """Episodes the labeler could not rate leave the update with the rest of their group (a group estimator compares
    all k): response mask 0, so they add nothing to any loss, advantage or statistic, and score 0; batch["kept"]
    (B,) marks the others (the logged per-episode means are over them). Returns how many left on this rank."""
    out = (~torch.isfinite(batch["scores"])).view(-1, k).any(1).repeat_interleave(k)  # (B,)
    batch["kept"] = ~out
    if out.any():
        batch["response_mask"][out] = 0
        for key in ("scores", "raw_scores"):
            batch[key] = torch.where(out, torch.zeros_like(batch[key]), batch[key])
    return int(out.sum())


class LabelerReward:
    """d-RLAIF: a labeler's expected 1-10 rating of each decoded response, rescaled to [-1, 1].

    A cache keyed by (post id, response) makes sure the labeler is never asked twice about the same response: each
    call sends one batch of the not-yet-rated ones. `calls` counts what the labeler was asked, `unrated` the
    responses it could not rate (those get NaN, never a made-up reward; the trainer leaves them out). The state
    (cache and counters) goes into the trainer's checkpoint, so a resumed run asks and counts what an
    uninterrupted one would.
    """

    def __init__(self, labeler, tokenizer):
        self.labeler, self.tokenizer, self.cache, self.calls, self.unrated = labeler, tokenizer, {}, 0, 0

    @torch.no_grad()
    def __call__(self, ids, mask, n_response: int, posts) -> torch.Tensor:
        from minirlaif.generation import decode_summary
        from minirlaif.judges import rating_item

        responses = [decode_summary(self.tokenizer, t[m.bool()].tolist())
                     for t, m in zip(ids[:, -n_response:], mask[:, -n_response:])]
        ratings = self.rate([rating_item(p, r) for p, r in zip(posts, responses)])
        return torch.tensor([math.nan if r is None else r for r in ratings], device=ids.device)  # (B,)

    def rate(self, items: list[dict]) -> list[float | None]:
        """Ratings of {"id", ..., "summary"} items, each distinct one asked once."""
        from minirlaif.labelers import direct_scores

        keys = [(it["id"], it["summary"]) for it in items]
        todo = {k: it for k, it in zip(keys, items) if k not in self.cache}  # distinct and new, in order
        if todo:
            for k, r in zip(todo, direct_scores(self.labeler, list(todo.values()))):
                self.cache[k] = r
            self.calls += len(todo)
            self.unrated += sum(self.cache[k] is None for k in todo)
        return [self.cache[k] for k in keys]

    def reference(self, post: Post, query_ids: list[int], max_query_tokens: int, max_tokens: int,
                  task=None) -> float | None:
        """The reference summary's rating, for scale; for logging only, so neither cached nor counted in calls."""
        from minirlaif.judges import rating_item
        from minirlaif.labelers import direct_scores

        return direct_scores(self.labeler, [rating_item(post, post.summary)])[0]

    def state_dict(self) -> dict:
        return {"cache": [[i, s, r] for (i, s), r in self.cache.items()], "calls": self.calls,
                "unrated": self.unrated}

    def load_state_dict(self, state: dict) -> None:
        self.cache = {(i, s): r for i, s, r in state["cache"]}
        self.calls, self.unrated = state["calls"], state["unrated"]


@torch.no_grad()
def write_samples(run, update: int, batch: dict, posts, tokenizer, reward, cfg) -> None:
    """Append rank 0's first `cfg.n_samples` episodes of an RL batch to run.out_dir/samples.jsonl: query, response,
    score, and the reference summary's score under the same reward, for scale: to read how the policy changes over
    training. Every rank calls it: under --fsdp the RM's weights are gathered on every rank (run.gathered), for
    forwards on rank 0 alone."""
    from minirlaif.generation import decode_summary
    from minirlaif.utils import append_jsonl

    with run.gathered(getattr(reward, "model", None)):
        if not run.master:
            return
        rows, ref_scores = [], {}  # post id -> its reference's score (the k samples of a post: asked once)
        for i, post in enumerate(posts[: cfg.n_samples]):
            query = batch["query"][i][batch["query_mask"][i].bool()].tolist()
            response = batch["response"][i][batch["response_mask"][i].bool()].tolist()
            if post.summary is not None and post.id not in ref_scores:
                ref_scores[post.id] = reward.reference(post, query, cfg.max_query_tokens, cfg.response_length,
                                                       get_task(cfg.task))
            rows.append({"update": update, "id": post.id, "query": tokenizer.decode(query),
                         "response": decode_summary(tokenizer, response), "score": batch["scores"][i].item(),
                         "reference": post.summary, "reference_score": ref_scores.get(post.id)})
    append_jsonl(run.out_dir / "samples.jsonl", rows)
