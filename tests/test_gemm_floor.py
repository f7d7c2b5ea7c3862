"""bench/gemm_floor.py: the matrix products of a forward and backward pass, counted and timed (the benchmark's
floor). The counts are checked against a hand count and torch's own FLOP counter."""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from gemm_floor import MatmulRecorder, layout  # noqa: E402


def test_a_linear_layer_forward_and_backward_by_hand():
    """y = x W^T + b on (8, 16) -> (8, 32): forward one addmm, backward one mm for dx and one for dW; each is
    2 * 8 * 16 * 32 FLOPs. Only what runs while `on` is counted."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 32)
    x, g = torch.randn(8, 16, requires_grad=True), torch.randn(8, 32)
    with MatmulRecorder() as rec:
        lin(x)  # off: not counted
        rec.on = True
        (lin(x) * g).sum().backward()  # dy = g, a plain (8, 32) tensor
        rec.on = False
    assert sum(rec.counts.values()) == 3
    assert rec.gflop() == pytest.approx(3 * 2 * 8 * 16 * 32 / 1e9)
    ops = sorted(op for op, _, _, _ in rec.counts)
    assert ops == ["addmm", "mm", "mm"]
    # forward x @ W^T, backward dy @ W and dy^T @ x: transposed operands, timed as such
    assert sorted("".join(lays) for _, _, lays, _ in rec.counts) == ["NN", "NT", "TN"]
    floor = rec.floor(threads=1, passes=2, min_s=0.001)
    assert floor["floor_s"] > 0 and floor["products"] == 3 and len(floor["by_shape"]) == floor["distinct_products"]
    assert sum(r["count"] for r in floor["by_shape"]) == 3


def test_layouts():
    a = torch.randn(4, 6)
    assert (layout(a), layout(a.t()), layout(a[:, ::2])) == ("N", "T", "X")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gpt2_forward_backward_matches_torchs_flop_counter(attn):
    """A tiny GPT-2's forward and backward: the recorded FLOPs equal torch.utils.flop_counter's, and the
    attention's products are among them with either attention setting (SDPA runs its math path under a dispatch
    mode): per layer, QK^T and PV forward and four products backward, 2 * 6 * 20 * 20 * 16 FLOPs each."""
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2, attn_implementation=attn)
    model = GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 50, (3, 20))
    with MatmulRecorder() as rec, FlopCounterMode(display=False) as fc:
        rec.on = True
        model(ids, labels=ids).loss.backward()
    assert rec.sdpa_calls == 0
    assert rec.gflop() * 1e9 == pytest.approx(fc.get_total_flops(), rel=1e-12)
    bmm = sum(n * 2 * s[0][0] * s[0][1] * s[0][2] * s[1][2] for (op, s, _, _), n in rec.counts.items() if op == "bmm")
    assert bmm == 6 * 2 * (3 * 2) * 20 * 20 * 16 * cfg.n_layer
