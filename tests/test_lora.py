"""LoRA (minirlaif/lora.py) on tiny random GPT-2 (Conv1D layers, weight (in, out)) and Llama (nn.Linear) models.

At init a LoRA model is its base model exactly; after Adam steps each adapted layer computes W + (alpha / r) B A
(read off the layer by feeding it the identity matrix) and the base weights are untouched; with adapters off the
log-probs are the base model's bit for bit; the merged checkpoint loads in plain transformers; `peft` loads the
saved adapter (a causal LM, and a reward model with a fully trained score head) and gives the merged checkpoint's
outputs. The `peft` tests need the dev extra (peft); without it they are skipped with the reason, except under CI
(CI=true), where a missing peft fails them. All offline: the configs are built here.
"""

import copy
import importlib.util
import json
import os

import pytest
import torch
from torch import nn
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM)

from minirlaif.lora import (LoRALayer, adapters_off, add_lora, lora_layers, merge_lora, merged_state_dict,
                            parameter_counts, save_adapter)
from minirlaif.losses import logprobs_from_logits
from minirlaif.models import load_scalar_model, response_logits, sequence_rewards
from minirlaif.utils import autocast

VOCAB, PAD, RESPONSE = 64, 1, 5
RANK, ALPHA = 4, 8.0  # scale alpha / r = 2, so a forgotten scale shows
ARCHS = ["gpt2", "llama"]
TARGETS = {"gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
           "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                     "mlp.up_proj", "mlp.down_proj"]}

PEFT_MISSING = importlib.util.find_spec("peft") is None
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PEFT_HINT = "pip install -e '.[dev]' (peft)"
needs_peft = pytest.mark.skipif(PEFT_MISSING and not IN_CI, reason=f"the peft tests need peft: {PEFT_HINT}")


@pytest.fixture
def peft():
    if PEFT_MISSING:
        pytest.fail(f"CI runs the peft tests, but peft is not installed: {PEFT_HINT}")
    import peft

    return peft


def causal_lm(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=PAD)
    if arch == "gpt2":  # tied embeddings, Conv1D
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        **ids)).eval()


