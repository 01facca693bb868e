"""The HTTP app: `create_app(captioner)` (FastAPI), `serve_forever` (what `captioner serve` runs: uvicorn in
the main thread, draining on SIGTERM) and `serving` (the same server in a background thread: notebooks,
tests, benchmarks).

Routes: POST /v1/caption, GET /v1/info, GET / (the web page), GET /healthz, GET /readyz, GET /metrics,
OpenAPI at /docs and /openapi.json. Inputs are read by the package's one loader (`Captioner.input_reader`,
inputs/loader.py) in the request's own thread before anything is queued, so a bad file is that item's
error with the reason `captioner caption` gives, and never reaches a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import threading
import time
from importlib import resources
from typing import Callable

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from captioner.config import DecodeConfig
from captioner.errors import CaptionerError, one_line
from captioner.serve.batcher import Batcher, NotAccepting, QueueFull
from captioner.serve.metrics import Metrics
from captioner.serve.requests import (AUDIO_FIELDS, IMAGE_FIELDS, REQUEST_OPTIONS, ParsedRequest, RequestError,
                                      clean_name, pair_items, parse_json, parse_options)
from captioner.serve.settings import ServeConfig

logger = logging.getLogger(__name__)

_OPTION_SCHEMA = {"strategy": {"type": "string", "enum": ["greedy", "beam", "sample"]},
                  "num_beams": {"type": "integer"}, "num_captions": {"type": "integer"},
                  "max_new_tokens": {"type": "integer"}, "min_new_tokens": {"type": "integer"},
                  "length_penalty": {"type": "number"}, "top_p": {"type": "number"}, "top_k": {"type": "integer"},
                  "temperature": {"type": "number"}, "seed": {"type": "integer"}, "prompt": {"type": "string"}}
_FILES = {"type": "array", "items": {"type": "string", "format": "binary"}}
_B64 = {"type": "array", "items": {"type": "string", "format": "byte"}}
CAPTION_OPENAPI = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {"image": _FILES, "audio": _FILES,
                                                                        **_OPTION_SCHEMA}}},
    "application/json": {"schema": {"type": "object", "properties": {
        "images": _B64, "audio": _B64, "options": {"type": "object", "properties": _OPTION_SCHEMA}}}}}}}


def caption_batch(captioner, inputs: list[dict], decode: DecodeConfig, prompt: str | None) -> list[list[str]]:
    """Captions of items already read by the captioner's input reader, through the same feature and
    decoding path as `Captioner.iter_captions` (items grouped by the inputs they have)."""
    out: list = [None] * len(inputs)
    rows = [(i, x, None) for i, x in enumerate(inputs)]
    with _prompt(captioner, prompt):
        for batch, groups in captioner.feature_batches(rows, batch_size=len(rows), num_workers=0):
            for j, captions in captioner.caption_groups(groups, decode).items():
                out[batch[j][0]] = captions
    return out


@contextlib.contextmanager
def _prompt(captioner, prompt: str | None):
    """The model's prompt replaced for one batch (safe: every model call runs on the one worker thread)."""
    if prompt is None:
        yield
        return
    from captioner.model.tokens import encode_prompt

    model, old = captioner.model, captioner.model.prompt_ids
    model.prompt_ids = torch.tensor(encode_prompt(captioner.tokenizer, prompt), dtype=torch.long, device=old.device)
    try:
        yield
    finally:
        model.prompt_ids = old


