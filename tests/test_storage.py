"""Every job's inputs and outputs on any storage: a local folder, file:// and s3:// (a real S3 API,
moto's server, on 127.0.0.1). The walk on the bucket: gzipped shards -> pretrain (checkpoints,
history.csv, loss.png written there) -> resume from its checkpoint -> transfer reading the
checkpoint and writing classifier.json there -> Serve loading both from there; on file://,
transfer reading a checkpoint and writing its outputs there."""
import gzip
import json
import random
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import requests
from conftest import free_port, new_bucket, routed

from sentdisc import storage
from sentdisc.checkpoint import load
from sentdisc.config import OutputConfig
from sentdisc.data.readers import DataConfig
from sentdisc.model import ModelConfig
from sentdisc.recipes import transfer as transfer_recipe
from sentdisc.report import read_history
from sentdisc.train import TrainConfig, pretrain

WORDS = "good bad great awful movie plot acting boring fun love hate the was and not".split()
POSITIVE, NEGATIVE = ["great", "wonderful", "loved it"], ["awful", "terrible", "boring"]


def _shard(rng, n: int) -> bytes:
    lines = [json.dumps({"reviewText": "This " + " ".join(rng.choice(WORDS) for _ in range(
        rng.randint(5, 25))) + ".", "overall": 5}) for _ in range(n)]
    return gzip.compress(("\n".join(lines) + "\n").encode())


def _labeled(rng, n: int) -> str:
    rows = ["label,sentence"]
    for i in range(n):
        words = rng.choice(POSITIVE if i % 2 else NEGATIVE)
        rows.append(f'{i % 2},"the film was {words}, number {i}"')
    return "\n".join(rows) + "\n"


# Plain local folders are what test_train.py, test_transfer.py and test_serve.py use: here the
# same paths run through a real S3 API, and transfer through a file:// URI (a Train run costs
# ~30 s, so pretraining, resume and Serve run on the bucket only).
@pytest.fixture(scope="module", params=["file", "s3"])
def root(request, tmp_path_factory):
    """The base URI of one storage kind, holding shards/ (gzipped loose JSON) and sst/."""
    kind = request.param
    if kind == "s3":
        base = f"s3://{new_bucket()}"
    else:
        folder = tmp_path_factory.mktemp(f"store-{kind}")
        base = f"file://{folder}"
    rng = random.Random(0)
    for s in range(2):
        storage.write_bytes(storage.join(base, "shards", f"part-{s}.json.gz"), _shard(rng, 150))
    for split, n in (("train", 40), ("val", 20), ("test", 20)):
        storage.write_text(storage.join(base, "sst", f"{split}.csv"), _labeled(rng, n))
    return base


@pytest.fixture(scope="module")
def trained(ray_local, root, tiny_checkpoint):
    """A pretraining run on the bucket; on file://, the tiny checkpoint copied there."""
    if not root.startswith("s3://"):
        checkpoint = storage.join(root, "exp", "run", "checkpoint_final")
        for f in tiny_checkpoint.iterdir():
            storage.write_bytes(storage.join(checkpoint, f.name), f.read_bytes())
        return {"checkpoint": checkpoint}
    cfgs = (ModelConfig(embed_size=8, rnn_size=32),
            DataConfig(train=storage.join(root, "shards"), split="90,10,0"),
            TrainConfig(batch_size=4, seq_length=32, lr=3e-3, max_iters=8, log_interval=4,
                        save_iters=4, num_workers=1, keep_checkpoints=2, max_failures=0),
            OutputConfig(storage.join(root, "exp"), "run"))
    return pretrain(*cfgs, progress=False)


def _remote_only(root):
    if not root.startswith("s3://"):
        pytest.skip("local checkpoints: pretrained and resumed in test_train.py, served in "
                    "test_serve.py")


