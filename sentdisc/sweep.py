"""The L1 sweep: which C, which neurons, and the classifier they make.

Each C of a grid is fit on train and scored on validation (never test), one Ray Tune trial
per C or all in process; the best C's fit is kept (ties go to the smaller, sparser C). Binary
classifiers are chosen by validation accuracy, the other kinds by macro-F1. The label kind
decides the model: one L1 logistic regression (binary), a multinomial one (multiclass, FISTA
by default, see ``fit_multinomial_l1``), or one per label (multilabel). The neurons are ranked
by |weight| (per label for the multi kinds), and a second regression, its C swept on
validation too, is fit on the top ``num_neurons`` only.
With ``standardize`` the regressions see train-standardized features (neurons then compete on
equal terms under L1) and the scaling is folded back into the saved weights, so the
``Classifier`` takes raw features; it keeps the per-neuron std (``feature_scale``) the neurons
were ranked by. Every score here comes from the ``Classifier`` the weights
make, so the sweep, the report and serving label texts by one rule.

Importing this module does not import torch, so a Tune trial worker pays only for numpy and
sklearn.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sentdisc.classifier import SENTIMENT, Classifier, fit_result_to_classifier, rank_neurons
from sentdisc.errors import Interrupted
from sentdisc.metrics import SELECTION, classification_metrics
from sentdisc.runtime import ensure_ray

BACKENDS = ("tune", "local")


def c_grid(num_samples: int = 0, seed: int = 42, low_exp: int = -8, high_exp: int = 1) -> list:
    """The paper's grid 2^low..2^high, or ``num_samples`` values log-uniform in that range."""
    if num_samples <= 0:
        return [float(2.0 ** e) for e in range(low_exp, high_exp + 1)]
    rng = np.random.default_rng(seed)
    return sorted(float(2.0 ** x) for x in rng.uniform(low_exp, high_exp, num_samples))


@dataclass
class SweepConfig:
    """How to sweep and fit; transfer builds one from its flags, a benchmark by hand."""
    Cs: list[float] = field(default_factory=c_grid)  # the L1 strengths to try
    seed: int = 42                # the solvers' random_state
    max_iter: int = 0             # solver iterations per fit (0: the solver's MAX_ITER)
    solver: str = "liblinear"     # liblinear | saga | fista, all L1 (multiclass: fista or saga;
                                  # fista: multiclass only)
    backend: str = "tune"         # tune: a Ray Tune trial per C; local: in process
    storage: Path | None = None   # where Tune keeps its trials (None: a temporary folder,
                                  # removed when the sweep ends)
    cpus_per_trial: float = 1.0
    standardize: bool = False     # fit on train-standardized features (see the module doc)
    num_neurons: int = 1          # top neurons for the small classifier (per label)
    label_kind: str = "binary"
    labels: Sequence[str] = SENTIMENT

    def __post_init__(self):
        self.Cs = [float(c) for c in self.Cs]
        self.labels = [str(v) for v in self.labels]
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.solver not in MAX_ITER:
            raise ValueError(f"solver must be one of {tuple(MAX_ITER)}, got {self.solver!r}")
        if self.label_kind == "multiclass" and self.solver == "liblinear":
            raise ValueError("liblinear fits multi-class as one-vs-rest; the multinomial L1 "
                             "regression needs fista or saga (or auto)")
        if self.solver == "fista" and self.label_kind != "multiclass":
            raise ValueError("fista fits the multinomial model, multiclass labels only (use "
                             "liblinear, saga or auto)")
        self.max_iter = self.max_iter or MAX_ITER[self.solver]

    @property
    def metric(self) -> str:
        """The validation number C is chosen by (sentdisc.metrics.SELECTION)."""
        return {"accuracy": "val_acc", "macro_f1": "val_macro_f1"}[SELECTION[self.label_kind]]


# --- one L1 logistic regression ----------------------------------------------------------------

# Iterations per fit when none are asked for: liblinear and saga count passes over the data
# (sklearn's default), fista full-gradient steps, each also one pass (two products with X).
MAX_ITER = {"liblinear": 100, "saga": 100, "fista": 10000}

