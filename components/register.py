"""Register a gated model in MLflow: a run with its evidence, a model version, the `champion` alias.

Only a model whose evaluation gate passed is registered. The model is logged as an MLflow
pyfunc (so `mlflow models serve` can serve it: a DataFrame column `image` of base64-encoded
image files in; probabilities, tumor_probability, tumor, label out) whose artifacts hold the
brainscan bundle, with the calibrated threshold written into brainscan_model.json, so that
`brainscan.modelstore.load_bundle("models:/brain-tumor@champion")` works too.

The champion history (versions in the order they became champion) is kept as the registered
model's tag `champion_history`; `rollback(name)` moves `champion` back one step.

Tracking URI: the argument, else $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db.
MLflow is imported inside the functions.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from brainscan import modelstore, storage
from brainscan.labels import CLASSES

log = logging.getLogger(__name__)

DEFAULT_NAME = "brain-tumor"
CHAMPION = "champion"
EXPERIMENT = "brainscan"
HISTORY_TAG = "champion_history"
DEFAULT_WORKDIR = ".brainscan"


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (the message says why)."""


@dataclass
class RegisterResult:
    registered: bool
    name: str
    reason: str
    version: str | None = None
    model_uri: str | None = None  # models:/NAME/VERSION
    champion_uri: str | None = None  # models:/NAME@champion
    run_id: str | None = None
    previous_champion: str | None = None
    threshold: float | None = None
    tracking_uri: str | None = None

    def summary(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- configuration
def default_tracking_uri(workdir: str | Path = DEFAULT_WORKDIR) -> str:
    """The embedded default: a sqlite file in the work dir."""
    return f"sqlite:///{(Path(workdir).resolve() / 'mlflow.db').as_posix()}"


def resolve_tracking_uri(tracking_uri: str | None = None, workdir: str | Path = DEFAULT_WORKDIR) -> str:
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workdir)


def _client(tracking_uri: str | None, workdir: str | Path = DEFAULT_WORKDIR):
    import mlflow
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri, workdir)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _experiment_id(client, uri: str) -> str:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # Next to the database, not ./mlruns under whatever the current directory is.
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(EXPERIMENT, artifact_location=location)


