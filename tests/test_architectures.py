"""Every stage on any causal LM: tiny random GPT-2, Llama, Qwen2, Gemma-2 (softcapped logits) and GPT-NeoX
(and the sampler test on Cohere and Granite, whose logits are scaled; transformers has no sequence classifier
for them, so they cannot be reward models).

Per architecture: the sampler's log-probs equal a fresh `model(...)` forward (the model's own logit
post-processing included) to 1e-5; rewards do not depend on padding; shared-prefix rewards equal separate
sequences; the reward offset lands where docs/engineering.md "Models" says (ours and plain transformers agree);
and the micro pipeline (SFT -> candidates + labels -> RM -> PPO -> evaluate) runs from the checkpoint. All offline: the
configs are built here and the tokenizer is the project's in-process BPE.
"""

import copy
import json

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, CohereConfig, Gemma2Config,
                          GPT2Config, GPTNeoXConfig, GraniteConfig, LlamaConfig, Qwen2Config)

import evaluate
import label
import train_ppo
import train_rm
import train_sft
from minirlaif import synthetic
from minirlaif.data import build_query, load_posts
from minirlaif.generation import generate, row_seeds
from minirlaif.losses import logprobs_from_logits
from minirlaif.models import (causal_lm_logits, fold_reward_offset, grow_embeddings, load_causal_lm, load_scalar_model,
                              load_tokenizer, pad_batch, position_ids, response_logits, sequence_rewards,
                              shared_prefix_rewards, train_bpe_tokenizer)
from minirlaif.config import parse_config

VOCAB_PAD = 13  # Qwen2-style: the embedding has rows past the tokenizer's last token


def make_config(arch: str, tok, pad_vocab: bool = False):
    ids = dict(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=512, **ids)
    if arch == "gpt2":
        return GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    if arch == "llama":
        return LlamaConfig(vocab_size=len(tok), num_key_value_heads=2, **small)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=len(tok) + VOCAB_PAD * pad_vocab, num_key_value_heads=2, tie_word_embeddings=True,
                           **small)
    if arch == "gemma2":
        # large random logits (initializer_range 0.5) and a softcap of 2, so that the cap changes them a lot
        # (30, the real models' cap, only matters for a trained model's large logits); the test checks it does
        return Gemma2Config(vocab_size=len(tok), num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0,
                            initializer_range=0.5,
                            attn_logit_softcapping=50.0, sliding_window=256, query_pre_attn_scalar=8, **small)
    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=len(tok), rotary_pct=0.5, **small)
    if arch == "cohere":  # logits * logit_scale (4: large enough to matter on random logits)
        return CohereConfig(vocab_size=len(tok), num_key_value_heads=2, logit_scale=4.0, **small)
    if arch == "granite":  # logits / logits_scaling
        return GraniteConfig(vocab_size=len(tok), num_key_value_heads=2, logits_scaling=0.25, **small)
    raise ValueError(arch)


