"""minirlaif/fsdp.py: FSDP2 (fully_shard) on CPU with gloo, 1 and 2 torchrun ranks against one plain process.

tests/fsdp_worker.py trains four tiny models (GPT-2 and Llama LMs, a GPT-2 reward model through the shared-prefix
path, a LoRA-like Llama value model) with AdamW and clipping, checkpointing every step; `fsdp_worker.train_plain`
takes the same steps unsharded in this process. Checked: the same gradient norms, weights and optimizer state on
1 and 2 ranks as in one plain process; the KV-cache sampler and a frozen forward on a sharded policy; the rank-0
full state dict as a checkpoint plain transformers loads; a NaN in one rank's shard is seen by every rank; a run
killed mid-checkpoint resumes to the same result. About 60 s on 2 cores (six torchrun launches of ~10 s each).
"""

import os
import subprocess
import sys
from pathlib import Path

import fsdp_worker as worker
import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, Gemma2Config, GPT2Config,
                          GPTNeoXConfig, LlamaConfig, Qwen2Config)

from minirlaif import fsdp
from minirlaif.generation import generate
from minirlaif.models import causal_lm_logits

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
ENV.pop("MINIRLAIF_KILL_AT", None)


def torchrun(nproc: int, out: Path, **env) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), str(Path(worker.__file__)), str(out)], cwd=ROOT, env={**ENV, **env},
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def plain():
    return worker.train_plain()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{world size: the output directory of an uninterrupted run of fsdp_worker.py on that many ranks}."""
    out = {}
    for nproc in (1, 2):
        out[nproc] = tmp_path_factory.mktemp(f"world{nproc}")
        res = torchrun(nproc, out[nproc])
        assert res.returncode == 0, res.stderr[-4000:]
    return out


def results(out: Path) -> dict:
    return torch.load(out / "results.pt", weights_only=True)


def test_one_and_two_ranks_take_the_steps_of_one_plain_process(plain, runs):
    norms = [n for case in worker.CASES for n in plain[case]["norms"]]
    assert min(norms) < worker.MAX_NORM < max(norms)  # some steps clipped, some not: the gradient's scale matters
    for nproc, out in runs.items():
        got = results(out)
        assert got["world"] == nproc and got["resumed_from"] == 0
        for case in worker.CASES:
            want, have = plain[case], got[case]
            # the gradient norm is over every rank's shards, of the sum over ranks (FSDP's default mean: 1/2 of it)
            assert have["norms"] == pytest.approx(want["norms"], rel=1e-5), (nproc, case)
            assert have["weights"].keys() == want["weights"].keys()
            for k in want["weights"]:
                torch.testing.assert_close(have["weights"][k], want["weights"][k], atol=2e-5, rtol=0, msg=k)
            assert have["optim"].keys() == want["optim"].keys(), case  # the trainable parameters, by name
            for k, state in want["optim"].items():
                for s in ("step", "exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(have["optim"][k][s], state[s], atol=1e-7, rtol=1e-4, msg=(case, k, s))


def test_frozen_parameters_stay_frozen_and_the_rest_trains(runs):
    start, end = worker.build("lora").state_dict(), results(runs[2])["lora"]["weights"]
    trainable = {n for n, p in worker.build("lora").named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[-1] for n in trainable} == {"A", "B", "weight"}  # the adapters and the score head
    for k in start:
        assert torch.equal(start[k], end[k]) == (k not in trainable), k


def test_sampling_and_a_frozen_forward_on_a_sharded_policy_equal_the_plain_model(runs):
    policy = worker.sampling_policy()
    lengths = []
    for rank in (0, 1):
        got = torch.load(runs[2] / f"samples_rank{rank}.pt", weights_only=True)
        ids, mask, seeds = worker.sample_queries(rank)
        want = generate(policy, ids, mask, max_new_tokens=12, eos_id=worker.EOS, pad_id=worker.PAD, seeds=seeds)
        assert torch.equal(got["tokens"], want.tokens)
        torch.testing.assert_close(got["logprobs"], want.logprobs, atol=1e-6, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(got["frozen_logits"], causal_lm_logits(policy, ids, mask)[0], atol=1e-6, rtol=0)
        assert got["resharded"]  # a frozen model's units all free their full parameters after forward
        lengths.append(want.tokens.shape[1])
    # the ranks ran different numbers of forwards: one collective per forward would have hung (fsdp.gathered)
    assert lengths[0] != lengths[1]


def test_the_rank0_full_state_dict_is_a_checkpoint_plain_transformers_loads(runs):
    got = results(runs[2])
    lm = AutoModelForCausalLM.from_pretrained(runs[2] / "pretrained_gpt2")
    rm = AutoModelForSequenceClassification.from_pretrained(runs[2] / "pretrained_rm")
    assert lm.config.architectures == ["GPT2LMHeadModel"]  # not fully_shard's FSDPGPT2LMHeadModel
    assert rm.config.architectures == ["GPT2ForSequenceClassification"]
    assert lm.lm_head.weight is lm.transformer.wte.weight  # still tied
    for model, case in ((lm, "gpt2"), (rm, "rm")):
        loaded = model.state_dict()
        assert loaded.keys() == got[case]["weights"].keys()
        for k, v in got[case]["weights"].items():
            assert torch.equal(loaded[k], v), (case, k)


def test_a_nan_in_one_rank_shard_is_reported_on_every_rank(runs):
    for nproc, out in runs.items():
        for rank in range(nproc):
            assert torch.load(out / f"non_finite_rank{rank}.pt") == ["llama.model.model.layers.1.mlp.up_proj.weight"]


@pytest.mark.parametrize("kill_at,resumes_from,nproc", [
    # rank 0 dies with step 2's whole DCP checkpoint in its temporary directory; resumed on 2 ranks
    ("sharded_checkpoint:2", 1, 2),
    # every rank dies after step 3's DCP directory got its final name, before state.pt names it; resumed on 1 rank
    # (DCP reshards: each rank reads the slices it now holds)
    ("checkpoint_rng:3", 2, 1),
])
def test_a_killed_two_rank_run_resumes_to_the_uninterrupted_result(plain, runs, tmp_path, kill_at, resumes_from,
                                                                   nproc):
    killed = torchrun(2, tmp_path, MINIRLAIF_KILL_AT=kill_at)
    assert killed.returncode != 0 and not (tmp_path / "results.pt").exists(), killed.stderr[-3000:]
    ckpt = tmp_path / "checkpoint"
    assert torch.load(ckpt / "state.pt", weights_only=True)["step"] == resumes_from
    if kill_at.startswith("sharded"):
        assert (ckpt / "sharded_step2.tmp" / ".metadata").exists()  # whole to DCP, but not under the final name
    else:
        assert (ckpt / "sharded_step3").is_dir()
    resumed = torchrun(nproc, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from step {resumes_from}" in resumed.stdout
    got = results(tmp_path)
    assert got["resumed_from"] == resumes_from and got["world"] == nproc
    for case in worker.CASES:
        if nproc == 2:  # the same ranks: bit for bit what the uninterrupted run computed
            want = results(runs[2])[case]
            assert got[case]["norms"] == want["norms"]
            for k, v in want["weights"].items():
                assert torch.equal(got[case]["weights"][k], v), (case, k)
        else:  # the rest of the run on one rank: the plain process's steps, to the same tolerance as above
            want = plain[case]
            assert got[case]["norms"] == pytest.approx(want["norms"], rel=1e-5), case
            for k, v in want["weights"].items():
                torch.testing.assert_close(got[case]["weights"][k], v, atol=2e-5, rtol=0, msg=k)
    assert sorted(p.name for p in ckpt.glob("sharded_step*")) == [f"sharded_step{worker.STEPS - 1}",
                                                                  f"sharded_step{worker.STEPS}"]


@pytest.mark.parametrize("config,n_layers", [
    (GPT2Config(n_layer=3, n_embd=16, n_head=2), 3),
    (LlamaConfig(num_hidden_layers=3, hidden_size=16, intermediate_size=32, num_attention_heads=2), 3),
    (Qwen2Config(num_hidden_layers=3, hidden_size=16, intermediate_size=32, num_attention_heads=2), 3),
    (Gemma2Config(num_hidden_layers=3, hidden_size=16, intermediate_size=32, num_attention_heads=2, head_dim=8), 3),
    (GPTNeoXConfig(num_hidden_layers=3, hidden_size=16, intermediate_size=32, num_attention_heads=2), 3),
])
def test_transformer_blocks_are_the_decoder_layers_of_every_architecture(config, n_layers):
    config.vocab_size, config.num_labels = 64, 1
    for auto in (AutoModelForCausalLM, AutoModelForSequenceClassification):
        model = auto.from_config(config)
        layers = next(m for m in model.base_model.children() if isinstance(m, torch.nn.ModuleList))
        assert fsdp.transformer_blocks(model) == list(layers) and len(layers) == n_layers
