"""minirlaif/run.py, the run machinery every stage shares, on a toy stage: skip only on the same config and the
same inputs (by content), resume only what the same config made from the same inputs, an input still being
written refused, a NaN never checkpointed, and the command line's one-line errors and Ctrl-C message."""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from minirlaif.config import Positive, UserError
from minirlaif.run import Run


@dataclass
class Cfg:
    preset: str = "tiny"
    """which preset"""
    out_dir: str = ""
    """where it goes"""
    seed: int = 1
    """seeds everything"""
    resume: bool = True
    """continue a checkpoint"""
    lr: Positive[float] = 0.1
    """learning rate"""
    steps: Positive[int] = 6
    """optimizer steps"""
    checkpoint_every: Positive[int] = 2
    """steps between checkpoints"""


class Stop(Exception):
    """A kill of the process, simulated: nothing after it runs."""


def toy_stage(cfg: Cfg, data: Path, stop_at: int | None = None, calls: list | None = None) -> dict:
    """A stage as the trainers are written: a linear model fit to the numbers in `data`, with a counter."""
    run = Run(cfg, "toy", inputs={"data": data})
    if run.finished:
        return run.finished
    if calls is not None:
        calls.append(cfg)
    xs = torch.tensor([float(x) for x in data.read_text().split()])
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    counts = {"seen": 0}
    start = run.resume(model=model, optimizer=opt, counts=counts)
    for step in run.steps(start, cfg.steps):
        noise = torch.randn(len(xs)) * 0.01  # the global RNG: a resumed run must draw what it would have
        loss = ((model(xs[:, None])[:, 0] - 2 * xs - noise) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        counts["seen"] += len(xs)
        run.log(step + 1, {"loss": loss.item()})
        run.checkpoint(step + 1)
        if stop_at == step + 1:
            raise Stop
    return run.save({"w": model.weight.item(), "b": model.bias.item(), "seen": counts["seen"]})


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "data.txt"
    p.write_text("1 2 3 4")
    return p


def test_a_finished_run_is_skipped_only_for_the_same_config_and_inputs(tmp_path, data, capsys):
    cfg, calls = Cfg(out_dir=str(tmp_path / "out")), []
    first = toy_stage(cfg, data, calls=calls)
    assert toy_stage(cfg, data, calls=calls) == first and len(calls) == 1
    assert "is finished with this config on these inputs; skipping" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["inputs"]["data"] == {"path": str(data), "sha256": manifest["inputs"]["data"]["sha256"]}
    # the same bytes written again (a new mtime): the same content, still skipped
    data.write_text("1 2 3 4")
    toy_stage(cfg, data, calls=calls)
    assert len(calls) == 1
    # other content: run again, saying which input changed
    data.write_text("1 2 3 5")
    again = toy_stage(cfg, data, calls=calls)
    assert len(calls) == 2 and again != first
    assert f"its input data ({data}) changed since; running again" in capsys.readouterr().out
    # another config runs again; so does --no-resume
    toy_stage(replace(cfg, lr=0.05), data, calls=calls)
    toy_stage(replace(cfg, lr=0.05, resume=False), data, calls=calls)
    assert len(calls) == 4


def test_a_stopped_run_resumes_to_the_uninterrupted_result(tmp_path, data, capsys):
    ref = toy_stage(Cfg(out_dir=str(tmp_path / "ref")), data)
    cfg = Cfg(out_dir=str(tmp_path / "out"))
    with pytest.raises(Stop):
        toy_stage(cfg, data, stop_at=5)  # checkpoint at step 4, then steps 5's row, then the "kill"
    out = tmp_path / "out"
    assert torch.load(out / "checkpoint" / "state.pt")["step"] == 4 and not (out / "metrics.json").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5
    got = toy_stage(cfg, data)
    assert "toy: resumed from" in capsys.readouterr().out
    got.pop("peak_rss_gb"), ref.pop("peak_rss_gb")  # (this process's memory: not what the stage computes)
    assert got == pytest.approx(ref, abs=0) and got["seen"] == 6 * 4  # the counter went through the checkpoint
    rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(out) == rows(tmp_path / "ref")  # step 5 once, with the value the uninterrupted run logged
    assert not (out / "checkpoint").exists()  # the saved model supersedes it


def test_a_checkpoint_of_another_config_is_refused_and_of_other_inputs_started_over(tmp_path, data, capsys):
    cfg = Cfg(out_dir=str(tmp_path / "out"))
    with pytest.raises(Stop):
        toy_stage(cfg, data, stop_at=3)
    with pytest.raises(UserError, match=r"holds an unfinished run with a different config \(lr differ\); rerun"):
        toy_stage(replace(cfg, lr=0.2), data)
    # the input changed under the unfinished run: its checkpoint is never resumed, the stage starts over
    data.write_text("1 2 3 5")
    got = toy_stage(cfg, data)
    assert "the input data changed since the unfinished run" in capsys.readouterr().out
    assert got == toy_stage(Cfg(out_dir=str(tmp_path / "fresh")), data)
    # --no-resume starts over too, even with other flags
    with pytest.raises(Stop):
        toy_stage(cfg := replace(cfg, steps=8), data, stop_at=3)
    assert toy_stage(replace(cfg, lr=0.2, resume=False), data)["seen"] == 8 * 4


def test_an_input_another_stage_is_still_writing_is_refused(tmp_path, data):
    upstream = tmp_path / "up"
    with pytest.raises(Stop):
        toy_stage(Cfg(out_dir=str(upstream)), data, stop_at=1)
    model_file = upstream / "metrics.jsonl"  # any file of the unfinished stage, as a downstream input
    with pytest.raises(UserError, match=f"its input data {model_file} is not finished: the run in {upstream} started"):
        toy_stage(Cfg(out_dir=str(tmp_path / "down")), model_file)


def test_a_bad_config_value_is_refused_when_main_is_called_from_code(tmp_path, data):
    with pytest.raises(UserError, match="--lr must be > 0, got -1.0"):
        toy_stage(Cfg(out_dir=str(tmp_path / "out"), lr=-1.0), data)


def test_non_finite_values_are_never_checkpointed(tmp_path, data):
    cfg = Cfg(out_dir=str(tmp_path / "out"), lr=1e30, checkpoint_every=1)  # huge weights at 1, inf after
    with pytest.raises(UserError, match="non-finite values in the state of step ") as e:
        toy_stage(cfg, data)
    saved = torch.load(tmp_path / "out" / "checkpoint" / "state.pt")
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    assert f"the checkpoint of step {saved['step']} in" in str(e.value)


SCRIPT = textwrap.dedent('''
    import sys, time
    from dataclasses import dataclass
    from minirlaif.config import Positive, UserError
    from minirlaif.data import DataError
    from minirlaif.run import Run, cli

    @dataclass
    class Cfg:
        out_dir: str = "out"
        """where"""
        seed: int = 1
        """seed"""
        resume: bool = True
        """resume"""
        what: str = "ok"
        """what to do"""
        checkpoint_every: Positive[int] = 10
        """checkpoints"""

    def main(cfg):
        run = Run(cfg, "demo")
        for step in run.steps(0, 50):
            if cfg.what == "data" and step == 2:
                raise DataError("data.jsonl:7: field 'post' must be str")
            if cfg.what == "interrupt" and step == 3:
                raise KeyboardInterrupt
            if cfg.what == "bug" and step == 1:
                raise ZeroDivisionError("a bug")
        return run.save({})

    cli(main, Cfg, {})
''')


@pytest.mark.parametrize("what,code,stderr", [
    ("data", 1, "demo.py: data.jsonl:7: field 'post' must be str\n"),
    ("interrupt", 130, "\ninterrupted at step 3 of 50; rerun the same command to resume\n"),
    ("--checkpoint-every=0", 1,
     "demo.py: bad flag values (one line per field):\n  --checkpoint-every must be > 0, got 0\n"),
])
def test_the_command_line_says_one_thing_for_a_users_mistake(tmp_path, what, code, stderr):
    (tmp_path / "demo.py").write_text(SCRIPT)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "MINIRLAIF_DEBUG": ""}
    args = [what] if what.startswith("--") else ["--what", what]
    out = subprocess.run([sys.executable, "demo.py", *args], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert (out.returncode, out.stderr) == (code, stderr)
    # --debug shows the traceback (the mistake's own exception)
    debug = subprocess.run([sys.executable, "demo.py", *args, "--debug"], cwd=tmp_path, env=env, capture_output=True,
                           text=True)
    assert "Traceback" in debug.stderr or what.startswith("--")


def test_a_bug_keeps_its_traceback(tmp_path):
    (tmp_path / "demo.py").write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run([sys.executable, "demo.py", "--what", "bug"], cwd=tmp_path, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 1 and "Traceback" in out.stderr and "ZeroDivisionError: a bug" in out.stderr
