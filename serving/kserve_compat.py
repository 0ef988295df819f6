"""Every adaptation of kserve that brainscan's model server needs, in one place (kserve 0.21.0).

Everything else in serving/ uses kserve's public API only: `kserve.Model`, `kserve.ModelServer`
and its options (ports, gRPC on/off, workers, gRPC threads, grace period, keep-alive, event
loop, access log), `ModelServer.register_model`, `setup_event_loop` and `stop`, the v2
types (`InferRequest`, `InferInput`, `InferOutput`, `InferResponse`) and `kserve.errors`.
What kserve 0.21.0 offers no public way to do is here, each with the upstream behaviour it
works around:

1. Binary BYTES over REST (`BinarySafeDataPlane`): `InferRequest.from_bytes`
   (kserve/protocol/infer_type.py) turns every binary-extension input into JSON data with
   `set_data_from_numpy(..., binary_data=False)`, which decodes BYTES elements as UTF-8: raw
   JPEG/PNG bytes sent by `tritonclient.http` end in a 500 (the same UTF-8 decoding of raw
   BYTES that kserve/kserve#3731 reports on the gRPC side). `DataPlane.decode_inference_request`
   (kserve/protocol/dataplane.py) also refuses a byte body without the
   Inference-Header-Content-Length header, which the binary-data extension makes optional.
   The override keeps the raw buffer, as kserve already does for gRPC raw contents.
   JSON off the event loop (`JSONBodiesAsBytes`, `BinarySafeDataPlane.infer` and `.explain`):
   FastAPI parses a v2 JSON body (`request_body: Union[InferenceRequest, bytes]` in
   protocol/rest/v2_endpoints.py) with json.loads and pydantic on the event loop, and
   `DataPlane.decode` parses v1 bodies with orjson there too: a 64 MB body held every request,
   health probes included, for about 9 s. Here FastAPI gets such a body as bytes (a
   middleware presents it as application/octet-stream), `decode` only records it, and
   `infer` / `explain` have serving.bodies parse it (a large one in a child process).
2. The data plane only (`DataPlaneOnly`, `NoRepositoryRoutes`, `DataPlaneOnlyServicer`):
   `RESTServer._register_endpoints` (kserve/protocol/rest/server.py, through
   `register_v2_endpoints` in protocol/rest/v2_endpoints.py) always adds the model repository
   extension's `POST /v2/repository/models/{name}/load|unload`, and `InferenceServicer`
   (protocol/grpc/servicer.py) always serves `RepositoryModelLoad|Unload`: any client could
   unload the model. Those paths answer 404 (a middleware, ahead of kserve's routes), those
   gRPC methods UNIMPLEMENTED, neither is given the extension, and `DataPlane.metadata` stops
   advertising it. `DataPlane.ready` (protocol/dataplane.py) answers True whatever the models'
   state (it only asks a transformer's predictor): here the server is ready when every model
   it serves is.
3. Raw contents of an input (`raw_contents`): `InferInput` keeps gRPC `raw_input_contents`
   and binary-extension buffers in `_raw_data` with no public accessor, and `data` does not
   tell them from an empty tensor (it is `[]` for gRPC raw contents).
4. REST middleware and exception handlers (`add_rest_middleware`,
   `add_rest_exception_handler`): kserve builds its FastAPI app as the module global
   `kserve.model_server.app` and offers no hook to add either (kserve/kserve#3142; the
   middleware PR kserve/kserve#2954 was closed unmerged), so they go onto that global.
5. gRPC server options (`HostGRPCServer`): `ModelServer.start` passes the gRPC message limits
   from kserve's own command-line parser (`kwargs=vars(args)`, kserve/kserve#3717 made them
   flags, not constructor options); and grpc's default SO_REUSEPORT lets a second server bind
   a port already in use without an error (grpc/grpc#16005), which kserve leaves on.
6. Drain on SIGTERM (`DrainingRESTServer`, `DrainingHTTP`): `ModelServer.stop` unloads the
   models at the signal, while requests are still in flight (gRPC ones then get NOT_FOUND), and
   kserve's REST server is uvicorn's, which starts draining gRPC only after REST is done
   (uvicorn holds the signal until its own shutdown ends). uvicorn's `Server.shutdown` (0.54,
   uvicorn/server.py) closes the listening socket, which resets the connections the kernel had
   already accepted for it (its backlog), and at once closes every connection between requests
   (`HttpToolsProtocol.shutdown`), a request whose bytes are on the way included. Here: the
   server reports not ready and gRPC starts draining at the signal; the backlog is accepted
   before the socket closes; a connection between requests answers one more request (with
   `Connection: close`) for `DRAIN_IDLE_S`; the models are unloaded once both servers are done.
7. Bind address (`serve`): `RESTServer.__init__` (kserve/protocol/rest/server.py) hard-codes
   uvicorn's host to 0.0.0.0 (kserve/kserve#4558) and `GRPCServer.start`
   (kserve/protocol/grpc/server.py) listens on [::]; `ModelServer` has no host option, so
   `ModelServer.start` cannot be used and `serve` does what it does, on the given host.

Upgrading kserve (or uvicorn, whose server 6. adapts): the import below refuses any other
version. Re-read the files named above, remove each adaptation the new version covers (a public
option or a fix), then change KSERVE_VERSION (UVICORN_VERSION).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from brainscan.config import ServeSettings
from brainscan.versions import require_version

KSERVE_VERSION = "0.21.0"
UVICORN_VERSION = "0.54.0"  # kserve's REST server; the drain (6.) subclasses its server and protocol


def check_version() -> None:
    """Refuse a kserve (or uvicorn) this module was not written for (its adaptations may silently break)."""
    require_version("kserve", KSERVE_VERSION, __name__, "kserve")
    require_version("uvicorn", UVICORN_VERSION, __name__, "uvicorn server and HTTP protocol")


check_version()

import kserve  # noqa: E402  (after the version check, on purpose)
import numpy as np  # noqa: E402
import uvicorn  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from grpc import aio  # noqa: E402
from grpc_interceptor.exceptions import Unimplemented  # noqa: E402
from kserve.errors import InvalidInput  # noqa: E402
from kserve.model_server import app as _kserve_app  # noqa: E402
from kserve.constants.constants import PredictorProtocol  # noqa: E402
from kserve.protocol.dataplane import JSON_HEADERS, DataPlane  # noqa: E402
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc  # noqa: E402
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor  # noqa: E402
from kserve.protocol.grpc.servicer import InferenceServicer  # noqa: E402
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput  # noqa: E402
from kserve.protocol.rest.server import RESTServer  # noqa: E402
from uvicorn.protocols.http.auto import AutoHTTPProtocol  # noqa: E402

from serving.bodies import BodyError, Parser, parse_json  # noqa: E402

_log = logging.getLogger("kserve")  # the logger kserve's servers log to

# kserve.model_server's FASTAPI_APP_IMPORT_STRING: RESTServer imports the app by this name.
_APP_IMPORT_STRING = "kserve.model_server:app"


# --------------------------------------------------------------------------- 1. binary BYTES
@dataclasses.dataclass
class _Unparsed:
    """A REST body `decode` left for `infer` / `explain` to parse in a worker thread."""

    body: bytes
    headers: dict | None
    model_name: str | None
    v2: bool  # a v2 inference request (else v1: a JSON object)


class BinarySafeDataPlane(DataPlane):
    """DataPlane whose REST binary-extension parsing keeps BYTES inputs as raw bytes, and that
    parses REST bodies off the event loop (serving.bodies: a large one in a child process).

    `decode_inference_request` for byte bodies is brainscan's; gRPC goes through kserve
    untouched. The result is what kserve builds for gRPC raw contents: an InferRequest made
    with `raw_inputs`, whose inputs' `as_numpy()` turns the length-prefixed buffer into an
    object array of bytes.
    """

    def __init__(self, model_registry, max_elements: int = ServeSettings.max_images):
        super().__init__(model_registry)
        self.parser = Parser(max_elements)

    def decode(self, body, headers, protocol_version=PredictorProtocol.REST_V1.value, model_name=None):
        v2 = protocol_version.lower() == PredictorProtocol.REST_V2.value
        headers = headers or {}
        # a v1 JSON body; not a CloudEvent in binary mode (ce-* headers), which kserve answers in kind
        json_v1 = (headers.get("content-type", "application/json") in JSON_HEADERS
                   and not any(name.startswith("ce-") for name in headers))
        if isinstance(body, bytes) and (v2 or json_v1):
            return _Unparsed(body, headers, model_name, v2), {}
        return super().decode(body, headers, protocol_version, model_name)

    async def _parsed(self, request):
        if not isinstance(request, _Unparsed):
            return request
        json_length = _json_length(request.body, request.headers) if request.v2 else len(request.body)
        try:
            document = await self.parser.parse(request.body[:json_length] if request.v2 else request.body)
        except BodyError as err:
            raise InvalidInput(str(err)) from None
        except BrokenProcessPool:  # the parser's child died (out of memory): the next body gets a new one
            self.parser.stop()
            raise InvalidInput("the request body could not be parsed (too large to parse)") from None
        if request.v2:
            return _request_from(document, request.body, json_length, request.model_name)
        return super().decode(document, request.headers)[0]

    async def infer(self, model_name, request, headers=None):
        return await super().infer(model_name, await self._parsed(request), headers)

    async def explain(self, model_name, request, headers=None):
        return await super().explain(model_name, await self._parsed(request), headers)

    def decode_inference_request(self, body, headers, model_name):
        if not isinstance(body, bytes):
            return super().decode_inference_request(body, headers, model_name)
        json_length = _json_length(body, headers)
        try:
            spec = parse_json(body[:json_length], self.parser.max_elements)
        except BodyError as err:
            raise InvalidInput(str(err)) from None
        return _request_from(spec, body, json_length, model_name)


def _json_length(body: bytes, headers) -> int:
    """Bytes of JSON at the start of a binary-extension body (Inference-Header-Content-Length)."""
    # No header: the whole body is the JSON request (tritonclient sends JSON this way too).
    header = (headers or {}).get("inference-header-content-length", str(len(body)))
    try:
        json_length = int(header)
    except ValueError:
        raise InvalidInput(f"Inference-Header-Content-Length is not a number: {header!r}") from None
    if not 0 < json_length <= len(body):
        raise InvalidInput(f"Inference-Header-Content-Length {json_length} does not fit a "
                           f"{len(body)}-byte body")
    return json_length


def _request_from(spec, body: bytes, json_length: int, model_name: str | None) -> InferRequest:
    """The InferRequest of a parsed v2 request JSON and the binary data after it in body."""
    if not isinstance(spec, dict) or not isinstance(spec.get("inputs"), list):
        raise InvalidInput('request JSON must be an object with an "inputs" list')
    _check_fields(spec, "request", {"id": str, "parameters": dict, "outputs": list})
    inputs, raw, offset = [], [], json_length
    for entry in spec["inputs"]:
        if not isinstance(entry, dict) or not {"name", "shape", "datatype"} <= entry.keys():
            raise InvalidInput("each input needs name, shape and datatype")
        _check_fields(entry, "input", {"name": str, "datatype": str, "parameters": dict})
        shape = entry["shape"]
        # what FastAPI's model checks for a JSON body: a list of integers (bool is not one)
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise InvalidInput(f"input {entry['name']!r}: shape must be a list of non-negative integers, "
                               f"got {shape!r}")
        parameters = entry.get("parameters") or {}
        tensor = InferInput(name=entry["name"], shape=shape, datatype=entry["datatype"], parameters=parameters)
        data = entry.get("data")
        if data is not None:
            if not isinstance(data, (list, np.ndarray)):  # parse_json made numbers an array
                raise InvalidInput(f"input {entry['name']!r}: data must be a list, got {type(data).__name__}")
            tensor.data = data
            raw.append(None)
        elif "binary_data_size" in parameters:
            size = parameters["binary_data_size"]
            if not isinstance(size, int) or size < 0 or offset + size > len(body):
                raise InvalidInput(f"input '{entry['name']}': binary_data_size {size!r} runs past "
                                   "the end of the request body")
            raw.append(body[offset:offset + size])
            offset += size
        else:
            raise InvalidInput(f"input '{entry['name']}' has neither 'data' nor 'binary_data_size'")
        inputs.append(tensor)
    outputs = None
    if isinstance(spec.get("outputs"), list):
        outputs = [RequestedOutput(name=o.get("name"), parameters=o.get("parameters"))
                   for o in spec["outputs"] if isinstance(o, dict)]
    # raw_inputs pairs with inputs by position (None: that input came as JSON data). It also
    # marks the request for raw outputs, which kserve applies to gRPC requests only.
    return InferRequest(model_name=model_name, request_id=spec.get("id"),
                        parameters=spec.get("parameters"), infer_inputs=inputs,
                        raw_inputs=raw if any(r is not None for r in raw) else None,
                        request_outputs=outputs)


def _check_fields(entry: dict, what: str, types: dict) -> None:
    """InvalidInput when one of the fields present (not null) has another JSON type than expected."""
    for name, expected in types.items():
        value = entry.get(name)
        if value is not None and not isinstance(value, expected):
            kind = {str: "a string", dict: "an object", list: "a list"}[expected]
            raise InvalidInput(f"{what} field {name!r} must be {kind}, got {type(value).__name__}")


# --------------------------------------------------------------------------- 2. the data plane only
# The model repository extension's REST paths (kserve's V2_ROUTE_PREFIX + its routes).
REPOSITORY_PATH_PREFIX = "/v2/repository"
REPOSITORY_REFUSED = "the model repository extension is off: this server does not load or unload models"


class JSONBodiesAsBytes:
    """ASGI middleware: a v2 infer body sent as JSON reaches kserve's route as bytes (FastAPI
    would parse it on the event loop); BinarySafeDataPlane parses it in a worker thread."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith("/infer"):
            headers = [(name, value) for name, value in scope["headers"] if name != b"content-type"]
            declared = dict(scope["headers"]).get(b"content-type", b"application/json")
            if declared.split(b";")[0].strip().lower() in _JSON_TYPES:
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/octet-stream")]}
        return await self.app(scope, receive, send)


