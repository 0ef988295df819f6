"""Run the model server as a background process on 127.0.0.1 (what `deploy --local` uses).

Part of the local stack (like brainscan.local.stack's SeaweedFS and MLflow): it starts the
`brainscan serve` command in its own process and only talks HTTP to it.

`start(model_uri, workdir)` runs `brainscan serve` detached, waits until the model is ready and
writes `{workdir}/serving/server.json`; starting again on a new model replaces the running
server (reload); `status(workdir)` reads the state back if the process still lives;
`stop(workdir)` ends it. The server's log is `{workdir}/serving/server.log`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from brainscan.config import MODEL_NAME
from brainscan.local.stack import free_ports, log_tail, process_alive

HOST = "127.0.0.1"


@dataclass
class LocalServer:
    pid: int
    model_uri: str
    http_port: int
    grpc_port: int
    log_file: str
    workdir: str
    started_at: float = field(default_factory=time.time)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    def summary(self) -> dict:
        return {**asdict(self), "url": self.url, "grpc_address": self.grpc_address}


def _state_dir(workdir) -> Path:
    return Path(workdir).resolve() / "serving"


def _state_file(workdir) -> Path:
    return _state_dir(workdir) / "server.json"


def ready(url: str, model: str = MODEL_NAME, timeout: float = 5.0) -> bool:
    """True when the server says the model is ready (v2 model-ready endpoint)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/v2/models/{model}/ready", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def status(workdir) -> LocalServer | None:
    """The running server of this work dir, or None."""
    path = _state_file(workdir)
    if not path.is_file():
        return None
    try:
        info = LocalServer(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None
    return info if process_alive(info.pid) else None


def start(model_uri: str, workdir, http_port: int | None = None, grpc_port: int | None = None,
          extra_args: list[str] | tuple = (), timeout: float = 180.0) -> LocalServer:
    """Start (or restart on model_uri) the local server; returns when the model is ready.

    Raises RuntimeError with the end of the server log when it does not come up.
    """
    running = status(workdir)
    if running is not None:
        # Reload = restart on the new model, on the same ports so clients keep their URL.
        http_port = http_port or running.http_port
        grpc_port = grpc_port or running.grpc_port
        stop(workdir)
    state = _state_dir(workdir)
    state.mkdir(parents=True, exist_ok=True)
    fresh = free_ports(2)
    http_port = http_port or fresh[0]
    grpc_port = grpc_port or fresh[1]
    log_file = state / "server.log"
    command = [sys.executable, "-m", "cli", "serve", "--model", str(model_uri), "--host", HOST,
               "--http-port", str(http_port), "--grpc-port", str(grpc_port), *map(str, extra_args)]
    with open(log_file, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, cwd=os.getcwd())
    info = LocalServer(pid=process.pid, model_uri=str(model_uri), http_port=http_port, grpc_port=grpc_port,
                       log_file=str(log_file), workdir=str(Path(workdir).resolve()))
    _state_file(workdir).write_text(json.dumps(asdict(info), indent=2) + "\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _state_file(workdir).unlink(missing_ok=True)
            raise RuntimeError(f"model server exited with code {process.returncode} while starting:\n"
                               + log_tail(log_file))
        if ready(info.url, timeout=2.0):
            return info
        time.sleep(0.5)
    stop(workdir)
    raise RuntimeError(f"model server not ready after {timeout:.0f}s:\n" + log_tail(log_file))


def stop(workdir, timeout: float = 20.0) -> bool:
    """Stop the work dir's server; True when one was running."""
    info = status(workdir)
    _state_file(workdir).unlink(missing_ok=True)
    if info is None:
        return False
    try:
        os.kill(info.pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process_alive(info.pid):
        time.sleep(0.2)
    if process_alive(info.pid):
        os.kill(info.pid, signal.SIGKILL)
        time.sleep(0.2)
        process_alive(info.pid)  # reap
    return True


def reload(model_uri: str, workdir, **kwargs) -> LocalServer:
    """Serve model_uri instead of the current model (same ports)."""
    return start(model_uri, workdir, **kwargs)
