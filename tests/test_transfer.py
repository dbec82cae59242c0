"""Transfer: labels, featurization (in-process vs Ray Data), the Tune sweep, the classifier."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from sentdisc.classifier import Classifier, ClassifierError
from sentdisc.features_ray import featurize_ray, featurize_texts
from sentdisc.labeled import load_labeled, prepare_data
from sentdisc.recipes.transfer import main
from sentdisc.sweep import SweepConfig, c_grid, choose_C, fit_l1, fit_multinomial_l1, train_classifier
from sentdisc.transfer import TransferConfig, TransferError, write_outputs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_csv(path: Path, rows, header=("label", "sentence")) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- the search and the classifier, on synthetic features ------------------------------------

def _synthetic(n, dim, neuron, sign, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, dim)).astype(np.float32)
    y = (sign * X[:, neuron] + 0.3 * rng.normal(size=n) > 0).astype(np.int64)
    return X, y


@pytest.mark.parametrize("neuron,sign", [(17, 1), (5, -1)])
def test_top_neuron_is_the_dimension_that_carries_the_label(neuron, sign):
    Xtr, ytr = _synthetic(600, 40, neuron, sign, 0)
    Xva, yva = _synthetic(200, 40, neuron, sign, 1)
    Xte, yte = _synthetic(200, 40, neuron, sign, 2)
    clf, res = train_classifier(Xtr, ytr, Xva, yva, Xte, yte,
                                SweepConfig(num_neurons=3, backend="local"))
    assert clf.neuron == neuron and clf.sign == sign
    assert clf.neurons[0] == neuron and len(clf.neurons) == 3
    assert res["all_neurons"]["test_acc"] > 0.85 and res["top_neurons"]["test_acc"] > 0.85
    # Neurons ordered by |weight|; the chosen C is the best on validation (smaller on ties).
    w = np.abs(clf.coef[clf.neurons])
    assert list(w) == sorted(w, reverse=True)
    best = max(r["val_acc"] for r in res["sweep"])
    assert res["all_neurons"]["C"] == min(r["C"] for r in res["sweep"] if r["val_acc"] == best)
    # The numpy classifier reproduces sklearn's refit exactly.
    model, _ = fit_l1(Xtr, ytr, clf.C)
    np.testing.assert_allclose(clf.predict_proba(Xte), model.predict_proba(Xte)[:, 1], atol=1e-9)
    assert (clf.predict(Xte) == model.predict(Xte)).all()
    top, _ = fit_l1(Xtr[:, clf.neurons], ytr, clf.top_C)
    np.testing.assert_allclose(clf.predict_proba_top(Xte),
                               top.predict_proba(Xte[:, clf.neurons])[:, 1], atol=1e-9)


def test_classifier_json_roundtrip_and_bad_files(tmp_path):
    Xtr, ytr = _synthetic(300, 12, 3, 1, 0)
    clf, _ = train_classifier(Xtr, ytr, Xtr, ytr, sweep=SweepConfig(num_neurons=2, backend="local"),
                              feature_kind="mean", layer=0, checkpoint="/ckpt")
    path = clf.save(tmp_path / "classifier.json")
    raw = json.loads(path.read_text())
    assert raw["neurons"] == clf.neurons and raw["top"]["C"] == clf.top_C
    assert raw["feature_kind"] == "mean" and raw["layer"] == 0 and raw["rnn_size"] == 12
    back = Classifier.load(path)
    assert (back.neuron, back.sign, back.feature_kind, back.layer, back.C) == (
        clf.neuron, clf.sign, "mean", 0, clf.C)
    np.testing.assert_allclose(back.predict_proba(Xtr), clf.predict_proba(Xtr))
    np.testing.assert_allclose(back.predict_proba_top(Xtr), clf.predict_proba_top(Xtr))
    with pytest.raises(ClassifierError, match=r"\[N, 12\]"):
        back.predict_proba(np.zeros((2, 7)))
    diverged = Xtr[:3].copy()
    diverged[1, 4] = np.nan
    for answer in (back.predict_proba, back.predict, back.predict_labels):
        with pytest.raises(ValueError, match=r"1 of 3 text\(s\) are not finite \(rows \[1\]"):
            answer(diverged)
    with pytest.raises(ClassifierError, match="does not exist"):
        Classifier.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ClassifierError, match="not valid JSON"):
        Classifier.load(tmp_path / "bad.json")
    del raw["top"]["intercept"]
    (tmp_path / "partial.json").write_text(json.dumps(raw))
    with pytest.raises(ClassifierError, match="top.'intercept'"):
        Classifier.load(tmp_path / "partial.json")


def test_c_grid_and_tie_break():
    grid = c_grid()
    assert grid == [2.0 ** e for e in range(-8, 2)]
    sampled = c_grid(num_samples=5, seed=3)
    assert len(sampled) == 5 and all(2 ** -8 <= c <= 2 for c in sampled)
    assert sampled == c_grid(num_samples=5, seed=3) != c_grid(num_samples=5, seed=4)
    rows = [{"C": 1.0, "val_acc": 0.8}, {"C": 0.25, "val_acc": 0.8}, {"C": 0.5, "val_acc": 0.7}]
    assert choose_C(rows)["C"] == 0.25


# --- labeled data --------------------------------------------------------------------------

def test_labels_binarize_drop_and_clear_errors(tmp_path):
    stars = _write_csv(tmp_path / "amz" / "train.csv", [[s, f"review {i} with {s} stars"]
                                                        for i, s in enumerate([1, 2, 3, 4, 5] * 4)])
    cfg = TransferConfig(train=stars, label_kind="binary")
    with pytest.raises(TransferError,
                       match=r"train.csv.*binary 0/1.*\[1, 2, 3, 4, 5\].*--binarize_sent"):
        load_labeled(stars, cfg, "train")
    data, spec = load_labeled(stars, TransferConfig(binarize_sent=True), "train")
    assert spec.midpoint == 3.0 and len(data) == 16 and data.dropped == {"middle_rating": 4}
    assert data.labels.tolist() == [0, 0, 1, 1] * 4
    assert data.texts[2] == "review 3 with 4 stars"

    holes = _write_csv(tmp_path / "holes.csv", [[1, "good"], ["", "no label"], [0, "bad"]])
    with pytest.raises(TransferError,
                       match=r"holes.csv: 1 of 3 rows have no 'label'.*--drop_unlabeled"):
        load_labeled(holes, cfg, "train")
    data, _ = load_labeled(holes, TransferConfig(drop_unlabeled=True), "train")
    assert data.texts == ["good", "bad"] and data.labels.tolist() == [1, 0]
    assert data.dropped == {"unlabeled": 1}

    # two named classes are binary, in sorted order (the second is the "positive" one)
    words = _write_csv(tmp_path / "words.csv", [["pos", "good"], ["neg", "bad"]])
    data, spec = load_labeled(words, cfg, "train")
    assert (spec.kind, spec.labels, data.labels.tolist()) == ("binary", ("neg", "pos"), [1, 0])
    with pytest.raises(TransferError, match=r"columns: label, sentence"):
        load_labeled(stars, TransferConfig(text_key="reviewText"), "train")
    with pytest.raises(TransferError, match=r"train file .*missing.csv does not exist"):
        load_labeled(str(tmp_path / "missing.csv"), cfg, "train")
    unlabeled_test = _write_csv(tmp_path / "test.csv", [["some text"]], header=("sentence",))
    with pytest.raises(TransferError, match=r"no column 'label'.*--no_test_eval"):
        prepare_data(TransferConfig(train=_write_csv(tmp_path / "ok.csv", [[0, "a"], [1, "b"]] * 5),
                                    test=unlabeled_test))


def test_bad_input_through_the_command_exits_cleanly(tiny_checkpoint, tmp_path, capsys):
    code = main(["--load_model", str(tiny_checkpoint), "--train", str(tmp_path / "nope.csv")])
    assert code == 2
    err = capsys.readouterr().err
    assert "error: train file" in err and "nope.csv does not exist" in err
    assert "Traceback" not in err
    assert main(["--load_model", str(tmp_path / "no_ckpt"), "--train", "x.csv"]) == 2
    assert "checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, says", [
    ("--batch_size", "0", "batch_size must be >= 1, got 0"),
    ("--chunk_size", "0", "chunk_size must be >= 1, got 0"),
    ("--cpus_per_trial", "0", "cpus_per_trial must be > 0, got 0.0"),
    ("--cpus_per_trial", "-1", "cpus_per_trial must be > 0, got -1.0"),
])
def test_sizes_that_cannot_work_are_refused_with_the_flags(tmp_path, capsys, flag, value, says):
    """They were taken, then failed late (a ZeroDivisionError featurizing on Ray Data)."""
    with pytest.raises(SystemExit) as e:
        main(["--train", str(tmp_path / "t.csv"), flag, value])
    assert e.value.code == 2 and f"error: {says}" in capsys.readouterr().err


@pytest.mark.parametrize("dataset", ["../../escaped", "<tmp_path>/escaped", "a/b", "..", "."])
def test_dataset_is_a_plain_folder_name_under_the_experiment(tiny_checkpoint, tmp_path, capsys,
                                                              dataset):
    dataset = dataset.replace("<tmp_path>", str(tmp_path))  # had it escaped, it stays in here
    train = _write_csv(tmp_path / "data" / "train.csv", [[i % 2, f"text {i}"] for i in range(20)])
    code = main(["--load_model", str(tiny_checkpoint), "--train", train, "--dataset", dataset,
                 "--experiment_dir", str(tmp_path / "exp")])
    out = capsys.readouterr()
    assert code == 2 and "Traceback" not in out.err
    assert f"transfer: error: --dataset must be a plain folder name, got {dataset!r}" in out.err
    assert "transforming" not in out.out
    assert not (tmp_path / "exp").exists() and not (tmp_path / "escaped").exists()


def test_classifier_json_is_written_before_the_outputs_that_may_still_fail(tmp_path):
    """The fit is what took long: a failure drawing the outputs after it keeps it."""
    from sentdisc.labeled import LabeledSet
    from sentdisc.storage import StorageError

    X, y = _synthetic(200, 12, 3, 1, 0)
    clf, _ = train_classifier(X, y, X, y, sweep=SweepConfig(Cs=[0.5], backend="local"))
    sets = {role: LabeledSet([f"text {i}" for i in range(200)], y, role) for role in ("train",
                                                                                     "val")}
    (tmp_path / "a_file").write_text("")
    cfg = TransferConfig(write_results=str(tmp_path / "a_file" / "results.csv"))
    with pytest.raises(StorageError, match="a_file/results.csv"):  # a one-line error, exit 2
        write_outputs(str(tmp_path / "out"), cfg, {**sets, "test": None},
                      {"train": X, "val": X, "test": None}, {"train": y, "val": y, "test": None},
                      clf, None, {}, clf.neuron_boundary(), log=lambda *_: None)
    assert Classifier.load(tmp_path / "out" / "classifier.json").neurons == clf.neurons


# --- featurization at scale ------------------------------------------------------------------

def test_ray_data_featurization_equals_in_process(ray_local, tiny_checkpoint):
    from sentdisc.checkpoint import load
    from sentdisc.features import featurize

    rng = np.random.default_rng(0)
    texts = ["", "ok", "déjà vu — naïve café", "a &amp; b\nc"] + [
        "x" * int(n) + " the movie was fine" for n in rng.integers(0, 300, 37)]
    model = load(tiny_checkpoint)
    # "mean" pools over each text's own bytes: padding or reordering mistakes would show.
    local = featurize(model, texts, batch_size=8, kind="mean")
    seen = []
    distributed = featurize_ray(texts, str(tiny_checkpoint), kind="mean", batch_size=8,
                                replicas=2, progress=lambda d, n: seen.append((d, n)))
    np.testing.assert_allclose(distributed, local, atol=1e-5, rtol=0)
    assert seen[-1] == (len(texts), len(texts))
    assert not np.allclose(local[1], local[2])  # distinct texts, distinct features


def test_featurize_routes_by_size(tiny_checkpoint):
    from sentdisc.checkpoint import load

    feats, stats = featurize_texts(["good", "bad"], load(tiny_checkpoint), str(tiny_checkpoint),
                                   name="t", ray_threshold=-1, log=lambda *_: None)
    assert stats["backend"] == "in_process" and feats.shape == (2, 32)
    # (sets at or above the threshold take the Ray Data path: see the command test below)


# --- the whole command -----------------------------------------------------------------------

def test_transfer_command_on_sst2(ray_local, tiny_checkpoint, shared_data, tmp_path, capsys):
    sst = shared_data / "sst2"
    results_csv = tmp_path / "per_sample.csv"
    main(["--load_model", str(tiny_checkpoint), "--train", str(sst / "train.csv"),
          "--valid", str(sst / "val.csv"), "--test", str(sst / "test.csv"),
          "--text_key", "sentence", "--label_key", "label", "--feature_kind", "mean",
          "--max_train", "300", "--max_eval", "100", "--num_neurons", "2",
          "--ray_featurize_threshold", "300",  # train on the Ray Data pool, val/test in-process
          "--experiment_dir", str(tmp_path / "exp"), "--experiment_name", "run",
          "--write_results", str(results_csv)])
    printed = capsys.readouterr().out
    assert "train, val, test accuracy for all neuron regression" in printed
    assert "train, val, test accuracy for 2 neuron regression" in printed
    assert "regularization coefficient used" in printed
    # the job's lines on the terminal; Ray Tune's own output (printed even at verbose=0) in
    # a log file beside its trial folders
    assert "Configuration for experiment" not in printed and "View detailed" not in printed
    tune_log = (tmp_path / "exp" / "run" / "transfer" / "sst2" / "tune_runs" /
                "sweep_all_neurons.log").read_text()
    assert "Configuration for experiment" in tune_log and "View detailed results" in tune_log

    out = tmp_path / "exp" / "run" / "transfer" / "sst2"  # dataset named after train's folder
    res = json.loads((out / "results.json").read_text())
    assert res["sizes"] == {"train": 300, "val": 100, "test": 100}
    assert res["dataset"] == "sst2" and res["rnn_size"] == 32 and res["val_source"] == "file"
    a, t = res["all_neurons"], res["top_neurons"]
    for acc in (a["train_acc"], a["val_acc"], a["test_acc"], t["train_acc"], t["val_acc"],
                t["test_acc"]):
        assert 0.3 <= acc <= 1.0
    assert 0 <= a["nnz"] <= 32 and len(t["neurons"]) == 2
    assert (res["featurize"]["train"]["texts"] == 300
            and res["featurize"]["train"]["bytes_per_s"] > 0)
    assert res["featurize"]["train"]["backend"] == "ray_data"
    assert res["featurize"]["test"]["backend"] == "in_process"

    # One Tune trial per C; the chosen C is the best on validation (smallest on ties).
    tune_rows = _read_csv(out / "tune_results.csv")
    assert sorted(float(r["C"]) for r in tune_rows) == c_grid()
    assert len({r["trial_id"] for r in tune_rows}) == 10 and all(r["trial_id"] for r in tune_rows)
    best = max(float(r["val_acc"]) for r in tune_rows)
    expected_C = min(float(r["C"]) for r in tune_rows if float(r["val_acc"]) == best)
    assert a["C"] == expected_C and a["val_acc"] == best
    assert [float(r["C"]) for r in tune_rows if r["chosen"] == "1"] == [expected_C]

    clf = Classifier.load(out / "classifier.json")
    assert clf.C == a["C"] and clf.neurons == t["neurons"] and clf.feature_kind == "mean"
    assert clf.sign == (1 if clf.coef[clf.neuron] >= 0 else -1) and clf.rnn_size == 32
    assert Path(clf.checkpoint) == Path(tiny_checkpoint).resolve()
    for name in ("neuron_weights.png", "neuron_histogram.png"):
        blob = (out / name).read_bytes()
        assert blob.startswith(PNG_MAGIC) and len(blob) > 5000

    # Per-sample results agree with the reported test accuracies.
    rows = _read_csv(results_csv)
    assert len(rows) == 100
    five = [k for k in rows[0] if k.startswith("neuron_")]
    assert len(five) == 5 and five[0] == f"neuron_{clf.neuron}"
    y = np.array([int(r["label"]) for r in rows])
    p_all = np.array([float(r["prob_all"]) for r in rows])
    p_top = np.array([float(r["prob_top2"]) for r in rows])
    assert ((p_all >= 0) & (p_all <= 1)).all()
    assert ((p_all > 0.5) == y).mean() == pytest.approx(a["test_acc"])
    assert ((p_top > 0.5) == y).mean() == pytest.approx(t["test_acc"])


def test_transfer_command_ratings_split_validation_unlabeled_test(ray_local, tiny_checkpoint,
                                                                 tmp_path):
    rng = np.random.default_rng(0)
    good, bad = ["great fun", "loved it", "a joy"], ["dull", "awful mess", "boring"]
    rows = []
    for i in range(120):
        stars = int(rng.integers(1, 6))
        words = good if stars > 3 else bad
        rows.append([stars, f"{words[i % 3]} {'!' * (i % 4)}"])
    train = _write_csv(tmp_path / "stars" / "train.csv", rows, header=("overall", "reviewText"))
    test = _write_csv(tmp_path / "stars" / "test.csv", [["fine"], ["meh"], ["wow"]],
                      header=("reviewText",))
    res_csv = tmp_path / "out.csv"
    main(["--load_model", str(tiny_checkpoint), "--train", train, "--test", test,
          "--text_key", "reviewText", "--label_key", "overall", "--binarize_sent",
          "--no_test_eval", "--num_samples", "3", "--dataset", "amazon_stars",
          "--write_results", str(res_csv), "--experiment_dir", str(tmp_path / "exp")])
    out = tmp_path / "exp" / "default" / "transfer" / "amazon_stars"
    res = json.loads((out / "results.json").read_text())
    n_mid = sum(r[0] == 3 for r in rows)
    assert res["dropped"]["train"] == {"middle_rating": n_mid} and res["rating_midpoint"] == 3.0
    assert res["val_source"] == "split"
    assert res["sizes"]["train"] + res["sizes"]["val"] == 120 - n_mid
    assert res["all_neurons"]["test_acc"] is None and res["top_neurons"]["test_acc"] is None
    assert len(_read_csv(out / "tune_results.csv")) == 3
    written = _read_csv(res_csv)
    assert [r["text"] for r in written] == ["fine", "meh", "wow"] and "label" not in written[0]
    # the histogram and the extreme samples show the labeled split, val, with true labels;
    # --write_results lists the unlabeled test set it was asked to score
    assert res["shown_split"] == "val"
    assert {e["split"] for e in res["extremes"]} == {"val"}
    assert all(s["label"] in ("negative", "positive") for e in res["extremes"]
               for s in e["highest"] + e["lowest"])
    page = (out / "extremes.html").read_text()
    assert "values on val" in page and "values on test" not in page and "true label" in page


def test_standardized_fit_is_folded_into_raw_feature_weights():
    """Small-magnitude features (like pooled hidden states) on a scale L1 can't reach raw."""
    Xtr, ytr = _synthetic(600, 30, 11, -1, 0)
    Xva, yva = _synthetic(200, 30, 11, -1, 1)
    scale = np.linspace(1e-4, 1e-3, 30).astype(np.float32)  # tiny, uneven magnitudes
    raw_clf, raw = train_classifier(Xtr * scale, ytr, Xva * scale, yva,
                                    sweep=SweepConfig(num_neurons=1, backend="local"))
    clf, res = train_classifier(Xtr * scale, ytr, Xva * scale, yva,
                                sweep=SweepConfig(num_neurons=1, backend="local", standardize=True))
    assert clf.neuron == 11 and clf.sign == -1
    assert res["all_neurons"]["val_acc"] > 0.85 > raw["all_neurons"]["val_acc"]
    # The saved weights take raw features and reproduce sklearn on standardized ones.
    mu, sd = (Xtr * scale).mean(0), (Xtr * scale).std(0)
    model, _ = fit_l1((Xtr * scale - mu) / sd, ytr, clf.C)
    np.testing.assert_allclose(clf.predict_proba(Xva * scale),
                               model.predict_proba((Xva * scale - mu) / sd)[:, 1], atol=1e-6)
    assert res["all_neurons"]["val_acc"] == pytest.approx((clf.predict(Xva * scale) == yva).mean())
    # The histogram's line is where the classifier's own one-neuron model flips, in raw units.
    at = np.zeros((1, 30))
    at[0, 11] = clf.neuron_boundary()
    assert abs(at[0, 11]) < 1e-2 and clf.predict_proba_top(at)[0] == pytest.approx(0.5)