def code_version() -> str:
    """The git commit of the code when it is a checkout, else the package version."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        if sha.returncode == 0 and sha.stdout.strip():
            return sha.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    import brainscan

    return f"brainscan=={brainscan.__version__}"


def pinned_requirements() -> list[str]:
    """Exact versions of what the pyfunc needs, read from this environment (no network)."""
    from importlib import metadata

    pins = []
    for dist in ("mlflow", "keras", "tensorflow", "tensorflow-cpu", "numpy", "pandas", "pillow", "cloudpickle"):
        try:
            pins.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


# ----------------------------------------------------------------------------- the pyfunc model
def _decode_image_field(value) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    try:
        return base64.b64decode(str(value), validate=True)
    except (ValueError, TypeError) as err:
        raise ValueError(f"`image` must hold base64-encoded image files: {err}") from None


try:
    import mlflow.pyfunc as _pyfunc

    _PythonModel = _pyfunc.PythonModel
except ImportError:  # MLflow missing: the class is still importable, registering is not
    _PythonModel = object


class BrainscanPyfunc(_PythonModel):
    """MLflow pyfunc over a brainscan bundle: DataFrame column `image` (base64 files) -> predictions."""

    def load_context(self, context):
        self.bundle = modelstore.load_bundle(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from brainscan.labels import tumor_probability
        from brainscan.preprocessing import preprocess_batch

        if not hasattr(self, "bundle"):
            self.load_context(context)
        if isinstance(model_input, pd.DataFrame):
            if "image" not in model_input.columns:
                raise ValueError(f"expected a column `image`, got {list(model_input.columns)}")
            values = model_input["image"].tolist()
        else:
            values = list(model_input)
        files = [_decode_image_field(v) for v in values]
        probs = modelstore.predict_probabilities(self.bundle, preprocess_batch(files, self.bundle.image_size, **self.bundle.preprocessing))
        tumor_p = tumor_probability(probs)
        return pd.DataFrame({
            "probabilities": [row.astype(float).tolist() for row in probs],
            "tumor_probability": tumor_p.astype(float),
            "tumor": tumor_p >= self.bundle.decision_threshold(),
            "label": [CLASSES[i] for i in np.argmax(probs, axis=1)],
        })


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    inputs = Schema([ColSpec("string", "image")])
    outputs = Schema([ColSpec(Array("double"), "probabilities"), ColSpec("double", "tumor_probability"),
                      ColSpec("boolean", "tumor"), ColSpec("string", "label")])
    return ModelSignature(inputs=inputs, outputs=outputs)


# ----------------------------------------------------------------------------- register
def _evaluation_doc(evaluation) -> tuple[dict, str | None]:
    """(evaluation.json content, the folder URI holding it and the plots) from a URI, result or dict."""
    from brainscan.components.evaluate import EvaluationResult, load_evaluation

    if isinstance(evaluation, EvaluationResult):
        return load_evaluation(evaluation.report_uri), evaluation.out
    if isinstance(evaluation, dict):
        return evaluation, None
    uri = str(evaluation)
    folder = uri.rsplit("/", 1)[0] if uri.endswith(".json") else uri
    return load_evaluation(uri), folder


def _metrics(doc: dict) -> dict[str, float]:
    out = {}
    for split_name in ("validation", "test"):
        for key in ("recall", "precision", "specificity", "f2", "roc_auc", "pr_auc", "accuracy"):
            value = doc.get(split_name, {}).get(key)
            if isinstance(value, (int, float)) and np.isfinite(value):
                out[f"{split_name}_{key}"] = float(value)
    for key in ("recall_ci95", "precision_ci95"):
        interval = doc.get("test", {}).get(key)
        if interval:
            out[f"test_{key}_low"], out[f"test_{key}_high"] = float(interval[0]), float(interval[1])
    for name, values in doc.get("per_class", {}).items():
        if values.get("recall") is not None:
            out[f"test_recall_{name}"] = float(values["recall"])
    out["threshold"] = float(doc["threshold"])
    return out


def _history(client, name: str) -> list[str]:
    try:
        tags = client.get_registered_model(name).tags
    except Exception:  # noqa: BLE001 - no such model yet
        return []
    try:
        return [str(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))]
    except json.JSONDecodeError:
        return []


def _champion_version(client, name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except Exception:  # noqa: BLE001 - MlflowException when the model or alias does not exist
        return None


def register(model, evaluation, name: str = DEFAULT_NAME, pipeline_run: str | None = None,
             tracking_uri: str | None = None, workdir: str | Path = DEFAULT_WORKDIR) -> RegisterResult:
    """Register the bundle at `model` with its evaluation (URI of evaluation.json or its folder,
    an EvaluationResult, or the parsed dict); moves `champion` to the new version."""
    import mlflow

    doc, eval_folder = _evaluation_doc(evaluation)
    gate = doc.get("gate") or {}
    if not gate.get("passed"):
        return RegisterResult(False, name, f"not registered: the evaluation gate did not pass "
                                            f"({gate.get('reason', 'no gate in the evaluation report')})")
    model_uri = model.uri if isinstance(model, modelstore.ModelBundle) else str(model)
    client, uri = _client(tracking_uri, workdir)
    experiment_id = _experiment_id(client, uri)
    fingerprint = doc.get("dataset_fingerprint") or ""
    threshold = float(doc["threshold"])

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = modelstore.fetch_bundle(model_uri)
        bundle_dir = tmp / "bundle"
        bundle_dir.mkdir()
        shutil.copy2(source / modelstore.MODEL_FILE, bundle_dir / modelstore.MODEL_FILE)
        meta = modelstore.read_metadata(source)
        meta.update(threshold=threshold, thresholds=doc.get("thresholds") or None,
                    threshold_source="validation split", target_recall=doc.get("target_recall"),
                    dataset_fingerprint=fingerprint or meta.get("dataset_fingerprint"),
                    evaluation={"gate": gate["reason"], "recall": doc["test"]["recall"],
                                "roc_auc": doc["test"]["roc_auc"]})
        (bundle_dir / modelstore.METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        evidence = tmp / "evaluation"
        if eval_folder is not None:
            storage.download_dir(eval_folder, evidence)
        else:
            evidence.mkdir()
            storage.write_json(str(evidence / "evaluation.json"), doc)

        tags = {"dataset_fingerprint": fingerprint, "pipeline_run": pipeline_run or "",
                "code_version": code_version(), "threshold": f"{threshold:.6g}",
                "thresholds": json.dumps(doc.get("thresholds") or {}), "source_model": model_uri,
                "gate": gate["reason"][:4000]}
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"register-{name}") as run:
            params = {"image_size": meta["image_size"], "target_recall": doc.get("target_recall"),
                      "min_recall": gate.get("min_recall"), "min_auc": gate.get("min_auc"),
                      "tolerance": gate.get("tolerance"), "threshold": threshold, "model_uri": model_uri,
                      "splits": doc.get("splits")}
            params.update({f"train_{k}": v for k, v in meta.items()
                           if isinstance(v, (int, float, str)) and k not in ("image_size", "threshold")})
            mlflow.log_params({k: str(v)[:500] for k, v in params.items() if v is not None})
            mlflow.log_metrics(_metrics(doc))
            mlflow.set_tags({k: v for k, v in tags.items() if k != "gate"})
            mlflow.log_artifacts(str(evidence), artifact_path="evaluation")
            info = mlflow.pyfunc.log_model(
                name="model", python_model=BrainscanPyfunc(), artifacts={"bundle": str(bundle_dir)},
                signature=_signature(), pip_requirements=pinned_requirements(),
                registered_model_name=name, await_registration_for=60)
            run_id = run.info.run_id
        version = str(info.registered_model_version)
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        previous = _champion_version(client, name)
        history = _history(client, name)
        if previous and (not history or history[-1] != previous):
            history.append(previous)  # a champion set outside register(): keep it restorable
        client.set_registered_model_alias(name, CHAMPION, version)
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history + [version]))
    log.info("registered %s version %s (run %s); champion: %s -> %s", name, version, run_id, previous, version)
    return RegisterResult(True, name, f"registered version {version}; champion moved from {previous or 'none'}",
                          version=version, model_uri=f"models:/{name}/{version}",
                          champion_uri=f"models:/{name}@{CHAMPION}", run_id=run_id, previous_champion=previous,
                          threshold=threshold, tracking_uri=uri)


def rollback(name: str = DEFAULT_NAME, tracking_uri: str | None = None,
             workdir: str | Path = DEFAULT_WORKDIR) -> dict:
    """Move `champion` back to the previous champion; returns {name, from_version, to_version}."""
    client, uri = _client(tracking_uri, workdir)
    current = _champion_version(client, name)
    if current is None:
        raise RegistryError(f"{name} has no {CHAMPION} alias in {uri}: nothing to roll back")
    history = _history(client, name)
    while history and history[-1] == current:
        history.pop()
    if not history:
        raise RegistryError(f"{name}: version {current} is the first champion; there is no previous one to restore")
    target = history[-1]
    client.set_registered_model_alias(name, CHAMPION, target)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    client.set_model_version_tag(name, current, "rolled_back_at",
                                 dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    log.info("rolled back %s champion: version %s -> %s", name, current, target)
    return {"name": name, "from_version": current, "to_version": target,
            "champion_uri": f"models:/{name}@{CHAMPION}", "tracking_uri": uri}


def champion_info(name: str = DEFAULT_NAME, tracking_uri: str | None = None,
                  workdir: str | Path = DEFAULT_WORKDIR) -> dict | None:
    """The current champion: version, tags, threshold, model_uri; None when there is none."""
    client, uri = _client(tracking_uri, workdir)
    version = _champion_version(client, name)
    if version is None:
        return None
    mv = client.get_model_version(name, version)
    tags = dict(mv.tags)
    threshold = tags.get("threshold")
    return {"name": name, "version": version, "tags": tags,
            "threshold": float(threshold) if threshold else None,
            "model_uri": f"models:/{name}/{version}", "champion_uri": f"models:/{name}@{CHAMPION}",
            "run_id": mv.run_id, "dataset_fingerprint": tags.get("dataset_fingerprint"),
            "history": _history(client, name), "tracking_uri": uri}


def list_versions(name: str = DEFAULT_NAME, tracking_uri: str | None = None,
                  workdir: str | Path = DEFAULT_WORKDIR) -> list[dict]:
    client, _ = _client(tracking_uri, workdir)
    champion = _champion_version(client, name)
    versions = client.search_model_versions(f"name='{name}'")
    return [{"version": str(v.version), "champion": str(v.version) == champion, "run_id": v.run_id,
             "threshold": v.tags.get("threshold"), "dataset_fingerprint": v.tags.get("dataset_fingerprint"),
             "code_version": v.tags.get("code_version"), "created": v.creation_timestamp}
            for v in sorted(versions, key=lambda v: int(v.version))]
