"""The FastAPI app: routes under /v1 (and /v1/v1, for together 3.x clients given a base URL that
already ends in /v1), health, version, metrics, middleware, and the engine's lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

import herd
from herd.server import errors, openapi
from herd.server.metrics import CONTENT_TYPE
from herd.server.middleware import HerdMiddleware
from herd.server.routes import batches, chat, completions, files, models, tokens
from herd.server.state import ServerOptions, ServerState

log = logging.getLogger("herd.server")
PLAYGROUND = Path(__file__).parent / "static" / "playground.html"


def _exact_floats_in_this_thread() -> None:
    import torch  # already loaded with the engine

    torch.set_flush_denormal(False)


def create_app(engine, options: ServerOptions | None = None, platform=None) -> FastAPI:
    """`engine` is a running EngineClient (herd.engine.client). With options.owns_engine the app
    shuts it (and its engine-core process) down on shutdown; otherwise the caller does (tests share
    one engine).
    `platform` (a herd.platform.service.Platform) adds API keys, rate limits and the usage ledger."""
    options = options or ServerOptions()
    state = ServerState(engine, options)
    batch = None
    if platform is not None:  # files and batches live in the platform's database
        from herd.server.batch_service import make_batch_service

        batch = make_batch_service(state, platform)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # The engine flushes subnormal floats to zero for fast CPU matmuls, a per-thread setting
        # that threads inherit; its own thread keeps it, but request validation here must not
        # read a tiny positive value (top_p 5e-324) as zero.
        _exact_floats_in_this_thread()
        log.info("serving %s (context %d tokens)", state.model_name, state.max_model_len)
        if batch is not None:
            batch.runner.start()  # resumes the batches a stop or crash left unfinished
        try:
            yield
        finally:
            if batch is not None:
                await batch.runner.stop()  # lines in flight are not recorded: they run again on restart
            state.tokenizer_process.close()
            if options.owns_engine:
                await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="herd", version=herd.__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.herd = state
    app.state.herd_batch = batch
    errors.install(app)

    api = APIRouter()
    for module in (chat, completions, models, tokens, files, batches):
        api.include_router(module.router)
    app.include_router(api, prefix="/v1")
    app.include_router(api, prefix="/v1/v1", include_in_schema=False)
    app.include_router(tokens.router)

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            return errors.APIError(503, "the engine is not running").response()
        return Response(status_code=200)

    @app.get("/ping")
    async def ping() -> Response:
        return await health()

    @app.get("/playground")
    async def playground() -> Response:
        # A static page; the API calls it makes carry the key typed into it.
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    @app.get("/")
    async def root() -> Response:
        return RedirectResponse("/playground")

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": herd.__version__})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    if platform is not None:  # inside HerdMiddleware: request ids and body limits come first
        from herd.platform.middleware import install

        install(app, platform, model=state.model_name)
    app.add_middleware(HerdMiddleware, max_body_bytes=options.max_request_body_bytes, api_key=options.api_key,
                       max_upload_bytes=batch.config.max_file_bytes if batch is not None else None)
    if options.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=options.allowed_origins,
            allow_methods=options.allowed_methods,
            allow_headers=options.allowed_headers,
            allow_credentials=options.allow_credentials,
            expose_headers=["X-Request-Id"],
        )
    openapi.install(app)
    return app
