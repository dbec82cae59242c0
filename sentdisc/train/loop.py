"""The pretraining worker: restore, then step / report / checkpoint until done, then evaluate.

Each worker packs its shard of the corpus into ``batch_size / num_workers`` parallel byte
streams and trains on [B, T+1] windows, carrying the hidden state from window to window and
zeroing it where the packer's reset mask says: the "transposed" batches of Radford et al.
Every ``log_interval`` iterations all ranks report (a barrier); every ``save_iters`` and at
each epoch's end rank 0 also writes a checkpoint in sentdisc's format (model, optimizer and
scheduler, iteration, data position), which Ray Train keeps (newest N) and hands back through
``ray.train.get_checkpoint()`` when a failed worker group is restarted. The phases and their
Ray touch-points are ``sentdisc.train.worker.TrainWorker``'s; the packer, the data position and
the held-out bits per byte are this module's (plus ``get_dataset_shard``).
"""
from __future__ import annotations

import base64

import torch

from sentdisc.data.config import REASONS
from sentdisc.data.position import Position
from sentdisc.model import ByteLM, ModelConfig
from sentdisc.train.config import per_worker_batch
from sentdisc.train.faults import RecordTrace
from sentdisc.train.resume import RESUME_SPLIT
from sentdisc.train.step import LN2, evaluate_windows, window_loss
from sentdisc.train.worker import TrainWorker

COUNT_KEYS = ("records", "dropped_bytes", "capped_records", "capped_bytes") + tuple(
    f"skipped_{r}" for r in REASONS)


