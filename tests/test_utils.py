"""Shared helpers: the config CLI and its rules, resumable jsonl, hashes."""

import dataclasses
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from minirlaif import config, utils
from minirlaif.config import parse_config


@dataclass
class Cfg:
    preset: str = "tiny"
    """which preset"""
    out_dir: str = "runs/{preset}/x"
    """where outputs go"""
    lr: float = 1e-3
    """peak learning rate"""
    steps: int = 5
    """optimizer steps"""
    resume: bool = True
    """continue from a checkpoint"""
    policy: list[str] = None
    """NAME=PATH, repeatable"""


PRESETS = {"big": {"lr": 1e-5, "steps": 100}}


def test_parse_config_layers_defaults_presets_flags():
    assert config.parse_config(Cfg, PRESETS, []) == Cfg(out_dir="runs/tiny/x")
    c = config.parse_config(Cfg, PRESETS, ["--preset", "big", "--steps", "7", "--no-resume"])
    assert (c.lr, c.steps, c.resume, c.out_dir) == (1e-5, 7, False, "runs/big/x")
    c = config.parse_config(Cfg, PRESETS, ["--policy", "a=1", "--policy", "b=2", "--out-dir", "/tmp/o"])
    assert c.policy == ["a=1", "b=2"] and c.out_dir == "/tmp/o"


def test_help_lists_every_field_with_its_doc(capsys):
    with pytest.raises(SystemExit):
        config.parse_config(Cfg, PRESETS, ["--help"])
    out = capsys.readouterr().out
    for flag, doc in [("--out-dir", "where outputs go"), ("--lr", "peak learning rate"), ("--no-resume", ""),
                      ("--policy", "NAME=PATH")]:
        assert flag in out and doc in out
    assert "big: 1e-05" in out  # preset overrides are shown


@dataclass
class PctCfg:
    preset: str = "tiny"
    """which preset"""
    holdout: str = "10%"
    """share of posts held out, e.g. 10% (%(prog)s and %d are text too)"""


