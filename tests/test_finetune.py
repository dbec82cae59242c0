"""Fine-tuning: the model and its batches (in process), then real Ray Train runs on the tiny
checkpoint: a killed worker resumed, every label kind, and the fine-tuned checkpoint served
and scored as it is."""
import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
import torch
from conftest import routed

from sentdisc import featurize, load
from sentdisc.classifier import Classifier
from sentdisc.finetune.data import EncodedSet, epoch_plan, rank_rows
from sentdisc.finetune.model import ClassifierLM, Objective, head_classifier
from sentdisc.recipes.finetune import main

TEXTS = ["good", "a much longer text about a movie &amp; more", "bad!", "d\u00e9j\u00e0 vu",
         "x" * 300, "fine"]


@pytest.mark.parametrize("kind", ["mean", "cell"])
def test_training_features_are_featurize_features(tiny_checkpoint, kind):
    """Left-padded rows with the state reset at each text's first byte: the features the head
    trains on are the ones featurize (and so serving) computes."""
    lm = load(tiny_checkpoint)
    model = ClassifierLM(lm, 3, kind).eval()
    x, reset, starts, _ = EncodedSet.of(TEXTS, np.zeros(len(TEXTS), np.int64)).batch(
        np.arange(len(TEXTS)))
    assert (x[:, -1] == ord(" ")).all() and reset.sum() == len(TEXTS)  # every text ends last
    with torch.no_grad():
        feats, _ = model.features(x, reset, starts)
    want = featurize(lm, TEXTS, kind=kind)
    np.testing.assert_allclose(feats.numpy(), want, atol=1e-5, rtol=0)
    clf = head_classifier(model.head, "multiclass", ["a", "b", "c"], kind)
    np.testing.assert_allclose(clf.decision_function(want),
                               model.head(torch.from_numpy(want)).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("label_kind, y", [("binary", [0, 1]), ("multiclass", [2, 0]),
                                           ("multilabel", [[1, 0, 1], [0, 0, 1]])])
def test_objective_trains_the_body_through_the_fused_kernel(tiny_checkpoint, label_kind, y):
    lm = load(tiny_checkpoint)
    model = ClassifierLM(lm, 1 if label_kind == "binary" else 3, "mean").train()
    x, reset, starts, _ = EncodedSet.of(TEXTS[:2], np.zeros(2, np.int64)).batch(np.arange(2))
    loss, parts = Objective(label_kind, lm_weight=0.5)(model, x, reset, starts, torch.tensor(y))
    loss.backward()
    assert loss.item() == pytest.approx(parts["class_loss"].item() + 0.5 * parts["lm_loss"].item())
    # the recurrent weights and the byte embedding get gradients (the whole LM is tuned)
    assert lm.layers[0].wh.grad.abs().sum() > 0 and lm.embed.weight.grad.abs().sum() > 0
    assert model.head.weight.grad.abs().sum() > 0


def test_epoch_plan_is_exact_batches_resumable_on_any_world_size():
    lengths = np.random.default_rng(0).integers(5, 500, 203)
    plan = epoch_plan(lengths, 16, epoch=0, seed=1)
    assert len(plan) == 203 // 16 and all(len(b) == 16 for b in plan)
    flat = np.concatenate(plan)
    assert len(set(flat.tolist())) == len(flat)  # no text twice in an epoch
    assert [b.tolist() for b in plan] == [b.tolist() for b in epoch_plan(lengths, 16, 0, 1)]
    assert set(flat.tolist()) != set(np.concatenate(epoch_plan(lengths, 16, 1, 1)).tolist())
    # within a batch, similar lengths (sorted within windows of batches)
    spread = np.mean([np.ptp(lengths[b]) for b in plan])
    assert spread < 0.5 * np.ptp(lengths)
    for world in (1, 2, 3):  # the ranks' shares make up the batch, whatever the world size
        parts = [rank_rows(plan[0], r, world) for r in range(world)]
        assert np.concatenate(parts).tolist() == plan[0].tolist()


# --- real Ray Train runs ---------------------------------------------------------------------

def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_finetune_binary_survives_a_killed_worker_then_serves_and_scores(
        ray_local, serve_port, tiny_checkpoint, shared_data, tmp_path, capsys):
    sst = shared_data / "sst2"
    exp = tmp_path / "exp"
    argv = ["--load_model", str(tiny_checkpoint), "--train", str(sst / "train.csv"),
            "--valid", str(sst / "val.csv"), "--test", str(sst / "test.csv"),
            "--text_key", "sentence", "--label_key", "label", "--max_train", "256",
            "--max_eval", "96", "--batch_size", "32", "--epochs", "2", "--eval_every", "4",
            "--log_interval", "2", "--num_workers", "2", "--fail_at_iter", "6",
            "--patience", "0", "--extremes", "1", "--experiment_dir", str(exp),
            "--experiment_name", "ft"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "[finetune] labels: binary" in printed and "[finetune] test: accuracy" in printed
    run = exp / "ft" / "finetune" / "sst2"
    assert (run / ".fail_at_iter_done").exists()  # a rank was SIGKILLed at iteration 6 ...
    history = _rows(run / "history.csv")
    iters = [int(r["iteration"]) for r in history if r["iteration"]]
    assert iters == sorted(iters) and iters[-1] == 16  # ... and the run resumed to the end
    assert {int(r["resumed_from"]) for r in history} >= {0, 4}
    scored = [r for r in history if r.get("val_score")]
    assert [int(r["iteration"]) for r in scored] == [4, 8, 12, 16]
    assert all(float(r["param_checksum_spread"]) == 0 for r in history if r["param_checksum_spread"])
    res = json.loads((run / "results.json").read_text())
    assert res["label_kind"] == "binary" and res["iterations"] == 16
    test = res["metrics"]["test"]
    assert test["n"] == 96 and 0.3 <= test["accuracy"] <= 1
    best = max(float(r["val_score"]) for r in scored)
    assert res["best"]["val_score"] == pytest.approx(best)
    # checkpoint_final is the best validation's, and what it holds scores as reported
    final = run / "checkpoint_final"
    clf = Classifier.load(final)
    assert Path(clf.checkpoint) == final.resolve() and clf.C is None and not clf.has_top
    state = json.loads((final / "train_state.json").read_text())
    assert state["iteration"] == res["best"]["iteration"]
    model = load(final)
    from sentdisc.labeled import LabeledDataConfig, prepare_data
    data = prepare_data(LabeledDataConfig(train=str(sst / "train.csv"), valid=str(sst / "val.csv"),
                                          test=str(sst / "test.csv"), max_train=256, max_eval=96))
    feats = featurize(model, data["test"].texts, kind="mean")
    assert (clf.predict(feats) == data["test"].labels).mean() == pytest.approx(test["accuracy"])
    for name in ("loss.png", "neuron_weights.png", "extremes.html", "classifier.json"):
        assert (run / name).exists(), name

    # served as it is: the classifier comes from the checkpoint
    from ray import serve

    from sentdisc.serving import make_app

    serve.run(make_app({"checkpoint": str(final)}), name="finetuned", route_prefix="/ft")
    try:
        url = routed(f"http://127.0.0.1:{serve_port}/ft")
        texts = data["test"].texts[:4]
        got = requests.post(url + "/classify", json={"texts": texts}, timeout=60).json()
        want = clf.label_proba(feats[:4])
        for r, p in zip(got["results"], want):
            np.testing.assert_allclose(list(r["probabilities"].values()), p, atol=1e-5)
        sent = requests.post(url + "/sentiment", json={"texts": texts}, timeout=60)
        assert sent.status_code == 200
        assert [r["label"] for r in sent.json()["results"]] == clf.predict_labels(feats[:4])
    finally:
        serve.delete("finetuned")

    # and scored as it is: --load_model alone
    from sentdisc.recipes.score import main as score_main

    corpus = tmp_path / "corpus.json"
    corpus.write_text("".join(json.dumps({"reviewText": t}) + "\n" for t in texts))
    assert score_main(["--load_model", str(final), "--data", str(corpus),
                       "--output", str(tmp_path / "scored"), "--replicas", "1"]) == 0
    table = pq.read_table(tmp_path / "scored").to_pylist()
    assert sorted(table[0]) == sorted(["file", "line", "label", "prob", "neuron_value", "capped"])
    np.testing.assert_allclose(sorted(r["prob"] for r in table),
                               sorted(clf.predict_proba(feats[:4])), atol=1e-5)


def test_finetune_multiclass_with_lm_loss(ray_local, tiny_checkpoint, shared_data, tmp_path,
                                         capsys):
    amz = shared_data / "amazon_blitzer"
    assert main(["--load_model", str(tiny_checkpoint), "--train", str(amz / "train.csv"),
                 "--valid", str(amz / "val.csv"), "--test", str(amz / "test.csv"),
                 "--text_key", "text", "--label_key", "category", "--max_train", "128",
                 "--max_eval", "64", "--batch_size", "16", "--max_iters", "8", "--lm_weight",
                 "0.5", "--head_lr", "0.01", "--feature_kind", "cell", "--extremes", "0",
                 "--experiment_dir", str(tmp_path / "exp")]) == 0
    run = tmp_path / "exp" / "default" / "finetune" / "amazon_blitzer"
    res = json.loads((run / "results.json").read_text())
    assert res["label_kind"] == "multiclass" and res["labels"] == [
        "books", "dvd", "electronics", "kitchen"]
    assert res["best"]["metric"] == "macro_f1" and res["feature_kind"] == "cell"
    assert np.array(res["metrics"]["test"]["confusion"]).shape == (4, 4)
    assert (run / "confusion.png").exists()
    history = _rows(run / "history.csv")
    assert any(r.get("lm_bpb") for r in history) and any(r.get("class_loss") for r in history)
    clf = Classifier.load(run / "checkpoint_final")
    assert clf.label_kind == "multiclass" and np.atleast_2d(clf.coef).shape == (4, 32)
    # the same experiment rerun with another head, or resumed from a pretraining checkpoint:
    # one line each, before any work (its head could not continue that run)
    argv = ["--load_model", str(tiny_checkpoint), "--train", str(amz / "train.csv"),
            "--text_key", "text", "--label_key", "category", "--max_train", "128",
            "--experiment_dir", str(tmp_path / "exp")]
    capsys.readouterr()
    assert main(argv + ["--feature_kind", "mean"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"finetune: error: {run}/checkpoint_") and err.endswith(
        "continues a run of other inputs: --feature_kind cell (this command: mean). Give this "
        "run its own --experiment_name (or --dataset), or the same inputs to continue that "
        "one"), err
    assert main(argv + ["--resume", str(tiny_checkpoint), "--experiment_name", "other"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"finetune: error: --resume {tiny_checkpoint} is not a fine-tuning checkpoint (it has "
        "no classifier.json): to fine-tune from it, pass it as --load_model")


def test_a_validation_score_that_stops_improving_stops_the_run(ray_local, tiny_checkpoint,
                                                               shared_data, tmp_path, capsys):
    # an lr too small to move a float32 weight: every validation (one per epoch of 4 batches)
    # scores as the first did, and a score no better than the best is a step towards stopping
    sst = shared_data / "sst2"
    assert main(["--load_model", str(tiny_checkpoint), "--train", str(sst / "train.csv"),
                 "--valid", str(sst / "val.csv"), "--test", str(sst / "test.csv"),
                 "--text_key", "sentence", "--label_key", "label", "--max_train", "64",
                 "--max_eval", "32", "--batch_size", "16", "--lr", "1e-20", "--patience", "2",
                 "--max_iters", "20", "--extremes", "0",
                 "--experiment_dir", str(tmp_path / "exp")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("[finetune] ")]
    run = tmp_path / "exp" / "default" / "finetune" / "sst2"
    res = json.loads((run / "results.json").read_text())
    assert res["stopped_early"] and res["iterations"] == 12, res
    assert res["shown_split"] == "test" and (run / "classifier.json").exists()
    # of equal scores the later is kept, as Ray Train keeps the later of equal checkpoints
    assert res["best"]["iteration"] == 12
    assert json.loads((run / "checkpoint_final" / "train_state.json").read_text())[
        "iteration"] == 12
    # each validation is the epoch's it closes (0-based, as the rows during it)
    validations = [line for line in lines if "| val accuracy" in line]
    assert [line.split(" | ")[:2] for line in validations] == [
        ["[finetune] epoch 0", "iter 4/20 (20%)"], ["[finetune] epoch 1", "iter 8/20 (40%)"],
        ["[finetune] epoch 2", "iter 12/20 (60%)"]], lines
    # the validation that decided it, then the decision, then the final line: nothing left
    stop = next(i for i, line in enumerate(lines) if "early stop" in line)
    assert lines[stop] == ("[finetune] early stop at iteration 12: no better validation "
                           f"accuracy for 2 validations (best {res['best']['val_score']:.4f} at "
                           "iteration 12)"), lines
    assert lines[stop - 1] == validations[-1] and "ETA 0m00s" in lines[stop - 1], lines
    assert lines[stop + 1].startswith("[finetune] epoch 2 | iter 12/20 (60%)"), lines
    assert "ETA 0m00s" in lines[stop + 1] and "(stopped early)" in lines[stop + 1], lines


def test_more_workers_than_the_cluster_holds_is_one_line_naming_the_workers(
        ray_local, tiny_checkpoint, shared_data, tmp_path, capsys):
    # fine-tuning reads its labeled set on the driver, not through Ray Data: the workers alone
    # cannot all start (the session's Ray has 4 CPUs)
    sst = shared_data / "sst2"
    assert main(["--load_model", str(tiny_checkpoint), "--train", str(sst / "train.csv"),
                 "--text_key", "sentence", "--label_key", "label", "--num_workers", "8",
                 "--experiment_dir", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [
        "finetune: error: the run needs 8 CPUs: 8 workers x 1 CPU, but the cluster has 4 CPUs "
        "(1 node, no autoscaler), so the workers could never all start. Use --num_workers 4, "
        "or --cpus_per_worker 0.5, or add a node (ray start --address=HEAD:6379)"], err
    assert not (tmp_path / "exp").exists()


def test_dataset_is_a_plain_folder_name_under_the_experiment(tiny_checkpoint, tmp_path, capsys):
    train = tmp_path / "data" / "train.csv"
    train.parent.mkdir()
    train.write_text("label,sentence\n" + "".join(f"{i % 2},text {i}\n" for i in range(20)))
    assert main(["--load_model", str(tiny_checkpoint), "--train", str(train), "--dataset",
                 "../../escaped", "--experiment_dir", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "finetune: error: --dataset must be a plain folder name, got '../../escaped'"
    assert not (tmp_path / "exp").exists()
