"""Data-parallel scaling on CPU: 2 DDP workers x 1 thread vs 1 worker x 1 thread.

    python benchmarks/bench_ddp.py            # mLSTM-512, embed 64, batch 64/worker, seq 128
    python benchmarks/bench_ddp.py --quick

Each worker runs the training job's own step (``sentdisc.train.train_step``: fused mLSTM,
Adam) on its own batch of 64 x 128 bytes; the baseline is one process without DDP. Total
bytes/s = workers x B x T / step time. Gradients are all-reduced over gloo once per optimizer
step, in one bucket: the mLSTM's recurrent gradients all become ready together at the end of
the fused backward, so smaller buckets only add messages.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt_rate, load_note


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args, results):
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sentdisc.model import ByteLM, ModelConfig
    from sentdisc.train import train_step

    torch.manual_seed(0)  # same initial weights on every rank
    model = ByteLM(ModelConfig(embed_size=args.embed_size, rnn_size=args.rnn_size))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        # One bucket: the fused backward hands over all recurrent gradients at once.
        model = DDP(model, bucket_cap_mb=args.bucket_mb, gradient_as_bucket_view=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1 + rank)
    B, T = args.batch_size, args.seq_length
    batch = torch.randint(0, 256, (B, T + 1), generator=gen)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[:, 0] = True

    def step():
        train_step(model, opt, batch, reset)

    for _ in range(args.warmup):
        step()
    if world > 1:
        dist.barrier()
    best = float("inf")
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    if world > 1:
        # Weights must still agree across ranks (DDP really averaged the gradients).
        w = next(model.parameters()).detach().clone()
        ref = w.clone()
        dist.broadcast(ref, 0)
        results.put((rank, best, bool(torch.equal(w, ref))))
        dist.barrier()  # nobody tears gloo down while another rank still talks
        dist.destroy_process_group()
    else:
        results.put((rank, best, True))


def run(world: int, args) -> tuple:
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    out = []
    while len(out) < world and any(p.is_alive() for p in procs) or not results.empty():
        if not results.empty():
            out.append(results.get())
        else:
            time.sleep(0.1)
    for p in procs:
        p.join()
    if len(out) < world:
        raise SystemExit(f"a worker failed (exit codes {[p.exitcode for p in procs]})")
    if any(p.exitcode != 0 for p in procs):  # measured fine, died in teardown: say so
        print(f"  (note: worker exit codes {[p.exitcode for p in procs]} after reporting)")
    # The slowest rank sets the pace (every step waits for the all-reduce).
    step = max(o[1] for o in out)
    return world * args.batch_size * args.seq_length / step, step, all(o[2] for o in out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rnn_size", type=int, default=512)
    p.add_argument("--embed_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=64, help="per worker")
    p.add_argument("--seq_length", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="timed steps (best kept)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--bucket_mb", type=float, default=25.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"mLSTM-{args.rnn_size}, batch {args.batch_size}/worker, seq "
          f"{args.seq_length}, 1 thread per worker, gloo; {load_note()}")
    one, one_step, _ = run(1, args)
    print(f"1 worker  x 1 thread (no DDP): {fmt_rate(one)}  ({one_step:.3f} s/step)")
    many, many_step, same = run(args.workers, args)
    print(f"{args.workers} workers x 1 thread (DDP):    {fmt_rate(many)}  ({many_step:.3f} s/step)"
          f"  weights equal across ranks: {same}")
    print(f"scaling: {many / one:.2f}x (ideal {args.workers}.00x); {load_note()}")


if __name__ == "__main__":
    main()
