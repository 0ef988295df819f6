"""`brainscan`: one thin command per pipeline step, over the same functions the KFP components call.

Options that set a pipeline parameter or a server setting are built from brainscan.config
(`PipelineParams`, `ServeSettings`, `ValidationLimits`): their defaults and help are written
there once. Each command imports its stage when it runs, so `brainscan --help` stays fast
(TensorFlow, MLflow, kserve and great-expectations take seconds to import). `--json` makes
the last output line a JSON summary.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Optional

import typer

from brainscan import config
from brainscan.config import (DEFAULT_WORKDIR, DEFAULTS, DEMO_WORKDIR, MODEL_NAME, PRESETS, VALIDATION,
                              PipelineParams, ServeSettings, ValidationLimits)

app = typer.Typer(help=__doc__.split("\n\n")[0], no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=False)


def emit_json(summary) -> None:
    """Print a JSON summary as the last output line."""
    typer.echo(json.dumps(summary, sort_keys=True, default=str))


def fail(message: str, code: int = 1) -> None:
    """A one-line error on stderr and a non-zero exit: no traceback for expected failures."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# --------------------------------------------------------------------------- options from brainscan.config
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def setting(name: str, cls=PipelineParams, default=dataclasses.MISSING, flag: str | None = None, **extra):
    """A typer option for one field of a config dataclass: its default and help come from the field."""
    field = config.param_field(name, cls)
    limits = {k: field.metadata[k] for k in ("min", "max") if k in field.metadata}
    value = field.default if default is dataclasses.MISSING else default
    return typer.Option(value, flag or _flag(name), help=field.metadata["help"], **limits, **extra)


def with_settings(cls=PipelineParams, names: tuple[str, ...] | None = None):
    """Give a command one option per field of `cls` (or `names`), each defaulting to "not given".

    The command receives the values that were given as `given: dict`; the help shows the real default.
    """
    fields = [f for f in dataclasses.fields(cls) if names is None or f.name in names]
    types = config.param_types(cls)

    def decorate(command):
        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.name != "given"]
        extra = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[types[f.name]],
                                   default=typer.Option(None, _flag(f.name), help=f.metadata["help"],
                                                        show_default=str(f.default),
                                                        **{k: f.metadata[k] for k in ("min", "max") if k in f.metadata}))
                 for f in fields]

        @functools.wraps(command)
        def wrapper(**kwargs):
            given = {f.name: kwargs.pop(f.name) for f in fields}
            return command(given={k: v for k, v in given.items() if v is not None}, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=own + extra)
        return wrapper

    return decorate


def _params(preset: str | None, given: dict) -> PipelineParams:
    try:
        return config.preset(preset).replace(**given)
    except ValueError as err:
        fail(str(err))


JSON_OPTION = typer.Option(False, "--json", help="Last output line: a JSON summary.")
WORKDIR_OPTION = typer.Option(Path(DEFAULT_WORKDIR), "--workdir", help="Where the local stack keeps its data.")
PRESET_OPTION = typer.Option(None, "--preset", help=f"Start from a named parameter set: {', '.join(PRESETS)} "
                                                    "(cluster defaults: gpu); options given override it.")
TRACKING_OPTION = typer.Option(None, "--tracking-uri",
                               help="MLflow (default: $MLFLOW_TRACKING_URI, else sqlite in --workdir).")
MODEL_NAME_OPTION = typer.Option(MODEL_NAME, "--name", help="Registered model name.")


# --------------------------------------------------------------------------- local stack
stack_app = typer.Typer(help="The embedded local stack (SeaweedFS S3 on 127.0.0.1, MLflow on sqlite).",
                        no_args_is_help=True)
app.add_typer(stack_app, name="stack")


@stack_app.command("up")
def stack_up(workdir: Path = WORKDIR_OPTION) -> None:
    """Start the stack (or reuse the running one); prints `export` lines for eval."""
    from brainscan.local import stack  # lazy: see the module docstring

    try:
        info = stack.up(workdir)
    except RuntimeError as err:
        fail(str(err))
    typer.echo(info.export_lines())


