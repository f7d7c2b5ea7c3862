"""--lora-rank and --fsdp in train_sft.py, train_rm.py and train_ppo.py: micro runs end to end, on the CPU (gloo).

Each stage runs four ways: one plain process, FSDP2 over 2 torchrun ranks, LoRA in one process, LoRA + FSDP2 over
2 ranks. Checked: the sharded runs take the one-process steps (every metrics.jsonl row, the final metrics and the
saved weights and adapters, to fp32 tolerance); PPO's FSDP2 run on 1 rank too; LoRA trains the adapters only (the
merged PPO policy is the SFT model plus (alpha / r) B A of its saved adapter, every other weight the SFT model's),
its reference is the SFT model (the first KL is 0), and `peft` loads the adapter onto the SFT model with the merged
checkpoint's logits; a 2-rank LoRA + FSDP2 PPO run killed mid-checkpoint resumes to the uninterrupted result, bit
for bit; the flags' mistakes are one line each. About 2.5 minutes on 2 cores (17 launches).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minirlaif import synthetic

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("MINIRLAIF_KILL_AT", None)
TASK = synthetic.TaskConfig(n_train=200, n_validation=20, n_test=4, n_comparison_posts_train=80,
                            n_comparison_posts_validation=40)
RANK, ALPHA = 4, 8.0
LORA = ["--lora-rank", str(RANK), "--lora-alpha", str(ALPHA)]
VARIANTS = {"plain": (0, []), "fsdp2": (2, ["--fsdp"]), "lora": (0, LORA), "lora_fsdp2": (2, ["--fsdp", *LORA])}
VOLATILE = ("time", "_s", "per_s", "peak_rss_gb")  # wall-clock and memory: not what the ranks compute


def launch(script: str, args: list[str], nproc: int = 0, **env) -> subprocess.CompletedProcess:
    """`python script args` (nproc 0), or under torchrun on `nproc` ranks."""
    head = [sys.executable] if not nproc else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                               "--nproc-per-node", str(nproc)]
    return subprocess.run([*head, script, *args], cwd=ROOT, env={**ENV, **env}, capture_output=True, text=True,
                          timeout=600)


def stage_args(stage: str, d: Path, out: Path) -> list[str]:
    common = ["--preset", "micro", "--out-dir", str(out)]
    if stage == "sft":
        return [*common, "--task-dir", str(d / "data"), "--dataset", str(d / "data" / "sft"), "--max-steps", "6",
                "--eval-every", "3", "--checkpoint-every", "3", "--n-judge", "4"]
    if stage == "rm":
        return [*common, "--feedback", "human", "--sft-path", str(d / "sft" / "plain"),
                "--labels-path", str(d / "no_ai_labels.jsonl"), "--comparisons", str(d / "data" / "comparisons"),
                "--reference-dataset", str(d / "data" / "sft")]
    return [*common, "--task-dir", "", "--dataset", str(d / "data" / "sft"), "--sft-path", str(d / "sft" / "plain"),
            "--rm-path", str(d / "rm" / "plain")]


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    synthetic.write_task(d / "data", TASK)
    return d


def run_variants(stage: str, d: Path) -> dict[str, Path]:
    outs = {}
    for name, (nproc, flags) in VARIANTS.items():
        outs[name] = d / stage / name
        res = launch(f"train_{stage}.py", [*stage_args(stage, d, outs[name]), *flags], nproc)
        assert res.returncode == 0, (stage, name, res.stderr[-4000:])
    return outs


@pytest.fixture(scope="module")
def sft(d):
    return run_variants("sft", d)


@pytest.fixture(scope="module")
def rm(d, sft):
    return run_variants("rm", d)


@pytest.fixture(scope="module")
def ppo(d, sft, rm):
    return run_variants("ppo", d)


@pytest.fixture(scope="module")
def stages(sft, rm, ppo):
    return {"sft": sft, "rm": rm, "ppo": ppo}


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.endswith(VOLATILE)
            and not k.startswith(("time", "eps"))}


def assert_same_run(a: Path, b: Path, rel: float = 1e-4) -> None:
    """Two runs of one stage took the same steps: metrics rows, final metrics, saved weights (and adapters)."""
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for k in numbers(x):
            assert y[k] == pytest.approx(x[k], rel=rel, abs=1e-6), (a.name, x["step"], k)
    ma, mb = (numbers(json.loads((p / "metrics.json").read_text())) for p in (a, b))
    assert ma.keys() == mb.keys()
    for k in ma:
        assert mb[k] == pytest.approx(ma[k], rel=rel, abs=1e-6), (a.name, k)
    for f in ("model.safetensors", "adapter/adapter_model.safetensors"):
        if (a / f).exists() or (b / f).exists():
            wa, wb = load_file(a / f), load_file(b / f)
            assert wa.keys() == wb.keys(), f
            # atol 1e-4: AdamW divides by sqrt(v) + eps, so where a gradient is near 0 the ranks' other summation
            # order can move one element by up to a step of lr (measured on an AVX2 CPU: 1 of 16,384, 2.7e-5)
            for k in wa:
                torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-4, msg=f"{a.name} {f} {k}")


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_two_fsdp_ranks_take_the_steps_of_one_process(stages, stage):
    outs = stages[stage]
    assert_same_run(outs["plain"], outs["fsdp2"])
    assert_same_run(outs["lora"], outs["lora_fsdp2"])
    for name in ("fsdp2", "lora_fsdp2"):  # every rank finished: no checkpoint left, the world size recorded
        assert not (outs[name] / "checkpoint").exists()
        assert json.loads((outs[name] / "manifest.json").read_text())["config"]["fsdp"] is True


def test_fsdp_on_one_rank_is_the_plain_run(d, ppo):
    out = d / "ppo" / "fsdp1"
    res = launch("train_ppo.py", [*stage_args("ppo", d, out), "--fsdp"], nproc=1)
    assert res.returncode == 0, res.stderr[-4000:]
    assert_same_run(ppo["plain"], out)


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_lora_runs_train_the_adapters_and_save_both_formats(stages, stage):
    out = stages[stage]["lora"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", RANK, ALPHA)
    assert config["task_type"] == ("SEQ_CLS" if stage == "rm" else "CAUSAL_LM")
    assert config["modules_to_save"] == (["score"] if stage == "rm" else None)
    merged, plain = load_file(out / "model.safetensors"), load_file(stages[stage]["plain"] / "model.safetensors")
    assert merged.keys() == plain.keys()  # the base model's own keys: no adapter left in the checkpoint
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * len(config["target_modules"]) + (1 if stage == "rm" else 0)  # A and B; score.weight
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0: it trained


def test_lora_ppo_policy_is_sft_plus_its_adapter_and_its_reference_is_sft(d, ppo):
    """The merged policy is W + (alpha / r) B A of the saved adapter on every adapted layer and exactly the SFT
    model's weight everywhere else; the first update's KL to the reference (adapters off) is 0."""
    out = ppo["lora"]
    merged, sft = load_file(out / "model.safetensors"), load_file(d / "sft" / "plain" / "model.safetensors")
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    adapted = set()
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = adapter[key.replace("lora_A", "lora_B")]
        delta = (ALPHA / RANK) * (b @ a)  # (out, in)
        delta = delta.T  # GPT-2's Conv1D stores (in, out)
        torch.testing.assert_close(merged[f"{name}.weight"], sft[f"{name}.weight"] + delta, rtol=0, atol=1e-6)
        adapted.add(f"{name}.weight")
    assert adapted
    for key in merged.keys() - adapted:
        assert torch.equal(merged[key], sft[key]), key
    assert rows(out)[0]["objective/kl"] == pytest.approx(0, abs=1e-6)


def test_peft_loads_the_ppo_adapter_onto_sft_with_the_merged_logits(d, ppo):
    peft = pytest.importorskip("peft") if os.environ.get("CI", "").lower() not in ("1", "true") else __import__("peft")
    from transformers import AutoModelForCausalLM

    out = ppo["lora"]
    base = AutoModelForCausalLM.from_pretrained(d / "sft" / "plain").eval()
    with_adapter = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(1, 33)[None] % merged.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0,
                                   atol=1e-5)


def test_killed_two_rank_lora_fsdp_run_resumes_bit_for_bit(d, ppo):
    """Killed on rank 0 inside the second sharded checkpoint (every shard written under its temporary name), the
    rerun resumes from the first and ends where the uninterrupted run ended."""
    out = d / "ppo" / "killed"
    args = [*stage_args("ppo", d, out), "--fsdp", *LORA]
    killed = launch("train_ppo.py", args, 2, MINIRLAIF_KILL_AT="sharded_checkpoint:2")
    assert killed.returncode != 0 and not (out / "metrics.json").exists(), killed.stderr[-3000:]
    ckpt = out / "checkpoint"
    assert torch.load(ckpt / "state.pt", weights_only=True)["step"] == 1
    assert (ckpt / "sharded_step1").is_dir() and (ckpt / "sharded_step2.tmp" / ".metadata").exists()
    resumed = launch("train_ppo.py", args, 2)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout and "at step 1" in resumed.stdout
    want = ppo["lora_fsdp2"]
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith(("time", "eps"))} for r in rs]  # noqa: E731
    assert strip(rows(out)) == strip(rows(want))
    for f in ("model.safetensors", "adapter/adapter_model.safetensors"):
        got, ref = load_file(out / f), load_file(want / f)
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), f


def test_flag_mistakes_are_one_line(d, tmp_path):
    res = launch("train_sft.py", [*stage_args("sft", d, tmp_path / "a"), "--fsdp"])
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        "sft: --fsdp shards over torchrun's ranks: launch it with torchrun --nproc_per_node N (N >= 1)"]
    res = launch("train_sft.py", [*stage_args("sft", d, tmp_path / "b"), "--lora-rank", "2", "--lora-targets",
                                  "q_proj"])
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith("sft: --lora-targets q_proj: LoRA targets")
    assert "c_attn" in lines[0]  # it names the layers there are
