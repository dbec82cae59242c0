"""Sentiment transfer: featurize labeled text, sweep an L1 logistic regression, find the neuron.

The pipeline of Radford et al. (2017) and NVIDIA's ``transfer.py``:

1. read labeled train / val / test tables (``sentdisc.data.readers.read_table``), binarize
   ratings if asked, and check that labels are 0/1;
2. featurize every text with a pretrained checkpoint (``sentdisc.features.featurize``): in-process for
   small sets, on a Ray Data actor pool of model replicas for large ones (same numbers);
3. sweep the L1 strength C with Ray Tune, one trial per C, each fit on train and scored on
   validation (never test); keep the best C's fit (ties go to the smaller, sparser C);
4. rank neurons by |weight|, fit a second regression on the top ``num_neurons`` only (its C
   swept on validation too), and report train / val / test accuracy of both;
5. write results.json, classifier.json (``sentdisc.classifier.Classifier``), tune_results.csv
   and the neuron_weights / neuron_histogram plots.

With ``standardize`` (the default) each feature is scaled to zero mean and unit variance on
train before the sweep, and the scaling is folded back into the saved weights, so the classifier
applies to raw features. Without it the regression sees raw values, as in the original tool;
pooled hidden states are small in magnitude and then need Cs far beyond the paper's grid.
Importing this module does not import torch (the featurize paths import it when they run), so
a Tune trial worker pays only for numpy and sklearn.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from sentdisc.classifier import Classifier, ClassifierError, fit_result_to_classifier
from sentdisc.runtime import ensure_ray

__all__ = ["TransferConfig", "TransferError", "Classifier", "ClassifierError", "LabeledSet",
           "prepare_data", "featurize_texts", "featurize_ray", "c_grid", "sweep_C", "choose_C",
           "train_classifier", "run_transfer"]


class TransferError(ValueError):
    """Bad transfer input (labels, options) reported without a traceback."""


@dataclass
class TransferConfig:
    load_model: str = field(default="", metadata={"help": "checkpoint directory to featurize with"})
    train: str = field(default="", metadata={"help": "labeled training table (csv/tsv/json)"})
    valid: str = field(default="", metadata={
        "help": "validation table; empty: split val_fraction off train (seeded)"})
    test: str = field(default="", metadata={"help": "test table (optional)"})
    text_key: str = field(default="sentence", metadata={"help": "column/field holding the text"})
    label_key: str = field(default="label", metadata={"help": "column/field holding the label"})
    data_format: str = field(default="auto", metadata={"help": "auto|csv|tsv|json|loose_json|..."})
    delim: str = field(default="", metadata={"help": "field delimiter; empty: from the format"})
    drop_unlabeled: bool = field(default=False, metadata={
        "help": "drop rows without a label instead of failing"})
    binarize_sent: bool = field(default=False, metadata={
        "help": "ratings -> 0/1: lower half 0, upper half 1, the middle dropped"})
    num_neurons: int = field(default=1, metadata={"help": "top neurons for the small classifier"})
    num_samples: int = field(default=0, metadata={
        "help": "0: the C grid 2^-8..2^1; N: N values of C log-uniform in that range"})
    feature_kind: str = field(default="cell", metadata={"help": "cell|hidden|mean|max"})
    layer: int = field(default=-1, metadata={"help": "which layer's state to use"})
    batch_size: int = field(default=128, metadata={"help": "texts per featurization batch"})
    chunk_size: int = field(default=256, metadata={"help": "bytes per featurization chunk"})
    no_test_eval: bool = field(default=False, metadata={"help": "test set has no labels"})
    write_results: str = field(default="", metadata={
        "help": "CSV of per-test-sample probabilities and top-5 neuron values"})
    experiment_dir: str = field(default="experiments", metadata={"help": "root of all outputs"})
    experiment_name: str = field(default="default", metadata={"help": "one run's folder"})
    dataset: str = field(default="", metadata={
        "help": "name of the output folder; empty: the train file's parent folder"})
    ray_featurize_threshold: int = field(default=20000, metadata={
        "help": "sets of at least this many texts featurize on a Ray Data actor pool "
                "(0: always, -1: never)"})
    featurize_replicas: int = field(default=2, metadata={"help": "model replicas (actors)"})
    cpus_per_replica: int = field(default=1, metadata={"help": "CPUs (torch threads) per replica"})
    max_train: int = field(default=0, metadata={"help": "seeded subset of train (0: all)"})
    max_eval: int = field(default=0, metadata={"help": "seeded subset of val and test (0: all)"})
    val_fraction: float = field(default=0.1, metadata={"help": "split off train when no --valid"})
    solver: str = field(default="liblinear", metadata={"help": "liblinear|saga"})
    max_iter: int = field(default=100, metadata={"help": "logistic regression iterations"})
    cpus_per_trial: float = field(default=1.0, metadata={"help": "CPUs per Tune trial"})
    seed: int = field(default=42, metadata={"help": "seed for subsets, splits and solvers"})
    standardize: bool = field(default=True, metadata={
        "help": "scale features to unit variance on train before the L1 fit (folded back into "
                "the saved weights); --no-standardize fits raw values as the original"})

    def __post_init__(self):
        from sentdisc.features import KINDS

        if self.feature_kind not in KINDS:
            raise ValueError(f"feature_kind must be one of {KINDS}, got {self.feature_kind!r}")
        if self.solver not in ("liblinear", "saga"):
            raise ValueError(f"solver must be liblinear or saga (both do L1), got {self.solver!r}")
        if self.num_neurons < 1:
            raise ValueError(f"num_neurons must be >= 1, got {self.num_neurons}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("num_samples", "max_train", "max_eval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.featurize_replicas < 1 or self.cpus_per_replica < 1:
            raise ValueError("featurize_replicas and cpus_per_replica must be >= 1")


# --- labeled data ----------------------------------------------------------------------------

@dataclass
class LabeledSet:
    texts: list
    labels: Optional[np.ndarray]   # int64 0/1, or None for an unlabeled test set
    path: str
    dropped: dict = field(default_factory=dict)   # reason -> rows dropped

    def __len__(self):
        return len(self.texts)


def _read(path: str, cfg: TransferConfig, label_key: Optional[str], role: str):
    from sentdisc.data.readers import DataError
    from sentdisc.labeled import read_table

    if not Path(path).exists():
        raise TransferError(f"{role} file {path} does not exist")
    try:
        return read_table(path, cfg.text_key, label_key, data_format=cfg.data_format,
                          delim=cfg.delim or None)
    except DataError as e:
        hint = " (use --no_test_eval for a test set without labels)" if role == "test" else ""
        raise TransferError(f"{role}: {e}{hint}") from None


def _missing(values) -> np.ndarray:
    import pandas as pd

    s = pd.Series(values)
    return (s.isna() | s.astype(str).str.strip().eq("")).to_numpy()


def _numeric_labels(raw, path: str) -> np.ndarray:
    import pandas as pd

    num = pd.to_numeric(pd.Series(raw), errors="coerce")
    if num.isna().any():
        bad = sorted({str(v) for v, n in zip(raw, num) if pd.isna(n)})[:10]
        raise TransferError(f"{path}: labels must be numbers (0/1, or ratings with "
                            f"--binarize_sent); found {bad}")
    return num.to_numpy(dtype=np.float64)


def rating_midpoint(labels: np.ndarray) -> float:
    """Middle of the rating scale seen in a file: 1-5 stars -> 3, 0/1 -> 0.5."""
    return (float(np.min(labels)) + float(np.max(labels))) / 2.0


def load_labeled(path: str, cfg: TransferConfig, role: str, labeled: bool = True,
                 midpoint: Optional[float] = None) -> tuple[LabeledSet, Optional[float]]:
    """Read one table; returns the set and the rating midpoint used (``binarize_sent``)."""
    df = _read(path, cfg, cfg.label_key if labeled else None, role)
    texts = df["text"].astype(str).tolist()
    if not labeled:
        return LabeledSet(texts, None, path), midpoint
    raw = df["label"].to_numpy()
    dropped = {}
    missing = _missing(raw)
    if missing.any():
        if not cfg.drop_unlabeled:
            first = int(np.argmax(missing))
            raise TransferError(f"{path}: {int(missing.sum())} of {len(raw)} rows have no "
                                f"{cfg.label_key!r} (first at row {first + 1}); pass "
                                f"--drop_unlabeled to skip them")
        dropped["unlabeled"] = int(missing.sum())
        texts = [t for t, m in zip(texts, missing) if not m]
        raw = raw[~missing]
    values = _numeric_labels(raw, path)
    if cfg.binarize_sent:
        if len(values) == 0:
            raise TransferError(f"{path}: no labeled rows")
        midpoint = rating_midpoint(values) if midpoint is None else midpoint
        keep = values != midpoint
        dropped["middle_rating"] = int((~keep).sum())
        texts = [t for t, k in zip(texts, keep) if k]
        labels = (values[keep] > midpoint).astype(np.int64)
    else:
        found = np.unique(values)
        if not set(found.tolist()) <= {0.0, 1.0}:
            shown = [int(v) if float(v).is_integer() else float(v) for v in found[:10]]
            raise TransferError(
                f"{path}: labels of {cfg.label_key!r} must be binary 0/1; found values "
                f"{shown}{' ...' if len(found) > 10 else ''}. Pass --binarize_sent to map "
                f"ratings (lower half -> 0, upper half -> 1, middle dropped)")
        labels = values.astype(np.int64)
    if len(texts) == 0:
        raise TransferError(f"{path}: no labeled rows left (dropped {dropped})")
    return LabeledSet(texts, labels, path, dropped), midpoint


def _subset(s: LabeledSet, n: int, seed: int) -> LabeledSet:
    if not n or len(s) <= n:
        return s
    keep = np.sort(np.random.default_rng(seed).choice(len(s), n, replace=False))
    return LabeledSet([s.texts[i] for i in keep],
                      None if s.labels is None else s.labels[keep], s.path, s.dropped)


def prepare_data(cfg: TransferConfig) -> dict:
    """{"train", "val", "test" (or None)} LabeledSets plus "val_source" ('file'|'split')."""
    if not cfg.train:
        raise TransferError("--train is required (a labeled table)")
    train, mid = load_labeled(cfg.train, cfg, "train")
    train = _subset(train, cfg.max_train, cfg.seed)
    if cfg.valid:
        val, _ = load_labeled(cfg.valid, cfg, "valid", midpoint=mid)
        val_source = "file"
    else:
        # Deterministic split so repeated runs compare like with like.
        perm = np.random.default_rng(cfg.seed).permutation(len(train))
        n_val = max(1, int(round(cfg.val_fraction * len(train))))
        if len(train) - n_val < 2:
            raise TransferError(f"{cfg.train}: too few rows ({len(train)}) to split off validation")
        vi, ti = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        val = LabeledSet([train.texts[i] for i in vi], train.labels[vi], f"{cfg.train} (split)")
        train = LabeledSet([train.texts[i] for i in ti], train.labels[ti], train.path, train.dropped)
        val_source = "split"
    val = _subset(val, cfg.max_eval, cfg.seed + 1)
    test = None
    if cfg.test:
        test, _ = load_labeled(cfg.test, cfg, "test", labeled=not cfg.no_test_eval, midpoint=mid)
        test = _subset(test, cfg.max_eval, cfg.seed + 2)
    if len(np.unique(train.labels)) < 2:
        raise TransferError(f"{cfg.train}: training labels hold one class only "
                            f"({int(train.labels[0])}); a classifier needs both")
    return {"train": train, "val": val, "test": test, "val_source": val_source,
            "rating_midpoint": mid if cfg.binarize_sent else None}


# --- featurization ---------------------------------------------------------------------------

class ProgressLine:
    """Prints 'name: done/total texts | texts/s | bytes/s | ETA' at most every ``every`` s."""

    def __init__(self, name: str, total: int, total_bytes: int, every: float = 2.0, out=None):
        self.name, self.total, self.total_bytes, self.every = name, total, total_bytes, every
        self.out = out or sys.stdout
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int, total: Optional[int] = None) -> None:
        now = time.perf_counter()
        if done < self.total and now - self.last < self.every:
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        rate = done / dt
        bps = self.total_bytes * done / max(self.total, 1) / dt
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        print(f"featurize {self.name}: {done}/{self.total} texts | {rate:.1f} texts/s | "
              f"{bps / 1e3:.1f} KB/s | ETA {eta:.0f}s", file=self.out, flush=True)


class _FeaturizeReplica:
    """One model replica in a Ray Data actor pool: loads the checkpoint once, then featurizes
    each batch with the same ``sentdisc.features.featurize`` the in-process path uses."""

    def __init__(self, checkpoint: str, kind: str, layer: int, batch_size: int,
                 chunk_size: int, threads: int):
        import torch

        from sentdisc.checkpoint import load

        torch.set_num_threads(threads)
        self.model = load(checkpoint)
        self.kw = dict(batch_size=batch_size, layer=layer, kind=kind, chunk_size=chunk_size)

    def __call__(self, batch: dict) -> dict:
        from sentdisc.features import featurize

        feats = featurize(self.model, [str(t) for t in batch["text"]], **self.kw)
        return {"idx": batch["idx"], "features": feats}


def featurize_ray(texts: Sequence[str], checkpoint: str, kind: str = "cell", layer: int = -1,
                  batch_size: int = 128, chunk_size: int = 256, replicas: int = 2,
                  cpus_per_replica: int = 1,
                  progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """``featurize`` over a Ray Data actor pool; same numbers, input order kept.

    Texts are sorted by byte length before they are cut into blocks, so each batch holds
    texts of similar length (little padding), and carry their index so the result is put
    back in input order. The checkpoint path must be readable by every node.
    """
    import pandas as pd
    import ray

    from sentdisc.text import encode_batch

    ensure_ray(include_dashboard=False)
    n = len(texts)
    if n == 0:
        from sentdisc.checkpoint import load_config
        return np.zeros((0, load_config(checkpoint).rnn_size), dtype=np.float32)
    _, offsets = encode_batch(list(texts))
    order = np.argsort(-np.diff(offsets), kind="stable")
    df = pd.DataFrame({"idx": order.astype(np.int64), "text": [texts[i] for i in order]})
    # Several blocks per replica keep the pool busy; each block is a whole number of batches.
    rows_per_block = max(batch_size, batch_size * math.ceil(n / (batch_size * replicas * 4)))
    blocks = [df.iloc[i:i + rows_per_block] for i in range(0, n, rows_per_block)]
    ds = ray.data.from_pandas(blocks).map_batches(
        _FeaturizeReplica, batch_size=batch_size, batch_format="numpy",
        fn_constructor_args=(str(checkpoint), kind, layer, batch_size, chunk_size,
                             cpus_per_replica),
        compute=ray.data.ActorPoolStrategy(size=replicas), num_cpus=cpus_per_replica)
    out, done = None, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        feats = np.asarray(batch["features"], dtype=np.float32)
        if out is None:
            out = np.zeros((n, feats.shape[1]), dtype=np.float32)
        out[batch["idx"]] = feats
        done += len(feats)
        if progress is not None:
            progress(done, n)
    if done != n:
        raise RuntimeError(f"Ray Data featurization returned {done} of {n} rows")
    return out


def featurize_texts(texts: Sequence[str], cfg: TransferConfig, model=None, name: str = "",
                    log=print) -> tuple[np.ndarray, dict]:
    """Features of ``texts`` in-process or on Ray Data (by ``ray_featurize_threshold``)."""
    from sentdisc.text import encode_batch

    n_bytes = int(encode_batch(list(texts))[1][-1]) if len(texts) else 0
    use_ray = cfg.ray_featurize_threshold >= 0 and len(texts) >= cfg.ray_featurize_threshold
    progress = ProgressLine(name, len(texts), n_bytes)
    t0 = time.perf_counter()
    if use_ray:
        feats = featurize_ray(texts, cfg.load_model, cfg.feature_kind, cfg.layer,
                              cfg.batch_size, cfg.chunk_size, cfg.featurize_replicas,
                              cfg.cpus_per_replica, progress)
    else:
        from sentdisc.features import featurize
        feats = featurize(model, list(texts), batch_size=cfg.batch_size, layer=cfg.layer,
                          kind=cfg.feature_kind, chunk_size=cfg.chunk_size, progress=progress)
    dt = time.perf_counter() - t0
    stats = {"texts": len(texts), "bytes": n_bytes, "seconds": round(dt, 3),
             "texts_per_s": round(len(texts) / max(dt, 1e-9), 1),
             "bytes_per_s": round(n_bytes / max(dt, 1e-9), 1),
             "backend": "ray_data" if use_ray else "in_process"}
    log(f"{dt:.3f} seconds to transform {len(texts)} {name} examples "
        f"({stats['backend']}, {stats['bytes_per_s'] / 1e3:.1f} KB/s)")
    return feats, stats


# --- L1 logistic regression and its sweep ----------------------------------------------------

def c_grid(num_samples: int = 0, seed: int = 42, low_exp: int = -8, high_exp: int = 1) -> list:
    """The paper's grid 2^low..2^high, or ``num_samples`` values log-uniform in that range."""
    if num_samples <= 0:
        return [float(2.0 ** e) for e in range(low_exp, high_exp + 1)]
    rng = np.random.default_rng(seed)
    return sorted(float(2.0 ** x) for x in rng.uniform(low_exp, high_exp, num_samples))