@stack_app.command("down")
def stack_down(workdir: Path = WORKDIR_OPTION) -> None:
    """Stop the stack and the work dir's local model server (deploy --local); leaves no process behind."""
    from brainscan.local import predictor, stack  # lazy: see the module docstring

    if predictor.stop(workdir):
        typer.echo("model server stopped", err=True)
    typer.echo("stopped" if stack.down(workdir) else "not running", err=True)


@stack_app.command("status")
def stack_status(workdir: Path = WORKDIR_OPTION) -> None:
    """Say whether the stack runs; exit code 0 when it does, 3 when it does not."""
    from brainscan.local import stack  # lazy: see the module docstring

    info = stack.status(workdir)
    if info is None:
        typer.echo("not running")
        raise typer.Exit(3)
    typer.echo(f"running: pid {info.pid}, S3 {info.s3_endpoint}, MLflow {info.tracking_uri}")


# --------------------------------------------------------------------------- data: synth, ingest, validate, split
data_app = typer.Typer(help="Datasets: the offline synthetic archive.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", help="Folder to write; the archive lands in OUT/Dataset/."),
    per_class: int = typer.Option(40, "--per-class", min=1, help="Images per class (7 classes)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    preview: Optional[Path] = typer.Option(None, "--preview", help="Also write a contact-sheet PNG here."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Write a deterministic synthetic CT/MRI archive in the Kaggle layout (the offline default)."""
    from brainscan.local import synth  # lazy: see the module docstring

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
               f"{result.skipped} already there, {len(result.undecodable)} undecodable; "
               f"manifest {result.manifest_uri}; fingerprint {result.fingerprint}", err=True)
    summary = {key: getattr(result, key) for key in ("files", "bytes", "uploaded", "skipped", "manifest_uri",
                                                      "fingerprint")}
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


