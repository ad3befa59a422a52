"""The inference service: FastAPI app factory, settings, hot-swappable model, `pep-torchrec serve`.

    pep-torchrec serve --artifact out/artifact [--host 127.0.0.1] [--port 8080]

Endpoints:
    POST /v1/predict      {"instances": [{raw field: value, ...}, ...]} → {"scores": [...], "model_version"}
    GET  /healthz         the process is up (200)
    GET  /readyz          200 once a model is loaded, 503 before
    GET  /metrics         Prometheus text: request counts (every status), latency histograms, batch
                          sizes, reloads
    POST /admin/reload    load the artifact again (or {"artifact": path under the artifact root,
                          "force": bool}) and swap it in; SIGHUP too. Only when an admin token is
                          configured (PEP_SERVE_ADMIN_TOKEN; `Authorization: Bearer <token>`,
                          compared in constant time): without one the route does not exist (404)
    GET  /docs, /openapi.json

Bad requests get 4xx with FastAPI's error shape ({"detail": [{"loc", "msg", "type"}]}) naming the
field: 422 for wrong types, unknown or missing fields and too many instances, 413 for a body over
`max_body_bytes`. The artifact is loaded before the port is bound (`run`; an app built with
`create_app` alone loads it in its lifespan); a corrupted or partial one stops the start with its
`ArtifactError`. A reload builds and verifies the new model completely before one reference
assignment swaps it in: a request holds the model it started with, so in-flight requests finish on
the old model, and a bad artifact leaves the old one serving (the reload answers 409 with the error).
A reload whose artifact takes other input fields (names or types) than the served one is refused
(409) unless forced: clients would start getting 422s. Responses never name filesystem paths (the
artifact's location is in the service log); /v1/predict answers 503 until a model is loaded.
Endpoints are plain `def` (torch work blocks; FastAPI runs them in its thread pool).

`POST /v1/predict` has a fast path (`_FastPredict`, a pure ASGI layer in front of the app): a JSON
body the request model would accept is parsed, scored and answered without the framework's
per-request machinery (the http middleware's task group and streams, dependency solving, pydantic
validation of every instance, a thread-pool hop), which cost more than the model itself at batch 1
(before/after: benchmarks/results/serving_load*.md). Anything else (another content type, a body the request model
or the predictor refuses, no model yet, a body over the limit) goes to the regular route with the
body replayed, so every error is the regular path's, word for word; tests/serving/test_serving.py compares
both paths byte for byte.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from starlette.concurrency import run_in_threadpool

from pep_torchrec.config import ConfigError, env_values, from_dict
from pep_torchrec.export.format import ArtifactError
from pep_torchrec.serving.predictor import Predictor, RequestError
from pep_torchrec.serving.prometheus import ServiceMetrics

logger = logging.getLogger(__name__)


ENV_PREFIX = "PEP_SERVE_"
"""Each setting's environment variable: PEP_SERVE_<FIELD> (PEP_SERVE_PORT, PEP_SERVE_ADMIN_TOKEN, ...)."""


