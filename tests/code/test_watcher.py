"""Retrain on new data: the source fingerprint, the check against the champion's tag, the watch loop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from brainscan import storage
from cli import app
from components import ingest
from brainscan import registry
from components import register as reg
from components import fingerprint
from pipelines import watcher

NAME = "brain-tumor"


@pytest.fixture
def source(synthetic_archive, tmp_path) -> Path:
    """A copy of the session archive that tests may add images to."""
    return Path(shutil.copytree(synthetic_archive.out_dir, tmp_path / "archive"))


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> str:
    uri = registry.default_tracking_uri(tmp_path / "mlflow")
    (tmp_path / "mlflow").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _register_champion(bundle_dir, fingerprint: str, tracking_uri: str) -> str:
    """A champion registered by the real register step, tagged with `fingerprint`."""
    doc = {"gate": {"passed": True, "reason": "PASSED (test stand-in)"}, "threshold": 0.5,
           "test": {"recall": 1.0, "roc_auc": 1.0}, "dataset_fingerprint": fingerprint}
    result = reg.register(str(bundle_dir), doc, name=NAME, tracking_uri=tracking_uri)
    assert result.registered, result.reason
    registry.promote(registry.connect(tracking_uri)[0], NAME, result.version)  # as its deploy would
    return str(result.version)


def _mri_tumor_folder(source: Path) -> Path:
    return source / "Dataset" / "Brain Tumor MRI images" / "Tumor"


def _add_image(source: Path, number: int = 9001) -> None:
    """A new scan: an existing glioma image mirrored, under a new number."""
    from PIL import Image

    with Image.open(_mri_tumor_folder(source) / "glioma (1).jpg") as image:
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(_mri_tumor_folder(source) / f"glioma ({number}).jpg")


def test_source_fingerprint_is_what_ingest_records(source, s3_prefix):
    """Same definition as ingest's, so the champion's tag (from ingest) compares equal."""
    result = ingest.ingest(str(source), s3_prefix, progress=False)
    assert fingerprint.source_fingerprint(str(source)) == result.fingerprint
    # an S3 prefix holding the archive layout (here: ingest's own copy) reads the same
    assert fingerprint.source_fingerprint(storage.join(s3_prefix, "images")) == result.fingerprint


def test_fingerprint_changes_with_an_image_or_a_label(source):
    before = fingerprint.source_fingerprint(str(source))
    _add_image(source)
    added = fingerprint.source_fingerprint(str(source))
    assert added != before
    # the same bytes filed under another class is a label change: a retrain is due
    folder = _mri_tumor_folder(source)
    (folder / "glioma (2).jpg").rename(folder / "meningioma (9002).jpg")
    assert fingerprint.source_fingerprint(str(source)) != added


def test_check_no_champion_then_same_data_then_new_data(source, tracking, tiny_bundle_dir):
    first = watcher.check(str(source), model_name=NAME)
    assert first.retrain and first.champion_version is None and "no champion" in first.message

    version = _register_champion(tiny_bundle_dir, first.fingerprint, tracking)
    same = watcher.check(str(source), model_name=NAME)
    assert not same.retrain and same.champion_version == version
    assert same.champion_fingerprint == same.fingerprint == first.fingerprint

    _add_image(source)
    changed = watcher.check(str(source), model_name=NAME)
    assert changed.retrain and changed.champion_version == version
    assert changed.fingerprint != first.fingerprint and "data changed" in changed.message


def test_cli_check_prints_the_decision(source, tracking, tiny_bundle_dir):
    runner = CliRunner()
    due = runner.invoke(app, ["retrain", "check", "--source", str(source), "--json"])
    assert due.exit_code == 0, due.output
    assert any(line.startswith("retrain due: no champion") for line in due.output.splitlines()), due.output
    _register_champion(tiny_bundle_dir, json.loads(due.output.strip().splitlines()[-1])["fingerprint"], tracking)
    fresh = runner.invoke(app, ["retrain", "check", "--source", str(source)])
    assert fresh.exit_code == 0, fresh.output
    assert any(line.startswith("up to date: champion v1") for line in fresh.output.splitlines()), fresh.output
    missing = runner.invoke(app, ["retrain", "check", "--source", str(source / "nowhere")])
    assert missing.exit_code != 0 and "nowhere" in missing.output


def test_watch_starts_one_run_per_new_fingerprint(source, tracking, monkeypatch):
    """No champion yet: one run; the same data again: none while that run goes on; new data: another."""
    monkeypatch.setattr(watcher.time, "sleep", lambda _s: None)
    checks = []
    real_check = watcher.check

    def counting_check(src, model_name=NAME, **kwargs):
        checks.append(len(checks))
        if len(checks) == 3:
            _add_image(source)  # new scans arrive between the second and third check
        return real_check(src, model_name=model_name, **kwargs)

    monkeypatch.setattr(watcher, "check", counting_check)
    runs = []
    started = watcher.watch(str(source), runs.append, interval_s=0, model_name=NAME, max_checks=4)
    assert started == 2 and len(runs) == 2 and len(checks) == 4
    assert runs[0].fingerprint != runs[1].fingerprint


def test_watch_survives_failed_checks_and_failed_starts(source, tracking, monkeypatch, caplog):
    """An unreachable source or a run that cannot start is logged; the next check tries again."""
    monkeypatch.setattr(watcher.time, "sleep", lambda _s: None)
    hidden = source.with_name("archive-moved")
    source.rename(hidden)
    attempts = []

    def flaky_start(decision):
        attempts.append(decision.fingerprint)
        if len(attempts) == 1:
            raise ConnectionError("KFP API unreachable")

    checks = []
    real_check = watcher.check

    def check_restoring_source(src, model_name=NAME, **kwargs):
        checks.append(1)
        if len(checks) == 2:
            hidden.rename(source)  # the source comes back
        return real_check(src, model_name=model_name, **kwargs)

    monkeypatch.setattr(watcher, "check", check_restoring_source)
    with caplog.at_level("ERROR", logger=watcher.log.name):
        started = watcher.watch(str(source), flaky_start, interval_s=0, model_name=NAME, max_checks=4)
    assert started == 1 and len(attempts) == 2 and attempts[0] == attempts[1]
    messages = [r.getMessage() for r in caplog.records]
    assert any("check 1 failed" in m and "archive" in m for m in messages)
    assert any("KFP API unreachable" in m and "retried at the next check" in m for m in messages)


def test_source_fingerprint_rejects_an_empty_source(tmp_path):
    (tmp_path / "empty" / "Dataset").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        fingerprint.source_fingerprint(str(tmp_path / "empty"))


def test_watch_waits_for_an_upload_to_settle(source, tracking, monkeypatch):
    """Scans arriving over several checks start one run, on the data as it is once the upload stopped."""
    monkeypatch.setattr(watcher.time, "sleep", lambda _s: None)
    checks = []
    real_check = watcher.check

    def uploading_check(src, model_name=NAME, **kwargs):
        checks.append(1)
        if len(checks) in (2, 3):
            _add_image(source, 9000 + len(checks))  # the upload goes on across checks 2 and 3
        return real_check(src, model_name=model_name, **kwargs)

    monkeypatch.setattr(watcher, "check", uploading_check)
    runs = []
    started = watcher.watch(str(source), runs.append, interval_s=0, model_name=NAME, max_checks=5, settle_checks=2)
    assert started == 1 and len(checks) == 5  # checks 1-3 saw changing data; 4 saw it again: one run
    assert runs[0].fingerprint == fingerprint.source_fingerprint(str(source))
    with pytest.raises(ValueError, match="settle_checks"):
        watcher.watch(str(source), runs.append, settle_checks=0, max_checks=1)


def test_unchanged_listing_reads_no_image(source, s3_prefix, monkeypatch):
    """A check lists the source; its images are read again only when the listing changed (S3 and folders)."""
    reads = []
    real_read = fingerprint._read_fingerprint
    monkeypatch.setattr(fingerprint, "_read_fingerprint", lambda src, *rest: reads.append(src) or real_read(src, *rest))
    result = ingest.ingest(str(source), s3_prefix, progress=False)
    images = storage.join(s3_prefix, "images")
    for where in (str(source), images):
        first = fingerprint.source_fingerprint(where)
        assert fingerprint.source_fingerprint(where) == first == result.fingerprint
    assert reads == [str(source), images]  # once each, however many checks

    storage.write_bytes(storage.join(images, "Dataset/Brain Tumor MRI images/Tumor/glioma (9100).jpg"),
                        storage.read_bytes(storage.join(images, "Dataset/Brain Tumor MRI images/Tumor/glioma (1).jpg")))
    _add_image(source, 9100)
    assert fingerprint.source_fingerprint(images) != first and fingerprint.source_fingerprint(str(source)) != first
    assert reads[2:] == [images, str(source)]


# A small archive with known bytes, and its fingerprint as main computed it before hashing was streamed
# (commit be8c51f): pipelines compare fingerprints across versions, so the value must not move.
KNOWN_FILES = {
    "Dataset/Brain Tumor CT scan Images/Healthy/ct_healthy (1).jpg": b"ct healthy 1",
    "Dataset/Brain Tumor CT scan Images/Tumor/ct_tumor (1).png": b"ct tumor 1",
    "Dataset/Brain Tumor MRI images/Tumor/glioma (1).jpg": b"glioma 1" * 1000,
    "Dataset/Brain Tumor MRI images/Tumor/meningioma (1).jpg": b"meningioma 1",
    "Dataset/Brain Tumor MRI images/Healthy/mri_healthy (1).jpg": b"mri healthy 1",
    "Dataset/notes.txt": b"not an image",
}
KNOWN_FINGERPRINT = "47581d7ba409f006921e21c09af5bedcbfc9d8c5640975cd8015342da3523021"


def _write_files(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _whole_file_fingerprint(source: str) -> str:
    """The definition as it was written before streaming: each image read whole, then hashed."""
    import hashlib
    import tempfile

    from brainscan import labels
    from brainscan.dataset import fingerprint_of

    with tempfile.TemporaryDirectory() as scratch:
        items, _ = ingest.open_source(source, Path(scratch), ingest.ZipLimits())
        return fingerprint_of([{"sha256": hashlib.sha256(item.read()).hexdigest(),
                                "class7": labels.label_from_path(item.rel)[1]} for item in items])


def test_streamed_fingerprint_keeps_its_value(tmp_path, s3_prefix):
    """The same data gives the same fingerprint as before streaming, in a folder and on S3."""
    folder = _write_files(tmp_path / "known", KNOWN_FILES)
    assert fingerprint.source_fingerprint(str(folder)) == KNOWN_FINGERPRINT
    for rel, data in KNOWN_FILES.items():
        storage.write_bytes(storage.join(s3_prefix, rel), data)
    assert fingerprint.source_fingerprint(s3_prefix) == KNOWN_FINGERPRINT


def test_source_hashes_are_streamed_not_held_whole(source):
    """A 64 MB image is hashed in pieces: the fingerprint's peak memory stays far below the file's size."""
    import tracemalloc

    big = _mri_tumor_folder(source) / "glioma (9500).jpg"
    big.write_bytes(bytes(range(256)) * (64 * 1024 * 1024 // 256))
    expected = _whole_file_fingerprint(str(source))
    tracemalloc.start()
    try:
        value = fingerprint.source_fingerprint(str(source))
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert value == expected
    assert peak < 16 * 1024 * 1024, f"peak {peak / 2**20:.0f} MiB while hashing a 64 MiB file"


def test_s3_objects_with_the_same_etag_are_not_read_again(source, s3_prefix):
    """Across checks, only objects whose ETag or size changed are downloaded (GetObject counted)."""
    result = ingest.ingest(str(source), s3_prefix, progress=False)
    images = storage.join(s3_prefix, "images")
    gets = []
    client = storage.s3_client()
    count = lambda params, **_: gets.append(params["Key"])  # noqa: E731 - a botocore event handler
    client.meta.events.register("before-parameter-build.s3.GetObject", count, unique_id="test-count-gets")
    try:
        assert fingerprint.source_fingerprint(images) == result.fingerprint
        first = len(gets)
        assert first == result.files  # the first check reads every image once
        assert fingerprint.source_fingerprint(images) == result.fingerprint
        assert len(gets) == first  # nothing changed: nothing read

        new_key = "Dataset/Brain Tumor MRI images/Tumor/glioma (9200).jpg"
        storage.write_bytes(storage.join(images, new_key), b"a new scan")
        changed = fingerprint.source_fingerprint(images)
        assert changed != result.fingerprint
        assert gets[first:] == [f"{storage.parse_s3(images)[1]}/{new_key}"]  # only the new object

        storage.write_bytes(storage.join(images, new_key), b"the new scan, replaced")  # same key, new ETag
        assert fingerprint.source_fingerprint(images) not in (changed, result.fingerprint)
        assert gets[first + 1:] == [f"{storage.parse_s3(images)[1]}/{new_key}"]
    finally:
        client.meta.events.unregister("before-parameter-build.s3.GetObject", unique_id="test-count-gets")


def test_watch_touches_its_heartbeat_and_alive_fails_when_it_is_stale(source, tracking, monkeypatch, tmp_path):
    """The loop touches the heartbeat at every check and after every image it reads; `retrain alive`
    (the liveness probe) passes while it is fresh and fails when it is old or missing."""
    import os
    import time

    monkeypatch.setattr(watcher.time, "sleep", lambda _s: None)
    heartbeat = tmp_path / "run" / "watch.heartbeat"
    beats = []
    real_beat = watcher.liveness.beat
    monkeypatch.setattr(watcher.liveness, "beat", lambda path: beats.append(path) or real_beat(path))
    images = len(ingest.open_source(str(source), tmp_path, ingest.ZipLimits())[0])
    watcher.watch(str(source), lambda decision: None, interval_s=0, model_name=NAME, max_checks=2,
                  settle_checks=1, heartbeat=heartbeat)
    assert len(beats) >= images + 2 and set(beats) == {heartbeat}

    runner = CliRunner()
    fresh = runner.invoke(app, ["retrain", "alive", "--heartbeat", str(heartbeat), "--max-age", "600"])
    assert fresh.exit_code == 0, fresh.output
    an_hour_ago = time.time() - 3600
    os.utime(heartbeat, (an_hour_ago, an_hour_ago))  # a watcher stuck for an hour
    stale = runner.invoke(app, ["retrain", "alive", "--heartbeat", str(heartbeat), "--max-age", "600"])
    assert stale.exit_code == 1 and "stuck" in stale.output
    missing = runner.invoke(app, ["retrain", "alive", "--heartbeat", str(tmp_path / "none"), "--max-age", "600"])
    assert missing.exit_code == 1 and "no heartbeat" in missing.output


def test_watcher_logs_show_no_tracking_uri_credentials(source, monkeypatch, caplog):
    """MLflow down, its URI holding a user and password: the failed check is logged without them."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cret@127.0.0.1:{port}")
    monkeypatch.setattr(watcher.time, "sleep", lambda _s: None)
    with caplog.at_level("ERROR", logger=watcher.log.name):
        assert watcher.watch(str(source), lambda decision: None, interval_s=0, model_name=NAME, max_checks=1) == 0
    (failure,) = [r.getMessage() for r in caplog.records if "check 1 failed" in r.getMessage()]
    assert "s3cret" not in failure and f"http://***@127.0.0.1:{port}" in failure
