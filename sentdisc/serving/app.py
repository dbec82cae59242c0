"""HTTP serving of a sentdisc checkpoint: one Ray Serve deployment that is its own FastAPI app.

    serve run sentdisc.serving:build_app checkpoint=DIR classifier=FILE   # local, 127.0.0.1:8000
    serve deploy serve/config.yaml                                        # a cluster

Each SentdiscServer replica loads the checkpoint and classifier.json once and answers HTTP
itself, so a request makes one hop, proxy to replica. It checks every request against the caps
before any model work (a bad request costs no model time and never fails a batch it would have
joined), coalesces featurize and sentiment requests with @serve.batch plus a runner that merges
whatever queued while the model was busy (one length-sorted, masked ``featurize`` call, one GEMM
per byte for the whole batch; X-Batch-Size says how many requests shared it), and runs all torch
work on one worker thread, so the event loop stays free to collect the next batch and answer
health checks. Batch settings are the deployment's user_config, applied in ``reconfigure``.

All model work is the library's (sentdisc.featurize, sentdisc.viz, the transfer Classifier);
what the classifier says about reading the model is its Probe's. No endpoint takes a path.
"""
import asyncio
import functools
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve

import sentdisc
from sentdisc import storage
from sentdisc.errors import InputError
from sentdisc.serving.args import AppArgs, BatchConfig, check_args, load_classifier, probe_of
from sentdisc.serving.schemas import (
    FeaturizeRequest,
    FeaturizeResponse,
    GenerateRequest,
    GenerateResponse,
    HeatmapRequest,
    HeatmapValues,
    SentimentRequest,
    SentimentResponse,
    SentimentResult,
)

logger = logging.getLogger("ray.serve")
DEFAULT_BATCH = BatchConfig()


class ModelError(Exception):
    """Model work failed on a valid request: a server fault (500, no traceback)."""


def _last_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1][:500] if text else type(e).__name__


def _startup_error(message: str) -> RuntimeError:
    # One clear line in the replica log; the short error is what Serve reports.
    logger.error(f"sentdisc serve: {message}")
    return RuntimeError(f"sentdisc serve: {message}")


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=128,
                  health_check_period_s=10)