# --- beyond one binary label ---------------------------------------------------------------

def _multiclass(n, seed, drivers=(1, 4, 7, 10)):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 40)).astype(np.float32)
    y = np.argmax(X[:, list(drivers)] + 0.3 * rng.normal(size=(n, len(drivers))), axis=1)
    return X, y.astype(np.int64)


def test_multiclass_classifier_ranks_each_class_neuron_and_owns_its_labels(tmp_path):
    from sentdisc.metrics import classification_metrics

    labels = ["books", "dvd", "electronics", "kitchen"]
    (Xtr, ytr), (Xva, yva), (Xte, yte) = (_multiclass(n, s) for n, s in ((800, 0), (200, 1),
                                                                          (200, 2)))
    sweep = SweepConfig(Cs=[0.05, 0.5], num_neurons=1, backend="local", solver="saga",
                        max_iter=300, label_kind="multiclass", labels=labels)
    clf, res = train_classifier(Xtr, ytr, Xva, yva, Xte, yte, sweep)
    # each class's top neuron is the one that drives it, with a positive weight
    assert dict(zip(clf.neuron_labels, clf.neurons)) == dict(zip(labels, (1, 4, 7, 10)))
    assert clf.signs == [1, 1, 1, 1] and res["top_neurons"]["by_label"]["dvd"][0]["neuron"] == 4
    proba = clf.predict_proba(Xte)
    assert proba.shape == (200, 4) and np.allclose(proba.sum(1), 1, atol=1e-12)
    # the numpy classifier is sklearn's multinomial refit, decisions included
    model, _ = fit_l1(Xtr, ytr, clf.C, solver="saga", max_iter=300)
    np.testing.assert_allclose(proba, model.predict_proba(Xte), atol=1e-6)
    assert (clf.predict(Xte) == model.predict(Xte)).all()
    assert clf.predict_labels(Xte[:3]) == [labels[i] for i in model.predict(Xte[:3])]
    assert res["all_neurons"]["test_acc"] > 0.8 and res["selection_metric"] == "val_macro_f1"
    best = max(r["val_macro_f1"] for r in res["sweep"])
    assert res["all_neurons"]["val_macro_f1"] == best
    # the top-neuron model is multinomial too
    assert np.allclose(clf.predict_proba_top(Xte).sum(1), 1)
    m = classification_metrics("multiclass", labels, yte, clf.predict(Xte), clf.label_proba(Xte))
    assert m["accuracy"] == pytest.approx(res["all_neurons"]["test_acc"])
    assert np.array(m["confusion"]).sum() == 200 and set(m["per_label"]) == set(labels)
    assert all(v["roc_auc"] > 0.9 for v in m["per_label"].values())

    back = Classifier.load(clf.save(tmp_path / "classifier.json"))
    assert (back.label_kind, back.labels, back.neuron_labels) == ("multiclass", labels,
                                                                 clf.neuron_labels)
    np.testing.assert_allclose(back.label_proba(Xte), clf.label_proba(Xte))
    raw = json.loads((tmp_path / "classifier.json").read_text())
    raw["coef"] = raw["coef"][:3]
    (tmp_path / "short.json").write_text(json.dumps(raw))
    with pytest.raises(ClassifierError, match=r"'coef' of shape \[4, 40\] .* got \[3, 40\]"):
        Classifier.load(tmp_path / "short.json")


