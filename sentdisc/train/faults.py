"""Fault injection for tests: a worker that dies without any cleanup, once per run.

``TrainConfig.fail_at_iter = N`` makes the last rank SIGKILL itself after iteration N, the way
a lost node or an OOM-killed process ends. A marker file in the run's folder (on any storage)
records that it happened, so the restarted worker group does not die again, and tells the test
it did.
"""
from __future__ import annotations

import os
import signal

from sentdisc import storage

MARKER = ".fail_at_iter_done"


class KillOnce:
    """Step hook: SIGKILL this process after ``at_iter`` if it is the chosen rank."""

    def __init__(self, at_iter: int, rank: int, world: int, run_dir: str):
        self.at_iter, self.rank = at_iter, rank
        self.armed = bool(at_iter) and rank == world - 1
        self.marker = storage.join(run_dir, MARKER)

    def __call__(self, iteration: int) -> None:
        if not self.armed or iteration != self.at_iter or storage.exists(self.marker):
            return
        import ray.train

        # Let the controller register the checkpoints reported so far, as it would have long
        # before a real crash, then die.
        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        storage.write_text(self.marker, f"killed rank {self.rank} at iteration {iteration}\n")
        os.kill(os.getpid(), signal.SIGKILL)
