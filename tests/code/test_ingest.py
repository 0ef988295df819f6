"""ingest against a real SeaweedFS on loopback: idempotent reruns, resume after a kill, an S3 outage,
bad inputs (corrupt image, unknown folder, unsafe zips) and the dataset fingerprint."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from brainscan import storage

from brainscan.local import stack
from brainscan.limits import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from components import fingerprint as fingerprint_module
from components import ingest as ingest_module
from components.ingest import (MANIFEST_COLUMNS, IngestError, UnknownLabelsError, UploadError, ZipLimits,
                                         ingest, ingest_version)
from components.split import split
from brainscan.labels import label_from_path
from tests.fixtures.ingest import image_bytes, write_tree
from tests.fixtures.stack import stack_environment

REPO = Path(__file__).resolve().parents[2]


def read_manifest(dest: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(storage.read_text(storage.join(dest, "manifest.csv")))))


def relative_rows(dest: str) -> list[dict]:
    """Manifest rows with `path` made relative to the destination, to compare two destinations."""
    base = storage.join(dest, "images") + "/"
    return [{**row, "path": row["path"][len(base):]} for row in read_manifest(dest)]


def expected_fingerprint(root: Path) -> str:
    """Computed here from the files, independently of ingest's code."""
    lines = []
    for path in root.rglob("*"):
        if path.is_file() and path.suffix.lower() in (".jpg", ".jpeg", ".png"):
            lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()},{label_from_path(path.as_posix())[1]}")
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def object_keys(prefix: str) -> list[str]:
    return [uri for uri, _ in storage.list_files(prefix)]


