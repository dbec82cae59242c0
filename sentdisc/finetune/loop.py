"""The fine-tuning worker: pretraining's phases (``sentdisc.train.worker``) on labeled texts.

Restore builds the pretrained LM plus a classifier head (``sentdisc.finetune.model``) from the
newest checkpoint of the run, or from ``--load_model`` and a fresh head. Each step trains this
rank's share of one global batch of the epoch's plan (``sentdisc.finetune.data``); every
``log_interval`` iterations the ranks report. A validation (every ``eval_every`` iterations,
else at each epoch's end) featurizes each rank's share of the validation set, gathers the
features, and scores them with the head as the ``Classifier`` it exports, by the metric the
label kind is chosen by (accuracy for binary, macro-F1 otherwise); its row is reported with a
checkpoint (weights, optimizer, the head's classifier.json, and (epoch, step) as the data
position), which Ray Train keeps by that score. After ``patience`` validations without a
better score the run stops; the driver keeps the best checkpoint as the output.
"""
from __future__ import annotations

import numpy as np
import torch

from sentdisc import checkpoint as ckpt_io
from sentdisc import storage
from sentdisc.classifier import Classifier
from sentdisc.finetune.config import FinetuneConfig
from sentdisc.finetune.data import epoch_plan, eval_batches, rank_rows
from sentdisc.finetune.model import ClassifierLM, Objective, head_classifier, load_head, outputs_of
from sentdisc.metrics import SELECTION, classification_metrics
from sentdisc.train.worker import TrainWorker


