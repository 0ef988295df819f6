"""Serving benchmark: brainscan's KServe predictor against KServe's stock MLflow runtime (MLServer).

One run, side by side, on the same registered model, on this machine:

- brainscan serve, v2 REST JSON (base64), v2 REST binary extension (raw bytes), v2 gRPC;
- MLServer 1.7.1 + mlserver-mlflow with adaptive batching, in the model's own virtualenv plus
  MLServer's pins (built here by brainscan.local.mlserver, cached under ~/.cache/brainscan/venvs),
  v2 REST JSON (base64): what a KServe user gets for `modelFormat: mlflow`;
- in-process: the same decode + preprocess + model call as the server, in this process, with
  no HTTP, batches of `concurrency` images, the next one decoded (one thread per core) while
  the model runs the current one, as in the server (the limit a server approaches).

Closed-loop clients (asyncio, request bodies built once) send one image per request for
`--seconds` per point at concurrency 1, 8, 32 and 64; images/s, p50, p99 and errors per point;
every point `--runs` times, the systems' order rotated between runs, and the median reported.
Then `--soak-seconds` at concurrency 64 per brainscan protocol (errors must be 0), and cold
starts: seconds from process start to model-ready for both servers on the same model from the
local S3 (a fresh cache each time; MLServer's includes the download KServe's storage
initializer does before it starts).

The model: an untrained Xception at 71 px built by `brainscan.network.build_model(71,
base_weights="none")` (the demo model's architecture and cost), registered through
`components.register` in a local stack (SeaweedFS on 127.0.0.1 + MLflow on sqlite,
artifacts in S3) as `models:/brain-tumor/1`. Everything binds 127.0.0.1 and is stopped at the end.

    bash scripts/dev.sh setup && .venv/bin/python benchmarks/serving.py

writes benchmarks/results/serving.json (every run, the medians, ratios, aims, machine load)
and serving.png. Not a test: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import re
import shutil
import signal
import struct
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import matplotlib
import numpy as np
from PIL import Image
# tritonclient's generated v2 gRPC stubs; kserve registers the same protobuf symbols, so nothing
# here may import kserve (serving): the servers run in their own processes.
from tritonclient.grpc import service_pb2, service_pb2_grpc

from brainscan import registry, storage

from brainscan.local import mlserver, predictor, stack
from components.register import register
from brainscan.network import build_model
from brainscan.config import EXPERIMENT, MODEL_NAME, version_of
from serving.runtime import ServedModel
from brainscan.cpus import cpu_count
from brainscan.modelstore import load_bundle, save_bundle

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 8, 32, 64)
SERVER_SYSTEMS = ("brainscan-json", "brainscan-binary", "brainscan-grpc", "mlserver")
SYSTEMS = (*SERVER_SYSTEMS, "in-process")
INFER_PATH = f"/v2/models/{MODEL_NAME}/infer"


@dataclass
class Point:
    system: str
    concurrency: int
    run: int
    requests: int
    seconds: float
    images_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    client_cpu_s: float = 0.0  # CPU seconds this (client) process used during the point
    mean_batch: float | None = None  # brainscan: images per model call during the point (/metrics)
    model_busy: float | None = None  # brainscan: fraction of the point's wall time spent in model calls


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------- request bodies
def make_images(count: int = 16, side: int = 256) -> list[bytes]:
    """Phantom-like greyscale JPEGs (about 10 kB each), different noise in each."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side] / side - 0.5
    images = []
    for _ in range(count):
        picture = np.exp(-((xx / 0.35) ** 2 + (yy / 0.42) ** 2) * 3) * 200 + rng.normal(0, 10, (side, side))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8)).save(buffer, format="JPEG")
        images.append(buffer.getvalue())
    return images


def http_request(port: int, body: bytes, content_type: str = "application/json",
                 extra_headers: dict | None = None) -> bytes:
    headers = {"Host": f"127.0.0.1:{port}", "Content-Type": content_type, "Content-Length": str(len(body)),
               **(extra_headers or {})}
    head = f"POST {INFER_PATH} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode() + body


def json_requests(port: int, images: list[bytes]) -> list[bytes]:
    """v2 JSON, BYTES as base64 text (brainscan and MLServer alike)."""
    return [http_request(port, json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                        "data": [base64.b64encode(b).decode()]}]}).encode())
            for b in images]


