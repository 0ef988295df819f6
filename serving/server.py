"""Build and run the KServe model server for `brain-tumor`: binding, batching, limits, metrics.

What this module adds to `kserve.ModelServer` (0.21), and why (the kserve adaptations it needs,
and the upstream behaviour each works around, are all in serving.kserve_compat):
- bind address: kserve binds REST to 0.0.0.0 and gRPC to [::] unconditionally; brainscan binds
  127.0.0.1 unless `--host` says otherwise (container images pass `--host 0.0.0.0`).
- binary BYTES: kserve's `InferRequest.from_bytes` turns binary-extension BYTES inputs into
  UTF-8 text, so raw JPEG/PNG bytes sent by `tritonclient.http` end in a 500;
  `kserve_compat.BinarySafeDataPlane` keeps the raw buffer (as kserve does for gRPC).
- the data plane only: kserve serves its model repository extension (load / unload a model)
  to any client over REST and gRPC; brainscan serves neither (404, UNIMPLEMENTED), and its
  readiness (/v2/health/ready, gRPC ServerReady) follows the model's (`kserve_compat.DataPlaneOnly`).
- dynamic batching (serving.batching): concurrent requests share one model call,
  with a bounded queue (503 when full), a maximum batch size and a maximum wait.
- request size: REST bodies over `max_request_bytes` get 413 before they are read whole;
  gRPC messages over it are refused by gRPC itself.
- drain on SIGTERM (`kserve_compat.serve`): readiness turns false, no new connections, and
  every accepted request (REST and gRPC) is answered within `drain_timeout_s` (kserve's grace
  period, 5 s before: a CPU batch or a Grad-CAM was cancelled); the model is unloaded last.
- metrics: kserve's own histograms on `/metrics` plus brainscan's batch sizes, requests and
  model latency.
"""

from __future__ import annotations

import dataclasses
import logging

import kserve
import orjson
from fastapi.responses import JSONResponse
from prometheus_client import Counter

from brainscan.config import ServeSettings
from serving import kserve_compat
from serving.batching import ServerOverloaded
from serving.model import BrainTumorModel, Limits

log = logging.getLogger("serving")

REJECTED_BODIES = Counter("brainscan_rejected_oversized_requests_total", "REST bodies refused for their size")


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
    # Every setting kserve's ModelServer has an option for is given here, explicitly: its
    # defaults otherwise come from kserve's own parsing of this process's command line.
    server = kserve.ModelServer(http_port=options.http_port, grpc_port=options.grpc_port,
                                enable_grpc=options.enable_grpc, workers=1, grace_period=options.drain_timeout_s,
                                access_log_format=None, event_loop="auto", timeout_keep_alive=65,
                                ssl_certfile=None, ssl_keyfile=None)
    server.dataplane = kserve_compat.DataPlaneOnly(model_registry=server.registered_models,
                                                   max_elements=options.max_images)
    server.register_model(model)

    kserve_compat.add_rest_middleware(BodySizeLimit, max_bytes=options.max_request_bytes)
    kserve_compat.add_rest_exception_handler(
        ServerOverloaded, lambda request, exc: JSONResponse({"error": str(exc)}, status_code=503,
                                                            headers={"Retry-After": "1"}))
    log.info("serving %s as '%s' on http://%s:%d (v2 REST) and %s:%d (gRPC)", options.model_uri, model.name,
             options.host, options.http_port, options.host, options.grpc_port)
    kserve_compat.serve(server, options.host, max_grpc_message_bytes=options.max_request_bytes)
