"""Build and run the KServe model server for `brain-tumor`: binding, batching, limits, metrics.

What this module adds to `kserve.ModelServer` (0.21), and why:
- bind address: kserve binds REST to 0.0.0.0 and gRPC to [::] unconditionally; brainscan binds
  127.0.0.1 unless `--host` says otherwise (container images pass `--host 0.0.0.0`).
- binary BYTES: kserve's `InferRequest.from_bytes` turns binary-extension BYTES inputs into
  UTF-8 text (`set_data_from_numpy(..., binary_data=False)`), so raw JPEG/PNG bytes sent by
  `tritonclient.http` end in a 500. `BinarySafeDataPlane` parses those requests itself and
  keeps the raw buffer (the same thing kserve already does for gRPC raw contents).
- dynamic batching: `DynamicBatcher` gathers concurrent requests into one model call, with a
  bounded queue, a maximum batch size and a maximum wait; the TF model runs on one thread.
- request size: REST bodies over `max_request_bytes` get 413 before they are read whole;
  gRPC messages over it are refused by gRPC itself.
- metrics: kserve's own histograms on `/metrics` plus brainscan's batch sizes, requests and
  model latency.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import orjson
from prometheus_client import Counter, Histogram

log = logging.getLogger("brainscan.serving")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024

BATCH_SIZE = Histogram("brainscan_batch_size", "Images per model call made by the dynamic batcher",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
MODEL_LATENCY = Histogram("brainscan_model_call_seconds", "Seconds per batched model call")
QUEUE_WAIT = Histogram("brainscan_queue_wait_seconds", "Seconds a request waited for its batch to start")
REQUESTS = Counter("brainscan_batcher_requests_total", "Requests through the batcher, by outcome", ["outcome"])
REJECTED_BODIES = Counter("brainscan_rejected_oversized_requests_total", "REST bodies refused for their size")


class ServerOverloaded(RuntimeError):
    """The batcher's queue is full: answer 503 and let the client retry."""