def binary_requests(port: int, images: list[bytes]) -> list[bytes]:
    """v2 binary-data extension: a JSON header, then the raw file as length-prefixed BYTES."""
    out = []
    for image in images:
        raw = struct.pack("<I", len(image)) + image
        header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                         "parameters": {"binary_data_size": len(raw)}}]}).encode()
        out.append(http_request(port, header + raw, "application/octet-stream",
                                {"Inference-Header-Content-Length": str(len(header))}))
    return out


def grpc_requests(images: list[bytes]) -> list:
    out = []
    for image in images:
        request = service_pb2.ModelInferRequest(model_name=MODEL_NAME)
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = "image", "BYTES"
        tensor.shape.append(1)
        request.raw_input_contents.append(struct.pack("<I", len(image)) + image)
        out.append(request)
    return out


# --------------------------------------------------------------------------- closed-loop clients
class HttpError(RuntimeError):
    pass


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return status, body
            body += chunk[:-2]
    raise HttpError("response without Content-Length")


async def _closed_loop(send_factory, bodies: list, concurrency: int, seconds: float, name: str):
    """`concurrency` clients, each sending its next request when the last one answered."""
    latencies: list[float] = []
    errors = [0]
    stop_at = time.perf_counter() + seconds

    async def client(index: int):
        send = await send_factory()
        i = index
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                await send(bodies[i % len(bodies)])
                latencies.append(time.perf_counter() - started)
            except Exception as err:  # noqa: BLE001 - counted; the first of each kind is shown
                errors[0] += 1
                if errors[0] <= 3:
                    log(f"{name}: error: {type(err).__name__}: {str(err)[:300]}")
                await asyncio.sleep(0.05)
                send = await send_factory()
            i += concurrency

    started = time.perf_counter()
    cpu = time.process_time()
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    return latencies, errors[0], time.perf_counter() - started, time.process_time() - cpu


def http_sender(port: int):
    async def factory():
        state = {}

        async def send(request: bytes):
            if "writer" not in state:
                state["reader"], state["writer"] = await asyncio.open_connection("127.0.0.1", port)
            state["writer"].write(request)
            status, body = await _read_response(state["reader"])
            if status != 200:
                raise HttpError(f"HTTP {status}: {body[:200]!r}")
        return send
    return factory


def grpc_sender(port: int, channel_holder: dict):
    async def factory():
        if "stub" not in channel_holder:
            channel_holder["channel"] = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
            channel_holder["stub"] = service_pb2_grpc.GRPCInferenceServiceStub(channel_holder["channel"])
        stub = channel_holder["stub"]

        async def send(request):
            await stub.ModelInfer(request, timeout=120)
        return send
    return factory


def measure(system: str, factory, bodies: list, concurrency: int, seconds: float, run: int) -> Point:
    latencies, errors, wall, cpu = asyncio.run(_closed_loop(factory, bodies, concurrency, seconds, system))
    return _point(system, concurrency, run, latencies, errors, wall, cpu, 1)


def _point(system, concurrency, run, latencies, errors, wall, cpu, images_per_request) -> Point:
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return Point(system, concurrency, run, len(latencies), round(wall, 3),
                 len(latencies) * images_per_request / wall, float(np.percentile(ms, 50)),
                 float(np.percentile(ms, 99)), errors, round(cpu, 3))


class Target:
    """One served system: how to build its request bodies and send them."""

    def __init__(self, system: str, port: int, images: list[bytes], metrics_url: str | None = None):
        self.system = system
        self.metrics_url = metrics_url
        self.grpc_state: dict = {}
        if system == "brainscan-grpc":
            self.bodies, self.factory = grpc_requests(images), grpc_sender(port, self.grpc_state)
        elif system == "brainscan-binary":
            self.bodies, self.factory = binary_requests(port, images), http_sender(port)
        else:
            self.bodies, self.factory = json_requests(port, images), http_sender(port)

    def run(self, concurrency: int, seconds: float, run: int) -> Point:
        self.grpc_state.clear()  # a fresh channel inside this point's event loop
        before = server_counters(self.metrics_url) if self.metrics_url else None
        point = measure(self.system, self.factory, self.bodies, concurrency, seconds, run)
        after = server_counters(self.metrics_url) if self.metrics_url else None
        if before and after and after["calls"] > before["calls"]:
            point.mean_batch = round((after["images"] - before["images"]) / (after["calls"] - before["calls"]), 2)
            point.model_busy = round((after["model_s"] - before["model_s"]) / point.seconds, 3)
        return point


