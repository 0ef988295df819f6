"""`brainscan`: one thin command per pipeline step, over the same functions the KFP components call.

Commands import their stage lazily, so `brainscan --help` stays fast (TensorFlow loads only
for the commands that need it). `--json` makes the last output line a JSON summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def emit_json(summary: dict) -> None:
    """Print a JSON summary as the last output line."""
    typer.echo(json.dumps(summary, sort_keys=True, default=str))


def fail(message: str, code: int = 1) -> None:
    """A one-line error on stderr and a non-zero exit: no traceback for expected failures."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# --------------------------------------------------------------------------- local stack
stack_app = typer.Typer(help="The embedded local stack (SeaweedFS S3 on 127.0.0.1, MLflow on sqlite).",
                        no_args_is_help=True)
app.add_typer(stack_app, name="stack")

WORKDIR_OPTION = typer.Option(Path(".brainscan"), "--workdir", help="Where the stack keeps its data.")


@stack_app.command("up")
def stack_up(workdir: Path = WORKDIR_OPTION) -> None:
    """Start the stack (or reuse the running one); prints `export` lines for eval."""
    from brainscan import stack

    try:
        info = stack.up(workdir)
    except RuntimeError as err:
        fail(str(err))
    typer.echo(info.export_lines())


@stack_app.command("down")
def stack_down(workdir: Path = WORKDIR_OPTION) -> None:
    """Stop the stack and the work dir's local model server (deploy --local); leaves no process behind."""
    from brainscan import stack
    from brainscan.serving import local as local_server

    if local_server.stop(workdir):
        typer.echo("model server stopped", err=True)
    typer.echo("stopped" if stack.down(workdir) else "not running", err=True)


@stack_app.command("status")
def stack_status(workdir: Path = WORKDIR_OPTION) -> None:
    """Say whether the stack runs; exit code 0 when it does, 3 when it does not."""
    from brainscan import stack

    info = stack.status(workdir)
    if info is None:
        typer.echo("not running")
        raise typer.Exit(3)
    typer.echo(f"running: pid {info.pid}, S3 {info.s3_endpoint}, MLflow {info.tracking_uri}")


# --------------------------------------------------------------------------- data (issue: data in)
# synth, ingest, validate, split
data_app = typer.Typer(help="Datasets: the offline synthetic archive.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", help="Folder to write; the archive lands in OUT/Dataset/."),
    per_class: int = typer.Option(40, "--per-class", min=1, help="Images per class (7 classes)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    preview: Optional[Path] = typer.Option(None, "--preview", help="Also write a contact-sheet PNG here."),
    as_json: bool = typer.Option(False, "--json", help="Last output line: a JSON summary."),
) -> None:
    """Write a deterministic synthetic CT/MRI archive in the Kaggle layout (the offline default)."""
    from brainscan import synth

    result = synth.generate(out, per_class=per_class, seed=seed)
    summary = result.summary()
    if preview is not None:
        summary["preview"] = str(synth.preview(preview, seed=seed))
    typer.echo(f"wrote {result.files} images ({result.per_class}) with {len(result.duplicates)} exact duplicates "
               f"to {Path(out) / 'Dataset'}", err=True)
    if as_json:
        emit_json(summary)
    else:
        typer.echo(result.out_dir)


@app.command("ingest")
def ingest_cmd(
    source: str = typer.Option("kaggle:murtozalikhon/brain-tumor-multimodal-image-ct-and-mri", "--source",
                               help="kaggle:OWNER/DATASET[/versions/N], a folder, a .zip file or an s3:// prefix."),
    dest: str = typer.Option(..., "--dest", help="Dataset URI: s3://BUCKET/PREFIX (or a folder)."),
    workers: int = typer.Option(16, "--workers", min=1, help="Parallel read/hash/decode/upload threads."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
    as_json: bool = typer.Option(False, "--json", help="Last output line: a JSON summary."),
) -> None:
    """Copy the archive's images to DEST/images (sha256 in metadata, skips what is there), write DEST/manifest.csv."""
    import logging

    from brainscan.components.ingest import IngestError, ingest

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)  # not "Found credentials..." on every run
    try:
        result = ingest(source, dest, workers=workers, progress=progress)
    except IngestError as err:
        fail(str(err))
    typer.echo(f"ingested {result.files} images ({result.bytes} bytes): {result.uploaded} uploaded, "
               f"{result.skipped} already there, {len(result.undecodable)} undecodable; "
               f"manifest {result.manifest_uri}; fingerprint {result.fingerprint}", err=True)
    summary = {key: getattr(result, key) for key in ("files", "bytes", "uploaded", "skipped", "manifest_uri",
                                                      "fingerprint")}
    if as_json:
        emit_json(summary)
    else:
        typer.echo(result.manifest_uri)


