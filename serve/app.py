"""HTTP serving of a sentdisc checkpoint with Ray Serve.

    serve run serve.app:build_app checkpoint=DIR classifier=FILE   # local, 127.0.0.1:8000
    serve deploy serve/config.yaml                                 # a cluster

Two deployments:
  SentdiscAPI     FastAPI ingress: validates every request (pydantic, size caps) before any
                  model work, maps errors to 4xx, serves the page at / and OpenAPI at /docs.
  SentimentModel  loads the checkpoint and classifier.json once per replica. Featurize and
                  sentiment requests are coalesced with @serve.batch (plus a runner that merges
                  whatever queued while the model was busy): concurrent requests share one
                  length-sorted, masked ``featurize`` call, one GEMM per byte for the whole
                  batch instead of one per text. X-Batch-Size says how many requests shared it.
All model work is the library's (sentdisc.featurize, sentdisc.viz, the transfer Classifier);
nothing here touches model math or preprocessing. No endpoint takes a path from a client.
"""

import asyncio
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

import click
import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

logger = logging.getLogger("ray.serve")


# --- application arguments -----------------------------------------------------------------

class AppArgsError(click.ClickException, ValueError):
    """Bad application arguments. `serve run` prints just the message (no traceback, no
    crash loop of replicas that can never start); Python callers get a ValueError."""


class AppArgs(BaseModel):
    """Arguments of ``build_app`` (``serve run serve.app:build_app key=value ...`` or the
    ``args:`` block of serve/config.yaml)."""
    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description="checkpoint dir: sentdisc format or OpenAI's 0..14.npy")
    classifier: str | None = Field(None, description="classifier.json; /sentiment needs it")
    feature_kind: Literal["cell", "hidden", "mean", "max"] | None = Field(
        None, description="features served by /featurize; default: the classifier's, else cell")
    layer: int | None = Field(None, description="layer to featurize; default: classifier's, else -1")
    device: str = Field("auto", description="auto (cuda when the replica has a GPU) | cpu | cuda")
    max_batch_size: int = Field(32, ge=1, le=1024, description="requests coalesced per batch")
    batch_wait_timeout_s: float = Field(0.002, ge=0, le=10, description=(
        "how long an idle model waits for more requests; requests that queue while a batch "
        "runs join the next batch without waiting"))
    featurize_batch_size: int = Field(128, ge=1, description="texts per featurize forward pass")
    max_texts: int = Field(64, ge=1, description="texts per request (more -> 413)")
    max_text_bytes: int = Field(16384, ge=1, description="UTF-8 bytes per text (more -> 413)")
    max_generate_length: int = Field(1000, ge=1, description="bytes per /generate (more -> 422)")


def _load_classifier(path: str):
    from sentdisc.classifier import Classifier  # plain JSON, written by `sentdisc transfer`

    return Classifier.load(path)