def create_app(model, settings: ServeConfig | None = None, decode: DecodeConfig | None = None, *,
               on_load_error: Callable[[Exception], None] | None = None) -> FastAPI:
    """The app serving `model`: a Captioner, or a function returning one (called on the model thread at
    startup; /readyz answers 503 until it returns). decode: the options of requests that set none."""
    from captioner.api import Captioner

    settings, default_decode = settings or ServeConfig(), decode or DecodeConfig()
    loader = not isinstance(model, Captioner)
    metrics = Metrics()
    state = {"captioner": None, "reader": None, "draining": False}

    def run_batch(inputs, decode, prompt):
        return caption_batch(state["captioner"], inputs, decode, prompt)

    batcher = Batcher(run_batch, max_batch_size=settings.max_batch_size, max_wait_s=settings.max_wait_ms / 1000,
                      max_queue=settings.max_queue, metrics=metrics)

    async def load() -> None:
        try:
            captioner = await batcher.in_worker(model) if loader else model
            state["reader"] = captioner.input_reader(max_pixels=settings.max_pixels)
            state["captioner"] = captioner
            batcher.accepting = not state["draining"]
            logger.info("model loaded: ready")
        except (CaptionerError, OSError) as e:
            logger.error("could not load the model: %s", one_line(e))
            if on_load_error is not None:
                on_load_error(e)

    def begin_drain() -> None:
        """Shutdown has begun (safe from a signal handler): /readyz says so and queued requests go at once."""
        def drain():
            state["draining"] = True
            batcher.flush()
        if state.get("loop") is not None:
            state["loop"].call_soon_threadsafe(drain)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["loop"] = asyncio.get_running_loop()
        batcher.start()
        loading = asyncio.get_running_loop().create_task(load())
        if not loader:  # a loaded model: ready as soon as the server listens
            await loading
        yield
        state["draining"] = True
        loading.cancel()
        await batcher.close(settings.drain_timeout_s)
        logger.info("drained: every queued request was answered")

    app = FastAPI(title="captioner", lifespan=lifespan,
                  description="Image and audio captioning with dynamic batching. POST files to /v1/caption.")
    app.state.batcher, app.state.metrics, app.state.settings, app.state.model = batcher, metrics, settings, state
    app.state.begin_drain = begin_drain

    page_html = resources.files("captioner.serve").joinpath("page.html").read_text(encoding="utf-8")  # read once

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(page_html)

    @app.get("/healthz", summary="The process answers (always 200 while it runs)")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="200 once the model is loaded and requests are accepted, else 503")
    def readyz() -> JSONResponse:
        if batcher.accepting and not state["draining"]:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "draining" if state["draining"] else "loading"}, 503)

    @app.get("/metrics", summary="Prometheus metrics (text format)")
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info", summary="The model's inputs, the default decoding options and the server's limits")
    def info() -> dict:
        captioner = state["captioner"]
        return {"ready": batcher.accepting, "modalities": captioner.model.modalities if captioner else None,
                "options": REQUEST_OPTIONS, "defaults": dataclasses.asdict(default_decode),
                "limits": dataclasses.asdict(settings)}

    @app.post("/v1/caption", openapi_extra=CAPTION_OPENAPI, summary="Caption uploaded images and/or sounds",
              description="multipart/form-data (file fields image / audio, options as fields) or JSON "
                          "({images: [base64], audio: [base64], options: {...}}). Each item gets its captions or "
                          "its own error line; 422 when no item could be read, 503 + Retry-After when the queue "
                          "is full.")
    async def caption(request: Request) -> JSONResponse:
        start = time.monotonic()
        metrics.in_flight.inc()
        try:
            status, body = await _caption(request, start)
        except RequestError as e:
            status, body = e.status, {"error": str(e), "kind": e.kind}
            metrics.errors.labels(e.kind).inc()
        finally:
            metrics.in_flight.dec()
        metrics.requests.labels(str(status)).inc()
        metrics.request_latency.observe(time.monotonic() - start)
        return JSONResponse(body, status, headers={"Retry-After": "1"} if status == 503 else None)

    async def _caption(request: Request, start: float) -> tuple[int, dict]:
        if not batcher.accepting:
            raise RequestError("not ready: the model is loading or the server is shutting down", status=503,
                               kind="not_ready")
        parsed = await _parse(request)
        captioner = state["captioner"]
        try:
            captioner.model.check_modalities({m for item in parsed.items for m in item})
        except CaptionerError as e:
            raise RequestError(str(e), kind="modality") from None
        reader = state["reader"]
        rows = await run_in_threadpool(lambda: [reader.read(i, item, name) for i, (item, name)
                                                in enumerate(zip(parsed.items, parsed.names))])
        good = [inputs for _, inputs, error in rows if error is None]
        results = [{"name": next(iter(name.values()))} for name in parsed.names]
        for (i, _, error) in rows:
            if error is not None:
                results[i]["error"] = str(error)
        failed = len(rows) - len(good)
        if failed:
            metrics.items.labels("failed").inc(failed)
            metrics.errors.labels("input").inc(failed)
        if not good:  # (its errors were counted per item above)
            return 422, {"error": next(r["error"] for r in results), "kind": "input", "results": results}
        try:
            job = batcher.submit(good, parsed.decode, parsed.prompt)
        except QueueFull as e:
            raise RequestError(str(e), status=503, kind="queue_full") from None
        except NotAccepting as e:
            raise RequestError(str(e), status=503, kind="not_ready") from None
        left = settings.request_timeout_s - (time.monotonic() - start)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({job.future, gone}, timeout=max(left, 0.001), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            batcher.abandon(job)
            raise
        finally:
            gone.cancel()
        if not job.future.done():
            batcher.abandon(job)  # dropped if still queued; a batch already running goes on without it
            if gone.done() and not gone.cancelled():
                raise RequestError("the client went away", status=499, kind="disconnected")
            raise RequestError(f"timed out after {settings.request_timeout_s:g} s", status=504, kind="timeout")
        if job.future.exception() is not None:  # the model failed on this batch: one line, the server goes on
            raise RequestError(f"internal error: {one_line(job.future.exception())}", status=500, kind="internal")
        captions = job.future.result()
        it = iter(captions)
        for result in results:
            if "error" not in result:
                result["captions"] = next(it)
                result["caption"] = result["captions"][0]
        metrics.items.labels("captioned").inc(len(good))
        return 200, {"results": results}

    async def _disconnected(request: Request) -> None:
        """Returns when the client has gone (the body is read: the next message is the disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            await asyncio.sleep(0.05)  # (no other message is expected; never a busy loop)

    async def _parse(request: Request) -> ParsedRequest:
        limit = int(settings.max_body_mb * 1024 * 1024)
        too_large = RequestError(f"request body over {settings.max_body_mb:g} MiB", status=413, kind="body_too_large")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            return parse_json(bytes(body), default_decode, settings)
        if kind == "multipart/form-data":
            return await _parse_form(request, bytes(body))
        raise RequestError(f"unsupported content type {kind or 'none'!r}: send multipart/form-data or "
                           "application/json", status=415, kind="unsupported_media")

    async def _parse_form(request: Request, body: bytes) -> ParsedRequest:
        sent = False

        async def replay():  # the body already read (and size-checked), for Starlette's form parser
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=settings.max_files * 2, max_fields=100)
        except HTTPException as e:
            if "files" in str(e.detail).lower():
                raise RequestError(f"too many inputs: more than {settings.max_files} per request", status=413,
                                   kind="too_many_files") from None
            raise RequestError(f"malformed multipart body: {e.detail}", status=400, kind="malformed") from None
        files: dict[str, list] = {"image": [], "audio": []}
        options = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key not in IMAGE_FIELDS + AUDIO_FIELDS:
                    raise RequestError(f"unknown file field {key!r} (use image or audio)", kind="invalid_request")
                column = files["audio" if key in AUDIO_FIELDS else "image"]
                column.append((clean_name(value.filename, f"{key}[{len(column)}]"), await value.read()))
            elif key in options:
                raise RequestError(f"option {key!r} given twice", kind="options")
            elif value != "":  # an empty form field is an option left unset (what a page's empty box sends)
                options[key] = value
        decode, prompt = parse_options(options, default_decode, settings, from_form=True)
        items, names = pair_items(files["image"], files["audio"], settings)
        return ParsedRequest(items, names, decode, prompt)

    return app


# ---------------------------------------------------------------------- running it


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: a free one), bound before the model loads so errors come first."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)  # connections wait in the backlog until the server accepts them
    return sock


def _server(app, settings: ServeConfig, log_level: str):
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # SIGTERM / SIGINT: drain at once, then stop
            super().handle_exit(sig, frame)
            app.state.begin_drain()

    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(settings.drain_timeout_s + 1))
    return Server(config)


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def serve_forever(load: Callable, settings: ServeConfig, decode: DecodeConfig | None = None, *,
                  log_level: str = "warning") -> None:
    """Serve until SIGTERM or SIGINT, then answer the requests in flight and return. load: a function
    returning the Captioner (run once the port is open); an error it raises is raised here."""
    sock = bind(settings.host, settings.port)
    failures: list[Exception] = []

    def failed(e: Exception) -> None:
        failures.append(e)
        server.should_exit = True

    server = _server(create_app(load, settings, decode, on_load_error=failed), settings, log_level)
    logger.info("serving on %s (the model is loading: /readyz answers 200 once it is ready)", url_of(sock))
    # uvicorn re-raises the signal it caught once it has drained: caught here, so the process ends normally
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
    if failures:
        raise failures[0]


@contextlib.contextmanager
def serving(app, settings: ServeConfig | None = None, *, timeout: float = 60.0):
    """Run `app` under uvicorn in a background thread on settings.host:port (port 0: a free one); yields its
    base URL and stops it, draining, on exit."""
    settings = settings or ServeConfig(port=0)
    sock = bind(settings.host, settings.port)
    server = _server(app, settings, "warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="captioner-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield url_of(sock)
    finally:
        app.state.begin_drain()
        server.should_exit = True
        thread.join(timeout)
        sock.close()
