"""Ingest: raw images from a Kaggle archive, a zip, a folder or S3 into the dataset store, with a manifest.

`ingest(source, dest)` copies every image of the archive layout to ``{dest}/images/<path in the
archive>`` (each object carries its sha256 in its metadata), then writes ``{dest}/ingest.json``
and, last, ``{dest}/manifest.csv``. `ingest_version(source, datasets)` does the same into an
immutable data version, ``{datasets}/<fingerprint>/`` (brainscan.layout): what the pipeline runs.

- Labels come from the path (`brainscan.labels.label_from_path`); a file that does not fit the
  layout stops the run before anything is uploaded, with the list of such files.
- Files larger than brainscan.limits.MAX_IMAGE_BYTES and symbolic links in a folder source are
  refused before they are read and listed, with the reason, in the result's `rejected`; the
  other files are ingested.
- Idempotent and resumable: an object already stored with the same sha256 is skipped, so a
  rerun uploads nothing and a rerun after a crash or an S3 outage uploads only what is missing.
  The manifest is written last, only after every file is stored: a failed run never leaves a
  manifest that lists objects which are not there.
- A data version is write-once: its name is its fingerprint, computed from a first read of the
  source, and no object under it is ever replaced, so a model's lineage (the split it names, under
  the version) stays readable whatever runs later or at the same time.
- Each file is read, hashed, decoded (PIL) and uploaded by one worker of a thread pool: hashing
  and decoding release the GIL, so they overlap with the uploads of the other workers.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import mimetypes
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable

import requests
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from PIL import Image
from tqdm import tqdm

from brainscan import layout, storage
from brainscan.config import DEFAULT_SOURCE, IO_WORKERS
from brainscan.dataset import MANIFEST_COLUMNS, fingerprint_of
from brainscan.labels import IMAGE_SUFFIXES, CLASSES, UnknownLabelError, is_tumor, label_from_path
from brainscan.limits import MAX_IMAGE_BYTES
from brainscan.redact import redact

log = logging.getLogger(__name__)

MULTIPART_THRESHOLD = 16 * 1024 * 1024  # scans are small; only big files go multipart


class IngestError(RuntimeError):
    """A run that cannot complete; the message says why and what to do. Nothing stored is lost."""


class UnknownLabelsError(IngestError):
    """Files whose folder or file name does not fit the archive layout (never guessed)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} file(s) with an unknown folder or file name; nothing was uploaded:\n"
                         f"  {shown}{more}")


class UploadError(IngestError):
    """Some files were not stored (S3 down, access denied...); a rerun uploads only those."""

    def __init__(self, reason: str, not_uploaded: list[str], stored: int, total: int):
        self.not_uploaded = not_uploaded
        self.stored = stored
        shown = ", ".join(not_uploaded[:10]) + (f", ... ({len(not_uploaded) - 10} more)" if len(not_uploaded) > 10 else "")
        super().__init__(f"{len(not_uploaded)} of {total} files were not uploaded ({reason}); {stored} are stored "
                         f"and kept, no manifest was written; rerun the same command to finish. Not uploaded: {shown}")


@dataclass(frozen=True)
class ZipLimits:
    """Guards against decompression bombs: a real scan archive is far below all of these."""

    max_entries: int = 200_000
    max_total_bytes: int = 20 * 1024**3  # uncompressed, all entries together
    max_ratio: float = 100.0  # uncompressed / compressed, per entry and overall (images barely compress)


@dataclass
class IngestResult:
    source: str
    dest: str
    files: int
    bytes: int
    uploaded: int
    skipped: int
    manifest_uri: str
    summary_uri: str
    fingerprint: str
    class_counts: dict[str, int]
    undecodable: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # {"path", "reason"}: too big, a symbolic link
    reused: bool = False  # the data version was complete already: nothing was read or written
    seconds: float = 0.0

    def summary(self) -> dict:
        return asdict(self)

    def version_record(self) -> dict:
        """What a data version's ingest.json holds: its content only, the same for every run that writes
        it (no source, counts of this run or timings), so a second writer finds the very same bytes."""
        return {"dest": self.dest, "manifest_uri": self.manifest_uri, "fingerprint": self.fingerprint,
                "files": self.files, "bytes": self.bytes, "class_counts": self.class_counts,
                "undecodable": self.undecodable}


