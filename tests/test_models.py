"""Masks, forward passes and the shared KV-cache sampler on tiny random GPT-2s."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification, GPT2ForSequenceClassification, GPT2LMHeadModel

from minirlaif.generation import decode_summary, generate, generate_texts, row_seeds
from minirlaif.losses import logprobs_from_logits
from minirlaif.models import (fold_reward_offset, fuse_gelu, last_index, load_causal_lm, pad_batch, position_ids,
                              response_logits, sequence_rewards, set_attention, tiny_gpt2_config, token_scores,
                              train_bpe_tokenizer)
from minirlaif.utils import autocast

TEXTS = [f"my friend ({a}F) of {n} years said {w} and 1 or 2 things." for a in range(16, 40)
         for n, w in [(1, "hello"), (3, "goodbye"), (7, "nothing")]]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def policy(tok):
    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_gpt2_config(tok, n_layer=2, n_head=2, n_embd=32, n_positions=128)).eval()


@pytest.fixture(scope="module")
def rm(tok):
    torch.manual_seed(1)
    cfg = tiny_gpt2_config(tok, n_layer=2, n_head=2, n_embd=32, n_positions=128)
    cfg.num_labels = 1
    return GPT2ForSequenceClassification(cfg).eval()


def test_tokenizer_is_deterministic_and_pads_apart_from_eos(tok):
    again = train_bpe_tokenizer(TEXTS, vocab_size=300)
    assert again.get_vocab() == tok.get_vocab()
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.decode(tok(" hello")["input_ids"]) == " hello"


def test_pad_batch_masks_positions_last_index():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    assert last_index(mask).tolist() == [2, 2]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and last_index(mask).tolist() == [2, 0]


def test_response_logits_match_the_full_forward(policy, tok):
    ids, mask = pad_batch([tok("my friend said hello")["input_ids"], tok("2 things")["input_ids"]],
                          tok.pad_token_id, side="left")
    full = policy(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    torch.testing.assert_close(response_logits(policy, ids, mask, 2), full[:, -3:-1])


def test_fuse_gelu_keeps_outputs_and_gradients_and_the_saved_config(tok, tmp_path):
    from transformers.activations import NewGELUActivation

    torch.manual_seed(2)
    plain = GPT2LMHeadModel(tiny_gpt2_config(tok, n_layer=2, n_head=2, n_embd=32, n_positions=128))
    assert plain.config.activation_function == "gelu_new"
    fused = fuse_gelu(GPT2LMHeadModel(plain.config))
    fused.load_state_dict(plain.state_dict())
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    assert sum(isinstance(m, torch.nn.GELU) for m in fused.modules()) == 2  # one per block
    ids, mask = pad_batch([tok(t)["input_ids"] for t in TEXTS[:4]], tok.pad_token_id)
    for model in (plain, fused):
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask).logits.pow(2).mean().backward()
    torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # the checkpoint is untouched: it still says gelu_new, and our loader fuses it again
    fused.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert GPT2LMHeadModel.from_pretrained(tmp_path).config.activation_function == "gelu_new"
    assert not any(isinstance(m, NewGELUActivation) for m in load_causal_lm(str(tmp_path)).modules())


def test_set_attention_is_eager_only_under_cpu_bf16_and_computes_the_same(tok, tmp_path):
    torch.manual_seed(3)
    sdpa = GPT2LMHeadModel(tiny_gpt2_config(tok, n_layer=2, n_head=2, n_embd=32, n_positions=128))
    eager = GPT2LMHeadModel(sdpa.config)
    eager.load_state_dict(sdpa.state_dict())
    for device, bf16 in (("cpu", False), ("cuda", True), ("cuda", False)):  # only the device type is read
        assert set_attention(sdpa, device, bf16).config._attn_implementation == "sdpa"
    assert set_attention(eager, torch.device("cpu"), True).config._attn_implementation == "eager"
    ids, mask = pad_batch([tok(t)["input_ids"] for t in TEXTS[:4]], tok.pad_token_id, side="left")  # (4, T)
    with torch.no_grad():
        reference = sdpa(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        same = eager(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        with autocast("cpu", True):
            low = eager(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    real = mask.bool()  # padded positions' outputs are never read
    torch.testing.assert_close(same[real], reference[real], rtol=0, atol=1e-5)  # the same function in fp32
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low[real].float(), reference[real], rtol=0, atol=0.01)  # and to bf16 accuracy
    # the choice is not saved: a plain load of the checkpoint is transformers' default again
    eager.save_pretrained(tmp_path)
    assert "eager" not in (tmp_path / "config.json").read_text()
    assert GPT2LMHeadModel.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def _texts_as_queries(tok):
    return [tok(t)["input_ids"][:n] for t, n in zip(TEXTS[:5], [3, 9, 5, 12, 7])]


def test_sampler_logprobs_equal_a_fresh_forward_pass(policy, tok):
    ids, mask = pad_batch(_texts_as_queries(tok), tok.pad_token_id, side="left")
    gen = generate(policy, ids, mask, 10, tok.eos_token_id, tok.pad_token_id, temperature=0.7, seeds=[1, 2, 3, 4, 5])
    full_ids, full_mask = torch.cat([ids, gen.tokens], 1), torch.cat([mask, gen.mask], 1)
    logits = response_logits(policy, full_ids, full_mask, gen.tokens.shape[1])
    fresh = logprobs_from_logits(logits, gen.tokens, temperature=0.7) * gen.mask
    torch.testing.assert_close(gen.logprobs, fresh, atol=1e-5, rtol=1e-5)
    # seeded per row: the same seeds give the same samples, in any batch
    again = generate(policy, ids, mask, 10, tok.eos_token_id, tok.pad_token_id, temperature=0.7,
                     seeds=[1, 2, 3, 4, 5])
    assert torch.equal(again.tokens, gen.tokens)
    alone = generate(policy, ids[3:4, -12:], mask[3:4, -12:], 10, tok.eos_token_id, tok.pad_token_id,
                     temperature=0.7, seeds=[4])
    n = alone.tokens.shape[1]
    assert torch.equal(alone.tokens[0], gen.tokens[3, :n]) and gen.mask[3, n:].sum() == 0


def test_sampler_top_k_samples_only_the_k_most_likely_tokens(policy, tok):
    ids, mask = pad_batch(_texts_as_queries(tok), tok.pad_token_id, side="left")
    seeds, args = [1, 2, 3, 4, 5], (policy, ids, mask, 8, tok.eos_token_id, tok.pad_token_id)
    greedy = generate(*args, greedy=True)
    assert torch.equal(generate(*args, temperature=1.0, seeds=seeds, top_k=1).tokens, greedy.tokens)  # k=1: greedy
    gen = generate(*args, temperature=1.0, seeds=seeds, top_k=3)
    logits = response_logits(policy, torch.cat([ids, gen.tokens], 1), torch.cat([mask, gen.mask], 1),
                             gen.tokens.shape[1])  # (B, R, V), by a fresh forward pass
    top3 = logits.topk(3, dim=-1).indices  # (B, R, 3)
    assert ((top3 == gen.tokens[..., None]).any(-1) | ~gen.mask.bool()).all()
    # its log-probs are under the renormalised top-3 distribution: log(p / sum of the 3 largest p)
    logp = torch.log_softmax(logits, -1)
    want = (logp.gather(-1, gen.tokens[..., None])[..., 0] - logp.topk(3, -1).values.logsumexp(-1)) * gen.mask
    torch.testing.assert_close(gen.logprobs, want, atol=1e-5, rtol=1e-5)
    assert not torch.equal(gen.tokens, generate(*args, temperature=1.0, seeds=seeds).tokens)  # k matters


def test_sampler_stops_and_masks_after_eos(tok):
    # a "model" that always emits EOS after one token: every row stops, so generation stops early
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config(tok, 1, 1, 16, 64)).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        bias = torch.full((len(tok),), -1e4)
        bias[tok.eos_token_id] = 0.0
        model.lm_head.bias = torch.nn.Parameter(bias)
    ids, mask = pad_batch(_texts_as_queries(tok), tok.pad_token_id, side="left")
    gen = generate(model, ids, mask, 10, tok.eos_token_id, tok.pad_token_id, temperature=1.0,
                   seeds=list(range(5)))
    assert gen.tokens.shape == (5, 1) and (gen.tokens == tok.eos_token_id).all() and gen.mask.all()


def test_sampler_pads_after_each_rows_own_eos(policy, tok):
    ids, mask = pad_batch(_texts_as_queries(tok), tok.pad_token_id, side="left")
    gen = generate(policy, ids, mask, 30, tok.eos_token_id, tok.pad_token_id, temperature=2.0,
                   seeds=list(range(5)))
    for row, m in zip(gen.tokens.tolist(), gen.mask.tolist()):
        if tok.eos_token_id in row:
            k = row.index(tok.eos_token_id)
            assert m[: k + 1] == [1] * (k + 1) and m[k + 1:] == [0] * (len(row) - k - 1)
            assert all(t == tok.pad_token_id for t in row[k + 1:])
    assert (gen.logprobs[gen.mask == 0] == 0).all()


@pytest.mark.parametrize("greedy", [True, False])
def test_generation_is_batch_independent(policy, tok, greedy):
    queries = _texts_as_queries(tok)
    together = generate_texts(policy, tok, queries, 8, batch_size=5, greedy=greedy, seed=3)
    small = generate_texts(policy, tok, queries, 8, batch_size=2, greedy=greedy, seed=3)
    assert [o["token_ids"] for o in together] == [o["token_ids"] for o in small]


def test_bf16_generation_is_the_sampler_under_autocast(policy, tok):
    """generate_texts(bf16=True) samples what `generate` samples under bf16 autocast (label.py / evaluate.py
    --bf16), which is not fp32's: the log-probs differ by bf16's rounding."""
    queries = _texts_as_queries(tok)
    ids, mask = pad_batch(sorted(queries, key=len), tok.pad_token_id, side="left")
    out = generate_texts(policy, tok, queries, 8, batch_size=5, greedy=False, seed=3, bf16=True)
    seeds = row_seeds(3, n=len(queries))
    order = sorted(range(len(queries)), key=lambda i: len(queries[i]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gen = generate(policy, ids, mask, 8, tok.eos_token_id, tok.pad_token_id, seeds=[seeds[i] for i in order])
    fp32 = generate(policy, ids, mask, 8, tok.eos_token_id, tok.pad_token_id, seeds=[seeds[i] for i in order])
    for row, i in enumerate(order):
        assert out[i]["token_ids"] == gen.tokens[row][gen.mask[row].bool()].tolist()
    assert not torch.equal(gen.logprobs, fp32.logprobs)


def test_gumbel_max_sampling_matches_the_softmax():
    """The sampler's Gumbel-max draws follow softmax(logits / T): a chi-square-free frequency check."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    counts = torch.zeros(4)
    for s in range(4000):
        u = torch.rand(4, generator=torch.Generator().manual_seed(s))
        counts[(torch.log_softmax(logits / 0.7, -1) - torch.log(-torch.log(u))).argmax()] += 1
    torch.testing.assert_close(counts / 4000, torch.softmax(logits / 0.7, -1), atol=0.02, rtol=0)


