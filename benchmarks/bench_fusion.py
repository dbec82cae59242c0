"""What fusing a time step's elementwise ops into one kernel would give the fused training step.

    python benchmarks/bench_fusion.py           # mLSTM-512, batch 64 x 128, 2 threads
    python benchmarks/bench_fusion.py --quick

A fused step (sentdisc.kernels) runs, per byte, two GEMMs forward and two backward; between
them sit the gate ops. Only two runs of them can become one kernel: forward, from the gate
pre-activations to h (sigmoid of the four gates, u's tanh, c, tanh(c), h: seven ops), and
backward, from dh to dz and the next dc (four ops); the single multiply on each side of the
other GEMM has nothing to fuse with. Each run is timed three ways at the step's shapes:
* eager: sentdisc's own ops, as the fused step runs them (the baseline, same run);
* compiled: torch.compile (inductor, C++) of those same ops;
* one kernel: torch.compile of the same math written without out= (its best case: one loop).
Compile seconds are the first call's: a first run here took 11-29 s per chain; later runs
load inductor's on-disk cache. Then the training step itself (torch.profiler: matrix products
against the rest) says what share of a step the best of them would save, and so how far bf16
products (r = 2x the fp32 GEMM rate, what a CPU with native bf16 gives at these shapes) could
take a step.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_step_args, load_note, print_table, set_threads
from bench_model import products_and_rest

from sentdisc import kernels
from sentdisc.model import ByteLM, ModelConfig
from sentdisc.train import train_step


def forward_eager(H):
    """Gate pre-activations -> gate activations g, c, s (what backward keeps of tanh(c)), h:
    kernels' own ops, as _MLSTMSequence.forward runs them per step (tanh via sigmoid)."""
    def run(pre, cp, g, c, s, h):
        kernels._activate(g, g[:, 3 * H:], H, True, pre=pre)
        torch.mul(g[:, H:2 * H], cp, out=c).addcmul_(g[:, :H], g[:, 3 * H:])
        kernels._cell_output(c, s, g[:, 2 * H:3 * H], h, True)
    return run


def forward_one_kernel(H):
    def run(pre, cp, g, c, s, h):
        a = torch.sigmoid(pre)
        u = 2 * a[:, 3 * H:] - 1
        cn = a[:, H:2 * H] * cp + a[:, :H] * u
        sn = torch.sigmoid(-2 * cn)
        g[:, :3 * H].copy_(a[:, :3 * H])
        g[:, 3 * H:].copy_(u)
        c.copy_(cn)
        s.copy_(sn)
        h.copy_(a[:, 2 * H:3 * H] * (1 - 2 * sn))
    return run


def backward_eager(H):
    """dh, dc -> dz (all four gates) and dc for the step before: the reverse loop's ops."""
    def run(dh, dc, A, P, F, dZ):
        dc.addcmul_(dh, A)
        torch.mul(P.view(-1, 4, H), dc.unsqueeze(1), out=dZ.view(-1, 4, H))
        torch.mul(P[:, 2 * H:3 * H], dh, out=dZ[:, 2 * H:3 * H])
        dc.mul_(F)
    return run


def backward_one_kernel(H):
    def run(dh, dc, A, P, F, dZ):
        d = dc + dh * A
        dZ.view(-1, 4, H).copy_(P.view(-1, 4, H) * torch.stack([d, d, dh, d], 1))
        dc.copy_(d * F)
    return run


def inputs(shapes) -> list:
    """The same tensors on every call (a chain writes some of its inputs in place)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) for s in shapes]


def per_call_us(fn, args, calls: int, rounds: int = 3) -> float:
    for _ in range(20):
        fn(*args)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def compiled(fn, args):
    """torch.compile(fn) and its compile seconds (the first call)."""
    import torch._dynamo
    torch._dynamo.reset()
    f = torch.compile(fn, dynamic=False)
    t0 = time.perf_counter()
    f(*args)
    return f, time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_args(p)
    p.add_argument("--calls", type=int, default=2000, help="calls per timing round")
    p.add_argument("--quick", action="store_true", help="fewer calls")
    args = p.parse_args(argv)
    set_threads(args.threads)
    B, H, T = args.batch_size, args.rnn_size, args.seq_length
    calls = 200 if args.quick else args.calls
    fwd = [(B, 4 * H), (B, H), (B, 4 * H), (B, H), (B, H), (B, H)]
    bwd = [(B, H), (B, H), (B, H), (B, 4 * H), (B, H), (B, 4 * H)]
    chains = {"forward: gates -> h (7 ops)": (forward_eager(H), forward_one_kernel(H), fwd),
              "backward: dh -> dz, dc (4 ops)": (backward_eager(H), backward_one_kernel(H), bwd)}
    print(f"mLSTM-{H}, batch {B} x {T}; {args.threads} threads; {load_note()}")
    rows, best_saving = [], 0.0
    for name, (eager, one, shapes) in chains.items():
        ref = inputs(shapes)
        eager(*ref)
        times, err = {"eager": per_call_us(eager, inputs(shapes), calls)}, 0.0
        for label, fn in (("compiled", eager), ("one kernel", one)):
            got = inputs(shapes)
            f, secs = compiled(fn, got)  # its first call: on the same inputs as ref's
            err = max(err, *((a - b).abs().max().item() for a, b in zip(got, ref)))
            times[label], times[label + " s"] = per_call_us(f, inputs(shapes), calls), secs
        fastest = min(times["compiled"], times["one kernel"])
        best_saving += max(times["eager"] - fastest, 0.0) * T / 1e6  # else it stays eager
        rows.append(dict(chain=name, eager=f"{times['eager']:.0f}",
                         compiled=f"{times['compiled']:.0f} ({times['compiled s']:.0f} s)",
                         one=f"{times['one kernel']:.0f} ({times['one kernel s']:.0f} s)",
                         ratio=f"{times['eager'] / fastest:.2f}x", err=f"{err:.1e}"))
    print("\nPer time step, us (compile seconds in brackets):")
    print_table(rows, [("chain", "chain"), ("eager", "eager (sentdisc)"),
                       ("compiled", "compiled"), ("one", "one kernel"),
                       ("ratio", "eager / fastest"), ("err", "max |diff|")])

    model = ByteLM(ModelConfig(embed_size=args.embed_size, rnn_size=H))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = torch.randint(0, 256, (B, T + 1))
    step = lambda: train_step(model, opt, batch, None)
    step()
    products, rest = products_and_rest(step)
    total = products + rest
    fused_rest = max(rest - best_saving, 0.0)
    print(f"\nTraining step (torch.profiler self times): products {products * 1e3:.0f} ms, "
          f"rest {rest * 1e3:.0f} ms ({rest / total:.0%}). The fastest fusion of both chains "
          f"saves {best_saving * 1e3:.0f} ms per step ({best_saving / total:.1%}): fp32 "
          f"{total / (products + fused_rest):.3f}x; bf16 products at r = 2 reach at most "
          f"{total / (products / 2 + rest):.2f}x unfused, {total / (products / 2 + fused_rest):.2f}x "
          f"fused (the 1.8x target needs the rest at {(total / 1.8 - products / 2) * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
