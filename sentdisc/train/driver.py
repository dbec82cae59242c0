"""The driver of a pretraining run: check the inputs, size the run, fit, write the outputs.

A bad path or config fails here, before any worker starts. The run's length (for the linear
learning-rate decay and the ETA) is ``max_iters``, else counted from the corpus when that is
cheap. The driver, not the workers, writes ``run_config.json``, ``history.csv``, ``loss.png``,
``summary.json`` and ``checkpoint_final`` under ``<experiment_dir>/<experiment_name>/``, on any
storage (``experiment_dir`` may be ``s3://bucket/exp``: it is Ray Train's ``storage_path``
too, which every node must see on a multi-node cluster). It also logs rank 0's reports,
the config, the loss plot and the history to MLflow (``sentdisc.tracking``); the rows reach
the driver through the progress actor, so only the driver's node needs the tracking store.
"""
from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from sentdisc import checkpoint as ckpt_io
from sentdisc import storage
from sentdisc.config import OutputConfig
from sentdisc.data.readers import skipped_by_reason
from sentdisc.errors import InputError, Interrupted, RunFailed
from sentdisc.model import ModelConfig
from sentdisc.report import merge_rows, plot_loss, read_history, write_history
from sentdisc.runtime import ensure_ray
from sentdisc.tracking import CHECKPOINT_TAG, Tracker, TrackingConfig, pretrain_tracker
from sentdisc.train.config import TrainConfig
from sentdisc.train.progress import Progress
from sentdisc.train.resources import check_fits, stall_diagnosis, starting_line

# Above this many input bytes the driver does not read the corpus once just to size the run.
COUNT_LIMIT_BYTES = 2 * 1024 ** 3


def pretrain(model_cfg: ModelConfig, data_cfg, train_cfg: TrainConfig,
             output: Optional[OutputConfig] = None, progress: bool = True,
             tracking: Optional[TrackingConfig] = None) -> dict:
    """Run a pretraining job on the current Ray cluster (started locally if none), tracked
    in MLflow unless ``tracking`` says otherwise (``sentdisc.tracking``)."""
    from sentdisc.data.readers import build_datasets, train_split
    from sentdisc.train.loop import train_loop
    from sentdisc.train.resume import RESUME_SPLIT, data_config

    output = checked_output(output or OutputConfig())
    run_dir = output.run_dir
    tc = resumed(train_cfg, run_dir, "[pretrain]")
    if tc.resume:  # a resumed checkpoint's weights decide the architecture
        model_cfg = ckpt_io.load_config(tc.resume)
    prior = prior_history(run_dir, tc.resume)
    # a tracking server that does not answer fails the run here; a rerun continues its run
    tracker = pretrain_tracker(tracking, output, resume=bool(tc.resume), prior_rows=prior)
    # Worker logs stay in Ray's log folder: the driver prints one progress line per report.
    ensure_ray(include_dashboard=False, log_to_driver=False)
    check_fits(tc)
    datasets = {k: v for k, v in build_datasets(data_cfg).items() if v is not None}
    total_iters = plan_iterations(data_cfg, tc, datasets["train"])
    job = TrainJob(
        "[pretrain]", run_dir, tc, train_loop,
        run_config={"model": model_cfg.to_dict(), "data": dataclasses.asdict(data_cfg),
                    "train": dataclasses.asdict(tc), "output": dataclasses.asdict(output),
                    "total_iters": total_iters},
        loop_config={"model": model_cfg.to_dict(), "train": dataclasses.asdict(tc),
                     "persist_state": data_cfg.persist_state, "seed": data_cfg.seed,
                     "total_iters": total_iters, "run_dir": run_dir,
                     "train_split": train_split(data_cfg),
                     "eval_splits": [k for k in datasets if k != "train"]},
        datasets={**datasets, RESUME_SPLIT: datasets["train"]},
        dataset_config=data_config(run_dir, tc.resume),
        title=f"{output.experiment_name}: bits per byte")
    with tracker:  # the inputs are good: only now is the store opened and written
        summary = job.run(prior, tracker, progress)
        tracker.log_result({}, {CHECKPOINT_TAG: summary["checkpoint"]} if summary["checkpoint"]
                           else {}, job.artifacts(summary))
    return summary


# --- what every Train job's driver does ----------------------------------------------------------

def checked_output(output: OutputConfig) -> OutputConfig:
    """Where outputs go, checked now, with an absolute experiment_dir."""
    exp = output.experiment_dir
    storage.check_access(exp, "--experiment_dir")
    if "runtime_resources" in str(Path.cwd()) and not storage.is_uri(exp) \
            and not Path(exp).is_absolute():
        print(f"[train] note: experiment_dir {exp!r} is inside this Ray job's temporary "
              f"working directory ({storage.absolute(exp)}); pass an absolute "
              f"--experiment_dir or a storage URI to keep the outputs", flush=True)
    return dataclasses.replace(output, experiment_dir=storage.absolute(exp))