def test_decode_summary_strips_one_space_and_eos(tok):
    ids = tok(" hello goodbye")["input_ids"] + [tok.eos_token_id]
    assert decode_summary(tok, ids) == "hello goodbye"


def test_rewards_read_at_last_real_token_under_any_padding(rm, tok):
    seqs = [tok("my friend said hello")["input_ids"] + [tok.eos_token_id], tok("2 things")["input_ids"]]
    left = sequence_rewards(rm, *pad_batch(seqs, tok.pad_token_id, side="left"))
    right = sequence_rewards(rm, *pad_batch(seqs, tok.pad_token_id, side="right"))
    alone = torch.cat([sequence_rewards(rm, *pad_batch([s], tok.pad_token_id)) for s in seqs])
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
    ids, mask = pad_batch(seqs, tok.pad_token_id, side="right")
    torch.testing.assert_close(token_scores(rm, ids, mask)[torch.arange(2), last_index(mask)], right)


def test_fold_reward_offset_survives_save_and_plain_load(rm, tok, tmp_path):
    seqs = [tok(t)["input_ids"] for t in TEXTS[:4]]
    ids, mask = pad_batch(seqs, tok.pad_token_id)
    before = sequence_rewards(rm, ids, mask)
    model = GPT2ForSequenceClassification(rm.config)
    model.load_state_dict(rm.state_dict())
    fold_reward_offset(model, 0.75)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(sequence_rewards(loaded, ids, mask), before - 0.75, atol=1e-5, rtol=1e-5)
    assert loaded.config.reward_offset == 0.75
