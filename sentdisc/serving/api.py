"""The HTTP API: each endpoint once, answered by the ModelServer that ``make_api`` puts in the
app's state (a Serve replica, or the plain baseline's single process).

Responses are rendered by orjson. Every error has one body shape (schemas.Error) and every
status an endpoint can return is in its OpenAPI entry; floats in responses are always finite.
/docs is Swagger UI served from the app itself (fastapi-offline's bundled assets, no CDN).
"""
from __future__ import annotations

import asyncio
import email.message
import functools
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

import sentdisc
from sentdisc.serving.model_process import MODEL
from sentdisc.serving.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    FeaturizeRequest,
    FeaturizeResponse,
    GenerateRequest,
    GenerateResponse,
    HeatmapRequest,
    HeatmapValues,
    SentimentRequest,
    SentimentResponse,
    apply_caps,
    errors,
)
from sentdisc.serving.server import ModelError, Unavailable, invalid


class ORJSONResponse(JSONResponse):
    """JSON rendered by orjson (FastAPI's own ORJSONResponse is deprecated in favour of pydantic
    serialization, which would re-validate every float of a /featurize answer)."""

    def render(self, content) -> bytes:
        return orjson.dumps(content)


RETRY_AFTER_S = 1  # what a 503 tells the client to wait: a replica restarts in seconds
ERRORS = errors(400, 413, 415, 422, 500, 503)  # what every POST endpoint can answer besides 200
# Heatmaps are drawn here, not in the model's process (where a long text's PNG held up every
# other request for seconds): off the event loop, a few at a time. Matplotlib's object API
# (viz.render_png: a Figure of its own, no pyplot) is safe with one figure per thread.
_DRAW = ThreadPoolExecutor(2, thread_name_prefix="sentdisc-draw")


async def _drawn(fn, *args, **kwargs):
    return await asyncio.get_running_loop().run_in_executor(
        _DRAW, functools.partial(fn, *args, **kwargs))


async def _server(request: Request) -> Any:
    # async: FastAPI runs a plain-def dependency in a thread pool, a thread hop per request
    return request.app.state.server


Server = Annotated[Any, Depends(_server)]  # this process's ModelServer
router = APIRouter(default_response_class=ORJSONResponse)


def finite(a) -> list:
    """Values as JSON floats: never NaN or inf (orjson would write null where the schema
    promises a number); a non-finite value is clipped to the float32 range, NaN to 0."""
    a = np.asarray(a, dtype=np.float64)
    big = float(np.finfo(np.float32).max)
    return np.nan_to_num(a, nan=0.0, posinf=big, neginf=-big).tolist()


@functools.cache
def _page() -> str:
    # Package data (pyproject.toml: "sentdisc.serving" = ["*.html"]): it ships in the wheel.
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(_page())


@router.get("/healthz", summary="200 when the model is loaded and answering; 503 with the "
                                "reason when it could not be loaded", responses=errors(503))
async def healthz(server: Server):
    info = server.info()
    return ORJSONResponse(info, status_code=200 if info["status"] == "ok" else 503)


@router.get("/stats", summary="how many texts the model's running batch held as each request "
                            "ended, counted by this process")
async def stats(server: Server) -> dict:
    return server.stats()


@router.post("/featurize", response_model=FeaturizeResponse, responses=ERRORS,
             summary="features of each text (all neurons, or the listed ones)")
async def featurize(req: FeaturizeRequest, server: Server) -> ORJSONResponse:
    server.check_texts(req.texts)
    for j, n in enumerate(req.neurons or []):
        server.check_neuron(n, f"neurons.{j}")
    feats, batch = await server.features(req.texts)
    if req.neurons is not None:
        feats = feats[:, req.neurons]
    # Built directly: re-validating max_texts x rnn_size floats against the response model
    # would cost more than the featurize call (the schema still documents the shape).
    return ORJSONResponse({"features": finite(feats), "neurons": req.neurons,
                           "kind": server.probe.feature_kind, "layer": server.probe.layer},
                          headers={"X-Batch-Size": str(batch)})


@router.post("/sentiment", response_model=SentimentResponse, responses=errors(
                400, 409, 413, 415, 422, 500, 503),
             summary="binary classifiers: per text its label, P(positive) and the sentiment "
                     "neuron's value (/classify answers every kind)")
