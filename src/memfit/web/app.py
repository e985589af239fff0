"""The FastAPI application of ``memfit web``: a JSON API and one page, both thin views over
:mod:`memfit.web.adapter`.

Safe by default: the CLI binds 127.0.0.1, request bodies are capped (:data:`MAX_BODY_BYTES`), config paths
must lie under the root the server was started with, and the Hub is reached only with ``allow_hub``.
"""

# no `from __future__ import annotations`: FastAPI reads the local request models' annotations at runtime

import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

from ..errors import JobError, MemfitError
from . import adapter

STATIC = Path(__file__).with_name("static")
MAX_BODY_BYTES = 1 << 20
"""Largest request body accepted (1 MiB: a config.json is a few KiB)."""


def _job_model():
    """A pydantic model of :class:`memfit.job.Job`'s fields, every field optional except ``model``, so the
    OpenAPI schema lists what a job file may say; values are checked again by ``Job`` itself."""
    from pydantic import ConfigDict, create_model

    from ..job import Job

    hints = typing.get_type_hints(Job)
    spec: dict[str, Any] = {}
    for f in fields(Job):
        if f.name == "model":
            spec["model"] = (str, ...)
        else:
            spec[f.name] = (Optional[hints[f.name]], None)
    return create_model("JobFields", __config__=ConfigDict(extra="forbid"), **spec)


class _BodyLimit:
    """ASGI middleware: answer 413 when a request body exceeds ``limit`` bytes (by header or by count)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.limit:
            return await _too_large(send, self.limit)
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await _too_large(send, self.limit)


class _TooLarge(Exception):
    pass


async def _too_large(send, limit: int) -> None:
    import json

    body = json.dumps({"detail": f"request body over {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(*, root: str | Path | None = None, allow_hub: bool = False):
    """The app. ``root``: folder whose config files requests may name (None: none); ``allow_hub``: whether
    a Hub id may be fetched."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel, ConfigDict, Field

    from .. import __version__

    policy = adapter.Policy(root=Path(root) if root is not None else None, allow_hub=allow_hub)
    JobFields = _job_model()

    class EstimateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        job: JobFields  # type: ignore[valid-type]
        gpu: Optional[str] = Field(None, description="a card from /api/gpus (e.g. rtx-4090)")
        gpu_memory: Optional[str] = Field(None, description="card memory with its unit: 24GiB or 24GB")
        config: Optional[dict[str, Any]] = Field(None, description="a pasted config.json (replaces job.model)")

    class PlanRequest(EstimateRequest):
        top: int = Field(10, description="candidates to return (1..100)")
        min_headroom_percent: float = Field(3.0, description="percent of the card a candidate must leave free")

    class ServeRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        model: str = Field(..., description="a registry name or a Hub id the registry knows")
        engine: str = Field("vllm", description="vllm or sglang")
        gpu: Optional[str] = Field(None, description="a card from /api/gpus (e.g. h100-80gb)")
        gpu_memory: Optional[str] = Field(None, description="the total the driver reports: 79.19GiB")
        config: Optional[dict[str, Any]] = Field(None, description="a pasted config.json (replaces model)")
        flags: Optional[dict[str, Any]] = Field(None, description="engine flags: tensor_parallel, max_model_len, "
                                                "gpu_memory_utilization, kv_cache_dtype, data_parallel, "
                                                "enable_lora, max_loras, max_lora_rank, ...")

    app = FastAPI(title="memfit", version=__version__,
                  description="GPU memory of LLM jobs: the estimate, the fit verdict and the plan.")

    @app.exception_handler(MemfitError)
    async def _memfit_error(request: Request, exc: MemfitError):
        return JSONResponse({"detail": str(exc).splitlines()[0] if str(exc) else type(exc).__name__},
                            status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse({"detail": msg}, status_code=422)

    def _body(req: EstimateRequest) -> dict[str, Any]:
        return {"job": req.job.model_dump(exclude_none=True), "gpu": req.gpu, "gpu_memory": req.gpu_memory,
                "config": req.config}

    @app.post("/api/estimate", summary="what `memfit estimate --json` prints for this job")
    def api_estimate(req: EstimateRequest) -> dict[str, Any]:
        b = _body(req)
        return adapter.estimate(b["job"], gpu=b["gpu"], gpu_memory=b["gpu_memory"], config=b["config"],
                                policy=policy)

    @app.post("/api/plan", summary="what `memfit plan --json` prints: jobs that fit, fastest first",
              responses={501: {"description": "memfit.plan is not in this install"}})
    def api_plan(req: PlanRequest):
        if not adapter.plan_available():
            return JSONResponse({"detail": "this memfit has no planner (memfit.plan); upgrade memfit"},
                                status_code=501)
        b = _body(req)
        return adapter.plan(b["job"], gpu=b["gpu"], gpu_memory=b["gpu_memory"], config=b["config"], top=req.top,
                            min_headroom_percent=req.min_headroom_percent, policy=policy)

    @app.post("/api/serve", summary="what `memfit serve --json` prints: the KV cache a serving engine allocates")
    def api_serve(req: ServeRequest) -> dict[str, Any]:
        try:
            return adapter.serve(req.model, engine=req.engine, gpu=req.gpu, gpu_memory=req.gpu_memory,
                                 config=req.config, flags=req.flags, policy=policy)
        except TypeError as exc:  # an unknown flag name reaches ServeConfig as a keyword
            raise JobError(f"unknown serve flag: {str(exc).splitlines()[0]}") from None

    @app.get("/api/models", summary="the built-in model registry (`memfit models --json`)")
    def api_models() -> list[dict[str, Any]]:
        return adapter.models()

    @app.get("/api/gpus", summary="the GPU catalog")
    def api_gpus() -> list[dict[str, Any]]:
        return adapter.gpus()

    @app.get("/api/job-fields", summary="job fields with their defaults")
    def api_job_fields() -> list[dict[str, Any]]:
        return adapter.job_fields()

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():  # browsers ask for it on every page (the API's JSON too); no icon, no 404 in their console
        from fastapi.responses import Response

        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)
    return app
