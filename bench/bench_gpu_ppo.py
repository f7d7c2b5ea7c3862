"""GPU benchmark: train_ppo.py's gpt2-large preset on random weights of GPT-2-Large's shape, on one GPU.

No hub is needed: the policy and reward model are random GPT-2-Large-shaped networks (36 layers, width 1280,
vocabulary 50258 = GPT-2's plus [PAD]), the queries come from the synthetic task with long posts (about 500
tokens, like TL;DR queries cut at 512), and the tokenizer is a small BPE trained here (the model's vocabulary is
larger than the tokenizer's; that only matters for decoding, which the benchmark does not do).

  python bench/bench_gpu_ppo.py --updates 3 --out bench/_out/gpu.json
  python bench/bench_gpu_ppo.py --updates 3 --extra "--rollout-backend vllm" --out bench/_out/gpu_vllm.json

(The vllm line needs vLLM in the venv. It was smoke-tested on CPU with --small in the vLLM CPU venv on 2026-12-02;
it has not run on a GPU.)
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_ppo  # noqa: E402
from minirlaif import synthetic  # noqa: E402
from minirlaif.data import load_posts  # noqa: E402
from minirlaif.models import train_bpe_tokenizer  # noqa: E402
from minirlaif.config import parse_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--updates", type=int, default=3)
    ap.add_argument("--episodes-per-update", type=int, default=128)
    ap.add_argument("--out", default="bench/_out/gpu.json")
    ap.add_argument("--small", action="store_true", help="a 2-layer model instead, for a CPU smoke test")
    ap.add_argument("--extra", default="", help="more train_ppo.py flags, as one string")
    args = ap.parse_args()
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    work = Path(tempfile.mkdtemp())
    t0 = time.time()
    task = synthetic.TaskConfig(n_train=1024, n_validation=8, n_test=8, n_comparison_posts_train=2,
                                n_comparison_posts_validation=2, min_distractors=30, max_distractors=40)
    synthetic.write_task(work / "data", task)
    posts, _ = load_posts(work / "data" / "sft", "train")
    tok = train_bpe_tokenizer([p.post for p in posts[:512]], vocab_size=1024)
    shape = dict(n_embd=64, n_layer=2, n_head=2) if args.small else dict(n_embd=1280, n_layer=36, n_head=20)
    cfg = GPT2Config(vocab_size=50258, n_positions=1024, **shape,
                     eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(work / "sft")
    tok.save_pretrained(work / "sft")
    cfg.num_labels = 1
    GPT2ForSequenceClassification(cfg).save_pretrained(work / "rm")
    setup_s = time.time() - t0

    flags = ["--preset", "gpt2-large", "--task-dir", "", "--dataset", str(work / "data" / "sft"),
             "--sft-path", str(work / "sft"), "--rm-path", str(work / "rm"), "--out-dir", str(work / "ppo"),
             "--total-episodes", str(args.episodes_per_update * args.updates), "--sample-every", "1000000",
             "--checkpoint-every", "1000000",
             "--batch-size", str(args.episodes_per_update), *args.extra.split()]
    ppo_cfg = parse_config(train_ppo.Config, train_ppo.PRESETS, flags)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    train_ppo.main(ppo_cfg)
    total_s = time.time() - t0
    rows = [json.loads(line) for line in (work / "ppo" / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows  # the first update includes CUDA warm-up
    mean = lambda k: sum(r[k] for r in timed) / len(timed)  # noqa: E731
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "shape": shape,
        "extra": args.extra, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "updates": len(rows), "timed_updates": len(timed),
        "episodes_per_update": ppo_cfg.batch_size, "response_length": ppo_cfg.response_length,
        "max_query_tokens": ppo_cfg.max_query_tokens, "micro_batch_size": ppo_cfg.micro_batch_size,
        "ppo_epochs": ppo_cfg.ppo_epochs, "eps": mean("eps"), "rollout_s": mean("time/rollout_s"),
        "update_s": mean("time/update_s"), "peak_mem_gb": max(r.get("mem/peak_gb", 0) for r in rows),
        "mean_response_len": mean("rollout/response_len"), "setup_s": setup_s, "train_ppo_total_s": total_s,
        "per_update": [{k: r[k] for k in ("step", "eps", "time/rollout_s", "time/update_s")} for r in rows],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
