"""The registered model outside brainscan: its own virtualenv, and MLServer on loopback.

What a KServe user gets for `modelFormat: mlflow` is MLServer with `mlserver-mlflow` running
the MLflow model in an environment built from the model's own requirements. This module
builds such environments (`model_environment`: the model's requirements.txt only, or plus
MLServer) with uv, cached by their requirements, and runs MLServer on a model folder with
adaptive batching (`start` / `stop`), bound to 127.0.0.1. Tests use it to check the model
where brainscan is not installed; the serving benchmark runs MLServer beside brainscan.

MLServer's own pins live beside this module (mlserver-requirements.txt, package data: it works
installed as well as from a checkout), shared with the runtime image (infra/docker/mlserver.Dockerfile).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from brainscan.config import MODEL_NAME
from brainscan.local.predictor import ready
from brainscan.local.stack import free_ports, log_tail, process_alive, tool

MLSERVER_PINS = Path(__file__).resolve().with_name("mlserver-requirements.txt")
HOST = "127.0.0.1"


def mlserver_requirements() -> tuple[str, ...]:
    """MLServer and its MLflow runtime, as pinned for the runtime image."""
    if not MLSERVER_PINS.is_file():
        raise RuntimeError(f"{MLSERVER_PINS} not found: brainscan was installed without its package data")
    return _requirement_lines(MLSERVER_PINS)


def _requirement_lines(path: Path) -> tuple[str, ...]:
    return tuple(line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))


def environments_dir() -> Path:
    return Path(os.environ.get("BRAINSCAN_CACHE") or Path.home() / ".cache" / "brainscan") / "venvs"


def _uv() -> str:
    return tool("uv", "`pip install uv` (scripts/dev.sh installs it)")


def model_environment(model_dir: str | Path, extra: tuple[str, ...] = (), log=print) -> Path:
    """A virtualenv with the model's requirements.txt (and `extra`); returns its folder.

    Built once per distinct set of requirements (uv, bytecode compiled) and reused after.
    """
    requirements = [*_requirement_lines(Path(model_dir) / "requirements.txt"), *extra]
    key = hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:16]
    folder = environments_dir() / f"model-{key}"
    if (folder / ".complete").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    log(f"building a virtualenv for the model ({len(requirements)} requirements) in {folder} ...")
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run([_uv(), "venv", "--quiet", "--python", python, str(folder)], check=True)
    subprocess.run([_uv(), "pip", "install", "--quiet", "--compile-bytecode", "--python", str(folder / "bin" / "python"),
                    *requirements], check=True)
    (folder / ".complete").write_text("\n".join(requirements) + "\n")
    return folder


@dataclass
class MLServerProcess:
    pid: int
    http_port: int
    grpc_port: int
    folder: Path
    log_file: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"


def start(model_dir: str | Path, folder: str | Path, environment: Path, max_batch_size: int = 32,
          max_batch_time_ms: float = 5.0, timeout: float = 300.0) -> MLServerProcess:
    """MLServer serving the MLflow model in `model_dir` as `brain-tumor` (v2 REST and gRPC on loopback)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    http_port, grpc_port, metrics_port = free_ports(3)
    (folder / "settings.json").write_text(json.dumps({
        "host": HOST, "http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port,
        "parallel_workers": 1}))
    (folder / "model-settings.json").write_text(json.dumps({
        "name": MODEL_NAME, "implementation": "mlserver_mlflow.MLflowRuntime",
        # adaptive batching: requests arriving together are predicted together
        "max_batch_size": max_batch_size, "max_batch_time": max_batch_time_ms / 1000.0,
        "parameters": {"uri": str(Path(model_dir).resolve())}}))
    log_file = folder / "mlserver.log"
    with open(log_file, "ab") as log:
        process = subprocess.Popen([str(environment / "bin" / "mlserver"), "start", str(folder)], stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    server = MLServerProcess(process.pid, http_port, grpc_port, folder, log_file)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"MLServer exited with code {process.returncode}:\n" + log_tail(log_file))
        if ready(server.url, timeout=2.0):
            return server
        time.sleep(0.5)
    stop(server)
    raise RuntimeError(f"MLServer not ready after {timeout:.0f}s:\n" + log_tail(log_file))


def stop(server: MLServerProcess, timeout: float = 20.0) -> None:
    """Stop MLServer and its inference workers (its process group)."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process_alive(server.pid):
        time.sleep(0.2)
    try:  # what did not stop in time, and workers of the group that outlived their parent
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process_alive(server.pid)  # reap
