"""Hooks for tests of failure and recovery: a worker that dies, and a record of what was trained.

``TrainConfig.fail_at_iter = N`` makes the last rank SIGKILL itself after iteration N, the way
a lost node or an OOM-killed process ends. A marker file in the run's folder (on any storage)
records that it happened, so the restarted worker group does not die again, and tells the test
it did. ``TrainConfig.trace_records`` makes each rank write the (file, line) of every record it
packs, with the iteration it was packed for, so a test can check that across restarts and
resizes no record is trained twice and none is skipped.
"""
from __future__ import annotations

import os
import signal
import time

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


class RecordTrace:
    """The (file, line, iteration) of every record this rank packs in this attempt, written
    to ``<run>/trace/<attempt>-rank<r>.json`` at each report (on any storage)."""

    def __init__(self, run_dir: str, rank: int, world: int, resumed_from: int):
        self.path = storage.join(run_dir, "trace", f"{time.time_ns()}-rank{rank}.json")
        self.head = {"rank": rank, "world": world, "resumed_from": resumed_from}
        self.records: list = []

    def take(self, file: str, line: int, iteration: int) -> None:
        self.records.append([file, line, iteration])

    def flush(self) -> None:
        storage.write_json(self.path, {**self.head, "records": self.records}, indent=None)


def trained_lineage(run_dir: str) -> tuple[list, list]:
    """From a run's record traces: the (file, line) of every record its final weights were
    trained on (each attempt's records up to the checkpoint the next attempt resumed from), and
    the attempts as (resumed_from, world size), in order."""
    folder = storage.join(run_dir, "trace")
    traces = sorted((storage.read_json(storage.join(folder, n)) | {"name": n}
                     for n in storage.list_dir(folder)), key=lambda t: t["name"])
    attempts: dict = {}
    for t in traces:  # ranks of one attempt share its resume point and world size
        attempts.setdefault((t["resumed_from"], t["world"]), []).append(t)
    order = list(attempts)
    records = []
    for i, key in enumerate(order):
        upto = order[i + 1][0] if i + 1 < len(order) else float("inf")
        records += [(f, line) for t in attempts[key] for f, line, it in t["records"] if it <= upto]
    return records, order
