"""mLSTM training and featurization speed against the GEMM bound and a plain baseline.

    python benchmarks/bench_model.py            # mLSTM-512, embed 64, batch 64, seq 128, 2 threads
    python benchmarks/bench_model.py --quick    # a short run

Training rows: bytes/s of a full step (forward, cross entropy, backward, Adam) for
* plain: a per-timestep loop over the paper's equations, weight norm applied in each
  forward, autograd through the loop (written here, independent of sentdisc);
* sentdisc unfused: sentdisc's own loop (input projections hoisted) with kernels.disabled();
* sentdisc fused: the default path (sentdisc.kernels), reset mask passed as training does.
Featurization rows: sentdisc.featurize on SST-2 test texts (or generated texts of similar
lengths), fused and unfused, and one text at a time.
Precision rows: the fused training step and featurize with bf16 products (autocast, what
precision auto runs where the CPU multiplies bf16 natively) beside fp32, each against the GEMM
rate of its own dtype measured in the same run; mLSTM-4096 (the OpenAI model's shapes, random
weights) featurizing SST-2 test, texts/s, fp32 and bf16; where a fused training step's time
goes (torch.profiler: matrix products against everything else), and what that leaves bf16
products at most (Amdahl: only the products get faster); and the losses of one training run
(mLSTM-128) in fp32 and in bf16 from the same weights on the same windows. bf16 rows are timed
where the CPU multiplies bf16 natively (--bf16 auto); the loss comparison runs everywhere.
The bound: the machine's matmul rate for the same shapes, measured here, divided by
6 x (recurrent + head weights) FLOPs per byte for training, 2 x recurrent for featurization
(the fused path looks a byte's input projections up instead of multiplying for them, so
the products it runs are fewer; a line under each table gives their own GEMM efficiency).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    add_step_args,
    best_time,
    bf16_plan,
    featurize_bound,
    fmt_rate,
    gemm_rate,
    head_weight_count,
    inference_shapes,
    load_note,
    mlstm_weight_count,
    print_table,
    set_threads,
    training_shapes,
)

from sentdisc import featurize, kernels
from sentdisc.model import ByteLM, ModelConfig
from sentdisc.text import encode_list
from sentdisc.train import autocast_for, train_step

REPO = Path(__file__).resolve().parents[1]


class PlainMLSTM(nn.Module):
    """The baseline: the paper's equations one timestep at a time, nothing hoisted."""

    def __init__(self, embed: int, hidden: int, vocab: int = 256):
        super().__init__()
        E, H = embed, hidden
        self.embed = nn.Embedding(vocab, E)
        self.wx = nn.Parameter(torch.randn(E, 4 * H) / H ** 0.5)
        self.wh = nn.Parameter(torch.randn(H, 4 * H) / H ** 0.5)
        self.wmx = nn.Parameter(torch.randn(E, H) / H ** 0.5)
        self.wmh = nn.Parameter(torch.randn(H, H) / H ** 0.5)
        self.b = nn.Parameter(torch.zeros(4 * H))
        self.gh = nn.Parameter(self.wh.detach().norm(dim=0))
        self.gmh = nn.Parameter(self.wmh.detach().norm(dim=0))
        self.head = nn.Linear(H, vocab)
        self.H = H

    def forward(self, x, reset):
        wh = self.wh * (self.gh / self.wh.norm(dim=0))  # weight norm, every forward
        wmh = self.wmh * (self.gmh / self.wmh.norm(dim=0))
        B = x.shape[0]
        h = c = torch.zeros(B, self.H)
        keep = (~reset).float().unsqueeze(-1).unbind(1)
        outs = []
        for t, x_t in enumerate(self.embed(x).unbind(1)):
            h, c = h * keep[t], c * keep[t]
            m = (x_t @ self.wmx) * (h @ wmh)
            z = x_t @ self.wx + m @ wh + self.b
            i, f, o, u = z.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(u)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        return self.head(torch.stack(outs, 1))


def plain_step_fn(model: PlainMLSTM, batch, reset):
    """The baseline's step, written out here like the model: nothing of sentdisc's."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = batch[:, :-1], batch[:, 1:]

    def step():
        loss = F.cross_entropy(model(x, reset=reset).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def sentdisc_step_fn(model: ByteLM, batch, reset, ctx=contextlib.nullcontext,
                     precision: str = "fp32"):
    """The training job's own step (sentdisc.train.train_step), each from a fresh state."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    autocast = autocast_for(precision, torch.device("cpu"))

    def step():
        with ctx():
            train_step(model, opt, batch, reset, autocast=autocast)
    return step