@app.command("validate")
def validate_cmd(
    data: str = typer.Option(..., "--data", help="Dataset URI holding manifest.csv (s3://... or a folder)."),
    report: str = typer.Option(..., "--report", help="Where validation.json / validation.html go (URI or folder)."),
    min_per_class: int = typer.Option(20, "--min-per-class", help="Minimum images in each class."),
    max_class_ratio: float = typer.Option(5.0, "--max-class-ratio", help="Largest class / smallest class, at most."),
    min_side: int = typer.Option(64, "--min-side", help="Smallest image side allowed (px)."),
    max_side: int = typer.Option(4096, "--max-side", help="Largest image side allowed (px)."),
    allow_corrupt: float = typer.Option(0.0, "--allow-corrupt", help="Fraction of undecodable files tolerated."),
    check_files: bool = typer.Option(True, "--check-files/--trust-manifest",
                                     help="Re-read and decode every file (default) or trust the manifest."),
    as_json: bool = typer.Option(False, "--json", help="Last output line: a JSON summary."),
) -> None:
    """Run the great-expectations suite over the manifest; exit 1 naming failed checks and files."""
    import logging

    from brainscan.components.validate import validate

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    try:
        result = validate(data, report, check_files=check_files, min_per_class=min_per_class,
                          max_class_ratio=max_class_ratio, min_side=min_side, max_side=max_side,
                          allow_corrupt=allow_corrupt)
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
    val: float = typer.Option(0.15, "--val", help="Validation fraction."),
    test: float = typer.Option(0.15, "--test", help="Test fraction."),
    seed: int = typer.Option(42, "--seed", help="Same seed, same split."),
    as_json: bool = typer.Option(False, "--json", help="Last output line: a JSON summary."),
) -> None:
    """Stratified train/val/test split; exact and near duplicates always share a split."""
    from brainscan.components.split import split

    try:
        result = split(data, out, val=val, test=test, seed=seed)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    typer.echo(f"split {result.counts} in {result.groups} groups; {result.exact_duplicates} exact and "
               f"{result.near_duplicates} near duplicates kept together; {len(result.excluded)} undecodable left out; "
               f"report {result.report_uri}", err=True)
    if as_json:
        emit_json(result.summary())


# --------------------------------------------------------------------------- model (train, evaluate, register, model rollback)

# train: components/train.py
@app.command("train")
def train_cmd(
    splits: str = typer.Option(..., "--splits", help="URI holding train.csv and val.csv (s3://... or a folder)."),
    out: str = typer.Option(..., "--out", help="Where the model bundle goes (s3://... prefix or a folder)."),
    image_size: int = typer.Option(299, "--image-size", help="Input side in pixels (Xception: 71 or more)."),
    epochs: int = typer.Option(10, "--epochs", help="Stage 1 epochs (head, or whole network from scratch)."),
    fine_tune_epochs: int = typer.Option(5, "--fine-tune-epochs", help="Stage 2 epochs at a low learning rate."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per step (over all GPUs)."),
    base_weights: str = typer.Option("imagenet", "--base-weights",
                                     help="imagenet, none (train from scratch), or a path / s3:// URI of a weights file."),
    seed: int = typer.Option(42, "--seed", help="Same seed, same data order and initialisation."),
    learning_rate: float = typer.Option(1e-3, "--learning-rate", help="Stage 1 learning rate."),
    patience: int = typer.Option(4, "--patience", help="Early stopping patience in epochs (on validation loss)."),
    as_json: bool = typer.Option(False, "--json", help="Last output line: a JSON summary."),
) -> None:
    """Train the Xception classifier on the split manifests; write a model bundle."""
    from brainscan.components.train import TrainingError, train

    try:
        result = train(splits, out, image_size=image_size, epochs=epochs, fine_tune_epochs=fine_tune_epochs,
                       batch_size=batch_size, base_weights=base_weights, seed=seed, learning_rate=learning_rate,
                       patience=patience)
    except (FileNotFoundError, ValueError, TrainingError) as err:
        fail(str(err))
    typer.echo(f"trained {result.epochs_run} epochs in {result.seconds:.0f}s; best epoch {result.best_epoch} "
               f"(val_loss {result.best_val_loss:.4f}, val_acc {result.best_val_accuracy:.3f}); "
               f"bundle {result.out}; curves {result.curves_uri}", err=True)
    if as_json:
        emit_json(result.summary())


# evaluate, register, model rollback/list/info: components/evaluate.py, components/register.py
@app.command("evaluate")
def evaluate_cmd(
    model: str = typer.Option(..., "--model", help="Model bundle: a folder, s3://... or models:/NAME@ALIAS."),
    splits: str = typer.Option(..., "--splits", help="URI holding val.csv and test.csv (s3://... or a folder)."),
    out: str = typer.Option(..., "--out", help="Where evaluation.json, the plots and explanations/ go."),
    target_recall: float = typer.Option(0.99, "--target-recall", help="Recall the threshold must reach on validation."),
    min_recall: float = typer.Option(0.95, "--min-recall", help="Gate: test recall at least this."),
    min_auc: float = typer.Option(0.95, "--min-auc", help="Gate: test ROC-AUC at least this."),
    champion: Optional[str] = typer.Option(None, "--champion",
                                           help="Compare with this model (e.g. models:/brain-tumor@champion); "
                                                "a missing champion means no comparison."),
    tolerance: float = typer.Option(0.02, "--tolerance", help="Gate: how much worse than the champion is allowed."),
    explain: bool = typer.Option(True, "--explain/--no-explain", help="Grad-CAM and LIME images (default on)."),
    fail_on_gate: bool = typer.Option(False, "--fail-on-gate", help="Exit 2 when the gate fails (default: exit 0)."),
    as_json: bool = typer.Option(False, "--json", help="Last output line: a JSON summary."),
) -> None:
    """Recall-first evaluation with a validation-calibrated threshold and a gate; a failed gate is a result."""
    import logging

    from brainscan.components.evaluate import evaluate
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
               f"ROC-AUC {test['roc_auc']:.4f}; gate {result.gate['reason']}; report {result.report_uri}", err=True)
    if as_json:
        emit_json(result.summary())
    if fail_on_gate and not result.passed:
        raise typer.Exit(2)


