"""Shared benchmark helpers: thread setup, timing, the machine's GEMM rate, FLOP bounds.

The bound for a recurrent model is its matrix products: per byte, training does about
6 x (recurrent + head weights) floating-point operations (forward, input and weight
gradients), inference 2 x. We measure the machine's own matmul rate for the exact shapes a
step runs, in the same process, so "fraction of the bound" is comparable across machines.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence

import torch

# One matmul shape: (m, k, n, count, transpose_a, transpose_b): count calls of [m,k] @ [k,n].
Shape = tuple


def add_step_args(p):
    """The training step's shape flags every model benchmark takes (mLSTM-512, embed 64,
    batch 64 x 128 by default), and its thread count."""
    p.add_argument("--rnn_size", type=int, default=512)
    p.add_argument("--embed_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seq_length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)


def set_threads(n: int):
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


def load_note() -> str:
    """1-minute load average: the machine is shared, so say how busy it was."""
    try:
        return f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus"
    except OSError:
        return "load n/a"


def best_time(fn: Callable[[], None], reps: int = 3, warmup: int = 1, sync=None) -> float:
    """Best wall time of ``reps`` calls after ``warmup`` calls (the least-disturbed run)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - t0)
    return best


def mlstm_weight_count(embed: int, hidden: int) -> int:
    """Recurrent weights of one mLSTM layer: Wx, Wh, Wmx, Wmh (+ bias)."""
    return embed * 4 * hidden + hidden * 4 * hidden + embed * hidden + hidden * hidden + 4 * hidden


def head_weight_count(hidden: int, vocab: int = 256) -> int:
    return hidden * vocab + vocab


def training_shapes(B: int, T: int, E: int, H: int, V: int = 256) -> list:
    """Every matmul of one training step of the fused mLSTM + head (see sentdisc.kernels).
    The first layer's input projections are looked up per byte value, forward and backward,
    so the [T*B, E] products are gone; E stays in the signature for other layers' callers."""
    N = B * T
    return [
        # forward: two recurrent products per step, the head
        (B, H, H, T, False, False), (B, H, 4 * H, T, False, False),
        (N, H, V, 1, False, True),
        # backward per step: dm = dz Wh^T, dh = dhm Wmh^T
        (B, 4 * H, H, T, False, True), (B, H, H, T, False, True),
        # recurrent weight gradients over all T*B rows at once; the head's gradients
        (H, N, 4 * H, 1, True, False), (H, N, H, 1, True, False),
        (V, N, H, 1, True, False), (N, V, H, 1, False, False),
    ]


def inference_shapes(B: int, T: int, E: int, H: int) -> list:
    """Every matmul of one no-grad pass over bytes (featurization: no head). The first
    layer's input projections are looked up per byte value (sentdisc.kernels), so what is
    left are the two recurrent products per step."""
    return [(B, H, H, T, False, False), (B, H, 4 * H, T, False, False)]


def featurize_bound(lengths: Sequence[int], E: int, H: int, dtype=torch.float32,
                    pool: int = 128) -> tuple[float, float]:
    """(bytes/s, FLOP/s) that a no-grad pass over texts of these byte ``lengths``, all in one
    featurize pool, would reach at the GEMM rate of the shapes it really runs. Rows leave the
    batch as their texts end (featurize computes only the live rows), so step t multiplies
    m_t = #(lengths > t) rows: a batch-wide bound would flatter the short tail, where the
    products read the whole weight matrix for a few rows. Each m_t is timed as the next power
    of two (a bound that is, if anything, high); per byte, 2 x the recurrent weights."""
    import numpy as np

    lengths = np.asarray(lengths)
    if len(lengths) > pool:
        raise ValueError(f"featurize_bound: {len(lengths)} texts do not fit one pool of {pool}")
    live = (lengths[None, :] > np.arange(lengths.max())[:, None]).sum(1)  # m_t per step
    rows = np.minimum(2 ** np.ceil(np.log2(live)).astype(int), len(lengths))
    rate = {int(m): gemm_rate(inference_shapes(int(m), 1, E, H), dtype) for m in set(rows)}
    flops_per_byte = 2 * mlstm_weight_count(E, H)
    seconds = sum(int(m) * flops_per_byte / rate[int(r)] for m, r in zip(live, rows))
    return int(lengths.sum()) / seconds, int(lengths.sum()) * flops_per_byte / seconds


