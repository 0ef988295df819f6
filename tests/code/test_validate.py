"""Validate: the great-expectations suite passes on good data and names what is wrong otherwise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cli import app
from components.validate import validate, validate_manifest
from brainscan.labels import CLASSES
from tests.fixtures.data import build_manifest


@pytest.fixture(scope="module")
def good_manifest(synthetic_archive, tmp_path_factory) -> Path:
    """The synthetic archive's manifest (paths point into the read-only fixture archive)."""
    dest = tmp_path_factory.mktemp("good_manifest")
    build_manifest(synthetic_archive.out_dir, dest)
    return dest


def _failed(outcomes) -> dict[str, list[str]]:
    return {o.name: o.offending for o in outcomes if not o.success}


def test_synthetic_archive_passes_and_writes_reports(good_manifest, synthetic_archive, tmp_path):
    result = validate(str(good_manifest), str(tmp_path / "report"))
    assert result.success, result.failure_message()
    assert result.per_class == {c: 30 for c in CLASSES}
    assert result.summary()["duplicates"] == len(synthetic_archive.duplicates)
    assert result.quarantine_csv is None and not (tmp_path / "report" / "quarantine.csv").exists()
    report = json.loads((tmp_path / "report" / "validation.json").read_text())
    assert report["success"] is True and len(report["expectations"]) == len(result.expectations) >= 15
    assert len(report["duplicates"]["groups"]) == len(synthetic_archive.duplicates)
    html = (tmp_path / "report" / "validation.html").read_text()
    assert "PASSED" in html and "no label conflicts" in html and "Exact duplicates" in html


def test_corrupt_file_fails_is_named_and_quarantined_not_dropped(synthetic_archive, tmp_path):
    archive = tmp_path / "archive"
    shutil.copytree(synthetic_archive.out_dir, archive)
    victim = archive / "Dataset" / "Brain Tumor MRI images" / "Tumor" / "glioma (4).jpg"
    victim.write_bytes(victim.read_bytes()[:300])  # a truncated download
    build_manifest(archive, tmp_path / "data")

    result = validate(str(tmp_path / "data"), str(tmp_path / "report"))
    assert not result.success
    failed = _failed(result.expectations)
    assert failed["every file decodes"] == [str(victim)]
    assert str(victim) in result.failure_message()
    quarantine = pd.read_csv(tmp_path / "report" / "quarantine.csv")
    assert quarantine["path"].tolist() == [str(victim)]
    assert victim.exists(), "quarantine lists files, it never deletes them"
    assert "FAILED" in (tmp_path / "report" / "validation.html").read_text()

    # the CLI exits non-zero, naming the expectation and the file
    cli = CliRunner().invoke(app, ["validate", "--data", str(tmp_path / "data"), "--report", str(tmp_path / "r2")])
    assert cli.exit_code == 1
    assert "every file decodes" in cli.stderr and "glioma (4).jpg" in cli.stderr
    assert "quarantine" in cli.stderr


def test_stale_manifest_is_caught_by_rereading_files(good_manifest, synthetic_archive, tmp_path):
    """The manifest says decodable, but the stored bytes changed since ingest."""
    manifest = pd.read_csv(good_manifest / "manifest.csv")
    copy = tmp_path / "Dataset" / "Brain Tumor CT scan Images" / "Healthy" / "ct_healthy (2).jpg"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(b"not an image at all")
    manifest.loc[manifest["path"].str.endswith("ct_healthy (2).jpg"), "path"] = str(copy)
    outcomes, _, _ = validate_manifest(manifest)
    failed = _failed(outcomes)
    assert failed["every file decodes"] == [str(copy)]
    assert failed["file bytes match the manifest sha256"] == [str(copy)]


