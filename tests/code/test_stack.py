"""The local stack: real SeaweedFS on loopback, idempotent up, clean down, secrets kept out of output."""

from __future__ import annotations

import os
import subprocess
import sys

import boto3
import pytest
from botocore.config import Config

from brainscan.local import stack


def _client(info):
    env = info.env()
    return boto3.client(
        "s3", endpoint_url=info.s3_endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )


def test_up_is_idempotent_and_down_leaves_nothing(tmp_path):
    first = stack.up(tmp_path)
    try:
        assert first.s3_endpoint.startswith("http://127.0.0.1:")
        again = stack.up(tmp_path)
        assert again.pid == first.pid
        client = _client(first)
        client.create_bucket(Bucket="stack-test")
        client.put_object(Bucket="stack-test", Key="a b/c.txt", Body=b"hello")
        assert client.get_object(Bucket="stack-test", Key="a b/c.txt")["Body"].read() == b"hello"
        # Every listening socket of the stack is on loopback.
        out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
        mine = [line for line in out.splitlines() if f"pid={first.pid}," in line]
        assert mine, out
        assert all(" 127.0.0.1:" in line for line in mine), mine
    finally:
        assert stack.down(tmp_path) is True
    assert not stack.process_alive(first.pid)
    assert stack.status(tmp_path) is None
    assert stack.down(tmp_path) is False


def test_wrong_keys_are_refused(s3_stack):
    client = boto3.client(
        "s3", endpoint_url=s3_stack.s3_endpoint, aws_access_key_id="nobody", aws_secret_access_key="wrong",
        region_name="us-east-1", config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )
    with pytest.raises(client.exceptions.ClientError):
        client.list_buckets()


def test_cli_exports_work_with_eval_and_hide_the_secret(tmp_path):
    brainscan = [sys.executable, "-m", "cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    try:
        up = subprocess.run([*brainscan, "stack", "up", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=120)
        assert up.returncode == 0, up.stderr
        secret = (tmp_path / "stack" / "secret_access_key").read_text()
        assert secret not in up.stdout + up.stderr
        script = (
            f'eval "$({" ".join(brainscan)} stack up --workdir {tmp_path})" && '
            f'{sys.executable} -c "import boto3; print(boto3.client(\'s3\').list_buckets()[\'ResponseMetadata\'][\'HTTPStatusCode\'])"'
        )
        shell = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert shell.stdout.strip().endswith("200"), shell.stderr
        status = subprocess.run([*brainscan, "stack", "status", "--workdir", str(tmp_path)],
                                capture_output=True, text=True, env=env)
        assert status.returncode == 0 and "running" in status.stdout
    finally:
        subprocess.run([*brainscan, "stack", "down", "--workdir", str(tmp_path)], env=env, timeout=60)
    status = subprocess.run([*brainscan, "stack", "status", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, env=env)
    assert status.returncode == 3


def test_cli_down_also_stops_the_local_model_server(tmp_path, serving_bundle):
    """`stack down` leaves nothing of the work dir running: SeaweedFS and `deploy --local`'s server."""
    from typer.testing import CliRunner

    from cli import app
    from brainscan.local import predictor as local

    workdir = tmp_path / "work"
    stack.up(workdir)
    server = local.start(str(serving_bundle), workdir, timeout=300)
    try:
        result = CliRunner().invoke(app, ["stack", "down", "--workdir", str(workdir)])
        assert result.exit_code == 0, result.output
        assert "model server stopped" in result.output and "stopped" in result.output.splitlines()[-1]
        assert not stack.process_alive(server.pid) and local.status(workdir) is None
        assert stack.status(workdir) is None
    finally:
        local.stop(workdir)
        stack.down(workdir)


def test_key_files_are_private_from_their_first_byte(tmp_path, monkeypatch):
    """The S3 keys and the SeaweedFS identities file are created readable by their owner only: never
    written with the umask's mode and narrowed afterwards (another user could read them in between)."""
    import stat
    from pathlib import Path

    class Stop(Exception):
        pass

    def no_weed():  # stop `up` right after it wrote its secrets: no process is started
        raise Stop

    monkeypatch.setattr(stack, "_weed_binary", no_weed)
    before_chmod = []
    real_chmod = Path.chmod
    monkeypatch.setattr(Path, "chmod", lambda path, mode, **kw: before_chmod.append(
        (path.name, stat.S_IMODE(path.stat().st_mode))) or real_chmod(path, mode, **kw))
    old_umask = os.umask(0o022)  # the usual umask: new files are world-readable unless made otherwise
    try:
        with pytest.raises(Stop):
            stack.up(tmp_path)
    finally:
        os.umask(old_umask)
    secrets = ("access_key_id", "secret_access_key", "s3.json")
    folder = tmp_path / "stack"
    assert {name: stat.S_IMODE((folder / name).stat().st_mode) for name in secrets} == dict.fromkeys(secrets, 0o600)
    assert [(name, oct(mode)) for name, mode in before_chmod if name in secrets and mode & 0o077] == []
    assert sorted(p.name for p in folder.iterdir()) == ["access_key_id", "data", "s3.json", "secret_access_key"]
