"""Experiment tracking: an MLflow run per pretraining or transfer job, TensorBoard curves.

This module owns every MLflow call. ``TrackingConfig`` is the ``tracking:``
YAML section of both recipes: MLflow is on by default, in a SQLite store beside the outputs
(``sqlite:///<experiment_dir>/mlflow.db``, artifacts in ``<experiment_dir>/mlartifacts``);
``--tracking_uri`` names a server instead, ``--tracking none`` turns it off, ``--tensorboard``
adds event files in ``<run_dir>/tensorboard`` (``sentdisc.tensorboard``, fed from here too).

Pretraining logs what rank 0 reports, as Ray Train's experiment-tracking guide prescribes, but
from the driver: rank 0 alone sends rows to the driver's progress actor (``progress.reports``)
and the driver hands them here, so only the driver's node must reach the store (the default
local one works on any cluster) and workers never import MLflow. All calls run on one thread:
training never waits on the tracker, and a server lost mid-run costs a warning, not the run.
A server unreachable at the start fails the job at once (exit 2), naming the URI.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from sentdisc import storage
from sentdisc.errors import InputError

TRACKERS = ("mlflow", "none")
RUN_FILE = "mlflow_run.json"        # in the run's folder: the MLflow run a rerun continues
CHECKPOINT_TAG = "sentdisc.checkpoint"
PROBE_TIMEOUT_S = 5.0               # a server that does not answer this fast is "unreachable"
OPEN_TIMEOUT_S = 120.0              # the most a job waits for the store to open
CLOSE_TIMEOUT_S = 120.0             # the most a finished job waits for the tracker to flush
NOT_METRICS = ("iteration", "param_checksum", "total_iters")  # the step, noise, a param


@dataclass
class TrackingConfig:
    tracking: str = field(default="mlflow", metadata={
        "help": "mlflow: log params, metrics and artifacts to MLflow | none: no tracking"})
    tracking_uri: str = field(default="", metadata={
        "help": "MLflow tracking URI (e.g. http://host:5000); empty: $MLFLOW_TRACKING_URI "
                "if set, else a SQLite store <experiment_dir>/mlflow.db", "path": True})
    mlflow_experiment: str = field(default="", metadata={
        "help": "MLflow experiment name; empty: 'pretrain', 'transfer-<dataset>' or "
                "'finetune-<dataset>'"})
    tensorboard: bool = field(default=False, metadata={
        "help": "pretraining and fine-tuning: also write the curves as TensorBoard event "
                "files to <run_dir>/tensorboard"})

    def __post_init__(self):
        self.tracking = str(self.tracking).lower()
        if self.tracking in ("off", "false"):  # YAML reads a bare `off` as false
            self.tracking = "none"
        if self.tracking not in TRACKERS:
            raise ValueError(f"tracking must be one of {TRACKERS}, got {self.tracking!r}")

    @property
    def mlflow(self) -> bool:
        return self.tracking == "mlflow"


class TrackingError(InputError):
    """The tracking store asked for cannot be used: the job stops before it starts (exit 2)."""


# --- where the runs go -------------------------------------------------------------------------

_noted: set = set()


def store_for(cfg: TrackingConfig, experiment_dir: str, log=print) -> tuple[str, Optional[str]]:
    """(tracking URI, artifact location for a new experiment, None: the server's default).
    ``--tracking_uri``, else ``$MLFLOW_TRACKING_URI`` as every MLflow client reads it (said
    once per process), else a SQLite store beside the outputs. MLflow's SQLite store is a local
    file: an ``experiment_dir`` on object storage keeps its runs in ./experiments on this
    machine instead (said once per process)."""
    if cfg.tracking_uri:
        return cfg.tracking_uri, None
    from_env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if from_env:
        if ("env", from_env) not in _noted:
            _noted.add(("env", from_env))
            log(f"[tracking] MLflow store from $MLFLOW_TRACKING_URI: {from_env}")
        return from_env, None
    root = experiment_dir[len("file://"):] if experiment_dir.startswith("file://") else \
        experiment_dir
    if storage.is_uri(root):
        root = os.path.abspath("experiments")
        if experiment_dir not in _noted:
            _noted.add(experiment_dir)
            log(f"[tracking] note: experiment_dir {experiment_dir} is not a local folder, so "
                f"MLflow keeps its runs in a local store here: sqlite:///{root}/mlflow.db "
                f"(pass --tracking_uri for a server)")
    root = storage.absolute(root)
    return f"sqlite:///{root}/mlflow.db", Path(root, "mlartifacts").as_uri()


def probe(uri: str) -> None:
    """Fail now, naming the URI, when a tracking server does not answer: MLflow's own client
    retries a refused connection with backoff for minutes."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri, timeout=PROBE_TIMEOUT_S)
    except requests.RequestException as e:
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({_first_line(e)}); "
                            f"start it, fix --tracking_uri, or pass --tracking none") from None


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]


