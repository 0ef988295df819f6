"""`brainscan pipeline` (run locally, compile, upload, submit, schedule) and `brainscan demo`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

from brainscan import config
from brainscan.config import DEFAULT_WORKDIR, DEFAULTS, DEMO_WORKDIR
from cli.common import JSON_OPTION, PRESET_OPTION, emit_json, fail, pipeline_params, setting, with_settings


demo_app = typer.Typer()  # `brainscan demo` joins the root command (cli/app.py)


pipeline_app = typer.Typer(help="The KFP pipeline: run it locally, compile it, upload/submit/schedule it on Kubeflow.",
                           no_args_is_help=True)


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
    params = pipeline_params(preset, given)
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
                   f"served at {summary.get('served_url')}; champion: version {summary.get('champion_version')}",
                   err=True)
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

    pipeline_params(preset, given)  # an unknown preset or value: a clear error before the cluster is asked
    arguments = config.preset_arguments(preset, {**given, **({"namespace": namespace} if namespace else {})})
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


@demo_app.command("demo")
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
    params = pipeline_params("demo", given)
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
