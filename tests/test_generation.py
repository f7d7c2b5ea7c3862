"""vllm_generate's seeding, against a stand-in `vllm` module (the real one needs a GPU and is not installed)."""

import sys
import types

from minirlaif.generation import row_seeds, vllm_generate


class FakeTokenizer:
    eos_token_id = 0

    def decode(self, ids, skip_special_tokens=False):
        return "".join(f" w{i}" if i else "<eos>" for i in ids)


class FakeLLM:
    def __init__(self, model, **kw):
        self.kw = kw

    def get_tokenizer(self):
        return FakeTokenizer()

    def generate(self, prompts, params):
        FakeLLM.params = params
        assert len(params) == len(prompts)  # one SamplingParams per request
        # each sample: the query's last id, the sample's index, then EOS
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=(p["prompt_token_ids"][-1], k + 1, 0))
                                               for k in range(sp.n)]) for p, sp in zip(prompts, params)]


def test_vllm_generate_seeds_each_query_like_generate_texts(monkeypatch):
    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = FakeLLM, lambda **kw: types.SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    out = vllm_generate("m", [[5, 7], [9]], n=2, max_new_tokens=4, temperature=1.0, seed=3)
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