@app.command("register")
def register_cmd(
    model: str = typer.Option(..., "--model", help="The model bundle that was evaluated."),
    evaluation: str = typer.Option(..., "--evaluation", help="evaluation.json or the folder holding it."),
    name: str = typer.Option("brain-tumor", "--name", help="Registered model name."),
    pipeline_run: Optional[str] = typer.Option(None, "--pipeline-run", help="Pipeline run id, kept as a tag."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri",
                                               help="MLflow (default: $MLFLOW_TRACKING_URI, else sqlite in --workdir)."),
    workdir: Path = typer.Option(Path(".brainscan"), "--workdir", help="Where the default sqlite store lives."),
    as_json: bool = typer.Option(False, "--json", help="Last output line: a JSON summary."),
) -> None:
    """Register a gated model in MLflow and move the `champion` alias to it (refused when the gate failed)."""
    from brainscan.components.register import register
    from brainscan.modelstore import BundleError

    try:
        result = register(model, evaluation, name=name, pipeline_run=pipeline_run, tracking_uri=tracking_uri,
                          workdir=workdir)
    except (FileNotFoundError, ValueError, BundleError) as err:
        fail(str(err))
    typer.echo(result.reason + (f"; {result.champion_uri} -> {result.model_uri}" if result.registered else ""), err=True)
    if as_json:
        emit_json(result.summary())
    if not result.registered:
        fail(result.reason)


model_app = typer.Typer(help="The MLflow model registry: list, info, rollback.", no_args_is_help=True)
app.add_typer(model_app, name="model")
MODEL_NAME_OPTION = typer.Option("brain-tumor", "--name", help="Registered model name.")
TRACKING_OPTION = typer.Option(None, "--tracking-uri", help="MLflow (default: $MLFLOW_TRACKING_URI, else sqlite in --workdir).")
REGISTRY_WORKDIR_OPTION = typer.Option(Path(".brainscan"), "--workdir", help="Where the default sqlite store lives.")


@model_app.command("rollback")
def model_rollback(name: str = MODEL_NAME_OPTION, tracking_uri: Optional[str] = TRACKING_OPTION,
                   workdir: Path = REGISTRY_WORKDIR_OPTION, as_json: bool = typer.Option(False, "--json")) -> None:
    """Move the `champion` alias back to the previous champion version."""
    from brainscan.components.register import RegistryError, rollback

    try:
        result = rollback(name, tracking_uri=tracking_uri, workdir=workdir)
    except RegistryError as err:
        fail(str(err))
    typer.echo(f"{name} champion: version {result['from_version']} -> {result['to_version']}", err=True)
    if as_json:
        emit_json(result)