# --------------------------------------------------------------------------- dynamic batching
@dataclass
class _Pending:
    images: np.ndarray
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """Batch concurrent requests into single model calls on one worker thread.

    `submit(images)` enqueues [n, S, S, 3] and awaits its [n, 7] slice of the batch's answer.
    The worker takes the first waiting request, then keeps taking more until the batch holds
    `max_batch_size` images or `max_latency_ms` passed; while the model runs, new requests
    queue up and form the next batch. More than `max_queue` images waiting -> ServerOverloaded.
    """

    def __init__(self, predict_fn: Callable[[np.ndarray], np.ndarray], max_batch_size: int = 32,
                 max_latency_ms: float = 5.0, max_queue: int = 1024):
        if max_batch_size < 1 or max_queue < 1 or max_latency_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_latency_ms >= 0")
        self.predict_fn = predict_fn
        self.max_batch_size = int(max_batch_size)
        self.max_latency_s = float(max_latency_ms) / 1000.0
        self.max_queue = int(max_queue)
        # One thread owns the TF model: no concurrent calls into it, and Grad-CAM shares the thread.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="brainscan-model")
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._queued_images = 0

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="brainscan-batcher")

    async def submit(self, images: np.ndarray) -> np.ndarray:
        self._ensure_worker()
        if self._queued_images + len(images) > self.max_queue:
            REQUESTS.labels("overloaded").inc()
            raise ServerOverloaded(f"server busy: {self._queued_images} images already queued "
                                   f"(limit {self.max_queue}); retry shortly")
        future = asyncio.get_running_loop().create_future()
        self._queued_images += len(images)
        self._queue.put_nowait(_Pending(images, future))
        return await future

    async def run_exclusive(self, fn, *args):
        """Run fn(*args) on the model thread, between batches (e.g. Grad-CAM)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _next_batch(self) -> list[_Pending]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        size = len(batch[0].images)
        deadline = loop.time() + self.max_latency_s
        while size < self.max_batch_size:
            if not self._queue.empty():
                item = self._queue.get_nowait()
            else:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if size + len(item.images) > self.max_batch_size:
                # Would overflow: put it first in line for the next batch.
                self._queue._queue.appendleft(item)  # noqa: SLF001 (asyncio.Queue has no push-front)
                break
            batch.append(item)
            size += len(item.images)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            self._queued_images -= sum(len(p.images) for p in batch)
            started = time.perf_counter()
            for pending in batch:
                QUEUE_WAIT.observe(started - pending.queued_at)
            images = np.concatenate([p.images for p in batch], axis=0)
            BATCH_SIZE.observe(len(images))
            try:
                with MODEL_LATENCY.time():
                    probabilities = await loop.run_in_executor(self.executor, self.predict_fn, images)
            except Exception as err:  # the model failed: every waiting request hears it
                log.exception("model call failed for a batch of %d", len(images))
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(err)
                REQUESTS.labels("error").inc(len(batch))
                continue
            start = 0
            for pending in batch:
                end = start + len(pending.images)
                if not pending.future.done():  # the client may have gone away
                    pending.future.set_result(probabilities[start:end])
                start = end
            REQUESTS.labels("ok").inc(len(batch))


# --------------------------------------------------------------------------- binary BYTES fix
def _binary_safe_data_plane_class():
    from kserve.errors import InvalidInput
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput

    class BinarySafeDataPlane(DataPlane):
        """DataPlane whose REST binary-extension parsing keeps BYTES inputs as raw bytes.

        Only `decode_inference_request` for byte bodies changes (kserve 0.21's
        `InferRequest.from_bytes` decodes BYTES as UTF-8 and fails on image files, and it
        refuses a byte body without the Inference-Header-Content-Length header, which the v2
        binary extension makes optional); bodies FastAPI parsed as JSON and gRPC go through
        kserve untouched. The result is what kserve builds for gRPC raw
        contents: an InferInput whose `_raw_data` holds the length-prefixed buffer, which
        `as_numpy()` turns into an object array of bytes.
        """

        def decode_inference_request(self, body, headers, model_name):
            if not isinstance(body, bytes):
                return super().decode_inference_request(body, headers, model_name)
            # No header: the whole body is the JSON request (tritonclient sends JSON this way too).
            header = (headers or {}).get("inference-header-content-length", str(len(body)))
            try:
                json_length = int(header)
            except ValueError:
                raise InvalidInput(f"Inference-Header-Content-Length is not a number: {header!r}") from None
            if not 0 < json_length <= len(body):
                raise InvalidInput(f"Inference-Header-Content-Length {json_length} does not fit a "
                                   f"{len(body)}-byte body")
            try:
                spec = orjson.loads(body[:json_length])
            except orjson.JSONDecodeError as err:
                raise InvalidInput(f"malformed JSON request header: {err}") from None
            if not isinstance(spec, dict) or not isinstance(spec.get("inputs"), list):
                raise InvalidInput('request JSON must be an object with an "inputs" list')
            inputs, offset = [], json_length
            for entry in spec["inputs"]:
                if not isinstance(entry, dict) or not {"name", "shape", "datatype"} <= entry.keys():
                    raise InvalidInput("each input needs name, shape and datatype")
                parameters = entry.get("parameters") or {}
                tensor = InferInput(name=entry["name"], shape=entry["shape"], datatype=entry["datatype"],
                                    parameters=parameters)
                if entry.get("data") is not None:
                    tensor.data = entry["data"]
                elif "binary_data_size" in parameters:
                    size = parameters["binary_data_size"]
                    if not isinstance(size, int) or size < 0 or offset + size > len(body):
                        raise InvalidInput(f"input '{entry['name']}': binary_data_size {size!r} runs past "
                                           "the end of the request body")
                    tensor._raw_data = body[offset:offset + size]  # raw, as kserve keeps gRPC raw contents
                    offset += size
                else:
                    raise InvalidInput(f"input '{entry['name']}' has neither 'data' nor 'binary_data_size'")
                inputs.append(tensor)
            outputs = None
            if isinstance(spec.get("outputs"), list):
                outputs = [RequestedOutput(name=o.get("name"), parameters=o.get("parameters"))
                           for o in spec["outputs"] if isinstance(o, dict)]
            return InferRequest(model_name=model_name, request_id=spec.get("id"),
                                parameters=spec.get("parameters"), infer_inputs=inputs,
                                request_outputs=outputs)

    return BinarySafeDataPlane


# --------------------------------------------------------------------------- request size
class BodySizeLimit:
    """ASGI middleware: 413 for REST bodies over max_bytes (by Content-Length, or while streaming)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            # Read (and drop) a moderately large body first: a client still sending when the
            # server answers sees a broken pipe instead of the 413 and its message.
            if int(declared) <= 4 * self.max_bytes:
                more = True
                while more:
                    message = await receive()
                    more = message.get("type") == "http.request" and message.get("more_body", False)
            return await self._too_large(send, int(declared))
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await self._too_large(send, received)

    async def _too_large(self, send, size: int) -> None:
        REJECTED_BODIES.inc()
        body = orjson.dumps({"error": f"request body of {size} bytes is over the limit of {self.max_bytes} bytes"})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


