"""Build and run the KServe model server for `brain-tumor`: binding, batching, limits, metrics.

What this module adds to `kserve.ModelServer` (0.21), and why:
- bind address: kserve binds REST to 0.0.0.0 and gRPC to [::] unconditionally; brainscan binds
  127.0.0.1 unless `--host` says otherwise (container images pass `--host 0.0.0.0`).
- binary BYTES: kserve's `InferRequest.from_bytes` turns binary-extension BYTES inputs into
  UTF-8 text (`set_data_from_numpy(..., binary_data=False)`), so raw JPEG/PNG bytes sent by
  `tritonclient.http` end in a 500. `BinarySafeDataPlane` parses those requests itself and
  keeps the raw buffer (the same thing kserve already does for gRPC raw contents).
- dynamic batching (serving.batching): concurrent requests share one model call,
  with a bounded queue (503 when full), a maximum batch size and a maximum wait.
- request size: REST bodies over `max_request_bytes` get 413 before they are read whole;
  gRPC messages over it are refused by gRPC itself.
- metrics: kserve's own histograms on `/metrics` plus brainscan's batch sizes, requests and
  model latency.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor

import kserve
import orjson
from fastapi.responses import JSONResponse
from grpc import aio
from kserve.errors import InvalidInput
from kserve.model_server import app as fastapi_app
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput
from kserve.protocol.rest.server import RESTServer
from prometheus_client import Counter

from brainscan.config import ServeSettings
from serving.batching import ServerOverloaded
from serving.model import BrainTumorModel, Limits

log = logging.getLogger("serving")

REJECTED_BODIES = Counter("brainscan_rejected_oversized_requests_total", "REST bodies refused for their size")


# --------------------------------------------------------------------------- binary BYTES fix
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
@dataclasses.dataclass(frozen=True)
class ServeOptions(ServeSettings):
    """What `brainscan serve` runs: the model, an optional fixed threshold, and the server settings."""

    model_uri: str = ""
    threshold: float | None = None  # overrides the model's calibrated thresholds
    enable_grpc: bool = True


def build_model(options: ServeOptions) -> BrainTumorModel:
    model = BrainTumorModel(
        options.model_uri, threshold=options.threshold,
        limits=Limits(max_images=options.max_images, max_image_bytes=options.max_image_bytes,
                      max_pixels=options.max_pixels),
        batcher_options={"max_batch_size": options.max_batch_size, "max_latency_ms": options.max_latency_ms,
                         "max_queue": options.max_queue},
        runtime=options.runtime)
    model.load()
    return model


def run(options: ServeOptions) -> None:
    """Load the model and serve it until SIGTERM/SIGINT (blocking)."""
    model = build_model(options)
    server = kserve.ModelServer(http_port=options.http_port, grpc_port=options.grpc_port,
                                enable_grpc=options.enable_grpc, workers=1)
    server.dataplane = BinarySafeDataPlane(model_registry=server.registered_models)
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
        grpc = HostGRPCServer(options.host, options.grpc_port, server.dataplane, server.model_repository_extension,
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


class HostGRPCServer(GRPCServer):
    """kserve's GRPCServer bound to `host` instead of [::] (same servicer and interceptors)."""

    def __init__(self, host: str, port: int, data_plane, repository_extension, kwargs: dict, grace_period: int):
        super().__init__(port, data_plane, repository_extension, kwargs=kwargs, grace_period=grace_period)
        self._host = host

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
        address = f"[{self._host}]:{self._port}" if ":" in self._host else f"{self._host}:{self._port}"
        if self._server.add_insecure_port(address) == 0:
            raise RuntimeError(f"cannot bind gRPC to {address}")
        await self._server.start()
        await self._server.wait_for_termination()