@dataclass(frozen=True)
class Settings:
    """Service settings, a typed config built by `pep_torchrec.config`'s machinery: flags (`overrides`
    of `from_env`) > PEP_SERVE_<FIELD> environment variables > these defaults.

    Attributes:
        artifact: the artifact directory to serve.
        host: bind address (loopback unless told otherwise).
        port: TCP port.
        max_instances: most instances per predict request.
        max_body_bytes: largest request body accepted (413 beyond).
        num_threads: torch intra-op threads (requests already run in parallel threads).
        warmup: score one example instance at load (start and reload) before serving it.
        admin_token: enables POST /admin/reload for requests bearing it (unset: no admin route).
        artifact_root: the directory a reload may take artifacts from (default: the parent of
            `artifact`).
    """

    artifact: str
    host: str = "127.0.0.1"
    port: int = 8080
    max_instances: int = 1024
    max_body_bytes: int = 1 << 20
    num_threads: int = 1
    warmup: bool = True
    admin_token: str | None = None
    artifact_root: str | None = None

    def __post_init__(self) -> None:
        # Where a setting is read, so a bad one is refused with its flag before anything starts.
        lowest = {"port": 1, "max_instances": 1, "max_body_bytes": 1, "num_threads": 1}
        for name, low in lowest.items():
            if getattr(self, name) < low:
                raise ConfigError(f"{_flag(name)}: must be at least {low}, got {getattr(self, name)}")
        if self.port > 65535:
            raise ConfigError(f"{_flag('port')}: {self.port} is not a TCP port (1-65535)")

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Settings from PEP_SERVE_<FIELD> variables (`config.env_values`: YAML values checked
        against the field's type) with `overrides` (the flags; None = not given) over them.

        Raises:
            ConfigError naming the flag or the variable.
        """
        values = env_values(cls, ENV_PREFIX)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "artifact" not in values:
            raise ConfigError(f"no artifact: pass --artifact or set {ENV_PREFIX}ARTIFACT")
        return from_dict(cls, values)


def _flag(name: str) -> str:
    """A setting as the user gives it: the flag and the environment variable."""
    return f"--{name.replace('_', '-')} ({ENV_PREFIX}{name.upper()})"


class SchemaChange(ArtifactError):
    """A reload's artifact takes other input fields than the served one."""


def _input_fields(predictor: Predictor) -> dict[str, str]:
    return {name: spec["type"] for name, spec in predictor.fields.items()}


def _schema_change(old: dict[str, str], new: dict[str, str]) -> str | None:
    """What a client would notice going from input fields `old` to `new`, or None."""
    parts = [f"{label}: {names}" for label, names in (
        ("added", sorted(set(new) - set(old))), ("removed", sorted(set(old) - set(new))),
        ("retyped", sorted(k for k in set(old) & set(new) if old[k] != new[k]))) if names]  # fmt: skip
    return "; ".join(parts) or None


class ModelHolder:
    """The current Predictor behind one reference; swaps are atomic, loads are serialised."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.current: Predictor | None = None
        self.artifact_path = Path(settings.artifact)
        self.artifact_root = Path(
            settings.artifact_root or Path(settings.artifact).resolve().parent
        ).resolve()
        self._load_lock = threading.Lock()

    def under_root(self, path: str) -> Path | None:
        """`path` resolved, if it lies under the artifact root (symlinks followed), else None."""
        target = Path(path).resolve()
        return target if target.is_relative_to(self.artifact_root) else None

    def redact(self, message: str) -> str:
        """An error for a client: the artifact root and the served path replaced by placeholders."""
        for path, label in (
            (self.artifact_root, "<artifact root>"),
            (self.artifact_path.resolve(), "<artifact>"),
        ):
            message = message.replace(str(path), label)
        return message.replace(str(self.artifact_path), "<artifact>")

    def _build(self, path: Path) -> Predictor:
        predictor = Predictor.from_path(path, max_instances=self.settings.max_instances)
        if self.settings.warmup:
            predictor.predict([predictor.example_instance()])
        return predictor

    def load(self, path: str | Path | None = None, *, force: bool = False) -> Predictor:
        """Load (verify, build, warm up) then swap. Raises ArtifactError (SchemaChange for other
        input fields, unless `force`) and keeps the old model."""
        with self._load_lock:
            target = Path(path) if path is not None else self.artifact_path
            try:
                predictor = self._build(target)
                change = None if self.current is None else \
                    _schema_change(_input_fields(self.current), _input_fields(predictor))  # fmt: skip
                if change and not force:
                    raise SchemaChange(f"{target}: its input fields differ from the served model's ({change}); "
                                       "reload with force to switch")  # fmt: skip
            except ArtifactError:
                self.metrics.reload(False)
                raise
            except Exception as e:  # anything else about a bad artifact: same contract
                self.metrics.reload(False)
                raise ArtifactError(f"{target}: cannot load ({type(e).__name__}: {e})") from e
            self.current = predictor  # the swap: one reference assignment
            self.artifact_path = target
            self.metrics.reload(True)
            logger.info("serving %s (version %s)", target, predictor.version)
            return predictor


class PredictRequest(BaseModel):
    """Raw feature values of each instance, keyed by the dataset's field names."""

    model_config = ConfigDict(extra="forbid")
    instances: list[dict[str, Any]] = Field(min_length=1, description="one object per instance")


class PredictResponse(BaseModel):
    scores: list[float] = Field(description="click probability of each instance, in request order")
    model_version: str


# The bytes FastAPI writes for a `response_model=PredictResponse` route (pydantic's JSON serializer),
# so the fast path answers exactly what the regular route would.
_PREDICT_RESPONSE = TypeAdapter(PredictResponse)


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    artifact: str | None = Field(
        default=None,
        description="another artifact directory under the artifact root (default: the current one)",
    )
    force: bool = Field(default=False, description="switch even if the input fields change")


def _error(status: int, loc: list[Any], msg: str, kind: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": [{"loc": loc, "msg": msg, "type": kind}]})


class _BodyLimit:
    """Pure ASGI middleware: 413 for bodies over `limit` bytes, by Content-Length or as they stream."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                response = _error(413, ["body"], f"request body over {self.limit} bytes", "body_too_large")
                return await response(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            response = _error(413, ["body"], f"request body over {self.limit} bytes", "body_too_large")
            await response(scope, receive, send)


class _TooLarge(Exception):
    pass


class _Fallback(Exception):
    """The fast path declines this request: the regular route answers it."""


class _FastPredict:
    """Pure ASGI: POST /v1/predict answered directly when the regular route would answer 200.

    Accepted here: `content-type: application/json`, a body within the limit that parses as
    {"instances": [object, ...]} (non-empty; exactly what `PredictRequest` accepts from JSON), a
    loaded model, and instances the predictor scores without a `RequestError`. Anything else is
    replayed into the regular app (`self.app`), whose answer (413, 422, 503, ...) and metrics are
    then the only ones. Latency, status and batch size are recorded as the `record` middleware does.
    Requests of up to `inline_max` instances are scored on the event loop itself (~1 ms at 64
    instances): the thread-pool hop cost ~10% of the batch-1 throughput and 0.07 ms of latency
    (benchmarks/serving_load.py). Larger ones go to the thread pool, as the regular route's do, so
    that /healthz or a small request is not held behind them.
    """

    inline_max = 64

    def __init__(self, app: Any, *, holder: ModelHolder, metrics: ServiceMetrics, limit: int) -> None:
        self.app, self.holder, self.metrics, self.limit = app, holder, metrics, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/predict" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        received: list[dict] = []
        try:
            body = await self._read_body(scope, receive, received)
            instances, predictor = self._parse(body)
            if len(instances) <= self.inline_max:
                scores = self._predict(predictor, instances)
            else:
                scores = await run_in_threadpool(self._predict, predictor, instances)
        except _Fallback:
            return await self.app(scope, _replay(received, receive), send)
        except Exception:  # a bug: counted as the regular path counts its 500s
            self.metrics.request("/v1/predict", "POST", 500, time.perf_counter() - start)
            raise
        content = _PREDICT_RESPONSE.dump_json(PredictResponse(scores=scores, model_version=predictor.version))
        self.metrics.batch(len(instances))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-length", str(len(content)).encode()), (b"content-type", b"application/json")]})  # fmt: skip
            await send({"type": "http.response.body", "body": content})
        finally:
            self.metrics.request("/v1/predict", "POST", 200, time.perf_counter() - start)

    async def _read_body(self, scope: dict, receive: Any, received: list[dict]) -> bytes:
        content_type = None
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                raise _Fallback  # the regular path's 413
            if name == b"content-type" and content_type is None:  # the first one, as Starlette reads it
                content_type = value
        if content_type != b"application/json":
            raise _Fallback
        chunks, size = [], 0
        while True:
            message = await receive()
            received.append(message)
            if message["type"] != "http.request":
                raise _Fallback  # a disconnect: the regular path sees it too
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise _Fallback
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _parse(self, body: bytes) -> tuple[list, Predictor]:
        try:
            request = json.loads(body)  # Starlette's `Request.json()`, which FastAPI uses
        except Exception:
            raise _Fallback from None
        # What `PredictRequest` accepts from parsed JSON: one key, a non-empty list of objects.
        if type(request) is not dict or len(request) != 1:
            raise _Fallback
        instances = request.get("instances")
        if type(instances) is not list or not instances or any(type(i) is not dict for i in instances):
            raise _Fallback
        predictor = self.holder.current  # this request's model, even if a reload swaps meanwhile
        if predictor is None:
            raise _Fallback  # the regular route's 503
        return instances, predictor

    @staticmethod
    def _predict(predictor: Predictor, instances: list) -> list[float]:
        try:
            return predictor.predict(instances)
        except RequestError:
            raise _Fallback from None  # the regular route's 422, message and all


def _replay(received: list[dict], receive: Any) -> Any:
    """`receive` that first hands out the messages the fast path already took."""
    pending = list(received)

    async def replay() -> dict:
        return pending.pop(0) if pending else await receive()

    return replay


def create_app(settings: Settings, *, fast_predict: bool = True) -> FastAPI:
    """The app: the artifact is loaded in the lifespan (an ArtifactError there stops the start).

    Args:
        settings: the service settings.
        fast_predict: answer POST /v1/predict through `_FastPredict` (False: the regular route only;
            the tests compare the two).
    """
    metrics = ServiceMetrics()
    holder = ModelHolder(settings, metrics)
    app = FastAPI(
        title="pep-torchrec inference",
        version="1",
        lifespan=_lifespan(settings, holder),
        description="CTR scores from a PEP-pruned model artifact (raw feature values in).",
    )
    app.state.holder, app.state.metrics, app.state.settings = holder, metrics, settings
    # Added first, so it runs inside `record`: its 413s are counted like every other status.
    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)

    @app.middleware("http")
    async def record(request: Request, call_next):
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            path = route.path if route is not None else "unmatched"
            metrics.request(path, request.method, status, time.perf_counter() - start)

    if fast_predict:  # added last: the outermost layer, in front of `record` and the body limit
        app.add_middleware(_FastPredict, holder=holder, metrics=metrics, limit=settings.max_body_bytes)
    _add_error_handlers(app)
    _add_routes(app, holder, metrics)
    if settings.admin_token:
        _add_reload_route(app, holder, settings.admin_token.encode())
    return app


def _lifespan(settings: Settings, holder: ModelHolder) -> Any:
    """The app's lifespan: threads, the model (unless `pep-torchrec serve` loaded it already), SIGHUP → reload."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        torch.set_num_threads(max(1, settings.num_threads))
        if holder.current is None:  # `serve` loads it before binding the port; a bare app loads here
            await asyncio.to_thread(holder.load)
        loop = asyncio.get_running_loop()
        try:  # SIGHUP → reload in a worker thread (only possible in the main thread's loop)
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, _reload_logged))
        except (NotImplementedError, RuntimeError, ValueError):
            pass
        yield
        try:
            loop.remove_signal_handler(signal.SIGHUP)
        except (NotImplementedError, RuntimeError, ValueError):
            pass

    def _reload_logged() -> None:
        try:
            holder.load()
        except ArtifactError as e:
            logger.error("reload refused, still serving the previous model: %s", e)

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """422s in FastAPI's error shape, for the predictor's errors and the request model's."""

    @app.exception_handler(RequestError)
    def request_error(_: Request, e: RequestError) -> JSONResponse:
        return _error(422, ["body", *e.loc], e.message, e.kind)

    @app.exception_handler(RequestValidationError)
    def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        # FastAPI's own shape, minus the echoed input (which may be large).
        detail = [
            {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
            for err in e.errors()
        ]
        return JSONResponse(status_code=422, content={"detail": detail})


def _add_routes(app: FastAPI, holder: ModelHolder, metrics: ServiceMetrics) -> None:
    """The public routes: /v1/predict (the regular path), /healthz, /readyz, /metrics."""

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses={422: {"description": "bad request"}, 503: {"description": "no model loaded yet"}},
    )
    def predict(request: PredictRequest) -> PredictResponse | JSONResponse:
        predictor = holder.current  # this request's model, even if a reload swaps meanwhile
        if predictor is None:
            return _error(503, ["model"], "no model loaded yet", "not_ready")
        scores = predictor.predict(request.instances)
        metrics.batch(len(request.instances))
        return PredictResponse(scores=scores, model_version=predictor.version)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        predictor = holder.current
        if predictor is None:
            return JSONResponse(status_code=503, content={"status": "loading"})
        return JSONResponse(content={"status": "ready", "model_version": predictor.version})

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        predictor = holder.current
        return PlainTextResponse(
            metrics.render(predictor.version if predictor else None), media_type="text/plain; version=0.0.4"
        )


def _add_reload_route(app: FastAPI, holder: ModelHolder, token: bytes) -> None:
    """POST /admin/reload, behind the admin token (`token`: its UTF-8 bytes)."""

    @app.post("/admin/reload")
    def reload(
        request: ReloadRequest | None = None, authorization: str | None = Header(default=None)
    ) -> JSONResponse:
        given = (authorization or "").removeprefix("Bearer ").encode()
        if not hmac.compare_digest(given, token):
            return _error(401, ["header", "authorization"], "admin token missing or wrong", "unauthorized")
        request = request or ReloadRequest()
        target = None
        if request.artifact is not None:
            target = holder.under_root(request.artifact)
            if target is None:
                return _error(403, ["body", "artifact"], "not under the service's artifact root", "forbidden")
        try:
            predictor = holder.load(target, force=request.force)
        except ArtifactError as e:
            logger.error("reload refused, still serving the previous model: %s", e)
            kind = "schema_change" if isinstance(e, SchemaChange) else "artifact_error"
            return _error(
                409,
                ["body", "artifact"],
                f"reload refused, still serving the previous model: {holder.redact(str(e))}",
                kind,
            )
        return JSONResponse(content={"status": "reloaded", "model_version": predictor.version})