_JSON_TYPES = {t.encode() for t in JSON_HEADERS}


class DataPlaneOnly(BinarySafeDataPlane):
    """The data plane brainscan serves: readiness that follows the models, no extension advertised."""

    draining = False  # set at SIGTERM (6.): not ready while the server finishes its requests

    async def ready(self) -> bool:
        if self.draining:
            return False
        names = list(self.model_registry.get_models())
        return bool(names) and all([await self.model_registry.is_model_ready(name) for name in names])

    def metadata(self) -> dict:
        return {**super().metadata(), "extensions": []}


class NoRepositoryRoutes:
    """ASGI middleware: 404 for the repository extension's REST paths, before kserve's routes see
    them (FastAPI 0.165 keeps included routers wrapped: its route list cannot be edited safely)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(REPOSITORY_PATH_PREFIX):
            return await JSONResponse({"error": REPOSITORY_REFUSED}, status_code=404)(scope, receive, send)
        return await self.app(scope, receive, send)


class DataPlaneOnlyServicer(InferenceServicer):
    """kserve's gRPC servicer whose repository methods answer UNIMPLEMENTED."""

    def __init__(self, data_plane: DataPlane):
        super().__init__(data_plane, model_repository_extension=None)

    async def RepositoryModelLoad(self, request, context):
        raise Unimplemented(REPOSITORY_REFUSED)  # kserve's interceptor sets the status from it

    async def RepositoryModelUnload(self, request, context):
        raise Unimplemented(REPOSITORY_REFUSED)


