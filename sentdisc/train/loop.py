"""The Ray Train worker: restore, then step / report / checkpoint until done, then evaluate.

Each worker packs its shard of the corpus into ``batch_size / num_workers`` parallel byte
streams and trains on [B, T+1] windows, carrying the hidden state from window to window and
zeroing it where the packer's reset mask says: the "transposed" batches of Radford et al.
Every ``log_interval`` iterations all ranks report (a barrier); every ``save_iters`` and at
each epoch's end rank 0 also writes a checkpoint in sentdisc's format (model, optimizer and
scheduler, iteration, data position), which Ray Train keeps (newest N) and hands back through
``ray.train.get_checkpoint()`` when a failed worker group is restarted. The Ray touch-points
are ``get_context``, ``get_checkpoint``, ``prepare_model``, ``get_dataset_shard`` and
``report``; the rest is single-process PyTorch.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import tempfile
import time
from typing import Optional

import torch

from sentdisc import checkpoint as ckpt_io
from sentdisc import storage
from sentdisc.data.config import REASONS
from sentdisc.data.position import Position
from sentdisc.model import ByteLM, ModelConfig
from sentdisc.train.config import TrainConfig, make_optimizer, per_worker_batch
from sentdisc.train.faults import KillOnce, RecordTrace
from sentdisc.train.resume import RESUME_SPLIT, restore_point
from sentdisc.train.step import LN2, TrainStep, autocast_for, evaluate_windows

COUNT_KEYS = ("records", "dropped_bytes", "capped_records", "capped_bytes") + tuple(
    f"skipped_{r}" for r in REASONS)


def train_loop(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    worker = PretrainWorker(config)
    worker.restore()
    worker.train()
    worker.finish()


class PretrainWorker:
    def __init__(self, config: dict):
        import ray
        import ray.train
        import ray.train.torch

        self.tc = tc = TrainConfig(**config["train"])
        self.model_cfg = ModelConfig.from_dict(config["model"])
        self.persist_state, self.seed = config["persist_state"], config["seed"]
        self.total_iters, self.eval_splits = config["total_iters"], config["eval_splits"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.node = ray.get_runtime_context().get_node_id()
        self.dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        if tc.threads_per_worker:
            torch.set_num_threads(tc.threads_per_worker)
        self.per_worker = per_worker_batch(tc.batch_size, self.world, self.rank)
        # DDP averages gradients over ranks: weight each by its share of the streams.
        self.loss_scale = self.world * self.per_worker / tc.batch_size
        self.autocast = autocast_for(tc.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if tc.precision == "fp16" else None
        self.run_dir, self.train_split = config["run_dir"], config.get("train_split") or None
        self.progress_actor = config["progress_actor"]
        self.after_step = KillOnce(tc.fail_at_iter, self.rank, self.world, self.run_dir)
        self.interval = Interval(self.device)
        self.hidden = None
        self.last_loss: Optional[float] = None
        self.start: Optional[float] = None  # first window's arrival: rates exclude startup

    # --- restore -----------------------------------------------------------------------------

    def restore(self) -> None:
        """Ray's latest checkpoint (a restarted worker group) wins over an explicit resume."""
        import ray.train
        import ray.train.torch

        from sentdisc.data.packer import BytePacker

        state = {"iteration": 0, "epoch": 0, "bytes_seen": 0, "epoch_done": False, "workers": None}
        with contextlib.ExitStack() as stack:
            source = self._newest_source(stack)
            torch.manual_seed(self.seed)  # same initial weights on every rank (DDP broadcasts too)
            model = ckpt_io.load(source, map_location=self.device) if source else \
                ByteLM(self.model_cfg)
            self.model = model.to(self.device).train()
            self.optimizer, self.scheduler = make_optimizer(self.model, self.tc, self.total_iters)
            if source:
                saved = ckpt_io.load_optimizer_state(source)
                if saved:
                    self.optimizer.load_state_dict(saved["optimizer"])
                    self.scheduler.load_state_dict(saved["scheduler"])
                state.update(ckpt_io.load_train_state(source) or {})
        self.state = state
        self.iteration, self.epoch = state["iteration"], state["epoch"]
        self.bytes_seen, self.resumed_from = state["bytes_seen"], state["iteration"]
        self.last_saved = self.iteration if source else -1
        self.unsaved_rows: list[dict] = []  # reports since the last checkpoint (it keeps them)
        # Dropout masks differ across ranks and across restarts.
        torch.manual_seed(self.seed + 1000 * self.rank + self.resumed_from)
        self.ddp_model = ray.train.torch.prepare_model(self.model)
        # eager or CUDA-graph replay (--cuda_graph); rank 0 says once why it runs eagerly
        self.train_step = TrainStep(
            self.ddp_model, self.optimizer, mode=self.tc.cuda_graph, precision=self.tc.precision,
            clip=self.tc.clip, scaler=self.scaler, autocast=self.autocast,
            loss_scale=self.loss_scale, log=_rank0_print if self.rank == 0 else None)
        self.trace = RecordTrace(self.run_dir, self.rank, self.world, self.resumed_from) \
            if self.tc.trace_records else None
        self.packer = BytePacker(
            self.per_worker, self.tc.seq_length, self.persist_state, split=self.train_split,
            trace=(lambda f, line: self.trace.take(f, line, self.iteration + 1))
            if self.trace else None)
        self.mid_epoch = self._restore_data_position(state)

    def _newest_source(self, stack: contextlib.ExitStack):
        """A local folder holding the checkpoint to continue from, or None: the newest (by
        iteration) of Ray's latest (a restarted worker group), --resume (which the driver sets,
        on a rerun, to the newest complete checkpoint it found) and the newest complete one in
        the run's folder (Ray's controller forgets its checkpoints when it recovers from its own
        error, e.g. a worker group that did not start in time after a node was lost)."""
        import ray.train

        candidates = []
        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            candidates.append(stack.enter_context(checkpoint.as_directory()))
        newest = restore_point(self.run_dir, self.tc.resume)
        if newest:
            candidates.append(stack.enter_context(storage.local_dir(newest)))
        if not candidates:
            return None
        return max(candidates, key=lambda d: (ckpt_io.load_train_state(d) or {}).get(
            "iteration", 0))

    def _restore_data_position(self, state: dict) -> bool:
        """Put the packer where the checkpoint left the epoch; True if it was under way.

        Every rank passes over the records any rank had taken (the position is global: Ray
        Data hands blocks to whichever rank asks). On the same number of workers each rank also
        keeps its own partial streams, so the windows continue exactly; on another number they
        are dropped (at most batch_size records, each partly trained), and rank 0 carries the
        old ranks' counts so the totals continue."""
        workers = state.get("workers")
        if not workers:
            return False
        packers = [w["packer"] for w in workers]
        position = Position.union([p.get("position") or {} for p in packers]).state()
        if len(workers) == self.world:
            self.packer.load_state_dict(packers[self.rank], position=position)
        else:
            counts = _summed([p["counts"] for p in packers]) if self.rank == 0 else {}
            if self.rank == 0:
                counts["dropped_bytes"] = counts.get("dropped_bytes", 0) + sum(
                    len(base64.b64decode(s)) for p in packers for s in p["streams"])
            self.packer.resume(packers[0]["epoch"], position, counts)
            if self.rank == 0:
                print(f"[pretrain] resuming {len(workers)} workers' data position on "
                      f"{self.world}: epoch {state['epoch']} continues past the "
                      f"{sum(len(r) for r in position.values())} line ranges taken", flush=True)
        if state.get("epoch_done"):  # saved at an epoch's end: start the next one
            self.packer.new_epoch()
            self.epoch += 1
            return False
        return bool(position) or any(p["records_consumed"] for p in packers)

    # --- train -------------------------------------------------------------------------------

    def finished(self, epochs_done: int) -> bool:
        tc = self.tc
        return self.iteration >= tc.max_iters if tc.max_iters else epochs_done >= tc.epochs

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
        """Train on this epoch's windows; True when the epoch ran out (on any rank)."""
        tc = self.tc
        while not self.finished(self.epoch):
            window = next(windows, None)
            # Every rank stops as soon as the first runs dry, so DDP never waits on a rank
            # that has finished.
            if _any_rank(window is None, self.device, self.dist):
                return True
            self.step(window)
            save = self.iteration % tc.save_iters == 0 and not self.finished(self.epoch)
            if save or self.iteration % tc.log_interval == 0:
                self.report(save=save)
        return False

    def step(self, window) -> None:
        if self.start is None:
            self.start = time.perf_counter()
            self.interval.reset()
        x = window.x.to(self.device, non_blocking=True)
        reset = window.reset.to(self.device, non_blocking=True)
        loss, self.hidden = self.train_step(x, reset, self.hidden)
        self.scheduler.step()
        self.iteration += 1
        self.interval.add(loss, x[:, 1:].numel(), window.n_bytes)
        self.after_step(self.iteration)

    # --- report and checkpoint ---------------------------------------------------------------

    def report(self, save: bool = False, epoch_done: bool = False,
               final_eval: Optional[dict] = None) -> None:
        """All ranks: reduce the interval's numbers; rank 0 sends the row to the driver. With
        ``save``, a checkpoint holding every rank's data position goes to Ray Train too."""
        import ray.train

        metrics = self._metrics(final_eval)
        if self.trace is not None:
            self.trace.flush()
        name = f"checkpoint_{self.iteration:08d}" + ("_final" if final_eval else "")
        self._send_row(metrics, storage.join(self.run_dir, name) if save else "")
        self.unsaved_rows.append(metrics)
        if not save:
            return
        positions = [{"packer": self.packer.state_dict()}]
        if self.dist:
            mine, positions = positions[0], [None] * self.world
            torch.distributed.all_gather_object(positions, mine)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                self._save(tmp, metrics, positions, epoch_done, final_eval)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        self.last_saved, self.unsaved_rows = self.iteration, []

    def _send_row(self, metrics: dict, checkpoint: str) -> None:
        """Rank 0's row for the history, with every rank's parameter checksum (equal iff DDP
        kept the replicas in sync) and node."""
        from sentdisc.train.progress import reports, send

        mine = {"param_checksum": metrics["param_checksum"], "node": self.node}
        ranks = [mine]
        if self.dist:
            ranks = [None] * self.world
            torch.distributed.all_gather_object(ranks, mine)
        if not reports(self.rank):  # rank 0 alone: the history and MLflow get one row a report
            return
        sums = [r["param_checksum"] for r in ranks]
        send(self.progress_actor, {**metrics, "param_checksums": sums,
                                   "param_checksum_spread": max(sums) - min(sums),
                                   "nodes": [r["node"] for r in ranks], "checkpoint": checkpoint})

    def _metrics(self, final_eval: Optional[dict]) -> dict:
        totals = self.interval.totals(self.packer.counts)
        if self.dist:
            torch.distributed.all_reduce(totals)
        loss_sum, n_pred, interval_bytes, *counts = totals.tolist()
        elapsed = self.interval.elapsed()
        self.interval.reset()
        self.bytes_seen += int(interval_bytes)
        self.last_loss = loss = loss_sum / n_pred if n_pred else self.last_loss
        counts = dict(zip(COUNT_KEYS, (int(v) for v in counts)))
        run_s = time.perf_counter() - self.start if self.start is not None else 0.0
        done = self.iteration - self.resumed_from
        total = self.total_iters
        return {
            "iteration": self.iteration, "epoch": self.epoch,
            "loss": loss, "bpb": loss / LN2 if loss is not None else None,
            "lr": self.optimizer.param_groups[0]["lr"],
            "bytes_per_s": interval_bytes / elapsed if elapsed > 0 else 0.0,
            "bytes_seen": self.bytes_seen, "elapsed_s": run_s, "total_iters": total,
            "eta_s": (total - self.iteration) * run_s / done if total and done else None,
            **counts, "skipped_total": sum(counts[f"skipped_{r}"] for r in REASONS),
            "param_checksum": _checksum(self.model), "resumed_from": self.resumed_from,
            "world_size": self.world, "node": self.node, **(final_eval or {}),
        }

    def _save(self, directory: str, metrics: dict, positions: list, epoch_done: bool,
              final_eval: Optional[dict]) -> None:
        train_state = {"iteration": self.iteration, "epoch": self.epoch, "epoch_done": epoch_done,
                       "final": bool(final_eval), "bytes_seen": self.bytes_seen,
                       "lr": metrics["lr"], "total_iters": self.total_iters,
                       "workers": positions,
                       # the reports since the previous checkpoint, this one's last: a driver
                       # killed before it wrote them to history.csv (its workers may outlive it
                       # long enough to save) gets them back from here on a rerun
                       "report": metrics, "reports": list(self.unsaved_rows)}
        meta = {"train": dataclasses.asdict(self.tc), "iteration": self.iteration,
                "bpb": metrics["bpb"],
                **{k: v for k, v in (final_eval or {}).items() if k.endswith("_bpb")}}
        ckpt_io.save(self.model, directory, {"optimizer": self.optimizer.state_dict(),
                                             "scheduler": self.scheduler.state_dict()},
                     train_state, meta)

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
        self.report(final_eval={"final": True, **results}, save=not rerun)

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


class Interval:
    """Loss and bytes since the last report, on this rank; the loss stays on the device so a
    step never waits to read it."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.n_pred, self.bytes, self.t0 = 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, n_pred: int, n_bytes: int):
        self.loss_sum += loss.double() * n_pred
        self.n_pred += n_pred
        self.bytes += n_bytes

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def totals(self, counts: dict) -> torch.Tensor:
        values = [self.n_pred, self.bytes] + [counts.get(k, 0) for k in COUNT_KEYS]
        rest = torch.tensor(values, dtype=torch.float64, device=self.device)
        return torch.cat([self.loss_sum.reshape(1), rest])


def _rank0_print(message: str) -> None:
    print(f"[pretrain] {message}", flush=True)


def _summed(counts: list[dict]) -> dict:
    out: dict = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


def _batches(shard):
    return shard.iter_batches(batch_format="numpy", prefetch_batches=2)


def _any_rank(flag: bool, device, dist: bool) -> bool:
    """True on every rank as soon as one rank's flag is."""
    if not dist:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _checksum(model: torch.nn.Module) -> float:
    """Sum of every parameter in float64: equal across ranks iff DDP kept them in sync."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum() for p in model.parameters()))
