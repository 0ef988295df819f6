"""Serving benchmark: images/second and p50/p99 latency at concurrency 1, 8, 32 for
(1) the brainscan KServe model server, (2) `mlflow models serve` on the same registered model,
(3) the model's own batched preprocess + predict in process (the limit). One run, side by side.

    .venv/bin/python benchmarks/serving.py [--image-size 71] [--seconds 8] [--out benchmarks/results]

By default it builds an untrained Xception (the production architecture) at a small image size,
registers it in a throw-away MLflow (sqlite) through `brainscan.components.register` (so both
servers load the very same `models:/brain-tumor/1`), and sends one 256x256 JPEG per request.
`--model-uri models:/...` with `MLFLOW_TRACKING_URI` set benchmarks an existing model instead.
Everything binds 127.0.0.1 and is stopped at the end. Writes results.json and a PNG chart.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONCURRENCY = (1, 8, 32)


@dataclass
class Point:
    system: str
    concurrency: int
    images: int
    seconds: float
    images_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_images(count: int = 16, side: int = 256) -> list[bytes]:
    from tests.fixtures.serving import encode

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side] / side - 0.5
    images = []
    for _ in range(count):
        picture = np.exp(-((xx / 0.35) ** 2 + (yy / 0.42) ** 2) * 3) * 200 + rng.normal(0, 10, (side, side))
        images.append(encode(np.clip(picture, 0, 255).astype(np.uint8), "JPEG"))
    return images


# --------------------------------------------------------------------------- load generator
def drive(system: str, send, concurrency: int, seconds: float, images: list[bytes]) -> Point:
    """`concurrency` threads, each sending one image per request back to back for `seconds`."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker(index: int) -> None:
        connection = None
        i = index
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                connection = send(connection, images[i % len(images)])
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
            except Exception as err:  # noqa: BLE001 - counted and shown once
                with lock:
                    errors[0] += 1
                    if errors[0] == 1:
                        log(f"{system}: first error: {err}")
                connection = None
            i += concurrency

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return Point(system, concurrency, len(latencies), wall, len(latencies) / wall,
                 float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), errors[0])


def _post(connection, port: int, path: str, body: bytes):
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
    return connection


def brainscan_sender(port: int):
    def send(connection, image: bytes):
        body = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                       "data": [base64.b64encode(image).decode()]}]}).encode()
        return _post(connection, port, "/v2/models/brain-tumor/infer", body)
    return send


def mlflow_sender(port: int):
    def send(connection, image: bytes):
        body = json.dumps({"dataframe_split": {"columns": ["image"],
                                               "data": [[base64.b64encode(image).decode()]]}}).encode()
        return _post(connection, port, "/invocations", body)
    return send


def in_process(model_uri: str, images: list[bytes], seconds: float) -> list[Point]:
    """The limit: decode + preprocess + one batched model call per `concurrency` images."""
    from brainscan.modelstore import load_bundle, predict_probabilities
    from brainscan.preprocessing import preprocess_batch

    bundle = load_bundle(model_uri)
    points = []
    for concurrency in CONCURRENCY:
        batch = [images[i % len(images)] for i in range(concurrency)]
        predict_probabilities(bundle, preprocess_batch(batch, bundle.image_size, **bundle.preprocessing), batch_size=concurrency)  # warm
        latencies, started = [], time.perf_counter()
        while time.perf_counter() - started < seconds:
            t0 = time.perf_counter()
            predict_probabilities(bundle, preprocess_batch(batch, bundle.image_size, **bundle.preprocessing), batch_size=concurrency)
            latencies.append(time.perf_counter() - t0)
        wall = time.perf_counter() - started
        ms = np.array(latencies) * 1000
        points.append(Point("in-process", concurrency, len(latencies) * concurrency, wall,
                            len(latencies) * concurrency / wall, float(np.percentile(ms, 50)),
                            float(np.percentile(ms, 99)), 0))
        log(f"in-process batch {concurrency}: {points[-1].images_per_s:.1f} images/s")
    return points


# --------------------------------------------------------------------------- set-up
def register_small_model(workdir: Path, image_size: int) -> str:
    from brainscan.components.register import register
    from brainscan.components.train import build_model
    from brainscan.modelstore import save_bundle

    model, _ = build_model(image_size, base_weights="none")
    bundle = workdir / "bundle"
    save_bundle(model, str(bundle), image_size, {"trained_by": "benchmarks/serving.py (untrained, for speed only)"})
    evaluation = {"gate": {"passed": True, "reason": "benchmark stand-in: untrained model, never deploy"},
                  "threshold": 0.5, "target_recall": 0.99, "test": {"recall": 0.0, "roc_auc": 0.5}}
    result = register(str(bundle), evaluation, tracking_uri=os.environ["MLFLOW_TRACKING_URI"], workdir=workdir)
    if not result.registered:
        raise SystemExit(f"could not register the benchmark model: {result.reason}")
    return result.model_uri


def wait_http(url: str, process: subprocess.Popen, timeout: float, name: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{name} exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"{name} not ready after {timeout:.0f}s")


