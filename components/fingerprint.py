"""The fingerprint steps: the dataset fingerprint of a source read in place, and the champion's.

The dataset fingerprint is the sha256 of the sorted `sha256,class7` lines of the images (the same
definition ingest uses, see docs/internals.md): it changes exactly when data or labels change. The
retrain pipeline compares the two and skips every step after them when they are equal; the retrain
watcher (pipelines/watcher.py) runs the same comparison on an interval.

A source is listed first and its images are read only when the listing changed (keys, sizes and
ETags on S3; paths, sizes and modification times in a folder), so an unchanged bucket costs one
LIST request, not a download of the dataset.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from brainscan import labels, registry, storage
from brainscan.config import MODEL_NAME
from brainscan.dataset import fingerprint_of
from components import ingest


# source -> (listing signature, fingerprint) of the last time its images were read
_LAST_READ: dict[str, tuple[str, str]] = {}


def listing_signature(source: str) -> str | None:
    """sha256 of what a listing shows of a source (no image read): S3 keys, sizes and ETags; a folder's
    paths, sizes and modification times; a .zip's size and time. None where there is no such listing
    (kaggle:): the fingerprint is then always computed."""
    source = str(source)
    digest = hashlib.sha256()
    if storage.is_s3(source):
        bucket, key = storage.parse_s3(source)
        prefix = key.rstrip("/") + "/" if key else ""
        for page in storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                digest.update(f"{obj['Key']}\t{obj['Size']}\t{obj.get('ETag', '')}\n".encode())
        return digest.hexdigest()
    path = Path(source).expanduser()
    if path.is_dir():
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = item.stat()
            digest.update(f"{item.relative_to(path).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()
    if path.is_file():
        stat = path.stat()
        digest.update(f"{stat.st_size}\t{stat.st_mtime_ns}".encode())
        return digest.hexdigest()
    return None


def source_fingerprint(source: str) -> str:
    """Fingerprint of a source read in place (folder, .zip, s3:// prefix, kaggle:OWNER/DATASET).

    Uses ingest's own source reader and fingerprint function, so the value equals what ingest
    records for the same data (and thus the champion's tag) by construction. The images are read
    again only when the source's listing changed since this process last read them.
    """
    signature = listing_signature(source)
    if signature is not None and _LAST_READ.get(str(source), (None, None))[0] == signature:
        return _LAST_READ[str(source)][1]
    fingerprint = _read_fingerprint(source)
    if signature is not None:
        _LAST_READ[str(source)] = (signature, fingerprint)
    return fingerprint


def _read_fingerprint(source: str) -> str:
    scratch = Path(tempfile.mkdtemp(prefix="brainscan-fingerprint-"))
    try:
        items, _ignored = ingest.open_source(str(source), scratch, ingest.ZipLimits())
        rows = []
        for item in items:
            rows.append({"sha256": hashlib.sha256(item.read()).hexdigest(),
                         "class7": labels.label_from_path(item.rel)[1]})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not rows:
        raise ValueError(f"no images under {source!r}")
    return fingerprint_of(rows)


def champion_fingerprint(model_name: str = MODEL_NAME, tracking_uri: str | None = None
                         ) -> tuple[str | None, str | None]:
    """(fingerprint tag, version) of the champion, or (None, None) when there is none yet.

    Read through the registry's champion lookup: the tag register writes is the tag compared here.
    """
    info = registry.champion_info(model_name, tracking_uri=tracking_uri)
    if info is None:
        return None, None
    return info["dataset_fingerprint"] or None, str(info["version"])
