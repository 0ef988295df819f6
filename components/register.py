"""Register a gated model in MLflow: a run with its evidence, a model version, the `candidate` alias.

Only a model whose evaluation gate passed is registered. It is logged as the brainscan MLflow
pyfunc (brainscan/pyfunc.py: what MLServer, `mlflow models serve` and batch scoring load),
carrying its own code and pinned requirements, with the bundle as its artifact and the
calibrated decision thresholds written into the bundle's brainscan_model.json, so that
`brainscan.modelstore.load_bundle("models:/brain-tumor/7")` works too.

Registration does not move `champion`: the deploy step does, once the new version serves
(components/deploy.py), so that the registry and what is served never disagree.

The registered bundle also carries model.onnx, converted and checked against Keras here, once
(brainscan/onnx_export.py: a version whose ONNX model disagrees is not registered), and the
sha256 of its files (brainscan.bundle.digest), written into the bundle and kept as the
version's tag `bundle_sha256`: every load checks it.

Order matters when MLflow fails half-way: the run, its evidence and the logged model come
first (tracking only); the registry changes last (new version, its tags, then the alias). A
failure before that leaves the registry as it was; a failure after the version was created
removes that version again when MLflow still answers, unless an alias points at it by then
(a version that may be served is never deleted).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np

import brainscan
from brainscan import bundle, pyfunc, registry, storage
from brainscan.config import CANDIDATE_ALIAS, CHAMPION_ALIAS, DEFAULT_WORKDIR, MODEL_NAME, champion_uri, version_uri
from brainscan.evaluation_report import EvaluationReport
from brainscan.modelstore import ModelBundle, fetch_checked_bundle
from brainscan.onnx_export import export_onnx
from brainscan.redact import redact

log = logging.getLogger(__name__)


@dataclass
class RegisterResult:
    registered: bool
    name: str
    reason: str
    version: str | None = None
    model_uri: str | None = None  # models:/NAME/VERSION
    champion_uri: str | None = None  # models:/NAME@champion
    run_id: str | None = None
    champion: str | None = None  # the champion's version, unchanged by registration
    threshold: float | None = None
    tracking_uri: str | None = None  # as shown: without the user and password it may hold

    def summary(self) -> dict:
        return asdict(self)


def code_version() -> str:
    """The git commit of the code when it is a checkout, else the package version."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        if sha.returncode == 0 and sha.stdout.strip():
            return sha.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"brainscan=={brainscan.__version__}"


def _report(evaluation) -> EvaluationReport:
    """The evaluation report from a report, the URI of evaluation.json or its folder, or the parsed dict."""
    if isinstance(evaluation, EvaluationReport):
        return evaluation
    if isinstance(evaluation, dict):
        return EvaluationReport.from_dict(evaluation)
    return EvaluationReport.load(str(evaluation))


def _metrics(report: EvaluationReport) -> dict[str, float]:
    out = {}
    for split_name in ("validation", "test"):
        for key in ("recall", "precision", "specificity", "f2", "roc_auc", "pr_auc", "accuracy"):
            value = getattr(report, split_name).get(key)
            if isinstance(value, (int, float)) and np.isfinite(value):
                out[f"{split_name}_{key}"] = float(value)
    for key in ("recall_ci95", "precision_ci95"):
        interval = report.test.get(key)
        if interval:
            out[f"test_{key}_low"], out[f"test_{key}_high"] = float(interval[0]), float(interval[1])
    for name, values in report.per_class.items():
        if values.get("recall") is not None:
            out[f"test_recall_{name}"] = float(values["recall"])
    out["threshold"] = float(report.threshold)
    return out


def _stage_bundle(model_uri: str, report: EvaluationReport, folder: Path) -> tuple[dict, str]:
    """The bundle as it is registered: the model, its checked ONNX form, metadata with the calibrated
    thresholds, and the sha256 of all of it last; (metadata, sha256)."""
    source = fetch_checked_bundle(model_uri)
    folder.mkdir()
    shutil.copy2(source / bundle.MODEL_FILE, folder / bundle.MODEL_FILE)
    meta = bundle.read_metadata(source)
    meta.update(threshold=float(report.threshold), thresholds=report.thresholds or None,
                threshold_source="validation split", target_recall=report.target_recall,
                dataset_fingerprint=report.dataset_fingerprint or meta.get("dataset_fingerprint"),
                evaluation={"gate": report.gate["reason"], "recall": report.test["recall"],
                            "roc_auc": report.test["roc_auc"]})
    meta["onnx"] = export_onnx(folder, int(meta["image_size"]))  # OnnxExportError: not registered
    bundle.write_metadata(folder, meta)
    return meta, bundle.write_digest(folder)


