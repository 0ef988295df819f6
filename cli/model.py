"""`brainscan model`: the MLflow model registry (list, info, rollback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import JSON_OPTION, MODEL_NAME_OPTION, TRACKING_OPTION, WORKDIR_OPTION, emit_json, fail


model_app = typer.Typer(help="The MLflow model registry: list, info, rollback.", no_args_is_help=True)


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
