"""label.py: a micro run writes every file; resume after a cut or a kill (one row per id, nothing regenerated);
an API that keeps failing writes no label; --align reports labeler-human agreement; configs are not mixed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel
from test_api_faults import FakeAPI

import label
from minirlaif import synthetic
from minirlaif.generation import decode_summary
from minirlaif.openai_api import APIError
from minirlaif.models import tiny_gpt2_config, train_bpe_tokenizer
from minirlaif.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
PAIR_FIELDS = {"id", "subreddit", "title", "post", "query", "query_truncated", "summary_a", "summary_b", "p_a_ab",
               "p_a_ba", "p_a", "mass_ab", "mass_ba", "null_reason", "identical", "tokens_a", "tokens_b"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small synthetic task and a random tiny "SFT policy" (fast; its summaries are noise, which is fine)."""
    d = tmp_path_factory.mktemp("label")
    synthetic.write_task(d / "task", synthetic.TaskConfig(n_train=200, n_validation=10, n_test=10,
                                                          n_comparison_posts_train=30,
                                                          n_comparison_posts_validation=30))
    posts = [json.loads(line) for line in (d / "task" / "sft" / "train.jsonl").read_text().splitlines()]
    tok = train_bpe_tokenizer([p["post"] + " " + p["summary"] for p in posts], vocab_size=400)
    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_gpt2_config(tok, n_layer=1, n_head=2, n_embd=32, n_positions=256)).save_pretrained(d / "sft")
    tok.save_pretrained(d / "sft")
    return d


def args(setup, out, *extra):
    # --cpu-threads 0: leave the thread count alone (label.py's default of 1 would stay set for later tests)
    return ["--preset", "micro", "--task-dir", "", "--comparisons", str(setup / "task" / "comparisons"),
            "--sft-path", str(setup / "sft"), "--out-dir", str(out), "--cpu-threads", "0", *extra]