# --- which metrics are new ---------------------------------------------------------------------

class StepGate:
    """Each metric once per step, the first report winning (MLflow cannot replace a value, so
    where history.csv keeps a restarted attempt's row, MLflow keeps the first): a worker group
    restarted from a checkpoint reports the iterations after it again, a rerun of the
    experiment the ones its checkpoint had, and the final report repeats the last loss."""

    def __init__(self, last: Optional[dict] = None):
        self.last: dict[str, int] = dict(last or {})

    @classmethod
    def from_rows(cls, rows: list) -> StepGate:
        gate = cls()
        gate.fresh(rows)
        return gate

    def fresh(self, rows: list) -> list[tuple[int, dict]]:
        """(step, {metric: value}) for what ``rows`` hold that was not logged yet (numbers
        only: bools, None, strings (the node) and lists are not metrics)."""
        out = []
        for row in rows:
            step = row.get("iteration")
            if step is None:
                continue
            new = {k: float(v) for k, v in row.items() if k not in NOT_METRICS and isinstance(
                v, (int, float)) and not isinstance(v, bool) and step > self.last.get(k, -1)}
            self.last.update(dict.fromkeys(new, step))
            if new:
                out.append((int(step), new))
        return out


# --- the background thread ---------------------------------------------------------------------

class Tracker:
    """Sinks (an MLflow run, TensorBoard files) fed by one background thread, so a job never
    waits on its tracker. ``open()`` imports their libraries on the calling thread (imports
    racing another thread's can deadlock) and opens the stores on the tracker's; ``start()``
    creates or continues the run; ``ready()`` waits for both and raises TrackingError if
    either failed. Later a failing call prints one warning per sink and the job goes on. As a
    context manager it opens, and closes with the job's status (FINISHED, KILLED, FAILED)."""

    def __init__(self, sinks: list, log=print):
        self.sinks, self.log = sinks, log
        self.failed: dict[str, int] = {}
        self._jobs: queue.Queue = queue.Queue()
        self._started = threading.Event()
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> Tracker:
        self.open()
        return self

    def __exit__(self, kind, *_) -> None:
        self.close("FINISHED" if kind is None else
                   "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")

    def open(self) -> None:
        if not self.sinks or self._thread is not None:
            return
        for sink in self.sinks:
            sink.load()
        self._thread = threading.Thread(target=self._work, name="sentdisc-tracking", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            for sink in self.sinks:
                sink.open()
        except Exception as e:
            self._fail(e)
        while (job := self._jobs.get()) is not None:
            if self._error is None:
                job()

    def _fail(self, e: BaseException) -> None:
        self._error = e
        self._started.set()

    def start(self, params: dict) -> None:
        """Create (or continue) each sink's run with these params (nested dicts flattened)."""
        def begin():
            try:
                for sink in self.sinks:
                    sink.start(flatten(params))
            except Exception as e:
                self._fail(e)
            self._started.set()

        if self._thread is not None:
            self._jobs.put(begin)

    def ready(self, timeout: float = OPEN_TIMEOUT_S) -> None:
        if self._thread is None:
            return
        if not self._started.wait(timeout):
            raise TrackingError(f"experiment tracking did not start within {timeout:.0f} s "
                                f"({', '.join(s.name for s in self.sinks)}); --tracking none "
                                f"turns it off")
        e = self._error
        if isinstance(e, TrackingError):
            raise e
        if e is not None:
            raise TrackingError(f"experiment tracking could not start: {_first_line(e)} "
                                f"(--tracking none turns it off)") from None

    def _each(self, method: str, *args) -> None:
        for sink in self.sinks if self._thread is not None else ():
            fn = getattr(sink, method, None)
            if fn is not None:
                self._jobs.put(lambda fn=fn, name=sink.name: self._guarded(name, fn, args))

    def _guarded(self, name: str, fn, args) -> None:
        try:
            fn(*args)
        except Exception as e:
            self.failed[name] = self.failed.get(name, 0) + 1
            if self.failed[name] == 1:
                self.log(f"[tracking] warning: {name} failed ({_first_line(e)}); the job goes "
                         f"on, its outputs are in its folder as usual")

    def log_rows(self, rows: list) -> None:
        """Report rows (rank 0's, through the driver): never blocks the caller."""
        if rows:
            self._each("rows", list(rows))

    def log_result(self, metrics: dict, tags: dict, artifacts: dict) -> None:
        self._each("result", metrics, tags, artifacts)

    def close(self, status: str = "FINISHED", timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Flush and end; waits at most ``timeout`` seconds (a hung server must not hang the
        job's end), then says what did not get through."""
        if self._thread is None:
            return
        self._each("close", status)
        self._jobs.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.log(f"[tracking] warning: tracking did not finish within {timeout:.0f} s; "
                     f"the job's outputs are in its folder as usual")
        for name, n in self.failed.items():
            self.log(f"[tracking] {n} {name} call(s) failed during this job")
        self._thread = None


def flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    out: dict = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


# --- MLflow ------------------------------------------------------------------------------------

class MlflowRun:
    """One MLflow run, through ``MlflowClient`` (no process-global active run): created, or
    continued when ``run_file`` names one in the same store."""

    def __init__(self, uri: str, artifact_location: Optional[str], experiment: str,
                 run_name: str, tags: dict, run_file: str = "", resume: bool = False,
                 prior_rows: Optional[list] = None):
        self.uri, self.artifact_location, self.experiment = uri, artifact_location, experiment
        self.run_name, self.tags, self.run_file, self.resume = run_name, tags, run_file, resume
        self.prior_rows = prior_rows or []
        self.name = f"MLflow ({uri})"
        self.client = self.run_id = self.experiment_id = None
        self.gate = StepGate()
        self.params_before: dict = {}  # a continued run's params

    def load(self) -> None:
        import mlflow  # noqa: F401 -- on the caller's thread (see Tracker)

        # its "Creating initial MLflow database tables" lines would break a failed job's
        # one-line error on stderr
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

    def open(self) -> None:
        from mlflow import MlflowClient

        with self._named():
            if self.uri.startswith("sqlite:///"):  # SQLite makes the file, not its folder
                os.makedirs(os.path.dirname(self.uri[len("sqlite:///"):]), exist_ok=True)
            self.client = MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(self.experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
                self.experiment, artifact_location=self.artifact_location)

    def start(self, params: dict) -> None:
        with self._named():
            self.run_id = self._continued() or self._create(self.experiment_id)
            self.params(params)
            self.rows(self.prior_rows)  # an earlier driver's curve, where this run lacks it

    @contextlib.contextmanager
    def _named(self):
        try:
            yield
        except Exception as e:
            raise TrackingError(f"MLflow tracking at {self.uri}: {_first_line(e)} "
                                f"(--tracking none turns it off)") from None

    def _continued(self) -> Optional[str]:
        """The run of an earlier driver of this experiment, when this run resumes it."""
        if not (self.resume and self.run_file and storage.exists(self.run_file)):
            return None
        saved = storage.read_json(self.run_file)
        try:
            run = self.client.get_run(saved["run_id"]) if saved.get(
                "tracking_uri") == self.uri else None
        except Exception:  # deleted from the store since: start a new one
            run = None
        if run is None or run.info.lifecycle_stage != "active":
            return None
        self.client.update_run(run.info.run_id, status="RUNNING")
        self.gate = StepGate({k: max(m.step for m in self.client.get_metric_history(
            run.info.run_id, k)) for k in run.data.metrics})
        self.params_before = run.data.params
        return run.info.run_id

    def _create(self, experiment_id: str) -> str:
        run = self.client.create_run(experiment_id, run_name=self.run_name, tags=self.tags)
        if self.run_file:
            storage.write_json(self.run_file, {
                "tracking_uri": self.uri, "experiment_id": experiment_id,
                "experiment": self.experiment, "run_id": run.info.run_id})
        return run.info.run_id

    def params(self, params: dict) -> None:
        """All of them; a continued run keeps its first values (MLflow params cannot change)
        and the changed ones go to a tag."""
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        values = {k: str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in params.items()}
        before = self.params_before
        changed = {k: v for k, v in values.items() if k in before and before[k] != v}
        new = [Param(k, v) for k, v in values.items() if k not in before]
        for i in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[i:i + MAX_PARAMS_TAGS_PER_BATCH])
        if changed:
            self.client.set_tag(self.run_id, "sentdisc.changed_on_resume",
                                json.dumps(changed)[:5000])

    def rows(self, rows: list) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for step, new in self.gate.fresh(rows)
                   for k, v in new.items()]
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])

    def result(self, metrics: dict, tags: dict, artifacts: dict) -> None:
        """A job's end: metrics ({name: value} or {name: [values by step]}), tags, files."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        series = {k: v if isinstance(v, list) else [v] for k, v in metrics.items()}
        batch = [Metric(k, float(x), now, i) for k, xs in series.items()
                 for i, x in enumerate(xs) if math.isfinite(x)]
        self.client.log_batch(self.run_id, metrics=batch,
                              tags=[RunTag(k, str(v)) for k, v in tags.items()])
        for name, path in artifacts.items():
            if path and storage.exists(str(path)):
                with _local_file(str(path), name) as local:
                    self.client.log_artifact(self.run_id, local)

    def close(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)


@contextlib.contextmanager
def _local_file(uri: str, name: str):
    """A local path holding ``uri``'s bytes under ``name`` (the file itself when local)."""
    if not storage.is_uri(uri) and Path(uri).name == name:
        yield uri
        return
    with tempfile.TemporaryDirectory(prefix="sentdisc-artifact-") as tmp:
        path = os.path.join(tmp, name)
        Path(path).write_bytes(storage.read_bytes(uri))
        yield path