# --------------------------------------------------------------------------- 3. raw contents
def raw_contents(tensor: InferInput) -> bytes | None:
    """The input's raw buffer (gRPC raw_input_contents, REST binary extension), or None."""
    return tensor._raw_data


# --------------------------------------------------------------------------- 4. the REST app
def add_rest_middleware(middleware_class, **options) -> None:
    """Wrap kserve's REST app (every route) in an ASGI middleware."""
    _kserve_app.add_middleware(middleware_class, **options)


def add_rest_exception_handler(exception_class, handler) -> None:
    """Answer `exception_class` raised on a REST route with `handler(request, exc)`."""
    _kserve_app.add_exception_handler(exception_class, handler)


# --------------------------------------------------------------------------- 5. gRPC
class HostGRPCServer:
    """kserve's gRPC inference service (its servicer and interceptors) on `host`, with the
    given message limit and without SO_REUSEPORT (a port in use fails instead of being shared)."""

    def __init__(self, server: kserve.ModelServer, host: str, max_message_bytes: int):
        self.servicer = DataPlaneOnlyServicer(server.dataplane)
        self.address = f"[{host}]:{server.grpc_port}" if ":" in host else f"{host}:{server.grpc_port}"
        self.max_message_bytes = max_message_bytes
        self.grace_period = server.grace_period
        self.grpc_server: aio.Server | None = None

    async def start(self, max_workers: int) -> None:
        self.grpc_server = aio.server(
            ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
            options=[("grpc.max_send_message_length", self.max_message_bytes),
                     ("grpc.max_receive_message_length", self.max_message_bytes),
                     ("grpc.so_reuseport", 0)])
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, self.grpc_server)
        if self.grpc_server.add_insecure_port(self.address) == 0:
            raise RuntimeError(f"cannot bind gRPC to {self.address}")
        await self.grpc_server.start()
        await self.grpc_server.wait_for_termination()

    async def stop(self, sig: int | None = None) -> None:
        if self.grpc_server is not None:
            _log.info("Stopping the grpc server")  # kserve's own lines for its gRPC server
            _log.info("Waiting for gRPC server shutdown")
            await self.grpc_server.stop(grace=self.grace_period)
            _log.info("gRPC server shutdown complete")