def _l1_logreg(C: float, seed: int, max_iter: int, solver: str):
    import sklearn
    from sklearn.linear_model import LogisticRegression

    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    if (major, minor) >= (1, 8):  # 'penalty' is deprecated from 1.8: l1_ratio=1 is L1
        return LogisticRegression(C=C, l1_ratio=1.0, solver=solver, max_iter=max_iter,
                                  random_state=seed)
    return LogisticRegression(C=C, penalty="l1", solver=solver, max_iter=max_iter,
                              random_state=seed)


def fit_l1(X: np.ndarray, y: np.ndarray, C: float, seed: int = 42, max_iter: int = 100,
           solver: str = "liblinear"):
    """Fit one L1 logistic regression; returns (model, converged)."""
    from sklearn.exceptions import ConvergenceWarning

    model = _l1_logreg(C, seed, max_iter, solver)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(X, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return model, converged


def _accuracy(model, X, y) -> float:
    return float((model.predict(X) == y).mean())


def evaluate_C(Xtr, ytr, Xva, yva, C: float, seed: int = 42, max_iter: int = 100,
               solver: str = "liblinear") -> dict:
    """One sweep point: fit on train, score on validation (never test)."""
    t0 = time.perf_counter()
    model, converged = fit_l1(Xtr, ytr, C, seed, max_iter, solver)
    return {"C": float(C), "val_acc": _accuracy(model, Xva, yva),
            "train_acc": _accuracy(model, Xtr, ytr), "nnz": int(np.sum(model.coef_ != 0)),
            "converged": bool(converged), "fit_s": round(time.perf_counter() - t0, 3),
            "coef": model.coef_.reshape(-1).tolist(), "intercept": float(model.intercept_[0])}


def _fitted(row: dict, classes: np.ndarray, seed: int, max_iter: int, solver: str):
    """The sweep's own fit at row's C, as a LogisticRegression: refitting on the same train
    set with the same seed would give the same weights, at the cost of the slowest fit."""
    model = _l1_logreg(row["C"], seed, max_iter, solver)
    model.coef_ = np.asarray(row["coef"], dtype=np.float64).reshape(1, -1)
    model.intercept_ = np.array([row["intercept"]], dtype=np.float64)
    model.classes_ = classes
    model.n_features_in_ = model.coef_.shape[1]
    return model


def _tune_trial(config, Xtr, ytr, Xva, yva, seed, max_iter, solver):
    from ray import tune

    tune.report(evaluate_C(Xtr, ytr, Xva, yva, config["C"], seed, max_iter, solver))


def sweep_C(Xtr, ytr, Xva, yva, Cs: Sequence[float], seed: int = 42, max_iter: int = 100,
            solver: str = "liblinear", backend: str = "tune", storage: Optional[Path] = None,
            cpus_per_trial: float = 1.0, name: str = "sweep") -> list[dict]:
    """Score each C on validation: one Ray Tune trial per C (run in parallel), or in-process.

    With Tune the feature matrices go to the object store once (``tune.with_parameters``)
    rather than into every trial's closure. Rows come back sorted by C.
    """
    if backend == "local":
        return sorted((evaluate_C(Xtr, ytr, Xva, yva, c, seed, max_iter, solver) for c in Cs),
                      key=lambda r: r["C"])
    if backend != "tune":
        raise ValueError(f"backend must be 'tune' or 'local', got {backend!r}")
    from ray import tune

    ensure_ray(include_dashboard=False)
    if storage is None:
        import tempfile
        storage = Path(tempfile.mkdtemp(prefix="sentdisc_tune_"))
    storage = Path(storage).resolve()
    if (storage / name).exists():
        shutil.rmtree(storage / name)  # a rerun's sweep replaces the old one
    trainable = tune.with_resources(
        tune.with_parameters(_tune_trial, Xtr=np.ascontiguousarray(Xtr), ytr=ytr,
                             Xva=np.ascontiguousarray(Xva), yva=yva, seed=seed,
                             max_iter=max_iter, solver=solver),
        {"cpu": cpus_per_trial})
    tuner = tune.Tuner(
        trainable, param_space={"C": tune.grid_search([float(c) for c in Cs])},
        # Reusing trial actors saves a Python start + sklearn import per trial.
        tune_config=tune.TuneConfig(metric="val_acc", mode="max", reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0))
    grid = tuner.fit()
    rows = []
    for result in grid:
        if result.error is not None:
            raise RuntimeError(f"Tune trial C={result.config.get('C')} failed: {result.error}")
        m = result.metrics
        rows.append({k: m[k] for k in ("C", "val_acc", "train_acc", "nnz", "converged",
                                        "fit_s", "coef", "intercept")}
                    | {"trial_id": m.get("trial_id", "")})
    return sorted(rows, key=lambda r: r["C"])


def choose_C(rows: Sequence[dict]) -> dict:
    """Best validation accuracy; ties go to the smaller C (the sparser model)."""
    return min(rows, key=lambda r: (-r["val_acc"], r["C"]))


def top_neurons(coef: np.ndarray, k: int) -> list[int]:
    """Indices of the k largest |weights|, largest first (ties: lower index)."""
    coef = np.asarray(coef).reshape(-1)
    return [int(i) for i in np.argsort(-np.abs(coef), kind="stable")[:k]]


def _scores(model, sets: dict) -> dict:
    out = {}
    for role, (X, y) in sets.items():
        out[f"{role}_acc"] = None if X is None or y is None else _accuracy(model, X, y)
    return out


def train_classifier(Xtr, ytr, Xva, yva, Xte=None, yte=None, num_neurons: int = 1,
                     Cs: Optional[Sequence[float]] = None, seed: int = 42, max_iter: int = 100,
                     solver: str = "liblinear", backend: str = "tune",
                     storage: Optional[Path] = None, cpus_per_trial: float = 1.0,
                     feature_kind: str = "cell", layer: int = -1, checkpoint: str = "",
                     log=print, standardize: bool = False) -> tuple[Classifier, dict]:
    """Sweep C on all neurons, keep the best fit, pick the top neurons, sweep C on them.

    standardize: fit on train-standardized features (neurons then compete on equal terms
    under L1, and the top neurons are ranked by standardized weight); the returned Classifier
    has the scaling folded in and takes raw features.
    Returns the Classifier and a results dict (accuracies, Cs, sweeps, top neurons).
    """
    Cs = list(Cs) if Cs is not None else c_grid()
    mu = sigma = None
    if standardize:
        mu = Xtr.mean(0, dtype=np.float64)
        sigma = Xtr.std(0, dtype=np.float64)
        sigma[sigma < 1e-8] = 1.0  # a constant feature stays as it is (its weight goes to 0)
        scale = lambda X: None if X is None else ((X - mu) / sigma).astype(np.float32)  # noqa: E731
        Xtr, Xva, Xte = scale(Xtr), scale(Xva), scale(Xte)
    sets = {"train": (Xtr, ytr), "val": (Xva, yva), "test": (Xte, yte)}

    t0 = time.perf_counter()
    classes = np.unique(ytr)
    sweep = sweep_C(Xtr, ytr, Xva, yva, Cs, seed, max_iter, solver, backend, storage,
                    cpus_per_trial, name="sweep_all_neurons")
    best = choose_C(sweep)
    model = _fitted(best, classes, seed, max_iter, solver)
    coef, intercept = model.coef_.reshape(-1), float(model.intercept_[0])
    all_res = {"C": best["C"], "nnz": int(np.sum(coef != 0)), "converged": best["converged"],
               **_scores(model, sets), "seconds": round(time.perf_counter() - t0, 3)}
    if all_res["nnz"] == 0:
        log("warning: the chosen C zeroes every weight; the top neurons below are arbitrary")

    k = min(num_neurons, len(coef))
    neurons = top_neurons(coef, k)
    t0 = time.perf_counter()
    top_sets = {r: (None if X is None else X[:, neurons], y) for r, (X, y) in sets.items()}
    # A k-neuron fit takes milliseconds: Tune's per-trial overhead would dominate.
    top_sweep = sweep_C(top_sets["train"][0], ytr, top_sets["val"][0], yva, Cs, seed, max_iter,
                        solver, backend="local")
    top_best = choose_C(top_sweep)
    top_model = _fitted(top_best, classes, seed, max_iter, solver)
    top_res = {"neurons": neurons, "weights": [float(coef[n]) for n in neurons],
               "signs": [1 if coef[n] >= 0 else -1 for n in neurons],
               "C": top_best["C"], "coef": [float(v) for v in top_model.coef_.reshape(-1)],
               "intercept": float(top_model.intercept_[0]), "converged": top_best["converged"],
               **_scores(top_model, top_sets), "seconds": round(time.perf_counter() - t0, 3)}
    top_coef, top_intercept = top_model.coef_.reshape(-1), float(top_model.intercept_[0])
    if standardize:  # w.(x - mu)/sigma + b == (w/sigma).x + (b - sum(w mu/sigma))
        intercept -= float(np.sum(coef * mu / sigma))
        coef = coef / sigma
        top_intercept -= float(np.sum(top_coef * mu[neurons] / sigma[neurons]))
        top_coef = top_coef / sigma[neurons]
    clf = fit_result_to_classifier(coef, intercept, best["C"], neurons, top_coef,
                                   top_intercept, top_best["C"], feature_kind, layer,
                                   checkpoint)
    # The sweeps' weights live on in the two chosen models; the results stay small.
    def scores_only(rows):
        return [{k: v for k, v in r.items() if k not in ("coef", "intercept")} for r in rows]

    results = {"all_neurons": all_res, "top_neurons": top_res, "sweep": scores_only(sweep),
               "top_sweep": scores_only(top_sweep), "C_grid": Cs}
    return clf, results


# --- report, plots, outputs ------------------------------------------------------------------

def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def format_report(results: dict) -> str:
    a, t = results["all_neurons"], results["top_neurons"]
    k = len(t["neurons"])
    lines = [f"all neuron regression took {a['seconds']} seconds",
             f"{_pct(a['train_acc'])}, {_pct(a['val_acc'])}, {_pct(a['test_acc'])} "
             f"train, val, test accuracy for all neuron regression",
             f"{a['C']:g} regularization coefficient used",
             f"{a['nnz']} features used in all neuron regression", "",
             f"using neuron(s) {', '.join(str(n) for n in t['neurons'])} as features for regression"]
    for n, w in zip(t["neurons"], t["weights"]):
        lines.append(f"  neuron {n}: weight {w:+.4f} "
                     f"({'positive' if w >= 0 else 'negative'} sentiment)")
    lines += [f"{k} neuron regression took {t['seconds']} seconds",
              f"{_pct(t['train_acc'])}, {_pct(t['val_acc'])}, {_pct(t['test_acc'])} "
              f"train, val, test accuracy for {k} neuron regression",
              f"{t['C']:g} regularization coefficient used"]
    for name, r in (("all neuron", a), (f"{k} neuron", t)):
        if not r["converged"]:
            lines.append(f"note: the {name} regression stopped at max_iter before converging "
                         f"(raise --max_iter, or try --solver saga)")
    return "\n".join(lines)


def write_tune_csv(path: Path, rows: Sequence[dict], chosen_C: float) -> None:
    cols = ["C", "val_acc", "train_acc", "nnz", "converged", "fit_s", "trial_id", "chosen"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "chosen": int(r["C"] == chosen_C)})


