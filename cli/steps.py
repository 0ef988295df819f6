"""One command per pipeline step: ingest, validate, split, train, evaluate, register, deploy.

Each calls the same step function as its KFP component (components/) and imports it when it
runs, so `brainscan --help` stays fast (TensorFlow, MLflow, kserve and great-expectations take
seconds to import).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

import typer

from brainscan import config
from brainscan.config import DEFAULT_WORKDIR, MODEL_NAME, VALIDATION, ValidationLimits
from cli.common import (JSON_OPTION, MODEL_NAME_OPTION, PRESET_OPTION, TRACKING_OPTION, WORKDIR_OPTION, emit_json,
                        fail, pipeline_params, setting, with_settings)


app = typer.Typer()  # its commands join the root command (cli/app.py)


@app.command("ingest")
def ingest_cmd(
    source: str = setting("source"),
    dest: str = typer.Option(..., "--dest", help="Dataset URI: s3://BUCKET/PREFIX (or a folder)."),
    workers: int = typer.Option(config.IO_WORKERS, "--workers", min=1, help="Parallel read/hash/decode/upload threads."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Copy the archive's images to DEST/images (sha256 in metadata, skips what is there), write DEST/manifest.csv."""
    from components.ingest import IngestError, ingest  # lazy: see the module docstring

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)  # not "Found credentials..." on every run
    try:
        result = ingest(source, dest, workers=workers, progress=progress)
    except IngestError as err:
        fail(str(err))
    typer.echo(f"ingested {result.files} images ({result.bytes} bytes): {result.uploaded} uploaded, "
               f"{result.skipped} already there, {len(result.undecodable)} undecodable, "
               f"{len(result.rejected)} refused (too big or a symbolic link); "
               f"manifest {result.manifest_uri}; fingerprint {result.fingerprint}", err=True)
    summary = {key: getattr(result, key) for key in ("files", "bytes", "uploaded", "skipped", "manifest_uri",
                                                      "fingerprint", "rejected")}
    if as_json:
        emit_json(summary)
    else:
        typer.echo(result.manifest_uri)


