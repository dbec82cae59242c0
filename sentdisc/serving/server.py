"""One model + classifier answering requests: what a Serve replica (app.SentdiscServer) runs, and
what the plain FastAPI baseline runs, with no Ray involved.

All torch work runs in the model's own process (serving.model_process): featurize requests join
its running batch, other model work runs there between chunks. The event loop stays free to
parse requests and answer health checks, and neither waits for the other's GIL. A checkpoint
that cannot be loaded does not crash the process (a replica that raises in its constructor is
retried in a loop, a traceback each time): the server stays up, says why in /healthz (503) and
answers every model endpoint with a 503 naming the reason, and the one log line says it once.
"""
from __future__ import annotations

import logging
import os
from collections import Counter

import numpy as np
from fastapi import HTTPException

from sentdisc import storage
from sentdisc.errors import InputError
from sentdisc.serving.args import (
    AppArgs,
    BatchConfig,
    checkpoint_mismatch,
    load_classifier,
    probe_of,
)
from sentdisc.serving.model_process import ModelProcess, ModelProcessDied

logger = logging.getLogger("ray.serve")


class ModelError(Exception):
    """Model work failed on a valid request: a server fault (500, no traceback)."""


class Unavailable(Exception):
    """The model could not be loaded: every model endpoint answers 503 with this reason.
    ``retry``: whether it may clear (a model process that died is replaced with its replica:
    Retry-After) or not (a load failure stays: no Retry-After)."""

    def __init__(self, reason: str, retry: bool = True):
        super().__init__(reason)
        self.retry = retry


def last_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1][:500] if text else type(e).__name__


def invalid(field: str, msg: str) -> HTTPException:
    """A 422 in the shape every error of the API has: ``{"detail": [{loc, msg, type}]}``."""
    loc = ["body", *(int(p) if p.isdigit() else p for p in field.split("."))]
    return HTTPException(422, detail=[{"loc": loc, "msg": msg, "type": "value_error"}])


