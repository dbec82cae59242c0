"""One H200 in one table: mLSTM-4096 training (eager vs CUDA graph), fp32 vs bf16 losses, the
real Ray Train job, featurization, and the ETA of the paper's epoch.

    bash benchmarks/gpu.sh                   # the prepared run (< 8 minutes, no network)
    bash benchmarks/gpu.sh --dry_run         # the same stages on CPU, tiny (< 1 minute)

(a) for each batch (128/256/512 x 256 bytes): bytes/s of the library's train step
    (sentdisc.train.step.TrainStep: fused mLSTM, cross entropy, backward, clip, Adam), eager
    and replayed from a CUDA graph, its FLOP/s (6 x weights per byte) and that as a fraction
    of this GPU's bf16 matmul rate for the same shapes, measured in this run;
(b) fp32 and bf16 from the same weights on the same bytes for 200 steps: the losses agree
    within the stated tolerance;
(c) jobs/pretrain.py through Ray Train on this GPU for ~2 minutes on the carried text slice;
(d) featurize (sentdisc.features) of an mLSTM-4096 on SST-2 test: fp32, bf16, bf16 + graph;
(e) the ETA of one ~38 GB epoch (the paper's Amazon corpus) at the measured rates.

The table goes to benchmarks/results/gpu_<date>.md (gpu_dryrun_<date>.md for a dry run). In
a dry run the graph paths run their captured bodies eagerly (``simulate``): every stage's code
runs, no number means anything.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))
from _common import fmt_rate, gemm_rate, head_weight_count, mlstm_weight_count, print_table, training_shapes  # noqa: E402

from sentdisc import features  # noqa: E402
from sentdisc.model import ByteLM, ModelConfig  # noqa: E402
from sentdisc.train.step import TrainStep  # noqa: E402

COLUMNS = [("stage", "stage"), ("what", "what"), ("mode", "step"), ("rate", "bytes/s"),
           ("tflops", "TFLOP/s"), ("frac", "of bf16 matmul"), ("note", "note")]
AGREE_REL, AGREE_MAX = 0.02, 0.15  # (b): last-10% mean loss within 2%, every step within 0.15


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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device):
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Bench:
    """The run's settings and the bytes every training stage reads."""

    def __init__(self, args):
        self.args, self.dry = args, args.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.E, self.H, self.T = args.embed_size, args.rnn_size, args.seq_length
        self.cfg = ModelConfig(embed_size=self.E, rnn_size=self.H)
        self.flops_per_byte = 6 * (mlstm_weight_count(self.E, self.H) + head_weight_count(self.H))
        biggest = max(args.batch_sizes)
        self.data = corpus(biggest * (self.T + 1) * (args.timed_steps + 4)
                           + args.agree_batch * (self.T + 1) * args.agree_steps).to(self.device)
        self.rows, self.rates = [], {}
        self.deadline = time.perf_counter() + args.budget_s

    def matmul_rate(self, B) -> float:
        """This device's FLOP/s on one step's matmul shapes (bf16 on GPU), measured once."""
        if B not in self.rates:
            dtype = torch.float32 if self.dry else torch.bfloat16
            self.rates[B] = gemm_rate(training_shapes(B, self.T, self.E, self.H), dtype=dtype,
                                      device=self.device, min_time=0.002 if self.dry else 0.02)
        return self.rates[B]

    def batch_at(self, i, B):
        n = B * (self.T + 1)
        start = (i * n) % max(1, self.data.numel() - n)
        return self.data[start:start + n].view(B, self.T + 1)

    def run_steps(self, B, mode, precision, steps, seed=0, warm=2):
        """(seconds per step over the timed steps, their losses [steps], the TrainStep)."""
        torch.manual_seed(seed)
        model = ByteLM(self.cfg).to(self.device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        step = TrainStep(model, opt, mode=mode, precision=precision, clip=1.0, log=None,
                         simulate=self.dry and mode != "off")
        reset = torch.zeros(B, self.T, dtype=torch.bool, device=self.device)
        reset[:, 0] = True  # each window starts a fresh record (persist_state=0)
        hidden, losses = None, torch.zeros(steps, device=self.device)
        for i in range(warm):  # the graph's warm-up and capture happen in the first
            _, hidden = step(self.batch_at(i, B), reset, hidden)
        sync(self.device)
        t0 = time.perf_counter()
        for i in range(steps):
            loss, hidden = step(self.batch_at(i + warm, B), reset, hidden)
            losses[i] = loss
        sync(self.device)
        return (time.perf_counter() - t0) / steps, losses.cpu(), step


def stage_train(b: Bench):
    """(a) bytes/s, FLOP/s and fraction of the matmul rate, eager vs graph, per batch."""
    for B in b.args.batch_sizes:
        rate = b.matmul_rate(B)
        losses = {}
        for mode in ("off", "auto"):  # auto: a failed capture is a row that says why
            sec, losses[mode], step = b.run_steps(B, mode, "bf16", b.args.timed_steps)
            bps = B * b.T / sec
            label = "graph" if step.graphed else "eager"
            if step.graphed and b.dry:
                label = "graph (simulated)"
            note = f"step {sec * 1e3:.1f} ms"
            if mode == "auto" and not step.graphed:
                note += f"; no graph: {step.reason}"
            elif mode == "auto":
                note += f"; |loss - eager loss| <= {(losses['auto'] - losses['off']).abs().max():.2e}"
                b.rates[("graph", B)] = bps
            b.rows.append(dict(stage="a", what=f"train mLSTM-{b.H} B={B} T={b.T} bf16",
                               mode=label, rate=fmt_rate(bps),
                               tflops=f"{bps * b.flops_per_byte / 1e12:.1f}",
                               frac=f"{bps * b.flops_per_byte / rate:.0%}", note=note))
            del step
            free(b.device)
        print(f"(a) batch {B}: done", flush=True)


def stage_agree(b: Bench):
    """(b) fp32 vs bf16 losses over the same steps from the same weights."""
    B, n = b.args.agree_batch, b.args.agree_steps
    curves, modes = {}, []
    t0 = time.perf_counter()
    for precision in ("fp32", "bf16"):
        _, curves[precision], step = b.run_steps(B, "auto", precision, n, seed=1, warm=0)
        modes.append(("graph (simulated)" if b.dry else "graph") if step.graphed else "eager")
        del step
        free(b.device)
    a, c = curves["fp32"], curves["bf16"]
    tail = max(1, n // 10)
    rel = float(abs(a[-tail:].mean() - c[-tail:].mean()) / a[-tail:].mean())
    worst = float((a - c).abs().max())
    ok = rel < AGREE_REL and worst < AGREE_MAX
    print("(b) step   fp32    bf16")
    for i in sorted(set(range(0, n, max(1, n // 10))) | {n - 1}):
        print(f"    {i:4d}  {a[i]:.4f}  {c[i]:.4f}")
    b.rows.append(dict(
        stage="b", what=f"fp32 vs bf16, {n} steps B={B} T={b.T}", mode="/".join(modes),
        note=f"agree: {ok} (last-{tail} means {a[-tail:].mean():.4f} vs {c[-tail:].mean():.4f}, "
             f"rel {rel:.2%} < {AGREE_REL:.0%}; max |diff| {worst:.3f} < {AGREE_MAX}; "
             f"loss {a[0]:.3f} -> {a[-1]:.3f}) in {time.perf_counter() - t0:.0f} s"))


def text_slice(args, tmp: Path) -> Path:
    """The carried slice (.gpu_data/text, from `gpu.sh prepare`), or this repository's text
    as JSON lines when there is none (a dry run)."""
    carried = REPO / ".gpu_data" / "text"
    if carried.is_dir() and any(carried.iterdir()) and not args.dry_run:
        return carried
    folder = tmp / "text"
    folder.mkdir(parents=True, exist_ok=True)
    raw = bytes(corpus(200_000 if args.dry_run else 4_000_000).to(torch.uint8).numpy())
    text = raw.decode("utf-8", "replace")
    with open(folder / "part-00.json", "w") as f:
        for i in range(0, len(text), 2000):
            f.write(json.dumps({"reviewText": text[i:i + 2000]}) + "\n")
    return folder


def stage_pretrain(b: Bench):
    """(c) the real job: jobs/pretrain.py on Ray Train, one worker on this GPU."""
    a = b.args
    try:
        import ray  # noqa: F401
    except ImportError as e:
        b.rows.append(dict(stage="c", what="jobs/pretrain.py, Ray Train, 1 GPU", mode="-",
                           note=f"skipped: {e} (carry Ray: gpu.sh prepare)"))
        return
    B = a.batch_sizes[0]
    step_rate = b.rates.get(("graph", B), 1e4)
    # what is left of the run's budget, less Ray's start, the final eval and the later stages
    seconds = max(30.0, min(a.pretrain_s, b.deadline - time.perf_counter() - 100))
    iters = a.pretrain_iters or max(20, int(seconds * step_rate / (B * b.T)))
    with tempfile.TemporaryDirectory() as tmp:
        data = text_slice(a, Path(tmp))
        cmd = [sys.executable, "jobs/pretrain.py", "--train", str(data),
               "--text_key", "reviewText", "--loose_json", "--split", "0.98,0.01,0.01",
               "--rnn_size", str(b.H), "--embed_size", str(b.E), "--batch_size", str(B),
               "--seq_length", str(b.T), "--precision", "bf16", "--cuda_graph", "auto",
               "--lr", "5e-4", "--max_iters", str(iters), "--log_interval", str(max(1, iters // 10)),
               "--save_iters", str(10 * iters), "--eval_iters", "2", "--num_workers", "1",
               "--cpus_per_worker", "1" if b.dry else "4", "--threads_per_worker",
               "1" if b.dry else "4", "--keep_checkpoints", "1", "--max_failures", "0",
               "--experiment_dir", tmp, "--experiment_name", "gpu"]
        cmd += ["--no-use_gpu"] if b.dry else ["--use_gpu"]
        if "TrackingConfig" in (REPO / "sentdisc" / "recipes" / "pretrain.py").read_text():
            cmd += ["--tracking", "none"]  # MLflow is not in the GPU image, and not measured
        t0 = time.perf_counter()
        # a Ray of its own (not one another user started here), its logs in our folder
        env = dict(os.environ, RAY_ADDRESS="local", RAY_TMPDIR=tmp)
        try:
            run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                                 timeout=seconds + 120, env=env)
        except subprocess.TimeoutExpired as e:  # keep what the job reported until then
            run = subprocess.CompletedProcess(cmd, "timeout", _text(e.stdout), _text(e.stderr))
        wall = time.perf_counter() - t0
        rate = _job_rate(Path(tmp) / "gpu" / "history.csv", run.stdout)
        mode = _job_mode(Path(tmp))
    if run.returncode != 0 or rate is None:
        tail = (run.stdout + run.stderr).strip().splitlines()[-3:]
        b.rows.append(dict(stage="c", what="jobs/pretrain.py, Ray Train, 1 GPU", mode=mode,
                           note=f"failed (rc {run.returncode}): {' | '.join(tail)[:300]}"))
        return
    b.rates["job"] = rate
    b.rows.append(dict(stage="c", what=f"jobs/pretrain.py, Ray Train, 1 {b.device.type}, "
                                       f"B={B} T={b.T} bf16", mode=mode, rate=fmt_rate(rate),
                       tflops=f"{rate * b.flops_per_byte / 1e12:.1f}",
                       frac=f"{rate * b.flops_per_byte / b.matmul_rate(B):.0%}",
                       note=f"{iters} iterations, {wall:.0f} s wall with Ray start and eval"))


def _text(out) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def _job_rate(history: Path, stdout: str):
    """Median bytes/s of the job's reports after the first (which holds the startup), from
    its history, or from its progress lines when it was stopped before writing one."""
    if history.exists():
        import pandas as pd
        rates = pd.read_csv(history)["bytes_per_s"].dropna().to_numpy()
    else:
        unit = {"KB": 1e3, "MB": 1e6}
        rates = np.array([float(v) * unit[u] for v, u in re.findall(r"\| ([\d.]+) ([KM]B)/s \|",
                                                                     stdout)])
    rates = rates[rates > 0]
    return float(np.median(rates[1:] if len(rates) > 1 else rates)) if len(rates) else None


def _job_mode(ray_tmp: Path) -> str:
    """What rank 0 said about --cuda_graph: workers log to Ray's session folder, not here."""
    logs = sorted(ray_tmp.glob("ray/session_*/logs/worker-*.out"))
    said = [m for p in logs for m in re.findall(r"\[pretrain\] (cuda_graph [^\n]*)", p.read_text(
        errors="replace"))]
    if not said:
        return "?"
    if "replayed" in said[-1]:
        return "graph"
    return "eager: " + said[-1].split("because ")[-1].split(" (")[0][:40]


def stage_featurize(b: Bench):
    """(d) featurize bytes/s on SST-2 test: fp32 and bf16 eager, bf16 from the graph."""
    texts = sst2_test(b.args)
    n_bytes = sum(len(t.encode()) for t in texts)
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(embed_size=b.E, rnn_size=b.H)).to(b.device).eval()
    runs = (("fp32", "off"), ("bf16", "off"), ("bf16", "on"))
    out = {}
    for precision, graph in runs:
        call = functools.partial(features.featurize, model, batch_size=b.args.featurize_batch,
                                 precision=precision, cuda_graph=graph)
        with _simulated_graph(b.dry and graph == "on"):
            call(texts[:64])  # warm-up: allocator, cuBLAS handles
            sync(b.device)
            t0 = time.perf_counter()
            out[(precision, graph)] = call(texts)
            sync(b.device)
        sec = time.perf_counter() - t0
        diff = np.abs(out[(precision, graph)] - out[("fp32", "off")]).max()
        mode = ("graph (simulated)" if b.dry else "graph") if graph == "on" else "eager"
        b.rows.append(dict(stage="d", what=f"featurize SST-2 test ({len(texts)} texts, "
                                           f"{n_bytes / 1e3:.0f} KB) mLSTM-{b.H} {precision}",
                           mode=mode, rate=fmt_rate(n_bytes / sec),
                           note=f"{sec:.2f} s; max |cell - fp32 eager| {diff:.1e}"))
        b.rates[("feat", precision, graph)] = n_bytes / sec
    del model
    free(b.device)


def _simulated_graph(on: bool):
    """Dry runs on CPU: featurize's graph path with its captured step run eagerly."""
    import contextlib
    from unittest import mock

    if not on:
        return contextlib.nullcontext()
    real = features._chunk_runner
    return mock.patch.object(features, "_chunk_runner",
                             lambda *a, **kw: real(*a[:-1], "on", simulate=True))


def sst2_test(args) -> list:
    import pandas as pd
    for root in (REPO / ".gpu_data", Path(os.environ.get("SENTDISC_DATA", REPO.parent / "shared" / "data"))):
        path = root / "sst2" / "test.csv"
        if path.exists():
            texts = pd.read_csv(path)["sentence"].astype(str).tolist()
            return texts[:200] if args.dry_run else texts
    raise SystemExit("bench_gpu: no sst2/test.csv in .gpu_data/ or $SENTDISC_DATA (gpu.sh prepare)")


def stage_eta(b: Bench):
    """(e) one epoch of the paper's corpus at the rates measured above."""
    epoch = b.args.epoch_gb * 1e9
    graph = {k[1]: v for k, v in b.rates.items() if isinstance(k, tuple) and k[0] == "graph"}
    measured = [("the Ray Train job (c)", b.rates.get("job"))]
    if graph:
        best = max(graph, key=graph.get)
        measured.insert(0, (f"the graph step's best (a), B={best}", graph[best]))
    for label, rate in measured:
        if rate:
            b.rows.append(dict(stage="e", what=f"ETA {b.args.epoch_gb:.0f} GB epoch at {label}",
                               rate=fmt_rate(rate), note=_human(epoch / rate) + " on one GPU"))


def _human(seconds: float) -> str:
    if seconds > 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    return f"{seconds / 3600:.1f} h" if seconds > 3600 else f"{seconds / 60:.0f} min"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rnn_size", type=int, default=4096)
    p.add_argument("--embed_size", type=int, default=64)
    p.add_argument("--seq_length", type=int, default=256)
    p.add_argument("--batch_sizes", default="128,256,512")
    p.add_argument("--timed_steps", type=int, default=10)
    p.add_argument("--agree_steps", type=int, default=200)
    p.add_argument("--agree_batch", type=int, default=64)
    p.add_argument("--pretrain_s", type=float, default=120, help="(c): seconds of training")
    p.add_argument("--pretrain_iters", type=int, default=0, help="(c): iterations (0: from -s)")
    p.add_argument("--featurize_batch", type=int, default=128)
    p.add_argument("--epoch_gb", type=float, default=38.0, help="(e): the paper's corpus")
    p.add_argument("--stages", default="a,b,d,c,e", help="in this order; (c) takes what is left")
    p.add_argument("--budget_s", type=float, default=450, help="the whole run, gpu.sh's timeout less")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--dry_run", action="store_true", help="every stage on CPU, tiny")
    args = p.parse_args(argv)
    if args.dry_run:
        args.rnn_size, args.embed_size, args.seq_length, args.batch_sizes = 32, 16, 16, "4,8"
        args.timed_steps, args.agree_steps, args.agree_batch = 2, 5, 4
        args.pretrain_iters, args.featurize_batch = 6, 16
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    return args


def main(argv=None):
    args = parse(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: no CUDA device (--dry_run checks the script on CPU)")
    if not args.dry_run:  # fp32 means fp32 in (b)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    else:
        torch.set_num_threads(1)
    b = Bench(args)
    name = torch.cuda.get_device_name() if not args.dry_run else "cpu (DRY RUN: no GPU numbers)"
    head = (f"{datetime.datetime.now():%Y-%m-%d %H:%M}  {name}  torch {torch.__version__}  "
            f"mLSTM-{b.H} embed {b.E} seq {b.T}: {b.flops_per_byte / 1e6:.0f} MFLOP/byte (training)")
    print(head, flush=True)
    stages = {"a": stage_train, "b": stage_agree, "c": stage_pretrain, "d": stage_featurize,
              "e": stage_eta}
    for key in args.stages.split(","):
        t0 = time.perf_counter()
        stages[key](b)
        print(f"stage {key}: {time.perf_counter() - t0:.0f} s", flush=True)
        write_table(args, head, b.rows, quiet=True)  # a run cut short keeps its finished stages
    print_table(b.rows, COLUMNS)
    write_table(args, head, b.rows)


def write_table(args, head: str, rows: list, quiet: bool = False):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_table(rows, COLUMNS)
    kind = "gpu_dryrun" if args.dry_run else "gpu"
    out = Path(args.out) / f"{kind}_{datetime.date.today().isoformat()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# benchmarks/bench_gpu.py{' --dry_run' if args.dry_run else ''}\n\n"
                   f"{head}\n\n```\n{buf.getvalue()}```\n")
    if not quiet:
        print(f"saved {out}")


if __name__ == "__main__":
    main()
