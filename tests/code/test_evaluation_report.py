"""The run layout's URIs and the evaluation report's file: the contracts other steps and the Kubeflow UI read."""

from __future__ import annotations

import json

import pytest

from brainscan import layout
from brainscan.config import PipelineParams
from brainscan.evaluation_report import FILE_NAME, EvaluationReport


def test_the_run_layout():
    data = layout.dataset_uri("bucket", "pipeline", "ab" * 32)
    assert data == f"s3://bucket/pipeline/dataset/{'ab' * 32}"  # a data version, named by its fingerprint
    assert layout.validation_uri(data, {"min_side": 64}).startswith(f"{data}/validation/")
    assert layout.validation_uri(data, {"min_side": 64}) != layout.validation_uri(data, {"min_side": 32})
    assert layout.splits_uri(data, 42, 0.15, 0.15) == f"{data}/splits/seed42-val0.15-test0.15"
    model = layout.model_uri("bucket", "pipeline", "run-7")
    assert model == "s3://bucket/pipeline/runs/run-7/model"
    assert layout.evaluation_uri(model) == "s3://bucket/pipeline/runs/run-7/evaluation"
    assert layout.folder_of("s3://bucket/a/manifest.csv") == "s3://bucket/a"


def test_a_report_saves_and_loads_as_the_same_json(tmp_path):
    older = {"gate": {"passed": True, "reason": "passed: ..."}, "threshold": 0.25, "test": {"recall": 0.98},
             "champion": None, "threshold_method": "a key of another version"}
    (tmp_path / FILE_NAME).write_text(json.dumps(older))
    report = EvaluationReport.load(str(tmp_path))  # the folder, or the file itself
    assert report.uri == str(tmp_path / FILE_NAME) and report.folder == str(tmp_path)
    assert report.passed and report.threshold == 0.25 and report.thresholds == {}  # absent: empty
    assert report.extra == {"threshold_method": "a key of another version"}
    saved = report.save(tmp_path / "copy")
    again = json.loads((tmp_path / "copy" / FILE_NAME).read_text())
    assert saved == str(tmp_path / "copy" / FILE_NAME)
    assert {k: again[k] for k in older} == older  # nothing lost, nothing renamed
    assert EvaluationReport.load(saved) == report
    assert not EvaluationReport.from_dict({"threshold": 0.5}).passed  # no gate: not passed


@pytest.mark.parametrize("bucket, prefix", [
    ("bucket", "../other"), ("bucket", "a/../b"), ("bucket", "a//b"), ("bucket", "/pipeline"),
    ("bucket", ""), ("bucket", "a/"), ("bucket", "./a"), ("bu..cket", "pipeline"), ("", "pipeline"),
    ("Bucket/x", "pipeline"),
])
def test_bucket_and_prefix_are_checked_in_one_place(bucket, prefix):
    """One check (layout.check_location) behind the config, the CLI (PipelineParams) and the pipeline's
    steps (every layout URI): no `..`, no empty part, no leading `/`."""
    with pytest.raises(ValueError):
        layout.dataset_uri(bucket, prefix, "ab" * 32)
    with pytest.raises(ValueError):
        layout.model_uri(bucket, prefix, "run-1")
    with pytest.raises(ValueError):
        PipelineParams(bucket=bucket, prefix=prefix)


def test_plain_bucket_and_prefix_pass():
    for prefix in ("pipeline", "team-a/pipeline_2", "demo"):
        PipelineParams(bucket="brainscan", prefix=prefix)
        assert layout.model_uri("brainscan", prefix, "r") == f"s3://brainscan/{prefix}/runs/r/model"
