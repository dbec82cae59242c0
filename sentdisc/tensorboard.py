"""Pretraining curves as TensorBoard event files, for ``--tensorboard``: a sink of
``sentdisc.tracking.Tracker``, which feeds it rank 0's report rows from its one thread.

    tensorboard --logdir <experiment_dir>/<experiment_name>/tensorboard
"""
from __future__ import annotations

import shutil
import struct
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
        self.local = None if storage.is_uri(run_dir) else self.target  # a URI's: made at open
        self.writer = None

    def load(self) -> None:
        import tensorboardX  # noqa: F401 -- on the caller's thread (see Tracker)

    def open(self) -> None:
        from tensorboardX import SummaryWriter

        # A rerun appends a new events file, skipping the steps the earlier files hold. Not
        # prior_rows: those also hold the reports a killed driver never received (recovered from
        # checkpoints), and a run on object storage loses a killed driver's files altogether.
        self.gate = StepGate(written_steps(self.target))
        self.local = self.local or tempfile.mkdtemp(prefix="sentdisc-tensorboard-")
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
            try:
                for f in Path(self.local).iterdir():
                    storage.write_bytes(storage.join(self.target, f.name), f.read_bytes())
            finally:
                shutil.rmtree(self.local, ignore_errors=True)


def written_steps(logdir: str) -> dict[str, int]:
    """{tag: last step} of the scalars in the event files of ``logdir`` (local or a URI)."""
    from tensorboardX.proto import event_pb2

    last: dict[str, int] = {}
    for name in storage.list_dir(logdir):
        if not name.startswith("events.out.tfevents."):
            continue
        data, i = storage.read_bytes(storage.join(logdir, name)), 0
        # TFRecords: length (8 bytes), its CRC (4), the Event, its CRC (4)
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            if i + 12 + n + 4 > len(data):  # cut short by a killed writer
                break
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    last[v.tag] = max(last.get(v.tag, -1), event.step)
    return last
