"""What a pretraining run does: ``TrainConfig`` (the ``train:`` YAML section), the optimizer and
the learning-rate schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from sentdisc.precision import PRECISIONS
from sentdisc.train.step import GRAPH_MODES, graph_plan

SCHEDULES = {"linear": "linear", "linearlr": "linear", "exponential": "exponential",
             "exponentiallr": "exponential", "none": "none", "constant": "none"}


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
    weight_decay: float = field(default=0.0, metadata={"help": "the optimizer's weight decay"})
    clip: float = field(default=1.0, metadata={"help": "gradient norm clip (0 = off)"})
    epochs: int = field(default=1, metadata={"help": "passes over the training data"})
    max_iters: int = field(default=0, metadata={
        "help": "total iterations; when > 0 it overrides epochs (the data repeats as needed)"})
    log_interval: int = field(default=10, metadata={"help": "iterations between reports"})
    save_iters: int = field(default=1000, metadata={"help": "iterations between checkpoints"})
    eval_iters: int = field(default=0, metadata={
        "help": "windows per worker when evaluating val/test after training (0 = all)"})
    precision: str = field(default="auto", metadata={
        "help": "auto (bf16 products where the hardware multiplies bf16 natively: a GPU, a CPU "
                "with AVX-512 BF16 or AMX; else fp32) | fp32 | bf16 (autocast) | fp16 (GPU)"})
    cuda_graph: str = field(default="auto", metadata={
        "help": "run the train step from a CUDA graph: auto (on CUDA when it can be captured, "
                "else eager, saying why once) | on (fail with the reason when it cannot) | off"})
    num_workers: int | str = field(default=1, metadata={
        "help": "Ray Train workers (DDP ranks): N, or MIN-MAX for elastic training (the run "
                "continues on as few as MIN when nodes are lost, and grows back to MAX)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker, NCCL"})
    cpus_per_worker: float = field(default=1.0, metadata={
        "help": "Ray CPUs reserved per worker (fractions allowed: 0.5 packs two per CPU)"})
    worker_resources: str = field(default="", metadata={
        "help": "more Ray resources per worker, e.g. 'trainer=1' to place workers only on "
                "nodes started with --resources '{\"trainer\": N}'", "comma": True})
    resize_interval_s: float = field(default=60.0, metadata={
        "help": "elastic runs: how often a healthy run checks whether more workers now fit "
                "(it then restarts from its latest checkpoint on more)"})
    ingest_cpus: float = field(default=1.0, metadata={
        "help": "CPUs left free for Ray Data's read and preprocess tasks; the run fails at "
                "once, with the numbers, when the cluster cannot leave them"})
    stall_warn_s: float = field(default=300.0, metadata={
        "help": "no report for this long: print what the cluster is waiting for"})
    stall_fail_s: float = field(default=1800.0, metadata={
        "help": "no report for this long: fail the run with that diagnosis (0 = never)"})
    threads_per_worker: int = field(default=0, metadata={
        "help": "torch threads per worker (0 = the CPUs Ray gives it)"})
    keep_checkpoints: int = field(default=3, metadata={"help": "newest checkpoints kept"})
    max_failures: int = field(default=2, metadata={
        "help": "worker-group restarts from the latest checkpoint before giving up"})
    resume: str = field(default="", metadata={
        "help": "checkpoint directory to continue from (model, optimizer, iteration)",
        "path": True})
    fail_at_iter: int = field(default=0, metadata={
        "help": "fault injection for tests: the last rank SIGKILLs itself once at this iteration"})
    trace_records: bool = field(default=False, metadata={
        "help": "for tests of the data position: each rank writes the (file, line) of every "
                "record it packs, with the iteration, to <run>/trace/"})

    def __post_init__(self):
        self.num_workers = _worker_range(self.num_workers)
        positive = ("batch_size", "seq_length", "epochs", "log_interval", "save_iters",
                    "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "eval_iters", "max_failures",
                     "threads_per_worker", "fail_at_iter"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be a finite number > 0, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"TrainConfig.weight_decay must be a finite number >= 0, got "
                             f"{self.weight_decay}")
        if not (self.clip >= 0 and math.isfinite(self.clip)):  # 0 turns clipping off
            raise ValueError(f"TrainConfig.clip must be a finite number >= 0 (0 = off), got "
                             f"{self.clip}")
        if self.lr_scheduler.lower() not in SCHEDULES:
            raise ValueError(f"TrainConfig.lr_scheduler must be linear, exponential or none, "
                             f"got {self.lr_scheduler!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}, "
                             f"got {self.precision!r}")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("TrainConfig.precision fp16 needs use_gpu (on CPU use bf16 or fp32)")
        if self.cuda_graph not in GRAPH_MODES:
            raise ValueError(f"TrainConfig.cuda_graph must be one of {GRAPH_MODES}, "
                             f"got {self.cuda_graph!r}")
        graph_ok, why = graph_plan(self.cuda_graph, "cuda" if self.use_gpu else "cpu",
                                   "bf16" if self.precision == "auto" and self.use_gpu
                                   else self.precision, self.optimizer_type)
        if self.cuda_graph == "on" and not graph_ok:
            raise ValueError(f"TrainConfig.cuda_graph on: the train step cannot be captured: {why}")
        if self.batch_size < self.max_workers:
            raise ValueError(f"TrainConfig.batch_size {self.batch_size} is the total over workers: "
                             f"it must be >= the most workers ({self.max_workers}), one stream "
                             f"each at least")
        if self.cpus_per_worker <= 0 or self.ingest_cpus < 0:
            raise ValueError("TrainConfig.cpus_per_worker must be > 0 and ingest_cpus >= 0")
        self.extra_resources  # noqa: B018 -- a malformed --worker_resources fails here
        optimizer_class(self.optimizer_type)

    @property
    def schedule(self) -> str:
        return SCHEDULES[self.lr_scheduler.lower()]

    @property
    def extra_resources(self) -> dict:
        """--worker_resources 'a=1,b=0.5' -> {"a": 1.0, "b": 0.5}."""
        out = {}
        for part in filter(None, (p.strip() for p in self.worker_resources.split(","))):
            name, _, amount = part.partition("=")
            try:
                out[name.strip()] = float(amount)
            except ValueError:
                raise ValueError(f"TrainConfig.worker_resources must be name=amount,..., got "
                                 f"{self.worker_resources!r}") from None
        return out

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else \
            int(self.num_workers.split("-")[0])

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else \
            int(self.num_workers.split("-")[1])

    @property
    def scaling(self) -> int | tuple[int, int]:
        """Ray Train's ``num_workers``: a number, or (min, max) for elastic training."""
        if self.min_workers == self.max_workers:
            return self.min_workers
        return self.min_workers, self.max_workers