def test_multilabel_classifier_fits_one_regression_per_label(tmp_path):
    rng = np.random.default_rng(0)

    def sample(n):
        X = rng.normal(size=(n, 30)).astype(np.float32)
        return X, (X[:, [2, 9, 21]] + 0.3 * rng.normal(size=(n, 3)) > 0).astype(np.int64)

    (Xtr, ytr), (Xva, yva) = sample(600), sample(200)
    labels = ["books", "dvd", "positive"]
    clf, res = train_classifier(Xtr, ytr, Xva, yva, sweep=SweepConfig(
        Cs=[0.1, 1.0], backend="local", label_kind="multilabel", labels=labels))
    assert dict(zip(clf.neuron_labels, clf.neurons)) == {"books": 2, "dvd": 9, "positive": 21}
    for k in range(3):  # each label is its own binary L1 regression
        model, _ = fit_l1(Xtr, ytr[:, k], clf.C)
        np.testing.assert_allclose(clf.predict_proba(Xva)[:, k], model.predict_proba(Xva)[:, 1],
                                   atol=1e-9)
    said = clf.predict_labels(Xva[:20])
    assert said == [[lab for lab, on in zip(labels, row) if on] for row in clf.predict(Xva[:20])]
    assert res["all_neurons"]["val_macro_f1"] > 0.8
    back = Classifier.load(clf.save(tmp_path / "c.json"))
    np.testing.assert_allclose(back.predict_proba(Xva), clf.predict_proba(Xva))