def metrics_text(url: str) -> str | None:
    """The server's /metrics page (Prometheus text), or None when it does not answer."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
            return response.read().decode()
    except OSError:
        return None


def server_counters(url: str) -> dict | None:
    """brainscan's batcher counters from /metrics: model calls, images, seconds in model calls."""
    text = metrics_text(url)
    if text is None:
        return None
    values = {}
    for key, name in (("calls", "brainscan_batch_size_count"), ("images", "brainscan_batch_size_sum"),
                      ("model_s", "brainscan_model_call_seconds_sum")):
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        if not match:
            return None
        values[key] = float(match.group(1))
    return values


def in_process(served: ServedModel, images: list[bytes], concurrency: int, seconds: float, run: int) -> Point:
    """The limit: the server's decode + preprocess + model call for batches of `concurrency` images,
    with no HTTP, pipelined as the server does it: the next batch is decoded on one thread per
    core while the model runs the current one. Latency: from a batch's decode start to its answer."""
    batch = [images[i % len(images)] for i in range(concurrency)]
    workers = cpu_count()
    chunks = [batch[k::workers] for k in range(workers) if batch[k::workers]]
    served.predict(served.preprocess(batch))  # warm this batch size
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="in-process-decode") as pool:
        def decode():
            return time.perf_counter(), [pool.submit(served.preprocess, chunk) for chunk in chunks]

        latencies, started, cpu = [], time.perf_counter(), time.process_time()
        pending = decode()
        while time.perf_counter() - started < seconds:
            began, parts = pending
            x = np.concatenate([part.result() for part in parts])
            pending = decode()  # the next batch decodes while this one is in the model
            served.predict(x)
            latencies.append(time.perf_counter() - began)
        wall = time.perf_counter() - started
        for part in pending[1]:
            part.result()
    return _point("in-process", concurrency, run, latencies, 0, wall, time.process_time() - cpu, concurrency)


# --------------------------------------------------------------------------- set-up
def register_demo_sized_model(workdir: Path, image_size: int) -> str:
    """An untrained Xception with the demo model's architecture, registered with its artifacts in S3."""
    bucket = "brainscan-bench"
    storage.ensure_bucket(bucket)
    client, uri = registry.connect(os.environ["MLFLOW_TRACKING_URI"])
    if client.get_experiment_by_name(EXPERIMENT) is None:  # artifacts in the local S3, not next to the db
        client.create_experiment(EXPERIMENT, artifact_location=f"s3://{bucket}/mlflow")
    model, _ = build_model(image_size, base_weights="none")
    bundle = workdir / "bundle"
    save_bundle(model, str(bundle), image_size, {"trained_by": "benchmarks/serving.py (untrained, for speed only)"})
    evaluation = {"gate": {"passed": True, "reason": "benchmark stand-in: untrained model, never deploy"},
                  "threshold": 0.5, "target_recall": 0.99, "test": {"recall": 0.0, "roc_auc": 0.5}}
    result = register(str(bundle), evaluation, tracking_uri=uri, workdir=workdir)
    if not result.registered:
        raise SystemExit(f"could not register the benchmark model: {result.reason}")
    return result.model_uri


def start_brainscan(model_uri: str, workdir: Path, args) -> tuple[predictor.LocalServer, float]:
    """`brainscan serve` on model_uri with an empty cache (model download included, as on a fresh pod;
    the registered model.onnx is loaded, nothing converted); (server, seconds to ready)."""
    cache = workdir / "brainscan-cache"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["BRAINSCAN_CACHE"] = str(cache)
    started = time.perf_counter()
    server = predictor.start(model_uri, workdir / "brainscan", extra_args=[
        "--max-batch-size", str(args.max_batch_size), "--max-latency-ms", str(args.max_latency_ms),
        "--max-queue", "4096"], timeout=600)
    return server, time.perf_counter() - started