def resumed(tc: TrainConfig, run_dir: str, prefix: str) -> TrainConfig:
    """The run's TrainConfig with ``resume`` set: --resume (checked), else the newest complete
    checkpoint of ``run_dir`` (a rerun of the same experiment continues it)."""
    newest = ckpt_io.newest_complete(run_dir)
    if not tc.resume:
        if newest:
            print(f"{prefix} resuming from {newest}, the newest complete checkpoint of "
                  f"{run_dir}", flush=True)
            tc = dataclasses.replace(tc, resume=newest)
    if tc.resume:
        storage.check_access(tc.resume, "--resume")
        state = storage.join(tc.resume, ckpt_io.TRAIN_STATE)
        reason = ckpt_io.incomplete_reason(tc.resume) if storage.exists(state) else None
        if reason:
            raise ckpt_io.CheckpointError(f"--resume {tc.resume} is incomplete: {reason}")
        tc = dataclasses.replace(tc, resume=storage.absolute(tc.resume))
        _check_not_behind(tc.resume, newest, run_dir)
    return tc


def _check_not_behind(resume: str, newest: Optional[str], run_dir: str) -> None:
    """A worker continues from the newest of --resume and the run's own checkpoints (so a
    restarted group never goes back): a --resume behind the run's newest would be passed over
    in silence."""
    def iteration(checkpoint: str) -> int:
        path = storage.join(checkpoint, ckpt_io.TRAIN_STATE)
        return storage.read_json(path).get("iteration", 0) if storage.exists(path) else 0

    if newest and storage.absolute(newest) != resume and iteration(newest) > iteration(resume):
        raise InputError(f"--resume {resume} (iteration {iteration(resume)}) is behind "
                         f"{newest} (iteration {iteration(newest)}), the newest checkpoint of "
                         f"{run_dir}, which the workers would continue instead: to continue "
                         "from it, give the run its own --experiment_name")


def prior_history(run_dir: str, resume: str) -> list:
    """The history of an earlier run of this experiment, if it left checkpoints to resume, up
    to the checkpoint this run resumes from. Each checkpoint holds the reports since the one
    before it, for an earlier driver that died before writing them down (its workers can
    outlive it by several checkpoints): those of every checkpoint after the history's last row,
    up to the resumed one, fill the gap."""
    history = storage.join(run_dir, "history.csv")
    names = [n for n in storage.list_dir(run_dir) if n.startswith("checkpoint_")] \
        if storage.exists(run_dir) else []
    rows = read_history(history) if storage.exists(history) and names else []
    state = storage.join(resume, ckpt_io.TRAIN_STATE) if resume else ""
    if not (rows and state and storage.exists(state)):
        return rows
    upto = storage.read_json(state).get("iteration", 0)
    have = {r.get("iteration") for r in rows}
    last = max((i for i in have if i is not None), default=-1)
    lost = []
    for folder in sorted({storage.join(run_dir, n) for n in names} | {resume}):
        path = storage.join(folder, ckpt_io.TRAIN_STATE)
        if not storage.exists(path):
            continue
        saved = storage.read_json(path)
        if last < saved.get("iteration", -1) <= upto:
            lost += [r for r in saved.get("reports") or [saved.get("report")]
                     if r and r.get("iteration") not in have and r.get("iteration", -1) > last]
    lost = list({r["iteration"]: r for r in sorted(lost, key=lambda r: r["iteration"])}.values())
    return merge_rows(rows, lost)