# --------------------------------------------------------------------------- the server
@dataclass
class ServeOptions:
    model_uri: str
    host: str = DEFAULT_HOST
    http_port: int = 8080
    grpc_port: int = 8081
    threshold: float | None = None
    max_batch_size: int = 32
    max_latency_ms: float = 5.0
    max_queue: int = 1024
    max_images: int = 64
    max_image_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    enable_grpc: bool = True


def build_model(options: ServeOptions):
    from brainscan.serving.model import BrainTumorModel, Limits

    model = BrainTumorModel(
        options.model_uri, threshold=options.threshold,
        limits=Limits(max_images=options.max_images, max_image_bytes=options.max_image_bytes,
                      max_pixels=options.max_pixels),
        batcher_options={"max_batch_size": options.max_batch_size, "max_latency_ms": options.max_latency_ms,
                         "max_queue": options.max_queue})
    model.load()
    return model


def run(options: ServeOptions) -> None:
    """Load the model and serve it until SIGTERM/SIGINT (blocking)."""
    import kserve
    from fastapi.responses import JSONResponse
    from kserve.model_server import app as fastapi_app
    from kserve.protocol.rest.server import RESTServer

    model = build_model(options)
    server = kserve.ModelServer(http_port=options.http_port, grpc_port=options.grpc_port,
                                enable_grpc=options.enable_grpc, workers=1)
    server.dataplane = _binary_safe_data_plane_class()(model_registry=server.registered_models)
    server.register_model(model)

    fastapi_app.add_middleware(BodySizeLimit, max_bytes=options.max_request_bytes)
    fastapi_app.add_exception_handler(
        ServerOverloaded, lambda request, exc: JSONResponse({"error": str(exc)}, status_code=503,
                                                            headers={"Retry-After": "1"}))
    # Same construction as ModelServer.start (single worker), but on our host.
    rest = RESTServer("kserve.model_server:app", server.dataplane, server.model_repository_extension,
                      options.http_port, workers=1, grace_period=5)
    rest.config.host = options.host
    servers = [rest.start()]
    if options.enable_grpc:
        grpc = _grpc_server_on(options.host, options.grpc_port, server.dataplane, server.model_repository_extension,
                               kwargs={"grpc_max_send_message_length": options.max_request_bytes,
                                       "grpc_max_receive_message_length": options.max_request_bytes},
                               grace_period=5)
        servers.append(grpc.start(server.max_threads))
        # uvicorn handles SIGTERM itself, then re-raises it to ModelServer.stop, which stops this.
        server._grpc_server = grpc
    log.info("serving %s as '%s' on http://%s:%d (v2 REST) and %s:%d (gRPC)", options.model_uri, model.name,
             options.host, options.http_port, options.host, options.grpc_port)
    server.servers = servers
    server.setup_event_loop()
    server.register_signal_handler()
    asyncio.run(server._serve())


def _grpc_server_on(host: str, port: int, data_plane, repository_extension, kwargs: dict, grace_period: int):
    """kserve's GRPCServer bound to `host` instead of [::] (same servicer and interceptors)."""
    from grpc import aio
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
    from kserve.protocol.grpc.server import GRPCServer
    from kserve.protocol.grpc.servicer import InferenceServicer

    class HostGRPCServer(GRPCServer):
        async def start(self, max_workers):
            servicer = InferenceServicer(self._data_plane, self._model_repository_extension)
            self._server = aio.server(
                ThreadPoolExecutor(max_workers=max_workers),
                interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
                options=[("grpc.max_send_message_length", self._kwargs["grpc_max_send_message_length"]),
                         ("grpc.max_receive_message_length", self._kwargs["grpc_max_receive_message_length"]),
                         # a port already in use must fail, not be silently shared with another server
                         ("grpc.so_reuseport", 0)])
            grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
            address = f"[{host}]:{self._port}" if ":" in host else f"{host}:{self._port}"
            if self._server.add_insecure_port(address) == 0:
                raise RuntimeError(f"cannot bind gRPC to {address}")
            await self._server.start()
            await self._server.wait_for_termination()

    return HostGRPCServer(port, data_plane, repository_extension, kwargs=kwargs, grace_period=grace_period)
