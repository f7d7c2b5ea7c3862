"""LoRA, written by hand: a frozen linear layer plus a trainable low-rank update (Hu et al. 2021, arXiv 2106.09685).

    y = W x + b + (alpha / r) * B A dropout(x)        A: (r, in), B: (out, r), W and b frozen

B starts at zero, so a model with adapters computes exactly what its base computes until the first step. How the
stages use it:
  * SFT: `add_lora(policy, ...)`; only the adapters train.
  * Reward model: `add_lora(rm, ..., trained=["score"])`: adapters on the backbone plus a fully trained score head.
  * PPO: the policy's adapters train; the reference policy is the same model inside `adapters_off(policy)`, so there
    is no second copy of the policy. The value model has adapters on its own backbone (and a trained head).

Outputs load where users load them, with no code of ours:
  * merged: `model.save_pretrained(path, state_dict=merged_state_dict(model))` writes the base model's own keys with
    W + (alpha / r) B A folded in, which plain transformers and vLLM load; `merge_lora(model)` does the same fold in
    place and hands back the plain transformers model.
  * the adapter: `save_adapter(model, path, base)` writes PEFT's adapter_config.json and adapter_model.safetensors,
    which `peft.PeftModel.from_pretrained(base_model, path)` loads (checked against peft 0.21 in tests/test_lora.py).

Initialisation follows PEFT's default (init_lora_weights=True): A kaiming-uniform with a = sqrt(5), i.e.
U(-1/sqrt(in), 1/sqrt(in)), and B = 0; A is drawn from a generator seeded by the caller, so that every torchrun
rank, whatever its global seed, builds the same adapters.
"""

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D


class LoRALayer(nn.Module):
    """y = base(x) + (alpha / r) * B(A(dropout(x))), with `base` frozen; `enabled = False` gives base(x) exactly.

    base: a torch nn.Linear (weight (out, in): Llama, Qwen2, SmolLM2) or transformers' GPT-2 Conv1D (weight
    (in, out), which PEFT calls fan_in_fan_out). A and B have the same shapes for both, (r, in) and (out, r):
    only the merged update is transposed for Conv1D. A is drawn on the CPU from `generator`, so the draw does not
    depend on the device, then moved to the base weight's device and dtype.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.fan_in_fan_out = isinstance(base, Conv1D)
        weight = base.weight
        in_features, out_features = weight.shape if self.fan_in_fan_out else weight.shape[::-1]
        a = torch.empty(rank, in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # PEFT's init of lora_A
        self.lora_A = nn.Parameter(a.to(weight.device, weight.dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=weight.device, dtype=weight.dtype))
        # no dropout module at all when p = 0: nn.Dropout(0) would still copy x in every adapted layer in training
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = alpha / rank
        self.enabled = True

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y  # the base layer's own output, bit for bit: the PPO reference policy
        return y + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., out)

    @torch.no_grad()
    def merged_weight(self, weight=None, lora_A=None, lora_B=None) -> torch.Tensor:
        """W + (alpha / r) B A, in the base weight's layout ((in, out) for Conv1D) and dtype; summed in fp32.
        The three tensors default to this layer's own (merged_state_dict passes gathered copies under FSDP)."""
        weight = self.base.weight if weight is None else weight
        lora_A = self.lora_A if lora_A is None else lora_A
        lora_B = self.lora_B if lora_B is None else lora_B
        delta = self.scale * (lora_B.float() @ lora_A.float())  # (out, in)
        if self.fan_in_fan_out:
            delta = delta.T  # (in, out)
        return (weight.float() + delta).to(weight.dtype)


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    """Every adapted layer with its module name (the base model's name for it, e.g. transformer.h.0.attn.c_attn)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALayer)]


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a target_modules entry: the whole module name, or its end after a dot."""
    return name == target or name.endswith(f".{target}")


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, targets="all-linear",
             trained: list[str] = (), seed: int = 0) -> nn.Module:
    """Wrap the target layers of a transformers model in LoRALayers and freeze everything else; returns the model.

    targets: "all-linear" (every nn.Linear / Conv1D inside the backbone `model.base_model`, so never the LM head
        or a score head, which sit outside it), or module-name suffixes, a list or a comma-separated string (the
        --lora-targets flag) such as "c_attn,c_proj,c_fc" or "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,
        down_proj", matched as PEFT matches them (the name, or its end after a dot), among the backbone's linear
        layers. A suffix that matches none raises ValueError.
    trained: modules (by name, e.g. ["score"]) that stay fully trainable: the reward / value model's head. They
        are PEFT's `modules_to_save` in the saved adapter.
    seed: seeds the generator every A is drawn from, in module order: the same seed gives the same adapters on
        every rank and every device.
    The settings PEFT's adapter_config.json needs are kept in `model.lora_config` for `save_adapter`.
    """
    assert not lora_layers(model), "the model already has adapters"
    if isinstance(targets, str) and targets != "all-linear":
        targets = targets.split(",")
    prefix = model.base_model_prefix  # "transformer" (GPT-2), "model" (Llama, Qwen2)
    linear = [(name, m) for name, m in model.base_model.named_modules(prefix=prefix)
              if isinstance(m, (nn.Linear, Conv1D))]
    if targets == "all-linear":
        chosen = linear
    else:
        unmatched = [t for t in targets if not any(_matches(name, t) for name, _ in linear)]
        if unmatched:
            raise ValueError(f"LoRA targets {unmatched} match no linear layer of the backbone "
                             f"(its linear layers end with {sorted({name.rsplit('.', 1)[-1] for name, _ in linear})})")
        chosen = [(name, m) for name, m in linear if any(_matches(name, t) for t in targets)]
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name, module in chosen:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALayer(module, rank, alpha, dropout, generator))
    for name in trained:
        model.get_submodule(name).requires_grad_(True)
    model.lora_config = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
                         "target_modules": sorted(name for name, _ in chosen), "modules_to_save": list(trained) or None}
    return model


