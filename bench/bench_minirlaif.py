"""Speed of minirlaif's train_ppo.py on the tiny random models of make_models.py (the other side of bench_trl.py).

    python bench/make_models.py                      # once (either venv)
    python bench/bench_minirlaif.py [--warmup 3 --timed 5 --threads 2] [--bf16] [--attn eager] [--floor]

It runs the real `train_ppo.main` with the benchmark's settings (64 episodes per update, 1 mini-batch, 4 epochs,
micro-batches of 16, 53-token responses at temperature 0.7, lr 1e-5). Two things are swapped in, and nothing
else: the query list comes from bench/_models/prompts.jsonl as token ids (the prompts are 80 random pseudo-words,
not TL;DR posts, so train_ppo's data loader is bypassed), and the sft/rm directories are assembled from the
benchmark's policy, reward model and tokenizer by symlinks. train_ppo logs time/rollout_s and time/update_s for
every update; the timed updates' means go to bench/_out/minirlaif.json, with the generation share of the rollout
measured by wrapping the sampler. --floor then runs one more update (a fresh 1-update run) with its matrix products
recorded (bench/gemm_floor.py), times each alone, and adds the floor and update_s / floor_s to the JSON.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import train_ppo  # noqa: E402
from minirlaif import generation  # noqa: E402
from minirlaif.data import LoadStats, Post  # noqa: E402
from minirlaif.config import parse_config  # noqa: E402
from minirlaif.run import package_versions  # noqa: E402
from gemm_floor import MatmulRecorder  # noqa: E402  (bench/ is on sys.path when this file runs)


def assemble(models: Path, work: Path) -> tuple[Path, Path]:
    """sft/ = policy weights + tokenizer, rm/ = reward weights + tokenizer (symlinks, nothing copied)."""
    for name, src in (("sft", "policy"), ("rm", "reward")):
        (work / name).mkdir()
        for d in (models / src, models / "tokenizer"):
            for f in d.iterdir():
                (work / name / f.name).symlink_to(f.resolve())
    return work / "sft", work / "rm"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=str(HERE / "_models"))
    ap.add_argument("--out", default=str(HERE / "_out" / "minirlaif.json"))
    ap.add_argument("--warmup", type=int, default=3, help="updates run first and not timed")
    ap.add_argument("--timed", type=int, default=5, help="updates timed")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (train_ppo --bf16); default fp32")
    ap.add_argument("--attn", default="auto", choices=["auto", "sdpa", "eager"],
                    help="attention of every model; auto: train_ppo's choice (sdpa, eager under CPU bf16)")
    ap.add_argument("--floor", action="store_true",
                    help="also measure the update's matrix-product floor (one more, recorded update; gemm_floor.py)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = Path(args.models)
    prompts = [json.loads(line) for line in (models / "prompts.jsonl").read_text().splitlines()]
    posts = [Post(id=str(i), subreddit="", title="", post=p["text"]) for i, p in enumerate(prompts)]
    ids = {p["text"]: p["input_ids"] for p in prompts}
    # the two swaps described above: queries are the benchmark's token ids
    train_ppo.load_posts = lambda *a, **k: (posts, LoadStats())
    train_ppo.build_query = lambda tok, post, max_tokens: (post.post, ids[post.post], False)
    gen_time = [0.0]
    sampler = generation.generate  # what the hf rollout engine calls

    def timed_generate(*a, **k):
        t = time.perf_counter()
        try:
            return sampler(*a, **k)
        finally:
            gen_time[0] += time.perf_counter() - t

    generation.generate = timed_generate

    def force_attention(name: str):  # every model train_ppo loads gets this attention instead of set_attention's pick
        train_ppo.set_attention = lambda model, device, bf16: model.set_attn_implementation(name) or model

    if args.attn != "auto":
        force_attention(args.attn)

    work = Path(tempfile.mkdtemp())
    sft, rm = assemble(models, work)
    n_updates = args.warmup + args.timed

    def config(n: int, out: str):
        return parse_config(train_ppo.Config, train_ppo.PRESETS, [
            "--task-dir", "", "--sft-path", str(sft), "--rm-path", str(rm), "--dataset", "bench", "--out-dir",
            str(work / out), "--total-episodes", str(64 * n), "--batch-size", "64", "--mini-batches", "1",
            "--micro-batch-size", str(args.micro_batch), "--ppo-epochs", "4", "--response-length", "53",
            "--temperature", "0.7", "--kl-coef", "0.05", "--lr", "1e-5", "--missing-eos-penalty", "1.0",
            "--sample-every", "1000000", "--checkpoint-every", "1000000", "--max-query-tokens", "80",
            "--bf16" if args.bf16 else "--no-bf16"])

    cfg = config(n_updates, "ppo")
    wall0, cpu0 = time.perf_counter(), time.process_time()
    train_ppo.main(cfg)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    rows = [json.loads(line) for line in (work / "ppo" / "metrics.jsonl").read_text().splitlines()]
    timed = rows[args.warmup:]
    mean = lambda k: sum(r[k] for r in timed) / len(timed)  # noqa: E731
    s_per_update = mean("time/rollout_s") + mean("time/update_s")
    result = {
        "side": "minirlaif", "episodes_per_s": round(64 / s_per_update, 3), "s_per_update": round(s_per_update, 4),
        "rollout_s": round(mean("time/rollout_s"), 4), "update_s": round(mean("time/update_s"), 4),
        "generate_s_all_updates_mean": round(gen_time[0] / len(rows), 4),
        "n_updates_timed": len(timed), "n_updates_warmup": args.warmup,
        "mean_response_len": mean("rollout/response_len"),
        "process_cpu_per_wall_whole_run": round(cpu / wall, 2),
        "quiet_run": cpu / wall >= 0.9 * min(args.threads, len(os.sched_getaffinity(0))),
        "per_update": [{k: r[k] for k in ("step", "time/rollout_s", "time/update_s", "eps")} for r in rows],
        "settings": {"episodes_per_update": 64, "mini_batches": 1, "ppo_epochs": 4, "micro_batch": args.micro_batch,
                     "response_length": 53, "prompt_len": len(prompts[0]["input_ids"]), "temperature": 0.7,
                     "threads": args.threads, "bf16": args.bf16, "loadavg_1m_after": round(os.getloadavg()[0], 2)},
        "versions": {**package_versions(), "platform": platform.platform()},
    }
    if args.floor:
        # a fresh 1-update run, its update's matrix products recorded: the recorder goes on when the rollout
        # returns (the update follows) and stays on to the end (saving and logging do no products)
        rollout = train_ppo.rollout

        def rollout_then_record(*a, **k):
            out = rollout(*a, **k)
            rec.on = True
            return out

        train_ppo.rollout = rollout_then_record
        # eager attention in this run: SDPA's fused CPU kernel would hide the attention's products in one op
        force_attention("eager")
        with MatmulRecorder() as rec:
            train_ppo.main(config(1, "ppo_floor"))
            rec.on = False
        floor = rec.floor(threads=args.threads)
        floor["mean_response_len"] = json.loads((work / "ppo_floor" / "metrics.jsonl").read_text())[
            "rollout/response_len"]
        result["floor"] = floor
        result["update_over_floor"] = round(result["update_s"] / floor["floor_s"], 2)
    result["settings"]["attn"] = args.attn
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"minirlaif ({'bf16' if args.bf16 else 'fp32'}): {result['episodes_per_s']} episodes/s, "
          f"{s_per_update:.3f} s/update "
          f"(rollout {result['rollout_s']:.3f} s, update {result['update_s']:.3f} s); quiet={result['quiet_run']}")
    if args.floor:
        f = result["floor"]
        print(f"update's matrix products: {f['gflop']} GFLOP, floor {f['floor_s']:.3f} s at {f['gflop_per_s']} "
              f"GFLOP/s ({f['threads']} threads); update / floor = {result['update_over_floor']}")


if __name__ == "__main__":
    main()