# --------------------------------------------------------------------------- model: train, evaluate, register
@app.command("train")
@with_settings(names=config.TRAIN_PARAMS)
def train_cmd(
    given: dict,
    splits: str = typer.Option(..., "--splits", help="URI holding train.csv and val.csv (s3://... or a folder)."),
    out: str = typer.Option(..., "--out", help="Where the model bundle goes (s3://... prefix or a folder)."),
    preset: Optional[str] = PRESET_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Train the Xception classifier on the split manifests; write a model bundle."""
    from components.train import TrainingError, train  # lazy: loads TensorFlow

    params = _params(preset, given)
    try:
        result = train(splits, out, **{name: getattr(params, name) for name in config.TRAIN_PARAMS})
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
    tolerance: float = typer.Option(0.02, "--tolerance", help="Gate: how much worse than the champion is allowed."),
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
               f"ROC-AUC {test['roc_auc']:.4f}; gate {result.gate['reason']}; report {result.report_uri}", err=True)
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
    """Register a gated model in MLflow and move the `champion` alias to it (refused when the gate failed)."""
    # lazy: loads MLflow and TensorFlow
    from components.register import register
    from brainscan.modelstore import BundleError
    from brainscan.registry import RegistryError

    try:
        result = register(model, evaluation, name=name, pipeline_run=pipeline_run, tracking_uri=tracking_uri,
                          workdir=workdir)
    except (FileNotFoundError, ValueError, BundleError, RegistryError) as err:
        fail(str(err).splitlines()[0])
    typer.echo(result.reason + (f"; {result.champion_uri} -> {result.model_uri}" if result.registered else ""), err=True)
    if as_json:
        emit_json(result.summary())
    if not result.registered:
        fail(result.reason)


model_app = typer.Typer(help="The MLflow model registry: list, info, rollback.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("rollback")
def model_rollback(name: str = MODEL_NAME_OPTION, tracking_uri: Optional[str] = TRACKING_OPTION,
                   workdir: Path = WORKDIR_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Move the `champion` alias back to the previous champion version."""
    from brainscan.registry import RegistryError, rollback  # lazy: loads MLflow

    try:
        result = rollback(name, tracking_uri=tracking_uri, workdir=workdir)
    except RegistryError as err:
        fail(str(err))
    typer.echo(f"{name} champion: version {result['from_version']} -> {result['to_version']}", err=True)
    if as_json:
        emit_json(result)


@model_app.command("info")
def model_info(name: str = MODEL_NAME_OPTION, tracking_uri: Optional[str] = TRACKING_OPTION,
               workdir: Path = WORKDIR_OPTION) -> None:
    """The current champion (version, threshold, tags) as JSON; exit 3 when there is none."""
    from brainscan.registry import champion_info  # lazy: loads MLflow

    info = champion_info(name, tracking_uri=tracking_uri, workdir=workdir)
    if info is None:
        typer.echo(f"{name} has no champion", err=True)
        raise typer.Exit(3)
    emit_json(info)


@model_app.command("list")
def model_list(name: str = MODEL_NAME_OPTION, tracking_uri: Optional[str] = TRACKING_OPTION,
               workdir: Path = WORKDIR_OPTION) -> None:
    """Every version of the model, oldest first, the champion marked."""
    from brainscan.registry import list_versions  # lazy: loads MLflow

    for row in list_versions(name, tracking_uri=tracking_uri, workdir=workdir):
        typer.echo(f"{row['version']:>4} {'*' if row['champion'] else ' '} threshold={row['threshold']} "
                   f"code={str(row['code_version'])[:12]} data={str(row['dataset_fingerprint'])[:12]}")


# --------------------------------------------------------------------------- serving: serve, predict, deploy
@app.command("serve")
@with_settings(ServeSettings)
def serve_cmd(
    given: dict,
    model: str = typer.Option(..., "--model", help="Model bundle: models:/brain-tumor@champion, s3://... or a folder."),
    no_grpc: bool = typer.Option(False, "--no-grpc", help="Serve REST only."),
    threshold: Optional[float] = typer.Option(None, "--threshold", min=0.0, max=1.0,
                                              help="Decision threshold, overriding the model's calibrated ones."),
) -> None:
    """Run the KServe model server (v2 REST + gRPC) for the model `brain-tumor`."""
    from serving.server import ServeOptions, run  # lazy: loads kserve and TensorFlow

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    options = ServeOptions(model_uri=model, threshold=threshold, enable_grpc=not no_grpc, **given)
    try:
        run(options)
    except (ValueError, FileNotFoundError) as err:  # BundleError, missing threshold
        fail(str(err))


@app.command("predict")
def predict_cmd(
    images: list[Path] = typer.Argument(..., exists=True, dir_okay=False, help="Image files (JPEG, PNG)."),
    url: str = typer.Option(f"http://127.0.0.1:{ServeSettings.http_port}", "--url", help="Model server base URL."),
    as_json: bool = typer.Option(False, "--json", help="Last output line: a JSON list of results."),
) -> None:
    """Send images to a model server; print class, tumor probability and decision per image."""
    from serving.client import ServerError, predict  # lazy: see the module docstring

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


@app.command("deploy")
def deploy_cmd(
    model: str = typer.Option(..., "--model", help=f"Model to serve: {config.CHAMPION_URI}, s3://... or a path."),
    namespace: str = setting("namespace"),
    name: str = typer.Option(MODEL_NAME, "--name", help="InferenceService name."),
    canary: Optional[int] = typer.Option(None, "--canary", min=1, max=100,
                                         help="Send only this percent of traffic to the new model (canary rollout)."),
    local: bool = typer.Option(False, "--local", help="(Re)start the local model server instead of a cluster deploy."),
    workdir: Path = typer.Option(Path(DEFAULT_WORKDIR), "--workdir", help="Local server state (with --local)."),
    timeout: float = typer.Option(600, "--timeout", help="Seconds to wait for Ready before rolling back."),
    image: Optional[str] = typer.Option(None, "--image", help="Serving image (default: $BRAINSCAN_SERVING_IMAGE)."),
    gpus: int = setting("serving_gpus", flag="--gpus"),
    deployment_mode: str = setting("deployment_mode"),
    gpu_node_selection: Optional[bool] = typer.Option(
        None, "--gpu-node-selection/--no-gpu-node-selection", show_default="RawDeployment: yes, Serverless: no",
        help="GPU node selector and toleration on a GPU predictor. A stock Knative refuses them: turn on its "
             "podspec flags first (infra/k8s/knative/) for Serverless."),
    min_replicas: int = typer.Option(1, "--min-replicas", min=0, help="Fewest predictor replicas."),
    max_replicas: int = typer.Option(3, "--max-replicas", min=1, help="Most predictor replicas."),
    kubeconfig: Optional[Path] = typer.Option(None, "--kubeconfig",
                                              help="Kubeconfig (default: $KUBECONFIG, ~/.kube/config or in-cluster)."),
    poll_interval: float = typer.Option(5.0, "--poll-interval", help="Seconds between status polls.", hidden=True),
    as_json: bool = JSON_OPTION,
) -> None:
    """Deploy a model: create or patch the KServe InferenceService and wait until Ready (rolls back if
    it is not Ready in time), or with --local (re)start the local model server."""
    from components.deploy import deploy  # lazy: loads kserve

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = deploy(model, namespace=namespace, name=name, canary_percent=canary, local=local,
                        timeout_s=timeout, image=image, gpus=gpus, kubeconfig=kubeconfig,
                        poll_interval_s=poll_interval, workdir=workdir, min_replicas=min_replicas,
                        max_replicas=max_replicas, deployment_mode=deployment_mode,
                        gpu_node_selection=gpu_node_selection)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        fail(str(err).splitlines()[0])
    typer.echo(result.message, err=True)
    if as_json:
        emit_json(result.summary())
    if not result.ready:
        fail("deploy failed: " + result.message)


# --------------------------------------------------------------------------- pipeline: run, compile, upload, submit, schedule
pipeline_app = typer.Typer(help="The KFP pipeline: run it locally, compile it, upload/submit/schedule it on Kubeflow.",
                           no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")
IF_NEW_OPTION = typer.Option(False, "--retrain-if-new-data",
                             help="Use the retrain pipeline: does nothing when the champion saw this very data.")
HOST_OPTION = typer.Option(..., "--host", help="KFP API endpoint, e.g. http://ml-pipeline.kubeflow.svc.cluster.local:8888.")
NAMESPACE_OPTION = typer.Option(None, "--namespace", help="Kubeflow profile namespace (multi-user installs).")


@pipeline_app.command("run")
@with_settings()
def pipeline_run(
    given: dict,
    local: bool = typer.Option(False, "--local", help="Run on this machine through kfp.local (required for now)."),
    workdir: Path = typer.Option(Path(DEFAULT_WORKDIR), "--workdir", help="Local stack, pipeline root, summary.json."),
    preset: Optional[str] = PRESET_OPTION,
    if_new_data: bool = IF_NEW_OPTION,
) -> None:
    """Run the KFP pipeline locally end to end; the last line printed is the path of summary.json."""
    from pipelines.local import run_local  # lazy: loads kfp

    if not local:
        fail("only local runs start here: add --local, or use `brainscan pipeline submit --host URL` for a cluster")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    params = _params(preset, given)
    try:
        summary_path = run_local(params, workdir, only_if_new_data=if_new_data)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        fail(str(err).splitlines()[0])
    _print_run_summary(summary_path)
    typer.echo(summary_path)


def _print_run_summary(summary_path: Path) -> None:
    summary = json.loads(Path(summary_path).read_text())
    if summary.get("promise"):
        typer.echo(summary["promise"], err=True)
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
    from pipelines.pipeline import compile_pipeline  # lazy: loads kfp

    out.parent.mkdir(parents=True, exist_ok=True)
    typer.echo(compile_pipeline(out, "retrain" if retrain else "train"))


@pipeline_app.command("upload")
def pipeline_upload(
    host: str = HOST_OPTION,
    version: Optional[str] = typer.Option(None, "--version", help="Version name (default: a timestamp)."),
    retrain: bool = typer.Option(False, "--retrain-if-new-data", help="Upload the retrain-if-new-data pipeline."),
    namespace: Optional[str] = NAMESPACE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Upload the pipeline (a new version when it exists already)."""
    from pipelines import kfp_client  # lazy: loads kfp

    try:
        result = kfp_client.upload(host, which="retrain" if retrain else "train", version=version, namespace=namespace)
    except Exception as err:  # connection refused, auth, API errors: one line, no traceback
        fail(f"upload to {host} failed: {str(err).splitlines()[0]}")
    typer.echo(f"uploaded version {result.name} ({result.version_id}) of pipeline {result.pipeline_id}", err=True)
    if as_json:
        emit_json(result.summary())


@pipeline_app.command("submit")
@with_settings(names=tuple(n for n in config.param_names() if n != "namespace"))
def pipeline_submit(
    given: dict,
    host: str = HOST_OPTION,
    preset: Optional[str] = PRESET_OPTION,
    retrain: bool = IF_NEW_OPTION,
    run_name: Optional[str] = typer.Option(None, "--run-name"),
    namespace: Optional[str] = typer.Option(None, "--namespace",
                                            help="Kubeflow profile namespace: the run runs there and deploys there."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Start one run on the cluster; parameters not given keep the pipeline's (or the preset's) values."""
    from pipelines import kfp_client  # lazy: loads kfp

    _params(preset, given)  # an unknown preset or value: a clear error before the cluster is asked
    arguments = {**(PRESETS[preset] if preset else {}), **given, **({"namespace": namespace} if namespace else {})}
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
    host: str = HOST_OPTION,
    cron: str = typer.Option("0 0 3 * * *", "--cron", help="When: cron with seconds first (5 fields also accepted)."),
    source: Optional[str] = setting("source", default=None, show_default=DEFAULTS.source),
    always: bool = typer.Option(False, "--always-train",
                                help="Schedule the full training pipeline (default: retrain only if new data)."),
    name: Optional[str] = typer.Option(None, "--name", help="Recurring run name."),
    namespace: Optional[str] = NAMESPACE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a recurring run (max_concurrency=1, no catch-up)."""
    from pipelines import kfp_client  # lazy: loads kfp

    try:
        result = kfp_client.schedule(host, cron, {"source": source} if source else {},
                                     which="train" if always else "retrain", name=name, namespace=namespace)
    except ValueError as err:
        fail(str(err))
    except Exception as err:
        fail(f"schedule on {host} failed: {str(err).splitlines()[0]}")
    typer.echo(f"recurring run {result.recurring_run_id} ({result.name}) on '{cron}'", err=True)
    if as_json:
        emit_json(result.summary())


@app.command("demo")
@with_settings(names=("image_size", "epochs", "fine_tune_epochs", "min_recall", "min_auc"))
def demo(
    given: dict,
    workdir: Path = typer.Option(Path(DEMO_WORKDIR), "--workdir", help="Everything the demo writes goes here."),
    per_class: int = typer.Option(60, "--per-class", min=20,
                                  help="Synthetic images per class (60: enough validation and test tumors for a recall promise)."),
) -> None:
    """The whole local stack end to end on an offline synthetic dataset, then one v2 prediction
    (the demo preset; the options given override it)."""
    # lazy: loads kfp
    from brainscan.local import synth
    from pipelines.local import run_local

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    workdir = workdir.resolve()
    params = _params("demo", given)
    typer.echo(f"1/2 writing a synthetic CT/MRI archive ({per_class} images per class) ...", err=True)
    data = synth.generate(workdir / "synthetic", per_class=per_class, seed=0)
    typer.echo(f"2/2 running the pipeline locally (preset demo: {params.image_size} px, "
               f"{params.epochs}+{params.fine_tune_epochs} epochs); step logs in {workdir / 'logs'}", err=True)
    try:
        summary_path = run_local(params.replace(source=str(data.out_dir)), workdir)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        fail(str(err).splitlines()[0])
    _print_run_summary(summary_path)
    summary = json.loads(summary_path.read_text())
    typer.echo(f"synthetic data   {data.out_dir}\nS3 (SeaweedFS)   {summary.get('data_uri')}\n"
               f"MLflow           {summary['tracking_uri']}\nmodel            {summary.get('model_uri')}\n"
               f"model server     {summary.get('served_url')}\nstop the stack   brainscan stack down --workdir {workdir}"
               f" (and its model server)", err=True)
    typer.echo(summary_path)


# --------------------------------------------------------------------------- retraining: check, watch
retrain_app = typer.Typer(help="Automated retraining: retrain when the data changed.", no_args_is_help=True)
app.add_typer(retrain_app, name="retrain")


def _mlflow_env(workdir: Path) -> None:
    """Use the local stack's MLflow/S3 when the environment names none."""
    from brainscan.local import stack  # lazy: see the module docstring

    if os.environ.get("MLFLOW_TRACKING_URI"):
        return
    info = stack.status(workdir)
    if info is None:
        fail("MLFLOW_TRACKING_URI is not set and no local stack runs in "
             f"{workdir}: export the cluster's settings or run `brainscan stack up --workdir {workdir}`")
    os.environ.update(info.env())


@retrain_app.command("check")
def retrain_check(
    source: str = setting("source"),
    model_name: str = setting("model_name"),
    workdir: Path = typer.Option(Path(DEFAULT_WORKDIR), "--workdir", help="Local stack to use when no MLflow is set."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Is a retrain due? Compares the source's dataset fingerprint with the champion's tag (exit 0 either way)."""
    from pipelines.watcher import check  # lazy: loads MLflow

    _mlflow_env(workdir)
    try:
        decision = check(source, model_name=model_name)
    except Exception as err:  # bad source, MLflow unreachable
        fail(str(err).splitlines()[0])
    typer.echo(("retrain due: " if decision.retrain else "up to date: ") + decision.message)
    if as_json:
        emit_json(decision.summary())


@retrain_app.command("watch")
@with_settings()
def retrain_watch(
    given: dict,
    interval: float = typer.Option(300, "--interval", min=1, help="Seconds between checks."),
    host: Optional[str] = typer.Option(None, "--host", help="Submit a cluster run here (else run locally)."),
    workdir: Path = typer.Option(Path(DEFAULT_WORKDIR), "--workdir", help="Local runs: the work dir."),
    preset: Optional[str] = PRESET_OPTION,
    max_checks: Optional[int] = typer.Option(None, "--max-checks", min=1, help="Stop after this many checks."),
    settle_checks: int = typer.Option(2, "--settle-checks", min=1,
                                      help="Start a run once the same data was seen on this many checks in a row "
                                           "(an upload in progress changes it from check to check)."),
) -> None:
    """Check on an interval; when the data changed, submit a run (--host) or run the pipeline locally.

    With --host: one run per data version, named after its fingerprint and not submitted again when the
    KFP API has it already (a restarted watcher does not double it); --namespace is also the Kubeflow
    profile the run goes to. The pod's projected KFP token authenticates it (infra/k8s/retrain/)."""
    # lazy: loads MLflow and kfp
    from brainscan.local import stack
    from pipelines import watcher

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    params = _params(preset, given)
    if host is None:
        stack.up(workdir)
    _mlflow_env(workdir)

    def start_run(decision) -> None:
        if host:
            from pipelines import kfp_client  # lazy: only when submitting

            result = kfp_client.submit_once(host, watcher.run_name(decision.fingerprint),
                                            {**(PRESETS[preset] if preset else {}), **given}, which="retrain",
                                            namespace=given.get("namespace"))
            typer.echo(f"{'submitted' if result.action == 'submit' else 'already submitted:'} run {result.run_id} "
                       f"({result.name})", err=True)
        else:
            from pipelines.local import run_local  # lazy: only for local runs

            try:
                typer.echo(run_local(params, workdir, only_if_new_data=True))
            except RuntimeError as err:  # a failed run is logged; the watch goes on
                typer.echo(f"run failed: {str(err).splitlines()[0]}", err=True)

    started = watcher.watch(params.source, start_run, interval_s=interval, model_name=params.model_name,
                            max_checks=max_checks, settle_checks=settle_checks)
    typer.echo(f"{started} run(s) started", err=True)


if __name__ == "__main__":
    app()