def runtime_of(url: str) -> str | None:
    """The runtime the server says runs its model (metric brainscan_model_runtime_info)."""
    text = metrics_text(url)
    if text is None:
        return None
    match = re.search(r'^brainscan_model_runtime_info\{.*runtime="(\w+)".*\} 1\.0$', text, re.M)
    return match.group(1) if match else None


def start_mlserver(model_uri: str, workdir: Path, environment: Path, args) -> tuple[mlserver.MLServerProcess, float,
                                                                                     float]:
    """MLServer on the version's artifacts, downloaded from S3 as KServe's storage initializer does;
    (server, seconds download + start to ready, of which the download)."""
    model_dir = workdir / "mlserver-model"
    shutil.rmtree(model_dir, ignore_errors=True)
    started = time.perf_counter()
    source = registry.connect()[0].get_model_version_download_uri(MODEL_NAME, version_of(model_uri))
    storage.download_dir(source, model_dir)
    downloaded = time.perf_counter() - started
    server = mlserver.start(model_dir, workdir / "mlserver", environment, max_batch_size=args.max_batch_size,
                            max_batch_time_ms=args.max_latency_ms, timeout=600)
    return server, time.perf_counter() - started, downloaded


def mlserver_environment(model_uri: str, workdir: Path) -> Path:
    folder = workdir / "requirements"
    registry.download(model_uri, folder)
    model_dir = next(p.parent for p in folder.rglob("requirements.txt"))
    return mlserver.model_environment(model_dir, mlserver.mlserver_requirements(), log=log)


def wait_idle(seconds: float) -> None:
    time.sleep(seconds)  # let the previous point's stragglers finish


# --------------------------------------------------------------------------- report
def medians(points: list[Point]) -> list[dict]:
    rows = []
    keys = sorted({(p.system, p.concurrency) for p in points}, key=lambda k: (SYSTEMS.index(k[0]), k[1]))
    for system, concurrency in keys:
        group = [p for p in points if p.system == system and p.concurrency == concurrency]
        rows.append({"system": system, "concurrency": concurrency, "runs": len(group),
                     "images_per_s": float(np.median([p.images_per_s for p in group])),
                     "p50_ms": float(np.median([p.p50_ms for p in group])),
                     "p99_ms": float(np.median([p.p99_ms for p in group])),
                     "errors": int(sum(p.errors for p in group)),
                     "mean_batch": (float(np.median([p.mean_batch for p in group if p.mean_batch is not None]))
                                    if any(p.mean_batch is not None for p in group) else None),
                     "images_per_s_runs": [round(p.images_per_s, 1) for p in group]})
    return rows


def ratios_and_aims(rows: list[dict], soak: list[Point]) -> tuple[dict, dict]:
    by = {(r["system"], r["concurrency"]): r for r in rows}
    ratios, aims = {}, {}
    for c in CONCURRENCY:
        ml, limit = by.get(("mlserver", c)), by.get(("in-process", c))
        for system in ("brainscan-json", "brainscan-binary", "brainscan-grpc"):
            row = by.get((system, c))
            if row and ml and ml["images_per_s"] > 0:
                ratios[f"{system}/mlserver@{c}"] = round(row["images_per_s"] / ml["images_per_s"], 2)
            if row and limit:
                ratios[f"{system}/in-process@{c}"] = round(row["images_per_s"] / limit["images_per_s"], 2)
    # The aims of issue 10, judged on brainscan's JSON path (the same request MLServer gets).
    json_rows = {c: by.get(("brainscan-json", c)) for c in CONCURRENCY}
    ml_rows = {c: by.get(("mlserver", c)) for c in CONCURRENCY}
    if all(json_rows.values()) and all(ml_rows.values()):
        aims["json >= 1.5x MLServer images/s at concurrency 8 and 32"] = all(
            ratios[f"brainscan-json/mlserver@{c}"] >= 1.5 for c in (8, 32))
        aims["json >= 1.0x MLServer images/s at concurrency 1"] = ratios["brainscan-json/mlserver@1"] >= 1.0
        aims["json p99 <= MLServer p99 at every concurrency"] = all(
            json_rows[c]["p99_ms"] <= ml_rows[c]["p99_ms"] for c in CONCURRENCY)
    if "brainscan-json/in-process@32" in ratios:
        aims["json >= 0.9x in-process at concurrency 32"] = ratios["brainscan-json/in-process@32"] >= 0.9
    if soak:
        aims["no errors at concurrency 64 for the soak"] = all(p.errors == 0 for p in soak)
    return ratios, aims


