"""The whole KFP pipeline on this machine (kfp.local SubprocessRunner), on synthetic data.

One scenario, in order, sharing one work dir (its own SeaweedFS + MLflow sqlite + model server):
1. the first "retrain if new data" run trains, registers, deploys and answers a v2 request;
2. a second run on unchanged data trains nothing and leaves the champion alone;
3. new images make `retrain.check` say a retrain is due; the next run trains again and its
   model becomes champion exactly when it passes the gate against the old champion.
Small sizes (71x71, 30 images per class) and a pretrained base keep it to a few minutes on
2 cores: like a cluster run from ImageNet weights, the base comes from elsewhere (the session's
`trained_bundle`, trained on another synthetic archive) and the pipeline trains the head, then
fine-tunes the top of the base.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import mlflow
import pytest

from brainscan import labels, storage

from brainscan.local import stack, synth

pytestmark = [pytest.mark.slow]

# A relaxed gate for a tiny model; base_weights: the `synthetic_pretrained_base` fixture.
E2E_PARAMS = dict(image_size=71, epochs=4, fine_tune_epochs=2, batch_size=8, seed=0,
                  patience=4, target_recall=0.95, min_recall=0.8, min_auc=0.8, prefix="e2e")
# The session archive (the pretrained base's data) is synth seed 0: the pipeline's is another.
E2E_ARCHIVE_SEED = 1


@contextlib.contextmanager
def _pipeline_workdir(workdir: Path):
    """Yields workdir; at the end its stack and model server are stopped and the environment restored."""
    from brainscan.local import predictor

    saved = dict(os.environ)
    try:
        yield workdir
    finally:
        predictor.stop(workdir)
        stack.down(workdir)
        os.environ.clear()
        os.environ.update(saved)
        storage.reset_clients()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """One work dir shared by the runs of the retrain scenario."""
    with _pipeline_workdir(tmp_path_factory.mktemp("pipeline_local")) as workdir:
        yield workdir


def _run(source, workdir, base_weights, **overrides):
    from brainscan.config import PipelineParams
    from pipelines.local import run_local

    params = PipelineParams(**{**E2E_PARAMS, "source": str(source), "base_weights": base_weights, **overrides})
    path = run_local(params, workdir, only_if_new_data=True)
    return path, json.loads(Path(path).read_text())


def _champion_version() -> str | None:
    from pipelines.watcher import champion_fingerprint

    return champion_fingerprint("brain-tumor")[1]


def _image_hashes(paths) -> set[str]:
    return {hashlib.sha256(storage.read_bytes(str(path))).hexdigest() for path in paths}


def _add_images(source: Path, scratch: Path, per_class: int = 6) -> int:
    """New scans arrive: different images under new numbers, same layout."""
    extra = synth.generate(scratch, per_class=per_class, seed=7)
    added = 0
    for path in sorted(Path(extra.out_dir).rglob("*")):
        if path.is_file():
            rel = path.relative_to(extra.out_dir).as_posix()
            rel = re.sub(r"\((\d+)\)", lambda m: f"({int(m.group(1)) + 1000})", rel)
            target = source / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            added += 1
    return added


# Three pipeline runs, two of them training, through kfp.local subprocesses: longer than the
# default per-test timeout when the 2 cores are shared with other work.
@pytest.mark.timeout(2400)
def test_local_pipeline_end_to_end_then_retrain_only_on_new_data(local_run, tmp_path, trained_bundle,
                                                                 synthetic_pretrained_base):
    import pandas as pd

    from brainscan.dataset import read_split
    from pipelines.watcher import check

    source = tmp_path / "archive"
    synth.generate(source, per_class=30, seed=E2E_ARCHIVE_SEED)

    # 1. first run: no champion yet -> trains, registers, deploys, one v2 prediction
    path, first = _run(source, local_run, synthetic_pretrained_base)
    # the pretrained base never saw an image the pipeline tests its model on
    base_seen = pd.concat([read_split(trained_bundle.splits, name) for name in ("train", "val")])["path"]
    assert not _image_hashes(read_split(first["splits_uri"], "test")["path"]) & _image_hashes(base_seen)
    assert path == local_run / "runs" / Path(first["pipeline_root"]).name / "summary.json"
    steps = first["steps"]
    for step in ("fingerprint", "champion_fingerprint", "ingest", "validate", "split", "train", "evaluate"):
        assert steps[step]["status"] == "SUCCESS", (step, steps[step])
        assert steps[step]["seconds"] is not None and steps[step]["seconds"] >= 0
    assert first["trained"] is True
    assert first["gate_passed"] is True, f"the e2e model did not pass the relaxed gate: {first['gate']}"
    assert steps["register"]["status"] == "SUCCESS" and steps["deploy"]["status"] == "SUCCESS"
    assert first["model_uri"] == f"models:/brain-tumor/{first['model_version']}"
    assert first["tracking_uri"].startswith("sqlite:///")
    assert 0.0 < first["threshold"] < 1.0
    assert first["metrics"]["recall"] >= E2E_PARAMS["min_recall"]
    assert len(first["dataset_fingerprint"]) == 64
    prediction = first["prediction"]["response"]
    assert prediction["label"] in labels.CLASSES
    assert 0.0 <= prediction["tumor_probability"] <= 1.0
    assert abs(sum(prediction["probabilities"].values()) - 1.0) < 1e-3
    # the deploy step made the served version the champion (registration did not)
    assert _champion_version() == first["champion_version"] == first["model_version"]

    # 2. unchanged data: the fingerprint equals the champion's tag, nothing after the check runs
    assert check(str(source)).retrain is False
    _, second = _run(source, local_run, synthetic_pretrained_base)
    assert second["status"] == "succeeded" and second["trained"] is False
    assert second["dataset_fingerprint"] == first["dataset_fingerprint"]
    for step in ("ingest", "train", "evaluate", "register", "deploy"):
        assert second["steps"][step]["status"] == "SKIPPED", step
    assert _champion_version() == first["model_version"]

    # 3. new images: the check says retrain; the new model replaces the champion only through the gate
    assert _add_images(source, tmp_path / "new") > 0
    decision = check(str(source))
    assert decision.retrain is True and decision.champion_version == first["model_version"]
    # a short retraining: whichever way its gate goes, the checks below hold
    _, third = _run(source, local_run, synthetic_pretrained_base, epochs=2, fine_tune_epochs=0)
    assert third["trained"] is True
    assert third["dataset_fingerprint"] == decision.fingerprint != first["dataset_fingerprint"]
    # each run's data is its own immutable version: the first model's lineage names it, still readable
    assert third["data_uri"] != first["data_uri"] and first["data_uri"].endswith(first["dataset_fingerprint"])
    client = mlflow.MlflowClient(first["tracking_uri"])
    registered_run = client.get_run(client.get_model_version("brain-tumor", first["model_version"]).run_id)
    assert registered_run.data.params["train_data_uri"] == first["data_uri"]
    first_test = read_split(first["splits_uri"], "test")
    assert first["splits_uri"].startswith(first["data_uri"] + "/")
    assert _image_hashes(first_test["path"]) == set(first_test["sha256"])
    champion_rules = [r for r in third["gate"]["rules"] if r["rule"].startswith("champion_")]
    assert champion_rules, "the gate must compare the new model with the champion"
    if third["gate_passed"]:
        assert third["steps"]["register"]["status"] == "SUCCESS"
        assert int(third["model_version"]) == int(first["model_version"]) + 1
        assert _champion_version() == third["champion_version"] == third["model_version"]
        assert check(str(source)).retrain is False
    else:
        assert third["steps"]["register"]["status"] == "SKIPPED" and third["model_uri"] is None
        assert _champion_version() == first["model_version"], "a model that failed the gate must not be champion"


@pytest.mark.realdata
@pytest.mark.timeout(1800)
def test_local_pipeline_on_real_sample(tmp_path, real_sample_dir, synthetic_pretrained_base):
    """The real Kaggle sample through the whole pipeline (small sizes; the gate may pass or not)."""
    from brainscan.config import PipelineParams
    from pipelines.local import run_local

    params = PipelineParams(**{**E2E_PARAMS, "epochs": 2, "fine_tune_epochs": 1, "prefix": "real",
                               "source": str(real_sample_dir), "base_weights": synthetic_pretrained_base})
    with _pipeline_workdir(tmp_path):
        summary = json.loads(Path(run_local(params, tmp_path)).read_text())
    assert summary["status"] == "succeeded" and summary["trained"] is True
    assert summary["steps"]["validate"]["status"] == "SUCCESS"
    assert isinstance(summary["gate_passed"], bool) and summary["metrics"]["roc_auc"] is not None
    assert (summary["model_uri"] is not None) == summary["gate_passed"]