def start_mlflow_serve(model_uri: str, port: int, log_file: Path) -> subprocess.Popen:
    mlflow = Path(sys.executable).parent / "mlflow"
    # mlflow runs `uvicorn` by name: the venv's bin must be on PATH even when not activated.
    env = {**os.environ, "PATH": f"{mlflow.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log_file, "ab") as out:
        process = subprocess.Popen([str(mlflow), "models", "serve", "-m", model_uri, "--env-manager", "local",
                                    "-h", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=env)
    return process


def stop_process_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


# --------------------------------------------------------------------------- report
def report(points: list[Point], out: Path) -> None:
    by = {(p.system, p.concurrency): p for p in points}
    print()
    print(f"{'system':<12}{'conc':>5}{'images/s':>11}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for p in points:
        print(f"{p.system:<12}{p.concurrency:>5}{p.images_per_s:>11.1f}{p.p50_ms:>10.1f}{p.p99_ms:>10.1f}"
              f"{p.errors:>8}")
    print()
    ratios = {}
    for c in CONCURRENCY:
        server, limit, mlflow = by.get(("brainscan", c)), by.get(("in-process", c)), by.get(("mlflow", c))
        if server and limit:
            ratios[f"brainscan/in-process@{c}"] = server.images_per_s / limit.images_per_s
        if server and mlflow and mlflow.images_per_s > 0:
            ratios[f"brainscan/mlflow@{c}"] = server.images_per_s / mlflow.images_per_s
    for key, value in ratios.items():
        print(f"{key:<28}{value:6.2f}x")
    aim = {"brainscan/in-process@32 >= 0.8": ratios.get("brainscan/in-process@32", 0) >= 0.8,
           "brainscan/mlflow@32 >= 3": ratios.get("brainscan/mlflow@32", 0) >= 3}
    print("aims:", ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in aim.items()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps({"points": [asdict(p) for p in points], "ratios": ratios,
                                                  "aims": aim}, indent=2) + "\n")
    _chart(points, out / "serving.png")
    print(f"results: {out / 'serving.json'}, chart: {out / 'serving.png'}")


def _chart(points: list[Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = ["in-process", "brainscan", "mlflow"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.27
    for k, system in enumerate(systems):
        rows = [p for p in points if p.system == system]
        if not rows:
            continue
        x = np.arange(len(rows)) + (k - 1) * width
        ax1.bar(x, [p.images_per_s for p in rows], width, label=system)
        ax2.bar(x, [p.p99_ms for p in rows], width, label=system)
    for ax, title in ((ax1, "throughput (images/s, higher is better)"), (ax2, "p99 latency (ms, lower is better)")):
        ax.set_xticks(range(len(CONCURRENCY)), [f"concurrency {c}" for c in CONCURRENCY])
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=71)
    parser.add_argument("--seconds", type=float, default=8.0, help="Load time per measured point.")
    parser.add_argument("--model-uri", default=None, help="An existing models:/ URI (needs MLFLOW_TRACKING_URI).")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-latency-ms", type=float, default=5.0)
    parser.add_argument("--skip-mlflow", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    from brainscan.serving import local

    with tempfile.TemporaryDirectory(prefix="brainscan-bench-") as tmp:
        workdir = Path(tmp)
        if args.model_uri is None:
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
            log(f"building and registering an untrained Xception at {args.image_size}px ...")
            model_uri = register_small_model(workdir, args.image_size)
        else:
            model_uri = args.model_uri
        log(f"model: {model_uri}")
        images = make_images()
        points = in_process(model_uri, images, args.seconds)

        log("starting the brainscan server ...")
        server = local.start(model_uri, workdir / "brainscan", extra_args=[
            "--max-batch-size", str(args.max_batch_size), "--max-latency-ms", str(args.max_latency_ms), "--no-grpc"],
            timeout=300)
        try:
            send = brainscan_sender(server.http_port)
            drive("brainscan", send, 4, 2.0, images)  # warm-up
            for c in CONCURRENCY:
                points.append(drive("brainscan", send, c, args.seconds, images))
                log(f"brainscan concurrency {c}: {points[-1].images_per_s:.1f} images/s")
        finally:
            local.stop(workdir / "brainscan")

        if not args.skip_mlflow:
            port = free_port()
            log("starting mlflow models serve ...")
            process = start_mlflow_serve(model_uri, port, workdir / "mlflow-serve.log")
            try:
                wait_http(f"http://127.0.0.1:{port}/ping", process, 300, "mlflow models serve")
                send = mlflow_sender(port)
                drive("mlflow", send, 4, 2.0, images)  # warm-up
                for c in CONCURRENCY:
                    points.append(drive("mlflow", send, c, args.seconds, images))
                    log(f"mlflow concurrency {c}: {points[-1].images_per_s:.1f} images/s")
            except SystemExit:
                print((workdir / "mlflow-serve.log").read_text()[-3000:])
                raise
            finally:
                stop_process_group(process)
        report(points, args.out)


if __name__ == "__main__":
    main()
