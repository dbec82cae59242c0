"""Distributed byte-LM pretraining: Ray Data shards -> BytePacker -> DDP mLSTM on Ray Train.

The driver (``pretrain``) builds the datasets (a bad path fails here, before any worker starts),
sizes the run, and starts a TorchTrainer. Each worker (``train_loop``) packs its shard into
``batch_size / num_workers`` parallel byte streams and trains on [B, T+1] windows, carrying the
hidden state from window to window (detached) and zeroing it where the packer's reset mask says:
the "transposed" batches of Radford et al. Every ``log_interval`` all ranks report (a barrier);
every ``save_iters`` and at each epoch end rank 0 also writes a checkpoint in sentdisc's format
(model, optimizer + scheduler, iteration, data position), which Ray Train keeps (newest N) and
hands back through ``ray.train.get_checkpoint()`` when a failed worker group is restarted.
After training the workers evaluate val/test bits per byte and write the final checkpoint.

Metrics reach the driver through a controller callback and a small actor, so the driver can
print progress lines, and write ``history.csv`` and ``loss.png`` whatever node rank 0 ran on.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from sentdisc import checkpoint as ckpt_io
from sentdisc.model import ByteLM, ModelConfig
from sentdisc.runtime import ensure_ray
from sentdisc.report import (merge_rows, plot_loss, progress_line, read_history,
                             write_history)

LN2 = math.log(2.0)
SKIP_REASONS = ("bad_json", "missing_key", "empty_text", "invalid_utf8")
SCHEDULES = {"linear": "linear", "linearlr": "linear", "exponential": "exponential",
             "exponentiallr": "exponential", "none": "none", "constant": "none"}
PRECISIONS = ("fp32", "bf16", "fp16")
# Above this many input bytes the driver does not read the corpus once just to size the run.
COUNT_LIMIT_BYTES = 2 * 1024 ** 3


@dataclass
class TrainConfig:
    batch_size: int = field(default=64, metadata={
        "help": "parallel byte streams in total, split evenly over the workers"})
    seq_length: int = field(default=128, metadata={"help": "bytes per window (truncated BPTT)"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate"})
    lr_scheduler: str = field(default="linear", metadata={
        "help": "linear (decay to 0 over the run, as the paper) | exponential | none"})
    lr_factor: float = field(default=1.0, metadata={
        "help": "exponential schedule: lr multiplied by this every iteration"})
    warmup_iters: int = field(default=0, metadata={"help": "linear warmup iterations"})
    optimizer_type: str = field(default="Adam", metadata={"help": "any torch.optim class name"})
    weight_decay: float = 0.0
    clip: float = field(default=1.0, metadata={"help": "gradient norm clip (0 = off)"})
    epochs: int = field(default=1, metadata={"help": "passes over the training data"})
    max_iters: int = field(default=0, metadata={
        "help": "total iterations; when > 0 it overrides epochs (the data repeats as needed)"})
    log_interval: int = field(default=10, metadata={"help": "iterations between reports"})
    save_iters: int = field(default=1000, metadata={"help": "iterations between checkpoints"})
    eval_iters: int = field(default=0, metadata={
        "help": "windows per worker when evaluating val/test after training (0 = all)"})
    precision: str = field(default="fp32", metadata={"help": "fp32 | bf16 (autocast) | fp16 (GPU)"})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers (DDP ranks)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker, NCCL"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "Ray CPUs reserved per worker"})
    threads_per_worker: int = field(default=0, metadata={
        "help": "torch threads per worker (0 = the CPUs Ray gives it)"})
    experiment_dir: str = field(default="experiments", metadata={
        "help": "Ray Train storage path; outputs go to experiment_dir/experiment_name"})
    experiment_name: str = field(default="pretrain", metadata={
        "help": "run name; rerunning the same name resumes from its newest checkpoint"})
    keep_checkpoints: int = field(default=3, metadata={"help": "newest checkpoints kept"})
    max_failures: int = field(default=2, metadata={
        "help": "worker-group restarts from the latest checkpoint before giving up"})
    resume: str = field(default="", metadata={
        "help": "checkpoint directory to continue from (model, optimizer, iteration)"})
    fail_at_iter: int = field(default=0, metadata={
        "help": "fault-injection for tests: the last rank SIGKILLs itself once at this iteration"})

    def __post_init__(self):
        positive = ("batch_size", "seq_length", "epochs", "log_interval", "save_iters",
                    "num_workers", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "eval_iters", "max_failures", "threads_per_worker",
                     "fail_at_iter"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.lr_scheduler.lower() not in SCHEDULES:
            raise ValueError(f"TrainConfig.lr_scheduler must be linear, exponential or none, "
                             f"got {self.lr_scheduler!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("TrainConfig.precision fp16 needs use_gpu (on CPU use bf16 or fp32)")
        if self.batch_size % self.num_workers:
            raise ValueError(f"TrainConfig.batch_size {self.batch_size} must be divisible by "
                             f"num_workers {self.num_workers} (it is the total over workers)")
        optimizer_class(self.optimizer_type)

    @property
    def schedule(self) -> str:
        return SCHEDULES[self.lr_scheduler.lower()]


def optimizer_class(name: str):
    cls = getattr(torch.optim, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        names = sorted(n for n, c in vars(torch.optim).items()
                       if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)
                       and c is not torch.optim.Optimizer)
        raise ValueError(f"TrainConfig.optimizer_type {name!r} is not a torch.optim optimizer; "
                         f"choose one of {names}")
    return cls


def lr_multiplier(tc: TrainConfig, total_iters: Optional[int]):
    """Iteration -> factor on ``lr``: optional linear warmup times the decay schedule."""
    schedule, warmup, factor = tc.schedule, tc.warmup_iters, tc.lr_factor

    def f(it: int) -> float:
        warm = min(1.0, (it + 1) / warmup) if warmup else 1.0
        if schedule == "linear":
            return warm * max(0.0, 1.0 - it / total_iters)
        if schedule == "exponential":
            return warm * factor ** it
        return warm
    return f


# --- the per-worker loop ---------------------------------------------------------------------

def train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from sentdisc.data.packer import BytePacker

    tc = TrainConfig(**config["train"])
    model_cfg = ModelConfig.from_dict(config["model"])
    persist_state, seed = config["persist_state"], config["seed"]
    total_iters = config["total_iters"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if tc.threads_per_worker:
        torch.set_num_threads(tc.threads_per_worker)

    # Restore: Ray's latest checkpoint (a restarted worker group) wins over an explicit resume.
    state = {"iteration": 0, "epoch": 0, "bytes_seen": 0, "epoch_done": False, "workers": None}
    checkpoint = ray.train.get_checkpoint()
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(checkpoint.as_directory()) if checkpoint else tc.resume or None
        torch.manual_seed(seed)  # same initial weights on every rank (DDP also broadcasts)
        model = (ckpt_io.load(source, map_location=device) if source else ByteLM(model_cfg)).to(device)
        model.train()
        optimizer = optimizer_class(tc.optimizer_type)(model.parameters(), lr=tc.lr,
                                                       weight_decay=tc.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(tc, total_iters))
        if source:
            saved = ckpt_io.load_optimizer_state(source)
            if saved:
                optimizer.load_state_dict(saved["optimizer"])
                scheduler.load_state_dict(saved["scheduler"])
            state.update(ckpt_io.load_train_state(source) or {})
    resumed_from = state["iteration"]
    torch.manual_seed(seed + 1000 * rank + resumed_from)  # dropout masks differ across ranks
    ddp_model = ray.train.torch.prepare_model(model)

    shard = ray.train.get_dataset_shard("train")
    per_worker = tc.batch_size // world
    packer = BytePacker(per_worker, tc.seq_length, persist_state)
    workers = state.get("workers")
    # A restored epoch may have nothing left to read; only a fresh epoch must give windows.
    mid_epoch = bool(workers and len(workers) == world and not state.get("epoch_done")
                     and workers[rank]["packer"]["records_consumed"])
    if workers and len(workers) == world:
        # The packer passes over the records it had consumed, keeping its partial streams.
        packer.load_state_dict(workers[rank]["packer"])
    elif workers:
        print(f"[pretrain] resuming {len(workers)} workers' data position on {world} workers: "
              f"epoch {state['epoch']} restarts from its first record", flush=True)
    if state.get("epoch_done"):  # saved at an epoch's end: start the next one
        packer.new_epoch()
        state["epoch"] += 1

    scaler = torch.amp.GradScaler("cuda") if tc.precision == "fp16" else None
    autocast = _autocast(tc.precision, device)
    iteration, epoch, bytes_seen = state["iteration"], state["epoch"], state["bytes_seen"]
    last_saved = iteration if source else -1
    interval = _Interval()
    last_loss: Optional[float] = None
    start: Optional[float] = None  # first window's arrival: throughput and ETA exclude startup
    fail_marker = Path(config["run_dir"]) / ".fail_at_iter_done"

    def report(final_eval: Optional[dict] = None, save: bool = False, epoch_done: bool = False):
        nonlocal last_loss, last_saved, bytes_seen
        stats = interval.totals(packer.counts, device)
        if dist:
            torch.distributed.all_reduce(stats)
        stats = stats.tolist()
        loss_sum, n_pred, interval_bytes, elapsed = stats[0], stats[1], stats[2], interval.elapsed()
        bytes_seen += int(interval_bytes)
        loss = loss_sum / n_pred if n_pred else last_loss
        last_loss = loss
        counts = dict(zip(_COUNT_KEYS, (int(v) for v in stats[3:])))
        run_s = time.perf_counter() - start if start is not None else 0.0
        done_iters = iteration - resumed_from
        metrics = {
            "iteration": iteration, "epoch": epoch,
            "loss": loss, "bpb": loss / LN2 if loss is not None else None,
            "lr": optimizer.param_groups[0]["lr"],
            "bytes_per_s": interval_bytes / elapsed if elapsed > 0 else 0.0,
            "bytes_seen": bytes_seen, "elapsed_s": run_s,
            "total_iters": total_iters,
            "eta_s": (total_iters - iteration) * run_s / done_iters
            if total_iters and done_iters else None,
            **counts, "skipped_total": sum(counts[f"skipped_{r}"] for r in SKIP_REASONS),
            "param_checksum": _checksum(model), "resumed_from": resumed_from, "world_size": world,
            **(final_eval or {}),
        }
        interval.reset()
        if not save:
            ray.train.report(metrics)
            return
        worker_state = {"packer": packer.state_dict()}
        workers_all = [worker_state]
        if dist:
            workers_all = [None] * world
            torch.distributed.all_gather_object(workers_all, worker_state)
        name = f"checkpoint_{iteration:08d}" + ("_final" if final_eval else "")
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                train_state = {"iteration": iteration, "epoch": epoch, "epoch_done": epoch_done,
                               "final": bool(final_eval), "bytes_seen": bytes_seen,
                               "lr": metrics["lr"], "total_iters": total_iters,
                               "workers": workers_all}
                meta = {"train": dataclasses.asdict(tc), "iteration": iteration,
                        "bpb": metrics["bpb"],
                        **{k: v for k, v in (final_eval or {}).items() if k.endswith("_bpb")}}
                ckpt_io.save(model, tmp, {"optimizer": optimizer.state_dict(),
                                          "scheduler": scheduler.state_dict()}, train_state, meta)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        last_saved = iteration

    def finished(epochs_done: int) -> bool:
        return iteration >= tc.max_iters if tc.max_iters else epochs_done >= tc.epochs

    hidden = None
    while not finished(epoch):
        windows = packer.windows(_batches(shard))
        first_iteration = iteration
        epoch_over = False
        while not finished(epoch):
            window = next(windows, None)
            if _any_rank_out(window is None, device, dist):
                epoch_over = True
                break
            if start is None:
                start = time.perf_counter()
                interval.reset()
            x = window.x.to(device, non_blocking=True)
            reset = window.reset.to(device, non_blocking=True)
            with autocast:
                logits, hidden = ddp_model(x[:, :-1], hidden, reset)
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                       x[:, 1:].reshape(-1))
            hidden = [(h.detach(), c.detach()) for h, c in hidden]  # truncated BPTT
            optimizer.zero_grad(set_to_none=True)
            if scaler:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if tc.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            iteration += 1
            n_pred = x[:, 1:].numel()
            interval.add(loss.item() * n_pred, n_pred, window.n_bytes)
            if (tc.fail_at_iter and iteration == tc.fail_at_iter and rank == world - 1
                    and not fail_marker.exists()):
                # Let the controller register the checkpoints reported so far, as it would
                # have long before a real crash, then die without any cleanup.
                ray.train.get_all_reported_checkpoints(
                    consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
                fail_marker.parent.mkdir(parents=True, exist_ok=True)
                fail_marker.write_text(f"killed rank {rank} at iteration {iteration}\n")
                os.kill(os.getpid(), signal.SIGKILL)
            save = iteration % tc.save_iters == 0 and not finished(epoch)
            if save or iteration % tc.log_interval == 0:
                report(save=save)
        if not epoch_over:
            break  # max_iters reached mid-epoch
        # Epoch over: every rank stops as soon as the first runs dry, so DDP never waits on a
        # rank that has finished.
        if iteration == first_iteration and not mid_epoch:
            raise RuntimeError(
                f"rank {rank}: the training data gives no full window of {per_worker} streams x "
                f"{tc.seq_length + 1} bytes per worker; use a smaller batch_size or seq_length, "
                f"fewer workers, or more data")
        if not finished(epoch + 1) and last_saved != iteration:
            report(save=True, epoch_done=True)
        packer.new_epoch()
        epoch += 1
        mid_epoch = False

    # Val/test bits per byte on the final weights: persistent state, no grad, all ranks.
    results = {}
    for split in config["eval_splits"]:
        totals = _evaluate(model, ray.train.get_dataset_shard(split), per_worker, tc.seq_length,
                           persist_state, tc.eval_iters, device, autocast)
        if dist:
            torch.distributed.all_reduce(totals)
        loss_sum, n_pred = totals.tolist()
        results[f"{split}_bytes"] = int(n_pred)
        results[f"{split}_bpb"] = loss_sum / n_pred / LN2 if n_pred else None
    # A run restored from its own final checkpoint (rerun of a finished job) saves nothing new.
    report(final_eval={"final": True, **results},
           save=not (state.get("final") and iteration == resumed_from))


@torch.no_grad()
def _evaluate(model: ByteLM, shard, batch_size: int, seq_length: int, persist_state: int,
              max_windows: int, device, autocast) -> torch.Tensor:
    from sentdisc.data.packer import BytePacker

    model.eval()
    packer = BytePacker(batch_size, seq_length, persist_state)
    hidden, loss_sum, n_pred = None, 0.0, 0
    for i, window in enumerate(packer.windows(_batches(shard))):
        if max_windows and i >= max_windows:
            break
        x = window.x.to(device)
        with autocast:
            logits, hidden = model(x[:, :-1], hidden, window.reset.to(device))
        loss_sum += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                    x[:, 1:].reshape(-1), reduction="sum").item()
        n_pred += x[:, 1:].numel()
    model.train()
    return torch.tensor([loss_sum, float(n_pred)], dtype=torch.float64, device=device)


def evaluate_bpb(model: ByteLM, dataset, batch_size: int = 32, seq_length: int = 256,
                 persist_state: int = 0, max_windows: int = 0) -> float:
    """Bits per byte of ``model`` on a dataset (anything with ``iter_batches``), no grad.

    The same packing and loss as training's own validation, for use outside a Train run.
    """
    totals = _evaluate(model, dataset, batch_size, seq_length, persist_state, max_windows,
                       model.device, contextlib.nullcontext())
    loss_sum, n = totals.tolist()
    return loss_sum / max(n, 1.0) / math.log(2)


_COUNT_KEYS = ("records", "dropped_bytes") + tuple(f"skipped_{r}" for r in SKIP_REASONS)


class _Interval:
    """Loss and bytes since the last report, on this rank."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.loss_sum, self.n_pred, self.bytes, self.t0 = 0.0, 0, 0, time.perf_counter()

    def add(self, loss_sum: float, n_pred: int, n_bytes: int):
        self.loss_sum += loss_sum
        self.n_pred += n_pred
        self.bytes += n_bytes

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def totals(self, counts: dict, device) -> torch.Tensor:
        values = [self.loss_sum, self.n_pred, self.bytes] + [counts.get(k, 0) for k in _COUNT_KEYS]
        return torch.tensor(values, dtype=torch.float64, device=device)