@model_app.command("info")
def model_info(name: str = MODEL_NAME_OPTION, tracking_uri: Optional[str] = TRACKING_OPTION,
               workdir: Path = REGISTRY_WORKDIR_OPTION) -> None:
    """The current champion (version, threshold, tags) as JSON; exit 3 when there is none."""
    from brainscan.components.register import champion_info

    info = champion_info(name, tracking_uri=tracking_uri, workdir=workdir)
    if info is None:
        typer.echo(f"{name} has no champion", err=True)
        raise typer.Exit(3)
    emit_json(info)


@model_app.command("list")
def model_list(name: str = MODEL_NAME_OPTION, tracking_uri: Optional[str] = TRACKING_OPTION,
               workdir: Path = REGISTRY_WORKDIR_OPTION) -> None:
    """Every version of the model, oldest first, the champion marked."""
    from brainscan.components.register import list_versions

    for row in list_versions(name, tracking_uri=tracking_uri, workdir=workdir):
        typer.echo(f"{row['version']:>4} {'*' if row['champion'] else ' '} threshold={row['threshold']} "
                   f"code={str(row['code_version'])[:12]} data={str(row['dataset_fingerprint'])[:12]}")


# --------------------------------------------------------------------------- serving (serve, predict, deploy)

# serve, predict: serving/server.py, serving/client.py
@app.command("serve")
def serve_cmd(
    model: str = typer.Option(..., "--model", help="Model bundle: models:/brain-tumor@champion, s3://... or a folder."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 only inside a container)."),
    http_port: int = typer.Option(8080, "--http-port", "--port", help="v2 REST port."),
    grpc_port: int = typer.Option(8081, "--grpc-port", help="v2 gRPC port."),
    no_grpc: bool = typer.Option(False, "--no-grpc", help="Serve REST only."),
    threshold: Optional[float] = typer.Option(None, "--threshold", min=0.0, max=1.0,
                                              help="Decision threshold, overriding the model's calibrated one."),
    max_batch_size: int = typer.Option(32, "--max-batch-size", min=1, help="Most images per batched model call."),
    max_latency_ms: float = typer.Option(5.0, "--max-latency-ms", min=0.0,
                                         help="Longest wait for a batch to fill, in milliseconds."),
    max_queue: int = typer.Option(1024, "--max-queue", min=1, help="Images allowed to wait; beyond that 503."),
    max_images: int = typer.Option(64, "--max-images", min=1, help="Images allowed in one request."),
    max_image_bytes: int = typer.Option(20 * 1024 * 1024, "--max-image-bytes", min=1, help="Bytes of one image file."),
    max_pixels: int = typer.Option(40_000_000, "--max-pixels", min=1, help="Width x height of one image."),
    max_request_bytes: int = typer.Option(64 * 1024 * 1024, "--max-request-bytes", min=1,
                                          help="Largest REST body / gRPC message."),
) -> None:
    """Run the KServe model server (v2 REST + gRPC) for the model `brain-tumor`."""
    import logging

    from brainscan.serving.server import ServeOptions, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    options = ServeOptions(model_uri=model, host=host, http_port=http_port, grpc_port=grpc_port,
                           enable_grpc=not no_grpc, threshold=threshold, max_batch_size=max_batch_size,
                           max_latency_ms=max_latency_ms, max_queue=max_queue, max_images=max_images,
                           max_image_bytes=max_image_bytes, max_pixels=max_pixels,
                           max_request_bytes=max_request_bytes)
    try:
        run(options)
    except (ValueError, FileNotFoundError) as err:  # BundleError, missing threshold
        fail(str(err))


@app.command("predict")
def predict_cmd(
    images: list[Path] = typer.Argument(..., exists=True, dir_okay=False, help="Image files (JPEG, PNG)."),
    url: str = typer.Option("http://127.0.0.1:8080", "--url", help="Model server base URL."),
    as_json: bool = typer.Option(False, "--json", help="Last output line: a JSON list of results."),
) -> None:
    """Send images to a model server; print class, tumor probability and decision per image."""
    from brainscan.serving.client import ServerError, predict

    try:
        results = predict(url, images)
    except ServerError as err:
        fail(str(err))
    except OSError as err:
        fail(f"cannot reach {url}: {err}")
    for result in results:
        decision = "TUMOR" if result["tumor"] else "no tumor"
        typer.echo(f"{result['image']}\t{result['label']}\tP(tumor)={result['tumor_probability']:.4f}\t{decision}")
    if as_json:
        emit_json(results)


