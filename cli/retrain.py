"""`brainscan retrain`: retrain when the data changed (check once, or watch).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import typer

from brainscan import config
from brainscan import heartbeat as liveness
from brainscan.config import DEFAULT_WORKDIR, WatchSettings, preset_arguments
from cli.common import JSON_OPTION, PRESET_OPTION, emit_json, fail, pipeline_params, setting, with_settings


retrain_app = typer.Typer(help="Automated retraining: retrain when the data changed.", no_args_is_help=True)


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
    interval: float = setting("interval_s", WatchSettings, flag="--interval"),
    host: Optional[str] = typer.Option(None, "--host", help="Submit a cluster run here (else run locally)."),
    workdir: Path = typer.Option(Path(DEFAULT_WORKDIR), "--workdir", help="Local runs: the work dir."),
    preset: Optional[str] = PRESET_OPTION,
    max_checks: Optional[int] = typer.Option(None, "--max-checks", min=1, help="Stop after this many checks."),
    settle_checks: int = setting("settle_checks", WatchSettings),
    kfp_timeout: float = setting("kfp_timeout_s", WatchSettings, flag="--kfp-timeout"),
    heartbeat: str = setting("heartbeat", WatchSettings),
) -> None:
    """Check on an interval; when the data changed, submit a run (--host) or run the pipeline locally.

    With --host: one run per data version, named after its fingerprint and not submitted again when the
    KFP API has it already (a restarted watcher does not double it); --namespace is also the Kubeflow
    profile the run goes to. The pod's projected KFP token authenticates it (infra/k8s/retrain/).
    --heartbeat: the file `brainscan retrain alive` checks (the pod's liveness probe)."""
    # lazy: loads MLflow and kfp
    from brainscan.local import stack
    from pipelines import watcher

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    params = pipeline_params(preset, given)
    if host is None:
        stack.up(workdir)
    _mlflow_env(workdir)

    def start_run(decision) -> None:
        if host:
            from pipelines import kfp_client  # lazy: only when submitting

            result = kfp_client.submit_once(host, watcher.run_name(decision.fingerprint),
                                            preset_arguments(preset, given), which="retrain",
                                            namespace=given.get("namespace"), timeout_s=kfp_timeout)
            typer.echo(f"{'submitted' if result.action == 'submit' else 'already submitted:'} run {result.run_id} "
                       f"({result.name})", err=True)
        else:
            from pipelines.local import run_local  # lazy: only for local runs

            try:
                typer.echo(run_local(params, workdir, only_if_new_data=True))
            except RuntimeError as err:  # a failed run is logged; the watch goes on
                typer.echo(f"run failed: {str(err).splitlines()[0]}", err=True)

    try:
        started = watcher.watch(params.source, start_run, interval_s=interval, model_name=params.model_name,
                                max_checks=max_checks, settle_checks=settle_checks, heartbeat=heartbeat or None)
    except OSError as err:  # the heartbeat cannot be written: the probe would restart the pod forever
        fail(f"cannot start watching: {str(err).splitlines()[0]}")
    typer.echo(f"{started} run(s) started", err=True)


@retrain_app.command("alive")
def retrain_alive(
    heartbeat: str = typer.Option(..., "--heartbeat", help=config.param_help("heartbeat", WatchSettings)),
    max_age: float = setting("max_age_s", WatchSettings, flag="--max-age"),
) -> None:
    """Exit 0 when the watcher's heartbeat is fresh, 1 when it is old or missing (a liveness probe)."""
    alive, why = liveness.check(heartbeat, max_age)
    typer.echo(why, err=not alive)
    if not alive:
        raise typer.Exit(1)
