"""`birds serve`: a FastAPI app over the predictor seam of `birdcli.predict`, with Prometheus metrics and monitoring.

- The model is loaded once, in a background thread at start-up (`/health` answers at once, `/ready` when loaded);
  one batcher thread owns it: concurrent requests queue up and run through the model together (greedy batching: no
  added wait when idle, bigger batches under load), so nothing is shared unsafely and nothing is ever re-loaded.
- An upload is checked before the model sees it, with the same checks as `birds predict` (`birdcli.images`): request
  content type, body size (413, streamed bodies too), empty upload, not an image, decompression bomb, corrupt or
  truncated data. Every error is JSON `{"error": code, "detail": reason}`; a bug is a JSON 500 whose traceback goes
  to the server log only.
- `/metrics` is prometheus_client's exposition (per-app registry; the multiprocess collector with --workers > 1).
- With `--monitor DIR` each image's summary (statistics, prediction, embedding; never the image unless
  `--monitor-images`) goes to a rotated JSON-lines store that `birds drift` reads.
An ONNX export folder is served through onnxruntime with no torch imported at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from birdcli import __version__, images, monitoring
from birdcli.errors import BirdsError

log = logging.getLogger("uvicorn.error")  # uvicorn configures this one: our lines look like its own
ROUTES = ("/predict", "/predict/batch", "/health", "/ready", "/labels", "/metrics", "/docs", "/redoc", "/openapi.json")
UPLOAD_ROUTES = ("/predict", "/predict/batch")
SETTINGS_ENV = "BIRDS_SERVE_SETTINGS"  # how `--workers N` hands the settings to each worker process
OK_PART_TYPES = ("image/", "application/octet-stream")


@dataclass
class Settings:
    """Everything a server process needs; plain values so it travels to worker processes as JSON."""

    model: str  # a model folder (HF or ONNX export), already resolved
    device: str = "auto"
    precision: str = "auto"
    backend: str = "auto"
    top_k: int = 5
    max_body_mb: float = 10.0
    max_files: int = 32
    max_batch: int = 16
    threads: int = 0  # intra-op threads for the model (0: the library's default, one per core)
    monitor: str | None = None
    monitor_max_mb: float = 50.0
    monitor_backups: int = 5
    monitor_images: bool = False
    embeddings: bool = True
    per_process_store: bool = False  # several workers: one store file per process
    background_load: bool = True  # False: load inside the lifespan (the TestClient waits for it)


# ---------------------------------------------------------------- response schemas (OpenAPI)

_MODEL_EXAMPLE: Any = {"name": "smoke/20250101-120000/best", "version": "3f2a9c1d0b7e", "backend": "torch"}
_PRED_EXAMPLE: Any = [
    {"species": "ABBOTTS BABBLER", "probability": 0.9312},
    {"species": "AFRICAN FIREFINCH", "probability": 0.0408},
]


class Species(BaseModel):
    species: str
    probability: float


class ModelInfo(BaseModel):
    name: str
    version: str
    backend: str


class ImageInfo(BaseModel):
    width: int
    height: int
    format: str


class Prediction(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "predictions": _PRED_EXAMPLE,
                    "model": _MODEL_EXAMPLE,
                    "image": {"width": 224, "height": 224, "format": "JPEG"},
                    "latency_ms": 41.7,
                }
            ]
        }
    )
    predictions: list[Species]
    model: ModelInfo
    image: ImageInfo
    latency_ms: float


class BatchItem(BaseModel):
    filename: str | None = None
    status: int
    predictions: list[Species] | None = None
    image: ImageInfo | None = None
    error: str | None = None
    detail: str | None = None


class BatchPrediction(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "results": [
                        {
                            "filename": "bird.jpg",
                            "status": 200,
                            "predictions": _PRED_EXAMPLE,
                            "image": {"width": 224, "height": 224, "format": "JPEG"},
                        },
                        {"filename": "notes.txt", "status": 415, "error": "not_an_image", "detail": "not an image"},
                    ],
                    "model": _MODEL_EXAMPLE,
                    "latency_ms": 63.2,
                }
            ]
        }
    )
    results: list[BatchItem]
    model: ModelInfo
    latency_ms: float


class ErrorBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"error": "not_an_image", "detail": "not an image (unknown or broken format)"}]}
    )
    error: str
    detail: str


class Labels(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"count": 2, "labels": ["ABBOTTS BABBLER", "AFRICAN FIREFINCH"]}]}
    )
    count: int
    labels: list[str]


TopK = Annotated[int | None, Query(ge=1, le=1000, description="Species to return (default: the server's --top-k).")]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "Empty upload",
        413: "Body over the size limit, too many files, or a decompression bomb",
        415: "Not multipart/form-data, or the upload is not an image",
        422: "Missing field, or a corrupt/truncated image",
        503: "Model not loaded yet (or it failed to load)",
    }
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}


# ---------------------------------------------------------------- errors


class Problem(HTTPException):
    """An HTTP error with a machine-readable code; rendered as {"error": code, "detail": reason}."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail=detail, headers=headers)
        self.code = code


