"""Transfer: featurize labeled text, sweep an L1 logistic regression, find the neurons.

The pipeline of Radford et al. (2017) and NVIDIA's ``transfer.py``, for one binary label (the
sentiment neuron) and beyond it, composed from:

1. ``sentdisc.labeled.prepare_data``: labeled train / val / test tables and their
   ``LabelSpec`` (binary, multiclass or multilabel, read off the data), every label checked;
2. ``sentdisc.features_ray.featurize_texts``: every text featurized with a pretrained
   checkpoint, in process for small sets, on a Ray Data pool of model replicas for large ones;
3. ``sentdisc.sweep.train_classifier``: the L1 strength C swept with Ray Tune on validation
   (accuracy for binary, macro-F1 otherwise), the neurons ranked by |weight| (per label), a
   second regression on the top ``num_neurons``;
4. ``sentdisc.metrics`` on every split, from the classifier's own decisions;
5. ``sentdisc.report`` and ``sentdisc.extremes``: the printed report, classifier.json
   (``sentdisc.classifier.Classifier``, first, so a later failure keeps the fit),
   tune_results.csv, the plots (neuron weights and histogram; a confusion matrix for
   multi-class, per-label AUC for multi-label), the extreme samples as results and as a page
   of heatmaps; then results.json;
6. ``sentdisc.tracking``: all of it as an MLflow run tagged with the checkpoint.

Every input (``--load_model``, the tables, ``--write_results``) and every output may be a local
path or a storage URI (``sentdisc.storage``).

With ``standardize`` (the default) each feature is scaled to zero mean and unit variance on
train before the sweep, and the scaling is folded back into the saved weights, so the classifier
applies to raw features. Without it the regression sees raw values, as in the original tool;
pooled hidden states are small in magnitude and then need Cs far beyond the paper's grid.
Importing this module does not import torch (loading the checkpoint does, when it runs).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from sentdisc import storage
from sentdisc.config import OutputConfig, plain_name
from sentdisc.features_ray import PoolConfig, featurize_texts
from sentdisc.labeled import LabeledDataConfig, LabelSpec, TransferError, prepare_data
from sentdisc.metrics import classification_metrics
from sentdisc.report import (
    format_report,
    metrics_lines,
    plot_confusion,
    plot_label_auc,
    plot_neuron_histogram,
    plot_neuron_weights,
    write_results_csv,
    write_tune_csv,
)
from sentdisc.sweep import MAX_ITER, SweepConfig, c_grid, train_classifier
from sentdisc.tracking import TrackingConfig, transfer_tracker

__all__ = ["TransferConfig", "TransferError", "run_transfer"]

ROLES = ("train", "val", "test")
SOLVERS = ("auto", *MAX_ITER)  # auto, then what sentdisc.sweep fits with


@dataclass
class TransferConfig(PoolConfig, LabeledDataConfig):
    """The labeled data (``LabeledDataConfig``'s fields), the features, the sweep."""
    load_model: str = field(default="", metadata={
        "help": "checkpoint directory to featurize with", "path": True})
    num_neurons: int = field(default=1, metadata={
        "help": "top neurons for the small classifier (per label for multiclass/multilabel)"})
    num_samples: int = field(default=0, metadata={
        "help": "0: the C grid 2^-8..2^1; N: N values of C log-uniform in that range"})
    feature_kind: str = field(default="cell", metadata={"help": "cell|hidden|mean|max"})
    layer: int = field(default=-1, metadata={"help": "which layer's state to use"})
    batch_size: int = field(default=128, metadata={"help": "texts per featurization batch"})
    chunk_size: int = field(default=256, metadata={"help": "bytes per featurization chunk"})
    precision: str = field(default="auto", metadata={
        "help": "featurize's products: auto (bf16 where the hardware multiplies it natively, "
                "else fp32) | fp32 | bf16"})
    write_results: str = field(default="", metadata={
        "help": "CSV of per-test-sample probabilities and top-5 neuron values", "path": True})
    extremes: int = field(default=5, metadata={
        "help": "texts listed at each end of each top neuron's values (results.json and "
                "extremes.html with their heatmaps; 0: none)"})
    dataset: str = field(default="", metadata={
        "help": "name of the output folder; empty: the train file's parent folder"})
    solver: str = field(default="auto", metadata={
        "help": "auto (liblinear; fista for multiclass, whose multinomial L1 fit liblinear "
                "lacks and saga is slow to converge) | liblinear | saga | fista (multiclass)"})
    max_iter: int = field(default=0, metadata={
        "help": "logistic regression iterations; 0: the solver's default (liblinear, saga: 100 "
                "passes over the data; fista: 10000 steps)"})
    cpus_per_trial: float = field(default=1.0, metadata={"help": "CPUs per Tune trial"})
    standardize: bool = field(default=True, metadata={
        "help": "scale features to unit variance on train before the L1 fit (folded back into "
                "the saved weights); --no-standardize fits raw values as the original"})

    def __post_init__(self):
        from sentdisc.features import KINDS

        LabeledDataConfig.__post_init__(self)
        PoolConfig.__post_init__(self)
        if self.feature_kind not in KINDS:
            raise ValueError(f"feature_kind must be one of {KINDS}, got {self.feature_kind!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS} (each does L1), got "
                             f"{self.solver!r}")
        if self.num_neurons < 1:
            raise ValueError(f"num_neurons must be >= 1, got {self.num_neurons}")
        if self.num_samples < 0 or self.extremes < 0 or self.max_iter < 0:
            raise ValueError("num_samples, extremes and max_iter must be >= 0")
        for name in ("batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.cpus_per_trial > 0:
            raise ValueError(f"cpus_per_trial must be > 0, got {self.cpus_per_trial}")


def output_dir(cfg: LabeledDataConfig, out: OutputConfig, job: str = "transfer") -> str:
    """<experiment_dir>/<experiment_name>/<job>/<dataset> on any storage; the dataset is
    named after the train file's folder unless --dataset says otherwise."""
    folder = storage.absolute(cfg.train).rstrip("/").rsplit("/", 1)[0]
    name = getattr(cfg, "dataset", "") or storage.basename(folder) or "dataset"
    return storage.join(out.run_dir, job, plain_name(name, "dataset"))


def load_checkpoint(cfg: TransferConfig):
    """The checkpoint, its --layer checked: a bad one fails before any data is read."""
    from sentdisc.checkpoint import load, resolve
    from sentdisc.model import check_layer

    if not cfg.load_model:
        raise TransferError("--load_model is required (a checkpoint directory)")
    # "openai" -> the converted folder, once: what the classifier records and what Ray's
    # featurize workers load must be that folder, not the name
    cfg.load_model = str(resolve(cfg.load_model))
    model = load(cfg.load_model)
    try:
        check_layer(cfg.layer, len(model.layers))
    except ValueError as e:
        raise TransferError(f"--layer: {e} (checkpoint {cfg.load_model})") from None
    return model


def featurize_sets(data: dict, model, checkpoint: str, pool: PoolConfig, *, kind: str,
                   layer: int = -1, batch_size: int = 128, chunk_size: int = 256,
                   precision: str = "auto", roles=ROLES, log=print) -> tuple[dict, dict]:
    """{role: features or None} and {role: featurize stats} of the train / val / test sets,
    in process with ``model`` or on ``pool``'s Ray Data replicas of ``checkpoint``."""
    feats, stats = dict.fromkeys(ROLES), {}
    for role in roles:
        if data[role] is None:
            continue
        log(f"transforming {role}")
        feats[role], stats[role] = featurize_texts(
            data[role].texts, model, checkpoint, name=role, kind=kind, layer=layer,
            batch_size=batch_size, chunk_size=chunk_size,
            ray_threshold=pool.ray_featurize_threshold, replicas=pool.featurize_replicas,
            cpus_per_replica=pool.cpus_per_replica, precision=precision, log=log)
    return feats, stats


def solver_for(cfg: TransferConfig, spec: LabelSpec) -> str:
    """--solver, auto resolved for these labels (SweepConfig says which solvers fit which)."""
    if cfg.solver != "auto":
        return cfg.solver
    return "fista" if spec.kind == "multiclass" else "liblinear"


def sweep_config(cfg: TransferConfig, run_dir: str, spec: LabelSpec) -> SweepConfig:
    # Tune's trial folders are scratch: beside the outputs when those are local, else in a
    # temporary folder (the sweep's results go to tune_results.csv on any storage).
    scratch = None if storage.is_uri(run_dir) else Path(run_dir) / "tune_runs"
    try:
        return SweepConfig(Cs=c_grid(cfg.num_samples, cfg.seed), seed=cfg.seed,
                           max_iter=cfg.max_iter, solver=solver_for(cfg, spec), backend="tune",
                           storage=scratch, cpus_per_trial=cfg.cpus_per_trial,
                           standardize=cfg.standardize, num_neurons=cfg.num_neurons,
                           label_kind=spec.kind, labels=spec.labels)
    except ValueError as e:  # a solver that cannot fit these labels
        raise TransferError(f"--solver {cfg.solver}: {e}; these labels are {spec.kind}") \
            from None


def fit_classifier(feats: dict, labels: dict, cfg: TransferConfig, sweep: SweepConfig,
                   log=print):
    """The Tune sweep and the two regressions; logs each C and the report."""
    log(f"sweeping C over {len(sweep.Cs)} values with Ray Tune ({sweep.label_kind}, chosen by "
        f"{sweep.metric}): {', '.join(f'{c:.4g}' for c in sweep.Cs)}")
    clf, res = train_classifier(
        feats["train"], labels["train"], feats["val"], labels["val"], feats["test"],
        labels["test"], sweep, feature_kind=cfg.feature_kind, layer=cfg.layer,
        checkpoint=storage.absolute(cfg.load_model), log=log)
    f1 = sweep.label_kind != "binary"
    for r in res["sweep"]:
        log(f"  C={r['C']:<10.4g} val {100 * r['val_acc']:.2f}  train {100 * r['train_acc']:.2f}"
            + (f"  val macro-F1 {100 * r['val_macro_f1']:.2f}" if f1 else "")
            + f"  non-zero {r['nnz']}{'' if r['converged'] else '  (not converged)'}")
    log(format_report(res))
    return clf, res


def split_metrics(clf, feats: dict, labels: dict) -> dict:
    """{role: classification_metrics} of every labeled split, from the classifier's own
    decisions and probabilities."""
    return {role: classification_metrics(clf.label_kind, clf.labels, labels[role],
                                         clf.predict(feats[role]), clf.label_proba(feats[role]))
            for role in ROLES if feats[role] is not None and labels[role] is not None}


def shown_split(labels: dict) -> str:
    """The split the plots and extreme samples show: test when it has labels, else val (an
    unlabeled test set has no classes to split a histogram by, nor true labels to list)."""
    return "test" if labels["test"] is not None else "val"


def listed_split(feats: dict) -> str:
    """The split --write_results lists: test whenever it was featurized, labeled or not
    (scoring an unlabeled test set is what the file is for), else val."""
    return "test" if feats["test"] is not None else "val"


def _groups(clf, y: np.ndarray) -> dict:
    """{name: row mask} to split a neuron's histogram by: the classes, or for multi-label the
    top neuron's own label present / absent."""
    if clf.label_kind == "multilabel":
        k = clf.labels.index(clf.neuron_labels[0]) if clf.neuron_labels else 0
        return {f"not {clf.labels[k]}": y[:, k] == 0, clf.labels[k]: y[:, k] == 1}
    return {name: y == i for i, name in enumerate(clf.labels)}


def write_outputs(run_dir: str, cfg, data: dict, feats: dict, labels: dict, clf, res: dict,
                  metrics: dict, boundary, log=print) -> dict:
    """classifier.json first, then tune_results.csv (with a sweep), the plots and
    --write_results; returns {name: path}, results.json included (written last by the caller).
    ``res`` None: no sweep (a fine-tuned head)."""
    files = {name: storage.join(run_dir, file) for name, file in (
        ("results", "results.json"), ("classifier", "classifier.json"),
        ("neuron_weights", "neuron_weights.png"), ("neuron_histogram", "neuron_histogram.png"))}
    clf.save(files["classifier"])  # the fit is what took long: a later failure keeps it
    if res is not None:
        files["tune_results"] = storage.join(run_dir, "tune_results.csv")
        write_tune_csv(files["tune_results"], res["sweep"], res["all_neurons"]["C"])
    plot_neuron_weights(files["neuron_weights"], clf.coef, clf.neurons, clf.C, clf.labels)
    role = shown_split(labels)
    plot_neuron_histogram(files["neuron_histogram"], feats[role][:, clf.neuron],
                          _groups(clf, labels[role]), clf.neuron, boundary, role)
    if role in metrics and clf.label_kind == "multiclass":
        files["confusion"] = storage.join(run_dir, "confusion.png")
        plot_confusion(files["confusion"], metrics[role]["confusion"], clf.labels, role)
    if role in metrics and clf.label_kind == "multilabel":
        files["label_auc"] = storage.join(run_dir, "label_auc.png")
        plot_label_auc(files["label_auc"], metrics[role], role)
    if getattr(cfg, "write_results", ""):
        shown = listed_split(feats)
        files["write_results"] = cfg.write_results
        strongest = np.argsort(-np.abs(np.atleast_2d(clf.coef)).max(axis=0), kind="stable")
        write_results_csv(files["write_results"], data[shown].texts, labels[shown],
                          feats[shown], clf, [int(n) for n in strongest[:5]])
        log(f"wrote per-sample {shown} results to {cfg.write_results}")
    return files


def write_extremes(run_dir: str, cfg, data: dict, feats: dict, labels: dict, clf, model,
                   files: dict, log=print) -> list:
    """The extreme samples of each top neuron: returned for results.json, and drawn as
    extremes.html (heatmaps of the neuron over each text)."""
    from sentdisc.extremes import extreme_samples, write_page
    from sentdisc.probe import Probe

    if not cfg.extremes:
        return []
    role = shown_split(labels)
    samples = extreme_samples(clf, feats[role], data[role].texts, labels[role], cfg.extremes,
                              role, data[role].rows_in_file)
    files["extremes"] = storage.join(run_dir, "extremes.html")
    write_page(files["extremes"], model, samples, clf.layer, Probe.from_classifier(clf).trace_kind,
               title=f"extreme samples: {storage.basename(run_dir)}")
    log(f"extreme samples of {len(samples)} neuron(s) on {role}: {files['extremes']}")
    return samples


def _inputs(cfg: TransferConfig, model, data: dict) -> dict:
    """results.json on what went in: the checkpoint, the features, the labeled sets."""
    from sentdisc.checkpoint import read_meta

    has_meta = storage.exists(storage.join(cfg.load_model, "config.json"))
    ckpt_meta = read_meta(cfg.load_model) if has_meta else {}
    return {
        "checkpoint": storage.absolute(cfg.load_model),
        "model": ckpt_meta.get("model", model.config.to_dict()),
        "feature_kind": cfg.feature_kind, "layer": cfg.layer,
        "rnn_size": model.config.rnn_size, **label_fields(data),
        "no_test_eval": cfg.no_test_eval,
    }


def label_fields(data: dict) -> dict:
    """results.json on the labeled sets: sizes, where val came from, drops, the labels."""
    spec: LabelSpec = data["spec"]
    return {"sizes": _sizes(data), "val_source": data["val_source"],
            "dropped": {r: data[r].dropped for r in ROLES if data[r] is not None},
            "rating_midpoint": data["rating_midpoint"], "label_kind": spec.kind,
            "labels": list(spec.labels), "label_keys": list(spec.keys)}


def _outcome(clf, res: dict, metrics: dict, boundary) -> dict:
    """results.json on what came out: the two regressions, the neuron, the sweeps, the
    metrics of every split."""
    return {
        "all_neurons": res["all_neurons"], "top_neurons": res["top_neurons"],
        "neuron": clf.neuron, "sign": clf.sign, "histogram_boundary": boundary,
        "sweep": res["sweep"], "top_sweep": res["top_sweep"], "C_grid": res["C_grid"],
        "selection_metric": res["selection_metric"], "solver": res["solver"],
        "max_iter": res["max_iter"], "metrics": metrics,
    }


def _sizes(data: dict) -> dict:
    return {r: (len(data[r]) if data[r] is not None else 0) for r in ROLES}


def run_transfer(cfg: TransferConfig, out: OutputConfig, log=print,
                 tracking: Optional[TrackingConfig] = None) -> dict:
    """The whole transfer job; returns results (also written to results.json). It is tracked
    as an MLflow run tagged with its checkpoint (``sentdisc.tracking``) unless ``tracking``
    says otherwise."""
    t_start = time.perf_counter()
    model = load_checkpoint(cfg)
    data = prepare_data(cfg)
    run_dir = output_dir(cfg, out)
    tracking = tracking or TrackingConfig()
    # a tracking server that does not answer fails the job here, before any featurizing
    tracker = transfer_tracker(tracking, out, storage.basename(run_dir),
                               storage.absolute(cfg.load_model), log)
    with tracker:
        config = {**asdict(cfg), **asdict(out), **asdict(tracking)}  # every flag
        tracker.start(config)
        results = _transfer(cfg, run_dir, model, data, tracker, log)
        results.update(seconds=round(time.perf_counter() - t_start, 3), config=config)
        storage.write_json(results["files"]["results"], results, indent=1)
        tracker.log_result(tracked_metrics(results), _tracked_tags(results),
                           {storage.basename(f): f for f in results["files"].values()})
    log(f"results successfully written to {run_dir}")
    return results


def _transfer(cfg: TransferConfig, run_dir: str, model, data: dict, tracker, log) -> dict:
    """Featurize, sweep, write the outputs; results.json's content (the caller writes it)."""
    storage.makedirs(run_dir)
    log(f"writing results to {run_dir}")
    sizes, spec = _sizes(data), data["spec"]
    log(f"labels: {spec.describe()}")
    log(f"train {sizes['train']}, val {sizes['val']} ({data['val_source']}), test {sizes['test']}"
        f" texts; features: layer {cfg.layer} {cfg.feature_kind}, rnn_size {model.config.rnn_size}")

    sweep = sweep_config(cfg, run_dir, spec)  # a solver that cannot fit these labels: say so now
    feats, feat_stats = featurize_sets(data, model, cfg.load_model, cfg, kind=cfg.feature_kind,
                                       layer=cfg.layer, batch_size=cfg.batch_size,
                                       chunk_size=cfg.chunk_size, precision=cfg.precision, log=log)
    tracker.ready()  # the store opened while featurizing: fail before the sweep if it did not
    labels = {r: (data[r].labels if data[r] is not None else None) for r in ROLES}
    clf, res = fit_classifier(feats, labels, cfg, sweep, log)
    metrics = split_metrics(clf, feats, labels)
    if spec.kind != "binary":
        log(metrics_lines(metrics))
    boundary = clf.neuron_boundary()
    dataset = storage.basename(run_dir)
    clf.meta = {"dataset": dataset, "label_spec": spec.describe(), "accuracy": {
        "all": {k: res["all_neurons"][f"{k}_acc"] for k in ROLES},
        "top": {k: res["top_neurons"][f"{k}_acc"] for k in ROLES}},
        "macro_f1": {k: m["macro_f1"] for k, m in metrics.items()}}
    files = write_outputs(run_dir, cfg, data, feats, labels, clf, res, metrics, boundary, log=log)
    extremes = write_extremes(run_dir, cfg, data, feats, labels, clf, model, files, log)
    return {"dataset": dataset, **_inputs(cfg, model, data),
            **_outcome(clf, res, metrics, boundary), "shown_split": shown_split(labels),
            "extremes": extremes, "featurize": feat_stats,
            "files": {k: str(v) for k, v in files.items()}}


def tracked_metrics(results: dict) -> dict:
    """results.json -> MLflow metrics: both regressions' scores and Cs, the neuron, every
    split's accuracy / macro-F1 / balanced accuracy, and the sweep (validation score by C,
    smallest C first, as steps)."""
    out: dict = {}
    for which in ("all_neurons", "top_neurons"):
        r = results.get(which) or {}
        out.update({f"{which}.{k}": r.get(k) for k in (
            "train_acc", "val_acc", "test_acc", "train_macro_f1", "val_macro_f1",
            "test_macro_f1", "C", "nnz", "seconds")})
    for split, m in (results.get("metrics") or {}).items():
        out.update({f"{split}.{k}": m.get(k) for k in ("accuracy", "macro_f1",
                                                        "balanced_accuracy")})
    sweep = sorted(results.get("sweep") or [], key=lambda r: r["C"])
    out.update({"neuron": results["neuron"], "seconds": results.get("seconds")})
    if sweep:
        out.update({"sweep.C": [r["C"] for r in sweep],
                    "sweep.val_acc": [r["val_acc"] for r in sweep]})
    return {k: v for k, v in out.items() if v is not None}


def _tracked_tags(results: dict) -> dict:
    top = results["top_neurons"]
    return {"sentdisc.top_neurons": ",".join(str(n) for n in top["neurons"]),
            "sentdisc.top_weights": ",".join(f"{w:+.4f}" for w in top["weights"]),
            "sentdisc.neuron": results["neuron"], "sentdisc.sign": results["sign"],
            "sentdisc.label_kind": results["label_kind"]}
