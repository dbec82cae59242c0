"""What a pretraining run does: ``TrainConfig`` (the ``train:`` YAML section), the optimizer and
the learning-rate schedule."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

SCHEDULES = {"linear": "linear", "linearlr": "linear", "exponential": "exponential",
             "exponentiallr": "exponential", "none": "none", "constant": "none"}
PRECISIONS = ("fp32", "bf16", "fp16")


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
    keep_checkpoints: int = field(default=3, metadata={"help": "newest checkpoints kept"})
    max_failures: int = field(default=2, metadata={
        "help": "worker-group restarts from the latest checkpoint before giving up"})
    resume: str = field(default="", metadata={
        "help": "checkpoint directory to continue from (model, optimizer, iteration)",
        "path": True})
    fail_at_iter: int = field(default=0, metadata={
        "help": "fault injection for tests: the last rank SIGKILLs itself once at this iteration"})

    def __post_init__(self):
        positive = ("batch_size", "seq_length", "epochs", "log_interval", "save_iters",
                    "num_workers", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "eval_iters", "max_failures",
                     "threads_per_worker", "fail_at_iter"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.lr_scheduler.lower() not in SCHEDULES:
            raise ValueError(f"TrainConfig.lr_scheduler must be linear, exponential or none, "
                             f"got {self.lr_scheduler!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}, "
                             f"got {self.precision!r}")
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


def make_optimizer(model: torch.nn.Module, tc: TrainConfig, total_iters: Optional[int]):
    """The run's optimizer and its LambdaLR schedule."""
    optimizer = optimizer_class(tc.optimizer_type)(model.parameters(), lr=tc.lr,
                                                   weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(tc, total_iters))
    return optimizer, scheduler
