"""The phases every Ray Train job of this project runs on each worker: restore, step, report,
checkpoint. Pretraining (``sentdisc.train.loop``) and fine-tuning (``sentdisc.finetune.loop``)
are subclasses that say what differs: the model, the objective, the data and its position, and
what a checkpoint holds besides the weights.

The Ray touch-points are here and only here: ``get_context``, ``get_checkpoint``,
``prepare_model`` and ``report``; the rest is single-process PyTorch. Report rows go from rank
0 to the driver's progress actor (``sentdisc.train.progress``), not through
``ray.train.report``, which only carries checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from typing import Optional

import torch

from sentdisc import checkpoint as ckpt_io
from sentdisc import storage
from sentdisc.precision import Hardware, choose
from sentdisc.train.config import TrainConfig, make_optimizer, per_worker_batch
from sentdisc.train.faults import KillOnce
from sentdisc.train.progress import diverged
from sentdisc.train.resume import restore_point
from sentdisc.train.step import TrainStep, autocast_for


class TrainWorker:
    """One rank of a Train run. Subclasses provide ``build_model``, ``objective``,
    ``restore_data``, ``train`` and ``finish``, and may extend what a report (``counts``,
    ``extra_metrics``) and a checkpoint (``position``, ``train_state``, ``save_extra``) hold."""

    prefix = "[train]"
    cuda_graph: Optional[str] = None  # None: the config's --cuda_graph
    windows = True  # batches are pretraining's fixed-shape windows (a CUDA graph can replay them)
    stopped = False  # the run ends before total_iters (fine-tuning's early stop): nothing left

    def __init__(self, config: dict):
        import ray
        import ray.train
        import ray.train.torch

        self.tc = tc = TrainConfig(**config["train"])
        self.seed, self.total_iters = config["seed"], config["total_iters"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.node = ray.get_runtime_context().get_node_id()
        self.dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        if tc.threads_per_worker:
            torch.set_num_threads(tc.threads_per_worker)
        self.per_worker = per_worker_batch(tc.batch_size, self.world, self.rank)
        # DDP averages gradients over ranks: weight each by its share of the batch.
        self.loss_scale = self.world * self.per_worker / tc.batch_size
        # auto: bf16 where this worker's device multiplies it natively (sentdisc.precision)
        self.precision, self.precision_reason = choose(tc.precision, Hardware.detect(self.device))
        self.autocast = autocast_for(self.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.run_dir = config["run_dir"]
        self.progress_actor = config["progress_actor"]
        self.after_step = KillOnce(tc.fail_at_iter, self.rank, self.world, self.run_dir)
        self.interval = Interval(self.device)
        self.last_loss: Optional[float] = None
        self.start: Optional[float] = None  # first batch's arrival: rates exclude startup

    # --- what a job provides -----------------------------------------------------------------

    def build_model(self, source: Optional[str]) -> torch.nn.Module:
        """The model to train: from ``source`` (a local checkpoint folder) or fresh."""
        raise NotImplementedError

    def param_groups(self):
        """What the optimizer updates (parameters, or groups with their own lr)."""
        return self.model.parameters()

    def objective(self, model, *inputs, autocast=None):
        """(loss, carry) of one batch: ``sentdisc.train.step.train_step``'s objective."""
        raise NotImplementedError

    def restore_data(self, state: dict) -> None:
        """Put the data where ``state`` (a checkpoint's train state) left it."""

    def counts(self) -> dict:
        """Counters summed over ranks into each report (pretraining: the packer's)."""
        return {}

    def extra_metrics(self, row: dict) -> dict:
        """More of a report's row, given the row so far (all ranks compute it; rank 0's is
        sent)."""
        return {}

    def position(self) -> dict:
        """This rank's data position, gathered from every rank into each checkpoint."""
        return {}

    def train_state(self) -> dict:
        """What a checkpoint's train_state.json holds besides the common fields."""
        return {}

    def save_extra(self, directory: str) -> None:
        """Files a checkpoint holds besides the weights, optimizer and train state."""

    def saved_model(self):
        """The ByteLM a checkpoint's model.safetensors holds."""
        return self.model

    # --- restore -----------------------------------------------------------------------------

    def restore(self) -> None:
        """The newest checkpoint there is (see ``_newest_source``), else a fresh start."""
        import ray.train.torch

        state = {"iteration": 0, "epoch": 0, "bytes_seen": 0, "epoch_done": False,
                 "workers": None}
        with contextlib.ExitStack() as stack:
            source = self._newest_source(stack)
            torch.manual_seed(self.seed)  # same initial weights on every rank (DDP broadcasts too)
            self.model = self.build_model(source).to(self.device).train()
            self.optimizer, self.scheduler = make_optimizer(self.param_groups(), self.tc,
                                                            self.total_iters)
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
            self.ddp_model, self.optimizer, mode=self.cuda_graph or self.tc.cuda_graph,
            precision=self.precision, clip=self.tc.clip, scaler=self.scaler,
            autocast=self.autocast, loss_scale=self.loss_scale, objective=self.objective,
            windows=self.windows, log=self._worker_log if self.rank == 0 else None)
        self.say(self.precision_reason)
        self.restore_data(state)

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

    # --- step --------------------------------------------------------------------------------

    def finished(self, epochs_done: int) -> bool:
        tc = self.tc
        return self.iteration >= tc.max_iters if tc.max_iters else epochs_done >= tc.epochs

    def step(self, *inputs, n_pred: int, n_bytes: int, loss_scale: Optional[float] = None):
        """One optimizer step on a batch; returns the objective's carry. ``loss_scale``:
        this rank's weight for this step, when it is not its share of the batch."""
        if self.start is None:
            self.start = time.perf_counter()
            self.interval.reset()
        loss, carry = self.train_step(*inputs, loss_scale=loss_scale)
        self.scheduler.step()
        self.iteration += 1
        self.interval.add(loss, n_pred, n_bytes)
        self.after_step(self.iteration)
        return carry

    # --- report and checkpoint ---------------------------------------------------------------

    def report(self, save: bool = False, epoch_done: bool = False,
               extra: Optional[dict] = None) -> dict:
        """All ranks: reduce the interval's numbers into a row, with ``extra`` (evaluations;
        ``final`` marks the run's last); rank 0 sends it to the driver. With ``save``, a
        checkpoint holding every rank's data position goes to Ray Train too. Returns the row."""
        metrics = self._metrics(extra)
        final = bool((extra or {}).get("final"))
        if save and diverged(metrics):  # a checkpoint to resume from must hold finite weights
            self.say(f"not saving iteration {self.iteration}'s checkpoint: {diverged(metrics)}")
            save = False
        name = f"checkpoint_{self.iteration:08d}" + ("_final" if final else "")
        self._send_row(metrics, storage.join(self.run_dir, name) if save else "")
        self.unsaved_rows.append(metrics)
        if save:
            self.checkpoint(metrics, name, epoch_done, final)
        return metrics

    def checkpoint(self, metrics: dict, name: str, epoch_done: bool = False,
                   final: bool = False) -> None:
        """Rank 0 writes the checkpoint (every rank's position in it); Ray Train keeps it."""
        import ray.train

        positions = [self.position()]
        if self.dist:
            mine, positions = positions[0], [None] * self.world
            torch.distributed.all_gather_object(positions, mine)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                self._save(tmp, metrics, positions, epoch_done, final)
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

    def _metrics(self, extra: Optional[dict]) -> dict:
        counts = self.counts()
        totals = self.interval.totals(list(counts.values()))
        if self.dist:
            torch.distributed.all_reduce(totals)
        loss_sum, n_pred, interval_bytes, *summed = totals.tolist()
        elapsed = self.interval.elapsed()
        self.interval.reset()
        self.bytes_seen += int(interval_bytes)
        self.last_loss = loss = loss_sum / n_pred if n_pred else self.last_loss
        run_s = time.perf_counter() - self.start if self.start is not None else 0.0
        done = self.iteration - self.resumed_from
        total = self.total_iters
        eta = max(0.0, (total - self.iteration) * run_s / done) if total and done else None
        row = {
            "iteration": self.iteration, "epoch": self.epoch, "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "bytes_per_s": interval_bytes / elapsed if elapsed > 0 else 0.0,
            "bytes_seen": self.bytes_seen, "elapsed_s": run_s, "total_iters": total,
            "eta_s": 0.0 if self.stopped else eta,
            **dict(zip(counts, (int(v) for v in summed))), "precision": self.precision}
        row.update(self.extra_metrics(row))
        return {**row, "param_checksum": _checksum(self.model),
                "resumed_from": self.resumed_from, "world_size": self.world, "node": self.node,
                **(extra or {})}

    def _save(self, directory: str, metrics: dict, positions: list, epoch_done: bool,
              final: bool) -> None:
        train_state = {"iteration": self.iteration, "epoch": self.epoch, "epoch_done": epoch_done,
                       "final": final, "bytes_seen": self.bytes_seen,
                       "lr": metrics["lr"], "total_iters": self.total_iters,
                       "workers": positions, **self.train_state(),
                       # the reports since the previous checkpoint, this one's last: a driver
                       # killed before it wrote them to history.csv (its workers may outlive it
                       # long enough to save) gets them back from here on a rerun
                       "report": metrics, "reports": list(self.unsaved_rows)}
        meta = {"train": dataclasses.asdict(self.tc), "iteration": self.iteration,
                **{k: v for k, v in metrics.items() if k == "bpb" or k.endswith(
                    ("_bpb", "_score"))}}
        ckpt_io.save(self.saved_model(), directory, {"optimizer": self.optimizer.state_dict(),
                                             "scheduler": self.scheduler.state_dict()},
                     train_state, meta)
        self.save_extra(directory)

    def _worker_log(self, message: str) -> None:
        """Rank 0's line for its worker log (the train step's CUDA-graph plan)."""
        print(f"{self.prefix} {message}", flush=True)

    def say(self, message: str) -> None:
        """A line for the job's terminal (rank 0's: the driver prints it)."""
        from sentdisc.train.progress import note

        if self.rank == 0:
            note(self.progress_actor, message)


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

    def totals(self, counts: list) -> torch.Tensor:
        rest = torch.tensor([self.n_pred, self.bytes, *counts], dtype=torch.float64,
                            device=self.device)
        return torch.cat([self.loss_sum.reshape(1), rest])


def _checksum(model: torch.nn.Module) -> float:
    """Sum of every parameter in float64: equal across ranks iff DDP kept them in sync."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum() for p in model.parameters()))
