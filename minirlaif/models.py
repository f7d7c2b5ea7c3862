"""Tokenizers, models and the forward passes every stage shares.

One source of truth for padding and masks: `pad_batch` builds (ids, mask) with mask 1 on real tokens; positions
come from the mask (`position_ids`), so left- and right-padded batches give the same numbers; the reward is read
at the last token whose mask is 1 (`last_index`), never found by comparing ids with EOS (GPT-2 has no pad token,
and an EOS can appear inside text).

Policy = any `AutoModelForCausalLM`. Reward and value models = `AutoModelForSequenceClassification` with one label
(the SFT backbone plus a scalar head `score`), which transformers and vLLM load directly. We call their backbone and
head ourselves so that a value can be read at every token and the reward at the mask's last token.
"""

from __future__ import annotations

import inspect

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
    from transformers import AutoModelForCausalLM

    return fuse_gelu(AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code))


def load_scalar_model(path: str, dtype: torch.dtype | None = None, pad_token_id: int | None = None,
                      trust_remote_code: bool = False):
    """A reward / value model: a causal-LM checkpoint gets a new scalar head, an RM checkpoint keeps its own."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype,
                                                               trust_remote_code=trust_remote_code)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return fuse_gelu(model)


def head(model: nn.Module) -> nn.Module:
    """The output layer: lm_head of a causal LM, `score` of a sequence classifier."""
    return model.score if hasattr(model, "score") else model.get_output_embeddings()


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


def response_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, n_response: int) -> torch.Tensor:
    """Logits predicting the last `n_response` tokens of `ids` (query + response). (B, R, V)

    The head runs only on the positions that predict response tokens: with a large vocabulary the head is most of
    the compute of a small model, and the query's logits are never used.
    """
    hidden, _ = hidden_states(model, ids, mask)  # (B, T, H)
    return head(model)(hidden[:, -n_response - 1:-1])  # (B, R, V)


def token_scores(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The scalar head at every position (the value model's per-token values). (B, T)"""
    hidden, _ = hidden_states(model, ids, mask)
    return head(model)(hidden).squeeze(-1).float()


def sequence_rewards(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reward of each sequence: the scalar head at its last real token (the EOS of query + summary). (B,)"""
    hidden, _ = hidden_states(model, ids, mask)  # (B, T, H)
    last = hidden[torch.arange(ids.shape[0], device=ids.device), last_index(mask)]  # (B, H)
    return head(model)(last).squeeze(-1).float()


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
    return head(model)(last).squeeze(-1).float()


@torch.no_grad()
def fold_reward_offset(model: nn.Module, offset: float) -> None:
    """Make every reward `offset` lower by editing the weights, so any loader (transformers, vLLM) applies it.

    GPT-2's score head has no bias, but its input is ln_f's output h = g * x_hat + b, and only the head reads it.
    Shifting b by d = -offset * w / |w|^2 shifts w . h by exactly -offset for every input.
    """
    w = head(model).weight[0].float()  # (H,)
    ln_f = model.base_model.ln_f
    ln_f.bias += (-offset * w / w.dot(w)).to(ln_f.bias.dtype)
    model.config.reward_offset = getattr(model.config, "reward_offset", 0.0) + float(offset)
