"""Experiment tracking on a real MLflow SQLite store: one tiny 2-worker pretraining run (rank 1
never logs), one tiny transfer run of its checkpoint, a rerun continuing its MLflow run, reruns
after a killed driver appending to TensorBoard event files (local and on S3), and a server that
does not answer failing the job at once."""
import csv
import json
import random
import struct
import time
from pathlib import Path

import pytest

from sentdisc import storage
from sentdisc.config import OutputConfig, parse
from sentdisc.data.readers import DataConfig
from sentdisc.model import ModelConfig
from sentdisc.recipes import pretrain as pretrain_recipe
from sentdisc.recipes import transfer as transfer_recipe
from sentdisc.tensorboard import TensorBoardCurves
from sentdisc.tracking import (
    CHECKPOINT_TAG,
    RUN_FILE,
    StepGate,
    TrackingConfig,
    pretrain_tracker,
    store_for,
    transfer_tracker,
)
from sentdisc.train import TrainConfig
from sentdisc.train.progress import reports
from sentdisc.transfer import TransferConfig

WORDS = "good bad great awful movie plot fun love hate the was not very".split()
MAX_ITERS, LOG_INTERVAL = 10, 5


def _store(experiment_dir) -> str:
    return f"sqlite:///{Path(experiment_dir).resolve()}/mlflow.db"


def _runs(experiment_dir, experiment: str):
    """mlflow.search_runs on the default store, as a user would read it."""
    import mlflow

    mlflow.set_tracking_uri(_store(experiment_dir))
    try:
        return mlflow.search_runs(experiment_names=[experiment], output_format="list")
    finally:
        mlflow.set_tracking_uri(None)


def _history(experiment_dir, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(_store(experiment_dir))
            .get_metric_history(run_id, key)]


def _artifacts(experiment_dir, run_id: str) -> set:
    from mlflow import MlflowClient

    return {a.path for a in MlflowClient(_store(experiment_dir)).list_artifacts(run_id)}


def _write_corpus(folder: Path) -> None:
    rng = random.Random(0)
    folder.mkdir(parents=True)
    with open(folder / "a.json", "w") as f:
        for _ in range(300):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30)))
            f.write(json.dumps({"reviewText": text}) + "\n")