def _log_run(experiment_id: str, name: str, model_uri: str, report: EvaluationReport, meta: dict, tags: dict,
             bundle_dir: Path, evidence: Path, code_dir: Path) -> tuple[str, str]:
    """The run with its parameters, metrics, evidence and the logged pyfunc; (run id, logged model URI)."""
    gate = report.gate
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"register-{name}") as run:
        params = {"image_size": meta["image_size"], "target_recall": report.target_recall,
                  "min_recall": gate.get("min_recall"), "min_auc": gate.get("min_auc"),
                  "tolerance": gate.get("tolerance"), "threshold": report.threshold, "model_uri": model_uri,
                  "splits": report.splits}
        params.update({f"train_{k}": v for k, v in meta.items()
                       if isinstance(v, (int, float, str)) and k not in ("image_size", "threshold")})
        mlflow.log_params({k: str(v)[:500] for k, v in params.items() if v is not None})
        mlflow.log_metrics(_metrics(report))
        mlflow.set_tags({k: v for k, v in tags.items() if k != "gate"})
        mlflow.log_artifacts(str(evidence), artifact_path="evaluation")
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(pyfunc.ENTRY_FILE), artifacts={"bundle": str(bundle_dir)},
            code_paths=[str(code_dir)], signature=pyfunc.signature(),
            pip_requirements=pyfunc.pinned_requirements())
        return run.info.run_id, info.model_uri


def register(model, evaluation, name: str = MODEL_NAME, pipeline_run: str | None = None,
             tracking_uri: str | None = None, workdir: str | Path = DEFAULT_WORKDIR) -> RegisterResult:
    """Register the bundle at `model` with its evaluation (URI of evaluation.json or its folder,
    an EvaluationReport, or the parsed dict); the new version gets the alias `candidate`, and
    `champion` stays where it is until a deploy of the new version serves.

    Raises registry.RegistryUnavailable when MLflow stops answering; the registry is then as it was.
    """
    report = _report(evaluation)
    gate = report.gate or {}
    if not report.passed:
        return RegisterResult(False, name, f"not registered: the evaluation gate did not pass "
                                            f"({gate.get('reason', 'no gate in the evaluation report')})")
    model_uri = model.uri if isinstance(model, ModelBundle) else str(model)
    client, uri = registry.connect(tracking_uri, workdir)
    fingerprint = report.dataset_fingerprint or ""
    threshold = float(report.threshold)
    tags = {"dataset_fingerprint": fingerprint, "pipeline_run": pipeline_run or "", "code_version": code_version(),
            "threshold": f"{threshold:.6g}", "thresholds": json.dumps(report.thresholds or {}),
            "source_model": model_uri, "gate": gate["reason"][:4000]}
    version = None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        meta, tags[registry.DIGEST_TAG] = _stage_bundle(model_uri, report, tmp / "bundle")
        evidence = tmp / "evaluation"
        if report.folder is not None:  # the report with its plots and explanations
            storage.download_dir(report.folder, evidence)
        else:
            evidence.mkdir()
            report.save(evidence)
        code_dir = pyfunc.code_package(tmp / "code")
        try:
            experiment_id = registry.experiment_id(client, uri)
            champion = registry.champion_version(client, name)  # read only: registration leaves it where it is
            run_id, logged_uri = _log_run(experiment_id, name, model_uri, report, meta, tags, tmp / "bundle",
                                          evidence, code_dir)
            # The registry changes from here on.
            version = str(mlflow.register_model(logged_uri, name, await_registration_for=60).version)
            for key, value in tags.items():
                client.set_model_version_tag(name, version, key, value)
            registry.mark_candidate(client, name, version)  # the last change: nothing can fail after it
        except Exception as err:
            if version is not None:
                _withdraw(client, name, version)
            if registry.is_unreachable(err):
                raise registry.RegistryUnavailable(uri, err) from None  # MLflow's error repeats the URL
            raise
    log.info("registered %s version %s (run %s) as %s; champion stays %s", name, version, run_id, CANDIDATE_ALIAS,
             champion)
    return RegisterResult(True, name, f"registered version {version} as {CANDIDATE_ALIAS}; {CHAMPION_ALIAS} stays at "
                                      f"{'version ' + champion if champion else 'none'} until version {version} is "
                                      f"deployed and serving",
                          version=version, model_uri=version_uri(name, version),
                          champion_uri=champion_uri(name), run_id=run_id, champion=champion,
                          threshold=threshold, tracking_uri=redact(uri))


def _withdraw(client, name: str, version: str) -> None:
    """Remove a version whose registration did not finish (best effort: MLflow may be gone).

    Never one that an alias points at: something promoted it meanwhile, and deleting a version
    deletes its aliases too (the champion would vanish from under what serves it).
    """
    try:
        aliases = registry.aliases_of(client, name, version)
        if aliases:
            log.error("registration of %s version %s did not finish, but %s points at it by now: the version is "
                      "kept", name, version, ", ".join(sorted(aliases)))
            return
        client.delete_model_version(name, version)
        log.warning("registration of %s version %s did not finish: the version was removed again", name, version)
    except Exception as err:  # noqa: BLE001 - the original error is what the caller must hear
        log.error("registration of %s version %s did not finish and the version could not be removed (%s): "
                  "delete it by hand unless an alias points at it", name, version,
                  redact(str(err).splitlines()[0])[:200])

