"""What every command shares: options built from brainscan.config, JSON output, one-line errors.

Options that set a pipeline parameter or a server setting are built from brainscan.config
(`PipelineParams`, `ServeSettings`, `ValidationLimits`): their defaults and help are written
there once. `--json` makes the last output line a JSON summary.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from pathlib import Path
from typing import Optional

import typer

from brainscan import config
from brainscan.config import DEFAULT_WORKDIR, MODEL_NAME, PRESETS, PipelineParams
from brainscan.redact import redact


def emit_json(summary) -> None:
    """Print a JSON summary as the last output line (URIs in it without their user and password)."""
    typer.echo(redact(json.dumps(summary, sort_keys=True, default=str)))


def fail(message: str, code: int = 1) -> None:
    """A one-line error on stderr and a non-zero exit: no traceback for expected failures (and no
    credentials: an error text may repeat a URI with its user and password)."""
    typer.echo(f"error: {redact(message)}", err=True)
    raise typer.Exit(code)


def option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def setting(name: str, cls=PipelineParams, default=dataclasses.MISSING, flag: str | None = None, **extra):
    """A typer option for one field of a config dataclass: its default and help come from the field."""
    field = config.param_field(name, cls)
    limits = {k: field.metadata[k] for k in ("min", "max") if k in field.metadata}
    value = field.default if default is dataclasses.MISSING else default
    return typer.Option(value, flag or option_flag(name), help=field.metadata["help"], **limits, **extra)


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
                                   default=typer.Option(None, option_flag(f.name), help=f.metadata["help"],
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


def pipeline_params(preset: str | None, given: dict) -> PipelineParams:
    try:
        return config.preset(preset, given)
    except ValueError as err:
        fail(str(err))


JSON_OPTION = typer.Option(False, "--json", help="Last output line: a JSON summary.")


WORKDIR_OPTION = typer.Option(Path(DEFAULT_WORKDIR), "--workdir", help="Where the local stack keeps its data.")


PRESET_OPTION = typer.Option(None, "--preset", help=f"Start from a named parameter set: {', '.join(PRESETS)} "
                                                    "(cluster defaults: gpu); options given override it.")


TRACKING_OPTION = typer.Option(None, "--tracking-uri",
                               help="MLflow (default: $MLFLOW_TRACKING_URI, else sqlite in --workdir).")


MODEL_NAME_OPTION = typer.Option(MODEL_NAME, "--name", help="Registered model name.")
