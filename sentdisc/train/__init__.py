"""Distributed byte-LM pretraining: Ray Data shards -> BytePacker -> DDP mLSTM on Ray Train.

    config.py    TrainConfig (the ``train:`` section), optimizer, learning-rate schedule
    step.py      train_step: forward, loss, backward, clip, optimizer step (what benchmarks time)
    loop.py      the Ray Train worker: restore, step, report, checkpoint, evaluate
    progress.py  the driver's view of the reports (a controller callback, an actor, a poller)
    faults.py    fault injection for tests
    driver.py    pretrain(): check inputs, size the run, fit, write the outputs
"""
from sentdisc.train.config import TrainConfig, lr_multiplier, make_optimizer, optimizer_class
from sentdisc.train.driver import count_train_bytes, plan_iterations, pretrain
from sentdisc.train.loop import train_loop
from sentdisc.train.step import autocast_for, evaluate_bpb, train_step, window_loss

__all__ = ["TrainConfig", "autocast_for", "count_train_bytes", "evaluate_bpb", "lr_multiplier",
           "make_optimizer", "optimizer_class", "plan_iterations", "pretrain", "train_loop",
           "train_step", "window_loss"]