def test_version_1_classifier_loads_as_binary_sentiment(tmp_path):
    v1 = {"format": "sentdisc-classifier", "version": 1, "coef": [0.5, -1.0, 0.0],
          "intercept": 0.1, "C": 1.0, "neurons": [1], "signs": [-1],
          "top": {"neurons": [1], "coef": [-1.0], "intercept": 0.0, "C": 1.0},
          "feature_kind": "mean", "layer": -1, "rnn_size": 3, "checkpoint": "", "meta": {}}
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    clf = Classifier.load(tmp_path / "v1.json")
    assert (clf.label_kind, clf.labels, clf.neuron, clf.sign) == (
        "binary", ["negative", "positive"], 1, -1)
    x = np.array([[1.0, 2.0, 0.0]])
    assert clf.predict_labels(x) == ["negative"] and clf.label_proba(x).sum() == pytest.approx(1)


def test_transfer_command_multiclass_on_amazon_categories(ray_local, tiny_checkpoint,
                                                          shared_data, tmp_path, capsys):
    amz = shared_data / "amazon_blitzer"
    assert main(["--load_model", str(tiny_checkpoint), "--train", str(amz / "train.csv"),
                 "--valid", str(amz / "val.csv"), "--test", str(amz / "test.csv"),
                 "--text_key", "text", "--label_key", "category", "--feature_kind", "mean",
                 "--max_train", "300", "--max_eval", "100", "--num_samples", "3",
                 "--extremes", "2", "--experiment_dir", str(tmp_path / "exp")]) == 0
    printed = capsys.readouterr().out
    assert "labels: multiclass: 4 labels of 'category': books, dvd, electronics, kitchen" in printed
    assert "macro-F1 for all neuron regression" in printed and "label kitchen:" in printed
    out = tmp_path / "exp" / "default" / "transfer" / "amazon_blitzer"
    res = json.loads((out / "results.json").read_text())
    assert res["label_kind"] == "multiclass"
    assert res["labels"] == ["books", "dvd", "electronics", "kitchen"]
    test = res["metrics"]["test"]
    assert test["n"] == 100 and 0 <= test["macro_f1"] <= 1 and 0 <= test["balanced_accuracy"] <= 1
    assert test["accuracy"] == pytest.approx(res["all_neurons"]["test_acc"])
    assert set(test["per_label"]) == set(res["labels"])
    assert all(set(v) == {"precision", "recall", "f1", "roc_auc", "support"}
               for v in test["per_label"].values())
    assert np.array(test["confusion"]).shape == (4, 4) and np.array(test["confusion"]).sum() == 100
    assert res["selection_metric"] == "val_macro_f1"
    assert res["solver"] == "fista" and res["all_neurons"]["converged"]
    assert set(res["top_neurons"]["by_label"]) == set(res["labels"])
    assert (out / "confusion.png").read_bytes().startswith(PNG_MAGIC)
    # the extreme samples: per top neuron, the 2 highest and lowest test texts, with heatmaps
    clf = Classifier.load(out / "classifier.json")
    assert [e["neuron"] for e in res["extremes"]] == clf.neurons
    first = res["extremes"][0]
    assert len(first["highest"]) == len(first["lowest"]) == 2
    assert first["highest"][0]["value"] >= first["lowest"][0]["value"]
    page = (out / "extremes.html").read_text()
    assert page.count('class="sentdisc-heatmap"') == 4 * len(clf.neurons)
    assert first["highest"][0]["label"] in res["labels"]
    probs = clf.label_proba(np.zeros((1, 32)))
    assert probs.shape == (1, 4) and probs.sum() == pytest.approx(1, abs=1e-9)