@dataclasses.dataclass
class TrainJob:
    """One Ray Train run as its driver sees it: ``loop`` on the workers with ``loop_config``,
    checkpoints and outputs in ``run_dir`` (also Ray Train's run folder), rows from the
    workers printed with ``prefix`` and written to history.csv as they come."""
    prefix: str
    run_dir: str
    tc: TrainConfig
    loop: Callable
    run_config: dict
    loop_config: dict
    datasets: dict = dataclasses.field(default_factory=dict)
    dataset_config: Any = None
    checkpoint_config: Any = None   # default: the newest --keep_checkpoints
    title: str = ""
    final_checkpoint: Optional[Callable] = None  # (result) -> the Checkpoint to keep as final

    def run(self, prior: list, tracker: Tracker, progress: bool = True) -> dict:
        """run_config.json, the fit with its progress channel, then history.csv, the loss plot,
        checkpoint_final and summary.json; returns the summary (with every row)."""
        storage.makedirs(self.run_dir)
        storage.write_json(storage.join(self.run_dir, "run_config.json"), self.run_config)
        tc = self.tc
        if progress:  # the workers print nothing for tens of seconds: say what is coming
            print(f"{self.prefix} {starting_line(tc)}", flush=True)
        tracker.start(self.run_config)  # every config value as an MLflow param
        tracker.ready()  # before any worker starts
        t0 = time.perf_counter()
        history = storage.join(self.run_dir, "history.csv")

        def on_rows(new: list) -> None:
            # appended as reports arrive, so a killed driver leaves its curve behind
            write_history(merge_rows(prior, watch.rows), history)
            tracker.log_rows(new)  # rank 0's rows only: no other rank sends any

        watch = Progress(prefix=self.prefix, printed=progress, stall_warn_s=tc.stall_warn_s,
                         stall_fail_s=tc.stall_fail_s, diagnose=lambda: stall_diagnosis(tc),
                         on_rows=on_rows)
        result = _fit(self.trainer(watch.actor_name), watch, self.run_dir)
        final = (self.final_checkpoint or (lambda r: r.checkpoint))(result)
        return _write_outputs(self.run_dir, self.title, prior, watch.rows, final,
                              time.perf_counter() - t0)

    def trainer(self, progress_actor: str):
        import ray.train
        from ray.train.torch import TorchConfig, TorchTrainer

        tc = self.tc
        resources = {"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {}),
                     **tc.extra_resources}
        root, name = self.run_dir.rstrip("/").rsplit("/", 1)
        storage_path, storage_fs = storage.for_ray(root)
        extra = {"dataset_config": self.dataset_config} if self.dataset_config else {}
        return TorchTrainer(
            self.loop, train_loop_config={**self.loop_config, "progress_actor": progress_actor},
            datasets=self.datasets or None, **extra,
            torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=tc.scaling, use_gpu=tc.use_gpu, resources_per_worker=resources,
                elastic_resize_monitor_interval_s=tc.resize_interval_s),
            run_config=ray.train.RunConfig(
                storage_path=storage_path, storage_filesystem=storage_fs, name=name,
                checkpoint_config=self.checkpoint_config or ray.train.CheckpointConfig(
                    num_to_keep=tc.keep_checkpoints),
                failure_config=ray.train.FailureConfig(max_failures=tc.max_failures)))

    def artifacts(self, summary: dict) -> dict:
        return {"loss.png": summary["loss_plot"], "history.csv": summary["history"],
                "summary.json": storage.join(self.run_dir, "summary.json"),
                "run_config.json": storage.join(self.run_dir, "run_config.json")}


def _fit(trainer, watch: Progress, run_dir: str):
    """``trainer.fit()`` with the progress channel running; a run the watchdog stopped fails
    with its diagnosis, one stopped by Ctrl-C or SIGTERM (`ray job stop`) says what it kept.
    Ray Train installs its own Ctrl-C handler (in the main thread: only there can the watchdog
    stop a run), which aborts the run; either signal then ends ``ray.get`` in the same
    SystemExit, so the signal is noted as it comes. The caller's handlers come back after."""
    main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    watch.can_stop = main
    stopped_by = []
    if main:
        def on_sigterm(signum, frame):
            stopped_by.append("SIGTERM")
            previous = handlers[signal.SIGTERM]
            if callable(previous):
                previous(signum, frame)
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with watch:
            return trainer.fit()
    except (KeyboardInterrupt, SystemExit, Exception) as e:
        if watch.failed:
            newest = ckpt_io.newest_complete(run_dir, log=lambda _: None)
            raise RunFailed(watch.failed + (f"; the newest checkpoint is {newest}" if newest
                                            else "")) from None
        if stopped_by:
            raise Interrupted(_stop_message("SIGTERM", watch.rows, run_dir), 128 + signal.SIGTERM) \
                from None
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise Interrupted(_stop_message("Ctrl-C", watch.rows, run_dir)) from None
        raise
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def _stop_message(stopped_by: str, rows: list, run_dir: str) -> str:
    done = max((r["iteration"] for r in rows if r.get("iteration") is not None), default=None)
    newest = ckpt_io.newest_complete(run_dir, log=lambda _: None)
    where = f"at iteration {done}" if done is not None else "before its first report"
    return (f"stopped by {stopped_by} {where}; " + (
        f"the same command continues from {newest}" if newest else
        "no checkpoint was saved yet, so the same command starts over"))


