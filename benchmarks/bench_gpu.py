"""mLSTM-4096 training on one GPU: bf16 autocast, the whole step captured in a CUDA graph.

    bash benchmarks/gpu.sh                       # the prepared run (< 8 minutes, no network)
    python benchmarks/bench_gpu.py --dry_run     # the same code on CPU, tiny, to check it runs

For each batch size: bytes/s of a full training step (fused mLSTM from sentdisc.kernels,
cross entropy, backward, Adam) replayed from a CUDA graph, and the achieved FLOP/s
(6 x weights per byte) as a fraction of this GPU's bf16 matmul rate for the same shapes,
measured here. Then fp32 and bf16 runs from the same initial weights on the same bytes
for 200 steps (eager): their losses must agree.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))
from _common import fmt_rate, gemm_rate, head_weight_count, mlstm_weight_count, print_table, training_shapes  # noqa: E402

from sentdisc.model import ByteLM, ModelConfig  # noqa: E402
from sentdisc.train import train_step  # noqa: E402


def corpus(n_bytes: int) -> torch.Tensor:
    """Learnable bytes without network: this repository's own text, repeated."""
    data = b""
    for folder in ("sentdisc", "benchmarks", "tests", "jobs", "cluster", "serve", "docs"):
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix in (".py", ".md", ".yaml", ".toml", ".sh"):
                data += path.read_bytes()
    data = data or bytes(range(256))
    reps = n_bytes // len(data) + 1
    return torch.frombuffer(bytearray(data * reps)[:n_bytes], dtype=torch.uint8).long()