def _multinomial_objective(X, y, coef, intercept, C):
    """sklearn's: C * summed cross entropy + |W|_1."""
    Z = X.astype(np.float64) @ coef.T + intercept
    Z -= Z.max(1, keepdims=True)
    return C * (np.log(np.exp(Z).sum(1)) - Z[np.arange(len(y)), y]).sum() + np.abs(coef).sum()


@pytest.mark.parametrize("C", [0.05, 0.5])
def test_fista_reaches_sklearns_multinomial_l1_optimum(C):
    X, y = _multiclass(600, 0)
    coef, intercept, converged = fit_multinomial_l1(X, y, 4, C)
    model, saga_converged = fit_l1(X, y, C, solver="saga", max_iter=5000)
    assert converged and saga_converged
    ours = _multinomial_objective(X, y, coef, intercept, C)
    theirs = _multinomial_objective(X, y, model.coef_, model.intercept_, C)
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert (np.argmax(X @ coef.T + intercept, 1) == model.predict(X)).mean() >= 0.99
    assert ((coef == 0) == (model.coef_ == 0)).mean() >= 0.95  # the same sparsity


def test_fista_converges_where_saga_does_not():
    """Correlated features and one long row, as mean hidden states are: saga's step is set by
    the longest row and 100 passes stop short; FISTA converges, to a lower objective."""
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(800, 4))
    X = latent @ rng.normal(size=(4, 40)) + 0.05 * rng.normal(size=(800, 40))
    y = np.argmax(latent + 0.5 * rng.normal(size=(800, 4)), 1)
    X[0] *= 8
    X = ((X - X.mean(0)) / X.std(0)).astype(np.float32)
    coef, intercept, converged = fit_multinomial_l1(X, y, 4, 0.5)
    model, saga_converged = fit_l1(X, y, 0.5, solver="saga", max_iter=100)
    assert converged and not saga_converged
    assert _multinomial_objective(X, y, coef, intercept, 0.5) < \
        _multinomial_objective(X, y, model.coef_, model.intercept_, 0.5)
    # and a fit cut short says so
    assert not fit_multinomial_l1(X, y, 4, 0.5, max_iter=5)[2]