@serve.ingress()
class SentdiscServer:
    """One model + classifier per replica, behind its own FastAPI app."""

    def __init__(self, args: AppArgs):
        import ray
        import torch

        from sentdisc.checkpoint import load
        from sentdisc.model import check_layer

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.model = load(args.checkpoint, map_location=device)
        except (InputError, OSError) as e:
            raise _startup_error(f"cannot load checkpoint: {e}") from None
        self.classifier = self._load_classifier(args.classifier) if args.classifier else None
        self.args, self.device = args, device
        self.probe = probe_of(args, self.classifier)
        try:  # OpenAI's weights are first opened here, not by the builder's checks
            check_layer(self.probe.layer, len(self.model.layers))
        except ValueError as e:
            raise _startup_error(str(e)) from None
        self.batch = DEFAULT_BATCH  # reconfigure() sets the deployment's user_config
        self.batch_sizes: Counter = Counter()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sentdisc-model")
        self._pending: list[tuple[list[str], asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        logger.info(f"sentdisc serve: loaded {args.checkpoint} (rnn {self.model.config.rnn_size}, "
                    f"{device}), classifier={args.classifier}")

    def _load_classifier(self, path: str):
        H = self.model.config.rnn_size
        try:
            clf = load_classifier(path)
            clf.predict_proba(np.zeros((1, H), dtype=np.float32))
        except (InputError, OSError) as e:
            raise _startup_error(f"classifier {path} unusable with a rnn_size {H} model: "
                                 f"{e}") from None
        return clf

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Built per replica, after __init__, so routes and the body cap see this replica's
        # arguments (a module-level app would be frozen when the class is decorated).
        return make_api(self)

    async def reconfigure(self, user_config: dict) -> None:
        """Serve calls this after __init__, and again on a live replica whenever a redeploy
        changes only the user_config: batching is retuned without a restart."""
        self.batch = BatchConfig.model_validate(user_config or {})
        self._enqueue.set_max_batch_size(self.batch.max_batch_size)
        self._enqueue.set_batch_wait_timeout_s(self.batch.batch_wait_timeout_s)
        logger.info(f"sentdisc serve: batching {self.batch.model_dump()}")

    # -- batching ---------------------------------------------------------------------------
    # @serve.batch collects the requests that arrive within batch_wait_timeout_s and hands them
    # over at once. Serve forms its next batch as soon as it has handed one over, even while
    # that one still waits for the model, so under load every batch would hold only a
    # wait-timeout's worth of arrivals. Instead the batch handler only queues its requests and
    # returns futures; one runner task takes everything queued (up to max_batch_size requests)
    # each time the model is free, so the requests that arrive while a featurize call runs all
    # join the next one.

    @serve.batch(max_batch_size=DEFAULT_BATCH.max_batch_size,
                 batch_wait_timeout_s=DEFAULT_BATCH.batch_wait_timeout_s)
    async def _enqueue(self, requests: list[list[str]]) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in requests]
        self._pending.extend(zip(requests, futures, strict=True))
        if self._runner is None or self._runner.done():
            self._wake = asyncio.Event()
            self._runner = loop.create_task(self._run_batches())
        self._wake.set()
        return futures

    async def _run_batches(self) -> None:
        from sentdisc import featurize

        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                group = self._pending[:self.batch.max_batch_size]
                del self._pending[:len(group)]
                flat = [t for texts, _ in group for t in texts]
                try:
                    feats = await self.work(featurize, self.model, flat,
                                            batch_size=self.args.featurize_batch_size,
                                            layer=self.probe.layer, kind=self.probe.feature_kind)
                except Exception as e:  # inputs were checked: a server fault, for all of them
                    for _, fut in group:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                start = 0
                for texts, fut in group:
                    if not fut.done():  # a cancelled request (client went away) is skipped
                        fut.set_result((feats[start:start + len(texts)], len(group)))
                    start += len(texts)

    async def features(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Features of one request's texts and the number of requests in its featurize call."""
        features, batch = await (await self._enqueue(texts))
        self.batch_sizes[batch] += 1
        return features, batch

    async def work(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the model thread. The library's InputError is about the
        request (422, its message); anything else is a server fault (500, logged)."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))
        except InputError as e:
            raise HTTPException(422, detail=_last_line(e)) from None
        except Exception as e:
            logger.error(f"sentdisc serve: {fn.__name__} failed: {type(e).__name__}: "
                         f"{_last_line(e)}")
            raise ModelError(fn.__name__) from None

    # -- request checks (before any model work) ---------------------------------------------

    def check_texts(self, texts: list[str], field: str = "texts") -> None:
        cap, cap_bytes = self.args.max_texts, self.args.max_text_bytes
        if len(texts) > cap:
            raise HTTPException(413, detail=f"{field}: {len(texts)} texts exceed the limit of "
                                            f"{cap} per request")
        for i, t in enumerate(texts):
            try:
                n = len(t.encode("utf-8"))
            except UnicodeEncodeError:
                # Caught here, not in the model: a batch fails as a whole, and one bad text must
                # not fail the other requests it was batched with.
                raise HTTPException(422, detail=f"{field}[{i}]: not valid Unicode (unpaired "
                                                f"surrogate)") from None
            if n > cap_bytes:
                raise HTTPException(413, detail=f"{field}[{i}]: {n} bytes exceed the limit of "
                                                f"{cap_bytes} bytes per text")

    def check_neuron(self, neuron: int, field: str = "neuron") -> int:
        H = self.model.config.rnn_size
        if neuron >= H:
            raise HTTPException(422, detail=f"{field}: neuron {neuron} out of range for a "
                                            f"rnn_size {H} model (0..{H - 1})")
        return neuron

    def pick_neuron(self, neuron: int | None, fallback: int | None) -> int:
        """The requested neuron, else the sentiment neuron, else ``fallback``."""
        for choice in (neuron, self.probe.neuron, fallback):
            if choice is not None:
                return self.check_neuron(choice)
        raise HTTPException(422, detail="neuron: required (no classifier is loaded to name "
                                        "the sentiment neuron)")

    # -- what /healthz and /stats report ----------------------------------------------------

    def info(self) -> dict:
        c = self.model.config
        return {"rnn_size": c.rnn_size, "layers": c.layers, "rnn_type": c.rnn_type,
                "feature_kind": self.probe.feature_kind, "layer": self.probe.layer,
                "device": self.device, "classifier": self.classifier is not None,
                "neuron": self.probe.neuron,
                "neuron_sign": -1 if self.probe.negate(self.probe.neuron) else 1,
                "checkpoint": storage.basename(self.args.checkpoint),
                **self.batch.model_dump(),  # what reconfigure() last gave the batcher
                # which replica process answered: a retune must not restart it
                "replica": serve.get_replica_context().replica_tag, "pid": os.getpid()}

    def stats(self) -> dict:
        n = sum(self.batch_sizes.values())
        return {"requests": n, "max_batch_size_seen": max(self.batch_sizes, default=0),
                "mean_batch_size": sum(k * v for k, v in self.batch_sizes.items()) / max(n, 1),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}


# --- HTTP routes: each endpoint once, run by the replica that make_api put in the app's state

def _replica(request: Request) -> Any:
    return request.app.state.replica


Replica = Annotated[Any, Depends(_replica)]  # the SentdiscServer instance of this replica
router = APIRouter()


@functools.cache
def _page() -> str:
    # Package data (pyproject.toml: "sentdisc.serving" = ["*.html"]): it ships in the wheel.
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(_page())


@router.get("/healthz", summary="200 when the replica answers: its model, batching, process")
async def healthz(server: Replica) -> dict:
    return {"status": "ok", **server.info()}


@router.get("/stats", summary="batch sizes (requests per featurize call) seen by this replica")
async def stats(server: Replica) -> dict:
    return server.stats()


@router.post("/featurize", response_model=FeaturizeResponse,
             summary="features of each text (all neurons, or the listed ones)")
async def featurize(req: FeaturizeRequest, server: Replica) -> JSONResponse:
    server.check_texts(req.texts)
    for j, n in enumerate(req.neurons or []):
        server.check_neuron(n, f"neurons[{j}]")
    feats, batch = await server.features(req.texts)
    if req.neurons is not None:
        feats = feats[:, req.neurons]
    # A JSONResponse skips re-validating up to max_texts x rnn_size floats against the
    # response model (the schema still documents it); float32 -> float is exact.
    return JSONResponse({"features": feats.tolist(), "neurons": req.neurons,
                         "kind": server.probe.feature_kind, "layer": server.probe.layer},
                        headers={"X-Batch-Size": str(batch)})


@router.post("/sentiment", response_model=SentimentResponse,
             summary="per text: label, P(positive), and the sentiment neuron's value")
async def sentiment(req: SentimentRequest, server: Replica, response: Response):
    server.check_texts(req.texts)
    if server.classifier is None:
        raise HTTPException(503, detail="no classifier loaded: deploy with classifier=FILE")
    feats, batch = await server.features(req.texts)
    response.headers["X-Batch-Size"] = str(batch)
    prob = np.asarray(server.classifier.predict_proba(feats), dtype=np.float64)
    neuron = server.probe.neuron
    results = [SentimentResult(label="positive" if p >= 0.5 else "negative",
                               probability=float(p), neuron_value=float(v))
               for p, v in zip(prob, feats[:, neuron], strict=True)]
    return SentimentResponse(results=results, neuron=neuron)


@router.post("/heatmap", summary="the neuron's value after each character: PNG, SVG or JSON",
             response_model=None,
             responses={200: {"content": {"image/png": {}, "image/svg+xml": {},
                                          "application/json": {
                                              "schema": HeatmapValues.model_json_schema()}}}})
async def heatmap(req: HeatmapRequest, server: Replica):
    from sentdisc import viz

    server.check_texts([req.text], "text")
    neuron = server.pick_neuron(req.neuron, None)
    negate = server.probe.negate(neuron)
    chars, values = await server.work(viz.neuron_values, server.model, req.text, neuron,
                                      layer=server.probe.layer, kind=server.probe.trace_kind,
                                      negate=negate)
    if req.format == "png":
        png = await server.work(viz.render_png, chars, values, title=f"neuron {neuron}")
        return Response(png, media_type="image/png")
    if req.format == "svg":
        return Response(await server.work(viz.render_svg, chars, values),
                        media_type="image/svg+xml")
    return HeatmapValues(chars=list(chars), values=np.asarray(values, np.float64).tolist(),
                         neuron=neuron, negated=negate)


@router.post("/generate", response_model=GenerateResponse,
             summary="continue a prompt, optionally holding the neuron at a value")
async def generate(req: GenerateRequest, server: Replica) -> GenerateResponse:
    from sentdisc import viz

    server.check_texts([req.prompt], "prompt")
    if req.length > server.args.max_generate_length:
        raise HTTPException(422, detail=f"length: {req.length} exceeds the limit of "
                                        f"{server.args.max_generate_length} bytes")
    neuron = server.pick_neuron(req.neuron, 0)
    out = await server.work(viz.generate_text, server.model, req.prompt, req.length,
                            req.temperature, neuron=neuron, overwrite=req.overwrite,
                            layer=server.probe.layer, seed=req.seed,
                            negate=server.probe.negate(neuron))
    return GenerateResponse(text=out["text"], prompt_end=int(out["prompt_end"]), neuron=neuron,
                            overwrite=req.overwrite, chars=list(out["chars"]),
                            trace=np.asarray(out["values"], np.float64).tolist())


def make_api(server) -> FastAPI:
    """The FastAPI app of one replica: the routes, the body-size cap, the error mapping."""
    args = server.args
    # JSON escapes can make a text up to 6x longer (\uXXXX); a body above this cannot pass.
    body_cap = 6 * args.max_texts * args.max_text_bytes + 65536
    api = FastAPI(title="sentdisc", version=sentdisc.__version__,
                  description="Byte-level mLSTM sentiment discovery: features, sentiment, "
                              "per-character neuron heatmaps and neuron-steered generation.")
    api.state.replica = server
    api.include_router(router)

    @api.middleware("http")
    async def cap_body(request: Request, call_next):
        """Refuse a body that cannot fit the caps before reading it (413)."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > body_cap:
            return JSONResponse(status_code=413, content={
                "detail": f"request body of {length} bytes exceeds the {body_cap}-byte limit"})
        return await call_next(request)

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        # FastAPI's default echoes the whole input back; a 1 MB body would come back too.
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""),
                   "type": e.get("type", "")} for e in exc.errors()[:20]]
        return JSONResponse(status_code=422, content={"detail": detail})

    @api.exception_handler(ModelError)
    async def model_error(request: Request, exc: ModelError):
        return JSONResponse(status_code=500, content={
            "detail": "internal error in the model; see the server log"})

    return api


# --- application builders ------------------------------------------------------------------

def make_app(args: AppArgs | dict, batching: BatchConfig | dict | None = None
             ) -> serve.Application:
    """The application for ``args``, with ``batching`` (default BatchConfig()) as the
    deployment's user_config. A config file's ``deployments: - name: SentdiscServer
    user_config:`` takes precedence over it, and a redeploy with new values retunes the live
    replicas."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args)
    if not isinstance(batching, BatchConfig):
        batching = BatchConfig.model_validate(batching or {})
    return SentdiscServer.options(user_config=batching.model_dump()).bind(check_args(args))


def build_app(args: AppArgs) -> serve.Application:
    """The application builder of ``serve run`` and config files. Serve validates the args into
    AppArgs (the type hint says so); Python callers may pass a dict. Batch settings are not
    arguments: they are the deployment's user_config."""
    return make_app(args)