def test_folder_ingest_then_rerun_uploads_nothing(synthetic_archive, s3_prefix):
    root = Path(synthetic_archive.out_dir)
    first = ingest(str(root), s3_prefix, workers=8, progress=False)
    assert (first.files, first.uploaded, first.skipped) == (synthetic_archive.files, synthetic_archive.files, 0)
    assert first.fingerprint == expected_fingerprint(root)

    rows = read_manifest(s3_prefix)
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    assert len(rows) == synthetic_archive.files
    client = storage.s3_client()
    for row in rows[:: max(1, len(rows) // 10)]:  # a sample: the object's bytes and metadata match the row
        bucket, key = storage.parse_s3(row["path"])
        obj = client.get_object(Bucket=bucket, Key=key)
        body = obj["Body"].read()
        assert hashlib.sha256(body).hexdigest() == row["sha256"] == obj["Metadata"]["sha256"]
        assert int(row["bytes"]) == len(body)
        assert row["class7"] == label_from_path(row["path"])[1]
        assert row["tumor"] == str(int(row["class7"] not in ("ct_healthy", "mri_healthy")))
    assert {row["decodable"] for row in rows} == {"true"}
    # The synthetic archive, like the real one, has .jpg files that are really PNG: format is the real one.
    assert any(row["path"].endswith(".jpg") and row["format"] == "PNG" for row in rows)

    summary = storage.read_json(storage.join(s3_prefix, "ingest.json"))
    assert summary["fingerprint"] == first.fingerprint and summary["files"] == first.files

    second = ingest(str(root), s3_prefix, workers=8, progress=False)
    assert (second.uploaded, second.skipped) == (0, synthetic_archive.files)
    assert second.fingerprint == first.fingerprint
    assert read_manifest(s3_prefix) == rows


def test_changed_object_is_uploaded_again(image_tree, s3_prefix):
    ingest(str(image_tree), s3_prefix, progress=False)
    changed = next(image_tree.rglob("glioma (2).jpg"))
    changed.write_bytes(image_bytes(4242))
    result = ingest(str(image_tree), s3_prefix, progress=False)
    assert result.uploaded == 1
    row = next(r for r in read_manifest(s3_prefix) if r["path"].endswith("glioma (2).jpg"))
    assert row["sha256"] == hashlib.sha256(changed.read_bytes()).hexdigest()
    assert storage.read_bytes(row["path"]) == changed.read_bytes()


def test_corrupt_image_is_recorded_not_dropped(image_tree, s3_prefix):
    good = next(image_tree.rglob("ct_tumor (2).jpg"))
    truncated = good.with_name("ct_tumor (3).jpg")
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    garbage = good.with_name("ct_tumor (4).jpg")
    garbage.write_bytes(b"this is not an image at all")

    result = ingest(str(image_tree), s3_prefix, progress=False)
    assert result.files == 16
    rows = {Path(r["path"]).name: r for r in read_manifest(s3_prefix)}
    for name in ("ct_tumor (3).jpg", "ct_tumor (4).jpg"):
        assert rows[name]["decodable"] == "false"
        assert rows[name]["width"] == "" and rows[name]["format"] == ""
        assert storage.exists(rows[name]["path"])  # kept in the store for quarantine
    assert sorted(Path(p).name for p in result.undecodable) == ["ct_tumor (3).jpg", "ct_tumor (4).jpg"]
    assert rows["ct_tumor (2).jpg"]["decodable"] == "true"
    assert rows["ct_tumor (1).jpg"]["format"] == "PNG" and rows["ct_tumor (2).jpg"]["format"] == "JPEG"


def test_unknown_folder_and_file_name_fail_before_upload(image_tree, s3_prefix):
    odd = image_tree / "Dataset" / "Brain Tumor MRI images" / "Maybe"
    odd.mkdir()
    (odd / "mri_healthy (9).jpg").write_bytes(image_bytes(9))
    (image_tree / "Dataset" / "Brain Tumor MRI images" / "Tumor" / "astrocytoma (1).jpg").write_bytes(image_bytes(8))

    with pytest.raises(UnknownLabelsError) as caught:
        ingest(str(image_tree), s3_prefix, progress=False)
    message = str(caught.value)
    assert "Maybe" in message and "astrocytoma (1).jpg" in message and "2 file(s)" in message
    assert object_keys(s3_prefix) == []  # nothing uploaded, no manifest


def test_non_image_files_are_ignored_and_listed(image_tree, s3_prefix):
    (image_tree / "README.md").write_text("notes")
    (image_tree / "Dataset" / ".DS_Store").write_bytes(b"\0")
    result = ingest(str(image_tree), s3_prefix, progress=False)
    assert result.files == 14
    assert sorted(result.ignored) == ["Dataset/.DS_Store", "README.md"]


def _zip(path: Path, members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_zip_source_matches_folder(image_tree, s3_prefix, tmp_path):
    archive = shutil.make_archive(str(tmp_path / "archive"), "zip", image_tree)
    from_zip = ingest(archive, s3_prefix, progress=False)
    assert from_zip.files == 14
    assert from_zip.fingerprint == expected_fingerprint(image_tree)


def test_zip_with_parent_entries_is_refused(image_tree, s3_prefix, tmp_path):
    members = {p.relative_to(image_tree).as_posix(): p.read_bytes() for p in image_tree.rglob("*.jpg")}
    members["../../escaped.jpg"] = image_bytes(1)
    archive = _zip(tmp_path / "evil.zip", members)
    with pytest.raises(IngestError, match=r"\.\./\.\./escaped\.jpg"):
        ingest(str(archive), s3_prefix, progress=False)
    assert object_keys(s3_prefix) == []
    assert not list(tmp_path.parent.rglob("escaped.jpg"))

    absolute = _zip(tmp_path / "absolute.zip", {"/etc/brainscan-test.jpg": image_bytes(2)})
    with pytest.raises(IngestError, match="absolute"):
        ingest(str(absolute), s3_prefix, progress=False)


def test_zip_bomb_is_refused(s3_prefix, tmp_path):
    # 64 MiB of zeros deflate to about 64 KiB: a 1000x ratio no image archive has.
    archive = _zip(tmp_path / "bomb.zip", {
        "Dataset/Brain Tumor CT scan Images/Healthy/ct_healthy (1).jpg": bytes(64 * 1024 * 1024)})
    assert archive.stat().st_size < 1024 * 1024
    with pytest.raises(IngestError, match="decompression bomb"):
        ingest(str(archive), s3_prefix, progress=False)
    assert object_keys(s3_prefix) == []


def test_zip_limits_on_entries_and_total_size(image_tree, s3_prefix, tmp_path):
    archive = shutil.make_archive(str(tmp_path / "archive"), "zip", image_tree)
    with pytest.raises(IngestError, match="entries"):
        ingest(archive, s3_prefix, progress=False, zip_limits=ZipLimits(max_entries=5))
    with pytest.raises(IngestError, match="uncompressed"):
        ingest(archive, s3_prefix, progress=False, zip_limits=ZipLimits(max_total_bytes=1000))
    assert object_keys(s3_prefix) == []


def test_zip_header_that_lies_about_size_is_caught(tmp_path):
    """A stored entry whose header claims fewer bytes than it holds is stopped while extracting."""
    name = "Dataset/Brain Tumor CT scan Images/Healthy/ct_healthy (1).jpg"
    archive = _zip(tmp_path / "liar.zip", {name: bytes(4096)}, compression=zipfile.ZIP_STORED)
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(name)
    raw = bytearray(archive.read_bytes())
    # Patch the central directory's uncompressed size (offset 24 in the record) to 100 bytes.
    central = raw.rfind(b"PK\x01\x02")
    raw[central + 24: central + 28] = (100).to_bytes(4, "little")
    archive.write_bytes(bytes(raw))
    assert info.file_size == 4096
    with pytest.raises(IngestError):
        ingest_module.extract_zip(archive, tmp_path / "out")


def test_s3_source(image_tree, s3_prefix):
    raw = storage.join(s3_prefix, "raw")
    storage.upload_dir(image_tree, raw)
    dest = storage.join(s3_prefix, "ingested")
    result = ingest(raw, dest, progress=False)
    assert result.files == 14 and result.fingerprint == expected_fingerprint(image_tree)
    assert read_manifest(dest)[0]["path"].startswith(storage.join(dest, "images") + "/")


def test_fingerprint_changes_exactly_when_data_or_labels_change(image_tree, s3_prefix, tmp_path):
    base = ingest(str(image_tree), storage.join(s3_prefix, "a"), progress=False).fingerprint
    # Same data and labels elsewhere, from another kind of source: same fingerprint.
    archive = shutil.make_archive(str(tmp_path / "same"), "zip", image_tree)
    assert ingest(archive, storage.join(s3_prefix, "b"), progress=False).fingerprint == base

    # Same bytes under another label: a new fingerprint.
    relabelled = tmp_path / "relabelled"
    shutil.copytree(image_tree, relabelled)
    tumor_dir = relabelled / "Dataset" / "Brain Tumor MRI images" / "Tumor"
    (tumor_dir / "glioma (2).jpg").rename(tumor_dir / "meningioma (9).jpg")
    assert ingest(str(relabelled), storage.join(s3_prefix, "c"), progress=False).fingerprint != base

    # Renamed within the same class (same bytes, same label): unchanged.
    renamed = tmp_path / "renamed"
    shutil.copytree(image_tree, renamed)
    tumor_dir = renamed / "Dataset" / "Brain Tumor MRI images" / "Tumor"
    (tumor_dir / "glioma (2).jpg").rename(tumor_dir / "glioma (77).jpg")
    assert ingest(str(renamed), storage.join(s3_prefix, "d"), progress=False).fingerprint == base

    # One changed pixel: a new fingerprint.
    edited = tmp_path / "edited"
    shutil.copytree(image_tree, edited)
    target = next(edited.rglob("ct_healthy (2).jpg"))
    target.write_bytes(image_bytes(99999))
    assert ingest(str(edited), storage.join(s3_prefix, "e"), progress=False).fingerprint != base


def test_cli_json_summary_is_last_line(image_tree, s3_prefix):
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, ["ingest", "--source", str(image_tree), "--dest", s3_prefix, "--json",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary) == {"files", "bytes", "uploaded", "skipped", "manifest_uri", "fingerprint", "rejected"}
    assert summary["files"] == 14 and summary["manifest_uri"] == storage.join(s3_prefix, "manifest.csv")
    assert summary["rejected"] == []

    bad = CliRunner().invoke(app, ["ingest", "--source", str(image_tree / "missing"), "--dest", s3_prefix])
    assert bad.exit_code == 1 and "error: source" in bad.output


def test_killed_ingest_resumes_and_equals_an_uninterrupted_run(synthetic_archive, s3_prefix):
    """Kill the CLI half way (SIGKILL, no clean-up), rerun: it completes, uploading only what was missing."""
    root = str(synthetic_archive.out_dir)
    total = synthetic_archive.files
    interrupted = storage.join(s3_prefix, "interrupted")
    # The CLI in a subprocess, each upload slowed a little so that the kill lands half way.
    slow_cli = ("import time; import components.ingest as m; real = m._upload_one\n"
                "def slow(*a, **k):\n    time.sleep(0.05); return real(*a, **k)\n"
                "m._upload_one = slow\nfrom cli import app; app()")
    process = subprocess.Popen([sys.executable, "-c", slow_cli, "ingest", "--source", root, "--dest", interrupted,
                                "--workers", "2", "--no-progress"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        stored = 0
        while time.monotonic() < deadline and process.poll() is None:
            stored = len(object_keys(storage.join(interrupted, "images")))
            if stored >= total // 3:
                break
            time.sleep(0.1)
        assert process.poll() is None, "ingest finished before it could be interrupted"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stored = len(object_keys(storage.join(interrupted, "images")))
    assert 0 < stored < total
    assert not storage.exists(storage.join(interrupted, "manifest.csv"))

    resumed = ingest(root, interrupted, workers=4, progress=False)
    assert resumed.files == total
    assert resumed.skipped == stored and resumed.uploaded == total - stored

    uninterrupted = storage.join(s3_prefix, "uninterrupted")
    clean = ingest(root, uninterrupted, workers=4, progress=False)
    assert resumed.fingerprint == clean.fingerprint
    assert relative_rows(interrupted) == relative_rows(uninterrupted)


def test_s3_outage_mid_ingest_is_reported_and_a_rerun_completes(synthetic_archive, tmp_path, monkeypatch):
    """A SeaweedFS of its own is stopped after a few uploads: clear error, nothing lost, rerun completes."""
    workdir = tmp_path / "outage-stack"
    with stack_environment() as use:
        try:
            use(stack.up(workdir))
            dest = "s3://outage/data"
            calls, lock = [0], threading.Lock()
            real_upload = ingest_module._upload_one

            def upload_then_outage(*args, **kwargs):
                with lock:
                    calls[0] += 1
                    if calls[0] == 20:
                        stack.down(workdir)  # the server really goes away, mid-run
                return real_upload(*args, **kwargs)

            monkeypatch.setattr(ingest_module, "_upload_one", upload_then_outage)
            with pytest.raises(UploadError) as caught:
                ingest(str(synthetic_archive.out_dir), dest, workers=2, progress=False)
            err = caught.value
            assert "S3 unreachable" in str(err) and "rerun" in str(err)
            assert err.not_uploaded and err.not_uploaded[0] in str(err)
            monkeypatch.setattr(ingest_module, "_upload_one", real_upload)

            use(stack.up(workdir))  # back again (new ports, same data)
            stored_keys = object_keys("s3://outage/data/images")
            stored = len(stored_keys)
            # Nothing lost: every file the error did not name is stored, after a restart of the server.
            all_files = sorted(p.relative_to(synthetic_archive.out_dir).as_posix()
                               for p in Path(synthetic_archive.out_dir).rglob("*") if p.is_file())
            reported_stored = set(all_files) - set(err.not_uploaded)
            assert len(reported_stored) == err.stored >= 10
            assert {f"s3://outage/data/images/{rel}" for rel in reported_stored} <= set(stored_keys)
            assert not storage.exists("s3://outage/data/manifest.csv")
            rerun = ingest(str(synthetic_archive.out_dir), dest, workers=4, progress=False)
            assert rerun.files == synthetic_archive.files
            assert rerun.skipped == stored and rerun.uploaded == synthetic_archive.files - stored
            assert rerun.uploaded <= len(err.not_uploaded)
            assert rerun.fingerprint == expected_fingerprint(Path(synthetic_archive.out_dir))
        finally:
            stack.down(workdir)


def test_kaggle_source_from_a_seeded_kagglehub_cache(image_tree, s3_prefix, tmp_path, monkeypatch):
    """kaggle:OWNER/DATASET/versions/N goes through kagglehub, which finds it in its (pre-seeded) cache."""
    from kagglehub.cache import Cache
    from kagglehub.handle import parse_dataset_handle

    cache = tmp_path / "kagglehub"
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(cache))
    handle = parse_dataset_handle("murtozalikhon/brain-tumor-multimodal-image-ct-and-mri/versions/1")
    dataset_dir = cache / "datasets" / handle.owner / handle.dataset / "versions" / "1"
    shutil.copytree(image_tree, dataset_dir)
    Cache().mark_as_complete(handle)

    result = ingest("kaggle:murtozalikhon/brain-tumor-multimodal-image-ct-and-mri/versions/1", s3_prefix,
                    progress=False)
    assert result.files == 14 and result.fingerprint == expected_fingerprint(image_tree)


def test_kaggle_without_network_or_credentials_is_one_clear_line(tmp_path, monkeypatch, s3_prefix):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-config"))
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.delenv("KAGGLE_API_TOKEN", raising=False)
    with pytest.raises(IngestError) as caught:
        ingest("kaggle:brainscan-tests/no-such-dataset", s3_prefix, progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("cannot download kaggle:brainscan-tests/no-such-dataset:")
    assert "no Kaggle credentials" in message  # and, on this offline machine, "no network" too


def test_big_file_goes_multipart_with_its_sha256(image_tree, s3_prefix, monkeypatch):
    monkeypatch.setattr(ingest_module, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)  # S3's smallest part size
    big = image_tree / "Dataset" / "Brain Tumor CT scan Images" / "Tumor" / "ct_tumor (50).png"
    big.write_bytes(image_bytes(50, size=1400, fmt="PNG", mode="RGB"))
    assert big.stat().st_size > 5 * 1024 * 1024
    first = ingest(str(image_tree), s3_prefix, progress=False)
    row = next(r for r in read_manifest(s3_prefix) if r["path"].endswith("ct_tumor (50).png"))
    bucket, key = storage.parse_s3(row["path"])
    head = storage.s3_client().head_object(Bucket=bucket, Key=key)
    assert "-" in head["ETag"]  # a multipart upload's ETag
    assert head["Metadata"]["sha256"] == row["sha256"] == hashlib.sha256(big.read_bytes()).hexdigest()
    assert (row["width"], row["height"], row["format"]) == ("1400", "1400", "PNG")
    assert first.uploaded == 15
    assert ingest(str(image_tree), s3_prefix, progress=False).uploaded == 0


def test_local_folder_destination(image_tree, tmp_path):
    dest = tmp_path / "store"
    first = ingest(str(image_tree), str(dest), progress=False)
    assert first.uploaded == 14 and (dest / "manifest.csv").exists() and (dest / "ingest.json").exists()
    copied = next(dest.rglob("glioma (2).jpg"))
    assert copied.read_bytes() == next(image_tree.rglob("glioma (2).jpg")).read_bytes()
    assert ingest(str(image_tree), str(dest), progress=False).uploaded == 0


@pytest.mark.realdata
def test_real_sample_ingest(s3_prefix, real_sample_dir):
    result = ingest(str(real_sample_dir), s3_prefix, progress=False)
    with open(real_sample_dir / "labels.csv") as f:
        expected = {row["path"]: row["class7"] for row in csv.DictReader(f)}
    rows = relative_rows(s3_prefix)
    assert {row["path"]: row["class7"] for row in rows} == expected  # labels from paths agree with labels.csv
    assert set(result.ignored) == {"README.md", "labels.csv"}
    assert not result.undecodable
    assert {row["format"] for row in rows} == {"JPEG", "PNG"}
    assert {row["mode"] for row in rows} >= {"L", "RGB"}


def test_folder_source_does_not_follow_symlinks(image_tree, s3_prefix, tmp_path):
    """A symbolic link in a folder source (to /etc/passwd, to a folder outside the source) is refused
    and reported, never read or uploaded; the fingerprint step leaves it out the same way."""
    outside = write_tree(tmp_path / "outside", per_class=1, seed=9) / "Dataset" / "Brain Tumor CT scan Images"
    healthy = image_tree / "Dataset" / "Brain Tumor CT scan Images" / "Healthy"
    (healthy / "ct_healthy (9).jpg").symlink_to("/etc/passwd")
    (image_tree / "Dataset" / "Brain Tumor MRI images" / "Tumor" / "linked").symlink_to(outside)

    result = ingest(str(image_tree), s3_prefix, progress=False)
    assert result.files == 14  # the tree's own images, all of them
    rejected = {entry["path"]: entry["reason"] for entry in result.rejected}
    assert set(rejected) == {"Dataset/Brain Tumor CT scan Images/Healthy/ct_healthy (9).jpg",
                             "Dataset/Brain Tumor MRI images/Tumor/linked"}
    assert all("symbolic link" in reason for reason in rejected.values())
    assert not any("(9)" in key or "linked" in key for key in object_keys(s3_prefix))
    assert storage.read_json(storage.join(s3_prefix, "ingest.json"))["rejected"] == result.rejected
    assert result.fingerprint == fingerprint_module.source_fingerprint(str(image_tree))


def test_file_over_the_size_cap_is_rejected_and_the_rest_ingested(image_tree, s3_prefix):
    """One setting (brainscan.limits.MAX_IMAGE_BYTES, above any image the pixel limit admits) caps a
    file; a bigger one is refused before it is read, with its reason, and nothing else is lost."""
    assert MAX_IMAGE_BYTES >= 4 * MAX_IMAGE_PIXELS  # an uncompressed RGBA image at the pixel limit fits
    huge = image_tree / "Dataset" / "Brain Tumor MRI images" / "Tumor" / "glioma (9).png"
    with open(huge, "wb") as handle:  # sparse: no disk, and never read
        handle.truncate(MAX_IMAGE_BYTES + 1)

    result = ingest(str(image_tree), s3_prefix, progress=False)
    assert result.files == 14 and len(read_manifest(s3_prefix)) == 14
    assert result.rejected == [{"path": "Dataset/Brain Tumor MRI images/Tumor/glioma (9).png",
                                "reason": f"{MAX_IMAGE_BYTES + 1} bytes, more than the limit of "
                                          f"{MAX_IMAGE_BYTES} for one image"}]
    assert not any("glioma (9)" in key for key in object_keys(s3_prefix))
    assert result.fingerprint == fingerprint_module.source_fingerprint(str(image_tree))  # the step agrees


# --------------------------------------------------------------------------- immutable data versions

def test_a_data_version_is_named_by_its_content_and_reused_when_complete(image_tree, s3_prefix):
    first = ingest_version(str(image_tree), s3_prefix, progress=False)
    assert first.dest == storage.join(s3_prefix, expected_fingerprint(image_tree))  # named by the fingerprint
    assert (first.files, first.uploaded, first.reused) == (14, 14, False)
    assert all(row["path"].startswith(first.dest + "/images/") for row in read_manifest(first.dest))
    listing = {(uri, size) for uri, size in storage.list_files(first.dest)}

    again = ingest_version(str(image_tree), s3_prefix, progress=False)
    assert (again.dest, again.fingerprint, again.uploaded, again.reused) == (first.dest, first.fingerprint, 0, True)
    assert {(uri, size) for uri, size in storage.list_files(first.dest)} == listing

    next(image_tree.rglob("glioma (2).jpg")).write_bytes(image_bytes(4242))  # new data: a new version
    changed = ingest_version(str(image_tree), s3_prefix, progress=False)
    assert changed.dest != first.dest and changed.uploaded == 14
    assert {(uri, size) for uri, size in storage.list_files(first.dest)} == listing  # the old one untouched
    assert len(read_manifest(first.dest)) == 14


def test_an_interrupted_version_is_invisible_until_a_rerun_completes_it(image_tree, s3_prefix, monkeypatch):
    """The manifest comes last: a run that fails half way leaves a version without manifest.csv, which
    validate and split refuse to read; the next run of the same data finishes it."""
    real_put, calls = ingest_module._Store.put, []

    def failing_put(self, rel, data, sha256, once=False):
        calls.append(rel)
        if len(calls) > 5:
            raise ConnectionError("S3 went away")
        return real_put(self, rel, data, sha256, once=once)

    monkeypatch.setattr(ingest_module._Store, "put", failing_put)
    with pytest.raises(UploadError):
        ingest_version(str(image_tree), s3_prefix, workers=1, progress=False)
    version = storage.join(s3_prefix, expected_fingerprint(image_tree))
    assert 0 < len(object_keys(storage.join(version, "images"))) < 14
    assert not storage.exists(storage.join(version, "manifest.csv"))
    with pytest.raises(FileNotFoundError):
        split(version, storage.join(version, "splits", "x"))

    monkeypatch.setattr(ingest_module._Store, "put", real_put)
    done = ingest_version(str(image_tree), s3_prefix, workers=1, progress=False)
    assert done.dest == version and done.files == 14 and done.uploaded == 14 - 5
    assert storage.exists(storage.join(version, "manifest.csv"))


def test_bytes_under_a_version_are_never_replaced(image_tree, s3_prefix):
    """An object of an unfinished version that holds other bytes stops the run; it is not overwritten."""
    version = storage.join(s3_prefix, expected_fingerprint(image_tree))
    planted = storage.join(version, "images", "Dataset/Brain Tumor MRI images/Tumor/glioma (2).jpg")
    storage.write_bytes(planted, b"other bytes")
    with pytest.raises(UploadError, match="never changed"):
        ingest_version(str(image_tree), s3_prefix, progress=False)
    assert storage.read_bytes(planted) == b"other bytes"
    assert not storage.exists(storage.join(version, "manifest.csv"))


def test_a_source_that_changed_since_its_fingerprint_is_refused(image_tree, s3_prefix):
    """The pipeline's ingest is cached on the fingerprint step's value: it refuses other data rather
    than return a version that the cache key does not name."""
    with pytest.raises(IngestError, match="changed since it was fingerprinted"):
        ingest_version(str(image_tree), s3_prefix, progress=False, expected_fingerprint="0" * 64)
    assert object_keys(s3_prefix) == []


def test_an_unreachable_s3_endpoint_is_named_without_its_credentials(monkeypatch):
    from botocore.exceptions import EndpointConnectionError

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://AKIDEXAMPLE:wJalrXUtnFEMI@127.0.0.1:9")
    reason = ingest_module._s3_failure_reason(EndpointConnectionError(endpoint_url="http://127.0.0.1:9"))
    assert reason == "S3 unreachable at http://***@127.0.0.1:9: EndpointConnectionError"