@contextmanager
def adapters_off(model: nn.Module):
    """Inside this block every adapter is off and the model computes its base model's outputs exactly.

    The PPO reference policy: `with torch.no_grad(), adapters_off(policy): ref_logits = ...`. Only the adapters
    are switched off; modules trained in full (`trained` of add_lora) keep their trained weights.
    """
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


@torch.no_grad()
def merged_state_dict(model: nn.Module, state: dict | None = None) -> dict[str, torch.Tensor]:
    """The base model's own state dict with every adapter folded in: `name.weight` = W + (alpha / r) B A.

    For `model.save_pretrained(path, state_dict=merged_state_dict(model))`: the checkpoint has exactly the keys of
    the model before add_lora, so transformers and vLLM load it with no adapter code. The model is not changed.
    `state`: the model's state dict taken elsewhere (an FSDP model's, gathered: minirlaif.run.plain_state_dict);
    default model.state_dict().
    """
    layers = dict(lora_layers(model))
    state = model.state_dict() if state is None else state
    merged = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module in layers:  # lora_A, lora_B: folded into the weight below
            continue
        owner = module.removesuffix(".base")
        if owner != module and owner in layers:  # name.base.weight -> name.weight, name.base.bias -> name.bias
            key = f"{owner}.{param}"
            if param == "weight":
                value = layers[owner].merged_weight(value, state[f"{owner}.lora_A"], state[f"{owner}.lora_B"])
        merged[key] = value
    return merged


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and put the base layer back, in place: a plain transformers model.

    Parameters keep their requires_grad (the backbone stays frozen); meant for the end of training.
    """
    for name, layer in lora_layers(model):
        layer.base.weight.copy_(layer.merged_weight())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)
    del model.lora_config
    return model


def save_adapter(model: nn.Module, path, base_model_name_or_path: str, state: dict | None = None) -> None:
    """Write the adapters in PEFT's format: `path`/adapter_config.json and `path`/adapter_model.safetensors.

    PEFT's file format (peft 0.21's LoraModel.save_pretrained, checked by loading it in tests/test_lora.py):
      * tensors named "base_model.model." + the base model's module name + ".lora_A.weight" (r, in) and
        ".lora_B.weight" (out, r), the same shapes for Linear and Conv1D; each module in modules_to_save as
        "base_model.model." + its name + "." + its own state-dict key (e.g. base_model.model.score.weight);
        safetensors metadata {"format": "pt"};
      * the config: peft_type LORA, task_type CAUSAL_LM (a *ForCausalLM) or SEQ_CLS (a *ForSequenceClassification),
        r, lora_alpha, lora_dropout, target_modules (here the full names of the adapted layers, as PEFT itself
        writes "all-linear"), fan_in_fan_out (true for GPT-2's Conv1D), bias "none", modules_to_save,
        base_model_name_or_path. PEFT fills every other field with its default (use_rslora false: scale alpha / r).
    `state`: the model's state dict taken elsewhere (gathered from FSDP shards); default model.state_dict().
    """
    path = Path(path)
    state = model.state_dict() if state is None else state
    path.mkdir(parents=True, exist_ok=True)
    layers = lora_layers(model)
    tensors = {}
    for name, _ in layers:
        for ab in ("lora_A", "lora_B"):
            tensors[f"base_model.model.{name}.{ab}.weight"] = state[f"{name}.{ab}"].detach().contiguous()
    for module in model.lora_config["modules_to_save"] or []:
        for key in model.get_submodule(module).state_dict():
            tensors[f"base_model.model.{module}.{key}"] = state[f"{module}.{key}"].detach().contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    task = "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"
    config = {"peft_type": "LORA", "task_type": task, **model.lora_config,
              "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in layers), "bias": "none",
              "base_model_name_or_path": str(base_model_name_or_path), "inference_mode": True}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameters; a tied weight (GPT-2's wte = lm_head) counts once."""
    params = list(model.parameters())  # unique tensors
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
