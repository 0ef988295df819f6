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


def test_the_kfp_evaluation_html_escapes_the_gate_text(tmp_path, monkeypatch):
    """The evaluate op's HTML artifact (rendered by the Kubeflow UI) shows the gate's reason and the promise
    as text: markup in them (a model name, a URI, a note) is escaped, never run."""
    from kfp.dsl import HTML, ClassificationMetrics, Metrics

    import components.evaluate
    from pipelines import ops

    reason = 'FAILED: recall 0.91 < 0.95 for <script>alert("x")</script> & champion "v3"'
    statement = "Catches <b>97%</b> of tumors"
    report = EvaluationReport(threshold=0.5, gate={"passed": False, "reason": reason},
                              promise={"statement": statement}, test={"recall": 0.91})
    monkeypatch.setattr(components.evaluate, "evaluate", lambda *args, **kwargs: report)
    page = HTML(name="report", uri=str(tmp_path / "report.html"))
    passed = ops.evaluate_op.python_func(
        model_uri=str(tmp_path / "runs" / "r" / "model"), splits_uri=str(tmp_path / "splits"), target_recall=0.95,
        min_recall=0.9, min_auc=0.9, model_name="brain-tumor", metrics=Metrics(name="m", uri=str(tmp_path / "m")),
        classification=ClassificationMetrics(name="c", uri=str(tmp_path / "c")), report=page)
    text = (tmp_path / "report.html").read_text()
    assert passed is False
    assert "<script>" not in text and "<b>97%</b>" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; champion &quot;v3&quot;" in text
    assert "Catches &lt;b&gt;97%&lt;/b&gt; of tumors" in text
