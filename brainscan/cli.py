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
    """Stop the stack; leaves no process behind."""
    from brainscan import stack

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

# --------------------------------------------------------------------------- serving (serve, predict, deploy)

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


if __name__ == "__main__":
    app()
