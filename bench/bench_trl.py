"""Speed of TRL 0.13's PPOTrainer (the seed project's engine) on the tiny random models of make_models.py.

Run with the TRL venv (bash bench/setup_trl_venv.sh; python bench/make_models.py):
    bench/.venv-trl/bin/python bench/bench_trl.py [--warmup 3 --timed 5 --micro-batch 16 --threads 2] [--floor]

TRL's train() is one monolithic loop, so the time split is measured from outside, without touching TRL:
  * the helpers ppo_trainer.py calls by module-level name (batch_generation, forward, get_reward) and the
    trainer's accelerator.backward / optimizer.step are wrapped with timers;
  * a TrainerCallback stamps each update boundary (on_train_begin, on_step_end).
An update runs from one boundary to the next. Its rollout part ends at the first training forward
(forward() called with the policy+value wrapper); everything after that, up to on_step_end, is the PPO update.
Writes bench/_out/trl.json and prints one summary line. --floor then trains a fresh trainer for one more update with
the matrix products of its update part recorded (bench/gemm_floor.py, eager attention), times each alone, and adds
the floor and update_s / floor_s.
"""

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time
import types
import warnings
from collections import defaultdict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
EPISODES_PER_UPDATE = 64  # rollout batch = one PPO batch, single process


class Recorder:
    """Per-update phase timings, filled by the wrappers and the callback below."""

    def __init__(self):
        self.updates, self.phases, self.start, self.update_start = [], defaultdict(float), None, None
        self.cpu_start = None
        self.matmuls = None  # --floor: a gemm_floor.MatmulRecorder, on during each update part

    def wrap(self, fn, phase_of):
        def timed(*args, **kwargs):
            phase = phase_of(*args)
            if phase == "train_forward" and self.update_start is None:
                self.update_start = time.perf_counter()
                if self.matmuls is not None:
                    self.matmuls.on = True
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.phases[phase] += time.perf_counter() - t
        return timed

    def begin(self):
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def end_update(self):
        if self.matmuls is not None:
            self.matmuls.on = False
        now, cpu = time.perf_counter(), time.process_time()
        u = {"total_s": now - self.start, "rollout_s": self.update_start - self.start,
             "update_s": now - self.update_start, "process_cpu_s": cpu - self.cpu_start}
        u.update({k + "_s": v for k, v in sorted(self.phases.items())})
        self.updates.append(u)
        self.phases, self.start, self.update_start, self.cpu_start = defaultdict(float), now, None, cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=os.path.join(HERE, "_models"))
    ap.add_argument("--out", default=os.path.join(HERE, "_out", "trl.json"))
    ap.add_argument("--warmup", type=int, default=3, help="updates run first and not timed")
    ap.add_argument("--timed", type=int, default=5, help="updates timed")
    ap.add_argument("--micro-batch", type=int, default=16, help="per-device train (micro) batch; 64/micro = grad accum")
    ap.add_argument("--rollout-batch", type=int, default=64, help="local_rollout_forward_batch_size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true",
                    help="PPOConfig(bf16=True): accelerate's bf16 autocast (default fp32)")
    ap.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"],
                    help="attention of all four models (transformers' default for GPT-2 is sdpa)")
    ap.add_argument("--floor", action="store_true",
                    help="also measure the update's matrix-product floor (one more, recorded update; gemm_floor.py)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    import accelerate
    import datasets
    import tokenizers
    import transformers
    import trl
    import trl.trainer.ppo_trainer as ppo_mod
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import PPOConfig, PPOTrainer

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence")  # TRL's rewards[[rows, cols]] on torch 2.13
    m = lambda name: os.path.join(args.models, name)  # noqa: E731
    tok = AutoTokenizer.from_pretrained(m("tokenizer"))
    rec = Recorder()
    reward_models = []  # the current trainer's reward model (get_reward is also called with the value model)
    ppo_mod.batch_generation = rec.wrap(ppo_mod.batch_generation, lambda *a: "generate")
    ppo_mod.forward = rec.wrap(
        ppo_mod.forward,
        lambda model, *a: "train_forward" if isinstance(model, ppo_mod.PolicyAndValueWrapper) else "ref_forward")
    ppo_mod.get_reward = rec.wrap(
        ppo_mod.get_reward, lambda model, *a: "reward_forward" if model is reward_models[-1] else "value_forward")
    ppo_mod.gc = types.SimpleNamespace(collect=rec.wrap(gc.collect, lambda *a: "gc_collect"))  # TRL calls it twice

    class Boundaries(TrainerCallback):
        def on_train_begin(self, *a, **k):
            rec.begin()

        def on_step_end(self, *a, **k):
            rec.end_update()

    def make_trainer(n_updates, attn_implementation, out_name):
        """Four models with this attention and a PPOTrainer for n_updates updates of the benchmark's settings."""
        attn = dict(attn_implementation=attn_implementation)
        policy = AutoModelForCausalLM.from_pretrained(m("policy"), **attn)
        ref_policy = AutoModelForCausalLM.from_pretrained(m("policy"), **attn)
        value_model = AutoModelForSequenceClassification.from_pretrained(m("reward"), **attn)
        reward_model = AutoModelForSequenceClassification.from_pretrained(m("reward"), **attn)
        reward_models.append(reward_model)
        with open(m("prompts.jsonl")) as f:
            prompt_ids = [json.loads(line)["input_ids"] for line in f]
        train_ds = datasets.Dataset.from_dict({"input_ids": prompt_ids})
        settings = dict(
            episodes_per_update=EPISODES_PER_UPDATE, num_mini_batches=1, num_ppo_epochs=4,
            per_device_train_batch_size=args.micro_batch,
            gradient_accumulation_steps=EPISODES_PER_UPDATE // args.micro_batch,
            local_rollout_forward_batch_size=args.rollout_batch, response_length=53, temperature=0.7,
            stop_token="eos", missing_eos_penalty=1.0, kl_coef=0.05, gamma=1.0, lam=0.95, cliprange=0.2,
            cliprange_value=0.2, vf_coef=0.1, whiten_rewards=False, learning_rate=1e-5,
            total_episodes=EPISODES_PER_UPDATE * n_updates, num_sample_generations=0, seed=args.seed, bf16=args.bf16,
        )
        config = PPOConfig(
            output_dir=os.path.join(HERE, "_out", out_name), exp_name="bench_trl", report_to="none",
            save_strategy="no", eval_strategy="no", disable_tqdm=True, logging_strategy="no",
            **{k: v for k, v in settings.items() if k != "episodes_per_update"},
        )
        assert EPISODES_PER_UPDATE % args.micro_batch == 0
        trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref_policy,
                             reward_model=reward_model, value_model=value_model, train_dataset=train_ds,
                             eval_dataset=train_ds.select(range(EPISODES_PER_UPDATE)), callbacks=[Boundaries()])
        acc = trainer.accelerator
        acc.backward = rec.wrap(acc.backward, lambda *a: "backward")
        trainer.optimizer.step = rec.wrap(trainer.optimizer.step, lambda *a: "optimizer_step")
        return trainer, settings, attn

    n_updates = args.warmup + args.timed
    trainer, settings, attn = make_trainer(n_updates, args.attn_implementation, "trl_run")
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    assert len(rec.updates) == n_updates, len(rec.updates)

    timed = rec.updates[args.warmup:]
    mean = lambda key: sum(u.get(key, 0.0) for u in timed) / len(timed)  # noqa: E731
    keys = sorted({k for u in timed for k in u})
    breakdown = {k: round(mean(k), 4) for k in keys if k not in ("total_s", "rollout_s", "update_s", "process_cpu_s")}
    breakdown["rollout_other_s"] = round(mean("rollout_s") - sum(
        mean(k) for k in ("generate_s", "ref_forward_s", "value_forward_s", "reward_forward_s", "gc_collect_s")), 4)
    breakdown["update_other_s"] = round(mean("update_s") - sum(
        mean(k) for k in ("train_forward_s", "backward_s", "optimizer_step_s")), 4)
    s_per_update = mean("total_s")
    result = {
        "side": "trl",
        "episodes_per_s": round(EPISODES_PER_UPDATE / s_per_update, 3),
        "s_per_update": round(s_per_update, 4),
        "rollout_s": round(mean("rollout_s"), 4),
        "update_s": round(mean("update_s"), 4),
        "n_updates_timed": len(timed), "n_updates_warmup": args.warmup,
        "breakdown_s": breakdown,
        "per_update": [{k: round(v, 4) for k, v in u.items()} for u in rec.updates],
        "train_wall_s": round(wall, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "settings": {**settings, **attn},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "trl": trl.__version__,
                     "accelerate": accelerate.__version__, "datasets": datasets.__version__,
                     "tokenizers": tokenizers.__version__},
        # process CPU seconds per wall second well below the thread count, or a high load average,
        # means other processes competed for the cores and the numbers are pessimistic
        "process_cpu_per_wall": round(mean("process_cpu_s") / s_per_update, 2),
        "quiet_run": mean("process_cpu_s") / s_per_update >= 0.9 * min(args.threads, len(os.sched_getaffinity(0))),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine(),
                    "loadavg_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)]},
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    if args.floor:
        # a fresh trainer for one update, eager attention (SDPA's fused CPU kernel would hide the attention's
        # products in one op); the recorder is on from the update part's first training forward to on_step_end
        sys.path.insert(0, HERE)
        from gemm_floor import MatmulRecorder

        trainer, _, _ = make_trainer(1, "eager", "trl_floor_run")
        rec.updates, rec.matmuls = [], MatmulRecorder()
        with rec.matmuls:
            trainer.train()
        floor = rec.matmuls.floor(threads=args.threads)
        result["floor"] = floor
        result["update_over_floor"] = round(result["update_s"] / floor["floor_s"], 2)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"trl {trl.__version__} ({'bf16' if args.bf16 else 'fp32'}, {args.attn_implementation}): "
          f"{result['episodes_per_s']:.2f} episodes/s, {s_per_update:.2f} s/update "
          f"(rollout {result['rollout_s']:.2f} s + update {result['update_s']:.2f} s) over {len(timed)} timed "
          f"updates after {args.warmup} warm-up; {args.threads} threads -> {args.out}")
    if args.floor:
        f = result["floor"]
        print(f"update's matrix products: {f['gflop']} GFLOP, floor {f['floor_s']:.3f} s at {f['gflop_per_s']} "
              f"GFLOP/s ({f['threads']} threads); update / floor = {result['update_over_floor']}")
    if not result["quiet_run"]:
        print(f"WARNING: process CPU/wall {result['process_cpu_per_wall']} < 0.9 x threads: other processes "
              "competed for the cores; these numbers are not valid for comparison")


if __name__ == "__main__":
    main()