def _batches(shard):
    return shard.iter_batches(batch_format="numpy", prefetch_batches=2)


def _any_rank_out(out: bool, device, dist: bool) -> bool:
    """True on every rank as soon as one rank has no window left this epoch."""
    if not dist:
        return out
    flag = torch.tensor([1.0 if out else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _checksum(model: torch.nn.Module) -> float:
    """Sum of every parameter in float64: equal across ranks iff DDP kept them in sync."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum() for p in model.parameters()))


def _autocast(precision: str, device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# --- the driver ------------------------------------------------------------------------------

def _metrics_log_class():
    import ray

    @ray.remote(num_cpus=0)
    class MetricsLog:
        """Rows reported by the workers, for the driver to print and write out."""

        def __init__(self):
            self.rows = []

        def append(self, row: dict):
            self.rows.append(row)

        def since(self, n: int) -> list:
            return self.rows[n:]

    return MetricsLog


def _forward_callback(log):
    from ray.train import UserCallback

    class ForwardMetrics(UserCallback):
        """Runs on the Train controller: one row per report, with every rank's checksum."""

        def __init__(self, log):
            self.log = log

        def after_report(self, run_context, metrics, checkpoint):
            if not metrics or not metrics[0]:
                return
            row = dict(metrics[0])
            sums = [m.get("param_checksum") for m in metrics if m.get("param_checksum") is not None]
            if sums:
                row["param_checksums"] = sums
                row["param_checksum_spread"] = max(sums) - min(sums)
            row["checkpoint"] = checkpoint.path if checkpoint else ""
            self.log.append.remote(row)

    return ForwardMetrics(log)


def count_train_bytes(ds) -> int:
    """Bytes of well-formed training text, with one streaming pass of Ray Data."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def lengths(table: pa.Table) -> pa.Table:
        ok = pc.equal(table["error"], "") if "error" in table.column_names else None
        n = pc.binary_length(table["bytes"])
        if ok is not None:
            n = pc.if_else(ok, n, 0)
        return pa.table({"n": [pc.sum(n).as_py() or 0]})

    return int(ds.map_batches(lengths, batch_format="pyarrow").sum("n") or 0)


def _input_bytes(spec: str) -> Optional[int]:
    """Size on disk of the files a data path names; None for remote URIs."""
    from sentdisc.data.readers import resolve_paths

    if not spec or "://" in spec:
        return None
    return sum(os.path.getsize(p) for p in resolve_paths(spec))


def plan_iterations(data_cfg, tc: TrainConfig, train_ds) -> Optional[int]:
    """Total iterations of the run: max_iters, else counted from the corpus when cheap."""
    if tc.max_iters:
        return tc.max_iters
    size = _input_bytes(data_cfg.train)
    if size is None or size > COUNT_LIMIT_BYTES:
        if tc.schedule == "linear":
            raise ValueError(
                "lr_scheduler=linear decays to 0 over the run, so it needs the run's length: set "
                f"max_iters (the training data at {data_cfg.train} is "
                f"{'remote' if size is None else f'{size / 1e9:.1f} GB'}, too large to count cheaply)")
        return None
    print(f"[pretrain] sizing the run: counting training bytes ({size / 1e6:.1f} MB on disk) "
          f"(set max_iters to skip)", flush=True)
    n = count_train_bytes(train_ds)
    per_iter = tc.batch_size * tc.seq_length
    total = max(1, n // per_iter) * tc.epochs
    print(f"[pretrain] {n / 1e6:.2f} MB of text -> about {total} iterations "
          f"({tc.epochs} epoch(s) of batch {tc.batch_size} x seq {tc.seq_length})", flush=True)
    return total


def pretrain(model_cfg: ModelConfig, data_cfg, train_cfg: TrainConfig,
             progress: bool = True) -> dict:
    """Run a pretraining job on the current Ray cluster (started locally if none)."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from sentdisc.data.readers import build_datasets

    tc = train_cfg
    storage = tc.experiment_dir if "://" in tc.experiment_dir else str(Path(tc.experiment_dir).resolve())
    run_dir = Path(storage) / tc.experiment_name
    if "runtime_resources" in str(Path.cwd()) and not Path(tc.experiment_dir).is_absolute() \
            and "://" not in tc.experiment_dir:
        print(f"[pretrain] note: experiment_dir {tc.experiment_dir!r} is inside this Ray job's "
              f"temporary working directory ({storage}); pass an absolute --experiment_dir or "
              f"a storage URI to keep the outputs", flush=True)
    if tc.resume:
        model_cfg = ckpt_io.load_config(tc.resume)  # the weights decide the architecture
        tc = dataclasses.replace(tc, resume=str(Path(tc.resume).resolve()))
    # Worker logs stay in Ray's log folder: the driver prints one progress line per report.
    ensure_ray(include_dashboard=False, log_to_driver=False)
    datasets = {k: v for k, v in build_datasets(data_cfg).items() if v is not None}
    total_iters = plan_iterations(data_cfg, tc, datasets["train"])
    run_dir.mkdir(parents=True, exist_ok=True)
    prior = read_history(run_dir / "history.csv") if (
        (run_dir / "history.csv").exists() and any(run_dir.glob("checkpoint_*"))) else []
    (run_dir / "run_config.json").write_text(json.dumps({
        "model": model_cfg.to_dict(), "data": dataclasses.asdict(data_cfg),
        "train": dataclasses.asdict(tc), "total_iters": total_iters}, indent=2))

    log = _metrics_log_class().remote()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"model": model_cfg.to_dict(), "train": dataclasses.asdict(tc),
                           "persist_state": data_cfg.persist_state, "seed": data_cfg.seed,
                           "total_iters": total_iters, "run_dir": str(run_dir),
                           "eval_splits": [k for k in datasets if k != "train"]},
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu,
            resources_per_worker={"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            storage_path=storage, name=tc.experiment_name,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            callbacks=[_forward_callback(log)]),
        datasets=datasets,
    )
    rows: list[dict] = []
    stop = threading.Event()

    def poll():
        while not stop.wait(1.0):
            _drain(log, rows, progress)

    t0 = time.perf_counter()
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        poller.join()
    wall = time.perf_counter() - t0
    _drain(log, rows, progress)
    ray.kill(log)

    history = merge_rows(prior, rows)
    write_history(history, run_dir / "history.csv")
    plot = plot_loss(history, run_dir / "loss.png", title=f"{tc.experiment_name}: bits per byte")
    final_dir = run_dir / "checkpoint_final"
    if result.checkpoint is not None:
        if final_dir.exists():
            shutil.rmtree(final_dir)
        result.checkpoint.to_directory(str(final_dir))
    final = next((r for r in reversed(rows) if r.get("final")), {})
    last = next((r for r in reversed(history) if r.get("bpb") is not None), {})
    summary = {
        "checkpoint": str(final_dir) if result.checkpoint is not None else None,
        "ray_checkpoint": result.checkpoint.path if result.checkpoint is not None else None,
        "history": str(run_dir / "history.csv"), "loss_plot": str(plot) if plot else None,
        "val_bpb": final.get("val_bpb"), "test_bpb": final.get("test_bpb"),
        "train_bpb": last.get("bpb"), "iterations": last.get("iteration"),
        "bytes_seen": last.get("bytes_seen"), "wall_s": wall,
        "skipped_total": last.get("skipped_total"), "records": last.get("records"),
        "rows": rows,
    }
    (run_dir / "summary.json").write_text(json.dumps(
        {k: v for k, v in summary.items() if k != "rows"}, indent=2))
    return summary


def _drain(log, rows: list, progress: bool) -> None:
    import ray

    new = ray.get(log.since.remote(len(rows)))
    rows.extend(new)
    if progress:
        for row in new:
            line = progress_line(row)
            if row.get("final"):
                line += " | " + " ".join(f"{k} {row[k]:.3f}" for k in ("val_bpb", "test_bpb")
                                         if row.get(k) is not None)
            print(f"[pretrain] {line}", flush=True)


__all__ = ["TrainConfig", "pretrain", "train_loop", "lr_multiplier", "count_train_bytes",
           "plan_iterations", "optimizer_class"]