async def sentiment(req: SentimentRequest, server: Server) -> ORJSONResponse:
    server.check_texts(req.texts)
    clf = server.the_classifier()
    if clf.label_kind != "binary":
        raise HTTPException(409, detail=(
            f"/sentiment answers binary classifiers; this one is {clf.label_kind} "
            f"({len(clf.labels)} labels: {', '.join(clf.labels[:8])}"
            f"{' ...' if len(clf.labels) > 8 else ''}): use POST /classify"))
    feats, batch = await server.features(req.texts)
    prob = clf.predict_proba(feats)
    neuron = server.probe.neuron
    results = [{"label": label, "probability": p, "neuron_value": v} for label, p, v in zip(
        clf.predict_labels(feats), finite(prob), finite(feats[:, neuron]), strict=True)]
    return ORJSONResponse({"results": results, "neuron": neuron},
                          headers={"X-Batch-Size": str(batch)})


@router.post("/classify", response_model=ClassifyResponse, responses=ERRORS,
             summary="per text: the predicted label(s) and every label's probability, for a "
                     "binary, multi-class or multi-label classifier")
async def classify(req: ClassifyRequest, server: Server) -> ORJSONResponse:
    server.check_texts(req.texts)
    clf = server.the_classifier()
    feats, batch = await server.features(req.texts)
    proba = clf.label_proba(feats)
    predicted = clf.predict_labels(feats)
    single = clf.label_kind != "multilabel"
    results = [{"label": said if single else None, "labels": [said] if single else said,
                "probabilities": dict(zip(clf.labels, finite(p), strict=True))}
               for said, p in zip(predicted, proba, strict=True)]
    return ORJSONResponse({"results": results, "label_kind": clf.label_kind,
                           "labels": clf.labels}, headers={"X-Batch-Size": str(batch)})


@router.post("/heatmap", summary="the neuron's value after each character: PNG, SVG or JSON",
             response_model=None,
             responses={200: {"content": {"image/png": {}, "image/svg+xml": {},
                                          "application/json": {
                                              "schema": HeatmapValues.model_json_schema()}}},
                        **ERRORS})
async def heatmap(req: HeatmapRequest, server: Server):
    from sentdisc import viz

    server.check_text(req.text, "text")
    neuron, negate = server.pick_neuron(req.neuron, None, req.label)
    chars, values = await server.work(viz.neuron_values, MODEL, req.text, neuron,
                                      layer=server.probe.layer, kind=server.probe.trace_kind,
                                      negate=negate)
    # drawn in this process (the model's is free for the next request), off the event loop
    if req.format == "png":
        png = await _drawn(viz.render_png, chars, values, title=f"neuron {neuron}")
        return Response(png, media_type="image/png")
    if req.format == "svg":
        return Response(await _drawn(viz.render_svg, chars, values),
                        media_type="image/svg+xml")
    return ORJSONResponse({"chars": list(chars), "values": finite(values), "neuron": neuron,
                           "negated": negate})


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS,
             summary="continue a prompt, optionally holding the neuron at a value")
async def generate(req: GenerateRequest, server: Server) -> ORJSONResponse:
    from sentdisc import viz

    server.check_text(req.prompt, "prompt")
    cap = server.args.max_generate_length
    length = req.length if "length" in req.model_fields_set else min(req.length, cap)
    if length > cap:  # the schema's maximum is this deployment's cap (apply_caps)
        raise invalid("length", f"{length} exceeds the limit of {cap} bytes")
    neuron, negate = server.pick_neuron(req.neuron, 0, req.label)
    out = await server.work(viz.generate_text, MODEL, req.prompt, length,
                            req.temperature, neuron=neuron, overwrite=req.overwrite,
                            layer=server.probe.layer, seed=req.seed, negate=negate)
    return ORJSONResponse({"text": out["text"], "prompt_end": int(out["prompt_end"]),
                           "neuron": neuron, "overwrite": req.overwrite,
                           "chars": list(out["chars"]), "trace": finite(out["values"])})


def _body_cap(server) -> int:
    # JSON escapes can make a text up to 6x longer (\uXXXX); a body above this cannot pass.
    return 6 * server.args.max_texts * server.args.max_text_bytes + 65536