def test_help_with_percent_signs(capsys):
    # argparse %-formats help strings: a bare % in a doc, a default or a preset override used to crash --help
    with pytest.raises(SystemExit) as exit_:
        config.parse_config(PctCfg, {"big": {"holdout": "5%"}}, ["--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "share of posts held out, e.g. 10% (%(prog)s and %d are text too) [big: 5%] (default: 10%)" in out
    assert config.parse_config(PctCfg, {}, ["--holdout", "20%"]).holdout == "20%"


def test_field_docs():
    assert config.field_docs(Cfg)["steps"] == "optimizer steps"


def test_read_jsonl_resumable_cuts_partial_last_line(tmp_path):
    p = tmp_path / "rows.jsonl"
    utils.append_jsonl(p, [{"id": 1}, {"id": 2}])
    with open(p, "a") as fh:
        fh.write('{"id": 3, "tru')  # a kill mid-write
    assert utils.read_jsonl_resumable(p) == [{"id": 1}, {"id": 2}]
    assert p.read_text() == '{"id": 1}\n{"id": 2}\n'
    utils.append_jsonl(p, [{"id": 3}])
    assert [r["id"] for r in utils.read_jsonl_resumable(p)] == [1, 2, 3]


def test_read_jsonl_resumable_rejects_corruption_in_the_middle(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text('{"id": 1}\nnot json\n{"id": 3}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2"):
        utils.read_jsonl_resumable(p)


def test_sha256_path_ignores_volatile_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    h = utils.sha256_path(tmp_path)
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.pt").write_bytes(b"x")
    assert utils.sha256_path(tmp_path) == h
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    assert utils.sha256_path(tmp_path) != h
    assert utils.sha256_path(tmp_path / "missing") is None


def test_autocast_is_bf16_on_cpu_only_when_enabled():
    """`--bf16` means bf16 matmuls on CPU too; off means fp32, untouched."""
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(32, 64, generator=g), torch.randn(32, generator=g), torch.randn(8, 64, generator=g)
    fp32 = F.linear(x, w, b)
    with utils.autocast("cpu", enabled=False):
        assert not torch.is_autocast_enabled("cpu")
        assert torch.equal(F.linear(x, w, b), fp32)
    with utils.autocast(torch.device("cpu"), enabled=True):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        out = F.linear(x, w, b)
    assert not torch.is_autocast_enabled("cpu")
    # the product ran on bf16 inputs: exactly torch's own bf16 linear, and only bf16-close to fp32
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()))
    assert not torch.equal(out.float(), fp32)
    torch.testing.assert_close(out.float(), fp32, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("script", ["train_sft", "train_rm", "train_ppo", "evaluate"])
def test_bf16_is_on_for_gpt2_large_and_off_for_the_cpu_presets(script):
    import importlib

    mod = importlib.import_module(script)
    for preset, bf16 in (("tiny", False), ("micro", False), ("gpt2-large", True)):
        assert config.parse_config(mod.Config, mod.PRESETS, ["--preset", preset]).bf16 is bf16, preset
    assert config.parse_config(mod.Config, mod.PRESETS, ["--bf16"]).bf16 is True


# ----------------------------------------------------------------------------------------------------------------
# parse-time validation of every stage's config

STAGES = ("train_sft", "label", "train_rm", "train_ppo", "evaluate")
# numeric fields any value of which can be meant (a seed, a signed bias or penalty)
UNCONSTRAINED = {"seed", "missing_eos_penalty", "rule_position_bias"}


def stage_modules():
    import importlib

    return [importlib.import_module(name) for name in STAGES]


def test_every_numeric_field_of_every_stage_has_a_rule_and_every_preset_passes():
    from typing import get_type_hints

    from minirlaif.config import config_errors, rules

    for mod in stage_modules():
        hints, have = get_type_hints(mod.Config), rules(mod.Config)
        for f in dataclasses.fields(mod.Config):
            if hints[f.name] in (int, float):
                assert f.name in have or f.name in UNCONSTRAINED, (mod.__name__, f.name)
        for preset in ("tiny", *mod.PRESETS):
            assert config_errors(parse_config(mod.Config, mod.PRESETS, ["--preset", preset])) == []


@pytest.mark.parametrize("stage,flag,value,message", [
    ("train_sft", "--micro-batch-size", "0", "must be > 0"),
    ("train_sft", "--checkpoint-every", "0", "must be > 0"),
    ("train_sft", "--n-val", "0", "must be > 0, or -1"),
    ("train_sft", "--batch-size", "-4", "must be > 0"),
    ("train_rm", "--checkpoint-every", "0", "must be > 0"),
    ("train_rm", "--val-frac", "1.5", "must be in [0, 0.99]"),
    ("train_ppo", "--mini-batches", "0", "must be > 0"),
    ("train_ppo", "--response-length", "0", "must be > 0"),
    ("train_ppo", "--temperature", "0", "must be > 0"),
    ("train_ppo", "--temperature", "-1", "must be > 0"),
    ("train_ppo", "--lr", "nan", "must be > 0"),
    ("label", "--label-chunk", "0", "must be > 0"),
    ("label", "--temperature", "-1", "must be >= 0"),
    ("evaluate", "--n", "0", "must be > 0, or -1"),
    ("evaluate", "--judge-chunk", "-1", "must be > 0"),
])
def test_a_bad_size_is_refused_at_parse_time_naming_the_flag(stage, flag, value, message):
    import importlib

    mod = importlib.import_module(stage)
    with pytest.raises(SystemExit) as e:
        parse_config(mod.Config, mod.PRESETS, ["--preset", "micro", flag, value])
    assert f"{flag} {message}" in str(e.value)


def test_every_bad_field_gets_its_own_line():
    import train_ppo

    with pytest.raises(SystemExit) as e:
        parse_config(train_ppo.Config, train_ppo.PRESETS, ["--micro-batch-size", "0", "--mini-batches", "-1",
                                                           "--checkpoint-every", "0", "--kl-estimator", "k9"])
    lines = str(e.value).splitlines()
    assert len(lines) == 5 and [ln.split()[0] for ln in lines[1:]] == [
        "--mini-batches", "--micro-batch-size", "--kl-estimator", "--checkpoint-every"]
    # label.py's candidates may be greedy (temperature 0), PPO's sampling may not
    import label

    assert parse_config(label.Config, label.PRESETS, ["--temperature", "0"]).temperature == 0


def test_linear_lr_hand_checked():
    """Warmup 2 steps then linear decay to 10% over the remaining 8: the values by hand."""
    got = [utils.linear_lr(s, 10, 1.0, warmup_steps=2, min_lr_ratio=0.1) for s in range(10)]
    want = [0.5, 1.0] + [1 - 0.9 * k / 8 for k in range(8)]
    assert got == pytest.approx(want, abs=1e-12)
    # no warmup, decay to 0: the schedule train_ppo uses (lr * (1 - update / updates))
    assert [utils.linear_lr(s, 4, 2.0) for s in range(4)] == pytest.approx([2.0, 1.5, 1.0, 0.5])