def _check_args(args: dict | AppArgs) -> tuple[AppArgs, Any]:
    """Validate everything a replica will need before deploying anything."""
    if isinstance(args, AppArgs):
        cfg = args
    else:
        try:
            cfg = AppArgs.model_validate(dict(args))
        except ValidationError as e:
            msgs = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'args'}: {err['msg']}"
                             for err in e.errors())
            raise AppArgsError(f"sentdisc serve: bad application arguments: {msgs}. "
                               f"Known: {', '.join(AppArgs.model_fields)}") from None
    from sentdisc.checkpoint import CheckpointError, load_config

    ckpt = Path(cfg.checkpoint).expanduser().resolve()
    if not ckpt.is_dir():
        raise AppArgsError(f"sentdisc serve: checkpoint {ckpt} does not exist or is not a directory")
    model_cfg = None
    if not (ckpt / "0.npy").exists():  # OpenAI's .npy dirs are checked when a replica loads them
        try:
            model_cfg = load_config(ckpt)
        except CheckpointError as e:
            raise AppArgsError(f"sentdisc serve: bad checkpoint: {e}") from None
        if not (ckpt / "model.safetensors").is_file():
            raise AppArgsError(f"sentdisc serve: {ckpt / 'model.safetensors'} is missing")
    updates: dict[str, Any] = {"checkpoint": str(ckpt)}
    clf = None
    if cfg.classifier is not None:
        clf_path = Path(cfg.classifier).expanduser().resolve()
        if not clf_path.is_file():
            raise AppArgsError(f"sentdisc serve: classifier {clf_path} does not exist")
        try:
            clf = _load_classifier(str(clf_path))
        except Exception as e:  # any malformed JSON / schema error: one line, no traceback
            raise AppArgsError(f"sentdisc serve: cannot read classifier {clf_path}: {e}") from None
        if model_cfg is not None and clf.rnn_size != model_cfg.rnn_size:
            raise AppArgsError(f"sentdisc serve: classifier {clf_path} expects rnn_size "
                               f"{clf.rnn_size} features, checkpoint {ckpt} has {model_cfg.rnn_size}")
        if cfg.feature_kind is not None and cfg.feature_kind != clf.feature_kind:
            raise AppArgsError(f"sentdisc serve: feature_kind={cfg.feature_kind} but the classifier "
                               f"was fitted on '{clf.feature_kind}' features")
        if cfg.layer is not None and cfg.layer != clf.layer:
            raise AppArgsError(f"sentdisc serve: layer={cfg.layer} but the classifier was fitted "
                               f"on layer {clf.layer}")
        # Serve the features the classifier was fitted on.
        updates.update(classifier=str(clf_path), feature_kind=clf.feature_kind, layer=clf.layer)
    cfg = cfg.model_copy(update=updates)
    cfg = cfg.model_copy(update={"feature_kind": cfg.feature_kind or "cell",
                                 "layer": -1 if cfg.layer is None else cfg.layer})
    if model_cfg is not None and not -model_cfg.layers <= cfg.layer < model_cfg.layers:
        raise AppArgsError(f"sentdisc serve: layer {cfg.layer} out of range for the "
                           f"{model_cfg.layers}-layer checkpoint {ckpt}")
    return cfg, clf


# --- model deployment ----------------------------------------------------------------------

@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64,
                  health_check_period_s=10)
