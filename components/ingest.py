"""Ingest: raw images from a Kaggle archive, a zip, a folder or S3 into the dataset store, with a manifest.

`ingest(source, dest)` copies every image of the archive layout to ``{dest}/images/<path in the
archive>`` (each object carries its sha256 in its metadata), then writes ``{dest}/manifest.csv``
and ``{dest}/ingest.json``.

- Labels come from the path (`brainscan.labels.label_from_path`); a file that does not fit the
  layout stops the run before anything is uploaded, with the list of such files.
- Idempotent and resumable: an object already stored with the same sha256 is skipped, so a
  rerun uploads nothing and a rerun after a crash or an S3 outage uploads only what is missing.
  The manifest is written last, only after every file is stored: a failed run never leaves a
  manifest that lists objects which are not there.
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

from brainscan import storage
from brainscan.config import DEFAULT_SOURCE, IO_WORKERS
from brainscan.dataset import MANIFEST_COLUMNS, fingerprint_of
from brainscan.labels import IMAGE_SUFFIXES, CLASSES, UnknownLabelError, is_tumor, label_from_path
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
    seconds: float = 0.0

    def summary(self) -> dict:
        return asdict(self)


@dataclass
class _Item:
    """One image of the source: its path inside the archive and how to read its bytes.

    `stream` opens them for reading in pieces and `version` is what the listing showed of them (S3
    ETag and size; a file's size and modification time): the fingerprint step hashes an image
    without holding it and skips one whose version it has hashed before.
    """

    rel: str
    read: Callable[[], bytes]
    stream: Callable[[], BinaryIO]
    version: str
    modality: str = ""
    class7: str = ""


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


def _folder_items(root: Path) -> tuple[list[_Item], list[str]]:
    items, ignored = [], []
    for uri, size, mtime in storage.list_versions(str(root)):
        path = Path(uri)
        rel = path.relative_to(root).as_posix()
        if _skip_name(rel):
            ignored.append(rel)
        else:
            items.append(_Item(rel, path.read_bytes, lambda path=path: path.open("rb"), f"{size}:{mtime}"))
    return items, ignored


def _s3_items(prefix: str) -> tuple[list[_Item], list[str]]:
    base = prefix.rstrip("/") + "/"
    items, ignored = [], []
    for uri, size, etag in storage.list_versions(prefix):
        rel = uri[len(base):]
        if _skip_name(rel):
            ignored.append(rel)
        else:
            items.append(_Item(rel, lambda uri=uri: storage.read_bytes(uri), lambda uri=uri: storage.open_read(uri),
                               f"{size}:{etag}"))
    return items, ignored


def open_source(source: str, scratch: Path, zip_limits: ZipLimits) -> tuple[list[_Item], list[str]]:
    """The images of a source read in place (ingest's own reader; retrain fingerprints with it too).

    Returns (items with `.rel` and `.read()`, ignored non-image names); a zip unpacks under `scratch`.
    """
    if source.startswith("kaggle:"):
        return _folder_items(download_kaggle(source[len("kaggle:"):].strip("/")))
    if storage.is_s3(source):
        return _s3_items(source)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".zip":
        return _folder_items(extract_zip(path, scratch / "unzipped", zip_limits))
    if path.is_dir():
        return _folder_items(path)
    raise IngestError(f"source {source!r} is not a folder, a .zip file, an s3:// prefix or kaggle:OWNER/DATASET"
                      + (" (it does not exist)" if not path.exists() else ""))


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
        head = self.client.head_object(Bucket=self.bucket, Key=self.key_prefix + rel)
        return head.get("Metadata", {}).get("sha256")

    def put(self, rel: str, data: bytes, sha256: str) -> None:
        uri = self.uri(rel)
        if self.local:
            storage.write_bytes(uri, data)
            return
        extra = {"Metadata": {"sha256": sha256},
                 "ContentType": mimetypes.guess_type(rel)[0] or "application/octet-stream"}
        if len(data) < MULTIPART_THRESHOLD:  # one request: the transfer manager's machinery costs more than it saves
            self.client.put_object(Bucket=self.bucket, Key=self.key_prefix + rel, Body=data, **extra)
        else:  # big files go multipart, their parts in parallel
            # imported here: s3transfer is slow to import and scans are rarely this big
            from boto3.s3.transfer import TransferConfig

            config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD,
                                    max_concurrency=4)
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, self.key_prefix + rel, ExtraArgs=extra,
                                       Config=config)


def _upload_one(store: _Store, item: _Item, data: bytes, sha256: str) -> bool:
    """Store one file unless the same bytes are already there; True when it was uploaded."""
    if store.stored_sha256(item.rel, len(data)) == sha256:
        return False
    store.put(item.rel, data, sha256)
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
    """Copy an archive's images to ``{dest}/images/``, then write ``manifest.csv`` and ``ingest.json``.

    Raises UnknownLabelsError (nothing uploaded) for files outside the layout, UploadError naming
    the files not stored when S3 fails mid-run (what was stored stays; rerun to finish), and
    IngestError for a bad source.
    """
    if not dest:
        raise IngestError("no destination: give dest as s3://BUCKET/PREFIX or a folder")
    source, dest = str(source), str(dest).rstrip("/")
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="brainscan-ingest-"))
    try:
        items, ignored = open_source(source, scratch, zip_limits)
        if ignored:
            log.info("ignoring %d non-image file(s), e.g. %s", len(ignored), ", ".join(ignored[:3]))
        if not items:
            raise IngestError(f"source {source!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        _label_all(items)  # before any upload: an unknown name stops the run with nothing written

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
                row = {"path": store.uri(item.rel), "sha256": sha256, "bytes": len(data), "modality": item.modality,
                       "class7": item.class7, "tumor": int(is_tumor(item.class7)), **describe_image(data)}
                did_upload = _upload_one(store, item, data, sha256)
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
            undecodable=[r["path"] for r in ordered if not r["decodable"]], ignored=ignored,
        )
        try:
            storage.write_text(manifest_uri, manifest.getvalue(), "text/csv")
            result.seconds = round(time.monotonic() - started, 3)
            storage.write_json(summary_uri, result.summary())
        except Exception as err:
            raise IngestError(f"all {len(ordered)} images are stored, but writing the manifest failed "
                              f"({_s3_failure_reason(err)}); rerun to finish") from err
        if result.undecodable:
            log.warning("%d file(s) do not decode (kept, decodable=false): %s", len(result.undecodable),
                        ", ".join(result.undecodable[:5]))
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