def run_main(setup, out, *extra):
    return label.main(parse_config(label.Config, label.PRESETS, args(setup, out, *extra)))


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def micro(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("micro") / "labels"
    return out, run_main(setup, out)


def test_micro_run_writes_every_file(setup, micro, capsys):
    out, metrics = micro
    for name in ("candidates.jsonl", "pairs.jsonl", "position_bias.json", "metrics.json", "manifest.json"):
        assert (out / name).exists(), name
    pairs = rows(out / "pairs.jsonl")
    assert len(pairs) == 24 and len({r["id"] for r in pairs}) == 24
    tok = AutoTokenizer.from_pretrained(setup / "sft")
    for r in pairs:
        assert PAIR_FIELDS <= set(r) and r["null_reason"] is None
        assert r["p_a"] == pytest.approx((r["p_a_ab"] + r["p_a_ba"]) / 2)
        # the stored text is exactly the decoded sample, and the query is what the policy saw
        assert decode_summary(tok, r["tokens_a"]) == r["summary_a"] and r["query"].endswith("\n\nTL;DR:")
    pb = json.loads((out / "position_bias.json").read_text())
    assert pb["n_pairs"] == 24 and 0 <= pb["consistency_rate"] <= 1 and sum(pb["abs_p_a_minus_half"]["counts"]) == 24
    for key in ("n_pairs", "n_null", "mean_p_a", "consistency_rate", "mean_p_first", "gold_agreement",
                "candidate_frac_eos", "estimated_cost", "time_s"):
        assert key in metrics, key
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["sft_model"]["sha256"] and manifest["inputs"]["comparisons"]["sha256"]
    # a rerun of the finished config is skipped
    assert run_main(setup, out)["mean_p_a"] == metrics["mean_p_a"]
    assert "skipping" in capsys.readouterr().out


def cut(path, keep, partial=True):
    """Keep `keep` rows of a jsonl file plus (as a kill would leave it) half of the next one."""
    lines = Path(path).read_text().splitlines(keepends=True)
    Path(path).write_text("".join(lines[:keep]) + (lines[keep][: len(lines[keep]) // 2] if partial else ""))


def test_resume_after_a_cut_writes_what_an_uninterrupted_run_wrote(setup, micro, tmp_path):
    full, _ = micro
    out = tmp_path / "labels"
    out.mkdir()
    for name in ("candidates.jsonl", "pairs.jsonl"):
        shutil.copy(full / name, out / name)
    cut(out / "candidates.jsonl", 13)  # mid-chunk (chunks of 8): the chunk is redrawn, its 5 rows not rewritten
    cut(out / "pairs.jsonl", 5)
    run_main(setup, out)
    for name in ("candidates.jsonl", "pairs.jsonl"):
        assert sorted(rows(out / name), key=lambda r: r["id"]) == sorted(rows(full / name), key=lambda r: r["id"])
    # the rows that were on disk are untouched (append-only)
    assert rows(out / "candidates.jsonl")[:13] == rows(full / "candidates.jsonl")[:13]


def test_a_different_config_is_refused_and_no_resume_starts_over(setup, micro, tmp_path):
    full, _ = micro
    out = tmp_path / "labels"
    shutil.copytree(full, out)
    with pytest.raises(SystemExit, match="rule_noise"):
        run_main(setup, out, "--rule-noise", "0")
    metrics = run_main(setup, out, "--rule-noise", "0", "--no-resume")
    assert metrics["n_pairs"] == 24 and len(rows(out / "pairs.jsonl")) == 24
    assert rows(out / "candidates.jsonl") == rows(full / "candidates.jsonl")  # same seed, same samples


def test_kill_during_api_labeling_then_resume_leaves_one_row_per_id(setup, tmp_path):
    api = FakeAPI(delay=0.05)
    out = tmp_path / "labels"
    cmd = [sys.executable, "label.py", *args(setup, out, "--labeler", "openai", "--api-base", api.url,
                                              "--api-model", "fake", "--max-concurrency", "2", "--label-chunk", "2",
                                              "--retry-base-delay", "0.001")]
    try:
        with open(tmp_path / "stderr.txt", "w") as err:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if (out / "pairs.jsonl").exists() and len((out / "pairs.jsonl").read_bytes().split(b"\n")) > 4:
                break
            time.sleep(0.01)
        assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (out / "metrics.json").exists(), "the run ended before it could be killed"
        before = (out / "pairs.jsonl").read_bytes()
        candidates_before = (out / "candidates.jsonl").read_bytes()
        n_requests = len(api.requests)
        api.delay = 0.0
        done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        api.close()
    pairs = rows(out / "pairs.jsonl")
    assert len(pairs) == 24 and len({r["id"] for r in pairs}) == 24
    assert (out / "pairs.jsonl").read_bytes().startswith(before.rsplit(b"\n", 1)[0])  # kept, appended after
    assert (out / "candidates.jsonl").read_bytes() == candidates_before  # nothing regenerated
    # the resumed run asked only about the pairs still missing (plus the ones in flight at the kill)
    n_before = len(before.split(b"\n")) - 1
    assert len(api.requests) - n_requests <= 2 * (24 - n_before) + 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_null"] == 0 and metrics["prompt_tokens"] == 24 * 2 * 100


def test_an_api_that_keeps_failing_writes_no_label(setup, micro, tmp_path):
    full, _ = micro
    api = FakeAPI(default="500")
    try:
        with pytest.raises(APIError, match="giving up after 2 attempts"):
            run_main(setup, tmp_path / "labels", "--labeler", "openai", "--api-base", api.url, "--api-model", "fake",
                     "--max-retries", "1", "--retry-base-delay", "0.001",
                     "--candidates", str(full / "candidates.jsonl"))
    finally:
        api.close()
    assert not (tmp_path / "labels" / "pairs.jsonl").exists() or rows(tmp_path / "labels" / "pairs.jsonl") == []
    assert not (tmp_path / "labels" / "metrics.json").exists()


def test_align_reports_agreement_with_humans(setup, tmp_path):
    out = tmp_path / "align"
    metrics = run_main(setup, out, "--align", "--rule-noise", "0", "--rule-position-bias", "0")
    pairs = rows(out / "pairs.jsonl")
    assert metrics["mode"] == "align" and len(pairs) == metrics["n_comparisons"] > 0
    assert all(r["confidence"] >= 8 and r["human_choice"] in (0, 1) for r in pairs)
    # confident simulated humans follow the rule judge's preferences, so a noiseless rule labeler agrees with them
    assert metrics["agreement"] >= 0.8 and metrics["agreement_ab"] == metrics["agreement_ba"] == metrics["agreement"]
    biased = run_main(setup, tmp_path / "biased", "--align", "--rule-noise", "0", "--rule-position-bias", "4")
    assert biased["agreement"] == metrics["agreement"]  # averaging the two orders cancels the bias exactly
    assert biased["agreement_order_mean"] < metrics["agreement"] and biased["mean_p_first"] > 0.6


def test_the_key_reaches_no_file_and_no_output_when_a_server_echoes_it(setup, micro, tmp_path, monkeypatch, capsys):
    full, _ = micro
    key = "sk-never-written-42"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    out = tmp_path / "labels"
    api = FakeAPI(default="echo")  # every rationale and top token is the request's Authorization header
    try:
        metrics = run_main(setup, out, "--labeler", "openai", "--api-base", api.url, "--api-model", "fake", "--cot",
                           "--cot-max-tokens", "8", "--retry-base-delay", "0.001",
                           "--candidates", str(full / "candidates.jsonl"))
        api.default = "echo500"  # and an error body that echoes the headers
        with pytest.raises(APIError, match="REDACTED") as e:
            run_main(setup, tmp_path / "labels2", "--labeler", "openai", "--api-base", api.url, "--api-model",
                     "fake", "--max-retries", "1", "--retry-base-delay", "0.001",
                     "--candidates", str(full / "candidates.jsonl"))
    finally:
        api.close()
    assert key in json.dumps(api.requests[0]["headers"])  # it was sent, and echoed back
    assert metrics["n_null"] == 24 and metrics["requests"] == 24 * 2 * 2
    pairs = rows(out / "pairs.jsonl")
    assert all(r["rationale_ab"] == "Bearer [REDACTED]" for r in pairs)
    written = [p.read_bytes() for d in (out, tmp_path / "labels2") for p in d.rglob("*") if p.is_file()]
    assert len(written) >= 5 and not any(key.encode() in b for b in written)
    printed = capsys.readouterr()
    assert key not in printed.out + printed.err and key not in str(e.value)


def test_candidates_of_another_run_are_read_only(setup, micro, tmp_path):
    """--candidates FILE is an input: never appended to nor cut, even when its complete last line lacks a newline."""
    full, _ = micro
    theirs = tmp_path / "theirs" / "candidates.jsonl"
    theirs.parent.mkdir()
    theirs.write_bytes((full / "candidates.jsonl").read_bytes().rstrip(b"\n"))  # complete, no trailing newline
    before = theirs.read_bytes()
    out = tmp_path / "mine"
    metrics = run_main(setup, out, "--candidates", str(theirs))
    assert theirs.read_bytes() == before
    assert metrics["n_pairs"] == 24 and len(rows(out / "pairs.jsonl")) == 24  # the last row was labeled too
    assert not (out / "candidates.jsonl").exists()
    # a file that lacks some posts' candidates is refused, not extended
    cut(theirs, 16, partial=False)
    short = theirs.read_bytes()
    with pytest.raises(SystemExit, match="no candidates for 8 of the 24 posts"):
        run_main(setup, tmp_path / "mine2", "--candidates", str(theirs))
    assert theirs.read_bytes() == short


def test_grid_runs_every_cell_and_its_table_is_computed_from_the_rows_it_wrote(setup, tmp_path):
    out = tmp_path / "grid"
    extra = ("--grid", "--rule-temperature", "2", "--rule-noise", "1", "--rule-position-bias", "1",
             "--grid-sc-samples", "2")
    result = run_main(setup, out, *extra)
    cells = [r["cell"] for r in result["cells"]]
    assert cells == [f"{p}-{k}shot{c}" for c in ("", "-cot") for k in (0, 1, 2) for p in ("base", "detailed")] + \
        ["detailed-0shot-cot-sc-T0.3", "detailed-0shot-cot-sc-T1"]
    saved = json.loads((out / "grid.json").read_text())["cells"]
    assert saved == json.loads(json.dumps(result["cells"]))
    table = (out / "grid.md").read_text()
    assert table.count("\n| ") == 1 + len(cells) and "| detailed-0shot-cot | " in table

    def by_hand(cell):  # from the cell's pairs.jsonl and the comparisons, with a loop of our own
        pairs, gold = rows(out / cell / "pairs.jsonl"), {}
        for c in label.align_items(parse_config(label.Config, label.PRESETS, args(setup, out, "--align")))[0]:
            gold[c["id"]] = synthetic.score(c, c["summary_a"]) - synthetic.score(c, c["summary_b"])
        human = [1.0 if (r["p_a"] > 0.5) == (r["human_choice"] == 0) else 0.0 for r in pairs if r["p_a"] != 0.5]
        g = [(r["p_a"] > 0.5) == (gold[r["id"]] > 0) for r in pairs if gold[r["id"]] != 0 and r["p_a"] != 0.5]
        same = [(r["p_a_ab"] > 0.5) != (r["p_a_ba"] > 0.5) for r in pairs]
        return sum(human) / len(human), sum(g) / len(g), sum(same) / len(same), len(pairs)

    line = saved[0]
    human, gold, same, n = by_hand("base-0shot")
    assert line["n_pairs"] == n > 0 and line["paper_alignment"] == 76.1 and line["prompt_tokens_per_pair"] is None
    assert line["alignment_human"] == pytest.approx(human) and line["alignment_gold"] == pytest.approx(gold)
    assert line["same_position_rate"] == pytest.approx(same) and same > 0  # position bias 1 logit: some flip
    lo, hi = line["alignment_human_ci95"]
    assert lo <= human <= hi and lo < hi
    # rewrite one cell's rows (every label flipped): a rerun labels nothing and its table follows the rows
    path = out / "base-0shot" / "pairs.jsonl"
    flipped = [{**r, "p_a": 1 - r["p_a"], "p_a_ab": 1 - r["p_a_ba"], "p_a_ba": 1 - r["p_a_ab"]} for r in rows(path)]
    path.write_text("".join(json.dumps(r) + "\n" for r in flipped))
    again = run_main(setup, out, *extra)["cells"]
    assert again[0]["alignment_human"] == pytest.approx(1 - human) and again[1:] == result["cells"][1:]
    with pytest.raises(SystemExit, match="unknown cells"):
        run_main(setup, out, *extra, "--grid-cells", "detailed-8shot")
