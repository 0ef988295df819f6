"""`brainscan model`: the MLflow model registry (list, info, rollback).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from brainscan import config
from brainscan.config import MODEL_NAME
from cli.common import JSON_OPTION, MODEL_NAME_OPTION, TRACKING_OPTION, WORKDIR_OPTION, emit_json, fail, setting


model_app = typer.Typer(help="The MLflow model registry: list, info, rollback.", no_args_is_help=True)


@model_app.command("rollback")
def model_rollback(
    name: str = MODEL_NAME_OPTION, tracking_uri: Optional[str] = TRACKING_OPTION, workdir: Path = WORKDIR_OPTION,
    redeploy: bool = typer.Option(False, "--deploy/--alias-only",
                                  help="Redeploy the previous champion's pinned version first (the InferenceService "
                                       "--isvc in --namespace, or the local model server with --local) and move the "
                                       "alias once it is Ready; --alias-only moves the alias and names what still "
                                       "serves the old version."),
    local: bool = typer.Option(False, "--local", help="With --deploy: the local model server in --workdir."),
    namespace: str = setting("namespace"),
    isvc: str = typer.Option(MODEL_NAME, "--isvc", help="InferenceService name."),
    kubeconfig: Optional[Path] = typer.Option(None, "--kubeconfig",
                                              help="Kubeconfig (default: $KUBECONFIG, ~/.kube/config or in-cluster)."),
    timeout: float = setting("timeout_s", config.DeploySettings, flag="--timeout"),
    poll_interval: float = setting("poll_interval_s", config.DeploySettings, flag="--poll-interval", hidden=True),
    as_json: bool = JSON_OPTION,
) -> None:
    """Move the `champion` alias back to the previous champion version; with --deploy, serve that version first."""
    # lazy: loads MLflow and kserve
    from brainscan.registry import RegistryError
    from components.deploy import rollback_champion

    if local and not redeploy:
        fail("--local redeploys the local model server: add --deploy")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # urllib3 warns at each of MLflow's (bounded) retries; an unreachable registry is said once, by `fail`
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    try:
        result = rollback_champion(name, tracking_uri=tracking_uri, workdir=workdir, redeploy=redeploy, local=local,
                                   namespace=namespace, isvc=isvc, kubeconfig=kubeconfig, timeout_s=timeout,
                                   poll_interval_s=poll_interval)
    except (RegistryError, RuntimeError) as err:
        fail(str(err).splitlines()[0])
    typer.echo(result.message, err=True)
    if as_json:
        emit_json(result.summary())
    if not result.alias_moved:
        fail("rollback failed: " + result.message.splitlines()[0])


@model_app.command("info")
def model_info(name: str = MODEL_NAME_OPTION, tracking_uri: Optional[str] = TRACKING_OPTION,
               workdir: Path = WORKDIR_OPTION) -> None:
    """The current champion (version, threshold, tags) as JSON; exit 3 when there is none."""
    from brainscan.registry import RegistryError, champion_info  # lazy: loads MLflow

    try:
        info = champion_info(name, tracking_uri=tracking_uri, workdir=workdir)
    except RegistryError as err:
        fail(str(err))
    if info is None:
        typer.echo(f"{name} has no champion", err=True)
        raise typer.Exit(3)
    emit_json(info)


@model_app.command("list")
def model_list(name: str = MODEL_NAME_OPTION, tracking_uri: Optional[str] = TRACKING_OPTION,
               workdir: Path = WORKDIR_OPTION) -> None:
    """Every version of the model, oldest first, the champion marked."""
    from brainscan.registry import RegistryError, list_versions  # lazy: loads MLflow

    try:
        rows = list_versions(name, tracking_uri=tracking_uri, workdir=workdir)
    except RegistryError as err:
        fail(str(err))
    for row in rows:
        typer.echo(f"{row['version']:>4} {'*' if row['champion'] else ' '} threshold={row['threshold']} "
                   f"code={str(row['code_version'])[:12]} data={str(row['dataset_fingerprint'])[:12]}")