def test_multiclass_sweep_by_fista_converges_and_reports_its_solver():
    (Xtr, ytr), (Xva, yva) = _multiclass(400, 0), _multiclass(200, 1)
    sweep = SweepConfig(Cs=[0.1, 1.0], backend="local", solver="fista", label_kind="multiclass",
                        labels=["a", "b", "c", "d"])
    assert sweep.max_iter == 10000
    _, res = train_classifier(Xtr, ytr, Xva, yva, sweep=sweep)
    assert res["solver"] == "fista" and all(r["converged"] for r in res["sweep"])
    assert res["all_neurons"]["val_acc"] > 0.8
    with pytest.raises(ValueError, match="fista fits the multinomial model"):
        SweepConfig(solver="fista", label_kind="binary")


def test_a_solver_that_cannot_fit_the_labels_stops_before_featurizing(tiny_checkpoint,
                                                                      tmp_path, capsys):
    train = _write_csv(tmp_path / "t.csv", [[i % 2, f"text {i}"] for i in range(20)])
    categories = _write_csv(tmp_path / "c.csv", [[i % 3, f"text {i}"] for i in range(30)])
    for path, solver, says in ((train, "fista", "fista fits the multinomial model"),
                               (categories, "liblinear", "liblinear fits multi-class")):
        assert main(["--load_model", str(tiny_checkpoint), "--train", path, "--solver", solver,
                     "--experiment_dir", str(tmp_path / "exp")]) == 2
        out = capsys.readouterr()
        assert f"error: --solver {solver}: {says}" in out.err and "Traceback" not in out.err
        assert "transforming" not in out.out  # nothing was featurized