# --------------------------------------------------------------------------- 6. drain on SIGTERM
DRAIN_IDLE_S = 1.0  # how long a connection between requests may still bring one after SIGTERM


class DrainingHTTP(AutoHTTPProtocol):
    """uvicorn's HTTP protocol whose graceful shutdown answers a request already on its way.

    uvicorn closes a connection that has no request in progress at once; a request whose bytes
    are in flight (a fresh connection, a keep-alive one) is then reset. Here such a connection
    stays open for DRAIN_IDLE_S: a request arriving meanwhile is answered with `Connection:
    close`; after that the connection closes as uvicorn's would.
    """

    _draining = False
    _idle_close = None

    def shutdown(self) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            return super().shutdown()  # in progress: answered, then closed
        self._draining = True
        self._idle_close = self.loop.call_later(DRAIN_IDLE_S, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._idle_close is not None:
            self._idle_close.cancel()
            self._idle_close = None
        super().data_received(data)
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False  # the one request it may still bring


class DrainingRESTServer(uvicorn.Server):
    """uvicorn's server that calls `on_signal(sig)` at SIGINT/SIGTERM (before draining starts)
    and accepts the connections waiting in the listening socket's backlog before closing it."""

    def __init__(self, config: uvicorn.Config, on_signal):
        super().__init__(config)
        self.on_signal = on_signal
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None:  # a signal handler: the work goes onto the event loop
            self._loop.call_soon_threadsafe(self.on_signal, sig)

    async def shutdown(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        waiting = []
        for server in self.servers:
            for listener in server.sockets:
                waiting += _accept_backlog(listener)
        # connect them before uvicorn's shutdown walks its connections (it then drains them)
        await asyncio.gather(*(loop.connect_accepted_socket(self._protocol, sock=connection)
                               for connection in waiting))
        await super().shutdown(sockets)

    def _protocol(self) -> asyncio.Protocol:  # what uvicorn's Server.startup hands create_server
        return self.config.http_protocol_class(config=self.config, server_state=self.server_state,
                                               app_state=self.lifespan.state)


def _accept_backlog(listener) -> list[socket.socket]:
    """Accept every connection the kernel completed for the listening socket (non-blocking)."""
    accepted = []
    with socket.socket(fileno=os.dup(listener.fileno())) as sock:
        sock.setblocking(False)
        while True:
            try:
                connection, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return accepted
            except OSError as err:  # closed meanwhile, out of descriptors: keep what we have
                _log.warning("while draining, could not accept a waiting connection: %s", err)
                return accepted
            connection.setblocking(False)
            accepted.append(connection)


# --------------------------------------------------------------------------- 7. serve on a host
def serve(server: kserve.ModelServer, host: str, max_grpc_message_bytes: int) -> None:
    """What `ModelServer.start` does for its registered models (one worker), bound to `host`.

    REST and gRPC are built from the server's own settings (ports, grace period, keep-alive,
    event loop, access log, gRPC threads), without the model repository extension (2.); blocks
    until SIGINT/SIGTERM/SIGQUIT, then drains (6.): not ready, no new connections, every
    accepted request answered within the server's grace period, the models unloaded last.
    """
    add_rest_middleware(NoRepositoryRoutes)
    add_rest_middleware(JSONBodiesAsBytes)
    rest = RESTServer(_APP_IMPORT_STRING, server.dataplane, None, server.http_port,
                      access_log_format=server.access_log_format, workers=1,
                      grace_period=server.grace_period, event_loop=server.event_loop,
                      timeout_keep_alive=server.timeout_keep_alive)
    rest.config.host = host  # the uvicorn.Config its server reads when it starts
    rest.config.http = DrainingHTTP
    grpc = HostGRPCServer(server, host, max_grpc_message_bytes) if server.enable_grpc else None
    draining: list[int] = []

    def drain(sig: int) -> None:
        if draining:
            return
        draining.append(sig)
        _log.info("signal %d: draining; not ready, answering the accepted requests (up to %d s)",
                  sig, server.grace_period)
        server.dataplane.draining = True
        if grpc is not None:  # now, not after REST is done
            asyncio.get_running_loop().create_task(grpc.stop(sig))

    http = DrainingRESTServer(rest.config, on_signal=drain)

    async def serve_rest():
        rest.create_application()  # what RESTServer.start does, with the draining server
        await http.serve()

    def on_signal(sig, frame):
        # uvicorn handles SIGINT/SIGTERM itself while it runs, then raises them again: here.
        http.should_exit = True
        drain(sig)

    async def run_all():
        await asyncio.gather(serve_rest(), *([grpc.start(server.max_threads)] if grpc else []))
        for name in list(server.registered_models.get_models()):  # nothing is in flight any more
            server.registered_models.unload(name)
        server.dataplane.parser.stop()

    server.dataplane.parser.start()  # its child process imports numpy now, not at the first large body
    server.setup_event_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):  # ModelServer.register_signal_handler's
        signal.signal(sig, on_signal)
    asyncio.run(run_all())