def test_pretrain_writes_checkpoints_history_and_plot_to_the_storage(root, trained):
    _remote_only(root)
    run = storage.join(root, "exp", "run")
    names = storage.list_dir(run)
    assert {"checkpoint_final", "history.csv", "loss.png", "summary.json",
            "run_config.json"} <= set(names), names
    assert any(n.startswith("checkpoint_0") for n in names), names
    assert trained["checkpoint"] == storage.join(run, "checkpoint_final")
    assert storage.read_bytes(storage.join(run, "loss.png"))[:8] == b"\x89PNG\r\n\x1a\n"
    history = read_history(storage.join(run, "history.csv"))
    assert [r["iteration"] for r in history if not r.get("final")] == [4, 8]
    assert history[-1]["records"] > 0 and history[-1]["skipped_total"] == 0
    assert load(trained["checkpoint"]).config.rnn_size == 32


def test_resume_from_a_checkpoint_on_the_storage(root, trained):
    _remote_only(root)
    source = storage.join(root, "exp", "run", "checkpoint_00000004")
    assert storage.is_dir(source), storage.list_dir(storage.join(root, "exp", "run"))
    summary = pretrain(ModelConfig(embed_size=8, rnn_size=32),
                       DataConfig(train=storage.join(root, "shards"), split="90,10,0"),
                       TrainConfig(batch_size=4, seq_length=32, lr=3e-3, max_iters=8,
                                   log_interval=4, save_iters=4, num_workers=1,
                                   resume=source, max_failures=0),
                       OutputConfig(storage.join(root, "exp"), "resumed"), progress=False)
    rows = [r for r in summary["rows"] if not r.get("final")]
    assert [r["iteration"] for r in rows] == [8] and rows[0]["resumed_from"] == 4


@pytest.fixture(scope="module")
def transferred(ray_local, root, trained):
    sst = storage.join(root, "sst")
    code = transfer_recipe.main([
        "--load_model", trained["checkpoint"], "--train", storage.join(sst, "train.csv"),
        "--valid", storage.join(sst, "val.csv"), "--test", storage.join(sst, "test.csv"),
        "--feature_kind", "mean", "--num_samples", "3", "--experiment_dir",
        storage.join(root, "exp"), "--experiment_name", "run"])
    assert code == 0
    return storage.join(root, "exp", "run", "transfer", "sst")


def test_transfer_reads_the_checkpoint_and_writes_its_outputs_there(transferred, trained):
    names = set(storage.list_dir(transferred))
    assert {"classifier.json", "results.json", "tune_results.csv", "neuron_weights.png",
            "neuron_histogram.png"} <= names, names
    clf = storage.read_json(storage.join(transferred, "classifier.json"))
    assert clf["checkpoint"] == trained["checkpoint"] and clf["rnn_size"] == 32



def test_serve_loads_checkpoint_and_classifier_from_the_storage(serve_port, root, trained,
                                                                transferred):
    from ray import serve

    _remote_only(root)
    from sentdisc.serving import build_app

    port = serve_port
    serve.run(build_app({"checkpoint": trained["checkpoint"],
                         "classifier": storage.join(transferred, "classifier.json")}),
              name="storage-test", route_prefix="/")
    try:
        r = requests.post(routed(f"http://127.0.0.1:{port}") + "/sentiment",
                          json={"texts": ["I loved it", "a waste of time"]}, timeout=60)
        assert r.status_code == 200, r.text
        assert len(r.json()["results"]) == 2
    finally:
        serve.delete("storage-test")


# --- bad storage input: one line naming the URI, before any worker, within seconds -----------

def _pretrain_error(train: str, exp: str) -> str:
    from sentdisc.recipes import pretrain as recipe

    return recipe.main(["--train", train, "--experiment_dir", exp, "--rnn_size", "16",
                        "--max_iters", "2"])