class ModelServer:
    def __init__(self, args: AppArgs, threads: int = 1):
        self.args, self.failure, self.model = args, None, None
        self.batch = BatchConfig()
        self.shared: Counter = Counter()  # texts the model held as a request ended -> requests
        try:
            self._load(args, threads)
        except (InputError, OSError, ValueError, RuntimeError) as e:
            self.failure = f"cannot load {args.checkpoint}: {last_line(e)}"
            logger.error(f"sentdisc serve: {self.failure}")
            # The 503s need no model, and a failure after the weights loaded (the classifier,
            # the layer) would leave them in a child process for the replica's whole life.
            # None, not the closed process: that reads as died, which fails the health check
            # and restarts the replica into the same failure.
            self.close()
            self.model = None

    def _load(self, args: AppArgs, threads: int) -> None:
        from sentdisc.model import check_layer

        self.model = ModelProcess(str(args.checkpoint), args.device, threads, args.precision)
        logger.info(f"sentdisc serve: {self.model.precision_reason}")
        self.config, self.device = self.model.config, self.model.device
        self.classifier = None
        if args.classifier:
            self.classifier = load_classifier(args.classifier)
            self.classifier.predict_proba(np.zeros((1, self.config.rnn_size), np.float32))
            mismatch = checkpoint_mismatch(self.classifier, args.checkpoint)
            if mismatch:
                logger.warning(mismatch)
        self.probe = probe_of(args, self.classifier)
        check_layer(self.probe.layer, self.config.layers)  # OpenAI's weights: first read here
        self.model.configure(self.probe.layer, self.probe.feature_kind,
                             self.batch.max_batch_size)
        logger.info(f"sentdisc serve: loaded {args.checkpoint} (rnn {self.config.rnn_size}, "
                    f"{self.device}), classifier={args.classifier}")

    def close(self) -> None:
        if self.model is not None:
            self.model.close()

    def configure(self, batch: BatchConfig) -> None:
        self.batch = batch
        if self.model is not None and not self.failure and not self.model.died:
            self.model.configure(self.probe.layer, self.probe.feature_kind,
                                 batch.max_batch_size)

    def the_classifier(self):
        """The loaded classifier, or a 503 saying how to deploy one (no Retry-After: it does
        not clear without a redeploy)."""
        self.ready()
        if self.classifier is None:
            raise HTTPException(503, detail="no classifier loaded: deploy with classifier=FILE "
                                            "(or a fine-tuned checkpoint, which holds one)")
        return self.classifier

    def ready(self) -> None:
        if self.failure:
            raise Unavailable(self.failure, retry=False)
        if self.model.died:
            raise Unavailable(self.model.died)

    # -- model work -------------------------------------------------------------------------

    async def features(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Features of one request's texts from the model's running batch, and how many texts
        that batch held as they ended."""
        self.ready()
        feats, held = await self._answer("featurize", self.model.featurize(texts))
        self.shared[held] += 1
        return feats, held

    async def work(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` in the model's process, ``MODEL`` standing for the model."""
        self.ready()
        return await self._answer(fn.__name__, self.model.run(fn, *args, **kwargs))

    async def _answer(self, what: str, pending):
        """The library's InputError is about the request (422, its message); anything else is
        a server fault (500, logged); a dead model process makes this server unavailable
        (503)."""
        try:
            return await pending
        except InputError as e:
            raise invalid("body", last_line(e)) from None
        except ModelProcessDied as e:
            logger.error(f"sentdisc serve: {e}")
            raise Unavailable(str(e)) from None
        except Exception as e:
            logger.error(f"sentdisc serve: {what} failed: {type(e).__name__}: {last_line(e)}")
            raise ModelError(what) from None

    # -- request checks (before any model work: a bad text never fails a batch it would join).
    # The caps are in the schema (api.make_api), so breaking one is a 422 like any schema rule.

    def check_texts(self, texts: list[str], field: str = "texts") -> None:
        cap = self.args.max_texts
        if len(texts) > cap:
            raise invalid(field, f"{len(texts)} texts exceed the limit of {cap} per request")
        for i, t in enumerate(texts):
            self.check_text(t, f"{field}.{i}")

    def check_text(self, text: str, field: str) -> None:
        """One text's bytes against the cap; ``field`` is its loc (``texts.3``, ``prompt``)."""
        cap_bytes = self.args.max_text_bytes
        try:
            n = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise invalid(field, "not valid Unicode (unpaired surrogate)") from None
        if n > cap_bytes:
            raise invalid(field, f"{n} bytes exceed the limit of {cap_bytes} UTF-8 bytes per "
                                 "text")

    def check_neuron(self, neuron: int, field: str = "neuron") -> int:
        self.ready()
        H = self.config.rnn_size
        if neuron >= H:
            raise invalid(field, f"neuron {neuron} out of range for a rnn_size {H} model "
                                 f"(0..{H - 1})")
        return neuron

    def pick_neuron(self, neuron: int | None, fallback: int | None,
                    label: str | None = None) -> tuple[int, bool]:
        """(neuron, negate): the requested neuron, else ``label``'s top neuron, else the
        sentiment neuron, else ``fallback``; negate where the classifier's weight on it (for
        ``label``, when given) is negative."""
        self.ready()
        probe = self.probe
        if label is not None:  # (neuron and label both: the request's schema refuses it)
            try:
                probe = probe.for_label(label)
            except InputError as e:
                raise invalid("label", str(e)) from None
        for choice in (neuron, probe.neuron, fallback):
            if choice is not None:
                return self.check_neuron(choice), probe.negate(choice)
        raise invalid("neuron", "required (no classifier is loaded to name the sentiment "
                                "neuron)")

    # -- what /healthz and /stats report ----------------------------------------------------

    def info(self) -> dict:
        common = {"checkpoint": storage.basename(self.args.checkpoint), "pid": os.getpid(),
                  **self.batch.model_dump()}  # what configure() last gave the batcher
        failure = self.failure or self.model.died
        if failure:
            return {"status": "unavailable", "reason": failure, **common}
        common["model_pid"] = self.model.pid  # the model's own process (serving.model_process)
        c = self.config
        return {"status": "ok", "rnn_size": c.rnn_size, "layers": c.layers,
                "rnn_type": c.rnn_type, "feature_kind": self.probe.feature_kind,
                "layer": self.probe.layer, "device": self.device,
                "precision": self.model.precision,
                "classifier": self.classifier is not None, "neuron": self.probe.neuron,
                # the checkpoint the classifier records it was fitted on ("" when it does not)
                "classifier_checkpoint": getattr(self.classifier, "checkpoint", None),
                "label_kind": getattr(self.classifier, "label_kind", None),
                "labels": getattr(self.classifier, "labels", None),
                "neuron_sign": -1 if self.probe.negate(self.probe.neuron) else 1, **common}

    def stats(self) -> dict:
        n = sum(self.shared.values())
        return {"requests": n, "max_batch_size_seen": max(self.shared, default=0),
                "mean_batch_size": sum(k * v for k, v in self.shared.items()) / max(n, 1),
                "batch_sizes": {str(k): v for k, v in sorted(self.shared.items())}}