class BodyCap:
    """Refuse a body that cannot fit the caps (413): from its Content-Length before reading it,
    or, sent without one (chunked), as soon as the bytes read pass the limit. Plain ASGI:
    Starlette's BaseHTTPMiddleware would wrap every request and response (a measured cost per
    request)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit():
            if int(length) > self.limit:
                return await self._refuse(f"{int(length)} bytes", scope, receive, send)
            # The HTTP server holds the body to its Content-Length: nothing to count.
            return await self.app(scope, receive, send)
        seen, over = 0, False

        async def counted():
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                # Told the client left, the app stops reading; what it answers gives way to
                # the 413 below.
                over = True
                return {"type": "http.disconnect"}
            return message

        async def unless_over(message):
            if not over:
                await send(message)

        await self.app(scope, counted, unless_over)
        if over:
            await self._refuse(f"at least {seen} bytes", scope, receive, send)

    async def _refuse(self, size: str, scope, receive, send):
        msg = f"request body of {size} exceeds the {self.limit}-byte limit"
        response = _error(413, [{"loc": ["body"], "msg": msg, "type": "too_large"}])
        await response(scope, receive, send)


def _error(status: int, detail, headers: dict | None = None) -> ORJSONResponse:
    return ORJSONResponse({"detail": detail}, status_code=status, headers=headers)


def _is_json(content_type: str | None) -> bool:
    # as FastAPI decides whether to parse a body as JSON (application/json or +json)
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json"))


def _parse_failure(exc: BaseException) -> str:
    """What made FastAPI's "error parsing the body" (400): the decoder's own words."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not UTF-8: byte 0x{cause.object[cause.start]:02x} at " \
               f"{cause.start} does not decode"
    if isinstance(cause, RecursionError):
        return "the body is not JSON this server can read: nested too deeply"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return "the body is not JSON this server can read: an integer of over 4300 digits"
    if cause is not None:
        return f"the body could not be parsed as JSON: {type(cause).__name__}: " \
               f"{str(cause)[:200]}"
    return str(getattr(exc, "detail", "")) or "the body could not be parsed"


def _add_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        if isinstance(exc.body, bytes | bytearray) and exc.body and \
                not _is_json(request.headers.get("content-type")):
            # FastAPI left the body unparsed: "Input should be a valid dictionary" would
            # blame its content, not its missing header
            return _error(415, [{"loc": ["header", "content-type"], "msg": (
                f"the body was sent as {request.headers.get('content-type') or 'no type'}: "
                "send Content-Type: application/json"), "type": "unsupported_media_type"}])
        # FastAPI's default echoes the whole input back; a 1 MB body would come back too.
        return _error(422, [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""),
                             "type": e.get("type", "")} for e in exc.errors()[:20]])

    # Starlette's, not FastAPI's subclass: routing (404, 405) and body parsing (400) raise it
    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            detail = [{"loc": ["body"], "msg": _parse_failure(exc), "type": "body_unparsable"}]
        elif isinstance(detail, str):  # one shape for every error: a list of {loc, msg, type}
            detail = [{"loc": [], "msg": detail, "type": "http_error"}]
        # Retry-After only where the exception says (a condition that clears)
        return _error(exc.status_code, detail, getattr(exc, "headers", None))

    @api.exception_handler(Unavailable)
    async def unavailable(request: Request, exc: Unavailable):
        # a model process that died is replaced with its replica; a load failure stays
        return _error(503, [{"loc": [], "msg": str(exc), "type": "unavailable"}],
                      {"Retry-After": str(RETRY_AFTER_S)} if exc.retry else None)

    @api.exception_handler(ModelError)
    async def model_error(request: Request, exc: ModelError):
        return _error(500, [{"loc": [], "msg": "internal error in the model; see the server "
                                               "log", "type": "internal"}])


def make_api(server) -> FastAPI:
    """The FastAPI app of one ModelServer: the routes, the body-size cap, the error mapping,
    the caps in the schema, offline docs."""
    api = FastAPIOffline(title="sentdisc", version=sentdisc.__version__,
                         default_response_class=ORJSONResponse,
                         description="Byte-level mLSTM sentiment discovery: features, sentiment, "
                                     "per-character neuron heatmaps and neuron-steered "
                                     "generation.")
    api.state.server = server
    api.include_router(router)

    api.add_middleware(BodyCap, limit=_body_cap(server))
    _add_error_handlers(api)
    plain_openapi = api.openapi

    def openapi() -> dict:
        if api.openapi_schema is None:
            a = server.args
            rnn = None if server.failure else server.config.rnn_size
            labels = None if server.failure else [
                label for label, _, _ in server.probe.label_neurons]
            clf = None if server.failure else server.classifier is not None
            api.openapi_schema = apply_caps(plain_openapi(), a.max_texts, a.max_text_bytes,
                                            a.max_generate_length, rnn, labels, clf)
        return api.openapi_schema

    api.openapi = openapi
    return api