# deploy: components/deploy.py (InferenceService on a cluster, or the local model server)
@app.command("deploy")
def deploy_cmd(
    model: str = typer.Option(..., "--model", help="Model to serve: models:/brain-tumor@champion, s3://... or a path."),
    namespace: str = typer.Option("kubeflow-user", "--namespace", help="Kubernetes namespace of the InferenceService."),
    name: str = typer.Option("brain-tumor", "--name", help="InferenceService name."),
    canary: Optional[int] = typer.Option(None, "--canary", min=1, max=100,
                                         help="Send only this percent of traffic to the new model (canary rollout)."),
    local: bool = typer.Option(False, "--local", help="(Re)start the local model server instead of a cluster deploy."),
    workdir: Path = typer.Option(Path(".brainscan"), "--workdir", help="Local server state (with --local)."),
    timeout: float = typer.Option(600, "--timeout", help="Seconds to wait for Ready before rolling back."),
    image: Optional[str] = typer.Option(None, "--image", help="Serving image (default: $BRAINSCAN_SERVING_IMAGE)."),
    gpus: int = typer.Option(1, "--gpus", min=0, help="GPUs per predictor replica (0: CPU only)."),
    min_replicas: int = typer.Option(1, "--min-replicas", min=0, help="Fewest predictor replicas."),
    max_replicas: int = typer.Option(3, "--max-replicas", min=1, help="Most predictor replicas."),
    kubeconfig: Optional[Path] = typer.Option(None, "--kubeconfig",
                                              help="Kubeconfig (default: $KUBECONFIG, ~/.kube/config or in-cluster)."),
    poll_interval: float = typer.Option(5.0, "--poll-interval", help="Seconds between status polls.", hidden=True),
    as_json: bool = typer.Option(False, "--json", help="Last output line: a JSON summary."),
) -> None:
    """Deploy a model: create or patch the KServe InferenceService and wait until Ready (rolls back if
    it is not Ready in time), or with --local (re)start the local model server."""
    import logging

    from brainscan.components.deploy import deploy

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = deploy(model, namespace=namespace, name=name, canary_percent=canary, local=local,
                        timeout_s=timeout, image=image, gpus=gpus, kubeconfig=kubeconfig,
                        poll_interval_s=poll_interval, workdir=workdir, min_replicas=min_replicas,
                        max_replicas=max_replicas)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        fail(str(err).splitlines()[0])
    typer.echo(result.message, err=True)
    if as_json:
        emit_json(result.summary())
    if not result.ready:
        fail("deploy failed: " + result.message)