def report(result: dict, out: Path) -> None:
    rows = result["medians"]
    print()
    print(f"median of {result['settings']['runs']} runs, {result['settings']['seconds']:.0f} s per point")
    print(f"{'system':<18}{'conc':>5}{'images/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}   runs (images/s)")
    for r in rows:
        print(f"{r['system']:<18}{r['concurrency']:>5}{r['images_per_s']:>10.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
              f"{r['errors']:>8}   {r['images_per_s_runs']}")
    for p in result["soak"]:
        print(f"soak {p['system']} concurrency {p['concurrency']} for {p['seconds']:.0f} s: {p['requests']} requests, "
              f"{p['images_per_s']:.1f} images/s, p99 {p['p99_ms']:.0f} ms, {p['errors']} errors")
    for name, seconds in result["cold_start_s"].items():
        print(f"cold start {name}: {seconds}")
    print()
    for key, value in result["ratios"].items():
        print(f"{key:<34}{value:6.2f}x")
    print("aims:")
    for key, met in result["aims"].items():
        print(f"  {'met    ' if met else 'NOT met'}  {key}")
    print(f"load average (1, 5, 15 min): before {result['load']['before']}, after {result['load']['after']}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    chart(rows, result, out / "serving.png")
    print(f"results: {out / 'serving.json'}, chart: {out / 'serving.png'}")


def chart(rows: list[dict], result: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    levels = [c for c in CONCURRENCY if any(r["concurrency"] == c for r in rows)]
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in rows)]
    width = 0.8 / max(len(systems), 1)
    for k, system in enumerate(systems):
        by_c = {r["concurrency"]: r for r in rows if r["system"] == system}
        x = np.arange(len(levels)) + (k - (len(systems) - 1) / 2) * width
        axes[0].bar(x, [by_c[c]["images_per_s"] if c in by_c else 0 for c in levels], width, label=system)
        axes[1].bar(x, [by_c[c]["p50_ms"] if c in by_c else 0 for c in levels], width, label=system)
        axes[2].bar(x, [by_c[c]["p99_ms"] if c in by_c else 0 for c in levels], width, label=system)
    titles = ("images/s (higher is better)", "p50 latency, ms (lower is better)", "p99 latency, ms (lower is better)")
    for ax, title in zip(axes, titles):
        ax.set_xticks(range(len(levels)), [f"conc. {c}" for c in levels])
        ax.set_title(title)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    load = result["load"]
    fig.suptitle(f"{result['settings']['model']}: median of {result['settings']['runs']} runs x "
                 f"{result['settings']['seconds']:.0f} s, {result['machine']['cpus']} CPUs, load average "
                 f"{load['before'][0]} -> {load['after'][0]} ({result['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=71)
    parser.add_argument("--seconds", type=float, default=10.0, help="Load time per measured point.")
    parser.add_argument("--runs", type=int, default=3, help="Each point this many times; the median is reported.")
    parser.add_argument("--soak-seconds", type=float, default=60.0, help="Concurrency 64 per brainscan protocol "
                                                                          "(0: none).")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-latency-ms", type=float, default=5.0)
    parser.add_argument("--workdir", type=Path, default=None, help="Keep the stack, logs and model here.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="brainscan-bench-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    log(f"work dir {workdir}; load average {load_before}")
    info = stack.up(workdir)
    os.environ.update(info.env())
    storage.reset_clients()
    brainscan_server = ml_server = None
    try:
        log(f"building and registering an untrained Xception at {args.image_size} px ...")
        model_uri = register_demo_sized_model(workdir, args.image_size)
        log(f"model: {model_uri} (artifacts in {info.s3_endpoint})")
        images = make_images()
        environment = None
        if "mlserver" in args.systems:
            log("MLServer's virtualenv (the model's requirements + MLServer's pins) ...")
            environment = mlserver_environment(model_uri, workdir)
        served = None
        if "in-process" in args.systems:
            served = ServedModel(load_bundle(model_uri))
            log(f"in-process model call: {served.runtime.description}")

        points: list[Point] = []
        cold: dict[str, list[float]] = {"brainscan": [], "mlserver": [], "mlserver_download": []}
        servers = [s for s in SERVER_SYSTEMS if s in args.systems]
        for run in range(args.runs):
            log(f"run {run + 1} of {args.runs}: cold starts ...")
            targets = {}
            if any(s.startswith("brainscan") for s in servers):
                brainscan_server, seconds = start_brainscan(model_uri, workdir, args)
                cold["brainscan"].append(round(seconds, 2))
                log(f"brainscan ready in {seconds:.1f} s on {runtime_of(brainscan_server.url)}")
                for system in servers:
                    if system.startswith("brainscan"):
                        port = brainscan_server.grpc_port if system.endswith("grpc") else brainscan_server.http_port
                        targets[system] = Target(system, port, images, brainscan_server.url)
            if "mlserver" in servers:
                ml_server, seconds, downloaded = start_mlserver(model_uri, workdir, environment, args)
                cold["mlserver"].append(round(seconds, 2))
                cold["mlserver_download"].append(round(downloaded, 2))
                log(f"MLServer ready in {seconds:.1f} s (download {downloaded:.1f} s)")
                targets["mlserver"] = Target("mlserver", ml_server.http_port, images)
            for target in targets.values():  # warm-up: every batch size the points will see
                target.run(max(args.concurrency), 3.0, run)
            order = [*targets, *(["in-process"] if served else [])]
            shift = run % len(order)
            order = order[shift:] + order[:shift]  # a different system first in each run
            for concurrency in args.concurrency:
                for system in order:
                    wait_idle(0.5)
                    if system == "in-process":
                        point = in_process(served, images, concurrency, args.seconds, run)
                    else:
                        point = targets[system].run(concurrency, args.seconds, run)
                    points.append(point)
                    extra = (f"  batch {point.mean_batch}  model busy {point.model_busy:.0%}"
                             if point.mean_batch is not None else "")
                    log(f"{system:<17} c={concurrency:<3} {point.images_per_s:7.1f} images/s  p50 {point.p50_ms:7.1f}"
                        f"  p99 {point.p99_ms:7.1f} ms  errors {point.errors}  load {load_average()[0]}{extra}")
            soak = []
            if run == args.runs - 1 and args.soak_seconds > 0:
                for system in [s for s in targets if s.startswith("brainscan")]:
                    wait_idle(0.5)
                    soak.append(targets[system].run(64, args.soak_seconds, run))
                    log(f"soak {system} c=64 {args.soak_seconds:.0f} s: {soak[-1].requests} requests, "
                        f"{soak[-1].errors} errors")
            if brainscan_server is not None:
                predictor.stop(workdir / "brainscan")
                brainscan_server = None
            if ml_server is not None:
                mlserver.stop(ml_server)
                ml_server = None

        rows = medians(points)
        ratios, aims = ratios_and_aims(rows, soak)
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "load": {"before": load_before, "after": load_average(),
                     "note": "os.getloadavg() (1, 5, 15 min) when the benchmark started and ended; the per-point "
                             "1-min load is in the log"},
            "settings": {"model": f"untrained Xception {args.image_size} px (demo architecture), {model_uri}",
                         "seconds": args.seconds, "runs": args.runs, "soak_seconds": args.soak_seconds,
                         "max_batch_size": args.max_batch_size, "max_latency_ms": args.max_latency_ms,
                         "request": "one 256x256 JPEG (about 10 kB) per request",
                         "in_process_runtime": served.runtime.description if served else None},
            "cold_start_s": {"brainscan (process start to ready, model from S3 via MLflow)": cold["brainscan"],
                             "mlserver (S3 download + process start to ready)": cold["mlserver"],
                             "mlserver S3 download alone": cold["mlserver_download"]},
            "medians": rows, "ratios": ratios, "aims": aims,
            "soak": [asdict(p) for p in soak], "points": [asdict(p) for p in points],
            "command": "bash scripts/dev.sh setup && .venv/bin/python benchmarks/serving.py " + " ".join(sys.argv[1:]),
        }
        report(result, args.out)
    finally:
        if brainscan_server is not None:
            predictor.stop(workdir / "brainscan")
        if ml_server is not None:
            mlserver.stop(ml_server)
        stack.down(workdir)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    # SIGTERM ends the run like Ctrl-C: the finally clause stops every process it started.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    main()
