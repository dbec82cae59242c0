"""The driver of a fine-tuning run: check the inputs, fit on Ray Train, evaluate, write outputs.

Composed of the pieces the other jobs use: transfer's labeled sets (``sentdisc.labeled``, every
label checked before anything starts), pretraining's Train job (``sentdisc.train.driver``:
resume, the progress channel, history.csv, loss.png, MLflow, checkpoint_final), and transfer's
evaluation and report (``sentdisc.transfer``: featurize, the classifier's metrics, the plots,
the extreme samples). Outputs go to ``<experiment_dir>/<experiment_name>/finetune/<dataset>/``:
Ray Train's checkpoints, ``checkpoint_final`` (the best validation's weights with their
``classifier.json``: ``serve run ... checkpoint=`` and ``sentdisc score --load_model`` take it
as it is), ``classifier.json``, ``results.json``, ``history.csv``, ``loss.png`` and the plots.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

from sentdisc import checkpoint as ckpt_io
from sentdisc import storage
from sentdisc.classifier import Classifier
from sentdisc.config import OutputConfig
from sentdisc.errors import InputError
from sentdisc.finetune.config import FinetuneConfig
from sentdisc.labeled import prepare_data
from sentdisc.report import metrics_lines, read_history
from sentdisc.runtime import ensure_ray
from sentdisc.tracking import CHECKPOINT_TAG, TrackingConfig, finetune_tracker
from sentdisc.train.config import TrainConfig
from sentdisc.train.driver import TrainJob, checked_output, prior_history, resumed
from sentdisc.train.resources import check_fits
from sentdisc.transfer import (
    featurize_sets,
    label_fields,
    output_dir,
    shown_split,
    split_metrics,
    tracked_metrics,
    write_extremes,
    write_outputs,
)

PREFIX = "[finetune]"
SCORE = "val_score"  # what Ray Train keeps checkpoints by (FinetuneWorker.validate reports it)


def finetune(cfg: FinetuneConfig, train_cfg: TrainConfig, output: Optional[OutputConfig] = None,
             tracking: Optional[TrackingConfig] = None, progress: bool = True,
             log=print) -> dict:
    """Fine-tune ``cfg.load_model`` with a classifier head on the labeled sets, on the current
    Ray cluster (started locally if none); returns results (also in results.json)."""
    t0 = time.perf_counter()
    if train_cfg.cuda_graph == "on":
        raise InputError("--cuda_graph on: fine-tuning's batches are texts of varying lengths, "
                         "which a CUDA graph cannot replay (auto or off run them eagerly)")
    base, model_cfg = _base_checkpoint(cfg)
    data = prepare_data(cfg)  # every label checked: a bad one stops the run here
    output = checked_output(output or OutputConfig())
    run_dir = output_dir(cfg, output, "finetune")
    tc = resumed(train_cfg, run_dir, PREFIX)
    spec, dataset = data["spec"], storage.basename(run_dir)
    _check_continues(tc.resume, spec, cfg, base)
    prior = prior_history(run_dir, tc.resume)
    log(f"{PREFIX} labels: {spec.describe()}")
    tracker = finetune_tracker(tracking, output, run_dir, dataset, base, bool(tc.resume), prior)
    ensure_ray(include_dashboard=False, log_to_driver=False)
    check_fits(tc)
    job = _job(cfg, tc, output, run_dir, base, model_cfg, data)
    log(f"{PREFIX} train {len(data['train'])}, val {len(data['val'])} ({data['val_source']}) "
        f"texts; {job.loop_config['total_iters']} iterations of {tc.batch_size} texts on "
        f"{tc.num_workers} worker(s), from {base}")
    with tracker:
        summary = job.run(prior, tracker, progress)
        final = summary["checkpoint"] or _earlier_final(run_dir)
        # scored as served: featurize with training's precision request (auto decides for this
        # machine, as a server on it would; fp16 is GPU training's, its products are bf16's)
        precision = "bf16" if tc.precision == "fp16" else tc.precision
        results = evaluate(final, cfg, data, run_dir, summary, precision, log)
        results.update(base_checkpoint=base, seconds=round(time.perf_counter() - t0, 3),
                       config={**dataclasses.asdict(cfg), **dataclasses.asdict(tc),
                               **dataclasses.asdict(output)})
        storage.write_json(results["files"]["results"], results, indent=1)
        tracker.log_result(tracked_metrics(results), {
            CHECKPOINT_TAG: final, "sentdisc.label_kind": spec.kind,
            "sentdisc.neuron": results["neuron"]},
            {**job.artifacts(summary), **{storage.basename(f): f
                                          for f in results["files"].values()}})
    log(f"{PREFIX} results written to {run_dir}")
    return results


def _base_checkpoint(cfg: FinetuneConfig):
    """The checkpoint fine-tuning starts from, resolved ("openai") and checked, and its
    model config."""
    if not cfg.load_model:
        raise InputError("--load_model is required (the pretrained checkpoint to fine-tune)")
    base = storage.absolute(str(ckpt_io.resolve(cfg.load_model)))
    if not storage.is_dir(base):
        raise ckpt_io.CheckpointError(f"checkpoint {base} does not exist")
    config = ckpt_io.openai_config(base) if ckpt_io.is_openai_weights(base) else \
        ckpt_io.load_config(base)
    return base, config


def _check_continues(resume: str, spec, cfg: FinetuneConfig, base: str) -> None:
    """A run continued (a rerun of its command, or --resume) must fine-tune what it started
    with: the same labels, head and base checkpoint (its head could not hold others)."""
    if not resume:
        return
    path = storage.join(resume, ckpt_io.CLASSIFIER_FILE)
    if not storage.exists(path):
        raise InputError(f"--resume {resume} is not a fine-tuning checkpoint (it has no "
                         f"{ckpt_io.CLASSIFIER_FILE}): to fine-tune from it, pass it as "
                         "--load_model")
    was = Classifier.load(path)
    pairs = {"labels": (f"{was.label_kind} {was.labels}", f"{spec.kind} {list(spec.labels)}"),
             "--feature_kind": (was.feature_kind, cfg.feature_kind),
             "--load_model": (was.meta.get("base_checkpoint", base), base)}
    differ = [f"{name} {old} (this command: {new})" for name, (old, new) in pairs.items()
              if old != new]
    if differ:
        raise InputError(f"{resume} continues a run of other inputs: {'; '.join(differ)}. Give "
                         "this run its own --experiment_name (or --dataset), or the same inputs "
                         "to continue that one")


def _job(cfg: FinetuneConfig, tc: TrainConfig, output: OutputConfig, run_dir: str, base: str,
         model_cfg, data: dict) -> TrainJob:
    import ray
    import ray.train

    from sentdisc.finetune.data import EncodedSet
    from sentdisc.finetune.loop import finetune_loop

    spec = data["spec"]
    steps = len(data["train"]) // tc.batch_size
    if steps == 0:
        raise InputError(f"--train has {len(data['train'])} labeled texts, fewer than one batch "
                         f"of --batch_size {tc.batch_size}")
    total_iters = tc.max_iters or steps * tc.epochs
    labels = {"label_kind": spec.kind, "labels": list(spec.labels)}
    return TrainJob(
        PREFIX, run_dir, tc, finetune_loop,
        run_config={"model": model_cfg.to_dict(), "finetune": dataclasses.asdict(cfg),
                    "train": dataclasses.asdict(tc), "output": dataclasses.asdict(output),
                    "base_checkpoint": base, "total_iters": total_iters, **labels},
        loop_config={"train": dataclasses.asdict(tc), "finetune": dataclasses.asdict(cfg),
                     "seed": cfg.seed, "total_iters": total_iters, "run_dir": run_dir,
                     "base_checkpoint": base, **labels,
                     # small: every worker reads the encoded sets zero-copy from the store
                     "train_set": ray.put(EncodedSet.of(data["train"].texts,
                                                        data["train"].labels)),
                     "val_set": ray.put(EncodedSet.of(data["val"].texts, data["val"].labels))},
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=tc.keep_checkpoints, checkpoint_score_attribute=SCORE,
            checkpoint_score_order="max"),
        title=f"{output.experiment_name}: fine-tuning on {storage.basename(run_dir)}",
        final_checkpoint=best_checkpoint)


def best_checkpoint(result):
    """The checkpoint of the best validation (of equal scores the later, as Ray Train keeps
    them), else the latest."""
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if m.get(SCORE) is not None]
    if not scored:
        return result.checkpoint
    return max(scored, key=lambda cm: (cm[1][SCORE], cm[1].get("iteration", 0)))[0]


def _earlier_final(run_dir: str) -> str:
    """A rerun of a finished run trains nothing: its checkpoint_final is the earlier one."""
    final = storage.join(run_dir, "checkpoint_final")
    if not storage.exists(storage.join(final, ckpt_io.CLASSIFIER_FILE)):
        raise RuntimeError(f"the run reported no checkpoint and {final} holds none")
    return final


def evaluate(final: str, cfg: FinetuneConfig, data: dict, run_dir: str, summary: dict,
             precision: str = "auto", log=print) -> dict:
    """The fine-tuned checkpoint scored as serving will use it: its features by ``featurize``,
    its labels by its own classifier; classifier.json, metrics of val and test, the plots,
    the extreme samples. Returns results.json's content."""
    from sentdisc.classifier import Classifier

    clf = Classifier.load(final)  # the head, its checkpoint the folder it sits in
    model = ckpt_io.load(final)
    feats, stats = featurize_sets(data, model, final, cfg, kind=clf.feature_kind, layer=-1,
                                  precision=precision, roles=("val", "test"), log=log)
    labels = {r: (data[r].labels if data[r] is not None and r != "train" else None)
              for r in ("train", "val", "test")}
    metrics = split_metrics(clf, feats, labels)
    log(metrics_lines(metrics))
    files = write_outputs(run_dir, cfg, data, feats, labels, clf, None, metrics, None, log=log)
    extremes = write_extremes(run_dir, cfg, data, feats, labels, clf, model, files, log)
    files["checkpoint"] = final
    rows = read_history(summary["history"])  # an earlier driver's validations included
    best = max((r for r in rows if r.get("val_score") is not None),
               key=lambda r: (r["val_score"], r["iteration"]), default={})
    last = next((r for r in reversed(rows) if r.get("final")), {})
    return {"dataset": storage.basename(run_dir), "checkpoint": final,
            "model": model.config.to_dict(), "feature_kind": clf.feature_kind, "layer": -1,
            "rnn_size": model.config.rnn_size, **label_fields(data),
            "neuron": clf.neuron, "sign": clf.sign, "metrics": metrics,
            "shown_split": shown_split(labels),
            "best": {"iteration": best.get("iteration"), "val_score": best.get("val_score"),
                     "metric": best.get("val_metric")},
            "stopped_early": bool(last.get("stopped_early")),
            "iterations": summary["iterations"], "train_loss": summary.get("train_loss"),
            "wall_s": round(summary["wall_s"], 1), "extremes": extremes, "featurize": stats,
            "files": {k: str(v) for k, v in {**files, "history": summary["history"],
                                             "loss_plot": summary["loss_plot"]}.items()
                      if v is not None}}