def loss_agreement(steps: int, H: int = 128, B: int = 16, T: int = 64) -> dict:
    """One training run, fp32 and bf16: same initial weights, same windows (the README's
    corpus when present), the step's losses side by side."""
    text = _corpus_bytes(B * (T + 1) * steps // 4 + T + 1)
    data = torch.tensor(list(text), dtype=torch.int64)
    starts = torch.randint(0, len(data) - T - 1, (steps, B), generator=torch.Generator().manual_seed(0))
    curves = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = ByteLM(ModelConfig(embed_size=64, rnn_size=H))
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        autocast, losses = autocast_for(precision, torch.device("cpu")), []
        reset = torch.zeros(B, T, dtype=torch.bool)
        reset[:, 0] = True
        t0 = time.perf_counter()
        for s in range(steps):
            x = torch.stack([data[i:i + T + 1] for i in starts[s].tolist()])
            loss, _ = train_step(model, opt, x, reset, None, clip=1.0, autocast=autocast)
            losses.append(loss.item())
        curves[precision] = (losses, time.perf_counter() - t0)
    fp32, bf16 = (torch.tensor(curves[k][0]) for k in ("fp32", "bf16"))
    rel = ((bf16 - fp32).abs() / fp32)
    tail = max(1, steps // 10)
    return {"steps": steps, "model": f"mLSTM-{H}, batch {B} x {T}",
            "fp32_first": fp32[:tail].mean().item(), "fp32_last": fp32[-tail:].mean().item(),
            "bf16_last": bf16[-tail:].mean().item(), "max_rel": rel.max().item(),
            "mean_rel": rel.mean().item(), "seconds": {k: v[1] for k, v in curves.items()}}


def _corpus_bytes(n: int) -> bytes:
    """Review text: the Amazon sample the README pretrains on, else SST-2, else generated."""
    import json

    for path in (REPO.parent / "shared" / "data" / "amazon_blitzer" / "reviews" / "books.json",):
        if path.exists():
            out = bytearray()
            with open(path, encoding="utf-8") as f:
                for line in f:
                    out += (json.loads(line).get("reviewText") or "").encode() + b" "
                    if len(out) >= n:
                        return bytes(out)
    texts, _ = sst2_texts()
    return (" ".join(texts).encode() * (1 + n // 100000))[:max(n, 1)]


def sst2_texts(n_fallback: int = 1821) -> tuple:
    path = REPO.parent / "shared" / "data" / "sst2" / "test.csv"
    if path.exists():
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        key = "sentence" if "sentence" in rows[0] else list(rows[0])[-1]
        return [r[key] for r in rows], f"SST-2 test ({path})"
    rng = random.Random(0)
    words = "the a movie film was great bad not really quite funny dull story acting".split()
    texts = [" ".join(rng.choice(words) for _ in range(max(1, int(rng.gauss(19, 9)))))
             for _ in range(n_fallback)]
    return texts, "generated texts (SST-2 test not found)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_args(p)
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best kept)")
    p.add_argument("--one_at_a_time", type=int, default=300, help="texts timed one at a time")
    p.add_argument("--bf16", default="auto", choices=["auto", "on", "off"],
                   help="time the bf16 rows: auto where the CPU multiplies bf16 natively")
    p.add_argument("--loss_steps", type=int, default=300,
                   help="steps of the fp32 vs bf16 training-loss comparison (0: skip)")
    p.add_argument("--big_texts", type=int, default=100,
                   help="SST-2 test texts for the mLSTM-4096 featurize row (0: skip)")
    p.add_argument("--quick", action="store_true", help="short run: fewer rounds, fewer texts")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.one_at_a_time = 1, 60
        args.loss_steps, args.big_texts = min(args.loss_steps, 40), min(args.big_texts, 20)
    set_threads(args.threads)
    torch.manual_seed(0)
    B, T, E, H = args.batch_size, args.seq_length, args.embed_size, args.rnn_size
    print(f"mLSTM-{H}, embed {E}, batch {B}, seq {T}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {load_note()}")

    rec, head = mlstm_weight_count(E, H), head_weight_count(H)
    train_flops_per_byte = 6 * (rec + head)
    feat_flops_per_byte = 2 * rec  # featurization runs no head
    # ... of which the fused path multiplies only the recurrent (and head) part: a byte's
    # input projections are looked up, forward and backward (sentdisc.kernels)
    feat_run_flops_per_byte = 2 * (H * H + H * 4 * H)
    train_run_flops_per_byte = 6 * (H * H + H * 4 * H + head)
    feat_B = 128  # featurize's default batch size

    # Training: a full step on a packed batch with sample boundaries, as the trainer runs it.
    batch = torch.randint(0, 256, (B, T + 1))
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[torch.arange(B), torch.randint(0, T, (B,))] = True
    cfg = ModelConfig(embed_size=E, rnn_size=H)
    train = {
        "plain (per-step autograd)": plain_step_fn(PlainMLSTM(E, H), batch, reset),
        "sentdisc unfused (kernels.disabled)": sentdisc_step_fn(ByteLM(cfg), batch, reset,
                                                                kernels.disabled),
        "sentdisc fused, fp32": sentdisc_step_fn(ByteLM(cfg), batch, reset),
    }
    # Featurization: SST-2 test texts, masked, kind=mean.
    texts, source = sst2_texts()
    model = ByteLM(cfg).eval()
    n_bytes = sum(len(e) for e in encode_list(texts))
    subset = texts[:args.one_at_a_time]
    sub_bytes = sum(len(e) for e in encode_list(subset))
    fp32 = lambda t: featurize(model, t, kind="mean", precision="fp32")
    feat = {
        "featurize fused, fp32": (lambda: fp32(texts), n_bytes),
        "featurize unfused (kernels.disabled)": (lambda: _disabled(lambda: fp32(texts)), n_bytes),
        "one text at a time (fused)": (lambda: [fp32([t]) for t in subset], sub_bytes),
        "one text at a time (unfused)": (
            lambda: _disabled(lambda: [fp32([t]) for t in subset]), sub_bytes),
    }
    use_bf16, bf16_why = bf16_plan(args.bf16)
    print(bf16_why, flush=True)
    if use_bf16:
        train["sentdisc fused, bf16 products"] = sentdisc_step_fn(ByteLM(cfg), batch, reset,
                                                                 precision="bf16")
        feat["featurize fused, bf16 products"] = (
            lambda: featurize(model, texts, kind="mean", precision="bf16"), n_bytes)
    for fn in train.values():
        fn()  # warm up (allocations, Adam state)

    # Everything is re-measured every round, interleaved, and the best kept: the machine is
    # shared, and a load spike during one measurement must not skew a ratio.
    best = {name: float("inf") for name in list(train) + list(feat)}
    train_gemm = feat_gemm = train_gemm16 = feat_gemm16 = 0.0
    for r in range(args.rounds):
        t0 = time.perf_counter()
        train_gemm = max(train_gemm, gemm_rate(training_shapes(B, T, E, H)))
        feat_gemm = max(feat_gemm, gemm_rate(inference_shapes(feat_B, T, E, H)))
        if use_bf16:
            train_gemm16 = max(train_gemm16, gemm_rate(training_shapes(B, T, E, H),
                                                       torch.bfloat16))
            feat_gemm16 = max(feat_gemm16, gemm_rate(inference_shapes(feat_B, T, E, H),
                                                     torch.bfloat16))
        for name, fn in train.items():
            best[name] = min(best[name], best_time(fn, reps=1, warmup=0))
        for name, (fn, _) in feat.items():
            best[name] = min(best[name], best_time(fn, reps=1, warmup=0))
        print(f"round {r + 1}/{args.rounds}: {time.perf_counter() - t0:.0f} s, {load_note()}")
    print(f"GEMM rate (best of {args.rounds}), training shapes: {train_gemm / 1e9:.1f} GFLOP/s; "
          f"featurization shapes (batch {feat_B}): {feat_gemm / 1e9:.1f} GFLOP/s")

    train_bound = train_gemm / train_flops_per_byte
    plain_rate = B * T / best["plain (per-step autograd)"]
    rows = []
    for name in train:
        rate = B * T / best[name]
        rows.append(dict(impl=name, rate=fmt_rate(rate),
                         gflops=f"{rate * train_flops_per_byte / 1e9:.1f}",
                         bound=f"{rate / train_bound:.0%}", ratio=f"{rate / plain_rate:.2f}x",
                         step=f"{best[name]:.3f} s"))
    print(f"\nTraining: {train_flops_per_byte / 1e6:.2f} MFLOP/byte = 6 x {rec + head:,} weights; "
          f"bound {fmt_rate(train_bound)} at {train_gemm / 1e9:.1f} GFLOP/s")
    print_table(rows, [("impl", "implementation"), ("rate", "bytes/s"), ("gflops", "GFLOP/s"),
                       ("bound", "of bound"), ("ratio", "vs plain"), ("step", "step time")])
    fused_rate = B * T / best["sentdisc fused, fp32"]
    print(f"(the fused path looks the input projections up per byte value, so it multiplies "
          f"{train_run_flops_per_byte / 1e6:.2f} of the {train_flops_per_byte / 1e6:.2f} "
          f"MFLOP/byte: its products run at "
          f"{fused_rate * train_run_flops_per_byte / train_gemm:.0%} of the GEMM rate)")

    feat_bound = feat_gemm / feat_flops_per_byte
    # the baseline is the faster way of featurizing one text at a time (at one row the
    # step is bound by reading the weights, and the two paths take turns winning)
    one_rate = sub_bytes / min(best["one text at a time (fused)"],
                               best["one text at a time (unfused)"])
    rows = []
    for name, (_, nb) in feat.items():
        rate = nb / best[name]
        rows.append(dict(impl=name, rate=fmt_rate(rate),
                         gflops=f"{rate * feat_flops_per_byte / 1e9:.1f}",
                         bound=f"{rate / feat_bound:.0%}", ratio=f"{rate / one_rate:.1f}x",
                         sec=f"{best[name]:.2f} s"))
    print(f"\nFeaturization, kind=mean, batch {feat_B}: {source}, {len(texts)} texts, "
          f"{n_bytes:,} bytes (one at a time: the first {len(subset)}); "
          f"{feat_flops_per_byte / 1e6:.2f} MFLOP/byte = 2 x {rec:,} recurrent weights; "
          f"bound {fmt_rate(feat_bound)} at {feat_gemm / 1e9:.1f} GFLOP/s")
    print_table(rows, [("impl", "implementation"), ("rate", "bytes/s"), ("gflops", "GFLOP/s"),
                       ("bound", "of bound"), ("ratio", "vs one at a time (faster)"), ("sec", "time")])
    fused_rate = n_bytes / best["featurize fused, fp32"]
    print(f"(the fused path looks the input projections up per byte value, so it multiplies "
          f"{feat_run_flops_per_byte / 1e6:.2f} of the {feat_flops_per_byte / 1e6:.2f} MFLOP/byte: "
          f"its products run at {fused_rate * feat_run_flops_per_byte / feat_gemm:.0%} of the "
          f"GEMM rate)")
    precision_tables(args, best, B, T, H, E, n_bytes, train_flops_per_byte, feat_flops_per_byte,
                     train_gemm, feat_gemm, train_gemm16, feat_gemm16, use_bf16, bf16_why)
    step_time_split(train, train_gemm16 / train_gemm if use_bf16 else None)
    print(f"\n{load_note()} (the machine is shared: figures are the best of {args.rounds} rounds)")


def precision_tables(args, best, B, T, H, E, n_bytes, train_fpb, feat_fpb, train_gemm, feat_gemm,
                     train_gemm16, feat_gemm16, use_bf16, why):
    """fp32 and bf16 against their own bounds; mLSTM-4096 featurize; the loss comparison."""
    print(f"\nPrecision (mLSTM-{H}): {why}")
    rows = []
    for what, fp32_name, bf16_name, fpb, g32, g16, nb in (
            ("training step", "sentdisc fused, fp32", "sentdisc fused, bf16 products",
             train_fpb, train_gemm, train_gemm16, B * T),
            ("featurize", "featurize fused, fp32", "featurize fused, bf16 products",
             feat_fpb, feat_gemm, feat_gemm16, n_bytes)):
        r32 = nb / best[fp32_name]
        rows.append(dict(what=what, dtype="fp32", rate=fmt_rate(r32),
                         gemm=f"{g32 / 1e9:.0f}", bound=f"{r32 / (g32 / fpb):.0%}", ratio="1.00x"))
        if use_bf16:
            r16 = nb / best[bf16_name]
            rows.append(dict(what=what, dtype="bf16", rate=fmt_rate(r16),
                             gemm=f"{g16 / 1e9:.0f}", bound=f"{r16 / (g16 / fpb):.0%}",
                             ratio=f"{r16 / r32:.2f}x"))
    print_table(rows, [("what", "path"), ("dtype", "products"), ("rate", "bytes/s"),
                       ("gemm", "GEMM GFLOP/s (own dtype)"), ("bound", "of own bound"),
                       ("ratio", "vs fp32")])
    if args.big_texts:
        texts = sst2_texts()[0][:args.big_texts]
        big = ByteLM(ModelConfig(embed_size=64, rnn_size=4096)).eval()
        lengths = [len(e) for e in encode_list(texts)]
        rows = []
        for precision in ("fp32", "bf16") if use_bf16 else ("fp32",):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            bound, gemm = featurize_bound(lengths, 64, 4096, dtype)
            featurize(big, texts[:4], precision=precision)  # warm-up
            t = best_time(lambda p=precision: featurize(big, texts, precision=p), reps=1,
                          warmup=0)
            rate = sum(lengths) / t
            rows.append(dict(dtype=precision, tps=f"{len(texts) / t:.2f}", rate=fmt_rate(rate),
                             gemm=f"{gemm / 1e9:.0f}",
                             bound_tps=f"{bound * len(texts) / sum(lengths):.2f}",
                             of=f"{rate / bound:.0%}", sec=f"{t:.1f}"))
        print(f"\nmLSTM-4096 (the OpenAI model's shapes, random weights) featurizing the first "
              f"{len(texts)} SST-2 test texts ({sum(lengths):,} bytes), cell, one batch; the "
              f"bound: the GEMM rate of the live rows each step multiplies (texts end, rows "
              f"leave), {2 * mlstm_weight_count(64, 4096) / 1e6:.0f} MFLOP/byte:")
        print_table(rows, [("dtype", "products"), ("tps", "texts/s"), ("rate", "bytes/s"),
                           ("gemm", "GEMM GFLOP/s at those rows"), ("bound_tps", "bound texts/s"),
                           ("of", "of bound"), ("sec", "seconds")])
    if args.loss_steps:
        r = loss_agreement(args.loss_steps)
        print(f"\nfp32 vs bf16 training loss, {r['model']}, {r['steps']} steps from the same "
              f"weights on the same windows: loss {r['fp32_first']:.3f} -> {r['fp32_last']:.3f} "
              f"(fp32), {r['bf16_last']:.3f} (bf16) over the last tenth; |bf16 - fp32| / fp32 "
              f"per step: max {r['max_rel']:.2%}, mean {r['mean_rel']:.2%} (tolerance 2%); "
              f"{r['seconds']['fp32']:.0f} s fp32, {r['seconds']['bf16']:.0f} s bf16")


MATRIX_PRODUCTS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm",
                   "mkldnn::_linear_pointwise"}


def products_and_rest(step: Callable[[], None], reps: int = 3) -> tuple:
    """(seconds in matrix products, seconds in everything else) of one call of ``step``, from
    torch.profiler's self times: per op, the least over ``reps`` profiled calls (the machine
    is shared). The rest is the gate arithmetic, casts, the head's softmax, weight norm,
    clipping, Adam, and the Python that issues them."""
    from torch.profiler import ProfilerActivity, profile
    per_op = {}
    for _ in range(reps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        for e in prof.key_averages():
            per_op.setdefault(e.key, []).append(e.self_cpu_time_total / 1e6)
    least = {k: min(v) for k, v in per_op.items()}
    products = sum(t for k, t in least.items() if k in MATRIX_PRODUCTS)
    return products, sum(least.values()) - products


def step_time_split(train: dict, gemm_ratio):
    """Where the fused training step's time goes, and the most bf16 products can give it."""
    rows, split = [], {}
    for dtype, name in (("fp32", "sentdisc fused, fp32"),
                        ("bf16", "sentdisc fused, bf16 products")):
        if name not in train:
            continue
        products, rest = split[dtype] = products_and_rest(train[name])
        rows.append(dict(dtype=dtype, products=f"{products * 1e3:.0f} ms",
                         rest=f"{rest * 1e3:.0f} ms", share=f"{rest / (products + rest):.0%}"))
    print("\nWhere a fused training step's time goes (torch.profiler self times, per op the "
          "least of 3 steps):")
    print_table(rows, [("dtype", "products"), ("products", "matrix products"),
                       ("rest", "everything else"), ("share", "rest / step")])
    products, rest = split["fp32"]
    r = gemm_ratio or 2.0
    where = (f"r = {r:.2f}, the bf16/fp32 GEMM rate measured here" if gemm_ratio else
             "r = 2, about what a CPU with native bf16 gives at these shapes (none here)")
    print(f"bf16 products r times faster leave the rest as it is: the step gains at most "
          f"(products + rest) / (products / r + rest) = {(products + rest) / (products / r + rest):.2f}x "
          f"at {where}" + (f"; bf16's own rest (casts) measured {split['bf16'][1] * 1e3:.0f} ms"
                           if "bf16" in split else ""))


def _disabled(fn):
    with kernels.disabled():
        return fn()


if __name__ == "__main__":
    main()