def train_loop(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    worker = PretrainWorker(config)
    worker.restore()
    worker.train()
    worker.finish()


class PretrainWorker(TrainWorker):
    prefix = "[pretrain]"

    def __init__(self, config: dict):
        super().__init__(config)
        self.model_cfg = ModelConfig.from_dict(config["model"])
        self.persist_state, self.eval_splits = config["persist_state"], config["eval_splits"]
        self.train_split = config.get("train_split") or None
        self.hidden = None

    # --- restore -----------------------------------------------------------------------------

    def build_model(self, source):
        from sentdisc import checkpoint as ckpt_io

        return ckpt_io.load(source, map_location=self.device) if source else \
            ByteLM(self.model_cfg)

    def objective(self, model, x, reset, hidden=None, valid=None, autocast=None):
        return window_loss(model, x, reset, hidden, autocast, valid=valid)

    def restore_data(self, state: dict) -> None:
        from sentdisc.data.packer import BytePacker

        self.trace = RecordTrace(self.run_dir, self.rank, self.world, self.resumed_from) \
            if self.tc.trace_records else None
        self.packer = BytePacker(
            self.per_worker, self.tc.seq_length, self.persist_state, split=self.train_split,
            trace=(lambda f, line: self.trace.take(f, line, self.iteration + 1))
            if self.trace else None)
        self.mid_epoch = self._restore_data_position(state)

    def _restore_data_position(self, state: dict) -> bool:
        """Put the packer where the checkpoint left the epoch; True if it was under way.

        Every rank passes over the records any rank had taken (the position is global: Ray
        Data hands blocks to whichever rank asks). With the same streams (workers, and batch
        and seq_length on each) each rank also keeps its own partial streams, so the windows
        continue exactly; otherwise they are dropped (at most batch_size records, each partly
        trained), and rank 0 carries the old ranks' counts so the totals continue."""
        workers = state.get("workers")
        if not workers:
            return False
        packers = [w["packer"] for w in workers]
        position = Position.union([p.get("position") or {} for p in packers]).state()
        change = streams_change(packers, self.world, self.tc.batch_size, self.tc.seq_length)
        if not change:
            self.packer.load_state_dict(packers[self.rank], position=position)
        else:
            counts = _summed([p["counts"] for p in packers]) if self.rank == 0 else {}
            if self.rank == 0:
                counts["dropped_bytes"] = counts.get("dropped_bytes", 0) + sum(
                    len(base64.b64decode(s)) for p in packers for s in p["streams"])
            self.packer.resume(packers[0]["epoch"], position, counts)
            self.say(f"resuming the data position of {change}: epoch {state['epoch']} "
                     f"continues past the {sum(len(r) for r in position.values())} line "
                     f"ranges taken")
        if state.get("epoch_done"):  # saved at an epoch's end: start the next one
            self.packer.new_epoch()
            self.epoch += 1
            return False
        return bool(position) or any(p["records_consumed"] for p in packers)

    # --- train -------------------------------------------------------------------------------

    def train(self) -> None:
        """Epochs of windows until max_iters or the last epoch; checkpoints at epoch ends."""
        import ray.train

        while not self.finished(self.epoch):
            first = self.iteration
            # the rest of an epoch a checkpoint left unfinished: the records not taken yet
            split = RESUME_SPLIT if self.mid_epoch and self.packer.has_past() else "train"
            shard = ray.train.get_dataset_shard(split)
            if not self.train_epoch(self.packer.windows(_batches(shard))):
                return  # max_iters reached mid-epoch
            if self.iteration == first and not self.mid_epoch:
                raise RuntimeError(
                    f"rank {self.rank}: the training data gives no full window of "
                    f"{self.per_worker} streams x {self.tc.seq_length + 1} bytes per worker; use "
                    f"a smaller batch_size or seq_length, fewer workers, or more data")
            if not self.finished(self.epoch + 1) and self.last_saved != self.iteration:
                self.report(save=True, epoch_done=True)
            self.packer.new_epoch()
            self.epoch += 1
            self.mid_epoch = False

    def train_epoch(self, windows) -> bool:
        """Train on this epoch's windows; True when the epoch ran out on every rank."""
        tc = self.tc
        while not self.finished(self.epoch):
            window = next(windows, None)
            # The epoch goes on until every rank's data is trained (its last windows drained,
            # data.packer): a rank done before the others steps on an empty window, so DDP
            # never waits on it.
            done, scale = self._sync(window)
            if done:
                return True
            window = window or self._empty_window()
            x = window.x.to(self.device, non_blocking=True)
            reset = window.reset.to(self.device, non_blocking=True)
            valid = window.valid.to(self.device, non_blocking=True) \
                if window.valid is not None else None
            inputs = (x, reset, self.hidden) + ((valid,) if valid is not None else ())
            self.hidden = self.step(*inputs, n_pred=window.n_bytes, n_bytes=window.n_bytes,
                                    loss_scale=scale)
            save = self.iteration % tc.save_iters == 0 and not self.finished(self.epoch)
            if save or self.iteration % tc.log_interval == 0:
                self.report(save=save)
        return False

    def _sync(self, window) -> tuple[bool, float | None]:
        """(every rank is out of windows, this rank's loss weight for the step or None): one
        all-reduce per step. In an epoch's last, partly padded windows a rank weighs its loss
        by its share of the real targets, so the step's gradient is that of their mean."""
        tail = window is None or window.valid is not None
        mine = 0 if window is None else window.n_bytes
        if not self.dist:
            return window is None, None
        t = torch.tensor([float(window is None), float(tail), float(mine)], device=self.device)
        torch.distributed.all_reduce(t)
        out, tails, total = t.tolist()
        if out == self.world:
            return True, None
        return False, (self.world * mine / total if total else 0.0) if tails else None

    def _empty_window(self):
        """A window of nothing to predict, for a rank whose epoch ended before the others'."""
        from sentdisc.data.packer import Window

        B, T = self.per_worker, self.tc.seq_length
        return Window(torch.zeros(B, T + 1, dtype=torch.int64), torch.ones(B, T, dtype=torch.bool),
                      0, torch.zeros(B, T, dtype=torch.bool))

    # --- what a report and a checkpoint hold -------------------------------------------------

    def report(self, save: bool = False, epoch_done: bool = False, extra=None) -> dict:
        if self.trace is not None:
            self.trace.flush()
        return super().report(save, epoch_done, extra)

    def counts(self) -> dict:
        return {k: self.packer.counts.get(k, 0) for k in COUNT_KEYS}

    def extra_metrics(self, row: dict) -> dict:
        loss = row["loss"]
        return {"bpb": loss / LN2 if loss is not None else None,
                "skipped_total": sum(row[f"skipped_{r}"] for r in REASONS)}

    def position(self) -> dict:
        return {"packer": self.packer.state_dict()}

    # --- evaluate and finish -----------------------------------------------------------------

    def finish(self) -> None:
        """Val/test bits per byte on the final weights, then the final report (and checkpoint,
        unless this run only restored its own final checkpoint: a rerun of a finished job)."""
        results = {}
        for split in self.eval_splits:
            loss_sum, n_pred = self._evaluate(split)
            results[f"{split}_bytes"] = int(n_pred)
            results[f"{split}_bpb"] = loss_sum / n_pred / LN2 if n_pred else None
        rerun = self.state.get("final") and self.iteration == self.resumed_from
        self.report(extra={"final": True, **results}, save=not rerun)

    def _evaluate(self, split: str) -> tuple[float, float]:
        """All ranks: persistent state, no grad, summed over ranks."""
        import ray.train

        from sentdisc.data.packer import BytePacker

        packer = BytePacker(self.per_worker, self.tc.seq_length, self.persist_state)
        windows = packer.windows(_batches(ray.train.get_dataset_shard(split)))
        loss_sum, n_pred = evaluate_windows(self.model, windows, self.tc.eval_iters,
                                            self.autocast, self.device)
        totals = torch.tensor([loss_sum, float(n_pred)], dtype=torch.float64, device=self.device)
        if self.dist:
            torch.distributed.all_reduce(totals)
        return tuple(totals.tolist())


def streams_change(packers: list[dict], world: int, batch_size: int, seq_length: int) -> str:
    """What differs between the saved ranks' streams (their packers' states) and the ones this
    worker group packs ("" if nothing: each rank can continue its own), e.g. "2 workers on 1"
    or "batch 8 x seq 64 as batch 8 x seq 32". Every rank decides alike, as the ranks must
    agree on how the epoch goes on."""
    if len(packers) != world:
        return f"{len(packers)} workers on {world}"
    saved = [(p["batch_size"], p["seq_length"]) for p in packers]
    if saved == [(per_worker_batch(batch_size, world, r), seq_length) for r in range(world)]:
        return ""
    return (f"batch {sum(b for b, _ in saved)} x seq {saved[0][1]} as batch {batch_size} x "
            f"seq {seq_length}")


def _summed(counts: list[dict]) -> dict:
    out: dict = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


def _batches(shard):
    return shard.iter_batches(batch_format="numpy", prefetch_batches=2)