def test_a_bucket_that_does_not_exist(ray_local, s3_bucket, capsys, tmp_path):
    t0 = time.time()
    assert _pretrain_error("s3://no-such-bucket-x/shards/", str(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert "s3://no-such-bucket-x/shards/" in err and "does not exist" in err
    assert len(err.splitlines()) == 1 and time.time() - t0 < 20
    assert _pretrain_error(str(tmp_path), "s3://no-such-bucket-y/exp") == 2
    err = capsys.readouterr().err.strip()
    assert "--experiment_dir s3://no-such-bucket-y/exp" in err and "does not exist" in err


def test_missing_credentials(ray_local, s3_bucket, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    assert _pretrain_error(f"s3://{s3_bucket}/shards/", str(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert f"s3://{s3_bucket}/shards/" in err and "no AWS credentials" in err
    assert len(err.splitlines()) == 1


def test_an_unreachable_endpoint(ray_local, s3_bucket, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    storage._s3.cache_clear()
    try:
        t0 = time.time()
        assert _pretrain_error(f"s3://{s3_bucket}/shards/", str(tmp_path)) == 2
        err = capsys.readouterr().err.strip()
        assert f"s3://{s3_bucket}/shards/" in err and "cannot reach" in err
        assert len(err.splitlines()) == 1 and time.time() - t0 < 20
    finally:
        monkeypatch.undo()
        storage._s3.cache_clear()


def test_writes_are_atomic_and_whole(s3_bucket, tmp_path):
    for base in (str(tmp_path), f"s3://{s3_bucket}"):
        uri = storage.join(base, "sub", "f.json")
        storage.write_json(uri, {"a": 1})
        storage.write_json(uri, {"a": 2})
        assert storage.read_json(uri) == {"a": 2}
    # no temporary file is left beside a local one
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["f.json"]
    fs = pafs.S3FileSystem(endpoint_override=storage.s3_endpoint(), scheme="http")
    assert [i.base_name for i in fs.get_file_info(
        pafs.FileSelector(f"{s3_bucket}/sub"))] == ["f.json"]


def test_a_failed_local_write_leaves_no_temp_file_and_the_temp_name_is_hidden(tmp_path):
    (tmp_path / "d").mkdir()  # the rename onto a folder fails after the temp file is written
    with pytest.raises(storage.StorageError, match=r"/d: .*Is a directory"):
        storage.write_bytes(str(tmp_path / "d"), b"data")
    assert [p.name for p in tmp_path.iterdir()] == ["d"] and not any((tmp_path / "d").iterdir())
    # while a write is under way its temp file is bookkeeping to a listing, not a data file
    tmp = Path(storage.temp_beside(tmp_path / "f.json"))
    assert tmp.parent == tmp_path and tmp.name.startswith(".f.json.tmp-")
    tmp.write_bytes(b"{half")
    storage.write_bytes(str(tmp_path / "g.json"), b"{}")
    assert storage.list_files(str(tmp_path)) == [(str(tmp_path / "g.json"), 2)]


def test_a_key_keeps_its_hash_and_question_mark(s3_bucket, tmp_path):
    """S3 and GCS keys may hold '#' and '?': a run named run#1 writes its own objects, not
    ones cut short at the '#' (every output of the run on one object)."""
    for base in (f"s3://{s3_bucket}", f"file://{tmp_path}"):
        uri = storage.join(base, "run#1", "a?b.json")
        storage.write_json(uri, {"run": 1})
        storage.write_json(storage.join(base, "run#1", "c.json"), {"run": 1, "c": True})
        assert storage.read_json(uri) == {"run": 1}
        assert [u for u, _ in storage.list_files(base)] == [uri, storage.join(base, "run#1", "c.json")]
    fs = pafs.S3FileSystem(endpoint_override=storage.s3_endpoint(), scheme="http")
    keys = [i.path for i in fs.get_file_info(pafs.FileSelector(s3_bucket, recursive=True))
            if i.type == pafs.FileType.File]
    assert sorted(keys) == [f"{s3_bucket}/run#1/a?b.json", f"{s3_bucket}/run#1/c.json"]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == \
        ["run#1/a?b.json", "run#1/c.json"]