class SentimentModel:
    """One model + classifier per replica. All torch work runs on one worker thread, so the
    replica's event loop stays free to collect the next batch and answer health checks."""

    def __init__(self, args: dict):
        import ray
        import torch

        from sentdisc.checkpoint import CheckpointError, load

        cfg = AppArgs.model_validate(args)
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.model = load(cfg.checkpoint, map_location=device)
        except (CheckpointError, OSError) as e:
            # One clear line in the replica log; the short error below is what Serve reports.
            logger.error(f"sentdisc serve: cannot load checkpoint: {e}")
            raise RuntimeError(f"sentdisc serve: cannot load checkpoint: {e}") from None
        H = self.model.config.rnn_size
        self.classifier = None
        if cfg.classifier:
            try:
                self.classifier = _load_classifier(cfg.classifier)
                self.classifier.predict_proba(np.zeros((1, H), dtype=np.float32))
            except Exception as e:
                logger.error(f"sentdisc serve: classifier {cfg.classifier} unusable with a "
                             f"rnn_size {H} model: {e}")
                raise RuntimeError(f"sentdisc serve: classifier {cfg.classifier} unusable with "
                                   f"a rnn_size {H} model: {e}") from None
        self.cfg, self.device = cfg, device
        self.neuron = int(self.classifier.neuron) if self.classifier is not None else None
        # A sentiment neuron with a negative weight is shown and steered sign-flipped, so that
        # green / +1 always mean positive (viz's ``negate``).
        self.negative = self.classifier is not None and int(self.classifier.sign) < 0
        # Per-character heatmaps: the state the features are pooled from.
        self.trace_kind = "cell" if cfg.feature_kind == "cell" else "hidden"
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sentdisc-model")
        self._enqueue.set_max_batch_size(cfg.max_batch_size)
        self._enqueue.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._pending: list[tuple[list[str], asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        logger.info(f"sentdisc serve: loaded {cfg.checkpoint} (rnn {H}, {device}), "
                    f"classifier={cfg.classifier}, max_batch_size={cfg.max_batch_size}")

    async def _run(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, lambda: fn(*args, **kwargs))

    # Batching. @serve.batch collects the requests that arrive within batch_wait_timeout_s
    # and hands them over at once. Serve forms its next batch as soon as it has handed one
    # over, even while that one still waits for the model, so under load every batch would
    # hold only a wait-timeout's worth of arrivals. Instead the batch handler only queues its
    # requests and returns futures; one runner task takes everything queued (up to
    # max_batch_size requests) each time the model is free, so the requests that arrive while
    # a featurize call runs all join the next one.

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _enqueue(self, requests: list[list[str]]) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in requests]
        self._pending.extend(zip(requests, futures))
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
                group = self._pending[:self.cfg.max_batch_size]
                del self._pending[:len(group)]
                flat = [t for texts, _ in group for t in texts]
                try:
                    feats = await self._run(featurize, self.model, flat,
                                            batch_size=self.cfg.featurize_batch_size,
                                            layer=self.cfg.layer, kind=self.cfg.feature_kind)
                except Exception as e:  # inputs are checked by the ingress: a server fault
                    for _, fut in group:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                start = 0
                for texts, fut in group:
                    if not fut.done():  # a cancelled request (client went away) is skipped
                        fut.set_result((feats[start:start + len(texts)], len(group)))
                    start += len(texts)

    async def _features(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Features of one request's texts and the number of requests in its featurize call."""
        return await (await self._enqueue(texts))

    async def featurize(self, texts: list[str], neurons: list[int] | None = None) -> dict:
        feats, batch = await self._features(texts)
        if neurons is not None:
            feats = feats[:, neurons]
        return {"features": feats, "batch_size": batch}

    async def sentiment(self, texts: list[str]) -> dict:
        if self.classifier is None:
            raise ValueError("no classifier loaded: deploy with classifier=FILE")
        feats, batch = await self._features(texts)
        prob = np.asarray(self.classifier.predict_proba(feats), dtype=np.float64)
        return {"probability": prob, "neuron_value": feats[:, self.neuron], "batch_size": batch}

    async def heatmap(self, text: str, neuron: int, fmt: str):
        from sentdisc import viz

        negate = self.negative and neuron == self.neuron
        chars, values = await self._run(viz.neuron_values, self.model, text, neuron,
                                        layer=self.cfg.layer, kind=self.trace_kind, negate=negate)
        if fmt == "png":
            return await self._run(viz.render_png, chars, values, title=f"neuron {neuron}")
        if fmt == "svg":
            return await self._run(viz.render_svg, chars, values)
        return {"chars": list(chars), "values": np.asarray(values, dtype=np.float64).tolist(),
                "negated": negate}

    async def generate(self, prompt: str, length: int, temperature: float, neuron: int,
                       overwrite: float | None, seed: int | None) -> dict:
        from sentdisc import viz

        return await self._run(viz.generate_text, self.model, prompt, length, temperature,
                               neuron=neuron, overwrite=overwrite, layer=self.cfg.layer, seed=seed,
                               negate=self.negative and neuron == self.neuron)

    async def info(self) -> dict:
        c = self.model.config
        return {"rnn_size": c.rnn_size, "layers": c.layers, "rnn_type": c.rnn_type,
                "feature_kind": self.cfg.feature_kind, "layer": self.cfg.layer,
                "device": self.device, "classifier": self.classifier is not None,
                "neuron": self.neuron, "neuron_sign": -1 if self.negative else 1,
                "max_batch_size": self.cfg.max_batch_size,
                "checkpoint": Path(self.cfg.checkpoint).name}


# --- HTTP API ------------------------------------------------------------------------------

class _Request(BaseModel):
    # Unknown fields and wrong types are client errors (422), never silently coerced.
    model_config = ConfigDict(extra="forbid", strict=True)


Neuron = Annotated[int, Field(ge=0)]


class FeaturizeRequest(_Request):
    texts: list[str] = Field(min_length=1)
    neurons: list[Neuron] | None = Field(None, min_length=1, description="default: all")


class FeaturizeResponse(BaseModel):
    features: list[list[float]] = Field(description="[len(texts), len(neurons) or rnn_size]")
    neurons: list[int] | None
    kind: str
    layer: int


class SentimentRequest(_Request):
    texts: list[str] = Field(min_length=1)


class SentimentResult(BaseModel):
    label: Literal["positive", "negative"]
    probability: float = Field(description="P(positive) from the classifier on all features")
    neuron_value: float = Field(description="the sentiment neuron's feature value")


class SentimentResponse(BaseModel):
    results: list[SentimentResult]
    neuron: int


class HeatmapRequest(_Request):
    text: str
    neuron: Neuron | None = Field(None, description="default: the sentiment neuron")
    format: Literal["png", "svg", "json"] = "png"


class HeatmapValues(BaseModel):
    chars: list[str]
    values: list[float] = Field(description="the neuron after each character (the pads are "
                                            "fed to the model, not shown)")
    neuron: int
    negated: bool = Field(description="values sign-flipped: the sentiment neuron's weight is "
                                      "negative, so that positive values read as positive")


class GenerateRequest(_Request):
    prompt: str = ""
    length: int = Field(200, ge=1)
    temperature: float = Field(1.0, ge=0, le=100)
    neuron: Neuron | None = Field(None, description="default: the sentiment neuron, else 0")
    overwrite: float | None = Field(None, description="hold the neuron at this value while "
                                       "generating (+1 positive, -1 negative for the sentiment "
                                       "neuron, whatever the sign of its weight)")
    seed: int | None = Field(None, ge=0)


class GenerateResponse(BaseModel):
    text: str
    prompt_end: int = Field(description="characters of text that are the (preprocessed) prompt")
    neuron: int
    overwrite: float | None
    chars: list[str]
    trace: list[float] = Field(description="the neuron's value after each character")


class ModelError(Exception):
    """The model deployment failed on a valid request (a server fault: 500, no traceback)."""


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress()
class SentdiscAPI:
    """HTTP front: checks every request against the caps before it reaches the model, so a
    bad request costs no model time and can never fail the batch it would have joined."""

    def __init__(self, model, args: dict):
        self.model = model
        self.cfg = AppArgs.model_validate(args)
        self._info: dict | None = None
        self.batch_sizes: Counter = Counter()

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Built per replica, after __init__, so routes and the body cap see this replica's
        # configuration (a module-level app would be frozen when the class is decorated).
        return make_api(self)

    async def call(self, method: str, *args):
        try:
            return await getattr(self.model, method).remote(*args)
        except Exception as e:
            cause = getattr(e, "cause", None) or e
            if isinstance(cause, ValueError):  # the library's message for bad input
                raise HTTPException(422, detail=str(cause).strip().splitlines()[-1][:500]) from None
            logger.error(f"sentdisc serve: model.{method} failed: {type(cause).__name__}: "
                         f"{str(cause).strip().splitlines()[-1][:500] if str(cause).strip() else ''}")
            raise ModelError(method) from None

    async def info(self) -> dict:
        if self._info is None:
            self._info = await self.call("info")
        return self._info

    def check_texts(self, texts: list[str], field: str = "texts") -> None:
        if len(texts) > self.cfg.max_texts:
            raise HTTPException(413, detail=f"{field}: {len(texts)} texts exceed the limit of "
                                            f"{self.cfg.max_texts} per request")
        for i, t in enumerate(texts):
            try:
                n = len(t.encode("utf-8"))
            except UnicodeEncodeError:
                # Caught here, not in the model: a batch fails as a whole, and one bad text must
                # not fail the other requests it was batched with.
                raise HTTPException(422, detail=f"{field}[{i}]: not valid Unicode (unpaired "
                                                f"surrogate)") from None
            if n > self.cfg.max_text_bytes:
                raise HTTPException(413, detail=f"{field}[{i}]: {n} bytes exceed the limit of "
                                                f"{self.cfg.max_text_bytes} bytes per text")

    async def check_neuron(self, neuron: int, field: str = "neuron") -> None:
        H = (await self.info())["rnn_size"]
        if neuron >= H:
            raise HTTPException(422, detail=f"{field}: neuron {neuron} out of range for a "
                                            f"rnn_size {H} model (0..{H - 1})")

    async def pick_neuron(self, neuron: int | None, fallback: int | None) -> int:
        if neuron is None:
            neuron = (await self.info())["neuron"]
        if neuron is None:
            if fallback is None:
                raise HTTPException(422, detail="neuron: required (no classifier is loaded to "
                                                "name the sentiment neuron)")
            neuron = fallback
        await self.check_neuron(neuron)
        return neuron

    def note_batch(self, response: Response, size: int) -> None:
        self.batch_sizes[int(size)] += 1
        response.headers["X-Batch-Size"] = str(int(size))

    # -- endpoints (routed in make_api) ------------------------------------------------------

    async def healthz(self) -> dict:
        info = await self.call("info")  # asked every time, not cached: proves the model answers
        return {"status": "ok", **info}

    def stats(self) -> dict:
        n = sum(self.batch_sizes.values())
        return {"requests": n, "max_batch_size_seen": max(self.batch_sizes, default=0),
                "mean_batch_size": sum(k * v for k, v in self.batch_sizes.items()) / max(n, 1),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}

    async def featurize(self, req: FeaturizeRequest, response: Response) -> JSONResponse:
        self.check_texts(req.texts)
        for j, n in enumerate(req.neurons or []):
            await self.check_neuron(n, f"neurons[{j}]")
        out = await self.call("featurize", req.texts, req.neurons)
        self.note_batch(response, out["batch_size"])
        info = await self.info()
        # A JSONResponse skips re-validating up to max_texts x rnn_size floats against the
        # response model (the schema still documents it); float32 -> float is exact.
        return JSONResponse({"features": out["features"].tolist(), "neurons": req.neurons,
                             "kind": info["feature_kind"], "layer": info["layer"]},
                            headers={"X-Batch-Size": response.headers["X-Batch-Size"]})

    async def sentiment(self, req: SentimentRequest, response: Response) -> SentimentResponse:
        self.check_texts(req.texts)
        info = await self.info()
        if not info["classifier"]:
            raise HTTPException(503, detail="no classifier loaded: deploy with classifier=FILE")
        out = await self.call("sentiment", req.texts)
        self.note_batch(response, out["batch_size"])
        results = [SentimentResult(label="positive" if p >= 0.5 else "negative",
                                   probability=float(p), neuron_value=float(v))
                   for p, v in zip(out["probability"], out["neuron_value"])]
        return SentimentResponse(results=results, neuron=info["neuron"])

    async def heatmap(self, req: HeatmapRequest):
        self.check_texts([req.text], "text")
        neuron = await self.pick_neuron(req.neuron, None)
        out = await self.call("heatmap", req.text, neuron, req.format)
        if req.format == "png":
            return Response(out, media_type="image/png")
        if req.format == "svg":
            return Response(out, media_type="image/svg+xml")
        return HeatmapValues(neuron=neuron, **out)

    async def generate(self, req: GenerateRequest) -> GenerateResponse:
        self.check_texts([req.prompt], "prompt")
        if req.length > self.cfg.max_generate_length:
            raise HTTPException(422, detail=f"length: {req.length} exceeds the limit of "
                                            f"{self.cfg.max_generate_length} bytes")
        neuron = await self.pick_neuron(req.neuron, 0)
        out = await self.call("generate", req.prompt, req.length, req.temperature, neuron,
                              req.overwrite, req.seed)
        return GenerateResponse(text=out["text"], prompt_end=int(out["prompt_end"]),
                                neuron=neuron, overwrite=req.overwrite, chars=list(out["chars"]),
                                trace=np.asarray(out["values"], dtype=np.float64).tolist())


def make_api(ingress: SentdiscAPI) -> FastAPI:
    """The FastAPI app of one ingress replica: routes, error mapping, the body-size cap."""
    cfg = ingress.cfg
    # JSON escapes can make a text up to 6x longer (\uXXXX); a body above this cannot pass.
    body_cap = 6 * cfg.max_texts * cfg.max_text_bytes + 65536
    api = FastAPI(title="sentdisc", version="0.1.0",
                  description="Byte-level mLSTM sentiment discovery: features, sentiment, "
                              "per-character neuron heatmaps and neuron-steered generation.")

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
        return JSONResponse(status_code=500, content={"detail": "internal error in the model "
                                                                 "deployment; see the server log"})

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @api.get("/healthz", summary="200 when the model replica answers")
    async def healthz() -> dict:
        return await ingress.healthz()

    @api.get("/stats", summary="batch sizes (requests per featurize call) seen by this replica")
    async def stats() -> dict:
        return ingress.stats()

    @api.post("/featurize", response_model=FeaturizeResponse,
              summary="features of each text (all neurons, or the listed ones)")
    async def featurize(req: FeaturizeRequest, response: Response):
        return await ingress.featurize(req, response)

    @api.post("/sentiment", response_model=SentimentResponse,
              summary="per text: label, P(positive), and the sentiment neuron's value")
    async def sentiment(req: SentimentRequest, response: Response):
        return await ingress.sentiment(req, response)

    @api.post("/heatmap", summary="the neuron's value after each character: PNG, SVG or JSON",
              response_model=None,
              responses={200: {"content": {"image/png": {}, "image/svg+xml": {},
                                           "application/json": {
                                               "schema": HeatmapValues.model_json_schema()}}}})
    async def heatmap(req: HeatmapRequest):
        return await ingress.heatmap(req)

    @api.post("/generate", response_model=GenerateResponse,
              summary="continue a prompt, optionally holding the neuron at a value")
    async def generate(req: GenerateRequest):
        return await ingress.generate(req)

    return api


def build_app(args: dict) -> serve.Application:
    """Application builder: validates the arguments and the files they name, then binds."""
    cfg, _ = _check_args(args)
    plain = cfg.model_dump()
    # Serve needs room for a whole batch of requests waiting on one replica.
    model = SentimentModel.options(max_ongoing_requests=max(64, 2 * cfg.max_batch_size)).bind(plain)
    return SentdiscAPI.bind(model, plain)


# --- the page ------------------------------------------------------------------------------
# Self-contained (no CDN): a textarea; typing triggers a debounced POST /sentiment and
# /heatmap (format svg). The SVG is shown through <img>, so nothing in it can run.

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sentdisc: sentiment neuron</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:15px/1.4 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
textarea{width:100%;height:7rem;font:inherit;padding:.5rem;box-sizing:border-box}
#verdict{font-size:1.3rem;margin:.8rem 0}
.positive{color:#1a7f37}.negative{color:#c0392b}
#bar{height:.6rem;background:#eee;border-radius:.3rem;overflow:hidden;margin:.3rem 0 1rem}
#fill{height:100%;width:50%;background:linear-gradient(90deg,#c0392b,#1a7f37)}
#heat{max-width:100%;border:1px solid #ddd;min-height:2rem}
#status{color:#888;font-size:.85rem}
</style></head>
<body>
<h1>sentdisc</h1>
<p>Type a review. Its sentiment and the sentiment neuron's value after each character update
as you type. API: <a href="/docs">/docs</a>.</p>
<textarea id="review" placeholder="This movie was...">This movie was a delight from start to finish.</textarea>
<div id="verdict">&nbsp;</div>
<div id="bar"><div id="fill"></div></div>
<img id="heat" alt="neuron heatmap">
<div id="status"></div>
<script>
"use strict";
const box = document.getElementById("review"), verdict = document.getElementById("verdict"),
      fill = document.getElementById("fill"), heat = document.getElementById("heat"),
      status = document.getElementById("status");
let timer = null, seq = 0, heatUrl = null;

async function post(path, body) {
  const r = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                               body: JSON.stringify(body)});
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { const j = await r.json(); msg = typeof j.detail === "string" ? j.detail : JSON.stringify(j.detail); } catch (e) {}
    throw new Error(msg);
  }
  return r;
}

async function update() {
  const text = box.value, mine = ++seq;
  if (!text.trim()) { verdict.textContent = "\\u00a0"; status.textContent = ""; return; }
  status.textContent = "...";
  try {
    const [s, h] = await Promise.all([
      post("/sentiment", {texts: [text]}).then(r => r.json()),
      post("/heatmap", {text: text, format: "svg"}).then(r => r.blob())]);
    if (mine !== seq) return;  // a newer keystroke already asked again
    const res = s.results[0];
    verdict.className = res.label;
    verdict.textContent = res.label + "  (p = " + res.probability.toFixed(3) +
        ", neuron " + s.neuron + " = " + res.neuron_value.toFixed(3) + ")";
    fill.style.width = (100 * res.probability).toFixed(1) + "%";
    if (heatUrl) URL.revokeObjectURL(heatUrl);
    heatUrl = URL.createObjectURL(h);
    heat.src = heatUrl;
    status.textContent = "";
  } catch (e) {
    if (mine === seq) status.textContent = "error: " + e.message;
  }
}

box.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(update, 250); });
update();
</script>
</body></html>
"""