def _worker_range(value) -> int | str:
    """N or "MIN-MAX" -> N (an int) or "MIN-MAX" (normalised); anything else is an error."""
    text = str(value).strip()
    parts = text.split("-")
    if not all(p.isdigit() for p in parts) or len(parts) > 2 or int(parts[0]) < 1 \
            or int(parts[-1]) < int(parts[0]):
        raise ValueError(f"TrainConfig.num_workers must be N or MIN-MAX with 1 <= MIN <= MAX, "
                         f"got {value!r}")
    lo, hi = int(parts[0]), int(parts[-1])
    return lo if lo == hi else f"{lo}-{hi}"


def per_worker_batch(batch_size: int, world: int, rank: int) -> int:
    """This rank's share of the total batch: as even as it can be (the first ranks take one
    more stream when it does not divide), so the total stays batch_size on any world size."""
    return batch_size // world + (rank < batch_size % world)


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


def make_optimizer(params, tc: TrainConfig, total_iters: Optional[int]):
    """The run's optimizer and its LambdaLR schedule, over a module's parameters or over
    parameter groups (each may set its own ``lr``; the schedule scales every group's)."""
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    optimizer = optimizer_class(tc.optimizer_type)(params, lr=tc.lr,
                                                   weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(tc, total_iters))
    return optimizer, scheduler
