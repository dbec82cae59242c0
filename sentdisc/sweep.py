"""The L1 sweep: which C, which neurons, and the classifier they make.

Each C of a grid is fit on train and scored on validation (never test), one Ray Tune trial
per C or all in process; the best C's fit is kept (ties go to the smaller, sparser C). The
neurons are ranked by |weight| and a second regression, its C swept on validation too, is fit
on the top ``num_neurons`` only. With ``standardize`` the regressions see train-standardized
features (neurons then compete on equal terms under L1) and the scaling is folded back into
the saved weights, so the ``Classifier`` takes raw features.

Importing this module does not import torch, so a Tune trial worker pays only for numpy and
sklearn.
"""
from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sentdisc.classifier import Classifier, fit_result_to_classifier
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
    max_iter: int = 100           # solver iterations per fit
    solver: str = "liblinear"     # liblinear | saga: both do L1
    backend: str = "tune"         # tune: a Ray Tune trial per C; local: in process
    storage: Path | None = None   # where Tune keeps its trials (None: a temporary folder)
    cpus_per_trial: float = 1.0
    standardize: bool = False     # fit on train-standardized features (see the module doc)
    num_neurons: int = 1          # top neurons for the small classifier

    def __post_init__(self):
        self.Cs = [float(c) for c in self.Cs]
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")


# --- one L1 logistic regression ----------------------------------------------------------------

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


def _fitted(row: dict, classes: np.ndarray, sweep: SweepConfig):
    """The sweep's own fit at row's C, as a LogisticRegression: refitting on the same train
    set with the same seed would give the same weights, at the cost of the slowest fit."""
    model = _l1_logreg(row["C"], sweep.seed, sweep.max_iter, sweep.solver)
    model.coef_ = np.asarray(row["coef"], dtype=np.float64).reshape(1, -1)
    model.intercept_ = np.array([row["intercept"]], dtype=np.float64)
    model.classes_ = classes
    model.n_features_in_ = model.coef_.shape[1]
    return model


# --- the sweep over C ----------------------------------------------------------------------------

def _tune_trial(config, Xtr, ytr, Xva, yva, seed, max_iter, solver):
    from ray import tune

    tune.report(evaluate_C(Xtr, ytr, Xva, yva, config["C"], seed, max_iter, solver))


def _sweep_tune(Xtr, ytr, Xva, yva, sweep: SweepConfig, name: str) -> list[dict]:
    from ray import tune

    ensure_ray(include_dashboard=False)
    storage = Path(sweep.storage or tempfile.mkdtemp(prefix="sentdisc_tune_")).resolve()
    if (storage / name).exists():
        shutil.rmtree(storage / name)  # a rerun's sweep replaces the old one
    # The feature matrices go to the object store once, not into every trial's closure.
    trainable = tune.with_resources(
        tune.with_parameters(_tune_trial, Xtr=np.ascontiguousarray(Xtr), ytr=ytr,
                             Xva=np.ascontiguousarray(Xva), yva=yva, seed=sweep.seed,
                             max_iter=sweep.max_iter, solver=sweep.solver),
        {"cpu": sweep.cpus_per_trial})
    tuner = tune.Tuner(
        trainable, param_space={"C": tune.grid_search(sweep.Cs)},
        # Reusing trial actors saves a Python start + sklearn import per trial.
        tune_config=tune.TuneConfig(metric="val_acc", mode="max", reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0))
    rows = []
    for result in tuner.fit():
        if result.error is not None:
            raise RuntimeError(f"Tune trial C={result.config.get('C')} failed: {result.error}")
        m = result.metrics
        rows.append({k: m[k] for k in ("C", "val_acc", "train_acc", "nnz", "converged",
                                        "fit_s", "coef", "intercept")}
                    | {"trial_id": m.get("trial_id", "")})
    return rows


def sweep_C(Xtr, ytr, Xva, yva, sweep: SweepConfig, name: str = "sweep") -> list[dict]:
    """Score each of ``sweep.Cs`` on validation: one Ray Tune trial per C (run in parallel),
    or in process; rows sorted by C, each with the fit's weights."""
    if sweep.backend == "tune":
        rows = _sweep_tune(Xtr, ytr, Xva, yva, sweep, name)
    else:
        rows = [evaluate_C(Xtr, ytr, Xva, yva, c, sweep.seed, sweep.max_iter, sweep.solver)
                for c in sweep.Cs]
    return sorted(rows, key=lambda r: r["C"])


def choose_C(rows: Sequence[dict]) -> dict:
    """Best validation accuracy; ties go to the smaller C (the sparser model)."""
    return min(rows, key=lambda r: (-r["val_acc"], r["C"]))


def top_neurons(coef: np.ndarray, k: int) -> list[int]:
    """Indices of the k largest |weights|, largest first (ties: lower index)."""
    coef = np.asarray(coef).reshape(-1)
    return [int(i) for i in np.argsort(-np.abs(coef), kind="stable")[:k]]


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

    def fold(self, coef: np.ndarray, intercept: float, columns=slice(None)):
        """Weights on scaled ``columns`` -> the same function of raw ones:
        w.(x - mu)/sigma + b == (w/sigma).x + (b - sum(w mu/sigma))."""
        mean, std = self.mean[columns], self.std[columns]
        return coef / std, intercept - float(np.sum(coef * mean / std))