ARCHS = ["gpt2", "llama", "qwen2", "gemma2", "gpt_neox"]  # every test, the micro pipeline included
LOGIT_POSTPROCESSING = {"gemma2": "final_logit_softcapping", "cohere": "logit_scale", "granite": "logits_scaling"}
# the sampler test only: transformers has no *ForSequenceClassification for these two, so no RM can be built from them
ALL_ARCHS = [*ARCHS, "cohere", "granite"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    synthetic.write_task(d, synthetic.TaskConfig(n_train=300, n_validation=24, n_test=8, n_comparison_posts_train=40,
                                                 n_comparison_posts_validation=16))
    posts, _ = load_posts(d / "sft", "train")
    tok = train_bpe_tokenizer([f"{p.title}\n{p.post}\n{p.summary}" for p in posts], vocab_size=400)
    return {"dir": d, "posts": posts, "tok": tok}


@pytest.fixture(scope="module")
def ckpt(request, task, tmp_path_factory):
    """A random tiny model of the architecture, saved with the BPE tokenizer like a hub checkpoint."""
    arch = request.param
    d = tmp_path_factory.mktemp(arch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(arch, task["tok"]))
    model.save_pretrained(d)
    task["tok"].save_pretrained(d)
    return {"arch": arch, "dir": d}


def test_sft_never_shrinks_an_embedding_padded_past_the_tokenizer(task, tmp_path):
    """Qwen2 pads its embedding past the tokenizer; SFT makes room for a new [PAD] but never cuts rows."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(make_config("qwen2", task["tok"], pad_vocab=True)).save_pretrained(tmp_path / "m")
    task["tok"].save_pretrained(tmp_path / "m")
    train_sft.main(parse_config(train_sft.Config, train_sft.PRESETS, [
        "--preset", "micro", "--task-dir", "", "--dataset", str(task["dir"] / "sft"), "--model", str(tmp_path / "m"),
        "--out-dir", str(tmp_path / "sft"), "--max-steps", "1", "--n-judge", "0", "--n-val", "8",
        "--max-query-tokens", "120"]))
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    assert saved.get_input_embeddings().weight.shape[0] == len(task["tok"]) + VOCAB_PAD
    assert saved.get_output_embeddings().weight.shape[0] == len(task["tok"]) + VOCAB_PAD
    # a tokenizer that outgrows the embedding still gets its rows
    small = AutoModelForCausalLM.from_config(make_config("llama", task["tok"]))
    bigger = copy.deepcopy(task["tok"])
    bigger.add_special_tokens({"additional_special_tokens": ["<new>"]})
    assert grow_embeddings(small, bigger).get_input_embeddings().weight.shape[0] == len(task["tok"]) + 1


def queries(task, n=5, max_tokens=120):
    return [build_query(task["tok"], p, max_tokens)[1] for p in task["posts"][:n]]


@pytest.mark.parametrize("ckpt", ALL_ARCHS, indirect=True)
def test_sampler_logprobs_equal_a_fresh_forward(task, ckpt):
    tok = task["tok"]
    model = load_causal_lm(str(ckpt["dir"])).eval()
    qs = [q[: 20 + 7 * i] for i, q in enumerate(queries(task))]  # different lengths: left padding
    q_ids, q_mask = pad_batch(qs, tok.pad_token_id, side="left")
    temp = 0.7
    gen = generate(model, q_ids, q_mask, 12, tok.eos_token_id, tok.pad_token_id, temperature=temp,
                   seeds=row_seeds(3, n=len(qs)), stop_at_eos=False)
    ids, mask = torch.cat([q_ids, gen.tokens], 1), torch.cat([q_mask, gen.mask], 1)
    with torch.no_grad():
        fresh = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits  # (B, T, V)
        want = logprobs_from_logits(fresh[:, q_ids.shape[1] - 1:-1], gen.tokens, temp) * gen.mask
        torch.testing.assert_close(gen.logprobs, want, atol=1e-5, rtol=0)
        # PPO's and the labeler's path: the same logits as the forward
        R = gen.tokens.shape[1]
        torch.testing.assert_close(response_logits(model, ids, mask, R), fresh[:, -R - 1:-1], atol=1e-5, rtol=0)
        last, _ = causal_lm_logits(model, ids, mask, keep=1)
        torch.testing.assert_close(last[:, 0], fresh[:, -1], atol=1e-5, rtol=0)
        if ckpt["arch"] in LOGIT_POSTPROCESSING:  # it is real here: the bare output layer gives other logits
            assert getattr(model.config, LOGIT_POSTPROCESSING[ckpt["arch"]]) not in (None, 1.0)
            hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state
            assert (model.lm_head(hidden) - fresh).abs().max() > 0.1


def reward_model(ckpt, tok, seed=0):
    return load_scalar_model(str(ckpt["dir"]), pad_token_id=tok.pad_token_id, head_seed=seed).eval()


@pytest.mark.parametrize("ckpt", ARCHS, indirect=True)
def test_rewards_are_padding_invariant_and_shared_prefix_equals_separate(task, ckpt):
    tok = task["tok"]
    rm = reward_model(ckpt, tok)
    qs = [q[: 15 + 9 * i] for i, q in enumerate(queries(task, 3))]
    summaries = [tok(" a summary" * (1 + j))["input_ids"] + [tok.eos_token_id] for j in range(6)]  # 2 per query
    seqs = [qs[i // 2] + summaries[i] for i in range(6)]
    with torch.no_grad():
        alone = torch.cat([sequence_rewards(rm, *pad_batch([s], tok.pad_token_id)) for s in seqs])
        for side in ("left", "right"):
            torch.testing.assert_close(sequence_rewards(rm, *pad_batch(seqs, tok.pad_token_id, side=side)), alone,
                                       atol=1e-5, rtol=0)
        q_ids, q_mask = pad_batch(qs, tok.pad_token_id, side="right")
        s_ids, s_mask = pad_batch(summaries, tok.pad_token_id, side="right")
        torch.testing.assert_close(shared_prefix_rewards(rm, q_ids, q_mask, s_ids, s_mask), alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ckpt", ARCHS, indirect=True)
def test_new_scalar_head_depends_on_head_seed_only(task, ckpt):
    """Under torchrun each rank seeds its global RNG with seed + rank: the head must not depend on it."""
    tok = task["tok"]
    torch.manual_seed(1)
    a = reward_model(ckpt, tok, seed=5).score.weight
    torch.manual_seed(2)
    b = reward_model(ckpt, tok, seed=5).score.weight
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.abs().sum() > 0 and not torch.equal(a, reward_model(ckpt, tok, seed=6).score.weight)
    std = getattr(AutoModelForCausalLM.from_pretrained(ckpt["dir"]).config, "initializer_range", 0.02)
    assert a.std().item() == pytest.approx(std, rel=0.5)  # transformers' own init scale


@pytest.mark.parametrize("ckpt", ARCHS, indirect=True)
def test_reward_offset_rule_in_our_loader_and_plain_transformers(task, ckpt, tmp_path):
    """Reference summaries score 0 after the offset, read by us and by plain transformers + the README rule."""
    tok = task["tok"]
    rm = reward_model(ckpt, tok)
    with torch.no_grad():  # give the head a clear nonzero mean, so that the offset matters
        rm.score.weight.mul_(50.0)
    seqs = [q + tok(" the summary")["input_ids"] + [tok.eos_token_id] for q in queries(task, 6)]
    ids, mask = pad_batch(seqs, tok.pad_token_id, side="left")
    with torch.no_grad():
        offset = sequence_rewards(rm, ids, mask).mean().item()
        assert abs(offset) > 0.05
        where = fold_reward_offset(rm, offset)
        assert where == {"gpt2": "ln_f.bias", "gpt_neox": "final_layer_norm.bias"}.get(ckpt["arch"], "config")
        assert abs(sequence_rewards(rm, ids, mask).mean().item()) < 1e-4
        rm.save_pretrained(tmp_path)
        ours = load_scalar_model(str(tmp_path), pad_token_id=tok.pad_token_id).eval()
        assert abs(sequence_rewards(ours, ids, mask).mean().item()) < 1e-4
        plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
        plain.config.pad_token_id = tok.pad_token_id
        # the README's rule for an outside loader: subtract config.reward_offset_unfolded (absent: 0) yourself
        raw = torch.cat([plain(input_ids=torch.tensor([s])).logits[:, 0] for s in seqs])
        assert abs((raw - getattr(plain.config, "reward_offset_unfolded", 0.0)).mean().item()) < 1e-4
        assert plain.config.reward_offset == pytest.approx(offset)


@pytest.mark.parametrize("ckpt", ARCHS, indirect=True)
def test_micro_pipeline_runs_every_stage(task, ckpt, tmp_path):
    """SFT from the checkpoint, candidates + labels, RM, PPO, evaluate: a few steps each, on this architecture."""
    run_micro_pipeline(task, ckpt["dir"], tmp_path)
    assert json.loads((tmp_path / "sft" / "config.json").read_text())["vocab_size"] == len(
        load_tokenizer(str(ckpt["dir"])))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_vocabulary_padded_past_the_tokenizer_is_never_sampled(task, tmp_path, arch):
    """An embedding padded 112 rows past a 402-token tokenizer and a flat output (the head zeroed: every id equally
    likely, as in a barely trained model): the padded ids are masked in the sampler and in every log-prob, so no
    stage writes one (label.py's pairs.jsonl was where train_rm.py stopped), the sampler's log-probs are a fresh
    forward's under the mask, and the micro pipeline runs through."""
    tok, pad = task["tok"], 112
    torch.manual_seed(0)
    config = make_config(arch, tok)
    config.vocab_size = len(tok) + pad
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()  # flat: a padded id would be sampled 22% of the time
    model.save_pretrained(tmp_path / "hub")
    tok.save_pretrained(tmp_path / "hub")
    m = load_causal_lm(str(tmp_path / "hub")).eval()
    assert m.vocab_limit == len(tok)
    q_ids, q_mask = pad_batch(queries(task), tok.pad_token_id, side="left")
    gen = generate(m, q_ids, q_mask, 40, tok.eos_token_id, tok.pad_token_id, temperature=1.0,
                   seeds=row_seeds(1, n=len(q_ids)), stop_at_eos=False)
    assert gen.tokens.max() < len(tok) and gen.tokens.numel() == 5 * 40
    ids, mask = torch.cat([q_ids, gen.tokens], 1), torch.cat([q_mask, gen.mask], 1)
    with torch.no_grad():
        raw = m(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, q_ids.shape[1] - 1:-1]
        masked = raw.clone()
        masked[..., len(tok):] = float("-inf")
        want = logprobs_from_logits(masked, gen.tokens, 1.0) * gen.mask  # 0 after a row's EOS
        torch.testing.assert_close(gen.logprobs, want, atol=1e-5, rtol=0)
        unmasked = logprobs_from_logits(raw, gen.tokens, 1.0) * gen.mask
        assert ((unmasked - gen.logprobs)[gen.mask.bool()] < -0.1).all()  # the mask matters here: 22% of the mass
    runs = tmp_path / "runs"
    run_micro_pipeline(task, tmp_path / "hub", runs)
    pairs = [json.loads(x) for x in (runs / "labels" / "pairs.jsonl").read_text().splitlines()]
    n_tokens = len(load_tokenizer(str(runs / "sft")))
    assert max(t for p in pairs for k in ("tokens_a", "tokens_b") for t in p[k]) < n_tokens


def run_micro_pipeline(task, model_dir, runs):
    d = task["dir"]
    common = ["--preset", "micro", "--task-dir", ""]
    sft = train_sft.main(parse_config(train_sft.Config, train_sft.PRESETS, [
        *common, "--dataset", str(d / "sft"), "--model", str(model_dir), "--out-dir", str(runs / "sft"),
        "--max-steps", "4", "--n-judge", "4", "--n-val", "8", "--max-query-tokens", "120"]))
    assert sft["steps"] == 4
    label.main(parse_config(label.Config, label.PRESETS, [
        *common, "--comparisons", str(d / "comparisons"), "--sft-path", str(runs / "sft"), "--out-dir",
        str(runs / "labels"), "--max-posts", "24", "--max-query-tokens", "120"]))
    rm = train_rm.main(parse_config(train_rm.Config, train_rm.PRESETS, [
        "--preset", "micro", "--sft-path", str(runs / "sft"), "--labels-path", str(runs / "labels" / "pairs.jsonl"),
        "--comparisons", str(d / "comparisons"), "--reference-dataset", str(d / "sft"), "--out-dir",
        str(runs / "rm"), "--max-steps", "4", "--batch-size", "4", "--micro-batch-size", "4",
        "--max-query-tokens", "120"]))
    assert abs(rm["reference_reward_mean_after"]) < 1e-3
    assert rm["padding_invariance_max_abs_diff"] < 1e-4
    ppo = train_ppo.main(parse_config(train_ppo.Config, train_ppo.PRESETS, [
        *common, "--dataset", str(d / "sft"), "--sft-path", str(runs / "sft"), "--rm-path", str(runs / "rm"),
        "--value-path", str(runs / "sft"), "--out-dir", str(runs / "ppo"), "--total-episodes", "16",
        "--ppo-epochs", "1", "--max-query-tokens", "120"]))
    assert ppo["updates"] == 1
    # one optimizer step, taken after the losses: the sampler's old log-probs are the policy's own, exactly
    first = json.loads((runs / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["ppo/approx_kl"] == pytest.approx(0.0, abs=1e-5)
    assert first["ppo/ratio_mean"] == pytest.approx(1.0, abs=1e-5) and first["ppo/clipfrac"] == 0.0
    ev = evaluate.main(parse_config(evaluate.Config, evaluate.PRESETS, [
        *common, "--runs-dir", str(runs), "--dataset", str(d / "sft"), "--comparisons", str(d / "comparisons"),
        "--out-dir", str(runs / "eval"), "--max-query-tokens", "120"]))
    assert 0.0 <= ev["win_rate/ppo_vs_sft"] <= 1.0 and ev["rm_acc_human_conf8/rm"] is not None
