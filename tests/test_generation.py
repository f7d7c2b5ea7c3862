"""vllm_generate's seeding and vllm_engine's CPU settings, against a stand-in `vllm` module (the real one is
exercised by tests/test_vllm.py, in a venv with vLLM)."""

import os
import sys
import types

import pytest

from minirlaif.generation import row_seeds, vllm_generate


class FakeTokenizer:
    eos_token_id = 0

    def decode(self, ids, skip_special_tokens=False):
        return "".join(f" w{i}" if i else "<eos>" for i in ids)

    def __len__(self):
        return 10


class FakeLLM:
    vocab = 10  # the model's output rows; more than the tokenizer's 10 tokens: a padded vocabulary

    def __init__(self, model, **kw):
        self.kw, FakeLLM.closed = kw, False
        shutdown = lambda: setattr(FakeLLM, "closed", True)  # noqa: E731
        self.llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(shutdown=shutdown),
                                                model_config=types.SimpleNamespace(get_vocab_size=lambda: self.vocab))

    def get_tokenizer(self):
        return FakeTokenizer()

    def generate(self, prompts, params):
        FakeLLM.params = params
        assert len(params) == len(prompts)  # one SamplingParams per request
        # each sample: the query's last id, the sample's index, then EOS
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=(p["prompt_token_ids"][-1], k + 1, 0))
                                               for k in range(sp.n)]) for p, sp in zip(prompts, params)]


def fake_vllm(monkeypatch, on_cpu: bool):
    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = FakeLLM, lambda **kw: types.SimpleNamespace(**kw)
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: on_cpu)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)


@pytest.mark.parametrize("on_cpu", [False, True])
def test_vllm_engine_settings_on_gpu_and_cpu(monkeypatch, on_cpu):
    from minirlaif.generation import vllm_engine

    fake_vllm(monkeypatch, on_cpu)
    for var in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.delenv(var, raising=False)
    kw = vllm_engine("m", seed=3, gpu_memory_utilization=0.5, max_logprobs=40).kw
    assert kw["trust_remote_code"] is False and kw["seed"] == 3 and kw["max_logprobs"] == 40
    cpu_only = {"enforce_eager": True, "enable_chunked_prefill": False, "dtype": "float32"}
    if on_cpu:
        assert cpu_only.items() <= kw.items()
        assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1" and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        # the caller's settings win
        monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
        assert vllm_engine("m", dtype="bfloat16").kw["dtype"] == "bfloat16"
        assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "4"
    else:  # nothing CPU-specific on a GPU
        assert not set(cpu_only) & set(kw) and "VLLM_CPU_KVCACHE_SPACE" not in os.environ


def test_vllm_generate_seeds_each_query_like_generate_texts(monkeypatch):
    fake_vllm(monkeypatch, on_cpu=False)
    out = vllm_generate("m", [[5, 7], [9]], n=2, max_new_tokens=4, temperature=1.0, seed=3)
    assert FakeLLM.closed  # shut down when done, not whenever the garbage collector finds it
    # texts lose the leading space and the EOS; token ids keep the EOS
    assert out[0] == [{"text": "w7 w1", "token_ids": [7, 1, 0]}, {"text": "w7 w2", "token_ids": [7, 2, 0]}]
    assert out[1][1] == {"text": "w9 w2", "token_ids": [9, 2, 0]}
    seeds = [p.seed for p in FakeLLM.params]
    assert seeds == row_seeds(3, n=2) and seeds[0] != seeds[1]
    assert all((p.n, p.temperature, p.max_tokens, p.stop_token_ids) == (2, 1.0, 4, [0]) for p in FakeLLM.params)
    # a query's seed depends on its index and `seed` only, not on the other queries of the call
    vllm_generate("m", [[1], [2], [3]], n=1, max_new_tokens=4, temperature=1.0, seed=3)
    assert [p.seed for p in FakeLLM.params][:2] == seeds
    # explicit seeds (label.py: fixed by each post's place in the dataset, so a resumed call repeats them)
    vllm_generate("m", [[1], [2]], n=1, max_new_tokens=4, temperature=1.0, seed=3, seeds=[11, 42])
    assert [p.seed for p in FakeLLM.params] == [11, 42]
    # no mask when the model has no rows past the tokenizer; the tokenizer's ids when it has (models.limit_vocab)
    assert all(p.allowed_token_ids is None for p in FakeLLM.params)
    monkeypatch.setattr(FakeLLM, "vocab", 16)
    vllm_generate("m", [[1]], n=1, max_new_tokens=4, temperature=1.0, seed=3)
    assert FakeLLM.params[0].allowed_token_ids == list(range(10))


def test_rollout_engine_choices_and_torchrun_mode(monkeypatch):
    """One process: a plain engine; under torchrun: vLLM's torchrun mode, one data-parallel rank per process
    (executed in tests/test_vllm.py::test_ppo_vllm_rollouts_under_torchrun_match_one_process)."""
    import torch

    from minirlaif import generation
    from minirlaif.generation import HFRollout, rollout_engine

    made = []
    monkeypatch.setattr(generation, "VLLMRollout", lambda *a, **kw: made.append((a, kw)))
    assert isinstance(rollout_engine("hf", "m"), HFRollout)
    with pytest.raises(ValueError, match="hf or vllm"):
        rollout_engine("sglang", "m")
    rollout_engine("vllm", "m", 5, 0.4)
    assert made[-1] == (("m", 5, 0.4), {})
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    rollout_engine("vllm", "m", 6)
    assert made[-1] == (("m", 6, 0.3), {"distributed_executor_backend": "external_launcher",
                                         "data_parallel_size": 2})