def plot_neuron_weights(path: Path, coef: np.ndarray, neurons: Sequence[int], C: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coef = np.asarray(coef).reshape(-1)
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.vlines(np.arange(len(coef)), 0, coef, color="0.6", linewidth=0.8)
    ax.axhline(0, color="0.3", linewidth=0.5)
    for rank, n in enumerate(neurons):
        ax.plot([n], [coef[n]], "o", color="crimson" if coef[n] >= 0 else "navy")
        ax.annotate(f"{n}", (n, coef[n]), textcoords="offset points", xytext=(4, 4 if
                    coef[n] >= 0 else -12), fontsize=8)
    ax.set_xlabel("neuron (feature) index")
    ax.set_ylabel("L1 logistic regression weight")
    ax.set_title(f"Neuron weights (C={C:g}, {int(np.sum(coef != 0))} non-zero); "
                 f"top {len(neurons)} highlighted")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_neuron_histogram(path: Path, values: np.ndarray, labels: np.ndarray, neuron: int,
                          boundary: Optional[float], split: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.histogram_bin_edges(values, bins=30)
    ax.hist(values[labels == 0], bins=bins, alpha=0.55, color="navy", label="negative")
    ax.hist(values[labels == 1], bins=bins, alpha=0.55, color="crimson", label="positive")
    if boundary is not None and np.isfinite(boundary):
        ax.axvline(boundary, color="black", linestyle="--", label=f"decision boundary {boundary:.3g}")
    ax.set_xlabel(f"neuron {neuron} value")
    ax.set_ylabel("texts per bin")
    ax.set_title(f"Neuron {neuron} on {split}, by label")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def single_neuron_boundary(X: np.ndarray, y: np.ndarray, neuron: int, C: float, seed: int,
                           max_iter: int, solver: str) -> Optional[float]:
    """Value of ``neuron`` where a one-neuron regression flips class (None if its weight is 0)."""
    model, _ = fit_l1(X[:, [neuron]], y, C, seed, max_iter, solver)
    w, b = float(model.coef_[0, 0]), float(model.intercept_[0])
    return None if w == 0 else -b / w


def write_results_csv(path: Path, texts, labels, feats: np.ndarray, clf: Classifier,
                      coef: np.ndarray) -> None:
    """Per sample: P(positive) with all neurons, with the top neurons, top-5 neuron values."""
    five = top_neurons(coef, min(5, len(coef)))
    p_all, p_top = clf.predict_proba(feats), clf.predict_proba_top(feats)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text"] + (["label"] if labels is not None else []) +
                   ["prob_all", f"prob_top{len(clf.neurons)}"] + [f"neuron_{n}" for n in five])
        for i, text in enumerate(texts):
            w.writerow([text] + ([int(labels[i])] if labels is not None else []) +
                       [f"{p_all[i]:.6f}", f"{p_top[i]:.6f}"] +
                       [f"{feats[i, n]:.6f}" for n in five])


def output_dir(cfg: TransferConfig) -> Path:
    name = cfg.dataset or Path(cfg.train).resolve().parent.name or "dataset"
    return Path(cfg.experiment_dir) / cfg.experiment_name / "transfer" / name


def run_transfer(cfg: TransferConfig, log=print) -> dict:
    """The whole transfer job; returns results (also written to results.json)."""
    from sentdisc.checkpoint import load, read_meta

    if not cfg.load_model:
        raise TransferError("--load_model is required (a checkpoint directory)")
    t_start = time.perf_counter()
    model = load(cfg.load_model)  # fail on a bad checkpoint before reading any data
    n_layers = len(model.layers)
    if not -n_layers <= cfg.layer < n_layers:
        raise TransferError(f"--layer {cfg.layer} out of range for the {n_layers}-layer "
                            f"model in {cfg.load_model}")
    data = prepare_data(cfg)
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    log(f"writing results to {out}")
    sizes = {r: (len(data[r]) if data[r] is not None else 0) for r in ("train", "val", "test")}
    log(f"train {sizes['train']}, val {sizes['val']} ({data['val_source']}), test {sizes['test']}"
        f" texts; features: layer {cfg.layer} {cfg.feature_kind}, rnn_size {model.config.rnn_size}")

    feats, feat_stats = {}, {}
    for role in ("train", "val", "test"):
        if data[role] is None:
            feats[role] = None
            continue
        log(f"transforming {role}")
        feats[role], feat_stats[role] = featurize_texts(data[role].texts, cfg, model, role, log)
    labels = {r: (data[r].labels if data[r] is not None else None) for r in ("train", "val", "test")}
    if cfg.no_test_eval:
        labels["test"] = None

    Cs = c_grid(cfg.num_samples, cfg.seed)
    log(f"sweeping C over {len(Cs)} values with Ray Tune: {', '.join(f'{c:.4g}' for c in Cs)}")
    clf, res = train_classifier(
        feats["train"], labels["train"], feats["val"], labels["val"], feats["test"],
        labels["test"], cfg.num_neurons, Cs, cfg.seed, cfg.max_iter, cfg.solver, "tune",
        out / "tune_runs", cfg.cpus_per_trial, cfg.feature_kind, cfg.layer,
        str(Path(cfg.load_model).resolve()), log, cfg.standardize)
    for r in res["sweep"]:
        log(f"  C={r['C']:<10.4g} val {100 * r['val_acc']:.2f}  train {100 * r['train_acc']:.2f}"
            f"  non-zero {r['nnz']}{'' if r['converged'] else '  (not converged)'}")
    log(format_report(res))

    # Outputs.
    files = {"results": out / "results.json", "classifier": out / "classifier.json",
             "tune_results": out / "tune_results.csv", "neuron_weights": out / "neuron_weights.png",
             "neuron_histogram": out / "neuron_histogram.png"}
    write_tune_csv(files["tune_results"], res["sweep"], res["all_neurons"]["C"])
    plot_neuron_weights(files["neuron_weights"], clf.coef, clf.neurons, clf.C)
    hist_role = "test" if labels["test"] is not None else "val"
    boundary = single_neuron_boundary(feats["train"], labels["train"], clf.neuron,
                                      res["top_neurons"]["C"], cfg.seed, cfg.max_iter, cfg.solver)
    plot_neuron_histogram(files["neuron_histogram"], feats[hist_role][:, clf.neuron],
                          labels[hist_role], clf.neuron, boundary, hist_role)
    if cfg.write_results:
        role = "test" if feats["test"] is not None else "val"
        files["write_results"] = Path(cfg.write_results)
        write_results_csv(files["write_results"], data[role].texts, labels[role], feats[role],
                          clf, clf.coef)
        log(f"wrote per-sample {role} results to {cfg.write_results}")

    ckpt_meta = read_meta(cfg.load_model) if (Path(cfg.load_model) / "config.json").exists() else {}
    results = {
        "dataset": out.name, "checkpoint": str(Path(cfg.load_model).resolve()),
        "model": ckpt_meta.get("model", model.config.to_dict()),
        "feature_kind": cfg.feature_kind, "layer": cfg.layer,
        "rnn_size": model.config.rnn_size, "sizes": sizes, "val_source": data["val_source"],
        "dropped": {r: data[r].dropped for r in ("train", "val", "test") if data[r] is not None},
        "rating_midpoint": data["rating_midpoint"], "no_test_eval": cfg.no_test_eval,
        "all_neurons": res["all_neurons"], "top_neurons": res["top_neurons"],
        "neuron": clf.neuron, "sign": clf.sign, "histogram_boundary": boundary,
        "sweep": res["sweep"], "top_sweep": res["top_sweep"], "C_grid": res["C_grid"],
        "featurize": feat_stats, "seconds": round(time.perf_counter() - t_start, 3),
        "files": {k: str(v) for k, v in files.items()}, "config": asdict(cfg),
    }
    clf.meta = {"dataset": out.name, "accuracy": {
        "all": {k: res["all_neurons"][f"{k}_acc"] for k in ("train", "val", "test")},
        "top": {k: res["top_neurons"][f"{k}_acc"] for k in ("train", "val", "test")}}}
    clf.save(files["classifier"])
    tmp = files["results"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, files["results"])
    log(f"results successfully written to {out}")
    return results