_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 503: "not_ready"}


def classify(reason: str) -> Problem:
    """The HTTP answer for an images.ImageError reason."""
    if "decompression bomb" in reason:
        return Problem(413, "decompression_bomb", reason)
    if reason.startswith("not an image"):
        return Problem(415, "not_an_image", reason)
    if reason.startswith("empty"):
        return Problem(400, "empty_upload", reason)
    return Problem(422, "corrupt_image", reason)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = getattr(exc, "code", None) or _CODES.get(exc.status_code, f"http_{exc.status_code}")
    return JSONResponse({"error": code, "detail": str(exc.detail)}, exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query"))
        parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg", "invalid")))
    return JSONResponse({"error": "invalid_request", "detail": "; ".join(parts) or "invalid request"}, 422)


async def _crash(request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error on %s %s: %r", request.method, request.url.path, exc)  # uvicorn logs the traceback
    return JSONResponse({"error": "internal_error", "detail": "unexpected server error (see the server log)"}, 500)


# ---------------------------------------------------------------- metrics


class Metrics:
    """The Prometheus series, in a registry of this app's own (tests build many apps in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no *_created series: half the lines, nothing a dashboard uses
        self.registry = CollectorRegistry()
        r = self.registry
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.requests = Counter(
            "birds_http_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "birds_http_request_duration_seconds",
            "Request latency by route, from the first byte in to the last byte out.",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.predicted = Counter("birds_predictions", "Predicted (top-1) species.", ["species"], registry=r)
        self.confidence = Histogram(
            "birds_prediction_confidence", "Top-1 probability.", buckets=[i / 10 for i in range(1, 11)], registry=r
        )
        self.rejected = Counter("birds_rejected_images", "Uploads refused, by reason.", ["reason"], registry=r)
        sides = (32, 64, 128, 224, 256, 512, 1024, 2048, 4096, 8192)
        self.width = Histogram("birds_image_width_pixels", "Uploaded image width.", buckets=sides, registry=r)
        self.height = Histogram("birds_image_height_pixels", "Uploaded image height.", buckets=sides, registry=r)
        self.bytes = Histogram(
            "birds_image_bytes", "Uploaded file size.", buckets=[2**k for k in range(10, 25, 2)], registry=r
        )
        unit = [i / 10 for i in range(1, 11)]
        self.brightness = Histogram("birds_image_brightness", "Mean luma in [0, 1].", buckets=unit, registry=r)
        self.saturation = Histogram(
            "birds_image_saturation", "Mean HSV saturation in [0, 1].", buckets=unit, registry=r
        )
        self.batch = Histogram(
            "birds_inference_batch_size", "Images per model call.", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.inference = Histogram(
            "birds_inference_duration_seconds",
            "Seconds per model call (decode + forward).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.ready = Gauge("birds_model_ready", "1 once the model is loaded.", registry=r, multiprocess_mode="max")
        self.info = Gauge(
            "birds_model_info", "The model served.", ["name", "version", "backend"], registry=r, multiprocess_mode="max"
        )

    def image(self, summary: dict[str, Any]) -> None:
        self.width.observe(summary["width"])
        self.height.observe(summary["height"])
        self.bytes.observe(summary["bytes"])
        self.brightness.observe(summary["brightness"])
        self.saturation.observe(summary["saturation"])

    def exposition(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        if self.multiprocess:  # every worker's numbers, from the shared folder
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class Guard:
    """ASGI middleware: request metrics for every route, and the upload checks that must come before parsing.

    Upload routes must be multipart/form-data (415), declare at most the size limit (413 before a byte is read),
    and a body streamed without Content-Length is cut off with 413 as soon as it passes the limit.
    """

    def __init__(self, app: Any, limit: int, metrics: Metrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        route = path if path in ROUTES else "other"  # unknown paths share one label: bounded cardinality
        status = 500
        start = time.perf_counter()

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if path in UPLOAD_ROUTES and method == "POST":
                problem = self._check_headers(scope)
                if problem is not None:
                    self.metrics.rejected.labels(problem.code).inc()
                    await _send_json(
                        send_status, problem.status_code, {"error": problem.code, "detail": problem.detail}
                    )
                    return
                receive = self._limited(receive)
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    def _check_headers(self, scope: dict) -> Problem | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        ctype = headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            return Problem(
                415,
                "unsupported_media_type",
                f"send the image as multipart/form-data (got {ctype or 'no content type'}), "
                "e.g. curl -F image=@bird.jpg URL",
            )
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return Problem(413, "payload_too_large", f"body of {int(length):,} bytes is over the {_limit(self.limit)}")
        return None

    def _limited(self, receive: Callable) -> Callable:
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # raised inside form parsing: FastAPI re-raises HTTPException as is
                    self.metrics.rejected.labels("payload_too_large").inc()
                    raise Problem(413, "payload_too_large", f"body is over the {_limit(self.limit)}")
            return message

        return limited


def _limit(limit: int) -> str:
    return f"{limit / 2**20:g} MB limit (birds serve --max-body-mb)"


async def _send_json(send: Callable, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


# ---------------------------------------------------------------- the model, owned by one thread


class Batcher:
    """One thread runs the model; requests queue up and whatever is waiting goes through together (up to max_batch)."""

    def __init__(self, predictor: Any, max_batch: int, embedder: monitoring.Embedder | None, metrics: Metrics) -> None:
        self.predictor, self.max_batch, self.embedder, self.metrics = predictor, max(1, max_batch), embedder, metrics
        self.queue: queue.Queue[tuple[str, Future] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="birds-batcher", daemon=True)
        self.thread.start()

    def submit(self, path: str) -> Future:
        fut: Future = Future()
        self.queue.put((path, fut))
        return fut

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)  # finish this batch, then stop
                    break
                batch.append(nxt)
            self._run(batch)

    def _run(self, batch: list[tuple[str, Future]]) -> None:
        start = time.perf_counter()
        try:
            outcomes = self.predictor.predict([p for p, _ in batch])
            vectors = self.embedder.rows(outcomes) if self.embedder else [None] * len(outcomes)
        except Exception as e:  # noqa: BLE001 - handed to every waiting request, which answers a JSON 500
            for _, fut in batch:
                fut.set_exception(e)
            return
        self.metrics.batch.observe(len(batch))
        self.metrics.inference.observe(time.perf_counter() - start)
        for (_, fut), outcome, vector in zip(batch, outcomes, vectors, strict=True):
            fut.set_result((outcome, vector))


# ---------------------------------------------------------------- app state


class State:
    """The loaded model and what serves it; `ready` once `load` has run."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.ready = False
        self.error: str | None = None
        self.on_fatal: Callable[[str], None] | None = None
        self.predictor: Any = None
        self.batcher: Batcher | None = None
        self.store: monitoring.Store | None = None
        self.embedder_kind: str | None = None
        self.model = ModelInfo(name=model_name(Path(settings.model)), version="", backend="")
        self.tmp = Path(tempfile.mkdtemp(prefix="birds-serve-"))

    def load(self) -> None:
        s = self.settings
        try:
            start = time.perf_counter()
            predictor = _load_predictor(s)
            backend = "onnx" if type(predictor).__name__.lower().startswith("onnx") else "torch"
            self.model = ModelInfo(name=self.model.name, version=model_version(Path(s.model)), backend=backend)
            embedder = None
            if s.monitor:
                name = f"requests-{os.getpid()}.jsonl" if s.per_process_store else monitoring.STORE_NAME
                self.store = monitoring.Store(
                    s.monitor, int(s.monitor_max_mb * 2**20), s.monitor_backups, s.monitor_images, name
                )
                embedder = monitoring.Embedder(predictor) if s.embeddings else None
                self.embedder_kind = embedder.kind if embedder else None
            self.predictor = predictor
            _warm_up(predictor, self.tmp)
            self.batcher = Batcher(predictor, s.max_batch, embedder, self.metrics)
            self.metrics.info.labels(self.model.name, self.model.version, backend).set(1)
            self.metrics.ready.set(1)
            self.ready = True
            log.info(
                "model %s (%s, version %s, %d species) loaded in %.1f s",
                self.model.name, backend, self.model.version, len(predictor.labels), time.perf_counter() - start,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - reported by /ready and, under `birds serve`, stops the server
            self.error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log.error("cannot load the model %s: %s", s.model, self.error)
            if self.on_fatal:
                self.on_fatal(self.error)

    def close(self) -> None:
        if self.batcher:
            self.batcher.close()
        if self.store:
            self.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _load_predictor(s: Settings) -> Any:
    """The `birdcli.predict` seam's predictor, with --threads applied (ONNX: its session; torch: intra-op threads)."""
    from birdcli.onnx_backend import OnnxPredictor, is_export
    from birdcli.predict import load_predictor

    onnx = s.backend == "onnx" or (s.backend == "auto" and is_export(s.model))
    if onnx and s.threads:
        return OnnxPredictor(s.model, s.device, s.threads)
    predictor = load_predictor(s.model, s.device, s.precision, s.backend)
    if s.threads and not onnx:
        import torch

        torch.set_num_threads(s.threads)  # process-wide: the batcher thread is the only one running the model
    return predictor


def _warm_up(predictor: Any, tmp: Path) -> None:
    """One forward pass on a blank image, so the first request does not pay for lazy initialisation."""
    from PIL import Image

    blank = tmp / "warm-up.png"
    Image.new("RGB", (predictor.preprocess.width, predictor.preprocess.height), (128, 128, 128)).save(blank)
    predictor.predict([str(blank)])
    blank.unlink()


def model_name(folder: Path) -> str:
    """exp/run/best for a run's model folder, else the folder's name."""
    if (folder.parent / "config.yaml").is_file() or (folder.parent / "manifest.json").is_file():
        return "/".join(folder.resolve().parts[-3:])
    return folder.name


def model_version(folder: Path) -> str:
    """The first 12 hex digits of the weights' SHA-256: changes exactly when the served weights change."""
    for name in ("model.onnx", "model.safetensors", "pytorch_model.bin"):
        f = folder / name
        if f.is_file():
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(2**20), b""):
                    h.update(block)
            return h.hexdigest()[:12]
    return "unknown"


# ---------------------------------------------------------------- the app


def create_app(settings: Settings) -> FastAPI:
    """The FastAPI app for one model folder; the model loads when the app starts (lifespan)."""
    metrics = Metrics()
    state = State(settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.background_load:
            threading.Thread(target=state.load, name="birds-load", daemon=True).start()
        else:
            await run_in_threadpool(state.load)
        yield
        state.close()

    app = FastAPI(
        title="birds serve",
        version=__version__,
        summary="Bird-species classification: upload an image, get the most likely species.",
        description=(
            "Try it: `curl -F image=@bird.jpg http://127.0.0.1:8000/predict`. Errors are JSON "
            '`{"error": code, "detail": reason}`. Metrics for Prometheus at `/metrics`.'
        ),
        lifespan=lifespan,
    )
    app.state.birds = state
    app.add_middleware(Guard, limit=int(settings.max_body_mb * 2**20), metrics=metrics)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _crash)

    def need_ready() -> State:
        if not state.ready:
            if state.error:
                raise Problem(503, "not_ready", f"the model failed to load: {state.error}")
            raise Problem(503, "not_ready", "the model is still loading; retry shortly", {"Retry-After": "1"})
        return state

    @app.post(
        "/predict",
        response_model=Prediction,
        responses=_errors(400, 413, 415, 422, 503),
        summary="Top-k species for one image",
    )
    async def predict(
        image: Annotated[UploadFile, File(description="An image file: JPEG, PNG, WebP, GIF, BMP or TIFF.")],
        top_k: TopK = None,
    ) -> Prediction:
        start = time.perf_counter()
        st = need_ready()
        result = await _predict_one(st, image, top_k or settings.top_k, "/predict")
        if isinstance(result, Problem):
            raise result
        species, info = result
        return Prediction(predictions=species, model=st.model, image=info, latency_ms=monitoring.elapsed_ms(start))

    @app.post(
        "/predict/batch",
        response_model=BatchPrediction,
        response_model_exclude_none=True,
        responses=_errors(413, 415, 422, 503),
        summary="Top-k species for several images",
        description="One `images` field per image. A bad file gets its own error entry; the rest are predicted.",
    )
    async def predict_batch(
        images: Annotated[list[UploadFile], File(description="Image files, one `images` field each.")],
        top_k: TopK = None,
    ) -> BatchPrediction:
        start = time.perf_counter()
        st = need_ready()
        if len(images) > settings.max_files:
            raise Problem(413, "too_many_files", f"{len(images)} images, over the limit of {settings.max_files}")
        k = top_k or settings.top_k
        results = await asyncio.gather(*(_predict_one(st, im, k, "/predict/batch") for im in images))
        items = []
        for upload, r in zip(images, results, strict=True):
            if isinstance(r, Problem):
                items.append(BatchItem(filename=upload.filename, status=r.status_code, error=r.code, detail=r.detail))
            else:
                items.append(BatchItem(filename=upload.filename, status=200, predictions=r[0], image=r[1]))
        return BatchPrediction(results=items, model=st.model, latency_ms=monitoring.elapsed_ms(start))

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: the model is loaded", responses=_errors(503))
    async def ready() -> JSONResponse:
        if not state.ready:
            body = {"ready": False, "status": "failed" if state.error else "loading", "detail": state.error or ""}
            return JSONResponse(body, 503)
        return JSONResponse({"ready": True, "model": state.model.model_dump(), "species": len(state.predictor.labels)})

    @app.get("/labels", response_model=Labels, summary="The species the model knows", responses=_errors(503))
    async def labels() -> Labels:
        st = need_ready()
        return Labels(count=len(st.predictor.labels), labels=list(st.predictor.labels))

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics_route() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _predict_one(st: State, upload: UploadFile, k: int, route: str) -> tuple[list[Species], ImageInfo] | Problem:
    """Check, summarise and predict one upload; a Problem instead of raising, so a batch can go on."""
    start = time.perf_counter()
    metrics = st.metrics
    data = await upload.read()
    declared = (upload.content_type or "").lower()
    if not data:
        problem: Problem | None = Problem(400, "empty_upload", f"{upload.filename or 'the upload'} is empty (0 bytes)")
    elif declared and not declared.startswith(OK_PART_TYPES):
        problem = Problem(415, "not_an_image", f"the upload declares content type {declared}, not an image")
    else:
        problem = None
    summary: dict[str, Any] = {}
    path = st.tmp / uuid.uuid4().hex  # never the client's file name: Pillow tells formats by their bytes
    try:
        if problem is None:
            try:
                summary = await run_in_threadpool(_spool_and_summarize, path, data)
            except images.ImageError as e:
                problem = classify(str(e))
        if problem is not None:
            metrics.rejected.labels(problem.code).inc()
            if st.store:
                st.store.append({"ts": monitoring.now(), "route": route, "error": problem.code, "bytes": len(data)})
            return problem
        assert st.batcher is not None
        outcome, vector = await asyncio.wrap_future(st.batcher.submit(str(path)))
    finally:
        path.unlink(missing_ok=True)
    if outcome.probs is None:  # decoded for the statistics but not by the backend: still the file's fault
        problem = classify(outcome.error or "corrupt image")
        metrics.rejected.labels(problem.code).inc()
        return problem

    from birdcli.predict import top_k as best

    species = [Species(species=n, probability=round(p, 6)) for n, p in best(outcome.probs, st.predictor.labels, k)]
    metrics.image(summary)
    metrics.predicted.labels(species[0].species).inc()
    metrics.confidence.observe(species[0].probability)
    if st.store:
        _record(st, route, summary, species[0], vector, data, upload.filename, start)
    return species, ImageInfo(width=summary["width"], height=summary["height"], format=summary["format"])


def _spool_and_summarize(path: Path, data: bytes) -> dict[str, Any]:
    path.write_bytes(data)  # the predictor seam takes paths; the file lives for this request only
    return monitoring.summarize(path)


def _record(
    st: State,
    route: str,
    summary: dict[str, Any],
    top: Species,
    vector: np.ndarray | None,
    data: bytes,
    filename: str | None,
    start: float,
) -> None:
    assert st.store is not None
    rec: dict[str, Any] = {
        "ts": monitoring.now(),
        "route": route,
        "model": st.model.name,
        "version": st.model.version,
        **summary,
        "top1": top.species,
        "p_top1": top.probability,
        "latency_ms": monitoring.elapsed_ms(start),
    }
    if vector is not None and st.embedder_kind:
        rec["embedding_kind"] = st.embedder_kind
        rec["embedding"] = monitoring.encode_vector(vector)
    if st.settings.monitor_images:
        rec["image_file"] = st.store.keep_image(data, Path(filename or "").suffix)
    st.store.append(rec)


# ---------------------------------------------------------------- running it


def app_from_env() -> FastAPI:
    """The app factory each `--workers N` process calls (uvicorn imports it by name)."""
    return create_app(Settings(**json.loads(os.environ[SETTINGS_ENV])))


def check_port(host: str, port: int) -> None:
    """Fail with one line before uvicorn starts, instead of a log line and a bare exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise BirdsError(f"cannot listen on {host}:{port}: {e.strerror or e}", "pick another --port") from None


def serve(
    settings: Settings, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, log_level: str = "info",
    access_log: bool = True,
) -> None:  # fmt: skip
    """Run uvicorn until Ctrl-C; raises BirdsError when the model cannot be loaded."""
    import uvicorn

    if workers < 1:
        raise BirdsError(f"--workers {workers}: must be at least 1")
    check_port(host, port)
    common = {"host": host, "port": port, "log_level": log_level, "access_log": access_log}
    if workers > 1:  # each process loads the model once; metrics are summed over them through a shared folder
        os.environ[SETTINGS_ENV] = json.dumps(asdict(settings) | {"per_process_store": True})
        scratch = None
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            scratch = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="birds-prometheus-")
        try:
            with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C after a clean shutdown
                uvicorn.run("birdcli.serve:app_from_env", factory=True, workers=workers, **common)  # type: ignore[arg-type]
        finally:
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)
        return
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, timeout_graceful_shutdown=5, **common))  # type: ignore[arg-type]
    state: State = app.state.birds
    state.on_fatal = lambda error: setattr(server, "should_exit", True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a server is stopped: exit 0 after a clean shutdown
        server.run()
    if state.error:
        raise BirdsError(f"cannot serve {settings.model}: {state.error}")