@app.command("validate")
@with_settings(ValidationLimits)
def validate_cmd(
    given: dict,
    data: str = typer.Option(..., "--data", help="Dataset URI holding manifest.csv (s3://... or a folder)."),
    report: str = typer.Option(..., "--report", help="Where validation.json / validation.html go (URI or folder)."),
    check_files: bool = typer.Option(True, "--check-files/--trust-manifest",
                                     help="Re-read and decode every file (default) or trust the manifest."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Run the great-expectations suite over the manifest; exit 1 naming failed checks and files."""
    from components.validate import validate  # lazy: see the module docstring

    limits = dataclasses.asdict(dataclasses.replace(VALIDATION, **given))
    try:
        result = validate(data, report, check_files=check_files, **limits)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    typer.echo(f"validation {'passed' if result.success else 'FAILED'}: {result.rows} images, "
               f"{len(result.expectations) - len(result.failed)}/{len(result.expectations)} expectations met, "
               f"{result.summary()['duplicates']} exact duplicates; report {result.report_html}", err=True)
    if as_json:
        emit_json(result.summary())
    if not result.success:
        fail("validation failed:\n" + result.failure_message())


@app.command("split")
def split_cmd(
    data: str = typer.Option(..., "--data", help="Dataset URI holding manifest.csv (s3://... or a folder)."),
    out: str = typer.Option(..., "--out", help="Where train.csv, val.csv, test.csv and split_report.json go."),
    val: float = typer.Option(config.VAL_FRACTION, "--val", help="Validation fraction."),
    test: float = typer.Option(config.TEST_FRACTION, "--test", help="Test fraction."),
    seed: int = setting("seed"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Stratified train/val/test split; exact and near duplicates always share a split."""
    from components.split import split  # lazy: see the module docstring

    try:
        result = split(data, out, val=val, test=test, seed=seed)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    typer.echo(f"split {result.counts} in {result.groups} groups; {result.exact_duplicates} exact and "
               f"{result.near_duplicates} near duplicates kept together; {len(result.excluded)} undecodable left out; "
               f"report {result.report_uri}", err=True)
    if as_json:
        emit_json(result.summary())


@app.command("train")
@with_settings(config.Recipe)
def train_cmd(
    given: dict,
    splits: str = typer.Option(..., "--splits", help="URI holding train.csv and val.csv (s3://... or a folder)."),
    out: str = typer.Option(..., "--out", help="Where the model bundle goes (s3://... prefix or a folder)."),
    preset: Optional[str] = PRESET_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Train the Xception classifier on the split manifests; write a model bundle."""
    from components.train import TrainingError, train  # lazy: loads TensorFlow

    params = pipeline_params(preset, given)
    try:
        result = train(splits, out, params.recipe)
    except (FileNotFoundError, ValueError, TrainingError) as err:
        fail(str(err))
    typer.echo(f"trained {result.epochs_run} epochs in {result.seconds:.0f}s; best epoch {result.best_epoch} "
               f"(val_loss {result.best_val_loss:.4f}, val_acc {result.best_val_accuracy:.3f}); "
               f"bundle {result.out}; curves {result.curves_uri}", err=True)
    if as_json:
        emit_json(result.summary())


@app.command("evaluate")
def evaluate_cmd(
    model: str = typer.Option(..., "--model", help="Model bundle: a folder, s3://... or models:/NAME@ALIAS."),
    splits: str = typer.Option(..., "--splits", help="URI holding val.csv and test.csv (s3://... or a folder)."),
    out: str = typer.Option(..., "--out", help="Where evaluation.json, the plots and explanations/ go."),
    target_recall: float = setting("target_recall"), min_recall: float = setting("min_recall"),
    min_auc: float = setting("min_auc"),
    champion: Optional[str] = typer.Option(None, "--champion",
                                           help=f"Compare with this model (e.g. {config.CHAMPION_URI}); "
                                                "a missing champion means no comparison."),
    tolerance: float = typer.Option(config.CHAMPION_TOLERANCE, "--tolerance",
                                    help="Gate: how much worse than the champion is allowed."),
    explain: bool = typer.Option(True, "--explain/--no-explain", help="Grad-CAM and LIME images (default on)."),
    fail_on_gate: bool = typer.Option(False, "--fail-on-gate", help="Exit 2 when the gate fails (default: exit 0)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Recall-first evaluation with a validation-calibrated threshold and a gate; a failed gate is a result."""
    # lazy: loads TensorFlow
    from components.evaluate import evaluate
    from brainscan.modelstore import BundleError
    from brainscan.preprocessing import InvalidImageError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = evaluate(model, splits, out, target_recall=target_recall, min_recall=min_recall, min_auc=min_auc,
                          champion=champion, tolerance=tolerance, explain=explain)
    except (FileNotFoundError, ValueError, BundleError, InvalidImageError) as err:
        fail(str(err))
    test = result.test
    typer.echo(f"threshold {result.threshold:.4g} (validation, target recall {target_recall}); test recall "
               f"{test['recall']:.4f} {test['recall_ci95']}, precision {test['precision']:.4f} {test['precision_ci95']}, "
               f"ROC-AUC {test['roc_auc']:.4f}; gate {result.gate['reason']}; report {result.uri}", err=True)
    typer.echo(result.promise["statement"], err=True)
    if as_json:
        emit_json(result.summary())
    if fail_on_gate and not result.passed:
        raise typer.Exit(2)


@app.command("register")
def register_cmd(
    model: str = typer.Option(..., "--model", help="The model bundle that was evaluated."),
    evaluation: str = typer.Option(..., "--evaluation", help="evaluation.json or the folder holding it."),
    name: str = MODEL_NAME_OPTION,
    pipeline_run: Optional[str] = typer.Option(None, "--pipeline-run", help="Pipeline run id, kept as a tag."),
    tracking_uri: Optional[str] = TRACKING_OPTION,
    workdir: Path = WORKDIR_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Register a gated model in MLflow as the `candidate` (refused when the gate failed); `champion` moves
    when a deploy of it serves."""
    # lazy: loads MLflow and TensorFlow
    from components.register import register
    from brainscan.modelstore import BundleError
    from brainscan.registry import RegistryError

    try:
        result = register(model, evaluation, name=name, pipeline_run=pipeline_run, tracking_uri=tracking_uri,
                          workdir=workdir)
    except (FileNotFoundError, ValueError, BundleError, RegistryError) as err:
        fail(str(err).splitlines()[0])
    typer.echo(result.reason + (f"; deploy it with --model {result.model_uri}" if result.registered else ""), err=True)
    if as_json:
        emit_json(result.summary())
    if not result.registered:
        fail(result.reason)


@app.command("deploy")
def deploy_cmd(
    model: str = typer.Option(..., "--model", help=f"Model to serve: {config.CHAMPION_URI}, s3://... or a path."),
    namespace: str = setting("namespace"),
    name: str = typer.Option(MODEL_NAME, "--name", help="InferenceService name."),
    canary: Optional[int] = typer.Option(None, "--canary", min=1, max=100,
                                         help="Send only this percent of traffic to the new model (canary rollout)."),
    local: bool = typer.Option(False, "--local", help="(Re)start the local model server instead of a cluster deploy."),
    workdir: Path = typer.Option(Path(DEFAULT_WORKDIR), "--workdir", help="Local server state (with --local); the sqlite registry when no "
                                                                  "--tracking-uri or $MLFLOW_TRACKING_URI."),
    timeout: float = setting("timeout_s", config.DeploySettings, flag="--timeout"),
    image: Optional[str] = typer.Option(None, "--image", help="Serving image (default: $BRAINSCAN_SERVING_IMAGE)."),
    gpus: int = setting("serving_gpus", flag="--gpus"),
    deployment_mode: str = setting("deployment_mode"),
    gpu_node_selection: Optional[bool] = typer.Option(
        None, "--gpu-node-selection/--no-gpu-node-selection", show_default="RawDeployment: yes, Serverless: no",
        help="GPU node selector and toleration on a GPU predictor. A stock Knative refuses them: turn on its "
             "podspec flags first (infra/k8s/knative/) for Serverless."),
    min_replicas: int = setting("min_replicas", config.DeploySettings),
    max_replicas: int = setting("max_replicas", config.DeploySettings),
    kubeconfig: Optional[Path] = typer.Option(None, "--kubeconfig",
                                              help="Kubeconfig (default: $KUBECONFIG, ~/.kube/config or in-cluster)."),
    poll_interval: float = setting("poll_interval_s", config.DeploySettings, flag="--poll-interval", hidden=True),
    promote: bool = typer.Option(True, "--promote/--no-promote",
                                 help="Move `champion` to a pinned version (models:/NAME/VERSION) once it serves all "
                                      "traffic; the version must be registered."),
    tracking_uri: Optional[str] = TRACKING_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Deploy a model: create or patch the KServe InferenceService and wait until Ready (rolls back if
    it is not Ready in time), or with --local (re)start the local model server; then a pinned
    registered version becomes the champion."""
    from components.deploy import deploy  # lazy: loads kserve

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = deploy(model, namespace=namespace, name=name, canary_percent=canary, local=local,
                        timeout_s=timeout, image=image, gpus=gpus, kubeconfig=kubeconfig,
                        poll_interval_s=poll_interval, workdir=workdir, min_replicas=min_replicas,
                        max_replicas=max_replicas, deployment_mode=deployment_mode,
                        gpu_node_selection=gpu_node_selection, promote=promote, tracking_uri=tracking_uri)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        fail(str(err).splitlines()[0])
    typer.echo(result.message, err=True)
    if as_json:
        emit_json(result.summary())
    if not result.ready:
        fail("deploy failed: " + result.message)
