"""Small pieces several test files build their tiny models with."""

import torch


@torch.no_grad()
def make_eos_likely(gpt2, eos_id: int, eos_logit: float = 3.0, seed: int = 0):
    """Give a random tiny GPT-2 an EOS logit of about `eos_logit` (the others stay near 0), so that some samples
    end early and some do not: the final LayerNorm's bias b is in every hidden state, and EOS's (tied) embedding
    is set to point along it. Returns the model."""
    n_embd = gpt2.config.n_embd
    b = torch.randn(n_embd, generator=torch.Generator().manual_seed(seed)) * 0.5
    gpt2.transformer.ln_f.bias.copy_(b)
    gpt2.transformer.wte.weight[eos_id] = eos_logit * b / b.dot(b)
    return gpt2
