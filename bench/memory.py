"""Per-GPU memory of PPO's four models (policy, reference, value, reward), computed on paper: docs/memory.md.

    python bench/memory.py            # prints the Markdown tables (a few seconds; no GPU, no hub, no weights)

The parameters are counted from real transformers models built on the meta device (shapes only, no memory) from
configs written here: SmolLM2-135M (also measured on CPU: docs/memory.md), gpt2-large, and a Qwen2-1.5B-shaped
model. The LoRA rows count the adapters of minirlaif.lora.add_lora applied to those meta models (rank 16, every
linear layer of the blocks). Bytes per GPU:

  * a trained parameter: fp32 weight (4 bytes) + fp32 gradient (4) + AdamW's two fp32 states (8) = 16 bytes;
  * a frozen parameter: its fp32 weight (4 bytes);
  * DDP: every GPU holds everything; FSDP2: each parameter, its gradient and its Adam states are split on dim 0
    over the N GPUs, each rank holding ceil(rows / N) rows (FSDP2 pads dim 0 to a multiple of N); the frozen
    models are sharded the same way;
  * LoRA: the reference is the policy's backbone with its adapters off (no copy of its own), the value model is an
    adapter and a trained score head on its own frozen backbone (a copy of the reward model's).
Not counted: activations, the bf16 copies autocast makes of weights on the fly, FSDP2's all-gathered layer during
its forward / backward, DDP buckets, the CUDA context and the allocator's slack.
"""

import copy
import math
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config, LlamaConfig, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minirlaif.lora import add_lora, parameter_counts  # noqa: E402

RANK, ALPHA = 16, 32
GPUS = [1, 2, 8]
SETUPS = ["DDP", "DDP + LoRA", "FSDP2", "FSDP2 + LoRA"]
GIB = 2**30

CONFIGS = {
    # SmolLM2-135M(-Instruct)'s config.json (runs/models/smollm2-135m-instruct): the model the CPU measurements ran
    "SmolLM2-135M": LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                                tie_word_embeddings=True),
    # gpt2-large's config.json: 36 layers, 1280 wide, 20 heads, 1024 positions, GPT-2's vocabulary; tied embeddings
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20, n_positions=1024, vocab_size=50257),
    # Qwen2-1.5B's shape: q/k/v with biases (as Qwen2 has), tied embeddings
    "Qwen2-1.5B-shaped": Qwen2Config(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                     num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                                     tie_word_embeddings=True),
}


def meta_models(config, lora: bool):
    """(policy, value, reward) on the meta device; with lora the policy and value have adapters (and the value
    model a trained head), the reward model is frozen either way."""
    scalar = copy.deepcopy(config)
    scalar.num_labels = 1
    with torch.device("meta"):
        policy = AutoModelForCausalLM.from_config(config)
        value = AutoModelForSequenceClassification.from_config(scalar)
        reward = AutoModelForSequenceClassification.from_config(scalar).requires_grad_(False)
    if lora:
        add_lora(policy, RANK, ALPHA)
        add_lora(value, RANK, ALPHA, trained=["score"])
    return policy, value, reward


def per_gpu(params, gpus: int) -> int:
    """Elements one GPU holds of `params` split on dim 0 over `gpus` (ceil(rows / gpus) rows each; 1: all)."""
    return sum(math.ceil(p.shape[0] / gpus) * math.prod(p.shape[1:]) for p in params)


def row(models, lora: bool, gpus: int) -> list[float]:
    """Bytes per GPU: policy weights, gradients, Adam; value weights, gradients, Adam; reference; reward; total."""
    policy, value, reward = models
    out = []
    for model in (policy, value):
        params = list(model.parameters())  # unique: a tied embedding counts once
        trained = [p for p in params if p.requires_grad]
        out += [4 * per_gpu(params, gpus), 4 * per_gpu(trained, gpus), 8 * per_gpu(trained, gpus)]
    out.append(0 if lora else 4 * per_gpu(policy.parameters(), gpus))  # the reference: a copy of the SFT policy
    out.append(4 * per_gpu(reward.parameters(), gpus))
    return [*out, sum(out)]


def table(name: str, config) -> str:
    plain, adapted = meta_models(config, lora=False), meta_models(config, lora=True)
    policy_total = parameter_counts(plain[0])[1]
    value_total = parameter_counts(plain[1])[1]
    policy_lora, value_lora = parameter_counts(adapted[0])[0], parameter_counts(adapted[1])[0]
    lines = [f"### {name}", "",
             f"policy {policy_total:,} parameters; value / reward model {value_total:,} (backbone + score head); "
             f"LoRA rank {RANK} on every linear layer of the blocks: {policy_lora:,} trainable in the policy, "
             f"{value_lora:,} in the value model (adapters + score head).", "",
             "| setup | GPUs | policy weights | policy grads | policy Adam | value weights | value grads | value Adam "
             "| reference weights | reward weights | total |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for setup in SETUPS:
        lora = setup.endswith("LoRA")
        for gpus in GPUS:
            cells = row(adapted if lora else plain, lora, gpus if setup.startswith("FSDP2") else 1)
            lines.append(f"| {setup} | {gpus} | " + " | ".join(f"{b / GIB:.3f}" for b in cells) + " |")
    return "\n".join(lines)


def main():
    print("Per-GPU GiB (2^30 bytes); fp32 weights, gradients and AdamW states; activations not counted.\n")
    print("\n\n".join(table(name, config) for name, config in CONFIGS.items()))


if __name__ == "__main__":
    main()
