"""One way to read and write artifacts, whether they live in S3 or on a local disk.

Every step takes URIs: ``s3://bucket/prefix`` on a cluster or the local stack, or a plain
path. Credentials and the endpoint come from the standard environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``), never from code.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Iterator

import boto3
from botocore.config import Config


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def parse_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ("bucket", "some/key")."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join URI or path parts with '/', whatever the base is."""
    out = str(base).rstrip("/")
    for part in parts:
        out = f"{out}/{str(part).strip('/')}"
    return out


@lru_cache(maxsize=8)
def _client(endpoint: str | None, max_pool: int):
    config = Config(
        s3={"addressing_style": "path"},  # SeaweedFS, MinIO and loopback endpoints need it
        retries={"max_attempts": 5, "mode": "standard"},
        max_pool_connections=max_pool,
        connect_timeout=5,
        read_timeout=60,
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint or None,
        region_name=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
        config=config,
    )


def s3_client(max_pool: int = 32):
    """A boto3 S3 client for the endpoint in the environment (cached per endpoint)."""
    return _client(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"), max_pool)


def reset_clients() -> None:
    """Forget cached clients (after the environment's endpoint or keys changed)."""
    _client.cache_clear()


def ensure_bucket(bucket: str) -> None:
    client = s3_client()
    try:
        client.head_bucket(Bucket=bucket)
    except client.exceptions.ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code not in ("404", "NoSuchBucket", "NotFound"):
            raise
        client.create_bucket(Bucket=bucket)


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        bucket, key = parse_s3(uri)
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return Path(uri).read_bytes()


def write_bytes(uri: str, data: bytes, content_type: str | None = None) -> str:
    if is_s3(uri):
        bucket, key = parse_s3(uri)
        ensure_bucket(bucket)
        extra = {"ContentType": content_type} if content_type else {}
        s3_client().put_object(Bucket=bucket, Key=key, Body=data, **extra)
    else:
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary_beside(path, data)
        tmp.replace(path)  # atomic: a reader never sees half a file
    return uri


def _temporary_beside(path: Path, data: bytes) -> Path:
    """`data` in a new file of its own beside `path` (two writers never share a temporary file)."""
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "wb") as out:
        out.write(data)
    return Path(name)


class ImmutableObjectError(ValueError):
    """A write-once object already holds other bytes: they are never replaced."""


def write_once(uri: str, data: bytes, content_type: str | None = None) -> bool:
    """Write an object that is never replaced: True when written, False when it already holds these very
    bytes; ImmutableObjectError when it holds others.

    The create is atomic, so of two writers racing on one name exactly one writes: a conditional PUT
    on S3 (`If-None-Match: *`, which AWS S3, SeaweedFS and MinIO honour), a hard link that fails if
    the name exists on a local disk.
    """
    if is_s3(uri):
        ensure_bucket(parse_s3(uri)[0])
        if create_once(uri, data, content_type):
            return True
        same = read_bytes(uri) == data
    else:
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary_beside(path, data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            same = path.read_bytes() == data
        finally:
            tmp.unlink()
    if not same:
        raise ImmutableObjectError(f"{uri} already holds other bytes; a write-once object is never replaced")
    return False


def create_once(uri: str, data: bytes, content_type: str | None = None, client=None, **extra) -> bool:
    """PUT an S3 object only if its key is free (If-None-Match: *): True when written, False when the key
    was taken (whatever it holds). The bucket must exist; `extra`: further put_object arguments."""
    bucket, key = parse_s3(uri)
    client = client or s3_client()
    if content_type:
        extra["ContentType"] = content_type
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*", **extra)
        return True
    except client.exceptions.ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
            return False
        raise


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str, content_type: str = "text/plain") -> str:
    return write_bytes(uri, text.encode("utf-8"), content_type)


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def json_bytes(obj: Any) -> bytes:
    """The JSON text write_json stores (sorted keys: the same object, the same bytes)."""
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")


def write_json(uri: str, obj: Any) -> str:
    return write_bytes(uri, json_bytes(obj), "application/json")


def exists(uri: str) -> bool:
    if is_s3(uri):
        bucket, key = parse_s3(uri)
        client = s3_client()
        try:
            client.head_object(Bucket=bucket, Key=key)
            return True
        except client.exceptions.ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
                return False
            raise
    return Path(uri).exists()


def list_files(prefix: str) -> Iterator[tuple[str, int]]:
    """(uri, size) of every file under a prefix or folder, sorted by URI."""
    for uri, size, _version in list_versions(prefix):
        yield uri, size


def list_versions(prefix: str) -> Iterator[tuple[str, int, str]]:
    """(uri, size, version) of every file under a prefix or folder, sorted by URI.

    The version is what a listing shows that changes when the bytes do, without reading them: the
    ETag of an S3 object, the modification time (ns) of a file.
    """
    if is_s3(prefix):
        bucket, key = parse_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        paginator = s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", []):
                yield f"s3://{bucket}/{obj['Key']}", obj["Size"], obj.get("ETag", "")
        return
    root = Path(prefix)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        yield str(path), stat.st_size, str(stat.st_mtime_ns)


def open_read(uri: str) -> BinaryIO:
    """A binary stream over an object or file, read as it arrives (close it when done)."""
    if is_s3(uri):
        bucket, key = parse_s3(uri)
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    return open(uri, "rb")


def upload_dir(local_dir: str | Path, uri: str) -> str:
    """Copy a local folder to a URI (S3 prefix or another folder)."""
    local_dir = Path(local_dir)
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        write_bytes(join(uri, path.relative_to(local_dir).as_posix()), path.read_bytes())
    return uri


def inside(folder: Path, relative: str) -> Path:
    """`folder / relative`, or ValueError when `relative` would leave the folder (an absolute name, a
    `..` part, a drive, a backslash path): an object's key never chooses where on disk it lands."""
    posix = PurePosixPath(relative)
    if (not relative or "\\" in relative or posix.is_absolute() or ".." in posix.parts
            or (len(relative) > 1 and relative[1] == ":")):
        raise ValueError(f"refusing {relative!r}: it would be written outside {folder}")
    target = folder / relative
    if not target.resolve().is_relative_to(folder.resolve()):  # a symlink inside the folder, say
        raise ValueError(f"refusing {relative!r}: it would be written outside {folder}")
    return target


def download_dir(uri: str, local_dir: str | Path) -> Path:
    """Copy every file under a URI into a local folder; returns the folder.

    Every key must stay inside the folder: one with a `..` part or an absolute name is refused
    (ValueError) before anything is written.
    """
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    if not is_s3(uri):
        shutil.copytree(uri, local_dir, dirs_exist_ok=True)
        return local_dir
    base = uri.rstrip("/") + "/"
    targets = [(file_uri, inside(local_dir, file_uri[len(base):])) for file_uri, _ in list_files(uri)]
    for file_uri, target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_bytes(file_uri))
    return local_dir


def open_text(uri: str) -> io.StringIO:
    """A text stream over a whole object (manifests are small enough to hold)."""
    return io.StringIO(read_text(uri))