# --------------------------------------------------------------------------- pipeline (pipeline run/compile/upload/submit/schedule, demo, retrain)
pipeline_app = typer.Typer(help="The KFP pipeline: run it locally, compile it, upload/submit/schedule it on Kubeflow.",
                           no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")
retrain_app = typer.Typer(help="Automated retraining: retrain when the data changed.", no_args_is_help=True)
app.add_typer(retrain_app, name="retrain")

# Pipeline parameters shared by `pipeline run` and `pipeline submit` (defaults = the pipeline's defaults).
_P_SOURCE = typer.Option(..., "--source", help="Images: a folder, a .zip, s3://BUCKET/PREFIX or kaggle:OWNER/DATASET.")
_P_IMAGE_SIZE = typer.Option(299, "--image-size", min=71, help="Square input size (Xception accepts 71 and up).")
_P_EPOCHS = typer.Option(10, "--epochs", min=1, help="Epochs with the base frozen.")
_P_FINE_TUNE = typer.Option(5, "--fine-tune-epochs", min=0, help="Epochs fine-tuning the top of the base.")
_P_BATCH = typer.Option(32, "--batch-size", min=1, help="Batch size.")
_P_WEIGHTS = typer.Option("imagenet", "--base-weights",
                          help="imagenet, a local .h5/.keras weights file, or none (train from scratch).")
_P_SEED = typer.Option(42, "--seed", help="Split and training seed.")
_P_PATIENCE = typer.Option(4, "--patience", min=1, help="Early stopping patience in epochs (validation loss).")
_P_TARGET = typer.Option(0.99, "--target-recall", help="Recall the threshold is calibrated for (validation split).")
_P_MIN_RECALL = typer.Option(0.95, "--min-recall", help="Gate: lowest test recall to register and deploy.")
_P_MIN_AUC = typer.Option(0.95, "--min-auc", help="Gate: lowest test ROC-AUC to register and deploy.")
_P_MODEL = typer.Option("brain-tumor", "--model-name", help="MLflow registered model name.")
_P_BUCKET = typer.Option("brainscan", "--bucket", help="S3 bucket for the pipeline's data and models.")
_P_IF_NEW = typer.Option(False, "--retrain-if-new-data",
                         help="Use the retrain pipeline: does nothing when the champion saw this very data.")


def _pipeline_arguments(**values) -> dict:
    return {key: value for key, value in values.items() if value is not None}


@pipeline_app.command("run")
def pipeline_run(
    source: str = _P_SOURCE,
    local: bool = typer.Option(False, "--local", help="Run on this machine through kfp.local (required for now)."),
    workdir: Path = typer.Option(Path(".brainscan"), "--workdir", help="Local stack, pipeline root, summary.json."),
    image_size: int = _P_IMAGE_SIZE, epochs: int = _P_EPOCHS, fine_tune_epochs: int = _P_FINE_TUNE,
    batch_size: int = _P_BATCH, base_weights: str = _P_WEIGHTS, seed: int = _P_SEED, patience: int = _P_PATIENCE,
    target_recall: float = _P_TARGET, min_recall: float = _P_MIN_RECALL, min_auc: float = _P_MIN_AUC,
    model_name: str = _P_MODEL, bucket: str = _P_BUCKET,
    prefix: str = typer.Option("local", "--prefix", help="Prefix in the bucket."),
    if_new_data: bool = _P_IF_NEW,
) -> None:
    """Run the KFP pipeline locally end to end; the last line printed is the path of summary.json."""
    import logging

    from brainscan.pipelines.local import LocalRunParams, run_local

    if not local:
        fail("only local runs start here: add --local, or use `brainscan pipeline submit --host URL` for a cluster")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = LocalRunParams(image_size=image_size, epochs=epochs, fine_tune_epochs=fine_tune_epochs,
                            batch_size=batch_size, base_weights=base_weights, seed=seed, patience=patience,
                            target_recall=target_recall,
                            min_recall=min_recall, min_auc=min_auc, model_name=model_name, bucket=bucket,
                            prefix=prefix)
    try:
        summary_path = run_local(source, workdir, params, only_if_new_data=if_new_data)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        fail(str(err).splitlines()[0])
    _print_run_summary(summary_path)
    typer.echo(summary_path)


def _print_run_summary(summary_path: Path) -> None:
    from brainscan.pipelines.local import STEP_ORDER

    summary = json.loads(Path(summary_path).read_text())
    for step in [name for name in STEP_ORDER if name in summary["steps"]]:  # the DAG's order
        record = summary["steps"][step]
        seconds = f"{record['seconds']:.1f}s" if record.get("seconds") is not None else "-"
        typer.echo(f"  {step:<22}{record['status']:<10}{seconds}", err=True)
    if summary.get("model_uri"):
        typer.echo(f"registered {summary['model_uri']} (tracking {summary['tracking_uri']}), "
                   f"served at {summary.get('served_url')}", err=True)
    elif summary.get("trained"):
        typer.echo(f"gate not passed: nothing registered ({(summary.get('gate') or {}).get('reason', '')})", err=True)
    else:
        typer.echo("no training: the champion was trained on this data", err=True)
    if isinstance(summary.get("prediction"), dict) and summary["prediction"].get("response"):
        response = summary["prediction"]["response"]
        typer.echo(f"v2 prediction for {summary['prediction']['image']}: {response.get('label')} "
                   f"P(tumor)={response.get('tumor_probability', float('nan')):.3f}", err=True)


@pipeline_app.command("compile")
def pipeline_compile(
    out: Path = typer.Option(..., "--out", help="Pipeline YAML to write (upload it in the Kubeflow UI)."),
    retrain: bool = typer.Option(False, "--retrain-if-new-data", help="Compile the retrain-if-new-data pipeline."),
) -> None:
    """Compile the pipeline to YAML. Images: $BRAINSCAN_PIPELINE_IMAGE / $BRAINSCAN_PIPELINE_GPU_IMAGE."""
    from brainscan.pipelines.pipeline import compile_pipeline

    out.parent.mkdir(parents=True, exist_ok=True)
    typer.echo(compile_pipeline(out, "retrain" if retrain else "train"))


_HOST = typer.Option(..., "--host", help="KFP API endpoint, e.g. http://ml-pipeline.kubeflow.svc.cluster.local:8888.")
_NAMESPACE = typer.Option(None, "--namespace", help="Kubeflow profile namespace (multi-user installs).")


@pipeline_app.command("upload")
def pipeline_upload(
    host: str = _HOST,
    version: Optional[str] = typer.Option(None, "--version", help="Version name (default: a timestamp)."),
    retrain: bool = typer.Option(False, "--retrain-if-new-data", help="Upload the retrain-if-new-data pipeline."),
    namespace: Optional[str] = _NAMESPACE,
    as_json: bool = typer.Option(False, "--json", help="Last output line: a JSON summary."),
) -> None:
    """Upload the pipeline (a new version when it exists already)."""
    from brainscan.pipelines import kfp_client

    try:
        result = kfp_client.upload(host, which="retrain" if retrain else "train", version=version, namespace=namespace)
    except Exception as err:  # connection refused, auth, API errors: one line, no traceback
        fail(f"upload to {host} failed: {str(err).splitlines()[0]}")
    typer.echo(f"uploaded version {result.name} ({result.version_id}) of pipeline {result.pipeline_id}", err=True)
    if as_json:
        emit_json(result.summary())


@pipeline_app.command("submit")
def pipeline_submit(
    host: str = _HOST,
    source: Optional[str] = typer.Option(None, "--source", help="Images (default: the pipeline's default source)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=71), epochs: Optional[int] = typer.Option(None, "--epochs", min=1),
    fine_tune_epochs: Optional[int] = typer.Option(None, "--fine-tune-epochs", min=0),
    base_weights: Optional[str] = typer.Option(None, "--base-weights"),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=0, help="GPUs for training."),
    canary_percent: Optional[int] = typer.Option(None, "--canary-percent", min=0, max=100),
    retrain: bool = _P_IF_NEW,
    run_name: Optional[str] = typer.Option(None, "--run-name"),
    namespace: Optional[str] = _NAMESPACE,
    as_json: bool = typer.Option(False, "--json", help="Last output line: a JSON summary."),
) -> None:
    """Start one run on the cluster."""
    from brainscan.pipelines import kfp_client

    arguments = _pipeline_arguments(source=source, image_size=image_size, epochs=epochs,
                                    fine_tune_epochs=fine_tune_epochs, base_weights=base_weights, gpus=gpus,
                                    canary_percent=canary_percent)
    try:
        result = kfp_client.submit(host, arguments, which="retrain" if retrain else "train", run_name=run_name,
                                   namespace=namespace)
    except Exception as err:
        fail(f"submit to {host} failed: {str(err).splitlines()[0]}")
    typer.echo(f"started run {result.run_id} ({result.name})", err=True)
    if as_json:
        emit_json(result.summary())


@pipeline_app.command("schedule")
def pipeline_schedule(
    host: str = _HOST,
    cron: str = typer.Option("0 0 3 * * *", "--cron", help="When: cron with seconds first (5 fields also accepted)."),
    source: Optional[str] = typer.Option(None, "--source", help="Images to watch (default: the pipeline's)."),
    always: bool = typer.Option(False, "--always-train",
                                help="Schedule the full training pipeline (default: retrain only if new data)."),
    name: Optional[str] = typer.Option(None, "--name", help="Recurring run name."),
    namespace: Optional[str] = _NAMESPACE,
    as_json: bool = typer.Option(False, "--json", help="Last output line: a JSON summary."),
) -> None:
    """Create a recurring run (max_concurrency=1, no catch-up)."""
    from brainscan.pipelines import kfp_client

    try:
        result = kfp_client.schedule(host, cron, _pipeline_arguments(source=source),
                                     which="train" if always else "retrain", name=name, namespace=namespace)
    except ValueError as err:
        fail(str(err))
    except Exception as err:
        fail(f"schedule on {host} failed: {str(err).splitlines()[0]}")
    typer.echo(f"recurring run {result.recurring_run_id} ({result.name}) on '{cron}'", err=True)
    if as_json:
        emit_json(result.summary())


@app.command("demo")
def demo(
    workdir: Path = typer.Option(Path(".brainscan-demo"), "--workdir", help="Everything the demo writes goes here."),
    per_class: int = typer.Option(30, "--per-class", min=20, help="Synthetic images per class."),
    image_size: int = typer.Option(71, "--image-size", min=71, help="Input size (small: it runs on a laptop CPU)."),
    epochs: int = typer.Option(10, "--epochs", min=1), fine_tune_epochs: int = typer.Option(2, "--fine-tune-epochs", min=0),
    min_recall: float = typer.Option(0.80, "--min-recall", help="Gate for the demo's tiny model."),
    min_auc: float = typer.Option(0.80, "--min-auc", help="Gate for the demo's tiny model."),
) -> None:
    """The whole local stack end to end on an offline synthetic dataset, then one v2 prediction."""
    import logging

    from brainscan import synth
    from brainscan.pipelines.local import LocalRunParams, run_local

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    workdir = workdir.resolve()
    typer.echo(f"1/2 writing a synthetic CT/MRI archive ({per_class} images per class) ...", err=True)
    data = synth.generate(workdir / "synthetic", per_class=per_class, seed=0)
    typer.echo(f"2/2 running the pipeline locally (image size {image_size}, {epochs}+{fine_tune_epochs} epochs) ...",
               err=True)
    params = LocalRunParams(image_size=image_size, epochs=epochs, fine_tune_epochs=fine_tune_epochs, batch_size=8,
                            base_weights="none", patience=epochs, target_recall=0.95, min_recall=min_recall, min_auc=min_auc,
                            prefix="demo")
    try:
        summary_path = run_local(str(data.out_dir), workdir, params)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        fail(str(err).splitlines()[0])
    _print_run_summary(summary_path)
    summary = json.loads(summary_path.read_text())
    typer.echo(f"synthetic data   {data.out_dir}\nS3 (SeaweedFS)   {summary.get('data_uri')}\n"
               f"MLflow           {summary['tracking_uri']}\nmodel            {summary.get('model_uri')}\n"
               f"model server     {summary.get('served_url')}\nstop the stack   brainscan stack down --workdir {workdir}"
               f" (and its model server)", err=True)
    typer.echo(summary_path)


def _mlflow_env(workdir: Path) -> None:
    """Use the local stack's MLflow/S3 when the environment names none."""
    import os

    from brainscan import stack

    if os.environ.get("MLFLOW_TRACKING_URI"):
        return
    info = stack.status(workdir)
    if info is None:
        fail("MLFLOW_TRACKING_URI is not set and no local stack runs in "
             f"{workdir}: export the cluster's settings or run `brainscan stack up --workdir {workdir}`")
    os.environ.update(info.env())


@retrain_app.command("check")
def retrain_check(
    source: str = _P_SOURCE,
    model_name: str = _P_MODEL,
    workdir: Path = typer.Option(Path(".brainscan"), "--workdir", help="Local stack to use when no MLflow is set."),
    as_json: bool = typer.Option(False, "--json", help="Last output line: a JSON summary."),
) -> None:
    """Is a retrain due? Compares the source's dataset fingerprint with the champion's tag (exit 0 either way)."""
    from brainscan.pipelines.retrain import check

    _mlflow_env(workdir)
    try:
        decision = check(source, model_name=model_name)
    except Exception as err:  # bad source, MLflow unreachable
        fail(str(err).splitlines()[0])
    typer.echo(("retrain due: " if decision.retrain else "up to date: ") + decision.message)
    if as_json:
        emit_json(decision.summary())


@retrain_app.command("watch")
def retrain_watch(
    source: str = _P_SOURCE,
    interval: float = typer.Option(300, "--interval", min=1, help="Seconds between checks."),
    host: Optional[str] = typer.Option(None, "--host", help="Submit a cluster run here (else run locally)."),
    workdir: Path = typer.Option(Path(".brainscan"), "--workdir", help="Local runs: the work dir."),
    model_name: str = _P_MODEL,
    max_checks: Optional[int] = typer.Option(None, "--max-checks", min=1, help="Stop after this many checks."),
    image_size: int = _P_IMAGE_SIZE, epochs: int = _P_EPOCHS, fine_tune_epochs: int = _P_FINE_TUNE,
    base_weights: str = _P_WEIGHTS,
) -> None:
    """Check on an interval; when the data changed, submit a run (--host) or run the pipeline locally."""
    import logging

    from brainscan.pipelines import retrain

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if host is None:
        from brainscan import stack

        stack.up(workdir)
    _mlflow_env(workdir)

    def start_run(decision) -> None:
        if host:
            from brainscan.pipelines import kfp_client

            result = kfp_client.submit(host, {"source": source}, which="retrain")
            typer.echo(f"submitted run {result.run_id}", err=True)
        else:
            from brainscan.pipelines.local import LocalRunParams, run_local

            params = LocalRunParams(image_size=image_size, epochs=epochs, fine_tune_epochs=fine_tune_epochs,
                                    base_weights=base_weights, model_name=model_name)
            try:
                typer.echo(run_local(source, workdir, params, only_if_new_data=True))
            except RuntimeError as err:  # a failed run is logged; the watch goes on
                typer.echo(f"run failed: {str(err).splitlines()[0]}", err=True)

    started = retrain.watch(source, start_run, interval_s=interval, model_name=model_name, max_checks=max_checks)
    typer.echo(f"{started} run(s) started", err=True)



if __name__ == "__main__":
    app()