# --- the two jobs' trackers --------------------------------------------------------------------

def pretrain_tracker(cfg: Optional[TrackingConfig], output, resume: bool, prior_rows: list,
                     log=print) -> Tracker:
    """The tracker of a pretraining run (``output`` its OutputConfig, experiment_dir
    absolute); ``resume``: the run continues a checkpoint, so its MLflow run continues too."""
    return train_tracker(cfg, output, output.run_dir, "pretrain", output.experiment_name,
                         {"sentdisc.job": "pretrain"}, resume, prior_rows, log)


def finetune_tracker(cfg: Optional[TrackingConfig], output, run_dir: str, dataset: str,
                     checkpoint: str, resume: bool, prior_rows: list, log=print) -> Tracker:
    """The tracker of a fine-tuning run: experiment ``finetune-<dataset>``, the run named
    ``<experiment_name>/<dataset>`` and tagged with the checkpoint it started from; a rerun
    continues its run, as pretraining's does."""
    tags = {"sentdisc.job": "finetune", "sentdisc.dataset": dataset,
            "sentdisc.base_checkpoint": checkpoint}
    pretrain_run = _pretrain_run_of(checkpoint)
    if pretrain_run:
        tags["sentdisc.pretrain_run_id"] = pretrain_run
    return train_tracker(cfg, output, run_dir, f"finetune-{dataset}",
                         f"{output.experiment_name}/{dataset}", tags, resume, prior_rows, log)


