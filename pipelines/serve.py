"""`peftlab serve RUN_DIR...`: an HTTP JSON service over many runs' adapters (Starlette + uvicorn).

    GET  /health              {"status": "ok", "adapters": N, "backbones": M, "backbone_copies": C}
    GET  /adapters            name, run (its folder name: no server paths), task, labels, backbone, method,
                              serving path, request body, metrics
                              (a merged run: merged_from, the run and method it came from)
    POST /predict/{adapter}   the task's JSON input form -> {"adapter", "task", "predictions"}

Each backbone is loaded once (see `multi_adapter`); concurrent requests for adapters on
it are batched together. /health counts distinct backbones (`backbones`) and the copies
held in memory (`backbone_copies`: one per shared backbone and peft type, one per run on
its own model). A bad request never reaches the model: its body is parsed by
the task's `parse_request`, and any mistake is a 4xx whose `error` names the field:
400 for a body that is not JSON, 404 for an unknown adapter (listing the served ones),
413 for a body over the size limit, 422 for a well-formed body with wrong content.
A request whose client disconnects while it waits for its batch is dropped (499).
A run whose task has no JSON input form (a plugin's task without `parse_request`) is refused at start-up, before any
backbone loads: no request could ever reach it. The port opens once every run has
loaded, so /health answering means ready. Anything else that fails answers 500 with a
JSON `error` (the traceback is in the server's log).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from concurrent.futures import Future
from typing import Any

from peftlab.pipelines.multi_adapter import MultiAdapter
from peftlab.shared import io
from peftlab.shared.errors import UserError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

MAX_BODY_BYTES = 64 * 2**20
"""Request bodies above this (64 MiB: a few hundred base64 images or clips) get 413."""


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def read_body(request: Request) -> bytes | None:
    """The body, or None once it passes MAX_BODY_BYTES (read no further)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


DISCONNECT_POLL_S = 0.25
"""How often a waiting request checks that its client is still there."""


async def outputs_while_connected(request: Request, job: Future) -> list | None:
    """The job's outputs, or None once the client has gone: a job still queued is then
    cancelled (the batching thread skips it), so abandoned requests do not hold up the
    ones behind them. A job already computing finishes."""
    waiting = asyncio.wrap_future(job)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
        if done:
            return waiting.result()
        if await request.is_disconnected():
            job.cancel()
            return None


def create_app(multi: MultiAdapter) -> Starlette:
    """The ASGI app over an already loaded `MultiAdapter` (tests drive it in-process)."""

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "adapters": len(multi.adapters), "backbones": multi.backbone_count(),
                             "backbone_copies": len(multi.engines)})  # each engine holds one backbone copy

    async def adapters(request: Request) -> JSONResponse:
        return JSONResponse({"adapters": multi.summary()})

    async def predict(request: Request) -> JSONResponse:
        name = request.path_params["adapter"]
        if name not in multi.adapters:
            return error(404, f"no adapter named {name!r}; served: {', '.join(multi.names())}")
        body = await read_body(request)
        if body is None:
            return error(413, f"the request body is over {MAX_BODY_BYTES} bytes; send fewer inputs per request")
        try:
            payload: Any = io.user_json(body, "the request body")
        except UserError as exc:  # a key given twice: which value is meant is a guess
            return error(400, str(exc))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error(400, f"the request body is not JSON ({exc}); send a JSON object")
        except RecursionError:
            return error(400, "the request body nests JSON too deeply to read; send the task's flat form (GET /adapters)")
        try:
            examples = multi.parse_request(name, payload)
            outputs = await outputs_while_connected(request, multi.submit(name, examples))
            if outputs is None:
                return error(499, "the client closed the connection; the request was dropped")
            predictions = multi.describe(name, examples, outputs)
        except UserError as exc:
            return error(422, str(exc))
        return JSONResponse({"adapter": name, "task": multi.get(name).task.name, "predictions": predictions})

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, exc.detail)  # e.g. 405 for GET /predict/NAME, as JSON

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        # the traceback goes to the server's log (Starlette logs it); the client gets JSON as for any error
        return error(500, f"internal error ({type(exc).__name__}); the server's log has the details")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        multi.close()

    return Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/adapters", adapters, methods=["GET"]),
        Route("/predict/{adapter}", predict, methods=["POST"]),
    ], exception_handlers={HTTPException: http_error, Exception: server_error}, lifespan=lifespan)


def serve(run_dirs, host: str = "127.0.0.1", port: int = 8000, force: bool = False, max_batch: int = 32,
          max_wait_ms: float = 5.0) -> None:
    """Load the runs and serve them until interrupted."""
    import uvicorn

    check_port_free(host, port)  # before loading: a busy port otherwise fails after minutes of it
    # json_requests: a run no request could reach (no JSON input form) stops here, before any backbone loads
    multi = MultiAdapter(run_dirs, force=force, max_batch=max_batch, max_wait_ms=max_wait_ms, json_requests=True)
    uvicorn.run(create_app(multi), host=host, port=port, log_level="info")


def check_port_free(host: str, port: int) -> None:
    """UserError where nothing could listen on host:port (taken, or not this machine's).
    Binds as uvicorn does (SO_REUSEADDR), so a port only in TIME_WAIT counts as free."""
    if port == 0:
        return  # the OS picks a free one
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as error:
        raise UserError(f"{host}:{port}: cannot listen there ({error.strerror or error}); "
                        f"pick another --port or --host") from None
