"""Pretraining curves as TensorBoard event files, for ``--tensorboard``: a sink of
``sentdisc.tracking.Tracker``, which feeds it rank 0's report rows from its one thread.

    tensorboard --logdir <experiment_dir>/<experiment_name>/tensorboard
"""
from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Optional

from sentdisc import storage
from sentdisc.tracking import StepGate


class TensorBoardCurves:
    """The report rows as TensorBoard scalars (tensorboardX, which Ray Tune brings), in
    ``<run_dir>/tensorboard``; a run folder on object storage gets its event files copied there
    at the end."""

    name = "TensorBoard"

    def __init__(self, run_dir: str, prior_rows: Optional[list] = None):
        self.target = storage.join(run_dir, "tensorboard")
        self.prior_rows = prior_rows or []
        self.local = self.target if not storage.is_uri(run_dir) else tempfile.mkdtemp(
            prefix="sentdisc-tensorboard-")
        self.writer = None

    def load(self) -> None:
        import tensorboardX  # noqa: F401 -- on the caller's thread (see Tracker)

    def open(self) -> None:
        from tensorboardX import SummaryWriter

        # A rerun appends a new events file: the steps the earlier files hold are skipped,
        # unless there are none (tensorboard was off before): those are written at start.
        had = storage.exists(self.target)
        self.gate = StepGate.from_rows(self.prior_rows) if had else StepGate()
        # event files are named by the second: a quick rerun must not overwrite the last one
        self.writer = SummaryWriter(logdir=self.local, filename_suffix=f".{uuid.uuid4().hex[:8]}")

    def start(self, params: dict) -> None:
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))
        self.rows(self.prior_rows)

    def rows(self, rows: list) -> None:
        for step, new in self.gate.fresh(rows):
            for k, v in new.items():
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()
        if self.local != self.target:
            for f in Path(self.local).iterdir():
                storage.write_bytes(storage.join(self.target, f.name), f.read_bytes())