def _scalars(logdir: Path) -> dict[str, list[int]]:
    """{tag: [steps]} from TensorBoard event files (TFRecords of Event protos)."""
    from tensorboardX.proto import event_pb2

    steps: dict[str, list[int]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    steps.setdefault(v.tag, []).append(event.step)
    return steps


@pytest.fixture(scope="module")
def tracked_run(ray_local, tmp_path_factory):
    """One tiny pretraining run on 2 workers, tracked in MLflow and TensorBoard."""
    tmp = tmp_path_factory.mktemp("tracked")
    _write_corpus(tmp / "corpus")
    argv = ["--train", str(tmp / "corpus"), "--split", "90,10,0", "--embed_size", "8",
            "--rnn_size", "32", "--batch_size", "4", "--seq_length", "16", "--num_workers", "2",
            "--max_iters", str(MAX_ITERS), "--log_interval", str(LOG_INTERVAL),
            "--save_iters", "100", "--experiment_dir", str(tmp / "exp"),
            "--experiment_name", "tiny", "--tensorboard"]
    assert pretrain_recipe.main(argv) == 0
    return tmp


def test_pretraining_logs_rank_0s_reports_once_per_step(tracked_run):
    exp = tracked_run / "exp"
    (run,) = _runs(exp, "pretrain")
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    params = run.data.params
    assert (params["model.rnn_size"], params["train.batch_size"], params["train.num_workers"],
            params["total_iters"]) == ("32", "4", "2", str(MAX_ITERS))
    assert params["data.train"] == str(tracked_run / "corpus")
    # one value per report and metric, steps = iterations: rank 1 never logged
    reported = list(range(LOG_INTERVAL, MAX_ITERS + 1, LOG_INTERVAL))
    for key in ("loss", "bpb", "lr", "bytes_per_s", "skipped_total", "world_size"):
        history = _history(exp, run.info.run_id, key)
        assert [s for s, _ in history] == reported, (key, history)
    assert {v for _, v in _history(exp, run.info.run_id, "world_size")} == {2.0}
    assert [s for s, _ in _history(exp, run.info.run_id, "val_bpb")] == [MAX_ITERS]
    csv_rows = list(csv.DictReader(open(exp / "tiny" / "history.csv")))
    losses = [float(r["loss"]) for r in csv_rows if r["final"] != "True"]
    assert [v for _, v in _history(exp, run.info.run_id, "loss")] == pytest.approx(losses)
    # the plot, the history and the final checkpoint's location
    assert {"loss.png", "history.csv", "summary.json", "run_config.json"} <= _artifacts(
        exp, run.info.run_id)
    assert run.data.tags[CHECKPOINT_TAG] == str(exp / "tiny" / "checkpoint_final")
    assert json.loads((exp / "tiny" / RUN_FILE).read_text())["run_id"] == run.info.run_id
    # TensorBoard: the same curves, written by the same single place
    tb = _scalars(exp / "tiny" / "tensorboard")
    assert tb["loss"] == reported and tb["val_bpb"] == [MAX_ITERS]


def test_transfer_run_is_tagged_with_its_checkpoint(tracked_run, capsys):
    exp, ckpt = tracked_run / "exp", tracked_run / "exp" / "tiny" / "checkpoint_final"
    rows = [[i % 2, f"{'great fun' if i % 2 else 'dull mess'} {'!' * (i % 3)}"]
            for i in range(60)]
    train = tracked_run / "labeled" / "train.csv"
    train.parent.mkdir()
    with open(train, "w", newline="") as f:
        csv.writer(f).writerows([("label", "sentence"), *rows])
    assert transfer_recipe.main(["--load_model", str(ckpt), "--train", str(train),
                                 "--num_samples", "2", "--dataset", "toy",
                                 "--experiment_dir", str(exp)]) == 0
    (run,) = _runs(exp, "transfer-toy")
    results = json.loads((exp / "default" / "transfer" / "toy" / "results.json").read_text())
    assert run.data.tags[CHECKPOINT_TAG] == str(ckpt)
    (pretrain_run,) = _runs(exp, "pretrain")
    assert run.data.tags["sentdisc.pretrain_run_id"] == pretrain_run.info.run_id
    assert run.info.run_name == "tiny/checkpoint_final" and run.info.status == "FINISHED"
    m = run.data.metrics
    for which in ("all_neurons", "top_neurons"):
        for split in ("train", "val"):
            assert m[f"{which}.{split}_acc"] == pytest.approx(results[which][f"{split}_acc"])
    assert m["all_neurons.C"] == results["all_neurons"]["C"]
    assert "all_neurons.test_acc" not in m  # no test set: no made-up number
    assert len(_history(exp, run.info.run_id, "sweep.val_acc")) == 2
    assert run.data.tags["sentdisc.top_neurons"] == ",".join(
        map(str, results["top_neurons"]["neurons"]))
    assert run.data.params["load_model"] == str(ckpt) and run.data.params["num_samples"] == "2"
    assert {"results.json", "classifier.json", "tune_results.csv", "neuron_weights.png",
            "neuron_histogram.png"} <= _artifacts(exp, run.info.run_id)


def test_a_rerun_continues_its_mlflow_run_without_logging_a_step_twice(tmp_path):
    out = OutputConfig(str(tmp_path / "exp"), "rerun")
    first = [{"iteration": i, "loss": 1.0 / i, "lr": 0.1, "node": "n1"} for i in (5, 10, 15)]
    with pretrain_tracker(None, out, resume=False, prior_rows=[]) as tracker:
        tracker.start({"train": {"lr": 0.1}})
        tracker.ready()
        tracker.log_rows(first)
    # the driver died; the rerun resumes checkpoint 10 and reports 15 again, then 20 and final
    with pretrain_tracker(None, out, resume=True, prior_rows=first) as tracker:
        tracker.start({"train": {"lr": 0.2}, "total_iters": 20})
        tracker.ready()
        tracker.log_rows([{"iteration": 15, "loss": 9.0}, {"iteration": 20, "loss": 0.05},
                          {"iteration": 20, "loss": 0.05, "val_bpb": 1.5, "final": True}])
    (run,) = _runs(out.experiment_dir, "pretrain")
    assert [s for s, _ in _history(out.experiment_dir, run.info.run_id, "loss")] == [5, 10, 15, 20]
    assert _history(out.experiment_dir, run.info.run_id, "val_bpb") == [(20, 1.5)]
    # params cannot change in MLflow: the first value stays, the change is a tag
    assert run.data.params == {"train.lr": "0.1", "total_iters": "20"}
    assert json.loads(run.data.tags["sentdisc.changed_on_resume"]) == {"train.lr": "0.2"}
    # a run that does not resume a checkpoint is a new MLflow run
    with pretrain_tracker(None, out, resume=False, prior_rows=[]) as tracker:
        tracker.start({})
    assert len(_runs(out.experiment_dir, "pretrain")) == 2


def test_only_rank_0_reports_and_each_metric_is_logged_once_per_step():
    assert reports(0) and not reports(1) and not reports(3)
    gate = StepGate()
    rows = [{"iteration": 5, "loss": 2.0, "node": "a", "final": False}, {"iteration": 10, "loss": 1.5},
            {"iteration": 10, "loss": 1.7, "resumed_from": 5},  # a worker group restarted
            {"iteration": 10, "loss": 1.5, "val_bpb": 2.2, "final": True}]
    assert gate.fresh(rows) == [(5, {"loss": 2.0}), (10, {"loss": 1.5}),
                                (10, {"resumed_from": 5.0}), (10, {"val_bpb": 2.2})]


def _rows(*steps) -> list[dict]:
    return [{"iteration": i, "loss": 1.0 / i} for i in steps]


def _driver(run_dir: str, prior: list, rows: list, killed: bool = False) -> TensorBoardCurves:
    """One driver's TensorBoard sink: opened with the history it found, fed ``rows``; a killed
    one never gets to close (its event files stay where it wrote them, flushed)."""
    sink = TensorBoardCurves(run_dir, prior)
    sink.load()
    sink.open()
    sink.start({"max_iters": 30})
    sink.rows(rows)
    if killed:
        sink.writer.close()  # only the file handle: close() would copy the files out
    else:
        sink.close("FINISHED")
    return sink


def test_a_rerun_writes_the_steps_a_killed_driver_never_received(tmp_path):
    run = str(tmp_path / "run")
    _driver(run, [], _rows(5, 10), killed=True)
    # its workers went on to checkpoint 15; the rerun resumes it: history.csv has 5 and 10,
    # the checkpoint's reports add 15, which no event file holds yet
    _driver(run, _rows(5, 10, 15), _rows(15, 20) + [{"iteration": 20, "val_bpb": 1.5}])
    steps = _scalars(tmp_path / "run" / "tensorboard")
    assert sorted(steps["loss"]) == [5, 10, 15, 20] and steps["val_bpb"] == [20]


def test_tensorboard_on_object_storage_rerun_and_no_temp_left(s3_bucket, tmp_path):
    run = f"s3://{s3_bucket}/run"
    first = _driver(run, [], _rows(5, 10))
    assert not Path(first.local).exists()  # its files went to the bucket, the copy is gone
    # a second driver is killed: its files, with 15, never reach the bucket
    killed = _driver(run, _rows(5, 10), _rows(15), killed=True)
    storage.remove_tree(killed.local)
    _driver(run, _rows(5, 10, 15, 20), _rows(20, 25))
    storage.copy_tree(storage.join(run, "tensorboard"), str(tmp_path / "tb"))
    assert sorted(_scalars(tmp_path / "tb")["loss"]) == [5, 10, 15, 20, 25]


def test_tracking_none_writes_nothing(tmp_path):
    classes = [ModelConfig, DataConfig, TrainConfig, OutputConfig, TrackingConfig]
    *_, out, cfg = parse(classes, ["--tracking", "none", "--experiment_dir", str(tmp_path)])
    yaml_file = tmp_path / "t.yaml"
    yaml_file.write_text("tracking:\n  tracking_uri: http://example:5000\n  tensorboard: true\n")
    _, _, on = parse([TransferConfig, OutputConfig, TrackingConfig], ["--config", str(yaml_file)])
    assert (on.tracking, on.tracking_uri, on.tensorboard) == ("mlflow", "http://example:5000", True)
    with pytest.raises(ValueError, match="tracking must be one of"):
        TrackingConfig(tracking="wandb")
    # MLflow's SQLite store is a local file: outputs on object storage keep runs in ./experiments
    notes = []
    uri, _ = store_for(TrackingConfig(), "s3://bucket/exp", log=notes.append)
    assert uri == f"sqlite:///{Path.cwd() / 'experiments'}/mlflow.db"
    store_for(TrackingConfig(), "s3://bucket/exp", log=notes.append)
    assert len(notes) == 1 and "s3://bucket/exp" in notes[0] and "--tracking_uri" in notes[0]
    assert store_for(on, "s3://bucket/exp") == ("http://example:5000", None)
    for tracker in (pretrain_tracker(cfg, out, resume=False, prior_rows=[]),
                    transfer_tracker(cfg, out, "toy", str(tmp_path / "ckpt"))):
        with tracker:
            tracker.start({"a": 1})
            tracker.ready()
            tracker.log_rows([{"iteration": 5, "loss": 1.0}])
            tracker.log_result({"acc": 1.0}, {}, {})
        assert not tracker.sinks
    assert list(tmp_path.iterdir()) == [yaml_file]


def test_mlflow_tracking_uri_in_the_environment_is_the_default_store(tmp_path, monkeypatch):
    env_store = f"sqlite:///{tmp_path / 'team'}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_store)
    out = OutputConfig(str(tmp_path / "exp"), "env")
    notes = []
    with pretrain_tracker(None, out, resume=False, prior_rows=[], log=notes.append) as tracker:
        tracker.start({"train": {"lr": 0.1}})
        tracker.ready()
        tracker.log_rows([{"iteration": 5, "loss": 1.0}])
    assert notes == [f"[tracking] MLflow store from $MLFLOW_TRACKING_URI: {env_store}"]
    from mlflow import MlflowClient

    client = MlflowClient(env_store)
    (run,) = client.search_runs([client.get_experiment_by_name("pretrain").experiment_id])
    assert run.info.run_name == "env" and run.data.metrics == {"loss": 1.0}
    assert not (tmp_path / "exp" / "mlflow.db").exists()
    # --tracking_uri still wins over the environment
    flag = TrackingConfig(tracking_uri="http://example:5000")
    assert store_for(flag, str(tmp_path / "exp")) == ("http://example:5000", None)


def test_an_unreachable_tracking_server_fails_the_job_at_once(tmp_path, capsys):
    from conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    _write_corpus(tmp_path / "corpus")
    t0 = time.time()
    code = pretrain_recipe.main(["--train", str(tmp_path / "corpus"), "--max_iters", "5",
                                 "--experiment_dir", str(tmp_path / "exp"),
                                 "--tracking_uri", uri])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert uri in err and "unreachable" in err and "--tracking none" in err
    assert time.time() - t0 < 15