def train_tracker(cfg: Optional[TrackingConfig], output, run_dir: str, experiment: str,
                  run_name: str, tags: dict, resume: bool, prior_rows: list,
                  log=print) -> Tracker:
    """A Train job's tracker: an MLflow run fed with rank 0's rows (continued by a rerun, its
    id in ``<run_dir>/mlflow_run.json``), and TensorBoard curves when asked."""
    cfg = cfg or TrackingConfig()
    sinks: list = []
    if cfg.mlflow:
        uri, artifacts = store_for(cfg, output.experiment_dir, log)
        probe(uri)
        sinks.append(MlflowRun(
            uri, artifacts, cfg.mlflow_experiment or experiment, run_name,
            {**tags, "sentdisc.run_dir": run_dir}, run_file=storage.join(run_dir, RUN_FILE),
            resume=resume, prior_rows=prior_rows))
    if cfg.tensorboard:
        from sentdisc.tensorboard import TensorBoardCurves

        sinks.append(TensorBoardCurves(run_dir, prior_rows))
    return Tracker(sinks, log)


def transfer_tracker(cfg: Optional[TrackingConfig], output, dataset: str, checkpoint: str,
                     log=print) -> Tracker:
    """The tracker of a transfer run: one MLflow run per job in experiment
    ``transfer-<dataset>``, named after and tagged with the checkpoint it featurized with."""
    cfg = cfg or TrackingConfig()
    if not cfg.mlflow:
        return Tracker([], log)
    uri, artifacts = store_for(cfg, output.experiment_dir, log)
    probe(uri)
    parent = storage.basename(checkpoint.rstrip("/").rsplit("/", 1)[0])
    tags = {CHECKPOINT_TAG: checkpoint, "sentdisc.job": "transfer", "sentdisc.dataset": dataset}
    pretrain_run = _pretrain_run_of(checkpoint)
    if pretrain_run:
        tags["sentdisc.pretrain_run_id"] = pretrain_run
    return Tracker([MlflowRun(uri, artifacts, cfg.mlflow_experiment or f"transfer-{dataset}",
                              f"{parent}/{storage.basename(checkpoint)}", tags)], log)


def _pretrain_run_of(checkpoint: str) -> str:
    """The MLflow run of the pretraining that wrote ``checkpoint`` (in its run folder), if any."""
    run_file = storage.join(checkpoint.rstrip("/").rsplit("/", 1)[0], RUN_FILE)
    try:
        return storage.read_json(run_file).get("run_id", "") if storage.exists(run_file) else ""
    except Exception:
        return ""