def finetune_loop(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    worker = FinetuneWorker(config)
    worker.restore()
    worker.train()
    worker.finish()


class FinetuneWorker(TrainWorker):
    prefix = "[finetune]"
    windows = False  # batches of texts vary in shape: graph_plan runs them eagerly, says why

    def __init__(self, config: dict):
        import ray

        super().__init__(config)
        self.ft = FinetuneConfig(**config["finetune"])
        self.kind, self.labels = config["label_kind"], config["labels"]
        self.metric = SELECTION[self.kind]
        self.train_set, self.val_set = ray.get(config["train_set"]), ray.get(config["val_set"])
        self.base = config["base_checkpoint"]
        self.loss_of = Objective(self.kind, self.ft.lm_weight)
        # class loss, LM loss, texts since the last report: on the device, so a step never
        # waits to read them, and all-reduced there (an NCCL group takes no CPU tensor)
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    # --- restore -----------------------------------------------------------------------------

    def build_model(self, source):
        lm = ckpt_io.load(source or self.base, map_location=self.device)
        model = ClassifierLM(lm, outputs_of(self.kind, len(self.labels)), self.ft.feature_kind)
        if source:  # a checkpoint of this run: its head too
            load_head(model.head, Classifier.load(storage.join(source, ckpt_io.CLASSIFIER_FILE)))
        if not self.ft.lm_weight:  # no LM loss: the LM's own head gets no gradient (DDP
            model.lm.head.requires_grad_(False)  # would wait for one)
        return model

    def param_groups(self):
        head = list(self.model.head.parameters())
        body = [p for n, p in self.model.named_parameters()
                if p.requires_grad and not n.startswith("head.")]
        return [{"params": body}, {"params": head, "lr": self.ft.head_lr or self.tc.lr}]

    def objective(self, model, x, reset, starts, y, autocast=None):
        return self.loss_of(model, x, reset, starts, y, autocast)

    def restore_data(self, state: dict) -> None:
        self.step_in_epoch = state.get("step_in_epoch", 0)
        self.best = state.get("best") or {"score": None, "iteration": None}
        self.bad_evals, self.stopped = state.get("bad_evals", 0), state.get("stopped", False)
        self.last_eval = self.iteration if state.get("validated") else -1

    # --- train -------------------------------------------------------------------------------

    def train(self) -> None:
        """Epochs of the plan's batches until max_iters, the last epoch or early stopping."""
        tc, lengths = self.tc, self.train_set.lengths
        while not self.finished(self.epoch) and not self.stopped:
            plan = epoch_plan(lengths, tc.batch_size, self.epoch, self.seed)
            if not plan:
                raise RuntimeError(f"the training set has {len(lengths)} texts, fewer than one "
                                   f"batch of {tc.batch_size}: lower --batch_size")
            while self.step_in_epoch < len(plan):
                rows = rank_rows(plan[self.step_in_epoch], self.rank, self.world)
                x, reset, starts, y = self.train_set.batch(rows, self.device)
                carry = self.step(x, reset, starts, y, n_pred=len(rows),
                                  n_bytes=int(lengths[rows].sum()))
                self._add(carry, len(rows))
                self.step_in_epoch += 1
                if self.iteration % tc.log_interval == 0:
                    self.report()
                if self.ft.eval_every and self.iteration % self.ft.eval_every == 0:
                    self.validate()
                if self.stopped or self.finished(self.epoch):
                    return
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            if not self.ft.eval_every:
                self.validate(epoch_done=True)

    def _add(self, carry: dict, n: int) -> None:
        self.sums[2] += n
        for i, k in enumerate(("class_loss", "lm_loss")):
            if carry.get(k) is not None:
                self.sums[i] += carry[k].double() * n

    # --- validate ----------------------------------------------------------------------------

    @torch.no_grad()
    def val_features(self) -> np.ndarray:
        """Features of the whole validation set: each rank computes its share (eval mode, no
        grad), every rank gathers all of it."""
        self.model.eval()
        mine = eval_batches(self.val_set.lengths, self.rank, self.world, max(self.tc.batch_size, 64))
        rows, feats = [], []
        try:
            for batch in mine:
                x, reset, starts, _ = self.val_set.batch(batch, self.device)
                with self.autocast:
                    f, _ = self.model.features(x, reset, starts)
                rows.append(batch)
                feats.append(f.float().cpu().numpy())
        finally:
            self.model.train()
        H = self.model.lm.config.rnn_size
        part = (np.concatenate(rows) if rows else np.zeros(0, np.int64),
                np.concatenate(feats) if feats else np.zeros((0, H), np.float32))
        parts = [part]
        if self.dist:
            parts = [None] * self.world
            torch.distributed.all_gather_object(parts, part)
        out = np.zeros((len(self.val_set), H), dtype=np.float32)
        for idx, f in parts:
            out[idx] = f
        return out

    def classifier(self) -> Classifier:
        """The head as the Classifier it exports (what serving will answer with)."""
        return head_classifier(self.model.head, self.kind, self.labels, self.ft.feature_kind,
                               self.ft.num_neurons)

    def validate(self, epoch_done: bool = False) -> None:
        """Score the validation set, keep the best, maybe stop; report it with a checkpoint."""
        clf = self.classifier()
        feats, y = self.val_features(), self.val_set.labels
        m = classification_metrics(self.kind, self.labels, y, clf.predict(feats),
                                   clf.label_proba(feats))
        score = m[self.metric]  # the same on every rank: all gathered the same features
        if self.best["score"] is None or score > self.best["score"]:
            self.best, self.bad_evals = {"score": score, "iteration": self.iteration}, 0
        else:  # no better: a step towards stopping
            self.bad_evals += 1
            if score == self.best["score"]:  # as good, and trained longer: Ray Train keeps
                self.best["iteration"] = self.iteration  # the later of equal scores, so do we
        self.stopped = bool(self.ft.patience and self.bad_evals >= self.ft.patience)
        self.last_eval = self.iteration
        self.report(save=True, epoch_done=epoch_done, extra={
            "val_score": score, "val_metric": self.metric, "val_accuracy": m["accuracy"],
            "val_macro_f1": m["macro_f1"], "best_score": self.best["score"],
            "best_iteration": self.best["iteration"], "stopped_early": self.stopped})
        if self.stopped:  # after the validation's own line, which the driver prints first
            self.say(f"early stop at iteration {self.iteration}: no better validation "
                     f"{self.metric} for {self.bad_evals} validations (best "
                     f"{self.best['score']:.4f} at iteration {self.best['iteration']})")

    # --- what a report and a checkpoint hold -------------------------------------------------

    def extra_metrics(self, row: dict) -> dict:
        if self.dist:
            torch.distributed.all_reduce(self.sums)
        class_loss, lm_loss, n = self.sums.tolist()
        self.sums.zero_()
        # a row belongs to the epoch of its last step: the validation that closes epoch 0
        # (self.epoch already 1, step 0) is epoch 0's, as are the final rows after it
        ended_an_epoch = self.step_in_epoch == 0 and self.epoch > 0
        out = {"texts_seen_interval": int(n),
               "epoch": self.epoch - 1 if ended_an_epoch else self.epoch}
        if n:
            out["class_loss"] = class_loss / n
            if self.ft.lm_weight:
                out["lm_bpb"] = lm_loss / n / np.log(2)
        return out

    def position(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def train_state(self) -> dict:
        return {"step_in_epoch": self.step_in_epoch, "best": self.best,
                "bad_evals": self.bad_evals, "stopped": self.stopped,
                "validated": self.last_eval == self.iteration}

    def save_extra(self, directory: str) -> None:
        clf = self.classifier()
        clf.meta = {"base_checkpoint": self.base, "iteration": self.iteration,
                    f"val_{self.metric}": self.best["score"] if self.best["iteration"] ==
                    self.iteration else None}
        clf.save(storage.join(directory, ckpt_io.CLASSIFIER_FILE))

    def saved_model(self):
        return self.model.lm

    # --- finish ------------------------------------------------------------------------------

    def finish(self) -> None:
        """A last validation if the final weights have none, then the final row."""
        if self.last_eval != self.iteration:
            self.validate()
        self.report(extra={"final": True, "val_metric": self.metric,
                           "best_score": self.best["score"],
                           "best_iteration": self.best["iteration"],
                           "stopped_early": self.stopped})
