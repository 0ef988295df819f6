"""The fingerprint steps: the dataset fingerprint of a source read in place, and the champion's.

The dataset fingerprint is the sha256 of the sorted `sha256,class7` lines of the images (the same
definition ingest uses, see docs/internals.md): it changes exactly when data or labels change. The
retrain pipeline compares the two and skips every step after them when they are equal; the retrain
watcher (pipelines/watcher.py) runs the same comparison on an interval.

A source is listed first and its images are read only when the listing changed (keys, sizes and
ETags on S3; paths, sizes and modification times in a folder), so an unchanged bucket costs one
LIST request, not a download of the dataset. When it changed, only the images whose listing entry
changed are read again (an S3 object with the same ETag and size is not), each hashed in pieces as
it streams in, never held whole in memory.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from contextlib import closing
from pathlib import Path
from typing import Callable

from brainscan import labels, registry, storage
from brainscan.config import MODEL_NAME
from brainscan.dataset import fingerprint_of
from components import ingest

CHUNK_BYTES = 1 << 20  # what one read of an image holds in memory while it is hashed

# source -> (listing signature, fingerprint) of the last time its images were read
_LAST_READ: dict[str, tuple[str, str]] = {}
# source -> {image path in the source: (its listing entry's version, sha256)} as of that read
_HASHED: dict[str, dict[str, tuple[str, str]]] = {}


def listing_signature(source: str) -> str | None:
    """sha256 of what a listing shows of a source (no image read): S3 keys, sizes and ETags; a folder's
    paths, sizes and modification times; a .zip's size and time. None where there is no such listing
    (kaggle:): the fingerprint is then always computed."""
    source = str(source)
    digest = hashlib.sha256()
    path = Path(source).expanduser()
    if storage.is_s3(source) or path.is_dir():
        base = source if storage.is_s3(source) else str(path)
        for uri, size, version in storage.list_versions(base):
            digest.update(f"{uri[len(base):]}\t{size}\t{version}\n".encode())
        return digest.hexdigest()
    if path.is_file():
        stat = path.stat()
        digest.update(f"{stat.st_size}\t{stat.st_mtime_ns}".encode())
        return digest.hexdigest()
    return None


def source_fingerprint(source: str, progress: Callable[[], object] | None = None) -> str:
    """Fingerprint of a source read in place (folder, .zip, s3:// prefix, kaggle:OWNER/DATASET).

    Uses ingest's own source reader and fingerprint function, so the value equals what ingest
    records for the same data (and thus the champion's tag) by construction. The images are read
    again only when the source's listing changed since this process last read them, and then only
    those whose own entry changed. `progress` is called after each image (the watcher's heartbeat:
    a long first read is not a stuck one).
    """
    signature = listing_signature(source)
    if signature is not None and _LAST_READ.get(str(source), (None, None))[0] == signature:
        return _LAST_READ[str(source)][1]
    fingerprint = _read_fingerprint(source, progress)
    if signature is not None:
        _LAST_READ[str(source)] = (signature, fingerprint)
    return fingerprint


def _sha256(item) -> str:
    digest = hashlib.sha256()
    with closing(item.stream()) as stream:
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _read_fingerprint(source: str, progress: Callable[[], object] | None = None) -> str:
    known = _HASHED.get(str(source), {})
    hashed: dict[str, tuple[str, str]] = {}
    scratch = Path(tempfile.mkdtemp(prefix="brainscan-fingerprint-"))
    try:
        items, _ignored = ingest.open_source(str(source), scratch, ingest.ZipLimits())
        rows = []
        for item in items:
            version, sha256 = known.get(item.rel, (None, None))
            if version != item.version:
                sha256 = _sha256(item)
            hashed[item.rel] = (item.version, sha256)
            rows.append({"sha256": sha256, "class7": labels.label_from_path(item.rel)[1]})
            if progress is not None:
                progress()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not rows:
        raise ValueError(f"no images under {source!r}")
    _HASHED[str(source)] = hashed  # only the images there now: the cache never outgrows the source
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