def test_multiclass_of_two_classes_is_one_row_per_class():
    """sklearn fits two classes as one logit even when multinomial: the classifier still has a
    row per class, and agrees with sklearn."""
    X, y = _synthetic(400, 20, 4, 1, 0)
    clf, res = train_classifier(X, y, X, y, sweep=SweepConfig(
        Cs=[0.5], backend="local", solver="saga", max_iter=300, label_kind="multiclass",
        labels=["cold", "hot"]))
    assert clf.coef.shape == (2, 20) and np.allclose(clf.coef[0], -clf.coef[1])
    assert clf.neurons == [4] and clf.neuron_labels == ["cold"]  # one neuron, both classes
    model, _ = fit_l1(X, y, 0.5, solver="saga", max_iter=300)
    np.testing.assert_allclose(clf.predict_proba(X), model.predict_proba(X), atol=1e-6)
    assert (clf.predict(X) == model.predict(X)).all() and res["all_neurons"]["train_acc"] > 0.85


@pytest.mark.parametrize("change, message", [
    ({"coef": 3.0}, "'coef' of shape"),
    ({"labels": None}, "'labels' must be a non-empty list"),
    ({"labels": "abc"}, "'labels' must be a non-empty list"),
    ({"version": "two"}, "bad value"),
    ({"meta": 5}, "'meta' must be an object"),
    ({"top": {"neurons": [1], "coef": [[1.0]], "intercept": [0.0, 0.0, 0.0], "C": 1.0}},
     r"'top.coef' must be of shape \[3, 1\]"),
])
def test_malformed_multiclass_files_are_one_clear_error(tmp_path, change, message):
    good = {"format": "sentdisc-classifier", "version": 2, "label_kind": "multiclass",
            "labels": ["a", "b", "c"], "coef": [[0.1, 0.2], [0.0, 1.0], [1.0, 0.0]],
            "intercept": [0.0, 0.0, 0.0], "C": 1.0, "neurons": [1], "signs": [1],
            "neuron_labels": ["b"], "top": None, "feature_kind": "mean", "layer": -1,
            "rnn_size": 2, "checkpoint": "", "meta": {}}
    assert Classifier.from_dict(good).predict_labels([[0.0, 2.0]]) == ["b"]
    (tmp_path / "c.json").write_text(json.dumps({**good, **change}))
    with pytest.raises(ClassifierError, match=message):
        Classifier.load(tmp_path / "c.json")


def test_ctrl_c_during_the_tune_sweep_stops_it_in_one_line_not_on_a_partial_grid(ray_local,
                                                                                tmp_path):
    """Tune's own Ctrl-C handler ends a sweep and returns the trials it has, most without a
    result: no C may be chosen from those (it was a KeyError from deep inside)."""
    import os
    import signal
    import threading
    import time

    from sentdisc.errors import Interrupted
    from sentdisc.sweep import sweep_C

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(200, 8)).astype(np.float32), rng.integers(0, 2, 200)
    default = signal.getsignal(signal.SIGINT)

    def press_ctrl_c():  # once Tune's handler is in place, as a user would during the sweep
        deadline = time.time() + 60
        while time.time() < deadline:
            if signal.getsignal(signal.SIGINT) is not default:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.005)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    with pytest.raises(Interrupted, match=r"the Ray Tune sweep was stopped \(Ctrl-C\) with "
                                          r"\d of 10 values of C fitted; nothing was chosen"):
        sweep_C(X, y, X, y, SweepConfig(Cs=c_grid()[:10], storage=tmp_path))
    assert signal.getsignal(signal.SIGINT) is default


def test_a_sweep_without_storage_leaves_no_temporary_folder(ray_local, tmp_path, monkeypatch):
    """Tune's trials went to a fresh sentdisc_tune_* folder under the system's temporary
    folder per sweep, never removed; on an error as well."""
    import tempfile

    from sentdisc.sweep import sweep_C

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkdtemp makes it
    X, y = _synthetic(60, 6, 2, 1, 0)
    rows = sweep_C(X, y, X, y, SweepConfig(Cs=[0.5]))
    assert [r["C"] for r in rows] == [0.5]
    assert not list(tmp_path.glob("sentdisc_tune_*"))
    with pytest.raises(RuntimeError, match="Tune trial C=0.5 failed"):
        sweep_C(X, y, X, y[:10], SweepConfig(Cs=[0.5]))  # labels that do not fit val
    assert not list(tmp_path.glob("sentdisc_tune_*"))


# --- which neuron stands for a label; the classifier's own API ------------------------------

def _witnessed(n, seed):
    """4 classes driven by neurons 1, 4, 7, 10, each also weakly witnessed by a neuron of tiny
    variance (20..23): small standardized weights, the largest raw ones."""
    X, y = _multiclass(n, seed)
    rng = np.random.default_rng(seed + 100)
    for k, col in enumerate((20, 21, 22, 23)):
        X[:, col] = 1e-3 * (0.5 * (y == k) + rng.normal(size=n))
    return X, y


def test_label_neuron_is_the_one_the_standardized_fit_ranked_first(tmp_path):
    from sentdisc.classifier import rank_neurons
    from sentdisc.probe import Probe

    labels = ["books", "dvd", "electronics", "kitchen"]
    (Xtr, ytr), (Xva, yva) = _witnessed(800, 0), _witnessed(200, 1)
    clf, res = train_classifier(Xtr, ytr, Xva, yva, sweep=SweepConfig(
        Cs=[0.05, 0.5], num_neurons=1, backend="local", solver="fista", standardize=True,
        label_kind="multiclass", labels=labels))
    raw_top = [int(np.argmax(np.abs(row))) for row in clf.coef]
    standardized = rank_neurons(clf.coef * Xtr.std(0, dtype=np.float64), 1, labels)
    assert raw_top != standardized[0], "the rankings agree: the test could not fail"
    want = dict(zip(labels, zip(standardized[0], standardized[1], strict=True)))
    assert {lab: clf.top_neuron_of(lab) for lab in labels} == want
    assert want == {lab: (n, 1) for lab, n in zip(labels, (1, 4, 7, 10))}
    # what classifier.json and results.json name for each label, and what heatmaps show
    assert {lab: res["top_neurons"]["by_label"][lab][0]["neuron"] for lab in labels} == \
        {lab: n for lab, (n, _) in want.items()}
    assert {lab: (n, s) for lab, n, s in Probe.from_classifier(clf).label_neurons} == want
    back = Classifier.load(clf.save(tmp_path / "classifier.json"))
    np.testing.assert_allclose(back.feature_scale, Xtr.std(0, dtype=np.float64), rtol=1e-6)
    assert {lab: back.top_neuron_of(lab) for lab in labels} == want
    # a file from before feature_scale still loads, and names its listed neuron per label
    raw = json.loads((tmp_path / "classifier.json").read_text())
    del raw["feature_scale"]
    (tmp_path / "old.json").write_text(json.dumps(raw))
    old = Classifier.load(tmp_path / "old.json")
    assert old.feature_scale is None and {lab: old.top_neuron_of(lab) for lab in labels} == want


