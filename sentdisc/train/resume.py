"""Which checkpoint a (re)started worker group continues from, and the data it has left.

Ray Train hands a restarted worker group its latest checkpoint, but forgets it when its
controller recovers from an error of its own (a worker group that does not come up in time
after a node was lost), and a rerun of the driver may know a newer one than Ray does. So the
rule is: the newest complete checkpoint (by iteration) among ``--resume`` and the run's own
folder, which holds every checkpoint Ray Train wrote.

A checkpoint taken mid-epoch records the (file, line) ranges every rank had taken. The rest of
that epoch is read from ``train_resume``: the training split minus those records, split among
however many workers there are now, so no rank spends its share passing over records.

Ray Train's own DataConfig splits a dataset into equal shares by dropping what does not divide
(up to world_size - 1 records an epoch, of every dataset): ``data_config`` splits them whole.
"""
from __future__ import annotations

from typing import Optional

from sentdisc import checkpoint as ckpt_io
from sentdisc import storage

RESUME_SPLIT = "train_resume"


def restore_point(run_dir: str, resume: str = "") -> Optional[str]:
    """The checkpoint to continue from: the newest complete one of --resume and run_dir."""
    candidates = [c for c in (resume, ckpt_io.newest_complete(run_dir, log=lambda _: None))
                  if c and ckpt_io.incomplete_reason(c) is None]
    if not candidates:
        return None
    return max(candidates, key=lambda c: storage.read_json(
        storage.join(c, ckpt_io.TRAIN_STATE)).get("iteration", 0))


def taken_records(checkpoint: Optional[str]) -> dict:
    """The position a checkpoint's unfinished epoch had reached: {file: [[first, last], ...]}
    of every rank's taken records; {} when it ended an epoch (or there is none)."""
    from sentdisc.data.position import Position

    if not checkpoint:
        return {}
    state = storage.read_json(storage.join(checkpoint, ckpt_io.TRAIN_STATE))
    if state.get("epoch_done") or not state.get("workers"):
        return {}
    return Position.union([w["packer"].get("position") or {} for w in state["workers"]]).state()


def skip_taken(position: dict):
    """A map_batches function dropping the rows of ``position``."""
    import pyarrow as pa

    from sentdisc.data.position import Position

    taken = Position(position)

    def keep(batch: pa.Table) -> pa.Table:
        files, lines = batch.column("file").to_pylist(), batch.column("line").to_pylist()
        return batch.filter(pa.array([(f, line) not in taken for f, line in zip(files, lines)]))

    return keep


def data_config(run_dir: str, resume: str):
    """Ray Train's DataConfig, with ``train_resume`` filtered when the worker group asks for
    it (each (re)start: the checkpoint it restores is known by then), and every dataset it
    splits split whole (``equal=False``)."""
    from ray.train import DataConfig

    class ResumeDataConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            if RESUME_SPLIT in datasets:
                position = taken_records(restore_point(run_dir, resume))
                datasets = {**datasets, RESUME_SPLIT: datasets[RESUME_SPLIT].map_batches(
                    skip_taken(position), batch_format="pyarrow", batch_size=None)}
            return split_whole(self, datasets, world_size, worker_node_ids)

    return ResumeDataConfig()


def split_whole(config, datasets: dict, world_size: int, worker_node_ids) -> list[dict]:
    """``DataConfig.configure`` of Ray 2.60 but with ``streaming_split(equal=False)``. Its
    ``equal=True`` hands every rank the same number of rows by dropping the last
    ``rows % world_size`` of each epoch, never packed, trained, evaluated or counted; ranks
    with unequal shares are the loop's to even out (a rank out of windows steps on empty
    ones until every rank is: ``loop.PretrainWorker.train_epoch``)."""
    output: list[dict] = [{} for _ in range(world_size)]
    to_split = set(datasets) if config._datasets_to_split == "all" \
        else set(config._datasets_to_split)
    hints = worker_node_ids if config._enable_shard_locality else None
    for name, ds in datasets.items():
        if ds.name is None:
            ds.set_name(name)
        ds = ds.copy(ds)
        ds.context.execution_options = config._resolve_execution_options(name)
        if name in to_split:
            for i, split in enumerate(ds.streaming_split(world_size, equal=False,
                                                         locality_hints=hints)):
                output[i][name] = split
        else:
            for i in range(world_size):
                output[i][name] = ds.iterator()
    return output
