"""Abuse check: hostile requests over every transport, then a soak with valid ones.

Starts `brainscan serve` on 127.0.0.1 (a small CNN, the server's default limits), then:

1. sends 40+ malformed or hostile requests over v2 REST JSON, the v2 binary-data extension
   (Inference-Header-Content-Length) and v2 gRPC: image formats the model never saw and
   multi-frame files (a GIF whose second frame is 3000x3000, animated GIF / PNG / WebP, multi-page
   TIFF, ICO, MPO), truncated files, decompression bombs; malformed shapes, datatypes and
   encodings (shape [null], bad base64, wrong datatype, broken binary framing); sizes (too many
   images, a body over the limit, a huge JSON tensor); control-plane calls (model repository
   load / unload / index over REST and gRPC). Each must get a clear 4xx (gRPC:
   INVALID_ARGUMENT, UNIMPLEMENTED, NOT_FOUND, RESOURCE_EXHAUSTED) with a message;
2. checks the server still serves;
3. soaks it for `--seconds` (60) at `--concurrency` (64) with valid one-image requests, REST JSON,
   REST binary and gRPC in turn: every one must answer 200 / OK.

Prints each hostile request's status and message, the soak's counts, and the server's peak
memory (VmHWM of /proc/PID/status: the process's high-water resident set). Exits 1 when a
hostile request got a 2xx, a 5xx or no answer, or a soak request failed.

    .venv/bin/python benchmarks/abuse.py [--seconds 60] [--concurrency 64]

The model: a three-layer CNN at 32 px (the serving tests' size), so the check measures the
server's handling, not a network's speed. Everything binds 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import struct
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
# tritonclient's generated v2 gRPC stubs; kserve registers the same protobuf symbols, so nothing
# here may import kserve (serving): the server runs in its own process.
from tritonclient.grpc import service_pb2, service_pb2_grpc

from brainscan.config import MODEL_NAME, ServeSettings
from brainscan.local import predictor
from brainscan.local.hostile_images import declaring_size, encode, gif_with_large_second_frame, refused_images
from brainscan.modelstore import save_bundle

IMAGE_SIZE = 32
INFER = f"/v2/models/{MODEL_NAME}/infer"
GRPC_REFUSALS = {"INVALID_ARGUMENT", "UNIMPLEMENTED", "NOT_FOUND", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
                 "OUT_OF_RANGE"}


@dataclass
class Outcome:
    transport: str
    name: str
    status: str  # HTTP code, or the gRPC status name
    message: str

    @property
    def clear_refusal(self) -> bool:
        if self.status.isdigit():
            return 400 <= int(self.status) < 500 and bool(self.message.strip())
        return self.status in GRPC_REFUSALS and bool(self.message.strip())


# --------------------------------------------------------------------------- the server
def tiny_bundle(out: Path) -> Path:
    # TensorFlow's import costs seconds: only when the bundle is built
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), name="image")
    x = inputs
    for i, filters in enumerate((16, 32, 64)):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv_{i}")(x)
        if i < 2:
            x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(7, activation="softmax", name="probabilities")(x))
    save_bundle(model, str(out), IMAGE_SIZE, {"trained_by": "benchmarks/abuse.py"}, threshold=0.5)
    return out


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scan_like(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64] / 64 - 0.5
    picture = np.exp(-((xx / 0.35) ** 2 + (yy / 0.42) ** 2) * 3) * 200 + rng.normal(0, 8, (64, 64))
    return encode(np.clip(picture, 0, 255).astype(np.uint8), "PNG" if seed % 2 else "JPEG")


# --------------------------------------------------------------------------- transports
def http_post(port: int, path: str, body: bytes, headers: dict | None = None, method: str = "POST"
              ) -> tuple[str, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return str(response.status), response.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as err:
        return "no answer", f"{type(err).__name__}: {err}"
    finally:
        connection.close()


def v2_json(inputs: list[dict]) -> bytes:
    return json.dumps({"inputs": inputs}).encode()


def b64_input(files: list[bytes], **changes) -> dict:
    return {"name": "image", "shape": [len(files)], "datatype": "BYTES",
            "data": [base64.b64encode(f).decode() for f in files], **changes}


def binary_body(files: list[bytes], **changes) -> tuple[bytes, dict]:
    """The binary-data extension: a JSON header, then each BYTES element as 4-byte length + bytes."""
    raw = b"".join(struct.pack("<I", len(f)) + f for f in files)
    header = json.dumps({"inputs": [{"name": "image", "shape": [len(files)], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}, **changes}]}).encode()
    return header + raw, {"Content-Type": "application/octet-stream",
                          "Inference-Header-Content-Length": str(len(header))}


def grpc_call(channel, method: str, request) -> tuple[str, str]:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    try:
        getattr(stub, method)(request, timeout=300)
        return "OK", ""
    except grpc.RpcError as err:
        return err.code().name, err.details() or ""


def grpc_infer_request(files: list[bytes], raw: bool = True, shape: list[int] | None = None,
                       datatype: str = "BYTES"):
    request = service_pb2.ModelInferRequest(model_name=MODEL_NAME)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "image", datatype
    tensor.shape.extend(shape if shape is not None else [len(files)])
    if raw:
        request.raw_input_contents.append(b"".join(struct.pack("<I", len(f)) + f for f in files))
    else:
        tensor.contents.bytes_contents.extend(files)
    return request


# --------------------------------------------------------------------------- hostile requests
def hostile_requests(port: int, channel, settings: ServeSettings) -> list[tuple[str, str, callable]]:
    """(transport, name, call) for each hostile request; call() -> (status, message)."""
    good = scan_like(0)
    refused = refused_images()
    cases = []

    def rest(name, body, headers=None, path=INFER, method="POST"):
        cases.append(("REST JSON" if not headers else "REST binary", name,
                      lambda: http_post(port, path, body, headers, method)))

    def over_grpc(name, method, request):
        cases.append(("gRPC", name, lambda: grpc_call(channel, method, request)))

    bombs = {"PNG bomb (header 30000x30000)": declaring_size("PNG", 30000, 30000),
             "JPEG bomb (header 30000x30000)": declaring_size("JPEG", 30000, 30000),
             "PNG just over max_pixels": declaring_size("PNG", 4097, 4096)}
    files = {**{name: data for name, (data, _) in refused.items()}, **bombs,
             "truncated JPEG": scan_like(2)[:200], "truncated PNG": scan_like(1)[:60],
             "text, not an image": b"hello, I am text"}
    for name, data in files.items():  # formats, frames, bombs: REST JSON
        rest(name, v2_json([b64_input([data])]))
    for name in ("gif 8x8 then 3000x3000", "animated png (APNG)", "multi-page tiff", "icon of several sizes (ICO)"):
        body, headers = binary_body([refused[name][0]])
        rest(name, body, headers)
    for name, data in (("gif 8x8 then 3000x3000 (raw contents)", gif_with_large_second_frame()),
                       ("PNG bomb (raw contents)", bombs["PNG bomb (header 30000x30000)"])):
        over_grpc(name, "ModelInfer", grpc_infer_request([data]))
    over_grpc("animated png (bytes_contents)", "ModelInfer",
              grpc_infer_request([refused["animated png (APNG)"][0]], raw=False))

    # shapes, datatypes, encodings
    rest("shape [null] (JSON)", v2_json([b64_input([good], shape=[None])]))
    rest("shape [2] for one element", v2_json([b64_input([good], shape=[2])]))
    rest("wrong datatype FP32 for the image input", v2_json([b64_input([good], datatype="FP32")]))
    rest("unknown datatype", v2_json([{"name": "input", "shape": [1], "datatype": "FOO", "data": [1]}]))
    rest("not base64", v2_json([{**b64_input([good]), "data": ["%%% not base64 %%%"]}]))
    rest("malformed JSON", b'{"inputs": [ {"name": "image", ')
    rest("JSON array, not an object", b"[1, 2, 3]")
    rest("data is a number", v2_json([{"name": "image", "shape": [1], "datatype": "BYTES", "data": 5}]))
    rest("unknown input name", v2_json([b64_input([good], name="scan")]))
    for shape in ([None], ["1"], [-1], "1"):
        body, headers = binary_body([good], shape=shape)
        rest(f"binary shape {json.dumps(shape)}", body, headers)
    body, headers = binary_body([good], datatype="FOO")
    rest("binary unknown datatype", body, headers)
    body, headers = binary_body([good])
    rest("binary header length not a number", body, {**headers, "Inference-Header-Content-Length": "abc"})
    rest("binary header length past the body", body,
         {**headers, "Inference-Header-Content-Length": str(len(body) + 10)})
    rest("binary_data_size past the end", body[:-10], headers)
    header_length = int(headers["Inference-Header-Content-Length"])
    lying = body[:header_length] + struct.pack("<I", 1 << 30) + body[header_length + 4:]
    rest("binary element length prefix of 1 GiB", lying, headers)
    over_grpc("gRPC shape [2] for one element", "ModelInfer", grpc_infer_request([good], shape=[2]))
    over_grpc("gRPC datatype FP32 for the image input", "ModelInfer", grpc_infer_request([good], datatype="FP32"))
    over_grpc("gRPC unknown model", "ModelInfer", service_pb2.ModelInferRequest(model_name="nope"))

    # sizes
    rest(f"{settings.max_images + 1} images in one request", v2_json([b64_input([good] * (settings.max_images + 1))]))
    big = settings.max_request_bytes + 1024
    rest("body over max_request_bytes", b'{"inputs": [{"name": "image", "data": ["' + b"A" * big + b'"]}]}')
    floats = settings.max_request_bytes // 8  # a JSON tensor just under the limit, of the wrong shape
    rest("huge JSON tensor of the wrong shape",
         b'{"inputs": [{"name": "input", "shape": [%d, 8, 8, 3], "datatype": "FP32", "data": [' % (floats // 192)
         + b"0.5," * (floats - 1) + b"0.5]}]}")
    over_grpc("gRPC message over the limit", "ModelInfer",
              grpc_infer_request([b"\0" * (settings.max_request_bytes + 1024)]))

    # control plane: the model repository extension is not served
    for action in ("unload", "load"):
        rest(f"repository {action} (REST)", b"{}", path=f"/v2/repository/models/{MODEL_NAME}/{action}")
    rest("repository index (REST)", b"{}", path="/v2/repository/index")
    over_grpc("repository unload (gRPC)", "RepositoryModelUnload",
              service_pb2.RepositoryModelUnloadRequest(model_name=MODEL_NAME))
    over_grpc("repository load (gRPC)", "RepositoryModelLoad",
              service_pb2.RepositoryModelLoadRequest(model_name=MODEL_NAME))

    # v1 routes
    v1 = f"/v1/models/{MODEL_NAME}"
    gif = base64.b64encode(gif_with_large_second_frame()).decode()
    rest("v1 explain of the crafted GIF", json.dumps({"instances": [{"b64": gif}]}).encode(), path=f"{v1}:explain")
    rest("v1 predict, not base64", json.dumps({"instances": [{"b64": "%%%"}]}).encode(), path=f"{v1}:predict")
    rest("v1 predict, no instances", b'{"instances": 5}', path=f"{v1}:predict")
    return cases


# --------------------------------------------------------------------------- soak
def soak(port: int, grpc_address: str, seconds: float, concurrency: int, max_bytes: int) -> dict:
    images = [scan_like(seed) for seed in range(8)]
    bodies = [v2_json([b64_input([image])]) for image in images]
    binaries = [binary_body([image]) for image in images]
    counts = {"ok": 0, "failed": 0}
    failures: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    options = [("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes)]

    def client(index: int):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)  # kept alive
        channel = grpc.insecure_channel(grpc_address, options=options)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        sent = index
        try:
            while time.monotonic() < deadline:
                kind = sent % 3
                try:
                    if kind == 2:
                        stub.ModelInfer(grpc_infer_request([images[sent % 8]]), timeout=300)
                        ok, detail = True, ""
                    else:
                        body, headers = ((bodies[sent % 8], {"Content-Type": "application/json"}) if kind == 0
                                         else binaries[sent % 8])
                        connection.request("POST", INFER, body, headers)
                        response = connection.getresponse()
                        text = response.read()
                        ok, detail = response.status == 200, f"HTTP {response.status}: {text[:200]!r}"
                except (OSError, http.client.HTTPException, grpc.RpcError) as err:
                    ok, detail = False, f"{type(err).__name__}: {err}"
                    connection.close()
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                with lock:
                    counts["ok" if ok else "failed"] += 1
                    if not ok and len(failures) < 20:
                        failures.append(f"{('REST JSON', 'REST binary', 'gRPC')[kind]}: {detail}")
                sent += 1
        finally:
            connection.close()
            channel.close()

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    elapsed = time.monotonic() - started
    return {**counts, "seconds": round(elapsed, 1), "requests_per_s": round(sum(counts.values()) / elapsed, 1),
            "failures": failures}


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="soak duration (default 60)")
    parser.add_argument("--concurrency", type=int, default=64, help="soak clients (default 64)")
    args = parser.parse_args(argv)
    settings = ServeSettings()
    with tempfile.TemporaryDirectory(prefix="brainscan-abuse-") as tmp:
        bundle = tiny_bundle(Path(tmp) / "bundle")
        server = predictor.start(str(bundle), Path(tmp) / "work", timeout=600)
        try:
            at_start = peak_rss_mb(server.pid)
            print(f"server pid {server.pid}: REST {server.url}, gRPC {server.grpc_address}; "
                  f"peak RSS once ready {at_start:.0f} MB")
            channel = grpc.insecure_channel(server.grpc_address, options=[
                ("grpc.max_send_message_length", 2 * settings.max_request_bytes),
                ("grpc.max_receive_message_length", 2 * settings.max_request_bytes)])
            outcomes = []
            for transport, name, call in hostile_requests(server.http_port, channel, settings):
                status, message = call()
                outcomes.append(Outcome(transport, name, status, message))
                print(f"{'ok ' if outcomes[-1].clear_refusal else 'BAD'} {transport:11s} {status:18s} {name}: "
                      f"{' '.join(message.split())[:110]}")
            channel.close()
            still = http_post(server.http_port, INFER, v2_json([b64_input([scan_like(3)])]))
            print(f"still serving after the hostile requests: {still[0]}")
            print(f"soak: {args.seconds:g} s at concurrency {args.concurrency} ...", flush=True)
            result = soak(server.http_port, server.grpc_address, args.seconds, args.concurrency,
                          settings.max_request_bytes)
            rss = peak_rss_mb(server.pid)
        finally:
            predictor.stop(Path(tmp) / "work")
    unclear = [o for o in outcomes if not o.clear_refusal]
    print(f"\nhostile requests: {len(outcomes)}, answered with a clear 4xx: {len(outcomes) - len(unclear)}")
    for outcome in unclear:
        print(f"  NOT a clear 4xx: {outcome.transport} {outcome.name}: {outcome.status} {outcome.message[:200]}")
    print(f"soak: {result['ok']} ok, {result['failed']} failed in {result['seconds']} s "
          f"({result['requests_per_s']} requests/s)")
    for failure in result["failures"]:
        print(f"  failed: {failure}")
    print(f"server peak RSS (VmHWM): {rss:.0f} MB (once ready: {at_start:.0f} MB)")
    return 1 if unclear or result["failed"] or still[0] != "200" else 0


if __name__ == "__main__":
    sys.exit(main())