def test_label_neuron_taken_by_an_earlier_label_is_still_that_labels():
    """Two labels whose first choice is one neuron: the list gives it to the first, and each
    label still stands by it, signed by its own weight."""
    coef = np.array([[2.0, 0.0, 1.5], [-2.0, 0.5, 0.0]])
    clf = Classifier(coef=coef, intercept=[0.0, 0.0], neurons=[0, 2], signs=[1, 1],
                     label_kind="multiclass", labels=["cold", "hot"],
                     neuron_labels=["cold", "cold"], feature_scale=[1.0, 10.0, 1.0])
    assert clf.top_neuron_of("cold") == (0, 1)
    assert clf.top_neuron_of("hot") == (1, 1)  # |0.5 x 10| beats |-2 x 1|
    clf.feature_scale = None
    clf.neurons, clf.signs, clf.neuron_labels = [0, 2], [1, 1], ["cold", "cold"]
    assert clf.top_neuron_of("hot") == (0, -1)


def test_classifier_api_errors_and_copies(tmp_path):
    multi = Classifier(coef=[[1.0, 0.0], [0.0, 1.0]], intercept=[0.0, 0.0], neurons=[0, 1],
                       signs=[1, 1], label_kind="multiclass", labels=["a", "b"],
                       neuron_labels=["a", "b"])
    with pytest.raises(ClassifierError, match=r"label 'toys' is not one of .*\(a, b\)"):
        multi.top_neuron_of("toys")
    w = np.array([0.5, -2.0, 0.0])
    binary = Classifier(coef=w, intercept=0.0, neurons=[1], signs=[-1], labels=["1", "0"])
    with pytest.raises(ClassifierError, match="binary classifier has no per-label neuron"):
        binary.top_neuron_of("1")
    x = np.array([[0.0, 1.0, 0.0]])
    assert binary.predict_labels(x) == ["1"]
    w[1] = 5.0  # the caller's array is not the classifier's
    d = binary.to_dict()
    d["labels"][0], d["neurons"][0], d["meta"]["x"] = "renamed", 2, 1
    assert binary.predict_labels(x) == ["1"] and binary.neurons == [1] and binary.meta == {}
    assert binary.coef[1] == -2.0


def test_a_checkpoints_own_classifier_stays_here_when_saved_there_again(tmp_path):
    from sentdisc.classifier import HERE

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    head = Classifier(coef=[1.0, -1.0], intercept=0.0, neurons=[0], signs=[1], checkpoint=HERE)
    head.save(ckpt / "classifier.json")
    loaded = Classifier.load(ckpt)
    assert loaded.checkpoint == str(ckpt)  # what scoring and serving featurize with
    loaded.save(ckpt / "classifier.json")
    assert json.loads((ckpt / "classifier.json").read_text())["checkpoint"] == HERE
    Classifier.load(ckpt).save(tmp_path / "elsewhere.json")  # elsewhere "." would mean tmp_path
    assert json.loads((tmp_path / "elsewhere.json").read_text())["checkpoint"] == str(ckpt)


@pytest.mark.parametrize("change, message", [
    ({"feature_kind": "cells"}, "field 'feature_kind' must be one of cell, hidden, mean, max"),
    ({"checkpoint": None}, "field 'checkpoint' must be a string"),
    ({"signs": [2]}, r"field 'signs' must hold \+1 or -1"),
    ({"signs": [0]}, r"field 'signs' must hold \+1 or -1"),
    ({"layer": 1.5}, "field 'layer' must be an integer"),
    ({"layer": "-1"}, "field 'layer' must be an integer"),
    ({"feature_scale": [1.0]}, "field 'feature_scale' must hold 2 positive numbers"),
    ({"feature_scale": [1.0, -1.0]}, "field 'feature_scale' must hold 2 positive numbers"),
])
def test_classifier_fields_out_of_their_domain_name_the_file_and_field(tmp_path, change,
                                                                       message):
    good = {"format": "sentdisc-classifier", "version": 2, "label_kind": "binary",
            "labels": ["negative", "positive"], "coef": [0.1, 0.2], "intercept": 0.0,
            "C": 1.0, "neurons": [1], "signs": [1], "top": None, "feature_kind": "mean",
            "layer": -1, "rnn_size": 2, "checkpoint": "", "meta": {}}
    assert Classifier.from_dict(good).predict_labels([[0.0, 1.0]]) == ["positive"]
    (tmp_path / "c.json").write_text(json.dumps({**good, **change}))
    with pytest.raises(ClassifierError, match=rf"c\.json: {message}"):
        Classifier.load(tmp_path / "c.json")