class _Fit(NamedTuple):
    rows: list      # the sweep, one row per C
    best: dict      # the chosen row
    model: object   # its LogisticRegression
    scores: dict    # {role}_acc of the chosen model (None where a set or its labels are absent)
    seconds: float

    @property
    def coef(self) -> np.ndarray:
        return self.model.coef_.reshape(-1)

    @property
    def intercept(self) -> float:
        return float(self.model.intercept_[0])


def _sweep_and_fit(sets: dict, classes: np.ndarray, sweep: SweepConfig, name: str) -> _Fit:
    """Sweep C on sets["train"] / sets["val"], keep the best, score it on every set."""
    t0 = time.perf_counter()
    rows = sweep_C(*sets["train"], *sets["val"], sweep, name=name)
    best = choose_C(rows)
    model = _fitted(best, classes, sweep)
    scores = {f"{role}_acc": None if X is None or y is None else _accuracy(model, X, y)
              for role, (X, y) in sets.items()}
    return _Fit(rows, best, model, scores, round(time.perf_counter() - t0, 3))


def _scores_only(rows: list[dict]) -> list[dict]:
    """Sweep rows without their weights: those live on in the two chosen models, and the
    results stay small."""
    return [{k: v for k, v in r.items() if k not in ("coef", "intercept")} for r in rows]


def _results(all_fit: _Fit, top_fit: _Fit, neurons: list[int], sweep: SweepConfig) -> dict:
    coef = all_fit.coef
    all_res = {"C": all_fit.best["C"], "nnz": int(np.sum(coef != 0)),
               "converged": all_fit.best["converged"], **all_fit.scores,
               "seconds": all_fit.seconds}
    top_res = {"neurons": neurons, "weights": [float(coef[n]) for n in neurons],
               "signs": [1 if coef[n] >= 0 else -1 for n in neurons],
               "C": top_fit.best["C"], "coef": [float(v) for v in top_fit.coef],
               "intercept": top_fit.intercept, "converged": top_fit.best["converged"],
               **top_fit.scores, "seconds": top_fit.seconds}
    return {"all_neurons": all_res, "top_neurons": top_res, "sweep": _scores_only(all_fit.rows),
            "top_sweep": _scores_only(top_fit.rows), "C_grid": sweep.Cs}


def _raw_feature_classifier(all_fit: _Fit, top_fit: _Fit, neurons: list[int],
                            scaling: _Scaling | None, feature_kind: str, layer: int,
                            checkpoint: str) -> Classifier:
    coef, intercept = all_fit.coef, all_fit.intercept
    top_coef, top_intercept = top_fit.coef, top_fit.intercept
    if scaling is not None:
        coef, intercept = scaling.fold(coef, intercept)
        top_coef, top_intercept = scaling.fold(top_coef, top_intercept, neurons)
    return fit_result_to_classifier(coef, intercept, all_fit.best["C"], neurons, top_coef,
                                    top_intercept, top_fit.best["C"], feature_kind, layer,
                                    checkpoint)


def train_classifier(Xtr, ytr, Xva, yva, Xte=None, yte=None, sweep: SweepConfig | None = None,
                     *, feature_kind: str = "cell", layer: int = -1, checkpoint: str = "",
                     log=print) -> tuple[Classifier, dict]:
    """Sweep C on all neurons, keep the best fit, pick the top neurons, sweep C on them.

    feature_kind, layer and checkpoint say what the features are; the Classifier records
    them. Returns the Classifier (on raw features) and a results dict (accuracies, Cs,
    sweeps, top neurons).
    """
    sweep = sweep or SweepConfig()
    scaling = _Scaling.of(Xtr) if sweep.standardize else None
    sets = {"train": (Xtr, ytr), "val": (Xva, yva), "test": (Xte, yte)}
    if scaling is not None:
        sets = {role: (scaling.apply(X), y) for role, (X, y) in sets.items()}
    classes = np.unique(ytr)
    all_fit = _sweep_and_fit(sets, classes, sweep, "sweep_all_neurons")
    if not np.any(all_fit.coef != 0):
        log("warning: the chosen C zeroes every weight; the top neurons below are arbitrary")
    neurons = top_neurons(all_fit.coef, min(sweep.num_neurons, len(all_fit.coef)))
    top_sets = {role: (None if X is None else X[:, neurons], y) for role, (X, y) in sets.items()}
    # A k-neuron fit takes milliseconds: Tune's per-trial overhead would dominate.
    top_fit = _sweep_and_fit(top_sets, classes, replace(sweep, backend="local"),
                             "sweep_top_neurons")
    clf = _raw_feature_classifier(all_fit, top_fit, neurons, scaling, feature_kind, layer,
                                  checkpoint)
    return clf, _results(all_fit, top_fit, neurons, sweep)


def single_neuron_boundary(X: np.ndarray, y: np.ndarray, neuron: int, C: float,
                           sweep: SweepConfig) -> float | None:
    """Value of ``neuron`` where a one-neuron regression flips class (None if its weight is 0)."""
    model, _ = fit_l1(X[:, [neuron]], y, C, sweep.seed, sweep.max_iter, sweep.solver)
    w, b = float(model.coef_[0, 0]), float(model.intercept_[0])
    return None if w == 0 else -b / w