def _onednn_prepacked(a: torch.Tensor, b: torch.Tensor):
    """a @ b the way sentdisc.kernels runs a time loop's products on CPU (oneDNN on
    prepacked b), or None where the kernel would not prepack these operands."""
    from sentdisc import kernels
    if not a.is_contiguous() or not kernels._prepacks(b, a.shape[0], cached=True):
        return None
    packed = kernels._StepWeight(b, pack=True, rows=a.shape[0])
    return lambda: packed.mm(a)


def gemm_rate(shapes: Iterable[Shape], dtype=torch.float32, device="cpu", min_time=0.05,
              reps: int = 3) -> float:
    """FLOP/s of the given matmul mix on this machine: each distinct shape is timed alone
    (best of ``reps`` batches of >= ``min_time`` s), weighted by its call count. Each shape
    gets the faster of torch.mm and, on CPU, oneDNN on prepacked weights (on AMD EPYCs the
    latter is 20-30% faster at a time step's shapes): the bound is the machine's, not one
    library's."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else None
    flops = seconds = 0.0
    for m, k, n, count, ta, tb in shapes:
        a = torch.randn(k, m, dtype=dtype, device=device).t() if ta else \
            torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(n, k, dtype=dtype, device=device).t() if tb else \
            torch.randn(k, n, dtype=dtype, device=device)
        out = torch.empty(m, n, dtype=dtype, device=device)
        candidates = [lambda a=a, b=b, out=out: torch.mm(a, b, out=out)]
        prepacked = _onednn_prepacked(a, b)
        if prepacked is not None:
            candidates.append(prepacked)
        per_call = min(_time_per_call(fn, min_time, reps, sync) for fn in candidates)
        flops += 2.0 * m * k * n * count
        seconds += per_call * count
    return flops / seconds


def _time_per_call(fn: Callable[[], object], min_time: float, reps: int, sync) -> float:
    fn()
    calls = 1
    while True:  # enough calls for a measurable batch
        t = best_time(lambda n=calls: [fn() for _ in range(n)], reps=1, warmup=0, sync=sync)
        if t >= min_time or calls >= 4096:
            break
        calls *= 4
    return best_time(lambda: [fn() for _ in range(calls)], reps=reps, warmup=0, sync=sync) / calls


def bf16_plan(asked: str) -> tuple[bool, str]:
    """Whether to time bf16 rows (``asked``: auto | on | off), and why: auto times them where
    the CPU multiplies bf16 natively (sentdisc.precision, this machine's hardware, whatever
    SENTDISC_PRECISION says). Emulated bf16 runs at a fraction of fp32 (0.5 against 68
    GFLOP/s on an AVX2-only EPYC): timing a model in it would take hours and measure nothing
    a user would run."""
    from sentdisc.precision import Hardware

    hw = Hardware.detect("cpu", environ={})
    if asked == "off":
        return False, "bf16 rows off (--bf16 off)"
    if asked == "on" or hw.native_bf16:
        native = "native" if hw.native_bf16 else "emulated (--bf16 on)"
        return True, f"bf16 rows: {native}"
    probe = gemm_rate([(64, 512, 2048, 1, False, False)], torch.bfloat16, min_time=0.2, reps=1)
    fp32 = gemm_rate([(64, 512, 2048, 1, False, False)], torch.float32, min_time=0.2, reps=1)
    return False, (f"bf16 rows skipped: this CPU has no native bf16 (no AVX-512 BF16 or AMX; "
                   f"torch sees {hw.capability}): bf16 64x512x2048 runs at "
                   f"{probe / 1e9:.2f} GFLOP/s against {fp32 / 1e9:.0f} fp32, so precision auto "
                   f"is fp32 here (--bf16 on times it anyway)")


def fmt_rate(bytes_per_s: float) -> str:
    if bytes_per_s >= 1e6:
        return f"{bytes_per_s / 1e6:.2f} MB/s"
    return f"{bytes_per_s / 1e3:.2f} KB/s"


def print_table(rows: list, columns: list):
    """rows: list of dicts; columns: list of (key, header)."""
    cells = [[str(r.get(k, "")) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h) in enumerate(columns)]
    print("  ".join(h.ljust(w) for (_, h), w in zip(columns, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def wait_healthy(url: str, proc=None, timeout: float = 120) -> None:
    """Until ``url``/healthz answers 200: a server starting, or a route that Serve's ingress
    learns a moment after ``serve.run`` returns. ``proc``: the server's process, if ours."""
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if requests.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become healthy in {timeout:.0f} s")