@dataclass
class _Item:
    """One image of the source: its path inside the archive, how to read its bytes, and what the
    listing showed of them.

    `stream` opens them for reading in pieces and `version` is the listing's word for them (S3 ETag
    and size; a file's size and modification time): the fingerprint step hashes an image without
    holding it and skips one whose version it has hashed before. `size` lets ingest refuse a file
    over the cap before reading it.
    """

    rel: str
    read: Callable[[], bytes]
    stream: Callable[[], BinaryIO]
    version: str
    size: int | None = None
    modality: str = ""
    class7: str = ""


@dataclass
class SourceFiles:
    """What a source holds: the images to ingest, the non-image names passed over, and the files
    refused with their reason (larger than MAX_IMAGE_BYTES, a symbolic link)."""

    items: list[_Item]
    ignored: list[str]
    rejected: list[dict]


# --------------------------------------------------------------------------- sources

def _kaggle_credentials_present() -> bool:
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle")
    return (config_dir / "kaggle.json").is_file()


def _is_network_error(err: BaseException) -> bool:
    seen = err
    while seen is not None:
        if isinstance(seen, (requests.ConnectionError, requests.Timeout, socket.gaierror, ConnectionError,
                             TimeoutError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def download_kaggle(handle: str) -> Path:
    """Download (or reuse kagglehub's cache of) a Kaggle dataset; returns its local folder.

    Credentials are read by kagglehub from KAGGLE_USERNAME/KAGGLE_KEY or ~/.kaggle/kaggle.json, never
    from arguments. Without network or credentials: one line that says which.
    """
    import kagglehub  # only for kaggle: sources; it reads credentials and config at import

    try:
        return Path(kagglehub.dataset_download(handle))
    except Exception as err:  # kagglehub raises requests/HTTP/its own errors
        no_credentials = not _kaggle_credentials_present()
        creds_hint = "no Kaggle credentials (set KAGGLE_USERNAME and KAGGLE_KEY, or write ~/.kaggle/kaggle.json)"
        if _is_network_error(err):
            reason = "no network: Kaggle is unreachable" + (f"; also {creds_hint}" if no_credentials else "")
        elif no_credentials:
            reason = creds_hint
        else:
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise IngestError(f"cannot download kaggle:{handle}: {reason}") from err


def _bad_zip_name(name: str) -> bool:
    posix = name.replace("\\", "/")
    return (posix.startswith("/") or (len(posix) > 1 and posix[1] == ":")
            or ".." in PurePosixPath(posix).parts)


def extract_zip(archive: Path, out_dir: Path, limits: ZipLimits = ZipLimits()) -> Path:
    """Extract a zip safely into out_dir: refuses `../` and absolute names and decompression bombs.

    Every check runs before the first byte is written; the sizes the headers declare are also
    enforced while reading, because a crafted header can lie.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as err:
        raise IngestError(f"{archive}: not a readable zip archive ({err})") from err
    with zf:
        entries = [info for info in zf.infolist() if not info.is_dir()]
        unsafe = [info.filename for info in zf.infolist() if _bad_zip_name(info.filename)]
        if unsafe:
            raise IngestError(f"{archive}: refusing a zip with entries outside the archive folder "
                              f"('../' or absolute names): {', '.join(unsafe[:10])}")
        if len(entries) > limits.max_entries:
            raise IngestError(f"{archive}: {len(entries)} entries, more than the limit of {limits.max_entries} "
                              "(decompression bomb?)")
        total = sum(info.file_size for info in entries)
        packed = sum(info.compress_size for info in entries)
        if total > limits.max_total_bytes:
            raise IngestError(f"{archive}: {total} bytes uncompressed, more than the limit of "
                              f"{limits.max_total_bytes} (decompression bomb?)")
        for info in entries:
            if info.file_size > limits.max_ratio * max(info.compress_size, 1) and info.file_size > 1024 * 1024:
                raise IngestError(f"{archive}: entry {info.filename!r} expands {info.file_size / max(info.compress_size, 1):.0f}x, "
                                  f"more than the limit of {limits.max_ratio:.0f}x (decompression bomb?)")
        if total > limits.max_ratio * max(packed, 1) and total > 1024 * 1024:
            raise IngestError(f"{archive}: expands {total / max(packed, 1):.0f}x overall, more than the limit of "
                              f"{limits.max_ratio:.0f}x (decompression bomb?)")
        out_dir.mkdir(parents=True, exist_ok=True)
        for info in entries:
            target = out_dir / info.filename.replace("\\", "/")
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            try:
                with zf.open(info) as src, open(target, "wb") as dst:
                    while chunk := src.read(1024 * 1024):
                        written += len(chunk)
                        if written > info.file_size:  # the header lied about the size
                            raise IngestError(f"{archive}: entry {info.filename!r} is larger than its header says "
                                              "(decompression bomb?)")
                        dst.write(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError) as err:  # zipfile stops at the declared size: CRC fails
                raise IngestError(f"{archive}: entry {info.filename!r} is corrupt ({err})") from err
    return out_dir


def _skip_name(rel: str) -> bool:
    """Files that are not images of the archive: notes, label lists, OS litter."""
    parts = PurePosixPath(rel).parts
    return any(part.startswith(".") or part == "__MACOSX" for part in parts) or \
        PurePosixPath(rel).suffix.lower() not in IMAGE_SUFFIXES


def _sorted_files(files: SourceFiles, max_bytes: int) -> SourceFiles:
    """Sorted by path, with the files over the size cap moved to `rejected` (before any is read)."""
    kept = []
    for item in sorted(files.items, key=lambda item: item.rel):
        if item.size is not None and item.size > max_bytes:
            files.rejected.append({"path": item.rel, "reason": f"{item.size} bytes, more than the limit of "
                                                               f"{max_bytes} for one image"})
        else:
            kept.append(item)
    files.rejected.sort(key=lambda entry: entry["path"])
    return SourceFiles(kept, sorted(files.ignored), files.rejected)


def _folder_items(root: Path) -> SourceFiles:
    """The files under a folder, symbolic links neither followed nor read: one could lead anywhere on
    the machine (/etc/passwd, a mounted secret), so each is refused and reported instead."""
    files = SourceFiles([], [], [])
    for folder, dirs, names in os.walk(root, followlinks=False):
        here = Path(folder)
        for name in sorted(dirs + names):
            path = here / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                files.rejected.append({"path": rel, "reason": "a symbolic link (not followed)"})
            elif name in names and path.is_file():
                if _skip_name(rel):
                    files.ignored.append(rel)
                else:
                    stat = path.stat()
                    files.items.append(_Item(rel, path.read_bytes, lambda path=path: path.open("rb"),
                                             f"{stat.st_size}:{stat.st_mtime_ns}", size=stat.st_size))
    return files


def _s3_items(prefix: str) -> SourceFiles:
    base = prefix.rstrip("/") + "/"
    files = SourceFiles([], [], [])
    for uri, size, etag in storage.list_versions(prefix):
        rel = uri[len(base):]
        if _skip_name(rel):
            files.ignored.append(rel)
        else:
            files.items.append(_Item(rel, lambda uri=uri: storage.read_bytes(uri), lambda uri=uri: storage.open_read(uri),
                                     f"{size}:{etag}", size=size))
    return files


def list_source(source: str, scratch: Path, zip_limits: ZipLimits, max_bytes: int = MAX_IMAGE_BYTES) -> SourceFiles:
    """The files of a source read in place, sorted: images to ingest, ignored names, refused files.

    A zip unpacks under `scratch`. Files over `max_bytes` and symbolic links are refused, not read.
    """
    if source.startswith("kaggle:"):
        files = _folder_items(download_kaggle(source[len("kaggle:"):].strip("/")))
    elif storage.is_s3(source):
        files = _s3_items(source)
    else:
        path = Path(source).expanduser()
        if path.is_file() and path.suffix.lower() == ".zip":
            files = _folder_items(extract_zip(path, scratch / "unzipped", zip_limits))
        elif path.is_dir():
            files = _folder_items(path)
        else:
            raise IngestError(f"source {source!r} is not a folder, a .zip file, an s3:// prefix or "
                              "kaggle:OWNER/DATASET" + (" (it does not exist)" if not path.exists() else ""))
    return _sorted_files(files, max_bytes)


def open_source(source: str, scratch: Path, zip_limits: ZipLimits) -> tuple[list[_Item], list[str]]:
    """The images of a source read in place (ingest's own reader; retrain fingerprints with it too).

    Returns (items with `.rel` and `.read()`, ignored non-image names); the files list_source refuses
    are in neither, so a fingerprint covers exactly what ingest stores.
    """
    files = list_source(source, scratch, zip_limits)
    return files.items, files.ignored


# --------------------------------------------------------------------------- per-file work

def describe_image(data: bytes) -> dict:
    """width, height, mode, format and decodable, from a full decode (the format is the real one)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return {"width": image.width, "height": image.height, "mode": image.mode, "format": image.format,
                    "decodable": True}
    except Exception:  # any failure to decode means the file is unusable; it is recorded, not dropped
        return {"width": "", "height": "", "mode": "", "format": "", "decodable": False}


class _Store:
    """Where the image objects go: an S3 prefix (boto3; multipart via TransferConfig for big files) or a folder."""

    def __init__(self, images_uri: str, workers: int):
        self.images_uri = images_uri
        self.existing: dict[str, int] = {}
        if storage.is_s3(images_uri):
            self.bucket, key = storage.parse_s3(images_uri)
            self.key_prefix = key.rstrip("/") + "/" if key else ""
            self.client = storage.s3_client(max_pool=max(32, workers * 2))
            for uri, size in storage.list_files(images_uri):  # one listing saves a HEAD per new file
                self.existing[uri] = size
        self.local = not storage.is_s3(images_uri)

    def uri(self, rel: str) -> str:
        return storage.join(self.images_uri, rel)

    def stored_sha256(self, rel: str, size: int) -> str | None:
        uri = self.uri(rel)
        if self.local:
            path = Path(uri)
            return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and path.stat().st_size == size else None
        if self.existing.get(uri) != size:
            return None
        return self.sha256_at(rel)

    def sha256_at(self, rel: str) -> str | None:
        """The sha256 an S3 object under this name carries in its metadata (None: absent or none)."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key_prefix + rel)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return head.get("Metadata", {}).get("sha256")

    def holds(self, rel: str) -> bool:
        """Whether an object is stored under this name (whatever its bytes)."""
        return Path(self.uri(rel)).exists() if self.local else self.uri(rel) in self.existing

    def put(self, rel: str, data: bytes, sha256: str, once: bool = False) -> None:
        uri = self.uri(rel)
        if self.local:
            (storage.write_once if once else storage.write_bytes)(uri, data)
            return
        extra = {"Metadata": {"sha256": sha256},
                 "ContentType": mimetypes.guess_type(rel)[0] or "application/octet-stream"}
        # A data version's object is created only where its name is free (a conditional PUT; a file big
        # enough to go multipart is checked against the listing only: scans are far below that size).
        if once and len(data) < MULTIPART_THRESHOLD:
            if not storage.create_once(uri, data, client=self.client, **extra) and self.sha256_at(rel) != sha256:
                raise storage.ImmutableObjectError(f"{uri} already holds other bytes; a data version is never "
                                                   "changed")
            return
        if len(data) < MULTIPART_THRESHOLD:  # one request: the transfer manager's machinery costs more than it saves
            self.client.put_object(Bucket=self.bucket, Key=self.key_prefix + rel, Body=data, **extra)
        else:  # big files go multipart, their parts in parallel
            # imported here: s3transfer is slow to import and scans are rarely this big
            from boto3.s3.transfer import TransferConfig

            config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD,
                                    max_concurrency=4)
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, self.key_prefix + rel, ExtraArgs=extra,
                                       Config=config)


def _upload_one(store: _Store, item: _Item, data: bytes, sha256: str, once: bool = False) -> bool:
    """Store one file unless the same bytes are already there; True when it was uploaded.

    once: other bytes under its name are never replaced (a data version): ImmutableObjectError.
    """
    if store.stored_sha256(item.rel, len(data)) == sha256:
        return False
    if once and store.holds(item.rel):
        raise storage.ImmutableObjectError(f"{store.uri(item.rel)} already holds other bytes; a data version "
                                           "is never changed")
    store.put(item.rel, data, sha256, once=once)
    return True


# --------------------------------------------------------------------------- the step

def _label_all(items: list[_Item]) -> None:
    problems = []
    for item in items:
        try:
            item.modality, item.class7 = label_from_path(item.rel)
        except UnknownLabelError as err:
            problems.append(str(err))
    if problems:
        raise UnknownLabelsError(problems)


def _s3_failure_reason(err: BaseException) -> str:
    if isinstance(err, (BotoConnectionError, HTTPClientError)):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
        return f"S3 unreachable at {redact(endpoint)}: {type(err).__name__}"
    if isinstance(err, ClientError):
        return f"S3 refused: {err.response.get('Error', {}).get('Code', '?')} {err.response.get('Error', {}).get('Message', '')}".strip()
    return f"{type(err).__name__}: {err}"


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, show: bool):
    if not show:
        return _NoBar()
    return tqdm(total=total, desc="ingest", unit="file", file=sys.stderr)


def ingest(source: str = DEFAULT_SOURCE, dest: str = "", workers: int = IO_WORKERS, progress: bool = True,
           zip_limits: ZipLimits = ZipLimits()) -> IngestResult:
    """Copy an archive's images to ``{dest}/images/``, then write ``ingest.json`` and ``manifest.csv``.

    Raises UnknownLabelsError (nothing uploaded) for files outside the layout, UploadError naming
    the files not stored when S3 fails mid-run (what was stored stays; rerun to finish), and
    IngestError for a bad source. Files over MAX_IMAGE_BYTES and symbolic links are refused and
    listed in the result's `rejected`; the rest is ingested.
    """
    if not dest:
        raise IngestError("no destination: give dest as s3://BUCKET/PREFIX or a folder")
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="brainscan-ingest-"))
    try:
        files = _open(str(source), scratch, zip_limits)
        return _copy(str(source), files, str(dest).rstrip("/"), workers, progress, started)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def ingest_version(source: str, datasets: str, workers: int = IO_WORKERS, progress: bool = True,
                   zip_limits: ZipLimits = ZipLimits(), expected_fingerprint: str | None = None) -> IngestResult:
    """Ingest a source as an immutable data version: ``{datasets}/<fingerprint>/`` (brainscan.layout).

    The images are read and hashed first, so the version's name (the dataset fingerprint) is known
    before anything is written. Nothing under a version is ever replaced: an object holding other
    bytes, or a file whose bytes changed since that first read, stops the run with no manifest
    written. `manifest.csv` comes last, so a version is complete (and read by anyone) only once it
    is there; an interrupted run leaves an incomplete version that the next run of the same data
    finishes. A complete version is reused as it is (`reused`: nothing uploaded or written).
    expected_fingerprint: refuse (IngestError) when the source no longer has this fingerprint,
    e.g. changed since the pipeline's fingerprint step (the step's outputs must follow its inputs).
    """
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="brainscan-ingest-"))
    try:
        files = _open(str(source), scratch, zip_limits)
        first_read = _hash_all(files.items, workers)
        fingerprint = fingerprint_of({"sha256": first_read[item.rel], "class7": item.class7} for item in files.items)
        if expected_fingerprint and expected_fingerprint != fingerprint:
            raise IngestError(f"source {source!r} has fingerprint {fingerprint}, not the expected "
                              f"{expected_fingerprint}: it changed since it was fingerprinted; run again")
        dest = layout.version_uri(datasets, fingerprint)
        if storage.exists(storage.join(dest, "manifest.csv")):
            log.info("data version %s is complete already: reused", dest)
            return _complete_version(str(source), dest, files, started)
        return _copy(str(source), files, dest, workers, progress, started, first_read=first_read)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _open(source: str, scratch: Path, zip_limits: ZipLimits) -> SourceFiles:
    """The source's files, labelled (an unknown name stops the run before anything is written)."""
    files = list_source(source, scratch, zip_limits)
    if files.ignored:
        log.info("ignoring %d non-image file(s), e.g. %s", len(files.ignored), ", ".join(files.ignored[:3]))
    for entry in files.rejected:
        log.warning("refused %s: %s", entry["path"], entry["reason"])
    if not files.items:
        raise IngestError(f"source {source!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    _label_all(files.items)
    return files


def _hash_all(items: list[_Item], workers: int) -> dict[str, str]:
    """rel -> sha256 of every item (a first read, to name the data version before writing it)."""
    def digest(item: _Item) -> tuple[str, str]:
        return item.rel, hashlib.sha256(item.read()).hexdigest()

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest-hash") as pool:
            return dict(pool.map(digest, items))
    except Exception as err:
        raise IngestError(f"cannot read the source: {_s3_failure_reason(err)}") from err


def _complete_version(source: str, dest: str, files: SourceFiles, started: float) -> IngestResult:
    """The result of an ingest that found its data version complete: the version's own record."""
    record = storage.read_json(storage.join(dest, "ingest.json"))
    return IngestResult(
        source=source, dest=dest, files=record["files"], bytes=record["bytes"], uploaded=0, skipped=record["files"],
        manifest_uri=record["manifest_uri"], summary_uri=storage.join(dest, "ingest.json"),
        fingerprint=record["fingerprint"], class_counts=record["class_counts"], undecodable=record["undecodable"],
        ignored=files.ignored, rejected=files.rejected, reused=True,
        seconds=round(time.monotonic() - started, 3))


def _copy(source: str, files: SourceFiles, dest: str, workers: int, progress: bool, started: float,
          first_read: dict[str, str] | None = None) -> IngestResult:
    """Store the files under {dest}/images/, then ingest.json, then manifest.csv.

    first_read (a data version): the sha256 each file had when the version was named; a file that
    reads otherwise now fails, and nothing stored is replaced (write-once).
    """
    items = files.items
    once = first_read is not None
    images_uri = storage.join(dest, "images")
    try:
        if storage.is_s3(dest):
            storage.ensure_bucket(storage.parse_s3(dest)[0])
        store = _Store(images_uri, workers)
    except Exception as err:
        if isinstance(err, IngestError):
            raise
        raise IngestError(f"cannot prepare {dest}: {_s3_failure_reason(err)}") from err

    abort = threading.Event()  # first S3 failure: stop starting new files, report the rest
    failures: dict[str, str] = {}
    lock = threading.Lock()
    rows: dict[str, dict] = {}
    uploaded = 0

    def work(item: _Item) -> None:
        nonlocal uploaded
        if abort.is_set():
            failures.setdefault(item.rel, "not attempted after an earlier failure")
            return
        try:
            data = item.read()
            sha256 = hashlib.sha256(data).hexdigest()
            if once and sha256 != first_read[item.rel]:
                raise IngestError(f"{item.rel} changed while being ingested")
            row = {"path": store.uri(item.rel), "sha256": sha256, "bytes": len(data), "modality": item.modality,
                   "class7": item.class7, "tumor": int(is_tumor(item.class7)), **describe_image(data)}
            did_upload = _upload_one(store, item, data, sha256, once=once)
        except Exception as err:
            with lock:
                failures[item.rel] = _s3_failure_reason(err)
            abort.set()
            return
        with lock:
            rows[item.rel] = row
            uploaded += int(did_upload)

    bar = _progress_bar(len(items), progress)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest") as pool:
            try:
                for _ in pool.map(work, items):
                    bar.update(1)
            except BaseException:  # Ctrl-C: queued files return at once instead of uploading
                abort.set()
                raise
    finally:
        bar.close()

    if failures:
        first_reason = next(r for r in failures.values() if r != "not attempted after an earlier failure") \
            if any(r != "not attempted after an earlier failure" for r in failures.values()) else "aborted"
        raise UploadError(first_reason, sorted(failures), stored=len(rows), total=len(items))

    ordered = [rows[rel] for rel in sorted(rows)]
    manifest = io.StringIO()
    writer = csv.DictWriter(manifest, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in ordered:
        writer.writerow({**row, "decodable": "true" if row["decodable"] else "false"})
    manifest_uri = storage.join(dest, "manifest.csv")
    summary_uri = storage.join(dest, "ingest.json")
    class_counts = {name: 0 for name in CLASSES}
    for row in ordered:
        class_counts[row["class7"]] += 1
    result = IngestResult(
        source=source, dest=dest, files=len(ordered), bytes=sum(r["bytes"] for r in ordered),
        uploaded=uploaded, skipped=len(ordered) - uploaded, manifest_uri=manifest_uri, summary_uri=summary_uri,
        fingerprint=fingerprint_of(ordered), class_counts=class_counts,
        undecodable=[r["path"] for r in ordered if not r["decodable"]], ignored=files.ignored,
        rejected=files.rejected,
    )
    result.seconds = round(time.monotonic() - started, 3)
    try:
        # The manifest last: a reader that finds it finds every object and the summary it lists.
        if once:
            storage.write_once(summary_uri, storage.json_bytes(result.version_record()), "application/json")
            storage.write_once(manifest_uri, manifest.getvalue().encode(), "text/csv")
        else:
            storage.write_json(summary_uri, result.summary())
            storage.write_text(manifest_uri, manifest.getvalue(), "text/csv")
    except storage.ImmutableObjectError as err:
        raise IngestError(f"data version {dest} holds another ingest's record: {err}") from err
    except Exception as err:
        raise IngestError(f"all {len(ordered)} images are stored, but writing the manifest failed "
                          f"({_s3_failure_reason(err)}); rerun to finish") from err
    if result.undecodable:
        log.warning("%d file(s) do not decode (kept, decodable=false): %s", len(result.undecodable),
                    ", ".join(result.undecodable[:5]))
    return result
