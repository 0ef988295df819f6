"""validate and split against a real SeaweedFS on loopback: S3 manifests, S3 images, S3 reports."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
from pathlib import Path

import pandas as pd
import pytest

from brainscan import storage
from brainscan.dataset import splits_data_uri, splits_fingerprint
from brainscan.local import synth
from components.split import SPLITS, split
from components.validate import validate
from tests.fixtures.data import build_manifest


def _assert_clean_split(out: str, manifest: pd.DataFrame) -> dict[str, pd.DataFrame]:
    splits = {name: pd.read_csv(io.StringIO(storage.read_text(storage.join(out, f"{name}.csv")))) for name in SPLITS}
    seen: dict[str, str] = {}
    for name, df in splits.items():
        for digest in df["sha256"]:
            assert seen.setdefault(digest, name) == name, f"sha256 {digest} in {seen[digest]} and {name}"
    decodable = manifest["decodable"].astype(str).str.lower().eq("true").sum()
    assert sum(len(df) for df in splits.values()) == decodable
    return splits


def test_validate_and_split_read_and_write_s3(synthetic_archive, s3_prefix):
    """Images and manifest in S3 (uploaded here, without ingest): both steps work on s3:// URIs."""
    root = Path(synthetic_archive.out_dir)
    storage.upload_dir(root, storage.join(s3_prefix, "images"))
    manifest = build_manifest(root)
    manifest["path"] = [storage.join(s3_prefix, "images", Path(p).relative_to(root).as_posix())
                        for p in manifest["path"]]
    storage.write_text(storage.join(s3_prefix, "manifest.csv"), manifest.to_csv(index=False))

    report = storage.join(s3_prefix, "reports")
    result = validate(s3_prefix, report)
    assert result.success, result.failure_message()
    assert storage.read_json(storage.join(report, "validation.json"))["success"] is True
    assert "PASSED" in storage.read_text(storage.join(report, "validation.html"))

    out = storage.join(s3_prefix, "splits")
    split_result = split(s3_prefix, out, seed=3)
    _assert_clean_split(out, manifest)
    assert split_result.exact_duplicates == len(synthetic_archive.duplicates)
    assert storage.read_json(storage.join(out, "split_report.json"))["cross_split_duplicates"] == 0


def test_ingest_validate_split_chain(synthetic_archive, s3_prefix):
    """The real chain: ingest the synthetic archive into SeaweedFS, validate it, split it."""
    ingest_module = pytest.importorskip("components.ingest", reason="components/ingest.py not built yet")
    ingest_module.ingest(synthetic_archive.out_dir, s3_prefix)
    manifest = pd.read_csv(io.StringIO(storage.read_text(storage.join(s3_prefix, "manifest.csv"))))
    assert len(manifest) == synthetic_archive.files

    result = validate(s3_prefix, storage.join(s3_prefix, "reports"))
    assert result.success, result.failure_message()
    assert result.summary()["duplicates"] == len(synthetic_archive.duplicates)

    out = storage.join(s3_prefix, "splits")
    split(s3_prefix, out, seed=42)
    splits = _assert_clean_split(out, manifest)
    assert all(df["path"].str.startswith("s3://").all() for df in splits.values())
    report = json.loads(storage.read_text(storage.join(out, "split_report.json")))
    assert report["cross_split_duplicates"] == 0


def run_data_steps(source: str, bucket: str, prefix: str, workdir: str) -> dict:
    """The pipeline's data steps, as a run executes them: fingerprint, then the KFP components' own
    bodies of ingest -> validate -> split (KFP's artifacts as local files)."""
    from kfp.dsl import HTML, Dataset, Metrics

    from brainscan.config import TEST_FRACTION, VAL_FRACTION
    from components.fingerprint import source_fingerprint
    from pipelines import ops

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    fingerprint = source_fingerprint(source)
    data_uri, ingested = ops.ingest_op.python_func(source=source, bucket=bucket, prefix=prefix,
                                                   source_fingerprint=fingerprint,
                                                   dataset=Dataset(uri=str(work / "dataset.json")))
    ops.validate_op.python_func(data_uri=data_uri, fingerprint=ingested, report=HTML(uri=str(work / "report.html")),
                                metrics=Metrics(uri=str(work / "metrics.json")))
    splits_uri = ops.split_op.python_func(data_uri=data_uri, fingerprint=ingested, val=VAL_FRACTION,
                                          test=TEST_FRACTION, seed=42, splits=Dataset(uri=str(work / "splits.json")))
    return {"fingerprint": fingerprint, "data_uri": data_uri, "splits_uri": splits_uri}


def _source_images(root: Path) -> dict[str, str]:
    """archive path -> sha256 of each image under a source folder."""
    return {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in root.rglob("*") if path.is_file() and path.suffix.lower() in (".jpg", ".jpeg", ".png")}


def _stored_images(rows: pd.DataFrame, data_uri: str) -> dict[str, str]:
    """archive path -> sha256 of the bytes each row's object holds now (read back from the store)."""
    base = storage.join(data_uri, "images") + "/"
    assert all(str(path).startswith(base) for path in rows["path"]), "a row points outside its data version"
    return {str(path)[len(base):]: hashlib.sha256(storage.read_bytes(str(path))).hexdigest() for path in rows["path"]}


def test_two_runs_at_once_on_different_data_keep_both_lineages(synthetic_archive, s3_prefix, tmp_path):
    """Two runs (two processes, as the pipeline's steps are) on different data, same bucket and prefix, at
    once: each run's manifest and split list exactly its own images, with their bytes, afterwards."""
    second = synth.generate(tmp_path / "second", per_class=21, seed=1)  # the same file names, other images
    sources = [Path(synthetic_archive.out_dir), Path(second.out_dir)]
    bucket = storage.parse_s3(s3_prefix)[0]
    context = multiprocessing.get_context("spawn")  # fresh interpreters, like the steps' pods
    with context.Pool(2) as pool:
        runs = pool.starmap(run_data_steps, [(str(root), bucket, "pipeline", str(tmp_path / f"run{n}"))
                                             for n, root in enumerate(sources)])

    assert runs[0]["data_uri"] != runs[1]["data_uri"]
    for root, run in zip(sources, runs):
        expected = _source_images(root)
        assert run["data_uri"].endswith(run["fingerprint"])  # the version names its content
        manifest = pd.read_csv(io.StringIO(storage.read_text(storage.join(run["data_uri"], "manifest.csv"))))
        assert _stored_images(manifest, run["data_uri"]) == expected
        assert set(manifest["sha256"]) == set(expected.values())
        splits = pd.concat([pd.read_csv(io.StringIO(storage.read_text(storage.join(run["splits_uri"], f"{name}.csv"))))
                            for name in SPLITS])
        assert run["splits_uri"].startswith(run["data_uri"] + "/")
        assert _stored_images(splits, run["data_uri"]) == expected  # every image, in one split, its own bytes
        assert splits_data_uri(run["splits_uri"]) == run["data_uri"]  # the lineage a model records
        assert splits_fingerprint(run["splits_uri"]) == run["fingerprint"]

    # KFP's cache semantics: the same inputs give the same outputs, and a rerun changes nothing stored.
    listing = sorted(storage.list_files(runs[0]["data_uri"]))
    assert run_data_steps(str(sources[0]), bucket, "pipeline", str(tmp_path / "rerun")) == runs[0]
    assert sorted(storage.list_files(runs[0]["data_uri"])) == listing