def batch():
    """Query + response ids (3, 12), the first row left-padded by 2 (as rollouts are); no PAD inside."""
    ids = torch.randint(2, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = PAD, 0
    return ids, mask


def response_logprobs(model, ids, mask):
    return logprobs_from_logits(response_logits(model, ids, mask, RESPONSE), ids[:, -RESPONSE:])  # (B, R)


def train(model, loss_fn, steps: int = 2):
    """Adam on *every* parameter (frozen ones included: only requires_grad keeps them still). Step 1 moves B
    (A gets no gradient while B = 0), step 2 moves A too."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()
    return model


def sft_loss(model):
    return -response_logprobs(model, *batch()).mean()


def effective_weight(layer: nn.Module, in_features: int) -> torch.Tensor:
    """The affine map a layer computes, read off its outputs: row i = layer(e_i) - layer(0). (in, out)"""
    with torch.no_grad():
        return layer(torch.eye(in_features)) - layer(torch.zeros(1, in_features))


@pytest.mark.parametrize("arch", ARCHS)
def test_init_is_the_base_model_and_all_linear_means_the_blocks(arch):
    base = causal_lm(arch)
    model = add_lora(copy.deepcopy(base), rank=RANK, alpha=ALPHA, seed=0)
    ids, mask = batch()
    assert torch.equal(response_logprobs(model, ids, mask), response_logprobs(base, ids, mask))
    names = [name for name, _ in lora_layers(model)]
    prefix = "transformer.h" if arch == "gpt2" else "model.layers"
    assert names == [f"{prefix}.{i}.{t}" for i in range(2) for t in TARGETS[arch]]  # every block's linears, no lm_head
    layers = [layer for _, layer in lora_layers(model)]
    assert all(torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B)) for layer in layers)
    for layer in layers:  # PEFT's kaiming-uniform(a = sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)), std 1/sqrt(3 in)
        bound = layer.lora_A.shape[1] ** -0.5
        assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    a = torch.cat([layer.lora_A.flatten() * layer.lora_A.shape[1] ** 0.5 for layer in layers])  # U(-1, 1)
    assert abs(a.std().item() - 3**-0.5) < 0.05
    dims = [(lay.base.weight.shape if lay.fan_in_fan_out else lay.base.weight.shape[::-1]) for lay in layers]
    trainable, total = parameter_counts(model)
    assert trainable == sum(RANK * (i + o) for i, o in dims)
    assert total == parameter_counts(base)[1] + trainable
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.lora_{m}" for n in names for m in "AB"}


def test_targets_by_suffix_and_unknown_targets():
    model = add_lora(causal_lm("llama"), rank=RANK, alpha=ALPHA, targets=["q_proj", "v_proj"])
    assert [n for n, _ in lora_layers(model)] == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2)
                                                  for p in "qv"]
    assert [n for n, _ in lora_layers(add_lora(causal_lm("llama"), RANK, ALPHA, targets="q_proj,v_proj"))] == [
        n for n, _ in lora_layers(model)]  # the --lora-targets string
    with pytest.raises(AssertionError, match="already has adapters"):
        add_lora(model, rank=RANK, alpha=ALPHA)
    gpt2 = add_lora(causal_lm("gpt2"), rank=RANK, alpha=ALPHA, targets=["c_proj"])  # attn.c_proj and mlp.c_proj
    assert [n for n, _ in lora_layers(gpt2)] == [f"transformer.h.{i}.{m}.c_proj" for i in range(2)
                                                 for m in ("attn", "mlp")]
    with pytest.raises(ValueError, match=r"\['qproj'\] match no linear layer"):
        add_lora(causal_lm("llama"), rank=RANK, alpha=ALPHA, targets=["q_proj", "qproj"])
    with pytest.raises(ValueError, match="match no linear layer"):  # the LM head is never a target
        add_lora(causal_lm("llama"), rank=RANK, alpha=ALPHA, targets=["lm_head"])


@pytest.mark.parametrize("arch", ARCHS)
def test_a_step_gives_w_plus_scaled_ba_and_leaves_the_base_alone(arch):
    model = add_lora(causal_lm(arch), rank=RANK, alpha=ALPHA, seed=0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    a_init = {n: layer.lora_A.detach().clone() for n, layer in lora_layers(model)}
    train(model, sft_loss)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    for name, layer in lora_layers(model):
        A, B, W = layer.lora_A.detach(), layer.lora_B.detach(), layer.base.weight.detach()
        assert not torch.equal(A, a_init[name]) and B.abs().min() > 0  # both factors moved
        by_hand = W + (ALPHA / RANK) * (B @ A).T if arch == "gpt2" else (W + (ALPHA / RANK) * B @ A).T  # (in, out)
        assert (effective_weight(layer, A.shape[1]) - by_hand).abs().max() < 1e-6
        assert (layer.merged_weight() - (by_hand if arch == "gpt2" else by_hand.T)).abs().max() < 1e-6
        assert (B @ A).abs().max() > 1e-3  # the update is far above the tolerance


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_adapters_off_is_the_reference_model_exactly(arch, bf16):
    base = causal_lm(arch)
    model = train(add_lora(copy.deepcopy(base), rank=RANK, alpha=ALPHA), sft_loss)
    ids, mask = batch()
    with torch.no_grad(), autocast("cpu", bf16):
        ref = response_logprobs(base, ids, mask)
        on = response_logprobs(model, ids, mask)
        with adapters_off(model):
            off = response_logprobs(model, ids, mask)
        on_again = response_logprobs(model, ids, mask)
    assert torch.equal(off, ref)  # bit for bit
    assert (on - ref).abs().max() > 1e-2  # the trained adapter matters
    assert torch.equal(on_again, on)  # and is back on after the block


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_checkpoint_loads_in_plain_transformers(arch, tmp_path):
    model = train(add_lora(causal_lm(arch), rank=RANK, alpha=ALPHA), sft_loss)
    ids, mask = batch()
    with torch.no_grad():
        logits = response_logits(model, ids, mask, RESPONSE)
    model.save_pretrained(tmp_path / "merged", state_dict=merged_state_dict(model))
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    merged = merge_lora(copy.deepcopy(model))
    assert not any(isinstance(m, LoRALayer) for m in merged.modules())
    assert set(merged.state_dict()) == set(causal_lm(arch).state_dict())
    with torch.no_grad():
        assert (response_logits(plain, ids, mask, RESPONSE) - logits).abs().max() < 1e-5
        assert (response_logits(merged, ids, mask, RESPONSE) - logits).abs().max() < 1e-5
        assert (response_logits(causal_lm(arch), ids, mask, RESPONSE) - logits).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_is_random_in_train_mode_and_exact_in_eval_mode(arch):
    model = train(add_lora(causal_lm(arch), rank=RANK, alpha=ALPHA, dropout=0.5), sft_loss)
    no_dropout = copy.deepcopy(model)
    for _, layer in lora_layers(no_dropout):
        layer.dropout = nn.Identity()
    ids, mask = batch()
    with torch.no_grad():
        model.train()
        first, second = response_logprobs(model, ids, mask), response_logprobs(model, ids, mask)
        with adapters_off(model):  # dropout acts on the adapter's input only: the base path stays exact
            off = response_logprobs(model, ids, mask)
        model.eval()
        evaluated = response_logprobs(model, ids, mask)
        exact = response_logprobs(no_dropout, ids, mask)
    assert (first - second).abs().max() > 1e-4
    assert torch.equal(evaluated, exact)
    with torch.no_grad(), adapters_off(no_dropout):
        assert torch.equal(off, response_logprobs(no_dropout, ids, mask))


def test_seed_fixes_the_adapters():
    def a_matrices(seed):
        return [layer.lora_A for _, layer in lora_layers(add_lora(causal_lm("gpt2"), RANK, ALPHA, seed=seed))]

    same, again, other = a_matrices(3), a_matrices(3), a_matrices(4)
    assert all(torch.equal(x, y) for x, y in zip(same, again))
    assert all(not torch.equal(x, y) for x, y in zip(same, other))
    assert not torch.equal(same[0], same[4])  # layer 0's c_attn and layer 1's: one generator, successive draws


def peft_config(path):
    return json.loads((path / "adapter_config.json").read_text())


@needs_peft
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_loads_the_policy_adapter(arch, tmp_path, peft):
    base = causal_lm(arch)
    base.save_pretrained(tmp_path / "base")
    model = train(add_lora(copy.deepcopy(base), rank=RANK, alpha=ALPHA, dropout=0.1), sft_loss).eval()
    save_adapter(model, tmp_path / "adapter", tmp_path / "base")
    model.save_pretrained(tmp_path / "merged", state_dict=merged_state_dict(model))
    config = peft_config(tmp_path / "adapter")
    assert config["fan_in_fan_out"] is (arch == "gpt2") and config["task_type"] == "CAUSAL_LM"

    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                            tmp_path / "adapter").eval()
    inner = loaded.get_base_model()  # the transformers model with PEFT's LoRA layers in it
    lora = loaded.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.fan_in_fan_out) == (RANK, ALPHA, 0.1, arch == "gpt2")
    assert set(lora.target_modules) == {n for n, _ in lora_layers(model)}
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids, mask = batch()
    with torch.no_grad():
        merged_logits = response_logits(plain, ids, mask, RESPONSE)
        assert (response_logits(inner, ids, mask, RESPONSE) - merged_logits).abs().max() < 1e-5
        assert (response_logits(base, ids, mask, RESPONSE) - merged_logits).abs().max() > 1e-2
    ours = merged_state_dict(model)
    theirs = loaded.merge_and_unload().state_dict()  # PEFT's own fold of our adapter
    assert set(theirs) == set(ours) and all((theirs[k] - ours[k]).abs().max() < 1e-6 for k in ours)


@needs_peft
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_loads_the_reward_model_adapter_with_its_trained_head(arch, tmp_path, peft):
    causal_lm(arch).save_pretrained(tmp_path / "sft")  # the RM's base: the SFT checkpoint, a causal LM
    rm = add_lora(load_scalar_model(str(tmp_path / "sft"), pad_token_id=PAD, head_seed=0), rank=RANK, alpha=ALPHA,
                  trained=["score"]).eval()
    head_init = rm.score.weight.detach().clone()
    ids, mask = batch()
    target = torch.tensor([1.0, -1.0, 0.5])
    train(rm, lambda m: (sequence_rewards(m, ids, mask) - target).square().mean())
    assert rm.score.weight.requires_grad and not torch.equal(rm.score.weight, head_init)
    save_adapter(rm, tmp_path / "adapter", tmp_path / "sft")
    rm.save_pretrained(tmp_path / "merged", state_dict=merged_state_dict(rm))
    config = peft_config(tmp_path / "adapter")
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]

    right = torch.randint(2, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    right_mask = torch.ones_like(right)
    right[0, -3:], right_mask[0, -3:] = PAD, 0  # right padding: transformers reads the score at the last non-PAD
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    fresh = AutoModelForSequenceClassification.from_pretrained(tmp_path / "sft", num_labels=1, pad_token_id=PAD)
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()  # a new random head, replaced
    with torch.no_grad():
        merged_scores = plain(input_ids=right, attention_mask=right_mask).logits[:, 0]
        ours = rm(input_ids=right, attention_mask=right_mask).logits[:, 0]
        theirs = loaded(input_ids=right, attention_mask=right_mask).logits[:, 0]
        assert (ours - merged_scores).abs().max() < 1e-5
        assert (theirs - merged_scores).abs().max() < 1e-5
        with adapters_off(rm):  # the adapters matter, not only the head
            assert (rm(input_ids=right, attention_mask=right_mask).logits[:, 0] - ours).abs().max() > 1e-3
