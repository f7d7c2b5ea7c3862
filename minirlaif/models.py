"""Tokenizers, models and the forward passes every stage shares.

One source of truth for padding and masks: `pad_batch` builds (ids, mask) with mask 1 on real tokens; positions
come from the mask (`position_ids`), so left- and right-padded batches give the same numbers; the reward is read
at the last token whose mask is 1 (`last_index`), never found by comparing ids with EOS (GPT-2 has no pad token,
and an EOS can appear inside text).

Policy = any `AutoModelForCausalLM` that transformers loads without remote code. Its logits always come from the
model's own forward (`causal_lm_logits`), so whatever the architecture applies after its output layer (Gemma-2's
`final_logit_softcapping`, Cohere's `logit_scale`, Granite's `logits_scaling`) is applied in SFT, sampling, PPO and
labeling alike. Reward and value models = `AutoModelForSequenceClassification` with one label (the SFT backbone
plus a scalar head `score`), which transformers and vLLM load directly. We call their backbone and head ourselves
so that a value can be read at every token and the reward at the mask's last token (`scalar_outputs`).

The reward offset (train_rm.py shifts every reward so that reference summaries average 0; `fold_reward_offset`):
folded into the weights where the architecture allows it exactly (a bias on the score head, or a LayerNorm bias
right before it: GPT-2, GPT-NeoX); otherwise (RMSNorm models such as Llama, Qwen2, Gemma-2, whose norm and score
head have no bias) it is stored as `config.reward_offset_unfolded`, which every reward read here subtracts, and an
outside loader must subtract too: reward = score output - config.reward_offset_unfolded (0 or absent: nothing to do).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from torch import nn

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "[PAD]"

# ----------------------------------------------------------------------------------------------------------------
# tokenizers


def train_bpe_tokenizer(texts, vocab_size: int = 1024):
    """A byte-level BPE trained in-process (the tiny preset's tokenizer; no hub needed). pad != eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """AutoTokenizer plus a real `[PAD]` token when the tokenizer has none (GPT-2) or pads with EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return tok


# ----------------------------------------------------------------------------------------------------------------
# models


def tiny_gpt2_config(tokenizer, n_layer: int, n_head: int, n_embd: int, n_positions: int):
    """A small GPT-2 for the tiny preset, dropout off (too small to overfit in a few minutes)."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                      n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)


def disable_dropout(model: nn.Module) -> nn.Module:
    """RL needs deterministic forward passes: dropout would make old and new log-probs differ at ratio 1."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def fuse_gelu(model: nn.Module) -> nn.Module:
    """Run GPT-2's activation as one kernel: the same function, about 10% faster tiny training stages on the CPU.

    GPT-2's "gelu_new" is transformers' NewGELUActivation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) written
    as seven elementwise ops, each with its own pass over memory and its own backward. torch's
    `nn.GELU(approximate="tanh")` is that formula in one fused kernel (outputs within 3e-7 in fp32; 4.9 ms -> 0.9 ms
    forward on a (2128, 512) activation on the 2-core CPU). Only the module changes: the saved config still says
    gelu_new, so transformers and vLLM load the checkpoints as before.
    """
    from transformers.activations import NewGELUActivation

    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                setattr(parent, name, nn.GELU(approximate="tanh"))
    return model


def set_attention(model: nn.Module, device: torch.device | str, bf16: bool) -> nn.Module:
    """Pick the attention kernel for the run's device and precision; returns the model.

    transformers' default (SDPA) everywhere, except under bf16 autocast on CPU. There its eager attention (bf16
    matmuls, softmax, an additive causal mask) beats both SDPA CPU kernels: a tiny PPO micro-batch's forward and
    backward take 90 ms against 100 ms (math) and 145 ms (flash), and the PPO benchmark runs 1.2x faster
    (docs/benchmarks.md). The function computed is the same up to rounding; the saved config does not change.
    """
    if bf16 and torch.device(device).type == "cpu":
        model.set_attn_implementation("eager")
    return model


def load_causal_lm(path: str, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """A causal LM that never gives probability to a token its tokenizer (saved with it) does not have."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError, TypeError):  # a checkpoint saved without its tokenizer: nothing to limit it to
        return fuse_gelu(model)
    return fuse_gelu(limit_vocab(model, len(tokenizer)))


def limit_vocab(model: nn.Module, n_tokens: int) -> nn.Module:
    """Mask the output rows past the tokenizer's last token (`causal_lm_logits` sets their logits to -inf).

    Checkpoints pad their embedding past the tokenizer for fast matmuls (Qwen2: 151,936 rows for 151,646 tokens).
    Those rows are never a target, but a barely trained model (or a high temperature) still samples them, and no
    stage can decode or score such an id. Masked here, they get probability 0 in sampling and in every log-prob
    the trainers compute, so old and new log-probs stay on one distribution.
    """
    if n_tokens < model.get_output_embeddings().weight.shape[0]:
        model.vocab_limit = n_tokens
    return model


def grow_embeddings(model: nn.Module, tokenizer) -> nn.Module:
    """Make room for tokens the tokenizer has and the embedding lacks (our new [PAD]); never shrink.

    Some checkpoints pad their embedding past the tokenizer (Qwen2: 151,936 rows for 151,646 tokens, for fast
    matmuls); `resize_token_embeddings(len(tokenizer))` would cut those rows (and change the output layer's size).
    """
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return model


def load_scalar_model(path: str, dtype: torch.dtype | None = None, pad_token_id: int | None = None,
                      trust_remote_code: bool = False, head_seed: int = 0):
    """A reward / value model: a causal-LM checkpoint gets a new scalar head, an RM checkpoint keeps its own.

    A new head is initialised from its own generator seeded by `head_seed` (normal, std = the config's
    initializer_range, as transformers would), not from the global RNG: under torchrun every rank seeds its
    global RNG differently (seed + rank), and ranks that drew different heads would train different models.
    """
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True)
    new = [name for name, _ in head(model).named_parameters()
           if any(k.endswith(f"score.{name}") for k in info["missing_keys"])]
    gen = torch.Generator().manual_seed(head_seed)
    with torch.no_grad():
        for name, param in head(model).named_parameters():
            if name not in new:
                continue
            if name == "bias":
                param.zero_()
            else:
                std = getattr(model.config, "initializer_range", 0.02)
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return fuse_gelu(model)


def head(model: nn.Module) -> nn.Module:
    """The scalar head `score` of a reward / value model (a causal LM's logits come from `causal_lm_logits`)."""
    return model.score


# what each kind of model looks like in its config.json, and which stage makes it
MODEL_KINDS = {
    "causal-lm": (("ForCausalLM", "LMHeadModel"), "a causal LM", "train_sft.py"),
    "reward-model": (("ForSequenceClassification",), "a reward model", "train_rm.py"),
}


def check_context(model, n_tokens: int, flags: str) -> None:
    """Stop with one line naming `flags` when `n_tokens` (the longest sequence they allow) exceeds the model's
    positions (GPT-2's n_positions, others' max_position_embeddings; a model with neither is not checked)."""
    from minirlaif.config import require

    n_positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    require(not n_positions or n_tokens <= n_positions,
            f"{flags} = {n_tokens} exceeds the model's context of {n_positions} tokens")


def check_model(path: str, kind: str, flag: str) -> None:
    """Stop with one line naming the flag, the path and the stage that makes such a model, when `path` holds no
    model or the wrong kind ("causal-lm" or "reward-model"): a mistyped path would otherwise end in transformers'
    "Repo id must be in the form ...", and a causal LM given as a reward model would be scored by a new random head.
    A path that does not exist here and looks like a hub id ("org/name", "gpt2") is left to transformers."""
    from minirlaif.config import UserError

    want, what, made_by = MODEL_KINDS[kind]
    p = Path(path)
    hint = f"{made_by} writes {what}: run it first, or give the path of one"
    if not p.exists():
        if len(p.parts) <= 2 and not path.startswith((".", "/", "~", "runs")):
            return  # a hub id: transformers loads (or fails to reach) it
        raise UserError(f"{flag} {path}: no such directory; {hint}")
    if not (p / "config.json").is_file():
        raise UserError(f"{flag} {path}: no model there (no config.json); {hint}")
    config = json.loads((p / "config.json").read_text())
    arch = config.get("architectures") or []
    n_labels = len(config.get("id2label") or {0: 0, 1: 1})
    if not any(a.endswith(want) for a in arch) or (kind == "reward-model" and n_labels != 1):
        found = next((w for k, (ends, w, _) in MODEL_KINDS.items() if any(a.endswith(ends) for a in arch)),
                     "another kind of model")
        labels = f", {n_labels} labels" if "ForSequenceClassification" in "".join(arch) else ""
        raise UserError(f"{flag} {path}: that is {found} ({', '.join(arch) or 'no architectures'}{labels}), not "
                        f"{what}; {hint}")


# ----------------------------------------------------------------------------------------------------------------
# padding and masks


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, mask), both (B, T), mask 1 on real tokens; `side` is where the padding goes."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them. (B, T)"""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, under left or right padding. (B,)"""
    t = torch.arange(mask.shape[1], device=mask.device)
    return (t * mask.long()).argmax(-1)


def trim(mb: dict) -> dict:
    """Drop the columns that are padding in every row of a PPO micro-batch (its "query*" and "response*" tensors):
    fewer positions, the same numbers (queries are left-padded, responses right-padded, positions come from the
    mask)."""
    q0 = int(mb["query_mask"].any(0).int().argmax())  # first column holding a real query token
    r1 = int(mb["response_mask"].any(0).sum())  # response columns holding a real token form a prefix
    return {k: v[:, q0:] if k.startswith("query") else v[:, :r1] for k, v in mb.items()}


# ----------------------------------------------------------------------------------------------------------------
# forward passes


def _cache_kwarg(model: nn.Module) -> str:
    """transformers >= 5.2x calls the KV cache `cache`; earlier releases `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model: nn.Module):
    """An empty KV cache for `hidden_states` (transformers' DynamicCache)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


def hidden_states(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache=None, positions=None):
    """Last hidden states of the backbone (no output head), and the KV cache when one is passed in.

    `positions` defaults to `position_ids(mask)`; with a cache, pass the new tokens' positions.
    """
    base = model.base_model
    name = _cache_kwarg(base)
    out = base(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask) if positions is None else positions,
               use_cache=cache is not None, **{name: cache})
    return out.last_hidden_state, (getattr(out, name) if cache is not None else None)


def causal_lm_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, keep: int = 0, cache=None,
                     positions=None):
    """(logits, cache): a causal LM's logits exactly as its own forward computes them, for the last `keep`
    positions (0: all), and the KV cache when one is passed in. (B, keep or T, V)

    The forward, not `lm_head(hidden)`: some architectures post-process the output layer (Gemma-2
    `final_logit_softcapping`, Cohere `logit_scale`, Granite `logits_scaling`), and the sampler, PPO and the
    labeler must see the distribution SFT trained. `logits_to_keep` runs the head only on the kept positions:
    with a large vocabulary the head is most of the compute of a small model. `positions` defaults to
    `position_ids(mask)`; with a cache, pass the new tokens' positions.
    """
    name = _cache_kwarg(model)
    kwargs = {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask) if positions is None else positions,
                use_cache=cache is not None, **{name: cache}, **kwargs)
    logits = out.logits if kwargs or keep == 0 else out.logits[:, -keep:]
    if (n := getattr(model, "vocab_limit", None)) is not None:  # ids past the tokenizer: probability 0
        logits = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= n, float("-inf"))
    return logits, (getattr(out, name) if cache is not None else None)


def response_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, n_response: int) -> torch.Tensor:
    """Logits predicting the last `n_response` tokens of `ids` (query + response). (B, R, V)

    The head runs only on the positions that predict response tokens (and the last one, dropped): the query's
    logits are never used.
    """
    logits, _ = causal_lm_logits(model, ids, mask, keep=n_response + 1)  # (B, R + 1, V)
    return logits[:, :-1]  # (B, R, V)


def scalar_outputs(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A reward / value model's scalar at each hidden state: the head, minus the unfolded reward offset. (...)

    `config.reward_offset_unfolded` is the part of train_rm.py's reward offset that could not be folded into the
    weights (`fold_reward_offset`); reading it here makes every reward we compute include it.
    """
    return head(model)(hidden).squeeze(-1).float() - getattr(model.config, "reward_offset_unfolded", 0.0)


def token_scores(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The scalar head at every position (the value model's per-token values). (B, T)"""
    hidden, _ = hidden_states(model, ids, mask)
    return scalar_outputs(model, hidden)


def sequence_rewards(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reward of each sequence: the scalar head at its last real token (the EOS of query + summary). (B,)"""
    hidden, _ = hidden_states(model, ids, mask)  # (B, T, H)
    last = hidden[torch.arange(ids.shape[0], device=ids.device), last_index(mask)]  # (B, H)
    return scalar_outputs(model, last)


def shared_prefix_rewards(model: nn.Module, q_ids: torch.Tensor, q_mask: torch.Tensor, s_ids: torch.Tensor,
                          s_mask: torch.Tensor) -> torch.Tensor:
    """Rewards of query_i + summary_j for k summaries per query, with each query encoded once. (B * k,)

    q_ids/q_mask (B, Tq) hold the queries, right-padded; s_ids/s_mask (B * k, Ts) the summaries, right-padded, the
    k of query i in rows i*k .. i*k+k-1. Equal to `sequence_rewards` on the concatenated sequences (the pads between
    a query and its summary are masked out and the summary's positions continue the query's), at a fraction of the
    cost when queries are longer than summaries: the reward model's training pairs share their query.
    """
    k = s_ids.shape[0] // q_ids.shape[0]
    _, cache = hidden_states(model, q_ids, q_mask, cache=new_cache(model))  # the queries' keys and values
    cache.batch_repeat_interleave(k)  # one copy per summary; differentiable, so gradients reach the query tokens
    q_mask = q_mask.repeat_interleave(k, dim=0)  # (B*k, Tq)
    positions = q_mask.sum(-1, keepdim=True) + position_ids(s_mask)  # (B*k, Ts), continuing each query
    hidden, _ = hidden_states(model, s_ids, torch.cat([q_mask, s_mask], dim=1), cache=cache, positions=positions)
    last = hidden[torch.arange(s_ids.shape[0], device=s_ids.device), last_index(s_mask)]  # (B*k, H)
    return scalar_outputs(model, last)


def final_layer_norm(model: nn.Module) -> nn.LayerNorm | None:
    """The backbone's last top-level LayerNorm with a bias (GPT-2 ln_f, GPT-NeoX final_layer_norm), or None
    (RMSNorm models: Llama, Qwen2, Gemma-2, ...). Whether the head reads its output is checked by the caller."""
    norms = [m for m in model.base_model.children() if isinstance(m, nn.LayerNorm) and m.bias is not None]
    return norms[-1] if norms else None


@torch.no_grad()
def fold_reward_offset(model: nn.Module, offset: float) -> str:
    """Make every reward `offset` lower; returns where the offset went: "score.bias", "<norm>.bias" or "config".

    In the weights when that is exact, so that any loader (transformers, vLLM) applies it: the score head's bias
    when it has one; else, when the head reads a LayerNorm's output h = g * x_hat + b (GPT-2, GPT-NeoX), that
    bias: shifting b by d = -offset * w / |w|^2 shifts w . h by exactly -offset for every input. The shift is
    checked on a probe input, and undone if it is not exact. Otherwise (RMSNorm has no bias, nor has the score
    head of Llama-like models) the offset is added to `config.reward_offset_unfolded`, which our reward functions
    subtract (`scalar_outputs`) and an outside loader must subtract from the score itself (docs/engineering.md,
    "Models").
    `config.reward_offset` always holds the total offset.
    """
    model.config.reward_offset = getattr(model.config, "reward_offset", 0.0) + float(offset)
    score = head(model)
    if getattr(score, "bias", None) is not None:
        score.bias -= offset
        return "score.bias"
    norm = final_layer_norm(model)
    if norm is not None:
        probe = torch.arange(8, device=score.weight.device)[None] % model.config.vocab_size
        probe_mask = torch.ones_like(probe)
        before = sequence_rewards(model, probe, probe_mask)
        w = score.weight[0].float()  # (H,)
        shift = (-offset * w / w.dot(w)).to(norm.bias.dtype)
        norm.bias += shift
        after = sequence_rewards(model, probe, probe_mask)
        if torch.allclose(after, before - offset, atol=1e-4 * max(1.0, abs(offset)), rtol=0):
            return f"{[n for n, m in model.base_model.named_children() if m is norm][0]}.bias"
        norm.bias -= shift  # the head does not read this norm's output directly: keep the offset in the config
    model.config.reward_offset_unfolded = getattr(model.config, "reward_offset_unfolded", 0.0) + float(offset)
    return "config"
