"""The matrix-product floor of a piece of work: how long its matrix products alone take on this machine.

    with MatmulRecorder() as rec:          # a TorchDispatchMode: it sees every aten op, autograd's backward included
        rec.on = True
        ... the work (e.g. one PPO update: forwards and backwards) ...
        rec.on = False
    floor = rec.floor(threads=2)           # each distinct product timed alone with torch, times its count

Every mm, addmm, bmm and baddbmm is recorded with its operand shapes, layouts (a transposed operand, as autograd's
backward passes them, is timed transposed) and dtype. `floor` then times each distinct product on fresh tensors of
the same shapes and layouts (its fastest of a few round-robin passes) and adds count x time: the seconds the work
would take if it were nothing but its matrix products, run one after another at the rate torch reaches on those
shapes here. The work's seconds over that floor say how close to the limit it is (1.0: nothing but products).

Attention: under a Python dispatch mode torch 2.13 runs SDPA as its math path (bmm's, seen on CPU), so its products
are counted like eager attention's, in full (no causal skipping), whatever kernel the timed run used. A fused
kernel, if one ever dispatches, hides its products in one op: `sdpa_calls_not_counted` counts those.
Used by bench_minirlaif.py and bench_trl.py (--floor); tests/test_gemm_floor.py checks the FLOP count against
torch.utils.flop_counter and a hand count.
"""

import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# op -> the positions of its two matrix operands
MATMULS = {aten.mm.default: (0, 1), aten.addmm.default: (1, 2), aten.bmm.default: (0, 1),
           aten.baddbmm.default: (1, 2)}
SDPA = {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"}


def layout(t: torch.Tensor) -> str:
    """N: rows contiguous; T: the transpose of a contiguous matrix (autograd's weight.t()); X: anything else."""
    if t.stride(-1) == 1:
        return "N"
    if t.stride(-2) == 1:
        return "T"
    return "X"


def flops(shapes: tuple) -> int:
    """2 m n k (times the batch) for a product of (.., m, k) and (.., k, n)."""
    (a, b) = shapes
    batch = a[0] if len(a) == 3 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def make(shape: tuple, lay: str, dtype: torch.dtype) -> torch.Tensor:
    if lay == "T":  # a contiguous (.., n, m) tensor seen as (.., m, n)
        return torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=dtype).transpose(-1, -2)
    return torch.randn(*shape, dtype=dtype)


class MatmulRecorder(TorchDispatchMode):
    """Counts the matrix products dispatched while `on` (and fused-attention calls, which hide theirs)."""

    def __init__(self):
        super().__init__()
        self.on, self.counts, self.sdpa_calls = False, Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on:
            if func in MATMULS:
                i, j = MATMULS[func]
                a, b = args[i], args[j]
                key = (func.overloadpacket.__name__, (tuple(a.shape), tuple(b.shape)), (layout(a), layout(b)), a.dtype)
                self.counts[key] += 1
            elif func.overloadpacket.__name__ in SDPA:
                self.sdpa_calls += 1
        return func(*args, **(kwargs or {}))

    def gflop(self) -> float:
        return sum(n * flops(shapes) for (_, shapes, _, _), n in self.counts.items()) / 1e9

    def floor(self, threads: int | None = None, passes: int = 5, min_s: float = 0.05) -> dict:
        """Time every distinct product alone (`threads` torch threads) and return the floor and its parts.

        Each pass times every product in turn (at least `min_s` of repetitions each); a product's time is its
        fastest pass. Round-robin passes spread a passing disturbance over all shapes instead of one, and the
        fastest pass is the rate this machine can reach: a floor is a lower bound."""
        if threads is not None:
            torch.set_num_threads(threads)
        items = sorted(self.counts.items(), key=lambda kv: -kv[1] * flops(kv[0][1]))
        operands = []
        for (_, shapes, lays, dtype), _ in items:
            a, b = (make(s, lay, dtype) for s, lay in zip(shapes, lays))
            operands.append((torch.bmm if len(shapes[0]) == 3 else torch.mm, a, b))
        best = [float("inf")] * len(items)
        for _ in range(passes):
            for i, (mm, a, b) in enumerate(operands):
                mm(a, b)  # warm-up (allocator, oneDNN's primitive cache)
                reps, t = 0, time.perf_counter()
                while reps < 3 or time.perf_counter() - t < min_s:
                    mm(a, b)
                    reps += 1
                best[i] = min(best[i], (time.perf_counter() - t) / reps)
        total_s, rows = 0.0, []
        for ((op, shapes, lays, dtype), n), s in zip(items, best):
            total_s += n * s
            rows.append({"op": op, "shapes": [list(x) for x in shapes], "layouts": "".join(lays),
                         "dtype": str(dtype).removeprefix("torch."), "count": n,
                         "gflop": round(n * flops(shapes) / 1e9, 3), "s_each": s,
                         "gflop_per_s": round(flops(shapes) / s / 1e9, 1)})
        gflop = self.gflop()
        bmm = [r for r in rows if r["op"] in ("bmm", "baddbmm")]  # batched: attention's QK^T and PV in a transformer
        return {"gflop": round(gflop, 2), "floor_s": round(total_s, 7),
                "bmm_gflop": round(sum(r["gflop"] for r in bmm), 2),
                "bmm_floor_s": round(sum(r["count"] * r["s_each"] for r in bmm), 7),
                "gflop_per_s": round(gflop / total_s, 1) if total_s else None, "distinct_products": len(rows),
                "products": sum(self.counts.values()), "sdpa_calls_not_counted": self.sdpa_calls,
                "threads": torch.get_num_threads(), "by_shape": rows}


def recorder_from(result: dict) -> MatmulRecorder:
    """The recorded products of a benchmark JSON's "floor" (its by_shape rows), to be timed again."""
    rec = MatmulRecorder()
    for r in result["floor"]["by_shape"]:
        key = (r["op"], tuple(tuple(x) for x in r["shapes"]), tuple(r["layouts"]), getattr(torch, r["dtype"]))
        rec.counts[key] += r["count"]
    return rec


if __name__ == "__main__":
    # python bench/gemm_floor.py A.json B.json ...: time the recorded products of several benchmark runs again, in
    # one process, alternating (--rounds times), so that their floors share the machine's state of the moment
    import argparse
    import json

    ap = argparse.ArgumentParser(description="re-time the matrix-product floors of benchmark JSONs in one process")
    ap.add_argument("files", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    results = {f: json.load(open(f)) for f in args.files}
    floors = {f: [] for f in args.files}
    for _ in range(args.rounds):
        for f, r in results.items():
            floors[f].append(recorder_from(r).floor(threads=args.threads)["floor_s"])
    for f, r in results.items():
        best, each = min(floors[f]), ", ".join(f"{x:.3f}" for x in floors[f])
        print(f"{f}: {r['floor']['gflop']} GFLOP, floor {best:.3f} s (rounds {each}) "
              f"at {r['floor']['gflop'] / best:.1f} GFLOP/s; update {r['update_s']:.3f} s, update / floor "
              f"{r['update_s'] / best:.2f}")