def _l1_logreg(C: float, seed: int, max_iter: int, solver: str):
    from sklearn.linear_model import LogisticRegression

    # l1_ratio=1 is L1 (sklearn >= 1.8, where 'penalty' is deprecated).
    return LogisticRegression(C=C, l1_ratio=1.0, solver=solver, max_iter=max_iter,
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


def fit_multinomial_l1(X: np.ndarray, y: np.ndarray, num_classes: int, C: float,
                       max_iter: int = MAX_ITER["fista"], tol: float = 1e-4):
    """The multinomial L1 logistic regression, sklearn's objective (C * summed cross entropy
    + |W|_1, intercepts free), by FISTA with adaptive restart (Beck & Teboulle 2009; O'Donoghue
    & Candes 2015). Returns (coef [K, H], intercept [K], converged).

    Why not sklearn's saga, its one multinomial L1 solver: mean hidden states are strongly
    correlated (Amazon-Blitzer's 4 categories, mLSTM-256: condition number ~18,000) and saga's
    step is set by the longest row (one text 75x the mean squared norm), so it had not
    converged after 3,000 passes (147 s for one C; 100 passes leave val macro-F1 5 points
    lower). FISTA takes full-gradient steps of 1/L, L bounding the loss's curvature, and got a
    lower objective in 2,000 steps (4 s). Converged: no weight moved by more than ``tol`` of
    the largest one in a step, sklearn's saga criterion."""
    n, h = X.shape
    X = np.ascontiguousarray(X, dtype=np.float32)  # the products; the iterates stay float64
    onehot = np.zeros((n, num_classes))
    onehot[np.arange(n), y] = 1
    lam = 1.0 / (C * n)  # the objective divided by C * n: mean cross entropy + lam |W|_1
    # The mean cross entropy's Hessian is at most 1/2 [X 1]'[X 1] / n in norm, and
    # |[X 1]|^2 <= |X|^2 + n. |X|^2 is the top eigenvalue of the [H, H] Gram matrix: one
    # product, not an SVD of (a float64 copy of) the [N, H] features.
    top = np.linalg.eigvalsh((X.T @ X).astype(np.float64))[-1] * (1 + 1e-6)
    step = n / (0.5 * (top + n))
    W, b = np.zeros((h, num_classes)), np.zeros(num_classes)
    Wy, by, t = W, b, 1.0  # the extrapolated point the gradient is taken at
    for _ in range(max_iter):
        Z = X @ Wy.astype(np.float32) + by
        P = np.exp(Z - Z.max(1, keepdims=True))
        P = P / P.sum(1, keepdims=True) - onehot  # n * d(mean cross entropy)/dZ
        Wn = Wy - step / n * (X.T @ P.astype(np.float32))
        Wn = np.sign(Wn) * np.maximum(np.abs(Wn) - step * lam, 0.0)  # L1's proximal step
        bn = by - step / n * P.sum(0)
        if np.sum((Wy - Wn) * (Wn - W)) + (by - bn) @ (bn - b) > 0:
            t = 1.0  # the momentum points uphill: restart it
        t_next = (1 + np.sqrt(1 + 4 * t * t)) / 2
        change = max(np.abs(Wn - W).max(), np.abs(bn - b).max())
        Wy = Wn + (t - 1) / t_next * (Wn - W)
        by = bn + (t - 1) / t_next * (bn - b)
        W, b, t = Wn, bn, t_next
        if change <= tol * max(np.abs(W).max(), np.abs(b).max()):
            return W.T.copy(), b, True
    return W.T.copy(), b, False


def fit_weights(X, y, C: float, kind: str, seed: int = 42, max_iter: int = 100,
                solver: str = "liblinear") -> tuple[np.ndarray, np.ndarray, bool]:
    """(coef [K', H], intercept [K'], converged) of the ``kind``'s L1 model: K' = 1 for
    binary, K for multiclass (multinomial), one regression per label for multilabel."""
    if solver == "fista":  # classes are indices 0..K-1, every one present in train
        return fit_multinomial_l1(X, y, int(np.max(y)) + 1, C, max_iter)
    if kind == "multilabel":
        fits = [fit_l1(X, y[:, k], C, seed, max_iter, solver) for k in range(y.shape[1])]
        return (np.stack([m.coef_[0] for m, _ in fits]),
                np.array([m.intercept_[0] for m, _ in fits]), all(ok for _, ok in fits))
    model, converged = fit_l1(X, y, C, seed, max_iter, solver)
    coef, intercept = model.coef_, model.intercept_
    if kind == "multiclass" and coef.shape[0] == 1:
        # sklearn fits two classes as one logit z even when multinomial; softmax([-z/2, z/2])
        # is the same model with one row per class
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.r_[-intercept / 2,
                                                                      intercept / 2]
    return coef, intercept, converged


def as_classifier(coef, intercept, kind: str, labels) -> Classifier:
    """Fitted weights as a bare Classifier, to be scored by its own rules."""
    return Classifier(coef=coef, intercept=intercept, label_kind=kind, labels=list(labels))


def scores(clf: Classifier, X, y) -> dict:
    """Accuracy and macro-F1 of ``clf`` on (X, y), decided by the classifier."""
    m = classification_metrics(clf.label_kind, clf.labels, y, clf.predict(X), clf.label_proba(X))
    return {"acc": m["accuracy"], "macro_f1": m["macro_f1"]}


def evaluate_C(Xtr, ytr, Xva, yva, C: float, seed: int = 42, max_iter: int = 100,
               solver: str = "liblinear", kind: str = "binary", labels=SENTIMENT) -> dict:
    """One sweep point: fit on train, score on validation (never test)."""
    t0 = time.perf_counter()
    coef, intercept, converged = fit_weights(Xtr, ytr, C, kind, seed, max_iter, solver)
    clf = as_classifier(coef, intercept, kind, labels)
    val, train = scores(clf, Xva, yva), scores(clf, Xtr, ytr)
    return {"C": float(C), "val_acc": val["acc"], "train_acc": train["acc"],
            "val_macro_f1": val["macro_f1"], "train_macro_f1": train["macro_f1"],
            "nnz": int(np.sum(np.any(coef != 0, axis=0))), "converged": bool(converged),
            "fit_s": round(time.perf_counter() - t0, 3), "coef": coef.tolist(),
            "intercept": intercept.tolist()}


# --- the sweep over C ----------------------------------------------------------------------------

ROW_KEYS = ("C", "val_acc", "train_acc", "val_macro_f1", "train_macro_f1", "nnz", "converged",
            "fit_s", "coef", "intercept")


def _tune_trial(config, Xtr, ytr, Xva, yva, seed, max_iter, solver, kind, labels):
    from ray import tune

    tune.report(evaluate_C(Xtr, ytr, Xva, yva, config["C"], seed, max_iter, solver, kind,
                           labels))


def _sweep_tune(Xtr, ytr, Xva, yva, sweep: SweepConfig, name: str) -> list[dict]:
    ensure_ray(include_dashboard=False)
    scratch = None if sweep.storage else tempfile.mkdtemp(prefix="sentdisc_tune_")
    try:
        return _tune_rows(Xtr, ytr, Xva, yva, sweep, name, Path(sweep.storage or scratch))
    finally:
        if scratch is not None:  # no one asked to keep the trials: leave nothing behind
            shutil.rmtree(scratch, ignore_errors=True)


def _tune_rows(Xtr, ytr, Xva, yva, sweep: SweepConfig, name: str, storage: Path) -> list[dict]:
    from ray import tune

    storage = storage.resolve()
    if (storage / name).exists():
        shutil.rmtree(storage / name)  # a rerun's sweep replaces the old one
    # The feature matrices go to the object store once, not into every trial's closure.
    trainable = tune.with_resources(
        tune.with_parameters(_tune_trial, Xtr=np.ascontiguousarray(Xtr), ytr=ytr,
                             Xva=np.ascontiguousarray(Xva), yva=yva, seed=sweep.seed,
                             max_iter=sweep.max_iter, solver=sweep.solver,
                             kind=sweep.label_kind, labels=list(sweep.labels)),
        {"cpu": sweep.cpus_per_trial})
    tuner = tune.Tuner(
        trainable, param_space={"C": tune.grid_search(sweep.Cs)},
        # Reusing trial actors saves a Python start + sklearn import per trial.
        tune_config=tune.TuneConfig(metric=sweep.metric, mode="max", reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0))
    with _tune_output_to(storage / f"{name}.log"):
        results = tuner.fit()
    rows = []
    for result in results:
        if result.error is not None:
            raise RuntimeError(f"Tune trial C={result.config.get('C')} failed: {result.error}")
        m = result.metrics or {}
        if "C" in m:
            rows.append({k: m[k] for k in ROW_KEYS} | {"trial_id": m.get("trial_id", "")})
    if len(rows) < len(sweep.Cs):  # Tune's Ctrl-C handler ends a sweep with what it has
        raise Interrupted(f"the Ray Tune sweep was stopped (Ctrl-C) with {len(rows)} of "
                          f"{len(sweep.Cs)} values of C fitted; nothing was chosen")
    return rows


@contextlib.contextmanager
def _tune_output_to(log: Path):
    """Ray Tune's own console output during a sweep (its experiment table, result paths and
    INFO lines, printed even at ``verbose=0``) and its trials' output go to ``log``; Tune's
    warnings still print. The job prints the sweep itself, one line per C."""
    log.parent.mkdir(parents=True, exist_ok=True)
    tune_logger = logging.getLogger("ray.tune")
    saved = tune_logger.handlers[:], tune_logger.propagate
    terminal = sys.stderr
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        to_file, to_terminal = logging.StreamHandler(f), logging.StreamHandler(terminal)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        to_terminal.setLevel(logging.WARNING)
        tune_logger.handlers, tune_logger.propagate = [to_file, to_terminal], False
        try:
            yield
        finally:
            tune_logger.handlers, tune_logger.propagate = saved


def sweep_C(Xtr, ytr, Xva, yva, sweep: SweepConfig, name: str = "sweep") -> list[dict]:
    """Score each of ``sweep.Cs`` on validation: one Ray Tune trial per C (run in parallel),
    or in process; rows sorted by C, each with the fit's weights."""
    if sweep.backend == "tune":
        rows = _sweep_tune(Xtr, ytr, Xva, yva, sweep, name)
    else:
        rows = [evaluate_C(Xtr, ytr, Xva, yva, c, sweep.seed, sweep.max_iter, sweep.solver,
                           sweep.label_kind, sweep.labels) for c in sweep.Cs]
    return sorted(rows, key=lambda r: r["C"])


def choose_C(rows: Sequence[dict], metric: str = "val_acc") -> dict:
    """Best on validation (``metric``); ties go to the smaller C (the sparser model)."""
    return min(rows, key=lambda r: (-r[metric], r["C"]))


# --- the classifier: all neurons, then the top ones ---------------------------------------------

@dataclass
class _Scaling:
    """Train's per-feature mean and spread, and how to fold them into fitted weights."""
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def of(cls, X: np.ndarray) -> _Scaling:
        std = X.std(0, dtype=np.float64)
        std[std < 1e-8] = 1.0  # a constant feature stays as it is (its weight goes to 0)
        return cls(X.mean(0, dtype=np.float64), std)

    def apply(self, X: np.ndarray | None) -> np.ndarray | None:
        return None if X is None else ((X - self.mean) / self.std).astype(np.float32)

    def fold(self, coef: np.ndarray, intercept: np.ndarray, columns=slice(None)):
        """Weights [K', n] on scaled ``columns`` -> the same function of raw ones:
        w.(x - mu)/sigma + b == (w/sigma).x + (b - sum(w mu/sigma))."""
        mean, std = self.mean[columns], self.std[columns]
        return coef / std, intercept - np.sum(coef * mean / std, axis=-1)


class _Fit(NamedTuple):
    rows: list      # the sweep, one row per C
    best: dict      # the chosen row
    model: Classifier  # its weights, as a classifier of (possibly scaled) features
    scores: dict    # {role}_acc and {role}_macro_f1 of the chosen model (None without labels)
    seconds: float

    @property
    def coef(self) -> np.ndarray:
        return np.atleast_2d(self.model.coef)

    @property
    def intercept(self) -> np.ndarray:
        return np.atleast_1d(self.model.intercept)


def _sweep_and_fit(sets: dict, sweep: SweepConfig, name: str) -> _Fit:
    """Sweep C on sets["train"] / sets["val"], keep the best, score it on every set."""
    t0 = time.perf_counter()
    rows = sweep_C(*sets["train"], *sets["val"], sweep, name=name)
    best = choose_C(rows, sweep.metric)
    model = as_classifier(best["coef"], best["intercept"], sweep.label_kind, sweep.labels)
    measured = {}
    for role, (X, y) in sets.items():
        got = scores(model, X, y) if X is not None and y is not None else {}
        measured.update({f"{role}_acc": got.get("acc"), f"{role}_macro_f1": got.get("macro_f1")})
    return _Fit(rows, best, model, measured, round(time.perf_counter() - t0, 3))


def _scores_only(rows: list[dict]) -> list[dict]:
    """Sweep rows without their weights: those live on in the two chosen models, and the
    results stay small."""
    return [{k: v for k, v in r.items() if k not in ("coef", "intercept")} for r in rows]


def _results(all_fit: _Fit, top_fit: _Fit, clf: Classifier, sweep: SweepConfig) -> dict:
    coef = all_fit.coef
    all_res = {"C": all_fit.best["C"], "nnz": int(np.sum(np.any(coef != 0, axis=0))),
               "converged": all_fit.best["converged"], **all_fit.scores,
               "seconds": all_fit.seconds}
    neurons = clf.neurons
    row = {lab: i for i, lab in enumerate(sweep.labels)}
    serves = clf.neuron_labels or [None] * len(neurons)
    weights = [float(coef[0 if lab is None else row[lab], n]) for n, lab in zip(
        neurons, serves, strict=True)]
    top_res = {"neurons": neurons, "weights": weights, "signs": clf.signs,
               "C": top_fit.best["C"], "coef": top_fit.model.coef.tolist(),
               "intercept": _number_or_list(top_fit.model.intercept),
               "converged": top_fit.best["converged"], **top_fit.scores,
               "seconds": top_fit.seconds}
    if sweep.label_kind != "binary":
        top_res["labels"] = clf.neuron_labels
        top_res["by_label"] = {lab: [{"neuron": n, "weight": float(coef[row[lab], n])}
                                     for n, _ in clf.neurons_of(lab)] for lab in sweep.labels}
    return {"all_neurons": all_res, "top_neurons": top_res, "sweep": _scores_only(all_fit.rows),
            "top_sweep": _scores_only(top_fit.rows), "C_grid": sweep.Cs,
            "selection_metric": sweep.metric, "labels": list(sweep.labels),
            "label_kind": sweep.label_kind, "solver": sweep.solver, "max_iter": sweep.max_iter}


def _number_or_list(v):
    a = np.asarray(v, dtype=np.float64)
    return float(a) if a.ndim == 0 else a.tolist()


def _raw_feature_classifier(all_fit: _Fit, top_fit: _Fit, ranked: tuple,
                            scaling: _Scaling | None, sweep: SweepConfig, feature_kind: str,
                            layer: int, checkpoint: str) -> Classifier:
    neurons, _, serves = ranked
    coef, intercept = all_fit.coef, all_fit.intercept
    top_coef, top_intercept = top_fit.coef, top_fit.intercept
    if scaling is not None:
        coef, intercept = scaling.fold(coef, intercept)
        top_coef, top_intercept = scaling.fold(top_coef, top_intercept, neurons)
    # feature_scale: the neurons were ranked on the standardized weights, coef * std; the
    # classifier keeps std so that it ranks them the same way (``Classifier.top_neuron_of``)
    return fit_result_to_classifier(coef, intercept, all_fit.best["C"], neurons, top_coef,
                                    top_intercept, top_fit.best["C"], feature_kind, layer,
                                    checkpoint, label_kind=sweep.label_kind,
                                    labels=sweep.labels, neuron_labels=serves,
                                    feature_scale=None if scaling is None else scaling.std)


def train_classifier(Xtr, ytr, Xva, yva, Xte=None, yte=None, sweep: SweepConfig | None = None,
                     *, feature_kind: str = "cell", layer: int = -1, checkpoint: str = "",
                     log=print) -> tuple[Classifier, dict]:
    """Sweep C on all neurons, keep the best fit, pick the top neurons (per label for the
    multi kinds), sweep C on them.

    y: class indices [N] (binary, multiclass) or 0/1 [N, K] (multilabel), as ``sweep``'s
    label_kind says. feature_kind, layer and checkpoint say what the features are; the
    Classifier records them. Returns the Classifier (on raw features) and a results dict
    (scores, Cs, sweeps, top neurons).
    """
    sweep = sweep or SweepConfig()
    scaling = _Scaling.of(Xtr) if sweep.standardize else None
    sets = {"train": (Xtr, ytr), "val": (Xva, yva), "test": (Xte, yte)}
    if scaling is not None:
        sets = {role: (scaling.apply(X), y) for role, (X, y) in sets.items()}
    all_fit = _sweep_and_fit(sets, sweep, "sweep_all_neurons")
    if not np.any(all_fit.coef != 0):
        log("warning: the chosen C zeroes every weight; the top neurons below are arbitrary")
    coef = all_fit.model.coef
    ranked = rank_neurons(coef, min(sweep.num_neurons, coef.shape[-1]), sweep.labels)
    neurons = ranked[0]
    top_sets = {role: (None if X is None else X[:, neurons], y) for role, (X, y) in sets.items()}
    # A k-neuron fit takes milliseconds: Tune's per-trial overhead would dominate.
    top_fit = _sweep_and_fit(top_sets, replace(sweep, backend="local"), "sweep_top_neurons")
    clf = _raw_feature_classifier(all_fit, top_fit, ranked, scaling, sweep, feature_kind, layer,
                                  checkpoint)
    return clf, _results(all_fit, top_fit, clf, sweep)