class Trainer:
    """One model + Adam + static input buffers; ``step()`` runs eagerly or from a graph."""

    def __init__(self, cfg, B, T, device, bf16, seed=0, graph=True):
        torch.manual_seed(seed)
        self.model = ByteLM(cfg).to(device)
        capturable = device.type == "cuda"
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3, capturable=capturable)
        self.batch = torch.zeros(B, T + 1, dtype=torch.long, device=device)
        self.reset = torch.zeros(B, T, dtype=torch.bool, device=device)
        self.reset[:, 0] = True  # each window starts fresh (persist_state=0)
        self.bf16, self.device, self.graph = bf16, device, None
        self.want_graph = graph and device.type == "cuda"
        self.graph_error = ""

    def _eager(self):
        # The training job's own step; the autocast cache must be off while a CUDA graph is
        # captured. Grads are set to None inside it: backward inside the capture then writes
        # fresh grads from the graph's pool on every replay instead of accumulating
        # (PyTorch's whole-network capture recipe).
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16,
                                  cache_enabled=False)
        loss, _ = train_step(self.model, self.opt, self.batch, self.reset, None,
                             autocast=autocast)
        return loss

    def load(self, batch):
        self.batch.copy_(batch)

    def warm_and_capture(self, batch):
        self.load(batch)
        if not self.want_graph:
            return self._eager()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up iterations on a side stream, as the docs do
            for _ in range(3):
                self._eager()
        torch.cuda.current_stream().wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.static_loss = self._eager()
            self.graph = graph
        except Exception as e:  # report and fall back to eager rather than lose the run
            self.graph_error = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            torch.cuda.synchronize()
        return None

    def step(self, batch=None):
        if batch is not None:
            self.load(batch)
        if self.graph is not None:
            self.graph.replay()
            return self.static_loss
        return self._eager()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rnn_size", type=int, default=4096)
    p.add_argument("--embed_size", type=int, default=64)
    p.add_argument("--seq_length", type=int, default=128)
    p.add_argument("--batch_sizes", default="128,256,512")
    p.add_argument("--timed_steps", type=int, default=10)
    p.add_argument("--agree_steps", type=int, default=200)
    p.add_argument("--agree_batch", type=int, default=128)
    p.add_argument("--dry_run", action="store_true", help="tiny model on CPU, eager")
    args = p.parse_args(argv)
    if args.dry_run:
        device = torch.device("cpu")
        args.rnn_size, args.batch_sizes, args.timed_steps = 32, "4,8", 2
        args.agree_steps, args.agree_batch, args.seq_length = 5, 4, 16
    elif not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: no CUDA device (use --dry_run to check the script on CPU)")
    else:
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the agreement run
        torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    E, H, T = args.embed_size, args.rnn_size, args.seq_length
    cfg = ModelConfig(embed_size=E, rnn_size=H)
    flops_per_byte = 6 * (mlstm_weight_count(E, H) + head_weight_count(H))
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}  {name}  torch {torch.__version__}  "
          f"mLSTM-{H} embed {E} seq {T}: {flops_per_byte / 1e6:.0f} MFLOP/byte (training)")
    data = corpus(max(int(b) for b in args.batch_sizes.split(",")) * (T + 1) * 4
                  + args.agree_batch * (T + 1) * args.agree_steps).to(device)

    def batch_at(i, B):
        n = B * (T + 1)
        start = (i * n) % max(1, data.numel() - n)
        return data[start:start + n].view(B, T + 1)

    rows = []
    for B in (int(b) for b in args.batch_sizes.split(",")):
        t0 = time.perf_counter()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        rate = gemm_rate(training_shapes(B, T, E, H), dtype=dtype, device=device, min_time=0.02)
        tr = Trainer(cfg, B, T, device, bf16=device.type == "cuda")
        tr.warm_and_capture(batch_at(0, B))
        tr.step(batch_at(1, B))
        sync(device)
        t1 = time.perf_counter()
        for i in range(args.timed_steps):
            loss = tr.step(batch_at(i + 2, B))
        sync(device)
        sec = (time.perf_counter() - t1) / args.timed_steps
        bps = B * T / sec
        rows.append(dict(B=B, mode="graph" if tr.graph is not None else
                         f"eager {tr.graph_error}".strip(),
                         rate=fmt_rate(bps), step=f"{sec * 1e3:.1f} ms",
                         tflops=f"{bps * flops_per_byte / 1e12:.1f}",
                         mm=f"{rate / 1e12:.1f}", frac=f"{bps * flops_per_byte / rate:.0%}",
                         loss=f"{float(loss.detach()):.3f}", wall=f"{time.perf_counter() - t0:.0f} s"))
        del tr
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, [("B", "batch"), ("mode", "step"), ("rate", "bytes/s"),
                       ("step", "step time"), ("tflops", "TFLOP/s"),
                       ("mm", "bf16 matmul TFLOP/s"), ("frac", "of matmul rate"),
                       ("loss", "last loss"), ("wall", "wall")])

    # fp32 vs bf16 from the same weights on the same bytes.
    B = args.agree_batch
    curves = {}
    for label, bf16 in (("fp32", False), ("bf16", True)):
        # Eager (no graph): same ops as the graph replays, and no warm-up steps to undo.
        t0 = time.perf_counter()
        tr = Trainer(cfg, B, T, device, bf16=bf16, seed=1, graph=False)
        steps = torch.zeros(args.agree_steps, device=device)
        for i in range(args.agree_steps):
            steps[i] = tr.step(batch_at(i, B)).detach()
        sync(device)
        curves[label] = steps.float().cpu()
        print(f"{label}: {args.agree_steps} steps at batch {B} in {time.perf_counter() - t0:.0f} s")
        del tr
    a, b = curves["fp32"], curves["bf16"]
    diff = (a - b).abs()
    tail = max(1, args.agree_steps // 10)
    rel = abs(a[-tail:].mean() - b[-tail:].mean()) / a[-tail:].mean()
    every = max(1, args.agree_steps // 10)
    print("step   fp32    bf16")
    for i in list(range(0, args.agree_steps, every)) + [args.agree_steps - 1]:
        print(f"{i:4d}  {a[i]:.4f}  {b[i]:.4f}")
    ok = bool(rel < 0.02 and diff.max() < 0.15)
    print(f"losses agree: {ok} (last-{tail}-step means {a[-tail:].mean():.4f} vs "
          f"{b[-tail:].mean():.4f}, rel diff {rel:.2%}; max per-step |diff| {diff.max():.4f})")


if __name__ == "__main__":
    main()