def _write_outputs(run_dir: str, title: str, prior: list, rows: list, checkpoint,
                   wall: float) -> dict:
    """The final history, loss plot, checkpoint_final and summary.json, by the driver."""
    history = merge_rows(prior, rows)
    history_path = write_history(history, storage.join(run_dir, "history.csv"))
    plot = plot_loss(history, storage.join(run_dir, "loss.png"), title=title)
    final_dir = storage.join(run_dir, "checkpoint_final")
    if checkpoint is not None:
        storage.copy_from(checkpoint.filesystem, checkpoint.path, final_dir)
    final = next((r for r in reversed(rows) if r.get("final")), {})
    last = next((r for r in reversed(history) if r.get("loss") is not None), {})
    summary = {
        "checkpoint": final_dir if checkpoint is not None else None,
        "ray_checkpoint": checkpoint.path if checkpoint is not None else None,
        "history": history_path, "loss_plot": plot,
        "val_bpb": final.get("val_bpb"), "test_bpb": final.get("test_bpb"),
        "train_bpb": last.get("bpb"), "train_loss": last.get("loss"),
        "iterations": last.get("iteration"),
        "bytes_seen": last.get("bytes_seen"), "wall_s": wall,
        "skipped_total": last.get("skipped_total"), "records": last.get("records"),
        "rows": rows,
    }
    storage.write_json(storage.join(run_dir, "summary.json"),
                       {k: v for k, v in summary.items() if k != "rows"})
    return summary


# --- the run's length --------------------------------------------------------------------------

def count_train_bytes(ds) -> int:
    """Bytes of well-formed training text the packer can use (after capping), in one
    streaming pass."""
    from sentdisc.data.readers import survey

    return survey(ds)["bytes"]


def _input_bytes(spec: str) -> int:
    """Size on storage of the files a data path names (compressed size for compressed files)."""
    from sentdisc.data.readers import list_corpus

    return sum(size for _, size in list_corpus(spec))


def plan_iterations(data_cfg, tc: TrainConfig, train_ds) -> Optional[int]:
    """Total iterations of the run: max_iters, else counted from the corpus when that is cheap.
    A corpus in which every record is malformed fails here, before any worker starts, with
    the counts by reason."""
    from sentdisc.data.readers import survey

    def sample_check():
        if train_ds is not None:
            _check_some_good(survey(train_ds.limit(SAMPLE_ROWS)), data_cfg, sample=True)

    if tc.max_iters:
        sample_check()
        return tc.max_iters
    size = _input_bytes(data_cfg.train)
    if size > COUNT_LIMIT_BYTES:
        if tc.schedule == "linear":
            raise InputError(
                "lr_scheduler=linear decays to 0 over the run, so it needs the run's length: set "
                f"max_iters (the training data at {data_cfg.train} is {size / 1e9:.1f} GB, too "
                f"large to count cheaply)")
        sample_check()
        return None
    print(f"[pretrain] sizing the run: counting training bytes ({size / 1e6:.1f} MB on "
          f"storage) (set max_iters to skip)", flush=True)
    counts = survey(train_ds)
    _check_some_good(counts, data_cfg, sample=False)
    total = windows_per_epoch(counts["bytes"], tc.batch_size, tc.seq_length) * tc.epochs
    print(f"[pretrain] {counts['bytes'] / 1e6:.2f} MB of text in {counts['records']} records "
          f"-> {total} iterations ({tc.epochs} epoch(s) of batch {tc.batch_size} x seq "
          f"{tc.seq_length}){_skipped(counts)}", flush=True)
    return total


def windows_per_epoch(n_bytes: int, batch_size: int, seq_length: int) -> int:
    """The windows the packer makes of an epoch's ``n_bytes``: every byte but each stream's
    first is a target once (its last windows drain the streams: data.packer), B x T targets a
    window. Exact for one worker. With several it is a lower bound: an epoch lasts until every
    rank has trained what Ray Data handed it (blocks go to whichever rank asks), at most about a
    block's worth of windows more, which run at the schedule's last learning rate."""
    return max(1, -(-max(n_bytes - batch_size, 0) // (batch_size * seq_length)))


SAMPLE_ROWS = 20_000  # rows read to check a corpus too large to count has good records at all


def _check_some_good(counts: dict, data_cfg, sample: bool) -> None:
    if counts["records"]:
        return
    if sample and counts["lines"] >= SAMPLE_ROWS:  # only a sample: say so, do not fail
        print(f"[pretrain] warning: the first {counts['lines']} rows of {data_cfg.train} are all "
              f"malformed{_skipped(counts)}", flush=True)
        return
    raise InputError(f"every record of --train {data_cfg.train} is malformed: "
                     f"{counts['lines']} rows, none trainable{_skipped(counts)}")


def _skipped(counts: dict) -> str:
    parts = [f"{v} {k}" for k, v in sorted(skipped_by_reason(counts).items(),
                                            key=lambda kv: -kv[1])]
    if counts.get("capped_records"):
        parts.append(f"{counts['capped_records']} capped at max_record_bytes")
    return f"; skipped: {', '.join(parts)}" if parts else ""