def test_wrong_label_and_label_conflict(good_manifest):
    manifest = pd.read_csv(good_manifest / "manifest.csv")
    paths = manifest["path"].tolist()
    wrong = next(p for p in paths if p.endswith("pituitary (2).jpg"))
    manifest.loc[manifest["path"] == wrong, "class7"] = "mri_glioma"  # label disagrees with the path
    # same bytes under two labels: a ct_healthy image also filed as ct_tumor
    healthy = manifest[manifest["path"].str.endswith("ct_healthy (1).jpg")].iloc[0]
    conflict = healthy.copy()
    conflict["path"] = healthy["path"].replace("Healthy/ct_healthy (1).jpg", "Tumor/ct_tumor (1).jpg")
    conflict["class7"], conflict["tumor"] = "ct_tumor", 1
    manifest = manifest[manifest["path"] != conflict["path"]]
    manifest = pd.concat([manifest, conflict.to_frame().T], ignore_index=True)

    outcomes, _, _ = validate_manifest(manifest, check_files=False)
    failed = _failed(outcomes)
    assert failed["class7 agrees with the path"] == [wrong]
    assert failed["no label conflicts (same sha256, two labels)"] == sorted([healthy["path"], conflict["path"]])
    assert "every file decodes" not in failed


def test_unknown_class_and_modality(good_manifest):
    manifest = pd.read_csv(good_manifest / "manifest.csv")
    row = manifest.index[0]
    manifest.loc[row, ["class7", "modality"]] = ["xray_healthy", "xray"]
    failed = _failed(validate_manifest(manifest, check_files=False)[0])
    path = manifest.loc[row, "path"]
    for name in ("class7 in the 7 classes", "modality in ct/mri", "class7 agrees with the path",
                 "modality agrees with the path", "tumor flag agrees with class7"):
        assert failed[name] == [path], name


def test_thresholds_class_count_balance_and_size(good_manifest):
    manifest = pd.read_csv(good_manifest / "manifest.csv")
    # drop most mri_tumor images: below the minimum and out of balance
    keep = (manifest["class7"] != "mri_tumor") | manifest["path"].str.contains(r"tumor \([1-5]\)\.", regex=True)
    small = manifest[keep]
    failed = _failed(validate_manifest(small, check_files=False, min_per_class=10, max_class_ratio=3,
                                       min_side=128)[0])
    assert failed["each class at least 10 images"] == ["mri_tumor"]
    assert failed["class balance: largest class at most 3x each class"] == ["mri_tumor"]
    assert failed["smaller side at least 128 px"], "the phantoms go down to 96 px"
    assert set(failed) == {"each class at least 10 images", "class balance: largest class at most 3x each class",
                           "smaller side at least 128 px"}


def test_bad_input_clear_errors(good_manifest, tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest"):
        validate(str(tmp_path / "nothing"), str(tmp_path / "r"))
    manifest = pd.read_csv(good_manifest / "manifest.csv").drop(columns=["sha256"])
    with pytest.raises(ValueError, match="lacks column.*sha256"):
        validate_manifest(manifest)
    cli = CliRunner().invoke(app, ["validate", "--data", str(tmp_path / "nothing"), "--report", str(tmp_path / "r")])
    assert cli.exit_code == 1 and "no manifest" in cli.stderr


def test_validation_and_serving_share_one_pixel_limit():
    """Issue 17: serving allowed 40 Mpx per image while validation's largest side allowed 16.7 Mpx;
    both now come from brainscan.limits, so what training may hold is what serving accepts."""
    from brainscan import limits
    from brainscan.config import VALIDATION, ServeSettings

    assert VALIDATION.max_side ** 2 == ServeSettings().max_pixels == limits.MAX_IMAGE_PIXELS


def test_a_report_on_a_file_that_is_no_image_is_the_same_bytes_every_run(tmp_path):
    """The reason a file does not decode names no Python object address: a rerun of validate on the same
    data version writes the same report (write-once) instead of failing on other bytes."""
    from tests.fixtures.ingest import write_tree

    archive = write_tree(tmp_path / "archive")
    next(archive.rglob("glioma (1).jpg")).write_bytes(b"not an image")
    build_manifest(archive, tmp_path / "data")
    first = validate(str(tmp_path / "data"), str(tmp_path / "report"), once=True)
    validate(str(tmp_path / "data"), str(tmp_path / "report"), once=True)  # raised ImmutableObjectError
    assert len(first.corrupt) == 1 and " at 0x" not in (tmp_path / "report" / "validation.json").read_text()
